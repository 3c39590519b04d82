//! [`CudaLauncher`]: kernels launched on a CUDA device of a hetmem context over ranges they
//! declare (`hetmem::Device::launch`). A GPU here cannot fault on hetmem's memory (no kernel
//! HMM), so the runtime makes the declared ranges resident in the device's memory first and
//! keeps them there until the kernel's completion event fires; the kernel gets the device
//! addresses of the runs of pages ([`device_ptr`]).
//!
//! The copies that brought the pages in have completed (the runtime waits for their fences
//! before it reports pages resident), so the launch stream needs no wait on the copy stream;
//! and whatever takes the pages away afterwards waits for the kernel's event first.

use std::sync::Mutex;

use hetmem::{
    DeclaredAccess, Launch, LaunchCompletion, LaunchRun, LaunchTarget, OpError, Resident,
};

use crate::args::{KernelArgs, LaunchConfig};
use crate::context::Cuda;
use crate::error::{Error, Result};
use crate::module::Function;
use crate::span::DevicePtr;
use crate::stream::{Event, Stream};

/// The device address of a run of a launch's pages in device memory: `None` for a run in
/// system memory, which a CUDA device reaches only through a registered view
/// ([`CudaLauncher::address`] resolves those).
pub fn device_ptr(run: &LaunchRun) -> Option<DevicePtr> {
    match run.target {
        LaunchTarget::Device { handle, offset, .. } => Some(DevicePtr(handle + offset as u64)),
        LaunchTarget::System { .. } => None,
    }
}

/// The device address of declared range `i` when all of it is one run in device memory (a
/// range within one 2 MiB block is), or all of it is at the CPU's addresses (same-address
/// memory); `None` otherwise.
pub fn contiguous(resident: &Resident, i: usize) -> Option<DevicePtr> {
    if resident.at_cpu_address(i) {
        return Some(DevicePtr(resident.range(i)?.0.addr as u64));
    }
    match resident.range(i)? {
        (_, [run]) => device_ptr(run),
        _ => None,
    }
}

/// A kernel's completion: the event recorded after it on the launch stream.
struct Completion(Event);

impl LaunchCompletion for Completion {
    fn wait(&mut self) -> std::result::Result<(), OpError> {
        // A failing kernel (an illegal address) loses the context; what the runtime copies
        // next fails too, and the data whose only copy was on the device is lost with it.
        self.0.wait().map_err(|_| OpError::Device)
    }

    fn is_done(&mut self) -> bool {
        // An error is done too: `wait` reports it.
        self.0.is_complete().unwrap_or(true)
    }
}

/// Launches kernels on one stream of a CUDA device that a hetmem context manages.
pub struct CudaLauncher {
    stream: Mutex<Stream>,
    /// The device's backend, to reach pages placed remotely through its registered views.
    backend: Option<std::sync::Arc<crate::CudaBackend>>,
}

impl std::fmt::Debug for CudaLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLauncher").finish_non_exhaustive()
    }
}

fn hetmem_error(what: &'static str, e: Error) -> hetmem::Error {
    hetmem::Error::Os {
        what,
        source: std::io::Error::new(
            std::io::Error::from_raw_os_error(e.errno()).kind(),
            e.to_string(),
        ),
    }
}

impl CudaLauncher {
    /// A launcher with a stream of its own in `cuda`'s context: the context of the device
    /// the hetmem context was given (`CudaBuilderExt::cuda_device`, `CudaBackend::cuda`).
    ///
    /// # Errors
    /// The driver's, when it cannot make a stream.
    pub fn new(cuda: &Cuda) -> Result<CudaLauncher> {
        Ok(CudaLauncher {
            stream: Mutex::new(Stream::new(cuda)?),
            backend: None,
        })
    }

    /// A launcher for `backend`'s device that can also give kernels the addresses of pages
    /// placed remotely (`hetmem::LaunchPlacement::Remote`): system memory reached through the
    /// backend's registered backing views (`CudaBackend::register_host_memory`).
    ///
    /// # Errors
    /// The driver's, when it cannot make a stream.
    pub fn for_backend(backend: &std::sync::Arc<crate::CudaBackend>) -> Result<CudaLauncher> {
        Ok(CudaLauncher {
            stream: Mutex::new(Stream::new(backend.cuda())?),
            backend: Some(backend.clone()),
        })
    }

    /// The device address of a run: its device memory, or for a run in system memory its
    /// registered view's device address (with a launcher made by
    /// [`CudaLauncher::for_backend`] over registered memory); `None` when the device cannot
    /// reach it.
    pub fn address(&self, run: &LaunchRun) -> Option<DevicePtr> {
        match run.target {
            LaunchTarget::System { host } => self.backend.as_ref()?.host_device_ptr(host),
            LaunchTarget::Device { .. } => device_ptr(run),
        }
    }

    /// The device address of declared range `i` when all of it is one run the device can
    /// reach ([`CudaLauncher::address`]); `None` otherwise.
    pub fn range_address(&self, resident: &Resident, i: usize) -> Option<DevicePtr> {
        if resident.at_cpu_address(i) {
            // Same-address memory (`CudaBackend::same_address`): the CPU's pointer, whatever
            // the number of runs.
            let (d, _) = resident.range(i)?;
            return Some(DevicePtr(d.addr as u64));
        }
        match resident.range(i)? {
            (_, [run]) => self.address(run),
            _ => None,
        }
    }

    /// Launches `function` over the `declared` ranges on `device` (a CUDA device of the same
    /// context as this launcher's): the ranges are made resident, `args` packs the kernel's
    /// arguments from where they are ([`device_ptr`], [`contiguous`]), the kernel is launched
    /// and an event recorded after it. The returned [`Launch`] completes with that event.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and the kernel may touch only the declared
    /// ranges through the addresses `args` was given, as declared (read, write or atomic), and
    /// memory the caller owns otherwise.
    ///
    /// # Errors
    /// As `hetmem::Device::launch`; `Invalid` when `args` needs a run the device cannot
    /// address (in system memory); `Os` with the driver's error when the launch is refused.
    #[allow(unsafe_code)]
    pub unsafe fn launch<F>(
        &self,
        device: &hetmem::Device,
        function: &Function,
        config: &LaunchConfig,
        declared: &[DeclaredAccess],
        args: F,
    ) -> hetmem::Result<Launch>
    where
        F: FnOnce(&Resident, &mut KernelArgs) -> hetmem::Result<()>,
    {
        config
            .validate()
            .map_err(|e| hetmem_error("launch configuration", e))?;
        device.launch(declared, |resident| {
            let mut packed = KernelArgs::new();
            args(resident, &mut packed)?;
            let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the caller's contract covers the arguments and what the kernel touches;
            // the declared ranges stay resident and pinned until the event below completes.
            unsafe { stream.launch(function, config, &packed) }
                .map_err(|e| hetmem_error("cuLaunchKernel", e))?;
            let event = stream.fence().map_err(|e| {
                // Without its event nobody could tell when the kernel ends: wait for it here,
                // so the pins are not released under a running kernel.
                let _ = stream.synchronize();
                hetmem_error("cuEventRecord", e)
            })?;
            Ok(Box::new(Completion(event)) as Box<dyn LaunchCompletion>)
        })
    }
}
