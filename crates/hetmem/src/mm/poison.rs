//! SIGBUS for CPU pages whose data cannot be brought to the CPU, and the retry of those pages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::mm::region::Region;

/// A page that raises SIGBUS because its data could not be brought to the CPU. The marker goes
/// (so the next access faults and the copy is tried again) at `due`, or at once when a request
/// other than a CPU fault covers the page (a device access, a migration, a flush).
#[derive(Debug)]
pub(crate) struct PoisonedPage {
    pub(crate) region: std::sync::Weak<Region>,
    pub(crate) bi: usize,
    pub(crate) page: usize,
    pub(crate) due: std::time::Instant,
}

/// How long a page whose copy kept failing raises SIGBUS before its next access tries again. The
/// kernel retries an unreadable page at every access; this is the nearest user space gets, since
/// a SIGBUS marker takes no fault.
pub(crate) const POISON_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// Pages poisoned because a copy into them kept failing (`Runtime::poison_page`).
#[derive(Debug, Default)]
pub(crate) struct PoisonList {
    pages: Mutex<Vec<PoisonedPage>>,
    /// `pages` is not empty: checked without the lock on every drive.
    pending: AtomicBool,
}

impl PoisonList {
    pub(crate) fn push(&self, p: PoisonedPage) {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        self.pending.store(true, Ordering::Release);
    }

    /// Whether any page is on the list (no lock).
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Time until the next poisoned page is due for a retry.
    pub(crate) fn next_due(&self) -> Option<std::time::Duration> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let list = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        list.iter()
            .map(|p| p.due.saturating_duration_since(now))
            .min()
    }

    /// Takes the poisoned pages `pick` selects off the list.
    pub(crate) fn take(&self, pick: impl Fn(&PoisonedPage) -> bool) -> Vec<PoisonedPage> {
        let mut list = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let (picked, keep) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| pick(p));
        *list = keep;
        self.pending.store(!list.is_empty(), Ordering::Release);
        picked
    }
}
