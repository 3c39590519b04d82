//! Work for the fault-service threads beside what the userfaultfd says: read-ahead, background
//! migrations (`Hetmem::prefetch`), file ranges to invalidate, and the wake-up that tells them
//! of it (or of shutdown).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// Which service threads wait on the userfaultfd (`docs/runtime.md` §3, "Spares").
///
/// Thread 0, the primary, always does. The others, the spares, add the userfaultfd to their set
/// only while they are wanted: a fault woken into another CPU's thread costs that wake-up (an
/// interrupt to the other CPU, tens of microseconds on a busy virtual machine), and with every
/// thread waiting, the kernel hands a fault to a spare whenever the primary has not quite gone
/// back to sleep yet, for instance because the thread it just woke took its CPU. So a lone
/// stream of faults stays on one thread, as with a plain userfaultfd handler.
///
/// Spares arm (add the userfaultfd) when a read brings two faults, or faults of two threads come
/// within `TOGETHER` of each other (`hold`; the message says the faulting thread), and, while
/// watching, when faults are pending and no armed thread is waiting: the primary is held up in
/// a long fault, or stuck behind one that needs another thread (a device kernel's closure that
/// faults), so no fault waits on a busy primary for longer than a watch period. They disarm once
/// `HOLD` has passed without such faults while some armed thread is waiting. A spare watches
/// (checks every `WATCH`) from the primary's first round after a quiet spell until `QUIET` has
/// passed with no round while some armed thread waits.
#[derive(Debug)]
pub(crate) struct Spares {
    /// Wakes the spares: arm now (`hold`), or start watching.
    fd: mem::EventFd,
    base: std::time::Instant,
    /// Armed threads asleep in their wait right now.
    pub(crate) idle_armed: AtomicUsize,
    /// Spares not armed.
    pub(crate) disarmed: AtomicUsize,
    /// Spares watching.
    pub(crate) watching: AtomicUsize,
    /// Until when (ns since `base`) the spares stay armed.
    until: AtomicU64,
    /// Rounds that read the userfaultfd: the watchers' sign of progress.
    pub(crate) rounds: AtomicU64,
}

impl Spares {
    /// How often a watching spare looks.
    pub(crate) const WATCH: std::time::Duration = std::time::Duration::from_millis(10);
    pub(crate) const WATCH_NS: u64 = 10_000_000;
    /// How long spares stay armed after faults of two threads came together.
    pub(crate) const HOLD: u64 = 20_000_000;
    /// Faults of two threads this close (ns) came together.
    pub(crate) const TOGETHER: u64 = 1_000_000;
    /// How long without progress before a spare stops watching.
    pub(crate) const QUIET: u64 = 200_000_000;

    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: mem::EventFd::new()?,
            base: std::time::Instant::now(),
            idle_armed: Default::default(),
            disarmed: Default::default(),
            watching: Default::default(),
            until: Default::default(),
            rounds: Default::default(),
        })
    }

    /// Nanoseconds since the runtime started.
    pub(crate) fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn drain(&self) {
        self.fd.drain();
    }

    /// Wakes the spares if some are disarmed.
    pub(crate) fn call(&self) {
        if self.disarmed.load(Ordering::SeqCst) > 0 {
            self.fd.signal();
        }
    }

    /// Load was seen at `now`: spares stay armed for `HOLD`, and disarmed ones are called.
    pub(crate) fn hold(&self, now: u64) {
        self.until.fetch_max(now + Self::HOLD, Ordering::Relaxed);
        self.call();
    }

    /// Whether spares are wanted armed at `now`.
    pub(crate) fn wanted(&self, now: u64) -> bool {
        now < self.until.load(Ordering::Relaxed)
    }
}
