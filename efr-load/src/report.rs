//! The result of a run: pass/fail with the first mismatch messages, throughput, latency
//! percentiles, the tool's own CPU cost, a wrk-style human summary and the JSON document
//! (figures, parameters, machine).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// The percentiles of a histogram of nanoseconds.
    pub fn from_histogram_ns(hist: &hdrhistogram::Histogram<u64>) -> Latency {
        let q = |p: f64| hist.value_at_quantile(p) as f64 / 1e3;
        Latency {
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: hist.max() as f64 / 1e3,
            mean_us: hist.mean() / 1e3,
        }
    }
}

/// The machine a run was made on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// Cores available to this process.
    pub cores: usize,
    /// Kernel release.
    pub kernel: Option<String>,
    /// `rustc --version`, if rustc runs.
    pub rustc: Option<String>,
    /// `git rev-parse HEAD` of the working directory, if git runs.
    pub git_commit: Option<String>,
}

/// Everything a run found and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// True when every client received exactly what it should.
    pub pass: bool,
    /// The first error messages.
    pub errors: Vec<String>,
    /// All errors (at most one per client, plus source errors).
    pub error_count: u64,
    /// Workload name.
    pub workload: String,
    /// How the source was paced, which says what the latency includes: `unpaced` (as fast
    /// as the server takes the events: latency includes queueing behind the source),
    /// `paced at N events/s`, or `one event at a time` (ping: round trips).
    #[serde(default)]
    pub pacing: String,
    /// How the clients' registration was awaited before the source connected.
    #[serde(default)]
    pub registration: String,
    /// Server address, `host:event_port/client_port`.
    pub server: String,
    /// Client connections.
    pub clients: u64,
    /// Events written.
    pub events: u64,
    /// Notifications received and verified.
    pub notifications: u64,
    /// Bytes written by the source.
    pub bytes_sent: u64,
    /// Bytes received by the clients.
    pub bytes_received: u64,
    /// From the first event written to the last notification read (or the source's end when
    /// nothing was read), seconds.
    pub wall_s: f64,
    /// Events per second over `wall_s`.
    pub events_per_s: f64,
    /// Notifications per second over `wall_s`.
    pub notifications_per_s: f64,
    /// Bytes received per second over `wall_s`.
    pub bytes_per_s: f64,
    /// Per-notification latency, from the write (or the schedule, with `--rate`) of the batch
    /// that made its event deliverable to the read.
    pub latency: Latency,
    /// The server's own delivery latency over the run, from its histogram at --metrics-url
    /// (absent when it publishes none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_latency: Option<super::server_latency::ServerLatency>,
    /// User CPU of the tool, seconds.
    pub cpu_user_s: f64,
    /// System CPU of the tool, seconds.
    pub cpu_sys_s: f64,
    /// (user + sys) CPU per verified notification, ns.
    pub cpu_ns_per_notification: Option<f64>,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Client reader threads.
    pub reader_threads: usize,
    /// Time to connect every client and send its id, seconds.
    pub connect_s: f64,
    /// Faults injected with `--chaos` (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults_injected: Option<super::chaos::FaultsInjected>,
    /// The parameters.
    pub params: serde_json::Value,
    /// The machine.
    pub machine: Machine,
}

fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A duration in ms, with the digits a sub-millisecond value needs (`0.055`, `2.31`, `166`).
pub fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn dur_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

impl Report {
    /// The wrk-style human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "efr-load {} against {}: {} clients (connected in {:.2}s), {} reader thread(s)",
            self.workload, self.server, self.clients, self.connect_s, self.reader_threads
        );
        let _ = writeln!(
            s,
            "  Events         {:>12}   {:>9}/s   in {:.2}s",
            self.events,
            si(self.events_per_s),
            self.wall_s
        );
        let _ = writeln!(
            s,
            "  Notifications  {:>12}   {:>9}/s   {}B/s",
            self.notifications,
            si(self.notifications_per_s),
            si(self.bytes_per_s)
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  Latency        p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({})",
            dur_us(l.p50_us),
            dur_us(l.p90_us),
            dur_us(l.p99_us),
            dur_us(l.p999_us),
            dur_us(l.max_us),
            self.pacing
        );
        if let Some(server) = &self.server_latency {
            let within = server.within_1ms.map_or(String::new(), |share| {
                format!(", {:.2}% within 1 ms", share * 100.0)
            });
            let _ = writeln!(
                s,
                "  Server's own   p50 {}  p99 {}  p99.9 {}  ({} notifications{within}; {})",
                dur_us(server.p50_us),
                dur_us(server.p99_us),
                dur_us(server.p999_us),
                server.count,
                server.metric
            );
        }
        let per = self
            .cpu_ns_per_notification
            .map_or("n/a".to_string(), |v| format!("{v:.1} ns/notification"));
        let _ = writeln!(
            s,
            "  Tool CPU       user {:.2}s  sys {:.2}s   {}   peak RSS {}B",
            self.cpu_user_s,
            self.cpu_sys_s,
            per,
            si(self.peak_rss_bytes as f64)
        );
        if let Some(f) = &self.faults_injected {
            s.push_str(&f.summary());
        }
        if self.pass {
            let _ = writeln!(
                s,
                "  Result         PASS: every client received exactly what it should"
            );
        } else {
            let _ = writeln!(s, "  Result         FAIL: {} error(s)", self.error_count);
            for e in &self.errors {
                let _ = writeln!(s, "    {e}");
            }
            if self.error_count > self.errors.len() as u64 {
                let _ = writeln!(
                    s,
                    "    ... and {} more",
                    self.error_count - self.errors.len() as u64
                );
            }
        }
        s
    }
}

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// Describes this machine.
pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
        .or_else(|| first_line_of("uname", &["-r"]));
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel,
        rustc: first_line_of("rustc", &["--version"]),
        git_commit: first_line_of("git", &["rev-parse", "HEAD"]),
    }
}

/// CPU used by this process so far: (user, sys) seconds, peak RSS bytes.
pub fn rusage() -> (f64, f64, u64) {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return (0.0, 0.0, 0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime), ru.ru_maxrss as u64 * 1024)
}
