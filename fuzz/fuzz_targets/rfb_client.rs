//! A hostile VNC viewer: bytes after the handshake, parsed as RFB client messages until the
//! first refusal. What is accepted is within the server's limits; an accepted pixel format
//! can be served (Raw, ZRLE and Tight rectangles of a small frame in it, of the expected
//! size; CopyRect finds the frame's scroll and applying it gives the frame); an
//! accepted SetDesktopSize has screens and a size, and its layout check and answer hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_display::copyrect;
use ray_display::rfb::{
    self, ClientMessage, Rect, ResizeReason, ResizeStatus, MAX_CUT_TEXT, MAX_DESKTOP_EDGE,
    MAX_ENCODINGS,
};
use ray_display::tight::Tight;
use ray_display::vnc::check_layout;
use ray_display::zrle::Zrle;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut zrle = Zrle::default();
    let mut tight = Tight::default();
    let frame: Vec<u8> = (0..16 * 4 * 4).map(|i| (i * 37) as u8).collect();
    let all = Rect {
        x: 0,
        y: 0,
        w: 16,
        h: 4,
    };
    while let Ok(m) = rfb::read_message(&mut input) {
        match m {
            ClientMessage::SetEncodings(list) => assert!(list.len() <= usize::from(MAX_ENCODINGS)),
            ClientMessage::CutText(t) => assert!(t.len() <= MAX_CUT_TEXT as usize),
            ClientMessage::SetPixelFormat(pf) => {
                let mut out = Vec::new();
                rfb::raw_rect(&frame, 64, all, pf, &mut out);
                assert_eq!(out.len(), 12 + 16 * 4 * pf.bytes_per_pixel());
                out.clear();
                zrle.rect(&frame, 64, all, pf, &mut out);
                assert!(out.len() > 16);
                out.clear();
                assert_eq!(
                    tight.rects(&frame, 64, all, pf, &mut out),
                    Tight::count(all)
                );
                assert!(out.len() > 13);
            }
            ClientMessage::SetDesktopSize {
                width,
                height,
                screens,
            } => {
                assert!(width > 0 && height > 0 && !screens.is_empty());
                assert!(width <= MAX_DESKTOP_EDGE && height <= MAX_DESKTOP_EDGE);
                if check_layout(width, height, &screens).is_ok() {
                    let s = screens[0];
                    assert_eq!(
                        (screens.len(), s.x, s.y, s.w, s.h),
                        (1, 0, 0, width, height)
                    );
                }
                let mut out = Vec::new();
                rfb::extended_desktop_size_rect(
                    ResizeReason::ThisClient,
                    ResizeStatus::InvalidLayout,
                    width,
                    height,
                    &screens,
                    &mut out,
                );
                assert_eq!(out.len(), 16 + 16 * screens.len());
            }
            ClientMessage::UpdateRequest { rect, .. } => {
                // The hostile client's numbers as a frame that scrolled: every band found
                // turns the old frame into the new one where it lies.
                let mut old: Vec<u8> = (0..16 * 32 * 4)
                    .map(|i| (i / 64 * 131 + i % 7) as u8 ^ (rect.x >> (i / 64 % 9)) as u8)
                    .collect();
                old[usize::from(rect.y % 2048)] ^= 1;
                let shift = usize::from(rect.h % 32) * 64;
                let mut new = old.clone();
                new.rotate_left(shift);
                let mut model = old.clone();
                for b in copyrect::find_scroll(&old, &new, 64, 16, 32) {
                    assert!(b.y + b.h <= 32 && b.src_y + b.h <= 32);
                    copyrect::apply(&mut model, 64, 16, b);
                    let (a, z) = (usize::from(b.y) * 64, usize::from(b.y + b.h) * 64);
                    assert_eq!(model[a..z], new[a..z]);
                }
            }
            ClientMessage::Key { .. } | ClientMessage::Pointer { .. } => {}
        }
    }
});
