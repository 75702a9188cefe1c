//! A Python coroutine, running on an asyncio loop, awaited from Rust.
//!
//! [`run_coroutine`] schedules a coroutine on a (possibly other-thread)
//! event loop and returns a Rust future of its result. Guarantee: **if the
//! Rust side gives up** (drops the future before it completes: a timeout,
//! a `select!`, an aborted tokio task), **the Python task is cancelled**.
//! pyo3-async-runtimes' `into_future` leaves the Python task running in
//! that case.
//!
//! The wait costs no GIL: completion arrives through a oneshot channel fed
//! by the task's done callback on the loop's thread.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use pyo3::exceptions::asyncio::CancelledError;
use pyo3::prelude::*;
use tokio::sync::oneshot;

use super::release::{release, with_attached};

type Outcome = PyResult<Py<PyAny>>;

/// Feeds the oneshot from the `concurrent.futures.Future`'s done callback.
#[pyclass(module = "dig_service._core", frozen)]
struct SendOutcome {
    tx: Mutex<Option<oneshot::Sender<Outcome>>>,
}

#[pymethods]
impl SendOutcome {
    fn __call__(&self, fut: &Bound<'_, PyAny>) {
        let Ok(_inside) = super::exit::enter() else {
            return; // a daemon thread at interpreter exit: nobody awaits this
        };
        let py = fut.py();
        let outcome = fut
            .call_method0(pyo3::intern!(py, "result"))
            .map(Bound::unbind);
        // Taken out first: the lock is released before the send, whose
        // refusal (the Rust side gave up) releases the outcome, a Python
        // object, which may run Python code.
        let tx = self.tx.lock().take();
        if let Some(tx) = tx {
            let _ = tx.send(outcome);
        }
    }
}

/// A Python coroutine's result, as a Rust future. Dropping it before it
/// completes cancels the Python task.
pub struct PyCoroutineFuture {
    handle: Option<Py<PyAny>>,
    rx: oneshot::Receiver<Outcome>,
}

/// Schedule `coro` on `event_loop` (thread-safe: the loop may run on another
/// thread) and return a future of its result.
pub fn run_coroutine(
    coro: &Bound<'_, PyAny>,
    event_loop: &Bound<'_, PyAny>,
) -> PyResult<PyCoroutineFuture> {
    let py = coro.py();
    let handle = py
        .import("asyncio")?
        .call_method1("run_coroutine_threadsafe", (coro, event_loop))
        .inspect_err(|_| {
            // Refused (closed loop, not a coroutine): close it so Python does
            // not also warn that it was never awaited.
            let _ = coro.call_method0(pyo3::intern!(py, "close"));
        })?;
    let (tx, rx) = oneshot::channel();
    handle.call_method1(
        "add_done_callback",
        (SendOutcome {
            tx: Mutex::new(Some(tx)),
        },),
    )?;
    Ok(PyCoroutineFuture {
        handle: Some(handle.unbind()),
        rx,
    })
}

impl Future for PyCoroutineFuture {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                // Completed: nothing to cancel on drop. The handle is released
                // attached (see `release.rs`).
                if let Some(handle) = self.handle.take() {
                    release(handle);
                }
                Poll::Ready(res.unwrap_or_else(|_| {
                    Err(CancelledError::new_err(
                        "the Python task ended without reporting a result",
                    ))
                }))
            }
        }
    }
}

impl Drop for PyCoroutineFuture {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // `concurrent.futures.Future.cancel` is thread-safe and cancels
            // the asyncio task behind it on its own loop.
            let _ = with_attached(handle, |py, handle| {
                let _ = handle.bind(py).call_method0(pyo3::intern!(py, "cancel"));
            });
        }
        // An outcome sent but never polled is a Python object too.
        if let Ok(outcome) = self.rx.try_recv() {
            release(outcome);
        }
    }
}
