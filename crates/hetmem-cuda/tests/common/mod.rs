//! Shared by the GPU test binaries (`tests/gpu.rs`, `tests/backend.rs`): the skip rule (one line,
//! `skipped: <test>: <why>`, on stderr without CUDA; a failure under `HETMEM_REQUIRE_CUDA=1`),
//! notes for the GPU run's log, test data, and a watchdog.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use hetmem_cuda::Cuda;

/// Whether `HETMEM_REQUIRE_CUDA=1`: a skip is then a failure.
pub fn required() -> bool {
    std::env::var("HETMEM_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// Prints the skip line, or fails under `HETMEM_REQUIRE_CUDA=1`.
pub fn skip(test: &str, why: &str) {
    assert!(!required(), "{test}: HETMEM_REQUIRE_CUDA=1, but {why}");
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// Device 0, or `None` after the skip line.
pub fn open(test: &str) -> Option<Cuda> {
    match Cuda::open(0) {
        Ok(c) => Some(c),
        Err(e) => {
            skip(test, &e.to_string());
            None
        }
    }
}

/// A line on stderr that `--nocapture` shows (facts the first GPU run should report).
pub fn note(msg: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "  note: {}", msg.as_ref());
}

/// Deterministic bytes that differ from page to page and from seed to seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Asserts two byte vectors are equal, naming the first difference.
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n} bytes differ, the first at {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// FNV-1a over `bytes`.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `f` on a thread of its own and fails the test if it has not finished within `secs`
/// (a hang must fail, not stall the GPU run's time budget).
pub fn watchdog<F: FnOnce() + Send + 'static>(name: &str, secs: u64, f: F) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            f();
            let _ = tx.send(());
        })
        .expect("spawn the test thread");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("{name}: still running after {secs} s"),
    }
}
