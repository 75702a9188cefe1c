//! [`Service`]: the ordered lifecycle of a node, its tasks and its APIs.
//!
//! # Guarantees of [`Service::start`]
//!
//! - **Order.** `pre_start → on_start → run → cancel token →
//!   join_all(shutdown_deadline) → on_stop → post_stop`.
//! - **Cleanup always runs.** A failed or panicking `run` still gets its
//!   tasks joined and `on_stop` + `post_stop` called; a failed `on_stop`
//!   still gets `post_stop`; a failed `on_start` gets `post_stop`.
//! - **Bounded shutdown.** Once the token has fired, no stage (an edge
//!   hook, `run`, the task join) blocks longer than
//!   [`ServiceConfig::shutdown_deadline`]; [`ServiceConfig::hook_timeout`]
//!   additionally bounds each edge hook from the moment it starts.
//! - **Panics are failures, not crashes.** A panic inside any hook is
//!   caught and reported as that hook's failure, with the panic message
//!   (`"non-string panic payload"` for a payload that is not a string).
//!   The join and the stop hooks still run, as after any failure. A panic
//!   while a hook's future is being dropped (one cut off by `hook_timeout`
//!   or the deadline) is caught and logged; the lifecycle goes on. A
//!   task's panic is the task's failure: logged, counted, joined like any
//!   ending (and, for a [critical](crate::TaskRegistry::spawn_critical)
//!   task, a `Fatal` shutdown). Rust has no counterpart of Python's
//!   `BaseException`: a panic is the one way out of a hook that is not a
//!   return, and it is handled as above, never propagated.
//! - **The lifecycle outlives `start()`'s future.** The lifecycle runs as a
//!   task of its own on the runtime `start()` is called on; `start()` only
//!   awaits it. Dropping the `start()` future (a `select!`, a `timeout`)
//!   fires the token with [`ShutdownReason::UserRequested`] (an earlier
//!   reason wins), cuts a running `pre_start`/`on_start` short (it counts as
//!   failed; no later start-up hook starts) and lets the wind-down run on:
//!   join, `on_stop`, `post_stop`, bounded by the deadline as for any
//!   shutdown. [`Service::wait_for_exit`] and every [`ServiceHandle`] then
//!   report the real outcome. The service itself may be dropped meanwhile.
//! - **A runtime that shuts down.** If the runtime drops the lifecycle task
//!   before it finished (the runtime is shutting down), the token is
//!   cancelled with `Fatal` (unless it had fired already), every task is
//!   stopped and the registry closed;
//!   `on_stop` and `post_stop` cannot run (no runtime is left to run them
//!   on), and the outcome is [`ServiceError::LifecycleAborted`].
//! - **Nothing silently lost.** Exactly one error is returned (priority
//!   run > on_stop > post_stop > join); every other failure is logged
//!   (target `dig_service::service`). A hook's own `anyhow::Error` is kept
//!   intact as the [`source`](std::error::Error::source) of the returned
//!   [`ServiceError`].
//! - **Single-shot.** A second `start()` returns
//!   [`ServiceError::AlreadyRunning`]; the result of the first is recorded
//!   for [`Service::wait_for_exit`] and every [`ServiceHandle`].

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
use crate::error::{HookTimeout, Result, ServiceError};
use crate::exit::{ExitReason, ExitStatus};
use crate::handle::{ServiceHandle, Shared};
use crate::shutdown::{ShutdownReason, ShutdownToken};
use crate::tasks::{panic_message, TaskRegistry};
use crate::traits::{NodeLifecycle, PeerApi, RpcApi, RunContext, StartContext, StopContext};

const LOG: &str = "dig_service::service";

/// A service: a node `N`, a peer API `A` and an RPC API `R`, with a shared
/// [`ShutdownToken`] and [`TaskRegistry`].
///
/// Use `()` for `A` or `R` when the service has no peer or RPC surface.
/// Build with [`Service::new`], then drive it with [`Service::start`].
///
/// ```
/// use async_trait::async_trait;
/// use dig_service::{
///     ExitReason, NodeLifecycle, RunContext, Service, ShutdownReason, StartContext, TaskKind,
/// };
///
/// struct Node;
///
/// #[async_trait]
/// impl NodeLifecycle for Node {
///     const NAME: Option<&'static str> = Some("example");
///
///     async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
///         let shutdown = ctx.shutdown.clone();
///         ctx.tasks.spawn("heartbeat", TaskKind::BackgroundLoop, async move {
///             shutdown.cancelled().await; // wind down when asked
///             Ok(())
///         })?;
///         Ok(())
///     }
///     // `run` defaults to waiting for the shutdown token.
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = Service::new(Node, (), ());
/// let handle = svc.handle(); // give this to a signal handler
/// handle.request_shutdown(ShutdownReason::UserRequested);
/// let status = svc.start().await.unwrap();
/// assert!(matches!(
///     status.reason,
///     ExitReason::RequestedShutdown(ShutdownReason::UserRequested)
/// ));
/// assert_eq!(status.exit_code(), 0);
/// # }
/// ```
pub struct Service<N, A, R>
where
    N: NodeLifecycle,
    A: PeerApi,
    R: RpcApi,
{
    node: Arc<N>,
    peer_api: Arc<A>,
    rpc_api: Arc<R>,
    config: ServiceConfig,
    shutdown: ShutdownToken,
    tasks: TaskRegistry,
    shared: Arc<Shared>,
}

/// What became of `run`.
enum RunOutcome {
    /// It returned (an `Err` also stands for a panic).
    Returned(anyhow::Result<()>),
    /// The token fired and `run` did not return within the deadline; it
    /// was dropped.
    Overran,
}

impl<N, A, R> Service<N, A, R>
where
    N: NodeLifecycle,
    A: PeerApi,
    R: RpcApi,
{
    /// A service with the default [`ServiceConfig`]. Nothing runs until
    /// [`start`](Self::start).
    pub fn new(node: N, peer_api: A, rpc_api: R) -> Self {
        Self::with_config(node, peer_api, rpc_api, ServiceConfig::default())
    }

    /// A service with an explicit [`ServiceConfig`].
    pub fn with_config(node: N, peer_api: A, rpc_api: R, config: ServiceConfig) -> Self {
        let shutdown = ShutdownToken::new();
        let tasks = TaskRegistry::new(shutdown.clone());
        Self {
            node: Arc::new(node),
            peer_api: Arc::new(peer_api),
            rpc_api: Arc::new(rpc_api),
            config,
            shutdown,
            tasks,
            shared: Arc::new(Shared::new(N::NAME.unwrap_or(""))),
        }
    }

    /// A cheap-clone handle for signal handlers, admin RPC and tests. It
    /// stays valid (its calls become harmless) after the service is gone.
    pub fn handle(&self) -> ServiceHandle {
        ServiceHandle::new(
            self.shutdown.clone(),
            self.tasks.clone(),
            self.shared.clone(),
        )
    }

    /// The node.
    pub fn node(&self) -> &Arc<N> {
        &self.node
    }

    /// The peer API.
    pub fn peer_api(&self) -> &Arc<A> {
        &self.peer_api
    }

    /// The RPC API.
    pub fn rpc_api(&self) -> &Arc<R> {
        &self.rpc_api
    }

    /// The configuration the service was built with.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The service's shutdown token.
    pub fn shutdown_token(&self) -> &ShutdownToken {
        &self.shutdown
    }

    /// The service's task registry.
    pub fn tasks(&self) -> &TaskRegistry {
        &self.tasks
    }

    /// Ask the service to shut down. Idempotent: the first reason wins.
    pub fn request_shutdown(&self, reason: ShutdownReason) {
        self.shutdown.cancel(reason);
    }

    /// Wait until the lifecycle [`start`](Self::start) began has ended and
    /// return (a clone of) its result, even if the `start()` future was
    /// dropped; see [`ServiceHandle::wait_for_exit`].
    pub async fn wait_for_exit(&self) -> Result<ExitStatus> {
        self.shared.wait_for_exit().await
    }

    /// Run the whole lifecycle and return how it ended.
    ///
    /// Must be called inside a tokio runtime, which must have the time
    /// driver enabled (the hooks' timeouts and the deadline are tokio
    /// timers). The lifecycle runs as a task of its own on that runtime;
    /// the returned future (which is `Send`) only awaits it, so dropping
    /// it does not abandon the service (see the last rows below).
    ///
    /// | situation | result |
    /// |---|---|
    /// | all hooks succeed, token fired from outside | `Ok(ExitStatus { reason: RequestedShutdown(that reason) })` |
    /// | all hooks succeed, `run` returned by itself | `Ok(ExitStatus { reason: RunCompleted })`; the token is cancelled with [`ShutdownReason::RequestedByRun`] so tasks wind down |
    /// | `pre_start` fails | [`ServiceError::PreStartFailed`]; no later hook runs (tasks it spawned are still stopped: token cancelled with `Fatal`, then joined) |
    /// | `on_start` fails | [`ServiceError::OnStartFailed`]; token cancelled with `Fatal`, tasks joined, then `post_stop` (its `exit_reason` is `RunError` carrying the `on_start` error); `run` / `on_stop` do not run |
    /// | `run` fails or panics | [`ServiceError::RunFailed`]; token cancelled with `Fatal`, tasks joined, `on_stop` and `post_stop` still run |
    /// | `on_stop` or `post_stop` fails | [`ServiceError::OnStopFailed`]; the later hook still runs |
    /// | any hook panics (any payload; also while its future is dropped) | as that hook failing (above); a panic in a dropped hook's `Drop` is logged; the join and the stop hooks run |
    /// | a tracked task fails or panics | logged and counted; the lifecycle goes on (a [critical](TaskRegistry::spawn_critical) task cancels the token with `Fatal`) |
    /// | tracked tasks outlive `shutdown_deadline` in `join_all` | they are aborted (native) / cancelled (foreign); [`ServiceError::ShutdownDeadlineExceeded`] |
    /// | `run` outlives `shutdown_deadline` after the token fired | `run` is dropped and every still-live task is stopped at once; `ShutdownDeadlineExceeded` with `"run"` first in `pending_names` |
    /// | an edge hook outlives `hook_timeout` (or, once the token has fired, `shutdown_deadline`) | that hook's failure, with a [`HookTimeout`] source |
    /// | `start` called a second time | [`ServiceError::AlreadyRunning`] |
    /// | `start` polled outside a tokio runtime | [`ServiceError::NoRuntime`]; the service is not started (a later `start` may) |
    /// | the `start()` future is dropped before it finished | token fired (`UserRequested`; an earlier reason wins), a running `pre_start`/`on_start` cut short (its failure), then the wind-down as above (join, `on_stop`, `post_stop`, bounded by the deadline) runs on the runtime; `wait_for_exit` returns the outcome |
    /// | the runtime shuts down before the lifecycle finished | token cancelled with `Fatal` (unless it had fired), tasks stopped, registry closed; `on_stop`/`post_stop` cannot run (no runtime left); [`ServiceError::LifecycleAborted`] for `wait_for_exit` |
    ///
    /// When several stages fail, the error returned is the first of run >
    /// on_stop > post_stop > join; the others are logged.
    pub async fn start(&self) -> Result<ExitStatus> {
        let Ok(rt) = Handle::try_current() else {
            return Err(ServiceError::NoRuntime("Service::start"));
        };
        if !self.shared.begin() {
            return Err(ServiceError::AlreadyRunning);
        }
        let lifecycle = Lifecycle {
            node: self.node.clone(),
            config: self.config.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
            shared: self.shared.clone(),
            abandoned: CancellationToken::new(),
        };
        let mut on_drop = WindDownOnDrop {
            shutdown: &self.shutdown,
            abandoned: lifecycle.abandoned.clone(),
            name: self.shared.name,
            armed: true,
        };
        let joined = rt.spawn(lifecycle.drive()).await;
        on_drop.armed = false;
        match joined {
            Ok(result) => result,
            // Cancelled (the runtime is shutting down) or panicked: the
            // lifecycle's own guard recorded what happened, unless the task
            // was dropped before its first poll (a runtime shut down already
            // drops it inside `spawn`); then record it here.
            Err(e) => {
                let why = if e.is_panic() {
                    tracing::error!(
                        target: LOG,
                        service = self.shared.name,
                        panic = %panic_message(&*e.into_panic()),
                        "the lifecycle task panicked"
                    );
                    PANICKED
                } else {
                    RUNTIME_GONE
                };
                cut_short(&self.shutdown, &self.tasks, &self.shared, why);
                self.shared.wait_for_exit().await
            }
        }
    }
}

/// What `start()` spawns: everything the lifecycle needs, owned, so that it
/// runs to its end whatever becomes of the `start()` future.
struct Lifecycle<N> {
    node: Arc<N>,
    config: ServiceConfig,
    shutdown: ShutdownToken,
    tasks: TaskRegistry,
    shared: Arc<Shared>,
    /// Cancelled when the `start()` future is dropped: a running
    /// `pre_start`/`on_start` is cut short, and no later one starts.
    abandoned: CancellationToken,
}

impl<N: NodeLifecycle> Lifecycle<N> {
    /// The lifecycle task: run it, record its result for the waiters, and
    /// hand it to `start()`.
    async fn drive(self) -> Result<ExitStatus> {
        let mut cut_short = CutShort {
            lifecycle: &self,
            armed: true,
        };
        let name = self.shared.name;
        tracing::info!(target: LOG, service = name, "service starting");
        let result = self.lifecycle().await;
        match &result {
            Ok(status) => tracing::info!(target: LOG, service = name, %status, "service stopped"),
            Err(e) => tracing::error!(target: LOG, service = name, error = %e, "service failed"),
        }
        self.shared.finish(result.clone());
        cut_short.armed = false;
        result
    }

    async fn lifecycle(&self) -> Result<ExitStatus> {
        let node = &*self.node;
        let start_ctx = StartContext {
            name: self.shared.name,
            shutdown: self.shutdown.clone(),
            tasks: &self.tasks,
        };

        if let Err(e) = self
            .edge_hook("pre_start", true, || node.pre_start(&start_ctx))
            .await
        {
            self.wind_down_failed_start("pre_start", &e).await;
            return Err(ServiceError::PreStartFailed(e));
        }

        if let Err(e) = self
            .edge_hook("on_start", true, || node.on_start(&start_ctx))
            .await
        {
            self.wind_down_failed_start("on_start", &e).await;
            let stop_ctx = StopContext {
                shutdown: self.shutdown.clone(),
                tasks: &self.tasks,
                exit_reason: ExitReason::RunError(e.clone()),
            };
            if let Err(post) = self
                .edge_hook("post_stop", false, || node.post_stop(&stop_ctx))
                .await
            {
                log_suppressed(&ServiceError::OnStopFailed(post));
            }
            return Err(ServiceError::OnStartFailed(e));
        }

        let run_ctx = RunContext {
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        };
        let outcome = self.drive_run(|| node.run(run_ctx)).await;

        let deadline = self.config.shutdown_deadline;
        let (exit_reason, run_error, join_deadline) = match outcome {
            RunOutcome::Returned(Ok(())) => {
                // `run` returned: wind the tasks down. Another thread may
                // fire the token at the same moment; the reason that won is
                // the one reported (first reason wins, so re-read it).
                self.shutdown.cancel(ShutdownReason::RequestedByRun);
                let reason = match self.shutdown.reason() {
                    Some(ShutdownReason::RequestedByRun) | None => ExitReason::RunCompleted,
                    Some(reason) => ExitReason::RequestedShutdown(reason),
                };
                (reason, None, deadline)
            }
            RunOutcome::Returned(Err(e)) => {
                let e = Arc::new(e);
                self.shutdown
                    .cancel(ShutdownReason::Fatal(format!("run failed: {e:#}")));
                let err = ServiceError::RunFailed(e.clone());
                (ExitReason::RunError(e), Some(err), deadline)
            }
            RunOutcome::Overran => {
                tracing::warn!(
                    target: LOG,
                    service = self.shared.name,
                    ?deadline,
                    "run did not return within the shutdown deadline; dropped it"
                );
                let reason = self
                    .shutdown
                    .reason()
                    .unwrap_or(ShutdownReason::RequestedByRun);
                let err = ServiceError::ShutdownDeadlineExceeded {
                    deadline,
                    pending: 1,
                    pending_names: vec!["run".to_owned()],
                };
                // The deadline since the token fired is spent: every task
                // still live is a straggler too.
                (
                    ExitReason::RequestedShutdown(reason),
                    Some(err),
                    Duration::ZERO,
                )
            }
        };

        let joined = self.tasks.join_all(join_deadline).await;
        let (run_error, join_error) = match (run_error, joined) {
            (
                Some(ServiceError::ShutdownDeadlineExceeded {
                    pending,
                    mut pending_names,
                    ..
                }),
                Err(ServiceError::ShutdownDeadlineExceeded {
                    pending: more,
                    pending_names: more_names,
                    ..
                }),
            ) => {
                pending_names.extend(more_names);
                let merged = ServiceError::ShutdownDeadlineExceeded {
                    deadline,
                    pending: pending + more,
                    pending_names,
                };
                (Some(merged), None)
            }
            (run_error, joined) => (run_error, joined.err()),
        };

        let stop_ctx = StopContext {
            shutdown: self.shutdown.clone(),
            tasks: &self.tasks,
            exit_reason: exit_reason.clone(),
        };
        let on_stop = self
            .edge_hook("on_stop", false, || node.on_stop(&stop_ctx))
            .await;
        let post_stop = self
            .edge_hook("post_stop", false, || node.post_stop(&stop_ctx))
            .await;

        let mut errors = run_error
            .into_iter()
            .chain(on_stop.err().map(ServiceError::OnStopFailed))
            .chain(post_stop.err().map(ServiceError::OnStopFailed))
            .chain(join_error);
        match errors.next() {
            None => Ok(ExitStatus {
                reason: exit_reason,
            }),
            Some(first) => {
                errors.for_each(|e| log_suppressed(&e));
                Err(first)
            }
        }
    }

    /// Run `run` until it returns, or until `shutdown_deadline` after the
    /// token fired.
    async fn drive_run<'a, F>(&self, make: impl FnOnce() -> F + 'a) -> RunOutcome
    where
        F: Future<Output = anyhow::Result<()>> + Unpin + 'a,
    {
        let run = match CatchUnwind::call("run", make) {
            Ok(run) => run,
            Err(e) => return RunOutcome::Returned(Err(e)),
        };
        let overrun = async {
            self.shutdown.cancelled().await;
            tokio::time::sleep(self.config.shutdown_deadline).await;
        };
        tokio::select! {
            biased;
            res = run => RunOutcome::Returned(res),
            () = overrun => RunOutcome::Overran,
        }
    }

    /// Run an edge hook under the hook timeout and (once the token has
    /// fired) the shutdown deadline, catching panics. A start-up hook
    /// (`startup`) is also cut short when the `start()` future is dropped,
    /// and is not started at all once it has been.
    async fn edge_hook<'a, F>(
        &self,
        hook: &'static str,
        startup: bool,
        make: impl FnOnce() -> F + 'a,
    ) -> std::result::Result<(), Arc<anyhow::Error>>
    where
        F: Future<Output = anyhow::Result<()>> + Unpin + 'a,
    {
        if startup && self.abandoned.is_cancelled() {
            return Err(Arc::new(anyhow::anyhow!(
                "`{hook}` was not started: the future driving start() was dropped"
            )));
        }
        let fut = match CatchUnwind::call(hook, make) {
            Ok(fut) => fut,
            Err(e) => return Err(Arc::new(e)),
        };
        let by_hook_timeout = async {
            match self.config.hook_timeout {
                Some(after) => {
                    tokio::time::sleep(after).await;
                    after
                }
                None => std::future::pending().await,
            }
        };
        let by_deadline = async {
            self.shutdown.cancelled().await;
            tokio::time::sleep(self.config.shutdown_deadline).await;
            self.config.shutdown_deadline
        };
        let by_abandon = async {
            if startup {
                self.abandoned.cancelled().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let res = tokio::select! {
            biased;
            res = fut => res,
            after = by_hook_timeout => Err(anyhow::Error::new(HookTimeout { hook, after })),
            after = by_deadline => Err(anyhow::Error::new(HookTimeout { hook, after })),
            () = by_abandon => Err(anyhow::anyhow!(
                "`{hook}` was cancelled: the future driving start() was dropped"
            )),
        };
        if let Err(e) = &res {
            tracing::debug!(target: LOG, service = self.shared.name, hook, error = ?e, "hook failed");
        }
        res.map_err(Arc::new)
    }

    /// After a failed `pre_start` / `on_start`: stop whatever tasks were
    /// spawned so far, under the deadline.
    async fn wind_down_failed_start(&self, hook: &str, e: &anyhow::Error) {
        self.shutdown
            .cancel(ShutdownReason::Fatal(format!("{hook} failed: {e:#}")));
        if let Err(join) = self.tasks.join_all(self.config.shutdown_deadline).await {
            log_suppressed(&join);
        }
    }
}

/// Armed while `start()` awaits the lifecycle task: if the `start()` future
/// is dropped first, the service is told to shut down (the lifecycle task
/// winds it down on its own).
struct WindDownOnDrop<'a> {
    shutdown: &'a ShutdownToken,
    abandoned: CancellationToken,
    name: &'static str,
    armed: bool,
}

impl Drop for WindDownOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::info!(
            target: LOG,
            service = self.name,
            "the future driving start() was dropped; shutting the service down"
        );
        self.shutdown.cancel(ShutdownReason::UserRequested);
        self.abandoned.cancel();
    }
}

/// Armed while the lifecycle task runs: if the runtime drops the task
/// before it finished (it is shutting down), or the task panics, do what
/// can still be done without a runtime: fire the token, stop every task,
/// close the registry, and record the outcome for the waiters.
struct CutShort<'a, N> {
    lifecycle: &'a Lifecycle<N>,
    armed: bool,
}

impl<N> Drop for CutShort<'_, N> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let why = if std::thread::panicking() {
            PANICKED
        } else {
            RUNTIME_GONE
        };
        let lc = self.lifecycle;
        cut_short(&lc.shutdown, &lc.tasks, &lc.shared, why);
    }
}

const PANICKED: &str = "the lifecycle task panicked";
const RUNTIME_GONE: &str = "its tokio runtime shut down";

/// What can be done for a lifecycle that cannot finish, without a runtime:
/// fire the token, stop every task, close the registry, record the
/// outcome. A no-op once the lifecycle has recorded its result.
fn cut_short(shutdown: &ShutdownToken, tasks: &TaskRegistry, shared: &Shared, why: &'static str) {
    if !shared.is_running() {
        return;
    }
    shutdown.cancel(ShutdownReason::Fatal(format!(
        "the service's lifecycle was cut short: {why}"
    )));
    let stopped = tasks.close_and_stop_all();
    tracing::error!(
        target: LOG,
        service = shared.name,
        reason = why,
        stopped = stopped.names.len(),
        "service lifecycle cut short; tasks stopped, on_stop and post_stop not run"
    );
    shared.finish(Err(ServiceError::LifecycleAborted(why)));
}

impl<N, A, R> Drop for Service<N, A, R>
where
    N: NodeLifecycle,
    A: PeerApi,
    R: RpcApi,
{
    fn drop(&mut self) {
        // Dropped before `start()` ran: no result will ever come; release
        // the `wait_for_exit` callers. A started service's lifecycle task
        // records its own result, however it ends.
        self.shared.abandon_unstarted();
    }
}

impl<N, A, R> fmt::Debug for Service<N, A, R>
where
    N: NodeLifecycle,
    A: PeerApi,
    R: RpcApi,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.shared.name)
            .field("config", &self.config)
            .field("phase", &*self.shared.phase.borrow())
            .field("shutdown", &self.shutdown)
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

fn log_suppressed(e: &ServiceError) {
    tracing::error!(
        target: LOG,
        error = %e,
        "error not returned by start() (a higher-priority error was)"
    );
}

/// Turns a panic while making, polling or dropping a hook's future into
/// that hook's failure (or, for the drop, a log line): a hook never takes
/// the lifecycle down with it.
struct CatchUnwind<F> {
    hook: &'static str,
    // `None` once dropped by `Drop`.
    fut: Option<F>,
}

impl<F> CatchUnwind<F> {
    /// Make the hook's future with `make` (which may panic: a hand-written
    /// hook can, before it returns its future).
    fn call(hook: &'static str, make: impl FnOnce() -> F) -> anyhow::Result<Self> {
        match std::panic::catch_unwind(AssertUnwindSafe(make)) {
            Ok(fut) => Ok(Self {
                hook,
                fut: Some(fut),
            }),
            Err(payload) => Err(panicked(hook, &*payload)),
        }
    }
}

fn panicked(hook: &'static str, payload: &(dyn std::any::Any + Send)) -> anyhow::Error {
    let msg = panic_message(payload);
    tracing::error!(target: LOG, hook, panic = %msg, "hook panicked");
    anyhow::anyhow!("`{hook}` panicked: {msg}")
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = anyhow::Result<()>> + Unpin,
{
    type Output = anyhow::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let hook = this.hook;
        let fut = this.fut.as_mut().expect("a hook polled after it ended");
        // The future is never polled again after a panic (the caller drops
        // it), so observing it in a broken state is impossible.
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(fut).poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(panicked(hook, &*payload))),
        }
    }
}

impl<F> Drop for CatchUnwind<F> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(fut))) {
            tracing::error!(
                target: LOG,
                hook = self.hook,
                panic = %panic_message(&*payload),
                "hook panicked while its future was being dropped"
            );
        }
    }
}
