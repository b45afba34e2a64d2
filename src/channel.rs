//! Bounded channels between executors (and from plain threads) whose waits go through a
//! [`Doorbell`](crate::doorbell::Doorbell): flume carries the messages, the receiver's bell
//! wakes a receiver that sleeps, and a room bell wakes senders waiting for a full channel.
//!
//! Nothing here uses flume's async waits: a flume waker is a glommio waker called from another
//! thread, and that path is what [`crate::doorbell`] is built to avoid. Every wait is
//! "publish sleeping, fence, look again, await the bell", so none polls and none can miss its
//! wake-up (the argument is in the doorbell module).
//!
//! The halves are created together ([`bounded`]) and are `Send`; each is then attached on the
//! executor that uses it: [`Receiver::attach`] gives the [`Inbox`] one task receives from,
//! [`Sender::attach`] gives an [`Outbox`] that waits for room through an executor-local
//! [`Room`]. Plain threads use [`Sender::send_blocking`].

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::rc::Rc;
use std::sync::Arc;

use crate::doorbell::{doorbell, BellReadEnd, BellWaiter, Doorbell};
use crate::nudge::Activity;

/// Creates a bounded channel of `depth` messages with its receiver's doorbell.
pub fn bounded<T>(depth: usize) -> std::io::Result<(Sender<T>, Receiver<T>)> {
    with_doorbell(flume::bounded(depth), depth / 2)
}

/// Creates a channel without a bound, with its receiver's doorbell: for rare messages that a
/// sender must neither wait for room for nor drop (a shard's acknowledgement that it finished a
/// session). [`Sender::try_send`] on it fails only when the receiver is gone.
pub fn unbounded<T>() -> std::io::Result<(Sender<T>, Receiver<T>)> {
    with_doorbell(flume::unbounded(), 0)
}

fn with_doorbell<T>(
    (sender, receiver): (flume::Sender<T>, flume::Receiver<T>),
    room_low_water: usize,
) -> std::io::Result<(Sender<T>, Receiver<T>)> {
    let (bell, read_end) = doorbell()?;
    Ok((
        Sender {
            inner: ManuallyDrop::new(sender),
            receiver_bell: bell,
            activity: None,
        },
        Receiver {
            inner: receiver,
            read_end,
            room_bell: None,
            room_low_water,
        },
    ))
}

/// The sending half: `Send` and `Clone`, usable from any thread.
#[derive(Debug)]
pub struct Sender<T> {
    inner: ManuallyDrop<flume::Sender<T>>,
    receiver_bell: Arc<Doorbell>,
    /// Told of every send (the stall guard's busy signal), when set.
    activity: Option<Arc<Activity>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            inner: ManuallyDrop::new((*self.inner).clone()),
            receiver_bell: self.receiver_bell.clone(),
            activity: self.activity.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // SAFETY: `inner` is dropped exactly once, here; the ring after it lets a sleeping
        // receiver see the disconnect of the last sender.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        self.receiver_bell.ring();
    }
}

impl<T> Sender<T> {
    /// Tells `activity` of every send of this sender and its clones (the shard channels tell
    /// the stall guard, [`crate::nudge`], that the server is busy).
    pub fn noting_activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// After a message was queued: rings the receiver and tells the activity watcher.
    #[inline]
    fn sent(&self) {
        self.receiver_bell.ring();
        if let Some(activity) = &self.activity {
            activity.note();
        }
    }

    /// Sends without waiting; rings the receiver on success.
    pub fn try_send(&self, message: T) -> Result<(), flume::TrySendError<T>> {
        self.inner.try_send(message)?;
        self.sent();
        Ok(())
    }

    /// From a plain thread (never on an executor): sends, blocking the thread while the
    /// channel is full. Returns false when the receiver is gone.
    pub fn send_blocking(&self, message: T) -> bool {
        if self.inner.send(message).is_err() {
            return false;
        }
        self.sent();
        true
    }

    /// From a thread with its own async runtime (not a glommio executor): sends, waiting
    /// while the channel is full through flume's async send (flume then wakes that runtime's
    /// waker, never a glommio one). Returns false when the receiver is gone.
    pub async fn send_async(&self, message: T) -> bool {
        if self.inner.send_async(message).await.is_err() {
            return false;
        }
        self.sent();
        true
    }

    /// On the executor that sends: an [`Outbox`] that waits for room through `room`.
    pub fn attach(self, room: &Rc<Room>) -> Outbox<T> {
        Outbox {
            sender: self,
            room: room.clone(),
        }
    }
}

/// The receiving half before it is attached to its executor.
#[derive(Debug)]
pub struct Receiver<T> {
    inner: flume::Receiver<T>,
    read_end: BellReadEnd,
    room_bell: Option<Arc<Doorbell>>,
    room_low_water: usize,
}

impl<T> Receiver<T> {
    /// The receiver's doorbell (for diagnostics: [`Doorbell::state_name`]).
    pub fn bell(&self) -> &Arc<Doorbell> {
        self.read_end.bell()
    }

    /// Rings `room_bell` for senders waiting in a [`Room`] once a receive has brought the
    /// channel down to half its depth: a sender that found it full then refills half of it in
    /// one go, instead of waking (and waking the receiver's executor) for every slot.
    pub fn ringing_on_room(mut self, room_bell: Arc<Doorbell>) -> Self {
        self.room_bell = Some(room_bell);
        self
    }

    /// For a receiver that is not a glommio executor (a thread with its own async runtime):
    /// it receives through flume's async receive, and still rings the room bell for senders
    /// waiting in a [`Room`]. Its own doorbell is never armed, so senders never write to it.
    pub fn into_foreign(self) -> ForeignReceiver<T> {
        ForeignReceiver {
            inner: self.inner,
            room: self.room_bell.map(|bell| (bell, self.room_low_water)),
        }
    }

    /// Call on the executor whose task receives.
    pub fn attach(self) -> Inbox<T> {
        Inbox {
            inner: self.inner,
            waiter: self.read_end.into_waiter(),
            room: self.room_bell.map(|bell| (bell, self.room_low_water)),
        }
    }
}

/// Where one task of one executor receives.
#[derive(Debug)]
pub struct Inbox<T> {
    inner: flume::Receiver<T>,
    waiter: BellWaiter,
    /// The room bell and the length at or below which it is rung.
    room: Option<(Arc<Doorbell>, usize)>,
}

/// After a receive from `inner`: wakes a sender waiting for room once the channel is down to
/// `low_water` (it passes that point while it drains, so no waiting sender is forgotten).
fn freed_room<T>(inner: &flume::Receiver<T>, room: &Option<(Arc<Doorbell>, usize)>) {
    if let Some((bell, low_water)) = room {
        bell.ring_if(|| inner.len() <= *low_water);
    }
}

impl<T> Inbox<T> {
    /// Takes the next message if one is queued.
    pub fn try_recv(&self) -> Result<T, flume::TryRecvError> {
        let message = self.inner.try_recv()?;
        freed_room(&self.inner, &self.room);
        Ok(message)
    }

    /// Whether no message is queued right now.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Receives the next message, sleeping on the doorbell while the channel is empty, or
    /// `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let inner = &self.inner;
        let room = &self.room;
        self.waiter
            .wait_until(|| match inner.try_recv() {
                Ok(message) => {
                    freed_room(inner, room);
                    Some(Some(message))
                }
                Err(flume::TryRecvError::Disconnected) => Some(None),
                Err(flume::TryRecvError::Empty) => None,
            })
            .await
    }
}

/// A receiver on a thread with its own async runtime ([`Receiver::into_foreign`]).
#[derive(Debug)]
pub struct ForeignReceiver<T> {
    inner: flume::Receiver<T>,
    room: Option<(Arc<Doorbell>, usize)>,
}

impl<T> ForeignReceiver<T> {
    /// Receives the next message, or `None` once every sender is gone.
    pub async fn recv_async(&self) -> Option<T> {
        let message = self.inner.recv_async().await.ok()?;
        freed_room(&self.inner, &self.room);
        Some(message)
    }
}

/// The executor-local side of waiting for room: one doorbell, rung by the receivers of every
/// channel whose [`Receiver::ringing_on_room`] names it, and a turn so that one task at a
/// time sleeps on it (the others queue behind it on the executor).
#[derive(Debug)]
pub struct Room {
    waiter: RefCell<Option<BellWaiter>>,
    turn: glommio::sync::Semaphore,
}

impl Room {
    /// Call on the executor whose tasks send. `read_end` is the room bell's waiting side;
    /// its shared half goes to the receivers.
    pub fn new(read_end: BellReadEnd) -> Rc<Room> {
        Rc::new(Room {
            waiter: RefCell::new(Some(read_end.into_waiter())),
            turn: glommio::sync::Semaphore::new(1),
        })
    }
}

/// A sender attached to its executor, waiting for room without polling.
#[derive(Debug)]
pub struct Outbox<T> {
    sender: Sender<T>,
    room: Rc<Room>,
}

impl<T> Outbox<T> {
    /// Sends `message`, waiting while the channel is full. Returns false when the receiver is
    /// gone.
    pub async fn send(&self, message: T) -> bool {
        let message = match self.sender.try_send(message) {
            Ok(()) => return true,
            Err(flume::TrySendError::Disconnected(_)) => return false,
            Err(flume::TrySendError::Full(message)) => message,
        };
        let Ok(_turn) = self.room.turn.acquire_permit(1).await else {
            return false;
        };
        // The turn makes this task the only one using the waiter until `_turn` drops; the
        // loan puts it back even if this future is dropped while it waits.
        let mut loan = WaiterLoan {
            room: &self.room,
            waiter: self.room.waiter.borrow_mut().take(),
        };
        let Some(waiter) = loan.waiter.as_mut() else {
            unreachable!("the room's waiter is only lent while its turn is held");
        };
        let mut pending = Some(message);
        waiter
            .wait_until(|| {
                let message = pending.take()?;
                match self.sender.try_send(message) {
                    Ok(()) => Some(true),
                    Err(flume::TrySendError::Disconnected(_)) => Some(false),
                    Err(flume::TrySendError::Full(message)) => {
                        pending = Some(message);
                        None
                    }
                }
            })
            .await
    }
}

/// The room's waiter while one sender holds the turn; returned when dropped.
struct WaiterLoan<'a> {
    room: &'a Room,
    waiter: Option<BellWaiter>,
}

impl Drop for WaiterLoan<'_> {
    fn drop(&mut self) {
        *self.room.waiter.borrow_mut() = self.waiter.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::doorbell;

    /// A glommio executor receives what a foreign thread sends with `send_async`, and sends
    /// through a full channel to a foreign receiver, which rings the room bell.
    #[test]
    fn foreign_threads_send_to_and_receive_from_an_executor() {
        const MESSAGES: u64 = 2_000;
        let (to_executor, from_thread) = bounded::<u64>(4).unwrap();
        let (room_bell, room_read_end) = doorbell().unwrap();
        let (to_thread, from_executor) = bounded::<u64>(4).unwrap();
        let from_executor = from_executor.ringing_on_room(room_bell).into_foreign();
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(128 << 10)
            .spawn(move || async move {
                let room = Room::new(room_read_end);
                let outbox = to_thread.attach(&room);
                let mut inbox = from_thread.attach();
                let mut sum = 0;
                while let Some(value) = inbox.recv().await {
                    sum += value;
                    assert!(outbox.send(value).await, "the foreign receiver is there");
                }
                sum
            })
            .unwrap();
        let echo = std::thread::spawn(move || {
            futures_lite::future::block_on(async {
                let mut sum = 0;
                while let Some(value) = from_executor.recv_async().await {
                    sum += value;
                }
                sum
            })
        });
        futures_lite::future::block_on(async {
            for value in 1..=MESSAGES {
                assert!(to_executor.send_async(value).await);
            }
        });
        drop(to_executor);
        let expected = MESSAGES * (MESSAGES + 1) / 2;
        assert_eq!(executor.join().unwrap(), expected);
        assert_eq!(echo.join().unwrap(), expected);
    }
}
