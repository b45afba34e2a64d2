//! Command-line flags and the validated server configuration.
//!
//! Every limit of the server is a named constant here, mirrored by a flag (each flag can also be
//! set through an `EFR_` environment variable). [`Args`] is what clap parses; [`Config`] is what
//! the server runs with, checked once by [`Args::into_config`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::auth::{Cidr, ClientAuth, JwtVerifier};
use crate::resequencer::ResequencerKind;
use crate::stop::StopRequest;
use crate::tls::{TlsConfigs, TlsPaths};

/// Default TCP port of the event source.
pub const DEFAULT_EVENT_PORT: u16 = 9090;
/// Default TCP port of the user clients.
pub const DEFAULT_CLIENT_PORT: u16 = 9099;
/// Default resequencer window (`heap`, `stream`) or buffer size (`batch`), in events. An event
/// further than this beyond the next expected seq is rejected and counted.
pub const DEFAULT_RESEQUENCER_CAPACITY: u64 = 65_536;
/// Largest accepted `--resequencer-capacity`: the window is preallocated as a ring.
pub const MAX_RESEQUENCER_CAPACITY: u64 = 1 << 22;
/// Longest event or id line in bytes (terminator excluded); longer lines are skipped and counted.
pub const DEFAULT_MAX_LINE: usize = 4096;
/// A client that has not sent its id line within this time is closed and counted.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// A client whose unsent output exceeds this many bytes is closed and counted (one slow reader
/// never makes anyone else wait).
pub const DEFAULT_MAX_CLIENT_BACKLOG: usize = 32 * 1024 * 1024;
/// Identified clients beyond this many are closed at once and counted.
pub const DEFAULT_MAX_CLIENTS: usize = 16_384;
/// Connections that have not sent their id line yet, at most. When the pool is full the oldest
/// pending handshake is closed to make room, so idle connections can never keep an identifying
/// client out.
pub const DEFAULT_MAX_HANDSHAKES: usize = 4_096;
/// A full handshake pool closes only a connection that has waited at least this long and has
/// no unread byte in its socket: a burst of clients that send their id right after connecting
/// is never closed to make room for itself, while idle connections still go.
pub const DEFAULT_HANDSHAKE_EVICT_GRACE_MS: u64 = 250;
/// Upper bound of the default `--max-output-memory` (the default is a quarter of the physical
/// memory, at most this).
pub const MAX_DEFAULT_OUTPUT_MEMORY: u64 = 4 << 30;
/// Default when the physical memory cannot be read.
pub const FALLBACK_OUTPUT_MEMORY: u64 = 1 << 30;
/// A client that accepts no byte for this long while output waits for it is closed and counted.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Bytes a client may send after its id line per second (read and discarded). Beyond it the
/// server stops reading that client until the next slice of the budget, and TCP pushes back
/// on it: a client that keeps sending costs its shard a bounded share.
pub const DEFAULT_MAX_CLIENT_INPUT_RATE: u64 = 256 * 1024;
/// Bytes the reorder window may hold in waiting events; events that would go over it are
/// dropped and counted like events beyond the window.
pub const DEFAULT_RESEQUENCER_MAX_BYTES: u64 = 256 << 20;
/// Metrics connections open at once; more are closed at once and counted.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 16;
/// A metrics request must arrive whole within this time, however slowly its bytes trickle.
pub const DEFAULT_METRICS_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// On SIGINT/SIGTERM, pending output is written for at most this long before exit.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Ordered batches in flight from the sequencer to one shard; when full, the sequencer stops
/// reading the source and TCP pushes back.
pub const DEFAULT_SHARD_QUEUE_DEPTH: usize = 64;
/// io_uring registered memory per executor. A network server needs little of it, and the
/// locked-memory limit (often 8 MiB) must cover every executor.
pub const DEFAULT_IO_MEMORY_KIB: usize = 128;
/// Upper bound for `--cores`.
pub const MAX_CORES: usize = 256;
/// While the server is busy, every executor is nudged (one byte on a socket its nudge task
/// reads) this often, so that an executor glommio parked with runnable tasks resumes within
/// this time (see `nudge.rs`). An idle server is never nudged. 0 turns nudging off.
pub const DEFAULT_STALL_NUDGE_MS: u64 = 10;
/// Nudge rounds the server goes on nudging after the last sign of work (a send to a shard, an
/// applied batch, a batch in flight, a client write in progress) before it counts as idle and
/// the nudging thread sleeps without a timer: 20 rounds of 10 ms, so a park that begins as the
/// last batch is applied is still ended.
pub const STALL_NUDGE_LINGER_ROUNDS: u32 = 20;
/// NATS server a cluster node (`--role ingest|edge`) connects to.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// JetStream stream of a cluster; its subject is `<stream>.ev`.
pub const DEFAULT_NATS_STREAM: &str = "EFR";
/// Largest payload of one stream message (whole event lines) the ingest publishes.
pub const DEFAULT_NATS_MESSAGE_BYTES: usize = 64 * 1024;
/// The ingest publishes a partly filled message after this many microseconds. Measured at
/// 20,000 events/s through 1 ingest + 3 edges (bench-results/cluster.md): 1 ms gave a p50 of
/// 2.6-2.7 ms, 200 us 1.7-1.8 ms; under load the size limit fills messages long before.
pub const DEFAULT_NATS_FLUSH_US: u64 = 200;
/// Messages the ingest publishes before it waits for the oldest acknowledgement.
pub const DEFAULT_NATS_PUBLISH_IN_FLIGHT: usize = 256;
/// Messages an edge asks for in one pull (a pull is also bounded in bytes by this times
/// `--nats-message-bytes`).
pub const DEFAULT_NATS_PULL_MESSAGES: usize = 64;
/// How long a cluster node waits for NATS at start before it gives up.
pub const DEFAULT_NATS_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// An edge holding the snapshot lock writes a follow-graph snapshot this often (seconds; 0:
/// never by time).
pub const DEFAULT_SNAPSHOT_INTERVAL_S: u64 = 60;
/// ... or after this many events since the last snapshot, whichever comes first (0: never by
/// count).
pub const DEFAULT_SNAPSHOT_EVENTS: u64 = 5_000_000;
/// The snapshot lock expires this many seconds after its holder last refreshed it; another
/// edge then takes it over.
pub const DEFAULT_SNAPSHOT_LOCK_TTL_S: u64 = 10;
/// How far (seconds) an edge may fall behind the newest snapshot and still catch up from the
/// stream; the stream keeps 3 snapshot intervals plus this.
pub const DEFAULT_NATS_ALLOWED_LAG_S: u64 = 60;
/// Largest size of the stream in bytes before its oldest messages are discarded (0: no limit
/// but the age).
pub const DEFAULT_NATS_MAX_BYTES: u64 = 0;

/// What a process does: everything (one machine), or one role of a NATS JetStream cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Source, ordering, shards and clients in one process; no NATS (default).
    All,
    /// Owns the event source: parses, puts events in order, publishes ordered batches.
    Ingest,
    /// Consumes the ordered batches and serves user clients.
    Edge,
}

/// Which resequencer orders the events (PROTOCOL.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ResequencerArg {
    /// Batched binary heap: release the contiguous run after each read (default).
    Heap,
    /// Ordered map: release the contiguous run after each insert (the original efr's).
    Stream,
    /// Fixed buffer sorted when full (the original efr's; wrong when disorder crosses buffers).
    Batch,
}

impl From<ResequencerArg> for ResequencerKind {
    fn from(arg: ResequencerArg) -> Self {
        match arg {
            ResequencerArg::Heap => ResequencerKind::Heap,
            ResequencerArg::Stream => ResequencerKind::Stream,
            ResequencerArg::Batch => ResequencerKind::Batch,
        }
    }
}

/// efr-sharded: forwards an unordered event stream, in sequence order, to the user clients
/// it concerns, on N thread-per-core executors.
#[derive(Debug, Parser)]
#[command(name = "efr-sharded", version)]
pub struct Args {
    /// Number of executors (one shard each). More than the CPU count is allowed: the
    /// executors are then left unpinned and share the CPUs. Default: the CPU count.
    #[arg(long, env = "EFR_CORES")]
    pub cores: Option<usize>,
    /// TCP port the event source connects to.
    #[arg(long, env = "EFR_EVENT_PORT", default_value_t = DEFAULT_EVENT_PORT)]
    pub event_port: u16,
    /// TCP port the user clients connect to.
    #[arg(long, env = "EFR_CLIENT_PORT", default_value_t = DEFAULT_CLIENT_PORT)]
    pub client_port: u16,
    /// Address both listeners bind to.
    #[arg(long, env = "EFR_BIND", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind: IpAddr,
    /// How events are put back in order: heap (default), stream or batch.
    #[arg(long, env = "EFR_RESEQUENCER", value_enum, default_value_t = ResequencerArg::Heap)]
    pub resequencer: ResequencerArg,
    /// Window of the heap and stream resequencers (events beyond it are rejected), or the
    /// buffer size of the batch resequencer, in events.
    #[arg(long, env = "EFR_RESEQUENCER_CAPACITY", default_value_t = DEFAULT_RESEQUENCER_CAPACITY)]
    pub resequencer_capacity: u64,
    /// The first expected seq of a session is this plus one.
    #[arg(long, env = "EFR_SEQUENCE_INDEX", default_value_t = 0)]
    pub sequence_index: u64,
    /// Longest event or client id line in bytes; longer lines are skipped and counted.
    #[arg(long, env = "EFR_MAX_LINE", default_value_t = DEFAULT_MAX_LINE)]
    pub max_line: usize,
    /// Milliseconds a new client has to send its id line before it is closed.
    #[arg(long, env = "EFR_HANDSHAKE_TIMEOUT_MS", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    pub handshake_timeout_ms: u64,
    /// Bytes of unsent output after which a client that does not read is closed.
    #[arg(long, env = "EFR_MAX_CLIENT_BACKLOG", default_value_t = DEFAULT_MAX_CLIENT_BACKLOG)]
    pub max_client_backlog: usize,
    /// Most identified clients at once; further ones are closed at once.
    #[arg(long, env = "EFR_MAX_CLIENTS", default_value_t = DEFAULT_MAX_CLIENTS)]
    pub max_clients: usize,
    /// Most connections waiting for their id line; when full, the oldest silent one is closed.
    #[arg(long, env = "EFR_MAX_HANDSHAKES", default_value_t = DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Milliseconds a connection without an id line is safe from being closed to make room in a
    /// full handshake pool (and it is never closed while bytes wait unread in its socket).
    #[arg(long, env = "EFR_HANDSHAKE_EVICT_GRACE_MS", default_value_t = DEFAULT_HANDSHAKE_EVICT_GRACE_MS)]
    pub handshake_evict_grace_ms: u64,
    /// Pending output of all clients together (bytes, or with a KiB/MiB/GiB suffix); over it
    /// the clients with the largest backlog are closed. Default: a quarter of the physical
    /// memory, at most 4 GiB.
    #[arg(long, env = "EFR_MAX_OUTPUT_MEMORY", value_parser = parse_bytes)]
    pub max_output_memory: Option<u64>,
    /// Milliseconds a client may accept no byte while output waits for it before it is closed.
    #[arg(long, env = "EFR_WRITE_TIMEOUT_MS", default_value_t = DEFAULT_WRITE_TIMEOUT_MS)]
    pub write_timeout_ms: u64,
    /// Bytes per second read (and discarded) from a client after its id line; beyond it the
    /// server stops reading that client for a while and TCP pushes back.
    #[arg(long, env = "EFR_MAX_CLIENT_INPUT_RATE", value_parser = parse_bytes, default_value_t = DEFAULT_MAX_CLIENT_INPUT_RATE)]
    pub max_client_input_rate: u64,
    /// Bytes of waiting events the reorder window may hold (or a KiB/MiB/GiB suffix); events
    /// over it are dropped like events beyond the window.
    #[arg(long, env = "EFR_RESEQUENCER_MAX_BYTES", value_parser = parse_bytes, default_value_t = DEFAULT_RESEQUENCER_MAX_BYTES)]
    pub resequencer_max_bytes: u64,
    /// Metrics connections open at once; more are closed at once.
    #[arg(long, env = "EFR_METRICS_MAX_CONNECTIONS", default_value_t = DEFAULT_METRICS_MAX_CONNECTIONS)]
    pub metrics_max_connections: usize,
    /// Milliseconds a metrics request has to arrive whole.
    #[arg(long, env = "EFR_METRICS_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_METRICS_REQUEST_TIMEOUT_MS)]
    pub metrics_request_timeout_ms: u64,
    /// Skip a hole in the sequence after this many milliseconds with later events waiting
    /// (off when absent: holes wait for the source to close).
    #[arg(long, env = "EFR_GAP_TIMEOUT_MS")]
    pub gap_timeout_ms: Option<u64>,
    /// Milliseconds pending output is written for after SIGINT/SIGTERM before exit.
    #[arg(long, env = "EFR_SHUTDOWN_TIMEOUT_MS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS)]
    pub shutdown_timeout_ms: u64,
    /// Ordered batches queued towards one shard before the sequencer stops reading.
    #[arg(long, env = "EFR_SHARD_QUEUE_DEPTH", default_value_t = DEFAULT_SHARD_QUEUE_DEPTH)]
    pub shard_queue_depth: usize,
    /// KiB of io_uring registered memory per executor.
    #[arg(long, env = "EFR_IO_MEMORY_KIB", default_value_t = DEFAULT_IO_MEMORY_KIB)]
    pub io_memory_kib: usize,
    /// Log the counters every this many seconds (off when absent).
    #[arg(long, env = "EFR_STATS_INTERVAL")]
    pub stats_interval: Option<u64>,
    /// Milliseconds between nudges of every executor while the server is busy: an executor
    /// parked with runnable tasks resumes within this time. Never while idle; 0 turns it off.
    #[arg(long, env = "EFR_STALL_NUDGE_MS", default_value_t = DEFAULT_STALL_NUDGE_MS)]
    pub stall_nudge_ms: u64,
    /// Serve the counters in the Prometheus text format over HTTP on this address
    /// (e.g. 127.0.0.1:9100; off when absent).
    #[arg(long, env = "EFR_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// File holding the HS256 secret that signs client tokens (at least 32 bytes; a trailing
    /// line end is not part of it). With it, a client's id line is `ID TOKEN`: a JWT whose
    /// `sub` is the id and whose `exp` is in the future. Off when absent.
    #[arg(
        long,
        env = "EFR_CLIENT_JWT_KEY",
        conflicts_with = "client_jwt_public_key"
    )]
    pub client_jwt_key: Option<std::path::PathBuf>,
    /// PEM file with the RSA (RS256) or P-256 EC (ES256) public key that verifies client
    /// tokens; the id line is then `ID TOKEN` as with --client-jwt-key. Off when absent.
    #[arg(long, env = "EFR_CLIENT_JWT_PUBLIC_KEY")]
    pub client_jwt_public_key: Option<std::path::PathBuf>,
    /// Networks an event source may connect from, comma-separated (`10.0.0.0/8,::1`); a
    /// source from elsewhere is closed at once. Any address when absent.
    #[arg(long, env = "EFR_SOURCE_ALLOW", value_delimiter = ',')]
    pub source_allow: Vec<Cidr>,
    /// Close an event source that sends nothing for this many milliseconds, ending its
    /// session as a close does, so an idle connection cannot hold the one source slot. Off
    /// when absent (the original protocol allows an idle source).
    #[arg(long, env = "EFR_SOURCE_IDLE_TIMEOUT_MS")]
    pub source_idle_timeout_ms: Option<u64>,
    /// PEM certificate chain: with --tls-key, both ports speak TLS only (the handshake counts
    /// against --handshake-timeout-ms). SIGHUP re-reads the files. Off when absent.
    #[arg(long, env = "EFR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EFR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates: the event source must present a client certificate signed by one
    /// of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "EFR_SOURCE_CLIENT_CA", requires = "tls_cert")]
    pub source_client_ca: Option<std::path::PathBuf>,
    /// all (default: one process, no NATS), ingest (event source, publishes to NATS) or edge
    /// (consumes from NATS, serves clients).
    #[arg(long, env = "EFR_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// NATS server of a cluster node.
    #[arg(long, env = "EFR_NATS", default_value = DEFAULT_NATS_URL)]
    pub nats: String,
    /// JetStream stream of the cluster (subject `<name>.ev`).
    #[arg(long, env = "EFR_NATS_STREAM", default_value = DEFAULT_NATS_STREAM)]
    pub nats_stream: String,
    /// Ingest: a source that reconnects (or an ingest that restarts) goes on from the last
    /// published event instead of resetting; events sent again are dropped.
    #[arg(long, env = "EFR_RESUME")]
    pub resume: bool,
    /// Ingest: largest payload of one published message, in bytes.
    #[arg(long, env = "EFR_NATS_MESSAGE_BYTES", default_value_t = DEFAULT_NATS_MESSAGE_BYTES)]
    pub nats_message_bytes: usize,
    /// Ingest: microseconds after which a partly filled message is published.
    #[arg(long, env = "EFR_NATS_FLUSH_US", default_value_t = DEFAULT_NATS_FLUSH_US)]
    pub nats_flush_us: u64,
    /// Ingest: messages published before waiting for the oldest acknowledgement.
    #[arg(long, env = "EFR_NATS_PUBLISH_IN_FLIGHT", default_value_t = DEFAULT_NATS_PUBLISH_IN_FLIGHT)]
    pub nats_publish_in_flight: usize,
    /// Edge: messages asked for in one pull.
    #[arg(long, env = "EFR_NATS_PULL_MESSAGES", default_value_t = DEFAULT_NATS_PULL_MESSAGES)]
    pub nats_pull_messages: usize,
    /// Milliseconds a cluster node waits for NATS at start.
    #[arg(long, env = "EFR_NATS_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_NATS_CONNECT_TIMEOUT_MS)]
    pub nats_connect_timeout_ms: u64,
    /// Edge: seconds between follow-graph snapshots written by the edge holding the snapshot
    /// lock (0: never by time).
    #[arg(long, env = "EFR_SNAPSHOT_INTERVAL_S", default_value_t = DEFAULT_SNAPSHOT_INTERVAL_S)]
    pub snapshot_interval_s: u64,
    /// Edge: events after which a snapshot is written early (0: never by count).
    #[arg(long, env = "EFR_SNAPSHOT_EVENTS", default_value_t = DEFAULT_SNAPSHOT_EVENTS)]
    pub snapshot_events: u64,
    /// Edge: seconds the snapshot lock outlives its holder's last refresh.
    #[arg(long, env = "EFR_SNAPSHOT_LOCK_TTL_S", default_value_t = DEFAULT_SNAPSHOT_LOCK_TTL_S)]
    pub snapshot_lock_ttl_s: u64,
    /// Seconds an edge may lag behind the newest snapshot; the stream keeps messages for 3
    /// snapshot intervals plus this (when the stream is created).
    #[arg(long, env = "EFR_NATS_ALLOWED_LAG_S", default_value_t = DEFAULT_NATS_ALLOWED_LAG_S)]
    pub nats_allowed_lag_s: u64,
    /// Largest size of the stream in bytes, oldest messages discarded first (0: age only).
    #[arg(long, env = "EFR_NATS_MAX_BYTES", default_value_t = DEFAULT_NATS_MAX_BYTES)]
    pub nats_max_bytes: u64,
}

/// Why a configuration was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of executors and shards.
    pub cores: usize,
    /// Address and port of the event listener (port 0: ephemeral).
    pub event_addr: std::net::SocketAddr,
    /// Address and port of the client listener (port 0: ephemeral).
    pub client_addr: std::net::SocketAddr,
    /// The resequencer kind.
    pub resequencer: ResequencerKind,
    /// Window or buffer size of the resequencer.
    pub resequencer_capacity: u64,
    /// First expected seq minus one.
    pub sequence_index: u64,
    /// Longest line.
    pub max_line: usize,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Per-client unsent output limit.
    pub max_client_backlog: usize,
    /// Identified client limit.
    pub max_clients: usize,
    /// Pending handshake limit (the oldest silent one is closed to make room).
    pub max_handshakes: usize,
    /// Youngest pending handshake that may be closed to make room.
    pub handshake_evict_grace: Duration,
    /// Server-wide pending output budget, bytes.
    pub max_output_memory: u64,
    /// Write deadline: no byte accepted for this long closes the client (`None`: off).
    pub write_timeout: Option<Duration>,
    /// Bytes per second read from a client after its id line.
    pub max_client_input_rate: u64,
    /// Bytes of waiting events the resequencer may hold.
    pub resequencer_max_bytes: u64,
    /// Metrics connections at once.
    pub metrics_max_connections: usize,
    /// Whole-request deadline of the metrics endpoint.
    pub metrics_request_timeout: Duration,
    /// Hole-skipping deadline, if any.
    pub gap_timeout: Option<Duration>,
    /// Drain deadline at shutdown.
    pub shutdown_timeout: Duration,
    /// Batches queued per shard.
    pub shard_queue_depth: usize,
    /// io_uring memory per executor, bytes.
    pub io_memory: usize,
    /// Period of the stats log line, if any.
    pub stats_interval: Option<Duration>,
    /// Period of the stall nudges while busy (`None`: off).
    pub stall_nudge: Option<Duration>,
    /// Address of the Prometheus metrics endpoint, if any (port 0: ephemeral).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How clients identify: a bare id, or an id and a token.
    pub client_auth: ClientAuth,
    /// Networks event sources may connect from (any when empty).
    pub source_allow: Vec<Cidr>,
    /// An event source silent for this long is closed, if set.
    pub source_idle_timeout: Option<Duration>,
    /// TLS on both ports, if on.
    pub tls: Option<Arc<TlsConfigs>>,
    /// What this process does.
    pub role: Role,
    /// NATS settings of a cluster node (unused with `Role::All`).
    pub nats: NatsConfig,
    /// Set to true to stop the server (SIGINT/SIGTERM or a test's handle).
    pub shutdown: Arc<AtomicBool>,
    /// The same flag, with the moment it was raised (the shutdown deadline counts from it).
    pub stop: StopRequest,
}

/// NATS settings of a cluster node.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Ingest: resume sessions from the stream instead of resetting.
    pub resume: bool,
    /// Ingest: largest message payload.
    pub message_bytes: usize,
    /// Ingest: flush interval of a partly filled message.
    pub flush_interval: Duration,
    /// Ingest: unacknowledged messages at most.
    pub publish_in_flight: usize,
    /// Edge: messages per pull.
    pub pull_messages: usize,
    /// Connection deadline at start.
    pub connect_timeout: Duration,
    /// Edge: time between snapshots (None: never by time).
    pub snapshot_interval: Option<Duration>,
    /// Edge: events between snapshots (None: never by count).
    pub snapshot_events: Option<u64>,
    /// Edge: lifetime of the snapshot lock after its last refresh.
    pub snapshot_lock_ttl: Duration,
    /// How far an edge may lag behind the newest snapshot.
    pub allowed_lag: Duration,
    /// Stream size limit in bytes (None: age only).
    pub max_bytes: Option<u64>,
}

impl NatsConfig {
    /// How long the stream keeps a message: 3 snapshot intervals plus the allowed lag, so an
    /// edge restarting from the newest snapshot finds every message after it (None: for ever,
    /// when snapshots are not written by time).
    pub fn retention(&self) -> Option<Duration> {
        self.snapshot_interval
            .map(|interval| interval * 3 + self.allowed_lag)
    }
}

impl Default for Config {
    fn default() -> Self {
        Args::parse_from(["efr-sharded"])
            .into_config()
            .expect("the defaults are valid")
    }
}

impl Config {
    /// The defaults, with both listeners on ephemeral loopback ports (for tests).
    pub fn ephemeral(cores: usize) -> Self {
        let loopback = std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            cores,
            event_addr: loopback,
            client_addr: loopback,
            ..Config::default()
        }
    }

    /// The first seq a session expects.
    pub fn first_seq(&self) -> u64 {
        self.sequence_index + 1
    }
}

/// The machine's CPU count (1 when it cannot be read).
pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The default `--max-output-memory`: a quarter of the physical memory, at most
/// [`MAX_DEFAULT_OUTPUT_MEMORY`].
pub fn default_output_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page_size <= 0 {
        return FALLBACK_OUTPUT_MEMORY;
    }
    ((pages as u64).saturating_mul(page_size as u64) / 4).min(MAX_DEFAULT_OUTPUT_MEMORY)
}

/// A byte count: a plain number, or one with a binary suffix (`KiB`, `MiB`, `GiB`; `K`, `M`,
/// `G` and `KB`, `MB`, `GB` mean the same).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("not a byte count: {text:?}"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("unknown unit in {text:?} (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("byte count too large: {text:?}"))
}

impl Args {
    /// Checks the flags and turns them into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let cores = self.cores.unwrap_or_else(cpu_count);
        if cores == 0 || cores > MAX_CORES {
            return Err(ConfigError(format!(
                "--cores must be 1..={MAX_CORES}, not {cores}"
            )));
        }
        if self.resequencer_capacity == 0 || self.resequencer_capacity > MAX_RESEQUENCER_CAPACITY {
            return Err(ConfigError(format!(
                "--resequencer-capacity must be 1..={MAX_RESEQUENCER_CAPACITY}"
            )));
        }
        if self.sequence_index == u64::MAX {
            return Err(ConfigError(
                "--sequence-index must be below u64::MAX".into(),
            ));
        }
        if self.max_line < 16 {
            return Err(ConfigError("--max-line must be at least 16".into()));
        }
        if self.handshake_timeout_ms == 0 {
            return Err(ConfigError(
                "--handshake-timeout-ms must be positive".into(),
            ));
        }
        if self.shard_queue_depth == 0 {
            return Err(ConfigError("--shard-queue-depth must be positive".into()));
        }
        if self.max_clients == 0 {
            return Err(ConfigError("--max-clients must be positive".into()));
        }
        if self.max_handshakes == 0 {
            return Err(ConfigError("--max-handshakes must be positive".into()));
        }
        if self.max_output_memory == Some(0) {
            return Err(ConfigError("--max-output-memory must be positive".into()));
        }
        if self.max_client_input_rate == 0 {
            return Err(ConfigError(
                "--max-client-input-rate must be positive".into(),
            ));
        }
        if self.resequencer_max_bytes == 0 {
            return Err(ConfigError(
                "--resequencer-max-bytes must be positive".into(),
            ));
        }
        if self.metrics_max_connections == 0 || self.metrics_request_timeout_ms == 0 {
            return Err(ConfigError(
                "--metrics-max-connections and --metrics-request-timeout-ms must be positive"
                    .into(),
            ));
        }
        if self.gap_timeout_ms == Some(0) {
            return Err(ConfigError("--gap-timeout-ms must be positive".into()));
        }
        if self.source_idle_timeout_ms == Some(0) {
            return Err(ConfigError(
                "--source-idle-timeout-ms must be positive".into(),
            ));
        }
        let client_auth = match (&self.client_jwt_key, &self.client_jwt_public_key) {
            (Some(secret), _) => JwtVerifier::hmac_file(secret)
                .map_err(|error| ConfigError(format!("--client-jwt-key: {error}")))?
                .into(),
            (None, Some(public)) => JwtVerifier::public_key_file(public)
                .map_err(|error| ConfigError(format!("--client-jwt-public-key: {error}")))?
                .into(),
            (None, None) => ClientAuth::Open,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                TlsConfigs::load(TlsPaths {
                    cert,
                    key,
                    source_client_ca: self.source_client_ca,
                })
                .map_err(|error| ConfigError(format!("TLS: {error}")))?,
            )),
            _ => None,
        };
        if self.nats_message_bytes < 1024 || self.nats_message_bytes > 8 * 1024 * 1024 {
            return Err(ConfigError(
                "--nats-message-bytes must be 1024..=8388608".into(),
            ));
        }
        if self.nats_flush_us == 0
            || self.nats_publish_in_flight == 0
            || self.nats_pull_messages == 0
            || self.nats_connect_timeout_ms == 0
        {
            return Err(ConfigError(
                "--nats-flush-us, --nats-publish-in-flight, --nats-pull-messages and --nats-connect-timeout-ms must be positive".into(),
            ));
        }
        if self.snapshot_lock_ttl_s == 0 {
            return Err(ConfigError("--snapshot-lock-ttl-s must be positive".into()));
        }
        if self.nats_stream.is_empty()
            || !self
                .nats_stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError(
                "--nats-stream must be letters, digits, '-' or '_'".into(),
            ));
        }
        if self.stats_interval == Some(0) {
            return Err(ConfigError("--stats-interval must be positive".into()));
        }
        let shutdown = Arc::new(AtomicBool::new(false));
        Ok(Config {
            cores,
            event_addr: std::net::SocketAddr::new(self.bind, self.event_port),
            client_addr: std::net::SocketAddr::new(self.bind, self.client_port),
            resequencer: self.resequencer.into(),
            resequencer_capacity: self.resequencer_capacity,
            sequence_index: self.sequence_index,
            max_line: self.max_line,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            max_client_backlog: self.max_client_backlog,
            max_clients: self.max_clients,
            max_handshakes: self.max_handshakes,
            handshake_evict_grace: Duration::from_millis(self.handshake_evict_grace_ms),
            max_output_memory: self.max_output_memory.unwrap_or_else(default_output_memory),
            write_timeout: (self.write_timeout_ms > 0)
                .then(|| Duration::from_millis(self.write_timeout_ms)),
            max_client_input_rate: self.max_client_input_rate,
            resequencer_max_bytes: self.resequencer_max_bytes,
            metrics_max_connections: self.metrics_max_connections,
            metrics_request_timeout: Duration::from_millis(self.metrics_request_timeout_ms),
            gap_timeout: self.gap_timeout_ms.map(Duration::from_millis),
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
            shard_queue_depth: self.shard_queue_depth,
            io_memory: self.io_memory_kib * 1024,
            stats_interval: self.stats_interval.map(Duration::from_secs),
            stall_nudge: (self.stall_nudge_ms > 0)
                .then(|| Duration::from_millis(self.stall_nudge_ms)),
            metrics_addr: self.metrics_addr,
            client_auth,
            source_allow: self.source_allow,
            source_idle_timeout: self.source_idle_timeout_ms.map(Duration::from_millis),
            tls,
            role: self.role,
            nats: NatsConfig {
                url: self.nats,
                stream: self.nats_stream,
                resume: self.resume,
                message_bytes: self.nats_message_bytes,
                flush_interval: Duration::from_micros(self.nats_flush_us),
                publish_in_flight: self.nats_publish_in_flight,
                pull_messages: self.nats_pull_messages,
                connect_timeout: Duration::from_millis(self.nats_connect_timeout_ms),
                snapshot_interval: (self.snapshot_interval_s > 0)
                    .then(|| Duration::from_secs(self.snapshot_interval_s)),
                snapshot_events: (self.snapshot_events > 0).then_some(self.snapshot_events),
                snapshot_lock_ttl: Duration::from_secs(self.snapshot_lock_ttl_s),
                allowed_lag: Duration::from_secs(self.nats_allowed_lag_s),
                max_bytes: (self.nats_max_bytes > 0).then_some(self.nats_max_bytes),
            },
            shutdown: shutdown.clone(),
            stop: StopRequest::new(shutdown),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let config = Config::default();
        assert_eq!(config.event_addr.port(), 9090);
        assert_eq!(config.client_addr.port(), 9099);
        assert_eq!(config.first_seq(), 1);
        assert_eq!(config.max_line, 4096);
        assert_eq!(config.max_client_backlog, 32 * 1024 * 1024);
        assert_eq!(config.handshake_timeout, Duration::from_secs(5));
        assert_eq!(config.resequencer, ResequencerKind::Heap);
        assert!(config.gap_timeout.is_none());
        assert_eq!(config.max_handshakes, 4096);
        assert_eq!(config.write_timeout, Some(Duration::from_secs(10)));
        assert!(config.max_output_memory > 0 && config.max_output_memory <= 4 << 30);
        assert_eq!(config.resequencer_max_bytes, 256 << 20);
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn flags_are_parsed_and_checked() {
        let config = Args::parse_from([
            "efr-sharded",
            "--cores",
            "8",
            "--resequencer",
            "stream",
            "--sequence-index",
            "10",
            "--gap-timeout-ms",
            "250",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.cores, 8);
        assert_eq!(config.resequencer, ResequencerKind::Stream);
        assert_eq!(config.first_seq(), 11);
        assert_eq!(config.gap_timeout, Some(Duration::from_millis(250)));
        for bad in [
            &["efr-sharded", "--cores", "0"][..],
            &["efr-sharded", "--resequencer-capacity", "0"],
            &["efr-sharded", "--gap-timeout-ms", "0"],
        ] {
            assert!(Args::parse_from(bad).into_config().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_flags_are_parsed_and_checked() {
        let config = Config::default();
        assert_eq!(config.role, Role::All);
        assert_eq!(config.nats.url, DEFAULT_NATS_URL);
        assert!(!config.nats.resume);
        let config = Args::parse_from([
            "efr-sharded",
            "--role",
            "ingest",
            "--nats",
            "nats://10.0.0.1:4222",
            "--nats-stream",
            "feed_1",
            "--resume",
            "--nats-flush-us",
            "200",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.role, Role::Ingest);
        assert_eq!(config.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(config.nats.stream, "feed_1");
        assert!(config.nats.resume);
        assert_eq!(config.nats.flush_interval, Duration::from_micros(200));
        for bad in [
            &["efr-sharded", "--nats-stream", "a.b"][..],
            &["efr-sharded", "--nats-message-bytes", "10"],
            &["efr-sharded", "--nats-pull-messages", "0"],
        ] {
            assert!(Args::parse_from(bad).into_config().is_err(), "{bad:?}");
        }
    }
}
