//! efr: a thread-per-core event forwarder speaking the Follower Maze protocol.
//!
//! The pipeline (see README.md): the [`sequencer`] reads the event source, [`protocol`] parses
//! each line, the [`resequencer`] puts events back in order, and every ordered [`batch`] goes to
//! every [`shard`] over a bounded channel. Each shard's [`router`] applies the batch to its slice
//! of the follow graph and appends notifications to its clients' output, which the [`client`]
//! tasks write out; the state a shard shares with its client tasks is in [`shard_state`] and
//! [`client_io`]. The [`acceptor`] hands each identified client to the shard that owns it.
//! [`server::run`] starts it all; [`config`] holds every limit; [`latency`] measures the server's
//! own delivery latency. efr-load, the load generator and verifier, is the crate in efr-load/
//! and shares no code with the server.
#![warn(missing_docs)]

pub mod acceptor;
pub mod auth;
pub mod batch;
pub mod channel;
pub mod client;
pub mod client_io;
pub mod cluster;
pub mod config;
pub mod doorbell;
pub mod latency;
pub mod limits;
pub mod line;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod nudge;
pub mod output_budget;
pub mod protocol;
pub mod reactor;
pub mod resequencer;
pub mod router;
pub mod sequencer;
pub mod server;
pub mod shard;
pub mod shard_state;
pub mod shared;
pub mod stats;
pub mod stop;
pub mod tls;
