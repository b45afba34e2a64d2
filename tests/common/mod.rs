//! Test support: a harness-style workload generator, an independent model of the expected
//! notifications, and a driver that plays the event source and the user clients over real
//! loopback TCP against a server started through the library's `start` entry.
#![allow(dead_code)]

pub mod nats;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use efr::config::Config;
use efr::server::RunningServer;

/// How long a test waits for anything before it fails.
pub const TEST_DEADLINE: Duration = Duration::from_secs(10);

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A harness-style workload: events in seq order (as lines) and the connected user ids.
pub struct Workload {
    pub events: Vec<String>,
    pub clients: Vec<u64>,
}

/// The original harness's model: F, U, P 15% each, S 55%, B 0.01% (the rest of 0.01% is S
/// too); users uniform over 1..=users, from != to; `clients` distinct connected users.
pub fn harness_workload(seed: u64, events: usize, users: u64, clients: usize) -> Workload {
    let mut rng = Rng::new(seed);
    let mut lines = Vec::with_capacity(events);
    for seq in 1..=events as u64 {
        let roll = rng.below(10_000);
        let from = 1 + rng.below(users);
        let mut to = 1 + rng.below(users);
        if to == from {
            to = to % users + 1;
        }
        let line = if roll < 1 {
            format!("{seq}|B")
        } else if roll < 1501 {
            format!("{seq}|F|{from}|{to}")
        } else if roll < 3001 {
            format!("{seq}|U|{from}|{to}")
        } else if roll < 4501 {
            format!("{seq}|P|{from}|{to}")
        } else {
            format!("{seq}|S|{from}")
        };
        lines.push(line);
    }
    let mut ids: Vec<u64> = (1..=users).collect();
    rng.shuffle(&mut ids);
    ids.truncate(clients);
    Workload {
        events: lines,
        clients: ids,
    }
}

/// Harness arrival order: contiguous batches of 1..=max events, each shuffled. Returns the
/// batches as lists of 0-based event indices.
pub fn harness_batches(seed: u64, events: usize, max: usize) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed ^ 0xBA7C);
    let mut batches = Vec::new();
    let mut next = 0;
    while next < events {
        let size = (1 + rng.below(max as u64) as usize).min(events - next);
        let mut batch: Vec<usize> = (next..next + size).collect();
        rng.shuffle(&mut batch);
        batches.push(batch);
        next += size;
    }
    batches
}

/// The expected notifications of each connected user, computed by walking the events in seq
/// order with a plain follow graph. Independent of the server's code.
pub fn expected_notifications(events: &[String], clients: &[u64]) -> HashMap<u64, Vec<String>> {
    let connected: HashSet<u64> = clients.iter().copied().collect();
    let mut followers: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut expected: HashMap<u64, Vec<String>> =
        clients.iter().map(|&c| (c, Vec::new())).collect();
    let mut ordered: Vec<&String> = events.iter().filter(|line| is_well_formed(line)).collect();
    ordered.sort_by_key(|line| line.split('|').next().unwrap().parse::<u64>().unwrap());
    for line in ordered {
        let fields: Vec<&str> = line.split('|').collect();
        let num = |i: usize| fields[i].parse::<u64>().unwrap();
        let notify = |user: u64, expected: &mut HashMap<u64, Vec<String>>| {
            if connected.contains(&user) {
                expected.get_mut(&user).unwrap().push(line.clone());
            }
        };
        match fields[1] {
            "F" => {
                followers.entry(num(3)).or_default().insert(num(2));
                notify(num(3), &mut expected);
            }
            "U" => {
                if let Some(set) = followers.get_mut(&num(3)) {
                    set.remove(&num(2));
                }
            }
            "P" => notify(num(3), &mut expected),
            "B" => {
                for &c in clients {
                    notify(c, &mut expected);
                }
            }
            "S" => {
                let mut targets: Vec<u64> = followers
                    .get(&num(2))
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                targets.sort_unstable();
                for user in targets {
                    notify(user, &mut expected);
                }
            }
            other => panic!("unknown type {other}"),
        }
    }
    expected
}

/// Whether a line is a valid event: the model treats any other line as a no-op.
pub fn is_well_formed(line: &str) -> bool {
    let fields: Vec<&str> = line.split('|').collect();
    let number = |f: &str| {
        !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) && f.parse::<u64>().is_ok()
    };
    if fields.len() < 2 || !number(fields[0]) {
        return false;
    }
    match (fields[1], fields.len()) {
        ("F" | "U" | "P", 4) => number(fields[2]) && number(fields[3]),
        ("S", 3) => number(fields[2]),
        ("B", 2) => true,
        _ => false,
    }
}

/// The value of one of the server's counters, e.g. `count(&server, |c| &c.sessions)`.
pub fn count(
    server: &RunningServer,
    pick: impl Fn(&efr::stats::Counters) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    pick(server.counters()).load(Ordering::Relaxed)
}

/// Waits until `condition` holds, looking every 5 ms, or fails after the test deadline.
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + TEST_DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a server on ephemeral loopback ports.
pub fn start_server(config: Config) -> RunningServer {
    efr::server::start(config).expect("server starts")
}

/// Waits until the server has registered `count` clients in total.
pub fn wait_registered(server: &RunningServer, count: u64) {
    let deadline = Instant::now() + TEST_DEADLINE;
    while server.counters().clients_registered.load(Ordering::Relaxed) < count {
        assert!(
            Instant::now() < deadline,
            "clients were not registered in time: {}",
            server.counters().summary()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A connected user client whose bytes are collected by a thread until EOF.
pub struct Client {
    pub user: u64,
    pub stream: TcpStream,
    reader: Option<JoinHandle<Vec<u8>>>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Client {
    /// Connects and sends the id line with `ending` ("\n" or "\r\n").
    pub fn connect(addr: SocketAddr, user: u64, ending: &str) -> Client {
        let mut stream = TcpStream::connect(addr).expect("client connects");
        stream
            .write_all(format!("{user}{ending}").as_bytes())
            .unwrap();
        let mut read_half = stream.try_clone().unwrap();
        read_half.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = received.clone();
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut chunk = vec![0; 64 * 1024];
            loop {
                match read_half.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        bytes.extend_from_slice(&chunk[..n]);
                        progress.store(bytes.len() as u64, Ordering::Release);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    // A timeout or a reset: what came so far is what the check compares.
                    Err(_) => break,
                }
            }
            bytes
        });
        Client {
            user,
            stream,
            reader: Some(reader),
            received,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Waits for EOF (the server closes clients at source close) and returns all bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.reader.take().unwrap().join().unwrap()
    }
}

/// Connects one client per user and waits until the server registered all of them.
pub fn connect_all(server: &RunningServer, users: &[u64], ending: &str) -> Vec<Client> {
    let before = server.counters().clients_registered.load(Ordering::Relaxed);
    let clients: Vec<Client> = users
        .iter()
        .map(|&u| Client::connect(server.client_addr, u, ending))
        .collect();
    wait_registered(server, before + users.len() as u64);
    clients
}

/// Sends the events as the source: each batch of indices written at once, lines ended with
/// `ending`; then closes the source.
pub fn send_source(addr: SocketAddr, events: &[String], batches: &[Vec<usize>], ending: &str) {
    let mut source = TcpStream::connect(addr).expect("source connects");
    let mut buffer = Vec::new();
    for batch in batches {
        buffer.clear();
        for &index in batch {
            buffer.extend_from_slice(events[index].as_bytes());
            buffer.extend_from_slice(ending.as_bytes());
        }
        source.write_all(&buffer).unwrap();
    }
    source.shutdown(Shutdown::Write).unwrap();
    // Wait for the server to close the source connection (end of session).
    let mut rest = Vec::new();
    let _ = source.read_to_end(&mut rest);
}

/// Compares every client's bytes with its expected lines, line by line.
pub fn check_clients(clients: Vec<Client>, expected: &HashMap<u64, Vec<String>>) {
    for client in clients {
        let user = client.user;
        let bytes = client.finish();
        let text = String::from_utf8(bytes).expect("utf-8 output");
        let got: Vec<&str> = text.lines().collect();
        let want = &expected[&user];
        for (index, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(g, w, "client {user} line {index}");
        }
        assert_eq!(got.len(), want.len(), "client {user}: line count");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "client {user}: unterminated output"
        );
    }
}

/// Reads lines from a stream until `count` lines have arrived.
pub fn read_lines(stream: &TcpStream, count: usize) -> Vec<String> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut lines = Vec::new();
    for _ in 0..count {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        lines.push(line);
    }
    lines
}

/// One full run: connect clients, send the workload in harness order, check every byte.
pub fn harness_run(server: &RunningServer, workload: &Workload, seed: u64, ending: &str) {
    let clients = connect_all(server, &workload.clients, ending);
    let batches = harness_batches(seed, workload.events.len(), 100);
    send_source(server.event_addr, &workload.events, &batches, ending);
    let expected = expected_notifications(&workload.events, &workload.clients);
    check_clients(clients, &expected);
}

/// Waits until `condition` holds, or fails after the test deadline.
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_or(what, condition, String::new);
}

/// [`wait_until`], with `context()` in the failure message.
pub fn wait_until_or(
    what: &str,
    mut condition: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + TEST_DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what} {}",
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The value of one counter.
pub fn counter(
    server: &RunningServer,
    pick: impl Fn(&efr::stats::Counters) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    pick(server.counters()).load(Ordering::Relaxed)
}

/// An event source that stays connected until [`Source::finish`]; every write and read has
/// the test deadline, so a stalled server fails the test instead of hanging it.
pub struct Source {
    stream: TcpStream,
}

impl Source {
    pub fn connect(addr: SocketAddr) -> Source {
        let stream = TcpStream::connect(addr).expect("source connects");
        stream.set_write_timeout(Some(TEST_DEADLINE)).unwrap();
        stream.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
        Source { stream }
    }

    /// Writes the events in the order of `batches` (0-based indices), LF-terminated.
    pub fn send(&mut self, events: &[String], batches: &[Vec<usize>]) {
        let mut buffer = Vec::new();
        for batch in batches {
            buffer.clear();
            for &index in batch {
                buffer.extend_from_slice(events[index].as_bytes());
                buffer.push(b'\n');
            }
            self.stream
                .write_all(&buffer)
                .expect("the server takes the source's events in time");
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("the server takes the source's bytes in time");
    }

    /// Closes the source's sending side and waits until the server ends the session.
    pub fn finish(self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        self.wait_closed();
    }

    /// Waits until the server closes the source connection.
    pub fn wait_closed(mut self) {
        let mut rest = Vec::new();
        self.stream
            .read_to_end(&mut rest)
            .expect("the server ends the session in time");
    }
}

/// Events in seq order from 1, as harness arrival batches of at most 100.
pub fn in_order_batches(events: usize) -> Vec<Vec<usize>> {
    (0..events)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| chunk.to_vec())
        .collect()
}

/// A client that sends its id line and then writes as fast as it can, never reading.
pub struct Flooder {
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flooder {
    pub fn start(addr: SocketAddr, user: u64) -> Flooder {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut stream = TcpStream::connect(addr).expect("flooder connects");
        stream.write_all(format!("{user}\n").as_bytes()).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let thread = {
            let sent = sent.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let junk = vec![b'x'; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match stream.write(&junk) {
                        Ok(n) => {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(error)
                            if matches!(
                                error.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            })
        };
        Flooder {
            sent,
            stop,
            thread: Some(thread),
        }
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client that sends its id and never reads, with a small receive buffer so the server's
/// output to it backs up quickly.
pub fn stalled_client(addr: SocketAddr, user: u64) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect(&addr.into())
        .expect("stalled client connects");
    let mut stream: TcpStream = socket.into();
    stream.write_all(format!("{user}\n").as_bytes()).unwrap();
    stream
}

/// True when the server closed the connection (EOF or reset) within the test deadline,
/// reading and dropping whatever arrives before.
pub fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut scratch = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) => {
                return matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            }
        }
    }
}

/// The real `efr-sharded` binary on ephemeral ports, its log lines collected.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub event_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts the binary with `extra` flags; `before_exec` runs in the child before exec.
    pub fn start(extra: &[&str], before_exec: Option<fn() -> std::io::Result<()>>) -> Self {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_efr-sharded"));
        command
            .args(["--event-port", "0", "--client-port", "0", "--cores", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(hook) = before_exec {
            // SAFETY: the hook only makes async-signal-safe system calls.
            unsafe {
                command.pre_exec(hook);
            }
        }
        let mut child = command.spawn().expect("efr-sharded starts");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("events on ").nth(1) {
                        let field = |text: &str| -> SocketAddr {
                            text.split(',').next().unwrap().trim().parse().unwrap()
                        };
                        let event = field(rest);
                        let client = field(rest.split("clients on ").nth(1).unwrap());
                        let _ = addr_sender.send((event, client));
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let (event_addr, client_addr) = addr_receiver
            .recv_timeout(TEST_DEADLINE)
            .expect("efr-sharded prints its ports");
        ServerProcess {
            child,
            event_addr,
            client_addr,
            log,
        }
    }

    /// Whether a log line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(text))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the exit (at most the test deadline) and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TEST_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "efr-sharded did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
