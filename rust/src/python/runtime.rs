//! The tokio runtime behind the Python bindings, and the bridge that turns
//! a Rust future into an asyncio awaitable.
//!
//! Guarantees:
//! - **Lazy.** `import dig_service` starts no thread; the runtime is built
//!   on first use (a native task, a native await), with the GIL released.
//! - **Deliberate shutdown.** [`shutdown`] (registered with `atexit` by the
//!   Python package) takes the runtime down with the GIL released, so native
//!   tasks still running at interpreter exit are dropped, not left to touch
//!   a finalising interpreter.
//! - **Fork-safe.** A forked child does not inherit the parent's worker
//!   threads; the first use in the child notices the new pid, forgets the
//!   parent's runtime without running its destructor, and builds its own.
//! - **Quiet after loop close.** A completion that arrives after its event
//!   loop closed is dropped without "Event loop is closed" noise.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3_async_runtimes::generic::{ContextExt, JoinError, Runtime as GenericRuntime};
use pyo3_async_runtimes::TaskLocals;
use tokio::runtime::{Builder, Handle, Runtime};

struct Owned {
    pid: u32,
    rt: Runtime,
}

static RUNTIME: Mutex<Option<Owned>> = Mutex::new(None);

fn current() -> Option<Handle> {
    let g = RUNTIME.lock();
    match g.as_ref() {
        Some(o) if o.pid == std::process::id() => Some(o.rt.handle().clone()),
        _ => None,
    }
}

fn build() -> std::io::Result<Handle> {
    let mut g = RUNTIME.lock();
    let pid = std::process::id();
    if let Some(o) = g.as_ref() {
        if o.pid == pid {
            return Ok(o.rt.handle().clone());
        }
    }
    if let Some(stale) = g.take() {
        // Inherited across fork(): its worker threads exist only in the
        // parent. Dropping it would wait for them forever.
        std::mem::forget(stale);
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dig-service-rt")
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    *g = Some(Owned { pid, rt });
    Ok(handle)
}

/// The runtime's handle, building the runtime (GIL released) on first use.
pub(crate) fn handle(py: Python<'_>) -> PyResult<Handle> {
    if let Some(h) = current() {
        return Ok(h);
    }
    py.detach(build).map_err(|e| {
        PyRuntimeError::new_err(format!("dig_service: cannot start the tokio runtime: {e}"))
    })
}

/// Take the runtime lock across `fork()` (see `fork.rs`), so no worker can
/// hold it at the instant of the fork. Waits with the GIL released.
pub(crate) fn hold_for_fork(py: Python<'_>) {
    py.detach(|| std::mem::forget(RUNTIME.lock()));
}

/// Release the lock taken by [`hold_for_fork`] (in the parent and the child).
pub(crate) fn release_after_fork() {
    // SAFETY: called only by the `after_in_parent` / `after_in_child` hooks,
    // which run exactly once after the `before` hook that locked RUNTIME and
    // forgot its guard; nothing else holds it.
    unsafe { RUNTIME.force_unlock() };
}

/// Whether the runtime of this process is running.
#[pyfunction]
pub(crate) fn runtime_started() -> bool {
    current().is_some()
}

/// Shut the runtime down (GIL released): running native tasks are dropped.
/// The next use builds a fresh runtime. Registered with `atexit`.
#[pyfunction]
pub(crate) fn shutdown_runtime(py: Python<'_>) {
    let owned = RUNTIME.lock().take();
    if let Some(o) = owned {
        if o.pid == std::process::id() {
            py.detach(move || o.rt.shutdown_timeout(Duration::from_secs(1)));
        } else {
            std::mem::forget(o);
        }
    }
}

// ---------------------------------------------------------------------------
// pyo3-async-runtimes glue: our runtime as a `generic::Runtime`.

pub(crate) struct DigRuntime;

/// Why a bridged future did not produce a value.
pub(crate) struct BridgeJoinError(tokio::task::JoinError);

impl JoinError for BridgeJoinError {
    fn is_panic(&self) -> bool {
        self.0.is_panic()
    }
    fn into_panic(self) -> Box<dyn std::any::Any + Send + 'static> {
        self.0.into_panic()
    }
}

type BoxJoin = Pin<Box<dyn Future<Output = Result<(), BridgeJoinError>> + Send>>;

fn spawn_handle() -> Handle {
    // The bridge is only entered after `handle(py)` built the runtime; if it
    // was shut down in between (interpreter exit), build a fresh one rather
    // than panic.
    current().unwrap_or_else(|| build().expect("dig_service: cannot start the tokio runtime"))
}

impl GenericRuntime for DigRuntime {
    type JoinError = BridgeJoinError;
    type JoinHandle = BoxJoin;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let join = spawn_handle().spawn(fut);
        Box::pin(async move { join.await.map_err(BridgeJoinError) })
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        let join = spawn_handle().spawn_blocking(f);
        Box::pin(async move { join.await.map_err(BridgeJoinError) })
    }
}

tokio::task_local! {
    static LOCALS: TaskLocals;
}

impl ContextExt for DigRuntime {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        Box::pin(LOCALS.scope(locals, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        LOCALS.try_with(|l| l.clone()).ok()
    }
}

/// Turn `fut` into an asyncio awaitable on the running loop.
///
/// Cancelling the awaitable drops `fut` (pyo3-async-runtimes does this). If
/// the loop is closed by the time `fut` completes, the completion is
/// dropped quietly: the Python future is marked cancelled first, which the
/// bridge treats as "nobody is waiting".
pub(crate) fn into_awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    handle(py)?;
    let locals = TaskLocals::with_running_loop(py)?.copy_context(py)?;
    let event_loop = locals.event_loop(py).unbind();
    let slot: Arc<OnceLock<Py<PyAny>>> = Arc::new(OnceLock::new());
    let slot2 = slot.clone();
    let guarded = async move {
        let out = fut.await;
        if let Some(py_fut) = slot2.get() {
            Python::attach(|py| {
                let closed = event_loop
                    .bind(py)
                    .call_method0(pyo3::intern!(py, "is_closed"))
                    .and_then(|v| v.is_truthy())
                    .unwrap_or(true);
                if closed {
                    // Sets the state to cancelled before it fails to schedule
                    // callbacks on the closed loop; the error is expected.
                    let _ = py_fut.bind(py).call_method0(pyo3::intern!(py, "cancel"));
                }
            });
        }
        out
    };
    let py_fut = pyo3_async_runtimes::generic::future_into_py_with_locals::<DigRuntime, _, T>(
        py, locals, guarded,
    )?;
    let _ = slot.set(py_fut.clone().unbind());
    Ok(py_fut)
}
