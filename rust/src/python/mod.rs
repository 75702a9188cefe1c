//! The PyO3 bindings: the native module `dig_service._core`.
//!
//! The boundary runs one way: the Python package imports `_core`; `_core`
//! imports nothing from the package. What `_core` raises ([`errors`], the
//! `ServiceError` family) and the asyncio glue it needs ([`aio`]) are
//! Python source compiled into the module itself, and every name the module
//! has is in `python/dig_service/_core.pyi` (checked by `mypy.stubtest`).
//!
//! One concept per module:
//!
//! | module | concept |
//! |---|---|
//! | [`kinds`] | `TaskKind`, `ShutdownReason` |
//! | [`token`] | `ShutdownToken`, with per-loop batched wake-ups |
//! | [`registry`] | `TaskRegistry`, `TaskSummary`, `TaskStats` |
//! | [`spawn`] | `TaskRegistry.spawn`, the P1 hot path |
//! | [`handle`] | `TaskHandle` and the report of a Python task's end |
//! | [`young`] | short-lived tasks' ends noticed by one sweep a loop turn |
//! | [`foreign`] | asyncio tasks as the core's foreign tasks; batched stops |
//! | [`running_loop`] | the running event loop, memoised soundly on 3.11 |
//! | [`errors`] | the `ServiceError` family (`errors.py`) and core errors → Python |
//! | [`aio`] | the asyncio glue coroutines and callbacks (`aio.py`) |
//! | [`native`] | native tokio tasks spawned from Python |
//! | [`runtime`] | the tokio runtime: lazy, fork-safe, shut down once at exit |
//! | [`bridge`] | a Rust future as an asyncio awaitable |
//! | [`release`] | Python references released attached, never deferred (fork-safe) |
//! | [`pyfuture`] | a Python coroutine awaited from Rust, cancelled when Rust gives up |
//! | [`logbridge`] | Rust `tracing` → Python `logging` |
//! | [`watchdog`] | a native thread that notices a stalled event loop |
//! | [`fork`] | `os.fork()`: a child never hangs on its parent's locks |
//! | [`exit`] | interpreter exit never aborts with threads still running |
//! | [`interop`] | what they share: stdlib objects, argument checks, clocks |
//!
//! The modules are private: the links resolve in
//! `cargo doc --document-private-items`, the view for whoever works on them.

#![allow(rustdoc::private_intra_doc_links)]

mod aio;
mod bridge;
mod errors;
mod exit;
mod foreign;
mod fork;
mod handle;
mod interop;
mod kinds;
mod logbridge;
mod native;
mod policy;
mod pyfuture;
mod registry;
mod release;
mod running_loop;
mod runtime;
mod spawn;
mod supervise;
mod token;
mod watchdog;
mod young;

use pyo3::prelude::*;

pub(crate) use exit::attach_unless_exiting;
pub use kinds::{FatalMessage, PyShutdownReason, PyTaskKind};
pub use pyfuture::{run_coroutine, PyCoroutineFuture};
pub use registry::PyTaskRegistry;
pub use token::PyShutdownToken;

/// `dig_service._core`: the Rust core of dig_service.
#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logbridge::install();
    errors::add_to(m)?;
    m.add_class::<kinds::PyTaskKind>()?;
    m.add_class::<kinds::PyShutdownReason>()?;
    m.add_class::<token::PyShutdownToken>()?;
    m.add_class::<registry::PyTaskRegistry>()?;
    m.add_class::<handle::PyTaskHandle>()?;
    m.add_class::<registry::PyTaskSummary>()?;
    m.add_class::<registry::PyTaskStats>()?;
    m.add_class::<registry::PyKindStats>()?;
    m.add_class::<policy::PyRestart>()?;
    m.add_class::<policy::PyRestartPolicy>()?;
    m.add_class::<supervise::PySupervisedHandle>()?;
    m.add_class::<watchdog::PyLoopWatchdog>()?;
    m.add_function(wrap_pyfunction!(native::spawn_native_sleeper, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::shutdown_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::runtime_started, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::_emit_tracing_event, m)?)?;
    m.add_function(wrap_pyfunction!(native::_bridged_sleep, m)?)?;
    m.add_function(wrap_pyfunction!(kinds::_restore_reason, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_format_task_stack, m)?)?;
    kinds::remember_restore(m)?;
    m.add_function(wrap_pyfunction!(fork::_before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork_in_parent, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(exit::_shutdown_at_exit, m)?)?;
    fork::install(m)?;
    // Take the runtime down deliberately (GIL released) before the
    // interpreter finalises, not when the process tears its threads down.
    let shutdown = m.getattr("_shutdown_at_exit")?;
    m.py()
        .import("atexit")?
        .call_method1("register", (shutdown,))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Embedding: mixed Rust/Python binaries.

/// Make `dig_service._core` importable in an interpreter embedded by this
/// process (a mixed Rust/Python binary that links the crate instead of
/// loading the wheel's shared library). Call before `import dig_service`;
/// the pure-Python part of the package must be on `sys.path`.
pub fn register_embedded(py: Python<'_>) -> PyResult<()> {
    let module = pyo3::wrap_pymodule!(core_module)(py);
    py.import("sys")?
        .getattr("modules")?
        .set_item("dig_service._core", module)?;
    Ok(())
}

/// A Python view of a Rust [`ShutdownToken`](crate::ShutdownToken): the same
/// token, so a cancel on either side is seen by both (and wakes Python
/// waiters on every loop).
pub fn token_to_py(py: Python<'_>, token: &crate::ShutdownToken) -> PyResult<Py<PyShutdownToken>> {
    Py::new(py, PyShutdownToken::wrap(token.clone()))
}

/// A Python view of a Rust [`TaskRegistry`](crate::TaskRegistry): Python
/// coroutines spawned through it are tracked by the same registry as the
/// Rust side's tokio tasks, under one token and one deadline.
pub fn registry_to_py(
    py: Python<'_>,
    registry: &crate::TaskRegistry,
) -> PyResult<Py<PyTaskRegistry>> {
    let token = token_to_py(py, registry.shutdown())?;
    Py::new(py, PyTaskRegistry::from_core(registry.clone(), token))
}
