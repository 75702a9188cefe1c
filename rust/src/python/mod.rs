//! The PyO3 bindings: the native module `dig_service._core`.
//!
//! One concept per module: [`runtime`] (the tokio runtime and the future
//! bridge), [`kinds`] (`TaskKind`, `ShutdownReason`), [`token`]
//! (`ShutdownToken` with per-loop batched wake-ups), [`registry`]
//! (`TaskRegistry`, `TaskHandle`, summaries, stats), [`native`] (native
//! tokio tasks seen from Python). [`interop`] holds the cached Python
//! objects and argument checks they share.

mod interop;
mod kinds;
mod native;
mod registry;
mod runtime;
mod token;

use pyo3::prelude::*;

pub use kinds::{PyShutdownReason, PyTaskKind};
pub use registry::PyTaskRegistry;
pub use token::PyShutdownToken;

/// `dig_service._core`: the Rust core of dig_service.
#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<kinds::PyTaskKind>()?;
    m.add_class::<kinds::PyShutdownReason>()?;
    m.add_class::<token::PyShutdownToken>()?;
    m.add_class::<registry::PyTaskRegistry>()?;
    m.add_class::<registry::PyTaskHandle>()?;
    m.add_class::<registry::PyTaskSummary>()?;
    m.add_class::<registry::PyTaskStats>()?;
    m.add_function(wrap_pyfunction!(native::spawn_native_sleeper, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::shutdown_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::runtime_started, m)?)?;
    Ok(())
}
