//! An idle server costs nothing: the real binary at `--cores 8`, 100 identified clients and an
//! event source connected and silent, measured from outside through `/proc/<pid>`.
//!
//! Criteria: under 0.2% of one core (CPU time of every thread, from `/proc/<pid>/stat`'s
//! utime+stime and, at nanosecond resolution, the threads' `schedstat`) and under 10 context
//! switches per second per executor thread (`voluntary_ctxt_switches` plus
//! `nonvoluntary_ctxt_switches` in `/proc/<pid>/task/*/status`). A server that polls fails at
//! once: one timer per executor every millisecond is about a thousand switches per second.
//!
//! The window is 5 s by default, 10 s with `EFR_IDLE_WINDOW_SECS=10` (the figure the README
//! quotes). `stat` counts in clock ticks (10 ms), so over 5 s a single tick is already 0.2%:
//! the CPU criterion is judged on `schedstat`, and `stat` must stay within one tick of it.
//! `EFR_IDLE_BINARY=<path>` runs the same measurement on another build of the server. The
//! stall guard's nudges (`src/nudge.rs`) must not run while idle: its round counter must not
//! move in the window.
//!
//! The cluster roles are measured the same way (needs nats-server): the NATS threads of an
//! idle ingest and an idle edge, each under 10 context switches per second.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CLIENTS: u64 = 100;
const CORES: usize = 8;
const MAX_CPU_PERCENT: f64 = 0.2;
const MAX_SWITCHES_PER_SECOND: f64 = 10.0;
const DEADLINE: Duration = Duration::from_secs(30);

fn window() -> Duration {
    let seconds = std::env::var("EFR_IDLE_WINDOW_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(seconds)
}

/// The server process; killed if the test fails.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The addresses in the server's start-up log lines.
struct Addresses {
    events: SocketAddr,
    clients: SocketAddr,
    metrics: SocketAddr,
}

fn parse_addresses(lines: &mpsc::Receiver<String>) -> Addresses {
    let deadline = Instant::now() + DEADLINE;
    let (mut listening, mut metrics) = (None, None);
    while listening.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the server logs its addresses");
        if let Some(rest) = line.split("events on ").nth(1) {
            let events = rest.split(',').next().unwrap().trim().parse().unwrap();
            let clients = rest
                .split("clients on ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            listening = Some((events, clients));
        }
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            metrics = Some(rest.split('/').next().unwrap().parse().unwrap());
        }
    }
    let (events, clients) = listening.unwrap();
    Addresses {
        events,
        clients,
        metrics: metrics.unwrap(),
    }
}

fn scrape(addr: SocketAddr) -> HashMap<String, u64> {
    let mut stream = TcpStream::connect(addr).expect("metrics connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: efr\r\n\r\n")
        .unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The stall guard's nudge rounds so far (0 for a build without one).
fn nudge_rounds_of(metrics: SocketAddr) -> u64 {
    scrape(metrics)
        .get("efr_stall_nudge_rounds")
        .copied()
        .unwrap_or(0)
}

/// Per thread: (name, CPU ns from schedstat, context switches).
fn threads(pid: u32) -> HashMap<String, (String, u64, u64)> {
    let mut out = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let path = task.path();
        let (Ok(status), Ok(schedstat)) = (
            std::fs::read_to_string(path.join("status")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let field = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0)
        };
        let name = status
            .lines()
            .find_map(|line| line.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let cpu_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let switches = field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:");
        out.insert(
            task.file_name().to_string_lossy().into_owned(),
            (name, cpu_ns, switches),
        );
    }
    out
}

/// utime + stime of the whole process, in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // After the state (field 3), utime and stime are fields 14 and 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_server_with_clients_and_a_source_uses_no_cpu_and_does_not_wake() {
    // `EFR_IDLE_BINARY` measures another build (e.g. an older one) by hand.
    let binary = std::env::var("EFR_IDLE_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_efr-sharded").to_string());
    let mut child = Command::new(binary)
        .args(["--cores", &CORES.to_string()])
        .args(["--event-port", "0", "--client-port", "0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server binary starts");
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let pid = server.0.id();
    let (line_sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line_sender.send(line).is_err() {
                break;
            }
        }
    });
    let addresses = parse_addresses(&lines);

    let mut connections = Vec::new();
    for user in 1..=CLIENTS {
        let mut client = TcpStream::connect(addresses.clients).expect("client connects");
        client.write_all(format!("{user}\n").as_bytes()).unwrap();
        connections.push(client);
    }
    connections.push(TcpStream::connect(addresses.events).expect("source connects"));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counters = scrape(addresses.metrics);
        if counters.get("efr_clients_registered") == Some(&CLIENTS)
            && counters.get("efr_sessions") == Some(&1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "clients and source not taken in: {counters:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Taking the clients in made the server busy for a moment: wait until its stall guard
    // stopped nudging (`--stall-nudge-ms`), then let the last scrape's connection close and
    // everything settle.
    let mut nudge_rounds = nudge_rounds_of(addresses.metrics);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = nudge_rounds_of(addresses.metrics);
        if now == nudge_rounds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stall guard went on nudging: {now} rounds"
        );
        nudge_rounds = now;
    }
    std::thread::sleep(Duration::from_millis(500));

    let window = window();
    let (threads_before, ticks_before, started) =
        (threads(pid), process_ticks(pid), Instant::now());
    std::thread::sleep(window);
    let (threads_after, ticks_after, elapsed) =
        (threads(pid), process_ticks(pid), started.elapsed());
    let seconds = elapsed.as_secs_f64();

    let cpu_ns: u64 = threads_after
        .iter()
        .map(|(tid, (_, ns, _))| ns - threads_before.get(tid).map_or(0, |before| before.1))
        .sum();
    let cpu_percent = cpu_ns as f64 / 1e9 / seconds * 100.0;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let tick_percent = (ticks_after - ticks_before) as f64 / ticks_per_second / seconds * 100.0;
    let one_tick_percent = 100.0 / ticks_per_second / seconds;
    let mut executors = Vec::new();
    for (tid, (name, _, switches)) in &threads_after {
        if !name.starts_with("efr-shard-") {
            continue;
        }
        let before = threads_before.get(tid).map_or(0, |b| b.2);
        executors.push((name.clone(), (switches - before) as f64 / seconds));
    }
    executors.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!(
        "idle --cores {CORES}, {CLIENTS} clients and a source, {seconds:.1} s: CPU {cpu_percent:.4}% \
         of one core (schedstat), {tick_percent:.2}% (stat ticks); switches/s per executor \
         thread: {executors:?}"
    );
    assert!(
        executors.len() >= CORES,
        "every executor thread is seen: {executors:?}"
    );
    assert!(
        cpu_percent < MAX_CPU_PERCENT,
        "idle CPU {cpu_percent:.3}% of one core (limit {MAX_CPU_PERCENT}%)"
    );
    assert!(
        tick_percent <= MAX_CPU_PERCENT + one_tick_percent,
        "idle CPU by /proc/<pid>/stat {tick_percent:.3}% of one core (limit {MAX_CPU_PERCENT}% \
         plus one tick)"
    );
    for (name, rate) in &executors {
        assert!(
            *rate < MAX_SWITCHES_PER_SECOND,
            "executor thread {name} woke {rate:.1} times a second while idle (limit \
             {MAX_SWITCHES_PER_SECOND})"
        );
    }
    assert_eq!(
        nudge_rounds_of(addresses.metrics),
        nudge_rounds,
        "the stall guard nudged the executors of an idle server"
    );
    drop(connections);
}

/// A cluster node as the real binary, its stderr lines on a channel.
fn spawn_node(args: &[&str]) -> (Server, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server binary starts");
    let stderr = child.stderr.take().unwrap();
    let (line_sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line_sender.send(line).is_err() {
                break;
            }
        }
    });
    (Server(child), lines)
}

/// Waits for a line containing each of `needles` (in any order) and returns them, in the
/// order of `needles`.
fn wait_for_lines(lines: &mpsc::Receiver<String>, needles: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut found: Vec<Option<String>> = vec![None; needles.len()];
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log lines with each of {needles:?}: {found:?}"));
        for (needle, slot) in needles.iter().zip(found.iter_mut()) {
            if slot.is_none() && line.contains(needle) {
                *slot = Some(line.clone());
            }
        }
    }
    found.into_iter().flatten().collect()
}

fn address_after(line: &str, marker: &str) -> SocketAddr {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split([',', '/']).next())
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
        .trim()
        .parse()
        .unwrap()
}

fn wait_for_counter(metrics: SocketAddr, name: &str, value: u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counters = scrape(metrics);
        if counters.get(name) == Some(&value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never {value}: {counters:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The NATS threads of an idle ingest and an idle edge (after some traffic) sleep until a
/// message, a consumer heartbeat or the stop: they do not look at the stop flag on a timer.
#[test]
fn the_nats_threads_of_an_idle_ingest_and_edge_do_not_poll() {
    if !common::nats::nats_available() {
        return;
    }
    let nats = common::nats::NatsServer::start();
    let url = nats.url();
    let (edge, edge_lines) = spawn_node(&[
        "--role",
        "edge",
        "--nats",
        &url,
        "--cores",
        "1",
        "--client-port",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let edge_started = wait_for_lines(&edge_lines, &["metrics on http://", "listening"]);
    let edge_metrics = address_after(&edge_started[0], "http://");
    let (ingest, ingest_lines) = spawn_node(&[
        "--role",
        "ingest",
        "--nats",
        &url,
        "--resume",
        "--cores",
        "1",
        "--event-port",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let ingest_started = wait_for_lines(&ingest_lines, &["metrics on http://", "listening"]);
    let ingest_metrics = address_after(&ingest_started[0], "http://");
    let events = address_after(&ingest_started[1], "events on ");
    // Some traffic first, so that the publisher has acknowledgements and a chain end to save.
    let mut source = TcpStream::connect(events).expect("source connects");
    let lines: String = (1..=1_000).map(|seq| format!("{seq}|B\n")).collect();
    source.write_all(lines.as_bytes()).unwrap();
    wait_for_counter(edge_metrics, "efr_events_delivered", 1_000);
    wait_for_counter(ingest_metrics, "efr_nats_chain_end_saves", 1);
    // Let the last scrape's connection close and everything settle.
    std::thread::sleep(Duration::from_millis(500));

    let window = window();
    let pids = [ingest.0.id(), edge.0.id()];
    let before: Vec<_> = pids.iter().map(|&pid| threads(pid)).collect();
    let started = Instant::now();
    std::thread::sleep(window);
    let after: Vec<_> = pids.iter().map(|&pid| threads(pid)).collect();
    let seconds = started.elapsed().as_secs_f64();
    let mut nats_threads = Vec::new();
    for (before, after) in before.iter().zip(&after) {
        for (tid, (name, _, switches)) in after {
            if name.starts_with("efr-nats-") {
                let earlier = before.get(tid).map_or(0, |b| b.2);
                nats_threads.push((name.clone(), (switches - earlier) as f64 / seconds));
            }
        }
    }
    nats_threads.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("idle cluster, {seconds:.1} s: switches/s per NATS thread: {nats_threads:?}");
    assert_eq!(
        nats_threads.len(),
        2,
        "the ingest's and the edge's: {nats_threads:?}"
    );
    for (name, rate) in &nats_threads {
        assert!(
            *rate < MAX_SWITCHES_PER_SECOND,
            "NATS thread {name} woke {rate:.1} times a second while idle (limit \
             {MAX_SWITCHES_PER_SECOND})"
        );
    }
    drop(source);
}
