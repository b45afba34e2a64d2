//! `efr-load ping`, the round-trip loop: against efr-sharded (library, real loopback TCP) it
//! passes with exact counts on both sides, LF and CRLF, 1 and 8 executors, with `--spin` and
//! with `--chaos`, and `--rate` spaces the round trips; against the relay (`efr-load relay`, the floor) it passes; against
//! wrong servers it fails naming the client and the line: a changed line, a dropped one, a
//! duplicate, an early close, an extra line after the last.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use clap::Parser;
use efr::config::Config;
use efr::server::RunningServer;
use efr_load::relay::Relay;
use efr_load::{LoadConfig, Report};

fn start_efr(cores: usize) -> RunningServer {
    let mut config = Config::ephemeral(cores);
    config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    efr::server::start(config).expect("server starts")
}

fn ping_config(event_port: u16, client_port: u16, extra: &[&str]) -> LoadConfig {
    let mut args: Vec<String> = [
        "efr-load",
        "--event-port",
        &event_port.to_string(),
        "--client-port",
        &client_port.to_string(),
        "--progress",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    LoadConfig::try_parse_from(args).expect("valid flags")
}

fn ping_efr(server: &RunningServer, extra: &[&str]) -> Report {
    let metrics = format!("http://{}/metrics", server.metrics_addr.unwrap());
    let mut args = vec!["--metrics-url", &metrics];
    args.extend_from_slice(extra);
    let config = ping_config(server.event_addr.port(), server.client_addr.port(), &args);
    efr_load::run(&config).expect("efr-load runs")
}

/// Bytes client 2 receives for pings 1..=count: `n|P|1|2\n` each.
fn ping_bytes(count: u64) -> u64 {
    (1..=count).map(|n| n.to_string().len() as u64 + 7).sum()
}

fn assert_exact_pass(report: &Report, count: u64) {
    assert!(report.pass, "{}", report.summary());
    assert_eq!((report.events, report.notifications), (count, count));
    assert_eq!(report.bytes_received, ping_bytes(count));
    assert_eq!(report.clients, 1);
    assert_eq!(report.reader_threads, 1);
    assert!(report.pacing.starts_with("one event at a time"));
    let l = &report.latency;
    assert!(l.p50_us > 0.0 && l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
}

#[test]
fn ping_passes_against_efr_at_one_and_eight_executors_lf_and_crlf() {
    for (cores, ending) in [(1, "lf"), (8, "crlf")] {
        let server = start_efr(cores);
        let report = ping_efr(
            &server,
            &["--line-ending", ending, "ping", "--count", "400"],
        );
        assert_exact_pass(&report, 400);
        assert!(report
            .registration
            .starts_with("efr_clients_registered registered 1"));
        let c = server.counters();
        assert_eq!(c.events_delivered.load(Ordering::Relaxed), 400);
        assert_eq!(c.notifications.load(Ordering::Relaxed), 400);
        // The server's own part of each round trip: every ping counted once.
        let own = report.server_latency.as_ref().expect("server latency");
        assert_eq!(own.count, 400, "{own:?}");
        assert!(own.p50_us > 0.0 && own.p50_us <= own.p99_us, "{own:?}");
        server.stop_and_wait().unwrap();
    }
}

#[test]
fn rate_spaces_the_round_trips() {
    let server = start_efr(2);
    let report = ping_efr(&server, &["--rate", "2000", "ping", "--count", "101"]);
    assert_exact_pass(&report, 101);
    // Round trip k is written no earlier than k / 2000 s after the first.
    assert!(report.wall_s >= 0.05, "{}", report.wall_s);
    assert!(report.pacing.contains("at most 2000 events/s"));
    server.stop_and_wait().unwrap();
}

#[test]
fn spinning_reads_pass_and_still_time_out() {
    let server = start_efr(2);
    let report = ping_efr(&server, &["ping", "--count", "300", "--spin"]);
    assert_exact_pass(&report, 300);
    assert!(report.pacing.contains("client read spinning"));
    server.stop_and_wait().unwrap();
    let report = ping_wrong(Wrong::Drop(2), &["--spin"]);
    assert_eq!(
        report.errors,
        ["client 2 silent for 300 ms while expecting 2|P|1|2"]
    );
}

#[test]
fn chaos_lines_and_clients_around_the_pings_change_nothing_verified() {
    let server = start_efr(2);
    let report = ping_efr(
        &server,
        &[
            "--chaos",
            "--chaos-clients",
            "5",
            "--chaos-malformed-every",
            "5",
            "ping",
            "--count",
            "300",
        ],
    );
    assert_exact_pass(&report, 300);
    let f = report.faults_injected.clone().expect("chaos counts");
    let lines = f.empty_lines + f.bad_seq_lines + f.too_long_lines + f.duplicates;
    assert!(lines > 10, "{}", report.summary());
    assert_eq!(
        server.counters().events_delivered.load(Ordering::Relaxed),
        300
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn ping_passes_against_the_relay() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let relay = Relay::start(any, any, Some(any)).unwrap();
    let metrics = relay.metrics_addr.unwrap().to_string();
    let config = ping_config(
        relay.event_addr.port(),
        relay.client_addr.port(),
        &[
            "--metrics-url",
            &metrics,
            "--line-ending",
            "crlf",
            "ping",
            "--count",
            "300",
        ],
    );
    let report = efr_load::run(&config).unwrap();
    assert_exact_pass(&report, 300);
    assert!(report
        .registration
        .starts_with("efr_clients_registered registered 1"));
    relay.stop();
}

/// A child process killed (and reaped) when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_relay_command_prints_its_ports_and_serves_ping() {
    let child = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args([
            "relay",
            "--listen-event-port",
            "0",
            "--listen-client-port",
            "0",
            "--listen-metrics-port",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "efr-load relay: event port E, client port C, metrics port M"
    let ports: Vec<u16> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 3, "{line}");
    let metrics = format!("127.0.0.1:{}", ports[2]);
    let report = efr_load::run(&ping_config(
        ports[0],
        ports[1],
        &["--metrics-url", &metrics, "ping", "--count", "50"],
    ));
    drop(child);
    assert_exact_pass(&report.unwrap(), 50);
}

/// How a wrong server treats the source's lines (counted from 1).
#[derive(Clone, Copy)]
enum Wrong {
    /// Sends `n|P|1|3` in place of line n.
    Change(u64),
    /// Never sends line n.
    Drop(u64),
    /// Sends line n twice.
    Duplicate(u64),
    /// Closes the client instead of sending line n.
    CloseAt(u64),
    /// Sends one more line after the source closed, then closes.
    ExtraAtEnd,
}

/// A one-client, one-source server that copies the source's lines to the client except for
/// `wrong`. Accepts the client (and reads its id line) before the source.
fn wrong_server(wrong: Wrong) -> (u16, u16, JoinHandle<()>) {
    let events = TcpListener::bind("127.0.0.1:0").unwrap();
    let clients = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = (
        events.local_addr().unwrap().port(),
        clients.local_addr().unwrap().port(),
    );
    let handle = std::thread::spawn(move || {
        let (mut client, _) = clients.accept().unwrap();
        let mut id = [0u8; 1];
        while client.read(&mut id).unwrap() == 1 && id[0] != b'\n' {}
        let (source, _) = events.accept().unwrap();
        let mut n = 0;
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            n += 1;
            let out = match wrong {
                Wrong::Change(k) if k == n => format!("{n}|P|1|3\n"),
                Wrong::Drop(k) if k == n => String::new(),
                Wrong::Duplicate(k) if k == n => format!("{line}\n{line}\n"),
                Wrong::CloseAt(k) if k == n => {
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
                _ => format!("{line}\n"),
            };
            if client.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
        if let Wrong::ExtraAtEnd = wrong {
            let _ = client.write_all(b"999|B\n");
        }
        let _ = client.shutdown(Shutdown::Both);
    });
    (ports.0, ports.1, handle)
}

fn ping_wrong(wrong: Wrong, ping_flags: &[&str]) -> Report {
    let (event_port, client_port, server) = wrong_server(wrong);
    let mut args = vec![
        "--settle-ms",
        "0",
        "--timeout",
        "300",
        "ping",
        "--count",
        "10",
    ];
    args.extend_from_slice(ping_flags);
    let config = ping_config(event_port, client_port, &args);
    let report = efr_load::run(&config).expect("the run is made");
    server.join().unwrap();
    assert!(!report.pass, "{}", report.summary());
    assert_eq!(report.error_count, 1);
    report
}

#[test]
fn wrong_servers_fail_naming_the_client_and_the_line() {
    let cases = [
        (
            Wrong::Change(7),
            "client 2 expected line 7|P|1|2 but got 7|P|1|3",
            6,
        ),
        (
            Wrong::Drop(5),
            "client 2 silent for 300 ms while expecting 5|P|1|2",
            4,
        ),
        (
            Wrong::Duplicate(3),
            "client 2 expected line 4|P|1|2 but got 3|P|1|2",
            3,
        ),
        (
            Wrong::CloseAt(8),
            "client 2 connection closed by the server while expecting 8|P|1|2",
            7,
        ),
        (
            Wrong::ExtraAtEnd,
            "client 2 extra line after the last expected: 999|B",
            10,
        ),
    ];
    for (wrong, message, verified) in cases {
        let report = ping_wrong(wrong, &[]);
        assert_eq!(report.errors, [message], "{}", report.summary());
        assert_eq!(report.notifications, verified, "{}", report.summary());
    }
}

#[test]
fn the_binary_exits_one_with_the_line_on_a_wrong_server() {
    let (event_port, client_port, server) = wrong_server(Wrong::Change(2));
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args([
            "--event-port",
            &event_port.to_string(),
            "--client-port",
            &client_port.to_string(),
            "--settle-ms",
            "0",
            "--progress",
            "off",
            "ping",
            "--count",
            "5",
        ])
        .env_remove("timeout")
        .output()
        .unwrap();
    server.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("client 2 expected line 2|P|1|2 but got 2|P|1|3"),
        "{stdout}"
    );
}
