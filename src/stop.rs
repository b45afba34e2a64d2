//! The stop request (SIGINT, SIGTERM, or [`RunningServer::stop`](crate::server::RunningServer::stop))
//! and the moment it came: the shutdown deadline counts from the signal itself, not from the
//! moment a busy executor gets round to noticing it.

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

/// The stop flag and the time it was first raised.
#[derive(Clone, Debug, Default)]
pub struct StopRequest {
    /// Set to true to stop the server.
    pub flag: Arc<AtomicBool>,
    /// [`monotonic_ns`] of the first request; 0 while none came.
    at_ns: Arc<AtomicU64>,
    /// Executor 0's stop bell, once the server has started: a request rings it.
    bell: Arc<OnceLock<Arc<Doorbell>>>,
}

impl StopRequest {
    /// A request raising `flag`.
    pub fn new(flag: Arc<AtomicBool>) -> Self {
        StopRequest {
            flag,
            at_ns: Arc::new(AtomicU64::new(0)),
            bell: Arc::default(),
        }
    }

    /// Requests the stop now (async-signal-safe).
    pub fn request(&self) {
        self.stamp();
        self.flag.store(true, Ordering::SeqCst);
        if let Some(bell) = self.bell.get() {
            bell.ring();
        }
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
            // SAFETY: the action only reads the clock, stores to atomics and rings the stop
            // bell (a fence, a load, a swap and one write(2)): all async-signal-safe.
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
}
