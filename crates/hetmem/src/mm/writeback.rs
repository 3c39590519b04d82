//! Writeback of a file region's dirty pages: the hand-over to the file (`FileMapping::flush`).

use hetmem_proto::{Access, PageRun, Proc, RequestKind, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::error::Result;
use crate::mm::exec::Mask;
use crate::mm::file_io::FileMode;
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;

impl Runtime {
    /// Writes back every dirty page of a file mapping; the first error, once. Private (and
    /// read-only) mappings issue no Flush: it would mark their written pages clean, and the
    /// protocol drops clean file pages on eviction, to be read from the file again.
    pub(crate) fn flush_region(&self, region: &Region) -> Result<()> {
        self.flush_pages(region, 0, region.len / PAGE_SIZE)
    }

    /// `flush_region` for pages `[first, first + n)` of the mapping (`FileMapping::flush_range`):
    /// the protocol's Flush over each block's part of the range, so pages outside it stay dirty.
    /// The size check comes first, as for every flush: pages past a new end of file are
    /// truncated, not written back.
    pub(crate) fn flush_pages(&self, region: &Region, first: usize, n: usize) -> Result<()> {
        self.check_eof(region);
        if region
            .file
            .as_ref()
            .is_some_and(|f| f.mode != FileMode::Shared)
        {
            return Ok(());
        }
        let mut result = Ok(());
        // Only blocks a Flush has work in (the dirty-block index, `Region::dirty`) and blocks
        // with pinned pages, which DMA may have written with no fault we saw. A block skipped
        // here had, when we looked, no dirty page, no writeback in flight and no error to
        // report, so its Flush would have been an immediate `Ok`; a write that dirties it
        // after we looked is not one this flush had to cover.
        let end = first.saturating_add(n);
        let blocks = first / PAGES_PER_BLOCK..end.div_ceil(PAGES_PER_BLOCK);
        let mut todo = region.dirty.in_range(blocks.clone());
        todo.extend(region.pins.blocks(blocks));
        todo.sort_unstable();
        todo.dedup();
        for bi in todo {
            let start = (bi * PAGES_PER_BLOCK).max(first);
            let stop = ((bi + 1) * PAGES_PER_BLOCK).min(end);
            let Some(run) = PageRun::new(
                start % PAGES_PER_BLOCK,
                stop.saturating_sub(start),
                PAGES_PER_BLOCK,
            ) else {
                continue;
            };
            self.stats.blocks_flushed.add(1);
            // One Flush per run of pages with work (dirty, or under writeback), not one over
            // the whole range: a request holds back every later request on the pages it
            // covers until it completes, and a writeback may block for long (a frozen file
            // system, dirty throttling), during which faults on the block's clean pages must
            // go on. A page dirtied after this look is not one this flush had to cover.
            let (work, error) = {
                let block = self.lock_block(&region.blocks[bi]);
                (
                    block.flush_work() & Mask::from_run(run),
                    block.has_unreported_error(),
                )
            };
            let mut runs: Vec<PageRun> = work.runs().collect();
            if runs.is_empty() && error {
                // Nothing to write, an error to report: a Flush with no work reports it.
                runs.push(run);
            }
            for r in runs {
                let res = self.request(region, bi, r, RequestKind::Flush);
                if result.is_ok() {
                    result = res;
                }
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
        result
    }

    /// Makes `pages` of a Shared file mapping dirty again, after the kernel's writeback of them
    /// failed (an `fdatasync` error): hetmem had marked them clean when `pwrite` handed them
    /// to the page cache, and clean pages are dropped (eviction, a lease break) and read
    /// again from a file that may not hold them. A page hetmem no longer caches has nothing to
    /// make dirty: its data is whatever the page cache kept. A CPU write fault on the page
    /// marks it dirty without changing its data (and maps it writable for the CPU).
    pub(crate) fn redirty(&self, region: &Region, pages: &[usize]) {
        let mut i = 0;
        while i < pages.len() {
            let bi = pages[i] / PAGES_PER_BLOCK;
            let mut end = i;
            while end < pages.len() && pages[end] / PAGES_PER_BLOCK == bi {
                end += 1;
            }
            let wanted: Vec<usize> = {
                let Some(slot) = region.blocks.get(bi) else {
                    break;
                };
                let block = self.lock_block(slot);
                pages[i..end]
                    .iter()
                    .map(|&p| p % PAGES_PER_BLOCK)
                    .filter(|&p| {
                        let v = block.page(p);
                        v.file && v.valid != 0 && !v.dirty && !v.beyond_eof
                    })
                    .collect()
            };
            // One request per run of consecutive pages.
            let mut j = 0;
            while j < wanted.len() {
                let mut k = j + 1;
                while k < wanted.len() && wanted[k] == wanted[k - 1] + 1 {
                    k += 1;
                }
                if let Some(run) = PageRun::new(wanted[j], k - j, PAGES_PER_BLOCK) {
                    let fault = RequestKind::Fault {
                        proc: Proc::Cpu,
                        access: Access::Write,
                    };
                    // A page gone meanwhile (evicted clean, truncated) is not made dirty.
                    let _ = self.request(region, bi, run, fault);
                }
                j = k;
            }
            i = end;
        }
    }
}

/// Pages `[first, first + n)` of a region as (block, run within the block), in order.
pub(crate) fn block_runs(first: usize, n: usize) -> impl Iterator<Item = (usize, PageRun)> {
    let end = first.saturating_add(n);
    let mut page = first;
    std::iter::from_fn(move || {
        while page < end {
            let (bi, start) = (page / PAGES_PER_BLOCK, page % PAGES_PER_BLOCK);
            let len = (PAGES_PER_BLOCK - start).min(end - page);
            page += len;
            if let Some(run) = PageRun::new(start, len, PAGES_PER_BLOCK) {
                return Some((bi, run));
            }
        }
        None
    })
}
