//! The default placement rules: a read-back window for data that lives only in private device
//! memory, map-around for resident data, sequential read-ahead of whole blocks, LRU eviction at
//! 2 MiB granularity (as UVM evicts root chunks), and thrashing mitigation (`thrashing.rs`:
//! a block that ping-pongs between the CPU and a device is pinned to system memory for a
//! while and mapped remotely).

use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_proto::{DeviceId, PageRun, PAGES_PER_BLOCK};

use super::thrashing::{self, Thrashing, ThrashingConfig, Verdict};
use super::{
    Candidate, CpuFault, CpuFaultPlan, DeviceFault, DeviceFaultPlan, MemEvent, PlacementPolicy,
};

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
        }
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
            MemEvent::DeviceAccess { dev, block, .. } => {
                let now = self.clock.fetch_add(1, Ordering::Relaxed);
                block.stamps[dev.index()].store(now, Ordering::Relaxed);
            }
            MemEvent::ReadAheadDone { block } => block.marked.store(true, Ordering::Release),
            _ => {}
        }
    }

    fn cpu_fault(&self, f: &CpuFault<'_>) -> CpuFaultPlan {
        if let Some(t) = &self.thrashing {
            t.cpu_fault(thrashing::state_of(f.block), f.only_on_private_device);
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
        let Some(t) = &self.thrashing else {
            return DeviceFaultPlan::Keep;
        };
        let b = thrashing::state_of(f.block);
        match t.device_fault(b, f.dev.index(), f.to_device, f.advised) {
            Verdict::Keep => DeviceFaultPlan::Keep,
            Verdict::Pin { flips, within } => DeviceFaultPlan::PinToSystem { flips, within },
            Verdict::Unpin => DeviceFaultPlan::Unpin,
        }
    }

    fn victims(&self, dev: DeviceId, candidates: &mut Vec<Candidate<'_>>) {
        candidates.sort_by_key(|c| c.block.stamps[dev.index()].load(Ordering::Relaxed));
        candidates.truncate(VICTIMS_PER_ROUND);
    }
}
