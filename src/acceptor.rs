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

use crate::auth::IdRefusal;
use crate::channel;
use crate::listener;
use crate::notify::Latch;
use crate::router::Ownership;
use crate::server::Shared;
use crate::shard::ShardCommand;
use crate::stats::{excerpt, Counters, Fault};
use crate::tls::{self, PeerStream};

/// What the acceptor needs: the shared state, where to send each shard's clients, the stop
/// signal.
pub struct Acceptor {
    /// Server-wide configuration and counters.
    pub shared: std::sync::Arc<Shared>,
    /// Command channel of each shard.
    pub shards: Vec<flume::Sender<ShardCommand>>,
    /// Set when the server stops.
    pub stop: Rc<Latch>,
}

/// How a handshake ended.
#[derive(Debug, PartialEq, Eq)]
enum Handshake {
    Identified(u64),
    BadId,
    Refused(IdRefusal),
    TooLong,
    TimedOut,
    Closed,
}

/// Accepts clients until the stop signal.
pub async fn run(accepted: flume::Receiver<OwnedFd>, acceptor: Rc<Acceptor>) {
    let ownership = Rc::new(Ownership::new(acceptor.shards.len()));
    loop {
        let Some(stream) = listener::next_connection(&accepted, &acceptor.stop).await else {
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
async fn identify(stream: TcpStream, acceptor: Rc<Acceptor>, ownership: Rc<Ownership>) {
    let shared = &acceptor.shared;
    let counters = &shared.counters;
    let deadline = Instant::now() + shared.config.handshake_timeout;

    let mut stream = match &shared.config.tls {
        None => PeerStream::Plain(stream),
        Some(tls) => match tls::accept_within(stream, tls.for_clients(), deadline).await {
            Ok(stream) => stream,
            Err(error) => {
                Counters::add(&counters.clients_tls_failed, 1);
                shared.faults.warn(Fault::Tls, || {
                    format!("closing a client: TLS handshake failed: {error}")
                });
                Counters::sub(&counters.clients_open, 1);
                return;
            }
        },
    };
    let outcome = read_id(&mut stream, shared, deadline).await;

    let user = match outcome {
        Handshake::Identified(user) => user,
        failure => {
            match failure {
                Handshake::BadId => Counters::add(&counters.clients_bad_id, 1),
                Handshake::Refused(refusal) => {
                    let counter = match refusal {
                        IdRefusal::MissingToken => &counters.clients_token_missing,
                        IdRefusal::BadSignature => &counters.clients_token_bad_signature,
                        IdRefusal::Expired => &counters.clients_token_expired,
                        IdRefusal::OtherUser => &counters.clients_token_other_user,
                        IdRefusal::MalformedToken | IdRefusal::NotAnId => {
                            &counters.clients_token_malformed
                        }
                    };
                    Counters::add(counter, 1);
                }
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
    // SAFETY: dup of a descriptor we own; the copy goes to the owner shard (with the TLS
    // session, if any), the original is closed when `socket` drops here.
    let (socket, tls) = stream.into_parts();
    let fd = unsafe { libc::dup(socket.as_raw_fd()) };
    drop(socket);
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
    if !channel::send(
        &acceptor.shards[owner],
        ShardCommand::Register { user, fd, tls },
    )
    .await
    {
        Counters::sub(&counters.clients_open, 1);
    }
}

async fn read_id(stream: &mut PeerStream, shared: &Shared, deadline: Instant) -> Handshake {
    let max_line = shared.config.max_line;
    let mut line = vec![0u8; max_line + 2];
    let mut filled = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Handshake::TimedOut;
        }
        let _ = stream.socket().set_read_timeout(Some(remaining));
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
            return match shared.config.client_auth.identify(id) {
                Ok(user) => Handshake::Identified(user),
                Err(IdRefusal::NotAnId) => {
                    // With tokens on, only the id part is shown: the token stays out of logs.
                    let shown = match memchr::memchr(b' ', id) {
                        Some(space) if shared.config.client_auth.requires_tokens() => &id[..space],
                        _ => id,
                    };
                    shared.faults.warn(Fault::Handshake, || {
                        format!("closing a client: id is not a u64: \"{}\"", excerpt(shown))
                    });
                    Handshake::BadId
                }
                Err(refusal) => {
                    let claimed = memchr::memchr(b' ', id).map_or(id, |space| &id[..space]);
                    shared.faults.warn(Fault::Token, || {
                        format!(
                            "closing a client claiming id \"{}\": {}",
                            excerpt(claimed),
                            refusal.describe()
                        )
                    });
                    Handshake::Refused(refusal)
                }
            };
        }
        if filled == line.len() {
            return Handshake::TooLong;
        }
    }
}
