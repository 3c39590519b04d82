//! The lease-break thread and the registry it serves.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use hetmem_proto::{Invalidation, PageRun, PAGES_PER_BLOCK};

use crate::fs_caps::LeaseProbe;
use crate::mm::file_io::FileMode;
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
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
    // From here on pages may be cached without the lease (a fault after its block's drop and
    // before the release reads the file while the other process waits): taking the lease back
    // drops them (`Runtime::retake_lease`).
    f.unleased_cache.store(true, Ordering::Release);
    let start = std::time::Instant::now();
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
    f.breaking.store(false, Ordering::SeqCst);
}
