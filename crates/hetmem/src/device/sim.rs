//! The simulated device's memory: chunks are anonymous mappings, copies are `memcpy` on the
//! calling thread, and freed frames are dropped with MADV_DONTNEED so they read zero. Its page
//! table is a byte per page.

use std::io;
use std::ops::Range;

use hetmem_proto::{DeviceKind, MapMode, OpError, BLOCK_BYTES, PAGES_PER_BLOCK};

use super::backend::{BlockPageTable, Chunk, CopyOp, DeviceBackend, Endpoint, Fence, Pte};
use crate::sys::mem::{self, Mapping};

/// Simulated page-table entry: mode in bits 0-1, target in bit 2.
mod pte {
    pub const NONE: u8 = 0;
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const ATOMIC: u8 = 3;
    pub const MODE: u8 = 3;
    /// The entry maps system memory (over the link), not the device's own.
    pub const REMOTE: u8 = 4;
}

/// A page table for one block kept as one byte per page (mode and remote bit), for backends
/// whose device reads its entries from host memory or that only need to know what is mapped:
/// the simulated backend's, and CUDA's (whose launches read it).
#[derive(Debug)]
pub struct BytePageTable([u8; PAGES_PER_BLOCK]);

impl Default for BytePageTable {
    fn default() -> Self {
        Self([pte::NONE; PAGES_PER_BLOCK])
    }
}

impl BlockPageTable for BytePageTable {
    fn map(&mut self, pages: Range<usize>, mode: MapMode, remote: bool) {
        let mode = match mode {
            MapMode::Read => pte::READ,
            MapMode::ReadWrite => pte::WRITE,
            MapMode::Exclusive => pte::ATOMIC,
        };
        self.0[pages].fill(mode | if remote { pte::REMOTE } else { 0 });
    }

    fn protect(&mut self, pages: Range<usize>) {
        for e in &mut self.0[pages] {
            if *e & pte::MODE != pte::NONE {
                *e = (*e & pte::REMOTE) | pte::READ;
            }
        }
    }

    fn unmap(&mut self, pages: Range<usize>) {
        self.0[pages].fill(pte::NONE);
    }

    fn entry(&self, page: usize) -> Pte {
        let e = self.0[page];
        Pte {
            mode: match e & pte::MODE {
                pte::READ => Some(MapMode::Read),
                pte::WRITE => Some(MapMode::ReadWrite),
                pte::ATOMIC => Some(MapMode::Exclusive),
                _ => None,
            },
            remote: e & pte::REMOTE != 0,
        }
    }
}

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

    fn page_table(&self) -> Box<dyn BlockPageTable> {
        Box::<BytePageTable>::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_keeps_what_it_is_told() {
        let mut t = BytePageTable::default();
        assert_eq!(t.entry(0), Pte::default());
        t.map(0..4, MapMode::ReadWrite, false);
        t.map(4..6, MapMode::Exclusive, true);
        t.protect(2..8);
        let want = |mode, remote| Pte {
            mode: Some(mode),
            remote,
        };
        assert_eq!(t.entry(1), want(MapMode::ReadWrite, false));
        assert_eq!(t.entry(3), want(MapMode::Read, false));
        assert_eq!(t.entry(5), want(MapMode::Read, true));
        assert_eq!(t.entry(7), Pte::default(), "protect maps nothing");
        t.unmap(0..PAGES_PER_BLOCK);
        assert!((0..PAGES_PER_BLOCK).all(|p| t.entry(p) == Pte::default()));
    }
}
