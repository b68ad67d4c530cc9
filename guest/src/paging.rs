//! The full identity map, built natively by the BSP once Rust runs.
//!
//! The boot page tables (entry.rs) only cover the first GiB. Here we map every GiB up to
//! the end of RAM (at least 4 GiB) with 2 MiB pages, U/S=1 at every level (PVM needs it;
//! harmless elsewhere); 0xC000_0000-0xFFFF_FFFF is mapped uncached for MMIO. The tables
//! are carved out of usable RAM right after the image.

use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::bootparams::BootInfo;

/// End of the boot page tables' identity map.
pub const BOOT_MAP_END: u64 = 1 << 30;

const PRESENT: u64 = 1;
const WRITE: u64 = 2;
const USER: u64 = 4;
const PWT: u64 = 8;
const PCD: u64 = 0x10;
const HUGE: u64 = 0x80;
const TABLE: u64 = PRESENT | WRITE | USER;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
pub const MMIO_START: u64 = 0xc000_0000;
pub const MMIO_END: u64 = 1 << 32;
/// PML4 slots 0-255 (128 TiB); slot 256 must not be used on PVM anyway.
const MAX_MAPPED: u64 = 256 << 39;

extern "C" {
    /// End of the loaded image (linker.ld).
    static __image_end: u8;
}

/// First byte after the image and its page tables, 2 MiB aligned (workloads go above).
static KERNEL_END: AtomicU64 = AtomicU64::new(0);
/// End of the identity map.
static MAPPED_END: AtomicU64 = AtomicU64::new(BOOT_MAP_END);

pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

pub fn kernel_end() -> u64 {
    KERNEL_END.load(Relaxed)
}

pub fn mapped_end() -> u64 {
    MAPPED_END.load(Relaxed)
}

const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Bump allocator of zeroed 4 KiB pages inside the boot map.
struct PageAlloc {
    next: u64,
    limit: u64,
}

impl PageAlloc {
    fn alloc(&mut self, align: u64) -> *mut u64 {
        let page = align_up(self.next, align);
        assert!(
            page + 4096 <= self.limit,
            "no room for page tables after the image"
        );
        self.next = page + 4096;
        let p = page as *mut u64;
        // SAFETY: [page, page+4 KiB) is usable RAM inside the boot map that nothing else uses
        // (it lies after the image, below `limit`).
        unsafe { core::ptr::write_bytes(p, 0, 512) };
        p
    }
}

/// Build the full identity map; returns the new CR3 value (the caller loads it).
pub fn build(info: &BootInfo) -> u64 {
    let start = image_end();
    let region = info
        .usable()
        .find(|e| e.addr <= start && start < e.end())
        .expect("e820: no usable RAM right after the image");
    let mut pages = PageAlloc {
        next: start,
        limit: region.end().min(BOOT_MAP_END),
    };

    let ram_end = info
        .e820()
        .iter()
        .filter(|e| matches!(e.kind, 1 | 3 | 4))
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let mapped_end = align_up(ram_end.max(MMIO_END), GIB).min(MAX_MAPPED);

    // PML4 8 KiB aligned: CR3 bit 12 must be 0 on PVM.
    let pml4 = pages.alloc(8192);
    let mut pdpt: *mut u64 = core::ptr::null_mut();
    for gib in 0..mapped_end / GIB {
        if gib % 512 == 0 {
            pdpt = pages.alloc(4096);
            // SAFETY: gib / 512 < 256, inside the 512-entry PML4 page.
            unsafe { pml4.add((gib / 512) as usize).write(pdpt as u64 | TABLE) };
        }
        let pd = pages.alloc(4096);
        // SAFETY: gib % 512 < 512, inside the PDPT page.
        unsafe { pdpt.add((gib % 512) as usize).write(pd as u64 | TABLE) };
        for i in 0..512u64 {
            let addr = gib * GIB + i * MIB2;
            let cache = if (MMIO_START..MMIO_END).contains(&addr) {
                PCD | PWT
            } else {
                0
            };
            // SAFETY: i < 512, inside the PD page.
            unsafe { pd.add(i as usize).write(addr | TABLE | HUGE | cache) };
        }
    }
    KERNEL_END.store(align_up(pages.next, MIB2), Relaxed);
    MAPPED_END.store(mapped_end, Relaxed);
    pml4 as u64
}
