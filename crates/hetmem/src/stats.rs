//! Counters, for the demo, the benchmarks and policy research.

use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_proto::Mem;

use crate::policy::MemEvent;

/// A relaxed event counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub cpu_faults: Counter,
    pub device_faults: Counter,
    pub pages_to_device: Counter,
    pub pages_to_system: Counter,
    pub pages_evicted: Counter,
    pub zero_fills: Counter,
    pub bytes_copied: Counter,
    pub errors: Counter,
    pub failed_transfers: Counter,
    pub pages_prefetched: Counter,
    pub pages_from_file: Counter,
    pub pages_written_back: Counter,
    pub lease_breaks: Counter,
    pub thrashing_pins: Counter,
    pub launch_waits: Counter,
    pub blocks_flushed: Counter,
    pub blocks_reclaimed: Counter,
    pub break_waits: Counter,
    pub pages_conflicted: Counter,
    pub background_writebacks: Counter,
}

impl Stats {
    /// Counts one event of the memory manager's stream.
    pub fn record(&self, event: &MemEvent<'_>) {
        match *event {
            MemEvent::CpuFault { .. } => self.cpu_faults.add(1),
            MemEvent::DeviceFault { .. } => self.device_faults.add(1),
            MemEvent::Filled { to, pages, zeroed } => {
                self.zero_fills.add(zeroed);
                if matches!(to, Mem::Device(_)) {
                    self.pages_to_device.add(pages);
                }
            }
            MemEvent::Migrated {
                from,
                to,
                pages,
                bytes,
            } => {
                self.bytes_copied.add(bytes);
                match (from, to) {
                    (_, Mem::Device(_)) => self.pages_to_device.add(pages),
                    (Mem::Device(_), Mem::System) => self.pages_to_system.add(pages),
                    _ => {}
                }
            }
            MemEvent::FileRead { to, pages } => {
                self.pages_from_file.add(pages);
                if matches!(to, Mem::Device(_)) {
                    self.pages_to_device.add(pages);
                }
            }
            MemEvent::WrittenBack { pages } => self.pages_written_back.add(pages),
            MemEvent::Evicted { pages, .. } => self.pages_evicted.add(pages),
            MemEvent::Prefetched { pages } => self.pages_prefetched.add(pages),
            MemEvent::TransferFailed => self.failed_transfers.add(1),
            MemEvent::LeaseBroken => self.lease_breaks.add(1),
            MemEvent::ThrashingPinned { .. } => self.thrashing_pins.add(1),
            MemEvent::LaunchWaited { .. } => self.launch_waits.add(1),
            MemEvent::Error => self.errors.add(1),
            MemEvent::DeviceCommandFaulted { .. }
            | MemEvent::DeviceAccess { .. }
            | MemEvent::ReadAheadDone { .. } => {}
        }
    }
}

/// What the runtime did since the context was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StatsSnapshot {
    /// CPU faults served (userfaultfd page faults).
    pub cpu_faults: u64,
    /// Device fault rounds, all devices.
    pub device_faults: u64,
    /// Pages copied into device memory.
    pub pages_to_device: u64,
    /// Pages copied from device memory to system memory.
    pub pages_to_system: u64,
    /// Device frames freed by eviction.
    pub pages_evicted: u64,
    /// Pages filled with zeros on first touch.
    pub zero_fills: u64,
    /// Bytes copied between memories (aliased coherent copies cost nothing and count nothing).
    pub bytes_copied: u64,
    /// System calls that failed unexpectedly (see HETMEM_DEBUG=1).
    pub errors: u64,
    /// CPU faults whose copy back failed and was retried (device errors).
    pub failed_transfers: u64,
    /// Pages brought home by sequential read-ahead, or to a device with a fault by density
    /// prefetch.
    pub pages_prefetched: u64,
    /// Pages read from files (first touch of file mappings).
    pub pages_from_file: u64,
    /// Pages written back to files.
    pub pages_written_back: u64,
    /// File leases broken by other processes (flushed and dropped for them).
    pub lease_breaks: u64,
    /// Blocks found thrashing between the CPU and a device and pinned to system memory
    /// (devices then map them remotely for a while).
    pub thrashing_pins: u64,
    /// Changes of device mappings that had to wait for a running launch using them
    /// (`Device::launch`).
    pub launch_waits: u64,
    /// Blocks of file mappings that a flush, sync or drop sent a writeback request to: only
    /// those that may hold dirty pages (and those with pinned pages), not every block of the
    /// mapping (`docs/file-contract.md` §2.8).
    pub blocks_flushed: u64,
    /// Clean blocks of file mappings whose copies were dropped (and memfd pages punched) to
    /// keep a mapping under its `FileOptions::cache_limit`.
    pub blocks_reclaimed: u64,
    /// Faults on a file mapping held at its lease break's gate until the break was over
    /// (`docs/file-contract.md` §6, "Bounded breaks").
    pub break_waits: u64,
    /// Dirty pages a lease break that ran out of time did not write back, and left
    /// conflicted (`FileMapping::conflicts`); each counted once, when it became conflicted.
    pub pages_conflicted: u64,
    /// Blocks of file mappings written back early, in the background, to keep dirty data
    /// within what a lease break can write back in time (`FileOptions::break_budget`).
    pub background_writebacks: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            cpu_faults: self.cpu_faults.get(),
            device_faults: self.device_faults.get(),
            pages_to_device: self.pages_to_device.get(),
            pages_to_system: self.pages_to_system.get(),
            pages_evicted: self.pages_evicted.get(),
            zero_fills: self.zero_fills.get(),
            bytes_copied: self.bytes_copied.get(),
            errors: self.errors.get(),
            failed_transfers: self.failed_transfers.get(),
            pages_prefetched: self.pages_prefetched.get(),
            pages_from_file: self.pages_from_file.get(),
            pages_written_back: self.pages_written_back.get(),
            lease_breaks: self.lease_breaks.get(),
            thrashing_pins: self.thrashing_pins.get(),
            launch_waits: self.launch_waits.get(),
            blocks_flushed: self.blocks_flushed.get(),
            blocks_reclaimed: self.blocks_reclaimed.get(),
            break_waits: self.break_waits.get(),
            pages_conflicted: self.pages_conflicted.get(),
            background_writebacks: self.background_writebacks.get(),
        }
    }
}

impl StatsSnapshot {
    /// What happened between `earlier` and this snapshot (each counter's difference).
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            cpu_faults: self.cpu_faults.saturating_sub(earlier.cpu_faults),
            device_faults: self.device_faults.saturating_sub(earlier.device_faults),
            pages_to_device: self.pages_to_device.saturating_sub(earlier.pages_to_device),
            pages_to_system: self.pages_to_system.saturating_sub(earlier.pages_to_system),
            pages_evicted: self.pages_evicted.saturating_sub(earlier.pages_evicted),
            zero_fills: self.zero_fills.saturating_sub(earlier.zero_fills),
            bytes_copied: self.bytes_copied.saturating_sub(earlier.bytes_copied),
            errors: self.errors.saturating_sub(earlier.errors),
            failed_transfers: self
                .failed_transfers
                .saturating_sub(earlier.failed_transfers),
            pages_prefetched: self
                .pages_prefetched
                .saturating_sub(earlier.pages_prefetched),
            pages_from_file: self.pages_from_file.saturating_sub(earlier.pages_from_file),
            pages_written_back: self
                .pages_written_back
                .saturating_sub(earlier.pages_written_back),
            lease_breaks: self.lease_breaks.saturating_sub(earlier.lease_breaks),
            thrashing_pins: self.thrashing_pins.saturating_sub(earlier.thrashing_pins),
            launch_waits: self.launch_waits.saturating_sub(earlier.launch_waits),
            blocks_flushed: self.blocks_flushed.saturating_sub(earlier.blocks_flushed),
            blocks_reclaimed: self
                .blocks_reclaimed
                .saturating_sub(earlier.blocks_reclaimed),
            break_waits: self.break_waits.saturating_sub(earlier.break_waits),
            pages_conflicted: self
                .pages_conflicted
                .saturating_sub(earlier.pages_conflicted),
            background_writebacks: self
                .background_writebacks
                .saturating_sub(earlier.background_writebacks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_each_counters_difference() {
        let earlier = StatsSnapshot {
            cpu_faults: 3,
            errors: 1,
            lease_breaks: 9,
            ..StatsSnapshot::default()
        };
        let later = StatsSnapshot {
            cpu_faults: 10,
            errors: 1,
            bytes_copied: 4096,
            lease_breaks: 2, // a counter reset in between: no wrap
            ..StatsSnapshot::default()
        };
        let d = later.since(&earlier);
        assert_eq!((d.cpu_faults, d.errors, d.bytes_copied), (7, 0, 4096));
        assert_eq!(d.lease_breaks, 0);
    }
}
