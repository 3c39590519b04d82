//! Background writeback ("hetmem-flusher", one thread per process): keeps the dirty data of
//! each leased Shared file mapping under what its measured write rate writes back within its
//! break budget (`FileOptions::break_budget`), so that a lease break, which must write back
//! everything dirty before `lease-break-time` runs out, can (`docs/file-contract.md` §6,
//! "Bounded breaks"). What the kernel's flusher threads do for a dirty shared mmap, with the
//! limit set by the break instead of `dirty_ratio`.
//!
//! A drive that leaves a mapping over its limit asks once (`FileBacking::flusher_kicked`);
//! the thread then writes blocks back, each by the same Flush a `flush_range` of the block
//! sends, until the mapping is under half its limit. Its errors are the file's errors like
//! any writeback's: recorded in the error sequence, reported by the next `flush`, the pages
//! kept dirty. The thread is started by `map_file` (never on a fault path), and again in a
//! fork child that maps a file.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use hetmem_proto::PAGES_PER_BLOCK;

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;

/// A mapping served: its key (`key`), its context and its region.
type Entry = (usize, Weak<Runtime>, Weak<Region>);

/// A region's key here: its address, unique among live regions of the process (region ids
/// are per context, so two contexts' regions can share one). A region registered stays alive
/// until its drop unregisters it, so the address is not reused meanwhile.
fn key(region: &Region) -> usize {
    region as *const Region as usize
}

#[derive(Default)]
pub(crate) struct Queue {
    /// The process whose thread serves this queue: a fork child has none until it starts
    /// its own.
    pid: u32,
    /// Mappings served.
    registry: Vec<Entry>,
    /// Keys of the regions asked for, each at most once.
    pending: VecDeque<usize>,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    pid: 0,
    registry: Vec::new(),
    pending: VecDeque::new(),
});
static WAKE: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, Queue> {
    QUEUE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The queue's lock, for fork's prepare handler (`mm/fork.rs`): a child must not inherit it
/// locked by a thread it does not have (a `map_file` on another thread), or its first
/// `map_file` would wait for ever.
pub(crate) fn hold_for_fork() -> MutexGuard<'static, Queue> {
    lock()
}

/// Serves `region` from now on, starting this process's flusher thread if it has none. If the
/// thread cannot start, the mapping gets no limit: breaks are then as long as its dirty data
/// makes them, as without a budget.
pub(crate) fn register(inner: &Arc<Runtime>, region: &Arc<Region>) {
    let Some(f) = &region.file else {
        return;
    };
    let mut q = lock();
    let pid = std::process::id();
    if q.pid != pid {
        // First use in this process, or a fork child: the parent's entries are not ours.
        q.registry.clear();
        q.pending.clear();
        match std::thread::Builder::new()
            .name("hetmem-flusher".into())
            .spawn(serve)
        {
            Ok(_) => q.pid = pid,
            Err(_) => return,
        }
    }
    q.registry
        .push((key(region), Arc::downgrade(inner), Arc::downgrade(region)));
    drop(q);
    let limit = f.compute_dirty_limit(crate::sys::lease::break_time());
    f.dirty_limit.store(limit, Ordering::Relaxed);
}

/// Stops serving `region`.
pub(crate) fn unregister(region: &Region) {
    let k = key(region);
    let mut q = lock();
    q.registry.retain(|(r, _, _)| *r != k);
    q.pending.retain(|r| *r != k);
}

/// Asks the flusher to bring `region` under its dirty limit; once until it has.
pub(crate) fn kick(region: &Region) {
    let Some(f) = &region.file else {
        return;
    };
    if f.flusher_kicked.swap(true, Ordering::AcqRel) {
        return;
    }
    let k = key(region);
    let mut q = lock();
    if q.pid == std::process::id() && !q.pending.contains(&k) {
        q.pending.push_back(k);
        WAKE.notify_one();
    } else {
        // No thread of ours serves it (a fork child's copy): never again.
        drop(q);
        f.dirty_limit.store(usize::MAX, Ordering::Relaxed);
    }
}

fn serve() {
    loop {
        let found = {
            let mut q = lock();
            loop {
                if let Some(k) = q.pending.pop_front() {
                    break q
                        .registry
                        .iter()
                        .find(|(r, _, _)| *r == k)
                        .and_then(|(_, i, r)| Some((i.upgrade()?, r.upgrade()?)));
                }
                q = WAKE.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        if let Some((inner, region)) = found {
            inner.write_back_early(&region);
        }
    }
}

impl Runtime {
    /// Writes blocks of `region` back until its dirty pages are under half its limit, in
    /// block order from where the last round stopped; stops early while a break runs (the
    /// break writes everything anyway). Asks again if writes meanwhile took it over the
    /// limit again and this round made progress.
    pub(crate) fn write_back_early(&self, region: &Region) {
        let Some(f) = &region.file else {
            return;
        };
        if !self.is_owner() {
            return;
        }
        // The rate and lease-break-time as they are now.
        let limit = f.compute_dirty_limit(crate::sys::lease::break_time());
        f.dirty_limit.store(limit, Ordering::Relaxed);
        let target = limit / 2;
        let before = region.dirty.pages();
        let blocks = region.dirty.in_range(0..region.blocks.len());
        for bi in blocks {
            if region.dirty.pages() <= target || f.breaking.load(Ordering::Acquire) {
                break;
            }
            let first = bi * PAGES_PER_BLOCK;
            // Errors are the file's (errseq) and the next flush reports them.
            let _ = self.flush_pages(region, first, region.block_pages(bi));
            self.stats.background_writebacks.add(1);
        }
        f.flusher_kicked.store(false, Ordering::Release);
        // Again at once only if this round made progress and no break runs: writebacks that
        // keep failing are retried at the next drive over the limit, not in a loop here.
        let after = region.dirty.pages();
        if after > limit && after < before && !f.breaking.load(Ordering::Acquire) {
            kick(region);
        }
    }

    /// After a drive of one of `region`'s blocks: asks the flusher for help if the mapping is
    /// over its dirty limit. One load and compare for a file mapping, nothing for the others.
    pub(crate) fn check_dirty_limit(&self, region: &Region) {
        if let Some(f) = &region.file {
            if region.dirty.pages() > f.dirty_limit.load(Ordering::Relaxed)
                && !f.flusher_kicked.load(Ordering::Relaxed)
            {
                kick(region);
            }
        }
    }
}
