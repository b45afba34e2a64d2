//! The sequencer: accepts the event source (one at a time), reads and parses its lines,
//! puts events back in order, and sends each read's ordered run to every shard as one shared
//! batch. At source close it delivers what is left (skipping holes), then tells the shards to
//! end the session.
//!
//! Backpressure: the shard channels are bounded; when a shard falls behind, the send waits on
//! executor 0's room doorbell (rung by the shard as it takes commands, see [`crate::channel`]),
//! the sequencer stops reading, and TCP pushes back on the source.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use std::os::fd::OwnedFd;

use glommio::net::TcpStream;

use crate::auth::source_allowed;
use crate::batch::{BatchPool, OrderedBatch};
use crate::channel;
use crate::line::{Line, LineSplitter};
use crate::listener;
use crate::notify::{Latch, Notify};
use crate::protocol::{parse_event, EventKind, LineError};
use crate::reactor::reactor_pass;
use crate::resequencer::{Admission, Resequencer};
use crate::router::Ownership;
use crate::shard::{SessionFinished, ShardCommand};
use crate::shared::Shared;
use crate::stats::{excerpt, Counters, Fault};
use crate::tls::{self, PeerStream};

/// Events a new batch has room for before it grows (a 64 KiB read holds about 4,000).
const BATCH_CAPACITY_HINT: usize = 4096;
/// Batches the pool remembers beyond the shard queue depth (those being applied right now).
const BATCH_POOL_SLACK: usize = 4;

/// The sequencer of one server: lives on executor 0.
pub struct Sequencer {
    /// Server-wide configuration and counters.
    pub shared: Arc<Shared>,
    /// Command channel of each shard.
    pub shards: Vec<channel::Outbox<ShardCommand>>,
    /// Set when the server stops.
    pub stop: Rc<Latch>,
    /// Whether a source session is running.
    pub session_active: Cell<bool>,
    /// When sessions resume (a cluster ingest with `--resume`): the seq the next session starts
    /// at. A closing source then neither skips holes nor resets; what waited for a hole is
    /// dropped for the source to send again. None: every session starts at
    /// `--sequence-index` + 1 and ends with a reset.
    pub resume_at: Cell<Option<u64>>,
    /// Notified when a session ends (`session_active` turns false).
    pub session_ended: Notify,
    /// Whether [`log_finished_sessions`] logs each session's end once the shards have written
    /// out their clients' output (false when no shard runs here, as on a cluster ingest).
    pub finished_sessions_reported: Cell<bool>,
    /// Which shard owns which user, to send each batch only where it matters.
    ownership: Ownership,
}

/// Per-read tallies, added to the shared counters once per read.
#[derive(Default)]
struct ReadTally {
    received: u64,
    malformed: u64,
    unparseable: u64,
    too_long: u64,
    duplicate: u64,
    already_delivered: u64,
    beyond_window: u64,
    over_byte_limit: u64,
}

impl Sequencer {
    /// A sequencer sending to `shards`.
    pub fn new(
        shared: Arc<Shared>,
        shards: Vec<channel::Outbox<ShardCommand>>,
        stop: Rc<Latch>,
    ) -> Self {
        Sequencer {
            ownership: Ownership::new(shards.len()),
            shared,
            shards,
            stop,
            session_active: Cell::new(false),
            resume_at: Cell::new(None),
            session_ended: Notify::default(),
            finished_sessions_reported: Cell::new(false),
        }
    }

    /// Sends a command to every shard, in shard order.
    pub async fn broadcast(&self, make: impl Fn() -> ShardCommand) {
        for shard in &self.shards {
            shard.send(make()).await;
        }
    }

    /// Sends the batch to the shards it concerns (in shard order), so that a shard is not
    /// woken for a batch it would apply as a no-op.
    async fn send_batch(&self, batch: Arc<OrderedBatch>, pool: &mut BatchPool) {
        pool.remember(&batch);
        if batch.is_empty() {
            return;
        }
        let concerned = ConcernedShards::of(&batch, &self.ownership, self.shards.len());
        Counters::add(&self.shared.counters.events_delivered, batch.len() as u64);
        Counters::add(
            &self.shared.counters.batch_deliveries,
            concerned.count(self.shards.len()),
        );
        for (index, shard) in self.shards.iter().enumerate() {
            if concerned.includes(index) {
                shard.send(ShardCommand::Batch(batch.clone())).await;
            }
        }
    }
}

/// The shards that have something to do for a batch (`Router::apply`): for a follow the
/// owners of both users (edge, notification), an unfollow the follower's owner, a private
/// message the recipient's, and every shard for a status update (followers live anywhere) or
/// a broadcast. Single-event batches, where this matters, wake one or two executors instead
/// of all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConcernedShards {
    All,
    /// Bit i: shard i (used when there are at most 64 shards).
    Some(u64),
}

impl ConcernedShards {
    fn of(batch: &OrderedBatch, ownership: &Ownership, shards: usize) -> Self {
        // One receiver (a single shard, or an ingest's publisher, which must see every seq)
        // gets everything; past 64 shards the mask does not fit.
        if shards <= 1 || shards > 64 {
            return ConcernedShards::All;
        }
        let all = if shards == 64 {
            u64::MAX
        } else {
            (1u64 << shards) - 1
        };
        let mut mask = 0u64;
        for batched in batch.events() {
            let event = batched.event;
            match event.kind {
                EventKind::Status | EventKind::Broadcast => return ConcernedShards::All,
                EventKind::Follow => {
                    mask |= 1 << ownership.owner(event.from);
                    mask |= 1 << ownership.owner(event.to);
                }
                EventKind::Unfollow => mask |= 1 << ownership.owner(event.from),
                EventKind::Private => mask |= 1 << ownership.owner(event.to),
                EventKind::Malformed => {}
            }
            if mask == all {
                return ConcernedShards::All;
            }
        }
        ConcernedShards::Some(mask)
    }

    fn includes(self, shard: usize) -> bool {
        match self {
            ConcernedShards::All => true,
            ConcernedShards::Some(mask) => mask & (1 << shard) != 0,
        }
    }

    fn count(self, shards: usize) -> u64 {
        match self {
            ConcernedShards::All => shards as u64,
            ConcernedShards::Some(mask) => u64::from(mask.count_ones()),
        }
    }
}

/// Accepts event sources until the stop signal; refuses a second one while one is connected.
pub async fn run(accepted: channel::Receiver<OwnedFd>, sequencer: Rc<Sequencer>) {
    let mut accepted = accepted.attach();
    loop {
        let Some(stream) = listener::next_connection(&mut accepted, &sequencer.stop).await else {
            break;
        };
        let allowed = &sequencer.shared.config.source_allow;
        if !allowed.is_empty() {
            let peer = stream.peer_addr().map(|addr| addr.ip()).ok();
            if !peer.is_some_and(|ip| source_allowed(allowed, ip)) {
                Counters::add(&sequencer.shared.counters.sources_refused_address, 1);
                sequencer.shared.faults.warn(Fault::SourceAddress, || {
                    let from =
                        peer.map_or_else(|| "an unknown address".into(), |ip| ip.to_string());
                    format!("refusing an event source from {from}: outside --source-allow")
                });
                drop(stream);
                continue;
            }
        }
        if sequencer.session_active.get() {
            Counters::add(&sequencer.shared.counters.sources_refused, 1);
            sequencer.shared.faults.warn(Fault::Refused, || {
                "refusing a second event source: one is already connected".to_string()
            });
            drop(stream);
            continue;
        }
        sequencer.session_active.set(true);
        let sequencer = sequencer.clone();
        glommio::spawn_local(async move {
            if let Some(stream) = secure(stream, &sequencer).await {
                session(stream, sequencer).await;
            } else {
                sequencer.session_active.set(false);
            }
        })
        .detach();
    }
}

/// The source's connection after its TLS handshake (if the event port speaks TLS), or `None`
/// when the handshake failed or did not finish within the handshake timeout.
async fn secure(stream: TcpStream, sequencer: &Sequencer) -> Option<PeerStream> {
    let shared = &sequencer.shared;
    let Some(tls) = &shared.config.tls else {
        return Some(PeerStream::Plain(stream));
    };
    let deadline = Instant::now() + shared.config.handshake_timeout;
    match tls::accept_within(stream, tls.for_sources(), deadline).await {
        Ok(stream) => Some(stream),
        Err(error) => {
            Counters::add(&shared.counters.sources_tls_failed, 1);
            shared.faults.warn(Fault::Tls, || {
                format!("refusing an event source: TLS handshake failed: {error}")
            });
            None
        }
    }
}

/// How a read ended.
enum ReadOutcome {
    Data(usize),
    Closed,
    GapTimeout,
    /// Nothing arrived for `--source-idle-timeout-ms`.
    Idle,
    Stopped,
}

/// One event source session, from connect to close.
async fn session(mut stream: PeerStream, sequencer: Rc<Sequencer>) {
    let shared = sequencer.shared.clone();
    let config = &shared.config;
    let counters = &shared.counters;
    Counters::add(&counters.sessions, 1);
    tracing::info!("event source connected");
    let mut splitter = LineSplitter::new(config.max_line);
    let mut pool = BatchPool::new(
        config.shard_queue_depth + BATCH_POOL_SLACK,
        BATCH_CAPACITY_HINT,
    );
    let mut reseq = Resequencer::new(
        config.resequencer,
        config.resequencer_capacity,
        sequencer.resume_at.get().unwrap_or(config.first_seq()),
    )
    .with_max_bytes(config.resequencer_max_bytes);
    let mut stalled_since: Option<(u64, Instant)> = None;
    let mut stopped = false;
    loop {
        // The gap timer runs while events wait and the next expected seq does not move.
        let gap_wait = match (config.gap_timeout, &mut stalled_since) {
            (Some(gap), stalled) => {
                if reseq.waiting() == 0 {
                    *stalled = None;
                    None
                } else {
                    let next = reseq.next_expected();
                    match stalled {
                        Some((seq, since)) if *seq == next => {
                            Some(gap.saturating_sub(since.elapsed()))
                        }
                        _ => {
                            *stalled = Some((next, Instant::now()));
                            Some(gap)
                        }
                    }
                }
            }
            (None, _) => None,
        };
        let outcome = read_some(&mut stream, &mut splitter, &sequencer, gap_wait).await;
        let mut shared_batch = pool.take();
        let Some(batch) = Arc::get_mut(&mut shared_batch) else {
            unreachable!("the pool hands out batches nobody else holds");
        };
        match outcome {
            ReadOutcome::Data(n) => {
                batch.stamp_released(crate::latency::now_ns());
                splitter.commit(n);
                process_lines(&shared, &mut splitter, &mut reseq, batch);
            }
            ReadOutcome::GapTimeout => {
                batch.stamp_released(crate::latency::now_ns());
                if let Some(hole) = reseq.skip_hole(batch) {
                    record_hole(&shared, hole.first, hole.last, "gap timeout");
                }
                stalled_since = None;
            }
            ReadOutcome::Closed => break,
            ReadOutcome::Idle => {
                Counters::add(&counters.sources_idle_closed, 1);
                shared.faults.warn(Fault::SourceIdle, || {
                    format!(
                        "closing the event source: nothing received for {} ms (--source-idle-timeout-ms)",
                        config.source_idle_timeout.unwrap_or_default().as_millis()
                    )
                });
                break;
            }
            ReadOutcome::Stopped => {
                stopped = true;
                break;
            }
        }
        sequencer.send_batch(shared_batch, &mut pool).await;
        if reseq.ended() {
            break;
        }
        reactor_pass().await;
    }
    drop(stream);
    let ended_at_max_seq = reseq.ended();
    if ended_at_max_seq {
        Counters::add(&counters.sessions_ended_at_max_seq, 1);
        tracing::warn!(
            "event seq {} (u64::MAX) delivered: no seq can follow it, so the session ends now",
            u64::MAX
        );
    }
    if stopped {
        // Shutdown: what was in order has been delivered; the stop task ends the shards.
        tracing::info!("event source session stopped by shutdown");
        end_session(&sequencer);
        return;
    }
    let mut final_batch = pool.take();
    let Some(batch) = Arc::get_mut(&mut final_batch) else {
        unreachable!("the pool hands out batches nobody else holds");
    };
    // After seq u64::MAX the rest of the input is ignored, partial line included.
    if !ended_at_max_seq && splitter.has_partial_line() {
        let counter = if splitter.is_skipping() {
            &counters.lines_too_long
        } else {
            &counters.partial_lines
        };
        Counters::add(counter, 1);
        let partial = excerpt(splitter.partial());
        shared.faults.warn(Fault::PartialLine, || {
            format!("event source closed in the middle of a line; dropped \"{partial}\"")
        });
    }
    if sequencer.resume_at.get().is_some() {
        sequencer.resume_at.set(Some(reseq.next_expected()));
        tracing::info!(
            "event source closed; the next session resumes at seq {} ({} waiting events dropped)",
            reseq.next_expected(),
            reseq.waiting()
        );
        sequencer.session_active.set(false);
        return;
    }
    {
        batch.stamp_released(crate::latency::now_ns());
        reseq.finish(batch, |hole| {
            record_hole(&shared, hole.first, hole.last, "source closed")
        });
        let violations = reseq.order_violations();
        Counters::add(&counters.order_violations, violations);
    }
    sequencer.send_batch(final_batch, &mut pool).await;
    sequencer.broadcast(|| ShardCommand::EndSession).await;
    if sequencer.finished_sessions_reported.get() {
        tracing::info!("event source closed; writing out the clients' output");
    } else {
        log_session_ended(&shared);
    }
    end_session(&sequencer);
}

fn log_session_ended(shared: &Shared) {
    tracing::info!(
        "event source closed; session ended ({})",
        shared.counters.summary()
    );
}

/// Logs the end of each session, with the counters, once every one of the `shards` shards has
/// acknowledged it ([`crate::shard::SessionFinished`]): every client's output written out or
/// the client aborted at the deadline, so the notification and byte counters are final.
/// Sessions are logged in order; a shard still writing out an old session delays the log of
/// the later ones, never the sessions themselves.
pub async fn log_finished_sessions(
    shared: Arc<Shared>,
    finished: channel::Receiver<SessionFinished>,
    shards: usize,
) {
    let mut finished = finished.attach();
    // Acknowledgements of session `next + i` at index i.
    let mut acknowledged: VecDeque<usize> = VecDeque::new();
    let mut next: SessionFinished = 1;
    while let Some(session) = finished.recv().await {
        let Some(offset) = session.checked_sub(next) else {
            continue;
        };
        let offset = offset as usize;
        if acknowledged.len() <= offset {
            acknowledged.resize(offset + 1, 0);
        }
        acknowledged[offset] += 1;
        while acknowledged.front() == Some(&shards) {
            acknowledged.pop_front();
            next += 1;
            log_session_ended(&shared);
        }
    }
}

fn end_session(sequencer: &Sequencer) {
    sequencer.session_active.set(false);
    sequencer.session_ended.notify();
}

async fn read_some(
    stream: &mut PeerStream,
    splitter: &mut LineSplitter,
    sequencer: &Sequencer,
    gap_wait: Option<Duration>,
) -> ReadOutcome {
    let room = splitter.spare();
    let idle_timeout = sequencer.shared.config.source_idle_timeout;
    let read = async {
        let read = async {
            match stream.read(room).await {
                Ok(0) => ReadOutcome::Closed,
                Ok(n) => ReadOutcome::Data(n),
                Err(error) => {
                    tracing::warn!("event source read failed: {error}");
                    ReadOutcome::Closed
                }
            }
        };
        match idle_timeout {
            None => read.await,
            Some(idle) => {
                let idle = async {
                    glommio::timer::sleep(idle).await;
                    ReadOutcome::Idle
                };
                futures_lite::future::or(read, idle).await
            }
        }
    };
    let stop = async {
        sequencer.stop.wait().await;
        ReadOutcome::Stopped
    };
    match gap_wait {
        None => futures_lite::future::or(stop, read).await,
        Some(wait) => {
            let gap = async {
                glommio::timer::sleep(wait).await;
                ReadOutcome::GapTimeout
            };
            futures_lite::future::or(stop, futures_lite::future::or(read, gap)).await
        }
    }
}

fn record_hole(shared: &Shared, first: u64, last: u64, why: &str) {
    Counters::add(&shared.counters.holes_skipped, 1);
    Counters::add(&shared.counters.seqs_skipped, last - first + 1);
    shared.faults.warn(Fault::Hole, || {
        format!("skipping missing events {first}..={last} ({why})")
    });
}

/// Parses every complete line of the last read and offers it to the resequencer.
fn process_lines(
    shared: &Shared,
    splitter: &mut LineSplitter,
    reseq: &mut Resequencer,
    batch: &mut OrderedBatch,
) {
    let mut tally = ReadTally::default();
    while let Some(line) = splitter.next_line() {
        if reseq.ended() {
            // Nothing can follow seq u64::MAX; the session ends after this read.
            break;
        }
        tally.received += 1;
        let line = match line {
            Line::Complete(line) => line,
            Line::TooLong => {
                tally.too_long += 1;
                shared.faults.warn(Fault::TooLong, || {
                    format!(
                        "skipping an event line longer than --max-line ({})",
                        shared.config.max_line
                    )
                });
                continue;
            }
        };
        let event = match parse_event(line) {
            Ok(event) => event,
            Err(error) => {
                tally.unparseable += 1;
                shared.faults.warn(Fault::Unparseable, || match error {
                    LineError::Empty => "dropping an empty event line".to_string(),
                    LineError::BadSeq => format!(
                        "dropping an event line without a valid seq: \"{}\"",
                        excerpt(line)
                    ),
                });
                continue;
            }
        };
        if event.kind == EventKind::Malformed {
            tally.malformed += 1;
            shared.faults.warn(Fault::Malformed, || {
                format!(
                    "malformed event, its seq is consumed as a no-op: \"{}\"",
                    excerpt(line)
                )
            });
        }
        let admission = reseq.offer(event, line, batch);
        match admission {
            Admission::Accepted => {}
            Admission::Duplicate => {
                tally.duplicate += 1;
                shared.faults.warn(Fault::Duplicate, || {
                    format!(
                        "dropping a duplicate of waiting event {}: \"{}\"",
                        event.seq,
                        excerpt(line)
                    )
                });
            }
            Admission::AlreadyDelivered => {
                tally.already_delivered += 1;
                shared.faults.warn(Fault::Duplicate, || {
                    format!(
                        "dropping event {}: already delivered: \"{}\"",
                        event.seq,
                        excerpt(line)
                    )
                });
            }
            Admission::OverByteLimit => {
                tally.over_byte_limit += 1;
                shared.faults.warn(Fault::OverByteLimit, || {
                    format!(
                        "dropping event {}: the waiting events would pass \
                         --resequencer-max-bytes ({} bytes)",
                        event.seq, shared.config.resequencer_max_bytes
                    )
                });
            }
            Admission::BeyondWindow => {
                tally.beyond_window += 1;
                shared.faults.warn(Fault::BeyondWindow, || {
                    format!(
                        "dropping event {}: beyond the window of {} events after {}",
                        event.seq,
                        shared.config.resequencer_capacity,
                        reseq.next_expected()
                    )
                });
            }
        }
    }
    reseq.end_of_read(batch);
    let counters = &shared.counters;
    Counters::add(&counters.events_received, tally.received);
    Counters::add(&counters.events_malformed, tally.malformed);
    Counters::add(&counters.lines_unparseable, tally.unparseable);
    Counters::add(&counters.lines_too_long, tally.too_long);
    Counters::add(&counters.events_duplicate, tally.duplicate);
    Counters::add(&counters.events_already_delivered, tally.already_delivered);
    Counters::add(&counters.events_beyond_window, tally.beyond_window);
    Counters::add(&counters.events_over_byte_limit, tally.over_byte_limit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_event;

    fn batch(lines: &[&str]) -> OrderedBatch {
        let mut batch = OrderedBatch::with_capacity(lines.len());
        for line in lines {
            batch.push(parse_event(line.as_bytes()).unwrap(), line.as_bytes());
        }
        batch
    }

    fn owners(ownership: &Ownership, users: &[u64]) -> u64 {
        users
            .iter()
            .fold(0, |mask, &u| mask | 1 << ownership.owner(u))
    }

    #[test]
    fn a_batch_goes_only_to_the_shards_that_act_on_it() {
        let ownership = Ownership::new(8);
        let of = |lines: &[&str]| ConcernedShards::of(&batch(lines), &ownership, 8);
        assert_eq!(
            of(&["1|P|3|4"]),
            ConcernedShards::Some(owners(&ownership, &[4]))
        );
        assert_eq!(
            of(&["1|F|3|4"]),
            ConcernedShards::Some(owners(&ownership, &[3, 4]))
        );
        assert_eq!(
            of(&["1|U|3|4", "2|P|5|6"]),
            ConcernedShards::Some(owners(&ownership, &[3, 6]))
        );
        assert_eq!(of(&["1|P|3|4", "2|S|9"]), ConcernedShards::All);
        assert_eq!(of(&["1|B"]), ConcernedShards::All);
        assert_eq!(of(&["1|X|3"]), ConcernedShards::Some(0));
        let users: Vec<String> = (1..=200).map(|u| format!("{u}|P|1|{u}")).collect();
        let lines: Vec<&str> = users.iter().map(String::as_str).collect();
        assert_eq!(of(&lines), ConcernedShards::All, "every shard concerned");
        let one = ConcernedShards::of(&batch(&["1|P|3|4"]), &Ownership::new(1), 1);
        assert_eq!(one, ConcernedShards::All);
        assert_eq!(
            ConcernedShards::of(&batch(&["1|P|3|4"]), &Ownership::new(65), 65),
            ConcernedShards::All
        );
    }
}
