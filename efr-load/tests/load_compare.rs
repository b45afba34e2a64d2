//! `efr-load compare` end to end, with tiny workloads: efr-sharded and the built-in ceiling
//! (`efr-load null-server`) both pass, the files are written, the ceiling's ratio is 1; a
//! server that exits at once or never listens is reported as failed, without hanging; the
//! in-process ceiling serves several runs of a workload, with a lookahead smaller than its
//! output, and writes exactly the bytes the socket-free model computes.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use efr_load::ceiling::{CeilingSettings, NullServer};
use efr_load::compare::{compare, parse_workload, CompareArgs, CEILING_NAME};
use efr_load::model::expected_streams;
use efr_load::workload::LineEnding;

/// Longest any single test may take: it only bounds a hang (the whole file took 20-40 s with
/// the machine's load average at 15, seconds on a quiet machine).
const TEST_BOUND: Duration = Duration::from_secs(120);

mod load_support;
use load_support::efr_stand_in;

/// Not a test of its own: the efr-sharded process that the tests here start through compare.
#[test]
#[ignore = "started by the compare tests as a server process"]
fn efr_sharded_stand_in() {
    efr_stand_in::serve_if_asked();
}

/// `NAME=CMD` of efr-sharded with `flags`, on compare's ports, with its metrics endpoint (so
/// that each run waits for its registration counter).
fn sharded_named(name: &str, flags: &str) -> String {
    let flags = format!(
        "{flags} --event-port {{event_port}} --client-port {{client_port}} \
         --metrics-addr 127.0.0.1:{{metrics_port}}"
    );
    format!("{name}={}", efr_stand_in::command(&flags))
}

fn sharded_cmd(cores: u32) -> String {
    sharded_named("sharded", &format!("--cores {cores}"))
}

/// Flags with `--runs 1` unless `extra` sets it.
fn args(out: &Path, extra: &[&str]) -> CompareArgs {
    let mut v = vec![
        "efr-load compare".to_string(),
        "--out".into(),
        out.display().to_string(),
        "--quiet".into(),
        "--efr-load".into(),
        env!("CARGO_BIN_EXE_efr-load").into(),
    ];
    if !extra.contains(&"--runs") {
        v.extend(["--runs".to_string(), "1".to_string()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    CompareArgs::parse_from(v)
}

fn non_empty(path: &Path) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(meta.len() > 0, "{} is empty", path.display());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("efr-compare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn sharded_and_ceiling_pass_and_files_are_written() {
    let out = temp_dir("pass");
    let server = sharded_cmd(1);
    let a = args(
        &out,
        &[
            "--workloads",
            "harness:5000,fanout:30:300,ping:200,harness:3000@30000",
            "--server",
            &server,
        ],
    );
    let started = Instant::now();
    let (summary, dir) = compare(&a, "test").unwrap();
    assert!(started.elapsed() < TEST_BOUND);
    assert_eq!(dir, out);
    assert_eq!(summary.rows.len(), 8);
    assert!(summary.as_designed());
    for r in &summary.rows {
        assert!(
            r.pass,
            "{} on {} failed: {:?}",
            r.server, r.workload, r.errors
        );
        assert!(r.notifications_per_s.unwrap() > 0.0);
        assert!(r.p50_us.is_some() && r.p99_us.is_some() && r.p999_us.is_some());
        assert!(r.ratio_to_ceiling.unwrap() > 0.0);
        for o in &r.run_outcomes {
            non_empty(&out.join(o.json.as_ref().unwrap()));
        }
    }
    let ceilings: Vec<_> = summary
        .rows
        .iter()
        .filter(|r| r.server == CEILING_NAME)
        .collect();
    assert_eq!(ceilings.len(), 4);
    for c in ceilings {
        assert_eq!(c.ratio_to_ceiling, Some(1.0));
        assert!(c.peak_rss_bytes.unwrap() > 0);
        let st = c.ceiling.as_ref().unwrap();
        assert!(st.total_bytes > 0 && st.precomputed_bytes == st.total_bytes);
    }
    let sharded = summary.rows.iter().find(|r| r.server == "sharded").unwrap();
    assert!(sharded.peak_rss_bytes.unwrap() > 0);
    // Both rows of a workload verified the same notifications.
    for w in [
        "harness-5000",
        "fanout-30c-300",
        "ping-200",
        "harness-3000-at-30000",
    ] {
        let counts: Vec<_> = summary
            .rows
            .iter()
            .filter(|r| r.workload == w)
            .map(|r| r.notifications)
            .collect();
        assert_eq!(counts[0], counts[1], "{w}");
    }
    for f in ["summary.json", "summary.md"] {
        non_empty(&out.join(f));
    }
    let ping = summary
        .rows
        .iter()
        .find(|r| r.server == "sharded" && r.workload == "ping-200")
        .unwrap();
    assert_eq!(ping.notifications, Some(200));
    for o in &ping.run_outcomes {
        let report = o.report.as_ref().unwrap();
        assert_eq!(report.pacing, "one event at a time");
        assert!(report.registration.starts_with("efr_clients_registered"));
    }
    assert_eq!(summary.charts.len(), 8);
    for c in &summary.charts {
        let text = std::fs::read_to_string(out.join(c)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("</svg>"), "{c}");
    }
    // Latency in ms, as points with their values, and the pacing in the caption.
    let latency = |w: &str| std::fs::read_to_string(out.join(format!("latency-{w}.svg"))).unwrap();
    let unpaced = latency("harness-5000");
    assert!(unpaced.contains("latency, ms") && unpaced.contains("unpaced"));
    assert!(unpaced.contains("<circle"), "latency is drawn as points");
    assert!(latency("ping-200").contains("round trip"));
    assert!(latency("harness-3000-at-30000").contains("paced at 30000 events/s"));
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| ceiling | PASS 1/1 |") && md.contains("| sharded | PASS 1/1 |"));
    assert!(md.contains("p50 ms") && md.contains("### ping-200 (round trip"));
    // The charts can be redrawn from summary.json alone.
    let chart = out.join("latency-harness-5000.svg");
    std::fs::remove_file(&chart).unwrap();
    let redrawn = efr_load::compare::redraw_charts(&out).unwrap();
    assert_eq!(redrawn, summary.charts);
    assert_eq!(std::fs::read_to_string(&chart).unwrap(), unpaced);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_server_that_exits_or_never_listens_is_a_failure_not_a_hang() {
    let out = temp_dir("fail");
    let a = args(
        &out,
        &[
            "--workloads",
            "harness:1000",
            "--runs",
            "2",
            // Long enough for `sh -c 'exit 7'` to be reaped on a loaded machine.
            "--start-timeout-ms",
            "5000",
            "--server",
            "exits=exit 7",
            "--server",
            "sleeps=sleep 30",
        ],
    );
    let started = Instant::now();
    let (summary, _) = compare(&a, "test").unwrap();
    assert!(started.elapsed() < TEST_BOUND);
    let row = |n: &str| summary.rows.iter().find(|r| r.server == n).unwrap();
    assert!(row(CEILING_NAME).pass, "{:?}", row(CEILING_NAME).errors);
    for name in ["exits", "sleeps"] {
        let r = row(name);
        assert!(!r.pass && r.runs_passed == 0 && r.runs == 2, "{name}");
        assert!(r.notifications_per_s.is_none() && r.ratio_to_ceiling.is_none());
    }
    assert!(
        row("exits").errors[0].contains("exited"),
        "{:?}",
        row("exits").errors
    );
    assert!(
        row("sleeps").errors[0].contains("did not listen"),
        "{:?}",
        row("sleeps").errors
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| exits | FAIL 0/2 passed"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_existing_results_folder_is_refused_unless_forced() {
    let out = temp_dir("exists");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("summary.md"), "earlier results").unwrap();
    let a = args(&out, &["--workloads", "harness:100"]);
    let err = compare(&a, "test").unwrap_err().to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let kept = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert_eq!(kept, "earlier results");
    let a = args(&out, &["--workloads", "harness:100", "--force"]);
    let (summary, _) = compare(&a, "test").unwrap();
    assert!(summary.as_designed());
    let _ = std::fs::remove_dir_all(&out);
}

/// A server wrong by design (the batch resequencer with a buffer far smaller than the
/// harness's disorder) fails its rows as expected: the comparison still behaved as designed.
/// The same server not marked fails the comparison.
#[test]
fn a_row_that_is_wrong_by_design_does_not_fail_the_comparison() {
    let out = temp_dir("expected");
    let wrong = sharded_named(
        "tiny-batch",
        "--cores 1 --resequencer batch --resequencer-capacity 10",
    );
    let run = |extra: &[&str]| {
        let _ = std::fs::remove_dir_all(&out);
        let mut flags = vec!["--workloads", "harness:3000", "--server", &wrong];
        flags.extend_from_slice(extra);
        compare(&args(&out, &flags), "test").unwrap().0
    };
    let marked = run(&["--expect-fail", "tiny-batch"]);
    let row = marked
        .rows
        .iter()
        .find(|r| r.server == "tiny-batch")
        .unwrap();
    assert!(!row.pass, "the verifier must catch the batch resequencer");
    assert_eq!(row.verdict(), efr_load::rows::Verdict::ExpectedFail);
    assert!(marked.as_designed());
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| tiny-batch | expected FAIL"), "{md}");

    let unmarked = run(&[]);
    assert!(!unmarked.as_designed());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn ceiling_serves_several_runs_with_a_small_lookahead() {
    // A lookahead smaller than the output: part of it is generated during the run.
    let w = parse_workload("harness:50000").unwrap();
    let mut model_workload = w.cmd.build(LineEnding::Lf).unwrap();
    let expected: u64 = expected_streams(model_workload.as_mut())
        .unwrap()
        .iter()
        .map(|s| s.len() as u64)
        .sum();
    let null = NullServer::start(
        &w.cmd,
        CeilingSettings {
            lookahead_bytes: 1,
            line_ending: LineEnding::Lf,
        },
    )
    .unwrap();
    for run in 1..=2u64 {
        null.wait_prepared(run, TEST_BOUND).unwrap();
        // The ceiling exposes no metrics: the settle pause is the fallback here.
        let mut cfg = efr_load::LoadConfig::parse_from([
            "efr-load",
            "--progress",
            "off",
            "harness",
            "--total-events",
            "50000",
        ]);
        cfg.event_port = null.event_port();
        cfg.client_port = null.client_port();
        let report = efr_load::run(&cfg).unwrap();
        assert!(report.pass, "{}", report.summary());
        assert_eq!(report.bytes_received, expected);
    }
    null.wait_served(2, TEST_BOUND).unwrap();
    let st = null.stats();
    assert_eq!(st.total_bytes, expected);
    assert!(st.precomputed_bytes < st.total_bytes, "{st:?}");
    assert!(null.error().is_none());
}
