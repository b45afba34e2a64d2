//! A small reference implementation of the efr protocol (PROTOCOL.md) with std threads, for
//! efr-load's tests, plus deliberate faults (drop, swap, extra line, stop sending) to show
//! that efr-load fails wrong servers. Written for clarity, not speed: the accepting thread
//! reads each client's id line, one thread for the event source writes to the clients
//! after each read of the source.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A deliberate fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A correct server.
    None,
    /// Drop the n-th notification (counting from 1 over all clients).
    DropNth(u64),
    /// Hold the n-th notification back and send it after that client's next one.
    SwapNth(u64),
    /// At source close, send one extra line to the first client before closing.
    ExtraAtEnd,
    /// Send nothing after the n-th notification and never close the clients.
    StopAfter(u64),
}

/// What a fault did: the client's user and the lines involved.
#[derive(Clone, Debug, Default)]
pub struct FaultLog {
    /// (user, line) of the fault: dropped line, held line, extra line, first unsent line.
    pub hits: Vec<(u64, String)>,
    /// For a swap: the line sent in place of the held one.
    pub swapped_in: Option<String>,
}

struct Client {
    user: u64,
    stream: TcpStream,
    alive: bool,
}

#[derive(Default)]
struct Registry {
    clients: Vec<Client>,
}

/// A running reference server.
pub struct RefServer {
    /// Event port.
    pub event_port: u16,
    /// Client port.
    pub client_port: u16,
    /// What the fault did.
    pub log: Arc<Mutex<FaultLog>>,
    /// Client connections accepted on `client_port`.
    pub accepted: Arc<std::sync::atomic::AtomicU64>,
    registry: Arc<Mutex<Registry>>,
}

impl RefServer {
    /// Opens one more client port sharing this server's clients (a second node's port, as
    /// far as the clients can tell); returns it and its count of accepted connections.
    pub fn add_client_port(&self) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind client port");
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        serve_clients(listener, self.registry.clone(), accepted.clone());
        (port, accepted)
    }
}

/// Accepts clients on `listener` into `registry` on a thread of its own.
fn serve_clients(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
) {
    std::thread::spawn(move || {
        // The id line is read right here (with a timeout), not in a thread per client:
        // spawning one per connection made the accept queue overflow with 10,000 clients.
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            serve_client(conn, registry.clone());
        }
    });
}

/// Starts a server on ephemeral ports of 127.0.0.1 (serves sessions until the process ends).
pub fn start(fault: Fault) -> RefServer {
    start_on(0, 0, fault)
}

/// Starts a server on the given ports (0 = ephemeral).
pub fn start_on(event_port: u16, client_port: u16, fault: Fault) -> RefServer {
    let events = TcpListener::bind(("127.0.0.1", event_port)).expect("bind event port");
    let clients = TcpListener::bind(("127.0.0.1", client_port)).expect("bind client port");
    let registry = Arc::new(Mutex::new(Registry::default()));
    let server = RefServer {
        event_port: events.local_addr().unwrap().port(),
        client_port: clients.local_addr().unwrap().port(),
        log: Arc::new(Mutex::new(FaultLog::default())),
        accepted: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        registry: registry.clone(),
    };
    serve_clients(clients, registry.clone(), server.accepted.clone());
    let log = server.log.clone();
    std::thread::spawn(move || {
        for conn in events.incoming() {
            let Ok(conn) = conn else { continue };
            serve_source(conn, &registry, fault, &log);
        }
    });
    server
}

fn serve_client(mut conn: TcpStream, registry: Arc<Mutex<Registry>>) {
    let mut id = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => id.push(byte[0]),
            _ => return,
        }
    }
    if id.last() == Some(&b'\r') {
        id.pop();
    }
    let Some(user) = std::str::from_utf8(&id)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    // The registry owns the only descriptor: no reader thread stays behind (a closed client
    // is noticed when a write to it fails), so 10,000 clients need 10,000 descriptors.
    registry.lock().unwrap().clients.push(Client {
        user,
        stream: conn,
        alive: true,
    });
}

#[derive(Clone, Copy)]
enum Ev {
    Follow(u64, u64),
    Unfollow(u64, u64),
    Broadcast,
    Private(u64),
    Status(u64),
    Bad,
}

fn parse(line: &str) -> Option<(u64, Ev)> {
    let mut f = line.split('|');
    let seq = f.next()?.parse().ok()?;
    let t = f.next();
    let a = f.next().map(|x| x.parse::<u64>());
    let b = f.next().map(|x| x.parse::<u64>());
    let extra = f.next().is_some();
    let ev = match (t, a, b, extra) {
        (Some("F"), Some(Ok(x)), Some(Ok(y)), false) => Ev::Follow(x, y),
        (Some("U"), Some(Ok(x)), Some(Ok(y)), false) => Ev::Unfollow(x, y),
        (Some("P"), Some(Ok(_)), Some(Ok(y)), false) => Ev::Private(y),
        (Some("S"), Some(Ok(x)), None, false) => Ev::Status(x),
        (Some("B"), None, None, false) => Ev::Broadcast,
        _ => Ev::Bad,
    };
    Some((seq, ev))
}

struct Session<'a> {
    fault: Fault,
    log: &'a Mutex<FaultLog>,
    followers: HashMap<u64, HashSet<u64>>,
    waiting: BTreeMap<u64, (Ev, String)>,
    next: u64,
    out: Vec<Vec<u8>>,
    sent: u64,
    held: Option<(usize, String)>,
    last_seq: u64,
    by_user: HashMap<u64, Vec<usize>>,
    indexed: usize,
    targets: Vec<usize>,
}

impl Session<'_> {
    fn emit(&mut self, reg: &Registry, ci: usize, payload: &str) {
        self.sent += 1;
        let n = self.sent;
        match self.fault {
            Fault::DropNth(k) if k == n => {
                self.log
                    .lock()
                    .unwrap()
                    .hits
                    .push((reg.clients[ci].user, payload.to_string()));
                return;
            }
            Fault::SwapNth(k) if k == n => {
                self.log
                    .lock()
                    .unwrap()
                    .hits
                    .push((reg.clients[ci].user, payload.to_string()));
                self.held = Some((ci, payload.to_string()));
                return;
            }
            Fault::StopAfter(k) if n > k => {
                if n == k + 1 {
                    self.log
                        .lock()
                        .unwrap()
                        .hits
                        .push((reg.clients[ci].user, payload.to_string()));
                }
                return;
            }
            _ => {}
        }
        let o = &mut self.out[ci];
        o.extend_from_slice(payload.as_bytes());
        o.push(b'\n');
        if let Some((hci, _)) = &self.held {
            if *hci == ci {
                let (_, h) = self.held.take().unwrap();
                self.log.lock().unwrap().swapped_in = Some(payload.to_string());
                let o = &mut self.out[ci];
                o.extend_from_slice(h.as_bytes());
                o.push(b'\n');
            }
        }
    }

    fn index_clients(&mut self, reg: &Registry) {
        for i in self.indexed..reg.clients.len() {
            self.by_user.entry(reg.clients[i].user).or_default().push(i);
        }
        self.indexed = reg.clients.len();
    }

    fn deliver(&mut self, reg: &Registry, ev: Ev, payload: &str) {
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        let none = Vec::new();
        match ev {
            Ev::Follow(a, b) => {
                self.followers.entry(b).or_default().insert(a);
                targets.extend(self.by_user.get(&b).unwrap_or(&none));
            }
            Ev::Unfollow(a, b) => {
                if let Some(s) = self.followers.get_mut(&b) {
                    s.remove(&a);
                }
            }
            Ev::Private(b) => targets.extend(self.by_user.get(&b).unwrap_or(&none)),
            Ev::Broadcast => targets.extend(0..reg.clients.len()),
            Ev::Status(a) => {
                if let Some(fol) = self.followers.get(&a) {
                    for u in fol {
                        targets.extend(self.by_user.get(u).unwrap_or(&none));
                    }
                }
            }
            Ev::Bad => {}
        }
        for &ci in &targets {
            if reg.clients[ci].alive {
                self.emit(reg, ci, payload);
            }
        }
        self.targets = targets;
    }

    fn flush(&mut self, reg: &mut Registry) {
        for (ci, o) in self.out.iter_mut().enumerate() {
            if !o.is_empty() {
                let c = &mut reg.clients[ci];
                if c.alive && c.stream.write_all(o).is_err() {
                    c.alive = false;
                }
                o.clear();
            }
        }
    }
}

fn serve_source(conn: TcpStream, registry: &Mutex<Registry>, fault: Fault, log: &Mutex<FaultLog>) {
    let mut reader = BufReader::with_capacity(64 * 1024, conn);
    let mut s = Session {
        fault,
        log,
        followers: HashMap::new(),
        waiting: BTreeMap::new(),
        next: 1,
        out: Vec::new(),
        sent: 0,
        held: None,
        last_seq: 0,
        by_user: HashMap::new(),
        indexed: 0,
        targets: Vec::new(),
    };
    let mut partial = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(c) => c.to_vec(),
        };
        reader.consume(chunk.len());
        partial.extend_from_slice(&chunk);
        let mut lines = Vec::new();
        while let Some(n) = partial.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = partial.drain(..=n).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        let mut reg = registry.lock().unwrap();
        s.out.resize(reg.clients.len(), Vec::new());
        s.index_clients(&reg);
        for line in lines {
            if let Some((seq, ev)) = parse(&line) {
                if seq >= s.next {
                    s.waiting.entry(seq).or_insert((ev, line));
                }
            }
        }
        while let Some((ev, line)) = s.waiting.remove(&s.next) {
            s.deliver(&reg, ev, &line);
            s.last_seq = s.next;
            s.next += 1;
        }
        s.flush(&mut reg);
    }
    // Source closed: deliver what waits, skipping holes, then close every client.
    let mut reg = registry.lock().unwrap();
    s.out.resize(reg.clients.len(), Vec::new());
    s.index_clients(&reg);
    let rest: Vec<(u64, (Ev, String))> = std::mem::take(&mut s.waiting).into_iter().collect();
    for (seq, (ev, line)) in rest {
        s.deliver(&reg, ev, &line);
        s.last_seq = seq;
    }
    if let Some((ci, h)) = s.held.take() {
        s.out[ci].extend_from_slice(h.as_bytes());
        s.out[ci].push(b'\n');
    }
    if fault == Fault::ExtraAtEnd {
        if let Some(ci) = (0..reg.clients.len()).find(|&i| reg.clients[i].alive) {
            let line = format!("{}|B", s.last_seq + 1);
            log.lock()
                .unwrap()
                .hits
                .push((reg.clients[ci].user, line.clone()));
            s.out[ci].extend_from_slice(line.as_bytes());
            s.out[ci].push(b'\n');
        }
    }
    s.flush(&mut reg);
    if matches!(fault, Fault::StopAfter(_)) {
        // Hang on to the clients: they stay open and silent.
        std::mem::forget(std::mem::take(&mut reg.clients));
        return;
    }
    for c in reg.clients.drain(..) {
        let _ = c.stream.shutdown(Shutdown::Both);
    }
}
