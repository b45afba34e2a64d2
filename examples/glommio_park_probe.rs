//! Looks for the glommio 0.9 park efr's stall guard bounds (README, "The park that is left"):
//! an executor asleep in `io_uring_enter` while one of its tasks is runnable.
//!
//! Each executor runs a task that sleeps 1 µs in a loop (like `reactor::reactor_pass`, so the
//! executor nearly always sleeps with a user timer's timeout armed on its latency ring) and a
//! task that reads a socket a plain thread writes a byte to every `--poke-us` (early wake-ups
//! from another completion, the other half of the suspected race). A watcher thread samples
//! each executor: if its timer task has not run for `--gap-us` and the executor thread is
//! asleep (`S`), the executor sleeps although its timer task is long due: a park. A park ends
//! at the next poke, so its length is printed too.
//!
//! `cargo run --release --example glommio_park_probe -- EXECUTORS SECONDS [pinned]`
//! (default 8 unpinned executors for 20 s). Burns the machine's CPUs while it runs.

use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;

const POKE_EVERY: Duration = Duration::from_micros(2_000);
const GAP: Duration = Duration::from_micros(1_000);

#[derive(Default)]
struct Probe {
    tid: AtomicI32,
    last_run_ns: AtomicU64,
    iterations: AtomicU64,
}

fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

fn thread_state(file: &std::fs::File) -> Option<u8> {
    let mut text = [0u8; 512];
    let length = file.read_at(&mut text, 0).ok()?;
    let close = text[..length].iter().rposition(|&b| b == b')')?;
    text[close + 1..length]
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let executors: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let pinned = args.get(3).is_some_and(|a| a == "pinned");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut probes = Vec::new();
    let mut pokers = Vec::new();
    for index in 0..executors {
        let probe = Arc::new(Probe::default());
        probes.push(probe.clone());
        let mut fds = [0; 2];
        // SAFETY: plain syscall writing two descriptors.
        assert_eq!(
            unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            },
            0
        );
        let (read_end, write_end) = (fds[0], fds[1]);
        let placement = if pinned {
            glommio::Placement::Fixed(index % cpus)
        } else {
            glommio::Placement::Unbound
        };
        let stop_executor = stop.clone();
        handles.push(
            glommio::LocalExecutorBuilder::new(placement)
                .name(&format!("probe-{index}"))
                .io_memory(128 << 10)
                .preempt_timer(Duration::from_secs(3600))
                .spawn(move || async move {
                    // SAFETY: gettid has no preconditions.
                    probe.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                    // SAFETY: a connected socket handed to glommio.
                    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(read_end) };
                    glommio::spawn_local(async move {
                        let mut drain = [0u8; 64];
                        while let Ok(1..) = stream.read(&mut drain).await {}
                    })
                    .detach();
                    while !stop_executor.load(Ordering::Relaxed) {
                        glommio::timer::sleep(Duration::from_micros(1)).await;
                        probe.last_run_ns.store(now_ns(origin), Ordering::Relaxed);
                        probe.iterations.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .unwrap(),
        );
        pokers.push(write_end);
    }
    let stop_poker = stop.clone();
    let poker = std::thread::spawn(move || {
        while !stop_poker.load(Ordering::Relaxed) {
            std::thread::sleep(POKE_EVERY);
            for &fd in &pokers {
                // SAFETY: one byte from a live buffer to a socket we own.
                unsafe { libc::send(fd, [1u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT) };
            }
        }
        pokers
    });
    while probes.iter().any(|p| p.tid.load(Ordering::SeqCst) == 0) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats: Vec<std::fs::File> = probes
        .iter()
        .map(|p| {
            std::fs::File::open(format!(
                "/proc/self/task/{}/stat",
                p.tid.load(Ordering::SeqCst)
            ))
            .unwrap()
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut parks = 0u64;
    let mut in_park = vec![None::<u64>; executors];
    while Instant::now() < end {
        std::thread::sleep(Duration::from_micros(200));
        for (index, probe) in probes.iter().enumerate() {
            let last = probe.last_run_ns.load(Ordering::Relaxed);
            let gap = now_ns(origin).saturating_sub(last);
            let parked = gap > GAP.as_nanos() as u64 && thread_state(&stats[index]) == Some(b'S');
            match (parked, in_park[index]) {
                (true, None) => in_park[index] = Some(last),
                (false, Some(since)) if last != since => {
                    parks += 1;
                    println!(
                        "executor {index}: asleep with its timer task due for {} us",
                        (last - since) / 1000
                    );
                    in_park[index] = None;
                }
                _ => {}
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let pokers = poker.join().unwrap();
    for handle in handles {
        handle.join().unwrap();
    }
    let iterations: u64 = probes
        .iter()
        .map(|p| p.iterations.load(Ordering::Relaxed))
        .sum();
    for fd in pokers {
        // SAFETY: closing descriptors we own.
        unsafe { libc::close(fd) };
    }
    println!(
        "{executors} executors ({}), {seconds} s: {iterations} timer passes, {parks} parks",
        if pinned { "pinned" } else { "unpinned" }
    );
}
