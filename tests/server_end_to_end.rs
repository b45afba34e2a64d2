//! The server end to end over real loopback TCP: every event type, LF and CRLF, several
//! connections per user, clients leaving mid-run, consecutive sessions, shard counts, and
//! harness-style runs checked line by line against an independent model.

mod common;

use std::collections::HashMap;

use common::*;
use efr::config::Config;
use efr::resequencer::ResequencerKind;

fn lines(text: &[&str]) -> Vec<String> {
    text.iter().map(|s| s.to_string()).collect()
}

fn in_order(count: usize) -> Vec<Vec<usize>> {
    vec![(0..count).collect()]
}

#[test]
fn each_event_type_reaches_exactly_its_users() {
    let server = start_server(Config::ephemeral(2));
    let events = lines(&[
        "1|F|1|2", "2|F|3|2", "3|S|2", "4|U|1|2", "5|S|2", "6|P|2|1", "7|B", "8|P|1|99",
        "9|F|99|1", "10|S|99", "11|U|9|1", "12|F|4|3",
    ]);
    let users = [1, 2, 3, 4];
    let clients = connect_all(&server, &users, "\n");
    // Reverse order: the server must put it back.
    let batches = vec![(0..events.len()).rev().collect()];
    send_source(server.event_addr, &events, &batches, "\n");
    let mut expected: HashMap<u64, Vec<String>> = HashMap::new();
    expected.insert(1, lines(&["3|S|2", "6|P|2|1", "7|B", "9|F|99|1"]));
    expected.insert(2, lines(&["1|F|1|2", "2|F|3|2", "7|B"]));
    expected.insert(3, lines(&["3|S|2", "5|S|2", "7|B", "12|F|4|3"]));
    expected.insert(4, lines(&["7|B"]));
    assert_eq!(
        expected,
        expected_notifications(&events, &users),
        "the model agrees"
    );
    check_clients(clients, &expected);
    server.stop_and_wait().unwrap();
}

#[test]
fn crlf_events_and_ids_are_accepted_and_payloads_forwarded_byte_for_byte() {
    let server = start_server(Config::ephemeral(2));
    let events = lines(&["1|F|01|2", "2|P|7|002", "3|S|1", "4|B"]);
    let clients = connect_all(&server, &[1, 2], "\r\n");
    send_source(server.event_addr, &events, &in_order(4), "\r\n");
    let mut expected = HashMap::new();
    expected.insert(1, lines(&["4|B"]));
    expected.insert(2, lines(&["1|F|01|2", "2|P|7|002", "4|B"]));
    check_clients(clients, &expected);
    server.stop_and_wait().unwrap();
}

#[test]
fn a_user_with_two_connections_gets_everything_on_both() {
    let server = start_server(Config::ephemeral(2));
    let workload = harness_workload(3, 3_000, 50, 10);
    let mut users = workload.clients.clone();
    users.push(workload.clients[0]);
    let clients = connect_all(&server, &users, "\n");
    let batches = harness_batches(3, workload.events.len(), 100);
    send_source(server.event_addr, &workload.events, &batches, "\n");
    let expected = expected_notifications(&workload.events, &workload.clients);
    assert!(!expected[&workload.clients[0]].is_empty());
    check_clients(clients, &expected);
    server.stop_and_wait().unwrap();
}

#[test]
fn a_client_that_leaves_mid_run_changes_nothing_for_the_others() {
    let server = start_server(Config::ephemeral(2));
    let events = lines(&["1|P|9|1", "2|P|9|2", "3|B", "4|P|9|2", "5|P|9|1", "6|B"]);
    let clients = connect_all(&server, &[1], "\n");
    let mut leaver = std::net::TcpStream::connect(server.client_addr).unwrap();
    use std::io::Write;
    leaver.write_all(b"2\n").unwrap();
    wait_registered(&server, 2);
    let mut source = std::net::TcpStream::connect(server.event_addr).unwrap();
    source.write_all(b"2|P|9|2\n1|P|9|1\n3|B\n").unwrap();
    assert_eq!(read_lines(&leaver, 2), vec!["2|P|9|2\n", "3|B\n"]);
    leaver.shutdown(std::net::Shutdown::Both).unwrap();
    drop(leaver);
    // Whether or not the server noticed the leaver yet, client 1's stream is the same.
    source.write_all(b"5|P|9|1\n4|P|9|2\n6|B\n").unwrap();
    source.shutdown(std::net::Shutdown::Write).unwrap();
    let mut expected = expected_notifications(&events, &[1, 2]);
    expected.remove(&2);
    check_clients(clients, &expected);
    server.stop_and_wait().unwrap();
}

#[test]
fn two_runs_in_a_row_on_one_server() {
    let server = start_server(Config::ephemeral(2));
    for seed in [11, 12] {
        let workload = harness_workload(seed, 5_000, 200, 40);
        harness_run(&server, &workload, seed, "\n");
    }
    assert_eq!(
        server
            .counters()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn one_two_and_eight_shards_give_every_client_the_same_bytes() {
    let workload = harness_workload(21, 10_000, 300, 60);
    let expected = expected_notifications(&workload.events, &workload.clients);
    for cores in [1, 2, 8] {
        let server = start_server(Config::ephemeral(cores));
        let clients = connect_all(&server, &workload.clients, "\n");
        let batches = harness_batches(21, workload.events.len(), 100);
        send_source(server.event_addr, &workload.events, &batches, "\n");
        check_clients(clients, &expected);
        server.stop_and_wait().unwrap();
    }
}

#[test]
fn harness_style_run_of_100_clients_1000_users_50k_events() {
    let workload = harness_workload(666, 50_000, 1000, 100);
    let server = start_server(Config::ephemeral(2));
    harness_run(&server, &workload, 666, "\n");
    server.stop_and_wait().unwrap();
}

#[test]
fn stream_resequencer_passes_the_harness_run() {
    let workload = harness_workload(7, 20_000, 1000, 100);
    let config = Config {
        resequencer: ResequencerKind::Stream,
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    harness_run(&server, &workload, 7, "\r\n");
    server.stop_and_wait().unwrap();
}

#[test]
fn replay_of_the_real_harness_arrival_order() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/harness-arrival-order-100k.txt"
    );
    let order: Vec<usize> = std::fs::read_to_string(path)
        .expect("the recorded arrival order is readable")
        .lines()
        .map(|line| line.trim().parse::<usize>().unwrap() - 1)
        .collect();
    assert_eq!(order.len(), 100_000);
    let workload = harness_workload(666, order.len(), 1000, 100);
    let server = start_server(Config::ephemeral(2));
    let clients = connect_all(&server, &workload.clients, "\n");
    let batches: Vec<Vec<usize>> = order.chunks(100).map(|c| c.to_vec()).collect();
    send_source(server.event_addr, &workload.events, &batches, "\n");
    let expected = expected_notifications(&workload.events, &workload.clients);
    check_clients(clients, &expected);
    let counters = server.counters();
    assert_eq!(
        counters
            .events_delivered
            .load(std::sync::atomic::Ordering::Relaxed),
        100_000
    );
    assert_eq!(
        counters
            .holes_skipped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.stop_and_wait().unwrap();
}
