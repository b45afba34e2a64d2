//! Accepting user clients: the connection limit, the id-line handshake with its deadline, and
//! the hand-off of each identified connection to the shard that owns its user.
//!
//! The hand-off goes through the owner's command channel, so the moment a client counts as
//! connected is one well-defined point of that shard's ordered stream: it receives exactly the
//! notifications of the batches queued after its registration.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use crate::channel;
use crate::listener;
use crate::notify::Latch;
use crate::protocol::parse_u64;
use crate::router::Ownership;
use crate::server::Shared;
use crate::shard::ShardCommand;
use crate::stats::{excerpt, Counters, Fault};

/// What the acceptor needs: the shared state, where to send each shard's clients, the stop
/// signal.
pub struct Acceptor {
    /// Server-wide configuration and counters.
    pub shared: std::sync::Arc<Shared>,
    /// Command channel of each shard.
    pub shards: Vec<channel::Outbox<ShardCommand>>,
    /// Set when the server stops.
    pub stop: Rc<Latch>,
}

/// How a handshake ended.
#[derive(Debug, PartialEq, Eq)]
enum Handshake {
    Identified(u64),
    BadId,
    TooLong,
    TimedOut,
    Closed,
}

/// Accepts clients until the stop signal.
pub async fn run(accepted: channel::Receiver<OwnedFd>, acceptor: Rc<Acceptor>) {
    let ownership = Rc::new(Ownership::new(acceptor.shards.len()));
    let mut accepted = accepted.attach();
    loop {
        let Some(stream) = listener::next_connection(&mut accepted, &acceptor.stop).await else {
            break;
        };
        let counters = &acceptor.shared.counters;
        Counters::add(&counters.clients_accepted, 1);
        let open = counters.clients_open.fetch_add(1, Ordering::Relaxed);
        if open >= acceptor.shared.config.max_clients as u64 {
            Counters::sub(&counters.clients_open, 1);
            Counters::add(&counters.clients_refused_max, 1);
            acceptor.shared.faults.warn(Fault::Refused, || {
                format!(
                    "refusing a client connection: --max-clients ({}) are open",
                    acceptor.shared.config.max_clients
                )
            });
            continue;
        }
        glommio::spawn_local(identify(stream, acceptor.clone(), ownership.clone())).detach();
    }
}

/// Reads the id line and hands the connection to its owner shard.
async fn identify(mut stream: TcpStream, acceptor: Rc<Acceptor>, ownership: Rc<Ownership>) {
    let shared = &acceptor.shared;
    let counters = &shared.counters;

    let outcome = read_id(&mut stream, shared).await;

    let user = match outcome {
        Handshake::Identified(user) => user,
        failure => {
            match failure {
                Handshake::BadId => Counters::add(&counters.clients_bad_id, 1),
                Handshake::TooLong => {
                    Counters::add(&counters.clients_id_too_long, 1);
                    shared.faults.warn(Fault::Handshake, || {
                        format!(
                            "closing a client: id line longer than --max-line ({})",
                            shared.config.max_line
                        )
                    });
                }
                Handshake::TimedOut => {
                    Counters::add(&counters.clients_handshake_timeout, 1);
                    shared.faults.warn(Fault::Handshake, || {
                        format!(
                            "closing a client: no id line within {} ms",
                            shared.config.handshake_timeout.as_millis()
                        )
                    });
                }
                _ => Counters::add(&counters.clients_closed_by_peer, 1),
            }
            Counters::sub(&counters.clients_open, 1);
            return;
        }
    };
    // SAFETY: dup of a descriptor we own; the copy goes to the owner shard, the original is
    // closed when `stream` drops here.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
    if fd < 0 {
        tracing::warn!(
            "cannot hand over client of user {user}: {}",
            std::io::Error::last_os_error()
        );
        Counters::sub(&counters.clients_open, 1);
        return;
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let owner = ownership.owner(user);
    if !acceptor.shards[owner]
        .send(ShardCommand::Register { user, fd })
        .await
    {
        Counters::sub(&counters.clients_open, 1);
    }
}

async fn read_id(stream: &mut TcpStream, shared: &Shared) -> Handshake {
    let max_line = shared.config.max_line;
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let mut line = vec![0u8; max_line + 2];
    let mut filled = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Handshake::TimedOut;
        }
        let _ = stream.set_read_timeout(Some(remaining));
        let n = match stream.read(&mut line[filled..]).await {
            Ok(0) => return Handshake::Closed,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                return Handshake::TimedOut
            }
            Err(_) => return Handshake::Closed,
        };
        let search_from = filled;
        filled += n;
        if let Some(offset) = memchr::memchr(b'\n', &line[search_from..filled]) {
            let mut id = &line[..search_from + offset];
            if let [rest @ .., b'\r'] = id {
                id = rest;
            }
            if id.len() > max_line {
                return Handshake::TooLong;
            }
            return match parse_u64(id) {
                Some(user) => Handshake::Identified(user),
                None => {
                    shared.faults.warn(Fault::Handshake, || {
                        format!("closing a client: id is not a u64: \"{}\"", excerpt(id))
                    });
                    Handshake::BadId
                }
            };
        }
        if filled == line.len() {
            return Handshake::TooLong;
        }
    }
}
