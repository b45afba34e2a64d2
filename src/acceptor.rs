//! Accepting user clients: the pool of connections waiting for their id line
//! (`--max-handshakes`, the oldest closed to make room), the id-line handshake with its
//! deadline, the limit of identified clients (`--max-clients`), and the hand-off of each
//! identified connection to the shard that owns its user.
//!
//! The hand-off goes through the owner's command channel, so the moment a client counts as
//! connected is one well-defined point of that shard's ordered stream: it receives exactly the
//! notifications of the batches queued after its registration.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

use crate::channel;
use crate::listener;
use crate::notify::{Latch, Notify};
use crate::output_budget;
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
    pub shards: Vec<flume::Sender<ShardCommand>>,
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
    Evicted,
}

/// Bytes of an id line read at a time: a u64 and its line end fit, so a waiting connection
/// holds no buffer beyond its id.
const ID_READ_CHUNK: usize = 64;

/// After a burst of at least this many pending handshakes, the memory they used is given back
/// to the system once none is pending.
const HANDSHAKE_BURST_TRIM: usize = 256;

/// The connections waiting for their id line, oldest first, each with the signal that closes
/// it to make room (`--max-handshakes`).
#[derive(Default)]
struct PendingHandshakes {
    next: u64,
    waiting: BTreeMap<u64, Rc<Notify>>,
    peak: usize,
}

/// Accepts clients until the stop signal.
pub async fn run(accepted: flume::Receiver<OwnedFd>, acceptor: Rc<Acceptor>) {
    let ownership = Rc::new(Ownership::new(acceptor.shards.len()));
    let pending = Rc::new(RefCell::new(PendingHandshakes::default()));
    loop {
        let Some(stream) = listener::next_connection(&accepted, &acceptor.stop).await else {
            break;
        };
        let shared = &acceptor.shared;
        let counters = &shared.counters;
        Counters::add(&counters.clients_accepted, 1);
        let (id, evict) = {
            let mut pending = pending.borrow_mut();
            let max = shared.config.max_handshakes;
            let mut evicted = 0;
            while pending.waiting.len() >= max {
                let Some((_, oldest)) = pending.waiting.pop_first() else {
                    break;
                };
                oldest.notify();
                evicted += 1;
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
            let id = pending.next;
            pending.next += 1;
            let evict = Rc::new(Notify::default());
            pending.waiting.insert(id, evict.clone());
            pending.peak = pending.peak.max(pending.waiting.len());
            (id, evict)
        };
        Counters::add(&counters.handshakes_open, 1);
        let acceptor = acceptor.clone();
        let ownership = ownership.clone();
        let pending = pending.clone();
        glommio::spawn_local(async move {
            let mut stream = stream;
            let outcome = futures_lite::future::or(read_id(&mut stream, &acceptor.shared), async {
                evict.wait().await;
                Handshake::Evicted
            })
            .await;
            Counters::sub(&acceptor.shared.counters.handshakes_open, 1);
            {
                let mut pending = pending.borrow_mut();
                pending.waiting.remove(&id);
                if pending.waiting.is_empty() && pending.peak >= HANDSHAKE_BURST_TRIM {
                    pending.peak = 0;
                    output_budget::release_freed_memory();
                }
            }
            identified(stream, outcome, &acceptor, &ownership).await;
        })
        .detach();
    }
}

/// Counts a failed handshake, or hands an identified connection to its owner shard.
async fn identified(
    stream: TcpStream,
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
                // Counted when it was chosen.
                Handshake::Evicted => {}
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
    // SAFETY: dup of a descriptor we own; the copy goes to the owner shard, the original is
    // closed when `stream` drops here.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
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
    if !channel::send(&acceptor.shards[owner], ShardCommand::Register { user, fd }).await {
        Counters::sub(&counters.clients_open, 1);
    }
}

async fn read_id(stream: &mut TcpStream, shared: &Shared) -> Handshake {
    let max_line = shared.config.max_line;
    let limit = max_line + 2;
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let mut chunk = [0u8; ID_READ_CHUNK];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Handshake::TimedOut;
        }
        let _ = stream.set_read_timeout(Some(remaining));
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
        if line.len() >= limit {
            return Handshake::TooLong;
        }
    }
}
