//! virtio-gpu commands from a hostile driver: the input is guest memory and a sequence of
//! control and cursor requests, host resizes and save/restore round trips
//! (`ray_devices::virtio::gpu::hostile` describes the format). Every answer is a known
//! response type inside the room the driver gave, every scanout keeps a frame of its
//! mode's size, and every state the guest can reach restores into a fresh device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ray_devices::virtio::gpu::hostile::replay(data);
});
