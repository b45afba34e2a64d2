//! `ping` as a dedicated round-trip loop on the calling thread: one source socket and one
//! client socket, both blocking with TCP_NODELAY. Each round trip writes one event line
//! (`n|P|1|2`), reads the client until its notification line is complete, checks it byte for
//! byte, and records the time from just before the write to just after the read that
//! completed the line. Nothing else is inside that window: no hand-off to a reader thread, no
//! poll loop, no wake-up of a sleeping source, so the figure is the server's round trip plus
//! what loopback TCP costs (measure that floor with `efr-load relay`, [`crate::relay`]).
//!
//! Everything around the loop is as in any run ([`crate::run`]): the client's id line, the
//! wait for its registration (`--metrics-url`, else `--settle-ms`), `--chaos` (chaos clients
//! beside it, malformed lines inside the source's writes), TLS, `--rate` (spacing between
//! round trips), `--timeout`, `--drain-ms`, and the same [`Report`].

use std::io::{self, ErrorKind, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::chaos::{self, Chaos};
use super::clients::{show, LATENCY_MAX_NS};
use super::config::{self, LoadConfig, WorkloadCmd};
use super::ping::PING_TO;
use super::report::{self, Report};
use super::security::{Link, Security};
use super::workload::{Kind, Workload};
use super::PROGRESS_PLAIN_INTERVAL;

/// Round trips between two looks at the clock for a progress line (outside the timed window).
const PROGRESS_CHECK_ROUNDS: u64 = 1024;

/// Empty reads of a spinning client between two looks at the clock for `--timeout`.
const SPINS_PER_CLOCK_LOOK: u32 = 1024;

/// What the loop found: figures for the report, and the first error if any.
struct LoopOutcome {
    events: u64,
    notifications: u64,
    bytes_sent: u64,
    bytes_received: u64,
    first_write: Option<Instant>,
    last_read: Option<Instant>,
    error: Option<String>,
}

/// Reads some plaintext from `link` (blocking, within the socket's read timeout): `Ok(0)` at
/// the end of the stream.
fn read_some(link: &mut Link, buf: &mut [u8]) -> io::Result<usize> {
    let Some(tls) = link.tls.as_mut() else {
        return link.tcp.read(buf);
    };
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The TCP end without close_notify: an end all the same.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        if tls.read_tls(&mut link.tcp)? == 0 {
            // Let the session report the end (close_notify or not) on the next pass.
            tls.process_new_packets()
                .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            return match tls.reader().read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
                Err(e) => Err(e),
            };
        }
        tls.process_new_packets()
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        // Alerts and key updates the session must answer.
        while tls.wants_write() {
            tls.write_tls(&mut link.tcp)?;
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The client side of the loop: its socket, a read buffer of `--read-buffer` bytes, and the
/// bytes received and not yet checked (a partial line, or lines a wrong server sent early).
struct Receiver {
    name: String,
    link: Link,
    buf: Vec<u8>,
    filled: usize,
    max_line: usize,
    timeout_ms: u64,
    bytes: u64,
    /// The socket is nonblocking and a read that finds nothing is retried at once (`--spin`).
    spin: bool,
}

impl Receiver {
    /// Reads until a complete line is buffered and checks it against `expected` (the payload,
    /// without `\n`). Returns the time just after the read that completed the line.
    fn expect_line(&mut self, expected: &[u8]) -> Result<Instant, String> {
        let mut completed_at = Instant::now();
        let waiting_since = completed_at;
        let mut spins = 0u32;
        loop {
            if let Some(n) = self.buf[..self.filled].iter().position(|&b| b == b'\n') {
                if &self.buf[..n] != expected {
                    return Err(format!(
                        "{} expected line {} but got {}",
                        self.name,
                        show(expected),
                        show(&self.buf[..n])
                    ));
                }
                self.buf.copy_within(n + 1..self.filled, 0);
                self.filled -= n + 1;
                return Ok(completed_at);
            }
            if self.filled > self.max_line || self.filled == self.buf.len() {
                return Err(format!(
                    "{} sent a line longer than {} bytes: {}",
                    self.name,
                    self.max_line,
                    show(&self.buf[..self.filled])
                ));
            }
            match read_some(&mut self.link, &mut self.buf[self.filled..]) {
                Ok(0) => {
                    return Err(format!(
                        "{} connection closed by the server while expecting {}",
                        self.name,
                        show(expected)
                    ))
                }
                Ok(n) => {
                    completed_at = Instant::now();
                    self.filled += n;
                    self.bytes += n as u64;
                }
                Err(e) if self.spin && e.kind() == ErrorKind::WouldBlock => {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(SPINS_PER_CLOCK_LOOK)
                        && waiting_since.elapsed() > Duration::from_millis(self.timeout_ms)
                    {
                        return Err(self.silent(expected));
                    }
                    std::hint::spin_loop();
                }
                Err(e) if timed_out(&e) => return Err(self.silent(expected)),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!(
                        "{} read failed while expecting {}: {e}",
                        self.name,
                        show(expected)
                    ))
                }
            }
        }
    }

    fn silent(&self, expected: &[u8]) -> String {
        format!(
            "{} silent for {} ms while expecting {}",
            self.name,
            self.timeout_ms,
            show(expected)
        )
    }

    /// After the last expected line: waits up to `drain_ms` for the server's close; any byte
    /// before it is an extra line.
    fn drain(&mut self, drain_ms: u64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_millis(drain_ms);
        if self.spin && self.link.tcp.set_nonblocking(false).is_err() {
            return Ok(());
        }
        while self.filled == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.link.tcp.set_read_timeout(Some(left)).is_err() {
                return Ok(());
            }
            match read_some(&mut self.link, &mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    self.filled = n;
                    self.bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Silence until the deadline (or a reset after the close): nothing extra.
                Err(_) => return Ok(()),
            }
        }
        let data = &self.buf[..self.filled];
        let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        Err(format!(
            "{} extra line after the last expected: {}",
            self.name,
            show(&data[..end])
        ))
    }
}

/// The round trips: one batch of the workload at a time, each written and then awaited at
/// the client. Returns the outcome and the source connection (closed for writing; dropped by
/// the caller only after the drain, as in [`crate::source::run_source`]).
fn round_trips(
    workload: &mut dyn Workload,
    source: &mut Link,
    client: &mut Receiver,
    hist: &mut Histogram<u64>,
    rate: Option<f64>,
    drain_ms: u64,
    progress: bool,
) -> LoopOutcome {
    let mut out = LoopOutcome {
        events: 0,
        notifications: 0,
        bytes_sent: 0,
        bytes_received: 0,
        first_write: None,
        last_read: None,
        error: None,
    };
    let mut pace_start: Option<Instant> = None;
    let mut round = 0u64;
    let mut last_progress = Instant::now();
    'batches: loop {
        let batch = match workload.next_batch() {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("workload: {e:#}"));
                break;
            }
        };
        if let Some(r) = rate {
            let start = *pace_start.get_or_insert_with(Instant::now);
            let due = start + Duration::from_secs_f64(round as f64 / r);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        round += 1;
        if progress
            && round.is_multiple_of(PROGRESS_CHECK_ROUNDS)
            && last_progress.elapsed() >= PROGRESS_PLAIN_INTERVAL
        {
            last_progress = Instant::now();
            eprintln!("efr-load: ping: {} round trips", out.notifications);
        }
        let written = Instant::now();
        out.first_write.get_or_insert(written);
        if let Err(e) = source.write_all(&batch.wire) {
            out.error = Some(format!("event source write failed: {e}"));
            break;
        }
        out.events += batch.wire_events;
        out.bytes_sent += batch.wire.len() as u64;
        for (i, ev) in batch.model.events.iter().enumerate() {
            debug_assert!(ev.kind == Kind::Private && ev.to == PING_TO);
            match client.expect_line(batch.model.payload_of(i)) {
                Ok(read_at) => {
                    out.notifications += 1;
                    out.last_read = Some(read_at);
                    let ns = read_at.duration_since(written).as_nanos() as u64;
                    let _ = hist.record(ns.clamp(1, LATENCY_MAX_NS));
                }
                Err(e) => {
                    out.error = Some(e);
                    break 'batches;
                }
            }
        }
    }
    if out.error.is_none() {
        if let Err(e) = source.close_write() {
            out.error = Some(format!("event source close failed: {e}"));
        } else if let Err(e) = client.drain(drain_ms) {
            out.error = Some(e);
        }
    }
    out.bytes_received = client.bytes;
    out
}

/// Runs `ping` (the workload built from `cmd`, chaos-wrapped if `--chaos`) as a round-trip
/// loop on this thread.
pub(crate) fn run(
    config: &LoadConfig,
    cmd: &WorkloadCmd,
    security: Arc<Security>,
    mut workload: Box<dyn Workload>,
    chaos: Option<Chaos>,
) -> anyhow::Result<Report> {
    let users = workload.clients().to_vec();
    anyhow::ensure!(
        users == [PING_TO],
        "ping: the round-trip loop serves one client, user {PING_TO}"
    );
    let max_user = workload.max_user();
    let (user0, sys0, _) = report::rusage();
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let ending = config.line_ending.bytes();
    let name = format!("client {PING_TO}");

    let metrics = super::metrics_baseline(config)?;
    let connect_start = Instant::now();
    let client_addr = super::resolve(&config.host, config.client_port_of(0))?;
    let client_link = super::connect_one(client_addr, timeout, &security, PING_TO, &name, ending)?;
    let connect_s = connect_start.elapsed().as_secs_f64();
    let registration = super::await_registration(config, &metrics, users.len())?;
    if metrics.is_none() {
        std::thread::sleep(Duration::from_millis(config::settle_ms(
            config.settle_ms,
            users.len() as u64,
        )));
    }
    // Stopped when dropped: at the end of the run or on an early return.
    let chaos_clients = match &chaos {
        Some(c) => Some(c.start_clients(
            super::resolve(&config.host, config.client_port_of(0))?,
            c.client_ids(&users, max_user),
            security.clone(),
        )?),
        None => None,
    };
    if let Some(c) = &chaos_clients {
        let _ = c.wait_active(chaos::CHAOS_ACTIVE_TIMEOUT);
    }

    let endpoint = metrics.as_ref().map(|(endpoint, _)| endpoint);
    let server_latency_before =
        super::server_latency::before_run(endpoint, &config.server_latency_metric);
    let event_addr = super::resolve(&config.host, config.event_port)?;
    let mut source = Link::connect(event_addr, timeout, &security, true)
        .with_context(|| format!("connecting the event source to {event_addr}"))?;
    let _ = source.tcp.set_nodelay(true);
    let silence = Duration::from_millis(config.timeout.max(1));
    source
        .tcp
        .set_write_timeout(Some(silence))
        .context("event source socket")?;
    client_link
        .tcp
        .set_read_timeout(Some(silence))
        .with_context(|| format!("{name} socket"))?;
    let _ = client_link.tcp.set_nodelay(true);
    let spin = matches!(cmd, WorkloadCmd::Ping(a) if a.spin);
    if spin {
        client_link
            .tcp
            .set_nonblocking(true)
            .with_context(|| format!("{name} socket"))?;
    }
    let mut client = Receiver {
        name,
        link: client_link,
        buf: vec![0; config.read_buffer],
        filled: 0,
        max_line: config.max_line,
        timeout_ms: config.timeout,
        bytes: 0,
        spin,
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_NS, 3)?;
    let progress = config.progress != config::ProgressMode::Off;
    let out = round_trips(
        workload.as_mut(),
        &mut source,
        &mut client,
        &mut hist,
        config.rate,
        config.drain_ms,
        progress,
    );
    drop(source);
    if let Some(c) = chaos_clients {
        c.stop();
    }
    let (user1, sys1, peak_rss) = report::rusage();

    let wall_s = match (out.first_write, out.last_read) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
    let cpu = (user1 - user0) + (sys1 - sys0);
    let errors: Vec<String> = out.error.into_iter().collect();
    let server_latency = super::server_latency::after_run(
        endpoint,
        &config.server_latency_metric,
        server_latency_before.as_ref(),
        out.notifications,
    );
    let report = Report {
        pass: errors.is_empty(),
        error_count: errors.len() as u64,
        errors,
        workload: cmd.name().to_string(),
        pacing: format!(
            "one event at a time{}{}",
            config
                .rate
                .map_or(String::new(), |r| format!(", at most {r} events/s")),
            if spin { ", client read spinning" } else { "" }
        ),
        registration,
        server: format!(
            "{}:{}/{}",
            config.host,
            config.event_port,
            config.client_port_of(0)
        ),
        clients: users.len() as u64,
        events: out.events,
        notifications: out.notifications,
        bytes_sent: out.bytes_sent,
        bytes_received: out.bytes_received,
        wall_s,
        events_per_s: per_s(out.events),
        notifications_per_s: per_s(out.notifications),
        bytes_per_s: per_s(out.bytes_received),
        latency: report::Latency::from_histogram_ns(&hist),
        server_latency,
        cpu_user_s: user1 - user0,
        cpu_sys_s: sys1 - sys0,
        cpu_ns_per_notification: (out.notifications > 0)
            .then(|| cpu * 1e9 / out.notifications as f64),
        peak_rss_bytes: peak_rss,
        // The loop's own thread reads the client.
        reader_threads: 1,
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
