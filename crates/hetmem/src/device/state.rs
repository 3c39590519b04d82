//! Per-device runtime state: the backend, the pool of its chunks, and the device's counters.

use std::sync::Arc;

use crate::device::{Chunk, DeviceBackend};
use crate::stats::Counter;

/// Per-device runtime state. The device's kind is its backend's (`DeviceBackend::kind`), the
/// one source of truth.
#[derive(Debug)]
pub(crate) struct DeviceState {
    /// Device memory hetmem may use, in bytes.
    pub capacity: usize,
    /// Threads that run the device's kernels (`Device::kernel_read`/`kernel_write`).
    pub kernel_workers: usize,
    pub counters: Counters,
    /// Its memory and copy engine.
    pub backend: Arc<dyn DeviceBackend>,
    /// Chunks with no frame bound, kept mapped for reuse: migrations then copy into resident
    /// memory instead of faulting fresh pages in. At most enough for the device's capacity.
    pool: std::sync::Mutex<Vec<Chunk>>,
}

impl DeviceState {
    pub fn new(capacity: usize, kernel_workers: usize, backend: Arc<dyn DeviceBackend>) -> Self {
        Self {
            capacity,
            kernel_workers,
            counters: Counters::default(),
            backend,
            pool: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl DeviceState {
    /// A chunk from the pool, or a new one.
    pub fn take_chunk(&self) -> std::io::Result<Chunk> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => self.backend.alloc_chunk(),
        }
    }

    /// Returns a chunk none of whose frames is bound.
    pub fn put_chunk(&self, chunk: Chunk) {
        let max = (self.capacity / hetmem_proto::BLOCK_BYTES).max(1);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < max {
            pool.push(chunk);
        } else {
            drop(pool);
            self.backend.free_chunk(chunk);
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: Counter,
    pub pages: Counter,
    pub migrated_in: Counter,
    pub migrated_out: Counter,
    pub evicted: Counter,
}

impl Counters {
    pub fn snapshot(&self) -> DeviceCounters {
        DeviceCounters {
            faults: self.faults.get(),
            pages: self.pages.get(),
            migrated_in: self.migrated_in.get(),
            migrated_out: self.migrated_out.get(),
            evicted: self.evicted.get(),
        }
    }
}

/// A device's counters, like dmirror's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Fault rounds: each pass over a command's range that had to fault counts once.
    pub faults: u64,
    /// Pages read or written by `read`, `write` and kernels.
    pub pages: u64,
    /// Pages copied into this device's memory.
    pub migrated_in: u64,
    /// Pages copied out of this device's memory to system memory.
    pub migrated_out: u64,
    /// Frames freed by eviction.
    pub evicted: u64,
}

impl DeviceState {
    /// Private or coherent: the backend says.
    pub fn kind(&self) -> hetmem_proto::DeviceKind {
        self.backend.kind()
    }
}
