//! Reliability at the edges (issue 12, the Rust items): where real
//! processes end, the shutdown promise must still hold.
//!
//! Deep token chains on a 2 MiB worker stack, the `start()` future dropped
//! midway, a runtime that shuts down under a service, calls made outside a
//! runtime, panics in callbacks, in `Drop` and with odd payloads, abandoned
//! joins, a task that blocks its worker, critical tasks. Every test that
//! involves a runtime runs on the current-thread and on the multi-thread
//! flavour (the `on_both!` macro), unless it is about one flavour.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use dig_service::{
    ExitReason, ForeignTask, NodeLifecycle, RunContext, Service, ServiceConfig, ServiceError,
    ShutdownReason, ShutdownToken, StartContext, StopContext, TaskFailure, TaskKind, TaskRegistry,
};
use parking_lot::Mutex;
use tokio::sync::watch;

/// Long enough for anything that should happen to happen, even on a
/// loaded machine; only reached when a test is about to fail.
const GENEROUS: Duration = Duration::from_secs(30);

/// Run `$body` (an `async fn()`) as a test on each runtime flavour.
macro_rules! on_both {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[tokio::test(flavor = "current_thread")]
            async fn current_thread() {
                super::$body().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() {
                super::$body().await
            }
        }
    )*};
}

/// Poll `fut` once, outside any runtime, with a waker that does nothing.
fn poll_once<F: Future>(fut: F) -> Poll<F::Output> {
    let mut fut = pin!(fut);
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

/// Panics when dropped.
struct PanicOnDrop(&'static str);

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("{} panicked in Drop", self.0);
    }
}

/// A future that is ready at once (or never, if `pending`) and panics
/// when dropped.
struct ExplodesOnDrop {
    pending: bool,
}

impl Future for ExplodesOnDrop {
    type Output = anyhow::Result<()>;
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl Drop for ExplodesOnDrop {
    fn drop(&mut self) {
        panic!("future panicked in Drop");
    }
}

/// Wait until the (already joined, so closed) `reg` has no live task: a
/// task stopped at a deadline leaves when tokio drops it, a moment after
/// `join_all` returned.
async fn until_empty(reg: &TaskRegistry) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !reg.try_close(move || {
        let _ = tx.send(());
    }) {
        tokio::time::timeout(GENEROUS, rx)
            .await
            .expect("the registry emptied")
            .unwrap();
    }
    assert!(reg.is_empty());
}

// ---------------------------------------------------------------------------
// Item 6: deep chains of child tokens.

/// The depth at which cancelling overflowed a 2 MiB worker stack was 10k,
/// dropping 50k; these are the depths of the reproducers.
const CANCEL_DEPTH: usize = 50_000;
const DROP_DEPTH: usize = 1_000_000;

/// A chain `root → c1 → … → c_depth`; returns the root and the deepest.
fn chain(depth: usize) -> (ShutdownToken, ShutdownToken) {
    let root = ShutdownToken::new();
    let mut t = root.clone();
    for _ in 0..depth {
        t = t.child_token();
    }
    (root, t)
}

/// Run `f` on a tokio worker (multi-thread: a worker thread with tokio's
/// 2 MiB stack; current-thread: the test thread, 2 MiB as well).
async fn on_a_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::spawn(async move { f() })
        .await
        .expect("no panic, no overflow")
}

/// **Proves:** cancelling the root of a 50,000-deep chain of child tokens
/// on a tokio worker reaches the deepest token, with the root's reason.
/// **Catches:** a recursive cancel (one stack frame per link: a SIGSEGV
/// at 10k links on a 2 MiB worker stack).
async fn deep_chain_cancel() {
    let (root, leaf) = chain(CANCEL_DEPTH);
    let waiter = tokio::spawn({
        let leaf = leaf.clone();
        async move { leaf.cancelled().await }
    });
    on_a_worker(move || root.cancel(ShutdownReason::RpcRequested)).await;
    assert_eq!(leaf.reason(), Some(ShutdownReason::RpcRequested));
    tokio::time::timeout(GENEROUS, waiter)
        .await
        .expect("the deepest token's waiter woke")
        .unwrap();
}

/// **Proves:** dropping the last handle of an uncancelled 1,000,000-deep
/// chain on a tokio worker frees every link.
/// **Catches:** a recursive drop of the parent links (a SIGSEGV at 50k
/// links on a 2 MiB worker stack), and a drop that leaks the chain
/// (every 1000th link carries a callback whose captures count drops).
async fn deep_chain_drop() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (root, leaf) = {
        let root = ShutdownToken::new();
        let mut t = root.child_token();
        for i in 0..DROP_DEPTH {
            if i % 1000 == 0 {
                let counter = DropCounter(freed.clone());
                assert!(t.on_cancel(move |_| drop(counter)));
            }
            t = t.child_token();
        }
        (root, t)
    };
    drop(root); // only the leaf keeps the chain alive now
    on_a_worker(move || drop(leaf)).await;
    assert_eq!(freed.load(Ordering::SeqCst), DROP_DEPTH / 1000);
}

struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

on_both!(deep_chain_cancel, deep_chain_drop);

// ---------------------------------------------------------------------------
// Item 13: a panicking `on_cancel` callback.

/// **Proves:** a panicking `on_cancel` callback neither escapes `cancel`
/// nor stops the propagation: every other callback runs once, and every
/// descendant is cancelled with the reason (its callbacks too).
/// **Catches:** callbacks run straight in `cancel`: the panic left the
/// children uncancelled and the later callbacks unrun, for good (the
/// reason was recorded, so a retried `cancel` returned at once).
#[test]
fn a_panicking_callback_does_not_stop_propagation() {
    let root = ShutdownToken::new();
    let child = root.child_token();
    let grandchild = child.child_token();
    let ran = Arc::new(AtomicUsize::new(0));
    let count = |ran: &Arc<AtomicUsize>| {
        let ran = ran.clone();
        move |_: &ShutdownReason| {
            ran.fetch_add(1, Ordering::SeqCst);
        }
    };
    assert!(root.on_cancel(count(&ran)));
    assert!(root.on_cancel(|_| panic!("callback exploded")));
    assert!(root.on_cancel(|_| std::panic::panic_any(7u8)));
    assert!(root.on_cancel(count(&ran)));
    assert!(child.on_cancel(|_| panic!("child callback exploded")));
    assert!(child.on_cancel(count(&ran)));
    assert!(grandchild.on_cancel(count(&ran)));

    let cancel = std::panic::catch_unwind(AssertUnwindSafe(|| {
        root.cancel(ShutdownReason::UserRequested)
    }));
    assert!(cancel.is_ok(), "a callback's panic escaped cancel()");
    assert_eq!(ran.load(Ordering::SeqCst), 4, "every callback ran once");
    assert_eq!(grandchild.reason(), Some(ShutdownReason::UserRequested));
    assert!(child.is_cancelled());
    root.cancel(ShutdownReason::RpcRequested);
    assert_eq!(ran.load(Ordering::SeqCst), 4, "and only once");
}

/// **Proves:** `on_cancel_guard` registrations are removed when their
/// guard drops (the captures are freed at once and the callback never
/// runs), a disarmed guard keeps its callback, the plain `on_cancel`
/// still returns `bool`, and a guard dropped after the token fired is
/// harmless.
/// **Catches:** no way to unregister (1M registrations kept 62 MB), a
/// guard that removes someone else's callback.
#[test]
fn on_cancel_guards_unregister() {
    let t = ShutdownToken::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let freed = Arc::new(AtomicUsize::new(0));
    for _ in 0..1000 {
        let (ran, counter) = (ran.clone(), DropCounter(freed.clone()));
        let guard = t
            .on_cancel_guard(move |_| {
                ran.fetch_add(100, Ordering::SeqCst);
                drop(counter);
            })
            .expect("not fired yet");
        drop(guard);
    }
    assert_eq!(
        freed.load(Ordering::SeqCst),
        1000,
        "captures freed on unregister"
    );
    let kept = {
        let ran = ran.clone();
        t.on_cancel_guard(move |_| {
            ran.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap()
    };
    kept.disarm();
    let late = {
        let ran = ran.clone();
        t.on_cancel_guard(move |_| {
            ran.fetch_add(10, Ordering::SeqCst);
        })
        .unwrap()
    };
    t.cancel(ShutdownReason::UserRequested);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        11,
        "disarmed and live guards ran"
    );
    drop(late);
    assert!(t.on_cancel_guard(|_| unreachable!()).is_none());
    assert!(!t.on_cancel(|_| unreachable!()));
}

// ---------------------------------------------------------------------------
// Item 11: the `start()` future dropped midway; the runtime shutting down.

/// What the ticker node's hooks and task did.
#[derive(Default)]
struct Seen {
    log: Mutex<Vec<&'static str>>,
    ticks: AtomicUsize,
    entered_run: watch::Sender<bool>,
}

impl Seen {
    fn push(&self, what: &'static str) {
        self.log.lock().push(what);
    }
    fn log(&self) -> Vec<&'static str> {
        self.log.lock().clone()
    }
}

/// `on_start` spawns a ticker (ticks until the token fires); `run` waits
/// for the token, or ignores it when `stubborn`.
struct TickerNode {
    seen: Arc<Seen>,
    stubborn: bool,
}

#[async_trait]
impl NodeLifecycle for TickerNode {
    const NAME: Option<&'static str> = Some("ticker");

    async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        self.seen.push("on_start");
        let (token, seen) = (ctx.shutdown.clone(), self.seen.clone());
        ctx.tasks
            .spawn("ticker", TaskKind::BackgroundLoop, async move {
                let mut every = tokio::time::interval(Duration::from_millis(5));
                loop {
                    tokio::select! {
                        _ = every.tick() => { seen.ticks.fetch_add(1, Ordering::SeqCst); }
                        () = token.cancelled() => break,
                    }
                }
                seen.push("ticker_exit");
                Ok(())
            })?;
        Ok(())
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        self.seen.push("run");
        self.seen.entered_run.send_replace(true);
        if self.stubborn {
            std::future::pending::<()>().await;
        }
        ctx.shutdown.cancelled().await;
        self.seen.push("run_exit");
        Ok(())
    }

    async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.seen.push("on_stop");
        Ok(())
    }

    async fn post_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.seen.push("post_stop");
        Ok(())
    }
}

fn ticker_service(stubborn: bool) -> (Service<TickerNode, (), ()>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let node = TickerNode {
        seen: seen.clone(),
        stubborn,
    };
    (Service::new(node, (), ()), seen)
}

/// **Proves:** after `timeout(100ms, svc.start())` gives up and the
/// service is dropped, the service still winds down on the runtime: the
/// token fires (`UserRequested`), the ticker spawned in `on_start` stops,
/// `on_stop` and `post_stop` run, the registry is joined and closed, and
/// `wait_for_exit` reports that real outcome.
/// **Catches:** the lifecycle living inside the `start()` future: dropping
/// it left the token uncancelled, the ticker running forever, the stop
/// hooks unrun, the registry open and `wait_for_exit` saying
/// `AlreadyStopped`.
async fn dropped_start_future_winds_down() {
    let (svc, seen) = ticker_service(false);
    let handle = svc.handle();
    let tasks = svc.tasks().clone();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), svc.start()).await;
    assert!(gave_up.is_err(), "start() should still be running");
    drop(svc);
    assert_eq!(
        handle.shutdown_token().reason(),
        Some(ShutdownReason::UserRequested),
        "dropping start() fired the token at once"
    );
    let status = tokio::time::timeout(GENEROUS, handle.wait_for_exit())
        .await
        .expect("the wind-down ended")
        .expect("a graceful wind-down");
    assert!(matches!(
        status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
    ));
    let log = seen.log();
    for step in ["ticker_exit", "run_exit", "on_stop", "post_stop"] {
        assert!(log.contains(&step), "{step} missing from {log:?}");
    }
    let pos = |s| log.iter().position(|e| *e == s).unwrap();
    assert!(pos("ticker_exit") < pos("on_stop"), "joined before on_stop");
    assert!(tasks.is_closed(), "the registry was joined and closed");
    assert!(tasks.is_empty());
    assert!(!handle.is_running());
    assert!(matches!(
        tasks.spawn("late", TaskKind::BackgroundLoop, async { Ok(()) }),
        Err(ServiceError::AlreadyStopped)
    ));
}

/// **Proves:** dropping `start()` while `on_start` runs cuts `on_start`
/// short (it fails, saying why), `run` and `on_stop` do not run, and
/// `post_stop` does: the contract's row for a failed `on_start`, as the
/// Python `Service` does when the task awaiting `start()` is cancelled.
/// **Catches:** a start-up hook left to run on (and `run` started) after
/// the caller gave up on the service.
async fn dropped_start_future_cuts_on_start_short() {
    struct SlowStart(Arc<Seen>);
    #[async_trait]
    impl NodeLifecycle for SlowStart {
        async fn on_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
            self.0.push("on_start");
            self.0.entered_run.send_replace(true);
            std::future::pending().await
        }
        async fn run(&self, _ctx: RunContext) -> anyhow::Result<()> {
            self.0.push("run");
            Ok(())
        }
        async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
            self.0.push("on_stop");
            Ok(())
        }
        async fn post_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
            self.0.push("post_stop");
            Ok(())
        }
    }
    let seen = Arc::new(Seen::default());
    let svc = Service::<_, (), ()>::new(SlowStart(seen.clone()), (), ());
    let handle = svc.handle();
    let mut entered = seen.entered_run.subscribe();
    tokio::select! {
        _ = svc.start() => panic!("on_start never returns"),
        _ = entered.wait_for(|e| *e) => {}
    }
    let err = tokio::time::timeout(GENEROUS, handle.wait_for_exit())
        .await
        .expect("the wind-down ended")
        .expect_err("on_start was cut short");
    assert!(matches!(err, ServiceError::OnStartFailed(..)), "{err:?}");
    assert!(err.to_string().contains("start() was dropped"), "{err}");
    assert_eq!(seen.log(), ["on_start", "post_stop"]);
}

/// **Proves:** when the runtime shuts down under a service still winding
/// down (its `run` ignores the token; the lifecycle task is dropped with
/// the runtime), the token is cancelled, the ticker is stopped, the
/// registry is closed, and `wait_for_exit` says `LifecycleAborted` (the
/// stop hooks could not run: no runtime left). When nothing had fired the
/// token before (the `start()` future leaked instead of dropped), the
/// lifecycle's end fires it with `Fatal`.
/// **Catches:** a service whose runtime is gone left with an uncancelled
/// token, an open registry and waiters told `AlreadyStopped`.
fn runtime_shutdown_cuts_the_lifecycle_short(runtime: impl Fn() -> tokio::runtime::Runtime) {
    let rt = runtime();
    let (svc, seen) = ticker_service(true);
    let handle = svc.handle();
    let tasks = svc.tasks().clone();
    let mut entered = seen.entered_run.subscribe();
    rt.block_on(async {
        tokio::select! {
            _ = svc.start() => unreachable!("run never returns"),
            _ = entered.wait_for(|e| *e) => {}
        }
    });
    // The lifecycle is stuck in `run` (30 s deadline) when the runtime goes.
    drop(rt);
    assert!(handle.shutdown_token().is_cancelled());
    assert!(tasks.is_closed());
    assert!(tasks.is_empty(), "the ticker was stopped with the runtime");
    assert!(!handle.is_running());
    let after = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let res = after.block_on(handle.wait_for_exit());
    assert!(
        matches!(res, Err(ServiceError::LifecycleAborted(why)) if why.contains("runtime shut down")),
        "{res:?}"
    );
    let log = seen.log();
    assert!(!log.contains(&"on_stop"), "{log:?}");

    let rt = runtime();
    let (svc, seen) = ticker_service(true);
    let mut entered = seen.entered_run.subscribe();
    rt.block_on(async {
        let mut start = Box::pin(svc.start());
        tokio::select! {
            _ = &mut start => unreachable!("run never returns"),
            _ = entered.wait_for(|e| *e) => {}
        }
        std::mem::forget(start);
    });
    drop(rt);
    assert!(matches!(
        svc.shutdown_token().reason(),
        Some(ShutdownReason::Fatal(m)) if m.contains("its tokio runtime shut down")
    ));
    assert!(svc.tasks().is_closed() && svc.tasks().is_empty());
}

#[test]
fn runtime_shutdown_cuts_the_lifecycle_short_current_thread() {
    runtime_shutdown_cuts_the_lifecycle_short(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
}

#[test]
fn runtime_shutdown_cuts_the_lifecycle_short_multi_thread() {
    runtime_shutdown_cuts_the_lifecycle_short(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
}

/// **Proves:** `start()` polled outside a tokio runtime returns
/// `NoRuntime` without using up the service, which then starts normally
/// inside one.
/// **Catches:** a panic ("there is no reactor running"), or a service
/// marked started by a call that could not start it.
#[test]
fn start_outside_a_runtime_is_an_error() {
    let (svc, _seen) = ticker_service(false);
    match poll_once(svc.start()) {
        Poll::Ready(Err(ServiceError::NoRuntime(what))) => assert_eq!(what, "Service::start"),
        other => panic!("expected NoRuntime, got {other:?}"),
    }
    assert!(!svc.handle().is_running());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    svc.request_shutdown(ShutdownReason::UserRequested);
    let status = rt.block_on(svc.start()).expect("starts inside a runtime");
    assert!(status.is_graceful());
}

/// **Proves:** `start()` polled where the runtime has already shut down
/// (its handle entered after the runtime was dropped) returns
/// `LifecycleAborted` at once, with the token fired and the registry
/// closed, and `wait_for_exit` agrees.
/// **Catches:** a lifecycle task dropped by tokio before its first poll
/// (so before its own guard existed): nothing recorded an outcome and
/// `start()` waited forever.
#[test]
fn start_on_a_shut_down_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    drop(rt);
    let (svc, seen) = ticker_service(false);
    let res = {
        let _in = handle.enter();
        poll_once(svc.start())
    };
    assert!(
        matches!(res, Poll::Ready(Err(ServiceError::LifecycleAborted(_)))),
        "{res:?}"
    );
    assert!(svc.shutdown_token().is_cancelled());
    assert!(svc.tasks().is_closed());
    assert!(seen.log().is_empty());
    assert!(matches!(
        poll_once(svc.wait_for_exit()),
        Poll::Ready(Err(ServiceError::LifecycleAborted(_)))
    ));
}

on_both!(
    dropped_start_future_winds_down,
    dropped_start_future_cuts_on_start_short
);

// ---------------------------------------------------------------------------
// Item 12: outside a runtime; a runtime without timers.

/// A foreign task that never ends by itself (no runtime needed).
struct Idle;

impl ForeignTask for Idle {
    fn cancel(&self) {}
}

/// **Proves:** `spawn` outside a tokio runtime returns `NoRuntime` and
/// leaves nothing behind (nothing counted, nothing live, the future
/// dropped unpolled).
/// **Catches:** the panic `tokio::spawn` raises there ("there is no
/// reactor running").
#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let polled = Arc::new(AtomicUsize::new(0));
    let p = polled.clone();
    let res = reg.spawn("orphan", TaskKind::BackgroundLoop, async move {
        p.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    assert!(
        matches!(res, Err(ServiceError::NoRuntime("TaskRegistry::spawn"))),
        "{res:?}"
    );
    assert!(res
        .unwrap_err()
        .to_string()
        .contains("outside a tokio runtime"));
    assert_eq!(reg.stats().spawned, 0);
    assert!(reg.is_empty());
    assert_eq!(polled.load(Ordering::SeqCst), 0);
    let crit = reg.spawn_critical("orphan", TaskKind::BackgroundLoop, async { Ok(()) });
    assert!(matches!(crit, Err(ServiceError::NoRuntime(_))));
    assert!(!reg.shutdown().is_cancelled());
}

/// **Proves:** `join_all` that must wait, polled outside a tokio
/// runtime, returns `NoRuntime` and leaves the registry open; with no
/// live task it needs no runtime and closes the registry.
/// **Catches:** the timer's panic outside a runtime.
#[test]
fn join_all_outside_a_runtime_is_an_error() {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let id = reg
        .track_foreign("remote", TaskKind::BackgroundLoop, Arc::new(Idle))
        .unwrap();
    match poll_once(reg.join_all(Duration::from_secs(1))) {
        Poll::Ready(Err(ServiceError::NoRuntime("TaskRegistry::join_all"))) => {}
        other => panic!("expected NoRuntime, got {other:?}"),
    }
    assert!(!reg.is_closed());
    assert!(reg.finish_foreign(id, dig_service::TaskOutcome::Completed));
    assert!(matches!(
        poll_once(reg.join_all(Duration::from_secs(1))),
        Poll::Ready(Ok(()))
    ));
    assert!(reg.is_closed());
}

/// **Proves:** the documented limit: on a runtime built without the time
/// driver, `join_all` with nothing to wait for works, and one that has to
/// wait with a deadline panics with tokio's own message (tokio offers no
/// way to detect this beforehand; `join_all`'s `# Panics` says so).
/// **Catches:** the documentation drifting from the behaviour.
#[test]
fn join_all_on_a_runtime_without_timers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let reg = TaskRegistry::new(ShutdownToken::new());
    let empty = TaskRegistry::new(ShutdownToken::new());
    assert!(rt.block_on(empty.join_all(Duration::from_secs(1))).is_ok());
    reg.track_foreign("remote", TaskKind::BackgroundLoop, Arc::new(Idle))
        .unwrap();
    let panicked = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(reg.join_all(Duration::from_secs(1)))
    }))
    .expect_err("no time driver");
    let msg = panicked
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panicked.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(msg.contains("timers are disabled"), "{msg}");
}

// ---------------------------------------------------------------------------
// Item 14: a future whose `Drop` panics.

/// **Proves:** a task whose future panics in `Drop` after it returned
/// leaves the registry (counted failed, its handle reports the panic), and
/// `join_all` returns at once instead of waiting for a phantom.
/// **Catches:** the entry removed only after the future's drop, so the
/// panic skipped the removal: the task stayed live forever and was named
/// a straggler at every deadline.
async fn panicking_drop_after_return_leaves_no_phantom() {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let h = reg
        .spawn(
            "boom",
            TaskKind::BackgroundLoop,
            ExplodesOnDrop { pending: false },
        )
        .unwrap();
    let res = tokio::time::timeout(GENEROUS, h).await.expect("ended");
    assert!(
        matches!(res, Err(TaskFailure::Panic(ref m)) if m.contains("Drop")),
        "{res:?}"
    );
    assert!(reg.is_empty(), "a phantom live task");
    let stats = reg.stats();
    assert_eq!((stats.failed, stats.completed, stats.live), (1, 0, 0));
    reg.join_all(GENEROUS).await.expect("nothing to wait for");
}

/// **Proves:** an aborted task whose future panics in `Drop` leaves the
/// registry (counted failed: it panicked), by its handle's `abort` and
/// when stopped at a `join_all` deadline.
/// **Catches:** the phantom of the same bug on the abort path (tokio
/// catches the drop's panic, so only the registry noticed nothing).
async fn panicking_drop_on_abort_leaves_no_phantom() {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let h = reg
        .spawn(
            "aborted",
            TaskKind::BackgroundLoop,
            ExplodesOnDrop { pending: true },
        )
        .unwrap();
    tokio::task::yield_now().await;
    h.abort();
    let res = tokio::time::timeout(GENEROUS, h).await.expect("ended");
    assert!(matches!(res, Err(TaskFailure::Panic(_))), "{res:?}");
    assert!(reg.is_empty(), "a phantom live task");

    reg.spawn(
        "stuck",
        TaskKind::BackgroundLoop,
        ExplodesOnDrop { pending: true },
    )
    .unwrap();
    let err = reg
        .join_all(Duration::from_millis(50))
        .await
        .expect_err("a straggler");
    assert!(matches!(
        err,
        ServiceError::ShutdownDeadlineExceeded { pending: 1, .. }
    ));
    until_empty(&reg).await;
    let stats = reg.stats();
    assert_eq!(stats.failed + stats.aborted, 2, "{stats:?}");
    assert_eq!(stats.live, 0);
}

on_both!(
    panicking_drop_after_return_leaves_no_phantom,
    panicking_drop_on_abort_leaves_no_phantom
);

// ---------------------------------------------------------------------------
// Item 16: a blocking straggler, a shut-down runtime, critical tasks.

/// **Proves:** a task that blocks its worker thread past the deadline is
/// named a straggler and, when it later runs to completion, is counted
/// `aborted` (once), not `completed`: the stats agree with the report.
/// **Catches:** the straggler counted as completed (`aborted: 0`) after
/// the deadline error had named it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_straggler_is_counted_once() {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let h = reg
        .spawn("blocker", TaskKind::Maintenance, async move {
            let _ = started_tx.send(());
            // Blocks this worker thread (the scenario under test).
            blocked.recv().unwrap();
            Ok(())
        })
        .unwrap();
    started.await.unwrap();
    let err = reg.join_all(Duration::from_millis(50)).await.unwrap_err();
    let ServiceError::ShutdownDeadlineExceeded { pending_names, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(pending_names, ["blocker"]);
    release.send(()).unwrap();
    let _ = tokio::time::timeout(GENEROUS, h).await.expect("it ended");
    until_empty(&reg).await;
    let stats = reg.stats();
    assert_eq!((stats.aborted, stats.completed), (1, 0), "{stats:?}");
}

/// **Proves:** whatever the interleaving of tasks ending on their own and
/// the deadline, every native task named a straggler is counted aborted
/// and every other one completed: `aborted == pending`, and the counts add
/// up to the tasks spawned.
/// **Catches:** a task ending while the deadline names the stragglers
/// counted under both (named, and completed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_and_stats_agree_around_the_deadline() {
    for round in 0..20u64 {
        let reg = TaskRegistry::new(ShutdownToken::new());
        let n = 200u64;
        for i in 0..n {
            // Ending times spread around the 20 ms deadline.
            let after = Duration::from_micros((i * 200 + round * 37) % 40_000);
            reg.spawn(format!("t{i}"), TaskKind::RpcHandler, async move {
                tokio::time::sleep(after).await;
                Ok(())
            })
            .unwrap();
        }
        let pending = match reg.join_all(Duration::from_millis(20)).await {
            Ok(()) => 0,
            Err(ServiceError::ShutdownDeadlineExceeded { pending, .. }) => pending as u64,
            Err(e) => panic!("{e:?}"),
        };
        until_empty(&reg).await;
        let s = reg.stats();
        assert_eq!(s.aborted, pending, "round {round}: {s:?}");
        assert_eq!(s.completed + s.aborted, n, "round {round}: {s:?}");
    }
}

/// **Proves:** `spawn_on` (and `spawn` from a thread that entered it) a
/// runtime that has shut down returns `RuntimeShutDown`, and nothing is
/// counted or left live.
/// **Catches:** `Ok` for a task that never ran (tokio drops it inline).
fn spawn_on_a_shut_down_runtime(rt: tokio::runtime::Runtime) {
    let handle = rt.handle().clone();
    drop(rt);
    let reg = TaskRegistry::new(ShutdownToken::new());
    let res = reg.spawn_on(&handle, "late", TaskKind::BackgroundLoop, async { Ok(()) });
    assert!(matches!(res, Err(ServiceError::RuntimeShutDown)), "{res:?}");
    let res = {
        let _in = handle.enter();
        reg.spawn("late", TaskKind::BackgroundLoop, async { Ok(()) })
    };
    assert!(matches!(res, Err(ServiceError::RuntimeShutDown)), "{res:?}");
    let s = reg.stats();
    assert_eq!((s.spawned, s.aborted, s.live), (0, 0, 0), "{s:?}");
    assert!(reg.is_empty());
    // The registry itself is fine: a live runtime still takes tasks.
    let live = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    live.block_on(async {
        reg.spawn("ok", TaskKind::BackgroundLoop, async { Ok(()) })
            .unwrap()
            .await
            .unwrap();
    });
    assert_eq!(reg.stats().completed, 1);
}

#[test]
fn spawn_on_a_shut_down_runtime_current_thread() {
    spawn_on_a_shut_down_runtime(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
}

#[test]
fn spawn_on_a_shut_down_runtime_multi_thread() {
    spawn_on_a_shut_down_runtime(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
}

/// Spawn a critical task doing `body` in a fresh registry and wait for it.
async fn critical_outcome<F>(body: F) -> (TaskRegistry, Result<(), TaskFailure>)
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let reg = TaskRegistry::new(ShutdownToken::new());
    let h = reg
        .spawn_critical("vital", TaskKind::BackgroundLoop, body)
        .unwrap();
    let res = tokio::time::timeout(GENEROUS, h).await.expect("ended");
    (reg, res)
}

/// **Proves:** `spawn_critical` has Python's `critical=True` rules: a
/// failure, a panic (any payload) or a return while the token has not
/// fired cancels it with `Fatal` naming the task; the task's end is still
/// reported, logged and counted as usual; a return after the token fired,
/// an abort, and any non-critical failure leave the token alone.
/// **Catches:** no Rust equivalent (a task that panicked gave an exit code
/// of 0, visible only in the log), or different rules from Python's.
async fn critical_tasks_fire_the_token() {
    let (reg, res) = critical_outcome(async { anyhow::bail!("disk gone") }).await;
    assert!(matches!(res, Err(TaskFailure::Error(_))));
    assert_eq!(
        reg.shutdown().reason(),
        Some(ShutdownReason::Fatal(
            "critical task 'vital' failed: disk gone".into()
        ))
    );
    assert_eq!(reg.stats().failed, 1);

    let (reg, res) = critical_outcome(async { std::panic::panic_any(42u32) }).await;
    assert!(matches!(res, Err(TaskFailure::Panic(_))));
    assert_eq!(
        reg.shutdown().reason(),
        Some(ShutdownReason::Fatal(
            "critical task 'vital' panicked: non-string panic payload".into()
        ))
    );
    assert_eq!(reg.stats().failed, 1);

    let (reg, res) = critical_outcome(async { Ok(()) }).await;
    assert!(res.is_ok());
    assert_eq!(
        reg.shutdown().reason(),
        Some(ShutdownReason::Fatal(
            "critical task 'vital' returned while the service was running".into()
        ))
    );
    assert_eq!(reg.stats().completed, 1);

    // After the token fired, a clean return is the expected wind-down.
    let reg = TaskRegistry::new(ShutdownToken::new());
    let token = reg.shutdown().clone();
    let h = reg
        .spawn_critical("vital", TaskKind::BackgroundLoop, async move {
            token.cancelled().await;
            Ok(())
        })
        .unwrap();
    reg.shutdown().cancel(ShutdownReason::UserRequested);
    h.await.unwrap();
    assert_eq!(reg.shutdown().reason(), Some(ShutdownReason::UserRequested));

    // Aborted: not a failure.
    let reg = TaskRegistry::new(ShutdownToken::new());
    let h = reg
        .spawn_critical("vital", TaskKind::BackgroundLoop, std::future::pending())
        .unwrap();
    h.abort();
    assert!(matches!(h.await, Err(TaskFailure::Aborted)));
    assert!(!reg.shutdown().is_cancelled());

    // Not critical: the token is left alone.
    let reg = TaskRegistry::new(ShutdownToken::new());
    let h = reg
        .spawn("plain", TaskKind::BackgroundLoop, async {
            anyhow::bail!("x")
        })
        .unwrap();
    assert!(h.await.is_err());
    assert!(!reg.shutdown().is_cancelled());
}

/// **Proves:** in a service, a critical task that panics while the service
/// runs shuts it down with `Fatal`, so `start()` reports a non-graceful
/// exit (code 1); the stop hooks run as for any shutdown.
/// **Catches:** a service that exits 0 after a vital task died.
async fn critical_task_panic_fails_the_service() {
    struct Node;
    #[async_trait]
    impl NodeLifecycle for Node {
        async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
            ctx.tasks
                .spawn_critical("vital", TaskKind::BackgroundLoop, async {
                    tokio::task::yield_now().await;
                    panic!("vital task exploded")
                })?;
            Ok(())
        }
    }
    let svc = Service::<_, (), ()>::new(Node, (), ());
    let status = tokio::time::timeout(GENEROUS, svc.start())
        .await
        .expect("the service stopped by itself")
        .expect("a requested (fatal) shutdown");
    assert!(matches!(
        &status.reason,
        ExitReason::RequestedShutdown(ShutdownReason::Fatal(m))
            if m == "critical task 'vital' panicked: vital task exploded"
    ));
    assert_eq!(status.exit_code(), 1);
    assert_eq!(svc.tasks().stats().failed, 1);
}

on_both!(
    critical_tasks_fire_the_token,
    critical_task_panic_fails_the_service
);

/// **Proves:** `ServiceConfig`, now `#[non_exhaustive]`, is still built
/// from outside the crate: the builder and field assignment on a default.
/// **Catches:** a config only the crate itself can construct.
#[test]
fn service_config_is_buildable() {
    let c = ServiceConfig::new()
        .with_shutdown_deadline(Duration::from_secs(3))
        .with_hook_timeout(Some(Duration::from_secs(1)));
    assert_eq!(c.shutdown_deadline, Duration::from_secs(3));
    assert_eq!(c.hook_timeout, Some(Duration::from_secs(1)));
    let mut d = ServiceConfig::default();
    d.shutdown_deadline = Duration::from_secs(3);
    d.hook_timeout = Some(Duration::from_secs(1));
    assert_eq!(c, d);
    assert_eq!(ServiceConfig::new(), ServiceConfig::default());
}

// ---------------------------------------------------------------------------
// Item 3 (Rust side): panics of every kind still let the join and the stop
// hooks run.

/// Where [`Panicky`] panics, and how.
#[derive(Clone, Copy, Default)]
struct PanicPlan {
    /// This hook panics with a non-string payload (`panic_any(42u32)`).
    hook: Option<&'static str>,
    /// `on_start` spawns a task that panics with a non-string payload.
    task: bool,
    /// This hook hangs holding a value that panics when dropped (it is
    /// cut off by `hook_timeout`, or by the deadline for `run`).
    drop_in: Option<&'static str>,
    /// `pre_start` panics before it even returns its future (a
    /// hand-written hook).
    eager: bool,
}

struct Panicky {
    plan: PanicPlan,
    seen: Arc<Seen>,
}

impl Panicky {
    async fn hook(&self, name: &'static str) -> anyhow::Result<()> {
        self.seen.push(name);
        if name == "run" {
            self.seen.entered_run.send_replace(true);
        }
        if self.plan.hook == Some(name) {
            std::panic::panic_any(42u32);
        }
        if self.plan.drop_in == Some(name) {
            let _bomb = PanicOnDrop(name);
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[async_trait]
impl NodeLifecycle for Panicky {
    async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        if self.plan.task {
            let seen = self.seen.clone();
            ctx.tasks
                .spawn("bad", TaskKind::BackgroundLoop, async move {
                    seen.push("task");
                    std::panic::panic_any(7u8)
                })?;
        }
        self.hook("on_start").await
    }
    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        self.hook("run").await?;
        ctx.shutdown.cancelled().await;
        Ok(())
    }
    async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.hook("on_stop").await
    }
    async fn post_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.hook("post_stop").await
    }
    fn pre_start<'a, 'b, 'c, 'd>(
        &'a self,
        _ctx: &'b StartContext<'c>,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'd>>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        if self.plan.eager {
            std::panic::panic_any(String::from("pre_start panicked before its future"));
        }
        Box::pin(self.hook("pre_start"))
    }
}

async fn run_panicky(
    plan: PanicPlan,
) -> (
    dig_service::Result<dig_service::ExitStatus>,
    Vec<&'static str>,
) {
    let seen = Arc::new(Seen::default());
    let config = ServiceConfig::new()
        .with_shutdown_deadline(Duration::from_millis(200))
        .with_hook_timeout(Some(Duration::from_millis(200)));
    let svc = Service::<_, (), ()>::with_config(
        Panicky {
            plan,
            seen: seen.clone(),
        },
        (),
        (),
        config,
    );
    let handle = svc.handle();
    let mut entered = seen.entered_run.subscribe();
    let res = tokio::time::timeout(GENEROUS, async {
        tokio::join!(svc.start(), async {
            // Ask for the shutdown once `run` is entered, if it ever is.
            tokio::select! {
                _ = entered.wait_for(|e| *e) => handle.request_shutdown(ShutdownReason::UserRequested),
                _ = handle.wait_for_exit() => {}
            }
        })
        .0
    })
    .await
    .expect("start() returned");
    assert!(
        svc.tasks().is_closed(),
        "the registry was joined and closed"
    );
    (res, seen.log())
}

/// **Proves:** a hook panicking with a non-string payload is that hook's
/// failure, with the message "non-string panic payload", and the join and
/// the stop hooks still run (per the contract table: after `on_start`
/// only `post_stop`).
/// **Catches:** a panic (or an odd payload) escaping the lifecycle.
async fn hook_panics_with_any_payload() {
    for hook in ["pre_start", "on_start", "run", "on_stop", "post_stop"] {
        let (res, log) = run_panicky(PanicPlan {
            hook: Some(hook),
            ..PanicPlan::default()
        })
        .await;
        let err = res.expect_err(hook);
        assert!(
            err.to_string().contains("non-string panic payload"),
            "{hook}: {err}"
        );
        let expected: &[&str] = match hook {
            "pre_start" => &["pre_start"],
            "on_start" => &["pre_start", "on_start", "post_stop"],
            _ => &["pre_start", "on_start", "run", "on_stop", "post_stop"],
        };
        assert_eq!(log, expected, "{hook}");
    }
}

/// **Proves:** a task panicking with a non-string payload, a hook cut off
/// by `hook_timeout` whose future panics while being dropped, `run` cut
/// off at the deadline with the same, and a hand-written hook panicking
/// before it returns its future: in every case the lifecycle goes on, the
/// registry is joined and closed, and the stop hooks run.
/// **Catches:** the panic of a dropped hook future unwinding out of
/// `start()` (skipping the join and the stop hooks), and a panic in
/// making a hook's future escaping.
async fn panics_in_drops_and_tasks_keep_the_lifecycle() {
    let (res, log) = run_panicky(PanicPlan {
        task: true,
        ..PanicPlan::default()
    })
    .await;
    assert!(res
        .expect("a task's panic is not the service's")
        .is_graceful());
    assert!(
        log.contains(&"task") && log.ends_with(&["on_stop", "post_stop"]),
        "{log:?}"
    );

    let (res, log) = run_panicky(PanicPlan {
        drop_in: Some("on_start"),
        ..PanicPlan::default()
    })
    .await;
    let err = res.expect_err("on_start timed out");
    assert!(matches!(err, ServiceError::OnStartFailed(..)), "{err:?}");
    assert_eq!(log, ["pre_start", "on_start", "post_stop"]);

    let (res, log) = run_panicky(PanicPlan {
        drop_in: Some("on_stop"),
        ..PanicPlan::default()
    })
    .await;
    assert!(
        matches!(res, Err(ServiceError::OnStopFailed(..))),
        "{res:?}"
    );
    assert_eq!(
        log,
        ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    );

    let (res, log) = run_panicky(PanicPlan {
        drop_in: Some("run"),
        ..PanicPlan::default()
    })
    .await;
    assert!(
        matches!(&res, Err(ServiceError::ShutdownDeadlineExceeded { pending_names, .. })
            if pending_names[0] == "run"),
        "{res:?}"
    );
    assert_eq!(
        log,
        ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    );

    let (res, log) = run_panicky(PanicPlan {
        eager: true,
        ..PanicPlan::default()
    })
    .await;
    let err = res.expect_err("pre_start panicked");
    assert!(matches!(err, ServiceError::PreStartFailed(..)), "{err:?}");
    assert!(err.to_string().contains("before its future"), "{err}");
    assert!(log.is_empty(), "{log:?}");
}

on_both!(
    hook_panics_with_any_payload,
    panics_in_drops_and_tasks_keep_the_lifecycle
);
