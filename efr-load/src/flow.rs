//! What the source writer and the client readers share: the run's clock, the batches in
//! flight (each one an `Arc<Chunk>` handed to every reader) with the bound that keeps memory
//! flat on long runs, the progress counters and the abort flag.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Instant;

use super::workload::ModelChunk;

/// State shared by every thread of a run.
#[derive(Debug)]
pub struct Shared {
    /// Time zero of the run; every timestamp is nanoseconds since it.
    pub epoch: Instant,
    /// Set to stop every thread early (all clients failed, or the source failed).
    pub abort: AtomicBool,
    /// Batches handed to the readers and not yet released by all of them.
    pub inflight: AtomicUsize,
    /// The source thread, unparked when a batch is released.
    pub source_thread: OnceLock<Thread>,
    /// Expected notifications not yet received (updated by the readers once per batch and
    /// once per read call).
    pub pending_notifications: AtomicU64,
    /// Event lines written so far.
    pub events_written: AtomicU64,
    /// Bytes written by the source.
    pub bytes_sent: AtomicU64,
    /// Notifications received and verified.
    pub notifications: AtomicU64,
    /// Bytes received by the clients.
    pub bytes_received: AtomicU64,
    /// Clients that failed verification.
    pub failed_clients: AtomicU64,
    /// Number of client connections.
    pub clients: u64,
    /// Time of the first write, ns (0 until then; stored +1 so 0 means unset).
    pub first_write_ns: AtomicU64,
    /// The source has written everything and closed its write side.
    pub source_done: AtomicBool,
}

impl Shared {
    /// New shared state for `clients` connections.
    pub fn new(clients: u64) -> Arc<Shared> {
        Arc::new(Shared {
            epoch: Instant::now(),
            abort: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            pending_notifications: AtomicU64::new(0),
            source_thread: OnceLock::new(),
            events_written: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            failed_clients: AtomicU64::new(0),
            clients,
            first_write_ns: AtomicU64::new(0),
            source_done: AtomicBool::new(false),
        })
    }

    /// Nanoseconds since the epoch.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// True when the run should stop.
    #[inline]
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// One batch's deliverable events as the readers see it.
#[derive(Debug)]
pub struct Chunk {
    /// Position in the run: 0, 1, 2, ...
    pub no: u64,
    /// Events, payloads.
    pub model: ModelChunk,
    /// When the batch that made these events deliverable was written (or, with `--rate`,
    /// scheduled), ns since the epoch.
    pub written_ns: AtomicU64,
    shared: Arc<Shared>,
}

impl Chunk {
    /// Wraps a model chunk, counting it in flight.
    pub fn new(no: u64, model: ModelChunk, shared: &Arc<Shared>) -> Arc<Chunk> {
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        Arc::new(Chunk {
            no,
            model,
            written_ns: AtomicU64::new(0),
            shared: shared.clone(),
        })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
        if let Some(t) = self.shared.source_thread.get() {
            t.unpark();
        }
    }
}
