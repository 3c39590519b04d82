//! The runtime: the state the service threads and the handles share, and what every part of the
//! memory manager needs (the fork gate, ownership after fork, error counting, request ids).

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hetmem_proto::{ReqId, Topology, PAGE_SIZE};

use crate::budget::AtomicBudget;
use crate::device::DeviceState;
use crate::error::{Error, Result};
use crate::mm::gate::{ForkGate, GateGuard};
use crate::mm::poison::PoisonedPage;
use crate::mm::region::Region;
use crate::mm::service::ServiceWork;
use crate::mm::space::MapEntry;
use crate::stats::Stats;
use crate::sys::mem;
use crate::sys::uffd::Uffd;

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

/// Everything the service threads share.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Device kernel closures running now (`device/kernel_cpu.rs`).
    pub(crate) kernel_runs: crate::mm::kernel_cpu::KernelRuns,
    pub(crate) topology: Topology,
    pub(crate) budget: AtomicBudget,
    pub(crate) devices: Vec<DeviceState>,
    pub(crate) uffd: Uffd,
    /// UFFDIO_CONTINUE_MODE_WP works (Linux 6.3); cleared on the first EINVAL.
    pub(crate) continue_wp: AtomicBool,
    /// Views by start address.
    pub(crate) space: RwLock<BTreeMap<usize, MapEntry>>,
    /// Stale views whose addresses a newer view took before their UNMAP or REMAP event was
    /// read (`add_region`). Lookups never see them; their event still finds them. Locked after
    /// `space`.
    pub(crate) displaced: Mutex<Vec<(usize, MapEntry)>>,
    pub(crate) regions: Mutex<Vec<Arc<Region>>>,
    /// Held while reading events and applying them to the address map, so a `munmap` that
    /// returned has its view removed before anyone looks at views again.
    pub(crate) events: Mutex<()>,
    pub(crate) backlog: Mutex<Vec<ServiceWork>>,
    /// Wakes service threads: backlog work or shutdown.
    pub(crate) kick: mem::EventFd,
    pub(crate) shutdown: AtomicBool,
    pub(crate) next_req: AtomicU64,
    pub(crate) next_region: AtomicU64,
    /// Logical clock for LRU.
    pub(crate) clock: AtomicU64,
    pub(crate) readback_window: usize,
    pub(crate) readahead: usize,
    pub(crate) stats: Stats,
    /// Quiesces everything for fork (see `fork.rs`).
    pub(crate) gate: ForkGate,
    /// This is a fork child's copy of the context: nothing may touch the parent's userfaultfd.
    pub(crate) orphaned: AtomicBool,
    /// CPU pages poisoned because a copy into them kept failing (`poison_page`).
    pub(crate) retry_poison: Mutex<Vec<PoisonedPage>>,
    /// `retry_poison` is not empty: checked without the lock on every drive.
    pub(crate) retry_pending: AtomicBool,
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

impl Runtime {
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

    pub(crate) fn note_error(&self, what: &str, e: &std::io::Error) {
        self.stats.errors.add(1);
        if std::env::var_os("HETMEM_DEBUG").is_some() {
            eprintln!("hetmem: {what}: {e}");
        }
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
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

    pub(crate) fn next_req(&self) -> ReqId {
        ReqId(self.next_req.fetch_add(1, Ordering::Relaxed))
    }
}
