//! The address space: which CPU addresses show which region at which offset (the VMA tree's
//! analogue), kept in step with the kernel's munmap/mremap events.

use std::collections::BTreeMap;
use std::sync::Arc;

use hetmem_proto::{PageRun, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::mm::region::{Region, View};
use crate::mm::runtime::Runtime;
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

/// Address map entry: `[va, end)` shows `region` from file offset `off`.
#[derive(Clone, Debug)]
pub(crate) struct MapEntry {
    pub end: usize,
    pub region: Arc<Region>,
    pub off: usize,
}

impl Runtime {
    /// Splits `[addr, addr + len)` into pieces of one view and one block each, after
    /// [`Runtime::check_range`]. `Err(Fault)` if some page is not managed memory.
    pub(crate) fn pieces(&self, addr: usize, len: usize) -> Result<Vec<BlockSpan>> {
        let end = self.check_range(addr, len)?;
        // Wait for a reader that has taken an UNMAP/REMAP message but not yet applied it: the
        // munmap that sent it may already have returned.
        drop(self.events.lock().unwrap_or_else(|e| e.into_inner()));
        let space = self.space.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
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
                out.push(BlockSpan {
                    region: entry.region.clone(),
                    bi,
                    run,
                    va: at,
                });
                at += n * PAGE_SIZE;
            }
        }
        Ok(out)
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
            let mut space = self.space.write().unwrap_or_else(|e| e.into_inner());
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
        let mut space = self.space.write().unwrap_or_else(|e| e.into_inner());
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
        let mut space = self.space.write().unwrap_or_else(|e| e.into_inner());
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
