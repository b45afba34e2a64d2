//! The stop request (SIGINT, SIGTERM, or [`RunningServer::stop`](crate::server::RunningServer::stop))
//! and the moment it came: the shutdown deadline counts from the signal itself, not from the
//! moment a busy executor gets round to noticing it.
//!
//! Threads that are not executors (the cluster roles' NATS threads) wait for the request on
//! [`StopRequest::wake_fd`], the read end of a pipe that the request writes one byte to: an
//! atomic store and a `write(2)` are all a signal handler may do, and a pipe is a descriptor
//! any event loop can sleep on without a timer.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::doorbell::Doorbell;

/// Nanoseconds of `CLOCK_MONOTONIC`; async-signal-safe (one `clock_gettime`).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into our struct; it is async-signal-safe.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// A non-blocking pipe: the request writes a byte to `write`, nobody ever reads `read`, so
/// it stays readable from the first request on, for every waiter.
#[derive(Debug)]
struct WakePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl WakePipe {
    fn new() -> std::io::Result<WakePipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into our array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        Ok(unsafe {
            WakePipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

/// The stop flag and the time it was first raised.
#[derive(Clone, Debug)]
pub struct StopRequest {
    /// Set to true to stop the server.
    pub flag: Arc<AtomicBool>,
    /// [`monotonic_ns`] of the first request; 0 while none came.
    at_ns: Arc<AtomicU64>,
    /// Executor 0's stop bell, once the server has started: a request rings it.
    bell: Arc<OnceLock<Arc<Doorbell>>>,
    /// Readable from the first request on (None: the pipe could not be made; waiters then
    /// look at the flag now and then).
    pipe: Arc<Option<WakePipe>>,
}

impl Default for StopRequest {
    fn default() -> Self {
        StopRequest::new(Arc::default())
    }
}

impl StopRequest {
    /// A request raising `flag`.
    pub fn new(flag: Arc<AtomicBool>) -> Self {
        let pipe = WakePipe::new()
            .inspect_err(|error| {
                tracing::warn!("no stop pipe ({error}): the NATS threads will look at the stop flag every 50 ms instead");
            })
            .ok();
        StopRequest {
            flag,
            at_ns: Arc::new(AtomicU64::new(0)),
            bell: Arc::default(),
            pipe: Arc::new(pipe),
        }
    }

    /// Requests the stop now (async-signal-safe).
    pub fn request(&self) {
        self.stamp();
        self.flag.store(true, Ordering::SeqCst);
        if let Some(bell) = self.bell.get() {
            bell.ring();
        }
        if let Some(pipe) = self.pipe.as_ref() {
            // A full pipe (EAGAIN) is readable already; nothing else can fail here.
            // SAFETY: write(2) of one byte from a live buffer; async-signal-safe.
            unsafe {
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&pipe.write),
                    [1u8].as_ptr().cast(),
                    1,
                );
            }
        }
    }

    /// A descriptor that becomes readable at the first request and stays so (None: no pipe
    /// could be made). Read nothing from it: other waiters share it.
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe.as_ref().as_ref().map(|pipe| pipe.read.as_fd())
    }

    /// Rings `bell` at every request from now on (the server's stop watcher sleeps on it).
    /// A request that came before is seen by the watcher's first look at the flag.
    pub fn ring_on_request(&self, bell: Arc<Doorbell>) {
        let _ = self.bell.set(bell);
    }

    /// Records now as the moment of the request, unless one was recorded already.
    pub fn stamp(&self) {
        let _ = self.at_ns.compare_exchange(
            0,
            monotonic_ns().max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Time since the request, if one came (and was stamped).
    pub fn elapsed(&self) -> Option<Duration> {
        match self.at_ns.load(Ordering::SeqCst) {
            0 => None,
            at => Some(Duration::from_nanos(monotonic_ns().saturating_sub(at))),
        }
    }

    /// Makes SIGINT and SIGTERM request the stop.
    pub fn handle_signals(&self) -> std::io::Result<()> {
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let request = self.clone();
            // SAFETY: the action only reads the clock, stores to atomics, rings the stop
            // bell (a fence, a load, a swap and one write(2)) and writes one byte to the
            // stop pipe: all async-signal-safe.
            unsafe {
                signal_hook::low_level::register(signal, move || request.request())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_is_the_one_timed() {
        let stop = StopRequest::default();
        assert!(stop.elapsed().is_none() && !stop.is_requested());
        stop.request();
        std::thread::sleep(Duration::from_millis(5));
        stop.request();
        assert!(stop.is_requested());
        assert!(stop.elapsed().unwrap() >= Duration::from_millis(5));
    }

    #[test]
    fn the_wake_descriptor_becomes_readable_at_the_request_and_stays_so() {
        let stop = StopRequest::default();
        let readable = |stop: &StopRequest| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stop.wake_fd().expect("a pipe"));
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one live descriptor, no wait.
            unsafe { libc::poll(&mut poll, 1, 0) == 1 }
        };
        assert!(!readable(&stop));
        stop.request();
        assert!(readable(&stop));
        stop.request();
        assert!(readable(&stop.clone()));
    }
}
