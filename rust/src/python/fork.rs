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
//! - Where there is no `fork()` (Windows: `os` has no `register_at_fork`),
//!   nothing is registered and the generation stays 0.

use std::sync::atomic::{AtomicU64, Ordering};

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

#[pyfunction]
pub(crate) fn _after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
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
    kwargs.set_item("after_in_child", m.getattr("_after_fork_in_child")?)?;
    os.call_method("register_at_fork", (), Some(&kwargs))?;
    Ok(())
}
