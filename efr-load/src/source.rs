//! The event source: takes the workload's batches in order, hands each batch's deliverable
//! events to every client reader, then writes the batch to the server in one go.
//!
//! The hand-off comes first so that a reader always knows a notification before the server
//! can send it. The source blocks in two places only, both after the previous batch was fully
//! written, so it cannot deadlock with a correct server: on TCP backpressure while writing,
//! and when [`Shared::inflight`] batches or [`Shared::pending_notifications`] expectations
//! are still held by readers whose clients lag (the memory bound). Both waits give up when the run is aborted.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::flow::{Chunk, Shared};
use super::security::Link;
use super::workload::Workload;

/// How often a blocked write or a wait for released batches looks at the abort flag.
pub const SOURCE_POLL: Duration = Duration::from_millis(50);

/// Most batches handed to a reader that it has not yet taken: the readers count a batch's
/// notifications only when they take it, so this keeps the pending-notification bound exact
/// within a few batches.
pub const MAX_UNTAKEN_BATCHES: usize = 32;

/// What the source did.
#[derive(Debug, Default)]
pub struct SourceOutcome {
    /// Event lines written.
    pub events: u64,
    /// Writes (batches).
    pub batches: u64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Source settings.
#[derive(Debug, Clone, Copy)]
pub struct SourceSettings {
    /// Paced sending, events per second.
    pub rate: Option<f64>,
    /// Most batches in flight before the source waits.
    pub max_inflight: usize,
    /// Most expected notifications not yet received before the source waits.
    pub max_pending: u64,
}

fn write_all_abortable(stream: &mut Link, mut buf: &[u8], shared: &Shared) -> Result<(), String> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err("event source connection closed by the server".into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if shared.aborted() {
                    return Err("aborted while writing".into());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("event source write failed: {e}")),
        }
    }
    Ok(())
}

/// Sends the TLS records still pending and closes the write side (close_notify first).
fn close_abortable(stream: &mut Link, shared: &Shared) {
    loop {
        match stream.close_write() {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) && !shared.aborted() => {}
            _ => return,
        }
    }
}

/// Runs the source to the end of the workload, then closes the write side of the connection,
/// and returns the connection, to be dropped once the readers are done: over TLS the server
/// sends the source session tickets it never reads, and closing a socket with unread bytes
/// resets the connection, which makes the server's kernel discard the events it has not read
/// yet. Dropping `readers` at the end tells the readers that no more expectations will come.
pub fn run_source(
    workload: &mut dyn Workload,
    mut stream: Link,
    readers: Vec<flume::Sender<Arc<Chunk>>>,
    shared: Arc<Shared>,
    settings: SourceSettings,
) -> (SourceOutcome, Link) {
    let _ = shared.source_thread.set(std::thread::current());
    let mut out = SourceOutcome::default();
    if let Err(e) = stream.tcp.set_write_timeout(Some(SOURCE_POLL)) {
        out.error = Some(format!("event source socket: {e}"));
        return (out, stream);
    }
    let _ = stream.tcp.set_nodelay(true);
    let mut chunk_no = 0u64;
    let mut pace_start_ns = None;
    loop {
        while shared.inflight.load(Ordering::Acquire) >= settings.max_inflight && !shared.aborted()
        {
            std::thread::park_timeout(SOURCE_POLL);
        }
        if shared.aborted() {
            out.error.get_or_insert_with(|| "aborted".into());
            break;
        }
        let batch = match workload.next_batch() {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("workload: {e:#}"));
                shared.abort.store(true, Ordering::Relaxed);
                break;
            }
        };
        let mut written_ns = shared.now_ns();
        if let Some(rate) = settings.rate {
            let start = *pace_start_ns.get_or_insert(written_ns);
            let due = start + (out.events as f64 / rate * 1e9) as u64;
            if due > written_ns {
                std::thread::sleep(Duration::from_nanos(due - written_ns));
            }
            written_ns = due;
        }
        if out.batches == 0 {
            shared
                .first_write_ns
                .store(shared.now_ns().max(1), Ordering::Relaxed);
        }
        if !batch.model.events.is_empty() {
            let chunk = Chunk::new(chunk_no, batch.model, &shared);
            chunk_no += 1;
            chunk.written_ns.store(written_ns, Ordering::Release);
            for r in &readers {
                let _ = r.send(chunk.clone());
            }
        }
        if let Err(e) = write_all_abortable(&mut stream, &batch.wire, &shared) {
            out.error = Some(e);
            shared.abort.store(true, Ordering::Relaxed);
            break;
        }
        out.batches += 1;
        out.events += batch.wire_events;
        shared
            .events_written
            .fetch_add(batch.wire_events, Ordering::Relaxed);
        shared
            .bytes_sent
            .fetch_add(batch.wire.len() as u64, Ordering::Relaxed);
    }
    close_abortable(&mut stream, &shared);
    shared.source_done.store(true, Ordering::Release);
    drop(readers);
    (out, stream)
}
