//! A simulated machine that executes the engine's actions on versioned data.

use crate::action::{Action, MapMode, Source};
use crate::block::Block;
use crate::config::{DeviceKind, Topology};
use crate::ids::{Mem, OpId, Proc, MAX_MEMS, MAX_PROCS};

/// Content of a frame that holds no data (never filled, or freed).
pub const POISON: u32 = u32::MAX;

/// A check that failed; `what` names the invariant.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Violation {
    /// Which invariant.
    pub what: String,
}

impl Violation {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}

/// A pending asynchronous step: the data it carries was read when it was issued, so a write
/// that races with the copy is lost here exactly as it would be on real hardware.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum InFlight {
    Fill { dst: Mem, page: usize, value: u32 },
    WriteBack { page: usize, value: u32 },
}

/// Physical state for the first `pages` pages of one block.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Machine {
    pages: usize,
    file_page: u64,
    /// `mem[m * pages + p]`: version held by memory `m`'s frame of page `p`.
    mem: Vec<u32>,
    /// Device frame bound (system memory is always there).
    bound: Vec<bool>,
    /// `maps[proc * pages + p]`.
    maps: Vec<Option<(MapMode, Mem)>>,
    /// File contents per page.
    pub(crate) file: Vec<u32>,
    /// The last value written per page: the oracle.
    pub(crate) latest: Vec<u32>,
    /// Pages no longer managed (munmapped or truncated): their data is nobody's business.
    pub(crate) gone: Vec<bool>,
    /// Pages whose revert (`Invalidate { Revert }`) is pending: no writeback may start for
    /// them, since the file's copy is to win.
    pub(crate) reverting: Vec<bool>,
    in_flight: Vec<(OpId, InFlight)>,
}

impl Machine {
    /// A machine whose file holds version 0 everywhere; anonymous pages read 0 (zeros).
    pub fn new(pages: usize, file_page: u64) -> Self {
        Self {
            pages,
            file_page,
            mem: vec![POISON; MAX_MEMS * pages],
            bound: vec![false; MAX_MEMS * pages],
            maps: vec![None; MAX_PROCS * pages],
            file: vec![0; pages],
            latest: vec![0; pages],
            gone: vec![false; pages],
            reverting: vec![false; pages],
            in_flight: Vec::new(),
        }
    }

    /// Pages simulated.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// `proc`'s mapping of `page`.
    pub fn mapping(&self, proc: Proc, page: usize) -> Option<(MapMode, Mem)> {
        self.maps[proc.index() * self.pages + page]
    }

    /// The value `proc` reads from `page` through its mapping.
    pub fn read(&self, proc: Proc, page: usize) -> Option<u32> {
        self.mapping(proc, page)
            .map(|(_, m)| self.mem[m.index() * self.pages + page])
    }

    /// The version in memory `m`'s copy of `page`.
    pub fn value(&self, m: Mem, page: usize) -> u32 {
        self.mem[m.index() * self.pages + page]
    }

    /// Writes `value` through `proc`'s mapping, which must be writable.
    pub fn write(&mut self, proc: Proc, page: usize, value: u32) -> Result<(), Violation> {
        match self.mapping(proc, page) {
            Some((MapMode::ReadWrite | MapMode::Exclusive, m)) => {
                self.mem[m.index() * self.pages + page] = value;
                self.latest[page] = value;
                Ok(())
            }
            other => Err(Violation::new(format!(
                "write by {proc:?} to page {page} through {other:?}"
            ))),
        }
    }

    /// Another process writes `value` to the file's page `page`: the new truth. hetmem must
    /// hold no copy then (a lease break made it write back and drop them); a cached copy left
    /// behind would be stale, which `check_block` reports.
    pub fn external_write(&mut self, page: usize, value: u32) {
        self.file[page] = value;
        self.latest[page] = value;
    }

    /// Executes one action and checks the invariants that must hold between any two actions.
    pub fn apply(&mut self, topo: &Topology, action: &Action) -> Result<(), Violation> {
        let n = self.pages;
        match *action {
            Action::AllocFrames { dev, run } => {
                for p in run.pages().take_while(|&p| p < n) {
                    let i = Mem::Device(dev).index() * n + p;
                    if self.bound[i] {
                        return Err(Violation::new(format!(
                            "{dev:?} frame of page {p} bound twice"
                        )));
                    }
                    self.bound[i] = true;
                    self.mem[i] = POISON;
                }
            }
            Action::FreeFrames { mem, run } => {
                for p in run.pages().take_while(|&p| p < n) {
                    if let Some(proc) = self.mapper_of(mem, p) {
                        return Err(Violation::new(format!(
                            "{mem:?} copy of page {p} freed while {proc:?} maps it"
                        )));
                    }
                    let i = mem.index() * n + p;
                    if mem != Mem::System && !self.bound[i] {
                        return Err(Violation::new(format!(
                            "{mem:?} frame of page {p} freed twice"
                        )));
                    }
                    self.bound[i] = false;
                    self.mem[i] = POISON;
                }
            }
            Action::Transfer { op, src, dst, run } => {
                for p in run.pages().take_while(|&p| p < n) {
                    self.require_frame(dst, p)?;
                    let value = match src {
                        Source::Mem(m) => {
                            self.require_frame(m, p)?;
                            self.value(m, p)
                        }
                        Source::Zero => 0,
                        Source::File { file_page } => {
                            self.require_file_page(file_page, run.start(), p)?;
                            self.file[p]
                        }
                    };
                    self.in_flight.push((
                        op,
                        InFlight::Fill {
                            dst,
                            page: p,
                            value,
                        },
                    ));
                }
            }
            Action::WriteBack {
                op,
                src,
                run,
                file_page,
            } => {
                for p in run.pages().take_while(|&p| p < n) {
                    if self.reverting[p] {
                        return Err(Violation::new(format!(
                            "page {p} is written back after its revert: ours over the file's"
                        )));
                    }
                    self.require_frame(src, p)?;
                    self.require_file_page(file_page, run.start(), p)?;
                    let value = self.value(src, p);
                    self.in_flight
                        .push((op, InFlight::WriteBack { page: p, value }));
                }
            }
            Action::CpuMap { target, run, mode } => {
                if let Mem::Device(d) = target {
                    if topo.kind(d) != Some(DeviceKind::Coherent) {
                        return Err(Violation::new(format!(
                            "CPU maps private memory of {d:?} (page {})",
                            run.start()
                        )));
                    }
                }
                if mode == MapMode::Exclusive {
                    return Err(Violation::new("CPU mapped exclusive"));
                }
                for p in run.pages().take_while(|&p| p < n) {
                    self.require_frame(target, p)?;
                    self.set_map(Proc::Cpu, p, Some((mode, target)));
                }
            }
            Action::DeviceMap {
                dev,
                run,
                remote,
                mode,
            } => {
                let target = if remote {
                    Mem::System
                } else {
                    Mem::Device(dev)
                };
                for p in run.pages().take_while(|&p| p < n) {
                    self.require_frame(target, p)?;
                    self.set_map(Proc::Device(dev), p, Some((mode, target)));
                }
            }
            Action::CpuProtect { run } => self.downgrade(Proc::Cpu, run.pages())?,
            Action::DeviceProtect { dev, run } => self.downgrade(Proc::Device(dev), run.pages())?,
            Action::CpuUnmap { run } => self.unmap(Proc::Cpu, run.pages())?,
            Action::DeviceUnmap { dev, run } => self.unmap(Proc::Device(dev), run.pages())?,
            Action::Complete { .. } => {}
        }
        self.check_mappings()
    }

    fn require_frame(&self, m: Mem, p: usize) -> Result<(), Violation> {
        if m == Mem::System || self.bound[m.index() * self.pages + p] {
            Ok(())
        } else {
            Err(Violation::new(format!("{m:?} has no frame for page {p}")))
        }
    }

    fn require_file_page(
        &self,
        file_page: u64,
        run_start: usize,
        p: usize,
    ) -> Result<(), Violation> {
        if file_page != self.file_page + run_start as u64 {
            return Err(Violation::new(format!("wrong file offset for page {p}")));
        }
        Ok(())
    }

    fn set_map(&mut self, proc: Proc, p: usize, m: Option<(MapMode, Mem)>) {
        self.maps[proc.index() * self.pages + p] = m;
    }

    fn downgrade(&mut self, proc: Proc, pages: std::ops::Range<usize>) -> Result<(), Violation> {
        let n = self.pages;
        for p in pages.take_while(|&p| p < n) {
            match self.mapping(proc, p) {
                Some((_, m)) => self.set_map(proc, p, Some((MapMode::Read, m))),
                None => {
                    return Err(Violation::new(format!(
                        "protect of unmapped page {p} of {proc:?}"
                    )))
                }
            }
        }
        Ok(())
    }

    fn unmap(&mut self, proc: Proc, pages: std::ops::Range<usize>) -> Result<(), Violation> {
        let n = self.pages;
        for p in pages.take_while(|&p| p < n) {
            if self.mapping(proc, p).is_none() {
                return Err(Violation::new(format!(
                    "unmap of unmapped page {p} of {proc:?}"
                )));
            }
            self.set_map(proc, p, None);
        }
        Ok(())
    }

    fn mapper_of(&self, mem: Mem, p: usize) -> Option<Proc> {
        all_procs().find(|&proc| matches!(self.mapping(proc, p), Some((_, m)) if m == mem))
    }

    /// Between any two actions: every mapping reads the latest value; a writer's copy is shared
    /// by every mapping of the page; an exclusive mapping is alone.
    fn check_mappings(&self) -> Result<(), Violation> {
        for p in (0..self.pages).filter(|&p| !self.gone[p]) {
            let mut target = None;
            let (mut writers, mut exclusive, mut mappers) = (0, 0, 0);
            for proc in all_procs() {
                let Some((mode, m)) = self.mapping(proc, p) else {
                    continue;
                };
                mappers += 1;
                if self.value(m, p) != self.latest[p] {
                    return Err(Violation::new(format!(
                        "{proc:?} maps {m:?} copy of page {p} holding {} but the latest is {}",
                        self.value(m, p),
                        self.latest[p]
                    )));
                }
                writers += usize::from(mode != MapMode::Read);
                exclusive += usize::from(mode == MapMode::Exclusive);
                if *target.get_or_insert(m) != m && writers > 0 {
                    return Err(Violation::new(format!(
                        "page {p} has a writer while mappings target two copies"
                    )));
                }
            }
            if writers > 0 && self.mapped_targets(p) > 1 {
                return Err(Violation::new(format!(
                    "page {p} has a writer while mappings target two copies"
                )));
            }
            if exclusive > 0 && mappers > 1 {
                return Err(Violation::new(format!(
                    "exclusive mapping of page {p} is shared"
                )));
            }
        }
        Ok(())
    }

    fn mapped_targets(&self, p: usize) -> usize {
        let mut seen = [false; MAX_MEMS];
        for proc in all_procs() {
            if let Some((_, m)) = self.mapping(proc, p) {
                seen[m.index()] = true;
            }
        }
        seen.iter().filter(|&&b| b).count()
    }

    /// Lands (on success) or discards the data of `op`.
    pub fn complete(&mut self, op: OpId, ok: bool) {
        let n = self.pages;
        let mut keep = Vec::with_capacity(self.in_flight.len());
        for (id, f) in self.in_flight.drain(..) {
            if id != op {
                keep.push((id, f));
                continue;
            }
            if ok {
                match f {
                    InFlight::Fill { dst, page, value } => self.mem[dst.index() * n + page] = value,
                    InFlight::WriteBack { page, value } => self.file[page] = value,
                }
            }
        }
        self.in_flight = keep;
    }

    /// Cross-checks the engine's view of this block against the machine, after an event.
    pub fn check_block<const W: usize>(
        &self,
        topo: &Topology,
        block: &Block<W>,
    ) -> Result<(), Violation> {
        if let Err(v) = block.check(topo) {
            return Err(Violation::new(format!("engine invariant: {v}")));
        }
        for p in 0..self.pages {
            let view = block.page(p);
            for d in topo.devices() {
                let m = Mem::Device(d);
                let frame = self.bound[m.index() * self.pages + p];
                if frame != block.state().frames[d.index()].contains(p) {
                    return Err(Violation::new(format!(
                        "{m:?} frame of page {p}: engine and machine disagree"
                    )));
                }
            }
            for proc in all_procs() {
                let engine = view.mapping_of(proc);
                if engine != self.mapping(proc, p) {
                    return Err(Violation::new(format!(
                        "{proc:?} mapping of page {p}: engine says {engine:?}, machine has {:?}",
                        self.mapping(proc, p)
                    )));
                }
            }
            if self.gone[p] {
                continue;
            }
            let mut any = false;
            for m in (0..MAX_MEMS).filter_map(Mem::from_index) {
                if view.is_valid_in(m) {
                    any = true;
                    if self.value(m, p) != self.latest[p] {
                        return Err(Violation::new(format!(
                            "{m:?} copy of page {p} is called valid but holds {}, latest {}",
                            self.value(m, p),
                            self.latest[p]
                        )));
                    }
                }
            }
            let reference = if view.file { self.file[p] } else { 0 };
            if !any && reference != self.latest[p] {
                return Err(Violation::new(format!(
                    "latest value {} of page {p} exists nowhere (lost write)",
                    self.latest[p]
                )));
            }
            if view.file && !view.dirty && self.file[p] != self.latest[p] {
                return Err(Violation::new(format!(
                    "page {p} is clean but the file holds {}, latest {}",
                    self.file[p], self.latest[p]
                )));
            }
        }
        Ok(())
    }
}

fn all_procs() -> impl Iterator<Item = Proc> {
    (0..MAX_PROCS).map(|i| match i {
        0 => Proc::Cpu,
        _ => Proc::Device(crate::DeviceId::new(i - 1).expect("below MAX_PROCS")),
    })
}
