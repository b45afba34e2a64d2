//! The server's own delivery latency, for servers that publish one: a Prometheus histogram at
//! `--metrics-url` (efr-sharded: `efr_delivery_latency_seconds`, from the source read that
//! released an event to the end of the client write that carried it). efr-load reads it just
//! before the source writes its first event and again after the last client is done; the
//! difference is this run's, and its quantiles go in the report beside efr-load's own
//! end-to-end latency. It covers the one node at `--metrics-url`: with `--client-ports` over
//! several nodes, only that node's clients. The gap
//! between the two is the part outside the server: the tool's pacing and verification, the
//! kernel's delivery, and the scheduling of both on the same machine.
//!
//! Quantiles are interpolated linearly inside a bucket, so they are as coarse as the server's
//! buckets; the share within 1 ms is exact when 1 ms is a bucket bound (it is in efr-sharded).

use serde::{Deserialize, Serialize};

use super::registration::MetricsEndpoint;

/// Default histogram read at `--metrics-url` for the server's own latency.
pub const DEFAULT_SERVER_LATENCY_METRIC: &str = "efr_delivery_latency_seconds";

/// After the run, how long efr-load waits for the histogram to count every notification its
/// clients received (a server may record a write just after its bytes arrived, and a loaded
/// machine may delay that), ms. Costs nothing when the counts already agree.
pub const SERVER_LATENCY_SETTLE_MS: u64 = 5_000;

/// One reading of a Prometheus histogram: cumulative counts at increasing upper bounds
/// (seconds), the last one `+Inf`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    bounds_s: Vec<f64>,
    cumulative: Vec<u64>,
}

impl Histogram {
    /// The `<metric>_bucket{le="..."}` samples of `metric` in a Prometheus text page, in page
    /// order; `None` when the page has none or they are not cumulative with a `+Inf` last.
    pub fn parse(page: &str, metric: &str) -> Option<Histogram> {
        let prefix = format!("{metric}_bucket{{");
        let mut histogram = Histogram::default();
        for line in page.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let (labels, value) = rest.split_once("} ")?;
            let le = labels
                .split(',')
                .find_map(|label| label.trim().strip_prefix("le="))?
                .trim_matches('"');
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = value.split_whitespace().next()?.parse::<f64>().ok()? as u64;
            if histogram.bounds_s.last().is_some_and(|&last| last >= bound)
                || histogram
                    .cumulative
                    .last()
                    .is_some_and(|&last| last > count)
            {
                return None;
            }
            histogram.bounds_s.push(bound);
            histogram.cumulative.push(count);
        }
        (histogram.bounds_s.last() == Some(&f64::INFINITY)).then_some(histogram)
    }

    /// Notifications counted.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// What was counted since `earlier` (a reading of the same histogram); `None` when the
    /// buckets differ or a count went down (the server restarted).
    pub fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        if self.bounds_s != earlier.bounds_s {
            return None;
        }
        let mut cumulative = Vec::with_capacity(self.cumulative.len());
        for (now, before) in self.cumulative.iter().zip(&earlier.cumulative) {
            cumulative.push(now.checked_sub(*before)?);
        }
        Some(Histogram {
            bounds_s: self.bounds_s.clone(),
            cumulative,
        })
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket (the lower bound
    /// of the `+Inf` bucket when it falls there).
    pub fn quantile_s(&self, q: f64) -> f64 {
        let target = q * self.count() as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for (&bound, &count) in self.bounds_s.iter().zip(&self.cumulative) {
            if count as f64 >= target && count > below {
                if bound.is_infinite() {
                    return lower;
                }
                let share = (target - below as f64) / (count - below) as f64;
                return lower + (bound - lower) * share.clamp(0.0, 1.0);
            }
            lower = bound;
            below = count;
        }
        lower
    }

    /// The share counted at or under `bound_s`, when it is one of the bucket bounds.
    pub fn share_within(&self, bound_s: f64) -> Option<f64> {
        let index = self
            .bounds_s
            .iter()
            .position(|&b| (b - bound_s).abs() <= bound_s * 1e-9)?;
        (self.count() > 0).then(|| self.cumulative[index] as f64 / self.count() as f64)
    }
}

/// The server's own latency over one run, as reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerLatency {
    /// The histogram read.
    pub metric: String,
    /// Notifications it counted during the run.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Share of notifications delivered within 1 ms (when 1 ms is a bucket bound).
    pub within_1ms: Option<f64>,
}

impl ServerLatency {
    /// The report of what a histogram counted during a run; `None` when it counted nothing
    /// (no quantile to give).
    pub fn of(metric: &str, run: &Histogram) -> Option<ServerLatency> {
        if run.count() == 0 {
            return None;
        }
        Some(ServerLatency {
            metric: metric.to_string(),
            count: run.count(),
            p50_us: run.quantile_s(0.5) * 1e6,
            p99_us: run.quantile_s(0.99) * 1e6,
            p999_us: run.quantile_s(0.999) * 1e6,
            within_1ms: run.share_within(0.001),
        })
    }
}

/// Reads `metric` at `endpoint`: `None` when the page cannot be read or has no such histogram
/// (the server does not publish one; the report then has no server latency).
pub fn read(endpoint: &MetricsEndpoint, metric: &str) -> Option<Histogram> {
    Histogram::parse(&endpoint.fetch().ok()?, metric)
}

/// Before the first event: the histogram at `endpoint` (`None` without `--metrics-url`, or
/// when the server publishes none).
pub fn before_run(endpoint: Option<&MetricsEndpoint>, metric: &str) -> Option<Histogram> {
    read(endpoint?, metric)
}

/// After the run: reads the histogram until it counted at least `notifications` more than
/// `before` (or [`SERVER_LATENCY_SETTLE_MS`] passed; a failed read is tried again until then),
/// and reports the run's part. `None` when it could not be read, the server restarted, or it
/// counted nothing.
pub fn after_run(
    endpoint: Option<&MetricsEndpoint>,
    metric: &str,
    before: Option<&Histogram>,
    notifications: u64,
) -> Option<ServerLatency> {
    let (endpoint, before) = (endpoint?, before?);
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(SERVER_LATENCY_SETTLE_MS);
    let mut last = None;
    loop {
        if let Some(now) = read(endpoint, metric) {
            let run = now.since(before)?;
            if run.count() >= notifications {
                return ServerLatency::of(metric, &run);
            }
            last = Some(run);
        }
        if std::time::Instant::now() >= deadline {
            return ServerLatency::of(metric, &last?);
        }
        std::thread::sleep(super::registration::REGISTRATION_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP efr_delivery_latency_seconds x\n\
        # TYPE efr_delivery_latency_seconds histogram\n\
        efr_delivery_latency_seconds_bucket{le=\"0.0005\"} 10\n\
        efr_delivery_latency_seconds_bucket{le=\"0.001\"} 90\n\
        efr_delivery_latency_seconds_bucket{le=\"0.002\"} 99\n\
        efr_delivery_latency_seconds_bucket{le=\"+Inf\"} 100\n\
        efr_delivery_latency_seconds_sum 0.1\n\
        efr_delivery_latency_seconds_count 100\n\
        efr_notifications 100\n";

    #[test]
    fn a_histogram_is_read_from_the_page_and_its_quantiles_interpolated() {
        let h = Histogram::parse(PAGE, DEFAULT_SERVER_LATENCY_METRIC).unwrap();
        assert_eq!(h.count(), 100);
        // 50th of 100: inside (0.5 ms, 1 ms], 40 of its 80.
        assert!((h.quantile_s(0.5) - 0.00075).abs() < 1e-12);
        // 99th: the last of (1 ms, 2 ms].
        assert!((h.quantile_s(0.99) - 0.002).abs() < 1e-12);
        // 99.9th: in +Inf, reported at its lower bound.
        assert!((h.quantile_s(0.999) - 0.002).abs() < 1e-12);
        assert_eq!(h.share_within(0.001), Some(0.9));
        assert_eq!(h.share_within(0.003), None);
        assert_eq!(Histogram::parse(PAGE, "other"), None);
        // Not cumulative, or no +Inf: refused.
        assert_eq!(
            Histogram::parse("m_bucket{le=\"1\"} 5\nm_bucket{le=\"+Inf\"} 4\n", "m"),
            None
        );
        assert_eq!(Histogram::parse("m_bucket{le=\"1\"} 5\n", "m"), None);
    }

    #[test]
    fn a_run_is_the_difference_of_two_readings() {
        let before = Histogram::parse(PAGE, DEFAULT_SERVER_LATENCY_METRIC).unwrap();
        let after = Histogram::parse(
            &PAGE
                .replace("} 90\n", "} 189\n")
                .replace("} 99\n", "} 199\n")
                .replace("} 100\n", "} 200\n"),
            DEFAULT_SERVER_LATENCY_METRIC,
        )
        .unwrap();
        let run = after.since(&before).unwrap();
        // The run's 100: 99 in (0.5 ms, 1 ms], 1 in (1 ms, 2 ms].
        assert_eq!(run.count(), 100);
        let report = ServerLatency::of(DEFAULT_SERVER_LATENCY_METRIC, &run).unwrap();
        assert_eq!(report.within_1ms, Some(0.99));
        let p50_us = 500.0 + 500.0 * 50.0 / 99.0;
        assert!((report.p50_us - p50_us).abs() < 1e-6, "{report:?}");
        // A restarted server (counts went down) gives no run; a run that counted nothing, no
        // report.
        assert_eq!(before.since(&after), None);
        let nothing = before.since(&before).unwrap();
        assert_eq!(nothing.count(), 0);
        assert_eq!(
            ServerLatency::of(DEFAULT_SERVER_LATENCY_METRIC, &nothing),
            None
        );
    }
}
