//! What every executor and thread of one server shares: the validated configuration, the
//! counters and the rate-limited fault log. A module of its own so that the parts of the
//! server (sequencer, acceptor, shards, metrics, cluster roles) depend on it, not on `server.rs`,
//! which wires them together.

use crate::config::Config;
use crate::stats::{Counters, FaultLog};

/// What every executor shares: the configuration, the counters, the fault log.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The counters.
    pub counters: Counters,
    /// Rate-limited fault logging.
    pub faults: FaultLog,
}
