//! How a service ended.
//!
//! [`ExitStatus`] is what `Service::start` returns when the lifecycle ran to
//! its end without a [`ServiceError`](crate::ServiceError). Guarantees:
//!
//! - **One classification.** [`ExitStatus::is_graceful`] is `false` exactly
//!   for [`ExitReason::RunError`] and for a requested shutdown whose reason
//!   is [`ShutdownReason::Fatal`]; [`ExitStatus::exit_code`] is derived from
//!   it (0 or 1) so binaries and orchestrators never disagree.
//! - **The original error.** [`ExitReason::RunError`] holds the very
//!   `anyhow::Error` `run` returned, behind an `Arc` shared with
//!   [`ServiceError::RunFailed`](crate::ServiceError::RunFailed): nothing is
//!   re-formatted, the source chain and backtrace survive.

use std::fmt;
use std::sync::Arc;

use crate::report::ShutdownReport;
use crate::shutdown::ShutdownReason;

/// Why a service's lifecycle ended.
#[derive(Clone, Debug)]
pub enum ExitReason {
    /// The shutdown token fired (from outside `run`, or by `run` itself
    /// cancelling it) and `run` returned; carries the token's reason.
    RequestedShutdown(ShutdownReason),
    /// `run` returned `Ok(())` while the token had not fired. The service
    /// then cancels the token with [`ShutdownReason::RequestedByRun`] so
    /// the background tasks wind down.
    RunCompleted,
    /// `run` returned an error (or panicked). The `Arc` is the one inside
    /// [`ServiceError::RunFailed`](crate::ServiceError::RunFailed).
    ///
    /// Also handed to `post_stop` through `StopContext::exit_reason` when
    /// `on_start` failed, carrying the `on_start` error.
    RunError(Arc<anyhow::Error>),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RequestedShutdown(reason) => write!(f, "shutdown requested ({reason})"),
            Self::RunCompleted => f.write_str("run completed"),
            Self::RunError(e) => write!(f, "run failed: {e:#}"),
        }
    }
}

/// The final status of a service whose lifecycle ran to its end.
#[derive(Clone, Debug)]
pub struct ExitStatus {
    /// Why the service exited.
    pub reason: ExitReason,
    /// The shutdown's report (`start()` always attaches one).
    report: Option<Arc<ShutdownReport>>,
}

impl ExitStatus {
    /// A status with no report.
    pub fn new(reason: ExitReason) -> Self {
        Self {
            reason,
            report: None,
        }
    }

    /// `self` with `report` attached.
    pub fn with_report(mut self, report: Arc<ShutdownReport>) -> Self {
        self.report = Some(report);
        self
    }

    /// The report of the shutdown that ended the service: its reason,
    /// total time, each stage and every straggler. `Service::start` always
    /// attaches one (a status returned by `start()` follows a shutdown).
    pub fn report(&self) -> Option<&ShutdownReport> {
        self.report.as_deref()
    }

    /// Whether the exit was graceful: `false` iff the reason is
    /// [`ExitReason::RunError`] or
    /// [`ExitReason::RequestedShutdown`]`(`[`ShutdownReason::Fatal`]`)`.
    pub fn is_graceful(&self) -> bool {
        !matches!(
            self.reason,
            ExitReason::RunError(_) | ExitReason::RequestedShutdown(ShutdownReason::Fatal(_))
        )
    }

    /// The process exit code for this status: `0` if graceful, else `1`.
    pub fn exit_code(&self) -> i32 {
        if self.is_graceful() {
            0
        } else {
            1
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (exit code {})", self.reason, self.exit_code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reason: ExitReason) -> ExitStatus {
        ExitStatus::new(reason)
    }

    /// **Proves:** `is_graceful` / `exit_code` classify every reason: only
    /// `RunError` and `RequestedShutdown(Fatal)` are failures (code 1).
    ///
    /// **Why it matters:** the exit code drives systemd / k8s restart
    /// policy; a clean stop reported as a failure causes restart loops, a
    /// failure reported as clean hides crashes.
    ///
    /// **Catches:** swapped match arms, or a new `ShutdownReason` variant
    /// silently classified as a failure.
    #[test]
    fn graceful_classification_and_exit_codes() {
        use ShutdownReason::*;
        for reason in [UserRequested, RpcRequested, ReloadRequested, RequestedByRun] {
            let s = status(ExitReason::RequestedShutdown(reason.clone()));
            assert!(s.is_graceful(), "{reason:?}");
            assert_eq!(s.exit_code(), 0);
        }
        let s = status(ExitReason::RunCompleted);
        assert!(s.is_graceful());
        assert_eq!(s.exit_code(), 0);

        let s = status(ExitReason::RequestedShutdown(Fatal("disk gone".into())));
        assert!(!s.is_graceful());
        assert_eq!(s.exit_code(), 1);

        let s = status(ExitReason::RunError(Arc::new(anyhow::anyhow!("boom"))));
        assert!(!s.is_graceful());
        assert_eq!(s.exit_code(), 1);
    }

    /// **Proves:** a cloned `RunError` status shares the error `Arc`.
    ///
    /// **Why it matters:** one failure fans out to `start()` and to every
    /// `wait_for_exit()` waiter; they must all see the same error object.
    ///
    /// **Catches:** a `Clone` that re-creates the error (losing its chain).
    #[test]
    fn clone_shares_the_error() {
        let err = Arc::new(anyhow::anyhow!("boom"));
        let s = status(ExitReason::RunError(err.clone()));
        let ExitReason::RunError(cloned) = s.clone().reason else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(&err, &cloned));
        assert_eq!(s.to_string(), "run failed: boom (exit code 1)");
    }
}
