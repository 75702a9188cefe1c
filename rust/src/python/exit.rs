//! Interpreter exit with threads still running: nothing of ours may abort it.
//!
//! CPython 3.11-3.13 end a thread that waits for the GIL once the
//! interpreter finalises with `pthread_exit`, a forced unwind. If that
//! unwind meets a Rust frame that catches panics (every PyO3 trampoline,
//! every tokio task), the process aborts ("FATAL: exception not
//! rethrown"). A thread waits for the GIL inside our Rust frames whenever
//! Python code we call releases it (I/O, such as a self-pipe write in
//! `call_soon_threadsafe` or a debug-mode loop reading source lines for a
//! new future's traceback; or yielding the GIL to another thread), and in
//! a detached section (building the runtime). So, from the `atexit` hook
//! ([`_shutdown_at_exit`], registered by the native module; `atexit` hooks
//! run before finalisation, with every thread still able to take the GIL):
//!
//! - **No runtime thread is left.** The runtime is shut down (GIL released,
//!   so its threads can finish what they were doing) and never built again;
//!   a runtime thread still about does not attach ([`attach_unless_exiting`]).
//! - **No Python thread is inside our code.** Every entry point that runs
//!   Python code holds an [`Inside`] guard while it does: the hook waits
//!   (GIL released, a bounded time) until no other thread holds one, and
//!   from then on an entry from any thread but the exiting one raises
//!   `RuntimeError` at once, before running any Python code. A daemon
//!   thread that then waits for the GIL does so in Python's own frames,
//!   which `pthread_exit` unwinds cleanly.
//!
//! What remains: PyO3's own wrapper code around an entry point (argument
//! conversion, the return value) allocates Python objects, and an
//! allocation can start a garbage collection whose finalizers run Python
//! code. Those windows are a few instructions long and hold no lock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Set, for good, by the `atexit` hook when it starts.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Set, for good, by the `atexit` hook once the runtime is shut down.
/// Until then the runtime's threads attach as usual: the hook waits for
/// them with the GIL released (they finish their work, run the drop
/// callbacks of the tasks being dropped, and so on).
static RUNTIME_GONE: AtomicBool = AtomicBool::new(false);

/// The thread that ran the hook (the one finalising the interpreter): it
/// may go on calling in (later `atexit` hooks).
static EXIT_THREAD: OnceLock<ThreadId> = OnceLock::new();

/// [`Inside`] guards alive, over every thread.
static INSIDE: AtomicUsize = AtomicUsize::new(0);

/// How long the hook waits for other threads to leave our code (a call
/// lasts microseconds; a detached runtime build, milliseconds).
const GRACE: Duration = Duration::from_secs(2);

/// Whether the `atexit` hook has run: the interpreter is about to finalise.
pub(crate) fn exiting() -> bool {
    // Relaxed: a stale `false` on a runtime thread only means attaching as
    // before the hook, which is safe until the hook's runtime shutdown
    // returns, and that shutdown waits for those threads.
    EXITING.load(Ordering::Relaxed)
}

/// Whether the `atexit` hook has shut the runtime down: a runtime thread
/// still about has outlived the shutdown's grace period, and must not wait
/// for the GIL any more.
pub(crate) fn runtime_gone() -> bool {
    // Relaxed: see `exiting`.
    RUNTIME_GONE.load(Ordering::Relaxed)
}

pub(crate) fn exiting_error() -> PyErr {
    PyRuntimeError::new_err(
        "dig_service: the interpreter is exiting (its atexit hooks have run): native tasks, \
         native awaits and calls that run Python code from Rust are no longer available \
         to other threads",
    )
}

/// A thread inside an entry point that runs Python code (see the module
/// docs). Not `Send`: dropped on the thread that made it.
pub(crate) struct Inside {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Inside {
    fn drop(&mut self) {
        // SeqCst: the hook reads it with SeqCst (see `enter`).
        INSIDE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Enter an entry point that will run Python code; `Err` once the
/// interpreter is exiting, unless this is the exiting thread.
#[inline(always)]
pub(crate) fn enter() -> PyResult<Inside> {
    // SeqCst, here and in the hook: either the hook sees this thread
    // counted (and waits for it), or this thread sees `EXITING` (and leaves
    // at once). (The GIL, held at both points, orders them too.)
    INSIDE.fetch_add(1, Ordering::SeqCst);
    let inside = Inside {
        _not_send: std::marker::PhantomData,
    };
    if EXITING.load(Ordering::SeqCst) {
        return enter_while_exiting(inside);
    }
    Ok(inside)
}

/// [`enter`] once the interpreter is exiting: only the exiting thread
/// gets in. Out of line, so that `enter` stays a few instructions in its
/// callers' hot paths (SPEC P1).
#[cold]
#[inline(never)]
fn enter_while_exiting(inside: Inside) -> PyResult<Inside> {
    if EXIT_THREAD.get() == Some(&thread::current().id()) {
        Ok(inside)
    } else {
        drop(inside);
        Err(exiting_error())
    }
}

/// Run `f` attached to the interpreter, unless this is one of the runtime's
/// own threads and the interpreter is exiting.
///
/// Once the hook has shut the runtime down, a runtime thread still about
/// (a blocking-pool thread that outlived the shutdown's grace period) does
/// not run `f` and gets `None`: what `f` was for (a wake-up, a log line, a
/// completion) is moot then. Python threads calling in hold the GIL already: attaching them
/// waits for nothing.
pub(crate) fn attach_unless_exiting<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    if runtime_gone() && super::runtime::on_runtime_thread() {
        return None;
    }
    let _fork = no_thread_state().then(super::fork::hold_off);
    Python::try_attach(f)
}

/// Whether this thread has no Python thread state: attaching will make one
/// (and detaching drop it), under a lock a fork must not copy held (see
/// `fork.rs`).
pub(crate) fn no_thread_state() -> bool {
    // SAFETY: callable without the GIL; reads this thread's own state.
    unsafe { pyo3::ffi::PyGILState_GetThisThreadState() }.is_null()
}

/// The `atexit` hook: see the module docs.
#[pyfunction]
pub(crate) fn _shutdown_at_exit(py: Python<'_>) {
    let _ = EXIT_THREAD.set(thread::current().id());
    // SeqCst, with `enter`'s increment and load: of "this store, then the
    // load of INSIDE below" and "an entry's increment, then its load of
    // EXITING", one comes first in the single total order, so either the
    // hook sees the thread counted (and waits for it) or the thread sees
    // EXITING (and leaves). Acquire/Release cannot forbid both missing
    // each other (a store-load pattern).
    EXITING.store(true, Ordering::SeqCst);
    super::runtime::shut_down_for_good(py);
    // SeqCst, as the other stores of this hook; the readers load it
    // Relaxed (`runtime_gone`): the flag publishes no other data, only
    // itself, and coherence makes a reader see it once it has propagated.
    // A runtime thread that reads `false` just before attaches as it did
    // before the hook: the window `runtime_gone`'s callers accept.
    RUNTIME_GONE.store(true, Ordering::SeqCst);
    // SeqCst: the load of the store-load pattern above.
    if INSIDE.load(Ordering::SeqCst) > 0 {
        // The threads inside need the GIL to leave: wait without it. (If
        // this thread itself were inside one, called from an entry point,
        // the wait would end at the grace period.)
        py.detach(|| {
            let until = Instant::now() + GRACE;
            while INSIDE.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                thread::sleep(Duration::from_micros(200));
            }
        });
    }
}
