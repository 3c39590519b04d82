//! [`CudaBackend`]: hetmem's [`DeviceBackend`] on a CUDA device, and [`CudaBuilderExt`], which
//! adds one to a [`HetmemBuilder`].
//!
//! - **Memory.** One [`Reservation`] the size of the cap, cut into 2 MiB slots. A chunk is a
//!   [`PhysicalChunk`] mapped into a free slot (`cuMemCreate`, `cuMemMap`, `cuMemSetAccess`)
//!   and stays mapped until [`DeviceBackend::free_chunk`]; its handle is its device address.
//!   When every slot is taken, `alloc_chunk` fails with ENOMEM.
//! - **Copies and zero fills** go, in the order they are asked for, on one copy stream
//!   (`cuMemcpy{HtoD,DtoH,DtoD}Async_v2`, `cuMemsetD8Async`), under one mutex: a batch is
//!   enqueued whole and an event is recorded after it, so its [`Fence`] covers it and
//!   everything enqueued before it, zero fills included. One stream keeps that true without
//!   cross-stream waits, at the price of running host-to-device and device-to-host copies one
//!   after the other instead of at once.
//! - **Fences** index a table of pending events, at most [`MAX_PENDING`]. `wait` removes the
//!   event and synchronises it; `is_done` queries it. Finished events are reused.
//! - **Host memory** is whatever the runtime hands over, mostly its backing view of a memfd.
//!   Pageable, the driver stages such copies (6–8 GB/s measured, against 54 GB/s from
//!   registered memory). With [`CudaBackend::register_host_memory`] each region's view is
//!   registered when the region is made (`DeviceBackend::register_host`), and the runtime keeps
//!   its pages for the region's life (no hole punched): copies then run at the link's speed.
//! - **Errors.** A driver error becomes [`OpError::Device`]; the runtime keeps the data where
//!   it was. A batch whose enqueue fails part-way is drained before the error is returned, so
//!   nothing of it still runs when the runtime reuses its pages. After an error that loses the
//!   context ([`Error::is_context_fatal`]) the backend refuses all further copies.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hetmem::{
    BlockPageTable, Chunk, CopyOp, DeviceBackend, DeviceKind, Endpoint, Fence, HetmemBuilder,
    OpError, SimConfig,
};

use crate::context::Cuda;
use crate::error::{Error, Result};
use crate::host::HostRegistration;
use crate::stream::{Event, Stream};
use crate::vmm::{chunk_size, Alias, Mapping, PhysicalChunk, Reservation};

/// The most batches that may be submitted and not yet waited for. The runtime waits for every
/// batch it submits, so this only bounds a caller that does not.
pub const MAX_PENDING: usize = 1 << 16;

/// Finished events kept for reuse.
const SPARE_EVENTS: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An [`Error`] as an `io::Error` with the errno [`Error::errno`] gives.
fn io_error(e: Error) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(e.errno()).kind(), e)
}

/// Device memory slots of the reservation: the mapped chunk of each, and the free ones.
struct Slots {
    mapped: Vec<Option<Mapping>>,
    free: Vec<usize>,
}

/// The copy stream and the events of the batches on it.
struct Engine {
    stream: Stream,
    pending: HashMap<u64, Event>,
    spare: Vec<Event>,
    next: u64,
}

/// A CUDA device's memory and copy engine for hetmem: private memory (the CPU never maps it),
/// no device page faults (launches must find their ranges resident), chunks of 2 MiB.
pub struct CudaBackend {
    cuda: Cuda,
    chunk: usize,
    reservation: Arc<Reservation>,
    slots: Mutex<Slots>,
    engine: Mutex<Engine>,
    /// A context-fatal error happened: the device is lost for this process.
    lost: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Test hook: batches left to fail part-way ([`CudaBackend::inject_copy_failures`]).
    fail: AtomicU32,
    /// Register regions' backing views (`DeviceBackend::register_host`).
    register: bool,
    /// The backing views registered, by address.
    registrations: Mutex<HashMap<usize, HostRegistration>>,
    /// Map regions at the CPU's addresses (`DeviceBackend::reserve_address`).
    same_address: bool,
    /// The regions' device address ranges, by address, and the chunks mapped in them (by
    /// chunk handle).
    regions: Mutex<SameAddress>,
}

/// What the same-address layout holds: each region's reservation, and each bound chunk's
/// second mapping at its block's address.
#[derive(Default)]
struct SameAddress {
    reservations: HashMap<usize, Arc<Reservation>>,
    aliases: HashMap<u64, Alias>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("cuda", &self.cuda)
            .field("reservation", &self.reservation)
            .field("chunks", &self.chunks_mapped())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` (see [`Cuda::open`]: a missing driver is [`Error::NoDriver`])
    /// and makes a backend with `cap_bytes` of its memory.
    pub fn open(ordinal: u32, cap_bytes: usize) -> Result<CudaBackend> {
        Self::new(&Cuda::open(ordinal)?, cap_bytes)
    }

    /// A backend with at most `cap_bytes` (rounded down to whole 2 MiB chunks, at least one)
    /// of `cuda`'s memory. Only address space is reserved now; chunks are made as the runtime
    /// asks for them.
    pub fn new(cuda: &Cuda, cap_bytes: usize) -> Result<CudaBackend> {
        let chunk = chunk_size(cuda)?;
        let slots = cap_bytes / chunk;
        let total = cuda.info().total_memory;
        if slots == 0 || cap_bytes > total {
            return Err(Error::Invalid(format!(
                "a device cap of {cap_bytes:#x} bytes: must be at least one {chunk:#x}-byte \
                 chunk and at most the device's {total:#x} bytes"
            )));
        }
        let reservation = Reservation::new(cuda, slots * chunk)?;
        let stream = Stream::new(cuda)?;
        Ok(CudaBackend {
            cuda: cuda.clone(),
            chunk,
            reservation,
            slots: Mutex::new(Slots {
                mapped: (0..slots).map(|_| None).collect(),
                // Popped from the end: slot 0 first.
                free: (0..slots).rev().collect(),
            }),
            engine: Mutex::new(Engine {
                stream,
                pending: HashMap::new(),
                spare: Vec::new(),
                next: 1,
            }),
            lost: AtomicBool::new(false),
            last_error: Mutex::new(None),
            fail: AtomicU32::new(0),
            register: false,
            registrations: Mutex::new(HashMap::new()),
            same_address: false,
            regions: Mutex::new(SameAddress::default()),
        })
    }

    /// Maps every region at the CPU's addresses on the device too (`alloc` and `map_file`):
    /// the device range is reserved first, the CPU view mapped over CUDA's placeholder there,
    /// and each block's chunk mapped at the block's address as well as in the pool. A kernel
    /// then dereferences the pointers the CPU uses, pointers stored in the data included, and
    /// a declared range of many blocks is one pointer (`hetmem::Resident::at_cpu_address`).
    /// Costs a `cuMemMap` + `cuMemSetAccess` (about 34 µs on the H200) each time a chunk is
    /// bound to a block. Memory adopted by `Hetmem::register` keeps its own address, which the
    /// device cannot share: its runs are reached through their pool addresses. Off by default.
    pub fn same_address(mut self, on: bool) -> CudaBackend {
        self.same_address = on;
        self
    }

    /// Region address ranges reserved now, and chunks mapped at their blocks' addresses.
    pub fn same_address_counts(&self) -> (usize, usize) {
        let r = lock(&self.regions);
        (r.reservations.len(), r.aliases.len())
    }

    /// Registers every region's backing view with the device (`cuMemHostRegister`, portable
    /// and device-mapped) when the region is made, so migrations copy at the link's speed
    /// (54 GB/s against 6–8 GB/s staged, on the H200) with no CPU copy. The price: each
    /// region's memory is allocated and pinned in RAM for its whole life, from `alloc` or
    /// `map_file` on, so a region must fit in the RAM the process may pin, and sparse
    /// allocations are not sparse. Off by default.
    pub fn register_host_memory(mut self, on: bool) -> CudaBackend {
        self.register = on;
        self
    }

    /// Backing views registered now.
    pub fn host_registrations(&self) -> usize {
        lock(&self.registrations).len()
    }

    /// The device's address of host byte `host`, when it lies in a registered backing view
    /// (device-mapped): how a kernel reaches a page placed remotely, in system memory.
    pub fn host_device_ptr(&self, host: *const u8) -> Option<crate::span::DevicePtr> {
        let at = host as usize;
        lock(&self.registrations).iter().find_map(|(&base, r)| {
            let len = crate::host::HostMem::len(r);
            (at >= base && at < base + len).then(|| r.device_ptr().offset(at - base))
        })
    }

    /// The device.
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }

    /// Device memory this backend may use, in bytes (whole chunks).
    pub fn capacity(&self) -> usize {
        self.reservation.size()
    }

    /// Chunks allocated and mapped now.
    pub fn chunks_mapped(&self) -> usize {
        let s = lock(&self.slots);
        s.mapped.len() - s.free.len()
    }

    /// Batches submitted and not yet waited for.
    pub fn pending_batches(&self) -> usize {
        lock(&self.engine).pending.len()
    }

    /// Whether a context-fatal error has lost the device; every copy fails from then on.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The last driver error a copy, fill or wait met, as text.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Test hook: the next `n` batches of copies fail after their first copy was enqueued, as
    /// if the driver refused the second (the enqueued part is drained first). Batches of one
    /// copy fail before it is enqueued.
    pub fn inject_copy_failures(&self, n: u32) {
        self.fail.store(n, Ordering::Release);
    }

    fn note(&self, e: &Error) {
        if e.is_context_fatal() {
            self.lost.store(true, Ordering::Release);
        }
        *lock(&self.last_error) = Some(e.to_string());
    }

    /// The device address of `[off, off + len)` of `chunk`, or `None` when the chunk is not
    /// this backend's or the range leaves it.
    fn device_range(&self, chunk: &Chunk, off: usize, len: usize) -> Option<u64> {
        let base = self.reservation.ptr().0;
        let inside = chunk.handle >= base
            && chunk.handle < base + self.reservation.size() as u64
            && (chunk.handle - base) % self.chunk as u64 == 0;
        let fits = off.checked_add(len).is_some_and(|end| end <= self.chunk);
        (inside && fits && len > 0).then(|| chunk.handle + off as u64)
    }

    /// Enqueues one copy.
    ///
    /// # Safety
    /// `DeviceBackend::copy`'s contract for `op`.
    unsafe fn enqueue(&self, stream: &Stream, op: &CopyOp<'_>) -> Result<(), OpError> {
        /// A side: host memory (the runtime's, or a host-addressable chunk of another
        /// backend) or device memory of this one.
        enum Side {
            Host(*mut u8),
            Dev(u64),
        }
        let side = |e: Endpoint<'_>| match e {
            Endpoint::Host(p) => Ok(Side::Host(p)),
            Endpoint::Chunk(c, off) => match c.host_ptr() {
                Some(p) => Ok(Side::Host(p.wrapping_add(off))),
                None => self
                    .device_range(c, off, op.len)
                    .map(Side::Dev)
                    .ok_or(OpError::Device),
            },
        };
        let n = op.len;
        // The caller's contract: host ranges are valid and untouched, and device ranges are
        // frames of chunks that stay mapped, until the fence recorded after this batch
        // completes; device ranges were checked to lie inside one of this backend's chunks.
        let r = match (side(op.src)?, side(op.dst)?) {
            // SAFETY: as above.
            (Side::Host(s), Side::Dev(d)) => unsafe { stream.copy_h2d_raw(d, s, n) },
            // SAFETY: as above.
            (Side::Dev(s), Side::Host(d)) => unsafe { stream.copy_d2h_raw(d, s, n) },
            // SAFETY: as above.
            (Side::Dev(s), Side::Dev(d)) => unsafe { stream.copy_d2d_raw(d, s, n) },
            // Host to host is not a device copy.
            (Side::Host(_), Side::Host(_)) => return Err(OpError::Device),
        };
        r.map_err(|e| {
            self.note(&e);
            OpError::Device
        })
    }

    /// Whether this batch is to fail (the test hook).
    fn take_failure(&self) -> bool {
        self.fail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl DeviceBackend for CudaBackend {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Private
    }

    fn demand_faults(&self) -> bool {
        false
    }

    fn alloc_chunk(&self) -> io::Result<Chunk> {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.free.pop() else {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        };
        let made = PhysicalChunk::new(&self.cuda, self.chunk)
            .and_then(|c| Mapping::new(&self.reservation, slot * self.chunk, c));
        match made {
            Ok(m) => {
                let handle = m.ptr().0;
                slots.mapped[slot] = Some(m);
                Ok(Chunk::new(handle))
            }
            Err(e) => {
                slots.free.push(slot);
                Err(io_error(e))
            }
        }
    }

    fn free_chunk(&self, chunk: Chunk) {
        let Some(addr) = self.device_range(&chunk, 0, self.chunk) else {
            return;
        };
        {
            // Zero fills of its frames may still be queued: they must not reach an unmapped
            // range (a device fault loses the context).
            let engine = lock(&self.engine);
            if let Err(e) = engine.stream.synchronize() {
                self.note(&e);
            }
        }
        // A second mapping at a block's address goes before the chunk's own (the runtime
        // unmaps it when it unbinds the chunk; this is the backstop).
        drop(lock(&self.regions).aliases.remove(&chunk.handle));
        let slot = ((addr - self.reservation.ptr().0) as usize) / self.chunk;
        let mapping = {
            let mut slots = lock(&self.slots);
            let m = slots.mapped[slot].take();
            if m.is_some() {
                slots.free.push(slot);
            }
            m
        };
        // Unmaps and releases.
        drop(mapping);
    }

    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> io::Result<()> {
        let addr = self
            .device_range(chunk, offset, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if self.is_lost() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let engine = lock(&self.engine);
        // SAFETY: `[addr, addr + len)` lies in a chunk of this backend, mapped until
        // `free_chunk`, which drains the stream first.
        unsafe { engine.stream.memset_d8_raw(addr, 0, len) }.map_err(|e| {
            self.note(&e);
            io_error(e)
        })
    }

    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        if self.is_lost() {
            return Err(OpError::Device);
        }
        let mut engine = lock(&self.engine);
        if engine.pending.len() >= MAX_PENDING {
            return Err(OpError::Device);
        }
        // The test hook fails the second copy of a batch, or the only one.
        let fail_at = self.take_failure().then(|| usize::from(ops.len() > 1));
        let mut result = if fail_at.is_some() && ops.is_empty() {
            Err(OpError::Device)
        } else {
            Ok(())
        };
        for (i, op) in ops.iter().enumerate() {
            if fail_at == Some(i) {
                result = Err(OpError::Device);
                break;
            }
            // SAFETY: the caller's contract, passed on.
            result = unsafe { self.enqueue(&engine.stream, op) };
            if result.is_err() {
                break;
            }
        }
        let event = match result {
            Ok(()) => match engine.spare.pop() {
                Some(e) => Ok(e),
                None => Event::new(&self.cuda, false),
            }
            .and_then(|e| e.record(&engine.stream).map(|()| e))
            .map_err(|e| {
                self.note(&e);
                OpError::Device
            }),
            Err(e) => Err(e),
        };
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                // Part of the batch may be queued: it must be done before the runtime, told the
                // batch failed, lets the pages go.
                if let Err(e) = engine.stream.synchronize() {
                    self.note(&e);
                }
                return Err(e);
            }
        };
        let fence = engine.next;
        engine.next += 1;
        engine.pending.insert(fence, event);
        Ok(Fence(fence))
    }

    fn wait(&self, fence: Fence) -> Result<(), OpError> {
        let event = lock(&self.engine)
            .pending
            .remove(&fence.0)
            .ok_or(OpError::Device)?;
        // Without the lock: other threads go on submitting meanwhile.
        match event.wait() {
            Ok(()) => {
                let mut engine = lock(&self.engine);
                if engine.spare.len() < SPARE_EVENTS {
                    engine.spare.push(event);
                }
                Ok(())
            }
            Err(e) => {
                self.note(&e);
                Err(OpError::Device)
            }
        }
    }

    fn is_done(&self, fence: Fence) -> bool {
        match lock(&self.engine).pending.get(&fence.0) {
            // An error is reported by `wait`, which must therefore be called.
            Some(e) => e.is_complete().unwrap_or(true),
            None => true,
        }
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> io::Result<bool> {
        if !self.register {
            return Ok(false);
        }
        // SAFETY: the caller's contract: the backing view stays mapped, neither remapped nor
        // punched, until `unregister_host`, and is used only as DMA memory meanwhile.
        let r = unsafe { HostRegistration::new(&self.cuda, ptr, len) }.map_err(|e| {
            self.note(&e);
            io_error(e)
        })?;
        lock(&self.registrations).insert(ptr as usize, r);
        Ok(true)
    }

    fn reserve_address(&self, len: usize) -> io::Result<Option<usize>> {
        if !self.same_address {
            return Ok(None);
        }
        let size = len.div_ceil(self.chunk) * self.chunk;
        let r = Reservation::new(&self.cuda, size).map_err(|e| {
            self.note(&e);
            io_error(e)
        })?;
        let addr = r.ptr().0 as usize;
        lock(&self.regions).reservations.insert(addr, r);
        Ok(Some(addr))
    }

    fn release_address(&self, addr: usize) {
        let mut regions = lock(&self.regions);
        let Some(r) = regions.reservations.remove(&addr) else {
            return;
        };
        // Every chunk should be unbound by now; unmap any left, as freeing a reservation with
        // chunks mapped in it is not allowed.
        let (start, end) = (addr as u64, addr as u64 + r.size() as u64);
        regions
            .aliases
            .retain(|_, a| !(a.ptr().0 >= start && a.ptr().0 < end));
        drop(regions);
        // Dropping it frees the addresses (and unmaps the runtime's placeholder there).
        drop(r);
    }

    fn map_chunk_at(&self, chunk: &Chunk, addr: usize) -> io::Result<()> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let mut regions = lock(&self.regions);
        let (&base, res) = regions
            .reservations
            .iter()
            .find(|(&b, r)| addr >= b && addr < b + r.size())
            .ok_or_else(invalid)?;
        let res = res.clone();
        let slot = self
            .device_range(chunk, 0, self.chunk)
            .map(|d| ((d - self.reservation.ptr().0) / self.chunk as u64) as usize)
            .ok_or_else(invalid)?;
        let alias = {
            let slots = lock(&self.slots);
            let mapping = slots.mapped[slot].as_ref().ok_or_else(invalid)?;
            mapping.alias(&res, addr - base)
        }
        .map_err(|e| {
            self.note(&e);
            io_error(e)
        })?;
        regions.aliases.insert(chunk.handle, alias);
        Ok(())
    }

    fn unmap_chunk_at(&self, chunk: &Chunk, _addr: usize) {
        let alias = lock(&self.regions).aliases.remove(&chunk.handle);
        drop(alias);
    }

    fn unregister_host(&self, ptr: *mut u8) {
        let r = lock(&self.registrations).remove(&(ptr as usize));
        // Dropping it drains the context, then unpins the pages.
        drop(r);
    }

    fn page_table(&self) -> Box<dyn BlockPageTable> {
        Box::<CudaPageTable>::default()
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Nothing queued may outlive the chunks, then the chunks go before the reservation
        // (each mapping holds it, so it goes last in any case).
        let _ = lock(&self.engine).stream.synchronize();
        // Second mappings at blocks' addresses before the chunks themselves.
        lock(&self.regions).aliases.clear();
        lock(&self.slots).mapped.clear();
    }
}

/// What a CUDA device maps, per page of one block: hetmem's byte table (mode and remote bit
/// per page), which launches with declared ranges will read.
pub type CudaPageTable = hetmem::BytePageTable;

/// Adds a CUDA device to a [`HetmemBuilder`].
pub trait CudaBuilderExt: Sized {
    /// Adds CUDA device `ordinal` with at most `cap_bytes` of its memory (whole 2 MiB chunks),
    /// as a private device without page faults. A missing driver is [`Error::NoDriver`], a
    /// missing device [`Error::NoDevice`]; nothing panics.
    fn cuda_device(self, ordinal: u32, cap_bytes: usize) -> Result<Self>;

    /// Adds `backend` as a device: for a backend set up beyond [`CudaBuilderExt::cuda_device`]
    /// (`CudaBackend::register_host_memory`), or one the caller keeps a handle on (for its
    /// [`Cuda`] context, to launch kernels).
    fn cuda_backend(self, backend: Arc<CudaBackend>) -> Self;
}

impl CudaBuilderExt for HetmemBuilder {
    fn cuda_device(self, ordinal: u32, cap_bytes: usize) -> Result<Self> {
        Ok(self.cuda_backend(Arc::new(CudaBackend::open(ordinal, cap_bytes)?)))
    }

    fn cuda_backend(self, backend: Arc<CudaBackend>) -> Self {
        let config = SimConfig {
            kind: DeviceKind::Private,
            capacity: backend.capacity(),
            // Host-closure kernels cannot run on memory the host cannot address; launches
            // with declared ranges will not use these workers.
            workers: 1,
        };
        self.device_with_backend(config, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_errno() {
        let e = io_error(Error::Invalid("x".into()));
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = io_error(Error::driver(
            "cuMemCreate",
            cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            String::new(),
        ));
        assert_eq!(e.kind(), io::ErrorKind::OutOfMemory);
    }

    /// Without a driver the builder extension is a typed error, never a panic.
    #[test]
    fn the_builder_without_a_driver_is_a_typed_error() {
        match hetmem::Hetmem::builder().cuda_device(0, 64 << 20) {
            Ok(_) => assert!(Cuda::open(0).is_ok()),
            Err(Error::NoDriver(why)) => assert!(why.contains("libcuda"), "{why}"),
            Err(Error::NoDevice { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
