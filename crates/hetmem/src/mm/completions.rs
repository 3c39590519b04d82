//! Requests that finished in another thread's drive.
//!
//! A drive releases the block's engine lock while its copies run (`Runtime::drive`). Meanwhile
//! another thread may drive the block; a request whose pages those copies keep busy stays
//! queued in the engine, and the engine finishes it later, in whichever drive feeds the
//! completion that unblocks it. That drive posts the result here, and the request's own thread,
//! which found no result in its own drive, waits for it here.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use hetmem_proto::{ReqId, RequestError};

/// Results of requests, posted by the drive that finished them, taken by their owners.
#[derive(Debug, Default)]
pub(crate) struct Completions {
    state: Mutex<Board>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Board {
    done: HashMap<ReqId, Result<(), RequestError>>,
    /// Bumped whenever a drive that released its lock ends, for `wait_change`.
    generation: u64,
}

impl Completions {
    /// Posts results of requests other threads own, and wakes everyone waiting.
    pub fn post(&self, results: impl IntoIterator<Item = (ReqId, Result<(), RequestError>)>) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.done.extend(results);
        b.generation += 1;
        self.cv.notify_all();
    }

    /// Waits for request `id`'s result. The request must be queued in some block's engine
    /// behind copies in flight: the drive that runs them finishes it and posts the result.
    pub fn wait(&self, id: ReqId) -> Result<(), RequestError> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = b.done.remove(&id) {
                return r;
            }
            b = self.cv.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The generation now, for `wait_change`.
    pub fn generation(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Waits until some drive that released its lock has ended since `seen`.
    pub fn wait_change(&self, seen: u64) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while b.generation == seen {
            b = self.cv.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_posted_result_reaches_its_owner_whenever_it_asks() {
        let c = Arc::new(Completions::default());
        // Posted before the owner waits.
        c.post([(ReqId(1), Ok(()))]);
        assert_eq!(c.wait(ReqId(1)), Ok(()));
        // Posted while the owner waits.
        let c2 = c.clone();
        let owner = std::thread::spawn(move || c2.wait(ReqId(2)));
        c.post([(ReqId(3), Err(RequestError::NoDevice))]);
        c.post([(ReqId(2), Err(RequestError::NoMapping))]);
        assert_eq!(owner.join().unwrap(), Err(RequestError::NoMapping));
        // The other result stays for its own owner.
        assert_eq!(c.wait(ReqId(3)), Err(RequestError::NoDevice));
    }

    #[test]
    fn wait_change_returns_after_a_post() {
        let c = Arc::new(Completions::default());
        let seen = c.generation();
        let c2 = c.clone();
        let waiter = std::thread::spawn(move || c2.wait_change(seen));
        c.post([]);
        waiter.join().unwrap();
        assert_eq!(c.generation(), seen + 1);
    }
}
