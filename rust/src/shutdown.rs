//! The broadcast shutdown token and the reasons a service stops.
//!
//! [`ShutdownToken`] is a clone-to-share cancellation flag that carries a
//! typed [`ShutdownReason`]. Guarantees:
//!
//! - **First reason wins.** `cancel(reason)` records only the first reason
//!   ever given; later calls are no-ops. You cannot un-shutdown.
//! - **Reason before wake.** The reason is stored before any waiter is
//!   woken, so a waiter that wakes always sees `reason() == Some(..)`.
//! - **Children.** [`ShutdownToken::child_token`] is cancelled when its
//!   parent is; cancelling the child leaves the parent (and its reason)
//!   alone. A child's `reason()` is its own if it was cancelled first, else
//!   its parent's. (The 0.1 crate shared one reason slot between parent and
//!   child, so a child's cancel leaked its reason into the parent.)
//! - **Thread-safe.** `cancel` may be called from any thread; every waiter,
//!   async (`cancelled().await`) or callback ([`ShutdownToken::on_cancel`]),
//!   is woken exactly once.
//! - **Propagation always completes.** A callback that panics is caught and
//!   logged (target `dig_service::shutdown`); the other callbacks and every
//!   descendant token are still cancelled, and the panic does not leave
//!   `cancel` (it is called from signal handlers and from drops).
//! - **Any depth.** Cancelling a token and dropping one are iterative: a
//!   chain of a million child tokens (a reconnect loop deriving each
//!   connection's token from the last one's) is cancelled and freed on a
//!   2 MiB tokio worker stack.
//! - **Unregistering.** [`ShutdownToken::on_cancel_guard`] registers a
//!   callback that its [`OnCancelGuard`] unregisters when dropped, so a
//!   long-lived token does not accumulate the callbacks of short-lived
//!   waiters.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::tasks::panic_message;
use crate::tasks::slab::{Key, Slab};

/// Why the service is shutting down.
///
/// Binaries map these to exit codes: every reason but `Fatal` is graceful.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownReason {
    /// SIGINT / SIGTERM / Ctrl-C.
    UserRequested,
    /// An admin RPC method (`stop_node`) requested shutdown.
    RpcRequested,
    /// A reload was requested; the binary should exit and be re-spawned.
    ReloadRequested,
    /// The node's `run` returned by itself; tasks are told to wind down.
    RequestedByRun,
    /// An unrecoverable internal error, with a human-readable message.
    Fatal(String),
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserRequested => f.write_str("user requested"),
            Self::RpcRequested => f.write_str("rpc requested"),
            Self::ReloadRequested => f.write_str("reload requested"),
            Self::RequestedByRun => f.write_str("requested by run"),
            Self::Fatal(msg) => write!(f, "fatal: {msg}"),
        }
    }
}

type Callback = Box<dyn FnOnce(&ShutdownReason) + Send + 'static>;

struct State {
    reason: Option<ShutdownReason>,
    /// A slab, so that an [`OnCancelGuard`] removes its callback in O(1)
    /// and a guard dropped after the token fired (the slab was drained,
    /// every slot moved to its next generation) removes nothing.
    /// Each with whether it runs before the async waiters wake
    /// ([`ShutdownToken::on_cancel_before_wake`]).
    callbacks: Slab<(bool, Callback)>,
    children: Vec<Weak<Inner>>,
}

struct Inner {
    state: Mutex<State>,
    // Mirrors `state.reason.is_some()` for async waiters in Rust. Never
    // linked to a parent's CancellationToken: propagation goes through
    // `children` so that callbacks and reasons propagate with it.
    notify: CancellationToken,
    // Keeps the parent (and so the chain of `children` links leading to
    // this token) alive while this token lives: parents hold only weak
    // links to their children, so without this a dropped intermediate
    // token (`t.child_token().child_token()`) would cut its descendants off.
    // Released iteratively (see `Drop for Inner`).
    parent: Option<Arc<Inner>>,
}

impl Drop for Inner {
    /// Release the chain of parents without recursing: dropping the last
    /// token of a deep chain would otherwise drop each parent from inside
    /// its child's drop, one stack frame per link (a 50k-deep chain
    /// overflowed a 2 MiB worker stack). Each parent this token held the
    /// last reference to is taken out of its `Arc` here, its own parent
    /// link detached, and dropped with nothing left to recurse into.
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(parent) = next {
            // `into_inner`, not `try_unwrap`: if two threads drop the last
            // two references at once, exactly one of them gets the value.
            next = Arc::into_inner(parent).and_then(|mut p| p.parent.take());
        }
    }
}

/// A cancellation token with a typed [`ShutdownReason`].
///
/// Clone-to-share: every clone observes the same cancellation.
#[derive(Clone)]
pub struct ShutdownToken {
    inner: Arc<Inner>,
}

impl ShutdownToken {
    /// A fresh, uncancelled token.
    pub fn new() -> Self {
        Self::with_parent(None)
    }

    fn with_parent(parent: Option<Arc<Inner>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    reason: None,
                    callbacks: Slab::default(),
                    children: Vec::new(),
                }),
                notify: CancellationToken::new(),
                parent,
            }),
        }
    }

    /// Whether the token has fired (itself or through a parent).
    pub fn is_cancelled(&self) -> bool {
        self.inner.notify.is_cancelled()
    }

    /// Completes once the token has fired.
    pub async fn cancelled(&self) {
        self.inner.notify.cancelled().await
    }

    /// Fire the token. Only the first call records its reason; the others
    /// are no-ops. Children are cancelled with the same reason.
    ///
    /// Safe from any thread; every waiter is woken once, and sees the
    /// reason when it wakes.
    ///
    /// ```
    /// use dig_service::{ShutdownReason, ShutdownToken};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let token = ShutdownToken::new();
    /// let waiter = {
    ///     let token = token.clone();
    ///     tokio::spawn(async move {
    ///         token.cancelled().await;
    ///         token.reason() // set before any waiter wakes
    ///     })
    /// };
    /// token.cancel(ShutdownReason::RpcRequested);
    /// token.cancel(ShutdownReason::UserRequested); // first reason wins: a no-op
    /// assert_eq!(waiter.await.unwrap(), Some(ShutdownReason::RpcRequested));
    /// assert_eq!(token.reason(), Some(ShutdownReason::RpcRequested));
    /// # });
    /// ```
    pub fn cancel(&self, reason: ShutdownReason) {
        cancel_inner(&self.inner, reason);
    }

    /// The recorded reason, or `None` while the token has not fired.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.inner.state.lock().reason.clone()
    }

    /// A token that fires when `self` does; cancelling it leaves `self`
    /// untouched.
    ///
    /// A child's `reason()` is its own if it was cancelled first, else its
    /// parent's; a child made from a token that has fired is born fired.
    ///
    /// ```
    /// use dig_service::{ShutdownReason, ShutdownToken};
    ///
    /// let service = ShutdownToken::new();
    /// let connection = service.child_token();
    /// connection.cancel(ShutdownReason::Fatal("peer misbehaved".into()));
    /// assert!(connection.is_cancelled());
    /// assert!(!service.is_cancelled(), "a child's cancel stays in the child");
    /// assert_eq!(service.reason(), None);
    ///
    /// let other = service.child_token();
    /// service.cancel(ShutdownReason::UserRequested);
    /// assert_eq!(other.reason(), Some(ShutdownReason::UserRequested));
    /// assert!(matches!(connection.reason(), Some(ShutdownReason::Fatal(_))));
    /// assert!(service.child_token().is_cancelled());
    /// ```
    pub fn child_token(&self) -> ShutdownToken {
        let child = ShutdownToken::with_parent(Some(self.inner.clone()));
        let mut st = self.inner.state.lock();
        if let Some(reason) = st.reason.clone() {
            drop(st);
            child.cancel(reason);
        } else {
            // Forget children that are gone before adding one more, so a
            // parent that hands out short-lived children stays small.
            if st.children.len() >= 16 && st.children.len().is_power_of_two() {
                st.children.retain(|w| w.strong_count() > 0);
            }
            st.children.push(Arc::downgrade(&child.inner));
        }
        child
    }

    /// Run `callback` once, with the reason, when the token fires.
    ///
    /// Returns `false` (and drops `callback` without calling it) when the
    /// token has already fired: the caller then knows the reason is
    /// available and acts on it directly. The callback runs on the thread
    /// that calls [`cancel`](Self::cancel), after the reason is recorded and
    /// with no lock held; it must be quick and must not block. If it
    /// panics, the panic is caught and logged and the propagation goes on.
    ///
    /// The callback stays registered until the token fires; use
    /// [`on_cancel_guard`](Self::on_cancel_guard) for one that can be
    /// unregistered.
    pub fn on_cancel<F>(&self, callback: F) -> bool
    where
        F: FnOnce(&ShutdownReason) + Send + 'static,
    {
        match self.on_cancel_guard(callback) {
            Some(guard) => {
                guard.disarm();
                true
            }
            None => false,
        }
    }

    /// Like [`on_cancel`](Self::on_cancel), but the returned guard
    /// unregisters the callback when it is dropped (its captures are then
    /// dropped at once, on the dropping thread). `None` (and `callback`
    /// dropped without being called) when the token has already fired.
    ///
    /// Dropping the guard once the token has fired does nothing: the
    /// callback has run, or is running on the cancelling thread.
    pub fn on_cancel_guard<F>(&self, callback: F) -> Option<OnCancelGuard>
    where
        F: FnOnce(&ShutdownReason) + Send + 'static,
    {
        self.register(false, Box::new(callback))
    }

    /// Like [`on_cancel_guard`](Self::on_cancel_guard), but the callback
    /// runs before any async waiter wakes (while [`is_cancelled`] still
    /// reads `false`; the reason is recorded): what it reads is the state
    /// of the moment the token fired, before any task could react to it.
    /// The service's shutdown report stamps the firing with it.
    ///
    /// [`is_cancelled`]: Self::is_cancelled
    pub(crate) fn on_cancel_before_wake<F>(&self, callback: F) -> Option<OnCancelGuard>
    where
        F: FnOnce(&ShutdownReason) + Send + 'static,
    {
        self.register(true, Box::new(callback))
    }

    fn register(&self, before_wake: bool, callback: Callback) -> Option<OnCancelGuard> {
        let mut st = self.inner.state.lock();
        if st.reason.is_some() {
            drop(st);
            return None;
        }
        let key = st
            .callbacks
            .insert((before_wake, callback))
            .expect("more than 2^32 - 1 callbacks on one token");
        Some(OnCancelGuard {
            token: Arc::downgrade(&self.inner),
            key,
        })
    }

    /// Whether `self` and `other` are clones of one token.
    pub fn same_as(&self, other: &ShutdownToken) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// Cancel `root` and every descendant that has not fired yet, without
/// recursion (a deep chain of children would overflow the stack): tokens
/// still to cancel wait in a work list.
fn cancel_inner(root: &Arc<Inner>, reason: ShutdownReason) {
    let mut todo = Vec::new();
    cancel_one(root, &reason, &mut todo);
    while let Some(child) = todo.pop() {
        cancel_one(&child, &reason, &mut todo);
    }
}

/// Cancel one token: record the reason (unless it has one), run its
/// before-wake callbacks, wake its async waiters, run its other callbacks
/// and queue its live children.
fn cancel_one(inner: &Inner, reason: &ShutdownReason, todo: &mut Vec<Arc<Inner>>) {
    let (callbacks, children) = {
        let mut st = inner.state.lock();
        if st.reason.is_some() {
            // Fired before, by this or an earlier cancel, whose propagation
            // to the descendants is its own (and runs to the end).
            return;
        }
        st.reason = Some(reason.clone());
        (st.callbacks.drain(), std::mem::take(&mut st.children))
    };
    let (early, late): (Vec<_>, Vec<_>) = callbacks.into_iter().partition(|(early, _)| *early);
    let run = |cb: Callback| {
        // A panicking callback must not cut the propagation short: the
        // reason is recorded already, so a retried `cancel` would return at
        // once and the callbacks and children after it would never run.
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| cb(reason))) {
            tracing::error!(
                target: "dig_service::shutdown",
                panic = %panic_message(&*payload),
                "an on_cancel callback panicked; the others still run"
            );
        }
    };
    early.into_iter().for_each(|(_, cb)| run(cb));
    inner.notify.cancel();
    late.into_iter().for_each(|(_, cb)| run(cb));
    todo.extend(children.iter().filter_map(Weak::upgrade));
}

/// Unregisters a callback of [`ShutdownToken::on_cancel_guard`] when
/// dropped. Holds no strong reference to the token.
#[must_use = "dropping the guard unregisters the callback at once"]
pub struct OnCancelGuard {
    token: Weak<Inner>,
    key: Key,
}

impl OnCancelGuard {
    /// Keep the callback registered for good (until the token fires), as
    /// [`ShutdownToken::on_cancel`] does.
    pub fn disarm(mut self) {
        self.token = Weak::new();
    }
}

impl Drop for OnCancelGuard {
    fn drop(&mut self) {
        let Some(inner) = self.token.upgrade() else {
            return;
        };
        let callback = inner.state.lock().callbacks.remove(self.key);
        // Dropped outside the lock: its captures may do anything.
        drop(callback);
    }
}

impl fmt::Debug for OnCancelGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnCancelGuard")
            .field("armed", &(self.token.strong_count() > 0))
            .finish()
    }
}

impl Default for ShutdownToken {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ShutdownToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownToken")
            .field("reason", &self.reason())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// **Proves:** only the first reason is kept, whichever clone cancels.
    /// **Catches:** a later `cancel` overwriting the recorded reason.
    #[test]
    fn first_reason_wins_across_clones() {
        let t = ShutdownToken::new();
        let c = t.clone();
        c.cancel(ShutdownReason::RpcRequested);
        t.cancel(ShutdownReason::UserRequested);
        assert_eq!(t.reason(), Some(ShutdownReason::RpcRequested));
        assert!(c.is_cancelled());
    }

    /// **Proves:** a child's cancel does not touch the parent's reason, and
    /// a parent's cancel reaches the child with the parent's reason.
    /// **Catches:** the 0.1 bug of one reason slot shared by parent and child.
    #[test]
    fn child_reason_is_its_own() {
        let parent = ShutdownToken::new();
        let child = parent.child_token();
        child.cancel(ShutdownReason::ReloadRequested);
        assert!(!parent.is_cancelled());
        assert_eq!(parent.reason(), None);
        parent.cancel(ShutdownReason::UserRequested);
        assert_eq!(child.reason(), Some(ShutdownReason::ReloadRequested));

        let second = parent.child_token();
        assert_eq!(second.reason(), Some(ShutdownReason::UserRequested));
        let p2 = ShutdownToken::new();
        let grandchild = p2.child_token().child_token();
        p2.cancel(ShutdownReason::Fatal("x".into()));
        assert_eq!(grandchild.reason(), Some(ShutdownReason::Fatal("x".into())));
    }

    /// **Proves:** callbacks run once, after the reason is visible, and a
    /// registration after the fact is refused instead of silently dropped.
    /// **Catches:** lost or doubled wake-ups for foreign (Python) waiters.
    #[test]
    fn callbacks_fire_once_with_reason() {
        let t = ShutdownToken::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (h, t2) = (hits.clone(), t.clone());
        assert!(t.on_cancel(move |r| {
            assert_eq!(r, &ShutdownReason::UserRequested);
            assert_eq!(t2.reason(), Some(ShutdownReason::UserRequested));
            h.fetch_add(1, Ordering::SeqCst);
        }));
        t.cancel(ShutdownReason::UserRequested);
        t.cancel(ShutdownReason::RpcRequested);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(!t.on_cancel(|_| unreachable!()));
    }

    /// **Proves:** registering and unregistering (guard dropped) a million
    /// callbacks one after the other keeps one page of slots: memory is
    /// bounded by the callbacks registered at once.
    /// **Catches:** unregistration that only forgets the callback and keeps
    /// its slot (or no unregistration: 1M registrations held 62 MB).
    #[test]
    fn guard_churn_keeps_memory_bounded() {
        let t = ShutdownToken::new();
        for _ in 0..1_000_000 {
            drop(t.on_cancel_guard(|_| {}).unwrap());
        }
        let st = t.inner.state.lock();
        assert_eq!(st.callbacks.len(), 0);
        assert!(
            st.callbacks.capacity() <= 128,
            "{}",
            st.callbacks.capacity()
        );
    }

    /// **Proves:** async waiters on a child wake when the parent fires.
    /// **Catches:** propagation that updates the reason but not the waiters.
    #[tokio::test]
    async fn child_waiters_wake_on_parent_cancel() {
        let parent = ShutdownToken::new();
        let child = parent.child_token();
        let waiter = tokio::spawn(async move { child.cancelled().await });
        parent.cancel(ShutdownReason::UserRequested);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("child waiter woke")
            .unwrap();
    }
}
