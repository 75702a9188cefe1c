//! Deferred reaping: how an ended native task leaves the registry's slab.
//!
//! A native task usually ends on another worker thread than the one that
//! spawned it. Its end is counted at once (the live count drops, and the
//! task leaves every snapshot and straggler list), but its slab entry is
//! removed later, in a batch: the ending task sets its slot's bit in
//! [`EndedBits`], without a lock, and [`Inner::reap`] removes the entries
//! of every set bit under the state lock. A task that ends any other way
//! than by returning `Ok(())` (an error, a panic, an abort), or once the
//! registry is stopping, leaves at once under the state lock instead
//! ([`Inner::finish_at_once`]): those ends are rare, and they are counted.
//!
//! Guarantees:
//! - **Exact counts.** The live count is exact at every moment. Failures,
//!   cancellations and aborts are counted under the state lock, before the
//!   task leaves the live count; a completion is not counted at all:
//!   `completed` is what is left of `spawned` (see `TaskRegistry::stats`),
//!   so every task counts once, and a completion costs no counter.
//! - **Bounded memory.** The slab stays within [`REAP_AT`] slots of the peak
//!   live count while tasks are spawned, and at most [`REAP_AT_THREAD`]
//!   ended tasks wait while nothing spawns; everything is reaped when the
//!   registry empties.
//! - **No reader sees an ended task.** Every reader of the slab (snapshot,
//!   close, stop) reaps first, under the state lock.
//! - **A straggler counts as aborted.** A task named by the deadline counts
//!   `Aborted` whatever it ends with: if it ends by returning, its reap
//!   counts it so; any other end counts it so at once.
//!
//! # Memory ordering
//!
//! A completing task sets its bit, then moves itself from the live count
//! to the waiting count in one read-modify-write of `Inner::counts`. The
//! bit is set first, so the task that empties the registry finds every
//! other task's bit set (each was set before that task's own counter
//! update, which the last one's update reads). The waiting count is an
//! estimate for deciding when to reap: a reap may subtract a bit whose
//! task has not added itself yet (the high half then wraps for a moment,
//! which the low half never sees), and the next reap decision is only
//! moved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::Waker;

use super::types::BUCKETS;
use super::{Control, Entry, Inner, State, TaskKind, TaskName, TaskOrigin, TaskOutcome};

/// The live count: the low half of `Inner::counts`.
pub(super) const LIVE: u64 = 0xffff_ffff;
/// One ended native task waiting to be reaped: the high half of
/// `Inner::counts`.
pub(super) const WAITING_ONE: u64 = 1 << 32;
/// Added to `Inner::counts` (wrapping): one live task fewer.
pub(super) const LEAVE: u64 = u64::MAX;
/// Added to `Inner::counts`: one live task fewer, one more waiting.
pub(super) const LEAVE_TO_WAITING: u64 = WAITING_ONE - 1;

/// Counts of ended tasks that did not complete: failures by kind and
/// origin (for `stats_by_kind`; the total is their sum), cancellations and
/// aborts. Completions are `spawned` minus every other count and the live.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Outcomes {
    pub(super) failed: [u64; BUCKETS],
    pub(super) cancelled: u64,
    pub(super) aborted: u64,
}

impl Outcomes {
    /// Count one task ended as `outcome` (a completion is not counted: see
    /// the module doc); `bucket` (see `types::bucket`) is read for a
    /// failure only.
    #[inline]
    pub(super) fn count(&mut self, outcome: TaskOutcome, bucket: usize) {
        match outcome {
            TaskOutcome::Completed => {}
            TaskOutcome::Failed => self.failed[bucket] += 1,
            TaskOutcome::Cancelled => self.cancelled += 1,
            TaskOutcome::Aborted => self.aborted += 1,
        }
    }
}

/// A spawner that finds no free slot reaps instead of growing the slab if
/// at least this many ended tasks wait: every reap is then a batch (a reap
/// every few spawns costs more than the slots it frees: it scans the bits
/// and pulls the ended tasks' lines over), and the slab stays within this
/// many slots of the peak live count.
pub(super) const REAP_AT: usize = 1024;

/// A task whose end makes this many ended tasks wait reaps, if the state
/// lock is free: bounds the memory ended tasks keep when nothing spawns.
/// Higher than [`REAP_AT`] so that while tasks are being spawned the
/// spawner reaps, touching the slots it wrote itself; a reap by an ending
/// thread holds the lock while it pulls every slot over from the
/// spawner's cache, and the spawner waits.
pub(super) const REAP_AT_THREAD: usize = 8 * REAP_AT;

/// Slots `[0, 2^SEG0_BITS)` are segment 0; segment `i >= 1` holds slots
/// `[2^(SEG0_BITS + i - 1), 2^(SEG0_BITS + i))`.
const SEG0_BITS: u32 = 12;
/// Enough segments for every `u32` slot.
const SEGMENTS: usize = 33 - SEG0_BITS as usize;

/// One bit per slab slot, set by a native task that has completed: its
/// entry waits to be reaped.
///
/// In segments that double in size, so that the bits of a slot never move
/// and are reached without a lock as the slab grows: a segment is made
/// (under the state lock) before any slot in it is handed out, and is
/// never freed before the registry.
///
/// Invariant: a set bit names a slot that holds the entry of the native
/// task that set it (only a reap clears a bit, and only a reap removes the
/// entry of a task whose bit was set).
pub(super) struct EndedBits {
    segments: [OnceLock<Box<[AtomicU64]>>; SEGMENTS],
}

impl Default for EndedBits {
    fn default() -> Self {
        Self {
            segments: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// The first slot of segment `seg`.
fn seg_base(seg: usize) -> u64 {
    if seg == 0 {
        0
    } else {
        1 << (SEG0_BITS as usize + seg - 1)
    }
}

/// The segment of `slot`, and the slot's bit within it.
#[inline]
fn locate(slot: u32) -> (usize, usize) {
    let high = slot >> SEG0_BITS;
    if high == 0 {
        (0, slot as usize)
    } else {
        let seg = (u32::BITS - high.leading_zeros()) as usize;
        (seg, (u64::from(slot) - seg_base(seg)) as usize)
    }
}

impl EndedBits {
    /// Make the segments up to the one that holds `slot`; return the first
    /// slot past the last segment made.
    #[cold]
    pub(super) fn cover(&self, slot: u32) -> u64 {
        let (last, _) = locate(slot);
        for seg in 0..=last {
            self.segments[seg].get_or_init(|| {
                let bits = seg_base(seg + 1) - seg_base(seg);
                (0..bits / 64).map(|_| AtomicU64::new(0)).collect()
            });
        }
        seg_base(last + 1)
    }

    /// Set `slot`'s bit; `false` if its segment was never made (never the
    /// case for a slot the slab handed out, see `TaskRegistry::insert_entry`).
    #[inline]
    fn set(&self, slot: u32) -> bool {
        let (seg, bit) = locate(slot);
        match self.segments[seg].get() {
            Some(words) => {
                // SeqCst, paired with `close_and_stop_all`: see
                // `Inner::finish_native`.
                words[bit / 64].fetch_or(1 << (bit % 64), Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Clear every set bit, and call `each` with its slot.
    fn take_all(&self, mut each: impl FnMut(u32)) {
        for (seg, words) in self.segments.iter().enumerate() {
            let Some(words) = words.get() else { break };
            let base = seg_base(seg);
            for (i, word) in words.iter().enumerate() {
                // SeqCst, as the swap: `close_and_stop_all` must see every
                // bit set before its store of the stop flag (a plain load
                // on x86, as Acquire would be).
                if word.load(Ordering::SeqCst) == 0 {
                    continue;
                }
                let mut bits = word.swap(0, Ordering::SeqCst);
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    // Within `u32`: segments cover the `u32` slots exactly.
                    each((base + i as u64 * 64 + bit) as u32);
                }
            }
        }
    }
}

impl Inner {
    /// Remove the entries of every ended native task from the slab. Their
    /// stored wakers are handed back, to be dropped outside the lock.
    pub(super) fn reap(&self, st: &mut State) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let mut reaped = 0u64;
        let State { entries, ended, .. } = st;
        self.ended.take_all(|slot| {
            reaped += 1;
            let waker = entries.discard_at(slot, |e| match &mut e.control {
                Control::Native(w) => w.take(),
                // Named by the deadline, then returned: counted aborted,
                // as every straggler.
                Control::Straggler => {
                    ended.aborted += 1;
                    None
                }
                Control::Foreign(_) => None,
            });
            wakers.extend(waker.flatten());
        });
        if reaped > 0 {
            // Relaxed: the waiting count publishes nothing (see the module
            // doc); wrapping, as a task may be reaped before it adds itself.
            self.counts
                .fetch_sub(reaped * WAITING_ONE, Ordering::Relaxed);
        }
        wakers
    }

    /// Reap now, under the state lock.
    #[cold]
    #[inline(never)]
    fn reap_now(&self) {
        let mut st = self.state.lock();
        let wakers = self.reap(&mut st);
        drop(st);
        drop(wakers);
    }

    /// Record the end of the native task in `slot`; hand back its name if
    /// the task failed, for the log.
    #[inline]
    pub(super) fn finish_native(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        if outcome != TaskOutcome::Completed || !self.ended.set(slot) {
            return self.finish_at_once(slot, outcome);
        }
        // SeqCst, as the bit's `fetch_or` above and, in
        // `close_and_stop_all`, the store of the flag (under the state
        // lock) and the loads and swaps of its reap: in their single total
        // order, either the flag's store comes after the bit was set (then
        // that reap takes the bit: the task is not named), or this load
        // reads `true` (then the bit may have been set too late for that
        // reap, and the entry may be named a straggler; the reap here
        // removes it at once, counted aborted if it was named).
        if self.stopping.load(Ordering::SeqCst) {
            self.reap_now();
        }
        // From the live count to the waiting count, in one step.
        let before = self.leave(LEAVE_TO_WAITING);
        if before & LIVE == 1 {
            // Reaps, and wakes the joiners.
            self.now_idle();
        } else if (before >> 32) + 1 >= REAP_AT_THREAD as u64 {
            // Bounds the ended tasks kept while nothing spawns.
            if let Some(mut st) = self.state.try_lock() {
                let wakers = self.reap(&mut st);
                drop(st);
                drop(wakers);
            }
        }
        None
    }

    /// The end of a native task that did not complete, or that ended once
    /// the registry is stopping: its entry leaves at once, and a task named
    /// as a straggler counts as aborted whatever `outcome` it ended with, so
    /// that the stats agree with the deadline's report. Hands back its name
    /// if it failed, for the log.
    #[cold]
    #[inline(never)]
    fn finish_at_once(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        let (entry, last) = {
            let mut st = self.state.lock();
            let entry = st.entries.remove_at(slot);
            let counted = match entry {
                Some(Entry {
                    control: Control::Straggler,
                    ..
                }) => TaskOutcome::Aborted,
                _ => outcome,
            };
            let bucket = entry.as_ref().map_or(0, Entry::bucket);
            st.ended.count(counted, bucket);
            // Under the state lock, so that `stats` never sees the outcome
            // counted while the task is still live.
            (entry, self.leave(LEAVE) & LIVE == 1)
        };
        let name = match (&entry, outcome) {
            (Some(e), TaskOutcome::Failed) => Some(e.name.clone()),
            _ => None,
        };
        // Its waker, if any, is dropped outside the lock.
        drop(entry);
        if last {
            self.now_idle();
        }
        name
    }

    /// Take back the counts of a task that a shut-down runtime dropped
    /// inside `spawn` (see `TaskRegistry::spawn_with`): `spawn` refuses it,
    /// so it was never accepted, but `insert_entry` counted it spawned and
    /// its drop, on this thread, counted it aborted (`finish_at_once`).
    #[cold]
    pub(super) fn uncount_refused(&self, kind: TaskKind) {
        let mut st = self.state.lock();
        st.spawned[super::types::bucket(kind, TaskOrigin::Native)] -= 1;
        st.ended.aborted -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::{locate, seg_base, EndedBits, SEGMENTS};

    #[test]
    fn every_slot_has_one_bit_and_segments_tile_the_u32_slots() {
        // Proves the segment arithmetic: consecutive slots map to
        // consecutive bits, each segment starts where the previous one
        // ends, and the last one ends at 2^32. Catches an off-by-one that
        // would give two slots one bit (a task reaped for another) or
        // index past a segment.
        assert_eq!(seg_base(SEGMENTS), 1 << 32);
        for seg in 0..SEGMENTS {
            let (first, last) = (seg_base(seg), seg_base(seg + 1) - 1);
            assert_eq!(locate(first as u32), (seg, 0));
            assert_eq!(locate(last as u32), (seg, (last - first) as usize));
        }
        assert_eq!(locate(u32::MAX).0, SEGMENTS - 1);
    }

    #[test]
    fn set_bits_come_back_once_each() {
        // Proves a reap sees every set bit exactly once, across segments,
        // and that a slot past the covered segments is refused rather than
        // lost. Catches a bit never cleared (an entry reaped twice) or a
        // wrong slot number handed back.
        let bits = EndedBits::default();
        assert!(!bits.set(5), "nothing covered yet");
        assert_eq!(bits.cover(10_000), 16_384);
        let slots = [0u32, 63, 64, 4095, 4096, 8191, 8192, 16_383];
        for &s in &slots {
            assert!(bits.set(s));
        }
        assert!(!bits.set(16_384), "segment 3 was not made");
        let mut seen = Vec::new();
        bits.take_all(|s| seen.push(s));
        assert_eq!(seen, slots);
        bits.take_all(|s| panic!("slot {s} came back twice"));
    }
}
