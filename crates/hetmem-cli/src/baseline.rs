//! Native baselines that need raw system calls: private anonymous mappings and a minimal
//! userfaultfd fault handler (MISSING mode, UFFDIO_ZEROPAGE; or MINOR mode, UFFDIO_CONTINUE, on a
//! memfd whose pages exist), the floor any userfaultfd-based runtime pays per CPU fault.
//!
//! The only module of the crate with `unsafe`; everything it exports is a safe API.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Instant;

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as uioctl;

/// The page size everything here assumes (x86-64 and the common arm64 configuration).
pub const PAGE: usize = 4096;

/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd: `_IO(0xAA, 0)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// `UFFD_USER_MODE_ONLY`: only user-mode faults are reported (allowed without privilege).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// Size of one `struct uffd_msg`.
const MSG_LEN: usize = std::mem::size_of::<uapi::uffd_msg>();

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// A private anonymous mapping (plain `mmap` memory), unmapped on drop. Pages are not touched
/// by `new`: the first access to each one is a real first-touch fault.
#[derive(Debug)]
pub struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&`/`&mut`.
unsafe impl Send for AnonMap {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AnonMap {}

/// What a baseline's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory: a read fault maps the shared zero page.
    Anonymous,
    /// A shared mapping of a memfd, as hetmem's CPU views are: a fault allocates and clears a
    /// page in the page cache (shmem).
    Memfd,
    /// A memfd whose every page was allocated beforehand (`fallocate`), registered MINOR: a
    /// fault maps the page already in the page cache (UFFDIO_CONTINUE), with no allocation and
    /// no clearing. The least a handler on shmem can do per fault: the floor of any runtime
    /// whose views are shmem, as hetmem's are.
    MemfdPopulated,
}

impl Backing {
    /// Whether faults are MINOR ones served by UFFDIO_CONTINUE (else MISSING, UFFDIO_ZEROPAGE).
    fn minor(self) -> bool {
        self == Backing::MemfdPopulated
    }
}

impl AnonMap {
    /// Maps `len` bytes (rounded up to pages), readable and writable, not populated.
    pub fn new(len: usize) -> io::Result<Self> {
        Self::with_backing(len, Backing::Anonymous)
    }

    /// Like `new`, with the given backing.
    pub fn with_backing(len: usize, backing: Backing) -> io::Result<Self> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        let (flags, fd) = match backing {
            Backing::Anonymous => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
            Backing::Memfd | Backing::MemfdPopulated => {
                // SAFETY: memfd_create takes a C string and flags and returns a new fd or -1.
                let fd =
                    unsafe { libc::memfd_create(c"hetmem-baseline".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(errno());
                }
                // SAFETY: a fresh fd that nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: sets the size of our own memfd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
                    return Err(errno());
                }
                if backing == Backing::MemfdPopulated {
                    // SAFETY: allocates (zeroed) pages of our own memfd.
                    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len as libc::off_t) } < 0 {
                        return Err(errno());
                    }
                }
                (libc::MAP_SHARED, Some(fd))
            }
        };
        // SAFETY: a fresh mapping (private anonymous, or of our own memfd, which nothing else
        // maps) at an address of the kernel's choice; it aliases nothing. The memfd may be
        // closed once mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as `self`; untouched
        // pages read as zero (the kernel, or the userfaultfd handler below, fills them).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Opens a userfaultfd, preferring /dev/userfaultfd, falling back to the syscall and to
/// user-mode-only descriptors when privilege is missing.
fn open_uffd() -> io::Result<OwnedFd> {
    let mut last = io::Error::from_raw_os_error(libc::ENOSYS);
    for umo in [0, UFFD_USER_MODE_ONLY] {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | umo;
        if let Ok(dev) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes an int of flags and returns a new fd or -1.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd >= 0 {
                // SAFETY: a fresh fd that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: the userfaultfd syscall takes one int and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: a fresh fd that nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        last = errno();
    }
    Err(last)
}

fn uffd_api(fd: RawFd, features: u64) -> io::Result<()> {
    let mut arg = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api on our stack.
    let r = unsafe {
        libc::ioctl(
            fd,
            uioctl::UFFDIO_API as _,
            &mut arg as *mut uapi::uffdio_api,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn uffd_register_missing(fd: RawFd, addr: usize, len: usize) -> io::Result<()> {
    uffd_register(fd, addr, len, uapi::UFFDIO_REGISTER_MODE_MISSING as u64)
}

fn uffd_register(fd: RawFd, addr: usize, len: usize, mode: u64) -> io::Result<()> {
    let mut arg = uapi::uffdio_register {
        range: uapi::uffdio_range {
            start: addr as u64,
            len: len as u64,
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on our stack; the range is
    // a mapping we own.
    let r = unsafe {
        libc::ioctl(
            fd,
            uioctl::UFFDIO_REGISTER as _,
            &mut arg as *mut uapi::uffdio_register,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Serves one fault, waking the faulting thread: maps the zero page at `page` (MISSING), or
/// the page already in the page cache (MINOR, `minor`).
fn serve_page(fd: RawFd, page: usize, minor: bool) {
    let range = uapi::uffdio_range {
        start: page as u64,
        len: PAGE as u64,
    };
    let r = if minor {
        let mut arg = uapi::uffdio_continue {
            range,
            mode: 0,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes one uffdio_continue on our stack; the page
        // is in the registered range, and in the memfd's page cache.
        unsafe {
            libc::ioctl(
                fd,
                uioctl::UFFDIO_CONTINUE as _,
                &mut arg as *mut uapi::uffdio_continue,
            )
        }
    } else {
        let mut arg = uapi::uffdio_zeropage {
            range,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage on our stack; the page
        // is in the registered range.
        unsafe {
            libc::ioctl(
                fd,
                uioctl::UFFDIO_ZEROPAGE as _,
                &mut arg as *mut uapi::uffdio_zeropage,
            )
        }
    };
    if r < 0 && errno().raw_os_error() == Some(libc::EEXIST) {
        // Already mapped (a duplicate message): just wake whoever waits on it.
        let mut range = range;
        // SAFETY: UFFDIO_WAKE reads one uffdio_range on our stack.
        unsafe {
            libc::ioctl(
                fd,
                uioctl::UFFDIO_WAKE as _,
                &mut range as *mut uapi::uffdio_range,
            )
        };
    }
}

/// Reads the pending messages (at most `buf`'s worth) and serves each page fault
/// (`serve_page`). Returns the faults served.
fn read_and_serve(uffd: RawFd, buf: &mut [u8; MSG_LEN * 16], minor: bool) -> u64 {
    // SAFETY: reads at most `buf.len()` bytes into the caller's buffer.
    let n = unsafe { libc::read(uffd, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return 0;
    }
    let mut served = 0;
    for msg in buf[..n as usize].chunks_exact(MSG_LEN) {
        // struct uffd_msg: u8 event at 0; for page faults, u64 flags at 8, u64 address at 16.
        if u32::from(msg[0]) != uapi::UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes")) as usize;
        serve_page(uffd, addr & !(PAGE - 1), minor);
        served += 1;
    }
    served
}

/// The eventfd that tells handler threads to stop (it stays readable once written).
fn stop_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes a count and flags and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The handler thread: poll the userfaultfd and the stop eventfd, read messages, serve page
/// faults (`serve_page`). Returns the number of faults served.
fn handler(uffd: RawFd, stop: RawFd, minor: bool) -> u64 {
    let mut served = 0u64;
    let mut buf = [0u8; MSG_LEN * 16];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfds on our stack.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if errno().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return served;
        }
        if fds[1].revents != 0 {
            return served;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        served += read_and_serve(uffd, &mut buf, minor);
    }
}

/// Touches (reads one byte of) each of `pages` fresh pages of a mapping (`backing`)
/// registered MISSING with a userfaultfd whose handler thread answers UFFDIO_ZEROPAGE, and
/// returns each touch's latency in nanoseconds: one complete userfaultfd round trip.
pub fn uffd_fault_latencies_ns(pages: usize, backing: Backing) -> io::Result<Vec<u64>> {
    let minor = backing.minor();
    let uffd = open_uffd()?;
    let features = if minor {
        u64::from(uapi::UFFD_FEATURE_MINOR_SHMEM)
    } else {
        0
    };
    uffd_api(uffd.as_raw_fd(), features)?;
    let map = AnonMap::with_backing(pages * PAGE, backing)?;
    let mode = if minor {
        uapi::UFFDIO_REGISTER_MODE_MINOR
    } else {
        uapi::UFFDIO_REGISTER_MODE_MISSING
    };
    uffd_register(uffd.as_raw_fd(), map.addr(), map.len(), u64::from(mode))?;
    let stop = stop_eventfd()?;
    let (ufd, sfd) = (uffd.as_raw_fd(), stop.as_raw_fd());
    let mut lat = Vec::with_capacity(pages);
    let served = std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("uffd-baseline".into())
            .spawn_scoped(s, move || handler(ufd, sfd, minor))?;
        let mem = map.as_slice();
        for i in 0..pages {
            let t = Instant::now();
            std::hint::black_box(mem[i * PAGE]);
            lat.push(t.elapsed().as_nanos() as u64);
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from our stack to our eventfd.
        unsafe { libc::write(sfd, (&one as *const u64).cast(), 8) };
        h.join()
            .map_err(|_| io::Error::other("uffd handler panicked"))
    })?;
    if served < pages as u64 {
        return Err(io::Error::other(format!(
            "uffd handler served {served} of {pages} faults"
        )));
    }
    drop(map);
    Ok(lat)
}

/// A handler thread for the throughput baseline: its own epoll set with the userfaultfd added
/// EPOLLEXCLUSIVE (a fault wakes one handler, not all) and the stop eventfd; reads messages and
/// answers UFFDIO_ZEROPAGE. This is what a careful raw handler with several threads does.
fn exclusive_handler(uffd: RawFd, stop: RawFd) -> io::Result<u64> {
    // SAFETY: epoll_create1 returns a new fd or -1.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd that nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (fd, flags, tag) in [
        (uffd, libc::EPOLLIN | libc::EPOLLEXCLUSIVE, 0u64),
        (stop, libc::EPOLLIN, 1u64),
    ] {
        let mut ev = libc::epoll_event {
            events: flags as u32,
            u64: tag,
        };
        // SAFETY: registers a live fd with our epoll set, reading one epoll_event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(errno());
        }
    }
    let mut served = 0u64;
    let mut buf = [0u8; MSG_LEN * 16];
    loop {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: epoll_wait writes at most 2 events into our stack array.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if errno().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(errno());
        }
        if evs[..n as usize].iter().any(|e| e.u64 == 1) {
            return Ok(served);
        }
        served += read_and_serve(uffd, &mut buf, false);
    }
}

/// Fault throughput of a raw userfaultfd with `threads` handler threads: `threads` application
/// threads each read one byte of each of `pages` fresh pages of their own part of one private
/// anonymous mapping, registered MISSING. Returns faults per second over the whole run (from
/// the moment every thread is ready to the last touch).
pub fn uffd_fault_throughput(threads: usize, pages: usize) -> io::Result<f64> {
    let threads = threads.max(1);
    let uffd = open_uffd()?;
    uffd_api(uffd.as_raw_fd(), 0)?;
    let map = AnonMap::new(threads * pages * PAGE)?;
    uffd_register_missing(uffd.as_raw_fd(), map.addr(), map.len())?;
    let stop = stop_eventfd()?;
    let (ufd, sfd) = (uffd.as_raw_fd(), stop.as_raw_fd());
    let start = std::sync::Barrier::new(threads + 1);
    let (secs, served) = std::thread::scope(|s| -> io::Result<(f64, u64)> {
        let handlers: Vec<_> = (0..threads)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("uffd-baseline-{i}"))
                    .spawn_scoped(s, move || exclusive_handler(ufd, sfd))
            })
            .collect::<io::Result<_>>()?;
        let mem = map.as_slice();
        let start = &start;
        let apps: Vec<_> = (0..threads)
            .map(|t| {
                let part = &mem[t * pages * PAGE..(t + 1) * pages * PAGE];
                std::thread::Builder::new()
                    .name(format!("uffd-app-{t}"))
                    .spawn_scoped(s, move || {
                        start.wait();
                        for i in 0..pages {
                            std::hint::black_box(part[i * PAGE]);
                        }
                    })
            })
            .collect::<io::Result<_>>()?;
        start.wait();
        let t0 = Instant::now();
        for a in apps {
            a.join()
                .map_err(|_| io::Error::other("application thread panicked"))?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let one = 1u64;
        // SAFETY: writes 8 bytes from our stack to our eventfd (it stays readable: every
        // handler sees it).
        unsafe { libc::write(sfd, (&one as *const u64).cast(), 8) };
        let mut served = 0;
        for h in handlers {
            served += h
                .join()
                .map_err(|_| io::Error::other("uffd handler panicked"))??;
        }
        Ok((secs, served))
    })?;
    let faults = (threads * pages) as u64;
    if served < faults {
        return Err(io::Error::other(format!(
            "uffd handlers served {served} of {faults} faults"
        )));
    }
    drop(map);
    Ok(faults as f64 / secs)
}
