//! Per-block page state, stored as bit planes (one bit per page per fact), like UVM's va_block
//! residency masks. Every decision is a handful of word operations per 64 pages.

use crate::action::MapMode;
use crate::bitmap::PageMask;
use crate::config::{DeviceKind, Topology};
use crate::error::InvariantViolation;
use crate::event::Access;
use crate::ids::{DeviceId, Mem, Proc, MAX_DEVICES, MAX_MEMS, MAX_PROCS};

/// The facts about every page of one block.
///
/// Mapping modes are two planes per processor: `lo` alone is read-only, `hi` alone is
/// read-write, both are exclusive. A mapping's target is implied for devices by `remote` (system
/// memory) or its absence (own memory), and for the CPU by `cpu_on` (a coherent device's memory)
/// or its absence (system memory).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct BlockState<const W: usize> {
    /// Memories holding the latest data.
    pub(crate) valid: [PageMask<W>; MAX_MEMS],
    /// Device frames bound to the page: valid copies plus transfer destinations in flight.
    pub(crate) frames: [PageMask<W>; MAX_DEVICES],
    pub(crate) map_lo: [PageMask<W>; MAX_PROCS],
    pub(crate) map_hi: [PageMask<W>; MAX_PROCS],
    /// The device's mapping targets system memory.
    pub(crate) remote: [PageMask<W>; MAX_DEVICES],
    /// The CPU's mapping targets this device's memory.
    pub(crate) cpu_on: [PageMask<W>; MAX_DEVICES],
    /// File page newer than the file.
    pub(crate) dirty: PageMask<W>,
    /// A transfer into some memory is in flight; accesses wait, mappings are read-only.
    pub(crate) busy: PageMask<W>,
    /// A writeback is in flight; mappings are read-only (stable pages) and new faults wait.
    pub(crate) writeback: PageMask<W>,
    /// Backed by the file (else anonymous: zero-filled).
    pub(crate) file: PageMask<W>,
    /// Beyond the end of the file.
    pub(crate) eof: PageMask<W>,
    /// Part of a live mapping (else munmapped or never mapped).
    pub(crate) vma: PageMask<W>,
    pub(crate) prot_read: PageMask<W>,
    pub(crate) prot_write: PageMask<W>,
    pub(crate) read_mostly: PageMask<W>,
    pub(crate) accessed_by: [PageMask<W>; MAX_DEVICES],
    /// Preferred location as a 4-bit number per page: 0 none, 1 system, 2 + d device d.
    pub(crate) preferred: [PageMask<W>; 4],
}

/// One page, decoded. For tests, snapshots and debugging; the engine works on planes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageView {
    /// Bit `Mem::index()` set for every memory holding the latest data.
    pub valid: u16,
    /// Each processor's mapping, by `Proc::index()`: mode and target.
    pub mapping: [Option<(MapMode, Mem)>; MAX_PROCS],
    /// Newer than the file.
    pub dirty: bool,
    /// Transfer in flight.
    pub busy: bool,
    /// Writeback in flight.
    pub writeback: bool,
    /// File-backed.
    pub file: bool,
    /// Beyond the end of the file.
    pub beyond_eof: bool,
    /// Mapped by a live VMA.
    pub managed: bool,
    /// (read, write) protection.
    pub prot: (bool, bool),
}

impl PageView {
    /// Whether `mem` holds a valid copy.
    pub fn is_valid_in(&self, mem: Mem) -> bool {
        self.valid & (1 << mem.index()) != 0
    }

    /// `proc`'s mapping.
    pub fn mapping_of(&self, proc: Proc) -> Option<(MapMode, Mem)> {
        self.mapping[proc.index()]
    }
}

impl<const W: usize> BlockState<W> {
    pub(crate) fn new(managed: PageMask<W>, file: PageMask<W>) -> Self {
        let e = PageMask::EMPTY;
        Self {
            valid: [e; MAX_MEMS],
            frames: [e; MAX_DEVICES],
            map_lo: [e; MAX_PROCS],
            map_hi: [e; MAX_PROCS],
            remote: [e; MAX_DEVICES],
            cpu_on: [e; MAX_DEVICES],
            dirty: e,
            busy: e,
            writeback: e,
            file: file & managed,
            eof: e,
            vma: managed,
            prot_read: managed,
            prot_write: managed,
            read_mostly: e,
            accessed_by: [e; MAX_DEVICES],
            preferred: [e; 4],
        }
    }

    /// Bytes of page metadata per block, and per page.
    pub const fn metadata_bytes() -> (usize, f64) {
        let bytes = std::mem::size_of::<Self>();
        (bytes, bytes as f64 / PageMask::<W>::PAGES as f64)
    }

    #[inline]
    pub(crate) fn mapped(&self, p: Proc) -> PageMask<W> {
        self.map_lo[p.index()] | self.map_hi[p.index()]
    }

    #[inline]
    pub(crate) fn writable(&self, p: Proc) -> PageMask<W> {
        self.map_hi[p.index()]
    }

    #[inline]
    pub(crate) fn exclusive(&self, p: Proc) -> PageMask<W> {
        self.map_lo[p.index()] & self.map_hi[p.index()]
    }

    /// Pages whose mapping by `p` (if any) is exactly `mode`.
    pub(crate) fn mapped_as(&self, p: Proc, mode: MapMode) -> PageMask<W> {
        let (lo, hi) = (self.map_lo[p.index()], self.map_hi[p.index()]);
        match mode {
            MapMode::Read => lo - hi,
            MapMode::ReadWrite => hi - lo,
            MapMode::Exclusive => lo & hi,
        }
    }

    pub(crate) fn set_mode(&mut self, p: Proc, pages: PageMask<W>, mode: Option<MapMode>) {
        let (lo, hi) = match mode {
            None => (false, false),
            Some(MapMode::Read) => (true, false),
            Some(MapMode::ReadWrite) => (false, true),
            Some(MapMode::Exclusive) => (true, true),
        };
        let i = p.index();
        if lo {
            self.map_lo[i] |= pages
        } else {
            self.map_lo[i] -= pages
        }
        if hi {
            self.map_hi[i] |= pages
        } else {
            self.map_hi[i] -= pages
        }
    }

    /// Pages where `p`'s mapping targets `mem`.
    pub(crate) fn mapped_to(&self, p: Proc, mem: Mem) -> PageMask<W> {
        let m = self.mapped(p);
        match (p, mem) {
            (Proc::Cpu, Mem::System) => m - self.cpu_on_any(),
            (Proc::Cpu, Mem::Device(d)) => m & self.cpu_on[d.index()],
            (Proc::Device(d), Mem::System) => m & self.remote[d.index()],
            (Proc::Device(d), Mem::Device(e)) if d == e => m - self.remote[d.index()],
            (Proc::Device(_), Mem::Device(_)) => PageMask::EMPTY,
        }
    }

    pub(crate) fn cpu_on_any(&self) -> PageMask<W> {
        self.cpu_on.iter().fold(PageMask::EMPTY, |acc, &m| acc | m)
    }

    /// Pages whose latest data `mem` holds.
    pub fn valid_in(&self, mem: Mem) -> PageMask<W> {
        self.valid[mem.index()]
    }

    /// Pages with a frame of `dev` bound (valid copies and transfer destinations in flight).
    pub fn frames_of(&self, dev: DeviceId) -> PageMask<W> {
        self.frames[dev.index()]
    }

    /// Pages `proc` maps, in any mode.
    pub fn mapped_by(&self, proc: Proc) -> PageMask<W> {
        self.map_lo[proc.index()] | self.map_hi[proc.index()]
    }

    /// Pages `proc` maps writable (read-write or exclusive).
    pub fn mapped_writable_by(&self, proc: Proc) -> PageMask<W> {
        self.map_hi[proc.index()]
    }

    /// Pages the CPU maps on device `dev`'s memory (coherent devices only).
    pub fn cpu_mapped_on(&self, dev: DeviceId) -> PageMask<W> {
        self.cpu_on[dev.index()]
    }

    /// Pages an `access` may touch as far as the mapping goes: managed, readable (writable for a
    /// write or atomic), before the end of the file. What the engine's `access_error` checks,
    /// for callers that size windows of placement around a fault.
    pub fn accessible(&self, access: Access) -> PageMask<W> {
        let ok = self.vma & self.prot_read;
        let ok = match access {
            Access::Read => ok,
            Access::Write | Access::Atomic => ok & self.prot_write,
        };
        ok - self.eof
    }

    /// Pages with a valid copy anywhere.
    pub(crate) fn any_valid(&self) -> PageMask<W> {
        self.valid.iter().fold(PageMask::EMPTY, |acc, &m| acc | m)
    }

    /// Pages of `dev`'s copy that evicting it must copy home first: its sole copies, less
    /// clean file pages (the file has them). The rest of its frames go without a copy.
    pub fn evict_copies(&self, dev: DeviceId) -> PageMask<W> {
        let mem = Mem::Device(dev);
        (self.valid[mem.index()] - self.valid_elsewhere(mem))
            - (self.file - self.dirty - self.writeback)
    }

    /// Pages with a valid copy in some memory other than `mem`.
    pub(crate) fn valid_elsewhere(&self, mem: Mem) -> PageMask<W> {
        self.valid
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != mem.index())
            .fold(PageMask::EMPTY, |acc, (_, &m)| acc | m)
    }

    /// Pages whose preferred location (`Advice::PreferredLocation`) is `loc` (`None`: no
    /// preference).
    pub fn preferred_is(&self, loc: Option<Mem>) -> PageMask<W> {
        let code = Self::location_code(loc);
        let mut m = PageMask::FULL;
        for (bit, plane) in self.preferred.iter().enumerate() {
            if code & (1 << bit) != 0 {
                m &= *plane
            } else {
                m -= *plane
            }
        }
        m
    }

    pub(crate) fn set_preferred(&mut self, pages: PageMask<W>, loc: Option<Mem>) {
        let code = Self::location_code(loc);
        for (bit, plane) in self.preferred.iter_mut().enumerate() {
            if code & (1 << bit) != 0 {
                *plane |= pages
            } else {
                *plane -= pages
            }
        }
    }

    fn location_code(loc: Option<Mem>) -> usize {
        loc.map_or(0, |m| m.index() + 1)
    }

    /// Whether any of `pages` has a protection other than (`read`, `write`). Plane
    /// arithmetic: this runs before every device access and migration, over whole runs.
    pub fn protection_differs(&self, pages: PageMask<W>, read: bool, write: bool) -> bool {
        let differs = |plane: PageMask<W>, on: bool| {
            if on {
                !(pages - plane).is_empty()
            } else {
                pages.intersects(&plane)
            }
        };
        differs(self.prot_read, read) || differs(self.prot_write, write)
    }

    /// Decodes one page.
    pub fn page(&self, i: usize) -> PageView {
        let mut v = PageView {
            dirty: self.dirty.contains(i),
            busy: self.busy.contains(i),
            writeback: self.writeback.contains(i),
            file: self.file.contains(i),
            beyond_eof: self.eof.contains(i),
            managed: self.vma.contains(i),
            prot: (self.prot_read.contains(i), self.prot_write.contains(i)),
            ..PageView::default()
        };
        for (m, plane) in self.valid.iter().enumerate() {
            if plane.contains(i) {
                v.valid |= 1 << m;
            }
        }
        for pi in 0..MAX_PROCS {
            let p = if pi == 0 {
                Proc::Cpu
            } else {
                Proc::Device(DeviceId::new(pi - 1).expect("index below MAX_PROCS"))
            };
            let mode = [MapMode::Read, MapMode::ReadWrite, MapMode::Exclusive]
                .into_iter()
                .find(|&mode| self.mapped_as(p, mode).contains(i));
            v.mapping[pi] = mode.map(|mode| {
                let target = (0..MAX_MEMS)
                    .filter_map(Mem::from_index)
                    .find(|&mem| self.mapped_to(p, mem).contains(i))
                    .unwrap_or(Mem::System);
                (mode, target)
            });
        }
        v
    }

    /// Checks the protocol invariants (docs/protocol.md §5) on every page.
    pub fn check(&self, topo: &Topology) -> Result<(), InvariantViolation> {
        fn fail<const W: usize>(
            bad: PageMask<W>,
            what: &'static str,
        ) -> Result<(), InvariantViolation> {
            match bad.iter().next() {
                Some(page) => Err(InvariantViolation { page, what }),
                None => Ok(()),
            }
        }
        let procs = std::iter::once(Proc::Cpu).chain(topo.devices().map(Proc::Device));
        let mems: Vec<Mem> = std::iter::once(Mem::System)
            .chain(topo.devices().map(Mem::Device))
            .collect();

        // Nothing exists for devices outside the topology.
        for d in DeviceId::range(MAX_DEVICES).skip(topo.device_count()) {
            let p = Proc::Device(d);
            fail(
                self.valid[Mem::Device(d).index()] | self.frames[d.index()] | self.mapped(p),
                "state for a device outside the topology",
            )?;
        }
        for d in topo.devices() {
            let (m, i) = (Mem::Device(d), d.index());
            fail(
                self.valid[m.index()] - self.frames[i],
                "valid device copy without a frame",
            )?;
            fail(
                self.frames[i] - self.valid[m.index()] - self.busy,
                "device frame bound with no copy and no transfer",
            )?;
            if topo.kind(d) == Some(DeviceKind::Private) {
                fail(self.cpu_on[i], "CPU maps private device memory")?;
            }
            fail(
                self.remote[i] - self.mapped(Proc::Device(d)),
                "stale remote target bit",
            )?;
            fail(
                self.cpu_on[i] - self.mapped(Proc::Cpu),
                "stale CPU target bit",
            )?;
        }
        for (a, &x) in self.cpu_on.iter().enumerate() {
            for &y in &self.cpu_on[a + 1..] {
                fail(x & y, "CPU mapping targets two memories")?;
            }
        }
        let mut mapped_any = PageMask::EMPTY;
        for p in procs.clone() {
            let mapped = self.mapped(p);
            mapped_any |= mapped;
            for &mem in &mems {
                fail(
                    self.mapped_to(p, mem) - self.valid[mem.index()],
                    "mapping of a memory without a valid copy",
                )?;
            }
            let w = self.writable(p);
            for &mem in &mems {
                // A writer's copy is the only copy, and every mapping shares it.
                fail(
                    self.mapped_to(p, mem) & w & self.valid_elsewhere(mem),
                    "writable mapping while another copy exists",
                )?;
            }
            for q in procs.clone().filter(|&q| q != p) {
                fail(
                    self.exclusive(p) & self.mapped(q),
                    "exclusive mapping shared",
                )?;
            }
            fail(
                w & (self.busy | self.writeback),
                "writable during a transfer or writeback",
            )?;
            if p == Proc::Cpu {
                fail(self.exclusive(p), "CPU holds an exclusive mapping")?;
            }
        }
        fail(mapped_any - self.vma, "mapping outside a live mapping")?;
        fail(mapped_any & self.eof, "mapping beyond end of file")?;
        fail(
            mapped_any - self.prot_read,
            "mapping without read permission",
        )?;
        for p in procs {
            fail(
                self.writable(p) - self.prot_write,
                "writable mapping without write permission",
            )?;
        }
        fail(self.dirty - self.file, "anonymous page marked dirty")?;
        fail(self.dirty - self.any_valid(), "dirty page with no copy")?;
        fail(
            self.writeback - self.any_valid(),
            "writeback of a page with no copy",
        )?;
        for (a, &x) in self.valid.iter().enumerate() {
            if a >= mems.len() {
                fail(x, "valid copy outside the topology")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PageRun, BLOCK_WORDS, PAGES_PER_BLOCK};

    /// `protection_differs` (planes) against the per-page decode it replaced in the runtime,
    /// over random protections and runs.
    #[test]
    fn protection_differs_matches_the_per_page_decode() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let all = PageMask::<BLOCK_WORDS>::from_run(
            PageRun::new(0, PAGES_PER_BLOCK, PAGES_PER_BLOCK).expect("whole block"),
        );
        let (mut differs, mut same) = (0, 0);
        for _ in 0..2000 {
            let mut st = BlockState::new(all, PageMask::EMPTY);
            // Mostly uniform protections, so that both answers occur.
            let (r, w) = (next() % 2 == 0, next() % 2 == 0);
            st.prot_read = if r { all } else { PageMask::EMPTY };
            st.prot_write = if w { all } else { PageMask::EMPTY };
            if next() % 2 == 0 {
                let p = (next() % PAGES_PER_BLOCK as u64) as usize;
                st.prot_read.set(p, next() % 2 == 0);
                st.prot_write.set(p, next() % 2 == 0);
            }
            let start = (next() % PAGES_PER_BLOCK as u64) as usize;
            let len = 1 + (next() % (PAGES_PER_BLOCK - start) as u64) as usize;
            let run = PageRun::new(start, len, PAGES_PER_BLOCK).expect("inside the block");
            let (read, write) = (next() % 2 == 0, next() % 2 == 0);
            let want = run.pages().any(|i| st.page(i).prot != (read, write));
            let got = st.protection_differs(PageMask::from_run(run), read, write);
            assert_eq!(got, want, "run {run:?}, asked ({read}, {write})");
            if want {
                differs += 1;
            } else {
                same += 1;
            }
        }
        assert!(differs > 100 && same > 100, "{differs} differ, {same} same");
    }
}
