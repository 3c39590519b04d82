//! File mappings: a file's pages as managed memory (`docs/file-contract.md`).
//!
//! hetmem keeps its own cache of the file's pages above the kernel's page cache: a region like
//! an allocation, whose blocks are file-backed in the protocol. First touches read the file
//! (`pread`, straight into device memory for a device fault); writebacks write it (`pwrite`,
//! straight from device memory), never waiting for the file's inode lock (`sys::file`, contract
//! §12). `flush` is msync(MS_SYNC), `sync` adds fdatasync, `close` writes dirty pages back and
//! unmaps, reporting errors, and dropping the mapping writes them back first too, keeping the
//! mapping if it cannot (contract §13).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use hetmem_proto::{Invalidation, OpError, PageRun, RequestKind, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::buffer::CpuView;
use crate::context::{Hetmem, Inner, Shared};
use crate::error::{Error, Result};
use crate::region::{FileBacking, FileMode, Region};
use crate::sys::file::{self as sys_file, NoWait, Window};
use crate::sys::lease;
use std::os::fd::AsFd;

/// A file mapped as managed memory ([`Hetmem::map_file`]).
///
/// Dropping it writes dirty pages back and unmaps; if a page cannot be written, the mapping is
/// kept instead, for [`Hetmem::take_kept_file_mappings`]. [`FileMapping::close`] is the drop
/// that reports (`docs/file-contract.md` §13).
#[derive(Debug)]
pub struct FileMapping {
    shared: Arc<Shared>,
    region: Arc<Region>,
    view: CpuView,
    addr: usize,
    len: usize,
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
}

impl FileOptions {
    /// `mode`, with buffered I/O and a lease (the defaults of [`Hetmem::map_file`]).
    pub fn new(mode: FileMode) -> Self {
        Self {
            mode,
            direct: false,
            lease: true,
            evict_to_file: false,
        }
    }

    /// With or without writeback as the way dirty pages leave device memory.
    pub fn evict_to_file(mut self, on: bool) -> Self {
        self.evict_to_file = on;
        self
    }

    /// With or without a file lease.
    pub fn lease(mut self, lease: bool) -> Self {
        self.lease = lease;
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
    /// access fails with `Fault`.
    ///
    /// `Error::Invalid`, before anything is opened or allocated, for what cannot work: a path
    /// that is not a regular file (FIFO, device, socket, directory: checked without opening
    /// it, so nothing blocks and no driver sees an open), a file of a pseudo file system
    /// (procfs, sysfs, ...), a range that starts at or past the end of the file (none of its
    /// pages could be read: a mapping does not follow a file that grows), or one that ends past
    /// the largest file offset (`docs/file-contract.md` §2.14).
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
        let path = path.as_ref();
        // Resolved without opening it for I/O: a FIFO, device, socket or /proc file is refused
        // before any open could block or have side effects (`sys::file::Pinned`).
        let pinned = sys_file::Pinned::new(path).map_err(open_error)?;
        if offset >= pinned.size() {
            return Err(Error::Invalid(
                "the mapping starts at or past the end of the file: none of its pages could \
                 ever be read (a mapping does not follow a file that grows)",
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
        let tmpfs = on_tmpfs(&file);
        if direct && tmpfs {
            // tmpfs takes O_DIRECT (Linux 6.6) but its page cache is its storage: there is
            // nothing to bypass, and the pages would be cached all the same.
            direct = !set_o_direct(&file, false);
        }
        let errseq = ErrSeq::of_file(&meta);
        let inner = &self.0.inner;
        let pages = len / PAGE_SIZE;
        let backing = FileBacking {
            file,
            direct: AtomicBool::new(direct),
            io_mode: std::sync::RwLock::new(()),
            first_page: offset / PAGE_SIZE as u64,
            mode,
            eof_page: AtomicUsize::new(pages),
            fail_writeback: AtomicU32::new(0),
            fail_read: AtomicU32::new(0),
            fail_errno: AtomicI32::new(libc::EIO),
            lease_wanted: AtomicBool::new(options.lease && mode != FileMode::Private),
            evict_to_file: options.evict_to_file && mode == FileMode::Shared,
            wb_seen: AtomicU64::new(errseq.sample()),
            errseq,
            leased: AtomicBool::new(false),
            io: FileIo::new(offset, len, meta.len(), tmpfs),
        };
        let region = inner.new_region(len, Some(backing))?;
        let cpu = inner.map_cpu_view(&region)?;
        let va = cpu.addr();
        inner.register_view(va, len)?;
        cpu.leak();
        inner.add_region(region.clone(), va);
        let mapping = FileMapping {
            shared: self.0.clone(),
            region,
            // The view stays mapped until the mapping's drop frees the region, and only the
            // mapping hands out references into it.
            view: CpuView::new(va, len),
            addr: va,
            len,
            mode,
        };
        if mode == FileMode::ReadOnly {
            self.protect(va, len, true, false)?;
        }
        if let Some(f) = &mapping.region.file {
            if f.lease_wanted.load(Ordering::Acquire) {
                leases::register(inner, &mapping.region);
            }
        }
        inner.check_eof(&mapping.region);
        Ok(mapping)
    }
}

impl Inner {
    /// Pages of block `bi` before the end of the file (all of them for anonymous memory).
    pub(crate) fn pages_before_eof(&self, region: &Region, bi: usize) -> usize {
        let pages = region.block_pages(bi);
        match &region.file {
            Some(f) => f
                .eof_page
                .load(Ordering::Acquire)
                .saturating_sub(bi * PAGES_PER_BLOCK)
                .min(pages),
            None => pages,
        }
    }

    /// Compares a file mapping with the file's current size: pages past a new end of file get
    /// `Invalidate { Truncate }` (their data is dropped, dirty or not) and are poisoned for the
    /// CPU, so an access raises SIGBUS as with mmap. Runs at every fault and flush of a file
    /// mapping: without leases, that is when hetmem notices another process's truncate.
    pub(crate) fn check_eof(&self, region: &Region) {
        let Some(f) = &region.file else {
            return;
        };
        if f.lease_wanted.load(Ordering::Acquire) {
            // A lease breaking, or taken back by the kernel (a break unanswered for
            // lease-break-time), counts as lost at once, and is not taken again in the same
            // check: its break is queued for the lease thread, whose flush and drop should come
            // first. (A lease thread held up for longer than a check's interval still lets a
            // later check take it back before the drop; the drop follows, as without a lease.)
            let write = f.mode == FileMode::Shared;
            if f.leased.load(Ordering::Acquire) && !lease::held(f.file.as_fd(), write) {
                f.leased.store(false, Ordering::Release);
            } else if !f.leased.load(Ordering::Acquire) {
                if let Ok(true) = lease::take(f.file.as_fd(), write) {
                    f.leased.store(true, Ordering::Release);
                }
            }
        }
        let Some(size) = f.size_limit() else {
            return;
        };
        let total = region.len / PAGE_SIZE;
        let file_pages = size.div_ceil(PAGE_SIZE as u64);
        let eof = file_pages.saturating_sub(f.first_page).min(total as u64) as usize;
        let old = f.eof_page.fetch_min(eof, Ordering::AcqRel);
        if eof >= old {
            return;
        }
        let mut page = eof;
        while page < old {
            let bi = page / PAGES_PER_BLOCK;
            let start = page % PAGES_PER_BLOCK;
            let n = (PAGES_PER_BLOCK - start).min(old - page);
            if let Some(run) = PageRun::new(start, n, PAGES_PER_BLOCK) {
                let _ = self.invalidate(region, bi, run, Invalidation::Truncate);
            }
            page += n;
        }
        let mut ranges = Vec::new();
        region.cpu_ranges(eof * PAGE_SIZE, (old - eof) * PAGE_SIZE, &mut ranges);
        for (va, len) in ranges {
            self.poison(va, len);
        }
    }

    /// Writes back every dirty page of a file mapping; the first error, once. Private (and
    /// read-only) mappings issue no Flush: it would mark their written pages clean, and the
    /// protocol drops clean file pages on eviction, to be read from the file again.
    pub(crate) fn flush_region(&self, region: &Region) -> Result<()> {
        self.check_eof(region);
        if region
            .file
            .as_ref()
            .is_some_and(|f| f.mode != FileMode::Shared)
        {
            return Ok(());
        }
        let mut first = Ok(());
        for bi in 0..region.blocks.len() {
            let Some(all) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) else {
                continue;
            };
            let r = self.request(region, bi, all, RequestKind::Flush);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Writeback errors of one file in this process, in the manner of the kernel's `errseq_t`: a
/// sequence that moves at every error, and the last error. Each mapping remembers the value it
/// last reported (`FileBacking::wb_seen`), so each reports a new error once.
#[derive(Debug, Default)]
pub(crate) struct ErrSeq {
    seq: AtomicU64,
    /// ENOSPC for `NoSpace`, else EIO.
    errno: AtomicI32,
}

/// Every file's `ErrSeq`, by device and inode.
type Files = Vec<((u64, u64), Weak<ErrSeq>)>;
static FILES: Mutex<Files> = Mutex::new(Vec::new());

/// The file module's process-wide locks, held by the forking thread from fork's prepare
/// handler to its parent and child handlers (`fork.rs`): a child must not inherit one locked
/// by a thread it does not have, or its first `map_file` would wait for ever.
struct ForkHeld {
    _files: std::sync::MutexGuard<'static, Files>,
    _registry: std::sync::MutexGuard<'static, Vec<leases::Entry>>,
    _retiring: std::sync::MutexGuard<'static, Vec<(std::os::fd::RawFd, Arc<Region>)>>,
    _install: std::sync::MutexGuard<'static, ()>,
    _kept: std::sync::MutexGuard<'static, Vec<FileMapping>>,
}

thread_local! {
    static FORK_HELD: std::cell::RefCell<Option<ForkHeld>> = const { std::cell::RefCell::new(None) };
}

/// Fork's prepare handler: takes the locks (after the contexts' gates; nothing holds one of
/// these while it waits for a gate).
pub(crate) fn fork_prepare() {
    let held = ForkHeld {
        _install: lease::hold_install(),
        _registry: leases::REGISTRY.lock().unwrap_or_else(|e| e.into_inner()),
        _retiring: leases::RETIRING.lock().unwrap_or_else(|e| e.into_inner()),
        _files: FILES.lock().unwrap_or_else(|e| e.into_inner()),
        _kept: kept::KEPT.lock().unwrap_or_else(|e| e.into_inner()),
    };
    FORK_HELD.with(|h| *h.borrow_mut() = Some(held));
}

/// Fork's parent and child handlers: lets the locks go.
pub(crate) fn fork_done() {
    FORK_HELD.with(|h| h.borrow_mut().take());
}

impl ErrSeq {
    /// The one for the file `meta` describes, shared with its other mappings in this process.
    fn of_file(meta: &std::fs::Metadata) -> Arc<Self> {
        use std::os::unix::fs::MetadataExt;
        let key = (meta.dev(), meta.ino());
        let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|(_, w)| w.strong_count() > 0);
        if let Some(e) = files
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return e;
        }
        let e = Arc::new(Self::default());
        files.push((key, Arc::downgrade(&e)));
        e
    }

    /// Every failed writeback of the file comes here (`Inner::write_back` in `exec.rs`).
    pub(crate) fn record(&self, e: OpError) {
        let errno = if e == OpError::NoSpace {
            libc::ENOSPC
        } else {
            libc::EIO
        };
        self.errno.store(errno, Ordering::Release);
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    fn sample(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    fn last(&self) -> OpError {
        errno_to_op(self.errno.load(Ordering::Acquire))
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

/// How a file mapping reads and writes its file without ever waiting for the file's inode lock
/// (`sys::file`, `docs/file-contract.md` §2.2), and the smallest file size it has seen.
#[derive(Debug)]
pub(crate) struct FileIo {
    /// The file range the mapping shows: byte offset and length.
    offset: u64,
    len: usize,
    /// The shared mappings of that range that I/O falls back to, made at first need: one
    /// that reads ahead (buffered reads), one that does not (writes, and reads with O_DIRECT).
    sequential: Mutex<WindowSlot>,
    random: Mutex<WindowSlot>,
    /// `RWF_NOWAIT` reads (writes) are worth trying: cleared where the file system has none.
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
    /// The smallest size of the file seen since the mapping was made: writebacks never write
    /// at or past it, even after the file grows again (§7).
    min_size: AtomicU64,
    /// The file system's reads take no inode lock (tmpfs: `shmem_file_read_iter`), so a
    /// plain `pread` cannot deadlock; and a read through the window would allocate holes.
    lock_free_reads: bool,
}

#[derive(Debug)]
enum WindowSlot {
    NotYet,
    Ready(Arc<Window>),
    /// The file cannot be mapped (or the system forbids `process_vm_readv`): blocking I/O.
    Unusable,
    /// The mapping is gone: no more I/O.
    Retired,
}

impl FileIo {
    fn new(offset: u64, len: usize, size: u64, lock_free_reads: bool) -> Self {
        Self {
            lock_free_reads,
            offset,
            len,
            sequential: Mutex::new(WindowSlot::NotYet),
            random: Mutex::new(WindowSlot::NotYet),
            nowait_read: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
            min_size: AtomicU64::new(size),
        }
    }
}

/// What the fallback through the window could not do.
enum Fallback {
    /// No window (or it cannot be used): do the I/O the blocking way.
    Blocking,
    /// The I/O failed.
    Failed(OpError),
}

/// File I/O of a mapping: through the page cache, or around it (O_DIRECT), and in either case
/// without waiting for the inode lock (`sys::file`): `RWF_NOWAIT` first, then the window.
impl FileBacking {
    /// Notes the file's current size (`fstat`) and returns the smallest size seen since the
    /// mapping was made: the end of the file as far as the mapping is concerned (§7, §11.2).
    /// `None` if `fstat` fails.
    pub(crate) fn size_limit(&self) -> Option<u64> {
        let now = self.file.metadata().ok()?.len();
        let before = self.io.min_size.fetch_min(now, Ordering::AcqRel);
        Some(before.min(now))
    }

    /// A window, made at first use: reading ahead (`sequential`) or not; `None` if the file
    /// cannot be mapped.
    fn window(&self, sequential: bool) -> Option<Arc<Window>> {
        let slot = if sequential {
            &self.io.sequential
        } else {
            &self.io.random
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            WindowSlot::Ready(w) => Some(w.clone()),
            WindowSlot::Unusable | WindowSlot::Retired => None,
            WindowSlot::NotYet => {
                let write = self.mode == FileMode::Shared && !sequential;
                let fd = self.file.as_fd();
                match Window::new(fd, self.io.offset, self.io.len, write, sequential) {
                    Ok(w) => {
                        let w = Arc::new(w);
                        *slot = WindowSlot::Ready(w.clone());
                        Some(w)
                    }
                    Err(_) => {
                        *slot = WindowSlot::Unusable;
                        None
                    }
                }
            }
        }
    }

    /// The windows failed in a way that says they never will work (no `process_vm_readv`).
    fn window_unusable(&self) {
        for slot in [&self.io.sequential, &self.io.random] {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*slot, WindowSlot::Ready(_) | WindowSlot::NotYet) {
                *slot = WindowSlot::Unusable;
            }
        }
    }

    /// The mapping is gone: unmaps the windows and closes the file's description now, keeping
    /// the descriptor number taken until the mapping's memory goes
    /// (`sys::file::retire_descriptor`), so that the file is no longer open by this mapping
    /// (another mapping of it can take a write lease at once).
    pub(crate) fn retire(&self) {
        for slot in [&self.io.sequential, &self.io.random] {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = WindowSlot::Retired;
        }
        let _ = sys_file::retire_descriptor(&self.file);
    }

    /// Reads `buf.len()` bytes at `offset` (both page-aligned, as is `buf`); bytes past the
    /// end of the file read zero. Fails with the injected error first, if any. Never waits for
    /// the inode lock (as long as the file can be mapped).
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), OpError> {
        if self
            .fail_read
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(errno_to_op(self.fail_errno.load(Ordering::Acquire)));
        }
        if self.io.lock_free_reads {
            return self.read_blocking(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() && self.io.nowait_read.load(Ordering::Acquire) {
            let at = offset + done as u64;
            let shared = self.io_mode.read().unwrap_or_else(|e| e.into_inner());
            let direct = self.direct.load(Ordering::Acquire);
            if direct && at % PAGE_SIZE as u64 != 0 {
                // A short direct read ended inside a page: that is the end of the file.
                break;
            }
            let r = sys_file::pread_nowait(self.file.as_fd(), &mut buf[done..], at);
            drop(shared);
            match r {
                Ok(NoWait::Done(0)) => break,
                Ok(NoWait::Done(n)) => done += n,
                Ok(NoWait::WouldBlock) => break,
                Ok(NoWait::Unsupported) => {
                    self.io.nowait_read.store(false, Ordering::Release);
                    break;
                }
                Err(libc::EINTR) => {}
                Err(libc::EINVAL) if direct => self.stop_direct(),
                Err(e) => return Err(errno_to_op(e)),
            }
        }
        if done == buf.len() {
            return Ok(());
        }
        // Nothing more without waiting, or the end of the file: ask fstat which.
        if self
            .file
            .metadata()
            .is_ok_and(|m| m.len() <= offset + done as u64)
        {
            buf[done..].fill(0);
            return Ok(());
        }
        match self.read_window(&mut buf[done..], offset + done as u64) {
            Ok(()) => Ok(()),
            Err(Fallback::Failed(e)) => Err(e),
            Err(Fallback::Blocking) => self.read_blocking(&mut buf[done..], offset + done as u64),
        }
    }

    /// `read_at` through a window: page faults on the file, which take no inode lock. With
    /// O_DIRECT, without read-ahead, and the pages read leave the page cache again.
    fn read_window(&self, buf: &mut [u8], offset: u64) -> Result<(), Fallback> {
        let direct = self.direct.load(Ordering::Acquire);
        let w = self.window(!direct).ok_or(Fallback::Blocking)?;
        let r = self.read_through(&w, buf, offset);
        if direct {
            sys_file::drop_cached(self.file.as_fd(), offset, buf.len());
        }
        r
    }

    fn read_through(&self, w: &Window, buf: &mut [u8], offset: u64) -> Result<(), Fallback> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match w.read(&mut buf[done..], at) {
                Ok(n) if n > 0 => done += n,
                Ok(_) | Err(libc::EFAULT) => {
                    // A page past the end of the file reads zero, as pread's; one inside it
                    // could not be read.
                    if self.file.metadata().is_ok_and(|m| m.len() <= at) {
                        buf[done..].fill(0);
                        return Ok(());
                    }
                    return Err(Fallback::Failed(OpError::Io));
                }
                Err(libc::ENOSYS | libc::EPERM) => {
                    self.window_unusable();
                    return Err(Fallback::Blocking);
                }
                Err(e) => return Err(Fallback::Failed(errno_to_op(e))),
            }
        }
        Ok(())
    }

    /// Blocking `pread`: only where the file cannot be mapped. It can wait for the inode lock.
    fn read_blocking(&self, buf: &mut [u8], offset: u64) -> Result<(), OpError> {
        if self.direct.load(Ordering::Acquire) {
            let shared = self.io_mode.read().unwrap_or_else(|e| e.into_inner());
            if self.direct.load(Ordering::Acquire) {
                match read_all(&self.file, buf, offset, true) {
                    Err(libc::EINVAL) => {
                        drop(shared);
                        self.stop_direct();
                    }
                    r => return r.map_err(errno_to_op),
                }
            }
        }
        read_all(&self.file, buf, offset, false).map_err(errno_to_op)
    }

    /// Writes all of `data` at `offset` (page-aligned, as is `data`; its length may end
    /// inside a page, at the end of the file). Fails with the injected error first, if any.
    /// Never waits for the inode lock (as long as the file can be mapped), and never grows the
    /// file: the part through the window stops at the end of the file.
    pub(crate) fn write_at(&self, data: &[u8], offset: u64) -> Result<(), OpError> {
        if self
            .fail_writeback
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(errno_to_op(self.fail_errno.load(Ordering::Acquire)));
        }
        let mut done = 0;
        let mut nudged = false;
        loop {
            if !self.io.nowait_write.load(Ordering::Acquire) {
                break;
            }
            let shared = self.io_mode.read().unwrap_or_else(|e| e.into_inner());
            let direct = self.direct.load(Ordering::Acquire);
            // O_DIRECT takes whole blocks only: the partial page at EOF goes through the window.
            let end = if direct {
                data.len() / PAGE_SIZE * PAGE_SIZE
            } else {
                data.len()
            };
            if done >= end {
                break;
            }
            let at = offset + done as u64;
            let r = sys_file::pwrite_nowait(self.file.as_fd(), &data[done..end], at);
            drop(shared);
            match r {
                Ok(NoWait::Done(0)) => break,
                Ok(NoWait::Done(n)) => done += n,
                Ok(NoWait::WouldBlock) if !nudged && done + PAGE_SIZE < end => {
                    // Most often the file's timestamps want an update, which RWF_NOWAIT does
                    // not do. A store through the window does it (page_mkwrite) without the
                    // inode lock; the rest may then go without waiting.
                    nudged = true;
                    self.write_through_window(&data[done..done + PAGE_SIZE], at)?;
                    done += PAGE_SIZE;
                }
                Ok(NoWait::WouldBlock) => break,
                Ok(NoWait::Unsupported) => {
                    self.io.nowait_write.store(false, Ordering::Release);
                    break;
                }
                Err(libc::EINTR) => {}
                Err(libc::EINVAL) if direct => self.stop_direct(),
                Err(e) => return Err(errno_to_op(e)),
            }
        }
        if done < data.len() {
            self.write_through_window(&data[done..], offset + done as u64)?;
        }
        if nudged || done < data.len() {
            self.after_window_write(offset, data.len())?;
        }
        Ok(())
    }

    /// With O_DIRECT, data written through the window is written out and dropped from the page
    /// cache at once, as a direct write would leave it: on the disk, not cached twice. Its
    /// errors are the writeback's.
    fn after_window_write(&self, offset: u64, len: usize) -> Result<(), OpError> {
        if !self.direct.load(Ordering::Acquire) {
            return Ok(());
        }
        sys_file::write_out_and_drop(self.file.as_fd(), offset, len).map_err(errno_to_op)
    }

    /// `write_at` through the window (or, where the file cannot be mapped, the blocking way).
    fn write_through_window(&self, data: &[u8], offset: u64) -> Result<(), OpError> {
        match self.write_window(data, offset) {
            Ok(()) => Ok(()),
            Err(Fallback::Failed(e)) => Err(e),
            Err(Fallback::Blocking) => self.write_blocking(data, offset),
        }
    }

    fn write_window(&self, data: &[u8], offset: u64) -> Result<(), Fallback> {
        let w = self.window(false).ok_or(Fallback::Blocking)?;
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            match w.write(&data[done..], at) {
                Ok(n) if n > 0 => done += n,
                Ok(_) | Err(libc::EFAULT) => {
                    // The page could not be written: past a new end of the file (a truncate
                    // since the size was checked: the data goes with the truncated pages, as
                    // the kernel drops an mmap's), or the file system refused it. The store
                    // through mmap does not say why: a non-blocking pwrite of the page may.
                    let size = self.file.metadata().map_or(u64::MAX, |m| m.len());
                    if size <= at {
                        return Ok(());
                    }
                    let page = (data.len() - done)
                        .min(PAGE_SIZE - (at as usize % PAGE_SIZE))
                        .min(usize::try_from(size - at).unwrap_or(usize::MAX));
                    match sys_file::pwrite_nowait(self.file.as_fd(), &data[done..done + page], at) {
                        Ok(NoWait::Done(n)) if n > 0 => done += n,
                        Err(e) if e != libc::EINVAL && e != libc::EINTR => {
                            return Err(Fallback::Failed(errno_to_op(e)))
                        }
                        _ if sys_file::looks_full(self.file.as_fd()) => {
                            return Err(Fallback::Failed(OpError::NoSpace))
                        }
                        _ => return Err(Fallback::Failed(OpError::Io)),
                    }
                }
                Err(libc::ENOSYS | libc::EPERM) => {
                    self.window_unusable();
                    return Err(Fallback::Blocking);
                }
                Err(e) => return Err(Fallback::Failed(errno_to_op(e))),
            }
        }
        Ok(())
    }

    /// Blocking `pwrite`: only where the file cannot be mapped. It can wait for the inode
    /// lock.
    fn write_blocking(&self, data: &[u8], offset: u64) -> Result<(), OpError> {
        if self.direct.load(Ordering::Acquire) {
            let whole = data.len() / PAGE_SIZE * PAGE_SIZE;
            let shared = self.io_mode.read().unwrap_or_else(|e| e.into_inner());
            if self.direct.load(Ordering::Acquire) {
                match write_all(&self.file, &data[..whole], offset) {
                    Ok(()) if whole == data.len() => return Ok(()),
                    Ok(()) => {
                        // O_DIRECT takes whole blocks only: the partial page at EOF goes
                        // through the page cache, with O_DIRECT off meanwhile.
                        drop(shared);
                        let _only = self.io_mode.write().unwrap_or_else(|e| e.into_inner());
                        let off = self.set_direct(false);
                        let r = write_all(&self.file, &data[whole..], offset + whole as u64);
                        if !off || !self.set_direct(true) {
                            // fcntl refused: whatever O_DIRECT now is, buffered from now on.
                            self.direct.store(false, Ordering::Release);
                            self.set_direct(false);
                        }
                        return r.map_err(errno_to_op);
                    }
                    Err(libc::EINVAL) => {
                        drop(shared);
                        self.stop_direct();
                    }
                    Err(e) => return Err(errno_to_op(e)),
                }
            }
        }
        write_all(&self.file, data, offset).map_err(errno_to_op)
    }

    /// The file system refused a direct I/O: buffered I/O from now on.
    fn stop_direct(&self) {
        let _only = self.io_mode.write().unwrap_or_else(|e| e.into_inner());
        if self.direct.swap(false, Ordering::AcqRel) {
            self.set_direct(false);
        }
    }

    /// Sets or clears O_DIRECT on the descriptor; whether that worked.
    fn set_direct(&self, on: bool) -> bool {
        set_o_direct(&self.file, on)
    }
}

/// Sets or clears O_DIRECT on `file`'s descriptor; whether that worked.
fn set_o_direct(file: &std::fs::File, on: bool) -> bool {
    use rustix::fs::OFlags;
    let Ok(flags) = rustix::fs::fcntl_getfl(file) else {
        return false;
    };
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(file, flags).is_ok()
}

/// Whether `file` lives on tmpfs (or shmem), whose page cache is the file's only copy.
fn on_tmpfs(file: &std::fs::File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    rustix::fs::fstatfs(file).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
}

fn errno_to_op(errno: i32) -> OpError {
    match errno {
        libc::ENOSPC | libc::EDQUOT => OpError::NoSpace,
        _ => OpError::Io,
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read zero. With
/// `direct` (O_DIRECT on), a short read means the end of the file: the next read would be
/// unaligned, which O_DIRECT refuses. Errors are errnos.
fn read_all(file: &std::fs::File, buf: &mut [u8], offset: u64, direct: bool) -> Result<(), i32> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) if direct && done + n < buf.len() => {
                buf[done + n..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    Ok(())
}

/// Writes all of `data` at `offset`. Errors are errnos.
fn write_all(file: &std::fs::File, data: &[u8], offset: u64) -> Result<(), i32> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < data.len() {
        match file.write_at(&data[done..], offset + done as u64) {
            Ok(0) => return Err(libc::ENOSPC),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    Ok(())
}

impl FileMapping {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
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
        self.region
            .file
            .as_ref()
            .is_some_and(|f| f.leased.load(Ordering::Acquire))
    }

    /// Whether file I/O bypasses the page cache (O_DIRECT asked for, and supported by the
    /// file system).
    pub fn is_direct(&self) -> bool {
        self.region
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

    /// Writes every dirty page back to the file and waits, like msync(MS_SYNC). A writeback
    /// error (EIO, ENOSPC) is reported once; the pages stay dirty and a later flush retries.
    /// Like the kernel's errseq_t, each mapping reports, once, an error that any writeback of
    /// the file in this process met since this mapping last reported one (or was made): its
    /// own, one of another mapping of the file, or one no flush waited for (drop, eviction,
    /// lease break). Read-only mappings have nothing to write but report those errors, as
    /// fsync does on a read-only descriptor; private mappings, like msync, report nothing.
    pub fn flush(&self) -> Result<()> {
        if !self.shared.inner.is_owner() {
            return Err(Error::Invalid("the context belongs to the parent process"));
        }
        let own = self.shared.inner.flush_region(&self.region);
        let f = self.region.file.as_ref().expect("a file mapping");
        if self.mode == FileMode::Private {
            return own;
        }
        // Writeback errors are reported through the errseq alone: every one is recorded
        // there, and the protocol's own report of it may come a flush later than the errseq's.
        let now = f.errseq.sample();
        let seen = f.wb_seen.swap(now, Ordering::AcqRel);
        match own {
            Ok(()) | Err(Error::Io(_)) if seen != now => Err(Error::Io(f.errseq.last())),
            Ok(()) | Err(Error::Io(_)) => Ok(()),
            r => r,
        }
    }

    /// `flush`, then fdatasync: the data is durable when this returns.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        if self.mode == FileMode::Shared {
            let file = &self.region.file.as_ref().expect("a file mapping").file;
            file.sync_data().map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => Error::Io(OpError::NoSpace),
                _ => Error::Io(OpError::Io),
            })?;
        }
        Ok(())
    }

    /// Test hook: the next `n` reads of the file fail with `errno`, as a failing disk would.
    pub fn inject_read_failures(&self, n: u32, errno: i32) {
        let f = self.region.file.as_ref().expect("a file mapping");
        f.fail_errno.store(errno, Ordering::Release);
        f.fail_read.store(n, Ordering::Release);
    }

    /// Test hook: the next `n` writebacks fail with `errno` (EIO or ENOSPC), as a failing disk
    /// would.
    pub fn inject_writeback_failures(&self, n: u32, errno: i32) {
        let f = self.region.file.as_ref().expect("a file mapping");
        f.fail_errno.store(errno, Ordering::Release);
        f.fail_writeback.store(n, Ordering::Release);
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
        if self.shared.inner.is_owner() {
            loop {
                if let Err(e) = self.flush() {
                    return Err((self, e));
                }
                // Pages written again since the flush passed them (a device kernel still
                // running over the mapping) are written back in another round.
                if self.mode != FileMode::Shared
                    || dirty_pages(&self.shared.inner, &self.region) == 0
                {
                    break;
                }
            }
        }
        drop(self);
        Ok(())
    }

    /// A second owner of the same mapping, for `kept::keep` (the old one must not tear down).
    fn same(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            region: self.region.clone(),
            view: CpuView::new(self.addr, self.len),
            addr: self.addr,
            len: self.len,
            mode: self.mode,
        }
    }
}

/// Dirty pages of a region (file pages newer than the file).
fn dirty_pages(inner: &Inner, region: &Region) -> usize {
    let mut n = 0;
    for (bi, slot) in region.blocks.iter().enumerate() {
        let block = inner.lock_block(slot);
        n += (0..region.block_pages(bi))
            .filter(|&i| block.page(i).dirty)
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
        let mut kept = kept::KEPT.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, others) = std::mem::take(&mut *kept)
            .into_iter()
            .partition(|m| Arc::ptr_eq(&m.shared, &self.0));
        *kept = others;
        mine
    }
}

/// File mappings whose drop failed to write back: kept, not lost (`take_kept_file_mappings`).
mod kept {
    use std::sync::Mutex;

    use super::FileMapping;

    pub(super) static KEPT: Mutex<Vec<FileMapping>> = Mutex::new(Vec::new());

    pub(super) fn keep(m: FileMapping) {
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(m);
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        let inner = &self.shared.inner;
        if inner.is_owner() && self.mode == FileMode::Shared {
            // Write dirty pages back while the mapping is whole. If one cannot be written, the
            // mapping is kept, data and all, for `Hetmem::take_kept_file_mappings`: a drop has
            // no caller to report to, and tearing down would lose the data.
            // Kept only when a writeback failed and left pages dirty: a page dirty after a
            // flush that succeeded was written again meanwhile (or a late write fault marked it
            // so), and the teardown below writes it back.
            let dirty = match inner.flush_region(&self.region) {
                Ok(()) => 0,
                Err(_) => dirty_pages(inner, &self.region),
            };
            if dirty > 0 {
                inner.note_error(
                    "writeback at drop",
                    &std::io::Error::other(format!(
                        "{dirty} dirty pages could not be written back: the mapping at {:#x} is \
                         kept (Hetmem::take_kept_file_mappings)",
                        self.addr
                    )),
                );
                kept::keep(self.same());
                return;
            }
        }
        // Unmapping writes dirty pages back first (the protocol's Invalidate { Unmap }): the
        // ones written since the flush above. The lease goes after: an opener waiting on it
        // must find the data in the file.
        inner.free_region(&self.region);
        if inner.is_owner() {
            // Not in a fork child: the lease is on the description it shares with the parent.
            leases::unregister(&self.region);
            if let Some(f) = &self.region.file {
                // The file is no longer open by this mapping from here: another mapping of it
                // may take a write lease at once.
                f.retire();
            }
        }
    }
}

/// The lease-break thread and the registry it serves.
mod leases {
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex, Weak};

    use hetmem_proto::{Invalidation, PageRun, PAGES_PER_BLOCK};

    use crate::context::Inner;
    use crate::region::{FileMode, Region};
    use crate::sys::lease;

    pub(super) type Entry = (RawFd, Weak<Inner>, Weak<Region>);

    pub(super) static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    /// Dropped mappings whose descriptor number stays taken until the lease thread has read
    /// every break signalled for it (`lease::Event::Retired`): closed at once, the number could
    /// go to a new mapping, and a break still queued for the old one would hit the new one.
    /// The file itself is closed at the drop (`FileBacking::retire`): the number refers to an
    /// inert eventfd meanwhile.
    pub(super) static RETIRING: Mutex<Vec<(RawFd, Arc<Region>)>> = Mutex::new(Vec::new());

    /// Serves lease breaks for `region` from now on, and takes the lease if it can.
    pub fn register(inner: &Arc<Inner>, region: &Arc<Region>) {
        let f = region.file.as_ref().expect("a file mapping");
        let Ok((read_end, fresh)) = lease::install() else {
            // The signal belongs to the application: no leases, as nobody would serve them.
            f.lease_wanted.store(false, Ordering::Release);
            return;
        };
        if fresh {
            // First use in this process (or in a fork child, which has no thread of ours and
            // must not serve its parent's mappings).
            REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clear();
            // The parent's, copied by fork: theirs to drop, not ours.
            std::mem::forget(std::mem::take(
                &mut *RETIRING.lock().unwrap_or_else(|e| e.into_inner()),
            ));
            let _ = std::thread::Builder::new()
                .name("hetmem-lease".into())
                .spawn(move || serve(read_end));
        }
        REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).push((
            f.file.as_raw_fd(),
            Arc::downgrade(inner),
            Arc::downgrade(region),
        ));
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

    fn serve(read_end: RawFd) {
        lease::unblock_here();
        while let Ok(event) = lease::next_event(read_end) {
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

    /// Another process wants the file: write our dirty pages back, drop every cached copy so
    /// later accesses read the file again, then let it proceed.
    fn broken(inner: &Inner, region: &Region) {
        let Some(f) = &region.file else {
            return;
        };
        if !inner.is_owner() {
            return;
        }
        if f.mode == FileMode::Shared {
            let _ = inner.flush_region(region);
        }
        for bi in 0..region.blocks.len() {
            if let Some(all) = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK) {
                // Discard writes dirty data back first; a page whose writeback fails stays.
                let _ = inner.invalidate(region, bi, all, Invalidation::Discard);
            }
        }
        inner.stats.lease_breaks.add(1);
        f.leased.store(false, Ordering::Release);
        lease::release(f.file.as_fd());
    }
}
