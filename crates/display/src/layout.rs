//! Where the framebuffers go: the top of guest RAM below the MMIO hole, one
//! [`ray_guest_abi::display::DisplayTable`] page first, then each display's pixels, page
//! aligned. The VMM reserves the range in the e820 map, so no kernel takes it for RAM, and
//! because it is guest RAM, snapshots and migrations carry the pictures.
use ray_api::gpu::GpuConfig;
use ray_guest_abi::display::{
    DisplayEntry, DisplayTable, BYTES_PER_PIXEL, DISPLAY_TABLE_MAGIC, FORMAT_XRGB8888, MAX_DISPLAYS,
};

const PAGE: u64 = 4096;
/// The range starts on a 2 MiB boundary: the guest maps RAM with 2 MiB pages.
const ALIGN: u64 = 2 << 20;

/// One display's framebuffer in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplayGeometry {
    /// The display's number in the VM, over all GPUs.
    pub index: usize,
    pub gpu: usize,
    pub gpa: u64,
    pub width: u32,
    pub height: u32,
    /// Bytes from one line to the next.
    pub stride: u32,
}

impl DisplayGeometry {
    pub fn bytes(&self) -> usize {
        self.stride as usize * self.height as usize
    }
}

/// The video memory range and the displays in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VramLayout {
    /// Guest-physical start of the range (the display table's page).
    pub start: u64,
    /// Length of the range, a multiple of 2 MiB.
    pub len: u64,
    pub displays: Vec<DisplayGeometry>,
}

/// The layout can not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the displays need {need} bytes of video memory in guest RAM, more than half of the \
         {low} bytes below 3 GiB: give the VM more memory or fewer or smaller displays"
    )]
    TooLarge { need: u64, low: u64 },
}

impl VramLayout {
    /// Plans the range for the emulated GPUs of `gpus` in low RAM ending at `low_ram_end`.
    /// None without any.
    pub fn plan(gpus: &[GpuConfig], low_ram_end: u64) -> Result<Option<VramLayout>, LayoutError> {
        // Only emulated GPUs scan out of guest RAM here (a Bochs device has its own VRAM);
        // a virtio GPU's pictures are in resources its driver sends.
        let mut sizes = Vec::new();
        for (gpu, g) in gpus.iter().enumerate() {
            if !g.in_ram() {
                continue;
            }
            for _ in 0..g.displays {
                sizes.push((gpu, g.width, g.height));
            }
        }
        if sizes.is_empty() {
            return Ok(None);
        }
        let need: u64 = PAGE
            + sizes
                .iter()
                .map(|&(_, w, h)| (u64::from(w) * u64::from(h) * 4).next_multiple_of(PAGE))
                .sum::<u64>();
        let len = need.next_multiple_of(ALIGN);
        if len > low_ram_end / 2 {
            return Err(LayoutError::TooLarge {
                need,
                low: low_ram_end,
            });
        }
        let start = (low_ram_end - len) & !(ALIGN - 1);
        let mut gpa = start + PAGE;
        let displays = sizes
            .into_iter()
            .enumerate()
            .map(|(index, (gpu, width, height))| {
                let d = DisplayGeometry {
                    index,
                    gpu,
                    gpa,
                    width,
                    height,
                    stride: width * BYTES_PER_PIXEL,
                };
                gpa += (d.bytes() as u64).next_multiple_of(PAGE);
                d
            })
            .collect();
        Ok(Some(VramLayout {
            start,
            len,
            displays,
        }))
    }

    /// The table the guest reads at [`VramLayout::start`].
    pub fn table(&self) -> DisplayTable {
        let mut t = DisplayTable {
            magic: DISPLAY_TABLE_MAGIC,
            count: self.displays.len() as u32,
            reserved: 0,
            displays: [DisplayEntry::default(); MAX_DISPLAYS],
        };
        for (slot, d) in t.displays.iter_mut().zip(&self.displays) {
            *slot = DisplayEntry {
                gpa: d.gpa,
                width: d.width,
                height: d.height,
                stride: d.stride,
                format: FORMAT_XRGB8888,
            };
        }
        t
    }

    /// The table as the bytes the VMM writes into guest memory.
    pub fn table_bytes(&self) -> Vec<u8> {
        let t = self.table();
        let mut out = Vec::with_capacity(core::mem::size_of::<DisplayTable>());
        out.extend_from_slice(&t.magic.to_le_bytes());
        out.extend_from_slice(&t.count.to_le_bytes());
        out.extend_from_slice(&t.reserved.to_le_bytes());
        for d in &t.displays {
            out.extend_from_slice(&d.gpa.to_le_bytes());
            for v in [d.width, d.height, d.stride, d.format] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        debug_assert_eq!(out.len(), core::mem::size_of::<DisplayTable>());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ray_api::gpu::GpuType;

    fn gpu(w: u32, h: u32, n: u8) -> GpuConfig {
        GpuConfig {
            kind: GpuType::Emulated,
            width: w,
            height: h,
            displays: n,
            passthrough: None,
            backend: None,
            token_file: None,
            timeout_ms: None,
            device: None,
        }
    }

    #[test]
    fn displays_follow_the_table_page_at_the_top_of_low_ram() {
        let l = VramLayout::plan(&[gpu(640, 480, 2), gpu(1024, 768, 1)], 512 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(l.start % ALIGN, 0);
        assert_eq!(l.start + l.len, 512 << 20);
        assert_eq!(l.displays.len(), 3);
        assert_eq!(l.displays[0].gpa, l.start + PAGE);
        assert_eq!(l.displays[1].gpa, l.start + PAGE + 640 * 480 * 4);
        assert_eq!((l.displays[2].gpu, l.displays[2].stride), (1, 4096));
        let last = l.displays[2];
        assert!(last.gpa + last.bytes() as u64 <= l.start + l.len);
        let t = l.table_bytes();
        assert_eq!(&t[..8], b"RAYDISP1");
        assert_eq!(u32::from_le_bytes(t[8..12].try_into().unwrap()), 3);
        assert_eq!(
            u64::from_le_bytes(t[16..24].try_into().unwrap()),
            l.displays[0].gpa
        );
        assert_eq!(VramLayout::plan(&[], 512 << 20).unwrap(), None);
        let virtio = GpuConfig {
            kind: GpuType::Paravirt,
            ..gpu(640, 480, 1)
        };
        assert_eq!(
            VramLayout::plan(std::slice::from_ref(&virtio), 512 << 20).unwrap(),
            None
        );
        let l = VramLayout::plan(&[virtio, gpu(640, 480, 1)], 512 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(l.displays.len(), 1, "no video memory for a virtio GPU");
        assert_eq!((l.displays[0].index, l.displays[0].gpu), (0, 1));
        let bochs = GpuConfig {
            device: Some(ray_api::gpu::EmulatedDevice::Bochs),
            ..gpu(640, 480, 1)
        };
        assert_eq!(
            VramLayout::plan(&[bochs], 512 << 20).unwrap(),
            None,
            "a Bochs device's VRAM is its own, not guest RAM"
        );
    }

    #[test]
    fn video_memory_may_take_at_most_half_of_low_ram() {
        let e = VramLayout::plan(&[gpu(3840, 2160, 4)], 64 << 20).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the displays need 132714496 bytes"),
            "{e}"
        );
    }
}
