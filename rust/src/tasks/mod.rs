//! The tracked-task registry.
//!
//! [`TaskRegistry`] tracks every task of a service, native or foreign, by
//! name and kind, and joins them under one deadline at shutdown.
//!
//! # Guarantees
//!
//! - **Finished tasks leave at once.** A task's entry is removed the moment
//!   it finishes, so memory is bounded by live tasks, not by tasks ever
//!   spawned (the 0.1 crate kept every entry until `join_all`).
//! - **One deadline for everything.** [`TaskRegistry::join_all`] waits for
//!   every live task, including tasks spawned while it waits, until the
//!   deadline. Then it aborts native stragglers, cancels foreign ones and
//!   reports them all, by name, in
//!   [`ServiceError::ShutdownDeadlineExceeded`].
//! - **Closed after join.** Once `join_all` has returned, the registry is
//!   closed and `spawn` fails with [`ServiceError::AlreadyStopped`].
//! - **Nothing lost silently.** A task's error or panic is logged (target
//!   `dig_service::tasks`) and counted in [`TaskStats`].
//!
//! # Two kinds of task
//!
//! *Native* tasks are tokio tasks spawned through [`TaskRegistry::spawn`].
//! *Foreign* tasks run elsewhere (the Python bindings use this for asyncio
//! tasks): [`TaskRegistry::track_foreign`] records them, the owner reports
//! their end through [`TaskRegistry::finish_foreign`], and the registry
//! stops them through the [`ForeignTask`] they were registered with.

mod name;
mod slab;
mod stamp;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Result, ServiceError};
use crate::shutdown::ShutdownToken;
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
            Control::Native(_) => TaskOrigin::Native,
            Control::Foreign(_) => TaskOrigin::Python,
        }
    }
}

type IdleWaker = Box<dyn FnOnce() + Send + 'static>;

struct State {
    entries: Slab<Entry>,
    /// The latest `spawned_at` given out.
    last_stamp: Stamp,
    closed: bool,
    idle_wakers: Vec<IdleWaker>,
    stats: TaskStats,
}

impl State {
    fn new() -> Self {
        Self {
            entries: Slab::default(),
            last_stamp: Stamp::now(),
            closed: false,
            idle_wakers: Vec::new(),
            stats: TaskStats::default(),
        }
    }

    /// Store `entry`. Its `spawned_at`, read on a clock that ticks every
    /// few milliseconds, is moved past the previous entry's, so that stamps
    /// order entries exactly as they were spawned.
    #[inline]
    fn insert(&mut self, mut entry: Entry) -> Key {
        entry.spawned_at = entry.spawned_at.max(self.last_stamp.successor());
        self.last_stamp = entry.spawned_at;
        let k = self
            .entries
            .insert(entry)
            .expect("more than 2^32 - 1 live tasks");
        self.stats.spawned += 1;
        self.stats.live += 1;
        k
    }

    /// Count the end of a task whose entry was just removed; hand back
    /// the idle wakers to run if the registry just became empty.
    fn count_end(&mut self, outcome: TaskOutcome) -> Vec<IdleWaker> {
        self.stats.live -= 1;
        match outcome {
            TaskOutcome::Completed => self.stats.completed += 1,
            TaskOutcome::Failed => self.stats.failed += 1,
            TaskOutcome::Cancelled => self.stats.cancelled += 1,
            TaskOutcome::Aborted => self.stats.aborted += 1,
        }
        if self.stats.live == 0 {
            std::mem::take(&mut self.idle_wakers)
        } else {
            Vec::new()
        }
    }
}

struct Inner {
    shutdown: ShutdownToken,
    state: Mutex<State>,
    /// Set (under the state lock) by `close_and_stop_all`: every native task
    /// still running stops at its next poll.
    stopping: AtomicBool,
}

impl Inner {
    /// Remove the entry under `k` and count `outcome`; hand the entry back
    /// to be dropped outside the lock (a foreign payload may need the GIL).
    fn finish(&self, k: Key, outcome: TaskOutcome) -> Option<Entry> {
        let (entry, wakers) = {
            let mut st = self.state.lock();
            let entry = st.entries.remove(k)?;
            (entry, st.count_end(outcome))
        };
        run_all(wakers);
        Some(entry)
    }

    /// Remove the entry of the native task in `slot` and count `outcome`;
    /// hand back its name if the task failed, for the log.
    fn finish_native(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        let (control, name, wakers) = {
            let mut st = self.state.lock();
            let entry = st.entries.remove_at(slot)?;
            let name = (outcome == TaskOutcome::Failed).then_some(entry.name);
            (entry.control, name, st.count_end(outcome))
        };
        // The stored waker is a reference to this very task: released
        // outside the lock.
        drop(control);
        run_all(wakers);
        name
    }

    /// Store the waker of the native task in `slot`, which has just waited
    /// for the first time; wake it at once if a stop came first.
    fn park_native(&self, slot: u32, waker: &Waker) {
        let stop = {
            let mut st = self.state.lock();
            if let Some(entry) = st.entries.get_mut_at(slot) {
                entry.control = Control::Native(Some(waker.clone()));
            }
            self.stopping.load(Ordering::Relaxed)
        };
        if stop {
            waker.wake_by_ref();
        }
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
            inner: Arc::new(Inner {
                shutdown,
                state: Mutex::new(State::new()),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    /// The shutdown token this registry is linked to.
    pub fn shutdown(&self) -> &ShutdownToken {
        &self.inner.shutdown
    }

    /// Spawn a tracked tokio task on the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, like `tokio::spawn`; use
    /// [`spawn_on`](Self::spawn_on) to name a runtime.
    pub fn spawn<F>(&self, name: impl Into<TaskName>, kind: TaskKind, fut: F) -> Result<TaskHandle>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.spawn_with(CurrentRuntime, name.into(), kind, fut)
    }

    /// Spawn a tracked tokio task on the runtime behind `rt`.
    ///
    /// The task's error or panic is logged and counted; its entry leaves the
    /// registry as soon as it ends, however it ends.
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
        let k = {
            let mut st = self.inner.state.lock();
            if st.closed {
                return Err(ServiceError::AlreadyStopped);
            }
            st.insert(entry)
        };
        // No registry lock may be held here: on a runtime that is shutting
        // down, tokio drops the task inline, and its drop takes the lock.
        let join = rt.spawn(Watched {
            fut: Some(fut),
            inner: self.inner.clone(),
            slot: slab::index_of(k),
            parked: false,
        });
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
        let mut st = self.inner.state.lock();
        if st.closed {
            return Err(ServiceError::AlreadyStopped);
        }
        Ok(ForeignTaskId(st.insert(entry)))
    }

    /// Record the end of a foreign task. Returns `false` if `id` is not
    /// live (already finished).
    pub fn finish_foreign(&self, id: ForeignTaskId, outcome: TaskOutcome) -> bool {
        self.inner.finish(id.0, outcome).is_some()
    }

    /// Wait for every tracked task, including those spawned meanwhile, for
    /// at most `deadline`; then abort or cancel the stragglers.
    ///
    /// Either way the registry is closed afterwards.
    pub async fn join_all(&self, deadline: Duration) -> Result<()> {
        // A deadline too large to add to `now` (say `Duration::MAX`) means
        // "no deadline", not a panic.
        let until = tokio::time::Instant::now().checked_add(deadline);
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            if self.try_close(move || {
                let _ = tx.send(());
            }) {
                return Ok(());
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
                    names = ?stragglers.names,
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
    /// it to wait without a tokio round trip.
    pub fn try_close<F>(&self, wake: F) -> bool
    where
        F: FnOnce() + Send + 'static,
    {
        let mut st = self.inner.state.lock();
        if st.stats.live == 0 {
            st.closed = true;
            true
        } else {
            st.idle_wakers.push(Box::new(wake));
            false
        }
    }

    /// Close the registry, abort every native task and cancel every foreign
    /// one; return the names of those that were live.
    pub fn close_and_stop_all(&self) -> Stragglers {
        let mut live = Vec::new();
        let mut natives = Vec::new();
        let mut foreign = Vec::new();
        {
            let mut st = self.inner.state.lock();
            st.closed = true;
            // Under the lock, so that a task parking its waker after this
            // section sees the flag and wakes itself.
            self.inner.stopping.store(true, Ordering::Relaxed);
            for e in st.entries.iter() {
                match &e.control {
                    Control::Native(waker) => natives.extend(waker.clone()),
                    Control::Foreign(f) => {
                        foreign.push((e.spawned_at, e.name.to_string(), f.clone()));
                        continue;
                    }
                }
                live.push((e.spawned_at, e.name.to_string()));
            }
        }
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
        let st = self.inner.state.lock();
        let mut out = Vec::with_capacity(st.stats.live as usize);
        out.extend(st.entries.iter().map(|e| TaskSummary {
            name: e.name.clone(),
            spawned_at: epoch.instant_of(e.spawned_at),
            kind: e.kind,
            origin: e.origin(),
        }));
        out
    }

    /// How many tasks are live.
    pub fn len(&self) -> usize {
        self.inner.state.lock().stats.live as usize
    }

    /// Whether no task is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters since the registry was created.
    pub fn stats(&self) -> TaskStats {
        self.inner.state.lock().stats
    }

    /// Whether `self` and `other` are clones of one registry.
    pub fn same_as(&self, other: &TaskRegistry) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        f.debug_struct("TaskRegistry")
            .field("live", &st.stats.live)
            .field("closed", &st.closed)
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
    /// future when it is aborted, and while unwinding from a panic).
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
        parked: bool,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.fut.is_some() {
                let panicked = std::thread::panicking();
                this.fut.set(None);
                let outcome = if panicked {
                    TaskOutcome::Failed
                } else {
                    TaskOutcome::Aborted
                };
                if let Some(name) = this.inner.finish_native(*this.slot, outcome) {
                    tracing::error!(target: "dig_service::tasks", task = %name, "task panicked");
                }
            }
        }
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
        this.fut.set(None);
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

fn run_all(wakers: Vec<IdleWaker>) {
    for w in wakers {
        w();
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
