//! `TaskRegistry` on its own: bookkeeping, the deadline join, outcomes,
//! foreign tasks, and the fixes over the 0.1 registry.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dig_service::{
    ForeignTask, KindStats, ServiceError, ShutdownReason, ShutdownToken, TaskFailure, TaskKind,
    TaskOrigin, TaskOutcome, TaskRegistry, TaskStats,
};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Barrier};
use tokio::time::Instant;

fn registry() -> (TaskRegistry, ShutdownToken) {
    let token = ShutdownToken::new();
    (TaskRegistry::new(token.clone()), token)
}

async fn stuck() -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

/// **Proves:** finished tasks leave the registry the moment they end:
/// after 10 000 short tasks, `len() == 0`, the snapshot is empty and the
/// counters are exact.
///
/// **Why it matters:** the 0.1 registry kept every entry until `join_all`,
/// so a long-lived node spawning per-request tasks leaked without bound.
///
/// **Catches:** entries not removed on completion, or miscounted outcomes
/// under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_leave_at_once() {
    const N: u64 = 10_000;
    let (r, _) = registry();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            r.spawn(format!("short-{i}"), TaskKind::RpcHandler, async {
                tokio::task::yield_now().await;
                Ok(())
            })
            .unwrap()
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(r.len(), 0);
    assert!(r.is_empty());
    assert!(r.snapshot().is_empty());
    assert_eq!(
        r.stats(),
        TaskStats {
            spawned: N,
            completed: N,
            failed: 0,
            cancelled: 0,
            aborted: 0,
            restarted: 0,
            live: 0,
        }
    );
    assert!(
        !r.is_closed(),
        "finishing tasks does not close the registry"
    );
}

/// **Proves:** the snapshot lists exactly the live tasks with their name,
/// kind and origin.
///
/// **Why it matters:** the SIGUSR1 dump and the shutdown progress display
/// are built on it.
///
/// **Catches:** stale or missing entries, wrong kind/origin.
#[tokio::test]
async fn snapshot_lists_live_tasks() {
    let (r, _) = registry();
    let a = r
        .spawn("sync-loop", TaskKind::BackgroundLoop, stuck())
        .unwrap();
    let _b = r.spawn("compact", TaskKind::Maintenance, stuck()).unwrap();
    let snap = r.snapshot();
    assert_eq!(snap.len(), 2);
    let loop_ = snap.iter().find(|s| s.name == "sync-loop").unwrap();
    assert_eq!(loop_.kind, TaskKind::BackgroundLoop);
    assert_eq!(loop_.origin, TaskOrigin::Native);
    assert_eq!(loop_.origin.as_str(), "native");
    a.abort();
    let _ = a.await;
    let names: Vec<_> = r.snapshot().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["compact"]);
}

/// **Proves:** a task spawned while `join_all` is already waiting is
/// joined too, and under the *same* deadline: one that finishes in time
/// is waited for; one that does not is named when the original deadline
/// passes (not a deadline restarted at its spawn).
///
/// **Why it matters:** tasks spawn tasks during wind-down (a connection
/// handler spawning its close handshake); missing them leaves work running
/// after `start()` returns, restarting the clock makes the deadline a lie.
///
/// **Catches:** a join over a snapshot of the tasks taken at call time, or
/// a per-wave deadline.
#[tokio::test(start_paused = true)]
async fn tasks_spawned_during_join_are_joined_under_the_same_deadline() {
    // Finishes in time: join_all waits for it.
    let (r, _) = registry();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let late_done = Arc::new(AtomicBool::new(false));
    r.spawn("first", TaskKind::BackgroundLoop, {
        let (r, late_done) = (r.clone(), late_done.clone());
        async move {
            go_rx.await?;
            r.spawn("late", TaskKind::BackgroundLoop, async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                late_done.store(true, Ordering::SeqCst);
                Ok(())
            })?;
            Ok(())
        }
    })
    .unwrap();
    let t0 = Instant::now();
    let (joined, ()) = tokio::join!(r.join_all(Duration::from_secs(10)), async {
        tokio::task::yield_now().await;
        go_tx.send(()).unwrap();
    });
    joined.expect("all joined in time");
    assert!(late_done.load(Ordering::SeqCst));
    assert_eq!(t0.elapsed(), Duration::from_secs(5));

    // Outlives the deadline: named at the original deadline.
    let (r, _) = registry();
    r.spawn("first", TaskKind::BackgroundLoop, {
        let r = r.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            r.spawn("late-stuck", TaskKind::BackgroundLoop, stuck())?;
            Ok(())
        }
    })
    .unwrap();
    let t0 = Instant::now();
    let err = r.join_all(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
    assert!(
        matches!(&err, ServiceError::ShutdownDeadlineExceeded { pending: 1, pending_names, .. } if pending_names == &["late-stuck"]),
        "{err:?}"
    );
}

/// **Proves:** after `join_all` (clean or timed out) the registry is
/// closed: `spawn` and `track_foreign` return `AlreadyStopped`, and the
/// refused future is dropped without running.
///
/// **Why it matters:** a task spawned after the join would run unsupervised
/// past shutdown, outliving the resources `post_stop` just closed.
///
/// **Catches:** a registry that silently accepts late tasks.
#[tokio::test(start_paused = true)]
async fn spawn_after_join_is_already_stopped() {
    let (r, _) = registry();
    r.join_all(Duration::from_secs(1)).await.unwrap();
    assert!(r.is_closed());
    let ran = Arc::new(AtomicBool::new(false));
    let res = r.spawn("late", TaskKind::Maintenance, {
        let ran = ran.clone();
        async move {
            ran.store(true, Ordering::SeqCst);
            Ok(())
        }
    });
    assert!(matches!(res, Err(ServiceError::AlreadyStopped)));
    let foreign = r.track_foreign("late-py", TaskKind::RpcHandler, Arc::new(Flag::default()));
    assert!(matches!(foreign, Err(ServiceError::AlreadyStopped)));
    tokio::task::yield_now().await;
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!(r.stats().spawned, 0);

    let (r, _) = registry();
    r.spawn("stuck", TaskKind::BackgroundLoop, stuck()).unwrap();
    r.join_all(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(
        r.spawn("late", TaskKind::Maintenance, async { Ok(()) }),
        Err(ServiceError::AlreadyStopped)
    ));
}

/// **Proves:** `ShutdownDeadlineExceeded` names every straggler in spawn
/// order (even when registry slots were reused out of order) and counts
/// them; the tasks that finished are not named.
///
/// **Why it matters:** "3 tasks still running" is useless to an operator;
/// the names say which subsystem hangs.
///
/// **Catches:** names missing, duplicated, in slot order, or including
/// finished tasks.
#[tokio::test(start_paused = true)]
async fn deadline_error_names_stragglers_in_spawn_order() {
    let (r, _) = registry();
    let done = r
        .spawn("quick", TaskKind::RpcHandler, async { Ok(()) })
        .unwrap();
    r.spawn("stuck-a", TaskKind::BackgroundLoop, stuck())
        .unwrap();
    done.await.unwrap();
    // Reuses the slot "quick" freed, ahead of "stuck-a".
    r.spawn("stuck-b", TaskKind::PeerConnection, stuck())
        .unwrap();
    r.spawn("stuck-c", TaskKind::Maintenance, stuck()).unwrap();

    let err = r.join_all(Duration::from_secs(2)).await.unwrap_err();
    let ServiceError::ShutdownDeadlineExceeded {
        deadline,
        pending,
        pending_names,
        ..
    } = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(*deadline, Duration::from_secs(2));
    assert_eq!(*pending, 3);
    assert_eq!(pending_names, &["stuck-a", "stuck-b", "stuck-c"]);
    let msg = err.to_string();
    assert!(msg.contains("stuck-a, stuck-b, stuck-c"), "{msg}");
}

/// **Proves:** a task returning `Err` and a task that panics are both
/// counted as `failed`, their handles yield `TaskFailure::Error` (the
/// original error) and `TaskFailure::Panic` (the message), and both
/// leave the registry.
///
/// **Why it matters:** "nothing is lost silently": a failing loop must
/// show up in the counters (and the log), not vanish.
///
/// **Catches:** a panicking task counted as completed/aborted, or left
/// in the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_error_and_panic_are_failed() {
    #[derive(Debug, thiserror::Error)]
    #[error("disk full")]
    struct DiskFull;

    let (r, _) = registry();
    let err = r
        .spawn("errs", TaskKind::BackgroundLoop, async {
            Err(anyhow::Error::new(DiskFull))
        })
        .unwrap();
    let panics = r
        .spawn("panics", TaskKind::BackgroundLoop, async {
            panic!("kaboom");
        })
        .unwrap();
    match err.await {
        Err(TaskFailure::Error(e)) => assert!(e.downcast_ref::<DiskFull>().is_some()),
        other => panic!("unexpected {other:?}"),
    }
    match panics.await {
        Err(TaskFailure::Panic(msg)) => assert_eq!(msg, "kaboom"),
        other => panic!("unexpected {other:?}"),
    }
    let stats = r.stats();
    assert_eq!((stats.failed, stats.completed, stats.aborted), (2, 0, 0));
    assert!(r.is_empty());
}

/// **Proves:** an aborted task (by its handle, or by `join_all` at the
/// deadline) is counted as `aborted` and leaves the registry; its handle
/// yields `TaskFailure::Aborted`.
///
/// **Why it matters:** operators distinguish "crashed" from "killed at the
/// deadline"; both must be visible.
///
/// **Catches:** an abort that leaves a ghost entry or is miscounted.
#[tokio::test(start_paused = true)]
async fn abort_is_counted_as_aborted() {
    let (r, _) = registry();
    let h = r
        .spawn("victim", TaskKind::PeerConnection, stuck())
        .unwrap();
    h.abort();
    assert!(matches!(h.await, Err(TaskFailure::Aborted)));
    assert_eq!(r.stats().aborted, 1);
    assert!(r.is_empty());

    let straggler = r
        .spawn("straggler", TaskKind::BackgroundLoop, stuck())
        .unwrap();
    r.join_all(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(straggler.await, Err(TaskFailure::Aborted)));
    let stats = r.stats();
    assert_eq!((stats.aborted, stats.live, stats.spawned), (2, 0, 2));
}

/// **Proves:** a native task that was spawned but never polled when the
/// registry stops its stragglers is named, never runs, and ends aborted.
///
/// **Why it matters:** stragglers are stopped by a flag each task checks
/// when polled (no per-task abort handle); a task still in the run queue
/// must see it on its first poll.
///
/// **Catches:** a task that starts running after the deadline, or one
/// left out of the straggler names.
#[tokio::test]
async fn a_task_that_never_ran_is_stopped_before_it_runs() {
    let (r, _) = registry();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let h = r
        .spawn("never-ran", TaskKind::RpcHandler, async move {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    // Current-thread runtime: the task cannot have been polled yet.
    assert_eq!(r.close_and_stop_all().names, ["never-ran"]);
    assert!(matches!(h.await, Err(TaskFailure::Aborted)));
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!((r.stats().aborted, r.len()), (1, 0));
}

/// A future that, on its first poll, stops the registry it runs in and
/// then waits without arranging any wake-up of its own.
struct StopsItsRegistry(Option<TaskRegistry>);

impl std::future::Future for StopsItsRegistry {
    type Output = anyhow::Result<()>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(r) = self.0.take() {
            assert_eq!(r.close_and_stop_all().names, ["self-stopper"]);
        }
        std::task::Poll::Pending
    }
}

/// **Proves:** a task whose first wait begins after the registry started
/// stopping (its waker was not yet stored when the stop looked for it)
/// still stops.
///
/// **Why it matters:** this is the one race of the stop flag: the stop
/// walks the stored wakers while a task is between polling its future and
/// storing its waker. Without the re-check the task would sleep forever
/// and the join would name a task that never ends.
///
/// **Catches:** a lost wake-up in `park_native` (the test times out under
/// the paused clock instead of hanging).
#[tokio::test(start_paused = true)]
async fn a_task_that_starts_waiting_after_the_stop_still_stops() {
    let (r, _) = registry();
    let h = r
        .spawn(
            "self-stopper",
            TaskKind::BackgroundLoop,
            StopsItsRegistry(Some(r.clone())),
        )
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), h).await;
    assert!(matches!(out, Ok(Err(TaskFailure::Aborted))), "{out:?}");
    assert!(r.is_empty());
}

/// Records how many tasks its registry held when it was dropped.
struct LenAtDrop(TaskRegistry, Arc<AtomicUsize>);

impl Drop for LenAtDrop {
    fn drop(&mut self) {
        self.1.store(self.0.len(), Ordering::SeqCst);
    }
}

/// **Proves:** a stopped or aborted native task is dropped (its cleanup
/// runs) while its entry is still in the registry; the entry leaves after.
///
/// **Why it matters:** a join that sees the registry empty must be able to
/// rely on every task's cleanup (closing sockets, flushing) having run.
///
/// **Catches:** the entry removed before the task's future is dropped.
#[tokio::test(start_paused = true)]
async fn a_task_is_dropped_before_its_entry_leaves() {
    let (r, _) = registry();
    // A task that never ends, and records the registry's length when it is
    // dropped: still 1 if its entry had not left yet.
    let spawn_stuck = |name: &str| {
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let guard = LenAtDrop(r.clone(), seen.clone());
        let h = r
            .spawn(name, TaskKind::PeerConnection, async move {
                let _guard = guard;
                stuck().await
            })
            .unwrap();
        (h, seen)
    };

    let (h, seen) = spawn_stuck("aborted");
    tokio::task::yield_now().await;
    h.abort();
    assert!(matches!(h.await, Err(TaskFailure::Aborted)));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "dropped after its entry left"
    );

    let (h, seen) = spawn_stuck("straggler");
    r.join_all(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(h.await, Err(TaskFailure::Aborted)));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "dropped after its entry left"
    );
    assert_eq!((r.stats().aborted, r.len()), (2, 0));
}

/// A foreign task stand-in (what the Python bindings do for an asyncio
/// task): records cancel requests and signals them to its owner.
#[derive(Default)]
struct Flag {
    cancels: AtomicUsize,
    tx: Mutex<Option<oneshot::Sender<()>>>,
}

impl ForeignTask for Flag {
    fn cancel(&self) {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(());
        }
    }
}

/// **Proves:** a foreign task is tracked (origin `Python` in snapshots),
/// `join_all` waits for its owner to report its end, and `finish_foreign`
/// counts the outcome and is idempotent.
///
/// **Why it matters:** asyncio tasks and tokio tasks are joined under one
/// deadline by one registry; that is the point of the hybrid.
///
/// **Catches:** a join that ignores foreign tasks, or double counting.
#[tokio::test(start_paused = true)]
async fn foreign_task_is_joined() {
    let (r, token) = registry();
    let id = r
        .track_foreign(
            "py-handler",
            TaskKind::RpcHandler,
            Arc::new(Flag::default()),
        )
        .unwrap();
    let snap = r.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].origin, TaskOrigin::Python);
    assert_eq!(snap[0].origin.as_str(), "python");

    // The "event loop" finishes the task once shutdown is requested.
    let owner = tokio::spawn({
        let (r, token) = (r.clone(), token.clone());
        async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(r.finish_foreign(id, TaskOutcome::Completed));
        }
    });
    token.cancel(ShutdownReason::UserRequested);
    let t0 = Instant::now();
    r.join_all(Duration::from_secs(5)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(300));
    owner.await.unwrap();
    assert!(
        !r.finish_foreign(id, TaskOutcome::Completed),
        "already finished"
    );
    let stats = r.stats();
    assert_eq!((stats.completed, stats.live), (1, 0));
}

/// **Proves:** a foreign task still live at the deadline is named in
/// `ShutdownDeadlineExceeded`, its `cancel()` is called exactly once, and
/// when its owner then reports it `Cancelled` it is counted as such.
///
/// **Why it matters:** an asyncio task ignoring the token must be
/// cancelled at the deadline just like a tokio task is aborted.
///
/// **Catches:** foreign stragglers left running, cancelled twice, or
/// missing from the error.
#[tokio::test(start_paused = true)]
async fn foreign_task_is_cancelled_at_the_deadline() {
    let (r, _) = registry();
    let (tx, rx) = oneshot::channel();
    let flag = Arc::new(Flag {
        cancels: AtomicUsize::new(0),
        tx: Mutex::new(Some(tx)),
    });
    let id = r
        .track_foreign("py-stuck", TaskKind::BackgroundLoop, flag.clone())
        .unwrap();
    let owner = tokio::spawn({
        let r = r.clone();
        async move {
            rx.await.unwrap();
            r.finish_foreign(id, TaskOutcome::Cancelled)
        }
    });
    let err = r.join_all(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::ShutdownDeadlineExceeded { pending: 1, pending_names, .. } if pending_names == &["py-stuck"]),
        "{err:?}"
    );
    assert!(owner.await.unwrap());
    assert_eq!(flag.cancels.load(Ordering::SeqCst), 1);
    let stats = r.stats();
    assert_eq!((stats.cancelled, stats.live), (1, 0));
}

/// **Proves:** `join_all` waits for native tasks that finish after many
/// concurrent spawners have raced it, with no lost wake-up.
///
/// **Why it matters:** spawns and completions happen on every worker
/// thread while the join waits; a lost idle wake-up would hang shutdown
/// until the deadline.
///
/// **Catches:** an idle waker registered after the last task finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_all_sees_the_last_completion() {
    let (r, token) = registry();
    let barrier = Arc::new(Barrier::new(65));
    for i in 0..64 {
        let (token, barrier) = (token.clone(), barrier.clone());
        r.spawn(format!("t{i}"), TaskKind::BackgroundLoop, async move {
            barrier.wait().await;
            token.cancelled().await;
            Ok(())
        })
        .unwrap();
    }
    barrier.wait().await;
    token.cancel(ShutdownReason::UserRequested);
    tokio::time::timeout(Duration::from_secs(30), r.join_all(Duration::from_secs(60)))
        .await
        .expect("join_all returned")
        .unwrap();
    assert_eq!(r.stats().completed, 64);
}

/// **Proves:** `join_all(Duration::MAX)` neither panics nor times out: it
/// simply waits.
///
/// **Why it matters:** "no deadline" is a legitimate configuration, and a
/// huge value must never crash the process (`Instant + Duration::MAX`
/// overflows).
///
/// **Catches:** unchecked instant arithmetic.
#[tokio::test(start_paused = true)]
async fn join_all_with_an_unbounded_deadline() {
    let (r, _) = registry();
    r.spawn("slow", TaskKind::Maintenance, async {
        tokio::time::sleep(Duration::from_secs(7)).await;
        Ok(())
    })
    .unwrap();
    let t0 = Instant::now();
    r.join_all(Duration::MAX).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
}

/// **Proves:** spawning onto a runtime that has shut down returns promptly
/// (no deadlock) with `RuntimeShutDown`, and the never-run task leaves no
/// trace: not counted, not live.
///
/// **Why it matters:** at interpreter exit the runtime may be shut down
/// while Python code still spawns; tokio then drops the future *inline*,
/// and the registry's bookkeeping must not be holding its own lock.
///
/// **Catches:** holding the registry lock across `Handle::spawn`; `Ok` for
/// a task that never ran (issue 12, item 16).
#[test]
fn spawn_on_a_shut_down_runtime_does_not_deadlock() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    drop(rt);
    let (r, _) = registry();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let res = r.spawn_on(&handle, "late", TaskKind::Maintenance, async { Ok(()) });
        tx.send((res.map(drop), r.stats())).unwrap();
    });
    let (res, stats) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("spawn_on deadlocked");
    assert!(matches!(res, Err(ServiceError::RuntimeShutDown)), "{res:?}");
    assert_eq!((stats.spawned, stats.aborted, stats.live), (0, 0, 0));
}

/// A foreign task whose work has ended but whose owner has not yet reported
/// it (its completion callback is still queued on its event loop).
struct EndedButUnreported;

impl ForeignTask for EndedButUnreported {
    fn cancel(&self) {
        panic!("an ended task must not be cancelled");
    }
    fn is_finished(&self) -> bool {
        true
    }
}

/// **Proves:** at the deadline, a foreign task that already ended (its
/// completion merely queued) is neither cancelled nor named as a straggler,
/// while a really stuck one is.
///
/// **Why it matters:** an event loop that is behind runs the deadline timer
/// before the queued completions; the report must not blame tasks that
/// finished in time (seen on uvloop with 100k short tasks).
///
/// **Catches:** stragglers computed from the registry's bookkeeping alone.
#[tokio::test(start_paused = true)]
async fn ended_but_unreported_foreign_task_is_not_a_straggler() {
    let (r, _token) = registry();
    r.track_foreign("ended", TaskKind::RpcHandler, Arc::new(EndedButUnreported))
        .unwrap();
    let stuck = Arc::new(Flag::default());
    r.track_foreign("stuck", TaskKind::RpcHandler, stuck.clone())
        .unwrap();
    let err = r.join_all(Duration::from_millis(50)).await.unwrap_err();
    match err {
        ServiceError::ShutdownDeadlineExceeded {
            pending,
            pending_names,
            ..
        } => {
            assert_eq!(pending, 1);
            assert_eq!(pending_names, vec!["stuck".to_owned()]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(stuck.cancels.load(Ordering::SeqCst), 1);
}

/// **Proves:** `stats_by_kind` always lists every (kind, origin) pair once,
/// in a fixed order, and its counters are the core's own: spawned, failed
/// and live per kind and origin, native and foreign, summing to `stats()`.
///
/// **Why it matters:** metrics label task counters by kind from this call;
/// a missing row or a miscounted bucket is a wrong dashboard.
///
/// **Catches:** a failure counted under the wrong kind (or only in the
/// total), a live foreign task not seen, a row missing when nothing ran.
#[tokio::test(start_paused = true)]
async fn stats_by_kind_counts_each_kind_and_origin() {
    let (r, _) = registry();
    let empty = r.stats_by_kind();
    assert_eq!(empty.len(), 8);
    let pairs: Vec<_> = empty.iter().map(|s| (s.kind, s.origin)).collect();
    let kinds = [
        TaskKind::BackgroundLoop,
        TaskKind::PeerConnection,
        TaskKind::RpcHandler,
        TaskKind::Maintenance,
    ];
    let want: Vec<_> = kinds
        .iter()
        .flat_map(|&k| [(k, TaskOrigin::Native), (k, TaskOrigin::Python)])
        .collect();
    assert_eq!(pairs, want);
    assert!(empty
        .iter()
        .all(|s| (s.spawned, s.failed, s.restarted, s.live) == (0, 0, 0, 0)));

    let ok = r
        .spawn("ok", TaskKind::RpcHandler, async { Ok(()) })
        .unwrap();
    let bad = r
        .spawn("bad", TaskKind::PeerConnection, async {
            anyhow::bail!("boom")
        })
        .unwrap();
    let live = r.spawn("live", TaskKind::PeerConnection, stuck()).unwrap();
    let id = r
        .track_foreign("py", TaskKind::Maintenance, Arc::new(Flag::default()))
        .unwrap();
    let py_failed = r
        .track_foreign("py-bad", TaskKind::Maintenance, Arc::new(Flag::default()))
        .unwrap();
    ok.await.unwrap();
    bad.await.unwrap_err();
    assert!(r.finish_foreign(py_failed, TaskOutcome::Failed));

    let by = r.stats_by_kind();
    let get = |kind, origin| -> KindStats {
        *by.iter()
            .find(|s| s.kind == kind && s.origin == origin)
            .unwrap()
    };
    let row = |s: KindStats| (s.spawned, s.failed, s.restarted, s.live);
    assert_eq!(
        row(get(TaskKind::RpcHandler, TaskOrigin::Native)),
        (1, 0, 0, 0)
    );
    assert_eq!(
        row(get(TaskKind::PeerConnection, TaskOrigin::Native)),
        (2, 1, 0, 1)
    );
    assert_eq!(
        row(get(TaskKind::Maintenance, TaskOrigin::Python)),
        (2, 1, 0, 1)
    );
    assert_eq!(
        row(get(TaskKind::Maintenance, TaskOrigin::Native)),
        (0, 0, 0, 0)
    );
    let stats = r.stats();
    assert_eq!(by.iter().map(|s| s.spawned).sum::<u64>(), stats.spawned);
    assert_eq!(by.iter().map(|s| s.failed).sum::<u64>(), stats.failed);
    assert_eq!(by.iter().map(|s| s.live).sum::<u64>(), stats.live);
    live.abort();
    let _ = live.await;
    assert!(r.finish_foreign(id, TaskOutcome::Completed));
    assert!(r.stats_by_kind().iter().all(|s| s.live == 0));
}

/// **Proves:** a stop that races tasks completing on other workers counts
/// every task once: the tasks it names as stragglers are exactly the tasks
/// counted aborted (those that returned after being named included), and
/// every other task is counted completed.
///
/// **Catches:** a completion noted too late for the stop's reap but not
/// counted aborted, although the stop named it (the ordering between a
/// task's ended bit and the stop flag), or a task counted twice or lost
/// (completions are not counted, but derived from the other counts).
#[test]
fn a_stop_racing_completions_counts_each_named_task_aborted() {
    const N: u64 = 2_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    let mut named_any = false;
    for round in 0..40u64 {
        let (r, _) = registry();
        let stragglers = rt.block_on(async {
            for i in 0..N {
                r.spawn("racer", TaskKind::RpcHandler, async move {
                    // Some return at their first poll, some after a few
                    // polls, each after some work in its last poll, so
                    // that some are inside that poll when the stop below
                    // names them, and return after it.
                    for _ in 0..(i + round) % 3 {
                        tokio::task::yield_now().await;
                    }
                    std::hint::black_box((0..(i % 50) * 100).sum::<u64>());
                    Ok(())
                })
                .unwrap();
            }
            r.close_and_stop_all()
        });
        named_any |= !stragglers.names.is_empty();
        rt.block_on(r.join_all(Duration::from_secs(60)))
            .expect("every task ends once stopped");
        assert!(r.is_empty());
        let s = r.stats();
        assert_eq!(s.spawned, N, "round {round}");
        assert_eq!(
            s.aborted as usize,
            stragglers.names.len(),
            "round {round}: the named tasks, and only they, count aborted"
        );
        assert_eq!(s.completed + s.aborted, N, "round {round}: {s:?}");
        assert_eq!((s.failed, s.cancelled, s.live), (0, 0, 0), "round {round}");
    }
    assert!(
        named_any,
        "the stop never found a live task: no race was run"
    );
}

/// A foreign task stand-in whose end its owner has not reported yet: it
/// says how it ended ([`ForeignTask::quiet_end`]) once `ended` is set.
struct Quiet {
    ended: AtomicBool,
    outcome: TaskOutcome,
    asked: AtomicUsize,
}

impl Quiet {
    fn new(outcome: TaskOutcome, ended: bool) -> Arc<Self> {
        Arc::new(Self {
            ended: AtomicBool::new(ended),
            outcome,
            asked: AtomicUsize::new(0),
        })
    }
}

impl ForeignTask for Quiet {
    fn cancel(&self) {}
    fn quiet_end(&self) -> Option<TaskOutcome> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.ended.load(Ordering::SeqCst).then_some(self.outcome)
    }
}

/// **Proves:** after shutdown, `finish_quiet_ends` counts the foreign tasks
/// that already ended quietly (returned, cancelled) with their outcomes, so
/// that `try_close` closes at once; their owners' later `finish_foreign`
/// then changes nothing. Before the token fires it asks no task.
///
/// **Why it matters:** an asyncio task's done callback runs a loop turn
/// after its end; a service's join right after shutdown would otherwise
/// wait one more turn for callbacks of tasks that are already over (P9).
///
/// **Catches:** a count taken before shutdown (a critical task's return
/// must still fire the token through its owner), an outcome lost or
/// counted twice, a registry left open when every task had ended.
#[test]
fn quiet_ends_are_counted_after_shutdown() {
    let (r, token) = registry();
    let done = Quiet::new(TaskOutcome::Completed, true);
    let cancelled = Quiet::new(TaskOutcome::Cancelled, true);
    let done_id = r
        .track_foreign("done", TaskKind::RpcHandler, done.clone())
        .unwrap();
    r.track_foreign("cancelled", TaskKind::PeerConnection, cancelled.clone())
        .unwrap();
    assert_eq!(r.finish_quiet_ends(), 0);
    assert_eq!(
        done.asked.load(Ordering::SeqCst),
        0,
        "asked before shutdown"
    );
    assert_eq!(r.len(), 2);

    token.cancel(ShutdownReason::UserRequested);
    assert_eq!(r.finish_quiet_ends(), 2);
    let stats = r.stats();
    assert_eq!(
        (stats.live, stats.completed, stats.cancelled),
        (0, 1, 1),
        "{stats:?}"
    );
    assert!(r.try_close(|| panic!("no task is live: nothing to wait for")));
    assert!(!r.finish_foreign(done_id, TaskOutcome::Failed));
    assert_eq!(r.stats().failed, 0);
}

/// **Proves:** `finish_quiet_ends` stops at the first foreign task that is
/// still running and leaves it (and every task after it) to its owner; a
/// join then waits for that owner, and native tasks are passed over.
///
/// **Why it matters:** the join waits for a running task anyway, so asking
/// the rest of 100k live tasks would cost a shutdown for nothing.
///
/// **Catches:** a running task counted as ended; a scan that asks every
/// task when one is running; a native task taken for a foreign one.
#[tokio::test(flavor = "current_thread")]
async fn quiet_end_scan_stops_at_a_running_task() {
    let (r, token) = registry();
    let (tx, rx) = oneshot::channel::<()>();
    let native = r
        .spawn("native", TaskKind::BackgroundLoop, async move {
            let _ = rx.await;
            Ok(())
        })
        .unwrap();
    let ended = Quiet::new(TaskOutcome::Completed, true);
    let running = Quiet::new(TaskOutcome::Completed, false);
    // More than one batch of tasks behind the running one.
    let behind: Vec<_> = (0..100)
        .map(|_| Quiet::new(TaskOutcome::Completed, true))
        .collect();
    r.track_foreign("ended", TaskKind::RpcHandler, ended.clone())
        .unwrap();
    let running_id = r
        .track_foreign("running", TaskKind::RpcHandler, running.clone())
        .unwrap();
    let mut behind_ids = Vec::new();
    for b in &behind {
        behind_ids.push(
            r.track_foreign("behind", TaskKind::RpcHandler, b.clone())
                .unwrap(),
        );
    }
    token.cancel(ShutdownReason::UserRequested);
    assert_eq!(r.finish_quiet_ends(), 1);
    assert_eq!(running.asked.load(Ordering::SeqCst), 1);
    let asked_behind: usize = behind.iter().map(|b| b.asked.load(Ordering::SeqCst)).sum();
    assert_eq!(asked_behind, 0, "tasks after a running one were asked");
    assert_eq!(r.len(), 102);

    let join = {
        let r = r.clone();
        tokio::spawn(async move { r.join_all(Duration::from_secs(60)).await })
    };
    tokio::task::yield_now().await;
    assert!(!join.is_finished());
    tx.send(()).unwrap();
    native.await.unwrap();
    assert!(r.finish_foreign(running_id, TaskOutcome::Completed));
    for id in behind_ids {
        assert!(r.finish_foreign(id, TaskOutcome::Completed));
    }
    join.await.unwrap().expect("every task ended");
    assert_eq!(r.stats().completed, 103);
}

/// A foreign task that records, in one shared log, every call the registry
/// makes of it (the provided `stop` included, through the three it calls).
struct Recorder {
    name: &'static str,
    finished: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn new(name: &'static str, finished: bool, log: &Arc<Mutex<Vec<String>>>) -> Arc<Self> {
        Arc::new(Self {
            name,
            finished,
            log: log.clone(),
        })
    }

    fn note(&self, what: &str) {
        self.log.lock().push(format!("{} {what}", self.name));
    }
}

impl ForeignTask for Recorder {
    fn cancel(&self) {
        self.note("cancel");
    }

    fn is_finished(&self) -> bool {
        self.note("is_finished");
        self.finished
    }

    fn stack(&self) -> Option<String> {
        self.note("stack");
        Some(format!("in {}", self.name))
    }
}

/// **Proves:** at a deadline the registry stops each live foreign task
/// through `ForeignTask::stop`, whose provided form asks `is_finished`,
/// then (only if it was not) the stack when one is wanted, then `cancel`;
/// stacks go to the oldest stragglers up to `max_stacks`, a task that had
/// already finished neither counts against them nor is named, and each
/// stack lands on its own straggler.
///
/// **Catches:** a finished task cancelled or named, a stack asked of a task
/// that is not cancelled, or more stacks taken than asked for (each may
/// cost a GIL acquisition in the Python bindings).
#[tokio::test]
async fn foreign_stragglers_are_stopped_through_stop_oldest_stacks_first() {
    let (r, _token) = registry();
    let log = Arc::new(Mutex::new(Vec::new()));
    for (name, finished) in [("a", false), ("done", true), ("b", false), ("c", false)] {
        r.track_foreign(
            name,
            TaskKind::RpcHandler,
            Recorder::new(name, finished, &log),
        )
        .unwrap();
    }
    let stopped = r.close_and_stop_all_with_stacks(2);
    assert_eq!(stopped.names, ["a", "b", "c"]);
    let stacks: Vec<_> = stopped.tasks.iter().map(|t| t.stack.as_deref()).collect();
    assert_eq!(stacks, [Some("in a"), Some("in b"), None]);
    assert_eq!(
        *log.lock(),
        [
            "a is_finished",
            "a stack",
            "a cancel",
            "done is_finished",
            "b is_finished",
            "b stack",
            "b cancel",
            "c is_finished",
            "c cancel",
        ]
    );
}

/// A foreign task that answers `stop` itself, as the Python bindings do
/// (one GIL acquisition for the three steps).
struct OneCall {
    calls: AtomicUsize,
    wanted: Mutex<Vec<bool>>,
}

impl ForeignTask for OneCall {
    fn cancel(&self) {
        panic!("the registry called cancel, not stop");
    }

    fn is_finished(&self) -> bool {
        panic!("the registry called is_finished, not stop");
    }

    fn stop(&self, want_stack: bool) -> Option<Option<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.wanted.lock().push(want_stack);
        Some(want_stack.then(|| "where it waited".to_owned()))
    }
}

/// **Proves:** an implementation's own `stop` is the one call the registry
/// makes of a straggler at a deadline (no `is_finished`, no `cancel`
/// besides), once per task, with `want_stack` true for the first
/// `max_stacks` only; its answer is the straggler's stack.
///
/// **Catches:** the registry bypassing an overridden `stop` (a Python
/// straggler would then cost three GIL acquisitions from a tokio worker
/// instead of one).
#[tokio::test]
async fn an_overridden_stop_is_the_only_call_a_straggler_gets() {
    let (r, _token) = registry();
    let task = Arc::new(OneCall {
        calls: AtomicUsize::new(0),
        wanted: Mutex::new(Vec::new()),
    });
    for name in ["x", "y"] {
        r.track_foreign(name, TaskKind::Maintenance, task.clone())
            .unwrap();
    }
    let stopped = r.close_and_stop_all_with_stacks(1);
    assert_eq!(task.calls.load(Ordering::SeqCst), 2);
    assert_eq!(*task.wanted.lock(), [true, false]);
    let stacks: Vec<_> = stopped.tasks.iter().map(|t| t.stack.as_deref()).collect();
    assert_eq!(stacks, [Some("where it waited"), None]);
}
