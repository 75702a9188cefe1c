//! Lifecycle tests of the Rust `Service` that say more than a row of the
//! contract table (`contract/start.toml`, run by `contract.rs`) can: the
//! order tasks end in relative to the stop hooks, the very error object the
//! stop hooks are handed, panics, exact timeout and deadline instants (on a
//! paused clock), the single-shot rule while running, the recorded result,
//! the handle after the service is gone, and a dropped `start()` future.

mod common;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use common::{chain_has_hook_error, strs, Act, HookError, RunAct, Script, ScriptNode};
use dig_service::testing::TestNode;
use dig_service::{
    ExitReason, ExitStatus, HookTimeout, Service, ServiceConfig, ServiceError, ShutdownReason,
};
use tokio::time::Instant;

type ScriptService = Service<ScriptNode, (), ()>;

fn service(script: Script) -> (ScriptService, Arc<common::Probe>) {
    service_with(script, ServiceConfig::default())
}

fn service_with(script: Script, config: ServiceConfig) -> (ScriptService, Arc<common::Probe>) {
    let (node, probe) = ScriptNode::new(script);
    let svc = Service::with_config(node, (), (), config);
    let _ = probe.handle.set(svc.handle());
    (svc, probe)
}

/// Start `svc`, wait until `run` is entered, request `reason`, and return
/// what `start()` returned.
async fn start_then_request(
    svc: &ScriptService,
    probe: &common::Probe,
    reason: ShutdownReason,
) -> dig_service::Result<ExitStatus> {
    let (res, ()) = tokio::join!(svc.start(), async {
        probe.reached("run").await;
        svc.handle().request_shutdown(reason);
    });
    res
}

fn hook_timeout_of(err: &ServiceError) -> HookTimeout {
    err.source()
        .and_then(|s| s.downcast_ref::<HookTimeout>())
        .unwrap_or_else(|| panic!("source of {err:?} is not a HookTimeout"))
        .clone()
}

// ---------------------------------------------------------------------------
// Happy paths.

/// **Proves:** when `run` returns by itself the status is `RunCompleted`,
/// the token is then cancelled with `RequestedByRun`, and the background
/// tasks see it and finish *before* `on_stop` runs.
///
/// **Why it matters:** a node whose work is done (a one-shot migration,
/// say) must still wind its loops down; without the cancel, `join_all`
/// would wait the whole deadline and report them as stragglers.
///
/// **Catches:** forgetting to cancel the token after a self-returning
/// `run`, using the wrong reason, or joining after `on_stop`.
#[tokio::test]
async fn run_returning_by_itself_is_run_completed() {
    let (svc, probe) = service(Script {
        run: RunAct::Return,
        workers: 3,
        ..Script::default()
    });
    let status = svc.start().await.expect("clean exit");
    assert!(matches!(status.reason, ExitReason::RunCompleted));
    assert!(status.is_graceful());
    assert_eq!(
        svc.shutdown_token().reason(),
        Some(ShutdownReason::RequestedByRun)
    );
    let log = probe.log();
    let on_stop = probe.position("on_stop").unwrap();
    let exits: Vec<_> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| *e == "worker_exit")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(exits.len(), 3, "{log:?}");
    assert!(exits.iter().all(|&i| i < on_stop), "{log:?}");
    assert_eq!(svc.tasks().stats().completed, 3);
    assert!(svc.tasks().is_empty());
}

// ---------------------------------------------------------------------------
// Failures of each hook.

/// **Proves:** a failing `on_start` returns `OnStartFailed`; tasks are
/// joined, then `post_stop` runs; `run` and `on_stop` do not. `post_stop`
/// is told why: `RunError` carrying the very `on_start` error.
///
/// **Why it matters:** resources opened in `pre_start` still need closing.
///
/// **Catches:** skipping `post_stop`, running `on_stop`, or calling
/// `post_stop` while tasks still run.
#[tokio::test]
async fn on_start_failure_runs_post_stop_only() {
    let (svc, probe) = service(Script {
        on_start: Act::Fail,
        workers: 2,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    let ServiceError::OnStartFailed(cause, ..) = &err else {
        panic!("expected OnStartFailed, got {err:?}");
    };
    assert_eq!(probe.hooks(), strs(&["pre_start", "on_start", "post_stop"]));
    let post_stop = probe.position("post_stop").unwrap();
    assert!(
        probe.log()[..post_stop]
            .iter()
            .filter(|e| *e == "worker_exit")
            .count()
            == 2
    );
    let reasons = probe.stop_reasons.lock().clone();
    let [ExitReason::RunError(shared)] = reasons.as_slice() else {
        panic!("unexpected stop reasons {reasons:?}");
    };
    assert!(Arc::ptr_eq(cause, shared));
}

/// **Proves:** a failing `run` returns `RunFailed`, yet tasks are joined
/// and `on_stop` + `post_stop` still run, in that order; the token is
/// cancelled with `Fatal` so tasks stop.
///
/// **Why it matters:** `run` can fail anywhere; stores must still be
/// flushed and closed.
///
/// **Catches:** an early return on `run` failure that skips cleanup.
#[tokio::test]
async fn run_failure_still_runs_cleanup() {
    let (svc, probe) = service(Script {
        run: RunAct::Fail,
        workers: 2,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    assert!(matches!(err, ServiceError::RunFailed(..)), "{err:?}");
    assert_eq!(
        probe.hooks(),
        strs(&["pre_start", "on_start", "run", "on_stop", "post_stop"])
    );
    let on_stop = probe.position("on_stop").unwrap();
    assert_eq!(
        probe.log()[..on_stop]
            .iter()
            .filter(|e| *e == "worker_exit")
            .count(),
        2
    );
    assert!(matches!(
        svc.shutdown_token().reason(),
        Some(ShutdownReason::Fatal(m)) if m.starts_with("run failed")
    ));
}

/// **Proves:** a panic in `run` is caught: `start()` returns `RunFailed`
/// whose message carries the panic text, and `on_stop` + `post_stop` run.
///
/// **Why it matters:** the 0.1 crate claimed to catch panics but did not;
/// a panicking main loop unwound through `start()` and skipped cleanup.
///
/// **Catches:** a missing `catch_unwind`, or one that loses the message.
#[tokio::test]
async fn run_panic_is_run_failed_and_cleanup_runs() {
    let (svc, probe) = service(Script {
        run: RunAct::Panic,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    let ServiceError::RunFailed(cause, ..) = &err else {
        panic!("expected RunFailed, got {err:?}");
    };
    assert!(cause.to_string().contains("run exploded"), "{cause}");
    assert_eq!(
        probe.hooks(),
        strs(&["pre_start", "on_start", "run", "on_stop", "post_stop"])
    );
}

/// **Proves:** a panic in an edge hook is that hook's failure: a
/// panicking `pre_start` is `PreStartFailed`, a panicking `on_stop` is
/// `OnStopFailed` and `post_stop` still runs.
///
/// **Why it matters:** a panic must never turn into a skipped cleanup or a
/// crashed caller (in Python, a crashed interpreter).
///
/// **Catches:** catching panics in `run` only.
#[tokio::test]
async fn edge_hook_panics_are_hook_failures() {
    let (svc, probe) = service(Script {
        pre_start: Act::Panic,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::PreStartFailed(e, ..) if e.to_string().contains("pre_start exploded"))
    );
    assert_eq!(probe.hooks(), strs(&["pre_start"]));

    let (svc, probe) = service(Script {
        on_stop: Act::Panic,
        run: RunAct::Return,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::OnStopFailed(e, ..) if e.to_string().contains("on_stop exploded"))
    );
    assert_eq!(probe.hooks().last().map(String::as_str), Some("post_stop"));
}

// ---------------------------------------------------------------------------
// Errors keep their source.

/// **Proves:** the hook's own error is the `source()` of the
/// `ServiceError` (the whole anyhow chain, context layers included, down
/// to the typed root cause), and `ExitReason::RunError` handed to the stop
/// hooks is the *same* `Arc` as the one inside `RunFailed`.
///
/// **Why it matters:** 0.1 re-formatted the error with `anyhow!("{e}")`,
/// destroying the chain, downcasting and backtraces.
///
/// **Catches:** any re-wrapping or stringification of hook errors.
#[tokio::test]
async fn original_error_is_kept_as_source() {
    let (svc, probe) = service(Script {
        run: RunAct::Fail,
        ..Script::default()
    });
    let err = svc.start().await.unwrap_err();
    let ServiceError::RunFailed(cause, ..) = &err else {
        panic!("expected RunFailed, got {err:?}");
    };
    // The direct source is the outer context layer ...
    assert_eq!(err.source().unwrap().to_string(), "run context");
    // ... whose chain leads to the typed root cause.
    assert!(chain_has_hook_error(&err, "run"));
    assert_eq!(
        cause.root_cause().downcast_ref::<HookError>(),
        Some(&HookError { hook: "run" })
    );
    assert_eq!(err.to_string(), "run failed: run context");

    let reasons = probe.stop_reasons.lock().clone();
    assert_eq!(reasons.len(), 2, "on_stop and post_stop both saw it");
    for reason in &reasons {
        let ExitReason::RunError(shared) = reason else {
            panic!("unexpected stop reason {reason:?}");
        };
        assert!(Arc::ptr_eq(cause, shared));
    }
}

// ---------------------------------------------------------------------------
// Timeouts and deadlines.

/// **Proves:** an edge hook that outlives `hook_timeout` fails as that
/// hook, with a `HookTimeout` source naming it, exactly at the timeout;
/// a timed-out `on_stop` still lets `post_stop` run.
///
/// **Why it matters:** a wedged `pre_start` (unreachable database) must
/// not hang the process forever.
///
/// **Catches:** a timeout that is ignored, reported as the wrong hook, or
/// loses its typed cause.
#[tokio::test(start_paused = true)]
async fn hook_timeout_bounds_edge_hooks() {
    let cfg = ServiceConfig::new()
        .with_shutdown_deadline(Duration::from_secs(30))
        .with_hook_timeout(Some(Duration::from_secs(5)));
    let (svc, probe) = service_with(
        Script {
            pre_start: Act::Hang,
            ..Script::default()
        },
        cfg.clone(),
    );
    let t0 = Instant::now();
    let err = svc.start().await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert!(matches!(err, ServiceError::PreStartFailed(..)), "{err:?}");
    let timeout = hook_timeout_of(&err);
    assert_eq!(timeout.hook, "pre_start");
    assert_eq!(timeout.after, Duration::from_secs(5));
    assert_eq!(probe.hooks(), strs(&["pre_start"]));

    let (svc, probe) = service_with(
        Script {
            run: RunAct::Return,
            on_stop: Act::Hang,
            ..Script::default()
        },
        cfg,
    );
    let err = svc.start().await.unwrap_err();
    assert!(matches!(err, ServiceError::OnStopFailed(..)), "{err:?}");
    assert_eq!(hook_timeout_of(&err).hook, "on_stop");
    assert_eq!(probe.hooks().last().map(String::as_str), Some("post_stop"));
}

/// **Proves:** without a `hook_timeout`, a stop hook is still bounded by
/// the shutdown budget (the token has fired by then: the stop hooks get
/// what is left of `shutdown_deadline`), and a start-up hook already
/// running when the token fires shares the budget of `run` and the join,
/// `shutdown_deadline - stop_reserve` from that moment.
///
/// **Why it matters:** a SIGTERM during a slow start-up, or a hanging
/// flush, must still end the process within the one budget a supervisor's
/// grace period is sized from.
///
/// **Catches:** unbounded hooks when `hook_timeout` is `None`, or a
/// start-up hook given the whole deadline (which leaves the reserve of
/// the stop hooks eaten).
#[tokio::test(start_paused = true)]
async fn shutdown_deadline_bounds_edge_hooks_once_token_fired() {
    let cfg = ServiceConfig::new().with_shutdown_deadline(Duration::from_secs(2));
    let (svc, probe) = service_with(
        Script {
            run: RunAct::Return,
            on_stop: Act::Hang,
            ..Script::default()
        },
        cfg.clone(),
    );
    let err = svc.start().await.unwrap_err();
    let timeout = hook_timeout_of(&err);
    assert_eq!(
        (timeout.hook, timeout.after),
        ("on_stop", Duration::from_secs(2))
    );
    assert_eq!(probe.hooks().last().map(String::as_str), Some("post_stop"));

    let (svc, probe) = service_with(
        Script {
            pre_start: Act::Hang,
            ..Script::default()
        },
        cfg,
    );
    let t0 = Instant::now();
    let (res, fired_at) = tokio::join!(svc.start(), async {
        probe.reached("pre_start").await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        svc.request_shutdown(ShutdownReason::UserRequested);
        t0.elapsed()
    });
    let err = res.unwrap_err();
    assert!(matches!(err, ServiceError::PreStartFailed(..)), "{err:?}");
    assert_eq!(hook_timeout_of(&err).hook, "pre_start");
    // The default reserve is 2 s / 4: pre_start had 1.5 s of the budget.
    assert_eq!(t0.elapsed() - fired_at, Duration::from_millis(1500));
    let report = err.report().expect("a shutdown began: it has a report");
    assert_eq!(report.total, Duration::from_millis(1500));
}

/// **Proves:** once the token has fired, `run` is bounded by its share of
/// the budget, `shutdown_deadline - stop_reserve`: if it has not returned
/// by then it is dropped, every still-live task is aborted at once, the
/// result is `ShutdownDeadlineExceeded` naming `"run"` first and the
/// straggler after it, `on_stop` + `post_stop` still run, and the report
/// says so (run and join timed out, the straggler named).
///
/// **Why it matters:** a `run` that ignores the token would otherwise hang
/// shutdown forever — the 0.1 crate had no bound on it at all.
///
/// **Catches:** awaiting `run` without a bound, forgetting the cleanup
/// tail after dropping it, or leaving tasks running.
#[tokio::test(start_paused = true)]
async fn run_is_bounded_by_the_deadline_once_token_fired() {
    let cfg = ServiceConfig::new().with_shutdown_deadline(Duration::from_secs(3));
    let (svc, probe) = service_with(
        Script {
            run: RunAct::IgnoreShutdown,
            stuck_worker: true,
            ..Script::default()
        },
        cfg,
    );
    let mut fired_at = Instant::now();
    let (res, ()) = tokio::join!(svc.start(), async {
        probe.reached("run").await;
        tokio::time::sleep(Duration::from_secs(7)).await;
        fired_at = Instant::now();
        svc.request_shutdown(ShutdownReason::UserRequested);
    });
    // 3 s - the default reserve (3 s / 4).
    assert_eq!(fired_at.elapsed(), Duration::from_millis(2250));
    let err = res.unwrap_err();
    let report = err.report().expect("a report");
    let outcomes: Vec<_> = report
        .phases
        .iter()
        .map(|p| (p.name.as_str(), p.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("run", "timed_out"),
            ("join", "timed_out"),
            ("on_stop", "ok"),
            ("post_stop", "ok")
        ]
    );
    let names: Vec<_> = report.stragglers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["stuck"]);
    assert!(
        matches!(
            &err,
            ServiceError::ShutdownDeadlineExceeded { deadline, pending: 2, pending_names, .. }
                if *deadline == Duration::from_secs(3) && pending_names == &["run", "stuck"]
        ),
        "{err:?}"
    );
    assert_eq!(
        probe.hooks(),
        strs(&["pre_start", "on_start", "run", "on_stop", "post_stop"])
    );
    assert!(matches!(
        probe.stop_reasons.lock()[0],
        ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
    ));
    // The aborted straggler leaves the registry as soon as tokio drops it.
    tokio::task::yield_now().await;
    assert_eq!(svc.tasks().stats().aborted, 1);
    assert!(svc.tasks().is_empty());
}

// ---------------------------------------------------------------------------
// Single-shot, recorded result, handle.

/// **Proves:** a second `start()` — while the first runs, and after it
/// returned — is `AlreadyRunning` and disturbs neither the first run nor
/// its recorded result.
///
/// **Why it matters:** a `Service` owns one token and one registry (closed
/// after the join); restarting it would run hooks against closed state.
///
/// **Catches:** a second call that re-runs hooks or overwrites the result.
#[tokio::test]
async fn start_twice_is_already_running() {
    let (svc, probe) = service(Script::default());
    let (first, second) = tokio::join!(svc.start(), async {
        probe.reached("run").await;
        let second = svc.start().await;
        svc.request_shutdown(ShutdownReason::RpcRequested);
        second
    });
    assert!(matches!(second, Err(ServiceError::AlreadyRunning)));
    assert!(first.is_ok());
    assert!(matches!(
        svc.start().await,
        Err(ServiceError::AlreadyRunning)
    ));
    assert_eq!(
        probe.hooks().iter().filter(|h| *h == "pre_start").count(),
        1
    );
    assert!(matches!(
        svc.wait_for_exit().await.unwrap().reason,
        ExitReason::RequestedShutdown(ShutdownReason::RpcRequested)
    ));
}

/// **Proves:** `Service::wait_for_exit` and `ServiceHandle::wait_for_exit`
/// — called before, during and after `start()` — return the very result
/// `start()` returned (the same error `Arc`).
///
/// **Why it matters:** the signal handler, the admin RPC and `main` all
/// wait on one service and must agree on how it ended.
///
/// **Catches:** waiters that hang, or see a different (re-made) error.
#[tokio::test]
async fn wait_for_exit_returns_the_start_result() {
    let (svc, _probe) = service(Script {
        run: RunAct::Fail,
        ..Script::default()
    });
    let handle = svc.handle();
    let early = tokio::spawn({
        let h = handle.clone();
        async move { h.wait_for_exit().await }
    });
    let (res, during) = tokio::join!(svc.start(), svc.wait_for_exit());
    let ServiceError::RunFailed(original, ..) = res.unwrap_err() else {
        panic!("expected RunFailed")
    };
    for seen in [
        early.await.unwrap(),
        during,
        handle.wait_for_exit().await,
        svc.wait_for_exit().await,
    ] {
        let Err(ServiceError::RunFailed(e, ..)) = seen else {
            panic!("waiter saw {seen:?}");
        };
        assert!(Arc::ptr_eq(&original, &e));
    }
}

/// **Proves:** `is_running()` is `false` before `start()`, `true` while
/// running *and while stopping* (inside `on_stop`), `false` after.
///
/// **Why it matters:** an operator (or systemd glue) reads "running" as
/// "work in flight"; a process still flushing in `on_stop` must not look
/// idle.
///
/// **Catches:** the 0.1 definition (`!token.is_cancelled()`), which said
/// "not running" during the whole shutdown and "running" for a service
/// that was never started.
#[tokio::test]
async fn is_running_spans_start_to_return() {
    let (svc, probe) = service(Script::default());
    let handle = svc.handle();
    assert!(!handle.is_running());
    let (res, ()) = tokio::join!(svc.start(), async {
        probe.reached("run").await;
        assert!(handle.is_running());
        handle.request_shutdown(ShutdownReason::UserRequested);
    });
    res.unwrap();
    assert_eq!(*probe.running_in_on_stop.lock(), Some(true));
    assert!(!handle.is_running());
}

/// **Proves:** a handle outlives its service: after a finished service is
/// dropped, `wait_for_exit` still returns the recorded result; after an
/// unstarted service is dropped, a waiter (even one already waiting) gets
/// `AlreadyStopped` instead of hanging, and every call is harmless.
///
/// **Why it matters:** signal handlers and admin RPC hold handles for the
/// whole process lifetime, beyond the `Service` value itself.
///
/// **Catches:** dangling state, panics, or waiters that hang forever.
#[tokio::test]
async fn handle_outlives_the_service() {
    let (svc, probe) = service(Script::default());
    let handle = svc.handle();
    start_then_request(&svc, &probe, ShutdownReason::UserRequested)
        .await
        .unwrap();
    drop(svc);
    assert!(matches!(
        handle.wait_for_exit().await.unwrap().reason,
        ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
    ));
    assert_eq!(handle.name(), "script");
    assert!(handle.tasks().is_empty());

    let svc = Service::<_, (), ()>::new(TestNode::default(), (), ());
    let handle = svc.handle();
    let waiter = tokio::spawn({
        let h = handle.clone();
        async move { h.wait_for_exit().await }
    });
    drop(svc);
    assert!(matches!(
        waiter.await.unwrap(),
        Err(ServiceError::AlreadyStopped)
    ));
    assert!(!handle.is_running());
    handle.request_shutdown(ShutdownReason::UserRequested);
    assert_eq!(handle.name(), "test");
    assert!(matches!(
        handle.wait_for_exit().await,
        Err(ServiceError::AlreadyStopped)
    ));
}

/// **Proves:** if the future driving `start()` is dropped midway, the
/// service is still wound down (token fired with `UserRequested`, stop
/// hooks run) and waiters get that real outcome; `is_running()` turns
/// `false` once the wind-down is over. (`rust/tests/edges.rs` has the
/// full version of this, with a ticker task, on both runtime flavours.)
///
/// **Why it matters:** a `select!` or timeout around `start()` must not
/// leave the service half-alive, nor every `wait_for_exit` caller stuck.
///
/// **Catches:** a lifecycle that lives inside the `start()` future (it
/// died with it: no `on_stop`, no `post_stop`, `AlreadyStopped` for the
/// waiters).
#[tokio::test(start_paused = true)]
async fn dropped_start_future_winds_the_service_down() {
    let (svc, probe) = service(Script::default());
    let handle = svc.handle();
    let gave_up = tokio::time::timeout(Duration::from_secs(1), svc.start()).await;
    assert!(gave_up.is_err());
    let status = handle.wait_for_exit().await.expect("a graceful wind-down");
    assert!(matches!(
        status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
    ));
    assert!(!handle.is_running());
    assert_eq!(
        probe.hooks(),
        strs(&[
            "pre_start",
            "on_start",
            "run",
            "run_exit",
            "on_stop",
            "post_stop"
        ])
    );
}

/// **Proves:** `start()`'s future is `Send`, so a service in an `Arc` can
/// be driven from a spawned task while other tasks hold it.
///
/// **Why it matters:** that is how binaries (and the Python bindings) run
/// a service next to their signal handling.
///
/// **Catches:** a non-`Send` value held across an await in `start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_runs_in_a_spawned_task() {
    let svc = Arc::new(Service::<_, (), ()>::new(TestNode::default(), (), ()));
    let runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    let handle = svc.handle();
    handle.request_shutdown(ShutdownReason::ReloadRequested);
    let status = runner.await.unwrap().unwrap();
    assert!(matches!(
        status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::ReloadRequested)
    ));
}

// ---------------------------------------------------------------------------
// TestNode.

/// **Proves:** a default `TestNode` exits gracefully when the token fires.
///
/// **Why it matters:** dependent crates use `TestNode` to exercise the
/// lifecycle without writing a node.
///
/// **Catches:** a `TestNode::run` that ignores the shutdown token.
#[tokio::test]
async fn test_node_graceful_exit() {
    let svc = Service::<_, (), ()>::new(TestNode::default(), (), ());
    let handle = svc.handle();
    handle.request_shutdown(ShutdownReason::UserRequested);
    let status = svc.start().await.unwrap();
    assert!(status.is_graceful());
    assert_eq!(handle.name(), "test");
}

/// **Proves:** each `TestNode` failure switch maps to its `ServiceError`,
/// and `run_delay` makes `run` return by itself (`RunCompleted`) after
/// exactly that long.
///
/// **Why it matters:** the switches are how downstream crates test their
/// error handling; a wrong mapping would make those tests lie.
///
/// **Catches:** a switch wired to the wrong hook, or `run_delay` ignored.
#[tokio::test(start_paused = true)]
async fn test_node_switches() {
    async fn run(node: TestNode) -> dig_service::Result<ExitStatus> {
        Service::<_, (), ()>::new(node, (), ()).start().await
    }
    assert!(matches!(
        run(TestNode {
            fail_pre_start: true,
            ..TestNode::default()
        })
        .await,
        Err(ServiceError::PreStartFailed(..))
    ));
    assert!(matches!(
        run(TestNode {
            fail_on_start: true,
            ..TestNode::default()
        })
        .await,
        Err(ServiceError::OnStartFailed(..))
    ));
    assert!(matches!(
        run(TestNode {
            fail_run: true,
            ..TestNode::default()
        })
        .await,
        Err(ServiceError::RunFailed(..))
    ));
    assert!(matches!(
        run(TestNode {
            fail_on_stop: true,
            run_delay: Duration::from_millis(1),
            ..TestNode::default()
        })
        .await,
        Err(ServiceError::OnStopFailed(..))
    ));
    let t0 = Instant::now();
    let status = run(TestNode {
        run_delay: Duration::from_secs(90),
        ..TestNode::default()
    })
    .await
    .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(90));
    assert!(matches!(status.reason, ExitReason::RunCompleted));
}

/// **Proves:** a `stop_reserve` larger than the `shutdown_deadline` is
/// refused by `start()` before anything runs, with an error naming both
/// knobs; the waiters get the same error, and no hook was entered.
///
/// **Catches:** a negative share for `run` and the join (every task cut at
/// once) accepted silently, or an error that does not say which knob.
#[tokio::test]
async fn a_stop_reserve_above_the_deadline_is_refused_before_any_hook() {
    let cfg = ServiceConfig::new()
        .with_shutdown_deadline(Duration::from_secs(2))
        .with_stop_reserve(Duration::from_secs(3));
    let (svc, probe) = service_with(Script::default(), cfg);
    let err = svc.start().await.unwrap_err();
    assert!(matches!(err, ServiceError::InvalidConfig(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("`stop_reserve`") && msg.contains("`shutdown_deadline`"),
        "{msg}"
    );
    assert!(probe.hooks().is_empty(), "{:?}", probe.hooks());
    assert!(matches!(
        svc.wait_for_exit().await,
        Err(ServiceError::InvalidConfig(_))
    ));
    assert!(err.report().is_none());
}
