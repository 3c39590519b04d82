//! Work for the fault-service threads beside what the userfaultfd says: read-ahead, background
//! migrations (`Hetmem::prefetch`), file ranges to invalidate, and the wake-up that tells them
//! of it (or of shutdown).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use hetmem_proto::{Mem, PageRun};

use crate::error::{Error, Result};
use crate::mm::region::Region;
use crate::sys::mem;

/// Work read from the userfaultfd, already applied to the address map.
#[derive(Debug)]
pub(crate) enum ServiceWork {
    /// Read-ahead: bring block `bi` home and map it for the CPU.
    Prefetch { region: Arc<Region>, bi: usize },
    /// One block's part of a background migration (`Hetmem::prefetch`).
    Migrate {
        region: Arc<Region>,
        bi: usize,
        run: PageRun,
        dst: Mem,
        done: Arc<Background>,
    },
    Fault {
        addr: usize,
        write: bool,
        /// The faulting thread (0 if the kernel does not say).
        tid: u32,
    },
    /// File bytes no view shows any more: invalidate them.
    Unmapped {
        region: Arc<Region>,
        off: usize,
        len: usize,
    },
}

/// The queue the service threads take work from, and their wake-up.
#[derive(Debug)]
pub(crate) struct ServiceQueue {
    queue: Mutex<Vec<ServiceWork>>,
    /// Wakes service threads: queued work, a poison deadline, or shutdown.
    wakeup: mem::EventFd,
    shutdown: AtomicBool,
    /// Read-aheads that may run at once (`read_ahead_limit`), and how many are running.
    read_ahead_limit: usize,
    read_ahead_running: AtomicUsize,
}

/// How many read-aheads may run at once: one CPU fewer than the process may use, at least one.
/// A read-ahead serves an application thread that is streaming through its data, so a CPU is
/// left for that thread: on 2 CPUs, with two read-aheads at once beside the reader, row b of
/// `hetmem bench` was 0.47 of memcpy against 0.57 with one (medians of alternating runs), each
/// copy taking the CPU the reader needed to consume what the other had brought.
pub(crate) fn read_ahead_limit() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

impl ServiceQueue {
    pub(crate) fn new() -> std::io::Result<Self> {
        Self::with_read_ahead_limit(read_ahead_limit())
    }

    /// A queue that lets `limit` read-aheads run at once.
    fn with_read_ahead_limit(limit: usize) -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Vec::new()),
            wakeup: mem::EventFd::new()?,
            shutdown: AtomicBool::new(false),
            read_ahead_limit: limit.max(1),
            read_ahead_running: AtomicUsize::new(0),
        })
    }

    /// Queues `work` and wakes a service thread.
    pub(crate) fn push(&self, work: impl IntoIterator<Item = ServiceWork>) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(work);
        self.wake();
    }

    /// Wakes a service thread (it re-reads the queue and its deadlines).
    pub(crate) fn wake(&self) {
        self.wakeup.signal();
    }

    /// Adds one round's queued work to `work`: faults and invalidations all, then at most one
    /// read-ahead or background migration, and only when there is nothing else, so the other
    /// threads can share them and a fault never waits behind a queue of them. A read-ahead is
    /// taken only while fewer than `read_ahead_limit` run; the thread that takes one calls
    /// `read_ahead_done` when it has finished.
    pub(crate) fn take_round(&self, work: &mut Vec<ServiceWork>) {
        let mut prefetch = None;
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut rest = Vec::new();
        for w in queue.drain(..) {
            match w {
                ServiceWork::Prefetch { .. } if prefetch.is_none() && work.is_empty() => {
                    if self.claim_read_ahead() {
                        prefetch = Some(w)
                    } else {
                        rest.push(w)
                    }
                }
                ServiceWork::Migrate { .. } if prefetch.is_none() && work.is_empty() => {
                    prefetch = Some(w)
                }
                ServiceWork::Prefetch { .. } | ServiceWork::Migrate { .. } => rest.push(w),
                _ => work.push(w),
            }
        }
        *queue = rest;
        // Wake another thread for what is left, unless all that is left are read-aheads that
        // must wait for a running one: `read_ahead_done` wakes a thread for those.
        let more = queue
            .iter()
            .any(|w| !matches!(w, ServiceWork::Prefetch { .. }))
            || (!queue.is_empty() && self.read_ahead_room());
        drop(queue);
        if more {
            self.wake();
        }
        work.extend(prefetch);
    }

    fn read_ahead_room(&self) -> bool {
        self.read_ahead_running.load(Ordering::Acquire) < self.read_ahead_limit
    }

    /// Takes a read-ahead slot if one is free (under the queue's lock, so two threads cannot
    /// both take the last one).
    fn claim_read_ahead(&self) -> bool {
        if !self.read_ahead_room() {
            return false;
        }
        self.read_ahead_running.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// A read-ahead taken by `take_round` has finished: its slot is free, and a thread is woken
    /// if read-aheads wait for it.
    pub(crate) fn read_ahead_done(&self) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.read_ahead_running.fetch_sub(1, Ordering::AcqRel);
        let waiting = !queue.is_empty();
        drop(queue);
        if waiting {
            self.wake();
        }
    }

    /// The descriptor a sleeping service thread polls beside the userfaultfd.
    pub(crate) fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.wakeup.as_fd()
    }

    pub(crate) fn drain_wakeups(&self) {
        self.wakeup.drain();
    }

    /// Tells every service thread to stop.
    pub(crate) fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Once the service threads are gone: what they left in the queue. A background
    /// migration's waiter is told it did not run, instead of waiting for ever.
    pub(crate) fn abandon(&self) {
        let left = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for w in left {
            if let ServiceWork::Migrate { done, .. } = w {
                done.finish(Err(Error::Invalid(
                    "the context was dropped before the prefetch ran",
                )));
            }
        }
    }
}

/// A background migration (`Hetmem::prefetch`): its blocks' parts still to run, and the first
/// error.
#[derive(Debug)]
pub(crate) struct Background {
    state: Mutex<(usize, Option<Error>)>,
    cv: Condvar,
}

impl Background {
    /// One of `parts` parts.
    pub fn new(parts: usize) -> Self {
        Self {
            state: Mutex::new((parts, None)),
            cv: Condvar::new(),
        }
    }

    /// One part finished with `r`.
    pub fn finish(&self, r: Result<()>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = r {
            st.1.get_or_insert(e);
        }
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.cv.notify_all();
        }
    }

    pub fn is_done(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 == 0
    }

    /// Waits for every part; the first error, if any.
    pub fn wait(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match st.1.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_proto::BLOCK_BYTES;
    use std::os::fd::AsFd;

    fn region() -> Arc<Region> {
        let len = 4 * BLOCK_BYTES;
        let slots = Region::reserve_blocks(len, 0).unwrap();
        let memfd = mem::memfd("work-test", len).unwrap();
        let backing = mem::Mapping::shared(memfd.as_fd(), 0, len).unwrap();
        Arc::new(Region::new(1, memfd, backing, len, slots, 0, None))
    }

    fn read_aheads(work: &[ServiceWork]) -> Vec<usize> {
        work.iter()
            .filter_map(|w| match w {
                ServiceWork::Prefetch { bi, .. } => Some(*bi),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn read_aheads_beyond_the_limit_wait_for_a_running_one() {
        let q = ServiceQueue::with_read_ahead_limit(1).unwrap();
        let r = region();
        q.push((0..3).map(|bi| ServiceWork::Prefetch {
            region: r.clone(),
            bi,
        }));
        // One thread takes the first read-ahead; the next round, on another thread, finds
        // the only slot taken and leaves the rest queued.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        q.take_round(&mut a);
        q.take_round(&mut b);
        assert_eq!(read_aheads(&a), [0]);
        assert_eq!(read_aheads(&b), Vec::<usize>::new());
        // A fault is never held back by the limit.
        q.push([ServiceWork::Fault {
            addr: 0,
            write: false,
            tid: 0,
        }]);
        q.take_round(&mut b);
        assert!(matches!(b[..], [ServiceWork::Fault { .. }]));
        // Once the running one is done, the next is taken.
        q.read_ahead_done();
        b.clear();
        q.take_round(&mut b);
        assert_eq!(read_aheads(&b), [1]);
    }

    #[test]
    fn as_many_run_at_once_as_the_limit() {
        let q = ServiceQueue::with_read_ahead_limit(2).unwrap();
        let r = region();
        q.push((0..3).map(|bi| ServiceWork::Prefetch {
            region: r.clone(),
            bi,
        }));
        let mut taken = Vec::new();
        for _ in 0..3 {
            let mut w = Vec::new();
            q.take_round(&mut w);
            taken.extend(read_aheads(&w));
        }
        assert_eq!(taken, [0, 1], "two at once, the third waits");
    }
}
