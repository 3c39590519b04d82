//! No silent loss (`docs/runtime.md` §7): a fault that cannot be served never unregisters a
//! page nor lets the kernel map a stale copy, every error on a path that drops data reaches the
//! caller or is counted with the data kept, and `stats().errors` counts only real failures.
//!
//! One regression test per finding of the outside suite (issue 10, A1–A5 and D12). Each builds
//! the situation where system memory holds an *older* copy of data that a device has since
//! rewritten, so any path that lets the kernel map system memory behind the protocol's back
//! shows the older bytes.

// The tests call libc (munmap, mremap, mprotect, write) on managed memory directly.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

mod common;

use anyhow::{ensure, Result};
use common::mem::{anon, mprotect, munmap};
use hetmem::{DeviceKind, Hetmem, PAGE_SIZE};

const MIB: usize = 1 << 20;
const TIMEOUT_S: u64 = 120;

/// A context with one simulated device of `kind` and 64 MiB.
fn context(kind: DeviceKind) -> Result<Hetmem> {
    Ok(Hetmem::builder().sim_device(kind, 64 * MIB).build()?)
}

fn os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `len` bytes at `addr`, read through the CPU view.
fn cpu_bytes<'a>(addr: usize, len: usize) -> &'a [u8] {
    // SAFETY: the callers pass parts of managed buffers that are still mapped and readable, and
    // hold no mutable reference into them.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// The first byte of `mem` that is not `want`, as `(offset, found)`.
fn first_not(mem: &[u8], want: u8) -> Option<(usize, u8)> {
    mem.iter().position(|&b| b != want).map(|i| (i, mem[i]))
}

#[track_caller]
fn assert_all(what: &str, mem: &[u8], want: u8) {
    if let Some((off, got)) = first_not(mem, want) {
        panic!(
            "{what}: byte {off} (page {}) is {got:#x}, expected {want:#x}",
            off / PAGE_SIZE
        );
    }
}

/// Device-newer-than-system: the CPU writes `old`, the range moves to the device, and the device
/// rewrites it with `new`. System memory keeps the `old` copy (its pages stay allocated while the
/// data is on the device), which is what a stale mapping would show.
fn stale_in_system(hm: &Hetmem, addr: usize, len: usize, old: u8, new: u8) -> Result<()> {
    // SAFETY: `addr..addr + len` is a managed buffer the caller owns and does not borrow now.
    unsafe { std::ptr::write_bytes(addr as *mut u8, old, len) };
    let dev = hm.device(0).expect("one device");
    dev.migrate_to_device(addr, len)?;
    dev.write(addr, &vec![new; len])?;
    Ok(())
}

// ------------------------------------------------------------------------------------------- A1

/// A1: munmap of the first half of a block whose data is on a private device; the CPU then reads
/// the second half. The read-back window covered the unmapped pages, the request failed, and the
/// fault handler unregistered the page so the kernel mapped the stale system copy.
#[test]
fn partial_munmap_of_device_data_keeps_the_rest() -> Result<()> {
    common::watchdog("partial_munmap", TIMEOUT_S, || {
        for kind in [DeviceKind::Private, DeviceKind::Coherent] {
            let hm = context(kind)?;
            let dev = hm.device(0).expect("one device");
            let buf = hm.alloc(2 * MIB)?;
            let a = buf.addr();
            stale_in_system(&hm, a, 2 * MIB, 0x11, 0x22)?;
            let errors = hm.stats().errors;
            munmap(a, MIB);
            assert_all(
                &format!("{kind:?}: second MiB"),
                cpu_bytes(a + MIB, MIB),
                0x22,
            );
            // The pages are still managed: a later device write reaches the CPU.
            dev.write(a + MIB, &vec![0x33; MIB])?;
            assert_all(
                &format!("{kind:?}: second MiB after a device write"),
                cpu_bytes(a + MIB, MIB),
                0x33,
            );
            ensure!(
                hm.stats().errors == errors,
                "{kind:?}: errors {} -> {}",
                errors,
                hm.stats().errors
            );
            drop(buf);
        }
        Ok(())
    })
}

/// A1, with mremap shrinking the range (its tail is unmapped) instead of munmap.
#[test]
fn mremap_shrink_of_device_data_keeps_the_rest() -> Result<()> {
    common::watchdog("mremap_shrink", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let buf = hm.alloc(2 * MIB)?;
        let a = buf.addr();
        stale_in_system(&hm, a, 2 * MIB, 0x11, 0x22)?;
        // SAFETY: shrinks the test's own buffer in place; the tail is not used any more.
        let p = unsafe { libc::mremap(a as *mut c_void, 2 * MIB, MIB, 0) };
        assert_eq!(p as usize, a, "mremap: {}", os_error());
        assert_all("first MiB after the shrink", cpu_bytes(a, MIB), 0x22);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

/// A1, with the hole across a block boundary: the pages on both sides keep their data.
#[test]
fn hole_across_a_block_boundary_keeps_both_sides() -> Result<()> {
    common::watchdog("hole_across_blocks", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let buf = hm.alloc(4 * MIB)?;
        let a = buf.addr();
        stale_in_system(&hm, a, 4 * MIB, 0x11, 0x22)?;
        munmap(a + 3 * MIB / 2, MIB);
        assert_all("before the hole", cpu_bytes(a, 3 * MIB / 2), 0x22);
        assert_all(
            "after the hole",
            cpu_bytes(a + 5 * MIB / 2, 3 * MIB / 2),
            0x22,
        );
        dev.write(a + 5 * MIB / 2, &vec![0x44; 3 * MIB / 2])?;
        assert_all(
            "after the hole, after a device write",
            cpu_bytes(a + 5 * MIB / 2, 3 * MIB / 2),
            0x44,
        );
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------- A2

/// A2: a raw mprotect round trip. The protocol learns of PROT_NONE at a device access, the
/// protection comes back behind its back, and the CPU reads pages 8–15. A retry that re-checked
/// only the faulting page while its run covered more dropped pages out of management: a later
/// device write then never reached the CPU.
#[test]
fn mprotect_round_trip_keeps_pages_managed() -> Result<()> {
    common::watchdog("mprotect_round_trip", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let len = 16 * PAGE_SIZE;
        let mut buf = hm.alloc(len)?;
        buf.fill(0x11);
        let a = buf.addr();
        let half = a + 8 * PAGE_SIZE;
        mprotect(half, 8 * PAGE_SIZE, libc::PROT_NONE);
        let r = dev.read(a, len);
        ensure!(
            matches!(r, Err(hetmem::Error::Fault(_))),
            "device read of PROT_NONE: {r:?}"
        );
        mprotect(half, 8 * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        assert_all(
            "pages 8-15 after the round trip",
            cpu_bytes(half, 8 * PAGE_SIZE),
            0x11,
        );
        dev.write(half, &vec![0x44; 8 * PAGE_SIZE])?;
        assert_all(
            "pages 8-15 after a device write",
            cpu_bytes(half, 8 * PAGE_SIZE),
            0x44,
        );
        assert_all("pages 0-7", &buf[..8 * PAGE_SIZE], 0x11);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------- A3

/// A3: dropping a `Registration` after one failed copy-back. The copy home is retried, so the
/// range ends up holding the device's data.
#[test]
fn registration_drop_retries_a_failed_copy_back() -> Result<()> {
    common::watchdog("registration_drop_retry", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let len = 2 * MIB;
        let a = anon(len);
        // SAFETY: our own fresh mapping, not shared with any thread.
        unsafe { std::ptr::write_bytes(a as *mut u8, 0x11, len) };
        // SAFETY: the range is ours and nobody touches it during the call.
        let reg = unsafe { hm.register(a as *mut u8, len) }?;
        dev.migrate_to_device(a, len)?;
        dev.write(a, &vec![0x22; len])?;
        dev.inject_transfer_failures(1);
        drop(reg);
        assert_all("the range after the drop", cpu_bytes(a, len), 0x22);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        munmap(a, len);
        Ok(())
    })
}

/// A3: a copy-back that keeps failing. `unregister` reports it and hands the registration back
/// with the data still on the device; once the device works again it succeeds. A plain drop with
/// the device still failing counts the error and keeps the range managed, with its data.
#[test]
fn registration_unregister_reports_a_failing_copy_back() -> Result<()> {
    common::watchdog("registration_unregister_error", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let len = 2 * MIB;
        let a = anon(len);
        // SAFETY: our own fresh mapping, not shared with any thread.
        unsafe { std::ptr::write_bytes(a as *mut u8, 0x11, len) };
        // SAFETY: the range is ours and nobody touches it during the call.
        let reg = unsafe { hm.register(a as *mut u8, len) }?;
        dev.migrate_to_device(a, len)?;
        dev.write(a, &vec![0x22; len])?;
        dev.inject_transfer_failures(u32::MAX);
        let (reg, e) = match reg.unregister() {
            Ok(()) => anyhow::bail!("unregister succeeded although every copy fails"),
            Err(back) => back,
        };
        ensure!(matches!(e, hetmem::Error::Io(_)), "error: {e:?}");
        ensure!(
            dev.read(a, len)? == vec![0x22; len],
            "the device lost the data"
        );
        dev.inject_transfer_failures(0);
        reg.unregister().map_err(|(_, e)| e)?;
        assert_all("the range after unregister", cpu_bytes(a, len), 0x22);

        // Drop with a dead device: the error is counted and the data stays reachable.
        // SAFETY: as above.
        let reg = unsafe { hm.register(a as *mut u8, len) }?;
        dev.migrate_to_device(a, len)?;
        dev.write(a, &vec![0x33; len])?;
        dev.inject_transfer_failures(u32::MAX);
        drop(reg);
        ensure!(hm.stats().errors > 0, "a failed drop was not counted");
        dev.inject_transfer_failures(0);
        assert_all("the range after a failed drop", cpu_bytes(a, len), 0x33);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------- A4

/// A4: `mremap(MREMAP_DONTUNMAP)` leaves the old range mapping the memfd, as it does any shared
/// mapping; user space cannot replace it without racing the application (a view moved back onto
/// it would be lost). So the old range stays a view: an alias of the moved data. A write right
/// after the call used to land in the moved data while the old range was being replaced, and to
/// read zero there afterwards; now it is the data's, seen at both addresses, and unmapping the old
/// range leaves the data at the new one.
#[test]
fn dontunmap_leaves_the_old_range_an_alias() -> Result<()> {
    common::watchdog("dontunmap_alias", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let len = 2 * MIB;
        for round in 0..100 {
            let mut buf = hm.alloc(len)?;
            buf.fill(0x11);
            dev.migrate_to_device(buf.addr() + MIB, MIB)?;
            let old = buf.addr();
            let target = anon(len);
            // SAFETY: moves the test's own buffer onto its own placeholder; from here on the
            // buffer is reached only through raw pointers.
            let new = unsafe {
                libc::mremap(
                    old as *mut c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                    target as *mut c_void,
                )
            };
            assert_eq!(new as usize, target, "mremap: {}", os_error());
            // The device rewrites its half: the old range must show that, not the older copy
            // system memory holds.
            dev.write(target + MIB, &vec![0x22; MIB])?;
            assert_all(
                &format!("round {round}: the device's half through the old range"),
                cpu_bytes(old + MIB, MIB),
                0x22,
            );
            // SAFETY: the old range is still mapped (DONTUNMAP) and ours.
            unsafe { (old as *mut u8).write_volatile(0x99) };
            let moved = cpu_bytes(target, len);
            ensure!(
                moved[0] == 0x99,
                "round {round}: the new range read {:#x}",
                moved[0]
            );
            assert_all(
                &format!("round {round}: the moved data"),
                &moved[1..MIB],
                0x11,
            );
            assert_all(
                &format!("round {round}: the moved data"),
                &moved[MIB..],
                0x22,
            );
            assert_all(
                &format!("round {round}: the old range"),
                cpu_bytes(old + 1, MIB - 1),
                0x11,
            );
            // A device write through the old range is seen at the new one.
            dev.write(old + MIB, &[0x44; PAGE_SIZE])?;
            assert_all(
                &format!("round {round}: a device write through the old range"),
                cpu_bytes(target + MIB, PAGE_SIZE),
                0x44,
            );
            munmap(old, len);
            ensure!(
                cpu_bytes(target, 1)[0] == 0x99,
                "round {round}: the data after the old range went"
            );
            assert_all(
                &format!("round {round}: the data after the old range went"),
                cpu_bytes(target + 1, MIB - 1),
                0x11,
            );
            assert_all(
                &format!("round {round}: the data after the old range went"),
                cpu_bytes(target + MIB + PAGE_SIZE, MIB - PAGE_SIZE),
                0x22,
            );
            drop(buf);
        }
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

/// A view moved back onto its own `MREMAP_DONTUNMAP` old range right after the call keeps its
/// data (found by `random_api`: replacing the old range with fresh memory, which hetmem used to
/// do a moment after the call, could replace the view moved back there with zeros).
#[test]
fn dontunmap_then_move_back_keeps_the_data() -> Result<()> {
    common::watchdog("dontunmap_move_back", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let len = 2 * MIB;
        for round in 0..300 {
            let mut buf = hm.alloc(len)?;
            buf.fill(0x11);
            let old = buf.addr();
            let target = anon(len);
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            // SAFETY: moves the test's own buffer onto its own placeholder, then back; the buffer
            // is read only through raw pointers in between.
            let moved = unsafe {
                libc::mremap(
                    old as *mut c_void,
                    len,
                    len,
                    flags | libc::MREMAP_DONTUNMAP,
                    target as *mut c_void,
                )
            };
            assert_eq!(moved as usize, target, "mremap: {}", os_error());
            // SAFETY: as above.
            let back =
                unsafe { libc::mremap(target as *mut c_void, len, len, flags, old as *mut c_void) };
            assert_eq!(back as usize, old, "mremap back: {}", os_error());
            assert_all(&format!("round {round}: the data moved back"), &buf, 0x11);
            drop(buf);
        }
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------- A5

/// A5: `write(2)` from a buffer on one thread while another drops it. The kernel gives the data
/// or EFAULT, never an older copy: here the device's 0x22 or a failed (or short) write, never
/// the 0x11 system memory still holds.
#[test]
fn a_reader_racing_a_drop_never_sees_older_data() -> Result<()> {
    common::watchdog("reader_vs_drop", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let len = 8 * MIB;
        let dir = std::env::temp_dir();
        let path = dir.join(format!("hetmem-no-loss-{}", std::process::id()));
        let mut stale_pages = 0usize;
        for _ in 0..20 {
            let buf = hm.alloc(len)?;
            let a = buf.addr();
            stale_in_system(&hm, a, len, 0x11, 0x22)?;
            let file = std::fs::File::create(&path)?;
            let start = Arc::new(Barrier::new(2));
            let done = Arc::new(AtomicBool::new(false));
            let writer = {
                let (start, done) = (start.clone(), done.clone());
                let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
                std::thread::spawn(move || {
                    start.wait();
                    // SAFETY: the kernel reads the range; if it goes away meanwhile the call
                    // fails with EFAULT or comes back short.
                    let n = unsafe { libc::write(fd, a as *const c_void, len) };
                    done.store(true, Ordering::Release);
                    n
                })
            };
            start.wait();
            // Let the writer get going, then drop under it.
            while std::fs::metadata(&path)?.len() < (MIB as u64) && !done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            drop(buf);
            let n = writer.join().expect("writer thread");
            let data = std::fs::read(&path)?;
            ensure!(
                n < 0 || data.len() == n as usize,
                "wrote {n}, file has {}",
                data.len()
            );
            stale_pages += data
                .chunks(PAGE_SIZE)
                .filter(|page| page.contains(&0x11))
                .count();
        }
        let _ = std::fs::remove_file(&path);
        ensure!(
            stale_pages == 0,
            "{stale_pages} pages of older data were read"
        );
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------ E13

/// E13: a CPU access to data that cannot be copied to system memory (a device that keeps
/// failing) raises SIGBUS, as an unreadable page does, but not for ever: once the device works
/// again, a request that covers the page clears the marker at once, and otherwise the next
/// access after a short delay tries again.
#[test]
fn sigbus_for_a_failing_copy_back_is_retried() -> Result<()> {
    common::watchdog("sigbus_retried", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let buf = hm.alloc(2 * MIB)?;
        let a = buf.addr();
        stale_in_system(&hm, a, 2 * MIB, 0x11, 0x22)?;
        let want = vec![0x22u8; PAGE_SIZE];
        let limit = std::time::Duration::from_secs(20);
        let sigbus = common::Reading::Signal(libc::SIGBUS);

        // Cleared by a request that covers the page.
        dev.inject_transfer_failures(u32::MAX);
        let r = common::read_in_clone(a, &want, limit);
        ensure!(
            r == sigbus,
            "a read of data the device cannot copy back: {r:?}"
        );
        dev.inject_transfer_failures(0);
        dev.migrate_to_system(a, PAGE_SIZE)?;
        let r = common::read_in_clone(a, &want, limit);
        ensure!(
            r == common::Reading::Wanted,
            "after a migration of the page: {r:?}"
        );

        // Cleared after a while.
        let b = a + MIB;
        dev.inject_transfer_failures(u32::MAX);
        let r = common::read_in_clone(b, &want, limit);
        ensure!(
            r == sigbus,
            "a read of data the device cannot copy back: {r:?}"
        );
        dev.inject_transfer_failures(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match common::read_in_clone(b, &want, limit) {
                common::Reading::Wanted => break,
                r if r == sigbus && std::time::Instant::now() < deadline => {}
                r => anyhow::bail!("the device works again, but a read still gives {r:?}"),
            }
        }
        assert_all("the whole buffer", &buf, 0x22);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

/// E13 for a file: a page that cannot be read raises SIGBUS while the error lasts; once the file
/// reads again, the next access (after the short delay) reads it, as the kernel retries an
/// unreadable page at every access. The marker stayed for ever.
#[test]
fn sigbus_for_an_unreadable_file_page_is_retried() -> Result<()> {
    common::watchdog("sigbus_file_retried", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let len = 4 * PAGE_SIZE;
        let path = std::env::temp_dir().join(format!("hetmem-no-loss-e13-{}", std::process::id()));
        std::fs::write(&path, vec![0x3c; len])?;
        let m = hm.map_file(&path, 0, len, hetmem::FileMode::Shared)?;
        let want = vec![0x3cu8; PAGE_SIZE];
        let limit = std::time::Duration::from_secs(20);
        m.inject_read_failures(u32::MAX, libc::EIO);
        let r = common::read_in_clone(m.addr(), &want, limit);
        ensure!(
            r == common::Reading::Signal(libc::SIGBUS),
            "a read of a page the file cannot give: {r:?}"
        );
        m.inject_read_failures(0, libc::EIO);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match common::read_in_clone(m.addr(), &want, limit) {
                common::Reading::Wanted => break,
                common::Reading::Signal(libc::SIGBUS) if std::time::Instant::now() < deadline => {}
                r => anyhow::bail!("the file reads again, but a CPU read still gives {r:?}"),
            }
        }
        assert_all("the mapping", m.as_slice(), 0x3c);
        drop(m);
        std::fs::remove_file(&path)?;
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

// ----------------------------------------------------------------------------------------- fork

/// Forks; the child checks that `len` bytes at `addr` are all `want` and exits 0 if so, 1 if
/// not (it allocates nothing). Returns the child's exit status.
fn child_sees(addr: usize, len: usize, want: u8) -> i32 {
    // SAFETY: the child only reads memory and exits with `_exit`, touching no lock another
    // thread of ours may have held at the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", os_error());
    if pid == 0 {
        let ok = cpu_bytes(addr, len).iter().all(|&b| b == want);
        // SAFETY: ends the child at once, without running the parent's destructors.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// A fork child's copy of registered memory that nobody touched since `register` holds the
/// registered data (it read zero: the child copied only pages some memory held as valid).
#[test]
fn fork_child_sees_untouched_registered_pages() -> Result<()> {
    common::watchdog("fork_registered", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let len = 4 * PAGE_SIZE;
        let a = anon(len);
        // SAFETY: our own fresh mapping, not shared with any thread.
        unsafe { std::ptr::write_bytes(a as *mut u8, 0x77, len) };
        // SAFETY: the range is ours and nobody touches it during the call.
        let reg = unsafe { hm.register(a as *mut u8, len) }?;
        ensure!(
            child_sees(a, len, 0x77) == 0,
            "the child lost registered data"
        );
        drop(reg);
        assert_all("the parent's range", cpu_bytes(a, len), 0x77);
        munmap(a, len);
        Ok(())
    })
}

/// A fork child's copy of a file mapping holds the file's data in pages nobody touched.
#[test]
fn fork_child_sees_untouched_file_pages() -> Result<()> {
    common::watchdog("fork_file", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let len = 4 * PAGE_SIZE;
        let path = std::env::temp_dir().join(format!("hetmem-no-loss-fork-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; len])?;
        let m = hm.map_file(&path, 0, len, hetmem::FileMode::Shared)?;
        let status = child_sees(m.addr(), len, 0x5a);
        drop(m);
        std::fs::remove_file(&path)?;
        ensure!(status == 0, "the child read other data than the file's");
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------ D12

/// D12: a coherent device mapping pages nobody touched marks them as possibly in the page cache;
/// the CPU's first access then found no page to map. Nothing was lost, so nothing is counted.
#[test]
fn coherent_device_touch_then_cpu_counts_no_error() -> Result<()> {
    common::watchdog("coherent_then_cpu", TIMEOUT_S, || {
        let hm = context(DeviceKind::Coherent)?;
        let dev = hm.device(0).expect("one device");
        let buf = hm.alloc(2 * MIB)?;
        // Mapped for device atomics, but never touched: no page was allocated.
        dev.exclusive(buf.addr(), 2 * MIB)?;
        assert_all("CPU read after a device mapping", &buf, 0);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}

/// D12: fault messages that arrive for a range being dropped (their thread may already have been
/// woken, or the range is gone) are harmless: never an unregistered page, never a counted error.
#[test]
fn faults_racing_drops_count_no_error() -> Result<()> {
    common::watchdog("faults_vs_drops", TIMEOUT_S, || {
        let hm = context(DeviceKind::Private)?;
        let dev = hm.device(0).expect("one device");
        let len = 4 * MIB;
        let pipe = {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into our array.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            fds
        };
        for _ in 0..30 {
            let mut buf = hm.alloc(len)?;
            buf.fill(0x11);
            dev.migrate_to_device(buf.addr(), len)?;
            let a = buf.addr();
            let start = Arc::new(Barrier::new(3));
            let threads: Vec<_> = (0..2)
                .map(|t| {
                    let start = start.clone();
                    let (rd, wr) = (pipe[0], pipe[1]);
                    std::thread::spawn(move || {
                        start.wait();
                        // Touch every page through the kernel (EFAULT, never a crash, once the
                        // range is gone): write a page into the pipe, read it back out.
                        let mut sink = vec![0u8; PAGE_SIZE];
                        for p in (t..len / PAGE_SIZE).step_by(2) {
                            // SAFETY: the kernel reads the page or fails with EFAULT.
                            let n = unsafe {
                                libc::write(wr, (a + p * PAGE_SIZE) as *const c_void, PAGE_SIZE)
                            };
                            if n < 0 {
                                break;
                            }
                            // SAFETY: reads into our own vector.
                            unsafe { libc::read(rd, sink.as_mut_ptr().cast(), n as usize) };
                        }
                    })
                })
                .collect();
            start.wait();
            drop(buf);
            for t in threads {
                t.join().expect("toucher");
            }
        }
        // SAFETY: our own pipe's descriptors.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    })
}
