//! A generation-checked slab: the storage of a registry's live entries.
//!
//! A key names one insertion: once its value is removed, the key never
//! names anything again (until the slot's 32-bit generation wraps), even
//! though the slot is reused. Slots live in fixed-size pages, so the slab
//! grows without moving what it holds, and vacant slots form an intrusive
//! free list, so inserting and removing touch one slot and the list head.
//! The slab keeps as many slots as were ever occupied at once (rounded up
//! to a page); it never shrinks.
//!
//! Used for a registry's live entries and its idle waiters, and for a
//! shutdown token's callbacks: whatever a guard must be able to remove
//! again, in O(1), without a stale key ever removing a newer value.

/// A slab key: the slot index in the low 32 bits, its generation above.
pub(crate) type Key = u64;

const PAGE_BITS: u32 = 7;
const PAGE: usize = 1 << PAGE_BITS;
const NO_SLOT: u32 = u32::MAX;

enum Slot<T> {
    Vacant { generation: u32, next_free: u32 },
    Occupied { generation: u32, value: T },
}

pub(crate) struct Slab<T> {
    pages: Vec<Box<[Slot<T>]>>,
    free_head: u32,
    /// Occupied slots.
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            pages: Vec::new(),
            free_head: NO_SLOT,
            len: 0,
        }
    }
}

/// The slot index in `k`.
pub(crate) fn index_of(k: Key) -> u32 {
    split(k).0
}

fn split(k: Key) -> (u32, u32) {
    ((k & 0xffff_ffff) as u32, (k >> 32) as u32)
}

fn join(index: u32, generation: u32) -> Key {
    (u64::from(generation) << 32) | u64::from(index)
}

impl<T> Slab<T> {
    fn slot_mut(&mut self, index: u32) -> Option<&mut Slot<T>> {
        let i = index as usize;
        self.pages.get_mut(i >> PAGE_BITS)?.get_mut(i & (PAGE - 1))
    }

    /// How many slots are occupied.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether every slot is occupied (the next insert adds a page).
    pub(crate) fn is_full(&self) -> bool {
        self.free_head == NO_SLOT
    }

    /// Store `value`; `None` if the slab already holds `u32::MAX` slots.
    #[inline]
    pub(crate) fn insert(&mut self, value: T) -> Option<Key> {
        if self.free_head == NO_SLOT {
            self.add_page()?;
        }
        let index = self.free_head;
        let slot = self.slot_mut(index).expect("the free list names a slot");
        let Slot::Vacant {
            generation,
            next_free,
        } = *slot
        else {
            unreachable!("the free list names an occupied slot")
        };
        *slot = Slot::Occupied { generation, value };
        self.free_head = next_free;
        self.len += 1;
        Some(join(index, generation))
    }

    /// A page of vacant slots, chained onto the (empty) free list.
    fn add_page(&mut self) -> Option<()> {
        let first = u32::try_from(self.pages.len() * PAGE).ok()?;
        let last = first
            .checked_add(PAGE as u32 - 1)
            .filter(|&l| l != NO_SLOT)?;
        let page = (first..=last)
            .map(|i| Slot::Vacant {
                generation: 0,
                next_free: if i == last { NO_SLOT } else { i + 1 },
            })
            .collect();
        self.pages.push(page);
        self.free_head = first;
        Some(())
    }

    /// Take the value under `k` out, if `k` still names it.
    pub(crate) fn remove(&mut self, k: Key) -> Option<T> {
        let (index, generation) = split(k);
        match self.slot_mut(index)? {
            Slot::Occupied { generation: g, .. } if *g == generation => self.remove_at(index),
            _ => None,
        }
    }

    /// Take the value in slot `index` out, whichever insertion put it
    /// there. For an owner that alone removes its value, so that its slot
    /// cannot have been reused.
    #[inline]
    pub(crate) fn remove_at(&mut self, index: u32) -> Option<T> {
        let next_free = self.free_head;
        let slot = self.slot_mut(index)?;
        let generation = match slot {
            Slot::Occupied { generation, .. } => *generation,
            Slot::Vacant { .. } => return None,
        };
        let vacant = Slot::Vacant {
            generation: generation.wrapping_add(1),
            next_free,
        };
        let Slot::Occupied { value, .. } = std::mem::replace(slot, vacant) else {
            unreachable!()
        };
        self.free_head = index;
        self.len -= 1;
        Some(value)
    }

    /// Remove the value in slot `index`, whichever insertion put it there
    /// (see [`remove_at`](Self::remove_at)), and drop it where it lies,
    /// after `take` has moved out what must outlive it: cheaper than moving
    /// the whole value out. `None` if the slot is vacant.
    #[inline]
    pub(crate) fn discard_at<R>(
        &mut self,
        index: u32,
        take: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let next_free = self.free_head;
        let slot = self.slot_mut(index)?;
        let (generation, taken) = match slot {
            Slot::Occupied { generation, value } => (*generation, take(value)),
            Slot::Vacant { .. } => return None,
        };
        // Drops the value in place.
        *slot = Slot::Vacant {
            generation: generation.wrapping_add(1),
            next_free,
        };
        self.free_head = index;
        self.len -= 1;
        Some(taken)
    }

    /// The value under `k`, if `k` still names it.
    #[cfg(test)]
    pub(crate) fn get_mut(&mut self, k: Key) -> Option<&mut T> {
        let (index, generation) = split(k);
        match self.slot_mut(index)? {
            Slot::Occupied {
                generation: g,
                value,
            } if *g == generation => Some(value),
            _ => None,
        }
    }

    /// The value in slot `index`, whichever insertion put it there (see
    /// [`remove_at`](Self::remove_at)).
    pub(crate) fn get_mut_at(&mut self, index: u32) -> Option<&mut T> {
        match self.slot_mut(index)? {
            Slot::Occupied { value, .. } => Some(value),
            Slot::Vacant { .. } => None,
        }
    }

    /// How many slots the slab holds, occupied or not.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.pages.len() * PAGE
    }

    /// Every stored value, mutably, in slot order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.pages
            .iter_mut()
            .flat_map(|p| p.iter_mut())
            .filter_map(|s| match s {
                Slot::Occupied { value, .. } => Some(value),
                Slot::Vacant { .. } => None,
            })
    }

    /// Every stored value, in slot order (not insertion order: slots are
    /// reused).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.pages
            .iter()
            .flat_map(|p| p.iter())
            .filter_map(|s| match s {
                Slot::Occupied { value, .. } => Some(value),
                Slot::Vacant { .. } => None,
            })
    }
}

impl<T> Slab<T> {
    /// Every stored value with its key, in slot order, from slot `start`
    /// on (the slots before it are not visited).
    pub(crate) fn iter_keyed_from(&self, start: u32) -> impl Iterator<Item = (Key, &T)> {
        let start = start as usize;
        self.pages
            .iter()
            .enumerate()
            .skip(start >> PAGE_BITS)
            .flat_map(|(p, page)| {
                page.iter()
                    .enumerate()
                    .map(move |(i, slot)| ((p << PAGE_BITS | i) as u32, slot))
            })
            .skip(start & (PAGE - 1))
            .filter_map(|(index, slot)| match slot {
                Slot::Occupied { generation, value } => Some((join(index, *generation), value)),
                Slot::Vacant { .. } => None,
            })
    }

    /// Take every stored value out, in slot order. Each slot moves to its
    /// next generation, so no key handed out before names anything after.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        if self.len == 0 {
            return out;
        }
        for index in 0..self.capacity_slots() {
            if let Some(value) = self.remove_at(index) {
                out.push(value);
                if self.len == 0 {
                    break;
                }
            }
        }
        out
    }

    fn capacity_slots(&self) -> u32 {
        // `add_page` never lets the slot count exceed `u32::MAX`.
        (self.pages.len() * PAGE) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::{Slab, PAGE};

    #[test]
    fn a_removed_key_never_names_the_slots_next_value() {
        // Proves generations guard reuse: a stale key (a foreign task
        // reported finished twice) must not remove its successor.
        let mut slab = Slab::default();
        let a = slab.insert("a").unwrap();
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b").unwrap();
        assert_ne!(a, b, "the slot is reused under a new generation");
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get_mut(a), None);
        assert_eq!(slab.iter().copied().collect::<Vec<_>>(), ["b"]);
        assert_eq!(slab.remove(b), Some("b"));
        assert_eq!(slab.remove(b), None);
    }

    #[test]
    fn freed_slots_are_reused_before_the_slab_grows() {
        // Catches a free list that loses slots: memory must stay bounded by
        // the peak number of live values, not by values ever inserted.
        let mut slab = Slab::default();
        for round in 0..100 {
            let keys: Vec<_> = (0..PAGE + 3).map(|i| slab.insert(i).unwrap()).collect();
            assert_eq!(slab.iter().count(), PAGE + 3, "round {round}");
            assert_eq!(slab.len(), PAGE + 3, "round {round}");
            for k in keys {
                assert!(slab.remove(k).is_some());
            }
        }
        assert_eq!(slab.pages.len(), 2);
        assert_eq!(slab.iter().count(), 0);
        assert_eq!(slab.len(), 0);
    }

    #[test]
    fn drain_takes_everything_and_retires_every_key() {
        // Proves `drain` empties the slab and that a key handed out before
        // it never names a value stored after it (the slots move to their
        // next generation): a guard dropped late must not remove a newer
        // waiter or callback. Catches a drain that swaps in a fresh slab,
        // whose generations restart at zero.
        let mut slab = Slab::default();
        let old: Vec<_> = (0..PAGE + 5).map(|i| slab.insert(i).unwrap()).collect();
        assert!(slab.remove(old[3]).is_some());
        let mut drained = slab.drain();
        drained.sort_unstable();
        assert_eq!(drained.len(), PAGE + 4);
        assert!(!drained.contains(&3));
        assert_eq!(slab.len(), 0);
        let new: Vec<_> = (0..PAGE + 5)
            .map(|i| slab.insert(100 + i).unwrap())
            .collect();
        for k in &old {
            assert_eq!(slab.remove(*k), None, "a pre-drain key removed a new value");
        }
        assert_eq!(slab.len(), PAGE + 5);
        assert!(new.iter().all(|k| slab.get_mut(*k).is_some()));
        assert!(Slab::<u8>::default().drain().is_empty());
    }

    #[test]
    fn values_across_pages_are_all_reachable() {
        // Catches an off-by-one in the page arithmetic (index to page and
        // offset) once the slab spans several pages.
        let mut slab = Slab::default();
        let keys: Vec<_> = (0..5 * PAGE).map(|i| slab.insert(i).unwrap()).collect();
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(slab.get_mut(k).copied(), Some(i));
        }
        let mut seen: Vec<usize> = slab.iter().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..5 * PAGE).collect::<Vec<_>>());
        for (i, &k) in keys.iter().enumerate().rev() {
            assert_eq!(slab.remove(k), Some(i));
        }
    }

    #[test]
    fn iter_keyed_from_resumes_at_any_slot_with_live_keys() {
        // Proves a scan resumed at slot `start` sees exactly the occupied
        // slots from there on, across page boundaries, each with the key
        // that removes it (its current generation). Catches an off-by-one
        // in the page/offset split of `start`, and a stale generation.
        let mut slab = Slab::default();
        let keys: Vec<_> = (0..3 * PAGE).map(|i| slab.insert(i).unwrap()).collect();
        // Vacate a few, and reoccupy one under a new generation.
        for i in [0, PAGE - 1, PAGE, 2 * PAGE + 7] {
            assert!(slab.remove(keys[i]).is_some());
        }
        let newer = slab.insert(1000).unwrap();
        for start in [
            0,
            1,
            PAGE - 1,
            PAGE,
            PAGE + 1,
            2 * PAGE + 7,
            3 * PAGE,
            4 * PAGE,
        ] {
            let got: Vec<_> = slab.iter_keyed_from(start as u32).collect();
            let mut want: Vec<_> = slab
                .iter_keyed_from(0)
                .filter(|(k, _)| super::index_of(*k) as usize >= start)
                .collect();
            assert_eq!(got, want, "from slot {start}");
            want.retain(|(_, v)| **v != 1000);
            let expect: Vec<_> = (start..3 * PAGE)
                .filter(|i| ![0, PAGE - 1, PAGE, 2 * PAGE + 7].contains(i))
                .collect();
            assert_eq!(
                want.iter().map(|(_, v)| **v).collect::<Vec<_>>(),
                expect,
                "from slot {start}"
            );
        }
        let all: Vec<_> = slab.iter_keyed_from(0).map(|(k, _)| k).collect();
        assert_eq!(all.len(), 3 * PAGE - 3);
        assert!(all.contains(&newer));
        for k in all {
            assert!(
                slab.remove(k).is_some(),
                "a key from the scan did not remove its value"
            );
        }
        assert_eq!(slab.len(), 0);
    }
}
