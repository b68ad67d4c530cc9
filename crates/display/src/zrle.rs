//! ZRLE rectangles (RFC 6143 §7.7.6): 64x64 tiles, each solid, palette-RLE, plain RLE or
//! raw, whichever is smallest of those tried, all through one zlib stream per viewer (RFB
//! requires the stream to live as long as the connection: each rectangle ends with a sync
//! flush, never a reset).
use flate2::{Compress, Compression, FlushCompress};

use crate::rfb::{rect_header, PixelFormat, Rect};

pub const ENCODING_ZRLE: i32 = 16;
const TILE: u16 = 64;
/// Palette-RLE takes up to this many colours (the subencoding byte is 128 + size).
const MAX_RLE_PALETTE: usize = 127;

/// One viewer's ZRLE encoder: its zlib stream and scratch buffers.
pub struct Zrle {
    zlib: Compress,
    tiles: Vec<u8>,
    pixels: Vec<u32>,
}

impl Default for Zrle {
    fn default() -> Self {
        Self {
            zlib: Compress::new(Compression::fast(), true),
            tiles: Vec::new(),
            pixels: Vec::new(),
        }
    }
}

/// How a pixel is written in ZRLE: the 3 bytes holding the colour when a 32-bit format
/// leaves one byte unused (CPIXEL), else the whole pixel.
fn cpixel(pf: PixelFormat, xrgb: u32, out: &mut Vec<u8>) {
    let start = out.len();
    pf.put(xrgb, out);
    if pf.bits_per_pixel != 32 || pf.depth > 24 {
        return;
    }
    let top = |max: u16, shift: u8| u32::from(shift) + (16 - max.leading_zeros());
    let fits_low = [
        (pf.red_max, pf.red_shift),
        (pf.green_max, pf.green_shift),
        (pf.blue_max, pf.blue_shift),
    ]
    .iter()
    .all(|&(m, s)| top(m, s) <= 24);
    // The least significant 3 bytes: the first three of a little-endian pixel, the last
    // three of a big-endian one; the most significant 3 bytes the other way round.
    let drop_first = fits_low == pf.big_endian;
    if drop_first {
        out.remove(start);
    } else {
        out.truncate(start + 3);
    }
}

fn run_length(mut n: usize, out: &mut Vec<u8>) {
    n -= 1;
    while n >= 255 {
        out.push(255);
        n -= 255;
    }
    out.push(n as u8);
}

/// Runs of equal pixels: (pixel, length).
fn runs(px: &[u32]) -> impl Iterator<Item = (u32, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let p = *px.get(i)?;
        let n = px[i..].iter().take_while(|&&q| q == p).count();
        i += n;
        Some((p, n))
    })
}

/// One tile of pixels (row by row) into `out`.
fn tile(px: &[u32], pf: PixelFormat, out: &mut Vec<u8>) {
    let mut palette: Vec<u32> = Vec::new();
    for &p in px {
        if !palette.contains(&p) {
            if palette.len() == MAX_RLE_PALETTE {
                palette.clear();
                break;
            }
            palette.push(p);
        }
    }
    if palette.len() == 1 {
        out.push(1);
        cpixel(pf, palette[0], out);
        return;
    }
    let start = out.len();
    if !palette.is_empty() {
        out.push(128 + palette.len() as u8);
        for &p in &palette {
            cpixel(pf, p, out);
        }
        for (p, n) in runs(px) {
            let index = palette.iter().position(|&q| q == p).unwrap_or(0) as u8;
            if n == 1 {
                out.push(index);
            } else {
                out.push(index | 128);
                run_length(n, out);
            }
        }
    } else {
        out.push(128);
        for (p, n) in runs(px) {
            cpixel(pf, p, out);
            run_length(n, out);
        }
    }
    // Raw when RLE does not pay.
    let mut raw = vec![0];
    for &p in px {
        cpixel(pf, p, &mut raw);
    }
    if raw.len() < out.len() - start {
        out.truncate(start);
        out.extend_from_slice(&raw);
    }
}

impl Zrle {
    /// A ZRLE rectangle of `frame` (native pixels, `stride` bytes a line) in format `pf`.
    pub fn rect(
        &mut self,
        frame: &[u8],
        stride: usize,
        r: Rect,
        pf: PixelFormat,
        out: &mut Vec<u8>,
    ) {
        rect_header(r, ENCODING_ZRLE, out);
        self.tiles.clear();
        let mut ty = r.y;
        while ty < r.y + r.h {
            let th = TILE.min(r.y + r.h - ty);
            let mut tx = r.x;
            while tx < r.x + r.w {
                let tw = TILE.min(r.x + r.w - tx);
                self.pixels.clear();
                for y in ty..ty + th {
                    let a = usize::from(y) * stride + usize::from(tx) * 4;
                    let line = &frame[a..a + usize::from(tw) * 4];
                    self.pixels.extend(
                        line.chunks_exact(4)
                            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) & 0xff_ffff),
                    );
                }
                tile(&self.pixels, pf, &mut self.tiles);
                tx += tw;
            }
            ty += th;
        }
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        // Deflate output is at most a little larger than its input.
        out.reserve(self.tiles.len() + self.tiles.len() / 100 + 64);
        let mut input = &self.tiles[..];
        loop {
            let before = self.zlib.total_in();
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity());
            }
            // Compressing into a Vec with room cannot fail; a stream error would be a bug.
            if self
                .zlib
                .compress_vec(input, out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            input = &input[(self.zlib.total_in() - before) as usize..];
            // Done once all input is in and the flush fitted (room is left over).
            if input.is_empty() && out.capacity() - out.len() >= 64 {
                break;
            }
        }
        let len = (out.len() - body) as u32;
        out[len_at..body].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// A ZRLE decoder for the native format (3-byte CPIXELs), the inverse of the above.
    fn decode(data: &[u8], w: usize, h: usize) -> Vec<u32> {
        let mut i = 0;
        let mut next = || {
            let b = data[i];
            i += 1;
            b
        };
        let mut img = vec![0u32; w * h];
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = ((w - tx).min(64), (h - ty).min(64));
                let mut px = Vec::with_capacity(tw * th);
                let cp =
                    |next: &mut dyn FnMut() -> u8| u32::from_le_bytes([next(), next(), next(), 0]);
                let len = |next: &mut dyn FnMut() -> u8| {
                    let mut n = 1;
                    loop {
                        let b = next();
                        n += usize::from(b);
                        if b != 255 {
                            return n;
                        }
                    }
                };
                match next() {
                    0 => (0..tw * th).for_each(|_| px.push(cp(&mut next))),
                    1 => px.resize(tw * th, cp(&mut next)),
                    128 => {
                        while px.len() < tw * th {
                            let p = cp(&mut next);
                            let n = len(&mut next);
                            px.extend(std::iter::repeat_n(p, n));
                        }
                    }
                    s @ 130..=255 => {
                        let pal: Vec<u32> = (0..s - 128).map(|_| cp(&mut next)).collect();
                        while px.len() < tw * th {
                            let b = next();
                            let n = if b & 128 != 0 { len(&mut next) } else { 1 };
                            px.extend(std::iter::repeat_n(pal[usize::from(b & 127)], n));
                        }
                    }
                    s => panic!("subencoding {s}"),
                }
                for (k, p) in px.into_iter().enumerate() {
                    img[(ty + k / tw) * w + tx + k % tw] = p;
                }
            }
        }
        assert_eq!(i, data.len(), "trailing bytes");
        img
    }

    #[test]
    fn rectangles_decode_to_the_frame_through_one_stream() {
        let (w, h) = (150usize, 70usize);
        let stride = w * 4;
        // Solid, few-colour, many-colour and noisy regions.
        let mut frame = vec![0u8; stride * h];
        for y in 0..h {
            for x in 0..w {
                let p: u32 = match x {
                    0..64 => 0x123456,
                    64..100 => [0xff0000, 0x00ff00, 0x0000ff][(x + y) % 3],
                    100..140 => ((x * 7 + y * 13) as u32).wrapping_mul(2654435761) & 0xff_ffff,
                    _ => (x * 1000 + y) as u32,
                };
                frame[y * stride + x * 4..][..4].copy_from_slice(&p.to_le_bytes());
            }
        }
        let mut z = Zrle::default();
        let mut inflate = Decompress::new(true);
        let all = Rect {
            x: 0,
            y: 0,
            w: w as u16,
            h: h as u16,
        };
        for round in 0..2 {
            let mut out = Vec::new();
            z.rect(&frame, stride, all, PixelFormat::NATIVE, &mut out);
            assert_eq!(&out[8..12], &ENCODING_ZRLE.to_be_bytes());
            let len = u32::from_be_bytes(out[12..16].try_into().unwrap()) as usize;
            assert_eq!(out.len(), 16 + len);
            let mut plain = Vec::with_capacity(1 << 20);
            inflate
                .decompress_vec(&out[16..], &mut plain, FlushDecompress::Sync)
                .unwrap();
            let img = decode(&plain, w, h);
            for y in 0..h {
                for x in 0..w {
                    let want =
                        u32::from_le_bytes(frame[y * stride + x * 4..][..4].try_into().unwrap());
                    assert_eq!(img[y * w + x], want, "round {round} pixel ({x}, {y})");
                }
            }
            if round == 0 {
                assert!(len < w * h * 4 / 2, "ZRLE took {len} bytes");
            }
        }
    }

    #[test]
    fn cpixels_are_three_bytes_where_a_byte_is_spare() {
        let mut out = Vec::new();
        cpixel(PixelFormat::NATIVE, 0x112233, &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11]);
        let mut be = PixelFormat::NATIVE;
        be.big_endian = true;
        out.clear();
        cpixel(be, 0x112233, &mut out);
        assert_eq!(out, [0x11, 0x22, 0x33]);
        let mut high = PixelFormat::NATIVE;
        (high.red_shift, high.green_shift, high.blue_shift) = (24, 16, 8);
        out.clear();
        cpixel(high, 0x112233, &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11]);
    }
}
