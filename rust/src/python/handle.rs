//! `TaskHandle`: one tracked task, seen from Python, and the report of a
//! Python task's end.
//!
//! A Python task's handle is also its done callback (`__call__`), so a spawn
//! allocates no separate callback object (SPEC P1).
//!
//! Guarantees:
//! - **An end is reported once.** The done callback logs and counts the
//!   task's outcome, fires the token for a critical task (or for a
//!   `KeyboardInterrupt`/`SystemExit`), and removes the task from the
//!   registry, exactly once however often it is called; only the handle's
//!   own task may call it (anything else is a `TypeError`).
//! - **Reported even when reporting fails.** Once the report has begun, the
//!   entry leaves the registry whatever happens (a logging handler that
//!   raises, an exception whose `__str__` raises): no task reported once is
//!   left live.
//! - **Safe from any thread.** `abort()` cancels a Python task on its own
//!   loop (see `foreign.rs`) and aborts a native one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::exit;
use super::foreign::{outcome_of, PyForeign};
use super::interop::{log_task_exception, log_task_warning, type_name};
use super::kinds::PyTaskKind;
use super::spawn::TaskContext;
use crate::shutdown::ShutdownReason;
use crate::tasks::{
    ForeignTask, ForeignTaskId, TaskFailure, TaskKind, TaskOrigin, TaskOutcome, TaskRegistry,
};

/// The result a native task's awaiters see.
pub(crate) type NativeResult = Option<Result<(), TaskFailure>>;

/// What a Python task's handle needs to report its end: the handle is also
/// the task's done callback (`__call__`), so a spawn allocates no separate
/// callback object.
pub(crate) struct PyTracked {
    foreign: Arc<PyForeign>,
    registry: TaskRegistry,
    id: ForeignTaskId,
    /// Here and in `Native`, not in `PyTaskHandle`: it fills padding (see
    /// `PyTaskHandle`'s size note).
    kind: PyTaskKind,
    critical: bool,
    /// Set once the end has been reported, so it is reported once only.
    reported: AtomicBool,
    /// The task is in its loop's young set (`young.rs`), with no done
    /// callback: a sweep notices its end.
    young: AtomicBool,
    /// The task's context, where `spawn` made it (CPython 3.11): its end is
    /// reported in it, by the young sweep or by the done callback (which
    /// then needs no context of its own).
    context: Option<Py<PyAny>>,
    /// The task tells its own context (`Task.get_context()`, CPython >=
    /// 3.12), asked only when the end is reported in it. With `context`
    /// `None` and this `false`, the context is unknown and the task is
    /// never young.
    context_of_task: bool,
}

enum HandleInner {
    Python(PyTracked),
    Native {
        kind: PyTaskKind,
        abort: AbortHandle,
        done: watch::Receiver<NativeResult>,
    },
}

/// A tracked task: abort it, ask whether it finished, or await its result.
///
/// Size: 48 bytes of fields (a test holds it there), so that with the object
/// header and the collector's header the object is 80 bytes, in pymalloc's
/// 65-80 byte class. At 81-96 it shared its class with the `asyncio.Handle`
/// of each task's first step on CPython 3.11 (96 bytes there): those are
/// freed a turn later, leaving every pool of the class half empty and
/// unusable for anything else, about 96 bytes of RSS a live task (P10).
#[pyclass(name = "TaskHandle", module = "dig_service._core", frozen)]
pub struct PyTaskHandle {
    name: Py<PyString>,
    inner: HandleInner,
}

// The size note above, held at build time (64-bit targets: the wheel's).
#[cfg(target_pointer_width = "64")]
const _: () = assert!(
    std::mem::size_of::<PyTaskHandle>() <= 48,
    "TaskHandle grew past 48 bytes of fields: it would share pymalloc's 81-96 byte class \
     with asyncio's Handle on CPython 3.11 (P10, see the note on PyTaskHandle)"
);

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
    /// is critical, or if `exc` is `KeyboardInterrupt` or `SystemExit` (see
    /// [`failure_reason`]).
    fn report_failure(&self, py: Python<'_>, tracked: &PyTracked, exc: &Bound<'_, PyAny>) {
        let name = self.quoted_name(py);
        let what = format!("task {name} ({}) failed", self.kind().name());
        let _ = log_task_exception(py, &what, exc);
        if let Some(reason) = failure_reason(exc, &name, tracked.critical) {
            tracked.registry.shutdown().cancel(reason);
        }
    }

    /// The handle of a Python task that `spawn` has just registered as `id`
    /// in `registry`: it is also the task's done callback.
    #[inline]
    pub(crate) fn python(
        name: Py<PyString>,
        kind: TaskKind,
        foreign: Arc<PyForeign>,
        registry: TaskRegistry,
        id: ForeignTaskId,
        critical: bool,
        context: TaskContext,
    ) -> Self {
        let (context, context_of_task) = match context {
            TaskContext::Given(context) => (Some(context), false),
            TaskContext::OfTask => (None, true),
            TaskContext::Unknown => (None, false),
        };
        Self {
            name,
            inner: HandleInner::Python(PyTracked {
                foreign,
                registry,
                id,
                kind: kind.into(),
                critical,
                reported: AtomicBool::new(false),
                young: AtomicBool::new(false),
                context,
                context_of_task,
            }),
        }
    }

    /// The handle of a native task.
    pub(crate) fn native(
        name: Py<PyString>,
        kind: TaskKind,
        abort: AbortHandle,
        done: watch::Receiver<NativeResult>,
    ) -> Self {
        Self {
            name,
            inner: HandleInner::Native {
                kind: kind.into(),
                abort,
                done,
            },
        }
    }

    /// A Python task's asyncio task.
    pub(crate) fn python_task<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match &self.inner {
            HandleInner::Python(t) => Some(t.foreign.task.bind(py).clone()),
            HandleInner::Native { .. } => None,
        }
    }

    /// Whether `spawn` knows where the task's context is (see
    /// `PyTracked::context`): only then can the task be young.
    pub(crate) fn knows_context(&self) -> bool {
        match &self.inner {
            HandleInner::Python(t) => t.context.is_some() || t.context_of_task,
            HandleInner::Native { .. } => false,
        }
    }

    /// The task's context, if `spawn` knows where it is (see
    /// `PyTracked::context`); an error from the task's `get_context()`.
    pub(crate) fn task_context<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match &self.inner {
            HandleInner::Python(t) => match &t.context {
                Some(context) => Ok(Some(context.bind(py).clone())),
                None if t.context_of_task => t
                    .foreign
                    .task
                    .bind(py)
                    .call_method0(pyo3::intern!(py, "get_context"))
                    .map(Some),
                None => Ok(None),
            },
            HandleInner::Native { .. } => Ok(None),
        }
    }

    /// Whether reporting the end of a task whose `exception()` returned
    /// `exception` may run Python code that reads context variables: logging
    /// a failure, or the warning of a critical task that returned. A task
    /// that completed or was cancelled, not critical, is reported without
    /// any (counts and the registry).
    pub(crate) fn report_may_log(
        &self,
        py: Python<'_>,
        exception: &PyResult<Bound<'_, PyAny>>,
    ) -> bool {
        match &self.inner {
            HandleInner::Python(t) if !t.critical => !matches!(
                outcome_of(py, exception),
                Some(TaskOutcome::Completed | TaskOutcome::Cancelled)
            ),
            _ => true,
        }
    }

    /// Whether the task is young (see `young.rs`): no done callback yet.
    pub(crate) fn is_young(&self) -> bool {
        match &self.inner {
            // Relaxed: touched only by the task's loop thread, under the
            // GIL, which orders every access.
            HandleInner::Python(t) => t.young.load(Ordering::Relaxed),
            HandleInner::Native { .. } => false,
        }
    }

    /// Mark the task young or not; returns whether it was.
    pub(crate) fn set_young(&self, young: bool) -> bool {
        match &self.inner {
            // Relaxed: as in `is_young`.
            HandleInner::Python(t) => t.young.swap(young, Ordering::Relaxed),
            HandleInner::Native { .. } => false,
        }
    }
}

/// The reason a task's failure `exc` cancels the token with, if it does:
/// `KeyboardInterrupt` → `UserRequested`; `SystemExit`, or any failure of a
/// `critical` task → `Fatal` naming the task (`quoted_name`, as Python
/// shows it) and the exception. `None`: the failure is only logged.
///
/// `KeyboardInterrupt` and `SystemExit` (critical task or not) have already
/// stopped the event loop (asyncio re-raises them out of the loop);
/// `asyncio.run` and `dig_service.run` then run it again to tear it down,
/// and the fired token makes the service wind down in that time: `run`
/// returns, the tasks are joined, `on_stop` and `post_stop` run, within the
/// budget.
pub(crate) fn failure_reason(
    exc: &Bound<'_, PyAny>,
    quoted_name: &str,
    critical: bool,
) -> Option<ShutdownReason> {
    let interrupt = exc.is_instance_of::<PyKeyboardInterrupt>();
    let exit = exc.is_instance_of::<PySystemExit>();
    if !(critical || interrupt || exit) {
        return None;
    }
    Some(if interrupt {
        ShutdownReason::UserRequested
    } else {
        let described = describe_exception(exc);
        ShutdownReason::Fatal(if critical {
            format!("critical task {quoted_name} failed: {described}")
        } else {
            format!("task {quoted_name} raised {described}")
        })
    })
}

/// An exception on one line: `ValueError: boom`, or `ValueError` when its
/// text is empty.
pub(crate) fn describe_exception(exc: &Bound<'_, PyAny>) -> String {
    let text = exc
        .str()
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "<unprintable>".to_owned());
    if text.is_empty() {
        type_name(exc)
    } else {
        format!("{}: {text}", type_name(exc))
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
        match &self.inner {
            HandleInner::Python(t) => t.kind,
            HandleInner::Native { kind, .. } => *kind,
        }
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

    fn __await__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let _inside = exit::enter()?;
        let py = slf.py();
        let awaitable = match &slf.get().inner {
            HandleInner::Python(t) => {
                // The awaiter's wake-up is a done callback of the task:
                // a young task gets its own first, so that the awaiter
                // finds the end reported (see `young.rs`).
                super::young::promote(slf);
                t.foreign.task.bind(py).clone()
            }
            HandleInner::Native { done, .. } => {
                let mut done = done.clone();
                super::bridge::into_awaitable(py, async move {
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
    pub(crate) fn __call__(&self, task: &Bound<'_, PyAny>) -> PyResult<()> {
        self.report_end(task)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<TaskHandle {:?} {} origin={} finished={}>",
            self.name.bind(py).to_str()?,
            self.kind().name(),
            self.origin(),
            self.is_finished(py)?
        ))
    }
}

impl PyTaskHandle {
    /// The report of the task's end, as its done callback (`__call__`)
    /// makes it: see `__call__`. The young sweep (`young.rs`) makes the
    /// same report through `report_swept`, or through this one in the
    /// task's context when it may log.
    pub(crate) fn report_end(&self, task: &Bound<'_, PyAny>) -> PyResult<()> {
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
        // Relaxed, here and in the `swap` of `report_exception`: the flag
        // guards nothing but itself. The swap is the decision: a
        // read-modify-write on one location, so exactly one caller reads
        // `false` there, whatever the ordering; what it then reports is
        // reported under the GIL and the registry's lock, which order it
        // for everyone else. This load only skips the `exception()` call
        // for a task already reported.
        if tracked.reported.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.report_exception(
            py,
            tracked,
            task.call_method0(pyo3::intern!(py, "exception")),
        )
    }

    /// The young sweep's report of its own task's end (`young.rs`): as
    /// `report_end`, with what the task's `exception()` returned, which the
    /// sweep has already asked (see `report_may_log`). Called inside the
    /// sweep's `exit::enter`.
    pub(crate) fn report_swept(
        &self,
        py: Python<'_>,
        exception: PyResult<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        match &self.inner {
            HandleInner::Python(tracked) => self.report_exception(py, tracked, exception),
            HandleInner::Native { .. } => Ok(()),
        }
    }

    /// Report the end of `tracked`'s task, whose `exception()` returned
    /// `exception` (see `report_end`).
    fn report_exception(
        &self,
        py: Python<'_>,
        tracked: &PyTracked,
        exception: PyResult<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let Some(outcome) = outcome_of(py, &exception) else {
            // Not done: called early, not by the loop. Nothing to report.
            return exception.map(drop);
        };
        if tracked.reported.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        // From here on the entry leaves the registry whatever happens
        // (a logging handler that raises, an exception whose `__str__`
        // raises): a task reported once is never left live.
        let err = match (outcome, exception) {
            (TaskOutcome::Completed, _) => {
                let token = tracked.registry.shutdown();
                if tracked.critical && !token.is_cancelled() {
                    let msg = format!(
                        "critical task {} returned while the service was running",
                        self.quoted_name(py)
                    );
                    let _ = log_task_warning(py, &msg);
                    token.cancel(ShutdownReason::Fatal(msg));
                }
                None
            }
            (TaskOutcome::Failed, Ok(exc)) => {
                self.report_failure(py, tracked, &exc);
                None
            }
            // `exception()` itself raised (not `CancelledError`): the
            // caller sees that error.
            (TaskOutcome::Failed, Err(e)) => Some(e),
            _ => None,
        };
        tracked.registry.finish_foreign(tracked.id, outcome);
        err.map_or(Ok(()), Err)
    }
}
