//! fork(2) hooks: `pthread_atfork` handlers, and the pipe on which a fork child tells its parent
//! that it has finished copying (`mm::fork`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::io::Errno;
use rustix::pipe::PipeFlags;

/// Installs fork handlers (pthread_atfork): `prepare` runs in the forking thread before the
/// fork, `parent` and `child` after it, in the parent and in the child.
pub fn install(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the handlers are plain `extern "C"` functions, which live forever; pthread_atfork
    // only records them.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A pipe from a fork child to its parent (pipe2, O_CLOEXEC): the child writes one byte when it
/// is done, the parent waits for that byte or for the child's death (end of file). Its
/// descriptors live in atomics, so the fork handlers reach them without taking a lock.
#[derive(Debug)]
pub struct Handshake {
    read: AtomicI32,
    write: AtomicI32,
}

impl Handshake {
    /// No pipe yet.
    pub const fn new() -> Self {
        Self {
            read: AtomicI32::new(-1),
            write: AtomicI32::new(-1),
        }
    }

    /// Makes the pipe (before the fork, in the prepare handler). Without one (pipe2 failed),
    /// the parent does not wait.
    pub fn open(&self) {
        if let Ok((r, w)) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC) {
            self.read.store(r.into_raw_fd(), Ordering::Relaxed);
            self.write.store(w.into_raw_fd(), Ordering::Relaxed);
        }
    }

    /// Takes this process's copies of the two ends out of the atomics.
    fn take(&self) -> (Option<OwnedFd>, Option<OwnedFd>) {
        let own = |fd: RawFd| {
            // SAFETY: a descriptor `open` stored from a fresh pipe, swapped out just now: this is
            // its only owner (in this process; the fork gave the other its own copy).
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        (
            own(self.read.swap(-1, Ordering::Relaxed)),
            own(self.write.swap(-1, Ordering::Relaxed)),
        )
    }

    /// In the parent: waits until the child has written its byte or died, then closes the
    /// pipe. The write end closes first, so that a dead child reads as end of file.
    pub fn wait_for_child(&self) {
        let (r, w) = self.take();
        drop(w);
        if let Some(r) = r {
            let mut byte = [0u8; 1];
            while let Err(Errno::INTR) = rustix::io::read(&r, &mut byte) {}
        }
    }

    /// In the child: tells the parent it is done, and closes the pipe.
    pub fn tell_parent(&self) {
        let (r, w) = self.take();
        if let Some(w) = w {
            let _ = rustix::io::write(&w, &[1]);
        }
        drop(r);
    }
}
