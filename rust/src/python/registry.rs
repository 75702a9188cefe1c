//! `TaskRegistry`, `TaskHandle`, `TaskSummary` and `TaskStats` for Python.
//!
//! A Python spawn is one crossing in (`spawn`: checks, `loop.create_task`,
//! one registry insert) and one crossing out (the task's done callback:
//! outcome, logging, one registry removal). Nothing waits on tokio: the
//! deadline join runs on the event loop (`dig_service._aio.join_all`) and is
//! woken once, when the registry empties, by whichever thread empties it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};

use pyo3::exceptions::asyncio::{CancelledError, InvalidStateError};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::fork;
use super::interop::{
    aio_join_all, aio_resolve, call_on_loop, coroutine_type, iscoroutine, log_task_exception,
    log_task_warning, monotonic_of, running_loop, seconds_arg, service_err, str_arg, task_creation,
    task_type, type_name, TaskCreation,
};
use super::kinds::PyTaskKind;
use super::token::PyShutdownToken;
use crate::error::ServiceError;
use crate::shutdown::{ShutdownReason, ShutdownToken};
use crate::tasks::{
    ForeignTask, ForeignTaskId, TaskFailure, TaskKind, TaskOrigin, TaskOutcome, TaskRegistry,
};

/// An asyncio task as the core registry sees it.
pub(crate) struct PyForeign {
    task: Py<PyAny>,
    event_loop: Py<PyAny>,
    thread: ThreadId,
}

impl ForeignTask for PyForeign {
    fn is_finished(&self) -> bool {
        Python::attach(|py| {
            self.task
                .bind(py)
                .call_method0(pyo3::intern!(py, "done"))
                .and_then(|d| d.is_truthy())
                .unwrap_or(false)
        })
    }

    fn cancel(&self) {
        Python::attach(|py| {
            if let Ok(cancel) = self.task.bind(py).getattr(pyo3::intern!(py, "cancel")) {
                call_on_loop(self.event_loop.bind(py), self.thread, &cancel, &[]);
            }
        });
    }
}

/// The result a native task's awaiters see.
pub(crate) type NativeResult = Option<Result<(), TaskFailure>>;

/// What a Python task's handle needs to report its end: the handle is also
/// the task's done callback (`__call__`), so a spawn allocates no separate
/// callback object.
struct PyTracked {
    foreign: Arc<PyForeign>,
    registry: TaskRegistry,
    id: ForeignTaskId,
    critical: bool,
    /// Set once the end has been reported, so it is reported once only.
    reported: AtomicBool,
}

enum HandleInner {
    Python(PyTracked),
    Native {
        abort: AbortHandle,
        done: watch::Receiver<NativeResult>,
    },
}

/// A tracked task: abort it, ask whether it finished, or await its result.
#[pyclass(name = "TaskHandle", module = "dig_service._core", frozen)]
pub struct PyTaskHandle {
    name: Py<PyString>,
    kind: PyTaskKind,
    inner: HandleInner,
}

impl PyTaskHandle {
    pub(crate) fn native(
        name: Py<PyString>,
        kind: TaskKind,
        abort: AbortHandle,
        done: watch::Receiver<NativeResult>,
    ) -> Self {
        Self {
            name,
            kind: kind.into(),
            inner: HandleInner::Native { abort, done },
        }
    }
}

#[pymethods]
impl PyTaskHandle {
    /// The task's name.
    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyString> {
        self.name.clone_ref(py)
    }

    /// The task's kind.
    #[getter]
    fn kind(&self) -> PyTaskKind {
        self.kind
    }

    /// `"python"` or `"native"`.
    #[getter]
    fn origin(&self) -> &'static str {
        match self.inner {
            HandleInner::Python(_) => TaskOrigin::Python.as_str(),
            HandleInner::Native { .. } => TaskOrigin::Native.as_str(),
        }
    }

    /// Cancel (Python task) or abort (native task). Safe from any thread.
    fn abort(&self) {
        match &self.inner {
            HandleInner::Python(t) => t.foreign.cancel(),
            HandleInner::Native { abort, .. } => abort.abort(),
        }
    }

    /// Whether the task has finished, however it finished.
    fn is_finished(&self, py: Python<'_>) -> PyResult<bool> {
        match &self.inner {
            HandleInner::Python(t) => t
                .foreign
                .task
                .bind(py)
                .call_method0(pyo3::intern!(py, "done"))?
                .is_truthy(),
            HandleInner::Native { abort, .. } => Ok(abort.is_finished()),
        }
    }

    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let awaitable = match &self.inner {
            HandleInner::Python(t) => t.foreign.task.bind(py).clone(),
            HandleInner::Native { done, .. } => {
                let mut done = done.clone();
                super::runtime::into_awaitable(py, async move {
                    let outcome = match done.wait_for(Option::is_some).await {
                        Ok(v) => v.clone().unwrap_or(Err(TaskFailure::Aborted)),
                        Err(_) => Err(TaskFailure::Aborted),
                    };
                    // `None` on the Python side.
                    match outcome {
                        Ok(()) => Ok(None::<bool>),
                        Err(TaskFailure::Aborted) => {
                            Err(CancelledError::new_err("native task was aborted"))
                        }
                        Err(other) => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                            "native task failed: {other}"
                        ))),
                    }
                })?
            }
        };
        awaitable.call_method0(pyo3::intern!(py, "__await__"))
    }

    /// The done callback of the handle's own asyncio task: reads the
    /// outcome, logs and counts a failure, fires the token for a critical
    /// task, and removes the entry from the registry. The end is reported
    /// once; any other caller gets a TypeError (another task, a native
    /// handle) or changes nothing (the task is not done yet, or already
    /// reported).
    fn __call__(&self, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = task.py();
        let tracked = match &self.inner {
            HandleInner::Python(t) if t.foreign.task.bind(py).is(task) => t,
            _ => return Err(PyTypeError::new_err(
                "TaskHandle: only its own asyncio task calls a TaskHandle (as its done callback)",
            )),
        };
        if tracked.reported.load(Ordering::Relaxed) {
            return Ok(());
        }
        let exception = task.call_method0(pyo3::intern!(py, "exception"));
        if let Err(e) = &exception {
            if e.is_instance_of::<InvalidStateError>(py) {
                // Not done: called early, not by the loop. Nothing to report.
                return Err(exception.unwrap_err());
            }
        }
        if tracked.reported.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let outcome = match exception {
            Ok(exc) if exc.is_none() => {
                let token = tracked.registry.shutdown();
                if tracked.critical && !token.is_cancelled() {
                    let msg = format!(
                        "critical task {} returned while the service was running",
                        self.name.bind(py).repr()?
                    );
                    let _ = log_task_warning(py, &msg);
                    token.cancel(ShutdownReason::Fatal(msg));
                }
                TaskOutcome::Completed
            }
            Ok(exc) => {
                let what = format!(
                    "task {} ({}) failed",
                    self.name.bind(py).repr()?,
                    self.kind.name()
                );
                log_task_exception(py, &what, &exc)?;
                if tracked.critical {
                    let msg = format!(
                        "critical task {} failed: {}: {}",
                        self.name.bind(py).repr()?,
                        type_name(&exc),
                        exc.str()?
                    );
                    tracked
                        .registry
                        .shutdown()
                        .cancel(ShutdownReason::Fatal(msg));
                }
                TaskOutcome::Failed
            }
            Err(e) if e.is_instance_of::<CancelledError>(py) => TaskOutcome::Cancelled,
            Err(e) => {
                tracked
                    .registry
                    .finish_foreign(tracked.id, TaskOutcome::Failed);
                return Err(e);
            }
        };
        tracked.registry.finish_foreign(tracked.id, outcome);
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<TaskHandle {:?} {} origin={} finished={}>",
            self.name.bind(py).to_str()?,
            self.kind.name(),
            self.origin(),
            self.is_finished(py)?
        ))
    }
}

/// `loop.create_task(coro, name=name)`, without the call where it is known
/// what that call does.
///
/// On a loop whose type keeps asyncio's or uvloop's stock `create_task`,
/// with no task factory set, that method builds `asyncio.Task(coro,
/// loop=loop, name=name)`, so this builds it directly: one Python call
/// instead of a keyword call into a Python-level (asyncio) or Cython
/// (uvloop, which also renames the task afterwards) method. Stock details
/// kept: asyncio's `_check_closed()` (a running loop cannot be closed by the
/// stock `close()`, so it only fires for a loop whose subclass closes it
/// anyway, and the coroutine is then closed rather than left unawaited);
/// uvloop's loop cannot be closed while it runs (`Loop._close` refuses).
/// In debug mode the task's `_source_traceback` ends at the `spawn` call
/// either way: asyncio's `create_task` trims its own frame, and here there
/// is no such frame. A task factory or an overriding subclass is honoured
/// by calling `create_task` as before.
///
/// Returns the task and whether it may already have run: a task factory
/// (`asyncio.eager_task_factory`) can run the coroutine's first step, or
/// all of it, inside `create_task`; the direct `asyncio.Task(...)` never
/// starts it. If `create_task` raises (a factory that refuses), the
/// coroutine is closed, as for every other refusal.
fn create_task<'py>(
    event_loop: &Bound<'py, PyAny>,
    coro: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    refuse: impl Fn(PyErr) -> PyErr,
) -> PyResult<(Bound<'py, PyAny>, bool)> {
    let py = event_loop.py();
    let direct = match task_creation(event_loop)? {
        TaskCreation::AsyncioStock => {
            if event_loop
                .getattr(pyo3::intern!(py, "_closed"))?
                .is_truthy()?
            {
                return Err(refuse(PyRuntimeError::new_err("Event loop is closed")));
            }
            event_loop
                .getattr(pyo3::intern!(py, "_task_factory"))?
                .is_none()
        }
        TaskCreation::UvloopStock => event_loop
            .call_method0(pyo3::intern!(py, "get_task_factory"))?
            .is_none(),
        TaskCreation::CreateTask => false,
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item(pyo3::intern!(py, "name"), name)?;
    if direct {
        kwargs.set_item(pyo3::intern!(py, "loop"), event_loop)?;
        Ok((task_type(py)?.call((coro,), Some(&kwargs))?, false))
    } else {
        let task = event_loop
            .call_method(pyo3::intern!(py, "create_task"), (coro,), Some(&kwargs))
            .map_err(refuse)?;
        Ok((task, true))
    }
}

/// Take a new `TaskHandle` out of the cycle collector's sight.
///
/// A handle has no `__traverse__`: the collector cannot see the references
/// it holds (its task, through Rust), so it can never find a cycle through
/// one, and tracking it buys nothing. Tracked, each live handle was one more
/// object for every collection to walk (SPEC P1: a registry with 100k live
/// tasks holds 100k handles).
fn untrack(handle: &Bound<'_, PyTaskHandle>) {
    // SAFETY: `handle` is a live object of a GC type (every `#[pyclass]`
    // is); untracking is allowed at any time, and `tp_dealloc` untracks
    // again harmlessly.
    unsafe { pyo3::ffi::PyObject_GC_UnTrack(handle.as_ptr().cast()) };
}

/// Named, tracked tasks (asyncio and tokio) joined under one deadline.
#[pyclass(name = "TaskRegistry", module = "dig_service._core", frozen)]
pub struct PyTaskRegistry {
    pub(crate) core: TaskRegistry,
    shutdown: Py<PyShutdownToken>,
    made_in: u64,
}

impl PyTaskRegistry {
    /// A Python view of `core` whose `shutdown` is `token`.
    pub fn from_core(core: TaskRegistry, token: Py<PyShutdownToken>) -> Self {
        Self {
            core,
            shutdown: token,
            made_in: fork::generation(),
        }
    }

    /// The core token.
    pub fn shutdown_core(&self) -> &ShutdownToken {
        self.core.shutdown()
    }

    /// The core registry, unless this object was inherited across `fork()`.
    pub(crate) fn core(&self) -> PyResult<&TaskRegistry> {
        fork::check(self.made_in, "TaskRegistry")?;
        Ok(&self.core)
    }
}

#[pymethods]
impl PyTaskRegistry {
    #[new]
    fn new(shutdown: &Bound<'_, PyAny>) -> PyResult<Self> {
        let token = shutdown.cast::<PyShutdownToken>().map_err(|_| {
            PyTypeError::new_err(format!(
                "TaskRegistry(): `shutdown` must be a dig_service.ShutdownToken, got {}",
                type_name(shutdown)
            ))
        })?;
        Ok(Self::from_core(
            TaskRegistry::new(token.get().core.clone()),
            token.clone().unbind(),
        ))
    }

    /// The token this registry's tasks watch.
    #[getter]
    fn shutdown(&self, py: Python<'_>) -> Py<PyShutdownToken> {
        self.shutdown.clone_ref(py)
    }

    /// Schedule `coro` on the running loop and track it.
    #[pyo3(signature = (name, kind, coro, *, critical = false))]
    fn spawn<'py>(
        slf: &Bound<'py, Self>,
        name: &Bound<'py, PyAny>,
        kind: &Bound<'py, PyAny>,
        coro: &Bound<'py, PyAny>,
        critical: bool,
    ) -> PyResult<Bound<'py, PyTaskHandle>> {
        let py = slf.py();
        let this = slf.get();
        let core = this.core()?;
        let is_coroutine = coro.get_type().is(coroutine_type(py)?)
            || iscoroutine(py)?.call1((coro,))?.is_truthy()?;
        if !is_coroutine {
            let hint = if coro.is_callable() {
                " (call the async function: spawn(name, kind, work()), not spawn(name, kind, work))"
            } else {
                ""
            };
            return Err(PyTypeError::new_err(format!(
                "TaskRegistry.spawn(): `coro` must be a coroutine object{hint}, got {}",
                type_name(coro)
            )));
        }
        // From here on, every refusal closes the coroutine so that Python
        // does not warn that it was never awaited.
        let refuse = |err: PyErr| {
            let _ = coro.call_method0(pyo3::intern!(py, "close"));
            err
        };
        let name_str = str_arg(name, "TaskRegistry.spawn()", "name").map_err(refuse)?;
        let kind = PyTaskKind::from_arg(kind, "TaskRegistry.spawn()", "kind").map_err(refuse)?;
        if core.is_closed() {
            return Err(refuse(service_err(py, &ServiceError::AlreadyStopped)));
        }
        let event_loop = running_loop(py, "TaskRegistry.spawn()").map_err(refuse)?;
        let (task, may_have_run) = create_task(&event_loop, coro, name_str, refuse)?;
        let foreign = Arc::new(PyForeign {
            task: task.clone().unbind(),
            event_loop: event_loop.clone().unbind(),
            thread: thread::current().id(),
        });
        let id = match core.track_foreign(name_str.to_str()?, kind, foreign.clone()) {
            Ok(id) => id,
            Err(e) => {
                // Closed by another thread between the check and now.
                let _ = task.call_method0(pyo3::intern!(py, "cancel"));
                return Err(service_err(py, &e));
            }
        };
        let handle = Bound::new(
            py,
            PyTaskHandle {
                name: name_str.clone().unbind(),
                kind: kind.into(),
                inner: HandleInner::Python(PyTracked {
                    foreign,
                    registry: core.clone(),
                    id,
                    critical,
                    reported: AtomicBool::new(false),
                }),
            },
        )?;
        untrack(&handle);
        if may_have_run && task.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
            // An eager task factory ran the task to its end inside
            // `create_task`. A done callback would run only on the next
            // loop turn, after `await handle` had already returned: report
            // the end now, so that, as for any other task, an awaiter that
            // resumes finds it logged, counted and out of the registry. A
            // report that fails goes where a failing done callback's would.
            if let Err(err) = handle.get().__call__(&task) {
                let context = PyDict::new(py);
                context.set_item(
                    "message",
                    "TaskRegistry.spawn(): reporting the end of an eagerly finished task failed",
                )?;
                context.set_item("exception", err.value(py))?;
                context.set_item("task", &task)?;
                event_loop.call_method1(pyo3::intern!(py, "call_exception_handler"), (context,))?;
            }
        } else {
            task.call_method1(pyo3::intern!(py, "add_done_callback"), (&handle,))?;
        }
        Ok(handle)
    }

    /// Wait for every tracked task up to `deadline` seconds, then stop the
    /// stragglers and raise `ShutdownDeadlineExceeded`.
    fn join_all<'py>(
        slf: &Bound<'py, Self>,
        deadline: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let secs = seconds_arg(deadline, "TaskRegistry.join_all()", "deadline")?;
        aio_join_all(slf.py())?.call1((slf, secs))
    }

    /// Close the registry if it is empty; else resolve `fut` once it empties.
    fn _try_close(&self, fut: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = fut.py();
        let event_loop = fut.call_method0(pyo3::intern!(py, "get_loop"))?.unbind();
        let fut = fut.clone().unbind();
        let thread = thread::current().id();
        Ok(self.core()?.try_close(move || {
            Python::attach(|py| {
                if let Ok(resolve) = aio_resolve(py) {
                    call_on_loop(event_loop.bind(py), thread, resolve, &[fut.into_bound(py)]);
                }
            })
        }))
    }

    /// Close the registry, stop every live task, return their names.
    fn _close_and_stop_all(&self) -> PyResult<Vec<String>> {
        Ok(self.core()?.close_and_stop_all().names)
    }

    /// The live tasks.
    fn snapshot(&self, py: Python<'_>) -> PyResult<Vec<PyTaskSummary>> {
        self.core()?
            .snapshot()
            .into_iter()
            .map(|s| {
                Ok(PyTaskSummary {
                    name: PyString::new(py, &s.name).unbind(),
                    kind: s.kind.into(),
                    spawned_at: monotonic_of(py, s.spawned_at)?,
                    origin: s.origin.as_str(),
                })
            })
            .collect()
    }

    /// Counters since the registry was created.
    fn stats(&self) -> PyResult<PyTaskStats> {
        let s = self.core()?.stats();
        Ok(PyTaskStats {
            spawned: s.spawned,
            completed: s.completed,
            failed: s.failed,
            cancelled: s.cancelled,
            aborted: s.aborted,
            live: s.live,
        })
    }

    /// Whether no task is live.
    fn is_empty(&self) -> PyResult<bool> {
        Ok(self.core()?.is_empty())
    }

    /// Whether `join_all` has closed the registry.
    fn is_closed(&self) -> PyResult<bool> {
        Ok(self.core()?.is_closed())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.core()?.len())
    }

    fn __repr__(&self) -> PyResult<String> {
        let core = self.core()?;
        let s = core.stats();
        Ok(format!(
            "<TaskRegistry live={} spawned={} closed={}>",
            s.live,
            s.spawned,
            core.is_closed()
        ))
    }
}

/// One live task.
#[pyclass(name = "TaskSummary", module = "dig_service._core", frozen)]
pub struct PyTaskSummary {
    /// The name given at spawn.
    #[pyo3(get)]
    name: Py<PyString>,
    /// The task's kind.
    #[pyo3(get)]
    kind: PyTaskKind,
    /// `time.monotonic()` at spawn.
    #[pyo3(get)]
    spawned_at: f64,
    /// `"python"` or `"native"`.
    #[pyo3(get)]
    origin: &'static str,
}

#[pymethods]
impl PyTaskSummary {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TaskSummary(name={}, kind=TaskKind.{}, spawned_at={}, origin='{}')",
            self.name.bind(py).repr()?,
            self.kind.name(),
            self.spawned_at,
            self.origin
        ))
    }
}

/// Counters of a registry since it was created.
#[pyclass(name = "TaskStats", module = "dig_service._core", frozen, get_all, eq)]
#[derive(PartialEq, Eq)]
pub struct PyTaskStats {
    spawned: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    aborted: u64,
    live: u64,
}

#[pymethods]
impl PyTaskStats {
    fn __repr__(&self) -> String {
        format!(
            "TaskStats(spawned={}, completed={}, failed={}, cancelled={}, aborted={}, live={})",
            self.spawned, self.completed, self.failed, self.cancelled, self.aborted, self.live
        )
    }
}
