//! The workloads: event generators that are pure functions of their parameters and seed.
//!
//! A workload yields [`Batch`]es. Each batch has the bytes the event source writes at once
//! (`wire`, in send order, with the chosen line ending) and the events that this write makes
//! deliverable, in seq order (`model`), i.e. the events that complete the contiguous prefix of
//! written seqs. The client readers apply `model` to their follow graph; nothing here touches a
//! socket, so the expected streams can be computed without one (see
//! [`crate::model::expected_streams`]).
//!
//! - `harness`: the original Follower Maze harness model (F, U, P 15% each, B 0.01%, S the
//!   rest; from/to uniform; contiguous batches of uniform size 1..=max, each shuffled).
//! - `fanout`: every connected user follows some users drawn from a Zipf law, then a stream
//!   dominated by status updates from Zipf-drawn (popular) users.
//! - `replay`: the harness events sent in a recorded arrival order read from a file.
//! - `ping` ([`crate::ping`]): one private message at a time, each after the previous arrived.

use std::collections::VecDeque;
use std::io::BufRead;

use anyhow::{bail, Context};
use serde::Serialize;

use super::rng::{Rng, Zipf};

/// Event type shares of the harness, in basis points (1/10,000): broadcast 0.01%.
pub const HARNESS_BROADCAST_BP: u64 = 1;
/// Harness follow share, basis points (15%).
pub const HARNESS_FOLLOW_BP: u64 = 1500;
/// Harness unfollow share, basis points (15%).
pub const HARNESS_UNFOLLOW_BP: u64 = 1500;
/// Harness private message share, basis points (15%). Status updates take the rest (54.99%).
pub const HARNESS_PRIVATE_BP: u64 = 1500;
/// Largest number of events in one batch (expectations pack the index in 24 bits).
pub const MAX_BATCH_EVENTS: u64 = (1 << 24) - 1;

/// Independent random streams of one seed.
const STREAM_EVENTS: u64 = 1;
const STREAM_BATCHES: u64 = 2;
const STREAM_CLIENTS: u64 = 3;
const STREAM_FOLLOWS: u64 = 4;

/// Line terminator the source and the client id lines use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LineEnding {
    /// `\n`
    Lf,
    /// `\r\n`
    Crlf,
}

impl LineEnding {
    /// The terminator's bytes.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            LineEnding::Lf => b"\n",
            LineEnding::Crlf => b"\r\n",
        }
    }
}

/// Event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `from` follows `to`; notifies `to`.
    Follow,
    /// `from` unfollows `to`; notifies nobody.
    Unfollow,
    /// Notifies every connected client.
    Broadcast,
    /// Notifies `to`.
    Private,
    /// Notifies the connected followers of `from`.
    Status,
}

/// One event. `from`/`to` are 0 where the type has no such field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Type.
    pub kind: Kind,
    /// Acting user.
    pub from: u64,
    /// Target user.
    pub to: u64,
}

/// Appends the decimal digits of `v`.
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

impl Event {
    /// Appends the payload (`seq|T|from|to`, no terminator).
    pub fn render(&self, out: &mut Vec<u8>) {
        push_u64(out, self.seq);
        let (tag, fields) = match self.kind {
            Kind::Follow => (b"|F|", 2),
            Kind::Unfollow => (b"|U|", 2),
            Kind::Private => (b"|P|", 2),
            Kind::Status => (b"|S|", 1),
            Kind::Broadcast => (b"|B|", 0),
        };
        if fields == 0 {
            out.extend_from_slice(b"|B");
            return;
        }
        out.extend_from_slice(tag);
        push_u64(out, self.from);
        if fields == 2 {
            out.push(b'|');
            push_u64(out, self.to);
        }
    }
}

/// Events that one write makes deliverable, in seq order, with their payloads rendered once.
#[derive(Debug, Default)]
pub struct ModelChunk {
    /// The events, in seq order.
    pub events: Vec<Event>,
    /// Their payloads, concatenated.
    pub payload: Vec<u8>,
    /// End offset in `payload` of each event's payload.
    pub ends: Vec<u32>,
}

impl ModelChunk {
    /// Appends an event and its payload.
    pub fn push(&mut self, ev: Event) {
        ev.render(&mut self.payload);
        self.ends.push(self.payload.len() as u32);
        self.events.push(ev);
    }

    /// The payload of event `i`.
    #[inline]
    pub fn payload_of(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.payload[start..self.ends[i] as usize]
    }
}

/// One write of the event source.
#[derive(Debug, Default)]
pub struct Batch {
    /// Bytes to write, in send order, each line terminated.
    pub wire: Vec<u8>,
    /// Number of event lines in `wire`.
    pub wire_events: u64,
    /// Events made deliverable by this write.
    pub model: ModelChunk,
}

/// A workload: who connects, and the batches the source writes.
pub trait Workload: Send {
    /// The user id of each client connection, in connection order.
    fn clients(&self) -> &[u64];
    /// The largest user id any event can carry.
    fn max_user(&self) -> u64;
    /// Total number of events if known in advance.
    fn total_events(&self) -> Option<u64>;
    /// The next batch, or `None` at the end.
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>>;
    /// True when each batch must be fully received before the next one is written (one
    /// event at a time: `ping`).
    fn lockstep(&self) -> bool {
        false
    }
}

/// `count` distinct ids drawn uniformly from `1..=users`, in draw order.
pub fn pick_distinct(rng: &mut Rng, count: u64, users: u64) -> Vec<u64> {
    assert!(count <= users);
    if count * 2 > users {
        let mut all: Vec<u64> = (1..=users).collect();
        rng.shuffle(&mut all);
        all.truncate(count as usize);
        return all;
    }
    let mut seen = ahash::AHashSet::with_capacity(count as usize);
    let mut out = Vec::with_capacity(count as usize);
    while (out.len() as u64) < count {
        let id = rng.range_inclusive(1, users);
        if seen.insert(id) {
            out.push(id);
        }
    }
    out
}

/// Parameters of the harness event model.
#[derive(Clone, Debug, Serialize)]
pub struct HarnessParams {
    /// Number of events.
    pub total_events: u64,
    /// Number of connected clients (distinct users).
    pub concurrency: u64,
    /// Number of users.
    pub users: u64,
    /// Seed.
    pub seed: u64,
    /// Largest batch.
    pub max_batch: u64,
}

/// The harness's event stream in seq order: a pure function of (users, seed), independent of
/// the batching, so a replay can pair the n-th event with the n-th recorded seq.
#[derive(Clone, Debug)]
pub struct HarnessEvents {
    rng: Rng,
    users: u64,
    next_seq: u64,
    total: u64,
}

impl HarnessEvents {
    /// Events 1..=total over users 1..=users.
    pub fn new(users: u64, seed: u64, total: u64) -> HarnessEvents {
        HarnessEvents {
            rng: Rng::new(seed, STREAM_EVENTS),
            users,
            next_seq: 1,
            total,
        }
    }

    fn other_user(&mut self, from: u64) -> u64 {
        let to = self.rng.range_inclusive(1, self.users - 1);
        if to >= from {
            to + 1
        } else {
            to
        }
    }

    /// The next event, or `None` after `total`.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.next_seq > self.total {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let r = self.rng.below(10_000);
        let from = self.rng.range_inclusive(1, self.users);
        let (kind, to) = if r < HARNESS_BROADCAST_BP {
            return Some(Event {
                seq,
                kind: Kind::Broadcast,
                from: 0,
                to: 0,
            });
        } else if r < HARNESS_BROADCAST_BP + HARNESS_FOLLOW_BP {
            (Kind::Follow, self.other_user(from))
        } else if r < HARNESS_BROADCAST_BP + HARNESS_FOLLOW_BP + HARNESS_UNFOLLOW_BP {
            (Kind::Unfollow, self.other_user(from))
        } else if r < HARNESS_BROADCAST_BP
            + HARNESS_FOLLOW_BP
            + HARNESS_UNFOLLOW_BP
            + HARNESS_PRIVATE_BP
        {
            (Kind::Private, self.other_user(from))
        } else {
            (Kind::Status, 0)
        };
        Some(Event {
            seq,
            kind,
            from,
            to,
        })
    }
}

/// Cuts an in-order event stream into contiguous batches of uniform size 1..=max, each
/// shuffled.
struct Batcher {
    rng: Rng,
    max_batch: u64,
    ending: LineEnding,
    order: Vec<u32>,
}

impl Batcher {
    fn new(seed: u64, max_batch: u64, ending: LineEnding) -> Batcher {
        Batcher {
            rng: Rng::new(seed, STREAM_BATCHES),
            max_batch,
            ending,
            order: Vec::new(),
        }
    }

    fn next(&mut self, mut next_event: impl FnMut() -> Option<Event>) -> Option<Batch> {
        let size = self.rng.range_inclusive(1, self.max_batch);
        let mut model = ModelChunk::default();
        for _ in 0..size {
            match next_event() {
                Some(ev) => model.push(ev),
                None => break,
            }
        }
        let n = model.events.len();
        if n == 0 {
            return None;
        }
        self.order.clear();
        self.order.extend(0..n as u32);
        self.rng.shuffle(&mut self.order);
        let end = self.ending.bytes();
        let mut wire = Vec::with_capacity(model.payload.len() + n * end.len());
        for &i in &self.order {
            wire.extend_from_slice(model.payload_of(i as usize));
            wire.extend_from_slice(end);
        }
        Some(Batch {
            wire,
            wire_events: n as u64,
            model,
        })
    }
}

/// The `harness` workload.
pub struct Harness {
    events: HarnessEvents,
    batcher: Batcher,
    clients: Vec<u64>,
    params: HarnessParams,
}

impl Harness {
    /// Validates the parameters and builds the workload.
    pub fn new(params: HarnessParams, ending: LineEnding) -> anyhow::Result<Harness> {
        if params.users < 2 {
            bail!("harness needs at least 2 users");
        }
        if params.concurrency > params.users {
            bail!(
                "concurrency {} exceeds the {} users",
                params.concurrency,
                params.users
            );
        }
        if params.max_batch == 0 || params.max_batch > MAX_BATCH_EVENTS {
            bail!("max batch must be in 1..={MAX_BATCH_EVENTS}");
        }
        let clients = pick_distinct(
            &mut Rng::new(params.seed, STREAM_CLIENTS),
            params.concurrency,
            params.users,
        );
        Ok(Harness {
            events: HarnessEvents::new(params.users, params.seed, params.total_events),
            batcher: Batcher::new(params.seed, params.max_batch, ending),
            clients,
            params,
        })
    }
}

impl Workload for Harness {
    fn clients(&self) -> &[u64] {
        &self.clients
    }
    fn max_user(&self) -> u64 {
        self.params.users
    }
    fn total_events(&self) -> Option<u64> {
        Some(self.params.total_events)
    }
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        let events = &mut self.events;
        Ok(self.batcher.next(|| events.next_event()))
    }
}

/// Parameters of the `fanout` workload.
#[derive(Clone, Debug, Serialize)]
pub struct FanoutParams {
    /// Number of users; user `r` has popularity rank `r`.
    pub users: u64,
    /// Number of connected clients (distinct users drawn uniformly).
    pub clients: u64,
    /// Follows made by each connected user in the first phase (Zipf-drawn followees).
    pub follows: u64,
    /// Zipf exponent of popularity.
    pub zipf: f64,
    /// Events of the second phase.
    pub events: u64,
    /// Share of status updates in the second phase (from Zipf-drawn users).
    pub status_share: f64,
    /// Share of broadcasts in the second phase.
    pub broadcast_share: f64,
    /// Seed.
    pub seed: u64,
    /// Largest batch.
    pub max_batch: u64,
}

/// The event stream of `fanout`, in seq order.
struct FanoutEvents {
    p: FanoutParams,
    rng: Rng,
    zipf: Zipf,
    clients: Vec<u64>,
    next_seq: u64,
    /// Phase 1 position: client index and how many follows it made.
    client_at: usize,
    made: u64,
    chosen: Vec<u64>,
    phase2_done: u64,
}

/// Attempts at drawing a distinct followee from the Zipf law before falling back to uniform.
const FOLLOW_DRAW_ATTEMPTS: u32 = 64;

impl FanoutEvents {
    fn next_event(&mut self) -> Option<Event> {
        let seq = self.next_seq;
        while self.client_at < self.clients.len() {
            if self.made == self.p.follows {
                self.client_at += 1;
                self.made = 0;
                self.chosen.clear();
                continue;
            }
            let from = self.clients[self.client_at];
            let mut to = 0;
            for attempt in 0.. {
                let cand = if attempt < FOLLOW_DRAW_ATTEMPTS {
                    self.zipf.sample(&mut self.rng)
                } else {
                    self.rng.range_inclusive(1, self.p.users)
                };
                if cand != from && !self.chosen.contains(&cand) {
                    to = cand;
                    break;
                }
            }
            self.chosen.push(to);
            self.made += 1;
            self.next_seq += 1;
            return Some(Event {
                seq,
                kind: Kind::Follow,
                from,
                to,
            });
        }
        if self.phase2_done == self.p.events {
            return None;
        }
        self.phase2_done += 1;
        self.next_seq += 1;
        let u = self.rng.unit_f64();
        let ev = if u < self.p.broadcast_share {
            Event {
                seq,
                kind: Kind::Broadcast,
                from: 0,
                to: 0,
            }
        } else if u < self.p.broadcast_share + self.p.status_share {
            Event {
                seq,
                kind: Kind::Status,
                from: self.zipf.sample(&mut self.rng),
                to: 0,
            }
        } else {
            let client = self.clients[self.rng.below(self.clients.len() as u64) as usize];
            match self.rng.below(3) {
                0 => {
                    let to = self.zipf.sample(&mut self.rng);
                    let to = if to == client {
                        to % self.p.users + 1
                    } else {
                        to
                    };
                    Event {
                        seq,
                        kind: Kind::Follow,
                        from: client,
                        to,
                    }
                }
                1 => {
                    let to = self.zipf.sample(&mut self.rng);
                    let to = if to == client {
                        to % self.p.users + 1
                    } else {
                        to
                    };
                    Event {
                        seq,
                        kind: Kind::Unfollow,
                        from: client,
                        to,
                    }
                }
                _ => {
                    let from = self.rng.range_inclusive(1, self.p.users);
                    let from = if from == client {
                        from % self.p.users + 1
                    } else {
                        from
                    };
                    Event {
                        seq,
                        kind: Kind::Private,
                        from,
                        to: client,
                    }
                }
            }
        };
        Some(ev)
    }
}

/// The `fanout` workload.
pub struct Fanout {
    events: FanoutEvents,
    batcher: Batcher,
}

impl Fanout {
    /// Validates the parameters and builds the workload.
    pub fn new(p: FanoutParams, ending: LineEnding) -> anyhow::Result<Fanout> {
        if p.users < 2 {
            bail!("fanout needs at least 2 users");
        }
        if p.clients == 0 || p.clients > p.users {
            bail!("clients must be in 1..={}", p.users);
        }
        if p.follows >= p.users {
            bail!("follows per user must be below the number of users");
        }
        if !(0.0..=1.0).contains(&p.status_share)
            || !(0.0..=1.0).contains(&p.broadcast_share)
            || p.status_share + p.broadcast_share > 1.0
        {
            bail!("status and broadcast shares must be in [0, 1] and add up to at most 1");
        }
        if p.zipf < 0.0 || !p.zipf.is_finite() {
            bail!("the Zipf exponent must be a finite number >= 0");
        }
        if p.max_batch == 0 || p.max_batch > MAX_BATCH_EVENTS {
            bail!("max batch must be in 1..={MAX_BATCH_EVENTS}");
        }
        let clients = pick_distinct(&mut Rng::new(p.seed, STREAM_CLIENTS), p.clients, p.users);
        Ok(Fanout {
            batcher: Batcher::new(p.seed, p.max_batch, ending),
            events: FanoutEvents {
                rng: Rng::new(p.seed, STREAM_FOLLOWS),
                zipf: Zipf::new(p.users, p.zipf),
                clients,
                next_seq: 1,
                client_at: 0,
                made: 0,
                chosen: Vec::new(),
                phase2_done: 0,
                p,
            },
        })
    }
}

impl Workload for Fanout {
    fn clients(&self) -> &[u64] {
        &self.events.clients
    }
    fn max_user(&self) -> u64 {
        self.events.p.users
    }
    fn total_events(&self) -> Option<u64> {
        Some(self.events.p.clients * self.events.p.follows + self.events.p.events)
    }
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        let events = &mut self.events;
        Ok(self.batcher.next(|| events.next_event()))
    }
}

/// Parameters of `replay`.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayParams {
    /// Connected clients.
    pub concurrency: u64,
    /// Users.
    pub users: u64,
    /// Seed of the harness events.
    pub seed: u64,
    /// Lines of the order file per write.
    pub batch_lines: u64,
    /// Use only the first `limit` lines of the file.
    pub limit: Option<u64>,
    /// Largest distance of a seq beyond the contiguous prefix.
    pub window: u64,
}

/// Slot of the replay's waiting ring.
#[derive(Clone, Copy)]
enum Slot {
    Generated(Event),
    Written(Event),
}

/// The `replay` workload: harness events written in the order of a file of seqs.
pub struct Replay<R: BufRead + Send> {
    order: R,
    params: ReplayParams,
    events: HarnessEvents,
    clients: Vec<u64>,
    ending: LineEnding,
    /// Events `prefix+1 ..` generated so far; index = seq - prefix - 1.
    waiting: VecDeque<Slot>,
    /// All seqs up to `prefix` are written.
    prefix: u64,
    lines_read: u64,
    line: String,
    finished: bool,
    /// Seqs never written, skipped at the end (as the server does at source close).
    pub holes: u64,
}

impl<R: BufRead + Send> Replay<R> {
    /// Builds the workload from an order reader (one seq a line).
    pub fn new(order: R, params: ReplayParams, ending: LineEnding) -> anyhow::Result<Self> {
        if params.users < 2 || params.concurrency > params.users {
            bail!("replay needs at least 2 users and at most as many clients as users");
        }
        if params.batch_lines == 0 || params.window == 0 || params.window > MAX_BATCH_EVENTS {
            bail!("batch lines must be >= 1 and window in 1..={MAX_BATCH_EVENTS}");
        }
        let clients = pick_distinct(
            &mut Rng::new(params.seed, STREAM_CLIENTS),
            params.concurrency,
            params.users,
        );
        Ok(Replay {
            order,
            events: HarnessEvents::new(params.users, params.seed, u64::MAX),
            clients,
            ending,
            waiting: VecDeque::new(),
            prefix: 0,
            lines_read: 0,
            line: String::new(),
            finished: false,
            holes: 0,
            params,
        })
    }

    fn read_seq(&mut self) -> anyhow::Result<Option<u64>> {
        loop {
            if self.params.limit.is_some_and(|l| self.lines_read >= l) {
                return Ok(None);
            }
            self.line.clear();
            if self.order.read_line(&mut self.line)? == 0 {
                return Ok(None);
            }
            self.lines_read += 1;
            let t = self.line.trim();
            if t.is_empty() {
                continue;
            }
            let seq: u64 = t.parse().with_context(|| {
                format!("order file line {}: {t:?} is not a seq", self.lines_read)
            })?;
            return Ok(Some(seq));
        }
    }
}

impl<R: BufRead + Send> Workload for Replay<R> {
    fn clients(&self) -> &[u64] {
        &self.clients
    }
    fn max_user(&self) -> u64 {
        self.params.users
    }
    fn total_events(&self) -> Option<u64> {
        self.params.limit
    }
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        if self.finished {
            return Ok(None);
        }
        let mut batch = Batch::default();
        let end = self.ending.bytes();
        while batch.wire_events < self.params.batch_lines {
            let Some(seq) = self.read_seq()? else { break };
            if seq <= self.prefix || seq - self.prefix > self.params.window {
                bail!(
                    "order file line {}: seq {seq} is a repeat or further than the window {} \
                     beyond {}",
                    self.lines_read,
                    self.params.window,
                    self.prefix
                );
            }
            let idx = (seq - self.prefix - 1) as usize;
            while self.waiting.len() <= idx {
                let ev = self.events.next_event().expect("unbounded");
                self.waiting.push_back(Slot::Generated(ev));
            }
            let ev = match self.waiting[idx] {
                Slot::Generated(ev) => ev,
                Slot::Written(_) => {
                    bail!("order file line {}: seq {seq} repeats", self.lines_read)
                }
            };
            self.waiting[idx] = Slot::Written(ev);
            ev.render(&mut batch.wire);
            batch.wire.extend_from_slice(end);
            batch.wire_events += 1;
        }
        while let Some(Slot::Written(ev)) = self.waiting.front().copied() {
            self.waiting.pop_front();
            self.prefix += 1;
            batch.model.push(ev);
        }
        if batch.wire_events == 0 {
            // End of the order: what was written beyond holes is delivered at source close,
            // skipping the holes.
            self.finished = true;
            for slot in self.waiting.drain(..) {
                match slot {
                    Slot::Written(ev) => batch.model.push(ev),
                    Slot::Generated(_) => self.holes += 1,
                }
            }
            if batch.model.events.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harness(total: u64, max_batch: u64) -> Harness {
        Harness::new(
            HarnessParams {
                total_events: total,
                concurrency: 100,
                users: 1000,
                seed: 666,
                max_batch,
            },
            LineEnding::Lf,
        )
        .unwrap()
    }

    fn all_wire(w: &mut dyn Workload) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = w.next_batch().unwrap() {
            out.extend_from_slice(&b.wire);
        }
        out
    }

    #[test]
    fn render_formats_every_type() {
        let mut out = Vec::new();
        for ev in [
            Event {
                seq: 666,
                kind: Kind::Follow,
                from: 60,
                to: 50,
            },
            Event {
                seq: 1,
                kind: Kind::Unfollow,
                from: 12,
                to: 9,
            },
            Event {
                seq: 542532,
                kind: Kind::Broadcast,
                from: 0,
                to: 0,
            },
            Event {
                seq: 43,
                kind: Kind::Private,
                from: 32,
                to: 56,
            },
            Event {
                seq: 634,
                kind: Kind::Status,
                from: 32,
                to: 0,
            },
            Event {
                seq: u64::MAX,
                kind: Kind::Status,
                from: 0,
                to: 0,
            },
        ] {
            ev.render(&mut out);
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "666|F|60|50 1|U|12|9 542532|B 43|P|32|56 634|S|32 18446744073709551615|S|0 "
        );
    }

    #[test]
    fn same_params_same_bytes() {
        let a = all_wire(&mut harness(5000, 100));
        let b = all_wire(&mut harness(5000, 100));
        assert_eq!(a, b);
        let mut other = Harness::new(
            HarnessParams {
                total_events: 5000,
                concurrency: 100,
                users: 1000,
                seed: 667,
                max_batch: 100,
            },
            LineEnding::Lf,
        )
        .unwrap();
        assert_ne!(a, all_wire(&mut other));
    }

    #[test]
    fn harness_clients_distinct_and_in_range() {
        let h = harness(1, 100);
        let mut c = h.clients().to_vec();
        assert_eq!(c.len(), 100);
        assert!(c.iter().all(|&u| (1..=1000).contains(&u)));
        c.sort();
        c.dedup();
        assert_eq!(c.len(), 100);
    }

    #[test]
    fn harness_type_shares_roughly_right() {
        let mut ev = HarnessEvents::new(1000, 666, 200_000);
        let mut counts = [0u64; 5];
        while let Some(e) = ev.next_event() {
            let i = match e.kind {
                Kind::Follow => 0,
                Kind::Unfollow => 1,
                Kind::Private => 2,
                Kind::Status => 3,
                Kind::Broadcast => 4,
            };
            counts[i] += 1;
            if e.kind != Kind::Broadcast {
                assert!((1..=1000).contains(&e.from));
            }
            if matches!(e.kind, Kind::Follow | Kind::Unfollow | Kind::Private) {
                assert!((1..=1000).contains(&e.to) && e.to != e.from);
            }
        }
        let share = |i: usize| counts[i] as f64 / 200_000.0;
        for i in 0..3 {
            assert!((share(i) - 0.15).abs() < 0.005, "{counts:?}");
        }
        assert!((share(3) - 0.5499).abs() < 0.005, "{counts:?}");
        assert!(counts[4] > 2 && counts[4] < 60, "{counts:?}");
    }

    #[test]
    fn batches_contiguous_shuffled_and_sized() {
        let mut h = harness(20_000, 100);
        let mut next = 1;
        let mut shuffled = 0;
        let mut sizes = Vec::new();
        while let Some(b) = h.next_batch().unwrap() {
            let n = b.model.events.len();
            sizes.push(n);
            assert!((1..=100).contains(&n));
            assert_eq!(b.wire_events as usize, n);
            for (i, e) in b.model.events.iter().enumerate() {
                assert_eq!(e.seq, next + i as u64);
            }
            let wire_seqs: Vec<u64> = std::str::from_utf8(&b.wire)
                .unwrap()
                .lines()
                .map(|l| l.split('|').next().unwrap().parse().unwrap())
                .collect();
            let mut sorted = wire_seqs.clone();
            sorted.sort();
            assert_eq!(sorted, (next..next + n as u64).collect::<Vec<_>>());
            if wire_seqs != sorted {
                shuffled += 1;
            }
            next += n as u64;
        }
        assert_eq!(next, 20_001);
        assert!(shuffled * 10 > sizes.len() * 9, "most batches shuffled");
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!((mean - 50.5).abs() < 5.0, "{mean}");
    }

    #[test]
    fn crlf_terminates_every_line() {
        let mut h = Harness::new(
            HarnessParams {
                total_events: 300,
                concurrency: 10,
                users: 100,
                seed: 1,
                max_batch: 10,
            },
            LineEnding::Crlf,
        )
        .unwrap();
        let w = all_wire(&mut h);
        let s = String::from_utf8(w).unwrap();
        assert_eq!(s.matches("\r\n").count(), 300);
        assert_eq!(s.matches('\n').count(), 300);
    }

    #[test]
    fn replay_pairs_seqs_with_harness_events() {
        let order = "3\n1\n2\n5\n4\n6\n";
        let params = ReplayParams {
            concurrency: 5,
            users: 50,
            seed: 9,
            batch_lines: 2,
            limit: None,
            window: 100,
        };
        let mut r = Replay::new(order.as_bytes(), params, LineEnding::Lf).unwrap();
        let mut reference = HarnessEvents::new(50, 9, 6);
        let evs: Vec<Event> = std::iter::from_fn(|| reference.next_event()).collect();
        let b1 = r.next_batch().unwrap().unwrap();
        let mut exp = Vec::new();
        evs[2].render(&mut exp);
        exp.push(b'\n');
        evs[0].render(&mut exp);
        exp.push(b'\n');
        assert_eq!(b1.wire, exp);
        assert_eq!(b1.model.events, vec![evs[0]]);
        let b2 = r.next_batch().unwrap().unwrap();
        assert_eq!(b2.model.events, evs[1..3].to_vec());
        let b3 = r.next_batch().unwrap().unwrap();
        assert_eq!(b3.model.events, evs[3..6].to_vec());
        assert!(r.next_batch().unwrap().is_none());
        assert_eq!(
            r.clients(),
            Harness::new(
                HarnessParams {
                    total_events: 1,
                    concurrency: 5,
                    users: 50,
                    seed: 9,
                    max_batch: 1
                },
                LineEnding::Lf,
            )
            .unwrap()
            .clients()
        );
    }

    #[test]
    fn replay_skips_holes_at_the_end_and_rejects_repeats() {
        let params = ReplayParams {
            concurrency: 5,
            users: 50,
            seed: 9,
            batch_lines: 10,
            limit: None,
            window: 100,
        };
        let mut r = Replay::new("2\n4\n".as_bytes(), params.clone(), LineEnding::Lf).unwrap();
        let b = r.next_batch().unwrap().unwrap();
        assert!(b.model.events.is_empty());
        let end = r.next_batch().unwrap().unwrap();
        assert_eq!(
            end.model.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 4]
        );
        assert_eq!(r.holes, 2);
        assert!(r.next_batch().unwrap().is_none());
        let mut bad = Replay::new("2\n2\n".as_bytes(), params, LineEnding::Lf).unwrap();
        assert!(bad.next_batch().is_err());
    }

    #[test]
    fn fanout_builds_follows_then_status_heavy_stream() {
        let p = FanoutParams {
            users: 1000,
            clients: 50,
            follows: 10,
            zipf: 1.0,
            events: 2000,
            status_share: 0.9,
            broadcast_share: 0.0,
            seed: 5,
            max_batch: 100,
        };
        let mut f = Fanout::new(p, LineEnding::Lf).unwrap();
        let mut all = Vec::new();
        while let Some(b) = f.next_batch().unwrap() {
            all.extend(b.model.events);
        }
        assert_eq!(all.len(), 500 + 2000);
        assert!(all[..500].iter().all(|e| e.kind == Kind::Follow));
        let statuses = all[500..].iter().filter(|e| e.kind == Kind::Status).count();
        assert!((1700..1900).contains(&statuses), "{statuses}");
        let from_top10 = all[500..]
            .iter()
            .filter(|e| e.kind == Kind::Status && e.from <= 10)
            .count();
        assert!(
            from_top10 * 3 > statuses,
            "popular users dominate: {from_top10}/{statuses}"
        );
        // Each client's follows are distinct and not itself.
        for chunk in all[..500].chunks(10) {
            let mut tos: Vec<u64> = chunk.iter().map(|e| e.to).collect();
            assert!(chunk
                .iter()
                .all(|e| e.from == chunk[0].from && e.to != e.from));
            tos.sort();
            tos.dedup();
            assert_eq!(tos.len(), 10);
        }
    }
}
