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
use crate::config::{cpu_count, Config};
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
    let open_file_limit = crate::limits::raise_and_log_open_file_limit();
    crate::limits::return_large_buffers_at_once();
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
    Counters::add(
        &shared.counters.open_file_limit,
        open_file_limit.unwrap_or(0),
    );
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..cores)
        .map(|_| flume::bounded::<ShardCommand>(shared.config.shard_queue_depth))
        .unzip();
    let (event_sender, event_receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
    let (client_sender, client_receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
    let stop_flag = shared.config.shutdown.clone();
    let mut accept_threads = vec![
        AcceptThread::spawn(
            "efr-accept-events",
            event_listener,
            event_sender,
            stop_flag.clone(),
            shared.clone(),
        )?,
        AcceptThread::spawn(
            "efr-accept-clients",
            client_listener,
            client_sender,
            stop_flag.clone(),
            shared.clone(),
        )?,
    ];
    let metrics_receiver = match metrics_listener {
        Some(listener) => {
            let (sender, receiver) = flume::bounded(ACCEPT_QUEUE_DEPTH);
            accept_threads.push(AcceptThread::spawn(
                "efr-accept-metrics",
                listener,
                sender,
                stop_flag,
                shared.clone(),
            )?);
            Some(receiver)
        }
        None => None,
    };
    let mut listeners = Some(Listeners {
        events: event_receiver,
        clients: client_receiver,
        metrics: metrics_receiver,
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
        executors,
        accept_threads,
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

/// What executor 0 accepts from: the accept threads' channels and the metrics listener.
struct Listeners {
    events: flume::Receiver<OwnedFd>,
    clients: flume::Receiver<OwnedFd>,
    metrics: Option<flume::Receiver<OwnedFd>>,
}

/// Executor 0's front end: sequencer, acceptor, metrics, stop watcher, stats logger.
fn start_front(
    shared: Arc<Shared>,
    senders: Vec<flume::Sender<ShardCommand>>,
    listeners: Listeners,
) {
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
    glommio::spawn_local(sequencer::run(listeners.events, sequencer.clone())).detach();
    glommio::spawn_local(acceptor::run(listeners.clients, acceptor)).detach();
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
        shared.config.stop.stamp();
        tracing::info!("stopping: no new connections; writing out pending output");
        stop.set();
        while sequencer.session_active.get() {
            glommio::timer::sleep(STOP_POLL).await;
        }
        sequencer.broadcast(|| ShardCommand::Shutdown).await;
        tracing::info!("stopped ({})", shared.counters.summary());
    })
    .detach();
}
