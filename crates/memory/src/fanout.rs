//! One dirty log, many readers.
//!
//! KVM's dirty log is destructive: reading it clears it. With incremental snapshots, a
//! migration and a display's change detection all wanting "pages written since I last
//! looked", whoever read first would steal the others' pages. [`DirtyFanout`] sits between:
//! the log is read once per take and ORed into every registered consumer's pending set;
//! each consumer takes (and clears) only its own.
//!
//! ```text
//!   KVM log ─┐                 ┌─▶ "snapshot"  pending ─take─▶ incremental snapshot
//!            ├─ distribute ────┼─▶ "migration" pending ─take─▶ pre-copy pass
//!   VMM writes┘                └─▶ "display"   pending ─take─▶ changed tiles
//! ```
use crate::bitmap::DirtyBitmap;
use crate::layout::MemoryLayout;

/// A registered consumer of the dirty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerId(u32);

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    name: String,
    pending: DirtyBitmap,
}

/// Named consumers of one dirty log, each with the pages written since its last take.
#[derive(Debug)]
pub struct DirtyFanout {
    layout: MemoryLayout,
    consumers: Vec<Consumer>,
    next: u32,
}

impl DirtyFanout {
    pub fn new(layout: MemoryLayout) -> Self {
        Self {
            layout,
            consumers: Vec::new(),
            next: 0,
        }
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Adds a consumer that sees every page written from now on.
    pub fn register(&mut self, name: &str) -> ConsumerId {
        self.register_with(name, DirtyBitmap::clean(&self.layout))
    }

    /// Adds a consumer whose first take also returns `pending` (pages it already owes:
    /// a snapshot chain carried across a suspend, say).
    pub fn register_with(&mut self, name: &str, mut pending: DirtyBitmap) -> ConsumerId {
        if pending.check(&self.layout).is_err() {
            pending = DirtyBitmap::full(&self.layout);
        }
        let id = ConsumerId(self.next);
        self.next += 1;
        self.consumers.push(Consumer {
            id,
            name: name.to_string(),
            pending,
        });
        id
    }

    /// Removes a consumer and returns the pages it had not taken. None if unknown.
    pub fn unregister(&mut self, id: ConsumerId) -> Option<DirtyBitmap> {
        let i = self.consumers.iter().position(|c| c.id == id)?;
        Some(self.consumers.remove(i).pending)
    }

    /// Whether anyone needs the dirty log: the log may be switched off when not.
    pub fn is_active(&self) -> bool {
        !self.consumers.is_empty()
    }

    pub fn contains(&self, id: ConsumerId) -> bool {
        self.consumers.iter().any(|c| c.id == id)
    }

    /// Names of the registered consumers, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.consumers.iter().map(|c| c.name.as_str()).collect()
    }

    /// Gives one read of the log (or pages the VMM wrote itself) to every consumer.
    pub fn distribute(&mut self, fresh: &DirtyBitmap) {
        for c in &mut self.consumers {
            c.pending.union(fresh);
        }
    }

    /// Gives pages to one consumer only: pages it took but could not use (a snapshot whose
    /// write failed), so its next take returns them again.
    pub fn give_back(&mut self, id: ConsumerId, pages: &DirtyBitmap) -> bool {
        match self.consumers.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.pending.union(pages);
                true
            }
            None => false,
        }
    }

    /// The pages written since `id`'s previous take, leaving its set clean. Call
    /// [`distribute`](Self::distribute) with a fresh read of the log first.
    pub fn take(&mut self, id: ConsumerId) -> Option<DirtyBitmap> {
        self.consumers
            .iter_mut()
            .find(|c| c.id == id)
            .map(|c| c.pending.take())
    }

    /// How many pages `id` would take now, without taking them.
    pub fn pending(&self, id: ConsumerId) -> Option<u64> {
        self.consumers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.pending.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(&[(0, 64 * 4096), (1 << 20, 16 * 4096)]).unwrap()
    }

    #[test]
    fn consumers_do_not_steal_each_others_pages() {
        let l = layout();
        let mut f = DirtyFanout::new(l.clone());
        assert!(!f.is_active());
        let snap = f.register("snapshot");
        let mig = f.register("migration");
        let mut w = DirtyBitmap::clean(&l);
        w.mark(&l, 0x3000, 1);
        f.distribute(&w);
        assert_eq!(f.take(snap).unwrap().count(), 1);
        let mut w2 = DirtyBitmap::clean(&l);
        w2.mark(&l, 1 << 20, 1);
        f.distribute(&w2);
        assert_eq!(
            f.take(snap).unwrap().count(),
            1,
            "only the page since its take"
        );
        assert_eq!(f.take(mig).unwrap().count(), 2, "both pages: none stolen");
        let disp = f.register("display");
        assert_eq!(
            f.take(disp).unwrap().count(),
            0,
            "a new consumer starts clean"
        );
        assert!(f.give_back(snap, &w));
        assert_eq!(f.pending(snap), Some(1));
        assert_eq!(f.names(), vec!["snapshot", "migration", "display"]);
        assert_eq!(f.unregister(mig).map(|b| b.count()), Some(0));
        assert!(f.take(mig).is_none());
        let carried = f.register_with("carried", DirtyBitmap::full(&l));
        assert_eq!(f.take(carried).unwrap().count(), 80);
    }

    proptest! {
        /// Every consumer sees every page written since its own previous take, whatever the
        /// interleaving of writes and takes.
        #[test]
        fn each_take_returns_exactly_the_pages_since_the_last(
            ops in proptest::collection::vec((0usize..3, proptest::option::of(0u64..80)), 1..200)
        ) {
            let l = layout();
            let mut f = DirtyFanout::new(l.clone());
            let ids = [f.register("a"), f.register("b"), f.register("c")];
            let mut expect = vec![std::collections::BTreeSet::new(); 3];
            for (who, write) in ops {
                match write {
                    Some(page) => {
                        let gpa = if page < 64 { page * 4096 } else { (1 << 20) + (page - 64) * 4096 };
                        let mut w = DirtyBitmap::clean(&l);
                        w.mark(&l, gpa, 1);
                        f.distribute(&w);
                        for e in &mut expect { e.insert(gpa); }
                    }
                    None => {
                        let got: std::collections::BTreeSet<u64> =
                            f.take(ids[who]).unwrap().gpas(&l).collect();
                        prop_assert_eq!(&got, &expect[who]);
                        expect[who].clear();
                    }
                }
            }
        }
    }
}
