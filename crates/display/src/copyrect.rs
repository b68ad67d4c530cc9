//! CopyRect (RFC 6143 §7.7.2) for scrolled content: a hash of every line of what a viewer
//! has and of the display now; the vertical shift most changed lines agree on; then bands of
//! whole lines that equal (byte for byte) the viewer's lines shifted by it. Each band is sent
//! as a CopyRect from the viewer's own framebuffer, and the server's model of that
//! framebuffer applies the same copies, so it stays exact.
use std::collections::HashMap;

use crate::rfb::{rect_header, Rect, ENCODING_COPYRECT};

/// A band shorter than this many lines is not worth a CopyRect (the tile compare sends it).
pub const MIN_BAND: u16 = 8;
/// A line whose hash this many lines of the old frame share (a plain background) votes for
/// no shift: it would match anywhere.
const MAX_SAME_LINES: usize = 4;
/// The lines a window hash covers.
const WINDOW: usize = 32;

/// One copy: lines `y .. y + h` of the display take the viewer's lines `src_y ..` (whole
/// width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Band {
    pub y: u16,
    pub h: u16,
    pub src_y: u16,
}

fn line_hash(line: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = line.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h.rotate_left(5) ^ v).wrapping_mul(0x5170_c1b7_2722_0a95);
    }
    for &b in words.remainder() {
        h = (h.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x5170_c1b7_2722_0a95);
    }
    h
}

/// The bands of `cur` that are `prev` scrolled vertically (`width` pixels a line, `stride`
/// bytes apart, `height` lines), in the order they must be applied; empty if nothing
/// scrolled by at least [`MIN_BAND`] lines.
pub fn find_scroll(prev: &[u8], cur: &[u8], stride: usize, width: u16, height: u16) -> Vec<Band> {
    let bytes = usize::from(width) * 4;
    fn at(f: &[u8], stride: usize, bytes: usize, y: u16) -> &[u8] {
        let a = usize::from(y) * stride;
        &f[a..a + bytes]
    }
    let changed: Vec<u16> = (0..height)
        .filter(|&y| at(prev, stride, bytes, y) != at(cur, stride, bytes, y))
        .collect();
    if changed.len() < usize::from(MIN_BAND) {
        return Vec::new();
    }
    // Lines vote by their own hash where few old lines share it, else by the hash of the
    // window of lines they start (a board of 16-line squares repeats each line 16 times,
    // but no 32-line window); plain areas repeat either way and do not vote.
    let hashes = |f: &[u8]| -> Vec<u64> {
        (0..height)
            .map(|y| line_hash(at(f, stride, bytes, y)))
            .collect()
    };
    let windows = |h: &[u64]| -> Vec<u64> {
        (0..h.len())
            .map(|y| {
                h[y..(y + WINDOW).min(h.len())]
                    .iter()
                    .fold(0u64, |acc, &v| {
                        (acc.rotate_left(7) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    })
            })
            .collect()
    };
    let (old_lines, new_lines) = (hashes(prev), hashes(cur));
    let (old_windows, new_windows) = (windows(&old_lines), windows(&new_lines));
    let index = |h: &[u64]| {
        let mut m: HashMap<u64, Vec<u16>> = HashMap::with_capacity(h.len());
        for (y, &v) in h.iter().enumerate() {
            m.entry(v).or_default().push(y as u16);
        }
        m
    };
    let (by_line, by_window) = (index(&old_lines), index(&old_windows));
    let mut votes: HashMap<i32, u32> = HashMap::new();
    for &y in &changed {
        let i = usize::from(y);
        let from_line = by_line
            .get(&new_lines[i])
            .filter(|s| s.len() <= MAX_SAME_LINES);
        let from = from_line.or_else(|| {
            by_window
                .get(&new_windows[i])
                .filter(|s| s.len() <= MAX_SAME_LINES)
        });
        for &s in from.into_iter().flatten() {
            *votes.entry(i32::from(s) - i32::from(y)).or_default() += 1;
        }
    }
    // The most votes; ties go to the smaller shift (deterministic).
    let Some((dy, n)) = votes
        .into_iter()
        .max_by_key(|&(dy, n)| (n, std::cmp::Reverse(dy.unsigned_abs())))
    else {
        return Vec::new();
    };
    if n < u32::from(MIN_BAND) {
        return Vec::new();
    }
    // Runs of lines y where cur[y] == prev[y + dy] exactly, holding at least one changed line.
    let mut bands = Vec::new();
    let mut run: Option<(u16, bool)> = None;
    let lo = (-dy).max(0) as u16;
    let hi = (i32::from(height) - dy.max(0)) as u16;
    for y in lo..=hi {
        let same = y < hi
            && at(cur, stride, bytes, y) == at(prev, stride, bytes, (i32::from(y) + dy) as u16);
        match (&mut run, same) {
            (Some((_, c)), true) => *c |= at(prev, stride, bytes, y) != at(cur, stride, bytes, y),
            (None, true) => {
                run = Some((y, at(prev, stride, bytes, y) != at(cur, stride, bytes, y)))
            }
            (Some((start, c)), false) => {
                if *c && y - *start >= MIN_BAND {
                    bands.push(Band {
                        y: *start,
                        h: y - *start,
                        src_y: (i32::from(*start) + dy) as u16,
                    });
                }
                run = None;
            }
            (None, false) => {}
        }
    }
    // Moving up (dy > 0) reads below what it writes: top band first; moving down the other
    // way round, so no band reads lines an earlier one overwrote.
    if dy < 0 {
        bands.reverse();
    }
    bands
}

/// Applies `b` to a frame (what the viewer does on receiving it).
pub fn apply(frame: &mut [u8], stride: usize, width: u16, b: Band) {
    let bytes = usize::from(width) * 4;
    let (src, dst) = (usize::from(b.src_y) * stride, usize::from(b.y) * stride);
    let len = (usize::from(b.h) - 1) * stride + bytes;
    frame.copy_within(src..src + len, dst);
}

/// A CopyRect rectangle for `b` on a `width`-pixel display.
pub fn put(b: Band, width: u16, out: &mut Vec<u8>) {
    rect_header(
        Rect {
            x: 0,
            y: b.y,
            w: width,
            h: b.h,
        },
        ENCODING_COPYRECT,
        out,
    );
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&b.src_y.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w` x `h` frame whose line y is drawn from `f(y)` (distinct lines).
    fn frame(w: u16, h: u16, stride: usize, f: impl Fn(u16) -> u32) -> Vec<u8> {
        let mut v = vec![0xaa; stride * usize::from(h)];
        for y in 0..h {
            for x in 0..w {
                let a = usize::from(y) * stride + usize::from(x) * 4;
                let px = f(y).wrapping_mul(2654435761).wrapping_add(u32::from(x) * 7);
                v[a..a + 4].copy_from_slice(&px.to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn a_whole_screen_scroll_is_one_band_and_applying_it_gives_the_new_frame() {
        let (w, h, stride) = (40u16, 100u16, 40 * 4 + 16);
        let prev = frame(w, h, stride, u32::from);
        // Scrolled up by 13 lines; 13 new lines at the bottom.
        let cur = frame(w, h, stride, |y| u32::from(y) + 13);
        let bands = find_scroll(&prev, &cur, stride, w, h);
        assert_eq!(
            bands,
            vec![Band {
                y: 0,
                h: 87,
                src_y: 13
            }]
        );
        let mut model = prev.clone();
        apply(&mut model, stride, w, bands[0]);
        for y in 0..87 {
            let a = y * stride;
            assert_eq!(model[a..a + 160], cur[a..a + 160], "line {y}");
        }
        // Scrolling down: the band starts lower and reads from above.
        let down = frame(w, h, stride, |y| u32::from(y).wrapping_sub(5));
        assert_eq!(
            find_scroll(&prev, &down, stride, w, h),
            vec![Band {
                y: 5,
                h: 95,
                src_y: 0
            }]
        );
    }

    #[test]
    fn a_board_of_repeated_lines_scrolls_by_windows() {
        let (w, h, stride) = (32u16, 128u16, 128);
        // 16-line stripes, each a different colour: every line repeats 16 times.
        let prev = frame(w, h, stride, |y| u32::from(y / 16));
        let cur = frame(w, h, stride, |y| u32::from((y + 40) / 16));
        let bands = find_scroll(&prev, &cur, stride, w, h);
        assert_eq!(
            bands,
            vec![Band {
                y: 0,
                h: 88,
                src_y: 40
            }]
        );
    }

    #[test]
    fn a_scrolled_band_between_fixed_lines_and_no_scroll_at_all() {
        let (w, h, stride) = (16u16, 60u16, 64);
        let prev = frame(w, h, stride, u32::from);
        // Lines 10..50 scroll up by 4 (a window's contents); the rest stay.
        let cur = frame(w, h, stride, |y| {
            if (10..46).contains(&y) {
                u32::from(y) + 4
            } else if (46..50).contains(&y) {
                1000 + u32::from(y)
            } else {
                u32::from(y)
            }
        });
        let bands = find_scroll(&prev, &cur, stride, w, h);
        assert_eq!(
            bands,
            vec![Band {
                y: 10,
                h: 36,
                src_y: 14
            }]
        );
        let mut out = Vec::new();
        put(bands[0], w, &mut out);
        assert_eq!(out, [0, 0, 0, 10, 0, 16, 0, 36, 0, 0, 0, 1, 0, 0, 0, 14]);
        // New content everywhere, or a plain background: no band.
        let other = frame(w, h, stride, |y| 5000 + u32::from(y));
        assert!(find_scroll(&prev, &other, stride, w, h).is_empty());
        let blank = vec![0u8; stride * 60];
        let mut one = blank.clone();
        one[0] = 1;
        assert!(find_scroll(&blank, &one, stride, w, h).is_empty());
        assert!(find_scroll(&prev, &prev, stride, w, h).is_empty());
    }
}
