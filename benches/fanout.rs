//! Fan-out throughput of one shard, in notifications per second: `Router::apply` walking an
//! ordered batch against a dense follow graph and appending every notification to its
//! client's output buffer (`Router::new(0, 1, usize::MAX)`: one shard owns everyone, no
//! backlog limit).
//!
//! Two graphs, each built before timing by applying one batch of F events:
//!
//! * `clients_100`: 1000 users, users 1..=100 connected; every user follows each other user
//!   with probability 1/2 (about 500 followees each), the dense late stage of a harness run,
//!   so a status update reaches about 50 connected followers.
//! * `clients_10000`: 10,000 users, all connected; every user follows 20 distinct users drawn
//!   from a Zipf distribution (s = 1) over the user ids, so the in-degree is heavy-tailed:
//!   user 1 is followed by most users, the median user by nobody.
//!
//! Timed batches (built before timing):
//!
//! * `status`: S events only; senders uniform over the users for `clients_100` (4096 events,
//!   about one 64 KiB read) and Zipf-distributed for `clients_10000` (256 events: the heavy
//!   users post, as in the high fan-out workload; about half a million notifications).
//! * `mixed`: 4096 events of the harness mix (F, U, P 15% each, S 54.99%, B 0.01%, users
//!   uniform). Its F/U events change the graph, so the batch is applied once before timing;
//!   from then on every application starts from and ends in the same graph, and gives the
//!   same notification count (checked on every iteration).
//!
//! Each iteration times one `apply`; then, outside the timing, it checks the notification
//! count (`take_notification_count`) and clears the output buffer of every client that got
//! output (`take_dirty`, `clear_pending`), so buffers keep their capacity but start empty.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use efr::batch::OrderedBatch;
use efr::protocol::parse_event;
use efr::router::{ClientId, Router};

mod common;
use common::{harness_line, Rng, Zipf};

/// Builds a batch from text lines (without terminators), numbering them from `first_seq`.
struct BatchBuilder {
    batch: OrderedBatch,
    line: Vec<u8>,
    seq: u64,
}

impl BatchBuilder {
    fn new(first_seq: u64) -> Self {
        BatchBuilder {
            batch: OrderedBatch::default(),
            line: Vec::new(),
            seq: first_seq,
        }
    }

    fn push_with(&mut self, write: impl FnOnce(u64, &mut Vec<u8>)) {
        self.line.clear();
        write(self.seq, &mut self.line);
        let event = parse_event(&self.line).expect("generated lines parse");
        self.batch.push(event, &self.line);
        self.seq += 1;
    }

    fn push_text(&mut self, text: impl FnOnce(u64) -> String) {
        self.push_with(|seq, line| line.extend_from_slice(text(seq).as_bytes()));
    }

    fn finish(self) -> (OrderedBatch, u64) {
        (self.batch, self.seq)
    }
}

/// A shard with its clients and graph, ready for timed batches.
struct Setup {
    router: Router,
    dirty: Vec<ClientId>,
    next_seq: u64,
}

impl Setup {
    fn clear_output(&mut self) {
        self.router.take_dirty(&mut self.dirty);
        for &client in &self.dirty {
            self.router.clear_pending(client);
        }
        self.router.take_notification_count();
    }

    /// Applies `batch` untimed until its notification count is stable; returns that count.
    fn settle(&mut self, batch: &OrderedBatch) -> u64 {
        let mut previous = u64::MAX;
        loop {
            self.router.apply(batch);
            let count = self.router.take_notification_count();
            self.clear_output();
            if count == previous {
                return count;
            }
            previous = count;
        }
    }
}

fn dense_100() -> Setup {
    let users = 1000u64;
    let mut router = Router::new(0, 1, usize::MAX);
    for user in 1..=100 {
        router.register(user, ());
    }
    let mut rng = Rng::new(0x5eed_0004);
    let mut follows = BatchBuilder::new(1);
    for from in 1..=users {
        for to in 1..=users {
            if from != to && rng.below(2) == 0 {
                follows.push_text(|seq| format!("{seq}|F|{from}|{to}"));
            }
        }
    }
    let (follows, next_seq) = follows.finish();
    router.apply(&follows);
    let mut setup = Setup {
        router,
        dirty: Vec::new(),
        next_seq,
    };
    setup.clear_output();
    setup
}

fn heavy_tailed_10000() -> Setup {
    let users = 10_000u64;
    let mut router = Router::new(0, 1, usize::MAX);
    for user in 1..=users {
        router.register(user, ());
    }
    let zipf = Zipf::new(users);
    let mut rng = Rng::new(0x5eed_0005);
    let mut follows = BatchBuilder::new(1);
    let mut chosen = Vec::with_capacity(20);
    for from in 1..=users {
        chosen.clear();
        while chosen.len() < 20 {
            let to = zipf.sample(&mut rng);
            if to != from && !chosen.contains(&to) {
                chosen.push(to);
            }
        }
        for &to in &chosen {
            follows.push_text(|seq| format!("{seq}|F|{from}|{to}"));
        }
    }
    let (follows, next_seq) = follows.finish();
    router.apply(&follows);
    let mut setup = Setup {
        router,
        dirty: Vec::new(),
        next_seq,
    };
    setup.clear_output();
    setup
}

fn status_batch(first_seq: u64, count: u64, mut sender: impl FnMut() -> u64) -> OrderedBatch {
    let mut builder = BatchBuilder::new(first_seq);
    for _ in 0..count {
        let from = sender();
        builder.push_text(|seq| format!("{seq}|S|{from}"));
    }
    builder.finish().0
}

fn mixed_batch(first_seq: u64, count: u64, users: u64, seed: u64) -> OrderedBatch {
    let mut rng = Rng::new(seed);
    let mut builder = BatchBuilder::new(first_seq);
    for _ in 0..count {
        builder.push_with(|seq, line| harness_line(seq, users, &mut rng, line));
    }
    builder.finish().0
}

fn bench_batch(c: &mut Criterion, group: &str, setups: Vec<(&str, Setup, OrderedBatch)>) {
    let mut group = c.benchmark_group(group);
    group.sample_size(20);
    for (name, mut setup, batch) in setups {
        let notifications = setup.settle(&batch);
        eprintln!(
            "{name}: {} events, {notifications} notifications per apply",
            batch.len()
        );
        group.throughput(Throughput::Elements(notifications));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    setup.router.apply(&batch);
                    total += start.elapsed();
                    assert_eq!(setup.router.take_notification_count(), notifications);
                    setup.clear_output();
                }
                total
            })
        });
    }
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let setup = dense_100();
    let mut rng = Rng::new(0x5eed_0006);
    let status = status_batch(setup.next_seq, 4096, || 1 + rng.below(1000));
    let mixed = mixed_batch(setup.next_seq, 4096, 1000, 0x5eed_0007);
    let mixed_setup = dense_100();
    bench_batch(
        c,
        "fanout/clients_100",
        vec![("status", setup, status), ("mixed", mixed_setup, mixed)],
    );

    let setup = heavy_tailed_10000();
    let zipf = Zipf::new(10_000);
    let mut rng = Rng::new(0x5eed_0008);
    let status = status_batch(setup.next_seq, 256, || zipf.sample(&mut rng));
    let mixed = mixed_batch(setup.next_seq, 4096, 10_000, 0x5eed_0009);
    let mixed_setup = heavy_tailed_10000();
    bench_batch(
        c,
        "fanout/clients_10000",
        vec![("status", setup, status), ("mixed", mixed_setup, mixed)],
    );
}

criterion_group!(benches, fanout);
criterion_main!(benches);
