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
//!   caught and reported as that hook's failure, with the panic message.
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

use crate::error::{HookTimeout, Result, ServiceError};
use crate::exit::{ExitReason, ExitStatus};
use crate::handle::{ServiceHandle, Shared};
use crate::shutdown::{ShutdownReason, ShutdownToken};
use crate::tasks::{panic_message, TaskRegistry};
use crate::traits::{NodeLifecycle, PeerApi, RpcApi, RunContext, StartContext, StopContext};

const LOG: &str = "dig_service::service";

/// Timing knobs of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// How long, once the shutdown token has fired, each shutdown stage may
    /// take: `run` returning, the tracked tasks finishing (`join_all`), and
    /// each of `on_stop` / `post_stop`. Stragglers are aborted (tasks),
    /// dropped (`run`) or reported as timed out (hooks). Default: 30 s.
    pub shutdown_deadline: Duration,
    /// How long each edge hook (`pre_start`, `on_start`, `on_stop`,
    /// `post_stop`) may take, from the moment it starts. `run` is not
    /// bounded by it. A hook that overruns is dropped and reported as that
    /// hook's failure, with a [`HookTimeout`] source. Default: `None` (only
    /// the shutdown deadline applies).
    pub hook_timeout: Option<Duration>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            shutdown_deadline: Duration::from_secs(30),
            hook_timeout: None,
        }
    }
}

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

    /// Wait until [`start`](Self::start) has returned and return (a clone
    /// of) its result; see [`ServiceHandle::wait_for_exit`].
    pub async fn wait_for_exit(&self) -> Result<ExitStatus> {
        self.shared.wait_for_exit().await
    }

    /// Run the whole lifecycle and return how it ended.
    ///
    /// Must be called inside a tokio runtime with the time driver enabled.
    /// The returned future is `Send`; spawn it (with the service in an
    /// `Arc`) to keep the service reachable while it runs.
    ///
    /// | situation | result |
    /// |---|---|
    /// | all hooks succeed, token fired from outside | `Ok(ExitStatus { reason: RequestedShutdown(that reason) })` |
    /// | all hooks succeed, `run` returned by itself | `Ok(ExitStatus { reason: RunCompleted })`; the token is cancelled with [`ShutdownReason::RequestedByRun`] so tasks wind down |
    /// | `pre_start` fails | [`ServiceError::PreStartFailed`]; no later hook runs (tasks it spawned are still stopped: token cancelled with `Fatal`, then joined) |
    /// | `on_start` fails | [`ServiceError::OnStartFailed`]; token cancelled with `Fatal`, tasks joined, then `post_stop` (its `exit_reason` is `RunError` carrying the `on_start` error); `run` / `on_stop` do not run |
    /// | `run` fails or panics | [`ServiceError::RunFailed`]; token cancelled with `Fatal`, tasks joined, `on_stop` and `post_stop` still run |
    /// | `on_stop` or `post_stop` fails | [`ServiceError::OnStopFailed`]; the later hook still runs |
    /// | tracked tasks outlive `shutdown_deadline` in `join_all` | they are aborted (native) / cancelled (foreign); [`ServiceError::ShutdownDeadlineExceeded`] |
    /// | `run` outlives `shutdown_deadline` after the token fired | `run` is dropped and every still-live task is stopped at once; `ShutdownDeadlineExceeded` with `"run"` first in `pending_names` |
    /// | an edge hook outlives `hook_timeout` (or, once the token has fired, `shutdown_deadline`) | that hook's failure, with a [`HookTimeout`] source |
    /// | `start` called a second time | [`ServiceError::AlreadyRunning`] |
    ///
    /// When several stages fail, the error returned is the first of run >
    /// on_stop > post_stop > join; the others are logged.
    pub async fn start(&self) -> Result<ExitStatus> {
        if !self.shared.begin() {
            return Err(ServiceError::AlreadyRunning);
        }
        // If this future is dropped midway, release the waiters.
        let guard = AbandonOnDrop(&self.shared);
        tracing::info!(target: LOG, service = self.shared.name, "service starting");
        let result = self.lifecycle().await;
        match &result {
            Ok(status) => {
                tracing::info!(target: LOG, service = self.shared.name, %status, "service stopped")
            }
            Err(e) => {
                tracing::error!(target: LOG, service = self.shared.name, error = %e, "service failed")
            }
        }
        self.shared.finish(result.clone());
        drop(guard);
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
            .edge_hook("pre_start", node.pre_start(&start_ctx))
            .await
        {
            self.wind_down_failed_start("pre_start", &e).await;
            return Err(ServiceError::PreStartFailed(e));
        }

        if let Err(e) = self.edge_hook("on_start", node.on_start(&start_ctx)).await {
            self.wind_down_failed_start("on_start", &e).await;
            let stop_ctx = StopContext {
                shutdown: self.shutdown.clone(),
                tasks: &self.tasks,
                exit_reason: ExitReason::RunError(e.clone()),
            };
            if let Err(post) = self.edge_hook("post_stop", node.post_stop(&stop_ctx)).await {
                log_suppressed(&ServiceError::OnStopFailed(post));
            }
            return Err(ServiceError::OnStartFailed(e));
        }

        let run_ctx = RunContext {
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        };
        let outcome = self.drive_run(node.run(run_ctx)).await;

        let deadline = self.config.shutdown_deadline;
        let (exit_reason, run_error, join_deadline) = match outcome {
            RunOutcome::Returned(Ok(())) => {
                let reason = match self.shutdown.reason() {
                    Some(reason) => ExitReason::RequestedShutdown(reason),
                    None => {
                        self.shutdown.cancel(ShutdownReason::RequestedByRun);
                        ExitReason::RunCompleted
                    }
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
        let on_stop = self.edge_hook("on_stop", node.on_stop(&stop_ctx)).await;
        let post_stop = self.edge_hook("post_stop", node.post_stop(&stop_ctx)).await;

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
    async fn drive_run<F>(&self, run: F) -> RunOutcome
    where
        F: Future<Output = anyhow::Result<()>> + Unpin,
    {
        let run = CatchUnwind {
            hook: "run",
            fut: run,
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
    /// fired) the shutdown deadline, catching panics.
    async fn edge_hook<F>(
        &self,
        hook: &'static str,
        fut: F,
    ) -> std::result::Result<(), Arc<anyhow::Error>>
    where
        F: Future<Output = anyhow::Result<()>> + Unpin,
    {
        let fut = CatchUnwind { hook, fut };
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
        let res = tokio::select! {
            biased;
            res = fut => res,
            after = by_hook_timeout => Err(anyhow::Error::new(HookTimeout { hook, after })),
            after = by_deadline => Err(anyhow::Error::new(HookTimeout { hook, after })),
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

impl<N, A, R> Drop for Service<N, A, R>
where
    N: NodeLifecycle,
    A: PeerApi,
    R: RpcApi,
{
    fn drop(&mut self) {
        // Dropped before `start()` ran (or with its future leaked): no
        // result will ever come; release `wait_for_exit` callers.
        self.shared.abandon();
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

struct AbandonOnDrop<'a>(&'a Shared);

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        // A no-op once `start()` recorded its result.
        self.0.abandon();
    }
}

/// Turns a panic while polling `fut` into an error naming the hook.
struct CatchUnwind<F> {
    hook: &'static str,
    fut: F,
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = anyhow::Result<()>> + Unpin,
{
    type Output = anyhow::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // The future is never polled again after a panic (the caller drops
        // it), so observing it in a broken state is impossible.
        let polled =
            std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.fut).poll(cx)));
        match polled {
            Ok(poll) => poll,
            Err(payload) => {
                let msg = panic_message(&*payload);
                tracing::error!(target: LOG, hook = this.hook, panic = %msg, "hook panicked");
                Poll::Ready(Err(anyhow::anyhow!("`{}` panicked: {msg}", this.hook)))
            }
        }
    }
}
