//! What every executor and thread of one server shares: the validated configuration, the
//! counters, the shards' delivery latency histograms and the rate-limited fault log. A module
//! of its own so that the parts of the server (sequencer, acceptor, shards, metrics, cluster
//! roles) depend on it, not on `server.rs`, which wires them together.

use crate::config::Config;
use crate::latency::DeliveryLatency;
use crate::stats::{Counters, FaultLog};

/// What every executor shares: the configuration, the counters, the delivery latency
/// histograms, the fault log.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The counters.
    pub counters: Counters,
    /// Each shard's delivery latency histogram, indexed by shard.
    pub delivery_latency: Vec<DeliveryLatency>,
    /// Rate-limited fault logging.
    pub faults: FaultLog,
}

impl Shared {
    /// Fresh counters and histograms for a server with `config`.
    pub fn new(config: Config) -> Self {
        Shared {
            delivery_latency: (0..config.cores)
                .map(|_| DeliveryLatency::default())
                .collect(),
            config,
            counters: Counters::default(),
            faults: FaultLog::default(),
        }
    }
}
