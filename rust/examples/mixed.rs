//! # `mixed`: one service, Rust and Python tasks, one token, one deadline
//!
//! A Rust binary that embeds CPython and runs a `dig_service::Service`
//! whose Rust node
//!
//! - spawns native tokio tasks into `ctx.tasks` (`rust-heartbeat`,
//!   `rust-compactor`), and
//! - starts an asyncio event loop on a thread of its own, where the Python
//!   module `mixed_tasks` (in `examples/mixed_py/`) spawns its
//!   coroutines (`py-ticker`, `py-flusher`) into the **same** registry,
//!   through `dig_service::python::registry_to_py`.
//!
//! On Ctrl-C or SIGTERM the Rust side cancels the one shutdown token: both
//! kinds of task see it, and `Service::start` joins them all under one
//! deadline. A second Ctrl-C/SIGTERM exits at once (128 + signal number).
//!
//! ```text
//! PYO3_PYTHON=$PWD/.venv/bin/python \
//! LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \
//!   cargo run --features python --example mixed -- [--stubborn] [--deadline SECS] [--stop-after SECS]
//! ```
//!
//! - `--stubborn` adds a Python task that ignores the token: the deadline
//!   cancels it, the service reports `ShutdownDeadlineExceeded` naming it
//!   (the shutdown report printed at the end shows the stack it was stuck
//!   in), and the exit code is 1.
//! - `--deadline SECS` is the shutdown deadline (default 5).
//! - `--stop-after SECS` requests the shutdown by itself after SECS, as if
//!   Ctrl-C had been pressed (for trying it headless).
//!
//! ## The GIL rules this program follows
//!
//! - The interpreter is initialised once, on the main thread, which then
//!   releases the GIL (`Python::initialize`); the tokio runtime is built
//!   and dropped with no GIL held.
//! - The asyncio loop runs on its own OS thread (`python-asyncio`), never on
//!   a tokio worker: a worker only attaches for one short call (cancelling
//!   the token wakes Python waiters with one `call_soon_threadsafe`; the
//!   deadline cancels a Python straggler the same way).
//! - Rust never waits for Python while attached: the node waits for the
//!   Python side on tokio channels, and joins the Python thread through
//!   `spawn_blocking` once it has said it is done.
//!
//! The test `rust/tests/mixed.rs` runs this same node headless.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use async_trait::async_trait;
use dig_service::python::{register_embedded, registry_to_py};
use dig_service::{
    NodeLifecycle, RunContext, Service, ServiceConfig, ShutdownReason, ShutdownToken, StartContext,
    StopContext, TaskKind, TaskRegistry,
};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};
use tokio::sync::oneshot;

/// Narration on stderr, so that a new user sees what happens (stdout stays
/// clean). Python's side logs through `logging`, set up in `main`.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // One `write` per line, so lines from the Python thread never land
        // in the middle of one (and a closed stderr is not a panic).
        let line = format!("[mixed.rust] {}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// The Python module whose coroutines the node runs.
pub const PYTHON_MODULE: &str = "mixed_tasks";

/// How long, after the registry was joined, the Python event loop gets to
/// finish (its tasks have ended or been cancelled by then; this is only the
/// loop winding down).
pub const PYTHON_EXIT_GRACE: Duration = Duration::from_secs(2);

/// The directories the embedded interpreter needs on `sys.path`: the
/// `dig_service` package (`python/`) and this example's Python module. A
/// real binary would ship these next to itself, or in a virtualenv.
pub fn python_dirs() -> [PathBuf; 2] {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [root.join("python"), root.join("examples/mixed_py")]
}

/// Start the embedded interpreter (once per process) and make
/// `import dig_service` and `import mixed_tasks` work in it.
///
/// `register_embedded` puts this binary's own copy of the native module in
/// `sys.modules` as `dig_service._core`, so the pure-Python package uses
/// it (and never loads a `_core*.so` it might find next to itself: that
/// would be a second, unrelated copy of the Rust core).
pub fn init_python() -> anyhow::Result<()> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        Python::initialize();
        Python::attach(|py| -> PyResult<()> {
            register_embedded(py)?;
            let sys_path = py.import("sys")?.getattr("path")?;
            for dir in python_dirs().iter().rev() {
                // A `str`: the import system skips `pathlib.Path` entries.
                sys_path.call_method1("insert", (0, dir.to_string_lossy()))?;
            }
            Ok(())
        })
        .map_err(|e| format!("cannot set up the embedded Python: {e}"))
    })
    .clone()
    .map_err(|msg| anyhow!(msg))
}

/// What the node runs.
#[derive(Debug, Clone)]
pub struct MixedOptions {
    /// Also spawn `py-stubborn`, a Python task that ignores the token.
    pub stubborn_python_task: bool,
    /// The period of the heartbeat / ticker loops.
    pub tick: Duration,
}

impl Default for MixedOptions {
    fn default() -> Self {
        Self {
            stubborn_python_task: false,
            tick: Duration::from_secs(1),
        }
    }
}

// ---------------------------------------------------------------------------
// The native side.

/// A native background loop: beats every `tick` until the token fires.
async fn rust_heartbeat(token: ShutdownToken, tick: Duration) -> anyhow::Result<()> {
    let mut beats = 0u64;
    let mut interval = tokio::time::interval(tick);
    interval.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = interval.tick() => {
                beats += 1;
                say!("rust-heartbeat: beat {beats}");
            }
        }
    }
    say!(
        "rust-heartbeat: saw the token fire ({}) after {beats} beats; stopping",
        reason_of(&token)
    );
    Ok(())
}

/// A native task that only waits for shutdown, then does a short cleanup.
async fn rust_compactor(token: ShutdownToken) -> anyhow::Result<()> {
    token.cancelled().await;
    say!("rust-compactor: token fired; compacting");
    tokio::time::sleep(Duration::from_millis(50)).await; // stands for real work
    say!("rust-compactor: done");
    Ok(())
}

fn reason_of(token: &ShutdownToken) -> String {
    token
        .reason()
        .map_or_else(|| "no reason".to_owned(), |r| r.to_string())
}

/// Spawn the node's native tokio tasks into `tasks`.
pub fn spawn_native_tasks(tasks: &TaskRegistry, tick: Duration) -> anyhow::Result<()> {
    let token = tasks.shutdown().clone();
    tasks.spawn(
        "rust-heartbeat",
        TaskKind::BackgroundLoop,
        rust_heartbeat(token.clone(), tick),
    )?;
    tasks.spawn(
        "rust-compactor",
        TaskKind::Maintenance,
        rust_compactor(token),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The Python side: an asyncio loop on a dedicated thread.

type Ready = Result<Vec<String>, String>;
type Outcomes = BTreeMap<String, String>;

/// The asyncio event loop thread running `mixed_tasks.serve`.
#[derive(Debug)]
pub struct PythonLoop {
    thread: ThreadHandle<()>,
    done: oneshot::Receiver<Result<Outcomes, String>>,
}

impl PythonLoop {
    /// Start the thread and return once the Python tasks are tracked by
    /// `tasks`; returns their names. Awaits on a channel: no GIL is held
    /// by the caller while Python starts.
    pub async fn start(
        tasks: &TaskRegistry,
        opts: &MixedOptions,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
        let (done_tx, done) = oneshot::channel();
        let ready_tx = Arc::new(Mutex::new(Some(ready_tx)));
        let (tasks, opts) = (tasks.clone(), opts.clone());
        let thread = std::thread::Builder::new()
            .name("python-asyncio".into())
            .spawn(move || {
                let result = run_python_loop(&tasks, &opts, &ready_tx);
                if let Err(msg) = &result {
                    // Failed before (or instead of) reporting ready.
                    if let Some(tx) = ready_tx.lock().take() {
                        let _ = tx.send(Err(msg.clone()));
                    }
                }
                let _ = done_tx.send(result);
            })
            .context("cannot start the Python thread")?;
        let names = match ready_rx.await {
            Ok(Ok(names)) => names,
            Ok(Err(msg)) => bail!("the Python side failed to start:\n{msg}"),
            Err(_) => bail!("the Python thread ended before its tasks were spawned"),
        };
        Ok((Self { thread, done }, names))
    }

    /// Wait (up to `grace`) for the Python side to finish, and return what
    /// became of each Python task (`"observed <reason>"` or `"cancelled"`).
    pub async fn finish(self, grace: Duration) -> anyhow::Result<Outcomes> {
        let outcomes = match tokio::time::timeout(grace, self.done).await {
            Ok(Ok(Ok(outcomes))) => outcomes,
            Ok(Ok(Err(msg))) => bail!("the Python side failed:\n{msg}"),
            Ok(Err(_)) => bail!("the Python thread died without a result"),
            Err(_) => bail!(
                "the Python event loop did not finish within {grace:?} after the join; left it running"
            ),
        };
        // The thread has sent its last word: joining it is immediate, but
        // is still a blocking call, so keep it off the tokio workers.
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow!("the Python thread panicked"))?;
        Ok(outcomes)
    }
}

/// The body of the `python-asyncio` thread: `asyncio.run(mixed_tasks.serve(...))`
/// with a Python view of the Rust registry. The GIL is held by this thread
/// only while Python runs; asyncio releases it whenever the loop sleeps.
fn run_python_loop(
    tasks: &TaskRegistry,
    opts: &MixedOptions,
    ready_tx: &Arc<Mutex<Option<oneshot::Sender<Ready>>>>,
) -> Result<Outcomes, String> {
    Python::attach(|py| {
        let run = || -> PyResult<Outcomes> {
            let module = py.import(PYTHON_MODULE)?;
            // The same Rust registry (and its token), seen from Python.
            let registry = registry_to_py(py, tasks)?;
            let ready_slot = ready_tx.clone();
            let ready = PyCFunction::new_closure(
                py,
                Some(c"ready"),
                None,
                move |args: &Bound<'_, PyTuple>,
                      _kwargs: Option<&Bound<'_, PyDict>>|
                      -> PyResult<()> {
                    let (names,): (Vec<String>,) = args.extract()?;
                    if let Some(tx) = ready_slot.lock().take() {
                        let _ = tx.send(Ok(names));
                    }
                    Ok(())
                },
            )?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("stubborn_task", opts.stubborn_python_task)?;
            kwargs.set_item("period", opts.tick.as_secs_f64())?;
            let serve = module
                .getattr("serve")?
                .call((registry, ready), Some(&kwargs))?;
            // A fresh event loop on this thread, closed when `serve` returns.
            py.import("asyncio")?
                .call_method1("run", (serve,))?
                .extract()
        };
        run().map_err(|e| describe(py, &e))
    })
}

/// A Python exception with its traceback, as text.
fn describe(py: Python<'_>, err: &PyErr) -> String {
    py.import("traceback")
        .and_then(|tb| tb.call_method1("format_exception", (err.value(py),)))
        .and_then(|lines| lines.extract::<Vec<String>>())
        .map(|lines| lines.concat())
        .unwrap_or_else(|_| err.to_string())
}

// ---------------------------------------------------------------------------
// The node.

/// The node of the mixed service: native tasks and a Python event loop,
/// all tracked by the service's one registry.
#[derive(Debug, Default)]
pub struct MixedNode {
    opts: MixedOptions,
    python: Mutex<Option<PythonLoop>>,
    outcomes: Mutex<Option<Outcomes>>,
}

impl MixedNode {
    /// A node with these options.
    pub fn new(opts: MixedOptions) -> Self {
        Self {
            opts,
            ..Self::default()
        }
    }

    /// What became of each Python task, once `on_stop` has run.
    pub fn python_outcomes(&self) -> Option<Outcomes> {
        self.outcomes.lock().clone()
    }
}

#[async_trait]
impl NodeLifecycle for MixedNode {
    const NAME: Option<&'static str> = Some("mixed");

    async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        spawn_native_tasks(ctx.tasks, self.opts.tick)?;
        say!("spawned native tokio tasks rust-heartbeat, rust-compactor");
        let (python, names) = PythonLoop::start(ctx.tasks, &self.opts).await?;
        say!(
            "the Python side spawned {} into the same registry",
            names.join(", ")
        );
        *self.python.lock() = Some(python);
        Ok(())
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        let snapshot = ctx.tasks.snapshot();
        say!("one registry, {} live tasks:", snapshot.len());
        for t in &snapshot {
            say!(
                "  {:<16} {:<16} origin={}",
                &*t.name,
                format!("{:?}", t.kind),
                t.origin.as_str()
            );
        }
        ctx.shutdown.cancelled().await;
        say!(
            "token fired ({}); joining native and Python tasks under one deadline",
            reason_of(&ctx.shutdown)
        );
        Ok(())
    }

    async fn on_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        // By now the registry is joined: every task ended on the token, or
        // was aborted (native) / handed a cancel (Python) at the deadline.
        // The Python loop then runs those cancellations and finishes.
        let python = self.python.lock().take();
        if let Some(python) = python {
            let outcomes = python.finish(PYTHON_EXIT_GRACE).await?;
            say!("the Python event loop has finished; its tasks:");
            for (name, outcome) in &outcomes {
                say!("  {name}: {outcome}");
            }
            *self.outcomes.lock() = Some(outcomes);
        }
        let s = ctx.tasks.stats();
        say!(
            "registry: {} spawned, {} completed, {} cancelled (Python), {} aborted (native), {} failed, {} live",
            s.spawned, s.completed, s.cancelled, s.aborted, s.failed, s.live
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The binary.

struct Args {
    opts: MixedOptions,
    deadline: Duration,
    stop_after: Option<Duration>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        opts: MixedOptions::default(),
        deadline: Duration::from_secs(5),
        stop_after: None,
    };
    let mut it = std::env::args().skip(1);
    let secs = |flag: &str, v: Option<String>| -> anyhow::Result<Duration> {
        let v = v.with_context(|| format!("{flag} needs a number of seconds"))?;
        let s: f64 = v
            .parse()
            .with_context(|| format!("{flag}: not a number: {v:?}"))?;
        Duration::try_from_secs_f64(s).with_context(|| format!("{flag}: not a duration: {v:?}"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--stubborn" => args.opts.stubborn_python_task = true,
            "--deadline" => args.deadline = secs("--deadline", it.next())?,
            "--stop-after" => args.stop_after = Some(secs("--stop-after", it.next())?),
            "-h" | "--help" => {
                eprintln!("usage: mixed [--stubborn] [--deadline SECS] [--stop-after SECS]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// Resolves on the first SIGINT/SIGTERM; returns its name and number.
async fn signal() -> (&'static str, u8) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => ("SIGINT", 2),
                _ = term.recv() => ("SIGTERM", 15),
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                ("SIGINT", 2)
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        ("SIGINT", 2)
    }
}

async fn serve(args: Args) -> u8 {
    let config = ServiceConfig::new()
        .with_shutdown_deadline(args.deadline)
        .with_hook_timeout(Some(Duration::from_secs(10)));
    let svc = Service::with_config(MixedNode::new(args.opts), (), (), config);
    let handle = svc.handle();
    let deadline = args.deadline;
    let stop_after = args.stop_after;
    tokio::spawn(async move {
        let stop_after = async {
            match stop_after {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (name, _) = signal() => say!("{name}: shutting down (deadline {deadline:?} for Rust and Python tasks alike)"),
            () = stop_after => say!("--stop-after elapsed: shutting down as if Ctrl-C was pressed"),
        }
        handle.request_shutdown(ShutdownReason::UserRequested);
        let (name, number) = signal().await;
        say!("second {name} during shutdown: exiting at once");
        std::process::exit(128 + i32::from(number));
    });

    say!("starting; press Ctrl-C (or send SIGTERM) to stop");
    let result = svc.start().await;
    // The shutdown's report: each stage's time, and every straggler (a
    // Python one with the stack it was stuck in).
    let report = match &result {
        Ok(status) => status.report(),
        Err(e) => e.report(),
    };
    for line in report.map(ToString::to_string).unwrap_or_default().lines() {
        say!("{line}");
    }
    match result {
        Ok(status) => {
            say!("service stopped: {status}");
            u8::try_from(status.exit_code()).unwrap_or(1)
        }
        Err(e) => {
            say!("service failed: {e}");
            1
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mixed: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_python().and_then(|()| {
        // Python's logging (and, through the bridge dig_service installs,
        // the Rust core's `tracing` events) to stderr.
        Python::attach(|py| {
            let logging = py.import("logging")?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("level", logging.getattr("INFO")?)?;
            kwargs.set_item("format", "[%(name)s] %(message)s")?;
            logging.call_method("basicConfig", (), Some(&kwargs))?;
            PyResult::Ok(())
        })
        .map_err(anyhow::Error::from)
    }) {
        eprintln!("mixed: {e:#}");
        return ExitCode::from(1);
    }
    // Built and dropped on the main thread, which is not attached to Python.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mixed: cannot start tokio: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(serve(args));
    rt.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}
