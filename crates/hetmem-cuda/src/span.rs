//! Addresses and bounds-checked ranges that copies, fills and kernel arguments take.
//!
//! A [`DeviceSpan`] is borrowed from something that owns device-addressable memory (a
//! [`Mapping`](crate::Mapping), a [`DeviceBuffer`](crate::DeviceBuffer), a host registration's
//! device view, managed memory); a [`HostSpan`] from host memory the driver has pinned. Both are
//! checked against their owner's bounds when made, so a copy cannot reach outside it.
//!
//! The borrow ends when the call that enqueues a copy returns, while the copy may still run:
//! owners of host memory therefore wait for the context before they let the memory go, and
//! owners of device memory only ever expose device addresses, where a late copy faults on the
//! device instead of touching host memory.

// Only `DeviceSpan::from_raw` is unsafe here; it has no unsafe block.
#![allow(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;

use crate::error::Result;
use crate::util::check_range;

/// A device virtual address (`CUdeviceptr`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0 + bytes as u64)
    }
}

impl fmt::Debug for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePtr({:#x})", self.0)
    }
}

/// `len` bytes of device-addressable memory at `ptr`, borrowed from their owner.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSpan<'a> {
    ptr: DevicePtr,
    len: usize,
    _owner: PhantomData<&'a ()>,
}

impl<'a> DeviceSpan<'a> {
    /// A span inside an owner of `total` bytes at `base`; checked.
    pub(crate) fn within(base: DevicePtr, total: usize, offset: usize, len: usize) -> Result<Self> {
        check_range("device range", offset, len, total)?;
        Ok(DeviceSpan {
            ptr: base.offset(offset),
            len,
            _owner: PhantomData,
        })
    }

    /// A span at an arbitrary device address.
    ///
    /// # Safety
    ///
    /// A copy or fill through the span writes whatever `ptr` reaches: device memory, or host
    /// memory where `ptr` is a device view of pinned or registered host memory (or of any host
    /// memory, on systems where the GPU can address pageable memory). The caller must make sure
    /// that nothing it does not own is reachable there while the operation runs. An address
    /// that maps nothing is fine: the driver refuses it or the device faults.
    pub unsafe fn from_raw(ptr: DevicePtr, len: usize) -> DeviceSpan<'static> {
        DeviceSpan {
            ptr,
            len,
            _owner: PhantomData,
        }
    }

    /// First address.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty (never, for spans made by this crate).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[offset, offset + len)` of this span; checked.
    pub fn sub(&self, offset: usize, len: usize) -> Result<DeviceSpan<'a>> {
        DeviceSpan::within(self.ptr, self.len, offset, len)
    }
}

/// `len` bytes of pinned host memory (registered or allocated by the driver), borrowed from
/// their owner.
#[derive(Clone, Copy, Debug)]
pub struct HostSpan<'a> {
    ptr: *mut u8,
    len: usize,
    _owner: PhantomData<&'a ()>,
}

impl<'a> HostSpan<'a> {
    /// A span inside pinned host memory of `total` bytes at `base`; checked.
    pub(crate) fn within(base: *mut u8, total: usize, offset: usize, len: usize) -> Result<Self> {
        check_range("host range", offset, len, total)?;
        Ok(HostSpan {
            ptr: base.wrapping_add(offset),
            len,
            _owner: PhantomData,
        })
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty (never, for spans made by this crate).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[offset, offset + len)` of this span; checked.
    pub fn sub(&self, offset: usize, len: usize) -> Result<HostSpan<'a>> {
        HostSpan::within(self.ptr, self.len, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn spans_are_checked() {
        let base = DevicePtr(0x7000_0000_0000);
        let s = DeviceSpan::within(base, 4 << 20, 4096, 8192).unwrap();
        assert_eq!(s.ptr(), DevicePtr(0x7000_0000_1000));
        assert_eq!(s.len(), 8192);
        assert_eq!(
            s.sub(4096, 4096).unwrap().ptr(),
            DevicePtr(0x7000_0000_2000)
        );
        assert!(matches!(s.sub(4096, 4097), Err(Error::Invalid(_))));
        assert!(matches!(
            DeviceSpan::within(base, 4096, 0, 0),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            DeviceSpan::within(base, 4096, 4096, 1),
            Err(Error::Invalid(_))
        ));

        let mut buf = [0u8; 64];
        let h = HostSpan::within(buf.as_mut_ptr(), 64, 8, 16).unwrap();
        assert_eq!(h.as_ptr(), buf.as_mut_ptr().wrapping_add(8));
        assert!(h.sub(0, 17).is_err());
        assert!(HostSpan::within(buf.as_mut_ptr(), 64, 60, 5).is_err());
    }
}
