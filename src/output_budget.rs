//! The server-wide budget for pending output (`--max-output-memory`).
//!
//! Each shard counts the capacity of its clients' output buffers (pending and handed to a
//! writer) in its [`Router`](crate::router::Router) and adds the change to one shared gauge,
//! `output_pending_bytes`, once per turn of its command loop and once per completed write,
//! never per notification. When the gauge is over the budget after a batch, a shard holding
//! more than its share of the budget closes its clients with the largest backlog first until
//! the gauge is back under the budget (or the shard under its share); every shard receives
//! every batch, so the shards holding the memory act at their next batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::client_io::CloseMode;
use crate::shard_state::ShardState;
use crate::shared::Shared;
use crate::stats::{Counters, Fault};

/// Adds this shard's change of output memory to the server-wide gauge.
pub fn publish(state: &ShardState) {
    let (added, removed) = state.router.borrow_mut().take_output_memory_change();
    let gauge = &state.shared.counters.output_pending_bytes;
    Counters::add(gauge, added);
    if removed != 0 {
        Counters::sub(gauge, removed);
    }
}

/// Publishes this shard's output memory and, while the server-wide total is over
/// `--max-output-memory`, closes this shard's clients with the largest backlog first.
pub fn enforce(state: &ShardState) {
    publish(state);
    let shared = &state.shared;
    let budget = shared.config.max_output_memory;
    let gauge = &shared.counters.output_pending_bytes;
    if gauge.load(Ordering::Relaxed) <= budget {
        return;
    }
    // A shard within its share of the budget closes nobody: the shards over their share hold
    // the largest backlogs (the sum is over the budget, so one of them is) and act at their
    // next batch. Otherwise a well-behaved client of a light shard would pay for another
    // shard's stalled clients.
    let share = budget / shared.config.cores.max(1) as u64;
    let mut ranked = Vec::new();
    state.router.borrow().clients_by_backlog(&mut ranked);
    for (backlog, client) in ranked {
        let total = gauge.load(Ordering::Relaxed);
        if total <= budget || state.router.borrow().output_memory() <= share {
            break;
        }
        let user = state.router.borrow().user_of(client);
        Counters::add(&shared.counters.clients_closed_output_memory, 1);
        shared.faults.warn(Fault::OutputMemory, || {
            format!(
                "closing client of user {user} ({backlog} bytes unsent): pending output of all \
                 clients ({total} bytes) is over --max-output-memory ({budget} bytes)"
            )
        });
        if let Some(io) = state.io(client) {
            if !io.release_memory_on_exit.replace(true) {
                CLOSING_FOR_MEMORY.fetch_add(1, Ordering::AcqRel);
            }
        }
        state.close_client(client, CloseMode::Abort);
        state.router.borrow_mut().discard_output(client);
        publish(state);
    }
}

/// Pending output the system takes back per second when the process frees it and exits, taken
/// low for a loaded machine (measured here: 1 GB resident took about 0.2 s, 2.7 GB about
/// 0.36 s from the end of the drain to the exit on a quiet machine; with 1.4 GB on a loaded
/// one the exit still came 0.35 s after the deadline at 4 GB/s).
pub const RELEASE_BYTES_PER_SECOND: u64 = 2_000_000_000;

/// How long a shard may still write out pending output at shutdown: until the shutdown
/// deadline (`--shutdown-timeout-ms` from the stop request) minus the time it will take to give
/// the pending output's memory back, so that the process exits by the deadline. Output only
/// shrinks once the shards are stopping, so the margin taken now covers the end.
pub fn drain_time(shared: &Shared) -> Duration {
    let timeout = shared.config.shutdown_timeout;
    shared.config.stop.stamp();
    let elapsed = shared.config.stop.elapsed().unwrap_or_default();
    let pending = shared.counters.output_pending_bytes.load(Ordering::Relaxed);
    let margin =
        Duration::from_secs_f64(pending as f64 / RELEASE_BYTES_PER_SECOND as f64).min(timeout / 2);
    timeout.saturating_sub(elapsed + margin)
}

/// Whether a stop was requested and its shutdown deadline has passed: queued batches are then
/// dropped instead of applied, so a shard with a long queue still exits in time.
pub fn past_shutdown_deadline(shared: &Shared) -> bool {
    shared
        .config
        .stop
        .elapsed()
        .is_some_and(|elapsed| elapsed >= shared.config.shutdown_timeout)
}

/// Gives the memory of freed buffers back to the system. Without it glibc keeps the freed
/// pages of past backlogs: a 100M-event soak with stalling clients ended at 157 MB resident
/// with no client open.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Clients closed for the budget whose writers have not ended yet, in the whole process.
static CLOSING_FOR_MEMORY: AtomicU64 = AtomicU64::new(0);

/// Called by a writer closed for the budget as it ends, after its buffers are freed: the last
/// of a burst of such closes gives the freed memory back to the system.
pub fn writer_closed_for_memory_ended() {
    if CLOSING_FOR_MEMORY.fetch_sub(1, Ordering::AcqRel) == 1 {
        release_freed_memory();
    }
}
