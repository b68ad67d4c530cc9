//! Guest boot: memory layout, kernel loading, boot parameters and firmware tables. Pure
//! functions over guest memory: nothing here talks to KVM.
//!
//! Both kinds of guest go through the same path: rayvisor's own guest is an ELF entered
//! like a Linux `vmlinux` (64-bit boot protocol, RSI = zero page), so any VMM that boots
//! Linux boots it, and rayvisor boots Linux exactly as it boots its own guest.
//!
//! What the vCPU layer does with a [`BootImage`]: [`long_mode_sregs`] into KVM_SET_SREGS
//! (CR3 = [`BootImage::pml4`]); KVM_SET_REGS with RIP = `entry`, RSI = `boot_params`,
//! RSP = `stack`, RFLAGS = 0x2, everything else zero.
pub mod acpi;
pub mod cpu;
pub mod elf;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod pagetables;
pub mod params;

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

pub use acpi::write_acpi_tables;
pub use cpu::long_mode_sregs;
pub use loader::KernelKind;

use crate::memory::GuestMem;

/// Most vCPUs the boot tables describe: xAPIC IDs are 8 bits, 0xff is the broadcast ID,
/// and the I/O APIC takes the ID after the last CPU's.
pub const MAX_VCPUS: u8 = 254;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    pub devices: ray_api::vmm::DevicesConfig,
    /// Guest NUMA nodes (laid out, bound and described in the SRAT/SLIT); `None`: one node.
    pub numa: Option<crate::numa::GuestNuma>,
    /// Per-vCPU dirty rings for NUMA access attribution (`numa_attribution: ring`).
    pub attribution: bool,
}

/// Where the loaded guest starts.
#[derive(Debug, Clone, Copy)]
pub struct BootImage {
    /// 64-bit entry point (RIP).
    pub entry: GuestAddress,
    /// The zero page (RSI).
    pub boot_params: GuestAddress,
    /// Initial stack pointer (RSP), below the zero page's neighbour at 0x9000.
    pub stack: GuestAddress,
    /// Top-level page table (CR3).
    pub pml4: GuestAddress,
    pub kind: KernelKind,
    /// Start every vCPU at the entry (rayvisor's guest), or only the boot CPU with the APs
    /// waiting for INIT/SIPI as on a PC (Linux).
    pub direct_smp: bool,
    pub rsdp: GuestAddress,
    /// End of the memory the running kernel occupies (an ELF's segments with bss; a
    /// bzImage's decompressed `init_size` footprint).
    pub kernel_end: GuestAddress,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the {what} file {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel file {0} is neither an ELF nor a bzImage")]
    NotAKernel(PathBuf),
    #[error("cannot load the kernel {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "the kernel {path} needs guest memory {start:#x}..{end:#x}, but kernels must lie \
         within RAM from 1 MiB to {ram_end:#x}"
    )]
    KernelPlacement {
        path: PathBuf,
        start: u64,
        end: u64,
        ram_end: u64,
    },
    #[error("the initrd {path} ({size} bytes) does not fit in the {room} bytes of low RAM above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error("the kernel command line has {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte at byte {0}")]
    CmdlineNul(usize),
    #[error("guest memory must be between 32 MiB and 1 TiB, got {0} bytes")]
    MemorySize(u64),
    #[error("guest memory of {0} bytes is not a whole number of 4 KiB pages")]
    MemoryUnaligned(u64),
    #[error("the boot tables describe 1 to {MAX_VCPUS} vCPUs, got {0}")]
    Vcpus(u8),
    #[error("{0} e820 entries do not fit the zero page")]
    TooManyE820(usize),
    #[error(transparent)]
    Displays(#[from] ray_display::layout::LayoutError),
    #[error("devices.gpus: {0}")]
    Gpus(String),
    #[error("cannot write the {what} at guest address {addr:#x}: outside guest memory")]
    Write { what: &'static str, addr: u64 },
}

impl BootError {
    fn open(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        BootError::Open {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks what can be checked before any memory exists: sizes, the command line, and the
/// kernel and initrd files (readable, a bootable kind, the kernel fits the memory).
pub fn validate(spec: &BootSpec) -> Result<(), BootError> {
    inspect(spec).map(|_| ())
}

fn inspect(spec: &BootSpec) -> Result<loader::KernelInfo, BootError> {
    layout::check_memory(spec.mem_bytes)?;
    if !(1..=MAX_VCPUS).contains(&spec.vcpus) {
        return Err(BootError::Vcpus(spec.vcpus));
    }
    let info = loader::inspect(&spec.kernel)?;
    loader::check_cmdline(&spec.cmdline, info.cmdline_max())?;
    loader::check_fits(&spec.kernel, &info, spec.mem_bytes)?;
    if let Some(initrd) = &spec.initrd {
        std::fs::File::open(initrd).map_err(|e| BootError::open("initrd", initrd, e))?;
    }
    vram(&spec.devices, spec.mem_bytes)?;
    Ok(info)
}

/// Where the display framebuffers of the VM's GPUs lie in a guest of `mem_bytes` (None
/// without GPUs): a pure function of the configuration, so a restored or migrated VM
/// finds the same pixels at the same addresses. Checks the GPUs against their limits.
pub fn vram(
    devices: &ray_api::vmm::DevicesConfig,
    mem_bytes: u64,
) -> Result<Option<ray_display::VramLayout>, BootError> {
    ray_api::gpu::check_gpus(&devices.gpus, &devices.gpu_limits()).map_err(BootError::Gpus)?;
    Ok(ray_display::VramLayout::plan(
        &devices.gpus,
        layout::low_ram_end(mem_bytes),
    )?)
}

/// Writes everything the guest needs to start into `mem` (which must hold
/// [`layout::ram_regions`] of `spec.mem_bytes`): kernel, initrd, command line, boot page
/// tables, GDT, ACPI tables and the zero page.
pub fn load(mem: &GuestMem, spec: &BootSpec) -> Result<BootImage, BootError> {
    let info = inspect(spec)?;
    let kernel = loader::load_kernel(mem, &spec.kernel, &info)?;
    let vram = vram(&spec.devices, spec.mem_bytes)?;
    // The initrd goes below the framebuffers.
    let initrd_max = match &vram {
        Some(v) => info.initrd_addr_max().min(v.start - 1),
        None => info.initrd_addr_max(),
    };
    let initrd = match &spec.initrd {
        Some(path) => Some(loader::load_initrd(
            mem,
            path,
            spec.mem_bytes,
            kernel.end,
            initrd_max,
        )?),
        None => None,
    };
    let cmdline_len = loader::write_cmdline(mem, &spec.cmdline)?;
    pagetables::write_page_tables(mem)?;
    gdt::write_gdt(mem)?;
    let rsdp = acpi::write_acpi_tables(mem, spec.vcpus, spec.numa.as_ref())?;
    let e820 = match &vram {
        Some(v) => {
            mem.write_slice(&v.table_bytes(), GuestAddress(v.start))
                .map_err(|_| BootError::Write {
                    what: "display table",
                    addr: v.start,
                })?;
            layout::e820_reserving(spec.mem_bytes, v.start, v.len)
        }
        None => layout::e820(spec.mem_bytes),
    };
    let zero_page = params::build(&params::ZeroPage {
        header: kernel.header,
        cmdline_len,
        initrd,
        e820: &e820,
        rsdp: rsdp.0,
        screen: vram.as_ref().and_then(|v| v.displays.first().copied()),
    })?;
    let boot_params = params::write(mem, &zero_page)?;
    Ok(BootImage {
        entry: kernel.entry,
        boot_params,
        stack: GuestAddress(layout::BOOT_STACK),
        pml4: GuestAddress(layout::PML4),
        kind: kernel.kind,
        direct_smp: kernel.direct_smp,
        rsdp,
        kernel_end: GuestAddress(kernel.end),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::boot::elf::tests::tiny_elf;
    use crate::boot::loader::tests::{temp, tiny_bzimage};

    fn spec(kernel: &Path, initrd: Option<&Path>, mem_bytes: u64) -> BootSpec {
        BootSpec {
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: "console=ttyS0 ray.poll_ms=0".into(),
            vcpus: 2,
            mem_bytes,
            devices: Default::default(),
            numa: None,
            attribution: false,
        }
    }

    fn zp<T: vm_memory::ByteValued>(mem: &GuestMem, offset: u64) -> T {
        mem.read_obj(GuestAddress(layout::ZERO_PAGE + offset))
            .unwrap()
    }

    #[test]
    fn an_elf_boots_with_everything_in_place() {
        let mem_bytes = 64 << 20;
        let mem = crate::memory::MemoryManager::create(&layout::ram_regions(mem_bytes))
            .unwrap()
            .ram()
            .clone();
        let kernel = temp("boot-elf", &tiny_elf(0x10_0000, b"RAYVISOR", 0x2000));
        let initrd = temp("boot-initrd", &[0x5a; 10_000]);
        let s = spec(&kernel, Some(&initrd), mem_bytes);
        validate(&s).unwrap();
        let image = load(&mem, &s).unwrap();
        assert_eq!(image.kind, KernelKind::Elf);
        assert_eq!(image.entry, GuestAddress(0x10_0004));
        assert_eq!(image.kernel_end, GuestAddress(0x10_2008));
        assert_eq!(image.boot_params, GuestAddress(0x7000));
        assert_eq!(image.pml4, GuestAddress(0x1_0000));
        assert_eq!(image.stack, GuestAddress(0x8ff0));
        assert_eq!(image.rsdp, GuestAddress(0xe0000));
        // The zero page points at what was written.
        assert_eq!(zp::<u64>(&mem, 0x070), 0xe0000);
        assert_eq!(zp::<u8>(&mem, 0x1e8), 4, "RAM, EBDA, RAM, ECAM");
        let cmd_ptr: u32 = zp(&mem, 0x228);
        let mut cmd = [0u8; 28];
        mem.read_slice(&mut cmd, GuestAddress(u64::from(cmd_ptr)))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 ray.poll_ms=0\0");
        let (rd_addr, rd_size): (u32, u32) = (zp(&mem, 0x218), zp(&mem, 0x21c));
        assert_eq!(rd_size, 10_000);
        assert_eq!(u64::from(rd_addr), mem_bytes - 12 * 1024);
        let b: u8 = mem.read_obj(GuestAddress(u64::from(rd_addr))).unwrap();
        assert_eq!(b, 0x5a);
        // Tables and GDT are there.
        let pml4e: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        assert_eq!(pml4e, layout::PDPT | 0b111);
        let cs: u64 = mem.read_obj(GuestAddress(layout::GDT + 0x10)).unwrap();
        assert_eq!(cs, 0x00af_9b00_0000_ffff);
        for p in [kernel, initrd] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_bzimage_keeps_its_header_in_the_zero_page() {
        let mem_bytes = 64 << 20;
        let mem = crate::memory::MemoryManager::create(&layout::ram_regions(mem_bytes))
            .unwrap()
            .ram()
            .clone();
        // initrd_addr_max 32 MiB - 1: the initrd must stay below 32 MiB, not go to 64.
        let kernel = temp("boot-bz", &tiny_bzimage(b"PAYLOAD", 1, 0x1ff_ffff));
        let initrd = temp("boot-bz-initrd", &[1; 4096]);
        let image = load(&mem, &spec(&kernel, Some(&initrd), mem_bytes)).unwrap();
        assert_eq!(image.kind, KernelKind::BzImage);
        assert_eq!(image.entry, GuestAddress(0x10_0200));
        assert_eq!(
            zp::<u16>(&mem, 0x206),
            0x020f,
            "the kernel's protocol version"
        );
        assert_eq!(zp::<u32>(&mem, 0x260), 0x40_0000, "the kernel's init_size");
        assert_eq!(zp::<u32>(&mem, 0x218), 0x200_0000 - 4096, "ramdisk_image");
        assert_eq!(zp::<u8>(&mem, 0x210), 0xff, "type_of_loader");
        // This kernel takes at most 2047 bytes of command line.
        let mut long = spec(&kernel, None, mem_bytes);
        long.cmdline = "x".repeat(2048);
        assert_eq!(
            validate(&long).unwrap_err().to_string(),
            "the kernel command line has 2048 bytes; at most 2047 fit"
        );
        for p in [kernel, initrd] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let kernel = temp("validate-elf", &tiny_elf(0x10_0000, b"RAYVISOR", 0));
        let ok = spec(&kernel, None, 64 << 20);
        validate(&ok).unwrap();
        let err = |f: &dyn Fn(&mut BootSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            validate(&s).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|s| s.vcpus = 0),
            "the boot tables describe 1 to 254 vCPUs, got 0"
        );
        assert!(err(&|s| s.mem_bytes = 1 << 20).contains("got 1048576 bytes"));
        assert!(err(&|s| s.mem_bytes = (64 << 20) + 1).contains("67108865 bytes"));
        assert!(err(&|s| s.cmdline = "a\0".into()).contains("NUL byte at byte 1"));
        let missing = err(&|s| s.kernel = "/nonexistent/kernel".into());
        assert!(
            missing.starts_with("cannot open the kernel file /nonexistent/kernel"),
            "{missing}"
        );
        let missing = err(&|s| s.initrd = Some("/nonexistent/initrd".into()));
        assert!(
            missing.starts_with("cannot open the initrd file /nonexistent/initrd"),
            "{missing}"
        );
        std::fs::remove_file(kernel).unwrap();
    }

    /// Loads a real kernel named by `RAY_TEST_KERNEL` (vmlinux or bzImage); skipped without.
    #[test]
    fn a_real_kernel_loads_when_one_is_given() {
        let Some(path) = std::env::var_os("RAY_TEST_KERNEL") else {
            return;
        };
        let mem_bytes = 256 << 20;
        let mem = crate::memory::MemoryManager::create(&layout::ram_regions(mem_bytes))
            .unwrap()
            .ram()
            .clone();
        let mut s = spec(Path::new(&path), None, mem_bytes);
        s.vcpus = 4;
        let image = load(&mem, &s).unwrap();
        eprintln!("{path:?}: {image:x?}");
        assert!(image.entry.0 >= layout::HIMEM && image.kernel_end.0 <= mem_bytes);
    }
}
