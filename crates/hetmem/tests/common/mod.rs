//! Hang detection shared by the integration tests: a test that never finishes must fail, not
//! stall CI.

#![allow(dead_code)] // each test binary uses part of this

pub mod fs;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// `HETMEM_TEST_TIMEOUT_S`, or `default_s`.
pub fn test_timeout(default_s: u64) -> Duration {
    let s = std::env::var("HETMEM_TEST_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_s);
    Duration::from_secs(s)
}

/// `watchdog`'s panic payload when the scenario's thread hangs (and still runs): a type of its
/// own, so that no other panic (a hung child process, say) can pass for it.
#[derive(Debug)]
pub struct Hung(pub String);

/// Runs a scenario on its own thread and fails the test if it does not finish within
/// `test_timeout(default_s)`.
pub fn watchdog<F>(name: &'static str, default_s: u64, f: F) -> anyhow::Result<()>
where
    F: FnOnce() -> anyhow::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<()>();
    let handle = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })?;
    let limit = test_timeout(default_s);
    match rx.recv_timeout(limit) {
        Ok(()) | Err(RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(RecvTimeoutError::Timeout) => {
            let msg =
                format!("{name}: still running after {limit:?}: hung (set HETMEM_TEST_TIMEOUT_S)");
            // The default hook prints no message for a payload that is not a string.
            eprintln!("{msg}");
            std::panic::panic_any(Hung(msg))
        }
    }
}

/// Aborts the whole process if it is still alive after `limit` (for tests whose threads a
/// panic cannot stop); dropping it disarms it.
pub struct AbortWatchdog(Option<mpsc::Sender<()>>);

impl AbortWatchdog {
    pub fn start(label: String, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("{label}: still running after {limit:?}: hung; aborting");
                std::process::abort();
            }
        });
        AbortWatchdog(Some(tx))
    }
}

impl Drop for AbortWatchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}
