//! Hang detection shared by the integration tests: a test that never finishes must fail, not
//! stall CI.

#![allow(dead_code)] // each test binary uses part of this

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

/// The environment variable `name` parsed as `T`, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed from the environment: decimal or `0x` hexadecimal.
pub fn env_seed(name: &str) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// splitmix64's output function: a well-mixed 64-bit value from any input.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64*, seeded through splitmix: the seeded, replayable generator the randomized tests
/// share. The same seed gives the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(splitmix(seed) | 1)
    }

    /// A generator whose state is `state` (made odd) as it is, without mixing.
    pub fn from_state(state: u64) -> Self {
        Rng(state | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_ne_bytes());
        }
        v.truncate(n);
        v
    }

    /// A length biased to small values, `1..=max` (`max > 0`).
    pub fn len(&mut self, max: usize) -> usize {
        match self.below(4) {
            0 => 1,
            1 => 1 + self.below(max.min(8)),
            _ => 1 + self.below(max),
        }
    }
}
