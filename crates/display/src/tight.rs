//! Tight rectangles (encoding 7), lossless: each changed area goes out in tiles of at most
//! [`TILE`] x [`TILE`] pixels, each a fill (one colour), a two-colour palette (1 bit a pixel),
//! an indexed palette (up to 256 colours, 1 byte a pixel) or the pixels themselves, the last
//! three through zlib. A viewer has four zlib streams that live as long as its connection;
//! this encoder uses stream 0 for pixels, 1 for two colours and 2 for indexed palettes, ends
//! each rectangle with a sync flush and never resets them. JPEG is not sent.
use flate2::{Compress, Compression, FlushCompress};

use crate::rfb::{rect_header, PixelFormat, Rect};

pub const ENCODING_TIGHT: i32 = 7;
/// The edge of the tiles a rectangle is cut into (well inside Tight's 2048-pixel width and
/// 65536-pixel area limits for basic compression).
pub const TILE: u16 = 64;
/// Data shorter than this is sent as is, without zlib or a length (the protocol's rule).
const MIN_TO_COMPRESS: usize = 12;
/// Compression-control values (the high nibble of the first byte).
const FILL: u8 = 0x80;
const EXPLICIT_FILTER: u8 = 0x40;
const FILTER_PALETTE: u8 = 1;
/// The streams used for each kind of data.
const STREAM_PIXELS: u8 = 0;
const STREAM_MONO: u8 = 1;
const STREAM_INDEXED: u8 = 2;
/// A palette above this many colours is not worth it: the pixels go as they are.
const MAX_PALETTE: usize = 256;

/// One viewer's Tight encoder: its zlib streams and scratch buffers.
pub struct Tight {
    zlib: [Compress; 3],
    pixels: Vec<u32>,
    data: Vec<u8>,
    palette: Vec<u32>,
}

impl Default for Tight {
    fn default() -> Self {
        Self {
            zlib: std::array::from_fn(|_| Compress::new(Compression::fast(), true)),
            pixels: Vec::new(),
            data: Vec::new(),
            palette: Vec::new(),
        }
    }
}

/// Whether pixels in `pf` go as 3 bytes (red, green, blue) rather than the whole pixel:
/// 32 bits a pixel, depth 24, 8 bits each colour.
fn tpixel_is_rgb(pf: PixelFormat) -> bool {
    pf.bits_per_pixel == 32
        && pf.depth == 24
        && pf.red_max == 255
        && pf.green_max == 255
        && pf.blue_max == 255
}

/// A pixel as Tight sends it (TPIXEL).
fn tpixel(pf: PixelFormat, xrgb: u32, out: &mut Vec<u8>) {
    if tpixel_is_rgb(pf) {
        out.extend_from_slice(&[(xrgb >> 16) as u8, (xrgb >> 8) as u8, xrgb as u8]);
    } else {
        pf.put(xrgb, out);
    }
}

/// A length in Tight's compact form: 7 bits a byte, low first, up to three bytes.
fn compact_length(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x4000 {
        out.extend_from_slice(&[(n as u8 & 0x7f) | 0x80, (n >> 7) as u8]);
    } else {
        out.extend_from_slice(&[
            (n as u8 & 0x7f) | 0x80,
            ((n >> 7) as u8) | 0x80,
            (n >> 14) as u8,
        ]);
    }
}

/// `data` compressed through `z` with a sync flush, appended to `out`.
fn deflate(z: &mut Compress, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + data.len() / 100 + 64);
    let mut input = data;
    loop {
        let before = z.total_in();
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity());
        }
        // Compressing into a Vec with room cannot fail; a stream error would be a bug.
        if z.compress_vec(input, out, FlushCompress::Sync).is_err() {
            break;
        }
        input = &input[(z.total_in() - before) as usize..];
        if input.is_empty() && out.capacity() - out.len() >= 64 {
            break;
        }
    }
}

impl Tight {
    /// Tight rectangles covering `r` of `frame` (native pixels, `stride` bytes a line) in
    /// format `pf`; returns how many.
    pub fn rects(
        &mut self,
        frame: &[u8],
        stride: usize,
        r: Rect,
        pf: PixelFormat,
        out: &mut Vec<u8>,
    ) -> u16 {
        let mut n = 0;
        let mut ty = r.y;
        while ty < r.y + r.h {
            let th = TILE.min(r.y + r.h - ty);
            let mut tx = r.x;
            while tx < r.x + r.w {
                let tw = TILE.min(r.x + r.w - tx);
                self.tile(
                    frame,
                    stride,
                    Rect {
                        x: tx,
                        y: ty,
                        w: tw,
                        h: th,
                    },
                    pf,
                    out,
                );
                n += 1;
                tx += tw;
            }
            ty += th;
        }
        n
    }

    /// How many rectangles [`Tight::rects`] makes of `r`.
    pub fn count(r: Rect) -> u16 {
        r.w.div_ceil(TILE) * r.h.div_ceil(TILE)
    }

    fn tile(&mut self, frame: &[u8], stride: usize, r: Rect, pf: PixelFormat, out: &mut Vec<u8>) {
        rect_header(r, ENCODING_TIGHT, out);
        self.pixels.clear();
        for y in r.y..r.y + r.h {
            let a = usize::from(y) * stride + usize::from(r.x) * 4;
            self.pixels.extend(
                frame[a..a + usize::from(r.w) * 4]
                    .chunks_exact(4)
                    .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) & 0xff_ffff),
            );
        }
        // The palette, unless there are too many colours for one.
        self.palette.clear();
        for &p in &self.pixels {
            if !self.palette.contains(&p) {
                if self.palette.len() == MAX_PALETTE {
                    self.palette.clear();
                    break;
                }
                self.palette.push(p);
            }
        }
        self.data.clear();
        let stream = match self.palette.len() {
            1 => {
                out.push(FILL);
                tpixel(pf, self.palette[0], out);
                return;
            }
            0 => {
                out.push(STREAM_PIXELS << 4);
                for &p in &self.pixels {
                    tpixel(pf, p, &mut self.data);
                }
                STREAM_PIXELS
            }
            colours => {
                let stream = if colours == 2 {
                    STREAM_MONO
                } else {
                    STREAM_INDEXED
                };
                out.extend_from_slice(&[
                    (stream << 4) | EXPLICIT_FILTER,
                    FILTER_PALETTE,
                    (colours - 1) as u8,
                ]);
                for &c in &self.palette {
                    tpixel(pf, c, out);
                }
                let index = |p: u32| self.palette.iter().position(|&c| c == p).unwrap_or(0) as u8;
                if colours == 2 {
                    // One bit a pixel, most significant first, each line padded to a byte.
                    for line in self.pixels.chunks_exact(usize::from(r.w)) {
                        for bits in line.chunks(8) {
                            let mut b = 0u8;
                            for (i, &p) in bits.iter().enumerate() {
                                b |= index(p) << (7 - i);
                            }
                            self.data.push(b);
                        }
                    }
                } else {
                    // A small cache: most neighbours share their colour.
                    let mut last = (u32::MAX, 0u8);
                    for &p in &self.pixels {
                        if p != last.0 {
                            last = (p, index(p));
                        }
                        self.data.push(last.1);
                    }
                }
                stream
            }
        };
        if self.data.len() < MIN_TO_COMPRESS {
            out.extend_from_slice(&self.data);
            return;
        }
        let mut z = Vec::new();
        deflate(&mut self.zlib[usize::from(stream)], &self.data, &mut z);
        compact_length(z.len(), out);
        out.extend_from_slice(&z);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// A Tight decoder for 3-byte TPIXELs, the inverse of the above: decodes `n`
    /// rectangles from `data` into `frame` (`w` pixels a line) through `zlib`.
    fn decode(data: &[u8], n: u16, frame: &mut [u32], w: usize, zlib: &mut [Decompress; 4]) {
        let mut i = 0;
        let mut take = |k: usize| {
            let s = &data[i..i + k];
            i += k;
            s.to_vec()
        };
        for _ in 0..n {
            let h = take(12);
            let f = |j: usize| usize::from(u16::from_be_bytes([h[j], h[j + 1]]));
            let (x, y, rw, rh) = (f(0), f(2), f(4), f(6));
            assert_eq!(
                i32::from_be_bytes(h[8..12].try_into().unwrap()),
                ENCODING_TIGHT
            );
            let ctl = take(1)[0];
            assert_eq!(ctl & 0x0f, 0, "no stream is reset");
            let rgb = |b: &[u8]| u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            let mut put = |k: usize, p: u32| frame[(y + k / rw) * w + x + k % rw] = p;
            if ctl == FILL {
                let p = rgb(&take(3));
                (0..rw * rh).for_each(|k| put(k, p));
                continue;
            }
            let stream = usize::from((ctl >> 4) & 3);
            let palette: Vec<u32> = if ctl & EXPLICIT_FILTER != 0 {
                assert_eq!(take(1)[0], FILTER_PALETTE);
                let colours = usize::from(take(1)[0]) + 1;
                (0..colours).map(|_| rgb(&take(3))).collect()
            } else {
                Vec::new()
            };
            let raw_len = match palette.len() {
                0 => rw * rh * 3,
                2 => rw.div_ceil(8) * rh,
                _ => rw * rh,
            };
            let plain = if raw_len < MIN_TO_COMPRESS {
                take(raw_len)
            } else {
                let mut len = 0;
                for k in 0..3 {
                    let b = take(1)[0];
                    len |= usize::from(b & 0x7f) << (7 * k);
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                let z = take(len);
                let mut plain = Vec::with_capacity(raw_len + 64);
                zlib[stream]
                    .decompress_vec(&z, &mut plain, FlushDecompress::Sync)
                    .unwrap();
                plain
            };
            assert_eq!(plain.len(), raw_len);
            match palette.len() {
                0 => (0..rw * rh).for_each(|k| put(k, rgb(&plain[k * 3..]))),
                2 => (0..rw * rh).for_each(|k| {
                    let (row, col) = (k / rw, k % rw);
                    let bit = plain[row * rw.div_ceil(8) + col / 8] >> (7 - col % 8) & 1;
                    put(k, palette[usize::from(bit)]);
                }),
                _ => (0..rw * rh).for_each(|k| put(k, palette[usize::from(plain[k])])),
            }
        }
        assert_eq!(i, data.len(), "every byte decoded");
    }

    #[test]
    fn every_kind_of_tile_decodes_to_the_frame_through_the_streams() {
        let (w, h) = (150usize, 140usize);
        // Gradient (many colours) on the left, a few colours, two colours, one colour.
        let px = |x: usize, y: usize| -> u32 {
            match x {
                0..64 => (x as u32) << 16 | (y as u32) << 8 | 7,
                64..128 => [0x112233, 0x445566, 0x778899, 0xaabbcc][(x / 3 + y / 5) % 4],
                128..140 => [0xff0000, 0x00ff00][(x + y) % 2],
                _ => 0x123456,
            }
        };
        let mut frame = vec![0u8; w * h * 4];
        for y in 0..h {
            for x in 0..w {
                frame[(y * w + x) * 4..][..4]
                    .copy_from_slice(&(px(x, y) | 0xff00_0000).to_le_bytes());
            }
        }
        let mut t = Tight::default();
        let mut zlib = std::array::from_fn(|_| Decompress::new(true));
        let mut got = vec![0u32; w * h];
        // Twice through the same streams (they are never reset), then a small piece.
        for r in [
            Rect {
                x: 0,
                y: 0,
                w: 150,
                h: 140,
            },
            Rect {
                x: 0,
                y: 0,
                w: 150,
                h: 140,
            },
            Rect {
                x: 60,
                y: 70,
                w: 5,
                h: 1,
            },
        ] {
            let mut out = Vec::new();
            let n = t.rects(&frame, w * 4, r, PixelFormat::NATIVE, &mut out);
            assert_eq!(n, Tight::count(r));
            got.fill(0);
            decode(&out, n, &mut got, w, &mut zlib);
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let (x, y) = (usize::from(x), usize::from(y));
                    assert_eq!(got[y * w + x], px(x, y), "pixel ({x}, {y})");
                }
            }
        }
        // Far smaller than Raw for the whole frame.
        let mut out = Vec::new();
        let all = Rect {
            x: 0,
            y: 0,
            w: 150,
            h: 140,
        };
        t.rects(&frame, w * 4, all, PixelFormat::NATIVE, &mut out);
        assert!(out.len() < w * h * 4 / 4, "{} bytes", out.len());
    }

    #[test]
    fn compact_lengths_and_other_pixel_formats() {
        for (n, want) in [
            (5usize, vec![5u8]),
            (0x80, vec![0x80, 0x01]),
            (10000, vec![0x90, 0x4e]),
            (100000, vec![0xa0, 0x8d, 0x06]),
        ] {
            let mut out = Vec::new();
            compact_length(n, &mut out);
            assert_eq!(out, want, "{n}");
        }
        // A 16-bit viewer gets whole pixels in its format: a fill of red is 0xf800.
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: false,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        let frame = [0, 0, 0xff, 0].repeat(4);
        let mut out = Vec::new();
        let r = Rect {
            x: 0,
            y: 0,
            w: 2,
            h: 2,
        };
        assert_eq!(Tight::default().rects(&frame, 8, r, rgb565, &mut out), 1);
        assert_eq!(&out[12..], &[FILL, 0x00, 0xf8]);
    }
}
