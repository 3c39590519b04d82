//! fork(): the child gets a private copy of every managed range as of the fork, and the parent
//! carries on.
//!
//! System memory is a shared memfd, so without help a child would share it with the parent and
//! lose whatever lives in device memory (the userfaultfd registration is not inherited without
//! `EVENT_FORK`). Instead, `pthread_atfork` handlers:
//! - **prepare** (parent, before fork): close every context's [`ForkGate`], which waits for
//!   drives, event handling and device kernels in progress and holds new ones off; wait for
//!   launches still running (`Device::launch`: their kernels may be writing pages); then
//!   write-protect every CPU view, so the parent's threads cannot change data while the child
//!   copies it (their writes fault and wait).
//! - **child**: for each view, build a private anonymous copy from wherever each page's latest
//!   data lives (system memory, a coherent device's alias of it, a private device's chunk,
//!   which the child inherited as a copy-on-write snapshot) and `mremap` it over the view. The
//!   child's contexts are dead: every call on them fails with `Invalid`, and dropping them
//!   unmaps the copies. Then tell the parent.
//! - **parent** (after fork): wait for the child's word (or its death), restore write
//!   permission where the protocol has the CPU mapping writable, and open the gates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::sync::{Arc, Mutex, Weak};

use hetmem_proto::{Mem, PageMask, Proc, BLOCK_BYTES, BLOCK_WORDS, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::mm::launch::Change;
use crate::mm::region::{Region, View};
use crate::mm::runtime::Runtime;
use crate::sys::atfork::{self, Handshake};
use crate::sys::mem;

static CONTEXTS: Mutex<Vec<Weak<Runtime>>> = Mutex::new(Vec::new());
/// The contexts a fork in progress froze (prepare to parent/child).
static FROZEN: Mutex<Vec<Frozen>> = Mutex::new(Vec::new());

/// A context, its regions as prepare saw them, and its device memory staged for the child.
type Frozen = (Arc<Runtime>, Vec<Arc<Region>>, Vec<Staged>);

/// One block's chunk of device memory the host cannot address (a GPU's), read out through its
/// backend by prepare: the child inherits this host copy, as it inherits a simulated chunk's
/// memory, and copies the pages whose latest data lives there from it.
#[derive(Debug)]
struct Staged {
    /// The region, by address: identity only.
    region: usize,
    bi: usize,
    dev: usize,
    data: Vec<u8>,
}

/// Reads out every chunk of `regions` that the host cannot address, with the gate closed (no
/// drive changes a chunk meanwhile). A copy that fails is counted (`stats().errors`): the
/// child's pages from that chunk then read zero.
#[allow(unsafe_code)]
fn stage_unaddressable(inner: &Runtime, regions: &[Arc<Region>]) -> Vec<Staged> {
    let mut staged = Vec::new();
    for r in regions {
        for (bi, slot) in r.blocks.iter().enumerate() {
            for (d, dev) in inner.devices.iter().enumerate() {
                if slot.held[d].load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let db = slot.dev[d].read().unwrap_or_else(|e| e.into_inner());
                let Some(chunk) = db.chunk.as_ref().filter(|c| c.host_ptr().is_none()) else {
                    continue;
                };
                let Some(mut data) = mem::try_zeroed(BLOCK_BYTES) else {
                    inner.note_error(
                        "stage device memory for fork",
                        &std::io::ErrorKind::OutOfMemory.into(),
                    );
                    continue;
                };
                let op = crate::device::CopyOp {
                    src: crate::device::Endpoint::Chunk(chunk, 0),
                    dst: crate::device::Endpoint::Host(data.as_mut_ptr()),
                    len: BLOCK_BYTES,
                };
                // SAFETY: the destination is ours and outlives the wait; the chunk's contents
                // are stable, since the closed gate holds off every drive and kernel.
                let done = unsafe { dev.backend.copy(&[op]) }.and_then(|f| dev.backend.wait(f));
                match done {
                    Ok(()) => staged.push(Staged {
                        region: Arc::as_ptr(r) as usize,
                        bi,
                        dev: d,
                        data,
                    }),
                    Err(e) => {
                        inner.note_error("stage device memory for fork", &std::io::Error::other(e))
                    }
                }
            }
        }
    }
    staged
}
/// Serialises concurrent forks; a spin flag because the child must be able to release it.
static FORKING: AtomicBool = AtomicBool::new(false);
/// The child's word to the parent that its copies are made.
static HANDSHAKE: Handshake = Handshake::new();
static INSTALL: Once = Once::new();

/// Makes fork() safe for `inner`'s managed memory.
pub(crate) fn track(inner: &Arc<Runtime>) {
    INSTALL.call_once(|| {
        let _ = atfork::install(prepare, parent, child);
    });
    let mut list = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.push(Arc::downgrade(inner));
}

extern "C" fn prepare() {
    while FORKING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
    let live: Vec<Arc<Runtime>> = CONTEXTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|i| i.is_owner())
        .collect();
    let mut frozen = Vec::new();
    for inner in live {
        inner.gate.close();
        let regions = inner.space.regions();
        wait_for_launches(&inner, &regions);
        for r in &regions {
            for v in r.views.read().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = inner.uffd.write_protect(v.va, v.len, true, false);
            }
        }
        let staged = stage_unaddressable(&inner, &regions);
        frozen.push((inner, regions, staged));
    }
    HANDSHAKE.open();
    *FROZEN.lock().unwrap_or_else(|e| e.into_inner()) = frozen;
    // Held across the fork, as the file module's locks are: a context made meanwhile by
    // another thread (`track`) must not leave the child a locked list. Taken again here, not
    // kept from above: a thread inside a gate may be making a context.
    let contexts = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    CONTEXTS_HELD.with(|h| *h.borrow_mut() = Some(contexts));
    hold_file_locks();
}

/// Waits for every launch still running over managed memory (`Device::launch`): a kernel
/// writing pages while the child copies them would leave it torn data. The gate is closed, so
/// no launch pins anything new; one pinned but not yet submitted takes no lock of ours to be
/// submitted, so waiting for it cannot deadlock.
fn wait_for_launches(inner: &Runtime, regions: &[Arc<Region>]) {
    let all = hetmem_proto::PageRun::new(0, PAGES_PER_BLOCK, PAGES_PER_BLOCK).expect("non-empty");
    for r in regions {
        for slot in r.blocks.iter() {
            for (d, dev) in slot.dev.iter().enumerate() {
                let running = dev
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .launches
                    .blocking(all, Change::Unmap);
                if running.is_empty() {
                    continue;
                }
                if let Some(dev) = hetmem_proto::DeviceId::new(d) {
                    inner.emit(crate::policy::MemEvent::LaunchWaited { dev });
                }
                for l in running {
                    // The launch's error is its owner's to see; fork only needs it ended.
                    let _ = l.wait();
                }
            }
        }
    }
}

thread_local! {
    /// `CONTEXTS`, locked by the forking thread from prepare to parent/child.
    static CONTEXTS_HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Vec<Weak<Runtime>>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Lets go of the locks prepare held across the fork.
fn release_held() {
    release_file_locks();
    CONTEXTS_HELD.with(|h| h.borrow_mut().take());
}

extern "C" fn parent() {
    release_held();
    let frozen = std::mem::take(&mut *FROZEN.lock().unwrap_or_else(|e| e.into_inner()));
    // Wait until the child has copied everything (or died).
    HANDSHAKE.wait_for_child();
    for (inner, _, _) in &frozen {
        restore_write(inner);
        inner.gate.open();
    }
    FORKING.store(false, Ordering::Release);
}

/// Clears the write protection prepare set, where the protocol maps the CPU writable.
fn restore_write(inner: &Runtime) {
    let regions = inner.space.regions();
    for r in regions {
        let mut ranges = Vec::new();
        for (bi, slot) in r.blocks.iter().enumerate() {
            let writable: PageMask<BLOCK_WORDS> = {
                let b = slot.engine.lock().unwrap_or_else(|e| e.into_inner());
                b.state().mapped_writable_by(Proc::Cpu)
            };
            for run in writable.runs() {
                ranges.clear();
                r.cpu_ranges(
                    bi * BLOCK_BYTES + run.start() * PAGE_SIZE,
                    run.len() * PAGE_SIZE,
                    &mut ranges,
                );
                for &(va, len) in &ranges {
                    let _ = inner.uffd.write_protect(va, len, false, true);
                }
            }
        }
    }
}

#[allow(unsafe_code)]
extern "C" fn child() {
    release_held();
    let frozen = std::mem::take(&mut *FROZEN.lock().unwrap_or_else(|e| e.into_inner()));
    for (inner, regions, staged) in &frozen {
        inner.orphan();
        for r in regions {
            let views = r.views.read().unwrap_or_else(|e| e.into_inner()).clone();
            for v in views {
                // The copy keeps each part of the view's protection (an mprotect of the
                // application's), as a fork child's private memory does.
                let protect: Vec<(usize, usize, mem::Prot)> = mem::maps_in(v.va, v.va + v.len)
                    .unwrap_or_default()
                    .iter()
                    .filter(|m| m.inode == r.inode)
                    .filter_map(|m| {
                        let b = m.perms.as_bytes();
                        let prot = match (b.first() == Some(&b'r'), b.get(1) == Some(&b'w')) {
                            (true, true) => return None,
                            (true, false) => mem::Prot::Read,
                            (false, _) => mem::Prot::None,
                        };
                        let (s, e) = (m.start.max(v.va), m.end.min(v.va + v.len));
                        Some((s - v.va, e - s, prot))
                    })
                    .collect();
                // SAFETY: replaces the child's inherited shared view with its private copy at
                // the same address, so the child's pointers stay valid and see the same data
                // (`copy_view` writes every page's latest data). The parent's threads are held
                // off by the closed gate and write protection, and the child has no others.
                let _ = unsafe {
                    mem::replace_with_private(
                        v.va,
                        v.len,
                        |copy| copy_view(inner, r, &v, staged, copy),
                        &protect,
                    )
                };
            }
        }
    }
    HANDSHAKE.tell_parent();
    FORKING.store(false, Ordering::Release);
}

/// Writes the latest data of each page of view `v` into `copy`, from wherever it lives (system
/// memory, a coherent device's alias of it, a private device's chunk, which the child
/// inherited as a copy-on-write snapshot or, where the host cannot address it, as prepare's
/// staged copy, or the file for a file page nobody touched).
#[allow(unsafe_code)]
fn copy_view(inner: &Runtime, r: &Region, v: &View, staged: &[Staged], copy: &mut [u8]) {
    let mut at = 0;
    while at < v.len {
        let off = v.off + at;
        let (bi, page) = (off / BLOCK_BYTES, (off % BLOCK_BYTES) / PAGE_SIZE);
        let slot = &r.blocks[bi];
        let view = slot
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .page(page);
        let dst = &mut copy[at..at + PAGE_SIZE];
        let nowhere = view.valid == 0;
        let adopted = nowhere
            && slot
                .adopted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(page);
        let src = if view.is_valid_in(Mem::System)
            || adopted
            || inner
                .topology
                .devices()
                .any(|d| inner.topology.is_coherent(d) && view.is_valid_in(Mem::Device(d)))
        {
            // System memory holds the data: the latest copy, or what `register` adopted and
            // nobody has touched since.
            Some(r.backing_ptr(bi, page))
        } else if nowhere && view.file {
            // A file page nobody touched: what the file holds (a read past its end leaves
            // zeros).
            if let Some(f) = &r.file {
                let at = (f.first_page + (bi * PAGES_PER_BLOCK + page) as u64) * PAGE_SIZE as u64;
                let _ = std::os::unix::fs::FileExt::read_at(&f.file, dst, at);
            }
            None
        } else {
            inner
                .topology
                .devices()
                .find(|&d| view.is_valid_in(Mem::Device(d)))
                .and_then(|d| {
                    let db = slot.dev[d.index()]
                        .read()
                        .unwrap_or_else(|e| e.into_inner());
                    let chunk = db.chunk.as_ref()?;
                    let base = chunk.host_ptr().or_else(|| {
                        staged
                            .iter()
                            .find(|s| {
                                s.region == r as *const Region as usize
                                    && s.bi == bi
                                    && s.dev == d.index()
                            })
                            .map(|s| s.data.as_ptr().cast_mut())
                    })?;
                    Some(base.wrapping_add(page * PAGE_SIZE))
                })
        };
        if let Some(src) = src {
            // SAFETY: `src` is a mapped 4 KiB page holding the latest data of the page (the
            // backing view, or the child's copy-on-write snapshot of a private device chunk),
            // which nobody writes: the parent's threads are held off by the closed gate and
            // write protection, and the child has no others.
            unsafe { mem::copy(dst.as_mut_ptr(), src, PAGE_SIZE) };
        }
        at += PAGE_SIZE;
    }
}

/// The file mappings' process-wide locks, held by the forking thread from fork's prepare
/// handler to its parent and child handlers: a child must not inherit one locked
/// by a thread it does not have, or its first `map_file` would wait for ever.
struct ForkHeld {
    _files: std::sync::MutexGuard<'static, crate::mm::file_io::Files>,
    _registry: std::sync::MutexGuard<'static, Vec<crate::mm::leases::Entry>>,
    _retiring: std::sync::MutexGuard<'static, Vec<(std::os::fd::RawFd, Arc<Region>)>>,
    _install: std::sync::MutexGuard<'static, ()>,
    _kept: std::sync::MutexGuard<'static, Vec<crate::mm::lifecycle::KeptMapping>>,
    _flusher: std::sync::MutexGuard<'static, crate::mm::flusher::Queue>,
}

thread_local! {
    static FORK_HELD: std::cell::RefCell<Option<ForkHeld>> = const { std::cell::RefCell::new(None) };
}

/// Fork's prepare handler: takes the locks (after the contexts' gates; nothing holds one of
/// these while it waits for a gate).
fn hold_file_locks() {
    let held = ForkHeld {
        _install: crate::sys::lease::hold_install(),
        _registry: crate::mm::leases::REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
        _retiring: crate::mm::leases::RETIRING
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
        _files: crate::mm::file_io::lock_files(),
        _kept: crate::mm::lifecycle::KEPT
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
        _flusher: crate::mm::flusher::hold_for_fork(),
    };
    FORK_HELD.with(|h| *h.borrow_mut() = Some(held));
}

/// Fork's parent and child handlers: lets the locks go.
fn release_file_locks() {
    FORK_HELD.with(|h| h.borrow_mut().take());
}
