//! `efr-load compare`: runs the same verified workload against several servers and the
//! built-in ceiling, and writes the medians, the raw reports, SVG charts and a markdown table.
//!
//! For each workload and each server: pick free ports (bind port 0, then release them),
//! start `sh -c CMD` with `{event_port}`, `{client_port}` and `{metrics_port}` substituted, in
//! its own process group, wait until the ports listen (read from /proc/net/tcp, so no probe
//! connection is mistaken for an event source), run the workload `--runs` times with
//! [`crate::run`] (waiting for the server's registration counter when it has a metrics port),
//! then stop the group (SIGTERM, SIGKILL after `--stop-timeout-ms`). A sampler thread polls
//! the group's processes for their peak RSS (VmHWM). The ceiling ([`super::ceiling`]) runs
//! in-process, first for every workload, and every row is shown as a ratio to it.

use std::fmt::Write as _;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

use super::config::{LoadConfig, COMPARE_OUT_ROOT, DEFAULT_SETTLE_MS};
use super::report::{self, Machine, Report};
use super::rows::Verdict;

pub use super::config::CompareArgs;
pub use super::rows::{Row, RunOutcome, CEILING_NAME};
pub use super::workload_spec::{parse_workload, WorkloadSpec};

/// How often the server's ports are checked while it starts.
pub const PORT_POLL: Duration = Duration::from_millis(20);
/// How often the server's process group is sampled for its RSS.
pub const RSS_POLL: Duration = Duration::from_millis(100);
/// How often the stopping server is checked for its exit.
pub const EXIT_POLL: Duration = Duration::from_millis(10);
/// Timeout of the ceiling's preparation of one run (precomputing the lookahead).
pub const CEILING_PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Core counts of the default comparison (heap resequencer).
pub const DEFAULT_CORES: [u32; 4] = [1, 2, 4, 8];
/// Resequencers of the default comparison, and the cores they run on.
pub const DEFAULT_RESEQUENCERS: [&str; 3] = ["heap", "stream", "batch"];
/// Cores of the resequencer rows of the default comparison.
pub const DEFAULT_RESEQUENCER_CORES: u32 = 2;
/// Workloads of the default comparison: throughput (harness 1M and 10M, fanout to 10,000
/// clients), latency without queueing (ping) and latency at a set pace (harness at 20,000
/// events/s).
pub const DEFAULT_WORKLOADS: &str =
    "harness:1000000,harness:10000000,fanout:10000:20000,ping:3000,harness:200000@20000";
/// Error messages kept per row.
pub const MAX_ROW_ERRORS: usize = 3;
/// Server log lines matched for the server's own order-violation counter (efr-sharded logs
/// its counters at each session end).
pub const ORDER_VIOLATIONS_KEY: &str = "order_violations=";

/// Placeholder of a server command for its metrics port.
pub const METRICS_PORT_PLACEHOLDER: &str = "{metrics_port}";
/// Why the `batch` resequencer is wrong by design.
pub const BATCH_IS_WRONG: &str = "the batch resequencer sorts fixed buffers: wrong when disorder \
crosses a buffer boundary (the original efr's, kept to show it)";
/// Settle per client for the peers, which expose no registration count, microseconds: the
/// default 50 us was measured too short for fmaze taking 10,000 ids in on this loaded 2-core
/// machine (clients registered after the first 2,000 events and missed them).
pub const PEER_SETTLE_PER_CLIENT_US: u64 = 500;
/// Why efr-go cannot run `fanout` in compare (measured on this 2-core machine).
pub const EFR_GO_CANNOT_FANOUT: &str = "efr-go writes one notification per write from one \
dispatcher: fanout to 10,000 clients (26 M notifications) took 510 s here and left clients \
silent for more than the 20 s client timeout";
/// Why fmaze fails some workloads (both measured on this 2-core machine).
pub const FMAZE_DROPS_AT_SOURCE_CLOSE: &str = "fmaze loses notifications: it resets at source \
close, closing its clients without writing what is still queued for them (PROTOCOL.md \
section 4 asks for it; unpaced harness 20,000 lost its tail), and on fanout to 10,000 clients \
clients miss notifications mid-stream even after a 5 s registration pause (cause not \
investigated)";
/// Why fmaze write-through cannot run `fanout` in compare (measured on this 2-core machine).
pub const FMAZE_WT_CANNOT_FANOUT: &str = "fmaze write-through makes one write per \
notification: fanout to 10,000 clients (26 M notifications) took 490 s here and left clients \
silent for more than the 20 s client timeout";
/// Why the `batch` resequencer cannot run `ping`.
pub const BATCH_CANNOT_PING: &str = "the batch resequencer holds every event until its \
65,536-event buffer fills: one event at a time never arrives";
/// The original efr's binary in `--peers-dir`.
pub const EFR_GO: &str = "efr-go";
/// fmaze's binary in `--peers-dir`.
pub const FMAZE_GO: &str = "fmaze-go";
/// The row of fmaze with write-through output (`-write-buffer 0`).
pub const FMAZE_GO_WRITE_THROUGH: &str = "fmaze-go-wt";

/// A server to compare.
#[derive(Clone, Debug, Serialize)]
pub struct ServerSpec {
    /// Row name.
    pub name: String,
    /// Shell command with `{event_port}`, `{client_port}` and optionally `{metrics_port}`.
    pub command: String,
    /// Why the server is wrong by design, when it is.
    pub expect_fail: Option<String>,
    /// Workloads (by name: `harness`, `fanout`, `ping`, ...) the server cannot run, and why.
    pub cannot_run: Vec<(String, String)>,
    /// For a server without metrics: the settle pause per connected client, microseconds
    /// (efr-load's default when `None`).
    pub settle_per_client_us: Option<u64>,
}

impl ServerSpec {
    /// A server expected to pass everything.
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> ServerSpec {
        ServerSpec {
            name: name.into(),
            command: command.into(),
            expect_fail: None,
            cannot_run: Vec::new(),
            settle_per_client_us: None,
        }
    }

    /// True when the command exposes metrics at `{metrics_port}`.
    pub fn has_metrics(&self) -> bool {
        self.command.contains(METRICS_PORT_PLACEHOLDER)
    }

    /// Why the server cannot run `w`, if it cannot.
    pub fn cannot_run(&self, w: &WorkloadSpec) -> Option<&str> {
        self.cannot_run
            .iter()
            .find(|(name, _)| name == w.cmd.name())
            .map(|(_, why)| why.as_str())
    }
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The command line.
    pub command: String,
    /// UTC start, RFC 3339.
    pub started_utc: String,
    /// Seconds the comparison took.
    pub elapsed_s: f64,
    /// /proc/loadavg before.
    pub loadavg_before: Option<String>,
    /// /proc/loadavg after.
    pub loadavg_after: Option<String>,
    /// Runs per row.
    pub runs: usize,
    /// The servers.
    pub servers: Vec<ServerSpec>,
    /// The workloads.
    pub workloads: Vec<WorkloadSpec>,
    /// The rows, workload by workload, ceiling first.
    pub rows: Vec<Row>,
    /// The machine.
    pub machine: Machine,
    /// efr-load's build profile.
    pub profile: &'static str,
    /// The charts, relative to the output directory.
    pub charts: Vec<String>,
    /// Notes on the comparison (peers not found, ...).
    pub notes: Vec<String>,
}

impl Summary {
    /// True when every row behaved as designed (rows wrong by design may fail).
    pub fn as_designed(&self) -> bool {
        self.rows.iter().all(Row::as_designed)
    }
}

/// `efr-load compare`: runs, prints the table, returns the exit status (0 when every row
/// behaved as designed, 1 otherwise, 2 when the comparison could not be made).
pub fn main(args: &CompareArgs, command_line: &str) -> i32 {
    if let Some(dir) = &args.redraw_charts {
        return match redraw_charts(dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", dir.join(f).display());
                }
                0
            }
            Err(e) => {
                eprintln!("efr-load compare: {e:#}");
                super::EXIT_USAGE
            }
        };
    }
    match compare(args, command_line) {
        Ok((summary, dir)) => {
            print!("{}", markdown(&summary));
            println!("\nWritten to {}", dir.display());
            if summary.as_designed() {
                0
            } else {
                super::EXIT_FAIL
            }
        }
        Err(e) => {
            eprintln!("efr-load compare: {e:#}");
            super::EXIT_USAGE
        }
    }
}

/// Redraws the charts of the comparison in `dir` from its `summary.json`; returns their
/// file names.
pub fn redraw_charts(dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = dir.join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let rows: Vec<Row> = serde_json::from_value(doc["rows"].clone())
        .with_context(|| format!("the rows of {}", path.display()))?;
    let workloads = doc["workloads"]
        .as_array()
        .with_context(|| format!("no workloads in {}", path.display()))?
        .iter()
        .map(|w| {
            let spec = w["spec"].as_str().context("a workload without its spec")?;
            let mut parsed = parse_workload(spec)?;
            // Keep the label the rows were made with.
            if let Some(label) = w["label"].as_str() {
                parsed.label = label.to_string();
            }
            Ok(parsed)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    super::chart::write_charts(dir, &workloads, &rows)
}

/// Parses `NAME=CMD`.
pub fn parse_server(spec: &str) -> anyhow::Result<ServerSpec> {
    let (name, command) = spec
        .split_once('=')
        .with_context(|| format!("--server {spec:?}: expected NAME=CMD"))?;
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty() && name != CEILING_NAME,
        "--server {spec:?}: the name must be non-empty and not {CEILING_NAME:?}"
    );
    anyhow::ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "--server {spec:?}: the name may hold letters, digits, '-', '_' and '.'"
    );
    Ok(ServerSpec::new(name, command))
}

/// The servers of the default comparison, for the efr-sharded binary `bin`. Each exposes its
/// metrics, so every run waits for the server to register its clients.
pub fn default_servers(bin: &Path) -> Vec<ServerSpec> {
    let base = format!(
        "exec {} --event-port {{event_port}} --client-port {{client_port}} \
         --metrics-addr 127.0.0.1:{METRICS_PORT_PLACEHOLDER}",
        shell_quote(&bin.display().to_string())
    );
    let mut out = Vec::new();
    for cores in DEFAULT_CORES {
        out.push(ServerSpec::new(
            format!("sharded-c{cores}-heap"),
            format!("{base} --cores {cores} --resequencer heap"),
        ));
    }
    for r in DEFAULT_RESEQUENCERS {
        let name = format!("sharded-c{DEFAULT_RESEQUENCER_CORES}-{r}");
        if out.iter().any(|s| s.name == name) {
            continue;
        }
        let mut spec = ServerSpec::new(
            name,
            format!("{base} --cores {DEFAULT_RESEQUENCER_CORES} --resequencer {r}"),
        );
        if r == "batch" {
            spec.expect_fail = Some(BATCH_IS_WRONG.into());
            spec.cannot_run = vec![("ping".into(), BATCH_CANNOT_PING.into())];
        }
        out.push(spec);
    }
    out
}

/// The peers of the default comparison found in `dir` (the original efr and fmaze, see
/// `peers/README.md`), and a note for each one missing. Neither exposes metrics: their runs
/// wait `--settle-ms` before the source connects.
pub fn peer_servers(dir: &Path) -> (Vec<ServerSpec>, Vec<String>) {
    let mut servers = Vec::new();
    let mut notes = Vec::new();
    let found = |name: &str| {
        let p = dir.join(name);
        p.is_file().then(|| shell_quote(&p.display().to_string()))
    };
    match found(EFR_GO) {
        Some(bin) => {
            let mut spec = ServerSpec::new(
                EFR_GO,
                format!(
                    "exec {bin} -eventSourcePort {{event_port}} -clientPort {{client_port}} \
                     -maxProcs 2"
                ),
            );
            spec.cannot_run = vec![("fanout".into(), EFR_GO_CANNOT_FANOUT.into())];
            spec.settle_per_client_us = Some(PEER_SETTLE_PER_CLIENT_US);
            servers.push(spec);
        }
        None => notes.push(format!(
            "{EFR_GO} (the original efr) not found in {}: build the peers with \
             `peers/build.sh DIR` and pass --peers-dir DIR",
            dir.display()
        )),
    }
    match found(FMAZE_GO) {
        Some(bin) => {
            let base = format!(
                "exec {bin} -event-source-listen 127.0.0.1:{{event_port}} \
                 -clients-listen 127.0.0.1:{{client_port}}"
            );
            // Buffered with a 1 ms flush (its default, 10 s, holds output that long), and
            // write-through (each notification written at once: its best latency).
            for (name, flags) in [
                (FMAZE_GO, "-flush-interval 1ms"),
                (FMAZE_GO_WRITE_THROUGH, "-write-buffer 0"),
            ] {
                let mut spec = ServerSpec::new(name, format!("{base} {flags}"));
                spec.expect_fail = Some(FMAZE_DROPS_AT_SOURCE_CLOSE.into());
                spec.settle_per_client_us = Some(PEER_SETTLE_PER_CLIENT_US);
                if name == FMAZE_GO_WRITE_THROUGH {
                    spec.cannot_run = vec![("fanout".into(), FMAZE_WT_CANNOT_FANOUT.into())];
                }
                servers.push(spec);
            }
        }
        None => notes.push(format!(
            "{FMAZE_GO} (fmaze) not found in {}: build the peers with `peers/build.sh DIR` \
             and pass --peers-dir DIR",
            dir.display()
        )),
    }
    if !servers.is_empty() {
        notes.push(
            "Peers: efr-go runs with -maxProcs 2 and its defaults (stream resequencer, \
             capacity 100); fmaze-go with -flush-interval 1ms (its default, 10 s, holds \
             buffered output that long), fmaze-go-wt with -write-buffer 0 (write-through). \
             Neither exposes metrics, so their runs wait a fixed pause for the clients to \
             register (100 ms + 500 us per client). Neither could run a --chaos workload: fmaze closes the event source on \
             any malformed, duplicate or out-of-window line, and efr-go keeps only the last \
             connection of a user id."
                .into(),
        );
    }
    (servers, notes)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs the comparison and writes its files. Returns the summary and the output directory.
pub fn compare(args: &CompareArgs, command: &str) -> anyhow::Result<(Summary, PathBuf)> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let mut servers: Vec<ServerSpec> = Vec::new();
    let mut notes = Vec::new();
    if args.default {
        let bin = match &args.efr_sharded {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("locating efr-load")?
                .with_file_name("efr-sharded"),
        };
        anyhow::ensure!(
            bin.exists(),
            "efr-sharded not found at {} (build it, or pass --efr-sharded)",
            bin.display()
        );
        servers.extend(default_servers(&bin));
        let (peers, peer_notes) = peer_servers(&args.peers_dir);
        servers.extend(peers);
        notes.extend(peer_notes);
    }
    for s in &args.servers {
        servers.push(parse_server(s)?);
    }
    let mut names = std::collections::HashSet::new();
    for s in &servers {
        anyhow::ensure!(names.insert(s.name.clone()), "two servers named {}", s.name);
    }
    for name in &args.expect_fail {
        let s = servers
            .iter_mut()
            .find(|s| &s.name == name)
            .with_context(|| format!("--expect-fail {name}: no server of that name"))?;
        s.expect_fail
            .get_or_insert_with(|| "marked with --expect-fail".into());
    }
    let specs: Vec<String> = if args.workloads.is_empty() {
        anyhow::ensure!(
            args.default,
            "give --workloads (e.g. harness:1000000) or --default"
        );
        DEFAULT_WORKLOADS.split(',').map(String::from).collect()
    } else {
        args.workloads.clone()
    };
    let workloads = specs
        .iter()
        .map(|s| parse_workload(s))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(COMPARE_OUT_ROOT).join(utc_date()));
    anyhow::ensure!(
        args.force || !dir.exists(),
        "{} already exists: pass --force to write into it, or --out for another folder",
        dir.display()
    );
    std::fs::create_dir_all(dir.join("raw"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::create_dir_all(dir.join("logs"))?;

    // Servers inherit it: 10,000 clients need more descriptors than many defaults.
    super::raise_nofile(u64::MAX);
    let started = Instant::now();
    let started_utc = utc_timestamp();
    let loadavg_before = loadavg();
    let mut rows = Vec::new();
    for w in &workloads {
        let row = run_ceiling(args, w, &dir)?;
        let ceiling_rate = row.notifications_per_s.filter(|_| row.pass);
        rows.push(row);
        for s in &servers {
            if let Some(why) = s.cannot_run(w) {
                note(args, &format!("{} {}: skipped: {why}", w.label, s.name));
                rows.push(skipped_row(w, s, why));
                continue;
            }
            let mut row = run_server(args, w, s, &dir)?;
            row.expect_fail = s.expect_fail.clone();
            row.ratio_to_ceiling = match (row.notifications_per_s, ceiling_rate) {
                (Some(a), Some(c)) if c > 0.0 => Some(a / c),
                _ => None,
            };
            rows.push(row);
        }
    }
    let charts = super::chart::write_charts(&dir, &workloads, &rows)?;
    let summary = Summary {
        command: command.to_string(),
        started_utc,
        elapsed_s: started.elapsed().as_secs_f64(),
        loadavg_before,
        loadavg_after: loadavg(),
        runs: args.runs,
        servers,
        workloads,
        rows,
        machine: report::machine(),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        charts,
        notes,
    };
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(dir.join("summary.json"), text + "\n")?;
    std::fs::write(dir.join("summary.md"), markdown(&summary))?;
    Ok((summary, dir))
}

/// The load settings of one run against `event_port`/`client_port`.
fn load_config(
    args: &CompareArgs,
    w: &WorkloadSpec,
    spec: &ServerSpec,
    ports: Ports,
    json: PathBuf,
) -> LoadConfig {
    let mut c = LoadConfig::parse_from(["efr-load"]);
    c.settle_ms = spec
        .settle_per_client_us
        .map(|us| DEFAULT_SETTLE_MS + w.clients() * us / 1000);
    c.host = "127.0.0.1".into();
    c.event_port = ports.event;
    c.client_port = ports.client;
    c.metrics_url = ports.metrics.map(|p| format!("127.0.0.1:{p}"));
    c.json = Some(json);
    c.timeout = args.timeout;
    c.rate = w.rate;
    c.readers = args.readers;
    c.max_inflight_batches = args.max_inflight_batches;
    c.progress = args.progress;
    c.set_workload(w.cmd.clone());
    c
}

/// A row for a server that cannot run a workload.
fn skipped_row(w: &WorkloadSpec, s: &ServerSpec, why: &str) -> Row {
    let mut row = make_row(w, &s.name, &s.command, Vec::new());
    row.pass = false;
    row.expect_fail = s.expect_fail.clone();
    row.skipped = Some(why.to_string());
    row
}

fn file_stem(workload: &str, server: &str) -> String {
    format!("{workload}--{server}")
}

fn note(args: &CompareArgs, msg: &str) {
    if !args.quiet {
        eprintln!("efr-load compare: {msg}");
    }
}

/// One run, its JSON under `raw/`.
fn one_run(
    args: &CompareArgs,
    w: &WorkloadSpec,
    spec: &ServerSpec,
    run: usize,
    ports: Ports,
    dir: &Path,
) -> RunOutcome {
    let server = spec.name.as_str();
    let rel = format!("raw/{}--run{run}.json", file_stem(&w.label, server));
    let config = load_config(args, w, spec, ports, dir.join(&rel));
    let out = match super::run(&config) {
        Ok(report) => RunOutcome {
            run,
            report: Some(report),
            error: None,
            json: Some(rel),
        },
        Err(e) => RunOutcome {
            run,
            report: None,
            error: Some(format!("{e:#}")),
            json: None,
        },
    };
    match (&out.report, &out.error) {
        (Some(r), _) => note(
            args,
            &format!(
                "{} {server} run {run}: {} {:.0} notifications/s in {:.2}s",
                w.label,
                if r.pass { "PASS" } else { "FAIL" },
                r.notifications_per_s,
                r.wall_s
            ),
        ),
        (None, Some(e)) => note(args, &format!("{} {server} run {run}: error: {e}", w.label)),
        _ => {}
    }
    out
}

fn run_ceiling(args: &CompareArgs, w: &WorkloadSpec, dir: &Path) -> anyhow::Result<Row> {
    let exe = match &args.efr_load {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating efr-load")?,
    };
    let stem = file_stem(&w.label, CEILING_NAME);
    let ready = dir.join(format!("logs/{stem}.ready"));
    let stats = dir.join(format!("logs/{stem}.stats.json"));
    let ports = dir.join(format!("logs/{stem}.ports"));
    for f in [&ready, &stats, &ports] {
        let _ = std::fs::remove_file(f);
    }
    // The ceiling binds ports the system picks and names them in its ports file.
    let spec = ServerSpec::new(
        CEILING_NAME,
        format!(
            "exec {} null-server --workload {} --lookahead-mib {} --ready-file {} \
             --stats-file {} --ports-file {}",
            shell_quote(&exe.display().to_string()),
            shell_quote(&w.spec),
            args.ceiling_lookahead_mib,
            shell_quote(&ready.display().to_string()),
            shell_quote(&stats.display().to_string()),
            shell_quote(&ports.display().to_string()),
        ),
    );
    let is_ready = |run: usize| file_number(&ready) >= run as u64;
    let mut row = run_server_with(args, w, &spec, dir, &is_ready, Some(&ports))?;
    row.ceiling = std::fs::read_to_string(&stats)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    row.ratio_to_ceiling = row.pass.then_some(1.0);
    Ok(row)
}

/// The number in `path`, 0 when there is none yet.
fn file_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

fn run_server(
    args: &CompareArgs,
    w: &WorkloadSpec,
    spec: &ServerSpec,
    dir: &Path,
) -> anyhow::Result<Row> {
    run_server_with(args, w, spec, dir, &|_| true, None)
}

/// The ports named in a ceiling's ports file (`EVENT_PORT CLIENT_PORT`), once it is written.
fn ports_in(path: &Path) -> Option<Ports> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some(Ports {
        event: ports.next()??,
        client: ports.next()??,
        metrics: None,
    })
}

/// Starts the server, runs the workload (each run once `is_ready(run)`), stops the server.
fn run_server_with(
    args: &CompareArgs,
    w: &WorkloadSpec,
    spec: &ServerSpec,
    dir: &Path,
    is_ready: &dyn Fn(usize) -> bool,
    ports_file: Option<&Path>,
) -> anyhow::Result<Row> {
    // A server that names its own ports needs none reserved for it.
    let mut ports = match ports_file {
        Some(_) => Ports {
            event: 0,
            client: 0,
            metrics: None,
        },
        None => Ports::free(spec.has_metrics())?,
    };
    let mut command = spec
        .command
        .replace("{event_port}", &ports.event.to_string())
        .replace("{client_port}", &ports.client.to_string());
    if let Some(m) = ports.metrics {
        command = command.replace(METRICS_PORT_PLACEHOLDER, &m.to_string());
    }
    let log_rel = format!("logs/{}.log", file_stem(&w.label, &spec.name));
    let log = std::fs::File::create(dir.join(&log_rel))?;
    note(
        args,
        &format!("{} {}: starting {command}", w.label, spec.name),
    );
    let mut server = ServerProcess::spawn(&command, log)?;
    let mut outcomes = Vec::new();
    let start_timeout = Duration::from_millis(args.start_timeout_ms);
    let ready = match ports_file {
        Some(file) => server.wait_ports_file(file, start_timeout).map(|named| {
            ports = named;
        }),
        None => server.wait_listening(&ports.all(), start_timeout),
    };
    match ready {
        Ok(()) => {
            for run in 1..=args.runs {
                if let Some(status) = server.exited() {
                    outcomes.push(RunOutcome {
                        run,
                        report: None,
                        error: Some(format!("the server exited ({status})")),
                        json: None,
                    });
                    continue;
                }
                if let Err(e) = server.wait_ready(run, is_ready, CEILING_PREPARE_TIMEOUT) {
                    outcomes.push(RunOutcome {
                        run,
                        report: None,
                        error: Some(format!("{e:#}")),
                        json: None,
                    });
                    continue;
                }
                outcomes.push(one_run(args, w, spec, run, ports, dir));
            }
        }
        Err(e) => {
            note(args, &format!("{} {}: {e:#}", w.label, spec.name));
            for run in 1..=args.runs {
                outcomes.push(RunOutcome {
                    run,
                    report: None,
                    error: Some(format!("{e:#}")),
                    json: None,
                });
            }
        }
    }
    let peak = server.stop(Duration::from_millis(args.stop_timeout_ms));
    let mut row = make_row(w, &spec.name, &command, outcomes);
    row.peak_rss_bytes = peak;
    row.log = Some(log_rel.clone());
    row.server_order_violations = order_violations(&dir.join(&log_rel));
    Ok(row)
}

/// The last `order_violations=N` in a server log (0 when the server logs counters but none).
fn order_violations(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut found = None;
    for line in text.lines() {
        if line.contains("session ended") || line.contains("stopped (") {
            found = Some(0);
        }
        if let Some(i) = line.rfind(ORDER_VIOLATIONS_KEY) {
            let rest = &line[i + ORDER_VIOLATIONS_KEY.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = digits.parse() {
                found = Some(n);
            }
        }
    }
    found
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn make_row(w: &WorkloadSpec, server: &str, command: &str, outcomes: Vec<RunOutcome>) -> Row {
    let reports: Vec<&Report> = outcomes.iter().filter_map(|o| o.report.as_ref()).collect();
    let med = |f: &dyn Fn(&Report) -> f64| median(reports.iter().map(|r| f(r)).collect());
    let mut errors = Vec::new();
    let mut error_count = 0;
    for o in &outcomes {
        if let Some(e) = &o.error {
            error_count += 1;
            errors.push(format!("run {}: {e}", o.run));
        }
        if let Some(r) = &o.report {
            error_count += r.error_count;
            errors.extend(r.errors.iter().map(|e| format!("run {}: {e}", o.run)));
        }
    }
    errors.truncate(MAX_ROW_ERRORS);
    let runs_passed = reports.iter().filter(|r| r.pass).count();
    Row {
        expect_fail: None,
        skipped: None,
        workload: w.label.clone(),
        server: server.to_string(),
        command: command.to_string(),
        pass: runs_passed == outcomes.len(),
        runs_passed,
        runs: outcomes.len(),
        events_per_s: med(&|r| r.events_per_s),
        notifications_per_s: med(&|r| r.notifications_per_s),
        notifications: med(&|r| r.notifications as f64).map(|v| v as u64),
        wall_s: med(&|r| r.wall_s),
        p50_us: med(&|r| r.latency.p50_us),
        p99_us: med(&|r| r.latency.p99_us),
        p999_us: med(&|r| r.latency.p999_us),
        server_p99_us: median(
            reports
                .iter()
                .filter_map(|r| r.server_latency.as_ref().map(|s| s.p99_us))
                .collect(),
        ),
        peak_rss_bytes: None,
        ratio_to_ceiling: None,
        error_count,
        server_order_violations: None,
        errors,
        ceiling: None,
        run_outcomes: outcomes,
        log: None,
    }
}

/// The ports of one server.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Event source port.
    pub event: u16,
    /// Client port.
    pub client: u16,
    /// Metrics port, when the server exposes metrics.
    pub metrics: Option<u16>,
}

impl Ports {
    /// Free TCP ports on 127.0.0.1 (a metrics port too when `metrics`): bound to port 0
    /// together, then released.
    pub fn free(metrics: bool) -> anyhow::Result<Ports> {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let b = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpListener::bind("127.0.0.1:0")?;
        Ok(Ports {
            event: a.local_addr()?.port(),
            client: b.local_addr()?.port(),
            metrics: metrics
                .then(|| c.local_addr().map(|a| a.port()))
                .transpose()?,
        })
    }

    /// Every port the server must listen on.
    pub fn all(&self) -> Vec<u16> {
        [Some(self.event), Some(self.client), self.metrics]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A server started through `sh -c` in its own process group.
struct ServerProcess {
    child: Child,
    pgid: i32,
    peak: Arc<Mutex<std::collections::HashMap<i32, u64>>>,
    sampling: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl ServerProcess {
    fn spawn(command: &str, log: std::fs::File) -> anyhow::Result<ServerProcess> {
        let err = log.try_clone()?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe. If compare dies (SIGINT, SIGKILL) before it
        // stops the server, the kernel ends the server too (exec keeps the setting).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting sh -c {command:?}"))?;
        let pgid = child.id() as i32;
        let peak = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let sampling = Arc::new(AtomicBool::new(true));
        let (p, s) = (peak.clone(), sampling.clone());
        let sampler = std::thread::Builder::new()
            .name("efr-compare-rss".into())
            .spawn(move || {
                while s.load(Ordering::Acquire) {
                    sample_rss(pgid, &p);
                    std::thread::sleep(RSS_POLL);
                }
            })?;
        Ok(ServerProcess {
            child,
            pgid,
            peak,
            sampling,
            sampler: Some(sampler),
        })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until `is_ready(run)`, failing if the server exits or `timeout` passes.
    fn wait_ready(
        &mut self,
        run: usize,
        is_ready: &dyn Fn(usize) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !is_ready(run) {
            if let Some(status) = self.exited() {
                anyhow::bail!("the server exited ({status}) before run {run} was prepared");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "run {run} was not prepared within {timeout:?}"
            );
            std::thread::sleep(PORT_POLL);
        }
        Ok(())
    }

    /// Waits until the server names its ports in `file` (it writes them once they listen),
    /// the server exits, or the timeout passes.
    fn wait_ports_file(&mut self, file: &Path, timeout: Duration) -> anyhow::Result<Ports> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ports) = ports_in(file) {
                return Ok(ports);
            }
            if let Some(status) = self.exited() {
                anyhow::bail!("the server exited ({status}) before its ports listened");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not name its ports in {} within {timeout:?}",
                file.display()
            );
            std::thread::sleep(PORT_POLL);
        }
    }

    /// Waits until every port listens, the server exits, or the timeout passes.
    fn wait_listening(&mut self, ports: &[u16], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                anyhow::bail!("the server exited ({status}) before its ports listened");
            }
            let listening = listening_ports();
            if ports.iter().all(|p| listening.contains(p)) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server's ports {ports:?} did not listen within {timeout:?}"
            );
            std::thread::sleep(PORT_POLL);
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns the group's peak RSS.
    fn stop(mut self, grace: Duration) -> Option<u64> {
        sample_rss(self.pgid, &self.peak);
        self.sampling.store(false, Ordering::Release);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        // SAFETY: signals to the process group we created (its id is our child's pid, which
        // is not reaped yet, so it cannot have been reused).
        unsafe { libc::kill(-self.pgid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(EXIT_POLL);
        }
        if !group_members(self.pgid).is_empty() || self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as above; members remain, so the group id is still ours.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        let peak = self.peak.lock().unwrap_or_else(|p| p.into_inner());
        (!peak.is_empty()).then(|| peak.values().sum())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.sampling.store(false, Ordering::Release);
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: our own, unreaped child's process group.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the command (which is in parentheses): state ppid pgrp.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Records each group member's VmHWM (its own peak RSS), bytes.
fn sample_rss(pgid: i32, peak: &Mutex<std::collections::HashMap<i32, u64>>) {
    for pid in group_members(pgid) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let hwm = status.lines().find_map(|l| {
            let v = l.strip_prefix("VmHWM:")?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        });
        if let Some(kb) = hwm {
            let mut m = peak.lock().unwrap_or_else(|p| p.into_inner());
            let e = m.entry(pid).or_insert(0);
            *e = (*e).max(kb * 1024);
        }
    }
}

/// Ports in the LISTEN state (IPv4 and IPv6), from /proc/net/tcp*.
fn listening_ports() -> Vec<u16> {
    /// The LISTEN state in /proc/net/tcp.
    const TCP_LISTEN: &str = "0A";
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(mut file) = std::fs::File::open(f) else {
            continue;
        };
        let mut text = String::new();
        if file.read_to_string(&mut text).is_err() {
            continue;
        }
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3 && cols[3] == TCP_LISTEN {
                if let Some(port) = cols[1].rsplit(':').next() {
                    if let Ok(p) = u16::from_str_radix(port, 16) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn utc_date() -> String {
    let (y, m, d) = civil_from_days(now_secs().div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

fn utc_timestamp() -> String {
    let s = now_secs();
    let (y, m, d) = civil_from_days(s.div_euclid(86_400));
    let t = s.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1} k", v / 1e3),
        Some(v) => format!("{v:.0}"),
        None => "n/a".into(),
    }
}

/// Latency in ms with enough digits to read a p50 of tens of microseconds.
pub fn fmt_ms(us: Option<f64>) -> String {
    match us {
        Some(v) => crate::report::ms(v / 1e3),
        None => "n/a".into(),
    }
}

/// The result cell of a row.
fn result_cell(r: &Row) -> String {
    let failed = || {
        let mut t = format!(
            "{}/{} passed, {} errors",
            r.runs_passed, r.runs, r.error_count
        );
        if let Some(v) = r.server_order_violations.filter(|&v| v > 0) {
            let _ = write!(t, ", {v} order violations");
        }
        t
    };
    match r.verdict() {
        Verdict::Pass => format!("PASS {}/{}", r.runs_passed, r.runs),
        Verdict::Fail => format!("FAIL {}", failed()),
        Verdict::ExpectedFail => format!("expected FAIL {}", failed()),
        Verdict::KnownWrongPassed => format!(
            "PASS {}/{} (expected to fail; not on this workload)",
            r.runs_passed, r.runs
        ),
        Verdict::Skipped => format!("cannot run: {}", r.skipped.as_deref().unwrap_or("")),
    }
}

/// The markdown tables, one per workload.
pub fn markdown(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians of {} run(s) per row; latency (ms) from the write of the batch that made an \
         event deliverable to the read of its notification. Ratio: notifications/s over the \
         ceiling's.\n",
        s.runs
    );
    for w in &s.workloads {
        let _ = writeln!(out, "### {} ({})\n", w.label, w.latency_kind());
        let _ = writeln!(
            out,
            "| server | result | events/s | notifications/s | p50 ms | p99 ms | p99.9 ms | server's own p99 ms | peak RSS | ratio to ceiling |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in s.rows.iter().filter(|r| r.workload == w.label) {
            let rss = r
                .peak_rss_bytes
                .map_or("n/a".into(), |b| format!("{:.1} MB", b as f64 / 1e6));
            let ratio = r
                .ratio_to_ceiling
                .map_or("n/a".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.server,
                result_cell(r),
                fmt_rate(r.events_per_s),
                fmt_rate(r.notifications_per_s),
                fmt_ms(r.p50_us),
                fmt_ms(r.p99_us),
                fmt_ms(r.p999_us),
                fmt_ms(r.server_p99_us),
                rss,
                ratio
            );
        }
        let _ = writeln!(out);
        let failed = |r: &&Row| r.workload == w.label && !r.pass && r.skipped.is_none();
        for r in s.rows.iter().filter(failed) {
            for e in &r.errors {
                let _ = writeln!(out, "- {} {}: {}", r.server, r.workload, e);
            }
        }
        if s.rows.iter().any(|r| failed(&r)) {
            let _ = writeln!(out);
        }
    }
    let mut expected: Vec<(&str, &str)> = Vec::new();
    for r in &s.rows {
        if let Some(why) = &r.expect_fail {
            if !expected.iter().any(|(name, _)| *name == r.server) {
                expected.push((&r.server, why));
            }
        }
    }
    for (name, why) in expected {
        let _ = writeln!(out, "Expected to fail: {name}: {why}.\n");
    }
    for n in &s.notes {
        let _ = writeln!(out, "Note: {n}\n");
    }
    if !s.charts.is_empty() {
        let _ = writeln!(out, "Charts:\n");
        for c in &s.charts {
            let _ = writeln!(out, "- [{c}]({c})");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn servers() {
        let s = parse_server("a=echo {event_port}").unwrap();
        assert_eq!(
            (s.name.as_str(), s.command.as_str()),
            ("a", "echo {event_port}")
        );
        assert!(parse_server("ceiling=x").is_err());
        assert!(parse_server("noequals").is_err());
    }

    #[test]
    fn default_servers_cover_the_cores_and_the_resequencers() {
        let names: Vec<String> = default_servers(Path::new("/x/efr-sharded"))
            .into_iter()
            .map(|s| {
                assert!(s
                    .command
                    .starts_with("exec /x/efr-sharded --event-port {event_port}"));
                assert!(s
                    .command
                    .contains("--metrics-addr 127.0.0.1:{metrics_port}"));
                s.name
            })
            .collect();
        assert_eq!(
            names,
            [
                "sharded-c1-heap",
                "sharded-c2-heap",
                "sharded-c4-heap",
                "sharded-c8-heap",
                "sharded-c2-stream",
                "sharded-c2-batch"
            ]
        );
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        let w: Vec<String> = DEFAULT_WORKLOADS
            .split(',')
            .map(|s| parse_workload(s).unwrap().label)
            .collect();
        assert_eq!(
            w,
            [
                "harness-1000000",
                "harness-10000000",
                "fanout-10000c-20000",
                "ping-3000",
                "harness-200000-at-20000"
            ]
        );
        let servers = default_servers(Path::new("/x/efr-sharded"));
        for s in &servers {
            assert!(s.has_metrics(), "{}", s.command);
            let wrong = s.name.ends_with("-batch");
            assert_eq!(s.expect_fail.is_some(), wrong, "{}", s.name);
            let ping = parse_workload("ping:1").unwrap();
            assert_eq!(s.cannot_run(&ping).is_some(), wrong, "{}", s.name);
        }
    }

    #[test]
    fn missing_peers_are_a_note_not_a_row() {
        let dir = std::env::temp_dir().join(format!("efr-no-peers-{}", std::process::id()));
        let (servers, notes) = peer_servers(&dir);
        assert!(servers.is_empty());
        assert_eq!(notes.len(), 2);
        assert!(notes[0].contains("efr-go") && notes[1].contains("fmaze-go"));
    }

    #[test]
    fn a_ports_file_names_both_ports_or_nothing() {
        let dir = std::env::temp_dir().join(format!("efr-ports-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ceiling.ports");
        assert!(ports_in(&file).is_none(), "not written yet");
        std::fs::write(&file, "4100").unwrap();
        assert!(ports_in(&file).is_none(), "one port only");
        std::fs::write(&file, "4100 4101\n").unwrap();
        let ports = ports_in(&file).unwrap();
        assert_eq!(
            (ports.event, ports.client, ports.metrics),
            (4100, 4101, None)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_found_get_their_rows_limits_and_a_longer_settle() {
        let dir = std::env::temp_dir().join(format!("efr-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [EFR_GO, FMAZE_GO] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let (servers, notes) = peer_servers(&dir);
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [EFR_GO, FMAZE_GO, FMAZE_GO_WRITE_THROUGH]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        let fanout = parse_workload("fanout:10:10").unwrap();
        assert!(servers[0].cannot_run(&fanout).is_some());
        assert!(servers[1].cannot_run(&fanout).is_none());
        assert!(servers[2].cannot_run(&fanout).is_some());
        assert!(servers[1].expect_fail.is_some() && servers[2].expect_fail.is_some());
        for s in &servers {
            assert!(!s.has_metrics());
            assert_eq!(s.settle_per_client_us, Some(PEER_SETTLE_PER_CLIENT_US));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    }
}
