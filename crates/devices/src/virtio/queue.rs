//! The device side of a split virtqueue (virtio 1.2 §2.7) over [`GuestMemory`].
//!
//! Everything here reads memory the guest writes concurrently and treats it as untrusted:
//! ring indices are checked against the queue size, descriptor chains are bounded by it,
//! and every address goes through the memory view, which refuses anything outside guest
//! RAM. Values are read once (volatile) and never through a `&[u8]`.
//!
//! Indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`, when negotiated): a chain's last
//! descriptor may name a table of descriptors in guest memory instead of a buffer; the
//! walk follows it, with the same checks, and the whole chain still counts against the
//! queue size.
//!
//! Notification suppression: with `VIRTIO_F_EVENT_IDX` the device asks for the next kick
//! only once it has consumed everything (`avail_event`), and interrupts the driver only
//! when the used index passes the driver's `used_event` ([`Queue::needs_interrupt`]).
use std::collections::BTreeSet;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use ray_memory::{GuestMemory, MemoryError};

use super::completer::Used;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;

/// A fault of the queue as a whole: the device cannot go on with it until reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    Size { size: u16, max: u16 },
    #[error("the {ring} at {addr:#x} is misaligned or not inside guest memory")]
    Ring { ring: &'static str, addr: u64 },
    #[error("the driver's available index moved {moved} entries at once, more than the queue size {size}")]
    AvailOverrun { moved: u16, size: u16 },
    #[error("the available ring names descriptor {head}, outside the table of {size}")]
    Head { head: u16, size: u16 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A fault of one descriptor chain: that request fails, the queue goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {index} links to {next}, outside the table of {size}")]
    Next { index: u16, next: u16, size: u16 },
    #[error("the chain is longer than the queue size {0} (a loop)")]
    TooLong(u16),
    #[error("descriptor {0} is indirect, which was not negotiated")]
    Indirect(u16),
    #[error("descriptor {index} names an indirect table of {len} bytes at {addr:#x}: not a whole, non-empty number of descriptors inside guest memory")]
    IndirectTable { index: u16, addr: u64, len: u32 },
    #[error("descriptor {0} is indirect but also links onwards, or sits inside an indirect table")]
    IndirectNested(u16),
    #[error("descriptor {0} is device-readable after a device-writable one")]
    ReadableAfterWritable(u16),
    #[error("descriptor {index} ({addr:#x}, {len} bytes) is not inside guest memory")]
    Outside { index: u16, addr: u64, len: u32 },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub writable: bool,
}

/// A request: the head descriptor's index (what the used ring reports) and its buffers,
/// each checked to lie inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descriptors: Vec<Descriptor>,
}

/// What [`Queue::pop`] found at the next available entry.
pub type Popped = Result<Chain, (u16, ChainError)>;

/// A split virtqueue's configuration (written by the driver through the transport) and the
/// device's position in it. All of it is saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Queue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Negotiated `VIRTIO_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Negotiated `VIRTIO_RING_F_INDIRECT_DESC` (absent from states saved before it was
    /// offered: off).
    #[serde(default)]
    pub indirect: bool,
    pub next_avail: u16,
    pub next_used: u16,
    /// The used index at the last interrupt decision (event-index mode).
    pub signalled_used: Option<u16>,
    /// Heads the device took and answers later ([`Completion::Pending`]): a completion
    /// naming any other head (one taken before a reset, or a device's mistake) is dropped,
    /// so it cannot land in the rings the driver set up since. Pausing waits until this is
    /// empty, so it is never part of saved state.
    ///
    /// [`Completion::Pending`]: super::Completion::Pending
    #[serde(skip)]
    pending: BTreeSet<u16>,
}

fn load16(mem: &(impl GuestMemory + ?Sized), gpa: u64) -> Result<u16, MemoryError> {
    mem.span(gpa, 2)?
        .load::<u16>(0)
        .ok_or_else(|| MemoryError::outside(gpa, 2))
}

fn store16(mem: &(impl GuestMemory + ?Sized), gpa: u64, v: u16) -> Result<(), MemoryError> {
    mem.span(gpa, 2)?.store(0, v);
    mem.note_write(gpa, 2);
    Ok(())
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            event_idx: false,
            indirect: false,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
            pending: BTreeSet::new(),
        }
    }

    /// Notes that the device took request `head` and completes it later.
    pub fn note_pending(&mut self, head: u16) {
        self.pending.insert(head);
    }

    /// Requests taken and not completed yet.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Whether `head` was pending (it no longer is): a completion for it may be published.
    pub fn settle(&mut self, head: u16) -> bool {
        self.pending.remove(&head)
    }

    /// Back to the state after a device reset.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    fn avail_ring_len(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    fn used_ring_len(&self) -> u64 {
        6 + USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Checks what the driver configured: size, alignment, and that the three rings lie in
    /// guest memory. Done when the driver enables the queue and when state is restored.
    pub fn validate(&self, mem: &(impl GuestMemory + ?Sized)) -> Result<(), QueueError> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(QueueError::Size {
                size: self.size,
                max: self.max_size,
            });
        }
        let rings = [
            (
                "descriptor table",
                self.desc,
                16,
                DESC_SIZE * u64::from(self.size),
            ),
            ("available ring", self.avail, 2, self.avail_ring_len()),
            ("used ring", self.used, 4, self.used_ring_len()),
        ];
        for (ring, addr, align, len) in rings {
            if !addr.is_multiple_of(align) || mem.span(addr, len).is_err() {
                return Err(QueueError::Ring { ring, addr });
            }
        }
        Ok(())
    }

    /// The driver's available index.
    fn avail_idx(&self, mem: &(impl GuestMemory + ?Sized)) -> Result<u16, QueueError> {
        Ok(load16(mem, self.avail + 2)?)
    }

    /// Whether the driver has made buffers available that the device has not taken.
    pub fn has_available(&self, mem: &(impl GuestMemory + ?Sized)) -> Result<bool, QueueError> {
        Ok(self.avail_idx(mem)? != self.next_avail)
    }

    /// Takes the next available chain, if any. A malformed chain is consumed and returned
    /// as an error with its head, so that the device can fail that request alone.
    pub fn pop(&mut self, mem: &(impl GuestMemory + ?Sized)) -> Result<Option<Popped>, QueueError> {
        let idx = self.avail_idx(mem)?;
        let moved = (Wrapping(idx) - Wrapping(self.next_avail)).0;
        if moved == 0 {
            return Ok(None);
        }
        if moved > self.size {
            return Err(QueueError::AvailOverrun {
                moved,
                size: self.size,
            });
        }
        // The ring entry and the descriptors are read after the index (the driver writes
        // them before it).
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = load16(mem, self.avail + 4 + 2 * slot)?;
        if head >= self.size {
            return Err(QueueError::Head {
                head,
                size: self.size,
            });
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(self.walk(mem, head).map_err(|e| (head, e))))
    }

    /// Un-pops the last `n` chains: they are available again, in the same order. The
    /// driver cannot have reused their ring entries, as it has not got them back.
    pub fn rewind(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Reads the chain starting at `head` (which is inside the table), following an
    /// indirect table if the driver's last descriptor names one.
    fn walk(&self, mem: &(impl GuestMemory + ?Sized), head: u16) -> Result<Chain, ChainError> {
        let mut descriptors = Vec::new();
        // The table being walked: the queue's, or an indirect one (address, entries).
        let (mut table, mut entries) = (self.desc, self.size);
        let mut in_indirect = false;
        let mut index = head;
        let mut seen_writable = false;
        loop {
            if descriptors.len() >= usize::from(self.size) {
                return Err(ChainError::TooLong(self.size));
            }
            let at = table + DESC_SIZE * u64::from(index);
            let mut raw = [0u8; 16];
            mem.read(at, &mut raw).map_err(|_| ChainError::Outside {
                index,
                addr: at,
                len: 16,
            })?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(ChainError::Indirect(index));
                }
                if in_indirect || flags & DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectNested(index));
                }
                let bad = ChainError::IndirectTable { index, addr, len };
                let count = u64::from(len) / DESC_SIZE;
                if len == 0
                    || !u64::from(len).is_multiple_of(DESC_SIZE)
                    || count > u64::from(u16::MAX)
                    || mem.span(addr, u64::from(len)).is_err()
                {
                    return Err(bad);
                }
                // The table's descriptors link by their index in it, from 0.
                (table, entries) = (addr, count as u16);
                in_indirect = true;
                index = 0;
                continue;
            }
            let writable = flags & DESC_F_WRITE != 0;
            if !writable && seen_writable {
                return Err(ChainError::ReadableAfterWritable(index));
            }
            seen_writable |= writable;
            if len != 0 && mem.span(addr, u64::from(len)).is_err() {
                return Err(ChainError::Outside { index, addr, len });
            }
            descriptors.push(Descriptor {
                addr,
                len,
                writable,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, descriptors });
            }
            if next >= entries {
                return Err(ChainError::Next {
                    index,
                    next,
                    size: entries,
                });
            }
            index = next;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &(impl GuestMemory + ?Sized),
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size);
        let at = self.used + 4 + USED_ELEM_SIZE * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(at, &elem)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        store16(mem, self.used + 2, self.next_used)?;
        Ok(())
    }

    /// Returns the requests a device completed on its own thread; only heads still pending
    /// go out (see [`Queue::note_pending`]). Says whether any did.
    pub fn add_completed(
        &mut self,
        mem: &(impl GuestMemory + ?Sized),
        done: &[Used],
    ) -> Result<bool, QueueError> {
        let mut any = false;
        for u in done {
            if self.settle(u.head) {
                self.add_used(mem, u.head, u.len)?;
                any = true;
            }
        }
        Ok(any)
    }

    /// Asks the driver to kick for the next buffer it makes available, and says whether
    /// some arrived meanwhile (then the device must look again before sleeping). Without
    /// event indices the driver kicks anyway (the device never sets `NO_NOTIFY`).
    pub fn enable_kicks(&mut self, mem: &(impl GuestMemory + ?Sized)) -> Result<bool, QueueError> {
        if self.event_idx {
            let avail_event = self.used + 4 + USED_ELEM_SIZE * u64::from(self.size);
            store16(mem, avail_event, self.next_avail)?;
        }
        // The store above must be visible before the index is read again, or a buffer the
        // driver adds in between would get neither a kick nor a look.
        fence(Ordering::SeqCst);
        self.has_available(mem)
    }

    /// Whether the driver wants an interrupt for the used entries added since the last
    /// decision: with event indices, if the used index passed its `used_event`; without,
    /// unless it set `NO_INTERRUPT`.
    pub fn needs_interrupt(
        &mut self,
        mem: &(impl GuestMemory + ?Sized),
    ) -> Result<bool, QueueError> {
        // The used index is published before the driver's wish is read.
        fence(Ordering::SeqCst);
        let new = Wrapping(self.next_used);
        if self.event_idx {
            let used_event = Wrapping(load16(mem, self.avail + 4 + 2 * u64::from(self.size))?);
            let old = self.signalled_used.replace(new.0);
            return Ok(match old {
                None => true,
                Some(old) => (new - used_event - Wrapping(1)) < (new - Wrapping(old)),
            });
        }
        Ok(load16(mem, self.avail)? & AVAIL_F_NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ray_memory::mmap::MappedMemory;
    use virtio_queue::desc::split::Descriptor as RawSplit;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    pub fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(RawSplit::new(addr, len, flags, next))
    }

    /// Where tests put the used ring: the mock's own used ring overlaps its available
    /// ring's `used_event` field (its ring end is computed in elements, not bytes).
    pub const USED: u64 = 0x1000;

    pub fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
        load16(&MappedMemory::new(mem), USED + 2).unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used_elem(mem: &GuestMemoryMmap<()>, i: u64) -> (u32, u32) {
        let mut b = [0u8; 8];
        MappedMemory::new(mem)
            .read(USED + 4 + 8 * i, &mut b)
            .unwrap();
        (
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..].try_into().unwrap()),
        )
    }

    pub fn queue_of(mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>, size: u16) -> Queue {
        Queue {
            size,
            ready: true,
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: USED,
            ..Queue::new(size)
        }
    }

    #[test]
    fn chains_are_read_and_used_entries_published() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let view = MappedMemory::new(&mem);
        mock.add_desc_chains(
            &[
                desc(0x10_0000, 16, DESC_F_NEXT, 1),
                desc(0x10_1000, 32, DESC_F_WRITE, 0),
                desc(0x10_2000, 8, DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut q = queue_of(&mock, 16);
        q.validate(&view).unwrap();
        let a = q.pop(&view).unwrap().unwrap().unwrap();
        assert_eq!(a.head, 0);
        assert_eq!(a.descriptors.len(), 2);
        assert!(!a.descriptors[0].writable && a.descriptors[1].writable);
        let b = q.pop(&view).unwrap().unwrap().unwrap();
        assert_eq!((b.head, b.descriptors[0].len), (2, 8));
        assert_eq!(q.pop(&view).unwrap(), None);
        q.add_used(&view, 2, 8).unwrap();
        q.add_used(&view, 0, 32).unwrap();
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 0), (2, 8));
    }

    #[test]
    fn malformed_chains_fail_alone_and_ring_faults_stop_the_queue() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 8);
        let view = MappedMemory::new(&mem);
        let mut q = queue_of(&mock, 8);
        let cases: Vec<(Vec<RawDescriptor>, ChainError)> = vec![
            (
                vec![desc(0x10_0000, 8, DESC_F_NEXT | DESC_F_WRITE, 9)],
                ChainError::Next {
                    index: 0,
                    next: 9,
                    size: 8,
                },
            ),
            (
                vec![desc(0x10_0000, 8, DESC_F_NEXT | DESC_F_WRITE, 0)],
                ChainError::TooLong(8),
            ),
            (
                vec![desc(0x10_0000, 16, DESC_F_INDIRECT, 0)],
                ChainError::Indirect(0),
            ),
            (
                vec![
                    desc(0x10_0000, 8, DESC_F_WRITE | DESC_F_NEXT, 1),
                    desc(0x10_1000, 8, 0, 0),
                ],
                ChainError::ReadableAfterWritable(1),
            ),
            (
                vec![desc(0x1f_fff0, 0x20, DESC_F_WRITE, 0)],
                ChainError::Outside {
                    index: 0,
                    addr: 0x1f_fff0,
                    len: 0x20,
                },
            ),
            (
                vec![desc(u64::MAX - 4, 8, DESC_F_WRITE, 0)],
                ChainError::Outside {
                    index: 0,
                    addr: u64::MAX - 4,
                    len: 8,
                },
            ),
        ];
        for (descs, want) in cases {
            // Each case sits at the table's start; the mock appends one avail entry.
            mock.add_desc_chains(&descs, 0).unwrap();
            assert_eq!(q.pop(&view).unwrap(), Some(Err((0, want))));
        }
        // A driver that claims more new entries than the queue holds.
        mock.avail().idx().store(q.next_avail.wrapping_add(9));
        assert_eq!(
            q.pop(&view),
            Err(QueueError::AvailOverrun { moved: 9, size: 8 })
        );
        // A head outside the table.
        mock.avail().idx().store(q.next_avail.wrapping_add(1));
        mock.avail()
            .ring()
            .ref_at(usize::from(q.next_avail % 8))
            .unwrap()
            .store(200);
        assert_eq!(q.pop(&view), Err(QueueError::Head { head: 200, size: 8 }));
    }

    /// Writes an indirect table of `descs` at `at`.
    pub fn indirect_table(mem: &GuestMemoryMmap<()>, at: u64, descs: &[(u64, u32, u16, u16)]) {
        let view = MappedMemory::new(mem);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            view.write(at + 16 * i as u64, &raw).unwrap();
        }
    }

    #[test]
    fn indirect_tables_are_followed_once_negotiated() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 8);
        let view = MappedMemory::new(&mem);
        // A table of three, linked out of order: 0 -> 2 -> 1.
        indirect_table(
            &mem,
            0x18_0000,
            &[
                (0x10_0000, 16, DESC_F_NEXT, 2),
                (0x10_2000, 1, DESC_F_WRITE, 0),
                (0x10_1000, 512, DESC_F_WRITE | DESC_F_NEXT, 1),
            ],
        );
        let mut q = Queue {
            indirect: true,
            ..queue_of(&mock, 8)
        };
        // A direct descriptor first, then the indirect one (as the spec allows).
        mock.add_desc_chains(
            &[
                desc(0x10_3000, 8, DESC_F_NEXT, 1),
                desc(0x18_0000, 48, DESC_F_INDIRECT, 0),
            ],
            0,
        )
        .unwrap();
        let c = q.pop(&view).unwrap().unwrap().unwrap();
        let got: Vec<(u64, u32, bool)> = c
            .descriptors
            .iter()
            .map(|d| (d.addr, d.len, d.writable))
            .collect();
        assert_eq!(
            got,
            [
                (0x10_3000, 8, false),
                (0x10_0000, 16, false),
                (0x10_1000, 512, true),
                (0x10_2000, 1, true)
            ]
        );
        // Without the feature the same chain fails alone.
        mock.add_desc_chains(&[desc(0x18_0000, 48, DESC_F_INDIRECT, 0)], 0)
            .unwrap();
        q.indirect = false;
        assert_eq!(
            q.pop(&view).unwrap(),
            Some(Err((0, ChainError::Indirect(0))))
        );
        q.indirect = true;
        let bad_table = |len: u32, addr: u64| ChainError::IndirectTable {
            index: 0,
            addr,
            len,
        };
        indirect_table(&mem, 0x18_1000, &[(0x18_0000, 48, DESC_F_INDIRECT, 0)]);
        indirect_table(
            &mem,
            0x18_2000,
            &[
                (0x10_0000, 8, DESC_F_NEXT, 1),
                (0x10_0000, 8, DESC_F_NEXT, 0),
            ],
        );
        indirect_table(&mem, 0x18_3000, &[(0x10_0000, 8, DESC_F_NEXT, 5)]);
        let cases: Vec<(RawDescriptor, ChainError)> = vec![
            (
                desc(0x18_0000, 40, DESC_F_INDIRECT, 0),
                bad_table(40, 0x18_0000),
            ),
            (
                desc(0x18_0000, 0, DESC_F_INDIRECT, 0),
                bad_table(0, 0x18_0000),
            ),
            (
                desc(0x1f_fff0, 32, DESC_F_INDIRECT, 0),
                bad_table(32, 0x1f_fff0),
            ),
            // Indirect inside an indirect table, and indirect that also links on.
            (
                desc(0x18_1000, 16, DESC_F_INDIRECT, 0),
                ChainError::IndirectNested(0),
            ),
            (
                desc(0x18_0000, 48, DESC_F_INDIRECT | DESC_F_NEXT, 0),
                ChainError::IndirectNested(0),
            ),
            // A loop inside the table, and a link past its end.
            (
                desc(0x18_2000, 32, DESC_F_INDIRECT, 0),
                ChainError::TooLong(8),
            ),
            (
                desc(0x18_3000, 16, DESC_F_INDIRECT, 0),
                ChainError::Next {
                    index: 0,
                    next: 5,
                    size: 1,
                },
            ),
        ];
        for (d, want) in cases {
            mock.add_desc_chains(&[d], 0).unwrap();
            assert_eq!(q.pop(&view).unwrap(), Some(Err((0, want))));
        }
    }

    proptest::proptest! {
        /// Whatever the guest wrote into the descriptor table and the available ring, the
        /// device never panics, never takes more chains than were made available, and every
        /// buffer it accepts lies inside guest memory.
        #[test]
        fn arbitrary_rings_never_break_the_device(
            table in proptest::collection::vec(proptest::prelude::any::<u8>(), 16 * 8),
            ring in proptest::collection::vec(proptest::prelude::any::<u16>(), 8),
            idx in proptest::prelude::any::<u16>(),
        ) {
            let mem = memory();
            let view = MappedMemory::new(&mem);
            let mock = MockSplitQueue::new(&mem, 8);
            let mut q = queue_of(&mock, 8);
            view.write(q.desc, &table).unwrap();
            for (i, head) in ring.iter().enumerate() {
                store16(&view, q.avail + 4 + 2 * i as u64, *head).unwrap();
            }
            store16(&view, q.avail + 2, idx).unwrap();
            let mut taken = 0u16;
            loop {
                match q.pop(&view) {
                    Ok(None) | Err(_) => break,
                    Ok(Some(Ok(chain))) => {
                        proptest::prop_assert!(chain.descriptors.len() <= 8);
                        for d in &chain.descriptors {
                            if d.len > 0 {
                                proptest::prop_assert!(view.span(d.addr, u64::from(d.len)).is_ok());
                            }
                        }
                        q.add_used(&view, chain.head, 0).unwrap();
                    }
                    Ok(Some(Err((head, _)))) => q.add_used(&view, head, 0).unwrap(),
                }
                taken += 1;
                proptest::prop_assert!(taken <= 8);
            }
            proptest::prop_assert!(taken == 0 || idx <= 8);
        }
    }

    #[test]
    fn configuration_is_validated() {
        let mem = memory();
        let view = MappedMemory::new(&mem);
        let mock = MockSplitQueue::new(&mem, 8);
        let good = queue_of(&mock, 8);
        good.validate(&view).unwrap();
        for size in [0, 3, 16] {
            let q = Queue {
                size,
                ..good.clone()
            };
            assert!(
                matches!(q.validate(&view), Err(QueueError::Size { .. })),
                "{size}"
            );
        }
        let q = Queue {
            desc: 8,
            ..good.clone()
        };
        assert!(matches!(q.validate(&view), Err(QueueError::Ring { .. })));
        let q = Queue {
            used: 0x1f_fffc,
            ..good.clone()
        };
        assert!(matches!(
            q.validate(&view),
            Err(QueueError::Ring {
                ring: "used ring",
                ..
            })
        ));
        let q = Queue {
            avail: 1 << 40,
            ..good
        };
        assert!(q.validate(&view).is_err());
    }

    #[test]
    fn event_index_suppresses_interrupts_and_kicks() {
        let mem = memory();
        let view = MappedMemory::new(&mem);
        let mock = MockSplitQueue::new(&mem, 8);
        let mut q = Queue {
            event_idx: true,
            ..queue_of(&mock, 8)
        };
        let used_event = mock.avail_addr().0 + 4 + 2 * 8;
        let avail_event = USED + 4 + 8 * 8;
        for _ in 0..3 {
            mock.add_desc_chains(&[desc(0x10_0000, 8, DESC_F_WRITE, 0)], 0)
                .unwrap();
        }
        while let Some(c) = q.pop(&view).unwrap() {
            q.add_used(&view, c.unwrap().head, 8).unwrap();
        }
        // The first decision always interrupts.
        assert!(q.needs_interrupt(&view).unwrap());
        assert!(!q.enable_kicks(&view).unwrap());
        assert_eq!(load16(&view, avail_event).unwrap(), 3, "kick me at entry 3");
        // The driver wants an interrupt only once used index passes 4.
        store16(&view, used_event, 4).unwrap();
        mock.add_desc_chains(&[desc(0x10_0000, 8, DESC_F_WRITE, 0)], 0)
            .unwrap();
        let c = q.pop(&view).unwrap().unwrap().unwrap();
        q.add_used(&view, c.head, 8).unwrap();
        assert!(
            !q.needs_interrupt(&view).unwrap(),
            "used idx 4 does not pass 4"
        );
        mock.add_desc_chains(&[desc(0x10_0000, 8, DESC_F_WRITE, 0)], 0)
            .unwrap();
        // A buffer that arrived before the device re-armed kicks is seen.
        assert!(q.enable_kicks(&view).unwrap());
        let c = q.pop(&view).unwrap().unwrap().unwrap();
        q.add_used(&view, c.head, 8).unwrap();
        assert!(q.needs_interrupt(&view).unwrap(), "used idx 5 passes 4");

        // Without event indices, NO_INTERRUPT in the available ring's flags decides.
        let mut plain = queue_of(&mock, 8);
        assert!(plain.needs_interrupt(&view).unwrap());
        store16(&view, mock.avail_addr().0, AVAIL_F_NO_INTERRUPT).unwrap();
        assert!(!plain.needs_interrupt(&view).unwrap());
    }
}
