//! Single-threaded wake-ups between tasks of one executor: a one-waiter [`Notify`] and a
//! [`Latch`] that stays set and wakes every waiter. No locks, no allocation after creation.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes one waiting task. A notification sent while nobody waits is kept for the next wait.
#[derive(Debug, Default)]
pub struct Notify {
    notified: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Sets the flag and wakes the waiter, if any.
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Waits until notified, and consumes the notification.
    pub fn wait(&self) -> NotifyWait<'_> {
        NotifyWait { notify: self }
    }
}

/// A flag that, once set, stays set; any number of tasks may wait for it.
#[derive(Debug, Default)]
pub struct Latch {
    set: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Latch {
    /// Sets the latch and wakes every waiter.
    pub fn set(&self) {
        self.set.set(true);
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Whether the latch is set.
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Waits until the latch is set (ready at once if it is).
    pub fn wait(&self) -> LatchWait<'_> {
        LatchWait { latch: self }
    }
}

/// The future of [`Latch::wait`].
#[derive(Debug)]
pub struct LatchWait<'a> {
    latch: &'a Latch,
}

impl Future for LatchWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.latch.set.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.latch.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The future of [`Notify::wait`].
#[derive(Debug)]
pub struct NotifyWait<'a> {
    notify: &'a Notify,
}

impl Future for NotifyWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.notified.get() {
            self.notify.notified.set(false);
            return Poll::Ready(());
        }
        let mut slot = self.notify.waker.borrow_mut();
        match slot.as_ref() {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
