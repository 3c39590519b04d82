//! The simulated device's memory: chunks are anonymous mappings, copies are `memcpy` on the
//! calling thread, and freed frames are dropped with MADV_DONTNEED so they read zero.

use std::io;

use hetmem_proto::{DeviceKind, OpError};

use super::backend::{Chunk, CopyOp, DeviceBackend, Endpoint, Fence};
use crate::sys::mem::{self, Mapping};
use hetmem_proto::BLOCK_BYTES;

/// Memory of a simulated device.
#[derive(Debug)]
pub struct SimBackend {
    kind: DeviceKind,
    /// Report copies as still running when submitted, so every drive that copies waits for
    /// them without the engine lock, as with a real DMA engine (`HETMEM_SIM_ASYNC=1`: the
    /// test suites run with it too).
    late: bool,
}

impl SimBackend {
    /// A simulated device of this kind.
    pub fn new(kind: DeviceKind) -> Self {
        Self {
            kind,
            late: std::env::var_os("HETMEM_SIM_ASYNC").is_some_and(|v| v == "1"),
        }
    }
}

fn host(e: Endpoint<'_>) -> Result<*mut u8, OpError> {
    match e {
        Endpoint::Host(p) => Ok(p),
        Endpoint::Chunk(c, off) => c
            .host_ptr()
            .map(|p| p.wrapping_add(off))
            .ok_or(OpError::Device),
    }
}

impl DeviceBackend for SimBackend {
    fn kind(&self) -> DeviceKind {
        self.kind
    }

    fn demand_faults(&self) -> bool {
        true
    }

    fn alloc_chunk(&self) -> io::Result<Chunk> {
        let m = Mapping::anonymous(BLOCK_BYTES)?;
        Ok(Chunk {
            handle: m.addr() as u64,
            host: Some(m),
        })
    }

    #[allow(unsafe_code)]
    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> io::Result<()> {
        let Some(p) = chunk.host_ptr() else {
            return Ok(());
        };
        // SAFETY: the frames are free: no page table maps them and no copy uses them, so their
        // contents are garbage; dropping them makes them read zero.
        unsafe { mem::madvise(p as usize + offset, len, mem::Advice::DontNeed) }
    }

    #[allow(unsafe_code)]
    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        for op in ops {
            let (src, dst) = (host(op.src)?, host(op.dst)?);
            if src == dst {
                continue;
            }
            // Streaming stores: a migrated page is not in the cache anyway, and skipping the
            // read-for-ownership makes block-sized copies faster in both directions (bench c,
            // d); a CPU read-back that follows is no slower for it (bench b).
            // SAFETY: the caller's contract: both ranges are valid, busy and ours.
            unsafe { mem::copy_streaming(dst, src, op.len) };
        }
        Ok(Fence(0))
    }

    fn wait(&self, _fence: Fence) -> Result<(), OpError> {
        Ok(())
    }

    /// Copies are done when `copy` returns (unless told to pretend otherwise).
    fn is_done(&self, _fence: Fence) -> bool {
        !self.late
    }
}
