//! Starting and stopping the server: binds the two listeners, starts one glommio executor per
//! shard, and wires the sequencer, the acceptor and the shards together.
//!
//! Executor 0 runs the sequencer, the client acceptor, the stop watcher and shard 0; executor
//! i > 0 runs shard i. [`start`] returns once the listeners are bound (so a test can use
//! ephemeral ports at once); [`run`] is `start`, stop on SIGINT/SIGTERM, then wait, as the
//! binary uses it.
//!
//! Every wait between threads goes through a [`crate::doorbell`]: each shard's command
//! channel, executor 0's room bell (a full shard channel), the accept threads' hand-off, and
//! the stop bell (rung by [`StopHandle::stop`], which SIGINT/SIGTERM and
//! [`RunningServer::stop`] call). An idle server has no timer armed and no thread that wakes.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::acceptor::{self, Acceptor};
use crate::channel::{self, Room};
use crate::config::{cpu_count, Config};
use crate::doorbell::{doorbell, BellReadEnd, Doorbell};
use crate::listener::{self, AcceptThread, ACCEPT_QUEUE_DEPTH};
use crate::metrics;
use crate::notify::Latch;
use crate::sequencer::{self, Sequencer};
use crate::shard::{self, ShardCommand};
use crate::stats::{Counters, FaultLog};

/// glommio's preemption timer, effectively off.
///
/// glommio 0.9 parks an executor whose task queue is still runnable when a latency-ring
/// completion that wakes no task is pending as it starts running tasks (`run_task_queues`
/// reads "preempted before running anything" as "nothing to run"; fixed in the community
/// fork, not on crates.io). The preemption timer's expiry is such a completion: measured here
/// as 10M-event runs stalling for seconds with batches queued in an idle shard, far more often
/// with a 1 ms period. The timer is re-armed every time the executor polls I/O, so with an
/// hour it never fires, and [`crate::doorbell`] explains why nothing else of efr's puts such a
/// completion on the latency ring. efr does not rely on preemption: its long-running tasks
/// (the sequencer and the shards) pass through the reactor explicitly while they have work
/// queued ([`crate::shard::reactor_pass`]).
const PREEMPT_TIMER: Duration = Duration::from_secs(3600);

/// What every executor shares: the configuration, the counters, the fault log.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The counters.
    pub counters: Counters,
    /// Rate-limited fault logging.
    pub faults: FaultLog,
}

/// A started server.
pub struct RunningServer {
    /// Where the event source connects.
    pub event_addr: SocketAddr,
    /// Where user clients connect.
    pub client_addr: SocketAddr,
    /// Where the metrics endpoint listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop_handle: StopHandle,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    accept_threads: Vec<AcceptThread>,
}

/// Stops a running server from any thread, or from a signal handler: sets the stop flag and
/// rings executor 0's stop bell (async-signal-safe: atomics and one `write(2)`).
#[derive(Clone, Debug)]
pub struct StopHandle {
    flag: Arc<std::sync::atomic::AtomicBool>,
    bell: Arc<Doorbell>,
}

impl StopHandle {
    /// Asks the server to stop.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.bell.ring();
    }
}

impl RunningServer {
    /// The server's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Asks the server to stop (as SIGTERM does).
    pub fn stop(&self) {
        self.stop_handle.stop();
    }

    /// A handle that stops the server from another thread or a signal handler.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop_handle.clone()
    }

    /// Waits until every executor has ended (after a stop), then ends the accept threads.
    pub fn wait(self) -> std::io::Result<()> {
        let mut result = Ok(());
        for executor in self.executors {
            if let Err(error) = executor.join() {
                result = Err(std::io::Error::other(format!("executor failed: {error}")));
            }
        }
        self.shared.config.shutdown.store(true, Ordering::SeqCst);
        for thread in &self.accept_threads {
            thread.interrupt();
        }
        for thread in self.accept_threads {
            thread.join();
        }
        result
    }

    /// Stops the server and waits for it.
    pub fn stop_and_wait(self) -> std::io::Result<()> {
        self.stop();
        self.wait()
    }
}

/// Binds the listeners and starts the executors.
pub fn start(config: Config) -> std::io::Result<RunningServer> {
    let event_listener = listener::bind(config.event_addr)?;
    let client_listener = listener::bind(config.client_addr)?;
    let event_addr = event_listener.local_addr()?;
    let client_addr = client_listener.local_addr()?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(listener::bind(addr)?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let cores = config.cores;
    let pinned = cores <= cpu_count();
    let shared = Arc::new(Shared {
        config,
        counters: Counters::default(),
        faults: FaultLog::default(),
    });
    // Executor 0 sends to every shard and waits on one room bell when a channel is full;
    // every shard rings it as it takes commands.
    let (room_bell, room_read_end) = doorbell()?;
    let mut senders = Vec::with_capacity(cores);
    let mut receivers = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (sender, receiver) = channel::bounded::<ShardCommand>(shared.config.shard_queue_depth)?;
        senders.push(sender);
        receivers.push(receiver.ringing_on_room(room_bell.clone()));
    }
    let (stop_bell, stop_read_end) = doorbell()?;
    let stop_handle = StopHandle {
        flag: shared.config.shutdown.clone(),
        bell: stop_bell,
    };
    let (event_sender, event_receiver) = channel::bounded(ACCEPT_QUEUE_DEPTH)?;
    let (client_sender, client_receiver) = channel::bounded(ACCEPT_QUEUE_DEPTH)?;
    let stop_flag = shared.config.shutdown.clone();
    let mut accept_threads = vec![
        AcceptThread::spawn(
            "efr-accept-events",
            event_listener,
            event_sender,
            stop_flag.clone(),
        )?,
        AcceptThread::spawn(
            "efr-accept-clients",
            client_listener,
            client_sender,
            stop_flag.clone(),
        )?,
    ];
    let metrics_receiver = match metrics_listener {
        Some(listener) => {
            let (sender, receiver) = channel::bounded(ACCEPT_QUEUE_DEPTH)?;
            accept_threads.push(AcceptThread::spawn(
                "efr-accept-metrics",
                listener,
                sender,
                stop_flag,
            )?);
            Some(receiver)
        }
        None => None,
    };
    let mut listeners = Some(Listeners {
        events: event_receiver,
        clients: client_receiver,
        metrics: metrics_receiver,
        room: room_read_end,
        stop: stop_read_end,
    });
    let mut executors = Vec::with_capacity(cores);
    for (index, receiver) in receivers.into_iter().enumerate() {
        let placement = if pinned {
            Placement::Fixed(index)
        } else {
            Placement::Unbound
        };
        let shared = shared.clone();
        let senders = senders.clone();
        let listeners = if index == 0 { listeners.take() } else { None };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("efr-shard-{index}"))
            .io_memory(shared.config.io_memory)
            .preempt_timer(PREEMPT_TIMER);
        let handle = builder
            .spawn(move || async move {
                // Everything runs as ordinary tasks of the default task queue; the executor's
                // main future only waits for the shard to end.
                glommio::spawn_local(async move {
                    if let Some(listeners) = listeners {
                        start_front(shared.clone(), senders, listeners);
                    } else {
                        drop(senders);
                    }
                    shard::run(index, shared, receiver).await;
                })
                .await;
            })
            .map_err(|error| {
                std::io::Error::other(format!("cannot start executor {index}: {error}"))
            })?;
        executors.push(handle);
    }
    Ok(RunningServer {
        event_addr,
        client_addr,
        metrics_addr,
        shared,
        stop_handle,
        executors,
        accept_threads,
    })
}

/// Starts and runs a server until it is stopped by SIGINT or SIGTERM.
pub fn run(config: Config) -> std::io::Result<()> {
    let server = start(config)?;
    // A plain thread blocked on signal-hook's self-pipe rings the stop bell: no polling.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let stop = server.stop_handle();
    std::thread::Builder::new()
        .name("efr-signals".to_string())
        .spawn(move || {
            if signals.forever().next().is_some() {
                stop.stop();
            }
        })?;
    tracing::info!(
        "efr-sharded listening: events on {}, clients on {}, {} shard(s)",
        server.event_addr,
        server.client_addr,
        server.shared.config.cores
    );
    if let Some(addr) = server.metrics_addr {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    server.wait()
}

/// What executor 0 waits on: the accept threads' channels, the room bell of the shard
/// channels, the stop bell.
struct Listeners {
    events: channel::Receiver<OwnedFd>,
    clients: channel::Receiver<OwnedFd>,
    metrics: Option<channel::Receiver<OwnedFd>>,
    room: BellReadEnd,
    stop: BellReadEnd,
}

/// Executor 0's front end: sequencer, acceptor, metrics, stop watcher, stats logger.
fn start_front(
    shared: Arc<Shared>,
    senders: Vec<channel::Sender<ShardCommand>>,
    listeners: Listeners,
) {
    let room = Room::new(listeners.room);
    let outboxes = |senders: &[channel::Sender<ShardCommand>]| {
        senders
            .iter()
            .map(|sender| sender.clone().attach(&room))
            .collect::<Vec<_>>()
    };
    let stop = Rc::new(Latch::default());
    let sequencer = Rc::new(Sequencer::new(
        shared.clone(),
        outboxes(&senders),
        stop.clone(),
    ));
    let acceptor = Rc::new(Acceptor {
        shared: shared.clone(),
        shards: outboxes(&senders),
        stop: stop.clone(),
    });
    drop(senders);
    glommio::spawn_local(sequencer::run(listeners.events, sequencer.clone())).detach();
    glommio::spawn_local(acceptor::run(listeners.clients, acceptor)).detach();
    if let Some(accepted) = listeners.metrics {
        glommio::spawn_local(metrics::run(accepted, shared.clone(), stop.clone())).detach();
    }
    if let Some(interval) = shared.config.stats_interval {
        // The one periodic timer, and only when asked for (off by default). A line equal to
        // the last one is not repeated.
        let shared = shared.clone();
        let stop = stop.clone();
        glommio::spawn_local(async move {
            let mut last = String::new();
            while !stop.is_set() {
                glommio::timer::sleep(interval).await;
                let summary = shared.counters.summary();
                if summary != last {
                    tracing::info!("stats: {summary}");
                    last = summary;
                }
            }
        })
        .detach();
    }
    let mut stop_bell = listeners.stop.into_waiter();
    glommio::spawn_local(async move {
        let flag = &shared.config.shutdown;
        stop_bell
            .wait_until(|| flag.load(Ordering::SeqCst).then_some(()))
            .await;
        tracing::info!("stopping: no new connections; writing out pending output");
        stop.set();
        while sequencer.session_active.get() {
            sequencer.session_ended.wait().await;
        }
        sequencer.broadcast(|| ShardCommand::Shutdown).await;
        tracing::info!("stopped ({})", shared.counters.summary());
    })
    .detach();
}
