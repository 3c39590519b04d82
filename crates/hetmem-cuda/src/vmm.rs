//! Device memory through CUDA's virtual memory management API, in 2 MiB chunks.
//!
//! Three owners, torn down in the only order the driver accepts:
//!
//! - [`Reservation`]: a range of device virtual addresses (`cuMemAddressReserve`). Freed by
//!   `cuMemAddressFree` with exactly the `(ptr, size)` it was reserved with, once nothing is
//!   mapped in it. Shared as `Arc<Reservation>`: every [`Mapping`] holds one, so a reservation
//!   cannot go before its mappings.
//! - [`PhysicalChunk`]: device memory (`cuMemCreate`), released by `cuMemRelease`.
//! - [`Mapping`]: a chunk mapped at an offset of a reservation (`cuMemMap`), readable and
//!   writable by the device (`cuMemSetAccess`). It owns its chunk; dropping it unmaps
//!   (`cuMemUnmap`) and then releases the chunk, and [`Mapping::unmap`] hands the chunk back
//!   for reuse elsewhere.
//!
//! Per the H100 measurements (`shared/reference/h100-anchor`), `cuMemCreate` costs about 10 µs
//! per 2 MiB, `cuMemMap` about 1 µs and an unmap + map + set-access cycle about 37 µs: map
//! chunks once and keep them mapped.
//!
//! [`DeviceBuffer`] is the plain case: a reservation filled with chunks.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUmemAllocationGranularity_flags as Gran};

use crate::context::{check, Cuda};
use crate::error::{Error, Result};
use crate::span::{DevicePtr, DeviceSpan};
use crate::util::{is_aligned, round_up};

/// The chunk size the runtime uses: one 2 MiB block.
pub const CHUNK_SIZE: usize = 2 << 20;

fn location(id: c_int) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id,
    }
}

fn alloc_prop(id: c_int) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType(0),
        location: location(id),
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// The allocation granularity of device `id` (minimum, or recommended). Needs the driver
/// initialised.
pub(crate) fn granularity_of(id: c_int, recommended: bool) -> Result<usize> {
    let prop = alloc_prop(id);
    let flag = if recommended {
        Gran::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    } else {
        Gran::CU_MEM_ALLOC_GRANULARITY_MINIMUM
    };
    let mut g = 0usize;
    // SAFETY: valid out-pointer and a fully initialised property struct.
    check("cuMemGetAllocationGranularity", unsafe {
        sys::cuMemGetAllocationGranularity(&mut g, &prop, flag)
    })?;
    Ok(g)
}

/// The granularity sizes must be multiples of; refuses devices without VMM.
fn granularity(cuda: &Cuda) -> Result<usize> {
    let info = cuda.info();
    if !info.vmm_supported || info.vmm_granularity == 0 {
        return Err(Error::NotSupported(format!(
            "device {} ({}) has no virtual memory management",
            info.ordinal, info.name
        )));
    }
    Ok(info.vmm_granularity)
}

/// The chunk size for this device: 2 MiB, or the granularity if that is larger.
pub fn chunk_size(cuda: &Cuda) -> Result<usize> {
    let g = granularity(cuda)?;
    Ok(round_up(CHUNK_SIZE, g).unwrap_or(g))
}

fn check_size(what: &str, size: usize, g: usize) -> Result<()> {
    if size == 0 || size % g != 0 {
        return Err(Error::Invalid(format!(
            "{what} of {size:#x} bytes: must be a non-zero multiple of the granularity {g:#x}"
        )));
    }
    Ok(())
}

/// A range of device virtual addresses.
pub struct Reservation {
    cuda: Cuda,
    ptr: DevicePtr,
    size: usize,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reservation({:#x}, {:#x})", self.ptr.0, self.size)
    }
}

impl Reservation {
    /// Reserves `size` bytes (a multiple of the granularity) anywhere.
    pub fn new(cuda: &Cuda, size: usize) -> Result<Arc<Reservation>> {
        Self::reserve(cuda, size, DevicePtr(0)).map(Arc::new)
    }

    /// Reserves `size` bytes at exactly `addr`. The driver takes the address as a hint; when
    /// it offers another one, that is given back and this is
    /// [`Error::AddressUnavailable`]. A hint over an existing host mapping is ignored (as
    /// probed on the H100), so this fails where the process has mapped anything.
    pub fn at(cuda: &Cuda, addr: DevicePtr, size: usize) -> Result<Arc<Reservation>> {
        let g = granularity(cuda)?;
        if addr.0 == 0 || !is_aligned(addr.0, g) {
            return Err(Error::Invalid(format!(
                "reservation address {:#x} is not a non-zero multiple of {g:#x}",
                addr.0
            )));
        }
        let r = Self::reserve(cuda, size, addr)?;
        if r.ptr != addr {
            let offered = r.ptr.0;
            drop(r);
            return Err(Error::AddressUnavailable {
                wanted: addr.0,
                offered,
            });
        }
        Ok(Arc::new(r))
    }

    fn reserve(cuda: &Cuda, size: usize, hint: DevicePtr) -> Result<Reservation> {
        let g = granularity(cuda)?;
        check_size("reservation", size, g)?;
        cuda.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; size and alignment are multiples of the granularity.
        check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut ptr, size, g, hint.0, 0)
        })?;
        Ok(Reservation {
            cuda: cuda.clone(),
            ptr: DevicePtr(ptr),
            size,
        })
    }

    /// First address.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// Bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device this range belongs to.
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.cuda.bind().is_err() {
            return;
        }
        // No copy or kernel still in flight may use these addresses once they are free (the
        // range could come back as the device view of registered host memory).
        let _ = self.cuda.synchronize();
        // SAFETY: exactly the (ptr, size) this reservation got from cuMemAddressReserve, and
        // no Mapping is left in it (each holds an Arc of this reservation). This also unmaps
        // whatever host mapping lies at the range (see same_va.rs).
        let _ = unsafe { sys::cuMemAddressFree(self.ptr.0, self.size) };
    }
}

/// Physical device memory, not mapped anywhere.
pub struct PhysicalChunk {
    cuda: Cuda,
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
}

impl fmt::Debug for PhysicalChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysicalChunk({:#x} bytes)", self.size)
    }
}

impl PhysicalChunk {
    /// Allocates `size` bytes (a multiple of the granularity) of device memory.
    pub fn new(cuda: &Cuda, size: usize) -> Result<PhysicalChunk> {
        let g = granularity(cuda)?;
        check_size("chunk", size, g)?;
        cuda.bind()?;
        let prop = alloc_prop(cuda.location_id());
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property struct; size is a multiple of the granularity.
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut handle, size, &prop, 0)
        })?;
        Ok(PhysicalChunk {
            cuda: cuda.clone(),
            handle,
            size,
        })
    }

    /// One chunk of the device's [`chunk_size`].
    pub fn chunk(cuda: &Cuda) -> Result<PhysicalChunk> {
        Self::new(cuda, chunk_size(cuda)?)
    }

    /// Bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for PhysicalChunk {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            // SAFETY: the handle came from cuMemCreate and is released once; memory still
            // mapped somewhere would stay until unmapped, but a Mapping owns its chunk, so it
            // is unmapped first.
            let _ = unsafe { sys::cuMemRelease(self.handle) };
        }
    }
}

/// A chunk mapped into a reservation, readable and writable by the device.
pub struct Mapping {
    reservation: Arc<Reservation>,
    chunk: Option<PhysicalChunk>,
    ptr: DevicePtr,
    size: usize,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mapping({:#x}, {:#x})", self.ptr.0, self.size)
    }
}

impl Mapping {
    /// Maps `chunk` at `offset` of `reservation` and grants the device read-write access.
    /// On failure the chunk is released.
    pub fn new(
        reservation: &Arc<Reservation>,
        offset: usize,
        chunk: PhysicalChunk,
    ) -> Result<Mapping> {
        let size = chunk.size;
        let g = granularity(&reservation.cuda)?;
        if offset % g != 0 {
            return Err(Error::Invalid(format!(
                "mapping offset {offset:#x} is not a multiple of {g:#x}"
            )));
        }
        crate::util::check_range("mapping", offset, size, reservation.size)?;
        let cuda = &reservation.cuda;
        cuda.bind()?;
        let ptr = reservation.ptr.offset(offset);
        // SAFETY: [ptr, ptr + size) lies inside the reservation, size is the chunk's size and
        // the handle is live. A range that is already mapped is refused by the driver.
        check("cuMemMap", unsafe {
            sys::cuMemMap(ptr.0, size, 0, chunk.handle, 0)
        })?;
        let mapping = Mapping {
            reservation: reservation.clone(),
            chunk: Some(chunk),
            ptr,
            size,
        };
        let desc = sys::CUmemAccessDesc {
            location: location(cuda.location_id()),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped (just above); one valid descriptor. On failure,
        // `mapping`'s Drop unmaps it.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(ptr.0, size, &desc, 1)
        })?;
        Ok(mapping)
    }

    /// First device address.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// Bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Byte offset in its reservation.
    pub fn offset(&self) -> usize {
        (self.ptr.0 - self.reservation.ptr.0) as usize
    }

    /// The reservation it lies in.
    pub fn reservation(&self) -> &Arc<Reservation> {
        &self.reservation
    }

    /// `[offset, offset + len)` of the mapping; checked.
    pub fn span(&self, offset: usize, len: usize) -> Result<DeviceSpan<'_>> {
        DeviceSpan::within(self.ptr, self.size, offset, len)
    }

    /// The whole mapping.
    pub fn whole(&self) -> DeviceSpan<'_> {
        DeviceSpan::within(self.ptr, self.size, 0, self.size).expect("a mapping is never empty")
    }

    /// Maps the same chunk a second time, at `offset` of `reservation`, read-write for the
    /// device: the chunk then has two device addresses (hetmem's same-address layout maps a
    /// block's chunk at the block's CPU address as well as in the pool). The alias must be
    /// dropped before this mapping.
    pub fn alias(&self, reservation: &Arc<Reservation>, offset: usize) -> Result<Alias> {
        let chunk = self
            .chunk
            .as_ref()
            .expect("a mapped Mapping owns its chunk");
        let g = granularity(&reservation.cuda)?;
        if offset % g != 0 {
            return Err(Error::Invalid(format!(
                "alias offset {offset:#x} is not a multiple of {g:#x}"
            )));
        }
        crate::util::check_range("alias", offset, self.size, reservation.size)?;
        let cuda = &reservation.cuda;
        cuda.bind()?;
        let ptr = reservation.ptr.offset(offset);
        // SAFETY: [ptr, ptr + size) lies inside the reservation; the handle is live (this
        // mapping owns it) and is the chunk's whole size. A mapped range is refused.
        check("cuMemMap", unsafe {
            sys::cuMemMap(ptr.0, self.size, 0, chunk.handle, 0)
        })?;
        let alias = Alias {
            reservation: reservation.clone(),
            ptr,
            size: self.size,
        };
        let desc = sys::CUmemAccessDesc {
            location: location(cuda.location_id()),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped (just above); one valid descriptor. On failure,
        // `alias`'s Drop unmaps it.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(ptr.0, self.size, &desc, 1)
        })?;
        Ok(alias)
    }

    /// Unmaps and hands the chunk back (to map it elsewhere). Work still queued on the range
    /// must have completed: a late access faults on the device.
    pub fn unmap(mut self) -> Result<PhysicalChunk> {
        self.unmap_now()?;
        Ok(self.chunk.take().expect("a mapped Mapping owns its chunk"))
    }

    fn unmap_now(&mut self) -> Result<()> {
        self.reservation.cuda.bind()?;
        // SAFETY: exactly the range this Mapping mapped, still mapped.
        check("cuMemUnmap", unsafe {
            sys::cuMemUnmap(self.ptr.0, self.size)
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            let _ = self.unmap_now();
            drop(chunk);
        }
    }
}

/// A second device address of a [`Mapping`]'s chunk ([`Mapping::alias`]); dropping it unmaps
/// that address only.
pub struct Alias {
    reservation: Arc<Reservation>,
    ptr: DevicePtr,
    size: usize,
}

impl fmt::Debug for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Alias({:#x}, {:#x})", self.ptr.0, self.size)
    }
}

impl Alias {
    /// The alias's device address.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        if self.reservation.cuda.bind().is_ok() {
            // SAFETY: exactly the range `Mapping::alias` mapped, still mapped; the chunk itself
            // stays mapped (and owned) where its Mapping is.
            let _ = unsafe { sys::cuMemUnmap(self.ptr.0, self.size) };
        }
    }
}

/// Device memory of `len` bytes: one reservation filled with chunks, mapped once.
pub struct DeviceBuffer {
    mappings: Vec<Mapping>,
    reservation: Arc<Reservation>,
    len: usize,
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}, {:#x}, {} chunks)",
            self.ptr().0,
            self.len,
            self.mappings.len()
        )
    }
}

impl DeviceBuffer {
    /// `len` bytes, rounded up to whole chunks.
    pub fn new(cuda: &Cuda, len: usize) -> Result<DeviceBuffer> {
        let chunk = chunk_size(cuda)?;
        let (free, _) = cuda.mem_info()?;
        let total =
            round_up(len.max(1), chunk).ok_or_else(|| Error::Invalid(format!("{len} bytes")))?;
        if total > free {
            return Err(Error::Invalid(format!(
                "{total:#x} bytes of device memory asked for, {free:#x} free"
            )));
        }
        let reservation = Reservation::new(cuda, total)?;
        let mut mappings = Vec::with_capacity(total / chunk);
        for offset in (0..total).step_by(chunk) {
            mappings.push(Mapping::new(
                &reservation,
                offset,
                PhysicalChunk::new(cuda, chunk)?,
            )?);
        }
        Ok(DeviceBuffer {
            mappings,
            reservation,
            len: total,
        })
    }

    /// First device address.
    pub fn ptr(&self) -> DevicePtr {
        self.reservation.ptr()
    }

    /// Bytes (whole chunks).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a buffer has at least one chunk.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `[offset, offset + len)`; checked.
    pub fn span(&self, offset: usize, len: usize) -> Result<DeviceSpan<'_>> {
        DeviceSpan::within(self.ptr(), self.len, offset, len)
    }

    /// The whole buffer.
    pub fn whole(&self) -> DeviceSpan<'_> {
        DeviceSpan::within(self.ptr(), self.len, 0, self.len).expect("a buffer is never empty")
    }

    /// The chunk mappings, in address order.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Unmap every chunk, then the reservation goes with the last Arc.
        self.mappings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_must_be_granularity_multiples() {
        let g = 2 << 20;
        assert!(check_size("x", g, g).is_ok());
        assert!(check_size("x", 4 * g, g).is_ok());
        assert!(matches!(check_size("x", 0, g), Err(Error::Invalid(_))));
        assert!(matches!(
            check_size("x", g + 4096, g),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn allocation_properties_name_the_device() {
        let p = alloc_prop(3);
        assert_eq!(p.location.id, 3);
        assert_eq!(
            p.location.type_,
            sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
        );
        assert_eq!(
            p.type_,
            sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
        );
        assert_eq!(p.requestedHandleTypes.0, 0);
    }
}
