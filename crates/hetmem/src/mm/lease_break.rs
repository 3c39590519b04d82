//! What bounds a lease break of a file mapping (`docs/file-contract.md` §6, "Bounded breaks"):
//! its gate, and the pages a break that ran out of time left conflicted.
//!
//! The break gate: from a lease break's signal to its release, new faults on
//! the mapping wait, so that what the opener finds is the mapping's data as of the signal (every
//! write made before its page was write-protected for the break's writeback), and no page is
//! cached again behind the break's discard without a lease.
//!
//! A CPU fault is not waited for on a fault-service thread, which serves every mapping: its
//! message is parked here, its thread left asleep in the kernel, and the fault is handed back
//! to the service when the gate opens. A device fault waits in the calling thread, for the
//! gate to open or its deadline to pass.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use hetmem_proto::{PageMask, PageRun, BLOCK_WORDS, PAGES_PER_BLOCK};

type Mask = PageMask<BLOCK_WORDS>;

/// Which copy of conflicted pages wins (`FileMapping::resolve_conflicts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The mapping's: its pages stay dirty and the next flush writes them over the file.
    Mine,
    /// The file's: the mapping's copies are dropped unwritten, and the next access reads the
    /// file.
    Theirs,
}

/// A CPU fault held at a closed gate, as the fault service read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ParkedFault {
    pub addr: usize,
    pub write: bool,
    pub tid: u32,
}

#[derive(Debug, Default)]
struct State {
    /// A break is in progress: new faults wait.
    closed: bool,
    /// The break's deadline (`lease-break-time`, less a margin): past it the kernel lets the
    /// opener in whatever the break has done, so writebacks stop (their pages are conflicted)
    /// and waiting device faults go on.
    deadline: Option<Instant>,
    parked: Vec<ParkedFault>,
}

#[derive(Debug, Default)]
pub(crate) struct BreakGate {
    state: Mutex<State>,
    opened: Condvar,
}

impl BreakGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate for a break that must be over by `deadline`.
    pub(crate) fn close(&self, deadline: Instant) {
        let mut s = self.lock();
        s.closed = true;
        s.deadline = Some(deadline);
    }

    /// Opens the gate: device faults go on, and the CPU faults parked meanwhile are returned,
    /// for the fault service to serve.
    pub(crate) fn open(&self) -> Vec<ParkedFault> {
        let mut s = self.lock();
        s.closed = false;
        s.deadline = None;
        let parked = std::mem::take(&mut s.parked);
        drop(s);
        self.opened.notify_all();
        parked
    }

    /// Parks CPU fault `f` if the gate is closed and its deadline not past (true: its thread
    /// stays asleep until `open`, or the deadline, hands it back); false otherwise, and the
    /// fault is to be served now. Under the gate's lock, so a fault parked is one `open` or
    /// `take_expired` returns.
    pub(crate) fn park(&self, f: ParkedFault) -> bool {
        let mut s = self.lock();
        let holds = s.closed && s.deadline.is_none_or(|d| Instant::now() < d);
        if holds {
            s.parked.push(f);
        }
        holds
    }

    /// The deadline of a closed gate with faults parked at it.
    pub(crate) fn parked_until(&self) -> Option<Instant> {
        let s = self.lock();
        (s.closed && !s.parked.is_empty())
            .then_some(s.deadline)
            .flatten()
    }

    /// The faults parked at a closed gate whose deadline has passed: a break that outlives it
    /// holds no CPU fault any longer than a device fault (it may be waiting for a device
    /// kernel whose closure waits for one of them).
    pub(crate) fn take_expired(&self) -> Vec<ParkedFault> {
        let mut s = self.lock();
        if s.closed && s.deadline.is_some_and(|d| Instant::now() >= d) {
            std::mem::take(&mut s.parked)
        } else {
            Vec::new()
        }
    }

    /// Waits until the gate is open, or its break's deadline has passed. True if it waited.
    pub(crate) fn wait_open(&self) -> bool {
        let mut s = self.lock();
        let mut waited = false;
        while s.closed {
            let Some(deadline) = s.deadline else {
                break;
            };
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            waited = true;
            s = self
                .opened
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        waited
    }

    /// A break is in progress and its deadline has passed: writing back now could overwrite
    /// what the opener, let in by the kernel, writes.
    pub(crate) fn timed_out(&self) -> bool {
        let s = self.lock();
        s.closed && s.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// A break is in progress.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Pages of a mapping whose writeback a timed-out break refused: the kernel let the opener in
/// before they were written, so writing them now could overwrite what it wrote. They stay
/// dirty and cached, no writeback of any kind writes them (flush, eviction to the file, a
/// drop, another break), and every `flush` and `sync` reports them, until the application
/// says which copy wins (`FileMapping::resolve_conflicts`).
#[derive(Debug, Default)]
pub(crate) struct Conflicts(Mutex<BTreeMap<usize, Mask>>);

impl Conflicts {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<usize, Mask>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `run` of block `bi` conflicted; how many of its pages were not already.
    pub(crate) fn add(&self, bi: usize, run: PageRun) -> usize {
        let mut set = self.lock();
        let m = set.entry(bi).or_insert(Mask::EMPTY);
        let new = Mask::from_run(run) - *m;
        *m |= new;
        new.count() as usize
    }

    /// Whether any page of `run` of block `bi` is conflicted.
    pub(crate) fn any_in(&self, bi: usize, run: PageRun) -> bool {
        self.lock()
            .get(&bi)
            .is_some_and(|m| m.intersects(&Mask::from_run(run)))
    }

    /// How many pages are conflicted.
    pub(crate) fn count(&self) -> usize {
        self.lock().values().map(|m| m.count() as usize).sum()
    }

    /// Conflicted pages as runs of the mapping's pages: (first page, pages), in order.
    pub(crate) fn runs(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (&bi, m) in self.lock().iter() {
            for r in m.runs() {
                let first = bi * PAGES_PER_BLOCK + r.start();
                match out.last_mut() {
                    Some((f, n)) if *f + *n == first => *n += r.len(),
                    _ => out.push((first, r.len())),
                }
            }
        }
        out
    }

    /// The conflicted pages of `[first, first + n)`: (block, pages).
    pub(crate) fn pages(&self, first: usize, n: usize) -> Vec<(usize, Mask)> {
        self.select(first, n, false)
    }

    /// Takes the conflicted pages of `[first, first + n)` out of the set: (block, pages).
    pub(crate) fn take(&self, first: usize, n: usize) -> Vec<(usize, Mask)> {
        self.select(first, n, true)
    }

    fn select(&self, first: usize, n: usize, remove: bool) -> Vec<(usize, Mask)> {
        let end = first.saturating_add(n);
        let mut set = self.lock();
        let mut out = Vec::new();
        for bi in first / PAGES_PER_BLOCK..end.div_ceil(PAGES_PER_BLOCK) {
            let Some(m) = set.get_mut(&bi) else {
                continue;
            };
            let lo = first.max(bi * PAGES_PER_BLOCK) - bi * PAGES_PER_BLOCK;
            let hi = end.min((bi + 1) * PAGES_PER_BLOCK) - bi * PAGES_PER_BLOCK;
            let Some(range) = PageRun::new(lo, hi - lo, PAGES_PER_BLOCK) else {
                continue;
            };
            let taken = *m & Mask::from_run(range);
            if remove {
                *m -= taken;
                if m.is_empty() {
                    set.remove(&bi);
                }
            }
            if !taken.is_empty() {
                out.push((bi, taken));
            }
        }
        out
    }
}

/// The part of `lease-break-time` a break keeps for itself: the kernel's timer starts at the
/// opener's call, before the signal reaches the lease thread, so the break's deadline comes a
/// tenth (at least 100 ms) earlier than the kernel's.
pub(crate) fn break_deadline(signalled: Instant, break_time: std::time::Duration) -> Instant {
    let margin = (break_time / 10).max(std::time::Duration::from_millis(100));
    signalled + break_time.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parked_faults_come_back_at_open_and_only_while_closed() {
        let g = BreakGate::default();
        let f = ParkedFault {
            addr: 0x1000,
            write: true,
            tid: 7,
        };
        assert!(!g.park(f), "an open gate parks nothing");
        g.close(Instant::now() + Duration::from_secs(60));
        assert!(g.park(f));
        assert!(g.is_closed() && !g.timed_out());
        assert_eq!(g.open(), vec![f]);
        assert!(g.open().is_empty(), "handed back once");
        assert!(!g.is_closed());
    }

    #[test]
    fn a_device_fault_waits_until_the_gate_opens() {
        let g = std::sync::Arc::new(BreakGate::default());
        g.close(Instant::now() + Duration::from_secs(60));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let g = g.clone();
            std::thread::spawn(move || {
                let waited = g.wait_open();
                tx.send(g.is_closed()).unwrap();
                waited
            })
        };
        // The waiter cannot get past a closed gate: whenever it returns, the gate is open.
        g.open();
        assert!(!rx.recv().unwrap());
        waiter.join().unwrap();
    }

    #[test]
    fn conflicts_are_kept_by_page_and_taken_by_range() {
        let c = Conflicts::default();
        let run = |s, n| PageRun::new(s, n, PAGES_PER_BLOCK).unwrap();
        c.add(0, run(510, 2));
        c.add(1, run(0, 3));
        c.add(3, run(7, 1));
        assert_eq!(c.count(), 6);
        assert_eq!(c.runs(), vec![(510, 5), (3 * 512 + 7, 1)]);
        assert!(c.any_in(1, run(2, 10)) && !c.any_in(1, run(3, 10)));
        let taken = c.take(511, 2);
        assert_eq!(taken.len(), 2);
        assert_eq!(c.runs(), vec![(510, 1), (513, 2), (3 * 512 + 7, 1)]);
        assert_eq!(c.take(0, 4 * 512).len(), 3);
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn past_its_deadline_a_closed_gate_lets_device_faults_through() {
        let g = BreakGate::default();
        g.close(Instant::now());
        assert!(g.timed_out());
        assert!(!g.wait_open(), "returns at once past the deadline");
        assert!(g.is_closed());
    }
}
