//! The cache limit of a file mapping (`FileOptions::cache_limit`): the system memory it keeps for
//! blocks the CPU filled from the file is bounded. The memfd is a user-space cache of the file,
//! and nothing else would ever shrink it: its pages are shmem, which the kernel can only swap,
//! so a CPU scan of a file larger than memory would end in OOM where a kernel mmap reclaims its
//! page cache (`docs/file-contract.md` §2.8).
//!
//! Each CPU fault notes its block, oldest first, before it fills anything. Past the limit, the
//! fault first drops the oldest noted blocks that are clean (so a reader faulting one page at a
//! time never sees more than the limit resident; concurrent faults on new blocks may each be
//! one block over it for the time of their fill): the protocol's `Invalidate { Discard }` (which, for clean file
//! pages, is exactly a drop: the file holds their data), then the memfd pages are punched. The
//! next access reads the file again. The check that the block is clean and the Discard are one
//! hold of the block's lock (`Runtime::drive_if`), so a write cannot slip in between and be
//! dropped. A block is dropped only when nothing else has a stake in it: no dirty page, no
//! writeback, no unreported writeback error, no copy in flight, no queued request, no device
//! frame or device mapping (so the Discard never waits for a device launch, whose kernel could
//! be waiting for this very fault thread), no pinned page. Blocks that are not clean go to the
//! back of the order: dirty data is not bounded by the limit (a flush makes it clean).

use hetmem_proto::{Event, Invalidation, PageRun, Proc, PAGES_PER_BLOCK};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;

impl Runtime {
    /// Before a CPU fault on block `bi` of `region` is served: notes the block and, past the mapping's
    /// cache limit, drops the oldest clean blocks (`mm/cache.rs`). Each block noted is looked
    /// at once at most per call, so a mapping whose blocks are all dirty costs one pass.
    pub(crate) fn note_cpu_fill(&self, region: &Region, bi: usize) {
        let Some(cache) = region.file.as_ref().and_then(|f| f.cache.as_ref()) else {
            return;
        };
        let mut over = cache.note(bi);
        let mut tries = over.saturating_add(cache.limit);
        while over > 0 && tries > 0 {
            tries -= 1;
            let Some(victim) = cache.take_oldest(bi) else {
                break;
            };
            if self.drop_clean_block(region, victim) {
                self.stats.blocks_reclaimed.add(1);
                over -= 1;
            } else {
                cache.note_again(victim);
            }
        }
    }

    /// Drops every copy of block `bi` and punches its memfd pages, if the block is clean and
    /// nothing else has a stake in it (`mm/cache.rs`), all under one hold of its lock. Returns
    /// whether it did.
    fn drop_clean_block(&self, region: &Region, bi: usize) -> bool {
        let Some(run) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) else {
            return false;
        };
        let id = self.next_req();
        let event = Event::Invalidate {
            id,
            pages: run,
            kind: Invalidation::Discard,
        };
        let droppable = |block: &hetmem_proto::Block2M| {
            let st = block.state();
            !block.may_need_flush()
                && block.pending_requests() == 0
                && block.ops_in_flight().next().is_none()
                && self.topology.devices().all(|d| {
                    block.frames_held(d) == 0 && st.mapped_by(Proc::Device(d)).is_empty()
                })
                // Pins are taken outside any block lock; this one nests inside it.
                && !region.pins.any(bi, run)
        };
        let outcome = self.drive_if(region, bi, event, droppable, |block, _| {
            // The data is in the file: give its memory back.
            self.release_pages(region, bi, block, run);
        });
        matches!(outcome, Ok(Some(o)) if matches!(o.result_of(id), Some(Ok(())) | None))
    }
}
