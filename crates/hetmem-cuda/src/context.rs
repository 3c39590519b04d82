//! Loading the driver, the device and its primary context.
//!
//! cudarc loads `libcuda` lazily and panics when it is missing, so nothing here touches a
//! driver function before [`driver`] has checked that the library loads; every public way into
//! the driver goes through [`Cuda::open`], which calls it.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr};
use std::fmt;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};

use crate::error::{Error, Result};

/// Whether `libcuda` loaded and `cuInit` succeeded, decided once per process.
static DRIVER: OnceLock<std::result::Result<(), LoadFailure>> = OnceLock::new();

#[derive(Clone, Debug)]
enum LoadFailure {
    NoLibrary(String),
    Init(CUresult, String),
}

/// Loads `libcuda` and calls `cuInit(0)`, once per process. Without the library this is
/// [`Error::NoDriver`]; nothing panics.
pub fn driver() -> Result<()> {
    let state = DRIVER.get_or_init(|| {
        // SAFETY: is_culib_present only tries dlopen on the candidate names and closes them.
        if !unsafe { sys::is_culib_present() } {
            let names = cudarc::get_lib_name_candidates("cuda");
            return Err(LoadFailure::NoLibrary(format!(
                "neither libcuda.so.1 nor libcuda.so loads ({} names tried); is the NVIDIA \
                 driver installed, and on the loader path?",
                names.len()
            )));
        }
        // SAFETY: the library is present (checked above), so the symbol loads; cuInit takes
        // no pointers.
        let r = unsafe { sys::cuInit(0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(LoadFailure::Init(r, describe_loaded(r)));
        }
        Ok(())
    });
    match state {
        Ok(()) => Ok(()),
        Err(LoadFailure::NoLibrary(why)) => Err(Error::NoDriver(why.clone())),
        Err(LoadFailure::Init(r, d)) if *r == CUresult::CUDA_ERROR_NO_DEVICE => {
            Err(Error::NoDevice {
                ordinal: 0,
                reason: format!("cuInit: {d}"),
            })
        }
        Err(LoadFailure::Init(r, d)) => Err(Error::driver("cuInit", *r, d.clone())),
    }
}

/// The driver's description of `r`, or nothing when the driver library has not been found
/// to load (so that building an error never panics).
fn describe(r: CUresult) -> String {
    match DRIVER.get() {
        Some(Ok(())) | Some(Err(LoadFailure::Init(..))) => describe_loaded(r),
        _ => String::new(),
    }
}

/// The driver's description of `r`; the library must be present.
fn describe_loaded(r: CUresult) -> String {
    let mut s: *const c_char = std::ptr::null();
    // SAFETY: the caller knows the library is present; `s` receives a static string or stays
    // null.
    let rr = unsafe { sys::cuGetErrorString(r, &mut s) };
    if rr != CUresult::CUDA_SUCCESS || s.is_null() {
        return String::new();
    }
    // SAFETY: the driver returned a NUL-terminated static string.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// `Ok` for `CUDA_SUCCESS`, else a typed [`Error::Driver`] naming `call`.
pub(crate) fn check(call: &'static str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::driver(call, r, describe(r)))
    }
}

/// The driver's version, e.g. 13000 for CUDA 13.0.
pub fn driver_version() -> Result<i32> {
    driver()?;
    let mut v: c_int = 0;
    // SAFETY: the driver is loaded; `v` is a valid out-pointer.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

/// Number of CUDA devices.
pub fn device_count() -> Result<u32> {
    driver()?;
    let mut n: c_int = 0;
    // SAFETY: the driver is loaded and initialised; `n` is a valid out-pointer.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n.max(0) as u32)
}

/// What the device is and can do, read at [`Cuda::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: u32,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Free device memory at open, in bytes.
    pub free_memory: usize,
    /// Driver API version, e.g. 13000.
    pub driver_version: i32,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// PCI bus id.
    pub pci_bus_id: u32,
    /// `cuMemHostRegister` is supported.
    pub host_register_supported: bool,
    /// The virtual memory management API (`cuMemCreate`, `cuMemMap`) is supported.
    pub vmm_supported: bool,
    /// Unified virtual addressing.
    pub unified_addressing: bool,
    /// `cuMemAllocManaged` is supported.
    pub managed_memory: bool,
    /// CPU and GPU may access managed memory concurrently.
    pub concurrent_managed_access: bool,
    /// The GPU can access pageable host memory (HMM or ATS).
    pub pageable_memory_access: bool,
    /// The device pointer of registered host memory equals its host pointer.
    pub host_pointer_for_registered_mem: bool,
    /// Minimum VMM allocation granularity in bytes (0 without VMM).
    pub vmm_granularity: usize,
    /// Recommended VMM allocation granularity in bytes (0 without VMM).
    pub vmm_granularity_recommended: usize,
}

impl DeviceInfo {
    /// Compute capability as "9.0".
    pub fn compute_capability_string(&self) -> String {
        format!(
            "{}.{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// An open device: its primary context, retained for as long as any clone lives. Cheap to
/// clone; every object made from it keeps a clone, so the context outlives them.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

struct Inner {
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    info: DeviceInfo,
}

// SAFETY: a CUcontext is a handle the driver lets any thread use (after making it current,
// which every call here does through `bind`); the struct holds nothing thread-bound.
unsafe impl Send for Inner {}
// SAFETY: as above; the driver serialises what needs it.
unsafe impl Sync for Inner {}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.inner.info.ordinal)
            .field("name", &self.inner.info.name)
            .finish()
    }
}

impl Cuda {
    /// Loads the driver (typed error without it), initialises it, retains device `ordinal`'s
    /// primary context, makes it current on this thread and reads [`DeviceInfo`].
    pub fn open(ordinal: u32) -> Result<Cuda> {
        driver().map_err(|e| match e {
            Error::NoDevice { reason, .. } => Error::NoDevice { ordinal, reason },
            e => e,
        })?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice {
                ordinal,
                reason: format!("{count} devices"),
            });
        }
        let mut device: sys::CUdevice = 0;
        // SAFETY: driver initialised; `device` is a valid out-pointer; ordinal < count.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut device, ordinal as c_int)
        })?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `device` is valid; `ctx` is a valid out-pointer.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, device)
        })?;
        // From here the retain is released by Inner's Drop, also on the error paths below.
        let mut inner = Inner {
            device,
            ctx,
            info: DeviceInfo::empty(ordinal),
        };
        bind_ctx(ctx)?;
        inner.info = read_info(ordinal, device)?;
        Ok(Cuda {
            inner: Arc::new(inner),
        })
    }

    /// What the device is and can do.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.inner.info.ordinal
    }

    /// Makes this device's primary context current on the calling thread (a no-op when it
    /// already is). Every method of this crate calls it first, so callers need it only for
    /// their own raw driver calls.
    pub fn bind(&self) -> Result<()> {
        bind_ctx(self.inner.ctx)
    }

    /// Free and total device memory now, in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: context current; valid out-pointers.
        check("cuMemGetInfo_v2", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// Waits for all work in the context.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: context current.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// The raw `CUdevice`.
    pub fn raw_device(&self) -> sys::CUdevice {
        self.inner.device
    }

    /// The raw primary context.
    pub fn raw_context(&self) -> sys::CUcontext {
        self.inner.ctx
    }

    /// Ordinal as the driver's `c_int` (for `CUmemLocation`).
    pub(crate) fn location_id(&self) -> c_int {
        self.inner.info.ordinal as c_int
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: this Inner retained the primary context of `device` exactly once.
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

fn bind_ctx(ctx: sys::CUcontext) -> Result<()> {
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: driver initialised (a context exists); valid out-pointer.
    check("cuCtxGetCurrent", unsafe {
        sys::cuCtxGetCurrent(&mut current)
    })?;
    if current != ctx {
        // SAFETY: `ctx` is a retained primary context.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
    }
    Ok(())
}

fn attribute(device: sys::CUdevice, attr: CUdevice_attribute) -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: valid device and out-pointer.
    check("cuDeviceGetAttribute", unsafe {
        sys::cuDeviceGetAttribute(&mut v, attr, device)
    })?;
    Ok(v)
}

impl DeviceInfo {
    fn empty(ordinal: u32) -> Self {
        DeviceInfo {
            ordinal,
            name: String::new(),
            total_memory: 0,
            free_memory: 0,
            driver_version: 0,
            compute_capability: (0, 0),
            multiprocessors: 0,
            pci_bus_id: 0,
            host_register_supported: false,
            vmm_supported: false,
            unified_addressing: false,
            managed_memory: false,
            concurrent_managed_access: false,
            pageable_memory_access: false,
            host_pointer_for_registered_mem: false,
            vmm_granularity: 0,
            vmm_granularity_recommended: 0,
        }
    }
}

/// Reads the device's info; its context must be current.
fn read_info(ordinal: u32, device: sys::CUdevice) -> Result<DeviceInfo> {
    use CUdevice_attribute as A;
    let mut name = [0 as c_char; 256];
    // SAFETY: the buffer holds 256 bytes and the driver writes at most that, NUL-terminated.
    check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(name.as_mut_ptr(), 256, device)
    })?;
    // SAFETY: NUL-terminated by the driver (and the buffer was zeroed).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut total = 0usize;
    // SAFETY: valid out-pointer and device.
    check("cuDeviceTotalMem_v2", unsafe {
        sys::cuDeviceTotalMem_v2(&mut total, device)
    })?;
    let (mut free, mut total_now) = (0usize, 0usize);
    // SAFETY: the context is current (the caller bound it); valid out-pointers.
    check("cuMemGetInfo_v2", unsafe {
        sys::cuMemGetInfo_v2(&mut free, &mut total_now)
    })?;
    let flag = |a| attribute(device, a).map(|v| v != 0);
    let vmm_supported = flag(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED)?;
    let (g_min, g_rec) = if vmm_supported {
        (
            crate::vmm::granularity_of(ordinal as c_int, false)?,
            crate::vmm::granularity_of(ordinal as c_int, true)?,
        )
    } else {
        (0, 0)
    };
    Ok(DeviceInfo {
        ordinal,
        name,
        total_memory: total,
        free_memory: free,
        driver_version: driver_version()?,
        compute_capability: (
            attribute(device, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attribute(device, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        ),
        multiprocessors: attribute(device, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        pci_bus_id: attribute(device, A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)? as u32,
        host_register_supported: flag(A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED)?,
        vmm_supported,
        unified_addressing: flag(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)?,
        managed_memory: flag(A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)?,
        concurrent_managed_access: flag(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)?,
        pageable_memory_access: flag(A::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)?,
        host_pointer_for_registered_mem: flag(
            A::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
        )?,
        vmm_granularity: g_min,
        vmm_granularity_recommended: g_rec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver (this crate's CI), opening is a typed error, never a
    /// panic; with it, device 0 opens.
    #[test]
    fn open_without_a_driver_is_a_typed_error() {
        match Cuda::open(0) {
            Ok(c) => assert!(!c.info().name.is_empty()),
            Err(Error::NoDriver(why)) => assert!(why.contains("libcuda.so"), "{why}"),
            Err(Error::NoDevice { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
        // Asking twice gives the same answer (the load is decided once).
        assert_eq!(
            Cuda::open(0).is_ok(),
            driver().is_ok() && device_count().unwrap_or(0) > 0
        );
        if driver().is_err() {
            assert!(matches!(driver_version(), Err(Error::NoDriver(_))));
            assert!(matches!(device_count(), Err(Error::NoDriver(_))));
        }
    }
}
