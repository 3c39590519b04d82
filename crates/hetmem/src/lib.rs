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

mod budget;
mod buffer;
mod context;
mod device;
mod error;
mod exec;
mod file;
mod fork;
mod raw;
mod region;
mod stats;
mod sys;

pub use buffer::{ManagedBuf, Registration};
pub use context::{Hetmem, HetmemBuilder, SimConfig, Target, MAX_SERVICE_THREADS};
pub use device::{
    Chunk, CopyOp, CpuProt, Device, DeviceBackend, DeviceCounters, Endpoint, Fence, Location,
    PageState, SimBackend,
};
pub use error::{Error, Result};
pub use file::{FileMapping, FileOptions};
pub use hetmem_proto::{Advice, DeviceId, DeviceKind, MapMode, PAGE_SIZE};
pub use region::FileMode;
pub use stats::StatsSnapshot;
