//! Errors, each with the errno it stands for (dmirror's meanings for device accesses).

use hetmem_proto::{OpError, RequestError};

/// What went wrong. [`Error::errno`] gives the kernel's equivalent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No mapping, PROT_NONE, an address outside managed memory, or memory already freed
    /// (EFAULT).
    #[error("bad address: {0} (EFAULT)")]
    Fault(&'static str),
    /// A write to read-only memory (EPERM).
    #[error("write to read-only memory (EPERM)")]
    Perm,
    /// A page or range that does not exist where it was looked for (ENOENT).
    #[error("no such mapping: {0} (ENOENT)")]
    NoEnt(&'static str),
    /// Unaligned, not fully mapped, or otherwise malformed input (EINVAL).
    #[error("invalid argument: {0} (EINVAL)")]
    Invalid(&'static str),
    /// The range is pinned for DMA (`Hetmem::pin`): it may not move to a device, be
    /// discarded, or get advice that would move it, until the pin is dropped (EBUSY).
    #[error("range is pinned: {0} (EBUSY)")]
    Busy(&'static str),
    /// A device is full and nothing on it can be evicted (ENOMEM).
    #[error("device memory exhausted (ENOMEM)")]
    NoMem,
    /// A transfer, a writeback or the device failed; the data stayed where it was, dirty data
    /// stayed dirty (EIO; ENOSPC for a full file system, EDQUOT for an exhausted quota).
    #[error("transfer failed: {0}")]
    Io(OpError),
    /// The kernel refused a system call.
    #[error("{what}: {source}")]
    Os {
        /// What hetmem was doing.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// `FileOptions::require_lease`: the file lease could not be had, so `map_file` refused
    /// to map the file without coherence with other processes (nothing was allocated). What
    /// trying it gave; the errno is EAGAIN (in use elsewhere), the kernel's refusal (EINVAL:
    /// no leases on this file system; EACCES: not the file's owner), or EBUSY (no real-time
    /// signal is free for leases: the application handles or ignores every one).
    #[error("no file lease: {0}")]
    NoLease(crate::fs_caps::LeaseProbe),
    /// A lease break ran out of `lease-break-time` before these pages of the mapping were
    /// written back, and the kernel let the other process in: writing them now could
    /// overwrite its data. They are kept, dirty, and never written back until the application
    /// says which copy wins (`FileMapping::conflicts`, `FileMapping::resolve_conflicts`);
    /// every `flush` and `sync` reports this meanwhile (ESTALE).
    #[error("{pages} pages conflict with another process's copy of the file (ESTALE)")]
    Conflict {
        /// Conflicted pages of the mapping.
        pages: usize,
    },
    /// The kernel lacks a userfaultfd feature hetmem needs.
    #[error("this kernel lacks userfaultfd features {0:?}; hetmem needs Linux 5.19 or later")]
    Unsupported(Vec<&'static str>),
}

impl Error {
    /// The errno this error stands for.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Fault(_) => libc::EFAULT,
            Error::Perm => libc::EPERM,
            Error::NoEnt(_) => libc::ENOENT,
            Error::Invalid(_) => libc::EINVAL,
            Error::NoMem => libc::ENOMEM,
            Error::Busy(_) => libc::EBUSY,
            Error::Io(OpError::NoSpace) => libc::ENOSPC,
            Error::Io(OpError::Quota) => libc::EDQUOT,
            Error::Io(OpError::Conflict) | Error::Conflict { .. } => libc::ESTALE,
            Error::Io(_) => libc::EIO,
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Unsupported(_) => libc::ENOSYS,
            Error::NoLease(probe) => probe.errno(),
        }
    }

    pub(crate) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Os { what, source }
    }
}

impl From<RequestError> for Error {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::NoMapping => Error::Fault("page is not mapped"),
            RequestError::NoAccess => Error::Fault("page is PROT_NONE"),
            RequestError::ReadOnly => Error::Perm,
            RequestError::BeyondEof => Error::Fault("page is beyond end of file"),
            RequestError::DeviceFull(_) => Error::NoMem,
            RequestError::NoDevice => Error::Invalid("no such device"),
            RequestError::InvalidAccess => Error::Invalid("atomic access is for devices"),
            RequestError::Op(op) => Error::Io(op),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
