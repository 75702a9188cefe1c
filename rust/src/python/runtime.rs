//! The tokio runtime behind the Python bindings (a Rust future becomes an
//! asyncio awaitable in `bridge.rs`).
//!
//! Guarantees:
//! - **Lazy.** `import dig_service` starts no thread; the runtime is built
//!   on first use (a native task, a native await), with the GIL released.
//! - **Deliberate shutdown, once, at exit.** The `atexit` hook (see
//!   `exit.rs`) takes the runtime down with the GIL released, so native
//!   tasks still running at interpreter exit are dropped, not left to touch
//!   a finalising interpreter, and no runtime thread is left to wait for the
//!   GIL during finalisation. From then on no runtime is ever built again:
//!   a native call from a thread that outlives the hook gets a
//!   `RuntimeError`, and a spawn finds no runtime and drops its task. (An
//!   earlier version rebuilt the runtime for a daemon thread that used it
//!   after the hook, and never shut that one down.)
//! - **Fork-safe.** The slot that holds the runtime is replaced in a forked
//!   child (`os.register_at_fork`, see `fork.rs`): the child never touches a
//!   lock the parent's threads may have held (or been parked on) at the
//!   fork, forgets the parent's runtime without running its destructor (its
//!   worker threads do not exist in the child), and builds its own on first
//!   use. The runtime's own threads never take that lock: a spawn from one
//!   of them goes to its own runtime.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::{Builder, Handle, Runtime};

struct Owned {
    pid: u32,
    rt: Runtime,
}

enum State {
    /// Not built yet (or shut down by an explicit `shutdown_runtime()`).
    Idle,
    Running(Owned),
    /// Shut down by the `atexit` hook: never built again in this process.
    Exited,
}

/// The runtime of this process, behind a lock that only Python threads
/// take (tokio threads use [`Handle::current`]).
struct Slot {
    state: Mutex<State>,
}

impl Slot {
    fn new() -> &'static Slot {
        Box::leak(Box::new(Slot {
            state: Mutex::new(State::Idle),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves a consistent `State` behind.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The current [`Slot`]. Replaced (never freed: a thread of the parent may
/// have held its lock at the fork) in a forked child by [`reset_in_child`].
static SLOT: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

fn slot() -> &'static Slot {
    // Acquire pairs with the Release of the store that published the slot,
    // so its initialised contents are visible.
    let current = SLOT.load(Ordering::Acquire);
    if !current.is_null() {
        // SAFETY: every pointer stored in SLOT comes from `Slot::new`
        // (leaked, never freed).
        return unsafe { &*current };
    }
    let fresh: *mut Slot = (Slot::new() as *const Slot).cast_mut();
    // Success AcqRel: its Release half publishes `fresh`'s initialised
    // contents to the Acquire loads above (its Acquire half reads a null
    // slot and needs nothing; it is there to match the failure ordering,
    // and costs nothing on x86's `lock cmpxchg`). Failure Acquire: pairs
    // with the winner's Release, so `theirs` is initialised.
    match SLOT.compare_exchange(
        std::ptr::null_mut(),
        fresh,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: as above.
        Ok(_) => unsafe { &*fresh },
        // Another thread published one first; ours stays leaked (once).
        Err(theirs) => unsafe { &*theirs },
    }
}

/// In a forked child: start from a fresh slot. Runs in the child's only
/// thread (the `after_in_child` hook), before any other code of the child.
pub(crate) fn reset_in_child() {
    // Release: publishes the fresh slot's contents to the threads the child
    // starts later. The parent's slot is leaked: its lock may be held by a
    // thread that does not exist here, and its runtime must not be dropped.
    SLOT.store((Slot::new() as *const Slot).cast_mut(), Ordering::Release);
}

thread_local! {
    /// Whether this thread is one of the runtime's own (worker or blocking).
    static RUNTIME_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is one of the runtime's (worker or blocking).
pub(crate) fn on_runtime_thread() -> bool {
    RUNTIME_THREAD.with(Cell::get)
}

fn current() -> PyResult<Option<Handle>> {
    match &*slot().lock() {
        State::Running(o) if o.pid == std::process::id() => Ok(Some(o.rt.handle().clone())),
        State::Exited => Err(super::exit::exiting_error()),
        _ => Ok(None),
    }
}

fn build() -> PyResult<Handle> {
    let mut g = slot().lock();
    let pid = std::process::id();
    match &*g {
        State::Running(o) if o.pid == pid => return Ok(o.rt.handle().clone()),
        State::Exited => return Err(super::exit::exiting_error()),
        _ => {}
    }
    if let State::Running(stale) = std::mem::replace(&mut *g, State::Idle) {
        // A runtime from another process (a fork without our hook): its
        // worker threads exist only there. Dropping it would wait for them
        // forever.
        std::mem::forget(stale);
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dig-service-rt")
        .on_thread_start(|| RUNTIME_THREAD.with(|t| t.set(true)))
        .enable_all()
        .build()
        .map_err(|e| {
            PyRuntimeError::new_err(format!("dig_service: cannot start the tokio runtime: {e}"))
        })?;
    let handle = rt.handle().clone();
    *g = State::Running(Owned { pid, rt });
    Ok(handle)
}

/// Run `f` with the GIL released, on a Python thread; refused once the
/// interpreter is exiting. (Re-taking the GIL afterwards is where CPython
/// ends a daemon thread during finalisation: the `atexit` hook waits for
/// every thread inside an entry point, so for every detached section, to
/// finish before finalisation can begin; see `exit.rs`.)
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<T> + Send) -> PyResult<T> {
    if super::exit::exiting() {
        return Err(super::exit::exiting_error());
    }
    py.detach(f)
}

/// The runtime's handle, building the runtime (GIL released) on first use.
/// Fails once the interpreter has started to exit.
pub(crate) fn handle(py: Python<'_>) -> PyResult<Handle> {
    if let Some(h) = current()? {
        return Ok(h);
    }
    detached(py, build)
}

/// Whether the runtime of this process is running.
#[pyfunction]
pub(crate) fn runtime_started() -> bool {
    matches!(current(), Ok(Some(_)))
}

fn stop(py: Python<'_>, owned: Owned) {
    if owned.pid == std::process::id() {
        // Workers finishing a poll may need the GIL: release it while waiting.
        py.detach(move || owned.rt.shutdown_timeout(Duration::from_secs(1)));
    } else {
        std::mem::forget(owned);
    }
}

/// Shut the runtime down (GIL released): running native tasks are dropped.
/// The next use builds a fresh runtime.
#[pyfunction]
pub(crate) fn shutdown_runtime(py: Python<'_>) -> PyResult<()> {
    let _inside = super::exit::enter()?;
    let taken = {
        let mut g = slot().lock();
        match std::mem::replace(&mut *g, State::Idle) {
            State::Running(o) => Some(o),
            other => {
                // Idle stays Idle; Exited stays Exited.
                *g = other;
                None
            }
        }
    };
    if let Some(o) = taken {
        stop(py, o);
    }
    Ok(())
}

/// For the `atexit` hook: shut the runtime down (GIL released) and never
/// build one again in this process.
pub(crate) fn shut_down_for_good(py: Python<'_>) {
    let taken = match std::mem::replace(&mut *slot().lock(), State::Exited) {
        State::Running(o) => Some(o),
        _ => None,
    };
    if let Some(o) = taken {
        stop(py, o);
    }
}
