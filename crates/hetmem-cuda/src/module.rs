//! Loaded code: modules from PTX (JIT-compiled by the driver) or CUBIN, and their kernels.

#![allow(unsafe_code)]

use std::ffi::{c_void, CString};
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUjit_option};

use crate::context::{check, Cuda};
use crate::error::{Error, Result};

/// A loaded module. Cheap to clone; its kernels keep it loaded.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ModuleInner>,
}

struct ModuleInner {
    cuda: Cuda,
    raw: sys::CUmodule,
}

// SAFETY: a CUmodule may be used from any thread of the process once the context is current,
// which every call here makes sure of.
unsafe impl Send for ModuleInner {}
// SAFETY: as above; lookups do not mutate the module.
unsafe impl Sync for ModuleInner {}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Module({:p})", self.inner.raw)
    }
}

/// Bytes of JIT error log kept from a failed load.
const LOG_BYTES: usize = 16 << 10;

impl Module {
    /// Loads PTX text; the driver compiles it for the device. A PTX ISA newer than the driver
    /// is `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`; the JIT log is in the error's description.
    pub fn from_ptx(cuda: &Cuda, ptx: &str) -> Result<Module> {
        let text =
            CString::new(ptx).map_err(|_| Error::Invalid("PTX contains a NUL byte".into()))?;
        Self::load(cuda, text.as_bytes_with_nul())
    }

    /// Loads a CUBIN (or fatbin) image built for this device's architecture.
    pub fn from_cubin(cuda: &Cuda, image: &[u8]) -> Result<Module> {
        if !is_binary_image(image) {
            return Err(Error::Invalid(
                "a CUBIN is an ELF image (or a fatbin); this is neither".into(),
            ));
        }
        Self::load(cuda, image)
    }

    fn load(cuda: &Cuda, image: &[u8]) -> Result<Module> {
        cuda.bind()?;
        // The driver reads the image in place: give it an 8-byte-aligned copy.
        let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
        let bytes: &mut [u8] = bytemuck_bytes(&mut aligned);
        bytes[..image.len()].copy_from_slice(image);
        let mut log = vec![0u8; LOG_BYTES];
        let mut options = [
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut values: [*mut c_void; 2] = [log.as_mut_ptr().cast(), LOG_BYTES as *mut c_void];
        let mut raw: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: the image is a complete PTX (NUL-terminated) or ELF image in an aligned
        // buffer that lives through the call; the log buffer holds LOG_BYTES bytes, as the
        // size option says; valid out-pointer.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut raw,
                bytes.as_ptr().cast::<c_void>(),
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if let Err(e) = check("cuModuleLoadDataEx", r) {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let jit = String::from_utf8_lossy(&log[..end]).trim().to_string();
            return Err(match e {
                Error::Driver {
                    call,
                    code,
                    name,
                    description,
                } if !jit.is_empty() => Error::Driver {
                    call,
                    code,
                    name,
                    description: format!("{description}; JIT log: {jit}"),
                },
                e => e,
            });
        }
        Ok(Module {
            inner: Arc::new(ModuleInner {
                cuda: cuda.clone(),
                raw,
            }),
        })
    }

    /// The kernel named `name` (an `extern "C"` name, or a mangled one).
    pub fn function(&self, name: &str) -> Result<Function> {
        let c = CString::new(name)
            .map_err(|_| Error::Invalid("kernel name contains a NUL byte".into()))?;
        self.inner.cuda.bind()?;
        let mut raw: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: live module; NUL-terminated name; valid out-pointer.
        check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(&mut raw, self.inner.raw, c.as_ptr())
        })?;
        Ok(Function {
            module: self.clone(),
            raw,
            name: name.to_string(),
        })
    }
}

impl Drop for ModuleInner {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            // SAFETY: loaded in `load`, unloaded once, after every Function (they hold the Arc).
            let _ = unsafe { sys::cuModuleUnload(self.raw) };
        }
    }
}

/// A kernel of a loaded module; keeps the module loaded.
#[derive(Clone)]
pub struct Function {
    module: Module,
    raw: sys::CUfunction,
    name: String,
}

// SAFETY: a CUfunction is usable from any thread once the context is current.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Function({})", self.name)
    }
}

impl Function {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module it belongs to.
    pub fn module(&self) -> &Module {
        &self.module
    }

    pub(crate) fn raw(&self) -> sys::CUfunction {
        self.raw
    }
}

/// Whether `image` starts like an ELF (CUBIN) or a fatbin.
fn is_binary_image(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF") || image.starts_with(&0xBA55_ED50u32.to_le_bytes())
}

/// The bytes of a `u64` buffer, without unsafe code elsewhere.
fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: u64 has no padding and every byte pattern is a valid u8; the slice covers
    // exactly the words' memory and borrows them mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_images_are_recognised() {
        assert!(is_binary_image(b"\x7fELF\x02\x01"));
        assert!(is_binary_image(&[0x50, 0xed, 0x55, 0xba, 1, 0]));
        assert!(!is_binary_image(b".version 9.0"));
        assert!(!is_binary_image(b""));
    }

    #[test]
    fn aligned_copies() {
        let mut w = vec![0u64; 3];
        let b = bytemuck_bytes(&mut w);
        assert_eq!(b.len(), 24);
        assert_eq!(b.as_ptr() as usize % 8, 0);
        b[8] = 1;
        assert_eq!(w[1].to_ne_bytes()[0], 1);
    }
}
