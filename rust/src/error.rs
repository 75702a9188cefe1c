//! Service-level errors.
//!
//! Every fallible `Service` operation returns [`Result<T>`]. Errors are
//! `Clone` (hook errors are shared through `Arc`) so one failure can be
//! reported to `start()`'s caller and to every `wait_for_exit()` waiter.
//! A hook's own error is kept as the [`source`](std::error::Error::source),
//! never re-formatted into a new error. An error of `start()` that ended a
//! shutdown carries its [`ShutdownReport`] ([`ServiceError::report`]).

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::report::ShutdownReport;

/// The report a [`ServiceError`] variant carries: `None` until `start()`
/// attaches one (see [`ServiceError::report`]).
pub type Report = Option<Arc<ShutdownReport>>;

/// `Result<T, ServiceError>`.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// All failure modes of a `Service` and its `TaskRegistry`.
#[non_exhaustive]
#[derive(Error, Debug, Clone)]
pub enum ServiceError {
    /// `pre_start` failed; no later hook ran. The second field is the
    /// shutdown's report when a shutdown had been requested before
    /// `pre_start` ended (see [`ServiceError::report`]).
    #[error("pre_start failed: {0}")]
    PreStartFailed(#[source] Arc<anyhow::Error>, Report),

    /// `on_start` failed; `post_stop` ran, `run` and `on_stop` did not.
    #[error("on_start failed: {0}")]
    OnStartFailed(#[source] Arc<anyhow::Error>, Report),

    /// `run` failed (or panicked); tasks were joined and `on_stop` and
    /// `post_stop` still ran.
    #[error("run failed: {0}")]
    RunFailed(#[source] Arc<anyhow::Error>, Report),

    /// `on_stop` or `post_stop` failed; the later hook still ran.
    #[error("on_stop failed: {0}")]
    OnStopFailed(#[source] Arc<anyhow::Error>, Report),

    /// Tracked tasks (or `run`) were still live when the deadline passed;
    /// they were aborted (native) or cancelled (foreign) and are named here.
    ///
    /// The message names the first [`NAMES_SHOWN`] of them and says how
    /// many more there are (ten thousand names make no log line);
    /// `pending_names` has them all.
    #[error(
        "shutdown deadline of {deadline:?} exceeded; {pending} task(s) still running: {}",
        names_preview(pending_names)
    )]
    ShutdownDeadlineExceeded {
        /// The deadline that was exceeded (for `Service::start`, the
        /// service's `shutdown_deadline`: the whole budget).
        deadline: Duration,
        /// How many tasks were live when it passed.
        pending: usize,
        /// Their names, in spawn order.
        pending_names: Vec<String>,
        /// The shutdown's report, from `Service::start` (`None` from
        /// [`TaskRegistry::join_all`](crate::TaskRegistry::join_all)).
        report: Report,
    },

    /// `start()` was called on a service that has already been started.
    #[error("service has already been started; a Service is single-shot, build a new one")]
    AlreadyRunning,

    /// The registry was closed by `join_all`; nothing more can be spawned.
    #[error("task registry is closed (join_all has finished); no more tasks can be spawned")]
    AlreadyStopped,

    /// The named operation needs a tokio runtime and was called (or
    /// polled) outside one.
    #[error(
        "{0} was called outside a tokio runtime; call it from a task on a runtime, \
         or name one (TaskRegistry::spawn_on takes a runtime handle)"
    )]
    NoRuntime(&'static str),

    /// The tokio runtime the task was spawned on has shut down: the task
    /// was dropped without ever running, and was not tracked.
    #[error("the tokio runtime has shut down; the task was not started")]
    RuntimeShutDown,

    /// The service's configuration is inconsistent (the message names the
    /// knob, e.g. a `stop_reserve` larger than the `shutdown_deadline`);
    /// `start()` refused to start.
    #[error("{0}")]
    InvalidConfig(String),

    /// The service's lifecycle was cut short before it finished: its tokio
    /// runtime shut down under it (or the lifecycle task itself panicked).
    /// The token was cancelled, every task stopped and the registry closed;
    /// `on_stop` and `post_stop` did not run (there was no runtime left to
    /// run them on).
    #[error("the service's lifecycle was cut short ({0}); its tasks were stopped and its registry closed, on_stop and post_stop did not run")]
    LifecycleAborted(&'static str),

    /// A [`RestartPolicy`](crate::RestartPolicy) that cannot be applied
    /// (see [`RestartPolicy::validate`](crate::RestartPolicy::validate)).
    #[error("invalid RestartPolicy: {0}")]
    InvalidRestartPolicy(String),
}

impl ServiceError {
    /// The report of the shutdown this error ended, when `Service::start`
    /// (or `wait_for_exit`) returned it after a shutdown began: always for
    /// `OnStartFailed`, `RunFailed`, `OnStopFailed` and the service's
    /// `ShutdownDeadlineExceeded`; for `PreStartFailed` only when a
    /// shutdown had been requested before `pre_start` ended (a `pre_start`
    /// that fails by itself shuts nothing down). `None` for every other
    /// error.
    pub fn report(&self) -> Option<&ShutdownReport> {
        match self {
            Self::PreStartFailed(_, report)
            | Self::OnStartFailed(_, report)
            | Self::RunFailed(_, report)
            | Self::OnStopFailed(_, report)
            | Self::ShutdownDeadlineExceeded { report, .. } => report.as_deref(),
            _ => None,
        }
    }

    /// `self` with `report` attached (a no-op for a variant that carries
    /// none).
    pub(crate) fn with_report(mut self, new: &Arc<ShutdownReport>) -> Self {
        match &mut self {
            Self::PreStartFailed(_, report)
            | Self::OnStartFailed(_, report)
            | Self::RunFailed(_, report)
            | Self::OnStopFailed(_, report)
            | Self::ShutdownDeadlineExceeded { report, .. } => *report = Some(new.clone()),
            _ => {}
        }
        self
    }
}

/// How many straggler names a [`ServiceError::ShutdownDeadlineExceeded`]
/// message (and the deadline's log line) shows.
pub const NAMES_SHOWN: usize = 5;

/// `a, b, c, d, e and 9995 more`: the first [`NAMES_SHOWN`] names.
pub(crate) fn names_preview(names: &[String]) -> String {
    let shown = names.len().min(NAMES_SHOWN);
    let mut out = names[..shown].join(", ");
    if names.len() > shown {
        out.push_str(&format!(" and {} more", names.len() - shown));
    }
    out
}

/// A lifecycle hook ran longer than `ServiceConfig::hook_timeout`.
///
/// Carried as the source of the hook's `ServiceError`.
#[derive(Error, Debug, Clone)]
#[error("hook `{hook}` did not finish within {after:?}")]
pub struct HookTimeout {
    /// The hook's name (`pre_start`, `on_start`, ...).
    pub hook: &'static str,
    /// The timeout that elapsed.
    pub after: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// **Proves:** the deadline error names at most [`NAMES_SHOWN`]
    /// stragglers and counts the rest, while `pending_names` keeps them all.
    /// **Catches:** a message that joins every name (10k stragglers made a
    /// 363 KB line).
    #[test]
    fn deadline_message_names_the_first_few() {
        let names: Vec<String> = (0..10_000).map(|i| format!("peer-{i}")).collect();
        let err = ServiceError::ShutdownDeadlineExceeded {
            deadline: Duration::from_secs(1),
            pending: names.len(),
            pending_names: names.clone(),
            report: None,
        };
        let msg = err.to_string();
        assert_eq!(
            msg,
            "shutdown deadline of 1s exceeded; 10000 task(s) still running: \
             peer-0, peer-1, peer-2, peer-3, peer-4 and 9995 more"
        );
        let few = ServiceError::ShutdownDeadlineExceeded {
            deadline: Duration::from_secs(1),
            pending: 2,
            pending_names: names[..2].to_vec(),
            report: None,
        };
        assert!(
            few.to_string().ends_with("running: peer-0, peer-1"),
            "{few}"
        );
        let ServiceError::ShutdownDeadlineExceeded { pending_names, .. } = err else {
            unreachable!()
        };
        assert_eq!(pending_names.len(), 10_000);
    }
}
