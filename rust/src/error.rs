//! Service-level errors.
//!
//! Every fallible `Service` operation returns [`Result<T>`]. Errors are
//! `Clone` (hook errors are shared through `Arc`) so one failure can be
//! reported to `start()`'s caller and to every `wait_for_exit()` waiter.
//! A hook's own error is kept as the [`source`](std::error::Error::source),
//! never re-formatted into a new error.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

/// `Result<T, ServiceError>`.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// All failure modes of a `Service` and its `TaskRegistry`.
#[non_exhaustive]
#[derive(Error, Debug, Clone)]
pub enum ServiceError {
    /// `pre_start` failed; no later hook ran.
    #[error("pre_start failed: {0}")]
    PreStartFailed(#[source] Arc<anyhow::Error>),

    /// `on_start` failed; `post_stop` ran, `run` and `on_stop` did not.
    #[error("on_start failed: {0}")]
    OnStartFailed(#[source] Arc<anyhow::Error>),

    /// `run` failed (or panicked); tasks were joined and `on_stop` and
    /// `post_stop` still ran.
    #[error("run failed: {0}")]
    RunFailed(#[source] Arc<anyhow::Error>),

    /// `on_stop` or `post_stop` failed; the later hook still ran.
    #[error("on_stop failed: {0}")]
    OnStopFailed(#[source] Arc<anyhow::Error>),

    /// Tracked tasks were still live when the deadline passed; they were
    /// aborted (native) or cancelled (foreign) and are named here.
    #[error(
        "shutdown deadline of {deadline:?} exceeded; {pending} task(s) still running: {}",
        pending_names.join(", ")
    )]
    ShutdownDeadlineExceeded {
        /// The deadline that was exceeded.
        deadline: Duration,
        /// How many tasks were live when it passed.
        pending: usize,
        /// Their names, in spawn order.
        pending_names: Vec<String>,
    },

    /// `start()` was called on a service that has already been started.
    #[error("service has already been started; a Service is single-shot, build a new one")]
    AlreadyRunning,

    /// The registry was closed by `join_all`; nothing more can be spawned.
    #[error("task registry is closed (join_all has finished); no more tasks can be spawned")]
    AlreadyStopped,
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
