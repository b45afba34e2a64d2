//! `efr-load --chaos` against the real server (efr-sharded's library, 2 executors): with
//! chaos clients connecting, stalling and leaving, and malformed lines of every kind in the
//! source stream, every verified client still gets exactly its notifications, and the
//! server's counters show exactly the lines efr-load says it injected.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use efr::config::Config;
use efr::server::RunningServer;
use efr_load::chaos::FaultsInjected;
use efr_load::{LoadConfig, Report};

/// Longest wait for the server's counters to settle after a run.
const SETTLE: Duration = Duration::from_secs(30);
/// How often the counters are read while waiting.
const COUNTER_POLL: Duration = Duration::from_millis(2);

fn start() -> RunningServer {
    let mut config = Config::ephemeral(2);
    config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    efr::server::start(config).expect("server starts")
}

/// efr-load flags for `server`; each run waits for the server's registration counter.
fn config(server: &RunningServer, args: &[&str]) -> LoadConfig {
    let event = server.event_addr.port().to_string();
    let client = server.client_addr.port().to_string();
    let metrics = server.metrics_addr.expect("metrics endpoint").to_string();
    let mut all = vec![
        "efr-load",
        "--event-port",
        &event,
        "--client-port",
        &client,
        "--metrics-url",
        &metrics,
        "--progress",
        "off",
    ];
    all.extend_from_slice(args);
    LoadConfig::try_parse_from(all).expect("valid flags")
}

/// Waits until `done()`, failing the test (naming `what`) after [`SETTLE`].
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "waited {SETTLE:?} for: {what}");
        std::thread::sleep(COUNTER_POLL);
    }
}

fn faults(report: &Report) -> &FaultsInjected {
    report
        .faults_injected
        .as_ref()
        .expect("--chaos reports its faults")
}

/// The run passed with faults of every kind injected.
fn assert_pass_with_every_fault(report: &Report) {
    assert!(report.pass, "{}", report.summary());
    assert!(report.notifications > 0);
    let f = faults(report);
    assert!(f.empty_lines > 0, "{f:?}");
    assert!(f.bad_seq_lines > 0, "{f:?}");
    assert!(f.too_long_lines > 0, "{f:?}");
    assert!(f.duplicates > 0, "{f:?}");
    assert!(f.client_connects > 0, "{f:?}");
    assert!(f.client_identified > 0, "{f:?}");
}

/// The server dropped exactly the lines efr-load injected, and consumed no seq for them.
fn assert_server_counted(server: &RunningServer, report: &Report, workload_events: u64) {
    let c = server.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let f = faults(report);
    // The session is over once every event was delivered and the verified clients were
    // closed at its end: every line of the source has been counted by then.
    wait_until(
        &format!("the server delivered {workload_events} events and ended the session"),
        || {
            get(&c.events_delivered) >= workload_events
                && get(&c.clients_closed_session_end) >= report.clients
        },
    );
    let summary = c.summary();
    assert_eq!(
        get(&c.lines_unparseable),
        f.empty_lines + f.bad_seq_lines,
        "{summary}"
    );
    assert_eq!(get(&c.lines_too_long), f.too_long_lines, "{summary}");
    assert_eq!(
        get(&c.events_duplicate) + get(&c.events_already_delivered),
        f.duplicates,
        "{summary}"
    );
    assert_eq!(get(&c.events_malformed), 0, "{summary}");
    assert_eq!(get(&c.events_beyond_window), 0, "{summary}");
    assert_eq!(get(&c.events_delivered), workload_events, "{summary}");
    assert_eq!(get(&c.seqs_skipped), 0, "{summary}");
}

#[test]
fn harness_with_chaos_passes_and_the_server_counts_every_injected_line() {
    let server = start();
    let cfg = config(
        &server,
        &[
            "--chaos",
            "--chaos-malformed-every",
            "40",
            "--chaos-clients",
            "12",
            "--chaos-stall-max-ms",
            "300",
            "harness",
            "--total-events",
            "40000",
            "--concurrency",
            "50",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass_with_every_fault(&report);
    assert_eq!(report.events, 40_000);
    assert!(
        faults(&report).source_total() >= 500,
        "{:?}",
        faults(&report)
    );
    assert_server_counted(&server, &report, 40_000);
    // Duplicates reach both of the server's paths: still waiting, and long delivered.
    let c = server.counters();
    assert!(
        c.events_duplicate.load(Ordering::Relaxed) > 0,
        "{}",
        c.summary()
    );
    assert!(
        c.events_already_delivered.load(Ordering::Relaxed) > 0,
        "{}",
        c.summary()
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn chaos_with_crlf_and_ids_above_the_workload_passes() {
    let server = start();
    let cfg = config(
        &server,
        &[
            "--line-ending",
            "crlf",
            "--chaos",
            "--chaos-ids",
            "above",
            "--chaos-malformed-every",
            "25",
            "--chaos-long-line",
            "9000",
            "--chaos-clients",
            "5",
            "--chaos-seed",
            "11",
            "harness",
            "--total-events",
            "20000",
            "--concurrency",
            "20",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass_with_every_fault(&report);
    assert_server_counted(&server, &report, 20_000);
    server.stop_and_wait().unwrap();
}

#[test]
fn chaos_with_a_fanout_workload_passes() {
    let server = start();
    let cfg = config(
        &server,
        &[
            "--chaos",
            "--chaos-malformed-every",
            "20",
            "fanout",
            "--users",
            "2000",
            "--clients",
            "200",
            "--follows",
            "5",
            "--events",
            "4000",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass_with_every_fault(&report);
    assert_server_counted(&server, &report, 200 * 5 + 4000);
    server.stop_and_wait().unwrap();
}

#[test]
fn chaos_faults_are_in_the_json_report_and_absent_without_chaos() {
    let server = start();
    let dir = std::env::temp_dir().join(format!("efr-load-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("chaos.json");
    let json_arg = json.to_str().unwrap();
    let cfg = config(
        &server,
        &[
            "--json",
            json_arg,
            "--chaos",
            "--chaos-malformed-every",
            "30",
            "harness",
            "--total-events",
            "5000",
            "--concurrency",
            "10",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert!(report.pass, "{}", report.summary());
    assert!(report.summary().contains("Faults injected"));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = &doc["faults_injected"];
    assert_eq!(f["duplicates"].as_u64(), Some(faults(&report).duplicates));
    assert_eq!(f["empty_lines"].as_u64(), Some(faults(&report).empty_lines));
    assert!(f["client_connects"].as_u64().unwrap() > 0);

    let plain = efr_load::run(&config(
        &server,
        &["harness", "--total-events", "2000", "--concurrency", "10"],
    ))
    .unwrap();
    assert!(plain.pass, "{}", plain.summary());
    assert!(plain.faults_injected.is_none());
    assert!(!plain.summary().contains("Faults injected"));
    let _ = std::fs::remove_dir_all(&dir);
    server.stop_and_wait().unwrap();
}
