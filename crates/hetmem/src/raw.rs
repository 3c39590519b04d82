//! Raw memory ranges handed between the runtime's threads, and managed memory's CPU views: the
//! only place that turns either into slices.

#![allow(unsafe_code)]

/// A byte range of memory owned by the runtime (a device chunk or a backing view), valid while
/// the lock that guards its mapping is held.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawRange {
    pub ptr: *mut u8,
    pub len: usize,
}

impl RawRange {
    /// # Safety
    /// The range must be readable for the lifetime chosen, and nobody may write it meanwhile
    /// except through shared read-only access (device page-table read lock held, no writer).
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// The range must be writable for the lifetime chosen, and exclusively the caller's
    /// meanwhile: the protocol gave this processor the only writable mapping.
    pub unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// A CPU view of managed memory, owned by a handle that keeps it mapped (`ManagedBuf`,
/// `FileMapping`): what the handle's slices are made of.
#[derive(Debug)]
pub(crate) struct CpuView {
    addr: usize,
    len: usize,
}

impl CpuView {
    /// Crate-internal contract (what `slice`, `slice_mut` and `atomics` rely on): the `len`
    /// bytes at `addr` are a page-aligned view of managed memory that stays mapped for as long
    /// as the value lives, and only its owner hands out references into it. Callers create it
    /// for a view they just registered.
    pub fn new(addr: usize, len: usize) -> Self {
        Self { addr, len }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
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

    /// The view as 64-bit atomics, for CPU threads that share it while devices work on it.
    pub fn atomics(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: mapped for as long as `self` lives, page-aligned (so 8-byte aligned) and
        // `len` bytes long (the constructor's contract); atomics allow shared mutation.
        unsafe {
            std::slice::from_raw_parts(
                self.addr as *const std::sync::atomic::AtomicU64,
                self.len / 8,
            )
        }
    }
}
