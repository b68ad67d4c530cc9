//! A hostile VNC viewer: bytes after the handshake, parsed as RFB client messages until the
//! first refusal. What is accepted is within the server's limits; an accepted pixel format
//! can be served (Raw and ZRLE rectangles of a small frame in it, of the expected size); an
//! accepted SetDesktopSize has screens and a size, and its layout check and answer hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_display::rfb::{
    self, ClientMessage, Rect, ResizeReason, ResizeStatus, MAX_CUT_TEXT, MAX_DESKTOP_EDGE,
    MAX_ENCODINGS,
};
use ray_display::vnc::check_layout;
use ray_display::zrle::Zrle;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut zrle = Zrle::default();
    let frame: Vec<u8> = (0..16 * 4 * 4).map(|i| (i * 37) as u8).collect();
    let all = Rect { x: 0, y: 0, w: 16, h: 4 };
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
            }
            ClientMessage::SetDesktopSize { width, height, screens } => {
                assert!(width > 0 && height > 0 && !screens.is_empty());
                assert!(width <= MAX_DESKTOP_EDGE && height <= MAX_DESKTOP_EDGE);
                if check_layout(width, height, &screens).is_ok() {
                    let s = screens[0];
                    assert_eq!((screens.len(), s.x, s.y, s.w, s.h), (1, 0, 0, width, height));
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
            ClientMessage::UpdateRequest { .. }
            | ClientMessage::Key { .. }
            | ClientMessage::Pointer { .. } => {}
        }
    }
});
