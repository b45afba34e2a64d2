//! Accepting user clients: the pool of connections waiting for their id line
//! (`--max-handshakes`: the oldest silent one past `--handshake-evict-grace-ms` is closed to
//! make room), the id-line handshake with its
//! deadline, the limit of identified clients (`--max-clients`), and the hand-off of each
//! identified connection to the shard that owns its user.
//!
//! The hand-off goes through the owner's command channel, so the moment a client counts as
//! connected is one well-defined point of that shard's ordered stream: it receives exactly the
//! notifications of the batches queued after its registration.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use crate::auth::IdRefusal;
use crate::channel;
use crate::listener;
use crate::notify::{Latch, Notify};
use crate::output_budget;
use crate::router::Ownership;
use crate::shard::ShardCommand;
use crate::shared::Shared;
use crate::stats::{excerpt, Counters, Fault};
use crate::tls::{self, PeerStream};

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
    Refused(IdRefusal),
    TooLong,
    TimedOut,
    Closed,
}

/// Bytes of an id line read at a time: a u64 and its line end fit, so a waiting connection
/// holds no buffer beyond its id.
const ID_READ_CHUNK: usize = 64;

/// After a burst of at least this many pending handshakes, the memory they used is given back
/// to the system once none is pending.
const HANDSHAKE_BURST_TRIM: usize = 256;

/// A connection waiting for its id line.
struct PendingHandshake {
    /// Closes it to make room.
    evict: Notify,
    /// Its socket, looked at (never read) before it is closed to make room.
    fd: RawFd,
    /// When the acceptor took it.
    since: Instant,
}

/// The connections waiting for their id line, oldest first (`--max-handshakes`).
#[derive(Default)]
struct PendingHandshakes {
    next: u64,
    waiting: BTreeMap<u64, Rc<PendingHandshake>>,
    peak: usize,
}

/// Why a full pool closed nobody.
enum NoneToEvict {
    /// The oldest silent connection is this much younger than the grace.
    TooYoung(Duration),
    /// Every connection past the grace has bytes waiting: its handshake is about to end.
    AllBusy,
}

impl PendingHandshakes {
    /// Closes the oldest connection that has waited at least `grace` and has no unread byte
    /// (a client whose id line waits unread, because the handshakes of a burst had not run
    /// yet or the machine is slow, is never the one closed).
    fn evict_oldest_silent(&mut self, grace: Duration) -> Result<(), NoneToEvict> {
        let now = Instant::now();
        let mut victim = None;
        for (&id, waiting) in &self.waiting {
            let age = now.saturating_duration_since(waiting.since);
            if age < grace {
                return Err(NoneToEvict::TooYoung(grace - age));
            }
            if !has_unread_bytes(waiting.fd) {
                victim = Some(id);
                break;
            }
        }
        let waiting = victim
            .and_then(|id| self.waiting.remove(&id))
            .ok_or(NoneToEvict::AllBusy)?;
        waiting.evict.notify();
        Ok(())
    }
}

/// True when the socket has bytes (or an end of file) waiting to be read; nothing is consumed.
fn has_unread_bytes(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local; the descriptor stays open while its handshake is
    // in the pool.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0
}

/// Accepts clients until the stop signal.
pub async fn run(accepted: channel::Receiver<OwnedFd>, acceptor: Rc<Acceptor>) {
    let ownership = Rc::new(Ownership::new(acceptor.shards.len()));
    let mut accepted = accepted.attach();
    let pending = Rc::new(RefCell::new(PendingHandshakes::default()));
    // Notified whenever a handshake ends, so the acceptor of a full pool can go on.
    let slot_freed = Rc::new(Notify::default());
    loop {
        let Some(stream) = listener::next_connection(&mut accepted, &acceptor.stop).await else {
            break;
        };
        let shared = &acceptor.shared;
        let counters = &shared.counters;
        Counters::add(&counters.clients_accepted, 1);
        let max = shared.config.max_handshakes;
        let mut evicted = 0;
        while pending.borrow().waiting.len() >= max {
            let outcome = pending
                .borrow_mut()
                .evict_oldest_silent(shared.config.handshake_evict_grace);
            match outcome {
                Ok(()) => evicted += 1,
                Err(NoneToEvict::TooYoung(wait)) => {
                    futures_lite::future::or(slot_freed.wait(), glommio::timer::sleep(wait)).await;
                }
                Err(NoneToEvict::AllBusy) => slot_freed.wait().await,
            }
        }
        if evicted > 0 {
            Counters::add(&counters.handshakes_evicted, evicted);
            shared.faults.warn(Fault::HandshakeEvicted, || {
                format!(
                    "closing the oldest connection without an id line: --max-handshakes \
                     ({max}) are waiting"
                )
            });
        }
        let (id, entry) = {
            let mut pending = pending.borrow_mut();
            let id = pending.next;
            pending.next += 1;
            let entry = Rc::new(PendingHandshake {
                evict: Notify::default(),
                fd: stream.as_raw_fd(),
                since: Instant::now(),
            });
            pending.waiting.insert(id, entry.clone());
            pending.peak = pending.peak.max(pending.waiting.len());
            (id, entry)
        };
        Counters::add(&counters.handshakes_open, 1);
        let acceptor = acceptor.clone();
        let ownership = ownership.clone();
        let pending = pending.clone();
        let slot_freed = slot_freed.clone();
        glommio::spawn_local(async move {
            let handshake = handshake(stream, &acceptor.shared);
            let outcome = futures_lite::future::or(handshake, async {
                entry.evict.wait().await;
                None
            })
            .await;
            Counters::sub(&acceptor.shared.counters.handshakes_open, 1);
            {
                let mut pending = pending.borrow_mut();
                pending.waiting.remove(&id);
                slot_freed.notify();
                if pending.waiting.is_empty() && pending.peak >= HANDSHAKE_BURST_TRIM {
                    pending.peak = 0;
                    output_budget::release_freed_memory();
                }
            }
            // `None`: evicted or TLS failed, counted where it happened.
            if let Some((stream, outcome)) = outcome {
                identified(stream, outcome, &acceptor, &ownership).await;
            }
        })
        .detach();
    }
}

/// Counts a failed handshake, or hands an identified connection to its owner shard.
async fn identified(
    stream: PeerStream,
    outcome: Handshake,
    acceptor: &Acceptor,
    ownership: &Ownership,
) {
    let shared = &acceptor.shared;
    let counters = &shared.counters;
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
            return;
        }
    };
    let open = counters.clients_open.fetch_add(1, Ordering::Relaxed);
    if open >= shared.config.max_clients as u64 {
        Counters::sub(&counters.clients_open, 1);
        Counters::add(&counters.clients_refused_max, 1);
        shared.faults.warn(Fault::Refused, || {
            format!(
                "refusing client of user {user}: --max-clients ({}) are connected",
                shared.config.max_clients
            )
        });
        return;
    }
    // SAFETY: dup of a descriptor we own; the copy goes to the owner shard (with the TLS
    // session, if any), the original is closed when `socket` drops here.
    let (socket, tls) = stream.into_parts();
    let fd = unsafe { libc::dup(socket.as_raw_fd()) };
    drop(socket);
    if fd < 0 {
        shared.faults.warn(Fault::Accept, || {
            format!(
                "cannot hand over client of user {user}: {}",
                std::io::Error::last_os_error()
            )
        });
        Counters::sub(&counters.clients_open, 1);
        return;
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let owner = ownership.owner(user);
    if acceptor.shards[owner]
        .send(ShardCommand::Register { user, fd, tls })
        .await
    {
        tracing::debug!("client of user {user} identified; handed to shard {owner}");
    } else {
        Counters::sub(&counters.clients_open, 1);
    }
}

/// The TLS handshake (if on) and the id line, within the handshake deadline; `None` when TLS
/// failed (counted and logged here).
async fn handshake(stream: TcpStream, shared: &Shared) -> Option<(PeerStream, Handshake)> {
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
                return None;
            }
        },
    };
    let outcome = read_id(&mut stream, shared, deadline).await;
    Some((stream, outcome))
}

async fn read_id(stream: &mut PeerStream, shared: &Shared, deadline: Instant) -> Handshake {
    let max_line = shared.config.max_line;
    let limit = max_line + 2;
    let mut chunk = [0u8; ID_READ_CHUNK];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Handshake::TimedOut;
        }
        let _ = stream.socket().set_read_timeout(Some(remaining));
        let room = (limit - line.len()).min(ID_READ_CHUNK);
        let n = match stream.read(&mut chunk[..room]).await {
            Ok(0) => return Handshake::Closed,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                return Handshake::TimedOut
            }
            Err(_) => return Handshake::Closed,
        };
        let search_from = line.len();
        line.extend_from_slice(&chunk[..n]);
        if let Some(offset) = memchr::memchr(b'\n', &line[search_from..]) {
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
        if line.len() >= limit {
            return Handshake::TooLong;
        }
    }
}
