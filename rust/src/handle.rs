//! The out-of-band handle to a service.
//!
//! A [`ServiceHandle`] is a cheap clone that signal handlers, admin RPC
//! methods and tests use to observe and stop a `Service` from anywhere.
//! Guarantees:
//!
//! - **Outlives the service.** A handle holds no borrow of the `Service`;
//!   after the service is dropped its calls are harmless (requesting
//!   shutdown cancels a token nobody runs on any more) and never panic.
//! - **One recorded result.** `Service::start`'s result is recorded once;
//!   every [`ServiceHandle::wait_for_exit`] (before or after the fact, from
//!   any clone) returns a clone of that very result.
//! - **Never hangs on a dead service.** If the service is dropped without
//!   having been started, waiters get [`ServiceError::AlreadyStopped`]
//!   instead of waiting forever. Once started, the lifecycle runs as a task
//!   of its own: dropping the `start()` future (or the service) winds it
//!   down and the waiters get its real outcome; if the runtime shuts down
//!   under it, they get [`ServiceError::LifecycleAborted`].

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::error::{Result, ServiceError};
use crate::exit::ExitStatus;
use crate::shutdown::{ShutdownReason, ShutdownToken};
use crate::tasks::{TaskRegistry, TaskSummary};

/// Where a service is in its life.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Built, `start()` not called yet.
    Created,
    /// `start()` called and its lifecycle not yet ended.
    Running,
    /// The lifecycle ended with this, or the service was dropped unstarted
    /// (see [`Shared::abandon_unstarted`]).
    Exited(Result<ExitStatus>),
}

/// State shared by a `Service` and all of its handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: &'static str,
    pub(crate) phase: watch::Sender<Phase>,
}

impl Shared {
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            phase: watch::Sender::new(Phase::Created),
        }
    }

    /// `Created → Running`; `false` if the service was started before.
    pub(crate) fn begin(&self) -> bool {
        self.phase.send_if_modified(|p| match p {
            Phase::Created => {
                *p = Phase::Running;
                true
            }
            _ => false,
        })
    }

    /// Record `start()`'s result (first record wins).
    pub(crate) fn finish(&self, result: Result<ExitStatus>) {
        self.phase.send_if_modified(|p| match p {
            Phase::Exited(_) => false,
            _ => {
                *p = Phase::Exited(result);
                true
            }
        });
    }

    /// The service is dropped: if it was never started, no result will
    /// ever come, so release the waiters. A started one's lifecycle task
    /// records its result itself.
    pub(crate) fn abandon_unstarted(&self) {
        self.phase.send_if_modified(|p| match p {
            Phase::Created => {
                *p = Phase::Exited(Err(ServiceError::AlreadyStopped));
                true
            }
            _ => false,
        });
    }

    pub(crate) fn is_running(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Running)
    }

    pub(crate) async fn wait_for_exit(&self) -> Result<ExitStatus> {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the channel cannot close while we
        // wait.
        let phase = rx
            .wait_for(|p| matches!(p, Phase::Exited(_)))
            .await
            .expect("the phase sender outlives its waiters");
        match &*phase {
            Phase::Exited(result) => result.clone(),
            _ => unreachable!("wait_for returned a non-exited phase"),
        }
    }
}

/// A cheap-clone handle to a `Service`, valid after the service is gone.
#[derive(Clone)]
pub struct ServiceHandle {
    shutdown: ShutdownToken,
    tasks: TaskRegistry,
    shared: Arc<Shared>,
}

impl ServiceHandle {
    pub(crate) fn new(shutdown: ShutdownToken, tasks: TaskRegistry, shared: Arc<Shared>) -> Self {
        Self {
            shutdown,
            tasks,
            shared,
        }
    }

    /// The service's name (`NodeLifecycle::NAME`, or `""` when the node
    /// declares none).
    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    /// Ask the service to shut down. Idempotent: only the first reason
    /// (from any handle, the service or a task) is recorded. Harmless once
    /// the service has exited or been dropped.
    pub fn request_shutdown(&self, reason: ShutdownReason) {
        self.shutdown.cancel(reason);
    }

    /// Whether the service is alive: `start()` has been called and its
    /// lifecycle has not ended yet (it goes on after the `start()` future
    /// is dropped, until the wind-down is over).
    ///
    /// This stays `true` while the service is *stopping* (token fired,
    /// tasks being joined, `on_stop`/`post_stop` running), because the
    /// process still has work in flight and must not be killed as if idle;
    /// use `shutdown_token().is_cancelled()` to tell "stopping" from
    /// "serving". It is `false` before `start()` and after it returned
    /// (whatever the outcome), and after the service was dropped.
    pub fn is_running(&self) -> bool {
        self.shared.is_running()
    }

    /// The service's shutdown token.
    pub fn shutdown_token(&self) -> &ShutdownToken {
        &self.shutdown
    }

    /// The live tracked tasks. Empty once the service has exited, except
    /// for a straggler aborted at the deadline that tokio has not dropped
    /// yet (one blocking its thread cannot be dropped until it yields).
    pub fn tasks(&self) -> Vec<TaskSummary> {
        self.tasks.snapshot()
    }

    /// Wait until the service's lifecycle has ended, and return (a clone
    /// of) its result: what `start()` returned, or would have returned had
    /// its future not been dropped. Returns at once if it already has.
    ///
    /// If the service is dropped without ever being started, there is no
    /// result to wait for: this returns [`ServiceError::AlreadyStopped`].
    /// If the runtime shut down before the lifecycle ended:
    /// [`ServiceError::LifecycleAborted`].
    pub async fn wait_for_exit(&self) -> Result<ExitStatus> {
        self.shared.wait_for_exit().await
    }
}

impl fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("name", &self.shared.name)
            .field("phase", &*self.shared.phase.borrow())
            .field("shutdown", &self.shutdown)
            .field("tasks", &self.tasks.len())
            .finish()
    }
}
