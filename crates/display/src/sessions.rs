//! What the encode and the decode session tables share: finding a session by its number,
//! and keeping only the last few ended sessions (for listing) as new ones come.

/// Most ended sessions a table keeps for listing.
pub(crate) const KEEP_ENDED: usize = 16;

/// A session as its table sees it.
pub(crate) trait TableEntry {
    fn number(&self) -> u32;
    /// It stopped or failed: it no longer counts against a limit.
    fn ended(&self) -> bool;
    /// Stops its thread (if it still runs) and waits for it.
    fn reap(&mut self);
}

/// Adds `session` to `sessions` (oldest first); once more than [`KEEP_ENDED`] have
/// ended, the oldest ended one goes, its thread reaped.
pub(crate) fn push<S: TableEntry>(sessions: &mut Vec<S>, session: S) {
    sessions.push(session);
    if sessions.iter().filter(|s| s.ended()).count() > KEEP_ENDED {
        if let Some(i) = sessions.iter().position(S::ended) {
            sessions.remove(i).reap();
        }
    }
}

/// Session `number` of `sessions`.
pub(crate) fn find<S: TableEntry>(sessions: &[S], number: u32) -> Option<&S> {
    sessions.iter().find(|s| s.number() == number)
}

/// Session `number` of `sessions`, to change.
pub(crate) fn find_mut<S: TableEntry>(sessions: &mut [S], number: u32) -> Option<&mut S> {
    sessions.iter_mut().find(|s| s.number() == number)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry {
        number: u32,
        ended: bool,
        reaped: bool,
    }

    impl TableEntry for Entry {
        fn number(&self) -> u32 {
            self.number
        }
        fn ended(&self) -> bool {
            self.ended
        }
        fn reap(&mut self) {
            self.reaped = true;
        }
    }

    #[test]
    fn only_the_last_ended_sessions_stay_and_running_ones_always_do() {
        let mut table = Vec::new();
        for number in 1..=40 {
            let ended = number % 2 == 0;
            push(
                &mut table,
                Entry {
                    number,
                    ended,
                    reaped: false,
                },
            );
        }
        assert_eq!(table.iter().filter(|e| e.ended).count(), KEEP_ENDED);
        assert_eq!(table.iter().filter(|e| !e.ended).count(), 20);
        // The ended ones kept are the newest: 10, 12, ..., 40.
        assert!(find(&table, 8).is_none() && find(&table, 10).is_some());
        assert!(
            find(&table, 1).is_some(),
            "a running session is never dropped"
        );
        find_mut(&mut table, 40).unwrap().reaped = true;
        assert!(find(&table, 40).unwrap().reaped);
        assert!(find(&table, 41).is_none());
    }
}
