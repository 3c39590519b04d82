//! Pinning (`Hetmem::pin`): a range that DMA by others writes (an `O_DIRECT` read into it, an
//! io_uring fixed buffer, an RDMA memory region, vmsplice) stays in system memory, mapped
//! writable for the CPU and dirty, until the pin is dropped (`docs/file-contract.md` §2.10).
//!
//! The kernel writes a pinned page's physical memory (the memfd page under the CPU view) with no
//! fault hetmem sees. So a pin keeps that memory the page's only copy, and marks it dirty as a
//! CPU write would; everything goes through the protocol:
//! - at the pin: `PreferredLocation(System)` advice on the range (devices then map system memory
//!   remotely instead of taking the page), `Migrate { System }`, and a CPU write fault (which
//!   collapses device copies, maps the pages writable, and marks file pages dirty);
//! - while pinned: migrations to a device and `Hetmem::discard` of the range fail with `Busy`,
//!   advice that would move it fails with `Busy`, the placement policy's migrations and
//!   unpinning skip it, and a `Discard` the runtime sends itself (a lease break, a lease taken
//!   back, a partial last page) leaves its pages alone. Truncation and munmap still drop them,
//!   as the kernel drops a pinned page-cache page from the file;
//! - at the unpin: a CPU write fault again, so a page a writeback cleaned during the pin (DMA
//!   may have written it since) is dirty and written at the next flush, then the advice each
//!   page had before its first pin.

use hetmem_proto::{
    Access, Advice, Event, Mem, PageMask, PageRun, Proc, RequestKind, BLOCK_WORDS, PAGES_PER_BLOCK,
};

use crate::error::{Error, Result};
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;

/// `run`'s pages minus `pinned`, as runs.
pub(crate) fn unpinned_runs(run: PageRun, pinned: PageMask<BLOCK_WORDS>) -> Vec<PageRun> {
    if pinned.is_empty() {
        return vec![run];
    }
    (PageMask::from_run(run) - pinned).runs().collect()
}

impl Runtime {
    /// Pins `[addr, addr + len)` (`Hetmem::pin`). Every check comes before anything is done:
    /// `Invalid` for an empty, unaligned or wrapping range and in a fork child, `Fault` for a
    /// range that is not all managed memory, is `PROT_NONE` or lies past the end of its file,
    /// `Perm` for one that may not be written (a read-only file mapping, a read-only
    /// `protect`). Returns the pieces, for `unpin`.
    pub(crate) fn pin(&self, addr: usize, len: usize) -> Result<Vec<BlockSpan>> {
        let pieces = self.pieces(addr, len)?;
        self.check_access(&pieces, Access::Write)?;
        for p in &pieces {
            if p.run.end() > self.pages_before_eof(&p.region, p.bi) {
                return Err(Error::Fault("page is beyond end of file"));
            }
        }
        for p in &pieces {
            // What each page prefers now, to restore when its last pin goes.
            let before: Vec<(Option<Mem>, PageMask<BLOCK_WORDS>)> = {
                let block = self.lock_block(&p.region.blocks[p.bi]);
                let st = block.state();
                let here = PageMask::from_run(p.run);
                std::iter::once(None)
                    .chain(std::iter::once(Some(Mem::System)))
                    .chain(self.topology.devices().map(|d| Some(Mem::Device(d))))
                    .map(|loc| (loc, st.preferred_is(loc) & here))
                    .collect()
            };
            let first = p.bi * PAGES_PER_BLOCK;
            let mut table = p.region.pins.lock();
            for page in p.run.pages() {
                let had = before
                    .iter()
                    .find(|(_, m)| m.contains(page))
                    .and_then(|&(loc, _)| loc);
                table
                    .entry(first + page)
                    .and_modify(|e| e.0 += 1)
                    .or_insert((1, had));
            }
        }
        if let Err(e) = self.pin_home(&pieces) {
            self.unpin(&pieces);
            return Err(e);
        }
        Ok(pieces)
    }

    /// The pin's work through the protocol: devices map the pages remotely from now on, the
    /// data comes to system memory, and the CPU maps it writable, dirty.
    fn pin_home(&self, pieces: &[BlockSpan]) -> Result<()> {
        for p in pieces {
            self.advise_run(&p.region, p.bi, p.run, Some(Mem::System))?;
        }
        let write = RequestKind::Fault {
            proc: Proc::Cpu,
            access: Access::Write,
        };
        for p in pieces {
            self.request(
                &p.region,
                p.bi,
                p.run,
                RequestKind::Migrate { dst: Mem::System },
            )?;
            self.request(&p.region, p.bi, p.run, write)?;
        }
        Ok(())
    }

    /// Drops a pin taken by `pin`. Pages a writeback cleaned while pinned are made dirty again
    /// first (a CPU write fault): DMA may have written them since. Then each page whose last pin
    /// this was gets back the preferred location it had. Pieces whose memory is gone by now
    /// (unmapped, the mapping dropped) are skipped.
    pub(crate) fn unpin(&self, pieces: &[BlockSpan]) {
        let write = RequestKind::Fault {
            proc: Proc::Cpu,
            access: Access::Write,
        };
        for p in pieces {
            if self.still_shows_run(p) {
                // Fails only for pages that cannot be written any more (truncated, protected):
                // nothing of theirs is left to write back.
                let _ = self.request(&p.region, p.bi, p.run, write);
            }
        }
        for p in pieces {
            let first = p.bi * PAGES_PER_BLOCK;
            let mut restore: Vec<(usize, Option<Mem>)> = Vec::new();
            {
                let mut table = p.region.pins.lock();
                for page in p.run.pages() {
                    if let Some(e) = table.get_mut(&(first + page)) {
                        e.0 -= 1;
                        if e.0 == 0 {
                            restore.push((page, e.1));
                            table.remove(&(first + page));
                        }
                    }
                }
            }
            if !self.still_shows_run(p) {
                continue;
            }
            // Runs of consecutive pages that go back to the same preference.
            let mut i = 0;
            while i < restore.len() {
                let (start, loc) = restore[i];
                let mut n = 1;
                while i + n < restore.len() && restore[i + n] == (start + n, loc) {
                    n += 1;
                }
                if let Some(run) = PageRun::new(start, n, PAGES_PER_BLOCK) {
                    let _ = self.advise_run(&p.region, p.bi, run, loc);
                }
                i += n;
            }
        }
    }

    /// Whether the address map still shows piece `p` (its region, block and pages) at its
    /// address.
    fn still_shows_run(&self, p: &BlockSpan) -> bool {
        self.space
            .spans(p.va, p.va + p.run.len() * hetmem_proto::PAGE_SIZE)
            .is_ok_and(|now| {
                now.len() == 1
                    && std::sync::Arc::ptr_eq(&now[0].region, &p.region)
                    && now[0].bi == p.bi
                    && now[0].run == p.run
            })
    }

    /// `PreferredLocation(loc)` on one run of one block.
    pub(crate) fn advise_run(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        loc: Option<Mem>,
    ) -> Result<()> {
        let event = Event::Advise {
            pages: run,
            advice: Advice::PreferredLocation(loc),
        };
        self.drive(region, bi, event, |_, _| {})
            .map(drop)
            .map_err(|_| Error::Invalid("page run outside its block"))
    }

    /// Puts the pinned pages of block `bi` back on system memory after advice that covered the
    /// whole block (the placement policy's unpinning of a block).
    pub(crate) fn keep_pins_home(&self, region: &Region, bi: usize) {
        let pinned = region.pins.in_block(bi);
        for run in pinned.runs() {
            let _ = self.advise_run(region, bi, run, Some(Mem::System));
        }
    }

    /// `Busy` if any page of `pieces` is pinned.
    pub(crate) fn refuse_pinned(&self, pieces: &[BlockSpan], what: &'static str) -> Result<()> {
        if pieces.iter().any(|p| p.region.pins.any(p.bi, p.run)) {
            return Err(Error::Busy(what));
        }
        Ok(())
    }
}
