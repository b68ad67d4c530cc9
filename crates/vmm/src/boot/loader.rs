//! Loading the kernel (ELF or bzImage), the initrd and the command line.
//!
//! [`inspect`] reads what can be checked from the files alone (kind, where an ELF's
//! segments go, a bzImage's setup header); the API validates a configuration with it before
//! any memory exists, and [`load_kernel`] copies the kernel with linux-loader afterwards.
use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use ray_guest_abi::{NOTE_DIRECT_SMP, NOTE_NAME};

use super::elf::{self, ElfInfo};
use super::layout::{self, CMDLINE, CMDLINE_MAX, HIMEM, PAGE_SIZE};
use super::BootError;
use crate::memory::GuestMem;

/// Which boot protocol image the kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF (vmlinux, rayvisor's guest): entered at its ELF entry in 64-bit mode.
    Elf,
    /// A bzImage: its protected-mode part at 1 MiB, entered at the 64-bit entry (+0x200).
    BzImage,
}

/// The 64-bit entry of a bzImage's protected-mode code (`startup_64`), from its start.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
/// Where the setup header starts in a bzImage file (and in the zero page).
const SETUP_HEADER: usize = 0x1f1;
/// The byte at 0x201 gives the header's end relative to 0x202.
const SETUP_HEADER_END_BASE: usize = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// xloadflags bit: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// initrd_addr_max of kernels older than boot protocol 2.03, which leave the field zero.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What the kernel file says about itself.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    pub kind: KernelKind,
    /// ELF: program headers and notes.
    pub elf: Option<ElfInfo>,
    /// bzImage: the setup header as the boot protocol says to copy it.
    pub header: Option<setup_header>,
}

impl KernelInfo {
    /// Longest command line (without its NUL) the kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        let own = self
            .header
            .filter(|h| h.version >= 0x0206 && h.cmdline_size != 0)
            .map_or(usize::MAX, |h| h.cmdline_size as usize);
        own.min(CMDLINE_MAX - 1)
    }

    /// Highest address the initrd may occupy (its last byte).
    pub fn initrd_addr_max(&self) -> u64 {
        match self.header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            Some(_) => OLD_INITRD_ADDR_MAX,
            None => u64::from(u32::MAX),
        }
    }

    /// Guest-physical range the kernel occupies once running (ELF: its segments, bss
    /// included; bzImage: `init_size` bytes from where the decompressor puts the kernel).
    pub fn footprint(&self) -> Option<(u64, u64)> {
        if let Some(elf) = &self.elf {
            let start = elf.segments.iter().map(|s| s.paddr).min()?;
            let end = elf.segments.iter().map(|s| s.end()).max()??;
            return Some((start, end));
        }
        let h = self.header?;
        // The decompressor runs the kernel from max(load address, pref_address) rounded up
        // to kernel_alignment; older headers have neither field and mean the load address.
        let start = u64::from(h.code32_start).max(h.pref_address);
        let align = u64::from(h.kernel_alignment).max(1);
        let start = start.checked_next_multiple_of(align)?;
        Some((HIMEM, start.checked_add(u64::from(h.init_size))?))
    }
}

/// The kernel as loaded.
pub struct Loaded {
    pub kind: KernelKind,
    /// The kernel carries rayvisor's direct-SMP note: start every vCPU at the entry.
    pub direct_smp: bool,
    pub entry: GuestAddress,
    /// End of the kernel's footprint (see [`KernelInfo::footprint`]).
    pub end: u64,
    pub header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|e| BootError::open(what, path, e))
}

/// The setup header, copied as the boot protocol says: the bytes from 0x1f1 up to the end
/// the header declares at 0x201, the rest of our struct left zero.
fn setup_header_from(data: &[u8]) -> setup_header {
    let mut hdr = setup_header::default();
    let declared_end = SETUP_HEADER_END_BASE + usize::from(data[SETUP_HEADER_END_BASE - 1]);
    let len = (declared_end.min(data.len()) - SETUP_HEADER).min(hdr.as_slice().len());
    hdr.as_mut_slice()[..len].copy_from_slice(&data[SETUP_HEADER..SETUP_HEADER + len]);
    hdr
}

/// Reads the kernel file and checks it can be booted at its 64-bit entry.
pub fn inspect(path: &Path) -> Result<KernelInfo, BootError> {
    let mut f = open("kernel", path)?;
    let mut head = Vec::with_capacity(0x400);
    (&mut f)
        .take(0x400)
        .read_to_end(&mut head)
        .map_err(|e| BootError::open("kernel", path, e))?;
    let bad = |reason: String| BootError::Load {
        path: path.to_path_buf(),
        reason,
    };
    if head.starts_with(b"\x7fELF") {
        let info = elf::parse_file(&f).map_err(|r| bad(format!("malformed ELF: {r}")))?;
        if info.segments.is_empty() {
            return Err(bad("the ELF has no loadable segment".into()));
        }
        return Ok(KernelInfo {
            kind: KernelKind::Elf,
            elf: Some(info),
            header: None,
        });
    }
    if head.len() < 0x270 || head[SETUP_HEADER_END_BASE..SETUP_HEADER_END_BASE + 4] != *HDRS_MAGIC {
        return Err(BootError::NotAKernel(path.to_path_buf()));
    }
    let hdr = setup_header_from(&head);
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(format!(
            "the bzImage has no 64-bit entry point (boot protocol {:#x}, xloadflags {:#x})",
            { hdr.version },
            { hdr.xloadflags }
        )));
    }
    Ok(KernelInfo {
        kind: KernelKind::BzImage,
        elf: None,
        header: Some(hdr),
    })
}

/// Checks that the kernel fits the guest's RAM from 1 MiB, clear of the boot tables below
/// it and of the MMIO hole above.
pub fn check_fits(path: &Path, info: &KernelInfo, mem_bytes: u64) -> Result<(), BootError> {
    let ram_end = layout::low_ram_end(mem_bytes);
    let outside = |start: u64, end: u64| BootError::KernelPlacement {
        path: path.to_path_buf(),
        start,
        end,
        ram_end,
    };
    let Some((start, end)) = info.footprint() else {
        return Err(outside(0, u64::MAX));
    };
    if let Some(elf) = &info.elf {
        for s in &elf.segments {
            let end = s.end().unwrap_or(u64::MAX);
            if s.paddr < HIMEM || end > ram_end {
                return Err(outside(s.paddr, end));
            }
        }
        if !(HIMEM..ram_end).contains(&elf.entry) {
            return Err(BootError::Load {
                path: path.to_path_buf(),
                reason: format!("the ELF entry {:#x} is outside guest RAM", elf.entry),
            });
        }
    }
    if start < HIMEM || end > ram_end {
        return Err(outside(start, end));
    }
    Ok(())
}

/// Copies the kernel into guest memory (after [`inspect`] and [`check_fits`]).
pub fn load_kernel(mem: &GuestMem, path: &Path, info: &KernelInfo) -> Result<Loaded, BootError> {
    let mut f = open("kernel", path)?;
    let bad = |e: linux_loader::loader::Error| BootError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let end = info.footprint().map_or(0, |f| f.1);
    match info.kind {
        KernelKind::Elf => {
            // The PVH note, if any, is ignored: every kernel is entered at its 64-bit entry.
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
            Ok(Loaded {
                kind: KernelKind::Elf,
                direct_smp: info
                    .elf
                    .as_ref()
                    .is_some_and(|e| e.has_note(NOTE_NAME, NOTE_DIRECT_SMP)),
                entry: r.kernel_load,
                end: end.max(r.kernel_end),
                header: None,
            })
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
            // Keep our protocol-sized copy of the header, with the load address the loader
            // chose.
            let header = info.header.map(|mut h| {
                h.code32_start = r.kernel_load.0 as u32;
                h
            });
            Ok(Loaded {
                kind: KernelKind::BzImage,
                direct_smp: false,
                entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY),
                end: end.max(r.kernel_end),
                header,
            })
        }
    }
}

/// Puts the initrd page-aligned at the top of low RAM, at or below `max_addr` (the highest
/// byte it may occupy) and above `kernel_end`. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    mem_bytes: u64,
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = open("initrd", path)?;
    let size = f
        .metadata()
        .map_err(|e| BootError::open("initrd", path, e))?
        .len();
    let top = layout::low_ram_end(mem_bytes).min(max_addr.saturating_add(1));
    let bottom = kernel_end.next_multiple_of(PAGE_SIZE);
    match top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1)) {
        Some(addr) if addr >= bottom && size <= u64::from(u32::MAX) => {
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(|e| BootError::Load {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            Ok((addr, size))
        }
        _ => Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            room: top.saturating_sub(bottom),
        }),
    }
}

/// Checks a command line: at most `max` bytes and no NUL (the kernel reads up to the first).
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if let Some(at) = cmdline.find('\0') {
        return Err(BootError::CmdlineNul(at));
    }
    Ok(())
}

/// Writes the command line and its NUL at [`CMDLINE`]; returns its length without the NUL.
pub fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<usize, BootError> {
    check_cmdline(cmdline, CMDLINE_MAX - 1)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|_| BootError::Write {
            what: "command line",
            addr: CMDLINE,
        })?;
    Ok(cmdline.len())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::boot::elf::tests::{noted_elf, tiny_elf};

    pub fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ray-loader-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A bzImage-shaped file: `setup_sects` sectors of real-mode part with a setup header,
    /// then `body` (the "protected-mode kernel").
    pub fn tiny_bzimage(body: &[u8], xloadflags: u16, initrd_addr_max: u32) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        f[0x1f1] = setup_sects;
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        // The header ends at 0x264: what follows (handover_offset on newer kernels) is code
        // here, and must not be copied.
        f[0x201] = 0x62;
        f[0x202..0x206].copy_from_slice(HDRS_MAGIC);
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&initrd_addr_max.to_le_bytes());
        f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        f[0x234] = 1; // relocatable
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        f[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        f[0x264] = 0xee;
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn elf_segment_lands_at_its_paddr_and_entry_is_returned() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        let path = temp("elf", &tiny_elf(0x20_0000, b"RAYVISOR", 0x1000));
        let info = inspect(&path).unwrap();
        check_fits(&path, &info, 32 << 20).unwrap();
        let loaded = load_kernel(&mem, &path, &info).unwrap();
        assert_eq!(loaded.kind, KernelKind::Elf);
        assert!(!loaded.direct_smp);
        assert_eq!(loaded.entry, GuestAddress(0x20_0004));
        assert_eq!(loaded.end, 0x20_1008, "bss counts");
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got, b"RAYVISOR");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_direct_smp_note_is_reported() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        let path = temp("noted", &noted_elf(0x20_0000, NOTE_NAME, NOTE_DIRECT_SMP));
        let info = inspect(&path).unwrap();
        assert!(load_kernel(&mem, &path, &info).unwrap().direct_smp);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn elf_segments_outside_ram_from_1_mib_are_refused_with_the_range() {
        let low = temp("low-elf", &tiny_elf(0x8000, b"RAYVISOR", 0));
        let err = check_fits(&low, &inspect(&low).unwrap(), 64 << 20).unwrap_err();
        assert!(err.to_string().contains("0x8000..0x8008"), "{err}");
        let high = temp("high-elf", &tiny_elf(0x400_0000, b"RAYVISOR", 0));
        let err = check_fits(&high, &inspect(&high).unwrap(), 32 << 20).unwrap_err();
        assert!(err.to_string().contains("0x2000000"), "{err}");
        for p in [low, high] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn bzimage_is_loaded_at_1_mib_and_entered_at_plus_0x200() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 64 << 20)])
            .unwrap()
            .ram()
            .clone();
        let path = temp("bz", &tiny_bzimage(b"COMPRESSED-KERNEL", 1, 0x7fff_ffff));
        let info = inspect(&path).unwrap();
        assert_eq!(info.kind, KernelKind::BzImage);
        assert_eq!(info.cmdline_max(), 2047);
        assert_eq!(info.initrd_addr_max(), 0x7fff_ffff);
        let hdr = info.header.unwrap();
        assert_eq!(
            { hdr.handover_offset },
            0,
            "bytes past the header end are not copied"
        );
        assert_eq!({ hdr.init_size }, 0x40_0000);
        assert_eq!({ hdr.version }, 0x020f);
        check_fits(&path, &info, 64 << 20).unwrap();
        let loaded = load_kernel(&mem, &path, &info).unwrap();
        assert_eq!(loaded.entry, GuestAddress(0x10_0200));
        assert_eq!(loaded.end, 0x140_0000, "pref_address + init_size");
        let mut got = [0u8; 17];
        mem.read_slice(&mut got, GuestAddress(HIMEM)).unwrap();
        assert_eq!(&got, b"COMPRESSED-KERNEL");
        // The decompressed kernel would not fit 16 MiB + 4 MiB in 18 MiB... of low RAM.
        let err = check_fits(&path, &info, 18 << 20).unwrap_err();
        assert!(err.to_string().contains("0x1400000"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_bzimage_without_64_bit_entry_is_refused() {
        let path = temp("bz32", &tiny_bzimage(b"X", 0, 0));
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("no 64-bit entry point"), "{err}");
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_and_foreign_files_are_named() {
        let err = inspect(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let path = temp(
            "text",
            b"just some text, long enough to be read as a header",
        );
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("neither an ELF nor a bzImage"), "{err}");
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0", 4095).is_ok());
        let long = "x".repeat(CMDLINE_MAX);
        assert_eq!(
            check_cmdline(&long, CMDLINE_MAX - 1)
                .unwrap_err()
                .to_string(),
            "the kernel command line has 4096 bytes; at most 4095 fit"
        );
        assert!(check_cmdline(&"x".repeat(2048), 2047).is_err());
        assert_eq!(
            check_cmdline("a\0b", 4095).unwrap_err().to_string(),
            "the kernel command line contains a NUL byte at byte 1"
        );
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        assert_eq!(write_cmdline(&mem, "console=ttyS0").unwrap(), 13);
        let mut got = [0xffu8; 14];
        mem.read_slice(&mut got, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&got, b"console=ttyS0\0");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 64 << 20)])
            .unwrap()
            .ram()
            .clone();
        let path = temp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &path, 64 << 20, 0x20_0000, u64::MAX).unwrap();
        assert_eq!((addr, size), ((64 << 20) - 8192, 5000));
        let byte: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(byte, 7);
        // initrd_addr_max is the last byte it may use.
        let (addr, _) = load_initrd(&mem, &path, 64 << 20, 0x20_0000, 0xff_ffff).unwrap();
        assert_eq!(addr, 0x100_0000 - 8192);
        let err = load_initrd(&mem, &path, 64 << 20, (64 << 20) - 4096, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = load_initrd(
            &mem,
            Path::new("/nonexistent/initrd"),
            64 << 20,
            0,
            u64::MAX,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/initrd"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
