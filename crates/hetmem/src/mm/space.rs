//! The address space: which CPU addresses show which region at which offset (the VMA tree's
//! analogue), kept in step with the kernel's munmap/mremap events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use hetmem_proto::{PageRun, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::mm::region::{Region, View};
use crate::sys::mem;

/// A piece of an address range: one view, one block.
#[derive(Clone, Debug)]
pub(crate) struct BlockSpan {
    pub region: Arc<Region>,
    pub bi: usize,
    pub run: PageRun,
    /// CPU address of the run's first page.
    pub va: usize,
}

/// The address space: views by start address, the stale views newer ones displaced, the
/// regions, and the lock that makes a returned `munmap` visible before anyone looks again.
#[derive(Debug, Default)]
pub(crate) struct AddressSpace {
    /// Views by start address.
    map: RwLock<BTreeMap<usize, MapEntry>>,
    /// Stale views whose addresses a newer view took before their UNMAP or REMAP event was
    /// read (`add_region`). Lookups never see them; their event still finds them. Locked after
    /// `map`.
    displaced: Mutex<Vec<(usize, MapEntry)>>,
    regions: Mutex<Vec<Arc<Region>>>,
    /// Held while reading events and applying them to the address map, so a `munmap` that
    /// returned has its view removed before anyone looks at views again.
    events: Mutex<()>,
    /// Holders of `events`: a lookup waits for the lock only while someone holds it, so the
    /// fault path takes no lock here when nobody is reading events.
    events_held: AtomicUsize,
}

/// `events` held (`AddressSpace::lock_events`).
pub(crate) struct EventsGuard<'a> {
    _lock: MutexGuard<'a, ()>,
    held: &'a AtomicUsize,
}

impl Drop for EventsGuard<'_> {
    fn drop(&mut self) {
        // Before the lock goes: a lookup that sees zero finds the messages applied.
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Address map entry: `[va, end)` shows `region` from file offset `off`.
#[derive(Clone, Debug)]
pub(crate) struct MapEntry {
    pub end: usize,
    pub region: Arc<Region>,
    pub off: usize,
}

impl AddressSpace {
    /// Splits `[addr, end)` into spans of one view and one block each (the caller checked the
    /// range: `Runtime::spans`). `Err(Fault)` if some page is not managed memory.
    pub(crate) fn spans(&self, addr: usize, end: usize) -> Result<Vec<BlockSpan>> {
        let mut out = Vec::new();
        self.each_span(addr, end, |s| out.push(s))?;
        Ok(out)
    }

    /// The span of the one page at `addr` (page-aligned): `spans` without the Vec, for the
    /// fault path.
    pub(crate) fn span_at(&self, addr: usize) -> Result<BlockSpan> {
        let mut one = None;
        self.each_span(addr, addr + PAGE_SIZE, |s| one = Some(s))?;
        one.ok_or(Error::Fault("address is not managed memory"))
    }

    /// Calls `f` with each span of `[addr, end)`, in order, as `spans` returns them.
    fn each_span(&self, addr: usize, end: usize, mut f: impl FnMut(BlockSpan)) -> Result<()> {
        // Wait for a reader that has taken an UNMAP/REMAP message but not yet applied it: the
        // munmap that sent it may already have returned.
        // One that starts reading after this check takes its messages after this lookup, as
        // if it had taken the lock after us.
        if self.events_held.load(Ordering::SeqCst) != 0 {
            drop(self.events.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let space = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut at = addr;
        while at < end {
            let Some((&va, entry)) = space.range(..=at).next_back() else {
                return Err(Error::Fault("address is not managed memory"));
            };
            if at >= entry.end {
                return Err(Error::Fault("address is not managed memory"));
            }
            let stop = end.min(entry.end);
            while at < stop {
                let off = entry.off + (at - va);
                let bi = off / BLOCK_BYTES;
                let page = (off % BLOCK_BYTES) / PAGE_SIZE;
                let n = ((stop - at) / PAGE_SIZE).min(PAGES_PER_BLOCK - page);
                let run = PageRun::new(page, n, PAGES_PER_BLOCK).expect("inside one block");
                f(BlockSpan {
                    region: entry.region.clone(),
                    bi,
                    run,
                    va: at,
                });
                at += n * PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Held while userfaultfd messages are read and applied (`Runtime::read_events`).
    /// Like `lock_events`, unless another thread holds the lock now.
    pub(crate) fn try_lock_events(&self) -> Option<EventsGuard<'_>> {
        let lock = match self.events.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        self.events_held.fetch_add(1, Ordering::SeqCst);
        Some(EventsGuard {
            _lock: lock,
            held: &self.events_held,
        })
    }

    pub(crate) fn lock_events(&self) -> EventsGuard<'_> {
        let lock = self.events.lock().unwrap_or_else(|e| e.into_inner());
        self.events_held.fetch_add(1, Ordering::SeqCst);
        EventsGuard {
            _lock: lock,
            held: &self.events_held,
        }
    }

    /// The regions now, for walks that must not hold the list's lock.
    pub(crate) fn regions(&self) -> Vec<Arc<Region>> {
        self.regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether any view overlaps `[addr, end)`.
    pub(crate) fn overlaps(&self, addr: usize, end: usize) -> bool {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .range(..end)
            .any(|(_, m)| m.end > addr)
    }

    /// The start of the first view after `at` and before `end`, or `end`.
    pub(crate) fn next_view(&self, at: usize, end: usize) -> usize {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .range(at + 1..end)
            .next()
            .map_or(end, |(&va, _)| va)
    }

    /// Takes the region out of the address map and the region list, and empties its view
    /// list, which it returns. The views stay mapped and registered (`Runtime::retire_region`).
    pub(crate) fn remove_region(&self, region: &Arc<Region>) -> Vec<View> {
        let views: Vec<View> = {
            let _g = self.lock_events();
            let mut space = self.map.write().unwrap_or_else(|e| e.into_inner());
            space.retain(|_, m| !Arc::ptr_eq(&m.region, region));
            self.displaced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(_, m)| !Arc::ptr_eq(&m.region, region));
            // Emptied here, so a drive still running on the region (a read-ahead) stops
            // touching the views first.
            std::mem::take(&mut *region.views.write().unwrap_or_else(|e| e.into_inner()))
        };
        self.regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| !Arc::ptr_eq(r, region));
        views
    }

    /// Enters a new region's view into the address map. The kernel just gave us its addresses,
    /// so an entry still there is stale: its UNMAP or REMAP event has not been read yet (the
    /// kernel sends it after the address is free). It moves to the displaced list, where that
    /// event finds it.
    pub(crate) fn add_region(&self, region: Arc<Region>, va: usize) {
        let entry = MapEntry {
            end: va + region.len,
            region: region.clone(),
            off: 0,
        };
        {
            let mut space = self.map.write().unwrap_or_else(|e| e.into_inner());
            self.insert_view(&mut space, va, entry);
            Self::sync_views(&space, &region);
        }
        self.regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(region);
    }

    /// Inserts `entry` at `va`, moving whatever overlaps it to the displaced list, but what
    /// `entry` itself covers (the same region and file offsets at the same addresses: a view
    /// moved back onto its own alias).
    pub(crate) fn insert_view(
        &self,
        space: &mut BTreeMap<usize, MapEntry>,
        va: usize,
        entry: MapEntry,
    ) {
        let mut stale = Self::cut_views(space, va, entry.end);
        stale.retain(|(sva, m)| {
            !(Arc::ptr_eq(&m.region, &entry.region) && m.off == entry.off + (sva - va))
        });
        for (_, m) in &stale {
            Self::sync_views(space, &m.region);
        }
        if !stale.is_empty() {
            self.displaced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(stale);
        }
        space.insert(va, entry);
    }

    /// Takes the parts of displaced entries inside `[start, end)` out of the displaced list.
    pub(crate) fn cut_displaced(&self, start: usize, end: usize) -> Vec<(usize, MapEntry)> {
        let mut list = self.displaced.lock().unwrap_or_else(|e| e.into_inner());
        if list.is_empty() {
            return Vec::new();
        }
        let mut map: BTreeMap<usize, MapEntry> = std::mem::take(&mut *list).into_iter().collect();
        let cut = Self::cut_views(&mut map, start, end);
        *list = map.into_iter().collect();
        cut
    }

    /// Whether the kernel shows `entry`'s region at `va` now, at the file offset the entry says.
    pub(crate) fn shown_at(va: usize, entry: &MapEntry) -> bool {
        matches!(mem::vma_info(va), Ok(Some(v)) if v.shows(entry.region.inode, va, entry.off))
    }

    /// Takes `[start, end)` out of the address map: entries that straddle it keep their parts
    /// outside it. Returns the parts inside, each with its start address.
    pub(crate) fn cut_views(
        space: &mut BTreeMap<usize, MapEntry>,
        start: usize,
        end: usize,
    ) -> Vec<(usize, MapEntry)> {
        let hit: Vec<usize> = space
            .range(..end)
            .filter(|(_, e)| e.end > start)
            .map(|(&va, _)| va)
            .collect();
        let mut cut = Vec::new();
        for va in hit {
            let e = space.remove(&va).expect("just found");
            let s = start.max(va);
            let t = end.min(e.end);
            if va < s {
                let before = MapEntry {
                    end: s,
                    region: e.region.clone(),
                    off: e.off,
                };
                space.insert(va, before);
            }
            if t < e.end {
                let after = MapEntry {
                    end: e.end,
                    region: e.region.clone(),
                    off: e.off + (t - va),
                };
                space.insert(t, after);
            }
            let inside = MapEntry {
                end: t,
                off: e.off + (s - va),
                region: e.region,
            };
            cut.push((s, inside));
        }
        cut
    }

    /// Rebuilds `region`'s view list from the address map.
    pub(crate) fn sync_views(space: &BTreeMap<usize, MapEntry>, region: &Arc<Region>) {
        region.set_views(
            space
                .iter()
                .filter(|(_, m)| Arc::ptr_eq(&m.region, region))
                .map(|(&va, m)| View {
                    va,
                    off: m.off,
                    len: m.end - va,
                }),
        );
    }

    /// Applies an UNMAP event: removes `[start, end)` from the address map; returns the file
    /// ranges that no view shows any more. The event may be read late: a view that the kernel
    /// shows there now was entered after the unmap (`add_region` reused the addresses) and
    /// stays. A file range another view still shows (a `MREMAP_DONTUNMAP` alias) keeps its data.
    pub(crate) fn unmap_views(&self, start: usize, end: usize) -> Vec<(Arc<Region>, usize, usize)> {
        let mut space = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        for (va, m) in Self::cut_views(&mut space, start, end) {
            if Self::shown_at(va, &m) {
                space.insert(va, m);
            } else {
                gone.push((va, m));
            }
        }
        gone.extend(self.cut_displaced(start, end));
        for (_, m) in &gone {
            Self::sync_views(&space, &m.region);
        }
        let mut out = Vec::new();
        for (va, m) in gone {
            let mut ranges = vec![(m.off, m.off + (m.end - va))];
            for (&ova, other) in space
                .iter()
                .filter(|(_, o)| Arc::ptr_eq(&o.region, &m.region))
            {
                let (s, e) = (other.off, other.off + (other.end - ova));
                ranges = ranges
                    .into_iter()
                    .flat_map(|(a, b)| {
                        [(a, b.min(s)), (a.max(e), b)]
                            .into_iter()
                            .filter(|&(x, y)| x < y)
                    })
                    .collect();
            }
            out.extend(
                ranges
                    .into_iter()
                    .map(|(a, b)| (m.region.clone(), a, b - a)),
            );
        }
        out
    }

    /// Applies a REMAP event: `mremap` moved `[from, from + len)` to `to`. Returns the regions
    /// that moved. The kernel says how each view moved, whenever the event is read:
    /// - shown at the new address and not the old: moved;
    /// - shown at both (`MREMAP_DONTUNMAP`, which leaves the old range mapping the memfd, as it
    ///   does any shared mapping): the old range stays a view too, an alias of the same data;
    /// - shown at the old address only: a view entered after the move (`add_region` reused the
    ///   addresses), or moved back there since: it stays.
    ///
    /// A view a newer one displaced (on the displaced list) moved.
    pub(crate) fn remap_views(&self, from: usize, to: usize, len: usize) -> Vec<Arc<Region>> {
        let mut space = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut moved = Vec::new();
        for (va, m) in Self::cut_views(&mut space, from, from + len) {
            let (here, there) = (Self::shown_at(va, &m), Self::shown_at(to + (va - from), &m));
            if here {
                space.insert(va, m.clone());
            }
            if there || !here {
                moved.push((va, m));
            }
        }
        moved.extend(self.cut_displaced(from, from + len));
        let mut regions: Vec<Arc<Region>> = Vec::new();
        for (va, mut m) in moved {
            let region = m.region.clone();
            let dest = to + (va - from);
            m.end = dest + (m.end - va);
            self.insert_view(&mut space, dest, m);
            if !regions.iter().any(|r| Arc::ptr_eq(r, &region)) {
                regions.push(region);
            }
        }
        for r in &regions {
            Self::sync_views(&space, r);
        }
        regions
    }
}

impl Region {
    pub(crate) fn set_views(&self, views: impl Iterator<Item = View>) {
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = views.collect();
    }
}
