//! Helpers shared by efr-load's integration tests: the reference server, an efr-sharded
//! process for `compare`, and config builders.
#![allow(dead_code)]

pub mod efr_stand_in;
pub mod refserver;

use clap::Parser;
use efr_load::LoadConfig;

/// The recorded harness arrival order (a permutation of 1..=100000).
pub const ARRIVAL_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/harness-arrival-order-100k.txt"
);

/// The command-line arguments that point efr-load at `server`, quiet, then `args`.
pub fn args(server: &refserver::RefServer, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "efr-load",
        "--event-port",
        &server.event_port.to_string(),
        "--client-port",
        &server.client_port.to_string(),
        "--progress",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// A parsed config for `server` and `args`.
pub fn config(server: &refserver::RefServer, a: &[&str]) -> LoadConfig {
    LoadConfig::try_parse_from(args(server, a)).expect("valid flags")
}
