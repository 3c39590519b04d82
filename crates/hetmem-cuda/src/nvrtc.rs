//! Compiling CUDA C at run time with NVRTC (`libnvrtc.so.13`), to PTX or to a CUBIN.
//!
//! NVRTC is optional: without it every call here is [`Error::NoNvrtc`], and modules still load
//! from PTX or CUBIN. No driver or GPU is needed to compile.
//!
//! PTX from an NVRTC newer than the driver is refused by the driver
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`; NVRTC 13.0 emits PTX ISA 9.0, 13.5 emits 9.5). A CUBIN
//! for the device's exact `sm_XY` avoids the JIT and that question.

#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

use cudarc::nvrtc::sys::{self, nvrtcResult};

use crate::error::{Error, Result};

static PRESENT: OnceLock<bool> = OnceLock::new();

/// Whether `libnvrtc` loads; [`Error::NoNvrtc`] if not. Decided once per process.
pub fn available() -> Result<()> {
    // SAFETY: is_culib_present only tries dlopen on candidate names and closes them.
    if *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) {
        Ok(())
    } else {
        let names = cudarc::get_lib_name_candidates("nvrtc");
        Err(Error::NoNvrtc(format!(
            "neither libnvrtc.so.13 nor libnvrtc.so loads ({} names tried); put the CUDA \
             toolkit's lib directory on LD_LIBRARY_PATH",
            names.len()
        )))
    }
}

fn check(call: &'static str, r: nvrtcResult) -> Result<()> {
    if r == nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::nvrtc(call, r))
    }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; valid out-pointers.
    check("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// What to compile to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// PTX for a virtual architecture `compute_XY` (JIT-compiled by the driver at load).
    Ptx {
        /// Compute capability (major, minor).
        compute: (u32, u32),
    },
    /// A CUBIN for a real architecture `sm_XY` (no JIT; runs only on that architecture).
    Cubin {
        /// Compute capability (major, minor).
        sm: (u32, u32),
    },
}

impl Target {
    /// The `--gpu-architecture` option for this target.
    pub fn arch_option(&self) -> String {
        match *self {
            Target::Ptx { compute: (ma, mi) } => format!("--gpu-architecture=compute_{ma}{mi}"),
            Target::Cubin { sm: (ma, mi) } => format!("--gpu-architecture=sm_{ma}{mi}"),
        }
    }
}

/// What NVRTC produced.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text, for [`Target::Ptx`].
    pub ptx: Option<String>,
    /// CUBIN image, for [`Target::Cubin`].
    pub cubin: Option<Vec<u8>>,
    /// The compiler's log (warnings), possibly empty.
    pub log: String,
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

impl Program {
    fn log(&self) -> String {
        let mut n = 0usize;
        // SAFETY: live program; valid out-pointer.
        if unsafe { sys::nvrtcGetProgramLogSize(self.0, &mut n) } != nvrtcResult::NVRTC_SUCCESS
            || n == 0
        {
            return String::new();
        }
        let mut buf = vec![0u8; n];
        // SAFETY: the buffer holds the `n` bytes NVRTC said the log has.
        if unsafe { sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast::<c_char>()) }
            != nvrtcResult::NVRTC_SUCCESS
        {
            return String::new();
        }
        c_string_bytes(&buf)
    }

    fn output(
        &self,
        size_call: &'static str,
        size: unsafe fn(sys::nvrtcProgram, *mut usize) -> nvrtcResult,
        get_call: &'static str,
        get: unsafe fn(sys::nvrtcProgram, *mut c_char) -> nvrtcResult,
    ) -> Result<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: live, compiled program; valid out-pointer.
        check(size_call, unsafe { size(self.0, &mut n) })?;
        let mut buf = vec![0u8; n];
        // SAFETY: the buffer holds the `n` bytes NVRTC reported.
        check(get_call, unsafe {
            get(self.0, buf.as_mut_ptr().cast::<c_char>())
        })?;
        Ok(buf)
    }
}

/// Text of a NUL-terminated buffer.
fn c_string_bytes(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Compiles `source` (named `name` in messages) for `target`, with extra NVRTC `options`.
/// A source error is [`Error::Compile`] with the log.
pub fn compile(source: &str, name: &str, target: Target, options: &[&str]) -> Result<Compiled> {
    available()?;
    let src =
        CString::new(source).map_err(|_| Error::Invalid("source contains a NUL byte".into()))?;
    let cname =
        CString::new(name).map_err(|_| Error::Invalid("name contains a NUL byte".into()))?;
    let mut opts: Vec<CString> = vec![CString::new(target.arch_option()).expect("no NUL")];
    for o in options {
        opts.push(
            CString::new(*o).map_err(|_| Error::Invalid("option contains a NUL byte".into()))?,
        );
    }
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NUL-terminated source and name; no headers; valid out-pointer.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    })?;
    let program = Program(raw);
    // SAFETY: live program; `opt_ptrs` holds that many NUL-terminated strings that outlive the
    // call.
    let r =
        unsafe { sys::nvrtcCompileProgram(program.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program.log();
    if r == nvrtcResult::NVRTC_ERROR_COMPILATION {
        return Err(Error::Compile { log });
    }
    check("nvrtcCompileProgram", r)?;
    match target {
        Target::Ptx { .. } => {
            let ptx = program.output(
                "nvrtcGetPTXSize",
                sys::nvrtcGetPTXSize,
                "nvrtcGetPTX",
                sys::nvrtcGetPTX,
            )?;
            Ok(Compiled {
                ptx: Some(c_string_bytes(&ptx)),
                cubin: None,
                log,
            })
        }
        Target::Cubin { .. } => {
            let cubin = program.output(
                "nvrtcGetCUBINSize",
                sys::nvrtcGetCUBINSize,
                "nvrtcGetCUBIN",
                sys::nvrtcGetCUBIN,
            )?;
            Ok(Compiled {
                ptx: None,
                cubin: Some(cubin),
                log,
            })
        }
    }
}

/// Compiles to PTX for `compute_XY`.
pub fn compile_ptx(source: &str, compute: (u32, u32)) -> Result<String> {
    let c = compile(source, "source.cu", Target::Ptx { compute }, &[])?;
    Ok(c.ptx.expect("a PTX target gives PTX"))
}

/// Compiles to a CUBIN for `sm_XY`.
pub fn compile_cubin(source: &str, sm: (u32, u32)) -> Result<Vec<u8>> {
    let c = compile(source, "source.cu", Target::Cubin { sm }, &[])?;
    Ok(c.cubin.expect("a CUBIN target gives a CUBIN"))
}

/// The error string NVRTC gives for `r` (for messages; needs the library).
pub fn error_string(r: nvrtcResult) -> Result<String> {
    available()?;
    // SAFETY: the library is present; NVRTC returns a static NUL-terminated string.
    let s = unsafe { sys::nvrtcGetErrorString(r) };
    if s.is_null() {
        return Ok(String::new());
    }
    // SAFETY: non-null, static and NUL-terminated.
    Ok(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_options() {
        assert_eq!(
            Target::Ptx { compute: (7, 5) }.arch_option(),
            "--gpu-architecture=compute_75"
        );
        assert_eq!(
            Target::Cubin { sm: (9, 0) }.arch_option(),
            "--gpu-architecture=sm_90"
        );
        assert_eq!(
            Target::Cubin { sm: (10, 0) }.arch_option(),
            "--gpu-architecture=sm_100"
        );
        assert_eq!(c_string_bytes(b"abc\0def"), "abc");
        assert_eq!(c_string_bytes(b"abc"), "abc");
    }

    /// Without NVRTC, compiling is a typed error; with it, a trivial kernel compiles.
    #[test]
    fn missing_nvrtc_is_a_typed_error() {
        let src = "extern \"C\" __global__ void k(int* p) { *p = 1; }";
        match compile_ptx(src, (7, 5)) {
            Ok(ptx) => assert!(ptx.contains(".entry k")),
            Err(Error::NoNvrtc(why)) => assert!(why.contains("libnvrtc"), "{why}"),
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
