//! `TaskRegistry`, `TaskHandle`, `TaskSummary` and `TaskStats` for Python.
//!
//! A Python spawn is one crossing in (`spawn`: checks, `loop.create_task`,
//! one registry insert) and one crossing out (the task's done callback:
//! outcome, logging, one registry removal). Nothing waits on tokio: the
//! deadline join runs on the event loop (`dig_service._aio.join_all`) and is
//! woken once, when the registry empties, by whichever thread empties it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, ThreadId};

use pyo3::exceptions::asyncio::{CancelledError, InvalidStateError};
use pyo3::exceptions::{
    PyKeyboardInterrupt, PyRuntimeError, PySystemExit, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::exit::{self, attach_unless_exiting};
use super::fork;
use super::interop::{
    aio_cancel_all, aio_join_all, aio_resolve, call_on_loop, coroutine_type, iscoroutine,
    log_task_exception, log_task_warning, monotonic_of, running_loop, seconds_arg, service_err,
    task_creation, task_type, text_arg, type_name, TaskCreation,
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
        attach_unless_exiting(|py| {
            self.task
                .bind(py)
                .call_method0(pyo3::intern!(py, "done"))
                .and_then(|d| d.is_truthy())
                .unwrap_or(false)
        })
        .unwrap_or(false)
    }

    fn cancel(&self) {
        attach_unless_exiting(|py| {
            if !StopBatch::add(py, self) {
                if let Ok(cancel) = self.task.bind(py).getattr(pyo3::intern!(py, "cancel")) {
                    call_on_loop(self.event_loop.bind(py), self.thread, &cancel, &[]);
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Stopping stragglers: one call per event loop, not one per task.

/// The tasks to cancel on one event loop.
struct LoopBatch {
    event_loop: Py<PyAny>,
    thread: ThreadId,
    tasks: Vec<Py<PyAny>>,
}

thread_local! {
    /// While [`StopBatch::run`] runs on this thread: the cancellations the
    /// core asks for, gathered per loop.
    static GATHERING: RefCell<Option<Vec<LoopBatch>>> = const { RefCell::new(None) };
}

/// Cancels the stragglers found by `close_and_stop_all` with one call per
/// event loop: on this thread's own loop, one call; on another thread's, one
/// `call_soon_threadsafe` (not one each: 40k stragglers on another thread's
/// loop cost it 40k wake-ups, and overshot a 0.2 s deadline by most of a
/// second). The token's wake-ups are batched the same way.
struct StopBatch {
    outer: Option<Vec<LoopBatch>>,
}

impl StopBatch {
    /// Run `stop` (which calls [`ForeignTask::cancel`] on each straggler),
    /// then cancel the gathered tasks, loop by loop.
    fn run<R>(py: Python<'_>, stop: impl FnOnce() -> R) -> PyResult<R> {
        let guard = StopBatch {
            // A nested run (from a Python `done()`, say) keeps its own batch.
            outer: GATHERING.with(|g| g.replace(Some(Vec::new()))),
        };
        let out = stop();
        let batches = guard.finish();
        if !batches.is_empty() {
            let cancel_all = aio_cancel_all(py)?;
            for batch in batches {
                let tasks = PyList::new(py, batch.tasks)?;
                call_on_loop(
                    batch.event_loop.bind(py),
                    batch.thread,
                    cancel_all,
                    &[tasks.into_any()],
                );
            }
        }
        Ok(out)
    }

    /// Gather `task` if a batch is open on this thread. No Python code runs
    /// here: references are counted up, nothing else.
    fn add(py: Python<'_>, task: &PyForeign) -> bool {
        GATHERING.with(|g| {
            let mut g = g.borrow_mut();
            let Some(batches) = g.as_mut() else {
                return false;
            };
            let event_loop = task.event_loop.bind(py);
            match batches.iter_mut().find(|b| b.event_loop.is(event_loop)) {
                Some(batch) => batch.tasks.push(task.task.clone_ref(py)),
                None => batches.push(LoopBatch {
                    event_loop: event_loop.clone().unbind(),
                    thread: task.thread,
                    tasks: vec![task.task.clone_ref(py)],
                }),
            }
            true
        })
    }

    fn finish(mut self) -> Vec<LoopBatch> {
        let outer = self.outer.take();
        let mine = GATHERING.with(|g| g.replace(outer));
        std::mem::forget(self);
        mine.unwrap_or_default()
    }
}

impl Drop for StopBatch {
    /// Only on a panic out of `stop`: restore the outer batch (the gathered
    /// tasks are dropped, not cancelled: the registry is broken anyway).
    fn drop(&mut self) {
        let outer = self.outer.take();
        let _ = GATHERING.with(|g| g.replace(outer));
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
    /// The name as Python shows it (`'peer-1'`).
    fn quoted_name(&self, py: Python<'_>) -> String {
        self.name
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "<unprintable name>".to_owned())
    }

    /// A tracked task raised `exc`: log it, and fire the token if the task
    /// is critical, or if `exc` is `KeyboardInterrupt` or `SystemExit`.
    ///
    /// Those two (critical task or not) have already stopped the event loop
    /// (asyncio re-raises them out of the loop); `asyncio.run` and
    /// `dig_service.run` then run it again to tear it down, and the fired
    /// token makes the service wind down in that time: `run` returns, the
    /// tasks are joined, `on_stop` and `post_stop` run, within the budget.
    fn report_failure(&self, py: Python<'_>, tracked: &PyTracked, exc: &Bound<'_, PyAny>) {
        let name = self.quoted_name(py);
        let what = format!("task {name} ({}) failed", self.kind.name());
        let _ = log_task_exception(py, &what, exc);
        let interrupt = exc.is_instance_of::<PyKeyboardInterrupt>();
        let exit = exc.is_instance_of::<PySystemExit>();
        if !(tracked.critical || interrupt || exit) {
            return;
        }
        let reason = if interrupt {
            ShutdownReason::UserRequested
        } else {
            let text = exc
                .str()
                .map(|t| t.to_string())
                .unwrap_or_else(|_| "<unprintable>".to_owned());
            let described = if text.is_empty() {
                type_name(exc)
            } else {
                format!("{}: {text}", type_name(exc))
            };
            ShutdownReason::Fatal(if tracked.critical {
                format!("critical task {name} failed: {described}")
            } else {
                format!("task {name} raised {described}")
            })
        };
        tracked.registry.shutdown().cancel(reason);
    }

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
    fn abort(&self) -> PyResult<()> {
        let _inside = exit::enter()?;
        match &self.inner {
            HandleInner::Python(t) => t.foreign.cancel(),
            HandleInner::Native { abort, .. } => abort.abort(),
        }
        Ok(())
    }

    /// Whether the task has finished, however it finished.
    fn is_finished(&self, py: Python<'_>) -> PyResult<bool> {
        let _inside = exit::enter()?;
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
        let _inside = exit::enter()?;
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
        let Ok(_inside) = exit::enter() else {
            return Ok(()); // a daemon thread's loop at interpreter exit
        };
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
        // From here on the entry leaves the registry whatever happens
        // (a logging handler that raises, an exception whose `__str__`
        // raises): a task reported once is never left live.
        let (outcome, err) = match exception {
            Ok(exc) if exc.is_none() => {
                let token = tracked.registry.shutdown();
                if tracked.critical && !token.is_cancelled() {
                    let msg = format!(
                        "critical task {} returned while the service was running",
                        self.quoted_name(py)
                    );
                    let _ = log_task_warning(py, &msg);
                    token.cancel(ShutdownReason::Fatal(msg));
                }
                (TaskOutcome::Completed, None)
            }
            Ok(exc) => {
                self.report_failure(py, tracked, &exc);
                (TaskOutcome::Failed, None)
            }
            Err(e) if e.is_instance_of::<CancelledError>(py) => (TaskOutcome::Cancelled, None),
            Err(e) => (TaskOutcome::Failed, Some(e)),
        };
        tracked.registry.finish_foreign(tracked.id, outcome);
        err.map_or(Ok(()), Err)
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

/// A `bool` keyword argument, or what was passed instead: extraction never
/// fails, so that the function can refuse it itself (and close the
/// coroutine it was given) instead of PyO3 refusing it before the call.
struct Flag<'py>(Result<bool, Bound<'py, PyAny>>);

impl<'a, 'py> FromPyObject<'a, 'py> for Flag<'py> {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Flag(match obj.cast::<PyBool>() {
            Ok(flag) => Ok(flag.is_true()),
            Err(_) => Err(obj.to_owned()),
        }))
    }
}

/// Refuse a coroutine that a new task cannot own: one that is running, was
/// started elsewhere (suspended in someone's `await`), or has finished (it
/// was awaited before). Such a coroutine is not closed: it is not ours.
///
/// `spawn` asks only about a coroutine that something else references too
/// (a variable, a list): a finished one that nothing else references (a
/// function returned it finished) is not caught here; its task then fails
/// at its first step with asyncio's "cannot reuse already awaited
/// coroutine", logged and counted like any task failure.
fn check_coroutine_state(coro: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = coro.py();
    let why = if coro.getattr(pyo3::intern!(py, "cr_running"))?.is_truthy()? {
        "is running (a coroutine cannot spawn itself)"
    } else if coro
        .getattr(pyo3::intern!(py, "cr_suspended"))?
        .is_truthy()?
    {
        "was already started and is suspended in an `await` (it belongs to whoever started it)"
    } else if coro.getattr(pyo3::intern!(py, "cr_frame"))?.is_none() {
        "has already finished (it was awaited, or closed, before): pass a new coroutine, \
         spawn(name, kind, work())"
    } else {
        return Ok(());
    };
    Err(PyValueError::new_err(format!(
        "TaskRegistry.spawn(): `coro` {why}; got {}",
        coro.repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| type_name(coro))
    )))
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
    ///
    /// Every argument is checked before the task is made, so a spawn that
    /// raises has not scheduled anything; a refused coroutine is closed
    /// (no "never awaited" warning), unless it is someone else's (already
    /// started or running), which is left alone.
    #[pyo3(
        signature = (name, kind, coro, *, critical = Flag(Ok(false))),
        text_signature = "($self, name, kind, coro, *, critical=False)"
    )]
    fn spawn<'py>(
        slf: &Bound<'py, Self>,
        name: &Bound<'py, PyAny>,
        kind: &Bound<'py, PyAny>,
        coro: &Bound<'py, PyAny>,
        critical: Flag<'py>,
    ) -> PyResult<Bound<'py, PyTaskHandle>> {
        const FUNC: &str = "TaskRegistry.spawn()";
        let _inside = exit::enter()?;
        let py = slf.py();
        let this = slf.get();
        let core = this.core()?;
        if coro.get_type().is(coroutine_type(py)?) {
            // A coroutine that only this call references (the usual
            // `spawn(name, kind, work())`) cannot be running or suspended in
            // someone's `await`: only one held elsewhere is asked its state
            // (`cr_frame` makes a frame object, ~1.5k instructions: P1).
            // SAFETY: `coro` is a live object; reading its count is a load.
            if unsafe { pyo3::ffi::Py_REFCNT(coro.as_ptr()) } > 1 {
                check_coroutine_state(coro)?;
            }
        } else if !iscoroutine(py)?.call1((coro,))?.is_truthy()? {
            let hint = if coro.is_callable() {
                " (call the async function: spawn(name, kind, work()), not spawn(name, kind, work))"
            } else {
                ""
            };
            return Err(PyTypeError::new_err(format!(
                "{FUNC}: `coro` must be a coroutine object{hint}, got {}",
                type_name(coro)
            )));
        }
        // From here on, every refusal closes the coroutine so that Python
        // does not warn that it was never awaited.
        let refuse = |err: PyErr| {
            let _ = coro.call_method0(pyo3::intern!(py, "close"));
            err
        };
        let (name_str, name_text) = text_arg(name, FUNC, "name").map_err(refuse)?;
        let kind = PyTaskKind::from_arg(kind, FUNC, "kind").map_err(refuse)?;
        let critical = match critical.0 {
            Ok(flag) => flag,
            Err(other) => {
                return Err(refuse(PyTypeError::new_err(format!(
                    "{FUNC}: `critical` must be bool (True or False), got {}",
                    type_name(&other)
                ))))
            }
        };
        if core.is_closed() {
            return Err(refuse(service_err(py, &ServiceError::AlreadyStopped)));
        }
        let event_loop = running_loop(py, FUNC).map_err(refuse)?;
        let (task, may_have_run) = create_task(&event_loop, coro, name_str, refuse)?;
        // The task exists: from here on a failure cancels it before its
        // first step (so its coroutine never runs) and leaves nothing live.
        let foreign = Arc::new(PyForeign {
            task: task.clone().unbind(),
            event_loop: event_loop.clone().unbind(),
            thread: thread::current().id(),
        });
        let id = match core.track_foreign(name_text, kind, foreign.clone()) {
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
        )
        .and_then(|handle| {
            untrack(&handle);
            if may_have_run && task.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
                // An eager task factory ran the task to its end inside
                // `create_task`. A done callback would run only on the next
                // loop turn, after `await handle` had already returned:
                // report the end now, so that, as for any other task, an
                // awaiter that resumes finds it logged, counted and out of
                // the registry. A report that fails goes where a failing
                // done callback's would.
                if let Err(err) = handle.get().__call__(&task) {
                    let context = PyDict::new(py);
                    context.set_item(
                        "message",
                        "TaskRegistry.spawn(): reporting the end of an eagerly finished task failed",
                    )?;
                    context.set_item("exception", err.value(py))?;
                    context.set_item("task", &task)?;
                    event_loop
                        .call_method1(pyo3::intern!(py, "call_exception_handler"), (context,))?;
                }
            } else {
                task.call_method1(pyo3::intern!(py, "add_done_callback"), (&handle,))?;
            }
            Ok(handle)
        });
        if handle.is_err() {
            let _ = task.call_method0(pyo3::intern!(py, "cancel"));
            core.finish_foreign(id, TaskOutcome::Cancelled);
        }
        handle
    }

    /// Wait for every tracked task up to `deadline` seconds, then stop the
    /// stragglers and raise `ShutdownDeadlineExceeded`.
    fn join_all<'py>(
        slf: &Bound<'py, Self>,
        deadline: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _inside = exit::enter()?;
        let secs = seconds_arg(deadline, "TaskRegistry.join_all()", "deadline")?;
        aio_join_all(slf.py())?.call1((slf, secs))
    }

    /// Close the registry if it is empty; else resolve `fut` once it empties.
    fn _try_close(&self, fut: &Bound<'_, PyAny>) -> PyResult<bool> {
        let _inside = exit::enter()?;
        let py = fut.py();
        let event_loop = fut.call_method0(pyo3::intern!(py, "get_loop"))?.unbind();
        let fut = fut.clone().unbind();
        let thread = thread::current().id();
        Ok(self.core()?.try_close(move || {
            attach_unless_exiting(|py| {
                if let Ok(resolve) = aio_resolve(py) {
                    call_on_loop(event_loop.bind(py), thread, resolve, &[fut.into_bound(py)]);
                }
            });
        }))
    }

    /// Close the registry, stop every live task, return their names.
    fn _close_and_stop_all(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let _inside = exit::enter()?;
        let core = self.core()?;
        Ok(StopBatch::run(py, || core.close_and_stop_all())?.names)
    }

    /// The live tasks.
    fn snapshot(&self, py: Python<'_>) -> PyResult<Vec<PyTaskSummary>> {
        let _inside = exit::enter()?;
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
