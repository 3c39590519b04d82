//! What comes out of the engine: steps the runtime executes in order.
//!
//! Synchronous steps (page-table updates, frame bookkeeping) must be complete before the next
//! step starts: a device unmap must be finished, TLBs included, when the runtime moves on, as in
//! an MMU-notifier callback. Asynchronous steps (`Transfer`, `WriteBack`) may run in the
//! background; the runtime reports each [`OpId`] once, with [`crate::Event::Complete`], after all
//! of that op's steps finished.

use crate::error::RequestError;
use crate::ids::{DeviceId, Mem, OpId, PageRun, ReqId};

/// Where a transfer's data comes from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Source {
    /// Another memory's copy.
    Mem(Mem),
    /// Zeros (first touch of anonymous memory).
    Zero,
    /// The backing file. The run's first page is at file page `file_page`.
    File {
        /// File offset of the run's first page, in pages.
        file_page: u64,
    },
}

/// How a processor maps a page.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum MapMode {
    /// Read-only.
    Read,
    /// Read-write.
    ReadWrite,
    /// Read-write with atomics; no other processor maps the page (devices only).
    Exclusive,
}

/// One step for the runtime.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Action {
    /// Bind fresh frames of `dev` to these pages. Capacity was already reserved.
    AllocFrames {
        /// Device.
        dev: DeviceId,
        /// Pages.
        run: PageRun,
    },
    /// Release these pages' frames in `mem` (for system memory: the backing may be discarded).
    /// Nobody maps them any more.
    FreeFrames {
        /// Memory.
        mem: Mem,
        /// Pages.
        run: PageRun,
    },
    /// Asynchronous: fill `dst`'s frames of `run` from `src`.
    Transfer {
        /// The op this step belongs to.
        op: OpId,
        /// Data source.
        src: Source,
        /// Destination memory.
        dst: Mem,
        /// Pages.
        run: PageRun,
    },
    /// Asynchronous: write `src`'s copy of `run` to the file at `file_page`.
    WriteBack {
        /// The op this step belongs to.
        op: OpId,
        /// Memory holding the data.
        src: Mem,
        /// Pages.
        run: PageRun,
        /// File offset of the run's first page, in pages.
        file_page: u64,
    },
    /// Map the CPU to `target`'s copy. If the CPU already maps that copy read-only, this is an
    /// upgrade (with userfaultfd: clear write-protect); a mapping of another copy is always
    /// removed with `CpuUnmap` first.
    CpuMap {
        /// System memory or a coherent device.
        target: Mem,
        /// Pages.
        run: PageRun,
        /// `Read` or `ReadWrite`.
        mode: MapMode,
    },
    /// Remove the CPU's write permission (userfaultfd write-protect).
    CpuProtect {
        /// Pages.
        run: PageRun,
    },
    /// Remove the CPU's mapping.
    CpuUnmap {
        /// Pages.
        run: PageRun,
    },
    /// Map `dev` to its own memory (`remote == false`) or to system memory (`remote == true`),
    /// or change the mode of its existing mapping of that copy.
    DeviceMap {
        /// Device.
        dev: DeviceId,
        /// Pages.
        run: PageRun,
        /// Whether the mapping targets system memory over the link.
        remote: bool,
        /// Permission.
        mode: MapMode,
    },
    /// Downgrade `dev`'s mapping to read-only.
    DeviceProtect {
        /// Device.
        dev: DeviceId,
        /// Pages.
        run: PageRun,
    },
    /// Invalidate `dev`'s mapping.
    DeviceUnmap {
        /// Device.
        dev: DeviceId,
        /// Pages.
        run: PageRun,
    },
    /// A request finished: wake its waiters with this outcome.
    Complete {
        /// The request.
        id: ReqId,
        /// Its outcome.
        result: Result<(), RequestError>,
    },
}
