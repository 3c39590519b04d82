//! Kernel arguments and launch shapes, packed without unsafe code.
//!
//! `cuLaunchKernel` takes an array of pointers, one per kernel parameter, each pointing at the
//! parameter's bytes; the driver reads as many bytes as the kernel's parameter has. Each
//! argument here lives in its own 16-byte-aligned slot, so every pointer is aligned for any
//! scalar, and the slots do not move once the pointer array is made.

use std::ffi::c_void;

use crate::error::{Error, Result};
use crate::span::DevicePtr;

/// One argument's storage: 16 bytes, 16-aligned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
struct Slot([u8; 16]);

mod sealed {
    pub trait Sealed {}
}

/// A value that can be passed to a kernel by value: integers, floats and device pointers.
pub trait KernelArg: sealed::Sealed + Copy {
    /// The value's bytes as the kernel reads them (native endian), at most 16.
    fn bytes(self) -> Vec<u8>;
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl KernelArg for $t {
            fn bytes(self) -> Vec<u8> {
                self.to_ne_bytes().to_vec()
            }
        }
    )*};
}
scalar_arg!(u8, i8, u16, i16, u32, i32, u64, i64, usize, isize, f32, f64);

impl sealed::Sealed for DevicePtr {}
impl KernelArg for DevicePtr {
    fn bytes(self) -> Vec<u8> {
        self.0.to_ne_bytes().to_vec()
    }
}

/// A kernel's arguments, in parameter order.
#[derive(Clone, Debug, Default)]
pub struct KernelArgs {
    slots: Vec<Slot>,
    sizes: Vec<usize>,
}

impl KernelArgs {
    /// No arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one argument. Its type must match the kernel's parameter (a `u64` for
    /// `unsigned long long`, a [`DevicePtr`] for a pointer, a `u8` for `unsigned char`).
    pub fn arg<T: KernelArg>(&mut self, value: T) -> &mut Self {
        let bytes = value.bytes();
        let mut slot = Slot::default();
        slot.0[..bytes.len()].copy_from_slice(&bytes);
        self.slots.push(slot);
        self.sizes.push(bytes.len());
        self
    }

    /// Appends a device pointer.
    pub fn ptr(&mut self, p: DevicePtr) -> &mut Self {
        self.arg(p)
    }

    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The bytes of argument `i`.
    pub fn arg_bytes(&self, i: usize) -> &[u8] {
        &self.slots[i].0[..self.sizes[i]]
    }

    /// The array `cuLaunchKernel` takes: one pointer per argument, into `self`'s slots. Valid
    /// while `self` is neither moved nor changed; the driver only reads through them.
    pub(crate) fn param_pointers(&self) -> Vec<*mut c_void> {
        self.slots
            .iter()
            .map(|s| s.0.as_ptr().cast::<c_void>().cast_mut())
            .collect()
    }
}

/// Grid and block shape of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
}

/// The most threads in a block on every CUDA device.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;

impl LaunchConfig {
    /// One thread.
    pub fn single() -> Self {
        LaunchConfig {
            grid: (1, 1, 1),
            block: (1, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A 1-D launch of `grid` blocks of `block` threads.
    pub fn linear(grid: u32, block: u32) -> Self {
        LaunchConfig {
            grid: (grid, 1, 1),
            block: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A 1-D launch covering `n` elements with one thread each, `block` threads per block,
    /// at most `max_grid` blocks (grid-stride kernels cover the rest).
    pub fn for_elements(n: u64, block: u32, max_grid: u32) -> Self {
        let block = block.clamp(1, MAX_THREADS_PER_BLOCK);
        let blocks = n
            .div_ceil(u64::from(block))
            .clamp(1, u64::from(max_grid.max(1)));
        Self::linear(blocks as u32, block)
    }

    /// Refuses shapes no device launches: a zero dimension, more than 1024 threads in a
    /// block, or a grid beyond 2^31-1 × 65535 × 65535.
    pub fn validate(&self) -> Result<()> {
        let (gx, gy, gz) = self.grid;
        let (bx, by, bz) = self.block;
        if [gx, gy, gz, bx, by, bz].contains(&0) {
            return Err(Error::Invalid(format!(
                "launch shape with a zero dimension: {self:?}"
            )));
        }
        let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
        if threads > u64::from(MAX_THREADS_PER_BLOCK) || bz > 64 {
            return Err(Error::Invalid(format!(
                "{threads} threads per block (at most 1024)"
            )));
        }
        if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
            return Err(Error::Invalid(format!("grid {:?} is too large", self.grid)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_values_sizes_and_alignment() {
        let mut a = KernelArgs::new();
        a.ptr(DevicePtr(0x7f00_1234_5678))
            .arg(42u64)
            .arg(7u8)
            .arg(-3i32)
            .arg(1.5f32)
            .arg(2.25f64)
            .arg(0xbeefu16);
        assert_eq!(a.len(), 7);
        assert_eq!(a.arg_bytes(0), &0x7f00_1234_5678u64.to_ne_bytes());
        assert_eq!(a.arg_bytes(1), &42u64.to_ne_bytes());
        assert_eq!(a.arg_bytes(2), &[7u8]);
        assert_eq!(a.arg_bytes(3), &(-3i32).to_ne_bytes());
        assert_eq!(a.arg_bytes(4), &1.5f32.to_ne_bytes());
        assert_eq!(a.arg_bytes(5), &2.25f64.to_ne_bytes());
        assert_eq!(a.arg_bytes(6), &0xbeefu16.to_ne_bytes());

        let ptrs = a.param_pointers();
        assert_eq!(ptrs.len(), 7);
        for (i, p) in ptrs.iter().enumerate() {
            assert_eq!(*p as usize % 16, 0, "argument {i} is not 16-aligned");
        }
        // Each pointer points at its own slot, in order, 16 bytes apart.
        for w in ptrs.windows(2) {
            assert_eq!(w[1] as usize - w[0] as usize, 16);
        }
        assert_eq!(ptrs[0] as usize, a.arg_bytes(0).as_ptr() as usize);
        assert_eq!(ptrs[6] as usize, a.arg_bytes(6).as_ptr() as usize);
    }

    #[test]
    fn launch_shapes() {
        assert!(LaunchConfig::single().validate().is_ok());
        assert!(LaunchConfig::linear(1024, 256).validate().is_ok());
        assert!(LaunchConfig::linear(0, 256).validate().is_err());
        assert!(LaunchConfig::linear(1, 0).validate().is_err());
        assert!(LaunchConfig::linear(1, 1025).validate().is_err());
        let c = LaunchConfig {
            grid: (1, 1, 1),
            block: (32, 32, 2),
            shared_mem_bytes: 0,
        };
        assert!(c.validate().is_err());
        let c = LaunchConfig {
            grid: (1, 65536, 1),
            block: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        assert!(c.validate().is_err());

        assert_eq!(
            LaunchConfig::for_elements(1000, 256, 4096),
            LaunchConfig::linear(4, 256)
        );
        assert_eq!(
            LaunchConfig::for_elements(0, 256, 4096),
            LaunchConfig::linear(1, 256)
        );
        assert_eq!(
            LaunchConfig::for_elements(1 << 40, 256, 1024),
            LaunchConfig::linear(1024, 256)
        );
        assert_eq!(
            LaunchConfig::for_elements(10, 4096, 8),
            LaunchConfig::linear(1, 1024)
        );
    }
}
