//! COM1, polled, no interrupts. Every port access is an exit (~90 µs on PVM), so output
//! goes straight to THR without polling LSR (the VMM's UART is always ready), and input
//! is only read when the VMM rang the heartbeat doorbell or a poll interval passed.
//!
//! When the VMM offers the paravirtual console (`VMM_FEATURE_PV_CONSOLE`, decided once at
//! boot, so a restored guest keeps its mode) the boot CPU's output is buffered in the
//! heartbeat page and flushed with one exit per line, and input is drained with one
//! `rep insb`. Other CPUs (panics, exceptions) always write to COM1.

use core::fmt::{self, Write};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering::*};

use ray_guest_abi::{
    PV_CONSOLE_IN_PORT, PV_CONSOLE_OUT_LEN, PV_CONSOLE_OUT_PORT, VMM_FEATURE_PV_CONSOLE,
};

use crate::{clock, cpu, heartbeat};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1;

/// Whether the boot CPU uses the paravirtual console (set once by [`init`]).
static PV: AtomicBool = AtomicBool::new(false);
/// Bytes waiting in the paravirtual output buffer (boot CPU only).
static PV_LEN: AtomicUsize = AtomicUsize::new(0);

/// Chooses the console path from the features the VMM announced (boot CPU, at boot).
pub fn init() {
    let offered = heartbeat::vmm_features().load(Relaxed) & VMM_FEATURE_PV_CONSOLE != 0;
    PV.store(offered, Relaxed);
}

fn pv() -> bool {
    PV.load(Relaxed)
}

/// Hands the buffered paravirtual output to the VMM (one exit); nothing if none waits.
/// Boot CPU only.
pub fn flush() {
    let len = PV_LEN.swap(0, Relaxed);
    if len > 0 {
        // The VMM reads the buffer when it handles the port write: the bytes must be in
        // memory first.
        compiler_fence(SeqCst);
        cpu::outl_after_stores(PV_CONSOLE_OUT_PORT, len as u32);
    }
}

/// Buffers `bytes` for the paravirtual console, flushing at each `\n` and when full.
fn pv_write(bytes: &[u8]) {
    let buf = heartbeat::console_out();
    for &b in bytes {
        let len = PV_LEN.load(Relaxed);
        // SAFETY: `len < PV_CONSOLE_OUT_LEN` (a full buffer is flushed at once below), so
        // the store stays inside the output buffer, which only this (boot) CPU writes.
        unsafe { buf.add(len).write_volatile(b) };
        PV_LEN.store(len + 1, Relaxed);
        if b == b'\n' || len + 1 == PV_CONSOLE_OUT_LEN {
            flush();
            heartbeat::beat(clock::now());
        }
    }
}

/// While a command from vsock runs, the boot CPU's output goes to that connection's
/// buffer instead of the console: (buffer address, 0 = none; its size; bytes in it;
/// bytes that did not fit).
static CAP_PTR: AtomicUsize = AtomicUsize::new(0);
static CAP_MAX: AtomicUsize = AtomicUsize::new(0);
static CAP_LEN: AtomicUsize = AtomicUsize::new(0);
static CAP_LOST: AtomicUsize = AtomicUsize::new(0);

/// Sends the boot CPU's output to `buf` (`max` bytes) until [`capture_end`].
pub fn capture_start(buf: *mut u8, max: usize) {
    CAP_LEN.store(0, Relaxed);
    CAP_LOST.store(0, Relaxed);
    CAP_MAX.store(max, Relaxed);
    CAP_PTR.store(buf as usize, Relaxed);
}

/// Ends a capture: (bytes captured, bytes that did not fit).
pub fn capture_end() -> (usize, usize) {
    CAP_PTR.store(0, Relaxed);
    (CAP_LEN.load(Relaxed), CAP_LOST.load(Relaxed))
}

fn capture(bytes: &[u8]) -> bool {
    let ptr = CAP_PTR.load(Relaxed);
    if ptr == 0 {
        return false;
    }
    let (len, max) = (CAP_LEN.load(Relaxed), CAP_MAX.load(Relaxed));
    let n = bytes.len().min(max.saturating_sub(len));
    // SAFETY: `capture_start`'s caller gave a buffer of `max` bytes that nothing else
    // uses until `capture_end`; `len + n <= max`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (ptr as *mut u8).add(len), n) };
    CAP_LEN.store(len + n, Relaxed);
    CAP_LOST.fetch_add(bytes.len() - n, Relaxed);
    true
}

/// Formatted text into a byte buffer (what does not fit is dropped).
pub struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Cursor { buf, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Write `bytes` from the boot CPU, keeping the heartbeat going. On COM1 every byte is an
/// exit of up to ~90 µs on PVM, a line several ms; on the paravirtual console a line is
/// one exit.
pub fn write_bytes(bytes: &[u8]) {
    if capture(bytes) {
        heartbeat::beat(clock::now());
        return;
    }
    crate::fbcon::write(bytes);
    if pv() {
        pv_write(bytes);
        heartbeat::beat(clock::now());
        return;
    }
    for &b in bytes {
        cpu::outb(THR, b);
        heartbeat::beat(clock::now());
    }
}

pub fn write_str(s: &str) {
    write_bytes(s.as_bytes());
}

/// COM1 as a `fmt::Write`; `beat` = boot CPU, keep the heartbeat going.
struct Com1 {
    beat: bool,
}

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.beat {
            // Captured output included (see `capture_start`).
            write_bytes(s.as_bytes());
        } else {
            for &b in s.as_bytes() {
                cpu::outb(THR, b);
            }
        }
        Ok(())
    }
}

/// Formatted output from the boot CPU.
pub fn print_fmt(args: fmt::Arguments) {
    let _ = Com1 { beat: true }.write_fmt(args);
}

/// Formatted output from any CPU (panics, exceptions): no heartbeat updates.
pub fn print_fmt_raw(args: fmt::Arguments) {
    let _ = Com1 { beat: false }.write_fmt(args);
}

/// Print one formatted line (a `\n` is appended).
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// The paravirtual input buffer: aligned so that it never straddles a page (KVM then
/// hands the whole `rep insb` to the VMM in one exit).
#[repr(C, align(256))]
struct InBuf([u8; 256]);

/// Read every byte the UART holds, handing each to `f`.
/// At most `MAX_DRAIN` bytes per call, and an LSR of 0xff means there is no UART at all.
pub fn drain(mut f: impl FnMut(u8)) {
    const MAX_DRAIN: usize = 4096;
    if pv() {
        // One exit per 256 bytes; the VMM zero-pads, so a zero ends the input.
        let mut buf = InBuf([0; 256]);
        for _ in 0..MAX_DRAIN / buf.0.len() {
            cpu::rep_insb(PV_CONSOLE_IN_PORT, &mut buf.0);
            let n = buf.0.iter().position(|&b| b == 0).unwrap_or(buf.0.len());
            buf.0[..n].iter().for_each(|&b| f(b));
            if n < buf.0.len() {
                break;
            }
        }
        return;
    }
    for _ in 0..MAX_DRAIN {
        let lsr = cpu::inb(LSR);
        if lsr == 0xff || lsr & LSR_DATA_READY == 0 {
            break;
        }
        f(cpu::inb(RBR));
    }
}
