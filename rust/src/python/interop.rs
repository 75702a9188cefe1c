//! What the bindings share when they talk to Python: cached standard-library
//! objects, argument checks, clocks, calls onto an event loop, the task
//! logger, and running Python source that the native module carries.
//!
//! Guarantees:
//! - **Standard library only.** Every object cached here comes from the
//!   standard library (`asyncio`, `types`, `datetime`, `logging`, `time`):
//!   nothing here imports the `dig_service` package, so `_core` imports
//!   alone (the Python package imports `_core`, never the other way round).
//! - **Checks name their parameter.** Every argument check raises an
//!   exception that names the function and the parameter, and says what was
//!   given.
//! - **No lock held across Python code.** Nothing here holds a Rust lock
//!   while it calls into Python.

use std::ffi::CString;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::code::PyCodeInput;
use pyo3::types::{PyCode, PyCodeMethods, PyDict, PyFloat, PyInt, PyString, PyTuple};

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
cached!(copy_context, "contextvars", "copy_context");
cached!(base_event_loop, "asyncio.base_events", "BaseEventLoop");
cached!(timedelta_type, "datetime", "timedelta");
cached!(get_logger, "logging", "getLogger");
cached!(monotonic, "time", "monotonic");

/// Run `source`, Python source that the native module carries (its errors,
/// its asyncio glue), in a fresh namespace whose `__name__` is
/// `dig_service._core`, and return that namespace.
///
/// What the source defines belongs to `_core` (a class's `__module__` is
/// `dig_service._core`, so `pickle` finds a class that `_core` exports).
/// The source is registered with `linecache` under `<dig_service._core:FILE>`,
/// so tracebacks through it show its lines. It may import the standard
/// library only.
pub(crate) fn run_source<'py>(
    py: Python<'py>,
    file: &str,
    source: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let filename = format!("<dig_service._core:{file}>");
    let to_c = |text: &str| {
        CString::new(text).map_err(|_| PyValueError::new_err(format!("{file} holds a NUL byte")))
    };
    let code = PyCode::compile(py, &to_c(source)?, &to_c(&filename)?, PyCodeInput::File)?;
    let namespace = PyDict::new(py);
    namespace.set_item("__name__", "dig_service._core")?;
    namespace.set_item("__file__", &filename)?;
    code.run(Some(&namespace), None)?;
    // linecache entries with no mtime are never checked against a file.
    let lines: Vec<&str> = source.split_inclusive('\n').collect();
    let entry = (source.len(), py.None(), lines, &filename);
    py.import("linecache")?
        .getattr("cache")?
        .set_item(&filename, entry)?;
    Ok(namespace)
}

/// A name in Python's words for error messages: `int`, `function`, ...
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<unknown>".to_owned())
}

/// A `str` argument.
#[inline]
pub(crate) fn str_arg<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    func: &str,
    param: &str,
) -> PyResult<&'a Bound<'py, PyString>> {
    match obj.cast::<PyString>() {
        Ok(s) => Ok(s),
        Err(_) => Err(wrong_type(obj, func, param, "str")),
    }
}

/// The `TypeError` for a `param` of `func` that must be `expected` and is
/// `obj`: "FUNC: `PARAM` must be EXPECTED, got TYPE". Out of line, for the
/// argument checks on hot paths (SPEC P1): a refusal is the cold branch.
#[cold]
#[inline(never)]
pub(crate) fn wrong_type(obj: &Bound<'_, PyAny>, func: &str, param: &str, expected: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{func}: `{param}` must be {expected}, got {}",
        type_name(obj)
    ))
}

/// The `TypeError` for a `param` of `func` that must be a bool and is not.
pub(crate) fn not_a_bool(obj: &Bound<'_, PyAny>, func: &str, param: &str) -> PyErr {
    wrong_type(obj, func, param, "bool (True or False)")
}

/// A `str` argument that is valid Unicode text (no lone surrogates, so it
/// has a UTF-8 form): the object and its text.
#[inline]
pub(crate) fn text_arg<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    func: &str,
    param: &str,
) -> PyResult<(&'a Bound<'py, PyString>, &'a str)> {
    let s = str_arg(obj, func, param)?;
    match s.to_str() {
        Ok(text) => Ok((s, text)),
        Err(cause) => Err(not_text(s, cause, func, param)),
    }
}

#[cold]
#[inline(never)]
fn not_text(s: &Bound<'_, PyString>, cause: PyErr, func: &str, param: &str) -> PyErr {
    let err = PyValueError::new_err(format!(
        "{func}: `{param}` must be valid Unicode text, got a str with a lone surrogate \
         (not encodable as UTF-8): {}",
        s.repr().map(|r| r.to_string()).unwrap_or_default()
    ));
    err.set_cause(s.py(), Some(cause));
    err
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

/// Log `msg` at `level` on the `dig_service.tasks` logger, with `exc`'s
/// traceback when one is given.
pub(crate) fn log_task(
    py: Python<'_>,
    level: crate::tasks::Level,
    msg: &str,
    exc: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    use crate::tasks::Level;
    let method = match level {
        Level::Info => pyo3::intern!(py, "info"),
        Level::Warn => pyo3::intern!(py, "warning"),
        Level::Error => pyo3::intern!(py, "error"),
    };
    let kwargs = match exc {
        Some(exc) => {
            let kwargs = PyDict::new(py);
            kwargs.set_item("exc_info", exc)?;
            Some(kwargs)
        }
        None => None,
    };
    tasks_logger(py)?.call_method(method, PyTuple::new(py, ["%s", msg])?, kwargs.as_ref())?;
    Ok(())
}

/// Log `msg` as a warning on the `dig_service.tasks` logger.
pub(crate) fn log_task_warning(py: Python<'_>, msg: &str) -> PyResult<()> {
    tasks_logger(py)?.call_method1("warning", ("%s", msg))?;
    Ok(())
}
