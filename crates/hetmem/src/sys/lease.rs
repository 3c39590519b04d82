//! File leases (F_SETLEASE): the kernel tells us, by signal, before another process opens a
//! file we cache (or truncates it), and holds that process until we release the lease.
//!
//! The signal (a real-time one, set with F_SETSIG so it carries the descriptor) is caught by a
//! handler that only writes the descriptor number to a pipe; a thread reads the pipe and does
//! the work. The handler is installed only if the signal is unused (default disposition), so
//! hetmem never takes a signal from the application.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::pipe::PipeFlags;

/// `F_SETSIG` (Linux); the libc crate defines it only on some targets.
const F_SETSIG: libc::c_int = 10;

static WRITE_END: AtomicI32 = AtomicI32::new(-1);
static READ_END: AtomicI32 = AtomicI32::new(-1);
/// The process the pipe belongs to: a fork child inherits the handler and the pipe, but must
/// not share the pipe with its parent, so it makes its own.
static OWNER: AtomicU32 = AtomicU32::new(0);
static INSTALL: Mutex<()> = Mutex::new(());

/// The signal lease breaks arrive with.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

extern "C" fn on_break(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for a signal set with F_SETSIG the kernel fills the SIGPOLL member of siginfo_t,
    // whose `si_fd` follows the 8-byte `si_band` at offset 16 (64-bit Linux). Reading an i32
    // there is within the 128-byte siginfo_t.
    let fd = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let w = WRITE_END.load(Ordering::Relaxed);
    if w >= 0 {
        // SAFETY: this process's pipe, published before the handler was installed. Its only
        // close is `install`'s of a parent's pipe in a fork child, which no break reaches
        // before that child takes leases of its own (breaks go to the lease owner's process).
        let w = unsafe { BorrowedFd::borrow_raw(w) };
        // write(2), a raw system call here: async-signal-safe, and it leaves errno alone.
        let _ = rustix::io::write(w, &fd.to_ne_bytes());
    }
}

/// Installs the handler and this process's pipe (again after a fork). Returns the pipe's read
/// end, and whether it is new (its reader thread must be started), or an error if the signal
/// is in use by the application.
pub fn install() -> io::Result<(RawFd, bool)> {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if OWNER.load(Ordering::Acquire) == pid {
        return Ok((READ_END.load(Ordering::Acquire), false));
    }
    let sig = signal();
    // SAFETY: sigaction is plain integers and pointers; all-zero is a valid value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current disposition into `old` on our stack.
    let r = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    let ours = on_break as *const () as usize;
    if r != 0 || (old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != ours) {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    let r = r.into_raw_fd();
    let (old_r, old_w) = (
        READ_END.swap(r, Ordering::AcqRel),
        WRITE_END.swap(w.into_raw_fd(), Ordering::AcqRel),
    );
    for fd in [old_r, old_w] {
        if fd >= 0 {
            // SAFETY: the parent's pipe, inherited by fork, swapped out just now; nothing in
            // this process uses it (its reader thread is the parent's), so we own it: closed.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    if old.sa_sigaction == libc::SIG_DFL {
        // SAFETY: a zeroed sigaction on our stack, filled with a handler that only calls
        // write(2) on a descriptor published before the handler is installed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ours;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    OWNER.store(pid, Ordering::Release);
    Ok((r, true))
}

/// Holds off `install` (for fork: see `file::fork_prepare`).
pub fn hold_install() -> std::sync::MutexGuard<'static, ()> {
    INSTALL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a lease on `fd`: a write lease (no other process may have the file open) or a read
/// lease (no writer may). `Ok(false)` when the file is in use in a way that forbids it.
pub fn take(fd: BorrowedFd<'_>, write: bool) -> io::Result<bool> {
    let kind = if write { libc::F_WRLCK } else { libc::F_RDLCK };
    // SAFETY: fcntl on our own descriptor with integer arguments.
    unsafe {
        if libc::fcntl(fd.as_raw_fd(), F_SETSIG, signal()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, kind as libc::c_int) != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EBUSY) => Ok(false),
                _ => Err(e),
            };
        }
        // F_SETLEASE made the calling *thread* the owner that breaks are signalled to; once
        // that thread exits (a device worker, say), the kernel finds nobody to signal and the
        // opener waits out lease-break-time. The process owns it instead.
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, libc::getpid()) != 0 {
            let e = io::Error::last_os_error();
            release(fd);
            return Err(e);
        }
    }
    Ok(true)
}

/// Lets the lease signal reach the calling thread (the one that serves breaks), even where
/// the application blocks it in the threads it made: a signal blocked everywhere would stay
/// pending and leave every opener waiting out lease-break-time.
pub fn unblock_here() {
    // SAFETY: a sigset on our stack, initialised by sigemptyset before use; pthread_sigmask
    // changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Whether a lease of the kind `take(fd, write)` took is held on `fd` and not breaking: while
/// a break is pending, F_GETLEASE shows the kind the lease is breaking to; the kernel takes a
/// read lease back, and turns a write lease into a read one, when a break is not answered
/// within lease-break-time.
pub fn held(fd: BorrowedFd<'_>, write: bool) -> bool {
    // SAFETY: fcntl on our own descriptor with integer arguments.
    let kind = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) };
    kind == libc::F_WRLCK || (!write && kind == libc::F_RDLCK)
}

/// Gives the lease up: the process waiting on it proceeds.
pub fn release(fd: BorrowedFd<'_>) {
    // SAFETY: fcntl on our own descriptor with integer arguments.
    unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETLEASE,
            libc::F_UNLCK as libc::c_int,
        )
    };
}

/// What the lease pipe carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A lease broke on this descriptor.
    Break(RawFd),
    /// `post_retired(fd)`: every break signalled for `fd` before it has been read.
    Retired(RawFd),
}

/// Queues `Event::Retired(fd)` behind every break already signalled for `fd` (the pipe is
/// FIFO). Whether it was queued: not without this process's pipe.
pub fn post_retired(fd: RawFd) -> bool {
    let w = WRITE_END.load(Ordering::Acquire);
    if w < 0 || OWNER.load(Ordering::Acquire) != std::process::id() {
        return false;
    }
    // Retired descriptors travel as -(fd + 1), breaks as fd (never negative).
    let v: i32 = -(fd + 1);
    // SAFETY: this process's own pipe (checked just now), which it never closes.
    let w = unsafe { BorrowedFd::borrow_raw(w) };
    // As the signal handler does; writes of 4 bytes to a pipe are atomic.
    rustix::io::write(w, &v.to_ne_bytes()) == Ok(4)
}

/// Blocks until the next event on the lease pipe, whose read end `install` returned.
pub fn next_event(read_end: RawFd) -> io::Result<Event> {
    // SAFETY: the read end of this process's pipe (the caller's contract: `install` returned
    // it), which is closed only in a fork child, where the thread that reads it does not exist.
    let r = unsafe { BorrowedFd::borrow_raw(read_end) };
    let mut buf = [0u8; 4];
    loop {
        match rustix::io::read(r, &mut buf) {
            Ok(4) => {
                let v = i32::from_ne_bytes(buf);
                return Ok(if v >= 0 {
                    Event::Break(v)
                } else {
                    Event::Retired(-v - 1)
                });
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            // End of file (or a short read, which 4-byte pipe writes never make).
            Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}
