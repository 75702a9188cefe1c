//! [`Service`]: the ordered lifecycle of a node, its tasks and its APIs.
//!
//! # Guarantees of [`Service::start`]
//!
//! - **Order.** `pre_start → on_start → run → cancel token →
//!   join_all → on_stop → post_stop`.
//! - **Cleanup always runs.** A failed or panicking `run` still gets its
//!   tasks joined and `on_stop` + `post_stop` called; a failed `on_stop`
//!   still gets `post_stop`; a failed `on_start` gets `post_stop`.
//! - **One shutdown budget.** From the token firing, `start()` returns
//!   within [`ServiceConfig::shutdown_deadline`] (plus scheduling slack),
//!   whatever the node does. `run` and the join share `shutdown_deadline -
//!   stop_reserve` (a start-up hook the token interrupts shares it too);
//!   `on_stop` and `post_stop` share what is left, never less than
//!   [`ServiceConfig::stop_reserve`]: a straggler cannot eat the time a
//!   flush needs. What overruns its share is dropped (a hook, `run`) or
//!   aborted (a task), and named, never waited for.
//!   [`ServiceConfig::hook_timeout`] still bounds each edge hook from the
//!   moment it starts.
//! - **Shutdown during start-up.** A shutdown requested while `pre_start`
//!   or `on_start` runs is honoured: the hook sees it on `ctx.shutdown`, no
//!   later start-up hook runs, `run` is skipped, and the service winds down
//!   (join, `on_stop` only if `on_start` completed, `post_stop`);
//!   `start()` returns `RequestedShutdown`. Requested before `start()`, no
//!   hook runs at all. A start-up hook that ignores the request is dropped
//!   at the end of its share, and fails.
//! - **A report.** Whenever a shutdown began, what `start()` returns
//!   carries a [`ShutdownReport`]
//!   ([`ExitStatus::report`], [`ServiceError::report`]): reason, total
//!   time, each stage's duration and outcome, every straggler.
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
use crate::error::{HookTimeout, Result, ServiceError};
use crate::exit::{ExitReason, ExitStatus};
use crate::handle::{ServiceHandle, Shared};
use crate::report::{
    FireStamp, Fired, PhaseOutcome, PhaseReport, ShutdownPhase, ShutdownReport, StragglerReport,
    MAX_STACKS,
};
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
    /// | token fired before `start()` | no hook runs; tasks already in the registry are joined; `Ok(RequestedShutdown(reason))` |
    /// | token fired while `pre_start` runs, and it returns | `on_start` and `run` skipped; tasks joined, `post_stop`; `Ok(RequestedShutdown(reason))` |
    /// | token fired while `on_start` runs, and it returns | `run` skipped; tasks joined, `on_stop`, `post_stop`; `Ok(RequestedShutdown(reason))` |
    /// | `pre_start` fails | [`ServiceError::PreStartFailed`]; no later hook runs (tasks it spawned are still stopped: token cancelled with `Fatal`, then joined) |
    /// | `on_start` fails | [`ServiceError::OnStartFailed`]; token cancelled with `Fatal`, tasks joined, then `post_stop` (its `exit_reason` is `RunError` carrying the `on_start` error); `run` / `on_stop` do not run |
    /// | `run` fails or panics | [`ServiceError::RunFailed`]; token cancelled with `Fatal`, tasks joined, `on_stop` and `post_stop` still run |
    /// | `on_stop` or `post_stop` fails | [`ServiceError::OnStopFailed`]; the later hook still runs |
    /// | any hook panics (any payload; also while its future is dropped) | as that hook failing (above); a panic in a dropped hook's `Drop` is logged; the join and the stop hooks run |
    /// | a tracked task fails or panics | logged and counted; the lifecycle goes on (a [critical](TaskRegistry::spawn_critical) task cancels the token with `Fatal`) |
    /// | tracked tasks outlive the share of `run` and the join | they are aborted (native) / cancelled (foreign); [`ServiceError::ShutdownDeadlineExceeded`] |
    /// | `run` outlives its share after the token fired | `run` is dropped and every still-live task is stopped at once; `ShutdownDeadlineExceeded` with `"run"` first in `pending_names` |
    /// | an edge hook outlives `hook_timeout` (or its share of the budget) | that hook's failure, with a [`HookTimeout`] source |
    /// | `stop_reserve` larger than `shutdown_deadline` | [`ServiceError::InvalidConfig`]; nothing runs |
    /// | `start` called a second time | [`ServiceError::AlreadyRunning`] |
    /// | `start` polled outside a tokio runtime | [`ServiceError::NoRuntime`]; the service is not started (a later `start` may) |
    /// | the `start()` future is dropped before it finished | token fired (`UserRequested`; an earlier reason wins), a running `pre_start`/`on_start` cut short (its failure), then the wind-down as above (join, `on_stop`, `post_stop`, within the budget) runs on the runtime; `wait_for_exit` returns the outcome |
    /// | the runtime shuts down before the lifecycle finished | token cancelled with `Fatal` (unless it had fired), tasks stopped, registry closed; `on_stop`/`post_stop` cannot run (no runtime left); [`ServiceError::LifecycleAborted`] for `wait_for_exit` |
    ///
    /// When several stages fail, the error returned is the first of run >
    /// on_stop > post_stop > join; the others are logged. Whenever a
    /// shutdown began, the status or error carries its
    /// [`ShutdownReport`].
    pub async fn start(&self) -> Result<ExitStatus> {
        let Ok(rt) = Handle::try_current() else {
            return Err(ServiceError::NoRuntime("Service::start"));
        };
        if !self.shared.begin() {
            return Err(ServiceError::AlreadyRunning);
        }
        if let Err(e) = self.config.validate() {
            // Nothing ran; the waiters get the same error.
            self.shared.finish(Err(e.clone()));
            return Err(e);
        }
        let lifecycle = Lifecycle {
            node: self.node.clone(),
            config: self.config.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
            shared: self.shared.clone(),
            abandoned: CancellationToken::new(),
            stamp: FireStamp::watch(&self.shutdown, &self.tasks),
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
    /// When the token fired, and the tasks live then: the budget counts
    /// from it.
    stamp: FireStamp,
}

/// Which limit, besides `hook_timeout`, bounds an edge hook.
#[derive(Clone, Copy)]
enum Limit {
    /// A start-up hook: once the token fires, it shares the budget of
    /// `run` and the join (`shutdown_deadline - stop_reserve`).
    Startup,
    /// A stop hook: the end of the stop hooks' window.
    StopBy(Instant),
}

/// How an edge hook ended, for the result and the report.
struct HookRun {
    result: std::result::Result<(), Arc<anyhow::Error>>,
    report: PhaseReport,
}

/// What the report says, gathered stage by stage.
struct Account {
    phases: [PhaseReport; 4],
    stragglers: Vec<StragglerReport>,
}

impl Account {
    fn new() -> Self {
        Self {
            phases: ShutdownPhase::ALL
                .map(|name| phase(name, Duration::ZERO, PhaseOutcome::Skipped)),
            stragglers: Vec::new(),
        }
    }

    fn set(&mut self, report: PhaseReport) {
        let slot = ShutdownPhase::ALL
            .iter()
            .position(|p| *p == report.name)
            .expect("every phase has a slot");
        self.phases[slot] = report;
    }
}

fn phase(name: ShutdownPhase, duration: Duration, outcome: PhaseOutcome) -> PhaseReport {
    PhaseReport {
        name,
        duration,
        outcome,
    }
}

/// How a wind-down after the token fired goes on.
struct WindDown {
    /// What the stop hooks see, and what `start()` returns if nothing failed.
    exit_reason: ExitReason,
    /// The error that outranks every later one (a failed start-up hook or
    /// `run`, or `run` past its budget).
    first_error: Option<ServiceError>,
    /// `run` was dropped past its budget: the join's share is spent.
    run_overran: bool,
    /// Whether `on_stop` runs (only after a completed `on_start`).
    on_stop: bool,
}

/// `at + d`, or a far future instant when that overflows (a deadline of
/// `Duration::MAX` means no deadline).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(60 * 60 * 24 * 365 * 30))
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

    // ----------------------------------------------------------- the budget

    /// When the token fired (and the tasks live then). Read once it has:
    /// the stamp is taken inside `cancel`, before any waiter wakes; the
    /// fallback (now) covers a `cancel` still running on another thread.
    fn fired(&self) -> Fired {
        self.stamp.get().unwrap_or_else(|| Fired {
            at: Instant::now(),
            live: self.tasks.len(),
        })
    }

    /// The end of the share of `run` and the join (and of a start-up hook
    /// the token interrupted): `shutdown_deadline - stop_reserve` after the
    /// token fired.
    fn slot_end(&self) -> Instant {
        let share = self
            .config
            .shutdown_deadline
            .saturating_sub(self.config.effective_stop_reserve());
        later(self.fired().at, share)
    }

    /// The end of the stop hooks' window, when they start at `from`: what
    /// is left of the budget, never less than the reserve.
    fn stop_end(&self, from: Instant) -> Instant {
        let budget_end = later(self.fired().at, self.config.shutdown_deadline);
        budget_end.max(later(from, self.config.effective_stop_reserve()))
    }

    fn reason(&self) -> ShutdownReason {
        // Always set: the callers ask once the token fired.
        self.shutdown
            .reason()
            .unwrap_or(ShutdownReason::RequestedByRun)
    }

    fn report(&self, account: Account) -> Arc<ShutdownReport> {
        let fired = self.fired();
        Arc::new(ShutdownReport {
            reason: self.reason(),
            total: Instant::now().saturating_duration_since(fired.at),
            tasks_at_start: fired.live,
            phases: account.phases.into(),
            stragglers: account.stragglers,
        })
    }

    // ----------------------------------------------------------- the stages

    async fn lifecycle(&self) -> Result<ExitStatus> {
        let node = &*self.node;
        let mut account = Account::new();

        if self.shutdown.is_cancelled() {
            // Requested before start(): the service never starts, no hook
            // runs; the tasks already spawned into its registry are joined
            // (the budget counts from start(), see `FireStamp::watch`).
            tracing::info!(
                target: LOG,
                service = self.shared.name,
                "shutdown requested before start(): no hook runs"
            );
            let down = WindDown {
                exit_reason: ExitReason::RequestedShutdown(self.reason()),
                first_error: None,
                run_overran: false,
                on_stop: false,
            };
            return self.wind_down(down, false, account).await;
        }

        let start_ctx = StartContext {
            name: self.shared.name,
            shutdown: self.shutdown.clone(),
            tasks: &self.tasks,
        };

        let pre = self
            .edge_hook("pre_start", Limit::Startup, || node.pre_start(&start_ctx))
            .await;
        // A shutdown began before pre_start ended: then it has a report.
        let requested = self.shutdown.is_cancelled();
        if let Err(e) = pre.result {
            self.fire_after("pre_start", &e);
            if let Some(join) = self.join(self.slot_end(), &mut account).await {
                log_suppressed(&join);
            }
            let err = ServiceError::PreStartFailed(e, None);
            return Err(if requested {
                err.with_report(&self.report(account))
            } else {
                err
            });
        }
        if requested {
            // The shutdown came during pre_start, which returned: no later
            // start-up hook runs; the stores it opened are closed by post_stop.
            return self.startup_interrupted("pre_start", false, account).await;
        }

        let on = self
            .edge_hook("on_start", Limit::Startup, || node.on_start(&start_ctx))
            .await;
        if let Err(e) = on.result {
            self.fire_after("on_start", &e);
            let down = WindDown {
                exit_reason: ExitReason::RunError(e.clone()),
                first_error: Some(ServiceError::OnStartFailed(e, None)),
                run_overran: false,
                on_stop: false,
            };
            return self.wind_down(down, true, account).await;
        }
        if self.shutdown.is_cancelled() {
            return self.startup_interrupted("on_start", true, account).await;
        }

        let run_ctx = RunContext {
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        };
        let outcome = self.drive_run(|| node.run(run_ctx)).await;
        let run_ended = Instant::now();

        let (down, outcome) = match outcome {
            RunOutcome::Returned(Ok(())) => {
                // `run` returned: wind the tasks down. Another thread may
                // fire the token at the same moment; the reason that won is
                // the one reported (first reason wins, so re-read it).
                self.shutdown.cancel(ShutdownReason::RequestedByRun);
                let reason = match self.shutdown.reason() {
                    Some(ShutdownReason::RequestedByRun) | None => ExitReason::RunCompleted,
                    Some(reason) => ExitReason::RequestedShutdown(reason),
                };
                let down = WindDown {
                    exit_reason: reason,
                    first_error: None,
                    run_overran: false,
                    on_stop: true,
                };
                (down, PhaseOutcome::Ok)
            }
            RunOutcome::Returned(Err(e)) => {
                let e = Arc::new(e);
                self.shutdown
                    .cancel(ShutdownReason::Fatal(format!("run failed: {e:#}")));
                let down = WindDown {
                    exit_reason: ExitReason::RunError(e.clone()),
                    first_error: Some(ServiceError::RunFailed(e, None)),
                    run_overran: false,
                    on_stop: true,
                };
                (down, PhaseOutcome::Failed)
            }
            RunOutcome::Overran => {
                tracing::warn!(
                    target: LOG,
                    service = self.shared.name,
                    budget = ?self.config.shutdown_deadline,
                    "run did not return within its share of the shutdown budget; dropped it"
                );
                let down = WindDown {
                    exit_reason: ExitReason::RequestedShutdown(self.reason()),
                    first_error: Some(ServiceError::ShutdownDeadlineExceeded {
                        deadline: self.config.shutdown_deadline,
                        pending: 1,
                        pending_names: vec!["run".to_owned()],
                        report: None,
                    }),
                    run_overran: true,
                    on_stop: true,
                };
                (down, PhaseOutcome::TimedOut)
            }
        };
        let run_time = run_ended.saturating_duration_since(self.fired().at);
        account.set(phase(ShutdownPhase::Run, run_time, outcome));
        self.wind_down(down, true, account).await
    }

    /// The token fired while the start-up hook `hook` ran, and it returned:
    /// `run` is skipped, the service winds down (`on_stop` only if
    /// `on_start` completed) and `start()` returns `RequestedShutdown`.
    async fn startup_interrupted(
        &self,
        hook: &'static str,
        on_start_completed: bool,
        account: Account,
    ) -> Result<ExitStatus> {
        tracing::info!(
            target: LOG,
            service = self.shared.name,
            hook,
            "shutdown requested during start-up; run is skipped"
        );
        let down = WindDown {
            exit_reason: ExitReason::RequestedShutdown(self.reason()),
            first_error: None,
            run_overran: false,
            on_stop: on_start_completed,
        };
        self.wind_down(down, true, account).await
    }

    /// After the token fired: join the tasks in what is left of the share
    /// of `run` and the join, then `on_stop` (if `down.on_stop`) and
    /// `post_stop` (if `post_stop`) in the stop hooks' window; return the
    /// outcome with its report.
    async fn wind_down(
        &self,
        down: WindDown,
        post_stop: bool,
        mut account: Account,
    ) -> Result<ExitStatus> {
        let node = &*self.node;
        let until = if down.run_overran {
            // The share is spent: every task still live is a straggler.
            Instant::now()
        } else {
            self.slot_end()
        };
        let joined = self.join(until, &mut account).await;
        let (first_error, join_error) = match (down.first_error, joined) {
            (
                Some(ServiceError::ShutdownDeadlineExceeded {
                    pending,
                    mut pending_names,
                    ..
                }),
                Some(ServiceError::ShutdownDeadlineExceeded {
                    pending: more,
                    pending_names: more_names,
                    ..
                }),
            ) => {
                pending_names.extend(more_names);
                let merged = ServiceError::ShutdownDeadlineExceeded {
                    deadline: self.config.shutdown_deadline,
                    pending: pending + more,
                    pending_names,
                    report: None,
                };
                (Some(merged), None)
            }
            (first, joined) => (first, joined),
        };

        let stop_end = self.stop_end(Instant::now());
        let stop_ctx = StopContext {
            shutdown: self.shutdown.clone(),
            tasks: &self.tasks,
            exit_reason: down.exit_reason.clone(),
        };
        let mut on_stop_error = None;
        if down.on_stop {
            let run = self
                .edge_hook("on_stop", Limit::StopBy(stop_end), || {
                    node.on_stop(&stop_ctx)
                })
                .await;
            account.set(run.report);
            on_stop_error = run.result.err();
        }
        let mut post_stop_error = None;
        if post_stop {
            let run = self
                .edge_hook("post_stop", Limit::StopBy(stop_end), || {
                    node.post_stop(&stop_ctx)
                })
                .await;
            account.set(run.report);
            post_stop_error = run.result.err();
        }

        let report = self.report(account);
        let mut errors = first_error
            .into_iter()
            .chain(on_stop_error.map(|e| ServiceError::OnStopFailed(e, None)))
            .chain(post_stop_error.map(|e| ServiceError::OnStopFailed(e, None)))
            .chain(join_error);
        match errors.next() {
            None => Ok(ExitStatus::new(down.exit_reason).with_report(report)),
            Some(first) => {
                errors.for_each(|e| log_suppressed(&e));
                Err(first.with_report(&report))
            }
        }
    }

    /// Join the tracked tasks until `until`; record the join (and its
    /// stragglers) in `account`; return its error.
    async fn join(&self, until: Instant, account: &mut Account) -> Option<ServiceError> {
        let started = Instant::now();
        let joined = self
            .tasks
            .join_reporting(until.saturating_duration_since(started), MAX_STACKS)
            .await;
        let took = started.elapsed();
        match joined {
            Ok(None) => {
                account.set(phase(ShutdownPhase::Join, took, PhaseOutcome::Ok));
                None
            }
            Ok(Some(stragglers)) => {
                account.set(phase(ShutdownPhase::Join, took, PhaseOutcome::TimedOut));
                let now = std::time::Instant::now();
                account.stragglers = stragglers
                    .tasks
                    .into_iter()
                    .map(|s| StragglerReport {
                        name: s.name.to_string(),
                        kind: s.kind,
                        origin: s.origin,
                        age: now.saturating_duration_since(s.spawned_at),
                        stack: s.stack,
                    })
                    .collect();
                Some(ServiceError::ShutdownDeadlineExceeded {
                    deadline: self.config.shutdown_deadline,
                    pending: stragglers.names.len(),
                    pending_names: stragglers.names,
                    report: None,
                })
            }
            Err(e) => {
                account.set(phase(ShutdownPhase::Join, took, PhaseOutcome::Failed));
                Some(e)
            }
        }
    }

    /// Cancel the token after the start-up hook `hook` failed, so that the
    /// tasks spawned so far wind down.
    fn fire_after(&self, hook: &str, e: &anyhow::Error) {
        self.shutdown
            .cancel(ShutdownReason::Fatal(format!("{hook} failed: {e:#}")));
    }

    /// Run `run` until it returns, or until its share of the budget after
    /// the token fired has passed.
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
            tokio::time::sleep_until(self.slot_end()).await;
        };
        tokio::select! {
            biased;
            res = run => RunOutcome::Returned(res),
            () = overrun => RunOutcome::Overran,
        }
    }

    /// Run an edge hook under the hook timeout and its share of the
    /// shutdown budget (`limit`), catching panics. A start-up hook is also
    /// cut short when the `start()` future is dropped, and is not started
    /// at all once it has been.
    async fn edge_hook<'a, F>(
        &self,
        hook: &'static str,
        limit: Limit,
        make: impl FnOnce() -> F + 'a,
    ) -> HookRun
    where
        F: Future<Output = anyhow::Result<()>> + Unpin + 'a,
    {
        let name = match hook {
            "on_stop" => ShutdownPhase::OnStop,
            "post_stop" => ShutdownPhase::PostStop,
            // Start-up hooks have no phase in the report; the slot is unused.
            _ => ShutdownPhase::Run,
        };
        let started = Instant::now();
        let done = |result: std::result::Result<(), anyhow::Error>, outcome| {
            if let Err(e) = &result {
                tracing::debug!(target: LOG, service = self.shared.name, hook, error = ?e, "hook failed");
            }
            HookRun {
                result: result.map_err(Arc::new),
                report: phase(name, started.elapsed(), outcome),
            }
        };
        let startup = matches!(limit, Limit::Startup);
        if startup && self.abandoned.is_cancelled() {
            let e =
                anyhow::anyhow!("`{hook}` was not started: the future driving start() was dropped");
            return done(Err(e), PhaseOutcome::Failed);
        }
        let fut = match CatchUnwind::call(hook, make) {
            Ok(fut) => fut,
            Err(e) => return done(Err(e), PhaseOutcome::Failed),
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
        let by_budget = async {
            let end = match limit {
                Limit::Startup => {
                    self.shutdown.cancelled().await;
                    self.slot_end()
                }
                Limit::StopBy(end) => end,
            };
            tokio::time::sleep_until(end).await;
            end.saturating_duration_since(started)
        };
        let by_abandon = async {
            if startup {
                self.abandoned.cancelled().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            res = fut => {
                let outcome = if res.is_ok() { PhaseOutcome::Ok } else { PhaseOutcome::Failed };
                done(res, outcome)
            }
            after = by_hook_timeout => {
                done(Err(anyhow::Error::new(HookTimeout { hook, after })), PhaseOutcome::TimedOut)
            }
            after = by_budget => {
                done(Err(anyhow::Error::new(HookTimeout { hook, after })), PhaseOutcome::TimedOut)
            }
            () = by_abandon => done(
                Err(anyhow::anyhow!("`{hook}` was cancelled: the future driving start() was dropped")),
                PhaseOutcome::Failed,
            ),
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
