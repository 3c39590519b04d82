//! Executes the protocol's actions for one block: userfaultfd ioctls on the CPU views, device
//! page-table updates (told to the backend's tables), frame binding and copies. It makes no
//! decision of its own.
//!
//! A drive runs under the block's engine lock: hand the event to the engine, execute the
//! synchronous actions in order, run the transfers the engine started, report their completions,
//! and repeat until the engine starts nothing new. File reads and writebacks, and copies on a
//! device's engine that have not finished when submitted (`DeviceBackend::is_done`), are left
//! to the drive's caller (`InFlight`), which does or waits for them without the lock and comes
//! back to report them (`Runtime::drive`).

#![allow(unsafe_code)]

use std::io;

use hetmem_proto::{
    Action, Block2M, DeviceId, DeviceKind, Env, Event, EventError, MapMode, Mem, OpError, OpId,
    PageMask, PageRun, Proc, ReqId, RequestError, Source, BLOCK_BYTES, BLOCK_WORDS, PAGE_SIZE,
};

use crate::budget::BudgetRef;
use crate::device::{CopyOp, Endpoint, Fence};
use crate::error::Result;
use crate::mm::launch::Change;
use crate::mm::region::{DevBlock, Region};
use crate::mm::runtime::Runtime;
use crate::policy::MemEvent;
use crate::sys::mem;
use crate::sys::uffd::Fill;

/// 64 pages' worth of masks per word: the production block.
pub(crate) type Mask = PageMask<BLOCK_WORDS>;

/// What a drive did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Requests that finished, with their outcome.
    pub done: Vec<(ReqId, Result<(), RequestError>)>,
    /// CPU ranges mapped during the drive; their waiters must be woken.
    pub wake: Vec<(usize, usize)>,
    /// Pages the CPU got a mapping for.
    pub cpu_mapped: Mask,
    /// This batch of actions maps the CPU once only, so a map may wake its waiters itself.
    lone_map: bool,
    /// A device's backend had no chunk to give (ENOMEM) during the drive.
    pub chunk_shortage: Option<DeviceId>,
}

impl Outcome {
    /// The outcome of request `id`, if it finished.
    pub fn result_of(&self, id: ReqId) -> Option<Result<(), RequestError>> {
        self.done.iter().find(|(r, _)| *r == id).map(|&(_, r)| r)
    }
}

/// Asynchronous work a drive runs after the synchronous actions.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    op: OpId,
    src: Source,
    dst: Mem,
    run: PageRun,
    /// A writeback of `src`'s copy (`Source::Mem`) to the file at this page.
    writeback: Option<u64>,
}

fn mask_of(run: PageRun) -> Mask {
    Mask::from_run(run)
}

/// A batch running on a device's copy engine for an op.
#[derive(Debug)]
struct Running {
    op: OpId,
    dev: DeviceId,
    fence: Fence,
    /// Reported once the batch has succeeded.
    event: MemEvent<'static>,
    /// What the trace says of it once it completes, when tracing is on.
    traced: Option<Traced>,
}

/// A transfer as the trace records it (`Runtime::trace_transfer`).
#[derive(Clone, Copy, Debug)]
struct Traced {
    start: std::time::Instant,
    region: u64,
    bi: usize,
    src: Source,
    dst: Mem,
    run: PageRun,
    writeback: bool,
}

/// The transfers of one round of a drive: results of those that finished (copies that failed
/// to start, copies between aliased memory), batches still running, and file I/O not yet done.
/// A drive that leaves any of them releases the engine lock until they finish
/// (`Runtime::drive`).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Per op, its result so far: the first error of its transfers.
    results: Vec<(OpId, Result<(), OpError>)>,
    running: Vec<Running>,
    /// Zero fills, by op: their adopted pages keep their data until the op has succeeded.
    zero_fills: Vec<(OpId, Mask)>,
    /// File reads and writebacks, run by `wait` without the engine lock: `pread` and `pwrite`
    /// can block for as long as the file system likes (a frozen file system, dirty
    /// throttling, a hard-mounted NFS server), and faults on the block's other pages must not
    /// wait for them (`docs/file-contract.md` §12). The protocol keeps the run's pages busy
    /// (and a writeback's source stable) until their op completes, as for a device copy.
    file_io: Vec<(Transfer, Option<Traced>)>,
}

impl InFlight {
    fn merge(&mut self, op: OpId, r: Result<(), OpError>) {
        match self.results.iter_mut().find(|(o, _)| *o == op) {
            Some((_, acc)) => {
                if acc.is_ok() {
                    *acc = r;
                }
            }
            None => self.results.push((op, r)),
        }
    }

    /// Whether every transfer has finished already: no file I/O left to do, and every batch
    /// done.
    fn done(&self, rt: &Runtime) -> bool {
        self.file_io.is_empty()
            && self
                .running
                .iter()
                .all(|b| rt.devices[b.dev.index()].backend.is_done(b.fence))
    }

    /// Runs or starts transfer `t` of block `bi`: a copy left running on a device's engine
    /// joins `running`, the rest is done on return and its result recorded.
    fn start(
        &mut self,
        rt: &Runtime,
        region: &Region,
        bi: usize,
        t: &Transfer,
        traced: Option<Traced>,
    ) {
        let r = match t.writeback {
            Some(file_page) => rt.write_back(region, bi, t, file_page).map(|()| None),
            None => rt.transfer(region, bi, t),
        };
        match r {
            Ok(Some((dev, fence, event))) => {
                self.merge(t.op, Ok(()));
                self.running.push(Running {
                    op: t.op,
                    dev,
                    fence,
                    event,
                    traced,
                });
            }
            Ok(None) => {
                if let Some(tr) = &traced {
                    rt.trace_transfer(tr, Ok(()));
                }
                self.merge(t.op, Ok(()))
            }
            Err(e) => {
                if let Some(tr) = &traced {
                    rt.trace_transfer(tr, Err(e));
                }
                self.merge(t.op, Err(e))
            }
        }
    }

    /// Does the file I/O left to do, then waits for every running batch (without the engine
    /// lock, unless everything is done already).
    pub(crate) fn wait(&mut self, rt: &Runtime, region: &Region, bi: usize) {
        for (t, traced) in std::mem::take(&mut self.file_io) {
            self.start(rt, region, bi, &t, traced);
        }
        for b in std::mem::take(&mut self.running) {
            let r = rt.devices[b.dev.index()].backend.wait(b.fence);
            if r.is_ok() {
                rt.emit(b.event);
            }
            if let Some(t) = b.traced {
                rt.trace_transfer(&t, r);
            }
            self.merge(b.op, r);
        }
    }
}

impl Runtime {
    /// `Runtime::drive` with the block's engine already locked: hands `event` to the engine and
    /// applies everything that follows from it, repeating with the completions until the
    /// engine starts nothing new, or until copies are left running (`InFlight`): the caller
    /// then waits for them without the lock and reports them (`complete_locked`).
    pub(crate) fn drive_locked(
        &self,
        region: &Region,
        bi: usize,
        block: &mut Block2M,
        event: Event,
        out: &mut Outcome,
    ) -> Result<Option<InFlight>, EventError> {
        // What the kernel's CPU page table holds for this block, as far as our actions go.
        let cpu_now = block.state().mapped_by(Proc::Cpu);
        let mut actions = Vec::new();
        self.feed(block, event, &mut actions)?;
        self.run(region, bi, block, actions, cpu_now, out)
    }

    /// Reports the transfers of `done`, whose batches have all finished (`InFlight::wait`), to
    /// the engine, and goes on as `drive_locked` does.
    pub(crate) fn complete_locked(
        &self,
        region: &Region,
        bi: usize,
        block: &mut Block2M,
        done: InFlight,
        out: &mut Outcome,
    ) -> Result<Option<InFlight>, EventError> {
        let cpu_now = block.state().mapped_by(Proc::Cpu);
        let mut actions = Vec::new();
        self.report_completions(region, bi, block, done, &mut actions)?;
        self.run(region, bi, block, actions, cpu_now, out)
    }

    /// Executes `actions` and what the engine says after their transfers complete, until it is
    /// quiet or copies are left running.
    fn run(
        &self,
        region: &Region,
        bi: usize,
        block: &mut Block2M,
        mut actions: Vec<Action>,
        mut cpu_now: Mask,
        out: &mut Outcome,
    ) -> Result<Option<InFlight>, EventError> {
        let mut transfers = Vec::new();
        loop {
            transfers.clear();
            out.lone_map = actions
                .iter()
                .filter(|a| matches!(a, Action::CpuMap { .. }))
                .count()
                == 1;
            for action in actions.drain(..) {
                match action {
                    Action::Transfer { op, src, dst, run } => transfers.push(Transfer {
                        op,
                        src,
                        dst,
                        run,
                        writeback: None,
                    }),
                    Action::WriteBack {
                        op,
                        src,
                        run,
                        file_page,
                    } => transfers.push(Transfer {
                        op,
                        src: Source::Mem(src),
                        dst: Mem::System,
                        run,
                        writeback: Some(file_page),
                    }),
                    other => self.apply(region, bi, block, other, &mut cpu_now, out),
                }
            }
            if transfers.is_empty() {
                return Ok(None);
            }
            // Frames just reserved on a device are in use from now on: eviction, which
            // reads the mirror without the lock, must see them while the copies run, even
            // when they run under the lock (a backend whose copies are done when `copy`
            // returns). Otherwise another thread's request finds nothing to evict while
            // this drive fills the device, and calls it full (`request`).
            if transfers.iter().any(|t| matches!(t.dst, Mem::Device(_))) {
                self.mirror_frames(region, bi, block);
            }
            let mut flight = InFlight::default();
            for t in &transfers {
                let traced = self.trace().map(|_| Traced {
                    start: std::time::Instant::now(),
                    region: region.id,
                    bi,
                    src: t.src,
                    dst: t.dst,
                    run: t.run,
                    writeback: t.writeback.is_some(),
                });
                if t.writeback.is_some() || matches!(t.src, Source::File { .. }) {
                    // Done without the engine lock (`InFlight::file_io`).
                    flight.merge(t.op, Ok(()));
                    flight.file_io.push((*t, traced));
                } else {
                    flight.start(self, region, bi, t, traced);
                }
                if t.src == Source::Zero && t.writeback.is_none() {
                    flight.zero_fills.push((t.op, mask_of(t.run)));
                }
            }
            if !flight.done(self) {
                return Ok(Some(flight));
            }
            flight.wait(self, region, bi);
            self.report_completions(region, bi, block, flight, &mut actions)?;
        }
    }

    /// Records a finished transfer in the trace (`crate::trace`).
    fn trace_transfer(&self, t: &Traced, r: Result<(), OpError>) {
        let Some(tr) = self.trace() else {
            return;
        };
        let (cat, name, from) = match (t.writeback, t.src) {
            (true, Source::Mem(m)) => ("writeback", "writeback", crate::trace::mem_name(m)),
            (_, Source::Mem(m)) => ("migrate", "migrate", crate::trace::mem_name(m)),
            (_, Source::Zero) => ("fill", "zero fill", "zero"),
            (_, Source::File { .. }) => ("fill", "file read", "file"),
        };
        let to = if t.writeback {
            "file"
        } else {
            crate::trace::mem_name(t.dst)
        };
        tr.complete(
            cat,
            name,
            t.start,
            std::time::Instant::now(),
            &[
                ("region", t.region.into()),
                ("block", t.bi.into()),
                ("page", t.run.start().into()),
                ("pages", t.run.len().into()),
                ("bytes", (t.run.len() * PAGE_SIZE).into()),
                ("from", from.into()),
                ("to", to.into()),
                ("result", if r.is_ok() { "ok" } else { "error" }.into()),
            ],
        );
    }

    /// Feeds the engine the completion of every op of `done`.
    fn report_completions(
        &self,
        region: &Region,
        bi: usize,
        block: &mut Block2M,
        done: InFlight,
        actions: &mut Vec<Action>,
    ) -> Result<(), EventError> {
        debug_assert!(done.running.is_empty(), "batches still running");
        // Zero fills of adopted pages kept their data: once their op succeeded, that data is
        // the page's, and later fills start from what the protocol says.
        let filled: Mask = done
            .zero_fills
            .iter()
            .filter(|(op, _)| done.results.iter().any(|&(o, r)| o == *op && r.is_ok()))
            .fold(Mask::EMPTY, |m, &(_, run)| m | run);
        if !filled.is_empty() {
            *region.blocks[bi]
                .adopted
                .lock()
                .unwrap_or_else(|e| e.into_inner()) -= filled;
        }
        for (op, result) in done.results {
            self.feed(block, Event::Complete { op, result }, actions)?;
        }
        Ok(())
    }

    /// Feeds one event to the engine, which appends its actions to `out`.
    fn feed(
        &self,
        block: &mut Block2M,
        event: Event,
        out: &mut Vec<Action>,
    ) -> Result<(), EventError> {
        let mut budget = BudgetRef(&self.budget);
        let mut env = Env {
            topology: &self.topology,
            frames: &mut budget,
        };
        block.handle(&mut env, event, out)?;
        debug_assert_eq!(block.check(&self.topology), Ok(()));
        Ok(())
    }

    /// Applies one synchronous action (transfers are collected and run by `drive_locked`).
    fn apply(
        &self,
        region: &Region,
        bi: usize,
        block: &Block2M,
        action: Action,
        cpu_now: &mut Mask,
        out: &mut Outcome,
    ) {
        match action {
            Action::AllocFrames { dev, run: _ } => {
                if self.topology.kind(dev) == Some(DeviceKind::Private) {
                    let mut db = region.blocks[bi].dev[dev.index()]
                        .write()
                        .unwrap_or_else(|e| e.into_inner());
                    if db.chunk.is_none() {
                        match self.devices[dev.index()].take_chunk() {
                            Ok(c) => match self.same_address_of(region, bi, dev) {
                                // The chunk also goes at the block's own address on the
                                // device: the address the CPU uses for it.
                                Some(addr) => {
                                    let backend = &self.devices[dev.index()].backend;
                                    match backend.map_chunk_at(&c, addr) {
                                        Ok(()) => db.chunk = Some(c),
                                        Err(e) => {
                                            // No chunk: the transfer into it fails, and the
                                            // data stays where it is.
                                            self.note_error("map a chunk at its block", &e);
                                            self.devices[dev.index()].put_chunk(c);
                                        }
                                    }
                                }
                                None => db.chunk = Some(c),
                            },
                            // The backend has no chunk left although the page budget has
                            // room (blocks partly on the device each hold a whole chunk): the
                            // transfer into it fails cleanly, and the request reports the
                            // device full, so that eviction frees a chunk (`request_once`).
                            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                                out.chunk_shortage = Some(dev);
                            }
                            Err(e) => self.note_error("device chunk", &e),
                        }
                    }
                }
            }
            // System pages stay allocated when their copy is dropped (most come back: read-back,
            // eviction), so migrations copy into resident pages. `release_pages` frees them
            // when the data goes for good (discard, munmap). A coherent device's frames are the
            // system pages themselves.
            Action::FreeFrames {
                mem: Mem::System, ..
            } => {}
            Action::FreeFrames {
                mem: Mem::Device(d),
                ..
            } if self.topology.is_coherent(d) => {}
            Action::FreeFrames {
                mem: Mem::Device(d),
                run: _,
            } => {
                // Frames are always fully written (copied or zeroed) before they become valid,
                // so freed frames need no scrubbing; a chunk with no frame left goes back to the
                // device's pool.
                if block.state().frames_of(d).is_empty() {
                    let mut db = region.blocks[bi].dev[d.index()]
                        .write()
                        .unwrap_or_else(|e| e.into_inner());
                    if let Some(c) = db.chunk.take() {
                        if let Some(addr) = self.same_address_of(region, bi, d) {
                            self.devices[d.index()].backend.unmap_chunk_at(&c, addr);
                        }
                        self.devices[d.index()].put_chunk(c);
                    }
                }
            }
            Action::CpuMap {
                target: _,
                run,
                mode,
            } => {
                let wp = mode == MapMode::Read;
                let mask = mask_of(run);
                let fresh = mask - *cpu_now;
                let present = mask & *cpu_now;
                let holes = {
                    let mut pop = region.blocks[bi]
                        .populated
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let holes = fresh - *pop;
                    *pop |= fresh;
                    holes
                };
                let mut ranges = Vec::new();
                let mut at = Vec::new();
                for r in (fresh - holes).runs() {
                    at.clear();
                    region.cpu_ranges_at(
                        bi * BLOCK_BYTES + r.start() * PAGE_SIZE,
                        r.len() * PAGE_SIZE,
                        &mut at,
                    );
                    for &(va, off, len) in &at {
                        let backing = region.backing.as_ptr().wrapping_add(off) as usize;
                        self.map_cpu(va, len, wp, backing);
                        out.wake.push((va, len));
                    }
                }
                for r in holes.runs() {
                    at.clear();
                    region.cpu_ranges_at(
                        bi * BLOCK_BYTES + r.start() * PAGE_SIZE,
                        r.len() * PAGE_SIZE,
                        &mut at,
                    );
                    if wp {
                        // Read-only zero pages: populate, then CONTINUE with WP in one step, so
                        // no writer slips in before the protection.
                        let hole = region.backing_ptr(bi, r.start()) as usize;
                        // SAFETY: the backing view is ours; populating a hole writes zeros
                        // that are the page's data anyway.
                        if let Err(e) = unsafe {
                            mem::madvise(hole, r.len() * PAGE_SIZE, mem::Advice::PopulateWrite)
                        } {
                            self.note_error("populate", &e);
                        }
                        for &(va, off, len) in &at {
                            let backing = region.backing.as_ptr().wrapping_add(off) as usize;
                            self.map_cpu(va, len, true, backing);
                            out.wake.push((va, len));
                        }
                    } else {
                        for &(va, _, len) in &at {
                            if !self.zero_map(va, len, out.lone_map) {
                                out.wake.push((va, len));
                            }
                        }
                    }
                }
                for r in present.runs() {
                    self.cpu_ranges(region, bi, r, &mut ranges);
                    for &(va, len) in &ranges {
                        self.write_protect(va, len, wp);
                        out.wake.push((va, len));
                    }
                }
                *cpu_now |= mask;
                out.cpu_mapped |= mask;
            }
            Action::CpuProtect { run } => {
                let mut ranges = Vec::new();
                region.cpu_ranges(
                    bi * BLOCK_BYTES + run.start() * PAGE_SIZE,
                    run.len() * PAGE_SIZE,
                    &mut ranges,
                );
                for (va, len) in ranges {
                    self.write_protect(va, len, true);
                }
            }
            Action::CpuUnmap { run } => {
                let off = bi * BLOCK_BYTES + run.start() * PAGE_SIZE;
                self.zap_cpu(region, off, run.len() * PAGE_SIZE, "cpu unmap");
                *cpu_now -= mask_of(run);
                out.cpu_mapped -= mask_of(run);
            }
            Action::DeviceMap {
                dev,
                run,
                remote,
                mode,
            } => {
                // A map that moves pages between the device's memory and system memory
                // changes what a running launch reads: it waits, as an unmap does.
                let mut db = self.dev_write_unpinned(region, bi, dev, run, |db| {
                    run.pages()
                        .any(|i| db.entry(i).mode.is_some() && db.entry(i).remote != remote)
                        .then_some(Change::Unmap)
                });
                // The block's table is made on the device's first map of it.
                let backend = &self.devices[dev.index()].backend;
                db.pt
                    .get_or_insert_with(|| backend.page_table())
                    .map(run.pages(), mode, remote);
                if remote || self.topology.is_coherent(dev) {
                    // The device reaches the backing view, which allocates holes it touches.
                    *region.blocks[bi]
                        .populated
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) |= mask_of(run);
                }
            }
            Action::DeviceProtect { dev, run } => {
                let mut db =
                    self.dev_write_unpinned(region, bi, dev, run, |_| Some(Change::Protect));
                if let Some(pt) = db.pt.as_mut() {
                    pt.protect(run.pages());
                }
            }
            Action::DeviceUnmap { dev, run } => {
                let mut db = self.dev_write_unpinned(region, bi, dev, run, |_| Some(Change::Unmap));
                if let Some(pt) = db.pt.as_mut() {
                    pt.unmap(run.pages());
                }
            }
            Action::Complete { id, result } => out.done.push((id, result)),
            Action::Transfer { .. } | Action::WriteBack { .. } => unreachable!("deferred by drive"),
        }
    }

    /// The run's own backing pages, when `dev`'s backend registered the region's backing
    /// view (`Region::registered`): pinned host memory for staging a file transfer to or
    /// from the device at the link's speed, instead of a pageable buffer.
    fn registered_staging(
        &self,
        region: &Region,
        bi: usize,
        run: PageRun,
        dev: DeviceId,
    ) -> Option<*mut u8> {
        let backend = &self.devices[dev.index()].backend;
        region
            .registered
            .iter()
            .any(|b| std::sync::Arc::ptr_eq(b, backend))
            .then(|| region.backing_ptr(bi, run.start()))
    }

    /// The device address of block `bi` when `dev`'s backend reserved the region's addresses
    /// (`Region::same_address`): where its chunk is mapped too.
    fn same_address_of(&self, region: &Region, bi: usize, dev: DeviceId) -> Option<usize> {
        let (addr, backend) = region.same_address.as_ref()?;
        std::sync::Arc::ptr_eq(backend, &self.devices[dev.index()].backend)
            .then(|| addr + bi * BLOCK_BYTES)
    }

    /// The write lock of `dev`'s page table for block `bi`, once no running launch pins what
    /// the change `change` (given the table as it is) would make of `run`: a launch's pages
    /// stay mapped, and writable if it writes them, until it completes (`mm/launch.rs`). The
    /// pins are checked under the write lock, so none can be added between the check and the
    /// change; the lock is dropped while waiting, so the launch's own pinning never waits on
    /// it. The engine lock stays held: completing a launch takes no runtime lock.
    fn dev_write_unpinned<'a>(
        &self,
        region: &'a Region,
        bi: usize,
        dev: DeviceId,
        run: PageRun,
        change: impl Fn(&DevBlock) -> Option<Change>,
    ) -> std::sync::RwLockWriteGuard<'a, DevBlock> {
        let lock = &region.blocks[bi].dev[dev.index()];
        loop {
            let db = lock.write().unwrap_or_else(|e| e.into_inner());
            let Some(c) = change(&db) else {
                return db;
            };
            let blocking = db.launches.blocking(run, c);
            if blocking.is_empty() {
                return db;
            }
            drop(db);
            // Counted before the wait, so a test can see that something waits.
            self.emit(MemEvent::LaunchWaited { dev });
            let waited = std::time::Instant::now();
            for l in &blocking {
                // Its error is the launch's owner's to report; here it only had to end.
                let _ = l.wait();
            }
            if let Some(t) = self.trace() {
                t.complete(
                    "launch",
                    "wait for launch",
                    waited,
                    std::time::Instant::now(),
                    &[
                        ("dev", crate::trace::mem_name(Mem::Device(dev)).into()),
                        ("region", region.id.into()),
                        ("block", bi.into()),
                        ("page", run.start().into()),
                        ("pages", run.len().into()),
                    ],
                );
            }
        }
    }

    /// Frees the memfd pages of `run` that no memory holds any more (after a discard or an
    /// unmap: the data is gone for good). A coherent device's frames are the system pages
    /// themselves (`docs/runtime.md`), so a page goes only when neither system memory nor any
    /// coherent device holds it, nor a transfer is filling it.
    pub(crate) fn release_pages(&self, region: &Region, bi: usize, block: &Block2M, run: PageRun) {
        let st = block.state();
        let mut keep = st.valid_in(Mem::System);
        for d in self.topology.devices() {
            if self.topology.is_coherent(d) {
                keep |= st.frames_of(d);
            }
        }
        // What `register` adopted is gone with the rest.
        *region.blocks[bi]
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner()) -= mask_of(run) - keep;
        let mut pop = region.blocks[bi]
            .populated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let drop = (mask_of(run) & *pop) - keep;
        if region.registered.is_empty() {
            *pop -= drop;
            for r in drop.runs() {
                self.punch(region, bi, r);
            }
        }
        // A registered region keeps its pages: what they held is garbage now, and the next
        // fill writes them whole (a zero fill zeroes them: they stay `populated`).
    }

    /// Makes the `stale` pages of system memory read zero: a hole punched in the memfd, or,
    /// in a region registered with a device, zeros written in place (its pages must stay the
    /// memfd's: `Region::registered`). `pop` loses the punched pages.
    fn zero_system(&self, region: &Region, bi: usize, stale: Mask, pop: &mut Mask) {
        if region.registered.is_empty() {
            *pop -= stale;
            for r in stale.runs() {
                self.punch(region, bi, r);
            }
            return;
        }
        for r in stale.runs() {
            // SAFETY: the pages are busy filling under this drive (the protocol holds them):
            // no processor maps them and no copy uses them; the backing view covers them.
            unsafe {
                std::ptr::write_bytes(region.backing_ptr(bi, r.start()), 0, r.len() * PAGE_SIZE)
            };
        }
    }

    fn punch(&self, region: &Region, bi: usize, r: PageRun) {
        let off = bi * BLOCK_BYTES + r.start() * PAGE_SIZE;
        if let Err(e) = mem::punch_hole(
            std::os::fd::AsFd::as_fd(&region.memfd),
            off,
            r.len() * PAGE_SIZE,
        ) {
            self.note_error("punch hole", &e);
        }
    }

    fn cpu_ranges(&self, region: &Region, bi: usize, r: PageRun, out: &mut Vec<(usize, usize)>) {
        out.clear();
        region.cpu_ranges(
            bi * BLOCK_BYTES + r.start() * PAGE_SIZE,
            r.len() * PAGE_SIZE,
            out,
        );
    }

    /// Fills holes of a CPU view with zero pages and maps them writable (UFFDIO_ZEROPAGE: one
    /// ioctl allocates, clears and maps). A page already in the page cache gives EEXIST and is
    /// mapped with CONTINUE instead.
    ///
    /// A lone one-page map wakes its waiter from inside the ioctl (one ioctl per fault, as a
    /// plain userfaultfd handler); returns true then. Otherwise the caller wakes the range once
    /// the drive has let the block's lock go (`Runtime::drive`).
    fn zero_map(&self, va: usize, len: usize, lone: bool) -> bool {
        // A lone one-page map (a fault without fault-around): the ioctl wakes the faulting
        // thread itself, saving a UFFDIO_WAKE on the latency path (the p99 beside a CPU hog was
        // 1.8 times worse with every wake left to the end of the drive). Otherwise wake once at
        // the end, or the woken thread would run ahead into pages not mapped yet and fault
        // again.
        let wake = lone && len == PAGE_SIZE;
        let mut existing = Vec::new();
        let r = self.fill_each(
            va,
            len,
            &mut |s, l| self.uffd.zeropage(s, l, wake),
            &mut |page| existing.push(page),
        );
        if let Err(e) = &r {
            self.report("UFFDIO_ZEROPAGE", e);
        }
        for &page in &existing {
            let _ = self.fill(page, PAGE_SIZE, |s, l| {
                self.uffd.continue_(s, l, false, false)
            });
        }
        wake && r.is_ok() && existing.is_empty()
    }

    /// Poisons a CPU range (UFFDIO_POISON): an access raises SIGBUS. A page that was mapped
    /// read-only leaves a write-protect marker behind when unmapped, and POISON refuses any
    /// non-empty entry, so the protection is cleared first.
    pub(crate) fn poison(&self, va: usize, len: usize) {
        self.write_protect(va, len, false);
        if let Err(e) = self.fill(va, len, |s, l| self.uffd.poison(s, l)) {
            self.report("UFFDIO_POISON", &e);
        }
    }

    /// Re-installs the CPU mapping the protocol says a page has (after a raw MADV_DONTNEED, or
    /// when another thread's fault mapped it first). The page is in the page cache, or a hole
    /// that reads zero, which is then its data.
    pub(crate) fn remap_cpu_page(&self, va: usize, wp: bool) {
        let r = self.fill(va, PAGE_SIZE, |s, l| {
            self.uffd.continue_(s, l, false, false)
        });
        if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EFAULT)) {
            self.zero_map(va, PAGE_SIZE, false);
        }
        self.write_protect(va, PAGE_SIZE, wp);
    }

    /// Runs or starts transfer `t`. A copy on a device's engine is submitted and returned
    /// with its fence and the event to report once it has succeeded; everything else (file
    /// reads, hole punching, copies between aliased memory) is done on return.
    ///
    /// The device chunks are reached under their page-table read locks, held only while the
    /// copy is submitted: the chunk stays bound while the copy runs because the protocol keeps
    /// its frames for the busy pages until the op completes.
    fn transfer(
        &self,
        region: &Region,
        bi: usize,
        t: &Transfer,
    ) -> Result<Option<(DeviceId, Fence, MemEvent<'static>)>, OpError> {
        let bytes = t.run.len() * PAGE_SIZE;
        let off = t.run.start() * PAGE_SIZE;
        let slot = &region.blocks[bi];
        let private = |m: Mem| match m {
            Mem::Device(d) if !self.topology.is_coherent(d) => Some(d),
            _ => None,
        };
        // Chunks are reached under their page-table read locks, which every chunk change
        // takes for writing.
        let lock = |d: Option<DeviceId>| {
            d.map(|d| {
                slot.dev[d.index()]
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
            })
        };
        let (src_dev, dst_dev) = (
            match t.src {
                Source::Mem(m) => private(m),
                _ => None,
            },
            private(t.dst),
        );
        let dst_guard = lock(dst_dev);
        let src_guard = if src_dev == dst_dev {
            None
        } else {
            lock(src_dev)
        };
        let endpoint = |m: Mem, at: usize| -> Result<Endpoint<'_>, OpError> {
            match private(m) {
                Some(d) => {
                    let g = if Some(d) == dst_dev {
                        &dst_guard
                    } else {
                        &src_guard
                    };
                    let chunk = g
                        .as_ref()
                        .and_then(|g| g.chunk.as_ref())
                        .ok_or(OpError::Device)?;
                    Ok(Endpoint::Chunk(chunk, at))
                }
                None => Ok(Endpoint::Host(region.backing_ptr(bi, at / PAGE_SIZE))),
            }
        };
        if self.transfer_faults.take(t.dst, t.src) {
            return Err(OpError::Device);
        }
        match t.src {
            Source::Zero => {
                // Pages adopted by `register` come with data: their first fill keeps it. They
                // stay adopted until the fill's op has succeeded as a whole (`drive`): a fill
                // that fails leaves the data where it was, in system memory.
                let adopted =
                    *slot.adopted.lock().unwrap_or_else(|e| e.into_inner()) & mask_of(t.run);
                let fresh = mask_of(t.run) - adopted;
                match dst_dev {
                    None => {
                        // Zeros are what a hole reads: punch only pages that may hold old data.
                        // The CPU map then fills the holes with UFFDIO_ZEROPAGE.
                        let mut pop = slot.populated.lock().unwrap_or_else(|e| e.into_inner());
                        let stale = *pop & fresh;
                        self.zero_system(region, bi, stale, &mut pop);
                    }
                    Some(d) => {
                        let backend = &*self.devices[d.index()].backend;
                        let chunk = dst_guard
                            .as_ref()
                            .and_then(|g| g.chunk.as_ref())
                            .ok_or(OpError::Device)?;
                        for r in fresh.runs() {
                            backend
                                .discard(chunk, r.start() * PAGE_SIZE, r.len() * PAGE_SIZE)
                                .map_err(|_| OpError::Device)?;
                        }
                        let ops: Vec<CopyOp<'_>> = adopted
                            .runs()
                            .map(|r| CopyOp {
                                src: Endpoint::Host(region.backing_ptr(bi, r.start())),
                                dst: Endpoint::Chunk(chunk, r.start() * PAGE_SIZE),
                                len: r.len() * PAGE_SIZE,
                            })
                            .collect();
                        let event = MemEvent::Filled {
                            to: t.dst,
                            pages: t.run.len() as u64,
                            zeroed: fresh.count() as u64,
                        };
                        if !ops.is_empty() {
                            // SAFETY: the backing pages hold the adopted data; the destination
                            // frames are bound to this run and unmapped; the pages stay busy
                            // until the op completes, after the fence.
                            let fence = unsafe { backend.copy(&ops) }?;
                            return Ok(Some((d, fence, event)));
                        }
                        self.emit(event);
                        return Ok(None);
                    }
                }
                self.emit(MemEvent::Filled {
                    to: t.dst,
                    pages: t.run.len() as u64,
                    zeroed: fresh.count() as u64,
                });
            }
            Source::Mem(src_mem) => {
                let (src, dst) = (endpoint(src_mem, off)?, endpoint(t.dst, off)?);
                // A coherent device's frames alias system memory: nothing to copy between them.
                let aliased =
                    matches!((src, dst), (Endpoint::Host(a), Endpoint::Host(b)) if a == b);
                if private(t.dst).is_none() {
                    *slot.populated.lock().unwrap_or_else(|e| e.into_inner()) |= mask_of(t.run);
                }
                let event = MemEvent::Migrated {
                    from: src_mem,
                    to: t.dst,
                    pages: t.run.len() as u64,
                    bytes: if aliased { 0 } else { bytes as u64 },
                };
                if aliased {
                    self.emit(event);
                    return Ok(None);
                }
                let op = CopyOp {
                    src,
                    dst,
                    len: bytes,
                };
                // The copy engine of the device involved (the destination's if both are
                // devices).
                let dev = match (t.dst, src_mem) {
                    (Mem::Device(d), _) | (Mem::System, Mem::Device(d)) => d,
                    (Mem::System, Mem::System) => return Err(OpError::Device),
                };
                // SAFETY: src holds the latest data and dst is a bound frame of the run; the
                // protocol keeps the pages busy until the op completes, after the fence, so no
                // processor writes either side meanwhile, and both ranges are `bytes` long
                // inside memory that stays mapped (the chunks stay bound while their frames
                // are busy; the backing view lives as long as the region, which the drive's
                // caller holds).
                let fence = unsafe { self.devices[dev.index()].backend.copy(&[op]) }?;
                return Ok(Some((dev, fence, event)));
            }
            Source::File { file_page } => {
                let Some(f) = &region.file else {
                    return Err(OpError::Io);
                };
                // pread straight into the destination: a device fault loads file data into
                // device memory without mapping it on the CPU. Device memory the host cannot
                // address (a GPU's) is filled through a host staging buffer and the backend's
                // copy, the only path to it.
                let at = file_page * PAGE_SIZE as u64;
                let chunk = dst_guard.as_ref().and_then(|g| g.chunk.as_ref());
                match (dst_dev, chunk.and_then(|c| c.host_ptr())) {
                    (Some(_), Some(p)) => {
                        // SAFETY: `bytes` of the chunk's bound frames for this run, which the
                        // protocol marked busy, so nobody else touches them; the page-table
                        // read lock keeps the chunk mapped.
                        let buf =
                            unsafe { std::slice::from_raw_parts_mut(p.wrapping_add(off), bytes) };
                        f.read_at(buf, at)?;
                    }
                    (Some(d), None) => {
                        let chunk = chunk.ok_or(OpError::Device)?;
                        let backend = &*self.devices[d.index()].backend;
                        let mut staging = Vec::new();
                        let host = match self.registered_staging(region, bi, t.run, d) {
                            // The run's own pages of the backing view, registered (pinned)
                            // with the device: the copy runs at the link's speed. System
                            // memory holds no copy of these pages (the fill is from the
                            // file), so they are free to stage in.
                            Some(p) => p,
                            None => {
                                staging = mem::try_zeroed(bytes).ok_or(OpError::Device)?;
                                staging.as_mut_ptr()
                            }
                        };
                        // SAFETY: `host` is `bytes` long: the staging buffer, or the run's
                        // backing pages, which hold no valid copy and which the protocol keeps
                        // busy (nobody maps or copies them meanwhile).
                        f.read_at(unsafe { std::slice::from_raw_parts_mut(host, bytes) }, at)?;
                        let op = CopyOp {
                            src: Endpoint::Host(host),
                            dst: Endpoint::Chunk(chunk, off),
                            len: bytes,
                        };
                        // SAFETY: the staging memory outlives the wait below; the destination
                        // frames are bound to this run and busy.
                        let fence = unsafe { backend.copy(&[op]) }?;
                        backend.wait(fence)?;
                        drop(staging);
                    }
                    (None, _) => {
                        *slot.populated.lock().unwrap_or_else(|e| e.into_inner()) |= mask_of(t.run);
                        let dst = region.backing_ptr(bi, t.run.start());
                        // SAFETY: `bytes` of the backing view for this run, which the protocol
                        // marked busy, so nobody else touches them.
                        let buf = unsafe { std::slice::from_raw_parts_mut(dst, bytes) };
                        f.read_at(buf, at)?;
                    }
                }
                self.emit(MemEvent::FileRead {
                    to: t.dst,
                    pages: t.run.len() as u64,
                });
            }
        }
        Ok(None)
    }

    /// Writes `src`'s copy of the run to the file (`FileBacking::write_at`), from system memory
    /// or straight from device memory. Private mappings never reach the file. Every failure is
    /// recorded in the file's errseq, whoever asked for the writeback (`FileMapping::flush`).
    fn write_back(
        &self,
        region: &Region,
        bi: usize,
        t: &Transfer,
        file_page: u64,
    ) -> Result<(), OpError> {
        let Some(f) = &region.file else {
            return Err(OpError::Io);
        };
        if f.mode != crate::mm::file_io::FileMode::Shared {
            return Ok(());
        }
        // A lease break past its deadline: the kernel has let, or is about to let, the opener
        // in, and this write could land over what it writes. The pages are conflicted instead
        // (`mm/lease_break.rs`), and pages conflicted earlier are never written until their
        // conflict is resolved. Kept dirty, as any failed writeback, and reported by `flush`
        // as the conflict it is, not through the file's error sequence: no data was lost.
        if f.gate.timed_out() {
            let new = f.conflicts.add(bi, t.run);
            self.stats.pages_conflicted.add(new as u64);
            return Err(OpError::Conflict);
        }
        if f.conflicts.any_in(bi, t.run) {
            return Err(OpError::Conflict);
        }
        let r = self.write_back_run(region, bi, t, file_page, f);
        match r {
            // In the page cache now, on the disk only after an fdatasync that succeeds.
            Ok(()) => f
                .unsynced
                .add((file_page - f.first_page) as usize, t.run.len()),
            Err(e) => f.errseq.record(e),
        }
        r
    }

    fn write_back_run(
        &self,
        region: &Region,
        bi: usize,
        t: &Transfer,
        file_page: u64,
        f: &crate::mm::file_io::FileBacking,
    ) -> Result<(), OpError> {
        let bytes = t.run.len() * PAGE_SIZE;
        let slot = &region.blocks[bi];
        let guard;
        // Device memory the host cannot address (a GPU's) is written back through a host
        // staging buffer, filled by the backend's copy.
        let mut staging: Vec<u8>;
        let src = match t.src {
            Source::Mem(Mem::Device(d)) if !self.topology.is_coherent(d) => {
                guard = slot.dev[d.index()]
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                let chunk = guard.chunk.as_ref().ok_or(OpError::Device)?;
                let off = t.run.start() * PAGE_SIZE;
                match chunk.host_ptr() {
                    Some(p) => p.wrapping_add(off),
                    None => {
                        // The run's backing pages when registered with the device (pinned:
                        // the copy runs at the link's speed); they hold no newer data than
                        // the device's (the writeback's source), so they may take its copy.
                        let host = match self.registered_staging(region, bi, t.run, d) {
                            Some(p) => p,
                            None => {
                                staging = mem::try_zeroed(bytes).ok_or(OpError::Device)?;
                                staging.as_mut_ptr()
                            }
                        };
                        let backend = &*self.devices[d.index()].backend;
                        let op = CopyOp {
                            src: Endpoint::Chunk(chunk, off),
                            dst: Endpoint::Host(host),
                            len: bytes,
                        };
                        // SAFETY: the staging buffer is ours and outlives the wait below; the
                        // source frames hold the run's latest data, kept stable by the
                        // protocol during writeback.
                        let fence = unsafe { backend.copy(&[op]) }?;
                        backend.wait(fence)?;
                        host
                    }
                }
            }
            _ => region.backing_ptr(bi, t.run.start()),
        };
        // As the kernel writes back an mmap: nothing past the end of the file, so a writeback
        // never grows it (a last partial page is clipped at EOF). The end is the smallest size
        // seen since the mapping was made: bytes stored past the end of the file stay out of it
        // even if another process grows the file again, as the kernel zeroes them for mmap
        // (`docs/file-contract.md` §7).
        let offset = file_page * PAGE_SIZE as u64;
        let size = f.size_limit().ok_or(OpError::Io)?;
        let bytes = (size.saturating_sub(offset)).min(bytes as u64) as usize;
        // SAFETY: src holds the latest data of the run; the protocol keeps it stable during
        // writeback (mappings read-only, writers wait), and it stays mapped (guard or backing).
        let data = unsafe { std::slice::from_raw_parts(src as *const u8, bytes) };
        let started = std::time::Instant::now();
        f.write_at(data, offset)?;
        // The rate a break can count on (`mm/flusher.rs`).
        f.note_write(bytes, started.elapsed());
        self.emit(MemEvent::WrittenBack {
            pages: t.run.len() as u64,
        });
        Ok(())
    }

    /// Maps fresh pages of a CPU view (UFFDIO_CONTINUE), read-only if `wp`. `backing` is the
    /// backing view's address of the same bytes.
    pub(crate) fn map_cpu(&self, va: usize, len: usize, wp: bool, backing: usize) {
        let with_wp = wp && self.continue_wp.load(std::sync::atomic::Ordering::Relaxed);
        let r = self.fill(va, len, |s, l| self.uffd.continue_(s, l, with_wp, false));
        match r {
            Ok(existed) => {
                if (wp && !with_wp) || existed {
                    self.write_protect(va, len, wp);
                }
            }
            Err(e) if wp && e.raw_os_error() == Some(libc::EINVAL) && with_wp => {
                // CONTINUE_MODE_WP is Linux 6.3; fall back to CONTINUE, then WRITEPROTECT.
                self.continue_wp
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                self.map_cpu(va, len, wp, backing);
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                // Some page is not in the memfd: a hole, whose data is zeros (a coherent device
                // mapped it without touching it, say). Allocate the holes, which then read
                // zero as they did, and map again.
                // SAFETY: the backing view is ours; populating writes zeros into holes only,
                // which is their data anyway, and leaves present pages alone.
                match unsafe { mem::madvise(backing, len, mem::Advice::PopulateWrite) } {
                    Ok(()) => {
                        if let Err(e) =
                            self.fill(va, len, |s, l| self.uffd.continue_(s, l, with_wp, false))
                        {
                            self.report("UFFDIO_CONTINUE", &e);
                        }
                        if wp && !with_wp {
                            self.write_protect(va, len, wp);
                        }
                    }
                    Err(e) => self.note_error("populate for UFFDIO_CONTINUE", &e),
                }
            }
            Err(e) => self.report("UFFDIO_CONTINUE", &e),
        }
    }

    /// Counts a failed ioctl on a CPU view, unless it failed only because the range is gone
    /// (ENOENT: its view was unmapped or moved while the drive ran, so there is nothing left
    /// to map or protect there and nothing was lost).
    pub(crate) fn report(&self, what: &str, e: &io::Error) {
        if e.raw_os_error() != Some(libc::ENOENT) {
            self.note_error(what, e);
        }
    }

    /// Zaps the CPU's entries for file bytes `[off, off + len)` of `region` in every view that
    /// shows them (MADV_DONTNEED): the data stays in the memfd, and the next access faults to
    /// us. MADV_DONTNEED works on any mapping, and a private one would lose its data, so each
    /// range is checked to still map the region's memfd at that offset right before it is
    /// zapped: the application may have unmapped a view and mapped something else there
    /// meanwhile (a range it unmapped has nothing left to zap and loses nothing). Any other
    /// failure is counted.
    pub(crate) fn zap_cpu(&self, region: &Region, off: usize, len: usize, what: &str) {
        let mut ranges = Vec::new();
        region.cpu_ranges_at(off, len, &mut ranges);
        for (va, at_off, len) in ranges {
            let end = va + len;
            let mut at = va;
            while at < end {
                let Ok(Some(vma)) = mem::vma_info(at) else {
                    at += PAGE_SIZE;
                    continue;
                };
                let stop = end.min(vma.end);
                if vma.shows(region.inode, at, at_off + (at - va)) {
                    // SAFETY: checked just now: a shared mapping of the region's memfd, whose
                    // page-table entries can go, the data staying in the file.
                    if let Err(e) = unsafe { mem::madvise(at, stop - at, mem::Advice::DontNeed) } {
                        if e.raw_os_error() != Some(libc::ENOMEM) {
                            self.note_error(what, &e);
                        }
                    }
                }
                at = stop.max(at + PAGE_SIZE);
            }
        }
    }

    fn write_protect(&self, va: usize, len: usize, protect: bool) {
        loop {
            match self.uffd.write_protect(va, len, protect, false) {
                Ok(Fill::Again { .. }) => self.drain_events(),
                Ok(_) => return,
                Err(e) => return self.report("UFFDIO_WRITEPROTECT", &e),
            }
        }
    }

    /// Runs a page-filling ioctl over the range: skips pages that are already present (EEXIST;
    /// their waiters are woken later with the rest), and on EAGAIN reads pending events before
    /// retrying. Returns whether some page was already present.
    pub(crate) fn fill(
        &self,
        start: usize,
        len: usize,
        mut op: impl FnMut(usize, usize) -> io::Result<Fill>,
    ) -> io::Result<bool> {
        let mut existed = false;
        self.fill_each(start, len, &mut op, &mut |_| existed = true)?;
        Ok(existed)
    }

    /// The loop behind `fill`: calls `on_exists` for each page that was already present.
    /// A range that spans several mappings (an `mprotect` split the view, which user space
    /// is not told about) fails with ENOENT: it is then filled one mapping at a time.
    fn fill_each(
        &self,
        start: usize,
        len: usize,
        op: &mut dyn FnMut(usize, usize) -> io::Result<Fill>,
        on_exists: &mut dyn FnMut(usize),
    ) -> io::Result<()> {
        let end = start + len;
        let mut at = start;
        let mut limit = end;
        while at < end {
            if at >= limit {
                limit = end;
            }
            match op(at, limit - at) {
                Ok(Fill::Done) => at = limit,
                Ok(Fill::Exists { done }) => {
                    on_exists(at + done);
                    at += done + PAGE_SIZE;
                }
                Ok(Fill::Again { done }) => {
                    at += done;
                    if done == 0 {
                        self.drain_events();
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && limit - at > PAGE_SIZE => {
                    match mem::vma_at(at) {
                        Ok(Some((_, vend, _, _))) if vend > at && vend < limit => limit = vend,
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
