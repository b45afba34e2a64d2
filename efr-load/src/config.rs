//! Command-line flags of efr-load (clap), their defaults as named constants, and the step
//! that turns them into a workload.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use super::workload::{
    Fanout, FanoutParams, Harness, HarnessParams, LineEnding, Replay, ReplayParams, Workload,
};

/// Default server host.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default event port.
pub const DEFAULT_EVENT_PORT: u16 = 9090;
/// Default client port.
pub const DEFAULT_CLIENT_PORT: u16 = 9099;
/// Default silence allowed while a client expects lines (the harness's `timeout`), ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 20_000;
/// Default pause between the last client id and the source's connection, ms: the protocol
/// acknowledges no id, so the server gets this long to register the clients.
pub const DEFAULT_SETTLE_MS: u64 = 100;
/// Extra settle time per connected client, microseconds: nothing in the protocol acknowledges
/// an id, so the pause must cover the server taking every id in. With 10,000 clients a flat
/// 100 ms was measured too short (`compare --default`, fanout against `efr-sharded --cores 1`:
/// clients registered after the first events and missed them).
pub const SETTLE_PER_CLIENT_US: u64 = 50;
/// Default wait, after every client got its last expected line, for an extra line or the
/// server's close of the client connections, ms. A server that closes them (PROTOCOL.md
/// section 4) ends the run at once.
pub const DEFAULT_DRAIN_MS: u64 = 1_000;
/// Default bound on batches in flight (handed to the readers and not yet fully received);
/// the source waits when it is reached. Bounds memory on runs of any length.
pub const DEFAULT_MAX_INFLIGHT_BATCHES: usize = 1_024;
/// Default bound on expected notifications not yet received (8 bytes each); the source waits
/// when it is reached. Bounds memory when one event fans out to many clients.
pub const DEFAULT_MAX_PENDING_NOTIFICATIONS: u64 = 4 << 20;
/// Default read buffer of each reader thread, bytes.
pub const DEFAULT_READ_BUFFER: usize = 256 * 1024;
/// Default longest line accepted from the server, bytes; a longer one fails the client.
pub const DEFAULT_MAX_LINE: usize = 4_096;
/// Default number of error messages shown (all are counted).
pub const DEFAULT_MAX_ERRORS_SHOWN: usize = 10;
/// Default number of threads that connect the clients in parallel.
pub const DEFAULT_CONNECT_THREADS: usize = 16;
/// Default timeout of each TCP connect, ms.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Harness defaults (the original harness's).
pub const HARNESS_TOTAL_EVENTS: u64 = 10_000_000;
/// Harness connected clients.
pub const HARNESS_CONCURRENCY: u64 = 100;
/// Harness users per connected client when `numberOfUsers` is not given.
pub const HARNESS_USERS_PER_CLIENT: u64 = 10;
/// Harness seed.
pub const HARNESS_SEED: u64 = 666;
/// Harness largest batch.
pub const HARNESS_MAX_BATCH: u64 = 100;

/// Fanout default users.
pub const FANOUT_USERS: u64 = 100_000;
/// Fanout default connected clients.
pub const FANOUT_CLIENTS: u64 = 10_000;
/// Fanout default follows per connected user.
pub const FANOUT_FOLLOWS: u64 = 20;
/// Fanout default Zipf exponent.
pub const FANOUT_ZIPF: f64 = 1.0;
/// Fanout default events after the follows.
pub const FANOUT_EVENTS: u64 = 100_000;
/// Fanout default status-update share.
pub const FANOUT_STATUS_SHARE: f64 = 0.9;
/// Fanout default broadcast share.
pub const FANOUT_BROADCAST_SHARE: f64 = 0.0001;

/// Replay default lines per write.
pub const REPLAY_BATCH_LINES: u64 = 100;
/// Replay default window: how far beyond the contiguous prefix a seq may be.
pub const REPLAY_WINDOW: u64 = 1_000_000;

/// Progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    /// Always the bar.
    Bar,
    /// Plain periodic lines.
    Plain,
    /// Nothing.
    Off,
}

/// efr-load: plays the event source and the user clients of the Follower Maze protocol
/// against any server, checks every byte every client receives, and measures.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "efr-load", version, about, long_about = None)]
pub struct LoadConfig {
    /// Server host.
    #[arg(long, global = true, default_value = DEFAULT_HOST)]
    pub host: String,
    /// Server event port (the source connects here).
    #[arg(long, global = true, default_value_t = DEFAULT_EVENT_PORT)]
    pub event_port: u16,
    /// Server client port (the user clients connect here).
    #[arg(long, global = true, default_value_t = DEFAULT_CLIENT_PORT)]
    pub client_port: u16,
    /// Write every figure, the parameters and the machine to this JSON file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Paced sending at this many events per second; latency is then measured from each
    /// batch's scheduled time. Default: as fast as the server takes them.
    #[arg(long, global = true, value_name = "EV/S")]
    pub rate: Option<f64>,
    /// Silence allowed while a client still expects lines, ms (env `timeout`, as the
    /// original harness).
    #[arg(long, global = true, env = "timeout", default_value_t = DEFAULT_TIMEOUT_MS, value_name = "MS")]
    pub timeout: u64,
    /// Pause after the last client id line before the source connects, ms. Default: 100 ms
    /// plus 50 us per client (600 ms for 10,000 clients).
    #[arg(long, global = true, value_name = "MS")]
    pub settle_ms: Option<u64>,
    /// After every client got its last expected line: how long to wait for extra lines when
    /// the server does not close the client connections, ms.
    #[arg(long, global = true, default_value_t = DEFAULT_DRAIN_MS, value_name = "MS")]
    pub drain_ms: u64,
    /// Line ending of the event lines and the client id lines.
    #[arg(long, global = true, value_enum, default_value_t = LineEnding::Lf)]
    pub line_ending: LineEnding,
    /// Client reader threads (each polls its share of the clients). Default: 1 on up to 2
    /// cores, else half the cores, at most 4.
    #[arg(long, global = true)]
    pub readers: Option<usize>,
    /// Batches in flight before the source waits for the clients (bounds memory).
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_INFLIGHT_BATCHES)]
    pub max_inflight_batches: usize,
    /// Expected notifications not yet received before the source waits (bounds memory).
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_PENDING_NOTIFICATIONS)]
    pub max_pending_notifications: u64,
    /// Read buffer per reader thread, bytes.
    #[arg(long, global = true, default_value_t = DEFAULT_READ_BUFFER)]
    pub read_buffer: usize,
    /// Longest line accepted from the server, bytes.
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_LINE)]
    pub max_line: usize,
    /// Error messages shown (all are counted).
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_ERRORS_SHOWN)]
    pub max_errors_shown: usize,
    /// Threads that connect the clients in parallel before the run.
    #[arg(long, global = true, default_value_t = DEFAULT_CONNECT_THREADS)]
    pub connect_threads: usize,
    /// Timeout of each TCP connect, ms.
    #[arg(long, global = true, default_value_t = DEFAULT_CONNECT_TIMEOUT_MS, value_name = "MS")]
    pub connect_timeout_ms: u64,
    /// Progress display on stderr.
    #[arg(long, global = true, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// `--chaos` and its settings (src/chaos.rs).
    #[command(flatten)]
    pub chaos: super::chaos::ChaosArgs,
    /// The workload (default: harness with its defaults and environment variables).
    #[command(subcommand)]
    pub workload: Option<WorkloadCmd>,
}

/// The workloads.
#[derive(Subcommand, Debug, Clone, Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum WorkloadCmd {
    /// The original Follower Maze harness: F, U, P 15% each, S 54.99%, B 0.01%, uniform
    /// users, contiguous batches of 1..=max events, each shuffled.
    Harness(HarnessArgs),
    /// Social feed with heavy-tailed popularity: each connected user follows users drawn
    /// from a Zipf law, then a stream dominated by status updates of popular users.
    Fanout(FanoutArgs),
    /// The harness events written in a recorded arrival order: the n-th seq of the file is
    /// paired with the n-th harness event.
    Replay(ReplayArgs),
}

/// `harness` parameters; each also read from the original harness's environment variable.
#[derive(Args, Debug, Clone, Serialize)]
pub struct HarnessArgs {
    /// Number of events.
    #[arg(long, env = "totalEvents", default_value_t = HARNESS_TOTAL_EVENTS)]
    pub total_events: u64,
    /// Connected clients, each a distinct user.
    #[arg(long, env = "concurrencyLevel", default_value_t = HARNESS_CONCURRENCY)]
    pub concurrency: u64,
    /// Users (default: 10 x concurrency).
    #[arg(long, env = "numberOfUsers")]
    pub users: Option<u64>,
    /// Random seed.
    #[arg(long, env = "randomSeed", default_value_t = HARNESS_SEED)]
    pub seed: u64,
    /// Largest batch of events written at once.
    #[arg(long, env = "maxEventSourceBatchSize", default_value_t = HARNESS_MAX_BATCH)]
    pub max_batch: u64,
}

/// `fanout` parameters.
#[derive(Args, Debug, Clone, Serialize)]
pub struct FanoutArgs {
    /// Users; user r has popularity rank r.
    #[arg(long, default_value_t = FANOUT_USERS)]
    pub users: u64,
    /// Connected clients (distinct users drawn uniformly).
    #[arg(long, default_value_t = FANOUT_CLIENTS)]
    pub clients: u64,
    /// Follows made by each connected user before the stream (distinct Zipf-drawn users).
    #[arg(long, default_value_t = FANOUT_FOLLOWS)]
    pub follows: u64,
    /// Zipf exponent of popularity (0 = uniform).
    #[arg(long, default_value_t = FANOUT_ZIPF)]
    pub zipf: f64,
    /// Events after the follows.
    #[arg(long, default_value_t = FANOUT_EVENTS)]
    pub events: u64,
    /// Share of status updates among those events (the rest: B, then F, U, P evenly).
    #[arg(long, default_value_t = FANOUT_STATUS_SHARE)]
    pub status_share: f64,
    /// Share of broadcasts among those events.
    #[arg(long, default_value_t = FANOUT_BROADCAST_SHARE)]
    pub broadcast_share: f64,
    /// Random seed.
    #[arg(long, default_value_t = HARNESS_SEED)]
    pub seed: u64,
    /// Largest batch of events written at once.
    #[arg(long, default_value_t = HARNESS_MAX_BATCH)]
    pub max_batch: u64,
}

/// `replay` parameters.
#[derive(Args, Debug, Clone, Serialize)]
pub struct ReplayArgs {
    /// File of seqs, one a line, e.g. tests/data/harness-arrival-order-100k.txt.
    pub file: PathBuf,
    /// Use only the first N lines (seqs never written are holes, skipped at the end as the
    /// server does at source close).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Lines of the file per write.
    #[arg(long, default_value_t = REPLAY_BATCH_LINES)]
    pub batch_lines: u64,
    /// Connected clients, each a distinct user.
    #[arg(long, env = "concurrencyLevel", default_value_t = HARNESS_CONCURRENCY)]
    pub concurrency: u64,
    /// Users (default: 10 x concurrency).
    #[arg(long, env = "numberOfUsers")]
    pub users: Option<u64>,
    /// Random seed of the harness events.
    #[arg(long, env = "randomSeed", default_value_t = HARNESS_SEED)]
    pub seed: u64,
    /// How far beyond the contiguous prefix of written seqs a seq may be.
    #[arg(long, default_value_t = REPLAY_WINDOW)]
    pub window: u64,
}

/// Parses only the harness's flags/env: the default workload.
#[derive(Parser, Debug)]
struct HarnessOnly {
    #[command(flatten)]
    args: HarnessArgs,
}

impl LoadConfig {
    /// The workload command, the default harness when none was given.
    pub fn workload_cmd(&self) -> WorkloadCmd {
        self.workload
            .clone()
            .unwrap_or_else(|| WorkloadCmd::Harness(HarnessOnly::parse_from(["harness"]).args))
    }

    /// Reader threads to use.
    pub fn reader_threads(&self, clients: usize) -> usize {
        let n = self.readers.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            if cores <= 2 {
                1
            } else {
                (cores / 2).min(4)
            }
        });
        n.clamp(1, clients.max(1))
    }

    /// Checks the global settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.read_buffer >= 1024,
            "--read-buffer must be at least 1024"
        );
        anyhow::ensure!(self.max_line >= 16, "--max-line must be at least 16");
        anyhow::ensure!(
            self.max_inflight_batches >= 1,
            "--max-inflight-batches must be >= 1"
        );
        if let Some(r) = self.rate {
            anyhow::ensure!(r.is_finite() && r > 0.0, "--rate must be a positive number");
        }
        self.chaos.validate()?;
        Ok(())
    }
}

impl WorkloadCmd {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadCmd::Harness(_) => "harness",
            WorkloadCmd::Fanout(_) => "fanout",
            WorkloadCmd::Replay(_) => "replay",
        }
    }

    /// Builds the workload.
    pub fn build(&self, ending: LineEnding) -> anyhow::Result<Box<dyn Workload>> {
        Ok(match self {
            WorkloadCmd::Harness(a) => Box::new(Harness::new(
                HarnessParams {
                    total_events: a.total_events,
                    concurrency: a.concurrency,
                    users: a.users.unwrap_or(HARNESS_USERS_PER_CLIENT * a.concurrency),
                    seed: a.seed,
                    max_batch: a.max_batch,
                },
                ending,
            )?),
            WorkloadCmd::Fanout(a) => Box::new(Fanout::new(
                FanoutParams {
                    users: a.users,
                    clients: a.clients,
                    follows: a.follows,
                    zipf: a.zipf,
                    events: a.events,
                    status_share: a.status_share,
                    broadcast_share: a.broadcast_share,
                    seed: a.seed,
                    max_batch: a.max_batch,
                },
                ending,
            )?),
            WorkloadCmd::Replay(a) => {
                let file = std::fs::File::open(&a.file)
                    .with_context(|| format!("opening {}", a.file.display()))?;
                Box::new(Replay::new(
                    std::io::BufReader::new(file),
                    ReplayParams {
                        concurrency: a.concurrency,
                        users: a.users.unwrap_or(HARNESS_USERS_PER_CLIENT * a.concurrency),
                        seed: a.seed,
                        batch_lines: a.batch_lines,
                        limit: a.limit,
                        window: a.window,
                    },
                    ending,
                )?)
            }
        })
    }
}

/// The pause before the source connects: `--settle-ms`, or the default for `clients` clients.
pub fn settle_ms(flag: Option<u64>, clients: u64) -> u64 {
    flag.unwrap_or(DEFAULT_SETTLE_MS + clients * SETTLE_PER_CLIENT_US / 1000)
}
