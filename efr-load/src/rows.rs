//! The rows of `efr-load compare`: one per server and workload, with its runs, medians and
//! verdict. Shared by the comparison that fills them and the charts that draw them.

use serde::{Deserialize, Serialize};

use super::ceiling::CeilingStats;
use super::report::Report;

/// Name of the ceiling row.
pub const CEILING_NAME: &str = "ceiling";

/// One run's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunOutcome {
    /// 1-based run number.
    pub run: usize,
    /// The report, when the run could be made.
    pub report: Option<Report>,
    /// Why the run could not be made.
    pub error: Option<String>,
    /// The raw JSON file, relative to the output directory.
    pub json: Option<String>,
}

/// One row: a server on a workload, medians over its runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Workload label.
    pub workload: String,
    /// Server name.
    pub server: String,
    /// The command (ports substituted), or `built-in` for the ceiling.
    pub command: String,
    /// Every run passed verification.
    pub pass: bool,
    /// Runs that passed.
    pub runs_passed: usize,
    /// Runs made.
    pub runs: usize,
    /// Median events/s over the runs that produced a report.
    pub events_per_s: Option<f64>,
    /// Median notifications/s.
    pub notifications_per_s: Option<f64>,
    /// Median notifications per run.
    pub notifications: Option<u64>,
    /// Median wall time, s.
    pub wall_s: Option<f64>,
    /// Median p50 latency, us.
    pub p50_us: Option<f64>,
    /// Median p99 latency, us.
    pub p99_us: Option<f64>,
    /// Median p99.9 latency, us.
    pub p999_us: Option<f64>,
    /// Median p99 of the server's own delivery latency (its histogram at --metrics-url), us;
    /// absent for servers that publish none.
    #[serde(default)]
    pub server_p99_us: Option<f64>,
    /// Peak RSS of the server's process group (sum of each process's VmHWM), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Notifications/s as a share of the ceiling's on the same workload.
    pub ratio_to_ceiling: Option<f64>,
    /// Verification errors over all runs (efr-load counts at most one per client).
    pub error_count: u64,
    /// The server's own order-violation counter from its log (efr-sharded), all runs.
    pub server_order_violations: Option<u64>,
    /// The first error messages.
    pub errors: Vec<String>,
    /// What the ceiling precomputed (ceiling rows only).
    pub ceiling: Option<CeilingStats>,
    /// Every run.
    pub run_outcomes: Vec<RunOutcome>,
    /// The server's log, relative to the output directory.
    pub log: Option<String>,
    /// Why the server is wrong by design, when it is (its failures are expected).
    #[serde(default)]
    pub expect_fail: Option<String>,
    /// Why the server cannot run this workload, when it cannot (no run was made).
    #[serde(default)]
    pub skipped: Option<String>,
}

/// How a row turned out, against what it was designed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every run passed.
    Pass,
    /// A run failed or could not be made.
    Fail,
    /// A server that is wrong by design failed, as expected.
    ExpectedFail,
    /// A server that is wrong by design passed: this workload does not trip it.
    KnownWrongPassed,
    /// The server cannot run this workload (the reason is in `skipped`).
    Skipped,
}

impl Row {
    /// The row's verdict.
    pub fn verdict(&self) -> Verdict {
        match (
            self.skipped.is_some(),
            self.expect_fail.is_some(),
            self.pass,
        ) {
            (true, _, _) => Verdict::Skipped,
            (false, false, true) => Verdict::Pass,
            (false, false, false) => Verdict::Fail,
            (false, true, false) => Verdict::ExpectedFail,
            (false, true, true) => Verdict::KnownWrongPassed,
        }
    }

    /// True unless the row failed when it should have passed.
    pub fn as_designed(&self) -> bool {
        self.verdict() != Verdict::Fail
    }
}
