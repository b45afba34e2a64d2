//! Command-line flags of efr-load (clap), their defaults as named constants, and the step
//! that turns them into a workload.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use super::ping::{Ping, PingParams};
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

/// Ping default round trips.
pub const PING_COUNT: u64 = 3_000;

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

/// What `efr-load --help` opens with.
pub const ABOUT: &str = "Load generator and verifier for Follower Maze servers: plays the event \
source and the user clients against any server, checks every byte every client receives, \
and measures throughput, latency and its own cost.";

/// After the flags in `efr-load --help`: the default command and the environment variables.
pub const AFTER_HELP: &str = "\
Without a command, efr-load runs `harness` with its defaults.

Environment: the harness parameters also read the original Follower Maze harness's \
variables (totalEvents, concurrencyLevel, numberOfUsers, randomSeed, \
maxEventSourceBatchSize, and timeout for --timeout); every other variable is named \
EFR_LOAD_* (shown next to its flag).

Exit status: 0 pass, 1 verification failure, 2 usage or connection error.";

/// Help heading of the options every workload shares.
pub const RUN_HEADING: &str = "Run options (every workload)";

/// Default deadline for the server to register every client (`--register-timeout-ms`), ms:
/// generous, since a loaded 2-core machine can take seconds to take 10,000 ids in.
pub const DEFAULT_REGISTER_TIMEOUT_MS: u64 = 60_000;
/// Default metric read at `--metrics-url`: clients registered so far (a counter).
pub const DEFAULT_REGISTERED_METRIC: &str = "efr_clients_registered";

/// The flags of an efr-load run (the options every workload shares) and the command.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "efr-load",
    version,
    about = ABOUT,
    long_about = None,
    after_help = AFTER_HELP,
    subcommand_value_name = "COMMAND",
    subcommand_help_heading = "Commands"
)]
pub struct LoadConfig {
    /// Server host.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value = DEFAULT_HOST)]
    pub host: String,
    /// Server event port (the source connects here).
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_EVENT_PORT)]
    pub event_port: u16,
    /// Server client port (the user clients connect here).
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_CLIENT_PORT)]
    pub client_port: u16,
    /// Client ports of several nodes: client i connects to the (i mod n)-th port. Replaces
    /// --client-port.
    #[arg(
        long,
        global = true,
        help_heading = RUN_HEADING,
        env = "EFR_LOAD_CLIENT_PORTS",
        value_delimiter = ',',
        value_name = "P1,P2,...",
        conflicts_with = "client_port"
    )]
    pub client_ports: Vec<u16>,
    /// The server's Prometheus metrics (`host:port` or `http://host:port/path`): before the
    /// source connects, wait until its registered-clients counter rose by the number of
    /// clients connected (efr-sharded: `--metrics-addr`). Without it, --settle-ms.
    #[arg(
        long,
        visible_alias = "metrics-addr",
        global = true,
        help_heading = RUN_HEADING,
        env = "EFR_LOAD_METRICS_URL",
        value_name = "URL"
    )]
    pub metrics_url: Option<String>,
    /// The counter of registered clients read at --metrics-url.
    #[arg(
        long,
        global = true,
        help_heading = RUN_HEADING,
        env = "EFR_LOAD_REGISTERED_METRIC",
        default_value = DEFAULT_REGISTERED_METRIC,
        value_name = "NAME"
    )]
    pub registered_metric: String,
    /// The server's own delivery latency histogram read at --metrics-url before and after the
    /// run (Prometheus buckets, seconds); the report shows its quantiles beside efr-load's.
    /// Servers without it get none.
    #[arg(
        long,
        global = true,
        help_heading = RUN_HEADING,
        env = "EFR_LOAD_SERVER_LATENCY_METRIC",
        default_value = crate::server_latency::DEFAULT_SERVER_LATENCY_METRIC,
        value_name = "NAME"
    )]
    pub server_latency_metric: String,
    /// Longest wait for the server to register every client (with --metrics-url), ms.
    #[arg(
        long,
        global = true,
        help_heading = RUN_HEADING,
        env = "EFR_LOAD_REGISTER_TIMEOUT_MS",
        default_value_t = DEFAULT_REGISTER_TIMEOUT_MS,
        value_name = "MS"
    )]
    pub register_timeout_ms: u64,
    /// Without --metrics-url: pause after the last client id line before the source
    /// connects, ms (the protocol acknowledges no id). Default: 100 ms plus 50 us per client.
    #[arg(long, global = true, help_heading = RUN_HEADING, value_name = "MS")]
    pub settle_ms: Option<u64>,
    /// Write every figure, the parameters and the machine to this JSON file.
    #[arg(long, global = true, help_heading = RUN_HEADING)]
    pub json: Option<PathBuf>,
    /// Paced sending at this many events per second; latency is then measured from each
    /// batch's scheduled time. Default: as fast as the server takes them (latency then
    /// includes queueing behind the source).
    #[arg(long, global = true, help_heading = RUN_HEADING, value_name = "EV/S")]
    pub rate: Option<f64>,
    /// Silence allowed while a client still expects lines, ms (env `timeout`, as the
    /// original harness).
    #[arg(long, global = true, help_heading = RUN_HEADING, env = "timeout", default_value_t = DEFAULT_TIMEOUT_MS, value_name = "MS")]
    pub timeout: u64,
    /// After every client got its last expected line: how long to wait for extra lines when
    /// the server does not close the client connections, ms.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_DRAIN_MS, value_name = "MS")]
    pub drain_ms: u64,
    /// Line ending of the event lines and the client id lines.
    #[arg(long, global = true, help_heading = RUN_HEADING, value_enum, default_value_t = LineEnding::Lf)]
    pub line_ending: LineEnding,
    /// Client reader threads (each polls its share of the clients). Default: 1 on up to 2
    /// cores, else half the cores, at most 4.
    #[arg(long, global = true, help_heading = RUN_HEADING)]
    pub readers: Option<usize>,
    /// Batches in flight before the source waits for the clients (bounds memory).
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_MAX_INFLIGHT_BATCHES)]
    pub max_inflight_batches: usize,
    /// Expected notifications not yet received before the source waits (bounds memory).
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_MAX_PENDING_NOTIFICATIONS)]
    pub max_pending_notifications: u64,
    /// Read buffer per reader thread, bytes.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_READ_BUFFER)]
    pub read_buffer: usize,
    /// Longest line accepted from the server, bytes.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_MAX_LINE)]
    pub max_line: usize,
    /// Error messages shown (all are counted).
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_MAX_ERRORS_SHOWN)]
    pub max_errors_shown: usize,
    /// Threads that connect the clients in parallel before the run.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_CONNECT_THREADS)]
    pub connect_threads: usize,
    /// Timeout of each TCP connect, ms.
    #[arg(long, global = true, help_heading = RUN_HEADING, default_value_t = DEFAULT_CONNECT_TIMEOUT_MS, value_name = "MS")]
    pub connect_timeout_ms: u64,
    /// Progress display on stderr (`bar` falls back to plain lines when stderr is not a
    /// terminal).
    #[arg(long, global = true, help_heading = RUN_HEADING, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// `--chaos` and its settings (src/chaos.rs).
    #[command(flatten)]
    pub chaos: super::chaos::ChaosArgs,
    /// TLS and client tokens (src/security.rs).
    #[command(flatten)]
    pub security: super::security::SecurityArgs,
    /// The command (default: the harness workload with its defaults and environment
    /// variables).
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,
}

/// The commands: a workload to run and verify, or a comparison, or the comparison's ceiling.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// The workloads.
    #[command(flatten)]
    Workload(WorkloadCmd),
    /// Run verified workloads against several servers (efr-sharded, peers, the built-in
    /// ceiling) and write medians, raw JSON, SVG charts and a markdown table.
    Compare(CompareArgs),
    /// The ceiling that `compare` starts: a null server that writes each client's expected
    /// stream, paced by the source's bytes, without parsing, ordering or routing.
    NullServer(NullServerArgs),
    /// The floor under `ping`: a relay that copies the event source's bytes to every client
    /// (no parsing, ordering or routing), so `efr-load ping` against it measures what loopback
    /// TCP and two thread wake-ups cost a round trip.
    Relay(RelayArgs),
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
    /// One event at a time: `n|P|1|2`, then wait until client 2 received it, repeat; the
    /// latency is the round trip through the server.
    Ping(PingArgs),
}

/// `ping` parameters.
#[derive(Args, Debug, Clone, Serialize)]
pub struct PingArgs {
    /// Round trips (events), each sent after the previous one arrived.
    #[arg(long, env = "EFR_LOAD_PING_COUNT", default_value_t = PING_COUNT)]
    pub count: u64,
    /// Wait for each notification by polling the client socket in a loop instead of sleeping
    /// in a blocking read: the tool's own wake-up leaves the round trip, at the price of one
    /// busy CPU during the run.
    #[arg(long, env = "EFR_LOAD_PING_SPIN")]
    pub spin: bool,
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
        match &self.command {
            Some(Command::Workload(w)) => w.clone(),
            _ => WorkloadCmd::Harness(HarnessOnly::parse_from(["harness"]).args),
        }
    }

    /// Sets the workload to run.
    pub fn set_workload(&mut self, workload: WorkloadCmd) {
        self.command = Some(Command::Workload(workload));
    }

    /// The client port of connection `i`: `--client-ports` round robin, else `--client-port`.
    pub fn client_port_of(&self, i: usize) -> u16 {
        if self.client_ports.is_empty() {
            self.client_port
        } else {
            self.client_ports[i % self.client_ports.len()]
        }
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
        self.security.validate()?;
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
            WorkloadCmd::Ping(_) => "ping",
        }
    }

    /// Builds the workload.
    pub fn build(&self, ending: LineEnding) -> anyhow::Result<Box<dyn Workload>> {
        let connections = match self {
            WorkloadCmd::Harness(a) => Some(a.concurrency),
            WorkloadCmd::Replay(a) => Some(a.concurrency),
            WorkloadCmd::Fanout(_) | WorkloadCmd::Ping(_) => None,
        };
        if connections == Some(0) {
            anyhow::bail!(
                "{}: --concurrency is 0 (also settable as concurrencyLevel), but verifying needs \
                 at least 1 client connection; efr-load opens that many, each a distinct user",
                self.name()
            );
        }
        Ok(match self {
            WorkloadCmd::Ping(a) => Box::new(Ping::new(PingParams { count: a.count }, ending)?),
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

/// Default runs per server and workload of `compare`.
pub const COMPARE_RUNS: usize = 3;
/// Default batches in flight of every `compare` run (see `--max-inflight-batches`).
pub const COMPARE_MAX_INFLIGHT_BATCHES: usize = 4_096;
/// Default time a server has to open its ports, ms.
pub const COMPARE_START_TIMEOUT_MS: u64 = 15_000;
/// Default time between SIGTERM and SIGKILL, ms.
pub const COMPARE_STOP_TIMEOUT_MS: u64 = 5_000;
/// Default output the ceiling precomputes ahead of the source, bytes.
pub const CEILING_LOOKAHEAD_BYTES: u64 = 1 << 30;
/// Default output directory of `compare` (a dated folder is added below it).
pub const COMPARE_OUT_ROOT: &str = "bench-results";
/// Default folder of the peer servers' binaries (`efr-go`, `fmaze-go`), relative to the
/// working directory.
pub const DEFAULT_PEERS_DIR: &str = "target/peers";

/// `efr-load compare` flags.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "efr-load compare",
    about = "Run verified workloads against several servers and the built-in ceiling, and \
             report medians, raw JSON, SVG charts and a markdown table."
)]
pub struct CompareArgs {
    /// A server: NAME='CMD', run through `sh -c`; `{event_port}`, `{client_port}` and
    /// `{metrics_port}` are replaced by free ports. With `{metrics_port}` in the command,
    /// each run waits for the server to register its clients (see --metrics-url). Repeatable.
    #[arg(long = "server", value_name = "NAME=CMD")]
    pub servers: Vec<String>,
    /// A server (by NAME) that is wrong by design (e.g. the batch resequencer): its rows are
    /// shown and checked, but their failures do not fail the comparison. Repeatable.
    #[arg(long = "expect-fail", value_name = "NAME")]
    pub expect_fail: Vec<String>,
    /// The default comparison: efr-sharded --cores 1, 2, 4, 8 (heap) and the heap, stream and
    /// batch resequencers at --cores 2 (batch expected to fail), the peers found in
    /// --peers-dir, on harness 1M and 10M, fanout to 10,000 clients, ping, and harness paced
    /// at 20,000 events/s.
    #[arg(long)]
    pub default: bool,
    /// Workloads, comma-separated: `harness:EVENTS[@RATE]` (100 clients; paced at RATE
    /// events/s when given), `fanout:CLIENTS[:EVENTS]` (100,000 users, Zipf follows) or
    /// `ping:COUNT` (one event at a time).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Runs per server and workload (the medians are reported).
    #[arg(long, default_value_t = COMPARE_RUNS)]
    pub runs: usize,
    /// Output directory. Default: bench-results/<UTC date>/. An existing one is refused
    /// unless --force.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write into an existing output directory (its files of the same names are replaced).
    #[arg(long)]
    pub force: bool,
    /// The efr-sharded binary of the default comparison. Default: next to efr-load.
    #[arg(long, env = "EFR_LOAD_EFR_SHARDED")]
    pub efr_sharded: Option<PathBuf>,
    /// Folder of the peer servers of the default comparison: `efr-go` (the original efr) and
    /// `fmaze-go` (fmaze), as built by `peers/build.sh DIR`. Missing binaries are skipped
    /// with a note.
    #[arg(long, env = "EFR_LOAD_PEERS_DIR", default_value = DEFAULT_PEERS_DIR)]
    pub peers_dir: PathBuf,
    /// The efr-load binary that runs the ceiling (`efr-load null-server`). Default: this one.
    #[arg(long)]
    pub efr_load: Option<PathBuf>,
    /// Time a server has to open its ports, ms.
    #[arg(long, default_value_t = COMPARE_START_TIMEOUT_MS, value_name = "MS")]
    pub start_timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL when stopping a server, ms.
    #[arg(long, default_value_t = COMPARE_STOP_TIMEOUT_MS, value_name = "MS")]
    pub stop_timeout_ms: u64,
    /// Silence allowed while a client still expects lines, ms.
    #[arg(long = "client-timeout-ms", alias = "timeout", default_value_t = DEFAULT_TIMEOUT_MS, value_name = "MS")]
    pub timeout: u64,
    /// Batches in flight before efr-load's source waits for the clients. Higher than a single
    /// run's default: the `batch` resequencer releases nothing before its buffer (65,536
    /// events) is full, and 1,024 harness batches (about 51,000 events) would stall it until
    /// the client timeout instead of showing its order violations.
    #[arg(long, default_value_t = COMPARE_MAX_INFLIGHT_BATCHES)]
    pub max_inflight_batches: usize,
    /// Client reader threads of efr-load (default as for a single run).
    #[arg(long)]
    pub readers: Option<usize>,
    /// Output the ceiling precomputes ahead of the source, MiB.
    #[arg(long, default_value_t = CEILING_LOOKAHEAD_BYTES >> 20, value_name = "MIB")]
    pub ceiling_lookahead_mib: u64,
    /// Progress of each run on stderr.
    #[arg(long, value_enum, default_value_t = ProgressMode::Off)]
    pub progress: ProgressMode,
    /// No line per run on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Run nothing: redraw the charts of an earlier comparison in DIR from its summary.json
    /// (after a change to the charts).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["default", "servers", "workloads"])]
    pub redraw_charts: Option<PathBuf>,
}

/// `efr-load null-server` flags: the ceiling as a process of its own, so that it has its
/// own descriptor table (10,000 clients on each side do not fit in one) and its RSS is
/// measured like any server's. `efr-load compare` starts it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "efr-load null-server",
    about = "The ceiling of efr-load compare: writes each client's expected stream, paced by \
             the source's bytes, without parsing, ordering or routing."
)]
pub struct NullServerArgs {
    /// The workload, as `efr-load compare --workloads` takes it (e.g. harness:1000000).
    #[arg(long)]
    pub workload: String,
    /// Event port to listen on, 127.0.0.1 (0: one the system picks, see --ports-file).
    #[arg(long, default_value_t = 0)]
    pub listen_event_port: u16,
    /// Client port to listen on, 127.0.0.1 (0: one the system picks, see --ports-file).
    #[arg(long, default_value_t = 0)]
    pub listen_client_port: u16,
    /// Written with `EVENT_PORT CLIENT_PORT` once both ports listen: how `compare` learns the
    /// ports the system picked, so no port is reserved, released and possibly taken by another
    /// process before the ceiling binds it.
    #[arg(long)]
    pub ports_file: Option<std::path::PathBuf>,
    /// Output precomputed ahead of the source, MiB.
    #[arg(long, default_value_t = CEILING_LOOKAHEAD_BYTES >> 20)]
    pub lookahead_mib: u64,
    /// Written with the number of the last prepared run each time one is prepared.
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
    /// Written with the ceiling's statistics (JSON) after each run.
    #[arg(long)]
    pub stats_file: Option<std::path::PathBuf>,
}

/// Default address the relay listens on.
pub const RELAY_LISTEN_HOST: &str = "127.0.0.1";

/// `efr-load relay` flags.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "efr-load relay",
    about = "The floor under ping: copies the event source's bytes to every connected client, \
             without parsing, ordering or routing. Runs until stopped."
)]
pub struct RelayArgs {
    /// Address to listen on.
    #[arg(long, env = "EFR_LOAD_RELAY_HOST", default_value = RELAY_LISTEN_HOST)]
    pub listen_host: std::net::IpAddr,
    /// Event port to listen on (0: any free port, printed on stdout).
    #[arg(long, env = "EFR_LOAD_RELAY_EVENT_PORT", default_value_t = DEFAULT_EVENT_PORT)]
    pub listen_event_port: u16,
    /// Client port to listen on (0: any free port, printed on stdout).
    #[arg(long, env = "EFR_LOAD_RELAY_CLIENT_PORT", default_value_t = DEFAULT_CLIENT_PORT)]
    pub listen_client_port: u16,
    /// Serve `efr_clients_registered` (Prometheus text) on this port, for `--metrics-url`
    /// (0: any free port, printed on stdout). Default: no metrics.
    #[arg(long, env = "EFR_LOAD_RELAY_METRICS_PORT")]
    pub listen_metrics_port: Option<u16>,
}
