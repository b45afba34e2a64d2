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

/// Runs the efr-load binary with `args`; returns (exit status, stdout, stderr).
fn efr_load(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_efr-load"))
        .args(args)
        .env_remove("timeout")
        .env_remove("concurrencyLevel")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_every_workload_and_flag() {
    let (code, help, _) = efr_load(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        help.starts_with("Load generator and verifier for Follower Maze servers"),
        "{help}"
    );
    // Options every workload shares are apart from the commands and their own flags.
    assert!(help.contains("Run options (every workload):"), "{help}");
    for w in [
        "harness",
        "fanout",
        "replay",
        "ping",
        "compare",
        "null-server",
        "--metrics-url",
        "--client-ports",
        "EFR_LOAD_METRICS_URL",
        "--rate",
        "--timeout",
        "--json",
        "--line-ending",
        "--settle-ms",
    ] {
        assert!(help.contains(w), "{w} missing from\n{help}");
    }
    let (_, help, _) = efr_load(&["harness", "--help"]);
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

#[test]
fn compare_and_null_server_are_subcommands_with_their_own_help() {
    for args in [&["help", "compare"][..], &["compare", "--help"]] {
        let (code, help, stderr) = efr_load(args);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(help.contains("Usage: efr-load compare"), "{help}");
        for flag in [
            "--default",
            "--force",
            "--expect-fail",
            "--peers-dir",
            "--workloads",
        ] {
            assert!(help.contains(flag), "{flag} missing from\n{help}");
        }
    }
    let (code, help, _) = efr_load(&["help", "null-server"]);
    assert_eq!(code, Some(0));
    assert!(help.contains("--listen-event-port"), "{help}");
    // A run option means nothing to compare: refused, not ignored.
    let (code, _, stderr) = efr_load(&["compare", "--event-port", "1", "--workloads", "ping:1"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--event-port") && stderr.contains("compare"),
        "{stderr}"
    );
}

#[test]
fn zero_concurrency_is_explained() {
    let (code, _, stderr) = efr_load(&["harness", "--concurrency", "0"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--concurrency is 0") && stderr.contains("at least 1 client connection"),
        "{stderr}"
    );
}

/// A progress bar cannot be drawn into a pipe or a file: progress comes as plain lines.
#[test]
fn progress_bar_into_a_pipe_prints_plain_lines() {
    let server = refserver::start(Fault::None);
    let (event, client) = (
        server.event_port.to_string(),
        server.client_port.to_string(),
    );
    let (code, stdout, stderr) = efr_load(&[
        "--event-port",
        &event,
        "--client-port",
        &client,
        "--progress",
        "bar",
        "harness",
        "--total-events",
        "2000",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("not a terminal"), "{stderr}");
    assert!(stderr.contains("events 2000/2000"), "{stderr}");
}

/// `--client-ports`: client i connects to the (i mod n)-th port.
#[test]
fn client_ports_deal_the_clients_round_robin() {
    let server = refserver::start(Fault::None);
    let (second, second_accepted) = server.add_client_port();
    let ports = format!("{},{second}", server.client_port);
    let a = args(&server, &[]);
    // Drop `--client-port P` from the common flags: --client-ports replaces it.
    let at = a.iter().position(|s| s == "--client-port").unwrap();
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    a.drain(at..at + 2);
    a.extend([
        "--client-ports",
        &ports,
        "harness",
        "--total-events",
        "3000",
    ]);
    a.extend(["--concurrency", "7"]);
    let cfg = <efr_load::LoadConfig as clap::Parser>::try_parse_from(&a).unwrap();
    let report = efr_load::run(&cfg).unwrap();
    assert!(report.pass, "{}", report.summary());
    let first = server.accepted.load(std::sync::atomic::Ordering::Relaxed);
    let second = second_accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((first, second), (4, 3));
    assert!(report.server.ends_with(&ports), "{}", report.server);
}

/// A metrics endpoint whose registration counter never moves: the run is refused after
/// `--register-timeout-ms`, naming how many clients were registered, instead of streaming
/// events to clients the server may not know.
#[test]
fn a_server_that_never_registers_the_clients_is_reported() {
    let server = refserver::start(Fault::None);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in metrics.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            let body = "# TYPE efr_clients_registered counter\nefr_clients_registered 5\n";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let a = args(
        &server,
        &[
            "--metrics-url",
            &metrics_addr,
            "--register-timeout-ms",
            "300",
            "harness",
            "--total-events",
            "100",
            "--concurrency",
            "4",
        ],
    );
    let cfg = <efr_load::LoadConfig as clap::Parser>::try_parse_from(&a).unwrap();
    let err = format!("{:#}", efr_load::run(&cfg).unwrap_err());
    assert!(
        err.contains("registered 0 of the 4 clients") && err.contains("efr_clients_registered"),
        "{err}"
    );
}
