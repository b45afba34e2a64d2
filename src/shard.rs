//! One shard: the task that drains its command channel on its own executor, applies ordered
//! batches to its [`Router`], wakes the writers of the clients that got output, and closes
//! clients (backlog, session end, shutdown).
//!
//! The shard only ever appends to output buffers; writing is done by one writer task per
//! client (`client.rs`), so a client that does not read never makes the shard wait.
//!
//! At the end of a session the shard acknowledges, on the channel it was given, once every
//! client it closed for that session has written out its output (or was aborted at the
//! deadline): only then are the session's counters final.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::net::TcpStream;

use crate::batch::OrderedBatch;
use crate::channel;
use crate::client;
use crate::client_io::{ClientIo, CloseMode};
use crate::output_budget;
use crate::reactor::reactor_pass;
use crate::router::ClientId;
use crate::shard_state::ShardState;
use crate::shared::Shared;
use crate::stats::{Counters, Fault};
use crate::tls::PeerStream;

/// What the sequencer and the acceptor send a shard, in the order it must act on them.
#[derive(Debug)]
pub enum ShardCommand {
    /// Apply these ordered events.
    Batch(Arc<OrderedBatch>),
    /// A client of a user this shard owns identified itself: register it here, now. Its
    /// notifications start with the next batch in this channel.
    Register {
        /// The user id it sent.
        user: u64,
        /// The connection, handed over from the executor that accepted it.
        fd: OwnedFd,
        /// Its TLS session, when the client port speaks TLS.
        tls: Option<Box<rustls::ServerConnection>>,
    },
    /// The event source closed: write out every client's pending output, close every
    /// client, forget the follow graph.
    EndSession,
    /// Stop: like `EndSession`, then end the shard once output is written (or the deadline).
    Shutdown,
    /// Send this shard's follow edges, as of every batch before this command, to the sender
    /// (for a snapshot).
    ExportGraph(flume::Sender<Vec<(u64, u64)>>),
    /// Replace the follow graph with the edges whose follower this shard owns (a snapshot).
    ImportGraph(Arc<Vec<(u64, u64)>>),
}

/// Commands handled before the shard lets its writers run; bounds the wait of a writer.
const COMMANDS_PER_TURN: usize = 16;

/// What a shard sends when it has finished a session: the number of that session on this
/// shard (1 for the first [`ShardCommand::EndSession`] it received, and so on). Every shard
/// receives every `EndSession`, so the numbers agree across shards.
pub type SessionFinished = u64;

/// Runs shard `index` until it receives [`ShardCommand::Shutdown`] (or every sender is gone).
/// Each session it finishes is acknowledged on `finished` (ignored when nobody listens).
pub async fn run(
    index: usize,
    shared: Arc<Shared>,
    commands: channel::Receiver<ShardCommand>,
    finished: channel::Sender<SessionFinished>,
) {
    let mut commands = commands.attach();
    let state = Rc::new(ShardState::new(index, shared.clone()));
    let finished = Rc::new(finished);
    let sessions_ended = Cell::new(0);
    let mut dirty = Vec::new();
    let mut over_backlog = Vec::new();
    'commands: loop {
        let Some(first) = commands.recv().await else {
            break;
        };
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(command) = next.take() {
            match command {
                ShardCommand::Batch(batch) => {
                    if output_budget::past_shutdown_deadline(&state.shared) {
                        // Its output could not be written before the exit anyway.
                        Counters::add(&state.shared.counters.batches_dropped_at_shutdown, 1);
                    } else {
                        state.router.borrow_mut().apply(&batch);
                        Counters::add(&state.shared.counters.batches_applied, 1);
                        output_budget::enforce(&state);
                    }
                }
                ShardCommand::Register { user, fd, tls } => register(&state, user, fd, tls),
                ShardCommand::EndSession => {
                    sessions_ended.set(sessions_ended.get() + 1);
                    let closing = close_all(&state, CloseMode::SessionEnd);
                    state.router.borrow_mut().reset_graph();
                    acknowledge_when_written(
                        &state,
                        closing,
                        sessions_ended.get(),
                        finished.clone(),
                    );
                }
                ShardCommand::ExportGraph(reply) => {
                    let mut edges = Vec::new();
                    state.router.borrow().export_edges(&mut edges);
                    let _ = reply.send(edges);
                }
                ShardCommand::ImportGraph(edges) => state.router.borrow_mut().import_edges(&edges),
                ShardCommand::Shutdown => {
                    close_all(&state, CloseMode::Shutdown);
                    after_commands(&state, &mut dirty, &mut over_backlog);
                    break 'commands;
                }
            }
            handled += 1;
            if handled < COMMANDS_PER_TURN {
                next = commands.try_recv().ok();
            }
        }
        after_commands(&state, &mut dirty, &mut over_backlog);
        // Let the writers and the executor's I/O run between turns. With an empty channel
        // the next `recv` sleeps on the doorbell, which does that without a timer.
        if !commands.is_empty() {
            reactor_pass().await;
        }
    }
    drain_writers(&state, output_budget::drain_time(&shared)).await;
}

/// Wakes the writers of clients with new output and closes clients over their backlog.
fn after_commands(state: &ShardState, dirty: &mut Vec<ClientId>, over_backlog: &mut Vec<ClientId>) {
    let counters = &state.shared.counters;
    let notifications = {
        let mut router = state.router.borrow_mut();
        router.take_dirty(dirty);
        router.take_over_backlog(over_backlog);
        router.take_notification_count()
    };
    Counters::add(&counters.notifications, notifications);
    for &client in over_backlog.iter() {
        let user = state.router.borrow().user_of(client);
        Counters::add(&counters.clients_closed_backlog, 1);
        state.shared.faults.warn(Fault::Backlog, || {
            format!(
                "closing client of user {user}: unsent output passed --max-client-backlog ({} bytes)",
                state.shared.config.max_client_backlog
            )
        });
        state.close_client(client, CloseMode::Abort);
    }
    output_budget::enforce(state);
    let router = state.router.borrow();
    for &client in dirty.iter() {
        if let Some(io) = router.handle(client) {
            io.wake.notify();
        }
    }
}

fn register(
    state: &Rc<ShardState>,
    user: u64,
    fd: OwnedFd,
    tls: Option<Box<rustls::ServerConnection>>,
) {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is a connected TCP socket whose ownership was handed to us.
    let socket = unsafe { TcpStream::from_raw_fd(raw) };
    let _ = socket.set_nodelay(true);
    let stream = PeerStream::from_parts(socket, tls);
    let io = Rc::new(ClientIo::new(stream.as_raw_fd()));
    let client = state.router.borrow_mut().register(user, io.clone());
    Counters::add(&state.shared.counters.clients_registered, 1);
    state.live_writers.set(state.live_writers.get() + 1);
    glommio::spawn_local(client::serve(state.clone(), client, io, stream)).detach();
}

/// Closes every open client; returns the handles of those closed (their writers still run).
fn close_all(state: &ShardState, mode: CloseMode) -> Vec<Rc<ClientIo>> {
    let open: Vec<ClientId> = state.router.borrow().open_clients().to_vec();
    let counter = match mode {
        CloseMode::Shutdown => &state.shared.counters.clients_closed_shutdown,
        _ => &state.shared.counters.clients_closed_session_end,
    };
    Counters::add(counter, open.len() as u64);
    let mut closing = Vec::with_capacity(open.len());
    for client in open {
        if let Some(io) = state.io(client) {
            closing.push(io);
        }
        state.close_client(client, mode);
    }
    closing
}

/// Once every client in `closing` (closed for the end of session `session`) has ended, tells
/// `finished`. A client that does not read must not hold its connection open for ever: what it
/// has not taken by the deadline (`--shutdown-timeout-ms`) is dropped and it is aborted.
///
/// Runs as a task of its own, so the shard goes on with the next session meanwhile; it is
/// spawned after the current turn's notifications were counted (`after_commands` runs before
/// the shard yields), so the counters are final when it acknowledges.
fn acknowledge_when_written(
    state: &ShardState,
    closing: Vec<Rc<ClientIo>>,
    session: SessionFinished,
    finished: Rc<channel::Sender<SessionFinished>>,
) {
    let deadline = state.shared.config.shutdown_timeout;
    glommio::spawn_local(async move {
        if !closing.is_empty() {
            let all_ended = async {
                for io in &closing {
                    io.ended().await;
                }
                false
            };
            let late = async {
                glommio::timer::sleep(deadline).await;
                true
            };
            if futures_lite::future::or(all_ended, late).await {
                for io in &closing {
                    io.close(CloseMode::Abort);
                }
                for io in &closing {
                    io.ended().await;
                }
            }
        }
        // Nobody listens on an edge of a cluster, which ends sessions on its own.
        let _ = finished.try_send(session);
    })
    .detach();
}

/// Waits for every writer to finish, aborting the ones still writing after `deadline`.
async fn drain_writers(state: &Rc<ShardState>, deadline: Duration) {
    let all_done = async {
        while state.live_writers.get() > 0 {
            state.writers_done.wait().await;
        }
    };
    let timed_out = async {
        glommio::timer::sleep(deadline).await;
        true
    };
    let late = futures_lite::future::or(
        async {
            all_done.await;
            false
        },
        timed_out,
    )
    .await;
    if late {
        let ios: Vec<Rc<ClientIo>> = state.router.borrow().handles().cloned().collect();
        tracing::warn!(
            "shutdown deadline passed; aborting {} client writers",
            ios.len()
        );
        for io in ios {
            io.close(CloseMode::Abort);
        }
    }
}
