//! # hetmem-cuda: hetmem's CUDA backend and the GPU-facing layer under it
//!
//! A small, safe layer over the CUDA driver API (cudarc 0.19, loaded at run time), and
//! hetmem's device backend on it (`docs/runtime.md` §4):
//!
//! - [`CudaBackend`]: `hetmem::DeviceBackend` on a CUDA device, and [`CudaBuilderExt`], which
//!   adds one to a `hetmem::HetmemBuilder` (`cuda_device(ordinal, cap_bytes)`). Not yet run on
//!   a GPU.
//! - [`Cuda`]: the driver (a typed [`Error::NoDriver`] where `libcuda` is missing, never a
//!   panic), a device, its primary context, made current on whichever thread uses it, and
//!   [`DeviceInfo`].
//! - [`HostRegistration`]: an existing host mapping (the memfd's DMA view, [`MemfdView`])
//!   pinned with `cuMemHostRegister`, portable and device-mapped; [`PinnedBuffer`] for
//!   driver-allocated pinned memory.
//! - [`Reservation`], [`PhysicalChunk`], [`Mapping`]: device memory in 2 MiB chunks through the
//!   VMM API, torn down in order; [`DeviceBuffer`] for a plain range of chunks.
//! - [`Stream`] and [`Event`]: asynchronous copies (H2D, D2H, D2D), `cuMemsetD8Async`, kernel
//!   launches, fences that can be polled.
//! - [`CudaLauncher`]: kernels launched over ranges they declare (`hetmem::Device::launch`):
//!   resident and pinned on the device until the kernel's event fires. Not yet run on a GPU.
//! - [`Module`] from PTX or CUBIN, [`nvrtc`] to compile CUDA C at run time ([`Error::NoNvrtc`]
//!   without it), [`KernelArgs`] to pack arguments.
//! - [`SameAddressView`]: one address for CPU and GPU (the memfd for the CPU, device chunks for
//!   the GPU).
//! - [`ManagedBuffer`]: CUDA's managed memory, for comparison measurements.
//!
//! The unsafe code is confined to the modules that call the driver or `mmap`; each block says
//! why it is sound.

mod args;
mod backend;
mod context;
mod error;
mod host;
pub mod kernels;
mod launch;
mod managed;
mod module;
pub mod nvrtc;
mod same_va;
mod span;
mod stream;
pub mod util;
mod vmm;

pub use args::{KernelArg, KernelArgs, LaunchConfig, MAX_THREADS_PER_BLOCK};
pub use backend::{CudaBackend, CudaBuilderExt, CudaPageTable, MAX_PENDING};
pub use context::{device_count, driver, driver_version, Cuda, DeviceInfo};
pub use error::{Error, Result};
pub use host::{HostMem, HostRegistration, MemfdView, PinnedBuffer, REGISTER_FLAGS};
pub use launch::{contiguous, device_ptr, CudaLauncher};
pub use managed::{Location, ManagedBuffer, MAX_FREE_FRACTION};
pub use module::{Function, Module};
pub use same_va::SameAddressView;
pub use span::{DevicePtr, DeviceSpan, HostSpan};
pub use stream::{Event, Stream};
pub use vmm::{chunk_size, Alias, DeviceBuffer, Mapping, PhysicalChunk, Reservation, CHUNK_SIZE};

/// The raw driver bindings, for calls this crate does not wrap (bind the context first).
pub use cudarc::driver::sys as driver_sys;
