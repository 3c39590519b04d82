//! Handles to managed memory: `ManagedBuf` (allocated) and `Registration` (adopted).

#![allow(unsafe_code)]

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mm::region::Region;
use crate::mm::runtime::RuntimeHandle;
use crate::sys::mem;

/// A CPU view of managed memory, owned by a handle that keeps it mapped: the one place that
/// turns a view into slices.
#[derive(Debug)]
pub(crate) struct CpuView {
    addr: usize,
    len: usize,
}

impl CpuView {
    /// Crate-internal contract (what `slice` relies on): `[addr, addr + len)` is a view of
    /// managed memory that stays mapped for as long as the value lives, and only its owner
    /// hands out references into it. Callers create it for a view they just registered.
    pub fn new(addr: usize, len: usize) -> Self {
        Self { addr, len }
    }

    pub fn slice(&self) -> &[u8] {
        // SAFETY: mapped for as long as `self` lives (the constructor's contract); a page that is
        // not present faults to the service threads, which fill it. Devices write a page only
        // while the protocol has taken the CPU's mapping away, never under a live CPU access.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    pub fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `slice`; `&mut self` makes this the only CPU reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// Managed memory from [`crate::Hetmem::alloc`]. The CPU uses it as a plain slice; devices reach
/// it by address. Dropping it frees everything, device frames included.
#[derive(Debug)]
pub struct ManagedBuf {
    shared: Arc<RuntimeHandle>,
    region: Arc<Region>,
    addr: usize,
    len: usize,
}

impl ManagedBuf {
    pub(crate) fn new(
        shared: Arc<RuntimeHandle>,
        region: Arc<Region>,
        addr: usize,
        len: usize,
    ) -> Self {
        Self {
            shared,
            region,
            addr,
            len,
        }
    }

    /// Start address (what devices are given).
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The memory as 64-bit atomics, for CPU threads that share it while devices work on it.
    pub fn as_atomic_u64(&self) -> &[AtomicU64] {
        // SAFETY: the view is mapped, page-aligned (so 8-byte aligned) and `len` bytes long for
        // as long as `self` lives; atomics allow shared mutation.
        unsafe { std::slice::from_raw_parts(self.addr as *const AtomicU64, self.len / 8) }
    }
}

impl std::ops::Deref for ManagedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the CPU view is mapped read-write for as long as `self` lives; a page that is
        // not present faults to the service threads, which fill it. Devices write this memory
        // only while the protocol has taken the CPU's mapping away, i.e. never under a live
        // CPU access to the same page.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl std::ops::DerefMut for ManagedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for Deref; `&mut self` makes this the only CPU reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

impl Drop for ManagedBuf {
    fn drop(&mut self) {
        self.shared.inner.free_region(&self.region);
    }
}

/// Existing private anonymous memory adopted by [`crate::Hetmem::register`]. Dropping it gives the
/// range back as private anonymous memory holding the latest data; [`Registration::unregister`]
/// does the same and reports a failure.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<RuntimeHandle>,
    region: Arc<Region>,
    addr: usize,
    len: usize,
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
            shared,
            region,
            addr,
            len,
            released: false,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
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
        if !self.shared.inner.is_owner() {
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

    /// Brings every page home, then replaces each view with a private copy of its data. Until
    /// the first step has succeeded nothing changes, so a failure leaves the range managed with
    /// its data.
    fn release(&self) -> Result<()> {
        let inner = &self.shared.inner;
        inner.bring_home(&self.region)?;
        let views = inner.retire_region(&self.region);
        // Wait out drives that looked the region up before it was retired: from here on no
        // drive maps a page of these views.
        for slot in self.region.blocks.iter() {
            drop(inner.lock_block(slot));
        }
        for v in &views {
            // Writers now fault and wait (their faults are stale: they are woken and fault
            // again) until the private copy is in place, so no write lands in the memfd after
            // the copy was taken.
            let _ = inner.uffd.write_protect(v.va, v.len, true, false);
            let backing = self.region.backing.as_ptr().wrapping_add(v.off);
            let fill = |copy: &mut [u8]| {
                // SAFETY: the backing view holds the region's latest data, `v.len` bytes from
                // `v.off` on, and nobody writes it now (every page was brought home above, and
                // writers wait); `copy` is the fresh private memory, as long.
                unsafe { mem::copy(copy.as_mut_ptr(), backing, copy.len()) }
            };
            // SAFETY: moves the copy over the view, which the caller handed to us at
            // registration; the contents are identical, so references into it stay valid.
            // The view is still registered: the kernel sends an UNMAP event for it and waits
            // until a service thread reads it.
            let moved = unsafe { mem::replace_with_private(v.va, v.len, fill, &[]) };
            if let Err(e) = moved {
                // The memfd holds the latest data: leave it mapped there, unmanaged.
                inner.note_error("move a registered range out", &e);
                let _ = inner.uffd.unregister(v.va, v.len);
            }
            // Writers that waited retry on the private copy.
            let _ = inner.uffd.wake(v.va, v.len);
        }
        inner.drop_all_copies(&self.region);
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.released || !self.shared.inner.is_owner() {
            // Given back already, or a fork child, whose range is its private copy already.
            return;
        }
        if let Err(e) = self.release() {
            // No caller to tell: count it, and keep the range managed with its data (on the
            // device), where the context can still reach it.
            self.shared
                .inner
                .note_error("unregister", &std::io::Error::other(e.to_string()));
        }
    }
}
