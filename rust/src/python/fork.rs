//! `os.fork()` safety for the bindings.
//!
//! A fork copies the process with only the forking thread: a lock that
//! another thread held at that instant (or was parked on, waiting to be
//! handed it) stays that way forever in the child. Guarantees:
//! - The child gets a fresh runtime slot (see `runtime.rs`) from the
//!   `after_in_child` hook of `os.register_at_fork`, before any other code
//!   of the child runs: it never touches the parent's runtime lock, and
//!   builds its own runtime on first use, so native tasks work in the
//!   child. Nothing is held across the fork in the parent (an earlier
//!   design held the runtime lock there; a worker parked on it at the fork
//!   could be handed it by the child's unlock, and that worker does not
//!   exist in the child: the child hung).
//! - Registries and tokens remember the fork generation they were made in.
//!   One inherited from the parent raises a clear `RuntimeError` in the child
//!   instead of touching its (possibly held) locks and hanging.
//! - No thread of ours releases a Python reference unattached (see
//!   `release.rs`): PyO3 would defer it onto a list behind a lock that a
//!   fork can copy held, and the child's first call into `_core` drains
//!   that list.
//! - No thread of ours is making or dropping a Python thread state when
//!   the process forks. A thread with none (a tokio thread, the watchdog)
//!   gets one each time it attaches and drops it when it detaches, and
//!   CPython makes it under its runtime-wide lock without holding the GIL:
//!   a fork at that moment copies the lock held, and the child hangs in
//!   CPython's own `PyOS_AfterFork_Child` (1 fork in about 2,000 under
//!   load, while tokio threads completed native awaits). So such a thread
//!   attaches only through [`hold_off`], and the `before` hook waits (GIL
//!   released, at most [`FORK_WAIT`]) until none is attaching, and holds
//!   new ones back until the fork is done.
//! - Where there is no `fork()` (Windows: `os` has no `register_at_fork`),
//!   nothing is registered and the generation stays 0.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The fork generation of this process (0 in the original process).
pub(crate) fn generation() -> u64 {
    // Relaxed: written only by the child's hook, while the child has one
    // thread; every thread the child starts later is started after it.
    GENERATION.load(Ordering::Relaxed)
}

/// `Ok` if an object made in generation `made_in` may be used here.
pub(crate) fn check(made_in: u64, what: &str) -> PyResult<()> {
    if made_in == generation() {
        Ok(())
    } else {
        Err(PyRuntimeError::new_err(format!(
            "this {what} was created before os.fork() and cannot be used in the child \
             process (its state belongs to the parent's threads): create a new \
             ShutdownToken and TaskRegistry in the child"
        )))
    }
}

/// Set by the `before` hook, cleared after the fork (in both processes).
static FORKING: AtomicBool = AtomicBool::new(false);

/// Threads without a Python thread state inside an attach ([`hold_off`]).
static ATTACHING: AtomicUsize = AtomicUsize::new(0);

/// How long the `before` hook waits for attaching threads (an attach lasts
/// a call; the bound keeps a fork from waiting on a thread that waits for
/// something the forking thread holds).
const FORK_WAIT: Duration = Duration::from_secs(1);

/// Held by a thread without a Python thread state while it attaches.
pub(crate) struct HoldOff(());

impl Drop for HoldOff {
    fn drop(&mut self) {
        // SeqCst: see `hold_off`.
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wait out a fork in progress, then count this thread as attaching until
/// the guard is dropped (for a thread with no Python thread state: see the
/// module docs).
pub(crate) fn hold_off() -> HoldOff {
    loop {
        // SeqCst, with the `before` hook's store and load: of "this
        // increment, then the load of FORKING" and "the hook's store of
        // FORKING, then its load of ATTACHING", one comes first in the
        // single total order, so either the hook sees this thread counted
        // (and waits for it) or this thread sees the fork (and backs off).
        while FORKING.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_micros(100));
        }
        ATTACHING.fetch_add(1, Ordering::SeqCst);
        if !FORKING.load(Ordering::SeqCst) {
            return HoldOff(());
        }
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `os.register_at_fork(before=...)`: hold back new attaches by threads
/// without a thread state, and wait (GIL released) for those inside one.
#[pyfunction]
pub(crate) fn _before_fork(py: Python<'_>) {
    // SeqCst: see `hold_off`.
    FORKING.store(true, Ordering::SeqCst);
    if ATTACHING.load(Ordering::SeqCst) > 0 {
        // They need the GIL to finish.
        py.detach(|| {
            let until = Instant::now() + FORK_WAIT;
            while ATTACHING.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                thread::sleep(Duration::from_micros(50));
            }
        });
    }
}

/// `os.register_at_fork(after_in_parent=...)`: attaches may go on.
#[pyfunction]
pub(crate) fn _after_fork_in_parent() {
    FORKING.store(false, Ordering::SeqCst);
}

#[pyfunction]
pub(crate) fn _after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // The child has one thread: nobody else is attaching here.
    ATTACHING.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
    super::runtime::reset_in_child();
}

/// Register the hook with `os.register_at_fork`, where the platform forks.
pub(crate) fn install(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let os = m.py().import("os")?;
    if !os.hasattr("register_at_fork")? {
        // No `fork()` here (Windows): no child can inherit a held lock.
        return Ok(());
    }
    let kwargs = pyo3::types::PyDict::new(m.py());
    kwargs.set_item("before", m.getattr("_before_fork")?)?;
    kwargs.set_item("after_in_parent", m.getattr("_after_fork_in_parent")?)?;
    kwargs.set_item("after_in_child", m.getattr("_after_fork_in_child")?)?;
    os.call_method("register_at_fork", (), Some(&kwargs))?;
    Ok(())
}
