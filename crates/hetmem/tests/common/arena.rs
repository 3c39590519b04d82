//! Device memory the host cannot address, for test backends written against the public API
//! only (`outside_backend.rs`, `async_copies.rs`): chunks are boxed arenas known by handle, and
//! a batch of copies is carried out when it is completed (`Arenas::complete`), as copies on a
//! CUDA stream complete at their event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hetmem::{Chunk, CopyOp, Endpoint, Fence, OpError};

/// A chunk: 2 MiB.
pub const CHUNK: usize = 2 << 20;

/// One side of a submitted copy: a host address, or a chunk's handle and an offset.
#[derive(Debug, Clone, Copy)]
enum Side {
    Host(usize),
    Chunk(u64, usize),
}

fn side(e: Endpoint<'_>) -> Side {
    match e {
        Endpoint::Host(p) => Side::Host(p as usize),
        Endpoint::Chunk(c, off) => Side::Chunk(c.handle, off),
    }
}

#[derive(Debug, Clone, Copy)]
struct Copy {
    src: Side,
    dst: Side,
    len: usize,
}

/// The arenas and the batches submitted and not completed yet.
#[derive(Debug, Default)]
pub struct Arenas {
    chunks: Mutex<HashMap<u64, Box<[u8]>>>,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, Vec<Copy>>>,
    /// Copies carried out.
    pub copies: AtomicU64,
}

impl Arenas {
    /// A new chunk, unless `max` (0: no limit) chunks exist already (ENOMEM).
    pub fn alloc(&self, max: usize) -> std::io::Result<Chunk> {
        let mut chunks = self.chunks.lock().unwrap();
        if max > 0 && chunks.len() >= max {
            return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let h = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        chunks.insert(h, vec![0u8; CHUNK].into_boxed_slice());
        Ok(Chunk::new(h))
    }

    pub fn free(&self, chunk: Chunk) {
        self.chunks.lock().unwrap().remove(&chunk.handle);
    }

    /// Zeroes `[offset, offset + len)` of the chunk.
    pub fn discard(&self, chunk: &Chunk, offset: usize, len: usize) {
        if let Some(c) = self.chunks.lock().unwrap().get_mut(&chunk.handle) {
            c[offset..offset + len].fill(0);
        }
    }

    /// Whether some chunk's bytes satisfy `f`.
    pub fn any_chunk(&self, f: impl Fn(&[u8]) -> bool) -> bool {
        self.chunks.lock().unwrap().values().any(|c| f(c))
    }

    /// Chunks that exist now.
    pub fn chunk_count(&self) -> usize {
        self.chunks.lock().unwrap().len()
    }

    /// Records a batch; it is carried out by `complete(fence)`.
    ///
    /// # Safety
    /// `DeviceBackend::copy`'s contract: host endpoints stay valid and untouched until the
    /// batch is completed.
    pub unsafe fn submit(&self, ops: &[CopyOp<'_>]) -> Fence {
        let fence = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let batch = ops
            .iter()
            .map(|op| Copy {
                src: side(op.src),
                dst: side(op.dst),
                len: op.len,
            })
            .collect();
        self.pending.lock().unwrap().insert(fence, batch);
        Fence(fence)
    }

    /// Carries out the batch of `fence`.
    pub fn complete(&self, fence: Fence) -> Result<(), OpError> {
        let batch = self
            .pending
            .lock()
            .unwrap()
            .remove(&fence.0)
            .ok_or(OpError::Device)?;
        let mut chunks = self.chunks.lock().unwrap();
        for c in batch {
            let mut buf = vec![0u8; c.len];
            match c.src {
                // SAFETY: `submit`'s contract: the host range is valid and stable until the
                // batch completes, which is now.
                Side::Host(p) => unsafe {
                    std::ptr::copy_nonoverlapping(p as *const u8, buf.as_mut_ptr(), c.len)
                },
                Side::Chunk(h, off) => {
                    buf.copy_from_slice(&chunks.get(&h).ok_or(OpError::Device)?[off..off + c.len])
                }
            }
            match c.dst {
                // SAFETY: as above, for the destination.
                Side::Host(p) => unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), p as *mut u8, c.len)
                },
                Side::Chunk(h, off) => chunks.get_mut(&h).ok_or(OpError::Device)?[off..off + c.len]
                    .copy_from_slice(&buf),
            }
            self.copies.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
