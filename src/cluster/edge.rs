//! The edge's consumer: a thread that reads the whole stream in order and hands each message
//! to the local shards, as the sequencer of a single process would.
//!
//! It reads with an ordered consumer (no acknowledgements; the client recreates it after a gap
//! or missed heartbeats), one NATS connection per edge, pulls bounded to
//! `--nats-pull-messages` messages (so to that many times `--nats-message-bytes` bytes). A
//! batch message becomes one [`OrderedBatch`] shared by every shard; a reset message becomes
//! [`ShardCommand::EndSession`]. The edge checks that each batch starts right after the last
//! one it applied: an older one is dropped, a gap is logged and counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream;
use futures_lite::StreamExt;

use super::wire::{decode_events, Envelope, Kind};
use super::{connect, runtime, STOP_CHECK};
use crate::batch::BatchPool;
use crate::server::Shared;
use crate::shard::ShardCommand;
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
async fn deliver(shard: &flume::Sender<ShardCommand>, command: ShardCommand) -> bool {
    shard.send_async(command).await.is_ok()
}

/// Connects to NATS and starts the consumer thread, which feeds `shards` until the server
/// stops. Fails when NATS cannot be reached within `--nats-connect-timeout-ms`.
pub fn start(
    shared: Arc<Shared>,
    shards: Vec<flume::Sender<ShardCommand>>,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    let (ready_sender, ready) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread = std::thread::Builder::new()
        .name("efr-nats-consume".into())
        .spawn(move || {
            let result = run(shared.clone(), shards, ready_sender);
            if let Err(error) = &result {
                tracing::error!("edge stops: {error}");
                shared.config.shutdown.store(true, Ordering::SeqCst);
            }
            result
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(std::io::Error::other(error))
        }
        Err(_) => {
            let outcome = thread.join();
            Err(std::io::Error::other(format!(
                "the consumer thread ended at start: {outcome:?}"
            )))
        }
    }
}

fn run(
    shared: Arc<Shared>,
    shards: Vec<flume::Sender<ShardCommand>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = format!("cannot start the NATS runtime: {error}");
            let _ = ready.send(Err(error.clone()));
            return Err(error);
        }
    };
    runtime.block_on(async move {
        let config = &shared.config;
        let stream = match connect(&config.nats, &config.shutdown).await {
            Ok((_, stream)) => stream,
            Err(error) => {
                let _ = ready.send(Err(error.clone()));
                return Err(error);
            }
        };
        tracing::info!(
            "edge consuming stream {} from {}",
            config.nats.stream,
            config.nats.url
        );
        let _ = ready.send(Ok(()));
        let mut edge = EdgeConsumer {
            pool: BatchPool::new(
                config.shard_queue_depth + BATCH_POOL_SLACK,
                BATCH_CAPACITY_HINT,
            ),
            shared: shared.clone(),
            shards,
            applied: None,
            next_stream_seq: 1,
        };
        edge.consume(&stream).await;
        Ok(())
    })
}

/// What the consumer knows of the stream.
struct EdgeConsumer {
    shared: Arc<Shared>,
    shards: Vec<flume::Sender<ShardCommand>>,
    pool: BatchPool,
    /// Last event seq applied in the current session (None at start and after a reset).
    applied: Option<u64>,
    /// The stream sequence to read next.
    next_stream_seq: u64,
}

/// Why reading stopped.
enum Ended {
    /// The server stops, or the shards are gone.
    Stop,
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
        loop {
            let next = match tokio::time::timeout(STOP_CHECK, messages.next()).await {
                Err(_) => {
                    if self.stopping() {
                        return Ended::Stop;
                    }
                    continue;
                }
                Ok(next) => next,
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
            self.next_stream_seq = stream_seq + 1;
            if !self
                .apply(stream_seq, message.headers.as_ref(), &message.payload)
                .await
            {
                return Ended::Stop;
            }
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
