//! The mixed Rust/Python arrangement of `rust/examples/mixed.rs`, headless:
//! native tokio tasks and Python coroutines (run by an embedded CPython on
//! an asyncio loop of their own) in one `TaskRegistry`, stopped by one
//! `ShutdownToken` under one deadline.
//!
//! The example's node and helpers are compiled in here as they are, so this
//! test runs exactly what the example runs. The binary links libpython:
//!
//! ```text
//! LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \
//! PYO3_PYTHON=$PWD/.venv/bin/python cargo test --all-features --test mixed
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dig_service::{
    ExitReason, Service, ServiceConfig, ServiceError, ShutdownReason, ShutdownToken, TaskRegistry,
    TaskStats, TaskSummary,
};

#[allow(dead_code)]
#[path = "../examples/mixed.rs"]
mod example;

use example::{MixedNode, MixedOptions, PythonLoop};

const TICK: Duration = Duration::from_millis(50);
/// Long enough that a clean stop is nowhere near it on a loaded 2-core box.
const GENEROUS: Duration = Duration::from_secs(10);
/// Short, for the tests that wait for it to pass.
const SHORT: Duration = Duration::from_millis(300);

fn options(stubborn: bool) -> MixedOptions {
    MixedOptions {
        stubborn_python_task: stubborn,
        tick: TICK,
    }
}

/// Name → origin of every live task.
fn origins(snapshot: &[TaskSummary]) -> BTreeMap<String, &'static str> {
    snapshot
        .iter()
        .map(|t| (t.name.to_string(), t.origin.as_str()))
        .collect()
}

fn expected_origins(stubborn: bool) -> BTreeMap<String, &'static str> {
    let mut want: BTreeMap<String, &'static str> = [
        ("rust-heartbeat", "native"),
        ("rust-compactor", "native"),
        ("py-ticker", "python"),
        ("py-flusher", "python"),
    ]
    .into_iter()
    .map(|(n, o)| (n.to_owned(), o))
    .collect();
    if stubborn {
        want.insert("py-stubborn".to_owned(), "python");
    }
    want
}

/// Poll `snapshot` until both kinds of task are live (the Python side has
/// reported ready by then, but a native task may still be starting).
async fn wait_for_all_live(
    snapshot: impl Fn() -> Vec<TaskSummary>,
    stubborn: bool,
) -> Vec<TaskSummary> {
    let want = expected_origins(stubborn);
    let start = Instant::now();
    loop {
        let snap = snapshot();
        if origins(&snap) == want {
            return snap;
        }
        assert!(
            start.elapsed() < GENEROUS,
            "tasks never all live; last snapshot: {:?}",
            origins(&snap)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_stats(stats: TaskStats, completed: u64, cancelled: u64) {
    assert_eq!(
        stats,
        TaskStats {
            spawned: completed + cancelled,
            completed,
            failed: 0,
            cancelled,
            aborted: 0,
            restarted: 0,
            live: 0,
        }
    );
}

/// Bare registry + token, with the example's native tasks and Python loop.
async fn start_bare(stubborn: bool) -> (TaskRegistry, ShutdownToken, PythonLoop) {
    example::init_python().expect("embedded Python");
    let token = ShutdownToken::new();
    let tasks = TaskRegistry::new(token.clone());
    example::spawn_native_tasks(&tasks, TICK).unwrap();
    let (python, names) = PythonLoop::start(&tasks, &options(stubborn))
        .await
        .expect("Python side started");
    let mut want = vec!["py-ticker", "py-flusher"];
    if stubborn {
        want.push("py-stubborn");
    }
    assert_eq!(names, want);
    (tasks, token, python)
}

/// **Proves:** tokio tasks and asyncio coroutines (on an embedded CPython
/// loop, spawned through `registry_to_py`) are tracked by one Rust
/// `TaskRegistry`: its snapshot lists both, with origins `native` and
/// `python`. Cancelling the token from Rust reaches the Python coroutines
/// (each reports the reason it observed), and `join_all` under one deadline
/// returns `Ok` well before that deadline, with every task counted as
/// completed.
///
/// **Catches:** a Python view that wraps a copy of the registry or token
/// instead of the same one; a Rust-side cancel that does not wake waiters
/// on a foreign event loop (the join would hang until the deadline); a
/// Python task's end not reported back to the registry (join never `Ok`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_cancel_stops_native_and_python_tasks_in_one_join() {
    let (tasks, token, python) = start_bare(false).await;
    let snapshot = wait_for_all_live(|| tasks.snapshot(), false).await;
    assert_eq!(origins(&snapshot), expected_origins(false));

    let fired = Instant::now();
    token.cancel(ShutdownReason::UserRequested);
    tasks
        .join_all(GENEROUS)
        .await
        .expect("every task stopped on the token");
    assert!(
        fired.elapsed() < GENEROUS / 2,
        "join took {:?}: tasks were not woken by the token",
        fired.elapsed()
    );
    assert!(tasks.is_closed());
    assert_stats(tasks.stats(), 4, 0);

    let outcomes = python.finish(example::PYTHON_EXIT_GRACE).await.unwrap();
    let observed = "observed ShutdownReason.UserRequested()".to_owned();
    assert_eq!(
        outcomes,
        BTreeMap::from([
            ("py-flusher".to_owned(), observed.clone()),
            ("py-ticker".to_owned(), observed),
        ])
    );
}

/// **Proves:** a Python coroutine that ignores the token does not hold up
/// the Rust side's `join_all`: it returns when the deadline passes, with
/// `ShutdownDeadlineExceeded` naming exactly that task, and the task is
/// then cancelled on its own event loop (it ends `cancelled`, counted as
/// such), while every other task, native or Python, stopped on the token.
///
/// **Catches:** a join that waits for foreign tasks past the deadline, a
/// straggler left running on the asyncio loop (the loop thread would never
/// finish), or a straggler report that names the wrong tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_task_ignoring_the_token_is_cancelled_at_the_deadline() {
    let (tasks, token, python) = start_bare(true).await;
    wait_for_all_live(|| tasks.snapshot(), true).await;

    let fired = Instant::now();
    token.cancel(ShutdownReason::UserRequested);
    let err = tasks.join_all(SHORT).await.unwrap_err();
    let waited = fired.elapsed();
    match err {
        ServiceError::ShutdownDeadlineExceeded {
            deadline,
            pending,
            pending_names,
            ..
        } => {
            assert_eq!(deadline, SHORT);
            assert_eq!(pending, 1);
            assert_eq!(pending_names, ["py-stubborn"]);
        }
        other => panic!("expected ShutdownDeadlineExceeded, got {other:?}"),
    }
    assert!(waited >= SHORT, "returned before the deadline: {waited:?}");
    assert!(
        waited < SHORT + GENEROUS / 2,
        "deadline overrun: {waited:?}"
    );

    // The cancel was handed to the Python loop; the loop then finishes.
    let outcomes = python.finish(example::PYTHON_EXIT_GRACE).await.unwrap();
    assert_eq!(outcomes["py-stubborn"], "cancelled");
    assert_eq!(
        outcomes["py-ticker"],
        "observed ShutdownReason.UserRequested()"
    );
    assert_stats(tasks.stats(), 4, 1);
}

/// **Proves:** the example's `Service` as a whole: its node's native tasks
/// and Python coroutines are live together in the service's registry
/// (seen through the `ServiceHandle`), a shutdown requested from Rust ends
/// `start()` with `RequestedShutdown(UserRequested)` and exit code 0, and
/// the node's `on_stop` got every Python task's report.
///
/// **Catches:** a regression in how `Service` drives a node whose tasks
/// live partly on a foreign loop (e.g. the join reporting stragglers that
/// already stopped, or `on_stop` running before the Python side finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_service_stops_cleanly_on_request() {
    example::init_python().expect("embedded Python");
    let config = ServiceConfig::new()
        .with_shutdown_deadline(GENEROUS)
        .with_hook_timeout(Some(GENEROUS));
    let svc = Arc::new(Service::with_config(
        MixedNode::new(options(false)),
        (),
        (),
        config,
    ));
    let handle = svc.handle();
    let runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    wait_for_all_live(|| handle.tasks(), false).await;

    let fired = Instant::now();
    handle.request_shutdown(ShutdownReason::UserRequested);
    let status = tokio::time::timeout(GENEROUS * 2, runner)
        .await
        .expect("start() returned")
        .unwrap()
        .expect("clean stop");
    assert!(fired.elapsed() < GENEROUS / 2, "{:?}", fired.elapsed());
    assert!(matches!(
        status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
    ));
    assert_eq!(status.exit_code(), 0);
    assert_stats(svc.tasks().stats(), 4, 0);
    let outcomes = svc.node().python_outcomes().expect("on_stop ran");
    assert_eq!(outcomes.len(), 2);
    assert!(
        outcomes
            .values()
            .all(|o| o == "observed ShutdownReason.UserRequested()"),
        "{outcomes:?}"
    );
}

/// **Proves:** the example's `Service` with its `--stubborn` Python task:
/// `start()` fails with `ShutdownDeadlineExceeded` naming `py-stubborn`
/// once the deadline has passed, the task is cancelled on its loop, and
/// `on_stop` still ran and collected the Python side's report (the
/// service's exit is bounded by the one deadline plus the loop's wind-down);
/// the Rust report shows the Python straggler's stack, taken just before
/// the deadline cancelled it.
///
/// **Catches:** a service that hangs on a Python straggler, that loses the
/// deadline error behind a clean exit status, or whose report says "no
/// stack captured" for a Python task (the core's foreign tasks once had no
/// stack to give).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_service_reports_python_straggler() {
    example::init_python().expect("embedded Python");
    let config = ServiceConfig::new()
        .with_shutdown_deadline(SHORT)
        .with_hook_timeout(Some(GENEROUS));
    let svc = Arc::new(Service::with_config(
        MixedNode::new(options(true)),
        (),
        (),
        config,
    ));
    let handle = svc.handle();
    let runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    wait_for_all_live(|| handle.tasks(), true).await;

    handle.request_shutdown(ShutdownReason::UserRequested);
    let err = tokio::time::timeout(GENEROUS * 2, runner)
        .await
        .expect("start() returned")
        .unwrap()
        .unwrap_err();
    match &err {
        ServiceError::ShutdownDeadlineExceeded { pending_names, .. } => {
            assert_eq!(pending_names, &["py-stubborn"]);
        }
        other => panic!("expected ShutdownDeadlineExceeded, got {other:?}"),
    }
    let report = err.report().expect("start() reports its shutdown");
    let [straggler] = report.stragglers.as_slice() else {
        panic!("one straggler expected: {:?}", report.stragglers);
    };
    let stack = straggler
        .stack
        .as_deref()
        .expect("a Python straggler's stack");
    // Where it waited when the deadline cancelled it: its own frame, then
    // the sleep it awaits.
    assert!(
        stack.contains("mixed_tasks.py") && stack.contains("in stubborn"),
        "{stack}"
    );
    assert!(stack.contains("await asyncio.sleep(3600)"), "{stack}");
    assert!(report.to_string().contains("in stubborn"), "{report}");
    let outcomes = svc.node().python_outcomes().expect("on_stop ran");
    assert_eq!(outcomes["py-stubborn"], "cancelled");
    assert_stats(svc.tasks().stats(), 4, 1);
}
