//! What happens when a filter stops a call: the SIGSYS handler.
//!
//! The handler runs on the offending thread, under that thread's filter, so it may only
//! make calls every list allows (`write`, `exit_group`) and must not allocate. Everything
//! it writes is prepared beforehand: the thread's name and kind in thread-locals, the
//! record file's descriptor and the start of its JSON in statics.
use std::cell::Cell;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use crate::Kind;

/// The exit code of a VMM a filter stopped: 128 + SIGSYS, as a shell reports a process
/// killed by that signal.
pub const KILLED_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// How the reason of such a VMM's exit record starts.
pub const KILLED_REASON: &str = "the VMM was stopped by its seccomp filter: ";

/// The file in the VM's directory that holds the exit record of a VMM a filter stopped
/// (the ordinary exit record is written after the fact, which such a VMM cannot do).
pub const RECORD_FILE: &str = "seccomp.json";

thread_local! {
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    static THREAD_KIND: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// The record file, open for writing (-1: none).
static RECORD_FD: AtomicI32 = AtomicI32::new(-1);
/// `{"id":"…","state":"error","pid":N,"reason":"<KILLED_REASON>`
static RECORD_HEAD: OnceLock<Vec<u8>> = OnceLock::new();

/// Remembers, for the handler, which thread this is.
pub(crate) fn set_thread(kind: Kind) {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("unnamed").as_bytes();
    let len = n.len().min(15);
    name[..len].copy_from_slice(&n[..len]);
    THREAD_NAME.set(name);
    THREAD_KIND.set(Some(kind));
}

pub(crate) fn record_to(dir: &Path, id: &str) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(RECORD_FILE))?;
    let head = format!(
        "{{\"id\":{},\"state\":\"error\",\"pid\":{},\"reason\":\"{KILLED_REASON}",
        json_string(id),
        std::process::id()
    );
    RECORD_HEAD
        .set(head.into_bytes())
        .map_err(|_| io::Error::other("the record file is set already"))?;
    RECORD_FD.store(file.into_raw_fd(), Ordering::Release);
    Ok(())
}

/// `s` as a JSON string (VM ids are plain, but the record must parse whatever they are).
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn catch_sigsys() -> io::Result<()> {
    // SAFETY: sigaction is plain data, zeroed then filled; the handler is an extern "C"
    // function of the right signature for SA_SIGINFO.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A fixed buffer the handler formats into (no allocation in a signal handler).
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `thread vcpu0 (filter vcpu) made the forbidden system call 165`
fn describe(line: &mut Line, syscall: i32) {
    let name = THREAD_NAME.get();
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(b"thread ");
    // Thread names are ours (letters, digits, '-'); anything else would break the JSON.
    for &b in &name[..len] {
        line.push(&[if b.is_ascii_alphanumeric() || b == b'-' {
            b
        } else {
            b'_'
        }]);
    }
    if len == 0 {
        line.push(b"(unnamed)");
    }
    line.push(b" (filter ");
    // A helper that neither entered nor inherited a kind runs under the VMM thread's.
    line.push(
        THREAD_KIND
            .get()
            .map_or("main, inherited", Kind::name)
            .as_bytes(),
    );
    line.push(b") made the forbidden system call ");
    line.push_number(u64::try_from(syscall).unwrap_or(0));
}

fn write_all(fd: i32, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: writes from a live buffer of the given length.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n <= 0 {
            return;
        }
        done += n as usize;
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel's siginfo for SIGSYS: after the three ints and padding (16 bytes), the
    // union holds {void *call_addr; int syscall; unsigned arch}.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers, and SIGSYS from
    // seccomp fills the _sigsys member read here.
    let syscall = unsafe { info.cast::<u8>().add(16 + 8).cast::<i32>().read_unaligned() };
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    line.push(KILLED_REASON.as_bytes());
    describe(&mut line, syscall);
    line.push(b"\n");
    write_all(2, line.bytes());
    let fd = RECORD_FD.load(Ordering::Acquire);
    if let (true, Some(head)) = (fd >= 0, RECORD_HEAD.get()) {
        let mut record = Line {
            buf: [0; 512],
            len: 0,
        };
        record.push(head);
        describe(&mut record, syscall);
        record.push(b"\"}\n");
        write_all(fd, record.bytes());
    }
    // SAFETY: ends the process at once; no Rust state is used after.
    unsafe { libc::_exit(KILLED_EXIT_CODE) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_thread_kind_and_call() {
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(|| {
                set_thread(Kind::Vcpu);
                let mut line = Line {
                    buf: [0; 512],
                    len: 0,
                };
                describe(&mut line, 165);
                assert_eq!(
                    std::str::from_utf8(line.bytes()).unwrap(),
                    "thread vcpu0 (filter vcpu) made the forbidden system call 165"
                );
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }
}
