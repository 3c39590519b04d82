//! The `Hetmem` context: devices, the userfaultfd, fault-service threads, the address map of
//! managed regions, requests with eviction, and the whole-range operations.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use hetmem_proto::{
    Access, DeviceId, DeviceKind, Event, Invalidation, Mem, PageRun, Proc, ReqId, RequestError,
    RequestKind, Topology, PAGES_PER_BLOCK, PAGE_SIZE,
};

use crate::budget::AtomicBudget;
use crate::buffer::{ManagedBuf, Registration};
use crate::device::{Device, DeviceBackend, DeviceState, SimBackend};
use crate::error::{Error, Result};
use crate::exec::Outcome;
use crate::fork::{ForkGate, GateGuard};
use crate::region::{Region, View, BLOCK_BYTES};
use crate::stats::Stats;
use crate::sys::mem::{self, Mapping};
use crate::sys::uffd::{self, Modes, Msg, Uffd};

/// Where to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// System memory.
    System,
    /// A device's memory.
    Device(DeviceId),
}

impl Target {
    fn mem(self) -> Mem {
        match self {
            Target::System => Mem::System,
            Target::Device(d) => Mem::Device(d),
        }
    }
}

/// The most fault-service threads a context runs (`HetmemBuilder::service_threads`).
pub const MAX_SERVICE_THREADS: usize = 256;

/// Simulated device settings.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    /// Private (the CPU never maps its memory) or coherent (the CPU maps it directly).
    pub kind: DeviceKind,
    /// Device memory in bytes (rounded down to pages).
    pub capacity: usize,
    /// Worker threads that run device kernels.
    pub workers: usize,
}

/// Most blocks `HetmemBuilder::readahead_blocks` takes.
const MAX_READAHEAD_BLOCKS: usize = 1 << 20;

/// Builds a [`Hetmem`].
#[derive(Debug)]
pub struct HetmemBuilder {
    devices: Vec<(SimConfig, Arc<dyn DeviceBackend>)>,
    service_threads: usize,
    fault_around: usize,
    readback_window: usize,
    readahead_blocks: usize,
}

impl Default for HetmemBuilder {
    fn default() -> Self {
        Self {
            devices: Vec::new(),
            service_threads: 2,
            fault_around: PAGES_PER_BLOCK,
            readback_window: PAGES_PER_BLOCK,
            readahead_blocks: 4,
        }
    }
}

impl HetmemBuilder {
    /// Adds a simulated device with `capacity` bytes of memory and two kernel workers.
    pub fn sim_device(self, kind: DeviceKind, capacity: usize) -> Self {
        self.sim_device_with(SimConfig {
            kind,
            capacity,
            workers: 2,
        })
    }

    /// Adds a simulated device with full settings.
    pub fn sim_device_with(self, config: SimConfig) -> Self {
        self.device_with_backend(config, Arc::new(SimBackend::new(config.kind)))
    }

    /// Adds a device whose memory and copies another backend provides (the CUDA backend's
    /// entry point). `config.kind` must match the backend's.
    pub fn device_with_backend(
        mut self,
        config: SimConfig,
        backend: Arc<dyn DeviceBackend>,
    ) -> Self {
        self.devices.push((config, backend));
        self
    }

    /// Threads that serve CPU faults (1 to `MAX_SERVICE_THREADS`, 256; default 2).
    pub fn service_threads(mut self, n: usize) -> Self {
        self.service_threads = n.clamp(1, MAX_SERVICE_THREADS);
        self
    }

    /// Pages a CPU first touch fills and maps around the faulting one (1 to 512; default 512).
    pub fn fault_around_pages(mut self, n: usize) -> Self {
        self.fault_around = n.clamp(1, PAGES_PER_BLOCK);
        self
    }

    /// Pages a CPU fault on data in private device memory brings back at once (1 to 512;
    /// default 512, one block, as UVM migrates 2 MiB on a CPU fault of a GPU-resident block).
    pub fn readback_window_pages(mut self, n: usize) -> Self {
        self.readback_window = n.clamp(1, PAGES_PER_BLOCK);
        self
    }

    /// Blocks a sequential CPU read-back brings home ahead of the faulting one (0 disables;
    /// default 4; at most 2^20, 2 TiB), as the page cache's readahead does. A service thread
    /// migrates and maps them while the application reads, except for each block's first
    /// page, whose fault keeps the stream going.
    pub fn readahead_blocks(mut self, n: usize) -> Self {
        // Bounded so that block index arithmetic (`bi + n + 1`) cannot overflow.
        self.readahead_blocks = n.min(MAX_READAHEAD_BLOCKS);
        self
    }

    /// Opens the userfaultfd, probes its features and starts the service threads.
    pub fn build(self) -> Result<Hetmem> {
        let kinds: Vec<DeviceKind> = self.devices.iter().map(|(_, b)| b.kind()).collect();
        let mut topology = Topology::new(kinds).map_err(|_| Error::Invalid("at most 8 devices"))?;
        topology.policy.cpu_fault_around = self.fault_around as u16;
        let uffd = Uffd::open(uffd::WANTED_FEATURES).map_err(Error::os("open userfaultfd"))?;
        let missing = uffd::REQUIRED_FEATURES & !uffd.features();
        if missing != 0 {
            return Err(Error::Unsupported(uffd::feature_names(missing)));
        }
        let capacity: Vec<u32> = self
            .devices
            .iter()
            .map(|(d, _)| (d.capacity / PAGE_SIZE).min(u32::MAX as usize) as u32)
            .collect();
        let kick = mem::EventFd::new().map_err(Error::os("eventfd"))?;
        let inner = Arc::new(Inner {
            budget: AtomicBudget::new(&capacity),
            devices: self
                .devices
                .iter()
                .enumerate()
                .map(|(i, (c, b))| {
                    DeviceState::new(
                        DeviceId::new(i).expect("checked by Topology"),
                        *c,
                        b.clone(),
                    )
                })
                .collect(),
            topology,
            uffd,
            continue_wp: AtomicBool::new(true),
            space: RwLock::new(BTreeMap::new()),
            displaced: Mutex::new(Vec::new()),
            kernel_runs: crate::device::KernelRuns::default(),
            regions: Mutex::new(Vec::new()),
            events: Mutex::new(()),
            backlog: Mutex::new(Vec::new()),
            kick,
            shutdown: AtomicBool::new(false),
            next_req: AtomicU64::new(1),
            next_region: AtomicU64::new(1),
            clock: AtomicU64::new(1),
            readback_window: self.readback_window,
            readahead: self.readahead_blocks,
            stats: Stats::default(),
            gate: ForkGate::default(),
            orphaned: AtomicBool::new(false),
            retry_poison: Mutex::new(Vec::new()),
            retry_pending: AtomicBool::new(false),
        });
        crate::fork::track(&inner);
        // Owned by `Shared` from the first thread on, so a spawn that fails stops and joins
        // the threads already started (its drop) instead of leaving them running.
        let shared = Arc::new(Shared {
            inner: inner.clone(),
            threads: Mutex::new(Vec::with_capacity(self.service_threads)),
        });
        for i in 0..self.service_threads {
            let inner = inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("hetmem-fault-{i}"))
                .spawn(move || inner.serve())
                .map_err(Error::os("spawn fault-service thread"))?;
            shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t);
        }
        Ok(Hetmem(shared))
    }
}

/// Handle to a hetmem context. Clones share it; buffers and devices keep it alive.
#[derive(Clone, Debug)]
pub struct Hetmem(pub(crate) Arc<Shared>);

/// Owns the service threads: stops them when the last handle goes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.inner.is_owner() {
            // A fork child: the service threads exist only in the parent.
            std::mem::forget(std::mem::take(
                self.threads.get_mut().unwrap_or_else(|e| e.into_inner()),
            ));
            return;
        }
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.kick();
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

/// A piece of an address range: one view, one block.
#[derive(Clone, Debug)]
pub(crate) struct Piece {
    pub region: Arc<Region>,
    pub bi: usize,
    pub run: PageRun,
    /// CPU address of the run's first page.
    pub va: usize,
}

/// Work read from the userfaultfd, already applied to the address map.
#[derive(Debug)]
pub(crate) enum Work {
    /// Read-ahead: bring block `bi` home and map it for the CPU.
    Prefetch { region: Arc<Region>, bi: usize },
    Fault {
        addr: usize,
        write: bool,
        /// The faulting thread (0 if the kernel does not say).
        tid: u32,
    },
    /// File bytes no view shows any more: invalidate them.
    Unmapped {
        region: Arc<Region>,
        off: usize,
        len: usize,
    },
}

/// Address map entry: `[va, end)` shows `region` from file offset `off`.
#[derive(Clone, Debug)]
pub(crate) struct MapEntry {
    pub end: usize,
    pub region: Arc<Region>,
    pub off: usize,
}

/// Everything the service threads share.
#[derive(Debug)]
pub(crate) struct Inner {
    /// Device kernel closures running now (`device/kernel_cpu.rs`).
    pub kernel_runs: crate::device::KernelRuns,
    pub topology: Topology,
    pub budget: AtomicBudget,
    pub devices: Vec<DeviceState>,
    pub uffd: Uffd,
    /// UFFDIO_CONTINUE_MODE_WP works (Linux 6.3); cleared on the first EINVAL.
    pub continue_wp: AtomicBool,
    /// Views by start address.
    pub space: RwLock<BTreeMap<usize, MapEntry>>,
    /// Stale views whose addresses a newer view took before their UNMAP or REMAP event was
    /// read (`add_region`). Lookups never see them; their event still finds them. Locked after
    /// `space`.
    displaced: Mutex<Vec<(usize, MapEntry)>>,
    pub regions: Mutex<Vec<Arc<Region>>>,
    /// Held while reading events and applying them to the address map, so a `munmap` that
    /// returned has its view removed before anyone looks at views again.
    events: Mutex<()>,
    backlog: Mutex<Vec<Work>>,
    /// Wakes service threads: backlog work or shutdown.
    kick: mem::EventFd,
    shutdown: AtomicBool,
    next_req: AtomicU64,
    next_region: AtomicU64,
    /// Logical clock for LRU.
    pub clock: AtomicU64,
    readback_window: usize,
    readahead: usize,
    pub stats: Stats,
    /// Quiesces everything for fork (see `fork.rs`).
    pub gate: ForkGate,
    /// This is a fork child's copy of the context: nothing may touch the parent's userfaultfd.
    orphaned: AtomicBool,
    /// CPU pages poisoned because a copy into them kept failing (`poison_page`).
    retry_poison: Mutex<Vec<PoisonedPage>>,
    /// `retry_poison` is not empty: checked without the lock on every drive.
    retry_pending: AtomicBool,
}

/// A page that raises SIGBUS because its data could not be brought to the CPU. The marker goes
/// (so the next access faults and the copy is tried again) at `due`, or at once when a request
/// other than a CPU fault covers the page (a device access, a migration, a flush).
#[derive(Debug)]
struct PoisonedPage {
    region: std::sync::Weak<Region>,
    bi: usize,
    page: usize,
    due: std::time::Instant,
}

/// How long a page whose copy kept failing raises SIGBUS before its next access tries again. The
/// kernel retries an unreadable page at every access; this is the nearest user space gets, since
/// a SIGBUS marker takes no fault.
const POISON_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// A block's engine, locked, inside the fork gate.
pub(crate) struct Locked<'a> {
    block: std::sync::MutexGuard<'a, hetmem_proto::Block2M>,
    _gate: GateGuard<'a>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = hetmem_proto::Block2M;
    fn deref(&self) -> &Self::Target {
        &self.block
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.block
    }
}

impl Inner {
    /// Locks a block's engine (inside the fork gate).
    pub(crate) fn lock_block<'a>(&'a self, slot: &'a crate::region::BlockSlot) -> Locked<'a> {
        let gate = self.gate.enter();
        Locked {
            block: slot.engine.lock().unwrap_or_else(|e| e.into_inner()),
            _gate: gate,
        }
    }

    /// Whether this process owns the context (false in a fork child).
    pub(crate) fn is_owner(&self) -> bool {
        // The fork child handler sets `orphaned`; no getpid on the fault path.
        !self.orphaned.load(Ordering::Relaxed)
    }

    pub(crate) fn orphan(&self) {
        self.orphaned.store(true, Ordering::Relaxed);
    }

    pub(crate) fn note_error(&self, what: &str, e: &std::io::Error) {
        self.stats.errors.add(1);
        if std::env::var_os("HETMEM_DEBUG").is_some() {
            eprintln!("hetmem: {what}: {e}");
        }
    }

    pub(crate) fn take_injected_failure(&self, dst: Mem, src: hetmem_proto::Source) -> bool {
        let dev = match (dst, src) {
            (Mem::Device(d), _) | (_, hetmem_proto::Source::Mem(Mem::Device(d))) => d,
            _ => return false,
        };
        self.devices[dev.index()]
            .fail_transfers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn kick(&self) {
        self.kick.signal();
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    // ---------------------------------------------------------------- address map

    /// `Invalid` in a fork child, whose copy of the context is dead: its service threads,
    /// fork gate and userfaultfd belong to the parent (docs/runtime.md §6). Every public call
    /// that is not a plain accessor checks this first, before it takes any lock.
    pub(crate) fn check_owner(&self) -> Result<()> {
        if !self.is_owner() {
            return Err(Error::Invalid("the context belongs to the parent process"));
        }
        Ok(())
    }

    /// The checks every range argument gets before anything is allocated or locked
    /// (docs/runtime.md §6, "Arguments"): the context is this process's, and the range is
    /// non-empty, page-aligned and does not wrap. Returns the range's end.
    pub(crate) fn check_range(&self, addr: usize, len: usize) -> Result<usize> {
        self.check_owner()?;
        if len == 0 {
            // As dmirror and munmap answer: an empty range is a mistake, not a no-op.
            return Err(Error::Invalid("empty range"));
        }
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::Invalid("address and length must be page-aligned"));
        }
        addr.checked_add(len).ok_or(Error::Invalid("range wraps"))
    }

    /// Splits `[addr, addr + len)` into pieces of one view and one block each, after
    /// [`Inner::check_range`]. `Err(Fault)` if some page is not managed memory.
    pub(crate) fn pieces(&self, addr: usize, len: usize) -> Result<Vec<Piece>> {
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
                out.push(Piece {
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
    fn insert_view(&self, space: &mut BTreeMap<usize, MapEntry>, va: usize, entry: MapEntry) {
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
    fn cut_displaced(&self, start: usize, end: usize) -> Vec<(usize, MapEntry)> {
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
    fn shown_at(va: usize, entry: &MapEntry) -> bool {
        matches!(mem::vma_info(va), Ok(Some(v)) if v.shows(entry.region.inode, va, entry.off))
    }

    /// Takes `[start, end)` out of the address map: entries that straddle it keep their parts
    /// outside it. Returns the parts inside, each with its start address.
    fn cut_views(
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
    fn sync_views(space: &BTreeMap<usize, MapEntry>, region: &Arc<Region>) {
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
    fn unmap_views(&self, start: usize, end: usize) -> Vec<(Arc<Region>, usize, usize)> {
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
    fn remap_views(&self, from: usize, to: usize, len: usize) -> Vec<Arc<Region>> {
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

    // ---------------------------------------------------------------- events

    /// Reads pending userfaultfd messages and applies unmap/remap to the address map at once.
    fn read_events(&self) -> Vec<Work> {
        let _gate = self.gate.enter();
        let _g = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut msgs = Vec::new();
        let mut work = Vec::new();
        loop {
            match self.uffd.read(&mut msgs) {
                Ok(n) if n < 32 => break,
                Ok(_) => {}
                Err(e) => {
                    self.note_error("read userfaultfd", &e);
                    break;
                }
            }
        }
        for m in msgs {
            match m {
                Msg::PageFault {
                    addr,
                    write,
                    wp,
                    tid,
                } => work.push(Work::Fault {
                    addr,
                    write: write || wp,
                    tid,
                }),
                Msg::Unmap { start, end } | Msg::Remove { start, end } => {
                    for (region, off, len) in self.unmap_views(start, end) {
                        work.push(Work::Unmapped { region, off, len });
                    }
                }
                Msg::Remap { from, to, len } => {
                    self.remap_views(from, to, len);
                }
                Msg::Other => {}
            }
        }
        work
    }

    /// Reads pending events into the backlog: userfaultfd answers EAGAIN until they are read.
    pub(crate) fn drain_events(&self) {
        let work = self.read_events();
        if !work.is_empty() {
            self.backlog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(work);
            self.kick();
        }
        std::thread::yield_now();
    }

    /// A fault-service thread.
    fn serve(self: Arc<Self>) {
        let waiter = match uffd::Waiter::new(&self.uffd, self.kick.as_fd()) {
            Ok(w) => w,
            Err(e) => return self.note_error("epoll", &e),
        };
        loop {
            // Faults first: what is pending on the descriptor and in the backlog. Then at most
            // one read-ahead, so the other threads can share them and a fault never waits
            // behind a queue of them.
            let mut work = self.read_events();
            let mut prefetch = None;
            {
                let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
                let mut rest = Vec::new();
                for w in backlog.drain(..) {
                    match w {
                        Work::Prefetch { .. } if prefetch.is_none() && work.is_empty() => {
                            prefetch = Some(w)
                        }
                        Work::Prefetch { .. } => rest.push(w),
                        _ => work.push(w),
                    }
                }
                *backlog = rest;
                if !backlog.is_empty() {
                    drop(backlog);
                    self.kick();
                }
            }
            work.extend(prefetch);
            if self.retry_pending.load(Ordering::Acquire) {
                self.unpoison(|p| p.due <= std::time::Instant::now());
            }
            if work.is_empty() {
                match waiter.wait(self.next_unpoison()) {
                    Ok(kicked) => {
                        if self.shutdown.load(Ordering::SeqCst) {
                            return;
                        }
                        if kicked {
                            self.kick.drain();
                        }
                    }
                    Err(e) => {
                        self.note_error("poll userfaultfd", &e);
                        return;
                    }
                }
                continue;
            }
            for w in work {
                match w {
                    Work::Fault { addr, write, tid } => {
                        self.cpu_fault(addr & !(PAGE_SIZE - 1), write, tid)
                    }
                    Work::Prefetch { region, bi } => self.prefetch(&region, bi),
                    Work::Unmapped { region, off, len } => {
                        self.invalidate_file_range(&region, off, len, Invalidation::Unmap)
                    }
                }
            }
        }
    }

    fn invalidate_file_range(&self, region: &Region, off: usize, len: usize, kind: Invalidation) {
        let mut at = off;
        let end = (off + len).min(region.len);
        while at < end {
            let bi = at / BLOCK_BYTES;
            let page = (at % BLOCK_BYTES) / PAGE_SIZE;
            let n = ((end - at) / PAGE_SIZE).min(PAGES_PER_BLOCK - page);
            if let Some(run) = PageRun::new(page, n, PAGES_PER_BLOCK) {
                let _ = self.invalidate(region, bi, run, kind);
            }
            at += n.max(1) * PAGE_SIZE;
        }
    }

    // ---------------------------------------------------------------- requests

    pub(crate) fn next_req(&self) -> ReqId {
        ReqId(self.next_req.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs one request to completion on one block; `after` runs under the block lock.
    /// Locks block `bi`, drives `event` through it, mirrors its frame counts for eviction,
    /// runs `after` under the lock, then wakes the CPU ranges the drive mapped.
    pub(crate) fn drive_event(
        &self,
        region: &Region,
        bi: usize,
        event: Event,
        mut after: impl FnMut(&hetmem_proto::Block2M, &Outcome),
    ) -> std::result::Result<Outcome, hetmem_proto::EventError> {
        let slot = &region.blocks[bi];
        let outcome = {
            let mut block = self.lock_block(slot);
            if self.retry_pending.load(Ordering::Acquire) {
                self.unpoison_for(region, bi, &block, &event);
            }
            let outcome = self.drive(region, bi, &mut block, event)?;
            for d in self.topology.devices() {
                slot.held[d.index()].store(block.frames_held(d), Ordering::Relaxed);
            }
            after(&block, &outcome);
            outcome
        };
        for &(va, len) in &outcome.wake {
            let _ = self.uffd.wake(va, len);
        }
        Ok(outcome)
    }

    /// Clears the markers of poisoned pages of block `bi` that `event` covers, unless it is a
    /// CPU fault: a device access, a migration or a flush of the page means its data may be
    /// reachable again, so the CPU's next access must fault and find out. (A CPU fault is not
    /// enough: a neighbour's fault must not take the SIGBUS away before the faulting thread
    /// got it.)
    fn unpoison_for(
        &self,
        region: &Region,
        bi: usize,
        block: &hetmem_proto::Block2M,
        event: &Event,
    ) {
        let pages = match *event {
            Event::Request {
                kind: RequestKind::Fault {
                    proc: Proc::Cpu, ..
                },
                ..
            } => return,
            Event::Request { pages, .. } | Event::Invalidate { pages, .. } => pages,
            Event::Advise { .. } | Event::Complete { .. } => return,
        };
        let hit = self.take_poisoned(|p| {
            std::ptr::eq(p.region.as_ptr(), region) && p.bi == bi && pages.pages().contains(&p.page)
        });
        for p in hit {
            self.clear_poison(region, bi, block, p.page);
        }
    }

    pub(crate) fn request_with(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: RequestKind,
        after: impl FnMut(&hetmem_proto::Block2M, &Outcome),
    ) -> std::result::Result<(), RequestError> {
        let id = self.next_req();
        let event = Event::Request {
            id,
            pages: run,
            kind,
        };
        self.drive_event(region, bi, event, after)
            .map_err(|_| RequestError::NoMapping)?
            .result_of(id)
            .unwrap_or(Err(RequestError::Op(hetmem_proto::OpError::Device)))
    }

    /// Like `request_with`, evicting other blocks when a device is full.
    pub(crate) fn request(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: RequestKind,
    ) -> Result<()> {
        let mut fruitless_since: Option<std::time::Instant> = None;
        loop {
            match self.request_with(region, bi, run, kind, |_, _| {}) {
                Err(RequestError::DeviceFull(d)) => {
                    if self.evict(d, region, bi, run) {
                        fruitless_since = None;
                        continue;
                    }
                    // Nothing was evictable just now. Frames another thread reserved may be
                    // inside a drive (not yet visible to eviction) or on their way back to the
                    // budget: keep trying for a while before calling the device full.
                    let since = *fruitless_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > std::time::Duration::from_millis(200) {
                        return Err(Error::NoMem);
                    }
                    std::thread::yield_now();
                }
                r => return r.map_err(Error::from),
            }
        }
    }

    /// Frees frames of `dev` by evicting the least recently used block that holds some (LRU at
    /// 2 MiB granularity, as UVM evicts root chunks), then the rest of the faulting block.
    /// Returns whether any frame was freed. Success is judged per victim block, under its
    /// lock, not from the device's total, which other threads change meanwhile.
    fn evict(&self, dev: DeviceId, cur: &Region, cur_bi: usize, keep: PageRun) -> bool {
        let regions = self
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut victims: Vec<(u64, Arc<Region>, usize)> = Vec::new();
        for r in &regions {
            for (bi, slot) in r.blocks.iter().enumerate() {
                if slot.held[dev.index()].load(Ordering::Relaxed) == 0
                    || (std::ptr::eq(&**r, cur) && bi == cur_bi)
                {
                    continue;
                }
                victims.push((
                    slot.last_use[dev.index()].load(Ordering::Relaxed),
                    r.clone(),
                    bi,
                ));
            }
        }
        victims.sort_by_key(|v| v.0);
        let evict_runs = |r: &Region, bi: usize, runs: &[Option<PageRun>]| -> u64 {
            let kind = RequestKind::Evict {
                dev,
                pages: PAGES_PER_BLOCK as u32,
                write_back: r.file.as_ref().is_some_and(|f| f.evict_to_file),
            };
            let mut freed = 0u64;
            for run in runs.iter().flatten() {
                let before = r.blocks[bi].held[dev.index()].load(Ordering::Relaxed);
                let _ = self.request_with(r, bi, *run, kind, |block, _| {
                    freed += u64::from(before.saturating_sub(block.frames_held(dev)));
                });
            }
            freed
        };
        let mut freed = 0;
        for (_, r, bi) in victims.iter().take(4) {
            let all = PageRun::new(0, r.block_pages(*bi), PAGES_PER_BLOCK);
            freed += evict_runs(r, *bi, &[all]);
            if freed > 0 {
                break;
            }
        }
        if freed == 0 {
            let pages = cur.block_pages(cur_bi);
            freed += evict_runs(
                cur,
                cur_bi,
                &[
                    PageRun::new(0, keep.start(), PAGES_PER_BLOCK),
                    PageRun::new(
                        keep.end(),
                        pages.saturating_sub(keep.end()),
                        PAGES_PER_BLOCK,
                    ),
                ],
            );
        }
        self.stats.pages_evicted.add(freed);
        self.devices[dev.index()].counters.evicted.add(freed);
        freed > 0
    }

    pub(crate) fn invalidate(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: Invalidation,
    ) -> Result<()> {
        let id = self.next_req();
        let event = Event::Invalidate {
            id,
            pages: run,
            kind,
        };
        let outcome = self
            .drive_event(region, bi, event, |block, _| {
                if matches!(kind, Invalidation::Discard | Invalidation::Unmap) {
                    // The data is gone for good: give its memory back.
                    self.release_pages(region, bi, block, run);
                }
            })
            .map_err(|_| Error::Invalid("page run outside its block"))?;
        match outcome.result_of(id) {
            Some(r) => r.map_err(Error::from),
            None => Ok(()),
        }
    }

    /// Brings the protocol's idea of the piece's protection up to date with the kernel's
    /// mappings, as hmm_range_fault checks the VMA. A raw `mprotect` has no notifier in user
    /// space, so this runs before every device access and migration. Returns whether every
    /// page of the piece is readable, and whether every one is writable.
    pub(crate) fn sync_prot(&self, p: &Piece) -> Result<(bool, bool)> {
        self.check_eof(&p.region);
        let end = p.va + p.run.len() * PAGE_SIZE;
        let mut at = p.va;
        let (mut all_read, mut all_write) = (true, true);
        while at < end {
            let Some((_, vend, read, write)) =
                mem::vma_at(at).map_err(Error::os("query mapping"))?
            else {
                return Err(Error::Fault("address is not mapped"));
            };
            all_read &= read;
            all_write &= write;
            let stop = end.min(vend.max(at + PAGE_SIZE));
            let start_page = p.run.start() + (at - p.va) / PAGE_SIZE;
            let n = (stop - at) / PAGE_SIZE;
            let run = PageRun::new(start_page, n, PAGES_PER_BLOCK).expect("inside the piece");
            let stale = {
                let block = self.lock_block(&p.region.blocks[p.bi]);
                block
                    .state()
                    .protection_differs(hetmem_proto::PageMask::from_run(run), read, write)
            };
            if stale {
                self.invalidate(&p.region, p.bi, run, Invalidation::Protect { read, write })?;
            }
            at = stop;
        }
        Ok((all_read, all_write))
    }

    /// The protection check of a device command or a migration, over all of its pieces before
    /// any of them moves data, as hmm_range_fault checks the VMAs first: `Fault` (EFAULT) if a
    /// page is not readable, `Perm` (EPERM) if `access` writes and a page is read-only.
    pub(crate) fn check_access(&self, pieces: &[Piece], access: Access) -> Result<()> {
        for p in pieces {
            let (read, write) = self.sync_prot(p)?;
            if !read {
                return Err(Error::Fault("page is PROT_NONE"));
            }
            if access != Access::Read && !write {
                return Err(Error::Perm);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- CPU faults

    /// Serves one CPU fault message. Placement first (read-back window, read-ahead, map-around),
    /// then the fault itself, which only the faulting page decides: a window that cannot be
    /// served shrinks to that page. A fault that cannot be served never unregisters the page and
    /// never lets the kernel map a copy behind the protocol's back (`docs/runtime.md` §7): it is
    /// retried with every page of its run re-checked, or the thread gets SIGBUS, or, when the
    /// message is stale (the range went away or changed protection meanwhile), the thread is
    /// woken to retry against the mappings as they are now.
    fn cpu_fault(&self, addr: usize, write: bool, tid: u32) {
        self.stats.cpu_faults.add(1);
        let Ok(pieces) = self.pieces(addr, PAGE_SIZE) else {
            return self.stale_fault(addr);
        };
        let p = &pieces[0];
        if self.kernel_cpu_access(p, write, tid) {
            return;
        }
        let page = p.run.start();
        let access = if write { Access::Write } else { Access::Read };
        self.check_eof(&p.region);
        let mut fault_run = self.place_cpu_fault(p, access);
        let mut woken = false;
        let mut rechecked = false;
        let mut failures = 0u32;
        let r = loop {
            let r = self.request_with(
                &p.region,
                p.bi,
                fault_run,
                RequestKind::Fault {
                    proc: Proc::Cpu,
                    access,
                },
                |block, outcome| {
                    // Pages this drive mapped were woken, by their ioctl or by the drive's
                    // wake list.
                    woken = outcome.cpu_mapped.contains(page)
                        || outcome
                            .wake
                            .iter()
                            .any(|&(v, l)| (v..v + l).contains(&addr));
                    if outcome.cpu_mapped.contains(page) {
                        return;
                    }
                    // The engine already considers the page mapped (a user MADV_DONTNEED zapped
                    // it, or another thread's fault mapped it first): re-install what it says.
                    if let Some((mode, _)) = block.page(page).mapping_of(Proc::Cpu) {
                        self.remap_cpu_page(addr, mode == hetmem_proto::MapMode::Read);
                    }
                },
            );
            match r {
                // The kernel let the access through, so its mapping allowed it then: the protocol
                // may hold a stale protection (a raw mprotect). Re-check every page of the run,
                // not only the faulting one, and retry.
                Err(RequestError::NoAccess | RequestError::ReadOnly) if !rechecked => {
                    rechecked = true;
                    for piece in self.run_pieces(&p.region, p.bi, fault_run) {
                        let _ = self.sync_prot(&piece);
                    }
                }
                // A window that reaches pages the access may not touch (unmapped, protected,
                // past a new end of file): the faulting page alone decides.
                Err(
                    RequestError::NoAccess
                    | RequestError::ReadOnly
                    | RequestError::NoMapping
                    | RequestError::BeyondEof,
                ) if fault_run != p.run => fault_run = p.run,
                // A copy back failed; the data stayed where it was. The faulting thread must
                // not see anything else, so it waits while we retry, backing off to 10 ms.
                Err(RequestError::Op(_)) if failures < 32 => {
                    self.stats.failed_transfers.add(1);
                    failures += 1;
                    let pause = 1u64 << failures.min(13);
                    std::thread::sleep(std::time::Duration::from_micros(pause.min(10_000)));
                }
                r => break r,
            }
        };
        match r {
            Ok(()) => {}
            // Past the end of the file: SIGBUS, as with mmap.
            Err(RequestError::BeyondEof) => self.poison_page(p, false),
            // A copy that keeps failing (a file that cannot be read, a dead device) is a memory
            // error: SIGBUS, as the kernel gives for an unreadable page, rather than a thread
            // stuck for ever. The data stays where it was; the next access retries.
            Err(RequestError::Op(_)) => self.poison_page(p, true),
            // The mapping changed since the thread faulted: unmapped (the page is no longer
            // managed memory) or protected (a raw mprotect, re-checked above). Woken, the
            // thread retries against the mapping as it is now: the kernel then gives it
            // SIGSEGV or EFAULT, as for any access to such memory.
            Err(RequestError::NoAccess | RequestError::ReadOnly) => {}
            Err(RequestError::NoMapping) if !self.still_shows(p) => {}
            Err(e) => {
                // The address map still shows the page, the protocol says otherwise, or the
                // request makes no sense for a CPU: a bug. SIGBUS rather than a stale page or a
                // hang.
                self.note_error("cpu fault", &std::io::Error::other(e.to_string()));
                self.poison_page(p, false);
            }
        }
        if !woken {
            // EEXIST, repairs and refusals wake nobody by themselves.
            let _ = self.uffd.wake(addr, PAGE_SIZE);
        }
    }

    /// A fault on an address that is not (or no longer) managed memory: its message arrived
    /// after the range was unmapped or moved (the thread may be awake already), or during a
    /// teardown of its region. Never unregister: the kernel would then map whatever the memfd
    /// holds there. Waking the thread makes it retry against the mappings as they are now
    /// (SIGSEGV, EFAULT, or a fault on memory that is managed again).
    fn stale_fault(&self, addr: usize) {
        let _ = self.uffd.wake(addr, PAGE_SIZE);
    }

    /// Whether the address map still shows piece `p`'s page at its address: the same region and
    /// page, not a newer region that took the addresses after the piece's went away.
    fn still_shows(&self, p: &Piece) -> bool {
        self.pieces(p.va, PAGE_SIZE).is_ok_and(|now| {
            Arc::ptr_eq(&now[0].region, &p.region) && now[0].bi == p.bi && now[0].run == p.run
        })
    }

    /// SIGBUS for the CPU on piece `p`'s page (UFFDIO_POISON). Under the block's lock and only
    /// while the region still shows the page at that address: a region being dropped unmaps its
    /// views only after it has taken each block's lock, so the addresses cannot pass to a newer
    /// region meanwhile. With `retry`, the data could not be copied there, which may pass: the
    /// marker goes after `POISON_RETRY_AFTER`, or when another request covers the page, and the
    /// next access tries again.
    fn poison_page(&self, p: &Piece, retry: bool) {
        let page = p.run.start();
        let _block = self.lock_block(&p.region.blocks[p.bi]);
        let mut ranges = Vec::new();
        p.region.cpu_ranges(
            p.bi * BLOCK_BYTES + page * PAGE_SIZE,
            PAGE_SIZE,
            &mut ranges,
        );
        if !ranges.contains(&(p.va, PAGE_SIZE)) {
            return;
        }
        if retry {
            self.retry_poison
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(PoisonedPage {
                    region: Arc::downgrade(&p.region),
                    bi: p.bi,
                    page,
                    due: std::time::Instant::now() + POISON_RETRY_AFTER,
                });
            self.retry_pending.store(true, Ordering::Release);
            // A service thread asleep without a timeout must learn of the deadline.
            self.kick();
        }
        self.poison(p.va, PAGE_SIZE);
    }

    /// Time until the next poisoned page is due for a retry.
    fn next_unpoison(&self) -> Option<std::time::Duration> {
        if !self.retry_pending.load(Ordering::Acquire) {
            return None;
        }
        let list = self.retry_poison.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        list.iter()
            .map(|p| p.due.saturating_duration_since(now))
            .min()
    }

    /// Takes the poisoned pages `pick` selects off the list.
    fn take_poisoned(&self, pick: impl Fn(&PoisonedPage) -> bool) -> Vec<PoisonedPage> {
        let mut list = self.retry_poison.lock().unwrap_or_else(|e| e.into_inner());
        let (picked, keep) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| pick(p));
        *list = keep;
        self.retry_pending
            .store(!list.is_empty(), Ordering::Release);
        picked
    }

    /// Clears the SIGBUS markers of the poisoned pages `pick` selects, so their next access
    /// faults again. A page the CPU maps by now (a drive mapped it over the marker) needs
    /// nothing.
    fn unpoison(&self, pick: impl Fn(&PoisonedPage) -> bool) {
        for p in self.take_poisoned(pick) {
            let Some(region) = p.region.upgrade() else {
                continue;
            };
            let block = self.lock_block(&region.blocks[p.bi]);
            self.clear_poison(&region, p.bi, &block, p.page);
        }
    }

    /// Clears the SIGBUS marker of page `page` of block `bi`, under the block's lock, unless
    /// the CPU maps the page by now.
    fn clear_poison(&self, region: &Region, bi: usize, block: &hetmem_proto::Block2M, page: usize) {
        if block.state().mapped_by(Proc::Cpu).contains(page) {
            return;
        }
        // The page is not mapped for the CPU (the protocol says so, and its lock is held):
        // zapping it removes only the poison marker.
        let off = bi * BLOCK_BYTES + page * PAGE_SIZE;
        self.zap_cpu(region, off, PAGE_SIZE, "clear a poison marker");
    }

    /// Placement for a CPU fault on piece `p` (one page): the read-back window, read-ahead and
    /// map-around, each clipped to the pages the protocol lets the access touch. Returns the run
    /// to fault: the faulting page's part of the window, or the page alone.
    fn place_cpu_fault(&self, p: &Piece, access: Access) -> PageRun {
        let page = p.run.start();
        if self.readback_window <= 1 {
            return p.run;
        }
        let w = self.readback_window;
        let start = page / w * w;
        let n = w.min(self.pages_before_eof(&p.region, p.bi).saturating_sub(start));
        let Some(window) = PageRun::new(start, n, PAGES_PER_BLOCK) else {
            return p.run;
        };
        // Read-back policy: data that lives only in private device memory comes back a window
        // at a time, not 4 KiB per fault. This is placement, decided here and carried out by
        // the protocol as an ordinary migration.
        let slot = &p.region.blocks[p.bi];
        let on_private = self.topology.devices().any(|d| {
            !self.topology.is_coherent(d) && slot.held[d.index()].load(Ordering::Relaxed) > 0
        });
        if on_private || slot.prefetched.load(Ordering::Relaxed) {
            let (only_private, runs) = {
                let block = self.lock_block(slot);
                let v = block.page(page);
                let only_private = !v.is_valid_in(Mem::System)
                    && self
                        .topology
                        .devices()
                        .any(|d| !self.topology.is_coherent(d) && v.is_valid_in(Mem::Device(d)));
                let ok = block.state().accessible(Access::Read);
                let runs: Vec<PageRun> = (hetmem_proto::PageMask::from_run(window) & ok)
                    .runs()
                    .collect();
                (only_private, runs)
            };
            let marker = slot.prefetched.swap(false, Ordering::AcqRel);
            if (only_private || marker) && self.readahead > 0 {
                self.read_ahead(&p.region, p.bi, marker);
            }
            if only_private {
                let mut own = p.run;
                for run in runs {
                    let _ = self.request(
                        &p.region,
                        p.bi,
                        run,
                        RequestKind::Migrate { dst: Mem::System },
                    );
                    if run.pages().contains(&page) {
                        // Map the page's part of the window too, or every page would still
                        // fault once.
                        own = run;
                    } else {
                        self.map_for_read(&p.region, p.bi, run);
                    }
                }
                return own;
            }
        }
        self.map_around(p, window, access)
    }

    /// A read fault on `run` on behalf of a neighbour's fault (placement): failures only mean
    /// the neighbours stay unmapped, and fault on their own.
    fn map_for_read(&self, region: &Region, bi: usize, run: PageRun) {
        let read = RequestKind::Fault {
            proc: Proc::Cpu,
            access: Access::Read,
        };
        let _ = self.request_with(region, bi, run, read, |_, _| {});
    }

    /// The pieces (one per CPU view showing them) of block `bi`'s pages `run`.
    fn run_pieces(&self, region: &Arc<Region>, bi: usize, run: PageRun) -> Vec<Piece> {
        let mut ranges = Vec::new();
        let first = bi * BLOCK_BYTES + run.start() * PAGE_SIZE;
        region.cpu_ranges_at(first, run.len() * PAGE_SIZE, &mut ranges);
        ranges
            .into_iter()
            .filter_map(|(va, off, len)| {
                let start = (off - bi * BLOCK_BYTES) / PAGE_SIZE;
                Some(Piece {
                    region: region.clone(),
                    bi,
                    run: PageRun::new(start, len / PAGE_SIZE, PAGES_PER_BLOCK)?,
                    va,
                })
            })
            .collect()
    }

    /// Map-around for resident data: when the faulting page already has data the CPU can map
    /// without a copy (system memory, after an eviction or a migration back, or a coherent
    /// device), map the window's other such pages too, with a read fault, instead of taking
    /// one fault per 4 KiB page. A read fault only downgrades device write mappings (a device
    /// that writes again faults once per block). Returns the run to fault for the faulting
    /// page itself.
    fn map_around(&self, p: &Piece, window: PageRun, access: Access) -> PageRun {
        let slot = &p.region.blocks[p.bi];
        let page = p.run.start();
        // First touches are fault-around's business; a hole has no data yet.
        if !slot
            .populated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(page)
        {
            return p.run;
        }
        let runs: Vec<PageRun> = {
            let block = self.lock_block(slot);
            let st = block.state();
            let mut reachable = st.valid_in(Mem::System);
            for d in self.topology.devices() {
                if self.topology.is_coherent(d) {
                    reachable |= st.valid_in(Mem::Device(d));
                }
            }
            let m = (hetmem_proto::PageMask::from_run(window)
                & reachable
                & st.accessible(Access::Read))
                - st.mapped_by(Proc::Cpu);
            m.runs().collect()
        };
        let mut own = p.run;
        for run in runs {
            if run.pages().contains(&page) && access == Access::Read {
                own = run;
                continue;
            }
            self.map_for_read(&p.region, p.bi, run);
        }
        own
    }

    /// A CPU read-back hit block `bi`. If the stream is sequential (the previous read-back was
    /// block `bi - 1`, or `bi` was itself read ahead), queue the next blocks.
    fn read_ahead(&self, region: &Arc<Region>, bi: usize, marker: bool) {
        let prev = region.ra_last.swap(bi, Ordering::AcqRel);
        // A stream takes two read-backs in consecutive blocks (or a read-ahead marker): one
        // read-back alone says nothing about the next block.
        if !marker && (prev == usize::MAX || prev + 1 != bi) {
            return;
        }
        let last = (bi + self.readahead).min(region.blocks.len() - 1);
        // Continue where the stream's read-ahead stopped, unless that mark belongs to an older
        // stream.
        let next = region.ra_next.load(Ordering::Acquire);
        let from = if next > bi && next <= bi + self.readahead + 1 {
            next
        } else {
            bi + 1
        };
        if from > last {
            return;
        }
        region.ra_next.store(last + 1, Ordering::Release);
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        for j in from..=last {
            backlog.push(Work::Prefetch {
                region: region.clone(),
                bi: j,
            });
        }
        drop(backlog);
        self.kick();
    }

    /// Read-ahead of one block: migrate what lives only in private device memory home and map
    /// it for the CPU, all but the first page, whose fault continues the stream.
    fn prefetch(&self, region: &Region, bi: usize) {
        let pages = self.pages_before_eof(region, bi);
        if pages == 0 {
            return;
        }
        let Some(all) = PageRun::new(0, pages, PAGES_PER_BLOCK) else {
            return;
        };
        // Only what lives in private device memory alone, and only pages the CPU may read.
        let (away, runs) = {
            let block = self.lock_block(&region.blocks[bi]);
            let st = block.state();
            let mut on_private = hetmem_proto::PageMask::EMPTY;
            for d in self.topology.devices() {
                if !self.topology.is_coherent(d) {
                    on_private |= st.valid_in(Mem::Device(d));
                }
            }
            let ok = hetmem_proto::PageMask::from_run(all) & st.accessible(Access::Read);
            let runs: Vec<PageRun> = ok.runs().collect();
            (!(on_private - st.valid_in(Mem::System)).is_empty(), runs)
        };
        if !away {
            return;
        }
        for &run in &runs {
            let home = RequestKind::Migrate { dst: Mem::System };
            if self.request(region, bi, run, home).is_err() {
                return;
            }
            self.stats.pages_prefetched.add(run.len() as u64);
        }
        for run in runs {
            // Page 0 stays unmapped: its fault continues the stream.
            let rest = match run.start() {
                0 => PageRun::new(1, run.len() - 1, PAGES_PER_BLOCK),
                _ => Some(run),
            };
            if let Some(rest) = rest {
                self.map_for_read(region, bi, rest);
            }
        }
        region.blocks[bi].prefetched.store(true, Ordering::Release);
    }

    // ---------------------------------------------------------------- regions

    pub(crate) fn new_region(
        &self,
        len: usize,
        file: Option<crate::region::FileBacking>,
    ) -> Result<Arc<Region>> {
        self.check_owner()?;
        // The length and the metadata first: nothing of the region exists yet if they fail.
        let slots = Region::reserve_blocks(len, self.devices.len())?;
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let memfd = mem::memfd(&format!("hetmem-{id}"), len).map_err(Error::os("memfd_create"))?;
        let backing =
            Mapping::shared(memfd.as_fd(), 0, len).map_err(Error::os("mmap backing view"))?;
        Ok(Arc::new(Region::new(
            memfd,
            backing,
            len,
            slots,
            self.devices.len(),
            file,
        )))
    }

    /// A CPU view of the whole region, 2 MiB-aligned, not registered yet.
    pub(crate) fn map_cpu_view(&self, region: &Region) -> Result<Mapping> {
        Mapping::shared_aligned(region.memfd.as_fd(), region.len, BLOCK_BYTES)
            .map_err(Error::os("mmap cpu view"))
    }

    pub(crate) fn register_view(&self, va: usize, len: usize) -> Result<()> {
        // SAFETY: the view stays mapped until `remove_region` unregisters it, and service
        // threads serve its faults for as long as the context lives, which every buffer
        // outlives by holding the context.
        unsafe {
            self.uffd.register(
                va,
                len,
                Modes {
                    missing: true,
                    minor: true,
                    wp: true,
                },
            )
        }
        .map(|_| ())
        .map_err(Error::os("register with userfaultfd"))
    }

    /// Takes the region out of the address map and the region list, and empties its view list.
    /// The views stay mapped and registered: the caller detaches them (`detach_views`) when
    /// their contents allow it, so no access ever reaches the memfd unmanaged while it holds a
    /// stale copy.
    pub(crate) fn retire_region(&self, region: &Arc<Region>) -> Vec<View> {
        let views: Vec<View> = {
            let _g = self.events.lock().unwrap_or_else(|e| e.into_inner());
            let mut space = self.space.write().unwrap_or_else(|e| e.into_inner());
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

    /// Makes retired views inaccessible, then unregisters them, in that order: an access racing
    /// the teardown then fails (SIGSEGV, or EFAULT for the kernel's own accesses, as after a
    /// munmap) instead of mapping whatever the memfd holds. Threads already waiting in a fault
    /// on them are woken by the unregistration and fail the same way.
    pub(crate) fn detach_views(&self, region: &Region, views: &[View]) {
        for v in views {
            // SAFETY: the view is retired: its buffer is going, so nobody may use it any more.
            if let Err(e) = unsafe { mem::protect(v.va, v.len, libc::PROT_NONE) } {
                // Part of the view is gone already (a munmap whose event is still unread):
                // protect what is left of it, one mapping at a time.
                if e.raw_os_error() != Some(libc::ENOMEM) {
                    self.note_error("mprotect a retired view", &e);
                }
                let maps = mem::maps_in(v.va, v.va + v.len).unwrap_or_default();
                for m in maps.iter().filter(|m| m.inode == region.inode) {
                    let (s, t) = (m.start.max(v.va), m.end.min(v.va + v.len));
                    // SAFETY: as above, for the part of the view still mapped.
                    let _ = unsafe { mem::protect(s, t - s, libc::PROT_NONE) };
                }
            }
            let _ = self.uffd.unregister(v.va, v.len);
        }
    }

    /// Brings every page of the region to system memory: each device releases its copies (the
    /// protection of the range does not matter, unlike for a migration). A copy that fails is
    /// retried, backing off to 10 ms, before the error is returned; the data then stays on the
    /// device.
    pub(crate) fn bring_home(&self, region: &Region) -> Result<()> {
        for bi in 0..region.blocks.len() {
            let all = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK).expect("non-empty");
            for d in self.topology.devices() {
                if region.blocks[bi].held[d.index()].load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut failures = 0u32;
                loop {
                    match self.request(region, bi, all, RequestKind::Release { dev: d }) {
                        Err(Error::Io(_)) if failures < 32 => {
                            self.stats.failed_transfers.add(1);
                            failures += 1;
                            let pause = 1u64 << failures.min(13);
                            std::thread::sleep(std::time::Duration::from_micros(pause.min(10_000)));
                        }
                        r => {
                            r?;
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn drop_all_copies(&self, region: &Region) {
        for bi in 0..region.blocks.len() {
            let all = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK).expect("non-empty");
            if let Err(e) = self.invalidate(region, bi, all, Invalidation::Unmap) {
                // A writeback that failed at unmap: the data goes with the mapping.
                self.note_error("writeback at unmap", &std::io::Error::other(e.to_string()));
            }
        }
    }

    pub(crate) fn free_region(&self, region: &Arc<Region>) {
        if !self.is_owner() {
            // A fork child: the views are its private copies; the rest is the parent's.
            for v in region
                .views
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                // SAFETY: the child's own private copy of the view, which its buffer owned.
                unsafe { libc::munmap(v.va as *mut libc::c_void, v.len) };
            }
            return;
        }
        let _gate = self.gate.enter();
        let views = self.retire_region(region);
        // Views first: nothing may reach the data while its copies go.
        self.detach_views(region, &views);
        self.drop_all_copies(region);
        for v in views {
            // SAFETY: the view belonged to this region, whose buffer is being dropped, so no
            // reference into it remains; it is no longer registered.
            unsafe { libc::munmap(v.va as *mut libc::c_void, v.len) };
        }
    }
}

impl Hetmem {
    /// A builder with no device, 2 service threads and 2 MiB fault-around.
    pub fn builder() -> HetmemBuilder {
        HetmemBuilder::default()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0.inner
    }

    /// Devices, in the order they were added.
    pub fn devices(&self) -> Vec<Device> {
        (0..self.inner().devices.len())
            .filter_map(|i| self.device(i))
            .collect()
    }

    /// Device `i`.
    pub fn device(&self, i: usize) -> Option<Device> {
        (i < self.inner().devices.len())
            .then(|| Device::new(self.0.clone(), DeviceId::new(i).expect("< 8")))
    }

    /// The userfaultfd features in use, by name.
    pub fn uffd_features(&self) -> Vec<&'static str> {
        uffd::feature_names(self.inner().uffd.features())
    }

    /// Whether kernel-mode accesses (read(2) into managed memory) are served. False when the
    /// process may only open user-mode-only userfaultfds.
    pub fn serves_kernel_faults(&self) -> bool {
        !self.inner().uffd.user_mode_only()
    }

    /// Allocates `len` bytes of managed memory (a multiple of the page size), zero-filled on
    /// first touch.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for a length that is zero, not a multiple of the page size, or beyond
    /// what a memfd can hold (2^63 bytes), and in a fork child; `NoMem` (ENOMEM) when the
    /// region's metadata (about 5 KiB per 2 MiB) cannot fit in the machine's memory, RAM and
    /// swap; `Os` when the kernel refuses the memfd or its mappings (ENOMEM when the address
    /// space is too small for them).
    pub fn alloc(&self, len: usize) -> Result<ManagedBuf> {
        let inner = self.inner();
        inner.check_owner()?;
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(Error::Invalid(
                "length must be a non-zero multiple of the page size",
            ));
        }
        let region = inner.new_region(len, None)?;
        let cpu = inner.map_cpu_view(&region)?;
        let va = cpu.addr();
        inner.register_view(va, len)?;
        // From here on the view is the region's: it is unmapped in `free_region`.
        cpu.leak();
        inner.add_region(region.clone(), va);
        Ok(ManagedBuf::new(self.0.clone(), region, va, len))
    }

    /// Adopts `[ptr, ptr + len)`, an existing private anonymous mapping, as managed memory.
    ///
    /// Its contents move into hetmem's backing at the same address (one copy: the slower path
    /// the design allows), then devices can use it like allocated memory. Dropping the
    /// [`Registration`] moves the data back into a private anonymous mapping at that address.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, shared or file mappings,
    /// memory that is not read-write or already managed, and in a fork child; `NoEnt` (ENOENT)
    /// when part of the range is not mapped; `NoMem` (ENOMEM) when the range's copy or its
    /// metadata cannot fit in the machine's memory, RAM and swap (the copy fills every page,
    /// even those never touched).
    ///
    /// # Safety
    /// No other thread may access the range during the call, and no mapping other than the
    /// one the caller owns may be in it.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<Registration> {
        let addr = ptr as usize;
        // Before anything else: in a fork child even the address map's lock may be held by a
        // thread of the parent's that the child does not have.
        let end = self.inner().check_range(addr, len)?;
        if !mem::fits_in_memory(len) {
            return Err(Error::NoMem);
        }
        let maps = mem::maps_in(addr, end).map_err(Error::os("read /proc/self/maps"))?;
        let mut at = addr;
        for m in &maps {
            if m.start > at {
                return Err(Error::NoEnt("part of the range is not mapped"));
            }
            if m.inode != 0 || !(m.path.is_empty() || m.path == "[heap]") {
                return Err(Error::Invalid("file mappings cannot be registered"));
            }
            if m.perms.as_bytes().get(3) != Some(&b'p') {
                return Err(Error::Invalid("shared mappings cannot be registered"));
            }
            if !m.perms.starts_with("rw") {
                return Err(Error::Invalid("the range must be readable and writable"));
            }
            at = m.end;
        }
        if at < end {
            return Err(Error::NoEnt("part of the range is not mapped"));
        }
        if self
            .inner()
            .space
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .range(..end)
            .any(|(_, m)| m.end > addr)
        {
            return Err(Error::Invalid("the range is already managed"));
        }
        let inner = self.inner();
        let region = inner.new_region(len, None)?;
        // SAFETY: the caller guarantees nobody touches the range during the call; the backing
        // view is ours and `len` long.
        unsafe { mem::copy(region.backing.as_ptr(), ptr, len) };
        // SAFETY: replaces the caller's private mapping with a shared view of the memfd that
        // now holds identical contents (caller's contract: no concurrent access).
        let view = unsafe { Mapping::shared_fixed(addr, region.memfd.as_fd(), 0, len) }
            .map_err(Error::os("map the registered range"))?;
        view.leak();
        for bi in 0..region.blocks.len() {
            let mut a = region.blocks[bi]
                .adopted
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            a.insert_range(0, region.block_pages(bi));
            let mut p = region.blocks[bi]
                .populated
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.insert_range(0, region.block_pages(bi));
        }
        inner.register_view(addr, len)?;
        inner.add_region(region.clone(), addr);
        Ok(Registration::new(self.0.clone(), region, addr, len))
    }

    /// Migrates a range (prefetch): `Target::System` or a device.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for no such device, an empty, unaligned or wrapping range, and in a
    /// fork child; `Fault` (EFAULT) when part of the range is not managed memory or is
    /// `PROT_NONE`; `NoMem` (ENOMEM) when the device is full and nothing can be evicted; `Io`
    /// when a copy fails (the data stays where it was).
    pub fn migrate(&self, addr: usize, len: usize, target: Target) -> Result<()> {
        let inner = self.inner();
        if let Target::Device(d) = target {
            if inner.topology.kind(d).is_none() {
                return Err(Error::Invalid("no such device"));
            }
        }
        let pieces = inner.pieces(addr, len)?;
        inner.check_access(&pieces, Access::Read)?;
        for p in pieces {
            inner.request(
                &p.region,
                p.bi,
                p.run,
                RequestKind::Migrate { dst: target.mem() },
            )?;
        }
        Ok(())
    }

    /// Drops the data of a range: allocated and registered memory reads zero afterwards, as
    /// after MADV_DONTNEED on private anonymous memory; a file mapping's dirty pages are written
    /// back first (Shared), and the range then reads the file again (`docs/file-contract.md`
    /// §13). Device copies go too.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory. Nothing is dropped then.
    /// `Io` when a file page's writeback fails: that page stays, dirty.
    pub fn discard(&self, addr: usize, len: usize) -> Result<()> {
        let inner = self.inner();
        for p in inner.pieces(addr, len)? {
            inner.invalidate(&p.region, p.bi, p.run, Invalidation::Discard)?;
        }
        Ok(())
    }

    /// mprotect through hetmem: changes the protection and invalidates device mappings beyond
    /// it at once, as an MMU notifier would.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory (nothing is changed
    /// then); `Os` when `mprotect` fails.
    pub fn protect(&self, addr: usize, len: usize, read: bool, write: bool) -> Result<()> {
        let inner = self.inner();
        let pieces = inner.pieces(addr, len)?;
        let prot = match (read, write) {
            (false, _) => libc::PROT_NONE,
            (true, false) => libc::PROT_READ,
            (true, true) => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: the range is managed memory the caller reaches; changing its protection is
        // what they ask for, and hetmem's own accesses go through the backing view.
        if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } < 0 {
            return Err(Error::os("mprotect")(std::io::Error::last_os_error()));
        }
        for p in pieces {
            inner.invalidate(
                &p.region,
                p.bi,
                p.run,
                Invalidation::Protect { read, write },
            )?;
        }
        Ok(())
    }

    /// Advice for a range, as cudaMemAdvise.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for advice naming a device the context does not have, an empty,
    /// unaligned or wrapping range, and in a fork child; `Fault` (EFAULT) when part of the
    /// range is not managed memory (no advice is taken then).
    pub fn advise(&self, addr: usize, len: usize, advice: hetmem_proto::Advice) -> Result<()> {
        let inner = self.inner();
        let named = match advice {
            hetmem_proto::Advice::PreferredLocation(Some(Mem::Device(d)))
            | hetmem_proto::Advice::AccessedBy(d, _) => Some(d),
            _ => None,
        };
        if named.is_some_and(|d| inner.topology.kind(d).is_none()) {
            return Err(Error::Invalid("no such device"));
        }
        for p in inner.pieces(addr, len)? {
            let event = Event::Advise {
                pages: p.run,
                advice,
            };
            inner
                .drive_event(&p.region, p.bi, event, |_, _| {})
                .map_err(|_| Error::Invalid("page run outside its block"))?;
        }
        Ok(())
    }

    /// Counters since the context was built.
    pub fn stats(&self) -> crate::stats::StatsSnapshot {
        self.inner().stats.snapshot()
    }

    /// Device frames in use on `dev`, in pages.
    pub fn device_pages_used(&self, dev: DeviceId) -> u32 {
        self.inner().budget.used(dev)
    }

    /// Protocol metadata bytes per managed page (engine state plus device page tables).
    pub fn metadata_bytes_per_page(&self) -> f64 {
        let engine = std::mem::size_of::<hetmem_proto::Block2M>() as f64;
        let dev = self.inner().devices.len() as f64
            * (std::mem::size_of::<crate::region::DevBlock>() + 16) as f64;
        (engine + dev + 64.0) / PAGES_PER_BLOCK as f64
    }
}

impl Region {
    pub(crate) fn set_views(&self, views: impl Iterator<Item = View>) {
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = views.collect();
    }
}
