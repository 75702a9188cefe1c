//! `ShutdownToken` for Python: the core token plus batched asyncio waiters.
//!
//! `await token.cancelled()` parks a plain asyncio future in a per-loop
//! list. When the token fires (from any thread, or from Rust), each loop
//! gets **one** wake-up: a direct call on the loop's own thread, one
//! `call_soon_threadsafe` from any other thread. No waiter costs a tokio
//! round trip. The list is pruned of abandoned (cancelled) waiters as it
//! grows, so a loop that keeps timing out on `cancelled()` stays small.

use std::sync::Arc;
use std::thread::{self, ThreadId};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::fork;
use super::interop::{aio_wait_cancelled, aio_wake_all, call_on_loop, running_loop};
use super::kinds::PyShutdownReason;
use crate::shutdown::ShutdownToken;

struct LoopWaiters {
    event_loop: Py<PyAny>,
    thread: ThreadId,
    futures: Vec<Py<PyAny>>,
    prune_at: usize,
}

#[derive(Default)]
struct Waiters {
    hooked: bool,
    loops: Vec<LoopWaiters>,
}

type SharedWaiters = Arc<Mutex<Waiters>>;

/// A broadcast cancellation flag with a typed, first-wins reason.
#[pyclass(name = "ShutdownToken", module = "dig_service._core", frozen)]
pub struct PyShutdownToken {
    pub(crate) core: ShutdownToken,
    waiters: SharedWaiters,
    made_in: u64,
}

impl PyShutdownToken {
    pub(crate) fn wrap(core: ShutdownToken) -> Self {
        Self {
            core,
            waiters: SharedWaiters::default(),
            made_in: fork::generation(),
        }
    }
}

/// Hand every parked future to its loop: one call per loop.
fn wake(waiters: &SharedWaiters) {
    let loops = std::mem::take(&mut waiters.lock().loops);
    if loops.is_empty() {
        return;
    }
    Python::attach(|py| {
        let Ok(wake_all) = aio_wake_all(py) else {
            return;
        };
        for lw in loops {
            if let Ok(futs) = PyList::new(py, lw.futures) {
                call_on_loop(
                    lw.event_loop.bind(py),
                    lw.thread,
                    wake_all,
                    &[futs.into_any()],
                );
            }
        }
    });
}

#[pymethods]
impl PyShutdownToken {
    #[new]
    fn new() -> Self {
        Self::wrap(ShutdownToken::new())
    }

    /// Whether the token has fired.
    fn is_cancelled(&self) -> bool {
        self.core.is_cancelled()
    }

    /// Fire the token; only the first reason is kept.
    fn cancel(&self, reason: &Bound<'_, PyAny>) -> PyResult<()> {
        fork::check(self.made_in, "ShutdownToken")?;
        let reason = PyShutdownReason::from_arg(reason, "ShutdownToken.cancel()", "reason")?;
        self.core.cancel(reason);
        Ok(())
    }

    /// The recorded reason, or None.
    fn reason(&self) -> PyResult<Option<PyShutdownReason>> {
        fork::check(self.made_in, "ShutdownToken")?;
        Ok(self.core.reason().map(Into::into))
    }

    /// A coroutine that finishes once the token has fired.
    ///
    /// The waiter is parked when the coroutine starts running, not when it
    /// is created, so a coroutine that is never awaited (or is cancelled
    /// before it starts) leaves nothing behind.
    fn cancelled<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        aio_wait_cancelled(slf.py())?.call1((slf,))
    }

    /// Park a future on the running loop until the token fires; `None` if
    /// it already has. The body of `cancelled()`.
    fn _park<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        fork::check(self.made_in, "ShutdownToken")?;
        if self.core.is_cancelled() {
            return Ok(None);
        }
        let event_loop = running_loop(py, "ShutdownToken.cancelled()")?;
        let fut = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
        let fire_now = {
            let mut w = self.waiters.lock();
            let idx = match w
                .loops
                .iter()
                .position(|lw| lw.event_loop.as_ptr() == event_loop.as_ptr())
            {
                Some(i) => i,
                None => {
                    w.loops.push(LoopWaiters {
                        event_loop: event_loop.clone().unbind(),
                        thread: thread::current().id(),
                        futures: Vec::new(),
                        prune_at: 64,
                    });
                    w.loops.len() - 1
                }
            };
            let lw = &mut w.loops[idx];
            if lw.futures.len() >= lw.prune_at {
                // Waiters whose task was cancelled (timeouts) are done
                // already; drop them so the list tracks live waiters.
                lw.futures.retain(|f| {
                    !f.bind(py)
                        .call_method0(pyo3::intern!(py, "done"))
                        .and_then(|d| d.is_truthy())
                        .unwrap_or(true)
                });
                lw.prune_at = (lw.futures.len() * 2).max(64);
            }
            lw.futures.push(fut.clone().unbind());
            if !w.hooked {
                w.hooked = true;
                let shared = self.waiters.clone();
                if !self.core.on_cancel(move |_| wake(&shared)) {
                    w.hooked = false;
                }
            }
            // The token may have fired after the check above and before the
            // push: then the callback already ran (or was refused) and this
            // future is ours to wake.
            self.core.is_cancelled()
        };
        if fire_now {
            wake(&self.waiters);
        }
        Ok(Some(fut))
    }

    /// A token that fires when this one does; cancelling it leaves this one alone.
    fn child_token(&self) -> PyResult<Self> {
        fork::check(self.made_in, "ShutdownToken")?;
        Ok(Self::wrap(self.core.child_token()))
    }

    /// Whether both objects are views of the same token.
    fn same_as(&self, other: &Bound<'_, PyShutdownToken>) -> bool {
        self.core.same_as(&other.get().core)
    }

    fn __repr__(&self) -> String {
        match self.core.reason() {
            None => "<ShutdownToken active>".to_owned(),
            Some(r) => format!(
                "<ShutdownToken cancelled: {}>",
                PyShutdownReason::from(r).repr()
            ),
        }
    }
}
