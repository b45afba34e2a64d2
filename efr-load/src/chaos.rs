//! `--chaos`: faults injected around a normal verified run, none of which may make a verified
//! client fail (PROTOCOL.md section 6).
//!
//! Two independent parts, both deterministic given `--chaos-seed` (the timing of the clients
//! is not, since it depends on the server):
//!
//! - **Malformed source lines** ([`ChaosWorkload`]): wraps any workload and inserts, between
//!   real event lines of a write, lines the server must drop without consuming a real seq:
//!   empty lines, lines whose seq does not parse, lines longer than the server's line limit,
//!   and duplicates (same seq, different content) of an event already written. Only the wire
//!   bytes change; the batch's model and event count stay as they are, so the verification
//!   is the workload's. A valid seq is only ever one that was already written.
//! - **Chaos clients** ([`ChaosClients`]): extra client connections on their own thread whose
//!   ids are not verified client ids. Each one, at random, connects, waits, identifies, reads,
//!   stalls (stops reading so its server-side backlog grows), disconnects (sometimes before
//!   identifying, sometimes with a write shutdown first) and reconnects, until the run ends.
//!   Their bytes are counted, not checked.
//!
//! Chaos ids are either users of the workload that no verified client uses (`unverified`, the
//! default: they get follows, private messages and status updates, so a stall builds a real
//! backlog) or ids above every workload user (`above`: broadcasts only). Neither changes what
//! a verified client must receive: a client's notifications depend on the follow graph and on
//! its own id, never on who else is connected.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::rng::Rng;
use super::workload::{push_u64, Batch, LineEnding, Workload};

/// Default number of chaos client connections.
pub const CHAOS_CLIENTS: usize = 20;
/// Default mean number of real events between two injected source faults.
pub const CHAOS_MALFORMED_EVERY: u64 = 1_000;
/// Default length of an overlong injected line, bytes (the server's default limit is 4096).
pub const CHAOS_LONG_LINE: usize = 5_000;
/// Default seed of the chaos random streams.
pub const CHAOS_SEED: u64 = 5;
/// Default longest stall of a chaos client (no reads), ms.
pub const CHAOS_STALL_MAX_MS: u64 = 3_000;
/// Longest read phase of a chaos client, ms.
pub const CHAOS_READ_MAX_MS: u64 = 1_000;
/// Longest wait for the first chaos client to identify before the source connects.
pub const CHAOS_ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause of a chaos client between connecting and sending its id, ms (well under the
/// server's default handshake timeout of 5 s).
pub const CHAOS_IDENTIFY_DELAY_MAX_MS: u64 = 300;
/// Longest pause of a chaos client between a disconnect and its next connect, ms.
pub const CHAOS_RECONNECT_DELAY_MAX_MS: u64 = 500;
/// How often the chaos thread looks at its clients.
pub const CHAOS_TICK: Duration = Duration::from_millis(2);
/// Timeout of a chaos client's connect.
pub const CHAOS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes one chaos client reads per tick (keeps the thread fair between clients).
pub const CHAOS_READ_PER_TICK: usize = 1 << 20;

/// How many writes back a duplicate may reach (its original is then usually delivered).
pub const OLD_BATCHES: usize = 256;

/// Random streams of the chaos seed (apart from the workloads' streams).
const STREAM_SOURCE: u64 = 101;
const STREAM_CLIENTS: u64 = 102;
const STREAM_IDS: u64 = 103;

/// Lines whose seq does not parse; one is picked at random for each such fault. `0` is not
/// a seq (they start at 1) and 18446744073709551616 is u64::MAX + 1.
pub const BAD_SEQ_LINES: &[&[u8]] = &[
    b"abc|B",
    b"|F|1|2",
    b"0|B",
    b"-1|B",
    b"18446744073709551616|B",
    b"x",
];

/// Which ids the chaos clients use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChaosIds {
    /// Workload users that no verified client uses (falls back to `above` when there are none).
    Unverified,
    /// Ids above every workload user: they receive broadcasts only.
    Above,
}

/// Help heading of the `--chaos` flags.
pub const CHAOS_HEADING: &str = "Chaos options (every workload)";

/// The `--chaos` flags (global: they work with every workload).
#[derive(Args, Debug, Clone, Serialize)]
pub struct ChaosArgs {
    /// Inject faults: chaos clients and malformed source lines (see the --chaos-* flags).
    #[arg(long, global = true, help_heading = CHAOS_HEADING)]
    pub chaos: bool,
    /// Chaos client connections (ids outside the verified set).
    #[arg(long, global = true, help_heading = CHAOS_HEADING, default_value_t = CHAOS_CLIENTS, value_name = "N")]
    pub chaos_clients: usize,
    /// Mean number of real events between two injected source faults (0: none).
    #[arg(long, global = true, help_heading = CHAOS_HEADING, default_value_t = CHAOS_MALFORMED_EVERY, value_name = "N")]
    pub chaos_malformed_every: u64,
    /// Length of an injected overlong line, bytes; must exceed the server's line limit.
    #[arg(long, global = true, help_heading = CHAOS_HEADING, default_value_t = CHAOS_LONG_LINE, value_name = "BYTES")]
    pub chaos_long_line: usize,
    /// Longest stall (no reads) of a chaos client, ms.
    #[arg(long, global = true, help_heading = CHAOS_HEADING, default_value_t = CHAOS_STALL_MAX_MS, value_name = "MS")]
    pub chaos_stall_max_ms: u64,
    /// Ids of the chaos clients.
    #[arg(long, global = true, help_heading = CHAOS_HEADING, value_enum, default_value_t = ChaosIds::Unverified)]
    pub chaos_ids: ChaosIds,
    /// Seed of the chaos random streams.
    #[arg(long, global = true, help_heading = CHAOS_HEADING, default_value_t = CHAOS_SEED)]
    pub chaos_seed: u64,
}

impl ChaosArgs {
    /// Checks the chaos flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.chaos_long_line >= 16,
            "--chaos-long-line must be at least 16"
        );
        Ok(())
    }
}

/// Source faults injected, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Empty lines.
    pub empty: AtomicU64,
    /// Lines whose seq does not parse.
    pub bad_seq: AtomicU64,
    /// Overlong lines.
    pub too_long: AtomicU64,
    /// Duplicates of an event already written.
    pub duplicate: AtomicU64,
}

/// What the chaos clients did.
#[derive(Debug, Default)]
struct ClientCounts {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    identified: AtomicU64,
    stalls: AtomicU64,
    disconnects: AtomicU64,
    abandoned_handshakes: AtomicU64,
    closed_by_server: AtomicU64,
    bytes_read: AtomicU64,
}

/// Faults injected, as reported (summary and JSON).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FaultsInjected {
    /// Empty lines.
    pub empty_lines: u64,
    /// Lines whose seq does not parse.
    pub bad_seq_lines: u64,
    /// Lines longer than `--chaos-long-line` bytes.
    pub too_long_lines: u64,
    /// Duplicates of an event already written (same seq, different content).
    pub duplicates: u64,
    /// Chaos client connects.
    pub client_connects: u64,
    /// Chaos client connects that failed.
    pub client_connect_failures: u64,
    /// Chaos clients that sent their id.
    pub client_identified: u64,
    /// Stalls (read pauses).
    pub client_stalls: u64,
    /// Disconnects by a chaos client after identifying.
    pub client_disconnects: u64,
    /// Disconnects by a chaos client before sending its id.
    pub client_abandoned_handshakes: u64,
    /// Chaos connections the server closed.
    pub client_closed_by_server: u64,
    /// Bytes the chaos clients read (not verified).
    pub client_bytes_read: u64,
}

impl FaultsInjected {
    /// Injected source lines of every kind.
    pub fn source_total(&self) -> u64 {
        self.empty_lines + self.bad_seq_lines + self.too_long_lines + self.duplicates
    }

    /// The summary lines.
    pub fn summary(&self) -> String {
        format!(
            "  Faults injected source: {} empty, {} bad seq, {} too long, {} duplicate ({} total)\n\
             \x20                clients: {} connects ({} failed), {} identified, {} stalls, \
             {} disconnects, {} abandoned handshakes, {} closed by server, {}B read\n",
            self.empty_lines,
            self.bad_seq_lines,
            self.too_long_lines,
            self.duplicates,
            self.source_total(),
            self.client_connects,
            self.client_connect_failures,
            self.client_identified,
            self.client_stalls,
            self.client_disconnects,
            self.client_abandoned_handshakes,
            self.client_closed_by_server,
            self.client_bytes_read,
        )
    }
}

/// A run's chaos: the shared fault counters, and the settings.
#[derive(Debug)]
pub struct Chaos {
    args: ChaosArgs,
    ending: LineEnding,
    faults: Arc<FaultCounts>,
    clients: Arc<ClientCounts>,
}

impl Chaos {
    /// Chaos for a run with these flags and line ending.
    pub fn new(args: &ChaosArgs, ending: LineEnding) -> Chaos {
        Chaos {
            args: args.clone(),
            ending,
            faults: Arc::new(FaultCounts::default()),
            clients: Arc::new(ClientCounts::default()),
        }
    }

    /// Wraps `inner` so that its writes carry injected source faults.
    pub fn wrap(&self, inner: Box<dyn Workload>) -> Box<dyn Workload> {
        Box::new(ChaosWorkload::new(
            inner,
            self.args.chaos_malformed_every,
            self.args.chaos_long_line,
            self.args.chaos_seed,
            self.ending,
            self.faults.clone(),
        ))
    }

    /// The chaos client ids for a workload whose verified clients are `verified` and whose
    /// users are `1..=max_user`.
    pub fn client_ids(&self, verified: &[u64], max_user: u64) -> Vec<u64> {
        let n = self.args.chaos_clients;
        let taken: ahash::AHashSet<u64> = verified.iter().copied().collect();
        let spare = max_user.saturating_sub(taken.len() as u64);
        let mut rng = Rng::new(self.args.chaos_seed, STREAM_IDS);
        if self.args.chaos_ids == ChaosIds::Unverified && spare > 0 {
            let mut ids = Vec::with_capacity(n);
            let mut chosen = ahash::AHashSet::new();
            while ids.len() < n {
                let id = rng.range_inclusive(1, max_user.max(1));
                // Distinct while there are enough spare users, repeated (several devices of
                // one user) beyond.
                let fresh = chosen.len() as u64 >= spare || !chosen.contains(&id);
                if !taken.contains(&id) && fresh {
                    chosen.insert(id);
                    ids.push(id);
                }
            }
            ids
        } else {
            let above = verified.iter().copied().max().unwrap_or(0).max(max_user);
            (1..=n as u64).map(|i| above.saturating_add(i)).collect()
        }
    }

    /// Starts the chaos clients against `addr` on their own thread.
    pub fn start_clients(&self, addr: SocketAddr, ids: Vec<u64>) -> std::io::Result<ChaosClients> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = self.clients.clone();
        let settings = ClientSettings {
            addr,
            ending: self.ending.bytes(),
            stall_max_ms: self.args.chaos_stall_max_ms.max(1),
            seed: self.args.chaos_seed,
        };
        let thread_stop = stop.clone();
        let clients = ids.len();
        let thread_counts = counts.clone();
        let handle = std::thread::Builder::new()
            .name("efr-load-chaos".into())
            .spawn(move || run_clients(ids, settings, thread_stop, thread_counts))?;
        Ok(ChaosClients {
            stop,
            handle: Some(handle),
            counts,
            clients,
        })
    }

    /// The counts so far (call after the clients stopped for final figures).
    pub fn injected(&self) -> FaultsInjected {
        let f = &self.faults;
        let c = &self.clients;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultsInjected {
            empty_lines: get(&f.empty),
            bad_seq_lines: get(&f.bad_seq),
            too_long_lines: get(&f.too_long),
            duplicates: get(&f.duplicate),
            client_connects: get(&c.connects),
            client_connect_failures: get(&c.connect_failures),
            client_identified: get(&c.identified),
            client_stalls: get(&c.stalls),
            client_disconnects: get(&c.disconnects),
            client_abandoned_handshakes: get(&c.abandoned_handshakes),
            client_closed_by_server: get(&c.closed_by_server),
            client_bytes_read: get(&c.bytes_read),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed source lines

/// A workload whose writes carry injected faulty lines between the real event lines.
pub struct ChaosWorkload {
    inner: Box<dyn Workload>,
    every: u64,
    long_line: usize,
    ending: &'static [u8],
    rng: Rng,
    faults: Arc<FaultCounts>,
    /// Real event lines written before the current batch.
    events_before: u64,
    /// Index (among all real event lines) before which the next fault goes.
    next_fault_at: u64,
    /// Faults injected so far (the kind cycles through the four, from a random start).
    injected: u64,
    kind_offset: u64,
    /// The last real line of each of the previous [`OLD_BATCHES`] batches, without its
    /// terminator, oldest first.
    old_lines: std::collections::VecDeque<Vec<u8>>,
    /// Line start offsets of the current batch (scratch).
    starts: Vec<usize>,
}

impl ChaosWorkload {
    /// Wraps `inner`: a fault every `every` real events on average (0: none).
    pub fn new(
        inner: Box<dyn Workload>,
        every: u64,
        long_line: usize,
        seed: u64,
        ending: LineEnding,
        faults: Arc<FaultCounts>,
    ) -> ChaosWorkload {
        let mut rng = Rng::new(seed, STREAM_SOURCE);
        let kind_offset = rng.below(4);
        let mut w = ChaosWorkload {
            inner,
            every,
            long_line,
            ending: ending.bytes(),
            rng,
            faults,
            events_before: 0,
            next_fault_at: u64::MAX,
            injected: 0,
            kind_offset,
            old_lines: std::collections::VecDeque::with_capacity(OLD_BATCHES + 1),
            starts: Vec::new(),
        };
        if every > 0 {
            // The first fault comes after at least one real event, so that a duplicate has
            // something to copy.
            w.next_fault_at = w.gap();
        }
        w
    }

    /// Distance to the next fault: uniform in 1..=2*every-1 (mean `every`).
    fn gap(&mut self) -> u64 {
        self.rng
            .range_inclusive(1, self.every.saturating_mul(2).saturating_sub(1).max(1))
    }

    /// Appends one fault line (with its terminator) to `out`; `sent` is a real line already
    /// written (without its terminator), if there is one.
    fn push_fault(&mut self, out: &mut Vec<u8>, sent: Option<&[u8]>) {
        let kind = (self.injected + self.kind_offset) % 4;
        self.injected += 1;
        let sent_seq = sent.and_then(split_seq);
        match (kind, sent_seq) {
            (0, _) => {
                self.faults.empty.fetch_add(1, Ordering::Relaxed);
            }
            (2, _) => {
                // Starts like an event already written, so a server that cut it at the limit
                // instead of skipping it would count a duplicate or a bad line, not drop it.
                let start = out.len();
                match sent_seq {
                    Some((seq, _)) => {
                        push_u64(out, seq);
                        out.extend_from_slice(b"|B|");
                    }
                    None => out.extend_from_slice(b"x|B|"),
                }
                let pad = self.long_line.saturating_sub(out.len() - start);
                out.resize(out.len() + pad, b'x');
                self.faults.too_long.fetch_add(1, Ordering::Relaxed);
            }
            (3, Some((seq, kind))) => {
                // Same seq, different and well-formed content: a server that let it through
                // would send a broadcast (or a status update of user 1) nobody expects.
                push_u64(out, seq);
                if kind == b'B' {
                    out.extend_from_slice(b"|S|1");
                } else {
                    out.extend_from_slice(b"|B");
                }
                self.faults.duplicate.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let i = self.rng.below(BAD_SEQ_LINES.len() as u64) as usize;
                out.extend_from_slice(BAD_SEQ_LINES[i]);
                self.faults.bad_seq.fetch_add(1, Ordering::Relaxed);
            }
        }
        out.extend_from_slice(self.ending);
    }

    /// Inserts this batch's faults into its wire bytes.
    fn inject(&mut self, batch: &mut Batch) {
        let end = self.events_before + batch.wire_events;
        if self.next_fault_at >= end {
            return;
        }
        let wire = std::mem::take(&mut batch.wire);
        self.starts.clear();
        self.starts.push(0);
        self.starts
            .extend(memchr::memchr_iter(b'\n', &wire).map(|i| i + 1));
        // starts[k] is where real line k begins; the last entry is wire.len().
        let lines = self.starts.len() - 1;
        let mut out = Vec::with_capacity(wire.len() + 64);
        let mut copied = 0; // real lines copied to `out`
        let starts = std::mem::take(&mut self.starts);
        let line = |k: usize| &wire[starts[k]..starts[k + 1]];
        while self.next_fault_at < self.events_before + lines as u64 {
            let k = (self.next_fault_at - self.events_before) as usize;
            out.extend_from_slice(&wire[starts[copied]..starts[k]]);
            copied = k;
            // A real line already written: half the time one written up to OLD_BATCHES writes
            // ago (long delivered, unless a hole precedes it), else one from earlier in this
            // write (often still waiting), else the previous write's last one.
            let old = self.rng.below(2) == 0;
            let sent: Option<Vec<u8>> = if old && !self.old_lines.is_empty() {
                self.old_lines.front().cloned()
            } else if k > 0 {
                let j = self.rng.below(k as u64) as usize;
                Some(trim_line(line(j)).to_vec())
            } else {
                self.old_lines.back().cloned()
            };
            self.push_fault(&mut out, sent.as_deref());
            self.next_fault_at += self.gap();
        }
        out.extend_from_slice(&wire[starts[copied]..]);
        self.starts = starts;
        batch.wire = out;
    }
}

/// A line without its terminator.
fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The seq of an event line and its type byte.
fn split_seq(line: &[u8]) -> Option<(u64, u8)> {
    let bar = memchr::memchr(b'|', line)?;
    let seq = std::str::from_utf8(&line[..bar]).ok()?.parse().ok()?;
    Some((seq, *line.get(bar + 1)?))
}

impl Workload for ChaosWorkload {
    fn clients(&self) -> &[u64] {
        self.inner.clients()
    }
    fn max_user(&self) -> u64 {
        self.inner.max_user()
    }
    fn total_events(&self) -> Option<u64> {
        self.inner.total_events()
    }
    fn lockstep(&self) -> bool {
        self.inner.lockstep()
    }
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        let Some(mut batch) = self.inner.next_batch()? else {
            return Ok(None);
        };
        if self.every > 0 && batch.wire_events > 0 {
            self.inject(&mut batch);
            let body = batch.wire.strip_suffix(b"\n").unwrap_or(&batch.wire);
            let from = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
            let mut last = if self.old_lines.len() >= OLD_BATCHES {
                self.old_lines.pop_front().unwrap_or_default()
            } else {
                Vec::new()
            };
            last.clear();
            last.extend_from_slice(trim_line(&batch.wire[from..]));
            self.old_lines.push_back(last);
            self.events_before += batch.wire_events;
        }
        Ok(Some(batch))
    }
}

// ---------------------------------------------------------------------------------------------
// Chaos clients

/// The running chaos clients; dropping it stops them.
#[derive(Debug)]
pub struct ChaosClients {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    counts: Arc<ClientCounts>,
    clients: usize,
}

impl ChaosClients {
    /// Waits until a chaos client sent its id line (so that chaos surrounds the stream from
    /// its start, however short the run), or `timeout` passed; true when one did. Returns at
    /// once when there are no chaos clients.
    pub fn wait_active(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.clients > 0 && self.counts.identified.load(Ordering::Relaxed) == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(CHAOS_TICK);
        }
        true
    }

    /// Stops the clients (closing their connections) and waits for their thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ChaosClients {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[derive(Debug, Clone, Copy)]
struct ClientSettings {
    addr: SocketAddr,
    ending: &'static [u8],
    stall_max_ms: u64,
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected; connect at `until`.
    Down,
    /// Connected, id not sent; send it (or give up) at `until`.
    Handshake,
    /// Reading until `until`.
    Reading,
    /// Not reading until `until`.
    Stalled,
}

struct ChaosClient {
    id: u64,
    phase: Phase,
    until: Instant,
    stream: Option<TcpStream>,
}

fn ms(rng: &mut Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.range_inclusive(lo, hi.max(lo)))
}

/// Chooses what an identified client does next.
fn next_phase(c: &mut ChaosClient, rng: &mut Rng, s: &ClientSettings, counts: &ClientCounts) {
    let now = Instant::now();
    match rng.below(100) {
        0..=44 => {
            c.phase = Phase::Reading;
            c.until = now + ms(rng, 10, CHAOS_READ_MAX_MS);
        }
        45..=79 => {
            c.phase = Phase::Stalled;
            c.until = now + ms(rng, 10, s.stall_max_ms);
            counts.stalls.fetch_add(1, Ordering::Relaxed);
        }
        r => {
            if let Some(stream) = c.stream.take() {
                if r % 2 == 0 {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            }
            counts.disconnects.fetch_add(1, Ordering::Relaxed);
            go_down(c, rng);
        }
    }
}

fn go_down(c: &mut ChaosClient, rng: &mut Rng) {
    c.stream = None;
    c.phase = Phase::Down;
    c.until = Instant::now() + ms(rng, 0, CHAOS_RECONNECT_DELAY_MAX_MS);
}

/// The chaos thread: steps every client each [`CHAOS_TICK`] until `stop`.
fn run_clients(ids: Vec<u64>, s: ClientSettings, stop: Arc<AtomicBool>, counts: Arc<ClientCounts>) {
    let mut rng = Rng::new(s.seed, STREAM_CLIENTS);
    let start = Instant::now();
    let mut clients: Vec<ChaosClient> = ids
        .into_iter()
        .map(|id| ChaosClient {
            id,
            phase: Phase::Down,
            until: start + ms(&mut rng, 0, CHAOS_RECONNECT_DELAY_MAX_MS),
            stream: None,
        })
        .collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut id_line = Vec::with_capacity(24);
    while !stop.load(Ordering::Relaxed) {
        for c in &mut clients {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            match c.phase {
                Phase::Down if now >= c.until => {
                    match TcpStream::connect_timeout(&s.addr, CHAOS_CONNECT_TIMEOUT)
                        .and_then(|st| st.set_nonblocking(true).map(|_| st))
                    {
                        Ok(stream) => {
                            counts.connects.fetch_add(1, Ordering::Relaxed);
                            c.stream = Some(stream);
                            c.phase = Phase::Handshake;
                            c.until = now + ms(&mut rng, 0, CHAOS_IDENTIFY_DELAY_MAX_MS);
                        }
                        Err(_) => {
                            counts.connect_failures.fetch_add(1, Ordering::Relaxed);
                            go_down(c, &mut rng);
                        }
                    }
                }
                Phase::Handshake if now >= c.until => {
                    if rng.below(10) == 0 {
                        counts.abandoned_handshakes.fetch_add(1, Ordering::Relaxed);
                        go_down(c, &mut rng);
                        continue;
                    }
                    id_line.clear();
                    push_u64(&mut id_line, c.id);
                    id_line.extend_from_slice(s.ending);
                    // A fresh socket's send buffer takes a few bytes at once.
                    let sent = c
                        .stream
                        .as_mut()
                        .map(|st| st.write(&id_line))
                        .is_some_and(|r| matches!(r, Ok(n) if n == id_line.len()));
                    if sent {
                        counts.identified.fetch_add(1, Ordering::Relaxed);
                        next_phase(c, &mut rng, &s, &counts);
                    } else {
                        counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        go_down(c, &mut rng);
                    }
                }
                Phase::Reading => {
                    let mut read = 0;
                    let mut closed = false;
                    if let Some(st) = c.stream.as_mut() {
                        while read < CHAOS_READ_PER_TICK {
                            match st.read(&mut buf) {
                                Ok(0) => {
                                    closed = true;
                                    break;
                                }
                                Ok(n) => read += n,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                                Err(_) => {
                                    closed = true;
                                    break;
                                }
                            }
                        }
                    }
                    counts.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
                    if closed {
                        counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        go_down(c, &mut rng);
                    } else if now >= c.until {
                        next_phase(c, &mut rng, &s, &counts);
                    }
                }
                Phase::Stalled if now >= c.until => next_phase(c, &mut rng, &s, &counts),
                _ => {}
            }
        }
        std::thread::sleep(CHAOS_TICK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Harness, HarnessParams};

    fn harness(total: u64) -> Box<dyn Workload> {
        Box::new(
            Harness::new(
                HarnessParams {
                    total_events: total,
                    concurrency: 10,
                    users: 100,
                    seed: 3,
                    max_batch: 100,
                },
                LineEnding::Lf,
            )
            .unwrap(),
        )
    }

    fn wire_and_events(w: &mut dyn Workload) -> (Vec<u8>, u64) {
        let mut wire = Vec::new();
        let mut events = 0;
        while let Some(b) = w.next_batch().unwrap() {
            wire.extend_from_slice(&b.wire);
            events += b.wire_events;
        }
        (wire, events)
    }

    #[test]
    fn injection_keeps_the_real_lines_and_adds_only_safe_ones() {
        let (plain, n) = wire_and_events(harness(20_000).as_mut());
        let faults = Arc::new(FaultCounts::default());
        let mut w =
            ChaosWorkload::new(harness(20_000), 50, 5000, 9, LineEnding::Lf, faults.clone());
        let (chaotic, m) = wire_and_events(&mut w);
        assert_eq!(n, m);
        let real: Vec<&[u8]> = plain.split(|&b| b == b'\n').collect();
        let mut sent = ahash::AHashSet::new();
        let mut i = 0;
        let (mut empty, mut bad, mut long, mut dup) = (0u64, 0u64, 0u64, 0u64);
        for line in chaotic.split(|&b| b == b'\n') {
            if i < real.len() && line == real[i] {
                if let Some((seq, _)) = split_seq(line) {
                    sent.insert(seq);
                }
                i += 1;
                continue;
            }
            if line.is_empty() {
                empty += 1;
            } else if line.len() >= 5000 {
                assert_eq!(line.len(), 5000);
                long += 1;
            } else if let Some((seq, _)) = split_seq(line).filter(|(s, _)| *s > 0) {
                assert!(sent.contains(&seq), "duplicate of an unsent seq {seq}");
                dup += 1;
            } else {
                bad += 1;
            }
        }
        assert_eq!(i, real.len());
        assert_eq!(empty, faults.empty.load(Ordering::Relaxed));
        assert_eq!(bad, faults.bad_seq.load(Ordering::Relaxed));
        assert_eq!(long, faults.too_long.load(Ordering::Relaxed));
        assert_eq!(dup, faults.duplicate.load(Ordering::Relaxed));
        let total = empty + bad + long + dup;
        assert!((200..=600).contains(&total), "{total} faults for 20000/50");
        assert!(empty > 0 && bad > 0 && long > 0 && dup > 0);
    }

    #[test]
    fn chaos_ids_avoid_verified_clients() {
        let chaos = Chaos::new(
            &ChaosArgs {
                chaos: true,
                chaos_clients: 30,
                chaos_malformed_every: 10,
                chaos_long_line: 5000,
                chaos_stall_max_ms: 10,
                chaos_ids: ChaosIds::Unverified,
                chaos_seed: 1,
            },
            LineEnding::Lf,
        );
        let verified: Vec<u64> = (1..=90).collect();
        let ids = chaos.client_ids(&verified, 100);
        assert_eq!(ids.len(), 30);
        assert!(ids.iter().all(|&i| (91..=100).contains(&i)));
        let mut above = chaos.args.clone();
        above.chaos_ids = ChaosIds::Above;
        let ids = Chaos::new(&above, LineEnding::Lf).client_ids(&verified, 100);
        assert_eq!(ids, (101..=130).collect::<Vec<_>>());
        let all: Vec<u64> = (1..=100).collect();
        assert!(chaos.client_ids(&all, 100).iter().all(|&i| i > 100));
    }
}
