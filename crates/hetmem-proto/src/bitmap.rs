//! A fixed-size page bitmap: one bit per page of a block, operated on 64 pages at a time.
//!
//! `W` is the number of 64-bit words. Production blocks use [`crate::BLOCK_WORDS`] (512 pages);
//! the model checker uses `W = 1` so that its states stay small.

use crate::ids::PageRun;
use std::fmt;
use std::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Not, Sub, SubAssign};

/// One bit per page.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageMask<const W: usize>([u64; W]);

impl<const W: usize> Default for PageMask<W> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<const W: usize> PageMask<W> {
    /// Pages in a block of this width.
    pub const PAGES: usize = 64 * W;
    /// No page.
    pub const EMPTY: Self = Self([0; W]);
    /// Every page.
    pub const FULL: Self = Self([u64::MAX; W]);

    /// The pages of `run`.
    pub fn from_run(run: PageRun) -> Self {
        let mut m = Self::EMPTY;
        m.insert_range(run.start(), run.end());
        m
    }

    /// A single page.
    pub fn single(page: usize) -> Self {
        let mut m = Self::EMPTY;
        m.insert(page);
        m
    }

    /// Sets the pages `start..end`.
    pub fn insert_range(&mut self, start: usize, end: usize) {
        let end = end.min(Self::PAGES);
        let mut i = start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let bits = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.0[w] |= bits;
            i = w * 64 + hi;
        }
    }

    /// Whether `page` is set.
    pub fn contains(&self, page: usize) -> bool {
        page < Self::PAGES && self.0[page / 64] & (1 << (page % 64)) != 0
    }

    /// Sets `page`.
    pub fn insert(&mut self, page: usize) {
        self.0[page / 64] |= 1 << (page % 64);
    }

    /// Clears `page`.
    pub fn remove(&mut self, page: usize) {
        self.0[page / 64] &= !(1 << (page % 64));
    }

    /// Sets or clears `page`.
    pub fn set(&mut self, page: usize, on: bool) {
        if on {
            self.insert(page)
        } else {
            self.remove(page)
        }
    }

    /// No page set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Number of pages set.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether the two masks share a page.
    pub fn intersects(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    /// Whether every page of `self` is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    /// The first `n` pages set, in page order.
    pub fn first_n(&self, mut n: u32) -> Self {
        let mut out = Self::EMPTY;
        for (o, &w) in out.0.iter_mut().zip(self.0.iter()) {
            let mut w = w;
            while w != 0 && n > 0 {
                let bit = w & w.wrapping_neg();
                *o |= bit;
                w &= w - 1;
                n -= 1;
            }
        }
        out
    }

    /// The pages set, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    wi * 64 + b
                })
            })
        })
    }

    /// Maximal runs of set pages, in order. Word-at-a-time, so a full 2 MiB block is one step
    /// per word.
    pub fn runs(&self) -> Runs<'_, W> {
        Runs { mask: self, pos: 0 }
    }
}

/// Iterator over the runs of a [`PageMask`].
#[derive(Debug)]
pub struct Runs<'a, const W: usize> {
    mask: &'a PageMask<W>,
    pos: usize,
}

impl<const W: usize> Runs<'_, W> {
    /// First position `>= from` whose bit equals `want`, or `PAGES`.
    fn seek(&self, from: usize, want: bool) -> usize {
        let mut i = from;
        while i < PageMask::<W>::PAGES {
            let w = i / 64;
            let word = if want {
                self.mask.0[w]
            } else {
                !self.mask.0[w]
            };
            let rest = word >> (i % 64);
            if rest != 0 {
                return i + rest.trailing_zeros() as usize;
            }
            i = (w + 1) * 64;
        }
        PageMask::<W>::PAGES
    }
}

impl<const W: usize> Iterator for Runs<'_, W> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        let start = self.seek(self.pos, true);
        if start >= PageMask::<W>::PAGES {
            self.pos = start;
            return None;
        }
        let end = self.seek(start, false);
        self.pos = end;
        Some(PageRun::from_raw(start, end - start))
    }
}

impl<const W: usize> fmt::Debug for PageMask<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

impl<const W: usize> BitAnd for PageMask<W> {
    type Output = Self;
    #[inline]
    fn bitand(mut self, rhs: Self) -> Self {
        self &= rhs;
        self
    }
}

impl<const W: usize> BitAndAssign for PageMask<W> {
    #[inline]
    fn bitand_assign(&mut self, rhs: Self) {
        for (a, b) in self.0.iter_mut().zip(rhs.0.iter()) {
            *a &= *b;
        }
    }
}

impl<const W: usize> BitOr for PageMask<W> {
    type Output = Self;
    #[inline]
    fn bitor(mut self, rhs: Self) -> Self {
        self |= rhs;
        self
    }
}

impl<const W: usize> BitOrAssign for PageMask<W> {
    #[inline]
    fn bitor_assign(&mut self, rhs: Self) {
        for (a, b) in self.0.iter_mut().zip(rhs.0.iter()) {
            *a |= *b;
        }
    }
}

impl<const W: usize> Sub for PageMask<W> {
    type Output = Self;
    /// Set difference.
    #[inline]
    fn sub(mut self, rhs: Self) -> Self {
        self -= rhs;
        self
    }
}

impl<const W: usize> SubAssign for PageMask<W> {
    #[inline]
    fn sub_assign(&mut self, rhs: Self) {
        for (a, b) in self.0.iter_mut().zip(rhs.0.iter()) {
            *a &= !*b;
        }
    }
}

impl<const W: usize> Not for PageMask<W> {
    type Output = Self;
    #[inline]
    fn not(mut self) -> Self {
        for a in self.0.iter_mut() {
            *a = !*a;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cross_words_and_stop_at_gaps() {
        let mut m = PageMask::<2>::EMPTY;
        m.insert_range(3, 70);
        m.insert(100);
        m.insert(127);
        let runs: Vec<_> = m.runs().map(|r| (r.start(), r.end())).collect();
        assert_eq!(runs, vec![(3, 70), (100, 101), (127, 128)]);
        assert_eq!(m.count(), 67 + 2);
    }

    #[test]
    fn full_block_is_one_run() {
        let runs: Vec<_> = PageMask::<8>::FULL.runs().collect();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), 512);
    }

    #[test]
    fn first_n_takes_lowest_pages() {
        let mut m = PageMask::<2>::EMPTY;
        for p in [5, 9, 64, 80] {
            m.insert(p);
        }
        assert_eq!(m.first_n(3).iter().collect::<Vec<_>>(), vec![5, 9, 64]);
        assert_eq!(m.first_n(0), PageMask::EMPTY);
    }

    #[test]
    fn set_algebra() {
        let a = PageMask::<1>::from_run(PageRun::new(0, 8, 64).unwrap());
        let b = PageMask::<1>::from_run(PageRun::new(4, 8, 64).unwrap());
        assert_eq!((a & b).iter().collect::<Vec<_>>(), vec![4, 5, 6, 7]);
        assert_eq!((a - b).count(), 4);
        assert!(!(a - b).intersects(&b));
        assert!((a & b).is_subset(&a));
        assert_eq!((!a).count(), 56);
    }
}
