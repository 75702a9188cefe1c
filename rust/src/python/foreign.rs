//! Asyncio tasks as the core registry's foreign tasks, and how stragglers
//! are stopped: one call per event loop, not one per task.
//!
//! Guarantees:
//! - **Cancelled on their own loop.** A straggler's `cancel()` runs on the
//!   thread of the loop it belongs to: directly when that is the calling
//!   thread, else through `call_soon_threadsafe`. A loop that has closed
//!   refuses the call; its tasks are gone with it.
//! - **Batched.** While [`StopBatch::run`] runs (a deadline's
//!   `close_and_stop_all`), the cancellations are gathered per loop and
//!   posted as one `cancel_all` call a loop: 40k stragglers on another
//!   thread's loop cost it one wake-up, not 40k (which overshot a 0.2 s
//!   deadline by most of a second).
//! - **No Python code while gathering.** Gathering counts references only;
//!   the cancellations run after the core's registry lock is released.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::thread::ThreadId;

use pyo3::exceptions::asyncio::{CancelledError, InvalidStateError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::aio;
use super::exit::attach_unless_exiting;
use super::interop::call_on_loop;
use super::release::release;
use crate::tasks::{ForeignTask, TaskOutcome};

/// How an asyncio task ended, read from what its `exception()` gave: `None`
/// returned for a return, `CancelledError` raised for a cancellation, any
/// other exception, returned or raised, for a failure; `None` while the
/// task is not done (`InvalidStateError`). The one reading of a task's end
/// that its handle's report, a supervised task's report and the join's
/// count of quiet ends share.
pub(crate) fn outcome_of(
    py: Python<'_>,
    exception: &PyResult<Bound<'_, PyAny>>,
) -> Option<TaskOutcome> {
    match exception {
        Ok(exc) if exc.is_none() => Some(TaskOutcome::Completed),
        Ok(_) => Some(TaskOutcome::Failed),
        Err(e) if e.is_instance_of::<CancelledError>(py) => Some(TaskOutcome::Cancelled),
        Err(e) if e.is_instance_of::<InvalidStateError>(py) => None,
        Err(_) => Some(TaskOutcome::Failed),
    }
}

/// An asyncio task as the core registry sees it. Its references are
/// released attached wherever it is dropped (`release.rs`): the core may
/// drop an entry on any thread.
pub(crate) struct PyForeign {
    /// The asyncio task.
    pub(crate) task: ManuallyDrop<Py<PyAny>>,
    /// The loop it runs on, and that loop's thread.
    pub(crate) event_loop: ManuallyDrop<Py<PyAny>>,
    pub(crate) thread: ThreadId,
}

impl PyForeign {
    pub(crate) fn new(task: Py<PyAny>, event_loop: Py<PyAny>, thread: ThreadId) -> Self {
        Self {
            task: ManuallyDrop::new(task),
            event_loop: ManuallyDrop::new(event_loop),
            thread,
        }
    }
}

impl Drop for PyForeign {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the fields are not used after.
        let refs = unsafe {
            (
                ManuallyDrop::take(&mut self.task),
                ManuallyDrop::take(&mut self.event_loop),
            )
        };
        release(refs);
    }
}

impl PyForeign {
    /// Whether the asyncio task is done (an error from its `done()`: not).
    fn done(&self, py: Python<'_>) -> bool {
        self.task
            .bind(py)
            .call_method0(pyo3::intern!(py, "done"))
            .and_then(|d| d.is_truthy())
            .unwrap_or(false)
    }

    /// Its stack, as text; `None` when it has no frame to show.
    fn stack_text(&self, py: Python<'_>) -> Option<String> {
        match aio::_format_task_stack(self.task.bind(py)) {
            Ok(stack) => (!stack.is_empty()).then_some(stack),
            // Only if the formatter itself failed (it reports what it cannot
            // read in its text): say so rather than show no stack.
            Err(e) => Some(format!("(its stack could not be read: {e})")),
        }
    }

    fn cancel_in(&self, py: Python<'_>) {
        cancel_on_loop(
            py,
            self.event_loop.bind(py),
            self.thread,
            self.task.bind(py),
        );
    }
}

impl ForeignTask for PyForeign {
    fn is_finished(&self) -> bool {
        attach_unless_exiting(|py| self.done(py)).unwrap_or(false)
    }

    fn quiet_end(&self) -> Option<TaskOutcome> {
        attach_unless_exiting(|py| {
            // An error from a task's own method (a subclass's) is left to
            // the handle's report, which calls the same methods.
            if !self.done(py) {
                return None;
            }
            // A failure is left to the report too, for its log line.
            let task = self.task.bind(py);
            match outcome_of(py, &task.call_method0(pyo3::intern!(py, "exception"))) {
                Some(TaskOutcome::Failed) | None => None,
                quiet => quiet,
            }
        })
        .flatten()
    }

    fn stack(&self) -> Option<String> {
        attach_unless_exiting(|py| self.stack_text(py)).flatten()
    }

    fn cancel(&self) {
        attach_unless_exiting(|py| self.cancel_in(py));
    }

    /// One attach for the three steps: a Rust `Service`'s deadline asks
    /// this of each Python straggler from a tokio worker, and each attach
    /// may wait for a busy loop thread to let the GIL go.
    fn stop(&self, want_stack: bool) -> Option<Option<String>> {
        attach_unless_exiting(|py| {
            if self.done(py) {
                return None;
            }
            let stack = if want_stack {
                self.stack_text(py)
            } else {
                None
            };
            self.cancel_in(py);
            Some(stack)
        })
        // The interpreter is exiting: its tasks are going with it; report
        // the task as a straggler, as `is_finished` would have.
        .unwrap_or(Some(None))
    }
}

/// Cancel `task` (an asyncio task or future) on `event_loop`, whose thread
/// is `thread`: gathered into the open [`StopBatch`] of this thread if
/// there is one, else at once (directly on the loop's own thread, through
/// `call_soon_threadsafe` from any other).
pub(crate) fn cancel_on_loop(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    thread: ThreadId,
    task: &Bound<'_, PyAny>,
) {
    if !StopBatch::add(event_loop, thread, task) {
        if let Ok(cancel) = task.getattr(pyo3::intern!(py, "cancel")) {
            call_on_loop(event_loop, thread, &cancel, &[]);
        }
    }
}

// ---------------------------------------------------------------------------
// Stopping stragglers: one call per event loop, not one per task.

/// The tasks to cancel on one event loop.
struct LoopBatch {
    event_loop: Py<PyAny>,
    thread: ThreadId,
    tasks: Vec<Py<PyAny>>,
}

thread_local! {
    /// While [`StopBatch::run`] runs on this thread: the cancellations the
    /// core asks for, gathered per loop.
    static GATHERING: RefCell<Option<Vec<LoopBatch>>> = const { RefCell::new(None) };
}

/// Cancels the stragglers found by `close_and_stop_all` with one call per
/// event loop: on this thread's own loop, one call; on another thread's, one
/// `call_soon_threadsafe` (not one each: 40k stragglers on another thread's
/// loop cost it 40k wake-ups, and overshot a 0.2 s deadline by most of a
/// second). The token's wake-ups are batched the same way.
pub(crate) struct StopBatch {
    outer: Option<Vec<LoopBatch>>,
}

impl StopBatch {
    /// Run `stop` (which calls [`ForeignTask::cancel`] on each straggler),
    /// then cancel the gathered tasks, loop by loop.
    pub(crate) fn run<R>(py: Python<'_>, stop: impl FnOnce() -> R) -> PyResult<R> {
        let guard = StopBatch {
            // A nested run (from a Python `done()`, say) keeps its own batch.
            outer: GATHERING.with(|g| g.replace(Some(Vec::new()))),
        };
        let out = stop();
        let batches = guard.finish();
        if !batches.is_empty() {
            let cancel_all = aio::cancel_all(py)?;
            for batch in batches {
                let tasks = PyList::new(py, batch.tasks)?;
                call_on_loop(
                    batch.event_loop.bind(py),
                    batch.thread,
                    cancel_all,
                    &[tasks.into_any()],
                );
            }
        }
        Ok(out)
    }

    /// Gather `task` (to cancel on `event_loop`, whose thread is `thread`)
    /// if a batch is open on this thread. No Python code runs here:
    /// references are counted up, nothing else.
    fn add(event_loop: &Bound<'_, PyAny>, thread: ThreadId, task: &Bound<'_, PyAny>) -> bool {
        GATHERING.with(|g| {
            let mut g = g.borrow_mut();
            let Some(batches) = g.as_mut() else {
                return false;
            };
            let task = task.clone().unbind();
            match batches.iter_mut().find(|b| b.event_loop.is(event_loop)) {
                Some(batch) => batch.tasks.push(task),
                None => batches.push(LoopBatch {
                    event_loop: event_loop.clone().unbind(),
                    thread,
                    tasks: vec![task],
                }),
            }
            true
        })
    }

    fn finish(mut self) -> Vec<LoopBatch> {
        let outer = self.outer.take();
        let mine = GATHERING.with(|g| g.replace(outer));
        std::mem::forget(self);
        mine.unwrap_or_default()
    }
}

impl Drop for StopBatch {
    /// Only on a panic out of `stop`: restore the outer batch (the gathered
    /// tasks are dropped, not cancelled: the registry is broken anyway).
    fn drop(&mut self) {
        let outer = self.outer.take();
        let _ = GATHERING.with(|g| g.replace(outer));
    }
}
