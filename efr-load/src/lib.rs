//! efr-load: the load generator and verifier. It plays the event source and the user clients
//! of the Follower Maze protocol (PROTOCOL.md) against any server, checks every byte every
//! client receives against its own model, and measures throughput, latency and its own cost.
//!
//! A run: connect every client and send its id line, wait until the server registered them
//! ([`registration`]: its metrics counter, or `--settle-ms` for servers that expose nothing),
//! connect the event source and stream the workload's batches; the source hands each batch's deliverable events
//! to every reader thread before writing it ([`source`]); each reader applies them to its own
//! follow-graph model and checks its clients' lines ([`clients`]). After the last event the
//! source closes its write side; the run ends when every client received everything expected
//! and the server closed it (or `--drain-ms` passed), or a client stayed silent for
//! `--timeout` ms while expecting lines.
//!
//! `ping` runs apart, as a round-trip loop on one thread ([`ping_loop`]), with its floor
//! `efr-load relay` ([`relay`]).
//!
//! Also here: `compare` (runs against several servers, [`compare`], [`rows`], [`chart`],
//! [`workload_spec`]) and its ceiling ([`ceiling`]). This crate is independent of the
//! server's code.

pub mod ceiling;
pub mod chaos;
pub mod chart;
pub mod clients;
pub mod compare;
pub mod config;
pub mod flow;
pub mod model;
pub mod ping;
pub mod ping_loop;
pub mod registration;
pub mod relay;
pub mod report;
pub mod rng;
pub mod rows;
pub mod security;
pub mod server_latency;
pub mod source;
pub mod workload;
pub mod workload_spec;

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

pub use config::{Command, LoadConfig, ProgressMode, WorkloadCmd};
pub use report::Report;

use clients::{ClientConn, ReaderOutcome, ReaderSettings};
use flow::Shared;
use security::{Link, Security};
use source::{SourceOutcome, SourceSettings};

/// How often the progress display is refreshed.
pub const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// How often a plain progress line is printed when stderr is not a terminal.
pub const PROGRESS_PLAIN_INTERVAL: Duration = Duration::from_secs(5);
/// File descriptors kept beyond one per client.
pub const SPARE_FDS: u64 = 64;

/// Raises the soft limit of open files toward `want` (up to the hard limit).
pub(crate) fn raise_nofile(want: u64) {
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && (lim.rlim_cur as u64) < want {
            lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub(crate) fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .with_context(|| format!("no address for {host}:{port}"))
}

/// Display names of the clients: `client <user>`, with `#k` for a user's k-th extra
/// connection.
fn client_names(users: &[u64]) -> Vec<String> {
    let mut seen = ahash::AHashMap::new();
    users
        .iter()
        .map(|&u| {
            let k = seen.entry(u).or_insert(0u32);
            *k += 1;
            if *k == 1 {
                format!("client {u}")
            } else {
                format!("client {u}#{k}")
            }
        })
        .collect()
}

/// Connects one client (the TLS handshake included) and sends its id line.
pub(crate) fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    security: &Security,
    user: u64,
    name: &str,
    ending: &[u8],
) -> anyhow::Result<Link> {
    let mut link = Link::connect(addr, timeout, security, false)
        .with_context(|| format!("connecting {name} to {addr}"))?;
    let mut line = Vec::with_capacity(24);
    security.push_id_line(&mut line, user, ending)?;
    link.write_all(&line)
        .with_context(|| format!("sending the id of {name}"))?;
    Ok(link)
}

/// Connects every client and sends its id line, `--connect-threads` at a time (so that a
/// server slow to accept, or a retransmitted SYN, does not serialize 10,000 connects), and
/// deals them to the readers: client i goes to reader i % readers.
fn connect_clients(
    config: &LoadConfig,
    security: &Security,
    users: &[u64],
    readers: usize,
) -> anyhow::Result<Vec<Vec<ClientConn>>> {
    let ports = if config.client_ports.is_empty() {
        vec![config.client_port]
    } else {
        config.client_ports.clone()
    };
    let addrs = ports
        .iter()
        .map(|&p| resolve(&config.host, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let names = client_names(users);
    let threads = config.connect_threads.clamp(1, users.len().max(1));
    let per_thread = users.len().div_ceil(threads).max(1);
    let ending = config.line_ending.bytes();
    let addrs = &addrs;
    let streams: Vec<Link> = std::thread::scope(|scope| {
        let handles: Vec<_> = users
            .chunks(per_thread)
            .zip(names.chunks(per_thread))
            .enumerate()
            .map(|(chunk, (us, ns))| {
                scope.spawn(move || {
                    us.iter()
                        .zip(ns)
                        .enumerate()
                        .map(|(k, (&u, n))| {
                            // Client i connects to the (i mod n)-th client port.
                            let addr = addrs[(chunk * per_thread + k) % addrs.len()];
                            connect_one(addr, timeout, security, u, n, ending)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(users.len());
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a connect thread panicked"))??,
            );
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let mut per_reader: Vec<Vec<ClientConn>> = (0..readers).map(|_| Vec::new()).collect();
    for (i, ((link, name), &user)) in streams.into_iter().zip(names).zip(users).enumerate() {
        per_reader[i % readers].push(ClientConn {
            name,
            user,
            stream: link.tcp,
            tls: link.tls,
        });
    }
    Ok(per_reader)
}

/// The server's registered-clients counter at `--metrics-url` and its value now, read before
/// any client connects; `None` without `--metrics-url`.
pub(crate) fn metrics_baseline(
    config: &LoadConfig,
) -> anyhow::Result<Option<(registration::MetricsEndpoint, u64)>> {
    match &config.metrics_url {
        Some(url) => {
            let endpoint = registration::MetricsEndpoint::parse(url)?;
            let baseline = endpoint.read(&config.registered_metric)?;
            Ok(Some((endpoint, baseline)))
        }
        None => Ok(None),
    }
}

/// With metrics: waits until the server registered `clients` more clients than `baseline`.
/// Returns how the registration was awaited, for the report; without metrics the caller
/// pauses `--settle-ms` itself (see [`config::settle_ms`]).
pub(crate) fn await_registration(
    config: &LoadConfig,
    metrics: &Option<(registration::MetricsEndpoint, u64)>,
    clients: usize,
) -> anyhow::Result<String> {
    Ok(match metrics {
        Some((endpoint, baseline)) => {
            let waited = registration::wait_for_count(
                || endpoint.read(&config.registered_metric),
                *baseline,
                clients as u64,
                Duration::from_millis(config.register_timeout_ms),
                &config.registered_metric,
            )?;
            format!(
                "{} registered {} clients {:.3}s after the last id line",
                config.registered_metric,
                clients,
                waited.as_secs_f64()
            )
        }
        None => {
            let ms = config::settle_ms(config.settle_ms, clients as u64);
            format!("no metrics: a fixed pause of {ms} ms (--settle-ms)")
        }
    })
}

/// Runs one load: connects, streams, verifies, measures. `Err` means the run could not be
/// made (bad parameters, connect failure); a verification failure is `Ok` with
/// `report.pass == false`.
pub fn run(config: &LoadConfig) -> anyhow::Result<Report> {
    config.validate()?;
    let security = std::sync::Arc::new(Security::from_args(&config.security)?);
    let cmd = config.workload_cmd();
    let mut workload = cmd.build(config.line_ending)?;
    let chaos = config
        .chaos
        .chaos
        .then(|| chaos::Chaos::new(&config.chaos, config.line_ending));
    if let Some(c) = &chaos {
        workload = c.wrap(workload);
    }
    if let WorkloadCmd::Ping(_) = cmd {
        return ping_loop::run(config, &cmd, security, workload, chaos);
    }
    let users = workload.clients().to_vec();
    let max_user = workload.max_user();
    let total_events = workload.total_events();
    raise_nofile(users.len() as u64 + SPARE_FDS);
    let (user0, sys0, _) = report::rusage();

    let readers = config.reader_threads(users.len());
    let metrics = metrics_baseline(config)?;
    let connect_start = std::time::Instant::now();
    let per_reader = connect_clients(config, &security, &users, readers)?;
    let connect_s = connect_start.elapsed().as_secs_f64();
    // Before the chaos clients connect: their registrations would count too.
    let registration = await_registration(config, &metrics, users.len())?;
    // Stopped when dropped: at the end of the run or on an early return.
    let chaos_clients = match &chaos {
        Some(c) => Some(c.start_clients(
            resolve(&config.host, config.client_port_of(0))?,
            c.client_ids(&users, max_user),
            security.clone(),
        )?),
        None => None,
    };
    if let Some(c) = &chaos_clients {
        // Waited for, not required: a server may refuse every chaos client.
        let _ = c.wait_active(chaos::CHAOS_ACTIVE_TIMEOUT);
    }
    let shared = Shared::new(users.len() as u64);
    let settings = ReaderSettings {
        timeout_ms: config.timeout,
        drain_ms: config.drain_ms,
        read_buffer: config.read_buffer,
        max_line: config.max_line,
        max_errors: config.max_errors_shown,
        max_pending: config.max_pending_notifications,
    };
    let mut senders = Vec::new();
    let mut reader_handles: Vec<JoinHandle<anyhow::Result<ReaderOutcome>>> = Vec::new();
    for (i, conns) in per_reader.into_iter().enumerate() {
        let (tx, rx) = flume::unbounded();
        senders.push(tx);
        let shared = shared.clone();
        reader_handles.push(
            std::thread::Builder::new()
                .name(format!("efr-load-reader-{i}"))
                .spawn(move || clients::run_reader(conns, max_user, rx, shared, settings))?,
        );
    }
    if metrics.is_none() {
        std::thread::sleep(Duration::from_millis(config::settle_ms(
            config.settle_ms,
            users.len() as u64,
        )));
    }

    let source_stream = resolve(&config.host, config.event_port).and_then(|addr| {
        Link::connect(
            addr,
            Duration::from_millis(config.connect_timeout_ms),
            &security,
            true,
        )
        .with_context(|| format!("connecting the event source to {addr}"))
    });
    let source_stream = match source_stream {
        Ok(s) => s,
        Err(e) => {
            shared.abort.store(true, Ordering::Relaxed);
            drop(senders);
            for h in reader_handles {
                let _ = h.join();
            }
            return Err(e);
        }
    };
    // The server's own latency histogram, if it publishes one, just before the first event.
    let endpoint = metrics.as_ref().map(|(endpoint, _)| endpoint);
    let server_latency_before = server_latency::before_run(endpoint, &config.server_latency_metric);
    let lockstep = workload.lockstep();
    let source_settings = SourceSettings {
        rate: config.rate,
        // One event at a time: the next batch waits until the previous one was received.
        max_inflight: if lockstep {
            1
        } else {
            config.max_inflight_batches
        },
        max_pending: config.max_pending_notifications,
    };
    let source_shared = shared.clone();
    let source_handle: JoinHandle<(SourceOutcome, u64, Link)> = std::thread::Builder::new()
        .name("efr-load-source".into())
        .spawn(move || {
            let (out, link) = source::run_source(
                workload.as_mut(),
                source_stream,
                senders,
                source_shared.clone(),
                source_settings,
            );
            (out, source_shared.now_ns(), link)
        })?;

    progress(config, &shared, total_events, || {
        source_handle.is_finished() && reader_handles.iter().all(|h| h.is_finished())
    });

    let (source_out, source_end_ns, source_link) = source_handle
        .join()
        .map_err(|_| anyhow::anyhow!("the source thread panicked"))?;
    let mut outcomes = Vec::new();
    for h in reader_handles {
        outcomes.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??,
        );
    }
    // Closed only now that the readers are done (see `source::run_source`).
    drop(source_link);
    if let Some(c) = chaos_clients {
        c.stop();
    }
    let (user1, sys1, peak_rss) = report::rusage();

    let mut errors: Vec<(u64, String)> = Vec::new();
    let mut error_count = 0;
    let mut notifications = 0;
    let mut bytes_received = 0;
    let mut last_read_ns = 0;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, clients::LATENCY_MAX_NS, 3)?;
    if let Some(e) = &source_out.error {
        error_count += 1;
        errors.push((source_end_ns, format!("event source: {e}")));
    }
    for o in outcomes {
        error_count += o.error_count;
        errors.extend(o.errors);
        notifications += o.notifications;
        bytes_received += o.bytes;
        last_read_ns = last_read_ns.max(o.last_read_ns);
        hist.add(&o.hist)?;
    }
    errors.sort_by_key(|e| e.0);
    errors.truncate(config.max_errors_shown);

    let first = shared.first_write_ns.load(Ordering::Relaxed);
    let end = if notifications > 0 {
        last_read_ns
    } else {
        source_end_ns
    };
    let wall_s = (end.saturating_sub(first)) as f64 / 1e9;
    let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
    let cpu = (user1 - user0) + (sys1 - sys0);
    let server_latency = server_latency::after_run(
        endpoint,
        &config.server_latency_metric,
        server_latency_before.as_ref(),
        notifications,
    );
    let report = Report {
        pass: error_count == 0,
        errors: errors.into_iter().map(|e| e.1).collect(),
        error_count,
        workload: cmd.name().to_string(),
        pacing: match (lockstep, config.rate) {
            (true, None) => "one event at a time".to_string(),
            (true, Some(r)) => format!("one event at a time, at most {r} events/s"),
            (false, Some(r)) => format!("paced at {r} events/s"),
            (false, None) => "unpaced: latency includes queueing behind the source".to_string(),
        },
        registration,
        server: if config.client_ports.is_empty() {
            format!(
                "{}:{}/{}",
                config.host, config.event_port, config.client_port
            )
        } else {
            let ports: Vec<String> = config.client_ports.iter().map(u16::to_string).collect();
            format!("{}:{}/{}", config.host, config.event_port, ports.join(","))
        },
        clients: users.len() as u64,
        events: source_out.events,
        notifications,
        bytes_sent: shared.bytes_sent.load(Ordering::Relaxed),
        bytes_received,
        wall_s,
        events_per_s: per_s(source_out.events),
        notifications_per_s: per_s(notifications),
        bytes_per_s: per_s(bytes_received),
        latency: report::Latency::from_histogram_ns(&hist),
        server_latency,
        cpu_user_s: user1 - user0,
        cpu_sys_s: sys1 - sys0,
        cpu_ns_per_notification: (notifications > 0).then(|| cpu * 1e9 / notifications as f64),
        peak_rss_bytes: peak_rss,
        reader_threads: readers,
        connect_s,
        faults_injected: chaos.as_ref().map(|c| c.injected()),
        params: serde_json::json!({ "global": config, "workload": cmd }),
        machine: report::machine(),
    };
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// The progress display for `asked` when stderr `is_terminal` or not: a bar redraws in place
/// with terminal control sequences, which a file or a pipe cannot show, so there `bar` and
/// `auto` print plain lines instead.
pub fn progress_mode(asked: ProgressMode, is_terminal: bool) -> ProgressMode {
    match asked {
        ProgressMode::Auto | ProgressMode::Bar if is_terminal => ProgressMode::Bar,
        ProgressMode::Auto | ProgressMode::Bar => ProgressMode::Plain,
        m => m,
    }
}

/// Shows progress on stderr until `done()`; plain lines every [`PROGRESS_PLAIN_INTERVAL`]
/// and once at the end.
fn progress(config: &LoadConfig, shared: &Shared, total: Option<u64>, done: impl Fn() -> bool) {
    let mode = progress_mode(config.progress, std::io::stderr().is_terminal());
    if config.progress == ProgressMode::Bar && mode == ProgressMode::Plain {
        eprintln!("efr-load: stderr is not a terminal: progress as plain lines instead of a bar");
    }
    let bar = (mode == ProgressMode::Bar).then(|| {
        let b = indicatif::ProgressBar::new(total.unwrap_or(0));
        let style = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} events  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        b.set_style(style.progress_chars("=> "));
        b
    });
    let start = std::time::Instant::now();
    let mut last_plain = start;
    let plain_line = || {
        let events = shared.events_written.load(Ordering::Relaxed);
        let notes = shared.notifications.load(Ordering::Relaxed);
        let failed = shared.failed_clients.load(Ordering::Relaxed);
        let t = total.map_or(String::new(), |t| format!("/{t}"));
        eprintln!(
            "efr-load: {:.1}s events {events}{t} notifications {notes} failed clients {failed}",
            start.elapsed().as_secs_f64()
        );
    };
    while !done() {
        std::thread::sleep(PROGRESS_TICK);
        if let Some(b) = &bar {
            let notes = shared.notifications.load(Ordering::Relaxed);
            let failed = shared.failed_clients.load(Ordering::Relaxed);
            b.set_position(shared.events_written.load(Ordering::Relaxed));
            b.set_message(format!("{notes} notifications, {failed} failed clients"));
        } else if mode == ProgressMode::Plain && last_plain.elapsed() >= PROGRESS_PLAIN_INTERVAL {
            last_plain = std::time::Instant::now();
            plain_line();
        }
    }
    if mode == ProgressMode::Plain {
        plain_line();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// Exit status for a usage or connection error.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for a verification failure.
pub const EXIT_FAIL: i32 = 1;
