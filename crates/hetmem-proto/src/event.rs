//! What goes into the engine.

use crate::ids::{DeviceId, Mem, OpId, PageRun, Proc, ReqId};

/// The access a fault asks for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Access {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Device atomics: an exclusive mapping, as `make_device_exclusive` gives (devices only).
    Atomic,
}

/// Work that completes later, with [`crate::Action::Complete`] carrying its [`ReqId`].
///
/// Requests are served in arrival order per page: a request acts only on pages that no earlier
/// pending request covers, like a queue on a page lock.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RequestKind {
    /// A processor touched pages it has no (sufficient) mapping for.
    Fault {
        /// Who faulted.
        proc: Proc,
        /// What it needs.
        access: Access,
    },
    /// `dev` maps the pages for `access` without migrating them to itself: a page already in
    /// its memory is mapped there, any other is mapped in system memory, remotely over the
    /// link (filled there first if it has no copy in system memory). A launch's remote
    /// placement: data larger than the device, or touched once.
    MapRemote {
        /// The device.
        dev: DeviceId,
        /// What it needs.
        access: Access,
    },
    /// Move the pages to `dst` (prefetch, explicit migration). Read-mostly pages are duplicated
    /// instead. Pages without data are populated there (zero or file).
    Migrate {
        /// Destination memory.
        dst: Mem,
    },
    /// Free up to `pages` frames of `dev`, copying sole copies to system memory first (clean
    /// file pages need no copy: they are dropped).
    Evict {
        /// The full device.
        dev: DeviceId,
        /// Frames wanted.
        pages: u32,
        /// Write dirty file pages back from device memory, then drop them, instead of copying
        /// them to system memory: for file mappings whose writes reach the file. A page whose
        /// writeback fails is copied after all; the error waits for the next `Flush`.
        write_back: bool,
    },
    /// Write back dirty file pages (msync(MS_SYNC)); reports the block's remembered error once.
    Flush,
    /// Drop every copy and mapping `dev` holds, moving sole copies to system memory.
    Release {
        /// The departing device.
        dev: DeviceId,
    },
}

/// How a range stops being what it was (or, for `Extend`, becomes a file's pages again).
/// Mappings are torn down at once, when the event is handled, as an MMU notifier does; dropping
/// data waits for transfers in flight.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Invalidation {
    /// munmap: the range stops being managed. Dirty file data is written back first.
    Unmap,
    /// MADV_DONTNEED / MADV_FREE: data dropped, the range stays; anonymous pages read zero after,
    /// file pages read the file. Dirty file data is written back first.
    Discard,
    /// The file shrank: pages are beyond its end. Their data, dirty or not, is discarded and any
    /// later access is an error (SIGBUS on the CPU).
    Truncate,
    /// The file grew again over pages beyond its end (`Truncate`): they are the file's pages
    /// once more, read from the file at their next access, as a `MAP_SHARED` page past EOF
    /// becomes valid when the file grows. Mappings are untouched (no page beyond the end is
    /// mapped). It waits behind every earlier request and invalidation of its pages, so the
    /// truncation's drop (and any flush that still skips the pages) is over before they count
    /// as inside the file again, and completes then. Pages not beyond the end are left alone.
    Extend,
    /// The file's copy wins: the pages' data is dropped, dirty or not, without a writeback, and
    /// the next access reads the file. What `Truncate` does to the data, for pages that stay
    /// inside the file (a conflict resolved for the other process's copy).
    Revert,
    /// mprotect. Mappings beyond the new protection are revoked.
    Protect {
        /// Reads allowed.
        read: bool,
        /// Writes allowed.
        write: bool,
    },
}

/// Placement hints, as `cudaMemAdvise`. They change decisions, never correctness.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Advice {
    /// Where the data should live. `Some(Mem::System)` makes device faults map system memory
    /// remotely instead of migrating.
    PreferredLocation(Option<Mem>),
    /// Reads duplicate the page instead of moving it; a write collapses the duplicates.
    ReadMostly(bool),
    /// `dev` will access the range: if the page is in system memory, map it there rather than
    /// migrate.
    AccessedBy(DeviceId, bool),
}

/// Why an asynchronous operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum OpError {
    /// The copy engine or the device failed (a device error, a DMA fault).
    #[error("device transfer failed")]
    Device,
    /// I/O error (EIO).
    #[error("I/O error (EIO)")]
    Io,
    /// No space left on the file system (ENOSPC).
    #[error("no space left on device (ENOSPC)")]
    NoSpace,
    /// The writer's disk quota is exhausted (EDQUOT). Kept apart from `NoSpace`: freeing
    /// space on the file system does not help, raising the quota does.
    #[error("disk quota exceeded (EDQUOT)")]
    Quota,
    /// A writeback refused: the file was handed to another process before the page was
    /// written (a lease break that ran out of time), and writing it now could overwrite that
    /// process's data. The page stays dirty until its owner says which copy wins.
    #[error("conflicting with another process's copy of the file (ESTALE)")]
    Conflict,
}

/// One input to a block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Event {
    /// Queue a request.
    Request {
        /// Caller's token, returned on completion.
        id: ReqId,
        /// Pages it covers.
        pages: PageRun,
        /// What to do.
        kind: RequestKind,
    },
    /// Change the mapping or protection of a range. `id` completes once data was dropped (or
    /// written back); mappings are already gone when `handle` returns.
    Invalidate {
        /// Caller's token.
        id: ReqId,
        /// Pages it covers.
        pages: PageRun,
        /// What happened.
        kind: Invalidation,
    },
    /// Set a placement hint. Takes effect at once.
    Advise {
        /// Pages it covers.
        pages: PageRun,
        /// The hint.
        advice: Advice,
    },
    /// An asynchronous operation finished.
    Complete {
        /// Which.
        op: OpId,
        /// Its outcome.
        result: Result<(), OpError>,
    },
}
