//! The asyncio glue of `dig_service._core`: the coroutines behind
//! `ShutdownToken.cancelled()` and `TaskRegistry.join_all()`, and the
//! callbacks the core posts to an event loop.
//!
//! They are written in Python (`aio.py`, beside this file) because two of
//! them must be real coroutines (users hand `token.cancelled()` to
//! `asyncio.create_task`) and the others do what asyncio does fastest
//! itself (set many futures' results in one loop turn). The source is
//! compiled into the native module on first use; it imports `asyncio` only,
//! so `_core` never imports the `dig_service` package.
//!
//! Guarantees:
//! - **One copy per process.** `aio.py` runs once; every wake-up and every
//!   join uses the same function objects.
//! - **Private to `_core`.** No `_core` attribute names these functions
//!   but `format_task_stack`, which is `_core._format_task_stack` (the
//!   package's shutdown report formats its stragglers' stacks with it, and
//!   the core's foreign tasks with it too, for a Rust `Service`'s report);
//!   what they call back into (`ShutdownToken._park`,
//!   `TaskRegistry._try_close`, `TaskRegistry._stop_stragglers`) is in
//!   `_core.pyi` like every other `_core` name.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use super::interop::run_source;

/// The namespace `aio.py` ran in.
fn namespace(py: Python<'_>) -> PyResult<&Bound<'_, PyDict>> {
    static NAMESPACE: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    NAMESPACE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(run_source(py, "aio.py", include_str!("aio.py"))?.unbind())
        })
        .map(|ns| ns.bind(py))
}

macro_rules! glue {
    ($(#[$doc:meta])* $fn_name:ident) => {
        $(#[$doc])*
        pub(crate) fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
            static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            CELL.get_or_try_init(py, || {
                namespace(py)?
                    .get_item(stringify!($fn_name))?
                    .map(Bound::unbind)
                    .ok_or_else(|| {
                        PyRuntimeError::new_err(concat!("aio.py defines no ", stringify!($fn_name)))
                    })
            })
            .map(|f| f.bind(py))
        }
    };
}

glue!(
    /// `wait_cancelled(token)`: the coroutine `ShutdownToken.cancelled()` returns.
    wait_cancelled
);
glue!(
    /// `wake_all(futures)`: resolve a loop's parked waiters, in one call.
    wake_all
);
glue!(
    /// `cancel_all(tasks)`: cancel a loop's stragglers, in one call.
    cancel_all
);
glue!(
    /// `resolve(future)`: set a future's result unless it is done.
    resolve
);
glue!(
    /// `settle(future, value, error)`: settle a future with a native future's
    /// outcome unless it is done.
    settle
);
glue!(
    /// `join_all(registry, deadline)`: the coroutine `TaskRegistry.join_all()` returns.
    join_all
);
glue!(
    /// `supervise(handle, token)`: the coroutine of a supervised task.
    supervise
);
glue!(
    /// `format_task_stack(task)`: where an asyncio task is suspended, as text.
    format_task_stack
);

/// `_format_task_stack(task)`: where the asyncio task `task` is suspended, as
/// text, one `File "...", line N, in f` entry a frame down its `await`s
/// (the stacks of a shutdown report's Python stragglers).
#[pyfunction]
pub(crate) fn _format_task_stack(task: &Bound<'_, PyAny>) -> PyResult<String> {
    format_task_stack(task.py())?.call1((task,))?.extract()
}
