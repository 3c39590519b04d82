//! Device capacity, shared by all blocks. The engine reserves a frame before it binds one and
//! gives it back when it frees one, so the count never exceeds capacity.

use crate::ids::{DeviceId, MAX_DEVICES};

/// Frame accounting across blocks. The runtime implements it with atomics so that blocks lock
/// separately; [`FrameCounts`] is the plain version for tests and the model checker.
pub trait FrameBudget {
    /// Reserve `pages` frames of `dev`, all or nothing.
    fn try_reserve(&mut self, dev: DeviceId, pages: u32) -> bool;
    /// Return `pages` frames of `dev`.
    fn release(&mut self, dev: DeviceId, pages: u32);
}

/// Capacity and use per device.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FrameCounts {
    /// Frames per device.
    pub capacity: [u32; MAX_DEVICES],
    /// Frames reserved per device.
    pub used: [u32; MAX_DEVICES],
}

impl FrameCounts {
    /// Every device with `capacity[i]` frames, none used.
    pub fn new(capacity: &[u32]) -> Self {
        let mut c = Self::default();
        for (dst, &src) in c.capacity.iter_mut().zip(capacity) {
            *dst = src;
        }
        c
    }
}

impl FrameBudget for FrameCounts {
    fn try_reserve(&mut self, dev: DeviceId, pages: u32) -> bool {
        let i = dev.index();
        let ok = self.used[i]
            .checked_add(pages)
            .is_some_and(|n| n <= self.capacity[i]);
        if ok {
            self.used[i] += pages;
        }
        ok
    }

    fn release(&mut self, dev: DeviceId, pages: u32) {
        let i = dev.index();
        debug_assert!(self.used[i] >= pages, "released more frames than reserved");
        self.used[i] = self.used[i].saturating_sub(pages);
    }
}
