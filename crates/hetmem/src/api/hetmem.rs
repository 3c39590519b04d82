use std::os::fd::AsFd;
use std::sync::Arc;

use hetmem_proto::{DeviceId, DeviceKind, Mem, Topology, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::api::buffer::{ManagedBuf, Registration};
use crate::api::device::Device;
use crate::device::{DeviceBackend, DeviceState, SimBackend};
use crate::error::{Error, Result};
use crate::mm::runtime::{Runtime, RuntimeHandle};
use crate::policy::{DefaultPolicy, PlacementPolicy};
use crate::sys::mem::{self, Mapping};
use crate::sys::uffd::{self, Uffd};

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

/// Fault-service threads a context starts when the builder is not told
/// (`HetmemBuilder::service_threads`): `HETMEM_SERVICE_THREADS` if it holds a number (clamped to
/// 1..=`MAX_SERVICE_THREADS`), otherwise one per CPU the process may run on
/// (`std::thread::available_parallelism`), at least 2 and at most 64. Faults on distinct blocks
/// are served in parallel, one per thread; an idle thread sleeps in `epoll_wait`, and a fault
/// wakes one thread only (EPOLLEXCLUSIVE).
pub fn default_service_threads() -> usize {
    if let Some(n) = std::env::var("HETMEM_SERVICE_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.clamp(1, MAX_SERVICE_THREADS);
    }
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 64))
}

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
    /// Set by `service_threads`; otherwise `HETMEM_SERVICE_THREADS`, otherwise the machine's.
    service_threads: Option<usize>,
    fault_around: usize,
    readback_window: usize,
    readahead_blocks: usize,
    policy: Option<Arc<dyn PlacementPolicy>>,
    trace: Option<std::path::PathBuf>,
    thrashing: Option<crate::policy::ThrashingConfig>,
    density: Option<crate::policy::DensityConfig>,
    counters: Option<crate::policy::AccessCounterConfig>,
}

impl Default for HetmemBuilder {
    fn default() -> Self {
        Self {
            devices: Vec::new(),
            service_threads: None,
            fault_around: PAGES_PER_BLOCK,
            readback_window: PAGES_PER_BLOCK,
            readahead_blocks: 4,
            policy: None,
            trace: None,
            thrashing: Some(crate::policy::ThrashingConfig::default()),
            density: Some(crate::policy::DensityConfig::default()),
            counters: Some(crate::policy::AccessCounterConfig::default()),
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

    /// Threads that serve CPU faults (1 to `MAX_SERVICE_THREADS`, 256). Without this call,
    /// `HETMEM_SERVICE_THREADS` says how many; without it, one per CPU the process may run on,
    /// at least 2 and at most 64 ([`default_service_threads`]).
    pub fn service_threads(mut self, n: usize) -> Self {
        self.service_threads = Some(n.clamp(1, MAX_SERVICE_THREADS));
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
    /// Places data with `policy` instead of [`DefaultPolicy`] (which
    /// `readback_window_pages` and `readahead_blocks` configure). A policy only chooses: its
    /// plans are carried out as ordinary protocol requests, so it cannot break coherence.
    pub fn policy(mut self, policy: Arc<dyn PlacementPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The default policy's thrashing mitigation (`policy::thrashing`): a block whose data
    /// moves between the CPU and a device `threshold` times within `window` is pinned to
    /// system memory for `pin`, devices mapping it remotely. `None` turns it off: data then
    /// migrates on every fault (migrate-always). Ignored with a policy of one's own.
    pub fn thrashing(mut self, config: Option<crate::policy::ThrashingConfig>) -> Self {
        self.thrashing = config;
        self
    }

    /// The default policy's density prefetch for device faults (`policy::density`): when more
    /// than `threshold` (51%) of an aligned region around a device fault has faulted, the rest
    /// of it comes with the fault. `None` turns it off: a device fault brings only its pages.
    /// Ignored with a policy of one's own.
    pub fn density_prefetch(mut self, config: Option<crate::policy::DensityConfig>) -> Self {
        self.density = config;
        self
    }

    /// The default policy's access counters: a block a device keeps reaching remotely (it is
    /// in system memory, mapped there because of `AccessedBy` or `PreferredLocation` advice)
    /// migrates to that device past `threshold` pages (8 × 512 by default). `None` turns them
    /// off. Ignored with a policy of one's own.
    pub fn access_counters(mut self, config: Option<crate::policy::AccessCounterConfig>) -> Self {
        self.counters = config;
        self
    }

    /// Writes a trace of what the context does to `path`: faults, migrations, fills, evictions,
    /// invalidations, policy decisions, launches and lease breaks, as Chrome trace events that
    /// Perfetto and `chrome://tracing` open and `hetmem trace PATH --html OUT` renders. Without
    /// this call, `HETMEM_TRACE=path` turns it on. The file is complete once the context is
    /// dropped. Off, tracing costs nothing measurable; on, see `hetmem bench --trace`.
    pub fn trace(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.trace = Some(path.into());
        self
    }

    pub fn build(self) -> Result<Hetmem> {
        if self.devices.iter().any(|(c, b)| c.kind != b.kind()) {
            return Err(Error::Invalid("a device's kind differs from its backend's"));
        }
        let kinds: Vec<DeviceKind> = self.devices.iter().map(|(_, b)| b.kind()).collect();
        let mut topology = Topology::new(kinds).map_err(|_| Error::Invalid("at most 8 devices"))?;
        topology.policy.cpu_fault_around = self.fault_around as u16;
        let uffd = Uffd::open(uffd::WANTED_FEATURES).map_err(Error::os("open userfaultfd"))?;
        let missing = uffd::REQUIRED_FEATURES & !uffd.features();
        if missing != 0 {
            return Err(Error::Unsupported(uffd::feature_names(missing)));
        }
        let devices = self
            .devices
            .iter()
            .map(|(c, b)| DeviceState::new(c.capacity, c.workers, b.clone()))
            .collect();
        let trace_path = self
            .trace
            .clone()
            .or_else(|| std::env::var_os("HETMEM_TRACE").map(Into::into))
            .filter(|p| !p.as_os_str().is_empty());
        let tracer = match trace_path {
            Some(p) => {
                Some(crate::trace::Tracer::create(&p).map_err(Error::os("create trace file"))?)
            }
            None => None,
        };
        let runtime = Runtime::new(
            topology,
            uffd,
            devices,
            self.policy.unwrap_or_else(|| {
                Arc::new(
                    DefaultPolicy::new(self.readback_window, self.readahead_blocks)
                        .with_thrashing(self.thrashing)
                        .with_density(self.density)
                        .with_access_counters(self.counters),
                )
            }),
            tracer,
        )?;
        crate::mm::fork::track(&runtime);
        let threads = self.service_threads.unwrap_or_else(default_service_threads);
        let shared = RuntimeHandle::start(runtime, threads)?;
        Ok(Hetmem(shared))
    }
}

/// Handle to a hetmem context. Clones share it; buffers and devices keep it alive.
#[derive(Clone, Debug)]
pub struct Hetmem(pub(crate) Arc<RuntimeHandle>);
impl Hetmem {
    /// A builder with no device, 2 service threads and 2 MiB fault-around.
    pub fn builder() -> HetmemBuilder {
        HetmemBuilder::default()
    }

    pub(crate) fn inner(&self) -> &Runtime {
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
        let region = inner.new_region(len, None, true)?;
        let cpu = inner.map_cpu_view(&region)?;
        let va = cpu.addr();
        inner.register_view(va, len)?;
        // From here on the view is the region's: it is unmapped in `free_region`.
        cpu.leak();
        inner.space.add_region(region.clone(), va);
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
    /// metadata cannot fit in the memory the machine can give now (the copy fills every page,
    /// even those never touched).
    ///
    /// # Safety
    /// No other thread may access the range during the call, and no mapping other than the
    /// one the caller owns may be in it.
    #[allow(unsafe_code)]
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
        if self.inner().space.overlaps(addr, end) {
            return Err(Error::Invalid("the range is already managed"));
        }
        let inner = self.inner();
        let region = inner.new_region(len, None, false)?;
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
        inner.space.add_region(region.clone(), addr);
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
        self.inner().migrate(addr, len, target.mem())
    }

    /// Migrates `[addr, addr + len)` to `target` in the background, as `cudaMemPrefetchAsync`:
    /// returns at once, once the range is checked, with a handle to wait on. The fault-service
    /// threads run it block by block, after the faults they serve. Dropping the handle does not
    /// cancel it.
    ///
    /// # Errors
    /// As [`Hetmem::migrate`] for the range, before anything runs; the migration's own errors
    /// come from [`Prefetch::wait`].
    pub fn prefetch(&self, addr: usize, len: usize, target: Target) -> Result<Prefetch> {
        Ok(Prefetch {
            done: self.inner().prefetch_range(addr, len, target.mem())?,
        })
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
        self.inner().discard(addr, len)
    }

    /// mprotect through hetmem: changes the protection and invalidates device mappings beyond
    /// it at once, as an MMU notifier would.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory (nothing is changed
    /// then); `Os` when `mprotect` fails.
    pub fn protect(&self, addr: usize, len: usize, read: bool, write: bool) -> Result<()> {
        self.inner().protect(addr, len, read, write)
    }

    /// Advice for a range, as cudaMemAdvise.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for advice naming a device the context does not have, an empty,
    /// unaligned or wrapping range, and in a fork child; `Fault` (EFAULT) when part of the
    /// range is not managed memory (no advice is taken then).
    pub fn advise(&self, addr: usize, len: usize, advice: hetmem_proto::Advice) -> Result<()> {
        self.inner().advise(addr, len, advice)
    }

    /// Counters since the context was built.
    pub fn stats(&self) -> crate::stats::StatsSnapshot {
        self.inner().stats.snapshot()
    }

    /// Device frames in use on `dev`, in pages.
    pub fn device_pages_used(&self, dev: DeviceId) -> u32 {
        self.inner().budget.used(dev)
    }

    /// Protocol metadata bytes per managed page: engine state plus each device's slot per
    /// block. The device page tables are the backends', made when a device first maps a page
    /// of a block, and are not counted.
    pub fn metadata_bytes_per_page(&self) -> f64 {
        let engine = std::mem::size_of::<hetmem_proto::Block2M>() as f64;
        let dev = self.inner().devices.len() as f64
            * (std::mem::size_of::<crate::mm::region::DevBlock>() + 16) as f64;
        (engine + dev + 64.0) / PAGES_PER_BLOCK as f64
    }
}

/// A migration running in the background (`Hetmem::prefetch`).
#[derive(Debug)]
pub struct Prefetch {
    done: Arc<crate::mm::work::Background>,
}

impl Prefetch {
    /// Whether every block of it has been migrated (or has failed).
    pub fn is_done(&self) -> bool {
        self.done.is_done()
    }

    /// Waits until it has finished.
    ///
    /// # Errors
    /// The first block's error, as `Hetmem::migrate` gives it (`NoMem`, `Io`, ...); `Invalid`
    /// if the context was dropped before it ran.
    pub fn wait(self) -> Result<()> {
        self.done.wait()
    }
}
