//! Writeback of a file region's dirty pages (msync's analogue).

use hetmem_proto::{Access, PageRun, Proc, RequestKind, PAGES_PER_BLOCK};

use crate::error::Result;
use crate::mm::file_io::FileMode;
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;

impl Runtime {
    /// Writes back every dirty page of a file mapping; the first error, once. Private (and
    /// read-only) mappings issue no Flush: it would mark their written pages clean, and the
    /// protocol drops clean file pages on eviction, to be read from the file again.
    pub(crate) fn flush_region(&self, region: &Region) -> Result<()> {
        self.check_eof(region);
        if region
            .file
            .as_ref()
            .is_some_and(|f| f.mode != FileMode::Shared)
        {
            return Ok(());
        }
        let mut first = Ok(());
        for bi in 0..region.blocks.len() {
            let Some(all) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) else {
                continue;
            };
            let r = self.request(region, bi, all, RequestKind::Flush);
            if first.is_ok() {
                first = r;
            }
            // A pinned page is written by DMA with no fault we see: it counts as written again
            // as soon as its writeback is done (a CPU write fault marks it dirty), so every
            // flush that starts after a DMA write writes it (`mm/pin.rs`).
            for run in region.pins.in_block(bi).runs() {
                let write = RequestKind::Fault {
                    proc: Proc::Cpu,
                    access: Access::Write,
                };
                let _ = self.request(region, bi, run, write);
            }
        }
        first
    }
}
