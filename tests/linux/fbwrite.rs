//! `fbwrite FILE [DEVICE]`: copies FILE's bytes to the start of a framebuffer device
//! (default /dev/fb0) through a shared mapping, for the Linux virtio-gpu test
//! (scripts/vhost-qemu-test). DRM's fbdev emulation learns of changes made through a
//! mapping (deferred I/O: its page faults), and sends them to the device as a transfer
//! and a flush. With Debian's 6.1 kernel, bytes written with write(2) led to no transfer
//! or flush at all here, so `dd` to /dev/fb0 never reached the device. Built statically with plain `rustc`, no crates; mmap
//! is declared here against the C library std already links.
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 1;

extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    fn munmap(addr: *mut u8, len: usize) -> i32;
    fn msync(addr: *mut u8, len: usize, flags: i32) -> i32;
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(file), device) = (args.get(1), args.get(2).map_or("/dev/fb0", |s| s.as_str()))
    else {
        return Err("usage: fbwrite FILE [DEVICE]".into());
    };
    let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("{device}: {e}"))?;
    // SAFETY: a fresh shared mapping of `data.len()` bytes of the device, which nothing
    // else in this process uses; checked against MAP_FAILED before use.
    let map = unsafe {
        mmap(
            std::ptr::null_mut(),
            data.len(),
            PROT_READ | PROT_WRITE,
            MAP_SHARED,
            fb.as_raw_fd(),
            0,
        )
    };
    if map as isize == -1 {
        return Err(format!(
            "cannot map {} bytes of {device}: {}",
            data.len(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `map` is a writable mapping of exactly `data.len()` bytes (above), which
    // does not overlap `data`.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), map, data.len());
        msync(map, data.len(), 4 /* MS_SYNC */);
        munmap(map, data.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fbwrite: {e}");
            ExitCode::FAILURE
        }
    }
}
