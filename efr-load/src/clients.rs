//! The client readers: each reader thread owns a share of the client connections, polls them
//! with mio (epoll on Linux), keeps its own [`Model`] of the follow graph for its clients, and
//! checks every received line against the next expected notification, byte for byte. Over
//! TLS a reader drives each client's rustls session on its nonblocking socket
//! ([`tls_read`]) and checks the plaintext the same way.
//!
//! The hot path allocates nothing and formats nothing: an expectation is a packed
//! `(batch number, event index)` (8 bytes) in the client's queue, the expected payload was
//! rendered once per event by the source, and a received line is compared in place in the
//! large read buffer (`payload` then `\n`). Latency is recorded once per run of lines of one
//! batch per read call.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use super::flow::{Chunk, Shared};
use super::model::Model;
use super::security::tls_read;

/// Longest a reader sleeps in poll before it looks at new batches, timeouts and the end.
pub const POLL_TICK: Duration = Duration::from_millis(10);
/// How often a reader looks for silent clients.
pub const SILENCE_CHECK_NS: u64 = 50_000_000;
/// Largest latency the histogram holds (one hour, in ns); longer ones are clamped.
pub const LATENCY_MAX_NS: u64 = 3_600_000_000_000;
/// Longest shown excerpt of a received line in a message.
pub const SHOWN_LINE_BYTES: usize = 120;
/// Bits of an expectation that hold the event index in its batch.
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// Reader settings.
#[derive(Debug, Clone, Copy)]
pub struct ReaderSettings {
    /// Silence allowed while a client expects lines, ms.
    pub timeout_ms: u64,
    /// After the last expected line, how long to wait for extra lines or the server's close.
    pub drain_ms: u64,
    /// Read buffer size.
    pub read_buffer: usize,
    /// Longest line accepted from the server.
    pub max_line: usize,
    /// Error messages kept.
    pub max_errors: usize,
    /// The source's bound on pending notifications (to wake it when crossing below).
    pub max_pending: u64,
}

/// One client connection handed to a reader: display name, user id, connected socket (its id
/// line already sent).
pub struct ClientConn {
    /// Name in messages, e.g. `client 26`.
    pub name: String,
    /// User id.
    pub user: u64,
    /// The socket.
    pub stream: std::net::TcpStream,
    /// Its TLS session (handshake done, id line sent), if the run speaks TLS.
    pub tls: Option<Box<rustls::ClientConnection>>,
}

/// What a reader found.
#[derive(Debug)]
pub struct ReaderOutcome {
    /// First errors with their time (ns).
    pub errors: Vec<(u64, String)>,
    /// All errors.
    pub error_count: u64,
    /// Lines received that matched.
    pub notifications: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Time of the last matched line (ns).
    pub last_read_ns: u64,
    /// Latency of every matched line, ns.
    pub hist: Histogram<u64>,
}

struct Client {
    stream: mio::net::TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    name: String,
    carry: Vec<u8>,
    expect: VecDeque<u64>,
    since_ns: u64,
    eof: bool,
    failed: bool,
}

struct Retained {
    chunk: Arc<Chunk>,
    pending: u64,
}

struct Reader {
    poll: Poll,
    clients: Vec<Client>,
    model: Model,
    retained: VecDeque<Retained>,
    base_no: u64,
    rx: flume::Receiver<Arc<Chunk>>,
    rx_done: bool,
    shared: Arc<Shared>,
    settings: ReaderSettings,
    buf: Vec<u8>,
    errors: Vec<(u64, String)>,
    error_count: u64,
    notifications: u64,
    bytes: u64,
    last_read_ns: u64,
    hist: Histogram<u64>,
    drain_since: Option<u64>,
}

/// Shows a received line in a message: lossy UTF-8, escaped, shortened.
pub(crate) fn show(line: &[u8]) -> String {
    let cut = &line[..line.len().min(SHOWN_LINE_BYTES)];
    let mut s: String = String::from_utf8_lossy(cut).escape_debug().collect();
    if line.len() > SHOWN_LINE_BYTES {
        s.push_str(&format!("... ({} bytes)", line.len()));
    }
    s
}

impl Reader {
    fn payload(&self, tag: u64) -> &[u8] {
        let r = &self.retained[((tag >> INDEX_BITS) - self.base_no) as usize];
        r.chunk.model.payload_of((tag & INDEX_MASK) as usize)
    }

    fn record_error(&mut self, now: u64, msg: String) {
        self.error_count += 1;
        if self.errors.len() < self.settings.max_errors {
            self.errors.push((now, msg));
        }
    }

    /// Marks a client failed: records `msg`, drops its expectations.
    fn fail(&mut self, ci: usize, now: u64, msg: String) {
        self.record_error(now, msg);
        let c = &mut self.clients[ci];
        c.failed = true;
        self.shared
            .pending_notifications
            .fetch_sub(c.expect.len() as u64, Ordering::AcqRel);
        for tag in c.expect.drain(..) {
            self.retained[((tag >> INDEX_BITS) - self.base_no) as usize].pending -= 1;
        }
        c.carry = Vec::new();
        self.release();
        let failed = self.shared.failed_clients.fetch_add(1, Ordering::Relaxed) + 1;
        if failed >= self.shared.clients {
            self.shared.abort.store(true, Ordering::Relaxed);
        }
    }

    fn release(&mut self) {
        while self.retained.front().is_some_and(|r| r.pending == 0) {
            self.retained.pop_front();
            self.base_no += 1;
        }
    }

    fn take_chunk(&mut self, chunk: Arc<Chunk>, now: u64) {
        debug_assert_eq!(chunk.no, self.base_no + self.retained.len() as u64);
        let mut count = 0u64;
        let clients = &mut self.clients;
        for (i, ev) in chunk.model.events.iter().enumerate() {
            let tag = (chunk.no << INDEX_BITS) | i as u64;
            self.model.apply(ev, |s| {
                let c = &mut clients[s as usize];
                if !c.failed {
                    if c.expect.is_empty() {
                        c.since_ns = now;
                    }
                    c.expect.push_back(tag);
                    count += 1;
                }
            });
        }
        self.retained.push_back(Retained {
            chunk,
            pending: count,
        });
        self.release();
    }

    fn drain_chunks(&mut self, now: u64) {
        let mut took = false;
        while !self.rx_done {
            match self.rx.try_recv() {
                Ok(chunk) => {
                    self.take_chunk(chunk, now);
                    took = true;
                }
                Err(flume::TryRecvError::Empty) => break,
                Err(flume::TryRecvError::Disconnected) => self.rx_done = true,
            }
        }
        if took {
            if let Some(t) = self.shared.source_thread.get() {
                t.unpark();
            }
        }
    }

    fn flush_latency(&mut self, written_ns: u64, count: u64, now: u64) {
        if count > 0 {
            let v = now.saturating_sub(written_ns).clamp(1, LATENCY_MAX_NS);
            let _ = self.hist.record_n(v, count);
        }
    }

    /// Checks the complete lines of `data` for client `ci`; returns how many bytes were used
    /// (the rest is a partial line to carry to the next read).
    fn process(&mut self, ci: usize, data: &[u8], now: u64) -> usize {
        let len = data.len();
        let mut pos = 0;
        let mut matched = 0u64;
        let mut run_written = u64::MAX;
        let mut run_count = 0u64;
        let mut used = len;
        while pos < len {
            if self.clients[ci].failed {
                break;
            }
            if self.clients[ci].expect.is_empty() {
                self.drain_chunks(now);
            }
            let Some(&tag) = self.clients[ci].expect.front() else {
                match memchr(&data[pos..]) {
                    Some(n) => {
                        let msg = format!(
                            "{} extra line after the last expected: {}",
                            self.clients[ci].name,
                            show(&data[pos..pos + n])
                        );
                        self.fail(ci, now, msg);
                    }
                    None => used = self.partial(ci, data, pos, now),
                }
                break;
            };
            let slot = ((tag >> INDEX_BITS) - self.base_no) as usize;
            let r = &mut self.retained[slot];
            let payload = r.chunk.model.payload_of((tag & INDEX_MASK) as usize);
            let l = payload.len();
            if pos + l < len && data[pos + l] == b'\n' && &data[pos..pos + l] == payload {
                r.pending -= 1;
                let w = r.chunk.written_ns.load(Ordering::Relaxed);
                if w != run_written {
                    self.flush_latency(run_written, run_count, now);
                    run_written = w;
                    run_count = 0;
                }
                run_count += 1;
                let c = &mut self.clients[ci];
                c.expect.pop_front();
                c.since_ns = now;
                pos += l + 1;
                matched += 1;
                continue;
            }
            match memchr(&data[pos..]) {
                Some(n) => {
                    let msg = format!(
                        "{} expected line {} but got {}",
                        self.clients[ci].name,
                        show(self.payload(tag)),
                        show(&data[pos..pos + n])
                    );
                    self.fail(ci, now, msg);
                }
                None => used = self.partial(ci, data, pos, now),
            }
            break;
        }
        self.flush_latency(run_written, run_count, now);
        if matched > 0 {
            self.notifications += matched;
            self.last_read_ns = now;
            self.shared
                .notifications
                .fetch_add(matched, Ordering::Relaxed);
            self.release();
        }
        used
    }

    /// A partial line at `pos`: carried if short enough, else a failure.
    fn partial(&mut self, ci: usize, data: &[u8], pos: usize, now: u64) -> usize {
        if data.len() - pos > self.settings.max_line {
            let msg = format!(
                "{} sent a line longer than {} bytes: {}",
                self.clients[ci].name,
                self.settings.max_line,
                show(&data[pos..])
            );
            self.fail(ci, now, msg);
            data.len()
        } else {
            pos
        }
    }

    fn closed(&mut self, ci: usize, now: u64, why: &str) {
        let c = &mut self.clients[ci];
        c.eof = true;
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.failed {
            return;
        }
        if !c.carry.is_empty() {
            let msg = format!("{} partial last line at {why}: {}", c.name, show(&c.carry));
            self.fail(ci, now, msg);
            return;
        }
        self.drain_chunks(now);
        if let Some(&tag) = self.clients[ci].expect.front() {
            let msg = format!(
                "{} {why} while expecting {}",
                self.clients[ci].name,
                show(self.payload(tag))
            );
            self.fail(ci, now, msg);
        }
    }

    fn read_client(&mut self, ci: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            if self.clients[ci].eof {
                break;
            }
            let k = self.clients[ci].carry.len();
            buf[..k].copy_from_slice(&self.clients[ci].carry);
            self.clients[ci].carry.clear();
            let c = &mut self.clients[ci];
            let res = match c.tls.as_mut() {
                Some(tls) => tls_read(tls, &mut c.stream, &mut buf[k..]),
                None => c.stream.read(&mut buf[k..]),
            };
            match res {
                Ok(0) => {
                    self.clients[ci].carry.extend_from_slice(&buf[..k]);
                    let now = self.shared.now_ns();
                    self.closed(ci, now, "connection closed by the server");
                    break;
                }
                Ok(n) => {
                    let now = self.shared.now_ns();
                    self.bytes += n as u64;
                    self.shared
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if self.clients[ci].failed {
                        continue;
                    }
                    let used = self.process(ci, &buf[..k + n], now);
                    if !self.clients[ci].failed {
                        self.clients[ci].carry.extend_from_slice(&buf[used..k + n]);
                    }
                }
                Err(e) => {
                    self.clients[ci].carry.extend_from_slice(&buf[..k]);
                    match e.kind() {
                        ErrorKind::WouldBlock => break,
                        ErrorKind::Interrupted => continue,
                        _ => {
                            let now = self.shared.now_ns();
                            self.closed(ci, now, &format!("read error ({e})"));
                            break;
                        }
                    }
                }
            }
        }
        self.buf = buf;
    }

    fn check_silence(&mut self, now: u64) {
        let limit = self.settings.timeout_ms * 1_000_000;
        for ci in 0..self.clients.len() {
            let c = &self.clients[ci];
            if c.failed {
                continue;
            }
            if let Some(&tag) = c.expect.front() {
                if c.eof {
                    let msg = format!(
                        "{} connection closed by the server while expecting {}",
                        c.name,
                        show(self.payload(tag))
                    );
                    self.fail(ci, now, msg);
                } else if now.saturating_sub(c.since_ns) > limit {
                    let msg = format!(
                        "{} silent for {} ms while expecting {}",
                        c.name,
                        self.settings.timeout_ms,
                        show(self.payload(tag))
                    );
                    self.fail(ci, now, msg);
                }
            }
        }
    }

    fn finished(&mut self, now: u64) -> bool {
        if !self.rx_done {
            return false;
        }
        let waiting = self
            .clients
            .iter()
            .any(|c| !c.failed && !c.expect.is_empty());
        if waiting {
            return false;
        }
        if self.clients.iter().all(|c| c.failed || c.eof) {
            return true;
        }
        let since = *self.drain_since.get_or_insert(now);
        now.saturating_sub(since) >= self.settings.drain_ms * 1_000_000
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut last_check = 0u64;
        // What a TLS session already read from its socket during the handshake raises no
        // readiness event: take it now.
        for ci in 0..self.clients.len() {
            if self.clients[ci].tls.is_some() {
                self.read_client(ci);
            }
        }
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(POLL_TICK)) {
                if e.kind() != ErrorKind::Interrupted {
                    let now = self.shared.now_ns();
                    self.record_error(now, format!("poll failed: {e}"));
                    self.shared.abort.store(true, Ordering::Relaxed);
                    return;
                }
            }
            let now = self.shared.now_ns();
            self.drain_chunks(now);
            for ev in events.iter() {
                self.read_client(ev.token().0);
            }
            let now = self.shared.now_ns();
            if now.saturating_sub(last_check) >= SILENCE_CHECK_NS {
                last_check = now;
                self.check_silence(now);
            }
            if self.finished(now) || self.shared.aborted() {
                return;
            }
        }
    }
}

/// First `\n` in `data`.
#[inline]
fn memchr(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

/// Runs one reader over `conns` until every client got what it expects and the source is done
/// (or the run is aborted).
pub fn run_reader(
    conns: Vec<ClientConn>,
    max_user: u64,
    rx: flume::Receiver<Arc<Chunk>>,
    shared: Arc<Shared>,
    settings: ReaderSettings,
) -> anyhow::Result<ReaderOutcome> {
    let poll = Poll::new()?;
    let mut clients = Vec::with_capacity(conns.len());
    let mut slots = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        conn.stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(conn.stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        slots.push((i as u32, conn.user));
        clients.push(Client {
            stream,
            tls: conn.tls,
            name: conn.name,
            carry: Vec::new(),
            expect: VecDeque::new(),
            since_ns: 0,
            eof: false,
            failed: false,
        });
    }
    let mut reader = Reader {
        poll,
        model: Model::new(max_user, &slots),
        clients,
        retained: VecDeque::new(),
        base_no: 0,
        rx,
        rx_done: false,
        shared,
        buf: vec![0; settings.read_buffer + settings.max_line + 1],
        settings,
        errors: Vec::new(),
        error_count: 0,
        notifications: 0,
        bytes: 0,
        last_read_ns: 0,
        hist: Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)?,
        drain_since: None,
    };
    reader.run();
    // Clients still expecting lines when the run was aborted.
    let now = reader.shared.now_ns();
    if reader.shared.aborted() {
        for ci in 0..reader.clients.len() {
            let c = &reader.clients[ci];
            if let (false, Some(&tag)) = (c.failed, c.expect.front()) {
                let msg = format!(
                    "{} run aborted while expecting {}",
                    c.name,
                    show(reader.payload(tag))
                );
                reader.fail(ci, now, msg);
            }
        }
    }
    Ok(ReaderOutcome {
        errors: reader.errors,
        error_count: reader.error_count,
        notifications: reader.notifications,
        bytes: reader.bytes,
        last_read_ns: reader.last_read_ns,
        hist: reader.hist,
    })
}
