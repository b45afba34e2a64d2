//! Resequencer throughput, in events per second, for the three kinds (`heap`, `stream`,
//! `batch`) on four arrival orders of 100,000 events:
//!
//! * `harness_arrival`: contiguous batches of uniform size 1..=100, each shuffled (the original
//!   harness's source); one read = one batch.
//! * `recorded_order`: the real arrival order recorded from a harness run,
//!   `tests/data/harness-arrival-order-100k.txt`, fed in reads of 100 lines.
//! * `in_order`: seqs 1, 2, 3, ... in reads of 100.
//! * `reversed_window`: blocks of 4096 seqs, each block in descending order, so every block
//!   is a full reversal inside the window; reads of 128, so that a read never holds the end
//!   of one block and the start of the next (`heap` offers a whole read before releasing, so
//!   the next block's first seq would then lie beyond a 4096 window).
//!
//! Events and payloads follow the harness mix (see `common`) and are built before timing,
//! laid out in arrival order (the sequencer offers lines it just parsed, hot in cache). Each timed iteration offers every event of every read, calls `end_of_read`
//! after each read, and `finish` at the end. The resequencer is reset and the output batch
//! cleared between iterations, outside the timing; inside it the batch is cleared after each
//! read (the server ships one batch per read), so its buffers stay warm and the allocator is
//! not measured.
//!
//! Capacities: `heap` and `stream` use the server's default window (65,536) except for
//! `reversed_window`, which uses a window of 4096 (the reversal spans the whole window).
//! `batch` uses a buffer of 4096 everywhere: for `reversed_window` and `in_order` its buffers
//! line up with the disorder, which is the input it is meant for; on the harness orders some
//! shuffled batches straddle a buffer boundary and it releases out of order (the number of
//! such order violations is printed once, before timing).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use efr::batch::OrderedBatch;
use efr::config::DEFAULT_RESEQUENCER_CAPACITY;
use efr::protocol::{parse_event, Event};
use efr::resequencer::{Resequencer, ResequencerKind};

mod common;
use common::{harness_line, Rng};

/// Events per scenario (the length of the recorded order).
const EVENTS: u64 = 100_000;
/// Events per read where the scenario does not define its reads.
const READ_LINES: usize = 100;
/// The reversed block size, window of `heap`/`stream` in that scenario.
const REVERSAL: u64 = 4096;
/// Events per read in the reversal scenario (divides [`REVERSAL`]).
const REVERSAL_READ_LINES: usize = 128;
/// The `batch` kind's buffer size in every scenario.
const BATCH_CAPACITY: u64 = 4096;
/// Users the harness events refer to.
const USERS: u64 = 1000;

/// The recorded harness arrival order, read when the bench runs (`tests/data`, see its README).
const RECORDED_ORDER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/harness-arrival-order-100k.txt"
);

/// The events of a workload, indexed by `seq - 1`, with their payloads in one buffer.
struct Workload {
    events: Vec<Event>,
    payload_bounds: Vec<(u32, u32)>,
    payloads: Vec<u8>,
}

impl Workload {
    fn harness(count: u64) -> Self {
        let mut rng = Rng::new(0x5eed_0001);
        let mut events = Vec::with_capacity(count as usize);
        let mut payload_bounds = Vec::with_capacity(count as usize);
        let mut payloads = Vec::new();
        for seq in 1..=count {
            let start = payloads.len();
            harness_line(seq, USERS, &mut rng, &mut payloads);
            let event = parse_event(&payloads[start..]).expect("generated lines parse");
            events.push(event);
            payload_bounds.push((start as u32, payloads.len() as u32));
        }
        Workload {
            events,
            payload_bounds,
            payloads,
        }
    }

    #[inline]
    fn get(&self, seq: u64) -> (Event, &[u8]) {
        let index = (seq - 1) as usize;
        let (start, end) = self.payload_bounds[index];
        (
            self.events[index],
            &self.payloads[start as usize..end as usize],
        )
    }
}

/// An arrival order cut into reads.
struct Arrival {
    seqs: Vec<u64>,
    /// End (exclusive) of each read in `seqs`.
    read_ends: Vec<usize>,
}

impl Arrival {
    fn in_reads_of(seqs: Vec<u64>, lines: usize) -> Self {
        let read_ends = (1..=seqs.len().div_ceil(lines))
            .map(|read| (read * lines).min(seqs.len()))
            .collect();
        Arrival { seqs, read_ends }
    }

    fn harness(count: u64) -> Self {
        let mut rng = Rng::new(0x5eed_0002);
        let mut seqs = Vec::with_capacity(count as usize);
        let mut read_ends = Vec::new();
        let mut next = 1;
        while next <= count {
            let size = (1 + rng.below(100)).min(count - next + 1);
            let start = seqs.len();
            seqs.extend(next..next + size);
            rng.shuffle(&mut seqs[start..]);
            read_ends.push(seqs.len());
            next += size;
        }
        Arrival { seqs, read_ends }
    }

    fn recorded() -> Self {
        let text = std::fs::read_to_string(RECORDED_ORDER)
            .unwrap_or_else(|error| panic!("cannot read {RECORDED_ORDER}: {error}"));
        let seqs: Vec<u64> = text
            .lines()
            .map(|line| line.trim().parse().expect("one seq per line"))
            .collect();
        assert_eq!(
            seqs.len() as u64,
            EVENTS,
            "the recorded order has 100k seqs"
        );
        Arrival::in_reads_of(seqs, READ_LINES)
    }

    fn in_order(count: u64) -> Self {
        Arrival::in_reads_of((1..=count).collect(), READ_LINES)
    }

    fn reversed_blocks(count: u64, block: u64) -> Self {
        let mut seqs: Vec<u64> = (1..=count).collect();
        for chunk in seqs.chunks_mut(block as usize) {
            chunk.reverse();
        }
        Arrival::in_reads_of(seqs, REVERSAL_READ_LINES)
    }
}

/// An arrival laid out for the timed loop: events and payloads in arrival order, so the
/// loop reads its input sequentially, as the sequencer reads freshly parsed lines from its
/// read buffer (an input indexed by seq would add cache misses the server does not have).
struct Feed {
    events: Vec<Event>,
    payload_ends: Vec<u32>,
    payloads: Vec<u8>,
    read_ends: Vec<usize>,
}

impl Feed {
    fn new(workload: &Workload, arrival: &Arrival) -> Self {
        let mut events = Vec::with_capacity(arrival.seqs.len());
        let mut payload_ends = Vec::with_capacity(arrival.seqs.len());
        let mut payloads = Vec::with_capacity(workload.payloads.len());
        for &seq in &arrival.seqs {
            let (event, payload) = workload.get(seq);
            events.push(event);
            payloads.extend_from_slice(payload);
            payload_ends.push(payloads.len() as u32);
        }
        Feed {
            events,
            payload_ends,
            payloads,
            read_ends: arrival.read_ends.clone(),
        }
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    /// Offers every read and calls `end_of_read` after each; `on_read` sees the batch
    /// released by each read. Ends with `finish`.
    #[inline]
    fn run(
        &self,
        reseq: &mut Resequencer,
        out: &mut OrderedBatch,
        mut on_read: impl FnMut(&mut OrderedBatch),
    ) {
        let mut start = 0;
        let mut payload_start = 0;
        for &end in &self.read_ends {
            for (event, &payload_end) in self.events[start..end]
                .iter()
                .zip(&self.payload_ends[start..end])
            {
                let payload = &self.payloads[payload_start..payload_end as usize];
                reseq.offer(*event, payload, out);
                payload_start = payload_end as usize;
            }
            reseq.end_of_read(out);
            on_read(out);
            start = end;
        }
        reseq.finish(out, |_| {});
        on_read(out);
    }
}

/// One run outside timing: checks that everything comes out, and in order for `heap` and
/// `stream`; returns the order violations (`batch` only).
fn check(reseq: &mut Resequencer, feed: &Feed) -> u64 {
    let mut out = OrderedBatch::default();
    feed.run(reseq, &mut out, |_| {});
    assert_eq!(out.len(), feed.len(), "{:?}", reseq.kind());
    if reseq.kind() != ResequencerKind::Batch {
        assert!(out.seqs().zip(1..).all(|(seq, expected)| seq == expected));
    }
    reseq.order_violations()
}

fn resequencer(c: &mut Criterion) {
    let workload = Workload::harness(EVENTS);
    let scenarios = [
        (
            "harness_arrival",
            Arrival::harness(EVENTS),
            DEFAULT_RESEQUENCER_CAPACITY,
        ),
        (
            "recorded_order",
            Arrival::recorded(),
            DEFAULT_RESEQUENCER_CAPACITY,
        ),
        (
            "in_order",
            Arrival::in_order(EVENTS),
            DEFAULT_RESEQUENCER_CAPACITY,
        ),
        (
            "reversed_window",
            Arrival::reversed_blocks(EVENTS, REVERSAL),
            REVERSAL,
        ),
    ];
    let kinds = [
        ("heap", ResequencerKind::Heap),
        ("stream", ResequencerKind::Stream),
        ("batch", ResequencerKind::Batch),
    ];
    for (name, arrival, window) in &scenarios {
        let feed = Feed::new(&workload, arrival);
        let mut group = c.benchmark_group(format!("resequencer/{name}"));
        group.throughput(Throughput::Elements(feed.len() as u64));
        group.sample_size(20);
        for (kind_name, kind) in kinds {
            let capacity = match kind {
                ResequencerKind::Batch => BATCH_CAPACITY,
                _ => *window,
            };
            let mut reseq = Resequencer::new(kind, capacity, 1);
            let violations = check(&mut reseq, &feed);
            if kind == ResequencerKind::Batch {
                eprintln!("resequencer/{name}/batch: {violations} order violations per run");
            }
            let mut out = OrderedBatch::with_capacity(4 * REVERSAL as usize);
            group.bench_function(BenchmarkId::from_parameter(kind_name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        reseq.reset(1);
                        out.clear();
                        let mut released = 0;
                        let start = Instant::now();
                        feed.run(&mut reseq, &mut out, |batch| {
                            released += batch.len();
                            batch.clear();
                        });
                        total += start.elapsed();
                        assert_eq!(black_box(released), feed.len());
                    }
                    total
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, resequencer);
criterion_main!(benches);
