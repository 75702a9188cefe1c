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

use std::fmt;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

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
    callbacks: Vec<Callback>,
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
    _parent: Option<Arc<Inner>>,
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
                    callbacks: Vec::new(),
                    children: Vec::new(),
                }),
                notify: CancellationToken::new(),
                _parent: parent,
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
    pub fn cancel(&self, reason: ShutdownReason) {
        cancel_inner(&self.inner, reason);
    }

    /// The recorded reason, or `None` while the token has not fired.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.inner.state.lock().reason.clone()
    }

    /// A token that fires when `self` does; cancelling it leaves `self`
    /// untouched.
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
    /// with no lock held; it must be quick and must not block.
    pub fn on_cancel<F>(&self, callback: F) -> bool
    where
        F: FnOnce(&ShutdownReason) + Send + 'static,
    {
        let mut st = self.inner.state.lock();
        if st.reason.is_some() {
            return false;
        }
        st.callbacks.push(Box::new(callback));
        true
    }

    /// Whether `self` and `other` are clones of one token.
    pub fn same_as(&self, other: &ShutdownToken) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

fn cancel_inner(inner: &Arc<Inner>, reason: ShutdownReason) {
    let (callbacks, children) = {
        let mut st = inner.state.lock();
        if st.reason.is_some() {
            return;
        }
        st.reason = Some(reason.clone());
        (
            std::mem::take(&mut st.callbacks),
            std::mem::take(&mut st.children),
        )
    };
    inner.notify.cancel();
    for cb in callbacks {
        cb(&reason);
    }
    for child in children {
        if let Some(child) = child.upgrade() {
            cancel_inner(&child, reason.clone());
        }
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
