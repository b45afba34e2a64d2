//! Passing through glommio's reactor on purpose: how the long-running tasks (the sequencer and
//! the shards) let the executor poll I/O and run the other tasks while they still have work
//! queued. Shared by both, so it lives in neither.

use std::time::Duration;

/// The timer of [`reactor_pass`]: long enough that it is still pending when first polled, so
/// the caller really leaves the task queue, and short enough to cost nothing measurable.
const REACTOR_PASS: Duration = Duration::from_micros(1);

/// Lets the executor poll I/O and run the other tasks before the caller goes on. Called only
/// while the caller has more work queued (a shard whose channel is not empty, a sequencer
/// whose source just delivered data): an idle executor never arms it.
///
/// A plain `yield_now` keeps the task queue runnable, and glommio then polls I/O only at
/// preemption, which efr keeps off (see `server.rs`). A timer that is not yet due empties the
/// queue instead: the executor polls I/O, runs the writers and readers it woke, finds the
/// timer due and resumes the caller. glommio keeps such timers in its own timer wheel and only
/// puts a kernel timeout on the latency ring when the executor is about to sleep, which it
/// cancels in the next I/O poll, before any task runs (see [`crate::doorbell`]).
pub async fn reactor_pass() {
    glommio::timer::sleep(REACTOR_PASS).await;
}
