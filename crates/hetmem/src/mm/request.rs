//! Requests: drive one event through a block's engine and the executor, then wake the CPU ranges
//! it mapped; retry a request that found a device full after evicting.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem_proto::{
    DeviceId, Event, Invalidation, PageRun, RequestError, RequestKind, PAGES_PER_BLOCK,
};

use crate::error::{Error, Result};
use crate::mm::exec::Outcome;
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::policy::{Candidate, MemEvent};

impl Runtime {
    /// Drives one event through block `bi`'s engine: locks the block, hands the engine the
    /// event and applies what it says until it is quiet (`drive_locked`), mirrors its frame
    /// counts for eviction, runs `after` under the lock, then wakes the CPU ranges it mapped.
    /// Every path that changes a block goes through here.
    ///
    /// Copies still running on a device's engine are waited for with the engine lock released,
    /// so faults and requests on the block's other pages go on meanwhile; the lock is taken
    /// again to report them. The drive stays inside the fork gate throughout, so a fork never
    /// copies a block with copies in flight.
    ///
    /// A request the event made may be left queued behind another thread's copies: that
    /// thread's drive finishes it and posts the result (`Completions`), which this drive then
    /// waits for before it runs `after`. Results of other threads' requests that this drive
    /// finished are posted for them.
    pub(crate) fn drive(
        &self,
        region: &Region,
        bi: usize,
        event: Event,
        after: impl FnMut(&hetmem_proto::Block2M, &Outcome),
    ) -> std::result::Result<Outcome, hetmem_proto::EventError> {
        self.drive_if(region, bi, event, |_| true, after)
            .map(Option::unwrap_or_default)
    }

    /// `drive`, if `check` passes on the block's state under the same hold of its lock as the
    /// event's handling: for a decision no other thread may change in between (the cache
    /// limit drops a block only if it is still clean, `mm/cache.rs`). `Ok(None)` when it does
    /// not pass: nothing was done.
    pub(crate) fn drive_if(
        &self,
        region: &Region,
        bi: usize,
        event: Event,
        check: impl FnOnce(&hetmem_proto::Block2M) -> bool,
        mut after: impl FnMut(&hetmem_proto::Block2M, &Outcome),
    ) -> std::result::Result<Option<Outcome>, hetmem_proto::EventError> {
        let slot = &region.blocks[bi];
        let own = match event {
            Event::Request { id, .. } | Event::Invalidate { id, .. } => Some(id),
            Event::Advise { .. } | Event::Complete { .. } => None,
        };
        let _gate = self.gate.enter();
        let mut outcome = Outcome::default();
        let mut released = false;
        let mut block = self.lock_block(slot);
        if !check(&block) {
            return Ok(None);
        }
        if self.poisoned.pending() {
            self.unpoison_for(region, bi, &block, &event);
        }
        let first = self.drive_locked(region, bi, &mut block, event, &mut outcome);
        // An engine error may come after it changed the state: the mirrors follow it anyway.
        let mut flight = first.inspect_err(|_| self.mirror_held(region, bi, &block))?;
        while let Some(mut running) = flight {
            released = true;
            // Eviction reads the mirror without the lock: it must see the frames the
            // running copies use.
            self.mirror_held(region, bi, &block);
            drop(block);
            running.wait(self, region, bi);
            block = self.lock_block(slot);
            let next = self.complete_locked(region, bi, &mut block, running, &mut outcome);
            flight = next.inspect_err(|_| self.mirror_held(region, bi, &block))?;
        }
        let queued = own.filter(|&id| outcome.result_of(id).is_none());
        self.mirror_held(region, bi, &block);
        if queued.is_none() {
            after(&block, &outcome);
        }
        drop(block);
        // Results for other threads' requests, posted before the wake so the bookkeeping is
        // done when the woken threads run (a lone fault's drive finishes only its own).
        let foreign = |(id, _): &&(hetmem_proto::ReqId, _)| Some(*id) != own;
        if released || outcome.done.iter().any(|d| foreign(&d)) {
            self.completions
                .post(outcome.done.iter().filter(foreign).copied());
        }
        // The waiters of the ranges mapped are woken last, with no lock held: a woken thread
        // that faults again at once finds this thread done with the block (`zero_map`).
        for &(va, len) in &outcome.wake {
            let _ = self.uffd.wake(va, len);
        }
        self.check_dirty_limit(region);
        if let Some(id) = queued {
            let result = self.completions.wait(id);
            outcome.done.push((id, result));
            let block = self.lock_block(slot);
            after(&block, &outcome);
        }
        Ok(Some(outcome))
    }

    /// Mirrors the block's frame counts for eviction, which picks victims without locking, and
    /// whether a flush has work in it (`Region::dirty`). Called under the engine lock whenever
    /// a drive lets it go, so the mirrors never lag a state someone else could act on.
    fn mirror_held(&self, region: &Region, bi: usize, block: &hetmem_proto::Block2M) {
        region.dirty.record(bi, block);
        self.mirror_frames(region, bi, block);
    }

    /// The frame counts alone (`mirror_held`): also called when a drive reserves frames for
    /// copies it runs under the lock (`run`).
    pub(crate) fn mirror_frames(&self, region: &Region, bi: usize, block: &hetmem_proto::Block2M) {
        let slot = &region.blocks[bi];
        for d in self.topology.devices() {
            let held = block.frames_held(d);
            slot.held[d.index()].store(held, Ordering::Relaxed);
            let copies = if held == 0 {
                0
            } else {
                block.state().evict_copies(d).count()
            };
            slot.evict_copies[d.index()].store(copies, Ordering::Relaxed);
        }
    }

    /// Waits until no copy of block `slot` is in flight: no drive that looked the block up
    /// before now still has work running on it.
    pub(crate) fn quiesce(&self, slot: &crate::mm::region::BlockSlot) {
        loop {
            let seen = self.completions.generation();
            if self.lock_block(slot).ops_in_flight().next().is_none() {
                return;
            }
            self.completions.wait_change(seen);
        }
    }

    /// One request on one block, driven to its result; no eviction retry (`request` has it).
    pub(crate) fn request_once(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: RequestKind,
        after: impl FnMut(&hetmem_proto::Block2M, &Outcome),
    ) -> std::result::Result<(), RequestError> {
        let id = self.next_req();
        let event = Event::Request {
            id,
            pages: run,
            kind,
        };
        let outcome = self
            .drive(region, bi, event, after)
            .map_err(|_| RequestError::NoMapping)?;
        match outcome.result_of(id) {
            // A copy failed for want of a device chunk: the device is full in chunks, if not
            // in pages, and eviction can make room (`request`).
            Some(Err(RequestError::Op(hetmem_proto::OpError::Device))) => {
                match outcome.chunk_shortage {
                    Some(d) => Err(RequestError::DeviceFull(d)),
                    None => Err(RequestError::Op(hetmem_proto::OpError::Device)),
                }
            }
            Some(r) => r,
            None => Err(RequestError::Op(hetmem_proto::OpError::Device)),
        }
    }

    /// Like `request_once`, evicting other blocks when a device is full.
    pub(crate) fn request(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: RequestKind,
    ) -> Result<()> {
        let mut fruitless_since: Option<std::time::Instant> = None;
        loop {
            match self.request_once(region, bi, run, kind, |_, _| {}) {
                Err(RequestError::DeviceFull(d)) => {
                    if self.evict(d, region, bi, run) {
                        fruitless_since = None;
                        continue;
                    }
                    // Nothing was evictable just now. Frames another thread's drive holds are
                    // visible to eviction from their reservation on (`run`), but some may be
                    // on their way back to the budget, or pinned by a running launch: keep
                    // trying for a while before calling the device full.
                    let since = *fruitless_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > std::time::Duration::from_millis(200) {
                        return Err(Error::NoMem);
                    }
                    std::thread::yield_now();
                }
                r => return r.map_err(Error::from),
            }
        }
    }

    /// Frees frames of `dev` by evicting whole blocks that hold some, in the policy's order
    /// (`PlacementPolicy::victims`; LRU by default), then the rest of the faulting block.
    /// Returns whether any frame was freed. Success is judged per victim block, under its
    /// lock, not from the device's total, which other threads change meanwhile.
    pub(crate) fn evict(&self, dev: DeviceId, cur: &Region, cur_bi: usize, keep: PageRun) -> bool {
        let regions = self.space.regions();
        let mut blocks: Vec<(&Arc<Region>, usize)> = Vec::new();
        for r in &regions {
            for (bi, slot) in r.blocks.iter().enumerate() {
                if slot.held[dev.index()].load(Ordering::Relaxed) == 0
                    || (std::ptr::eq(&**r, cur) && bi == cur_bi)
                {
                    continue;
                }
                // A running launch's pages stay until it completes: evicting them would wait
                // for it, while another block may be free at once.
                let launched = slot.dev[dev.index()]
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .launches
                    .any_running();
                if launched {
                    continue;
                }
                blocks.push((r, bi));
            }
        }
        // The policy orders the victims (`PlacementPolicy::victims`).
        let mut candidates: Vec<Candidate<'_>> = blocks
            .iter()
            .enumerate()
            .map(|(index, &(r, bi))| Candidate {
                block: &r.blocks[bi].policy,
                copies: r.blocks[bi].evict_copies[dev.index()].load(Ordering::Relaxed),
                index,
            })
            .collect();
        self.policy.victims(dev, &mut candidates);
        let victims: Vec<(&Arc<Region>, usize)> = candidates
            .iter()
            .filter_map(|c| blocks.get(c.index).copied())
            .collect();
        let evict_runs = |r: &Region, bi: usize, runs: &[Option<PageRun>]| -> u64 {
            let kind = RequestKind::Evict {
                dev,
                pages: PAGES_PER_BLOCK as u32,
                write_back: r.file.as_ref().is_some_and(|f| f.evict_to_file),
            };
            let mut freed = 0u64;
            // Frames busy under a running copy cannot go: wait for the block's copies first,
            // as a drive holding the lock through them would have made us wait.
            self.quiesce(&r.blocks[bi]);
            for run in runs.iter().flatten() {
                let before = r.blocks[bi].held[dev.index()].load(Ordering::Relaxed);
                let _ = self.request_once(r, bi, *run, kind, |block, _| {
                    freed += u64::from(before.saturating_sub(block.frames_held(dev)));
                });
            }
            freed
        };
        let mut freed = 0;
        for &(r, bi) in &victims {
            let all = PageRun::new(0, r.block_pages(bi), PAGES_PER_BLOCK);
            let start = std::time::Instant::now();
            let n = evict_runs(r, bi, &[all]);
            freed += n;
            if let Some(t) = self.trace() {
                t.complete(
                    "evict",
                    "evict block",
                    start,
                    std::time::Instant::now(),
                    &[
                        (
                            "dev",
                            crate::trace::mem_name(hetmem_proto::Mem::Device(dev)).into(),
                        ),
                        ("region", r.id.into()),
                        ("block", bi.into()),
                        ("pages", n.into()),
                        ("for_region", cur.id.into()),
                        ("for_block", cur_bi.into()),
                        ("reason", "device full: the policy's first victim".into()),
                    ],
                );
            }
            if freed > 0 {
                break;
            }
        }
        if freed == 0 {
            let pages = cur.block_pages(cur_bi);
            freed += evict_runs(
                cur,
                cur_bi,
                &[
                    PageRun::new(0, keep.start(), PAGES_PER_BLOCK),
                    PageRun::new(
                        keep.end(),
                        pages.saturating_sub(keep.end()),
                        PAGES_PER_BLOCK,
                    ),
                ],
            );
        }
        self.emit(MemEvent::Evicted { dev, pages: freed });
        freed > 0
    }

    /// Sends `Invalidate { kind }` for block `bi`'s `run` and waits for it. A `Discard` leaves
    /// pinned pages alone (`mm/pin.rs`): DMA may be writing them, and their data must stay
    /// where it is; the others are discarded.
    pub(crate) fn invalidate(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: Invalidation,
    ) -> Result<()> {
        if kind == Invalidation::Discard && region.pins.any(bi, run) {
            let mut first = Ok(());
            for part in crate::mm::pin::unpinned_runs(run, region.pins.in_block(bi)) {
                let r = self.invalidate_run(region, bi, part, kind);
                if first.is_ok() {
                    first = r;
                }
            }
            return first;
        }
        self.invalidate_run(region, bi, run, kind)
    }

    fn invalidate_run(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        kind: Invalidation,
    ) -> Result<()> {
        let id = self.next_req();
        if let Some(t) = self.trace() {
            t.instant(
                "invalidate",
                match kind {
                    Invalidation::Unmap => "unmap",
                    Invalidation::Truncate => "truncate",
                    Invalidation::Extend => "extend",
                    Invalidation::Discard => "discard",
                    Invalidation::Revert => "revert",
                    Invalidation::Protect { .. } => "protect",
                },
                &[
                    ("region", region.id.into()),
                    ("block", bi.into()),
                    ("page", run.start().into()),
                    ("pages", run.len().into()),
                ],
            );
        }
        let event = Event::Invalidate {
            id,
            pages: run,
            kind,
        };
        let outcome = self
            .drive(region, bi, event, |block, _| {
                if matches!(
                    kind,
                    Invalidation::Discard | Invalidation::Unmap | Invalidation::Revert
                ) {
                    // The data is gone for good: give its memory back.
                    self.release_pages(region, bi, block, run);
                }
            })
            .map_err(|_| Error::Invalid("page run outside its block"))?;
        match outcome.result_of(id) {
            Some(r) => r.map_err(Error::from),
            None => Ok(()),
        }
    }
}
