//! The virtio-gpu wire format (virtio 1.2 §5.7.6): command and response codes, pixel
//! formats, and the little-endian structures the 2D command set reads and writes. Nothing
//! here is trusted: every field is read out of a byte buffer the guest filled.

pub const DEVICE_TYPE_GPU: u16 = 16;

/// The device can give an EDID block per scanout (GET_EDID).
pub const F_EDID: u64 = 1 << 1;

/// The host changed a display: the driver re-reads the display information.
pub const EVENT_DISPLAY: u32 = 1;

/// Most scanouts the protocol describes (GET_DISPLAY_INFO always answers this many).
pub const MAX_SCANOUTS: usize = 16;

pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// The response carries the request's fence: we answer only once the command is done.
pub const FLAG_FENCE: u32 = 1;

/// Bytes of the header every command and response starts with.
pub const HDR_LEN: usize = 24;
/// Bytes of one backing entry after RESOURCE_ATTACH_BACKING's fixed part.
pub const MEM_ENTRY_LEN: usize = 16;
/// Bytes of the EDID data field of a GET_EDID response.
pub const EDID_FIELD: usize = 1024;

/// The 2D pixel formats (all 4 bytes a pixel), named by their bytes in memory order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Format {
    B8G8R8A8 = 1,
    B8G8R8X8 = 2,
    A8R8G8B8 = 3,
    X8R8G8B8 = 4,
    R8G8B8A8 = 67,
    X8B8G8R8 = 68,
    A8B8G8R8 = 121,
    R8G8B8X8 = 134,
}

pub const BYTES_PER_PIXEL: u32 = 4;

impl Format {
    pub fn from_wire(v: u32) -> Option<Format> {
        use Format::*;
        [
            B8G8R8A8, B8G8R8X8, A8R8G8B8, X8R8G8B8, R8G8B8A8, X8B8G8R8, A8B8G8R8, R8G8B8X8,
        ]
        .into_iter()
        .find(|f| *f as u32 == v)
    }

    /// Where red, green and blue sit among a pixel's 4 bytes.
    fn rgb(self) -> [usize; 3] {
        use Format::*;
        match self {
            B8G8R8A8 | B8G8R8X8 => [2, 1, 0],
            A8R8G8B8 | X8R8G8B8 => [1, 2, 3],
            R8G8B8A8 | R8G8B8X8 => [0, 1, 2],
            A8B8G8R8 | X8B8G8R8 => [3, 2, 1],
        }
    }

    /// Converts pixels of this format into the displays' XRGB8888 (bytes B, G, R, X; X
    /// is 0, or the alpha byte where the format is the displays' own and copied as is).
    pub fn to_xrgb(self, src: &[u8], dst: &mut [u8]) {
        if matches!(self, Format::B8G8R8X8 | Format::B8G8R8A8) {
            dst.copy_from_slice(src);
            return;
        }
        let [r, g, b] = self.rgb();
        for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)) {
            d.copy_from_slice(&[s[b], s[g], s[r], 0]);
        }
    }
}

/// A rectangle in a resource's or a scanout's pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Whether the rectangle lies inside `width` x `height` (no overflow on the way).
    pub fn inside(&self, width: u32, height: u32) -> bool {
        self.x.checked_add(self.width).is_some_and(|e| e <= width)
            && self.y.checked_add(self.height).is_some_and(|e| e <= height)
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The overlap of two rectangles (empty if none).
    pub fn intersect(&self, o: &Rect) -> Rect {
        let x = self.x.max(o.x);
        let y = self.y.max(o.y);
        let right =
            (u64::from(self.x) + u64::from(self.width)).min(u64::from(o.x) + u64::from(o.width));
        let bottom =
            (u64::from(self.y) + u64::from(self.height)).min(u64::from(o.y) + u64::from(o.height));
        Rect {
            x,
            y,
            width: right.saturating_sub(u64::from(x)) as u32,
            height: bottom.saturating_sub(u64::from(y)) as u32,
        }
    }
}

/// Reads little-endian fields of a request one after the other.
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    pub fn u32(&mut self) -> Option<u32> {
        let b = self.buf.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let b = self.buf.get(self.at..self.at + 8)?;
        self.at += 8;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    pub fn rect(&mut self) -> Option<Rect> {
        Some(Rect {
            x: self.u32()?,
            y: self.u32()?,
            width: self.u32()?,
            height: self.u32()?,
        })
    }
}

/// The header of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub flags: u32,
    pub fence: u64,
    pub ctx: u32,
    pub ring: u8,
}

impl Header {
    pub fn parse(buf: &[u8]) -> Option<Header> {
        let mut r = Reader::new(buf);
        let kind = r.u32()?;
        let flags = r.u32()?;
        let fence = r.u64()?;
        let ctx = r.u32()?;
        let ring = *buf.get(20)?;
        Some(Header {
            kind,
            flags,
            fence,
            ctx,
            ring,
        })
    }

    /// The header of the response to this command, of type `kind`.
    pub fn response(&self, kind: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HDR_LEN);
        out.extend_from_slice(&kind.to_le_bytes());
        let fenced = self.flags & FLAG_FENCE;
        out.extend_from_slice(&fenced.to_le_bytes());
        out.extend_from_slice(&(if fenced != 0 { self.fence } else { 0 }).to_le_bytes());
        out.extend_from_slice(&self.ctx.to_le_bytes());
        out.extend_from_slice(&[self.ring, 0, 0, 0]);
        out
    }
}

/// A 128-byte EDID 1.4 block naming one preferred mode, `width` x `height` at 60 Hz, in its
/// first detailed timing descriptor, and the monitor name "rayvisor".
pub fn edid(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    // Manufacturer "RAY" (three 5-bit letters, big-endian), product 1, serial 1.
    let id =
        (u16::from(b'R' - b'@') << 10) | (u16::from(b'A' - b'@') << 5) | u16::from(b'Y' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10] = 1;
    e[12] = 1;
    e[16] = 1; // week 1
    e[17] = 36; // 2026
    e[18] = 1;
    e[19] = 4; // EDID 1.4
    e[20] = 0xa5; // digital, 8 bits a colour, DisplayPort
    e[21] = (width / 100).min(255) as u8; // "size" in cm: about 100 dpi... near enough
    e[22] = (height / 100).min(255) as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, preferred timing is native
                  // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; standard timings unused.
    for i in 0..8 {
        e[38 + 2 * i] = 1;
        e[39 + 2 * i] = 1;
    }
    // Detailed timing: simple blanking (160 px, 30 lines) at 60 Hz.
    let (hb, vb) = (160u32, 30u32);
    let clock = (u64::from(width + hb) * u64::from(height + vb) * 60 / 10_000) as u16;
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = width as u8;
    d[3] = hb as u8;
    d[4] = (((width >> 8) & 0xf) << 4 | ((hb >> 8) & 0xf)) as u8;
    d[5] = height as u8;
    d[6] = vb as u8;
    d[7] = (((height >> 8) & 0xf) << 4 | ((vb >> 8) & 0xf)) as u8;
    d[8] = 48; // front porch
    d[9] = 32; // sync width
    d[10] = (3 << 4) | 5; // vertical front porch 3, sync 5
    d[17] = 0x1e; // digital separate sync, both positive
                  // Monitor name descriptor.
    let n = &mut e[72..90];
    n[3] = 0xfc;
    n[5..18].copy_from_slice(b"rayvisor\n    ");
    // Two dummy descriptors.
    e[93] = 0x10;
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |s, b| s.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_convert_to_xrgb() {
        let px = [1u8, 2, 3, 4];
        let mut out = [9u8; 4];
        // B G R X, the displays' own format: copied.
        Format::B8G8R8X8.to_xrgb(&px, &mut out);
        assert_eq!(out, px);
        // X R G B: R=2 G=3 B=4.
        Format::X8R8G8B8.to_xrgb(&px, &mut out);
        assert_eq!(out, [4, 3, 2, 0]);
        // R G B X.
        Format::R8G8B8X8.to_xrgb(&px, &mut out);
        assert_eq!(out, [3, 2, 1, 0]);
        // A B G R: R=4 G=3 B=2.
        Format::A8B8G8R8.to_xrgb(&px, &mut out);
        assert_eq!(out, [2, 3, 4, 0]);
        assert_eq!(Format::from_wire(134), Some(Format::R8G8B8X8));
        assert_eq!(Format::from_wire(5), None);
    }

    #[test]
    fn rectangles_check_bounds_without_overflow() {
        let r = Rect {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1,
        };
        assert!(!r.inside(100, 100));
        let a = Rect {
            x: 10,
            y: 10,
            width: 20,
            height: 20,
        };
        let b = Rect {
            x: 25,
            y: 0,
            width: 100,
            height: 15,
        };
        assert_eq!(
            a.intersect(&b),
            Rect {
                x: 25,
                y: 10,
                width: 5,
                height: 5
            }
        );
        assert!(a.intersect(&Rect::default()).is_empty());
    }

    #[test]
    fn the_edid_block_is_valid_and_names_the_mode() {
        let e = edid(1920, 1080);
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let d = &e[54..72];
        assert_eq!(u32::from(d[2]) | u32::from(d[4] >> 4) << 8, 1920);
        assert_eq!(u32::from(d[5]) | u32::from(d[7] >> 4) << 8, 1080);
    }
}
