//! COM1: a 16550 (vm-superio) whose output goes to the VM's log file, to the VMM's stdout
//! when attached, and to an in-memory ring the API serves; input comes from the API or
//! stdin and is fed to the UART as its FIFO drains.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// How much console output the API can return.
pub const RING_BYTES: usize = 1 << 20;
/// Input waiting for the UART's FIFO; more is refused rather than buffered without bound.
pub const MAX_PENDING_INPUT: usize = 1 << 16;

/// The interrupt line of the UART, as an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The tail of everything the guest wrote.
#[derive(Default)]
pub struct ConsoleRing {
    inner: Mutex<RingInner>,
    /// Called after each push, outside the lock: how followers learn of new output
    /// without polling.
    on_output: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

#[derive(Default)]
struct RingInner {
    bytes: VecDeque<u8>,
    total: u64,
}

impl ConsoleRing {
    fn push(&self, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.total += data.len() as u64;
        inner.bytes.extend(data);
        let excess = inner.bytes.len().saturating_sub(RING_BYTES);
        inner.bytes.drain(..excess);
        drop(inner);
        if let Some(f) = self.on_output.get() {
            f();
        }
    }

    /// Has `f` called after every write of the guest from now on (one listener per ring;
    /// false if there is one already).
    pub fn on_output(&self, f: impl Fn() + Send + Sync + 'static) -> bool {
        self.on_output.set(Box::new(f)).is_ok()
    }

    /// The last `max` bytes and the total written so far.
    pub fn tail(&self, max: usize) -> (u64, Vec<u8>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let skip = inner.bytes.len().saturating_sub(max);
        (
            inner.total,
            inner.bytes.iter().skip(skip).copied().collect(),
        )
    }
}

/// Where the UART's output goes.
pub struct ConsoleOut {
    log: Option<File>,
    stdout: bool,
    ring: Arc<ConsoleRing>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ring.push(buf);
        if let Some(log) = self.log.as_mut() {
            // The log is best effort: a full disk must not stop the guest.
            let _ = log.write_all(buf);
        }
        if self.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(buf);
            let _ = out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's registers and the input not yet delivered: what a snapshot keeps of COM1.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    pub registers: [u8; 10],
    pub fifo: Vec<u8>,
    pub pending: Vec<u8>,
}

/// COM1 and the input waiting for it.
pub struct Console {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    pending: VecDeque<u8>,
    ring: Arc<ConsoleRing>,
}

/// Input refused because too much is already waiting.
#[derive(Debug, thiserror::Error)]
#[error("console input of {len} bytes refused: {pending} bytes are already waiting for the guest (limit {MAX_PENDING_INPUT})")]
pub struct InputFull {
    pub len: usize,
    pub pending: usize,
}

impl Console {
    pub fn new(irq: EventFd, log: Option<File>, stdout: bool, ring: Arc<ConsoleRing>) -> Self {
        let out = ConsoleOut {
            log,
            stdout,
            ring: ring.clone(),
        };
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
            ring,
        }
    }

    /// A console in `state`. The FIFO is refused if larger than a 16550's (untrusted input).
    pub fn from_state(
        state: &ConsoleState,
        irq: EventFd,
        log: Option<File>,
        stdout: bool,
        ring: Arc<ConsoleRing>,
    ) -> Result<Self, String> {
        use crate::persist::Persist;
        let mut console = Console::new(irq, log, stdout, ring);
        console.restore_state(state)?;
        Ok(console)
    }

    pub fn ring(&self) -> Arc<ConsoleRing> {
        self.ring.clone()
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.uart.read(offset);
        self.refill();
        value
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // The only error is a failing interrupt eventfd, which the guest cannot cause and
        // cannot be told about; the byte itself has been handled.
        let _ = self.uart.write(offset, value);
    }

    /// Paravirtual console input ([`ray_guest_abi::PV_CONSOLE_IN_PORT`]): fills `data`
    /// with the waiting input, the UART's FIFO first and then the pending queue, exactly
    /// the bytes (and order) COM1 would deliver, and zeros after them. A NUL byte would
    /// read as the end of the input, so NUL bytes are dropped.
    pub fn pv_read(&mut self, data: &mut [u8]) {
        const LSR: u8 = 5;
        const LSR_DATA_READY: u8 = 1;
        let mut filled = 0;
        while filled < data.len() && self.read(LSR) & LSR_DATA_READY != 0 {
            let byte = self.read(0);
            if byte != 0 {
                data[filled] = byte;
                filled += 1;
            }
        }
        data[filled..].fill(0);
    }

    /// Paravirtual console output ([`ray_guest_abi::PV_CONSOLE_OUT_PORT`]): `bytes` go
    /// where the UART's output goes (log, stdout, ring) in one write.
    pub fn pv_write(&mut self, bytes: &[u8]) {
        // ConsoleOut's write never fails (its sinks are best effort).
        let _ = self.uart.writer_mut().write_all(bytes);
    }

    /// Queues input for the guest.
    pub fn queue_input(&mut self, data: &[u8]) -> Result<(), InputFull> {
        if self.pending.len() + data.len() > MAX_PENDING_INPUT {
            return Err(InputFull {
                len: data.len(),
                pending: self.pending.len(),
            });
        }
        self.pending.extend(data);
        self.refill();
        Ok(())
    }

    pub fn has_pending_input(&self) -> bool {
        !self.pending.is_empty()
    }

    fn refill(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        let _ = self.uart.enqueue_raw_bytes(&chunk);
    }
}

impl crate::persist::Persist for Console {
    type State = ConsoleState;
    type Error = String;

    fn save_state(&self) -> Result<ConsoleState, String> {
        let s = self.uart.state();
        Ok(ConsoleState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
                0,
            ],
            fifo: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        })
    }

    /// Puts the UART registers, FIFO and pending input of `state` into this console,
    /// which keeps its interrupt line and outputs. Untrusted input: a FIFO larger than a
    /// 16550's or too much pending input is refused, and the console is left unchanged.
    fn restore_state(&mut self, state: &ConsoleState) -> Result<(), String> {
        let r = &state.registers;
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.fifo.clone(),
        };
        if state.pending.len() > MAX_PENDING_INPUT {
            return Err(format!(
                "the saved console has {} bytes of pending input, more than {MAX_PENDING_INPUT}",
                state.pending.len()
            ));
        }
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("cannot share the console's interrupt line: {e}"))?;
        let w = self.uart.writer();
        let out = ConsoleOut {
            log: match &w.log {
                Some(f) => Some(
                    f.try_clone()
                        .map_err(|e| format!("cannot share the serial log: {e}"))?,
                ),
                None => None,
            },
            stdout: w.stdout,
            ring: w.ring.clone(),
        };
        self.uart = Serial::from_state(
            &uart_state,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| format!("the saved UART state is invalid: {e:?}"))?;
        self.pending = state.pending.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    fn console() -> Console {
        Console::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            None,
            false,
            Arc::default(),
        )
    }

    #[test]
    fn output_reaches_the_ring() {
        let mut c = console();
        for b in b"hello\n" {
            c.write(0, *b);
        }
        let (total, data) = c.ring().tail(3);
        assert_eq!(total, 6);
        assert_eq!(data, b"lo\n");
    }

    #[test]
    fn input_longer_than_the_fifo_is_delivered_in_order() {
        let mut c = console();
        let input: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        c.queue_input(&input).unwrap();
        let mut got = Vec::new();
        // LSR bit 0: data ready.
        while c.read(5) & 1 == 1 {
            got.push(c.read(0));
        }
        assert_eq!(got, input);
        assert!(!c.has_pending_input());
    }

    #[test]
    fn state_round_trips_registers_fifo_and_pending_input() {
        let mut c = console();
        c.write(3, 0x83); // LCR: DLAB
        c.write(0, 0x0c); // divisor low
        c.write(3, 0x03);
        c.write(7, 0x5a); // scratch
        c.queue_input(&[b'q'; 100]).unwrap();
        let state = c.save_state().unwrap();
        let mut back = Console::from_state(
            &state,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            None,
            false,
            Arc::default(),
        )
        .unwrap();
        assert_eq!(back.save_state().unwrap(), state);
        assert_eq!(back.read(7), 0x5a);
        let mut got = 0;
        while back.read(5) & 1 == 1 {
            assert_eq!(back.read(0), b'q');
            got += 1;
        }
        assert_eq!(got, 100);
    }

    #[test]
    fn oversized_saved_fifo_is_refused() {
        let mut state = console().save_state().unwrap();
        state.fifo = vec![0; 4096];
        let err = Console::from_state(
            &state,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            None,
            false,
            Arc::default(),
        )
        .err()
        .unwrap();
        assert!(err.contains("invalid"), "{err}");
    }

    #[test]
    fn too_much_input_is_refused_with_sizes() {
        let mut c = console();
        c.queue_input(&vec![b'x'; MAX_PENDING_INPUT]).unwrap();
        let err = c.queue_input(&[b'y'; 100]).unwrap_err();
        assert!(err.to_string().contains("100 bytes refused"), "{err}");
    }
}
