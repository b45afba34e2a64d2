//! efr: a thread-per-core event forwarder speaking the Follower Maze protocol.
#![warn(missing_docs)]

/// efr-load: the load generator and verifier (independent of the server's code).
pub mod load;
