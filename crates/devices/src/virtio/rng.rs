//! virtio-rng (entropy device, §5.4): one queue whose device-writable buffers the device
//! fills from the host's `getrandom(2)`.
use ray_memory::GuestMemory;

use super::queue::Chain;
use super::{Completion, VirtioDevice, DEVICE_TYPE_RNG};

pub const QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request, so one guest request cannot keep the device
/// thread busy for long; the driver asks again for more.
pub const MAX_REQUEST: u32 = 64 << 10;

#[derive(Default)]
pub struct Rng;

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> Result<(), std::io::Error> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, a live, writable
        // Rust buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn process(
        &mut self,
        _queue: usize,
        chain: &Chain,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        if let Some(i) = chain.descriptors.iter().position(|d| !d.writable) {
            return Completion::Failed(format!(
                "request {} has a device-readable buffer (descriptor {i} of the chain); an \
                 entropy request has only device-writable ones",
                chain.head
            ));
        }
        let mut written: u32 = 0;
        let mut buf = [0u8; 4096];
        for d in &chain.descriptors {
            let mut off = 0u32;
            while off < d.len && written < MAX_REQUEST {
                let n = (d.len - off)
                    .min(buf.len() as u32)
                    .min(MAX_REQUEST - written);
                let piece = &mut buf[..n as usize];
                if let Err(e) = getrandom(piece) {
                    return Completion::Failed(format!("getrandom failed: {e}"));
                }
                // The chain was checked to lie in guest memory; a failure here is a bug
                // or a changed map, and fails the request.
                if let Err(e) = memory.write(d.addr + u64::from(off), piece) {
                    return Completion::Failed(e.to_string());
                }
                off += n;
                written += n;
            }
        }
        Completion::Done(written)
    }
}
