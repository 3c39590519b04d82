//! Test hooks: the public fault-injection calls (their state is `mm::testing`'s). Ordinary
//! public methods, so tests use them with a plain `cargo test`; nothing else calls them.

use crate::api::device::Device;
use crate::api::file::FileMapping;

impl Device {
    /// Makes the next `n` transfers into or out of this device fail (a DMA error), to test
    /// that data stays where it was.
    pub fn inject_transfer_failures(&self, n: u32) {
        self.inner().transfer_faults.arm(self.id(), n);
    }
}

impl FileMapping {
    /// Test hook: the next `n` reads of the file fail with `errno`, as a failing disk would.
    pub fn inject_read_failures(&self, n: u32, errno: i32) {
        self.backing().faults.arm_reads(n, errno);
    }

    /// Test hook: the next `n` writebacks fail with `errno` (EIO, ENOSPC or EDQUOT), as a
    /// failing disk would.
    pub fn inject_writeback_failures(&self, n: u32, errno: i32) {
        self.backing().faults.arm_writebacks(n, errno);
    }

    /// Test hook: the next `n` `fdatasync`s of [`FileMapping::sync`] fail with `errno` (EIO,
    /// ENOSPC or EDQUOT) after the real one ran, as when the kernel's own writeback of the page
    /// cache fails.
    pub fn inject_sync_failures(&self, n: u32, errno: i32) {
        self.backing().faults.arm_syncs(n, errno);
    }
}
