//! CUDA's own managed memory (`cuMemAllocManaged`), for comparison measurements only: hetmem
//! does not build on it.
//!
//! Oversubscribing managed memory can hang the GPU, so an allocation larger than a quarter of
//! the device's free memory is refused before the driver is asked.

#![allow(unsafe_code)]

use std::fmt;

use cudarc::driver::sys;

use crate::context::{check, Cuda};
use crate::error::{Error, Result};
use crate::host::HostMem;
use crate::span::{DevicePtr, DeviceSpan};
use crate::stream::Stream;

/// The largest managed allocation, as a fraction of free device memory: 1/4.
pub const MAX_FREE_FRACTION: usize = 4;

/// Where to prefetch managed memory to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// The device's memory.
    Device,
    /// System memory.
    Host,
}

/// Managed memory, addressable by the CPU and the device alike.
pub struct ManagedBuffer {
    cuda: Cuda,
    ptr: DevicePtr,
    len: usize,
}

// SAFETY: managed memory is a process-wide allocation; CPU access is through raw pointers.
unsafe impl Send for ManagedBuffer {}
// SAFETY: as above.
unsafe impl Sync for ManagedBuffer {}

impl fmt::Debug for ManagedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManagedBuffer({:?}, {:#x} bytes)", self.ptr, self.len)
    }
}

/// Refuses sizes over `free / MAX_FREE_FRACTION`.
fn check_managed_size(len: usize, free: usize) -> Result<()> {
    if len == 0 || len > free / MAX_FREE_FRACTION {
        return Err(Error::Invalid(format!(
            "managed allocation of {len:#x} bytes: must be non-zero and at most a quarter of the \
             {free:#x} bytes free on the device"
        )));
    }
    Ok(())
}

impl ManagedBuffer {
    /// `len` bytes of managed memory (attached globally); at most a quarter of free memory.
    pub fn new(cuda: &Cuda, len: usize) -> Result<ManagedBuffer> {
        let (free, _) = cuda.mem_info()?;
        check_managed_size(len, free)?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; context current (mem_info bound it).
        check("cuMemAllocManaged", unsafe {
            sys::cuMemAllocManaged(
                &mut p,
                len,
                sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32,
            )
        })?;
        Ok(ManagedBuffer {
            cuda: cuda.clone(),
            ptr: DevicePtr(p),
            len,
        })
    }

    /// The whole buffer, for kernels and copies.
    pub fn whole(&self) -> DeviceSpan<'_> {
        DeviceSpan::within(self.ptr, self.len, 0, self.len).expect("never empty")
    }

    /// Enqueues a prefetch of the whole buffer to `to` (`cuMemPrefetchAsync_v2`, CUDA 13's
    /// form with a `CUmemLocation`).
    pub fn prefetch(&self, stream: &Stream, to: Location) -> Result<()> {
        self.cuda.bind()?;
        let location = match to {
            Location::Device => sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.cuda.location_id(),
            },
            Location::Host => sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
                id: 0,
            },
        };
        // SAFETY: the range is this live managed allocation; the stream is live in this
        // context.
        check("cuMemPrefetchAsync_v2", unsafe {
            sys::cuMemPrefetchAsync_v2(self.ptr.0, self.len, location, 0, stream.raw())
        })
    }
}

impl HostMem for ManagedBuffer {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.0 as usize as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ManagedBuffer {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            let _ = self.cuda.synchronize();
            // SAFETY: allocated in `new`, freed once, no work in flight.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_sizes_stay_a_small_fraction_of_free_memory() {
        let free = 140usize << 30;
        assert!(check_managed_size(1 << 30, free).is_ok());
        assert!(check_managed_size(35 << 30, free).is_ok());
        assert!(check_managed_size((35 << 30) + 1, free).is_err());
        assert!(check_managed_size(0, free).is_err());
        assert!(check_managed_size(1 << 30, 2 << 30).is_err());
    }
}
