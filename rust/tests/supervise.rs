//! Supervised native tasks (`TaskRegistry::supervise`, SPEC 8): restart
//! types, backoff and its reset, intensity and giving up, shutdown during
//! a wait and during an incarnation, abort, one live task; and a property
//! test of random failure sequences against a model of the policy.
//!
//! Every test runs on tokio's paused clock: backoffs and windows pass in
//! virtual time, so the delays are checked exactly and nothing sleeps.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dig_service::{
    Restart, RestartPolicy, ServiceError, ShutdownReason, ShutdownToken, TaskFailure, TaskKind,
    TaskRegistry,
};
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tokio::time::Instant;

const BG: TaskKind = TaskKind::BackgroundLoop;

fn registry() -> (TaskRegistry, ShutdownToken) {
    let token = ShutdownToken::new();
    (TaskRegistry::new(token.clone()), token)
}

fn quick() -> RestartPolicy {
    RestartPolicy::new()
        .with_backoff(Duration::ZERO)
        .with_max_backoff(Duration::ZERO)
}

/// A factory whose n-th incarnation (from 0) does `script(n)`, and that
/// counts its calls and records when each incarnation started.
#[derive(Clone, Default)]
struct Script {
    calls: Arc<AtomicU32>,
    starts: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    fn factory<Fut>(
        &self,
        script: impl Fn(u32) -> Fut + Send + 'static,
    ) -> impl FnMut() -> Fut + Send + 'static
    where
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (calls, starts) = (self.calls.clone(), self.starts.clone());
        move || {
            starts.lock().push(Instant::now());
            script(calls.fetch_add(1, Ordering::SeqCst))
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// **Proves:** a permanent task is restarted when it returns and when it
/// fails, until it gives up; a transient one only when it fails (returning
/// ends it cleanly); a temporary one never. **Catches:** a restart type
/// read the wrong way round.
#[tokio::test(start_paused = true)]
async fn each_restart_type_restarts_what_it_should() {
    // Permanent: returns, fails, returns... then gives up after 3 restarts.
    let (r, token) = registry();
    let s = Script::default();
    let policy = quick().with_max_restarts(3).with_critical(false);
    let h = r
        .supervise(
            "perm",
            BG,
            s.factory(|n| async move {
                if n % 2 == 0 {
                    Ok(())
                } else {
                    anyhow::bail!("odd {n}")
                }
            }),
            policy.clone(),
        )
        .unwrap();
    let err = h.await.unwrap_err();
    // The 4th incarnation (n = 3) failed and was the one too many.
    assert_eq!(s.calls(), 4);
    assert!(err.to_string().contains("odd 3"), "{err}");
    assert!(
        !token.is_cancelled(),
        "not critical: the token is left alone"
    );
    let st = r.stats();
    assert_eq!((st.spawned, st.failed, st.restarted, st.live), (1, 1, 3, 0));

    // Transient: fails twice, then returns: done, cleanly.
    let (r, _) = registry();
    let s = Script::default();
    let h = r
        .supervise(
            "trans",
            BG,
            s.factory(|n| async move {
                if n < 2 {
                    anyhow::bail!("fail {n}")
                }
                Ok(())
            }),
            policy.clone().with_restart(Restart::Transient),
        )
        .unwrap();
    assert_eq!(h.name().as_str(), "trans");
    assert_eq!(h.kind(), BG);
    h.await.unwrap();
    assert_eq!(s.calls(), 3);
    let st = r.stats();
    assert_eq!((st.completed, st.failed, st.restarted), (1, 0, 2));

    // Temporary: a failure is not restarted, and a critical one is Fatal.
    let (r, token) = registry();
    let s = Script::default();
    let h = r
        .supervise(
            "temp",
            BG,
            s.factory(|_| async { anyhow::bail!("once") }),
            quick().with_restart(Restart::Temporary),
        )
        .unwrap();
    assert!(h.await.is_err());
    assert_eq!(s.calls(), 1);
    assert_eq!(
        token.reason(),
        Some(ShutdownReason::Fatal(
            "critical task 'temp' failed: once".into()
        ))
    );
    assert_eq!(r.stats().restarted, 0);
}

/// **Proves:** the delays before successive restarts double from `backoff`
/// up to `max_backoff`, each within `[base/2, base]` (jitter), and reset to
/// `backoff` after an incarnation that lived longer than `within`.
/// **Catches:** a backoff that does not grow, overshoots its cap, adds its
/// jitter on top, or never resets.
#[tokio::test(start_paused = true)]
async fn backoff_doubles_to_the_cap_and_resets_after_a_long_life() {
    let (r, token) = registry();
    let s = Script::default();
    let policy = RestartPolicy::new()
        .with_max_restarts(100)
        .with_within(Duration::from_secs(1000))
        .with_backoff(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(8));
    // Incarnations 0..=5 fail at once; 6 lives 1001 s then fails; 7 fails
    // at once; 8 waits for the token.
    let stop = token.clone();
    let h = r
        .supervise(
            "loop",
            BG,
            s.factory(move |n| {
                let stop = stop.clone();
                async move {
                    match n {
                        6 => tokio::time::sleep(Duration::from_secs(1001)).await,
                        8 => {
                            stop.cancelled().await;
                            return Ok(());
                        }
                        _ => {}
                    }
                    anyhow::bail!("fail {n}")
                }
            }),
            policy,
        )
        .unwrap();
    // Wait for incarnation 8 to start, then stop.
    while s.calls() < 9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    token.cancel(ShutdownReason::UserRequested);
    h.await.unwrap();
    let starts = s.starts.lock().clone();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    let secs = Duration::from_secs;
    // Before restarts 1..=6: 1, 2, 4, 8, 8, 8 (each then jittered down).
    for (i, base) in [1, 2, 4, 8, 8, 8].into_iter().enumerate() {
        let (gap, base) = (gaps[i], secs(base));
        assert!(
            gap >= base / 2 && gap <= base,
            "gap {i}: {gap:?} for {base:?}"
        );
    }
    // Incarnation 6 lived 1001 s (> within): the next delay is 1 s again.
    let after_long = gaps[6] - secs(1001);
    assert!(
        after_long >= secs(1) / 2 && after_long <= secs(1),
        "{after_long:?}"
    );
    // ...and then it doubles again.
    assert!(gaps[7] >= secs(1) && gaps[7] <= secs(2), "{:?}", gaps[7]);
    assert_eq!(r.stats().restarted, 8);
}

/// **Proves:** the (max+1)-th restart within `within` gives up; a critical
/// task then cancels the token with exactly `Fatal("task 'NAME' gave up
/// after N restarts in W s: LAST ERROR")`, and awaiting the handle gives
/// the last error. Restarts that left the window do not count.
/// **Catches:** an off-by-one in the intensity, a wrong Fatal message, a
/// window that never forgets.
#[tokio::test(start_paused = true)]
async fn giving_up_is_fatal_for_a_critical_task() {
    let (r, token) = registry();
    let s = Script::default();
    let h = r
        .supervise(
            "peer-sync",
            BG,
            s.factory(|n| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                anyhow::bail!("connection reset #{n}")
            }),
            quick()
                .with_max_restarts(2)
                .with_within(Duration::from_secs(10)),
        )
        .unwrap();
    let err = h.await.unwrap_err();
    assert!(matches!(err, TaskFailure::Error(_)), "{err:?}");
    assert_eq!(s.calls(), 3);
    // Restarts at t=1 and t=2; the end that gave up at t=3.
    assert_eq!(
        token.reason(),
        Some(ShutdownReason::Fatal(
            "task 'peer-sync' gave up after 2 restarts in 2 s: connection reset #2".into()
        ))
    );

    // With a window of 0.9 s, a failure every second never exceeds 2 in a
    // window: it goes on until the token fires.
    let (r, token) = registry();
    let s = Script::default();
    let h = r
        .supervise(
            "slow-crash",
            BG,
            s.factory(|_| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                anyhow::bail!("again")
            }),
            quick()
                .with_max_restarts(1)
                .with_within(Duration::from_millis(900)),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20_500)).await;
    assert!(!token.is_cancelled(), "{:?}", token.reason());
    assert_eq!(h.restarts(), 20);
    token.cancel(ShutdownReason::UserRequested);
    // The incarnation running when the token fired fails at t=21: not
    // restarted, and (the service is shutting down) not Fatal.
    assert!(h.await.is_err());
    assert_eq!(token.reason(), Some(ShutdownReason::UserRequested));
    assert_eq!(s.calls(), 21);
}

/// **Proves:** a supervised task is one live task throughout (its
/// incarnations and its waits), and the token fired during a backoff wait
/// ends the wait at once: the task ends cleanly, nothing restarts, and the
/// join finishes without waiting for the backoff.
/// **Catches:** a wait that sleeps its whole backoff through a shutdown, a
/// restart after the token fired, an entry per incarnation.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_backoff_wait_ends_it_at_once() {
    let (r, token) = registry();
    let s = Script::default();
    let h = r
        .supervise(
            "waits",
            BG,
            s.factory(|_| async { anyhow::bail!("down") }),
            RestartPolicy::new()
                .with_backoff(Duration::from_secs(3600))
                .with_max_backoff(Duration::from_secs(3600)),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((s.calls(), h.restarts()), (1, 1), "in its first wait");
    assert_eq!(r.len(), 1);
    let snap = r.snapshot();
    assert_eq!((snap.len(), snap[0].restarts), (1, 1));
    let t0 = Instant::now();
    token.cancel(ShutdownReason::UserRequested);
    r.join_all(Duration::from_secs(5)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    h.await.unwrap();
    assert_eq!(s.calls(), 1);
    let st = r.stats();
    assert_eq!((st.spawned, st.completed, st.restarted), (1, 1, 1));
}

/// **Proves:** an incarnation that ends because the token fired is not
/// restarted; one that ignores the token is stopped at the join's deadline
/// and named there once, however many incarnations it had.
/// **Catches:** a restart during shutdown, a supervised straggler named per
/// incarnation or missed.
#[tokio::test(start_paused = true)]
async fn shutdown_during_an_incarnation() {
    let (r, token) = registry();
    let s = Script::default();
    let stop = token.clone();
    let polite = r
        .supervise(
            "polite",
            BG,
            s.factory(move |_| {
                let stop = stop.clone();
                async move {
                    stop.cancelled().await;
                    Ok(())
                }
            }),
            quick(),
        )
        .unwrap();
    let stubborn = Script::default();
    let stubborn_h = r
        .supervise(
            "stubborn",
            BG,
            stubborn.factory(|n| async move {
                if n < 3 {
                    anyhow::bail!("warming up")
                }
                std::future::pending::<()>().await;
                Ok(())
            }),
            quick(),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(r.len(), 2);
    token.cancel(ShutdownReason::UserRequested);
    match r.join_all(Duration::from_millis(100)).await {
        Err(ServiceError::ShutdownDeadlineExceeded {
            pending,
            pending_names,
            ..
        }) => {
            assert_eq!((pending, pending_names), (1, vec!["stubborn".to_owned()]));
        }
        other => panic!("expected the deadline, got {other:?}"),
    }
    polite.await.unwrap();
    assert!(matches!(stubborn_h.await, Err(TaskFailure::Aborted)));
    assert_eq!(s.calls(), 1);
    assert_eq!(stubborn.calls(), 4);
    let st = r.stats();
    assert_eq!(
        (st.completed, st.aborted, st.restarted, st.live),
        (1, 1, 3, 0)
    );
}

/// **Proves:** `abort()` stops the task for good, whether it is running an
/// incarnation or waiting to restart; awaiting it then reports `Aborted`.
/// **Catches:** an abort that only ends the current incarnation.
#[tokio::test(start_paused = true)]
async fn abort_stops_it_for_good() {
    let (r, _) = registry();
    let s = Script::default();
    let running = r
        .supervise(
            "running",
            BG,
            s.factory(|_| std::future::pending()),
            quick(),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    running.abort();
    assert!(matches!(running.await, Err(TaskFailure::Aborted)));
    let waiting = r
        .supervise(
            "waiting",
            BG,
            || async { anyhow::bail!("x") },
            RestartPolicy::new()
                .with_backoff(Duration::from_secs(60))
                .with_max_backoff(Duration::from_secs(60)),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(waiting.restarts(), 1);
    waiting.abort_handle().abort();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(waiting.is_finished());
    assert_eq!(waiting.restarts(), 1, "nothing restarted after the abort");
    assert_eq!((s.calls(), r.len(), r.stats().aborted), (1, 0, 2));
}

/// **Proves:** a factory that panics and an incarnation that panics are
/// failed incarnations (restarted by the policy), never an unwinding
/// supervisor; an invalid policy is refused before anything is spawned or
/// the factory called.
/// **Catches:** a panic that kills the supervisor silently, a policy
/// checked too late.
#[tokio::test(start_paused = true)]
async fn panics_are_failures_and_bad_policies_are_refused() {
    let (r, _) = registry();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let h = r
        .supervise(
            "panicky",
            BG,
            move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                assert!(n != 0, "factory panic");
                async move {
                    assert!(n != 1, "incarnation panic");
                    Ok(())
                }
            },
            quick().with_restart(Restart::Transient),
        )
        .unwrap();
    h.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(r.stats().restarted, 2);

    let called = Arc::new(AtomicU32::new(0));
    for bad in [
        RestartPolicy::new().with_within(Duration::ZERO),
        RestartPolicy::new()
            .with_backoff(Duration::from_secs(2))
            .with_max_backoff(Duration::from_secs(1)),
    ] {
        let c = called.clone();
        let err = r
            .supervise(
                "bad",
                BG,
                move || {
                    c.fetch_add(1, Ordering::SeqCst);
                    async { Ok(()) }
                },
                bad,
            )
            .unwrap_err();
        assert!(
            matches!(err, ServiceError::InvalidRestartPolicy(_)),
            "{err}"
        );
    }
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert_eq!(r.stats().spawned, 1);
}

/// **Proves:** `supervise` outside a runtime is a clear error, not a panic.
/// **Catches:** a `tokio::spawn` that panics with "no reactor running".
#[test]
fn supervise_outside_a_runtime_is_an_error() {
    let (r, _) = registry();
    let err = r
        .supervise("x", BG, || async { Ok(()) }, RestartPolicy::new())
        .unwrap_err();
    assert!(matches!(err, ServiceError::NoRuntime(_)), "{err}");
    assert_eq!(r.stats().spawned, 0);
}

// ---------------------------------------------------------------------------
// Property: random failure sequences against a model of the policy.

/// How the model says a run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    incarnations: usize,
    restarts: u32,
    /// `Ok` (ended cleanly) or `Err(index of the failing incarnation)`.
    result: Result<(), usize>,
    gave_up: bool,
}

/// The policy as SPEC 8 states it, for incarnations that end at once, one
/// after the other, with no backoff and a window longer than the run:
/// every restart of the run is in the window.
fn model(restart: Restart, max_restarts: u32, fails: &[bool]) -> Expected {
    // Every incarnation before the last was restarted: the i-th (from 0)
    // ends with i restarts made so far.
    for (i, &failed) in fails.iter().enumerate() {
        let restarts = u32::try_from(i).unwrap();
        let restarts_it = match restart {
            Restart::Permanent => true,
            Restart::Transient => failed,
            Restart::Temporary => false,
        };
        if !restarts_it || restarts == max_restarts {
            return Expected {
                incarnations: i + 1,
                restarts,
                result: if failed { Err(i) } else { Ok(()) },
                gave_up: restarts_it,
            };
        }
    }
    unreachable!("the script is longer than any run")
}

fn restart_strategy() -> impl Strategy<Value = Restart> {
    prop_oneof![
        Just(Restart::Permanent),
        Just(Restart::Transient),
        Just(Restart::Temporary)
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(15),
        failure_persistence: None,
        ..Config::default()
    })]

    /// **Proves:** for any restart type, intensity and sequence of returns
    /// and failures, the supervised task runs exactly the incarnations the
    /// model says, counts its restarts, ends with the result it says, and
    /// fires the token (critical) exactly when it gives up.
    /// **Catches:** any divergence between the core's restart logic and
    /// SPEC 8's wording of it.
    #[test]
    fn random_failure_sequences_follow_the_model(
        restart in restart_strategy(),
        max_restarts in 0u32..6,
        fails in proptest::collection::vec(any::<bool>(), 8),
        critical in any::<bool>(),
    ) {
        // A run never has more than max_restarts + 1 incarnations, except
        // a transient task that returns: pad with returns.
        let mut script = fails.clone();
        script.resize(16, false);
        let want = model(restart, max_restarts, &script);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (got, calls, stats, reason) = rt.block_on(async {
            let (r, token) = registry();
            let s = Script::default();
            let script = Arc::new(script.clone());
            let h = r
                .supervise(
                    "model",
                    TaskKind::Maintenance,
                    s.factory(move |n| {
                        let failed = script[n as usize];
                        async move {
                            if failed {
                                anyhow::bail!("incarnation {n}")
                            }
                            Ok(())
                        }
                    }),
                    quick()
                        .with_restart(restart)
                        .with_max_restarts(max_restarts)
                        .with_within(Duration::from_secs(3600))
                        .with_critical(critical),
                )
                .unwrap();
            let got = h.await;
            (got, s.calls(), r.stats(), token.reason())
        });
        prop_assert_eq!(calls as usize, want.incarnations);
        prop_assert_eq!(stats.restarted, u64::from(want.restarts));
        prop_assert_eq!((stats.spawned, stats.live), (1, 0));
        match (&got, want.result) {
            (Ok(()), Ok(())) => prop_assert_eq!(stats.completed, 1),
            (Err(e), Err(i)) => {
                prop_assert!(e.to_string().contains(&format!("incarnation {i}")), "{}", e);
                prop_assert_eq!(stats.failed, 1);
            }
            _ => prop_assert!(false, "got {:?}, model {:?}", got, want),
        }
        let fatal = matches!(&reason, Some(ShutdownReason::Fatal(_)));
        let failed_for_good = want.result.is_err();
        prop_assert_eq!(fatal, critical && (want.gave_up || failed_for_good), "{:?}", reason);
        if let (true, Some(ShutdownReason::Fatal(msg))) = (want.gave_up, &reason) {
            prop_assert!(
                msg.starts_with(&format!("task 'model' gave up after {max_restarts} restarts in 0 s: ")),
                "{}",
                msg
            );
        }
    }
}
