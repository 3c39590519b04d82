//! File mappings (`Hetmem::map_file`) and their file leases: breaks that flush for another
//! opener, breaks whose writebacks fail, a lease taken on a thread that has exited, breaks that
//! race a drop, a write lease the kernel turned into a read one, a lease taken again after
//! pages were cached without it; the lease signal's path (only the lease thread gets it, a
//! SIGIO of a full signal queue, an application's own handler); unlink and rename.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use anyhow::{ensure, Context, Result};
use common::file::{
    assert_same, content, context, create_file, fd_of, pread_file, wait_child, wait_lease_breaking,
    with_lease_thread_held, BreakTime, DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::TempDir;
use common::process::{exit_code, fork_child, pipe};
use hetmem::{DeviceKind, Error, FileMode, FileOptions, LeaseProbe, PAGE_SIZE};
use hetmem_proto::OpError;
use libc::c_int;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    lease_break_flushes_for_other_openers,
    lease_taken_on_a_passing_thread_is_served,
    lease_breaks_racing_a_drop,
    write_lease_turned_read_counts_as_lost,
    lease_break_with_failing_writeback,
    a_retaken_lease_drops_what_was_cached_without_it,
    lease_signals_go_to_the_lease_thread_only,
    sigio_of_a_full_signal_queue_is_served,
    sigio_at_the_lease_thread_is_survived,
    an_application_handler_for_the_lease_signal,
    unlink_and_rename_keep_the_inode,
    first_maps_on_two_threads_are_both_leased,
);

mod scenarios {
    use super::*;

    /// With a lease (the default), another process that opens the file sees our unflushed device writes:
    /// the lease break writes them back before its open returns. Its own writes then reach
    /// us, because the break also dropped our cached copies.
    pub fn lease_break_flushes_for_other_openers() -> Result<()> {
        let dir = TempDir::new("lease_break_flushes_for_other_openers")?;
        let path = dir.path("data");
        let len = 3 * MIB;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(
            m.is_leased(),
            "no write lease on {}, which nobody else has open",
            path.display()
        );
        let new = content(1, 0, len);
        dev.write(m.addr(), &new)?; // dirty, on the device, not flushed

        // Another process opens the file by path and reads it: it must see the new data.
        let (mut rx, tx) = pipe();
        let p = path.clone();
        let pid = fork_child(|| {
            let Ok(mut f) = File::open(&p) else { return 2 };
            let mut got = Vec::new();
            if f.read_to_end(&mut got).is_err() {
                return 3;
            }
            let _ = (&tx).write_all(&[u8::from(got == content(1, 0, got.len()))]);
            0
        });
        drop(tx);
        let mut verdict = [0u8; 1];
        rx.read_exact(&mut verdict)
            .context("the reader process reported nothing")?;
        assert_eq!(wait_child(pid), 0, "reader process");
        assert_eq!(
            verdict[0], 1,
            "the other process did not see our unflushed writes"
        );
        assert!(hm.stats().lease_breaks >= 1, "no lease break was served");

        // A writer through another descriptor (no lease now, so no break) changes page 0; the
        // device reads it afterwards, as the break dropped our cached copy.
        let theirs = content(2, 0, PAGE_SIZE);
        {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(&theirs, 0)?;
        }
        assert_same(
            "device read of page 0 after another writer",
            &dev.read(m.addr(), PAGE_SIZE)?,
            &theirs,
        );
        assert_same(
            "CPU read of page 1 (ours, flushed at the break)",
            &m.as_slice()[PAGE_SIZE..2 * PAGE_SIZE],
            &new[PAGE_SIZE..2 * PAGE_SIZE],
        );

        // A fork child with a context and a lease of its own: its lease thread, not ours (or
        // none: the open below would then wait 45 s), serves the break.
        let path2 = dir.path("child-data");
        create_file(&path2, &old[..MIB])?;
        let (mut ready_rx, ready_tx) = pipe();
        let (done_rx, mut done_tx) = pipe();
        let p2 = path2.clone();
        let pid = fork_child(|| {
            let Ok(hm) = context(DeviceKind::Private, 16 * MIB) else {
                return 2;
            };
            let Ok(m) = hm.map_file(&p2, 0, MIB, FileMode::Shared) else {
                return 3;
            };
            let dev = hm.device(0).expect("one device");
            if !m.is_leased() {
                let _ = (&ready_tx).write_all(&[2]);
                return 4;
            }
            if let Err(e) = dev.write(m.addr(), &content(3, 0, MIB)) {
                eprintln!("child: device write failed: {e}");
                let _ = (&ready_tx).write_all(&[3]);
                return 5;
            }
            let _ = (&ready_tx).write_all(&[1]);
            let mut b = [0u8; 1];
            let _ = (&done_rx).read(&mut b);
            0
        });
        drop(ready_tx);
        let mut ready = [0u8; 1];
        ready_rx
            .read_exact(&mut ready)
            .context("the child reported nothing")?;
        ensure!(
            ready[0] == 1,
            "the child could not map with a lease ({})",
            ready[0]
        );
        assert_same(
            "a fork child's unflushed device writes, seen by our open through its lease",
            &pread_file(&path2)?,
            &content(3, 0, MIB),
        );
        done_tx.write_all(&[0])?;
        assert_eq!(wait_child(pid), 0, "lease child");
        Ok(())
    }

    /// A lease taken again by a device kernel's worker thread, which is gone by the time
    /// another process opens the file, is still served: the process owns the lease, not the
    /// thread (with the thread as owner, the kernel finds nobody to signal, and the open waits
    /// out lease-break-time, 45 s, which the watchdog reports).
    pub fn lease_taken_on_a_passing_thread_is_served() -> Result<()> {
        let dir = TempDir::new("lease_taken_on_a_passing_thread_is_served")?;
        let path = dir.path("data");
        let len = 2 * MIB;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(m.is_leased(), "no lease on a file nobody else has open");
        // Our own open breaks the lease; the device kernel's faults take it again.
        assert_same("file", &pread_file(&path)?, &content(0, 0, len));
        ensure!(!m.is_leased(), "the lease survived our own open");
        let new = content(1, 0, len);
        dev.kernel_write(m.addr(), len, |at, b| {
            let off = at - m.addr();
            b.copy_from_slice(&new[off..off + b.len()]);
        })?;
        ensure!(
            m.is_leased(),
            "the device kernel's faults did not take the lease again"
        );
        let breaks = hm.stats().lease_breaks;
        let p = path.clone();
        let pid = fork_child(|| match std::fs::read(&p) {
            Ok(got) if got == content(1, 0, got.len()) => 0,
            Ok(_) => 1,
            Err(_) => 2,
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "the other process did not see our unflushed device writes"
        );
        assert_eq!(hm.stats().lease_breaks, breaks + 1, "lease breaks served");
        Ok(())
    }

    /// Lease breaks racing a drop. (1) A mapping dropped while another process waits on its
    /// lease writes its dirty pages back before the lease goes, so the opener reads them. (2)
    /// The dropped mapping's file is closed by the drop, but its descriptor number stays taken
    /// while a break for it is still queued, so a new mapping cannot take it and be hit by that
    /// break; once the lease thread is past the break, the number is free. To have the opener wait on the drop, not on the lease thread,
    /// the lease thread is first kept busy with a break of file b, whose flush waits for a
    /// device kernel the test holds; a break of file d, queued last, tells when the thread is
    /// through.
    pub fn lease_breaks_racing_a_drop() -> Result<()> {
        let dir = TempDir::new("lease_breaks_racing_a_drop")?;
        let [path_a, path_b, path_c, path_d] = ["a", "b", "c", "d"].map(|f| dir.path(f));
        let len = 8 * MIB;
        let old = content(0, 0, len);
        create_file(&path_a, &old)?;
        for p in [&path_b, &path_c, &path_d] {
            create_file(p, &old[..PAGE_SIZE])?;
        }
        // Two contexts: the held kernel must not hold up the drop's device invalidations.
        let hm_a = context(DeviceKind::Private, 16 * MIB)?;
        let hm_b = context(DeviceKind::Private, 16 * MIB)?;
        let (dev_a, dev_b) = (
            hm_a.device(0).expect("a device"),
            hm_b.device(0).expect("b"),
        );
        let a = hm_a.map_file(&path_a, 0, len, FileMode::Shared)?;
        let b = hm_b.map_file(&path_b, 0, PAGE_SIZE, FileMode::Shared)?;
        let d = hm_b.map_file(&path_d, 0, PAGE_SIZE, FileMode::Shared)?;
        ensure!(
            a.is_leased() && b.is_leased() && d.is_leased(),
            "no leases to begin with"
        );
        let new = content(1, 0, len);
        dev_a.write(a.addr(), &new)?; // dirty, on the device, not flushed

        // The openers are forked first: a fork waits for running device kernels (runtime.md
        // §6). Each opens its file once told to, through a pipe.
        let opener = |path: &Path, check: fn(&[u8]) -> c_int| {
            let (mut rx, tx) = pipe();
            let p = path.to_path_buf();
            let pid = fork_child(move || {
                let mut go = [0u8];
                if rx.read_exact(&mut go).is_err() {
                    return 4;
                }
                std::fs::read(&p).map_or(3, |got| check(&got))
            });
            (pid, tx)
        };
        let (child_b, mut open_b) = opener(&path_b, |_| 0);
        let (child_d, mut open_d) = opener(&path_d, |_| 0);
        let (child_a, mut open_a) = opener(&path_a, |got| {
            if got == content(1, 0, got.len()) {
                0
            } else if got == content(0, 0, got.len()) {
                1
            } else {
                2
            }
        });

        let (c, reused, code_a) = with_lease_thread_held(&dev_b, &b, &path_b, &mut open_b, || {
            // a's break queues behind b's.
            open_a.write_all(b"a")?;
            wait_lease_breaking(&path_a)?;
            let fd_a = fd_of(&path_a)?;
            drop(a);
            ensure!(
                fd_of(&path_a).is_err(),
                "the dropped mapping's file is still open after its drop"
            );
            let code_a = exit_code(wait_child(child_a));
            // c would take a's descriptor number, were it closed; d's break queues behind a's
            // stale one.
            let c = hm_a.map_file(&path_c, 0, PAGE_SIZE, FileMode::Shared)?;
            let reused = fd_of(&path_c)? == fd_a;
            open_d.write_all(b"d")?;
            wait_lease_breaking(&path_d)?;
            Ok((c, reused, code_a))
        })?;
        assert_eq!(exit_code(wait_child(child_b)), 0, "b's opener");
        assert_eq!(exit_code(wait_child(child_d)), 0, "d's opener");
        assert_eq!(
            code_a, 0,
            "the opener waiting on the dropped mapping's lease read old data (1) or a mix (2), \
             or could not read (3, 4)"
        );
        assert_same("file a", &pread_file(&path_a)?, &new);
        assert!(
            !reused,
            "a dropped mapping's descriptor number went to a new mapping while a break for it \
             was still queued"
        );
        // The lease thread is past a's stale break (d's came after it, FIFO).
        assert!(
            c.is_leased() && hm_a.stats().lease_breaks == 0,
            "a break queued for a dropped mapping was served on another mapping"
        );
        ensure!(
            fd_of(&path_a).is_err(),
            "the dropped mapping's file is open again after its breaks were read"
        );
        drop((b, c, d));
        Ok(())
    }

    /// A write lease whose break goes unanswered for lease-break-time is turned into a read
    /// lease by the kernel, and the reader's open proceeds: the Shared mapping must count its
    /// lease as lost at its next flush (a read lease keeps no writer out). As root, with
    /// lease-break-time set to 1 s for the test; the lease thread is held up as in
    /// `lease_breaks_racing_a_drop`.
    pub fn write_lease_turned_read_counts_as_lost() -> Result<()> {
        const KNOB: &str = "/proc/sys/fs/lease-break-time";
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: write_lease_turned_read_counts_as_lost needs root for {KNOB}");
            return Ok(());
        }
        let dir = TempDir::new("write_lease_turned_read_counts_as_lost")?;
        let (path_a, path_b) = (dir.path("a"), dir.path("b"));
        let len = 4 * PAGE_SIZE;
        create_file(&path_a, &content(0, 0, len))?;
        create_file(&path_b, &content(0, 0, PAGE_SIZE))?;
        let hm_a = context(DeviceKind::Private, 16 * MIB)?;
        let hm_b = context(DeviceKind::Private, 16 * MIB)?;
        let dev_b = hm_b.device(0).expect("b's device");
        let a = hm_a.map_file(&path_a, 0, len, FileMode::Shared)?;
        let b = hm_b.map_file(&path_b, 0, PAGE_SIZE, FileMode::Shared)?;
        ensure!(a.is_leased() && b.is_leased(), "no leases to begin with");

        // Openers, forked before the kernel runs. a's reader keeps the file open until told.
        let (mut go_b_rx, mut go_b) = pipe();
        let pb = path_b.clone();
        let child_b = fork_child(move || {
            let mut go = [0u8];
            if go_b_rx.read_exact(&mut go).is_err() {
                return 4;
            }
            File::open(&pb).map_or(3, |_| 0)
        });
        let (mut go_a_rx, mut go_a) = pipe();
        let (mut opened_rx, opened_tx) = pipe();
        let (mut done_a_rx, mut done_a) = pipe();
        let pa = path_a.clone();
        let child_a = fork_child(move || {
            let mut go = [0u8];
            if go_a_rx.read_exact(&mut go).is_err() {
                return 4;
            }
            let Ok(_f) = File::open(&pa) else { return 3 };
            let _ = (&opened_tx).write_all(b"o");
            let _ = done_a_rx.read_exact(&mut go);
            0
        });

        let Some(restore) = BreakTime::set(1)? else {
            return Ok(());
        };
        let r = with_lease_thread_held(&dev_b, &b, &path_b, &mut go_b, || {
            go_a.write_all(b"a")?;
            // The kernel gives up on our answer after 1 s and lets the reader in.
            let mut o = [0u8];
            opened_rx
                .read_exact(&mut o)
                .context("a's reader never got the file open")?;
            a.flush()?;
            ensure!(
                !a.is_leased(),
                "the write lease, turned into a read lease, still counts as held"
            );
            Ok(())
        });
        drop(restore);
        done_a.write_all(b"d")?;
        assert_eq!(exit_code(wait_child(child_a)), 0, "a's reader");
        assert_eq!(exit_code(wait_child(child_b)), 0, "b's opener");
        r?;
        drop((a, b));
        Ok(())
    }

    /// A lease break whose writebacks fail (injected EIO): the opener proceeds and sees the
    /// old data, our data stays dirty, the next `flush` reports the error once, and a retry
    /// writes the data.
    pub fn lease_break_with_failing_writeback() -> Result<()> {
        let dir = TempDir::new("lease_break_with_failing_writeback")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let old = content(0, 0, len);
        let new = content(1, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(m.is_leased(), "no lease on a file nobody else has open");
        dev.write(m.addr(), &new)?;
        // Every writeback fails until cleared: the break's flush, and its drop's retry.
        m.inject_writeback_failures(u32::MAX, libc::EIO);

        let p = path.clone();
        let pid = fork_child(|| match std::fs::read(&p) {
            Ok(got) if got == content(0, 0, got.len()) => 0,
            Ok(got) if got == content(1, 0, got.len()) => 1,
            Ok(_) => 2,
            Err(_) => 3,
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "the opener should see the old data (0), not new (1), mixed (2) or none (3)"
        );
        assert_eq!(hm.stats().lease_breaks, 1, "lease breaks served");
        assert_same(
            "device read after the break",
            &dev.read(m.addr(), len)?,
            &new,
        );
        m.inject_writeback_failures(0, libc::EIO);
        match m.flush() {
            Err(e @ Error::Io(OpError::Io)) => eprintln!("the break's error, reported: {e}"),
            other => panic!("the flush after the break: expected Io(Io), got {other:?}"),
        }
        m.flush().context("the error was reported twice")?;
        assert_same("CPU read", m.as_slice(), &new);
        drop(m);
        assert_same("file after the retry", &pread_file(&path)?, &new);
        Ok(())
    }

    /// A page cached while another process had the file open (no lease) may be stale by the
    /// time the lease is taken again: taking it back drops such pages, so `is_leased()` means
    /// coherent. Without that, the stale page survived the retake, and a write to one byte of it
    /// followed by `flush` wrote the whole stale page back over the other process's write
    /// (`file-contract-review.md`, finding 1).
    pub fn a_retaken_lease_drops_what_was_cached_without_it() -> Result<()> {
        let dir = TempDir::new("a_retaken_lease_drops_what_was_cached_without_it")?;
        let path = dir.path("data");
        let len = 4 * MIB;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let mut m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(
            m.is_leased(),
            "no write lease on a file nobody else has open"
        );
        // Page P in block 0; page Q, whose fault takes the lease back, in block 1.
        let (p, q) = (3, 512 + 7);

        // Another process opens the file for writing: the break flushes, drops and releases.
        let (mut opened_rx, opened_tx) = pipe();
        let (go_rx, mut go_tx) = pipe();
        let theirs = content(9, p, PAGE_SIZE);
        let pth = path.clone();
        let their_page = theirs.clone();
        let pid = fork_child(|| {
            let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pth)
            else {
                return 2;
            };
            let _ = (&opened_tx).write_all(&[1]);
            let mut b = [0u8; 1];
            let _ = (&go_rx).read(&mut b);
            if f.write_all_at(&their_page, (p * PAGE_SIZE) as u64).is_err() {
                return 3;
            }
            drop(f);
            0
        });
        drop(opened_tx);
        let mut b = [0u8; 1];
        opened_rx
            .read_exact(&mut b)
            .context("the other process reported nothing")?;
        // While it has the file open, we cannot hold a lease: reading P caches the old data.
        let before = m.as_slice()[p * PAGE_SIZE + 100];
        assert_same(
            "P before the other process writes",
            &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            &content(0, p, PAGE_SIZE),
        );
        ensure!(
            !m.is_leased(),
            "a lease while another process has the file open"
        );
        go_tx.write_all(&[0])?;
        assert_eq!(wait_child(pid), 0, "writer process");

        // It wrote P and closed the file. A fault elsewhere takes the lease back.
        let _ = std::hint::black_box(m.as_slice()[q * PAGE_SIZE]);
        ensure!(
            m.is_leased(),
            "the lease was not taken back once the file was free"
        );
        assert_same(
            "P read with the lease held again",
            &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            &theirs,
        );
        // One byte of ours on P, flushed: their other bytes stay.
        let ours = before.wrapping_add(1);
        m.as_mut_slice().expect("a shared mapping is writable")[p * PAGE_SIZE + 100] = ours;
        m.flush()?;
        let mut want = theirs.clone();
        want[100] = ours;
        assert_same(
            "P in the file after our one-byte write and flush",
            &pread_file(&path)?[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            &want,
        );
        Ok(())
    }

    /// Item 1 of the signal path: a lease break is signalled to hetmem's lease thread, never
    /// to an application thread. A fork child maps a file with a lease, writes to it from a
    /// device, and its main thread (the thread-group leader, which the kernel picks first for
    /// a signal directed at the process) waits in `ppoll(2)`. Another process opens the file:
    /// it sees the unflushed writes, and the child's `ppoll` was never interrupted (EINTR,
    /// which a handler run on that thread gives even with SA_RESTART).
    pub fn lease_signals_go_to_the_lease_thread_only() -> Result<()> {
        let dir = TempDir::new("lease_signals_go_to_the_lease_thread_only")?;
        let path = dir.path("data");
        create_file(&path, &content(0, 0, MIB))?;
        let (mut ready_rx, ready_tx) = pipe();
        let (done_rx, mut done_tx) = pipe();
        let p = path.clone();
        let pid = fork_child(|| {
            let Ok((hm, m)) = leased_with_device_writes(&p, 1) else {
                let _ = (&ready_tx).write_all(&[2]);
                return 2;
            };
            let _ = (&ready_tx).write_all(&[1]);
            let mut pfd = libc::pollfd {
                fd: done_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let mut interrupted = 0;
            loop {
                let r = unsafe { libc::ppoll(&mut pfd, 1, std::ptr::null(), std::ptr::null()) };
                if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    interrupted += 1;
                    continue;
                }
                break;
            }
            if hm.stats().lease_breaks == 0 {
                return 3;
            }
            drop(m);
            10 + interrupted.min(100)
        });
        drop(ready_tx);
        let mut ready = [0u8; 1];
        ready_rx
            .read_exact(&mut ready)
            .context("the child reported nothing")?;
        ensure!(ready[0] == 1, "the child could not map with a lease");
        wait_in_ppoll(pid)?;
        assert_same(
            "the child's unflushed device writes, seen through its lease",
            &pread_file(&path)?,
            &content(1, 0, MIB),
        );
        done_tx.write_all(&[0])?;
        let code = exit_code(wait_child(pid));
        ensure!(code != 3, "the child served no lease break");
        ensure!(
            code == 10,
            "the lease break interrupted the child's main thread ({} EINTR)",
            code - 10
        );
        Ok(())
    }

    /// Item 2: when the kernel cannot queue the lease signal it sends a plain SIGIO, whose
    /// default action ends the process. A fork child lowers RLIMIT_SIGPENDING to 0, so that no
    /// real-time signal can be queued to it (a real overflow, `__sigqueue_alloc`), maps two
    /// files with leases and writes to both from a device. Another process opens the first:
    /// it sees the child's unflushed writes (the SIGIO made the lease thread re-check every
    /// lease and serve the breaking one), the child lives on, and the second file's lease,
    /// held, was left alone (one break served, still leased, the kernel shows it active).
    pub fn sigio_of_a_full_signal_queue_is_served() -> Result<()> {
        let dir = TempDir::new("sigio_of_a_full_signal_queue_is_served")?;
        let (a, b) = (dir.path("a"), dir.path("b"));
        create_file(&a, &content(0, 0, MIB))?;
        create_file(&b, &content(0, 0, MIB))?;
        let (mut ready_rx, ready_tx) = pipe();
        let (done_rx, mut done_tx) = pipe();
        let (pa, pb) = (a.clone(), b.clone());
        let pid = fork_child(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_SIGPENDING, &none) } != 0 {
                let _ = (&ready_tx).write_all(&[2]);
                return 2;
            }
            let Ok((hm, ma)) = leased_with_device_writes(&pa, 1) else {
                let _ = (&ready_tx).write_all(&[3]);
                return 3;
            };
            let Ok(mb) = hm.map_file(&pb, 0, MIB, FileMode::Shared) else {
                let _ = (&ready_tx).write_all(&[4]);
                return 4;
            };
            if !mb.is_leased() || !ma.capabilities().overflow_served {
                let _ = (&ready_tx).write_all(&[5]);
                return 5;
            }
            let _ = (&ready_tx).write_all(&[1]);
            let mut byte = [0u8; 1];
            let _ = (&done_rx).read(&mut byte);
            let breaks = hm.stats().lease_breaks;
            if breaks != 1 {
                return 20 + breaks.min(50) as c_int;
            }
            if !mb.is_leased() || !matches!(common::file::write_lease_active(&pb), Ok(true)) {
                return 6;
            }
            0
        });
        drop(ready_tx);
        let mut ready = [0u8; 1];
        ready_rx
            .read_exact(&mut ready)
            .context("the child reported nothing")?;
        ensure!(ready[0] == 1, "the child could not set up ({})", ready[0]);
        assert_same(
            "the child's unflushed device writes, seen through a lease whose signal overflowed",
            &pread_file(&a)?,
            &content(1, 0, MIB),
        );
        done_tx.write_all(&[0])?;
        let code = exit_code(wait_child(pid));
        ensure!(
            code != 6,
            "the re-check broke the lease of a file nobody opened"
        );
        ensure!(
            code == 0,
            "the child served {} lease breaks, not 1",
            code - 20
        );
        Ok(())
    }

    /// Item 2, the handler's path: a SIGIO sent straight at the lease thread (tgkill), with no
    /// break pending, neither ends the process nor loses a break that comes with it. A fork
    /// child maps a file with a lease and writes to it from a device, sends the SIGIO, and
    /// another process's open then sees the writes; the child exits normally.
    pub fn sigio_at_the_lease_thread_is_survived() -> Result<()> {
        let dir = TempDir::new("sigio_at_the_lease_thread_is_survived")?;
        let path = dir.path("data");
        create_file(&path, &content(0, 0, MIB))?;
        let (mut ready_rx, ready_tx) = pipe();
        let (done_rx, mut done_tx) = pipe();
        let p = path.clone();
        let pid = fork_child(|| {
            let Ok((hm, m)) = leased_with_device_writes(&p, 1) else {
                let _ = (&ready_tx).write_all(&[2]);
                return 2;
            };
            let Some(tid) = lease_thread() else {
                let _ = (&ready_tx).write_all(&[3]);
                return 3;
            };
            if unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGIO) } != 0 {
                let _ = (&ready_tx).write_all(&[4]);
                return 4;
            }
            let _ = (&ready_tx).write_all(&[1]);
            let mut byte = [0u8; 1];
            let _ = (&done_rx).read(&mut byte);
            if hm.stats().lease_breaks == 0 {
                return 5;
            }
            drop(m);
            0
        });
        drop(ready_tx);
        let mut ready = [0u8; 1];
        ready_rx
            .read_exact(&mut ready)
            .context("the child reported nothing")?;
        ensure!(ready[0] == 1, "the child could not set up ({})", ready[0]);
        assert_same(
            "the child's unflushed device writes, after a SIGIO at its lease thread",
            &pread_file(&path)?,
            &content(1, 0, MIB),
        );
        done_tx.write_all(&[0])?;
        assert_eq!(exit_code(wait_child(pid)), 0, "the child");
        Ok(())
    }

    /// Item 3: an application that handles SIGRTMIN+7 (hetmem's first choice) and SIGIO
    /// itself. A fork child installs both handlers, then maps a file: the lease is taken with
    /// the next free signal (SIGRTMIN+8), SIGIO is left to the application
    /// (`overflow_served` false); another process's open sees the child's unflushed writes,
    /// and the application's handlers never ran. A second child handles every real-time
    /// signal: the probe says `SignalInUse`, the mapping is unleased, and `require_lease`
    /// fails with `NoLease(SignalInUse)` (EBUSY).
    pub fn an_application_handler_for_the_lease_signal() -> Result<()> {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        extern "C" fn count(_: c_int) {
            CALLS.fetch_add(1, Ordering::Relaxed);
        }
        fn handle(sig: c_int) -> bool {
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = count as extern "C" fn(c_int) as usize;
            unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) == 0 }
        }
        let dir = TempDir::new("an_application_handler_for_the_lease_signal")?;
        let path = dir.path("data");
        create_file(&path, &content(0, 0, MIB))?;
        let (mut ready_rx, ready_tx) = pipe();
        let (done_rx, mut done_tx) = pipe();
        let p = path.clone();
        let pid = fork_child(|| {
            if !handle(libc::SIGRTMIN() + 7) || !handle(libc::SIGIO) {
                let _ = (&ready_tx).write_all(&[2]);
                return 2;
            }
            let Ok((hm, m)) = leased_with_device_writes(&p, 1) else {
                let _ = (&ready_tx).write_all(&[3]);
                return 3;
            };
            let caps = m.capabilities();
            if caps.lease_signal != Some(libc::SIGRTMIN() + 8) || caps.overflow_served {
                eprintln!("child: {caps:?}");
                let _ = (&ready_tx).write_all(&[4]);
                return 4;
            }
            let _ = (&ready_tx).write_all(&[1]);
            let mut byte = [0u8; 1];
            let _ = (&done_rx).read(&mut byte);
            if hm.stats().lease_breaks == 0 {
                return 5;
            }
            if CALLS.load(Ordering::Relaxed) != 0 {
                return 6;
            }
            0
        });
        drop(ready_tx);
        let mut ready = [0u8; 1];
        ready_rx
            .read_exact(&mut ready)
            .context("the child reported nothing")?;
        ensure!(ready[0] == 1, "the child could not set up ({})", ready[0]);
        assert_same(
            "the child's unflushed device writes, leased with SIGRTMIN+8",
            &pread_file(&path)?,
            &content(1, 0, MIB),
        );
        done_tx.write_all(&[0])?;
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "the child with its own handlers"
        );

        let p = path.clone();
        let pid = fork_child(|| {
            if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).all(handle) {
                return 2;
            }
            let Ok(hm) = context(DeviceKind::Private, 16 * MIB) else {
                return 3;
            };
            match hm.map_file(&p, 0, MIB, FileMode::Shared) {
                Ok(m) if !m.is_leased() && m.capabilities().lease == LeaseProbe::SignalInUse => {}
                _ => return 4,
            }
            let opts = FileOptions::new(FileMode::Shared).require_lease(true);
            match hm.map_file_with(&p, 0, MIB, opts) {
                Err(e @ Error::NoLease(LeaseProbe::SignalInUse)) if e.errno() == libc::EBUSY => 0,
                _ => 5,
            }
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "the child that handles every real-time signal"
        );
        Ok(())
    }

    /// Item 4: neither unlink nor rename breaks a lease (`break_deleg` is for delegations,
    /// not leases); the mapping follows the inode. (1) A leased mapping whose file is unlinked
    /// keeps its lease, takes CPU and device writes, and `sync` writes them to the unlinked
    /// inode: an open of it through `/proc/self/fd` reads them. (2) One whose file is renamed
    /// does the same, read through the new name. (3) One whose file is replaced by a rename
    /// over its name (the atomic-replace pattern) writes to the old inode: the name shows the
    /// replacement, `/proc/self/fd` our data.
    pub fn unlink_and_rename_keep_the_inode() -> Result<()> {
        let dir = TempDir::new("unlink_and_rename_keep_the_inode")?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let len = MIB;
        for case in ["unlink", "rename", "replace"] {
            let path = dir.path(case);
            create_file(&path, &content(0, 0, len))?;
            let mut m = hm.map_file(&path, 0, len, FileMode::Shared)?;
            ensure!(
                m.is_leased(),
                "{case}: no lease on a file nobody else has open"
            );
            let fd = fd_of(&path)?;
            let breaks = hm.stats().lease_breaks;
            let moved = dir.path(&format!("{case}-moved"));
            let other = content(7, 0, len);
            match case {
                "unlink" => std::fs::remove_file(&path)?,
                "rename" => std::fs::rename(&path, &moved)?,
                _ => {
                    create_file(&moved, &other)?;
                    std::fs::rename(&moved, &path)?;
                }
            }
            let want = content(1, 0, len);
            dev.write(m.addr(), &want[..len / 2])?;
            let cpu = m.as_mut_slice().context("a Shared mapping is writable")?;
            cpu[len / 2..].copy_from_slice(&want[len / 2..]);
            m.sync()?;
            ensure!(
                m.is_leased() && hm.stats().lease_breaks == breaks,
                "{case}: the lease broke"
            );
            let got = match case {
                "rename" => pread_file(&moved)?,
                "replace" => {
                    // The name holds the replacement; hetmem's descriptor the old inode.
                    assert_same("the replaced name", &pread_file(&path)?, &other);
                    pread_file(Path::new(&format!("/proc/self/fd/{fd}")))?
                }
                _ => pread_file(Path::new(&format!("/proc/self/fd/{fd}")))?,
            };
            assert_same(
                &format!("{case}: the mapping's inode after sync"),
                &got,
                &want,
            );
        }
        Ok(())
    }
    /// The first `map_file`s of a process, on two threads at once: both mappings are leased.
    /// The second must wait until the lease thread of the first runs (its tid owns every
    /// lease); taking the lease before would fail, and the probe would say `Refused` for good.
    /// 20 fork children (each a first use), two threads each, started together.
    pub fn first_maps_on_two_threads_are_both_leased() -> Result<()> {
        let dir = TempDir::new("first_maps_on_two_threads_are_both_leased")?;
        let paths = [dir.path("a"), dir.path("b")];
        for p in &paths {
            create_file(p, &content(0, 0, MIB))?;
        }
        for round in 0..20 {
            let ps = paths.clone();
            let pid = fork_child(|| {
                let Ok(hm) = context(DeviceKind::Private, 16 * MIB) else {
                    return 2;
                };
                let go = std::sync::Barrier::new(2);
                let leased = std::thread::scope(|s| {
                    let maps: Vec<_> = ps
                        .iter()
                        .map(|p| {
                            let (hm, go) = (&hm, &go);
                            s.spawn(move || {
                                go.wait();
                                hm.map_file(p, 0, MIB, FileMode::Shared)
                                    .map(|m| m.capabilities().lease)
                            })
                        })
                        .collect();
                    maps.into_iter()
                        .map(|t| t.join().ok().and_then(|r| r.ok()))
                        .collect::<Vec<_>>()
                });
                if leased.iter().all(|l| *l == Some(LeaseProbe::Taken)) {
                    0
                } else {
                    eprintln!("child: {leased:?}");
                    3
                }
            });
            ensure!(
                exit_code(wait_child(pid)) == 0,
                "round {round}: a first map_file was not leased"
            );
        }
        Ok(())
    }
}

/// In a fork child: a context, a leased Shared mapping of `path` (1 MiB), and a device write
/// of `content(tag)` over it, not flushed.
fn leased_with_device_writes(
    path: &Path,
    tag: u32,
) -> Result<(hetmem::Hetmem, hetmem::FileMapping)> {
    let hm = context(DeviceKind::Private, 16 * MIB)?;
    let m = hm.map_file(path, 0, MIB, FileMode::Shared)?;
    ensure!(m.is_leased(), "no lease");
    hm.device(0)
        .context("one device")?
        .write(m.addr(), &content(tag, 0, MIB))?;
    Ok((hm, m))
}

/// The tid of this process's `hetmem-lease` thread.
fn lease_thread() -> Option<c_int> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "hetmem-lease").then(|| e.file_name().to_str()?.parse().ok())?
    })
}

/// Waits until the main thread of process `pid` is inside `ppoll(2)` (`/proc/PID/syscall`).
fn wait_in_ppoll(pid: libc::pid_t) -> Result<()> {
    let deadline = std::time::Instant::now() + common::file::QUICK;
    loop {
        let now = std::fs::read_to_string(format!("/proc/{pid}/syscall"))?;
        if now.split_whitespace().next() == Some(&libc::SYS_ppoll.to_string()) {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the child is not in ppoll: {now}"
        );
        std::thread::yield_now();
    }
}
