//! The task of one client connection on its owner shard: it sends the client's pending output
//! one coalesced write at a time, and while idle reads and discards whatever the client sends
//! so that a closed connection is noticed.
//!
//! One task and one descriptor per client: with 10,000 clients, two descriptors each (an
//! earlier design had a separate reader on a `dup`) passed a 20,000 open-file limit. A close
//! requested by the shard (`ClientIo::close`) wakes the task; an abort also shuts the socket
//! down, which fails a write that is waiting on a client that does not read.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::notify::Notify;
use crate::router::{ClientId, IDLE_BUFFER_KEEP};
use crate::shard::ShardState;
use crate::stats::{Counters, Fault};
use crate::tls::PeerStream;

/// Bytes read (and discarded) at a time from a client.
const DISCARD_BUFFER: usize = 512;

/// How a client's connection is to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseMode {
    /// End of the event source session: write out what is pending, then close.
    SessionEnd,
    /// Server shutdown: write out what is pending, then close.
    Shutdown,
    /// Close now, dropping what is pending (peer gone, write error, backlog limit).
    Abort,
}

/// What the shard and the client's tasks share about one connection.
#[derive(Debug)]
pub struct ClientIo {
    /// Wakes the writer: new output, or a close request.
    pub wake: Notify,
    close: Cell<Option<CloseMode>>,
    /// Set by the writer once the socket is shut down; its descriptor may be reused after.
    finished: Cell<bool>,
    fd: RawFd,
}

impl ClientIo {
    /// The handle of a connection whose writer owns descriptor `fd`.
    pub fn new(fd: RawFd) -> Self {
        ClientIo {
            wake: Notify::default(),
            close: Cell::new(None),
            finished: Cell::new(false),
            fd,
        }
    }

    /// Asks the writer to close the connection. An abort also shuts the socket down at once,
    /// which fails a write that is waiting on a client that does not read.
    pub fn close(&self, mode: CloseMode) {
        if self.finished.get() {
            return;
        }
        match (self.close.get(), mode) {
            (Some(CloseMode::Abort), _) => return,
            (Some(_), CloseMode::SessionEnd | CloseMode::Shutdown) => return,
            _ => {}
        }
        self.close.set(Some(mode));
        if mode == CloseMode::Abort {
            shutdown_socket(self.fd);
        }
        self.wake.notify();
    }
}

fn shutdown_socket(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor the writer still owns (checked by `finished`).
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Serves one client until it is closed: writes its pending output, one coalesced write at a
/// time, and while there is nothing to write, reads and discards what the client sends so
/// that a closed connection is noticed. One task and one descriptor per client.
pub async fn serve(
    state: Rc<ShardState>,
    client: ClientId,
    io: Rc<ClientIo>,
    mut stream: PeerStream,
) {
    let counters = &state.shared.counters;
    let mut buffer: Vec<u8> = Vec::new();
    let mut discard = [0u8; DISCARD_BUFFER];
    loop {
        if io.close.get() == Some(CloseMode::Abort) {
            break;
        }
        state.router.borrow_mut().take_pending(client, &mut buffer);
        if buffer.is_empty() {
            if io.close.get().is_some() {
                break;
            }
            // Idle: wait for new output or a close request, and meanwhile watch the peer.
            // A glommio read can be dropped while pending without losing bytes.
            let peer_gone = futures_lite::future::or(
                async {
                    io.wake.wait().await;
                    false
                },
                async { matches!(stream.read(&mut discard).await, Ok(0) | Err(_)) },
            )
            .await;
            if peer_gone && io.close.get().is_none() {
                Counters::add(&counters.clients_closed_by_peer, 1);
                state.router.borrow_mut().detach(client);
                break;
            }
            continue;
        }
        match stream.write_all(&buffer).await {
            Ok(()) => Counters::add(&counters.bytes_written, buffer.len() as u64),
            Err(error) => {
                // A client already being closed was counted under that reason.
                if io.close.get().is_none() {
                    let user = state.router.borrow().user_of(client);
                    Counters::add(&counters.clients_closed_write_error, 1);
                    state.shared.faults.warn(Fault::WriteError, || {
                        format!("closing client of user {user}: write failed: {error}")
                    });
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
    }
    shutdown_socket(io.fd);
    io.finished.set(true);
    drop(stream);
    state.router.borrow_mut().free(client);
    if let Some(slot) = state.ios.borrow_mut().get_mut(client as usize) {
        *slot = None;
    }
    Counters::sub(&counters.clients_open, 1);
    let live = state.live_writers.get() - 1;
    state.live_writers.set(live);
    if live == 0 {
        state.writers_done.notify();
        release_freed_memory();
    }
}

/// Gives the memory of closed clients' buffers back to the system once a shard has no client
/// left (end of a session, or the last client gone). Without it glibc keeps the freed pages of
/// past backlogs: a 100M-event soak with stalling clients ended at 157 MB resident with no
/// client open.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
