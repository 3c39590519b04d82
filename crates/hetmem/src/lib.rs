//! # hetmem: heterogeneous managed memory in user space
//!
//! Managed memory that the CPU uses as ordinary memory and devices reach through page tables
//! of their own, with pages migrating between system and device memory on demand: Linux HMM's
//! model, built on userfaultfd so it runs on stock kernels without `DEVICE_PRIVATE`.
//!
//! - [`Hetmem`] is the context: devices, fault-service threads, managed regions.
//! - [`ManagedBuf`] ([`Hetmem::alloc`]) and [`Registration`] ([`Hetmem::register`]) are managed
//!   memory. System memory is a memfd with two views: the CPU's, registered with userfaultfd,
//!   and the runtime's own (DMA) view (`docs/runtime.md`).
//! - [`Device`] is a simulated device with dmirror's semantics.
//! - Every coherence decision is `hetmem-proto`'s; this crate executes its actions.

mod api;
mod budget;
mod device;
mod error;
mod fs_caps;
mod mm;
pub mod policy;
mod raw;
mod stats;
mod sys;
mod trace;

pub use api::buffer::{ManagedBuf, Registration};
pub use api::device::{CpuProt, Device, Location, PageState};
pub use api::file::{FileMapping, FileOptions};
pub use api::hetmem::{
    default_service_threads, Hetmem, HetmemBuilder, Prefetch, SimConfig, Target,
    MAX_SERVICE_THREADS,
};
pub use api::launch::{
    DeclaredAccess, HostRuns, Launch, LaunchPlacement, LaunchRun, LaunchTarget, Resident,
};
pub use api::pin::Pin;
pub use device::{
    BlockPageTable, BytePageTable, Chunk, CopyOp, DeviceBackend, DeviceCounters, Endpoint, Fence,
    Pte, SimBackend,
};
pub use error::{Error, Result};
pub use fs_caps::{FileCapabilities, Filesystem, LeaseProbe};
pub use hetmem_proto::{
    Advice, DeviceId, DeviceKind, MapMode, Mem, OpError, PageRun, PAGES_PER_BLOCK, PAGE_SIZE,
};
pub use mm::file_io::FileMode;
pub use mm::launch::LaunchCompletion;
pub use mm::lease_break::Resolution;
pub use stats::StatsSnapshot;
