//! The fault-service threads: read userfaultfd messages, apply unmap/remap to the address space at
//! once, and serve faults, read-ahead and invalidations of unmapped file ranges.

use std::sync::Arc;

use hetmem_proto::{Invalidation, PageRun, RequestKind, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::work::ServiceWork;
use crate::sys::uffd::{self, Msg};

impl Runtime {
    /// Reads pending userfaultfd messages into `work` and applies unmap/remap to the address map
    /// at once. `msgs` is scratch space, kept by the caller so a fault costs no allocation.
    ///
    /// With `wait` false, a thread that finds another reading returns at once without reading
    /// (the other reads what is pending), so two service threads woken for one message do not
    /// queue on the lock that lookups also wait for. Returns whether it read.
    pub(crate) fn read_events(
        &self,
        msgs: &mut Vec<Msg>,
        work: &mut Vec<ServiceWork>,
        wait: bool,
    ) -> bool {
        let _gate = self.gate.enter();
        let _g = if wait {
            self.space.lock_events()
        } else {
            match self.space.try_lock_events() {
                Some(g) => g,
                None => return false,
            }
        };
        msgs.clear();
        loop {
            match self.uffd.read(msgs) {
                Ok(n) if n < 32 => break,
                Ok(_) => {}
                Err(e) => {
                    self.note_error("read userfaultfd", &e);
                    break;
                }
            }
        }
        for m in msgs.drain(..) {
            match m {
                Msg::PageFault {
                    addr,
                    write,
                    wp,
                    tid,
                } => work.push(ServiceWork::Fault {
                    addr,
                    write: write || wp,
                    tid,
                }),
                Msg::Unmap { start, end } | Msg::Remove { start, end } => {
                    for (region, off, len) in self.space.unmap_views(start, end) {
                        work.push(ServiceWork::Unmapped { region, off, len });
                    }
                }
                Msg::Remap { from, to, len } => {
                    self.space.remap_views(from, to, len);
                }
                Msg::Other => {}
            }
        }
        true
    }

    /// Reads pending events into the backlog: userfaultfd answers EAGAIN until they are read.
    pub(crate) fn drain_events(&self) {
        let mut work = Vec::new();
        self.read_events(&mut Vec::new(), &mut work, true);
        if !work.is_empty() {
            self.work.push(work);
        }
        std::thread::yield_now();
    }

    /// A fault-service thread.
    ///
    /// Each round sleeps until the userfaultfd has messages or the backlog was kicked (the
    /// wait returns at once while messages are pending), reads the messages, adds the backlog's
    /// round, and serves them. Sleeping first, not reading again after a round, is what a raw
    /// handler does: an isolated fault costs one `read` and the thread is asleep as soon as
    /// the fault is served, leaving the CPU to the thread it just woke.
    pub(crate) fn serve(self: Arc<Self>) {
        let waiter = match uffd::Waiter::new(&self.uffd, self.work.wakeup_fd()) {
            Ok(w) => w,
            Err(e) => return self.note_error("epoll", &e),
        };
        let mut msgs = Vec::with_capacity(32);
        let mut work = Vec::with_capacity(32);
        loop {
            // Woken for a poisoned page's delay, or for a break gate's deadline with faults
            // parked at it (`release_expired_parked` below).
            let due = match (self.poisoned.next_due(), self.parked.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let ready = match waiter.wait(due) {
                Ok(r) => r,
                Err(e) => {
                    self.note_error("poll userfaultfd", &e);
                    return;
                }
            };
            if self.work.is_shut_down() {
                return;
            }
            if ready.kicked {
                self.work.drain_wakeups();
            }
            // Faults first: what is pending on the descriptor and in the backlog. Then at most
            // one read-ahead, so the other threads can share them and a fault never waits
            // behind a queue of them.
            if ready.messages && !self.read_events(&mut msgs, &mut work, false) {
                // Another thread is reading: what is pending is its. Let it run.
                std::thread::yield_now();
            }
            // Faults parked at a break gate past its deadline join this round.
            self.release_expired_parked();
            self.work.take_round(&mut work);
            if self.poisoned.pending() {
                self.unpoison(|p| p.due <= std::time::Instant::now());
            }
            for w in work.drain(..) {
                match w {
                    ServiceWork::Fault { addr, write, tid } => {
                        self.cpu_fault(addr & !(PAGE_SIZE - 1), write, tid)
                    }
                    ServiceWork::Prefetch { region, bi } => {
                        self.prefetch(&region, bi);
                        self.work.read_ahead_done();
                    }
                    ServiceWork::Migrate {
                        region,
                        bi,
                        run,
                        dst,
                        done,
                    } => done.finish(self.request(&region, bi, run, RequestKind::Migrate { dst })),
                    ServiceWork::Unmapped { region, off, len } => {
                        self.invalidate_file_range(&region, off, len, Invalidation::Unmap)
                    }
                }
            }
        }
    }

    pub(crate) fn invalidate_file_range(
        &self,
        region: &Region,
        off: usize,
        len: usize,
        kind: Invalidation,
    ) {
        let mut at = off;
        let end = (off + len).min(region.len);
        while at < end {
            let bi = at / BLOCK_BYTES;
            let page = (at % BLOCK_BYTES) / PAGE_SIZE;
            let n = ((end - at) / PAGE_SIZE).min(PAGES_PER_BLOCK - page);
            if let Some(run) = PageRun::new(page, n, PAGES_PER_BLOCK) {
                let _ = self.invalidate(region, bi, run, kind);
            }
            at += n.max(1) * PAGE_SIZE;
        }
    }
}
