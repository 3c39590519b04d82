//! Mappings, memfds and raw memory operations.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// A mapping that this process owns: unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range; it gives out only raw pointers, whose use is governed by
// the unsafe functions that take them.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping exposes no interior mutability of its own.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous, read-write, not reserved against swap.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::from_result(p, len)
    }

    /// A shared read-write view of `fd` at `offset`, at an address the kernel picks.
    pub fn shared(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Self::from_result(p, len)
    }

    /// A shared view of `fd` placed with MAP_FIXED at `addr`, replacing what was there.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be memory the caller owns and that no live reference points
    /// into, or the contents must be exactly preserved by the caller.
    pub unsafe fn shared_fixed(
        addr: usize,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<Self> {
        // SAFETY: the caller owns the range (contract above).
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Self::from_result(p, len)
    }

    /// A 2 MiB-aligned shared view of `fd`: reserves more, then trims head and tail, so blocks
    /// of the view line up with the PMD size.
    pub fn shared_aligned(fd: BorrowedFd<'_>, len: usize, align: usize) -> io::Result<Self> {
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + align,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let reserve = Self::from_result(p, len + align)?;
        let base = reserve.addr();
        let start = (base + align - 1) & !(align - 1);
        std::mem::forget(reserve);
        // SAFETY: [start, start + len) lies inside our own fresh reservation.
        let view = unsafe { Self::shared_fixed(start, fd, 0, len) };
        // SAFETY: head and tail are the unused parts of our reservation; nobody uses them.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let end = start + len;
            if base + len + align > end {
                libc::munmap(end as *mut libc::c_void, base + len + align - end);
            }
        }
        view
    }

    fn from_result(p: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Start pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Gives up ownership without unmapping (the range now belongs to someone else).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the range; nothing we handed out outlives the Mapping by contract.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A sealed-size-free memfd of `len` bytes (close-on-exec).
pub fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: memfd_create reads a NUL-terminated string and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        return Err(errno());
    }
    Ok(fd)
}

/// Frees the file's pages in the range; they read zero afterwards (fallocate PUNCH_HOLE).
pub fn punch_hole(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<()> {
    // SAFETY: fallocate on our own fd; every mapping of the range sees zeros afterwards, which
    // callers order against their users.
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Calls madvise.
///
/// # Safety
/// Destructive advice (MADV_DONTNEED) drops page-table entries: for a private mapping the data
/// is lost, so no live reference may point into the range unless that is intended.
pub unsafe fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller's contract.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Copies `len` bytes between raw ranges that do not overlap.
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes; nobody else writes `dst` meanwhile.
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// A mapping found in /proc/self/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    /// Start.
    pub start: usize,
    /// End.
    pub end: usize,
    /// `rw-p` style permissions.
    pub perms: String,
    /// Inode (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name, empty for anonymous.
    pub path: String,
}

/// The mappings that intersect `[start, end)`, in address order.
pub fn maps_in(start: usize, end: usize) -> io::Result<Vec<MapsEntry>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if b <= start || a >= end {
            continue;
        }
        out.push(MapsEntry {
            start: a,
            end: b,
            perms: perms.to_string(),
            inode: inode.parse().unwrap_or(0),
            path,
        });
    }
    Ok(out)
}

/// The protection of the mapping that contains `addr`: `(start, end, readable, writable)`, or
/// `None` if nothing is mapped there. Uses PROCMAP_QUERY (Linux 6.11) and falls back to parsing
/// /proc/self/maps.
pub fn vma_at(addr: usize) -> io::Result<Option<(usize, usize, bool, bool)>> {
    #[repr(C)]
    #[derive(Default)]
    struct ProcmapQuery {
        size: u64,
        query_flags: u64,
        query_addr: u64,
        vma_start: u64,
        vma_end: u64,
        vma_flags: u64,
        vma_page_size: u64,
        vma_offset: u64,
        inode: u64,
        dev_major: u32,
        dev_minor: u32,
        vma_name_size: u32,
        build_id_size: u32,
        vma_name_addr: u64,
        build_id_addr: u64,
    }
    // _IOWR('f', 17, struct procmap_query)
    const PROCMAP_QUERY: libc::c_ulong = (3 << 30)
        | ((std::mem::size_of::<ProcmapQuery>() as libc::c_ulong) << 16)
        | (0x66 << 8)
        | 17;
    thread_local! {
        static MAPS: Option<std::fs::File> = std::fs::File::open("/proc/self/maps").ok();
    }
    let fast = MAPS.with(|f| {
        let f = f.as_ref()?;
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr as u64,
            ..Default::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes one procmap_query on our stack; the name and
        // build-id buffers are absent (sizes 0).
        let r = unsafe { libc::ioctl(f.as_raw_fd(), PROCMAP_QUERY, &mut q as *mut ProcmapQuery) };
        if r == 0 {
            return Some(Ok(Some((
                q.vma_start as usize,
                q.vma_end as usize,
                q.vma_flags & 1 != 0,
                q.vma_flags & 2 != 0,
            ))));
        }
        match errno().raw_os_error() {
            Some(libc::ENOENT) => Some(Ok(None)),
            _ => None, // ENOTTY on kernels before 6.11: fall back.
        }
    });
    if let Some(r) = fast {
        return r;
    }
    Ok(maps_in(addr, addr + 1)?.first().map(|e| {
        let b = e.perms.as_bytes();
        (
            e.start,
            e.end,
            b.first() == Some(&b'r'),
            b.get(1) == Some(&b'w'),
        )
    }))
}
