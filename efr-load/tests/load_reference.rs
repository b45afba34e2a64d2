//! efr-load against the correct reference server: harness, fanout and replay runs pass, with
//! LF and CRLF, and the counts agree with the socket-free model.

mod load_support;

use efr_load::model::expected_streams;
use efr_load::workload::LineEnding;
use load_support::refserver::{self, Fault};
use load_support::{config, ARRIVAL_FILE};

fn expected_total(cfg: &efr_load::LoadConfig) -> u64 {
    let mut w = cfg.workload_cmd().build(LineEnding::Lf).unwrap();
    expected_streams(w.as_mut())
        .unwrap()
        .iter()
        .map(|s| s.iter().filter(|&&b| b == b'\n').count() as u64)
        .sum()
}

fn assert_pass(report: &efr_load::Report) {
    assert!(report.pass, "{}", report.summary());
    assert!(report.errors.is_empty());
    assert!(report.notifications > 0);
}

#[test]
fn harness_20k_events_lf_passes() {
    let server = refserver::start(Fault::None);
    let cfg = config(&server, &["harness", "--total-events", "20000"]);
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    assert_eq!(report.events, 20_000);
    assert_eq!(report.clients, 100);
    assert_eq!(report.notifications, expected_total(&cfg));
    assert!(report.cpu_ns_per_notification.is_some());
}

#[test]
fn harness_crlf_two_readers_passes() {
    let server = refserver::start(Fault::None);
    let cfg = config(
        &server,
        &[
            "--line-ending",
            "crlf",
            "--readers",
            "2",
            "harness",
            "--total-events",
            "10000",
            "--concurrency",
            "40",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    assert_eq!(report.reader_threads, 2);
    assert_eq!(report.notifications, expected_total(&cfg));
}

#[test]
fn two_runs_in_a_row_on_one_server() {
    let server = refserver::start(Fault::None);
    for seed in ["1", "2"] {
        let cfg = config(
            &server,
            &["harness", "--total-events", "3000", "--seed", seed],
        );
        assert_pass(&efr_load::run(&cfg).unwrap());
    }
}

#[test]
fn fanout_small_passes() {
    let server = refserver::start(Fault::None);
    let cfg = config(
        &server,
        &[
            "fanout",
            "--users",
            "2000",
            "--clients",
            "300",
            "--follows",
            "10",
            "--events",
            "3000",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    assert_eq!(report.events, 300 * 10 + 3000);
    assert_eq!(report.notifications, expected_total(&cfg));
    // Heavy tail: status updates of popular users reach many clients.
    assert!(report.notifications > 3000 * 10, "{}", report.notifications);
}

#[test]
fn replay_whole_arrival_file_lf_passes() {
    let server = refserver::start(Fault::None);
    let cfg = config(&server, &["replay", ARRIVAL_FILE]);
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    assert_eq!(report.events, 100_000);
    assert_eq!(report.notifications, expected_total(&cfg));
}

#[test]
fn replay_closed_prefix_crlf_passes() {
    // The first 20,197 lines of the file hold exactly 1..=20197? Find a closed prefix near
    // 20,000 instead of trusting a number.
    let text = std::fs::read_to_string(ARRIVAL_FILE).unwrap();
    let mut max = 0;
    let mut closed = 0;
    for (i, l) in text.lines().enumerate() {
        max = max.max(l.trim().parse::<u64>().unwrap());
        if max == i as u64 + 1 && i >= 20_000 {
            closed = i + 1;
            break;
        }
    }
    assert!(closed > 0);
    let server = refserver::start(Fault::None);
    let limit = closed.to_string();
    let cfg = config(
        &server,
        &[
            "--line-ending",
            "crlf",
            "replay",
            ARRIVAL_FILE,
            "--limit",
            &limit,
            "--batch-lines",
            "37",
        ],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    assert_eq!(report.events, closed as u64);
}

#[test]
fn replay_open_prefix_skips_holes_like_the_server() {
    // 1,000 lines of the file are not closed (seqs beyond line 1000 are missing): the server
    // delivers what it got at source close, skipping the holes, and so does the model.
    let server = refserver::start(Fault::None);
    let cfg = config(&server, &["replay", ARRIVAL_FILE, "--limit", "1000"]);
    let report = efr_load::run(&cfg).unwrap();
    assert!(report.pass, "{}", report.summary());
    assert_eq!(report.events, 1000);
}

#[test]
fn json_report_has_figures_params_and_machine() {
    let server = refserver::start(Fault::None);
    let path = std::env::temp_dir().join(format!("efr-load-test-{}.json", std::process::id()));
    let p = path.to_str().unwrap().to_string();
    let cfg = config(
        &server,
        &["--json", &p, "harness", "--total-events", "2000"],
    );
    let report = efr_load::run(&cfg).unwrap();
    assert_pass(&report);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(v["pass"], true);
    assert_eq!(v["events"], 2000);
    assert_eq!(v["params"]["workload"]["name"], "harness");
    assert_eq!(v["params"]["workload"]["total_events"], 2000);
    assert!(v["latency"]["p99_us"].as_f64().unwrap() >= v["latency"]["p50_us"].as_f64().unwrap());
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["cpu_ns_per_notification"].as_f64().unwrap() > 0.0);
    let summary = report.summary();
    for word in ["Events", "Notifications", "Latency", "Tool CPU", "PASS"] {
        assert!(summary.contains(word), "{summary}");
    }
}

#[test]
fn tiny_flow_bounds_still_pass() {
    // The source must wait for the readers (in-flight batches and pending notifications)
    // without deadlocking.
    let server = refserver::start(Fault::None);
    let cfg = config(
        &server,
        &[
            "--max-inflight-batches",
            "2",
            "--max-pending-notifications",
            "30",
            "harness",
            "--total-events",
            "5000",
        ],
    );
    assert_pass(&efr_load::run(&cfg).unwrap());
}
