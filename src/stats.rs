//! The server's counters, and fault logging limited to one line a second per kind.
//!
//! Counters are plain relaxed atomics shared by every executor. The hot paths add to them once
//! per read or per batch, never once per event or per notification.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

macro_rules! counters {
    ($($name:ident: $kind:literal, $doc:literal;)*) => {
        /// Every counter of the server.
        #[derive(Debug, Default)]
        pub struct Counters {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        impl Counters {
            /// `(name, value)` for every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }

            /// `(name, kind, help)` for every counter: kind is `counter` or `gauge`.
            pub fn descriptions() -> &'static [(&'static str, &'static str, &'static str)] {
                &[$((stringify!($name), $kind, $doc),)*]
            }
        }
    };
}

counters! {
    sessions: "counter", "Event source sessions started.";
    sources_refused: "counter", "Event source connections refused because a source was already connected.";
    sources_refused_address: "counter", "Event source connections refused because their address is outside --source-allow.";
    sources_tls_failed: "counter", "Event sources whose TLS handshake failed (no or a wrong client certificate, not TLS) or timed out.";
    sources_idle_closed: "counter", "Event sources closed after sending nothing for --source-idle-timeout-ms.";
    events_received: "counter", "Event lines received (any content).";
    events_delivered: "counter", "Events released in order to the shards (malformed no-ops included).";
    events_malformed: "counter", "Lines whose seq parsed but whose rest did not; their seq was consumed as a no-op.";
    lines_unparseable: "counter", "Empty lines and lines whose seq does not parse; dropped.";
    lines_too_long: "counter", "Lines longer than the line limit; skipped.";
    partial_lines: "counter", "Unterminated last lines at source close; dropped.";
    events_already_delivered: "counter", "Events whose seq was already delivered or skipped; dropped.";
    events_duplicate: "counter", "Copies of a waiting event; dropped (the first one wins).";
    events_beyond_window: "counter", "Events beyond the resequencer window; dropped.";
    holes_skipped: "counter", "Holes in the sequence that were skipped (gap timeout or source close).";
    seqs_skipped: "counter", "Sequence numbers that never arrived and were skipped.";
    order_violations: "counter", "Releases of the batch resequencer not contiguous with the previous one.";
    batch_deliveries: "counter", "Ordered batches queued to shards (one per shard per batch).";
    batches_applied: "counter", "Ordered batches applied by shards (equal to batch_deliveries when shards are idle).";
    batches_dropped_at_shutdown: "counter", "Ordered batches a shard dropped because the shutdown deadline had passed.";
    notifications: "counter", "Notifications appended to client output.";
    bytes_written: "counter", "Bytes written to clients.";
    clients_accepted: "counter", "Client connections accepted.";
    clients_registered: "counter", "Clients that identified and were registered with their shard.";
    clients_open: "gauge", "Identified clients connected right now.";
    clients_refused_max: "counter", "Identified clients refused because --max-clients were open.";
    handshakes_open: "gauge", "Connections waiting for their id line right now.";
    handshakes_evicted: "counter", "Pending handshakes closed to make room for a new connection (--max-handshakes).";
    clients_bad_id: "counter", "Clients whose id line was not a u64.";
    clients_id_too_long: "counter", "Clients whose id line was longer than the line limit.";
    clients_handshake_timeout: "counter", "Clients that sent no id within the handshake timeout.";
    clients_tls_failed: "counter", "Clients whose TLS handshake failed or did not finish within the handshake timeout.";
    clients_token_missing: "counter", "Clients refused: client tokens are on and the id line held none.";
    clients_token_malformed: "counter", "Clients refused: a token that is not a well-formed JWT with sub and exp.";
    clients_token_bad_signature: "counter", "Clients refused: a token whose signature does not verify.";
    clients_token_expired: "counter", "Clients refused: a token whose exp has passed.";
    clients_token_other_user: "counter", "Clients refused: a valid token of another user.";
    clients_closed_by_peer: "counter", "Clients that closed (or reset) their connection.";
    clients_closed_backlog: "counter", "Clients closed because their unsent output passed --max-client-backlog.";
    clients_closed_write_error: "counter", "Clients closed after a write error.";
    clients_closed_session_end: "counter", "Clients closed at the end of an event source session.";
    clients_closed_shutdown: "counter", "Clients closed at shutdown.";
    nats_messages_published: "counter", "Ingest: stream messages published (batches and resets).";
    nats_publish_retries: "counter", "Ingest: publishes made again after a failure (NATS away).";
    nats_chain_end_saves: "counter", "Ingest: saves of where the chain ends (the key-value bucket <stream>-chain).";
    nats_chain_end_save_failures: "counter", "Ingest: failed saves of where the chain ends (the key-value bucket <stream>-chain).";
    nats_messages_applied: "counter", "Edge: stream messages applied (batches and resets).";
    nats_messages_stale: "counter", "Edge: stream messages dropped because their seqs were applied already.";
    nats_stream_gaps: "counter", "Edge: stream batches that did not start right after the last applied seq.";
    nats_messages_bad: "counter", "Edge: stream messages with bad headers or unparseable lines.";
    clients_closed_output_memory: "counter", "Clients closed, largest backlog first, because the pending output of all clients passed --max-output-memory.";
    clients_closed_write_timeout: "counter", "Clients closed because they accepted no byte for --write-timeout-ms while output waited.";
    clients_input_throttled: "counter", "Pauses of a client that sent more than --max-client-input-rate after its id line (reading stopped, TCP pushed back).";
    clients_half_closed: "counter", "Clients that shut their sending side after the id line; they go on receiving.";
    output_pending_bytes: "gauge", "Pending output of all clients (buffer capacity), bytes.";
    accept_errors: "counter", "Failed accept(2) calls (e.g. out of descriptors).";
    connections_shed: "counter", "Connections closed at once because the process was out of descriptors.";
    events_over_byte_limit: "counter", "Events dropped because the waiting events would pass --resequencer-max-bytes.";
    sessions_ended_at_max_seq: "counter", "Sessions ended because the event with seq u64::MAX was delivered.";
    metrics_requests: "counter", "Metrics requests answered (any status).";
    metrics_refused: "counter", "Metrics connections closed at once because --metrics-max-connections were open.";
    metrics_timeouts: "counter", "Metrics connections closed because no whole request arrived in time.";
    metrics_bad_requests: "counter", "Metrics requests for another path (404) or method (405), or unparseable (400).";
    stall_nudge_rounds: "counter", "Rounds of nudges written to every executor while the server was busy (--stall-nudge-ms).";
    executor_stall_rescues: "counter", "Nudges that found every executor asleep while ordered batches had waited unapplied: an executor parked with work queued, resumed by the nudge.";
    executor_stalls_unresolved: "counter", "Nudge rounds that found that state again right after a nudge: queued work the nudges do not resume (a lost wake-up, not a park).";
    open_file_limit: "gauge", "The soft open-file limit the server runs with.";
    nats_last_applied_stream_seq: "gauge", "Edge: the last stream message applied (or loaded from a snapshot).";
    nats_consumer_lag: "gauge", "Edge: stream messages after the last applied one, as the consumer last saw them.";
    nats_catch_up_events: "counter", "Edge: events after the snapshot whose graph changes were applied at start, before the client port opened.";
    snapshots_written: "counter", "Edge: follow-graph snapshots this edge wrote (as the snapshot lock's holder).";
    snapshots_loaded: "counter", "Edge: follow-graph snapshots loaded (at start, or after falling behind the stream).";
    snapshot_rebuilds: "counter", "Edge: rebuilds from a snapshot after the stream no longer held the next message.";
    snapshot_orphan_chunks_purged: "counter", "Edge: chunk messages of cut-off snapshot puts (named by no object) purged by the snapshot writer.";
    snapshot_failures: "counter", "Edge: snapshots that could not be written or loaded.";
    snapshot_writer: "gauge", "Edge: 1 while this edge holds the snapshot writer's lock.";
    snapshot_edges: "gauge", "Edge: follow edges in the last snapshot written or loaded.";
    snapshot_age_ms: "gauge", "Edge: age of the newest snapshot this edge wrote or loaded, in milliseconds.";
}

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Subtracts `n` from a gauge.
    #[inline]
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// One log-friendly line: `name=value` for every non-zero counter.
    pub fn summary(&self) -> String {
        let mut line = String::new();
        for (name, value) in self.snapshot() {
            if value != 0 {
                let _ = write!(line, "{name}={value} ");
            }
        }
        if line.is_empty() {
            return "every counter is zero".to_string();
        }
        line.trim_end().to_string()
    }
}

/// Kinds of fault whose log lines are rate limited separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Fault {
    /// A malformed event line.
    Malformed,
    /// An unparseable or empty line.
    Unparseable,
    /// An overlong line.
    TooLong,
    /// A partial last line.
    PartialLine,
    /// A duplicate or already delivered event.
    Duplicate,
    /// An event beyond the window.
    BeyondWindow,
    /// A skipped hole.
    Hole,
    /// A batch resequencer order violation.
    OrderViolation,
    /// A bad client handshake.
    Handshake,
    /// A client closed for its backlog.
    Backlog,
    /// A refused connection (second source, too many clients).
    Refused,
    /// A client write error.
    WriteError,
    /// A client that keeps sending after its id line.
    Flood,
    /// Clients closed for the server-wide output budget.
    OutputMemory,
    /// A client closed by the write deadline.
    WriteTimeout,
    /// A pending handshake closed to make room.
    HandshakeEvicted,
    /// A failed accept.
    Accept,
    /// A bad, slow or refused metrics request.
    Metrics,
    /// An event dropped for the resequencer's byte limit.
    OverByteLimit,
    /// A client token refused.
    Token,
    /// An event source from outside `--source-allow`.
    SourceAddress,
    /// An event source closed for idling.
    SourceIdle,
    /// A failed TLS handshake.
    Tls,
    /// A NATS publish or consume problem (cluster roles).
    Cluster,
    /// An executor found parked with work queued and resumed by a nudge.
    Stall,
}

const FAULT_KINDS: usize = Fault::Stall as usize + 1;

/// At most one log line a second per [`Fault`] kind; the rest are counted as suppressed.
#[derive(Debug)]
pub struct FaultLog {
    origin: Instant,
    last_ms: [AtomicU64; FAULT_KINDS],
    suppressed: [AtomicU64; FAULT_KINDS],
}

impl Default for FaultLog {
    fn default() -> Self {
        FaultLog {
            origin: Instant::now(),
            last_ms: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            suppressed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Longest excerpt of peer bytes put in a log line.
pub const EXCERPT_BYTES: usize = 64;

/// The first [`EXCERPT_BYTES`] of `bytes`, escaped so that any byte is printable.
pub fn excerpt(bytes: &[u8]) -> String {
    let mut text = String::new();
    for &byte in bytes.iter().take(EXCERPT_BYTES) {
        text.extend(std::ascii::escape_default(byte).map(char::from));
    }
    if bytes.len() > EXCERPT_BYTES {
        let _ = write!(text, "... ({} bytes)", bytes.len());
    }
    text
}

impl FaultLog {
    /// Logs `message` unless a line of this kind was logged less than a second ago.
    pub fn warn(&self, kind: Fault, message: impl FnOnce() -> String) {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        let last = &self.last_ms[kind as usize];
        let previous = last.load(Ordering::Relaxed);
        if previous != u64::MAX && now_ms < previous + 1000 {
            self.suppressed[kind as usize].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if last
            .compare_exchange(previous, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed[kind as usize].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed[kind as usize].swap(0, Ordering::Relaxed);
        let text = message();
        if suppressed > 0 {
            tracing::warn!("{text} ({suppressed} more of this kind not logged)");
        } else {
            tracing::warn!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_escaped_and_shortened() {
        assert_eq!(excerpt(b"1|B\r\x00\xff"), "1|B\\r\\x00\\xff");
        let long = vec![b'a'; 100];
        let text = excerpt(&long);
        assert!(text.starts_with(&"a".repeat(64)));
        assert!(text.ends_with("... (100 bytes)"));
    }

    #[test]
    fn fault_log_suppresses_within_a_second() {
        let log = FaultLog::default();
        let mut logged = 0;
        for _ in 0..5 {
            log.warn(Fault::Malformed, || {
                logged += 1;
                String::from("x")
            });
        }
        assert_eq!(logged, 1);
        assert_eq!(
            log.suppressed[Fault::Malformed as usize].load(Ordering::Relaxed),
            4
        );
    }

    #[test]
    fn summary_lists_non_zero_counters() {
        let counters = Counters::default();
        Counters::add(&counters.events_received, 3);
        assert_eq!(counters.summary(), "events_received=3");
    }
}
