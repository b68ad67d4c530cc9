//! The Linux zero page (`boot_params`): setup header, command line, initrd, e820, RSDP.
//! A bzImage's own setup header is the starting point (the boot protocol's rule); an ELF
//! kernel gets a header with just what the 64-bit entry reads.
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, screen_info, setup_header};
use ray_display::DisplayGeometry;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE, ZERO_PAGE};
use super::BootError;
use crate::memory::GuestMem;

const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader: rayvisor has no registered loader id.
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags: the protected-mode kernel is at 1 MiB or above.
const LOADED_HIGH: u8 = 1;
/// An ELF kernel says nothing of its alignment: 16 MiB is what x86-64 kernels are built for.
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// What goes into the zero page.
pub struct ZeroPage<'a> {
    /// The kernel's own setup header (bzImage), or None for an ELF.
    pub header: Option<setup_header>,
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [(u64, u64, u32)],
    pub rsdp: u64,
    /// The first display, announced as a VESA linear framebuffer.
    pub screen: Option<DisplayGeometry>,
}

/// `screen_info.orig_video_isVGA` of a VESA linear framebuffer (Linux' VIDEO_TYPE_VLFB).
const VIDEO_TYPE_VLFB: u8 = 0x23;

/// `screen_info` for a linear XRGB8888 framebuffer: what vesafb, efifb and simplefb read.
fn screen_info_of(d: &DisplayGeometry) -> screen_info {
    screen_info {
        orig_video_isVGA: VIDEO_TYPE_VLFB,
        lfb_width: d.width as u16,
        lfb_height: d.height as u16,
        lfb_depth: 32,
        lfb_base: d.gpa as u32,
        // In 64 KiB units.
        lfb_size: (d.bytes() as u64).div_ceil(64 << 10) as u32,
        lfb_linelength: d.stride as u16,
        red_size: 8,
        red_pos: 16,
        green_size: 8,
        green_pos: 8,
        blue_size: 8,
        blue_pos: 0,
        rsvd_size: 8,
        rsvd_pos: 24,
        ..Default::default()
    }
}

pub fn build(zp: &ZeroPage) -> Result<boot_params, BootError> {
    let mut params = boot_params {
        hdr: zp.header.unwrap_or_default(),
        ..Default::default()
    };
    let hdr = &mut params.hdr;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDR_MAGIC;
    if zp.header.is_none() {
        hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
    }
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = zp.cmdline_len as u32;
    if let Some((addr, size)) = zp.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    if zp.e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820(zp.e820.len()));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(zp.e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = zp.e820.len() as u8;
    params.acpi_rsdp_addr = zp.rsdp;
    if let Some(d) = &zp.screen {
        params.screen_info = screen_info_of(d);
    }
    Ok(params)
}

pub fn write(mem: &GuestMem, params: &boot_params) -> Result<GuestAddress, BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE))
        .map_err(|_| BootError::Write {
            what: "zero page",
            addr: ZERO_PAGE,
        })?;
    Ok(GuestAddress(ZERO_PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::e820;

    fn read<T: vm_memory::ByteValued>(mem: &GuestMem, offset: u64) -> T {
        mem.read_obj(GuestAddress(ZERO_PAGE + offset)).unwrap()
    }

    #[test]
    fn fields_land_at_their_boot_protocol_offsets() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 64 << 20)])
            .unwrap()
            .ram()
            .clone();
        let map = e820(64 << 20);
        let params = build(&ZeroPage {
            header: None,
            cmdline_len: 42,
            initrd: Some((0x300_0000, 0x1000)),
            e820: &map,
            rsdp: 0xe0000,
            screen: Some(DisplayGeometry {
                index: 0,
                gpu: 0,
                gpa: 0x1fe0_1000,
                width: 800,
                height: 600,
                stride: 3200,
            }),
        })
        .unwrap();
        write(&mem, &params).unwrap();
        // screen_info: a VESA linear framebuffer, XRGB8888.
        assert_eq!(read::<u8>(&mem, 0x0f), 0x23, "orig_video_isVGA");
        assert_eq!(read::<u16>(&mem, 0x12), 800, "lfb_width");
        assert_eq!(read::<u16>(&mem, 0x14), 600, "lfb_height");
        assert_eq!(read::<u16>(&mem, 0x16), 32, "lfb_depth");
        assert_eq!(read::<u32>(&mem, 0x18), 0x1fe0_1000, "lfb_base");
        assert_eq!(read::<u32>(&mem, 0x1c), 30, "lfb_size in 64 KiB");
        assert_eq!(read::<u16>(&mem, 0x24), 3200, "lfb_linelength");
        assert_eq!(read::<[u8; 2]>(&mem, 0x26), [8, 16], "red size, pos");
        assert_eq!(read::<u64>(&mem, 0x070), 0xe0000, "acpi_rsdp_addr");
        assert_eq!(
            read::<u8>(&mem, 0x1e8),
            4,
            "e820_entries: RAM, EBDA, RAM, ECAM"
        );
        assert_eq!(read::<u16>(&mem, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(read::<u32>(&mem, 0x202), HDR_MAGIC, "header");
        assert_eq!(read::<u8>(&mem, 0x210), 0xff, "type_of_loader");
        assert_eq!(read::<u8>(&mem, 0x211) & 1, 1, "loadflags: LOADED_HIGH");
        assert_eq!(read::<u32>(&mem, 0x218), 0x300_0000, "ramdisk_image");
        assert_eq!(read::<u32>(&mem, 0x21c), 0x1000, "ramdisk_size");
        assert_eq!(read::<u32>(&mem, 0x228), CMDLINE as u32, "cmd_line_ptr");
        assert_eq!(read::<u32>(&mem, 0x238), 42, "cmdline_size");
        // Third e820 entry: usable RAM from 1 MiB.
        assert_eq!(read::<u64>(&mem, 0x2d0 + 2 * 20), 0x10_0000);
        assert_eq!(
            read::<u64>(&mem, 0x2d0 + 2 * 20 + 8),
            (64 << 20) - 0x10_0000
        );
        assert_eq!(read::<u32>(&mem, 0x2d0 + 2 * 20 + 16), 1);
    }

    #[test]
    fn a_bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x020f,
            setup_sects: 30,
            ..Default::default()
        };
        let params = build(&ZeroPage {
            header: Some(hdr),
            cmdline_len: 1,
            initrd: None,
            e820: &e820(64 << 20),
            rsdp: 0,
            screen: None,
        })
        .unwrap();
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.setup_sects }, 30);
        assert_eq!(
            { params.hdr.kernel_alignment },
            0,
            "only ELF kernels get a default alignment"
        );
    }
}
