//! Raw memory ranges handed between the runtime's threads, and the only place that turns them
//! into slices.

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
