//! Restart policies, and the restart logic of supervised tasks.
//!
//! [`RestartPolicy`] says when a supervised task is restarted, how fast, and
//! when it gives up. [`Supervision`] is that logic: a state machine told how
//! each incarnation of a task ended, which answers "restart, after this
//! delay" or "stop for good, because ...". It is the only place the policy
//! is interpreted: native supervised tasks (`supervise.rs`) and foreign ones
//! (the Python bindings) both ask it.
//!
//! Guarantees (SPEC 8):
//! - **Which ends restart.** [`Restart::Permanent`]: any end while the
//!   service runs; [`Restart::Transient`]: a failure only;
//!   [`Restart::Temporary`]: none. A cancelled incarnation and any end once
//!   the shutdown token has fired are never restarted.
//! - **Intensity.** A restart that would make more than `max_restarts`
//!   restarts within the last `within` gives up instead.
//! - **Backoff.** The k-th restart since the last reset waits
//!   `min(backoff * 2^k, max_backoff)` (k from 0), less up to half of it at
//!   random (jitter: the delay is drawn from `[base/2, base]`, so restarts
//!   of many tasks do not fall in step); an incarnation that lived longer
//!   than `within` resets k to 0.
//! - **Bounded memory.** At most `max_restarts` restart instants are kept.
//! - **Checked.** [`RestartPolicy::validate`] refuses a zero `within` and a
//!   `backoff` above `max_backoff`; a `Duration` cannot be negative or NaN
//!   (the Python `RestartPolicy`, which takes floats, checks that).

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Result, ServiceError};

/// When a supervised task is restarted (the Erlang/OTP restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Restart {
    /// Restarted whenever it ends (returns or fails) while the service runs.
    #[default]
    Permanent,
    /// Restarted only when it fails; returning ends it for good.
    Transient,
    /// Never restarted: supervision only names, counts and logs it.
    Temporary,
}

/// How a supervised task is restarted: which ends restart it
/// ([`Restart`]), how long it waits first (an exponential backoff with
/// jitter), and when it gives up (more than `max_restarts` restarts within
/// `within`).
///
/// `#[non_exhaustive]`: build it with [`RestartPolicy::new`] (or
/// `default()`) and the `with_*` methods, or set the fields of a default
/// value.
///
/// ```
/// use std::time::Duration;
/// use dig_service::{Restart, RestartPolicy};
///
/// let policy = RestartPolicy::new()
///     .with_restart(Restart::Transient)
///     .with_max_restarts(3)
///     .with_within(Duration::from_secs(10))
///     .with_backoff(Duration::from_millis(50));
/// assert!(policy.validate().is_ok());
/// assert!(policy.critical, "giving up ends the service by default");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Which ends are restarted. Default: [`Restart::Permanent`].
    pub restart: Restart,
    /// How many restarts `within` are allowed; one more gives up.
    /// Default: 5.
    pub max_restarts: u32,
    /// The intensity window; also, an incarnation that lived longer than
    /// this resets the backoff. Must not be zero. Default: 60 s.
    pub within: Duration,
    /// The delay before the first restart of a streak; it doubles with
    /// each restart after, up to `max_backoff`. Default: 100 ms.
    pub backoff: Duration,
    /// The longest delay before a restart. Default: 30 s.
    pub max_backoff: Duration,
    /// Whether giving up (or a failure that is not restarted) cancels the
    /// shutdown token with `ShutdownReason::Fatal`. Default: `true`.
    pub critical: bool,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            restart: Restart::Permanent,
            max_restarts: 5,
            within: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            critical: true,
        }
    }
}

impl RestartPolicy {
    /// The defaults (see the fields).
    pub fn new() -> Self {
        Self::default()
    }

    /// With [`restart`](Self::restart) set.
    pub fn with_restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// With [`max_restarts`](Self::max_restarts) set.
    pub fn with_max_restarts(mut self, max_restarts: u32) -> Self {
        self.max_restarts = max_restarts;
        self
    }

    /// With [`within`](Self::within) set.
    pub fn with_within(mut self, within: Duration) -> Self {
        self.within = within;
        self
    }

    /// With [`backoff`](Self::backoff) set.
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// With [`max_backoff`](Self::max_backoff) set.
    pub fn with_max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff;
        self
    }

    /// With [`critical`](Self::critical) set.
    pub fn with_critical(mut self, critical: bool) -> Self {
        self.critical = critical;
        self
    }

    /// Whether the policy can be applied.
    ///
    /// # Errors
    /// [`ServiceError::InvalidRestartPolicy`] naming the field: `within` is
    /// zero, or `backoff` is larger than `max_backoff`.
    pub fn validate(&self) -> Result<()> {
        if self.within.is_zero() {
            return Err(ServiceError::InvalidRestartPolicy(
                "`within` must be longer than zero".to_owned(),
            ));
        }
        if self.backoff > self.max_backoff {
            return Err(ServiceError::InvalidRestartPolicy(format!(
                "`backoff` ({:?}) must not be larger than `max_backoff` ({:?})",
                self.backoff, self.max_backoff
            )));
        }
        Ok(())
    }
}

/// How one incarnation of a supervised task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// It returned normally.
    Returned,
    /// It failed (an error, a panic, a factory that failed to make it).
    Failed,
    #[cfg_attr(not(feature = "python"), allow(dead_code))]
    /// It was cancelled (a foreign task cancelled by someone else, or its
    /// event loop tearing down): never restarted.
    Cancelled,
}

/// What [`Supervision::on_end`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Start a new incarnation after `delay`.
    Restart {
        /// The wait before the new incarnation.
        delay: Duration,
        /// Whether this restart begins a streak (the first since the
        /// backoff last reset): its cause is logged with a traceback.
        first_of_streak: bool,
    },
    /// Stop for good.
    Stop(Stop),
}

/// Why a supervised task stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Its last incarnation returned, and that end is not restarted
    /// (`Transient`, `Temporary`, or the token had fired).
    Returned,
    /// Its last incarnation failed, and that end is not restarted.
    Failed(NotRestarted),
    /// Restarting would have made more than `max_restarts` restarts within
    /// `within`: `restarts` restarts were made in the `span` before the
    /// last failure.
    GaveUp {
        /// The restarts within the window.
        restarts: usize,
        /// From the first of them to the end that gave up.
        span: Duration,
    },
    /// Its last incarnation was cancelled.
    Cancelled,
}

/// Why a failure was not restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRestarted {
    /// The policy is [`Restart::Temporary`].
    Temporary,
    /// The shutdown token had fired.
    ShuttingDown,
}

/// The restart logic of one supervised task (see the module docs).
#[derive(Debug)]
pub(crate) struct Supervision {
    policy: RestartPolicy,
    /// Restarts decided so far.
    restarts: u32,
    /// The instants of the restarts of the last `within`, oldest first; at
    /// most `max_restarts` of them.
    window: VecDeque<Instant>,
    /// Restarts since the backoff last reset.
    streak: u32,
    /// State of the jitter's generator (SplitMix64).
    rng: u64,
}

impl Supervision {
    /// The logic for `policy` (already validated).
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        // A random seed without a dependency: std's per-map random keys.
        let rng = RandomState::new().build_hasher().finish();
        Self {
            policy,
            restarts: 0,
            window: VecDeque::new(),
            streak: 0,
            rng,
        }
    }

    /// The policy.
    pub(crate) fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Restarts decided so far.
    pub(crate) fn restarts(&self) -> u32 {
        self.restarts
    }

    /// An incarnation that lived `lived` ended as `end` at `now`
    /// (`shutting_down`: the token has fired): restart it, or stop.
    pub(crate) fn on_end(
        &mut self,
        end: End,
        lived: Duration,
        now: Instant,
        shutting_down: bool,
    ) -> Step {
        if lived > self.policy.within {
            self.streak = 0;
        }
        let restart = match (end, self.policy.restart) {
            (End::Cancelled, _) => return Step::Stop(Stop::Cancelled),
            (_, Restart::Temporary) | (End::Returned, Restart::Transient) => false,
            (_, Restart::Permanent) | (End::Failed, Restart::Transient) => true,
        };
        if !restart || shutting_down {
            return Step::Stop(match end {
                End::Returned => Stop::Returned,
                _ if shutting_down => Stop::Failed(NotRestarted::ShuttingDown),
                _ => Stop::Failed(NotRestarted::Temporary),
            });
        }
        // Forget the restarts that left the window.
        while let Some(&at) = self.window.front() {
            if now.saturating_duration_since(at) >= self.policy.within {
                self.window.pop_front();
            } else {
                break;
            }
        }
        if self.window.len() >= self.policy.max_restarts as usize {
            let span = self.window.front().map_or(Duration::ZERO, |&first| {
                now.saturating_duration_since(first)
            });
            return Step::Stop(Stop::GaveUp {
                restarts: self.window.len(),
                span,
            });
        }
        self.window.push_back(now);
        self.restarts = self.restarts.saturating_add(1);
        let first_of_streak = self.streak == 0;
        let base = base_delay(&self.policy, self.streak);
        self.streak = self.streak.saturating_add(1);
        Step::Restart {
            delay: self.jitter(base),
            first_of_streak,
        }
    }

    /// A delay drawn uniformly from `[base/2, base]`.
    fn jitter(&mut self, base: Duration) -> Duration {
        let half = base / 2;
        let span = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        // SplitMix64 (Steele, Lea, Flood 2014): one add and two multiplies.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // `span * z / 2^64`: uniform in [0, span).
        let extra = ((u128::from(span) * u128::from(z)) >> 64) as u64;
        half + Duration::from_nanos(extra)
    }
}

/// The delay before the restart that follows `streak` restarts since the
/// last reset, before jitter: `min(backoff * 2^streak, max_backoff)`.
fn base_delay(policy: &RestartPolicy, streak: u32) -> Duration {
    let doubled = 1u32
        .checked_shl(streak)
        .map_or(policy.max_backoff, |factor| {
            policy.backoff.saturating_mul(factor)
        });
    doubled.min(policy.max_backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy::new()
            .with_max_restarts(3)
            .with_within(Duration::from_secs(10))
            .with_backoff(Duration::from_secs(1))
            .with_max_backoff(Duration::from_secs(5))
    }

    /// **Proves:** the delays double from `backoff`, stop at `max_backoff`,
    /// and each lies in `[base/2, base]`. **Catches:** a backoff that never
    /// grows, overshoots its cap, or whose jitter adds rather than takes off.
    #[test]
    fn delays_double_up_to_the_cap_with_jitter_below() {
        let p = policy()
            .with_max_restarts(u32::MAX)
            .with_within(Duration::from_secs(3600));
        let mut s = Supervision::new(p);
        let t0 = Instant::now();
        let bases = [1, 2, 4, 5, 5, 5];
        for (i, base) in bases.into_iter().enumerate() {
            let Step::Restart {
                delay,
                first_of_streak,
            } = s.on_end(End::Failed, Duration::ZERO, t0, false)
            else {
                panic!("restart {i} refused");
            };
            assert_eq!(first_of_streak, i == 0);
            let base = Duration::from_secs(base);
            assert!(delay >= base / 2 && delay <= base, "restart {i}: {delay:?}");
        }
        assert_eq!(s.restarts(), bases.len() as u32);
    }

    /// **Proves:** the base delay saturates instead of overflowing after
    /// many restarts. **Catches:** a shift or multiply that panics at 2^32.
    #[test]
    fn base_delay_saturates() {
        let p = RestartPolicy::new()
            .with_backoff(Duration::from_secs(1))
            .with_max_backoff(Duration::MAX);
        assert_eq!(base_delay(&p, 3), Duration::from_secs(8));
        assert_eq!(base_delay(&p, 40), Duration::MAX);
        let zero = RestartPolicy::new()
            .with_backoff(Duration::ZERO)
            .with_max_backoff(Duration::ZERO);
        assert_eq!(base_delay(&zero, 70), Duration::ZERO);
    }

    /// **Proves:** a restart that would be the (max+1)-th within `within`
    /// gives up, naming the restarts of the window and their span; restarts
    /// older than `within` no longer count. **Catches:** an off-by-one in
    /// the intensity, or a window that never forgets.
    #[test]
    fn intensity_gives_up_on_one_restart_too_many() {
        let mut s = Supervision::new(policy());
        let t0 = Instant::now();
        for i in 0..3 {
            let at = t0 + Duration::from_secs(i);
            assert!(matches!(
                s.on_end(End::Failed, Duration::ZERO, at, false),
                Step::Restart { .. }
            ));
        }
        // 4th within 10 s of the first: gives up.
        let at = t0 + Duration::from_secs(9);
        assert_eq!(
            s.on_end(End::Failed, Duration::ZERO, at, false),
            Step::Stop(Stop::GaveUp {
                restarts: 3,
                span: Duration::from_secs(9)
            })
        );
        // Had it come 10 s after the first, the first would have left.
        let mut s = Supervision::new(policy());
        for i in 0..3 {
            s.on_end(
                End::Failed,
                Duration::ZERO,
                t0 + Duration::from_secs(i),
                false,
            );
        }
        assert!(matches!(
            s.on_end(
                End::Failed,
                Duration::ZERO,
                t0 + Duration::from_secs(10),
                false
            ),
            Step::Restart { .. }
        ));
        assert!(s.window.len() <= 3);
    }

    /// **Proves:** `max_restarts == 0` gives up at the first end that would
    /// restart. **Catches:** one free restart.
    #[test]
    fn zero_restarts_gives_up_at_once() {
        let mut s = Supervision::new(policy().with_max_restarts(0));
        assert_eq!(
            s.on_end(End::Returned, Duration::ZERO, Instant::now(), false),
            Step::Stop(Stop::GaveUp {
                restarts: 0,
                span: Duration::ZERO
            })
        );
    }

    /// **Proves:** each restart type restarts exactly the ends SPEC 8 says,
    /// and nothing restarts once the token fired or after a cancel.
    /// **Catches:** a transient task restarted after returning, a
    /// temporary one restarted at all, a restart during shutdown.
    #[test]
    fn restart_types_and_shutdown() {
        let now = Instant::now();
        let z = Duration::ZERO;
        let step = |restart, end, fired| {
            Supervision::new(policy().with_restart(restart)).on_end(end, z, now, fired)
        };
        let restarts = |s: Step| matches!(s, Step::Restart { .. });
        assert!(restarts(step(Restart::Permanent, End::Returned, false)));
        assert!(restarts(step(Restart::Permanent, End::Failed, false)));
        assert!(restarts(step(Restart::Transient, End::Failed, false)));
        assert_eq!(
            step(Restart::Transient, End::Returned, false),
            Step::Stop(Stop::Returned)
        );
        assert_eq!(
            step(Restart::Temporary, End::Failed, false),
            Step::Stop(Stop::Failed(NotRestarted::Temporary))
        );
        assert_eq!(
            step(Restart::Permanent, End::Failed, true),
            Step::Stop(Stop::Failed(NotRestarted::ShuttingDown))
        );
        assert_eq!(
            step(Restart::Permanent, End::Returned, true),
            Step::Stop(Stop::Returned)
        );
        assert_eq!(
            step(Restart::Permanent, End::Cancelled, false),
            Step::Stop(Stop::Cancelled)
        );
    }

    /// **Proves:** an incarnation that lived longer than `within` resets the
    /// backoff (the next delay is `backoff` again, and its cause gets a
    /// traceback). **Catches:** a backoff that only ever grows.
    #[test]
    fn a_long_life_resets_the_backoff() {
        let mut s = Supervision::new(policy().with_max_restarts(100));
        let t0 = Instant::now();
        for _ in 0..3 {
            s.on_end(End::Failed, Duration::ZERO, t0, false);
        }
        let Step::Restart {
            delay,
            first_of_streak,
        } = s.on_end(End::Failed, Duration::from_secs(11), t0, false)
        else {
            panic!("refused")
        };
        assert!(first_of_streak);
        assert!(delay <= Duration::from_secs(1), "{delay:?}");
    }

    /// **Proves:** validation names the field at fault. **Catches:** a zero
    /// window or an inverted backoff accepted.
    #[test]
    fn validation_names_the_field() {
        assert!(RestartPolicy::default().validate().is_ok());
        let err = policy().with_within(Duration::ZERO).validate().unwrap_err();
        assert!(err.to_string().contains("`within`"), "{err}");
        let err = policy()
            .with_backoff(Duration::from_secs(6))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`backoff`"), "{err}");
    }
}
