//! Young tasks: the end of a short-lived Python task noticed by one sweep a
//! loop iteration, not by a done callback of its own (SPEC P1).
//!
//! A done callback costs asyncio a `call_soon` handle and one more callback
//! run for every task; for a task that ends within a loop turn or two that
//! is most of what tracking costs over an untracked `loop.create_task`. So
//! a freshly spawned task joins its loop's *young* set instead. While the
//! set is not empty, one sweep is scheduled per loop iteration (a single
//! `call_soon`); it asks each young task `done()` and reports the finished
//! ones through the very code a done callback runs
//! ([`PyTaskHandle::report_end`], or `report_swept`, its second half, with
//! the `exception()` the sweep already asked). A task still running at the second
//! sweep after its first step is *promoted*: it gets its done callback, as
//! every task did before, and leaves the set, so a sweep never scans
//! long-lived tasks and they are still noticed at their end's next loop
//! turn.
//!
//! The set is three cohorts of handles (8 bytes a task): `fresh`, spawned
//! since the last sweep, whose first step comes after the next sweep in
//! the ready queue (so that sweep need not ask them: they cannot have
//! ended), and `once` and `twice`, asked at each sweep. The task whose spawn
//! queues a sweep has its first step queued *before* that sweep, so it
//! joins `once`. A task is asked `done()` at most twice.
//!
//! Guarantees:
//! - **Never later than a done callback.** While a task is young, a sweep
//!   is queued in every loop iteration. A task that ends in iteration `J`
//!   is reported by `J`'s sweep if that sweep runs after the end, or else
//!   by `J + 1`'s, which `J`'s sweep queued *before* the end queued the
//!   task's own done callbacks (an awaiter's wake-up, `asyncio.wait`,
//!   `gather`): those find it reported, as they found it when the handle
//!   was the first done callback. `TaskHandle.__await__` promotes a young
//!   task first (or reports it, if it has already ended), so the handle's
//!   callback comes before the awaiter's.
//! - **Reported once, by the same code.** The sweep calls the handle's
//!   report, which logs, counts, fires the token for a critical task and
//!   retrieves the exception (no "exception was never retrieved"), exactly
//!   as the done callback does; a handle reports its end once whoever asks.
//! - **Per loop.** A set belongs to one loop and is swept on that loop.
//!   The thread's current set lives in its thread state dict; a spawn on
//!   another loop of the same thread starts a new set, and the old one
//!   lives on in its loop's ready queue until it has swept its tasks.
//! - **Nothing lost when a sweep cannot be queued.** If `call_soon` fails,
//!   the set's tasks are promoted at once (they get their done callbacks).
//!   A loop that closes with young tasks drops the queued sweep with them,
//!   as it drops a done callback that was queued and never ran.
//! - **In the task's context.** A young task's end is reported in the
//!   task's context (`Context.run`), and a promoted task's done callback
//!   runs in it, so a logging filter that reads a context variable set by
//!   the spawner sees it as it did in a done callback added at spawn.
//! - **Only stock tasks whose context is known.** Only tasks of exactly
//!   `asyncio.Task` are young: on CPython >= 3.12 any of them, whose
//!   context is asked of the task (`Task.get_context()`) only when a report
//!   runs in it; on 3.11 one built by `spawn` itself, in a context it copied
//!   and keeps. Any other task, and a factory's task on 3.11, gets its done
//!   callback at once, as before.

use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::PyException;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

use super::exit;
use super::handle::PyTaskHandle;

/// The key of this thread's current young set in its thread state dict.
const KEY: &str = "dig_service._core.young_tasks";

/// The young tasks of one event loop, and its sweep (`__call__`).
#[pyclass(module = "dig_service._core", frozen)]
pub(crate) struct YoungTasks {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The loop swept on; `None` while the set is empty (so an idle set
    /// keeps no loop alive, and is reused by the next spawn on any loop).
    event_loop: Option<Py<PyAny>>,
    /// Spawned since the last sweep, first step queued after the next one.
    fresh: Vec<Py<PyTaskHandle>>,
    /// Asked at the next sweep; still running then, they move to `twice`.
    once: Vec<Py<PyTaskHandle>>,
    /// Asked at the next sweep; still running then, they are promoted.
    twice: Vec<Py<PyTaskHandle>>,
    /// A sweep is queued on `event_loop`.
    scheduled: bool,
}

impl State {
    fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.once.is_empty() && self.twice.is_empty()
    }
}

impl YoungTasks {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Never held across Python code, so never poisoned by a Python
        // error; a poisoned lock (a panic) still guards consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Track `handle`'s task, just spawned on `event_loop` (the running loop)
/// and not done, as young. `Ok(false)`: it is not a stock task, or no sweep
/// could be queued: the caller gives it its done callback.
pub(crate) fn track(
    event_loop: &Bound<'_, PyAny>,
    task: &Bound<'_, PyAny>,
    handle: &Bound<'_, PyTaskHandle>,
) -> PyResult<bool> {
    let py = event_loop.py();
    if !handle.get().knows_context() || !task.get_type().is(super::interop::task_type(py)?) {
        return Ok(false);
    }
    let young = current(event_loop)?;
    let set = young.get();
    let schedule = {
        let mut state = set.lock();
        let schedule = !state.scheduled;
        state.scheduled = true;
        schedule
    };
    if schedule {
        if let Err(err) = event_loop.call_method1(pyo3::intern!(py, "call_soon"), (&young,)) {
            // Python code ran: whatever joined the set meanwhile gets its
            // done callback now (nothing else would sweep it).
            set.lock().scheduled = false;
            promote_all(py, set);
            drop(err);
            return Ok(false);
        }
    }
    handle.get().set_young(true);
    let mut state = set.lock();
    // The task's first step was queued (by its creation) before the sweep
    // this spawn queued, if it queued one: that sweep must ask it.
    if schedule {
        state.once.push(handle.clone().unbind());
    } else {
        state.fresh.push(handle.clone().unbind());
    }
    Ok(true)
}

/// This thread's young set for `event_loop`: the current one if it belongs
/// to that loop or is empty, else a new one, which becomes current.
fn current<'py>(event_loop: &Bound<'py, PyAny>) -> PyResult<Bound<'py, YoungTasks>> {
    let py = event_loop.py();
    // SAFETY: attached (we hold `py`); a borrowed reference to the current
    // thread state's dict, or NULL (no error set) if there is none.
    let dict = unsafe { Bound::from_borrowed_ptr_or_opt(py, ffi::PyThreadState_GetDict()) }
        .and_then(|d| d.cast_into::<PyDict>().ok());
    let key = pyo3::intern!(py, KEY);
    if let Some(dict) = &dict {
        if let Some(found) = dict.get_item(key)? {
            if let Ok(found) = found.cast_into::<YoungTasks>() {
                let mine = {
                    let mut state = found.get().lock();
                    match &state.event_loop {
                        Some(l) => l.is(event_loop),
                        None => {
                            state.event_loop = Some(event_loop.clone().unbind());
                            true
                        }
                    }
                };
                if mine {
                    return Ok(found);
                }
            }
        }
    }
    let young = Bound::new(
        py,
        YoungTasks {
            state: Mutex::new(State {
                event_loop: Some(event_loop.clone().unbind()),
                ..State::default()
            }),
        },
    )?;
    if let Some(dict) = &dict {
        dict.set_item(key, &young)?;
    }
    Ok(young)
}

/// Give every task of `set` its done callback, and empty the set.
fn promote_all(py: Python<'_>, set: &YoungTasks) {
    let taken = std::mem::take(&mut *set.lock());
    let State {
        event_loop,
        fresh,
        once,
        twice,
        ..
    } = taken;
    drop(event_loop);
    for handle in fresh.into_iter().chain(once).chain(twice) {
        promote(handle.bind(py));
    }
}

/// Give a young task its done callback (if `TaskHandle.__await__` has not
/// already); a task that has ended meanwhile is reported at once.
pub(crate) fn promote(handle: &Bound<'_, PyTaskHandle>) {
    let py = handle.py();
    let tracked = handle.get();
    if !tracked.set_young(false) {
        return;
    }
    let Some(task) = tracked.python_task(py) else {
        return;
    };
    // A stock task takes a callback unless memory runs out; if it cannot,
    // its end cannot be noticed, and the error goes where a failing done
    // callback's would.
    let kwargs = PyDict::new(py);
    let added = tracked
        .task_context(py)
        .and_then(|context| kwargs.set_item(pyo3::intern!(py, "context"), context))
        .and_then(|()| {
            task.call_method(
                pyo3::intern!(py, "add_done_callback"),
                (handle,),
                Some(&kwargs),
            )
        });
    if let Err(err) = added {
        report_error(py, &task, err, "giving a task its done callback failed");
    }
}

/// Report an error of the sweep to the task's loop's exception handler
/// (where a failing done callback's error goes).
fn report_error(py: Python<'_>, task: &Bound<'_, PyAny>, err: PyErr, what: &str) {
    let report = || -> PyResult<()> {
        let context = PyDict::new(py);
        context.set_item("message", format!("TaskRegistry: {what}"))?;
        context.set_item("exception", err.value(py))?;
        context.set_item("task", task)?;
        task.call_method0(pyo3::intern!(py, "get_loop"))?
            .call_method1(pyo3::intern!(py, "call_exception_handler"), (context,))?;
        Ok(())
    };
    if let Err(e) = report() {
        e.write_unraisable(py, Some(task));
    }
}

/// Ask a young task whether it has ended, and report it if so. `true`: it
/// is still young and running. A `KeyboardInterrupt` or `SystemExit` out of
/// the report is kept in `raise` (the first one).
fn sweep_one(py: Python<'_>, handle: &Py<PyTaskHandle>, raise: &mut Option<PyErr>) -> bool {
    let tracked = handle.get();
    if !tracked.is_young() {
        return false; // promoted by `TaskHandle.__await__`
    }
    let Some(task) = tracked.python_task(py) else {
        return false;
    };
    // A stock task's `done()` (see `track`) does not fail.
    let done = task
        .call_method0(pyo3::intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(false);
    if !done {
        return true;
    }
    tracked.set_young(false);
    // In the task's context, where its done callback would have run, if
    // the report may log (the only Python code it runs that could read a
    // context variable); a quiet report needs no `Context.run`.
    // Asked once, for both the choice below and the report.
    let exception = task.call_method0(pyo3::intern!(py, "exception"));
    let reported = if tracked.report_may_log(py, &exception) {
        match tracked.task_context(py) {
            Ok(Some(context)) => context
                .call_method1(pyo3::intern!(py, "run"), (handle, &task))
                .map(drop),
            Ok(None) => tracked.report_swept(py, exception),
            // The task's own `get_context()` failed (it does not, on a
            // stock task): report anyway, outside its context, and say so.
            Err(err) => {
                report_error(py, &task, err, "reading the task's context failed");
                tracked.report_swept(py, exception)
            }
        }
    } else {
        tracked.report_swept(py, exception)
    };
    if let Err(err) = reported {
        if err.is_instance_of::<PyException>(py) {
            report_error(py, &task, err, "reporting the end of a task failed");
        } else if raise.is_none() {
            *raise = Some(err);
        }
    }
    false
}

#[pymethods]
impl YoungTasks {
    /// The sweep: report the young tasks that have ended, promote those
    /// still running at their second sweep, and queue the next
    /// sweep while any are left. A `KeyboardInterrupt` or `SystemExit`
    /// out of a report is raised (as out of a done callback) once every
    /// task of the sweep is reported or kept.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        let Ok(_inside) = exit::enter() else {
            return Ok(()); // a daemon thread's loop at interpreter exit
        };
        let py = slf.py();
        let set = slf.get();
        let (fresh, mut once, twice, event_loop) = {
            let mut state = set.lock();
            state.scheduled = false;
            let Some(event_loop) = state.event_loop.as_ref().map(|l| l.clone_ref(py)) else {
                return Ok(());
            };
            (
                std::mem::take(&mut state.fresh),
                std::mem::take(&mut state.once),
                std::mem::take(&mut state.twice),
                event_loop,
            )
        };
        let mut raise: Option<PyErr> = None;
        // Asked for the second time: promoted if still running.
        let mut recycled = twice;
        for handle in recycled.drain(..) {
            if sweep_one(py, &handle, &mut raise) {
                promote(handle.bind(py));
            }
        }
        // Asked for the first time: kept for one more sweep if running.
        once.retain(|handle| sweep_one(py, handle, &mut raise));
        // `fresh` cannot have ended (see the module docs): not asked.
        let mut fresh = fresh;
        fresh.retain(|handle| handle.get().is_young());
        // Reports ran Python code: tasks spawned meanwhile are already in
        // the state, and may have queued a sweep.
        let (schedule, released) = {
            let mut state = set.lock();
            let twice = once;
            let once = fresh;
            if state.twice.is_empty() {
                state.twice = twice;
            } else {
                state.twice.extend(twice);
            }
            if state.once.is_empty() {
                state.once = once;
            } else {
                state.once.extend(once);
            }
            if state.fresh.is_empty() {
                state.fresh = recycled;
            }
            if state.is_empty() {
                // Idle: keep neither the loop nor a large buffer.
                let released = (
                    state.event_loop.take(),
                    std::mem::take(&mut state.fresh),
                    std::mem::take(&mut state.once),
                    std::mem::take(&mut state.twice),
                );
                (false, Some(released))
            } else {
                let schedule = !state.scheduled;
                state.scheduled = true;
                (schedule, None)
            }
        };
        drop(released);
        if schedule {
            if let Err(err) = event_loop
                .bind(py)
                .call_method1(pyo3::intern!(py, "call_soon"), (slf,))
            {
                set.lock().scheduled = false;
                promote_all(py, set);
                if raise.is_none() {
                    raise = Some(err);
                }
            }
        }
        raise.map_or(Ok(()), Err)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // `try_lock`: the collector runs with the GIL held, and the lock is
        // held only briefly, never across Python code; a poisoned lock
        // still guards consistent data.
        let state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        if let Some(l) = &state.event_loop {
            visit.call(l)?;
        }
        for handle in state.fresh.iter().chain(&state.once).chain(&state.twice) {
            visit.call(handle)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let taken = std::mem::take(&mut *self.lock());
        drop(taken);
    }
}
