//! efr: a thread-per-core event forwarder speaking the Follower Maze protocol.
#![warn(missing_docs)]
