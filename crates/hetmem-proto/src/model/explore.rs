//! Exhaustive model checking: every interleaving of requests, invalidations, processor writes
//! and op completions (successful or failed) in a small world, up to bounds on outstanding
//! requests, writes and injected failures. Depth-first, with a set of state fingerprints.
//!
//! In every reachable state the explorer checks, besides everything [`World::event`] checks
//! after each action: a *drain* from that state (completing the op in the lowest slot
//! successfully, again and again) finishes every pending request. That is the liveness property "every fault completes
//! or reports an error under a fair order of completions".

use super::machine::Violation;
use super::world::{Completed, World};
use crate::block::Layout;
use crate::config::Topology;
use crate::event::{Access, Advice, Event, Invalidation, OpError, RequestKind};
use crate::ids::{DeviceId, Mem, OpId, PageRun, Proc};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// Which kinds of environment moves to explore, beyond faults, writes and completions.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Moves {
    /// Explicit migration of one page to each memory.
    pub migrate: bool,
    /// Eviction of one frame per device.
    pub evict: bool,
    /// Flush of the whole range.
    pub flush: bool,
    /// Release of each device.
    pub release: bool,
    /// MADV_DONTNEED of one page.
    pub discard: bool,
    /// munmap of one page.
    pub unmap: bool,
    /// Truncation of the last page.
    pub truncate: bool,
    /// The file growing back over the last page while it is beyond the end of the file
    /// (`Invalidate { Extend }`), at any point after its truncation: while its drop waits, too.
    pub extend: bool,
    /// The file's copy of one file page wins over ours (`Invalidate { Revert }`: a conflict
    /// resolved for another process): dropped unwritten, dirty or not.
    pub revert: bool,
    /// mprotect read-only and back.
    pub protect: bool,
    /// Read-mostly and preferred-location advice.
    pub advise: bool,
    /// Atomic device faults.
    pub atomics: bool,
    /// Device maps in place (`RequestKind::MapRemote`: a launch's remote placement), read and
    /// write.
    pub remote_map: bool,
    /// Another process writes a file page (a version of its own), after a lease break: only
    /// when hetmem holds no copy of the page and nothing is in flight for it.
    pub external_writes: bool,
    /// Test-only: another process writes a file page whatever hetmem caches (no lease). The
    /// checker must find the stale copy this leaves.
    #[doc(hidden)]
    pub external_writes_unguarded: bool,
}

/// A small world to explore.
#[derive(Clone, Debug)]
pub struct Config {
    /// Devices.
    pub topology: Topology,
    /// The block (one block; pages beyond `pages` are never touched).
    pub layout: Layout<1>,
    /// Pages in play.
    pub pages: usize,
    /// Frames per device.
    pub capacity: Vec<u32>,
    /// Requests outstanding at once.
    pub max_outstanding: usize,
    /// Processor writes in a run (each makes a new version).
    pub max_writes: u8,
    /// Injected op failures in a run.
    pub max_failures: u8,
    /// Extra moves.
    pub moves: Moves,
    /// Give up (and report it) past this many states.
    pub max_states: u64,
}

/// One step of a trace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Move {
    /// A request.
    Request(PageRun, RequestKind),
    /// An invalidation.
    Invalidate(PageRun, Invalidation),
    /// Advice.
    Advise(PageRun, Advice),
    /// An op completes.
    Complete(OpId, Result<(), OpError>),
    /// A processor writes a new version through its mapping.
    Write(Proc, usize),
    /// Another process writes a new version to the file under a page.
    ExternalWrite(usize),
}

/// What the explorer found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Distinct states reached.
    pub states: u64,
    /// Moves taken.
    pub transitions: u64,
    /// Longest path explored.
    pub max_depth: usize,
    /// Whether `max_states` stopped the search.
    pub truncated: bool,
    /// The first violation and the moves that led to it.
    pub counterexample: Option<(Violation, Vec<Move>)>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct State {
    world: World<1>,
    writes_left: u8,
    failures_left: u8,
}

/// Explores every reachable state of `cfg`.
pub fn explore(cfg: &Config) -> Report {
    let init = State {
        world: World::new(&[cfg.layout], cfg.pages, &cfg.capacity),
        writes_left: cfg.max_writes,
        failures_left: cfg.max_failures,
    };
    let mut report = Report {
        states: 1,
        transitions: 0,
        max_depth: 0,
        truncated: false,
        counterexample: None,
    };
    let mut seen = HashSet::new();
    seen.insert(fingerprint(&init));
    // Each frame: a state, its moves, and the index of the next move to try.
    let mut stack: Vec<(State, Vec<Move>, usize)> = vec![(init.clone(), moves(cfg, &init), 0)];
    let mut path: Vec<Move> = Vec::new();
    while let Some((state, options, next)) = stack.last_mut() {
        let Some(&mv) = options.get(*next) else {
            stack.pop();
            path.pop();
            continue;
        };
        *next += 1;
        let mut s = state.clone();
        report.transitions += 1;
        let checked = apply(cfg, &mut s, mv).and_then(|()| drain(cfg, &s));
        if let Err(v) = checked {
            path.push(mv);
            report.counterexample = Some((v, path));
            return report;
        }
        if !seen.insert(fingerprint(&s)) {
            continue;
        }
        report.states += 1;
        if report.states >= cfg.max_states {
            report.truncated = true;
            return report;
        }
        path.push(mv);
        report.max_depth = report.max_depth.max(path.len());
        let next_moves = moves(cfg, &s);
        stack.push((s, next_moves, 0));
    }
    report
}

fn fingerprint(s: &State) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0xfeed_u32.hash(&mut b);
    s.hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

fn procs(topo: &Topology) -> Vec<Proc> {
    std::iter::once(Proc::Cpu)
        .chain(topo.devices().map(Proc::Device))
        .collect()
}

fn moves(cfg: &Config, s: &State) -> Vec<Move> {
    let topo = &cfg.topology;
    let w = &s.world;
    let mut v = Vec::new();
    let page = World::<1>::page_run;
    let all = PageRun::new(0, cfg.pages, 64).expect("pages fit");
    let room = w.outstanding_count() < cfg.max_outstanding;
    if room {
        for p in 0..cfg.pages {
            for proc in procs(topo) {
                let accesses: &[Access] = match proc {
                    Proc::Device(_) if cfg.moves.atomics => {
                        &[Access::Read, Access::Write, Access::Atomic]
                    }
                    _ => &[Access::Read, Access::Write],
                };
                for &access in accesses {
                    v.push(Move::Request(page(p), RequestKind::Fault { proc, access }));
                }
            }
            if cfg.moves.remote_map {
                for dev in topo.devices() {
                    for access in [Access::Read, Access::Write] {
                        v.push(Move::Request(
                            page(p),
                            RequestKind::MapRemote { dev, access },
                        ));
                    }
                }
            }
            if cfg.moves.migrate {
                for dst in std::iter::once(Mem::System).chain(topo.devices().map(Mem::Device)) {
                    v.push(Move::Request(page(p), RequestKind::Migrate { dst }));
                }
            }
            if cfg.moves.discard {
                v.push(Move::Invalidate(page(p), Invalidation::Discard));
            }
            if cfg.moves.unmap {
                v.push(Move::Invalidate(page(p), Invalidation::Unmap));
            }
            if cfg.moves.revert && w.blocks[0].page(p).file {
                v.push(Move::Invalidate(page(p), Invalidation::Revert));
            }
            if cfg.moves.protect {
                for (read, write) in [(true, false), (true, true)] {
                    v.push(Move::Invalidate(
                        page(p),
                        Invalidation::Protect { read, write },
                    ));
                }
            }
        }
        for d in topo.devices() {
            if cfg.moves.evict {
                // Written back, as the runtime evicts shared file mappings (anonymous pages
                // and clean file pages take the same path either way).
                let kind = RequestKind::Evict {
                    dev: d,
                    pages: 1,
                    write_back: true,
                };
                v.push(Move::Request(all, kind));
            }
            if cfg.moves.release {
                v.push(Move::Request(all, RequestKind::Release { dev: d }));
            }
        }
        if cfg.moves.flush {
            v.push(Move::Request(all, RequestKind::Flush));
        }
        if cfg.moves.truncate {
            v.push(Move::Invalidate(
                page(cfg.pages - 1),
                Invalidation::Truncate,
            ));
        }
        if cfg.moves.extend && w.blocks[0].page(cfg.pages - 1).beyond_eof {
            v.push(Move::Invalidate(page(cfg.pages - 1), Invalidation::Extend));
        }
    }
    if cfg.moves.advise {
        for p in 0..cfg.pages {
            let view = w.blocks[0].page(p);
            let rm = w.blocks[0].state().read_mostly.contains(p);
            if view.managed {
                v.push(Move::Advise(page(p), Advice::ReadMostly(!rm)));
                let pref_sys = w.blocks[0]
                    .state()
                    .preferred_is(Some(Mem::System))
                    .contains(p);
                let loc = if pref_sys { None } else { Some(Mem::System) };
                v.push(Move::Advise(page(p), Advice::PreferredLocation(loc)));
            }
        }
    }
    for (_, op) in w.in_flight() {
        v.push(Move::Complete(op, Ok(())));
        if s.failures_left > 0 {
            v.push(Move::Complete(op, Err(OpError::Io)));
        }
    }
    if s.writes_left > 0 && (cfg.moves.external_writes || cfg.moves.external_writes_unguarded) {
        for p in 0..cfg.pages {
            let view = w.blocks[0].page(p);
            let quiet = view.valid == 0 && !view.dirty && !view.busy && !view.writeback;
            if view.file
                && view.managed
                && !view.beyond_eof
                && (quiet || cfg.moves.external_writes_unguarded)
            {
                v.push(Move::ExternalWrite(p));
            }
        }
    }
    if s.writes_left > 0 {
        for proc in procs(topo) {
            for (_, p) in w.writable(proc) {
                v.push(Move::Write(proc, p));
            }
        }
    }
    v
}

fn apply(cfg: &Config, s: &mut State, mv: Move) -> Result<(), Violation> {
    let topo = &cfg.topology;
    let mut done: Vec<Completed> = Vec::new();
    match mv {
        Move::Request(run, kind) => s.world.request(topo, 0, run, kind, &mut done).map(drop),
        Move::Invalidate(run, kind) => s.world.invalidate(topo, 0, run, kind, &mut done).map(drop),
        Move::Advise(pages, advice) => {
            s.world
                .event(topo, 0, Event::Advise { pages, advice }, &mut done)
        }
        Move::Complete(op, result) => {
            if result.is_err() {
                s.failures_left -= 1;
            }
            s.world.complete(topo, 0, op, result, &mut done)
        }
        Move::Write(proc, p) => {
            s.writes_left -= 1;
            s.world.write(0, proc, p).map(drop)
        }
        Move::ExternalWrite(p) => {
            s.writes_left -= 1;
            s.world.external_write(topo, 0, p).map(drop)
        }
    }
}

/// Completes the op in the lowest slot successfully until nothing is pending; fails if requests remain or
/// it takes unreasonably long.
fn drain(cfg: &Config, s: &State) -> Result<(), Violation> {
    if s.world.blocks[0].pending_requests() == 0 {
        return Ok(());
    }
    let mut s = s.clone();
    for _ in 0..256 {
        let Some(&(_, op)) = s.world.in_flight().first() else {
            break;
        };
        apply(cfg, &mut s, Move::Complete(op, Ok(())))?;
    }
    if s.world.blocks[0].pending_requests() != 0 {
        return Err(Violation::new(
            "requests still pending after every op completed (liveness)",
        ));
    }
    Ok(())
}

/// The standard topology for model checking: one private and one coherent device.
pub fn private_and_coherent() -> Topology {
    use crate::config::DeviceKind;
    let mut t = Topology::new(vec![DeviceKind::Private, DeviceKind::Coherent]).expect("2 devices");
    t.policy.cpu_fault_around = 2;
    t
}

/// Device ids of [`private_and_coherent`].
pub const PRIVATE: DeviceId = match DeviceId::new(0) {
    Some(d) => d,
    None => unreachable!(),
};
/// See [`PRIVATE`].
pub const COHERENT: DeviceId = match DeviceId::new(1) {
    Some(d) => d,
    None => unreachable!(),
};

/// The standard small world: CPU + private + coherent device, one anonymous and one file page,
/// one frame per device, two outstanding requests, two writes, one injected failure; faults,
/// migration, eviction and flush.
pub fn anon_and_file() -> Config {
    use crate::bitmap::PageMask;
    let mut file_backed = PageMask::EMPTY;
    file_backed.insert(1);
    Config {
        topology: private_and_coherent(),
        layout: Layout {
            managed: PageMask::FULL,
            file_backed,
            file_page: 100,
        },
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 2,
        max_writes: 2,
        max_failures: 1,
        moves: Moves {
            migrate: true,
            evict: true,
            flush: true,
            ..Moves::default()
        },
        max_states: 20_000_000,
    }
}
