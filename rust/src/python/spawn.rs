//! `TaskRegistry.spawn` for Python: the hot path of SPEC P1.
//!
//! A Python spawn is one crossing in (checks, the asyncio task, one
//! registry insert) and one crossing out: its loop's young sweep notices
//! the end of a short-lived task (`young.rs`), a done callback that of a
//! long-lived one (`handle.rs`). Measured to the instruction (`bench/instructions.py p1.registry`):
//! the coroutine's state is asked only when something else holds it, the
//! running loop comes from a memo (`running_loop.rs`), and the task is
//! built directly where the loop's `create_task` is known to do just that.
//!
//! Guarantees:
//! - **Validated first.** Every argument is checked before the task is
//!   made: a spawn that raises has scheduled nothing.
//! - **Nothing never-awaited.** A refused coroutine is closed (no "never
//!   awaited" warning), unless it is someone else's (running, or started
//!   and suspended in an `await`), which is left alone.
//! - **Nothing half-registered.** Once the task exists, a failure cancels it
//!   before its first step and removes it from the registry.
//! - **The loop's own semantics.** A task factory, an overriding
//!   `create_task` or an eager factory is honoured as `loop.create_task`
//!   would honour it; an eagerly finished task is reported at once.

use std::sync::{Arc, Mutex};
use std::thread;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyString, PyType};

use super::errors;
use super::exit;
use super::foreign::PyForeign;
use super::handle::PyTaskHandle;
use super::interop::{
    base_event_loop, copy_context, coroutine_type, iscoroutine, not_a_bool, task_type, text_arg,
    type_name, wrong_type,
};
use super::kinds::PyTaskKind;
use super::registry::PyTaskRegistry;
use super::running_loop::running_loop;
use crate::error::ServiceError;
use crate::tasks::TaskOutcome;

/// `TaskRegistry.spawn(name, kind, coro, *, critical=False)`: schedule
/// `coro` on the running loop and track it (see the module docs).
#[inline]
pub(crate) fn spawn<'py>(
    slf: &Bound<'py, PyTaskRegistry>,
    name: &Bound<'py, PyAny>,
    kind: &Bound<'py, PyAny>,
    coro: &Bound<'py, PyAny>,
    critical: Flag<'py>,
) -> PyResult<Bound<'py, PyTaskHandle>> {
    const FUNC: &str = "TaskRegistry.spawn()";
    let _inside = exit::enter()?;
    let py = slf.py();
    let core = slf.get().core()?;
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
        return Err(not_a_coroutine(coro, FUNC));
    }
    // From here on, every refusal closes the coroutine so that Python
    // does not warn that it was never awaited.
    let refuse = |err: PyErr| close_refused(coro, err);
    let (name_str, name_text) = text_arg(name, FUNC, "name").map_err(refuse)?;
    let kind = PyTaskKind::from_arg(kind, FUNC, "kind").map_err(refuse)?;
    let critical = match critical.0 {
        Ok(flag) => flag,
        Err(other) => return Err(refuse(not_a_bool(&other, FUNC, "critical"))),
    };
    if core.is_closed() {
        return Err(refuse(errors::service_err(
            py,
            &ServiceError::AlreadyStopped,
        )));
    }
    let event_loop = running_loop(py, FUNC).map_err(refuse)?;
    let (task, may_have_run, context) = create_task_in(&event_loop, coro, name_str, refuse, true)?;
    // The task exists: from here on a failure cancels it before its
    // first step (so its coroutine never runs) and leaves nothing live.
    let foreign = Arc::new(PyForeign::new(
        task.clone().unbind(),
        event_loop.clone().unbind(),
        thread::current().id(),
    ));
    let id = match core.track_foreign(name_text, kind, foreign.clone()) {
        Ok(id) => id,
        Err(e) => {
            // Closed by another thread between the check and now.
            let _ = task.call_method0(pyo3::intern!(py, "cancel"));
            return Err(errors::service_err(py, &e));
        }
    };
    let handle = Bound::new(
        py,
        PyTaskHandle::python(
            name_str.clone().unbind(),
            kind,
            foreign,
            core.clone(),
            id,
            critical,
            context,
        ),
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
                event_loop.call_method1(pyo3::intern!(py, "call_exception_handler"), (context,))?;
            }
        } else if !super::young::track(&event_loop, &task, &handle)? {
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

// The refusals of `spawn`, out of line: its hot path is the one that
// succeeds, and every line of code it touches is an instruction-cache line
// a spawn fetches (SPEC P1).

#[cold]
#[inline(never)]
fn not_a_coroutine(coro: &Bound<'_, PyAny>, func: &str) -> PyErr {
    let hint = if coro.is_callable() {
        " (call the async function: spawn(name, kind, work()), not spawn(name, kind, work))"
    } else {
        ""
    };
    wrong_type(coro, func, "coro", &format!("a coroutine object{hint}"))
}

/// Close a refused coroutine, so that Python does not warn that it was
/// never awaited, and hand `err` back.
#[cold]
#[inline(never)]
fn close_refused(coro: &Bound<'_, PyAny>, err: PyErr) -> PyErr {
    let _ = coro.call_method0(pyo3::intern!(coro.py(), "close"));
    err
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
pub(crate) fn create_task<'py>(
    event_loop: &Bound<'py, PyAny>,
    coro: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    refuse: impl Fn(PyErr) -> PyErr,
) -> PyResult<(Bound<'py, PyAny>, bool)> {
    create_task_in(event_loop, coro, name, refuse, false).map(|(task, ran, _)| (task, ran))
}

/// Where the context a task runs in can be found, so that its end can be
/// reported in it (`young.rs`), as a done callback added at its creation
/// would have run in it.
pub(crate) enum TaskContext {
    /// Made by `spawn` and given to the task (`asyncio.Task(...,
    /// context=)`): on CPython 3.11, where a task does not tell its own.
    Given(Py<PyAny>),
    /// The task's own, asked when needed (`Task.get_context()`, new in
    /// CPython 3.12): a stock `asyncio.Task` on CPython >= 3.12. No context
    /// is copied at spawn beyond the one the task makes for itself.
    OfTask,
    /// Not known: a task of another type, or a factory's task on 3.11.
    Unknown,
}

/// Whether this CPython has `Task.get_context()` (3.12 and later).
fn tasks_tell_their_context(py: Python<'_>) -> bool {
    static HAS: PyOnceLock<bool> = PyOnceLock::new();
    *HAS.get_or_init(py, || py.version_info() >= (3, 12))
}

/// [`create_task`], and, if `want_context`, where the task's context can
/// be found ([`TaskContext`]); `Unknown` if not `want_context`.
pub(crate) fn create_task_in<'py>(
    event_loop: &Bound<'py, PyAny>,
    coro: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    refuse: impl Fn(PyErr) -> PyErr,
    want_context: bool,
) -> PyResult<(Bound<'py, PyAny>, bool, TaskContext)> {
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
    let told = want_context && tasks_tell_their_context(py);
    let kwargs = PyDict::new(py);
    kwargs.set_item(pyo3::intern!(py, "name"), name)?;
    if direct {
        kwargs.set_item(pyo3::intern!(py, "loop"), event_loop)?;
        let context = if told {
            // The task copies the current context itself, as
            // `copy_context()` here would: it tells it when asked.
            TaskContext::OfTask
        } else if want_context {
            let context = copy_context(py)?.call0().map_err(&refuse)?;
            kwargs.set_item(pyo3::intern!(py, "context"), &context)?;
            TaskContext::Given(context.unbind())
        } else {
            TaskContext::Unknown
        };
        Ok((task_type(py)?.call((coro,), Some(&kwargs))?, false, context))
    } else {
        let task = event_loop
            .call_method(pyo3::intern!(py, "create_task"), (coro,), Some(&kwargs))
            .map_err(refuse)?;
        let context = if told && task.get_type().is(task_type(py)?) {
            TaskContext::OfTask
        } else {
            TaskContext::Unknown
        };
        Ok((task, true, context))
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
pub(crate) struct Flag<'py>(pub(crate) Result<bool, Bound<'py, PyAny>>);

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
    let Some(why) = coroutine_unusable(coro)? else {
        return Ok(());
    };
    Err(PyValueError::new_err(format!(
        "TaskRegistry.spawn(): `coro` {why}; got {}",
        coro.repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| type_name(coro))
    )))
}

/// Why a new task cannot own `coro` (see [`check_coroutine_state`]), or
/// `None` if it can.
pub(crate) fn coroutine_unusable(coro: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
    let py = coro.py();
    Ok(
        if coro.getattr(pyo3::intern!(py, "cr_running"))?.is_truthy()? {
            Some("is running (a coroutine cannot spawn itself)")
        } else if coro
            .getattr(pyo3::intern!(py, "cr_suspended"))?
            .is_truthy()?
        {
            Some(
            "was already started and is suspended in an `await` (it belongs to whoever started it)",
        )
        } else if coro.getattr(pyo3::intern!(py, "cr_frame"))?.is_none() {
            Some(
                "has already finished (it was awaited, or closed, before): pass a new coroutine, \
             spawn(name, kind, work())",
            )
        } else {
            None
        },
    )
}

/// How `TaskRegistry.spawn` makes the asyncio task on one type of event loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskCreation {
    /// The type uses asyncio's stock `BaseEventLoop.create_task` (and
    /// `_check_closed`): while `loop._task_factory is None` that method
    /// builds `asyncio.Task(coro, loop=loop, name=name)`, so `spawn` does
    /// the same itself.
    AsyncioStock,
    /// The type uses uvloop's stock `Loop.create_task` (and
    /// `get_task_factory`): while `loop.get_task_factory() is None` that
    /// method builds `asyncio.Task(coro, loop=loop)` and names it.
    UvloopStock,
    /// Anything else (a subclass that overrides `create_task`, another
    /// loop implementation): call `loop.create_task(coro, name=name)`.
    CreateTask,
}

/// How tasks are made on `event_loop`'s type; decided once per type.
fn task_creation(event_loop: &Bound<'_, PyAny>) -> PyResult<TaskCreation> {
    // The few loop types a process uses, each with a strong reference so a
    // type's address is never reused by another type while it is here.
    static SEEN: Mutex<Vec<(Py<PyType>, TaskCreation)>> = Mutex::new(Vec::new());
    let ty = event_loop.get_type();
    {
        let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, how)) = seen.iter().find(|(t, _)| t.is(&ty)) {
            return Ok(*how);
        }
    }
    // Decided with the lock released: the lookups run Python code.
    let how = classify_loop_type(&ty)?;
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|(t, _)| t.is(&ty)) {
        seen.push((ty.unbind(), how));
    }
    Ok(how)
}

fn classify_loop_type(ty: &Bound<'_, PyType>) -> PyResult<TaskCreation> {
    let py = ty.py();
    let inherits = |class: &Bound<'_, PyAny>, attrs: &[&str]| -> PyResult<bool> {
        for attr in attrs {
            match ty.getattr(*attr) {
                Ok(own) if own.is(class.getattr(*attr)?) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    };
    if inherits(base_event_loop(py)?, &["create_task", "_check_closed"])? {
        return Ok(TaskCreation::AsyncioStock);
    }
    // A uvloop loop means uvloop is imported; never import it here.
    let modules = py.import("sys")?.getattr("modules")?;
    if let Ok(uvloop) = modules.get_item("uvloop.loop") {
        if inherits(
            &uvloop.getattr("Loop")?,
            &["create_task", "get_task_factory"],
        )? {
            return Ok(TaskCreation::UvloopStock);
        }
    }
    Ok(TaskCreation::CreateTask)
}
