//! One event at a time against a running server: the source sends `n|P|1|U`, the client of
//! user U waits for it, and only then is the next one sent. Prints the round-trip p50, p99,
//! p99.9 and max, separately for a user owned by shard 0 (on the sequencer's executor: no
//! hop between executors) and one owned by the last shard (the sequencer wakes another
//! executor), alternating between them. With the server idle between events, this is the
//! wake-up path's latency.
//!
//! `cargo run --release --example wake_ping -- EVENT_PORT CLIENT_PORT CORES [COUNT]`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Round trips sent first and not counted (connections warm, registrations done).
const WARM_UP: u64 = 200;
/// Pause after the id lines, so the client is registered before the first event.
const SETTLE: Duration = Duration::from_millis(300);

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: wake_ping EVENT_PORT CLIENT_PORT CORES [COUNT]");
        std::process::exit(2);
    }
    let event_port: u16 = args[1].parse().expect("event port");
    let client_port: u16 = args[2].parse().expect("client port");
    let cores: usize = args[3].parse().expect("cores");
    let count: u64 = args.get(4).map_or(3_000, |c| c.parse().expect("count"));

    // The first users (from 2) owned by shard 0 and by the last shard.
    let ownership = efr::router::Ownership::new(cores);
    let owned_by = |shard: usize, from: u64| (from..).find(|&u| ownership.owner(u) == shard);
    let local = owned_by(0, 2).unwrap();
    let last = owned_by(cores - 1, local + 1).unwrap();
    let targets = [("shard 0 (same executor)", local), ("last shard", last)];
    let mut readers = Vec::new();
    for (_, user) in targets {
        let client = TcpStream::connect(("127.0.0.1", client_port))?;
        client.set_nodelay(true)?;
        (&client).write_all(format!("{user}\n").as_bytes())?;
        client.set_read_timeout(Some(Duration::from_secs(10)))?;
        readers.push(BufReader::new(client));
    }
    std::thread::sleep(SETTLE);
    let mut source = TcpStream::connect(("127.0.0.1", event_port))?;
    source.set_nodelay(true)?;

    let mut histograms: Vec<_> = targets
        .iter()
        .map(|_| {
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("histogram bounds")
        })
        .collect();
    let mut line = String::new();
    for seq in 1..=2 * (WARM_UP + count) {
        let which = (seq % 2) as usize;
        let event = format!("{seq}|P|1|{}\n", targets[which].1);
        let sent = Instant::now();
        source.write_all(event.as_bytes())?;
        line.clear();
        readers[which].read_line(&mut line)?;
        let micros = sent.elapsed().as_micros() as u64;
        assert_eq!(line, event, "the client got another line");
        if seq > 2 * WARM_UP {
            histograms[which].record(micros.max(1)).expect("in bounds");
        }
    }
    for ((name, user), histogram) in targets.iter().zip(&histograms) {
        println!(
            "--cores {cores}, user {user} on {name}: {count} round trips: p50 {} us, p99 {} us, \
             p99.9 {} us, max {} us",
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99),
            histogram.value_at_quantile(0.999),
            histogram.max()
        );
    }
    Ok(())
}
