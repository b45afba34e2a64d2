//! Input generators shared by the benches: a small deterministic random generator, the
//! harness event mix, and a Zipf sampler for heavy-tailed follow graphs. Everything is built
//! before any timing starts and is the same in every run (fixed seeds).

// Each bench uses only some of these helpers.
#![allow(dead_code)]

/// xorshift64: deterministic and dependency-free; good enough to shuffle and pick users.
pub struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Appends one event line of the harness mix (no terminator): F, U, P 15% each, B 0.01%,
/// S the rest (54.99%); `from` and `to` uniform over `1..=users`.
pub fn harness_line(seq: u64, users: u64, rng: &mut Rng, out: &mut Vec<u8>) {
    use std::io::Write;
    let roll = rng.below(10_000);
    let from = 1 + rng.below(users);
    let to = 1 + rng.below(users);
    let _ = match roll {
        0 => write!(out, "{seq}|B"),
        1..=1500 => write!(out, "{seq}|F|{from}|{to}"),
        1501..=3000 => write!(out, "{seq}|U|{from}|{to}"),
        3001..=4500 => write!(out, "{seq}|P|{from}|{to}"),
        _ => write!(out, "{seq}|S|{from}"),
    };
}

/// Samples ranks `1..=n` with probability proportional to `1 / rank` (Zipf, s = 1).
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// The sampler over `1..=n`.
    pub fn new(n: u64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.into_iter().map(|c| c / total).collect();
        Zipf { cumulative }
    }

    /// One rank.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let index = self.cumulative.partition_point(|&c| c <= u);
        index.min(self.cumulative.len() - 1) as u64 + 1
    }
}
