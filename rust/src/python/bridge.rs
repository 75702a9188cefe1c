//! A Rust future as an asyncio awaitable.
//!
//! [`into_awaitable`] runs a future on the runtime (`runtime.rs`) and
//! returns an asyncio future of the running loop that its outcome settles.
//!
//! Guarantees:
//! - **Settled on the loop's thread.** The outcome is converted to Python on
//!   the runtime's blocking pool (a tokio worker never waits for the GIL)
//!   and posted to the loop with `call_soon_threadsafe`; it runs inside the
//!   exit gate (`exit.rs`), and is dropped quietly if the loop has closed.
//! - **Cancelling the awaitable drops the Rust future** (its task is
//!   aborted).
//! - **No awaiter waits for ever.** A panic in the future raises
//!   `RuntimeError` in the awaiting coroutine; so does a future dropped
//!   unfinished because the runtime shut down under it.
//! - **No Python reference is released unattached** (`release.rs`): the
//!   task's references to the loop and the asyncio future are released
//!   attached however the task ends, never left to PyO3's deferred pool,
//!   whose lock a fork can copy held into the child.
//!
//! pyo3-async-runtimes' `future_into_py` (the bridge of earlier versions)
//! is not used: its tasks hold the loop, the asyncio future and a
//! `contextvars` context, and drop them on tokio workers, unattached, on
//! every completion; that is the deferred pool a fork copied held (1 child
//! in about 750 hung on CPython 3.12). What it did is done here in the same
//! way: a task, an abort from the asyncio future's done callback, the
//! result set from a blocking-pool thread.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Poll;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;
use pyo3::IntoPyObjectExt;

use super::aio;
use super::release::{release, with_attached};
use crate::tasks::panic_message;

/// The asyncio future a native future settles, and its loop.
struct Target {
    event_loop: Py<PyAny>,
    future: Py<PyAny>,
}

/// Where a native future's outcome goes. Dropped unsettled (its task was
/// aborted, or dropped by a runtime shutting down), it settles the asyncio
/// future with an error (a no-op when the awaiter cancelled it), attached,
/// through [`release`].
struct Completion {
    target: Option<Target>,
}

impl Completion {
    /// Post `outcome` to the loop; attached.
    fn settle(mut self, py: Python<'_>, outcome: PyResult<Py<PyAny>>) {
        if let Some(target) = self.target.take() {
            post(py, &target, outcome);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            release(Unsettled(target));
        }
    }
}

/// A target whose future never got its outcome: dropped (attached, by
/// [`release`]), it settles the future with an error.
struct Unsettled(Target);

impl Drop for Unsettled {
    fn drop(&mut self) {
        // `release` drops it attached: this attach re-enters.
        Python::attach(|py| {
            post(
                py,
                &self.0,
                Err(PyRuntimeError::new_err(
                    "the native future was dropped before it finished: the tokio runtime \
                     shut down under it",
                )),
            );
        });
    }
}

/// Settle `target`'s future with `outcome`, from its loop's thread.
fn post(py: Python<'_>, target: &Target, outcome: PyResult<Py<PyAny>>) {
    let (value, error) = match outcome {
        Ok(value) => (value, py.None()),
        Err(err) => (py.None(), err.into_value(py).into_any()),
    };
    let event_loop = target.event_loop.bind(py);
    let posted = (|| -> PyResult<()> {
        let args = PyTuple::new(
            py,
            [
                run_gated(py)?.clone(),
                aio::settle(py)?.clone(),
                target.future.bind(py).clone(),
                value.into_bound(py),
                error.into_bound(py),
            ],
        )?;
        event_loop.call_method1(pyo3::intern!(py, "call_soon_threadsafe"), args)?;
        Ok(())
    })();
    if let Err(err) = posted {
        let closed = event_loop
            .call_method0(pyo3::intern!(py, "is_closed"))
            .and_then(|c| c.is_truthy())
            .unwrap_or(false);
        if !closed {
            // Nobody to raise it to: the awaiter waits on that loop.
            err.write_unraisable(py, Some(event_loop));
        }
        // A closed loop: nobody is waiting on it.
    }
}

/// `callback(*args)` inside the exit gate; nothing once the interpreter is
/// exiting. Settling a future schedules its callbacks, which on asyncio's
/// loop runs Python code (and in debug mode reads source files): the loop's
/// thread can lose the GIL there, and the `atexit` hook must wait for it.
#[pyfunction(signature = (callback, *args))]
fn _run_gated(callback: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> PyResult<()> {
    let Ok(_inside) = super::exit::enter() else {
        return Ok(());
    };
    callback.call1(args)?;
    Ok(())
}

fn run_gated(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    CELL.get_or_try_init(py, || {
        Ok::<_, PyErr>(wrap_pyfunction!(_run_gated, py)?.into_any().unbind())
    })
    .map(|f| f.bind(py))
}

/// The asyncio future's done callback: aborts the task when the awaiter
/// cancelled the future. Holds no Python reference.
#[pyclass(module = "dig_service._core", frozen)]
struct AbortOnCancel {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future
            .call_method0(pyo3::intern!(future.py(), "cancelled"))?
            .is_truthy()?
        {
            self.abort.abort();
        }
        Ok(())
    }
}

/// Turn `fut` into an asyncio awaitable on the running loop (see the
/// module docs).
pub(crate) fn into_awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let rt = super::runtime::handle(py)?;
    let event_loop = super::running_loop::running_loop(py, "a native await")?;
    let future = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
    let completion = Completion {
        target: Some(Target {
            event_loop: event_loop.unbind(),
            future: future.clone().unbind(),
        }),
    };
    let task = rt.spawn(async move {
        let mut fut = Box::pin(fut);
        // A panic is the awaiter's error, not the worker's.
        let outcome = std::future::poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
            }
        })
        .await;
        drop(fut);
        // Converting and posting take the GIL: not on a worker. A refused
        // closure (the runtime is shutting down) drops the completion,
        // which reports that.
        drop(tokio::task::spawn_blocking(move || {
            with_attached((completion, outcome), |py, (completion, outcome)| {
                let outcome = match outcome {
                    Ok(result) => result.and_then(|value| value.into_py_any(py)),
                    Err(message) => Err(PyRuntimeError::new_err(format!(
                        "native future panicked: {message}"
                    ))),
                };
                completion.settle(py, outcome);
            });
        }));
    });
    let on_done = Bound::new(
        py,
        AbortOnCancel {
            abort: task.abort_handle(),
        },
    )?;
    if let Err(err) = future.call_method1(pyo3::intern!(py, "add_done_callback"), (on_done,)) {
        task.abort();
        return Err(err);
    }
    Ok(future)
}
