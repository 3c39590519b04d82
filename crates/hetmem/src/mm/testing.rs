//! Test hooks: fault injection for the tests of no-silent-loss (docs/runtime.md §7).

use std::sync::atomic::Ordering;

use hetmem_proto::Mem;

use crate::mm::runtime::Runtime;

impl Runtime {
    pub(crate) fn take_injected_failure(&self, dst: Mem, src: hetmem_proto::Source) -> bool {
        let dev = match (dst, src) {
            (Mem::Device(d), _) | (_, hetmem_proto::Source::Mem(Mem::Device(d))) => d,
            _ => return false,
        };
        self.devices[dev.index()]
            .fail_transfers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}
