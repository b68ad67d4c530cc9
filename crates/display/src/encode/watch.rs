//! The live stream of an encode session: each watcher gets the stream's header, then the
//! session's output from the next key frame on, one access unit a message.
//!
//! The session's thread never waits for a watcher: each has a bounded queue, and one that
//! falls [`WATCH_QUEUE`] access units behind is dropped (its stream ends), so a slow viewer
//! costs the others nothing.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use ray_api::encode::MAX_WATCHERS_PER_SESSION;

/// Access units a watcher may be behind before it is dropped (4 s at 30 fps).
pub const WATCH_QUEUE: usize = 120;

/// What a watcher receives: the stream's bytes, a message at a time.
pub type Watch = Receiver<Arc<[u8]>>;

struct Watcher {
    tx: SyncSender<Arc<[u8]>>,
    /// Waiting for a key frame: nothing is sent before one.
    waiting: bool,
}

/// A session's watchers.
#[derive(Default)]
pub struct Watchers {
    list: Mutex<Vec<Watcher>>,
    /// A watcher is waiting: the next frame must be a key frame and is encoded even if the
    /// display did not change.
    key_wanted: AtomicBool,
}

impl Watchers {
    /// A new watcher, sent `header` (what the stream starts with) right away; None when
    /// the session has [`MAX_WATCHERS_PER_SESSION`] already.
    pub fn add(&self, header: &[u8]) -> Option<Watch> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= MAX_WATCHERS_PER_SESSION {
            return None;
        }
        let (tx, rx) = sync_channel(WATCH_QUEUE + 1);
        if !header.is_empty() {
            tx.try_send(Arc::from(header)).ok()?;
        }
        list.push(Watcher { tx, waiting: true });
        self.key_wanted.store(true, Ordering::SeqCst);
        Some(rx)
    }

    /// How many watch now.
    pub fn count(&self) -> usize {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether a watcher waits for a key frame (and clears the request: the caller makes
    /// the next frame one, or asks again with [`Watchers::want_key`]).
    pub fn take_key_request(&self) -> bool {
        self.key_wanted.swap(false, Ordering::SeqCst)
    }

    /// Asks for a key frame again (the forced frame produced no output).
    pub fn want_key(&self) {
        self.key_wanted.store(true, Ordering::SeqCst);
    }

    /// Sends one access unit to every watcher; `key`: it is a key frame, so waiting
    /// watchers start with it. Watchers that went away or fell too far behind are dropped.
    pub fn send(&self, unit: &[u8], key: bool, session: u32) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.is_empty() {
            return;
        }
        let unit: Arc<[u8]> = Arc::from(unit);
        list.retain_mut(|w| {
            if w.waiting && !key {
                return true;
            }
            w.waiting = false;
            match w.tx.try_send(unit.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        session,
                        "a watcher of the stream fell {WATCH_QUEUE} frames behind: its stream is closed"
                    );
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Ends every watcher's stream (the session ended).
    pub fn close(&self) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_start_at_a_key_frame_and_a_slow_one_is_dropped() {
        let w = Watchers::default();
        let a = w.add(b"HDR").unwrap();
        assert!(w.take_key_request());
        assert!(!w.take_key_request());
        assert_eq!(&*a.try_recv().unwrap(), b"HDR");
        w.send(b"p0", false, 1);
        assert!(a.try_recv().is_err(), "nothing before a key frame");
        w.send(b"k1", true, 1);
        w.send(b"p1", false, 1);
        assert_eq!(&*a.try_recv().unwrap(), b"k1");
        assert_eq!(&*a.try_recv().unwrap(), b"p1");
        // A watcher that reads nothing is dropped once its queue is full; the other stays.
        let slow = w.add(b"").unwrap();
        w.send(b"k2", true, 1);
        for _ in 0..WATCH_QUEUE + 1 {
            w.send(b"p", false, 1);
            while a.try_recv().is_ok() {}
        }
        assert_eq!(w.count(), 1);
        let mut got = 0;
        while slow.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(
            got,
            WATCH_QUEUE + 1,
            "the slow watcher got what fit, then its end"
        );
        drop(a);
        w.send(b"p", false, 1);
        assert_eq!(w.count(), 0, "a watcher that went away is dropped");
    }

    #[test]
    fn watchers_are_limited_and_end_with_the_session() {
        let w = Watchers::default();
        let all: Vec<Watch> = (0..MAX_WATCHERS_PER_SESSION)
            .map(|_| w.add(b"").unwrap())
            .collect();
        assert!(w.add(b"").is_none());
        w.close();
        for rx in &all {
            assert!(rx.recv().is_err(), "the stream ends");
        }
    }
}
