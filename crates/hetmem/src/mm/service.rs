//! The fault-service threads: read userfaultfd messages, apply unmap/remap to the address space at
//! once, and serve faults, read-ahead and invalidations of unmapped file ranges.

use std::sync::Arc;

use hetmem_proto::{Invalidation, PageRun, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::work::ServiceWork;
use crate::sys::uffd::{self, Msg};

impl Runtime {
    /// Reads pending userfaultfd messages and applies unmap/remap to the address map at once.
    pub(crate) fn read_events(&self) -> Vec<ServiceWork> {
        let _gate = self.gate.enter();
        let _g = self.space.lock_events();
        let mut msgs = Vec::new();
        let mut work = Vec::new();
        loop {
            match self.uffd.read(&mut msgs) {
                Ok(n) if n < 32 => break,
                Ok(_) => {}
                Err(e) => {
                    self.note_error("read userfaultfd", &e);
                    break;
                }
            }
        }
        for m in msgs {
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
        work
    }

    /// Reads pending events into the backlog: userfaultfd answers EAGAIN until they are read.
    pub(crate) fn drain_events(&self) {
        let work = self.read_events();
        if !work.is_empty() {
            self.work.push(work);
        }
        std::thread::yield_now();
    }

    /// A fault-service thread.
    pub(crate) fn serve(self: Arc<Self>) {
        let waiter = match uffd::Waiter::new(&self.uffd, self.work.wakeup_fd()) {
            Ok(w) => w,
            Err(e) => return self.note_error("epoll", &e),
        };
        loop {
            // Faults first: what is pending on the descriptor and in the backlog. Then at most
            // one read-ahead, so the other threads can share them and a fault never waits
            // behind a queue of them.
            let mut work = self.read_events();
            self.work.take_round(&mut work);
            if self.poisoned.pending() {
                self.unpoison(|p| p.due <= std::time::Instant::now());
            }
            if work.is_empty() {
                match waiter.wait(self.poisoned.next_due()) {
                    Ok(kicked) => {
                        if self.work.is_shut_down() {
                            return;
                        }
                        if kicked {
                            self.work.drain_wakeups();
                        }
                    }
                    Err(e) => {
                        self.note_error("poll userfaultfd", &e);
                        return;
                    }
                }
                continue;
            }
            for w in work {
                match w {
                    ServiceWork::Fault { addr, write, tid } => {
                        self.cpu_fault(addr & !(PAGE_SIZE - 1), write, tid)
                    }
                    ServiceWork::Prefetch { region, bi } => self.prefetch(&region, bi),
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
