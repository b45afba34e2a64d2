//! efr-load against efr-sharded over real loopback TCP: a small harness run, a small fanout
//! run and the replay of the real arrival order all pass, through the library entry and once
//! through the efr-load binary; and the counts agree on both sides.

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

fn load_config(server: &RunningServer, workload: &[&str]) -> LoadConfig {
    let event_port = server.event_addr.port().to_string();
    let client_port = server.client_addr.port().to_string();
    let mut args = vec![
        "efr-load",
        "--event-port",
        &event_port,
        "--client-port",
        &client_port,
        "--progress",
        "off",
        "--timeout",
        "20000",
    ];
    args.extend_from_slice(workload);
    LoadConfig::try_parse_from(args).expect("valid flags")
}

fn run_against(cores: usize, workload: &[&str]) -> (efr_load::Report, RunningServer) {
    let server = efr::server::start(Config::ephemeral(cores)).expect("server starts");
    let report = efr_load::run(&load_config(&server, workload)).expect("efr-load runs");
    assert!(report.pass, "{}", report.summary());
    assert!(report.notifications > 0);
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
fn the_efr_load_binary_exits_zero_on_a_pass() {
    let server = efr::server::start(Config::ephemeral(2)).expect("server starts");
    let output = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(["--event-port", &server.event_addr.port().to_string()])
        .args(["--client-port", &server.client_addr.port().to_string()])
        .args(["--progress", "off", "harness", "--total-events", "10000"])
        .stdin(Stdio::null())
        .output()
        .expect("efr-load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    server.stop_and_wait().unwrap();
}
