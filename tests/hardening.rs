//! PROTOCOL.md section 6, row by row, over real loopback TCP: each bad input or fault is
//! counted, never crashes the server, never stalls anyone else, and never costs a
//! well-behaved client a notification. Each test is named after its row.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use efr::config::Config;

/// True when the peer closed the connection (EOF or reset) within the deadline.
fn is_closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut byte = [0u8; 64];
    loop {
        match stream.read(&mut byte) {
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

#[test]
fn bad_event_lines_of_every_kind_cost_well_behaved_clients_nothing() {
    let config = Config {
        resequencer_capacity: 1000,
        max_line: 100,
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let mut workload = harness_workload(99, 20_000, 1000, 100);
    // Malformed rest, seq kept: the seq is consumed as a no-op.
    let malformed = ["X|1|2", "F|1", "F|1|2|3", "P|a|2", "S", "B|7", "F||2", ""];
    for (i, rest) in malformed.iter().enumerate() {
        let index = 1000 + i * 1000;
        let seq = index + 1;
        workload.events[index] = if rest.is_empty() {
            format!("{seq}")
        } else {
            format!("{seq}|{rest}")
        };
    }
    let clients = connect_all(&server, &workload.clients, "\n");
    let batches = harness_batches(99, workload.events.len(), 100);
    let mut source = TcpStream::connect(server.event_addr).unwrap();
    let mut injected_unparseable = 0;
    let mut injected_duplicates = 0;
    let mut injected_beyond = 0;
    let mut injected_too_long = 0;
    for (number, batch) in batches.iter().enumerate() {
        let mut buffer = String::new();
        for &index in batch {
            buffer.push_str(&workload.events[index]);
            buffer.push('\n');
        }
        if number % 50 == 10 {
            buffer.push_str("\n|B\nabc|F|1|2\n0|B\n-5|B\n");
            injected_unparseable += 5;
            // A copy with other content of an event just sent: the first one wins.
            let seq = batch[0] + 1;
            buffer.push_str(&format!("{seq}|B\n"));
            injected_duplicates += 1;
            buffer.push_str(&format!("{}|B\n", seq as u64 + 1_000_000));
            injected_beyond += 1;
            buffer.push_str(&format!("{}\n", "7".repeat(500)));
            injected_too_long += 1;
        }
        source.write_all(buffer.as_bytes()).unwrap();
    }
    source.write_all(b"20001|P|1|2").unwrap(); // partial last line: dropped
    source.shutdown(Shutdown::Write).unwrap();
    let _ = source.read_to_end(&mut Vec::new());
    let expected = expected_notifications(&workload.events, &workload.clients);
    check_clients(clients, &expected);
    assert_eq!(
        count(&server, |c| &c.events_malformed),
        malformed.len() as u64
    );
    assert_eq!(
        count(&server, |c| &c.lines_unparseable),
        injected_unparseable
    );
    assert_eq!(
        count(&server, |c| &c.events_duplicate) + count(&server, |c| &c.events_already_delivered),
        injected_duplicates
    );
    assert_eq!(count(&server, |c| &c.events_beyond_window), injected_beyond);
    assert_eq!(count(&server, |c| &c.lines_too_long), injected_too_long);
    assert_eq!(count(&server, |c| &c.partial_lines), 1);
    assert_eq!(count(&server, |c| &c.events_delivered), 20_000);
    assert_eq!(count(&server, |c| &c.holes_skipped), 0);
    server.stop_and_wait().unwrap();
}

#[test]
fn a_hole_that_never_fills_is_skipped_after_the_gap_timeout() {
    let config = Config {
        gap_timeout: Some(Duration::from_millis(200)),
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let mut client = TcpStream::connect(server.client_addr).unwrap();
    client.write_all(b"1\n").unwrap();
    wait_registered(&server, 1);
    let mut source = TcpStream::connect(server.event_addr).unwrap();
    source
        .write_all(b"1|P|2|1\n2|P|2|1\n4|P|2|1\n5|B\n")
        .unwrap();
    let started = Instant::now();
    // The source stays connected: only the gap timeout can release 4 and 5.
    let lines = read_lines(&client, 4);
    assert_eq!(lines, vec!["1|P|2|1\n", "2|P|2|1\n", "4|P|2|1\n", "5|B\n"]);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "released before the timeout"
    );
    assert_eq!(count(&server, |c| &c.holes_skipped), 1);
    assert_eq!(count(&server, |c| &c.seqs_skipped), 1);
    // A late copy of the skipped seq is refused as already delivered; the stream goes on.
    source.write_all(b"3|P|2|1\n6|P|2|1\n").unwrap();
    assert_eq!(read_lines(&client, 1), vec!["6|P|2|1\n"]);
    assert_eq!(count(&server, |c| &c.events_already_delivered), 1);
    drop(source);
    server.stop_and_wait().unwrap();
}

/// Sends 6, 3 and 1 (in that order) and closes the source: 1 is delivered at once, 3 and 6
/// wait behind holes (2, 4-5) until the close releases them. Returns the events in seq order.
fn send_events_held_back_until_close(server: &efr::server::RunningServer) -> Vec<String> {
    let events: Vec<String> = ["1|P|2|1", "3|P|2|1", "6|B"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    send_source(server.event_addr, &events, &[vec![2, 1, 0]], "\n");
    events
}

#[test]
fn holes_still_open_at_source_close_are_skipped_in_order() {
    let server = start_server(Config::ephemeral(2));
    let clients = connect_all(&server, &[1], "\n");
    let events = send_events_held_back_until_close(&server);
    check_clients(clients, &expected_notifications(&events, &[1]));
    assert_eq!(count(&server, |c| &c.holes_skipped), 2);
    assert_eq!(count(&server, |c| &c.seqs_skipped), 3);
    server.stop_and_wait().unwrap();
}

#[test]
fn client_id_that_is_not_a_u64_or_too_long_closes_that_connection_only() {
    let config = Config {
        max_line: 32,
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let good = connect_all(&server, &[5], "\n");
    for bad in [
        &b"abc\n"[..],
        b"-1\n",
        b"\n",
        b"18446744073709551616\n",
        b"1 2\n",
    ] {
        let mut stream = TcpStream::connect(server.client_addr).unwrap();
        stream.write_all(bad).unwrap();
        assert!(is_closed_by_server(&mut stream), "{bad:?}");
    }
    let mut long = TcpStream::connect(server.client_addr).unwrap();
    long.write_all(&[b'1'; 100]).unwrap();
    assert!(is_closed_by_server(&mut long));
    assert_eq!(count(&server, |c| &c.clients_bad_id), 5);
    assert_eq!(count(&server, |c| &c.clients_id_too_long), 1);
    let events = vec!["1|P|1|5".to_string()];
    send_source(server.event_addr, &events, &[vec![0]], "\n");
    check_clients(good, &expected_notifications(&events, &[5]));
    server.stop_and_wait().unwrap();
}

#[test]
fn client_that_sends_no_id_is_closed_after_the_handshake_timeout() {
    let config = Config {
        handshake_timeout: Duration::from_millis(300),
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.client_addr).unwrap();
    let mut trickle = TcpStream::connect(server.client_addr).unwrap();
    trickle.write_all(b"1").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    trickle.write_all(b"2").unwrap(); // still no LF: the deadline is for the whole line
    assert!(is_closed_by_server(&mut silent));
    assert!(is_closed_by_server(&mut trickle));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(count(&server, |c| &c.clients_handshake_timeout), 2);
    eventually("open clients back to zero", || {
        count(&server, |c| &c.clients_open) == 0
    });
    server.stop_and_wait().unwrap();
}

#[test]
fn client_that_stops_reading_is_closed_at_its_backlog_limit_and_nobody_waits() {
    let config = Config {
        max_client_backlog: 1 << 20,
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let readers: Vec<u64> = (1..=10).collect();
    let clients = connect_all(&server, &readers, "\n");
    let mut stalled = TcpStream::connect(server.client_addr).unwrap();
    stalled.write_all(b"18446744073709551615\n").unwrap();
    wait_registered(&server, 11);
    // About 12 MB for the stalled user: more than the kernel buffers plus the backlog limit.
    let mut events = Vec::new();
    for seq in 1..=300_000u64 {
        events.push(match seq % 1000 {
            0 => format!("{seq}|B"),
            1..=10 => format!("{seq}|P|18446744073709551615|{}", seq % 1000),
            _ => format!("{seq}|P|18446744073709551614|18446744073709551615"),
        });
    }
    let batches: Vec<Vec<usize>> = (0..events.len())
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| c.to_vec())
        .collect();
    let started = Instant::now();
    send_source(server.event_addr, &events, &batches, "\n");
    let mut all = readers.clone();
    all.push(u64::MAX);
    let mut expected = expected_notifications(&events, &all);
    expected.remove(&u64::MAX);
    check_clients(clients, &expected);
    assert!(started.elapsed() < TEST_DEADLINE);
    assert_eq!(count(&server, |c| &c.clients_closed_backlog), 1);
    // The stalled client got a prefix of its stream, then the connection closed.
    stalled.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut received = Vec::new();
    let _ = stalled.read_to_end(&mut received);
    assert!(received.len() < 12_000_000, "the backlog was bounded");
    server.stop_and_wait().unwrap();
}

#[test]
fn connections_beyond_max_clients_are_closed_at_once() {
    let config = Config {
        max_clients: 3,
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let clients = connect_all(&server, &[1, 2, 3], "\n");
    let mut extra = TcpStream::connect(server.client_addr).unwrap();
    let _ = extra.write_all(b"4\n");
    assert!(is_closed_by_server(&mut extra));
    assert_eq!(count(&server, |c| &c.clients_refused_max), 1);
    let events = vec!["1|B".to_string()];
    send_source(server.event_addr, &events, &[vec![0]], "\n");
    check_clients(clients, &expected_notifications(&events, &[1, 2, 3]));
    server.stop_and_wait().unwrap();
}

#[test]
fn a_second_event_source_is_refused_and_the_first_run_is_unaffected() {
    let server = start_server(Config::ephemeral(2));
    let workload = harness_workload(5, 5_000, 100, 20);
    let clients = connect_all(&server, &workload.clients, "\n");
    let mut first = TcpStream::connect(server.event_addr).unwrap();
    let half: String = workload.events[..2_500]
        .iter()
        .map(|e| format!("{e}\n"))
        .collect();
    first.write_all(half.as_bytes()).unwrap();
    eventually("the first session started", || {
        count(&server, |c| &c.sessions) == 1
    });
    let mut second = TcpStream::connect(server.event_addr).unwrap();
    let _ = second.write_all(b"1|B\n");
    assert!(is_closed_by_server(&mut second));
    assert_eq!(count(&server, |c| &c.sources_refused), 1);
    let rest: String = workload.events[2_500..]
        .iter()
        .map(|e| format!("{e}\n"))
        .collect();
    first.write_all(rest.as_bytes()).unwrap();
    first.shutdown(Shutdown::Write).unwrap();
    check_clients(
        clients,
        &expected_notifications(&workload.events, &workload.clients),
    );
    server.stop_and_wait().unwrap();
}

/// A one-shard server with its metrics endpoint on an ephemeral port.
fn start_server_with_metrics() -> efr::server::RunningServer {
    start_server(Config {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::ephemeral(1)
    })
}

fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    let mut http = TcpStream::connect(addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    http.read_to_string(&mut page).unwrap();
    page
}

/// Events 3 and 6 wait behind holes until the source closes and are released in the session's
/// last batch: their notifications are counted in the delivery latency like any other.
#[test]
fn notifications_released_at_source_close_count_in_the_delivery_latency() {
    let server = start_server_with_metrics();
    let clients = connect_all(&server, &[1], "\n");
    let events = send_events_held_back_until_close(&server);
    check_clients(clients, &expected_notifications(&events, &[1]));
    eventually("3 notifications counted in the delivery latency", || {
        scrape_metrics(server.metrics_addr.unwrap())
            .contains("efr_delivery_latency_seconds_count 3\n")
    });
    server.stop_and_wait().unwrap();
}

#[test]
fn metrics_endpoint_serves_every_counter_in_prometheus_text() {
    let server = start_server_with_metrics();
    let clients = connect_all(&server, &[1], "\n");
    let events = vec!["1|B".to_string(), "2|X".to_string()];
    send_source(server.event_addr, &events, &[vec![0, 1]], "\n");
    check_clients(clients, &expected_notifications(&events, &[1]));
    let scrape = || scrape_metrics(server.metrics_addr.unwrap());
    // The writer records the delivery latency just after its write returns, which may be
    // after the client read the bytes.
    eventually(
        "the delivery latency of the one notification is recorded",
        || scrape().contains("efr_delivery_latency_seconds_count 1\n"),
    );
    let page = scrape();
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(
        page.contains("# TYPE efr_delivery_latency_seconds histogram\n"),
        "{page}"
    );
    // Delivered within 10 s of its release, and counted once.
    assert!(
        page.contains("efr_delivery_latency_seconds_bucket{le=\"10\"} 1\n"),
        "{page}"
    );
    assert!(
        page.contains("efr_delivery_latency_seconds_bucket{le=\"+Inf\"} 1\n"),
        "{page}"
    );
    assert!(
        page.contains("# TYPE efr_events_received counter\nefr_events_received 2\n"),
        "{page}"
    );
    assert!(page.contains("efr_events_malformed 1\n"));
    assert!(page.contains("efr_notifications 1\n"));
    assert!(page.contains("# TYPE efr_clients_open gauge\n"));
    assert!(page.contains("process_resident_memory_bytes "));
    server.stop_and_wait().unwrap();
}

/// The real binary, with its listening ports read from its log. Its metrics endpoint is on,
/// so a test can wait for the server's own counters instead of sleeping.
struct Binary {
    child: std::process::Child,
    event_addr: std::net::SocketAddr,
    client_addr: std::net::SocketAddr,
    metrics_addr: std::net::SocketAddr,
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Binary {
    /// The value of counter `efr_<name>` on the metrics page.
    fn counter(&self, name: &str) -> u64 {
        let mut stream = TcpStream::connect(self.metrics_addr).expect("metrics endpoint");
        stream.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: efr\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        let _ = stream.read_to_string(&mut page);
        let wanted = format!("efr_{name} ");
        page.lines()
            .find_map(|line| line.strip_prefix(&wanted))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in the metrics page:\n{page}"))
    }

    /// Waits until counter `efr_<name>` reaches `at_least`.
    fn wait_counter(&self, name: &str, at_least: u64) {
        eventually(&format!("efr_{name} >= {at_least}"), || {
            self.counter(name) >= at_least
        });
    }
}

/// The address after `marker` in a log line, up to the next comma, slash or space.
fn address_after(line: &str, marker: &str) -> Option<std::net::SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let end = rest
        .find(|c: char| c == ',' || c == '/' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn start_binary(extra: &[&str]) -> Binary {
    let mut child = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(["--event-port", "0", "--client-port", "0", "--cores", "2"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("efr-sharded starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (mut event, mut client, mut metrics) = (None, None, None);
    let mut line = String::new();
    while event.is_none() || metrics.is_none() {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "efr-sharded exited early"
        );
        event = event.or(address_after(&line, "events on "));
        client = client.or(address_after(&line, "clients on "));
        metrics = metrics.or(address_after(&line, "metrics on http://"));
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Binary {
        child,
        event_addr: event.unwrap(),
        client_addr: client.expect("the client port is in the same log line"),
        metrics_addr: metrics.unwrap(),
    }
}

#[test]
fn sigterm_mid_run_exits_zero_and_every_client_got_an_ordered_prefix() {
    let mut server = start_binary(&["--shutdown-timeout-ms", "2000"]);
    let workload = harness_workload(8, 200_000, 1000, 50);
    let clients: Vec<Client> = workload
        .clients
        .iter()
        .map(|&u| Client::connect(server.client_addr, u, "\n"))
        .collect();
    server.wait_counter("clients_registered", clients.len() as u64);
    let mut source = TcpStream::connect(server.event_addr).unwrap();
    let batches = harness_batches(8, workload.events.len(), 100);
    let events = workload.events.clone();
    let writer = std::thread::spawn(move || {
        for batch in batches {
            let text: String = batch.iter().map(|&i| format!("{}\n", events[i])).collect();
            if source.write_all(text.as_bytes()).is_err() {
                break;
            }
        }
    });
    // SIGTERM once the run is under way: some notifications went out.
    server.wait_counter("bytes_written", 1);
    // SAFETY: plain kill(2) on our child.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "no exit within the deadline"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    let _ = writer.join();
    let expected = expected_notifications(&workload.events, &workload.clients);
    let mut total = 0;
    for client in clients {
        let user = client.user;
        let text = String::from_utf8(client.finish()).unwrap();
        let got: Vec<&str> = text.lines().collect();
        let want = &expected[&user];
        assert!(
            got.len() <= want.len(),
            "client {user} got more than expected"
        );
        for (index, line) in got.iter().enumerate() {
            assert_eq!(line, &want[index], "client {user} line {index}");
        }
        total += got.len();
    }
    assert!(total > 0, "the run was under way when SIGTERM arrived");
}

#[test]
fn ten_thousand_idle_connections_are_closed_after_the_handshake_timeout() {
    let mut server = start_binary(&["--handshake-timeout-ms", "1000", "--max-clients", "12000"]);
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(TcpStream::connect(server.client_addr).expect("idle connection"));
    }
    let started = Instant::now();
    for stream in &mut idle {
        assert!(is_closed_by_server(stream));
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(idle);
    // A normal run afterwards.
    let workload = harness_workload(4, 5_000, 200, 20);
    let clients: Vec<Client> = workload
        .clients
        .iter()
        .map(|&u| Client::connect(server.client_addr, u, "\n"))
        .collect();
    server.wait_counter("clients_registered", clients.len() as u64);
    let batches = harness_batches(4, workload.events.len(), 100);
    send_source(server.event_addr, &workload.events, &batches, "\n");
    check_clients(
        clients,
        &expected_notifications(&workload.events, &workload.clients),
    );
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    assert!(server.child.wait().unwrap().success());
}

/// Sends `source` (raw bytes) to a server with one client of user 1 and returns what that
/// client received, with the server for its counters.
fn one_client_run(config: Config, source: &[u8]) -> (String, efr::server::RunningServer) {
    let server = start_server(config);
    let clients = connect_all(&server, &[1], "\n");
    let mut stream = TcpStream::connect(server.event_addr).unwrap();
    stream.write_all(source).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let _ = stream.read_to_end(&mut Vec::new());
    let received = clients.into_iter().next().unwrap().finish();
    (String::from_utf8(received).unwrap(), server)
}

#[test]
fn malformed_event_line_consumes_its_seq_as_a_no_op() {
    let (got, server) = one_client_run(Config::ephemeral(2), b"3|B\n2|X|1|1\n1|B\n");
    assert_eq!(got, "1|B\n3|B\n");
    assert_eq!(count(&server, |c| &c.events_malformed), 1);
    assert_eq!(count(&server, |c| &c.holes_skipped), 0);
    server.stop_and_wait().unwrap();
}

#[test]
fn event_line_without_a_valid_seq_or_empty_is_dropped() {
    let (got, server) = one_client_run(Config::ephemeral(2), b"\nx|B\n1|B\n\r\n0|B\n2|B\n");
    assert_eq!(got, "1|B\n2|B\n");
    assert_eq!(count(&server, |c| &c.lines_unparseable), 4);
    server.stop_and_wait().unwrap();
}

#[test]
fn duplicate_or_already_delivered_seq_is_dropped_and_the_first_wins() {
    let (got, server) = one_client_run(Config::ephemeral(2), b"2|P|9|1\n2|B\n1|B\n1|P|9|1\n3|B\n");
    assert_eq!(got, "1|B\n2|P|9|1\n3|B\n");
    assert_eq!(
        count(&server, |c| &c.events_duplicate) + count(&server, |c| &c.events_already_delivered),
        2
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn seq_beyond_the_window_is_dropped() {
    let config = Config {
        resequencer_capacity: 10,
        ..Config::ephemeral(2)
    };
    let (got, server) = one_client_run(config, b"11|B\n12|B\n1|B\n2|B\n");
    assert_eq!(got, "1|B\n2|B\n");
    assert_eq!(count(&server, |c| &c.events_beyond_window), 2);
    server.stop_and_wait().unwrap();
}

#[test]
fn event_line_longer_than_the_limit_is_skipped_to_its_lf() {
    let config = Config {
        max_line: 32,
        ..Config::ephemeral(2)
    };
    let mut source = b"1|B\n2|P|9|".to_vec();
    source.extend(std::iter::repeat_n(b'1', 100));
    source.extend(b"\n3|B\n");
    let (got, server) = one_client_run(config, &source);
    // Seq 2 never arrived as a valid line: it is a hole, skipped at source close.
    assert_eq!(got, "1|B\n3|B\n");
    assert_eq!(count(&server, |c| &c.lines_too_long), 1);
    server.stop_and_wait().unwrap();
}

#[test]
fn partial_last_line_at_source_close_is_dropped() {
    let (got, server) = one_client_run(Config::ephemeral(2), b"1|B\n2|B");
    assert_eq!(got, "1|B\n");
    assert_eq!(count(&server, |c| &c.partial_lines), 1);
    server.stop_and_wait().unwrap();
}

#[test]
fn client_that_closes_mid_stream_is_unregistered_and_nothing_else_changes() {
    let server = start_server(Config::ephemeral(2));
    let stay = connect_all(&server, &[1], "\n");
    let mut leaver = TcpStream::connect(server.client_addr).unwrap();
    leaver.write_all(b"2\n").unwrap();
    wait_registered(&server, 2);
    drop(leaver);
    // A closed connection looks like a half-closed one until a write to it fails: the kernel
    // takes the first notification (the peer answers with a reset), the next write fails.
    let events: Vec<String> = ["1|B", "2|P|1|2", "3|P|2|1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut source = Source::connect(server.event_addr);
    source.send(&events, &[vec![0]]);
    eventually("the first notification was written to both", || {
        count(&server, |c| &c.bytes_written) == 8
    });
    source.send(&events, &[vec![1]]);
    eventually("the leaver is unregistered", || {
        count(&server, |c| &c.clients_closed_by_peer) == 1
    });
    source.send(&events, &[vec![2]]);
    source.finish();
    check_clients(stay, &expected_notifications(&events, &[1]));
    eventually("every client connection ended", || {
        count(&server, |c| &c.clients_open) == 0
    });
    server.stop_and_wait().unwrap();
}
