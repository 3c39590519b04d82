//! Carries out placement on CPU faults: the read-back window, map-around, sequential read-ahead
//! and its prefetch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem_proto::{
    Access, Advice, DeviceId, Event, Mem, PageRun, Proc, RequestKind, BLOCK_BYTES, PAGES_PER_BLOCK,
    PAGE_SIZE,
};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;
use crate::mm::work::ServiceWork;
use crate::policy::{CpuFault, DeviceAccessed, DeviceFault, MemEvent, Placement};

impl Runtime {
    /// Placement for a CPU fault on piece `p` (one page): gathers the facts the policy needs,
    /// asks it for a plan (`PlacementPolicy::cpu_fault`) and carries it out: read-ahead queued,
    /// the window brought home or mapped around, each clipped to the pages the protocol lets
    /// the access touch. Returns the run to fault: the faulting page's part of the window, or
    /// the page alone.
    pub(crate) fn place_cpu_fault(&self, p: &BlockSpan, access: Access) -> PageRun {
        let page = p.run.start();
        let slot = &p.region.blocks[p.bi];
        // Whether the page's data lives only in private device memory. Without a private
        // device holding frames of the block it cannot, and the block's lock is not taken.
        let on_private = self.topology.devices().any(|d| {
            !self.topology.is_coherent(d) && slot.held[d.index()].load(Ordering::Relaxed) > 0
        });
        let (only_private, readable) = if on_private {
            let block = self.lock_block(slot);
            let v = block.page(page);
            let only_private = !v.is_valid_in(Mem::System)
                && self
                    .topology
                    .devices()
                    .any(|d| !self.topology.is_coherent(d) && v.is_valid_in(Mem::Device(d)));
            (only_private, block.state().accessible(Access::Read))
        } else {
            (false, hetmem_proto::PageMask::EMPTY)
        };
        let plan = self.policy.cpu_fault(&CpuFault {
            block_index: p.bi,
            blocks: p.region.blocks.len(),
            page,
            pages: self.pages_before_eof(&p.region, p.bi),
            write: access != Access::Read,
            only_on_private_device: only_private,
            block: &slot.policy,
            region: &p.region.policy,
        });
        if let Some(t) = self.trace() {
            let (decision, reason) = match (&plan.read_ahead, plan.window, plan.bring_home) {
                (Some(_), _, _) => (
                    "read-ahead",
                    "a sequential stream of CPU faults on data in private device memory",
                ),
                (None, Some(_), true) if only_private => (
                    "read-back window",
                    "the faulting page lives only in private device memory: bring its window home",
                ),
                (None, Some(w), _) if w.len() > 1 => (
                    "map-around",
                    "data the CPU can map without a copy: map the window, not one page",
                ),
                _ => ("", ""),
            };
            if !decision.is_empty() {
                let ra = plan.read_ahead.clone();
                t.instant(
                    "policy",
                    decision,
                    &[
                        ("region", p.region.id.into()),
                        ("block", p.bi.into()),
                        ("page", page.into()),
                        ("window", plan.window.map_or(0, |w| w.len()).into()),
                        (
                            "read_ahead_from",
                            ra.as_ref().map_or(0, |r| *r.start()).into(),
                        ),
                        ("read_ahead_to", ra.as_ref().map_or(0, |r| *r.end()).into()),
                        ("reason", reason.into()),
                    ],
                );
            }
        }
        if let Some(blocks) = plan.read_ahead {
            let last = p.region.blocks.len().saturating_sub(1);
            let (from, to) = (*blocks.start(), (*blocks.end()).min(last));
            if from <= to {
                self.work.push((from..=to).map(|j| ServiceWork::Prefetch {
                    region: p.region.clone(),
                    bi: j,
                }));
            }
        }
        let Some(window) = plan.window.filter(|w| w.pages().contains(&page)) else {
            return p.run;
        };
        if plan.bring_home && only_private {
            let mut own = p.run;
            let runs: Vec<PageRun> = (hetmem_proto::PageMask::from_run(window) & readable)
                .runs()
                .collect();
            for run in runs {
                let _ = self.request(
                    &p.region,
                    p.bi,
                    run,
                    RequestKind::Migrate { dst: Mem::System },
                );
                if run.pages().contains(&page) {
                    // Map the page's part of the window too, or every page would still
                    // fault once.
                    own = run;
                } else {
                    self.map_for_read(&p.region, p.bi, run);
                }
            }
            return own;
        }
        self.map_around(p, window, access)
    }

    /// Placement for a device fault on piece `p`: gathers what the policy needs to know
    /// (`PlacementPolicy::device_fault`) and carries out its plan. A change of placement is
    /// advice on the whole block: pinned to system memory, devices map it remotely (the
    /// protocol's `PreferredLocation(System)`), or unpinned. Returns the pages to prefetch to
    /// the device once the fault is served (density prefetch, `prefetch_for_device`).
    pub(crate) fn place_device_fault(
        &self,
        p: &BlockSpan,
        dev: DeviceId,
        access: Access,
    ) -> Option<PageRun> {
        let slot = &p.region.blocks[p.bi];
        let page = p.run.start();
        let (to_device, advised) = {
            let block = self.lock_block(slot);
            let v = block.page(page);
            let no_preference = block.state().preferred_is(None).contains(page);
            (
                v.is_valid_in(Mem::System) && !v.is_valid_in(Mem::Device(dev)),
                !no_preference,
            )
        };
        let plan = self.policy.device_fault(&DeviceFault {
            dev,
            block_index: p.bi,
            run: p.run,
            pages: p.region.block_pages(p.bi),
            write: access != Access::Read,
            to_device,
            advised,
            block: &slot.policy,
        });
        let (advice, decision, reason) = match plan.placement {
            Placement::Keep => return plan.prefetch,
            Placement::PinToSystem { flips, within } => (
                Some(Mem::System),
                "thrashing: pin to system memory",
                format!(
                    "{flips} moves between the CPU and {} within {:.2} ms: devices map the block remotely",
                    crate::trace::mem_name(Mem::Device(dev)),
                    within.as_secs_f64() * 1e3
                ),
            ),
            Placement::Unpin => (
                None,
                "thrashing: unpin",
                "the pin's time is up: the block migrates again, and is watched".to_string(),
            ),
        };
        let all = PageRun::new(0, p.region.block_pages(p.bi), PAGES_PER_BLOCK)?;
        let event = Event::Advise {
            pages: all,
            advice: Advice::PreferredLocation(advice),
        };
        if self.drive(&p.region, p.bi, event, |_, _| {}).is_ok() && advice.is_some() {
            self.emit(MemEvent::ThrashingPinned { dev });
        }
        if advice.is_none() {
            // The policy's unpinning covers the whole block: pages pinned for DMA stay home.
            self.keep_pins_home(&p.region, p.bi);
        }
        if let Some(t) = self.trace() {
            t.instant(
                "policy",
                decision,
                &[
                    ("region", p.region.id.into()),
                    ("block", p.bi.into()),
                    ("dev", crate::trace::mem_name(Mem::Device(dev)).into()),
                    ("reason", reason.as_str().into()),
                ],
            );
        }
        plan.prefetch
    }

    /// Density prefetch: brings `run` of piece `p`'s block to device `dev` and maps it there
    /// for `access`, as the fault that found the region dense did (a device fault request:
    /// the next accesses find the pages mapped). Like read-ahead it evicts nothing: a full
    /// device takes what fits, and the rest faults on its own.
    pub(crate) fn prefetch_for_device(
        &self,
        p: &BlockSpan,
        dev: DeviceId,
        run: PageRun,
        access: Access,
    ) {
        if let Some(t) = self.trace() {
            t.instant(
                "policy",
                "density prefetch",
                &[
                    ("region", p.region.id.into()),
                    ("block", p.bi.into()),
                    ("page", run.start().into()),
                    ("pages", run.len().into()),
                    ("dev", crate::trace::mem_name(Mem::Device(dev)).into()),
                    (
                        "reason",
                        "more than 51% of the aligned region around the fault has faulted".into(),
                    ),
                ],
            );
        }
        let before = p.region.blocks[p.bi].held[dev.index()].load(Ordering::Relaxed);
        let fault = RequestKind::Fault {
            proc: Proc::Device(dev),
            access,
        };
        if self
            .request_once(&p.region, p.bi, run, fault, |_, _| {})
            .is_ok()
        {
            let after = p.region.blocks[p.bi].held[dev.index()].load(Ordering::Relaxed);
            self.emit(MemEvent::Prefetched {
                pages: u64::from(after.saturating_sub(before)),
            });
        }
    }

    /// Access counters: device `dev` reached `remote` pages of piece `p`'s block in system
    /// memory. If the policy says the block is worth having there now
    /// (`PlacementPolicy::device_accessed`), it migrates to the device whole, evicting as a
    /// migration does.
    pub(crate) fn after_remote_access(&self, p: &BlockSpan, dev: DeviceId, remote: u64) {
        let slot = &p.region.blocks[p.bi];
        let migrate = self.policy.device_accessed(&DeviceAccessed {
            dev,
            block_index: p.bi,
            remote,
            block: &slot.policy,
        });
        if !migrate {
            return;
        }
        let Some(all) = PageRun::new(0, p.region.block_pages(p.bi), PAGES_PER_BLOCK) else {
            return;
        };
        if let Some(t) = self.trace() {
            t.instant(
                "policy",
                "access counters: migrate",
                &[
                    ("region", p.region.id.into()),
                    ("block", p.bi.into()),
                    ("dev", crate::trace::mem_name(Mem::Device(dev)).into()),
                    (
                        "reason",
                        "the device reached the block remotely past the threshold".into(),
                    ),
                ],
            );
        }
        // Pages pinned for DMA stay in system memory (`mm/pin.rs`).
        let pinned = p.region.pins.in_block(p.bi);
        for run in crate::mm::pin::unpinned_runs(all, pinned) {
            let _ = self.request(
                &p.region,
                p.bi,
                run,
                RequestKind::Migrate {
                    dst: Mem::Device(dev),
                },
            );
        }
    }

    /// A read fault on `run` on behalf of a neighbour's fault (placement): failures only mean
    /// the neighbours stay unmapped, and fault on their own.
    pub(crate) fn map_for_read(&self, region: &Region, bi: usize, run: PageRun) {
        let read = RequestKind::Fault {
            proc: Proc::Cpu,
            access: Access::Read,
        };
        let _ = self.request_once(region, bi, run, read, |_, _| {});
    }

    /// The pieces (one per CPU view showing them) of block `bi`'s pages `run`.
    pub(crate) fn run_pieces(
        &self,
        region: &Arc<Region>,
        bi: usize,
        run: PageRun,
    ) -> Vec<BlockSpan> {
        let mut ranges = Vec::new();
        let first = bi * BLOCK_BYTES + run.start() * PAGE_SIZE;
        region.cpu_ranges_at(first, run.len() * PAGE_SIZE, &mut ranges);
        ranges
            .into_iter()
            .filter_map(|(va, off, len)| {
                let start = (off - bi * BLOCK_BYTES) / PAGE_SIZE;
                Some(BlockSpan {
                    region: region.clone(),
                    bi,
                    run: PageRun::new(start, len / PAGE_SIZE, PAGES_PER_BLOCK)?,
                    va,
                })
            })
            .collect()
    }

    /// Map-around for resident data: when the faulting page already has data the CPU can map
    /// without a copy (system memory, after an eviction or a migration back, or a coherent
    /// device), map the window's other such pages too, with a read fault, instead of taking
    /// one fault per 4 KiB page. A read fault only downgrades device write mappings (a device
    /// that writes again faults once per block). Returns the run to fault for the faulting
    /// page itself.
    pub(crate) fn map_around(&self, p: &BlockSpan, window: PageRun, access: Access) -> PageRun {
        let slot = &p.region.blocks[p.bi];
        let page = p.run.start();
        // First touches are fault-around's business; a hole has no data yet.
        if !slot
            .populated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(page)
        {
            return p.run;
        }
        let runs: Vec<PageRun> = {
            let block = self.lock_block(slot);
            let st = block.state();
            let mut reachable = st.valid_in(Mem::System);
            for d in self.topology.devices() {
                if self.topology.is_coherent(d) {
                    reachable |= st.valid_in(Mem::Device(d));
                }
            }
            let m = (hetmem_proto::PageMask::from_run(window)
                & reachable
                & st.accessible(Access::Read))
                - st.mapped_by(Proc::Cpu);
            m.runs().collect()
        };
        let mut own = p.run;
        for run in runs {
            if run.pages().contains(&page) && access == Access::Read {
                own = run;
                continue;
            }
            self.map_for_read(&p.region, p.bi, run);
        }
        own
    }

    /// Read-ahead of one block: migrate what lives only in private device memory home and map
    /// it for the CPU, all but the first page, whose fault continues the stream.
    pub(crate) fn prefetch(&self, region: &Region, bi: usize) {
        let pages = self.pages_before_eof(region, bi);
        if pages == 0 {
            return;
        }
        let Some(all) = PageRun::new(0, pages, PAGES_PER_BLOCK) else {
            return;
        };
        // Only what lives in private device memory alone, and only pages the CPU may read.
        let (away, runs) = {
            let block = self.lock_block(&region.blocks[bi]);
            let st = block.state();
            let mut on_private = hetmem_proto::PageMask::EMPTY;
            for d in self.topology.devices() {
                if !self.topology.is_coherent(d) {
                    on_private |= st.valid_in(Mem::Device(d));
                }
            }
            let ok = hetmem_proto::PageMask::from_run(all) & st.accessible(Access::Read);
            let runs: Vec<PageRun> = ok.runs().collect();
            (!(on_private - st.valid_in(Mem::System)).is_empty(), runs)
        };
        if !away {
            return;
        }
        for &run in &runs {
            let home = RequestKind::Migrate { dst: Mem::System };
            if self.request(region, bi, run, home).is_err() {
                return;
            }
            self.emit(MemEvent::Prefetched {
                pages: run.len() as u64,
            });
        }
        for run in runs {
            // Page 0 stays unmapped: its fault continues the stream.
            let rest = match run.start() {
                0 => PageRun::new(1, run.len() - 1, PAGES_PER_BLOCK),
                _ => Some(run),
            };
            if let Some(rest) = rest {
                self.map_for_read(region, bi, rest);
            }
        }
        self.emit(MemEvent::ReadAheadDone {
            block: &region.blocks[bi].policy,
        });
    }
}
