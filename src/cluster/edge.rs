//! The edge's consumer: a thread that reads the whole stream in order and hands each message
//! to the local shards, as the sequencer of a single process would.
//!
//! It reads with an ordered consumer (no acknowledgements; the client recreates it after a gap
//! or missed heartbeats), one NATS connection per edge, pulls bounded to
//! `--nats-pull-messages` messages (so to that many times `--nats-message-bytes` bytes). A
//! batch message becomes one [`OrderedBatch`] shared by every shard; a reset message becomes
//! [`ShardCommand::EndSession`]. The edge checks that each batch starts right after the last
//! one it applied: an older one is dropped, a gap is logged and counted.
//!
//! At start the edge loads the newest follow-graph snapshot ([`store`](super::store)), applies
//! the graph changes of the stream messages after it up to the stream's last one, and hands
//! that graph to its shards before it reports ready (so before its client port accepts
//! anyone); then it reads on from there. A message that is not the next stream message (the
//! edge fell behind the stream's retention) closes its clients and rebuilds the graph from
//! the newest snapshot. The edge holding the snapshot lock writes a snapshot every
//! `--snapshot-interval-s` or `--snapshot-events`, collected from its shards in stream order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream;
use futures_lite::StreamExt;

use super::snapshot::GraphSnapshot;
use super::store::{Pointer, SnapshotStore, WriterLock};
use super::wire::{decode_events, Envelope, Kind};
use super::{connect, runtime_or_report, start_nats_thread, stop_requested};
use crate::batch::BatchPool;
use crate::channel;
use crate::protocol::EventKind;
use crate::shard::ShardCommand;
use crate::shared::Shared;
use crate::stats::{Counters, Fault};

/// Longest wait of one pull request before the server answers it (empty); also bounds how
/// long a lost pull (NATS restarted) goes unnoticed: the client misses two heartbeats, each
/// half of this, and asks again.
const PULL_EXPIRY: Duration = Duration::from_secs(2);
/// Pause before the consumer is created again after an error.
const RECREATE_PAUSE: Duration = Duration::from_millis(100);
/// Events a new batch has room for before it grows.
const BATCH_CAPACITY_HINT: usize = 4096;
/// Batches the pool remembers beyond the shard queue depth.
const BATCH_POOL_SLACK: usize = 4;

/// Hands a command to one shard, waiting while its channel is full. Every command the edge
/// sends a shard goes through here. Returns false when the shard is gone.
async fn deliver(shard: &channel::Sender<ShardCommand>, command: ShardCommand) -> bool {
    shard.send_async(command).await
}

/// Connects to NATS and starts the consumer thread, which feeds `shards` until the server
/// stops. Fails when NATS cannot be reached within `--nats-connect-timeout-ms`.
pub fn start(
    shared: Arc<Shared>,
    shards: Vec<channel::Sender<ShardCommand>>,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    let (thread, ()) =
        start_nats_thread("efr-nats-consume", "edge", shared, move |shared, ready| {
            run(shared, shards, ready)
        })?;
    Ok(thread)
}

fn run(
    shared: Arc<Shared>,
    shards: Vec<channel::Sender<ShardCommand>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let runtime = runtime_or_report(&ready)?;
    runtime.block_on(async move {
        let config = &shared.config;
        let opened = async {
            let (context, stream) = connect(&config.nats, &config.shutdown).await?;
            let snapshots = SnapshotStore::open(&context, &config.nats).await?;
            Ok::<_, String>((stream, snapshots))
        };
        let (stream, snapshots) = match opened.await {
            Ok(opened) => opened,
            Err(error) => {
                let _ = ready.send(Err(error.clone()));
                return Err(error);
            }
        };
        let holder = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos())
        );
        let mut edge = EdgeConsumer {
            pool: BatchPool::new(
                config.shard_queue_depth + BATCH_POOL_SLACK,
                BATCH_CAPACITY_HINT,
            ),
            shared: shared.clone(),
            shards,
            applied: None,
            next_stream_seq: 1,
            snapshots,
            lock: WriterLock::new(holder),
            was_writer: false,
            newest_snapshot: None,
            last_snapshot_at: std::time::Instant::now(),
            events_since_snapshot: 0,
        };
        if let Err(error) = edge.catch_up(&stream).await {
            let _ = ready.send(Err(error.clone()));
            return Err(error);
        }
        tracing::info!(
            "edge consuming stream {} from {} at message {}",
            config.nats.stream,
            config.nats.url,
            edge.next_stream_seq
        );
        let _ = ready.send(Ok(()));
        edge.consume(&stream).await;
        Ok(())
    })
}

/// What the consumer knows of the stream.
struct EdgeConsumer {
    shared: Arc<Shared>,
    shards: Vec<channel::Sender<ShardCommand>>,
    pool: BatchPool,
    /// Last event seq applied in the current session (None at start and after a reset).
    applied: Option<u64>,
    /// The stream sequence to read next.
    next_stream_seq: u64,
    /// The snapshot buckets.
    snapshots: SnapshotStore,
    /// This edge's claim on the snapshot writer's lock.
    lock: WriterLock,
    /// Whether this edge held the lock at its last look.
    was_writer: bool,
    /// The newest snapshot this edge knows of.
    newest_snapshot: Option<Pointer>,
    /// When this edge last wrote a snapshot (or started).
    last_snapshot_at: std::time::Instant,
    /// Events applied since then.
    events_since_snapshot: u64,
}

fn stream_name(stream: &stream::Stream) -> &str {
    &stream.cached_info().config.name
}

/// What a gap in the stream led to.
enum Rebuilt {
    /// The graph was rebuilt from a snapshot: read on from after it.
    Recreate,
    /// No snapshot covers the gap: apply the message that came.
    ApplyAnyway,
    /// The shards are gone.
    Stop,
}

/// Why reading stopped.
enum Ended {
    /// The server stops, or the shards are gone.
    Stop,
    /// The graph was rebuilt: create the consumer again from the next stream sequence.
    Rebuilt,
    /// The consumer failed; create it again from the next stream sequence.
    Recreate(String),
}

impl EdgeConsumer {
    fn stopping(&self) -> bool {
        self.shared.config.shutdown.load(Ordering::SeqCst)
    }

    /// Reads the stream until the server stops, creating the consumer again after errors.
    async fn consume(&mut self, stream: &stream::Stream) {
        loop {
            match self.consume_once(stream).await {
                Ended::Stop => return,
                Ended::Rebuilt => {}
                Ended::Recreate(error) => {
                    self.shared.faults.warn(Fault::Cluster, || {
                        format!(
                            "reading stream message {} failed ({error}); reading on from there",
                            self.next_stream_seq
                        )
                    });
                    tokio::time::sleep(RECREATE_PAUSE).await;
                }
            }
        }
    }

    async fn consume_once(&mut self, stream: &stream::Stream) -> Ended {
        let nats = &self.shared.config.nats;
        let deliver_policy = if self.next_stream_seq <= 1 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: self.next_stream_seq,
            }
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy,
                max_batch: nats.pull_messages as i64,
                max_expires: PULL_EXPIRY,
                ..Default::default()
            })
            .await;
        let consumer = match consumer {
            Ok(consumer) => consumer,
            Err(error) => return self.recreate_unless_stopping(error.to_string()),
        };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => return self.recreate_unless_stopping(error.to_string()),
        };
        // Idle, the thread sleeps until a message, a heartbeat of the consumer or the stop.
        let stop = stop_requested(self.shared.config.stop.clone());
        tokio::pin!(stop);
        loop {
            let next = tokio::select! {
                biased;
                () = &mut stop => return Ended::Stop,
                next = messages.next() => next,
            };
            let message = match next {
                None => return self.recreate_unless_stopping("the consumer ended".into()),
                Some(Err(error)) => return self.recreate_unless_stopping(error.to_string()),
                Some(Ok(message)) => message,
            };
            let stream_seq = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(error) => return self.recreate_unless_stopping(error.to_string()),
            };
            if stream_seq < self.next_stream_seq {
                // Delivered again (a recreated consumer): applied already.
                Counters::add(&self.shared.counters.nats_messages_stale, 1);
                continue;
            }
            if stream_seq > self.next_stream_seq {
                match self.rebuild_after_gap(stream, stream_seq).await {
                    Rebuilt::Recreate => return Ended::Rebuilt,
                    Rebuilt::Stop => return Ended::Stop,
                    Rebuilt::ApplyAnyway => {}
                }
            }
            self.next_stream_seq = stream_seq + 1;
            if !self
                .apply(stream_seq, message.headers.as_ref(), &message.payload)
                .await
            {
                return Ended::Stop;
            }
            let counters = &self.shared.counters;
            counters
                .nats_last_applied_stream_seq
                .store(stream_seq, Ordering::Relaxed);
            counters.nats_consumer_lag.store(
                message.info().map_or(0, |info| info.pending),
                Ordering::Relaxed,
            );
            if !self.snapshot_if_due().await {
                return Ended::Stop;
            }
        }
    }

    /// Builds the follow graph as of the stream's last message before any client can
    /// connect: the newest snapshot, then the graph changes of every message after it, read
    /// here (no client is connected yet, so no notification is due); hands the graph to the
    /// shards and reads on after it.
    async fn catch_up(&mut self, stream: &stream::Stream) -> Result<(), String> {
        let started = std::time::Instant::now();
        let counters = &self.shared.counters;
        // The snapshot's edges as they are; a set only once a message changes them.
        let mut loaded = Vec::new();
        let mut graph: Option<ahash::AHashSet<(u64, u64)>> = None;
        match self.snapshots.load_newest().await {
            Ok(Some((pointer, snapshot))) => {
                self.applied = snapshot.event_seq;
                self.next_stream_seq = snapshot.stream_seq + 1;
                Counters::add(&counters.snapshots_loaded, 1);
                counters
                    .snapshot_edges
                    .store(snapshot.edges.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    "loaded snapshot {} ({} edges, stream message {}, written {} ms ago)",
                    pointer.object,
                    snapshot.edges.len(),
                    snapshot.stream_seq,
                    pointer.age().as_millis()
                );
                self.newest_snapshot = Some(pointer);
                loaded = snapshot.edges;
            }
            Ok(None) => {}
            Err(error) => {
                // Without a snapshot the edge reads the stream from its first message; a gap
                // there is counted and logged.
                Counters::add(&counters.snapshot_failures, 1);
                self.shared.faults.warn(Fault::Cluster, || {
                    format!("starting without a snapshot: {error}")
                });
            }
        }
        let head = stream
            .get_info()
            .await
            .map_err(|error| format!("cannot read stream {}: {error}", stream_name(stream)))?
            .state
            .last_sequence;
        let mut caught_up = 0u64;
        while self.next_stream_seq <= head && !self.stopping() {
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: self.next_stream_seq,
                    },
                    max_batch: self.shared.config.nats.pull_messages as i64,
                    max_expires: PULL_EXPIRY,
                    ..Default::default()
                })
                .await
                .map_err(|error| format!("cannot read the stream to catch up: {error}"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|error| format!("cannot read the stream to catch up: {error}"))?;
            let mut batch = crate::batch::OrderedBatch::default();
            while self.next_stream_seq <= head {
                let message = match tokio::time::timeout(PULL_EXPIRY, messages.next()).await {
                    Ok(Some(Ok(message))) => message,
                    _ => break,
                };
                let Ok(info) = message.info() else { break };
                let stream_seq = info.stream_sequence;
                if stream_seq != self.next_stream_seq {
                    Counters::add(&counters.nats_stream_gaps, 1);
                    self.shared.faults.warn(Fault::Cluster, || {
                        format!(
                            "catching up: stream message {stream_seq} came after {}: the \
                             messages in between are gone and the graph misses their changes",
                            self.next_stream_seq - 1
                        )
                    });
                }
                self.next_stream_seq = stream_seq + 1;
                Counters::add(&counters.nats_messages_applied, 1);
                match Envelope::from_headers(message.headers.as_ref()).map(|e| e.kind) {
                    Ok(Kind::Reset) => {
                        loaded.clear();
                        graph = None;
                        self.applied = None;
                    }
                    Ok(Kind::Batch { last, .. }) => {
                        batch.clear();
                        decode_events(&message.payload, &mut batch);
                        for batched in batch.events() {
                            let event = batched.event;
                            if !matches!(event.kind, EventKind::Follow | EventKind::Unfollow) {
                                continue;
                            }
                            let graph = graph.get_or_insert_with(|| {
                                std::mem::take(&mut loaded).into_iter().collect()
                            });
                            match event.kind {
                                EventKind::Follow => {
                                    graph.insert((event.from, event.to));
                                }
                                EventKind::Unfollow => {
                                    graph.remove(&(event.from, event.to));
                                }
                                _ => {}
                            }
                        }
                        caught_up += batch.len() as u64;
                        self.applied = Some(last);
                    }
                    Err(_) => Counters::add(&counters.nats_messages_bad, 1),
                }
            }
        }
        let edges: Arc<Vec<(u64, u64)>> = Arc::new(match graph {
            Some(graph) => graph.into_iter().collect(),
            None => loaded,
        });
        if !self
            .broadcast(|| ShardCommand::ImportGraph(edges.clone()))
            .await
        {
            return Err("the shards are gone".into());
        }
        counters
            .nats_last_applied_stream_seq
            .store(self.next_stream_seq - 1, Ordering::Relaxed);
        Counters::add(&counters.nats_catch_up_events, caught_up);
        // Applied to the graph the shards now hold: delivered, as far as the stream goes.
        Counters::add(&counters.events_delivered, caught_up);
        tracing::info!(
            "graph of {} edges built in {} ms: caught up on {caught_up} events to stream \
             message {}",
            edges.len(),
            started.elapsed().as_millis(),
            self.next_stream_seq - 1
        );
        Ok(())
    }

    /// The consumer delivered `stream_seq` instead of the next message: the messages between
    /// are gone from the stream (this edge fell behind its retention). When the newest
    /// snapshot covers the hole: closes the clients (their notifications for the missing
    /// messages are lost for good, and the protocol has no replay), then rebuilds the graph as
    /// at start (the snapshot, then the graph changes of every message after it up to the
    /// stream's end, delivered to nobody) and reads on after that; a client that connects
    /// meanwhile receives the messages after the rebuild, on the rebuilt graph. Without such
    /// a snapshot: counts the gap and applies on.
    async fn rebuild_after_gap(&mut self, stream: &stream::Stream, stream_seq: u64) -> Rebuilt {
        let expected = self.next_stream_seq;
        let counters = &self.shared.counters;
        Counters::add(&counters.nats_stream_gaps, 1);
        let covering = match self.snapshots.pointer().await {
            Ok(Some((pointer, _))) => pointer.stream_seq + 1 >= stream_seq,
            _ => false,
        };
        if !covering {
            self.shared.faults.warn(Fault::Cluster, || {
                format!(
                    "stream message {stream_seq} came after {}: messages in between are gone \
                     and no snapshot covers them; applying on",
                    expected.saturating_sub(1)
                )
            });
            return Rebuilt::ApplyAnyway;
        }
        // Not rate-limited with the other cluster faults: each rebuild is worth its line, and
        // rebuilds cannot come faster than a rebuild takes.
        tracing::warn!(
            "stream message {stream_seq} came after {}: this edge fell behind the stream's \
             retention; closing its clients and rebuilding from the newest snapshot",
            expected.saturating_sub(1)
        );
        if !self.broadcast(|| ShardCommand::EndSession).await {
            return Rebuilt::Stop;
        }
        let started = std::time::Instant::now();
        match self.catch_up(stream).await {
            Ok(()) => {
                Counters::add(&self.shared.counters.snapshot_rebuilds, 1);
                tracing::info!(
                    "rebuilt the graph after falling behind in {} ms; serving clients from \
                     stream message {}",
                    started.elapsed().as_millis(),
                    self.next_stream_seq
                );
                Rebuilt::Recreate
            }
            Err(error) => {
                if self.stopping() {
                    return Rebuilt::Stop;
                }
                Counters::add(&self.shared.counters.snapshot_failures, 1);
                self.shared.faults.warn(Fault::Cluster, || {
                    format!("rebuilding from the newest snapshot failed ({error}); reading on")
                });
                Rebuilt::Recreate
            }
        }
    }

    /// Writes a snapshot when this edge holds the writer's lock and one is due. Returns false
    /// when the shards are gone.
    async fn snapshot_if_due(&mut self) -> bool {
        let nats = &self.shared.config.nats;
        let by_time = nats
            .snapshot_interval
            .is_some_and(|interval| self.last_snapshot_at.elapsed() >= interval);
        let by_count = nats
            .snapshot_events
            .is_some_and(|events| self.events_since_snapshot >= events);
        let applied_stream_seq = self.next_stream_seq - 1;
        let newer = self
            .newest_snapshot
            .as_ref()
            .is_none_or(|pointer| pointer.stream_seq < applied_stream_seq);
        let counters = &self.shared.counters;
        if let Some(pointer) = &self.newest_snapshot {
            counters
                .snapshot_age_ms
                .store(pointer.age().as_millis() as u64, Ordering::Relaxed);
        }
        let looking = self.lock.due(nats.snapshot_lock_ttl);
        let holding = self
            .lock
            .hold(&self.snapshots, nats.snapshot_lock_ttl)
            .await;
        if looking && !holding {
            // Another edge writes the snapshots: follow its pointer for the age gauge.
            if let Ok(Some((pointer, _))) = self.snapshots.pointer().await {
                self.newest_snapshot = Some(pointer);
            }
        }
        counters
            .snapshot_writer
            .store(holding as u64, Ordering::Relaxed);
        if holding && !self.was_writer {
            // The writer starts: clean up after earlier writers' cut-off puts.
            self.purge_orphan_chunks().await;
        }
        self.was_writer = holding;
        if !holding || !(by_time || by_count) || !newer || applied_stream_seq == 0 {
            return true;
        }
        self.last_snapshot_at = std::time::Instant::now();
        self.events_since_snapshot = 0;
        let (reply, replies) = flume::unbounded();
        if !self
            .broadcast(|| ShardCommand::ExportGraph(reply.clone()))
            .await
        {
            return false;
        }
        // Only the queued commands hold a sender now. A shard that took the server's stop
        // before this command ends without answering, and its command stays queued (this
        // thread still holds the channel's sender): the stop ends the wait.
        drop(reply);
        let stop = stop_requested(self.shared.config.stop.clone());
        tokio::pin!(stop);
        let mut edges = Vec::new();
        for _ in 0..self.shards.len() {
            let part = tokio::select! {
                biased;
                () = &mut stop => return false,
                part = replies.recv_async() => part,
            };
            match part {
                Ok(mut part) => edges.append(&mut part),
                Err(_) => return false,
            }
        }
        let started = std::time::Instant::now();
        let snapshot = GraphSnapshot::new(applied_stream_seq, self.applied, edges);
        match self.snapshots.write(&snapshot).await {
            Ok(Some(pointer)) => {
                Counters::add(&counters.snapshots_written, 1);
                counters
                    .snapshot_edges
                    .store(snapshot.edges.len() as u64, Ordering::Relaxed);
                counters.snapshot_age_ms.store(0, Ordering::Relaxed);
                tracing::info!(
                    "wrote snapshot {} ({} edges) in {} ms",
                    pointer.object,
                    snapshot.edges.len(),
                    started.elapsed().as_millis()
                );
                self.newest_snapshot = Some(pointer);
            }
            Ok(None) => {}
            Err(error) => {
                Counters::add(&counters.snapshot_failures, 1);
                self.shared
                    .faults
                    .warn(Fault::Cluster, || format!("snapshot not written: {error}"));
            }
        }
        self.purge_orphan_chunks().await;
        true
    }

    /// Purges the chunks of cut-off snapshot puts (see [`SnapshotStore::purge_orphan_chunks`]),
    /// once seen for the snapshot lock's lifetime.
    async fn purge_orphan_chunks(&self) {
        let grace = self.shared.config.nats.snapshot_lock_ttl;
        match self.snapshots.purge_orphan_chunks(grace).await {
            Ok(0) => {}
            Ok(purged) => {
                Counters::add(&self.shared.counters.snapshot_orphan_chunks_purged, purged);
                tracing::info!("purged {purged} chunks of cut-off snapshot puts");
            }
            Err(error) => self.shared.faults.warn(Fault::Cluster, || {
                format!("orphan chunks not purged: {error}")
            }),
        }
    }

    fn recreate_unless_stopping(&self, error: String) -> Ended {
        if self.stopping() {
            Ended::Stop
        } else {
            Ended::Recreate(error)
        }
    }

    /// Applies one stream message. Returns false when the shards are gone.
    async fn apply(
        &mut self,
        stream_seq: u64,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> bool {
        let counters = &self.shared.counters;
        let envelope = match Envelope::from_headers(headers) {
            Ok(envelope) => envelope,
            Err(error) => {
                Counters::add(&counters.nats_messages_bad, 1);
                self.shared.faults.warn(Fault::Cluster, || {
                    format!("skipping stream message {stream_seq}: {error}")
                });
                return true;
            }
        };
        let (first, last) = match envelope.kind {
            Kind::Reset => {
                self.applied = None;
                Counters::add(&counters.nats_messages_applied, 1);
                return self.broadcast(|| ShardCommand::EndSession).await;
            }
            Kind::Batch { first, last } => (first, last),
        };
        if let Some(applied) = self.applied {
            if last <= applied {
                Counters::add(&counters.nats_messages_stale, 1);
                self.shared.faults.warn(Fault::Cluster, || {
                    format!(
                        "dropping stream message {stream_seq}: seqs {first}..={last} were \
                         applied already (up to {applied})"
                    )
                });
                return true;
            }
            if first != applied + 1 {
                Counters::add(&counters.nats_stream_gaps, 1);
                self.shared.faults.warn(Fault::Cluster, || {
                    format!(
                        "stream message {stream_seq} covers seqs {first}..={last}, not the \
                         next after {applied}: applying it anyway"
                    )
                });
            }
        }
        let mut shared_batch = self.pool.take();
        let Some(batch) = Arc::get_mut(&mut shared_batch) else {
            unreachable!("the pool hands out batches nobody else holds");
        };
        batch.stamp_released(crate::latency::now_ns());
        let unparseable = decode_events(payload, batch);
        if unparseable > 0 {
            Counters::add(&counters.nats_messages_bad, 1);
            self.shared.faults.warn(Fault::Cluster, || {
                format!("stream message {stream_seq}: skipped {unparseable} unparseable lines")
            });
        }
        self.applied = Some(last);
        self.pool.remember(&shared_batch);
        Counters::add(&counters.nats_messages_applied, 1);
        if shared_batch.is_empty() {
            return true;
        }
        Counters::add(&counters.events_delivered, shared_batch.len() as u64);
        self.events_since_snapshot += shared_batch.len() as u64;
        Counters::add(&counters.batch_deliveries, self.shards.len() as u64);
        self.broadcast(|| ShardCommand::Batch(shared_batch.clone()))
            .await
    }

    async fn broadcast(&self, make: impl Fn() -> ShardCommand) -> bool {
        for shard in &self.shards {
            if !deliver(shard, make()).await {
                return false;
            }
        }
        true
    }
}
