//! The CPU-fault service: one userfaultfd fault message, from lookup to wake or SIGBUS.

use std::sync::Arc;

use hetmem_proto::{Access, Event, Proc, RequestError, RequestKind, BLOCK_BYTES, PAGE_SIZE};

use crate::mm::poison::{PoisonedPage, POISON_RETRY_AFTER};
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;
use crate::policy::MemEvent;

/// Why a CPU page raises SIGBUS (`Runtime::poison_page`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Poison {
    /// Its data could not be brought to the CPU, which may pass: retried later.
    Retry,
    /// It is past the end of the file: until the file grows, looked at again later.
    BeyondEof,
    /// Until something else changes it (a bug the fault path cannot explain).
    ForGood,
}

impl Runtime {
    /// Serves one CPU fault message. Placement first (read-back window, read-ahead, map-around),
    /// then the fault itself, which only the faulting page decides: a window that cannot be
    /// served shrinks to that page. A fault that cannot be served never unregisters the page and
    /// never lets the kernel map a copy behind the protocol's back (`docs/runtime.md` §7): it is
    /// retried with every page of its run re-checked, or the thread gets SIGBUS, or, when the
    /// message is stale (the range went away or changed protection meanwhile), the thread is
    /// woken to retry against the mappings as they are now.
    pub(crate) fn cpu_fault(&self, addr: usize, write: bool, tid: u32) {
        match self.trace() {
            None => self.serve_cpu_fault(addr, write, tid),
            Some(t) => {
                let start = std::time::Instant::now();
                let at = self.page_span(addr).ok();
                self.serve_cpu_fault(addr, write, tid);
                let p = at.as_ref();
                t.complete(
                    "fault",
                    "cpu fault",
                    start,
                    std::time::Instant::now(),
                    &[
                        ("proc", "cpu".into()),
                        ("addr", addr.into()),
                        ("write", u64::from(write).into()),
                        ("tid", u64::from(tid).into()),
                        ("region", p.map_or(0, |p| p.region.id).into()),
                        ("block", p.map_or(0, |p| p.bi).into()),
                        ("page", p.map_or(0, |p| p.run.start()).into()),
                    ],
                );
            }
        }
    }

    fn serve_cpu_fault(&self, addr: usize, write: bool, tid: u32) {
        self.emit(MemEvent::CpuFault { write });
        let Ok(span) = self.page_span(addr) else {
            return self.stale_fault(addr);
        };
        let p = &span;
        // A device kernel's own access first: the break may be waiting for that kernel.
        if self.kernel_cpu_access(p, write, tid) {
            return;
        }
        // A lease break of the mapping is in progress: the fault waits for its end (or its
        // deadline), parked (`mm/lease_break.rs`), and this thread goes on with other faults.
        if self.park_at_break(&p.region, addr, write, tid) {
            return;
        }
        let page = p.run.start();
        let access = if write { Access::Write } else { Access::Read };
        self.check_eof(&p.region);
        // Before anything is filled (the placement's map-around fills too): with a cache limit,
        // room for this block is made first, so the limit holds at every instant for a reader
        // that faults one page at a time (`mm/cache.rs`).
        self.note_cpu_fill(&p.region, p.bi);
        let mut fault_run = self.place_cpu_fault(p, access);
        let mut woken = false;
        let mut rechecked = false;
        let mut failures = 0u32;
        let r = loop {
            let r = self.request_once(
                &p.region,
                p.bi,
                fault_run,
                RequestKind::Fault {
                    proc: Proc::Cpu,
                    access,
                },
                |block, outcome| {
                    // Pages this drive mapped were woken, by their ioctl or by the drive's
                    // wake list.
                    woken = outcome.cpu_mapped.contains(page)
                        || outcome
                            .wake
                            .iter()
                            .any(|&(v, l)| (v..v + l).contains(&addr));
                    if outcome.cpu_mapped.contains(page) {
                        return;
                    }
                    // The engine already considers the page mapped (a user MADV_DONTNEED zapped
                    // it, or another thread's fault mapped it first): re-install what it says.
                    if let Some((mode, _)) = block.page(page).mapping_of(Proc::Cpu) {
                        self.remap_cpu_page(addr, mode == hetmem_proto::MapMode::Read);
                    }
                },
            );
            match r {
                // The kernel let the access through, so its mapping allowed it then: the protocol
                // may hold a stale protection (a raw mprotect). Re-check every page of the run,
                // not only the faulting one, and retry.
                Err(RequestError::NoAccess | RequestError::ReadOnly) if !rechecked => {
                    rechecked = true;
                    for piece in self.run_pieces(&p.region, p.bi, fault_run) {
                        let _ = self.sync_prot(&piece);
                    }
                }
                // A window that reaches pages the access may not touch (unmapped, protected,
                // past a new end of file): the faulting page alone decides.
                Err(
                    RequestError::NoAccess
                    | RequestError::ReadOnly
                    | RequestError::NoMapping
                    | RequestError::BeyondEof,
                ) if fault_run != p.run => fault_run = p.run,
                // A copy back failed; the data stayed where it was. The faulting thread must
                // not see anything else, so it waits while we retry, backing off to 10 ms.
                Err(RequestError::Op(_)) if failures < 32 => {
                    self.emit(MemEvent::TransferFailed);
                    failures += 1;
                    let pause = 1u64 << failures.min(13);
                    std::thread::sleep(std::time::Duration::from_micros(pause.min(10_000)));
                }
                r => break r,
            }
        };
        match r {
            Ok(()) => {}
            // Past the end of the file: SIGBUS, as with mmap, and only while the file is that
            // short. A SIGBUS marker takes no fault, so it goes after `POISON_RETRY_AFTER` (or
            // at once when a check sees the file grow, `check_eof`): the next access faults
            // again and the size is looked at again.
            Err(RequestError::BeyondEof) => self.poison_page(p, Poison::BeyondEof),
            // A copy that keeps failing (a file that cannot be read, a dead device) is a memory
            // error: SIGBUS, as the kernel gives for an unreadable page, rather than a thread
            // stuck for ever. The data stays where it was; the next access retries.
            Err(RequestError::Op(_)) => self.poison_page(p, Poison::Retry),
            // The mapping changed since the thread faulted: unmapped (the page is no longer
            // managed memory) or protected (a raw mprotect, re-checked above). Woken, the
            // thread retries against the mapping as it is now: the kernel then gives it
            // SIGSEGV or EFAULT, as for any access to such memory.
            Err(RequestError::NoAccess | RequestError::ReadOnly) => {}
            Err(RequestError::NoMapping) if !self.still_shows(p) => {}
            Err(e) => {
                // The address map still shows the page, the protocol says otherwise, or the
                // request makes no sense for a CPU: a bug. SIGBUS rather than a stale page or a
                // hang.
                self.note_error("cpu fault", &std::io::Error::other(e.to_string()));
                self.poison_page(p, Poison::ForGood);
            }
        }
        if !woken {
            // EEXIST, repairs and refusals wake nobody by themselves.
            let _ = self.uffd.wake(addr, PAGE_SIZE);
        }
    }

    /// A fault on an address that is not (or no longer) managed memory: its message arrived
    /// after the range was unmapped or moved (the thread may be awake already), or during a
    /// teardown of its region. Never unregister: the kernel would then map whatever the memfd
    /// holds there. Waking the thread makes it retry against the mappings as they are now
    /// (SIGSEGV, EFAULT, or a fault on memory that is managed again).
    pub(crate) fn stale_fault(&self, addr: usize) {
        let _ = self.uffd.wake(addr, PAGE_SIZE);
    }

    /// Whether the address map still shows piece `p`'s page at its address: the same region and
    /// page, not a newer region that took the addresses after the piece's went away.
    pub(crate) fn still_shows(&self, p: &BlockSpan) -> bool {
        self.page_span(p.va).is_ok_and(|now| {
            Arc::ptr_eq(&now.region, &p.region) && now.bi == p.bi && now.run == p.run
        })
    }

    // ---------------------------------------------------------------- SIGBUS

    /// SIGBUS for the CPU on piece `p`'s page (UFFDIO_POISON). Under the block's lock and only
    /// while the region still shows the page at that address: a region being dropped unmaps its
    /// views only after it has taken each block's lock, so the addresses cannot pass to a newer
    /// region meanwhile. With `retry`, the data could not be copied there, which may pass: the
    /// marker goes after `POISON_RETRY_AFTER`, or when another request covers the page, and the
    /// next access tries again.
    pub(crate) fn poison_page(&self, p: &BlockSpan, why: Poison) {
        let page = p.run.start();
        let retry = why != Poison::ForGood;
        let block = self.lock_block(&p.region.blocks[p.bi]);
        if why == Poison::BeyondEof && !block.page(page).beyond_eof {
            // The file grew and the growth was followed since the fault was refused: woken,
            // the thread retries and finds the page inside the file.
            return;
        }
        let mut ranges = Vec::new();
        p.region.cpu_ranges(
            p.bi * BLOCK_BYTES + page * PAGE_SIZE,
            PAGE_SIZE,
            &mut ranges,
        );
        if !ranges.contains(&(p.va, PAGE_SIZE)) {
            return;
        }
        if retry {
            self.poisoned.push(PoisonedPage {
                region: Arc::downgrade(&p.region),
                bi: p.bi,
                page,
                due: std::time::Instant::now() + POISON_RETRY_AFTER,
            });
            // A service thread asleep without a timeout must learn of the deadline.
            self.work.wake();
        }
        self.poison(p.va, PAGE_SIZE);
    }

    /// Clears the SIGBUS markers of the poisoned pages `pick` selects, so their next access
    /// faults again. A page the CPU maps by now (a drive mapped it over the marker) needs
    /// nothing.
    pub(crate) fn unpoison(&self, pick: impl Fn(&PoisonedPage) -> bool) {
        for p in self.poisoned.take(pick) {
            let Some(region) = p.region.upgrade() else {
                continue;
            };
            let block = self.lock_block(&region.blocks[p.bi]);
            self.clear_poison(&region, p.bi, &block, p.page);
        }
    }

    /// Clears the SIGBUS marker of page `page` of block `bi`, under the block's lock, unless
    /// the CPU maps the page by now.
    pub(crate) fn clear_poison(
        &self,
        region: &Region,
        bi: usize,
        block: &hetmem_proto::Block2M,
        page: usize,
    ) {
        if block.state().mapped_by(Proc::Cpu).contains(page) {
            return;
        }
        // The page is not mapped for the CPU (the protocol says so, and its lock is held):
        // zapping it removes only the poison marker.
        let off = bi * BLOCK_BYTES + page * PAGE_SIZE;
        self.zap_cpu(region, off, PAGE_SIZE, "clear a poison marker");
    }

    /// Clears the markers of poisoned pages of block `bi` that `event` covers, unless it is a
    /// CPU fault: a device access, a migration or a flush of the page means its data may be
    /// reachable again, so the CPU's next access must fault and find out. (A CPU fault is not
    /// enough: a neighbour's fault must not take the SIGBUS away before the faulting thread
    /// got it.)
    pub(crate) fn unpoison_for(
        &self,
        region: &Region,
        bi: usize,
        block: &hetmem_proto::Block2M,
        event: &Event,
    ) {
        let pages = match *event {
            Event::Request {
                kind: RequestKind::Fault {
                    proc: Proc::Cpu, ..
                },
                ..
            } => return,
            Event::Request { pages, .. } | Event::Invalidate { pages, .. } => pages,
            Event::Advise { .. } | Event::Complete { .. } => return,
        };
        let hit = self.poisoned.take(|p| {
            std::ptr::eq(p.region.as_ptr(), region) && p.bi == bi && pages.pages().contains(&p.page)
        });
        for p in hit {
            self.clear_poison(region, bi, block, p.page);
        }
    }
}
