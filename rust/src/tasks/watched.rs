//! A native task as tokio runs it: the user's future wrapped in [`Watched`],
//! which reports the task's end to the registry however it ends.
//!
//! Guarantees:
//! - **Every end is reported, once.** A task that returns, fails, panics,
//!   is aborted, is stopped at a deadline, or is dropped unpolled by a
//!   runtime that has shut down leaves the registry exactly once, counted
//!   by how it ended; even a future whose `Drop` panics cannot leave a
//!   phantom live task ([`EndGuard`]).
//! - **Cleanup before the count.** The user's future is dropped before the
//!   task's end is counted, so a join that sees a task gone sees its
//!   cleanup done.
//! - **Stops at the next poll.** Once the registry is stopping, a task ends
//!   at its next poll, as if aborted; a task that has waited is woken for it.
//! - **A refused spawn is told apart.** A task dropped unpolled inside its
//!   own `spawn` (the runtime has shut down) is marked, so that `spawn` can
//!   refuse it instead of reporting a task that never ran.
//! - **Small.** Two words beside the future (tokio rounds a task's cell up
//!   to 128 bytes; SPEC P6 measures the cost against `TaskTracker`).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::supervise::Reported;
use super::{Control, Entry, Inner, TaskOutcome};

/// How a native task's future ended, as its `JoinHandle` reports it. Small
/// on purpose: tokio moves it into the task's cell.
#[derive(Debug)]
pub(super) enum Exit {
    Completed,
    Failed(Arc<anyhow::Error>),
    /// Stopped by `close_and_stop_all`, like an abort.
    Stopped,
}

pin_project! {
    /// A native task as spawned: the user's future, which stops at its next
    /// poll once the registry is stopping, and the slot of its entry, which
    /// it removes when it ends, however it ends (tokio drops the task's
    /// future when it is aborted, and while unwinding from a panic), even
    /// when dropping the user's future panics (see [`EndGuard`]).
    ///
    /// Kept to two words beside the future: tokio rounds a task's cell up
    /// to 128 bytes, and a trivial task through `TaskTracker` fills exactly
    /// one such line.
    pub(super) struct Watched<F> {
        // `None` once the task has ended. The future is dropped before the
        // entry leaves, so a task's cleanup has run when a join sees it gone.
        #[pin]
        fut: Option<F>,
        inner: Arc<Inner>,
        // Only this task removes its entry, so the slot index alone names it.
        slot: u32,
        // Set the first time the future returns `Pending`.
        parked: bool,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.fut.is_some() {
                // Ends the task when it drops: after the future, or while
                // unwinding from the future's own `Drop`.
                let _end = EndGuard {
                    inner: this.inner,
                    slot: *this.slot,
                    polled: *this.parked,
                };
                this.fut.set(None);
            }
        }
    }
}

/// Ends a native task whose future is being dropped before it returned: an
/// abort, the stop at a deadline, a shut-down runtime, a panic in `poll`
/// (tokio drops the future while unwinding), or (`polled`) a panic in the
/// future's `Drop` after it returned. Counted `Failed` when unwinding,
/// else `Aborted`: either way the task leaves the registry, so a `Drop`
/// that panics cannot leave a phantom live task behind.
struct EndGuard<'a> {
    inner: &'a Inner,
    slot: u32,
    polled: bool,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            TaskOutcome::Failed
        } else {
            if !self.polled && SPAWNING.with(Cell::get) == std::ptr::from_ref(self.inner) {
                // Dropped unpolled inside its own `spawn`: the runtime has
                // shut down (tokio shuts a task down inline then).
                REFUSED.with(|r| r.set(true));
            }
            TaskOutcome::Aborted
        };
        if let Some(name) = self.inner.finish_native(self.slot, outcome) {
            tracing::error!(target: "dig_service::tasks", task = %name, "task panicked");
        }
    }
}

thread_local! {
    /// The registry whose `spawn_with` is handing a task to tokio on this
    /// thread, or null.
    static SPAWNING: Cell<*const Inner> = const { Cell::new(std::ptr::null()) };
    /// Set by a task of that registry dropped unpolled inside `spawn_with`,
    /// read (and cleared) by `spawn_with` right after.
    pub(super) static REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as spawning into a registry, for [`EndGuard`]; restores
/// the previous mark when dropped (a task's drop may spawn, too).
pub(super) struct Spawning(*const Inner);

impl Spawning {
    #[inline]
    pub(super) fn enter(inner: &Arc<Inner>) -> Self {
        Self(SPAWNING.with(|s| s.replace(Arc::as_ptr(inner))))
    }
}

impl Drop for Spawning {
    #[inline]
    fn drop(&mut self) {
        SPAWNING.with(|s| s.set(self.0));
    }
}

impl<F> Watched<F> {
    /// The task that runs `fut` for the entry in `slot` of `inner`.
    #[inline]
    pub(super) fn new(fut: F, inner: Arc<Inner>, slot: u32) -> Self {
        Self {
            fut: Some(fut),
            inner,
            slot,
            parked: false,
        }
    }
}

impl<F: Future<Output = anyhow::Result<()>>> Future for Watched<F> {
    type Output = Exit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exit> {
        let mut this = self.project();
        // Relaxed: a stale `false` costs one more poll of the user's
        // future, never a missed stop. `close_and_stop_all` sets the flag
        // under the state lock, then wakes every task whose waker it found
        // there; tokio orders a wake before the poll it causes, so that poll
        // reads `true`. A task whose waker was not there yet stores it under
        // the same lock (`park_native`), reads the flag there, and wakes
        // itself.
        if this.inner.stopping.load(Ordering::Relaxed) {
            // Dropped with the task, as if aborted.
            return Poll::Ready(Exit::Stopped);
        }
        let fut = this
            .fut
            .as_mut()
            .as_pin_mut()
            .expect("a native task polled after it ended");
        let res = match fut.poll(cx) {
            Poll::Ready(res) => res,
            Poll::Pending => {
                if !*this.parked {
                    *this.parked = true;
                    this.inner.park_native(*this.slot, cx.waker());
                }
                return Poll::Pending;
            }
        };
        {
            // Only if the future's `Drop` panics (then `fut` is `None`
            // all the same, and the guard ends the task as failed).
            let end = EndGuard {
                inner: this.inner,
                slot: *this.slot,
                polled: true,
            };
            this.fut.set(None);
            std::mem::forget(end);
        }
        match res {
            Ok(()) => {
                this.inner.finish_native(*this.slot, TaskOutcome::Completed);
                Poll::Ready(Exit::Completed)
            }
            Err(e) => {
                if let Some(name) = this.inner.finish_native(*this.slot, TaskOutcome::Failed) {
                    // A supervised task's last failure was logged by its
                    // supervisor, with the decision it led to.
                    if !e.is::<Reported>() {
                        tracing::error!(target: "dig_service::tasks", task = %name, error = ?e, "task failed");
                    }
                }
                Poll::Ready(Exit::Failed(Arc::new(e)))
            }
        }
    }
}

impl Inner {
    /// Store the waker of the native task in `slot`, which has just waited
    /// for the first time; wake it at once if a stop came first.
    fn park_native(&self, slot: u32, waker: &Waker) {
        let stop = {
            let mut st = self.state.lock();
            // A straggler (named before its first wait) keeps its mark: it
            // is woken below, to stop.
            if let Some(Entry {
                control: Control::Native(w),
                ..
            }) = st.entries.get_mut_at(slot)
            {
                *w = Some(waker.clone());
            }
            // Relaxed, under the state lock that `close_and_stop_all` holds
            // while it sets the flag: either that section came first (this
            // reads `true`, and the task wakes itself to stop) or this one did
            // (then that section finds the waker stored here, and wakes it).
            self.stopping.load(Ordering::Relaxed)
        };
        if stop {
            waker.wake_by_ref();
        }
    }
}

/// Where `spawn_with` puts a task: `tokio::spawn` needs no runtime handle
/// (whose lookup clones an `Arc`), `spawn_on` names one.
pub(super) trait Spawner {
    fn spawn<T>(self, task: T) -> JoinHandle<T::Output>
    where
        T: Future + Send + 'static,
        T::Output: Send + 'static;
}

pub(super) struct CurrentRuntime;

impl Spawner for CurrentRuntime {
    fn spawn<T>(self, task: T) -> JoinHandle<T::Output>
    where
        T: Future + Send + 'static,
        T::Output: Send + 'static,
    {
        tokio::spawn(task)
    }
}

impl Spawner for &Handle {
    fn spawn<T>(self, task: T) -> JoinHandle<T::Output>
    where
        T: Future + Send + 'static,
        T::Output: Send + 'static,
    {
        Handle::spawn(self, task)
    }
}
