//! Work for the fault-service threads beside what the userfaultfd says: read-ahead, background
//! migrations (`Hetmem::prefetch`), file ranges to invalidate, and the wake-up that tells them
//! of it (or of shutdown).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl ServiceQueue {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Vec::new()),
            wakeup: mem::EventFd::new()?,
            shutdown: AtomicBool::new(false),
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
    /// read-ahead, and only when there is nothing else, so the other threads can share them and
    /// a fault never waits behind a queue of them.
    pub(crate) fn take_round(&self, work: &mut Vec<ServiceWork>) {
        let mut prefetch = None;
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut rest = Vec::new();
        for w in queue.drain(..) {
            match w {
                ServiceWork::Prefetch { .. } | ServiceWork::Migrate { .. }
                    if prefetch.is_none() && work.is_empty() =>
                {
                    prefetch = Some(w)
                }
                ServiceWork::Prefetch { .. } | ServiceWork::Migrate { .. } => rest.push(w),
                _ => work.push(w),
            }
        }
        *queue = rest;
        if !queue.is_empty() {
            drop(queue);
            self.wake();
        }
        work.extend(prefetch);
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
