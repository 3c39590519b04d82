//! A thin userfaultfd wrapper on rustix and linux-raw-sys.
//!
//! Why our own: the `userfaultfd` crate needs libclang at build time, lacks MOVE, POISON and
//! `COPY_MODE_WP`, and turns EAGAIN into a garbage byte count. Here every ioctl returns a typed
//! outcome, partial progress included, so callers can handle EEXIST (wake explicitly) and EAGAIN
//! (read pending events, then retry) as the kernel asks.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;

/// `_UFFDIO_CONTINUE`'s WP mode (Linux 6.3); linux-raw-sys 0.12 does not name it.
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 2;
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd: `_IO(0xAA, 0)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// `UFFD_USER_MODE_ONLY`: only user-mode faults are reported.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Features hetmem asks for when the kernel offers them.
pub const WANTED_FEATURES: u64 = (uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | uapi::UFFD_FEATURE_EVENT_REMAP
    | uapi::UFFD_FEATURE_EVENT_UNMAP
    | uapi::UFFD_FEATURE_MISSING_SHMEM
    | uapi::UFFD_FEATURE_MINOR_SHMEM
    | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | uapi::UFFD_FEATURE_THREAD_ID) as u64;

/// Features without which hetmem's shmem-backed memory cannot work.
pub const REQUIRED_FEATURES: u64 = (uapi::UFFD_FEATURE_MISSING_SHMEM
    | uapi::UFFD_FEATURE_MINOR_SHMEM
    | uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;

/// Feature bit names, for diagnostics.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64, "WP"),
    (uapi::UFFD_FEATURE_EVENT_FORK as u64, "EVENT_FORK"),
    (uapi::UFFD_FEATURE_EVENT_REMAP as u64, "EVENT_REMAP"),
    (uapi::UFFD_FEATURE_EVENT_REMOVE as u64, "EVENT_REMOVE"),
    (uapi::UFFD_FEATURE_MISSING_SHMEM as u64, "MISSING_SHMEM"),
    (uapi::UFFD_FEATURE_EVENT_UNMAP as u64, "EVENT_UNMAP"),
    (uapi::UFFD_FEATURE_THREAD_ID as u64, "THREAD_ID"),
    (uapi::UFFD_FEATURE_MINOR_SHMEM as u64, "MINOR_SHMEM"),
    (uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64, "WP_SHMEM"),
    (uapi::UFFD_FEATURE_WP_UNPOPULATED as u64, "WP_UNPOPULATED"),
    (uapi::UFFD_FEATURE_POISON as u64, "POISON"),
    (uapi::UFFD_FEATURE_WP_ASYNC as u64, "WP_ASYNC"),
    (uapi::UFFD_FEATURE_MOVE as u64, "MOVE"),
];

/// Names of the feature bits set in `bits`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// What an ioctl that fills pages did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fill {
    /// Every page was filled.
    Done,
    /// The page at byte offset `done` was already present (EEXIST): nobody woke its waiters.
    Exists {
        /// Bytes filled before it.
        done: usize,
    },
    /// An event is unread (mmap changing; EAGAIN): read events, then retry from `done`.
    Again {
        /// Bytes filled before it.
        done: usize,
    },
}

/// A message read from the userfaultfd.
#[derive(Debug)]
pub enum Msg {
    /// A thread faulted at `addr`.
    PageFault {
        /// Faulting address (page-aligned unless EXACT_ADDRESS).
        addr: usize,
        /// A write access.
        write: bool,
        /// A write to a write-protected page.
        wp: bool,
        /// The faulting thread (UFFD_FEATURE_THREAD_ID; 0 without it).
        tid: u32,
    },
    /// `mremap` moved `[from, from + len)` to `to`.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length.
        len: usize,
    },
    /// `munmap` removed `[start, end)`.
    Unmap {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)` zapped `[start, end)`.
    Remove {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// Another event (fork, not requested).
    Other,
}

/// Registration modes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Modes {
    /// Faults on pages that are not present.
    pub missing: bool,
    /// Faults on pages present in the page cache but not mapped (shmem).
    pub minor: bool,
    /// Write-protect faults.
    pub wp: bool,
}

/// An open userfaultfd, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    user_mode_only: bool,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn open_raw(user_mode_only: bool) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC
        | libc::O_NONBLOCK
        | if user_mode_only {
            UFFD_USER_MODE_ONLY
        } else {
            0
        };
    // Prefer /dev/userfaultfd (Linux 6.1): access is by file mode, not by sysctl or capability.
    if let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes an int flags argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if fd >= 0 {
            // SAFETY: the ioctl returned a fresh fd that nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: the userfaultfd syscall takes one int and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the syscall returned a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut arg = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api that lives on our stack.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            linux_raw_sys::ioctl::UFFDIO_API as _,
            &mut arg as *mut uapi::uffdio_api,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(arg.features)
}

impl Uffd {
    /// Features this kernel offers, probed on a throwaway descriptor (UFFDIO_API can be called
    /// only once per descriptor). Also says whether kernel-mode faults can be delivered.
    pub fn probe() -> io::Result<(u64, bool)> {
        let (fd, umo) = match open_raw(false) {
            Ok(fd) => (fd, false),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => (open_raw(true)?, true),
            Err(e) => return Err(e),
        };
        Ok((api(fd.as_fd(), 0)?, umo))
    }

    /// Opens a descriptor with `wanted & offered` features. Kernel-mode faults (read(2) into
    /// managed memory) are delivered unless only user-mode ones are allowed to us.
    pub fn open(wanted: u64) -> io::Result<Self> {
        let (offered, user_mode_only) = Self::probe()?;
        let fd = open_raw(user_mode_only)?;
        let features = api(fd.as_fd(), wanted & offered)?;
        Ok(Self {
            fd,
            features,
            user_mode_only,
        })
    }

    /// Features enabled on this descriptor.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether only user-mode faults are delivered (kernel accesses to unmapped managed memory
    /// then fail with EFAULT).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// Registers `[start, start + len)`; returns the ioctls allowed on it.
    ///
    /// # Safety
    /// The range must stay mapped, or be unregistered, for as long as this descriptor lives in a
    /// way that faulting threads can be served: a registered range whose faults nobody serves
    /// hangs those threads.
    pub unsafe fn register(&self, start: usize, len: usize, modes: Modes) -> io::Result<u64> {
        let mut mode = 0u64;
        if modes.missing {
            mode |= uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
        }
        if modes.minor {
            mode |= uapi::UFFDIO_REGISTER_MODE_MINOR as u64;
        }
        if modes.wp {
            mode |= uapi::UFFDIO_REGISTER_MODE_WP as u64;
        }
        let mut arg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on our stack; the caller
        // upholds the contract about the range.
        let r = unsafe {
            self.ioctl(
                linux_raw_sys::ioctl::UFFDIO_REGISTER as libc::c_ulong,
                &mut arg,
            )
        };
        if r < 0 {
            return Err(errno());
        }
        Ok(arg.ioctls)
    }

    /// Unregisters the range, waking every thread waiting on it.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        self.range_ioctl(linux_raw_sys::ioctl::UFFDIO_UNREGISTER, start, len)
    }

    /// Wakes threads waiting on faults in the range.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        self.range_ioctl(linux_raw_sys::ioctl::UFFDIO_WAKE, start, len)
    }

    /// An ioctl whose argument is a bare `uffdio_range` (UNREGISTER, WAKE).
    fn range_ioctl(&self, request: u32, start: usize, len: usize) -> io::Result<()> {
        let mut arg = uapi::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER and UFFDIO_WAKE take a uffdio_range; it only names
        // addresses, no memory is read or written through it.
        if unsafe { self.ioctl(request as libc::c_ulong, &mut arg) } < 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// # Safety
    /// `request` must be a userfaultfd ioctl whose argument is a `T`.
    unsafe fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> libc::c_int {
        // SAFETY: the caller pairs the request with its argument type; `arg` is a live,
        // exclusive reference for the duration of the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) }
    }

    fn fill_outcome(r: libc::c_int, done: i64) -> io::Result<Fill> {
        if r == 0 {
            return Ok(Fill::Done);
        }
        let e = errno();
        let done = done.max(0) as usize;
        match e.raw_os_error() {
            Some(libc::EEXIST) => Ok(Fill::Exists { done }),
            Some(libc::EAGAIN) => Ok(Fill::Again { done }),
            _ => Err(e),
        }
    }

    /// Maps the page-cache pages of a MINOR-registered shmem range (UFFDIO_CONTINUE), read-only
    /// (write-protected) if `wp`.
    pub fn continue_(&self, start: usize, len: usize, wp: bool, wake: bool) -> io::Result<Fill> {
        let mut mode = 0;
        if wp {
            mode |= UFFDIO_CONTINUE_MODE_WP;
        }
        if !wake {
            mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        let mut arg = uapi::uffdio_continue {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes one uffdio_continue on our stack. It only
        // installs page-table entries for pages that already exist; it writes no memory.
        let r = unsafe {
            self.ioctl(
                linux_raw_sys::ioctl::UFFDIO_CONTINUE as libc::c_ulong,
                &mut arg,
            )
        };
        Self::fill_outcome(r, arg.mapped)
    }

    /// Fills missing pages with zeros and maps them (UFFDIO_ZEROPAGE). On shmem this allocates
    /// the page-cache page too; a page already in the cache gives EEXIST.
    pub fn zeropage(&self, start: usize, len: usize, wake: bool) -> io::Result<Fill> {
        let mut arg = uapi::uffdio_zeropage {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: if wake {
                0
            } else {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage on our stack. It fills
        // only pages that are not present, so no live data is overwritten.
        let r = unsafe {
            self.ioctl(
                linux_raw_sys::ioctl::UFFDIO_ZEROPAGE as libc::c_ulong,
                &mut arg,
            )
        };
        Self::fill_outcome(r, arg.zeropage)
    }

    /// Marks missing pages poisoned (UFFDIO_POISON, Linux 6.6): an access raises SIGBUS, as
    /// one past the end of a truncated file does.
    pub fn poison(&self, start: usize, len: usize) -> io::Result<Fill> {
        let mut arg = uapi::uffdio_poison {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison); linux-raw-sys 0.12 lacks the number.
        const UFFDIO_POISON: libc::c_ulong = (3 << 30)
            | ((std::mem::size_of::<uapi::uffdio_poison>() as libc::c_ulong) << 16)
            | (0xAA << 8)
            | uapi::_UFFDIO_POISON as libc::c_ulong;
        // SAFETY: UFFDIO_POISON reads and writes one uffdio_poison on our stack; it installs
        // markers on missing pages only.
        let r = unsafe { self.ioctl(UFFDIO_POISON as libc::c_ulong, &mut arg) };
        Self::fill_outcome(r, arg.updated)
    }

    /// Sets (`protect`) or clears write protection on the range. Clearing wakes waiters unless
    /// `wake` is false.
    pub fn write_protect(
        &self,
        start: usize,
        len: usize,
        protect: bool,
        wake: bool,
    ) -> io::Result<Fill> {
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        // The kernel refuses DONTWAKE with WP: setting protection wakes nobody anyway.
        if !wake && !protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect on our stack; it changes
        // page-table permissions only.
        let r = unsafe {
            self.ioctl(
                linux_raw_sys::ioctl::UFFDIO_WRITEPROTECT as libc::c_ulong,
                &mut arg,
            )
        };
        if r == 0 {
            return Ok(Fill::Done);
        }
        let e = errno();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Fill::Again { done: 0 }),
            _ => Err(e),
        }
    }

    /// Reads pending messages without blocking; returns how many were appended to `out`.
    pub fn read(&self, out: &mut Vec<Msg>) -> io::Result<usize> {
        const BATCH: usize = 32;
        // SAFETY: uffd_msg is plain integers (and a union of them); all-zero is a valid value.
        let mut raw: [uapi::uffd_msg; BATCH] = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<uapi::uffd_msg>();
        loop {
            // SAFETY: we read into our own stack array of uffd_msg, BATCH * size bytes long.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), BATCH * size) };
            if n < 0 {
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(0),
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            let count = n as usize / size;
            for m in &raw[..count] {
                out.push(decode(m));
            }
            return Ok(count);
            // (A short read means the queue is empty: callers loop only while batches are full.)
        }
    }
}

/// One service thread's wait on the userfaultfd and a wake-up eventfd. Each thread has its own
/// epoll set with the userfaultfd added EPOLLEXCLUSIVE, so a fault wakes one thread, not all.
#[derive(Debug)]
pub struct Waiter {
    epoll: OwnedFd,
}

impl Waiter {
    /// Watches `uffd` (exclusively) and `kick` (every waiter).
    pub fn new(uffd: &Uffd, kick: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh fd that nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for (fd, flags, tag) in [
            (
                uffd.fd.as_raw_fd(),
                libc::EPOLLIN | libc::EPOLLEXCLUSIVE,
                0u64,
            ),
            (kick.as_raw_fd(), libc::EPOLLIN, 1u64),
        ] {
            let mut ev = libc::epoll_event {
                events: flags as u32,
                u64: tag,
            };
            // SAFETY: registers a live fd with our epoll set, reading one epoll_event.
            if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(errno());
            }
        }
        Ok(Self { epoll })
    }

    /// Waits until the userfaultfd or the eventfd is readable, or `timeout` passed; returns
    /// which fired. It returns at once while the userfaultfd has messages (level-triggered).
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> io::Result<Ready> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // Rounded up, so a wait never ends before the deadline it was given.
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int
        });
        loop {
            // SAFETY: epoll_wait writes at most 2 events into our stack array.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = errno();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            let fired = &evs[..n as usize];
            return Ok(Ready {
                messages: fired.iter().any(|e| e.u64 == 0),
                kicked: fired.iter().any(|e| e.u64 == 1),
            });
        }
    }
}

/// What ended a `Waiter::wait`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// The userfaultfd has messages.
    pub messages: bool,
    /// The wake-up eventfd fired.
    pub kicked: bool,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The calling thread's id (gettid), as a fault's `Msg::PageFault::tid` names it.
pub fn current_tid() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}

fn decode(m: &uapi::uffd_msg) -> Msg {
    // SAFETY: the kernel sets `event` and fills the union member that matches it; every member
    // is plain integers, so reading it is defined whatever it holds.
    unsafe {
        match m.event as u32 {
            uapi::UFFD_EVENT_PAGEFAULT => {
                let pf = m.arg.pagefault;
                let flags = pf.flags as u32;
                Msg::PageFault {
                    addr: pf.address as usize,
                    write: flags & uapi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: flags & uapi::UFFD_PAGEFAULT_FLAG_WP != 0,
                    tid: pf.feat.ptid,
                }
            }
            uapi::UFFD_EVENT_REMAP => {
                let r = m.arg.remap;
                Msg::Remap {
                    from: r.from as usize,
                    to: r.to as usize,
                    len: r.len as usize,
                }
            }
            uapi::UFFD_EVENT_UNMAP => {
                let r = m.arg.remove;
                Msg::Unmap {
                    start: r.start as usize,
                    end: r.end as usize,
                }
            }
            uapi::UFFD_EVENT_REMOVE => {
                let r = m.arg.remove;
                Msg::Remove {
                    start: r.start as usize,
                    end: r.end as usize,
                }
            }
            _ => Msg::Other,
        }
    }
}
