//! File mappings (`Hetmem::map_file`) on real files and other processes: what another process
//! sees of our writes, its truncate, fork children (a snapshot of a mapping; forks while another
//! thread maps files), and a process killed during its flush.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::thread;

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::assert_err;
use common::file::{
    assert_same, clone_vm_read, content, context, create_file, is_sigbus, page_is, pread_file,
    read_outcome, read_wanted, stamp_page, unleased, wait_child, with_pages, write_lease_active,
    DEFAULT_TIMEOUT_S, MIB, QUICK,
};
use common::fs::{cstr, TempDir};
use common::process::{describe_status, exit_code, fork_child, pipe};
use hetmem::{DeviceKind, Error, FileMode, FileOptions, Hetmem, PAGE_SIZE};
use libc::c_int;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    visibility_to_other_processes,
    truncate_by_other_process,
    fork_child_gets_a_snapshot_of_a_file_mapping,
    fork_while_another_thread_maps_files,
    crash_during_flush_leaves_old_or_new_pages,
);

mod scenarios {
    use super::*;

    /// When another process sees our writes. Without a lease: only after a writeback (here
    /// `flush`); before it, the old data. With the default lease: at its open of the file,
    /// whose lease break writes our dirty pages back first.
    pub fn visibility_to_other_processes() -> Result<()> {
        const OLD: c_int = 0;
        const NEW: c_int = 1;
        const CODES: [&str; 5] = [
            "old data",
            "new data",
            "other data",
            "read error",
            "no open",
        ];
        let dir = TempDir::new("visibility_to_other_processes")?;
        let path = dir.path("data");
        let len = 16 * PAGE_SIZE;
        let old = content(0, 0, len);
        let new = content(1, 0, len);
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");

        // Another process: opens the file by path (unless given a descriptor) and preads it,
        // no hetmem; it only compares.
        let other_reads = |what: &str, opened: Option<&File>| -> c_int {
            let mut buf = vec![0u8; len];
            let pid = fork_child(|| {
                let own;
                let f = match opened {
                    Some(f) => f,
                    None => match File::open(&path) {
                        Ok(f) => {
                            own = f;
                            &own
                        }
                        Err(_) => return 4,
                    },
                };
                if f.read_exact_at(&mut buf, 0).is_err() {
                    return 3;
                }
                if buf == old {
                    OLD
                } else if buf == new {
                    NEW
                } else {
                    2
                }
            });
            let code = exit_code(wait_child(pid));
            eprintln!("{what}: the other process read {}", CODES[code as usize]);
            code
        };

        // Half written by the CPU, half by the device; nothing flushed.
        let write_new = |m: &mut hetmem::FileMapping| -> Result<()> {
            m.as_mut_slice().expect("writable")[..len / 2].copy_from_slice(&new[..len / 2]);
            dev.write(m.addr() + len / 2, &new[len / 2..])?;
            Ok(())
        };

        create_file(&path, &old)?;
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        write_new(&mut m)?;
        let reader = File::open(&path)?;
        assert_eq!(
            other_reads("no lease, before flush", Some(&reader)),
            OLD,
            "without a lease, another process sees our unflushed data"
        );
        assert_same("our own pread before flush", &pread_file(&path)?, &old);
        assert_same("the mapping before flush", m.as_slice(), &new);
        m.flush()?;
        assert_eq!(
            other_reads("no lease, after flush", Some(&reader)),
            NEW,
            "another process does not see our flushed data"
        );
        drop((m, reader));

        create_file(&path, &old)?;
        let mut m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        write_new(&mut m)?;
        ensure!(
            m.is_leased(),
            "a Shared mapping of a file nobody else has open got no lease"
        );
        let breaks = hm.stats().lease_breaks;
        assert_eq!(
            other_reads("with the default lease, no flush", None),
            NEW,
            "with a lease, another process's open does not see our unflushed data"
        );
        assert_eq!(hm.stats().lease_breaks, breaks + 1, "lease breaks served");
        assert!(!m.is_leased(), "the lease is still held after its break");
        assert_same("the mapping after the break", m.as_slice(), &new);
        Ok(())
    }

    /// Another process truncates the file to 2 pages: a device access beyond the new end fails
    /// with EFAULT, a CPU access raises SIGBUS, and the pages within it stay readable.
    ///
    /// The CPU reads run in other processes, so that SIGBUS (or a read that never returns)
    /// ends only them: `clone(CLONE_VM)` readers use this very address space, and a forked
    /// child its snapshot of it, where the truncated pages read zeros. Every check runs; the problems are reported together.
    ///
    /// Both with the default lease (the truncate waits for its break: our copies are dropped
    /// before it proceeds) and without one (hetmem sees the new size at its next fault).
    pub fn truncate_by_other_process() -> Result<()> {
        for (what, opts) in [
            ("default lease", FileOptions::new(FileMode::Shared)),
            ("no lease", unleased(FileMode::Shared)),
        ] {
            truncate_by_other_process_with(opts).with_context(|| what)?;
        }
        Ok(())
    }

    fn truncate_by_other_process_with(opts: FileOptions) -> Result<()> {
        let dir = TempDir::new("truncate_by_other_process")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let keep = 2 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, opts)?;
        assert_eq!(m.is_leased(), opts.lease, "lease held");
        // Touch every page, with the CPU and then the device (which moves them to its memory).
        assert_same("CPU read before truncate", m.as_slice(), &old);
        assert_same(
            "device read before truncate",
            &dev.read(m.addr(), len)?,
            &old,
        );

        // truncate(2) in another process; it waits for a lease break (truncate(1) would not:
        // it opens with O_NONBLOCK, and such an open fails with EAGAIN while the break runs).
        let cpath = cstr(&path)?;
        let pid = fork_child(|| {
            if unsafe { libc::truncate(cpath.as_ptr(), keep as libc::off_t) } == 0 {
                0
            } else {
                1
            }
        });
        assert_eq!(wait_child(pid), 0, "truncate(2) in another process");
        if opts.lease {
            assert!(hm.stats().lease_breaks >= 1, "the truncate broke no lease");
        }
        assert_eq!(std::fs::metadata(&path)?.len(), keep as u64);

        let page5 = m.addr() + 5 * PAGE_SIZE;
        let old5 = &old[5 * PAGE_SIZE..6 * PAGE_SIZE];
        assert_err!(dev.read(page5, PAGE_SIZE), Error::Fault(_), libc::EFAULT);

        let mut problems = Vec::new();
        let status = clone_vm_read(page5, old5);
        if !is_sigbus(status) {
            problems.push(format!(
                "a CPU read of page 5 in this address space (clone(CLONE_VM) reader) {}; \
                 expected SIGBUS",
                read_outcome(status)
            ));
        }
        // A fork child gets a private snapshot of managed memory (docs/file-contract.md §2.11):
        // past the end of the file it holds zeros, as private anonymous memory would.
        let zeros = vec![0u8; PAGE_SIZE];
        let pid = fork_child(|| common::compare_at(page5, &zeros));
        let status =
            common::wait_within(pid, QUICK).map_or(common::Reading::Blocked, common::reading_of);
        if !read_wanted(status) {
            problems.push(format!(
                "a CPU read of page 5 in a forked child {}; expected zeros (its snapshot)",
                read_outcome(status)
            ));
        }
        let status = clone_vm_read(m.addr(), &old[..keep]);
        let cpu_ok = read_wanted(status);
        if !cpu_ok {
            problems.push(format!(
                "a CPU read of pages 0-1 (within the new end of file; clone(CLONE_VM) reader) \
                 {}; expected the old data",
                read_outcome(status)
            ));
        }
        match dev.read(m.addr(), keep) {
            Ok(got) if got == old[..keep] => {}
            Ok(_) => problems.push("a device read of pages 0-1 returned other data".into()),
            Err(e) => problems.push(format!("a device read of pages 0-1 failed: {e:?}")),
        }
        if cpu_ok {
            // Safe in this process now.
            assert_same("CPU read of pages 0-1", &m.as_slice()[..keep], &old[..keep]);
        }
        if let Err(e) = m.flush() {
            problems.push(format!("flush after the truncate failed: {e:?}"));
        }
        drop(m);
        let size = std::fs::metadata(&path)?.len();
        if size != keep as u64 {
            problems.push(format!("flush or drop changed the file's size to {size}"));
        } else if pread_file(&path)? != old[..keep] {
            problems.push("the file's first two pages changed".into());
        }
        assert!(
            problems.is_empty(),
            "after another process truncated the file to 2 pages ({}):\n  {}",
            if opts.lease {
                "default lease"
            } else {
                "no lease"
            },
            problems.join("\n  ")
        );
        Ok(())
    }

    /// A forked child gets a private snapshot of a file mapping, unflushed CPU and device
    /// writes included; its own writes, and its flush (its context is dead: `Invalid`), never
    /// reach the file, and dropping its copy leaves the parent's lease alone; the parent's
    /// flush writes the parent's data.
    pub fn fork_child_gets_a_snapshot_of_a_file_mapping() -> Result<()> {
        let dir = TempDir::new("fork_child_gets_a_snapshot_of_a_file_mapping")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let mut m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        stamp_page(&mut m.as_mut_slice().expect("Shared")[..PAGE_SIZE], 1, 0);
        let mut page1 = vec![0u8; PAGE_SIZE];
        stamp_page(&mut page1, 1, 1);
        dev.write(m.addr() + PAGE_SIZE, &page1)?;
        let ours = with_pages(&old, 1, &[0, 1]);

        assert!(m.is_leased(), "no write lease to begin with");
        let breaks = hm.stats().lease_breaks;
        let (addr, want) = (m.addr(), ours.clone());
        let pid = fork_child(|| {
            let snap = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
            if snap != want.as_slice() {
                return 1;
            }
            stamp_page(&mut snap[2 * PAGE_SIZE..3 * PAGE_SIZE], 2, 2);
            let code = match m.flush() {
                Err(Error::Invalid(_)) => 0,
                Ok(()) => 2,
                Err(_) => 3,
            };
            // The child drops its copy of the mapping (a bitwise copy of ours, in its own
            // memory): that must not give up the lease it shares with us.
            drop(unsafe { std::ptr::read(&m) });
            code
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "child: 1: its snapshot lacks our unflushed writes, 2/3: its flush did not fail \
             with Invalid"
        );
        // The kernel's view, as the child shares the lease's file description and could give
        // the lease up behind our back.
        let still_leased = |when: &str| {
            assert!(
                m.is_leased()
                    && write_lease_active(&path).unwrap_or(false)
                    && hm.stats().lease_breaks == breaks,
                "{when}: the lease was given up or broken ({} breaks)",
                hm.stats().lease_breaks - breaks
            );
        };
        still_leased("after the child dropped its copy");

        // The child's context refuses new mappings, before it opens the file: its open would
        // break our lease.
        let p = path.clone();
        let pid = fork_child(|| match hm.map_file(&p, 0, len, FileMode::Shared) {
            Err(Error::Invalid(_)) => 0,
            _ => 1,
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "a fork child's map_file did not fail with Invalid"
        );
        still_leased("after the child's map_file");

        // Another process's open breaks the lease and gets our unflushed writes.
        let p = path.clone();
        let expect = ours.clone();
        let pid = fork_child(|| match std::fs::read(&p) {
            Ok(got) if got == expect => 0,
            _ => 1,
        });
        assert_eq!(
            exit_code(wait_child(pid)),
            0,
            "another opener did not get our writes"
        );
        assert_eq!(hm.stats().lease_breaks, breaks + 1, "lease breaks served");
        assert_same("parent's mapping after the child", m.as_slice(), &ours);
        m.flush()?;
        drop(m);
        assert_same(
            "file: the parent's writes, not the child's",
            &pread_file(&path)?,
            &ours,
        );
        Ok(())
    }

    /// Forks while another thread maps and drops files (taking the module's locks: the lease
    /// registry, the files' error sequences, the background writeback's queue): each child builds a context of its own and maps
    /// a file, which would wait for ever had it inherited one of those locks held by the
    /// parent's other thread. The fork handlers hold them across the fork instead, and the
    /// child's handler lets them go (without it every child hangs). The race itself is a
    /// window of about a microsecond: without the prepare handler's locking, 300 forks hit it
    /// in about one run of three.
    pub fn fork_while_another_thread_maps_files() -> Result<()> {
        let dir = TempDir::new("fork_while_another_thread_maps_files")?;
        let (busy, mine) = (dir.path("busy"), dir.path("mine"));
        create_file(&busy, &content(0, 0, PAGE_SIZE))?;
        create_file(&mine, &content(0, 0, PAGE_SIZE))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let forks = 300;
        // No thread may be starting or ending while the test forks: the child would inherit
        // std's thread bookkeeping locked and hang starting its own service threads (nothing
        // hetmem can prevent; POSIX leaves a fork child of a threaded process only
        // async-signal-safe calls). So the first fork waits until the mapper thread runs and
        // has mapped once (which also starts the lease thread).
        let started = std::sync::Barrier::new(2);
        thread::scope(|s| -> Result<()> {
            let mapper = s.spawn(|| -> Result<usize> {
                let first = hm.map_file(&busy, 0, PAGE_SIZE, FileMode::Shared);
                started.wait();
                drop(first?);
                let mut n = 1;
                while !stop.load(Ordering::Relaxed) {
                    drop(hm.map_file(&busy, 0, PAGE_SIZE, FileMode::Shared)?);
                    n += 1;
                }
                Ok(n)
            });
            started.wait();
            let mut hung = None;
            for i in 0..forks {
                let pid = fork_child(|| {
                    let Ok(hm) = context(DeviceKind::Private, 4 * MIB) else {
                        return 1;
                    };
                    match hm.map_file(&mine, 0, PAGE_SIZE, FileMode::Shared) {
                        Ok(m) if m.as_slice()[..8] == content(0, 0, PAGE_SIZE)[..8] => 0,
                        _ => 2,
                    }
                });
                match common::wait_within(pid, QUICK) {
                    Some(status) => assert_eq!(exit_code(status), 0, "child's map_file"),
                    None => {
                        hung = Some(i);
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let maps = mapper.join().expect("mapper thread")?;
            ensure!(maps > 0, "the other thread never mapped a file");
            if let Some(i) = hung {
                bail!("child {i} of {forks} hung in map_file ({maps} maps meanwhile)");
            }
            Ok(())
        })
    }

    /// A process killed (SIGKILL) while it flushes leaves every 4 KiB page of the file whole:
    /// the old contents or one generation of the new, never a mix. With buffered I/O and with
    /// O_DIRECT (skipped, saying so, where the temporary directory has none).
    pub fn crash_during_flush_leaves_old_or_new_pages() -> Result<()> {
        // A kill that lands between two flushes leaves one generation, and checks nothing
        // about a flush cut short: try again (a few times) until one leaves two.
        const TRIES: usize = 5;
        for direct in [false, true] {
            let what = if direct { "O_DIRECT" } else { "buffered" };
            let mut cut = false;
            for _ in 0..TRIES {
                match crash_during_flush_with(direct).with_context(|| what)? {
                    Some(true) => {
                        cut = true;
                        break;
                    }
                    Some(false) => {}
                    None => break,
                }
            }
            if !cut {
                eprintln!("{what}: no kill of {TRIES} landed during a flush");
            }
        }
        Ok(())
    }

    /// One kill; whether it cut a flush short (pages of two generations), None if skipped.
    fn crash_during_flush_with(direct: bool) -> Result<Option<bool>> {
        /// The child's exit codes, before the kill.
        const CODES: &str = "10: build, 11: map_file, 12: kernel_write, 13: signal, \
                             14: ran out of generations, 15: orphaned, 16: not direct";
        let dir = TempDir::new("crash_during_flush_leaves_old_or_new_pages")?;
        let path = dir.path("data");
        let len = 16 * MIB;
        let npages = len / PAGE_SIZE;
        create_file(&path, &content(0, 0, len))?;

        let (mut rd, wr) = pipe();
        let (rd_fd, wr_fd) = (rd.as_raw_fd(), wr.as_raw_fd());
        let child_path = path.clone();
        let parent = unsafe { libc::getpid() };
        let pid = fork_child(move || {
            unsafe { libc::close(rd_fd) };
            // A fresh context of the child's own.
            let Ok(hm) = Hetmem::builder()
                .sim_device(DeviceKind::Private, 32 * MIB)
                .build()
            else {
                return 10;
            };
            let dev = hm.device(0).expect("one device");
            // Without a lease: the parent's open of the file (to watch it) would break one,
            // and the break's flush, which the open waits for, would end before the kill.
            let opts = FileOptions::new(FileMode::Shared)
                .lease(false)
                .direct(direct);
            let Ok(m) = hm.map_file_with(&child_path, 0, len, opts) else {
                return 11;
            };
            if direct && !m.is_direct() {
                return 16;
            }
            let base = m.addr();
            for tag in 1..10_000u32 {
                let r = dev.kernel_write(base, len, |va, bytes| {
                    for (i, p) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        stamp_page(p, tag, (va - base) / PAGE_SIZE + i);
                    }
                });
                if r.is_err() {
                    return 12;
                }
                if tag == 1 && unsafe { libc::write(wr_fd, [1u8].as_ptr().cast(), 1) } != 1 {
                    return 13;
                }
                let _ = m.flush();
                if unsafe { libc::getppid() } != parent {
                    return 15;
                }
            }
            14
        });
        drop(wr);

        // Kill the child while it flushes: once it says it starts, watch a page picked at
        // random until the first flush has written it, then kill at once.
        let mut b = [0u8; 1];
        let signalled = matches!(rd.read(&mut b), Ok(1));
        let probe = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize % npages)
            .unwrap_or(0);
        let mut seen_new = false;
        if signalled {
            let f = File::open(&path)?;
            let mut word = [0u8; 4];
            let deadline = std::time::Instant::now() + common::test_timeout(DEFAULT_TIMEOUT_S) / 4;
            while std::time::Instant::now() < deadline {
                f.read_exact_at(&mut word, (probe * PAGE_SIZE) as u64)?;
                if u32::from_ne_bytes(word) != 0 {
                    seen_new = true;
                    break;
                }
            }
        }
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = wait_child(pid);
        if direct && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 16 {
            eprintln!("SKIPPED: O_DIRECT: none under {}", dir.0.display());
            return Ok(None);
        }
        if !signalled {
            bail!(
                "the child failed before flushing: {} ({CODES})",
                describe_status(status)
            );
        }
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "the child was not killed: {} ({CODES})",
            describe_status(status)
        );

        let file = pread_file(&path)?;
        assert_eq!(file.len(), len, "the file's size changed");
        let mut per_tag = std::collections::BTreeMap::<u32, usize>::new();
        for (p, page) in file.chunks_exact(PAGE_SIZE).enumerate() {
            let tag = u32::from_ne_bytes([page[0], page[1], page[2], page[3]]);
            assert!(
                page_is(page, tag, p),
                "page {p} is torn or misplaced: it starts with tag {tag} but is not that \
                 generation's page {p}"
            );
            *per_tag.entry(tag).or_default() += 1;
        }
        eprintln!(
            "{}: killed after page {probe} was {}; pages per generation (0 = old, {npages} \
             pages): {per_tag:?}",
            if direct { "O_DIRECT" } else { "buffered" },
            if seen_new { "written" } else { "still old" }
        );
        Ok(Some(per_tag.len() > 1))
    }
}
