//! Simulated devices with dmirror's semantics: a page table per block (their backend's),
//! memory of their own
//! (private) or aliased with system memory (coherent), faults served through the protocol in
//! batches, and kernels that run on worker threads over translated runs of pages.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hetmem_proto::{
    Access, DeviceId, DeviceKind, MapMode, Mem, PageRun, Proc, RequestKind, PAGES_PER_BLOCK,
    PAGE_SIZE,
};

use crate::device::{Chunk, DeviceCounters, Pte};
use crate::error::{Error, Result};
use crate::mm::runtime::RuntimeHandle;
use crate::mm::space::BlockSpan;
use crate::policy::MemEvent;
use crate::raw::RawRange;
use crate::sys::mem;

/// A kernel launch's access, for `access_pieces`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Read,
    Write,
}

/// What a command does with each translated piece: its runs as `(address, memory)`.
type RunFn<'a> = dyn Fn(&BlockSpan, &[(usize, RawRange)]) + Sync + 'a;

/// Where a CPU access to a page would find its data, per [`PageState::location`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// No data yet: reads zero.
    None,
    /// System memory.
    System,
    /// This device's private memory.
    PrivateLocal,
    /// Another device's private memory.
    PrivateRemote,
    /// This device's coherent memory.
    CoherentLocal,
    /// Another device's coherent memory.
    CoherentRemote,
}

/// The CPU's permission on a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProt {
    /// Not mapped.
    None,
    /// Read-only.
    Read,
    /// Read-write.
    Write,
}

/// One page of a snapshot, in the spirit of HMM_DMIRROR_SNAPSHOT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageState {
    /// The CPU's mapping.
    pub cpu: CpuProt,
    /// Where the data is.
    pub location: Location,
    /// This device's page-table entry: `None`, `Some(Read)`, `Some(ReadWrite)`,
    /// `Some(Exclusive)`.
    pub device: Option<MapMode>,
    /// The page is not managed (unmapped) or not accessible (PROT_NONE).
    pub error: bool,
}

/// A simulated device (dmirror-like). Clones share it.
#[derive(Clone, Debug)]
pub struct Device {
    pub(super) shared: Arc<RuntimeHandle>,
    id: DeviceId,
}

pub(super) fn satisfies(e: Pte, access: Access) -> bool {
    match (access, e.mode) {
        (_, None) => false,
        (Access::Read, Some(_)) => true,
        (Access::Write, Some(m)) => m != MapMode::Read,
        (Access::Atomic, Some(m)) => m == MapMode::Exclusive,
    }
}

/// Runs `f` over `items` from up to `workers` threads named `name(w)`, each taking the next
/// item; the first error stops the others and is returned. Items no thread took (every spawn
/// failed) run on this thread, so none is skipped.
pub(super) fn for_each_parallel<T: Sync>(
    items: &[T],
    workers: usize,
    name: impl Fn(usize) -> String,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_err = std::sync::Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else {
            return;
        };
        if let Err(e) = f(item) {
            first_err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
            next.store(items.len(), Ordering::Relaxed);
            return;
        }
    };
    std::thread::scope(|s| {
        for w in 0..workers.min(items.len()) {
            let _ = std::thread::Builder::new()
                .name(name(w))
                .spawn_scoped(s, work);
        }
    });
    work();
    match first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Device {
    pub(crate) fn new(shared: Arc<RuntimeHandle>, id: DeviceId) -> Self {
        Self { shared, id }
    }

    pub(super) fn inner(&self) -> &crate::mm::runtime::Runtime {
        &self.shared.inner
    }

    /// Its id in the protocol.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Private or coherent.
    pub fn kind(&self) -> DeviceKind {
        self.inner().devices[self.id.index()].kind()
    }

    /// Capacity in pages.
    pub fn capacity_pages(&self) -> u32 {
        self.inner().budget.capacity(self.id)
    }

    /// Frames in use, in pages.
    pub fn used_pages(&self) -> u32 {
        self.inner().budget.used(self.id)
    }

    /// Counters since the last reset.
    pub fn counters(&self) -> DeviceCounters {
        self.inner().devices[self.id.index()].counters.snapshot()
    }

    /// Resets the counters.
    pub fn reset_counters(&self) {
        let c = &self.inner().devices[self.id.index()].counters;
        c.faults.reset();
        c.pages.reset();
        c.migrated_in.reset();
        c.migrated_out.reset();
        c.evicted.reset();
    }

    /// Faults `pieces` in for `access` until the device maps all of them; then calls `f` for
    /// each piece under the page-table read lock. The caller has checked their protection
    /// (`Runtime::check_access`).
    fn access_pieces(
        &self,
        pieces: &[BlockSpan],
        access: Access,
        f: &RunFn<'_>,
        rounds: &AtomicU32,
        kernel: Option<Kernel>,
    ) -> Result<()> {
        let inner = self.inner();
        let d = self.id.index();
        for p in pieces {
            let slot = &p.region.blocks[p.bi];
            let mut tries = 0u32;
            let mut remote = 0u64;
            loop {
                let ran = {
                    let _gate = inner.gate.enter();
                    let db = slot.dev[d].read().unwrap_or_else(|e| e.into_inner());
                    let entries: Vec<Pte> = p.run.pages().map(|i| db.entry(i)).collect();
                    if entries.iter().all(|&e| satisfies(e, access)) {
                        let private = self.kind() == DeviceKind::Private;
                        let mut runs = Vec::new();
                        // Staging buffers of runs the host cannot address: (chunk, first
                        // page, bytes), written back after `f` for a write.
                        let mut staged: Vec<(&Chunk, usize, Vec<u8>)> = Vec::new();
                        let mut i = 0;
                        while i < entries.len() {
                            let local_private = !entries[i].remote && private;
                            let mut j = i + 1;
                            while j < entries.len()
                                && (!entries[j].remote && private) == local_private
                            {
                                j += 1;
                            }
                            let page = p.run.start() + i;
                            let ptr = if local_private {
                                let chunk = db.chunk.as_ref();
                                match (chunk.and_then(Chunk::host_ptr), chunk, kernel) {
                                    (Some(c), _, _) => c.wrapping_add(page * PAGE_SIZE),
                                    // A command (`read`, `write`, `exclusive`) on memory the
                                    // host cannot address goes through a staging buffer and
                                    // the backend's copies, as file I/O does.
                                    (None, Some(chunk), None) => {
                                        let len = (j - i) * PAGE_SIZE;
                                        let mut buf = mem::try_zeroed(len).ok_or(Error::NoMem)?;
                                        self.stage(chunk, page, &mut buf, false)?;
                                        let ptr = buf.as_mut_ptr();
                                        staged.push((chunk, page, buf));
                                        ptr
                                    }
                                    _ => {
                                        return Err(Error::Invalid(
                                            "device memory is not host-addressable",
                                        ))
                                    }
                                }
                            } else {
                                p.region.backing_ptr(p.bi, page)
                            };
                            runs.push((
                                p.va + i * PAGE_SIZE,
                                RawRange {
                                    ptr,
                                    len: (j - i) * PAGE_SIZE,
                                },
                            ));
                            i = j;
                        }
                        // A kernel's closure may touch its pages through the CPU: the fault
                        // service must recognise its worker (`mm/kernel_cpu.rs`).
                        let registered = kernel.map(|_| {
                            let spans: Vec<(usize, usize, usize)> = runs
                                .iter()
                                .map(|&(va, r)| (va, r.ptr as usize, r.len))
                                .collect();
                            inner.kernel_runs.enter(p, self.id, &spans)
                        });
                        f(p, &runs);
                        if access != Access::Read {
                            for (chunk, page, buf) in &mut staged {
                                self.stage(chunk, *page, buf, true)?;
                            }
                        }
                        remote = entries.iter().filter(|e| e.remote).count() as u64;
                        inner.emit(MemEvent::DeviceAccess {
                            dev: self.id,
                            pages: p.run.len() as u64,
                            remote,
                            block: &slot.policy,
                        });
                        Some(registered)
                    } else {
                        None
                    }
                };
                if let Some(registered) = ran {
                    if let (Some(r), Some(k)) = (registered, kernel) {
                        inner.settle_kernel_run(p, r, k == Kernel::Write)?;
                    }
                    if remote > 0 {
                        // Access counters: the policy may want the block here now.
                        inner.after_remote_access(p, self.id, remote);
                    }
                    break;
                }
                self.fault_again(p, access, &mut tries, rounds)?;
            }
        }
        Ok(())
    }

    /// Copies between `buf` and the chunk's bytes from `page` on, through the backend's copy
    /// engine: into the chunk when `to_device`, else out of it. The caller holds the block's
    /// page-table read lock with the pages mapped for this device, so they stay put.
    #[allow(unsafe_code)]
    fn stage(&self, chunk: &Chunk, page: usize, buf: &mut [u8], to_device: bool) -> Result<()> {
        let backend = &self.inner().devices[self.id.index()].backend;
        let (host, dev) = (
            crate::device::Endpoint::Host(buf.as_mut_ptr()),
            crate::device::Endpoint::Chunk(chunk, page * PAGE_SIZE),
        );
        let op = crate::device::CopyOp {
            src: if to_device { host } else { dev },
            dst: if to_device { dev } else { host },
            len: buf.len(),
        };
        // SAFETY: `buf` is ours and lives until the copy is waited for below; the chunk's
        // pages are mapped for this device and the page-table read lock keeps every change
        // of them out meanwhile.
        let fence = unsafe { backend.copy(&[op]) }.map_err(Error::Io)?;
        backend.wait(fence).map_err(Error::Io)
    }

    /// Faults `pieces` in for `access` until the device maps all of them, running nothing: a
    /// launch's residency on a device that cannot take page faults.
    pub(super) fn make_resident(
        &self,
        pieces: &[BlockSpan],
        access: Access,
        rounds: &AtomicU32,
    ) -> Result<()> {
        let inner = self.inner();
        let d = self.id.index();
        for p in pieces {
            let mut tries = 0u32;
            loop {
                let mapped = {
                    let _gate = inner.gate.enter();
                    let db = p.region.blocks[p.bi].dev[d]
                        .read()
                        .unwrap_or_else(|e| e.into_inner());
                    db.all(p.run.pages(), |e| satisfies(e, access))
                };
                if mapped {
                    break;
                }
                self.fault_again(p, access, &mut tries, rounds)?;
            }
        }
        Ok(())
    }

    /// One more device fault on a piece whose pages the device does not map yet: counts the
    /// command's fault round on the first, and gives up after 10,000 (another thread keeps
    /// taking the pages away).
    fn fault_again(
        &self,
        p: &BlockSpan,
        access: Access,
        tries: &mut u32,
        rounds: &AtomicU32,
    ) -> Result<()> {
        *tries += 1;
        if *tries > 10_000 {
            return Err(Error::Fault("device fault did not converge"));
        }
        if *tries == 1 {
            rounds.fetch_add(1, Ordering::Relaxed);
        }
        self.fault(p, access)
    }

    /// A device fault on a piece, served by the protocol.
    fn fault(&self, p: &BlockSpan, access: Access) -> Result<()> {
        let inner = self.inner();
        // A lease break of a file mapping holds new device faults until it is over.
        inner.wait_at_break(&p.region);
        inner.emit(MemEvent::DeviceFault { dev: self.id });
        let prefetch = inner.place_device_fault(p, self.id, access);
        let start = std::time::Instant::now();
        let r = inner.request(
            &p.region,
            p.bi,
            p.run,
            RequestKind::Fault {
                proc: Proc::Device(self.id),
                access,
            },
        );
        if let Some(t) = inner.trace() {
            t.complete(
                "fault",
                "device fault",
                start,
                std::time::Instant::now(),
                &[
                    ("proc", crate::trace::mem_name(Mem::Device(self.id)).into()),
                    ("region", p.region.id.into()),
                    ("block", p.bi.into()),
                    ("page", p.run.start().into()),
                    ("pages", p.run.len().into()),
                    ("write", u64::from(access != Access::Read).into()),
                    ("result", if r.is_ok() { "ok" } else { "error" }.into()),
                ],
            );
        }
        if let (Ok(()), Some(run)) = (&r, prefetch) {
            inner.prefetch_for_device(p, self.id, run, access);
        }
        r
    }

    /// Runs a command over `pieces`, which the caller got (and so checked) with
    /// `Runtime::pieces`.
    fn run_command(&self, pieces: &[BlockSpan], access: Access, f: &RunFn<'_>) -> Result<()> {
        self.inner().check_access(pieces, access)?;
        let rounds = AtomicU32::new(0);
        let r = self.access_pieces(pieces, access, f, &rounds, None);
        let n = rounds.load(Ordering::Relaxed);
        if n > 0 {
            self.inner()
                .emit(MemEvent::DeviceCommandFaulted { dev: self.id });
        }
        r
    }

    /// Reads through the device page table, faulting as needed.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory or is `PROT_NONE`;
    /// `NoMem` (ENOMEM) when the result cannot fit in the machine's memory, or the device is
    /// full and nothing can be evicted; `Io` when a copy fails.
    #[allow(unsafe_code)]
    pub fn read(&self, addr: usize, len: usize) -> Result<Vec<u8>> {
        // The range first: the result is allocated only for a range that is all managed.
        let pieces = self.inner().pieces(addr, len)?;
        let out = mem::try_zeroed(len).ok_or(Error::NoMem)?;
        let out = std::sync::Mutex::new(out);
        self.run_command(&pieces, Access::Read, &|_, runs| {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            for &(va, r) in runs {
                // SAFETY: the page-table read lock is held and the device maps these pages, so
                // the protocol keeps the memory valid and unwritten by others for now.
                let src = unsafe { r.as_slice() };
                o[va - addr..va - addr + r.len].copy_from_slice(src);
            }
        })?;
        Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes through the device page table, faulting as needed.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for empty or unaligned data, a range that wraps, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory or is `PROT_NONE`; `Perm`
    /// (EPERM) when it is read-only; `NoMem` (ENOMEM) when the device is full and nothing can
    /// be evicted; `Io` when a copy fails.
    #[allow(unsafe_code)]
    pub fn write(&self, addr: usize, data: &[u8]) -> Result<()> {
        let pieces = self.inner().pieces(addr, data.len())?;
        self.run_command(&pieces, Access::Write, &|_, runs| {
            for &(va, r) in runs {
                // SAFETY: the device maps these pages writable, which the protocol grants to
                // one processor at a time; the read lock keeps the mapping from going away.
                let dst = unsafe { r.as_mut_slice() };
                dst.copy_from_slice(&data[va - addr..va - addr + r.len]);
            }
        })
    }

    /// Maps the range exclusively for device atomics (`make_device_exclusive`); any CPU access
    /// revokes it.
    ///
    /// # Errors
    /// As [`Device::write`].
    pub fn exclusive(&self, addr: usize, len: usize) -> Result<()> {
        let pieces = self.inner().pieces(addr, len)?;
        self.run_command(&pieces, Access::Atomic, &|_, _| {})
    }

    /// Whether every page is still mapped exclusive by this device.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `Fault` (EFAULT) when part of the range is not managed memory.
    pub fn check_exclusive(&self, addr: usize, len: usize) -> Result<bool> {
        let pieces = self.inner().pieces(addr, len)?;
        Ok(pieces.iter().all(|p| {
            let db = p.region.blocks[p.bi].dev[self.id.index()]
                .read()
                .unwrap_or_else(|e| e.into_inner());
            db.all(p.run.pages(), |e| e.mode == Some(MapMode::Exclusive))
        }))
    }

    /// Migrates the range into this device's memory.
    ///
    /// # Errors
    /// As [`Hetmem::migrate`](crate::Hetmem::migrate).
    pub fn migrate_to_device(&self, addr: usize, len: usize) -> Result<()> {
        self.inner().migrate(addr, len, Mem::Device(self.id))
    }

    /// Migrates the range to system memory.
    ///
    /// # Errors
    /// As [`Hetmem::migrate`](crate::Hetmem::migrate).
    pub fn migrate_to_system(&self, addr: usize, len: usize) -> Result<()> {
        self.inner().migrate(addr, len, Mem::System)
    }

    /// Per-page state, without faulting or moving anything. Pages that are not managed memory
    /// are entries with `error` set, as dmirror's snapshot reports holes.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) for an empty, unaligned or wrapping range, and in a fork child;
    /// `NoMem` (ENOMEM) when the result cannot fit in the machine's memory.
    pub fn snapshot(&self, addr: usize, len: usize) -> Result<Vec<PageState>> {
        let inner = self.inner();
        let end = inner.check_range(addr, len)?;
        let topo = &inner.topology;
        let mut out = mem::try_vec(len / PAGE_SIZE).ok_or(Error::NoMem)?;
        let mut at = addr;
        while at < end {
            let Ok(pieces) = inner.pieces(at, PAGE_SIZE) else {
                // Not managed, up to the next view: error entries, all at once, so a range
                // that is mostly unmanaged costs no lookup per page.
                let next = inner.space.next_view(at, end);
                let hole = PageState {
                    cpu: CpuProt::None,
                    location: Location::None,
                    device: None,
                    error: true,
                };
                out.extend(std::iter::repeat_n(hole, (next - at).div_ceil(PAGE_SIZE)));
                at = next;
                continue;
            };
            let p = &pieces[0];
            let page = p.run.start();
            let slot = &p.region.blocks[p.bi];
            let v = inner.lock_block(slot).page(page);
            let e = slot.dev[self.id.index()]
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .entry(page);
            let location = if v.is_valid_in(Mem::Device(self.id)) {
                if topo.is_coherent(self.id) {
                    Location::CoherentLocal
                } else {
                    Location::PrivateLocal
                }
            } else if v.is_valid_in(Mem::System) {
                Location::System
            } else if let Some(other) = topo.devices().find(|&d| v.is_valid_in(Mem::Device(d))) {
                if topo.is_coherent(other) {
                    Location::CoherentRemote
                } else {
                    Location::PrivateRemote
                }
            } else {
                Location::None
            };
            let vma = mem::vma_at(at).ok().flatten();
            let accessible = vma.is_some_and(|(_, _, r, _)| r);
            let writable = vma.is_some_and(|(_, _, _, w)| w);
            out.push(PageState {
                // What the CPU can do: the protocol's mapping, capped by the mapping's protection.
                cpu: match v.mapping_of(Proc::Cpu) {
                    None => CpuProt::None,
                    Some(_) if !accessible => CpuProt::None,
                    Some((MapMode::Read, _)) => CpuProt::Read,
                    Some(_) if !writable => CpuProt::Read,
                    Some(_) => CpuProt::Write,
                },
                location,
                device: e.mode,
                error: !v.managed || !accessible,
            });
            at += PAGE_SIZE;
        }
        Ok(out)
    }

    /// Every page on the device goes back to system memory with its data; every mapping of
    /// the device goes.
    ///
    /// # Errors
    /// `Invalid` (EINVAL) in a fork child; `Io` when a copy home fails (the data stays on the
    /// device).
    pub fn release(&self) -> Result<()> {
        let inner = self.inner();
        // In a fork child the fork gate stays closed for good: taking a block would block.
        inner.check_owner()?;
        let regions = inner.space.regions();
        for r in regions {
            for bi in 0..r.blocks.len() {
                let all = PageRun::new(0, r.block_pages(bi), PAGES_PER_BLOCK).expect("non-empty");
                inner.request(&r, bi, all, RequestKind::Release { dev: self.id })?;
            }
        }
        Ok(())
    }

    fn kernel(&self, addr: usize, len: usize, access: Access, f: &RunFn<'_>) -> Result<()> {
        let start = std::time::Instant::now();
        let r = self.launch_closure(addr, len, access, f);
        if let Some(t) = self.inner().trace() {
            t.complete(
                "launch",
                match access {
                    Access::Read => "kernel_read",
                    _ => "kernel_write",
                },
                start,
                std::time::Instant::now(),
                &[
                    ("dev", crate::trace::mem_name(Mem::Device(self.id)).into()),
                    ("addr", addr.into()),
                    ("len", len.into()),
                    ("result", if r.is_ok() { "ok" } else { "error" }.into()),
                ],
            );
        }
        r
    }

    fn launch_closure(&self, addr: usize, len: usize, access: Access, f: &RunFn<'_>) -> Result<()> {
        let pieces = self.inner().pieces(addr, len)?;
        self.inner().check_access(&pieces, access)?;
        let rounds = AtomicU32::new(0);
        let state = &self.inner().devices[self.id.index()];
        if !state.backend.demand_faults() {
            // A device that cannot take page faults (a GPU without kernel HMM) runs a launch
            // only over memory made resident before it starts: the whole declared range is
            // faulted in first, and a range larger than the device is refused.
            let pages: usize = pieces.iter().map(|p| p.run.len()).sum();
            if pages > self.capacity_pages() as usize {
                return Err(Error::NoMem);
            }
            self.make_resident(&pieces, access, &rounds)?;
        }
        let workers = state.kernel_workers.max(1);
        let kind = match access {
            Access::Read => Kernel::Read,
            _ => Kernel::Write,
        };
        let r = for_each_parallel(
            &pieces,
            workers,
            |w| format!("hetmem-dev{}-w{w}", self.id.index()),
            |p| self.access_pieces(std::slice::from_ref(p), access, f, &rounds, Some(kind)),
        );
        if rounds.load(Ordering::Relaxed) > 0 {
            self.inner()
                .emit(MemEvent::DeviceCommandFaulted { dev: self.id });
        }
        r
    }

    /// Runs `f` on the device's worker threads over `[addr, addr + len)`, once per translated
    /// run of pages (at most one 2 MiB block), read-only. `f` gets the run's address and its
    /// bytes in device-reachable memory.
    ///
    /// # Errors
    /// As [`Device::read`], with no result to allocate; nothing runs when the range is refused.
    #[allow(unsafe_code)]
    pub fn kernel_read<F>(&self, addr: usize, len: usize, f: F) -> Result<()>
    where
        F: Fn(usize, &[u8]) + Sync,
    {
        self.kernel(addr, len, Access::Read, &|_, runs| {
            for &(va, r) in runs {
                // SAFETY: mapped readable by this device; the read lock is held during `f`.
                f(va, unsafe { r.as_slice() });
            }
        })
    }

    /// Like [`Device::kernel_read`], writable. Runs of one launch never overlap.
    ///
    /// # Errors
    /// As [`Device::write`]; nothing runs when the range is refused.
    #[allow(unsafe_code)]
    pub fn kernel_write<F>(&self, addr: usize, len: usize, f: F) -> Result<()>
    where
        F: Fn(usize, &mut [u8]) + Sync,
    {
        self.kernel(addr, len, Access::Write, &|_, runs| {
            for &(va, r) in runs {
                // SAFETY: mapped writable by this device alone (the protocol's single-writer
                // rule); the read lock is held during `f`; pieces of a launch are disjoint.
                f(va, unsafe { r.as_mut_slice() });
            }
        })
    }
}
