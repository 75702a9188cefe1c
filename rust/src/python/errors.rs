//! The `ServiceError` family of `dig_service._core`, and the translation of
//! core errors into it.
//!
//! The classes are written in Python (`errors.py`, beside this file:
//! exceptions with docstrings, a custom `__init__` and pickling are plain
//! Python classes, and an abi3 extension cannot subclass `Exception` from
//! Rust before CPython 3.12) and compiled into the native module, as
//! pydantic-core defines `ValidationError` in its own: `_core` exports them,
//! raises them, and imports nothing from the `dig_service` package, which
//! re-exports them (`dig_service._errors`).
//!
//! Guarantees:
//! - **One set of classes per process.** `errors.py` runs once (the first
//!   of module init or a first error, whichever comes first); every error
//!   `_core` raises is an instance of the classes `_core` exports.
//! - **Typed errors cross intact.** `AlreadyStopped` and
//!   `ShutdownDeadlineExceeded` (with `deadline`, `pending`,
//!   `pending_names`) reach Python as those classes; any other core error
//!   is a `RuntimeError` with its message (none is raised to Python today).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};

use super::interop::run_source;
use crate::error::ServiceError;

/// The names `errors.py` defines, as `_core` exports them.
const NAMES: [&str; 8] = [
    "ServiceError",
    "PreStartFailed",
    "OnStartFailed",
    "RunFailed",
    "OnStopFailed",
    "AlreadyRunning",
    "AlreadyStopped",
    "ShutdownDeadlineExceeded",
];

/// The namespace `errors.py` ran in.
fn classes(py: Python<'_>) -> PyResult<&Bound<'_, PyDict>> {
    static NAMESPACE: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    NAMESPACE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(run_source(py, "errors.py", include_str!("errors.py"))?.unbind())
        })
        .map(|ns| ns.bind(py))
}

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    classes(py)?
        .get_item(name)?
        .ok_or_else(|| PyRuntimeError::new_err(format!("errors.py defines no {name}")))
}

/// Add the classes to the module `m`.
pub(crate) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for name in NAMES {
        m.add(name, class(m.py(), name)?)?;
    }
    Ok(())
}

/// `ShutdownDeadlineExceeded(deadline, pending, names)`.
pub(crate) fn deadline_exceeded(
    py: Python<'_>,
    deadline: f64,
    pending: usize,
    names: Vec<String>,
) -> PyErr {
    build(py, "ShutdownDeadlineExceeded", |cls| {
        cls.call1((deadline, pending, PyList::new(py, names)?))
    })
}

/// Translate a core error into the Python exception of the same name.
pub(crate) fn service_err(py: Python<'_>, err: &ServiceError) -> PyErr {
    match err {
        ServiceError::AlreadyStopped => {
            build(py, "AlreadyStopped", |cls| cls.call1((err.to_string(),)))
        }
        ServiceError::ShutdownDeadlineExceeded {
            deadline,
            pending,
            pending_names,
            ..
        } => deadline_exceeded(py, deadline.as_secs_f64(), *pending, pending_names.clone()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The exception `make` builds from the class `name`, or the error that
/// building it raised.
fn build<'py>(
    py: Python<'py>,
    name: &str,
    make: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>>,
) -> PyErr {
    match class(py, name).and_then(|cls| make(&cls)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}
