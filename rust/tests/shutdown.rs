//! Shutdown token + task registry, as seen through a running `Service`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{strs, Script, ScriptNode};
use dig_service::testing::TestNode;
use dig_service::{
    ExitReason, NodeLifecycle, RunContext, Service, ServiceConfig, ServiceError, ShutdownReason,
    ShutdownToken, StopContext, TaskKind, TaskRegistry,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A node whose `run` spawns `loops` background loops, reports each one's
/// start on `started`, and waits for shutdown.
struct NoisyNode {
    loops: usize,
    started: mpsc::UnboundedSender<usize>,
    torn_down: Arc<AtomicUsize>,
}

#[async_trait]
impl NodeLifecycle for NoisyNode {
    const NAME: Option<&'static str> = Some("noisy");

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        for i in 0..self.loops {
            let shutdown = ctx.shutdown.clone();
            let started = self.started.clone();
            let torn_down = self.torn_down.clone();
            ctx.tasks
                .spawn(format!("bg-{i}"), TaskKind::BackgroundLoop, async move {
                    started.send(i)?;
                    shutdown.cancelled().await;
                    // A little tear-down work after the token fired.
                    tokio::task::yield_now().await;
                    torn_down.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })?;
        }
        ctx.shutdown.cancelled().await;
        Ok(())
    }

    async fn on_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        // The registry is closed once joined: late spawns are refused.
        let late = ctx
            .tasks
            .spawn("late", TaskKind::Maintenance, async { Ok(()) });
        anyhow::ensure!(
            matches!(late, Err(ServiceError::AlreadyStopped)),
            "late spawn was accepted"
        );
        Ok(())
    }
}

/// **Proves:** a service with N background loops, once shut down, joins
/// them all (each finishes its tear-down) within the deadline and exits
/// gracefully; afterwards the registry is empty and closed, so a spawn from
/// `on_stop` is refused with `AlreadyStopped`.
///
/// **Why it matters:** real binaries run dozens of loops; if `join_all`
/// could not wait for them cleanly every orderly shutdown would surface as
/// `ShutdownDeadlineExceeded`, or tear-down work would be cut short.
///
/// **Catches:** `join_all` missing some tasks, or returning before their
/// tear-down finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_joins_all_background_tasks() {
    const LOOPS: usize = 16;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let torn_down = Arc::new(AtomicUsize::new(0));
    let svc = Arc::new(Service::<_, (), ()>::new(
        NoisyNode {
            loops: LOOPS,
            started: tx,
            torn_down: torn_down.clone(),
        },
        (),
        (),
    ));
    let runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    for _ in 0..LOOPS {
        rx.recv().await.expect("a loop started");
    }
    assert_eq!(svc.handle().tasks().len(), LOOPS);
    svc.handle().request_shutdown(ShutdownReason::UserRequested);

    let status = runner.await.unwrap().expect("graceful exit");
    assert!(status.is_graceful());
    assert_eq!(torn_down.load(Ordering::SeqCst), LOOPS);
    let stats = svc.tasks().stats();
    assert_eq!((stats.spawned, stats.completed, stats.live), (16, 16, 0));
    assert!(svc.tasks().is_closed());
}

/// **Proves:** `ShutdownToken::reason` is readable from every clone and
/// keeps the first reason given.
///
/// **Why it matters:** metrics and logging read the reason after the fact;
/// every reader must see the same value.
///
/// **Catches:** `.clone()` creating independent reason storage, or a later
/// `cancel` overwriting the first reason.
#[tokio::test]
async fn shutdown_reason_shared_across_clones() {
    let t = ShutdownToken::new();
    let a = t.clone();
    let b = t.clone();
    a.cancel(ShutdownReason::RpcRequested);
    assert_eq!(b.reason(), Some(ShutdownReason::RpcRequested));
    b.cancel(ShutdownReason::UserRequested);
    assert_eq!(t.reason(), Some(ShutdownReason::RpcRequested));
}

/// **Proves:** a task that ignores the token past the deadline makes
/// `join_all` return `ShutdownDeadlineExceeded { pending: 1 }` naming it,
/// exactly at the deadline, and the task is aborted.
///
/// **Why it matters:** a stuck task must not hang shutdown forever.
///
/// **Catches:** a bypassed timeout, or stragglers not counted / named /
/// aborted.
#[tokio::test(start_paused = true)]
async fn stuck_task_surfaces_deadline_exceeded() {
    let token = ShutdownToken::new();
    let r = TaskRegistry::new(token.clone());
    let stuck = r
        .spawn("stuck", TaskKind::BackgroundLoop, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
        .unwrap();
    token.cancel(ShutdownReason::UserRequested);

    let t0 = Instant::now();
    let err = r.join_all(Duration::from_millis(30)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(30));
    assert!(
        matches!(
            &err,
            ServiceError::ShutdownDeadlineExceeded { pending: 1, pending_names, deadline, .. }
                if pending_names == &["stuck"] && *deadline == Duration::from_millis(30)
        ),
        "{err:?}"
    );
    assert!(stuck.await.is_err(), "the straggler was aborted");
    assert_eq!(r.stats().aborted, 1);
}

/// **Proves:** through a `Service`, a stuck task yields
/// `ShutdownDeadlineExceeded` naming it once the share of `run` and the
/// join is spent (`shutdown_deadline - stop_reserve`: 4 s - 1 s), and
/// `on_stop` + `post_stop` still run afterwards, inside the budget.
///
/// **Why it matters:** the deadline is the operator's promise about how
/// long a stop takes; cleanup must still happen when it is exceeded, and
/// in time.
///
/// **Catches:** the 0.1 hard-coded 30 s join, or a skipped cleanup tail
/// after a join failure.
#[tokio::test(start_paused = true)]
async fn service_reports_stuck_tasks_and_still_cleans_up() {
    let (node, probe) = ScriptNode::new(Script {
        stuck_worker: true,
        workers: 2,
        ..Script::default()
    });
    let svc = Service::with_config(
        node,
        (),
        (),
        ServiceConfig::new().with_shutdown_deadline(Duration::from_secs(4)),
    );
    let mut fired = Instant::now();
    let (res, ()) = tokio::join!(svc.start(), async {
        probe.reached("run").await;
        fired = Instant::now();
        svc.request_shutdown(ShutdownReason::UserRequested);
    });
    assert_eq!(fired.elapsed(), Duration::from_secs(3));
    let err = res.unwrap_err();
    assert!(
        matches!(&err, ServiceError::ShutdownDeadlineExceeded { pending: 1, pending_names, .. } if pending_names == &["stuck"]),
        "{err:?}"
    );
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

/// **Proves:** `request_shutdown` from a plain OS thread (no runtime)
/// wakes a service running on a tokio runtime, and the first reason from
/// any handle wins.
///
/// **Why it matters:** signal handlers and foreign threads (Python's) stop
/// the service from outside tokio.
///
/// **Catches:** a token whose wake-up only works from inside the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_shutdown_from_a_foreign_thread() {
    let svc = Arc::new(Service::<_, (), ()>::new(TestNode::default(), (), ()));
    let runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    let handle = svc.handle();
    std::thread::spawn(move || {
        handle.request_shutdown(ShutdownReason::RpcRequested);
        handle.request_shutdown(ShutdownReason::UserRequested);
    })
    .join()
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), runner)
        .await
        .expect("service stopped")
        .unwrap()
        .unwrap();
    assert!(matches!(
        status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::RpcRequested)
    ));
}

/// **Proves:** tasks see the reason the moment they wake, and a child
/// token handed out by the service's token fires with the service.
///
/// **Why it matters:** a task decides how to wind down (flush vs. drop)
/// from the reason; sub-components get child tokens.
///
/// **Catches:** a reason published after waiters are woken, or children
/// not cancelled with their parent.
#[tokio::test]
async fn tasks_see_the_reason_and_children_fire() {
    let svc = Service::<_, (), ()>::new(TestNode::default(), (), ());
    let child = svc.shutdown_token().child_token();
    let seen = svc
        .tasks()
        .spawn("observer", TaskKind::BackgroundLoop, {
            let token = svc.shutdown_token().clone();
            async move {
                token.cancelled().await;
                anyhow::ensure!(token.reason() == Some(ShutdownReason::ReloadRequested));
                Ok(())
            }
        })
        .unwrap();
    svc.request_shutdown(ShutdownReason::ReloadRequested);
    svc.start().await.unwrap();
    seen.await.expect("the task saw the reason");
    assert_eq!(child.reason(), Some(ShutdownReason::ReloadRequested));
}
