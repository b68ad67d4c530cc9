//! The kernel loader on a hostile image: the input is the kernel file (ELF vmlinux, bzImage
//! or anything else), loaded into 64 MiB of guest memory as `ray vm run --kernel` would.
//! It must be refused with an error or loaded inside guest memory; nothing may panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ray_vmm::boot::{self, BootSpec};
use ray_vmm::memory::MemoryManager;

const MEM_BYTES: u64 = 64 << 20;

/// One guest memory for every run: loading overwrites what it needs.
fn memory() -> &'static MemoryManager {
    static MEM: OnceLock<MemoryManager> = OnceLock::new();
    MEM.get_or_init(|| {
        MemoryManager::create(&boot::layout::ram_regions(MEM_BYTES)).expect("64 MiB of memory")
    })
}

fn kernel_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| ray_fuzz::scratch_file("kernel"))
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(kernel_path(), data).expect("scratch write");
    let spec = BootSpec {
        kernel: kernel_path().clone(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus: 2,
        mem_bytes: MEM_BYTES,
        devices: Default::default(),
        numa: None,
        attribution: false,
    };
    let _ = boot::load(memory().ram(), &spec);
});
