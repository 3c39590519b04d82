//! The engine for one block: requests in, actions out.
//!
//! Every request has a goal on its pages (for a fault: "the processor maps them with this
//! access"). After each event the engine walks the pending requests in arrival order and lets
//! each act on the pages no earlier request covers and no transfer is changing. A request acts by
//! emitting the synchronous steps that are possible now and starting transfers for the rest, and
//! completes when its goal holds (or with the error that stopped it). Because progress is
//! recomputed from the state each time, completions may arrive in any order.

use crate::action::{Action, MapMode, Source};
use crate::bitmap::PageMask;
use crate::budget::FrameBudget;
use crate::config::{Mutation, Topology};
use crate::error::{EventError, InvariantViolation, RequestError};
use crate::event::{Access, Advice, Event, Invalidation, OpError, RequestKind};
use crate::ids::{DeviceId, Mem, OpId, PageRun, Proc, ReqId, BLOCK_WORDS};
use crate::state::{BlockState, PageView};

/// What an engine call may read and reserve outside its block.
pub struct Env<'a> {
    /// Devices and policy.
    pub topology: &'a Topology,
    /// Device capacity, shared by all blocks.
    pub frames: &'a mut dyn FrameBudget,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

/// A production block: 512 pages, 2 MiB.
pub type Block2M = Block<BLOCK_WORDS>;

/// Which pages of a new block are managed, and which of those are file-backed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Layout<const W: usize> {
    /// Pages inside a live mapping.
    pub managed: PageMask<W>,
    /// Managed pages backed by the file; the rest are anonymous.
    pub file_backed: PageMask<W>,
    /// File offset of the block's page 0, in pages.
    pub file_page: u64,
}

impl<const W: usize> Layout<W> {
    /// Every page managed and anonymous.
    pub fn anonymous() -> Self {
        Self {
            managed: PageMask::FULL,
            file_backed: PageMask::EMPTY,
            file_page: 0,
        }
    }

    /// Every page managed and backed by the file from `file_page` on.
    pub fn file(file_page: u64) -> Self {
        Self {
            managed: PageMask::FULL,
            file_backed: PageMask::FULL,
            file_page,
        }
    }
}

/// What a pending request is doing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Work {
    Fault(Proc, Access),
    /// A device fault whose pages are mapped in system memory unless already local
    /// (`RequestKind::MapRemote`).
    MapRemote(DeviceId, Access),
    Migrate(Mem),
    /// The device, and whether dirty file pages are written back rather than copied.
    Evict(DeviceId, bool),
    Flush,
    Release(DeviceId),
    /// The data half of an unmap, discard or truncate.
    Drop(Invalidation),
    /// Pages beyond the end of the file are inside it again, once no earlier request covers them.
    Extend,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Pending<const W: usize> {
    id: ReqId,
    work: Work,
    pages: PageMask<W>,
    /// Fault-around pages: filled and mapped along with `pages`, as for a read.
    extra: PageMask<W>,
    /// Pages whose writeback was attempted on behalf of this request.
    written: PageMask<W>,
    error: Option<RequestError>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum OpKind {
    Fill(Mem),
    WriteBack,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Inflight<const W: usize> {
    /// The request that started it, until that request completes (ids may then be reused).
    owner: Option<ReqId>,
    kind: OpKind,
    pages: PageMask<W>,
}

/// Protocol state of one block of `64 * W` pages, and its pending work.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Block<const W: usize> {
    state: BlockState<W>,
    file_page: u64,
    requests: Vec<Pending<W>>,
    ops: Vec<Option<Inflight<W>>>,
    /// The last writeback error not yet reported by a flush (errseq_t's role).
    wb_error: Option<OpError>,
}

type Step = Option<Result<(), RequestError>>;

impl<const W: usize> Block<W> {
    /// Pages in the block.
    pub const PAGES: usize = PageMask::<W>::PAGES;

    /// A block with no data anywhere.
    pub fn new(layout: Layout<W>) -> Self {
        Self {
            state: BlockState::new(layout.managed, layout.file_backed),
            file_page: layout.file_page,
            requests: Vec::new(),
            ops: Vec::new(),
            wb_error: None,
        }
    }

    /// The page planes.
    pub fn state(&self) -> &BlockState<W> {
        &self.state
    }

    /// One page, decoded.
    pub fn page(&self, i: usize) -> PageView {
        self.state.page(i)
    }

    /// Requests not yet completed.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }

    /// Asynchronous operations in flight, in slot order.
    pub fn ops_in_flight(&self) -> impl Iterator<Item = OpId> + '_ {
        self.ops
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_some())
            .map(|(i, _)| OpId(i as u16))
    }

    /// Whether a Flush of the block could write or report anything: a dirty page (beyond the
    /// end of the file too), a writeback in flight, or a writeback error not yet reported. A
    /// block for which this is false answers a Flush at once with `Ok` and changes nothing,
    /// so a runtime may skip it (its dirty-block index).
    pub fn may_need_flush(&self) -> bool {
        let s = &self.state;
        !s.dirty.is_empty() || !s.writeback.is_empty() || self.wb_error.is_some()
    }

    /// The pages a Flush of the block has work on: dirty ones (to write back) and ones under
    /// writeback (to wait for). A Flush over just these, plus one anywhere to report
    /// `has_unreported_error`, does what a Flush of the whole block does, and leaves
    /// requests on the block's other pages free to act meanwhile (a request waits for the
    /// older requests that cover its pages).
    pub fn flush_work(&self) -> PageMask<W> {
        self.state.dirty | self.state.writeback
    }

    /// A writeback failed and no Flush has reported it yet.
    pub fn has_unreported_error(&self) -> bool {
        self.wb_error.is_some()
    }

    /// Frames of `dev` this block holds.
    pub fn frames_held(&self, dev: DeviceId) -> u32 {
        self.state.frames[dev.index()].count()
    }

    /// Pages, in this block, beyond which a run from the runtime is rejected.
    fn mask_of(run: PageRun) -> Result<PageMask<W>, EventError> {
        if run.end() > Self::PAGES {
            return Err(EventError::OutOfBlock(run));
        }
        Ok(PageMask::from_run(run))
    }

    /// Checks the state invariants and that no request waits without a transfer that could
    /// wake it.
    pub fn check(&self, topo: &Topology) -> Result<(), InvariantViolation> {
        self.state.check(topo)?;
        if !self.requests.is_empty() && self.ops.iter().all(Option::is_none) {
            let page = self.requests[0].pages.iter().next().unwrap_or(0);
            return Err(InvariantViolation {
                page,
                what: "a request waits with nothing in flight",
            });
        }
        Ok(())
    }

    /// Handles one event, appending the resulting steps to `out`.
    pub fn handle(
        &mut self,
        env: &mut Env<'_>,
        event: Event,
        out: &mut Vec<Action>,
    ) -> Result<(), EventError> {
        match event {
            Event::Request { id, pages, kind } => {
                let pages = Self::mask_of(pages)?;
                self.request(env, id, pages, kind, out);
            }
            Event::Invalidate { id, pages, kind } => {
                let pages = Self::mask_of(pages)?;
                self.invalidate(env, id, pages, kind, out);
            }
            Event::Advise { pages, advice } => {
                let pages = Self::mask_of(pages)?;
                let s = &mut self.state;
                match advice {
                    Advice::PreferredLocation(loc) => s.set_preferred(pages, loc),
                    Advice::ReadMostly(on) => toggle(&mut s.read_mostly, pages, on),
                    Advice::AccessedBy(d, on) => toggle(&mut s.accessed_by[d.index()], pages, on),
                }
            }
            Event::Complete { op, result } => self.complete(env, op, result, out)?,
        }
        self.advance(env, out);
        // With a test mutant on, the model checker must find the breakage itself.
        if cfg!(debug_assertions) && !env.topology.has_mutation() {
            if let Err(v) = self.check(env.topology) {
                panic!("protocol invariant broken after {event:?}: {v}");
            }
        }
        Ok(())
    }

    fn request(
        &mut self,
        env: &mut Env<'_>,
        id: ReqId,
        mut pages: PageMask<W>,
        kind: RequestKind,
        out: &mut Vec<Action>,
    ) {
        let topo = env.topology;
        let known = |d: DeviceId| topo.kind(d).is_some();
        let known_mem = |m: Mem| m.device().is_none_or(known);
        let work = match kind {
            RequestKind::Fault { proc, access } => {
                if let Proc::Device(d) = proc {
                    if !known(d) {
                        return reject(out, id, RequestError::NoDevice);
                    }
                } else if access == Access::Atomic {
                    return reject(out, id, RequestError::InvalidAccess);
                }
                Work::Fault(proc, access)
            }
            RequestKind::MapRemote { dev, access } if known(dev) => Work::MapRemote(dev, access),
            RequestKind::Migrate { dst } if known_mem(dst) => Work::Migrate(dst),
            RequestKind::Evict {
                dev,
                pages: n,
                write_back,
            } if known(dev) => {
                let s = &self.state;
                pages = (s.frames[dev.index()] & (pages - s.busy - s.writeback)).first_n(n);
                Work::Evict(dev, write_back)
            }
            RequestKind::Release { dev } if known(dev) => Work::Release(dev),
            RequestKind::Flush => Work::Flush,
            _ => return reject(out, id, RequestError::NoDevice),
        };
        self.requests.push(Pending {
            id,
            work,
            pages,
            extra: PageMask::EMPTY,
            written: PageMask::EMPTY,
            error: None,
        });
    }

    fn invalidate(
        &mut self,
        env: &mut Env<'_>,
        id: ReqId,
        pages: PageMask<W>,
        kind: Invalidation,
        out: &mut Vec<Action>,
    ) {
        // Mappings go first and at once, as an MMU notifier would tear them down.
        let s = &mut self.state;
        match kind {
            Invalidation::Unmap => {
                s.vma -= pages;
                s.prot_read -= pages;
                s.prot_write -= pages;
            }
            Invalidation::Truncate => s.eof |= pages,
            Invalidation::Discard => {}
            // Clean from here on, as `Truncate` puts pages past the end: no request older than
            // this one (a flush, a drop, an eviction waiting for the pages) writes them back,
            // since the file's copy is to win.
            Invalidation::Revert => s.dirty -= pages,
            Invalidation::Extend => {
                // Nothing beyond the end is mapped (invariant), so nothing to tear down; the
                // pages become the file's again in arrival order (`Work::Extend`).
                return self.requests.push(Pending {
                    id,
                    work: Work::Extend,
                    pages,
                    extra: PageMask::EMPTY,
                    written: PageMask::EMPTY,
                    error: None,
                });
            }
            Invalidation::Protect { read, write } => {
                toggle(&mut s.prot_read, pages, read);
                toggle(&mut s.prot_write, pages, write);
                for p in procs(env.topology) {
                    if !read {
                        self.unmap(p, pages, out);
                    } else if !write {
                        self.protect(p, pages, out);
                    }
                }
                return out.push(Action::Complete { id, result: Ok(()) });
            }
        }
        for p in procs(env.topology) {
            self.unmap(p, pages, out);
        }
        self.requests.push(Pending {
            id,
            work: Work::Drop(kind),
            pages,
            extra: PageMask::EMPTY,
            written: PageMask::EMPTY,
            error: None,
        });
    }

    fn complete(
        &mut self,
        env: &mut Env<'_>,
        op: OpId,
        result: Result<(), OpError>,
        out: &mut Vec<Action>,
    ) -> Result<(), EventError> {
        let inflight = self
            .ops
            .get_mut(op.slot())
            .and_then(Option::take)
            .ok_or(EventError::UnknownOp(op))?;
        while self.ops.last().is_some_and(Option::is_none) {
            self.ops.pop();
        }
        let pages = inflight.pages;
        let s = &mut self.state;
        let (error, written) = match (inflight.kind, result) {
            (OpKind::Fill(dst), Ok(())) => {
                s.valid[dst.index()] |= pages;
                s.busy -= pages;
                (None, PageMask::EMPTY)
            }
            (OpKind::Fill(dst), Err(e)) => {
                s.busy -= pages;
                if let Mem::Device(d) = dst {
                    let fresh = pages & (s.frames[d.index()] - s.valid[dst.index()]);
                    self.free_frames(env, d, fresh, out);
                }
                (Some(e), PageMask::EMPTY)
            }
            (OpKind::WriteBack, result) => {
                s.writeback -= pages;
                match result {
                    Ok(()) => s.dirty -= pages,
                    Err(e) => self.wb_error = Some(e),
                }
                (result.err(), pages)
            }
        };
        let owner = inflight.owner;
        if let Some(r) = self.requests.iter_mut().find(|r| Some(r.id) == owner) {
            r.written |= written;
            // An eviction's failed writeback is not its failure: it copies the page instead,
            // and the error waits in `wb_error` for the next flush.
            let evicting = matches!(r.work, Work::Evict(..)) && inflight.kind == OpKind::WriteBack;
            if let Some(e) = error.filter(|_| !evicting) {
                r.error.get_or_insert(RequestError::Op(e));
            }
        }
        Ok(())
    }

    /// Lets every pending request act, oldest first, each on the pages no older one covers.
    fn advance(&mut self, env: &mut Env<'_>, out: &mut Vec<Action>) {
        let mut claimed = PageMask::EMPTY;
        let mut i = 0;
        while i < self.requests.len() {
            let mut req = self.requests[i];
            match self.step(env, &mut req, claimed, out) {
                Some(result) => {
                    self.requests.remove(i);
                    for op in self.ops.iter_mut().flatten() {
                        if op.owner == Some(req.id) {
                            op.owner = None;
                        }
                    }
                    out.push(Action::Complete { id: req.id, result });
                }
                None => {
                    claimed |= req.pages | req.extra;
                    self.requests[i] = req;
                    i += 1;
                }
            }
        }
    }

    fn step(
        &mut self,
        env: &mut Env<'_>,
        req: &mut Pending<W>,
        claimed: PageMask<W>,
        out: &mut Vec<Action>,
    ) -> Step {
        let s = &self.state;
        let blocked = s.busy | s.writeback;
        let free = req.pages - claimed - blocked;
        match req.work {
            Work::Fault(proc, access) => {
                self.step_fault(env, req, proc, access, false, claimed, out)
            }
            Work::MapRemote(d, access) => {
                self.step_fault(env, req, Proc::Device(d), access, true, claimed, out)
            }
            Work::Migrate(dst) => {
                if let Some(e) = req.error.or(self.access_error(req.pages, Access::Read)) {
                    return Some(Err(e));
                }
                let s = &self.state;
                let have = free & s.valid[dst.index()];
                self.collapse(env, dst, have - s.read_mostly, out);
                let need = free - self.state.valid[dst.index()];
                if let Err(e) = self.fill(env, req.id, dst, need, out) {
                    return Some(Err(e));
                }
                let s = &self.state;
                let moved = (req.pages - s.valid_elsewhere(dst)) | s.read_mostly;
                done_if(req.pages.is_subset(&(s.valid[dst.index()] & moved)))
            }
            Work::Evict(dev, write_back) => {
                if let Some(e) = req.error {
                    return Some(Err(e));
                }
                let write_back = write_back.then_some(req.written);
                if let Err(e) = self.evict(env, req.id, dev, free, write_back, out) {
                    return Some(Err(e));
                }
                done_if(!req.pages.intersects(&self.state.frames[dev.index()]))
            }
            Work::Release(dev) => {
                if let Some(e) = req.error {
                    return Some(Err(e));
                }
                self.unmap(Proc::Device(dev), req.pages - claimed, out);
                if let Err(e) = self.evict(env, req.id, dev, free, None, out) {
                    return Some(Err(e));
                }
                let s = &self.state;
                let held = s.frames[dev.index()] | s.mapped(Proc::Device(dev));
                done_if(!req.pages.intersects(&held))
            }
            Work::Flush => {
                let s = &self.state;
                let todo = free & (s.dirty - s.eof - req.written);
                self.write_back(env, req.id, todo, out);
                let s = &self.state;
                let left = req.pages & (s.dirty - s.eof - req.written) | req.pages & s.writeback;
                if !left.is_empty() {
                    return None;
                }
                // Report this flush's own failure, else an older one not yet reported, once.
                let err = self.wb_error.take();
                Some(match req.error.or(err.map(RequestError::Op)) {
                    Some(e) => Err(e),
                    None => Ok(()),
                })
            }
            Work::Extend => {
                // After every earlier request on the pages (the truncation's drop, a flush
                // that skips them as beyond the end), and with no transfer or writeback on
                // them: otherwise a dirty page truncated but not yet dropped would count as
                // the file's again, and be written over what the file grew with.
                let extend_at_once = env.topology.mutated(Mutation::ExtendAtOnce);
                if free != req.pages && !extend_at_once {
                    return None;
                }
                self.state.eof -= req.pages;
                Some(Ok(()))
            }
            Work::Drop(kind) => {
                // All or nothing: the range's data goes at one instant, as with zap_page_range.
                if free != req.pages {
                    return None;
                }
                for p in procs(env.topology) {
                    self.unmap(p, free, out);
                }
                let s = &mut self.state;
                let keep = if matches!(kind, Invalidation::Truncate | Invalidation::Revert) {
                    s.dirty -= free;
                    PageMask::EMPTY
                } else {
                    free & s.dirty
                };
                for mem in mems(env.topology) {
                    self.drop_copies(env, mem, free - keep, out);
                }
                self.write_back(env, req.id, keep - req.written, out);
                let s = &self.state;
                let left = req.pages & (s.any_valid() - (s.dirty & req.written))
                    | req.pages & (s.busy | s.writeback);
                if !left.is_empty() {
                    return None;
                }
                Some(match req.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                })
            }
        }
    }

    /// The error an access to `pages` gets from the mapping itself, if any.
    fn access_error(&self, pages: PageMask<W>, access: Access) -> Option<RequestError> {
        let s = &self.state;
        if !pages.is_subset(&s.vma) {
            Some(RequestError::NoMapping)
        } else if pages.intersects(&s.eof) {
            Some(RequestError::BeyondEof)
        } else if !pages.is_subset(&s.prot_read) {
            Some(RequestError::NoAccess)
        } else if access != Access::Read && !pages.is_subset(&s.prot_write) {
            Some(RequestError::ReadOnly)
        } else {
            None
        }
    }

    fn satisfied(&self, proc: Proc, access: Access) -> PageMask<W> {
        match access {
            Access::Read => self.state.mapped(proc),
            Access::Write => self.state.writable(proc),
            Access::Atomic => self.state.exclusive(proc),
        }
    }

    /// A fault, or with `remote` a `MapRemote` (a device only).
    #[allow(clippy::too_many_arguments)]
    fn step_fault(
        &mut self,
        env: &mut Env<'_>,
        req: &mut Pending<W>,
        proc: Proc,
        access: Access,
        remote: bool,
        claimed: PageMask<W>,
        out: &mut Vec<Action>,
    ) -> Step {
        if let Some(e) = req.error.or(self.access_error(req.pages, access)) {
            return Some(Err(e));
        }
        let s = &self.state;
        // Fault-around pages that stopped being accessible are simply no longer wanted.
        req.extra &= s.vma & (s.prot_read - s.eof);
        let blocked = s.busy | s.writeback;
        let main = req.pages - self.satisfied(proc, access) - claimed - blocked;
        let extra = req.extra - s.mapped(proc) - claimed - blocked;
        let result = match proc {
            Proc::Cpu => self
                .cpu_fault(env, req, main, access, claimed, out)
                .and_then(|()| self.cpu_fault(env, req, extra, Access::Read, claimed, out)),
            Proc::Device(d) => self.device_fault(env, req.id, d, main, access, remote, out),
        };
        if let Err(e) = result {
            return Some(Err(e));
        }
        let s = &self.state;
        let unsatisfied = (req.pages - self.satisfied(proc, access)) | (req.extra - s.mapped(proc));
        done_if(unsatisfied.is_empty())
    }

    /// CPU fault on `todo`: map system memory or a coherent device's memory directly, or bring
    /// the data to system memory first (`migrate_to_ram`, zero fill, file read).
    fn cpu_fault(
        &mut self,
        env: &mut Env<'_>,
        req: &mut Pending<W>,
        todo: PageMask<W>,
        access: Access,
        claimed: PageMask<W>,
        out: &mut Vec<Action>,
    ) -> Result<(), RequestError> {
        if todo.is_empty() {
            return Ok(());
        }
        let topo = env.topology;
        // Any CPU access revokes device atomics (make_device_exclusive semantics).
        for d in topo.devices() {
            self.unmap(
                Proc::Device(d),
                todo & self.state.exclusive(Proc::Device(d)),
                out,
            );
        }
        let in_sys = todo & self.state.valid[Mem::System.index()];
        self.map_copy(env, Proc::Cpu, Mem::System, in_sys, access, out);
        let mut rest = todo - in_sys;
        for d in topo.devices() {
            if topo.is_coherent(d) || topo.mutated(Mutation::MapPrivateOnCpu) {
                let direct = rest & self.state.valid[Mem::Device(d).index()];
                self.map_copy(env, Proc::Cpu, Mem::Device(d), direct, access, out);
                rest -= direct;
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        // Fault-around: neighbours in the aligned window that only need a fill from nothing.
        let s = &self.state;
        let window = fault_around_window(rest, env.topology.policy.cpu_fault_around);
        let around =
            (window - claimed - s.busy - s.writeback - s.any_valid() - s.mapped(Proc::Cpu))
                & s.vma
                & (s.prot_read - s.eof - req.pages);
        req.extra |= around;
        self.fill(env, req.id, Mem::System, rest | around, out)
    }

    /// Device fault: map the local copy, or system memory remotely when advice says so (or,
    /// with `remote_placement`, whenever the device holds no copy); fill the target first if it
    /// has no copy.
    #[allow(clippy::too_many_arguments)]
    fn device_fault(
        &mut self,
        env: &mut Env<'_>,
        owner: ReqId,
        d: DeviceId,
        todo: PageMask<W>,
        access: Access,
        remote_placement: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), RequestError> {
        if todo.is_empty() {
            return Ok(());
        }
        let s = &self.state;
        let sys = s.valid[Mem::System.index()];
        let remote = if remote_placement {
            todo - s.valid[Mem::Device(d).index()]
        } else {
            todo & (s.preferred_is(Some(Mem::System)) | s.accessed_by[d.index()] & sys)
        };
        let local = todo - remote;
        let p = Proc::Device(d);
        for (target, pages) in [(Mem::System, remote), (Mem::Device(d), local)] {
            let have = pages & self.state.valid[target.index()];
            self.map_copy(env, p, target, have, access, out);
            self.fill(env, owner, target, pages - have, out)?;
        }
        Ok(())
    }

    /// Maps `proc` to `target`'s valid copy of `pages` for `access`: collapses other copies
    /// unless a read of a read-mostly page, revokes conflicting mappings, marks file pages dirty
    /// on write.
    fn map_copy(
        &mut self,
        env: &mut Env<'_>,
        proc: Proc,
        target: Mem,
        pages: PageMask<W>,
        access: Access,
        out: &mut Vec<Action>,
    ) {
        if pages.is_empty() {
            return;
        }
        let collapse = match access {
            Access::Read => pages - self.state.read_mostly,
            Access::Write | Access::Atomic => pages,
        };
        self.collapse(env, target, collapse, out);
        for q in procs(env.topology).filter(|&q| q != proc) {
            let revoke = match access {
                Access::Atomic => pages,
                _ => pages & self.state.exclusive(q),
            };
            self.unmap(q, revoke, out);
        }
        let s = &mut self.state;
        let (rw, mode) = match access {
            Access::Atomic => (pages, MapMode::Exclusive),
            Access::Write => (pages, MapMode::ReadWrite),
            // A read maps writable when that cannot hide a write: sole copy, writes allowed, and
            // not a clean file page (its first write must fault to mark it dirty).
            Access::Read => (
                (pages - s.valid_elsewhere(target)) & (s.prot_write - (s.file - s.dirty)),
                MapMode::ReadWrite,
            ),
        };
        if access != Access::Read {
            s.dirty |= pages & s.file;
        }
        self.map(proc, target, pages - rw, MapMode::Read, out);
        self.map(proc, target, rw, mode, out);
    }

    /// Frees `dev`'s copies of `pages`, copying sole copies to system memory first. A clean
    /// file page needs no copy: the file holds the same data, and the next access reads it
    /// again (so a scan of a file larger than device memory never copies back). With
    /// `write_back` (the pages this request has already tried to write), a dirty file page is
    /// written back from the device instead, and dropped at a later step once clean; one whose
    /// writeback failed is copied.
    fn evict(
        &mut self,
        env: &mut Env<'_>,
        owner: ReqId,
        dev: DeviceId,
        pages: PageMask<W>,
        write_back: Option<PageMask<W>>,
        out: &mut Vec<Action>,
    ) -> Result<(), RequestError> {
        let mem = Mem::Device(dev);
        let s = &self.state;
        let mut on_dev = pages & s.valid[mem.index()];
        let mut sole = on_dev - s.valid_elsewhere(mem);
        let drop_dirty = env.topology.mutated(Mutation::DropDirtyOnEvict);
        if let Some(tried) = write_back.filter(|_| !drop_dirty) {
            let todo = sole & ((s.file & s.dirty) - s.eof - tried);
            self.write_back(env, owner, todo, out);
            on_dev -= todo;
            sole -= todo;
        }
        let s = &self.state;
        sole -= s.file - s.dirty - s.writeback;
        if drop_dirty {
            sole -= s.dirty;
        }
        self.drop_copies(env, mem, on_dev - sole, out);
        self.fill(env, owner, Mem::System, sole, out)
    }

    /// Keeps only `target`'s copy of `pages`.
    fn collapse(
        &mut self,
        env: &mut Env<'_>,
        target: Mem,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) {
        for mem in mems(env.topology).filter(|&m| m != target) {
            self.drop_copies(env, mem, pages, out);
        }
    }

    /// Invalidates every mapping of `mem`'s copy of `pages`, then forgets and frees that copy.
    fn drop_copies(
        &mut self,
        env: &mut Env<'_>,
        mem: Mem,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) {
        let pages = pages & self.state.valid[mem.index()];
        if pages.is_empty() {
            return;
        }
        let skip_device_invalidation =
            mem.device().is_some() && env.topology.mutated(Mutation::SkipInvalidation);
        for p in procs(env.topology) {
            if skip_device_invalidation && p != Proc::Cpu {
                continue;
            }
            let stale = pages & self.state.mapped_to(p, mem);
            self.unmap(p, stale, out);
        }
        self.state.valid[mem.index()] -= pages;
        match mem {
            Mem::System => emit(out, pages, |run| Action::FreeFrames { mem, run }),
            Mem::Device(d) => self.free_frames(env, d, pages, out),
        }
    }

    fn free_frames(
        &mut self,
        env: &mut Env<'_>,
        d: DeviceId,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) {
        if pages.is_empty() {
            return;
        }
        self.state.frames[d.index()] -= pages;
        env.frames.release(d, pages.count());
        emit(out, pages, |run| Action::FreeFrames {
            mem: Mem::Device(d),
            run,
        });
    }

    /// Starts transfers that make `dst` hold the latest data of `pages` (which it lacks), from
    /// another memory, zeros or the file. Writers are downgraded first so the copy is not torn.
    fn fill(
        &mut self,
        env: &mut Env<'_>,
        owner: ReqId,
        dst: Mem,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) -> Result<(), RequestError> {
        if pages.is_empty() {
            return Ok(());
        }
        if let Mem::Device(d) = dst {
            let fresh = pages - self.state.frames[d.index()];
            if !fresh.is_empty() {
                if !env.frames.try_reserve(d, fresh.count()) {
                    return Err(RequestError::DeviceFull(d));
                }
                self.state.frames[d.index()] |= fresh;
                emit(out, fresh, |run| Action::AllocFrames { dev: d, run });
            }
        }
        for p in procs(env.topology) {
            self.protect(p, pages, out);
        }
        let mut left = pages;
        for src in mems(env.topology).filter(|&m| m != dst) {
            let from = left & self.state.valid[src.index()];
            left -= from;
            self.start_transfer(owner, Source::Mem(src), dst, from, out);
        }
        let file = left & self.state.file;
        self.start_transfer(owner, Source::Zero, dst, left - file, out);
        self.start_transfer(owner, Source::File { file_page: 0 }, dst, file, out);
        self.state.busy |= pages;
        Ok(())
    }

    fn start_transfer(
        &mut self,
        owner: ReqId,
        src: Source,
        dst: Mem,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) {
        if pages.is_empty() {
            return;
        }
        let op = self.start_op(owner, OpKind::Fill(dst), pages);
        let base = self.file_page;
        emit(out, pages, |run| Action::Transfer {
            op,
            src: match src {
                Source::File { .. } => Source::File {
                    file_page: base + run.start() as u64,
                },
                other => other,
            },
            dst,
            run,
        });
    }

    /// Starts writebacks of the dirty `pages`, from system memory where it holds a copy.
    fn write_back(
        &mut self,
        env: &mut Env<'_>,
        owner: ReqId,
        pages: PageMask<W>,
        out: &mut Vec<Action>,
    ) {
        if pages.is_empty() {
            return;
        }
        for p in procs(env.topology) {
            self.protect(p, pages, out);
        }
        let mut left = pages;
        for src in mems(env.topology) {
            let from = left & self.state.valid[src.index()];
            left -= from;
            if from.is_empty() {
                continue;
            }
            let op = self.start_op(owner, OpKind::WriteBack, from);
            let base = self.file_page;
            emit(out, from, |run| Action::WriteBack {
                op,
                src,
                run,
                file_page: base + run.start() as u64,
            });
        }
        self.state.writeback |= pages;
    }

    fn start_op(&mut self, owner: ReqId, kind: OpKind, pages: PageMask<W>) -> OpId {
        let op = Some(Inflight {
            owner: Some(owner),
            kind,
            pages,
        });
        let slot = match self.ops.iter().position(Option::is_none) {
            Some(i) => {
                self.ops[i] = op;
                i
            }
            None => {
                self.ops.push(op);
                self.ops.len() - 1
            }
        };
        OpId(slot as u16)
    }

    fn unmap(&mut self, p: Proc, pages: PageMask<W>, out: &mut Vec<Action>) {
        let pages = pages & self.state.mapped(p);
        if pages.is_empty() {
            return;
        }
        match p {
            Proc::Cpu => {
                emit(out, pages, |run| Action::CpuUnmap { run });
                for m in self.state.cpu_on.iter_mut() {
                    *m -= pages;
                }
            }
            Proc::Device(dev) => {
                emit(out, pages, |run| Action::DeviceUnmap { dev, run });
                self.state.remote[dev.index()] -= pages;
            }
        }
        self.state.set_mode(p, pages, None);
    }

    /// Downgrades `p`'s writable mappings of `pages` (exclusive included) to read-only.
    fn protect(&mut self, p: Proc, pages: PageMask<W>, out: &mut Vec<Action>) {
        let pages = pages & self.state.writable(p);
        if pages.is_empty() {
            return;
        }
        match p {
            Proc::Cpu => emit(out, pages, |run| Action::CpuProtect { run }),
            Proc::Device(dev) => emit(out, pages, |run| Action::DeviceProtect { dev, run }),
        }
        self.state.set_mode(p, pages, Some(MapMode::Read));
    }

    /// Maps `p` to `target` with `mode`, first unmapping pages it maps elsewhere.
    fn map(
        &mut self,
        p: Proc,
        target: Mem,
        pages: PageMask<W>,
        mode: MapMode,
        out: &mut Vec<Action>,
    ) {
        if pages.is_empty() {
            return;
        }
        let elsewhere = self.state.mapped(p) - self.state.mapped_to(p, target);
        self.unmap(p, pages & elsewhere, out);
        let pages = pages - self.state.mapped_as(p, mode);
        if pages.is_empty() {
            return;
        }
        match p {
            Proc::Cpu => {
                emit(out, pages, |run| Action::CpuMap { target, run, mode });
                if let Mem::Device(d) = target {
                    self.state.cpu_on[d.index()] |= pages;
                }
            }
            Proc::Device(dev) => {
                let remote = target == Mem::System;
                emit(out, pages, |run| Action::DeviceMap {
                    dev,
                    run,
                    remote,
                    mode,
                });
                if remote {
                    self.state.remote[dev.index()] |= pages;
                }
            }
        }
        self.state.set_mode(p, pages, Some(mode));
    }
}

fn done_if(done: bool) -> Step {
    done.then_some(Ok(()))
}

fn reject(out: &mut Vec<Action>, id: ReqId, e: RequestError) {
    out.push(Action::Complete { id, result: Err(e) });
}

fn toggle<const W: usize>(plane: &mut PageMask<W>, pages: PageMask<W>, on: bool) {
    if on {
        *plane |= pages
    } else {
        *plane -= pages
    }
}

fn emit<const W: usize>(out: &mut Vec<Action>, pages: PageMask<W>, f: impl Fn(PageRun) -> Action) {
    out.extend(pages.runs().map(f));
}

fn procs(topo: &Topology) -> impl Iterator<Item = Proc> + Clone + '_ {
    std::iter::once(Proc::Cpu).chain(topo.devices().map(Proc::Device))
}

fn mems(topo: &Topology) -> impl Iterator<Item = Mem> + Clone + '_ {
    std::iter::once(Mem::System).chain(topo.devices().map(Mem::Device))
}

/// The aligned window(s) of `size` pages around `pages`.
fn fault_around_window<const W: usize>(pages: PageMask<W>, size: u16) -> PageMask<W> {
    let size = (size.max(1) as usize).next_power_of_two();
    let mut w = PageMask::EMPTY;
    for run in pages.runs() {
        let start = run.start() / size * size;
        let end = run.end().div_ceil(size) * size;
        w.insert_range(start, end);
    }
    w
}
