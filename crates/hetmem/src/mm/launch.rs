//! Launches with declared access, the runtime's side: a launch pins the device page-table
//! entries of its declared pages, and every change of a pinned entry waits for the launch's
//! completion, as an MMU notifier's invalidation waits for the device to stop using the pages
//! (`docs/runtime.md` §4a).
//!
//! A GPU without kernel HMM cannot fault: what it touches must be resident and stay so while it
//! runs. The launch makes its ranges resident through the protocol's device faults, then pins
//! them (`Runtime::pin_launch`) all at once, under the read locks of their page tables, after
//! checking that every entry still satisfies the declared access. LaunchPins are added only under a
//! page table's read lock and checked under its write lock, which every entry change takes
//! (`Runtime::dev_write_unpinned`): so a change either happens before the pin, and the check
//! sees it and the launch faults again, or after it, and waits for the launch.
//!
//! A pinned launch is *pending* until its submission returns, then *submitted* until its
//! completion reports, then *done*. Waiting for a pending launch is safe because submission
//! takes no lock of the runtime's: the submit callback must not touch managed memory through
//! the CPU (documented on `Device::launch`).

use std::sync::{Arc, Condvar, Mutex};

use hetmem_proto::{OpError, PageMask, PageRun, BLOCK_WORDS};

/// How a submitted launch completes: the backend's completion event (a CUDA event recorded
/// after the kernel on its stream), or a thread running a simulated kernel.
pub trait LaunchCompletion: Send {
    /// Waits for the launch to finish; its error, if it failed.
    fn wait(&mut self) -> Result<(), OpError>;

    /// Whether it has finished, without waiting.
    fn is_done(&mut self) -> bool;
}

enum State {
    /// Pinned, being submitted.
    Pending,
    /// Running.
    Submitted(Box<dyn LaunchCompletion>),
    /// Finished (or never started: submission failed).
    Done(Result<(), OpError>),
}

/// One launch's completion as its pins see it. Clones of the `Arc` sit in the pin lists of
/// every block it pinned.
pub(crate) struct LaunchShared {
    /// Held while a waiter waits on the completion, so the others wait behind it.
    state: Mutex<State>,
    /// Signalled when the launch leaves `Pending`.
    submitted: Condvar,
}

impl std::fmt::Debug for LaunchShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchShared")
            .field("done", &self.finished())
            .finish()
    }
}

impl LaunchShared {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Pending),
            submitted: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submission returned: the launch runs until `completion` says otherwise.
    pub fn submitted(&self, completion: Box<dyn LaunchCompletion>) {
        *self.lock() = State::Submitted(completion);
        self.submitted.notify_all();
    }

    /// Submission failed: nothing runs, the pins release at once.
    pub fn never_ran(&self) {
        *self.lock() = State::Done(Ok(()));
        self.submitted.notify_all();
    }

    /// Waits until the launch has finished; its result.
    pub fn wait(&self) -> Result<(), OpError> {
        let mut s = self.lock();
        loop {
            match &mut *s {
                State::Pending => {
                    s = self.submitted.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                State::Submitted(c) => {
                    // Under the lock: other waiters queue behind this one.
                    let r = c.wait();
                    *s = State::Done(r);
                    return r;
                }
                State::Done(r) => return *r,
            }
        }
    }

    /// Whether the launch has finished, asking its completion without waiting. A launch
    /// another thread is waiting for counts as running.
    pub fn is_done(&self) -> bool {
        let Ok(mut s) = self.state.try_lock() else {
            return false;
        };
        match &mut *s {
            State::Pending => false,
            State::Submitted(c) => {
                if c.is_done() {
                    let r = c.wait();
                    *s = State::Done(r);
                    true
                } else {
                    false
                }
            }
            State::Done(_) => true,
        }
    }

    /// Whether the launch is known to have finished, asking nothing.
    pub fn finished(&self) -> bool {
        self.state
            .try_lock()
            .is_ok_and(|s| matches!(*s, State::Done(_)))
    }
}

/// One launch's pin on one device page table of one block.
#[derive(Debug, Clone)]
pub(crate) struct LaunchPin {
    pub launch: Arc<LaunchShared>,
    /// The pinned pages.
    pub pages: PageMask<BLOCK_WORDS>,
    /// The launch writes them: a downgrade to read-only must wait too.
    pub write: bool,
}

/// The pins on one device page table of one block.
#[derive(Debug, Default)]
pub(crate) struct LaunchPins(Mutex<Vec<LaunchPin>>);

/// What a page-table change does to pinned pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The device loses the pages, or their target changes: every launch using them waits.
    Unmap,
    /// The pages become read-only: launches that write them wait.
    Protect,
}

impl LaunchPins {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LaunchPin>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, pin: LaunchPin) {
        let mut v = self.lock();
        v.retain(|p| !p.launch.finished());
        v.push(pin);
    }

    pub fn remove(&self, launch: &Arc<LaunchShared>) {
        self.lock().retain(|p| !Arc::ptr_eq(&p.launch, launch));
    }

    /// The running launches a `change` of `run` must wait for; drops finished pins.
    pub fn blocking(&self, run: PageRun, change: Change) -> Vec<Arc<LaunchShared>> {
        let mut v = self.lock();
        if v.is_empty() {
            return Vec::new();
        }
        v.retain(|p| !p.launch.is_done());
        let pages = PageMask::<BLOCK_WORDS>::from_run(run);
        v.iter()
            .filter(|p| !(p.pages & pages).is_empty() && (change == Change::Unmap || p.write))
            .map(|p| p.launch.clone())
            .collect()
    }

    /// Whether a running launch pins any page: eviction passes the block over.
    pub fn any_running(&self) -> bool {
        let mut v = self.lock();
        v.retain(|p| !p.launch.finished());
        !v.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flag(Arc<std::sync::atomic::AtomicBool>, Result<(), OpError>);

    impl LaunchCompletion for Flag {
        fn wait(&mut self) -> Result<(), OpError> {
            while !self.0.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::yield_now();
            }
            self.1
        }
        fn is_done(&mut self) -> bool {
            self.0.load(std::sync::atomic::Ordering::Acquire)
        }
    }

    fn run(start: usize, len: usize) -> PageRun {
        PageRun::new(start, len, hetmem_proto::PAGES_PER_BLOCK).unwrap()
    }

    #[test]
    fn a_change_waits_only_for_launches_it_conflicts_with() {
        let pins = LaunchPins::default();
        let (reader, writer) = (LaunchShared::new(), LaunchShared::new());
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for l in [&reader, &writer] {
            l.submitted(Box::new(Flag(flag.clone(), Ok(()))));
        }
        pins.add(LaunchPin {
            launch: reader.clone(),
            pages: PageMask::from_run(run(0, 4)),
            write: false,
        });
        pins.add(LaunchPin {
            launch: writer.clone(),
            pages: PageMask::from_run(run(8, 4)),
            write: true,
        });
        assert!(pins.blocking(run(4, 4), Change::Unmap).is_empty());
        assert!(pins.blocking(run(0, 2), Change::Protect).is_empty());
        assert_eq!(pins.blocking(run(0, 2), Change::Unmap).len(), 1);
        assert_eq!(pins.blocking(run(10, 1), Change::Protect).len(), 1);
        assert!(pins.any_running());
        flag.store(true, std::sync::atomic::Ordering::Release);
        assert!(pins.blocking(run(0, 16), Change::Unmap).is_empty());
        assert!(!pins.any_running());
    }

    #[test]
    fn a_pending_launch_is_waited_for_until_submitted_and_done() {
        let l = LaunchShared::new();
        assert!(!l.is_done());
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || l.wait())
        };
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        l.submitted(Box::new(Flag(flag.clone(), Err(OpError::Device))));
        flag.store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(waiter.join().unwrap(), Err(OpError::Device));
        assert!(l.finished());
        assert_eq!(l.wait(), Err(OpError::Device));
    }
}
