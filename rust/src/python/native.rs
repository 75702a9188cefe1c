//! Native tokio tasks spawned from Python into a registry.
//!
//! `spawn_native_sleeper` is the testing helper of `dig_service.testing`:
//! a real tokio task on the bindings' runtime, tracked by the same
//! registry as the asyncio tasks, so native tracking can be exercised from
//! Python (`origin == "native"`).
//!
//! Guarantees:
//! - **One registry.** A native task is counted, listed, joined and stopped
//!   at a deadline with the registry's asyncio tasks, under its token.
//! - **Every awaiter sees the result.** Its `TaskHandle` can be awaited from
//!   any number of tasks, on any loop: each gets `None`, the failure as
//!   `RuntimeError`, or `CancelledError` if the task was aborted.
//! - **Refusals are the registry's.** A closed registry raises
//!   `AlreadyStopped`; nothing is spawned then.

use std::future::Future;

use pyo3::prelude::*;
use pyo3::types::PyString;
use tokio::sync::watch;

use super::errors::service_err;
use super::handle::PyTaskHandle;
use super::interop::{duration, seconds_arg, text_arg, wrong_type};
use super::kinds::PyTaskKind;
use super::registry::PyTaskRegistry;
use super::runtime;
use crate::tasks::TaskKind;

/// Spawn `fut` as a tracked native task and hand back a Python handle whose
/// awaiters all see the task's result.
pub(crate) fn spawn_native<F>(
    py: Python<'_>,
    registry: &PyTaskRegistry,
    (name, text): (&Bound<'_, PyString>, &str),
    kind: TaskKind,
    fut: F,
) -> PyResult<PyTaskHandle>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let core = registry.core()?;
    let rt = runtime::handle(py)?;
    let handle = core
        .spawn_on(&rt, text, kind, fut)
        .map_err(|e| service_err(py, &e))?;
    let abort = handle.abort_handle();
    let (tx, rx) = watch::channel(None);
    // Forward the result to every awaiter; if the task is aborted the
    // sender is dropped and awaiters see "aborted".
    rt.spawn(async move {
        let res = handle.await;
        let _ = tx.send(Some(res));
    });
    Ok(PyTaskHandle::native(name.clone().unbind(), kind, abort, rx))
}

/// Spawn a real tokio task that sleeps `seconds` (returning early when the
/// registry's token fires, if `honor_shutdown`), tracked by `registry`.
#[pyfunction]
#[pyo3(signature = (registry, name, seconds, *, honor_shutdown = true, kind = None))]
pub(crate) fn spawn_native_sleeper(
    py: Python<'_>,
    registry: &Bound<'_, PyAny>,
    name: &Bound<'_, PyAny>,
    seconds: &Bound<'_, PyAny>,
    honor_shutdown: bool,
    kind: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyTaskHandle> {
    const FUNC: &str = "spawn_native_sleeper()";
    let _inside = super::exit::enter()?;
    let registry = registry
        .cast::<PyTaskRegistry>()
        .map_err(|_| wrong_type(registry, FUNC, "registry", "a dig_service.TaskRegistry"))?;
    let name = text_arg(name, FUNC, "name")?;
    let secs = seconds_arg(seconds, FUNC, "seconds")?;
    let kind = match kind {
        Some(k) => PyTaskKind::from_arg(k, FUNC, "kind")?,
        None => TaskKind::BackgroundLoop,
    };
    let token = registry.get().core.shutdown().clone();
    let sleep = duration(secs);
    spawn_native(py, registry.get(), name, kind, async move {
        if honor_shutdown {
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = token.cancelled() => {}
            }
        } else {
            tokio::time::sleep(sleep).await;
        }
        Ok(())
    })
}

/// Calls a Python callable when dropped (on whatever thread drops it).
struct OnDrop(Option<Py<PyAny>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(cb) = self.0.take() {
            let _ = super::release::with_attached(cb, |py, cb| {
                let _ = cb.bind(py).call0();
            });
        }
    }
}

/// Testing aid for the future bridge: an awaitable backed by a Rust future
/// that sleeps `seconds`, then returns `None`. `on_drop()` is called when
/// the Rust future is dropped, finished or not, so a test can prove that
/// cancelling the awaitable drops the Rust future.
#[pyfunction]
pub(crate) fn _bridged_sleep<'py>(
    py: Python<'py>,
    seconds: &Bound<'py, PyAny>,
    on_drop: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let _inside = super::exit::enter()?;
    let secs = seconds_arg(seconds, "_bridged_sleep()", "seconds")?;
    let guard = OnDrop(Some(on_drop.unbind()));
    super::bridge::into_awaitable(py, async move {
        let _guard = guard;
        tokio::time::sleep(duration(secs)).await;
        Ok(None::<bool>)
    })
}
