//! efr as a cluster over a real nats-server (JetStream, file store in a temporary directory, a
//! free port): one ingest and several edges started through the library's `start`, the source
//! and the clients over loopback TCP, every byte checked against the independent model.
//!
//! These tests need `nats-server` (scripts/install-nats.sh installs it). Without it they are
//! skipped with a message, except under CI=true, where they fail.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::nats::*;
use common::*;
use efr::config::{Config, Role};
use efr::server::RunningServer;

/// How long a cluster test waits for a condition (NATS restarts and consumer recreation take
/// seconds on a loaded machine).
const CLUSTER_DEADLINE: Duration = Duration::from_secs(60);

fn node(role: Role, nats: &NatsServer, cores: usize) -> Config {
    let mut config = Config::ephemeral(cores);
    config.role = role;
    config.nats.url = nats.url();
    config
}

fn resuming_ingest(nats: &NatsServer) -> RunningServer {
    let mut config = node(Role::Ingest, nats, 1);
    config.nats.resume = true;
    start_server(config)
}

/// Three edges: one with two shards, two with one.
fn edges(nats: &NatsServer) -> Vec<RunningServer> {
    [2, 1, 1]
        .into_iter()
        .map(|cores| start_server(node(Role::Edge, nats, cores)))
        .collect()
}

/// A user client of an edge whose bytes are collected by a thread until EOF. Unlike the
/// single-process tests' client, it waits up to [`CLUSTER_DEADLINE`] for each read: clients
/// hear nothing while NATS restarts.
struct EdgeClient {
    user: u64,
    reader: std::thread::JoinHandle<Vec<u8>>,
}

impl EdgeClient {
    fn connect(addr: std::net::SocketAddr, user: u64) -> EdgeClient {
        let mut stream = TcpStream::connect(addr).expect("client connects");
        stream.write_all(format!("{user}\n").as_bytes()).unwrap();
        stream.set_read_timeout(Some(CLUSTER_DEADLINE)).unwrap();
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            bytes
        });
        EdgeClient { user, reader }
    }
}

/// Compares every client's bytes (up to EOF) with its expected lines.
fn check_clients(clients: Vec<EdgeClient>, expected: &HashMap<u64, Vec<String>>) {
    for client in clients {
        let user = client.user;
        let text = String::from_utf8(client.reader.join().unwrap()).expect("utf-8 output");
        let got: Vec<&str> = text.lines().collect();
        let want = &expected[&user];
        for (index, (got, want)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(got, want, "client {user} line {index}");
        }
        assert_eq!(got.len(), want.len(), "client {user}: line count");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "client {user}: unterminated output"
        );
    }
}

/// Connects user `users[i]` to edge `i % edges.len()` and waits until every edge registered
/// its clients.
fn connect_spread(edges: &[RunningServer], users: &[u64]) -> Vec<EdgeClient> {
    let before: Vec<u64> = edges
        .iter()
        .map(|edge| edge.counters().clients_registered.load(Ordering::Relaxed))
        .collect();
    let clients: Vec<EdgeClient> = users
        .iter()
        .enumerate()
        .map(|(i, &user)| EdgeClient::connect(edges[i % edges.len()].client_addr, user))
        .collect();
    for (index, edge) in edges.iter().enumerate() {
        let spread = users.iter().skip(index).step_by(edges.len()).count() as u64;
        wait_registered(edge, before[index] + spread);
    }
    clients
}

/// Waits until `value(server)` reaches `target`.
fn wait_for(
    server: &RunningServer,
    what: &str,
    target: u64,
    value: impl Fn(&RunningServer) -> u64,
) {
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    while value(server) < target {
        assert!(
            Instant::now() < deadline,
            "{what} did not reach {target}: {}",
            server.counters().summary()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn delivered(server: &RunningServer) -> u64 {
    server.counters().events_delivered.load(Ordering::Relaxed)
}

/// Writes events (indices into `events`) as the source, keeping the connection open.
fn write_events(source: &mut TcpStream, events: &[String], batches: &[Vec<usize>]) {
    let mut buffer = Vec::new();
    for batch in batches {
        for &index in batch {
            buffer.extend_from_slice(events[index].as_bytes());
            buffer.push(b'\n');
        }
    }
    source.write_all(&buffer).unwrap();
}

/// Closes a source and waits until the server closed it too.
fn close_source(mut source: TcpStream) {
    source.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = source.read_to_end(&mut rest);
}

fn assert_in_order_everywhere(edges: &[RunningServer]) {
    for edge in edges {
        let counters = edge.counters();
        assert_eq!(counters.nats_stream_gaps.load(Ordering::Relaxed), 0);
        assert_eq!(counters.nats_messages_stale.load(Ordering::Relaxed), 0);
        assert_eq!(counters.nats_messages_bad.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn harness_run_through_one_ingest_and_three_edges_is_byte_for_byte() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let edges = edges(&nats);
    let workload = harness_workload(11, 30_000, 300, 60);
    let clients = connect_spread(&edges, &workload.clients);
    let batches = harness_batches(11, workload.events.len(), 100);
    send_source(ingest.event_addr, &workload.events, &batches, "\n");
    // The source closed: the ingest published a reset, so every edge closed its clients.
    let expected = expected_notifications(&workload.events, &workload.clients);
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    for edge in &edges {
        assert_eq!(delivered(edge), 30_000);
    }
    ingest.stop_and_wait().unwrap();
    for edge in edges {
        edge.stop_and_wait().unwrap();
    }
}

#[test]
fn fanout_through_one_ingest_and_three_edges_is_byte_for_byte() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let edges = edges(&nats);
    // Users 2..=91 follow user 1, who then posts 1,500 status updates; broadcasts in between.
    let users: Vec<u64> = (1..=91).collect();
    let mut events = Vec::new();
    for follower in 2..=91 {
        events.push(format!("{}|F|{follower}|1", events.len() + 1));
    }
    for update in 0..1_500 {
        events.push(format!("{}|S|1", events.len() + 1));
        if update % 500 == 0 {
            events.push(format!("{}|B", events.len() + 1));
        }
    }
    let clients = connect_spread(&edges, &users);
    let batches = harness_batches(5, events.len(), 100);
    send_source(ingest.event_addr, &events, &batches, "\n");
    let expected = expected_notifications(&events, &users);
    assert_eq!(expected[&2].len(), 1_503);
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    ingest.stop_and_wait().unwrap();
    for edge in edges {
        edge.stop_and_wait().unwrap();
    }
}

#[test]
fn without_resume_every_session_end_resets_every_edge() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let edges = edges(&nats);
    let users = [1, 2, 3];
    // Session 1: 2 and 3 follow 1.
    let first = vec![
        "1|F|2|1".to_string(),
        "2|F|3|1".to_string(),
        "3|S|1".to_string(),
    ];
    let clients = connect_spread(&edges, &users);
    send_source(ingest.event_addr, &first, &[vec![2, 0, 1]], "\n");
    let mut expected = HashMap::new();
    expected.insert(1, vec!["1|F|2|1".to_string(), "2|F|3|1".to_string()]);
    expected.insert(2, vec!["3|S|1".to_string()]);
    expected.insert(3, vec!["3|S|1".to_string()]);
    check_clients(clients, &expected);
    // Session 2 starts at seq 1 again with a forgotten graph: 1's update reaches nobody, 2
    // follows 3 anew.
    let second = vec![
        "1|S|1".to_string(),
        "2|F|2|3".to_string(),
        "3|S|3".to_string(),
    ];
    let clients = connect_spread(&edges, &users);
    send_source(ingest.event_addr, &second, &[vec![1, 2, 0]], "\n");
    let mut expected = HashMap::new();
    expected.insert(1, vec![]);
    expected.insert(2, vec!["3|S|3".to_string()]);
    expected.insert(3, vec!["2|F|2|3".to_string()]);
    assert_eq!(expected, expected_notifications(&second, &users));
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    ingest.stop_and_wait().unwrap();
    for edge in edges {
        edge.stop_and_wait().unwrap();
    }
}

#[test]
fn resume_keeps_graph_and_sequence_across_source_reconnects_and_ingest_restarts() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let edges = edges(&nats);
    let workload = harness_workload(23, 12_000, 200, 40);
    let events = &workload.events;
    let clients = connect_spread(&edges, &workload.clients);
    let in_order = |range: std::ops::Range<usize>| -> Vec<Vec<usize>> {
        let batches = harness_batches(range.start as u64, range.len(), 50);
        batches
            .into_iter()
            .map(|batch| batch.into_iter().map(|i| i + range.start).collect())
            .collect()
    };
    let ingest = resuming_ingest(&nats);
    // Session 1: events 1..=4000, then the source goes away.
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    write_events(&mut source, events, &in_order(0..4_000));
    wait_for(&ingest, "delivered", 4_000, delivered);
    close_source(source);
    // Session 2 re-sends 3001..=4000 (dropped) and goes on to 8000.
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    write_events(&mut source, events, &in_order(3_000..8_000));
    wait_for(&ingest, "delivered", 8_000, delivered);
    close_source(source);
    let counters = ingest.counters();
    assert_eq!(
        counters.events_already_delivered.load(Ordering::Relaxed),
        1_000
    );
    ingest.stop_and_wait().unwrap();
    // A new ingest resumes from the stream: 7001..=8000 again are dropped.
    let ingest = resuming_ingest(&nats);
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    write_events(&mut source, events, &in_order(7_000..12_000));
    wait_for(&ingest, "delivered", 4_000, delivered);
    close_source(source);
    assert_eq!(
        ingest
            .counters()
            .events_already_delivered
            .load(Ordering::Relaxed),
        1_000
    );
    for edge in &edges {
        wait_for(edge, "delivered", 12_000, delivered);
    }
    ingest.stop_and_wait().unwrap();
    // No reset was published: the clients are still connected; stopping the edges writes out
    // their output and closes them.
    for edge in edges.iter() {
        edge.stop();
    }
    let expected = expected_notifications(events, &workload.clients);
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    for edge in edges {
        edge.wait().unwrap();
    }
}

#[test]
fn nats_killed_and_restarted_mid_run_loses_and_repeats_nothing() {
    if !nats_available() {
        return;
    }
    let mut nats = NatsServer::start();
    let ingest = start_server(node(Role::Ingest, &nats, 1));
    let edges = edges(&nats);
    let workload = harness_workload(31, 20_000, 200, 40);
    let clients = connect_spread(&edges, &workload.clients);
    let batches = harness_batches(31, workload.events.len(), 100);
    let (head, tail) = batches.split_at(batches.len() / 2);
    let head_events: usize = head.iter().map(Vec::len).sum();
    let mut source = TcpStream::connect(ingest.event_addr).unwrap();
    write_events(&mut source, &workload.events, head);
    for edge in &edges {
        wait_for(edge, "delivered", head_events as u64, delivered);
    }
    nats.kill();
    // The rest is sent while NATS is away: the ingest's publishes fail, and are made again
    // once NATS is back; meanwhile the source is pushed back.
    let tail = tail.to_vec();
    let events = workload.events.clone();
    let writer = std::thread::spawn(move || {
        write_events(&mut source, &events, &tail);
        close_source(source);
    });
    wait_for(&ingest, "publish retries", 1, |ingest| {
        ingest
            .counters()
            .nats_publish_retries
            .load(Ordering::Relaxed)
    });
    nats.restart();
    writer.join().unwrap();
    let expected = expected_notifications(&workload.events, &workload.clients);
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    for edge in &edges {
        assert_eq!(delivered(edge), 20_000);
    }
    ingest.stop_and_wait().unwrap();
    for edge in edges {
        edge.stop_and_wait().unwrap();
    }
}

#[test]
fn single_process_role_binds_no_nats_and_an_edge_without_nats_fails_to_start() {
    // Needs no nats-server: the default role never touches NATS.
    let server = start_server(Config::ephemeral(1));
    assert_ne!(server.event_addr.port(), 0);
    assert_ne!(server.client_addr.port(), 0);
    server.stop_and_wait().unwrap();
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::ephemeral(1);
    config.role = Role::Edge;
    config.nats.url = format!("nats://127.0.0.1:{free_port}");
    config.nats.connect_timeout = Duration::from_millis(300);
    let error = efr::server::start(config).err().expect("no NATS, no edge");
    assert!(
        error.to_string().contains("cannot connect to NATS"),
        "{error}"
    );
}

#[test]
fn an_ingest_whose_view_of_the_stream_is_stale_is_fenced_off() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let stale = start_server(node(Role::Ingest, &nats, 1));
    let current = start_server(node(Role::Ingest, &nats, 1));
    let edge = start_server(node(Role::Edge, &nats, 1));
    let one = |line: &str| vec![line.to_string()];
    let clients = connect_spread(std::slice::from_ref(&edge), &[1]);
    send_source(current.event_addr, &one("1|P|2|1"), &[vec![0]], "\n");
    let mut expected = HashMap::new();
    expected.insert(1, one("1|P|2|1"));
    check_clients(clients, &expected);
    // The first ingest still believes the stream is empty: its publish is refused, it stops
    // with an error, and nothing of it reaches the edge.
    send_source(stale.event_addr, &one("1|B"), &[vec![0]], "\n");
    let error = stale.wait().expect_err("the stale ingest fails");
    assert!(error.to_string().contains("fenced off"), "{error}");
    let clients = connect_spread(std::slice::from_ref(&edge), &[1]);
    send_source(current.event_addr, &one("1|P|3|1"), &[vec![0]], "\n");
    expected.insert(1, one("1|P|3|1"));
    check_clients(clients, &expected);
    current.stop_and_wait().unwrap();
    edge.stop_and_wait().unwrap();
}

#[test]
fn an_ingest_started_without_resume_after_a_resuming_one_resets_every_edge() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let edge = start_server(node(Role::Edge, &nats, 2));
    let users = [1, 2];
    let lines = |text: &[&str]| -> Vec<String> { text.iter().map(|s| s.to_string()).collect() };
    let clients = connect_spread(std::slice::from_ref(&edge), &users);
    // A resuming ingest ends its session without a reset: the clients stay connected.
    let resuming = resuming_ingest(&nats);
    send_source(resuming.event_addr, &lines(&["1|F|2|1"]), &[vec![0]], "\n");
    resuming.stop_and_wait().unwrap();
    // An ingest without --resume finds the stream mid-session and resets every edge first.
    let fresh = start_server(node(Role::Ingest, &nats, 1));
    let mut expected = HashMap::new();
    expected.insert(1, lines(&["1|F|2|1"]));
    expected.insert(2, vec![]);
    check_clients(clients, &expected);
    // The graph was forgotten: 1's update reaches nobody.
    let clients = connect_spread(std::slice::from_ref(&edge), &users);
    send_source(
        fresh.event_addr,
        &lines(&["1|S|1", "2|P|1|2"]),
        &[vec![1, 0]],
        "\n",
    );
    expected.insert(1, vec![]);
    expected.insert(2, lines(&["2|P|1|2"]));
    check_clients(clients, &expected);
    assert_in_order_everywhere(std::slice::from_ref(&edge));
    fresh.stop_and_wait().unwrap();
    edge.stop_and_wait().unwrap();
}

#[test]
fn an_edge_started_late_replays_the_stream_and_serves_like_the_others() {
    if !nats_available() {
        return;
    }
    let nats = NatsServer::start();
    let early = start_server(node(Role::Edge, &nats, 1));
    let ingest = resuming_ingest(&nats);
    let lines = |text: &[&str]| -> Vec<String> { text.iter().map(|s| s.to_string()).collect() };
    // The graph is built before the late edge exists: 2 and 3 follow 1.
    send_source(
        ingest.event_addr,
        &lines(&["1|F|2|1", "2|F|3|1"]),
        &[vec![1, 0]],
        "\n",
    );
    wait_for(&early, "delivered", 2, delivered);
    let late = start_server(node(Role::Edge, &nats, 2));
    wait_for(&late, "delivered", 2, delivered);
    let edges = [early, late];
    // Users 2 and 3 on both edges.
    let clients = connect_spread(&edges, &[2, 3, 3, 2]);
    send_source(
        ingest.event_addr,
        &lines(&["3|S|1", "4|P|1|2"]),
        &[vec![1, 0]],
        "\n",
    );
    for edge in &edges {
        wait_for(edge, "delivered", 4, delivered);
        edge.stop();
    }
    let mut expected = HashMap::new();
    expected.insert(2, lines(&["3|S|1", "4|P|1|2"]));
    expected.insert(3, lines(&["3|S|1"]));
    check_clients(clients, &expected);
    assert_in_order_everywhere(&edges);
    ingest.stop_and_wait().unwrap();
    for edge in edges {
        edge.wait().unwrap();
    }
}
