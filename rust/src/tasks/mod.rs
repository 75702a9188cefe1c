//! The tracked-task registry.
//!
//! [`TaskRegistry`] tracks every task of a service, native or foreign, by
//! name and kind, and joins them under one deadline at shutdown.
//!
//! # Guarantees
//!
//! - **Finished tasks leave at once.** A task leaves the live count, the
//!   snapshot and the straggler list the moment it finishes, so memory is
//!   bounded by live tasks, not by tasks ever spawned (the 0.1 crate kept
//!   every entry until `join_all`). A native task's entry itself is freed
//!   in a batch a little later (see `reap`): when a spawn needs its slot,
//!   or once several thousand wait, and at once when
//!   the registry empties.
//! - **One deadline for everything.** [`TaskRegistry::join_all`] waits for
//!   every live task, including tasks spawned while it waits, until the
//!   deadline. Then it aborts native stragglers, cancels foreign ones and
//!   reports them all, by name, in
//!   [`ServiceError::ShutdownDeadlineExceeded`].
//! - **Closed after join.** Once `join_all` has returned, the registry is
//!   closed and `spawn` fails with [`ServiceError::AlreadyStopped`].
//! - **Nothing lost silently.** A task's error or panic is logged (target
//!   `dig_service::tasks`) and counted in [`TaskStats`]. A panic while the
//!   task's future is being dropped (when it ends, or when it is aborted)
//!   is a panic too: the task still leaves the registry, counted failed.
//! - **Counted once.** A task named as a straggler by a deadline is counted
//!   `aborted`, however it ends afterwards (one that blocks its worker
//!   thread cannot be stopped and may still run to completion).
//! - **Never a panic.** [`TaskRegistry::spawn`] outside a tokio runtime
//!   returns [`ServiceError::NoRuntime`]; a spawn on a runtime that has
//!   shut down (the task could never run) returns
//!   [`ServiceError::RuntimeShutDown`]. Neither leaves anything behind.
//! - **Critical tasks.** [`TaskRegistry::spawn_critical`] is the Rust
//!   `critical=True`: a task that fails or panics, or returns while the
//!   token has not fired, cancels the token with
//!   [`ShutdownReason::Fatal`](crate::ShutdownReason::Fatal).
//!
//! # Two kinds of task
//!
//! *Native* tasks are tokio tasks spawned through [`TaskRegistry::spawn`].
//! *Foreign* tasks run elsewhere (the Python bindings use this for asyncio
//! tasks): [`TaskRegistry::track_foreign`] records them, the owner reports
//! their end through [`TaskRegistry::finish_foreign`], and the registry
//! stops them through the [`ForeignTask`] they were registered with. After
//! shutdown, [`TaskRegistry::finish_quiet_ends`] counts the foreign tasks
//! that have already ended quietly before their owners get to report them
//! (an asyncio task's done callback runs a loop turn after its end), so a
//! join need not wait that turn.
//!
//! # Where things are
//!
//! | module | concept |
//! |---|---|
//! | this one | [`TaskRegistry`]: the live entries, the live count, spawn, join, stop |
//! | `types` | the value types: kinds, outcomes, summaries, stats, [`TaskHandle`] |
//! | `watched` | a native task as tokio runs it, reporting its end however it ends |
//! | `critical` | critical tasks: a failure cancels the token |
//! | `reap` | deferred, batched removal of ended native tasks |
//! | `slab`, `stamp`, `name` | the entry slab, spawn timestamps, task names |
//!
//! # Memory ordering
//!
//! Three things are shared by every task: the live count (`Inner::counts`),
//! the stop flag (`Inner::stopping`) and the bits of ended tasks
//! (`Inner::ended`, see `reap`). Everything else is under the state lock.
//! The argument for each operation's ordering is written next to it.

mod critical;
mod name;
mod policy;
mod reap;
pub(crate) mod slab;
mod stamp;
mod supervise;
mod types;
mod watched;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::{Result, ServiceError};
use crate::shutdown::ShutdownToken;
use critical::Critical;
pub use name::TaskName;
#[cfg(feature = "python")]
pub(crate) use policy::{End, Step};
pub use policy::{Restart, RestartPolicy};
use reap::{EndedBits, Outcomes, LEAVE, LIVE, REAP_AT, WAITING_ONE};
use slab::{Key, Slab};
use stamp::{Epoch, Stamp};
pub use supervise::SupervisedHandle;
#[cfg(feature = "python")]
pub(crate) use supervise::{Level, Supervisor};
pub(crate) use types::panic_message;
use types::{bucket, BUCKETS};
pub use types::{
    ForeignTask, ForeignTaskId, KindStats, TaskFailure, TaskHandle, TaskKind, TaskOrigin,
    TaskOutcome, TaskStats, TaskSummary,
};
use watched::{CurrentRuntime, Exit, Spawner, Spawning, Watched, REFUSED};

// ---------------------------------------------------------------------------
// Registry state: a generation-checked slab of live entries.

enum Control {
    /// A native task. Its waker is stored the first time it waits (the
    /// waker of a tokio task never changes), so that
    /// `close_and_stop_all` can wake it to be stopped; a task that never
    /// waited sees the stop flag on its first poll.
    Native(Option<Waker>),
    /// A native task that `close_and_stop_all` named as a straggler (and
    /// woke, if it had waited): counted `Aborted` however it ends.
    Straggler,
    Foreign(Arc<dyn ForeignTask>),
}

struct Entry {
    name: TaskName,
    kind: TaskKind,
    /// Restarts of a supervised task so far; 0 for a plain task.
    restarts: u32,
    /// Unique within the registry, in spawn order (see `State::insert`).
    spawned_at: Stamp,
    control: Control,
}

impl Entry {
    fn origin(&self) -> TaskOrigin {
        match self.control {
            Control::Native(_) | Control::Straggler => TaskOrigin::Native,
            Control::Foreign(_) => TaskOrigin::Python,
        }
    }

    /// Its counters' index in the per-kind arrays (see `types::bucket`).
    #[inline]
    fn bucket(&self) -> usize {
        bucket(self.kind, self.origin())
    }
}

type IdleWaker = Box<dyn FnOnce() + Send + 'static>;

/// What the state lock guards.
struct State {
    entries: Slab<Entry>,
    /// The latest `spawned_at` given out.
    last_stamp: Stamp,
    closed: bool,
    /// A slab, so that a `join_all` future dropped midway removes its
    /// wake-up (see `IdleWait`) instead of leaving it until the registry
    /// empties.
    idle_wakers: Slab<IdleWaker>,
    /// Tasks accepted, by kind and origin (see `types::bucket`).
    spawned: [u64; BUCKETS],
    /// Restarts of supervised tasks, by kind and origin.
    restarted: [u64; BUCKETS],
    /// Outcomes of the ended tasks other than completions (see `reap`).
    ended: Outcomes,
    /// Slots below this have their bit in `Inner::ended`.
    covered: u64,
}

impl State {
    fn new() -> Self {
        Self {
            entries: Slab::default(),
            last_stamp: Stamp::now(),
            closed: false,
            idle_wakers: Slab::default(),
            spawned: [0; BUCKETS],
            restarted: [0; BUCKETS],
            ended: Outcomes::default(),
            covered: 0,
        }
    }

    /// Store `entry`. Its `spawned_at`, read on a clock that ticks every
    /// few milliseconds, is moved past the previous entry's, so that stamps
    /// order entries exactly as they were spawned.
    #[inline]
    fn insert(&mut self, mut entry: Entry) -> Key {
        entry.spawned_at = entry.spawned_at.max(self.last_stamp.successor());
        self.last_stamp = entry.spawned_at;
        self.spawned[entry.bucket()] += 1;
        self.entries
            .insert(entry)
            .expect("more than 2^32 - 1 live tasks")
    }
}

/// The registry's shared state. `repr(C)` fixes the order: the fields every
/// task touches from whichever thread it runs on (the counts, the stop
/// flag, the bits' segments) sit right after the `Arc`'s reference counts,
/// which every task changes anyway, and the state lock, which the spawning
/// thread takes on every spawn, starts a cache line of its own, so that
/// ending tasks on other threads do not pull it away.
#[repr(C)]
struct Inner {
    /// Low half ([`LIVE`]): tasks spawned and not yet ended, incremented
    /// under the state lock (so `try_close` under the lock sees every
    /// spawn), decremented without it when a task ends. High half: native
    /// tasks that completed and wait to be reaped (an estimate, see `reap`),
    /// added to by the same step that leaves the live count.
    counts: AtomicU64,
    /// Set (under the state lock, before its reap) by `close_and_stop_all`:
    /// every native task still running stops at its next poll, and a task
    /// that ends from then on leaves at once (see `Inner::finish_native`).
    stopping: AtomicBool,
    shutdown: ShutdownToken,
    /// The slots of native tasks that completed and wait to be reaped.
    ended: EndedBits,
    /// Keeps `state` off the cache line of the fields above.
    _line: [u8; 64],
    state: Mutex<State>,
}

impl Inner {
    fn new(shutdown: ShutdownToken) -> Self {
        Self {
            shutdown,
            state: Mutex::new(State::new()),
            counts: AtomicU64::new(0),
            ended: EndedBits::default(),
            stopping: AtomicBool::new(false),
            _line: [0; 64],
        }
    }

    /// Tasks live now.
    #[inline]
    fn live(&self) -> u64 {
        // Acquire: a caller that reads 0 sees every task's end (see
        // `leave`).
        self.counts.load(Ordering::Acquire) & LIVE
    }

    /// Take one task off the live count by adding `step` to the counts
    /// ([`LEAVE`], or `reap::LEAVE_TO_WAITING` for a native task whose entry
    /// waits to be reaped); returns the counts before. The caller calls
    /// `now_idle` if it took the last live task off (`before & LIVE == 1`).
    #[inline]
    fn leave(&self, step: u64) -> u64 {
        // AcqRel. Release: everything the task did (its future is dropped
        // before its end is counted, see `watched`) happens-before whoever
        // reads a count this step leads to (`len`, `close_or_wait`:
        // Acquire). Acquire: the step that takes the last task off reads
        // the end of a release sequence made of every earlier step, so this
        // thread has seen every other task's end (and its bit, see `reap`)
        // before `now_idle` reaps and wakes the joiners (who then see it
        // too: the wake-up is a channel send).
        self.counts.fetch_add(step, Ordering::AcqRel)
    }

    /// The live count has just dropped to zero: reap, and wake the joiners
    /// if no spawn came in meanwhile.
    #[cold]
    fn now_idle(&self) {
        let (wakers, idle) = {
            let mut st = self.state.lock();
            let wakers = self.reap(&mut st);
            // Under the state lock, which a spawn holds while it increments:
            // a spawn since the decrement above is seen, and the joiners are
            // then not woken. Acquire, as every read that may conclude "empty".
            let idle = if self.live() == 0 {
                st.idle_wakers.drain()
            } else {
                Vec::new()
            };
            (wakers, idle)
        };
        drop(wakers);
        for w in idle {
            w();
        }
    }

    /// Remove the foreign task under `k` and count `outcome`; hand the
    /// entry back, to be dropped outside the lock (its payload may need the
    /// GIL).
    fn finish_foreign(&self, k: Key, outcome: TaskOutcome) -> Option<Entry> {
        let (entry, last) = {
            let mut st = self.state.lock();
            let entry = st.entries.remove(k)?;
            st.ended.count(outcome, entry.bucket());
            // Under the state lock, so that `stats` never sees the outcome
            // counted while the task is still live.
            (entry, self.leave(LEAVE) & LIVE == 1)
        };
        if last {
            self.now_idle();
        }
        Some(entry)
    }

    /// Close the registry and return `None` if no task is live; otherwise
    /// store `wake`, to run once the live count next drops to zero, and
    /// return its key (for [`IdleWait`]).
    fn close_or_wait(&self, wake: IdleWaker) -> Option<Key> {
        let mut st = self.state.lock();
        // Acquire: on 0, `join_all` returns, and the Release of each task's
        // last step (`leave`) makes the tasks' ends visible to the
        // joiner. The state lock orders the read against spawns, which
        // increment under it: no spawn slips in between the check and the
        // close.
        if self.live() == 0 {
            st.closed = true;
            let reaped = self.reap(&mut st);
            drop(st);
            drop(reaped);
            None
        } else {
            let key = st
                .idle_wakers
                .insert(wake)
                .expect("more than 2^32 - 1 join_all waiters");
            Some(key)
        }
    }
}

/// Removes a `join_all` wake-up when the waiting future is dropped, so that
/// abandoned joins (a `select!`, a `timeout`) leave nothing behind. A key
/// whose wake-up already ran names nothing (the slab moved on a
/// generation), so the removal is then a no-op.
struct IdleWait<'a> {
    inner: &'a Inner,
    key: Key,
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        let wake = self.inner.state.lock().idle_wakers.remove(self.key);
        // Dropped outside the lock.
        drop(wake);
    }
}

/// The tracked-task registry. Clone-to-share.
#[derive(Clone)]
pub struct TaskRegistry {
    inner: Arc<Inner>,
}

/// What [`TaskRegistry::close_and_stop_all`] found still running.
#[derive(Debug, Clone)]
pub struct Stragglers {
    /// Names of the live tasks, in spawn order.
    pub names: Vec<String>,
    /// The same tasks, in the same order, with what a shutdown report
    /// tells of each (kind, origin, spawn time, stack).
    pub tasks: Vec<Straggler>,
}

/// One task found still running by [`TaskRegistry::close_and_stop_all`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Straggler {
    /// The name given at spawn.
    pub name: TaskName,
    /// Its kind.
    pub kind: TaskKind,
    /// Native tokio task or foreign (Python) task.
    pub origin: TaskOrigin,
    /// When it was spawned (to within a tick of the coarse clock).
    pub spawned_at: std::time::Instant,
    /// Where a foreign task was waiting, as text ([`ForeignTask::stack`]),
    /// asked just before it was cancelled; `None` for a native task, and
    /// past the `max_stacks` first foreign stragglers (see
    /// [`TaskRegistry::close_and_stop_all_with_stacks`]).
    pub stack: Option<String>,
}

impl TaskRegistry {
    /// An empty, open registry linked to `shutdown`.
    pub fn new(shutdown: ShutdownToken) -> Self {
        Self {
            inner: Arc::new(Inner::new(shutdown)),
        }
    }

    /// The shutdown token this registry is linked to.
    pub fn shutdown(&self) -> &ShutdownToken {
        &self.inner.shutdown
    }

    /// Spawn a tracked tokio task on the current runtime.
    ///
    /// The task's error or panic is logged and counted; its entry leaves the
    /// registry as soon as it ends, however it ends.
    ///
    /// # Errors
    /// [`ServiceError::AlreadyStopped`] once `join_all` has closed the
    /// registry; [`ServiceError::NoRuntime`] outside a tokio runtime (use
    /// [`spawn_on`](Self::spawn_on) to name one);
    /// [`ServiceError::RuntimeShutDown`] when the runtime has shut down, so
    /// the task could never run. The future is dropped unpolled in each
    /// case, and nothing is counted.
    ///
    /// # Example
    ///
    /// ```
    /// use dig_service::{ShutdownReason, ShutdownToken, TaskKind, TaskRegistry};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let token = ShutdownToken::new();
    /// let tasks = TaskRegistry::new(token.clone());
    /// let heartbeat = tasks
    ///     .spawn("heartbeat", TaskKind::BackgroundLoop, {
    ///         let token = token.clone();
    ///         async move {
    ///             token.cancelled().await; // a loop would do its work until then
    ///             Ok(())
    ///         }
    ///     })
    ///     .expect("inside a runtime, registry open");
    /// assert_eq!(tasks.len(), 1);
    /// assert_eq!(tasks.snapshot()[0].name.as_str(), "heartbeat");
    ///
    /// token.cancel(ShutdownReason::UserRequested);
    /// heartbeat.await.expect("it returned Ok(())");
    /// assert!(tasks.is_empty(), "a finished task leaves at once");
    /// assert_eq!(tasks.stats().completed, 1);
    /// # });
    /// ```
    pub fn spawn<F>(&self, name: impl Into<TaskName>, kind: TaskKind, fut: F) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        // Inside a task, `tokio::spawn` finds the runtime without cloning a
        // handle; anywhere else (`block_on`'s own future, a thread that
        // entered a runtime, no runtime at all) look one up.
        if tokio::task::try_id().is_some() {
            self.spawn_with(CurrentRuntime, name.into(), kind, fut)
        } else {
            match Handle::try_current() {
                Ok(rt) => self.spawn_with(&rt, name.into(), kind, fut),
                Err(_) => Err(ServiceError::NoRuntime("TaskRegistry::spawn")),
            }
        }
    }

    /// Spawn a tracked tokio task on the runtime behind `rt`.
    ///
    /// As [`spawn`](Self::spawn); [`ServiceError::RuntimeShutDown`] when
    /// that runtime has shut down.
    pub fn spawn_on<F>(
        &self,
        rt: &Handle,
        name: impl Into<TaskName>,
        kind: TaskKind,
        fut: F,
    ) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.spawn_with(rt, name.into(), kind, fut)
    }

    /// Spawn a *critical* tracked task on the current runtime: the Rust
    /// form of Python's `spawn(..., critical=True)`, with the same rules.
    ///
    /// If the task fails (returns `Err`) or panics, at any time, the token
    /// is cancelled with `ShutdownReason::Fatal("critical task 'NAME'
    /// failed: ERROR")` (`... panicked: MESSAGE`); if it returns `Ok(())`
    /// while the token has not fired, with `Fatal("critical task 'NAME'
    /// returned while the service was running")`. Its end is otherwise
    /// logged, counted and reported by its handle like any task's. An abort
    /// (by its handle or at the deadline) is not a failure. First reason
    /// wins: once the token has fired (a shutdown is under way), a critical
    /// failure no longer changes the reason, and shows in
    /// [`TaskStats::failed`] and the log only.
    ///
    /// Errors as for [`spawn`](Self::spawn).
    pub fn spawn_critical<F>(
        &self,
        name: impl Into<TaskName>,
        kind: TaskKind,
        fut: F,
    ) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        let fut = self.critical(name.clone(), fut);
        self.spawn(name, kind, fut)
    }

    /// [`spawn_critical`](Self::spawn_critical) on the runtime behind `rt`.
    pub fn spawn_critical_on<F>(
        &self,
        rt: &Handle,
        name: impl Into<TaskName>,
        kind: TaskKind,
        fut: F,
    ) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        let fut = self.critical(name.clone(), fut);
        self.spawn_with(rt, name, kind, fut)
    }

    fn critical<F>(&self, name: TaskName, fut: F) -> Critical<F> {
        Critical::new(fut, self.inner.shutdown.clone(), name)
    }

    fn spawn_with<F>(
        &self,
        rt: impl Spawner,
        name: TaskName,
        kind: TaskKind,
        fut: F,
    ) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let join = self.start(rt, name.clone(), kind, |_| fut)?;
        Ok(TaskHandle { name, kind, join })
    }

    /// [`start`](Self::start) on the current runtime, found as `spawn`
    /// finds it; `who` names the caller in the error outside a runtime.
    fn start_here<F>(
        &self,
        who: &'static str,
        name: TaskName,
        kind: TaskKind,
        make: impl FnOnce(Key) -> F,
    ) -> Result<JoinHandle<Exit>>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        if tokio::task::try_id().is_some() {
            self.start(CurrentRuntime, name, kind, make)
        } else {
            match Handle::try_current() {
                Ok(rt) => self.start(&rt, name, kind, make),
                Err(_) => Err(ServiceError::NoRuntime(who)),
            }
        }
    }

    /// Store a native task's entry, then hand the future `make` builds for
    /// its key to tokio. `make` is not called if the entry is refused.
    #[inline]
    fn start<F>(
        &self,
        rt: impl Spawner,
        name: TaskName,
        kind: TaskKind,
        make: impl FnOnce(Key) -> F,
    ) -> Result<JoinHandle<Exit>>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let entry = Entry {
            name,
            kind,
            restarts: 0,
            spawned_at: Stamp::now(),
            control: Control::Native(None),
        };
        let k = self.insert_entry(entry)?;
        let fut = make(k);
        // No registry lock may be held here: on a runtime that has shut
        // down, tokio drops the task inline, and its drop takes the lock.
        let join = {
            let _spawning = Spawning::enter(&self.inner);
            rt.spawn(Watched::new(fut, self.inner.clone(), slab::index_of(k)))
        };
        // Finished already: it ran on another worker, or the runtime has
        // shut down and dropped it unpolled, right here (then its drop said
        // so). Refuse the latter: it never ran and never will.
        if join.is_finished() && REFUSED.with(|r| r.replace(false)) {
            drop(join);
            self.inner.uncount_refused(kind);
            return Err(ServiceError::RuntimeShutDown);
        }
        Ok(join)
    }

    /// Track a task that runs outside tokio. Its owner must call
    /// [`finish_foreign`](Self::finish_foreign) exactly once when it ends.
    pub fn track_foreign(
        &self,
        name: impl Into<TaskName>,
        kind: TaskKind,
        task: Arc<dyn ForeignTask>,
    ) -> Result<ForeignTaskId> {
        let entry = Entry {
            name: name.into(),
            kind,
            restarts: 0,
            spawned_at: Stamp::now(),
            control: Control::Foreign(task),
        };
        self.insert_entry(entry).map(ForeignTaskId)
    }

    /// Store a new task's entry and count it live, unless closed.
    fn insert_entry(&self, entry: Entry) -> Result<Key> {
        let mut reaped = Vec::new();
        let k = {
            let mut st = self.inner.state.lock();
            if st.closed {
                return Err(ServiceError::AlreadyStopped);
            }
            // Reap rather than grow only when that frees a batch (see
            // `REAP_AT`).
            let waiting = || {
                // Relaxed: an estimate (see `reap`); a stale count only
                // moves the reap to a later spawn.
                self.inner.counts.load(Ordering::Relaxed) / WAITING_ONE
            };
            if st.entries.is_full() && waiting() >= REAP_AT as u64 {
                reaped = self.inner.reap(&mut st);
            }
            let k = st.insert(entry);
            // The slot's bit exists before the task can end: the task is
            // handed to tokio after this section.
            let slot = slab::index_of(k);
            if u64::from(slot) >= st.covered {
                st.covered = self.inner.ended.cover(slot);
            }
            // Under the state lock, so that `close_or_wait` (which reads the
            // count under it) cannot close a registry while a spawn is half
            // done. The modification order of `counts` alone keeps the count
            // exact against concurrent steps: a step cannot take the last
            // task off while this task is counted. The increment publishes
            // nothing (readers of an entry take the lock); AcqRel pairs it
            // with the steps, at the cost of Relaxed on x86 (one `lock xadd`
            // either way).
            self.inner.counts.fetch_add(1, Ordering::AcqRel);
            k
        };
        drop(reaped);
        Ok(k)
    }

    /// Record the end of a foreign task. Returns `false` if `id` is not
    /// live (already finished).
    pub fn finish_foreign(&self, id: ForeignTaskId, outcome: TaskOutcome) -> bool {
        self.inner.finish_foreign(id.0, outcome).is_some()
    }

    /// Wait for every tracked task, including those spawned meanwhile, for
    /// at most `deadline`; then abort or cancel the stragglers.
    ///
    /// Either way the registry is closed afterwards. Dropping the future
    /// before it finishes leaves the registry open and nothing behind.
    ///
    /// # Errors
    /// [`ServiceError::ShutdownDeadlineExceeded`] naming the stragglers;
    /// [`ServiceError::NoRuntime`] when it has to wait while polled outside
    /// a tokio runtime (the registry is then left open).
    ///
    /// # Panics
    /// When it has to wait, with a deadline, on a tokio runtime built
    /// without the time driver (`Builder::enable_time`), as
    /// `tokio::time::sleep` does: tokio offers no way to tell beforehand.
    /// With no live task, or with `Duration::MAX`, it needs no timer.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use dig_service::{ServiceError, ShutdownReason, ShutdownToken, TaskKind, TaskRegistry};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let token = ShutdownToken::new();
    /// let tasks = TaskRegistry::new(token.clone());
    /// let polite = token.clone();
    /// tasks.spawn("polite", TaskKind::PeerConnection, async move {
    ///     polite.cancelled().await;
    ///     Ok(())
    /// })?;
    /// tasks.spawn("stuck", TaskKind::Maintenance, async {
    ///     std::future::pending::<()>().await; // never looks at the token
    ///     Ok(())
    /// })?;
    ///
    /// token.cancel(ShutdownReason::UserRequested);
    /// match tasks.join_all(Duration::from_millis(50)).await {
    ///     Err(ServiceError::ShutdownDeadlineExceeded { pending_names, .. }) => {
    ///         assert_eq!(pending_names, ["stuck"]); // aborted at the deadline
    ///     }
    ///     other => panic!("expected the deadline to pass, got {other:?}"),
    /// }
    /// assert!(tasks.is_closed(), "closed either way: no more spawns");
    /// assert!(tasks.spawn("late", TaskKind::Maintenance, async { Ok(()) }).is_err());
    /// # Ok::<(), ServiceError>(())
    /// # }).unwrap();
    /// ```
    pub async fn join_all(&self, deadline: Duration) -> Result<()> {
        match self.join_reporting(deadline, 0).await? {
            None => Ok(()),
            Some(stragglers) => Err(ServiceError::ShutdownDeadlineExceeded {
                deadline,
                pending: stragglers.names.len(),
                pending_names: stragglers.names,
                report: None,
            }),
        }
    }

    /// [`join_all`](Self::join_all), handing back what a shutdown report
    /// tells of the stragglers ([`Stragglers::tasks`], with the stacks of
    /// the first `max_stacks` foreign ones) instead of an error naming
    /// them: `Ok(None)` when every task ended in time.
    ///
    /// # Errors
    /// [`ServiceError::NoRuntime`], as `join_all`.
    pub async fn join_reporting(
        &self,
        deadline: Duration,
        max_stacks: usize,
    ) -> Result<Option<Stragglers>> {
        // A deadline too large to add to `now` (say `Duration::MAX`) means
        // "no deadline", not a panic.
        let until = tokio::time::Instant::now().checked_add(deadline);
        let mut in_runtime = false;
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let Some(key) = self.inner.close_or_wait(Box::new(move || {
                let _ = tx.send(());
            })) else {
                return Ok(None);
            };
            // Removes the wake-up if this future is dropped while waiting.
            let _wait = IdleWait {
                inner: &self.inner,
                key,
            };
            if !in_runtime {
                if Handle::try_current().is_err() {
                    return Err(ServiceError::NoRuntime("TaskRegistry::join_all"));
                }
                in_runtime = true;
            }
            let timed_out = match until {
                Some(until) => tokio::time::timeout_at(until, rx).await.is_err(),
                None => {
                    let _ = rx.await;
                    false
                }
            };
            if timed_out {
                let stragglers = self.close_and_stop_all_with_stacks(max_stacks);
                if stragglers.names.is_empty() {
                    return Ok(None);
                }
                tracing::warn!(
                    target: "dig_service::tasks",
                    pending = stragglers.names.len(),
                    names = %crate::error::names_preview(&stragglers.names),
                    "shutdown deadline exceeded; stopping stragglers"
                );
                return Ok(Some(stragglers));
            }
        }
    }

    /// Close the registry if no task is live and return `true`; otherwise
    /// arrange for `wake` to run once the live count next drops to zero
    /// and return `false`.
    ///
    /// This is the building block of `join_all`; foreign event loops use
    /// it to wait without a tokio round trip. The wake-up stays registered
    /// until the registry empties.
    pub fn try_close<F>(&self, wake: F) -> bool
    where
        F: FnOnce() + Send + 'static,
    {
        self.inner.close_or_wait(Box::new(wake)).is_none()
    }

    /// After shutdown, count the ends of the foreign tasks that have
    /// already ended quietly ([`ForeignTask::quiet_end`]: returned or
    /// cancelled) but whose owners have not yet called
    /// [`finish_foreign`](Self::finish_foreign), so that a join made now
    /// finds them gone instead of waiting for their owners (an asyncio
    /// task's done callback runs a loop turn after its end). Their owners'
    /// later `finish_foreign` calls then change nothing. Returns how many it
    /// counted.
    ///
    /// Does nothing until the shutdown token has fired (before that, a
    /// quietly ended task may still have something to say: a critical task
    /// that returns fires the token). Stops at the first foreign task that
    /// has not ended quietly: a join waits for that one anyway, so the
    /// scan costs the ended tasks and one batch more, however many run.
    /// The tasks are asked with no lock held.
    pub fn finish_quiet_ends(&self) -> usize {
        /// Tasks gathered under the lock at a time.
        const BATCH: usize = 32;
        if self.inner.live() == 0 || !self.inner.shutdown.is_cancelled() {
            return 0;
        }
        let mut counted = 0;
        let mut from = 0;
        let mut batch: Vec<(Key, Arc<dyn ForeignTask>)> = Vec::with_capacity(BATCH);
        loop {
            {
                let st = self.inner.state.lock();
                let foreign =
                    st.entries
                        .iter_keyed_from(from)
                        .filter_map(|(k, e)| match &e.control {
                            Control::Foreign(task) => Some((k, task.clone())),
                            Control::Native(_) | Control::Straggler => None,
                        });
                batch.extend(foreign.take(BATCH));
            }
            let Some(&(last, _)) = batch.last() else {
                return counted;
            };
            from = slab::index_of(last) + 1;
            for (k, task) in batch.drain(..) {
                let Some(outcome) = task.quiet_end() else {
                    return counted;
                };
                // The entry (and this `task`) dropped here, with no lock held.
                counted += usize::from(self.inner.finish_foreign(k, outcome).is_some());
            }
        }
    }

    /// Close the registry, abort every native task and cancel every foreign
    /// one; return the names of those that were live.
    pub fn close_and_stop_all(&self) -> Stragglers {
        self.close_and_stop_all_with_stacks(0)
    }

    /// [`close_and_stop_all`](Self::close_and_stop_all), and also ask the
    /// first `max_stacks` foreign stragglers (in spawn order) where they
    /// are waiting ([`ForeignTask::stack`]) just before cancelling them,
    /// for a shutdown report. Each answer may run foreign code (a Python
    /// task's stack is formatted under the GIL): keep `max_stacks` small.
    pub fn close_and_stop_all_with_stacks(&self, max_stacks: usize) -> Stragglers {
        let epoch = Epoch::now();
        let mut live = Vec::new();
        let mut natives = Vec::new();
        let mut foreign = Vec::new();
        let reaped = {
            let mut st = self.inner.state.lock();
            st.closed = true;
            // Under the lock, so that a task parking its waker after this
            // section sees the flag and wakes itself; and before the reap,
            // so that a task ending from now on is either reaped here (and
            // not named) or reaps at once (see `finish_native`).
            // SeqCst for `finish_native`, which sets its task's bit and then
            // reads the flag, while this section stores the flag and then
            // reads the bits (the reap below): see there. Every other reader
            // is ordered after this store by a lock or a wake-up:
            // `park_native` reads it under this state lock, `Watched::poll`
            // after the wake-up sent below (tokio orders a wake before the
            // poll it causes).
            self.inner.stopping.store(true, Ordering::SeqCst);
            let reaped = self.inner.reap(&mut st);
            for e in st.entries.iter_mut() {
                match &mut e.control {
                    // Marked, so that it counts as aborted however it ends.
                    c @ (Control::Native(_) | Control::Straggler) => {
                        if let Control::Native(waker) = std::mem::replace(c, Control::Straggler) {
                            natives.extend(waker);
                        }
                    }
                    Control::Foreign(f) => {
                        foreign.push((e.spawned_at, e.name.clone(), e.kind, f.clone()));
                        continue;
                    }
                }
                live.push((
                    e.spawned_at,
                    e.name.clone(),
                    e.kind,
                    TaskOrigin::Native,
                    None,
                ));
            }
            reaped
        };
        drop(reaped);
        // A native task stops at its next poll; one that never waited needs
        // no wake-up, its first poll is still to come.
        for w in natives {
            w.wake();
        }
        // A foreign task that ended before the deadline but whose completion
        // is still queued on its loop is not a straggler. Asked outside the
        // lock: the owner's check may need its own lock (the GIL). In spawn
        // order, so that the stacks asked for are the oldest tasks'.
        foreign.sort_unstable_by_key(|(at, ..)| *at);
        let mut stacks_left = max_stacks;
        for (at, name, kind, f) in foreign {
            let want_stack = stacks_left > 0;
            if let Some(stack) = f.stop(want_stack) {
                stacks_left -= usize::from(want_stack);
                live.push((at, name, kind, TaskOrigin::Python, stack));
            }
        }
        // Slots are reused, so slot order is not spawn order; the stamps,
        // unique and in spawn order, restore it.
        live.sort_unstable_by_key(|(at, ..)| *at);
        let names = live.iter().map(|(_, name, ..)| name.to_string()).collect();
        let tasks = live
            .into_iter()
            .map(|(at, name, kind, origin, stack)| Straggler {
                name,
                kind,
                origin,
                spawned_at: epoch.instant_of(at),
                stack,
            })
            .collect();
        Stragglers { names, tasks }
    }

    /// Whether `join_all` has closed the registry.
    pub fn is_closed(&self) -> bool {
        self.inner.state.lock().closed
    }

    /// The live tasks.
    pub fn snapshot(&self) -> Vec<TaskSummary> {
        let epoch = Epoch::now();
        let mut st = self.inner.state.lock();
        let reaped = self.inner.reap(&mut st);
        let mut out = Vec::with_capacity(self.len());
        out.extend(st.entries.iter().map(|e| TaskSummary {
            name: e.name.clone(),
            spawned_at: epoch.instant_of(e.spawned_at),
            kind: e.kind,
            origin: e.origin(),
            restarts: e.restarts,
        }));
        drop(st);
        drop(reaped);
        out
    }

    /// How many tasks are live.
    pub fn len(&self) -> usize {
        self.inner.live() as usize
    }

    /// Whether no task is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters since the registry was created.
    ///
    /// A supervised task counts once in `spawned` and once by how it
    /// stopped for good; each of its restarts counts in `restarted`. So
    /// `spawned == completed + failed + cancelled + aborted + live`.
    pub fn stats(&self) -> TaskStats {
        let st = self.inner.state.lock();
        let ended = st.ended;
        let spawned: u64 = st.spawned.iter().sum();
        let failed: u64 = ended.failed.iter().sum();
        // Under the state lock, which every count but a completion's is
        // made under, before its task leaves the live count (see `reap`).
        let live = self.inner.live();
        TaskStats {
            spawned,
            // What is left: completions are not counted (see `reap`).
            // Saturating: a straggler that returned is counted aborted by
            // its reap a moment before it leaves the live count.
            completed: spawned.saturating_sub(live + failed + ended.cancelled + ended.aborted),
            failed,
            cancelled: ended.cancelled,
            aborted: ended.aborted,
            restarted: st.restarted.iter().sum(),
            live,
        }
    }

    /// The counters of [`stats`](Self::stats) that metrics label by kind
    /// and origin: one [`KindStats`] for each [`TaskKind`] and
    /// [`TaskOrigin`], always all of them, in a fixed order (kinds in
    /// declaration order, native before Python).
    ///
    /// The counts are the core's own, kept on the paths a task takes
    /// anyway; `live` is counted over the live entries (a snapshot's cost,
    /// without building one).
    pub fn stats_by_kind(&self) -> Vec<KindStats> {
        let mut live = [0u64; BUCKETS];
        let (spawned, restarted, ended) = {
            let mut st = self.inner.state.lock();
            let reaped = self.inner.reap(&mut st);
            for e in st.entries.iter() {
                live[e.bucket()] += 1;
            }
            let counts = (st.spawned, st.restarted, st.ended);
            drop(st);
            drop(reaped);
            counts
        };
        types::ALL_BUCKETS
            .iter()
            .map(|&(kind, origin)| {
                let b = bucket(kind, origin);
                KindStats {
                    kind,
                    origin,
                    spawned: spawned[b],
                    failed: ended.failed[b],
                    restarted: restarted[b],
                    live: live[b],
                }
            })
            .collect()
    }

    /// Whether `self` and `other` are clones of one registry.
    pub fn same_as(&self, other: &TaskRegistry) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRegistry")
            .field("live", &self.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;

    use super::reap::{REAP_AT, REAP_AT_THREAD};
    use super::{TaskKind, TaskRegistry};
    use crate::ShutdownToken;

    fn slab_occupied_and_capacity(r: &TaskRegistry) -> (usize, usize) {
        let st = r.inner.state.lock();
        (st.entries.iter().count(), st.entries.capacity())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ended_native_tasks_are_reaped_and_memory_stays_bounded() {
        // Proves the deferred removal of ended native tasks keeps the slab
        // bounded by the live tasks plus one reap batch, not by the tasks
        // ever spawned, and that once the last task has ended nothing
        // is left in it. Catches ended slots never reaped (a leak that the
        // exact live count would hide).
        let r = TaskRegistry::new(ShutdownToken::new());
        for _ in 0..100 {
            let wave: Vec<_> = (0..1_000)
                .map(|_| {
                    r.spawn("wave", TaskKind::RpcHandler, async {
                        tokio::task::yield_now().await;
                        Ok(())
                    })
                    .unwrap()
                })
                .collect();
            for h in wave {
                h.await.unwrap();
            }
        }
        assert_eq!(r.len(), 0);
        assert_eq!(r.stats().completed, 100_000);
        let (occupied, capacity) = slab_occupied_and_capacity(&r);
        assert_eq!(occupied, 0, "the task that emptied the registry reaps");
        // A spawner grows the slab only while fewer than `REAP_AT` ended
        // tasks wait, so the ending threads' larger backlog never adds slots.
        let bound = 1_000 + REAP_AT + 2 * 128;
        assert!(capacity <= bound, "{capacity} slots for 1k live tasks");
    }

    /// The `join_all` wake-ups waiting in `r`.
    fn idle_waiters(r: &TaskRegistry) -> usize {
        r.inner.state.lock().idle_wakers.len()
    }

    async fn abandoned_joins_leave_no_wake_up() {
        // Proves a `join_all` future dropped while it waits (a `timeout`, a
        // `select!`) removes its wake-up, so abandoned joins cost nothing
        // while a task stays live, and that a join left to finish still
        // wakes. Catches wake-ups kept until the registry empties (1M
        // abandoned joins held 125 MB).
        let r = TaskRegistry::new(ShutdownToken::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        r.spawn("live", TaskKind::BackgroundLoop, async move {
            let _ = rx.await;
            Ok(())
        })
        .unwrap();
        for _ in 0..10_000 {
            // Polled once, then given up on (as by a `select!`).
            let mut join = std::pin::pin!(r.join_all(Duration::from_secs(3600)));
            let polled = std::future::poll_fn(|cx| Poll::Ready(join.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "the task is still live");
        }
        assert_eq!(idle_waiters(&r), 0, "abandoned joins left their wake-ups");
        assert!(!r.is_closed());
        let join = tokio::spawn({
            let r = r.clone();
            async move { r.join_all(Duration::from_secs(3600)).await }
        });
        while idle_waiters(&r) == 0 {
            tokio::task::yield_now().await;
        }
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), join)
            .await
            .expect("the join woke")
            .unwrap()
            .unwrap();
        assert_eq!(idle_waiters(&r), 0);
        assert!(r.is_closed());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn abandoned_joins_leave_no_wake_up_current_thread() {
        abandoned_joins_leave_no_wake_up().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_joins_leave_no_wake_up_multi_thread() {
        abandoned_joins_leave_no_wake_up().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ending_threads_reap_while_nothing_spawns() {
        // Proves that the entries of ended tasks, with the wakers they
        // hold (which keep the tasks' memory allocated), are freed while
        // nothing spawns and the registry never empties. Catches reaping
        // left to spawns and to the last task alone.
        let r = TaskRegistry::new(ShutdownToken::new());
        let (keep_tx, keep_rx) = tokio::sync::oneshot::channel::<()>();
        let keeper = r
            .spawn("keeper", TaskKind::BackgroundLoop, async move {
                let _ = keep_rx.await;
                Ok(())
            })
            .unwrap();
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let n = 4 * REAP_AT_THREAD;
        let parked: Vec<_> = (0..n)
            .map(|_| {
                let mut go = go_rx.clone();
                r.spawn("parked", TaskKind::RpcHandler, async move {
                    let _ = go.wait_for(|&go| go).await;
                    Ok(())
                })
                .unwrap()
            })
            .collect();
        go_tx.send(true).unwrap();
        for h in parked {
            h.await.unwrap();
        }
        assert_eq!(r.len(), 1, "only the keeper is live");
        let (occupied, _) = slab_occupied_and_capacity(&r);
        let bound = 1 + REAP_AT_THREAD;
        assert!(occupied <= bound, "{occupied} entries kept for 1 live task");
        keep_tx.send(()).unwrap();
        keeper.await.unwrap();
        assert_eq!(slab_occupied_and_capacity(&r).0, 0);
    }
}
