//! File mappings: a file's pages as managed memory (`docs/file-contract.md`).
//!
//! hetmem keeps its own cache of the file's pages above the kernel's page cache: a region like
//! an allocation, whose blocks are file-backed in the protocol. First touches read the file
//! (`pread`, straight into device memory for a device fault); writebacks write it (`pwrite`,
//! straight from device memory). `flush` is msync(MS_SYNC), `sync` adds fdatasync, and dropping
//! the mapping writes dirty pages back first.

use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use hetmem_proto::{Invalidation, OpError, PageRun, RequestKind, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::buffer::CpuView;
use crate::context::{Hetmem, Inner, Shared};
use crate::error::{Error, Result};
use crate::region::{FileBacking, FileMode, Region};
use crate::sys::lease;
use std::os::fd::AsFd;

/// A file mapped as managed memory ([`Hetmem::map_file`]).
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
    /// Read device-bound pages with O_DIRECT, so data that goes to device memory is not also
    /// cached in the page cache. Ignored where the file system has no O_DIRECT (tmpfs); see
    /// [`FileMapping::is_direct`]. Writebacks stay buffered.
    pub direct: bool,
    /// Keep coherent with other processes through a file lease: before another process opens
    /// the file (or truncates it), hetmem writes its dirty pages back and drops its cached
    /// copies, then lets that process proceed. Shared mappings take a write lease (possible
    /// only while no other process has the file open), read-only ones a read lease (possible
    /// while nobody writes it); private mappings take none. Where no lease can be had, hetmem
    /// retries at each fault and flush and caches without coherence meanwhile
    /// (`docs/file-contract.md` §6); [`FileMapping::is_leased`] says which.
    pub lease: bool,
}

impl FileOptions {
    /// Buffered I/O in `mode`, no lease.
    pub fn new(mode: FileMode) -> Self {
        Self {
            mode,
            direct: false,
            lease: false,
        }
    }

    /// With or without a file lease.
    pub fn lease(mut self, lease: bool) -> Self {
        self.lease = lease;
        self
    }

    /// With or without O_DIRECT reads for device memory.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
}

impl Hetmem {
    /// `map_file_with` with buffered I/O.
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
    pub fn map_file_with(
        &self,
        path: impl AsRef<Path>,
        offset: u64,
        len: usize,
        options: FileOptions,
    ) -> Result<FileMapping> {
        let mode = options.mode;
        if len == 0 || len % PAGE_SIZE != 0 || offset % PAGE_SIZE as u64 != 0 {
            return Err(Error::Invalid(
                "offset and length must be page-aligned, length non-zero",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(mode == FileMode::Shared)
            .open(path.as_ref())
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => Error::NoEnt("no such file"),
                _ => Error::os("open file")(e),
            })?;
        let meta = file.metadata().map_err(Error::os("stat file"))?;
        if !meta.is_file() {
            return Err(Error::Invalid("only regular files can be mapped"));
        }
        let direct = if options.direct {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path.as_ref())
                .ok()
        } else {
            None
        };
        let inner = &self.0.inner;
        let pages = len / PAGE_SIZE;
        let backing = FileBacking {
            file,
            direct,
            first_page: offset / PAGE_SIZE as u64,
            mode,
            eof_page: AtomicUsize::new(pages),
            fail_writeback: AtomicU32::new(0),
            fail_errno: AtomicI32::new(libc::EIO),
            lease_wanted: options.lease && mode != FileMode::Private,
            leased: std::sync::atomic::AtomicBool::new(false),
        };
        let (region, cpu) = inner.new_region(len, Some(backing))?;
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
            if f.lease_wanted {
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
        if f.lease_wanted && !f.leased.load(Ordering::Acquire) {
            let write = f.mode == FileMode::Shared;
            if let Ok(true) = lease::take(f.file.as_fd(), write) {
                f.leased.store(true, Ordering::Release);
            }
        }
        let Ok(meta) = f.file.metadata() else {
            return;
        };
        let total = region.len / PAGE_SIZE;
        let file_pages = meta.len().div_ceil(PAGE_SIZE as u64);
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

    /// Writes back every dirty page of a file mapping; the first error, once.
    pub(crate) fn flush_region(&self, region: &Region) -> Result<()> {
        self.check_eof(region);
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

    /// Whether device-bound reads use O_DIRECT (asked for, and supported by the file system).
    pub fn is_direct(&self) -> bool {
        self.region
            .file
            .as_ref()
            .is_some_and(|f| f.direct.is_some())
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
    /// Private and read-only mappings have nothing to write.
    pub fn flush(&self) -> Result<()> {
        self.shared.inner.flush_region(&self.region)
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

    /// Test hook: the next `n` writebacks fail with `errno` (EIO or ENOSPC), as a failing disk
    /// would.
    pub fn inject_writeback_failures(&self, n: u32, errno: i32) {
        let f = self.region.file.as_ref().expect("a file mapping");
        f.fail_errno.store(errno, Ordering::Release);
        f.fail_writeback.store(n, Ordering::Release);
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        leases::unregister(&self.region);
        // Unmapping writes dirty pages back first (the protocol's Invalidate { Unmap }); an
        // error there has no caller to go to, so flush first when it matters.
        self.shared.inner.free_region(&self.region);
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

    type Entry = (RawFd, Weak<Inner>, Weak<Region>);

    static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    /// Serves lease breaks for `region` from now on, and takes the lease if it can.
    pub fn register(inner: &Arc<Inner>, region: &Arc<Region>) {
        let Ok((read_end, fresh)) = lease::install() else {
            return; // The signal belongs to the application: no leases.
        };
        if fresh {
            // First use in this process (or in a fork child, which has no thread of ours and
            // must not serve its parent's mappings).
            REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let _ = std::thread::Builder::new()
                .name("hetmem-lease".into())
                .spawn(move || serve(read_end));
        }
        let f = region.file.as_ref().expect("a file mapping");
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
        if !f.lease_wanted {
            return;
        }
        REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, _, r)| r.upgrade().is_some_and(|r| !Arc::ptr_eq(&r, region)));
        if f.leased.swap(false, Ordering::AcqRel) {
            lease::release(f.file.as_fd());
        }
    }

    fn serve(read_end: RawFd) {
        while let Ok(fd) = lease::next_break(read_end) {
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
