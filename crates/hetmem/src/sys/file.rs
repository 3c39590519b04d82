//! Files for `Hetmem::map_file`: opening a path without side effects until it is known to be
//! a regular file, and file I/O that never waits for the inode lock (`docs/file-contract.md`
//! §2.2, "Locks").
//!
//! Why the I/O is special: a thread in `write(2)` or `read(2)` on the mapped file holds the
//! file's inode lock (`i_rwsem`; xfs's iolock) while it copies from or to hetmem's CPU view, and
//! the copy faults to hetmem's service threads. If those threads (or a thread holding a block's
//! engine lock they wait for) then wait for the same inode lock in `pread` or `pwrite`, nobody
//! moves again. So hetmem first tries the I/O with `RWF_NOWAIT`, which returns EAGAIN instead
//! of waiting for a contended lock (or a page-cache miss), and otherwise goes through a shared
//! mapping of the file ([`Window`]): a page fault on a file mapping takes only the mapping's
//! `invalidate_lock` (shared) and folio locks, which no system call holds while it copies user
//! memory. The window is never touched by the CPU: `process_vm_readv`/`process_vm_writev` on our
//! own process copy through it, so a page past the end of the file (or a page that cannot be
//! read) is EFAULT, not SIGBUS. The policy (which to try when, O_DIRECT's write-out, tmpfs) is
//! `crate::mm::file_io`'s.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::{Errno, ReadWriteFlags};
use rustix::mm::{self, MapFlags, ProtFlags};

use hetmem_proto::PAGE_SIZE;

/// Why `Pinned` refused a path.
#[derive(Debug)]
pub enum OpenError {
    /// Not a regular file (or not the one that was checked): why, in words.
    NotRegular(&'static str),
    /// A regular file on a pseudo file system (procfs, sysfs, ...): its size means nothing and
    /// its reads and writes are not a file's. The refusal, in words.
    Pseudo(&'static str),
    /// The system call's own error.
    Os(io::Error),
}

impl From<Errno> for OpenError {
    fn from(e: Errno) -> Self {
        OpenError::Os(e.into())
    }
}

/// Pseudo file systems whose "regular files" are not files, by `statfs` magic, with the
/// refusal's words.
const PSEUDO: &[(i64, &str)] = &[
    (0x9fa0, "files of procfs cannot be mapped"),
    (0x6265_6572, "files of sysfs cannot be mapped"),
    (0x6462_6720, "files of debugfs cannot be mapped"),
    (0x7472_6163, "files of tracefs cannot be mapped"),
    (0x7363_6673, "files of securityfs cannot be mapped"),
    (0x0027_e0eb, "files of cgroupfs cannot be mapped"),
    (0x6367_7270, "files of cgroup2fs cannot be mapped"),
    (0x6265_6570, "files of configfs cannot be mapped"),
    (0xcafe_4a11, "files of bpffs cannot be mapped"),
    (0xde5e_81e4, "files of efivarfs cannot be mapped"),
    (0x6165_676c, "files of pstorefs cannot be mapped"),
    (0xf97c_ff8c, "files of selinuxfs cannot be mapped"),
    (0x4341_5d53, "files of smackfs cannot be mapped"),
    (0x6573_5543, "files of fusectl cannot be mapped"),
    (0x4249_4e4d, "files of binfmt_misc cannot be mapped"),
    (
        0x9584_58f6,
        "files of hugetlbfs cannot be mapped (not supported)",
    ),
];

/// A path resolved to a regular file of a real file system, and not opened for I/O yet: an
/// `O_PATH` descriptor, which opens nothing (no FIFO wait, no device driver's open, no lease
/// break, no access time) and pins the inode. `fstat` and `fstatfs` on it decide.
#[derive(Debug)]
pub struct Pinned {
    fd: OwnedFd,
    st: rustix::fs::Stat,
}

impl Pinned {
    /// Resolves `path` (following symbolic links) and checks what it is.
    pub fn new(path: &Path) -> Result<Self, OpenError> {
        let fd = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Directory => {
                return Err(OpenError::NotRegular(
                    "only regular files can be mapped: this is a directory",
                ))
            }
            FileType::Fifo => {
                return Err(OpenError::NotRegular(
                    "only regular files can be mapped: this is a FIFO",
                ))
            }
            FileType::CharacterDevice => {
                return Err(OpenError::NotRegular(
                    "only regular files can be mapped: this is a character device",
                ))
            }
            FileType::BlockDevice => {
                return Err(OpenError::NotRegular(
                    "only regular files can be mapped: this is a block device",
                ))
            }
            FileType::Socket => {
                return Err(OpenError::NotRegular(
                    "only regular files can be mapped: this is a socket",
                ))
            }
            _ => return Err(OpenError::NotRegular("only regular files can be mapped")),
        }
        let magic = rustix::fs::fstatfs(&fd)?.f_type as i64;
        if let Some(&(_, name)) = PSEUDO.iter().find(|(m, _)| *m == magic) {
            return Err(OpenError::Pseudo(name));
        }
        Ok(Self { fd, st })
    }

    /// The file's size when it was resolved.
    pub fn size(&self) -> u64 {
        self.st.st_size as u64
    }

    /// Opens the pinned inode for hetmem's one descriptor: read-write if `write`, O_DIRECT if
    /// `direct`. Through `/proc/self/fd`, so a rename since `new` cannot substitute another
    /// file. Without /proc, the path is opened again with O_NONBLOCK (a FIFO or device put
    /// there meanwhile does not block) and must still be the same inode.
    pub fn open(&self, path: &Path, write: bool, direct: bool) -> Result<File, OpenError> {
        let mut flags = OFlags::CLOEXEC | OFlags::NOCTTY;
        flags |= if write { OFlags::RDWR } else { OFlags::RDONLY };
        if direct {
            flags |= OFlags::DIRECT;
        }
        let through_proc = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let fd = match rustix::fs::open(through_proc.as_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if !Path::new("/proc/self/fd").exists() => {
                let fd = rustix::fs::open(path, flags | OFlags::NONBLOCK, Mode::empty())?;
                let now = rustix::fs::fstat(&fd)?;
                if (now.st_dev, now.st_ino) != (self.st.st_dev, self.st.st_ino) {
                    return Err(OpenError::NotRegular(
                        "the path was replaced by another file while it was opened",
                    ));
                }
                let fl = rustix::fs::fcntl_getfl(&fd)?;
                rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK)?;
                fd
            }
            Err(e) => return Err(e.into()),
        };
        Ok(File::from(fd))
    }
}

/// What a non-blocking I/O did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoWait {
    /// This many bytes (0: end of file for a read).
    Done(usize),
    /// It would have waited: a contended lock, a page-cache miss, a timestamp update.
    WouldBlock,
    /// The file system has no non-blocking I/O of this kind.
    Unsupported,
}

fn nowait(r: rustix::io::Result<usize>) -> Result<NoWait, i32> {
    match r {
        Ok(n) => Ok(NoWait::Done(n)),
        Err(Errno::AGAIN) => Ok(NoWait::WouldBlock),
        Err(Errno::OPNOTSUPP) => Ok(NoWait::Unsupported),
        Err(e) => Err(e.raw_os_error()),
    }
}

/// `preadv2(RWF_NOWAIT)`: reads what can be read without waiting. Errors are errnos (EINTR
/// included; the caller retries).
pub fn pread_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<NoWait, i32> {
    let mut iov = [io::IoSliceMut::new(buf)];
    nowait(rustix::io::preadv2(
        fd,
        &mut iov,
        offset,
        ReadWriteFlags::NOWAIT,
    ))
}

/// `pwritev2(RWF_NOWAIT)`: writes what can be written without waiting.
pub fn pwrite_nowait(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<NoWait, i32> {
    let iov = [io::IoSlice::new(data)];
    nowait(rustix::io::pwritev2(
        fd,
        &iov,
        offset,
        ReadWriteFlags::NOWAIT,
    ))
}

/// A shared mapping of `[offset, offset + len)` of a file, for I/O that takes no inode lock.
/// Only `process_vm_readv`/`process_vm_writev` reach it: the CPU never touches it, so a page
/// past the end of the file (or one whose read fails) makes the copy stop with EFAULT instead
/// of raising SIGBUS in our thread. Not inherited by fork (MADV_DONTFORK).
#[derive(Debug)]
pub struct Window {
    addr: usize,
    len: usize,
    offset: u64,
    /// The process that mapped it: a fork child does not have it (MADV_DONTFORK), and must
    /// not unmap whatever it may have put at that address since.
    owner: u32,
}

impl Window {
    /// Maps the file range, writable if `write` (the descriptor must then be read-write).
    /// `sequential` asks for the kernel's read-ahead on its faults, as `read(2)` has
    /// (MADV_SEQUENTIAL); otherwise a fault reads its own page only (MADV_RANDOM), so that a
    /// write through the window reads no more than the pages it writes (a store through mmap
    /// reads the page first), and nothing around them lands in the page cache.
    pub fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        write: bool,
        sequential: bool,
    ) -> io::Result<Self> {
        let prot = if write {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // Beyond off_t the offset would wrap to a negative one.
        if i64::try_from(offset).is_err() {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        }
        // SAFETY: a fresh mapping at an address the kernel picks overlaps nothing of ours.
        let p = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        let w = Self {
            addr: p as usize,
            len,
            offset,
            owner: std::process::id(),
        };
        let advice = if sequential {
            mm::Advice::Sequential
        } else {
            mm::Advice::Random
        };
        // SAFETY: our own fresh mapping; DONTFORK changes only what fork copies, and the
        // access advice only how its faults read ahead.
        unsafe {
            let _ = mm::madvise(p, len, mm::Advice::LinuxDontFork);
            let _ = mm::madvise(p, len, advice);
        }
        Ok(w)
    }

    /// The window's address of file byte `offset`, for `len` bytes inside it.
    fn at(&self, offset: u64, len: usize) -> Option<usize> {
        let rel = usize::try_from(offset.checked_sub(self.offset)?).ok()?;
        (rel.checked_add(len)? <= self.len).then(|| self.addr + rel)
    }

    /// Copies file bytes from `offset` into `buf`, through the mapping. Returns how many
    /// bytes were copied before the first page that could not be (past the end of the file, or
    /// unreadable), or the errno of a failure on the first page (EFAULT for such a page).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, i32> {
        let remote = self.at(offset, buf.len()).ok_or(libc::EINVAL)?;
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: remote as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow
        // mutably, and reads our own window through page faults of its own (no CPU access here).
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        self.zap(offset, buf.len());
        if n < 0 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(n as usize)
    }

    /// Copies `data` into the file at `offset`, through the (writable) mapping: each page is
    /// dirtied in the page cache as a store through mmap would (`page_mkwrite`), so the file
    /// never grows. Returns the bytes copied before the first page that could not be written
    /// (past the end of the file, no space, an I/O error), or the errno of a failure on the
    /// first page.
    pub fn write(&self, data: &[u8], offset: u64) -> Result<usize, i32> {
        let remote = self.at(offset, data.len()).ok_or(libc::EINVAL)?;
        let local = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let remote = libc::iovec {
            iov_base: remote as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: the kernel only reads `data`, and writes our own window through page faults
        // of its own (no CPU access here).
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        self.zap(offset, data.len());
        if n < 0 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(n as usize)
    }

    /// Drops the window's page-table entries for the range, so that the pages it touched do
    /// not stay mapped in this process (the page cache keeps them, dirty ones included).
    fn zap(&self, offset: u64, len: usize) {
        let Some(at) = self.at(offset, len) else {
            return;
        };
        let start = at & !(PAGE_SIZE - 1);
        let end = (at + len).next_multiple_of(PAGE_SIZE);
        // SAFETY: inside our own window, which only this module uses; for a shared file
        // mapping MADV_DONTNEED only removes page-table entries (dirty bits go to the page).
        let _ =
            unsafe { mm::madvise(start as *mut c_void, end - start, mm::Advice::LinuxDontNeed) };
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            return;
        }
        // SAFETY: the window is ours; nothing holds an address into it beyond this call.
        let _ = unsafe { mm::munmap(self.addr as *mut c_void, self.len) };
    }
}

/// Closes the open file description behind `file`'s descriptor now, and keeps the descriptor
/// *number* taken (by an inert eventfd) until `file` is dropped: so that the file is no longer
/// open (another mapping may take a write lease on it), while a lease-break signal queued for
/// this number cannot land on another file that would otherwise get it.
pub fn retire_descriptor(file: &File) -> io::Result<()> {
    let inert = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    // SAFETY: dup3 atomically makes `file`'s descriptor number refer to the eventfd; `file`
    // still owns the number and closes it (the eventfd) on drop. Nothing else uses the number
    // as the file's: the caller guarantees no more I/O on `file`.
    let r = unsafe { libc::dup3(inert.as_raw_fd(), file.as_raw_fd(), libc::O_CLOEXEC) };
    drop(inert);
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the page cache's dirty pages of `[offset, offset + len)` to the disk and waits
/// (`sync_file_range`), then drops the range from the page cache (`POSIX_FADV_DONTNEED`): what
/// an O_DIRECT write leaves behind, for data that went through the page cache. Neither call
/// takes the inode lock. Errors (of the disk) are errnos.
pub fn write_out_and_drop(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<(), i32> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let off = libc::off64_t::try_from(offset).map_err(|_| libc::EOVERFLOW)?;
    let n = libc::off64_t::try_from(len).map_err(|_| libc::EOVERFLOW)?;
    // SAFETY: integers only, on a descriptor the caller borrows.
    if unsafe { libc::sync_file_range(fd.as_raw_fd(), off, n, flags) } != 0 {
        return Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    drop_cached(fd, offset, len);
    Ok(())
}

/// The errors of the kernel's own writeback of the file since this descriptor last reported
/// one: `sync_file_range(SYNC_FILE_RANGE_WAIT_AFTER)` waits for the writeback of
/// `[offset, offset + len)` already in flight (it starts none) and reports the file's error
/// sequence for this open file description, once (`file_fdatawait_range`, Linux 4.14), as
/// `fdatasync` would, without writing anything. No inode lock. `Ok` where the file system or
/// the system refuses the call: nothing could be learned. Errors are errnos.
pub fn writeback_errors(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<(), i32> {
    let off = libc::off64_t::try_from(offset).map_err(|_| libc::EOVERFLOW)?;
    let n = libc::off64_t::try_from(len).map_err(|_| libc::EOVERFLOW)?;
    loop {
        // SAFETY: integers only, on a descriptor the caller borrows.
        let r = unsafe {
            libc::sync_file_range(fd.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WAIT_AFTER)
        };
        if r == 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not an error of the file's data: the call itself is not available here.
            Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EPERM | libc::EBADF) | None => {
                return Ok(())
            }
            Some(e) => return Err(e),
        }
    }
}

/// Drops clean pages of `[offset, offset + len)` from the page cache (`POSIX_FADV_DONTNEED`;
/// no inode lock).
pub fn drop_cached(fd: BorrowedFd<'_>, offset: u64, len: usize) {
    let _ = rustix::fs::fadvise(
        fd,
        offset,
        std::num::NonZeroU64::new(len as u64),
        rustix::fs::Advice::DontNeed,
    );
}

/// Free space of the file system holding `fd`: whether it has no blocks left for an
/// unprivileged writer (a write fault that failed there was most likely ENOSPC).
pub fn looks_full(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|s| s.f_bavail == 0 || s.f_bfree == 0)
}

/// Sets or clears O_DIRECT on `fd` (fcntl F_GETFL, F_SETFL); whether that worked.
pub fn set_o_direct(fd: BorrowedFd<'_>, on: bool) -> bool {
    let Ok(flags) = rustix::fs::fcntl_getfl(fd) else {
        return false;
    };
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(fd, flags).is_ok()
}

/// The `statfs` magic (`f_type`) of the file system holding `fd`'s file; `None` if
/// `fstatfs` fails.
pub fn fs_magic(fd: BorrowedFd<'_>) -> Option<u64> {
    // f_type is a signed word: on a 32-bit system, magics such as 0xff534d42 read negative.
    rustix::fs::fstatfs(fd)
        .ok()
        .map(|s| s.f_type as u64 & 0xffff_ffff)
}
