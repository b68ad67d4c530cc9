//! Displays of the emulated GPU: linear framebuffers in guest RAM.
//!
//! The VMM reserves a range at the top of low RAM (an e820 "reserved" entry, so no kernel
//! uses it as RAM) and lays it out as one [`DisplayTable`] page followed by each display's
//! pixels. It tells rayvisor's guest where the table is through
//! [`crate::Heartbeat::display_table`], and Linux about the first display through the zero
//! page's `screen_info` (a VESA linear framebuffer that efifb/vesafb/simplefb drive).
//!
//! Pixels are 32-bit little-endian XRGB8888 ([`FORMAT_XRGB8888`]): blue in byte 0, green
//! in byte 1, red in byte 2, byte 3 unused. Because the pixels live in guest RAM, a
//! snapshot or a live migration carries the picture with the rest of memory, and the guest
//! draws without a single exit.
//!
//! The `draw` test patterns are defined here ([`pattern_pixel`]) so that the guest that
//! draws them and the host-side tests that check a screenshot compute the same pixels.

/// [`DisplayTable::magic`] ("RAYDISP1", little-endian).
pub const DISPLAY_TABLE_MAGIC: u64 = u64::from_le_bytes(*b"RAYDISP1");

/// Most displays a VM has (all GPUs together).
pub const MAX_DISPLAYS: usize = 16;

/// The only pixel format: 32-bit XRGB8888, little-endian.
pub const FORMAT_XRGB8888: u32 = 1;

/// Bytes per pixel of [`FORMAT_XRGB8888`].
pub const BYTES_PER_PIXEL: u32 = 4;

/// One display's framebuffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DisplayEntry {
    /// Guest-physical address of the first pixel (page aligned).
    pub gpa: u64,
    pub width: u32,
    pub height: u32,
    /// Bytes from one line to the next.
    pub stride: u32,
    /// [`FORMAT_XRGB8888`].
    pub format: u32,
}

/// The page the VMM writes in front of the framebuffers. The guest only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DisplayTable {
    pub magic: u64,
    /// Valid entries in `displays`.
    pub count: u32,
    pub reserved: u32,
    pub displays: [DisplayEntry; MAX_DISPLAYS],
}

const _: () = assert!(core::mem::size_of::<DisplayTable>() <= 4096);

/// The `draw` command's test patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Eight vertical colour bars (white, yellow, cyan, green, magenta, red, blue, black).
    Bars,
    /// Red grows left to right, green top to bottom, blue is the seed's low byte.
    Gradient,
    /// 16x16-pixel squares, each a colour drawn from the seed and the square's position.
    Checker,
    /// Every pixel the seed's colour (`0xRRGGBB`).
    Fill,
}

impl Pattern {
    pub fn parse(name: &str) -> Option<Pattern> {
        match name {
            "bars" => Some(Pattern::Bars),
            "gradient" => Some(Pattern::Gradient),
            "checker" => Some(Pattern::Checker),
            "fill" => Some(Pattern::Fill),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Bars => "bars",
            Pattern::Gradient => "gradient",
            Pattern::Checker => "checker",
            Pattern::Fill => "fill",
        }
    }
}

const BARS: [u32; 8] = [
    0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
];

/// The XRGB value (`0x00RRGGBB`) of pixel (x, y) of `pattern` on a `width` x `height`
/// display.
pub fn pattern_pixel(pattern: Pattern, seed: u32, x: u32, y: u32, width: u32, height: u32) -> u32 {
    match pattern {
        Pattern::Bars => BARS[(x as u64 * 8 / u64::from(width.max(1))) as usize % 8],
        Pattern::Gradient => {
            let r = (x as u64 * 255 / u64::from(width.max(2) - 1)) as u32;
            let g = (y as u64 * 255 / u64::from(height.max(2) - 1)) as u32;
            (r << 16) | (g << 8) | (seed & 0xff)
        }
        Pattern::Checker => {
            let cell = (x / 16) ^ ((y / 16) << 12);
            // A multiplicative hash of seed and cell: different seeds give different boards.
            let h = (cell ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            (h ^ (h >> 13)) & 0x00ff_ffff
        }
        Pattern::Fill => seed & 0x00ff_ffff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_have_their_documented_colours() {
        assert_eq!(pattern_pixel(Pattern::Bars, 0, 0, 0, 640, 480), 0xffffff);
        assert_eq!(pattern_pixel(Pattern::Bars, 0, 639, 0, 640, 480), 0x000000);
        assert_eq!(pattern_pixel(Pattern::Bars, 0, 80, 7, 640, 480), 0xffff00);
        assert_eq!(
            pattern_pixel(Pattern::Gradient, 7, 639, 0, 640, 480),
            0xff0007
        );
        assert_eq!(
            pattern_pixel(Pattern::Gradient, 7, 0, 479, 640, 480),
            0x00ff07
        );
        assert_eq!(pattern_pixel(Pattern::Fill, 0x123456, 5, 5, 8, 8), 0x123456);
        let a = pattern_pixel(Pattern::Checker, 1, 0, 0, 64, 64);
        assert_eq!(a, pattern_pixel(Pattern::Checker, 1, 15, 15, 64, 64));
        assert_ne!(a, pattern_pixel(Pattern::Checker, 2, 0, 0, 64, 64));
        for p in ["bars", "gradient", "checker", "fill"] {
            assert_eq!(Pattern::parse(p).unwrap().name(), p);
        }
        assert_eq!(Pattern::parse("plaid"), None);
    }
}
