//! The lease-break thread and the registry it serves.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use hetmem_proto::{Invalidation, PageRun, PAGES_PER_BLOCK};

use crate::fs_caps::LeaseProbe;
use crate::mm::file_io::FileMode;
use crate::mm::lease_break::{break_deadline, ParkedFault, Resolution};
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::work::ServiceWork;
use crate::policy::MemEvent;
use crate::sys::lease;

pub(super) type Entry = (RawFd, Weak<Runtime>, Weak<Region>);

pub(super) static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Dropped mappings whose descriptor number stays taken until the lease thread has read
/// every break signalled for it (`lease::Event::Retired`): closed at once, the number could
/// go to a new mapping, and a break still queued for the old one would hit the new one.
/// The file itself is closed at the drop (`FileBacking::retire`): the number refers to an
/// inert eventfd meanwhile.
pub(super) static RETIRING: Mutex<Vec<(RawFd, Arc<Region>)>> = Mutex::new(Vec::new());

/// Makes this process ready to serve lease breaks: the lease signal, the safety-net handlers,
/// their pipe and the lease thread (once per process, and again in a fork child). Must come
/// before any lease is taken: the thread's tid is each lease's owner. False if no lease
/// signal is free (the application uses every real-time signal), or the thread could not
/// start: then no leases.
pub fn prepare() -> bool {
    lease::install(|read_end| {
        // First use in this process (or in a fork child, which has no thread of ours and
        // must not serve its parent's mappings).
        REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // The parent's, copied by fork: theirs to drop, not ours.
        std::mem::forget(std::mem::take(
            &mut *RETIRING.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        // The thread blocks the signals and publishes its tid before it answers.
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("hetmem-lease".into())
            .spawn(move || match lease::Listener::new(read_end) {
                Ok(listener) => {
                    let _ = tx.send(true);
                    serve(listener);
                }
                Err(_) => {
                    let _ = tx.send(false);
                }
            });
        spawned.is_ok() && rx.recv() == Ok(true)
    })
    .is_ok()
}

/// The lease signal of this process and whether a SIGIO of real-time queue overflow is
/// served (`FileCapabilities::lease_signal`, `overflow_served`).
pub fn signals() -> (Option<i32>, bool) {
    (lease::signal(), lease::overflow_served())
}

/// Serves lease breaks for `region` from now on; its next fault or flush takes the lease if
/// it can (`Runtime::check_eof`). If the lease taken at `map_file` (`probe`) broke before
/// the region was registered, the break found nobody: it is given up here, so the opener
/// waiting on it proceeds at once (nothing was cached yet, there is nothing to write back).
pub fn register(inner: &Arc<Runtime>, region: &Arc<Region>) {
    let f = region.file.as_ref().expect("a file mapping");
    if !prepare() {
        // No lease signal is free, or no lease thread: no leases, as nobody would serve them.
        f.lease_wanted.store(false, Ordering::Release);
        return;
    }
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).push((
        f.file.as_raw_fd(),
        Arc::downgrade(inner),
        Arc::downgrade(region),
    ));
    let write = f.mode == FileMode::Shared;
    if !lease::held(f.file.as_fd(), write) {
        lease::release(f.file.as_fd());
    }
}

/// Tries the lease on a file `map_file` just opened, before anything is allocated for the
/// mapping: taken (and kept: the region's registration and first check take it over), or why
/// not.
pub fn probe(file: &std::fs::File, write: bool) -> LeaseProbe {
    if !prepare() {
        return LeaseProbe::SignalInUse;
    }
    match lease::take(file.as_fd(), write) {
        Ok(true) => LeaseProbe::Taken,
        Ok(false) => LeaseProbe::InUse,
        Err(e) => LeaseProbe::Refused(e.raw_os_error().unwrap_or(libc::EINVAL)),
    }
}

/// Stops serving `region` and gives its lease up.
pub fn unregister(region: &Arc<Region>) {
    let Some(f) = &region.file else {
        return;
    };
    if !f.lease_wanted.load(Ordering::Acquire) {
        return;
    }
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(_, _, r)| r.upgrade().is_some_and(|r| !Arc::ptr_eq(&r, region)));
    // Released whether or not `leased` says it is held: a check that found it breaking
    // marked it lost (`check_eof`), and the lease thread, which would have released it,
    // no longer finds this mapping. F_UNLCK of no lease does nothing.
    f.leased.store(false, Ordering::Release);
    lease::release(f.file.as_fd());
    let fd = f.file.as_raw_fd();
    let mut retiring = RETIRING.lock().unwrap_or_else(|e| e.into_inner());
    if lease::post_retired(fd) {
        retiring.push((fd, region.clone()));
    }
}

fn serve(mut listener: lease::Listener) {
    while let Ok(event) = listener.next() {
        let fd = match event {
            lease::Event::Break(fd) => fd,
            lease::Event::Retired(fd) => {
                // Every break for it is served: the descriptor may close now.
                let gone = {
                    let mut retiring = RETIRING.lock().unwrap_or_else(|e| e.into_inner());
                    let at = retiring.iter().position(|(f, _)| *f == fd);
                    at.map(|i| retiring.swap_remove(i))
                };
                drop(gone);
                continue;
            }
            lease::Event::Recheck => {
                recheck();
                continue;
            }
        };
        let found = REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(f, _, _)| *f == fd)
            .and_then(|(_, i, r)| Some((i.upgrade()?, r.upgrade()?)));
        if let Some((inner, region)) = found {
            broken(&inner, &region);
        }
    }
}

/// A SIGIO came instead of a lease signal (the kernel could not queue it): it names no
/// descriptor, so every registered mapping whose lease is not held intact is served as broken.
/// F_GETLEASE cannot tell a lease breaking to F_UNLCK (a writer's open) from no lease, so a
/// mapping that holds none is flushed and dropped too: a needless cost, never a loss.
fn recheck() {
    let all: Vec<_> = REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(_, i, r)| Some((i.upgrade()?, r.upgrade()?)))
        .collect();
    for (inner, region) in all {
        let Some(f) = &region.file else {
            continue;
        };
        if !lease::held(f.file.as_fd(), f.mode == FileMode::Shared) {
            broken(&inner, &region);
        }
    }
}

/// Another process wants the file: write our dirty pages back, drop every cached copy so
/// later accesses read the file again, then let it proceed.
fn broken(inner: &Runtime, region: &Region) {
    let Some(f) = &region.file else {
        return;
    };
    if !inner.is_owner() {
        return;
    }
    // No retake until this break is over: its release below would give up a retaken lease
    // too (`FileBacking::breaking`). Set first: a retake needs the lease gone, which the
    // kernel does only after lease-break-time, long after this thread got the signal.
    f.breaking.store(true, Ordering::SeqCst);
    let start = std::time::Instant::now();
    // New faults wait from here to the release (`mm/lease_break.rs`): the opener finds the
    // data as of the signal, and nothing is cached again behind the discard. Past the
    // deadline the kernel lets the opener in: writebacks stop, and what is still dirty is
    // conflicted instead of written over the opener's data.
    f.gate
        .close(break_deadline(start, crate::sys::lease::break_time()));
    // Pages may still be cached without the lease (a device fault let through past the
    // deadline; a kernel-mode fault the fault service had read before the gate closed):
    // taking the lease back drops them (`Runtime::retake_lease`).
    f.unleased_cache.store(true, Ordering::Release);
    if f.mode == FileMode::Shared {
        let _ = inner.flush_region(region);
    }
    for bi in 0..region.blocks.len() {
        if let Some(all) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) {
            // Discard writes dirty data back first; a page whose writeback fails stays.
            let _ = inner.invalidate(region, bi, all, Invalidation::Discard);
        }
    }
    inner.emit(MemEvent::LeaseBroken);
    if let Some(t) = inner.trace() {
        t.complete(
            "lease",
            "lease break",
            start,
            std::time::Instant::now(),
            &[("region", region.id.into())],
        );
    }
    // The release and the end of the break are one step for a retake (`retake_lease` holds
    // the same lock while it looks at `breaking` and takes the lease): a retake either comes
    // before it, and is refused, or after it, and takes a fresh lease this release cannot
    // drop. Only the release syscall runs under the lock: nothing here waits for a fault.
    let _retake = f.retake.lock().unwrap_or_else(|e| e.into_inner());
    f.leased.store(false, Ordering::Release);
    lease::release(f.file.as_fd());
    // Pages cached during the break stay marked (`unleased_cache`): the next retake drops them.
    f.unleased_cache.store(true, Ordering::Release);
    // The gate opens before the break counts as over: a retake that follows `breaking` must
    // not meet the break's deadline on its writebacks.
    let parked = f.gate.open();
    f.breaking.store(false, Ordering::SeqCst);
    drop(_retake);
    // The faults held meanwhile go on, without a lease (the opener has the file open).
    inner.serve_parked(parked);
}

impl Runtime {
    /// A CPU fault on `region`: parked at its break gate if a break is in progress (true: its
    /// thread stays asleep, and the fault is served when the gate opens). Only in the process
    /// that owns the context: a fork child's copy of a gate closed by its parent's break
    /// would never open.
    pub(crate) fn park_at_break(
        &self,
        region: &Arc<Region>,
        addr: usize,
        write: bool,
        tid: u32,
    ) -> bool {
        let Some(f) = &region.file else {
            return false;
        };
        // The flag first: no lock on the fault path while no break is in progress. A fault
        // that misses a break starting now came before its signal.
        if !f.breaking.load(std::sync::atomic::Ordering::Acquire) || !self.is_owner() {
            return false;
        }
        let parked = f.gate.park(ParkedFault { addr, write, tid });
        if parked {
            self.stats.break_waits.add(1);
            // Served at the deadline if the break is not over by then (`Runtime::serve`).
            self.parked.add(region);
        }
        parked
    }

    /// A device fault on `region`: waits while a break is in progress, until it is over or
    /// past its deadline.
    pub(crate) fn wait_at_break(&self, region: &Region) {
        let Some(f) = &region.file else {
            return;
        };
        if f.breaking.load(std::sync::atomic::Ordering::Acquire)
            && self.is_owner()
            && f.gate.wait_open()
        {
            self.stats.break_waits.add(1);
        }
    }

    /// `FileMapping::resolve_conflicts` for pages `[first, first + n)`: the file's copy wins
    /// by a revert of each conflicted run (dropped unwritten, read again at the next access;
    /// still conflicted while that runs, so no flush writes them meanwhile), the mapping's by
    /// forgetting the conflict.
    pub(crate) fn resolve_conflicts(
        &self,
        region: &Region,
        first: usize,
        n: usize,
        resolution: Resolution,
    ) -> crate::error::Result<()> {
        let Some(f) = &region.file else {
            return Ok(());
        };
        if resolution == Resolution::Theirs {
            for (bi, m) in f.conflicts.pages(first, n) {
                for run in m.runs() {
                    self.invalidate(region, bi, run, hetmem_proto::Invalidation::Revert)?;
                }
            }
        }
        f.conflicts.take(first, n);
        Ok(())
    }

    /// The CPU faults parked at gates whose break is past its deadline, queued for the fault
    /// service: a break that outlives its deadline holds them no longer (it may be waiting for
    /// a device kernel whose closure waits for one of them).
    pub(crate) fn release_expired_parked(&self) {
        self.serve_parked(self.parked.take_expired());
    }

    /// Hands CPU faults parked at a break gate back to the fault service.
    pub(crate) fn serve_parked(&self, parked: Vec<ParkedFault>) {
        if !parked.is_empty() {
            self.work
                .push(parked.into_iter().map(|p| ServiceWork::Fault {
                    addr: p.addr,
                    write: p.write,
                    tid: p.tid,
                }));
        }
    }
}
