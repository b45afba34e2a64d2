//! The ordered batch: events released by the resequencer, in the order shards must apply them.
//!
//! One batch is built per source read and shared by every shard behind one `Arc` (no copy).
//! Payloads live in one byte buffer, each already followed by its `\n`, so a shard appends a
//! notification with a single `extend_from_slice`.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::Event;

/// An event in a batch, with where its payload sits in the batch's byte buffer.
#[derive(Clone, Copy, Debug)]
pub struct BatchedEvent {
    /// The parsed event.
    pub event: Event,
    payload_start: u32,
    payload_len: u32,
}

/// Events in the order shards apply them, with their payload bytes.
#[derive(Debug, Default)]
pub struct OrderedBatch {
    events: Vec<BatchedEvent>,
    payloads: Vec<u8>,
    /// When its events were released ([`crate::latency::now_ns`]); 0 if never stamped.
    released_ns: u64,
}

impl OrderedBatch {
    /// An empty batch with room for about `events` events.
    pub fn with_capacity(events: usize) -> Self {
        OrderedBatch {
            events: Vec::with_capacity(events),
            payloads: Vec::with_capacity(events * 16),
            released_ns: 0,
        }
    }

    /// Appends an event; `payload` is the line as received, without terminator.
    #[inline]
    pub fn push(&mut self, event: Event, payload: &[u8]) {
        let payload_start = self.payloads.len() as u32;
        self.payloads.extend_from_slice(payload);
        self.payloads.push(b'\n');
        self.events.push(BatchedEvent {
            event,
            payload_start,
            payload_len: payload.len() as u32 + 1,
        });
    }

    /// The events, in order.
    #[inline]
    pub fn events(&self) -> &[BatchedEvent] {
        &self.events
    }

    /// The notification bytes of an event of this batch: its payload and `\n`.
    #[inline]
    pub fn notification(&self, event: &BatchedEvent) -> &[u8] {
        let start = event.payload_start as usize;
        &self.payloads[start..start + event.payload_len as usize]
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Empties the batch and keeps its capacity, so one batch can be reused without
    /// allocating again.
    pub fn clear(&mut self) {
        self.events.clear();
        self.payloads.clear();
        self.released_ns = 0;
    }

    /// Stamps the time its events were released (the source read, or an edge taking the
    /// stream message), for the delivery latency ([`crate::latency`]).
    pub fn stamp_released(&mut self, at_ns: u64) {
        self.released_ns = at_ns;
    }

    /// When its events were released; 0 if never stamped.
    pub fn released_ns(&self) -> u64 {
        self.released_ns
    }

    /// Sequence numbers in batch order (for tests and diagnostics).
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.events.iter().map(|e| e.event.seq)
    }
}

/// Recycles ordered batches, so the steady state allocates nothing per read.
///
/// The pool keeps a clone of the last batches it shared; once every shard has dropped its
/// clone (the pool's is then the only one), the batch is cleared and handed out again with its
/// capacity. A batch still held by a slow shard is simply left to be freed by it.
#[derive(Debug)]
pub struct BatchPool {
    shared: VecDeque<Arc<OrderedBatch>>,
    keep: usize,
    capacity_hint: usize,
}

impl BatchPool {
    /// A pool remembering up to `keep` shared batches; new batches get room for about
    /// `capacity_hint` events.
    pub fn new(keep: usize, capacity_hint: usize) -> Self {
        BatchPool {
            shared: VecDeque::with_capacity(keep + 1),
            keep,
            capacity_hint,
        }
    }

    /// An empty batch that nobody else holds (fill it with `Arc::get_mut`).
    pub fn take(&mut self) -> Arc<OrderedBatch> {
        if let Some(oldest) = self.shared.front_mut() {
            if let Some(batch) = Arc::get_mut(oldest) {
                batch.clear();
                if let Some(reused) = self.shared.pop_front() {
                    return reused;
                }
            }
        }
        Arc::new(OrderedBatch::with_capacity(self.capacity_hint))
    }

    /// Remembers a batch that is being shared, to reuse it once everyone dropped it.
    pub fn remember(&mut self, batch: &Arc<OrderedBatch>) {
        self.shared.push_back(batch.clone());
        if self.shared.len() > self.keep {
            self.shared.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Event, EventKind};

    fn event(seq: u64) -> Event {
        Event {
            seq,
            kind: EventKind::Broadcast,
            from: 0,
            to: 0,
        }
    }

    #[test]
    fn notifications_carry_the_payload_and_a_newline() {
        let mut batch = OrderedBatch::default();
        batch.push(event(1), b"1|B");
        batch.push(event(2), b"02|B");
        let texts: Vec<&[u8]> = batch
            .events()
            .iter()
            .map(|e| batch.notification(e))
            .collect();
        assert_eq!(texts, vec![&b"1|B\n"[..], b"02|B\n"]);
    }

    #[test]
    fn the_pool_reuses_a_batch_once_every_holder_dropped_it() {
        let mut pool = BatchPool::new(4, 16);
        let mut first = pool.take();
        Arc::get_mut(&mut first).unwrap().push(event(1), b"1|B");
        pool.remember(&first);
        let held_by_a_shard = first.clone();
        drop(first);
        // Still held: a fresh batch.
        let second = pool.take();
        assert!(!Arc::ptr_eq(&second, &held_by_a_shard));
        let address = Arc::as_ptr(&held_by_a_shard);
        drop(held_by_a_shard);
        // Released everywhere: the same allocation comes back, empty.
        let third = pool.take();
        assert_eq!(Arc::as_ptr(&third), address);
        assert!(third.is_empty());
    }
}
