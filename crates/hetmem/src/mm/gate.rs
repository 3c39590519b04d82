//! The fork gate: held by every piece of work that reads or changes managed data or its
//! mappings, closed by fork's prepare handler so the child copies a quiescent state.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

thread_local! {
    /// How deep this thread is inside gates (re-entrant: a drive may drain events).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Held by every piece of work that reads or changes managed data or its mappings; closed by
/// fork's prepare handler so the child copies a quiescent state.
///
/// Entering and leaving are one atomic operation each while the gate is open (every CPU fault
/// passes it several times, and a mutex plus a condition variable here cost futex calls on the
/// fault path); the mutex and the condition variable serve only while fork closes it.
#[derive(Debug, Default)]
pub(crate) struct ForkGate {
    /// Threads inside, plus `CLOSED` while fork holds it closed.
    state: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// The bit of `ForkGate::state` set while the gate is closed.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Inside the gate.
#[derive(Debug)]
pub(crate) struct GateGuard<'a> {
    gate: &'a ForkGate,
}

impl ForkGate {
    pub fn enter(&self) -> GateGuard<'_> {
        let depth = DEPTH.with(|d| d.get());
        if depth == 0 {
            let mut s = self.state.load(Ordering::Acquire);
            loop {
                if s & CLOSED != 0 {
                    // Closed: wait for `open`, under the lock it notifies under.
                    let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    while self.state.load(Ordering::Acquire) & CLOSED != 0 {
                        g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    drop(g);
                    s = self.state.load(Ordering::Acquire);
                    continue;
                }
                match self.state.compare_exchange_weak(
                    s,
                    s + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => s = now,
                }
            }
        }
        DEPTH.with(|d| d.set(depth + 1));
        GateGuard { gate: self }
    }

    /// Closes the gate and waits until nobody is inside.
    pub(crate) fn close(&self) {
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        while self.state.load(Ordering::Acquire) & !CLOSED > 0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn open(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.state.fetch_and(!CLOSED, Ordering::AcqRel);
        self.cv.notify_all();
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| d.get()) - 1;
        DEPTH.with(|d| d.set(depth));
        if depth == 0 {
            let before = self.gate.state.fetch_sub(1, Ordering::AcqRel);
            if before == CLOSED | 1 {
                // The last one out of a closed gate: fork waits for it. Notified under the
                // lock, so `close` cannot miss it between its check and its wait.
                let _g = self.gate.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.gate.cv.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn close_waits_for_those_inside_and_keeps_newcomers_out_until_open() {
        let gate = Arc::new(ForkGate::default());
        let inside = gate.enter();
        let closed = Arc::new(AtomicBool::new(false));
        let closer = {
            let (gate, closed) = (gate.clone(), closed.clone());
            std::thread::spawn(move || {
                gate.close();
                closed.store(true, Ordering::SeqCst);
            })
        };
        // The closer cannot finish while we are inside.
        while gate.state.load(Ordering::SeqCst) & CLOSED == 0 {
            std::thread::yield_now();
        }
        assert!(!closed.load(Ordering::SeqCst));
        drop(inside);
        closer.join().unwrap();
        assert!(closed.load(Ordering::SeqCst));
        // A newcomer waits until the gate opens again.
        let entered = Arc::new(AtomicBool::new(false));
        let newcomer = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = gate.enter();
                entered.store(true, Ordering::SeqCst);
            })
        };
        assert!(!entered.load(Ordering::SeqCst));
        gate.open();
        newcomer.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(gate.state.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_gate_is_reentrant_on_one_thread() {
        let gate = ForkGate::default();
        let a = gate.enter();
        let b = gate.enter();
        assert_eq!(gate.state.load(Ordering::SeqCst), 1);
        drop(b);
        drop(a);
        assert_eq!(gate.state.load(Ordering::SeqCst), 0);
    }
}
