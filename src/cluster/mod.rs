//! efr across machines: an ingest node and edge nodes joined by a NATS JetStream stream.
//!
//! The ingest ([`ingest`]) runs today's sequencer; its ordered batches go to a publisher
//! instead of shards, which appends them to the stream `<name>` (subject `<name>.ev`) as
//! messages of whole event lines ([`wire`]). Every edge ([`edge`]) reads the whole stream
//! with an ordered consumer, turns each message back into an ordered batch and hands it to
//! today's shards, which serve the clients. async-nats needs tokio: each node runs it on a
//! thread of its own with a current-thread runtime, bridged to the glommio executors by the
//! bounded flume channels the shards already use.

pub mod chain;
pub mod edge;
pub mod ingest;
pub mod snapshot;
pub mod store;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::config::NatsConfig;
use crate::stop::StopRequest;

/// Pause between two attempts to connect or to open the stream at start.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How often a waiter looks at the stop flag when the stop request has no pipe to wake it
/// (the pipe could not be made: out of descriptors at start).
const STOP_FLAG_FALLBACK_CHECK: Duration = Duration::from_millis(50);
/// Longest pause between two reconnection attempts to NATS.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// The server's default duplicate window (the stream's dedup of `Nats-Msg-Id`).
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long one JetStream request (publish acknowledgement, stream info) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The subject of a cluster's stream.
pub fn subject(config: &NatsConfig) -> String {
    format!("{}.ev", config.stream)
}

/// Resolves once the stop is requested: sleeps on the stop request's pipe, so a NATS thread
/// waiting for messages or commands wakes for the stop and for nothing else.
async fn stop_requested(stop: StopRequest) {
    if stop.is_requested() {
        return;
    }
    let waiter = stop
        .wake_fd()
        .and_then(|fd| fd.try_clone_to_owned().ok())
        // SAFETY: the descriptor is our own duplicate, owned by the AsyncFd and closed only
        // when it drops (after deregistering).
        .and_then(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok());
    if let Some(waiter) = waiter {
        // The request sets the flag before it writes the byte: readable means requested.
        let _ = waiter.readable().await;
    }
    fallback(&stop).await
}

/// [`stop_requested`] without a pipe.
async fn fallback(stop: &StopRequest) {
    while !stop.is_requested() {
        tokio::time::sleep(STOP_FLAG_FALLBACK_CHECK).await;
    }
}

/// A current-thread tokio runtime for a node's NATS thread.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The NATS thread's runtime; a failure to build it is also sent on `ready`, which the
/// starting thread waits on.
fn runtime_or_report<T>(ready: &Ready<T>) -> Result<tokio::runtime::Runtime, String> {
    runtime().map_err(|error| {
        let error = format!("cannot start the NATS runtime: {error}");
        let _ = ready.send(Err(error.clone()));
        error
    })
}

/// What a NATS thread reports once it is connected (or why it is not), and the thread.
type Ready<T> = std::sync::mpsc::Sender<Result<T, String>>;

/// Starts the NATS thread `name` of the role `role` running `run`, and waits until it reports
/// that it is connected (what it reports then is returned with the thread) or why it is not.
/// A thread that fails later logs why and requests the server's stop.
fn start_nats_thread<T: Send + 'static>(
    name: &str,
    role: &'static str,
    shared: std::sync::Arc<crate::shared::Shared>,
    run: impl FnOnce(std::sync::Arc<crate::shared::Shared>, Ready<T>) -> Result<(), String>
        + Send
        + 'static,
) -> std::io::Result<(std::thread::JoinHandle<Result<(), String>>, T)> {
    let (ready_sender, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = run(shared.clone(), ready_sender);
            if let Err(error) = &result {
                tracing::error!("{role} stops: {error}");
                shared.config.stop.request();
            }
            result
        })?;
    match ready.recv() {
        Ok(Ok(started)) => Ok((thread, started)),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(std::io::Error::other(error))
        }
        Err(_) => {
            let outcome = thread.join();
            Err(std::io::Error::other(format!(
                "the {name} thread ended at start: {outcome:?}"
            )))
        }
    }
}

/// Connects to NATS and makes sure the stream exists, giving up after the connect timeout or
/// at a stop.
async fn connect(
    config: &NatsConfig,
    stop: &AtomicBool,
) -> Result<(jetstream::Context, stream::Stream), String> {
    let deadline = Instant::now() + config.connect_timeout;
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .reconnect_delay_callback(|attempts| {
            (Duration::from_millis(20) * attempts.min(1_000) as u32).min(MAX_RECONNECT_DELAY)
        })
        .max_reconnects(None::<usize>);
    let client = loop {
        match options.clone().connect(config.url.as_str()).await {
            Ok(client) => break client,
            Err(error) => {
                if Instant::now() >= deadline || stop.load(Ordering::SeqCst) {
                    return Err(format!("cannot connect to NATS at {}: {error}", config.url));
                }
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
            }
        }
    };
    let context = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .max_ack_inflight(config.publish_in_flight)
        .backpressure_on_inflight(true)
        .build(client);
    let max_age = config.retention().unwrap_or(Duration::ZERO);
    let stream_config = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subject(config)],
        storage: stream::StorageType::File,
        max_age,
        max_bytes: config.max_bytes.map_or(-1, |bytes| bytes as i64),
        discard: stream::DiscardPolicy::Old,
        duplicate_window: if max_age.is_zero() {
            DEFAULT_DUPLICATE_WINDOW
        } else {
            max_age.min(DEFAULT_DUPLICATE_WINDOW)
        },
        ..Default::default()
    };
    loop {
        match context.get_or_create_stream(stream_config.clone()).await {
            Ok(stream) => return Ok((context, stream)),
            Err(error) => {
                if Instant::now() >= deadline || stop.load(Ordering::SeqCst) {
                    return Err(format!(
                        "cannot open the JetStream stream {} at {}: {error}",
                        config.stream, config.url
                    ));
                }
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
            }
        }
    }
}
