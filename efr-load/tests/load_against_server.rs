//! efr-load against efr-sharded over real loopback TCP: a small harness run, a small fanout
//! run, the replay of the real arrival order and ping all pass, through the library entry and
//! once through the efr-load binary; and the counts agree on both sides. Every run waits for
//! the server's registration counter (`--metrics-url`) before the source connects, never a
//! fixed pause.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use clap::Parser;
use efr::config::Config;
use efr::server::RunningServer;
use efr_load::LoadConfig;

const ARRIVAL_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/harness-arrival-order-100k.txt"
);

/// efr-sharded's library on ephemeral ports, with its metrics endpoint.
fn start_server(cores: usize) -> RunningServer {
    let mut config = Config::ephemeral(cores);
    config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    efr::server::start(config).expect("server starts")
}

/// The flags that point efr-load at `server` and its metrics.
fn server_flags(server: &RunningServer) -> Vec<String> {
    let metrics = server.metrics_addr.expect("metrics endpoint");
    [
        "--event-port".to_string(),
        server.event_addr.port().to_string(),
        "--client-port".into(),
        server.client_addr.port().to_string(),
        "--metrics-url".into(),
        format!("http://{metrics}/metrics"),
    ]
    .into()
}

fn load_config(server: &RunningServer, workload: &[&str]) -> LoadConfig {
    let mut args = vec!["efr-load".to_string()];
    args.extend(server_flags(server));
    args.extend(["--progress", "off", "--timeout", "20000"].map(String::from));
    args.extend(workload.iter().map(|s| s.to_string()));
    LoadConfig::try_parse_from(args).expect("valid flags")
}

fn run_against(cores: usize, workload: &[&str]) -> (efr_load::Report, RunningServer) {
    let server = start_server(cores);
    let report = efr_load::run(&load_config(&server, workload)).expect("efr-load runs");
    // The server's counters tell a client closed by the server (write timeout, backlog) from
    // one that was never sent a line.
    assert!(
        report.pass,
        "{}\nserver counters: {}",
        report.summary(),
        server.counters().summary()
    );
    assert!(report.notifications > 0);
    assert!(
        report
            .registration
            .starts_with("efr_clients_registered registered"),
        "{}",
        report.registration
    );
    (report, server)
}

#[test]
fn harness_run_passes_and_both_sides_count_the_same_notifications() {
    let (report, server) = run_against(2, &["harness", "--total-events", "30000"]);
    let counters = server.counters();
    assert_eq!(counters.events_delivered.load(Ordering::Relaxed), 30_000);
    assert_eq!(
        counters.notifications.load(Ordering::Relaxed),
        report.notifications
    );
    // The server's own latency histogram counted every notification of the run once, and
    // its quantiles are ordered.
    let own = report
        .server_latency
        .as_ref()
        .unwrap_or_else(|| panic!("no server latency in\n{}", report.summary()));
    assert_eq!(own.metric, "efr_delivery_latency_seconds");
    assert_eq!(own.count, report.notifications, "{own:?}");
    assert!(
        0.0 < own.p50_us && own.p50_us <= own.p99_us && own.p99_us <= own.p999_us,
        "{own:?}"
    );
    assert!(own
        .within_1ms
        .is_some_and(|share| (0.0..=1.0).contains(&share)));
    assert!(
        report.summary().contains("Server's own"),
        "{}",
        report.summary()
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn crlf_harness_run_passes_with_eight_shards() {
    let (_, server) = run_against(
        8,
        &[
            "--line-ending",
            "crlf",
            "harness",
            "--total-events",
            "20000",
        ],
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn fanout_run_passes() {
    let (report, server) = run_against(
        2,
        &[
            "fanout",
            "--users",
            "5000",
            "--clients",
            "500",
            "--events",
            "5000",
        ],
    );
    assert!(
        report.notifications > 5_000,
        "fan-out multiplies: {}",
        report.notifications
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn replay_of_the_real_arrival_order_passes() {
    let (report, server) = run_against(2, &["replay", ARRIVAL_FILE]);
    assert_eq!(report.events, 100_000);
    assert_eq!(server.counters().holes_skipped.load(Ordering::Relaxed), 0);
    server.stop_and_wait().unwrap();
}

#[test]
fn ping_measures_one_round_trip_per_event() {
    let (report, server) = run_against(2, &["ping", "--count", "300"]);
    assert_eq!((report.events, report.notifications), (300, 300));
    assert_eq!(report.clients, 1);
    assert!(report.pacing.contains("one event at a time"));
    assert!(report.latency.p50_us > 0.0 && report.latency.p999_us >= report.latency.p50_us);
    assert_eq!(
        server.counters().events_delivered.load(Ordering::Relaxed),
        300
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn the_efr_load_binary_exits_zero_on_a_pass() {
    let server = start_server(2);
    let output = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(server_flags(&server))
        .args(["--progress", "off", "harness", "--total-events", "10000"])
        .stdin(Stdio::null())
        .output()
        .expect("efr-load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    server.stop_and_wait().unwrap();
}
