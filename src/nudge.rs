//! The progress guarantee: while the server is busy, every executor is nudged every
//! `--stall-nudge-ms`, so an executor that glommio parked with runnable tasks resumes within
//! that time; an idle server is never nudged and its guard thread sleeps without a timer.
//!
//! # Why
//!
//! [`crate::doorbell`] makes every wake-up between efr's tasks lossless, but glommio 0.9 can
//! still park an executor whose task queue is runnable: `run_task_queues` returns "nothing
//! ran" when the latency ring's completion queue is non-empty as it starts, and the executor
//! then sleeps in `io_uring_enter` until some unrelated completion. A completion that wakes no
//! task can reach the latency ring while user code runs: the kernel posts timeout completions
//! from task work, which runs on the executor's next return to user space, so a timeout whose
//! timer callback (on another CPU) races with glommio's cancel of it lands after glommio
//! consumed the ring. glommio arms such a timeout for the nearest user timer every time it
//! goes to sleep, and efr has many user timers (the reactor pass, write and handshake
//! deadlines, input pauses). That is the one known way left to lose progress, and it cannot
//! be removed from outside glommio; this module bounds it.
//!
//! # How
//!
//! Each executor has a Unix socket pair: a small task on the executor (the nudge reader)
//! always awaits a read of one end through glommio's stream read, a `recv` and then a poll on
//! the *main* ring. A byte written to the other end completes that poll, which ends a sleep in
//! `io_uring_enter` and wakes a task, so the executor's loop runs its queues again (the stale
//! latency-ring completion was consumed on the way). One plain thread, the guard, writes one
//! byte to every executor every interval while the server is busy:
//!
//! * **busy** means: a shard channel was sent to or a batch applied in the last
//!   [`STALL_NUDGE_LINGER_ROUNDS`] intervals, or ordered batches wait unapplied, or a client
//!   write is in progress (output waits for a client);
//! * **idle**, the guard publishes that it parks, fences, looks once more, and parks with no
//!   timeout. A sender to a shard channel ([`Activity::note`], called by
//!   [`crate::channel::Sender`]) counts the send, fences and, only if the guard parked, unparks
//!   it: a relaxed add, a fence and a load per send while busy, never a syscall per event. The two fences make the
//!   idle -> busy transition lossless (the doorbell's argument).
//!
//! # Rescues
//!
//! Before each round the guard looks for the signature of a parked executor: ordered batches
//! in flight, none applied for a whole interval, and every executor thread asleep (`S` in
//! `/proc/self/task/<tid>/stat`, read only when the first two hold). A batch in a shard's
//! channel always keeps some thread runnable until it is applied (its shard's executor, or the
//! sequencer's while it waits for room), so that state is a parked executor. The nudge that
//! follows is a rescue: counted in `executor_stall_rescues` and logged at most once a second.
//! A park that begins and ends within one interval is ended by the nudge without being counted.
//! The same state found again right after a nudge is not a park (the nudge ran every queue):
//! a task waits for a wake-up that was lost. It is counted in `executor_stalls_unresolved` and
//! logged with the state of every shard's command bell and of the room bell (the batches
//! counted in flight include those the sequencer still waits to send for room), for the next
//! look at the cause.

use std::cell::OnceCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use futures_lite::AsyncReadExt;

use crate::config::{Role, STALL_NUDGE_LINGER_ROUNDS};
use crate::doorbell::{socket_pair, Doorbell};
use crate::shared::Shared;
use crate::stats::{Counters, Fault};

/// Bytes drained per read by a nudge reader; nudges coalesce, so more than one is rare.
const NUDGE_DRAIN: usize = 64;

/// Where senders wake the guard thread from its idle park.
#[derive(Debug, Default)]
pub struct Activity {
    /// Sends to shard channels so far.
    sends: AtomicU64,
    /// The guard parked (or is about to) with no timeout.
    idle: AtomicBool,
    guard_thread: OnceLock<Thread>,
}

impl Activity {
    /// A send to a shard channel happened (call after the message is queued): counts it and,
    /// if the guard sleeps idle, wakes it. One relaxed add and one fence while busy.
    #[inline]
    pub fn note(&self) {
        self.sends.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::SeqCst) {
            if let Some(thread) = self.guard_thread.get() {
                thread.unpark();
            }
        }
    }
}

/// What the guard reads about one executor.
#[derive(Debug, Default)]
struct ExecutorProbe {
    /// Kernel thread id of the executor (0 until its nudge reader starts).
    tid: AtomicI32,
    /// Client writes in progress on this executor (written by that executor only).
    writes_in_progress: AtomicU64,
    /// Reads of nudges by this executor's nudge reader (written by that executor only): an
    /// executor that is nudged but never reads is not running its tasks at all.
    nudges_read: AtomicU64,
}

thread_local! {
    /// The probe of the executor running on this thread, if any.
    static LOCAL_PROBE: OnceCell<Arc<ExecutorProbe>> = const { OnceCell::new() };
}

/// A client write in progress on this executor: the server counts as busy while one exists.
/// A load and a store on an executor-local atomic at each end; nothing off an executor.
#[derive(Debug)]
pub struct WriteInProgress(());

impl WriteInProgress {
    /// Marks a client write as started on this executor until the value is dropped.
    #[inline]
    pub fn begin() -> Self {
        add_local_writes(1);
        WriteInProgress(())
    }
}

impl Drop for WriteInProgress {
    #[inline]
    fn drop(&mut self) {
        add_local_writes(u64::MAX); // wrapping -1
    }
}

#[inline]
fn add_local_writes(delta: u64) {
    LOCAL_PROBE.with(|probe| {
        if let Some(probe) = probe.get() {
            // Only this thread writes it: no read-modify-write needed.
            let writes = &probe.writes_in_progress;
            writes.store(
                writes.load(Ordering::Relaxed).wrapping_add(delta),
                Ordering::Relaxed,
            );
        }
    });
}

/// One executor as the guard sees it.
#[derive(Debug)]
struct Executor {
    write_end: OwnedFd,
    probe: Arc<ExecutorProbe>,
    /// `/proc/self/task/<tid>/stat`, opened when first needed.
    stat: OnceLock<Option<File>>,
}

/// The read end of one executor's nudge socket, to be started on that executor.
#[derive(Debug)]
pub struct NudgeReadEnd {
    read_end: OwnedFd,
    probe: Arc<ExecutorProbe>,
}

impl NudgeReadEnd {
    /// Call on the executor: publishes its thread id and starts its nudge reader, a task that
    /// reads and discards nudges until the guard is gone.
    pub fn start_reader(self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.probe.tid.store(tid, Ordering::SeqCst);
        let probe = self.probe.clone();
        LOCAL_PROBE.with(|local| {
            let _ = local.set(probe.clone());
        });
        // SAFETY: a connected Unix stream socket owned by `self`, handed to glommio.
        let mut stream =
            unsafe { glommio::net::UnixStream::from_raw_fd(self.read_end.into_raw_fd()) };
        glommio::spawn_local(async move {
            let mut drain = [0u8; NUDGE_DRAIN];
            while let Ok(1..) = stream.read(&mut drain).await {
                let reads = &probe.nudges_read;
                reads.store(reads.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
        })
        .detach();
    }
}

/// The guard: nudges every executor while the server is busy.
#[derive(Debug)]
pub struct StallGuard {
    shared: Arc<Shared>,
    interval: Duration,
    activity: Arc<Activity>,
    executors: Vec<Executor>,
    /// The shards' command bells, named in the log of a stall.
    shard_bells: OnceLock<Vec<Arc<Doorbell>>>,
    /// The room bell the sequencer and acceptor wait on for a full shard channel, named in
    /// the log of a stall (batches counted as sent may still wait there for room).
    room_bell: OnceLock<Arc<Doorbell>>,
    stop: AtomicBool,
}

/// The counters the guard compares from one round to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    sends: u64,
    applied: u64,
    /// Ordered batches sent to shards and not yet applied (or dropped).
    in_flight: u64,
    writes_in_progress: u64,
}

impl StallGuard {
    /// A guard nudging every `interval`, with one nudge socket per executor; start each read
    /// end on its executor ([`NudgeReadEnd::start_reader`]) and the guard with
    /// [`StallGuard::spawn`].
    pub fn new(
        shared: Arc<Shared>,
        interval: Duration,
        executors: usize,
    ) -> io::Result<(Arc<StallGuard>, Vec<NudgeReadEnd>)> {
        let mut lines = Vec::with_capacity(executors);
        let mut read_ends = Vec::with_capacity(executors);
        for _ in 0..executors {
            let (read_end, write_end) = socket_pair()?;
            let probe = Arc::new(ExecutorProbe::default());
            lines.push(Executor {
                write_end,
                probe: probe.clone(),
                stat: OnceLock::new(),
            });
            read_ends.push(NudgeReadEnd { read_end, probe });
        }
        let activity = Arc::new(Activity::default());
        // The guard starts idle: the first send wakes it.
        activity.idle.store(true, Ordering::SeqCst);
        let guard = Arc::new(StallGuard {
            shared,
            interval,
            activity,
            executors: lines,
            shard_bells: OnceLock::new(),
            room_bell: OnceLock::new(),
            stop: AtomicBool::new(false),
        });
        Ok((guard, read_ends))
    }

    /// What the shard channels' senders call ([`crate::channel::Sender::noting_activity`]).
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Names the state of these bells (the shards' command bells) in the log of a stall.
    pub fn watch_shard_bells(&self, bells: Vec<Arc<Doorbell>>) {
        let _ = self.shard_bells.set(bells);
    }

    /// Names the state of the shard channels' room bell in the log of a stall.
    pub fn watch_room_bell(&self, bell: Arc<Doorbell>) {
        let _ = self.room_bell.set(bell);
    }

    /// Starts the guard thread.
    pub fn spawn(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let guard = self.clone();
        let thread = std::thread::Builder::new()
            .name("efr-stall-guard".into())
            .spawn(move || guard.run())?;
        let _ = self.activity.guard_thread.set(thread.thread().clone());
        // A send before the thread handle was published found no thread to unpark.
        thread.thread().unpark();
        Ok(thread)
    }

    /// Ends the guard thread (after the executors ended).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.activity.guard_thread.get() {
            thread.unpark();
        }
    }

    fn progress(&self) -> Progress {
        let counters = &self.shared.counters;
        let applied = counters.batches_applied.load(Ordering::SeqCst)
            + counters.batches_dropped_at_shutdown.load(Ordering::SeqCst);
        // An ingest's only receiver is its NATS publisher, which applies nothing.
        let in_flight = if self.shared.config.role == Role::Ingest {
            0
        } else {
            counters
                .batch_deliveries
                .load(Ordering::SeqCst)
                .saturating_sub(applied)
        };
        Progress {
            sends: self.activity.sends.load(Ordering::SeqCst),
            applied,
            in_flight,
            writes_in_progress: self
                .executors
                .iter()
                .map(|executor| executor.probe.writes_in_progress.load(Ordering::Relaxed))
                .fold(0u64, u64::wrapping_add),
        }
    }

    fn run(&self) {
        let mut last = self.progress();
        let mut quiet_rounds = 0;
        // Rounds in a row that found the stall signature (the nudge in between did not end it),
        // and each executor's nudge reads when it was first found.
        let mut stalled_rounds = 0;
        let mut reads_at_stall = Vec::with_capacity(self.executors.len());
        loop {
            if self.activity.idle.load(Ordering::SeqCst) {
                while self.activity.idle.load(Ordering::SeqCst) && !self.stopped() {
                    std::thread::park();
                }
                if self.stopped() {
                    return;
                }
                last = self.progress();
                quiet_rounds = 0;
            }
            std::thread::park_timeout(self.interval);
            if self.stopped() {
                return;
            }
            let now = self.progress();
            let busy = now.sends != last.sends
                || now.applied != last.applied
                || now.in_flight > 0
                || now.writes_in_progress > 0;
            quiet_rounds = if busy { 0 } else { quiet_rounds + 1 };
            if quiet_rounds > STALL_NUDGE_LINGER_ROUNDS {
                // Publish "idle", fence, look once more: a send after the fence sees `idle`
                // and unparks; a send before it shows in the counters.
                self.activity.idle.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if self.progress() != now {
                    self.activity.idle.store(false, Ordering::SeqCst);
                }
                last = now;
                continue;
            }
            if stalled_rounds == 0 {
                reads_at_stall.clear();
                reads_at_stall.extend(self.nudge_reads());
            }
            stalled_rounds = if now.in_flight > 0
                && now.applied == last.applied
                && self.every_executor_asleep(now, stalled_rounds, &reads_at_stall)
            {
                stalled_rounds + 1
            } else {
                0
            };
            self.nudge_every_executor();
            Counters::add(&self.shared.counters.stall_nudge_rounds, 1);
            last = now;
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Batches have waited a whole interval with none applied: whether every executor thread
    /// is asleep (and nothing moved while the threads were read). The first such round is a
    /// park the coming nudge ends (a rescue); the same state right after a nudge
    /// (`stalled_rounds` > 0) is work the nudges do not resume: a lost wake-up.
    fn every_executor_asleep(
        &self,
        before: Progress,
        stalled_rounds: u32,
        reads_at_stall: &[u64],
    ) -> bool {
        for executor in &self.executors {
            // Running, runnable, or unknown: not the signature (the first such thread ends
            // the look, so a busy server pays about one read).
            if thread_state(executor) != Some(b'S') {
                return false;
            }
        }
        if self.progress().applied != before.applied {
            return false;
        }
        let counters = &self.shared.counters;
        if stalled_rounds == 0 {
            Counters::add(&counters.executor_stall_rescues, 1);
        } else {
            Counters::add(&counters.executor_stalls_unresolved, 1);
        }
        self.shared.faults.warn(Fault::Stall, || {
            let bells: Vec<&str> = self
                .shard_bells
                .get()
                .map(|bells| bells.iter().map(|bell| bell.state_name()).collect())
                .unwrap_or_default();
            let room = self
                .room_bell
                .get()
                .map_or("none", |bell| bell.state_name());
            if stalled_rounds == 0 {
                format!(
                    "every executor was asleep while {} ordered batch(es) waited unapplied for \
                     over {} ms (glommio parked an executor with work queued); nudged them \
                     awake (shard bells: {bells:?}; room bell: {room})",
                    before.in_flight,
                    self.interval.as_millis()
                )
            } else {
                // An executor whose reader read none of these nudges did not run its tasks
                // when woken; one that read them did, and the waiting task was not runnable.
                let reads: Vec<u64> = self
                    .nudge_reads()
                    .zip(reads_at_stall.iter().chain(std::iter::repeat(&0)))
                    .map(|(now, then)| now.wrapping_sub(*then))
                    .collect();
                format!(
                    "every executor still asleep after {stalled_rounds} nudge(s) while {} \
                     ordered batch(es) wait unapplied: a wake-up was lost (shard bells: \
                     {bells:?}; room bell: {room}; nudge reads per executor since: {reads:?})",
                    before.in_flight
                )
            }
        });
        true
    }

    fn nudge_reads(&self) -> impl Iterator<Item = u64> + '_ {
        self.executors
            .iter()
            .map(|executor| executor.probe.nudges_read.load(Ordering::Relaxed))
    }

    fn nudge_every_executor(&self) {
        let byte = 1u8;
        for executor in &self.executors {
            // SAFETY: sends one byte from a live buffer on a socket owned by `executor`.
            // EAGAIN (unread nudges fill the socket) and EPIPE (the executor ended) both
            // leave nothing to do; MSG_NOSIGNAL keeps the latter from raising SIGPIPE.
            unsafe {
                libc::send(
                    executor.write_end.as_raw_fd(),
                    (&byte as *const u8).cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
            }
        }
    }
}

/// The scheduler state letter of an executor's thread (`R`, `S`, `D`, ...), if readable.
fn thread_state(executor: &Executor) -> Option<u8> {
    let tid = executor.probe.tid.load(Ordering::SeqCst);
    if tid == 0 {
        return None;
    }
    let stat = executor
        .stat
        .get_or_init(|| File::open(format!("/proc/self/task/{tid}/stat")).ok())
        .as_ref()?;
    let mut text = [0u8; 512];
    // A read at offset 0 makes procfs render the file afresh.
    let length = stat.read_at(&mut text, 0).ok()?;
    let text = &text[..length];
    // The state follows the last ')' (the thread name may hold one).
    let close = text.iter().rposition(|&b| b == b')')?;
    text[close + 1..]
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::mpsc;

    /// A thread that publishes its id, then sleeps (blocked on a channel) or spins until told
    /// to end.
    fn helper(spin: bool) -> (i32, mpsc::Sender<()>, JoinHandle<()>) {
        let (tid_sender, tid) = mpsc::channel();
        let (end, ended) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_sender.send(unsafe { libc::gettid() }).unwrap();
            if spin {
                while ended.try_recv().is_err() {
                    std::hint::spin_loop();
                }
            } else {
                let _ = ended.recv();
            }
        });
        (tid.recv().unwrap(), end, thread)
    }

    fn guard_with_batch_in_flight() -> Arc<StallGuard> {
        let shared = Arc::new(Shared::new(Config::ephemeral(2)));
        Counters::add(&shared.counters.batch_deliveries, 1);
        StallGuard::new(shared, Duration::from_millis(10), 2)
            .unwrap()
            .0
    }

    fn wait_for_state(executor: &Executor, state: u8) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while thread_state(executor) != Some(state) {
            assert!(
                std::time::Instant::now() < deadline,
                "never saw state {}",
                state as char
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn guard_watching(tids: [i32; 2]) -> Arc<StallGuard> {
        let guard = guard_with_batch_in_flight();
        for (executor, tid) in guard.executors.iter().zip(tids) {
            executor.probe.tid.store(tid, Ordering::SeqCst);
        }
        guard
    }

    fn rescues(guard: &StallGuard) -> u64 {
        guard
            .shared
            .counters
            .executor_stall_rescues
            .load(Ordering::Relaxed)
    }

    #[test]
    fn every_executor_asleep_with_a_batch_waiting_is_a_rescue_and_one_running_is_not() {
        let (asleep, end_asleep, asleep_thread) = helper(false);
        let (other_asleep, end_other, other_thread) = helper(false);
        let (spinning, end_spinning, spinning_thread) = helper(true);

        // One executor thread runs: slowness, not a park.
        let guard = guard_watching([asleep, spinning]);
        wait_for_state(&guard.executors[0], b'S');
        wait_for_state(&guard.executors[1], b'R');
        assert!(!guard.every_executor_asleep(guard.progress(), 0, &[]));
        assert_eq!(rescues(&guard), 0);

        // Every executor thread asleep with the batch still waiting: a park, so the nudge
        // that follows is a rescue.
        let guard = guard_watching([asleep, other_asleep]);
        wait_for_state(&guard.executors[0], b'S');
        wait_for_state(&guard.executors[1], b'S');
        assert!(guard.every_executor_asleep(guard.progress(), 0, &[]));
        assert_eq!(rescues(&guard), 1);
        // Found again right after the nudge: not a park, a lost wake-up.
        assert!(guard.every_executor_asleep(guard.progress(), 1, &[0, 0]));
        assert_eq!(rescues(&guard), 1);
        let unresolved = &guard.shared.counters.executor_stalls_unresolved;
        assert_eq!(unresolved.load(Ordering::Relaxed), 1);

        for end in [end_asleep, end_other, end_spinning] {
            end.send(()).unwrap();
        }
        for thread in [asleep_thread, other_thread, spinning_thread] {
            thread.join().unwrap();
        }
    }
}
