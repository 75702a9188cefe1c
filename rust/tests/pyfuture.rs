//! `dig_service::python::run_coroutine`: a Python coroutine, running on an
//! asyncio loop in another thread, awaited from Rust.
//!
//! The trap (SPEC section 4): "a Python task behind a Rust future is
//! cancelled when the Rust side gives up on it" — pyo3-async-runtimes'
//! `into_future` leaves the Python task running. These tests give up in the
//! three ways Rust code does (a timeout, losing a `select!`, an aborted
//! tokio task) and check on the Python side that the task was cancelled
//! while it was running; and they check that the normal paths (a result,
//! an exception, a task cancelled on the Python side, a closed loop) end
//! the Rust future with the right value or a clear error, never a hang.
//!
//! Embeds CPython, so the binary links libpython:
//!
//! ```text
//! export PYO3_PYTHON=$PWD/.venv/bin/python \
//!   LD_LIBRARY_PATH=$(.venv/bin/python -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))')
//! cargo test --all-features --test pyfuture
//! ```

use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use dig_service::python::run_coroutine;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Upper bound for one wait; a healthy run needs milliseconds.
const WAIT: Duration = Duration::from_secs(10);

const HELPERS: &std::ffi::CStr = cr#"
import asyncio, threading

class Probe:
    """What happened to one coroutine, observable from any thread."""
    def __init__(self):
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

async def sleeper(probe, seconds):
    probe.started.set()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        probe.cancelled.set()
        raise
    probe.finished.set()
    return "slept"

async def answer():
    await asyncio.sleep(0)
    return 42

async def fails():
    await asyncio.sleep(0)
    raise ValueError("boom from python")

async def cancels_itself():
    asyncio.current_task().cancel()
    await asyncio.sleep(0)
"#;

fn helpers(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    static MODULE: OnceLock<Py<PyModule>> = OnceLock::new();
    if let Some(m) = MODULE.get() {
        return Ok(m.bind(py).clone());
    }
    let m = PyModule::from_code(py, HELPERS, c"pyfuture_helpers.py", c"pyfuture_helpers")?;
    Ok(MODULE.get_or_init(|| m.clone().unbind()).bind(py).clone())
}

/// An asyncio event loop running forever on a thread of its own.
struct LoopThread {
    event_loop: Py<PyAny>,
    thread: Option<JoinHandle<()>>,
}

impl LoopThread {
    fn start() -> Self {
        Python::initialize();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("python-asyncio".into())
            .spawn(move || {
                Python::attach(|py| -> PyResult<()> {
                    let event_loop = py.import("asyncio")?.call_method0("new_event_loop")?;
                    tx.send(event_loop.clone().unbind()).expect("test alive");
                    // Releases the GIL whenever the loop waits.
                    event_loop.call_method0("run_forever")?;
                    event_loop.call_method0("close")?;
                    Ok(())
                })
                .expect("the loop thread failed");
            })
            .expect("thread");
        let event_loop = rx.recv_timeout(WAIT).expect("the loop started");
        Self {
            event_loop,
            thread: Some(thread),
        }
    }

    /// Stop the loop and wait for its thread (which closes it).
    fn stop(&mut self) {
        Python::attach(|py| -> PyResult<()> {
            let lp = self.event_loop.bind(py);
            lp.call_method1("call_soon_threadsafe", (lp.getattr("stop")?,))?;
            Ok(())
        })
        .expect("stop the loop");
        if let Some(t) = self.thread.take() {
            t.join().expect("the loop thread panicked");
        }
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Wait (GIL released: `Event.wait` drops it) for a `threading.Event` of a
/// probe; `false` after `WAIT`. Runs off the tokio workers.
async fn wait_for(probe: &Py<PyAny>, event: &'static str) -> bool {
    let probe = Python::attach(|py| probe.clone_ref(py));
    tokio::task::spawn_blocking(move || {
        Python::attach(|py| {
            probe
                .bind(py)
                .getattr(event)?
                .call_method1("wait", (WAIT.as_secs_f64(),))?
                .is_truthy()
        })
        .expect("probe event")
    })
    .await
    .expect("wait_for")
}

fn is_set(probe: &Py<PyAny>, event: &str) -> bool {
    Python::attach(|py| {
        probe
            .bind(py)
            .getattr(event)?
            .call_method0("is_set")?
            .is_truthy()
    })
    .expect("probe event")
}

/// A probe and a `sleeper(probe, seconds)` future on `lp`.
fn sleeper(lp: &LoopThread, seconds: f64) -> (Py<PyAny>, dig_service::python::PyCoroutineFuture) {
    Python::attach(|py| -> PyResult<_> {
        let h = helpers(py)?;
        let probe = h.getattr("Probe")?.call0()?;
        let coro = h.getattr("sleeper")?.call1((&probe, seconds))?;
        let fut = run_coroutine(&coro, lp.event_loop.bind(py))?;
        Ok((probe.unbind(), fut))
    })
    .expect("schedule sleeper")
}

/// **Proves:** a coroutine's return value reaches Rust.
///
/// **Catches:** a future that resolves before the coroutine finished, or
/// with the wrong object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_reaches_rust() {
    let lp = LoopThread::start();
    let fut = Python::attach(|py| {
        let coro = helpers(py)?.getattr("answer")?.call0()?;
        run_coroutine(&coro, lp.event_loop.bind(py))
    })
    .unwrap();
    let value = tokio::time::timeout(WAIT, fut)
        .await
        .expect("no hang")
        .unwrap();
    let value: i64 = Python::attach(|py| value.extract(py)).unwrap();
    assert_eq!(value, 42);
}

/// **Proves:** a coroutine's exception reaches Rust as that Python exception
/// (type and message).
///
/// **Catches:** errors swallowed into a generic failure, or lost (a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_reaches_rust() {
    let lp = LoopThread::start();
    let fut = Python::attach(|py| {
        let coro = helpers(py)?.getattr("fails")?.call0()?;
        run_coroutine(&coro, lp.event_loop.bind(py))
    })
    .unwrap();
    let err = tokio::time::timeout(WAIT, fut)
        .await
        .expect("no hang")
        .unwrap_err();
    Python::attach(|py| {
        assert!(err.is_instance_of::<PyValueError>(py), "{err}");
        assert!(err.to_string().contains("boom from python"), "{err}");
    });
}

/// **Proves:** when Rust gives up through a timeout (the future is dropped
/// while the coroutine runs), the Python task is cancelled: the coroutine
/// sees `CancelledError` at its `await` and never finishes.
///
/// **Catches:** the pyo3-async-runtimes behaviour this wrapper exists to
/// fix — the Python task running on after Rust lost interest (work and
/// resources leak, side effects happen after a timeout was reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_cancels_the_python_task() {
    let lp = LoopThread::start();
    let (probe, fut) = sleeper(&lp, 3600.0);
    assert!(wait_for(&probe, "started").await);
    let res = tokio::time::timeout(Duration::from_millis(20), fut).await;
    assert!(res.is_err(), "the sleeper cannot have finished");
    assert!(
        wait_for(&probe, "cancelled").await,
        "Python task not cancelled"
    );
    assert!(!is_set(&probe, "finished"));
}

/// **Proves:** losing a `tokio::select!` (the other branch wins, the Python
/// future is dropped) cancels the Python task.
///
/// **Catches:** the same leak, on the commonest way Rust code gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_select_cancels_the_python_task() {
    let lp = LoopThread::start();
    let (probe, fut) = sleeper(&lp, 3600.0);
    assert!(wait_for(&probe, "started").await);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tx.send(()).unwrap();
    tokio::select! {
        biased;
        _ = rx => {}
        _ = fut => panic!("the sleeper cannot have finished"),
    }
    assert!(
        wait_for(&probe, "cancelled").await,
        "Python task not cancelled"
    );
}

/// **Proves:** aborting the tokio task that awaits the Python future (the
/// future is dropped on a runtime worker) cancels the Python task.
///
/// **Catches:** a drop path that needs the awaiting task to be polled again,
/// or that cannot attach to the interpreter from a worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_the_awaiting_task_cancels_the_python_task() {
    let lp = LoopThread::start();
    let (probe, fut) = sleeper(&lp, 3600.0);
    let waiter = tokio::spawn(fut);
    assert!(wait_for(&probe, "started").await);
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert!(
        wait_for(&probe, "cancelled").await,
        "Python task not cancelled"
    );
}

/// **Proves:** a future dropped after its coroutine finished cancels
/// nothing: the coroutine completed normally and its result was delivered.
///
/// **Catches:** a drop that cancels unconditionally (harmless here, but a
/// sign the completion bookkeeping is wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_future_is_not_cancelled() {
    let lp = LoopThread::start();
    let (probe, fut) = sleeper(&lp, 0.0);
    let value = tokio::time::timeout(WAIT, fut)
        .await
        .expect("no hang")
        .unwrap();
    let value: String = Python::attach(|py| value.extract(py)).unwrap();
    assert_eq!(value, "slept");
    assert!(is_set(&probe, "finished"));
    assert!(!is_set(&probe, "cancelled"));
}

/// **Proves:** when the Python side cancels the task itself, the Rust
/// future ends (with a `CancelledError`), it does not hang.
///
/// **Catches:** a completion path that only handles results and exceptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_side_cancellation_ends_the_rust_future() {
    let lp = LoopThread::start();
    let fut = Python::attach(|py| {
        let coro = helpers(py)?.getattr("cancels_itself")?.call0()?;
        run_coroutine(&coro, lp.event_loop.bind(py))
    })
    .unwrap();
    let err = tokio::time::timeout(WAIT, fut)
        .await
        .expect("no hang")
        .unwrap_err();
    Python::attach(|py| {
        let name = err.get_type(py).name().unwrap().to_string();
        assert!(name.contains("CancelledError"), "{name}: {err}");
    });
}

/// **Proves:** scheduling on a loop that is already closed is a clear
/// `RuntimeError` from `run_coroutine`, not a panic or a future that never
/// resolves.
///
/// **Catches:** a `PyCoroutineFuture` handed out for a coroutine that can
/// never run (the caller would wait forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_is_a_clear_error() {
    let mut lp = LoopThread::start();
    lp.stop();
    Python::attach(|py| {
        let coro = helpers(py)
            .unwrap()
            .getattr("answer")
            .unwrap()
            .call0()
            .unwrap();
        let err = run_coroutine(&coro, lp.event_loop.bind(py))
            .err()
            .expect("a closed loop is refused");
        assert!(err.is_instance_of::<PyRuntimeError>(py), "{err}");
        assert!(err.to_string().contains("closed"), "{err}");
        // The coroutine is still the caller's: close it (no "never awaited").
        coro.call_method0("close").unwrap();
    });
}

/// **Proves:** many Python tasks given up on at once (1 000 futures dropped
/// by one timeout) are all cancelled.
///
/// **Catches:** a drop path that loses cancellations under load (e.g. one
/// that needs the GIL and gives up when it is contended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_dropped_futures_all_cancel() {
    let lp = LoopThread::start();
    let (probes, futs): (Vec<_>, Vec<_>) = (0..1000).map(|_| sleeper(&lp, 3600.0)).unzip();
    for p in &probes {
        assert!(wait_for(p, "started").await);
    }
    let all = futures_join(futs);
    assert!(tokio::time::timeout(Duration::from_millis(20), all)
        .await
        .is_err());
    for p in &probes {
        assert!(
            wait_for(p, "cancelled").await,
            "a Python task was not cancelled"
        );
    }
}

/// Await every future (no `futures` crate needed).
async fn futures_join(futs: Vec<dig_service::python::PyCoroutineFuture>) {
    for f in futs {
        let _ = f.await;
    }
}
