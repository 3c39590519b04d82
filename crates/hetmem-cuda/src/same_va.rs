//! The same virtual address on the CPU and the GPU.
//!
//! With unified addressing, CUDA keeps a `PROT_NONE` host placeholder at every device virtual
//! address it hands out, and `cuMemAddressReserve` ignores a hint that lies over an existing
//! host mapping. What the H100 probe found to work (`shared/reference/h100-anchor`,
//! `cuda_shmem_probe.cu`, "Same-VA trick"):
//!
//! 1. reserve device addresses first (`cuMemAddressReserve`), at `X`;
//! 2. map the CPU's view of the memory (a memfd, `MAP_SHARED`) with `MAP_FIXED` over CUDA's
//!    placeholder at `X`;
//! 3. map device chunks at `X` (`cuMemMap` + `cuMemSetAccess`).
//!
//! The GPU then sees device memory at `X` and the CPU sees the memfd at the same `X`, so
//! pointers stored in data structures are valid on both sides. The two are different memory:
//! keeping them coherent is the runtime's job (copies through a registered view of the same
//! memfd, as here).
//!
//! Teardown order matters because `cuMemAddressFree` unmaps the host range at `X`, whatever is
//! mapped there by then:
//!
//! 1. unmap the device chunks (`cuMemUnmap`);
//! 2. put a `PROT_NONE` anonymous placeholder over the CPU view (`MAP_FIXED`), so the range
//!    never becomes a hole that another thread's `mmap` could take and lose;
//! 3. free the reservation (`cuMemAddressFree`), which unmaps the placeholder.
//!
//! Open on real hardware (the probe did not check these; the tests and the probe binary do):
//! whether `cuMemMap`/`cuMemUnmap` leave the CPU view in place ([`SameAddressView::cpu_view_intact`]).

#![allow(unsafe_code)]

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use rustix::mm::{MapFlags, ProtFlags};

use crate::context::Cuda;
use crate::error::{Error, Result};
use crate::host::HostMem;
use crate::span::{DevicePtr, DeviceSpan};
use crate::util::{check_range, maps_show_shared_file, page_size, read_self_maps};
use crate::vmm::{chunk_size, Mapping, PhysicalChunk, Reservation};

/// A range at one address `X` for both: the CPU sees a memfd there, the GPU device chunks.
pub struct SameAddressView {
    chunks: Vec<Option<Mapping>>,
    reservation: Arc<Reservation>,
    chunk_size: usize,
    len: usize,
    inode: u64,
    file_offset: u64,
    cpu_mapped: bool,
}

// SAFETY: the CPU view is a shared mapping accessed through raw-pointer copies only; the
// device side is driver objects usable from any thread.
unsafe impl Send for SameAddressView {}
// SAFETY: as above; `&self` methods do not mutate the mappings.
unsafe impl Sync for SameAddressView {}

impl fmt::Debug for SameAddressView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SameAddressView({:#x}, {:#x} bytes)",
            self.addr(),
            self.len
        )
    }
}

impl SameAddressView {
    /// Reserves `len` bytes of device addresses (a multiple of the chunk size) and maps
    /// `[file_offset, file_offset + len)` of the memfd `fd` at the same address for the CPU,
    /// shared and read-write. No device chunk is mapped yet ([`Self::map_chunk`]).
    pub fn new(
        cuda: &Cuda,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> Result<SameAddressView> {
        let chunk = chunk_size(cuda)?;
        if len == 0 || len % chunk != 0 || file_offset % page_size() as u64 != 0 {
            return Err(Error::Invalid(format!(
                "same-address view of {len:#x} bytes at file offset {file_offset:#x}: the length \
                 must be a multiple of {chunk:#x} and the offset of the page size"
            )));
        }
        let stat = rustix::fs::fstat(fd).map_err(Error::errno_os("fstat"))?;
        if (stat.st_size as u64) < file_offset + len as u64 {
            return Err(Error::Invalid(format!(
                "the file has {:#x} bytes, the view needs {:#x}",
                stat.st_size,
                file_offset + len as u64
            )));
        }
        let reservation = Reservation::new(cuda, len)?;
        let addr = reservation.ptr().0 as usize as *mut std::ffi::c_void;
        // SAFETY: MAP_FIXED replaces what is mapped at [addr, addr + len): CUDA's PROT_NONE
        // placeholder for the reservation this function just made and owns, nothing else.
        let got = unsafe {
            rustix::mm::mmap(
                addr,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                file_offset,
            )
        }
        .map_err(Error::errno_os(
            "mmap MAP_FIXED over the device reservation",
        ))?;
        if got != addr {
            return Err(Error::Invalid(format!(
                "MAP_FIXED returned {got:p}, not {addr:p}"
            )));
        }
        Ok(SameAddressView {
            chunks: (0..len / chunk).map(|_| None).collect(),
            reservation,
            chunk_size: chunk,
            len,
            inode: stat.st_ino,
            file_offset,
            cpu_mapped: true,
        })
    }

    /// The address, the same for CPU and GPU.
    pub fn addr(&self) -> u64 {
        self.reservation.ptr().0
    }

    /// The CPU's pointer to the first byte (`addr` as a pointer).
    pub fn cpu_ptr(&self) -> *mut u8 {
        self.addr() as usize as *mut u8
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a view has at least one chunk.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Chunk size.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Number of chunk slots.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Whether chunk `index` is mapped on the device.
    pub fn is_chunk_mapped(&self, index: usize) -> bool {
        self.chunks.get(index).is_some_and(Option::is_some)
    }

    /// Maps device memory at chunk slot `index` (`addr + index * chunk_size`).
    pub fn map_chunk(&mut self, index: usize, chunk: PhysicalChunk) -> Result<()> {
        match self.chunks.get(index) {
            None => {
                return Err(Error::Invalid(format!(
                    "chunk {index} of {}",
                    self.chunks.len()
                )))
            }
            Some(Some(_)) => {
                return Err(Error::Invalid(format!("chunk {index} is already mapped")))
            }
            Some(None) => {}
        }
        let m = Mapping::new(&self.reservation, index * self.chunk_size, chunk)?;
        self.chunks[index] = Some(m);
        Ok(())
    }

    /// Unmaps the device memory at slot `index` and hands it back.
    pub fn unmap_chunk(&mut self, index: usize) -> Result<PhysicalChunk> {
        let m = self
            .chunks
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| Error::Invalid(format!("chunk {index} is not mapped")))?;
        m.unmap()
    }

    /// `[offset, offset + len)` as the device addresses it; every chunk it touches must be
    /// mapped.
    pub fn device_span(&self, offset: usize, len: usize) -> Result<DeviceSpan<'_>> {
        check_range("same-address range", offset, len, self.len)?;
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        if let Some(i) = (first..=last).find(|&i| !self.is_chunk_mapped(i)) {
            return Err(Error::Invalid(format!(
                "chunk {i} is not mapped on the device"
            )));
        }
        DeviceSpan::within(DevicePtr(self.addr()), self.len, offset, len)
    }

    /// Whether `/proc/self/maps` still shows the memfd, shared and read-write, over the whole
    /// range: that no driver call replaced the CPU view.
    pub fn cpu_view_intact(&self) -> Result<bool> {
        let maps = read_self_maps()?;
        Ok(maps_show_shared_file(
            &maps,
            self.addr(),
            self.len as u64,
            self.inode,
            self.file_offset,
        ))
    }
}

impl HostMem for SameAddressView {
    fn as_ptr(&self) -> *mut u8 {
        self.cpu_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SameAddressView {
    fn drop(&mut self) {
        // 1. Device chunks first.
        self.chunks.clear();
        // 2. A placeholder over the CPU view, so the range is never a hole before
        //    cuMemAddressFree unmaps it.
        if self.cpu_mapped {
            // SAFETY: [addr, addr + len) is this view's own CPU mapping inside its own
            // reservation; replacing it with PROT_NONE memory touches nothing else.
            let _ = unsafe {
                rustix::mm::mmap_anonymous(
                    self.cpu_ptr().cast(),
                    self.len,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
                )
            };
            self.cpu_mapped = false;
        }
        // 3. The reservation goes with the last Arc (its fields drop after this), freeing the
        //    addresses and unmapping the placeholder.
    }
}
