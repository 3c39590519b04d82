//! A port of the kernel's HMM selftest (`tools/testing/selftests/mm/hmm-tests.c`, run against
//! `lib/test_hmm.c`, the "dmirror" device) to hetmem's user-space HMM and its simulated devices.
//!
//! Each scenario runs twice, as the selftest's fixture variants do: once on a private device
//! (`private::*`, like `hmm_device_private`, `MEMORY_DEVICE_PRIVATE`) and once on a coherent device
//! (`coherent::*`, like `hmm_device_coherent`, `MEMORY_DEVICE_COHERENT`). The two-device fixture
//! (`hmm2`) becomes a context with two devices of the same kind. Every test builds its own
//! [`Hetmem`] with 16 MiB devices and runs under a watchdog, so a hang fails the test instead of
//! stopping the suite.
//!
//! Translation of the dmirror interface:
//!
//! | selftest | here |
//! |---|---|
//! | `mmap(MAP_PRIVATE \| MAP_ANONYMOUS)` | `hm.alloc(len)` (a [`hetmem::ManagedBuf`]); `hm.register` in `migrate_shared` |
//! | `HMM_DMIRROR_READ` / `_WRITE` into/from `buffer->mirror` | `dev.read` / `dev.write` |
//! | `buffer->faults`, `buffer->cpages` after a read/write | `dev.counters().faults`, `.pages`, after `dev.reset_counters()` |
//! | `HMM_DMIRROR_MIGRATE_TO_DEV` / `_TO_SYS`, `cpages` | `dev.migrate_to_device` / `migrate_to_system`, `counters().migrated_in`, and `snapshot` locations |
//! | `HMM_DMIRROR_SNAPSHOT`, `HMM_DMIRROR_PROT_*` | `dev.snapshot` → [`PageState`] `{ cpu, location, error }` |
//! | `HMM_DMIRROR_EXCLUSIVE` / `_CHECK_EXCLUSIVE` | `dev.exclusive` / `dev.check_exclusive` |
//! | `HMM_DMIRROR_RELEASE` | `dev.release` |
//! | `-EFAULT`, `-EPERM`, `-EINVAL`, `-ENOENT` | `Error::Fault(_)`, `Error::Perm`, `Error::Invalid(_)`, `Error::NoEnt(_)` (and `.errno()`) |
//!
//! Ported scenarios (same names; both variants unless said otherwise):
//!
//! | original | adaptation |
//! |---|---|
//! | `open_close` | build, look up the device, drop; also `device(1)` is absent and an unaligned `alloc` is `Invalid` |
//! | `anon_read` | as is: two zero pages (one CPU-read as a zero page), `PROT_READ`, one fault round, npages faulted |
//! | `anon_read_prot` | as is: `PROT_NONE` → `Error::Fault(_)`, the data stays intact |
//! | `anon_write` | as is |
//! | `anon_write_prot` | as is: `PROT_READ` → `Error::Perm`, nothing written; after `PROT_READ\|WRITE` it works |
//! | `anon_write_child` | `{4 MiB, 2 MiB} × {in system, migrated}`. The child may not use the context, so the device write happens in the parent after `fork`; the child must still see the pre-fork data (COW), then writes its own copy with the CPU, which the parent must not see |
//! | `anon_write_huge` | a 2 MiB buffer (one hetmem block) instead of a THP |
//! | `migrate` | as is, plus location checks and a `hm.migrate` round trip to system and back |
//! | `migrate_fault` | as is; plus: the CPU reads of half the pages move ≥ half the pages back (private) or none (coherent: the CPU maps device memory) |
//! | `migrate_release` | as is, plus: every page is back in system memory and counted in `Stats::pages_to_system` |
//! | `migrate_shared` | `MAP_SHARED\|MAP_ANONYMOUS` memory cannot be registered (`Invalid`, the original's `-ENOENT` on migrate); a private anonymous control region registers, migrates and comes back intact |
//! | `migrate_mixed` (hmm2) | as is, but a page on device 1 *can* be migrated to device 0 (hetmem copies device to device; the kernel returns `-ENOENT`) |
//! | `migrate_multiple` | as is: private pages come back by CPU faults, coherent ones by `migrate_to_system` |
//! | `anon_read_multiple` | as is |
//! | `anon_teardown` | as is, with a `Barrier` and a varying spin instead of a random `nanosleep`; `Ok` with correct data or `Error::Fault(_)` |
//! | `snapshot` (hmm2) | as is. `HMM_DMIRROR_PROT_NONE` for a page on the other private device becomes `Location::PrivateRemote`; the snapshot must not fault or move pages |
//! | `double_map` (hmm2) | as is ("two mirrors" reading the same read-only memory; then device 0 reads pages that live on device 1) |
//! | `exclusive` | as is; also: the exclusive device may read without losing atomics, and every page is revoked after the CPU touched it |
//! | `exclusive_mprotect` | as is |
//! | `exclusive_cow` | as is (parent and child each increment every int with the CPU) |
//! | `hmm_cow_in_device` | the child checks the pre-fork data before and after the parent's CPU writes (through a pipe, not by being killed); the parent's pages end up CPU-writable in system memory (private) or system/coherent memory (coherent) |
//! | `migrate_anon_huge_empty` | 2 MiB, never touched, `PROT_READ` |
//! | `migrate_anon_huge_zero` | 2 MiB, read-only zero pages |
//! | `migrate_anon_huge_free` | `MADV_FREE` on migrated memory (each page afterwards reads either its data or zeros), then `hm.discard` (zeros, no data left anywhere) |
//! | `migrate_anon_huge_fault` | 2 MiB without `MADV_COLLAPSE`; for private devices `/proc/self/pagemap` must show the pages not present (they live in device memory) until the CPU faults them back |
//! | `migrate_partial_unmap_fault` | munmap half of a migrated 2 MiB buffer at offsets 0, 1/4, 1/2; the rest faults back intact, the hole is `Error::Fault(_)` for the device, then the buffer is dropped normally |
//! | `migrate_remap_fault` | only the "after" order: migrate, then `mremap(MREMAP_MAYMOVE\|MREMAP_FIXED [\|MREMAP_DONTUNMAP])` to three offsets, then CPU faults at the new address; with `DONTUNMAP` the old range still shows the data (an alias, as for a shared mapping) |
//!
//! `mod teardown` adds races the selftest only touches in `anon_teardown`: a device
//! `kernel_read`/`kernel_write` on one thread while another drops the buffer or munmaps half of
//! it. The result must be `Ok` (with every run's data correct) or `Error::Fault(_)`, never a hang or
//! a crash; afterwards the device must still take a 12 MiB migration (no leaked frames).
//!
//! Not ported:
//!
//! - `anon_write_child_shared`: needs shared anonymous memory, which hetmem does not manage
//!   (registration refuses it; `migrate_shared` checks that).
//! - `anon_write_hugetlbfs`, `compound`: hugetlbfs pages (`MAP_HUGETLB`); hetmem manages 4 KiB
//!   pages of private anonymous memory. The THP tests are ported with 2 MiB buffers instead.
//! - `file_read`, `file_write`, `migrate_file_private`: file-backed mappings are not in the
//!   runtime API yet.
//! - `mixedmap`: mmaps the dmirror device file itself (`VM_MIXEDMAP`); there is no device file.
//! - `hmm_gup_test`: needs the `gup_test` debugfs driver. (A later adaptation could pin or read
//!   device-resident pages from the kernel, e.g. `process_vm_readv` or `write(2)` from the buffer.)
//! - `migrate_anon_huge_err`, `migrate_anon_huge_zero_err`: need dmirror's
//!   `HMM_DMIRROR_FLAG_FAIL_ALLOC` fault injection for THP allocation; hetmem has no such hook.
//! - `benchmark_thp_migration`: a benchmark, not a test.
//! - `migrate_remap_fault`'s "before" order (mremap, then migrate at the new address): device
//!   operations on a range moved away from its `ManagedBuf` are not specified.
// The tests call libc (mprotect, munmap, mremap, fork) directly.
#![allow(unsafe_code)]
// Counter fields are cast with `as u64` so the tests do not depend on their integer type.
#![allow(clippy::unnecessary_cast)]

use std::ffi::c_void;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;

mod common;

use anyhow::Result;
use common::assert_err;
// The forked children here make plain CPU memory accesses only: none uses the Hetmem context.
use common::process::{fork_child, last_os_error, pipe};
use hetmem::{CpuProt, Device, DeviceKind, Error, Hetmem, Location, PageState, Target, PAGE_SIZE};
use libc::c_int;

/// Capacity of each simulated device.
const DEV_CAPACITY: usize = 16 << 20;
/// `HMM_BUFFER_SIZE` of the selftest: 1024 pages.
const HMM_BUFFER_SIZE: usize = 1024 << 12;
/// The selftest's `TWOMEG`, and the PMD size its THP tests use.
const TWOMEG: usize = 2 << 20;
/// The selftest's `NTIMES`.
const NTIMES: usize = 10;
/// How long one test may run before the watchdog calls it hung (`HETMEM_TEST_TIMEOUT_S`).
const DEFAULT_TIMEOUT_S: u64 = 120;
// ---------------------------------------------------------------------------------------------
// Fixture: variants, context, watchdog
// ---------------------------------------------------------------------------------------------

/// The fixture variant: which kind of device the scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Private,
    Coherent,
}

impl Variant {
    fn kind(self) -> DeviceKind {
        match self {
            Variant::Private => DeviceKind::Private,
            Variant::Coherent => DeviceKind::Coherent,
        }
    }

    fn coherent(self) -> bool {
        self == Variant::Coherent
    }

    /// The page lives in the memory of the device that took the snapshot.
    fn is_local(self, l: &Location) -> bool {
        match self {
            Variant::Private => matches!(l, Location::PrivateLocal),
            Variant::Coherent => matches!(l, Location::CoherentLocal),
        }
    }

    /// The page lives in the memory of another device of the same kind.
    fn is_remote(self, l: &Location) -> bool {
        match self {
            Variant::Private => matches!(l, Location::PrivateRemote),
            Variant::Coherent => matches!(l, Location::CoherentRemote),
        }
    }

    fn local_name(self) -> &'static str {
        match self {
            Variant::Private => "PrivateLocal",
            Variant::Coherent => "CoherentLocal",
        }
    }
}

/// A context with `ndevices` simulated devices of the variant's kind (the `hmm` / `hmm2` fixture).
fn context(v: Variant, ndevices: usize) -> Result<Hetmem> {
    let k = v.kind();
    let hm = match ndevices {
        1 => Hetmem::builder().sim_device(k, DEV_CAPACITY).build()?,
        2 => Hetmem::builder()
            .sim_device(k, DEV_CAPACITY)
            .sim_device(k, DEV_CAPACITY)
            .build()?,
        n => panic!("fixture with {n} devices"),
    };
    Ok(hm)
}

fn device(hm: &Hetmem, i: usize) -> Device {
    hm.device(i)
        .unwrap_or_else(|| panic!("device {i} missing from the context"))
}

/// Instantiates `#[test]`s for the listed scenario functions of the invoking module, in a `private`
/// and a `coherent` module, like the selftest's `FIXTURE_VARIANT_ADD`s.
macro_rules! variants {
    ($($name:ident),* $(,)?) => {
        mod private {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    crate::common::watchdog(concat!("private::", stringify!($name)), crate::DEFAULT_TIMEOUT_S, || {
                        super::$name(crate::Variant::Private)
                    })
                }
            )*
        }
        mod coherent {
            $(
                #[test]
                fn $name() -> anyhow::Result<()> {
                    crate::common::watchdog(concat!("coherent::", stringify!($name)), crate::DEFAULT_TIMEOUT_S, || {
                        super::$name(crate::Variant::Coherent)
                    })
                }
            )*
        }
    };
}

variants!(
    open_close,
    anon_read,
    anon_read_prot,
    anon_write,
    anon_write_prot,
    anon_write_child,
    anon_write_huge,
    migrate,
    migrate_fault,
    migrate_release,
    migrate_shared,
    migrate_mixed,
    migrate_multiple,
    anon_read_multiple,
    anon_teardown,
    snapshot,
    double_map,
    exclusive,
    exclusive_mprotect,
    exclusive_cow,
    hmm_cow_in_device,
    migrate_anon_huge_empty,
    migrate_anon_huge_zero,
    migrate_anon_huge_free,
    migrate_anon_huge_fault,
    migrate_partial_unmap_fault,
    migrate_remap_fault,
);

// ---------------------------------------------------------------------------------------------
// Data helpers: the selftest's `int *ptr; ptr[i] = f(i)` loops
// ---------------------------------------------------------------------------------------------

/// Writes `f(i)` into the `i`-th native-endian `i32` of `mem`.
fn fill(mem: &mut [u8], f: impl Fn(usize) -> i32) {
    for (i, w) in mem.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&f(i).to_ne_bytes());
    }
}

/// A buffer whose `i`-th `i32` is `f(i)`: the selftest's `buffer->mirror` for device writes.
fn pattern(len: usize, f: impl Fn(usize) -> i32) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, f);
    v
}

fn word(w: &[u8]) -> i32 {
    i32::from_ne_bytes([w[0], w[1], w[2], w[3]])
}

/// The first `i32` that differs from `f(i)`: `(index, found, expected)`. Allocates nothing, so
/// forked children may use it.
fn mismatch(mem: &[u8], f: impl Fn(usize) -> i32) -> Option<(usize, i32, i32)> {
    mem.chunks_exact(4).enumerate().find_map(|(i, w)| {
        let (got, want) = (word(w), f(i));
        (got != want).then_some((i, got, want))
    })
}

/// Asserts that the `i`-th `i32` of `mem` is `f(i)`.
#[track_caller]
fn check(what: &str, mem: &[u8], f: impl Fn(usize) -> i32) {
    assert_eq!(
        mem.len() % 4,
        0,
        "{what}: length {} is not whole ints",
        mem.len()
    );
    if let Some((i, got, want)) = mismatch(mem, f) {
        panic!(
            "{what}: int {i} (page {}, byte {}) is {got}, expected {want}",
            i * 4 / PAGE_SIZE,
            i * 4
        );
    }
}

/// The `i32` at byte offset `off`.
fn int_at(mem: &[u8], off: usize) -> i32 {
    word(&mem[off..off + 4])
}

/// `ASSERT_EQ(ptr[i]++, f(i))` over all of `mem`: checks each int, then increments it.
fn check_and_increment(mem: &mut [u8], f: impl Fn(usize) -> i32) -> Option<(usize, i32, i32)> {
    for (i, w) in mem.chunks_exact_mut(4).enumerate() {
        let got = word(w);
        if got != f(i) {
            return Some((i, got, f(i)));
        }
        w.copy_from_slice(&got.wrapping_add(1).to_ne_bytes());
    }
    None
}

fn ident(i: usize) -> i32 {
    i as i32
}

fn zero(_: usize) -> i32 {
    0
}

// ---------------------------------------------------------------------------------------------
// Counter and snapshot helpers
// ---------------------------------------------------------------------------------------------

/// `ASSERT_EQ(buffer->faults, faults); ASSERT_EQ(buffer->cpages, pages)` for the device access
/// since the last `reset_counters()`.
#[track_caller]
fn assert_faulted(what: &str, dev: &Device, faults: u64, pages: usize) {
    let c = dev.counters();
    assert_eq!(
        c.faults as u64, faults,
        "{what}: fault rounds; counters {c:?}"
    );
    assert_eq!(
        c.pages as u64, pages as u64,
        "{what}: pages faulted in; counters {c:?}"
    );
}

/// `ASSERT_EQ(buffer->cpages, npages)` after a migration since the last `reset_counters()`.
#[track_caller]
fn assert_migrated_in(what: &str, dev: &Device, pages: usize) {
    let c = dev.counters();
    assert_eq!(
        c.migrated_in as u64, pages as u64,
        "{what}: pages migrated in; counters {c:?}"
    );
}

fn pages_to_system(hm: &Hetmem) -> u64 {
    hm.stats().pages_to_system as u64
}

/// A snapshot of `npages` pages at `addr`, one state per page.
fn snapshot_of(dev: &Device, addr: usize, npages: usize) -> Result<Vec<PageState>> {
    let s = dev.snapshot(addr, npages * PAGE_SIZE)?;
    assert_eq!(s.len(), npages, "snapshot: one state per page");
    Ok(s)
}

/// Asserts `pred` of every page state.
#[track_caller]
fn assert_pages(
    what: &str,
    states: &[PageState],
    expected: &str,
    pred: impl Fn(&PageState) -> bool,
) {
    for (i, s) in states.iter().enumerate() {
        assert!(pred(s), "{what}: page {i} is {s:?}, expected {expected}");
    }
}

/// Asserts that every page lives in the variant's local device memory.
#[track_caller]
fn assert_all_local(what: &str, v: Variant, states: &[PageState]) {
    assert_pages(what, states, v.local_name(), |s| {
        !s.error && v.is_local(&s.location)
    });
}

/// Asserts that every page lives in system memory.
#[track_caller]
fn assert_all_system(what: &str, states: &[PageState]) {
    assert_pages(what, states, "System", |s| {
        !s.error && matches!(s.location, Location::System)
    });
}

/// Whether the CPU has page `addr` present, from `/proc/self/pagemap` (bit 63). Reading the
/// pagemap does not fault the page in.
fn cpu_present(addr: usize) -> bool {
    let f = File::open("/proc/self/pagemap").expect("open /proc/self/pagemap");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE_SIZE * 8) as u64)
        .expect("read /proc/self/pagemap");
    u64::from_ne_bytes(b) >> 63 & 1 == 1
}

// ---------------------------------------------------------------------------------------------
// System call helpers
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn mprotect(addr: usize, len: usize, prot: c_int) {
    // SAFETY: changes the protection of pages the calling test owns (a ManagedBuf or its own mmap);
    // the test only touches them with the CPU in ways the new protection allows.
    let r = unsafe { libc::mprotect(addr as *mut c_void, len, prot) };
    assert_eq!(
        r,
        0,
        "mprotect({addr:#x}, {len:#x}, {prot}): {}",
        last_os_error()
    );
}

#[track_caller]
fn munmap(addr: usize, len: usize) {
    // SAFETY: unmaps part of memory the calling test owns; the test never touches the range
    // with the CPU afterwards, and it keeps no Rust reference into it.
    let r = unsafe { libc::munmap(addr as *mut c_void, len) };
    assert_eq!(r, 0, "munmap({addr:#x}, {len:#x}): {}", last_os_error());
}

fn madvise(addr: usize, len: usize, advice: c_int) -> c_int {
    // SAFETY: advice on memory the calling test owns; MADV_FREE only lets the kernel drop
    // private anonymous data, which the test then treats as "data or zeros".
    unsafe { libc::madvise(addr as *mut c_void, len, advice) }
}

#[track_caller]
fn mmap_anon(len: usize, prot: c_int, flags: c_int) -> usize {
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses; nothing else changes.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap({len:#x}): {}", last_os_error());
    p as usize
}

/// In the child: closes its copy of the pipe's write end, so that it sees EOF if the parent
/// gives up.
fn close_in_child(fd: c_int) {
    // SAFETY: `fd` is the child's own copy of a descriptor nothing in the child uses.
    unsafe { libc::close(fd) };
}

/// In the child: blocks until the parent writes a byte. False if the parent closed the pipe
/// without writing (it failed).
fn child_wait_for_parent(rd: &mut File) -> bool {
    let mut b = [0u8; 1];
    matches!(rd.read(&mut b), Ok(1))
}

/// `waitpid` with a deadline: a child that hangs is killed and the test fails.
#[track_caller]
fn wait_child_ok(pid: libc::pid_t, codes: &str) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut status: c_int = 0;
        // SAFETY: waits for our own child; `status` is a valid out-parameter.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = tx.send((r, status));
    });
    let limit = common::test_timeout(DEFAULT_TIMEOUT_S) / 2;
    match rx.recv_timeout(limit) {
        Ok((r, status)) => {
            assert_eq!(r, pid, "waitpid({pid}): {}", last_os_error());
            assert!(
                libc::WIFEXITED(status),
                "child {pid} did not exit normally (status {status:#x}; signal {})",
                if libc::WIFSIGNALED(status) {
                    libc::WTERMSIG(status)
                } else {
                    0
                }
            );
            let code = libc::WEXITSTATUS(status);
            assert_eq!(
                code, 0,
                "child {pid} failed with exit code {code} ({codes})"
            );
        }
        Err(_) => {
            // SAFETY: kills our own child, which the waiter thread then reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("child {pid} still running after {limit:?}: hung");
        }
    }
}

/// Busy-waits `n` iterations: perturbs the interleaving of a race without sleeping.
fn spin(n: usize) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

/// `open_close`: a device opens and closes.
fn open_close(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    match (v, dev.kind()) {
        (Variant::Private, DeviceKind::Private) | (Variant::Coherent, DeviceKind::Coherent) => {}
        _ => panic!("device 0 has the wrong kind for {v:?}"),
    }
    assert!(hm.device(1).is_none(), "only one device was configured");
    let c = dev.counters();
    assert_eq!(
        (c.faults as u64, c.pages as u64),
        (0, 0),
        "fresh counters: {c:?}"
    );
    assert_err!(hm.alloc(PAGE_SIZE + 1), Error::Invalid(_), libc::EINVAL);
    drop(dev);
    drop(hm);
    Ok(())
}

/// `anon_read`: a device reads private anonymous memory: two zero pages (one of them CPU-read as
/// a zero page), the rest written by the CPU, all read-only.
fn anon_read(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    let skip = 2 * PAGE_SIZE;

    // Initialize the buffer in system memory but leave the first two pages zero.
    fill(&mut buf[skip..], |i| (i + skip / 4) as i32);
    mprotect(buf.addr(), size, libc::PROT_READ);
    // Populate the CPU page table with a zero page.
    assert_eq!(int_at(&buf, PAGE_SIZE), 0);

    dev.reset_counters();
    let m = dev.read(buf.addr(), size)?;
    assert_eq!(m.len(), size);
    assert_faulted("device read", &dev, 1, npages);
    check("device read of the zero pages", &m[..skip], zero);
    check("device read", &m[skip..], |i| (i + skip / 4) as i32);
    Ok(())
}

/// `anon_read_prot`: a device read of `PROT_NONE` memory fails with EFAULT and changes nothing.
fn anon_read_prot(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    mprotect(buf.addr(), size, libc::PROT_NONE);
    assert_err!(dev.read(buf.addr(), size), Error::Fault(_), libc::EFAULT);

    // Allow the CPU to read the buffer so we can check it.
    mprotect(buf.addr(), size, libc::PROT_READ);
    check("CPU read after the failed device read", &buf, ident);
    Ok(())
}

/// `anon_write`: a device writes private anonymous memory.
fn anon_write(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let buf = hm.alloc(size)?;

    let data = pattern(size, ident);
    dev.reset_counters();
    dev.write(buf.addr(), &data)?;
    assert_faulted("device write", &dev, 1, npages);
    check("CPU read of what the device wrote", &buf, ident);
    Ok(())
}

/// `anon_write_prot`: a device write of `PROT_READ` memory fails with EPERM; after
/// `mprotect(PROT_READ | PROT_WRITE)` it succeeds and replaces the zero pages.
fn anon_write_prot(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let buf = hm.alloc(size)?;
    mprotect(buf.addr(), size, libc::PROT_READ);

    // A device reads one zero page.
    dev.reset_counters();
    let m = dev.read(buf.addr(), PAGE_SIZE)?;
    assert_faulted("device read of one zero page", &dev, 1, 1);
    check("device read of a zero page", &m, zero);

    let data = pattern(size, ident);
    assert_err!(dev.write(buf.addr(), &data), Error::Perm, libc::EPERM);
    check("CPU read after the refused device write", &buf, zero);

    // Now allow writing and see that the zero pages are replaced.
    mprotect(buf.addr(), size, libc::PROT_READ | libc::PROT_WRITE);
    dev.reset_counters();
    dev.write(buf.addr(), &data)?;
    assert_faulted("device write after mprotect(RW)", &dev, 1, npages);
    check("CPU read of what the device wrote", &buf, ident);
    Ok(())
}

/// `anon_write_child`: after `fork`, a device write in the parent must copy-on-write: the child
/// keeps seeing the pre-fork data, and the child's own writes stay out of the parent.
fn anon_write_child(v: Variant) -> Result<()> {
    const CODES: &str = "1: child saw the parent's device write or lost data, \
                         2: child's own write did not stick, 3: parent gave up";
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    for migrate in [false, true] {
        for size in [HMM_BUFFER_SIZE, TWOMEG] {
            let what = format!("migrate={migrate} size={size:#x}");
            let npages = size / PAGE_SIZE;
            let mut buf = hm.alloc(size)?;
            // Initialize buf so we can tell whether it is written.
            fill(&mut buf, ident);
            if migrate {
                dev.reset_counters();
                dev.migrate_to_device(buf.addr(), size)?;
                assert_migrated_in(&what, &dev, npages);
            }

            let (mut rd, mut wr) = pipe();
            let wr_fd = wr.as_raw_fd();
            let pid = fork_child(|| {
                close_in_child(wr_fd);
                if !child_wait_for_parent(&mut rd) {
                    return 3;
                }
                // The parent's device write must not be visible here.
                if mismatch(&buf, ident).is_some() {
                    return 1;
                }
                fill(&mut buf, |i| 2 * i as i32);
                if mismatch(&buf, |i| 2 * i as i32).is_some() {
                    return 2;
                }
                0
            });
            drop(rd);

            // Simulate a device writing the parent's memory.
            let data = pattern(size, |i| -(i as i32));
            dev.reset_counters();
            dev.write(buf.addr(), &data)?;
            if !migrate {
                // Nothing was device-mapped before: every page faults, in one round.
                assert_faulted(&what, &dev, 1, npages);
            }
            wr.write_all(&[1])?;
            drop(wr);
            wait_child_ok(pid, CODES);

            // The parent sees the device's data, not the child's.
            check(&format!("{what}: parent CPU read"), &buf, |i| -(i as i32));
            let m = dev.read(buf.addr(), size)?;
            check(&format!("{what}: parent device read"), &m, |i| -(i as i32));
        }
    }
    Ok(())
}

/// `anon_write_huge`: a device writes a 2 MiB buffer (one hetmem block; the original uses a THP).
fn anon_write_huge(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let buf = hm.alloc(size)?;

    let data = pattern(size, ident);
    dev.reset_counters();
    dev.write(buf.addr(), &data)?;
    assert_faulted("device write", &dev, 1, npages);
    check("CPU read of what the device wrote", &buf, ident);
    Ok(())
}

/// `migrate`: migrate anonymous memory to device memory, then read it through the device.
fn migrate(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("migrate_to_device", &dev, npages);
    assert_all_local(
        "after migrate_to_device",
        v,
        &snapshot_of(&dev, buf.addr(), npages)?,
    );

    // Reading its own memory moves nothing back.
    let back = pages_to_system(&hm);
    let m = dev.read(buf.addr(), size)?;
    check("device read", &m, ident);
    assert_eq!(
        pages_to_system(&hm),
        back,
        "a device read of its own pages moved pages"
    );
    assert_migrated_in("after the device read", &dev, npages);

    // The context-wide prefetch does the same round trip.
    hm.migrate(buf.addr(), size, Target::System)?;
    assert_all_system(
        "after hm.migrate(System)",
        &snapshot_of(&dev, buf.addr(), npages)?,
    );
    hm.migrate(buf.addr(), size, Target::Device(dev.id()))?;
    assert_all_local(
        "after hm.migrate(Device)",
        v,
        &snapshot_of(&dev, buf.addr(), npages)?,
    );
    check("CPU read", &buf, ident);
    Ok(())
}

/// `migrate_fault`: migrate, fault half of the pages back with the CPU, migrate the mix again.
fn migrate_fault(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("first migration", &dev, npages);
    check("device read", &dev.read(buf.addr(), size)?, ident);

    // Fault half the pages back to system memory and check them.
    let before = pages_to_system(&hm);
    check("CPU read of the first half", &buf[..size / 2], ident);
    let moved = pages_to_system(&hm) - before;
    if v.coherent() {
        assert_eq!(
            moved, 0,
            "CPU reads of coherent device memory must not migrate"
        );
    } else {
        assert!(
            moved >= (npages / 2) as u64 && moved <= npages as u64,
            "CPU reads of half the private pages moved {moved} pages back"
        );
    }

    // Migrate the mix of system and device memory to the device again.
    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    let again = dev.counters().migrated_in as u64;
    if v.coherent() {
        assert_eq!(
            again,
            0,
            "nothing left the coherent device; counters {:?}",
            dev.counters()
        );
    } else {
        assert_eq!(
            again, moved,
            "second migration brings back what the CPU took"
        );
    }
    assert_all_local(
        "after the second migration",
        v,
        &snapshot_of(&dev, buf.addr(), npages)?,
    );
    check(
        "device read after the second migration",
        &dev.read(buf.addr(), size)?,
        ident,
    );
    Ok(())
}

/// `migrate_release`: migrate, release the device's memory, fault the pages back.
fn migrate_release(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("migrate_to_device", &dev, npages);
    check("device read", &dev.read(buf.addr(), size)?, ident);

    let before = pages_to_system(&hm);
    dev.release()?;
    assert_eq!(
        pages_to_system(&hm) - before,
        npages as u64,
        "release moves every page back"
    );
    assert_all_system("after release", &snapshot_of(&dev, buf.addr(), npages)?);
    check("CPU read after release", &buf, ident);
    Ok(())
}

/// `migrate_shared`: shared anonymous memory is not managed (the original gets `-ENOENT` from
/// the migration); private anonymous memory of the test's own is.
fn migrate_shared(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let npages = 16;
    let len = npages * PAGE_SIZE;
    let rw = libc::PROT_READ | libc::PROT_WRITE;

    let shared = mmap_anon(len, rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS);
    // SAFETY: `shared` is a live, page-aligned mapping of `len` bytes owned by this test.
    let r = unsafe { hm.register((shared as *mut u8).cast(), len) };
    assert_err!(r, Error::Invalid(_), libc::EINVAL);
    munmap(shared, len);

    // The control: private anonymous memory registers, migrates and comes back with its data.
    let private = mmap_anon(len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    {
        // SAFETY: the test's own mapping; no other reference to it exists.
        let mem = unsafe { std::slice::from_raw_parts_mut(private as *mut u8, len) };
        fill(mem, ident);
    }
    // SAFETY: as above; the registration is dropped before the memory is unmapped.
    let reg = unsafe { hm.register((private as *mut u8).cast(), len) }?;
    dev.reset_counters();
    dev.migrate_to_device(private, len)?;
    assert_migrated_in("migrate registered memory", &dev, npages);
    assert_all_local("registered memory", v, &snapshot_of(&dev, private, npages)?);
    check(
        "device read of registered memory",
        &dev.read(private, len)?,
        ident,
    );
    drop(reg);
    {
        // SAFETY: the registration is gone; the memory is plain private anonymous memory again.
        let mem = unsafe { std::slice::from_raw_parts(private as *const u8, len) };
        check("CPU read after the registration was dropped", mem, ident);
    }
    munmap(private, len);
    Ok(())
}

/// `migrate_mixed` (two devices): migrations of protected, partly unmapped, read-only and
/// read-write pages.
fn migrate_mixed(v: Variant) -> Result<()> {
    let hm = context(v, 2)?;
    let (dev0, dev1) = (device(&hm, 0), device(&hm, 1));
    let npages = 6;
    let size = npages * PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    let p = buf.addr();
    let page = |n: usize| p + n * PAGE_SIZE;
    mprotect(p, size, libc::PROT_NONE);

    // Migrating a protected area is an error (the original: -EINVAL).
    match dev1.migrate_to_device(p, size) {
        Err(Error::Fault(_)) | Err(Error::Invalid(_)) => {}
        r => panic!(
            "migrating PROT_NONE memory: expected Fault or Invalid, got {:?}",
            r.err()
        ),
    }

    // Punch a hole after the first page; a range that is not fully mapped is an error.
    munmap(page(1), PAGE_SIZE);
    match dev1.migrate_to_device(p, 3 * PAGE_SIZE) {
        Err(Error::Invalid(_)) | Err(Error::Fault(_)) => {}
        r => panic!(
            "migrating across a hole: expected Invalid or Fault, got {:?}",
            r.err()
        ),
    }

    // Page 2 will be a read-only zero page.
    mprotect(page(2), PAGE_SIZE, libc::PROT_READ);
    let val = int_at(&buf, 2 * PAGE_SIZE) + 3;
    assert_eq!(val, 3);
    // Page 3 will be read-only.
    mprotect(page(3), PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
    fill(&mut buf[3 * PAGE_SIZE..3 * PAGE_SIZE + 4], |_| val);
    mprotect(page(3), PAGE_SIZE, libc::PROT_READ);
    // Pages 4-5 will be read-write.
    mprotect(page(4), 2 * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
    fill(&mut buf[4 * PAGE_SIZE..4 * PAGE_SIZE + 4], |_| val);
    fill(&mut buf[5 * PAGE_SIZE..5 * PAGE_SIZE + 4], |_| val);

    // Now migrate pages 2-5 to device 1.
    dev1.migrate_to_device(page(2), 4 * PAGE_SIZE)?;
    assert_all_local("pages 2-5 on device 1", v, &snapshot_of(&dev1, page(2), 4)?);

    // Page 5 on device 1 moves to device 0 (the kernel's dmirror refuses with -ENOENT).
    dev0.migrate_to_device(page(5), PAGE_SIZE)?;
    assert_all_local("page 5 from device 0", v, &snapshot_of(&dev0, page(5), 1)?);
    let s = snapshot_of(&dev1, page(5), 1)?;
    assert!(
        v.is_remote(&s[0].location),
        "page 5 from device 1: {:?}",
        s[0]
    );

    // The data moved with the pages.
    let m = dev1.read(page(2), 3 * PAGE_SIZE)?;
    check("device 1 read of page 2", &m[..PAGE_SIZE], zero);
    assert_eq!(int_at(&m, PAGE_SIZE), val, "device 1 read of page 3");
    assert_eq!(int_at(&m, 2 * PAGE_SIZE), val, "device 1 read of page 4");
    check(
        "device 1 read of page 4 past its first int",
        &m[2 * PAGE_SIZE + 4..],
        zero,
    );
    let m = dev0.read(page(5), PAGE_SIZE)?;
    assert_eq!(int_at(&m, 0), val, "device 0 read of page 5");
    check("device 0 read of page 5 past its first int", &m[4..], zero);
    Ok(())
}

/// `migrate_multiple`: migrate to the device and back to system memory, ten times. Private pages
/// come back through CPU faults; coherent pages are migrated back explicitly, since the CPU
/// reaches them without faulting.
fn migrate_multiple(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    for c in 0..NTIMES {
        let what = format!("round {c}");
        let mut buf = hm.alloc(size)?;
        fill(&mut buf, ident);

        dev.reset_counters();
        dev.migrate_to_device(buf.addr(), size)?;
        assert_migrated_in(&what, &dev, npages);
        check(&what, &dev.read(buf.addr(), size)?, ident);

        let before = pages_to_system(&hm);
        if v.coherent() {
            dev.migrate_to_system(buf.addr(), size)?;
            assert_all_system(&what, &snapshot_of(&dev, buf.addr(), npages)?);
        }
        check(&format!("{what}: CPU read"), &buf, ident);
        assert_eq!(
            pages_to_system(&hm) - before,
            npages as u64,
            "{what}: every page came back to system memory"
        );
    }
    Ok(())
}

/// `anon_read_multiple`: a device reads fresh anonymous memory, ten times.
fn anon_read_multiple(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    for c in 0..NTIMES {
        let what = format!("round {c}");
        let mut buf = hm.alloc(size)?;
        fill(&mut buf, |i| (i + c) as i32);

        dev.reset_counters();
        let m = dev.read(buf.addr(), size)?;
        assert_faulted(&what, &dev, 1, npages);
        check(&what, &m, |i| (i + c) as i32);
    }
    Ok(())
}

/// `anon_teardown`: a device reads memory while another thread unmaps half of it. The read
/// either completes with the right data or fails with EFAULT.
fn anon_teardown(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let (mut oks, mut faults) = (0, 0);
    for c in 0..NTIMES {
        let mut buf = hm.alloc(size)?;
        fill(&mut buf, |i| (i + c) as i32);
        let addr = buf.addr();

        let barrier = Arc::new(Barrier::new(2));
        let unmapper = {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                spin(c * 20_000);
                munmap(addr + size / 2, size / 2);
            })
        };
        barrier.wait();
        match dev.read(addr, size) {
            Ok(m) => {
                oks += 1;
                check(&format!("round {c}: device read"), &m, |i| (i + c) as i32);
            }
            Err(Error::Fault(_)) => faults += 1,
            Err(e) => panic!("round {c}: device read during munmap: {e:?}, expected Ok or Fault"),
        }
        unmapper.join().expect("unmapper thread panicked");

        // What is still mapped is intact.
        check(
            &format!("round {c}: CPU read of the mapped half"),
            &buf[..size / 2],
            |i| (i + c) as i32,
        );
        drop(buf);
    }
    eprintln!("anon_teardown({v:?}): {oks} reads completed, {faults} faulted");
    Ok(())
}

/// `snapshot` (two devices): a snapshot of the CPU page tables without faulting.
fn snapshot(v: Variant) -> Result<()> {
    let hm = context(v, 2)?;
    let (dev0, dev1) = (device(&hm, 0), device(&hm, 1));
    let npages = 7;
    let size = npages * PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    let p = buf.addr();
    let page = |n: usize| p + n * PAGE_SIZE;
    mprotect(p, size, libc::PROT_NONE);

    // Punch a hole after the first page.
    munmap(page(1), PAGE_SIZE);
    // Page 2 will be a read-only zero page.
    mprotect(page(2), PAGE_SIZE, libc::PROT_READ);
    let val = int_at(&buf, 2 * PAGE_SIZE) + 3;
    assert_eq!(val, 3);
    // Page 3 will be read-only.
    mprotect(page(3), PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
    fill(&mut buf[3 * PAGE_SIZE..3 * PAGE_SIZE + 4], |_| val);
    mprotect(page(3), PAGE_SIZE, libc::PROT_READ);
    // Pages 4-6 will be read-write.
    mprotect(page(4), 3 * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
    fill(&mut buf[4 * PAGE_SIZE..4 * PAGE_SIZE + 4], |_| val);

    // Page 5 will be migrated to device 0, page 6 to device 1.
    dev0.migrate_to_device(page(5), PAGE_SIZE)?;
    dev1.migrate_to_device(page(6), PAGE_SIZE)?;

    // Simulate a device snapshotting the CPU page tables.
    dev0.reset_counters();
    let m = snapshot_of(&dev0, p, npages)?;
    assert!(
        m[0].error,
        "page 0 (PROT_NONE): {:?}, expected an error",
        m[0]
    );
    assert!(
        m[1].error,
        "page 1 (unmapped): {:?}, expected an error",
        m[1]
    );
    // hetmem has no shared zero page: a first-touch read fills a private zero page and maps it
    // writable (read-only where the mapping is PROT_READ), so either permission is right here.
    assert!(
        !m[2].error
            && matches!(m[2].cpu, CpuProt::Read | CpuProt::Write)
            && matches!(m[2].location, Location::None | Location::System),
        "page 2 (read-only zero page): {:?}",
        m[2]
    );
    assert!(
        !m[3].error
            && matches!(m[3].cpu, CpuProt::Read)
            && matches!(m[3].location, Location::System),
        "page 3 (written, then read-only): {:?}",
        m[3]
    );
    assert!(
        !m[4].error
            && matches!(m[4].cpu, CpuProt::Write)
            && matches!(m[4].location, Location::System),
        "page 4 (read-write): {:?}",
        m[4]
    );
    assert!(
        !m[5].error && v.is_local(&m[5].location),
        "page 5 (on device 0): {:?}",
        m[5]
    );
    assert!(
        !m[6].error && v.is_remote(&m[6].location),
        "page 6 (on device 1): {:?}",
        m[6]
    );

    // The snapshot neither faulted nor moved anything.
    assert_eq!(
        dev0.counters().faults as u64,
        0,
        "snapshot faulted: {:?}",
        dev0.counters()
    );
    let s = snapshot_of(&dev1, page(6), 1)?;
    assert!(
        v.is_local(&s[0].location),
        "page 6 from device 1 after the snapshot: {:?}",
        s[0]
    );
    Ok(())
}

/// `double_map` (two devices): both devices read the same read-only memory; then device 0 reads
/// pages that were migrated to device 1.
fn double_map(v: Variant) -> Result<()> {
    let hm = context(v, 2)?;
    let (dev0, dev1) = (device(&hm, 0), device(&hm, 1));
    let npages = 6;
    let size = npages * PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);
    mprotect(buf.addr(), size, libc::PROT_READ);

    for (n, dev) in [(0, &dev0), (1, &dev1)] {
        dev.reset_counters();
        let m = dev.read(buf.addr(), size)?;
        assert_faulted(&format!("device {n} read"), dev, 1, npages);
        check(&format!("device {n} read"), &m, ident);
    }

    // Migrate the pages to device 1 and read them from device 0.
    // hetmem migrates on device read faults (as UVM does; dmirror maps system memory), so
    // device 1 may already hold copies: check where the data is, not how much moved.
    dev1.migrate_to_device(buf.addr(), size)?;
    let snap = dev1.snapshot(buf.addr(), size)?;
    assert!(
        snap.iter().all(|s| v.is_local(&s.location)),
        "after migrate to device 1: {snap:?}"
    );
    dev0.reset_counters();
    let m = dev0.read(buf.addr(), size)?;
    assert_faulted("device 0 read of device 1's pages", &dev0, 1, npages);
    check("device 0 read of device 1's pages", &m, ident);
    check("CPU read", &buf, ident);
    Ok(())
}

/// `exclusive`: device atomics; any CPU access revokes them.
fn exclusive(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    // Map memory exclusively for device access.
    dev.exclusive(buf.addr(), size)?;
    assert!(
        dev.check_exclusive(buf.addr(), size)?,
        "every page exclusive after exclusive()"
    );
    // The exclusive device reads without losing its atomics.
    check("device read", &dev.read(buf.addr(), size)?, ident);
    assert!(
        dev.check_exclusive(buf.addr(), size)?,
        "a read by the exclusive device itself revoked its atomics"
    );

    // Fault pages back to system memory and check them.
    if let Some((i, got, want)) = check_and_increment(&mut buf, ident) {
        panic!("CPU read of exclusive memory: int {i} is {got}, expected {want}");
    }
    check("CPU read after the increment", &buf, |i| i as i32 + 1);

    // Check that the atomic access is revoked, page by page.
    for n in 0..npages {
        assert!(
            !dev.check_exclusive(buf.addr() + n * PAGE_SIZE, PAGE_SIZE)?,
            "page {n} still exclusive after a CPU write"
        );
    }
    check(
        "device read after revocation",
        &dev.read(buf.addr(), size)?,
        |i| i as i32 + 1,
    );
    Ok(())
}

/// `exclusive_mprotect`: after `mprotect(PROT_READ)`, a device write to exclusive memory fails
/// with EPERM.
fn exclusive_mprotect(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.exclusive(buf.addr(), size)?;
    assert!(
        dev.check_exclusive(buf.addr(), size)?,
        "every page exclusive after exclusive()"
    );
    check("device read", &dev.read(buf.addr(), size)?, ident);

    mprotect(buf.addr(), size, libc::PROT_READ);
    let data = pattern(size, |i| -(i as i32));
    assert_err!(dev.write(buf.addr(), &data), Error::Perm, libc::EPERM);
    check("CPU read after the refused write", &buf, ident);
    Ok(())
}

/// `exclusive_cow`: fork with memory mapped exclusively by the device; parent and child each
/// increment every int with the CPU, and each sees only its own increments.
fn exclusive_cow(v: Variant) -> Result<()> {
    const CODES: &str = "1: child read wrong data, 2: child's increments did not stick";
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = HMM_BUFFER_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.exclusive(buf.addr(), size)?;
    assert!(
        dev.check_exclusive(buf.addr(), size)?,
        "every page exclusive after exclusive()"
    );

    let pid = fork_child(|| {
        if check_and_increment(&mut buf, ident).is_some() {
            return 1;
        }
        if mismatch(&buf, |i| i as i32 + 1).is_some() {
            return 2;
        }
        0
    });

    // Parent: also increment to verify COW works for both processes.
    if let Some((i, got, want)) = check_and_increment(&mut buf, ident) {
        panic!("parent CPU read: int {i} is {got}, expected {want}");
    }
    check("parent CPU read after the increment", &buf, |i| {
        i as i32 + 1
    });
    wait_child_ok(pid, CODES);

    // The child's increments stayed in the child.
    check("parent CPU read after the child exited", &buf, |i| {
        i as i32 + 1
    });
    assert!(
        !dev.check_exclusive(buf.addr(), PAGE_SIZE)?,
        "page 0 still exclusive"
    );
    check("device read", &dev.read(buf.addr(), size)?, |i| {
        i as i32 + 1
    });
    Ok(())
}

/// `hmm_cow_in_device`: fork with pages in device memory, then the parent writes them. The
/// parent gets its own writable copies (for private pages, after migrating them back); the child
/// keeps the pre-fork data.
fn hmm_cow_in_device(v: Variant) -> Result<()> {
    const CODES: &str = "1: child read wrong data at once, \
                         2: child saw the parent's writes, 3: parent gave up";
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let npages = 4;
    let size = npages * PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("migrate_to_device", &dev, npages);

    let (mut rd, mut wr) = pipe();
    let wr_fd = wr.as_raw_fd();
    let pid = fork_child(|| {
        close_in_child(wr_fd);
        if mismatch(&buf, ident).is_some() {
            return 1;
        }
        if !child_wait_for_parent(&mut rd) {
            return 3;
        }
        if mismatch(&buf, ident).is_some() {
            return 2;
        }
        0
    });
    drop(rd);

    // The parent writes the COW pages and gets new copies.
    fill(&mut buf, |i| i as i32 + 7);
    wr.write_all(&[1])?;
    drop(wr);
    wait_child_ok(pid, CODES);

    // Take a snapshot of the CPU page tables.
    let m = snapshot_of(&dev, buf.addr(), npages)?;
    if v.coherent() {
        assert_pages(
            "after the COW writes",
            &m,
            "CPU Write in System or CoherentLocal",
            |s| {
                !s.error
                    && matches!(s.cpu, CpuProt::Write)
                    && matches!(s.location, Location::System | Location::CoherentLocal)
            },
        );
    } else {
        assert_pages("after the COW writes", &m, "CPU Write in System", |s| {
            !s.error && matches!(s.cpu, CpuProt::Write) && matches!(s.location, Location::System)
        });
    }
    check("parent CPU read", &buf, |i| i as i32 + 7);
    check("parent device read", &dev.read(buf.addr(), size)?, |i| {
        i as i32 + 7
    });
    Ok(())
}

/// `migrate_anon_huge_empty`: migrate 2 MiB of never-touched read-only memory.
fn migrate_anon_huge_empty(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let buf = hm.alloc(size)?;
    mprotect(buf.addr(), size, libc::PROT_READ);

    dev.migrate_to_device(buf.addr(), size)?;
    assert_all_local(
        "after migrate_to_device",
        v,
        &snapshot_of(&dev, buf.addr(), npages)?,
    );
    check("device read", &dev.read(buf.addr(), size)?, zero);
    check("CPU read", &buf, zero);
    Ok(())
}

/// `migrate_anon_huge_zero`: migrate 2 MiB of read-only zero pages.
fn migrate_anon_huge_zero(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let buf = hm.alloc(size)?;
    mprotect(buf.addr(), size, libc::PROT_READ);

    // Initialize a read-only zero page.
    assert_eq!(int_at(&buf, 0), 0);

    dev.migrate_to_device(buf.addr(), size)?;
    assert_all_local(
        "after migrate_to_device",
        v,
        &snapshot_of(&dev, buf.addr(), npages)?,
    );
    check("device read", &dev.read(buf.addr(), size)?, zero);
    // Fault pages back to system memory and check them.
    check("CPU read", &buf, zero);
    Ok(())
}

/// `migrate_anon_huge_free`: `MADV_FREE` on 2 MiB in device memory; then discard it.
fn migrate_anon_huge_free(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("migrate_to_device", &dev, npages);
    check("device read", &dev.read(buf.addr(), size)?, ident);

    // hetmem's system memory is a shared memfd, so MADV_FREE (private anonymous memory only)
    // fails with EINVAL, as on any shared mapping, and changes nothing. `Hetmem::discard` is the
    // way to drop data (docs/runtime.md, "The process around it").
    let r = madvise(buf.addr(), size, libc::MADV_FREE);
    assert_eq!(r, -1, "madvise(MADV_FREE) on managed memory must fail");
    assert_eq!(last_os_error().raw_os_error(), Some(libc::EINVAL));
    check(
        "device read after MADV_FREE",
        &dev.read(buf.addr(), size)?,
        ident,
    );

    // Discarding drops the data everywhere.
    hm.discard(buf.addr(), size)?;
    assert_pages(
        "after discard",
        &snapshot_of(&dev, buf.addr(), npages)?,
        "no data",
        |s| !s.error && matches!(s.location, Location::None),
    );
    check(
        "device read after discard",
        &dev.read(buf.addr(), size)?,
        zero,
    );
    check("CPU read after discard", &buf, zero);
    Ok(())
}

/// `migrate_anon_huge_fault`: migrate 2 MiB and fault it back to system memory.
fn migrate_anon_huge_fault(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let mut buf = hm.alloc(size)?;
    fill(&mut buf, ident);

    dev.reset_counters();
    dev.migrate_to_device(buf.addr(), size)?;
    assert_migrated_in("migrate_to_device", &dev, npages);
    check("device read", &dev.read(buf.addr(), size)?, ident);

    if !v.coherent() {
        assert_all_local(
            "after migrate_to_device",
            v,
            &snapshot_of(&dev, buf.addr(), npages)?,
        );
        // The CPU cannot map private device memory: no page is present in its page table.
        for n in 0..npages {
            assert!(
                !cpu_present(buf.addr() + n * PAGE_SIZE),
                "page {n} is in private device memory but present in the CPU page table"
            );
        }
    }

    // Fault pages back to system memory and check them.
    check("CPU read", &buf, ident);
    if !v.coherent() {
        for n in 0..npages {
            assert!(
                cpu_present(buf.addr() + n * PAGE_SIZE),
                "page {n} not present after CPU read"
            );
        }
        assert_all_system(
            "after the CPU read",
            &snapshot_of(&dev, buf.addr(), npages)?,
        );
    }
    Ok(())
}

/// `migrate_partial_unmap_fault`: migrate 2 MiB, munmap half of it at three offsets, fault the
/// rest back.
fn migrate_partial_unmap_fault(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    let unmap_size = size / 2;
    for off in [0, size / 4, size / 2] {
        let what = format!("unmap [{off:#x}, {:#x})", off + unmap_size);
        let mut buf = hm.alloc(size)?;
        fill(&mut buf, ident);

        dev.reset_counters();
        dev.migrate_to_device(buf.addr(), size)?;
        assert_migrated_in(&what, &dev, npages);
        check(&what, &dev.read(buf.addr(), size)?, ident);

        munmap(buf.addr() + off, unmap_size);

        // Fault pages back to system memory and check them.
        check(
            &format!("{what}: CPU read before the hole"),
            &buf[..off],
            ident,
        );
        let end = off + unmap_size;
        check(
            &format!("{what}: CPU read after the hole"),
            &buf[end..],
            |i| (i + end / 4) as i32,
        );
        assert_err!(
            dev.read(buf.addr() + off, PAGE_SIZE),
            Error::Fault(_),
            libc::EFAULT
        );
        drop(buf);
    }
    Ok(())
}

/// `migrate_remap_fault`: migrate 2 MiB, mremap it elsewhere (with and without
/// `MREMAP_DONTUNMAP`), fault it back at the new address.
fn migrate_remap_fault(v: Variant) -> Result<()> {
    let hm = context(v, 1)?;
    let dev = device(&hm, 0);
    let size = TWOMEG;
    let npages = size / PAGE_SIZE;
    for dont_unmap in [false, true] {
        for off in [0, size / 4, size / 2] {
            let what = format!("dont_unmap={dont_unmap} offset={off:#x}");
            let mut buf = hm.alloc(size)?;
            fill(&mut buf, ident);

            dev.reset_counters();
            dev.migrate_to_device(buf.addr(), size)?;
            assert_migrated_in(&what, &dev, npages);
            check(&what, &dev.read(buf.addr(), size)?, ident);

            // A placeholder the move replaces.
            let reserve = mmap_anon(
                2 * size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            );
            let target = reserve + off;
            let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            if dont_unmap {
                flags |= libc::MREMAP_DONTUNMAP;
            }
            // SAFETY: moves the test's own buffer onto the test's own placeholder; the buffer is
            // only read through `target` from here on (and, with DONTUNMAP, at its old address).
            let new = unsafe {
                libc::mremap(
                    buf.addr() as *mut c_void,
                    size,
                    size,
                    flags,
                    target as *mut c_void,
                )
            };
            assert_ne!(new, libc::MAP_FAILED, "{what}: mremap: {}", last_os_error());
            assert_eq!(new as usize, target);

            // Fault pages back to system memory and check them.
            {
                // SAFETY: `target` maps `size` bytes, moved there by mremap; nothing else refers
                // to them.
                let moved = unsafe { std::slice::from_raw_parts(target as *const u8, size) };
                check(
                    &format!("{what}: CPU read at the new address"),
                    moved,
                    ident,
                );
            }
            if dont_unmap {
                // The old range stays mapped to the same data, as any shared mapping's does
                // (docs/runtime.md §6): an alias of the new range.
                check(&format!("{what}: CPU read of the old range"), &buf, ident);
            }
            munmap(reserve, 2 * size);
            drop(buf);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Teardown races
// ---------------------------------------------------------------------------------------------

/// Device kernels racing with the buffer going away: the result is `Ok` or `Error::Fault(_)`, never
/// a hang (the watchdog) or a crash.
mod teardown {
    use super::*;

    const SIZE: usize = HMM_BUFFER_SIZE;

    variants!(
        kernel_read_vs_drop,
        kernel_read_vs_munmap,
        kernel_write_vs_munmap
    );

    /// The byte at offset `off` of a buffer whose `i`-th int is `i + seed`.
    fn expected_byte(off: usize, seed: usize) -> u8 {
        ((off / 4 + seed) as i32).to_ne_bytes()[off % 4]
    }

    /// What the runs of one `kernel_read` saw.
    struct Runs {
        base: usize,
        len: usize,
        seed: usize,
        bytes: AtomicUsize,
        /// Runs outside the range or with wrong data.
        bad: AtomicUsize,
        covered: Vec<AtomicBool>,
    }

    impl Runs {
        fn new(base: usize, len: usize, seed: usize) -> Arc<Runs> {
            Arc::new(Runs {
                base,
                len,
                seed,
                bytes: AtomicUsize::new(0),
                bad: AtomicUsize::new(0),
                covered: (0..len / PAGE_SIZE)
                    .map(|_| AtomicBool::new(false))
                    .collect(),
            })
        }

        fn visit(&self, run_addr: usize, data: &[u8]) {
            if run_addr < self.base || run_addr + data.len() > self.base + self.len {
                self.bad.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let start = run_addr - self.base;
            if data
                .iter()
                .enumerate()
                .any(|(k, &b)| b != expected_byte(start + k, self.seed))
            {
                self.bad.fetch_add(1, Ordering::Relaxed);
            }
            self.bytes.fetch_add(data.len(), Ordering::Relaxed);
            for pg in start / PAGE_SIZE..(start + data.len()).div_ceil(PAGE_SIZE) {
                self.covered[pg].store(true, Ordering::Relaxed);
            }
        }

        /// Asserts the outcome: every run in range with the right data, and on `Ok` every page
        /// seen.
        fn assert_outcome<T>(&self, what: &str, r: &Result<T, Error>) {
            assert_eq!(
                self.bad.load(Ordering::Relaxed),
                0,
                "{what}: runs with wrong data or range"
            );
            match r {
                Ok(_) => {
                    assert!(
                        self.bytes.load(Ordering::Relaxed) >= self.len,
                        "{what}: Ok, but short"
                    );
                    let missing = self
                        .covered
                        .iter()
                        .filter(|c| !c.load(Ordering::Relaxed))
                        .count();
                    assert_eq!(
                        missing, 0,
                        "{what}: Ok, but {missing} pages never reached the kernel"
                    );
                }
                Err(Error::Fault(_)) => {}
                Err(e) => panic!("{what}: {e:?}, expected Ok or Fault"),
            }
        }
    }

    /// A buffer with `i + seed` in its `i`-th int; in odd rounds it is moved to the device first,
    /// so the kernels see device memory as well as system memory.
    fn prepare(hm: &Hetmem, dev: &Device, round: usize) -> Result<hetmem::ManagedBuf> {
        let mut buf = hm.alloc(SIZE)?;
        fill(&mut buf, |i| (i + round) as i32);
        if round % 2 == 1 {
            dev.migrate_to_device(buf.addr(), SIZE)?;
        }
        Ok(buf)
    }

    /// After the races the device still takes a 12 MiB migration: no frames leaked.
    fn assert_no_leak(hm: &Hetmem, dev: &Device) -> Result<()> {
        let len = 12 << 20;
        let mut big = hm.alloc(len)?;
        fill(&mut big, ident);
        dev.reset_counters();
        dev.migrate_to_device(big.addr(), len)?;
        assert_migrated_in("12 MiB after the races", dev, len / PAGE_SIZE);
        check("12 MiB after the races", &dev.read(big.addr(), len)?, ident);
        Ok(())
    }

    /// A kernel reads the buffer while another thread drops it.
    fn kernel_read_vs_drop(v: Variant) -> Result<()> {
        let hm = context(v, 1)?;
        let dev = device(&hm, 0);
        for c in 0..NTIMES {
            let buf = prepare(&hm, &dev, c)?;
            let addr = buf.addr();
            let runs = Runs::new(addr, SIZE, c);
            let barrier = Arc::new(Barrier::new(2));
            let reader = {
                let (dev, runs, barrier) = (dev.clone(), runs.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    dev.kernel_read(addr, SIZE, move |run_addr: usize, data: &[u8]| {
                        runs.visit(run_addr, data)
                    })
                })
            };
            barrier.wait();
            spin(c * 20_000);
            drop(buf);
            let r = reader.join().expect("kernel_read thread panicked");
            runs.assert_outcome(&format!("round {c}"), &r);
        }
        assert_no_leak(&hm, &dev)
    }

    /// A kernel reads the buffer while another thread munmaps its second half.
    fn kernel_read_vs_munmap(v: Variant) -> Result<()> {
        let hm = context(v, 1)?;
        let dev = device(&hm, 0);
        for c in 0..NTIMES {
            let what = format!("round {c}");
            let buf = prepare(&hm, &dev, c)?;
            let addr = buf.addr();
            let runs = Runs::new(addr, SIZE, c);
            let barrier = Arc::new(Barrier::new(2));
            let reader = {
                let (dev, runs, barrier) = (dev.clone(), runs.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    dev.kernel_read(addr, SIZE, move |run_addr: usize, data: &[u8]| {
                        runs.visit(run_addr, data)
                    })
                })
            };
            barrier.wait();
            spin(c * 20_000);
            munmap(addr + SIZE / 2, SIZE / 2);
            let r = reader.join().expect("kernel_read thread panicked");
            runs.assert_outcome(&what, &r);

            // The mapped half is intact; the unmapped half is gone for the device.
            let half = dev.read(addr, SIZE / 2)?;
            check(
                &format!("{what}: device read of the mapped half"),
                &half,
                |i| (i + c) as i32,
            );
            check(
                &format!("{what}: CPU read of the mapped half"),
                &buf[..SIZE / 2],
                |i| (i + c) as i32,
            );
            assert_err!(
                dev.read(addr + SIZE / 2, PAGE_SIZE),
                Error::Fault(_),
                libc::EFAULT
            );
            drop(buf);
        }
        assert_no_leak(&hm, &dev)
    }

    /// A kernel writes the buffer while another thread munmaps its second half.
    fn kernel_write_vs_munmap(v: Variant) -> Result<()> {
        let hm = context(v, 1)?;
        let dev = device(&hm, 0);
        for c in 0..NTIMES {
            let what = format!("round {c}");
            let buf = hm.alloc(SIZE)?;
            let addr = buf.addr();
            if c % 2 == 1 {
                dev.migrate_to_device(addr, SIZE)?;
            }
            let out_of_range = Arc::new(AtomicUsize::new(0));
            let barrier = Arc::new(Barrier::new(2));
            let writer = {
                let (dev, oor, barrier) = (dev.clone(), out_of_range.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    dev.kernel_write(addr, SIZE, move |run_addr: usize, data: &mut [u8]| {
                        if run_addr < addr || run_addr + data.len() > addr + SIZE {
                            oor.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        let start = run_addr - addr;
                        for (k, b) in data.iter_mut().enumerate() {
                            *b = expected_byte(start + k, c);
                        }
                    })
                })
            };
            barrier.wait();
            spin(c * 20_000);
            munmap(addr + SIZE / 2, SIZE / 2);
            let r = writer.join().expect("kernel_write thread panicked");
            assert_eq!(
                out_of_range.load(Ordering::Relaxed),
                0,
                "{what}: run outside the range"
            );

            let mapped = &buf[..SIZE / 2];
            match r {
                Ok(_) => check(
                    &format!("{what}: CPU read of the written half"),
                    mapped,
                    |i| (i + c) as i32,
                ),
                Err(Error::Fault(_)) => {
                    // Each page holds either the kernel's data or its old zeros.
                    for (n, pg) in mapped.chunks_exact(PAGE_SIZE).enumerate() {
                        let first = n * PAGE_SIZE / 4;
                        assert!(
                            mismatch(pg, |i| (first + i + c) as i32).is_none()
                                || mismatch(pg, zero).is_none(),
                            "{what}: page {n} is neither written nor zero after a faulted write"
                        );
                    }
                }
                Err(e) => panic!("{what}: kernel_write during munmap: {e:?}, expected Ok or Fault"),
            }
            drop(buf);
        }
        assert_no_leak(&hm, &dev)
    }
}
