//! Test hooks: fault injection, for the tests of no silent loss (`docs/runtime.md` §7) and of
//! file errors (`docs/file-contract.md`). Nothing here acts unless a test arms it through the
//! public hooks in `api/testing.rs`; unarmed, each check is one atomic load.
//!
//! One struct per owner: the runtime holds [`TransferFaults`], each file backing
//! [`FileFaults`].

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use hetmem_proto::{DeviceId, Mem, Source};

/// Consumes one armed failure from `n`: whether there was one.
fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Test hook: transfers into or out of a device that are to fail, as a DMA error would
/// (`Device::inject_transfer_failures`). Owned by the runtime.
#[derive(Debug)]
pub(crate) struct TransferFaults {
    /// Per device: how many of the next transfers that touch it fail.
    remaining: Box<[AtomicU32]>,
}

impl TransferFaults {
    /// None armed, for `devices` devices.
    pub fn new(devices: usize) -> Self {
        Self {
            remaining: (0..devices).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The next `n` transfers into or out of `dev` fail.
    pub fn arm(&self, dev: DeviceId, n: u32) {
        self.remaining[dev.index()].store(n, Ordering::Release);
    }

    /// Whether the transfer to `dst` from `src` is to fail (the destination's device first, if
    /// both are devices); it counts as one of the armed failures.
    pub fn take(&self, dst: Mem, src: Source) -> bool {
        let dev = match (dst, src) {
            (Mem::Device(d), _) | (_, Source::Mem(Mem::Device(d))) => d,
            _ => return false,
        };
        take(&self.remaining[dev.index()])
    }
}

/// Test hook: reads of the file, writebacks to it and `fdatasync`s of it that are to fail with
/// an errno, as on a failing disk (`FileMapping::inject_read_failures`,
/// `inject_writeback_failures`, `inject_sync_failures`). Owned by the file backing.
#[derive(Debug, Default)]
pub(crate) struct FileFaults {
    read: Armed,
    writeback: Armed,
    sync: Armed,
}

/// How many of the next calls of one kind fail, and with which errno.
#[derive(Debug)]
struct Armed {
    n: AtomicU32,
    errno: AtomicI32,
}

impl Default for Armed {
    fn default() -> Self {
        Self {
            n: AtomicU32::new(0),
            errno: AtomicI32::new(libc::EIO),
        }
    }
}

impl Armed {
    fn arm(&self, n: u32, errno: i32) {
        self.errno.store(errno, Ordering::Release);
        self.n.store(n, Ordering::Release);
    }

    fn take(&self) -> Option<i32> {
        take(&self.n).then(|| self.errno.load(Ordering::Acquire))
    }
}

impl FileFaults {
    /// The next `n` reads of the file fail with `errno`.
    pub fn arm_reads(&self, n: u32, errno: i32) {
        self.read.arm(n, errno);
    }

    /// The next `n` writebacks fail with `errno`.
    pub fn arm_writebacks(&self, n: u32, errno: i32) {
        self.writeback.arm(n, errno);
    }

    /// The next `n` `fdatasync`s fail with `errno` (after the real one ran: the error is the
    /// kernel's writeback's, the data may or may not be on the disk).
    pub fn arm_syncs(&self, n: u32, errno: i32) {
        self.sync.arm(n, errno);
    }

    /// The errno this read is to fail with, if one is armed (and it counts).
    pub fn take_read(&self) -> Option<i32> {
        self.read.take()
    }

    /// The errno this writeback is to fail with, if one is armed (and it counts).
    pub fn take_writeback(&self) -> Option<i32> {
        self.writeback.take()
    }

    /// The errno this `fdatasync` is to fail with, if one is armed (and it counts).
    pub fn take_sync(&self) -> Option<i32> {
        self.sync.take()
    }
}
