//! Handles to managed memory: `ManagedBuf` (allocated) and `Registration` (adopted).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mm::region::Region;
use crate::mm::runtime::{Runtime, RuntimeHandle};
use crate::raw::CpuView;

/// What every handle to managed memory holds: the runtime (kept alive while the handle is), the
/// region, and where the CPU sees it. `ManagedBuf`, `Registration` and `FileMapping` wrap it.
#[derive(Debug)]
pub(crate) struct RegionHandle {
    pub(crate) runtime: Arc<RuntimeHandle>,
    pub(crate) region: Arc<Region>,
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl RegionHandle {
    pub(crate) fn new(
        runtime: Arc<RuntimeHandle>,
        region: Arc<Region>,
        addr: usize,
        len: usize,
    ) -> Self {
        Self {
            runtime,
            region,
            addr,
            len,
        }
    }

    /// The runtime the region belongs to.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime.inner
    }
}

/// Managed memory from [`crate::Hetmem::alloc`]. The CPU uses it as a plain slice; devices reach
/// it by address. Dropping it frees everything, device frames included.
#[derive(Debug)]
pub struct ManagedBuf {
    handle: RegionHandle,
    view: CpuView,
}

impl ManagedBuf {
    pub(crate) fn new(
        shared: Arc<RuntimeHandle>,
        region: Arc<Region>,
        addr: usize,
        len: usize,
    ) -> Self {
        Self {
            handle: RegionHandle::new(shared, region, addr, len),
            // The view was registered just now; the buffer keeps it mapped until its drop.
            view: CpuView::new(addr, len),
        }
    }

    /// Start address (what devices are given).
    pub fn addr(&self) -> usize {
        self.view.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.view.len()
    }

    /// Always false: buffers are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.view.addr() as *mut u8
    }

    /// The memory as 64-bit atomics, for CPU threads that share it while devices work on it.
    pub fn as_atomic_u64(&self) -> &[AtomicU64] {
        self.view.atomics()
    }
}

impl std::ops::Deref for ManagedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.view.slice()
    }
}

impl std::ops::DerefMut for ManagedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.view.slice_mut()
    }
}

impl Drop for ManagedBuf {
    fn drop(&mut self) {
        self.handle.runtime().free_region(&self.handle.region);
    }
}

/// Existing private anonymous memory adopted by [`crate::Hetmem::register`]. Dropping it gives the
/// range back as private anonymous memory holding the latest data; [`Registration::unregister`]
/// does the same and reports a failure.
#[derive(Debug)]
pub struct Registration {
    handle: RegionHandle,
    /// Given back by `unregister`: nothing left for `Drop` to do.
    released: bool,
}

impl Registration {
    pub(crate) fn new(
        shared: Arc<RuntimeHandle>,
        region: Arc<Region>,
        addr: usize,
        len: usize,
    ) -> Self {
        Self {
            handle: RegionHandle::new(shared, region, addr, len),
            released: false,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.handle.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.handle.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Gives the range back as private anonymous memory holding the latest data, as dropping
    /// does, and says whether that worked.
    ///
    /// # Errors
    /// `Io` when a device cannot copy its data home (after retries, backing off to 10 ms): the
    /// registration comes back unchanged with the error, the data where it was, and the range
    /// still managed, so the call can be repeated once the device works. `Invalid` in a fork
    /// child, whose range is its private copy already.
    pub fn unregister(mut self) -> std::result::Result<(), (Registration, Error)> {
        if !self.handle.runtime().is_owner() {
            return Err((
                self,
                Error::Invalid("the context belongs to the parent process"),
            ));
        }
        match self.release() {
            Ok(()) => {
                self.released = true;
                Ok(())
            }
            Err(e) => Err((self, e)),
        }
    }

    /// Gives the range back (`Runtime::release_registration`).
    fn release(&self) -> Result<()> {
        self.handle
            .runtime()
            .release_registration(&self.handle.region)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.released || !self.handle.runtime().is_owner() {
            // Given back already, or a fork child, whose range is its private copy already.
            return;
        }
        if let Err(e) = self.release() {
            // No caller to tell: count it, and keep the range managed with its data (on the
            // device), where the context can still reach it.
            self.handle
                .runtime()
                .note_error("unregister", &std::io::Error::other(e.to_string()));
        }
    }
}
