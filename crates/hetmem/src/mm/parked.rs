//! The mappings with CPU faults parked at their lease breaks' gates (`mm/lease_break.rs`), for
//! the fault service, which serves those faults at their break's deadline if the break is not
//! over by then (`Runtime::serve`, `Runtime::release_expired_parked`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::mm::lease_break::ParkedFault;
use crate::mm::region::Region;

/// The mappings with CPU faults parked at their break gates, for the fault service: it serves
/// them at their break's deadline if the break is not over by then (`Runtime::serve`).
#[derive(Debug, Default)]
pub(crate) struct ParkedGates {
    any: AtomicBool,
    regions: Mutex<Vec<Arc<Region>>>,
}

impl ParkedGates {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Region>>> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `region` has a fault parked at its gate.
    pub(crate) fn add(&self, region: &Arc<Region>) {
        let mut v = self.lock();
        if !v.iter().any(|r| Arc::ptr_eq(r, region)) {
            v.push(region.clone());
        }
        self.any.store(true, Ordering::Release);
    }

    /// How long until the earliest deadline of a gate with parked faults; `None` if none
    /// (one load while nothing is parked anywhere).
    pub(crate) fn next_due(&self) -> Option<std::time::Duration> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        self.lock()
            .iter()
            .filter_map(|r| r.file.as_ref()?.gate.parked_until())
            .map(|d| d.saturating_duration_since(now))
            .min()
    }

    /// The parked faults whose break is past its deadline; forgets the mappings with nothing
    /// parked any more (their break ended, or their faults are taken now).
    pub(crate) fn take_expired(&self) -> Vec<ParkedFault> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut v = self.lock();
        let mut out = Vec::new();
        v.retain(|r| {
            let Some(f) = &r.file else {
                return false;
            };
            out.extend(f.gate.take_expired());
            f.gate.parked_until().is_some()
        });
        self.any.store(!v.is_empty(), Ordering::Release);
        out
    }
}
