//! Carries out placement on CPU faults: the read-back window, map-around, sequential read-ahead
//! and its prefetch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem_proto::{
    Access, Mem, PageRun, Proc, RequestKind, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE,
};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;
use crate::mm::work::ServiceWork;

impl Runtime {
    /// Placement for a CPU fault on piece `p` (one page): the read-back window, read-ahead and
    /// map-around, each clipped to the pages the protocol lets the access touch. Returns the run
    /// to fault: the faulting page's part of the window, or the page alone.
    pub(crate) fn place_cpu_fault(&self, p: &BlockSpan, access: Access) -> PageRun {
        let page = p.run.start();
        if self.readback_window <= 1 {
            return p.run;
        }
        let w = self.readback_window;
        let start = page / w * w;
        let n = w.min(self.pages_before_eof(&p.region, p.bi).saturating_sub(start));
        let Some(window) = PageRun::new(start, n, PAGES_PER_BLOCK) else {
            return p.run;
        };
        // Read-back policy: data that lives only in private device memory comes back a window
        // at a time, not 4 KiB per fault. This is placement, decided here and carried out by
        // the protocol as an ordinary migration.
        let slot = &p.region.blocks[p.bi];
        let on_private = self.topology.devices().any(|d| {
            !self.topology.is_coherent(d) && slot.held[d.index()].load(Ordering::Relaxed) > 0
        });
        if on_private || slot.prefetched.load(Ordering::Relaxed) {
            let (only_private, runs) = {
                let block = self.lock_block(slot);
                let v = block.page(page);
                let only_private = !v.is_valid_in(Mem::System)
                    && self
                        .topology
                        .devices()
                        .any(|d| !self.topology.is_coherent(d) && v.is_valid_in(Mem::Device(d)));
                let ok = block.state().accessible(Access::Read);
                let runs: Vec<PageRun> = (hetmem_proto::PageMask::from_run(window) & ok)
                    .runs()
                    .collect();
                (only_private, runs)
            };
            let marker = slot.prefetched.swap(false, Ordering::AcqRel);
            if (only_private || marker) && self.readahead > 0 {
                self.read_ahead(&p.region, p.bi, marker);
            }
            if only_private {
                let mut own = p.run;
                for run in runs {
                    let _ = self.request(
                        &p.region,
                        p.bi,
                        run,
                        RequestKind::Migrate { dst: Mem::System },
                    );
                    if run.pages().contains(&page) {
                        // Map the page's part of the window too, or every page would still
                        // fault once.
                        own = run;
                    } else {
                        self.map_for_read(&p.region, p.bi, run);
                    }
                }
                return own;
            }
        }
        self.map_around(p, window, access)
    }

    /// A read fault on `run` on behalf of a neighbour's fault (placement): failures only mean
    /// the neighbours stay unmapped, and fault on their own.
    pub(crate) fn map_for_read(&self, region: &Region, bi: usize, run: PageRun) {
        let read = RequestKind::Fault {
            proc: Proc::Cpu,
            access: Access::Read,
        };
        let _ = self.request_with(region, bi, run, read, |_, _| {});
    }

    /// The pieces (one per CPU view showing them) of block `bi`'s pages `run`.
    pub(crate) fn run_pieces(
        &self,
        region: &Arc<Region>,
        bi: usize,
        run: PageRun,
    ) -> Vec<BlockSpan> {
        let mut ranges = Vec::new();
        let first = bi * BLOCK_BYTES + run.start() * PAGE_SIZE;
        region.cpu_ranges_at(first, run.len() * PAGE_SIZE, &mut ranges);
        ranges
            .into_iter()
            .filter_map(|(va, off, len)| {
                let start = (off - bi * BLOCK_BYTES) / PAGE_SIZE;
                Some(BlockSpan {
                    region: region.clone(),
                    bi,
                    run: PageRun::new(start, len / PAGE_SIZE, PAGES_PER_BLOCK)?,
                    va,
                })
            })
            .collect()
    }

    /// Map-around for resident data: when the faulting page already has data the CPU can map
    /// without a copy (system memory, after an eviction or a migration back, or a coherent
    /// device), map the window's other such pages too, with a read fault, instead of taking
    /// one fault per 4 KiB page. A read fault only downgrades device write mappings (a device
    /// that writes again faults once per block). Returns the run to fault for the faulting
    /// page itself.
    pub(crate) fn map_around(&self, p: &BlockSpan, window: PageRun, access: Access) -> PageRun {
        let slot = &p.region.blocks[p.bi];
        let page = p.run.start();
        // First touches are fault-around's business; a hole has no data yet.
        if !slot
            .populated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(page)
        {
            return p.run;
        }
        let runs: Vec<PageRun> = {
            let block = self.lock_block(slot);
            let st = block.state();
            let mut reachable = st.valid_in(Mem::System);
            for d in self.topology.devices() {
                if self.topology.is_coherent(d) {
                    reachable |= st.valid_in(Mem::Device(d));
                }
            }
            let m = (hetmem_proto::PageMask::from_run(window)
                & reachable
                & st.accessible(Access::Read))
                - st.mapped_by(Proc::Cpu);
            m.runs().collect()
        };
        let mut own = p.run;
        for run in runs {
            if run.pages().contains(&page) && access == Access::Read {
                own = run;
                continue;
            }
            self.map_for_read(&p.region, p.bi, run);
        }
        own
    }

    /// A CPU read-back hit block `bi`. If the stream is sequential (the previous read-back was
    /// block `bi - 1`, or `bi` was itself read ahead), queue the next blocks.
    pub(crate) fn read_ahead(&self, region: &Arc<Region>, bi: usize, marker: bool) {
        let prev = region.ra_last.swap(bi, Ordering::AcqRel);
        // A stream takes two read-backs in consecutive blocks (or a read-ahead marker): one
        // read-back alone says nothing about the next block.
        if !marker && (prev == usize::MAX || prev + 1 != bi) {
            return;
        }
        let last = (bi + self.readahead).min(region.blocks.len() - 1);
        // Continue where the stream's read-ahead stopped, unless that mark belongs to an older
        // stream.
        let next = region.ra_next.load(Ordering::Acquire);
        let from = if next > bi && next <= bi + self.readahead + 1 {
            next
        } else {
            bi + 1
        };
        if from > last {
            return;
        }
        region.ra_next.store(last + 1, Ordering::Release);
        self.work.push((from..=last).map(|j| ServiceWork::Prefetch {
            region: region.clone(),
            bi: j,
        }));
    }

    /// Read-ahead of one block: migrate what lives only in private device memory home and map
    /// it for the CPU, all but the first page, whose fault continues the stream.
    pub(crate) fn prefetch(&self, region: &Region, bi: usize) {
        let pages = self.pages_before_eof(region, bi);
        if pages == 0 {
            return;
        }
        let Some(all) = PageRun::new(0, pages, PAGES_PER_BLOCK) else {
            return;
        };
        // Only what lives in private device memory alone, and only pages the CPU may read.
        let (away, runs) = {
            let block = self.lock_block(&region.blocks[bi]);
            let st = block.state();
            let mut on_private = hetmem_proto::PageMask::EMPTY;
            for d in self.topology.devices() {
                if !self.topology.is_coherent(d) {
                    on_private |= st.valid_in(Mem::Device(d));
                }
            }
            let ok = hetmem_proto::PageMask::from_run(all) & st.accessible(Access::Read);
            let runs: Vec<PageRun> = ok.runs().collect();
            (!(on_private - st.valid_in(Mem::System)).is_empty(), runs)
        };
        if !away {
            return;
        }
        for &run in &runs {
            let home = RequestKind::Migrate { dst: Mem::System };
            if self.request(region, bi, run, home).is_err() {
                return;
            }
            self.stats.pages_prefetched.add(run.len() as u64);
        }
        for run in runs {
            // Page 0 stays unmapped: its fault continues the stream.
            let rest = match run.start() {
                0 => PageRun::new(1, run.len() - 1, PAGES_PER_BLOCK),
                _ => Some(run),
            };
            if let Some(rest) = rest {
                self.map_for_read(region, bi, rest);
            }
        }
        region.blocks[bi].prefetched.store(true, Ordering::Release);
    }
}
