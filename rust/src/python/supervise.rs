//! `TaskRegistry.supervise` for Python: a supervised asyncio task, and its
//! `SupervisedHandle`.
//!
//! The restart logic is the core's ([`Supervisor`], `tasks/policy.rs`):
//! this module only carries its decisions out on the event loop. A
//! supervised task is one asyncio task, made through the same path as
//! `spawn` (`spawn::create_task`) and tracked as one foreign entry; its
//! coroutine (`aio.supervise`) awaits each incarnation (a new coroutine
//! from the factory) and, between two, the backoff wait. After each
//! incarnation it asks the handle (`_ended`), which asks the core, logs
//! the decision and fires the token if the decision says so.
//!
//! Guarantees:
//! - **Validated first.** Every argument is checked before anything is
//!   tracked or scheduled: a `supervise` that raises has changed nothing,
//!   and the factory has not been called.
//! - **One live task.** Its incarnations and waits all run in the one
//!   asyncio task, under one registry entry that leaves once, when the task
//!   stops for good, counted by how it stopped.
//! - **A bad factory is a failed incarnation.** A factory that raises, or
//!   returns something that is not a new coroutine, counts as a failed
//!   incarnation (restarted, or given up on, by the policy).
//! - **Interrupts are not restarted.** `KeyboardInterrupt` and `SystemExit`
//!   from an incarnation stop the task for good and fire the token as they
//!   would for a plain task.
//! - **Cancel is for good.** `abort()`, a cancel at the join's deadline, or
//!   the loop's teardown cancelling the task stops it: nothing restarts,
//!   even if the incarnation swallowed the cancellation.
//! - **No lock across Python code.** The supervisor's lock is held for the
//!   decision only; the log line is written after it is released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use parking_lot::Mutex;
use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3::{PyTraverseError, PyVisit};

use super::aio;
use super::errors;
use super::exit::{self, attach_unless_exiting};
use super::foreign::{cancel_on_loop, outcome_of, PyForeign};
use super::handle::{describe_exception, failure_reason};
use super::interop::{coroutine_type, iscoroutine, log_task, text_arg, type_name, wrong_type};
use super::kinds::PyTaskKind;
use super::policy::PyRestartPolicy;
use super::registry::PyTaskRegistry;
use super::running_loop::running_loop;
use super::spawn::{coroutine_unusable, create_task};
use crate::error::ServiceError;
use crate::shutdown::ShutdownReason;
use crate::tasks::{
    End, ForeignTask, ForeignTaskId, Level, Step, Supervisor, TaskOutcome, TaskRegistry,
};

const FUNC: &str = "TaskRegistry.supervise()";

/// The supervised task's asyncio task, for the registry: set once the task
/// exists (the entry is tracked first, so that the task's coroutine finds
/// its supervisor from its first step). A cancel that comes before the task
/// is set is kept and carried out when it is.
#[derive(Default)]
struct LateForeign {
    task: Mutex<Option<Arc<PyForeign>>>,
    cancel_requested: AtomicBool,
}

impl LateForeign {
    fn get(&self) -> Option<Arc<PyForeign>> {
        self.task.lock().clone()
    }
}

impl ForeignTask for LateForeign {
    fn cancel(&self) {
        // Relaxed: the flag is read back under the GIL (`supervise`), which
        // the setter holds too (`attach`), and that orders the two.
        attach_unless_exiting(|_| match self.get() {
            Some(task) => task.cancel(),
            None => self.cancel_requested.store(true, Ordering::Relaxed),
        });
    }

    fn is_finished(&self) -> bool {
        self.get().is_some_and(|t| t.is_finished())
    }

    fn stack(&self) -> Option<String> {
        self.get().and_then(|t| t.stack())
    }

    fn stop(&self, want_stack: bool) -> Option<Option<String>> {
        match self.get() {
            Some(task) => task.stop(want_stack),
            // Not made yet: nothing has ended, nothing to show.
            None => {
                self.cancel();
                Some(None)
            }
        }
    }
}

/// A supervised task: its name, kind and restarts; stop it for good, ask
/// whether it stopped, or await its end.
#[pyclass(name = "SupervisedHandle", module = "dig_service._core", frozen)]
pub struct PySupervisedHandle {
    name: Py<PyString>,
    kind: PyTaskKind,
    /// Dropped when the task stops for good (it may reference the handle).
    factory: Mutex<Option<Py<PyAny>>>,
    registry: TaskRegistry,
    id: ForeignTaskId,
    critical: bool,
    /// The restart logic; held for a decision only, never across Python code.
    sup: Mutex<Supervisor>,
    foreign: Arc<LateForeign>,
    /// Set by `abort()`: whatever the incarnation does, nothing restarts.
    aborted: AtomicBool,
    /// Set once the end has been reported.
    reported: AtomicBool,
}

impl PySupervisedHandle {
    fn task<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.foreign
            .get()
            .map(|f| f.task.bind(py).clone())
            .ok_or_else(|| PyValueError::new_err("SupervisedHandle: the task was never made"))
    }

    fn quoted_name(&self, py: Python<'_>) -> String {
        self.name
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "<unprintable name>".to_owned())
    }
}

#[pymethods]
impl PySupervisedHandle {
    /// The collector sees the factory and the task: a task that failed
    /// holds its error, whose traceback holds the frame of the coroutine
    /// that drove it, which holds this handle (and a factory may be a
    /// bound method of an object that keeps the handle). Without this,
    /// each such cycle would leak. A lock held elsewhere (never across
    /// Python code, so only by another thread mid-decision) skips its part:
    /// the object then looks referenced, and is collected a later time.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(factory) = self.factory.try_lock() {
            if let Some(f) = factory.as_ref() {
                visit.call(f)?;
            }
        }
        if let Some(task) = self.foreign.task.try_lock() {
            if let Some(t) = task.as_ref() {
                // Only while this handle holds the last reference to the
                // task's record: while the registry tracks it, the task is
                // live and the registry's reference is invisible here.
                if Arc::strong_count(t) == 1 && Arc::strong_count(&self.foreign) == 1 {
                    visit.call(&*t.task)?;
                    visit.call(&*t.event_loop)?;
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        let factory = self.factory.lock().take();
        let task = self.foreign.task.lock().take();
        drop((factory, task));
    }

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

    /// How many times it has been restarted so far.
    #[getter]
    fn restarts(&self) -> u32 {
        self.sup.lock().restarts()
    }

    /// Stop it for good: the current incarnation (or the backoff wait) is
    /// cancelled, and nothing restarts. Safe from any thread.
    fn abort(&self) -> PyResult<()> {
        let _inside = exit::enter()?;
        // Relaxed: read by the task's own coroutine after the cancel it
        // posts reaches it, through the loop's queue (which orders them).
        self.aborted.store(true, Ordering::Relaxed);
        self.foreign.cancel();
        Ok(())
    }

    /// Whether it has stopped for good.
    fn is_finished(&self, py: Python<'_>) -> PyResult<bool> {
        let _inside = exit::enter()?;
        self.task(py)?
            .call_method0(pyo3::intern!(py, "done"))?
            .is_truthy()
    }

    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _inside = exit::enter()?;
        self.task(py)?.call_method0(pyo3::intern!(py, "__await__"))
    }

    /// Internal: start a new incarnation; the coroutine the factory made.
    /// A factory that raises, or returns anything but a new coroutine,
    /// raises here: a failed incarnation.
    fn _incarnation<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let factory = self.factory.lock().as_ref().map(|f| f.clone_ref(py));
        let factory = factory.ok_or_else(|| PyValueError::new_err("SupervisedHandle: stopped"))?;
        self.sup.lock().incarnation_started();
        let coro = factory.bind(py).call0()?;
        if !coro.get_type().is(coroutine_type(py)?)
            && !iscoroutine(py)?.call1((&coro,))?.is_truthy()?
        {
            return Err(PyTypeError::new_err(format!(
                "{FUNC}: `factory` must return a new coroutine on each call (an async \
                 function, or a lambda that calls one), got {}",
                type_name(&coro)
            )));
        }
        if coro.get_type().is(coroutine_type(py)?) {
            if let Some(why) = coroutine_unusable(&coro)? {
                return Err(PyValueError::new_err(format!(
                    "{FUNC}: `factory` must return a new coroutine on each call; the one it \
                     returned {why}"
                )));
            }
        }
        Ok(coro)
    }

    /// Internal: the current incarnation ended (`exc`: what it raised, or
    /// `None` if it returned; `cancelled`: the task was cancelled). Asks the
    /// core, logs, fires the token if told to; the delay before the next
    /// incarnation, or `None` to stop for good.
    #[pyo3(signature = (exc, cancelled))]
    fn _ended(
        &self,
        py: Python<'_>,
        exc: Option<&Bound<'_, PyAny>>,
        cancelled: bool,
    ) -> PyResult<Option<f64>> {
        let token = self.registry.shutdown();
        if cancelled || self.aborted.load(Ordering::Relaxed) {
            self.sup.lock().ended(End::Cancelled, None);
            return Ok(None);
        }
        let decision = match exc {
            Some(e)
                if e.is_instance_of::<PyKeyboardInterrupt>()
                    || e.is_instance_of::<PySystemExit>() =>
            {
                let msg = format!(
                    "task {} ({}) raised {}; not restarted",
                    self.quoted_name(py),
                    self.kind.name(),
                    type_name(e)
                );
                let _ = log_task(py, Level::Error, &msg, Some(e));
                if let Some(reason) = failure_reason(e, &self.quoted_name(py), self.critical) {
                    token.cancel(reason);
                }
                self.sup.lock().ended(End::Cancelled, None);
                return Ok(None);
            }
            Some(e) => {
                let text = describe_exception(e);
                self.sup.lock().ended(End::Failed, Some(&text))
            }
            None => self.sup.lock().ended(End::Returned, None),
        };
        if let Some(log) = &decision.log {
            let _ = log_task(py, log.level, &log.text, exc.filter(|_| log.traceback));
        }
        if let Some(reason) = decision.fatal {
            token.cancel(ShutdownReason::Fatal(reason));
        }
        Ok(match decision.step {
            Step::Restart { delay, .. } => Some(delay.as_secs_f64()),
            Step::Stop(_) => None,
        })
    }

    /// Internal: the done callback of the handle's own asyncio task; removes
    /// the entry from the registry, counted by how the task stopped (its
    /// failures were logged by `_ended`). Reported once; any other caller
    /// gets a TypeError.
    fn __call__(&self, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let Ok(_inside) = exit::enter() else {
            return Ok(());
        };
        let py = task.py();
        if !self.foreign.get().is_some_and(|f| f.task.bind(py).is(task)) {
            return Err(PyTypeError::new_err(
                "SupervisedHandle: only its own asyncio task calls it (as its done callback)",
            ));
        }
        let exception = task.call_method0(pyo3::intern!(py, "exception"));
        let Some(outcome) = outcome_of(py, &exception) else {
            // Not done: called early, not by the loop. Nothing to report.
            return exception.map(drop);
        };
        // Relaxed: a read-modify-write on one location; exactly one caller
        // reads `false` (see `TaskHandle.__call__`).
        if self.reported.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.registry.finish_foreign(self.id, outcome);
        // The factory may reference this handle: let the cycle go.
        let factory = self.factory.lock().take();
        drop(factory);
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let finished = self.foreign.get().map_or(Ok(false), |f| {
            f.task
                .bind(py)
                .call_method0(pyo3::intern!(py, "done"))?
                .is_truthy()
        })?;
        Ok(format!(
            "<SupervisedHandle {:?} {} restarts={} finished={}>",
            self.name.bind(py).to_str()?,
            self.kind.name(),
            self.restarts(),
            finished
        ))
    }
}

/// `TaskRegistry.supervise(name, kind, factory, *, policy=RestartPolicy())`
/// (see the module docs).
pub(crate) fn supervise<'py>(
    slf: &Bound<'py, PyTaskRegistry>,
    name: &Bound<'py, PyAny>,
    kind: &Bound<'py, PyAny>,
    factory: &Bound<'py, PyAny>,
    policy: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PySupervisedHandle>> {
    let _inside = exit::enter()?;
    let py = slf.py();
    let registry = slf.get();
    let core = registry.core()?;
    let (name_str, name_text) = text_arg(name, FUNC, "name")?;
    let kind = PyTaskKind::from_arg(kind, FUNC, "kind")?;
    if !factory.is_callable() {
        let hint = if iscoroutine(py)?.call1((factory,))?.is_truthy()? {
            // Not ours to close: the caller may still await it.
            " (pass the async function itself, or a lambda that calls it: a coroutine can \
             run once, a supervised task needs a new one for each restart)"
        } else {
            ""
        };
        return Err(wrong_type(
            factory,
            FUNC,
            "factory",
            &format!("a callable that returns a new coroutine{hint}"),
        ));
    }
    let policy = match policy {
        None => PyRestartPolicy::default(),
        Some(p) => p
            .cast::<PyRestartPolicy>()
            .map_err(|_| wrong_type(p, FUNC, "policy", "a dig_service.RestartPolicy"))?
            .get()
            .clone(),
    };
    if core.is_closed() {
        return Err(errors::service_err(py, &ServiceError::AlreadyStopped));
    }
    let event_loop = running_loop(py, FUNC)?;
    let foreign = Arc::new(LateForeign::default());
    let kind_core = kind;
    let (id, sup) = core
        .supervise_foreign(
            name_text.into(),
            kind_core,
            policy.core.clone(),
            foreign.clone(),
        )
        .map_err(|e| errors::service_err(py, &e))?;
    // Tracked: from here on a failure removes the entry again.
    let made = (|| {
        let handle = Bound::new(
            py,
            PySupervisedHandle {
                name: name_str.clone().unbind(),
                kind: kind.into(),
                factory: Mutex::new(Some(factory.clone().unbind())),
                registry: core.clone(),
                id,
                critical: policy.core.critical,
                sup: Mutex::new(sup),
                foreign: foreign.clone(),
                aborted: AtomicBool::new(false),
                reported: AtomicBool::new(false),
            },
        )?;
        let coro = aio::supervise(py)?.call1((&handle, registry.shutdown_py(py)))?;
        let refuse = |err: PyErr| {
            let _ = coro.call_method0(pyo3::intern!(py, "close"));
            err
        };
        let (task, may_have_run) = create_task(&event_loop, &coro, name_str, refuse)?;
        Ok::<_, PyErr>((handle, task, may_have_run))
    })();
    let (handle, task, may_have_run) = match made {
        Ok(made) => made,
        Err(e) => {
            core.finish_foreign(id, TaskOutcome::Cancelled);
            return Err(e);
        }
    };
    *foreign.task.lock() = Some(Arc::new(PyForeign::new(
        task.clone().unbind(),
        event_loop.clone().unbind(),
        thread::current().id(),
    )));
    // Relaxed: see `LateForeign::cancel` (both under the GIL).
    if foreign.cancel_requested.load(Ordering::Relaxed) {
        cancel_on_loop(py, &event_loop, thread::current().id(), &task);
    }
    if may_have_run && task.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
        // An eager task factory ran it to its end inside `create_task`.
        handle.get().__call__(&task)?;
    } else if let Err(e) = task.call_method1(pyo3::intern!(py, "add_done_callback"), (&handle,)) {
        let _ = task.call_method0(pyo3::intern!(py, "cancel"));
        core.finish_foreign(id, TaskOutcome::Cancelled);
        return Err(e);
    }
    Ok(handle)
}
