//! [`ShutdownReport`]: one account of a shutdown, from the token firing to
//! the end of `start()`.
//!
//! Guarantees:
//! - **One per shutdown.** `Service::start` attaches a report to what it
//!   returns ([`ExitStatus::report`](crate::ExitStatus::report),
//!   [`ServiceError::report`](crate::ServiceError::report)) whenever a
//!   shutdown began: the token fired (from outside, by `run` returning or
//!   failing, by a failed `on_start`). A `pre_start` that fails by itself,
//!   before any shutdown was requested, has none: nothing was shut down.
//! - **Every stage, in order.** [`ShutdownReport::phases`] always lists
//!   `run`, `join`, `on_stop`, `post_stop`, in that order, each with its
//!   duration and [`PhaseOutcome`] (`Skipped` for a stage that did not run).
//! - **Every straggler, named.** [`ShutdownReport::stragglers`] lists the
//!   tracked tasks still running when the budget of the join ran out, in
//!   spawn order, with their kind, origin, age and, for a foreign (Python)
//!   task, the stack it was waiting in just before it was cancelled.
//! - **Plain values.** Everything here is owned data: no lock, no
//!   reference into a registry.
//!
//! The Python package's `ShutdownReport` has the same fields.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::shutdown::{OnCancelGuard, ShutdownReason, ShutdownToken};
use crate::tasks::{TaskKind, TaskOrigin, TaskRegistry};

/// What happened during a shutdown: why, how long, each stage, and every
/// task that had to be stopped.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// Why the service shut down (the token's reason).
    pub reason: ShutdownReason,
    /// From the token firing (or `start()` being called, for a shutdown
    /// requested before it) to the end of the lifecycle.
    pub total: Duration,
    /// Tracked tasks live when the token fired.
    pub tasks_at_start: usize,
    /// `run`, `join`, `on_stop`, `post_stop`, in that order.
    pub phases: Vec<PhaseReport>,
    /// The tasks stopped at the end of the join, in spawn order.
    pub stragglers: Vec<StragglerReport>,
}

impl ShutdownReport {
    /// The report of the stage `phase`.
    pub fn phase(&self, phase: ShutdownPhase) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.name == phase)
    }
}

/// A stage of a shutdown.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownPhase {
    /// Waiting for `run` to return after the token fired.
    Run,
    /// Joining the tracked tasks.
    Join,
    /// The `on_stop` hook.
    OnStop,
    /// The `post_stop` hook.
    PostStop,
}

impl ShutdownPhase {
    /// The stages, in the order a shutdown goes through them.
    pub const ALL: [ShutdownPhase; 4] = [Self::Run, Self::Join, Self::OnStop, Self::PostStop];

    /// `"run"`, `"join"`, `"on_stop"` or `"post_stop"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Join => "join",
            Self::OnStop => "on_stop",
            Self::PostStop => "post_stop",
        }
    }
}

impl fmt::Display for ShutdownPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a stage of a shutdown ended.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseOutcome {
    /// It finished in time (for the join: every task ended).
    Ok,
    /// The hook returned an error (or panicked).
    Failed,
    /// It ran out of time (its share of the budget, or `hook_timeout`) and
    /// was cut short (for the join: stragglers were stopped).
    TimedOut,
    /// It did not run (e.g. `run` after a shutdown during start-up,
    /// `on_stop` after a failed `on_start`).
    Skipped,
}

impl PhaseOutcome {
    /// `"ok"`, `"failed"`, `"timed_out"` or `"skipped"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Skipped => "skipped",
        }
    }
}

impl fmt::Display for PhaseOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stage of a shutdown.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseReport {
    /// Which stage (`"run"`, `"join"`, `"on_stop"`, `"post_stop"` as text).
    pub name: ShutdownPhase,
    /// How long it took (for `run`: from the token firing until `run`
    /// returned or was dropped). Zero when skipped.
    pub duration: Duration,
    /// How it ended.
    pub outcome: PhaseOutcome,
}

/// A tracked task that was still running when the join's budget ran out.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct StragglerReport {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: TaskKind,
    /// Native tokio task or foreign (Python) task.
    pub origin: TaskOrigin,
    /// How long it had been running when it was stopped.
    pub age: Duration,
    /// For a foreign (Python) task, the stack it was waiting in just
    /// before it was cancelled; `None` for a native task (and for foreign
    /// ones past the first [`MAX_STACKS`]).
    pub stack: Option<String>,
}

/// How many stragglers of a shutdown have their stacks taken (the oldest
/// ones). Each stack is formatted under the GIL: ten thousand would stall
/// the shutdown they are reporting on.
pub const MAX_STACKS: usize = 100;

/// How many straggler lines the text form of a report shows.
const LINES_SHOWN: usize = 200;

impl fmt::Display for ShutdownReport {
    /// A readable, multi-line account (the first line is a summary).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shutdown ({}) took {:.2}s; {} task(s) live when it began",
            self.reason,
            self.total.as_secs_f64(),
            self.tasks_at_start
        )?;
        for p in &self.phases {
            write!(
                f,
                "\n  {:<10} {:>7.2}s  {}",
                p.name.as_str(),
                p.duration.as_secs_f64(),
                p.outcome
            )?;
        }
        if self.stragglers.is_empty() {
            return Ok(());
        }
        write!(
            f,
            "\n  {} task(s) did not stop in time and were cancelled/aborted:",
            self.stragglers.len()
        )?;
        let mut lines = 0;
        for (i, s) in self.stragglers.iter().enumerate() {
            if lines >= LINES_SHOWN {
                write!(f, "\n  ... and {} more", self.stragglers.len() - i)?;
                break;
            }
            write!(
                f,
                "\n  - {} ({:?}, {}, age {:.1}s)",
                s.name,
                s.kind,
                s.origin.as_str(),
                s.age.as_secs_f64()
            )?;
            lines += 1;
            match (&s.stack, s.origin) {
                (Some(stack), _) => {
                    f.write_str(", awaiting in:")?;
                    for line in stack.lines() {
                        write!(f, "\n      {line}")?;
                        lines += 1;
                    }
                }
                (None, TaskOrigin::Native) => f.write_str(": a native tokio task, no stack")?,
                (None, _) => f.write_str(": no stack captured")?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The moment the token fired, as the lifecycle measures a shutdown from it.

/// When the token fired, and how many tasks were live then.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fired {
    /// On tokio's clock, which the lifecycle's timers use (a paused test
    /// clock included).
    pub(crate) at: Instant,
    pub(crate) live: usize,
}

/// Records [`Fired`] from inside the token's cancellation, on the thread
/// that cancels it, before any waiter wakes
/// ([`ShutdownToken::on_cancel_before_wake`]): a task that ends as soon as
/// it sees the token is still counted live, and the budget starts when the
/// request was made, not when the lifecycle got round to noticing it.
///
/// The callback holds a clone of the registry (whose own token holds the
/// callback): dropping the stamp unregisters it, which breaks that cycle
/// for a token that never fires.
pub(crate) struct FireStamp {
    cell: Arc<OnceLock<Fired>>,
    _guard: Option<OnCancelGuard>,
}

impl FireStamp {
    /// Watch `token`. If it has fired already, the stamp is taken now.
    pub(crate) fn watch(token: &ShutdownToken, tasks: &TaskRegistry) -> Self {
        let cell = Arc::new(OnceLock::new());
        let stamp = {
            let cell = cell.clone();
            let tasks = tasks.clone();
            move || {
                let _ = cell.set(Fired {
                    at: Instant::now(),
                    live: tasks.len(),
                });
            }
        };
        let guard = token.on_cancel_before_wake({
            let stamp = stamp.clone();
            move |_| stamp()
        });
        if guard.is_none() {
            stamp();
        }
        Self {
            cell,
            _guard: guard,
        }
    }

    /// When the token fired, once it has.
    pub(crate) fn get(&self) -> Option<Fired> {
        self.cell.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ShutdownReport {
        ShutdownReport {
            reason: ShutdownReason::UserRequested,
            total: Duration::from_millis(1800),
            tasks_at_start: 2,
            phases: vec![
                PhaseReport {
                    name: ShutdownPhase::Run,
                    duration: Duration::ZERO,
                    outcome: PhaseOutcome::Ok,
                },
                PhaseReport {
                    name: ShutdownPhase::Join,
                    duration: Duration::from_millis(1500),
                    outcome: PhaseOutcome::TimedOut,
                },
            ],
            stragglers: vec![
                StragglerReport {
                    name: "stuck".into(),
                    kind: TaskKind::PeerConnection,
                    origin: TaskOrigin::Native,
                    age: Duration::from_secs(3),
                    stack: None,
                },
                StragglerReport {
                    name: "py".into(),
                    kind: TaskKind::BackgroundLoop,
                    origin: TaskOrigin::Python,
                    age: Duration::from_secs(3),
                    stack: Some("File \"x.py\", line 3, in f\n  await g()".into()),
                },
            ],
        }
    }

    /// **Proves:** the text form names the reason, the total, every phase
    /// with its outcome and every straggler, with a Python task's stack
    /// indented under it and a native one said to have none.
    ///
    /// **Catches:** a report that drops stragglers or stages from its text
    /// (the form the runner logs).
    #[test]
    fn text_form_names_everything() {
        let text = report().to_string();
        assert!(
            text.starts_with("shutdown (user requested) took 1.80s; 2 task(s)"),
            "{text}"
        );
        assert!(
            text.contains("\n  join          1.50s  timed_out"),
            "{text}"
        );
        assert!(text
            .contains("- stuck (PeerConnection, native, age 3.0s): a native tokio task, no stack"));
        assert!(text.contains("- py (BackgroundLoop, python, age 3.0s), awaiting in:\n      File \"x.py\", line 3, in f\n        await g()"), "{text}");
    }

    /// **Proves:** the stamp is taken when the token fires, with the live
    /// count of that moment, and at once for a token that fired before.
    ///
    /// **Catches:** a budget counted from when the lifecycle noticed the
    /// shutdown instead of from the request.
    #[test]
    fn the_stamp_is_taken_when_the_token_fires() {
        let token = ShutdownToken::new();
        let tasks = TaskRegistry::new(token.clone());
        let stamp = FireStamp::watch(&token, &tasks);
        assert!(stamp.get().is_none());
        let before = Instant::now();
        token.cancel(ShutdownReason::UserRequested);
        let fired = stamp.get().expect("stamped by the cancel");
        assert!(fired.at >= before && fired.at <= Instant::now());
        assert_eq!(fired.live, 0);
        let late = FireStamp::watch(&token, &tasks);
        assert!(late.get().expect("stamped at once").at >= fired.at);
    }
}
