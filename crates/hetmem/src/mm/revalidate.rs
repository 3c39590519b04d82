//! Revalidation against the kernel: a raw `mprotect` or a truncation has no notifier in user
//! space, so the protocol's idea of protection and file size is brought up to date before use.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use hetmem_proto::{Access, Invalidation, PageRun, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::mm::file_io::{FileBacking, FileMode};
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;
use crate::mm::writeback::block_runs;
use crate::sys::lease;
use crate::sys::mem;

impl Runtime {
    /// Brings the protocol's idea of the piece's protection up to date with the kernel's
    /// mappings, as hmm_range_fault checks the VMA. A raw `mprotect` has no notifier in user
    /// space, so this runs before every device access and migration. Returns whether every
    /// page of the piece is readable, and whether every one is writable.
    pub(crate) fn sync_prot(&self, p: &BlockSpan) -> Result<(bool, bool)> {
        self.check_eof(&p.region);
        let end = p.va + p.run.len() * PAGE_SIZE;
        let mut at = p.va;
        let (mut all_read, mut all_write) = (true, true);
        while at < end {
            let Some((_, vend, read, write)) =
                mem::vma_at(at).map_err(Error::os("query mapping"))?
            else {
                return Err(Error::Fault("address is not mapped"));
            };
            all_read &= read;
            all_write &= write;
            let stop = end.min(vend.max(at + PAGE_SIZE));
            let start_page = p.run.start() + (at - p.va) / PAGE_SIZE;
            let n = (stop - at) / PAGE_SIZE;
            let run = PageRun::new(start_page, n, PAGES_PER_BLOCK).expect("inside the piece");
            let stale = {
                let block = self.lock_block(&p.region.blocks[p.bi]);
                block
                    .state()
                    .protection_differs(hetmem_proto::PageMask::from_run(run), read, write)
            };
            if stale {
                self.invalidate(&p.region, p.bi, run, Invalidation::Protect { read, write })?;
            }
            at = stop;
        }
        Ok((all_read, all_write))
    }

    /// The protection check of a device command or a migration, over all of its pieces before
    /// any of them moves data, as hmm_range_fault checks the VMAs first: `Fault` (EFAULT) if a
    /// page is not readable, `Perm` (EPERM) if `access` writes and a page is read-only.
    pub(crate) fn check_access(&self, pieces: &[BlockSpan], access: Access) -> Result<()> {
        for p in pieces {
            let (read, write) = self.sync_prot(p)?;
            if !read {
                return Err(Error::Fault("page is PROT_NONE"));
            }
            if access != Access::Read && !write {
                return Err(Error::Perm);
            }
        }
        Ok(())
    }
}

impl Runtime {
    /// Pages of block `bi` before the end of the file (all of them for anonymous memory).
    pub(crate) fn pages_before_eof(&self, region: &Region, bi: usize) -> usize {
        let pages = region.block_pages(bi);
        match &region.file {
            Some(f) => f
                .eof_page
                .load(Ordering::Acquire)
                .saturating_sub(bi * PAGES_PER_BLOCK)
                .min(pages),
            None => pages,
        }
    }

    /// Takes the lease of a mapping that does not hold it. Pages cached while it was not held
    /// may be older than another process's writes, made before we could take it: they are
    /// dropped first (dirty ones written back, as a break does), so a page read with the lease
    /// held is the file's. Other checks wait meanwhile, and `leased` says true only once the
    /// drop is done and the lease still held (a break may have come in between).
    fn retake_lease(&self, region: &Region, f: &FileBacking, write: bool) {
        let _one = f.retake.lock().unwrap_or_else(|e| e.into_inner());
        if f.leased.load(Ordering::Acquire) {
            return;
        }
        if f.breaking.load(Ordering::SeqCst) {
            // A break timed out by the kernel is still being served: its end releases the
            // lease, so one taken now would be lost with the writes made under it. The next
            // check after the break takes it back (and drops what was cached meanwhile).
            f.unleased_cache.store(true, Ordering::Release);
            return;
        }
        if !matches!(lease::take(f.file.as_fd(), write), Ok(true)) {
            f.unleased_cache.store(true, Ordering::Release);
            return;
        }
        if f.unleased_cache.swap(false, Ordering::AcqRel) {
            for bi in 0..region.blocks.len() {
                if let Some(all) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) {
                    // Discard writes dirty data back first; a page whose writeback fails stays.
                    let _ = self.invalidate(region, bi, all, Invalidation::Discard);
                }
            }
        }
        if lease::held(f.file.as_fd(), write) {
            f.leased.store(true, Ordering::Release);
        } else {
            f.unleased_cache.store(true, Ordering::Release);
        }
    }

    /// Drops every copy of pages `[first, first + n)` of a file mapping, so the next access
    /// reads the file again (`FileMapping::invalidate_range`): the protocol's
    /// `Invalidate { Discard }` over each block's part of the range, as a lease break drops a
    /// whole mapping. Discard writes a Shared mapping's dirty pages back before it drops them;
    /// a page whose writeback fails keeps its data, dirty and cached, and the first such error
    /// is returned after the rest of the range was dropped. The size check comes first, so a
    /// file that shrank truncates the pages past its end instead of having them written back.
    pub(crate) fn invalidate_pages(&self, region: &Region, first: usize, n: usize) -> Result<()> {
        self.check_eof(region);
        let mut result = Ok(());
        for (bi, run) in block_runs(first, n) {
            let r = self.invalidate(region, bi, run, Invalidation::Discard);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Compares a file mapping with the file's current size: pages past a new end of file get
    /// `Invalidate { Truncate }` (their data is dropped, dirty or not), so a CPU access raises
    /// SIGBUS as with mmap; pages past an old end come back when the file grows
    /// (`Invalidate { Extend }`). Runs at every fault, device access and flush of a file
    /// mapping: without leases, that is when hetmem notices another process's truncate.
    /// Takes the lease of a mapping that does not hold it first (`retake_lease`).
    pub(crate) fn check_eof(&self, region: &Region) {
        let Some(f) = &region.file else {
            return;
        };
        if f.lease_wanted.load(Ordering::Acquire) {
            // A lease breaking, or taken back by the kernel (a break unanswered for
            // lease-break-time), counts as lost at once, and is not taken again in the same
            // check: its break is queued for the lease thread, whose flush and drop should come
            // first. (A lease thread held up for longer than a check's interval still lets a
            // later check take it back before the drop; the drop follows, as without a lease.)
            let write = f.mode == FileMode::Shared;
            if f.leased.load(Ordering::Acquire) && !lease::held(f.file.as_fd(), write) {
                f.unleased_cache.store(true, Ordering::Release);
                f.leased.store(false, Ordering::Release);
            } else if !f.leased.load(Ordering::Acquire) {
                self.retake_lease(region, f, write);
            }
        }
        // One check at a time per mapping, so that shrinks and growths apply in the order
        // their fstats saw them. A check that finds another one running skips its own rather
        // than wait: the other may be waiting (in a truncation's device unmap) for a device
        // kernel whose closure faults on this mapping, and whose fault is this check. The
        // protocol already holds what the running check applied so far, and the next check
        // looks at the size again.
        let _serial = match f.eof_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let Some((before, now)) = f.observe_size() else {
            return;
        };
        // A shrink first: one a writeback saw (`before`) but no check applied yet, or this one.
        self.follow_shrink(region, f, before.min(now));
        if now > before {
            self.follow_growth(region, f, before, now);
        }
    }

    /// Applies a file size at or below the mapping's end of file: pages past it get
    /// `Invalidate { Truncate }`, and a new partial last page is dropped.
    fn follow_shrink(&self, region: &Region, f: &FileBacking, size: u64) {
        let total = region.len / PAGE_SIZE;
        if size < f.tail_checked.fetch_min(size, Ordering::AcqRel) && size % PAGE_SIZE as u64 != 0 {
            // The file shrank to the middle of a page: the kernel zeroed that page's tail in
            // the page cache, and our copy of it would show the old bytes again if the file
            // grows back. Drop it (its dirty bytes before the new end written back first, as
            // a writeback clips at the smallest size seen), so it is read from the file again.
            self.drop_page_of(region, f, size);
        }
        let file_pages = size.div_ceil(PAGE_SIZE as u64);
        let eof = file_pages.saturating_sub(f.first_page).min(total as u64) as usize;
        let old = f.eof_page.fetch_min(eof, Ordering::AcqRel);
        // No SIGBUS marker is set here: the truncation unmaps the pages, so the next access
        // faults, and the fault sets one that goes again (`Poison::BeyondEof`), so that a
        // growth is seen.
        for_runs(eof, old, |bi, run| {
            let _ = self.invalidate(region, bi, run, Invalidation::Truncate);
        });
    }

    /// Follows a file that grew from the mapping's end of file `before` to `now`, as a
    /// `MAP_SHARED` mapping does: pages past the old end come back (`Invalidate { Extend }`),
    /// and read the file at their next access. The page that held the old end is dropped first
    /// (its dirty bytes before that end written back): its copy holds zeros past the old end,
    /// or bytes stored there while it was past the end, neither of which is the file's now;
    /// only then does the end move up, so no writeback writes a page past the smallest size
    /// seen since it was filled.
    fn follow_growth(&self, region: &Region, f: &FileBacking, before: u64, now: u64) {
        if before % PAGE_SIZE as u64 != 0 {
            self.drop_page_of(region, f, before);
        }
        if !f.raise_end(before, now) {
            // A writeback saw the file shorter meanwhile: the next check applies that first.
            return;
        }
        f.tail_checked.store(now, Ordering::Release);
        let total = region.len / PAGE_SIZE;
        let file_pages = now.div_ceil(PAGE_SIZE as u64);
        let eof = file_pages.saturating_sub(f.first_page).min(total as u64) as usize;
        let old = f.eof_page.load(Ordering::Acquire);
        if eof <= old {
            return;
        }
        for_runs(old, eof, |bi, run| {
            let _ = self.invalidate(region, bi, run, Invalidation::Extend);
        });
        // The pages' SIGBUS markers go now, after the protocol counts them inside the file:
        // the next access faults and is served. (A marker set in between, by a fault refused
        // before the growth was followed, goes with them or, on the retry list, soon after.)
        self.zap_cpu(
            region,
            old * PAGE_SIZE,
            (eof - old) * PAGE_SIZE,
            "clear SIGBUS markers past the old end of file",
        );
        f.eof_page.store(eof, Ordering::Release);
    }

    /// Drops the cached copy of the page that holds byte `size` of the file, if the mapping
    /// shows it (dirty bytes are written back first, clipped at the mapping's end of file).
    fn drop_page_of(&self, region: &Region, f: &FileBacking, size: u64) {
        let total = region.len / PAGE_SIZE;
        let page = size / PAGE_SIZE as u64;
        if let Some(i) = page
            .checked_sub(f.first_page)
            .map(|i| i as usize)
            .filter(|&i| i < total)
        {
            if let Some(run) = PageRun::new(i % PAGES_PER_BLOCK, 1, PAGES_PER_BLOCK) {
                let _ = self.invalidate(region, i / PAGES_PER_BLOCK, run, Invalidation::Discard);
            }
        }
    }
}

/// Calls `each` with the block and run of every piece of pages `[from, to)` of a region.
fn for_runs(from: usize, to: usize, mut each: impl FnMut(usize, PageRun)) {
    let mut page = from;
    while page < to {
        let bi = page / PAGES_PER_BLOCK;
        let start = page % PAGES_PER_BLOCK;
        let n = (PAGES_PER_BLOCK - start).min(to - page);
        if let Some(run) = PageRun::new(start, n, PAGES_PER_BLOCK) {
            each(bi, run);
        }
        page += n;
    }
}
