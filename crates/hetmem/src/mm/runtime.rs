//! The runtime: the state the service threads and the handles share, and what every part of the
//! memory manager needs (the fork gate, ownership after fork, error counting, request ids).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hetmem_proto::{DeviceId, Mem, ReqId, Topology, PAGE_SIZE};

use crate::budget::AtomicBudget;
use crate::device::DeviceState;
use crate::error::{Error, Result};
use crate::mm::completions::Completions;
use crate::mm::gate::{ForkGate, GateGuard};
use crate::mm::kernel_runs::KernelRuns;
use crate::mm::poison::PoisonList;
use crate::mm::space::{AddressSpace, BlockSpan};
use crate::mm::testing::TransferFaults;
use crate::mm::work::ServiceQueue;
use crate::policy::{MemEvent, PlacementPolicy};
use crate::stats::Stats;
use crate::sys::uffd::Uffd;
use crate::trace::Tracer;

/// Owns the service threads: stops them when the last handle goes.
#[derive(Debug)]
pub(crate) struct RuntimeHandle {
    pub(crate) inner: Arc<Runtime>,
    pub(crate) threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for RuntimeHandle {
    fn drop(&mut self) {
        if !self.inner.is_owner() {
            // A fork child: the service threads exist only in the parent.
            std::mem::forget(std::mem::take(
                self.threads.get_mut().unwrap_or_else(|e| e.into_inner()),
            ));
            return;
        }
        self.inner.work.shut_down();
        if let Some(t) = self.inner.trace() {
            // The file is closed when the runtime goes; what the threads wrote is out now.
            t.flush();
        }
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        self.inner.work.abandon();
    }
}

/// Everything the service threads share.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Device kernel closures running now (`mm/kernel_cpu.rs`).
    pub(crate) kernel_runs: KernelRuns,
    pub(crate) topology: Topology,
    pub(crate) budget: AtomicBudget,
    pub(crate) devices: Vec<DeviceState>,
    pub(crate) uffd: Uffd,
    /// UFFDIO_CONTINUE_MODE_WP works (Linux 6.3); cleared on the first EINVAL.
    pub(crate) continue_wp: AtomicBool,
    /// Views and regions.
    pub(crate) space: AddressSpace,
    /// Work for the service threads beside userfaultfd messages, and their wake-up.
    pub(crate) work: ServiceQueue,
    pub(crate) next_req: AtomicU64,
    pub(crate) next_region: AtomicU64,
    /// Placement: what to bring, read ahead and evict (`crate::policy`).
    pub(crate) policy: Arc<dyn PlacementPolicy>,
    pub(crate) stats: Stats,
    /// Quiesces everything for fork (`mm/fork.rs`).
    pub(crate) gate: ForkGate,
    /// This is a fork child's copy of the context: nothing may touch the parent's userfaultfd.
    pub(crate) orphaned: AtomicBool,
    /// CPU pages poisoned because a copy into them kept failing (`Runtime::poison_page`).
    pub(crate) poisoned: PoisonList,
    /// Mappings with CPU faults parked at their lease breaks' gates (`mm/lease_break.rs`).
    pub(crate) parked: crate::mm::parked::ParkedGates,
    /// Results of requests that finished in another thread's drive (`Runtime::drive`).
    pub(crate) completions: Completions,
    /// The trace file, when tracing is on (`HetmemBuilder::trace`, `crate::trace`).
    pub(crate) tracer: Option<Tracer>,
    /// Test hook: device transfers to fail (`crate::mm::testing`).
    pub(crate) transfer_faults: TransferFaults,
}

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

impl RuntimeHandle {
    /// Starts `threads` fault-service threads for `runtime`. They are owned by the handle from
    /// the first one on, so a spawn that fails stops and joins the ones already started (its
    /// drop) instead of leaving them running.
    pub(crate) fn start(runtime: Arc<Runtime>, threads: usize) -> Result<Arc<Self>> {
        let handle = Arc::new(RuntimeHandle {
            inner: runtime.clone(),
            threads: Mutex::new(Vec::with_capacity(threads)),
        });
        for i in 0..threads {
            let runtime = runtime.clone();
            let t = std::thread::Builder::new()
                .name(format!("hetmem-fault-{i}"))
                .spawn(move || runtime.serve())
                .map_err(Error::os("spawn fault-service thread"))?;
            handle
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t);
        }
        Ok(handle)
    }
}

impl Runtime {
    /// A runtime over `uffd` with `devices` (whose kinds `topology` lists in order); it is
    /// the caller tracks it for fork (`fork::track`).
    pub(crate) fn new(
        topology: Topology,
        uffd: Uffd,
        devices: Vec<DeviceState>,
        policy: Arc<dyn PlacementPolicy>,
        tracer: Option<Tracer>,
    ) -> Result<Arc<Self>> {
        let capacity: Vec<u32> = devices
            .iter()
            .map(|d| (d.capacity / PAGE_SIZE).min(u32::MAX as usize) as u32)
            .collect();
        let runtime = Arc::new(Runtime {
            transfer_faults: TransferFaults::new(devices.len()),
            budget: AtomicBudget::new(&capacity),
            devices,
            topology,
            uffd,
            continue_wp: AtomicBool::new(true),
            space: AddressSpace::default(),
            kernel_runs: KernelRuns::default(),
            work: ServiceQueue::new().map_err(Error::os("eventfd"))?,
            next_req: AtomicU64::new(1),
            next_region: AtomicU64::new(1),
            policy,
            stats: Stats::default(),
            gate: ForkGate::default(),
            orphaned: AtomicBool::new(false),
            poisoned: PoisonList::default(),
            parked: Default::default(),
            completions: Completions::default(),
            tracer,
        });
        Ok(runtime)
    }

    /// Locks a block's engine (inside the fork gate).
    pub(crate) fn lock_block<'a>(&'a self, slot: &'a crate::mm::region::BlockSlot) -> Locked<'a> {
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

    /// Publishes one event to the statistics, the devices' counters and the policy.
    pub(crate) fn emit(&self, event: MemEvent<'_>) {
        self.stats.record(&event);
        let count = |d: DeviceId| &self.devices[d.index()].counters;
        match event {
            MemEvent::DeviceCommandFaulted { dev } => count(dev).faults.add(1),
            MemEvent::DeviceAccess { dev, pages, .. } => count(dev).pages.add(pages),
            MemEvent::Filled {
                to: Mem::Device(d),
                pages,
                ..
            }
            | MemEvent::FileRead {
                to: Mem::Device(d),
                pages,
            }
            | MemEvent::Migrated {
                to: Mem::Device(d),
                pages,
                ..
            } => count(d).migrated_in.add(pages),
            MemEvent::Migrated {
                from: Mem::Device(d),
                to: Mem::System,
                pages,
                ..
            } => count(d).migrated_out.add(pages),
            MemEvent::Evicted { dev, pages } => count(dev).evicted.add(pages),
            _ => {}
        }
        self.policy.observe(&event);
    }

    pub(crate) fn note_error(&self, what: &str, e: &std::io::Error) {
        self.emit(MemEvent::Error);
        if std::env::var_os("HETMEM_DEBUG").is_some() {
            eprintln!("hetmem: {what}: {e}");
        }
    }

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

    /// Splits `[addr, addr + len)` into spans of one view and one block each, after
    /// [`Runtime::check_range`]. `Err(Fault)` if some page is not managed memory.
    pub(crate) fn pieces(&self, addr: usize, len: usize) -> Result<Vec<BlockSpan>> {
        let end = self.check_range(addr, len)?;
        self.space.spans(addr, end)
    }

    /// The span of the one page at `addr`: `pieces(addr, PAGE_SIZE)`'s only piece, without
    /// allocating (the fault path).
    pub(crate) fn page_span(&self, addr: usize) -> Result<BlockSpan> {
        self.check_range(addr, PAGE_SIZE)?;
        self.space.span_at(addr)
    }

    /// The tracer, when tracing is on: `if let Some(t) = self.trace() { t.instant(..) }` costs
    /// one branch when it is off.
    #[inline]
    pub(crate) fn trace(&self) -> Option<&Tracer> {
        // A fork child's copy shares the parent's file: only the parent writes it.
        self.tracer.as_ref().filter(|_| self.is_owner())
    }

    pub(crate) fn next_req(&self) -> ReqId {
        ReqId(self.next_req.fetch_add(1, Ordering::Relaxed))
    }
}
