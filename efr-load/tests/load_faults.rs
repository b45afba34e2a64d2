//! efr-load against deliberately wrong servers: it must fail, naming the client and the line.
//! A verifier that cannot fail is worthless.

mod load_support;

use std::process::Command;

use load_support::refserver::{self, Fault};
use load_support::{args, config};

fn run_faulty(fault: Fault, extra: &[&str]) -> (efr_load::Report, refserver::FaultLog) {
    let server = refserver::start(fault);
    let mut a = vec!["--timeout", "600", "--drain-ms", "200"];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["harness", "--total-events", "5000"]);
    let report = efr_load::run(&config(&server, &a)).unwrap();
    let log = server.log.lock().unwrap().clone();
    (report, log)
}

#[test]
fn dropped_notification_fails_naming_client_and_line() {
    let (report, log) = run_faulty(Fault::DropNth(50), &[]);
    assert!(!report.pass);
    let (user, line) = &log.hits[0];
    let want = format!("client {user} expected line {line} but got ");
    assert!(
        report.errors[0].starts_with(&want),
        "{:?} vs {want}",
        report.errors
    );
    assert_eq!(report.error_count, 1, "{:?}", report.errors);
}

#[test]
fn swapped_notifications_fail_naming_client_and_lines() {
    let (report, log) = run_faulty(Fault::SwapNth(70), &["--line-ending", "crlf"]);
    assert!(!report.pass);
    let (user, held) = &log.hits[0];
    let got = log.swapped_in.clone().unwrap();
    let want = format!("client {user} expected line {held} but got {got}");
    assert_eq!(report.errors, vec![want]);
}

#[test]
fn extra_line_fails_naming_client_and_line() {
    let (report, log) = run_faulty(Fault::ExtraAtEnd, &[]);
    assert!(!report.pass);
    let (user, line) = &log.hits[0];
    assert_eq!(
        report.errors,
        vec![format!(
            "client {user} extra line after the last expected: {line}"
        )]
    );
}

#[test]
fn server_that_stops_sending_fails_with_silence() {
    let (report, log) = run_faulty(Fault::StopAfter(100), &["--max-errors-shown", "1000"]);
    assert!(!report.pass);
    let (user, line) = &log.hits[0];
    let want = format!("client {user} silent for 600 ms while expecting {line}");
    assert!(
        report.errors.contains(&want),
        "{:?} should contain {want}",
        report.errors
    );
    assert!(report
        .errors
        .iter()
        .all(|e| e.contains("silent for 600 ms while expecting")));
}

#[test]
fn binary_exits_1_and_prints_the_mismatch() {
    let server = refserver::start(Fault::DropNth(10));
    let a = args(
        &server,
        &["--timeout", "600", "harness", "--total-events", "2000"],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(&a[1..])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (user, line) = server.log.lock().unwrap().hits[0].clone();
    assert!(
        stdout.contains(&format!("client {user} expected line {line} but got")),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn binary_exits_0_on_a_correct_server_and_2_when_nothing_listens() {
    let server = refserver::start(Fault::None);
    let a = args(&server, &["harness", "--total-events", "2000"]);
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(&a[1..])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PASS"));

    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args([
            "--client-port",
            &port,
            "--event-port",
            &port,
            "harness",
            "--total-events",
            "10",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting"));
}

#[test]
fn help_documents_every_workload_and_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for w in [
        "harness",
        "fanout",
        "replay",
        "--rate",
        "--timeout",
        "--json",
        "--line-ending",
        "--settle-ms",
    ] {
        assert!(help.contains(w), "{w} missing from\n{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(["harness", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for w in [
        "totalEvents",
        "concurrencyLevel",
        "numberOfUsers",
        "randomSeed",
        "maxEventSourceBatchSize",
    ] {
        assert!(help.contains(w), "{w} missing from\n{help}");
    }
}
