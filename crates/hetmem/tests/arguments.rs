//! Arguments (`docs/runtime.md` §6, "Arguments"): every public entry point checks its range
//! before it allocates or locks anything, and answers bad input with a typed error. No panic,
//! no abort, no hang. And in a fork child, every call on an inherited context returns
//! `Invalid` at once.
//!
//! Calls that aborted the process before their fix run in a subprocess of this test binary
//! (`isolated`), so that a regression fails its test instead of ending the run.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

mod common;

use anyhow::{bail, ensure, Context, Result};
use hetmem::{Advice, Device, DeviceKind, Error, Hetmem, ManagedBuf, PageState, Target, PAGE_SIZE};
use libc::c_int;

/// How long one scenario may run before it counts as hung (`HETMEM_TEST_TIMEOUT_S`).
const DEFAULT_TIMEOUT_S: u64 = 60;
/// Capacity of each simulated device.
const DEV_CAPACITY: usize = 16 << 20;
/// The first byte of the highest page of the address space.
const TOP_PAGE: usize = usize::MAX - (PAGE_SIZE - 1);
/// Set in the environment of a subprocess that `isolated` starts: the test it is to run.
const CHILD_ENV: &str = "HETMEM_ARGUMENTS_CHILD";

/// A context with a private device (0) and a coherent one (1).
fn context() -> Result<Hetmem> {
    Ok(Hetmem::builder()
        .sim_device(DeviceKind::Private, DEV_CAPACITY)
        .sim_device(DeviceKind::Coherent, DEV_CAPACITY)
        .build()?)
}

/// RAM and swap, from /proc/meminfo: what hetmem bounds its metadata and results by.
fn memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (kib("MemTotal:") + kib("SwapTotal:")) * 1024
}

/// Runs `body` in a subprocess of this test binary that runs only the test `name`, and fails
/// if the subprocess does not exit with success within the time limit (an abort, a signal, a
/// panic, a hang). In the subprocess itself (`CHILD_ENV` names the test), runs `body`.
fn isolated(name: &str, body: fn() -> Result<()>) -> Result<()> {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return body();
    }
    let child = Command::new(std::env::current_exe()?)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the test binary again")?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = common::test_timeout(DEFAULT_TIMEOUT_S);
    let (out, hung) = match rx.recv_timeout(limit) {
        Ok(out) => (out?, false),
        Err(_) => {
            // SAFETY: kills our own child, which has not been reaped (its waiter still waits).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (rx.recv()??, true)
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !hung,
        "{name}: the subprocess still ran after {limit:?} (hung); its output:\n{text}"
    );
    ensure!(
        out.status.success(),
        "{name}: the subprocess ended with {} (an abort or a panic); its output:\n{text}",
        out.status
    );
    // libtest exits with success when the filter matches nothing: make sure the body ran.
    ensure!(
        text.contains("1 passed"),
        "{name}: the subprocess did not run the test; its output:\n{text}"
    );
    Ok(())
}

/// Asserts that `r` is the error whose errno is `errno`.
#[track_caller]
fn expect_errno<T: std::fmt::Debug>(what: &str, r: hetmem::Result<T>, errno: c_int) {
    match r {
        Err(e) if e.errno() == errno => {}
        Err(e) => panic!("{what}: {e} (errno {}), expected errno {errno}", e.errno()),
        Ok(v) => panic!("{what}: Ok({v:?}), expected errno {errno}"),
    }
}

// ---------------------------------------------------------------------------------------------
// C11, and the checks of C10 that need no huge allocation: every entry point that takes a range
// ---------------------------------------------------------------------------------------------

/// What the range calls run on.
struct Fixture {
    hm: Hetmem,
    private: Device,
    buf: ManagedBuf,
}

/// A call that takes a range, by name. `write` and `register` take their length from a slice
/// or a mapping, so they only get the small cases.
type RangeCall = (
    &'static str,
    fn(&Fixture, usize, usize) -> hetmem::Result<()>,
);

const RANGE_CALLS: &[RangeCall] = &[
    ("Hetmem::migrate(System)", |f, a, l| {
        f.hm.migrate(a, l, Target::System)
    }),
    ("Hetmem::migrate(Device)", |f, a, l| {
        f.hm.migrate(a, l, Target::Device(f.private.id()))
    }),
    ("Hetmem::discard", |f, a, l| f.hm.discard(a, l)),
    ("Hetmem::protect", |f, a, l| f.hm.protect(a, l, true, true)),
    ("Hetmem::advise", |f, a, l| {
        f.hm.advise(a, l, Advice::ReadMostly(true))
    }),
    ("Device::read", |f, a, l| f.private.read(a, l).map(drop)),
    ("Device::exclusive", |f, a, l| f.private.exclusive(a, l)),
    ("Device::check_exclusive", |f, a, l| {
        f.private.check_exclusive(a, l).map(drop)
    }),
    ("Device::migrate_to_device", |f, a, l| {
        f.private.migrate_to_device(a, l)
    }),
    ("Device::migrate_to_system", |f, a, l| {
        f.private.migrate_to_system(a, l)
    }),
    ("Device::kernel_read", |f, a, l| {
        f.private.kernel_read(a, l, |_, _| {})
    }),
    ("Device::kernel_write", |f, a, l| {
        f.private.kernel_write(a, l, |_, _| {})
    }),
];

/// C11: a zero-length range is `Invalid` (EINVAL) for every entry point, managed or not, as the
/// kernel's dmirror and munmap answer. Before the fix, every one of these returned `Ok`.
#[test]
fn zero_length_ranges_are_invalid() -> Result<()> {
    common::watchdog("zero_length_ranges_are_invalid", DEFAULT_TIMEOUT_S, || {
        let hm = context()?;
        let f = Fixture {
            private: hm.device(0).expect("device 0"),
            buf: hm.alloc(4 * PAGE_SIZE)?,
            hm,
        };
        let plain = common::mem::anon(PAGE_SIZE) as *mut u8;
        let places = [
            ("managed", f.buf.addr()),
            ("plain memory", plain as usize),
            ("unmapped page 1", PAGE_SIZE),
            ("unaligned", f.buf.addr() + 1),
            ("top page", TOP_PAGE),
        ];
        for (place, addr) in places {
            for (name, call) in RANGE_CALLS {
                expect_errno(
                    &format!("{name} at {place}, length 0"),
                    call(&f, addr, 0),
                    libc::EINVAL,
                );
            }
            expect_errno(
                &format!("Device::write at {place}, length 0"),
                f.private.write(addr, &[]),
                libc::EINVAL,
            );
            expect_errno(
                &format!("Device::snapshot at {place}, length 0"),
                f.private.snapshot(addr, 0),
                libc::EINVAL,
            );
            expect_errno(
                &format!("Hetmem::register at {place}, length 0"),
                // SAFETY: a zero-length range is refused before it is touched.
                unsafe { f.hm.register(addr as *mut u8, 0) },
                libc::EINVAL,
            );
        }
        expect_errno("Hetmem::alloc(0)", f.hm.alloc(0), libc::EINVAL);
        // Nothing was changed or counted on the way.
        ensure!(f.hm.stats().errors == 0, "errors: {:?}", f.hm.stats());
        common::mem::munmap(plain as usize, PAGE_SIZE);
        Ok(())
    })
}

/// Unaligned, wrapping and unmanaged ranges: `Invalid` for the first two, `Fault` for memory
/// that is not managed (snapshot reports such pages as error entries instead), on every entry
/// point that takes a range.
#[test]
fn bad_ranges_get_typed_errors() -> Result<()> {
    common::watchdog("bad_ranges_get_typed_errors", DEFAULT_TIMEOUT_S, || {
        let hm = context()?;
        let f = Fixture {
            private: hm.device(0).expect("device 0"),
            buf: hm.alloc(4 * PAGE_SIZE)?,
            hm,
        };
        f.buf.as_atomic_u64()[0].store(0x1111, std::sync::atomic::Ordering::Relaxed);
        let plain = common::mem::anon(2 * PAGE_SIZE) as *mut u8;
        let (a, len) = (f.buf.addr(), f.buf.len());
        let cases = [
            ("unaligned address", a + 1, PAGE_SIZE, libc::EINVAL),
            ("unaligned length", a, 100, libc::EINVAL),
            ("length usize::MAX", a, usize::MAX, libc::EINVAL),
            (
                "top page, 2 pages (wraps)",
                TOP_PAGE,
                2 * PAGE_SIZE,
                libc::EINVAL,
            ),
            (
                "top page (its end wraps)",
                TOP_PAGE,
                PAGE_SIZE,
                libc::EINVAL,
            ),
            (
                "whole address space (wraps)",
                a,
                usize::MAX - (PAGE_SIZE - 1),
                libc::EINVAL,
            ),
            ("plain memory", plain as usize, PAGE_SIZE, libc::EFAULT),
            ("unmapped page 1", PAGE_SIZE, PAGE_SIZE, libc::EFAULT),
            (
                "one page past the end",
                a + len - PAGE_SIZE,
                2 * PAGE_SIZE,
                libc::EFAULT,
            ),
        ];
        for (case, addr, l, errno) in cases {
            for (name, call) in RANGE_CALLS {
                expect_errno(&format!("{name}: {case}"), call(&f, addr, l), errno);
            }
        }
        // write's length is its slice's.
        expect_errno(
            "Device::write: unaligned",
            f.private.write(a, &[1; 100]),
            libc::EINVAL,
        );
        expect_errno(
            "Device::write: top page, 2 pages (wraps)",
            f.private.write(TOP_PAGE, &[1; 2 * PAGE_SIZE]),
            libc::EINVAL,
        );
        expect_errno(
            "Device::write: plain memory",
            f.private.write(plain as usize, &[1; PAGE_SIZE]),
            libc::EFAULT,
        );
        // snapshot: malformed ranges are Invalid; pages that are not managed are error entries.
        expect_errno(
            "snapshot: unaligned",
            f.private.snapshot(a + 1, PAGE_SIZE),
            libc::EINVAL,
        );
        expect_errno(
            "snapshot: top page, 2 pages (wraps)",
            f.private.snapshot(TOP_PAGE, 2 * PAGE_SIZE),
            libc::EINVAL,
        );
        let snap = f.private.snapshot(a + len - PAGE_SIZE, 3 * PAGE_SIZE)?;
        let errors: Vec<bool> = snap.iter().map(|s| s.error).collect();
        ensure!(
            errors == [false, true, true],
            "snapshot across the end: {snap:?}"
        );
        // The top page's end, 2^64, is not an address: as for dmirror, its range wraps.
        expect_errno(
            "snapshot: top page (wraps)",
            f.private.snapshot(TOP_PAGE, PAGE_SIZE),
            libc::EINVAL,
        );
        let snap = f.private.snapshot(TOP_PAGE - PAGE_SIZE, PAGE_SIZE)?;
        ensure!(
            snap.len() == 1 && snap[0].error,
            "snapshot below the top page: {snap:?}"
        );
        // register: the same malformed ranges.
        for (case, addr, l) in [
            ("unaligned", plain as usize + 1, PAGE_SIZE),
            ("top page, 2 pages (wraps)", TOP_PAGE, 2 * PAGE_SIZE),
            ("length usize::MAX", plain as usize, usize::MAX),
        ] {
            // SAFETY: malformed ranges are refused before they are touched.
            let r = unsafe { f.hm.register(addr as *mut u8, l) };
            expect_errno(&format!("register: {case}"), r, libc::EINVAL);
        }
        // None of that touched the data.
        ensure!(
            f.buf.as_atomic_u64()[0].load(std::sync::atomic::Ordering::Relaxed) == 0x1111,
            "the buffer's data changed"
        );
        ensure!(f.hm.stats().errors == 0, "errors: {:?}", f.hm.stats());
        common::mem::munmap(plain as usize, 2 * PAGE_SIZE);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// C10: huge lengths, which panicked or aborted the process before their fix
// ---------------------------------------------------------------------------------------------

/// C10: `read(addr, usize::MAX)` panicked (capacity overflow) and `read(addr, 1 << 46)`
/// aborted the process (allocation failure): the range is now checked before the result is
/// allocated.
#[test]
fn huge_device_reads_are_refused() -> Result<()> {
    isolated("huge_device_reads_are_refused", || {
        let hm = context()?;
        let buf = hm.alloc(4 * PAGE_SIZE)?;
        for dev in hm.devices() {
            let d = dev.id().index();
            expect_errno(
                &format!("dev{d}.read(addr, usize::MAX)"),
                dev.read(buf.addr(), usize::MAX),
                libc::EINVAL,
            );
            expect_errno(
                &format!("dev{d}.read(addr, 1 << 46)"),
                dev.read(buf.addr(), 1 << 46),
                libc::EFAULT,
            );
            expect_errno(
                &format!("dev{d}.kernel_read(addr, 1 << 46)"),
                dev.kernel_read(buf.addr(), 1 << 46, |_, _| {}),
                libc::EFAULT,
            );
        }
        Ok(())
    })
}

/// C10: `snapshot` of the top page with 2 pages panicked (add overflow), and `snapshot(addr,
/// 1 << 47)` aborted the process allocating 2^35 entries. A result that cannot fit in the
/// machine's memory is now `NoMem`, before anything is allocated.
#[test]
fn huge_snapshots_are_refused() -> Result<()> {
    isolated("huge_snapshots_are_refused", || {
        let hm = context()?;
        let buf = hm.alloc(4 * PAGE_SIZE)?;
        let dev = hm.device(0).expect("device 0");
        expect_errno(
            "snapshot(top page, 2 pages)",
            dev.snapshot(TOP_PAGE, 2 * PAGE_SIZE),
            libc::EINVAL,
        );
        // 1 << 47 on any machine with less than 2^35 entries' worth of memory; more elsewhere.
        let entries_beyond_memory =
            memory_bytes() / std::mem::size_of::<PageState>().max(1) as u64 + 1;
        let len = (1usize << 47).max((entries_beyond_memory as usize).saturating_mul(PAGE_SIZE));
        expect_errno(
            &format!("snapshot(addr, {len:#x})"),
            dev.snapshot(buf.addr(), len),
            libc::ENOMEM,
        );
        // A large snapshot that fits comes back whole, with the unmanaged pages as errors.
        let len = 1 << 30;
        let snap = dev.snapshot(buf.addr(), len)?;
        ensure!(snap.len() == len / PAGE_SIZE, "{} entries", snap.len());
        let managed = snap.iter().filter(|s| !s.error).count();
        ensure!(managed == 4, "{managed} pages without error, expected 4");
        Ok(())
    })
}

/// The metadata a `len`-byte allocation needs, by the context's own estimate.
fn metadata_estimate(hm: &Hetmem, len: usize) -> u64 {
    (hm.metadata_bytes_per_page() * (len / PAGE_SIZE) as f64) as u64
}

/// C10: `alloc(32 TiB)` aborted the process building every block's metadata eagerly. The
/// metadata is now computed before anything is allocated and refused (`NoMem`) when it cannot
/// fit in the machine's memory; lengths no memfd can take are `Invalid`.
#[test]
fn huge_allocs_are_refused() -> Result<()> {
    isolated("huge_allocs_are_refused", || {
        let hm = context()?;
        let len = 32usize << 40;
        if metadata_estimate(&hm, len) <= memory_bytes() {
            eprintln!("skipped the 32 TiB case: this machine has memory for its metadata");
        } else {
            expect_errno("alloc(32 TiB)", hm.alloc(len), libc::ENOMEM);
        }
        // Beyond what a memfd can hold (its size is an off_t).
        for len in [usize::MAX - (PAGE_SIZE - 1), 1 << 63] {
            expect_errno(&format!("alloc({len:#x})"), hm.alloc(len), libc::EINVAL);
        }
        // A memfd could, the machine's memory cannot hold the metadata.
        expect_errno("alloc(1 << 62)", hm.alloc(1 << 62), libc::ENOMEM);
        // The context still works.
        let mut buf = hm.alloc(PAGE_SIZE)?;
        buf[0] = 7;
        ensure!(
            hm.device(0)
                .expect("device 0")
                .read(buf.addr(), PAGE_SIZE)?[0]
                == 7
        );
        Ok(())
    })
}

/// C10, for `register`: adopting a 32 TiB reservation built every block's metadata eagerly
/// (abort) and would then copy 32 TiB into the memfd. Both are now bounded by the machine's
/// memory before anything is allocated: the metadata, and the copy, which fills every page of
/// the memfd, touched or not.
#[test]
fn huge_registrations_are_refused() -> Result<()> {
    isolated("huge_registrations_are_refused", || {
        let hm = context()?;
        // 32 TiB: neither the metadata nor the copy fits. Just beyond RAM and swap: the
        // metadata would fit, the copy would not (it would end in the OOM killer).
        let beyond_memory = (memory_bytes() as usize + (1 << 30)).next_multiple_of(2 << 20);
        for len in [32usize << 40, beyond_memory] {
            let p = common::mem::anon(len) as *mut u8;
            // SAFETY: our own fresh mapping, which no one else uses.
            let r = unsafe { hm.register(p, len) };
            expect_errno(&format!("register({len:#x})"), r, libc::ENOMEM);
            // The range is still ours, as it was.
            // SAFETY: the mapping is still there, read-write.
            unsafe {
                ensure!(p.read() == 0, "the range was written");
                p.write(9);
            }
            common::mem::munmap(p as usize, len);
        }
        ensure!(hm.stats().errors == 0, "errors: {:?}", hm.stats());
        Ok(())
    })
}

/// `readahead_blocks(usize::MAX)` overflowed `bi + readahead` on a service thread at the first
/// sequential read-back, so the faulting thread was never woken. The builder now bounds it.
#[test]
fn unbounded_readahead_is_clamped() -> Result<()> {
    isolated("unbounded_readahead_is_clamped", || {
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, DEV_CAPACITY)
            .readahead_blocks(usize::MAX)
            .build()?;
        let dev = hm.device(0).expect("device 0");
        let len = 4 << 20;
        let buf = hm.alloc(len)?;
        dev.write(buf.addr(), &vec![5u8; len])?;
        // Two read-backs in consecutive blocks make a stream: read ahead from there.
        ensure!(buf[0] == 5 && buf[2 << 20] == 5, "read-back");
        ensure!(buf.iter().all(|&b| b == 5), "read-back of the rest");
        Ok(())
    })
}

/// Threads of this process.
fn threads() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `service_threads(usize::MAX)` starts at most `MAX_SERVICE_THREADS` threads (it started
/// threads until a spawn failed, then left them running), and they all stop with the context.
/// Threads are counted, not named: a new thread names itself once it runs.
#[test]
fn unbounded_service_threads_are_capped() -> Result<()> {
    isolated("unbounded_service_threads_are_capped", || {
        let before = threads()?;
        let hm = Hetmem::builder().service_threads(usize::MAX).build()?;
        let n = threads()? - before;
        ensure!(
            n == hetmem::MAX_SERVICE_THREADS,
            "{n} fault-service threads, expected {}",
            hetmem::MAX_SERVICE_THREADS
        );
        drop(hm);
        let left = threads()? - before;
        ensure!(
            left == 0,
            "{left} fault-service threads outlived their context"
        );
        Ok(())
    })
}

/// Without `service_threads`, a context starts `HETMEM_SERVICE_THREADS` threads, or else one per
/// CPU (at least 2): the fault service is sized to the machine.
#[test]
fn service_threads_follow_the_machine_or_the_environment() -> Result<()> {
    isolated(
        "service_threads_follow_the_machine_or_the_environment",
        || {
            // This child process runs this test alone, on one thread: changing the environment
            // races with nobody.
            std::env::remove_var("HETMEM_SERVICE_THREADS");
            let cpus = std::thread::available_parallelism()?.get();
            let want = cpus.clamp(2, 64);
            ensure!(
                hetmem::default_service_threads() == want,
                "default {} threads on {cpus} CPUs, expected {want}",
                hetmem::default_service_threads()
            );
            let before = threads()?;
            let hm = Hetmem::builder().build()?;
            let n = threads()? - before;
            drop(hm);
            ensure!(
                n == want,
                "{n} fault-service threads on {cpus} CPUs, expected {want}"
            );
            std::env::set_var("HETMEM_SERVICE_THREADS", "5");
            let before = threads()?;
            let hm = Hetmem::builder().build()?;
            let n = threads()? - before;
            drop(hm);
            ensure!(
                n == 5,
                "{n} fault-service threads with HETMEM_SERVICE_THREADS=5"
            );
            // The builder's word wins over the environment.
            let before = threads()?;
            let hm = Hetmem::builder().service_threads(3).build()?;
            let n = threads()? - before;
            drop(hm);
            ensure!(n == 3, "{n} fault-service threads with service_threads(3)");
            Ok(())
        },
    )
}

// ---------------------------------------------------------------------------------------------
// B6: calls in a fork child
// ---------------------------------------------------------------------------------------------

/// A call a fork child makes on its inherited context; it must return `Invalid`.
type ChildCall<'a> = (&'static str, Box<dyn Fn() -> hetmem::Result<()> + 'a>);

/// The calls a fork child makes, in order: every public entry point that is not an accessor.
fn child_calls<'a>(
    hm: &'a Hetmem,
    private: &'a Device,
    coherent: &'a Device,
    a: usize,
    len: usize,
) -> Vec<ChildCall<'a>> {
    vec![
        ("Device::release (private)", Box::new(|| private.release())),
        (
            "Device::release (coherent)",
            Box::new(|| coherent.release()),
        ),
        (
            "Device::snapshot",
            Box::new(move || private.snapshot(a, len).map(drop)),
        ),
        (
            "Device::read",
            Box::new(move || private.read(a, len).map(drop)),
        ),
        (
            "Device::write",
            Box::new(move || private.write(a, &[0xee; PAGE_SIZE])),
        ),
        (
            "Device::exclusive",
            Box::new(move || private.exclusive(a, len)),
        ),
        (
            "Device::check_exclusive",
            Box::new(move || private.check_exclusive(a, len).map(drop)),
        ),
        (
            "Device::migrate_to_device",
            Box::new(move || coherent.migrate_to_device(a, len)),
        ),
        (
            "Device::migrate_to_system",
            Box::new(move || private.migrate_to_system(a, len)),
        ),
        (
            "Device::kernel_read",
            Box::new(move || private.kernel_read(a, len, |_, _| {})),
        ),
        (
            "Device::kernel_write",
            Box::new(move || private.kernel_write(a, len, |_, b| b.fill(0xee))),
        ),
        ("Hetmem::alloc", Box::new(|| hm.alloc(PAGE_SIZE).map(drop))),
        (
            "Hetmem::register",
            Box::new(|| {
                let p = common::mem::anon(PAGE_SIZE) as *mut u8;
                // SAFETY: the child's own fresh mapping.
                unsafe { hm.register(p, PAGE_SIZE) }.map(drop)
            }),
        ),
        (
            "Hetmem::migrate",
            Box::new(move || hm.migrate(a, len, Target::System)),
        ),
        ("Hetmem::discard", Box::new(move || hm.discard(a, len))),
        (
            "Hetmem::protect",
            Box::new(move || hm.protect(a, len, true, false)),
        ),
        (
            "Hetmem::advise",
            Box::new(move || hm.advise(a, len, Advice::ReadMostly(true))),
        ),
    ]
}

/// What the child does after the calls, in order: it drops everything it inherited.
const CHILD_DROPS: [&str; 4] = [
    "drop of the Registration",
    "drop of the ManagedBuf",
    "drop of the Device handles",
    "drop of the Hetmem",
];

/// Exit code of the child when a call did not return `Invalid`: this plus the call's index.
const CHILD_WRONG: c_int = 10;
/// Exit code of the child when a call panicked.
const CHILD_PANICKED: c_int = 99;
/// Exit code of the child when its copy of the managed memory did not hold the pre-fork data.
const CHILD_BAD_DATA: c_int = 98;

/// B6: in a fork child, every call on the inherited context returns `Invalid` at once, as
/// docs/runtime.md §6 says, and dropping what it inherited neither blocks nor panics. Before
/// the fix `Device::release` blocked for ever (the fork gate stays closed in the child) and
/// `Device::snapshot` returned `Ok` with error entries. Nothing the child does may reach the
/// parent's data or devices: the parent checks them afterwards.
#[test]
fn fork_child_gets_invalid_from_every_call() -> Result<()> {
    common::watchdog(
        "fork_child_gets_invalid_from_every_call",
        DEFAULT_TIMEOUT_S * 2,
        fork_child_scenario,
    )
}

fn fork_child_scenario() -> Result<()> {
    let hm = context()?;
    let private = hm.device(0).expect("device 0");
    let coherent = hm.device(1).expect("device 1");
    let len = 8 * PAGE_SIZE;
    let mut buf = hm.alloc(len)?;
    buf.fill(0x5a);
    // Half on the private device, a page on the coherent one.
    private.migrate_to_device(buf.addr(), len / 2)?;
    coherent.write(buf.addr() + len - PAGE_SIZE, &[0x5a; PAGE_SIZE])?;
    // Registered memory, partly on the private device.
    let plain = common::mem::anon(4 * PAGE_SIZE) as *mut u8;
    // SAFETY: our own fresh mapping.
    unsafe { std::ptr::write_bytes(plain, 0x77, 4 * PAGE_SIZE) };
    // SAFETY: our own mapping, which no other thread touches.
    let reg = unsafe { hm.register(plain, 4 * PAGE_SIZE)? };
    private.migrate_to_device(reg.addr(), PAGE_SIZE)?;
    let used = (private.used_pages(), coherent.used_pages());
    let a = buf.addr();
    // The parent's copy: only for the names of the child's steps.
    let names: Vec<&str> = child_calls(&hm, &private, &coherent, a, len)
        .iter()
        .map(|c| c.0)
        .chain(CHILD_DROPS)
        .collect();

    let mut fds = [0 as c_int; 2];
    ensure!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0,
        "pipe2"
    );
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let progress = fds[1];
    // SAFETY: the child makes the calls, reads plain memory, reports its progress with
    // write(2) and ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let step = |i: usize| {
            let b = i as u8;
            unsafe { libc::write(progress, (&b as *const u8).cast(), 1) };
        };
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            // The child's copies hold the pre-fork data; reading them is plain memory access.
            // SAFETY: the registered range is mapped for as long as `reg` lives.
            let reg_bytes = unsafe { std::slice::from_raw_parts(plain, 4 * PAGE_SIZE) };
            if buf.iter().any(|&b| b != 0x5a) || reg_bytes.iter().any(|&b| b != 0x77) {
                return CHILD_BAD_DATA;
            }
            let calls = child_calls(&hm, &private, &coherent, a, len);
            for (i, (_, call)) in calls.iter().enumerate() {
                step(i);
                if !matches!(call(), Err(Error::Invalid(_))) {
                    return CHILD_WRONG + i as c_int;
                }
            }
            let n = calls.len();
            drop(calls);
            // Accessors keep working.
            let _ = (
                private.counters(),
                private.used_pages(),
                hm.stats(),
                buf.len(),
            );
            step(n);
            drop(reg);
            // The registered range stays the child's own memory, with its data.
            if reg_bytes.iter().any(|&b| b != 0x77) {
                return CHILD_BAD_DATA;
            }
            step(n + 1);
            drop(buf);
            step(n + 2);
            drop((private, coherent));
            step(n + 3);
            drop(hm);
            0
        }))
        .unwrap_or(CHILD_PANICKED);
        unsafe { libc::_exit(code) }
    }
    ensure!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    drop(wr);

    // Wait for the child, or kill it when it hangs.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut status: c_int = 0;
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = tx.send((r, status));
    });
    let limit = common::test_timeout(DEFAULT_TIMEOUT_S) / 2;
    let (hung, (r, status)) = match rx.recv_timeout(limit) {
        Ok(v) => (false, v),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (true, rx.recv()?)
        }
    };
    ensure!(r == pid, "waitpid: {}", std::io::Error::last_os_error());
    let mut steps = Vec::new();
    std::fs::File::from(rd).read_to_end(&mut steps)?;
    let last = steps.last().map_or("none", |&i| names[i as usize]);
    ensure!(!hung, "the child hung in {last} (killed after {limit:?})");
    ensure!(
        libc::WIFEXITED(status),
        "the child died of signal {} in {last}",
        libc::WTERMSIG(status)
    );
    match libc::WEXITSTATUS(status) {
        0 => {}
        CHILD_PANICKED => bail!("the child panicked in {last}"),
        CHILD_BAD_DATA => bail!("the child's copy of managed memory lost the pre-fork data"),
        c if c >= CHILD_WRONG && ((c - CHILD_WRONG) as usize) < names.len() => {
            bail!(
                "in the child, {} did not return Invalid",
                names[(c - CHILD_WRONG) as usize]
            )
        }
        c => bail!("the child exited with {c}"),
    }

    // The parent's memory and devices are as they were, and everything still works.
    ensure!(
        (private.used_pages(), coherent.used_pages()) == used,
        "device frames changed: {:?}, were {used:?}",
        (private.used_pages(), coherent.used_pages())
    );
    ensure!(
        private.read(a, len)?.iter().all(|&b| b == 0x5a),
        "device read of the buffer"
    );
    ensure!(buf.iter().all(|&b| b == 0x5a), "CPU read of the buffer");
    ensure!(
        private
            .read(reg.addr(), reg.len())?
            .iter()
            .all(|&b| b == 0x77),
        "device read of the registered range"
    );
    buf[0] = 1;
    ensure!(
        private.read(a, PAGE_SIZE)?[0] == 1,
        "a CPU write seen by the device"
    );
    private.release()?;
    ensure!(private.used_pages() == 0, "frames left after release");
    drop(reg);
    // SAFETY: the registration gave the range back as plain memory.
    let back = unsafe { std::slice::from_raw_parts(plain, 4 * PAGE_SIZE) };
    ensure!(
        back.iter().all(|&b| b == 0x77),
        "registered data after the drop"
    );
    common::mem::munmap(plain as usize, 4 * PAGE_SIZE);
    ensure!(hm.stats().errors == 0, "errors: {:?}", hm.stats());
    Ok(())
}
