//! The handle of one client connection that its shard and its writer task share: how the shard
//! wakes the writer (new output, a close request), how it asks for a close, and how anyone
//! learns that the writer has ended. It is the payload of the client's slot in the shard's
//! [`Router`](crate::router::Router), so the router's slot is the one place a client lives.
//!
//! A module of its own so that the shard (`shard.rs`), the writer (`client.rs`) and the output
//! budget (`output_budget.rs`) depend on it rather than on each other.

use std::cell::Cell;
use std::os::fd::RawFd;

use crate::notify::{Latch, Notify};

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

/// What the shard and the client's writer task share about one connection.
#[derive(Debug)]
pub struct ClientIo {
    /// Wakes the writer: new output, or a close request.
    pub wake: Notify,
    close: Cell<Option<CloseMode>>,
    /// Set by the writer once the socket is shut down and its counters are updated; its
    /// descriptor may be reused after.
    ended: Latch,
    /// Set when the client is closed to give memory back: the writer then returns freed
    /// memory to the system as it ends.
    pub release_memory_on_exit: Cell<bool>,
    fd: RawFd,
}

impl ClientIo {
    /// The handle of a connection whose writer owns descriptor `fd`.
    pub fn new(fd: RawFd) -> Self {
        ClientIo {
            wake: Notify::default(),
            close: Cell::new(None),
            ended: Latch::default(),
            release_memory_on_exit: Cell::new(false),
            fd,
        }
    }

    /// Asks the writer to close the connection. An abort also shuts the socket down at once,
    /// which fails a write that is waiting on a client that does not read.
    pub fn close(&self, mode: CloseMode) {
        if self.ended.is_set() {
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

    /// The close asked for, if any.
    pub fn close_requested(&self) -> Option<CloseMode> {
        self.close.get()
    }

    /// Called by the writer as it ends: shuts the socket down and wakes whoever waits in
    /// [`ended`](Self::ended).
    pub fn finish(&self) {
        shutdown_socket(self.fd);
        self.ended.set();
    }

    /// Waits until the writer has ended (at once if it has).
    pub async fn ended(&self) {
        self.ended.wait().await;
    }
}

fn shutdown_socket(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor the writer still owns (checked by `ended`).
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
