//! What the runtime needs from a device's memory, shaped so a CUDA backend fits as well as
//! the simulated one (`docs/runtime.md`, "Backends").
//!
//! - Memory is bound per 2 MiB block ([`Chunk`]), as CUDA's virtual-memory API maps it; 4 KiB
//!   validity lives in the protocol's planes, so a chunk's mapping stays put while pages come
//!   and go.
//! - Copies are submitted in batches and complete with a [`Fence`], as copies on a CUDA stream
//!   complete with an event. A drive does not hold the block's engine lock while a batch runs
//!   ([`DeviceBackend::is_done`]). The simulated backend completes them before `copy` returns.
//! - Whether the device takes page faults is the backend's to say: a CUDA device cannot, so
//!   the runtime establishes residency for a kernel's declared ranges before launching it.
//! - The device's page tables are the backend's ([`BlockPageTable`]), as a Linux driver owns
//!   its page tables and the core only tells it what to map (HMM mirror callbacks, dmirror).

use std::fmt;
use std::io;
use std::ops::Range;

use hetmem_proto::{DeviceKind, MapMode, OpError};

use crate::sys::mem::Mapping;

/// One block's worth (2 MiB) of one device's memory.
#[derive(Debug)]
pub struct Chunk {
    /// Backend-specific handle (a CUDA allocation handle or device address).
    pub handle: u64,
    /// The chunk as host memory, if the host can address it (simulated devices).
    pub(crate) host: Option<Mapping>,
}

impl Chunk {
    /// A chunk of device memory the host cannot address, known to its backend by `handle`
    /// (a CUDA allocation handle or device address). This is how a backend outside this crate
    /// makes its chunks.
    pub fn new(handle: u64) -> Self {
        Self { handle, host: None }
    }

    /// Host address of the chunk, if it has one.
    pub fn host_ptr(&self) -> Option<*mut u8> {
        self.host.as_ref().map(Mapping::as_ptr)
    }
}

/// One side of a copy.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint<'a> {
    /// Host memory (system memory's backing view).
    Host(*mut u8),
    /// A chunk, at a byte offset.
    Chunk(&'a Chunk, usize),
}

/// One copy of `len` bytes.
#[derive(Clone, Copy, Debug)]
pub struct CopyOp<'a> {
    /// Source.
    pub src: Endpoint<'a>,
    /// Destination.
    pub dst: Endpoint<'a>,
    /// Bytes.
    pub len: usize,
}

/// Completion token of a batch of copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence(pub u64);

/// One entry of a device page table, as the runtime reads it back. The default is unmapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pte {
    /// How the device maps the page; `None` when it does not.
    pub mode: Option<MapMode>,
    /// The entry maps system memory (over the link), not the device's own.
    pub remote: bool,
}

/// One device's page table for one 2 MiB block, kept by its backend. Pages are the block's,
/// `0..PAGES_PER_BLOCK`.
///
/// The runtime calls `map`, `protect` and `unmap` when the protocol's actions say so
/// (`DeviceMap`, `DeviceProtect`, `DeviceUnmap`), under the block's page-table write lock, and
/// reads entries back under the read lock before a device access. The table holds what the
/// protocol decided and nothing else: it makes no decision of its own, so the protocol stays
/// the one source of truth for coherence.
pub trait BlockPageTable: Send + Sync + fmt::Debug {
    /// The device maps `pages` with `mode`; `remote` when they map system memory over the
    /// link rather than the device's own.
    fn map(&mut self, pages: Range<usize>, mode: MapMode, remote: bool);

    /// The mapped entries among `pages` become read-only, keeping where they point; unmapped
    /// ones stay unmapped.
    fn protect(&mut self, pages: Range<usize>);

    /// The device no longer maps `pages`.
    fn unmap(&mut self, pages: Range<usize>);

    /// The entry of `page`.
    fn entry(&self, page: usize) -> Pte;
}

/// A device's memory, copy engine and page tables.
///
/// The page tables are the backend's, as a Linux driver owns its device's page tables and the
/// core only tells it what to map (HMM's mirror callbacks, dmirror): the runtime asks for a
/// block's table the first time the device maps a page of it, and from then on tells it what
/// the protocol decided. A simulated device keeps a byte per page; a CUDA backend can keep
/// whatever its launches need.
pub trait DeviceBackend: Send + Sync + fmt::Debug {
    /// Private or coherent.
    fn kind(&self) -> DeviceKind;

    /// Whether the device takes page faults on unmapped pages. Without them (CUDA), residency
    /// is established for declared ranges before a kernel launches.
    fn demand_faults(&self) -> bool;

    /// Binds 2 MiB of device memory.
    fn alloc_chunk(&self) -> io::Result<Chunk>;

    /// Unbinds a chunk none of whose frames is in use.
    fn free_chunk(&self, chunk: Chunk) {
        drop(chunk);
    }

    /// The frames `[offset, offset + len)` of `chunk` were freed: they must read zero when
    /// reused, so no data leaks from one allocation into another.
    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> io::Result<()>;

    /// Starts a batch of copies.
    ///
    /// # Safety
    /// Host endpoints must be valid for `len` bytes until the fence completes, and nobody may
    /// write a source or touch a destination meanwhile (the protocol marks the pages busy).
    #[allow(unsafe_code)]
    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError>;

    /// Waits for a batch.
    fn wait(&self, fence: Fence) -> Result<(), OpError>;

    /// Whether a batch has finished, without waiting for it. A drive completes a finished
    /// batch at once, under the block's engine lock; for one still running it releases the
    /// lock, so other work on the block goes on while the copy runs (the protocol keeps the
    /// copied pages busy meanwhile), waits for it (`wait`) outside the lock, and locks again to
    /// report the completion. The default says no: always wait outside the lock.
    fn is_done(&self, fence: Fence) -> bool {
        let _ = fence;
        false
    }

    /// A region's backing view of system memory, `[ptr, ptr + len)`, was just mapped: the
    /// backend may register it with its device (`cuMemHostRegister`) so that copies to and
    /// from it run at the link's speed instead of being staged. Returns whether it did; the
    /// default does nothing.
    ///
    /// Registration pins every page of the range at once, so the runtime then keeps the pages
    /// for the region's life: it never punches a hole in a registered region (a punched page
    /// would leave the memfd while the registration still pins it, and copies through the
    /// registration would miss the data); data that goes for good is zeroed in place instead.
    /// [`DeviceBackend::unregister_host`] comes before the view is unmapped, after the
    /// region's last copy.
    ///
    /// # Safety
    /// The caller (the runtime) keeps `[ptr, ptr + len)` mapped, neither remapped nor punched,
    /// until it calls `unregister_host(ptr)`, and touches it only as DMA memory meanwhile.
    #[allow(unsafe_code)]
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> io::Result<bool> {
        let _ = (ptr, len);
        Ok(false)
    }

    /// Undoes a [`DeviceBackend::register_host`] that returned true, for the range starting
    /// at `ptr`.
    fn unregister_host(&self, ptr: *mut u8) {
        let _ = ptr;
    }

    /// A region of `len` bytes is being made: the backend may reserve `len` bytes of its
    /// device's virtual addresses, at an address whose host side is free for the runtime's
    /// CPU view (CUDA keeps a `PROT_NONE` placeholder there, which the view replaces with
    /// `MAP_FIXED`). Then the CPU and the device use the same addresses for the region: a
    /// block's chunk is also mapped at the block's address ([`DeviceBackend::map_chunk_at`]),
    /// so pointers stored in the data mean the same on both sides. Returns the address, or
    /// `None` (the default) for no such reservation.
    fn reserve_address(&self, len: usize) -> io::Result<Option<usize>> {
        let _ = len;
        Ok(None)
    }

    /// Frees a reservation [`DeviceBackend::reserve_address`] made at `addr`. Called when the
    /// region goes, after the runtime has put a `PROT_NONE` placeholder over its CPU view
    /// (freeing the reservation unmaps whatever the host has there) and after every chunk
    /// mapped in it was unmapped.
    fn release_address(&self, addr: usize) {
        let _ = addr;
    }

    /// `chunk` now holds the frames of the block at device address `addr` (inside a range
    /// [`DeviceBackend::reserve_address`] gave): map it there too. Called under the block's
    /// page-table write lock, before any frame of it is used.
    fn map_chunk_at(&self, chunk: &Chunk, addr: usize) -> io::Result<()> {
        let _ = (chunk, addr);
        Ok(())
    }

    /// `chunk` no longer holds the block at `addr`'s frames: unmap it there (it goes back to
    /// the pool, or is freed).
    fn unmap_chunk_at(&self, chunk: &Chunk, addr: usize) {
        let _ = (chunk, addr);
    }

    /// A new, empty page table for one block. Called the first time the device maps a page
    /// of the block, so blocks the device never maps cost no table.
    /// It is called under the block's locks, so it must not call back into the runtime.
    fn page_table(&self) -> Box<dyn BlockPageTable>;
}
