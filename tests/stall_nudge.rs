//! The stall guard (`src/nudge.rs`): while the server is busy, every executor is woken every
//! `--stall-nudge-ms`, even one that has no work of its own, so an executor glommio parked
//! with runnable tasks resumes within that time; once idle, nothing is nudged and the guard
//! sleeps until the next send.
//!
//! At `--cores 2`, one client owned by shard 0 receives private messages, one at a time: each
//! concerns shard 0 only, so executor 1 (shard 1 alone) gets no work and is woken only by
//! nudges. Its context switches (from `/proc/self/task/*/status`) must follow the nudge rounds
//! while events flow, and stop with them once the server is idle. One test in this file: the
//! executor threads are found by name in this process.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{count, eventually, wait_registered};
use efr::config::{Config, STALL_NUDGE_LINGER_ROUNDS};
use efr::router::Ownership;
use efr::server::RunningServer;

const CORES: usize = 2;
const NUDGE: Duration = Duration::from_millis(5);
/// Nudge rounds watched while events flow.
const BUSY_ROUNDS: u64 = 40;
/// Window in which an idle server must not nudge or wake.
const IDLE_WINDOW: Duration = Duration::from_millis(400);

/// Context switches (voluntary + involuntary) of every executor thread, by thread name.
fn executor_switches() -> HashMap<String, u64> {
    let mut switches = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| -> Option<&str> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        // glommio names them `efr-shard-<index>-<executor id>`.
        let Some(thread) = field("Name:")
            .filter(|name| name.starts_with("efr-shard-"))
            .and_then(|name| name.rsplit_once('-'))
            .map(|(executor, _)| executor)
        else {
            continue;
        };
        let total: u64 = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .filter_map(|name| field(name).and_then(|value| value.parse::<u64>().ok()))
            .sum();
        *switches.entry(thread.to_string()).or_default() += total;
    }
    switches
}

fn rounds(server: &RunningServer) -> u64 {
    count(server, |c| &c.stall_nudge_rounds)
}

/// One private message to `user`, read back whole at its client.
struct Pinger {
    source: TcpStream,
    client: BufReader<TcpStream>,
    seq: u64,
    from: u64,
    user: u64,
}

impl Pinger {
    fn ping(&mut self) {
        self.seq += 1;
        let line = format!("{}|P|{}|{}\n", self.seq, self.from, self.user);
        self.source.write_all(line.as_bytes()).unwrap();
        let mut got = String::new();
        self.client.read_line(&mut got).unwrap();
        assert_eq!(got, line, "the client got another line than the one sent");
    }
}

#[test]
fn a_busy_server_nudges_every_executor_and_an_idle_one_nothing() {
    let server = efr::server::start(Config {
        stall_nudge: Some(NUDGE),
        ..Config::ephemeral(CORES)
    })
    .expect("server starts");
    let ownership = Ownership::new(CORES);
    let mut on_shard_0 = (1..).filter(|&user| ownership.owner(user) == 0);
    let (user, from) = (on_shard_0.next().unwrap(), on_shard_0.next().unwrap());

    let mut client = TcpStream::connect(server.client_addr).unwrap();
    client.write_all(format!("{user}\n").as_bytes()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    wait_registered(&server, 1);
    let source = TcpStream::connect(server.event_addr).unwrap();
    source.set_nodelay(true).unwrap();
    let mut pinger = Pinger {
        source,
        client: BufReader::new(client),
        seq: 0,
        from,
        user,
    };

    // Busy: events flow (to shard 0 only); executor 1 is woken by the nudges alone.
    pinger.ping();
    eventually("the first nudge round", || rounds(&server) > 0);
    let (rounds_before, switches_before) = (rounds(&server), executor_switches());
    while rounds(&server) < rounds_before + BUSY_ROUNDS {
        pinger.ping();
        std::thread::sleep(Duration::from_millis(1));
    }
    let (busy_rounds, switches_after) = (rounds(&server) - rounds_before, executor_switches());
    let woken = switches_after["efr-shard-1"] - switches_before["efr-shard-1"];
    eprintln!("executor 1 woken {woken} times in {busy_rounds} nudge rounds");
    assert!(
        woken * 2 >= busy_rounds,
        "executor 1 (no work of its own) was woken {woken} times in {busy_rounds} nudge rounds"
    );

    // Idle: the guard lingers a few rounds, then stops for good.
    let linger = NUDGE * (STALL_NUDGE_LINGER_ROUNDS + 5);
    eventually("the guard going idle", || {
        let before = rounds(&server);
        std::thread::sleep(linger);
        rounds(&server) == before
    });
    let (idle_rounds, idle_switches, idle_start) =
        (rounds(&server), executor_switches(), Instant::now());
    std::thread::sleep(IDLE_WINDOW);
    assert_eq!(
        rounds(&server),
        idle_rounds,
        "nudged while idle for {:?}",
        idle_start.elapsed()
    );
    for (thread, switches) in executor_switches() {
        let woken = switches - idle_switches[&thread];
        assert!(
            woken <= 2,
            "{thread} was woken {woken} times in {IDLE_WINDOW:?} of idle"
        );
    }

    // Busy again: one event wakes the guard (no timer was left running to do it).
    pinger.ping();
    eventually("nudging after the idle -> busy transition", || {
        rounds(&server) > idle_rounds
    });
    server.stop_and_wait().unwrap();
}
