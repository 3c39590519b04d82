//! Launches with declared access: the way work reaches a device that cannot take page faults
//! (a GPU without kernel HMM). The caller names the ranges a launch touches and how; the
//! runtime makes them resident through the protocol's device faults, pins them, hands the
//! backend-specific submission the device addresses of every run of pages, and keeps the pages
//! where they are until the launch completes: a CPU fault, an eviction, a `munmap` or another
//! device's fault that would take them waits for it (`mm/launch.rs`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hetmem_proto::{Access, DeviceId, Mem, PageMask, BLOCK_WORDS, PAGE_SIZE};

use crate::api::device::{for_each_parallel, satisfies, Device};
use crate::error::{Error, Result};
use crate::mm::launch::{LaunchCompletion, LaunchPin, LaunchShared};
use crate::mm::region::Region;
use crate::mm::runtime::RuntimeHandle;
use crate::mm::space::BlockSpan;
use crate::policy::MemEvent;

/// Where a declared range lives while the launch runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LaunchPlacement {
    /// In the device's memory: the pages migrate there first (the default).
    #[default]
    Migrate,
    /// Where they are: pages already in the device's memory are used there, all others in
    /// system memory, which the device reaches over the link (the protocol's `MapRemote`):
    /// for data larger than the device, or touched once.
    Remote,
    /// `Migrate` when the launch's migrating and automatic ranges fit in the device together,
    /// `Remote` otherwise.
    Auto,
}

/// One range a launch touches, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeclaredAccess {
    /// Start, page-aligned.
    pub addr: usize,
    /// Length in bytes, a whole number of pages.
    pub len: usize,
    /// What the launch does there. A write is served as a read-write: the pages are brought
    /// with their data, so a kernel that writes part of a page keeps the rest.
    pub access: Access,
    /// Where the range lives while the launch runs.
    pub placement: LaunchPlacement,
}

impl DeclaredAccess {
    /// The launch reads `[addr, addr + len)`.
    pub fn read(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            access: Access::Read,
            placement: LaunchPlacement::Migrate,
        }
    }

    /// The launch reads and writes `[addr, addr + len)`.
    pub fn write(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            access: Access::Write,
            placement: LaunchPlacement::Migrate,
        }
    }

    /// The launch uses device atomics on `[addr, addr + len)`: mapped exclusively, in the
    /// device's memory (atomics over the link are not offered).
    pub fn atomic(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            access: Access::Atomic,
            placement: LaunchPlacement::Migrate,
        }
    }

    /// The same range with another placement.
    pub fn placed(self, placement: LaunchPlacement) -> Self {
        Self { placement, ..self }
    }
}

/// Where one run of a launch's pages is while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchTarget {
    /// In the device's memory: `offset` bytes into the chunk its backend knows by `handle`
    /// (a CUDA chunk's handle is its device address). `host` is the same bytes as host memory,
    /// where the host can address the chunk (simulated devices).
    Device {
        /// The chunk's backend handle.
        handle: u64,
        /// Bytes into the chunk.
        offset: usize,
        /// The bytes as host memory, if the host can address them.
        host: Option<*mut u8>,
        /// The run's device address when the backend maps the region at the CPU's addresses
        /// (`DeviceBackend::reserve_address`): then it equals the run's `va`.
        same_address: bool,
    },
    /// In system memory, which the device maps over the link: the runtime's view of it.
    System {
        /// The bytes in the runtime's (never-faulting) view of the backing memory.
        host: *mut u8,
    },
}

/// A run of a declared range's pages, within one 2 MiB block, all at one kind of target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchRun {
    /// The CPU address of its first byte.
    pub va: usize,
    /// Bytes.
    pub len: usize,
    /// Where the launch finds it.
    pub target: LaunchTarget,
}

// SAFETY: the pointers are addresses handed to a device (or a simulated kernel); nothing in
// this type dereferences them.
#[allow(unsafe_code)]
unsafe impl Send for LaunchRun {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for LaunchRun {}

/// The declared ranges as the device will find them, in declaration order: what a backend's
/// submission needs to tell its kernel where the data is. Valid until the launch completes.
#[derive(Debug)]
pub struct Resident {
    ranges: Vec<(DeclaredAccess, Vec<LaunchRun>)>,
}

impl Resident {
    /// How many ranges were declared.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether none was (never: a launch declares at least one range).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Declared range `i` and its runs, in address order; `None` past the last.
    pub fn range(&self, i: usize) -> Option<(DeclaredAccess, &[LaunchRun])> {
        self.ranges.get(i).map(|(d, r)| (*d, r.as_slice()))
    }

    /// Whether all of declared range `i` is in device memory mapped at the CPU's addresses:
    /// the device then reaches it through the very pointer the CPU uses (`addr`), however many
    /// blocks it spans.
    pub fn at_cpu_address(&self, i: usize) -> bool {
        self.range(i).is_some_and(|(_, runs)| {
            runs.iter().all(|r| {
                matches!(
                    r.target,
                    LaunchTarget::Device {
                        same_address: true,
                        ..
                    }
                )
            })
        })
    }
}

/// A launch in flight. [`Launch::wait`] reports how it ended; dropping it waits too, so the
/// memory it uses outlives it. Until it completes, whatever would move or unmap its pages
/// waits (`stats().launch_waits` counts those waits).
#[derive(Debug)]
#[must_use = "a launch's error is reported by wait(); dropping it waits and counts an error"]
pub struct Launch {
    shared: Arc<LaunchShared>,
    pinned: Vec<(Arc<Region>, usize)>,
    dev: DeviceId,
    runtime: Arc<RuntimeHandle>,
    waited: bool,
}

impl Launch {
    /// Waits for the launch to finish and releases its pages.
    ///
    /// # Errors
    /// `Io` when the launch failed (a device error: pages whose only copy was on the device
    /// may be lost with the device's context; those in system memory are kept).
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    /// Whether the launch has finished, without waiting.
    pub fn is_done(&self) -> bool {
        self.shared.is_done()
    }

    fn finish(&mut self) -> Result<()> {
        self.waited = true;
        let r = self.shared.wait();
        for (region, bi) in self.pinned.drain(..) {
            region.blocks[bi].dev[self.dev.index()]
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .launches
                .remove(&self.shared);
        }
        r.map_err(Error::Io)
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if !self.waited && self.finish().is_err() {
            // Nobody will see this error: count it, so `stats().errors == 0` keeps meaning
            // nothing went wrong.
            self.runtime.inner.emit(MemEvent::Error);
        }
    }
}

/// A launch's host-side kernel sees its declared ranges through this (simulated devices).
#[derive(Debug)]
pub struct HostRuns {
    resident: Resident,
}

impl HostRuns {
    /// The runs of declared range `i` as bytes to read, with their CPU addresses; `None` past
    /// the last range.
    #[allow(unsafe_code)]
    pub fn read(&self, i: usize) -> Option<Vec<(usize, &[u8])>> {
        let (_, runs) = self.resident.range(i)?;
        let slice = |r: &LaunchRun| {
            // SAFETY: `launch_host` checked every run has a host address; the launch pins the
            // pages, so they stay mapped for the device and unwritten by others until it
            // completes, and declared ranges do not overlap, so no `write` of this launch
            // aliases them.
            unsafe { std::slice::from_raw_parts(host_of(r), r.len) }
        };
        Some(runs.iter().map(|r| (r.va, slice(r))).collect())
    }

    /// The runs of declared range `i` as bytes to write; `None` past the last range or when
    /// the range was declared read-only.
    #[allow(unsafe_code)]
    pub fn write(&mut self, i: usize) -> Option<Vec<(usize, &mut [u8])>> {
        let (d, runs) = self.resident.range(i)?;
        if d.access == Access::Read {
            return None;
        }
        let slice = |r: &LaunchRun| {
            // SAFETY: as `read`; the protocol maps them writable for this device alone, and
            // `&mut self` keeps two calls from handing out the same bytes twice.
            unsafe { std::slice::from_raw_parts_mut(host_of(r), r.len) }
        };
        Some(runs.iter().map(|r| (r.va, slice(r))).collect())
    }
}

fn host_of(r: &LaunchRun) -> *mut u8 {
    match r.target {
        LaunchTarget::Device { host, .. } => host.unwrap_or(std::ptr::null_mut()),
        LaunchTarget::System { host } => host,
    }
}

/// A pinned launch: its completion, the blocks it pinned, where its pages are.
type Pinned = (Arc<LaunchShared>, Vec<(Arc<Region>, usize)>, Resident);

/// A simulated kernel's completion: the thread running it.
struct Joined(Option<std::thread::JoinHandle<()>>);

impl LaunchCompletion for Joined {
    fn wait(&mut self) -> Result<(), hetmem_proto::OpError> {
        match self.0.take().map(std::thread::JoinHandle::join) {
            // A kernel that panicked failed, as a GPU kernel that traps does.
            Some(Err(_)) => Err(hetmem_proto::OpError::Device),
            _ => Ok(()),
        }
    }

    fn is_done(&mut self) -> bool {
        self.0
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }
}

impl Device {
    /// Launches work that touches exactly the `declared` ranges, on a device that may not be
    /// able to fault (a GPU): the ranges are made resident first (migrated, or mapped where the
    /// protocol's advice says), pinned, and `submit` is called with where each run of pages is
    /// ([`Resident`]). It starts the device's work and returns how to tell when it ends; the
    /// pages stay put until then. Written pages are the device's (dirty there) afterwards.
    ///
    /// `submit` runs on this thread with no lock of the runtime's held, but while the pages
    /// are pinned: it must not touch managed memory through the CPU (a CPU fault on a pinned
    /// page would wait for a launch that is not yet submitted).
    ///
    /// # Errors
    /// Before anything moves: `Invalid` (EINVAL) for no range, an empty, unaligned or wrapping
    /// range, ranges that overlap, or in a fork child; `Fault` (EFAULT) for a range that is not
    /// all managed memory or is `PROT_NONE`; `Perm` (EPERM) for a write to read-only memory;
    /// `NoMem` (ENOMEM) when the ranges together are larger than the device. Then `NoMem` when
    /// the device cannot hold them all at once (other launches pin the rest), `Io` when a copy
    /// fails, and whatever `submit` returns.
    pub fn launch<F>(&self, declared: &[DeclaredAccess], submit: F) -> Result<Launch>
    where
        F: FnOnce(&Resident) -> Result<Box<dyn LaunchCompletion>>,
    {
        let start = std::time::Instant::now();
        let (shared, pinned, resident) = self.pin_declared(declared)?;
        let launch = Launch {
            shared,
            pinned,
            dev: self.id(),
            runtime: self.shared.clone(),
            waited: false,
        };
        match submit(&resident) {
            Ok(completion) => {
                launch.shared.submitted(completion);
                if let Some(t) = self.inner().trace() {
                    t.complete(
                        "launch",
                        "launch",
                        start,
                        std::time::Instant::now(),
                        &[
                            ("dev", crate::trace::mem_name(Mem::Device(self.id())).into()),
                            ("ranges", declared.len().into()),
                        ],
                    );
                }
                Ok(launch)
            }
            Err(e) => {
                launch.shared.never_ran();
                let mut launch = launch;
                let _ = launch.finish();
                Err(e)
            }
        }
    }

    /// [`Device::launch`] for a device whose memory the host can address (a simulated one):
    /// `kernel` runs on a thread of its own, over the declared ranges' bytes ([`HostRuns`]),
    /// while the caller goes on; the returned [`Launch`] completes when it returns. A kernel
    /// that panics fails the launch (`Io`), as a GPU kernel that traps does.
    ///
    /// # Errors
    /// As [`Device::launch`]; `Invalid` (EINVAL) when the device's memory is not
    /// host-addressable.
    pub fn launch_host<F>(&self, declared: &[DeclaredAccess], kernel: F) -> Result<Launch>
    where
        F: FnOnce(&mut HostRuns) + Send + 'static,
    {
        let name = format!("hetmem-dev{}-launch", self.id().index());
        self.launch(declared, move |resident| {
            let addressable = (0..resident.len())
                .filter_map(|i| resident.range(i))
                .all(|(_, runs)| runs.iter().all(|r| !host_of(r).is_null()));
            if !addressable {
                return Err(Error::Invalid("device memory is not host-addressable"));
            }
            let mut runs = HostRuns {
                resident: Resident {
                    ranges: resident.ranges.clone(),
                },
            };
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || kernel(&mut runs))
                .map_err(Error::os("spawn a launch thread"))?;
            Ok(Box::new(Joined(Some(thread))))
        })
    }

    /// Checks the declared ranges, makes them resident and pins them all at once.
    fn pin_declared(&self, declared: &[DeclaredAccess]) -> Result<Pinned> {
        let inner = self.inner();
        if declared.is_empty() {
            return Err(Error::Invalid("a launch declares no range"));
        }
        let mut spans = Vec::with_capacity(declared.len());
        for d in declared {
            let pieces = inner.pieces(d.addr, d.len)?;
            inner.check_access(&pieces, d.access)?;
            spans.push(pieces);
        }
        let mut sorted: Vec<(usize, usize)> = declared.iter().map(|d| (d.addr, d.len)).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(Error::Invalid("declared ranges overlap"));
        }
        if declared
            .iter()
            .any(|d| d.access == Access::Atomic && d.placement != LaunchPlacement::Migrate)
        {
            return Err(Error::Invalid(
                "atomics need the range in the device's memory",
            ));
        }
        // What migrates: the `Migrate` ranges, and the `Auto` ones if all fit with them.
        let pages_of = |p: LaunchPlacement| -> usize {
            declared
                .iter()
                .filter(|d| d.placement == p)
                .map(|d| d.len / PAGE_SIZE)
                .sum()
        };
        let capacity = self.capacity_pages() as usize;
        let migrating = pages_of(LaunchPlacement::Migrate);
        if migrating > capacity {
            return Err(Error::NoMem);
        }
        let auto_migrates = migrating + pages_of(LaunchPlacement::Auto) <= capacity;
        let remote: Vec<bool> = declared
            .iter()
            .map(|d| match d.placement {
                LaunchPlacement::Migrate => false,
                LaunchPlacement::Remote => true,
                LaunchPlacement::Auto => !auto_migrates,
            })
            .collect();
        // Faulting one range in may evict another's pages: fault all in, then pin all at
        // once if all are still there; otherwise again, a few times, before calling the
        // device too small for this launch next to the others running.
        let rounds = AtomicU32::new(0);
        for _ in 0..8 {
            for ((d, pieces), &remote) in declared.iter().zip(&spans).zip(&remote) {
                if remote {
                    self.map_remote(pieces, d.access)?;
                } else {
                    self.bring_home_to_device(pieces)?;
                    self.make_resident_parallel(pieces, d.access, &rounds)?;
                }
            }
            if let Some(pinned) = self.try_pin(declared, &spans, &remote) {
                if rounds.load(Ordering::Relaxed) > 0 {
                    inner.emit(MemEvent::DeviceCommandFaulted { dev: self.id() });
                }
                return Ok(pinned);
            }
        }
        Err(Error::NoMem)
    }

    /// `make_resident` over the pieces from a few threads at once, so that the copies of
    /// several blocks are in flight together (a device's copy engine then runs back to back,
    /// instead of idling while this thread takes each block's fault in turn). One piece runs
    /// here.
    fn make_resident_parallel(
        &self,
        pieces: &[BlockSpan],
        access: Access,
        rounds: &AtomicU32,
    ) -> Result<()> {
        const WORKERS: usize = 4;
        if pieces.len() <= 1 {
            return self.make_resident(pieces, access, rounds);
        }
        for_each_parallel(
            pieces,
            WORKERS,
            |w| format!("hetmem-dev{}-resident{w}", self.id().index()),
            |p| self.make_resident(std::slice::from_ref(p), access, rounds),
        )
    }

    /// Migrates to the device the pages of `pieces` it maps remotely (in system memory): a
    /// `Migrate` range must be in its memory, and a remote mapping satisfies a device fault.
    fn bring_home_to_device(&self, pieces: &[BlockSpan]) -> Result<()> {
        let inner = self.inner();
        let d = self.id().index();
        for p in pieces {
            let any_remote = !p.region.blocks[p.bi].dev[d]
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .all(p.run.pages(), |e| !e.remote);
            if any_remote {
                let kind = hetmem_proto::RequestKind::Migrate {
                    dst: Mem::Device(self.id()),
                };
                inner.request(&p.region, p.bi, p.run, kind)?;
            }
        }
        Ok(())
    }

    /// Maps `pieces` for `access` where their data is (`RequestKind::MapRemote`): pages not in
    /// the device's memory are mapped in system memory, over the link.
    fn map_remote(&self, pieces: &[BlockSpan], access: Access) -> Result<()> {
        let inner = self.inner();
        let d = self.id().index();
        for p in pieces {
            for tries in 0.. {
                let mapped = {
                    let _gate = inner.gate.enter();
                    p.region.blocks[p.bi].dev[d]
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .all(p.run.pages(), |e| satisfies(e, access))
                };
                if mapped {
                    break;
                }
                if tries == 10_000 {
                    return Err(Error::Fault("device mapping did not converge"));
                }
                let kind = hetmem_proto::RequestKind::MapRemote {
                    dev: self.id(),
                    access,
                };
                // A device fault: held while a lease break of the mapping is in progress.
                inner.wait_at_break(&p.region);
                inner.request(&p.region, p.bi, p.run, kind)?;
            }
        }
        Ok(())
    }

    /// Pins the declared pieces if the device still maps every page as declared: under the
    /// read locks of all their page tables at once, so no change can come between the check
    /// and the pins.
    fn try_pin(
        &self,
        declared: &[DeclaredAccess],
        spans: &[Vec<BlockSpan>],
        remote: &[bool],
    ) -> Option<Pinned> {
        let inner = self.inner();
        let d = self.id().index();
        let _gate = inner.gate.enter();
        // Each block's table once, in a fixed order (two ranges may share a block).
        let mut blocks: Vec<(&Arc<Region>, usize)> =
            spans.iter().flatten().map(|p| (&p.region, p.bi)).collect();
        blocks.sort_unstable_by_key(|&(r, bi)| (Arc::as_ptr(r) as usize, bi));
        blocks.dedup_by_key(|&mut (r, bi)| (Arc::as_ptr(r) as usize, bi));
        let guards: Vec<_> = blocks
            .iter()
            .map(|&(r, bi)| {
                r.blocks[bi].dev[d]
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
            })
            .collect();
        let guard_of = |p: &BlockSpan| {
            let i = blocks
                .binary_search_by_key(&(Arc::as_ptr(&p.region) as usize, p.bi), |&(r, bi)| {
                    (Arc::as_ptr(r) as usize, bi)
                })
                .ok()?;
            guards.get(i)
        };
        // The region's addresses are this device's too (`DeviceBackend::reserve_address`).
        let backend = &inner.devices[d].backend;
        let mut ranges = Vec::with_capacity(declared.len());
        // Per piece, in `spans` order: its pages the device maps in system memory.
        let mut remote_pages = Vec::new();
        let mut pins: Vec<(PageMask<BLOCK_WORDS>, bool)> =
            vec![(PageMask::EMPTY, false); blocks.len()];
        for ((decl, pieces), &remote_ok) in declared.iter().zip(spans).zip(remote) {
            let mut runs = Vec::new();
            for p in pieces {
                let same_address = p
                    .region
                    .same_address
                    .as_ref()
                    .is_some_and(|(_, b)| Arc::ptr_eq(b, backend));
                let db = guard_of(p)?;
                // A migrating range must be in the device's memory, not mapped over the link.
                if !db.all(p.run.pages(), |e| {
                    satisfies(e, decl.access) && (remote_ok || !e.remote)
                }) {
                    return None;
                }
                remote_pages.push(p.run.pages().filter(|&i| db.entry(i).remote).count() as u64);
                for page in p.run.pages() {
                    let e = db.entry(page);
                    let va = p.va + (page - p.run.start()) * PAGE_SIZE;
                    let target = if e.remote || self.kind() == hetmem_proto::DeviceKind::Coherent {
                        LaunchTarget::System {
                            host: p.region.backing_ptr(p.bi, page),
                        }
                    } else {
                        let chunk = db.chunk.as_ref()?;
                        LaunchTarget::Device {
                            handle: chunk.handle,
                            offset: page * PAGE_SIZE,
                            host: chunk.host_ptr().map(|h| h.wrapping_add(page * PAGE_SIZE)),
                            same_address: same_address
                                && p.region.same_address.as_ref().is_some_and(|(addr, _)| {
                                    // The view still where the region was reserved (an
                                    // `mremap` moves only the CPU's side).
                                    *addr + p.bi * hetmem_proto::BLOCK_BYTES + page * PAGE_SIZE
                                        == va
                                }),
                        }
                    };
                    push_page(&mut runs, va, target);
                }
                let i = blocks
                    .binary_search_by_key(&(Arc::as_ptr(&p.region) as usize, p.bi), |&(r, bi)| {
                        (Arc::as_ptr(r) as usize, bi)
                    })
                    .ok()?;
                pins[i].0 |= PageMask::from_run(p.run);
                pins[i].1 |= decl.access != Access::Read;
            }
            ranges.push((*decl, runs));
        }
        let shared = LaunchShared::new();
        for (g, &(pages, write)) in guards.iter().zip(&pins) {
            g.launches.add(LaunchPin {
                launch: shared.clone(),
                pages,
                write,
            });
        }
        drop(guards);
        // The device's counters and the access counters see a launch's pages as accessed, as
        // a kernel's (`MemEvent::DeviceAccess`).
        for (p, remote) in spans.iter().flatten().zip(&remote_pages) {
            inner.emit(MemEvent::DeviceAccess {
                dev: self.id(),
                pages: p.run.len() as u64,
                remote: *remote,
                block: &p.region.blocks[p.bi].policy,
            });
        }
        let pinned = blocks.iter().map(|&(r, bi)| (r.clone(), bi)).collect();
        Some((shared, pinned, Resident { ranges }))
    }
}

/// Adds one page to the runs, joining it to the last run when it continues it.
fn push_page(runs: &mut Vec<LaunchRun>, va: usize, target: LaunchTarget) {
    if let Some(last) = runs.last_mut() {
        let follows = last.va + last.len == va
            && match (last.target, target) {
                (
                    LaunchTarget::Device {
                        handle: h,
                        offset: o,
                        ..
                    },
                    LaunchTarget::Device { handle, offset, .. },
                ) => h == handle && o + last.len == offset,
                (LaunchTarget::System { host: h }, LaunchTarget::System { host }) => {
                    h.wrapping_add(last.len) == host
                }
                _ => false,
            };
        if follows {
            last.len += PAGE_SIZE;
            return;
        }
    }
    runs.push(LaunchRun {
        va,
        len: PAGE_SIZE,
        target,
    });
}
