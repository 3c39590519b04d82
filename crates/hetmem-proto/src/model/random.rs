//! Randomized differential testing: long random sequences of accesses, requests, invalidations,
//! advice and op completions (in random order, some failing) over several blocks that share
//! device capacity. Every read is compared with a plain oracle: the last value written per page.
//! [`World`] also checks every action and event, as in the explorer.

use super::machine::Violation;
use super::world::{Completed, World};
use crate::action::MapMode;
use crate::bitmap::PageMask;
use crate::block::Layout;
use crate::config::{DeviceKind, Topology};
use crate::error::RequestError;
use crate::event::{Access, Advice, Event, Invalidation, OpError, RequestKind};
use crate::ids::{DeviceId, Mem, PageRun, Proc, ReqId};

/// What to run.
#[derive(Clone, Debug)]
pub struct RandomConfig {
    /// Seed of the event sequence.
    pub seed: u64,
    /// Events to feed.
    pub steps: u64,
    /// Blocks (each of 64 pages; `pages` of them used).
    pub blocks: usize,
    /// Pages used per block.
    pub pages: usize,
    /// Frames per device (shared by all blocks).
    pub capacity: u32,
    /// Chance, in 1/1000, that a completing op fails.
    pub failure_permille: u32,
    /// Keep a log of the last events, printed with a failure.
    pub trace: bool,
}

impl Default for RandomConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            steps: 1_000_000,
            blocks: 2,
            pages: 24,
            capacity: 20,
            failure_permille: 20,
            trace: false,
        }
    }
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct RandomReport {
    /// Events fed to blocks.
    pub events: u64,
    /// Reads compared with the oracle.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Fault requests issued.
    pub faults: u64,
    /// Ops completed, and how many of them failed.
    pub completions: u64,
    /// Injected failures.
    pub failures: u64,
    /// Requests that completed with an error.
    pub request_errors: u64,
    /// Accesses that faulted again because a later request revoked the fresh mapping.
    pub replays: u64,
    /// Reads that disagreed with the oracle (always 0 on success: a mismatch stops the run).
    pub mismatches: u64,
}

/// The first failure: the step and what broke.
#[derive(Clone, Debug)]
pub struct RandomFailure {
    /// Step at which it happened.
    pub step: u64,
    /// The broken check.
    pub violation: Violation,
    /// The last events and actions, if `trace` was on.
    pub log: Vec<String>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, no dependency.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, permille: u32) -> bool {
        self.next() % 1000 < u64::from(permille)
    }
}

/// An access waiting for its fault.
#[derive(Clone, Copy)]
struct Intent {
    id: ReqId,
    block: usize,
    page: usize,
    proc: Proc,
    access: Access,
}

/// The topology of the differential test: private, coherent, private.
pub fn three_devices() -> Topology {
    Topology::new(vec![
        DeviceKind::Private,
        DeviceKind::Coherent,
        DeviceKind::Private,
    ])
    .expect("3 devices")
}

struct Driver {
    topo: Topology,
    world: World<1>,
    oracle: Vec<Vec<u32>>,
    intents: Vec<Intent>,
    discards: Vec<(ReqId, usize, PageRun)>,
    rng: Rng,
    cfg: RandomConfig,
    report: RandomReport,
}

/// Runs `cfg` and returns its counters, or the first failure.
pub fn run(cfg: &RandomConfig) -> Result<RandomReport, RandomFailure> {
    let topo = three_devices();
    // Even blocks anonymous, odd blocks file-backed: both kinds share the devices.
    let layouts: Vec<Layout<1>> = (0..cfg.blocks)
        .map(|b| {
            if b % 2 == 0 {
                Layout::anonymous()
            } else {
                Layout::file(64 * b as u64)
            }
        })
        .collect();
    let capacity = vec![cfg.capacity; topo.device_count()];
    let mut d = Driver {
        world: World::new(&layouts, cfg.pages, &capacity),
        topo,
        oracle: vec![vec![0; cfg.pages]; cfg.blocks],
        intents: Vec::new(),
        discards: Vec::new(),
        rng: Rng(cfg.seed.max(1)),
        cfg: cfg.clone(),
        report: RandomReport::default(),
    };
    if cfg.trace {
        d.world.log = Some(Vec::new());
    }
    for step in 0..cfg.steps {
        if let Err(violation) = d.step() {
            let log = d.world.log.take().unwrap_or_default();
            let log = log[log.len().saturating_sub(400)..].to_vec();
            return Err(RandomFailure {
                step,
                violation,
                log,
            });
        }
        if let Some(log) = &mut d.world.log {
            if log.len() > 10_000 {
                log.drain(..5_000);
            }
        }
    }
    // Drain: everything in flight completes, every request finishes.
    for step in cfg.steps..cfg.steps + 100_000 {
        let ops = d.world.in_flight();
        let Some(&(b, op)) = ops.first() else { break };
        d.complete(b, op, Ok(()))
            .map_err(|violation| RandomFailure {
                step,
                violation,
                log: Vec::new(),
            })?;
    }
    let pending: usize = d.world.blocks.iter().map(|b| b.pending_requests()).sum();
    if pending != 0 {
        return Err(RandomFailure {
            step: cfg.steps,
            violation: Violation::new(format!("{pending} requests pending after draining")),
            log: Vec::new(),
        });
    }
    Ok(d.report)
}

impl Driver {
    fn procs(&self) -> Vec<Proc> {
        std::iter::once(Proc::Cpu)
            .chain(self.topo.devices().map(Proc::Device))
            .collect()
    }

    fn device(&mut self) -> DeviceId {
        DeviceId::new(self.rng.below(self.topo.device_count())).expect("device in topology")
    }

    fn run(&mut self) -> PageRun {
        let start = self.rng.below(self.cfg.pages);
        let len = 1 + self.rng.below((self.cfg.pages - start).min(16));
        PageRun::new(start, len, PageMask::<1>::PAGES).expect("run fits")
    }

    fn step(&mut self) -> Result<(), Violation> {
        let roll = self.rng.below(100);
        let b = self.rng.below(self.cfg.blocks);
        self.report.events += 1;
        match roll {
            0..=39 => self.access(b),
            40..=74 => {
                let ops = self.world.in_flight();
                if ops.is_empty() {
                    return self.access(b);
                }
                let (b, op) = ops[self.rng.below(ops.len())];
                let result = if self.rng.chance(self.cfg.failure_permille) {
                    self.report.failures += 1;
                    Err([OpError::Io, OpError::Device, OpError::NoSpace][self.rng.below(3)])
                } else {
                    Ok(())
                };
                self.complete(b, op, result)
            }
            75..=82 => {
                let dst = match self.rng.below(1 + self.topo.device_count()) {
                    0 => Mem::System,
                    i => Mem::Device(DeviceId::new(i - 1).expect("device")),
                };
                let run = self.run();
                self.request(b, run, RequestKind::Migrate { dst })
            }
            83..=86 => {
                let dev = self.device();
                let pages = 1 + self.rng.below(8) as u32;
                let write_back = self.rng.below(2) == 0;
                let kind = RequestKind::Evict {
                    dev,
                    pages,
                    write_back,
                };
                self.request(b, self.all(), kind)
            }
            87..=89 => self.request(b, self.all(), RequestKind::Flush),
            90 => {
                let dev = self.device();
                self.request(b, self.all(), RequestKind::Release { dev })
            }
            91..=92 => {
                let run = self.run();
                self.invalidate(b, run, Invalidation::Discard)
            }
            93..=94 => {
                let run = self.run();
                let write = self.rng.below(2) == 0;
                self.invalidate(b, run, Invalidation::Protect { read: true, write })
            }
            _ => {
                let run = self.run();
                let advice = match self.rng.below(4) {
                    0 => Advice::ReadMostly(self.rng.below(2) == 0),
                    1 => Advice::PreferredLocation(None),
                    2 => Advice::PreferredLocation(Some(Mem::System)),
                    _ => Advice::AccessedBy(self.device(), self.rng.below(2) == 0),
                };
                let mut done = Vec::new();
                self.world.event(
                    &self.topo,
                    b,
                    Event::Advise { pages: run, advice },
                    &mut done,
                )?;
                self.finish(done)
            }
        }
    }

    fn all(&self) -> PageRun {
        PageRun::new(0, self.cfg.pages, PageMask::<1>::PAGES).expect("pages fit")
    }

    /// A processor reads or writes a page: directly if mapped well enough, else through a fault.
    fn access(&mut self, b: usize) -> Result<(), Violation> {
        let page = self.rng.below(self.cfg.pages);
        let procs = self.procs();
        let proc = procs[self.rng.below(procs.len())];
        let access = match (self.rng.below(10), proc) {
            (0..=4, _) => Access::Read,
            (5, Proc::Device(_)) => Access::Atomic,
            _ => Access::Write,
        };
        if self.perform(b, page, proc, access)? {
            return Ok(());
        }
        if self.world.outstanding_count() >= 16 {
            return Ok(());
        }
        self.report.faults += 1;
        let run = World::<1>::page_run(page);
        let mut done = Vec::new();
        let id = self.world.request(
            &self.topo,
            b,
            run,
            match proc {
                // Now and then a device maps in place instead (a launch's remote placement).
                Proc::Device(dev) if access != Access::Atomic && self.rng.below(4) == 0 => {
                    RequestKind::MapRemote { dev, access }
                }
                _ => RequestKind::Fault { proc, access },
            },
            &mut done,
        )?;
        self.intents.push(Intent {
            id,
            block: b,
            page,
            proc,
            access,
        });
        self.finish(done)
    }

    /// Does the access if the mapping allows it; returns whether it did.
    fn perform(
        &mut self,
        b: usize,
        page: usize,
        proc: Proc,
        access: Access,
    ) -> Result<bool, Violation> {
        let m = &self.world.machines[b];
        let mode = m.mapping(proc, page).map(|(mode, _)| mode);
        let ok = match access {
            Access::Read => mode.is_some(),
            Access::Write => matches!(mode, Some(MapMode::ReadWrite | MapMode::Exclusive)),
            Access::Atomic => mode == Some(MapMode::Exclusive),
        };
        if !ok {
            return Ok(false);
        }
        if access == Access::Read {
            self.report.reads += 1;
            let got = m.read(proc, page);
            if got != Some(self.oracle[b][page]) {
                self.report.mismatches += 1;
                return Err(Violation::new(format!(
                    "{proc:?} read {got:?} from block {b} page {page}, oracle says {}",
                    self.oracle[b][page]
                )));
            }
        } else {
            self.report.writes += 1;
            let v = self.world.write(b, proc, page)?;
            self.oracle[b][page] = v;
        }
        Ok(true)
    }

    fn request(&mut self, b: usize, run: PageRun, kind: RequestKind) -> Result<(), Violation> {
        if self.world.outstanding_count() >= 16 {
            return Ok(());
        }
        let mut done = Vec::new();
        self.world.request(&self.topo, b, run, kind, &mut done)?;
        self.finish(done)
    }

    fn invalidate(&mut self, b: usize, run: PageRun, kind: Invalidation) -> Result<(), Violation> {
        if self.world.outstanding_count() >= 16 {
            return Ok(());
        }
        let mut done = Vec::new();
        let id = self.world.invalidate(&self.topo, b, run, kind, &mut done)?;
        if kind == Invalidation::Discard {
            // The oracle forgets anonymous data when the discard completes (see `finish`).
            self.discards.push((id, b, run));
        }
        self.finish(done)
    }

    fn complete(
        &mut self,
        b: usize,
        op: crate::ids::OpId,
        result: Result<(), OpError>,
    ) -> Result<(), Violation> {
        self.report.completions += 1;
        let mut done = Vec::new();
        self.world.complete(&self.topo, b, op, result, &mut done)?;
        self.finish(done)
    }

    /// Acts on completed requests: performs the waiting accesses, evicts on `DeviceFull`.
    fn finish(&mut self, done: Vec<Completed>) -> Result<(), Violation> {
        for (id, result) in done {
            if result.is_err() {
                self.report.request_errors += 1;
            }
            if let Some(i) = self.discards.iter().position(|x| x.0 == id) {
                let (_, b, run) = self.discards.swap_remove(i);
                for p in run.pages().take_while(|&p| p < self.cfg.pages) {
                    if !self.world.blocks[b].page(p).file {
                        self.oracle[b][p] = 0;
                    }
                }
            }
            if let Some(i) = self.intents.iter().position(|x| x.id == id) {
                let it = self.intents.swap_remove(i);
                match result {
                    // `World` checked the mapping at the instant the fault completed; a later
                    // request in the same event may have revoked it since. Then the access
                    // faults again, as a replayed access would.
                    Ok(()) => {
                        if !self.perform(it.block, it.page, it.proc, it.access)? {
                            self.report.replays += 1;
                        }
                    }
                    Err(RequestError::DeviceFull(dev)) => {
                        let victim = self.rng.below(self.cfg.blocks);
                        let kind = RequestKind::Evict {
                            dev,
                            pages: 4,
                            write_back: self.rng.below(2) == 0,
                        };
                        self.request(victim, self.all(), kind)?;
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }
}
