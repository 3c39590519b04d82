//! File leases (F_SETLEASE): the kernel tells us, by signal, before another process opens a
//! file we cache (or truncates it), and holds that process until we release the lease.
//!
//! The signal is a real-time one (set with F_SETSIG, so it carries the descriptor), directed
//! at hetmem's own lease thread (F_SETOWN_EX, F_OWNER_TID), which blocks it and reads it from
//! a signalfd: it never lands on an application thread, never interrupts an application
//! system call, and never runs a handler. When the kernel cannot queue it (the real-time
//! queue is full: RLIMIT_SIGPENDING is per user), it sends a plain SIGIO to the same owner
//! instead, without the descriptor; the lease thread blocks and reads that too, and re-checks
//! every leased file (`Event::Recheck`).
//!
//! Handlers remain, as a safety net for one window: F_SETLEASE makes the *process* the owner
//! (fs/locks.c `lease_setup`), until the F_SETOWN_EX that follows it. A break in between is
//! process-directed and may land on any thread; the handler then only writes the descriptor
//! (or, for SIGIO, a re-check) to a pipe that the lease thread also reads. They are installed
//! only where the signal is at its default disposition, so hetmem never takes a signal from
//! the application.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;

use rustix::io::Errno;
use rustix::pipe::PipeFlags;

/// `F_SETSIG` (Linux); the libc crate defines it only on some targets.
const F_SETSIG: libc::c_int = 10;
/// `F_SETOWN_EX` and `F_OWNER_TID` (Linux, every architecture).
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex` (include/uapi/asm-generic/fcntl.h).
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

static WRITE_END: AtomicI32 = AtomicI32::new(-1);
static READ_END: AtomicI32 = AtomicI32::new(-1);
/// The process the pipe belongs to: a fork child inherits the handler and the pipe, but must
/// not share the pipe with its parent, so it makes its own.
static OWNER: AtomicU32 = AtomicU32::new(0);
static INSTALL: Mutex<()> = Mutex::new(());
/// The signal lease breaks arrive with (0: none chosen yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether the lease thread reads SIGIO (not where the application has a SIGIO handler).
static SERVE_SIGIO: AtomicBool = AtomicBool::new(false);
/// The lease thread of `OWNER` (its tid), to which breaks are directed; 0 before it runs.
static LEASE_TID: AtomicI32 = AtomicI32::new(0);

/// Pipe value of `Event::Recheck` (breaks travel as fd >= 0, retired descriptors as
/// -(fd + 1) > i32::MIN).
const RECHECK: i32 = i32::MIN;

/// The signal lease breaks arrive with in this process, once `install` chose it.
pub fn signal() -> Option<libc::c_int> {
    let s = SIGNAL.load(Ordering::Acquire);
    (s != 0 && OWNER.load(Ordering::Acquire) == std::process::id()).then_some(s)
}

/// Whether a SIGIO sent when the real-time queue overflows is read by the lease thread (true
/// unless the application has a SIGIO handler of its own: the lease thread then leaves SIGIO
/// alone, lest it take the application's).
pub fn overflow_served() -> bool {
    SERVE_SIGIO.load(Ordering::Acquire) && OWNER.load(Ordering::Acquire) == std::process::id()
}

fn write_event(v: i32) -> bool {
    let w = WRITE_END.load(Ordering::Relaxed);
    if w < 0 {
        return false;
    }
    // SAFETY: this process's pipe, published before the handlers were installed. Its only
    // close is `install`'s of a parent's pipe in a fork child, which no break reaches before
    // that child takes leases of its own (breaks go to the lease owner's process).
    let w = unsafe { BorrowedFd::borrow_raw(w) };
    // write(2), a raw system call here: async-signal-safe, and it leaves errno alone. Writes
    // of 4 bytes to a pipe are atomic.
    rustix::io::write(w, &v.to_ne_bytes()) == Ok(4)
}

extern "C" fn on_break(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for a signal set with F_SETSIG the kernel fills the SIGPOLL member of siginfo_t,
    // whose `si_fd` follows the 8-byte `si_band` at offset 16 (64-bit Linux). Reading an i32
    // there is within the 128-byte siginfo_t.
    let fd = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    write_event(fd);
}

extern "C" fn on_sigio(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    write_event(RECHECK);
}

/// The disposition of `sig`: its handler address (SIG_DFL, SIG_IGN or a function).
fn disposition(sig: libc::c_int) -> Option<usize> {
    // SAFETY: sigaction is plain integers and pointers; all-zero is a valid value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: only reads the current disposition into `old` on our stack.
    let r = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    (r == 0).then_some(old.sa_sigaction)
}

/// Installs `handler` for `sig` (SA_SIGINFO, SA_RESTART).
fn set_handler(sig: libc::c_int, handler: usize) {
    // SAFETY: a zeroed sigaction on our stack, filled with a handler that only calls write(2)
    // on a descriptor published before it is installed.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Chooses the lease signal: the one chosen before (a fork child inherits it and its handler),
/// else the first real-time signal at its default disposition, from SIGRTMIN+7 on. A signal
/// the application handles or ignores is its own: hetmem's signalfd would otherwise take the
/// instances the application sends to its process.
fn choose_signal() -> Option<libc::c_int> {
    let ours = on_break as *const () as usize;
    let before = SIGNAL.load(Ordering::Acquire);
    if before != 0 && disposition(before) == Some(ours) {
        return Some(before);
    }
    let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    (lo + 7..=hi)
        .chain(lo..lo + 7)
        .find(|&s| disposition(s) == Some(libc::SIG_DFL))
}

/// Installs the handlers and this process's pipe (again after a fork), choosing the lease
/// signal, and has `start` start the lease thread on the pipe's read end (`Listener::new`
/// there), all under one lock: a second caller, or a fork, waits until the thread runs, so no
/// lease is taken before there is an owner to direct its breaks to. EBUSY if the application
/// uses every real-time signal; EAGAIN if the lease thread did not start.
pub fn install(start: impl FnOnce(RawFd) -> bool) -> io::Result<()> {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if OWNER.load(Ordering::Acquire) == pid {
        return if LEASE_TID.load(Ordering::Acquire) != 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EAGAIN))
        };
    }
    let Some(sig) = choose_signal() else {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    };
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
    let ours = on_break as *const () as usize;
    if disposition(sig) != Some(ours) {
        set_handler(sig, ours);
    }
    // SIGIO: at its default disposition a stray one (a queue overflow in the window above)
    // would end the process with its unflushed data, so it gets the safety-net handler; one
    // the application ignores is read all the same (it wants none); one it handles is its
    // own, and the lease thread leaves it alone.
    let sigio = on_sigio as *const () as usize;
    let serve_sigio = match disposition(libc::SIGIO) {
        Some(libc::SIG_DFL) => {
            set_handler(libc::SIGIO, sigio);
            true
        }
        Some(h) => h == sigio || h == libc::SIG_IGN,
        None => false,
    };
    SIGNAL.store(sig, Ordering::Release);
    SERVE_SIGIO.store(serve_sigio, Ordering::Release);
    LEASE_TID.store(0, Ordering::Release);
    OWNER.store(pid, Ordering::Release);
    if start(r) && LEASE_TID.load(Ordering::Acquire) != 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }
}

/// Holds off `install` (for fork: see `file::fork_prepare`).
pub fn hold_install() -> std::sync::MutexGuard<'static, ()> {
    INSTALL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a lease on `fd`: a write lease (no other process may have the file open) or a read
/// lease (no writer may). `Ok(false)` when the file is in use in a way that forbids it.
/// EINVAL before this process's lease thread runs (`install`, `Listener::new`).
pub fn take(fd: BorrowedFd<'_>, write: bool) -> io::Result<bool> {
    let kind = if write { libc::F_WRLCK } else { libc::F_RDLCK };
    let (Some(sig), tid) = (signal(), LEASE_TID.load(Ordering::Acquire)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    if tid == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: fcntl on our own descriptor with integer arguments, and F_SETOWN_EX with a
    // pointer to an f_owner_ex on our stack.
    unsafe {
        if libc::fcntl(fd.as_raw_fd(), F_SETSIG, sig) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, kind as libc::c_int) != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EBUSY) => Ok(false),
                _ => Err(e),
            };
        }
        // F_SETLEASE made the process (or, before Linux 4.18 or so, the calling thread) the
        // owner that breaks are signalled to: a break would land on any thread that does not
        // block the signal, and one owned by a thread that has exited (a device worker) finds
        // nobody. Our lease thread owns it instead; it blocks the signal and reads it.
        let owner = FOwnerEx {
            kind: F_OWNER_TID,
            pid: tid,
        };
        if libc::fcntl(fd.as_raw_fd(), F_SETOWN_EX, &owner as *const FOwnerEx) != 0 {
            let e = io::Error::last_os_error();
            release(fd);
            return Err(e);
        }
    }
    Ok(true)
}

/// Whether a lease of the kind `take(fd, write)` took is held on `fd` and not breaking: while
/// a break is pending, F_GETLEASE shows the kind the lease is breaking to; the kernel takes a
/// read lease back, and turns a write lease into a read one, when a break is not answered
/// within lease-break-time.
/// How long the kernel lets a lease break run before it takes the lease back and lets the
/// opener in (`/proc/sys/fs/lease-break-time`, in seconds; 45 unless set), read at each
/// break, so a change applies to the next one.
pub fn break_time() -> std::time::Duration {
    let secs = std::fs::read_to_string("/proc/sys/fs/lease-break-time")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(45);
    std::time::Duration::from_secs(secs)
}

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

/// What the lease thread is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A lease broke on this descriptor.
    Break(RawFd),
    /// `post_retired(fd)`: every break signalled for `fd` before it has been read.
    Retired(RawFd),
    /// A SIGIO: the kernel could not queue a lease signal (the real-time queue is full), and
    /// says neither which descriptor nor whether it was a lease break. Any lease may be
    /// breaking.
    Recheck,
}

/// Queues `Event::Retired(fd)` behind every break already signalled for `fd`. Whether it was
/// queued: not without this process's pipe.
pub fn post_retired(fd: RawFd) -> bool {
    if OWNER.load(Ordering::Acquire) != std::process::id() {
        return false;
    }
    // Retired descriptors travel as -(fd + 1), breaks as fd (never negative). A break already
    // signalled is pending on the signalfd, which `Listener::next` reads before the pipe.
    write_event(-(fd + 1))
}

/// The lease thread's end: the lease signal and SIGIO, blocked in that thread and read from a
/// signalfd, and the pipe of `install`. Made on the lease thread itself, which it publishes as
/// the owner of every lease taken from then on.
#[derive(Debug)]
pub struct Listener {
    signals: OwnedFd,
    pipe: RawFd,
    signal: libc::c_int,
    /// Events read but not handed out yet.
    queued: std::collections::VecDeque<Event>,
}

impl Listener {
    /// Blocks the lease signal and SIGIO in the calling thread, for good, and opens the
    /// signalfd that reads them; `read_end` is what `install` returned.
    pub fn new(read_end: RawFd) -> io::Result<Self> {
        let Some(sig) = signal() else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: sigsets on our stack, initialised by sigemptyset before use; pthread_sigmask
        // changes only this thread's mask; signalfd gets a valid set and makes a descriptor
        // we own.
        let fd = unsafe {
            let mut blocked: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut blocked);
            libc::sigaddset(&mut blocked, sig);
            // Blocked even when not read (the application handles SIGIO): a SIGIO directed at
            // this thread must not run the application's handler here. It stays pending.
            libc::sigaddset(&mut blocked, libc::SIGIO);
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            let mut read: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut read);
            libc::sigaddset(&mut read, sig);
            if SERVE_SIGIO.load(Ordering::Acquire) {
                libc::sigaddset(&mut read, libc::SIGIO);
            }
            let fd = libc::signalfd(-1, &read, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        LEASE_TID.store(
            rustix::thread::gettid().as_raw_nonzero().get(),
            Ordering::Release,
        );
        Ok(Self {
            signals: fd,
            pipe: read_end,
            signal: sig,
            queued: std::collections::VecDeque::new(),
        })
    }

    /// Blocks until the next event. The signals pending on the signalfd are read before the
    /// pipe: a `Retired` marker then comes after every break signalled before it was written.
    pub fn next(&mut self) -> io::Result<Event> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Ok(e);
            }
            // SAFETY: the read end of this process's pipe (`install` returned it), closed only
            // in a fork child, where this thread does not exist.
            let pipe = unsafe { BorrowedFd::borrow_raw(self.pipe) };
            let mut fds = [
                rustix::event::PollFd::new(&self.signals, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&pipe, rustix::event::PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            let pipe_ready = !fds[1].revents().is_empty();
            self.read_signals()?;
            if pipe_ready {
                self.read_pipe(pipe)?;
            }
        }
    }

    fn read_signals(&mut self) -> io::Result<()> {
        const N: usize = 16;
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: signalfd_siginfo is plain integers; all-zero is a valid value.
            let mut infos: [libc::signalfd_siginfo; N] = unsafe { std::mem::zeroed() };
            // SAFETY: the buffer is N whole signalfd_siginfo records, on our stack, and `n`
            // bytes of it are written by the kernel.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(infos.as_mut_ptr().cast::<u8>(), N * size)
            };
            match rustix::io::read(&self.signals, bytes) {
                Ok(n) => {
                    for info in &infos[..n / size] {
                        let signo = info.ssi_signo as libc::c_int;
                        if signo == self.signal {
                            self.queued.push_back(Event::Break(info.ssi_fd));
                        } else if signo == libc::SIGIO {
                            self.queued.push_back(Event::Recheck);
                        }
                    }
                    if n < N * size {
                        return Ok(());
                    }
                }
                Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn read_pipe(&mut self, pipe: BorrowedFd<'_>) -> io::Result<()> {
        let mut buf = [0u8; 256];
        let n = loop {
            match rustix::io::read(pipe, &mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // Whole 4-byte records: every write to the pipe is one, and atomic.
        for chunk in buf[..n - n % 4].chunks_exact(4) {
            let v = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.queued.push_back(match v {
                RECHECK => Event::Recheck,
                v if v >= 0 => Event::Break(v),
                v => Event::Retired(-v - 1),
            });
        }
        Ok(())
    }
}
