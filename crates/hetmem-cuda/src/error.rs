//! Typed errors. A driver or NVRTC failure keeps the call, the numeric code and its name, so the
//! runtime can turn it into a device error (`docs/runtime.md` §4) and tests can match on it.

use cudarc::driver::sys::CUresult;
use cudarc::nvrtc::sys::nvrtcResult;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CUDA driver library (`libcuda.so.1`) could not be loaded.
    #[error("libcuda.so not found: {0}")]
    NoDriver(String),
    /// The NVRTC library (`libnvrtc.so.13`) could not be loaded.
    #[error("libnvrtc.so not found: {0}")]
    NoNvrtc(String),
    /// The driver loaded, but there is no device with this ordinal.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: u32,
        /// Why (device count, or the driver's answer).
        reason: String,
    },
    /// A driver call failed.
    #[error("{call} failed: {name} ({code}){}", if description.is_empty() { String::new() } else { format!(": {description}") })]
    Driver {
        /// The driver function.
        call: &'static str,
        /// The `CUresult` value.
        code: u32,
        /// The `CUresult` name, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
        /// The driver's description, and a JIT log where there is one.
        description: String,
    },
    /// An NVRTC call other than compilation failed.
    #[error("{call} failed: {name} ({code})")]
    Nvrtc {
        /// The NVRTC function.
        call: &'static str,
        /// The `nvrtcResult` value.
        code: u32,
        /// Its name.
        name: String,
    },
    /// NVRTC refused the source.
    #[error("NVRTC compilation failed:\n{log}")]
    Compile {
        /// The compiler's log.
        log: String,
    },
    /// A requested device address could not be had (the driver offered another one).
    #[error("device address {wanted:#x} is not available (the driver offered {offered:#x})")]
    AddressUnavailable {
        /// The address asked for.
        wanted: u64,
        /// What the driver returned instead (0 when it returned nothing).
        offered: u64,
    },
    /// Refused before anything reached the driver: empty, unaligned or out-of-bounds ranges,
    /// bad launch shapes, sizes the card cannot hold.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The device or driver lacks a feature.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// A system call failed.
    #[error("{call}: {source}")]
    Os {
        /// What was being done.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// `CUresult` codes after which the context is unusable (the "sticky" errors): every later
/// call in this process fails too, so the device must be treated as lost.
const CONTEXT_FATAL: &[u32] = &[
    4,   // DEINITIALIZED
    214, // ECC_UNCORRECTABLE
    220, // NVLINK_UNCORRECTABLE
    700, // ILLEGAL_ADDRESS
    709, // CONTEXT_IS_DESTROYED
    710, // ASSERT
    714, // HARDWARE_STACK_ERROR
    715, // ILLEGAL_INSTRUCTION
    716, // MISALIGNED_ADDRESS
    717, // INVALID_ADDRESS_SPACE
    718, // INVALID_PC
    719, // LAUNCH_FAILED
    999, // UNKNOWN
];

impl Error {
    /// A driver error from a `CUresult`. `description` is the driver's text, where the driver
    /// could be asked.
    pub fn driver(call: &'static str, result: CUresult, description: String) -> Error {
        Error::Driver {
            call,
            code: result as u32,
            name: format!("{result:?}"),
            description,
        }
    }

    /// An NVRTC error from an `nvrtcResult`.
    pub fn nvrtc(call: &'static str, result: nvrtcResult) -> Error {
        Error::Nvrtc {
            call,
            code: result as u32,
            name: format!("{result:?}"),
        }
    }

    /// The `CUresult` code of a driver error.
    pub fn driver_code(&self) -> Option<u32> {
        match self {
            Error::Driver { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The device ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`).
    pub fn is_out_of_memory(&self) -> bool {
        self.driver_code() == Some(CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32)
    }

    /// The context is unusable after this error (an illegal address in a kernel or a copy, a
    /// hardware error): the device is lost for this process.
    pub fn is_context_fatal(&self) -> bool {
        self.driver_code()
            .is_some_and(|c| CONTEXT_FATAL.contains(&c))
    }

    /// The errno the runtime reports for this error: ENOMEM for a full device, ENODEV for a
    /// missing driver or device, EINVAL for refused arguments, ENOTSUP, and EIO for the rest.
    pub fn errno(&self) -> i32 {
        match self {
            _ if self.is_out_of_memory() => libc::ENOMEM,
            Error::NoDriver(_) | Error::NoNvrtc(_) | Error::NoDevice { .. } => libc::ENODEV,
            Error::Invalid(_) => libc::EINVAL,
            Error::AddressUnavailable { .. } => libc::EEXIST,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Driver { .. } | Error::Nvrtc { .. } | Error::Compile { .. } => libc::EIO,
        }
    }

    pub(crate) fn errno_os(call: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
        move |e| Error::Os {
            call,
            source: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_keep_code_and_name() {
        let e = Error::driver(
            "cuMemCreate",
            CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            String::new(),
        );
        assert_eq!(e.driver_code(), Some(2));
        assert!(e.is_out_of_memory());
        assert!(!e.is_context_fatal());
        assert_eq!(e.errno(), libc::ENOMEM);
        assert_eq!(
            e.to_string(),
            "cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (2)"
        );

        let e = Error::driver(
            "cuStreamSynchronize",
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            "an illegal memory access was encountered".into(),
        );
        assert_eq!(e.driver_code(), Some(700));
        assert!(e.is_context_fatal());
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(
            e.to_string(),
            "cuStreamSynchronize failed: CUDA_ERROR_ILLEGAL_ADDRESS (700): an illegal memory \
             access was encountered"
        );

        let e = Error::driver(
            "cuMemcpyHtoDAsync_v2",
            CUresult::CUDA_ERROR_INVALID_VALUE,
            "".into(),
        );
        assert!(!e.is_context_fatal());
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn nvrtc_and_other_errors() {
        let e = Error::nvrtc("nvrtcCreateProgram", nvrtcResult::NVRTC_ERROR_OUT_OF_MEMORY);
        assert_eq!(
            e.to_string(),
            "nvrtcCreateProgram failed: NVRTC_ERROR_OUT_OF_MEMORY (1)"
        );
        assert_eq!(e.driver_code(), None);
        assert_eq!(Error::NoDriver("x".into()).errno(), libc::ENODEV);
        assert_eq!(Error::NoNvrtc("x".into()).errno(), libc::ENODEV);
        assert_eq!(Error::Invalid("x".into()).errno(), libc::EINVAL);
        assert_eq!(
            Error::AddressUnavailable {
                wanted: 1,
                offered: 2
            }
            .errno(),
            libc::EEXIST
        );
        assert!(Error::NoDriver("searched libcuda.so.1".into())
            .to_string()
            .starts_with("libcuda.so not found: "));
    }

    #[test]
    fn every_fatal_code_is_a_cuda_code() {
        // The codes in CONTEXT_FATAL are the enum's values for this CUDA version.
        let named = [
            CUresult::CUDA_ERROR_DEINITIALIZED,
            CUresult::CUDA_ERROR_ECC_UNCORRECTABLE,
            CUresult::CUDA_ERROR_NVLINK_UNCORRECTABLE,
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED,
            CUresult::CUDA_ERROR_ASSERT,
            CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR,
            CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION,
            CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
            CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE,
            CUresult::CUDA_ERROR_INVALID_PC,
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
            CUresult::CUDA_ERROR_UNKNOWN,
        ];
        let codes: Vec<u32> = named.iter().map(|r| *r as u32).collect();
        assert_eq!(codes, CONTEXT_FATAL);
    }
}
