//! Density prefetch for device faults, as UVM's `perf_prefetch` does with its tree: the pages a
//! device faulted (or had prefetched) in a block are remembered, and when more than `threshold`
//! of an aligned region around a fault (64 KiB up to the whole 2 MiB block) is so, the rest of
//! the largest such region is brought to the device with the fault. A sparse pattern (one page in
//! eight) never crosses the threshold, so prefetch moves nothing it was not asked for; a dense
//! one stops faulting page by page.

use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_proto::{PageRun, PAGES_PER_BLOCK};

/// Faulted pages of one block (one bit per page, any device), for the density check.
#[derive(Debug, Default)]
pub struct DensityBlock {
    faulted: [AtomicU64; PAGES_PER_BLOCK / 64],
}

/// The smallest region checked: 16 pages (64 KiB), then doubling up to the block.
const SMALLEST: usize = 16;

/// The detector's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DensityConfig {
    /// The fraction of a region that must have faulted (UVM: 51%).
    pub threshold: f64,
}

impl Default for DensityConfig {
    fn default() -> Self {
        Self { threshold: 0.51 }
    }
}

impl DensityBlock {
    fn count(&self, start: usize, len: usize) -> usize {
        (start..start + len)
            .step_by(64)
            .map(|p| {
                let word = self.faulted[p / 64].load(Ordering::Acquire);
                let n = len.min(64);
                let shift = p % 64;
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << shift
                };
                (word & mask).count_ones() as usize
            })
            .sum()
    }

    /// Marks `run`: one atomic OR per 64-page word it touches (a whole block is 8).
    fn mark(&self, run: PageRun) {
        let (mut p, end) = (run.start(), run.end());
        while p < end {
            let w = p / 64;
            let to = end.min((w + 1) * 64);
            let n = to - p;
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (p % 64)
            };
            self.faulted[w].fetch_or(bits, Ordering::AcqRel);
            p = to;
        }
    }

    /// Forgets the block's faults (its data left the device).
    pub fn clear(&self) {
        for w in &self.faulted {
            w.store(0, Ordering::Release);
        }
    }
}

/// Records a device fault on `run` of a block of `pages` pages and returns the region to bring
/// with it, if a region around it is dense enough: the largest aligned region (16 to 512
/// pages) containing the fault's first page where more than `threshold` of the pages faulted.
pub fn on_fault(
    b: &DensityBlock,
    config: &DensityConfig,
    run: PageRun,
    pages: usize,
) -> Option<PageRun> {
    b.mark(run);
    let page = run.start();
    let mut best = None;
    let mut size = SMALLEST;
    while size <= PAGES_PER_BLOCK {
        let start = page / size * size;
        let len = size.min(pages.saturating_sub(start));
        if len == 0 {
            break;
        }
        let faulted = b.count(start, len);
        if faulted as f64 > config.threshold * len as f64 && faulted < len {
            best = PageRun::new(start, len, PAGES_PER_BLOCK);
        }
        size *= 2;
    }
    // What comes with the fault counts as the device's from now on, as UVM's tree counts
    // resident pages: a region next to it that the device goes on faulting in becomes dense
    // sooner, and the device stops faulting page by page.
    if let Some(r) = best {
        b.mark(r);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(p: usize) -> PageRun {
        PageRun::new(p, 1, PAGES_PER_BLOCK).unwrap()
    }

    #[test]
    fn one_page_in_eight_never_prefetches() {
        let b = DensityBlock::default();
        let c = DensityConfig::default();
        for p in (0..PAGES_PER_BLOCK).step_by(8) {
            assert_eq!(on_fault(&b, &c, one(p), PAGES_PER_BLOCK), None, "page {p}");
        }
    }

    #[test]
    fn a_dense_region_brings_the_rest_of_the_largest_dense_region() {
        let b = DensityBlock::default();
        let c = DensityConfig::default();
        // 8 of the first 16 pages: exactly half, not more: nothing yet.
        for p in 0..8 {
            assert_eq!(on_fault(&b, &c, one(p), PAGES_PER_BLOCK), None);
        }
        // The ninth: 9 of 16 > 51%: the 64 KiB region comes.
        let r = on_fault(&b, &c, one(8), PAGES_PER_BLOCK).unwrap();
        assert_eq!((r.start(), r.len()), (0, 16));
        // Faults over most of the block: the whole block comes, once more than half faulted.
        let mut last = None;
        for p in 16..300 {
            last = on_fault(&b, &c, one(p), PAGES_PER_BLOCK).or(last);
        }
        let r = last.unwrap();
        assert_eq!((r.start(), r.len()), (0, PAGES_PER_BLOCK));
    }

    #[test]
    fn marking_a_run_sets_exactly_its_pages() {
        for (start, len) in [(0, 512), (3, 1), (60, 10), (64, 64), (100, 300), (511, 1)] {
            let b = DensityBlock::default();
            b.mark(PageRun::new(start, len, PAGES_PER_BLOCK).unwrap());
            assert_eq!(b.count(0, PAGES_PER_BLOCK), len, "{start}+{len}");
            // The first page's word holds the run's first bits, and nothing before them.
            let w = b.faulted[start / 64].load(Ordering::Relaxed);
            assert_eq!(w.trailing_zeros() as usize, start % 64, "{start}+{len}");
        }
    }

    #[test]
    fn a_short_last_block_counts_its_own_pages() {
        let b = DensityBlock::default();
        let c = DensityConfig::default();
        // A block of 20 pages: the 32-page region is 20 pages long.
        let mut got = Vec::new();
        for p in 0..12 {
            got.extend(on_fault(&b, &c, one(p), 20));
        }
        assert!(got.iter().all(|r| r.end() <= 20), "{got:?}");
        assert_eq!(
            got.last().map(|r| (r.start(), r.len())),
            Some((0, 20)),
            "{got:?}"
        );
    }
}
