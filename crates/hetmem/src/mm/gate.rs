//! The fork gate: held by every piece of work that reads or changes managed data or its
//! mappings, closed by fork's prepare handler so the child copies a quiescent state.

use std::cell::Cell;
use std::sync::Condvar;
use std::sync::Mutex;

thread_local! {
    /// How deep this thread is inside gates (re-entrant: a drive may drain events).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Held by every piece of work that reads or changes managed data or its mappings; closed by
/// fork's prepare handler so the child copies a quiescent state.
#[derive(Debug, Default)]
pub(crate) struct ForkGate {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

/// Inside the gate.
#[derive(Debug)]
pub(crate) struct GateGuard<'a> {
    gate: &'a ForkGate,
}

impl ForkGate {
    pub fn enter(&self) -> GateGuard<'_> {
        let depth = DEPTH.with(|d| d.get());
        if depth == 0 {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.1 {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.0 += 1;
        }
        DEPTH.with(|d| d.set(depth + 1));
        GateGuard { gate: self }
    }

    pub(crate) fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 = true;
        while st.0 > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn open(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 = false;
        self.cv.notify_all();
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| d.get()) - 1;
        DEPTH.with(|d| d.set(depth));
        if depth == 0 {
            let mut st = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 -= 1;
            if st.0 == 0 {
                self.gate.cv.notify_all();
            }
        }
    }
}
