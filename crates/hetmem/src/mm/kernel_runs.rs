//! The device kernel closures running now, so the fault service can recognise a kernel worker's
//! own CPU faults (`mm/kernel_cpu.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hetmem_proto::DeviceId;

use crate::mm::region::Region;
use crate::mm::space::BlockSpan;

/// The device kernel closures running now, one entry per worker inside its closure.
#[derive(Debug, Default)]
pub(crate) struct KernelRuns {
    pub(crate) runs: Mutex<Vec<Arc<KernelRun>>>,
    /// `runs.len()`, read without the lock on every CPU fault.
    active: AtomicUsize,
}

/// One worker inside its closure over one piece, holding the piece's page-table read lock.
#[derive(Debug)]
pub(crate) struct KernelRun {
    pub(crate) tid: u32,
    /// The region, by address: identity only.
    pub(crate) region: usize,
    pub(crate) bi: usize,
    pub(crate) dev: DeviceId,
    /// The piece's runs as the closure got them: CPU address, address of the device's view of
    /// the data, length.
    pub(crate) runs: Vec<(usize, usize, usize)>,
    /// Pages of the block mapped for the CPU on the worker's behalf, and whether the CPU wrote
    /// through the mapping.
    pub(crate) strays: Mutex<Vec<(usize, bool)>>,
}

/// What a worker's registration is for: `Device::access_pieces` registers before it calls the
/// closure and settles after it has dropped the page-table lock.
#[derive(Debug)]
pub(crate) struct Registered(pub(crate) Arc<KernelRun>);

impl KernelRuns {
    /// Registers the calling thread, about to run a closure over `p` with `runs`.
    pub(crate) fn enter(
        &self,
        p: &BlockSpan,
        dev: DeviceId,
        runs: &[(usize, usize, usize)],
    ) -> Registered {
        let run = Arc::new(KernelRun {
            tid: crate::sys::uffd::current_tid(),
            region: Arc::as_ptr(&p.region) as usize,
            bi: p.bi,
            dev,
            runs: runs.to_vec(),
            strays: Mutex::new(Vec::new()),
        });
        let mut list = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        list.push(run.clone());
        self.active.store(list.len(), Ordering::Release);
        Registered(run)
    }

    /// The closure has returned: the fault service no longer treats the thread as a worker.
    pub(crate) fn leave(&self, r: &Registered) {
        let mut list = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|x| !Arc::ptr_eq(x, &r.0));
        self.active.store(list.len(), Ordering::Release);
    }

    /// The run thread `tid` is inside, if it is a worker in a closure over block `bi` of
    /// `region`.
    pub(crate) fn find(&self, tid: u32, region: &Region, bi: usize) -> Option<Arc<KernelRun>> {
        if tid == 0 || self.active.load(Ordering::Acquire) == 0 {
            return None;
        }
        let list = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|r| r.tid == tid && r.region == region as *const Region as usize && r.bi == bi)
            .cloned()
    }
}
