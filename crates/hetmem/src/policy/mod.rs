//! Placement policy, apart from the mechanism that moves data: which window a CPU fault brings
//! home, which blocks to read ahead, which blocks to evict first. As in UVM's perf modules and
//! quinn-proto's congestion controllers, a policy is sans-IO: it sees plain data (the stream of
//! [`MemEvent`]s, facts the memory manager gathered, and per-block and per-region slots that
//! only policies read) and answers with plans. The memory manager carries plans out as ordinary
//! protocol requests, so no policy can break coherence: the worst a bad policy does is move
//! data needlessly.
//!
//! [`DefaultPolicy`] holds today's rules. A context takes another through
//! `HetmemBuilder::policy`.

mod default;
pub mod density;
pub mod thrashing;

use std::any::Any;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::OnceLock;

use hetmem_proto::{DeviceId, Mem, PageRun};

pub use default::{AccessCounterConfig, DefaultPolicy};
pub use density::DensityConfig;
pub use thrashing::ThrashingConfig;

/// One thing the memory manager did. The same stream feeds the context's statistics, the
/// devices' counters and the policy (UVM's perf-event bus).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum MemEvent<'a> {
    /// A CPU fault message is being served.
    CpuFault {
        /// The fault was a write.
        write: bool,
    },
    /// A device fault, served by the protocol, on behalf of `dev`.
    DeviceFault { dev: DeviceId },
    /// A command or kernel of `dev` had to fault at least once (the device's fault rounds).
    DeviceCommandFaulted { dev: DeviceId },
    /// A command or kernel of `dev` ran over `pages` pages of a block mapped for it, `remote`
    /// of them in system memory over the link.
    DeviceAccess {
        dev: DeviceId,
        pages: u64,
        remote: u64,
        /// The block's policy slot.
        block: &'a PolicyBlock,
    },
    /// `pages` pages were filled for `to`, `zeroed` of them with zeros (first touch).
    Filled { to: Mem, pages: u64, zeroed: u64 },
    /// `pages` pages moved from `from` to `to`, copying `bytes` (0 where the memories alias).
    Migrated {
        from: Mem,
        to: Mem,
        pages: u64,
        bytes: u64,
    },
    /// `pages` pages were read from the file into `to`.
    FileRead { to: Mem, pages: u64 },
    /// `pages` pages were written back to the file.
    WrittenBack { pages: u64 },
    /// `pages` frames of `dev` were freed by eviction.
    Evicted { dev: DeviceId, pages: u64 },
    /// Read-ahead brought `pages` pages home, or density prefetch brought them to a device.
    Prefetched { pages: u64 },
    /// Read-ahead of a block finished; its first page was left unmapped so that touching it
    /// continues the stream.
    ReadAheadDone { block: &'a PolicyBlock },
    /// A copy for a CPU fault failed and is retried (a device error).
    TransferFailed,
    /// A file lease was broken by another process.
    LeaseBroken,
    /// A block found thrashing between the CPU and `dev` was pinned to system memory
    /// (`Placement::PinToSystem`).
    ThrashingPinned { dev: DeviceId },
    /// A change of `dev`'s mappings waited for a launch using the pages (`Device::launch`).
    LaunchWaited { dev: DeviceId },
    /// A system call failed unexpectedly (`stats().errors`).
    Error,
}

/// A block's policy state: the memory manager creates it with the block and never reads it.
/// `stamps` and `marked` serve the common cases (per-device recency, one flag); a policy that
/// needs more keeps it in `extra`, created on first use, as UVM's perf modules keep theirs in
/// the block's opaque slots.
#[derive(Debug)]
pub struct PolicyBlock {
    /// Per device: a stamp (the default policy: logical time of the last access).
    pub stamps: Box<[AtomicU64]>,
    /// One flag (the default policy: read ahead, first page left unmapped).
    pub marked: AtomicBool,
    /// Anything else a policy keeps per block.
    pub extra: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl PolicyBlock {
    /// A slot for a block of a context with `devices` devices.
    pub fn new(devices: usize) -> Self {
        Self {
            stamps: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            marked: AtomicBool::new(false),
            extra: OnceLock::new(),
        }
    }
}

/// A region's policy state (the default policy: its sequential read-ahead stream).
#[derive(Debug)]
pub struct PolicyRegion {
    /// The default policy: the last block a CPU read-back hit (`usize::MAX`: none yet).
    pub last: AtomicUsize,
    /// The default policy: the next block to read ahead.
    pub next: AtomicUsize,
    /// Anything else a policy keeps per region.
    pub extra: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Default for PolicyRegion {
    fn default() -> Self {
        Self {
            last: AtomicUsize::new(usize::MAX),
            next: AtomicUsize::new(0),
            extra: OnceLock::new(),
        }
    }
}

/// A CPU fault, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct CpuFault<'a> {
    /// The block's index in its region, and the region's number of blocks.
    pub block_index: usize,
    pub blocks: usize,
    /// The faulting page in the block, and the block's pages (before the file's end).
    pub page: usize,
    pub pages: usize,
    pub write: bool,
    /// The page's data lives only in private device memory: the CPU cannot map it without a
    /// migration.
    pub only_on_private_device: bool,
    pub block: &'a PolicyBlock,
    pub region: &'a PolicyRegion,
}

/// What to do about a CPU fault, beside serving the faulting page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFaultPlan {
    /// The pages around the faulting one to treat with it: brought home with it when
    /// `bring_home`, else mapped around it where their data is already reachable. `None`: the
    /// page alone.
    pub window: Option<PageRun>,
    /// Migrate the window to system memory (only where the protocol allows the CPU to read).
    pub bring_home: bool,
    /// Blocks of the region to read ahead.
    pub read_ahead: Option<RangeInclusive<usize>>,
}

/// A device fault on a block, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceFault<'a> {
    pub dev: DeviceId,
    /// The block's index in its region.
    pub block_index: usize,
    /// The faulting pages, and the block's pages (before the file's end).
    pub run: PageRun,
    pub pages: usize,
    pub write: bool,
    /// The faulting page's data is in system memory and not on the device: without a change
    /// of placement, the fault migrates it to the device.
    pub to_device: bool,
    /// The application gave the page a preferred location itself (`Hetmem::advise`).
    pub advised: bool,
    pub block: &'a PolicyBlock,
}

/// What to do about a device fault, before it is served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceFaultPlan {
    /// A change of the block's placement.
    pub placement: Placement,
    /// Pages of the block to bring to the device with the fault (density prefetch).
    pub prefetch: Option<PageRun>,
}

/// A change of a block's placement (`DeviceFaultPlan::placement`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// As the protocol says.
    #[default]
    Keep,
    /// The block thrashes between the CPU and devices (`flips` moves within `within`): pin it
    /// to system memory (advice `PreferredLocation(System)` on the whole block), so devices
    /// map it remotely instead of migrating it.
    PinToSystem {
        flips: u32,
        within: std::time::Duration,
    },
    /// Lift an earlier pin (the block's preferred location is cleared) and watch it again.
    Unpin,
}

/// A device's command or kernel finished with a block, some of it mapped remotely, as the
/// policy sees it (`PlacementPolicy::device_accessed`).
#[derive(Clone, Copy, Debug)]
pub struct DeviceAccessed<'a> {
    pub dev: DeviceId,
    pub block_index: usize,
    /// Pages it reached in system memory, remotely.
    pub remote: u64,
    pub block: &'a PolicyBlock,
}

/// A block that holds frames of the device being evicted from.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub block: &'a PolicyBlock,
    /// Pages evicting it would copy home (its sole copies on the device, less clean file
    /// pages, which the file has): 0 for a clean block, whose frames just go.
    pub copies: u32,
    /// The memory manager's own reference; the policy passes it through.
    pub index: usize,
}

/// Where data should live and what to bring early. Plain data in, plans out; every method is
/// called from the fault path or a device access, so it must be quick and must not block.
pub trait PlacementPolicy: Send + Sync + fmt::Debug {
    /// One event of the stream (called for every event; the default ignores them).
    fn observe(&self, event: &MemEvent<'_>) {
        let _ = event;
    }

    /// A CPU fault on a page: the window to treat with it and what to read ahead.
    fn cpu_fault(&self, fault: &CpuFault<'_>) -> CpuFaultPlan;

    /// A device fault on a block, before it is served: whether to change the block's
    /// placement (the default: never).
    fn device_fault(&self, fault: &DeviceFault<'_>) -> DeviceFaultPlan {
        let _ = fault;
        DeviceFaultPlan::default()
    }

    /// A device reached pages of a block remotely (access counters): whether to migrate the
    /// whole block to that device now (the default: never).
    fn device_accessed(&self, access: &DeviceAccessed<'_>) -> bool {
        let _ = access;
        false
    }

    /// Device `dev` is full: order `candidates` best victim first and keep those worth trying
    /// (the memory manager tries them in order until one frees frames, then the rest of the
    /// faulting block).
    fn victims(&self, dev: DeviceId, candidates: &mut Vec<Candidate<'_>>);
}
