//! The registry's value types: what a task is ([`TaskKind`],
//! [`TaskOrigin`]), how it ended ([`TaskOutcome`], [`TaskFailure`]), what
//! the registry reports ([`TaskSummary`], [`TaskStats`]), the handle of a
//! native task ([`TaskHandle`]) and the contract of a foreign one
//! ([`ForeignTask`], [`ForeignTaskId`]).
//!
//! Guarantees:
//! - **Plain values.** Every type here but [`TaskHandle`] is a value: it
//!   holds no lock and no reference into a registry, and is `Send + Sync`.
//! - **A handle detaches, never cancels, when dropped.** Dropping a
//!   [`TaskHandle`] leaves the task running and tracked; awaiting it yields
//!   the task's result: `Ok(())`, its error, its panic message, or
//!   [`TaskFailure::Aborted`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::task::{AbortHandle, JoinHandle};

use super::slab::Key;
use super::watched::Exit;
use super::TaskName;
#[cfg(doc)]
use super::TaskRegistry;

/// Kind of task, for observability.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// A long-running background loop (sync loop, heartbeat).
    BackgroundLoop,
    /// A per-peer connection handler.
    PeerConnection,
    /// A per-request RPC handler.
    RpcHandler,
    /// A periodic maintenance job (compaction, pruning).
    Maintenance,
}

/// Where a tracked task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskOrigin {
    /// A tokio task spawned through [`TaskRegistry::spawn`].
    Native,
    /// A foreign task (an asyncio task) tracked through
    /// [`TaskRegistry::track_foreign`].
    Python,
}

impl TaskOrigin {
    /// `"native"` or `"python"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Python => "python",
        }
    }
}

/// One live task, as seen by [`TaskRegistry::snapshot`].
#[derive(Debug, Clone)]
pub struct TaskSummary {
    /// The name given at spawn.
    pub name: TaskName,
    /// When it was spawned, to within one tick of the kernel's coarse
    /// clock (a few milliseconds) on Linux.
    pub spawned_at: Instant,
    /// Kind classification.
    pub kind: TaskKind,
    /// Native tokio task or foreign (Python) task.
    pub origin: TaskOrigin,
    /// How many times a supervised task has been restarted so far; 0 for a
    /// plain task.
    pub restarts: u32,
}

/// Counters of a registry since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Tasks ever accepted by `spawn` / `track_foreign`.
    pub spawned: u64,
    /// Tasks that returned normally.
    pub completed: u64,
    /// Tasks that returned an error or panicked.
    pub failed: u64,
    /// Foreign tasks that ended cancelled.
    pub cancelled: u64,
    /// Native tasks that were aborted before they finished.
    pub aborted: u64,
    /// Restarts of supervised tasks (a supervised task counts once in
    /// `spawned` and by how it stopped for good; each restart counts here).
    pub restarted: u64,
    /// Tasks live now.
    pub live: u64,
}

/// The counters of one [`TaskKind`] and [`TaskOrigin`], for metrics
/// labelled by kind; see [`TaskRegistry::stats_by_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindStats {
    /// The kind counted.
    pub kind: TaskKind,
    /// The origin counted.
    pub origin: TaskOrigin,
    /// Tasks of this kind and origin ever accepted.
    pub spawned: u64,
    /// Of those, tasks that failed (a supervised task: stopped for good
    /// after a failure).
    pub failed: u64,
    /// Restarts of supervised tasks of this kind and origin.
    pub restarted: u64,
    /// Tasks of this kind and origin live now.
    pub live: u64,
}

/// How many (kind, origin) pairs there are: the length of the registry's
/// per-kind counter arrays.
pub(super) const BUCKETS: usize = 8;

/// Every (kind, origin) pair, in the order of [`bucket`] (and of
/// `stats_by_kind`).
pub(super) const ALL_BUCKETS: [(TaskKind, TaskOrigin); BUCKETS] = [
    (TaskKind::BackgroundLoop, TaskOrigin::Native),
    (TaskKind::BackgroundLoop, TaskOrigin::Python),
    (TaskKind::PeerConnection, TaskOrigin::Native),
    (TaskKind::PeerConnection, TaskOrigin::Python),
    (TaskKind::RpcHandler, TaskOrigin::Native),
    (TaskKind::RpcHandler, TaskOrigin::Python),
    (TaskKind::Maintenance, TaskOrigin::Native),
    (TaskKind::Maintenance, TaskOrigin::Python),
];

/// The index of `kind` and `origin` in the per-kind counter arrays: the
/// declaration orders (both fieldless enums, discriminants from 0), so the
/// spawn path pays a shift and an add.
#[inline]
pub(super) fn bucket(kind: TaskKind, origin: TaskOrigin) -> usize {
    2 * kind as usize + origin as usize
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    /// It returned normally.
    Completed,
    /// It returned an error or panicked.
    Failed,
    /// It was cancelled (foreign tasks).
    Cancelled,
    /// It was aborted (native tasks).
    Aborted,
}

/// A task that runs outside tokio but is tracked by a [`TaskRegistry`].
pub trait ForeignTask: Send + Sync + 'static {
    /// Ask the task to stop. Called at most once per `join_all` deadline,
    /// from any thread, with no registry lock held. Must not block.
    fn cancel(&self);

    /// Whether the task has already ended although its owner has not yet
    /// called [`TaskRegistry::finish_foreign`] (its completion is queued).
    /// Such a task is not a straggler. Called with no registry lock held.
    fn is_finished(&self) -> bool {
        false
    }

    /// How the task ended, if it has already ended *quietly* (it returned,
    /// or was cancelled: its owner has nothing to log or act on) although
    /// its owner has not yet called [`TaskRegistry::finish_foreign`].
    /// `None` while it runs, or when its end has more to tell (a failure:
    /// its owner reports that). Lets a join after shutdown count such ends
    /// at once ([`TaskRegistry::finish_quiet_ends`]). Called with no
    /// registry lock held.
    fn quiet_end(&self) -> Option<TaskOutcome> {
        None
    }

    /// Where the task is waiting, as text (for an asyncio task, its stack:
    /// the chain of frames down its `await`s), for a shutdown report.
    /// Asked of a straggler just before it is [cancelled](Self::cancel),
    /// only when the caller wants stacks
    /// ([`TaskRegistry::close_and_stop_all_with_stacks`]); called with no
    /// registry lock held. `None`: nothing to tell.
    fn stack(&self) -> Option<String> {
        None
    }

    /// Stop the task for a deadline, in one call: `None` if it has
    /// [already ended](Self::is_finished) (then nothing is done); else
    /// [cancel](Self::cancel) it and return `Some` of its
    /// [stack](Self::stack), taken just before, if `want_stack` (`Some(None)`
    /// otherwise, or when it has none). This provided method calls those
    /// three in that order; override it when each of them must acquire
    /// something (a Python task: the GIL), to acquire it once. Called by
    /// [`TaskRegistry::close_and_stop_all_with_stacks`], once per live
    /// foreign task, with no registry lock held.
    fn stop(&self, want_stack: bool) -> Option<Option<String>> {
        if self.is_finished() {
            return None;
        }
        let stack = if want_stack { self.stack() } else { None };
        self.cancel();
        Some(stack)
    }
}

/// Identifies a foreign task in its registry; see
/// [`TaskRegistry::finish_foreign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForeignTaskId(pub(super) Key);

/// Why a native task did not return `Ok(())`.
#[derive(Debug, Clone)]
pub enum TaskFailure {
    /// The task returned an error.
    Error(Arc<anyhow::Error>),
    /// The task panicked; the panic message.
    Panic(String),
    /// The task was aborted.
    Aborted,
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error(e) => write!(f, "{e:#}"),
            Self::Panic(msg) => write!(f, "panicked: {msg}"),
            Self::Aborted => f.write_str("aborted"),
        }
    }
}

impl std::error::Error for TaskFailure {}

/// The handle [`TaskRegistry::spawn`] returns for a native task.
///
/// Awaiting it yields the task's result; dropping it detaches (the task
/// keeps running and stays tracked).
#[derive(Debug)]
pub struct TaskHandle {
    pub(super) name: TaskName,
    pub(super) kind: TaskKind,
    pub(super) join: JoinHandle<Exit>,
}

impl TaskHandle {
    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.name
    }
    /// The task's kind.
    pub fn kind(&self) -> TaskKind {
        self.kind
    }
    /// Abort the task; it ends at its next await point.
    pub fn abort(&self) {
        self.join.abort();
    }
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
    /// A handle that can abort the task without owning this one.
    pub fn abort_handle(&self) -> AbortHandle {
        self.join.abort_handle()
    }
}

impl Future for TaskHandle {
    type Output = std::result::Result<(), TaskFailure>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.join).poll(cx).map(|r| match r {
            Ok(Exit::Completed) => Ok(()),
            Ok(Exit::Failed(e)) => Err(TaskFailure::Error(e)),
            Ok(Exit::Stopped) => Err(TaskFailure::Aborted),
            Err(e) if e.is_panic() => Err(TaskFailure::Panic(panic_message(&*e.into_panic()))),
            Err(_) => Err(TaskFailure::Aborted),
        })
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    /// **Proves:** `bucket` numbers every (kind, origin) pair in the order
    /// of `ALL_BUCKETS`, within `BUCKETS`. **Catches:** a kind added or
    /// reordered without the counters' table (a row counted under another).
    #[test]
    fn buckets_follow_all_buckets() {
        for (i, &(kind, origin)) in ALL_BUCKETS.iter().enumerate() {
            assert_eq!(bucket(kind, origin), i);
        }
    }
}
