//! Starting and stopping the server: binds the two listeners, starts one glommio executor per
//! shard, and wires the sequencer, the acceptor and the shards together.
//!
//! Executor 0 runs the sequencer, the client acceptor, the stop watcher and shard 0; executor
//! i > 0 runs shard i. [`start`] returns once the listeners are bound (so a test can use
//! ephemeral ports at once); [`run`] is `start` then wait, as the binary uses it.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::acceptor::{self, Acceptor};
use crate::cluster;
use crate::config::{cpu_count, Config, Role};
use crate::listener::{self, AcceptThread, ACCEPT_QUEUE_DEPTH};
use crate::metrics;
use crate::notify::Latch;
use crate::sequencer::{self, Sequencer};
use crate::shard::{self, ShardCommand};
use crate::stats::{Counters, FaultLog};

/// How often the stop watcher looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// glommio's preemption timer, effectively off.
///
/// glommio 0.9 parks an executor whose task queue is still runnable when a preemption is
/// already pending as it starts running tasks (`run_task_queues` reads "preempted before
/// running anything" as "nothing to run"; fixed in the community fork, not on crates.io). On a
/// loaded machine a thread descheduled for longer than the preemption period right after
/// polling I/O hits it, and the executor sleeps until some unrelated I/O arrives: measured
/// here as 10M-event runs stalling for seconds with batches queued in an idle shard, far more
/// often with a 1 ms period. efr does not rely on preemption: its long-running tasks (the
/// sequencer and the shards) pass through the reactor explicitly after each turn
/// ([`crate::shard::reactor_pass`]), so I/O and wake-ups from other executors are handled
/// between turns. With the timer off the pending preemption never happens.
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
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    accept_threads: Vec<AcceptThread>,
    /// A cluster role's NATS thread; its error ends the process with a failure.
    cluster_threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl RunningServer {
    /// The server's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Asks the server to stop (as SIGTERM does).
    pub fn stop(&self) {
        self.shared.config.shutdown.store(true, Ordering::SeqCst);
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
    let shared = Arc::new(Shared {
        config,
        counters: Counters::default(),
        faults: FaultLog::default(),
    });
    let mut cluster_threads = Vec::new();
    let mut resume_at = None;
    let (senders, receivers): (Vec<_>, Vec<_>) = match role {
        Role::Ingest => {
            let publisher = cluster::ingest::start(shared.clone())?;
            cluster_threads.push(publisher.thread);
            resume_at = publisher.resume_at;
            (vec![publisher.sender], vec![None])
        }
        Role::All | Role::Edge => (0..cores)
            .map(|_| {
                let (sender, receiver) =
                    flume::bounded::<ShardCommand>(shared.config.shard_queue_depth);
                (sender, Some(receiver))
            })
            .unzip(),
    };
    if role == Role::Edge {
        cluster_threads.push(cluster::edge::start(shared.clone(), senders.clone())?);
    }
    let stop_flag = shared.config.shutdown.clone();
    let mut accept_threads = Vec::new();
    let events = match event_listener {
        Some(listener) => {
            let (sender, receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
            accept_threads.push(AcceptThread::spawn(
                "efr-accept-events",
                listener,
                sender,
                stop_flag.clone(),
            )?);
            Some(receiver)
        }
        None => None,
    };
    let clients = match client_listener {
        Some(listener) => {
            let (sender, receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
            accept_threads.push(AcceptThread::spawn(
                "efr-accept-clients",
                listener,
                sender,
                stop_flag.clone(),
            )?);
            Some(receiver)
        }
        None => None,
    };
    let metrics_receiver = match metrics_listener {
        Some(listener) => {
            let (sender, receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
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
        events,
        clients,
        metrics: metrics_receiver,
        resume_at,
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
                            shard::run(index, shared, receiver).await;
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
    Ok(RunningServer {
        event_addr,
        client_addr,
        metrics_addr,
        shared,
        executors,
        accept_threads,
        cluster_threads,
    })
}

/// Starts and runs a server until it is stopped.
pub fn run(config: Config) -> std::io::Result<()> {
    let server = start(config)?;
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

/// What executor 0 accepts from: the accept threads' channels (none for a listener the role
/// does not bind) and the metrics listener; and where a resuming ingest starts.
struct Listeners {
    events: Option<flume::Receiver<OwnedFd>>,
    clients: Option<flume::Receiver<OwnedFd>>,
    metrics: Option<flume::Receiver<OwnedFd>>,
    resume_at: Option<u64>,
}

/// Executor 0's front end: sequencer, acceptor, metrics, stop watcher, stats logger. Returns
/// the stop watcher, which ends once the shards were told to stop.
fn start_front(
    shared: Arc<Shared>,
    senders: Vec<flume::Sender<ShardCommand>>,
    listeners: Listeners,
) -> glommio::Task<()> {
    let stop = Rc::new(Latch::default());
    let sequencer = Rc::new(Sequencer::new(
        shared.clone(),
        senders.clone(),
        stop.clone(),
    ));
    let acceptor = Rc::new(Acceptor {
        shared: shared.clone(),
        shards: senders,
        stop: stop.clone(),
    });
    sequencer.resume_at.set(listeners.resume_at);
    if let Some(events) = listeners.events {
        glommio::spawn_local(sequencer::run(events, sequencer.clone())).detach();
    }
    if let Some(clients) = listeners.clients {
        glommio::spawn_local(acceptor::run(clients, acceptor)).detach();
    }
    if let Some(accepted) = listeners.metrics {
        glommio::spawn_local(metrics::run(accepted, shared.clone(), stop.clone())).detach();
    }
    if let Some(interval) = shared.config.stats_interval {
        let shared = shared.clone();
        let stop = stop.clone();
        glommio::spawn_local(async move {
            while !stop.is_set() {
                glommio::timer::sleep(interval).await;
                tracing::info!("stats: {}", shared.counters.summary());
            }
        })
        .detach();
    }
    glommio::spawn_local(async move {
        while !shared.config.shutdown.load(Ordering::SeqCst) {
            glommio::timer::sleep(STOP_POLL).await;
        }
        tracing::info!("stopping: no new connections; writing out pending output");
        stop.set();
        while sequencer.session_active.get() {
            glommio::timer::sleep(STOP_POLL).await;
        }
        sequencer.broadcast(|| ShardCommand::Shutdown).await;
        tracing::info!("stopped ({})", shared.counters.summary());
    })
}
