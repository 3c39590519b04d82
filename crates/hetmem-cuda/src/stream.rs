//! Streams, asynchronous copies and fills, kernel launches, and events to learn when they are
//! done.
//!
//! Everything enqueued returns at once; an [`Event`] recorded after it completes when it has.
//! The runtime's asynchronous completion is built on [`Event::is_complete`] (a poll that never
//! blocks) and [`Event::wait`]. A failed copy or kernel shows up as an error from the event or
//! the stream; errors for which [`Error::is_context_fatal`] holds mean the device is lost.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};

use crate::args::{KernelArgs, LaunchConfig};
use crate::context::{check, Cuda};
use crate::error::{Error, Result};
use crate::module::Function;
use crate::span::{DeviceSpan, HostSpan};

/// A non-blocking stream (it does not synchronise with the legacy default stream).
pub struct Stream {
    cuda: Cuda,
    raw: sys::CUstream,
}

// SAFETY: CUDA streams may be used from any thread; calls bind the context first.
unsafe impl Send for Stream {}
// SAFETY: as above; the driver serialises enqueues on one stream.
unsafe impl Sync for Stream {}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stream({:p})", self.raw)
    }
}

fn same_len(a: usize, b: usize) -> Result<usize> {
    if a != b {
        return Err(Error::Invalid(format!(
            "copy between ranges of {a:#x} and {b:#x} bytes"
        )));
    }
    Ok(a)
}

impl Stream {
    /// A new stream (`CU_STREAM_NON_BLOCKING`).
    pub fn new(cuda: &Cuda) -> Result<Stream> {
        cuda.bind()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; context current.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream {
            cuda: cuda.clone(),
            raw,
        })
    }

    /// The device.
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }

    /// The raw `CUstream`.
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Enqueues a host-to-device copy of `src` (pinned) into `dst`; the lengths must match.
    pub fn copy_h2d(&self, dst: DeviceSpan<'_>, src: HostSpan<'_>) -> Result<()> {
        let n = same_len(dst.len(), src.len())?;
        self.cuda.bind()?;
        // SAFETY: `src` is pinned host memory whose owner waits for the context before it
        // unpins it; `dst` is device-addressable memory of at least `n` bytes (its owner's
        // check, or the caller's promise for a raw span).
        check("cuMemcpyHtoDAsync_v2", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.ptr().0, src.as_ptr().cast::<c_void>(), n, self.raw)
        })
    }

    /// Enqueues a device-to-host copy of `src` into `dst` (pinned); the lengths must match.
    pub fn copy_d2h(&self, dst: HostSpan<'_>, src: DeviceSpan<'_>) -> Result<()> {
        let n = same_len(dst.len(), src.len())?;
        self.cuda.bind()?;
        // SAFETY: as in copy_h2d; `dst` is pinned DMA memory that outlives the copy.
        check("cuMemcpyDtoHAsync_v2", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.as_ptr().cast::<c_void>(), src.ptr().0, n, self.raw)
        })
    }

    /// Enqueues a device-to-device copy; the lengths must match.
    pub fn copy_d2d(&self, dst: DeviceSpan<'_>, src: DeviceSpan<'_>) -> Result<()> {
        let n = same_len(dst.len(), src.len())?;
        self.cuda.bind()?;
        // SAFETY: both are device-addressable ranges of `n` bytes.
        check("cuMemcpyDtoDAsync_v2", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst.ptr().0, src.ptr().0, n, self.raw)
        })
    }

    /// Enqueues setting every byte of `dst` to `value` (the runtime's zero fill).
    pub fn memset_d8(&self, dst: DeviceSpan<'_>, value: u8) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: `dst` is device-addressable memory of `dst.len()` bytes.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(dst.ptr().0, value, dst.len(), self.raw)
        })
    }

    /// Enqueues a copy of `n` bytes from host memory at `src` (pinned or pageable) to device
    /// address `dst`, without bounds checks: the CUDA backend's copies, whose ranges the
    /// runtime vouches for.
    ///
    /// # Safety
    ///
    /// `[src, src + n)` must stay mapped, and nobody may write it, until the work enqueued on
    /// this stream so far has completed; `[dst, dst + n)` must be device memory the caller owns.
    pub(crate) unsafe fn copy_h2d_raw(&self, dst: u64, src: *const u8, n: usize) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: the caller's contract: both ranges are valid and theirs until the stream's
        // work completes (a pageable source is staged by the driver before the call returns).
        check("cuMemcpyHtoDAsync_v2", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.cast::<c_void>(), n, self.raw)
        })
    }

    /// Enqueues a copy of `n` bytes from device address `src` to host memory at `dst` (pinned
    /// or pageable), without bounds checks.
    ///
    /// # Safety
    ///
    /// `[dst, dst + n)` must stay mapped, and nobody may touch it, until the work enqueued on
    /// this stream so far has completed; `[src, src + n)` must be device memory the caller owns.
    pub(crate) unsafe fn copy_d2h_raw(&self, dst: *mut u8, src: u64, n: usize) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: the caller's contract, as in copy_h2d_raw.
        check("cuMemcpyDtoHAsync_v2", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.cast::<c_void>(), src, n, self.raw)
        })
    }

    /// Enqueues a device-to-device copy of `n` bytes, without bounds checks.
    ///
    /// # Safety
    ///
    /// Both ranges must be device memory the caller owns, and stay mapped until the work
    /// enqueued on this stream so far has completed.
    pub(crate) unsafe fn copy_d2d_raw(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: the caller's contract.
        check("cuMemcpyDtoDAsync_v2", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, n, self.raw)
        })
    }

    /// Enqueues setting `n` bytes at device address `dst` to `value`, without bounds checks.
    ///
    /// # Safety
    ///
    /// `[dst, dst + n)` must be device memory the caller owns, mapped until the work enqueued
    /// on this stream so far has completed.
    pub(crate) unsafe fn memset_d8_raw(&self, dst: u64, value: u8, n: usize) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: the caller's contract.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(dst, value, n, self.raw)
        })
    }

    /// Copies `src` (any host memory, pageable too) into `dst` and waits for the stream.
    pub fn copy_h2d_blocking(&self, dst: DeviceSpan<'_>, src: &[u8]) -> Result<()> {
        let n = same_len(dst.len(), src.len())?;
        self.cuda.bind()?;
        // SAFETY: `src` is borrowed until the stream is synchronised below, so the copy never
        // reads it after the borrow ends (pinned or pageable alike).
        check("cuMemcpyHtoDAsync_v2", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.ptr().0, src.as_ptr().cast::<c_void>(), n, self.raw)
        })?;
        self.synchronize()
    }

    /// Copies `src` into `dst` (any host memory, pageable too) and waits for the stream.
    pub fn copy_d2h_blocking(&self, dst: &mut [u8], src: DeviceSpan<'_>) -> Result<()> {
        let n = same_len(dst.len(), src.len())?;
        self.cuda.bind()?;
        // SAFETY: `dst` is exclusively borrowed until the stream is synchronised below.
        let r = check("cuMemcpyDtoHAsync_v2", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast::<c_void>(), src.ptr().0, n, self.raw)
        });
        // Even when the enqueue failed, nothing may still write `dst` after we return.
        let s = self.synchronize();
        r.and(s)
    }

    /// Launches `function` on this stream.
    ///
    /// # Safety
    ///
    /// `args` must match the kernel's parameters in number, order and type, and the kernel
    /// may only touch memory that the caller owns and keeps alive until the launch completes
    /// (device memory, or pinned host memory that is treated as DMA memory).
    pub unsafe fn launch(
        &self,
        function: &Function,
        config: &LaunchConfig,
        args: &KernelArgs,
    ) -> Result<()> {
        config.validate()?;
        self.cuda.bind()?;
        let mut params = args.param_pointers();
        let p = if params.is_empty() {
            std::ptr::null_mut()
        } else {
            params.as_mut_ptr()
        };
        // SAFETY: the function belongs to a module loaded in this context and kept alive by
        // `function`; `params` points at `args`' slots, which outlive this call (the driver
        // copies the values at launch); the caller vouches for the arguments' types.
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                function.raw(),
                config.grid.0,
                config.grid.1,
                config.grid.2,
                config.block.0,
                config.block.1,
                config.block.2,
                config.shared_mem_bytes,
                self.raw,
                p,
                std::ptr::null_mut(),
            )
        })
    }

    /// Records a new event after everything enqueued so far: a fence.
    pub fn fence(&self) -> Result<Event> {
        let e = Event::new(&self.cuda, false)?;
        e.record(self)?;
        Ok(e)
    }

    /// Makes later work on this stream wait for `event` (no host wait).
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: both handles are live in this context.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(self.raw, event.raw, 0)
        })
    }

    /// Waits until everything enqueued has completed.
    pub fn synchronize(&self) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: live stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }

    /// Whether everything enqueued has completed (never blocks).
    pub fn is_idle(&self) -> Result<bool> {
        self.cuda.bind()?;
        // SAFETY: live stream.
        ready("cuStreamQuery", unsafe { sys::cuStreamQuery(self.raw) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once; the driver finishes queued work first.
            let _ = unsafe { sys::cuStreamDestroy_v2(self.raw) };
        }
    }
}

/// `Ok(true)` for success, `Ok(false)` for `CUDA_ERROR_NOT_READY`, else the error.
fn ready(call: &'static str, r: CUresult) -> Result<bool> {
    if r == CUresult::CUDA_ERROR_NOT_READY {
        Ok(false)
    } else {
        check(call, r).map(|()| true)
    }
}

/// A CUDA event: a point in a stream's work.
pub struct Event {
    cuda: Cuda,
    raw: sys::CUevent,
    timing: bool,
}

// SAFETY: events may be queried and synchronised from any thread; calls bind the context.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Event({:p})", self.raw)
    }
}

impl Event {
    /// A new event; with `timing`, it can measure elapsed time ([`Event::elapsed_since`]),
    /// which makes recording it a little dearer.
    pub fn new(cuda: &Cuda, timing: bool) -> Result<Event> {
        cuda.bind()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
        };
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; context current.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut raw, flags)
        })?;
        Ok(Event {
            cuda: cuda.clone(),
            raw,
            timing,
        })
    }

    /// Records the event after the work enqueued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: both handles are live in this context.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.raw, stream.raw)
        })
    }

    /// Whether the work before the event has completed (never blocks). An event never
    /// recorded counts as complete.
    pub fn is_complete(&self) -> Result<bool> {
        self.cuda.bind()?;
        // SAFETY: live event.
        ready("cuEventQuery", unsafe { sys::cuEventQuery(self.raw) })
    }

    /// Blocks until the work before the event has completed.
    pub fn wait(&self) -> Result<()> {
        self.cuda.bind()?;
        // SAFETY: live event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.raw)
        })
    }

    /// Polls until complete or until `timeout` passes (then `Ok(false)`), sleeping between
    /// polls from 1 µs up to 1 ms.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(1);
        loop {
            if self.is_complete()? {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Milliseconds of device time from `start` to this event; both must be timing events and
    /// complete.
    pub fn elapsed_since(&self, start: &Event) -> Result<f32> {
        if !self.timing || !start.timing {
            return Err(Error::Invalid(
                "elapsed time needs two timing events".into(),
            ));
        }
        self.cuda.bind()?;
        let mut ms = 0f32;
        // SAFETY: valid out-pointer; both events live in this context.
        check("cuEventElapsedTime_v2", unsafe {
            sys::cuEventElapsedTime_v2(&mut ms, start.raw, self.raw)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once.
            let _ = unsafe { sys::cuEventDestroy_v2(self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_is_not_an_error() {
        // `ready` only consults the driver for a description on real errors; with no driver
        // loaded the description is simply empty.
        assert!(!ready("cuEventQuery", CUresult::CUDA_ERROR_NOT_READY).unwrap());
        assert!(same_len(4, 5).is_err());
        assert_eq!(same_len(4096, 4096).unwrap(), 4096);
    }
}
