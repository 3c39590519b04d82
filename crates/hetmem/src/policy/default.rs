//! The default placement rules: a read-back window for data that lives only in private device
//! memory, map-around for resident data, sequential read-ahead of whole blocks, LRU eviction at
//! 2 MiB granularity (as UVM evicts root chunks; clean blocks first among the coldest), and thrashing mitigation (`thrashing.rs`:
//! a block that ping-pongs between the CPU and a device is pinned to system memory for a
//! while and mapped remotely).

use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_proto::{DeviceId, PageRun, PAGES_PER_BLOCK};

use super::density::{self, DensityBlock, DensityConfig};
use super::thrashing::{Thrashing, ThrashingBlock, ThrashingConfig, Verdict};
use super::{
    Candidate, CpuFault, CpuFaultPlan, DeviceAccessed, DeviceFault, DeviceFaultPlan, MemEvent,
    Placement, PlacementPolicy, PolicyBlock,
};

/// The default policy's state of a block, in its `PolicyBlock::extra` slot.
#[derive(Debug, Default)]
struct DefaultBlock {
    thrashing: ThrashingBlock,
    density: DensityBlock,
    /// Access counters: pages each device reached remotely since the block last migrated.
    remote: [AtomicU64; 8],
}

/// Access counters (UVM's): a block a device keeps reaching remotely, `threshold` pages in all
/// (by default 8 times the block's 512), migrates to that device, unless it is pinned to system
/// memory for thrashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessCounterConfig {
    pub threshold: u64,
}

impl Default for AccessCounterConfig {
    fn default() -> Self {
        Self {
            threshold: 8 * PAGES_PER_BLOCK as u64,
        }
    }
}

/// `block`'s state, made on first use.
fn state_of(block: &PolicyBlock) -> &DefaultBlock {
    block
        .extra
        .get_or_init(|| Box::new(DefaultBlock::default()))
        .downcast_ref::<DefaultBlock>()
        .expect("the block's policy slot holds the default policy's state")
}

/// Victims tried per eviction round before the rest of the faulting block.
const VICTIMS_PER_ROUND: usize = 4;

/// The default placement policy.
#[derive(Debug)]
pub struct DefaultPolicy {
    readback_window: usize,
    readahead: usize,
    /// Logical clock for LRU.
    clock: AtomicU64,
    /// Thrashing detection, unless turned off (`with_thrashing(None)`: migrate always).
    thrashing: Option<Thrashing>,
    /// Density prefetch for device faults, unless turned off (`with_density(None)`).
    density: Option<DensityConfig>,
    /// Access counters, unless turned off (`with_access_counters(None)`).
    counters: Option<AccessCounterConfig>,
}

impl DefaultPolicy {
    /// `readback_window` pages (1 to 512) come home together when a CPU fault finds data only
    /// in private device memory, and that many pages are mapped around a fault on resident
    /// data; `readahead` blocks are read ahead of a sequential stream of such faults.
    pub fn new(readback_window: usize, readahead: usize) -> Self {
        Self {
            readback_window: readback_window.clamp(1, PAGES_PER_BLOCK),
            readahead,
            clock: AtomicU64::new(1),
            thrashing: Some(Thrashing::new(ThrashingConfig::default())),
            density: Some(DensityConfig::default()),
            counters: Some(AccessCounterConfig::default()),
        }
    }

    /// With access counters set up by `config`, or without them (`None`: remotely mapped
    /// blocks stay where they are).
    pub fn with_access_counters(mut self, config: Option<AccessCounterConfig>) -> Self {
        self.counters = config;
        self
    }

    /// With density prefetch set up by `config`, or without it (`None`: a device fault brings
    /// the faulting pages only).
    pub fn with_density(mut self, config: Option<DensityConfig>) -> Self {
        self.density = config;
        self
    }

    /// With thrashing mitigation set up by `config`, or without it (`None`: data migrates on
    /// every fault, however often it ping-pongs).
    pub fn with_thrashing(mut self, config: Option<ThrashingConfig>) -> Self {
        self.thrashing = config.map(Thrashing::new);
        self
    }

    /// A CPU read-back hit block `bi`. If the stream is sequential (the previous read-back was
    /// block `bi - 1`, or `bi` was itself read ahead), the next blocks to read.
    fn read_ahead(
        &self,
        f: &CpuFault<'_>,
        marker: bool,
    ) -> Option<std::ops::RangeInclusive<usize>> {
        let bi = f.block_index;
        let prev = f.region.last.swap(bi, Ordering::AcqRel);
        // A stream takes two read-backs in consecutive blocks (or a read-ahead marker): one
        // read-back alone says nothing about the next block.
        if !marker && (prev == usize::MAX || prev + 1 != bi) {
            return None;
        }
        let last = (bi + self.readahead).min(f.blocks - 1);
        // Continue where the stream's read-ahead stopped, unless that mark belongs to an older
        // stream.
        let next = f.region.next.load(Ordering::Acquire);
        let from = if next > bi && next <= bi + self.readahead + 1 {
            next
        } else {
            bi + 1
        };
        if from > last {
            return None;
        }
        f.region.next.store(last + 1, Ordering::Release);
        Some(from..=last)
    }
}

impl PlacementPolicy for DefaultPolicy {
    fn observe(&self, event: &MemEvent<'_>) {
        match *event {
            MemEvent::DeviceAccess {
                dev, block, remote, ..
            } => {
                let now = self.clock.fetch_add(1, Ordering::Relaxed);
                block.stamps[dev.index()].store(now, Ordering::Relaxed);
                if remote > 0 && self.counters.is_some() {
                    if let Some(c) = state_of(block).remote.get(dev.index()) {
                        c.fetch_add(remote, Ordering::Relaxed);
                    }
                }
            }
            MemEvent::ReadAheadDone { block } => block.marked.store(true, Ordering::Release),
            _ => {}
        }
    }

    fn cpu_fault(&self, f: &CpuFault<'_>) -> CpuFaultPlan {
        if let Some(t) = &self.thrashing {
            t.cpu_fault(&state_of(f.block).thrashing, f.only_on_private_device);
        }
        if f.only_on_private_device && self.density.is_some() {
            // The data comes home: what the device faulted there is history.
            state_of(f.block).density.clear();
        }
        let w = self.readback_window;
        if w <= 1 {
            return CpuFaultPlan::default();
        }
        let start = f.page / w * w;
        let n = w.min(f.pages.saturating_sub(start));
        let Some(window) = PageRun::new(start, n, PAGES_PER_BLOCK) else {
            return CpuFaultPlan::default();
        };
        // Read-back: data that lives only in private device memory comes back a window at a
        // time, not 4 KiB per fault, and a stream of such faults (or a fault on a block read
        // ahead) reads the next blocks ahead.
        let marker = f.block.marked.swap(false, Ordering::AcqRel);
        let read_ahead = if (f.only_on_private_device || marker) && self.readahead > 0 {
            self.read_ahead(f, marker)
        } else {
            None
        };
        CpuFaultPlan {
            window: Some(window),
            bring_home: f.only_on_private_device,
            read_ahead,
        }
    }

    fn device_fault(&self, f: &DeviceFault<'_>) -> DeviceFaultPlan {
        let state = state_of(f.block);
        let placement = match &self.thrashing {
            None => Placement::Keep,
            Some(t) => {
                match t.device_fault(&state.thrashing, f.dev.index(), f.to_device, f.advised) {
                    Verdict::Keep => Placement::Keep,
                    Verdict::Pin { flips, within } => Placement::PinToSystem { flips, within },
                    Verdict::Unpin => Placement::Unpin,
                }
            }
        };
        // Prefetch only what would migrate: not a pinned block's, nor data already there.
        let prefetch = match (&self.density, placement) {
            (Some(c), Placement::Keep) if f.to_device && !f.advised => {
                density::on_fault(&state.density, c, f.run, f.pages)
            }
            _ => None,
        };
        DeviceFaultPlan {
            placement,
            prefetch,
        }
    }

    fn device_accessed(&self, a: &DeviceAccessed<'_>) -> bool {
        let Some(config) = &self.counters else {
            return false;
        };
        let state = state_of(a.block);
        let Some(counter) = state.remote.get(a.dev.index()) else {
            return false;
        };
        if counter.load(Ordering::Relaxed) < config.threshold {
            return false;
        }
        counter.store(0, Ordering::Relaxed);
        // A block pinned for thrashing is reached remotely on purpose.
        !self
            .thrashing
            .as_ref()
            .is_some_and(|t| t.is_pinned(&state.thrashing))
    }

    /// Least recently used first, and among the coldest (twice as many as are tried), clean
    /// blocks before dirty ones: a clean block's frames go without a copy.
    fn victims(&self, dev: DeviceId, candidates: &mut Vec<Candidate<'_>>) {
        candidates.sort_by_key(|c| c.block.stamps[dev.index()].load(Ordering::Relaxed));
        candidates.truncate(2 * VICTIMS_PER_ROUND);
        candidates.sort_by_key(|c| c.copies > 0);
        candidates.truncate(VICTIMS_PER_ROUND);
    }
}
