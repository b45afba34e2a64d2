//! The task of one client connection on its owner shard: it sends the client's pending output
//! one coalesced write at a time, and while idle reads and discards whatever the client sends
//! so that a closed connection is noticed.
//!
//! One task and one descriptor per client: with 10,000 clients, two descriptors each (an
//! earlier design had a separate reader on a `dup`) passed a 20,000 open-file limit. A close
//! requested by the shard (`ClientIo::close`) wakes the task; an abort also shuts the socket
//! down, which fails a write that is waiting on a client that does not read.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::client_io::{ClientIo, CloseMode};
use crate::output_budget;
use crate::router::{ClientId, IDLE_BUFFER_KEEP};
use crate::shard_state::ShardState;
use crate::stats::{Counters, Fault};
use crate::tls::PeerStream;

/// Bytes read (and discarded) at a time from a client.
const DISCARD_BUFFER: usize = 4096;

/// Serves one client until it is closed: writes its pending output, one coalesced write at a
/// time, and while there is nothing to write, reads and discards what the client sends so
/// that a closed connection is noticed. One task and one descriptor per client.
///
/// Reading is budgeted ([`InputBudget`]): glommio completes a read at once while bytes are
/// waiting, and with preemption off a loop that always finds data never lets the shard run.
/// A client that half-closes (end of file after its id) is no longer read; it goes on
/// receiving until a write fails.
pub async fn serve(
    state: Rc<ShardState>,
    client: ClientId,
    io: Rc<ClientIo>,
    mut stream: PeerStream,
) {
    let counters = &state.shared.counters;
    let config = &state.shared.config;
    if let Some(timeout) = config.write_timeout {
        // A glommio write timeout is armed only while a send waits, and restarts whenever
        // the client accepts a byte: exactly "accepted no byte for that long".
        let _ = stream.socket().set_write_timeout(Some(timeout));
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut discard = [0u8; DISCARD_BUFFER];
    let mut input = InputBudget::new(config.max_client_input_rate);
    let mut peer_sending = true;
    loop {
        if io.close_requested() == Some(CloseMode::Abort) {
            break;
        }
        let taken = state.router.borrow_mut().take_pending(client, &mut buffer);
        if buffer.is_empty() {
            if io.close_requested().is_some() {
                break;
            }
            // Idle: wait for new output or a close request, and meanwhile watch the peer.
            // A glommio read can be dropped while pending without losing bytes.
            let idle = if !peer_sending {
                io.wake.wait().await;
                Idle::Woken
            } else if let Some(pause) = input.pause() {
                Counters::add(&counters.clients_input_throttled, 1);
                let user = state.router.borrow().user_of(client);
                state.shared.faults.warn(Fault::Flood, || {
                    format!(
                        "client of user {user} keeps sending after its id line; reading it \
                         at most --max-client-input-rate ({} bytes/s)",
                        config.max_client_input_rate
                    )
                });
                futures_lite::future::or(io.wake.wait(), glommio::timer::sleep(pause)).await;
                Idle::Woken
            } else {
                futures_lite::future::or(
                    async {
                        io.wake.wait().await;
                        Idle::Woken
                    },
                    async {
                        match stream.read(&mut discard).await {
                            Ok(0) => Idle::EndOfInput,
                            Ok(n) => Idle::Discarded(n),
                            Err(_) => Idle::PeerGone,
                        }
                    },
                )
                .await
            };
            match idle {
                Idle::Woken => {}
                Idle::Discarded(n) => input.spend(n),
                Idle::EndOfInput => {
                    peer_sending = false;
                    Counters::add(&counters.clients_half_closed, 1);
                }
                Idle::PeerGone => {
                    if io.close_requested().is_none() {
                        Counters::add(&counters.clients_closed_by_peer, 1);
                        state.router.borrow_mut().detach(client);
                    }
                    break;
                }
            }
            continue;
        }
        let writing = crate::nudge::WriteInProgress::begin();
        let written = stream.write_all(&buffer).await;
        drop(writing);
        match written {
            Ok(()) => {
                Counters::add(&counters.bytes_written, buffer.len() as u64);
                state.delivery_latency().record_write(
                    taken.oldest_released_ns,
                    crate::latency::now_ns(),
                    taken.notifications,
                );
            }
            Err(error) => {
                // A client already being closed was counted under that reason.
                if io.close_requested().is_none() {
                    let user = state.router.borrow().user_of(client);
                    if error.kind() == std::io::ErrorKind::TimedOut {
                        Counters::add(&counters.clients_closed_write_timeout, 1);
                        state.shared.faults.warn(Fault::WriteTimeout, || {
                            format!(
                                "closing client of user {user}: it accepted no byte for \
                                 --write-timeout-ms ({} ms)",
                                config.write_timeout.unwrap_or_default().as_millis()
                            )
                        });
                    } else if !peer_sending {
                        // It had shut its side; now it is gone.
                        Counters::add(&counters.clients_closed_by_peer, 1);
                    } else {
                        Counters::add(&counters.clients_closed_write_error, 1);
                        state.shared.faults.warn(Fault::WriteError, || {
                            format!("closing client of user {user}: write failed: {error}")
                        });
                    }
                    state.router.borrow_mut().detach(client);
                }
                break;
            }
        }
        buffer.clear();
        if buffer.capacity() > IDLE_BUFFER_KEEP {
            buffer.shrink_to(IDLE_BUFFER_KEEP);
        }
        state.router.borrow_mut().written(client);
        output_budget::publish(&state);
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        let user = state.router.borrow().user_of(client);
        let why = match io.close_requested() {
            Some(CloseMode::SessionEnd) => "end of the source session",
            Some(CloseMode::Shutdown) => "shutdown",
            Some(CloseMode::Abort) => "closed by the server",
            None => "peer gone or a write failed",
        };
        tracing::debug!("client of user {user} closed: {why}");
    }
    // Whoever waits for this writer to end runs after this function returns: nothing below
    // awaits.
    io.finish();
    drop(stream);
    drop(buffer);
    state.router.borrow_mut().free(client);
    output_budget::publish(&state);
    Counters::sub(&counters.clients_open, 1);
    let live = state.live_writers.get() - 1;
    state.live_writers.set(live);
    if io.release_memory_on_exit.get() {
        output_budget::writer_closed_for_memory_ended();
    }
    if live == 0 {
        state.writers_done.notify();
        // At a stop the process is about to exit: trimming would only delay it.
        if !config.stop.is_requested() {
            output_budget::release_freed_memory();
        }
    }
}

/// What ended an idle wait.
enum Idle {
    /// New output or a close request (or the end of an input pause).
    Woken,
    /// Bytes read from the client and discarded.
    Discarded(usize),
    /// The client shut its sending side.
    EndOfInput,
    /// The connection failed (reset).
    PeerGone,
}

/// Length of one slice of a client's input budget.
const INPUT_SLICE: Duration = Duration::from_millis(100);

/// How much a client may send after its id line: `--max-client-input-rate` bytes a second,
/// granted in slices of [`INPUT_SLICE`]. A client over its slice is not read until the slice
/// ends, so its bytes wait in the kernel and TCP pushes back on it.
struct InputBudget {
    per_slice: u64,
    slice_start: Instant,
    spent: u64,
}

impl InputBudget {
    fn new(bytes_per_second: u64) -> Self {
        InputBudget {
            per_slice: (bytes_per_second / (1000 / INPUT_SLICE.as_millis() as u64)).max(1),
            slice_start: Instant::now(),
            spent: 0,
        }
    }

    fn spend(&mut self, bytes: usize) {
        self.spent += bytes as u64;
    }

    /// How long to stop reading, if the slice's budget is spent.
    fn pause(&mut self) -> Option<Duration> {
        if self.spent < self.per_slice {
            return None;
        }
        let elapsed = self.slice_start.elapsed();
        if elapsed >= INPUT_SLICE {
            self.slice_start = Instant::now();
            self.spent = 0;
            return None;
        }
        Some(INPUT_SLICE - elapsed)
    }
}
