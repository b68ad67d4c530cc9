//! COM1, polled, no interrupts. Every port access is an exit (~90 µs on PVM), so output
//! goes straight to THR without polling LSR (the VMM's UART is always ready), and input
//! is only read when the VMM rang the heartbeat doorbell or a poll interval passed.

use core::fmt::{self, Write};

use crate::{clock, cpu, heartbeat};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1;

/// Write `bytes` to COM1 from the boot CPU, keeping the heartbeat going: every byte is an
/// exit of up to ~90 µs on PVM, a line several ms.
pub fn write_bytes(bytes: &[u8]) {
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

/// Read every byte the UART holds, handing each to `f`.
/// At most `MAX_DRAIN` bytes per call, and an LSR of 0xff means there is no UART at all.
pub fn drain(mut f: impl FnMut(u8)) {
    const MAX_DRAIN: usize = 4096;
    for _ in 0..MAX_DRAIN {
        let lsr = cpu::inb(LSR);
        if lsr == 0xff || lsr & LSR_DATA_READY == 0 {
            break;
        }
        f(cpu::inb(RBR));
    }
}
