//! Regression test for lost wake-ups between executors: an executor that goes to sleep while
//! work for it is queued (a batch in a shard's channel, source bytes, a client's output),
//! and sleeps until some unrelated event comes.
//!
//! At 2 and 8 executors, a long run of single-event batches goes through the real path
//! (source -> sequencer -> every shard -> the target client's writer), one at a time, each
//! waited for at its client, with random pauses between them, while slow "heavy" clients
//! take bursts of thousands of notifications (their writers block on full sockets, so the
//! executors see a steady stream of unrelated I/O completions), written in small pieces into
//! shard channels only 4 deep (so the sequencer keeps waiting for room). Every byte every
//! client receives is checked.
//!
//! The watchdog tells a stall from slowness. A hop slower than [`SLOW_HOP`] (50 ms) is looked
//! at: the heavy readers are held (so no unrelated event can come and rescue a stalled
//! executor) and the executor threads' scheduler states are sampled from
//! `/proc/self/task/*/stat`. A stall is every executor thread asleep (`S`) for
//! [`STALL_CONFIRM_DEFAULT`] (250 ms, or `EFR_LOST_WAKEUP_STALL_MS`) while the hop's event is
//! neither delivered nor in the client's socket: work is queued and nobody is going to run it.
//! The server runs with its stall guard (`src/nudge.rs`: every executor nudged every 10 ms
//! while busy), which bounds a park of glommio's own; `EFR_LOST_WAKEUP_NUDGE_MS=0` runs
//! without it. A loaded machine only delays a runnable thread (state `R`), which is slowness:
//! the test waits (up to [`HOP_CAP`]) and counts it.
//! By hand, `EFR_LOST_WAKEUP_STRICT=1` fails on any hop over 50 ms, the plain criterion, which
//! is meant for a quiet machine.
//!
//! Scale: `EFR_LOST_WAKEUP_HOPS` single-event batches per executor count (default 50,000,
//! about 20-40 s in all in a debug build on a loaded 2-core machine; the full run is 1,000,000).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use efr::config::Config;
use efr::server::RunningServer;

/// A hop slower than this is looked at by the watchdog (and fails in strict mode).
const SLOW_HOP: Duration = Duration::from_millis(50);
/// Every executor asleep for this long, with the hop still pending (and the heavy readers
/// held, so nothing unrelated can rescue it), fails the test. The stall guard nudges every
/// executor every [`NUDGE_DEFAULT`] while the server is busy (and it is: the held readers
/// leave writes in progress), so an executor glommio parked with runnable tasks resumes
/// within that; a pending hop that still sees every executor asleep this long is a wake-up
/// lost in efr itself. `EFR_LOST_WAKEUP_STALL_MS` sets it. A shorter all-asleep stall is
/// printed, not failed.
const STALL_CONFIRM_DEFAULT: Duration = Duration::from_millis(250);
/// The server's `--stall-nudge-ms` in this test; `EFR_LOST_WAKEUP_NUDGE_MS` sets it, and 0
/// turns the nudges off to look for glommio's parks by hand (one of 255 ms was seen once on
/// the merged code before the guard existed: run with nudges off and
/// `EFR_LOST_WAKEUP_STALL_MS=2000` to see such parks reported instead of failed).
const NUDGE_DEFAULT: Duration = Duration::from_millis(10);
/// An all-asleep stall longer than this is reported on stderr.
const STALL_REPORT: Duration = Duration::from_millis(100);

fn stall_confirm() -> Duration {
    std::env::var("EFR_LOST_WAKEUP_STALL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(STALL_CONFIRM_DEFAULT)
}
fn stall_nudge() -> Option<Duration> {
    let nudge = std::env::var("EFR_LOST_WAKEUP_NUDGE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(NUDGE_DEFAULT);
    (!nudge.is_zero()).then_some(nudge)
}

/// Sampling period of the watchdog.
const WATCH_PERIOD: Duration = Duration::from_millis(10);
/// A hop that takes longer than this fails even if some executor stays runnable.
const HOP_CAP: Duration = Duration::from_secs(20);
/// Deadline for setup steps (registration, end of session).
const SETUP_DEADLINE: Duration = Duration::from_secs(20);

const PING_USERS: u64 = 32;
const HEAVY_USERS: u64 = 12;
const LOUD_USERS: u64 = 4;
const FIRST_HEAVY: u64 = 1_000;
const FIRST_LOUD: u64 = 5_000;
/// One train in this many is preceded by a burst of status updates to the heavy clients.
const BURST_EVERY: u64 = 25;
const BURST_EVENTS: u64 = 300;
/// Events per write of a burst.
const BURST_PIECE: u64 = 5;
/// Shard channel depth of the run.
const SHARD_QUEUE_DEPTH: usize = 4;
/// Longest train of single-event batches written back to back before they are awaited.
const MAX_TRAIN: u64 = 6;
/// Receive buffer of a heavy client: small enough that its writer often waits for room, large
/// enough that delayed acks do not throttle it to a crawl.
const HEAVY_RECV_BUFFER: usize = 32 << 10;

/// xorshift64*: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn hops_per_run() -> u64 {
    std::env::var("EFR_LOST_WAKEUP_HOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

fn strict() -> bool {
    std::env::var("EFR_LOST_WAKEUP_STRICT").is_ok_and(|v| v == "1")
}

#[test]
fn lost_wakeup_single_event_batches_with_heavy_writers() {
    // One server at a time: the watchdog reads every executor thread of this process.
    for cores in [2, 8] {
        run(cores, 0x5eed_0000 + cores as u64);
    }
}

/// A slow heavy client: reads with pauses, stops reading while the watchdog holds.
fn heavy_reader(mut stream: TcpStream, hold: Arc<AtomicBool>, seed: u64) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut bytes = Vec::new();
        let mut buffer = [0u8; 2048];
        loop {
            while hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return bytes,
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            }
            if rng.below(4) == 0 {
                std::thread::sleep(Duration::from_micros(rng.below(3_000)));
            }
        }
    })
}

/// Busy-waits (a sleep would be far coarser).
fn spin(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::spin_loop();
    }
}

/// A ping client: the test reads its lines one at a time.
struct PingClient {
    stream: TcpStream,
    pending: Vec<u8>,
}

fn wait_for(server: &RunningServer, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + SETUP_DEADLINE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in time: {}",
            server.counters().summary()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The scheduler state of every executor thread of this process (`R`, `S`, ...).
fn executor_states() -> Vec<(String, char)> {
    let mut states = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return states;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        if !name.starts_with("efr-shard-") {
            continue;
        }
        let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
        states.push((name.to_string(), state));
    }
    states
}

/// Bytes waiting unread in a socket's receive queue.
fn unread_bytes(stream: &TcpStream) -> i32 {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut count) };
    if rc == 0 {
        count
    } else {
        -1
    }
}

/// Hop statistics for the report.
#[derive(Default)]
struct HopStats {
    micros: Vec<u32>,
    slow: u64,
}

fn run(cores: usize, seed: u64) {
    // The stall guard logs what it finds (a park it ended, or a stall nudges do not end, with
    // the shards' bell states); a failing run shows it.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let hops = hops_per_run();
    let strict = strict();
    let config = Config {
        max_client_backlog: 256 << 20,
        // A shallow queue: bursts fill it, so the sequencer's waits for room (the room bell)
        // are part of the run.
        shard_queue_depth: SHARD_QUEUE_DEPTH,
        stall_nudge: stall_nudge(),
        ..Config::ephemeral(cores)
    };
    let server = efr::server::start(config).expect("server starts");
    let hold = Arc::new(AtomicBool::new(false));

    let mut heavy = Vec::new();
    for index in 0..HEAVY_USERS {
        let user = FIRST_HEAVY + index;
        let mut stream = TcpStream::connect(server.client_addr).expect("heavy client connects");
        stream.write_all(format!("{user}\n").as_bytes()).unwrap();
        // Small buffers: writers fill them and wait for room.
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_recv_buffer_size(HEAVY_RECV_BUFFER);
        heavy.push(heavy_reader(stream, hold.clone(), seed ^ user));
    }
    let mut pings: HashMap<u64, PingClient> = HashMap::new();
    for user in 1..=PING_USERS {
        let mut stream = TcpStream::connect(server.client_addr).expect("ping client connects");
        stream.write_all(format!("{user}\n").as_bytes()).unwrap();
        stream.set_nodelay(true).unwrap();
        pings.insert(
            user,
            PingClient {
                stream,
                pending: Vec::new(),
            },
        );
    }
    let clients = HEAVY_USERS + PING_USERS;
    wait_for(&server, "client registration", || {
        server.counters().clients_registered.load(Ordering::Relaxed) >= clients
    });

    let mut source = TcpStream::connect(server.event_addr).expect("source connects");
    source.set_nodelay(true).unwrap();
    let mut seq = 0u64;
    let mut setup = String::new();
    for index in 0..HEAVY_USERS {
        for loud in 0..LOUD_USERS {
            seq += 1;
            setup.push_str(&format!(
                "{seq}|F|{}|{}\n",
                FIRST_HEAVY + index,
                FIRST_LOUD + loud
            ));
        }
    }
    source.write_all(setup.as_bytes()).unwrap();
    let mut heavy_expected = String::new();

    let mut rng = Rng(seed);
    let mut stats = HopStats::default();
    let started = Instant::now();
    let mut burst = String::new();
    let mut train = Vec::new();
    let mut hop = 0u64;
    while hop < hops {
        match rng.below(10) {
            0 => std::thread::sleep(Duration::from_micros(rng.below(2_000))),
            1 | 2 => std::thread::yield_now(),
            _ => {}
        }
        if rng.below(BURST_EVERY) == 0 {
            // Written in small pieces: many batches in a row.
            for _ in 0..BURST_EVENTS / BURST_PIECE {
                burst.clear();
                for _ in 0..BURST_PIECE {
                    seq += 1;
                    let loud = FIRST_LOUD + rng.below(LOUD_USERS);
                    let event = format!("{seq}|S|{loud}\n");
                    burst.push_str(&event);
                    heavy_expected.push_str(&event);
                }
                source.write_all(burst.as_bytes()).unwrap();
            }
        }
        // A train of single-event batches, written one by one a few microseconds apart (so
        // some arrive just as a shard goes to sleep), each then awaited at its client.
        train.clear();
        for _ in 0..1 + rng.below(MAX_TRAIN) {
            seq += 1;
            let target = 1 + rng.below(PING_USERS);
            let from = 10_000 + rng.below(1_000);
            let line = format!("{seq}|P|{from}|{target}\n");
            spin(Duration::from_micros(rng.below(40)));
            let sent = Instant::now();
            source.write_all(line.as_bytes()).unwrap();
            train.push((target, line, sent));
        }
        for (target, line, sent) in &train {
            let client = pings.get_mut(target).unwrap();
            let elapsed = await_line(
                &server,
                client,
                line.as_bytes(),
                *sent,
                &hold,
                hop,
                cores,
                strict,
            );
            if elapsed > SLOW_HOP {
                stats.slow += 1;
            }
            stats
                .micros
                .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
        }
        hop += train.len() as u64;
    }
    let run_time = started.elapsed();

    // End of session: every client is closed after its output is written.
    source.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = source.read_to_end(&mut rest);
    for (user, mut client) in pings {
        client
            .stream
            .set_read_timeout(Some(SETUP_DEADLINE))
            .unwrap();
        let mut tail = Vec::new();
        let _ = client.stream.read_to_end(&mut tail);
        assert!(
            client.pending.is_empty() && tail.is_empty(),
            "ping client {user} got bytes it was not sent: {:?}",
            String::from_utf8_lossy(&tail)
        );
    }
    for (index, reader) in heavy.into_iter().enumerate() {
        let bytes = reader.join().unwrap();
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(
            text == heavy_expected,
            "heavy client {} got {} bytes, expected {} (first difference at byte {})",
            FIRST_HEAVY + index as u64,
            text.len(),
            heavy_expected.len(),
            text.bytes()
                .zip(heavy_expected.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(text.len().min(heavy_expected.len()))
        );
    }
    let rescues = server
        .counters()
        .executor_stall_rescues
        .load(Ordering::Relaxed);
    let nudge_rounds = server.counters().stall_nudge_rounds.load(Ordering::Relaxed);
    let unresolved = server
        .counters()
        .executor_stalls_unresolved
        .load(Ordering::Relaxed);
    server.stop_and_wait().unwrap();

    stats.micros.sort_unstable();
    let at = |q: f64| stats.micros[((stats.micros.len() - 1) as f64 * q) as usize];
    eprintln!(
        "lost_wakeup: --cores {cores}: {hops} single-event batches in {:.1} s; hop p50 {} us, \
         p99 {} us, p99.9 {} us, max {} us; {} hops over {} ms (slowness, no stall); {} nudge \
         rounds, {} stall rescues, {} unresolved",
        run_time.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(0.999),
        stats.micros.last().unwrap(),
        stats.slow,
        SLOW_HOP.as_millis(),
        nudge_rounds,
        rescues,
        unresolved
    );
}

/// Reads `expected` from the ping client, watching for a stall. Returns the hop time.
#[allow(clippy::too_many_arguments)]
fn await_line(
    server: &RunningServer,
    client: &mut PingClient,
    expected: &[u8],
    sent: Instant,
    hold: &AtomicBool,
    hop: u64,
    cores: usize,
    strict: bool,
) -> Duration {
    let mut buffer = [0u8; 256];
    let mut asleep_since: Option<Instant> = None;
    loop {
        if let Some(end) = client.pending.iter().position(|&b| b == b'\n') {
            let got: Vec<u8> = client.pending.drain(..=end).collect();
            let elapsed = sent.elapsed();
            hold.store(false, Ordering::SeqCst);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(expected),
                "hop {hop}: wrong line"
            );
            assert!(
                !strict || elapsed <= SLOW_HOP,
                "--cores {cores} hop {hop}: {} ms (strict mode: any hop over {} ms fails)",
                elapsed.as_millis(),
                SLOW_HOP.as_millis()
            );
            return elapsed;
        }
        let waited = sent.elapsed();
        let timeout = if waited < SLOW_HOP {
            SLOW_HOP - waited
        } else {
            WATCH_PERIOD
        };
        client
            .stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        match client.stream.read(&mut buffer) {
            Ok(0) => panic!("hop {hop}: the server closed a ping client"),
            Ok(n) => {
                client.pending.extend_from_slice(&buffer[..n]);
                continue;
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => panic!("hop {hop}: read failed: {error}"),
        }
        let waited = sent.elapsed();
        if waited < SLOW_HOP {
            continue;
        }
        // Slow hop: hold the heavy readers so nothing unrelated happens, and look at who is
        // asleep.
        hold.store(true, Ordering::SeqCst);
        let states = executor_states();
        let all_asleep = !states.is_empty()
            && states.iter().all(|(_, state)| *state == 'S')
            && unread_bytes(&client.stream) == 0;
        if all_asleep {
            let since = *asleep_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < stall_confirm(),
                "lost wake-up at --cores {cores}, hop {hop}: the event was sent {} ms ago, is \
                 not in the client's socket, and every executor thread has been asleep for {} \
                 ms ({states:?}); counters: {}",
                waited.as_millis(),
                since.elapsed().as_millis(),
                server.counters().summary()
            );
        } else {
            if let Some(since) = asleep_since.take() {
                if since.elapsed() >= STALL_REPORT {
                    eprintln!(
                        "--cores {cores} hop {hop}: every executor asleep for {} ms with the \
                         event pending; it ended by itself",
                        since.elapsed().as_millis()
                    );
                }
            }
        }
        assert!(
            waited < HOP_CAP,
            "--cores {cores} hop {hop}: no delivery in {} s although some executor stayed \
             runnable ({states:?}); counters: {}",
            HOP_CAP.as_secs(),
            server.counters().summary()
        );
    }
}
