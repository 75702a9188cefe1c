//! Cached Python objects and the argument checks shared by the bindings.
//!
//! Every check raises an exception that names the function and the
//! parameter, and says what was given.

use std::sync::Mutex;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyInt, PyString, PyTuple, PyType};

use crate::error::ServiceError;

macro_rules! cached {
    ($fn_name:ident, $module:literal, $attr:literal) => {
        pub(crate) fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
            static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            CELL.get_or_try_init(py, || {
                Ok::<_, PyErr>(py.import($module)?.getattr($attr)?.unbind())
            })
            .map(|o| o.bind(py))
        }
    };
}

cached!(get_running_loop, "asyncio", "get_running_loop");
cached!(iscoroutine, "asyncio", "iscoroutine");
cached!(coroutine_type, "types", "CoroutineType");
cached!(task_type, "asyncio.tasks", "Task");
cached!(base_event_loop, "asyncio.base_events", "BaseEventLoop");
cached!(timedelta_type, "datetime", "timedelta");
cached!(aio_wait_cancelled, "dig_service._aio", "wait_cancelled");
cached!(aio_wake_all, "dig_service._aio", "wake_all");
cached!(aio_resolve, "dig_service._aio", "resolve");
cached!(aio_join_all, "dig_service._aio", "join_all");
cached!(aio_cancel_all, "dig_service._aio", "cancel_all");
cached!(err_already_stopped, "dig_service._errors", "AlreadyStopped");
cached!(
    err_deadline_exceeded,
    "dig_service._errors",
    "ShutdownDeadlineExceeded"
);
cached!(get_logger, "logging", "getLogger");
cached!(monotonic, "time", "monotonic");

/// The running event loop, or a `RuntimeError` saying who needed one.
///
/// The same answer as `asyncio.get_running_loop()`, which on CPython 3.11
/// makes a `getpid()` system call every time (0.5-1 µs, SPEC P1); see
/// [`RunningLoopMemo`] for how that call is skipped, soundly.
pub(crate) fn running_loop<'py>(py: Python<'py>, who: &str) -> PyResult<Bound<'py, PyAny>> {
    let memo = RunningLoopMemo::enabled(py);
    if memo {
        if let Some(event_loop) = RunningLoopMemo::recall(py) {
            return Ok(event_loop);
        }
    }
    let event_loop = get_running_loop(py)?.call0().map_err(|_| {
        PyRuntimeError::new_err(format!(
            "{who} needs a running asyncio event loop: call it from a coroutine \
             (inside asyncio.run(...) or dig_service.run(...))"
        ))
    })?;
    if memo {
        RunningLoopMemo::remember(&event_loop);
    }
    Ok(event_loop)
}

/// The running loop of a thread state, remembered in that thread state's
/// dict next to CPython 3.11's own record of it.
///
/// CPython 3.11's C `_asyncio` keeps a thread's running loop in the thread
/// state dict, under `__asyncio_running_event_loop__`, as a *holder* object
/// with the loop and the pid that set it. Every `_set_running_loop()` call
/// (a loop starting or stopping, in this thread, or any manual call)
/// stores a new holder, and a holder never changes. `get_running_loop()`
/// returns the holder's loop if the holder's pid is `getpid()`, which is
/// only false in a process forked from the one that set it.
///
/// So after `get_running_loop()` returned a loop, and for as long as the
/// thread state's holder is the same object and no fork happened (the fork
/// generation of [`super::fork`], advanced in the child by the
/// `os.register_at_fork` hook, which also runs for C code that forks and
/// calls `PyOS_AfterFork_Child`), `get_running_loop()` would return the
/// same loop: this memo returns it instead. It keeps the holder alive, so
/// the holder's identity cannot be reused by a later one. A stopped loop,
/// another loop run later in the same thread, another thread (another
/// thread state, another dict) or a forked child all fail the check and
/// take the `get_running_loop()` path, with today's answer or error.
///
/// Used only on CPython 3.11 with the C `_asyncio` module behind
/// `asyncio.get_running_loop` (3.12 dropped the `getpid()` call and the
/// holder); elsewhere `running_loop` always asks `get_running_loop()`.
#[pyclass(module = "dig_service._core", frozen)]
struct RunningLoopMemo {
    holder: Py<PyAny>,
    event_loop: Py<PyAny>,
    generation: u64,
}

/// The key of CPython 3.11's holder in the thread state dict.
const HOLDER_KEY: &str = "__asyncio_running_event_loop__";
/// The memo's key in the thread state dict.
const MEMO_KEY: &str = "dig_service._core.running_loop";

impl RunningLoopMemo {
    fn enabled(py: Python<'_>) -> bool {
        static ENABLED: PyOnceLock<bool> = PyOnceLock::new();
        *ENABLED.get_or_init(py, || {
            let check = || -> PyResult<bool> {
                let version = py.version_info();
                if (version.major, version.minor) != (3, 11) {
                    return Ok(false);
                }
                let c_impl = py.import("_asyncio")?;
                Ok(get_running_loop(py)?.is(c_impl.getattr("get_running_loop")?))
            };
            check().unwrap_or(false)
        })
    }

    /// This thread state's dict (borrowed from the thread state).
    fn thread_state_dict(py: Python<'_>) -> Option<Bound<'_, PyDict>> {
        // SAFETY: attached to the interpreter (we hold `py`); the result is
        // a borrowed reference to the current thread state's dict, or NULL
        // (no error set) if there is none.
        let dict = unsafe { Bound::from_borrowed_ptr_or_opt(py, ffi::PyThreadState_GetDict()) }?;
        dict.cast_into::<PyDict>().ok()
    }

    fn recall(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
        let dict = Self::thread_state_dict(py)?;
        let memo = dict.get_item(pyo3::intern!(py, MEMO_KEY)).ok()??;
        let memo = memo.cast_into::<Self>().ok()?;
        let memo = memo.get();
        let holder = dict.get_item(pyo3::intern!(py, HOLDER_KEY)).ok()??;
        (holder.is(&memo.holder) && memo.generation == super::fork::generation())
            .then(|| memo.event_loop.bind(py).clone())
    }

    /// Remember `event_loop`, just returned by `get_running_loop()` (no
    /// Python code ran since: the holder read here is the one it read).
    fn remember(event_loop: &Bound<'_, PyAny>) {
        let py = event_loop.py();
        let Some(dict) = Self::thread_state_dict(py) else {
            return;
        };
        let Ok(Some(holder)) = dict.get_item(pyo3::intern!(py, HOLDER_KEY)) else {
            return;
        };
        let memo = Self {
            holder: holder.unbind(),
            event_loop: event_loop.clone().unbind(),
            generation: super::fork::generation(),
        };
        if let Ok(memo) = Bound::new(py, memo) {
            let _ = dict.set_item(pyo3::intern!(py, MEMO_KEY), memo);
        }
    }
}

/// How `TaskRegistry.spawn` makes the asyncio task on one type of event loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskCreation {
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
pub(crate) fn task_creation(event_loop: &Bound<'_, PyAny>) -> PyResult<TaskCreation> {
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

/// A name in Python's words for error messages: `int`, `function`, ...
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<unknown>".to_owned())
}

/// A `str` argument.
pub(crate) fn str_arg<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    func: &str,
    param: &str,
) -> PyResult<&'a Bound<'py, PyString>> {
    obj.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{func}: `{param}` must be str, got {}",
            type_name(obj)
        ))
    })
}

/// A `str` argument that is valid Unicode text (no lone surrogates, so it
/// has a UTF-8 form): the object and its text.
pub(crate) fn text_arg<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    func: &str,
    param: &str,
) -> PyResult<(&'a Bound<'py, PyString>, &'a str)> {
    let s = str_arg(obj, func, param)?;
    let text = s.to_str().map_err(|cause| {
        let err = PyValueError::new_err(format!(
            "{func}: `{param}` must be valid Unicode text, got a str with a lone surrogate \
             (not encodable as UTF-8): {}",
            s.repr().map(|r| r.to_string()).unwrap_or_default()
        ));
        err.set_cause(s.py(), Some(cause));
        err
    })?;
    Ok((s, text))
}

/// A duration in seconds: int, float or `datetime.timedelta`; finite and >= 0.
///
/// An int too large for a float is refused like infinity (a `ValueError`
/// naming the parameter): there is no "no limit" spelling of a duration.
pub(crate) fn seconds_arg(obj: &Bound<'_, PyAny>, func: &str, param: &str) -> PyResult<f64> {
    let py = obj.py();
    let secs = if obj.is_instance_of::<PyFloat>()
        || (obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<pyo3::types::PyBool>())
    {
        obj.extract::<f64>().map_err(|cause| {
            let err = PyValueError::new_err(format!(
                "{func}: `{param}` must be a finite number of seconds >= 0, \
                 got an int too large for a float"
            ));
            err.set_cause(py, Some(cause));
            err
        })?
    } else if obj.is_instance(timedelta_type(py)?)? {
        obj.call_method0(pyo3::intern!(py, "total_seconds"))?
            .extract::<f64>()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "{func}: `{param}` must be a number of seconds (int or float) or a datetime.timedelta, got {}",
            type_name(obj)
        )));
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{func}: `{param}` must be a finite number of seconds >= 0, got {secs}"
        )));
    }
    Ok(secs)
}

/// `Duration` from already-checked seconds (saturating for huge values).
pub(crate) fn duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// Translate a core error into the Python exception of the same name.
pub(crate) fn service_err(py: Python<'_>, err: &ServiceError) -> PyErr {
    let built = match err {
        ServiceError::AlreadyStopped => {
            err_already_stopped(py).and_then(|cls| cls.call1((err.to_string(),)))
        }
        ServiceError::ShutdownDeadlineExceeded {
            deadline,
            pending,
            pending_names,
        } => err_deadline_exceeded(py)
            .and_then(|cls| cls.call1((deadline.as_secs_f64(), *pending, pending_names.clone()))),
        other => Err(PyRuntimeError::new_err(other.to_string())),
    };
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// Converts core `Instant`s to `time.monotonic()` seconds.
///
/// Both are CLOCK_MONOTONIC on Linux; the offset is measured once.
pub(crate) fn monotonic_of(py: Python<'_>, at: Instant) -> PyResult<f64> {
    static BASE: PyOnceLock<(Instant, f64)> = PyOnceLock::new();
    let (base_instant, base_secs) = BASE.get_or_try_init(py, || {
        let now = Instant::now();
        let secs = monotonic(py)?.call0()?.extract::<f64>()?;
        Ok::<_, PyErr>((now, secs))
    })?;
    Ok(if at >= *base_instant {
        base_secs + (at - *base_instant).as_secs_f64()
    } else {
        base_secs - (*base_instant - at).as_secs_f64()
    })
}

/// Call `callable(*args)` on `event_loop`, whose thread is `loop_thread`:
/// directly when that is this thread, else through one
/// `call_soon_threadsafe`. A closed loop refuses the call with
/// RuntimeError; whatever the call was for (its tasks, its waiters) is gone
/// with the loop, so the refusal is dropped.
pub(crate) fn call_on_loop<'py>(
    event_loop: &Bound<'py, PyAny>,
    loop_thread: ThreadId,
    callable: &Bound<'py, PyAny>,
    args: &[Bound<'py, PyAny>],
) {
    let py = event_loop.py();
    let _ = if thread::current().id() == loop_thread {
        PyTuple::new(py, args).and_then(|args| callable.call1(args))
    } else {
        PyTuple::new(
            py,
            std::iter::once(callable).chain(args).collect::<Vec<_>>(),
        )
        .and_then(|args| event_loop.call_method1(pyo3::intern!(py, "call_soon_threadsafe"), args))
    };
}

fn tasks_logger(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    get_logger(py)?.call1(("dig_service.tasks",))
}

/// Log `msg` with `exc`'s traceback on the `dig_service.tasks` logger.
pub(crate) fn log_task_exception(
    py: Python<'_>,
    msg: &str,
    exc: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("exc_info", exc)?;
    tasks_logger(py)?.call_method("error", PyTuple::new(py, ["%s", msg])?, Some(&kwargs))?;
    Ok(())
}

/// Log `msg` as a warning on the `dig_service.tasks` logger.
pub(crate) fn log_task_warning(py: Python<'_>, msg: &str) -> PyResult<()> {
    tasks_logger(py)?.call_method1("warning", ("%s", msg))?;
    Ok(())
}
