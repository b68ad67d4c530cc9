//! rayvisor's device models served as vhost-user back ends, so that another VMM's front
//! end (QEMU's `vhost-user-blk-pci`) and a real guest's drivers exercise the very models
//! our VMM puts on its own virtio-pci bus.
//!
//! - [`backend`]: one front end's session: protocol answers from the model, the model's
//!   queues served by the transport's own loop on the front end's memory.
//! - [`order`]: the relay that holds back one message QEMU 7.2 sends too early.
//! - [`serve`]: the socket: one front end at a time, the next one after it leaves.
//! - [`gpu`]: the virtio-gpu model's frames sent to a vhost-user-gpu front end's display.
pub mod backend;
pub mod gpu;
pub mod order;
pub mod serve;

pub use backend::{Backend, GpuSocketHook, MakeDevice};
pub use serve::{serve, serve_with, ServeError};
