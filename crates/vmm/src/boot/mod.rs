//! Guest boot: memory layout, kernel loading, boot parameters and firmware tables. Pure
//! functions over guest memory: nothing here talks to KVM.
//!
//! Both kinds of guest go through the same path: rayvisor's own guest is an ELF entered
//! like a Linux `vmlinux` (64-bit boot protocol, RSI = zero page), so any VMM that boots
//! Linux boots it, and rayvisor boots Linux exactly as it boots its own guest.
pub mod acpi;
pub mod cpu;
pub mod layout;
pub mod loader;
pub mod params;

use std::path::{Path, PathBuf};

use vm_memory::GuestAddress;

pub use cpu::long_mode_sregs;
pub use loader::KernelKind;

use crate::memory::GuestMem;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
}

/// Where the loaded guest starts.
#[derive(Debug, Clone, Copy)]
pub struct BootImage {
    /// 64-bit entry point (RIP).
    pub entry: GuestAddress,
    /// The zero page (RSI).
    pub boot_params: GuestAddress,
    pub stack: GuestAddress,
    /// Top-level page table (CR3).
    pub pml4: GuestAddress,
    pub kind: KernelKind,
    /// Start every vCPU at the entry (rayvisor's guest), or only the boot CPU with the APs
    /// waiting for INIT/SIPI as on a PC (Linux).
    pub direct_smp: bool,
    pub rsdp: GuestAddress,
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
    #[error("{0} is neither an ELF nor a bzImage kernel")]
    NotAKernel(PathBuf),
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("the initrd {path} ({size} bytes) does not fit in the {room} bytes of low RAM above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error("the kernel command line has {0} bytes; at most 4095 fit")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte at byte {0}")]
    CmdlineNul(usize),
    #[error("guest memory must be between 32 MiB and 1 TiB, got {0} bytes")]
    MemorySize(u64),
    #[error("{0} e820 entries do not fit the zero page")]
    TooManyE820(usize),
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

/// Checks what can be checked before any memory exists.
pub fn validate(spec: &BootSpec) -> Result<(), BootError> {
    if !(layout::MIN_MEMORY..=layout::MAX_MEMORY).contains(&spec.mem_bytes) {
        return Err(BootError::MemorySize(spec.mem_bytes));
    }
    loader::check_cmdline(&spec.cmdline)?;
    loader::kernel_kind(&spec.kernel)?;
    if let Some(initrd) = &spec.initrd {
        std::fs::File::open(initrd).map_err(|e| BootError::open("initrd", initrd, e))?;
    }
    Ok(())
}

/// Writes everything the guest needs to start into `mem`.
pub fn load(mem: &GuestMem, spec: &BootSpec) -> Result<BootImage, BootError> {
    validate(spec)?;
    let kernel = loader::load_kernel(mem, &spec.kernel)?;
    let initrd = match &spec.initrd {
        Some(path) => {
            let max = kernel
                .header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(u64::from(u32::MAX));
            Some(loader::load_initrd(
                mem,
                path,
                spec.mem_bytes,
                kernel.end,
                max,
            )?)
        }
        None => None,
    };
    let cmdline_len = loader::write_cmdline(mem, &spec.cmdline)?;
    cpu::write_boot_tables(mem)?;
    let rsdp = acpi::write_tables(mem, spec.vcpus)?;
    let e820 = params::e820(spec.mem_bytes);
    let zero_page = params::build(&params::ZeroPage {
        header: kernel.header,
        cmdline_len,
        initrd,
        e820: &e820,
        rsdp: rsdp.0,
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
