//! Parsing throughput, in lines per second, on 100,000 event lines of the harness mix
//! (F, U, P 15% each, S 54.99%, B 0.01%; users 1..=1000; seqs 1..=100,000), all in one
//! buffer built before timing.
//!
//! * `split_and_parse`: what the sequencer does per read. A `LineSplitter` with the server's
//!   default line limit takes the buffer in reads of 64 KiB (each read is a copy into
//!   `spare()`, standing in for the socket read, then `commit`), and every line it yields goes
//!   through `parse_event`.
//! * `parse_only`: `parse_event` on lines split beforehand (slices into the same buffer).
//! * `split_only`: the splitter alone, to show how the time divides between the two.
//!
//! Each iteration folds the parsed fields into a checksum so nothing is optimised away.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use efr::config::DEFAULT_MAX_LINE;
use efr::line::{Line, LineSplitter};
use efr::protocol::parse_event;

mod common;
use common::{harness_line, Rng};

/// Lines in the buffer.
const LINES: u64 = 100_000;
/// Bytes given to each simulated read.
const READ_SIZE: usize = 64 * 1024;
/// Users the events refer to.
const USERS: u64 = 1000;

fn input() -> Vec<u8> {
    let mut rng = Rng::new(0x5eed_0003);
    let mut bytes = Vec::with_capacity(LINES as usize * 16);
    for seq in 1..=LINES {
        harness_line(seq, USERS, &mut rng, &mut bytes);
        bytes.push(b'\n');
    }
    bytes
}

/// Runs the whole input through the splitter in 64 KiB reads, handing each line to `each`.
#[inline]
fn split(splitter: &mut LineSplitter, input: &[u8], mut each: impl FnMut(&[u8])) {
    splitter.reset();
    let mut position = 0;
    while position < input.len() {
        let room = splitter.spare();
        let n = room.len().min(READ_SIZE).min(input.len() - position);
        room[..n].copy_from_slice(&input[position..position + n]);
        splitter.commit(n);
        position += n;
        while let Some(line) = splitter.next_line() {
            if let Line::Complete(line) = line {
                each(line);
            }
        }
    }
}

#[inline]
fn checksum(line: &[u8]) -> u64 {
    match parse_event(line) {
        Ok(event) => event.seq ^ event.from.wrapping_add(event.to) ^ event.kind as u64,
        Err(_) => 1,
    }
}

fn parse(c: &mut Criterion) {
    let input = input();
    let mut splitter = LineSplitter::new(DEFAULT_MAX_LINE);
    let mut lines: Vec<&[u8]> = Vec::with_capacity(LINES as usize);
    for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        lines.push(line);
    }
    let mut count = 0;
    split(&mut splitter, &input, |line| {
        assert!(parse_event(line).is_ok());
        count += 1;
    });
    assert_eq!(count, LINES);
    assert_eq!(lines.len() as u64, LINES);

    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(LINES));
    group.sample_size(30);
    group.bench_function("split_and_parse", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            split(&mut splitter, black_box(&input), |line| {
                sum = sum.wrapping_add(checksum(line))
            });
            sum
        })
    });
    group.bench_function("parse_only", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for line in black_box(&lines) {
                sum = sum.wrapping_add(checksum(line));
            }
            sum
        })
    });
    group.bench_function("split_only", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            split(&mut splitter, black_box(&input), |line| {
                sum = sum.wrapping_add(line.len() as u64)
            });
            sum
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
