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
//! the stop bell (rung by [`StopRequest::request`], which SIGINT/SIGTERM, a failing cluster
//! thread and [`RunningServer::stop`] call). An idle server has no timer armed and no thread that wakes.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::acceptor::{self, Acceptor};
use crate::channel::{self, Room};
use crate::cluster;
use crate::config::{cpu_count, Config, Role};
use crate::doorbell::{doorbell, BellReadEnd};
use crate::listener::{self, AcceptThread, ACCEPT_QUEUE_DEPTH};
use crate::metrics;
use crate::notify::Latch;
use crate::nudge::{NudgeReadEnd, StallGuard};
use crate::sequencer::{self, Sequencer};
use crate::shard::{self, SessionFinished, ShardCommand};
use crate::shared::Shared;
use crate::stats::Counters;
use crate::stop::StopRequest;

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
/// queued ([`crate::reactor::reactor_pass`]).
const PREEMPT_TIMER: Duration = Duration::from_secs(3600);

/// A started server.
pub struct RunningServer {
    /// Where the event source connects.
    pub event_addr: SocketAddr,
    /// Where user clients connect.
    pub client_addr: SocketAddr,
    /// Where the metrics endpoint listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    accept_threads: Vec<AcceptThread>,
    /// A cluster role's NATS thread; its error ends the process with a failure.
    cluster_threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
    /// The thread that nudges the executors while the server is busy (`None`: nudges off).
    stall_guard: Option<(Arc<StallGuard>, std::thread::JoinHandle<()>)>,
}

impl RunningServer {
    /// The server's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Asks the server to stop (as SIGTERM does).
    pub fn stop(&self) {
        self.shared.config.stop.request();
    }

    /// A handle that stops the server from another thread or a signal handler.
    pub fn stop_handle(&self) -> StopRequest {
        self.shared.config.stop.clone()
    }

    /// Waits until every executor has ended (after a stop), then ends the accept threads.
    pub fn wait(self) -> std::io::Result<()> {
        let mut result = Ok(());
        for executor in self.executors {
            if let Err(error) = executor.join() {
                result = Err(std::io::Error::other(format!("executor failed: {error}")));
            }
        }
        if let Some((guard, thread)) = self.stall_guard {
            guard.stop();
            let _ = thread.join();
        }
        // A request (not only the flag): it also wakes the NATS threads.
        self.shared.config.stop.request();
        for thread in &self.accept_threads {
            thread.interrupt();
        }
        for thread in self.accept_threads {
            thread.join();
        }
        for thread in self.cluster_threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = Err(std::io::Error::other(error)),
                Err(_) => result = Err(std::io::Error::other("the NATS thread panicked")),
            }
        }
        result
    }

    /// Stops the server and waits for it.
    pub fn stop_and_wait(self) -> std::io::Result<()> {
        self.stop();
        self.wait()
    }
}

/// Binds the listeners and starts the executors (and, for a cluster role, the NATS thread).
///
/// `Role::All` binds both listeners and runs one shard per executor. `Role::Ingest` binds only
/// the event listener and runs one executor with the sequencer, whose only "shard" is the NATS
/// publisher. `Role::Edge` binds only the client listener and runs the shards, fed by the NATS
/// consumer. An unbound listener's address has port 0.
pub fn start(config: Config) -> std::io::Result<RunningServer> {
    let open_file_limit = crate::limits::raise_and_log_open_file_limit();
    crate::limits::return_large_buffers_at_once();
    let role = config.role;
    let unbound = |addr: SocketAddr| SocketAddr::new(addr.ip(), 0);
    let event_listener = match role {
        Role::Edge => None,
        _ => Some(listener::bind(config.event_addr)?),
    };
    let client_listener = match role {
        Role::Ingest => None,
        _ => Some(listener::bind(config.client_addr)?),
    };
    let event_addr = match &event_listener {
        Some(listener) => listener.local_addr()?,
        None => unbound(config.event_addr),
    };
    let client_addr = match &client_listener {
        Some(listener) => listener.local_addr()?,
        None => unbound(config.client_addr),
    };
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
    let shared = Arc::new(Shared::new(config));
    Counters::add(
        &shared.counters.open_file_limit,
        open_file_limit.unwrap_or(0),
    );
    // Executor 0 sends to every shard and waits on one room bell when a channel is full;
    // every shard (or the ingest's publisher) rings it as it takes commands.
    let (room_bell, room_read_end) = doorbell()?;
    // One nudge socket per executor (an ingest runs one), and every shard channel's sender
    // tells the guard of its sends.
    let executor_count = if role == Role::Ingest { 1 } else { cores };
    let (stall_guard, mut nudge_ends) = match shared.config.stall_nudge {
        Some(interval) => {
            let (guard, ends) = StallGuard::new(shared.clone(), interval, executor_count)?;
            (Some(guard), ends.into_iter().map(Some).collect())
        }
        None => (None, Vec::new()),
    };
    let noting = |sender: channel::Sender<ShardCommand>| match &stall_guard {
        Some(guard) => sender.noting_activity(guard.activity().clone()),
        None => sender,
    };
    let mut cluster_threads = Vec::new();
    let mut resume_at = None;
    let mut senders = Vec::with_capacity(cores);
    let mut receivers = Vec::with_capacity(cores);
    match role {
        Role::Ingest => {
            let (sender, receiver) =
                channel::bounded::<ShardCommand>(shared.config.shard_queue_depth)?;
            let publisher = cluster::ingest::start(
                shared.clone(),
                receiver.ringing_on_room(room_bell.clone()).into_foreign(),
            )?;
            cluster_threads.push(publisher.thread);
            resume_at = publisher.resume_at;
            senders.push(noting(sender));
            receivers.push(None);
        }
        Role::All | Role::Edge => {
            for _ in 0..cores {
                let (sender, receiver) =
                    channel::bounded::<ShardCommand>(shared.config.shard_queue_depth)?;
                senders.push(noting(sender));
                receivers.push(Some(receiver.ringing_on_room(room_bell.clone())));
            }
        }
    }
    if let Some(guard) = &stall_guard {
        guard.watch_shard_bells(
            receivers
                .iter()
                .flatten()
                .map(|receiver| receiver.bell().clone())
                .collect(),
        );
        guard.watch_room_bell(room_bell.clone());
    }
    if role == Role::Edge {
        cluster_threads.push(cluster::edge::start(shared.clone(), senders.clone())?);
    }
    // Each shard tells executor 0 when it has finished a session (its clients' output written).
    let (finished_sender, finished_receiver) = channel::unbounded::<SessionFinished>()?;
    let shard_count = receivers.iter().flatten().count();
    let (stop_bell, stop_read_end) = doorbell()?;
    shared.config.stop.ring_on_request(stop_bell);
    // One accept thread per bound listener, handing connections to executor 0.
    let mut accept_threads = Vec::new();
    let mut accept = |name: &str,
                      listener: Option<std::net::TcpListener>|
     -> std::io::Result<Option<channel::Receiver<OwnedFd>>> {
        let Some(listener) = listener else {
            return Ok(None);
        };
        let (sender, receiver) = channel::bounded(ACCEPT_QUEUE_DEPTH)?;
        accept_threads.push(AcceptThread::spawn(
            name,
            listener,
            sender,
            shared.config.shutdown.clone(),
            shared.clone(),
        )?);
        Ok(Some(receiver))
    };
    let events = accept("efr-accept-events", event_listener)?;
    let clients = accept("efr-accept-clients", client_listener)?;
    let metrics_receiver = accept("efr-accept-metrics", metrics_listener)?;
    let mut listeners = Some(Listeners {
        events,
        clients,
        metrics: metrics_receiver,
        resume_at,
        room: room_read_end,
        stop: stop_read_end,
        finished: (finished_receiver, shard_count),
    });
    let mut executors = Vec::with_capacity(cores);
    // Each executor reports once it runs; one whose io_uring could not be set up ends at once,
    // dropping its reporter, so `start` returns only with every executor up, or with the
    // reason one is not.
    let (started, reports) = std::sync::mpsc::channel::<usize>();
    for (index, receiver) in receivers.into_iter().enumerate() {
        let placement = if pinned {
            Placement::Fixed(index)
        } else {
            Placement::Unbound
        };
        let shared = shared.clone();
        let senders = senders.clone();
        let listeners = if index == 0 { listeners.take() } else { None };
        let nudge_end: Option<NudgeReadEnd> = nudge_ends.get_mut(index).and_then(Option::take);
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("efr-shard-{index}"))
            .io_memory(shared.config.io_memory)
            .preempt_timer(PREEMPT_TIMER);
        let started = started.clone();
        let finished = finished_sender.clone();
        let handle = builder
            .spawn(move || async move {
                if let Some(nudge_end) = nudge_end {
                    nudge_end.start_reader();
                }
                let _ = started.send(index);
                drop(started);
                // Everything runs as ordinary tasks of the default task queue; the executor's
                // main future only waits for the shard (or, on an ingest, the front) to end.
                glommio::spawn_local(async move {
                    let front = listeners
                        .map(|listeners| start_front(shared.clone(), senders.clone(), listeners));
                    drop(senders);
                    match (receiver, front) {
                        (Some(receiver), front) => {
                            if let Some(front) = front {
                                front.detach();
                            }
                            shard::run(index, shared, receiver, finished).await;
                        }
                        (None, Some(front)) => front.await,
                        (None, None) => {}
                    }
                })
                .await;
            })
            .map_err(|error| {
                std::io::Error::other(format!("cannot start executor {index}: {error}"))
            })?;
        executors.push(handle);
    }
    drop(started);
    drop(finished_sender);
    let mut up = vec![false; executors.len()];
    while let Ok(index) = reports.recv() {
        up[index] = true;
    }
    if let Some(failed) = up.iter().position(|&up| !up) {
        let error = match executors.swap_remove(failed).join() {
            Err(error) => error.to_string(),
            Ok(()) => "it ended at once".to_string(),
        };
        shared.config.stop.request();
        return Err(std::io::Error::other(format!(
            "cannot start executor {failed}: {error}{}",
            executor_hint(&error)
        )));
    }
    let stall_guard = match stall_guard {
        Some(guard) => match guard.spawn() {
            Ok(thread) => Some((guard, thread)),
            Err(error) => {
                shared.config.stop.request();
                return Err(std::io::Error::other(format!(
                    "cannot start the stall guard thread: {error}"
                )));
            }
        },
        None => None,
    };
    Ok(RunningServer {
        event_addr,
        client_addr,
        metrics_addr,
        shared,
        executors,
        accept_threads,
        cluster_threads,
        stall_guard,
    })
}

/// What to do about an executor that could not start: io_uring's registered memory counts
/// against the locked-memory limit, which is the usual cause.
fn executor_hint(error: &str) -> &'static str {
    let lower = error.to_lowercase();
    if ["memlock", "memory", "locked", "os error 12"]
        .iter()
        .any(|word| lower.contains(word))
    {
        " (io_uring needs locked memory for every executor: raise the locked-memory limit, \
         e.g. `ulimit -l` or LimitMEMLOCK, or lower --io-memory-kib or --cores)"
    } else {
        ""
    }
}

/// Starts and runs a server until it is stopped by SIGINT or SIGTERM.
pub fn run(config: Config) -> std::io::Result<()> {
    let server = start(config)?;
    // SIGINT/SIGTERM record the moment, raise the flag and ring the stop bell from the
    // handler itself: no thread, no polling.
    server.shared.config.stop.handle_signals()?;
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

/// What executor 0 waits on: the accept threads' channels (none for a listener the role does
/// not bind), the room bell of the shard channels, the stop bell; and where a resuming ingest
/// starts.
struct Listeners {
    events: Option<channel::Receiver<OwnedFd>>,
    clients: Option<channel::Receiver<OwnedFd>>,
    metrics: Option<channel::Receiver<OwnedFd>>,
    resume_at: Option<u64>,
    room: BellReadEnd,
    stop: BellReadEnd,
    /// The shards' acknowledgements of finished sessions, and the number of shards.
    finished: (channel::Receiver<SessionFinished>, usize),
}

/// Executor 0's front end: sequencer, acceptor, metrics, stop watcher, stats logger. Returns
/// the stop watcher, which ends once the shards were told to stop.
fn start_front(
    shared: Arc<Shared>,
    senders: Vec<channel::Sender<ShardCommand>>,
    listeners: Listeners,
) -> glommio::Task<()> {
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
    sequencer.resume_at.set(listeners.resume_at);
    if let Some(events) = listeners.events {
        let (finished, shards) = listeners.finished;
        if shards > 0 {
            sequencer.finished_sessions_reported.set(true);
            glommio::spawn_local(sequencer::log_finished_sessions(
                shared.clone(),
                finished,
                shards,
            ))
            .detach();
        }
        glommio::spawn_local(sequencer::run(events, sequencer.clone())).detach();
    }
    if let Some(clients) = listeners.clients {
        glommio::spawn_local(acceptor::run(clients, acceptor)).detach();
    }
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
        let stop_request = &shared.config.stop;
        stop_bell
            .wait_until(|| stop_request.is_requested().then_some(()))
            .await;
        stop_request.stamp();
        tracing::info!("stopping: no new connections; writing out pending output");
        stop.set();
        while sequencer.session_active.get() {
            sequencer.session_ended.wait().await;
        }
        sequencer.broadcast(|| ShardCommand::Shutdown).await;
        tracing::info!("stopped ({})", shared.counters.summary());
    })
}
