//! `TaskRegistry`, `TaskSummary` and `TaskStats` for Python: the core
//! registry behind a Python class.
//!
//! Nothing here waits on tokio: the deadline join runs on the event loop
//! (the `join_all` coroutine of `aio.py`) and is woken once, when the
//! registry empties, by whichever thread empties it; the spawn path is
//! `spawn.rs`, a task's handle and the report of its end `handle.rs`.
//!
//! Guarantees:
//! - **One registry, both kinds of task.** A Python registry is a view of a
//!   core [`TaskRegistry`]: asyncio tasks and tokio tasks are counted,
//!   listed and joined together, under one token and one deadline.
//! - **Closed after the join.** Once `join_all` has finished (returned or
//!   raised), `spawn` raises `AlreadyStopped`.
//! - **Stragglers are stopped, then named.** At the deadline every live
//!   task is cancelled (Python) or aborted (native), one call per event
//!   loop, and `ShutdownDeadlineExceeded` names them in spawn order.
//! - **Not across a fork.** A registry made before `os.fork()` raises a
//!   clear `RuntimeError` in the child instead of touching its locks.

use std::thread;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use super::aio;
use super::errors;
use super::exit;
use super::foreign::StopBatch;
use super::fork;
use super::handle::PyTaskHandle;
use super::interop::{call_on_loop, monotonic_of, seconds_arg, wrong_type};
use super::kinds::PyTaskKind;
use super::release::{with_attached, Attached};
use super::spawn::Flag;
use super::token::PyShutdownToken;
use crate::shutdown::ShutdownToken;
use crate::tasks::TaskRegistry;

/// Named, tracked tasks (asyncio and tokio) joined under one deadline.
#[pyclass(name = "TaskRegistry", module = "dig_service._core", frozen)]
pub struct PyTaskRegistry {
    pub(crate) core: TaskRegistry,
    shutdown: Py<PyShutdownToken>,
    made_in: u64,
}

impl PyTaskRegistry {
    /// A Python view of `core` whose `shutdown` is `token`.
    pub fn from_core(core: TaskRegistry, token: Py<PyShutdownToken>) -> Self {
        Self {
            core,
            shutdown: token,
            made_in: fork::generation(),
        }
    }

    /// The Python token.
    pub(crate) fn shutdown_py<'py>(&self, py: Python<'py>) -> &Bound<'py, PyShutdownToken> {
        self.shutdown.bind(py)
    }

    /// The core token.
    pub fn shutdown_core(&self) -> &ShutdownToken {
        self.core.shutdown()
    }

    /// The core registry, unless this object was inherited across `fork()`.
    pub(crate) fn core(&self) -> PyResult<&TaskRegistry> {
        fork::check(self.made_in, "TaskRegistry")?;
        Ok(&self.core)
    }
}

#[pymethods]
impl PyTaskRegistry {
    #[new]
    fn new(shutdown: &Bound<'_, PyAny>) -> PyResult<Self> {
        let token = shutdown.cast::<PyShutdownToken>().map_err(|_| {
            wrong_type(
                shutdown,
                "TaskRegistry()",
                "shutdown",
                "a dig_service.ShutdownToken",
            )
        })?;
        Ok(Self::from_core(
            TaskRegistry::new(token.get().core.clone()),
            token.clone().unbind(),
        ))
    }

    /// The token this registry's tasks watch.
    #[getter]
    fn shutdown(&self, py: Python<'_>) -> Py<PyShutdownToken> {
        self.shutdown.clone_ref(py)
    }

    /// Schedule `coro` on the running loop and track it.
    ///
    /// Every argument is checked before the task is made, so a spawn that
    /// raises has not scheduled anything; a refused coroutine is closed
    /// (no "never awaited" warning), unless it is someone else's (already
    /// started or running), which is left alone.
    #[pyo3(
        signature = (name, kind, coro, *, critical = Flag(Ok(false))),
        text_signature = "($self, name, kind, coro, *, critical=False)"
    )]
    fn spawn<'py>(
        slf: &Bound<'py, Self>,
        name: &Bound<'py, PyAny>,
        kind: &Bound<'py, PyAny>,
        coro: &Bound<'py, PyAny>,
        critical: Flag<'py>,
    ) -> PyResult<Bound<'py, PyTaskHandle>> {
        super::spawn::spawn(slf, name, kind, coro, critical)
    }

    /// Run a supervised task: `factory()` makes each incarnation's
    /// coroutine, and `policy` says when an incarnation that ended is
    /// replaced by a new one (SPEC 8). Every argument is checked before
    /// anything is tracked, and `factory` is first called on the task.
    #[pyo3(
        signature = (name, kind, factory, *, policy = None),
        text_signature = "($self, name, kind, factory, *, policy=RestartPolicy())"
    )]
    fn supervise<'py>(
        slf: &Bound<'py, Self>,
        name: &Bound<'py, PyAny>,
        kind: &Bound<'py, PyAny>,
        factory: &Bound<'py, PyAny>,
        policy: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, super::supervise::PySupervisedHandle>> {
        super::supervise::supervise(slf, name, kind, factory, policy)
    }

    /// Wait for every tracked task up to `deadline` seconds, then stop the
    /// stragglers and raise `ShutdownDeadlineExceeded`.
    fn join_all<'py>(
        slf: &Bound<'py, Self>,
        deadline: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _inside = exit::enter()?;
        let secs = seconds_arg(deadline, "TaskRegistry.join_all()", "deadline")?;
        aio::join_all(slf.py())?.call1((slf, secs))
    }

    /// Close the registry if it is empty; else resolve `fut` once it empties.
    /// After shutdown, the tasks that have already ended quietly (returned
    /// or cancelled) are counted first, so that their done callbacks, a
    /// loop turn away, need not be waited for (`finish_quiet_ends`).
    fn _try_close(&self, fut: &Bound<'_, PyAny>) -> PyResult<bool> {
        let _inside = exit::enter()?;
        let core = self.core()?;
        core.finish_quiet_ends();
        let py = fut.py();
        let event_loop = fut.call_method0(pyo3::intern!(py, "get_loop"))?.unbind();
        // Released attached even if the core drops the callback uncalled.
        let refs = Attached::new((event_loop, fut.clone().unbind()));
        let thread = thread::current().id();
        Ok(core.try_close(move || {
            with_attached(refs.into_inner(), |py, (event_loop, fut)| {
                if let Ok(resolve) = aio::resolve(py) {
                    call_on_loop(event_loop.bind(py), thread, resolve, &[fut.into_bound(py)]);
                }
            });
        }))
    }

    /// The join's deadline has passed (`deadline` seconds): close the
    /// registry, stop every live task (one call per event loop), and raise
    /// `ShutdownDeadlineExceeded` naming them, if there were any.
    fn _stop_stragglers(&self, py: Python<'_>, deadline: f64) -> PyResult<()> {
        let _inside = exit::enter()?;
        let core = self.core()?;
        let names = StopBatch::run(py, || core.close_and_stop_all())?.names;
        if names.is_empty() {
            return Ok(());
        }
        Err(errors::deadline_exceeded(py, deadline, names.len(), names))
    }

    /// The live tasks.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let _inside = exit::enter()?;
        let summaries = self.core()?.snapshot();
        // The list and its summaries are new objects that only this call
        // refers to: a collection run while they are made (one every few
        // hundred allocations, a full one as they pile up) would only
        // traverse every other object of the process for nothing.
        let _paused = CollectorPaused::new();
        let list = PyList::empty(py);
        for s in summaries {
            let summary = PyTaskSummary {
                name: PyString::new(py, &s.name).unbind(),
                kind: s.kind.into(),
                spawned_at: monotonic_of(py, s.spawned_at)?,
                origin: s.origin.as_str(),
                restarts: s.restarts,
            };
            list.append(Bound::new(py, summary)?)?;
        }
        Ok(list)
    }

    /// Counters since the registry was created.
    fn stats(&self) -> PyResult<PyTaskStats> {
        let s = self.core()?.stats();
        Ok(PyTaskStats {
            spawned: s.spawned,
            completed: s.completed,
            failed: s.failed,
            cancelled: s.cancelled,
            aborted: s.aborted,
            restarted: s.restarted,
            live: s.live,
        })
    }

    /// The counters metrics label by kind and origin: one `KindStats` for
    /// each kind and origin, always all of them, in a fixed order.
    fn stats_by_kind(&self) -> PyResult<Vec<PyKindStats>> {
        Ok(self
            .core()?
            .stats_by_kind()
            .into_iter()
            .map(|s| PyKindStats {
                kind: s.kind.into(),
                origin: s.origin.as_str(),
                spawned: s.spawned,
                failed: s.failed,
                restarted: s.restarted,
                live: s.live,
            })
            .collect())
    }

    /// Whether no task is live.
    fn is_empty(&self) -> PyResult<bool> {
        Ok(self.core()?.is_empty())
    }

    /// Whether `join_all` has closed the registry.
    fn is_closed(&self) -> PyResult<bool> {
        Ok(self.core()?.is_closed())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.core()?.len())
    }

    fn __repr__(&self) -> PyResult<String> {
        let core = self.core()?;
        let s = core.stats();
        Ok(format!(
            "<TaskRegistry live={} spawned={} closed={}>",
            s.live,
            s.spawned,
            core.is_closed()
        ))
    }
}

/// One live task.
#[pyclass(name = "TaskSummary", module = "dig_service._core", frozen)]
pub struct PyTaskSummary {
    /// The name given at spawn.
    #[pyo3(get)]
    name: Py<PyString>,
    /// The task's kind.
    #[pyo3(get)]
    kind: PyTaskKind,
    /// `time.monotonic()` at spawn.
    #[pyo3(get)]
    spawned_at: f64,
    /// `"python"` or `"native"`.
    #[pyo3(get)]
    origin: &'static str,
    /// Restarts of a supervised task so far; 0 for a plain task.
    #[pyo3(get)]
    restarts: u32,
}

#[pymethods]
impl PyTaskSummary {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TaskSummary(name={}, kind=TaskKind.{}, spawned_at={}, origin='{}', restarts={})",
            self.name.bind(py).repr()?,
            self.kind.name(),
            self.spawned_at,
            self.origin,
            self.restarts
        ))
    }
}

/// Counters of a registry since it was created.
#[pyclass(name = "TaskStats", module = "dig_service._core", frozen, get_all, eq)]
#[derive(PartialEq, Eq)]
pub struct PyTaskStats {
    spawned: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    aborted: u64,
    restarted: u64,
    live: u64,
}

#[pymethods]
impl PyTaskStats {
    fn __repr__(&self) -> String {
        format!(
            "TaskStats(spawned={}, completed={}, failed={}, cancelled={}, aborted={}, \
             restarted={}, live={})",
            self.spawned,
            self.completed,
            self.failed,
            self.cancelled,
            self.aborted,
            self.restarted,
            self.live
        )
    }
}

/// The counters of one task kind and origin (see `TaskRegistry.stats_by_kind`).
#[pyclass(name = "KindStats", module = "dig_service._core", frozen, get_all, eq)]
#[derive(PartialEq, Eq)]
pub struct PyKindStats {
    kind: PyTaskKind,
    origin: &'static str,
    spawned: u64,
    failed: u64,
    restarted: u64,
    live: u64,
}

#[pymethods]
impl PyKindStats {
    fn __repr__(&self) -> String {
        format!(
            "KindStats(kind=TaskKind.{}, origin='{}', spawned={}, failed={}, restarted={}, live={})",
            self.kind.name(),
            self.origin,
            self.spawned,
            self.failed,
            self.restarted,
            self.live
        )
    }
}

/// Python's cyclic garbage collector paused while it lives, if it was
/// running: re-enabled on drop (also on an error or a panic), left off if
/// the user had turned it off. Nothing is collected less: objects made
/// meanwhile are still counted, and the next allocation after the pause
/// triggers whatever collection is due. Only while attached (the GIL held).
struct CollectorPaused(bool);

impl CollectorPaused {
    fn new() -> Self {
        // SAFETY: called attached (every caller holds a `Python` token);
        // `PyGC_Disable` returns the previous state and cannot fail.
        Self(unsafe { pyo3::ffi::PyGC_Disable() } == 1)
    }
}

impl Drop for CollectorPaused {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: as in `new`: dropped on the same thread, attached.
            unsafe { pyo3::ffi::PyGC_Enable() };
        }
    }
}
