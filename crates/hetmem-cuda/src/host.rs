//! Host memory the device can reach: memfd views, their registration with the driver, and
//! driver-allocated pinned buffers.
//!
//! All three are *DMA memory*: a copy may write them while the CPU reads them, as another
//! process could write a shared mapping. So this crate never makes a Rust reference into them;
//! the CPU side reads and writes through [`HostMem::write`], [`HostMem::read`] and
//! [`HostMem::fill`], which copy through raw pointers (bytes being written by an in-flight
//! copy may come out torn), or through the raw pointer. Owners wait for the context before
//! they unpin or free, so no copy outlives the memory it touches.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::sys;
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::context::{check, Cuda};
use crate::error::{Error, Result};
use crate::span::{DevicePtr, DeviceSpan, HostSpan};
use crate::util::{check_range, page_size};

/// CPU access to a range of DMA memory.
pub trait HostMem {
    /// First byte.
    fn as_ptr(&self) -> *mut u8;
    /// Bytes.
    fn len(&self) -> usize;

    /// Whether the range is empty (never, for this crate's types).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` to `offset`.
    fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        check_range("host write", offset, src.len(), self.len())?;
        // SAFETY: [offset, offset + src.len()) lies inside the live mapping (checked above;
        // implementors keep it mapped while `self` lives); `src` is a separate Rust slice, so
        // the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        check_range("host read", offset, dst.len(), self.len())?;
        // SAFETY: as in `write`, the source range is inside the live mapping and `dst` is a
        // separate, exclusively borrowed slice.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `value`.
    fn fill(&self, offset: usize, len: usize, value: u8) -> Result<()> {
        check_range("host fill", offset, len, self.len())?;
        // SAFETY: the range is inside the live mapping (checked above).
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), value, len) };
        Ok(())
    }

    /// Reads `len` bytes from `offset` into a new vector.
    fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v)?;
        Ok(v)
    }
}

/// A shared mapping of a memfd: the runtime's backing (DMA) view of system memory, or the
/// CPU's view of it.
pub struct MemfdView {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    offset: u64,
}

// SAFETY: the struct owns a shared mapping and a descriptor; neither is bound to a thread,
// and CPU access goes through raw-pointer copies (see the module comment).
unsafe impl Send for MemfdView {}
// SAFETY: as above.
unsafe impl Sync for MemfdView {}

impl fmt::Debug for MemfdView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MemfdView({:p}, {:#x} bytes at file offset {:#x})",
            self.ptr, self.len, self.offset
        )
    }
}

impl MemfdView {
    /// A new memfd of `len` bytes (a multiple of the page size), its pages allocated, mapped
    /// shared and populated.
    pub fn create(name: &str, len: usize) -> Result<MemfdView> {
        if len == 0 || len % page_size() != 0 {
            return Err(Error::Invalid(format!(
                "memfd of {len:#x} bytes: not a page multiple"
            )));
        }
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)
            .map_err(Error::errno_os("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(Error::errno_os("ftruncate"))?;
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, len as u64)
            .map_err(Error::errno_os("fallocate"))?;
        Self::map(fd, 0, len)
    }

    /// Another shared mapping of `[offset, offset + len)` of the same file.
    pub fn another_view(&self, offset: u64, len: usize) -> Result<MemfdView> {
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)
            .map_err(Error::errno_os("F_DUPFD_CLOEXEC"))?;
        Self::map(fd, offset, len)
    }

    fn map(fd: OwnedFd, offset: u64, len: usize) -> Result<MemfdView> {
        // SAFETY: a fresh mapping at an address the kernel picks; it replaces nothing.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                &fd,
                offset,
            )
        }
        .map_err(Error::errno_os("mmap memfd"))?;
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| Error::Invalid("mmap returned null".into()))?;
        Ok(MemfdView {
            fd,
            ptr,
            len,
            offset,
        })
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// File offset of the first byte of this view.
    pub fn file_offset(&self) -> u64 {
        self.offset
    }
}

impl HostMem for MemfdView {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MemfdView {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping this view made; nothing else refers to it (a
        // HostRegistration of it holds an Arc, so it is unregistered first).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Host memory pinned with `cuMemHostRegister` (portable and device-mapped): copies to and
/// from it run at the PCIe limit, and kernels can address it through [`Self::device_span`].
pub struct HostRegistration {
    cuda: Cuda,
    ptr: NonNull<u8>,
    len: usize,
    device_ptr: DevicePtr,
    _view: Option<Arc<MemfdView>>,
}

// SAFETY: the registration is a process-wide driver object (PORTABLE), the memory is DMA
// memory accessed through raw pointers only; nothing is thread-bound.
unsafe impl Send for HostRegistration {}
// SAFETY: as above.
unsafe impl Sync for HostRegistration {}

impl fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostRegistration({:p}, {:#x} bytes, device {:?})",
            self.ptr, self.len, self.device_ptr
        )
    }
}

/// `CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP`.
pub const REGISTER_FLAGS: u32 =
    sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;

/// Checks a range for registration: non-null, page-aligned, a whole number of pages.
fn check_register_range(ptr: *const u8, len: usize, page: usize) -> Result<()> {
    if ptr.is_null() || (ptr as usize) % page != 0 || len == 0 || len % page != 0 {
        return Err(Error::Invalid(format!(
            "host registration of {ptr:p} + {len:#x}: must be page-aligned whole pages"
        )));
    }
    Ok(())
}

impl HostRegistration {
    /// Registers a whole memfd view; the registration keeps the view alive.
    pub fn of_view(cuda: &Cuda, view: Arc<MemfdView>) -> Result<HostRegistration> {
        // SAFETY: the view stays mapped while the registration holds its Arc, and it is DMA
        // memory by construction (accessed only through raw-pointer copies).
        let mut r = unsafe { Self::new(cuda, view.as_ptr(), view.len())? };
        r._view = Some(view);
        Ok(r)
    }

    /// Registers `[ptr, ptr + len)`, page-aligned, which must be mapped and populated (over
    /// an unpopulated userfaultfd range the driver fails at once, per the H100 probe).
    ///
    /// # Safety
    ///
    /// The range must stay mapped, and not be remapped, until the registration is dropped;
    /// and it must be treated as DMA memory: no Rust reference into it may live while a copy
    /// or kernel touches it.
    pub unsafe fn new(cuda: &Cuda, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
        check_register_range(ptr, len, page_size())?;
        let ptr = NonNull::new(ptr).expect("checked non-null");
        cuda.bind()?;
        // SAFETY: the caller keeps the range mapped for the registration's life; the driver
        // pins its pages.
        check("cuMemHostRegister_v2", unsafe {
            sys::cuMemHostRegister_v2(ptr.as_ptr().cast::<c_void>(), len, REGISTER_FLAGS)
        })?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: the pointer was just registered with DEVICEMAP; valid out-pointer.
        let got = check("cuMemHostGetDevicePointer_v2", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr.as_ptr().cast::<c_void>(), 0)
        });
        if let Err(e) = got {
            // SAFETY: registered just above, and nothing has used it.
            let _ = unsafe { sys::cuMemHostUnregister(ptr.as_ptr().cast::<c_void>()) };
            return Err(e);
        }
        Ok(HostRegistration {
            cuda: cuda.clone(),
            ptr,
            len,
            device_ptr: DevicePtr(dptr),
            _view: None,
        })
    }

    /// `[offset, offset + len)` as a copy endpoint; checked.
    pub fn span(&self, offset: usize, len: usize) -> Result<HostSpan<'_>> {
        HostSpan::within(self.ptr.as_ptr(), self.len, offset, len)
    }

    /// The whole range as a copy endpoint.
    pub fn whole(&self) -> HostSpan<'_> {
        self.span(0, self.len)
            .expect("a registration is never empty")
    }

    /// The device's address of the first byte (equal to the host address where the device
    /// reports `host_pointer_for_registered_mem`).
    pub fn device_ptr(&self) -> DevicePtr {
        self.device_ptr
    }

    /// `[offset, offset + len)` as the device addresses it (zero copy over PCIe); checked.
    pub fn device_span(&self, offset: usize, len: usize) -> Result<DeviceSpan<'_>> {
        DeviceSpan::within(self.device_ptr, self.len, offset, len)
    }
}

impl HostMem for HostRegistration {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.cuda.bind().is_err() {
            return;
        }
        // No copy may still be writing these pages once they are unpinned.
        let _ = self.cuda.synchronize();
        // SAFETY: registered in `new` and not unregistered since.
        let _ = unsafe { sys::cuMemHostUnregister(self.ptr.as_ptr().cast::<c_void>()) };
    }
}

/// Pinned host memory from `cuMemHostAlloc` (portable and device-mapped): the staging buffer
/// of the pinned-copy measurements.
pub struct PinnedBuffer {
    cuda: Cuda,
    ptr: NonNull<u8>,
    len: usize,
    device_ptr: DevicePtr,
}

// SAFETY: driver-owned pinned memory accessed through raw pointers only; not thread-bound.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedBuffer({:p}, {:#x} bytes)", self.ptr, self.len)
    }
}

impl PinnedBuffer {
    /// `len` bytes of pinned, device-mapped host memory.
    pub fn new(cuda: &Cuda, len: usize) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(Error::Invalid("empty pinned buffer".into()));
        }
        cuda.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: valid out-pointer; the driver allocates `len` bytes.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut p, len, flags)
        })?;
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| Error::Invalid("cuMemHostAlloc returned null".into()))?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: `p` came from cuMemHostAlloc with DEVICEMAP; valid out-pointer.
        let got = check("cuMemHostGetDevicePointer_v2", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dptr, p, 0)
        });
        let buffer = PinnedBuffer {
            cuda: cuda.clone(),
            ptr,
            len,
            device_ptr: DevicePtr(dptr),
        };
        got?;
        Ok(buffer)
    }

    /// `[offset, offset + len)` as a copy endpoint; checked.
    pub fn span(&self, offset: usize, len: usize) -> Result<HostSpan<'_>> {
        HostSpan::within(self.ptr.as_ptr(), self.len, offset, len)
    }

    /// The whole buffer as a copy endpoint.
    pub fn whole(&self) -> HostSpan<'_> {
        self.span(0, self.len)
            .expect("a pinned buffer is never empty")
    }

    /// `[offset, offset + len)` as the device addresses it; checked.
    pub fn device_span(&self, offset: usize, len: usize) -> Result<DeviceSpan<'_>> {
        DeviceSpan::within(self.device_ptr, self.len, offset, len)
    }
}

impl HostMem for PinnedBuffer {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.cuda.bind().is_err() {
            return;
        }
        let _ = self.cuda.synchronize();
        // SAFETY: allocated by cuMemHostAlloc in `new`, freed once, no copy in flight.
        let _ = unsafe { sys::cuMemFreeHost(self.ptr.as_ptr().cast::<c_void>()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_ranges_are_checked() {
        let page = 4096;
        let p = 0x7f00_0000_0000usize as *const u8;
        assert!(check_register_range(p, page, page).is_ok());
        assert!(check_register_range(p, 64 * page, page).is_ok());
        assert!(check_register_range(std::ptr::null(), page, page).is_err());
        assert!(check_register_range(p.wrapping_add(8), page, page).is_err());
        assert!(check_register_range(p, page + 1, page).is_err());
        assert!(check_register_range(p, 0, page).is_err());
        assert_eq!(REGISTER_FLAGS, 3);
    }

    /// A memfd view needs no driver: create, write, read back through a second view.
    #[test]
    fn memfd_views_share_the_file() {
        let a = MemfdView::create("hetmem-cuda-test", 2 << 20).unwrap();
        let b = a.another_view(4096, 8192).unwrap();
        a.write(4096 + 10, b"hello").unwrap();
        assert_eq!(b.to_vec(10, 5).unwrap(), b"hello");
        b.fill(0, 8192, 7).unwrap();
        assert_eq!(a.to_vec(4096, 3).unwrap(), [7, 7, 7]);
        assert!(matches!(b.write(8190, b"xyz"), Err(Error::Invalid(_))));
        assert!(matches!(
            MemfdView::create("x", 100),
            Err(Error::Invalid(_))
        ));
        assert_eq!(b.file_offset(), 4096);
    }
}
