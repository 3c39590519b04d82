//! `Hetmem::pin`: managed memory that DMA by others may write (`docs/file-contract.md` §2.10).

use std::sync::Arc;

use crate::api::hetmem::Hetmem;
use crate::error::Result;
use crate::mm::runtime::RuntimeHandle;
use crate::mm::space::BlockSpan;

/// A pinned range of managed memory ([`Hetmem::pin`]); dropping it unpins.
///
/// While it lives, the range stays in system memory, mapped writable for the CPU, and counts
/// as written (a file mapping's pages are dirty, so a flush writes them): devices reach it
/// remotely, migrations to a device and [`Hetmem::discard`] of it fail with
/// [`crate::Error::Busy`], and eviction never takes it. Dropping it marks the pages written
/// again (DMA may have written them after a flush cleaned them), so the next flush writes what
/// the DMA left there, and gives each page back the preferred location it had.
#[derive(Debug)]
#[must_use = "dropping the pin unpins the range at once"]
pub struct Pin {
    handle: Arc<RuntimeHandle>,
    pieces: Vec<BlockSpan>,
    addr: usize,
    len: usize,
}

impl Pin {
    /// Start address of the pinned range.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length of the pinned range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a pin covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.handle.inner.unpin(&self.pieces);
    }
}

impl Hetmem {
    /// Pins `[addr, addr + len)` for DMA by others: an `O_DIRECT` read into it, an io_uring
    /// fixed buffer, an RDMA memory region, vmsplice. The kernel writes such memory with no
    /// fault hetmem sees, so without a pin the write may land in a copy hetmem then replaces
    /// (the page moved to a device), or in a page hetmem believes clean (never written back).
    /// The pin brings the range to system memory, maps it writable for the CPU and marks it
    /// written, as a CPU write would, and keeps it there until the returned guard is dropped
    /// (see [`Pin`]). Register the memory for DMA after this returns, and unregister it before
    /// dropping the guard. Pins may overlap; a page is unpinned when its last pin goes.
    ///
    /// What a pin does not stop: `munmap` (or dropping the mapping) and a truncation of the
    /// file drop the pages as usual, and DMA after that goes nowhere anybody reads.
    ///
    /// # Errors
    /// Before anything is done: `Invalid` (EINVAL) for an empty, unaligned or wrapping range,
    /// and in a fork child; `Fault` (EFAULT) when part of the range is not managed memory, is
    /// `PROT_NONE`, or lies past the end of its file; `Perm` (EPERM) when it may not be written
    /// (a read-only file mapping, a read-only `protect`). While bringing it home: `Io` when a
    /// copy or a file read fails, `Fault` if the range changed meanwhile; the range is then
    /// unpinned again.
    pub fn pin(&self, addr: usize, len: usize) -> Result<Pin> {
        let pieces = self.inner().pin(addr, len)?;
        Ok(Pin {
            handle: self.0.clone(),
            pieces,
            addr,
            len,
        })
    }
}
