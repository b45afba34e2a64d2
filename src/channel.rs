//! Channel operations between executors (and plain threads) that do not depend on wake-ups
//! alone.
//!
//! Measured here: with flume between glommio 0.9 executors, a wake-up from another thread is
//! occasionally lost (a 10M-event run stalled with batches sitting in an idle shard's
//! channel). These helpers use the channel's wake-ups when they come and look again after
//! [`CHANNEL_RECHECK`] when they do not, so progress never depends on one.

use std::time::Duration;

/// Longest a waiting channel operation goes without looking at the channel again.
pub const CHANNEL_RECHECK: Duration = Duration::from_millis(1);

/// Sends `message`, waiting while the channel is full. Returns false when the receiver is
/// gone.
pub async fn send<T>(sender: &flume::Sender<T>, message: T) -> bool {
    let mut message = message;
    loop {
        match sender.try_send(message) {
            Ok(()) => return true,
            Err(flume::TrySendError::Disconnected(_)) => return false,
            Err(flume::TrySendError::Full(returned)) => {
                message = returned;
                glommio::timer::sleep(CHANNEL_RECHECK).await;
            }
        }
    }
}

/// Receives the next message, or `None` when every sender is gone.
pub async fn recv<T>(receiver: &flume::Receiver<T>) -> Option<T> {
    loop {
        match receiver.try_recv() {
            Ok(message) => return Some(message),
            Err(flume::TryRecvError::Disconnected) => return None,
            Err(flume::TryRecvError::Empty) => {}
        }
        let woken =
            futures_lite::future::or(async { Some(receiver.recv_async().await.ok()) }, async {
                glommio::timer::sleep(CHANNEL_RECHECK).await;
                None
            })
            .await;
        match woken {
            Some(Some(message)) => return Some(message),
            Some(None) => return None,
            None => continue,
        }
    }
}
