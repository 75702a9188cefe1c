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

use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Result, ServiceError};
use crate::shutdown::ShutdownToken;

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

/// A task's name: cheap to clone, compares equal to a `&str`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TaskName(Arc<str>);

impl Deref for TaskName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TaskName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for TaskName {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for TaskName {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl PartialEq<str> for TaskName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TaskName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One live task, as seen by [`TaskRegistry::snapshot`].
#[derive(Debug, Clone)]
pub struct TaskSummary {
    /// The name given at spawn.
    pub name: TaskName,
    /// When it was spawned.
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
pub struct ForeignTaskId(u64);

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
    join: JoinHandle<std::result::Result<(), TaskFailure>>,
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
            Ok(res) => res,
            Err(e) if e.is_panic() => Err(TaskFailure::Panic(panic_message(&*e.into_panic()))),
            Err(_) => Err(TaskFailure::Aborted),
        })
    }
}

// ---------------------------------------------------------------------------
// Registry state: a generation-checked slab of live entries.

enum Control {
    /// Between insertion and `spawn_on` storing the abort handle. The
    /// runtime may drop (or even finish) the task before that, so `spawn`
    /// is called without the state lock; `stop_requested` records a
    /// `close_and_stop_all` that ran in this window so `spawn_on` can abort
    /// the task once it has its handle.
    Starting {
        stop_requested: bool,
    },
    Native(AbortHandle),
    Foreign(Arc<dyn ForeignTask>),
}

struct Entry {
    name: TaskName,
    kind: TaskKind,
    spawned_at: Instant,
    control: Control,
}

impl Entry {
    fn origin(&self) -> TaskOrigin {
        match self.control {
            Control::Starting { .. } | Control::Native(_) => TaskOrigin::Native,
            Control::Foreign(_) => TaskOrigin::Python,
        }
    }
}

enum Slot {
    Vacant { generation: u32 },
    Occupied { generation: u32, entry: Entry },
}

type IdleWaker = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    closed: bool,
    idle_wakers: Vec<IdleWaker>,
    stats: TaskStats,
}

impl State {
    fn insert(&mut self, entry: Entry) -> u64 {
        self.stats.spawned += 1;
        self.stats.live += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            let generation = match slot {
                Slot::Vacant { generation } => *generation,
                Slot::Occupied { .. } => unreachable!("free list names an occupied slot"),
            };
            *slot = Slot::Occupied { generation, entry };
            key(index, generation)
        } else {
            let index = u32::try_from(self.slots.len()).expect("more than 2^32 live tasks");
            self.slots.push(Slot::Occupied {
                generation: 0,
                entry,
            });
            key(index, 0)
        }
    }

    /// Remove the entry under `k`, count its outcome, and hand back the
    /// idle wakers to run if the registry just became empty.
    fn remove(&mut self, k: u64, outcome: TaskOutcome) -> Option<(Entry, Vec<IdleWaker>)> {
        let (index, generation) = ((k & 0xffff_ffff) as u32, (k >> 32) as u32);
        let slot = self.slots.get_mut(index as usize)?;
        match slot {
            Slot::Occupied { generation: g, .. } if *g == generation => {}
            _ => return None,
        }
        let old = std::mem::replace(
            slot,
            Slot::Vacant {
                generation: generation.wrapping_add(1),
            },
        );
        let Slot::Occupied { entry, .. } = old else {
            unreachable!()
        };
        self.free.push(index);
        self.stats.live -= 1;
        match outcome {
            TaskOutcome::Completed => self.stats.completed += 1,
            TaskOutcome::Failed => self.stats.failed += 1,
            TaskOutcome::Cancelled => self.stats.cancelled += 1,
            TaskOutcome::Aborted => self.stats.aborted += 1,
        }
        let wakers = if self.stats.live == 0 {
            std::mem::take(&mut self.idle_wakers)
        } else {
            Vec::new()
        };
        Some((entry, wakers))
    }

    fn get_mut(&mut self, k: u64) -> Option<&mut Entry> {
        let (index, generation) = ((k & 0xffff_ffff) as u32, (k >> 32) as u32);
        match self.slots.get_mut(index as usize)? {
            Slot::Occupied {
                generation: g,
                entry,
            } if *g == generation => Some(entry),
            _ => None,
        }
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Occupied { entry, .. } => Some(entry),
            Slot::Vacant { .. } => None,
        })
    }
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

struct Inner {
    shutdown: ShutdownToken,
    state: Mutex<State>,
}

impl Inner {
    fn finish(&self, k: u64, outcome: TaskOutcome) -> bool {
        let removed = self.state.lock().remove(k, outcome);
        match removed {
            Some((entry, wakers)) => {
                // Drop the entry (and with it any foreign payload) and run the
                // wakers outside the lock.
                drop(entry);
                for w in wakers {
                    w();
                }
                true
            }
            None => false,
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
                state: Mutex::new(State::default()),
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
        self.spawn_on(&Handle::current(), name, kind, fut)
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
        let name = name.into();
        let k = {
            let mut st = self.inner.state.lock();
            if st.closed {
                return Err(ServiceError::AlreadyStopped);
            }
            st.insert(Entry {
                name: name.clone(),
                kind,
                spawned_at: Instant::now(),
                control: Control::Starting {
                    stop_requested: false,
                },
            })
        };
        let mut reaper = Reaper {
            inner: self.inner.clone(),
            key: k,
            name: name.clone(),
            outcome: TaskOutcome::Aborted,
        };
        // No registry lock may be held here: on a runtime that is shutting
        // down, tokio drops the future inline, and the reaper's drop takes
        // the lock.
        let join = rt.spawn(async move {
            let res = match fut.await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::error!(target: "dig_service::tasks", task = %reaper.name, error = ?e, "task failed");
                    Err(TaskFailure::Error(Arc::new(e)))
                }
            };
            reaper.outcome = if res.is_ok() {
                TaskOutcome::Completed
            } else {
                TaskOutcome::Failed
            };
            drop(reaper);
            res
        });
        let abort = join.abort_handle();
        let stop_now = {
            let mut st = self.inner.state.lock();
            // `None`: the task already ended and its reaper removed the entry.
            match st.get_mut(k) {
                Some(entry) => {
                    let stop = matches!(
                        entry.control,
                        Control::Starting {
                            stop_requested: true
                        }
                    );
                    entry.control = Control::Native(abort.clone());
                    stop
                }
                None => false,
            }
        };
        if stop_now {
            abort.abort();
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
            spawned_at: Instant::now(),
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
        self.inner.finish(id.0, outcome)
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
            for slot in &mut st.slots {
                let Slot::Occupied { entry: e, .. } = slot else {
                    continue;
                };
                match &mut e.control {
                    Control::Starting { stop_requested } => *stop_requested = true,
                    Control::Native(h) => natives.push(h.clone()),
                    Control::Foreign(f) => {
                        foreign.push((e.spawned_at, e.name.to_string(), f.clone()));
                        continue;
                    }
                }
                live.push((e.spawned_at, e.name.to_string()));
            }
        }
        for h in natives {
            h.abort();
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
        // Slots are reused, so slot order is not spawn order; a stable sort
        // on the spawn instant restores it.
        live.sort_by_key(|(at, _)| *at);
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
        let st = self.inner.state.lock();
        let mut out = Vec::with_capacity(st.stats.live as usize);
        out.extend(st.entries().map(|e| TaskSummary {
            name: e.name.clone(),
            spawned_at: e.spawned_at,
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

/// Removes a native task's entry when the task ends, however it ends:
/// normally, by error, by panic (dropped while unwinding), or dropped by an
/// abort.
struct Reaper {
    inner: Arc<Inner>,
    key: u64,
    name: TaskName,
    outcome: TaskOutcome,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(target: "dig_service::tasks", task = %self.name, "task panicked");
            self.outcome = TaskOutcome::Failed;
        }
        self.inner.finish(self.key, self.outcome);
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
