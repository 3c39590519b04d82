//! The file behind a file-backed region: its one descriptor, writeback errors (errseq), and
//! reads and writes that never wait for the file's inode lock (`sys::file`, contract §12).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hetmem_proto::{OpError, PAGE_SIZE};

use crate::error::Result;
use crate::mm::testing::FileFaults;
use crate::sys::file::{self as sys_file, NoWait, Window};

/// How a file mapping treats writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMode {
    /// Neither the CPU nor devices may write.
    ReadOnly,
    /// Writes go back to the file (flush, sync, unmap).
    Shared,
    /// Copy-on-write: writes stay in memory and never reach the file.
    Private,
}

/// The file behind a file-backed region.
#[derive(Debug)]
pub(crate) struct FileBacking {
    /// The one descriptor hetmem holds on the file (one, so that a write lease can be had).
    /// With `FileOptions::direct` it carries O_DIRECT (`mm/file_io.rs` does the I/O).
    pub file: std::fs::File,
    /// O_DIRECT is set on `file`; cleared for good if the file system refuses a direct I/O.
    pub direct: AtomicBool,
    /// Direct I/O holds it shared; an I/O that must be buffered (the partial page at EOF)
    /// holds it exclusive while it clears O_DIRECT on the shared descriptor.
    pub io_mode: RwLock<()>,
    /// File offset of the region's first byte, in pages.
    pub first_page: u64,
    pub mode: FileMode,
    /// Pages of the region at or beyond this one are past the file's end (truncated, and not
    /// extended again since).
    pub eof_page: AtomicUsize,
    /// Held by the check of the file's size against the mapping in progress
    /// (`Runtime::check_eof`), so that shrinks and growths are applied in the order their
    /// `fstat`s saw them; a check that finds it held skips.
    pub eof_lock: Mutex<()>,
    /// Test hook: reads and writebacks to fail (`crate::mm::testing`).
    pub faults: FileFaults,
    /// Coherence with other processes through a file lease (`FileOptions::lease`).
    pub lease_wanted: AtomicBool,
    /// The lease is held now, and every page the mapping caches is coherent with the file.
    pub leased: AtomicBool,
    /// Pages may have been cached while the lease was not held (it could not be taken, or was
    /// broken): they may be stale, and taking the lease again drops them first
    /// (`Runtime::retake_lease`).
    pub unleased_cache: AtomicBool,
    /// Serialises taking the lease back and dropping what was cached without it.
    pub retake: std::sync::Mutex<()>,
    /// The lease thread is serving a break of this mapping (`leases.rs::broken`): no retake
    /// until it is done, since its end releases whatever lease is held, a retaken one too,
    /// and would let another opener in before the writes made under it are written back (found
    /// by the file-level model, `hetmem_proto::model::file`, config
    /// `retake_during_a_timed_out_break_as_the_runtime_does`).
    pub breaking: AtomicBool,
    /// Holds new faults from a break's signal to its release, and says when the break ran out
    /// of time (`mm/lease_break.rs`).
    pub gate: crate::mm::lease_break::BreakGate,
    /// Pages a timed-out break left conflicted: never written back until resolved
    /// (`FileMapping::resolve_conflicts`).
    pub conflicts: crate::mm::lease_break::Conflicts,
    /// How long a lease break may spend writing back (`FileOptions::break_budget`; `None`:
    /// half of `lease-break-time`, read again at each background writeback). Only for
    /// Shared mappings that want a lease; `None` here too for the others.
    pub break_budget: Option<BreakBudget>,
    /// Dirty pages (and pages under writeback) past which the background writeback starts
    /// (`mm/flusher.rs`): what the measured write rate writes back within the break budget.
    /// `usize::MAX` without a budget.
    pub dirty_limit: AtomicUsize,
    /// The mapping's writeback rate, bytes per second, a moving average of its `write_at`s.
    pub write_rate: AtomicU64,
    /// The background writeback was asked to run for this mapping and has not finished yet.
    pub flusher_kicked: AtomicBool,
    /// The smallest file size whose partial last page was dropped from the cache (the size at
    /// map time, or at the last growth, to begin with): a shrink below it drops the new partial
    /// page (`check_eof`).
    pub tail_checked: AtomicU64,
    /// Dirty pages leave device memory by writeback (`FileOptions::evict_to_file`).
    pub evict_to_file: bool,
    /// Writeback errors of the file, shared by its mappings in this process.
    pub errseq: std::sync::Arc<crate::mm::file_io::ErrSeq>,
    /// The `errseq` value this mapping's `flush` last reported (at first, `ErrSeq::sample`'s:
    /// before an error nobody has reported yet).
    pub wb_seen: AtomicU64,
    /// How the file is read and written without waiting for its inode lock, and the smallest
    /// size seen (`crate::mm::file_io::FileIo`).
    pub io: crate::mm::file_io::FileIo,
    /// Pages written back since the last `fdatasync` that succeeded: in the page cache, not yet
    /// known to be on the disk. A failure of the kernel's writeback (`fdatasync`'s error, or
    /// one `flush` learns of) makes them dirty again, so they are written once more
    /// (`FileMapping::sync`).
    pub unsynced: Unsynced,
    /// What `map_file` learnt about the file system (`FileMapping::capabilities`).
    pub caps: crate::fs_caps::FileCapabilities,
    /// The limit on system memory for blocks the CPU filled, and their order
    /// (`FileOptions::cache_limit`, `mm/cache.rs`).
    pub cache: Option<FileCache>,
}

/// How long a lease break of a mapping may spend writing back (`FileOptions::break_budget`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BreakBudget {
    /// Half of `lease-break-time`, as it is at each look.
    HalfBreakTime,
    Fixed(std::time::Duration),
}

/// The write rate assumed before a mapping has written anything: 64 MiB/s, a slow disk's.
pub(crate) const INITIAL_WRITE_RATE: u64 = 64 << 20;

impl FileBacking {
    /// Adds one writeback of `bytes` that took `took` to the write-rate average (an
    /// eighth of the new sample). Small writes are slower per byte: the average errs low,
    /// and so the dirty limit errs small, the safe side.
    pub(crate) fn note_write(&self, bytes: usize, took: std::time::Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let sample = (bytes as f64 / secs) as u64;
        let old = self.write_rate.load(Ordering::Relaxed);
        let new = old - old / 8 + sample / 8;
        self.write_rate.store(new.max(1), Ordering::Relaxed);
    }

    /// The dirty limit for a break of `break_time`: what the write rate writes back in the
    /// budget, at least one block's pages. `usize::MAX` without a budget.
    pub(crate) fn compute_dirty_limit(&self, break_time: std::time::Duration) -> usize {
        let budget = match self.break_budget {
            None => return usize::MAX,
            Some(BreakBudget::HalfBreakTime) => break_time / 2,
            Some(BreakBudget::Fixed(d)) => d,
        };
        let bytes = self.write_rate.load(Ordering::Relaxed) as f64 * budget.as_secs_f64();
        let pages = (bytes / PAGE_SIZE as f64).min(usize::MAX as f64 / 2.0) as usize;
        pages.max(hetmem_proto::PAGES_PER_BLOCK)
    }
}

/// The blocks a file mapping's CPU faults filled, oldest first, and how many it may keep
/// (`FileOptions::cache_limit`; what is done with it: `mm/cache.rs`).
#[derive(Debug)]
pub(crate) struct FileCache {
    /// Blocks kept at most.
    pub(crate) limit: usize,
    order: Mutex<Order>,
}

#[derive(Debug)]
struct Order {
    /// Noted blocks, oldest first; each at most once.
    queue: VecDeque<usize>,
    /// One bit per block of the region: in `queue`.
    noted: Box<[u64]>,
}

impl Order {
    fn contains(&self, bi: usize) -> bool {
        self.noted
            .get(bi / 64)
            .is_some_and(|w| w & (1 << (bi % 64)) != 0)
    }

    fn set(&mut self, bi: usize, on: bool) {
        if let Some(w) = self.noted.get_mut(bi / 64) {
            if on {
                *w |= 1 << (bi % 64);
            } else {
                *w &= !(1 << (bi % 64));
            }
        }
    }
}

impl FileCache {
    /// A limit of `limit` blocks (at least one) for a region of `nblocks` blocks.
    pub(crate) fn new(limit: usize, nblocks: usize) -> Self {
        Self {
            limit: limit.max(1),
            order: Mutex::new(Order {
                queue: VecDeque::new(),
                noted: vec![0; nblocks.div_ceil(64)].into_boxed_slice(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes block `bi` as filled now, if it is not noted yet. Returns how many blocks are
    /// over the limit.
    pub(crate) fn note(&self, bi: usize) -> usize {
        let mut o = self.lock();
        if !o.contains(bi) {
            o.queue.push_back(bi);
            o.set(bi, true);
        }
        o.queue.len().saturating_sub(self.limit)
    }

    /// Takes the oldest noted block other than `keep`.
    pub(crate) fn take_oldest(&self, keep: usize) -> Option<usize> {
        let mut o = self.lock();
        let at = o.queue.iter().position(|&b| b != keep)?;
        let bi = o.queue.remove(at)?;
        o.set(bi, false);
        Some(bi)
    }

    /// Notes `bi` again, as the newest (a block that could not be dropped), unless a fault
    /// noted it meanwhile.
    pub(crate) fn note_again(&self, bi: usize) {
        let mut o = self.lock();
        if !o.contains(bi) {
            o.queue.push_back(bi);
            o.set(bi, true);
        }
    }
}

/// A set of a mapping's pages, one bit each (`FileBacking::unsynced`).
#[derive(Debug)]
pub(crate) struct Unsynced(Box<[AtomicU64]>);

impl Unsynced {
    /// Empty, for a mapping of `pages` pages.
    pub(crate) fn new(pages: usize) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Adds pages `[first, first + n)` of the mapping.
    pub(crate) fn add(&self, first: usize, n: usize) {
        for p in first..first + n {
            if let Some(w) = self.0.get(p / 64) {
                w.fetch_or(1 << (p % 64), Ordering::AcqRel);
            }
        }
    }

    /// Empties the set; the pages it held, in order.
    pub(crate) fn take(&self) -> Vec<usize> {
        let mut pages = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                pages.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        pages
    }
}

impl FileBacking {
    /// `fdatasync` of the file (the injected failure, if one is armed, after the real call):
    /// the error of the kernel's writeback, reported once to this descriptor, with its errno
    /// kept (EIO, ENOSPC, EDQUOT).
    pub(crate) fn data_sync(&self) -> Result<(), OpError> {
        let r = loop {
            match self.file.sync_data() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        if let Some(errno) = self.faults.take_sync() {
            return Err(errno_to_op(errno));
        }
        r.map_err(|e| errno_to_op(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    /// Errors of the kernel's own writeback of the file since this descriptor last learned of
    /// one, without writing anything (`sys::file::writeback_errors`).
    pub(crate) fn kernel_writeback_errors(&self) -> Result<(), OpError> {
        sys_file::writeback_errors(self.file.as_fd(), self.io.offset, self.io.len)
            .map_err(errno_to_op)
    }
}

/// Writeback errors of one file in this process, in the manner of the kernel's `errseq_t`
/// (`lib/errseq.c`): a sequence that moves at every error, the last error, and whether anyone
/// has been told of it. Each mapping keeps the value it last reported (`FileBacking::wb_seen`),
/// so each reports a new error once. An error nobody has been told of yet (`seen` false) is
/// reported also to a mapping made after it ([`ErrSeq::sample`]), and the sequence outlives
/// the file's last mapping until someone is told ([`ErrSeq::of_file`]): an error of a writeback
/// no flush waited for (a drop, an eviction, a lease break) is never lost.
#[derive(Debug, Default)]
pub(crate) struct ErrSeq {
    state: Mutex<SeqState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct SeqState {
    /// Errors recorded so far.
    seq: u64,
    /// The errno of the last one: EIO, ENOSPC or EDQUOT.
    errno: i32,
    /// A mapping has reported the last error (`check_and_advance`).
    seen: bool,
}

/// Every file's `ErrSeq`, by device and inode. An entry lives while a mapping of the file
/// holds it, or while the file has an error nobody was told of.
pub(crate) type Files = Vec<((u64, u64), Arc<ErrSeq>)>;
static FILES: Mutex<Files> = Mutex::new(Vec::new());

/// Every file's `ErrSeq`, locked (fork's prepare handler holds it, `mm/fork.rs`).
pub(crate) fn lock_files() -> std::sync::MutexGuard<'static, Files> {
    FILES.lock().unwrap_or_else(|e| e.into_inner())
}

impl ErrSeq {
    /// The one for the file `meta` describes, shared with its other mappings in this process,
    /// and with the mappings it had before, if an error of theirs was never reported.
    pub(crate) fn of_file(meta: &std::fs::Metadata) -> Arc<Self> {
        use std::os::unix::fs::MetadataExt;
        let key = (meta.dev(), meta.ino());
        let mut files = lock_files();
        // Kept only by this list: no mapping left. Forgotten unless it holds an unseen error.
        files.retain(|(_, e)| Arc::strong_count(e) > 1 || e.unseen());
        if let Some((_, e)) = files.iter().find(|(k, _)| *k == key) {
            return e.clone();
        }
        let e = Arc::new(Self::default());
        files.push((key, e.clone()));
        e
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every failed writeback of the file comes here (`Runtime::write_back` in `mm/exec.rs`).
    pub(crate) fn record(&self, e: OpError) {
        let mut s = self.lock();
        s.errno = op_to_errno(e);
        s.seq += 1;
        s.seen = false;
    }

    /// The value a new mapping starts from: the current one if its last error was reported,
    /// else 0 (before every error), so that the new mapping reports it, as the kernel's
    /// `errseq_sample` lets a file opened after an unseen error report it.
    pub(crate) fn sample(&self) -> u64 {
        let s = self.lock();
        if s.seen {
            s.seq
        } else {
            0
        }
    }

    /// The error to report to a mapping whose last reported value is `cursor`, if an error was
    /// recorded since; the cursor moves to now, and the error counts as seen
    /// (`errseq_check_and_advance`).
    pub(crate) fn check_and_advance(&self, cursor: &AtomicU64) -> Option<OpError> {
        let mut s = self.lock();
        if cursor.load(Ordering::Acquire) == s.seq {
            return None;
        }
        cursor.store(s.seq, Ordering::Release);
        s.seen = true;
        Some(errno_to_op(s.errno))
    }

    /// An error was recorded that no mapping has reported yet.
    fn unseen(&self) -> bool {
        let s = self.lock();
        s.seq > 0 && !s.seen
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
    /// The mapping's end of file: the smallest size of the file seen since the mapping was made
    /// or, after the file grew, since that growth was followed (`Runtime::check_eof`, which
    /// first drops the page that held the old end). Writebacks never write at or past it, so
    /// no page is written past the smallest size seen since it was filled (§7).
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
    pub(crate) fn new(offset: u64, len: usize, size: u64, lock_free_reads: bool) -> Self {
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
        self.observe_size().map(|(before, now)| before.min(now))
    }

    /// Notes the file's current size (`fstat`) as `size_limit` does, and returns the mapping's
    /// end of file before this look and the size now; `now > before` means the file grew.
    pub(crate) fn observe_size(&self) -> Option<(u64, u64)> {
        let now = self.file.metadata().ok()?.len();
        let before = self.io.min_size.fetch_min(now, Ordering::AcqRel);
        Some((before, now))
    }

    /// Moves the mapping's end of file up from `from` to `to` (a growth being followed), unless
    /// a writeback saw a smaller size meanwhile: then it stays, and whether the change succeeded
    /// is returned. Only `Runtime::check_eof`, under `eof_lock`, after dropping the page that
    /// held `from`.
    pub(crate) fn raise_end(&self, from: u64, to: u64) -> bool {
        self.io
            .min_size
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
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
        if let Some(errno) = self.faults.take_read() {
            return Err(errno_to_op(errno));
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
        if let Some(errno) = self.faults.take_writeback() {
            return Err(errno_to_op(errno));
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
        sys_file::set_o_direct(self.file.as_fd(), on)
    }
}

/// A file I/O errno as the protocol's error: ENOSPC and EDQUOT keep their meaning (the cure
/// differs: free space, or a larger quota), anything else is EIO.
pub(crate) fn errno_to_op(errno: i32) -> OpError {
    match errno {
        libc::ENOSPC => OpError::NoSpace,
        libc::EDQUOT => OpError::Quota,
        _ => OpError::Io,
    }
}

fn op_to_errno(e: OpError) -> i32 {
    match e {
        OpError::NoSpace => libc::ENOSPC,
        OpError::Quota => libc::EDQUOT,
        OpError::Conflict => libc::ESTALE,
        OpError::Io | OpError::Device => libc::EIO,
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
