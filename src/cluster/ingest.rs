//! The ingest's publisher: a thread that receives the sequencer's ordered batches (where a
//! single process has its shards) and appends them to the stream.
//!
//! Event lines are packed into messages of at most `--nats-message-bytes`, published when full
//! or `--nats-flush-us` after their first event. Up to `--nats-publish-in-flight` messages await
//! their acknowledgement; when one fails (NATS went away), every unacknowledged message is
//! published again, in order, one at a time, until NATS takes it: the message ids make the
//! stream keep each one once, and the chain header makes sure none overtakes a lost one.
//! Meanwhile the publisher's channel fills, the sequencer stops reading, and TCP pushes back on
//! the source. A publish the stream refuses because its last message is not ours means another
//! ingest wrote to it: this ingest stops with an error (fenced off).

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;

use super::wire::{Envelope, Kind, PayloadBuilder};
use super::{chain_end, connect, runtime, subject, STOP_CHECK};
use crate::server::Shared;
use crate::shard::ShardCommand;
use crate::stats::{Counters, Fault};

/// Pause after the first failed publish of a retried message; doubles up to
/// [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between two attempts to publish a message again.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A started publisher.
pub struct Publisher {
    /// Where the sequencer sends its batches (the ingest's only "shard").
    pub sender: flume::Sender<ShardCommand>,
    /// With `--resume`: the seq the first session starts at (after the stream's last batch).
    pub resume_at: Option<u64>,
    /// The publisher thread; its error says why the ingest must stop.
    pub thread: JoinHandle<Result<(), String>>,
}

/// Connects to NATS, reads where the stream ends, and starts the publisher thread. Fails when
/// NATS cannot be reached within `--nats-connect-timeout-ms`.
pub fn start(shared: Arc<Shared>) -> std::io::Result<Publisher> {
    let (sender, commands) = flume::bounded(shared.config.shard_queue_depth);
    let (ready_sender, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("efr-nats-publish".into())
        .spawn(move || {
            let result = run(shared.clone(), commands, ready_sender);
            if let Err(error) = &result {
                tracing::error!("ingest stops: {error}");
                shared.config.shutdown.store(true, Ordering::SeqCst);
            }
            result
        })?;
    match ready.recv() {
        Ok(Ok(resume_at)) => Ok(Publisher {
            sender,
            resume_at,
            thread,
        }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(std::io::Error::other(error))
        }
        Err(_) => {
            let outcome = thread.join();
            Err(std::io::Error::other(format!(
                "the publisher thread ended at start: {outcome:?}"
            )))
        }
    }
}

/// A publish's pending acknowledgement.
type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

type Ready = std::sync::mpsc::Sender<Result<Option<u64>, String>>;

fn run(
    shared: Arc<Shared>,
    commands: flume::Receiver<ShardCommand>,
    ready: Ready,
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
        let opened = async {
            let (context, stream) = connect(&config.nats, &config.shutdown).await?;
            let end = chain_end(&stream, &config.nats).await?;
            Ok::<_, String>((context, end))
        }
        .await;
        let (context, end) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                let _ = ready.send(Err(error.clone()));
                return Err(error);
            }
        };
        let resume_at = match (config.nats.resume, end) {
            (false, _) => None,
            (true, end) => Some(
                end.and_then(|end| end.next_event_seq())
                    .unwrap_or(config.first_seq()),
            ),
        };
        let mut publisher = ChainPublisher {
            shared: shared.clone(),
            context,
            subject: subject(&config.nats),
            last_number: end.map(|end| end.envelope.number),
            in_flight: VecDeque::with_capacity(config.nats.publish_in_flight),
        };
        if !config.nats.resume {
            if let Some(end) = end.filter(|end| end.envelope.kind != Kind::Reset) {
                // A new ingest without --resume starts a new session: every edge forgets
                // the previous one.
                tracing::info!(
                    "the stream ends inside a session (message {}): publishing a reset",
                    end.envelope.number
                );
                publisher.publish(Kind::Reset, Bytes::new()).await?;
            }
        }
        match resume_at {
            Some(seq) => tracing::info!("resuming: the next session starts at seq {seq}"),
            None => tracing::info!("ingest publishing to stream {}", config.nats.stream),
        }
        let _ = ready.send(Ok(resume_at));
        let first = resume_at.unwrap_or(config.first_seq());
        publisher.serve(commands, first).await
    })
}

/// A message published and not yet acknowledged.
struct Outgoing {
    envelope: Envelope,
    previous: Option<u64>,
    payload: Bytes,
}

/// Appends messages to the stream as a chain.
struct ChainPublisher {
    shared: Arc<Shared>,
    context: jetstream::Context,
    subject: String,
    /// Number of the last message handed to NATS.
    last_number: Option<u64>,
    /// Published, acknowledgement pending (None: the publish itself failed).
    in_flight: VecDeque<(Outgoing, Option<AckFuture>)>,
}

impl ChainPublisher {
    /// Publishes what the sequencer sends until a shutdown.
    async fn serve(
        &mut self,
        commands: flume::Receiver<ShardCommand>,
        first_seq: u64,
    ) -> Result<(), String> {
        let nats = &self.shared.config.nats;
        let flush_interval = nats.flush_interval;
        let mut builder = PayloadBuilder::new(nats.message_bytes, first_seq);
        let mut opened_at = Instant::now();
        loop {
            let wait = if builder.is_empty() {
                STOP_CHECK
            } else {
                flush_interval.saturating_sub(opened_at.elapsed())
            };
            let command = match tokio::time::timeout(wait, commands.recv_async()).await {
                Ok(Ok(command)) => command,
                Ok(Err(_)) => ShardCommand::Shutdown,
                Err(_) => {
                    if !builder.is_empty() && opened_at.elapsed() >= flush_interval {
                        self.seal(&mut builder).await?;
                    }
                    self.reap_acknowledged().await?;
                    continue;
                }
            };
            match command {
                ShardCommand::Batch(batch) => {
                    for event in batch.events() {
                        let line = batch.notification(event);
                        if builder.would_overflow(line.len()) {
                            self.seal(&mut builder).await?;
                        }
                        if builder.is_empty() {
                            opened_at = Instant::now();
                        }
                        builder.push(event.event.seq, line);
                    }
                    if builder.would_overflow(1) {
                        self.seal(&mut builder).await?;
                    }
                }
                ShardCommand::EndSession => {
                    self.seal(&mut builder).await?;
                    self.publish(Kind::Reset, Bytes::new()).await?;
                    builder.restart_at(self.shared.config.first_seq());
                }
                ShardCommand::Shutdown => {
                    self.seal(&mut builder).await?;
                    while !self.in_flight.is_empty() {
                        self.settle_oldest().await?;
                    }
                    tracing::info!(
                        "publisher stopped after message {}",
                        self.last_number.unwrap_or(0)
                    );
                    return Ok(());
                }
                ShardCommand::Register { .. } => {
                    unreachable!("the ingest registers no client")
                }
            }
        }
    }

    /// Publishes the open message, if it holds any event.
    async fn seal(&mut self, builder: &mut PayloadBuilder) -> Result<(), String> {
        if builder.is_empty() {
            return Ok(());
        }
        let (payload, kind) = builder.take();
        self.publish(kind, Bytes::from(payload)).await
    }

    /// Appends one message to the chain (waiting for the oldest acknowledgement when
    /// `--nats-publish-in-flight` are pending).
    async fn publish(&mut self, kind: Kind, payload: Bytes) -> Result<(), String> {
        let number = self.last_number.map_or(1, |n| n + 1);
        let outgoing = Outgoing {
            envelope: Envelope { number, kind },
            previous: self.last_number,
            payload,
        };
        self.last_number = Some(number);
        while self.in_flight.len() >= self.shared.config.nats.publish_in_flight {
            self.settle_oldest().await?;
        }
        let ack = self.send(&outgoing).await.ok();
        self.in_flight.push_back((outgoing, ack));
        Counters::add(&self.shared.counters.nats_messages_published, 1);
        Ok(())
    }

    async fn send(&self, outgoing: &Outgoing) -> Result<AckFuture, String> {
        let message = PublishMessage::build()
            .payload(outgoing.payload.clone())
            .headers(outgoing.envelope.headers(outgoing.previous));
        self.context
            .send_publish(self.subject.clone(), message)
            .await
            .map(IntoFuture::into_future)
            .map_err(|error| error.to_string())
    }

    /// Settles the acknowledgements that have already arrived.
    async fn reap_acknowledged(&mut self) -> Result<(), String> {
        while let Some((_, Some(ack))) = self.in_flight.front_mut() {
            match futures_lite::future::poll_once(ack).await {
                None => return Ok(()),
                Some(result) => {
                    let (outgoing, _) = self.in_flight.pop_front().expect("front exists");
                    if let Err(error) = result {
                        self.recover(outgoing, error.kind(), error.to_string())
                            .await?;
                    }
                }
            }
        }
        if matches!(self.in_flight.front(), Some((_, None))) {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest acknowledgement; on failure, publishes again from it.
    async fn settle_oldest(&mut self) -> Result<(), String> {
        let Some((outgoing, ack)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let failure = match ack {
            Some(ack) => match ack.await {
                Ok(_) => return Ok(()),
                Err(error) => (error.kind(), error.to_string()),
            },
            None => (PublishErrorKind::Other, "the publish failed".to_string()),
        };
        self.recover(outgoing, failure.0, failure.1).await
    }

    /// `failed` (the oldest unacknowledged message) failed: publish it and every later one
    /// again, in order, each until NATS takes it.
    async fn recover(
        &mut self,
        failed: Outgoing,
        kind: PublishErrorKind,
        error: String,
    ) -> Result<(), String> {
        if kind == PublishErrorKind::WrongLastMessageId {
            return Err(fenced(&failed, &error));
        }
        let shared = self.shared.clone();
        shared.faults.warn(Fault::Cluster, || {
            format!(
                "publishing message {} failed ({error}); publishing it and the {} after it again",
                failed.envelope.number,
                self.in_flight.len()
            )
        });
        let mut pending: Vec<Outgoing> = std::iter::once(failed)
            .chain(self.in_flight.drain(..).map(|(outgoing, _)| outgoing))
            .collect();
        for outgoing in pending.drain(..) {
            let mut pause = FIRST_RETRY_PAUSE;
            loop {
                Counters::add(&shared.counters.nats_publish_retries, 1);
                let outcome = match self.send(&outgoing).await {
                    Ok(ack) => ack.await.map_err(|error| (error.kind(), error.to_string())),
                    Err(error) => Err((PublishErrorKind::Other, error)),
                };
                match outcome {
                    Ok(_) => break,
                    Err((PublishErrorKind::WrongLastMessageId, error)) => {
                        return Err(fenced(&outgoing, &error));
                    }
                    Err((_, error)) => {
                        if shared.config.shutdown.load(Ordering::SeqCst) {
                            return Err(format!(
                                "stopping with message {} and later ones unpublished: {error}",
                                outgoing.envelope.number
                            ));
                        }
                        shared.faults.warn(Fault::Cluster, || {
                            format!(
                                "NATS does not take message {} yet ({error}); trying again",
                                outgoing.envelope.number
                            )
                        });
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    }
                }
            }
        }
        Ok(())
    }
}

fn fenced(outgoing: &Outgoing, error: &str) -> String {
    format!(
        "the stream refused message {} after message {:?} ({error}): another ingest has \
         written to it; this one is fenced off",
        outgoing.envelope.number, outgoing.previous
    )
}
