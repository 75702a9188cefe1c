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
//!   in a batch a little later (see `Ended`): when a spawn needs its slot,
//!   or once several thousand have ended on one thread, and at once when
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
//! stops them through the [`ForeignTask`] they were registered with.

mod name;
pub(crate) mod slab;
mod stamp;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Result, ServiceError};
use crate::shutdown::{ShutdownReason, ShutdownToken};
pub use name::TaskName;
use slab::{Key, Slab};
use stamp::{Epoch, Stamp};

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
    /// Tasks live now.
    pub live: u64,
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
}

/// Identifies a foreign task in its registry; see
/// [`TaskRegistry::finish_foreign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForeignTaskId(Key);

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
    name: TaskName,
    kind: TaskKind,
    join: JoinHandle<Exit>,
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
}

type IdleWaker = Box<dyn FnOnce() + Send + 'static>;

/// Counts of ended tasks by outcome.
#[derive(Debug, Clone, Copy, Default)]
struct Outcomes {
    completed: u64,
    failed: u64,
    cancelled: u64,
    aborted: u64,
}

impl Outcomes {
    fn count(&mut self, outcome: TaskOutcome) {
        match outcome {
            TaskOutcome::Completed => self.completed += 1,
            TaskOutcome::Failed => self.failed += 1,
            TaskOutcome::Cancelled => self.cancelled += 1,
            TaskOutcome::Aborted => self.aborted += 1,
        }
    }

    fn add(&mut self, other: &Outcomes) {
        self.completed += other.completed;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.aborted += other.aborted;
    }
}

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
    spawned: u64,
    /// Outcomes of the tasks whose entries have left `entries`.
    ended: Outcomes,
    /// An empty buffer of slots with capacity: [`Inner::reap`] swaps it
    /// with each thread's full one, so that a thread's buffer keeps its
    /// capacity instead of growing again from empty after every reap.
    reaping: Vec<u32>,
}

impl State {
    fn new() -> Self {
        Self {
            entries: Slab::default(),
            last_stamp: Stamp::now(),
            closed: false,
            idle_wakers: Slab::default(),
            spawned: 0,
            ended: Outcomes::default(),
            reaping: Vec::new(),
        }
    }

    /// Store `entry`. Its `spawned_at`, read on a clock that ticks every
    /// few milliseconds, is moved past the previous entry's, so that stamps
    /// order entries exactly as they were spawned.
    #[inline]
    fn insert(&mut self, mut entry: Entry) -> Key {
        entry.spawned_at = entry.spawned_at.max(self.last_stamp.successor());
        self.last_stamp = entry.spawned_at;
        self.spawned += 1;
        self.entries
            .insert(entry)
            .expect("more than 2^32 - 1 live tasks")
    }
}

/// Native tasks that ended but whose entries are still in the slab.
///
/// A native task usually ends on another worker thread than the one that
/// spawned it. Removing its entry from the slab at once would move the
/// state lock (and the slot) between the two threads on every task; the
/// ending task instead notes its slot here, in its thread's buffer (one per
/// CPU, handed out to threads in turn), and the slots are removed in
/// batches ([`Inner::reap`]): by a thread whose buffer has filled up, by a
/// spawner that would otherwise grow the slab, by every reader of the slab
/// (so no reader sees an ended task), and by the task that empties the
/// registry. The live count is exact all along.
#[derive(Default)]
struct Ended {
    slots: Vec<u32>,
    outcomes: Outcomes,
}

/// A spawner that finds no free slot reaps instead of growing the slab if
/// at least this many ended tasks wait: every reap is then a batch (taking
/// the other threads' buffers every few spawns costs more than the slots
/// it frees), and the slab stays within this many slots of the peak live
/// count.
const REAP_AT: usize = 1024;

/// A thread whose buffer holds this many ended tasks reaps, if the state
/// lock is free: bounds the memory ended tasks keep when nothing spawns.
/// Higher than [`REAP_AT`] so that while tasks are being spawned the
/// spawner reaps, touching the slots it wrote itself; a reap by an ending
/// thread holds the lock while it pulls every slot over from the
/// spawner's cache, and the spawner waits.
const REAP_AT_THREAD: usize = 8 * REAP_AT;

/// A cache line (and its neighbour, which x86 prefetches in pairs) of its
/// own, so that threads noting ended tasks do not contend on one line.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// The registry's shared state. `repr(C)` fixes the order: the fields every
/// task touches from whichever thread it runs on (the live count, the stop
/// flag) sit right after the `Arc`'s reference counts, which every task
/// changes anyway, and the state lock, which the spawning thread takes on
/// every spawn, starts a cache line of its own, so that ending tasks on
/// other threads do not pull it away.
#[repr(C)]
struct Inner {
    /// Tasks spawned and not yet ended. Incremented under the state lock
    /// (so `try_close` under the lock sees every spawn), decremented
    /// without it when a task ends.
    live: AtomicU64,
    /// Set (under the state lock, before its reap) by `close_and_stop_all`:
    /// every native task still running stops at its next poll, and a task
    /// that ends from then on leaves through `finish_stopping`.
    stopping: AtomicBool,
    shutdown: ShutdownToken,
    /// Per-thread buffers of ended native tasks (`ended_shard`).
    ended: Box<[Padded<Mutex<Ended>>]>,
    /// Keeps `state` off the cache line of the fields above.
    _line: [u8; 64],
    state: Mutex<State>,
}

/// Index of the calling thread's [`Ended`] buffer among `n` (a power of two).
fn ended_shard(n: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i) & (n - 1)
}

/// How many [`Ended`] buffers a registry has: one per CPU, rounded up to a
/// power of two (read once per process: it may read cgroup files).
fn ended_shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .clamp(2, 64)
            .next_power_of_two()
    })
}

impl Inner {
    fn new(shutdown: ShutdownToken) -> Self {
        Self {
            shutdown,
            state: Mutex::new(State::new()),
            live: AtomicU64::new(0),
            ended: (0..ended_shards()).map(|_| Padded::default()).collect(),
            stopping: AtomicBool::new(false),
            _line: [0; 64],
        }
    }

    /// Remove the entries of every ended native task from the slab. Their
    /// stored wakers are handed back, to be dropped outside the lock.
    fn reap(&self, st: &mut State) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let State {
            entries,
            ended,
            reaping,
            ..
        } = st;
        for shard in self.ended.iter() {
            {
                let mut full = shard.0.lock();
                if full.slots.is_empty() {
                    continue;
                }
                std::mem::swap(&mut full.slots, reaping);
                ended.add(&std::mem::take(&mut full.outcomes));
            }
            for slot in reaping.drain(..) {
                if let Some(Entry {
                    control: Control::Native(Some(w)),
                    ..
                }) = entries.remove_at(slot)
                {
                    wakers.push(w);
                }
            }
        }
        wakers
    }

    /// One task fewer: if that was the last, wake the joiners (under the
    /// lock the live count is exact: spawns increment it under the lock).
    #[inline]
    fn one_fewer(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.now_idle();
        }
    }

    /// The live count has just dropped to zero: reap, and wake the joiners
    /// if no spawn came in meanwhile.
    #[cold]
    fn now_idle(&self) {
        let (wakers, idle) = {
            let mut st = self.state.lock();
            let wakers = self.reap(&mut st);
            let idle = if self.live.load(Ordering::Acquire) == 0 {
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
        let entry = {
            let mut st = self.state.lock();
            let entry = st.entries.remove(k)?;
            st.ended.count(outcome);
            entry
        };
        self.one_fewer();
        Some(entry)
    }

    /// Record the end of the native task in `slot` (see [`Ended`]); hand
    /// back its name if the task failed, for the log.
    fn finish_native(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        let name = if outcome == TaskOutcome::Failed {
            let mut st = self.state.lock();
            st.entries.get_mut_at(slot).map(|e| e.name.clone())
        } else {
            None
        };
        let backlog = {
            let mut ended = self.ended[ended_shard(self.ended.len())].0.lock();
            // Ordering: `close_and_stop_all` sets `stopping` (under the state
            // lock) before its reap, which takes this lock. Read false here,
            // this section comes before that reap takes this buffer: the slot
            // noted now is reaped before the stragglers are named, so this
            // task is not one. Read true, the task goes to `finish_stopping`,
            // which waits for the state lock, so for the naming to be over.
            if self.stopping.load(Ordering::Relaxed) {
                None
            } else {
                ended.slots.push(slot);
                ended.outcomes.count(outcome);
                Some(ended.slots.len())
            }
        };
        let Some(backlog) = backlog else {
            return self.finish_stopping(slot, outcome);
        };
        if backlog >= REAP_AT_THREAD {
            if let Some(mut st) = self.state.try_lock() {
                let wakers = self.reap(&mut st);
                drop(st);
                drop(wakers);
            }
        }
        self.one_fewer();
        name
    }

    /// The end of a native task once the registry is stopping: its entry
    /// leaves at once, and a task named as a straggler counts as aborted
    /// whatever `outcome` it ended with, so that the stats agree with the
    /// deadline's report. Hands back its name if it failed, for the log.
    #[cold]
    fn finish_stopping(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        let entry = {
            let mut st = self.state.lock();
            let entry = st.entries.remove_at(slot);
            let counted = match entry {
                Some(Entry {
                    control: Control::Straggler,
                    ..
                }) => TaskOutcome::Aborted,
                _ => outcome,
            };
            st.ended.count(counted);
            entry
        };
        let name = match (&entry, outcome) {
            (Some(e), TaskOutcome::Failed) => Some(e.name.clone()),
            _ => None,
        };
        // Its waker, if any, is dropped outside the lock.
        drop(entry);
        self.one_fewer();
        name
    }

    /// Take back the counts of a task that a shut-down runtime dropped
    /// inside `spawn` (see `TaskRegistry::spawn_with`): `spawn` refuses it,
    /// so it was never accepted, but `insert_entry` counted it spawned and
    /// its drop, on this thread, counted it aborted.
    #[cold]
    fn uncount_refused(&self) {
        let mut st = self.state.lock();
        st.spawned -= 1;
        // The drop noted the abort in this thread's buffer; a reap since
        // (the task that empties the registry reaps) moved it to `ended`.
        // Both move only under the state lock, held here.
        let mut mine = self.ended[ended_shard(self.ended.len())].0.lock();
        if mine.outcomes.aborted > 0 {
            mine.outcomes.aborted -= 1;
        } else {
            st.ended.aborted -= 1;
        }
    }

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
            self.stopping.load(Ordering::Relaxed)
        };
        if stop {
            waker.wake_by_ref();
        }
    }

    /// Close the registry and return `None` if no task is live; otherwise
    /// store `wake`, to run once the live count next drops to zero, and
    /// return its key (for [`IdleWait`]).
    fn close_or_wait(&self, wake: IdleWaker) -> Option<Key> {
        let mut st = self.state.lock();
        if self.live.load(Ordering::Acquire) == 0 {
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
        Critical {
            fut,
            token: self.inner.shutdown.clone(),
            name,
        }
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
        let entry = Entry {
            name: name.clone(),
            kind,
            spawned_at: Stamp::now(),
            control: Control::Native(None),
        };
        let k = self.insert_entry(entry)?;
        // No registry lock may be held here: on a runtime that has shut
        // down, tokio drops the task inline, and its drop takes the lock.
        let join = {
            let _spawning = Spawning::enter(&self.inner);
            rt.spawn(Watched {
                fut: Some(fut),
                inner: self.inner.clone(),
                slot: slab::index_of(k),
                parked: false,
            })
        };
        // Finished already: it ran on another worker, or the runtime has
        // shut down and dropped it unpolled, right here (then its drop said
        // so). Refuse the latter: it never ran and never will.
        if join.is_finished() && REFUSED.with(|r| r.replace(false)) {
            drop(join);
            self.inner.uncount_refused();
            return Err(ServiceError::RuntimeShutDown);
        }
        Ok(TaskHandle { name, kind, join })
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
            // `REAP_AT`). Occupied slots minus live tasks is the number of
            // ended tasks waiting, give or take a foreign task ending now.
            let waiting = || {
                let live = self.inner.live.load(Ordering::Relaxed) as usize;
                st.entries.len().saturating_sub(live)
            };
            if st.entries.is_full() && waiting() >= REAP_AT {
                reaped = self.inner.reap(&mut st);
            }
            let k = st.insert(entry);
            self.inner.live.fetch_add(1, Ordering::AcqRel);
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
    pub async fn join_all(&self, deadline: Duration) -> Result<()> {
        // A deadline too large to add to `now` (say `Duration::MAX`) means
        // "no deadline", not a panic.
        let until = tokio::time::Instant::now().checked_add(deadline);
        let mut in_runtime = false;
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let Some(key) = self.inner.close_or_wait(Box::new(move || {
                let _ = tx.send(());
            })) else {
                return Ok(());
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
                let stragglers = self.close_and_stop_all();
                if stragglers.names.is_empty() {
                    return Ok(());
                }
                tracing::warn!(
                    target: "dig_service::tasks",
                    pending = stragglers.names.len(),
                    names = %crate::error::names_preview(&stragglers.names),
                    "shutdown deadline exceeded; stopping stragglers"
                );
                return Err(ServiceError::ShutdownDeadlineExceeded {
                    deadline,
                    pending: stragglers.names.len(),
                    pending_names: stragglers.names,
                });
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

    /// Close the registry, abort every native task and cancel every foreign
    /// one; return the names of those that were live.
    pub fn close_and_stop_all(&self) -> Stragglers {
        let mut live = Vec::new();
        let mut natives = Vec::new();
        let mut foreign = Vec::new();
        let reaped = {
            let mut st = self.inner.state.lock();
            st.closed = true;
            // Under the lock, so that a task parking its waker after this
            // section sees the flag and wakes itself; and before the reap,
            // so that a task ending from now on is either reaped here (and
            // not named) or leaves by `finish_stopping` (see `finish_native`).
            self.inner.stopping.store(true, Ordering::Relaxed);
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
                        foreign.push((e.spawned_at, e.name.to_string(), f.clone()));
                        continue;
                    }
                }
                live.push((e.spawned_at, e.name.to_string()));
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
        // lock: the owner's check may need its own lock (the GIL).
        for (at, name, f) in foreign {
            if !f.is_finished() {
                f.cancel();
                live.push((at, name));
            }
        }
        // Slots are reused, so slot order is not spawn order; the stamps,
        // unique and in spawn order, restore it.
        live.sort_unstable_by_key(|(at, _)| *at);
        Stragglers {
            names: live.into_iter().map(|(_, name)| name).collect(),
        }
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
        }));
        drop(st);
        drop(reaped);
        out
    }

    /// How many tasks are live.
    pub fn len(&self) -> usize {
        self.inner.live.load(Ordering::Acquire) as usize
    }

    /// Whether no task is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters since the registry was created.
    pub fn stats(&self) -> TaskStats {
        let st = self.inner.state.lock();
        let mut ended = st.ended;
        for shard in self.inner.ended.iter() {
            ended.add(&shard.0.lock().outcomes);
        }
        TaskStats {
            spawned: st.spawned,
            completed: ended.completed,
            failed: ended.failed,
            cancelled: ended.cancelled,
            aborted: ended.aborted,
            live: self.inner.live.load(Ordering::Acquire),
        }
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

/// How a native task's future ended, as its `JoinHandle` reports it. Small
/// on purpose: tokio moves it into the task's cell.
#[derive(Debug)]
enum Exit {
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
    struct Watched<F> {
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
    static REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as spawning into a registry, for [`EndGuard`]; restores
/// the previous mark when dropped (a task's drop may spawn, too).
struct Spawning(*const Inner);

impl Spawning {
    #[inline]
    fn enter(inner: &Arc<Inner>) -> Self {
        Self(SPAWNING.with(|s| s.replace(Arc::as_ptr(inner))))
    }
}

impl Drop for Spawning {
    #[inline]
    fn drop(&mut self) {
        SPAWNING.with(|s| s.set(self.0));
    }
}

impl<F: Future<Output = anyhow::Result<()>>> Future for Watched<F> {
    type Output = Exit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exit> {
        let mut this = self.project();
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
                    tracing::error!(target: "dig_service::tasks", task = %name, error = ?e, "task failed");
                }
                Poll::Ready(Exit::Failed(Arc::new(e)))
            }
        }
    }
}

pin_project! {
    /// A critical task's future (see [`TaskRegistry::spawn_critical`]): the
    /// user's future, and the token it cancels when it fails, panics or
    /// returns early.
    struct Critical<F> {
        #[pin]
        fut: F,
        token: ShutdownToken,
        name: TaskName,
    }
}

impl<F: Future<Output = anyhow::Result<()>>> Future for Critical<F> {
    type Output = anyhow::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let fut = this.fut;
        // A panicking future is never polled again (it is dropped), so it
        // cannot be seen in a broken state.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx)));
        let name = &*this.name;
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => {
                if !this.token.is_cancelled() {
                    let msg =
                        format!("critical task '{name}' returned while the service was running");
                    tracing::warn!(target: "dig_service::tasks", task = %name, "{msg}");
                    this.token.cancel(ShutdownReason::Fatal(msg));
                }
                Poll::Ready(Ok(()))
            }
            Ok(Poll::Ready(Err(e))) => {
                let msg = format!("critical task '{name}' failed: {e:#}");
                this.token.cancel(ShutdownReason::Fatal(msg));
                Poll::Ready(Err(e))
            }
            Err(payload) => {
                let msg = format!(
                    "critical task '{name}' panicked: {}",
                    panic_message(&*payload)
                );
                this.token.cancel(ShutdownReason::Fatal(msg));
                // Counted, logged and reported as the panic it is.
                std::panic::resume_unwind(payload)
            }
        }
    }
}

/// Where `spawn_with` puts a task: `tokio::spawn` needs no runtime handle
/// (whose lookup clones an `Arc`), `spawn_on` names one.
trait Spawner {
    fn spawn<T>(self, task: T) -> JoinHandle<T::Output>
    where
        T: Future + Send + 'static,
        T::Output: Send + 'static;
}

struct CurrentRuntime;

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
mod tests {
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;

    use super::{TaskKind, TaskRegistry, REAP_AT, REAP_AT_THREAD};
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
        let bound = 1 + REAP_AT_THREAD * r.inner.ended.len();
        assert!(occupied <= bound, "{occupied} entries kept for 1 live task");
        keep_tx.send(()).unwrap();
        keeper.await.unwrap();
        assert_eq!(slab_occupied_and_capacity(&r).0, 0);
    }
}
