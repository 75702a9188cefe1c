//! Deferred reaping: how an ended native task leaves the registry's slab.
//!
//! A native task usually ends on another worker thread than the one that
//! spawned it. Its end is counted at once (the live count drops, and the
//! task leaves every snapshot and straggler list), but its slab entry is
//! removed later, in a batch: the ending thread notes the slot in a buffer
//! of its own (one per CPU), and the buffers are drained by [`Inner::reap`].
//!
//! Guarantees:
//! - **Exact counts.** The live count is exact at every moment; the ended
//!   tasks' outcomes move from the buffers to the registry's totals under
//!   the state lock, so [`TaskStats`](super::TaskStats) counts each task
//!   once.
//! - **Bounded memory.** The slab stays within [`REAP_AT`] slots of the peak
//!   live count while tasks are spawned, and a thread's buffer within
//!   [`REAP_AT_THREAD`] slots while nothing spawns; everything is reaped
//!   when the registry empties.
//! - **No reader sees an ended task.** Every reader of the slab (snapshot,
//!   close, stop) reaps first, under the state lock.
//! - **A straggler counts as aborted.** A task that ends once the registry
//!   is stopping leaves at once ([`Inner::finish_native`] →
//!   `finish_stopping`), counted `Aborted` if the deadline named it,
//!   whatever it ended with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::Waker;

use super::types::{bucket, BUCKETS};
use super::{Control, Entry, Inner, State, TaskKind, TaskName, TaskOrigin, TaskOutcome};

/// Counts of ended tasks by outcome; failures also by kind and origin
/// (for `stats_by_kind`; the total is their sum).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Outcomes {
    pub(super) completed: u64,
    pub(super) failed: [u64; BUCKETS],
    pub(super) cancelled: u64,
    pub(super) aborted: u64,
}

impl Outcomes {
    /// Count one task ended as `outcome`; `bucket` (see `types::bucket`)
    /// is read for a failure only.
    #[inline]
    pub(super) fn count(&mut self, outcome: TaskOutcome, bucket: usize) {
        match outcome {
            TaskOutcome::Completed => self.completed += 1,
            TaskOutcome::Failed => self.failed[bucket] += 1,
            TaskOutcome::Cancelled => self.cancelled += 1,
            TaskOutcome::Aborted => self.aborted += 1,
        }
    }

    pub(super) fn add(&mut self, other: &Outcomes) {
        self.completed += other.completed;
        for (mine, theirs) in self.failed.iter_mut().zip(other.failed) {
            *mine += theirs;
        }
        self.cancelled += other.cancelled;
        self.aborted += other.aborted;
    }
}

/// Native tasks that ended but whose entries are still in the slab.
///
/// A native task usually ends on another worker thread than the one that
/// spawned it. Removing its entry from the slab at once would move the
/// state lock (and the slot) between the two threads on every task; the
/// ending task instead notes its slot here, in its thread's buffer (one per
/// CPU, handed out to threads in turn), and the slots are removed in
/// batches ([`Inner::reap`]): by a thread whose buffer has filled up, by a
/// spawner that would otherwise grow the slab, by every reader of the slab
/// (so no reader sees an ended task), and by the task that empties the
/// registry. The live count is exact all along.
#[derive(Default)]
pub(super) struct Ended {
    slots: Vec<u32>,
    pub(super) outcomes: Outcomes,
}

/// A spawner that finds no free slot reaps instead of growing the slab if
/// at least this many ended tasks wait: every reap is then a batch (taking
/// the other threads' buffers every few spawns costs more than the slots
/// it frees), and the slab stays within this many slots of the peak live
/// count.
pub(super) const REAP_AT: usize = 1024;

/// A thread whose buffer holds this many ended tasks reaps, if the state
/// lock is free: bounds the memory ended tasks keep when nothing spawns.
/// Higher than [`REAP_AT`] so that while tasks are being spawned the
/// spawner reaps, touching the slots it wrote itself; a reap by an ending
/// thread holds the lock while it pulls every slot over from the
/// spawner's cache, and the spawner waits.
pub(super) const REAP_AT_THREAD: usize = 8 * REAP_AT;

/// A cache line (and its neighbour, which x86 prefetches in pairs) of its
/// own, so that threads noting ended tasks do not contend on one line.
#[repr(align(128))]
#[derive(Default)]
pub(super) struct Padded<T>(pub(super) T);

/// Index of the calling thread's [`Ended`] buffer among `n` (a power of two).
fn ended_shard(n: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Relaxed: the counter only hands out indices; the modification
        // order of one atomic makes each `fetch_add` return a different
        // one, and no other memory is published through it (two threads
        // that share a buffer are correct anyway: it has its own lock).
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i) & (n - 1)
}

/// How many [`Ended`] buffers a registry has: one per CPU, rounded up to a
/// power of two (read once per process: it may read cgroup files).
pub(super) fn ended_shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .clamp(2, 64)
            .next_power_of_two()
    })
}

impl Inner {
    /// Remove the entries of every ended native task from the slab. Their
    /// stored wakers are handed back, to be dropped outside the lock.
    pub(super) fn reap(&self, st: &mut State) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let State {
            entries,
            ended,
            reaping,
            ..
        } = st;
        for shard in self.ended.iter() {
            {
                let mut full = shard.0.lock();
                if full.slots.is_empty() {
                    continue;
                }
                std::mem::swap(&mut full.slots, reaping);
                ended.add(&std::mem::take(&mut full.outcomes));
            }
            for slot in reaping.drain(..) {
                if let Some(Entry {
                    control: Control::Native(Some(w)),
                    ..
                }) = entries.remove_at(slot)
                {
                    wakers.push(w);
                }
            }
        }
        wakers
    }

    /// Record the end of the native task in `slot` (see [`Ended`]); hand
    /// back its name if the task failed, for the log.
    pub(super) fn finish_native(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        // A failure is counted by kind: its entry's bucket is read with its
        // name (the outcome's bucket is ignored for any other outcome).
        let (name, bucket) = if outcome == TaskOutcome::Failed {
            let mut st = self.state.lock();
            match st.entries.get_mut_at(slot) {
                Some(e) => (Some(e.name.clone()), e.bucket()),
                None => (None, 0),
            }
        } else {
            (None, 0)
        };
        let backlog = {
            let mut ended = self.ended[ended_shard(self.ended.len())].0.lock();
            // Ordering: `close_and_stop_all` sets `stopping` (under the state
            // lock) before its reap, which takes this lock. Read false here,
            // this section comes before that reap takes this buffer: the slot
            // noted now is reaped before the stragglers are named, so this
            // task is not one. Read true, the task goes to `finish_stopping`,
            // which waits for the state lock, so for the naming to be over.
            // Relaxed is enough: the buffer lock (released by the reap after
            // the store, or taken by it after this section) orders this read
            // against the store; the flag itself publishes nothing.
            if self.stopping.load(Ordering::Relaxed) {
                None
            } else {
                ended.slots.push(slot);
                ended.outcomes.count(outcome, bucket);
                Some(ended.slots.len())
            }
        };
        let Some(backlog) = backlog else {
            return self.finish_stopping(slot, outcome);
        };
        if backlog >= REAP_AT_THREAD {
            if let Some(mut st) = self.state.try_lock() {
                let wakers = self.reap(&mut st);
                drop(st);
                drop(wakers);
            }
        }
        self.one_fewer();
        name
    }

    /// The end of a native task once the registry is stopping: its entry
    /// leaves at once, and a task named as a straggler counts as aborted
    /// whatever `outcome` it ended with, so that the stats agree with the
    /// deadline's report. Hands back its name if it failed, for the log.
    #[cold]
    fn finish_stopping(&self, slot: u32, outcome: TaskOutcome) -> Option<TaskName> {
        let entry = {
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
            entry
        };
        let name = match (&entry, outcome) {
            (Some(e), TaskOutcome::Failed) => Some(e.name.clone()),
            _ => None,
        };
        // Its waker, if any, is dropped outside the lock.
        drop(entry);
        self.one_fewer();
        name
    }

    /// Take back the counts of a task that a shut-down runtime dropped
    /// inside `spawn` (see `TaskRegistry::spawn_with`): `spawn` refuses it,
    /// so it was never accepted, but `insert_entry` counted it spawned and
    /// its drop, on this thread, counted it aborted.
    #[cold]
    pub(super) fn uncount_refused(&self, kind: TaskKind) {
        let mut st = self.state.lock();
        st.spawned[bucket(kind, TaskOrigin::Native)] -= 1;
        // The drop noted the abort in this thread's buffer; a reap since
        // (the task that empties the registry reaps) moved it to `ended`.
        // Both move only under the state lock, held here.
        let mut mine = self.ended[ended_shard(self.ended.len())].0.lock();
        if mine.outcomes.aborted > 0 {
            mine.outcomes.aborted -= 1;
        } else {
            st.ended.aborted -= 1;
        }
    }
}
