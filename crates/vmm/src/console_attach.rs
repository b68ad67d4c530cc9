//! Attached consoles: any number of clients follow the serial console live, one of them
//! types into it.
//!
//! An attachment is a byte stream (the API upgrades an HTTP connection to it): the VMM
//! sends [`console_frame`]s (output, notices, mode changes, the end), the client sends raw
//! input. Input is taken from one attachment at a time, the writer: the first to attach
//! (mode `auto`), or whoever attaches with `takeover`, which turns the previous writer
//! read-only. A read-only attachment's input is dropped. Detaching is closing the
//! connection; it never touches the VM.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use ray_api::vmm::{console_frame, ConsoleMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};

use crate::controller::{ControllerError, Message, Request};
use crate::devices::ConsoleRing;

/// How long an attachment waits before offering input again to a guest whose input queue
/// is full.
const INPUT_RETRY: Duration = Duration::from_millis(10);
/// Most output bytes in one frame.
const MAX_FRAME: usize = 64 << 10;

/// The attachments of one VM: who writes, how many there are.
pub struct ConsoleHub {
    /// The writer's attachment id.
    writer: watch::Sender<Option<u64>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    all_gone: Notify,
    /// Woken when the guest writes to its console.
    output: Notify,
}

impl Default for ConsoleHub {
    fn default() -> Self {
        Self {
            writer: watch::channel(None).0,
            next_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            all_gone: Notify::new(),
            output: Notify::new(),
        }
    }
}

impl ConsoleHub {
    /// The guest wrote to its console: every attachment sends the new output.
    pub fn output_written(&self) {
        if self.active.load(Ordering::Acquire) > 0 {
            self.output.notify_waiters();
        }
    }

    /// Registers a new attachment; says whether it writes.
    pub fn join(&self, mode: ConsoleMode) -> (u64, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        let writes = match mode {
            ConsoleMode::ReadOnly => false,
            ConsoleMode::Takeover => {
                self.writer.send_replace(Some(id));
                true
            }
            ConsoleMode::Auto => self.writer.send_if_modified(|w| match w {
                None => {
                    *w = Some(id);
                    true
                }
                Some(_) => false,
            }),
        };
        (id, writes)
    }

    fn leave(&self, id: u64) {
        self.writer.send_if_modified(|w| {
            if *w == Some(id) {
                *w = None;
                true
            } else {
                false
            }
        });
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_gone.notify_waiters();
        }
    }

    /// How many attachments there are.
    pub fn attached(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until every attachment has ended, at most `limit`.
    pub async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let gone = self.all_gone.notified();
                if self.attached() == 0 {
                    return;
                }
                gone.await;
            }
        })
        .await;
    }
}

/// What an attachment needs of the VMM.
pub struct Attachment {
    pub id: u64,
    pub writes: bool,
    /// Output offset to start from.
    pub from: u64,
    pub ring: Arc<ConsoleRing>,
    pub inbox: Sender<Message>,
    pub hub: Arc<ConsoleHub>,
    /// Turns true when the VMM is ending.
    pub stop: watch::Receiver<bool>,
}

/// Where output starts for a query: `from`, else `history` bytes before the end.
pub fn start_offset(ring: &ConsoleRing, from: Option<u64>, history: Option<u64>) -> u64 {
    let (total, _) = ring.tail(0);
    match from {
        Some(f) => f.min(total),
        None => total.saturating_sub(history.unwrap_or(0)),
    }
}

/// Sends one input chunk to the guest, waiting while its input queue is full. `Err` says
/// why it was dropped.
async fn type_in(inbox: &Sender<Message>, data: &[u8]) -> Result<(), String> {
    for _ in 0..500 {
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if inbox
            .send(Message::Api(Request::ConsoleInput(data.to_vec()), reply))
            .is_err()
        {
            return Err("the VMM is shutting down".into());
        }
        match rx.await {
            Ok(Ok(_)) => return Ok(()),
            // The guest has not read what waits yet, or a migration's last copy runs: give
            // it time.
            Ok(Err(ControllerError::Busy(_))) => {
                tokio::time::sleep(INPUT_RETRY).await;
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the VMM is shutting down".into()),
        }
    }
    Err("the guest does not read its console input".into())
}

impl Attachment {
    /// Gives up an attachment that never started (its connection was not upgraded).
    pub fn abandon(self) {
        self.hub.leave(self.id);
    }
}

/// Runs one attachment until the client detaches or the VMM ends.
pub async fn run<IO: AsyncRead + AsyncWrite>(io: IO, a: Attachment) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let _ = serve(&mut rd, &mut wr, &a).await;
    let _ = wr.shutdown().await;
    a.hub.leave(a.id);
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    wr.write_all(&console_frame::encode(kind, payload)).await
}

/// Sends the output from `*sent` up to the ring's end.
async fn push_output<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ring: &ConsoleRing,
    sent: &mut u64,
) -> std::io::Result<()> {
    let (total, _) = ring.tail(0);
    if total <= *sent {
        return Ok(());
    }
    let want = (total - *sent).min(usize::MAX as u64) as usize;
    let (end, data) = ring.tail(want);
    // Output may have arrived between the two reads: `data` ends at `end`.
    let start = end - data.len() as u64;
    if start > *sent {
        let note = format!(
            "{} bytes of output were skipped: the VMM keeps only the last {} KiB",
            start - *sent,
            crate::devices::console::RING_BYTES >> 10
        );
        send(wr, console_frame::NOTICE, note.as_bytes()).await?;
    }
    let skip = (*sent).saturating_sub(start) as usize;
    for chunk in data[skip.min(data.len())..].chunks(MAX_FRAME) {
        send(wr, console_frame::OUTPUT, chunk).await?;
    }
    *sent = end;
    wr.flush().await
}

/// Returns once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    a: &Attachment,
) -> std::io::Result<()> {
    let mode = |w: bool| if w { "write" } else { "read_only" };
    let mut writes = a.writes;
    send(wr, console_frame::MODE, mode(writes).as_bytes()).await?;
    let mut sent = a.from;
    let mut lease = a.hub.writer.subscribe();
    let mut stop = a.stop.clone();
    let mut input = vec![0u8; 4096];
    let mut told_read_only = false;
    loop {
        // Registered before the output is sent, so a write in between is not missed.
        let written = a.hub.output.notified();
        tokio::pin!(written);
        written.as_mut().enable();
        push_output(wr, &a.ring, &mut sent).await?;
        tokio::select! {
            _ = &mut written => {}
            n = rd.read(&mut input) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                if writes {
                    if let Err(why) = type_in(&a.inbox, &input[..n]).await {
                        let note = format!("{n} bytes of input dropped: {why}");
                        send(wr, console_frame::NOTICE, note.as_bytes()).await?;
                    }
                } else if !told_read_only {
                    told_read_only = true;
                    send(
                        wr,
                        console_frame::NOTICE,
                        b"this console is read-only: another one has the input (attach with --write to take it over)",
                    )
                    .await?;
                }
            }
            changed = lease.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = *lease.borrow_and_update() == Some(a.id);
                if now != writes {
                    writes = now;
                    told_read_only = false;
                    send(wr, console_frame::MODE, mode(writes).as_bytes()).await?;
                }
            }
            _ = stopped(&mut stop) => {
                push_output(wr, &a.ring, &mut sent).await?;
                send(wr, console_frame::END, b"").await?;
                return wr.flush().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_attachment_writes_takeover_moves_the_input() {
        let hub = ConsoleHub::default();
        let (a, a_writes) = hub.join(ConsoleMode::Auto);
        let (b, b_writes) = hub.join(ConsoleMode::Auto);
        assert!(a_writes && !b_writes);
        let (_, r) = hub.join(ConsoleMode::ReadOnly);
        assert!(!r);
        let (c, c_writes) = hub.join(ConsoleMode::Takeover);
        assert!(c_writes);
        assert_eq!(*hub.writer.borrow(), Some(c));
        // A reader leaving changes nothing; the writer leaving frees the input.
        hub.leave(b);
        assert_eq!(*hub.writer.borrow(), Some(c));
        hub.leave(a);
        hub.leave(c);
        assert_eq!(*hub.writer.borrow(), None);
        assert_eq!(hub.attached(), 1);
        let (_, d) = hub.join(ConsoleMode::Auto);
        assert!(d, "a free console goes to the next auto attachment");
    }

    #[test]
    fn start_offsets() {
        let ring = ConsoleRing::default();
        assert_eq!(start_offset(&ring, None, Some(100)), 0);
        assert_eq!(start_offset(&ring, Some(7), None), 0, "never past the end");
    }
}
