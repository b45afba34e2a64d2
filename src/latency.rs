//! Delivery latency as the server sees it: from the source read that released an event (on an
//! edge node, from the moment it took the stream message) to the end of the client write that
//! carried its notification, one histogram per shard, exported on the metrics page as
//! `efr_delivery_latency_seconds`.
//!
//! What it counts: each client write records `now - the release time of the oldest
//! notification in it`, weighted by the number of notifications the write carried. So every
//! notification is counted once, with at least its own latency (never less): a write that
//! carries notifications of several batches counts all of them at the oldest one's age. Time
//! spent waiting for a slow client to accept bytes is part of it; the time an event waited in
//! the resequencer for an earlier seq is not (it was not released yet), nor is anything before
//! the server read it.
//!
//! This is what separates the server's part of an end-to-end figure from the load tool's: a
//! load generator on the same machine measures from its own send schedule to its own read, so
//! its pacing, its readers and the kernel's scheduling of both are in its number; here only
//! the server's are.
//!
//! Every batch is stamped (source reads, gap timeouts, the batch released at source close, an
//! edge's stream messages), so every notification written is counted exactly once.
//!
//! Cost: one clock read per source read and one per client write, two plain load/store pairs
//! on memory only the shard's own thread writes, and per notification one add to a counter in
//! its client's slot.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the histogram's buckets, ns (Prometheus `le`); a last bucket takes the
/// rest. A 1-2-5 series from 10 µs to 10 s, so "within 1 ms" is a bucket boundary.
pub const BUCKET_BOUNDS_NS: [u64; 19] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];

const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// The metric's name on the metrics page.
pub const METRIC: &str = "efr_delivery_latency_seconds";

/// The clock of every latency stamp: `CLOCK_MONOTONIC`, ns. 0 is never returned, so a stamp of
/// 0 means "not stamped".
#[inline]
pub fn now_ns() -> u64 {
    crate::stop::monotonic_ns().max(1)
}

/// One shard's delivery latency histogram. Written only by its shard's thread (so a plain
/// load and store update it, no locked instruction), read by the metrics page; aligned so that
/// two shards' histograms never share a cache line. The count is the buckets' total, so a
/// scrape never sees `_count` disagree with the `+Inf` bucket.
#[derive(Debug)]
#[repr(align(128))]
pub struct DeliveryLatency {
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the latencies, µs (rounded per write): at 30 M notifications a second of 1 ms
    /// each it wraps after about 19 years.
    sum_us: AtomicU64,
}

impl Default for DeliveryLatency {
    fn default() -> Self {
        DeliveryLatency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

/// Adds to a counter that only the calling thread writes.
#[inline]
fn add_single_writer(counter: &AtomicU64, amount: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(amount),
        Ordering::Relaxed,
    );
}

impl DeliveryLatency {
    /// Records `notifications` notifications written `latency_ns` after their release. Only
    /// the shard's own thread may call it.
    #[inline]
    pub fn record(&self, latency_ns: u64, notifications: u64) {
        if notifications == 0 {
            return;
        }
        let bucket = BUCKET_BOUNDS_NS.partition_point(|&bound| bound < latency_ns);
        add_single_writer(&self.buckets[bucket], notifications);
        let latency_us = latency_ns.saturating_add(500) / 1_000;
        add_single_writer(&self.sum_us, latency_us.wrapping_mul(notifications));
    }

    /// Records a write that ended at `now_ns` and carried `notifications` notifications, the
    /// oldest released at `released_ns` (0: not stamped, nothing is recorded).
    #[inline]
    pub fn record_write(&self, released_ns: u64, now_ns: u64, notifications: u64) {
        if released_ns != 0 {
            self.record(now_ns.saturating_sub(released_ns), notifications);
        }
    }
}

/// Appends the summed histogram of every shard to the metrics page, in the Prometheus text
/// format (cumulative buckets, `_sum` in seconds, `_count`).
pub fn render(page: &mut String, shards: &[DeliveryLatency]) {
    let mut buckets = [0u64; BUCKETS];
    let mut sum_us = 0u64;
    for shard in shards {
        for (total, bucket) in buckets.iter_mut().zip(&shard.buckets) {
            *total = total.wrapping_add(bucket.load(Ordering::Relaxed));
        }
        sum_us = sum_us.wrapping_add(shard.sum_us.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        page,
        "# HELP {METRIC} From the source read that released an event to the end of the client \
         write that carried its notification (one sample per notification; a write counts all \
         its notifications at its oldest one's age)."
    );
    let _ = writeln!(page, "# TYPE {METRIC} histogram");
    let mut cumulative = 0u64;
    for (bound, bucket) in BUCKET_BOUNDS_NS.iter().zip(&buckets) {
        cumulative = cumulative.wrapping_add(*bucket);
        let _ = writeln!(
            page,
            "{METRIC}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e9
        );
    }
    cumulative = cumulative.wrapping_add(buckets[BUCKETS - 1]);
    let _ = writeln!(page, "{METRIC}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(page, "{METRIC}_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(page, "{METRIC}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(shards: &[DeliveryLatency]) -> Vec<String> {
        let mut page = String::new();
        render(&mut page, shards);
        page.lines()
            .filter(|line| !line.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_write_counts_each_of_its_notifications_in_the_bucket_of_its_age() {
        let shards = [DeliveryLatency::default(), DeliveryLatency::default()];
        // 3 notifications 1 ms old (exactly on a bound: "le" includes it), 2 of 1.5 ms on the
        // other shard, 1 of 20 s (past the last bound), and an unstamped write (ignored).
        shards[0].record_write(5_000_000, 6_000_000, 3);
        shards[1].record_write(5_000_000, 6_500_000, 2);
        shards[1].record_write(1, 20_000_000_001, 1);
        shards[1].record_write(0, 6_000_000, 7);
        let lines = page(&shards);
        let value = |key: &str| -> String {
            lines
                .iter()
                .find_map(|line| line.strip_prefix(key).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {key} in {lines:?}"))
        };
        assert_eq!(
            value("efr_delivery_latency_seconds_bucket{le=\"0.0005\"}"),
            "0"
        );
        assert_eq!(
            value("efr_delivery_latency_seconds_bucket{le=\"0.001\"}"),
            "3"
        );
        assert_eq!(
            value("efr_delivery_latency_seconds_bucket{le=\"0.002\"}"),
            "5"
        );
        assert_eq!(value("efr_delivery_latency_seconds_bucket{le=\"10\"}"), "5");
        assert_eq!(
            value("efr_delivery_latency_seconds_bucket{le=\"+Inf\"}"),
            "6"
        );
        assert_eq!(value("efr_delivery_latency_seconds_count"), "6");
        assert_eq!(value("efr_delivery_latency_seconds_sum"), "20.006");
        assert_eq!(lines.len(), BUCKET_BOUNDS_NS.len() + 3);
    }

    #[test]
    fn the_clock_moves_forward_and_is_never_zero() {
        let first = now_ns();
        let second = now_ns();
        assert!(first > 0 && second >= first);
    }
}
