//! Device capacity shared by every block, with atomics so blocks lock separately.

use std::sync::atomic::{AtomicU32, Ordering};

use hetmem_proto::{DeviceId, FrameBudget, MAX_DEVICES};

/// Frames per device: capacity and reservations.
#[derive(Debug, Default)]
pub(crate) struct AtomicBudget {
    capacity: [u32; MAX_DEVICES],
    used: [AtomicU32; MAX_DEVICES],
}

impl AtomicBudget {
    pub fn new(capacity: &[u32]) -> Self {
        let mut b = Self::default();
        for (dst, &c) in b.capacity.iter_mut().zip(capacity) {
            *dst = c;
        }
        b
    }

    pub fn used(&self, dev: DeviceId) -> u32 {
        self.used[dev.index()].load(Ordering::Relaxed)
    }

    pub fn capacity(&self, dev: DeviceId) -> u32 {
        self.capacity[dev.index()]
    }
}

/// The `&mut dyn FrameBudget` the engine wants, over the shared atomics.
pub(crate) struct BudgetRef<'a>(pub &'a AtomicBudget);

impl FrameBudget for BudgetRef<'_> {
    fn try_reserve(&mut self, dev: DeviceId, pages: u32) -> bool {
        let i = dev.index();
        let cap = self.0.capacity[i];
        self.0.used[i]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(pages).filter(|&n| n <= cap)
            })
            .is_ok()
    }

    fn release(&mut self, dev: DeviceId, pages: u32) {
        let prev = self.0.used[dev.index()].fetch_sub(pages, Ordering::AcqRel);
        debug_assert!(prev >= pages, "released more frames than reserved");
    }
}
