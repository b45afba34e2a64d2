//! Doorbells: the one way a thread or another executor wakes a task that waits on this
//! executor, built so that a wake-up cannot be lost.
//!
//! # The mechanism
//!
//! A [`Doorbell`] is an atomic state (`AWAKE` or `SLEEPING`) and the write end of a Unix
//! socket pair. Its read end belongs to exactly one waiting task, the [`BellWaiter`], which
//! reads it through glommio's own socket I/O. The data the waiter waits for travels elsewhere
//! (a flume channel, a flag); the bell only says "look again".
//!
//! The waiter ([`BellWaiter::wait_until`]):
//! 1. checks its condition; if it holds, it is done;
//! 2. stores `SLEEPING`, then a `SeqCst` fence;
//! 3. checks its condition again; if it holds now, it stores `AWAKE` and is done;
//! 4. awaits a read of the socket (any number of bytes), then goes back to 1.
//!
//! A producer ([`Doorbell::ring`]) first makes the condition true (pushes the message, sets
//! the flag), then a `SeqCst` fence, then loads the state; only if it reads `SLEEPING` does it
//! compare-exchange `SLEEPING` for `AWAKE` and, if that succeeded, write one byte. Rings while
//! the waiter is awake cost one fence and one load, and no syscall. A producer on the waiter's
//! own thread (the sequencer and shard 0 share executor 0) compare-exchanges `SLEEPING` for
//! `RUNG_LOCALLY` instead and wakes the waiting task's waker directly: program order stands in
//! for the fences, and no byte is written. Only the waiter itself stores into the state
//! (`SLEEPING` before it sleeps, `AWAKE` when its recheck succeeds); a producer only ever
//! ends a sleep, and never changes a state it did not find `SLEEPING`.
//!
//! # Why no wake-up is lost
//!
//! * **Between the waiter and a producer** (the store-buffering pattern with two `SeqCst`
//!   fences): the waiter writes the state then reads the condition; the producer writes the
//!   condition then reads the state. With a `SeqCst` fence between the write and the read on
//!   both sides, at least one of them sees the other's write. Either the waiter's recheck
//!   (step 3) sees the condition, or the producer sees `SLEEPING` and writes a byte. Of several
//!   producers that see `SLEEPING`, the compare-exchange lets exactly one end the sleep; the
//!   others find the waiter already being woken. A byte written for a sleep that ended at
//!   step 3 stays in the socket and costs one extra pass through the loop later, never a
//!   missed one.
//! * **Between a local and a remote producer** (a bell rung both from the waiter's executor
//!   and from other threads: executor 0's room bell, rung by shard 0 locally and by every
//!   other shard remotely; the channel of finished sessions). The waiter learns how its sleep
//!   ended from the state: `RUNG_LOCALLY` ends the wait at once, anything else sends it to the
//!   socket. So the mark must survive until the waiter runs, and it does because a producer
//!   changes the state only by compare-exchange from `SLEEPING`. With a plain swap it did
//!   not, and a wake-up was lost for good: (1) the waiter sleeps, `SLEEPING`; (2) a remote
//!   producer loads `SLEEPING` and is delayed (preempted, or evaluating `ring_if`'s
//!   condition); (3) a local producer swaps in `RUNG_LOCALLY` and wakes the waker; (4) the
//!   remote producer swaps in `AWAKE`, gets `RUNG_LOCALLY` back and, rightly, writes no
//!   byte; (5) the waiter runs, finds `AWAKE`, reads an empty socket and sleeps again, with
//!   the state `AWAKE`, so every later producer skips the ring. The unit test
//!   `a_remote_ring_overtaken_by_a_local_one_does_not_hide_it` forces that interleaving.
//! * **Between the byte and the waiting task**: the socket read is glommio's stream read, a
//!   plain `recv` first and, when that would block, a poll request on glommio's *main* ring
//!   holding the task's waker. The byte makes the socket readable whatever the executor is
//!   doing: if it sleeps, it sleeps in `io_uring_enter` on the main ring and the completion
//!   ends that sleep; if it runs, the completion waits in the main ring's queue, which the
//!   executor reads before it can sleep again (`wait` consumes every ring before deciding to
//!   sleep, and a completion that wakes a task forbids the sleep). No glommio foreign waker,
//!   no eventfd and no cross-thread glommio call is involved: the only cross-thread actions
//!   are the atomic and `write(2)`, which are also async-signal-safe, so a signal handler or
//!   a plain thread may ring.
//! * **On the waiter's own thread**: the waiter cannot be running while another task of its
//!   executor rings, so it is either before step 2 (it will see the condition), suspended
//!   after registering its waker in the bell (the ring takes and wakes it; the wait ends on
//!   seeing `RUNG_LOCALLY`, which no other producer can replace), or its wait was dropped
//!   (no waker: the mark stays, and the next wait starts at step 1 anyway). The waker is
//!   touched only on that thread and cleared when the wait ends, so no glommio waker
//!   crosses a thread.
//! * **[`Doorbell::ring_if`]** skips the wake while a sleeping waiter's condition would not
//!   be worth it yet (room bell: the channel is still more than half full). It is called after
//!   every receive, and the receiver drains its channel through the half-way point, so the
//!   receive that gets there sees `SLEEPING` (by the fence argument) and rings.
//!
//! # The glommio 0.9 traps, checked against this design
//!
//! * **Runnable executor parked.** `run_task_queues` returns "nothing ran" when the latency
//!   ring's completion queue is non-empty as it starts, and the executor may then park with
//!   runnable tasks. The park happens only if the completion that caused it wakes no task
//!   (a task woken by a completion forbids the sleep) and is not the foreign-wake eventfd read
//!   (consuming that completion uninstalls the eventfd, and glommio does not sleep without
//!   it). In efr the latency ring carries only that eventfd read and glommio's timeouts: every
//!   stream read is a `recv` plus a main-ring poll, accepts are done by plain threads, and no
//!   socket `peek`, `connect` or datagram is used. The timeouts are the preemption timer, which
//!   efr sets to an hour (it is re-armed every time the executor polls I/O, so it fires only
//!   if a task queue runs an hour without a break), and the timer armed for the nearest user
//!   timer while the executor sleeps, which the first I/O poll after waking cancels before any
//!   task runs (the cancel and its completion are handled inside that poll). One race is left:
//!   the kernel posts a timeout's completion through task work on the executor's thread, so
//!   if that timeout expires on another CPU just as the cancel runs (the cancel then finds it
//!   gone), its completion lands after the poll, possibly as `run_task_queues` starts, and can
//!   park the executor. [`crate::nudge`] bounds that park while the server is busy.
//! * **A wake that wakes nobody** (`should_notify` left set after a sleep recheck finds work,
//!   so a later foreign wake writes the eventfd): efr makes no foreign wakes (no
//!   `recv_async`/`send_async` across executors, no glommio waker crosses a thread), so the
//!   eventfd is written only by glommio's throughput preemption (a main-ring timeout after as
//!   many completions as the ring is deep), and its completion is the harmless kind above.
//!
//! What is left: the argument rests on glommio 0.9's internals as read (ring assignment of
//! sources, the eventfd check before sleeping). A future efr feature that puts a non-waking
//! completion on the latency ring (a `peek`, an io_uring accept, a shorter preemption timer)
//! would make the first trap frequent (the nudges of [`crate::nudge`] still bound it);
//! `tests/lost_wakeup.rs` is the regression test that watches for it.

use std::cell::UnsafeCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::AsyncRead;

/// The waiter is running, or about to look at its condition; producers need not write.
const AWAKE: u8 = 0;
/// The waiter published that it will sleep unless its recheck finds work.
const SLEEPING: u8 = 1;
/// A producer on the waiter's thread woke it through its waker (no byte was written).
const RUNG_LOCALLY: u8 = 2;

/// Source of thread identities: never reused, unlike thread-local addresses.
static NEXT_THREAD_TOKEN: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static THREAD_TOKEN: usize = NEXT_THREAD_TOKEN.fetch_add(1, Ordering::Relaxed);
}

/// This thread's identity (never 0).
fn thread_token() -> usize {
    THREAD_TOKEN.with(|token| *token)
}

/// Bytes drained from the socket per read; rings coalesce, so more than one is rare.
const DRAIN_BUFFER: usize = 64;

/// Pause before looking again if reading the bell's own socket fails (it cannot, short of a
/// kernel resource error): progress then rests on looking again at this interval.
const BELL_READ_FAILURE_PAUSE: Duration = Duration::from_millis(10);

/// The shared half of a doorbell: ring it from any thread (or a signal handler) after making
/// the waiter's condition true.
#[derive(Debug)]
pub struct Doorbell {
    state: AtomicU8,
    write_end: OwnedFd,
    /// [`thread_token`] of the waiter's thread while the waiter exists, else 0.
    home: AtomicUsize,
    /// The waiting task's waker while it sleeps; read and written only on the home thread.
    local_waker: UnsafeCell<Option<Waker>>,
}

// SAFETY: `local_waker` is the only field that is not `Sync`; it is touched only by code that
// first checked it runs on the home thread (`home == thread_token()`), and `home` is set by
// the waiter on that thread and cleared when the waiter drops there.
unsafe impl Sync for Doorbell {}

/// The read end of a new doorbell, to be turned into a [`BellWaiter`] on the executor whose
/// task waits on it.
#[derive(Debug)]
pub struct BellReadEnd {
    bell: Arc<Doorbell>,
    read_end: OwnedFd,
}

/// A nonblocking, close-on-exec Unix stream socket pair: a doorbell's ends, and the stall
/// guard's nudge sockets (`nudge.rs`).
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: plain syscall writing two descriptors into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Creates a doorbell: the shared ringing half and the waiter's read end.
pub fn doorbell() -> io::Result<(Arc<Doorbell>, BellReadEnd)> {
    let (read_end, write_end) = socket_pair()?;
    let bell = Arc::new(Doorbell {
        state: AtomicU8::new(AWAKE),
        write_end,
        home: AtomicUsize::new(0),
        local_waker: UnsafeCell::new(None),
    });
    Ok((bell.clone(), BellReadEnd { bell, read_end }))
}

impl Doorbell {
    /// The waiter's state, for diagnostics: `awake`, `sleeping` or `rung-locally`.
    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::SeqCst) {
            AWAKE => "awake",
            SLEEPING => "sleeping",
            _ => "rung-locally",
        }
    }

    /// Wakes the waiter if it sleeps. Call it after making the waiter's condition true.
    /// Async-signal-safe: one fence, one load, at most one compare-exchange and one `write(2)`.
    pub fn ring(&self) {
        self.ring_if(|| true);
    }

    /// Like [`Doorbell::ring`], but wakes a sleeping waiter only if `worth_waking` says so;
    /// `worth_waking` runs only while the waiter sleeps. The caller must make sure that, as
    /// long as the waiter sleeps, some later call finds it worth waking (a shard that frees
    /// room rings the room bell only once its channel is down to half, and it drains the
    /// channel through that point).
    pub fn ring_if(&self, worth_waking: impl FnOnce() -> bool) {
        if self.home.load(Ordering::Relaxed) == thread_token() {
            // The waiter's own thread: the waiter is not running right now, but a producer on
            // another thread may still end its sleep (`SLEEPING` to `AWAKE`) at any moment.
            if self.state.load(Ordering::Relaxed) == SLEEPING
                && worth_waking()
                && self.end_sleep(RUNG_LOCALLY)
            {
                // SAFETY: on the home thread (checked above).
                if let Some(waker) = unsafe { (*self.local_waker.get()).take() } {
                    waker.wake();
                }
            }
            return;
        }
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == SLEEPING && worth_waking() && self.end_sleep(AWAKE)
        {
            self.write_byte();
        }
    }

    /// Ends the waiter's current sleep on behalf of this producer: moves the state from
    /// `SLEEPING` to `woken_as` and says whether this producer did it (and so owes the wake).
    /// A compare-exchange, not a swap: a state another producer already moved out of
    /// `SLEEPING` must stay as that producer left it. Above all, `RUNG_LOCALLY` is how the
    /// waiter learns that its waker was taken and no byte will come; overwriting it with
    /// `AWAKE` would send the woken waiter back to sleep on a silent socket with producers
    /// reading `AWAKE`, none of which would ring again.
    fn end_sleep(&self, woken_as: u8) -> bool {
        self.state
            .compare_exchange(SLEEPING, woken_as, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }

    fn write_byte(&self) {
        let byte = 1u8;
        loop {
            // SAFETY: writes one byte from a live buffer to a descriptor owned by `self`.
            let written =
                unsafe { libc::write(self.write_end.as_raw_fd(), (&byte as *const u8).cast(), 1) };
            if written >= 0 {
                return;
            }
            // EAGAIN: the socket is full of unread bytes, so the waiter will read anyway.
            // Anything else (the waiter is gone) leaves nobody to wake.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

/// The waiting side of one doorbell, on the executor of the task that waits. One task waits
/// on it at a time (`&mut self`).
#[derive(Debug)]
pub struct BellWaiter {
    bell: Arc<Doorbell>,
    stream: glommio::net::UnixStream,
    drain: [u8; DRAIN_BUFFER],
}

impl BellReadEnd {
    /// The shared half of this doorbell.
    pub fn bell(&self) -> &Arc<Doorbell> {
        &self.bell
    }

    /// Makes the waiter; call it on the executor that waits (the socket joins its reactor).
    pub fn into_waiter(self) -> BellWaiter {
        // SAFETY: a connected Unix stream socket owned by `self`, handed to glommio.
        let stream = unsafe { glommio::net::UnixStream::from_raw_fd(self.read_end.into_raw_fd()) };
        self.bell.home.store(thread_token(), Ordering::SeqCst);
        BellWaiter {
            bell: self.bell,
            stream,
            drain: [0; DRAIN_BUFFER],
        }
    }
}

impl Drop for BellWaiter {
    fn drop(&mut self) {
        // On the home thread: no local ring can follow, and no waker is left behind.
        // SAFETY: a waiter lives and drops on its home thread.
        unsafe { *self.bell.local_waker.get() = None };
        self.bell.home.store(0, Ordering::SeqCst);
    }
}

/// One sleep of a [`BellWaiter`]: ends when a byte arrives or a producer of the same thread
/// rings. Clears the registered waker when dropped.
struct BellWait<'a> {
    waiter: &'a mut BellWaiter,
}

impl Future for BellWait<'_> {
    /// `Ok` when rung; `Err` with what the read returned when reading the socket failed.
    type Output = Result<(), io::Result<usize>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let waiter = &mut *self.get_mut().waiter;
        if waiter.bell.state.load(Ordering::Relaxed) == RUNG_LOCALLY {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut waiter.stream).poll_read(cx, &mut waiter.drain) {
            Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(Ok(())),
            Poll::Ready(outcome) => Poll::Ready(Err(outcome)),
            Poll::Pending => {
                // SAFETY: futures of a waiter are polled on its home thread.
                let slot = unsafe { &mut *waiter.bell.local_waker.get() };
                match slot {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for BellWait<'_> {
    fn drop(&mut self) {
        // SAFETY: dropped on the home thread, like every future of the waiter.
        unsafe { *self.waiter.bell.local_waker.get() = None };
    }
}

impl BellWaiter {
    /// The shared half, for producers.
    pub fn bell(&self) -> &Arc<Doorbell> {
        &self.bell
    }

    /// Waits until `ready` returns a value, looking again each time the bell rings. `ready`
    /// must read only state whose producers ring this bell after changing it.
    ///
    /// Dropping the future while it waits is safe: the bell stays armed, a later ring leaves a
    /// byte, and the next wait reads it and looks again.
    pub async fn wait_until<T>(&mut self, mut ready: impl FnMut() -> Option<T>) -> T {
        loop {
            if let Some(value) = ready() {
                return value;
            }
            self.bell.state.store(SLEEPING, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(value) = ready() {
                self.bell.state.store(AWAKE, Ordering::Relaxed);
                return value;
            }
            match (BellWait { waiter: self }).await {
                Ok(_) => {}
                Err(outcome) => {
                    tracing::warn!(
                        "doorbell read failed ({outcome:?}); looking again every {} ms",
                        BELL_READ_FAILURE_PAUSE.as_millis()
                    );
                    glommio::timer::sleep(BELL_READ_FAILURE_PAUSE).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    /// Long enough for a woken waiter to run on a loaded machine; only a lost wake-up waits it
    /// out.
    const WAKE_DEADLINE: Duration = Duration::from_secs(10);

    /// A producer on another thread reads `SLEEPING` and decides to ring; meanwhile a task on
    /// the waiter's executor makes the condition true and rings locally (taking the waiter's
    /// waker, no byte); then the remote ring completes, all before the woken waiter runs. The
    /// waiter must still learn that it was rung and look at its condition: the remote ring
    /// must neither write a byte for a sleep already ended nor erase the local ring's mark.
    /// The remote producer's `worth_waking` hook holds it between its load and its state
    /// change, so the interleaving is forced, not hoped for.
    #[test]
    fn a_remote_ring_overtaken_by_a_local_one_does_not_hide_it() {
        let (bell, read_end) = doorbell().unwrap();
        let (start_remote, remote_started) = mpsc::channel::<()>();
        let (remote_read_sleeping, remote_is_deciding) = mpsc::channel::<()>();
        let (local_ring_done, local_rung) = mpsc::channel::<()>();
        let (remote_ring_done, remote_rung) = mpsc::channel::<()>();
        let remote_bell = bell.clone();
        let remote = std::thread::spawn(move || {
            remote_started.recv().unwrap();
            let mut decided = false;
            remote_bell.ring_if(|| {
                decided = true;
                remote_read_sleeping.send(()).unwrap();
                local_rung.recv().unwrap();
                true
            });
            remote_ring_done.send(()).unwrap();
            decided
        });
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(128 << 10)
            .spawn(move || async move {
                let ready = Rc::new(AtomicBool::new(false));
                let mut waiter = read_end.into_waiter();
                let waiting = {
                    let ready = ready.clone();
                    glommio::spawn_local(async move {
                        waiter
                            .wait_until(|| ready.load(Ordering::SeqCst).then_some(()))
                            .await;
                    })
                };
                while bell.state_name() != "sleeping" {
                    futures_lite::future::yield_now().await;
                }
                // The executor's thread blocks below, so the woken waiter cannot run before
                // the remote ring has finished.
                start_remote.send(()).unwrap();
                remote_is_deciding.recv().unwrap();
                ready.store(true, Ordering::SeqCst);
                bell.ring();
                local_ring_done.send(()).unwrap();
                remote_rung.recv().unwrap();
                let state_before_waiter_ran = bell.state_name();
                let woke = futures_lite::future::or(
                    async {
                        waiting.await;
                        true
                    },
                    async {
                        glommio::timer::sleep(WAKE_DEADLINE).await;
                        false
                    },
                )
                .await;
                (woke, state_before_waiter_ran)
            })
            .unwrap();
        let (woke, state_before_waiter_ran) = executor.join().unwrap();
        assert!(remote.join().unwrap(), "the remote ring read SLEEPING");
        assert!(
            woke,
            "the waiter was rung locally but went back to sleep: wake-up lost"
        );
        assert_eq!(
            state_before_waiter_ran, "rung-locally",
            "the remote ring changed the state of a sleep a local ring had already ended"
        );
    }
}
