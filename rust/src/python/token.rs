//! `ShutdownToken` for Python: the core token plus batched asyncio waiters.
//!
//! `await token.cancelled()` parks a plain asyncio future in a per-loop
//! list. When the token fires (from any thread, or from Rust), each loop
//! gets **one** wake-up: a direct call on the loop's own thread, one
//! `call_soon_threadsafe` from any other thread. No waiter costs a tokio
//! round trip. The list is pruned of abandoned (cancelled) waiters as it
//! grows, so a loop that keeps timing out on `cancelled()` stays small.
//!
//! No Python code runs while the waiter lock is held: not the prune's
//! `done()` calls (a loop's futures may be a Python class), not a Python
//! object's destructor. Python code can release the GIL, and a signal
//! handler or another thread calling `cancel()` would then block on the
//! lock, holding the GIL the lock's owner needs to go on.

use std::sync::Arc;
use std::thread::{self, ThreadId};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::aio;
use super::exit;
use super::fork;
use super::interop::call_on_loop;
use super::kinds::PyShutdownReason;
use super::release::{release, with_attached};
use super::running_loop::running_loop;
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

impl Drop for Waiters {
    /// The last holder may be the core token's hook, dropped on any thread.
    fn drop(&mut self) {
        if !self.loops.is_empty() {
            release(std::mem::take(&mut self.loops));
        }
    }
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

    /// Add `fut` to the waiters of `event_loop` (hooking the wake-up on
    /// the token the first time). If that loop's list has grown past its
    /// prune mark, take the list out and return it, to be pruned with the
    /// lock released and then [put back](Self::put_back).
    ///
    /// Under the lock: reference counting only (never a decrement to zero)
    /// and the token's `on_cancel` (which runs no callback itself).
    fn push(
        &self,
        event_loop: &Bound<'_, PyAny>,
        fut: &Bound<'_, PyAny>,
    ) -> Option<Vec<Py<PyAny>>> {
        let mut w = self.waiters.lock();
        let lw = loop_entry(&mut w.loops, event_loop);
        let to_prune = if lw.futures.len() >= lw.prune_at {
            // Until they are put back, a larger mark keeps a nested park
            // (from a `done()` that parks, say) from pruning again.
            lw.prune_at = usize::MAX;
            Some(std::mem::take(&mut lw.futures))
        } else {
            None
        };
        lw.futures.push(fut.clone().unbind());
        if !w.hooked {
            w.hooked = true;
            let shared = self.waiters.clone();
            if !self.core.on_cancel(move |_| wake(&shared)) {
                // Already fired: the caller wakes what it parked. (The
                // refused callback is dropped inside `on_cancel`, which
                // releases one `Arc` reference, never the last.)
                w.hooked = false;
            }
        }
        to_prune
    }

    /// Return the pruned waiters of `event_loop` to its list, after a
    /// [`push`](Self::push) took them out.
    fn put_back(&self, event_loop: &Bound<'_, PyAny>, live: Vec<Py<PyAny>>) {
        let mut w = self.waiters.lock();
        let lw = loop_entry(&mut w.loops, event_loop);
        let total = lw.futures.len() + live.len();
        lw.futures.extend(live);
        lw.prune_at = (total * 2).max(PRUNE_AT_LEAST);
    }
}

/// A loop's list is pruned once it holds this many waiters (and then at
/// twice the live count after each prune).
const PRUNE_AT_LEAST: usize = 64;

/// The waiters of `event_loop`, added to `loops` if it has none yet (or
/// if a wake-up took them all meanwhile).
fn loop_entry<'a>(
    loops: &'a mut Vec<LoopWaiters>,
    event_loop: &Bound<'_, PyAny>,
) -> &'a mut LoopWaiters {
    let idx = match loops
        .iter()
        .position(|lw| lw.event_loop.as_ptr() == event_loop.as_ptr())
    {
        Some(i) => i,
        None => {
            loops.push(LoopWaiters {
                event_loop: event_loop.clone().unbind(),
                thread: thread::current().id(),
                futures: Vec::new(),
                prune_at: PRUNE_AT_LEAST,
            });
            loops.len() - 1
        }
    };
    &mut loops[idx]
}

/// Hand every parked future to its loop: one call per loop.
fn wake(waiters: &SharedWaiters) {
    let loops = std::mem::take(&mut waiters.lock().loops);
    if loops.is_empty() {
        return;
    }
    with_attached(loops, |py, loops| {
        let Ok(wake_all) = aio::wake_all(py) else {
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
        let _inside = exit::enter()?;
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
        let _inside = exit::enter()?;
        aio::wait_cancelled(slf.py())?.call1((slf,))
    }

    /// Park a future on the running loop until the token fires; `None` if
    /// it already has. The body of `cancelled()`.
    pub(crate) fn _park<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        fork::check(self.made_in, "ShutdownToken")?;
        let _inside = exit::enter()?;
        if self.core.is_cancelled() {
            return Ok(None);
        }
        let event_loop = running_loop(py, "ShutdownToken.cancelled()")?;
        let fut = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
        let to_prune = self.push(&event_loop, &fut);
        if let Some(parked) = to_prune {
            // Waiters whose task was cancelled (timeouts) are done already;
            // drop them so the list tracks live waiters. `done()` may be
            // Python code: asked with no lock held, and the done futures
            // are released here, with no lock held either.
            let live: Vec<Py<PyAny>> = parked
                .into_iter()
                .filter(|f| {
                    !f.bind(py)
                        .call_method0(pyo3::intern!(py, "done"))
                        .and_then(|d| d.is_truthy())
                        .unwrap_or(true)
                })
                .collect();
            self.put_back(&event_loop, live);
        }
        // The token may have fired after the check above: then its callback
        // already ran (or was refused), and the futures added since (this
        // one, the pruned ones put back) are ours to wake.
        if self.core.is_cancelled() {
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
