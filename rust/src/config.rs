//! [`ServiceConfig`]: the timing limits of a `Service`.
//!
//! Guarantees:
//! - **Open to new knobs.** `#[non_exhaustive]`: a knob added later breaks
//!   no caller that builds it with [`ServiceConfig::new`] and the `with_*`
//!   methods (or sets the fields of a default value).
//! - **One budget.** [`ServiceConfig::shutdown_deadline`] is the whole
//!   time a shutdown may take, from the token firing until `start()`
//!   returns; [`ServiceConfig::stop_reserve`] is the part of it kept for
//!   the stop hooks. A [`Duration`] cannot be negative or NaN; the one
//!   thing to check, a reserve larger than the deadline, is checked by
//!   [`ServiceConfig::validate`] (which `Service::start` calls first).

use std::time::Duration;

/// Timing knobs of a [`Service`](crate::Service).
///
/// `#[non_exhaustive]`, so that knobs can be added without breaking
/// anyone: build it with [`ServiceConfig::new`] (or `default()`) and the
/// `with_*` methods, or set the public fields of a default value.
///
/// ```
/// use std::time::Duration;
/// use dig_service::ServiceConfig;
///
/// let config = ServiceConfig::new()
///     .with_shutdown_deadline(Duration::from_secs(10))
///     .with_stop_reserve(Duration::from_secs(3))
///     .with_hook_timeout(Some(Duration::from_secs(2)));
/// assert_eq!(config.shutdown_deadline, Duration::from_secs(10));
/// assert_eq!(config.effective_stop_reserve(), Duration::from_secs(3));
///
/// // The default reserve: min(5 s, shutdown_deadline / 4).
/// let config = ServiceConfig::new().with_shutdown_deadline(Duration::from_secs(8));
/// assert_eq!(config.effective_stop_reserve(), Duration::from_secs(2));
///
/// let mut config = ServiceConfig::default();
/// config.hook_timeout = Some(Duration::from_secs(5));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The total budget of a shutdown: from the token firing until
    /// `start()` returns, whatever the node does. `run` and the join of
    /// the tracked tasks share `shutdown_deadline - stop_reserve`
    /// (stragglers are aborted, `run` is dropped); `on_stop` and
    /// `post_stop` get what is left, never less than the reserve (a hook
    /// past it is dropped and reported as timed out). Default: 30 s.
    pub shutdown_deadline: Duration,
    /// How long each edge hook (`pre_start`, `on_start`, `on_stop`,
    /// `post_stop`) may take, from the moment it starts. `run` is not
    /// bounded by it. A hook that overruns is dropped and reported as that
    /// hook's failure, with a [`HookTimeout`](crate::HookTimeout) source.
    /// Default: `None` (only the shutdown budget applies).
    pub hook_timeout: Option<Duration>,
    /// The part of [`shutdown_deadline`](Self::shutdown_deadline) kept for
    /// `on_stop` and `post_stop`, so that stragglers cannot eat the time a
    /// flush needs. `None` (the default): `min(5 s, shutdown_deadline / 4)`.
    /// Must not exceed `shutdown_deadline` ([`validate`](Self::validate)).
    pub stop_reserve: Option<Duration>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            shutdown_deadline: Duration::from_secs(30),
            hook_timeout: None,
            stop_reserve: None,
        }
    }
}

impl ServiceConfig {
    /// The defaults: a 30 s shutdown budget with the default reserve, no
    /// hook timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// With [`shutdown_deadline`](Self::shutdown_deadline) set.
    pub fn with_shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// With [`hook_timeout`](Self::hook_timeout) set (`None`: none).
    pub fn with_hook_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.hook_timeout = timeout;
        self
    }

    /// With [`stop_reserve`](Self::stop_reserve) set.
    pub fn with_stop_reserve(mut self, reserve: Duration) -> Self {
        self.stop_reserve = Some(reserve);
        self
    }

    /// The reserve in force: [`stop_reserve`](Self::stop_reserve), or
    /// `min(5 s, shutdown_deadline / 4)` when it is `None`.
    pub fn effective_stop_reserve(&self) -> Duration {
        self.stop_reserve
            .unwrap_or_else(|| (self.shutdown_deadline / 4).min(Duration::from_secs(5)))
    }

    /// Check the knobs against each other: a `stop_reserve` larger than
    /// `shutdown_deadline` is an error naming both.
    ///
    /// # Errors
    /// [`ServiceError::InvalidConfig`](crate::ServiceError::InvalidConfig).
    pub fn validate(&self) -> crate::Result<()> {
        match self.stop_reserve {
            Some(reserve) if reserve > self.shutdown_deadline => {
                Err(crate::ServiceError::InvalidConfig(format!(
                    "ServiceConfig: `stop_reserve` ({reserve:?}) must not exceed \
                     `shutdown_deadline` ({:?}): the reserve is the part of the \
                     shutdown budget kept for on_stop and post_stop",
                    self.shutdown_deadline
                )))
            }
            _ => Ok(()),
        }
    }
}
