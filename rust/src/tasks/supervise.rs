//! Supervised tasks: one registry entry for a task that is restarted by
//! policy, and the native driver that runs one on tokio.
//!
//! A supervised task is **one** live task for the registry, from
//! `supervise` until it stops for good: one entry (counted once in
//! `spawned`, `len`, the snapshot and the join, named once as a straggler),
//! whose successive *incarnations* (each a new future from the factory) and
//! backoff waits all happen under it. [`Supervisor`] is that entry's side of
//! the bookkeeping: it asks the restart logic ([`Supervision`], in
//! `policy.rs`) what to do after each incarnation, counts each restart in
//! the entry and the registry's counters, and words the log line and the
//! `Fatal` reason. It serves both drivers: the native one below
//! ([`TaskRegistry::supervise`]) and the Python bindings' (asyncio
//! incarnations, `rust/src/python/supervise.rs`).
//!
//! Guarantees (SPEC 8):
//! - **One live task.** Between two incarnations (a backoff wait) the task
//!   stays live; it leaves the registry once, when it stops for good,
//!   counted by how its last incarnation ended (`failed` if it stopped after
//!   a failure).
//! - **Nothing restarts after the token fired**, and a backoff wait ends at
//!   once when it fires (the task then ends cleanly).
//! - **Loud, not noisy.** Each restart is logged with its cause: the first
//!   failure of a streak with its traceback, the next ones on one line, so
//!   a crash loop cannot flood the log. Giving up is logged with the last
//!   traceback and, for a critical task, cancels the token with
//!   `Fatal("task 'NAME' gave up after N restarts in W s: LAST ERROR")`.
//! - **Panics are failures.** A panicking factory or incarnation is a
//!   failed incarnation, never an unwinding supervisor.
//! - **Never a busy loop.** A zero-backoff restart yields to the runtime
//!   first, so a crash loop cannot hold a worker thread.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use super::policy::{End, NotRestarted, RestartPolicy, Step, Stop, Supervision};
use super::slab::{self, Key};
use super::watched::Exit;
use super::{panic_message, Inner, TaskFailure, TaskKind, TaskName, TaskRegistry};
use crate::error::Result;
use crate::shutdown::ShutdownReason;

/// The level of a supervision log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Info,
    Warn,
    Error,
}

/// A log line a driver emits for the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Log {
    pub(crate) level: Level,
    pub(crate) text: String,
    /// Attach the failure's traceback (the error's full chain for a native
    /// task); otherwise `text` already names the error on its one line.
    pub(crate) traceback: bool,
}

/// What a driver does after an incarnation ended: log `log`, cancel the
/// token with `Fatal(fatal)`, in that order, then follow `step`.
#[derive(Debug)]
pub(crate) struct Decision {
    pub(crate) step: Step,
    pub(crate) log: Option<Log>,
    pub(crate) fatal: Option<String>,
}

/// The registry side of one supervised task (see the module docs).
pub(crate) struct Supervisor {
    inner: Arc<Inner>,
    /// The slot of the task's entry; only this supervisor removes it, so
    /// the slot alone names it.
    slot: u32,
    name: TaskName,
    kind: TaskKind,
    logic: Supervision,
    /// When the current incarnation started.
    started: Instant,
}

impl Supervisor {
    fn new(
        registry: &TaskRegistry,
        key: Key,
        name: TaskName,
        kind: TaskKind,
        policy: RestartPolicy,
    ) -> Self {
        Self {
            inner: registry.inner.clone(),
            slot: slab::index_of(key),
            name,
            kind,
            logic: Supervision::new(policy),
            started: Instant::now(),
        }
    }

    /// The task's name.
    pub(crate) fn name(&self) -> &TaskName {
        &self.name
    }

    /// Restarts so far.
    pub(crate) fn restarts(&self) -> u32 {
        self.logic.restarts()
    }

    /// A new incarnation starts now.
    pub(crate) fn incarnation_started(&mut self) {
        self.started = Instant::now();
    }

    /// The current incarnation ended as `end`; `error` is its failure on
    /// one line (`ValueError: boom`), if it failed. Counts a restart in the
    /// task's entry and the registry when the answer is to restart.
    pub(crate) fn ended(&mut self, end: End, error: Option<&str>) -> Decision {
        let now = Instant::now();
        let lived = now.saturating_duration_since(self.started);
        let shutting_down = self.inner.shutdown.is_cancelled();
        let step = self.logic.on_end(end, lived, now, shutting_down);
        if matches!(step, Step::Restart { .. }) {
            self.inner.count_restart(self.slot);
        }
        let (log, fatal) = self.describe(step, end, error.unwrap_or("returned"), shutting_down);
        Decision { step, log, fatal }
    }

    /// The log line and the `Fatal` reason (if any) of `step`.
    fn describe(
        &self,
        step: Step,
        end: End,
        error: &str,
        shutting_down: bool,
    ) -> (Option<Log>, Option<String>) {
        let policy = self.logic.policy();
        let who = format!("task '{}' ({:?})", self.name, self.kind);
        let log = |level, text, traceback| {
            Some(Log {
                level,
                text,
                traceback,
            })
        };
        match step {
            Step::Restart {
                delay,
                first_of_streak,
            } => {
                let plan = format!(
                    "restarting in {} s (restart {}; at most {} in {} s)",
                    secs(delay),
                    self.logic.restarts(),
                    policy.max_restarts,
                    secs(policy.within)
                );
                let line = match end {
                    End::Returned => log(Level::Info, format!("{who} returned, {plan}"), false),
                    _ if first_of_streak => log(Level::Warn, format!("{who} failed, {plan}"), true),
                    _ => log(
                        Level::Warn,
                        format!("{who} failed again, {plan}: {error}"),
                        false,
                    ),
                };
                (line, None)
            }
            Step::Stop(Stop::Returned | Stop::Cancelled) => (None, None),
            Step::Stop(Stop::Failed(why)) => {
                let text = match why {
                    NotRestarted::Temporary => format!("{who} failed; not restarted (temporary)"),
                    NotRestarted::ShuttingDown => {
                        format!("{who} failed; not restarted (the service is shutting down)")
                    }
                };
                let fatal = (policy.critical && !shutting_down)
                    .then(|| format!("critical task '{}' failed: {error}", self.name));
                (log(Level::Error, text, true), fatal)
            }
            Step::Stop(Stop::GaveUp { restarts, span }) => {
                let reason = format!(
                    "task '{}' gave up after {restarts} restarts in {} s: {error}",
                    self.name,
                    secs(span)
                );
                let text = format!(
                    "{who} gave up after {restarts} restarts in {} s",
                    secs(span)
                );
                let text = if policy.critical {
                    format!("{text}; it is critical: shutting the service down")
                } else {
                    text
                };
                (
                    log(Level::Error, text, true),
                    policy.critical.then_some(reason),
                )
            }
        }
    }
}

/// Seconds, to the millisecond, without trailing zeros: `0.1`, `60`, `0`.
fn secs(d: Duration) -> String {
    let ms = (d.as_secs_f64() * 1000.0).round() / 1000.0;
    format!("{ms}")
}

impl Inner {
    /// Count a restart of the supervised task in `slot`: in its entry (for
    /// the snapshot) and in the registry's counters.
    fn count_restart(&self, slot: u32) {
        let mut st = self.state.lock();
        let bucket = match st.entries.get_mut_at(slot) {
            Some(e) => {
                e.restarts = e.restarts.saturating_add(1);
                e.bucket()
            }
            None => return,
        };
        st.restarted[bucket] += 1;
    }
}

impl TaskRegistry {
    /// Run a *supervised* native task on the current runtime: `factory`
    /// makes a new future for each incarnation, and `policy` says when an
    /// incarnation that ended is replaced by a new one (SPEC 8; see
    /// [`RestartPolicy`] and [`Restart`](crate::Restart)).
    ///
    /// The task is one live task in the registry until it stops for good
    /// (counted once in [`TaskStats::spawned`](crate::TaskStats::spawned),
    /// each restart in [`TaskStats::restarted`](crate::TaskStats::restarted)
    /// and its entry's [`TaskSummary::restarts`](crate::TaskSummary::restarts)).
    /// Nothing restarts once the token has fired, and a backoff wait ends
    /// when it fires. Giving up (more than `max_restarts` restarts within
    /// `within`) is logged with the last error and, if `policy.critical`,
    /// cancels the token with `ShutdownReason::Fatal("task 'NAME' gave up
    /// after N restarts in W s: LAST ERROR")`. A factory or incarnation
    /// that panics is a failed incarnation.
    ///
    /// # Errors
    /// [`ServiceError::InvalidRestartPolicy`](crate::ServiceError::InvalidRestartPolicy)
    /// for a policy that [`validate`](RestartPolicy::validate) refuses;
    /// otherwise as [`spawn`](Self::spawn). Nothing is spawned or counted
    /// then, and `factory` is not called.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use dig_service::{Restart, RestartPolicy, ShutdownToken, TaskKind, TaskRegistry};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let tasks = TaskRegistry::new(ShutdownToken::new());
    /// let attempts = Arc::new(AtomicU32::new(0));
    /// let sync = tasks
    ///     .supervise(
    ///         "peer-sync",
    ///         TaskKind::BackgroundLoop,
    ///         {
    ///             let attempts = attempts.clone();
    ///             move || {
    ///                 let attempt = attempts.fetch_add(1, Ordering::SeqCst);
    ///                 async move {
    ///                     if attempt < 2 {
    ///                         anyhow::bail!("peer closed the connection");
    ///                     }
    ///                     Ok(()) // synced: a transient task is done
    ///                 }
    ///             }
    ///         },
    ///         RestartPolicy::new()
    ///             .with_restart(Restart::Transient)
    ///             .with_backoff(Duration::from_millis(1)),
    ///     )
    ///     .expect("inside a runtime, registry open");
    /// assert_eq!(tasks.len(), 1, "one live task, whichever incarnation runs");
    /// sync.await.expect("the third attempt succeeded");
    /// assert_eq!(tasks.stats().restarted, 2);
    /// # });
    /// ```
    pub fn supervise<F, Fut>(
        &self,
        name: impl Into<TaskName>,
        kind: TaskKind,
        factory: F,
        policy: RestartPolicy,
    ) -> Result<SupervisedHandle>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        policy.validate()?;
        let name = name.into();
        let restarts = Arc::new(AtomicU32::new(0));
        let join = {
            let (registry, name, restarts) = (self.clone(), name.clone(), restarts.clone());
            self.start_here("TaskRegistry::supervise", name.clone(), kind, move |key| {
                let sup = Supervisor::new(&registry, key, name, kind, policy);
                drive(factory, sup, registry, restarts)
            })?
        };
        Ok(SupervisedHandle {
            name,
            kind,
            restarts,
            join,
        })
    }

    /// Track a supervised *foreign* task (the Python bindings' asyncio
    /// incarnations): one entry, and the [`Supervisor`] that decides after
    /// each incarnation. The owner runs the incarnations and the waits, and
    /// calls [`finish_foreign`](Self::finish_foreign) once, when the task
    /// stops for good.
    #[cfg(feature = "python")]
    pub(crate) fn supervise_foreign(
        &self,
        name: TaskName,
        kind: TaskKind,
        policy: RestartPolicy,
        task: Arc<dyn super::ForeignTask>,
    ) -> Result<(super::ForeignTaskId, Supervisor)> {
        policy.validate()?;
        let id = self.track_foreign(name.clone(), kind, task)?;
        let sup = Supervisor::new(self, id.0, name, kind, policy);
        Ok((id, sup))
    }
}

/// The final error of a supervised native task: its last failure, already
/// logged by the supervisor (the task's end is then not logged again).
#[derive(Debug)]
pub(super) struct Reported(pub(super) TaskFailure);

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Reported {}

/// The supervised native task's future: incarnations, decisions, waits.
async fn drive<F, Fut>(
    mut factory: F,
    mut sup: Supervisor,
    registry: TaskRegistry,
    restarts: Arc<AtomicU32>,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let token = registry.shutdown().clone();
    loop {
        sup.incarnation_started();
        // A factory that panics, like an incarnation that panics, is a
        // failed incarnation; the factory is called again for the next.
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(&mut factory)) {
            Ok(fut) => match (CatchUnwind { fut }).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(TaskFailure::Error(Arc::new(e))),
                Err(msg) => Err(TaskFailure::Panic(msg)),
            },
            Err(payload) => Err(TaskFailure::Panic(format!(
                "(in the factory) {}",
                panic_message(&*payload)
            ))),
        };
        let (end, error) = match &outcome {
            Ok(()) => (End::Returned, None),
            Err(failure) => (End::Failed, Some(failure.to_string())),
        };
        let decision = sup.ended(end, error.as_deref());
        if let Some(log) = &decision.log {
            emit(log, sup.name(), outcome.as_ref().err());
        }
        if let Some(reason) = decision.fatal {
            token.cancel(ShutdownReason::Fatal(reason));
        }
        match decision.step {
            Step::Restart { delay, .. } => {
                // Release: pairs with the handle's Acquire load; publishes
                // nothing but the count itself.
                restarts.store(sup.restarts(), Ordering::Release);
                if delay.is_zero() {
                    // Never a busy loop: a crash loop with no backoff still
                    // gives the worker (and the stop flag) a turn.
                    tokio::task::yield_now().await;
                } else {
                    tokio::select! {
                        biased;
                        () = token.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                if token.is_cancelled() {
                    // Ended by shutdown during the wait: a clean end.
                    return Ok(());
                }
            }
            Step::Stop(_) => {
                return outcome.map_err(|failure| anyhow::Error::new(Reported(failure)));
            }
        }
    }
}

/// Emit a supervision log line for a native task on `dig_service::tasks`.
fn emit(log: &Log, name: &TaskName, failure: Option<&TaskFailure>) {
    let text = &log.text;
    let detail = match (log.traceback, failure) {
        (true, Some(TaskFailure::Error(e))) => Some(format!("{e:?}")),
        (true, Some(other)) => Some(other.to_string()),
        _ => None,
    };
    match (log.level, detail) {
        (Level::Info, None) => tracing::info!(target: "dig_service::tasks", task = %name, "{text}"),
        (Level::Info, Some(e)) => {
            tracing::info!(target: "dig_service::tasks", task = %name, error = %e, "{text}")
        }
        (Level::Warn, None) => tracing::warn!(target: "dig_service::tasks", task = %name, "{text}"),
        (Level::Warn, Some(e)) => {
            tracing::warn!(target: "dig_service::tasks", task = %name, error = %e, "{text}")
        }
        (Level::Error, None) => {
            tracing::error!(target: "dig_service::tasks", task = %name, "{text}")
        }
        (Level::Error, Some(e)) => {
            tracing::error!(target: "dig_service::tasks", task = %name, error = %e, "{text}")
        }
    }
}

pin_project! {
    /// A future whose panic is caught and returned as its message.
    struct CatchUnwind<F> {
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::result::Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.project().fut;
        // A future that panicked is dropped, never polled again, so it
        // cannot be seen in a broken state.
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}

/// The handle [`TaskRegistry::supervise`] returns.
///
/// Awaiting it waits until the task stops for good: `Ok(())` when it ended
/// cleanly or by shutdown, the last failure when it stopped after one
/// (gave up, or a failure not restarted), [`TaskFailure::Aborted`] when it
/// was aborted. Dropping it detaches (the task keeps running).
#[derive(Debug)]
pub struct SupervisedHandle {
    name: TaskName,
    kind: TaskKind,
    restarts: Arc<AtomicU32>,
    join: JoinHandle<Exit>,
}

impl SupervisedHandle {
    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.name
    }

    /// The task's kind.
    pub fn kind(&self) -> TaskKind {
        self.kind
    }

    /// How many times it has been restarted so far.
    pub fn restarts(&self) -> u32 {
        // Acquire: pairs with the driver's Release store (see `drive`).
        self.restarts.load(Ordering::Acquire)
    }

    /// Stop it for good: the current incarnation (or the backoff wait) is
    /// aborted at its next await point, and nothing restarts.
    pub fn abort(&self) {
        self.join.abort();
    }

    /// Whether it has stopped for good.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// A handle that can abort the task without owning this one.
    pub fn abort_handle(&self) -> AbortHandle {
        self.join.abort_handle()
    }
}

impl Future for SupervisedHandle {
    type Output = std::result::Result<(), TaskFailure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.join).poll(cx).map(|r| match r {
            Ok(Exit::Completed) => Ok(()),
            Ok(Exit::Failed(e)) => Err(match e.downcast_ref::<Reported>() {
                Some(Reported(failure)) => failure.clone(),
                None => TaskFailure::Error(e),
            }),
            Ok(Exit::Stopped) => Err(TaskFailure::Aborted),
            Err(e) if e.is_panic() => Err(TaskFailure::Panic(panic_message(&*e.into_panic()))),
            Err(_) => Err(TaskFailure::Aborted),
        })
    }
}
