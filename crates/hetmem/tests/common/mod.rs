//! Shared by the integration tests: hang detection (a test that never finishes must fail, not
//! stall CI) and scenarios that run one at a time (`serial_tests!`), CPU reads in a process of
//! their own, which a signal may kill, `assert_err!`, and the seeded random generator of the
//! randomized tests. `file` and `fs` serve the file-mapping tests, `mem` plain memory, `arena`
//! device memory the host cannot address (test backends),
//! `process` forked children.

// Each test binary uses part of this.
#![allow(dead_code)]
// `read_in_clone` starts and reaps a process that shares our memory.
#![allow(unsafe_code)]

pub mod arena;
pub mod file;
pub mod fs;
pub mod mem;
pub mod process;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// `ASSERT_EQ(ret, -E...)`: the result is the given error variant, with its errno.
#[allow(unused_macros)]
macro_rules! assert_err {
    ($res:expr, $pat:pat, $errno:expr) => {
        match $res {
            Err(e @ $pat) => {
                assert_eq!(e.errno(), $errno, "{}: errno of {:?}", stringify!($res), e)
            }
            Err(e) => panic!(
                "{}: expected {}, got error {:?}",
                stringify!($res),
                stringify!($pat),
                e
            ),
            Ok(_) => panic!(
                "{}: expected {}, got Ok",
                stringify!($res),
                stringify!($pat)
            ),
        }
    };
}

#[allow(unused_imports)]
pub(crate) use assert_err;

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

/// Runs scenario `f` under `watchdog`, one scenario of the test binary at a time: scenarios
/// that take file leases or mount file systems must run alone. After a scenario hung (its
/// thread still runs, with its files, leases and children), the later ones fail at once instead
/// of running beside it.
pub fn serial_scenario(
    name: &'static str,
    default_s: u64,
    f: fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    static HUNG: AtomicBool = AtomicBool::new(false);
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    anyhow::ensure!(
        !HUNG.load(Ordering::Acquire),
        "not run: an earlier scenario hung and is still running"
    );
    std::panic::catch_unwind(|| watchdog(name, default_s, f)).unwrap_or_else(|panic| {
        if panic.is::<Hung>() {
            HUNG.store(true, Ordering::Release);
        }
        std::panic::resume_unwind(panic)
    })
}

/// One `#[test]` per scenario: `serial_tests!(DEFAULT_S; a, b)` declares tests `a` and `b` that
/// run `scenarios::a` and `scenarios::b` of the calling test binary through `serial_scenario`
/// with a default limit of `DEFAULT_S` seconds. They run one at a time: a forked child inherits
/// every descriptor open at the fork; one of another test's file keeps that file open while the
/// child lives, and denies that test its lease (a write lease needs the file open nowhere
/// else).
#[allow(unused_macros)]
macro_rules! serial_tests {
    ($default_s:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> anyhow::Result<()> {
                $crate::common::serial_scenario(stringify!($name), $default_s, scenarios::$name)
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use serial_tests;

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

/// What a CPU read in another process found (`read_in_clone`, `reading_of`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// The bytes wanted.
    Wanted,
    /// Zeros, not the bytes wanted.
    Zeros,
    /// Other bytes.
    Other,
    /// A signal killed the reader (SIGBUS for a poisoned page).
    Signal(i32),
    /// It exited otherwise, with this status (a panic in a forked child, say).
    Exited(i32),
    /// Still blocked in the read at the deadline (it was killed).
    Blocked,
}

impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reading::Wanted => write!(f, "read the expected data"),
            Reading::Zeros => write!(f, "read zeros"),
            Reading::Other => write!(f, "read other data"),
            Reading::Signal(s) => write!(f, "was killed by signal {s}"),
            Reading::Exited(c) => write!(f, "exited with {c}"),
            Reading::Blocked => write!(f, "was still blocked in the read (killed)"),
        }
    }
}

/// `compare_at`'s exit codes.
const READ_WANTED: libc::c_int = 0;
const READ_ZEROS: libc::c_int = 1;
const READ_OTHER: libc::c_int = 2;

/// Compares the memory at `addr` with `want`, touching nothing else (no allocation, no
/// thread-local state), for a reader process to exit with; `reading_of` decodes its status.
pub fn compare_at(addr: usize, want: &[u8]) -> libc::c_int {
    // SAFETY: the callers name memory they keep mapped; a fault there is what they test.
    let got = unsafe { std::slice::from_raw_parts(addr as *const u8, want.len()) };
    if got == want {
        READ_WANTED
    } else if got.iter().all(|&b| b == 0) {
        READ_ZEROS
    } else {
        READ_OTHER
    }
}

/// What the wait status of a reader that exits with `compare_at`'s code says.
pub fn reading_of(status: libc::c_int) -> Reading {
    if libc::WIFSIGNALED(status) {
        return Reading::Signal(libc::WTERMSIG(status));
    }
    match libc::WEXITSTATUS(status) {
        READ_WANTED => Reading::Wanted,
        READ_ZEROS => Reading::Zeros,
        READ_OTHER => Reading::Other,
        c => Reading::Exited(c),
    }
}

/// Reads `want.len()` bytes at `addr` with the CPU in a process that shares our address space
/// (`clone(CLONE_VM)`: not a thread of ours, so a fatal signal kills only it), within `limit`.
pub fn read_in_clone(addr: usize, want: &[u8], limit: Duration) -> Reading {
    #[repr(C)]
    struct Job {
        addr: usize,
        want: *const u8,
        len: usize,
    }
    extern "C" fn reader(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: runs on its own stack in our address space, where `arg` is the caller's `Job`,
        // alive until the reader is reaped.
        let job = unsafe { &*(arg as *const Job) };
        // SAFETY: the caller's `want`, alive as long as `job`.
        compare_at(job.addr, unsafe {
            std::slice::from_raw_parts(job.want, job.len)
        })
    }
    let job = Job {
        addr,
        want: want.as_ptr(),
        len: want.len(),
    };
    let mut stack = vec![0u128; (256 << 10) / 16];
    let top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
    // SAFETY: the reader shares our memory and runs on `stack`, which outlives it (it is reaped
    // or killed below before `stack` drops).
    let pid = unsafe {
        libc::clone(
            reader,
            top,
            libc::CLONE_VM | libc::SIGCHLD,
            (&job as *const Job).cast_mut().cast(),
        )
    };
    assert!(pid > 0, "clone: {}", std::io::Error::last_os_error());
    let reading = match wait_within(pid, limit) {
        Some(status) => reading_of(status),
        None => Reading::Blocked,
    };
    drop(stack);
    reading
}

/// `waitpid` with a deadline: the child's raw status, or `None` if it was still running at
/// `limit` (it is then killed and reaped). It polls a pidfd, which becomes readable when the
/// child exits, and starts no thread: a thread starting or ending while the test forks its next
/// child can leave the C library's or std's thread bookkeeping locked in that child, which then
/// hangs when it starts threads of its own (seen: `fork_while_another_thread_maps_files`, 2 children in
/// 45,000 under a CPU hog, when this waited on a thread per child).
pub fn wait_within(pid: libc::pid_t, limit: Duration) -> Option<libc::c_int> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    let deadline = std::time::Instant::now() + limit;
    let exited = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one pollfd of ours.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            break true;
        }
        if r == 0 {
            break false;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "poll(pidfd): {e}");
    };
    if !exited {
        // SAFETY: kills our own child (it is reaped below).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status: libc::c_int = 0;
    // SAFETY: reaps our own child, which has exited or was just killed.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the pidfd opened above.
    unsafe { libc::close(fd) };
    assert_eq!(r, pid, "waitpid({pid}): {err}");
    exited.then_some(status)
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

    /// A range of `1..=max_len` items inside `0..n` (`n > 0`, `max_len > 0`): its start and
    /// length.
    pub fn range(&mut self, n: usize, max_len: usize) -> (usize, usize) {
        let len = 1 + self.below(max_len.min(n));
        (self.below(n - len + 1), len)
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
