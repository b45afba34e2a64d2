//! Accept threads: a plain thread per listening socket blocks in `accept(2)` and hands each
//! connection to executor 0 over a channel.
//!
//! glommio 0.9 accepts through io_uring on its latency ring, and that completion was measured
//! here not waking a sleeping executor: a burst of connections stalled for a second at a time
//! once the listen backlog filled (the clients' SYN retransmits), 400 connections taking 2 s.
//! A blocking `accept(2)` on its own thread takes each connection as it comes and rings
//! executor 0's doorbell for it ([`crate::channel`]); executor 0 sleeps until then.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shared::Shared;
use crate::stats::{Counters, Fault};

/// Accepted connections queued towards executor 0 before the accept thread waits.
pub const ACCEPT_QUEUE_DEPTH: usize = 1024;

/// Listen backlog: connections the kernel completes before they are accepted. Bursts of
/// thousands of clients connecting at once overflowed the 128 of a plain `TcpListener::bind`
/// (each overflow costs that client a one-second SYN retransmit). The kernel caps it at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listening socket with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as std does).
/// Errors name the address (`cannot listen on 127.0.0.1:9090: Address already in use`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    };
    listen().map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {addr}: {error}"))
    })
}

/// First pause after an accept error that is not shortage of descriptors; it doubles with
/// each further error up to [`ACCEPT_ERROR_PAUSE_MAX`], so the thread never spins.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause after repeated accept errors.
const ACCEPT_ERROR_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A running accept thread.
pub struct AcceptThread {
    fd: RawFd,
    handle: JoinHandle<()>,
}

/// A descriptor kept open for the moment the process runs out: closing it frees one slot, so
/// the accept thread can take the waiting connection and close it at once (the client sees a
/// clean close instead of hanging in the backlog, and accept does not fail again and again).
struct ReserveDescriptor(Option<OwnedFd>);

impl ReserveDescriptor {
    fn open() -> Self {
        let file = std::fs::File::open("/dev/null").ok();
        ReserveDescriptor(file.map(OwnedFd::from))
    }
}

impl AcceptThread {
    /// Starts accepting on `listener`; connections go to `sender` until `stop` is set and
    /// [`AcceptThread::interrupt`] is called. Errors are counted and logged at most once a
    /// second.
    pub fn spawn(
        name: &str,
        listener: TcpListener,
        sender: crate::channel::Sender<OwnedFd>,
        stop: Arc<AtomicBool>,
        shared: Arc<Shared>,
    ) -> std::io::Result<AcceptThread> {
        let fd = listener.as_raw_fd();
        let what = name.to_string();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut reserve = ReserveDescriptor::open();
                let mut pause = ACCEPT_ERROR_PAUSE;
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            pause = ACCEPT_ERROR_PAUSE;
                            if !sender.send_blocking(OwnedFd::from(stream)) {
                                break;
                            }
                        }
                        Err(_) if stop.load(Ordering::SeqCst) => break,
                        Err(error) => {
                            let counters = &shared.counters;
                            Counters::add(&counters.accept_errors, 1);
                            let out_of_descriptors =
                                matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                            if out_of_descriptors && reserve.0.take().is_some() {
                                shared.faults.warn(Fault::Accept, || {
                                    format!(
                                        "{what}: accept failed: {error}; closing new \
                                         connections at once until descriptors are free"
                                    )
                                });
                                if let Ok((stream, _)) = listener.accept() {
                                    Counters::add(&counters.connections_shed, 1);
                                    drop(stream);
                                }
                                reserve = ReserveDescriptor::open();
                                continue;
                            }
                            shared.faults.warn(Fault::Accept, || {
                                format!(
                                    "{what}: accept failed: {error}; pausing {} ms",
                                    pause.as_millis()
                                )
                            });
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(ACCEPT_ERROR_PAUSE_MAX);
                            if reserve.0.is_none() {
                                reserve = ReserveDescriptor::open();
                            }
                        }
                    }
                }
            })?;
        Ok(AcceptThread { fd, handle })
    }

    /// Wakes the thread out of `accept(2)`; it ends if the stop flag is set.
    pub fn interrupt(&self) {
        // SAFETY: the listener is owned by the thread and open until the thread ends; a
        // shutdown makes the blocked accept return an error.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

/// On executor 0: the next connection from an accept thread, as a glommio stream, or `None`
/// once `stop` is set or the accept thread is gone.
pub async fn next_connection(
    accepted: &mut crate::channel::Inbox<OwnedFd>,
    stop: &crate::notify::Latch,
) -> Option<glommio::net::TcpStream> {
    if stop.is_set() {
        return None;
    }
    let fd = futures_lite::future::or(accepted.recv(), async {
        stop.wait().await;
        None
    })
    .await?;
    // SAFETY: a connected TCP socket from the accept thread, owned from here on.
    Some(unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) })
}
