//! Blocks, their machines, device capacity and outstanding requests, checked after every event.

use super::machine::{Machine, Violation};
use crate::action::{Action, MapMode};
use crate::bitmap::PageMask;
use crate::block::{Block, Env, Layout};
use crate::budget::FrameCounts;
use crate::config::Topology;
use crate::error::RequestError;
use crate::event::{Access, Event, Invalidation, OpError, RequestKind};
use crate::ids::{OpId, PageRun, Proc, ReqId};

/// What a page holds after the file grew back over it (`Outstanding::Extend`).
pub const GROWN: u32 = u32::MAX - 1;

/// What the world remembers about a request until it completes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Outstanding {
    /// A fault; on success the machine must show the mapping.
    Fault {
        /// Block index.
        block: usize,
        /// Page.
        run: PageRun,
        /// Who.
        proc: Proc,
        /// What for.
        access: Access,
    },
    /// A discard; on completion anonymous pages read zero again.
    Discard {
        /// Block index.
        block: usize,
        /// Pages.
        run: PageRun,
    },
    /// The file's copy wins over ours: on completion the pages hold the file's value again.
    Revert {
        /// Block index.
        block: usize,
        /// Pages.
        run: PageRun,
    },
    /// The file grew back over pages beyond its end; on completion they hold what the file
    /// grew with (a new version, as another process's `ftruncate` and `write` would put there).
    Extend {
        /// Block index.
        block: usize,
        /// Pages.
        run: PageRun,
    },
    /// Anything else.
    Other,
}

/// A set of blocks on one simulated machine.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct World<const W: usize> {
    /// The engines.
    pub blocks: Vec<Block<W>>,
    /// One simulated machine per block.
    pub machines: Vec<Machine>,
    /// Device capacity, shared.
    pub frames: FrameCounts,
    /// Outstanding requests by slot (`ReqId(slot)`).
    pub outstanding: Vec<Option<Outstanding>>,
    /// The next version a write stores.
    pub next_version: u32,
    /// When set, every event, action and write is appended here (for counterexamples).
    pub log: Option<Vec<String>>,
}

/// The outcome of a completed request, as the world saw it.
pub type Completed = (ReqId, Result<(), RequestError>);

impl<const W: usize> World<W> {
    /// `layouts.len()` blocks, simulating their first `pages` pages.
    pub fn new(layouts: &[Layout<W>], pages: usize, capacity: &[u32]) -> Self {
        Self {
            blocks: layouts.iter().map(|&l| Block::new(l)).collect(),
            machines: layouts
                .iter()
                .map(|l| Machine::new(pages, l.file_page))
                .collect(),
            frames: FrameCounts::new(capacity),
            outstanding: Vec::new(),
            next_version: 1,
            log: None,
        }
    }

    /// A free request slot.
    pub fn free_slot(&self) -> usize {
        self.outstanding
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.outstanding.len())
    }

    /// Number of outstanding requests.
    pub fn outstanding_count(&self) -> usize {
        self.outstanding.iter().filter(|o| o.is_some()).count()
    }

    /// Issues a request in the next free slot.
    pub fn request(
        &mut self,
        topo: &Topology,
        block: usize,
        run: PageRun,
        kind: RequestKind,
        done: &mut Vec<Completed>,
    ) -> Result<ReqId, Violation> {
        let slot = self.free_slot();
        let note = match kind {
            RequestKind::Fault { proc, access } => Outstanding::Fault {
                block,
                run,
                proc,
                access,
            },
            // Done means mapped for the access, wherever the device maps it.
            RequestKind::MapRemote { dev, access } => Outstanding::Fault {
                block,
                run,
                proc: Proc::Device(dev),
                access,
            },
            _ => Outstanding::Other,
        };
        let id = self.remember(slot, note);
        self.event(
            topo,
            block,
            Event::Request {
                id,
                pages: run,
                kind,
            },
            done,
        )?;
        Ok(id)
    }

    /// Issues an invalidation in the next free slot.
    pub fn invalidate(
        &mut self,
        topo: &Topology,
        block: usize,
        run: PageRun,
        kind: Invalidation,
        done: &mut Vec<Completed>,
    ) -> Result<ReqId, Violation> {
        let slot = self.free_slot();
        let note = match kind {
            Invalidation::Discard => Outstanding::Discard { block, run },
            Invalidation::Extend => Outstanding::Extend { block, run },
            Invalidation::Revert => Outstanding::Revert { block, run },
            _ => Outstanding::Other,
        };
        // From the event on, the pages' data is being dropped (for a revert, until its
        // completion says what they hold: the file's value).
        if matches!(
            kind,
            Invalidation::Unmap | Invalidation::Truncate | Invalidation::Revert
        ) {
            let n = self.machines[block].pages();
            for p in run.pages().take_while(|&p| p < n) {
                self.machines[block].gone[p] = true;
                if kind == Invalidation::Revert {
                    self.machines[block].reverting[p] = true;
                }
            }
        }
        let id = self.remember(slot, note);
        self.event(
            topo,
            block,
            Event::Invalidate {
                id,
                pages: run,
                kind,
            },
            done,
        )?;
        Ok(id)
    }

    fn remember(&mut self, slot: usize, note: Outstanding) -> ReqId {
        if slot == self.outstanding.len() {
            self.outstanding.push(None);
        }
        self.outstanding[slot] = Some(note);
        ReqId(slot as u64)
    }

    /// Lands or fails `op` of `block` on the machine, then tells the engine.
    pub fn complete(
        &mut self,
        topo: &Topology,
        block: usize,
        op: OpId,
        result: Result<(), OpError>,
        done: &mut Vec<Completed>,
    ) -> Result<(), Violation> {
        self.machines[block].complete(op, result.is_ok());
        self.event(topo, block, Event::Complete { op, result }, done)
    }

    /// Writes a new version through `proc`'s writable mapping of `page`.
    pub fn write(&mut self, block: usize, proc: Proc, page: usize) -> Result<u32, Violation> {
        let v = self.next_version;
        if let Some(log) = &mut self.log {
            log.push(format!("b{block}: {proc:?} writes {v} to page {page}"));
        }
        self.machines[block].write(proc, page, v)?;
        // Versions never repeat within a run (4 billion writes) and never equal POISON.
        self.next_version += 1;
        Ok(v)
    }

    /// Another process writes a new version to the file under `page` of `block`, then the
    /// machine is checked against the engine: no cached copy may be left stale.
    pub fn external_write(
        &mut self,
        topo: &Topology,
        block: usize,
        page: usize,
    ) -> Result<u32, Violation> {
        let v = self.next_version;
        if let Some(log) = &mut self.log {
            log.push(format!(
                "b{block}: another process writes {v} to the file under page {page}"
            ));
        }
        self.machines[block].external_write(page, v);
        self.next_version += 1;
        self.machines[block].check_block(topo, &self.blocks[block])?;
        Ok(v)
    }

    /// Feeds one event to a block, executes its actions one by one on the machine (checking
    /// between each), then checks the block, the machine and the capacity.
    pub fn event(
        &mut self,
        topo: &Topology,
        block: usize,
        event: Event,
        done: &mut Vec<Completed>,
    ) -> Result<(), Violation> {
        let mut actions = Vec::new();
        let mut env = Env {
            topology: topo,
            frames: &mut self.frames,
        };
        self.blocks[block]
            .handle(&mut env, event, &mut actions)
            .map_err(|e| Violation::new(format!("event refused: {e}")))?;
        if let Some(log) = &mut self.log {
            log.push(format!("b{block}: {event:?}"));
            log.extend(actions.iter().map(|a| format!("    {a:?}")));
        }
        for a in &actions {
            self.machines[block].apply(topo, a)?;
            if let Action::Complete { id, result } = *a {
                self.on_complete(block, id, result)?;
                done.push((id, result));
            }
        }
        self.machines[block].check_block(topo, &self.blocks[block])?;
        for d in topo.devices() {
            let held: u32 = self.blocks.iter().map(|b| b.frames_held(d)).sum();
            let (used, cap) = (self.frames.used[d.index()], self.frames.capacity[d.index()]);
            if held != used || used > cap {
                return Err(Violation::new(format!(
                    "{d:?}: blocks hold {held} frames, budget says {used} of {cap}"
                )));
            }
        }
        Ok(())
    }

    fn on_complete(
        &mut self,
        block: usize,
        id: ReqId,
        result: Result<(), RequestError>,
    ) -> Result<(), Violation> {
        let slot = id.0 as usize;
        let Some(note) = self.outstanding.get_mut(slot).and_then(Option::take) else {
            return Err(Violation::new(format!(
                "{id:?} completed twice or never issued"
            )));
        };
        match note {
            Outstanding::Fault {
                block: b,
                run,
                proc,
                access,
            } if result.is_ok() => {
                debug_assert_eq!(b, block);
                let m = &self.machines[block];
                for p in run.pages().filter(|&p| p < m.pages()) {
                    let ok = matches!(
                        (m.mapping(proc, p), access),
                        (Some(_), Access::Read)
                            | (
                                Some((MapMode::ReadWrite | MapMode::Exclusive, _)),
                                Access::Write
                            )
                            | (Some((MapMode::Exclusive, _)), Access::Atomic)
                    );
                    if !ok {
                        return Err(Violation::new(format!(
                            "{id:?} fault by {proc:?} completed but page {p} is mapped {:?}",
                            m.mapping(proc, p)
                        )));
                    }
                }
            }
            Outstanding::Discard { block: b, run } => {
                let n = self.machines[b].pages();
                for p in run.pages().take_while(|&p| p < n) {
                    if !self.blocks[b].page(p).file {
                        self.machines[b].latest[p] = 0;
                    }
                }
            }
            Outstanding::Revert { block: b, run } => {
                // Dropped unwritten: what the pages show next is the file's, whatever was
                // written to them meanwhile.
                let n = self.machines[b].pages();
                for p in run.pages().take_while(|&p| p < n) {
                    let m = &mut self.machines[b];
                    m.gone[p] = false;
                    m.reverting[p] = false;
                    m.latest[p] = m.file[p];
                    if let Some(log) = &mut self.log {
                        log.push(format!(
                            "b{b}: page {p} reverted to the file's {}",
                            m.file[p]
                        ));
                    }
                }
            }
            Outstanding::Extend { block: b, run } if result.is_ok() => {
                // Pages truncated (not unmapped) and now inside the file again: the engine must
                // hold nothing of them by now, so what they show next is the file's, which
                // another process wrote while it grew the file.
                let n = self.machines[b].pages();
                for p in run.pages().take_while(|&p| p < n) {
                    let view = self.blocks[b].page(p);
                    if self.machines[b].gone[p] && view.managed && !view.beyond_eof {
                        // One value for every growth, so that shrinking and growing again and
                        // again does not make the state space infinite; it differs from every
                        // version a write stores and from the file's first contents.
                        let v = GROWN;
                        if let Some(log) = &mut self.log {
                            log.push(format!(
                                "b{b}: the file grows back over page {p}, holding {v}"
                            ));
                        }
                        let m = &mut self.machines[b];
                        m.gone[p] = false;
                        m.file[p] = v;
                        m.latest[p] = v;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Every page of every block, simulated, that `proc` maps writable.
    pub fn writable(&self, proc: Proc) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (b, m) in self.machines.iter().enumerate() {
            for p in 0..m.pages() {
                if matches!(
                    m.mapping(proc, p),
                    Some((MapMode::ReadWrite | MapMode::Exclusive, _))
                ) {
                    v.push((b, p));
                }
            }
        }
        v
    }

    /// Ops in flight, as (block, op).
    pub fn in_flight(&self) -> Vec<(usize, OpId)> {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(|(b, blk)| blk.ops_in_flight().map(move |op| (b, op)))
            .collect()
    }

    /// A run covering page `p` alone.
    pub fn page_run(p: usize) -> PageRun {
        PageRun::page(p, PageMask::<W>::PAGES).expect("page inside the block")
    }
}
