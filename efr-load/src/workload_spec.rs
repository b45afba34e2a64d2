//! The workload specs of `efr-load compare` and `efr-load null-server`: one short string per
//! workload (`harness:1000000`, `harness:200000@20000`, `fanout:10000:20000`, `ping:3000`)
//! turned into the workload command and its pace.

use anyhow::Context;
use serde::Serialize;

use super::config::{
    FanoutArgs, HarnessArgs, PingArgs, WorkloadCmd, FANOUT_BROADCAST_SHARE, FANOUT_FOLLOWS,
    FANOUT_STATUS_SHARE, FANOUT_USERS, FANOUT_ZIPF, HARNESS_CONCURRENCY, HARNESS_MAX_BATCH,
    HARNESS_SEED,
};

/// Events of a `fanout` spec without an event count.
pub const DEFAULT_FANOUT_EVENTS: u64 = 20_000;

/// A workload to run.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadSpec {
    /// Short label, e.g. `harness-1000000` or `harness-200000-at-20000`.
    pub label: String,
    /// The spec as given.
    pub spec: String,
    /// The workload.
    pub cmd: WorkloadCmd,
    /// Paced sending, events per second (`@RATE`); `None`: as fast as the server takes them.
    pub rate: Option<f64>,
}

impl WorkloadSpec {
    /// True when latency includes queueing behind an unpaced source (not ping, no rate).
    pub fn unpaced(&self) -> bool {
        self.rate.is_none() && !matches!(self.cmd, WorkloadCmd::Ping(_))
    }

    /// The number of client connections of the workload.
    pub fn clients(&self) -> u64 {
        match &self.cmd {
            WorkloadCmd::Harness(a) => a.concurrency,
            WorkloadCmd::Replay(a) => a.concurrency,
            WorkloadCmd::Fanout(a) => a.clients,
            WorkloadCmd::Ping(_) => 1,
        }
    }

    /// How the latency of this workload is measured, for tables and charts.
    pub fn latency_kind(&self) -> String {
        match (&self.cmd, self.rate) {
            (WorkloadCmd::Ping(_), _) => "round trip, one event at a time".into(),
            (_, Some(r)) => format!("paced at {r:.0} events/s"),
            _ => "unpaced: includes queueing behind the source".into(),
        }
    }
}

/// Parses a workload spec.
pub fn parse_workload(spec: &str) -> anyhow::Result<WorkloadSpec> {
    let (body, rate) = match spec.split_once('@') {
        Some((b, r)) => {
            let rate: f64 = r
                .replace('_', "")
                .parse()
                .with_context(|| format!("bad rate {r:?} in workload {spec:?}"))?;
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "workload {spec:?}: the rate must be a positive number of events/s"
            );
            (b, Some(rate))
        }
        None => (spec, None),
    };
    let parts: Vec<&str> = body.split(':').collect();
    let num = |s: &str| -> anyhow::Result<u64> {
        s.replace('_', "")
            .parse()
            .with_context(|| format!("bad number {s:?} in workload {spec:?}"))
    };
    let (label, cmd) = match parts.as_slice() {
        ["harness", n] => {
            let total_events = num(n)?;
            (
                format!("harness-{total_events}"),
                WorkloadCmd::Harness(HarnessArgs {
                    total_events,
                    concurrency: HARNESS_CONCURRENCY,
                    users: None,
                    seed: HARNESS_SEED,
                    max_batch: HARNESS_MAX_BATCH,
                }),
            )
        }
        ["fanout", c] | ["fanout", c, _] => {
            let clients = num(c)?;
            let events = match parts.get(2) {
                Some(e) => num(e)?,
                None => DEFAULT_FANOUT_EVENTS,
            };
            (
                format!("fanout-{clients}c-{events}"),
                WorkloadCmd::Fanout(FanoutArgs {
                    users: FANOUT_USERS.max(clients),
                    clients,
                    follows: FANOUT_FOLLOWS,
                    zipf: FANOUT_ZIPF,
                    events,
                    status_share: FANOUT_STATUS_SHARE,
                    broadcast_share: FANOUT_BROADCAST_SHARE,
                    seed: HARNESS_SEED,
                    max_batch: HARNESS_MAX_BATCH,
                }),
            )
        }
        ["ping", n] => {
            let count = num(n)?;
            (
                format!("ping-{count}"),
                WorkloadCmd::Ping(PingArgs { count, spin: false }),
            )
        }
        _ => anyhow::bail!(
            "workload {spec:?}: expected harness:EVENTS[@RATE], fanout:CLIENTS[:EVENTS][@RATE] \
             or ping:COUNT[@RATE]"
        ),
    };
    let label = match rate {
        Some(r) => format!("{label}-at-{r:.0}"),
        None => label,
    };
    Ok(WorkloadSpec {
        label,
        spec: spec.to_string(),
        cmd,
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let w = parse_workload("harness:1_000").unwrap();
        assert_eq!((w.label.as_str(), w.rate), ("harness-1000", None));
        assert!(w.unpaced());
        let w = parse_workload("fanout:50:200").unwrap();
        assert_eq!(w.label, "fanout-50c-200");
        let w = parse_workload("harness:200000@20000").unwrap();
        assert_eq!(
            (w.label.as_str(), w.rate),
            ("harness-200000-at-20000", Some(20_000.0))
        );
        assert!(!w.unpaced());
        let w = parse_workload("ping:3000").unwrap();
        assert_eq!(w.label, "ping-3000");
        assert!(!w.unpaced() && w.latency_kind().contains("round trip"));
        for bad in ["bogus:1", "harness:1@0", "harness:1@x", "ping"] {
            assert!(parse_workload(bad).is_err(), "{bad}");
        }
    }
}
