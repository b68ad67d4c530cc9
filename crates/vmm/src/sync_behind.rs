//! Durability off the caller's path: a thread of its own runs `fdatasync` on a file after
//! the writes its owner reports.
//!
//! A writer using it returns once `write(2)` has put its data in the page cache, which a
//! crash of this process does not lose; the data reaches the disk a moment later (the
//! next `fdatasync` on this thread, which covers every write before it, in order). Only
//! a host crash in that window can lose the newest writes. Dropping the handle waits for
//! every requested sync, so a VMM that ends normally leaves everything on disk.
use crate::logging::SpawnInSpan;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

#[derive(Default)]
struct State {
    /// Writes reported so far.
    requested: u64,
    /// Writes known to be on disk (a sync started after they were reported ended).
    synced: u64,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The syncing thread of one file.
pub struct SyncBehind {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SyncBehind {
    /// Starts the thread that syncs `file` (a handle of its own on the file written to);
    /// `what` names the file in error messages.
    pub fn start(file: File, what: String) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sync".into())
            .stack_size(64 << 10)
            .spawn_in_span(move || run(&s, &file, &what))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Reports a completed write; returns its ticket for [`wait`](Self::wait).
    pub fn request(&self) -> u64 {
        let mut st = self.shared.lock();
        st.requested += 1;
        self.shared.changed.notify_all();
        st.requested
    }

    /// Waits until the write of `ticket` (and every one before) is on disk.
    pub fn wait(&self, ticket: u64) {
        let mut st = self.shared.lock();
        while st.synced < ticket && self.thread.is_some() {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn run(shared: &Shared, file: &File, what: &str) {
    let mut st = shared.lock();
    loop {
        if st.requested > st.synced {
            let target = st.requested;
            drop(st);
            // Everything written before `target` was reported is covered by this sync.
            if let Err(e) = file.sync_data() {
                tracing::error!("cannot sync {what} to disk: {e}");
            }
            st = shared.lock();
            st.synced = target;
            shared.changed.notify_all();
        } else if st.closing {
            return;
        } else {
            st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for SyncBehind {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn every_reported_write_is_synced_before_wait_and_drop_return() {
        let path = std::env::temp_dir().join(format!("ray-sync-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let sync = SyncBehind::start(f.try_clone().unwrap(), "test".into()).unwrap();
        let mut last = 0;
        for i in 0..20 {
            writeln!(f, "line {i}").unwrap();
            last = sync.request();
        }
        sync.wait(last);
        assert!(sync.shared.lock().synced >= last);
        writeln!(f, "after").unwrap();
        let ticket = sync.request();
        drop(sync);
        assert_eq!(ticket, 21);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 21);
        let _ = std::fs::remove_file(&path);
    }
}
