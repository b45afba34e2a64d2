//! The ceiling: a built-in null server for `efr-load compare`. It does no parsing, ordering or
//! routing of the source's events: it generates each client's expected byte stream itself,
//! from the same workload (the same model efr-load verifies with), and writes it to the
//! clients as fast as the source's bytes arrive. It is the fastest any server can look on
//! this machine with this tool.
//!
//! Protocol it keeps, so that the very same verifying run passes against it: it accepts the
//! clients and reads their id lines, accepts the event source and reads and discards its bytes
//! (it only counts them), and closes every client at the end of the run. It then waits for
//! the next run: one `NullServer` serves any number of runs of one workload.
//!
//! Pacing: a notification may only be written once the source has written the batch that
//! made it deliverable (efr-load's readers learn of a notification just before its batch is
//! written, and would reject one that arrives earlier). The null server knows each batch's
//! wire length, so once the count of bytes read from the source reaches a batch's end, that
//! batch's output is released: no line of the source is looked at.
//!
//! Memory: a generator thread produces, per batch, each touched client's output, into a
//! bounded queue of [`CeilingSettings::lookahead_bytes`]. Before each run
//! [`NullServer::wait_prepared`] waits until that queue is full or the whole run's output is
//! in it. A run whose output fits in the lookahead is therefore written entirely from
//! precomputed memory; a longer one starts with the lookahead precomputed and the rest is
//! generated during the run, on that extra thread (reported as `precomputed_bytes` out of
//! `total_bytes` in [`CeilingStats`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use super::config::{NullServerArgs, WorkloadCmd};
use super::model::Model;
use super::workload::LineEnding;

/// Default output precomputed ahead of the source, bytes (the generator's queue).
pub const DEFAULT_LOOKAHEAD_BYTES: u64 = super::config::CEILING_LOOKAHEAD_BYTES;
/// Output handed from the generator to the writer in one message, bytes (about).
pub const GROUP_BYTES: usize = 1 << 20;
/// Sleep of the accept loop when nothing is pending.
pub const ACCEPT_IDLE: Duration = Duration::from_millis(1);
/// Backlog of the null server's listeners (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: i32 = 4_096;
/// Time a client has for its id line.
pub const ID_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest id line read, bytes.
pub const MAX_ID_LINE: usize = 64;
/// Time to wait for missing clients once the source has connected.
pub const MISSING_CLIENTS_WAIT: Duration = Duration::from_secs(5);
/// Poll timeout of the streaming loop when it waits for input.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(5);
/// Poll timeout while the writer waits for the generator.
pub const GENERATOR_WAIT: Duration = Duration::from_micros(200);
/// Read buffer for the source's bytes (discarded).
pub const SOURCE_READ_BUFFER: usize = 256 * 1024;
/// After the source closed: how long pending output may take to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of [`NullServer::wait_prepared`].
pub const PREPARE_POLL: Duration = Duration::from_millis(2);
/// mio token of the source.
const SOURCE: Token = Token(usize::MAX);

/// Settings of the null server.
#[derive(Clone, Copy, Debug)]
pub struct CeilingSettings {
    /// Output precomputed ahead of the source, bytes.
    pub lookahead_bytes: u64,
    /// Line ending of the source and the id lines.
    pub line_ending: LineEnding,
}

/// What the null server did in its last run.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct CeilingStats {
    /// Runs served.
    pub runs: u64,
    /// Output of the last run, bytes.
    pub total_bytes: u64,
    /// Of which precomputed before the source connected, bytes.
    pub precomputed_bytes: u64,
    /// Bytes of the source read and discarded in the last run.
    pub source_bytes: u64,
}

/// One batch's output: released once `wire_end` source bytes were read.
struct Chunk {
    /// Source bytes up to the end of the batch.
    wire_end: u64,
    /// The touched clients' output, concatenated.
    bytes: Vec<u8>,
    /// (slot, length) of each part of `bytes`.
    parts: Vec<(u32, u32)>,
}

struct Shared {
    stop: AtomicBool,
    /// Number of the run whose output is prepared (1-based; 0: none yet).
    prepared_run: AtomicU64,
    stats: Mutex<CeilingStats>,
    /// Set when the server thread ended (with its error, if any).
    failed: Mutex<Option<String>>,
}

/// A running null server.
pub struct NullServer {
    event_port: u16,
    client_port: u16,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl NullServer {
    /// Binds two ephemeral ports on 127.0.0.1 and serves `workload` until dropped.
    pub fn start(workload: &WorkloadCmd, settings: CeilingSettings) -> anyhow::Result<NullServer> {
        Self::start_on(workload, settings, 0, 0)
    }

    /// Binds the given ports on 127.0.0.1 (0: ephemeral) and serves `workload` until dropped.
    pub fn start_on(
        workload: &WorkloadCmd,
        settings: CeilingSettings,
        event_port: u16,
        client_port: u16,
    ) -> anyhow::Result<NullServer> {
        let events = listen(event_port).context("binding the null server's event port")?;
        let clients = listen(client_port).context("binding the null server's client port")?;
        let event_port = events.local_addr()?.port();
        let client_port = clients.local_addr()?.port();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            prepared_run: AtomicU64::new(0),
            stats: Mutex::new(CeilingStats::default()),
            failed: Mutex::new(None),
        });
        let cmd = workload.clone();
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("efr-null-server".into())
            .spawn(move || {
                if let Err(e) = serve(&cmd, settings, &events, &clients, &sh) {
                    *sh.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                }
            })?;
        Ok(NullServer {
            event_port,
            client_port,
            shared,
            handle: Some(handle),
        })
    }

    /// The event port.
    pub fn event_port(&self) -> u16 {
        self.event_port
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Waits until the output of run `run` (1-based) is precomputed up to the lookahead.
    pub fn wait_prepared(&self, run: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.shared.prepared_run.load(Ordering::Acquire) < run {
            if let Some(e) = self.error() {
                anyhow::bail!("the null server failed: {e}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the null server did not prepare run {run} within {timeout:?}"
            );
            std::thread::sleep(PREPARE_POLL);
        }
        Ok(())
    }

    /// Waits until `runs` runs were served (the last one closed).
    pub fn wait_served(&self, runs: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.stats().runs < runs {
            if let Some(e) = self.error() {
                anyhow::bail!("the null server failed: {e}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the null server did not finish run {runs} within {timeout:?}"
            );
            std::thread::sleep(PREPARE_POLL);
        }
        Ok(())
    }

    /// The server thread's error, if it ended with one.
    pub fn error(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the last run did.
    pub fn stats(&self) -> CeilingStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A non-blocking listener on 127.0.0.1:`port` with a backlog of [`LISTEN_BACKLOG`] (std's
/// is 128: 10,000 clients connecting at once would overflow it and wait for SYN retries).
fn listen(port: u16) -> anyhow::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let l = TcpListener::bind(("127.0.0.1", port))?;
    // SAFETY: listen(2) again on our own listening socket only changes its backlog.
    if unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves runs until stopped.
fn serve(
    cmd: &WorkloadCmd,
    settings: CeilingSettings,
    events: &TcpListener,
    clients: &TcpListener,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut run = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        run += 1;
        let gen = Generator::spawn(cmd, settings, run)?;
        let served = serve_run(&gen, events, clients, shared);
        gen.stop.store(true, Ordering::Release);
        let precomputed = gen.precomputed.load(Ordering::Acquire);
        let total = gen.produced.load(Ordering::Acquire);
        drop(gen.rx);
        let gen_result = gen
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the null server's generator panicked"))?;
        let source_bytes = served?;
        gen_result?;
        let mut st = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.runs = run;
        st.total_bytes = total;
        st.precomputed_bytes = precomputed;
        st.source_bytes = source_bytes;
    }
    Ok(())
}

/// The generator thread of one run.
struct Generator {
    /// The 1-based number of the run.
    run: u64,
    rx: flume::Receiver<Vec<Chunk>>,
    handle: JoinHandle<anyhow::Result<()>>,
    stop: Arc<AtomicBool>,
    /// Output bytes generated so far.
    produced: Arc<AtomicU64>,
    /// Set once the lookahead is full or the run's output complete.
    prepared: Arc<AtomicBool>,
    /// Output bytes generated when `prepared` was set.
    precomputed: Arc<AtomicU64>,
    /// The user of each slot.
    users: Vec<u64>,
}

impl Generator {
    fn spawn(cmd: &WorkloadCmd, settings: CeilingSettings, run: u64) -> anyhow::Result<Generator> {
        let mut workload = cmd.build(settings.line_ending)?;
        let users = workload.clients().to_vec();
        // A lookahead smaller than a group makes the groups smaller (one batch at least).
        let group_max = (GROUP_BYTES as u64).min(settings.lookahead_bytes).max(1) as usize;
        let cap = (settings.lookahead_bytes / group_max as u64).max(1) as usize;
        let (tx, rx) = flume::bounded::<Vec<Chunk>>(cap);
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let prepared = Arc::new(AtomicBool::new(false));
        let precomputed = Arc::new(AtomicU64::new(0));
        let slots: Vec<(u32, u64)> = users
            .iter()
            .enumerate()
            .map(|(i, &u)| (i as u32, u))
            .collect();
        let (st, pr, pp, pc) = (
            stop.clone(),
            produced.clone(),
            prepared.clone(),
            precomputed.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("efr-null-gen".into())
            .spawn(move || -> anyhow::Result<()> {
                // Output already queued when the queue was found full (or the run ended).
                let mut queued = 0u64;
                let mark = |queued: u64| {
                    if !pp.load(Ordering::Acquire) {
                        pc.store(queued, Ordering::Release);
                        pp.store(true, Ordering::Release);
                    }
                };
                let mut model = Model::new(workload.max_user(), &slots);
                let mut per_slot: Vec<Vec<u8>> = vec![Vec::new(); slots.len()];
                let mut touched: Vec<u32> = Vec::new();
                let mut group: Vec<Chunk> = Vec::new();
                let mut group_bytes = 0usize;
                let mut wire_end = 0u64;
                while let Some(batch) = workload.next_batch()? {
                    if st.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    wire_end += batch.wire.len() as u64;
                    for (i, ev) in batch.model.events.iter().enumerate() {
                        let payload = batch.model.payload_of(i);
                        model.apply(ev, |s| {
                            let out = &mut per_slot[s as usize];
                            if out.is_empty() {
                                touched.push(s);
                            }
                            out.extend_from_slice(payload);
                            out.push(b'\n');
                        });
                    }
                    let len: usize = touched.iter().map(|&s| per_slot[s as usize].len()).sum();
                    let mut chunk = Chunk {
                        wire_end,
                        bytes: Vec::with_capacity(len),
                        parts: Vec::with_capacity(touched.len()),
                    };
                    for &s in &touched {
                        let out = &mut per_slot[s as usize];
                        chunk.parts.push((s, out.len() as u32));
                        chunk.bytes.extend_from_slice(out);
                        out.clear();
                    }
                    touched.clear();
                    group_bytes += len;
                    pr.fetch_add(len as u64, Ordering::AcqRel);
                    group.push(chunk);
                    if group_bytes >= group_max {
                        if tx.is_full() {
                            mark(queued);
                        }
                        if tx.send(std::mem::take(&mut group)).is_err() {
                            return Ok(());
                        }
                        queued += group_bytes as u64;
                        group_bytes = 0;
                    }
                }
                if !group.is_empty() && tx.send(group).is_err() {
                    return Ok(());
                }
                mark(queued + group_bytes as u64);
                Ok(())
            })?;
        Ok(Generator {
            run,
            rx,
            handle,
            stop,
            produced,
            prepared,
            precomputed,
            users,
        })
    }

    /// True once the lookahead is full or the run's output complete (or the generator ended).
    fn is_prepared(&self) -> bool {
        self.prepared.load(Ordering::Acquire) || self.handle.is_finished()
    }
}

/// A client connection of a run.
struct Conn {
    stream: mio::net::TcpStream,
    out: Vec<u8>,
    off: usize,
    writable: bool,
    queued: bool,
    alive: bool,
}

/// Accepts the run's clients and source, then streams. Returns the source bytes read.
fn serve_run(
    gen: &Generator,
    events: &TcpListener,
    clients: &TcpListener,
    shared: &Shared,
) -> anyhow::Result<u64> {
    // slot of each user's next unfilled connection.
    let mut free_slots: ahash::AHashMap<u64, Vec<u32>> = ahash::AHashMap::new();
    for (i, &u) in gen.users.iter().enumerate().rev() {
        free_slots.entry(u).or_default().push(i as u32);
    }
    let mut conns: Vec<Option<TcpStream>> = (0..gen.users.len()).map(|_| None).collect();
    let mut extra: Vec<TcpStream> = Vec::new();
    let mut filled = 0usize;
    let mut source: Option<(TcpStream, Instant)> = None;
    let mut prepared_published = false;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(0);
        }
        if !prepared_published && gen.is_prepared() {
            shared.prepared_run.fetch_max(gen.run, Ordering::AcqRel);
            prepared_published = true;
        }
        let mut idle = true;
        loop {
            match clients.accept() {
                Ok((stream, _)) => {
                    idle = false;
                    match read_id(&stream) {
                        Some(user) => match free_slots.get_mut(&user).and_then(|v| v.pop()) {
                            Some(slot) => {
                                conns[slot as usize] = Some(stream);
                                filled += 1;
                            }
                            None => extra.push(stream),
                        },
                        None => drop(stream),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("accepting a client"),
            }
        }
        if source.is_none() {
            match events.accept() {
                Ok((stream, _)) => {
                    idle = false;
                    source = Some((stream, Instant::now()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accepting the source"),
            }
        }
        if let Some((_, since)) = &source {
            if filled == conns.len() || since.elapsed() >= MISSING_CLIENTS_WAIT {
                break;
            }
        }
        if idle {
            std::thread::sleep(ACCEPT_IDLE);
        }
    }
    if !prepared_published {
        shared.prepared_run.fetch_max(gen.run, Ordering::AcqRel);
    }
    let (source, _) = source.expect("the loop only ends with a source");
    let result = stream_run(gen, source, conns, shared);
    drop(extra);
    result
}

/// Reads a client's id line (blocking, with [`ID_TIMEOUT`]); `None` when it is not a number.
fn read_id(stream: &TcpStream) -> Option<u64> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(ID_TIMEOUT)).ok()?;
    let mut buf = [0u8; MAX_ID_LINE];
    let mut len = 0;
    let mut s = stream;
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return None;
        }
        match s.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
    }
    let end = buf[..len].iter().position(|&b| b == b'\n')?;
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// Streams one run: reads and counts the source's bytes, releases each batch's output when
/// its bytes are in, writes it, and closes every client at the end. Returns the source bytes.
fn stream_run(
    gen: &Generator,
    source: TcpStream,
    conns: Vec<Option<TcpStream>>,
    shared: &Shared,
) -> anyhow::Result<u64> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    source.set_nonblocking(true)?;
    let mut source = mio::net::TcpStream::from_std(source);
    poll.registry()
        .register(&mut source, SOURCE, Interest::READABLE)?;
    let mut slots: Vec<Option<Conn>> = Vec::with_capacity(conns.len());
    for (i, c) in conns.into_iter().enumerate() {
        slots.push(match c {
            Some(s) => {
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                let mut stream = mio::net::TcpStream::from_std(s);
                poll.registry()
                    .register(&mut stream, Token(i), Interest::WRITABLE)?;
                Some(Conn {
                    stream,
                    out: Vec::new(),
                    off: 0,
                    writable: true,
                    queued: false,
                    alive: true,
                })
            }
            None => None,
        });
    }
    let mut buf = vec![0u8; SOURCE_READ_BUFFER];
    let mut received = 0u64;
    let mut source_open = true;
    let mut group: std::vec::IntoIter<Chunk> = Vec::new().into_iter();
    let mut next: Option<Chunk> = None;
    let mut gen_done = false;
    let mut dirty: Vec<u32> = Vec::new();
    let mut flush_deadline: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let busy = !dirty.is_empty() && dirty.iter().any(|&s| is_writable(&slots, s));
        let timeout = if busy {
            Duration::ZERO
        } else if next.is_none() && !gen_done {
            GENERATOR_WAIT
        } else {
            POLL_TIMEOUT
        };
        poll.poll(&mut events, Some(timeout))?;
        for ev in events.iter() {
            if ev.token() == SOURCE {
                continue;
            }
            if let Some(Some(c)) = slots.get_mut(ev.token().0) {
                c.writable = true;
            }
        }
        // The source: read everything there is, count it, drop it.
        while source_open {
            match source.read(&mut buf) {
                Ok(0) => source_open = false,
                Ok(n) => received += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => source_open = false,
            }
        }
        // Release every batch whose bytes are in.
        loop {
            if next.is_none() {
                next = group.next();
            }
            if next.is_none() && !gen_done {
                match gen.rx.try_recv() {
                    Ok(g) => {
                        group = g.into_iter();
                        continue;
                    }
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => gen_done = true,
                }
            }
            let Some(chunk) = next.take_if_ready(received) else {
                break;
            };
            let mut at = 0usize;
            for &(s, len) in &chunk.parts {
                let part = &chunk.bytes[at..at + len as usize];
                at += len as usize;
                if let Some(c) = slots[s as usize].as_mut().filter(|c| c.alive) {
                    c.out.extend_from_slice(part);
                    if !c.queued {
                        c.queued = true;
                        dirty.push(s);
                    }
                }
            }
        }
        // Write what each client has pending.
        dirty.retain(|&s| {
            let Some(c) = slots[s as usize].as_mut() else {
                return false;
            };
            while c.alive && c.writable && c.off < c.out.len() {
                match c.stream.write(&c.out[c.off..]) {
                    Ok(n) => c.off += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => c.alive = false,
                }
            }
            if !c.alive || c.off == c.out.len() {
                c.out.clear();
                c.off = 0;
                c.queued = false;
                false
            } else {
                true
            }
        });
        // `next` is now a batch still waiting for source bytes, or none: every generated
        // batch is released (and the generator is done, or behind).
        let no_more = next.is_some() || gen_done;
        if !source_open && no_more {
            if dirty.is_empty() {
                break;
            }
            let deadline = *flush_deadline.get_or_insert_with(|| Instant::now() + FLUSH_TIMEOUT);
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    // Close every client: the end of the run (PROTOCOL.md section 4).
    for c in slots.iter_mut().flatten() {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    Ok(received)
}

fn is_writable(slots: &[Option<Conn>], s: u32) -> bool {
    slots[s as usize]
        .as_ref()
        .is_some_and(|c| c.writable && c.alive)
}

trait TakeIfReady {
    fn take_if_ready(&mut self, received: u64) -> Option<Chunk>;
}

impl TakeIfReady for Option<Chunk> {
    fn take_if_ready(&mut self, received: u64) -> Option<Chunk> {
        if self.as_ref().is_some_and(|c| c.wire_end <= received) {
            self.take()
        } else {
            None
        }
    }
}

/// How often the null-server process publishes its state.
pub const PUBLISH_POLL: Duration = Duration::from_millis(2);

fn write_atomic(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `efr-load null-server`: serves until SIGTERM or SIGINT. Returns the exit status.
pub fn main(a: &NullServerArgs) -> i32 {
    match null_server_main(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("efr-load null-server: {e:#}");
            super::EXIT_USAGE
        }
    }
}

fn null_server_main(a: &NullServerArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    super::raise_nofile(u64::MAX);
    let w = super::workload_spec::parse_workload(&a.workload)?;
    let settings = CeilingSettings {
        lookahead_bytes: a.lookahead_mib << 20,
        line_ending: LineEnding::Lf,
    };
    let server = NullServer::start_on(&w.cmd, settings, a.listen_event_port, a.listen_client_port)?;
    if let Some(f) = &a.ports_file {
        write_atomic(
            f,
            &format!("{} {}\n", server.event_port(), server.client_port()),
        )?;
    }
    let (mut ready, mut served) = (0, 0);
    while !stop.load(Ordering::Acquire) {
        if let Some(e) = server.error() {
            anyhow::bail!("{e}");
        }
        let r = server.shared.prepared_run.load(Ordering::Acquire);
        if r != ready {
            ready = r;
            if let Some(f) = &a.ready_file {
                write_atomic(f, &format!("{r}\n"))?;
            }
        }
        let st = server.stats();
        if st.runs != served {
            served = st.runs;
            if let Some(f) = &a.stats_file {
                write_atomic(f, &serde_json::to_string(&st)?)?;
            }
        }
        std::thread::sleep(PUBLISH_POLL);
    }
    if let Some(f) = &a.stats_file {
        write_atomic(f, &serde_json::to_string(&server.stats())?)?;
    }
    Ok(())
}
