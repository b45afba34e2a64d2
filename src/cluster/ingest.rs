//! The ingest's publisher: a thread that receives the sequencer's ordered batches (where a
//! single process has its shards) and appends them to the stream.
//!
//! Event lines are packed into messages of at most `--nats-message-bytes`, published when full
//! or `--nats-flush-us` after their first event. Up to `--nats-publish-in-flight` messages await
//! their acknowledgement; when one fails (NATS went away), every unacknowledged message is
//! published again, in order, one at a time, until NATS takes it: the message ids make the
//! stream keep each one once, and the expected last sequence makes sure none overtakes a lost
//! one (a refused message is looked up at the sequence it expected to get: if it is there, it
//! was stored before).
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
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;

use super::chain::{ChainEnd, ChainStore, Found};
use super::wire::{Envelope, Kind, PayloadBuilder, HEADER_MSG_ID};
use super::{connect, runtime_or_report, start_nats_thread, subject};
use crate::channel::ForeignReceiver;
use crate::shard::ShardCommand;
use crate::shared::Shared;
use crate::stats::{Counters, Fault};

/// Pause after the first failed publish of a retried message; doubles up to
/// [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between two attempts to publish a message again.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The chain end is saved this long after the publisher went quiet, and at most this often
/// while it publishes (see [`chain`](super::chain)).
const CHAIN_END_SAVE_DELAY: Duration = Duration::from_secs(1);

/// A started publisher.
pub struct Publisher {
    /// With `--resume`: the seq the first session starts at (after the stream's last batch).
    pub resume_at: Option<u64>,
    /// The publisher thread; its error says why the ingest must stop.
    pub thread: JoinHandle<Result<(), String>>,
}

/// Connects to NATS, reads where the stream ends, and starts the publisher thread, which
/// publishes what the sequencer sends on `commands` (the ingest's only "shard"; taking a
/// command rings the sequencer's room bell). Fails when NATS cannot be reached within
/// `--nats-connect-timeout-ms`.
pub fn start(
    shared: Arc<Shared>,
    commands: ForeignReceiver<ShardCommand>,
) -> std::io::Result<Publisher> {
    let (thread, resume_at) = start_nats_thread(
        "efr-nats-publish",
        "ingest",
        shared,
        move |shared, ready| run(shared, commands, ready),
    )?;
    Ok(Publisher { resume_at, thread })
}

/// A publish's pending acknowledgement.
type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

type Ready = super::Ready<Option<u64>>;

fn run(
    shared: Arc<Shared>,
    commands: ForeignReceiver<ShardCommand>,
    ready: Ready,
) -> Result<(), String> {
    let runtime = runtime_or_report(&ready)?;
    runtime.block_on(async move {
        let config = &shared.config;
        let opened = async {
            let (context, stream) = connect(&config.nats, &config.shutdown).await?;
            let chain = ChainStore::open(&context, &config.nats).await?;
            let last_stream_seq = stream
                .get_info()
                .await
                .map_err(|error| format!("cannot read stream {}: {error}", config.nats.stream))?
                .state
                .last_sequence;
            let found = chain.find(&stream, &config.nats, last_stream_seq).await?;
            let saved = chain.saved().await?;
            Ok::<_, String>((context, stream, chain, found, saved, last_stream_seq))
        }
        .await;
        let (context, stream, chain, found, saved, last_stream_seq) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                let _ = ready.send(Err(error.clone()));
                return Err(error);
            }
        };
        let end = match found {
            Found::Known(end) => end,
            Found::Lost {
                last_stream_seq,
                saved,
            } if config.nats.resume => {
                let error = format!(
                    "cannot resume: stream {} holds no message any more (its retention \
                     discarded them) and the saved chain end ({}) is not its last message \
                     (stream sequence {last_stream_seq}), so where the session ended is lost; \
                     start without --resume for a new session",
                    config.nats.stream,
                    saved.map_or_else(|| "none".to_string(), |end| end.encode())
                );
                let _ = ready.send(Err(error.clone()));
                return Err(error);
            }
            Found::Lost { .. } => None,
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
            stream,
            subject: subject(&config.nats),
            writer: writer_id(),
            last_number: end.map_or(0, |end| end.envelope.number),
            last_id: end.map(|end| end.envelope.msg_id()),
            next_stream_seq: last_stream_seq + 1,
            in_flight: VecDeque::with_capacity(config.nats.publish_in_flight),
            chain,
            acknowledged: end,
            // When the saved end is not the stream's (an ingest killed within a second of its
            // last publish, or a stream written before the end was kept), it is saved once
            // the publisher is quiet.
            saved,
            saved_at: Instant::now(),
        };
        if !config.nats.resume {
            // A new ingest without --resume starts a new session: every edge forgets the
            // previous one (also when the stream's messages expired: the edges still hold it).
            let open_session = match end {
                Some(end) => end.envelope.kind != Kind::Reset,
                None => last_stream_seq > 0,
            };
            if open_session {
                tracing::info!(
                    "the stream ends inside a session (stream message {last_stream_seq}): \
                     publishing a reset"
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

/// A random id for this ingest's messages, so that two ingests never write the same id.
fn writer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.finish()
}

/// A message published and not yet acknowledged.
struct Outgoing {
    envelope: Envelope,
    /// The stream sequence it gets when the stream takes it.
    stream_seq: u64,
    /// The id of the message before it, if any.
    previous_id: Option<String>,
    payload: Bytes,
}

/// Appends messages to the stream as a chain.
struct ChainPublisher {
    shared: Arc<Shared>,
    context: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject: String,
    /// This ingest's id in its messages' ids.
    writer: u64,
    /// Number of the last message handed to NATS (0: none yet).
    last_number: u64,
    /// Id of the last message of the stream (ours, once we published).
    last_id: Option<String>,
    /// The stream sequence the next message gets.
    next_stream_seq: u64,
    /// Published, acknowledgement pending (None: the publish itself failed).
    in_flight: VecDeque<(Outgoing, Option<AckFuture>)>,
    /// Where the saved chain end is kept.
    chain: ChainStore,
    /// The last message the stream acknowledged (or found at start).
    acknowledged: Option<ChainEnd>,
    /// The chain end last saved (or found at start).
    saved: Option<ChainEnd>,
    /// When it was saved.
    saved_at: Instant,
}

impl ChainPublisher {
    /// Publishes what the sequencer sends until a shutdown.
    async fn serve(
        &mut self,
        commands: ForeignReceiver<ShardCommand>,
        first_seq: u64,
    ) -> Result<(), String> {
        let nats = &self.shared.config.nats;
        let flush_interval = nats.flush_interval;
        let mut builder = PayloadBuilder::new(nats.message_bytes, first_seq);
        let mut opened_at = Instant::now();
        loop {
            // Idle (nothing open, nothing unacknowledged, the chain end saved), the thread
            // sleeps until the next command: no timer.
            let command = if !builder.is_empty() {
                let wait = flush_interval.saturating_sub(opened_at.elapsed());
                match tokio::time::timeout(wait, commands.recv_async()).await {
                    Ok(command) => command,
                    Err(_) => {
                        self.seal(&mut builder).await?;
                        self.reap_acknowledged().await?;
                        continue;
                    }
                }
            } else if let Some((_, ack)) = self.in_flight.front_mut() {
                let Some(ack) = ack.as_mut() else {
                    self.settle_oldest().await?;
                    continue;
                };
                tokio::select! {
                    biased;
                    command = commands.recv_async() => command,
                    result = ack => {
                        let (outgoing, _) = self.in_flight.pop_front().expect("front exists");
                        match result {
                            Ok(_) => self.acknowledge(&outgoing),
                            Err(error) => self.recover(outgoing, error.to_string()).await?,
                        }
                        self.reap_acknowledged().await?;
                        continue;
                    }
                }
            } else if self.acknowledged != self.saved {
                match tokio::time::timeout(CHAIN_END_SAVE_DELAY, commands.recv_async()).await {
                    Ok(command) => command,
                    Err(_) => {
                        self.save_chain_end().await;
                        continue;
                    }
                }
            } else {
                commands.recv_async().await
            };
            let command = command.unwrap_or(ShardCommand::Shutdown);
            if self.acknowledged != self.saved && self.saved_at.elapsed() >= CHAIN_END_SAVE_DELAY {
                self.save_chain_end().await;
            }
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
                    if self.acknowledged != self.saved {
                        self.save_chain_end().await;
                    }
                    tracing::info!("publisher stopped after message {}", self.last_number);
                    return Ok(());
                }
                ShardCommand::Register { .. }
                | ShardCommand::ExportGraph(_)
                | ShardCommand::ImportGraph(_) => {
                    unreachable!("the ingest registers no client and holds no graph")
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
        let number = self.last_number + 1;
        let outgoing = Outgoing {
            envelope: Envelope {
                number,
                writer: self.writer,
                kind,
            },
            stream_seq: self.next_stream_seq,
            previous_id: self.last_id.take(),
            payload,
        };
        self.last_id = Some(outgoing.envelope.msg_id());
        self.last_number = number;
        self.next_stream_seq += 1;
        while self.in_flight.len() >= self.shared.config.nats.publish_in_flight {
            self.settle_oldest().await?;
        }
        let ack = self.send(&outgoing, true).await.ok();
        self.in_flight.push_back((outgoing, ack));
        Counters::add(&self.shared.counters.nats_messages_published, 1);
        Ok(())
    }

    /// Publishes a message; `check_last_id`: expect the last message's id too (not only its
    /// stream sequence).
    async fn send(&self, outgoing: &Outgoing, check_last_id: bool) -> Result<AckFuture, String> {
        let last_id = outgoing.previous_id.as_deref().filter(|_| check_last_id);
        let message = PublishMessage::build()
            .payload(outgoing.payload.clone())
            .headers(outgoing.envelope.headers(outgoing.stream_seq - 1, last_id));
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
                    match result {
                        Ok(_) => self.acknowledge(&outgoing),
                        Err(error) => self.recover(outgoing, error.to_string()).await?,
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
                Ok(_) => {
                    self.acknowledge(&outgoing);
                    return Ok(());
                }
                Err(error) => error.to_string(),
            },
            None => "the publish failed".to_string(),
        };
        self.recover(outgoing, failure).await
    }

    /// `failed` (the oldest unacknowledged message) failed: publish it and every later one
    /// again, in order, each until NATS takes it (or refuses it for another ingest's message:
    /// fenced off).
    async fn recover(&mut self, failed: Outgoing, error: String) -> Result<(), String> {
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
            let mut check_last_id = true;
            loop {
                Counters::add(&shared.counters.nats_publish_retries, 1);
                let outcome = match self.send(&outgoing, check_last_id).await {
                    Ok(ack) => ack.await.map_err(|error| (error.kind(), error.to_string())),
                    Err(error) => Err((PublishErrorKind::Other, error)),
                };
                match outcome {
                    Ok(_) => {
                        self.acknowledge(&outgoing);
                        break;
                    }
                    Err((kind, error)) if is_chain_refusal(kind) => {
                        if self.is_stored(&outgoing).await? {
                            self.acknowledge(&outgoing);
                            break;
                        }
                        if check_last_id && self.follows_the_last_message(&outgoing).await? {
                            // nats-server forgot the last message id (a restart): the stream
                            // does end with our previous message, so the sequence suffices.
                            check_last_id = false;
                            continue;
                        }
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

impl ChainPublisher {
    /// The stream took `outgoing`: it is where the chain ends (acknowledgements come in
    /// order).
    fn acknowledge(&mut self, outgoing: &Outgoing) {
        self.acknowledged = Some(ChainEnd {
            envelope: outgoing.envelope,
            stream_seq: outgoing.stream_seq,
        });
    }

    /// Saves the last acknowledged message as the chain end; a failure is logged (the next
    /// save tries again).
    async fn save_chain_end(&mut self) {
        let Some(end) = self.acknowledged else { return };
        self.saved_at = Instant::now();
        match self.chain.save(&end).await {
            Ok(()) => {
                self.saved = Some(end);
                Counters::add(&self.shared.counters.nats_chain_end_saves, 1);
            }
            Err(error) => {
                Counters::add(&self.shared.counters.nats_chain_end_save_failures, 1);
                self.shared.faults.warn(Fault::Cluster, || error);
            }
        }
    }

    /// Whether the stream holds `outgoing` at the sequence it expected (stored by an earlier
    /// attempt whose acknowledgement was lost). An error reading it ends the ingest too: the
    /// chain cannot be trusted.
    async fn is_stored(&self, outgoing: &Outgoing) -> Result<bool, String> {
        let id = outgoing.envelope.msg_id();
        self.holds(outgoing, outgoing.stream_seq, Some(&id)).await
    }

    /// Whether the stream's message before `outgoing`'s sequence is the one it follows.
    async fn follows_the_last_message(&self, outgoing: &Outgoing) -> Result<bool, String> {
        if outgoing.stream_seq <= 1 || outgoing.previous_id.is_none() {
            return Ok(false);
        }
        match self.stream.get_raw_message(outgoing.stream_seq - 1).await {
            // Gone by the stream's retention: the expected last sequence alone fences off a
            // rival (it would have moved the sequence, and the next attempt is refused).
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(true),
            _ => {
                self.holds(
                    outgoing,
                    outgoing.stream_seq - 1,
                    outgoing.previous_id.as_deref(),
                )
                .await
            }
        }
    }

    /// Whether the stream holds a message with id `id` at `stream_seq`.
    async fn holds(
        &self,
        outgoing: &Outgoing,
        stream_seq: u64,
        id: Option<&str>,
    ) -> Result<bool, String> {
        match self.stream.get_raw_message(stream_seq).await {
            Ok(message) => Ok(message
                .headers
                .get(HEADER_MSG_ID)
                .map(|found| found.as_str())
                == id),
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(error) => Err(format!(
                "the stream refused message {} and cannot be read back: {error}",
                outgoing.envelope.number
            )),
        }
    }
}

/// Whether a publish was refused because the stream does not end where the message expected.
fn is_chain_refusal(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
    )
}

fn fenced(outgoing: &Outgoing, error: &str) -> String {
    format!(
        "the stream refused message {} at stream sequence {} ({error}): another ingest has \
         written to it; this one is fenced off",
        outgoing.envelope.number, outgoing.stream_seq
    )
}
