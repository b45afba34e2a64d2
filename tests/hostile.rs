//! Hostile peers, over real loopback TCP: no client, connection or source can hurt anyone
//! else's service (PROTOCOL.md section 6, the rows on flooding, memory, idle connections, the
//! metrics endpoint, half-closed clients, the end of the seq space, the reorder window's bytes
//! and the shutdown deadline). Each test names the attack it survives.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::*;
use efr::config::Config;

/// A user with a long id, so that each status update line is long (about 30 bytes).
const LOUD: u64 = u64::MAX - 1;

/// `followers` follow [`LOUD`], then `updates` status updates of [`LOUD`]: about 30 bytes of
/// output per update for each follower.
fn status_storm(followers: &[u64], updates: u64) -> Vec<String> {
    let mut events = Vec::new();
    for &follower in followers {
        events.push(format!("{}|F|{follower}|{LOUD}", events.len() + 1));
    }
    for _ in 0..updates {
        events.push(format!("{}|S|{LOUD}", events.len() + 1));
    }
    events
}

/// Config for a two-shard server on ephemeral ports.
fn two_shards() -> Config {
    Config::ephemeral(2)
}

#[test]
fn a_client_flooding_after_its_id_does_not_stall_its_shard() {
    let server = start_server(two_shards());
    let workload = harness_workload(21, 20_000, 500, 20);
    let clients = connect_all(&server, &workload.clients, "\n");
    // One flooder per shard (user ids chosen so both shards get one whatever the hash).
    let flooders: Vec<Flooder> = (1_000_001..=1_000_004)
        .map(|user| Flooder::start(server.client_addr, user))
        .collect();
    wait_registered(
        &server,
        workload.clients.len() as u64 + flooders.len() as u64,
    );
    wait_until("the flooders filled their connections", || {
        flooders.iter().all(|flooder| flooder.sent() > 4 << 20)
    });
    let mut source = Source::connect(server.event_addr);
    source.send(
        &workload.events,
        &harness_batches(21, workload.events.len(), 100),
    );
    source.finish();
    check_clients(
        clients,
        &expected_notifications(&workload.events, &workload.clients),
    );
    assert!(counter(&server, |c| &c.clients_input_throttled) > 0);
    drop(flooders);
    server.stop_and_wait().unwrap();
}

#[test]
fn pending_output_over_the_server_budget_closes_the_largest_backlogs_first() {
    let config = Config {
        max_output_memory: 2 << 20,
        write_timeout: None,
        ..two_shards()
    };
    let server = start_server(config);
    let readers = connect_all(&server, &[1, 2], "\n");
    let mut stalled: Vec<TcpStream> = (100..108)
        .map(|user| stalled_client(server.client_addr, user))
        .collect();
    wait_registered(&server, 10);
    // About 9 MB for every client: more than the kernel's buffers hold, and together far over
    // the 2 MiB budget.
    let mut users: Vec<u64> = (1..=2).chain(100..108).collect();
    let events = status_storm(&users, 300_000);
    users.truncate(2);
    let mut source = Source::connect(server.event_addr);
    source.send(&events, &in_order_batches(events.len()));
    // Stalled clients are closed while the session goes on, not at its end.
    wait_until_or(
        "stalled clients closed for the budget",
        || counter(&server, |c| &c.clients_closed_output_memory) >= 4,
        || server.counters().summary(),
    );
    source.finish();
    for stream in &mut stalled {
        assert!(closed_by_server(stream));
    }
    check_clients(readers, &expected_notifications(&events, &users));
    wait_until("no pending output is counted", || {
        counter(&server, |c| &c.output_pending_bytes) == 0
    });
    server.stop_and_wait().unwrap();
}

#[test]
fn a_client_that_accepts_no_byte_for_the_write_timeout_is_closed() {
    let config = Config {
        write_timeout: Some(Duration::from_millis(300)),
        ..two_shards()
    };
    let server = start_server(config);
    let readers = connect_all(&server, &[1, 2], "\n");
    let _stalled = stalled_client(server.client_addr, 100);
    wait_registered(&server, 3);
    let events = status_storm(&[1, 2, 100], 300_000);
    let mut source = Source::connect(server.event_addr);
    source.send(&events, &in_order_batches(events.len()));
    wait_until_or(
        "the stalled client is closed by the write timeout",
        || counter(&server, |c| &c.clients_closed_write_timeout) == 1,
        || server.counters().summary(),
    );
    assert_eq!(counter(&server, |c| &c.clients_closed_backlog), 0);
    source.finish();
    check_clients(readers, &expected_notifications(&events, &[1, 2, 100]));
    server.stop_and_wait().unwrap();
}

#[test]
fn idle_connections_beyond_the_handshake_pool_never_keep_a_client_out() {
    let config = Config {
        max_clients: 50,
        max_handshakes: 100,
        ..two_shards()
    };
    let server = start_server(config);
    let idle: Vec<TcpStream> = (0..2_000)
        .map(|_| TcpStream::connect(server.client_addr).expect("idle connection"))
        .collect();
    wait_until("every idle connection was accepted", || {
        counter(&server, |c| &c.clients_accepted) == idle.len() as u64
    });
    let workload = harness_workload(3, 5_000, 200, 40);
    let clients = connect_all(&server, &workload.clients, "\n");
    let mut source = Source::connect(server.event_addr);
    source.send(
        &workload.events,
        &harness_batches(3, workload.events.len(), 100),
    );
    source.finish();
    check_clients(
        clients,
        &expected_notifications(&workload.events, &workload.clients),
    );
    assert!(counter(&server, |c| &c.handshakes_evicted) >= 1_900);
    assert_eq!(counter(&server, |c| &c.clients_refused_max), 0);
    assert!(counter(&server, |c| &c.handshakes_open) <= 100);
    drop(idle);
    server.stop_and_wait().unwrap();
}

#[test]
fn identified_clients_beyond_max_clients_are_refused_while_handshakes_do_not_count() {
    let config = Config {
        max_clients: 3,
        ..two_shards()
    };
    let server = start_server(config);
    let _waiting: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(server.client_addr).unwrap())
        .collect();
    let clients = connect_all(&server, &[1, 2, 3], "\n");
    let mut extra = TcpStream::connect(server.client_addr).unwrap();
    extra.write_all(b"4\n").unwrap();
    assert!(closed_by_server(&mut extra));
    assert_eq!(counter(&server, |c| &c.clients_refused_max), 1);
    let events = vec!["1|B".to_string()];
    let mut source = Source::connect(server.event_addr);
    source.send(&events, &[vec![0]]);
    source.finish();
    check_clients(clients, &expected_notifications(&events, &[1, 2, 3]));
    server.stop_and_wait().unwrap();
}

#[test]
fn a_client_that_half_closes_after_its_id_keeps_receiving() {
    let server = start_server(two_shards());
    let mut half = TcpStream::connect(server.client_addr).unwrap();
    half.write_all(b"7\n").unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    wait_registered(&server, 1);
    wait_until("the server saw the half-close", || {
        counter(&server, |c| &c.clients_half_closed) == 1
    });
    let events: Vec<String> = ["1|B", "2|P|3|7", "3|F|7|9", "4|P|7|3"]
        .iter()
        .map(|line| line.to_string())
        .collect();
    let mut source = Source::connect(server.event_addr);
    source.send(&events, &[vec![0, 1, 2, 3]]);
    source.finish();
    half.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut received = String::new();
    half.read_to_string(&mut received).unwrap();
    assert_eq!(received, "1|B\n2|P|3|7\n");
    assert_eq!(counter(&server, |c| &c.clients_closed_by_peer), 0);
    server.stop_and_wait().unwrap();
}
