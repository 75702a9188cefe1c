//! Spawn times, from a clock cheap enough to read on every spawn.
//!
//! A [`Stamp`] is nanoseconds on the monotonic clock. On Linux it is read
//! from the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: the
//! time of the last scheduler tick, typically 1–4 ms old, read without the
//! timestamp counter, which on a virtual machine makes `Instant::now` cost
//! tens of nanoseconds). Elsewhere it is `Instant::now`. [`Epoch`] turns
//! stamps back into [`Instant`]s when someone looks.
//!
//! Guarantees:
//! - **Never late.** A stamp is at most one clock tick early, never later
//!   than the moment it was read.
//! - **Ordered by the registry.** Stamps are plain numbers; the registry
//!   moves each new one past the previous (`State::insert`), so within a
//!   registry they are unique and in spawn order.

use std::time::{Duration, Instant};

/// Nanoseconds on the monotonic clock, at most one clock tick early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(u64);

impl Stamp {
    /// Now, on the coarse clock.
    pub(super) fn now() -> Self {
        Self(sys::coarse_ns())
    }

    /// The next stamp after `self`: gives tasks spawned within one clock
    /// tick distinct stamps, in spawn order.
    pub(super) fn successor(self) -> Self {
        Self(self.0 + 1)
    }
}

/// One instant read on both clocks, to convert stamps to [`Instant`]s.
pub(super) struct Epoch {
    instant: Instant,
    ns: u64,
}

impl Epoch {
    pub(super) fn now() -> Self {
        let instant = Instant::now();
        Self {
            instant,
            ns: sys::precise_ns(instant),
        }
    }

    /// The instant of `stamp`.
    pub(super) fn instant_of(&self, stamp: Stamp) -> Instant {
        let ago = Duration::from_nanos(self.ns.saturating_sub(stamp.0));
        self.instant.checked_sub(ago).unwrap_or(self.instant)
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::time::Instant;

    fn read(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; both clocks exist on
        // every Linux since 2.6.32, and on failure `ts` stays zero.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    pub(super) fn coarse_ns() -> u64 {
        read(libc::CLOCK_MONOTONIC_COARSE)
    }

    /// `CLOCK_MONOTONIC`, the clock behind `Instant` on Linux, read right
    /// after `_instant`.
    pub(super) fn precise_ns(_instant: Instant) -> u64 {
        read(libc::CLOCK_MONOTONIC)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::sync::OnceLock;
    use std::time::Instant;

    static BASE: OnceLock<Instant> = OnceLock::new();

    fn since_base(t: Instant) -> u64 {
        let base = *BASE.get_or_init(Instant::now);
        u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn coarse_ns() -> u64 {
        since_base(Instant::now())
    }

    pub(super) fn precise_ns(instant: Instant) -> u64 {
        since_base(instant)
    }
}

#[cfg(test)]
mod tests {
    use super::{Epoch, Stamp};
    use std::time::{Duration, Instant};

    #[test]
    fn a_stamp_converts_to_the_instant_it_was_taken_within_a_tick() {
        // Catches a wrong clock or unit: the converted instant must land
        // within one coarse tick (<= 10 ms on any kernel config) of the
        // precise clock read beside it.
        let before = Instant::now();
        let stamp = Stamp::now();
        let after = Instant::now();
        let at = Epoch::now().instant_of(stamp);
        assert!(at <= after, "{at:?} is after {after:?}");
        assert!(
            before.saturating_duration_since(at) <= Duration::from_millis(10),
            "{at:?} is more than a tick before {before:?}"
        );
    }

    #[test]
    fn stamps_never_go_backwards() {
        // Catches a non-monotonic clock, which would misorder stragglers.
        let mut last = Stamp::now();
        for _ in 0..10_000 {
            let s = Stamp::now();
            assert!(s >= last);
            last = s;
        }
    }
}
