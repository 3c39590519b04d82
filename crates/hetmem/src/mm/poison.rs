//! SIGBUS for CPU pages whose data cannot be brought to the CPU, and the retry of those pages.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem_proto::{Event, Proc, RequestKind, BLOCK_BYTES, PAGE_SIZE};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;

/// A page that raises SIGBUS because its data could not be brought to the CPU. The marker goes
/// (so the next access faults and the copy is tried again) at `due`, or at once when a request
/// other than a CPU fault covers the page (a device access, a migration, a flush).
#[derive(Debug)]
pub(crate) struct PoisonedPage {
    pub(crate) region: std::sync::Weak<Region>,
    pub(crate) bi: usize,
    pub(crate) page: usize,
    pub(crate) due: std::time::Instant,
}

/// How long a page whose copy kept failing raises SIGBUS before its next access tries again. The
/// kernel retries an unreadable page at every access; this is the nearest user space gets, since
/// a SIGBUS marker takes no fault.
pub(crate) const POISON_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

impl Runtime {
    /// SIGBUS for the CPU on piece `p`'s page (UFFDIO_POISON). Under the block's lock and only
    /// while the region still shows the page at that address: a region being dropped unmaps its
    /// views only after it has taken each block's lock, so the addresses cannot pass to a newer
    /// region meanwhile. With `retry`, the data could not be copied there, which may pass: the
    /// marker goes after `POISON_RETRY_AFTER`, or when another request covers the page, and the
    /// next access tries again.
    pub(crate) fn poison_page(&self, p: &BlockSpan, retry: bool) {
        let page = p.run.start();
        let _block = self.lock_block(&p.region.blocks[p.bi]);
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
            self.retry_poison
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(PoisonedPage {
                    region: Arc::downgrade(&p.region),
                    bi: p.bi,
                    page,
                    due: std::time::Instant::now() + POISON_RETRY_AFTER,
                });
            self.retry_pending.store(true, Ordering::Release);
            // A service thread asleep without a timeout must learn of the deadline.
            self.kick();
        }
        self.poison(p.va, PAGE_SIZE);
    }

    /// Time until the next poisoned page is due for a retry.
    pub(crate) fn next_unpoison(&self) -> Option<std::time::Duration> {
        if !self.retry_pending.load(Ordering::Acquire) {
            return None;
        }
        let list = self.retry_poison.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        list.iter()
            .map(|p| p.due.saturating_duration_since(now))
            .min()
    }

    /// Takes the poisoned pages `pick` selects off the list.
    pub(crate) fn take_poisoned(&self, pick: impl Fn(&PoisonedPage) -> bool) -> Vec<PoisonedPage> {
        let mut list = self.retry_poison.lock().unwrap_or_else(|e| e.into_inner());
        let (picked, keep) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| pick(p));
        *list = keep;
        self.retry_pending
            .store(!list.is_empty(), Ordering::Release);
        picked
    }

    /// Clears the SIGBUS markers of the poisoned pages `pick` selects, so their next access
    /// faults again. A page the CPU maps by now (a drive mapped it over the marker) needs
    /// nothing.
    pub(crate) fn unpoison(&self, pick: impl Fn(&PoisonedPage) -> bool) {
        for p in self.take_poisoned(pick) {
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
        let hit = self.take_poisoned(|p| {
            std::ptr::eq(p.region.as_ptr(), region) && p.bi == bi && pages.pages().contains(&p.page)
        });
        for p in hit {
            self.clear_poison(region, bi, block, p.page);
        }
    }
}
