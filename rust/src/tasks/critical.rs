//! Critical native tasks: the Rust form of Python's `spawn(..., critical=True)`.
//!
//! Guarantees (see [`TaskRegistry::spawn_critical`](super::TaskRegistry::spawn_critical)):
//! - **A failure ends the service.** A critical task that returns an error
//!   or panics cancels the registry's token with
//!   [`ShutdownReason::Fatal`] naming the task and the error; one that
//!   returns `Ok(())` while the token has not fired cancels it too (a
//!   critical task is not supposed to end while the service runs).
//! - **Otherwise an ordinary task.** Its end is logged, counted and
//!   reported by its handle like any task's; a panic keeps unwinding (so it
//!   is counted as the panic it is). An abort is not a failure.
//! - **First reason wins.** Once the token has fired, a critical failure
//!   no longer changes the reason.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::{panic_message, TaskName};
use crate::shutdown::{ShutdownReason, ShutdownToken};

pin_project! {
    /// A critical task's future (see [`TaskRegistry::spawn_critical`]): the
    /// user's future, and the token it cancels when it fails, panics or
    /// returns early.
    pub(super) struct Critical<F> {
        #[pin]
        fut: F,
        token: ShutdownToken,
        name: TaskName,
    }
}

impl<F> Critical<F> {
    /// `fut`, which cancels `token` when it fails, panics or returns early.
    pub(super) fn new(fut: F, token: ShutdownToken, name: TaskName) -> Self {
        Self { fut, token, name }
    }
}

impl<F: Future<Output = anyhow::Result<()>>> Future for Critical<F> {
    type Output = anyhow::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let fut = this.fut;
        // A panicking future is never polled again (it is dropped), so it
        // cannot be seen in a broken state.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx)));
        let name = &*this.name;
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => {
                if !this.token.is_cancelled() {
                    let msg =
                        format!("critical task '{name}' returned while the service was running");
                    tracing::warn!(target: "dig_service::tasks", task = %name, "{msg}");
                    this.token.cancel(ShutdownReason::Fatal(msg));
                }
                Poll::Ready(Ok(()))
            }
            Ok(Poll::Ready(Err(e))) => {
                let msg = format!("critical task '{name}' failed: {e:#}");
                this.token.cancel(ShutdownReason::Fatal(msg));
                Poll::Ready(Err(e))
            }
            Err(payload) => {
                let msg = format!(
                    "critical task '{name}' panicked: {}",
                    panic_message(&*payload)
                );
                this.token.cancel(ShutdownReason::Fatal(msg));
                // Counted, logged and reported as the panic it is.
                std::panic::resume_unwind(payload)
            }
        }
    }
}
