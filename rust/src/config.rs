//! [`ServiceConfig`]: the timing limits of a `Service`.
//!
//! Guarantees:
//! - **Open to new knobs.** `#[non_exhaustive]`: a knob added later breaks
//!   no caller that builds it with [`ServiceConfig::new`] and the `with_*`
//!   methods (or sets the fields of a default value).
//! - **Plain data.** Nothing to validate: a [`Duration`] cannot be negative
//!   or NaN (the Python `ServiceConfig`, which takes floats, checks that).

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
///     .with_hook_timeout(Some(Duration::from_secs(2)));
/// assert_eq!(config.shutdown_deadline, Duration::from_secs(10));
///
/// let mut config = ServiceConfig::default();
/// config.hook_timeout = Some(Duration::from_secs(5));
/// ```
#[non_exhaustive]
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
    /// hook's failure, with a [`HookTimeout`](crate::HookTimeout) source. Default: `None` (only
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

impl ServiceConfig {
    /// The defaults: a 30 s shutdown deadline, no hook timeout.
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
}
