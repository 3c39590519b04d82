//! Files for `Hetmem::map_file`: opening a path without side effects until it is known to be
//! a regular file.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

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
