//! Python references held by Rust code: released attached to the
//! interpreter, never through PyO3's deferred pool.
//!
//! PyO3 defers the release of a `Py<T>` dropped by a thread that is not
//! attached: it pushes the reference onto a process-wide list behind a
//! lock, and the next thread to attach (every call into `_core` does)
//! drains it. `os.fork()` copies that lock as it is at the fork: held, if a
//! tokio worker was pushing onto the list at that instant. The child's
//! first call into `_core` then waits for ever for a thread that does not
//! exist in the child (1 fork in about 750 hung so, on CPython 3.12, while
//! the parent's workers completed native awaits).
//!
//! Guarantees:
//! - [`release`] drops a value holding Python references attached to the
//!   interpreter. On a runtime thread it hands the drop to the runtime's
//!   blocking pool, so a tokio worker never waits for the GIL; elsewhere
//!   it attaches for as long as the drop (a Python thread calling in is
//!   attached already, and pays a thread-local check).
//! - Once the interpreter is exiting and the value cannot be dropped
//!   attached (see `exit.rs`), it is leaked, not deferred: the process is
//!   ending, and a deferred reference would be released by nobody anyway.
//! - [`Attached`] wraps a value so that its drop, wherever it happens (a
//!   task aborted, a runtime shut down, a registry entry removed by a Rust
//!   join), goes through [`release`].
//!
//! Checked by the Python suite run on a build with `--cfg
//! pyo3_disable_reference_pool` (see `scripts/test.sh`), where a deferred
//! release aborts the process instead.

use pyo3::prelude::*;

use super::exit::attach_unless_exiting;

/// Drop `value` attached to the interpreter (see the module docs): on a
/// runtime thread, from the runtime's blocking pool.
pub(crate) fn release<T: Send + 'static>(value: T) {
    if super::runtime::on_runtime_thread() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // If the blocking pool refuses the closure (the runtime is
            // shutting down), dropping it drops the guard here, attached.
            let guard = Here(Some(value));
            drop(rt.spawn_blocking(move || drop(guard)));
            return;
        }
    }
    drop(Here(Some(value)));
}

/// Drops its value on the thread that drops it, attached; leaks it if that
/// thread cannot attach any more (the interpreter is exiting).
struct Here<T>(Option<T>);

impl<T> Drop for Here<T> {
    fn drop(&mut self) {
        let value = &mut self.0;
        if attach_unless_exiting(|_py| drop(value.take())).is_none() {
            std::mem::forget(value.take());
        }
    }
}

/// Run `f` attached with `value`; if this thread cannot attach any more
/// (the interpreter is exiting), `f` does not run and `value` is leaked
/// rather than released unattached. `f` runs on this thread, which must
/// not be a tokio worker unless waiting for the GIL there is acceptable
/// (the length of a call).
pub(crate) fn with_attached<T, R>(value: T, f: impl FnOnce(Python<'_>, T) -> R) -> Option<R> {
    let mut value = Some(value);
    let out = attach_unless_exiting(|py| value.take().map(|v| f(py, v)));
    // Still here only if `f` did not run.
    std::mem::forget(value.take());
    out.flatten()
}

/// A value holding Python references, released attached when dropped
/// (see [`release`]).
pub(crate) struct Attached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Attached<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }

    /// The value, to be dropped by the caller (attached, or through
    /// [`release`]).
    pub(crate) fn into_inner(mut self) -> T {
        // Present until taken here or in `drop`, which cannot both run.
        self.0.take().expect("an Attached value is taken once")
    }
}

impl<T: Send + 'static> Drop for Attached<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            release(value);
        }
    }
}
