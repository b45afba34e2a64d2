//! The ordered batch: events released by the resequencer, in the order shards must apply them.
//!
//! One batch is built per source read and shared by every shard behind one `Arc` (no copy).
//! Payloads live in one byte buffer, each already followed by its `\n`, so a shard appends a
//! notification with a single `extend_from_slice`.

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
}

impl OrderedBatch {
    /// An empty batch with room for about `events` events.
    pub fn with_capacity(events: usize) -> Self {
        OrderedBatch {
            events: Vec::with_capacity(events),
            payloads: Vec::with_capacity(events * 16),
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

    /// Empties the batch and keeps its capacity, so one batch can be reused (as the
    /// benchmarks do) without allocating again.
    pub fn clear(&mut self) {
        self.events.clear();
        self.payloads.clear();
    }

    /// Sequence numbers in batch order (for tests and diagnostics).
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.events.iter().map(|e| e.event.seq)
    }
}
