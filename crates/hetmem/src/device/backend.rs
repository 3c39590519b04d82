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

use std::fmt;
use std::io;

use hetmem_proto::{DeviceKind, OpError};

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

/// A device's memory and copy engine.
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
}
