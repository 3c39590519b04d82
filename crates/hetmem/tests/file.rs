//! File mappings (`Hetmem::map_file`) against real files in a fresh temporary directory: the
//! tests `docs/file-contract.md` cites.
//!
//! Every test runs under a watchdog (`HETMEM_TEST_TIMEOUT_S`, default 30 s), so a hang fails
//! the test instead of the whole run. Other processes (forked children, `truncate(1)`) stand for
//! "another process": a forked child never uses the parent's `Hetmem` (the child of
//! `crash_during_flush_leaves_old_or_new_pages` builds a fresh one of its own). Nothing sleeps
//! to synchronize: children report through pipes and exit codes.
//!
//! File contents are stamped per page: word 0 is a tag (0 for the file's original contents, a
//! generation for later writes), word 1 the page index, and the rest a mix of both with the word
//! index. A page is therefore recognisable as a whole: right tag, right place, not torn.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

mod common;

use common::assert_err;
use common::fs::{cstr, Mount, TempDir};

use anyhow::{bail, ensure, Context, Result};
use hetmem::{DeviceKind, Error, FileMode, FileOptions, Hetmem, Location, PAGE_SIZE};
use hetmem_proto::OpError;
use libc::c_int;

const MIB: usize = 1 << 20;
/// How long one test may run before the watchdog calls it hung (`HETMEM_TEST_TIMEOUT_S`).
const DEFAULT_TIMEOUT_S: u64 = 30;
/// How long an access that should end at once (a read, or SIGBUS) may take.
const QUICK: Duration = Duration::from_secs(2);
/// Exit code of a forked child whose code panicked.
const CHILD_PANICKED: c_int = 99;

// ---------------------------------------------------------------------------------------------
// Fixture: watchdog, temporary directory, context
// ---------------------------------------------------------------------------------------------

/// The scenarios run one at a time (`common::serial_scenario`). A forked child inherits every
/// descriptor open at the fork; one of another test's file keeps that file open while the
/// child lives, and denies that test its lease (a write lease needs the file open nowhere
/// else).
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> Result<()> {
                common::serial_scenario(stringify!($name), DEFAULT_TIMEOUT_S, scenarios::$name)
            }
        )*
    };
}

tests!(
    file_read,
    file_write_device_resident,
    cpu_write_reaches_file_after_flush,
    visibility_to_other_processes,
    private_mode_never_writes_back,
    read_only_mode_refuses_writes,
    drop_writes_back,
    eio_keeps_data_dirty_and_retry_succeeds,
    writeback_errors_reach_every_mapping_of_the_file,
    read_errors_on_first_touch,
    fork_child_gets_a_snapshot_of_a_file_mapping,
    fork_while_another_thread_maps_files,
    enospc_on_small_tmpfs,
    sync_reports_a_failing_disk,
    truncate_by_other_process,
    file_larger_than_device,
    clean_file_pages_are_dropped_on_eviction,
    crash_during_flush_leaves_old_or_new_pages,
    direct_io_skips_the_page_cache,
    lease_break_flushes_for_other_openers,
    lease_break_with_failing_writeback,
    lease_taken_on_a_passing_thread_is_served,
    lease_breaks_racing_a_drop,
    write_lease_turned_read_counts_as_lost,
    regular_files_on_ext4_xfs_and_tmpfs,
);

/// Options without a lease, for tests that look at the file through another descriptor before
/// a flush: with the default lease, that open would flush first (the lease break).
fn unleased(mode: FileMode) -> FileOptions {
    FileOptions::new(mode).lease(false)
}

fn context(kind: DeviceKind, capacity: usize) -> Result<Hetmem> {
    Ok(Hetmem::builder().sim_device(kind, capacity).build()?)
}

fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

// ---------------------------------------------------------------------------------------------
// Page contents
// ---------------------------------------------------------------------------------------------

/// Word `j` of page `page` with tag `tag`.
fn word_of(tag: u32, page: usize, j: usize) -> u32 {
    match j {
        0 => tag,
        1 => page as u32,
        _ => (tag.wrapping_mul(0x9e37_79b1) ^ (page as u32).wrapping_mul(0x85eb_ca77))
            .wrapping_add((j as u32).wrapping_mul(0xc2b2_ae3d))
            .rotate_left(j as u32 % 31),
    }
}

/// Writes page `page`'s contents with `tag` into `out` (one page). Allocates nothing.
fn stamp_page(out: &mut [u8], tag: u32, page: usize) {
    for (j, w) in out.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&word_of(tag, page, j).to_ne_bytes());
    }
}

/// Whether `page_bytes` is exactly page `page` with `tag`. Allocates nothing.
fn page_is(page_bytes: &[u8], tag: u32, page: usize) -> bool {
    page_bytes
        .chunks_exact(4)
        .enumerate()
        .all(|(j, w)| w == word_of(tag, page, j).to_ne_bytes())
}

/// `len` bytes of pages stamped with `tag`, the first being page `first_page` of the file.
fn content(tag: u32, first_page: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, p) in v.chunks_mut(PAGE_SIZE).enumerate() {
        let mut page = [0u8; PAGE_SIZE];
        stamp_page(&mut page, tag, first_page + i);
        p.copy_from_slice(&page[..p.len()]);
    }
    v
}

/// Creates `path` with `data`.
fn create_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// The whole file, read with `pread` on a descriptor of its own (not hetmem's).
fn pread_file(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len() as usize;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, 0)?;
    Ok(v)
}

/// Asserts `got == want`, naming the first differing page and its tag.
#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let page = i / PAGE_SIZE;
        let p = page * PAGE_SIZE;
        let tag = |b: &[u8]| u32::from_ne_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]]);
        panic!(
            "{what}: byte {i} (page {page}) is {:#04x}, expected {:#04x}; the page has tag {}, \
             expected tag {}",
            got[i],
            want[i],
            tag(got),
            tag(want)
        );
    }
}

/// `want` with pages `pages` replaced by `tag`'s.
fn with_pages(want: &[u8], tag: u32, pages: &[usize]) -> Vec<u8> {
    let mut v = want.to_vec();
    for &p in pages {
        stamp_page(&mut v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], tag, p);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A pipe; both ends close on drop.
fn pipe() -> (File, File) {
    let mut fds = [0 as c_int; 2];
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", last_os_error());
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(rd), File::from(wr))
}

/// `fork()`. The child runs `child` and `_exit`s with its result (a panic is
/// `CHILD_PANICKED`); the parent gets the pid.
fn fork_child(child: impl FnOnce() -> c_int) -> libc::pid_t {
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(CHILD_PANICKED);
        // Ends the child at once, without destructors of the parent's state.
        unsafe { libc::_exit(code) }
    }
    assert!(pid > 0, "fork: {}", last_os_error());
    pid
}

/// `waitpid` with the test's deadline: a child that hangs is killed and the test fails.
#[track_caller]
fn wait_child(pid: libc::pid_t) -> c_int {
    let limit = common::test_timeout(DEFAULT_TIMEOUT_S) / 2;
    match common::wait_within(pid, limit) {
        Some(status) => status,
        None => panic!("child {pid} still running after {limit:?}: hung"),
    }
}

fn describe_status(status: c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// The exit code of a child that must exit normally.
#[track_caller]
fn exit_code(status: c_int) -> c_int {
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: {}",
        describe_status(status)
    );
    libc::WEXITSTATUS(status)
}

/// What a reader found, as a sentence.
fn read_outcome(reading: common::Reading) -> String {
    match reading {
        common::Reading::Blocked => {
            format!("was still blocked in the read after {QUICK:?} (killed)")
        }
        r => r.to_string(),
    }
}

/// A CPU read in a `clone(CLONE_VM)` reader, within `QUICK`.
fn clone_vm_read(addr: usize, want: &[u8]) -> common::Reading {
    common::read_in_clone(addr, want, QUICK)
}

fn is_sigbus(reading: common::Reading) -> bool {
    reading == common::Reading::Signal(libc::SIGBUS)
}

fn read_wanted(reading: common::Reading) -> bool {
    reading == common::Reading::Wanted
}

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

mod scenarios {
    use super::*;

    /// CPU and device reads return the file's contents; a device read loads the file straight
    /// into device memory, and each page is read from the file once.
    pub fn file_read() -> Result<()> {
        let dir = TempDir::new("file_read")?;
        let path = dir.path("data");
        let len = 3 * MIB + 3 * PAGE_SIZE;
        let npages = len / PAGE_SIZE;
        let want = content(0, 0, len);
        create_file(&path, &want)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        assert_eq!((m.len(), m.mode()), (len, FileMode::Shared));
        assert_eq!(
            hm.stats().pages_from_file,
            0,
            "nothing is read before a touch"
        );

        // Device first: the file lands in device memory, the CPU maps nothing.
        let got = dev.read(m.addr(), len)?;
        assert_same("device read", &got, &want);
        let s = hm.stats();
        assert_eq!(
            s.pages_from_file, npages as u64,
            "pages read from the file: {s:?}"
        );
        let snap = dev.snapshot(m.addr(), len)?;
        for (i, st) in snap.iter().enumerate() {
            assert!(
                st.location == Location::PrivateLocal && !st.error,
                "page {i} after the device read: {st:?}, expected PrivateLocal"
            );
        }

        // The CPU reads what the device holds: no second read of the file.
        assert_same("CPU read after the device read", m.as_slice(), &want);
        let s = hm.stats();
        assert_eq!(
            s.pages_from_file, npages as u64,
            "the CPU read re-read the file: {s:?}"
        );

        // CPU first, in a second mapping at an offset: each page again read once.
        let off = 5 * PAGE_SIZE;
        let len2 = 2 * MIB;
        let m2 = hm.map_file(&path, off as u64, len2, FileMode::ReadOnly)?;
        assert_same(
            "CPU read of a mapping at an offset",
            m2.as_slice(),
            &want[off..off + len2],
        );
        let got = dev.read(m2.addr(), len2)?;
        assert_same(
            "device read of a mapping at an offset",
            &got,
            &want[off..off + len2],
        );
        let s = hm.stats();
        assert_eq!(
            s.pages_from_file,
            (npages + len2 / PAGE_SIZE) as u64,
            "pages read from the file after the second mapping: {s:?}"
        );
        drop(m2);
        drop(m);
        assert_same("file after the mappings", &pread_file(&path)?, &want);
        Ok(())
    }

    /// The kernel hmm-tests' `file_write`, with the pages migrated to the device first: device
    /// writes reach the file after `flush`, written back from device memory. No lease, so
    /// that reading the file before the flush does not flush.
    pub fn file_write_device_resident() -> Result<()> {
        for kind in [DeviceKind::Private, DeviceKind::Coherent] {
            let what = format!("{kind:?}");
            let dir = TempDir::new("file_write_device_resident")?;
            let path = dir.path("data");
            let len = 4 * MIB; // HMM_BUFFER_SIZE
            let npages = len / PAGE_SIZE;
            let old = content(0, 0, len);
            create_file(&path, &old)?;

            let hm = context(kind, 16 * MIB)?;
            let dev = hm.device(0).expect("one device");
            let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
            dev.migrate_to_device(m.addr(), len)?;
            let local = match kind {
                DeviceKind::Private => Location::PrivateLocal,
                DeviceKind::Coherent => Location::CoherentLocal,
            };
            let resident = |when: &str| -> Result<()> {
                for (i, st) in dev.snapshot(m.addr(), len)?.iter().enumerate() {
                    assert!(
                        st.location == local && !st.error,
                        "{what}: page {i} {when}: {st:?}, expected {local:?}"
                    );
                }
                Ok(())
            };
            resident("after migrate_to_device")?;
            assert_eq!(hm.stats().pages_from_file, npages as u64, "{what}");

            let new = content(1, 0, len);
            dev.write(m.addr(), &new)?;
            resident("after the device write")?;
            assert_same(
                &format!("{what}: file before flush"),
                &pread_file(&path)?,
                &old,
            );

            let before = hm.stats().pages_written_back;
            m.flush()?;
            let s = hm.stats();
            assert_eq!(
                s.pages_written_back - before,
                npages as u64,
                "{what}: pages written back: {s:?}"
            );
            resident("after flush (written back from device memory)")?;
            assert_same(
                &format!("{what}: file after flush"),
                &pread_file(&path)?,
                &new,
            );
            assert_same(&format!("{what}: CPU read"), m.as_slice(), &new);
        }
        Ok(())
    }

    /// A CPU write reaches `pread` after `flush`; dirty tracking is per page, and a page written
    /// again after a writeback is dirty again. No lease (see `unleased`).
    pub fn cpu_write_reaches_file_after_flush() -> Result<()> {
        let dir = TempDir::new("cpu_write_reaches_file_after_flush")?;
        let path = dir.path("data");
        let len = 2 * MIB + 8 * PAGE_SIZE;
        let npages = len / PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let dirty = [0, 7, 511, 512, npages - 1];
        {
            let s = m.as_mut_slice().expect("a Shared mapping is writable");
            for &p in &dirty {
                stamp_page(&mut s[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], 1, p);
            }
        }
        let want = with_pages(&old, 1, &dirty);
        assert_same("CPU read of its own writes", m.as_slice(), &want);
        assert_same("file before flush", &pread_file(&path)?, &old);

        m.flush()?;
        assert_same("file after flush", &pread_file(&path)?, &want);
        let s = hm.stats();
        assert_eq!(
            s.pages_written_back,
            dirty.len() as u64,
            "only the written pages are dirty: {s:?}"
        );
        m.flush()?;
        assert_eq!(
            hm.stats().pages_written_back,
            dirty.len() as u64,
            "a second flush has nothing to write"
        );

        // Written again after its writeback: dirty again.
        {
            let s = m.as_mut_slice().expect("writable");
            stamp_page(&mut s[7 * PAGE_SIZE..8 * PAGE_SIZE], 2, 7);
        }
        let want = with_pages(&want, 2, &[7]);
        m.flush()?;
        assert_same(
            "file after the second write and flush",
            &pread_file(&path)?,
            &want,
        );
        assert_eq!(hm.stats().pages_written_back, dirty.len() as u64 + 1);
        drop(m);
        assert_same("file after drop", &pread_file(&path)?, &want);
        Ok(())
    }

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

    /// `Private` writes (CPU and device) are seen through the mapping and never reach the file,
    /// through flush, sync and drop.
    pub fn private_mode_never_writes_back() -> Result<()> {
        let dir = TempDir::new("private_mode_never_writes_back")?;
        let path = dir.path("data");
        let len = 2 * MIB + 4 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let mut m = hm.map_file(&path, 0, len, FileMode::Private)?;
        let cpu_pages: Vec<usize> = (0..4).chain(300..304).collect();
        let dev_pages: Vec<usize> = (4..8).chain(512..516).collect();
        {
            let s = m.as_mut_slice().expect("a Private mapping is writable");
            for &p in &cpu_pages {
                stamp_page(&mut s[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], 1, p);
            }
        }
        for &p in &dev_pages {
            let mut page = vec![0u8; PAGE_SIZE];
            stamp_page(&mut page, 2, p);
            dev.write(m.addr() + p * PAGE_SIZE, &page)?;
        }
        let want = with_pages(&with_pages(&old, 1, &cpu_pages), 2, &dev_pages);
        assert_same(
            "device read of the Private mapping",
            &dev.read(m.addr(), len)?,
            &want,
        );
        assert_same("CPU read of the Private mapping", m.as_slice(), &want);

        m.flush()?;
        m.sync()?;
        assert_same("file after flush and sync", &pread_file(&path)?, &old);
        assert_same("the mapping after flush", m.as_slice(), &want);
        drop(m);
        assert_same("file after drop", &pread_file(&path)?, &old);
        let s = hm.stats();
        assert_eq!(
            s.pages_written_back, 0,
            "Private pages were written back: {s:?}"
        );
        Ok(())
    }

    /// A `ReadOnly` mapping: device writes fail with EPERM, there is no writable slice, reads
    /// work, and the file never changes.
    pub fn read_only_mode_refuses_writes() -> Result<()> {
        let dir = TempDir::new("read_only_mode_refuses_writes")?;
        let path = dir.path("data");
        let len = 32 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let mut m = hm.map_file(&path, 0, len, FileMode::ReadOnly)?;
        assert_eq!(m.mode(), FileMode::ReadOnly);
        assert!(
            m.as_mut_slice().is_none(),
            "a ReadOnly mapping gave a writable slice"
        );

        let new = content(1, 0, len);
        assert_err!(dev.write(m.addr(), &new), Error::Perm, libc::EPERM);
        // Also once the device has the pages mapped for reading.
        assert_same("device read", &dev.read(m.addr(), len)?, &old);
        assert_err!(
            dev.write(m.addr() + PAGE_SIZE, &new[..PAGE_SIZE]),
            Error::Perm,
            libc::EPERM
        );
        assert_err!(
            dev.kernel_write(m.addr(), len, |_, b| b.fill(0xee)),
            Error::Perm,
            libc::EPERM
        );
        assert_same(
            "device read after the refused writes",
            &dev.read(m.addr(), len)?,
            &old,
        );
        assert_same("CPU read", m.as_slice(), &old);
        m.flush()?;
        drop(m);
        assert_same("file", &pread_file(&path)?, &old);
        assert_eq!(hm.stats().pages_written_back, 0);
        Ok(())
    }

    /// Dropping a mapping without `flush` writes its dirty pages back. No lease (see `unleased`).
    pub fn drop_writes_back() -> Result<()> {
        let dir = TempDir::new("drop_writes_back")?;
        let path = dir.path("data");
        let len = 2 * MIB + 16 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let new = content(1, 0, len);
        dev.write(m.addr(), &new)?;
        assert_same("file before drop", &pread_file(&path)?, &old);
        drop(m);
        assert_same("file after drop", &pread_file(&path)?, &new);
        let s = hm.stats();
        assert_eq!(
            s.pages_written_back,
            (len / PAGE_SIZE) as u64,
            "pages written back at drop: {s:?}"
        );
        Ok(())
    }

    /// An injected writeback failure is reported by `flush` (EIO, then ENOSPC); the data stays
    /// in the mapping, dirty, and the next `flush` writes it.
    pub fn eio_keeps_data_dirty_and_retry_succeeds() -> Result<()> {
        let dir = TempDir::new("eio_keeps_data_dirty_and_retry_succeeds")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let npages = len / PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;

        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;

        for (tag, errno, op) in [
            (1, libc::EIO, OpError::Io),
            (2, libc::ENOSPC, OpError::NoSpace),
        ] {
            let what = format!("errno {errno}");
            let new = content(tag, 0, len);
            dev.write(m.addr(), &new)?;
            m.inject_writeback_failures(1, errno);
            let e = match m.flush() {
                Ok(()) => panic!("{what}: flush succeeded despite the injected failure"),
                Err(e) => e,
            };
            match &e {
                Error::Io(got) => assert_eq!(*got, op, "{what}: {e}"),
                other => panic!("{what}: expected Error::Io({op:?}), got {other:?}"),
            }
            assert_eq!(e.errno(), errno, "{what}: errno of {e:?}");
            let name = if errno == libc::EIO { "EIO" } else { "ENOSPC" };
            assert!(e.to_string().contains(name), "{what}: message {e}");

            // Nothing lost: the mapping still has the data, on the device and for the CPU.
            assert_same(
                &format!("{what}: device read"),
                &dev.read(m.addr(), len)?,
                &new,
            );
            assert_same(&format!("{what}: CPU read"), m.as_slice(), &new);

            let before = hm.stats().pages_written_back;
            m.flush()
                .with_context(|| format!("{what}: the retry failed"))?;
            let after = hm.stats().pages_written_back;
            assert!(
                after > before && after - before <= npages as u64,
                "{what}: the retry wrote {} pages back",
                after - before
            );
            assert_same(
                &format!("{what}: file after the retry"),
                &pread_file(&path)?,
                &new,
            );
            m.flush()
                .with_context(|| format!("{what}: the error was reported twice"))?;
        }
        Ok(())
    }

    /// Writeback errors are reported like the kernel's errseq_t: once to each mapping of the
    /// file (here several, without leases, which would break each other), also to the one that
    /// did not write the failed page and to a read-only one (as fsync on a read-only
    /// descriptor); not to a private one (as msync); not to a mapping made after the error;
    /// and a retry then succeeds.
    pub fn writeback_errors_reach_every_mapping_of_the_file() -> Result<()> {
        let dir = TempDir::new("writeback_errors_reach_every_mapping_of_the_file")?;
        let path = dir.path("data");
        let len = 16 * PAGE_SIZE;
        let half = len / 2;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let a = hm.map_file_with(&path, 0, half, unleased(FileMode::Shared))?;
        let b = hm.map_file_with(&path, half as u64, half, unleased(FileMode::Shared))?;
        let ro = hm.map_file_with(&path, 0, len, unleased(FileMode::ReadOnly))?;
        let private = hm.map_file_with(&path, 0, len, unleased(FileMode::Private))?;
        let new = content(1, 0, len);
        dev.write(a.addr(), &new[..half])?;
        dev.write(b.addr(), &new[half..])?;

        a.inject_writeback_failures(1, libc::EIO);
        let e = a.flush().expect_err("a's flush met an injected EIO");
        assert!(matches!(e, Error::Io(OpError::Io)), "a's flush: {e:?}");
        // b's own pages are written; the file's error since b was made is reported once.
        match b.flush() {
            Err(Error::Io(OpError::Io)) => {}
            other => panic!("b's first flush after a's error: expected Io(Io), got {other:?}"),
        }
        b.flush().context("b: the error was reported twice")?;
        match ro.flush() {
            Err(Error::Io(OpError::Io)) => {}
            other => panic!("read-only mapping's flush after a's error: {other:?}"),
        }
        ro.flush()
            .context("read-only: the error was reported twice")?;
        private
            .flush()
            .context("a private mapping was told of a writeback error")?;
        let c = hm.map_file_with(&path, 0, PAGE_SIZE, unleased(FileMode::Shared))?;
        c.flush()
            .context("c, made after the error, was told of it")?;
        a.flush().context("a's retry")?;
        b.flush().context("b after a's retry")?;
        drop((a, b, c, ro, private));
        assert_same("file", &pread_file(&path)?, &new);
        Ok(())
    }

    /// Reads of the file that fail on first touch (injected EIO). A device access fails with
    /// `Error::Io` at once, and the next one reads the file. A CPU access is retried (it cannot
    /// be failed): a passing failure is not seen, a lasting one raises SIGBUS, as the kernel
    /// does for an unreadable page; the file's data is still there for the device afterwards.
    pub fn read_errors_on_first_touch() -> Result<()> {
        let dir = TempDir::new("read_errors_on_first_touch")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");

        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        m.inject_read_failures(1, libc::EIO);
        assert_err!(dev.read(m.addr(), len), Error::Io(OpError::Io), libc::EIO);
        assert_same(
            "device read after the failure",
            &dev.read(m.addr(), len)?,
            &old,
        );
        drop(m);

        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        let failed = hm.stats().failed_transfers;
        m.inject_read_failures(1, libc::EIO);
        assert_same("CPU read through a passing failure", m.as_slice(), &old);
        assert!(
            hm.stats().failed_transfers > failed,
            "the injected failure was not met"
        );
        drop(m);

        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        m.inject_read_failures(u32::MAX, libc::EIO);
        let status = clone_vm_read(m.addr(), &old[..PAGE_SIZE]);
        assert!(
            is_sigbus(status),
            "a CPU read of a page that cannot be read {}; expected SIGBUS",
            read_outcome(status)
        );
        m.inject_read_failures(0, libc::EIO);
        assert_same(
            "device read once the file reads again",
            &dev.read(m.addr(), len)?,
            &old,
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
    /// registry, the files' error sequences): each child builds a context of its own and maps
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
        thread::scope(|s| -> Result<()> {
            let mapper = s.spawn(|| -> Result<usize> {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    drop(hm.map_file(&busy, 0, PAGE_SIZE, FileMode::Shared)?);
                    n += 1;
                }
                Ok(n)
            });
            let mut hung = None;
            for i in 0..forks {
                let pid = fork_child(|| {
                    let Ok(hm) = context(DeviceKind::Private, 4 * MIB) else {
                        return 1;
                    };
                    match hm.map_file(&mine, 0, PAGE_SIZE, FileMode::ReadOnly) {
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

    /// A real full file system: a 1 MiB tmpfs holding a sparse 2 MiB file. The flush fails
    /// with ENOSPC and keeps the data; after the tmpfs grows, a flush writes everything. No
    /// lease: the test reads the file between the flushes (a break's failed writeback is
    /// `lease_break_with_failing_writeback`).
    pub fn enospc_on_small_tmpfs() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: enospc_on_small_tmpfs needs root to mount a tmpfs");
            return Ok(());
        }
        let dir = TempDir::new("enospc_on_small_tmpfs")?;
        let Some(mnt) = Mount::tmpfs(&dir.0, "size=1m")? else {
            return Ok(());
        };
        let path = mnt.0.join("data");
        let len = 2 * MIB;
        {
            let f = File::create(&path)?;
            f.set_len(len as u64)?; // sparse: takes no space yet
        }
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let new = content(1, 0, len);
        dev.write(m.addr(), &new)?;

        match m.flush() {
            Err(e @ Error::Io(OpError::NoSpace)) => {
                assert_eq!(e.errno(), libc::ENOSPC, "errno of {e:?}");
                eprintln!("flush on the full tmpfs: {e}");
            }
            Err(e) => panic!("flush on a full tmpfs: expected Io(NoSpace), got {e:?}"),
            Ok(()) => panic!("flush of 2 MiB into a 1 MiB tmpfs succeeded"),
        }
        assert_same("device read after ENOSPC", &dev.read(m.addr(), len)?, &new);
        assert_same("CPU read after ENOSPC", m.as_slice(), &new);
        let on_disk = pread_file(&path)?;
        assert_eq!(on_disk.len(), len, "the file's size changed");
        assert!(on_disk != new, "the whole file was written despite ENOSPC");
        drop(on_disk);

        mnt.remount("size=8m")?;
        m.flush().context("flush after the tmpfs grew")?;
        assert_same("file after the retry", &pread_file(&path)?, &new);
        drop(m);
        drop(hm);
        drop(mnt);
        Ok(())
    }

    /// A disk that fails under the page cache: an ext4 image on a 6 MiB tmpfs, so the loop
    /// device's writes fail once the tmpfs is full. `flush` hands 16 MiB to the page cache and
    /// succeeds; `sync`'s fdatasync then meets the disk's error and reports it (ENOSPC or
    /// EIO, as the block layer passes it up). The mapping keeps the data.
    pub fn sync_reports_a_failing_disk() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: sync_reports_a_failing_disk needs root to mount");
            return Ok(());
        }
        let dir = TempDir::new("sync_reports_a_failing_disk")?;
        let small = dir.path("small");
        let disk = dir.path("disk");
        std::fs::create_dir(&small)?;
        std::fs::create_dir(&disk)?;
        let Some(_tmpfs) = Mount::tmpfs(&small, "size=6m")? else {
            return Ok(());
        };
        let Some(_ext4) = Mount::image(&small.join("img"), &disk, "ext4", 64)? else {
            return Ok(());
        };
        let path = disk.join("data");
        let len = 16 * MIB;
        create_file(&path, &[])?;
        File::options()
            .write(true)
            .open(&path)?
            .set_len(len as u64)?;
        let hm = context(DeviceKind::Private, 32 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        let new = content(1, 0, len);
        dev.write(m.addr(), &new)?;
        m.flush().context("flush into the page cache")?;
        match m.sync() {
            Err(e @ Error::Io(OpError::NoSpace | OpError::Io)) => {
                eprintln!("sync on the failing disk: {e}");
            }
            other => panic!("sync on a disk that fails: expected Error::Io, got {other:?}"),
        }
        assert_same(
            "device read after the failed sync",
            &dev.read(m.addr(), len)?,
            &new,
        );
        assert_same("CPU read after the failed sync", m.as_slice(), &new);
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

    /// A file three times the device's memory, transformed in place by a device kernel, and
    /// every page reaches the file at `flush`. By default, dirty blocks are evicted to system
    /// memory. With `evict_to_file` they are written back from device memory instead (no copy);
    /// and with every writeback failing, eviction copies them after all, nothing is lost, the
    /// next flush reports the error once, and the one after writes everything.
    pub fn file_larger_than_device() -> Result<()> {
        const ADD: u8 = 0x5b;
        for evict_to_file in [false, true] {
            let what = if evict_to_file {
                "evict_to_file"
            } else {
                "default"
            };
            let dir = TempDir::new("file_larger_than_device")?;
            let path = dir.path("data");
            let dev_mem = 4 * MIB;
            let len = 3 * dev_mem;
            let old = content(0, 0, len);
            create_file(&path, &old)?;

            let hm = context(DeviceKind::Private, dev_mem)?;
            let dev = hm.device(0).expect("one device");
            let opts = FileOptions::new(FileMode::Shared).evict_to_file(evict_to_file);
            let m = hm.map_file_with(&path, 0, len, opts)?;
            // Not an involution: a run transformed twice (or not at all) shows.
            let transform = || {
                dev.kernel_write(m.addr(), len, |_, bytes| {
                    for b in bytes {
                        *b = b.wrapping_add(ADD);
                    }
                })
            };
            transform()?;
            let s = hm.stats();
            assert!(
                s.pages_evicted > 0,
                "{what}: no eviction with a file 3x the device: {s:?}"
            );
            if evict_to_file {
                assert!(
                    s.pages_written_back > 0 && s.pages_to_system == 0,
                    "{what}: evicted dirty pages were not written back from the device: {s:?}"
                );
            } else {
                assert!(
                    s.pages_written_back == 0 && s.pages_to_system > 0,
                    "{what}: evicted dirty pages were not copied to system memory: {s:?}"
                );
            }
            assert!(dev.used_pages() <= dev.capacity_pages());

            m.flush()?;
            let want: Vec<u8> = old.iter().map(|b| b.wrapping_add(ADD)).collect();
            assert_same(
                &format!("{what}: file after the device transform"),
                &pread_file(&path)?,
                &want,
            );
            assert_same(&format!("{what}: CPU read"), m.as_slice(), &want);
            if !evict_to_file {
                continue;
            }

            m.inject_writeback_failures(u32::MAX, libc::EIO);
            transform()?;
            let want2: Vec<u8> = want.iter().map(|b| b.wrapping_add(ADD)).collect();
            let s = hm.stats();
            assert!(
                s.pages_to_system > 0,
                "failed eviction writebacks were not copied to system memory: {s:?}"
            );
            assert_same(
                "device read with failing writebacks",
                &dev.read(m.addr(), len)?,
                &want2,
            );
            m.inject_writeback_failures(0, libc::EIO);
            match m.flush() {
                Err(e @ Error::Io(OpError::Io)) => eprintln!("eviction's writeback error: {e}"),
                other => panic!("flush after failed eviction writebacks: {other:?}"),
            }
            m.flush().context("the error was reported twice")?;
            assert_same("file after the retry", &pread_file(&path)?, &want2);
        }
        Ok(())
    }

    /// Eviction from device memory of a file 3x its size. Clean file pages are dropped, not
    /// copied back: the file has them, and a later access reads them again. Written pages of a
    /// Private mapping are copied to system memory, also after a `flush` (which must not make
    /// them clean), and the file never changes.
    pub fn clean_file_pages_are_dropped_on_eviction() -> Result<()> {
        let dir = TempDir::new("clean_file_pages_are_dropped_on_eviction")?;
        let path = dir.path("data");
        let dev_mem = 2 * MIB;
        let len = 3 * dev_mem;
        let npages = (len / PAGE_SIZE) as u64;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, dev_mem)?;
        let dev = hm.device(0).expect("one device");

        let m = hm.map_file(&path, 0, len, FileMode::ReadOnly)?;
        let sum = |b: &[u8]| b.iter().map(|&x| u64::from(x)).sum::<u64>();
        let total = std::sync::atomic::AtomicU64::new(0);
        dev.kernel_read(m.addr(), len, |_, b| {
            total.fetch_add(sum(b), Ordering::Relaxed);
        })?;
        assert_eq!(total.into_inner(), sum(&old), "device scan of the file");
        let s = hm.stats();
        assert!(s.pages_evicted > 0, "no eviction: {s:?}");
        assert_eq!(s.pages_to_system, 0, "clean file pages copied back: {s:?}");
        assert_same("CPU read after the scan", m.as_slice(), &old);
        let s = hm.stats();
        assert!(
            s.pages_from_file > npages,
            "evicted pages were not read from the file again: {s:?}"
        );
        drop(m);

        let m = hm.map_file(&path, 0, len, FileMode::Private)?;
        dev.kernel_write(m.addr(), len, |_, b| b.iter_mut().for_each(|x| *x ^= 0xa5))?;
        let want: Vec<u8> = old.iter().map(|x| x ^ 0xa5).collect();
        m.flush()?;
        // The first two thirds back to the device: the last third, still there, is evicted.
        let evicted = hm.stats().pages_evicted;
        dev.migrate_to_device(m.addr(), 2 * dev_mem - PAGE_SIZE)?;
        dev.migrate_to_device(m.addr(), dev_mem)?;
        assert!(
            hm.stats().pages_evicted > evicted,
            "no eviction after the flush"
        );
        assert_same("CPU read of the Private mapping", m.as_slice(), &want);
        assert_same("device read", &dev.read(m.addr(), len)?, &want);
        drop(m);
        assert_same("file", &pread_file(&path)?, &old);
        Ok(())
    }

    /// A process killed (SIGKILL) while it flushes leaves every 4 KiB page of the file whole:
    /// the old contents or one generation of the new, never a mix.
    pub use super::direct::direct_io_skips_the_page_cache;
    pub use super::direct::lease_break_flushes_for_other_openers;
    pub use super::direct::lease_break_with_failing_writeback;
    pub use super::direct::lease_breaks_racing_a_drop;
    pub use super::direct::lease_taken_on_a_passing_thread_is_served;
    pub use super::direct::write_lease_turned_read_counts_as_lost;
    pub use super::filesystems::regular_files_on_ext4_xfs_and_tmpfs;

    pub fn crash_during_flush_leaves_old_or_new_pages() -> Result<()> {
        /// The child's exit codes, before the kill.
        const CODES: &str = "10: build, 11: map_file, 12: kernel_write, 13: signal, \
                             14: ran out of generations, 15: orphaned";
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
            let Ok(m) = hm.map_file(&child_path, 0, len, FileMode::Shared) else {
                return 11;
            };
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
            "killed after page {probe} was {}; pages per generation (0 = old, {npages} pages): \
             {per_tag:?}",
            if seen_new { "written" } else { "still old" }
        );
        Ok(())
    }
}

/// Pages of the file at `path` resident in the page cache (mincore on a fresh mapping).
fn cached_pages(path: &Path, len: usize) -> Result<usize> {
    let f = File::open(path)?;
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "mmap: {}", last_os_error());
    let mut vec = vec![0u8; len / PAGE_SIZE];
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    unsafe { libc::munmap(p, len) };
    ensure!(r == 0, "mincore: {}", last_os_error());
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
}

/// Evicts the file's pages from the page cache.
fn drop_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    f.sync_all()?;
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(r == 0, "posix_fadvise: {r}");
    Ok(())
}

/// Runs `body` while the lease thread is held up: `open_b` tells a child (forked before, as a
/// fork waits for running device kernels) to open `path_b`, which `b` maps with a lease on
/// `dev`; the break's flush waits for a device kernel over `b` that runs until `body` returns.
/// Breaks of other files queue behind it meanwhile.
fn with_lease_thread_held<T>(
    dev: &hetmem::Device,
    b: &hetmem::FileMapping,
    path_b: &Path,
    open_b: &mut File,
    body: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let addr = b.addr();
    thread::scope(|s| {
        let kernel = s.spawn(|| {
            dev.kernel_write(addr, PAGE_SIZE, |_, page| {
                let _ = started_tx.send(());
                let _ = go_rx.lock().map(|rx| rx.recv());
                page[0] ^= 1;
            })
        });
        let r = (|| {
            started_rx
                .recv_timeout(QUICK)
                .context("the device kernel did not start")?;
            open_b.write_all(b"b")?;
            wait_lease_breaking(path_b)?;
            body()
        })();
        let _ = go_tx.send(());
        kernel.join().expect("kernel thread")?;
        r
    })
}

/// The lowest descriptor of this process open on `path`.
fn fd_of(path: &Path) -> Result<i32> {
    let want = path.canonicalize()?;
    let mut fds = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        if std::fs::read_link(e.path()).is_ok_and(|t| t == want) {
            fds.push(e.file_name().to_string_lossy().parse::<i32>()?);
        }
    }
    fds.into_iter()
        .min()
        .with_context(|| format!("no descriptor open on {}", path.display()))
}

/// Whether the kernel shows an active (not breaking) write lease on `path` (`/proc/locks`).
fn write_lease_active(path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{}", std::fs::metadata(path)?.ino());
    Ok(std::fs::read_to_string("/proc/locks")?.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.get(1..4) == Some(&["LEASE", "ACTIVE", "WRITE"][..])
            && w.iter().any(|x| x.ends_with(&ino))
    }))
}

/// Waits until the kernel shows a lease on `path` breaking (`/proc/locks`): another process is
/// then held in its open until hetmem lets the lease go.
fn wait_lease_breaking(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{}", std::fs::metadata(path)?.ino());
    let deadline = std::time::Instant::now() + QUICK;
    loop {
        let locks = std::fs::read_to_string("/proc/locks")?;
        if locks.lines().any(|l| {
            l.contains(" LEASE ")
                && l.contains("BREAKING")
                && l.split_whitespace().any(|w| w.ends_with(&ino))
        }) {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no lease on {} is breaking:\n{locks}",
            path.display()
        );
        thread::yield_now();
    }
}

mod direct {
    use super::*;

    /// With `FileOptions::direct`, file I/O uses O_DIRECT: reads reach device memory and
    /// writebacks reach the file while the page cache stays empty. Buffered reads (the
    /// control) fill it.
    pub fn direct_io_skips_the_page_cache() -> Result<()> {
        let dir = TempDir::new("direct_io_skips_the_page_cache")?;
        let path = dir.path("data");
        let len = 4 * MIB + 3 * PAGE_SIZE;
        let data = content(7, 0, len);
        create_file(&path, &data)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");

        drop_cache(&path)?;
        let m = hm.map_file_with(
            &path,
            0,
            len,
            FileOptions::new(FileMode::ReadOnly).direct(true),
        )?;
        if !m.is_direct() {
            eprintln!(
                "SKIPPED: the file system under {} has no O_DIRECT, or is tmpfs",
                path.display()
            );
            return Ok(());
        }
        assert_same(
            "device read through O_DIRECT",
            &dev.read(m.addr(), len)?,
            &data,
        );
        let cached = cached_pages(&path, len)?;
        drop(m);
        // The last, partial page may be read through the page cache (O_DIRECT stops at EOF).
        assert!(cached <= 1, "{cached} pages cached after O_DIRECT reads");

        drop_cache(&path)?;
        let m = hm.map_file(&path, 0, len, FileMode::ReadOnly)?;
        assert_same("device read, buffered", &dev.read(m.addr(), len)?, &data);
        let cached = cached_pages(&path, len)?;
        assert!(
            cached >= len / PAGE_SIZE - 1,
            "only {cached} pages cached after buffered reads"
        );
        drop(m);

        // Writebacks too, and the file ends inside its last page, which goes through the page
        // cache. One descriptor does all the I/O, so the write lease is still possible.
        let size = len - 100;
        create_file(&path, &data[..size])?;
        drop_cache(&path)?;
        let opts = FileOptions::new(FileMode::Shared).direct(true);
        let m = hm.map_file_with(&path, 0, len, opts)?;
        assert!(
            m.is_direct(),
            "O_DIRECT worked for reads, not for a Shared mapping"
        );
        assert!(m.is_leased(), "a direct Shared mapping got no write lease");
        let new = content(8, 0, len);
        dev.write(m.addr(), &new)?;
        m.flush()?;
        let cached = cached_pages(&path, len)?;
        assert!(
            cached <= 1,
            "{cached} pages cached after O_DIRECT writebacks"
        );
        assert_same(
            "file after a direct flush",
            &pread_file(&path)?,
            &new[..size],
        );
        assert_same("CPU read", &m.as_slice()[..size], &new[..size]);
        Ok(())
    }

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

        // Put back on every way out, panics included; a run killed before it could is undone
        // by the next one, from the value saved in a file.
        const SAVED: &str = "/tmp/hetmem-lease-break-time.saved";
        struct Restore(String);
        impl Drop for Restore {
            fn drop(&mut self) {
                if std::fs::write(KNOB, self.0.trim()).is_ok() {
                    let _ = std::fs::remove_file(SAVED);
                }
            }
        }
        if let Ok(saved) = std::fs::read_to_string(SAVED) {
            std::fs::write(KNOB, saved.trim())?;
        }
        let restore = Restore(std::fs::read_to_string(KNOB)?);
        std::fs::write(SAVED, &restore.0)?;
        std::fs::write(KNOB, "1")?;
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
}

/// The same round trip on each file system hetmem promises: ext4 and xfs (loop images), and
/// tmpfs.
mod filesystems {
    use super::*;

    pub fn regular_files_on_ext4_xfs_and_tmpfs() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: regular_files_on_ext4_xfs_and_tmpfs needs root to mount");
            return Ok(());
        }
        let dir = TempDir::new("regular_files_on_ext4_xfs_and_tmpfs")?;
        let mut tested = Vec::new();
        for fs in ["ext4", "xfs", "tmpfs"] {
            let target = dir.path(fs);
            std::fs::create_dir(&target)?;
            let mount = match fs {
                "tmpfs" => Mount::tmpfs(&target, "size=64m")?,
                // 300 MiB: the smallest xfs that mkfs.xfs makes.
                _ => Mount::image(&dir.path(&format!("{fs}.img")), &target, fs, 300)?,
            };
            let Some(mount) = mount else { continue };
            round_trip(&target.join("data"), fs).with_context(|| format!("on {fs}"))?;
            drop(mount);
            tested.push(fs);
        }
        eprintln!("file systems tested: {tested:?}");
        Ok(())
    }

    /// A file (its last page partial) 2x the device's memory, buffered and then O_DIRECT: the
    /// device transforms it (eviction), the CPU writes a page, another process's open sees
    /// both through the lease break, a flush writes nothing more, another process's truncate
    /// is seen by the device, and `sync` succeeds.
    fn round_trip(path: &Path, fs: &str) -> Result<()> {
        let dev_mem = 2 * MIB;
        let len = 2 * dev_mem;
        let size = len - 100;
        let hm = context(DeviceKind::Private, dev_mem)?;
        let dev = hm.device(0).expect("one device");
        for direct in [false, true] {
            let what = if direct { "O_DIRECT" } else { "buffered" };
            let old = content(0, 0, len);
            create_file(path, &old[..size])?;
            let opts = FileOptions::new(FileMode::Shared).direct(direct);
            let mut m = hm.map_file_with(path, 0, len, opts)?;
            ensure!(m.is_leased(), "{what}: no lease");
            // tmpfs takes O_DIRECT (Linux 6.6) but has nothing to bypass: its page cache is
            // the file, so hetmem does buffered I/O there.
            ensure!(
                m.is_direct() == (direct && fs != "tmpfs"),
                "{what}: is_direct() is {} on {fs}",
                m.is_direct()
            );
            let evicted = hm.stats().pages_evicted;
            dev.kernel_write(m.addr(), len, |_, b| b.iter_mut().for_each(|x| *x ^= 0x3c))?;
            ensure!(hm.stats().pages_evicted > evicted, "{what}: no eviction");
            let mut want: Vec<u8> = old.iter().map(|x| x ^ 0x3c).collect();
            stamp_page(&mut want[3 * PAGE_SIZE..4 * PAGE_SIZE], 9, 3);
            stamp_page(
                &mut m.as_mut_slice().expect("writable")[3 * PAGE_SIZE..4 * PAGE_SIZE],
                9,
                3,
            );

            let p = path.to_path_buf();
            let expect = want[..size].to_vec();
            let pid = fork_child(|| match std::fs::read(&p) {
                Ok(got) if got == expect => 0,
                Ok(_) => 1,
                Err(_) => 2,
            });
            assert_eq!(
                exit_code(wait_child(pid)),
                0,
                "{what}: another process's open did not see our data (1: other data, 2: error)"
            );
            let written = hm.stats().pages_written_back;
            m.flush()?;
            assert_eq!(
                hm.stats().pages_written_back,
                written,
                "{what}: the break left dirty pages"
            );
            assert_same(&format!("{what}: file"), &pread_file(path)?, &want[..size]);

            let cpath = cstr(path)?;
            let pid = fork_child(|| unsafe { libc::truncate(cpath.as_ptr(), PAGE_SIZE as _) });
            assert_eq!(exit_code(wait_child(pid)), 0, "{what}: truncate(2)");
            assert_err!(
                dev.read(m.addr() + PAGE_SIZE, PAGE_SIZE),
                Error::Fault(_),
                libc::EFAULT
            );
            assert_same(
                &format!("{what}: device read of page 0 after the truncate"),
                &dev.read(m.addr(), PAGE_SIZE)?,
                &want[..PAGE_SIZE],
            );
            m.sync()?;
            drop(m);
            assert_same(
                &format!("{what}: file after the truncate"),
                &pread_file(path)?,
                &want[..PAGE_SIZE],
            );
        }
        Ok(())
    }
}
