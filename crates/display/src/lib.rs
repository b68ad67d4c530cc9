//! rayvisor displays, with no KVM in sight: the GPU model (types, states, limits), where
//! the framebuffers go in guest RAM, screenshots as PNG, and a VNC (RFB 3.8) server.
//!
//! The VMM owns guest memory; this crate reads pixels through the [`FrameSource`] trait, so
//! it is tested here against plain buffers and driven in the VMM by guest RAM.
pub mod auth;
pub mod copyrect;
pub mod damage;
pub mod decode;
pub mod encode;
pub mod keys;
pub mod layout;
pub mod model;
pub mod png;
pub mod rfb;
mod sessions;
pub mod tight;
pub mod vnc;
pub mod zrle;

pub use layout::{DisplayGeometry, VramLayout};
pub use model::{GpuEvent, GpuModel, GpuState, TransitionError};

/// Where a display's pixels come from.
pub trait FrameSource: Send + Sync {
    /// The VM's displays, in order.
    fn displays(&self) -> Vec<DisplayGeometry>;
    /// Copies display `index`'s pixels (XRGB8888, `stride` bytes a line) into `out`, which
    /// holds exactly `stride * height` bytes. False if there is no such display now.
    fn read(&self, index: usize, out: &mut [u8]) -> bool;
    /// The tiles of display `index` written after generation `since` (0: before any look,
    /// so every tile), from the source's own change tracking (the dirty log of guest
    /// memory). None when the source cannot tell: the reader then compares every tile.
    fn damage(&self, index: usize, since: u64) -> Option<damage::Damage> {
        let _ = (index, since);
        None
    }
    /// Counts one look at display `index` for its metrics: tiles compared and how many of
    /// them had changed.
    fn note_compare(&self, index: usize, examined: u32, changed: u32) {
        let _ = (index, examined, changed);
    }
}
