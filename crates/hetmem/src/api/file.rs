//! File mappings: a file's pages as managed memory (`docs/file-contract.md`).
//!
//! hetmem keeps its own cache of the file's pages above the kernel's page cache: a region like an
//! allocation, whose blocks are file-backed in the protocol. First touches read the file (`pread`,
//! straight into device memory for a device fault); writebacks write it (`pwrite`, straight from
//! device memory), never waiting for the file's inode lock (`sys::file`, contract §12). `flush`
//! hands the dirty pages over to the file (a kernel MAP_SHARED store needs no such step: it is in
//! the page cache at once), `sync` adds fdatasync (what msync(MS_SYNC) gives), `close` writes dirty
//! pages back and unmaps, reporting errors, and dropping the mapping writes them back first too,
//! keeping the mapping if it cannot (contract §13). `flush_range` and `invalidate_range` do a flush
//! and a drop for a range, for applications that share the file with other writers by file locks
//! instead of the lease (contract §6, "Extent operations and file locks"). Other paths write the
//! file too (a lease break, eviction with `evict_to_file`, a partial munmap): every one, and what
//! each kind of crash leaves of the file, is in contract §5.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hetmem_proto::{BLOCK_BYTES, PAGE_SIZE};

use crate::api::buffer::RegionHandle;
use crate::api::hetmem::Hetmem;
use crate::error::{Error, Result};
use crate::fs_caps::{FileCapabilities, Filesystem, LeaseProbe};
use crate::mm::file_io::{BreakBudget, ErrSeq, FileBacking, FileCache, FileIo, FileMode, Unsynced};
use crate::mm::lease_break::Resolution;
use crate::mm::lifecycle::{KeptMapping, KEPT};
use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::testing::FileFaults;
use crate::raw::CpuView;
use crate::sys::file::{self as sys_file};

/// A file mapped as managed memory ([`Hetmem::map_file`]).
///
/// Dropping it writes dirty pages back and unmaps; if a page cannot be written, the mapping is
/// kept instead, for [`Hetmem::take_kept_file_mappings`]. [`FileMapping::close`] is the drop
/// that reports (`docs/file-contract.md` §13).
///
/// A Shared mapping's writes reach the file only when written back, and not only by `flush`
/// and `sync`: also by a lease break (any other open of the file), eviction with
/// `evict_to_file`, a partial unmap, `discard` and `invalidate_range` (every path: contract
/// §5.1). What the process's death keeps is what was written back; what a power loss keeps is
/// what the last [`FileMapping::sync`] that returned `Ok` covered, and possibly some of what was
/// written back since (§5).
#[derive(Debug)]
pub struct FileMapping {
    handle: RegionHandle,
    view: CpuView,
    mode: FileMode,
}

/// How to map a file ([`Hetmem::map_file_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Read-only, shared (written back) or private (copy-on-write).
    pub mode: FileMode,
    /// File I/O with O_DIRECT: fills and writebacks bypass the page cache, so data hetmem
    /// caches (in device memory above all) is not cached twice. A direct I/O that would wait
    /// for the file's inode lock (and most direct writes would), and the partial page at the
    /// end of the file, go through the page cache instead, and are written out and dropped
    /// from it at once (`docs/file-contract.md` §1, §12). Ignored where the file system has no
    /// O_DIRECT; see [`FileMapping::is_direct`].
    pub direct: bool,
    /// Keep coherent with other processes through a file lease: before another process opens
    /// the file (or truncates it), hetmem writes its dirty pages back and drops its cached
    /// copies, then lets that process proceed. Shared mappings take a write lease (possible
    /// only while no other process has the file open), read-only ones a read lease (possible
    /// while nobody writes it); private mappings take none. Where no lease can be had, hetmem
    /// retries at each fault and flush and caches without coherence meanwhile
    /// (`docs/file-contract.md` §6); [`FileMapping::is_leased`] says which.
    pub lease: bool,
    /// Evict dirty pages from device memory by writing them back to the file (and dropping
    /// them), instead of copying them to system memory. For streaming updates of a file
    /// larger than device memory that the CPU does not touch afterwards: it saves a copy and
    /// system memory, but a page evicted twice is written twice, and a later CPU write to it
    /// takes a write-protect fault again. Shared mappings only.
    pub evict_to_file: bool,
    /// Refuse to map without the lease: `map_file` fails with `Error::NoLease`, before
    /// anything is allocated, when the lease cannot be taken (the file is open elsewhere, the
    /// file system has no leases, the process may not lease the file), instead of mapping it
    /// without coherence with other processes. Implies `lease`. Not for Private mappings,
    /// which take no lease (`Error::Invalid`). A lease taken this way still breaks when
    /// another process opens the file, as any lease does (`docs/file-contract.md` §6); and on
    /// a file system whose writers bypass this kernel (NFS, FUSE, ...) a lease does not see
    /// them: see [`FileMapping::capabilities`].
    pub require_lease: bool,
    /// The most system memory (memfd pages, in whole 2 MiB blocks, rounded down) the mapping
    /// keeps for the blocks the CPU faulted on: past it, a CPU fault on a new block first
    /// drops the clean copies of the block noted longest ago, and punches its memfd pages; the
    /// next access reads the file again. So a CPU scan of a file larger than memory runs in
    /// bounded memory, as a kernel mmap does by reclaiming its page cache. Blocks holding
    /// dirty pages, device copies or pinned pages are not dropped (a `flush` makes dirty
    /// blocks clean, and droppable). `None` (the default): no limit, system copies stay until
    /// unmap, `invalidate_range` or a lease break. At least one block (2 MiB); not for Private
    /// mappings, whose written pages exist nowhere else (`Error::Invalid`, checked before
    /// anything is opened). `docs/file-contract.md` §2.8.
    pub cache_limit: Option<usize>,
    /// How long a lease break may spend writing this mapping's dirty pages back. A break
    /// must be over within `lease-break-time` (45 s by default), or the kernel lets the
    /// opener in and the pages not yet written are left conflicted
    /// ([`FileMapping::conflicts`]). So hetmem keeps the dirty data under what the mapping's
    /// measured write rate writes back in this time, by writing blocks back early, in the
    /// background (as the kernel's flusher threads write back a dirty mmap), whenever more is
    /// dirty (`docs/file-contract.md` §6, "Bounded breaks"). `None` (the default): half of
    /// `lease-break-time`, as it is set when hetmem looks. `Some(Duration::MAX)`: no limit,
    /// and nothing is written before `flush`, `sync`, a break or the drop, however long a
    /// break then takes. Only for Shared mappings with a lease (`lease`).
    pub break_budget: Option<std::time::Duration>,
}

impl FileOptions {
    /// `mode`, with buffered I/O and a lease (the defaults of [`Hetmem::map_file`]).
    pub fn new(mode: FileMode) -> Self {
        Self {
            mode,
            direct: false,
            lease: true,
            evict_to_file: false,
            require_lease: false,
            cache_limit: None,
            break_budget: None,
        }
    }

    /// With a break budget ([`FileOptions::break_budget`]), or the default one (`None`).
    pub fn break_budget(mut self, budget: Option<std::time::Duration>) -> Self {
        self.break_budget = budget;
        self
    }

    /// With a limit on the system memory the mapping keeps for file pages the CPU read
    /// ([`FileOptions::cache_limit`]), or without one (`None`).
    pub fn cache_limit(mut self, bytes: Option<usize>) -> Self {
        self.cache_limit = bytes;
        self
    }

    /// With or without `require_lease` (on implies `lease(true)`).
    pub fn require_lease(mut self, on: bool) -> Self {
        self.require_lease = on;
        if on {
            self.lease = true;
        }
        self
    }

    /// With or without writeback as the way dirty pages leave device memory.
    pub fn evict_to_file(mut self, on: bool) -> Self {
        self.evict_to_file = on;
        self
    }

    /// With or without a file lease (without one, `require_lease` is off too).
    pub fn lease(mut self, lease: bool) -> Self {
        self.lease = lease;
        if !lease {
            self.require_lease = false;
        }
        self
    }

    /// With or without O_DIRECT file I/O.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
}

impl Hetmem {
    /// `map_file_with` with the default options: buffered I/O, and a lease that keeps the
    /// mapping coherent with other processes where one can be had ([`FileOptions::new`]).
    pub fn map_file(
        &self,
        path: impl AsRef<Path>,
        offset: u64,
        len: usize,
        mode: FileMode,
    ) -> Result<FileMapping> {
        self.map_file_with(path, offset, len, FileOptions::new(mode))
    }

    /// Maps `len` bytes of the file at `path`, from byte `offset` (both page-aligned), as
    /// managed memory. Pages are read from the file on first touch by the CPU or a device.
    /// Pages past the file's end are like an mmap's: a CPU access raises SIGBUS, a device
    /// access fails with `Fault`, while the file is that short; when it grows, they show what
    /// it grew with (`docs/file-contract.md` §7).
    ///
    /// `Error::Invalid`, before anything is opened or allocated, for what cannot work: a path
    /// that is not a regular file (FIFO, device, socket, directory: checked without opening
    /// it, so nothing blocks and no driver sees an open), a file of a pseudo file system
    /// (procfs, sysfs, ...), a range that starts at or past the end of the file (none of its
    /// pages can be read now), or one that ends past the largest file offset
    /// (`docs/file-contract.md` §2.14).
    pub fn map_file_with(
        &self,
        path: impl AsRef<Path>,
        offset: u64,
        len: usize,
        options: FileOptions,
    ) -> Result<FileMapping> {
        let mode = options.mode;
        if !self.0.inner.is_owner() {
            // Before the open: a fork child's open of the file would break the parent's lease.
            return Err(Error::Invalid("the context belongs to the parent process"));
        }
        if options.require_lease && (mode == FileMode::Private || !options.lease) {
            return Err(Error::Invalid(
                "require_lease: a private mapping, or one without a lease, takes no lease",
            ));
        }
        let cache_blocks = match options.cache_limit {
            None => None,
            Some(_) if mode == FileMode::Private => {
                return Err(Error::Invalid(
                    "cache_limit: a private mapping's written pages cannot be dropped",
                ))
            }
            Some(bytes) if bytes < BLOCK_BYTES => {
                return Err(Error::Invalid("cache_limit: less than one 2 MiB block"))
            }
            Some(bytes) => Some(bytes / BLOCK_BYTES),
        };
        if len == 0 || len % PAGE_SIZE != 0 || offset % PAGE_SIZE as u64 != 0 {
            return Err(Error::Invalid(
                "offset and length must be page-aligned, length non-zero",
            ));
        }
        // The mapping's end must be a file offset (loff_t).
        if (len as u64)
            .checked_add(offset)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Error::Invalid(
                "offset + length is past the largest file offset",
            ));
        }
        // The block metadata must fit in the machine's memory (it is built for the whole range
        // at once): refused here, before the file is opened or leased.
        Region::check_metadata_fits(len, self.0.inner.devices.len())?;
        let path = path.as_ref();
        // Resolved without opening it for I/O: a FIFO, device, socket or /proc file is refused
        // before any open could block or have side effects (`sys::file::Pinned`).
        let pinned = sys_file::Pinned::new(path).map_err(open_error)?;
        if offset >= pinned.size() {
            return Err(Error::Invalid(
                "the mapping starts at or past the end of the file: none of its pages can be read",
            ));
        }
        // One descriptor for all I/O, O_DIRECT included: a second one would rule the write
        // lease out. A file system without O_DIRECT refuses the open with EINVAL.
        let write = mode == FileMode::Shared;
        let mut direct = options.direct;
        let file = match pinned.open(path, write, direct) {
            Err(sys_file::OpenError::Os(e)) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                pinned.open(path, write, false)
            }
            r => r,
        }
        .map_err(open_error)?;
        drop(pinned);
        let meta = file.metadata().map_err(Error::os("stat file"))?;
        let magic = sys_file::fs_magic(std::os::fd::AsFd::as_fd(&file)).unwrap_or(0);
        let filesystem = Filesystem::from_magic(magic);
        let tmpfs = filesystem == Filesystem::Tmpfs;
        // Tried before anything is allocated, so that `require_lease` refuses cheaply. Taken,
        // the lease is kept: the region's registration and first check take it over.
        let lease = if options.lease && mode != FileMode::Private {
            crate::mm::leases::probe(&file, write)
        } else {
            LeaseProbe::NotAsked
        };
        if options.require_lease && lease != LeaseProbe::Taken {
            // Dropping the file closes it, and with it any lease.
            return Err(Error::NoLease(lease));
        }
        let (lease_signal, overflow_served) = match lease {
            LeaseProbe::NotAsked | LeaseProbe::SignalInUse => (None, false),
            _ => crate::mm::leases::signals(),
        };
        let caps = FileCapabilities {
            filesystem,
            magic,
            lease,
            coherent_with_other_writers: lease == LeaseProbe::Taken
                && filesystem.leases_see_every_writer(),
            lease_signal,
            overflow_served,
        };
        if direct && tmpfs {
            // tmpfs takes O_DIRECT (Linux 6.6) but its page cache is its storage: there is
            // nothing to bypass, and the pages would be cached all the same.
            direct = !sys_file::set_o_direct(std::os::fd::AsFd::as_fd(&file), false);
        }
        let errseq = ErrSeq::of_file(&meta);
        let inner = &self.0.inner;
        // Only where a break may come: a Shared mapping that wants a lease.
        let break_budget = match options.break_budget {
            _ if mode != FileMode::Shared
                || !matches!(lease, LeaseProbe::Taken | LeaseProbe::InUse) =>
            {
                None
            }
            Some(d) if d == std::time::Duration::MAX => None,
            Some(d) => Some(BreakBudget::Fixed(d)),
            None => Some(BreakBudget::HalfBreakTime),
        };
        let pages = len / PAGE_SIZE;
        let backing = FileBacking {
            file,
            direct: AtomicBool::new(direct),
            io_mode: std::sync::RwLock::new(()),
            first_page: offset / PAGE_SIZE as u64,
            mode,
            eof_page: AtomicUsize::new(pages),
            eof_lock: std::sync::Mutex::new(()),
            faults: FileFaults::default(),
            // Not again where the kernel refused it for good, or nobody would serve breaks.
            lease_wanted: AtomicBool::new(matches!(lease, LeaseProbe::Taken | LeaseProbe::InUse)),
            evict_to_file: options.evict_to_file && mode == FileMode::Shared,
            wb_seen: AtomicU64::new(errseq.sample()),
            errseq,
            leased: AtomicBool::new(false),
            unleased_cache: AtomicBool::new(false),
            retake: std::sync::Mutex::new(()),
            breaking: AtomicBool::new(false),
            gate: Default::default(),
            conflicts: Default::default(),
            break_budget,
            dirty_limit: AtomicUsize::new(usize::MAX),
            write_rate: AtomicU64::new(crate::mm::file_io::INITIAL_WRITE_RATE),
            flusher_kicked: AtomicBool::new(false),
            tail_checked: AtomicU64::new(meta.len()),
            io: FileIo::new(offset, len, meta.len(), tmpfs),
            unsynced: Unsynced::new(pages),
            caps,
            cache: cache_blocks.map(|limit| FileCache::new(limit, len.div_ceil(BLOCK_BYTES))),
        };
        let region = inner.new_region(len, Some(backing), true)?;
        let cpu = inner.map_cpu_view(&region)?;
        let va = cpu.addr();
        inner.register_view(va, len)?;
        cpu.leak();
        inner.space.add_region(region.clone(), va);
        let mapping = FileMapping {
            handle: RegionHandle::new(self.0.clone(), region, va, len),
            // The view stays mapped until the mapping's drop frees the region, and only the
            // mapping hands out references into it.
            view: CpuView::new(va, len),
            mode,
        };
        if mode == FileMode::ReadOnly {
            self.protect(va, len, true, false)?;
        }
        if let Some(f) = &mapping.handle.region.file {
            if f.lease_wanted.load(Ordering::Acquire) {
                crate::mm::leases::register(inner, &mapping.handle.region);
            }
            if f.break_budget.is_some() {
                crate::mm::flusher::register(inner, &mapping.handle.region);
            }
        }
        inner.check_eof(&mapping.handle.region);
        Ok(mapping)
    }
}

/// `map_file`'s refusal of a path, as an error.
fn open_error(e: sys_file::OpenError) -> Error {
    match e {
        sys_file::OpenError::NotRegular(why) | sys_file::OpenError::Pseudo(why) => {
            Error::Invalid(why)
        }
        sys_file::OpenError::Os(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Error::NoEnt("no such file")
        }
        sys_file::OpenError::Os(e) => Error::os("open file")(e),
    }
}

impl FileMapping {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.handle.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.handle.len
    }

    /// Always false: mappings are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping's mode.
    pub fn mode(&self) -> FileMode {
        self.mode
    }

    /// Whether a file lease keeps this mapping coherent with other processes right now.
    pub fn is_leased(&self) -> bool {
        self.handle
            .region
            .file
            .as_ref()
            .is_some_and(|f| f.leased.load(Ordering::Acquire))
    }

    /// What `map_file` found out about the file's file system: which one it is (`statfs`),
    /// what trying the lease gave, and so whether the lease made the mapping coherent with
    /// every writer of the file (`docs/file-contract.md` §6, "File systems").
    pub fn capabilities(&self) -> FileCapabilities {
        self.backing().caps
    }

    /// Whether file I/O bypasses the page cache (O_DIRECT asked for, and supported by the
    /// file system).
    pub fn is_direct(&self) -> bool {
        self.handle
            .region
            .file
            .as_ref()
            .is_some_and(|f| f.direct.load(Ordering::Acquire))
    }

    /// The memory, read-only.
    pub fn as_slice(&self) -> &[u8] {
        self.view.slice()
    }

    /// The memory, writable. `None` for a read-only mapping.
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        if self.mode == FileMode::ReadOnly {
            return None;
        }
        Some(self.view.slice_mut())
    }

    /// Writes every dirty page back to the file and waits. Unlike msync(MS_SYNC) it makes nothing
    /// durable ([`FileMapping::sync`] does). A writeback error (EIO, ENOSPC, EDQUOT) is reported
    /// once; the pages stay dirty and a later flush retries. Like the kernel's errseq_t, each
    /// mapping reports, once, an error that any writeback of the file in this process met since
    /// this mapping last reported one (or was made; or before it was made, if nobody was told of
    /// it): its own, one of another mapping of the file, or one no flush waited for (drop,
    /// eviction, lease break). Read-only mappings have nothing to write but report those errors, as
    /// fsync does on a read-only descriptor; private mappings, like msync, report nothing. A Shared
    /// mapping also reports an error of the kernel's own writeback of the page cache that its
    /// descriptor has not reported yet (what `fdatasync` would say, learnt without writing
    /// anything), and then makes the pages it wrote since its last good [`FileMapping::sync`] dirty
    /// again, so they are written once more (`docs/file-contract.md` §8).
    pub fn flush(&self) -> Result<()> {
        if !self.handle.runtime().is_owner() {
            return Err(Error::Invalid("the context belongs to the parent process"));
        }
        let own = self.handle.runtime().flush_region(&self.handle.region);
        self.report(own)
    }

    /// [`FileMapping::flush`] for the pages of `[offset, offset + len)`, bytes from the start
    /// of the mapping (file offset minus the mapping's offset): writes back the dirty pages of
    /// the range and waits; dirty pages outside it stay dirty, in hetmem only. Like msync of a
    /// range, it reports what `flush` reports: an error of any writeback of the file not yet
    /// reported to this mapping, in the range or not (the kernel's error sequence is per file
    /// too). It writes back only: nothing is made durable (call [`FileMapping::sync`] for
    /// that). With [`FileMapping::invalidate_range`], this is how an application that
    /// coordinates with other writers by file locks (POSIX, OFD, flock) keeps the mapping
    /// coherent: invalidate after taking the lock, flush the range before releasing it
    /// (`docs/file-contract.md` §6, "Extent operations and file locks").
    ///
    /// # Errors
    /// `Invalid` (EINVAL), before anything is written, for an empty range, an `offset` or
    /// `len` that is not page-aligned, a range that does not lie inside the mapping, and in a
    /// fork child; then as `flush`.
    pub fn flush_range(&self, offset: usize, len: usize) -> Result<()> {
        let (first, n) = self.page_range(offset, len)?;
        let own = self
            .handle
            .runtime()
            .flush_pages(&self.handle.region, first, n);
        self.report(own)
    }

    /// Writes back the dirty pages of `[offset, offset + len)` (bytes from the start of the
    /// mapping) and drops every copy hetmem has of the range, in system and device memory, so
    /// that the next access by the CPU or a device reads the file again: it then shows what
    /// other writers put there, hole punches, extent shifts and reflinks included. What NFS
    /// does when it takes a lock: an application that shares the file with other writers by
    /// file locks takes its lock, calls this, reads and writes through the mapping, calls
    /// [`FileMapping::flush_range`], and unlocks (`docs/file-contract.md` §6, "Extent
    /// operations and file locks"). A page whose writeback fails keeps its data, dirty and
    /// cached; the rest of the range is dropped all the same, and the error is reported as
    /// `flush` reports it. A Private mapping's written pages are dropped, as
    /// [`Hetmem::discard`] drops them: its writes to the range are lost.
    ///
    /// # Errors
    /// `Invalid` (EINVAL), before anything is written or dropped, for an empty range, an
    /// `offset` or `len` that is not page-aligned, a range that does not lie inside the
    /// mapping, and in a fork child; `Io` when a writeback failed (now, or since this mapping
    /// last reported an error), as `flush`.
    pub fn invalidate_range(&self, offset: usize, len: usize) -> Result<()> {
        let (first, n) = self.page_range(offset, len)?;
        let own = self
            .handle
            .runtime()
            .invalidate_pages(&self.handle.region, first, n);
        self.report(own)
    }

    /// Bytes of the mapping that are dirty or under writeback: what a `flush` or a lease
    /// break would write now (counted in pages, as of the last change of each block). The
    /// background writeback keeps it under the break budget ([`FileOptions::break_budget`]).
    pub fn dirty_bytes(&self) -> usize {
        self.handle.region.dirty.pages() * PAGE_SIZE
    }

    /// The byte ranges of the mapping (offsets from its start) that a lease break left
    /// conflicted: the break ran out of `lease-break-time` before their dirty pages were
    /// written back, and the kernel let the other process in, so hetmem does not write them
    /// over what that process may have written (`docs/file-contract.md` §6, "Bounded
    /// breaks"). They stay dirty and cached, readable and writable; no writeback writes them
    /// (`flush`, `sync`, eviction to the file, a drop: a drop keeps the mapping for
    /// [`Hetmem::take_kept_file_mappings`] and counts an error) until
    /// [`FileMapping::resolve_conflicts`] says which copy wins. Empty when there
    /// are none, and always for Private and ReadOnly mappings.
    pub fn conflicts(&self) -> Vec<std::ops::Range<usize>> {
        self.backing()
            .conflicts
            .runs()
            .into_iter()
            .map(|(first, n)| first * PAGE_SIZE..(first + n) * PAGE_SIZE)
            .collect()
    }

    /// Says which copy of the conflicted pages of `[offset, offset + len)` wins
    /// ([`FileMapping::conflicts`]; pages of the range that are not conflicted are left
    /// alone). [`Resolution::Mine`]: the mapping's pages stay dirty, and the next `flush`
    /// writes them over the file. [`Resolution::Theirs`]: the mapping's copies are dropped
    /// without being written, and the next access reads the file.
    ///
    /// # Errors
    /// `Invalid` (EINVAL), before anything changes, for an empty range, an `offset` or `len`
    /// that is not page-aligned, a range that does not lie inside the mapping, and in a fork
    /// child.
    pub fn resolve_conflicts(
        &self,
        offset: usize,
        len: usize,
        resolution: Resolution,
    ) -> Result<()> {
        let (first, n) = self.page_range(offset, len)?;
        self.handle
            .runtime()
            .resolve_conflicts(&self.handle.region, first, n, resolution)
    }

    /// The pages of `[offset, offset + len)` of the mapping, checked: non-empty, page-aligned,
    /// inside the mapping; in the process that made the mapping.
    fn page_range(&self, offset: usize, len: usize) -> Result<(usize, usize)> {
        if !self.handle.runtime().is_owner() {
            return Err(Error::Invalid("the context belongs to the parent process"));
        }
        if len == 0 || offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::Invalid(
                "offset and length must be page-aligned, length non-zero",
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::Invalid("the range is not inside the mapping"));
        }
        Ok((offset / PAGE_SIZE, len / PAGE_SIZE))
    }

    /// What a flush reports, given the result of its own requests: writeback errors through
    /// the errseq alone (every one is recorded there, and the protocol's own report of it may
    /// come a flush later than the errseq's), then the kernel's writeback errors. Private
    /// mappings report only their own requests' errors.
    fn report(&self, own: Result<()>) -> Result<()> {
        let f = self.backing();
        if self.mode == FileMode::Private {
            return own;
        }
        // A writeback refused for a conflict is not an error of the file: what is reported
        // is the conflicted pages still left, if any (resolved ones are not).
        let own = match own {
            Err(Error::Io(hetmem_proto::OpError::Conflict)) => Ok(()),
            r => r,
        };
        let reported = f.errseq.check_and_advance(&f.wb_seen);
        let r = match own {
            Ok(()) | Err(Error::Io(_)) => match reported {
                Some(e) => Err(Error::Io(e)),
                // Asked only when nothing else is reported: the kernel reports its error once
                // to this descriptor, and a second error here would be lost.
                None if self.mode == FileMode::Shared => self.kernel_writeback_errors(),
                None => Ok(()),
            },
            r => r,
        };
        match f.conflicts.count() {
            0 => r,
            pages => r.and(Err(Error::Conflict { pages })),
        }
    }

    /// The kernel's writeback of the page cache failed since this descriptor last heard: the
    /// pages this mapping handed over since its last good sync may not be on the disk, and
    /// are made dirty again.
    fn kernel_writeback_errors(&self) -> Result<()> {
        let f = self.backing();
        f.kernel_writeback_errors().map_err(|e| {
            let pages = f.unsynced.take();
            self.handle.runtime().redirty(&self.handle.region, &pages);
            Error::Io(e)
        })
    }

    /// `flush`, then fdatasync: the data is durable when this returns `Ok`. fdatasync runs
    /// even when the flush failed, so what was written is made durable; the first error is
    /// returned. If fdatasync fails (the kernel's writeback failed: EIO, ENOSPC, EDQUOT, as it
    /// reports them, once), the pages this mapping wrote since its last good sync are made
    /// dirty again, so the next `flush` or `sync` writes them once more instead of treating
    /// them as safely in the file.
    pub fn sync(&self) -> Result<()> {
        let flushed = self.flush();
        if self.mode != FileMode::Shared || !self.handle.runtime().is_owner() {
            return flushed;
        }
        let f = self.backing();
        // Taken before the fdatasync: a page written back while it runs may miss it, and
        // stays in the set for the next one.
        let pages = f.unsynced.take();
        let synced = f.data_sync().map_err(|e| {
            self.handle.runtime().redirty(&self.handle.region, &pages);
            Error::Io(e)
        });
        flushed.and(synced)
    }

    /// The file behind the mapping.
    pub(super) fn backing(&self) -> &FileBacking {
        self.handle.region.file.as_ref().expect("a file mapping")
    }
}

impl FileMapping {
    /// Writes every dirty page back and unmaps: `drop` that reports. On an error (that of
    /// [`FileMapping::flush`]: a writeback failed, now or since this mapping last reported),
    /// nothing is unmapped and the mapping comes back with the error, its data kept (pages whose
    /// writeback failed stay dirty); call `close` again to retry. It does not make the data
    /// durable: call [`FileMapping::sync`] first for that. In a fork child, whose copy is a
    /// private snapshot that never reaches the file, it is `drop`.
    pub fn close(self) -> std::result::Result<(), (FileMapping, Error)> {
        if self.handle.runtime().is_owner() {
            loop {
                if let Err(e) = self.flush() {
                    return Err((self, e));
                }
                // Pages written again since the flush passed them (a device kernel still
                // running over the mapping) are written back in another round.
                if self.mode != FileMode::Shared
                    || dirty_pages(self.handle.runtime(), &self.handle.region) == 0
                {
                    break;
                }
            }
        }
        drop(self);
        Ok(())
    }
}

/// Dirty pages of a region (file pages newer than the file), but for pinned ones: those are
/// dirty again after every writeback, for DMA may write them (`mm/pin.rs`).
fn dirty_pages(inner: &Runtime, region: &Region) -> usize {
    let mut n = 0;
    for (bi, slot) in region.blocks.iter().enumerate() {
        let pinned = region.pins.in_block(bi);
        let block = inner.lock_block(slot);
        n += (0..region.block_pages(bi))
            .filter(|&i| block.page(i).dirty && !pinned.contains(i))
            .count();
    }
    n
}

impl Hetmem {
    /// File mappings whose drop could not write every dirty page back, handed back to the
    /// caller (`docs/file-contract.md` §8, "Dropping a mapping"). Such a mapping is not torn
    /// down: it stays mapped at the same address, with its data, its dirty pages and its lease,
    /// until this call returns it; then `flush`, `close` or `drop` it again. Each one was
    /// counted in `stats().errors` when it was kept. The context lives on while it holds any.
    pub fn take_kept_file_mappings(&self) -> Vec<FileMapping> {
        if !self.0.inner.is_owner() {
            return Vec::new();
        }
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, others): (Vec<KeptMapping>, _) = std::mem::take(&mut *kept)
            .into_iter()
            .partition(|m| Arc::ptr_eq(&m.handle, &self.0));
        *kept = others;
        mine.into_iter()
            .map(|m| FileMapping {
                view: CpuView::new(m.addr, m.len),
                handle: RegionHandle::new(m.handle, m.region, m.addr, m.len),
                mode: m.mode,
            })
            .collect()
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        let inner = &self.handle.runtime();
        if inner.is_owner() && self.mode == FileMode::Shared {
            // Write dirty pages back while the mapping is whole. If one cannot be written, the
            // mapping is kept, data and all, for `Hetmem::take_kept_file_mappings`: a drop has
            // no caller to report to, and tearing down would lose the data.
            // Kept only when a writeback failed and left pages dirty: a page dirty after a
            // flush that succeeded was written again meanwhile (or a late write fault marked it
            // so), and the teardown below writes it back.
            let dirty = match inner.flush_region(&self.handle.region) {
                Ok(()) => 0,
                Err(_) => dirty_pages(inner, &self.handle.region),
            };
            if dirty > 0 {
                inner.note_error(
                    "writeback at drop",
                    &std::io::Error::other(format!(
                        "{dirty} dirty pages could not be written back: the mapping at {:#x} is \
                         kept (Hetmem::take_kept_file_mappings)",
                        self.handle.addr
                    )),
                );
                KEPT.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(KeptMapping {
                        handle: self.handle.runtime.clone(),
                        region: self.handle.region.clone(),
                        addr: self.handle.addr,
                        len: self.handle.len,
                        mode: self.mode,
                    });
                return;
            }
        }
        // Unmapping writes dirty pages back first (the protocol's Invalidate { Unmap }): the
        // ones written since the flush above. The lease goes after: an opener waiting on it
        // must find the data in the file.
        inner.free_region(&self.handle.region);
        if inner.is_owner() {
            // Not in a fork child: the lease is on the description it shares with the parent.
            crate::mm::leases::unregister(&self.handle.region);
            if let Some(f) = &self.handle.region.file {
                if f.break_budget.is_some() {
                    crate::mm::flusher::unregister(&self.handle.region);
                }
                // The file is no longer open by this mapping from here: another mapping of it
                // may take a write lease at once.
                f.retire();
            }
        }
    }
}
