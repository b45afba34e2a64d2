//! Failure drills of a cluster's follow graph over a real nats-server (JetStream, file store in
//! a temporary directory, a free port): follow-graph snapshots, a late edge, an edge killed
//! with SIGKILL and restarted, nats-server killed while snapshots are written. Nodes run
//! in-process through `start`, or as the real binary where a drill kills one; clients and the
//! source talk loopback TCP and every byte is checked.
//!
//! These tests need `nats-server` (scripts/install-nats.sh installs it). Without it they are
//! skipped with a message, except under CI=true, where they fail.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::nats::*;
use common::*;
use efr::cluster::store::{object_name, SnapshotStore, KEEP_SNAPSHOTS};
use efr::config::{Config, Role};
use efr::server::RunningServer;

const BINARY: &str = env!("CARGO_BIN_EXE_efr-sharded");
/// How long a drill waits for a condition (NATS restarts, snapshot loads on a loaded machine).
const DEADLINE: Duration = Duration::from_secs(60);
/// Events between snapshots in these drills.
const SNAPSHOT_EVENTS: u64 = 10_000;

fn node(role: Role, nats: &NatsServer, cores: usize) -> Config {
    let mut config = Config::ephemeral(cores);
    config.role = role;
    config.nats.url = nats.url();
    config.nats.resume = true;
    config.nats.snapshot_interval = None;
    config.nats.snapshot_events = Some(SNAPSHOT_EVENTS);
    config
}

fn counter(server: &RunningServer, name: &str) -> u64 {
    server
        .counters()
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Batches of `events[range]` in a shuffled order the resequencer puts right.
fn batches_of(range: std::ops::Range<usize>) -> Vec<Vec<usize>> {
    harness_batches(range.start as u64 + 7, range.len(), 50)
        .into_iter()
        .map(|batch| batch.into_iter().map(|i| i + range.start).collect())
        .collect()
}

/// A client whose bytes a thread collects until EOF.
struct EdgeClient {
    user: u64,
    /// The bytes, and whether the read ended with EOF (not the read timeout).
    reader: std::thread::JoinHandle<(Vec<u8>, bool)>,
}

impl EdgeClient {
    fn connect(addr: SocketAddr, user: u64) -> EdgeClient {
        let mut stream = TcpStream::connect(addr).expect("client connects");
        stream.write_all(format!("{user}\n").as_bytes()).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let closed = stream.read_to_end(&mut bytes).is_ok();
            (bytes, closed)
        });
        EdgeClient { user, reader }
    }

    /// Its lines, once the server closed it: fails if it was still open after [`DEADLINE`].
    fn lines_until_closed(self) -> (u64, Vec<String>) {
        let (user, (bytes, closed)) = (self.user, self.reader.join().unwrap());
        assert!(
            closed,
            "user {user}: not closed by the server within the deadline"
        );
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.is_empty() || text.ends_with('\n'), "unterminated");
        (user, text.lines().map(str::to_string).collect())
    }

    fn lines(self) -> (u64, Vec<String>) {
        let (bytes, _) = self.reader.join().unwrap();
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.is_empty() || text.ends_with('\n'), "unterminated");
        (self.user, text.lines().map(str::to_string).collect())
    }
}

/// What each user receives from the events after the first `from` ones, the graph of those
/// included.
fn expected_after(events: &[String], users: &[u64], from: usize) -> HashMap<u64, Vec<String>> {
    let first_new_seq = from as u64 + 1;
    expected_notifications(events, users)
        .into_iter()
        .map(|(user, lines)| {
            let lines = lines
                .into_iter()
                .filter(|line| {
                    line.split('|').next().unwrap().parse::<u64>().unwrap() >= first_new_seq
                })
                .collect();
            (user, lines)
        })
        .collect()
}

fn check(clients: Vec<EdgeClient>, expected: &HashMap<u64, Vec<String>>, edge: &str) {
    let mut notified = 0;
    for client in clients {
        let (user, got) = client.lines();
        assert_eq!(got.len(), expected[&user].len(), "{edge}: user {user}");
        assert_eq!(&got, &expected[&user], "{edge}: user {user}");
        notified += got.len();
    }
    assert!(notified > 0, "{edge}: the drill notified nobody");
}

fn connect_and_register(
    server: &RunningServer,
    addr: SocketAddr,
    users: &[u64],
) -> Vec<EdgeClient> {
    let before = counter(server, "clients_registered");
    let clients = users
        .iter()
        .map(|&u| EdgeClient::connect(addr, u))
        .collect();
    wait_until("registrations", || {
        counter(server, "clients_registered") >= before + users.len() as u64
    });
    clients
}

#[test]
fn a_late_edge_loads_the_snapshot_and_serves_the_same_bytes_as_an_old_edge() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    // One snapshot within the head: at the first message past 20,000 events (a message
    // holds at most a few thousand), the next one would need 40,000.
    let mut old_config = node(Role::Edge, &nats, 2);
    old_config.nats.snapshot_events = Some(20_000);
    let old = start_server(old_config);
    let workload = harness_workload(41, 40_000, 500, 50);
    let events = &workload.events;
    let head = 30_000;
    send_source(ingest.event_addr, events, &batches_of(0..head), "\n");
    wait_until("the old edge applies the head", || {
        counter(&old, "events_delivered") == head as u64
    });
    assert_eq!(counter(&old, "snapshots_written"), 1);
    assert_eq!(counter(&old, "snapshot_writer"), 1);
    let late = start_server(node(Role::Edge, &nats, 1));
    // Before its port opened, it loaded the snapshot and applied the graph changes after it
    // up to the stream's end: none of them reached its shards as deliveries.
    assert_eq!(counter(&late, "snapshots_loaded"), 1);
    assert!(counter(&late, "snapshot_edges") > 1_000);
    let caught_up = counter(&late, "nats_catch_up_events");
    assert!(caught_up > 0 && caught_up <= 10_000, "{caught_up}");
    assert_eq!(counter(&late, "events_delivered"), caught_up);
    assert_eq!(
        counter(&late, "nats_last_applied_stream_seq"),
        counter(&old, "nats_last_applied_stream_seq")
    );
    let users = &workload.clients;
    let old_clients = connect_and_register(&old, old.client_addr, users);
    let late_clients = connect_and_register(&late, late.client_addr, users);
    send_source(
        ingest.event_addr,
        events,
        &batches_of(head..events.len()),
        "\n",
    );
    wait_until("the old edge applies the tail", || {
        counter(&old, "events_delivered") == events.len() as u64
    });
    wait_until("the late edge applies the tail", || {
        counter(&late, "nats_last_applied_stream_seq")
            == counter(&old, "nats_last_applied_stream_seq")
    });
    old.stop();
    late.stop();
    let expected = expected_after(events, users, head);
    check(old_clients, &expected, "old edge");
    check(late_clients, &expected, "late edge");
    for edge in [old, late] {
        assert_eq!(counter(&edge, "nats_stream_gaps"), 0);
        edge.wait().unwrap();
    }
    ingest.stop_and_wait().unwrap();
}

/// A node as the real binary, its stderr scanned for log lines.
struct BinaryNode {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl BinaryNode {
    fn start(args: &[&str]) -> BinaryNode {
        Self::start_program(BINARY, args)
    }

    fn start_program(program: &str, args: &[&str]) -> BinaryNode {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("efr-sharded starts");
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        BinaryNode {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.log.iter().find(|line| line.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}: {:#?}", self.log));
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The client address from the "listening" line.
    fn client_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line("efr-sharded listening");
        let addr = line
            .split("clients on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .expect("clients on ADDR");
        addr.trim().parse().expect("an address")
    }

    /// A value of the metrics page (`--metrics-addr`), by counter name.
    fn metric(&mut self, name: &str) -> u64 {
        let line = self.wait_for_line("metrics on http://");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("metrics address");
        let mut stream = TcpStream::connect(addr).expect("metrics connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: efr\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        let key = format!("efr_{name} ");
        page.lines()
            .find_map(|line| line.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BinaryNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_edge_killed_with_sigkill_restarts_from_the_snapshot_and_serves_new_clients() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let reference = start_server(node(Role::Edge, &nats, 1));
    let url = nats.url();
    let snapshot_events = SNAPSHOT_EVENTS.to_string();
    let edge_args = [
        "--role",
        "edge",
        "--nats",
        url.as_str(),
        "--cores",
        "1",
        "--bind",
        "127.0.0.1",
        "--client-port",
        "0",
        "--snapshot-interval-s",
        "0",
        "--snapshot-events",
        snapshot_events.as_str(),
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let mut victim = BinaryNode::start(&edge_args);
    victim.client_addr();
    assert_eq!(victim.metric("snapshots_loaded"), 0);
    let workload = harness_workload(43, 40_000, 400, 40);
    let events = &workload.events;
    let head = 30_000;
    send_source(ingest.event_addr, events, &batches_of(0..head), "\n");
    wait_until("the reference edge applies the head", || {
        counter(&reference, "events_delivered") == head as u64
    });
    // Whichever edge holds the writer lock has written a snapshot (on a loaded machine the
    // head can be applied before the first one is stored).
    wait_until("a snapshot is stored", || {
        counter(&reference, "snapshots_written") + victim.metric("snapshots_written") >= 1
    });
    victim.kill();
    let started = Instant::now();
    let mut restarted = BinaryNode::start(&edge_args);
    let loaded = restarted.wait_for_line("loaded snapshot");
    let addr = restarted.client_addr();
    let restart_time = started.elapsed();
    eprintln!("edge restart: {loaded} (client port open after {restart_time:?})");
    let users = &workload.clients;
    let reference_clients = connect_and_register(&reference, reference.client_addr, users);
    assert_eq!(restarted.metric("snapshots_loaded"), 1);
    let restarted_clients: Vec<EdgeClient> = users
        .iter()
        .map(|&u| EdgeClient::connect(addr, u))
        .collect();
    wait_until("registrations on the restarted edge", || {
        restarted.metric("clients_registered") == users.len() as u64
    });
    send_source(
        ingest.event_addr,
        events,
        &batches_of(head..events.len()),
        "\n",
    );
    wait_until("the tail is applied", || {
        counter(&reference, "events_delivered") == events.len() as u64
    });
    let last = counter(&reference, "nats_last_applied_stream_seq");
    wait_until("the restarted edge applies the tail", || {
        restarted.metric("nats_last_applied_stream_seq") == last
    });
    reference.stop();
    let expected = expected_after(events, users, head);
    check(reference_clients, &expected, "reference edge");
    // The restarted edge stops gracefully on SIGTERM, writing out what it holds.
    // SAFETY: signals a child process this test owns.
    unsafe {
        libc::kill(restarted.child.id() as i32, libc::SIGTERM);
    }
    restarted.child.wait().unwrap();
    check(restarted_clients, &expected, "restarted edge");
    reference.wait().unwrap();
    ingest.stop_and_wait().unwrap();
}

/// The event address from a binary's "listening" line.
fn event_addr_of(node: &mut BinaryNode) -> SocketAddr {
    let line = node.wait_for_line("efr-sharded listening");
    let addr = line
        .split("events on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("events on ADDR");
    addr.trim().parse().expect("an address")
}

/// Writes the lines of `events[range]` in order on `source`.
fn write_in_order(source: &mut TcpStream, events: &[String], range: std::ops::Range<usize>) {
    let mut buffer = Vec::new();
    for line in &events[range] {
        buffer.extend_from_slice(line.as_bytes());
        buffer.push(b'\n');
    }
    source.write_all(&buffer).unwrap();
}

#[test]
fn an_ingest_killed_with_sigkill_resumes_and_every_edge_gets_each_event_once() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let edges: Vec<RunningServer> = (0..2)
        .map(|_| start_server(node(Role::Edge, &nats, 1)))
        .collect();
    let workload = harness_workload(47, 40_000, 400, 40);
    let events = &workload.events;
    let users = &workload.clients;
    let clients: Vec<Vec<EdgeClient>> = edges
        .iter()
        .map(|edge| connect_and_register(edge, edge.client_addr, users))
        .collect();
    let url = nats.url();
    let ingest_args = [
        "--role",
        "ingest",
        "--resume",
        "--nats",
        url.as_str(),
        "--bind",
        "127.0.0.1",
        "--event-port",
        "0",
    ];
    let mut ingest = BinaryNode::start(&ingest_args);
    let mut source = TcpStream::connect(event_addr_of(&mut ingest)).unwrap();
    write_in_order(&mut source, events, 0..25_000);
    let applied = |edge: &RunningServer| counter(edge, "events_delivered");
    wait_until("the edges apply a part", || {
        edges.iter().all(|edge| applied(edge) >= 10_000)
    });
    ingest.kill();
    // The source's last acknowledged point: what every edge has applied.
    let acknowledged = edges.iter().map(applied).min().unwrap() as usize;
    drop(source);
    let started = Instant::now();
    let mut ingest = BinaryNode::start(&ingest_args);
    let mut source = TcpStream::connect(event_addr_of(&mut ingest)).unwrap();
    eprintln!(
        "ingest restart: event port open after {:?}",
        started.elapsed()
    );
    write_in_order(&mut source, events, acknowledged..events.len());
    for edge in &edges {
        wait_until("every event applied", || {
            applied(edge) >= events.len() as u64
        });
    }
    drop(source);
    let expected = expected_notifications(events, users);
    for (edge, clients) in edges.into_iter().zip(clients) {
        assert_eq!(applied(&edge), events.len() as u64, "each event once");
        assert_eq!(counter(&edge, "nats_messages_stale"), 0);
        assert_eq!(counter(&edge, "nats_stream_gaps"), 0);
        edge.stop();
        check(clients, &expected, "edge");
        edge.wait().unwrap();
    }
}

#[test]
fn nats_killed_while_snapshots_are_written_leaves_a_pointer_to_a_whole_snapshot() {
    if !nats_available() {
        return;
    }
    let mut nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let mut writer_config = node(Role::Edge, &nats, 1);
    writer_config.nats.snapshot_events = Some(500);
    let writer = start_server(writer_config);
    let workload = harness_workload(53, 40_000, 2_000, 50);
    let events = workload.events.clone();
    let head = 30_000;
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    let sender = {
        let events = events.clone();
        std::thread::spawn(move || {
            write_in_order(&mut source, &events, 0..head);
            source
        })
    };
    wait_until("snapshots being written", || {
        counter(&writer, "snapshots_written") >= 3
    });
    nats.kill();
    nats.restart();
    let source = sender.join().unwrap();
    wait_until("the writer applies the head", || {
        counter(&writer, "events_delivered") == head as u64
    });
    drop(source);
    // Straight from the store: the pointer names a stored object, which is whole (its
    // checksum and stream seq match the pointer).
    let config = node(Role::Edge, &nats, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let context = async_nats::jetstream::new(client);
        let store = SnapshotStore::open(&context, &config.nats).await.unwrap();
        // The pointer first, then the listing: the writer may still store a snapshot of its
        // last events, and an object listed before it would miss the one the pointer names.
        let (pointer, snapshot) = store.load_newest().await.unwrap().expect("a snapshot");
        let seqs = store.object_seqs().await.unwrap();
        // The newest 2, and at most one more: an object stored whole whose pointer move NATS
        // cut off (pruned by the next snapshot).
        assert!(
            !seqs.is_empty() && seqs.len() <= KEEP_SNAPSHOTS + 1,
            "{seqs:?}"
        );
        assert!(
            seqs.iter().any(|&seq| object_name(seq) == pointer.object),
            "{seqs:?} {pointer:?}"
        );
        assert!(!snapshot.edges.is_empty());
    });
    let late = start_server(config);
    assert_eq!(counter(&late, "snapshots_loaded"), 1);
    assert_eq!(counter(&late, "snapshot_failures"), 0);
    wait_until("the late edge catches up", || {
        counter(&late, "nats_last_applied_stream_seq")
            == counter(&writer, "nats_last_applied_stream_seq")
    });
    let users = &workload.clients;
    let writer_clients = connect_and_register(&writer, writer.client_addr, users);
    let late_clients = connect_and_register(&late, late.client_addr, users);
    send_source(
        ingest.event_addr,
        &events,
        &batches_of(head..events.len()),
        "\n",
    );
    wait_until("the writer applies the tail", || {
        counter(&writer, "events_delivered") == events.len() as u64
    });
    wait_until("the late edge applies the tail", || {
        counter(&late, "nats_last_applied_stream_seq")
            == counter(&writer, "nats_last_applied_stream_seq")
    });
    writer.stop();
    late.stop();
    let expected = expected_after(&events, users, head);
    check(writer_clients, &expected, "writer edge");
    check(late_clients, &expected, "late edge");
    writer.wait().unwrap();
    late.wait().unwrap();
    ingest.stop_and_wait().unwrap();
}

/// The full-size drill, by hand: `EFR_DRILL_EDGES` follow edges (default 1,000,000) go through
/// an ingest to an edge that snapshots them, then an edge binary (`EFR_DRILL_BINARY`, e.g. the
/// release build) is started and timed until its client port is open, and a new client of it
/// is served from the loaded graph.
#[test]
#[ignore = "full size, by hand: see bench-results/snapshots.md"]
fn full_size_edge_restart_from_a_snapshot() {
    if !nats_available() {
        return;
    }
    let edge_count: u64 = std::env::var("EFR_DRILL_EDGES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1_000_000);
    let binary = std::env::var("EFR_DRILL_BINARY").unwrap_or_else(|_| BINARY.to_string());
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let mut writer_config = node(Role::Edge, &nats, 1);
    writer_config.nats.snapshot_events = Some(edge_count);
    let writer = start_server(writer_config);
    // 10 followees per follower: follower f follows f+1..=f+10.
    let followers = edge_count / 10;
    let mut events = Vec::with_capacity(edge_count as usize + 1);
    for follower in 1..=followers {
        for step in 1..=10 {
            events.push(format!(
                "{}|F|{follower}|{}",
                events.len() + 1,
                follower + step
            ));
        }
    }
    let started = Instant::now();
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    write_in_order(&mut source, &events, 0..events.len());
    wait_until("the snapshot", || {
        counter(&writer, "snapshots_written") >= 1
    });
    eprintln!(
        "{} follow events through the cluster and snapshotted in {:?}",
        events.len(),
        started.elapsed()
    );
    // A tail after the snapshot (`EFR_DRILL_TAIL` follow events, default 10,000), which the
    // restarted edge catches up on before its port opens.
    let tail: u64 = std::env::var("EFR_DRILL_TAIL")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10_000);
    let head = events.len();
    for index in 0..tail {
        let follower = followers + 1 + index;
        events.push(format!("{}|F|{follower}|1", events.len() + 1));
    }
    write_in_order(&mut source, &events, head..events.len());
    wait_until("the writer applies the tail", || {
        counter(&writer, "events_delivered") == events.len() as u64
    });
    assert_eq!(counter(&writer, "snapshots_written"), 1);
    let url = nats.url();
    let started = Instant::now();
    let mut restarted = BinaryNode::start_program(
        &binary,
        &[
            "--role",
            "edge",
            "--nats",
            url.as_str(),
            "--bind",
            "127.0.0.1",
            "--client-port",
            "0",
            "--cores",
            "2",
            "--snapshot-interval-s",
            "0",
            "--snapshot-events",
            "0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let loaded = restarted.wait_for_line("loaded snapshot");
    let addr = restarted.client_addr();
    let restart = started.elapsed();
    let caught_up = restarted.wait_for_line("caught up on");
    eprintln!(
        "edge restart with {edge_count} edges and a tail of {tail} events: client port open \
         after {restart:?} ({loaded}; {caught_up})"
    );
    // Follower 1 follows 2..=11: a status update of 11 reaches it.
    let client = EdgeClient::connect(addr, 1);
    wait_until("the client registers", || {
        restarted.metric("clients_registered") == 1
    });
    // Registration is queued behind the graph import in each shard: the graph is in place.
    eprintln!(
        "edge restart with {edge_count} edges: first client registered after {:?}",
        started.elapsed()
    );
    let update = format!("{}|S|11", events.len() + 1);
    write_in_order(&mut source, std::slice::from_ref(&update), 0..1);
    wait_until("the writer applies the update", || {
        counter(&writer, "events_delivered") == events.len() as u64 + 1
    });
    let last = counter(&writer, "nats_last_applied_stream_seq");
    wait_until("the restarted edge applies the update", || {
        restarted.metric("nats_last_applied_stream_seq") == last
    });
    // SAFETY: signals a child process this test owns.
    unsafe {
        libc::kill(restarted.child.id() as i32, libc::SIGTERM);
    }
    restarted.child.wait().unwrap();
    let (_, lines) = client.lines();
    assert_eq!(lines, vec![update]);
    drop(source);
    writer.stop_and_wait().unwrap();
    ingest.stop_and_wait().unwrap();
}

#[test]
fn when_the_snapshot_writer_stops_another_edge_takes_the_lock_and_writes() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let with_short_lock = || {
        let mut config = node(Role::Edge, &nats, 1);
        config.nats.snapshot_lock_ttl = Duration::from_secs(1);
        config
    };
    let first = start_server(with_short_lock());
    let workload = harness_workload(59, 200_000, 500, 10);
    let events = &workload.events;
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    let mut sent = 0;
    // 200 events at a time, each after the edges applied the last ones: about 1,000 rounds of
    // at least the 5 ms poll, enough for the lock to expire.
    let mut send_more = |source: &mut TcpStream, edge: &RunningServer| {
        if counter(edge, "nats_last_applied_stream_seq")
            < counter(&ingest, "nats_messages_published")
        {
            return;
        }
        let end = (sent + 200).min(events.len());
        assert!(sent < end, "the workload ran out before the condition");
        write_in_order(source, events, sent..end);
        sent = end;
    };
    wait_until("the first edge writes a snapshot", || {
        send_more(&mut source, &first);
        counter(&first, "snapshots_written") >= 1
    });
    let second = start_server(with_short_lock());
    assert_eq!(counter(&second, "snapshots_written"), 0);
    first.stop_and_wait().unwrap();
    // The lock expires a second after the first edge's last refresh; the second edge,
    // reading on, takes it and writes the next snapshot.
    wait_until("the second edge writes a snapshot", || {
        send_more(&mut source, &second);
        counter(&second, "snapshots_written") >= 1
    });
    assert_eq!(counter(&second, "snapshot_writer"), 1);
    drop(source);
    second.stop_and_wait().unwrap();
    ingest.stop_and_wait().unwrap();
}

/// What the drills read straight from NATS: the stream's first sequence and the snapshot
/// pointer's.
struct StreamProbe {
    runtime: tokio::runtime::Runtime,
    context: async_nats::jetstream::Context,
    config: efr::config::NatsConfig,
}

impl StreamProbe {
    fn new(nats: &NatsServer) -> StreamProbe {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let context = runtime.block_on(async {
            async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
        });
        StreamProbe {
            runtime,
            context,
            config: node(Role::Edge, nats, 1).nats,
        }
    }

    /// The stream's (first sequence, message count).
    fn stream_state(&self) -> (u64, u64) {
        self.runtime.block_on(async {
            let mut stream = self.context.get_stream(&self.config.stream).await.unwrap();
            let state = stream.info().await.unwrap().state.clone();
            (state.first_sequence, state.messages)
        })
    }

    /// Publishes `chunks` chunk messages of an object put that never finished (no metadata
    /// names them) and returns their subject.
    fn cut_off_put(&self, chunks: usize) -> String {
        self.runtime.block_on(async {
            // Opening the store creates its stream.
            SnapshotStore::open(&self.context, &self.config)
                .await
                .unwrap();
            let subject = format!("$O.{}-graph.C.cutoffput0000000000000", self.config.stream);
            for chunk in 0..chunks {
                self.context
                    .publish(subject.clone(), format!("chunk {chunk}").into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            subject
        })
    }

    /// Overwrites the chain end the ingest saved.
    fn save_chain_end(&self, value: &'static [u8]) {
        self.runtime.block_on(async {
            let bucket = self
                .context
                .get_key_value(format!("{}-chain", self.config.stream))
                .await
                .unwrap();
            bucket.put("end", value.into()).await.unwrap();
        })
    }

    /// Messages the object store's stream holds on `subject`.
    fn chunks_on(&self, subject: &str) -> usize {
        self.runtime.block_on(async {
            let stream = self
                .context
                .get_stream(format!("OBJ_{}-graph", self.config.stream))
                .await
                .unwrap();
            let mut subjects = stream.info_with_subjects(subject).await.unwrap();
            let mut count = 0;
            while let Some(entry) = futures_lite::StreamExt::next(&mut subjects).await {
                count += entry.unwrap().1;
            }
            count
        })
    }

    /// The last stream message the newest snapshot holds (0: none yet).
    fn snapshot_stream_seq(&self) -> u64 {
        self.runtime.block_on(async {
            let store = SnapshotStore::open(&self.context, &self.config)
                .await
                .unwrap();
            store
                .pointer()
                .await
                .unwrap()
                .map_or(0, |(pointer, _)| pointer.stream_seq)
        })
    }
}

/// Retention of about a hundred small messages (some 15,000 events), so that an edge paused
/// for a few rounds of events falls behind it while the others, reading along, never do;
/// snapshots every few hundred events, so that one always lies within it.
const TINY_STREAM_BYTES: u64 = 256 * 1024;
const SMALL_MESSAGE_BYTES: usize = 2048;
const FREQUENT_SNAPSHOT_EVENTS: u64 = 500;

#[test]
fn an_edge_that_fell_behind_retention_closes_its_clients_rebuilds_and_serves_the_same_bytes() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let tiny = |role: Role| {
        let mut config = node(role, &nats, 1);
        config.nats.max_bytes = Some(TINY_STREAM_BYTES);
        config.nats.message_bytes = SMALL_MESSAGE_BYTES;
        config.nats.snapshot_events = Some(FREQUENT_SNAPSHOT_EVENTS);
        config.nats.snapshot_lock_ttl = Duration::from_secs(1);
        config
    };
    let ingest = start_server(tiny(Role::Ingest));
    let reference = start_server(tiny(Role::Edge));
    let url = nats.url();
    let (bytes, events_per_snapshot) = (
        TINY_STREAM_BYTES.to_string(),
        FREQUENT_SNAPSHOT_EVENTS.to_string(),
    );
    // The victim: the real binary (so it can be paused), pulling few messages at a time so
    // that little is on its way to it when it stops.
    let mut victim = BinaryNode::start(&[
        "--role",
        "edge",
        "--nats",
        url.as_str(),
        "--bind",
        "127.0.0.1",
        "--client-port",
        "0",
        "--cores",
        "1",
        "--nats-max-bytes",
        bytes.as_str(),
        "--nats-pull-messages",
        "4",
        "--snapshot-interval-s",
        "0",
        "--snapshot-events",
        events_per_snapshot.as_str(),
        "--snapshot-lock-ttl-s",
        "1",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let victim_addr = victim.client_addr();
    let workload = harness_workload(61, 100_000, 500, 50);
    let events = &workload.events;
    let users = &workload.clients;
    let mut sent = 5_000;
    send_source(ingest.event_addr, events, &batches_of(0..sent), "\n");
    wait_until("the reference edge applies the head", || {
        counter(&reference, "events_delivered") == sent as u64
    });
    let head_seq = counter(&reference, "nats_last_applied_stream_seq");
    wait_until("the victim applies the head", || {
        victim.metric("nats_last_applied_stream_seq") == head_seq
    });
    let early_client = EdgeClient::connect(victim_addr, users[0]);
    wait_until("the victim registers its client", || {
        victim.metric("clients_registered") == 1
    });

    // SAFETY: signals a child process this test owns.
    unsafe {
        libc::kill(victim.child.id() as i32, libc::SIGSTOP);
    }
    // Events go on until the stream no longer holds what the victim has not read, and the
    // newest snapshot (written by the reference edge, which takes the lock within a second
    // if the victim held it) lies within what the stream holds.
    let probe = StreamProbe::new(&nats);
    wait_until(
        "the stream discards what the paused edge has not read",
        || {
            let (first, _) = probe.stream_state();
            let behind = first > head_seq + 10;
            let covered = probe.snapshot_stream_seq() + 1 >= first;
            if behind && covered {
                return true;
            }
            // Behind but not covered: the victim held the snapshot lock; small rounds, paced,
            // until it expires (a second) and the reference edge takes it and writes.
            if behind {
                std::thread::sleep(Duration::from_millis(20));
            }
            let end = sent + if behind { 100 } else { 2_000 };
            assert!(end < events.len() - 10_000, "the workload ran out");
            send_source(ingest.event_addr, events, &batches_of(sent..end), "\n");
            sent = end;
            wait_until("the reference edge applies the round", || {
                counter(&reference, "events_delivered") == sent as u64
            });
            false
        },
    );
    // SAFETY: as above.
    unsafe {
        libc::kill(victim.child.id() as i32, libc::SIGCONT);
    }
    let noticed = victim.wait_for_line("fell behind the stream's retention");
    // New clients connect as soon as the rebuild is counted: the graph is in place by then,
    // and they receive only what comes after the stream's end (nothing the other edges
    // delivered before).
    wait_until("the rebuild", || victim.metric("snapshot_rebuilds") == 1);
    let registered = victim.metric("clients_registered");
    let victim_clients: Vec<EdgeClient> = users
        .iter()
        .map(|&user| EdgeClient::connect(victim_addr, user))
        .collect();
    wait_until("registrations on the rebuilt edge", || {
        victim.metric("clients_registered") == registered + users.len() as u64
    });
    let reference_clients = connect_and_register(&reference, reference.client_addr, users);
    let rebuilt = victim.wait_for_line("rebuilt the graph after falling behind");
    assert!(victim.metric("nats_stream_gaps") >= 1);
    assert!(victim.metric("snapshots_loaded") >= 1);
    // Its early client was closed (EOF, not the read timeout), after whole lines.
    let (_, early_lines) = early_client.lines_until_closed();
    eprintln!(
        "fell behind: {noticed}; {rebuilt}; the early client got {} lines before it was closed",
        early_lines.len()
    );
    let last = counter(&reference, "nats_last_applied_stream_seq");
    wait_until("the victim catches up", || {
        victim.metric("nats_last_applied_stream_seq") == last
    });
    let tail = sent..sent + 10_000;
    send_source(ingest.event_addr, events, &batches_of(tail.clone()), "\n");
    wait_until("the reference edge applies the tail", || {
        counter(&reference, "events_delivered") == tail.end as u64
    });
    let last = counter(&reference, "nats_last_applied_stream_seq");
    wait_until("the rebuilt edge applies the tail", || {
        victim.metric("nats_last_applied_stream_seq") == last
    });
    assert_eq!(victim.metric("snapshot_rebuilds"), 1, "one rebuild only");
    reference.stop();
    // SAFETY: as above.
    unsafe {
        libc::kill(victim.child.id() as i32, libc::SIGTERM);
    }
    victim.child.wait().unwrap();
    let expected = expected_after(&events[..tail.end], users, sent);
    check(reference_clients, &expected, "reference edge");
    check(victim_clients, &expected, "rebuilt edge");
    reference.wait().unwrap();
    ingest.stop_and_wait().unwrap();
}

#[test]
fn an_ingest_resumes_where_the_chain_ended_after_an_idle_stream_discarded_every_message() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    // Snapshots every second and no allowed lag: the stream keeps a message 3 s.
    let short_lived = |role: Role| {
        let mut config = node(role, &nats, 1);
        config.nats.snapshot_interval = Some(Duration::from_secs(1));
        config.nats.allowed_lag = Duration::ZERO;
        config
    };
    let edge = start_server(short_lived(Role::Edge));
    let workload = harness_workload(67, 10_000, 400, 40);
    let events = &workload.events;
    let users = &workload.clients;
    let clients = connect_and_register(&edge, edge.client_addr, users);
    let url = nats.url();
    let ingest_args = [
        "--role",
        "ingest",
        "--resume",
        "--nats",
        url.as_str(),
        "--bind",
        "127.0.0.1",
        "--event-port",
        "0",
        "--snapshot-interval-s",
        "1",
        "--nats-allowed-lag-s",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let mut ingest = BinaryNode::start(&ingest_args);
    let mut source = TcpStream::connect(event_addr_of(&mut ingest)).unwrap();
    let half = events.len() / 2;
    write_in_order(&mut source, events, 0..half);
    wait_until("the edge applies the first half", || {
        counter(&edge, "events_delivered") == half as u64
    });
    // Idle: the publisher saves where the chain ends once, then the stream's retention
    // discards every message. Then the ingest dies without a word (no save at a stop).
    wait_until("the chain end saved", || {
        ingest.metric("nats_chain_end_saves") >= 1
    });
    let probe = StreamProbe::new(&nats);
    wait_until("the stream holds no message", || {
        probe.stream_state().1 == 0
    });
    ingest.kill();
    drop(source);
    let mut ingest = BinaryNode::start(&ingest_args);
    let resumed = ingest.wait_for_line("resuming:");
    assert!(
        resumed.contains(&format!("the next session starts at seq {}", half + 1)),
        "{resumed}"
    );
    let mut source = TcpStream::connect(event_addr_of(&mut ingest)).unwrap();
    write_in_order(&mut source, events, half..events.len());
    wait_until("the edge applies the second half", || {
        counter(&edge, "events_delivered") == events.len() as u64
    });
    drop(source);
    assert_eq!(counter(&edge, "nats_messages_stale"), 0);
    assert_eq!(counter(&edge, "nats_stream_gaps"), 0);
    edge.stop();
    check(clients, &expected_notifications(events, users), "edge");
    edge.wait().unwrap();

    // A saved end that does not name the stream's last sequence (an ingest killed before it
    // saved, then down longer than the retention): where the session ended is lost. With
    // --resume the ingest refuses to start and says so; without, it starts a new session.
    wait_until("the stream holds no message", || {
        probe.stream_state().1 == 0
    });
    ingest.kill();
    probe
        .save_chain_end(b"stream_seq=1 number=1 writer=00000000000000aa kind=batch first=1 last=9");
    let mut refused = BinaryNode::start(&ingest_args);
    refused.wait_for_line("cannot resume");
    assert!(!refused.child.wait().unwrap().success());
    let fresh_args: Vec<&str> = ingest_args
        .iter()
        .copied()
        .filter(|arg| *arg != "--resume")
        .collect();
    let mut fresh = BinaryNode::start(&fresh_args);
    fresh.wait_for_line("publishing a reset");
    event_addr_of(&mut fresh);
}

#[test]
fn the_snapshot_writer_purges_the_chunks_of_a_cut_off_put_and_keeps_whole_snapshots() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let probe = StreamProbe::new(&nats);
    let orphan = probe.cut_off_put(3);
    assert_eq!(probe.chunks_on(&orphan), 3);
    // A lock of 1 s: an orphan is purged once seen unchanged for a second.
    let short_lock = |role: Role| {
        let mut config = node(role, &nats, 1);
        config.nats.snapshot_events = Some(FREQUENT_SNAPSHOT_EVENTS);
        config.nats.snapshot_lock_ttl = Duration::from_secs(1);
        config
    };
    let ingest = start_server(short_lock(Role::Ingest));
    let writer = start_server(short_lock(Role::Edge));
    let workload = harness_workload(71, 200_000, 500, 10);
    let events = &workload.events;
    let mut sent = 0;
    wait_until("the orphan chunks purged", || {
        if counter(&writer, "snapshot_orphan_chunks_purged") > 0 {
            return true;
        }
        // Deliberate pacing: snapshots (and with them the writer's look for orphans) come
        // with events; the orphan must be seen for a second before it goes.
        std::thread::sleep(Duration::from_millis(50));
        let end = sent + 1_000;
        assert!(end <= events.len(), "the workload ran out");
        send_source(ingest.event_addr, events, &batches_of(sent..end), "\n");
        sent = end;
        wait_until("the writer applies the round", || {
            counter(&writer, "events_delivered") == sent as u64
        });
        false
    });
    assert_eq!(counter(&writer, "snapshot_orphan_chunks_purged"), 3);
    assert_eq!(probe.chunks_on(&orphan), 0);
    assert!(counter(&writer, "snapshots_written") >= 2);
    assert_eq!(counter(&writer, "snapshot_failures"), 0);
    // The snapshots' own chunks are untouched: a new edge loads the newest whole.
    let late = start_server(short_lock(Role::Edge));
    assert_eq!(counter(&late, "snapshots_loaded"), 1);
    assert_eq!(counter(&late, "snapshot_failures"), 0);
    late.stop_and_wait().unwrap();
    writer.stop_and_wait().unwrap();
    ingest.stop_and_wait().unwrap();
}
