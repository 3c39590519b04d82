//! Mappings, memfds and raw memory operations.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::event::EventfdFlags;
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{self, MapFlags, MprotectFlags, ProtFlags};

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
    /// Private anonymous, read-write, not reserved against swap (mmap).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks overlaps nothing of ours.
        let p = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        Self::from_ptr(p, len)
    }

    /// A shared read-write view of `fd` at `offset`, at an address the kernel picks (mmap).
    pub fn shared(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks overlaps nothing of ours.
        let p = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset as u64,
            )
        }?;
        Self::from_ptr(p, len)
    }

    /// A shared view of `fd` placed with MAP_FIXED at `addr`, replacing what was there (mmap).
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
            mm::mmap(
                addr as *mut c_void,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                offset as u64,
            )
        }?;
        Self::from_ptr(p, len)
    }

    /// A 2 MiB-aligned shared view of `fd`: reserves more, then trims head and tail, so blocks
    /// of the view line up with the PMD size (mmap, munmap).
    pub fn shared_aligned(fd: BorrowedFd<'_>, len: usize, align: usize) -> io::Result<Self> {
        // A length this close to the top of the address space cannot be mapped anyway.
        let reserved = len
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks.
        let p = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserved,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let reserve = Self::from_ptr(p, reserved)?;
        let base = reserve.addr();
        let start = (base + align - 1) & !(align - 1);
        std::mem::forget(reserve);
        // SAFETY: [start, start + len) lies inside our own fresh reservation.
        let view = unsafe { Self::shared_fixed(start, fd, 0, len) };
        // SAFETY: head and tail are the unused parts of our reservation; nobody uses them.
        unsafe {
            if start > base {
                let _ = mm::munmap(base as *mut c_void, start - base);
            }
            let end = start + len;
            if base + reserved > end {
                let _ = mm::munmap(end as *mut c_void, base + reserved - end);
            }
        }
        view
    }

    fn from_ptr(p: *mut c_void, len: usize) -> io::Result<Self> {
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
        let _ = unsafe { mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A sealed-size-free memfd of `len` bytes (memfd_create, close-on-exec; ftruncate).
pub fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    // A name with a NUL in it fails with EINVAL.
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
    // A size beyond off_t would wrap to a negative one.
    let size = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    rustix::fs::ftruncate(&fd, size as u64)?;
    Ok(fd)
}

/// The inode number of `fd`'s file (fstat).
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// Bytes of memory the machine has, RAM and swap together (sysinfo): the most that one
/// allocation can ever be backed by. The kernel's heuristic overcommit refuses a single
/// allocation beyond this; hetmem applies the bound whatever the overcommit mode, because under
/// `vm.overcommit_memory=1` a reservation beyond it succeeds and the process is killed when it
/// touches the memory. `u64::MAX` (no bound) if the kernel does not say. (libc: rustix's
/// `sysinfo` needs its `system` feature and treats a failure as impossible.)
pub fn memory_bytes() -> u64 {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: sysinfo fills the struct it is given, which is ours and zeroed.
    if unsafe { libc::sysinfo(info.as_mut_ptr()) } < 0 {
        return u64::MAX;
    }
    // SAFETY: filled by the successful call above (and zeroed before).
    let info = unsafe { info.assume_init() };
    // c_ulong is u64 on the 64-bit targets hetmem supports.
    let units: u64 = info.totalram.saturating_add(info.totalswap);
    units.saturating_mul(u64::from(info.mem_unit.max(1)))
}

/// Bytes of memory the machine can give now without killing anyone: `MemAvailable` plus
/// `SwapFree` from /proc/meminfo (free memory plus what the kernel can reclaim), or
/// [`memory_bytes`] if the file cannot be read.
pub fn available_bytes() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return memory_bytes();
    };
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib.saturating_mul(1024))
    };
    match (field("MemAvailable:"), field("SwapFree:")) {
        (Some(mem), swap) => mem.saturating_add(swap.unwrap_or(0)),
        (None, _) => memory_bytes(),
    }
}

/// Whether `bytes` can be had now ([`available_bytes`]): an allocation beyond it would, under
/// overcommit, succeed and then have the process (or another) killed when touched. Checked
/// before anything large is allocated for a caller's argument.
pub fn fits_in_memory(bytes: usize) -> bool {
    bytes as u64 <= available_bytes()
}

/// An empty vector with room for exactly `n` values, or `None` when they cannot fit in the
/// machine's memory ([`fits_in_memory`]) or the allocator refuses.
pub fn try_vec<T>(n: usize) -> Option<Vec<T>> {
    let bytes = n.checked_mul(std::mem::size_of::<T>())?;
    if !fits_in_memory(bytes) {
        return None;
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    Some(v)
}

/// `len` zero bytes, like `vec![0u8; len]` (zeroed by the allocator, so a large one is fresh
/// zero pages, not a memset), or `None` when they cannot fit in the machine's memory or the
/// allocator refuses.
pub fn try_zeroed(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    if !fits_in_memory(len) {
        return None;
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: the layout has a non-zero size (checked above).
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` comes from the global allocator with the layout of `[u8; len]`, so capacity
    // `len` matches it; all `len` bytes are initialised (zeroed).
    Some(unsafe { Vec::from_raw_parts(p, len, len) })
}

/// Frees the file's pages in the range; they read zero afterwards (fallocate PUNCH_HOLE).
pub fn punch_hole(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<()> {
    // Every mapping of the range sees zeros afterwards, which callers order against their
    // users.
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset as u64,
        len as u64,
    )?;
    Ok(())
}

/// The advice hetmem gives for its own memory ([`madvise`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the page-table entries (private memory: the data too).
    DontNeed,
    /// `MADV_POPULATE_WRITE` (Linux 5.14): fault every page in writable, allocating holes.
    PopulateWrite,
}

/// Gives the kernel advice about `[addr, addr + len)` (madvise).
///
/// # Safety
/// Destructive advice (`DontNeed`) drops page-table entries: for a private mapping the data
/// is lost, so no live reference may point into the range unless that is intended.
pub unsafe fn madvise(addr: usize, len: usize, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        // Linux's MADV_DONTNEED, not POSIX's (rustix's `Advice::DontNeed`, a no-op).
        Advice::DontNeed => mm::Advice::LinuxDontNeed,
        Advice::PopulateWrite => mm::Advice::LinuxPopulateWrite,
    };
    // SAFETY: the caller's contract.
    unsafe { mm::madvise(addr as *mut c_void, len, advice) }?;
    Ok(())
}

/// A protection for [`protect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    /// `PROT_NONE`.
    None,
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

/// Changes the protection of `[addr, addr + len)` (mprotect).
///
/// # Safety
/// Nobody may rely on the old protection of the range: with `Prot::None` every access to it
/// faults from then on.
pub unsafe fn protect(addr: usize, len: usize, prot: Prot) -> io::Result<()> {
    let flags = match prot {
        Prot::None => MprotectFlags::empty(),
        Prot::Read => MprotectFlags::READ,
        Prot::ReadWrite => MprotectFlags::READ | MprotectFlags::WRITE,
    };
    // SAFETY: the caller's contract.
    unsafe { mm::mprotect(addr as *mut c_void, len, flags) }?;
    Ok(())
}

/// Replaces `[addr, addr + len)` with an inaccessible anonymous mapping (`PROT_NONE`,
/// `MAP_FIXED`, no reserve): the range stays the caller's, so no other `mmap` can land in it,
/// until its owner (a device reservation, whose release unmaps it) lets it go.
///
/// # Safety
/// As [`unmap`]: the range must be memory the caller owns, that nothing will use again.
pub unsafe fn placeholder(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's contract; MAP_FIXED replaces only the caller's own range.
    unsafe {
        mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
        )
    }?;
    Ok(())
}

/// Unmaps `[addr, addr + len)` (munmap).
///
/// # Safety
/// The range must be memory the caller owns, that nothing else will use again: no reference
/// may point into it, and no owner (a [`Mapping`]) may unmap it later.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's contract.
    unsafe { mm::munmap(addr as *mut c_void, len) }?;
    Ok(())
}

/// Replaces the mapping at `[addr, addr + len)` with private anonymous memory that keeps the
/// address: mmap a fresh anonymous mapping, let `fill` write it (the whole of it, as a slice),
/// give the parts that `protect` lists (offsets from `addr`, lengths, protections; best
/// effort, as a fork child's copy of an mprotected range) their protection, then move it over
/// the range with mremap(MREMAP_MAYMOVE | MREMAP_FIXED). Pointers into the range stay valid
/// and see what `fill` wrote. On an error the range is as it was (the fresh mapping, if any,
/// is unmapped).
///
/// # Safety
/// `[addr, addr + len)` must be page-aligned memory the caller owns, and the contents `fill`
/// writes must be what anyone who may read the range is entitled to see there (the range's
/// latest data, with writers held off until the call returns).
pub unsafe fn replace_with_private(
    addr: usize,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
    protect: &[(usize, usize, Prot)],
) -> io::Result<()> {
    let fresh = Mapping::anonymous(len)?;
    // SAFETY: our fresh private mapping, read-write and `len` bytes long; nobody else knows it.
    fill(unsafe { std::slice::from_raw_parts_mut(fresh.as_ptr(), len) });
    for &(off, n, prot) in protect {
        if off.checked_add(n).is_some_and(|end| end <= len) {
            // SAFETY: part of our fresh mapping, to which no reference remains (`fill` returned).
            let _ = unsafe { self::protect(fresh.addr() + off, n, prot) };
        }
    }
    // SAFETY: moves our fresh mapping over the range, which the caller owns and has made the
    // fresh mapping a faithful replacement of (contract above).
    unsafe {
        mm::mremap_fixed(
            fresh.as_ptr().cast(),
            len,
            len,
            mm::MremapFlags::MAYMOVE,
            addr as *mut c_void,
        )
    }?;
    fresh.leak();
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

/// Copies like [`copy`], with non-temporal stores on x86-64 for page-aligned copies of 64 KiB
/// or more. glibc streams only above a cache-sized threshold, so a 2 MiB `memcpy` pays a
/// read-for-ownership for every destination line. Streaming skips it: block-sized copies reach
/// 9-10 GB/s on the development VM, where `memcpy` gets 7-9.
///
/// # Safety
/// As for [`copy`].
pub unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if len >= 64 * 1024 && (dst as usize | src as usize | len) % 64 == 0 {
            // SAFETY: the caller's contract; both pointers are 64-byte aligned and `len` is a
            // multiple of 64, so every 16-byte load and store below is aligned and in bounds.
            // SSE2 is part of the x86-64 baseline.
            unsafe { stream_copy(dst, src, len) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { copy(dst, src, len) }
}

#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_sfence, _mm_stream_si128};
    let (d, s) = (dst.cast::<__m128i>(), src.cast::<__m128i>());
    let mut i = 0;
    while i < len / 16 {
        // SAFETY: see `copy_streaming`: aligned, in bounds, 4 vectors (64 bytes) a step.
        unsafe {
            let a = _mm_load_si128(s.add(i));
            let b = _mm_load_si128(s.add(i + 1));
            let c = _mm_load_si128(s.add(i + 2));
            let e = _mm_load_si128(s.add(i + 3));
            _mm_stream_si128(d.add(i), a);
            _mm_stream_si128(d.add(i + 1), b);
            _mm_stream_si128(d.add(i + 2), c);
            _mm_stream_si128(d.add(i + 3), e);
        }
        i += 4;
    }
    // SAFETY: orders the streaming stores before whatever publishes the copy.
    unsafe { _mm_sfence() };
}

/// A non-blocking eventfd: wakes threads that wait on it.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A fresh eventfd with count 0 (eventfd, close-on-exec, non-blocking).
    pub fn new() -> io::Result<Self> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self(fd))
    }

    /// Makes it readable (write of 1).
    pub fn signal(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Resets it (read); another thread may have done so already.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut buf);
    }

    /// The descriptor, for epoll.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
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
    /// File offset of `start`, in bytes.
    pub offset: u64,
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
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(inode)) =
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
            offset: u64::from_str_radix(off, 16).unwrap_or(0),
            inode: inode.parse().unwrap_or(0),
            path,
        });
    }
    Ok(out)
}

/// The mapping that contains an address, as the kernel has it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// Start address.
    pub start: usize,
    /// End address.
    pub end: usize,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Inode of the file mapped (0 for anonymous memory).
    pub inode: u64,
    /// File offset of `start`, in bytes.
    pub offset: u64,
}

impl Vma {
    /// Whether the mapping shows file `inode` at `addr`, at byte `offset` of the file.
    pub fn shows(&self, inode: u64, addr: usize, offset: usize) -> bool {
        inode != 0
            && self.inode == inode
            && (self.start..self.end).contains(&addr)
            && self.offset + (addr - self.start) as u64 == offset as u64
    }
}

/// The protection of the mapping that contains `addr`: `(start, end, readable, writable)`, or
/// `None` if nothing is mapped there.
pub fn vma_at(addr: usize) -> io::Result<Option<(usize, usize, bool, bool)>> {
    Ok(vma_info(addr)?.map(|v| (v.start, v.end, v.read, v.write)))
}

/// The mapping that contains `addr`, or `None` if nothing is mapped there. Uses PROCMAP_QUERY
/// (Linux 6.11) and falls back to parsing /proc/self/maps.
pub fn vma_info(addr: usize) -> io::Result<Option<Vma>> {
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
        // With the pid it was opened in: "self" is resolved at open time, so a fork child must
        // not query its parent's address space through an inherited descriptor.
        static MAPS: std::cell::RefCell<Option<(u32, std::fs::File)>> =
            const { std::cell::RefCell::new(None) };
    }
    let pid = std::process::id();
    let fast = MAPS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(p, _)| *p != pid) {
            *slot = std::fs::File::open("/proc/self/maps")
                .ok()
                .map(|f| (pid, f));
        }
        let f = &slot.as_ref()?.1;
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr as u64,
            ..Default::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes one procmap_query on our stack; the name and
        // build-id buffers are absent (sizes 0).
        let r = unsafe { libc::ioctl(f.as_raw_fd(), PROCMAP_QUERY, &mut q as *mut ProcmapQuery) };
        if r == 0 {
            return Some(Ok(Some(Vma {
                start: q.vma_start as usize,
                end: q.vma_end as usize,
                read: q.vma_flags & 1 != 0,
                write: q.vma_flags & 2 != 0,
                inode: q.inode,
                offset: q.vma_offset,
            })));
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
        Vma {
            start: e.start,
            end: e.end,
            read: b.first() == Some(&b'r'),
            write: b.get(1) == Some(&b'w'),
            inode: e.inode,
            offset: e.offset,
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::undocumented_unsafe_blocks)]
    use super::*;

    #[test]
    fn fits_in_memory_means_what_is_available_now() {
        let (avail, total) = (available_bytes(), memory_bytes());
        assert!(
            avail > 0 && avail <= total,
            "available {avail}, total {total}"
        );
        // Between what is available and what the machine has: the old bound (RAM and swap)
        // took it, and the process was killed when the memory was touched.
        let between = avail + (total - avail) / 2;
        assert!(
            total - avail > 1 << 20,
            "nothing is in use on this machine?"
        );
        assert!(!fits_in_memory(between as usize));
        assert!(fits_in_memory((avail / 2) as usize));
    }

    #[test]
    fn copy_streaming_copies_every_byte_aligned_or_not() {
        let len = 256 * 1024;
        let src = Mapping::anonymous(len).unwrap();
        let dst = Mapping::anonymous(len).unwrap();
        let s = unsafe { std::slice::from_raw_parts_mut(src.as_ptr(), len) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        // Aligned (streaming path), then unaligned and short (fallback path).
        for (off, n) in [(0, len), (64, len - 128), (3, 70_001), (0, 4096)] {
            unsafe { std::ptr::write_bytes(dst.as_ptr(), 0, len) };
            unsafe { copy_streaming(dst.as_ptr().add(off), src.as_ptr().add(off), n) };
            let d = unsafe { std::slice::from_raw_parts(dst.as_ptr(), len) };
            assert_eq!(&d[off..off + n], &s[off..off + n], "copy at {off} of {n}");
            assert!(d[..off].iter().all(|&b| b == 0) && d[off + n..].iter().all(|&b| b == 0));
        }
    }
}
