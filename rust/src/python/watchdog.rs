//! `LoopWatchdog`: a native thread that notices when an asyncio event loop
//! has stopped turning.
//!
//! The event loop calls [`PyLoopWatchdog::beat`] from a timer every
//! `interval` (a quarter of `stall_warning`); `beat` stores a timestamp in
//! an atomic, nothing more, so a turning loop pays one timer callback every
//! `interval` and no lock, no allocation and no thread wake-up. The
//! watchdog thread sleeps until the next beat is overdue by `stall_warning`;
//! if none came by then, the loop has not run a due timer for
//! `stall_warning` seconds: the loop is stuck in a synchronous call.
//!
//! Guarantees:
//! - **Once per stall.** One warning (logger `dig_service.watchdog`) with
//!   the loop thread's Python stack at that moment, then, when the loop
//!   turns again, one line with the stall's length (from the missed beat's
//!   due time to the first beat after it). The two lines come from the
//!   watchdog thread, in that order.
//! - **No Rust lock is held while Python runs**; the thread takes the GIL
//!   only to report a stall (never while the loop turns).
//! - **Started only when asked** (a `LoopWatchdog` is built), **stopped
//!   deterministically**: `stop()` joins the thread with the GIL released.
//!   Dropping a watchdog that was not stopped tells the thread to end
//!   without waiting for it. A watchdog inherited across `os.fork()` does
//!   not join its parent's thread (the child has none).
//! - **Interpreter exit.** A thread that waits for the GIL once the
//!   interpreter finalises is ended with a forced unwind, which aborts the
//!   process if it meets Rust frames (see [`super::exit`]). So an `atexit`
//!   hook, registered when the first watchdog is built (it runs before the
//!   runtime's), stops every watchdog thread of this process and waits for
//!   them (GIL released, up to 2 s); from then on none attaches again.
//!
//! The GIL orders `beat` (a Python method, called with the GIL) against the
//! thread's decision to report: the thread re-reads the last beat and sets
//! `stalled` while holding the GIL, so a beat is either before the decision
//! (no stall is reported) or after it (it sees `stalled` and hands its time
//! over as the end of the stall).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};

use super::fork;
use super::interop::{get_logger, seconds_arg, str_arg};

/// Frames of the loop thread's stack shown in a stall warning (innermost).
const MAX_FRAMES: usize = 64;
/// The smallest `stall_warning` accepted (the beat then runs every 2.5 ms).
const MIN_STALL: f64 = 0.01;
/// How long the exit hook waits for the watchdog threads to end.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Set for good by the exit hook: no watchdog thread attaches any more.
/// SeqCst with the thread's check before it attaches: either the thread
/// sees it (and does not attach), or the hook, which sets it first, then
/// waits for that thread to end with the GIL released (so the thread can
/// attach, report and leave before the interpreter finalises).
static EXITING: AtomicBool = AtomicBool::new(false);

/// Every watchdog thread started in this process (and in the one it was
/// forked from), for the exit hook. Locked only to add and to take entries:
/// no Python code runs under it.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

struct Live {
    shared: Arc<Shared>,
    thread: Thread,
    generation: u64,
}

/// State shared by the loop (through `beat`) and the watchdog thread.
struct Shared {
    /// The zero of the nanosecond timestamps below.
    base: Instant,
    /// When the loop last beat, in ns since `base`. Written by the loop
    /// thread only; read by the watchdog thread. It carries no other data,
    /// so `Relaxed` suffices: a stale read only delays a decision, which is
    /// re-made under the GIL (see the module doc).
    last_beat: AtomicU64,
    /// How late the last beat came (ns past its due time, `interval` after
    /// the beat before it), for [`PyLoopWatchdog::lag`]. Written by the loop
    /// thread only, `Relaxed`: a metric, read on its own.
    last_late: AtomicU64,
    /// Set by the watchdog thread (with the GIL) once it reported a stall;
    /// cleared by the first beat after it. Release/Acquire: the beat stores
    /// `resumed_at` before it clears the flag, and the thread reads
    /// `resumed_at` after it saw the flag cleared.
    stalled: AtomicBool,
    /// The time of the first beat after a reported stall (ns since `base`).
    resumed_at: AtomicU64,
    /// Tells the thread to end (Release by `stop`/`drop`, Acquire by the
    /// thread, which then touches nothing else).
    stop: AtomicBool,
    /// Stalls reported so far (for tests and, later, metrics); `Relaxed`:
    /// a counter.
    stalls: AtomicU64,
    /// Set by the thread as it ends (Release; the exit hook reads it with
    /// Acquire and then relies on nothing the thread did).
    ended: AtomicBool,
    interval: Duration,
    stall: Duration,
    /// `threading.get_ident()` of the loop's thread.
    loop_thread: u64,
    label: String,
    logger: String,
}

impl Shared {
    fn now(&self) -> u64 {
        nanos(self.base.elapsed())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A native thread that warns when an event loop stops turning.
///
/// `LoopWatchdog(stall_warning, thread_id, label, logger)` starts the
/// thread; the event loop must call `beat()` every `interval` seconds (a
/// `loop.call_later` timer); `stop()` ends the thread and waits for it.
#[pyclass(name = "LoopWatchdog", module = "dig_service._core", frozen)]
pub struct PyLoopWatchdog {
    shared: Arc<Shared>,
    /// The thread, to unpark it from `beat` (cloned out of the join handle).
    thread: Thread,
    join: Mutex<Option<JoinHandle<()>>>,
    generation: u64,
}

#[pymethods]
impl PyLoopWatchdog {
    #[new]
    #[pyo3(signature = (stall_warning, thread_id, label, logger = None))]
    fn new(
        stall_warning: &Bound<'_, PyAny>,
        thread_id: u64,
        label: &Bound<'_, PyAny>,
        logger: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        const FUNC: &str = "LoopWatchdog()";
        let secs = seconds_arg(stall_warning, FUNC, "stall_warning")?;
        if secs < MIN_STALL {
            return Err(PyValueError::new_err(format!(
                "{FUNC}: `stall_warning` must be at least {MIN_STALL} seconds, got {secs}"
            )));
        }
        let label = str_arg(label, FUNC, "label")?.to_str()?.to_owned();
        let logger = match logger {
            Some(l) => str_arg(l, FUNC, "logger")?.to_str()?.to_owned(),
            None => "dig_service.watchdog".to_owned(),
        };
        let stall = Duration::from_secs_f64(secs);
        let base = Instant::now();
        let shared = Arc::new(Shared {
            base,
            last_beat: AtomicU64::new(0),
            last_late: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            resumed_at: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stalls: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            interval: stall / 4,
            stall,
            loop_thread: thread_id,
            label,
            logger,
        });
        install_exit_hook(stall_warning.py())?;
        if EXITING.load(Ordering::SeqCst) {
            return Err(PyRuntimeError::new_err(
                "LoopWatchdog(): the interpreter is exiting (its atexit hooks have run)",
            ));
        }
        let for_thread = shared.clone();
        let join = thread::Builder::new()
            .name("dig-service-watchdog".to_owned())
            .spawn(move || {
                watch(&for_thread);
                for_thread.ended.store(true, Ordering::Release);
            })
            .map_err(|e| {
                PyRuntimeError::new_err(format!(
                    "LoopWatchdog(): cannot start the watchdog thread: {e}"
                ))
            })?;
        {
            let mut live = LIVE.lock();
            // Drop the ended threads, and those of the process this one was
            // forked from (they do not exist here).
            let generation = fork::generation();
            live.retain(|l| l.generation == generation && !l.shared.ended.load(Ordering::Acquire));
            live.push(Live {
                shared: shared.clone(),
                thread: join.thread().clone(),
                generation: fork::generation(),
            });
        }
        Ok(Self {
            shared,
            thread: join.thread().clone(),
            join: Mutex::new(Some(join)),
            generation: fork::generation(),
        })
    }

    /// Seconds between two beats the loop must give (a quarter of `stall_warning`).
    #[getter]
    fn interval(&self) -> f64 {
        self.shared.interval.as_secs_f64()
    }

    /// Seconds without a turn of the loop before a warning.
    #[getter]
    fn stall_warning(&self) -> f64 {
        self.shared.stall.as_secs_f64()
    }

    /// How many stalls have been reported.
    #[getter]
    fn stalls(&self) -> u64 {
        self.shared.stalls.load(Ordering::Relaxed)
    }

    /// How far behind the event loop is, in seconds: how late its last beat
    /// came, or, while the next one is overdue, how overdue it is (so a
    /// stall shows as a lag that grows until the loop turns again). The
    /// resolution is the beat's: `interval`. Safe from any thread.
    #[getter]
    fn lag(&self) -> f64 {
        let shared = &*self.shared;
        let now = shared.now();
        let due = shared
            .last_beat
            .load(Ordering::Relaxed)
            .saturating_add(nanos(shared.interval));
        let late = shared.last_late.load(Ordering::Relaxed);
        Duration::from_nanos(late.max(now.saturating_sub(due))).as_secs_f64()
    }

    /// The loop turned: record the time. Called by the loop's timer.
    fn beat(&self) {
        let shared = &*self.shared;
        let now = shared.now();
        // The loop thread is the only writer of `last_beat` and `last_late`.
        let due = shared
            .last_beat
            .load(Ordering::Relaxed)
            .saturating_add(nanos(shared.interval));
        shared
            .last_late
            .store(now.saturating_sub(due), Ordering::Relaxed);
        shared.last_beat.store(now, Ordering::Relaxed);
        // Rare path: the first beat after a reported stall ends it.
        if shared.stalled.load(Ordering::Relaxed) {
            shared.resumed_at.store(now, Ordering::Relaxed);
            shared.stalled.store(false, Ordering::Release);
            self.thread.unpark();
        }
    }

    /// Whether the thread is running (not stopped).
    fn is_running(&self) -> bool {
        self.join.lock().is_some()
    }

    /// End the thread and wait for it (with the GIL released). Idempotent.
    ///
    /// A stall already reported and ended by a beat gets its "stall ended"
    /// line first; the loop side beats once just before it stops the
    /// watchdog (it is turning), so a stall never stays open.
    fn stop(&self, py: Python<'_>) {
        self.shared.stop.store(true, Ordering::Release);
        let join = self.join.lock().take();
        let Some(join) = join else { return };
        if self.generation != fork::generation() || join.thread().id() == thread::current().id() {
            // A forked child has no such thread; the thread itself cannot
            // wait for itself. It ends on its own once it sees `stop`.
            drop(join);
            return;
        }
        join.thread().unpark();
        py.detach(move || {
            let _ = join.join();
        });
    }

    fn __repr__(&self) -> String {
        format!(
            "<LoopWatchdog {:?} stall_warning={}s {}>",
            self.shared.label,
            self.shared.stall.as_secs_f64(),
            if self.is_running() {
                "running"
            } else {
                "stopped"
            }
        )
    }
}

impl Drop for PyLoopWatchdog {
    fn drop(&mut self) {
        // Not stopped: tell the thread to end, but never wait in a destructor
        // (it may run with the GIL held, which the thread may be waiting for).
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// What the thread found when it looked at a stall under the GIL.
enum Look {
    /// Reported: the loop is still stuck (warning logged).
    Stalled,
    /// The loop had turned again before the thread could look.
    Resumed,
    /// The interpreter is finalising (or the watchdog was stopped): end.
    Gone,
}

/// The watchdog thread.
fn watch(shared: &Shared) {
    let interval = nanos(shared.interval);
    let stall = nanos(shared.stall);
    // The due time of the beat whose absence was reported, while the stall lasts.
    let mut reported: Option<u64> = None;
    loop {
        if let Some(due) = reported {
            if shared.stalled.load(Ordering::Acquire) {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                // Still stuck. The first beat unparks us; the timeout is a safety net.
                thread::park_timeout(shared.interval);
                continue;
            }
            // Reported before `stop` is honoured: a stall that ended is always closed.
            let resumed = shared.resumed_at.load(Ordering::Relaxed);
            reported = None;
            let length = Duration::from_nanos(resumed.saturating_sub(due));
            let msg = format!(
                "service {}: event loop stall ended after {:.3}s",
                shared.label,
                length.as_secs_f64()
            );
            if log_warning(shared, &msg).is_none() {
                return;
            }
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let due = shared.last_beat.load(Ordering::Relaxed) + interval;
        let now = shared.now();
        let alarm = due + stall;
        if now < alarm {
            thread::park_timeout(Duration::from_nanos(alarm - now));
            continue;
        }
        match look(shared, due) {
            Look::Stalled => reported = Some(due),
            Look::Resumed => {}
            Look::Gone => return,
        }
    }
}

/// Under the GIL: if the loop still has not beaten since `due - interval`,
/// mark the stall and log the warning with the loop thread's stack.
fn look(shared: &Shared, due: u64) -> Look {
    let interval = nanos(shared.interval);
    let outcome = attach(|py| {
        if shared.stop.load(Ordering::Acquire) {
            return Look::Gone;
        }
        let last = shared.last_beat.load(Ordering::Relaxed);
        if last + interval != due {
            // It turned while we waited for the GIL. If that turn came
            // `stall_warning` late, a stall it was, but its stack is gone: say
            // so once, with its length. (Else our first read was stale.)
            let late = last.saturating_sub(due);
            if late < nanos(shared.stall) {
                return Look::Resumed;
            }
            let length = Duration::from_nanos(late);
            let msg = format!(
                "service {}: event loop did not turn for {:.3}s (stall_warning {}s); it \
                 resumed before its stack could be taken",
                shared.label,
                length.as_secs_f64(),
                shared.stall.as_secs_f64()
            );
            shared.stalls.fetch_add(1, Ordering::Relaxed);
            let _ = warn(py, shared, &msg);
            return Look::Resumed;
        }
        // From here the next beat sees `stalled` (it needs the GIL we hold).
        shared.stalled.store(true, Ordering::Release);
        shared.stalls.fetch_add(1, Ordering::Relaxed);
        let stuck_for = Duration::from_nanos(shared.now().saturating_sub(due));
        let stack = loop_stack(py, shared.loop_thread)
            .unwrap_or_else(|e| format!("  (the stack could not be taken: {e})\n"));
        let msg = format!(
            "service {}: event loop has not turned for {:.3}s (stall_warning {}s); a callback \
             is blocking it. The loop thread is at (most recent call last):\n{}",
            shared.label,
            stuck_for.as_secs_f64(),
            shared.stall.as_secs_f64(),
            stack.trim_end()
        );
        let _ = warn(py, shared, &msg);
        Look::Stalled
    });
    outcome.unwrap_or(Look::Gone)
}

/// Log `msg` as a warning, attaching to the interpreter; `None` if it is gone.
fn log_warning(shared: &Shared, msg: &str) -> Option<()> {
    attach(|py| {
        let _ = warn(py, shared, msg);
    })
}

/// Attach to the interpreter, unless it is exiting (`None`: the thread ends).
fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    if EXITING.load(Ordering::SeqCst) {
        return None;
    }
    // This thread has no Python thread state: wait out a fork (`fork.rs`).
    let _fork = super::fork::hold_off();
    Python::try_attach(f)
}

/// Register [`_stop_watchdogs_at_exit`] with `atexit`, once per process.
fn install_exit_hook(py: Python<'_>) -> PyResult<()> {
    static HOOK: PyOnceLock<()> = PyOnceLock::new();
    HOOK.get_or_try_init(py, || {
        let hook = pyo3::wrap_pyfunction!(_stop_watchdogs_at_exit, py)?;
        py.import("atexit")?.call_method1("register", (hook,))?;
        Ok::<_, PyErr>(())
    })?;
    Ok(())
}

/// The `atexit` hook: stop every watchdog thread of this process and wait
/// for them (GIL released, up to [`EXIT_GRACE`]), so that none waits for
/// the GIL while the interpreter finalises.
#[pyfunction]
fn _stop_watchdogs_at_exit(py: Python<'_>) {
    EXITING.store(true, Ordering::SeqCst);
    let generation = fork::generation();
    let live: Vec<Live> = std::mem::take(&mut *LIVE.lock());
    let ours: Vec<Live> = live
        .into_iter()
        .filter(|l| l.generation == generation)
        .collect();
    for l in &ours {
        l.shared.stop.store(true, Ordering::Release);
        l.thread.unpark();
    }
    py.detach(|| {
        let until = Instant::now() + EXIT_GRACE;
        while ours.iter().any(|l| !l.shared.ended.load(Ordering::Acquire)) && Instant::now() < until
        {
            thread::sleep(Duration::from_millis(1));
        }
    });
}

fn warn(py: Python<'_>, shared: &Shared, msg: &str) -> PyResult<()> {
    get_logger(py)?
        .call1((shared.logger.as_str(),))?
        .call_method1(pyo3::intern!(py, "warning"), ("%s", msg))?;
    Ok(())
}

/// The Python stack of thread `ident`, innermost last, as traceback text.
///
/// The frames are read first (attribute reads only: the GIL is not
/// released, so the thread cannot move meanwhile), then their source lines
/// are looked up (which may read files).
fn loop_stack(py: Python<'_>, ident: u64) -> PyResult<String> {
    let frames = py.import("sys")?.call_method0("_current_frames")?;
    let frames = frames.cast::<PyDict>()?;
    let Some(mut frame) = frames.get_item(ident)? else {
        return Ok("  (the loop thread has no Python frame)\n".to_owned());
    };
    let mut entries: Vec<(String, i64, String)> = Vec::new();
    while !frame.is_none() && entries.len() < MAX_FRAMES {
        let code = frame.getattr(pyo3::intern!(py, "f_code"))?;
        let filename: String = code.getattr(pyo3::intern!(py, "co_filename"))?.extract()?;
        let name: String = code.getattr(pyo3::intern!(py, "co_name"))?.extract()?;
        let lineno: i64 = frame
            .getattr(pyo3::intern!(py, "f_lineno"))?
            .extract()
            .unwrap_or(0);
        entries.push((filename, lineno, name));
        frame = frame.getattr(pyo3::intern!(py, "f_back"))?;
    }
    let truncated = !frame.is_none();
    let getline = py.import("linecache")?.getattr("getline")?;
    let mut out = String::new();
    if truncated {
        out.push_str(&format!(
            "  ... (outer frames omitted; {MAX_FRAMES} shown)\n"
        ));
    }
    for (filename, lineno, name) in entries.iter().rev() {
        out.push_str(&format!(
            "  File \"{filename}\", line {lineno}, in {name}\n"
        ));
        let source = getline
            .call1((filename.as_str(), *lineno))
            .and_then(|s| s.cast_into::<PyString>().map_err(PyErr::from))
            .map(|s| s.to_string())
            .unwrap_or_default();
        let source = source.trim();
        if !source.is_empty() {
            out.push_str(&format!("    {source}\n"));
        }
    }
    Ok(out)
}
