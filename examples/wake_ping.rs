//! One event at a time against a running server: the source sends `n|P|1|2`, the client of
//! user 2 waits for it, and only then is the next one sent. Prints the round-trip p50, p99,
//! p99.9 and max. This is the wake-up path's latency: every event crosses from the source's
//! executor to the owner shard's and out again, with the server idle in between.
//!
//! `cargo run --release --example wake_ping -- EVENT_PORT CLIENT_PORT [COUNT]`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Round trips sent first and not counted (connections warm, registrations done).
const WARM_UP: u64 = 200;
/// Pause after the id lines, so the client is registered before the first event.
const SETTLE: Duration = Duration::from_millis(300);

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: wake_ping EVENT_PORT CLIENT_PORT [COUNT]");
        std::process::exit(2);
    }
    let event_port: u16 = args[1].parse().expect("event port");
    let client_port: u16 = args[2].parse().expect("client port");
    let count: u64 = args.get(3).map_or(3_000, |c| c.parse().expect("count"));

    let mut client = TcpStream::connect(("127.0.0.1", client_port))?;
    client.set_nodelay(true)?;
    client.write_all(b"2\n")?;
    std::thread::sleep(SETTLE);
    let mut source = TcpStream::connect(("127.0.0.1", event_port))?;
    source.set_nodelay(true)?;
    let mut reader = BufReader::new(client.try_clone()?);
    client.set_read_timeout(Some(Duration::from_secs(10)))?;

    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .expect("histogram bounds");
    let mut line = String::new();
    for seq in 1..=WARM_UP + count {
        let event = format!("{seq}|P|1|2\n");
        let sent = Instant::now();
        source.write_all(event.as_bytes())?;
        line.clear();
        reader.read_line(&mut line)?;
        let micros = sent.elapsed().as_micros() as u64;
        assert_eq!(line, event, "the client got another line");
        if seq > WARM_UP {
            histogram.record(micros.max(1)).expect("in bounds");
        }
    }
    println!(
        "{count} round trips: p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max()
    );
    Ok(())
}
