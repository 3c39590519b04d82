//! Errors a request completes with, and invariant violations.

use crate::event::OpError;
use crate::ids::{DeviceId, OpId, PageRun};

/// Why a request failed. Each carries the errno the runtime should map it to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum RequestError {
    /// A page is not part of any managed mapping (EFAULT).
    #[error("page is not mapped (EFAULT)")]
    NoMapping,
    /// The protection forbids any access (PROT_NONE; EFAULT).
    #[error("page is not accessible (EFAULT)")]
    NoAccess,
    /// A write to a read-only page (EPERM).
    #[error("write to a read-only page (EPERM)")]
    ReadOnly,
    /// The page lies beyond the end of its file (SIGBUS on the CPU).
    #[error("page is beyond the end of its file (SIGBUS)")]
    BeyondEof,
    /// The device has no free frame; evict and retry (ENOMEM).
    #[error("{0:?} has no free frame (ENOMEM)")]
    DeviceFull(DeviceId),
    /// The processor or memory is not part of the topology (EINVAL).
    #[error("no such device (EINVAL)")]
    NoDevice,
    /// Atomic access asked by the CPU (EINVAL).
    #[error("atomic access is for devices (EINVAL)")]
    InvalidAccess,
    /// A transfer or writeback failed. Data stays where it was; dirty pages stay dirty.
    #[error("operation failed: {0}")]
    Op(OpError),
}

/// An event the engine refused because it was malformed. The state did not change.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum EventError {
    /// `Complete` for an op that is not in flight.
    #[error("{0:?} is not in flight")]
    UnknownOp(OpId),
    /// A page run that does not fit in the block.
    #[error("page run {0:?} does not fit in the block")]
    OutOfBlock(PageRun),
}

/// A broken invariant: a bug in the engine. Tests and debug builds check after every step.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("invariant violated at page {page}: {what}")]
pub struct InvariantViolation {
    /// The first page where it fails.
    pub page: usize,
    /// Which invariant.
    pub what: &'static str,
}
