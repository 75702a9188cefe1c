//! The running event loop, asked for on every spawn and every park: a
//! memo that makes CPython 3.11's answer cheap, and is sound.
//!
//! `asyncio.get_running_loop()` costs a `getpid()` system call on CPython
//! 3.11 (0.5-1 µs; SPEC P1 spawns 100k tasks). [`running_loop`] gives the
//! same answer, or the same error, without that call when it can prove the
//! answer has not changed.
//!
//! Guarantees:
//! - **The same answer as `asyncio.get_running_loop()`**, always: a stopped
//!   loop, another loop run later in the same thread, another thread, a
//!   forked child or a manual `asyncio._set_running_loop()` all fail the
//!   memo's check and ask `get_running_loop()` again (see
//!   [`RunningLoopMemo`] for the argument).
//! - **Only where it is sound.** The memo is used on CPython 3.11 with the C
//!   `_asyncio` module behind `asyncio.get_running_loop` only; elsewhere
//!   (3.12 dropped the `getpid()` call) every call asks Python.
//! - **A clear error** naming who needed a loop when none is running.

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use super::interop::get_running_loop;

/// The running event loop, or a `RuntimeError` saying who needed one.
///
/// The same answer as `asyncio.get_running_loop()`, which on CPython 3.11
/// makes a `getpid()` system call every time (0.5-1 µs, SPEC P1); see
/// [`RunningLoopMemo`] for how that call is skipped, soundly.
pub(crate) fn running_loop<'py>(py: Python<'py>, who: &str) -> PyResult<Bound<'py, PyAny>> {
    let memo = RunningLoopMemo::enabled(py);
    if memo {
        if let Some(event_loop) = RunningLoopMemo::recall(py) {
            return Ok(event_loop);
        }
    }
    let event_loop = get_running_loop(py)?.call0().map_err(|_| {
        PyRuntimeError::new_err(format!(
            "{who} needs a running asyncio event loop: call it from a coroutine \
             (inside asyncio.run(...) or dig_service.run(...))"
        ))
    })?;
    if memo {
        RunningLoopMemo::remember(&event_loop);
    }
    Ok(event_loop)
}

/// The running loop of a thread state, remembered in that thread state's
/// dict next to CPython 3.11's own record of it.
///
/// CPython 3.11's C `_asyncio` keeps a thread's running loop in the thread
/// state dict, under `__asyncio_running_event_loop__`, as a *holder* object
/// with the loop and the pid that set it. Every `_set_running_loop()` call
/// (a loop starting or stopping, in this thread, or any manual call)
/// stores a new holder, and a holder never changes. `get_running_loop()`
/// returns the holder's loop if the holder's pid is `getpid()`, which is
/// only false in a process forked from the one that set it.
///
/// So after `get_running_loop()` returned a loop, and for as long as the
/// thread state's holder is the same object and no fork happened (the fork
/// generation of [`super::fork`], advanced in the child by the
/// `os.register_at_fork` hook, which also runs for C code that forks and
/// calls `PyOS_AfterFork_Child`), `get_running_loop()` would return the
/// same loop: this memo returns it instead. It keeps the holder alive, so
/// the holder's identity cannot be reused by a later one. A stopped loop,
/// another loop run later in the same thread, another thread (another
/// thread state, another dict) or a forked child all fail the check and
/// take the `get_running_loop()` path, with today's answer or error.
///
/// Used only on CPython 3.11 with the C `_asyncio` module behind
/// `asyncio.get_running_loop` (3.12 dropped the `getpid()` call and the
/// holder); elsewhere `running_loop` always asks `get_running_loop()`.
#[pyclass(module = "dig_service._core", frozen)]
struct RunningLoopMemo {
    holder: Py<PyAny>,
    event_loop: Py<PyAny>,
    generation: u64,
}

/// The key of CPython 3.11's holder in the thread state dict.
const HOLDER_KEY: &str = "__asyncio_running_event_loop__";
/// The memo's key in the thread state dict.
const MEMO_KEY: &str = "dig_service._core.running_loop";

impl RunningLoopMemo {
    fn enabled(py: Python<'_>) -> bool {
        static ENABLED: PyOnceLock<bool> = PyOnceLock::new();
        *ENABLED.get_or_init(py, || {
            let check = || -> PyResult<bool> {
                let version = py.version_info();
                if (version.major, version.minor) != (3, 11) {
                    return Ok(false);
                }
                let c_impl = py.import("_asyncio")?;
                Ok(get_running_loop(py)?.is(c_impl.getattr("get_running_loop")?))
            };
            check().unwrap_or(false)
        })
    }

    /// This thread state's dict (borrowed from the thread state).
    fn thread_state_dict(py: Python<'_>) -> Option<Bound<'_, PyDict>> {
        // SAFETY: attached to the interpreter (we hold `py`); the result is
        // a borrowed reference to the current thread state's dict, or NULL
        // (no error set) if there is none.
        let dict = unsafe { Bound::from_borrowed_ptr_or_opt(py, ffi::PyThreadState_GetDict()) }?;
        dict.cast_into::<PyDict>().ok()
    }

    fn recall(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
        let dict = Self::thread_state_dict(py)?;
        let memo = dict.get_item(pyo3::intern!(py, MEMO_KEY)).ok()??;
        let memo = memo.cast_into::<Self>().ok()?;
        let memo = memo.get();
        let holder = dict.get_item(pyo3::intern!(py, HOLDER_KEY)).ok()??;
        (holder.is(&memo.holder) && memo.generation == super::fork::generation())
            .then(|| memo.event_loop.bind(py).clone())
    }

    /// Remember `event_loop`, just returned by `get_running_loop()` (no
    /// Python code ran since: the holder read here is the one it read).
    fn remember(event_loop: &Bound<'_, PyAny>) {
        let py = event_loop.py();
        let Some(dict) = Self::thread_state_dict(py) else {
            return;
        };
        let Ok(Some(holder)) = dict.get_item(pyo3::intern!(py, HOLDER_KEY)) else {
            return;
        };
        let memo = Self {
            holder: holder.unbind(),
            event_loop: event_loop.clone().unbind(),
            generation: super::fork::generation(),
        };
        if let Ok(memo) = Bound::new(py, memo) {
            let _ = dict.set_item(pyo3::intern!(py, MEMO_KEY), memo);
        }
    }
}
