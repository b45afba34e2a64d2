//! Putting events back in sequence order: the `heap`, `stream` and `batch` resequencers.
//!
//! * `heap` (default): every event of a read is pushed into a binary heap of small keys (the
//!   seq); at the end of the read the contiguous run from the next expected seq is released as
//!   one batch. An event that arrives exactly in order while nothing waits skips the heap.
//! * `stream`: the original efr's ordered map; after each insert the contiguous run is released.
//! * `batch`: the original efr's fixed buffer; when it is full it is sorted and released whole.
//!   Correct only when the source's disorder never crosses a buffer boundary; every release not
//!   contiguous with the previous one is counted as an order violation.
//!
//! `heap` and `stream` keep waiting events in a ring indexed by `seq % ring size`, which also
//! finds duplicates in O(1); a slot keeps its payload buffer's capacity, so the steady state
//! allocates nothing (a slot frees a payload buffer larger than [`SLOT_PAYLOAD_KEEP`] when it
//! releases it). The window (`--resequencer-capacity`) bounds what a source can make the
//! server buffer in events: an event further than that beyond the next expected seq is
//! rejected; `--resequencer-max-bytes` bounds it in bytes: an event that would take the
//! waiting payloads over it is rejected the same way (the next expected event is always
//! taken, so order can always go on).
//!
//! Seqs never wrap: once the event with seq `u64::MAX` is released the resequencer has
//! [`ended`](Resequencer::ended) and refuses everything after.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use crate::batch::OrderedBatch;
use crate::protocol::Event;

/// Which resequencer orders the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResequencerKind {
    /// Batched binary heap (default).
    Heap,
    /// Ordered map, release after each insert (the original efr's).
    Stream,
    /// Fixed buffer sorted when full (the original efr's; order violations possible).
    Batch,
}

/// What happened to an offered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Taken: released now or waiting for a predecessor.
    Accepted,
    /// A copy of an event that is already waiting; the first one wins.
    Duplicate,
    /// Its seq was already delivered (or skipped).
    AlreadyDelivered,
    /// Its seq is further than the window beyond the next expected one.
    BeyondWindow,
    /// Waiting, it would take the waiting payloads over the byte limit.
    OverByteLimit,
}

/// A slot keeps a payload buffer up to this capacity for the next event; a larger one is
/// freed when its event is released, so a burst of long lines does not pin memory.
pub const SLOT_PAYLOAD_KEEP: usize = 256;

/// A range of sequence numbers that never arrived and was skipped, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hole {
    /// First missing seq.
    pub first: u64,
    /// Last missing seq.
    pub last: u64,
}

#[derive(Debug, Default)]
struct Slot {
    occupied: bool,
    event: Option<Event>,
    payload: Vec<u8>,
}

/// Waiting events indexed by seq modulo a power-of-two ring size.
#[derive(Debug)]
struct Ring {
    slots: Vec<Slot>,
    mask: u64,
    /// Payload bytes of the waiting events.
    bytes: u64,
}

impl Ring {
    fn new(window: u64) -> Self {
        let size = window.next_power_of_two().max(1);
        let mut slots = Vec::with_capacity(size as usize);
        slots.resize_with(size as usize, Slot::default);
        Ring {
            slots,
            mask: size - 1,
            bytes: 0,
        }
    }

    #[inline]
    fn slot(&mut self, seq: u64) -> &mut Slot {
        &mut self.slots[(seq & self.mask) as usize]
    }

    /// Whether an event with this seq waits.
    #[inline]
    fn holds(&mut self, seq: u64) -> bool {
        self.slot(seq).occupied
    }

    /// Stores an event; false when the slot already holds one (a duplicate).
    #[inline]
    fn insert(&mut self, event: Event, payload: &[u8]) -> bool {
        let slot = self.slot(event.seq);
        if slot.occupied {
            return false;
        }
        slot.occupied = true;
        slot.event = Some(event);
        slot.payload.clear();
        slot.payload.extend_from_slice(payload);
        self.bytes += payload.len() as u64;
        true
    }

    /// Moves the event with this seq into `out`; false when it is not here.
    #[inline]
    fn release(&mut self, seq: u64, out: &mut OrderedBatch) -> bool {
        let slot = self.slot(seq);
        if !slot.occupied {
            return false;
        }
        slot.occupied = false;
        debug_assert_eq!(slot.event.map(|event| event.seq), Some(seq));
        if let Some(event) = slot.event.take() {
            out.push(event, &slot.payload);
        }
        let released = slot.payload.len() as u64;
        if slot.payload.capacity() > SLOT_PAYLOAD_KEEP {
            slot.payload = Vec::new();
        }
        self.bytes -= released;
        true
    }

    fn clear(&mut self) {
        for slot in &mut self.slots {
            slot.occupied = false;
            slot.event = None;
            if slot.payload.capacity() > SLOT_PAYLOAD_KEEP {
                slot.payload = Vec::new();
            }
        }
        self.bytes = 0;
    }
}

#[derive(Debug)]
enum Strategy {
    Heap {
        ring: Ring,
        heap: BinaryHeap<Reverse<u64>>,
    },
    Stream {
        ring: Ring,
        waiting: BTreeSet<u64>,
    },
    Batch {
        buffer: Vec<(Event, u32, u32)>,
        arena: Vec<u8>,
        last_released: u64,
        order_violations: u64,
    },
}

/// Orders events by seq; see the module documentation for the three kinds.
#[derive(Debug)]
pub struct Resequencer {
    kind: ResequencerKind,
    window: u64,
    max_bytes: u64,
    next_expected: u64,
    /// The event with seq `u64::MAX` was released: nothing can follow it.
    ended: bool,
    strategy: Strategy,
}

impl Resequencer {
    /// A resequencer of `kind` with a window (or, for `batch`, a buffer) of `capacity` events,
    /// expecting `first_seq` first.
    pub fn new(kind: ResequencerKind, capacity: u64, first_seq: u64) -> Self {
        let capacity = capacity.max(1);
        let strategy = match kind {
            ResequencerKind::Heap => Strategy::Heap {
                ring: Ring::new(capacity),
                heap: BinaryHeap::with_capacity(1024),
            },
            ResequencerKind::Stream => Strategy::Stream {
                ring: Ring::new(capacity),
                waiting: BTreeSet::new(),
            },
            ResequencerKind::Batch => Strategy::Batch {
                buffer: Vec::with_capacity(capacity.min(1 << 20) as usize),
                arena: Vec::new(),
                last_released: first_seq - 1,
                order_violations: 0,
            },
        };
        Resequencer {
            kind,
            window: capacity,
            max_bytes: u64::MAX,
            next_expected: first_seq,
            ended: false,
            strategy,
        }
    }

    /// Bounds the payload bytes of waiting events (`heap`, `stream`: events over it are
    /// refused; `batch`: the buffer is released early when it would pass it).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// Whether the event with seq `u64::MAX` was released: the sequence cannot go on.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Payload bytes of the waiting events.
    pub fn waiting_bytes(&self) -> u64 {
        match &self.strategy {
            Strategy::Heap { ring, .. } | Strategy::Stream { ring, .. } => ring.bytes,
            Strategy::Batch { arena, .. } => arena.len() as u64,
        }
    }

    /// The kind of this resequencer.
    pub fn kind(&self) -> ResequencerKind {
        self.kind
    }

    /// The next seq that `heap` and `stream` will release.
    pub fn next_expected(&self) -> u64 {
        self.next_expected
    }

    /// How many events wait (for a predecessor, or for the `batch` buffer to fill).
    pub fn waiting(&self) -> usize {
        match &self.strategy {
            Strategy::Heap { heap, .. } => heap.len(),
            Strategy::Stream { waiting, .. } => waiting.len(),
            Strategy::Batch { buffer, .. } => buffer.len(),
        }
    }

    /// Releases that were not contiguous with the previous one (`batch` only; else 0).
    pub fn order_violations(&self) -> u64 {
        match &self.strategy {
            Strategy::Batch {
                order_violations, ..
            } => *order_violations,
            _ => 0,
        }
    }

    /// Offers one event; released events are appended to `out` in order.
    #[inline]
    pub fn offer(&mut self, event: Event, payload: &[u8], out: &mut OrderedBatch) -> Admission {
        let seq = event.seq;
        if self.ended {
            return Admission::AlreadyDelivered;
        }
        match &mut self.strategy {
            Strategy::Heap { ring, heap } => {
                if seq < self.next_expected {
                    return Admission::AlreadyDelivered;
                }
                if seq - self.next_expected >= self.window {
                    // The window is measured from the next expected seq; within one large
                    // read it may be stale, so release the contiguous run first.
                    release_run(ring, heap, &mut self.next_expected, &mut self.ended, out);
                    if self.ended {
                        return Admission::AlreadyDelivered;
                    }
                    if seq - self.next_expected >= self.window {
                        return Admission::BeyondWindow;
                    }
                }
                if seq == self.next_expected && heap.is_empty() {
                    out.push(event, payload);
                    advance(&mut self.next_expected, &mut self.ended);
                    return Admission::Accepted;
                }
                if ring.holds(seq) {
                    return Admission::Duplicate;
                }
                if seq != self.next_expected && ring.bytes + payload.len() as u64 > self.max_bytes {
                    return Admission::OverByteLimit;
                }
                ring.insert(event, payload);
                heap.push(Reverse(seq));
                Admission::Accepted
            }
            Strategy::Stream { ring, waiting } => {
                if seq < self.next_expected {
                    return Admission::AlreadyDelivered;
                }
                if seq - self.next_expected >= self.window {
                    return Admission::BeyondWindow;
                }
                if ring.holds(seq) {
                    return Admission::Duplicate;
                }
                if seq != self.next_expected && ring.bytes + payload.len() as u64 > self.max_bytes {
                    return Admission::OverByteLimit;
                }
                ring.insert(event, payload);
                waiting.insert(seq);
                while !self.ended && waiting.first() == Some(&self.next_expected) {
                    waiting.pop_first();
                    ring.release(self.next_expected, out);
                    advance(&mut self.next_expected, &mut self.ended);
                }
                Admission::Accepted
            }
            Strategy::Batch { arena, .. } => {
                if !arena.is_empty() && (arena.len() + payload.len()) as u64 > self.max_bytes {
                    self.release_batch(out);
                    if self.ended {
                        return Admission::AlreadyDelivered;
                    }
                    return self.offer(event, payload, out);
                }
                let Strategy::Batch { buffer, arena, .. } = &mut self.strategy else {
                    unreachable!("matched above");
                };
                let start = arena.len() as u32;
                arena.extend_from_slice(payload);
                buffer.push((event, start, payload.len() as u32));
                if buffer.len() as u64 >= self.window {
                    self.release_batch(out);
                }
                Admission::Accepted
            }
        }
    }

    /// Called after every event of one read was offered: `heap` releases its contiguous run.
    ///
    /// The run is found by walking the ring from the next expected seq (a waiting event sits
    /// in the slot of its seq), not by popping the heap: the released seqs are then exactly
    /// the smallest ones in the heap. When they are all of it (the usual case with the harness:
    /// a read that completes a shuffled batch) the heap is cleared at once; when they are a
    /// large part of it (reads that cut batches: about 99 of 130 waiting) one O(n) `retain`
    /// replaces the O(log n) pops; only a few are popped one by one.
    #[inline]
    pub fn end_of_read(&mut self, out: &mut OrderedBatch) {
        if let Strategy::Heap { ring, heap } = &mut self.strategy {
            release_run(ring, heap, &mut self.next_expected, &mut self.ended, out);
        }
    }

    /// Skips the hole before the smallest waiting event and releases what follows it.
    /// Returns the skipped range, or `None` when nothing waits (or for `batch`).
    pub fn skip_hole(&mut self, out: &mut OrderedBatch) -> Option<Hole> {
        if self.ended {
            return None;
        }
        let smallest = match &self.strategy {
            Strategy::Heap { heap, .. } => heap.peek().map(|r| r.0),
            Strategy::Stream { waiting, .. } => waiting.first().copied(),
            Strategy::Batch { .. } => None,
        }?;
        let hole = Hole {
            first: self.next_expected,
            last: smallest - 1,
        };
        self.next_expected = smallest;
        match &mut self.strategy {
            Strategy::Stream { ring, waiting } => {
                while !self.ended && waiting.first() == Some(&self.next_expected) {
                    waiting.pop_first();
                    ring.release(self.next_expected, out);
                    advance(&mut self.next_expected, &mut self.ended);
                }
            }
            _ => self.end_of_read(out),
        }
        Some(hole)
    }

    /// End of a session: releases everything still waiting in order, skipping the holes,
    /// reporting each skipped range to `on_hole`.
    pub fn finish(&mut self, out: &mut OrderedBatch, mut on_hole: impl FnMut(Hole)) {
        if let Strategy::Batch { .. } = self.strategy {
            self.release_batch(out);
            return;
        }
        self.end_of_read(out);
        while let Some(hole) = self.skip_hole(out) {
            on_hole(hole);
        }
    }

    /// Forgets everything for a new session that expects `first_seq` first.
    pub fn reset(&mut self, first_seq: u64) {
        self.next_expected = first_seq;
        self.ended = false;
        match &mut self.strategy {
            Strategy::Heap { ring, heap } => {
                ring.clear();
                heap.clear();
            }
            Strategy::Stream { ring, waiting } => {
                ring.clear();
                waiting.clear();
            }
            Strategy::Batch {
                buffer,
                arena,
                last_released,
                order_violations,
            } => {
                buffer.clear();
                arena.clear();
                *last_released = first_seq - 1;
                *order_violations = 0;
            }
        }
    }

    fn release_batch(&mut self, out: &mut OrderedBatch) {
        let Strategy::Batch {
            buffer,
            arena,
            last_released,
            order_violations,
        } = &mut self.strategy
        else {
            return;
        };
        if buffer.is_empty() {
            return;
        }
        buffer.sort_by_key(|(event, _, _)| event.seq);
        let mut contiguous = true;
        let mut previous: Option<u64> = None;
        for (event, start, len) in buffer.iter() {
            if previous == Some(event.seq) {
                continue; // duplicate inside the buffer: the first one wins
            }
            let expected = previous.unwrap_or(*last_released) + 1;
            if event.seq != expected {
                contiguous = false;
            }
            previous = Some(event.seq);
            let start = *start as usize;
            out.push(*event, &arena[start..start + *len as usize]);
        }
        if !contiguous {
            *order_violations += 1;
        }
        if let Some(last) = previous {
            *last_released = last;
            self.next_expected = last;
            advance(&mut self.next_expected, &mut self.ended);
        }
        buffer.clear();
        arena.clear();
    }
}

/// Moves `next_expected` past a released event; at `u64::MAX` the sequence has ended instead
/// (seqs never wrap).
#[inline]
fn advance(next_expected: &mut u64, ended: &mut bool) {
    if *next_expected == u64::MAX {
        *ended = true;
    } else {
        *next_expected += 1;
    }
}

/// Releases the contiguous run from `next_expected` into `out`.
///
/// The run is found by walking the ring (every waiting event sits in the slot of its seq), not
/// by popping the heap one event at a time; the released seqs are then the heap's smallest
/// keys, removed in one go when that is cheaper.
#[inline]
fn release_run(
    ring: &mut Ring,
    heap: &mut BinaryHeap<Reverse<u64>>,
    next_expected: &mut u64,
    ended: &mut bool,
    out: &mut OrderedBatch,
) {
    let mut released = 0;
    while !*ended && ring.release(*next_expected, out) {
        advance(next_expected, ended);
        released += 1;
    }
    let next = *next_expected;
    if released == heap.len() || *ended {
        heap.clear();
    } else if released * 4 >= heap.len() {
        heap.retain(|&Reverse(seq)| seq >= next);
    } else {
        for _ in 0..released {
            heap.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventKind;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Broadcast,
            from: 0,
            to: 0,
        }
    }

    fn payload(seq: u64) -> Vec<u8> {
        format!("{seq}|B").into_bytes()
    }

    /// A small deterministic generator (xorshift) so tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Harness-style arrival: contiguous batches of 1..=max, each shuffled.
    fn harness_order(total: u64, max: u64, rng: &mut Rng) -> Vec<Vec<u64>> {
        let mut reads = Vec::new();
        let mut next = 1;
        while next <= total {
            let size = (1 + rng.below(max)).min(total - next + 1);
            let mut batch: Vec<u64> = (next..next + size).collect();
            for i in (1..batch.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                batch.swap(i, j);
            }
            next += size;
            reads.push(batch);
        }
        reads
    }

    fn run(kind: ResequencerKind, capacity: u64, reads: &[Vec<u64>]) -> (Vec<u64>, Resequencer) {
        let mut reseq = Resequencer::new(kind, capacity, 1);
        let mut out = OrderedBatch::default();
        for read in reads {
            for &seq in read {
                reseq.offer(event(seq), &payload(seq), &mut out);
            }
            reseq.end_of_read(&mut out);
        }
        reseq.finish(&mut out, |_| {});
        let seqs = out.seqs().collect();
        for e in out.events() {
            assert_eq!(
                out.notification(e),
                format!("{}|B\n", e.event.seq).as_bytes()
            );
        }
        (seqs, reseq)
    }

    #[test]
    fn random_permutations_within_the_window_come_out_in_order() {
        for seed in 1..20 {
            let mut rng = Rng(seed * 7919);
            let reads = harness_order(5_000, 100, &mut rng);
            for kind in [ResequencerKind::Heap, ResequencerKind::Stream] {
                let (seqs, reseq) = run(kind, 128, &reads);
                assert_eq!(
                    seqs,
                    (1..=5_000).collect::<Vec<_>>(),
                    "{kind:?} seed {seed}"
                );
                assert_eq!(reseq.waiting(), 0);
            }
        }
    }

    #[test]
    fn reads_that_cut_shuffled_batches_come_out_in_order() {
        // Like the recorded harness order read 100 lines at a time: reads end inside
        // batches, so end_of_read releases part of what waits (retain and pop paths).
        for (seed, read_len) in [(3, 100), (4, 37), (5, 7), (6, 1)] {
            let mut rng = Rng(seed * 104_729);
            let arrival: Vec<u64> = harness_order(20_000, 100, &mut rng).concat();
            let reads: Vec<Vec<u64>> = arrival.chunks(read_len).map(|c| c.to_vec()).collect();
            let (seqs, reseq) = run(ResequencerKind::Heap, 256, &reads);
            assert_eq!(
                seqs,
                (1..=20_000).collect::<Vec<_>>(),
                "reads of {read_len}"
            );
            assert_eq!(reseq.waiting(), 0);
        }
    }

    #[test]
    fn released_per_read_exactly_the_contiguous_run() {
        let mut reseq = Resequencer::new(ResequencerKind::Heap, 16, 1);
        let mut out = OrderedBatch::default();
        for seq in [3, 2, 5] {
            assert_eq!(
                reseq.offer(event(seq), &payload(seq), &mut out),
                Admission::Accepted
            );
        }
        reseq.end_of_read(&mut out);
        assert!(out.is_empty());
        reseq.offer(event(1), &payload(1), &mut out);
        reseq.end_of_read(&mut out);
        assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(reseq.waiting(), 1);
        assert_eq!(reseq.next_expected(), 4);
    }

    #[test]
    fn duplicates_late_events_and_out_of_window_are_refused() {
        for kind in [ResequencerKind::Heap, ResequencerKind::Stream] {
            let mut reseq = Resequencer::new(kind, 8, 1);
            let mut out = OrderedBatch::default();
            assert_eq!(reseq.offer(event(3), b"3|B", &mut out), Admission::Accepted);
            assert_eq!(
                reseq.offer(event(3), b"3|B|dup", &mut out),
                Admission::Duplicate
            );
            assert_eq!(
                reseq.offer(event(9), b"9|B", &mut out),
                Admission::BeyondWindow
            );
            assert_eq!(reseq.offer(event(8), b"8|B", &mut out), Admission::Accepted);
            assert_eq!(reseq.offer(event(1), b"1|B", &mut out), Admission::Accepted);
            assert_eq!(reseq.offer(event(2), b"2|B", &mut out), Admission::Accepted);
            reseq.end_of_read(&mut out);
            assert_eq!(
                reseq.offer(event(2), b"2|B", &mut out),
                Admission::AlreadyDelivered
            );
            assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 2, 3], "{kind:?}");
            // The first copy of 3 won.
            assert_eq!(out.notification(&out.events()[2]), b"3|B\n");
            let mut holes = Vec::new();
            reseq.finish(&mut out, |h| holes.push(h));
            assert_eq!(holes, vec![Hole { first: 4, last: 7 }]);
            assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 2, 3, 8]);
        }
    }

    #[test]
    fn skip_hole_releases_what_follows() {
        let mut reseq = Resequencer::new(ResequencerKind::Heap, 100, 1);
        let mut out = OrderedBatch::default();
        for seq in [1, 4, 5, 7] {
            reseq.offer(event(seq), &payload(seq), &mut out);
        }
        reseq.end_of_read(&mut out);
        assert_eq!(reseq.skip_hole(&mut out), Some(Hole { first: 2, last: 3 }));
        assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 4, 5]);
        assert_eq!(reseq.skip_hole(&mut out), Some(Hole { first: 6, last: 6 }));
        assert_eq!(reseq.skip_hole(&mut out), None);
        assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 4, 5, 7]);
    }

    #[test]
    fn one_read_longer_than_the_window_is_not_refused() {
        // Regression: the heap released only at the end of a read, so inside one large read
        // the window was measured from a stale next expected seq and in-window events were
        // refused as beyond it.
        let mut read: Vec<u64> = (1..=5_000).collect();
        read.swap(0, 1);
        for kind in [ResequencerKind::Heap, ResequencerKind::Stream] {
            let (seqs, _) = run(kind, 100, &[read.clone()]);
            assert_eq!(seqs, (1..=5_000).collect::<Vec<_>>(), "{kind:?}");
        }
    }

    #[test]
    fn full_reversal_inside_the_window() {
        let reads = vec![(1..=1000).rev().collect::<Vec<u64>>()];
        for kind in [ResequencerKind::Heap, ResequencerKind::Stream] {
            let (seqs, _) = run(kind, 1000, &reads);
            assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ring_slots_are_reused_across_wraps() {
        let mut rng = Rng(42);
        let reads = harness_order(100_000, 100, &mut rng);
        let (seqs, _) = run(ResequencerKind::Heap, 100, &reads);
        assert_eq!(seqs.len(), 100_000);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn batch_is_correct_when_disorder_stays_inside_buffers() {
        // Shuffled blocks of exactly the buffer size: never crosses a boundary.
        let mut rng = Rng(5);
        let mut reads = Vec::new();
        for block in 0..50u64 {
            let mut seqs: Vec<u64> = (block * 64 + 1..=block * 64 + 64).collect();
            for i in (1..seqs.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                seqs.swap(i, j);
            }
            reads.push(seqs);
        }
        let (seqs, reseq) = run(ResequencerKind::Batch, 64, &reads);
        assert_eq!(seqs, (1..=3200).collect::<Vec<_>>());
        assert_eq!(reseq.order_violations(), 0);
    }

    #[test]
    fn batch_counts_order_violations_when_windows_cross_buffer_boundaries() {
        // Event 5 arrives after the first buffer (1,2,3,4,6,7,8,9) was released.
        let reads = vec![
            vec![1, 2, 3, 4, 6, 7, 8, 9],
            vec![5, 10, 11, 12, 13, 14, 15, 16],
        ];
        let (seqs, reseq) = run(ResequencerKind::Batch, 8, &reads);
        assert_eq!(
            seqs,
            vec![1, 2, 3, 4, 6, 7, 8, 9, 5, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(reseq.order_violations(), 2);
    }

    #[test]
    fn batch_drops_duplicates_inside_a_buffer() {
        let reads = vec![vec![2, 1, 2, 3]];
        let (seqs, reseq) = run(ResequencerKind::Batch, 4, &reads);
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(reseq.order_violations(), 0);
    }

    #[test]
    fn reset_starts_a_new_session() {
        let mut reseq = Resequencer::new(ResequencerKind::Heap, 16, 1);
        let mut out = OrderedBatch::default();
        reseq.offer(event(2), b"2|B", &mut out);
        reseq.reset(1);
        assert_eq!(reseq.waiting(), 0);
        reseq.offer(event(1), b"1|B", &mut out);
        reseq.offer(event(2), b"2|B", &mut out);
        reseq.end_of_read(&mut out);
        assert_eq!(out.seqs().collect::<Vec<_>>(), vec![1, 2]);
    }

    fn released_seqs(batch: &OrderedBatch) -> Vec<u64> {
        batch.events().iter().map(|e| e.event.seq).collect()
    }

    #[test]
    fn seq_u64_max_is_released_and_nothing_wraps_after_it() {
        for kind in [
            ResequencerKind::Heap,
            ResequencerKind::Stream,
            ResequencerKind::Batch,
        ] {
            let max = u64::MAX;
            let mut reseq = Resequencer::new(kind, 4, max - 2);
            let mut out = OrderedBatch::default();
            for seq in [max, max - 2, max - 1] {
                assert_eq!(
                    reseq.offer(event(seq), &payload(seq), &mut out),
                    Admission::Accepted
                );
            }
            reseq.end_of_read(&mut out);
            reseq.finish(&mut out, |hole| panic!("no hole expected: {hole:?}"));
            assert_eq!(released_seqs(&out), vec![max - 2, max - 1, max], "{kind:?}");
            assert!(reseq.ended(), "{kind:?}");
            for seq in [0, 1, max] {
                assert_eq!(
                    reseq.offer(event(seq), &payload(seq), &mut out),
                    Admission::AlreadyDelivered
                );
            }
            reseq.reset(1);
            assert!(!reseq.ended());
        }
    }

    #[test]
    fn waiting_bytes_are_bounded_and_the_next_expected_is_always_taken() {
        for kind in [ResequencerKind::Heap, ResequencerKind::Stream] {
            let mut reseq = Resequencer::new(kind, 1000, 1).with_max_bytes(20);
            let mut out = OrderedBatch::default();
            let long = vec![b'x'; 8];
            assert_eq!(reseq.offer(event(2), &long, &mut out), Admission::Accepted);
            assert_eq!(reseq.offer(event(3), &long, &mut out), Admission::Accepted);
            assert_eq!(
                reseq.offer(event(4), &long, &mut out),
                Admission::OverByteLimit
            );
            assert_eq!(reseq.waiting_bytes(), 16);
            assert_eq!(reseq.offer(event(1), &long, &mut out), Admission::Accepted);
            reseq.end_of_read(&mut out);
            assert_eq!(released_seqs(&out), vec![1, 2, 3], "{kind:?}");
            assert_eq!(reseq.waiting_bytes(), 0);
        }
        let mut batch = Resequencer::new(ResequencerKind::Batch, 1000, 1).with_max_bytes(20);
        let mut out = OrderedBatch::default();
        for seq in 1..=3 {
            batch.offer(event(seq), &[b'x'; 8], &mut out);
        }
        assert_eq!(
            released_seqs(&out),
            vec![1, 2],
            "released early at the byte bound"
        );
    }
}
