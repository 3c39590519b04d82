//! Regression tests for failures `tests/random_api.rs` found on `main` at 273d328, one test
//! each, cut down from the randomized runs (`HETMEM_FUZZ_ONLY` and a delta-debugging loop) and
//! then by hand. Each names the bug it shows: issue 10's item, or **NEW** where it was not one
//! of them. Every test failed on 273d328 for the reason its comment gives. The fuzzer's other
//! findings have their regression tests with the fix (`no_loss.rs`, `arguments.rs`).
//!
//! Tests that could hang (a fork child, an open of a FIFO) or abort the process (an allocation
//! failure) run the risky part in a child process or on a helper thread with a time limit, so a
//! failure is reported as a failure.

#![allow(unsafe_code)]

use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::mem::{anon_filled, mprotect};

use hetmem::{Advice, DeviceId, DeviceKind, Error, Hetmem, SimConfig, Target, PAGE_SIZE};
use hetmem_proto::Mem;

const TIMEOUT_S: u64 = 120;

/// The random test's devices: a private and a coherent one, 3 MiB each, two kernel workers.
fn context() -> Hetmem {
    let dev = |kind| SimConfig {
        kind,
        capacity: 768 * PAGE_SIZE,
        workers: 2,
    };
    Hetmem::builder()
        .sim_device_with(dev(DeviceKind::Private))
        .sim_device_with(dev(DeviceKind::Coherent))
        .build()
        .expect("a context")
}

fn cpu_read(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: every caller reads memory it keeps mapped readable.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn cpu_write(addr: usize, data: &[u8]) {
    // SAFETY: every caller writes memory it keeps mapped read-write and holds no reference to.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Forks; the child runs `check` and exits with what it returns (99 if it panics). The parent
/// returns the child's exit code; a child that dies of a signal or runs past `limit` (then
/// killed) is a panic.
fn in_child(limit: Duration, check: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `check`, which uses memory and calls the context, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).unwrap_or(99);
        // SAFETY: leaves the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-parameter.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = tx.send(status);
    });
    match rx.recv_timeout(limit) {
        Ok(st) if libc::WIFEXITED(st) => libc::WEXITSTATUS(st),
        Ok(st) => panic!("the child died of signal {}", libc::WTERMSIG(st)),
        Err(_) => {
            // SAFETY: kills our own child, which the waiter thread reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the child still runs after {limit:?}: hung (killed)");
        }
    }
}

// ------------------------------------------------------------------------------------------
// A. Data loss
// ------------------------------------------------------------------------------------------

/// Issue 10 **A1**, with the hole made *before* the data moves to the device, and anywhere in
/// the block: a buffer whose pages 0..8 the CPU has mapped; `munmap` of page 8 alone; a private
/// device's kernel writes page 3; the CPU reads page 3. On 273d328 the CPU reads the old bytes
/// and `stats().errors` is 1 ("cpu fault: page is not mapped"): the 2 MiB read-back window
/// includes the unmapped page, the request fails with NoMapping, and the page leaves
/// management. (random_api: seed 0x5eed0001, ops `-fifo`, steps 13,21,26.)
#[test]
fn a1_device_write_after_a_partial_munmap_is_seen_by_the_cpu() -> anyhow::Result<()> {
    common::watchdog("a1", TIMEOUT_S, || {
        let hm = context();
        let dev = hm.device(0).expect("private device");
        let buf = hm.alloc(700 * PAGE_SIZE)?;
        let a = buf.addr();
        cpu_write(a, &[0x11; 8 * PAGE_SIZE]);
        // SAFETY: page 8 of our buffer; never touched again.
        let r = unsafe { libc::munmap((a + 8 * PAGE_SIZE) as *mut libc::c_void, PAGE_SIZE) };
        assert_eq!(r, 0, "munmap");
        dev.kernel_write(a + 3 * PAGE_SIZE, PAGE_SIZE, |_, b| b.fill(0x77))?;
        let got = cpu_read(a + 3 * PAGE_SIZE, PAGE_SIZE);
        assert!(
            got.iter().all(|&b| b == 0x77),
            "the CPU reads {:#04x} after the device wrote 0x77",
            got[0]
        );
        assert_eq!(hm.stats().errors, 0, "stats().errors");
        Ok(())
    })
}

/// Issue 10 **A2**, without any round trip: one page of a block is read-only (or PROT_NONE),
/// and the runtime knows it (a device read checked it). A CPU write faults on *another* page
/// of the block whose data is on a private device: the read-back window covers the protected
/// page, the request fails (EPERM, or EFAULT for PROT_NONE), `stats().errors` rises, and the
/// faulting page leaves management: a later device write to it is not seen by the CPU. The
/// accesses are all legal. (random_api: seed 0xbbf, ops `alloc,cpu,dev,kernel,migrate,mprotect,
/// check`, steps 1..3.)
#[test]
fn a2_read_back_window_over_a_protected_page_keeps_the_faulting_page() -> anyhow::Result<()> {
    common::watchdog("a2", TIMEOUT_S, || {
        for prot in [libc::PROT_READ, libc::PROT_NONE] {
            let hm = context();
            let (private, coherent) = (hm.device(0).expect("dev0"), hm.device(1).expect("dev1"));
            let buf = hm.alloc(37 * PAGE_SIZE)?;
            let a = buf.addr();
            let what = if prot == libc::PROT_NONE {
                "PROT_NONE"
            } else {
                "PROT_READ"
            };
            mprotect(a + 20 * PAGE_SIZE, PAGE_SIZE, prot);
            // The runtime learns the protection at a device access (runtime.md §4).
            let _ = coherent.read(a + 20 * PAGE_SIZE, PAGE_SIZE);
            cpu_write(a + 14 * PAGE_SIZE, &[5]);
            private.read(a + 14 * PAGE_SIZE, PAGE_SIZE)?;
            cpu_write(a + 14 * PAGE_SIZE, &[6]);
            assert_eq!(
                hm.stats().errors,
                0,
                "{what}: stats().errors after the CPU write"
            );
            private.write(a + 14 * PAGE_SIZE, &[0x44; PAGE_SIZE])?;
            let got = cpu_read(a + 14 * PAGE_SIZE, 1)[0];
            assert_eq!(
                got, 0x44,
                "{what} page 20: the CPU reads page 14 as {got:#04x} after a device wrote 0x44"
            );
        }
        Ok(())
    })
}

/// **NEW**: data adopted by `register` and never touched is zeroed by a device read whose copies
/// fail. A 512-page registration of 0x11; page 249 discarded and read by the coherent device;
/// then the private device reads pages 101..511 while its next two transfers fail (the read
/// fails with `Io`, fine): pages 250..510 then read zero everywhere. With one failing transfer,
/// or without the coherent read of the discarded page, nothing is lost. A failed copy must keep
/// the data where it was (`docs/protocol.md` §6). (random_api: seed 0x27d3, ops
/// `-munmap,-mremap,-dontunmap,-mprotect,-protect,-fork,-forkprot,-forkcalls,-exclusive,
/// -badargs,-huge,-fifo,-dropfail`, steps 20,21,26.)
#[test]
fn new_adopted_pages_survive_failed_device_copies() -> anyhow::Result<()> {
    common::watchdog("adopted", TIMEOUT_S, || {
        let hm = context();
        let (private, coherent) = (hm.device(0).expect("dev0"), hm.device(1).expect("dev1"));
        let len = 512 * PAGE_SIZE;
        let p = anon_filled(len, 0x11);
        // SAFETY: our own private anonymous mapping, which nothing else touches.
        let reg = unsafe { hm.register(p as *mut u8, len) }?;
        let a = reg.addr();
        hm.discard(a + 249 * PAGE_SIZE, PAGE_SIZE)?;
        coherent.read(a + 249 * PAGE_SIZE, PAGE_SIZE)?;
        private.inject_transfer_failures(2);
        let r = private.read(a + 101 * PAGE_SIZE, 410 * PAGE_SIZE);
        private.inject_transfer_failures(0);
        assert!(
            matches!(r, Ok(_) | Err(Error::Io(_))),
            "the read with failing copies: {:?}",
            r.map(|v| v.len())
        );
        let got = coherent.read(a, len)?;
        let lost: Vec<usize> = (0..512)
            .filter(|&pg| pg != 249)
            .filter(|&pg| {
                got[pg * PAGE_SIZE..(pg + 1) * PAGE_SIZE]
                    .iter()
                    .any(|&b| b != 0x11)
            })
            .collect();
        assert!(
            lost.is_empty(),
            "{} pages lost their registered data (first {:?}, last {:?})",
            lost.len(),
            lost.first(),
            lost.last()
        );
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// fork
// ------------------------------------------------------------------------------------------

/// **NEW**: the fork child's copy of a view does not keep the view's protection: a PROT_NONE
/// page of the parent is readable in the child, a PROT_READ one writable (`write(2)` from it
/// and `read(2)` into it succeed instead of failing with EFAULT). `fork(2)` keeps every
/// mapping's protection; the child handler `mremap`s a read-write anonymous copy over the view.
/// (random_api's `forkprot` class: every seed with a PROT_NONE or PROT_READ view.)
#[test]
fn new_fork_child_keeps_the_protection_of_managed_views() -> anyhow::Result<()> {
    common::watchdog("fork_prot", TIMEOUT_S, || {
        let hm = context();
        let buf = hm.alloc(4 * PAGE_SIZE)?;
        let a = buf.addr();
        cpu_write(a, &[0x11; 4 * PAGE_SIZE]);
        mprotect(a + PAGE_SIZE, PAGE_SIZE, libc::PROT_NONE);
        mprotect(a + 2 * PAGE_SIZE, PAGE_SIZE, libc::PROT_READ);
        let code = in_child(Duration::from_secs(20), move || {
            let mut fds = [0; 2];
            // SAFETY: `fds` is two ints for the kernel to fill.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: the kernel reads the page; a page it may not read gives EFAULT.
            let w = unsafe { libc::write(fds[1], (a + PAGE_SIZE) as *const libc::c_void, 16) };
            // SAFETY: fills the pipe from our stack.
            unsafe { libc::write(fds[1], [0x5au8; 16].as_ptr().cast(), 16) };
            // SAFETY: the kernel writes the page; a page it may not write gives EFAULT.
            let r = unsafe { libc::read(fds[0], (a + 2 * PAGE_SIZE) as *mut libc::c_void, 16) };
            i32::from(w != -1) + 2 * i32::from(r != -1)
        });
        assert_eq!(
            code, 0,
            "in the child (1: a PROT_NONE page was readable, 2: a PROT_READ page was writable, \
             3: both)"
        );
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Bad arguments
// ------------------------------------------------------------------------------------------

/// **NEW**: `Hetmem::advise` accepts advice that names a device the context does not have
/// (`PreferredLocation(Some(Device(5)))`, `AccessedBy(5, true)`) and returns `Ok`;
/// `Hetmem::migrate` to the same device fails with `Invalid` ("no such device"). (random_api's
/// `badargs` class: "a device that does not exist".)
#[test]
fn new_advise_naming_a_missing_device_fails_with_invalid() -> anyhow::Result<()> {
    let hm = context();
    let buf = hm.alloc(4 * PAGE_SIZE)?;
    let bogus = DeviceId::new(5).expect("below 8");
    assert!(matches!(
        hm.migrate(buf.addr(), PAGE_SIZE, Target::Device(bogus)),
        Err(Error::Invalid(_))
    ));
    let preferred = hm.advise(
        buf.addr(),
        PAGE_SIZE,
        Advice::PreferredLocation(Some(Mem::Device(bogus))),
    );
    let accessed = hm.advise(buf.addr(), PAGE_SIZE, Advice::AccessedBy(bogus, true));
    assert!(
        matches!(preferred, Err(Error::Invalid(_))) && matches!(accessed, Err(Error::Invalid(_))),
        "advice naming device 5 of a 2-device context: PreferredLocation {preferred:?}, \
         AccessedBy {accessed:?}"
    );
    Ok(())
}
