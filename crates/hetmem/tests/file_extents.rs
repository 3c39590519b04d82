//! Other writers' extent operations and file locks against a mapping without a lease
//! (`docs/file-contract.md` §6, "Extent operations and file locks"): `FileMapping::flush_range`
//! and `FileMapping::invalidate_range`, a hole punched and pages written by another descriptor,
//! a collapsed range (ext4), and two writers that share a page under OFD locks.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Barrier;

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::assert_err;
use common::file::{
    assert_same, content, context, create_file, pread_file, stamp_page, unleased, with_pages,
    DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::{Mount, TempDir};
use common::process::last_os_error;
use hetmem::{DeviceKind, Error, FileMode, PAGE_SIZE};
use hetmem_proto::OpError;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    range_arguments_are_checked_first,
    flush_range_writes_only_the_range,
    invalidate_range_writes_back_then_drops,
    invalidate_range_with_a_failing_writeback,
    invalidate_range_shows_a_punched_hole_and_others_writes,
    collapse_range_under_an_unleased_mapping,
    ofd_locked_round_trips_keep_both_writers_updates,
);

/// One page stamped with `tag` as page `page`.
fn page_of(tag: u32, page: usize) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    stamp_page(&mut p, tag, page);
    p
}

/// Page `page` of `bytes`.
fn page(bytes: &[u8], page: usize) -> &[u8] {
    &bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
}

/// `fallocate(2)` on another descriptor of the file; Ok(false) where the file system does not
/// have that mode (EOPNOTSUPP).
fn fallocate(f: &File, mode: libc::c_int, offset: usize, len: usize) -> Result<bool> {
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        return Ok(true);
    }
    let e = last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(false);
    }
    Err(e).context("fallocate")
}

/// `F_OFD_SETLKW` of `kind` (F_WRLCK, F_UNLCK) on bytes `[start, start + len)`, waiting.
fn ofd_lock(f: &File, kind: libc::c_int, start: usize, len: usize) -> Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // l_pid stays 0, as OFD locks require.
    loop {
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } == 0 {
            return Ok(());
        }
        let e = last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e).context("fcntl(F_OFD_SETLKW)");
        }
    }
}

mod scenarios {
    use super::*;

    /// Empty, unaligned and out-of-mapping ranges are refused with `Invalid` before anything
    /// is done: a dirty page covered by the valid part of a refused range is neither written
    /// back nor dropped.
    pub fn range_arguments_are_checked_first() -> Result<()> {
        let dir = TempDir::new("range_arguments_are_checked_first")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let new = page_of(1, 0);
        m.as_mut_slice().expect("shared")[..PAGE_SIZE].copy_from_slice(&new);
        let bad: [(usize, usize); 7] = [
            (0, 0),
            (1, PAGE_SIZE),
            (0, PAGE_SIZE + 1),
            (len, PAGE_SIZE),
            (0, len + PAGE_SIZE),
            (PAGE_SIZE, len),
            (usize::MAX - (PAGE_SIZE - 1), PAGE_SIZE),
        ];
        for (offset, n) in bad {
            assert_err!(m.flush_range(offset, n), Error::Invalid(_), libc::EINVAL);
            assert_err!(
                m.invalidate_range(offset, n),
                Error::Invalid(_),
                libc::EINVAL
            );
        }
        // Nothing was written back, nothing dropped.
        assert_same("file after refused calls", &pread_file(&path)?, &old);
        assert_same("page 0 after refused calls", page(m.as_slice(), 0), &new);
        // The whole mapping is a valid range.
        m.flush_range(0, len)?;
        assert_same(
            "file after flush_range(0, len)",
            &pread_file(&path)?,
            &with_pages(&old, 1, &[0]),
        );
        m.invalidate_range(0, len)?;
        Ok(())
    }

    /// `flush_range` writes back the dirty pages of its range, CPU- and device-written, and
    /// no other: pages outside it stay dirty in the mapping until a later flush.
    pub fn flush_range_writes_only_the_range() -> Result<()> {
        let dir = TempDir::new("flush_range_writes_only_the_range")?;
        let path = dir.path("data");
        let pages = 16;
        let len = pages * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        {
            let v = m.as_mut_slice().expect("shared");
            for p in [1, 2, 7] {
                v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page_of(1, p));
            }
        }
        dev.write(m.addr() + 9 * PAGE_SIZE, &page_of(1, 9))?;

        m.flush_range(PAGE_SIZE, 2 * PAGE_SIZE)?;
        assert_same(
            "file after flush_range of pages 1-2",
            &pread_file(&path)?,
            &with_pages(&old, 1, &[1, 2]),
        );
        m.flush_range(9 * PAGE_SIZE, PAGE_SIZE)?;
        assert_same(
            "file after flush_range of page 9 (device-resident)",
            &pread_file(&path)?,
            &with_pages(&old, 1, &[1, 2, 9]),
        );
        m.flush()?;
        assert_same(
            "file after flush",
            &pread_file(&path)?,
            &with_pages(&old, 1, &[1, 2, 7, 9]),
        );
        Ok(())
    }

    /// `invalidate_range` writes the range's dirty pages back (CPU- and device-written) before
    /// it drops them, leaves dirty pages outside the range alone, and drops every copy in the
    /// range: another writer's later bytes show on the CPU and on the device.
    pub fn invalidate_range_writes_back_then_drops() -> Result<()> {
        let dir = TempDir::new("invalidate_range_writes_back_then_drops")?;
        let path = dir.path("data");
        let pages = 16;
        let len = pages * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        assert_same("first read", m.as_slice(), &old);
        {
            let v = m.as_mut_slice().expect("shared");
            for p in [3, 5] {
                v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page_of(2, p));
            }
        }
        dev.write(m.addr() + 4 * PAGE_SIZE, &page_of(2, 4))?;

        m.invalidate_range(3 * PAGE_SIZE, 2 * PAGE_SIZE)?;
        assert_same(
            "file after invalidate_range of pages 3-4: their writes, not page 5's",
            &pread_file(&path)?,
            &with_pages(&old, 2, &[3, 4]),
        );

        // Dropped: another writer's bytes now show, on the CPU and on the device.
        let other = std::fs::OpenOptions::new().write(true).open(&path)?;
        for p in [3, 4, 5] {
            other.write_all_at(&page_of(3, p), (p * PAGE_SIZE) as u64)?;
        }
        assert_same("CPU page 3", page(m.as_slice(), 3), &page_of(3, 3));
        assert_same(
            "device page 4",
            &dev.read(m.addr() + 4 * PAGE_SIZE, PAGE_SIZE)?,
            &page_of(3, 4),
        );
        // Page 5 was outside the range: still our dirty copy, written by the next flush.
        assert_same("CPU page 5", page(m.as_slice(), 5), &page_of(2, 5));
        m.flush()?;
        let mut want = with_pages(&old, 3, &[3, 4]);
        want = with_pages(&want, 2, &[5]);
        assert_same("file after flush", &pread_file(&path)?, &want);
        Ok(())
    }

    /// A writeback that fails during `invalidate_range`: the call returns the error (once: the
    /// next flush does not report it again), the page keeps our write, dirty and cached, the
    /// rest of the range is dropped all the same (another writer's page shows), and the next
    /// flush writes the kept page.
    pub fn invalidate_range_with_a_failing_writeback() -> Result<()> {
        let dir = TempDir::new("invalidate_range_with_a_failing_writeback")?;
        let path = dir.path("data");
        // Two blocks: the failure is in the first, the other writer's page in the second.
        let len = 4 * MIB;
        let theirs = 2 * MIB / PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        assert_same("first read", m.as_slice(), &old);
        m.as_mut_slice().expect("shared")[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&page_of(1, 1));
        let other = std::fs::OpenOptions::new().write(true).open(&path)?;
        other.write_all_at(&page_of(2, theirs), (theirs * PAGE_SIZE) as u64)?;
        let file = with_pages(&old, 2, &[theirs]);

        m.inject_writeback_failures(1, libc::EIO);
        match m.invalidate_range(0, len) {
            Err(Error::Io(OpError::Io)) => {}
            r => bail!("invalidate_range with a failing writeback: {r:?}"),
        }
        assert_same("the file: page 1 not written", &pread_file(&path)?, &file);
        assert_same("page 1, kept", page(m.as_slice(), 1), &page_of(1, 1));
        assert_same(
            "the other writer's page, dropped and read again",
            page(m.as_slice(), theirs),
            &page_of(2, theirs),
        );
        // Reported once: the flush that writes the page succeeds.
        m.flush()?;
        assert_same(
            "the file after flush",
            &pread_file(&path)?,
            &with_pages(&file, 1, &[1]),
        );
        Ok(())
    }

    /// Another descriptor punches a hole and writes a page under an unleased mapping that has
    /// cached them: the mapping keeps showing the old data (the limit, §6), and after
    /// `invalidate_range` of each range it shows the file: zeros in the hole, the new page.
    pub fn invalidate_range_shows_a_punched_hole_and_others_writes() -> Result<()> {
        let dir = TempDir::new("invalidate_range_shows_a_punched_hole_and_others_writes")?;
        let path = dir.path("data");
        let pages = 32;
        let len = pages * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        assert_same("first CPU read", m.as_slice(), &old);
        assert_same(
            "first device read of page 3",
            &dev.read(m.addr() + 3 * PAGE_SIZE, PAGE_SIZE)?,
            page(&old, 3),
        );

        let other = std::fs::OpenOptions::new().write(true).open(&path)?;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !fallocate(&other, punch, 2 * PAGE_SIZE, 2 * PAGE_SIZE)? {
            eprintln!(
                "SKIPPED: invalidate_range_shows_a_punched_hole_and_others_writes: no punch \
                 hole on {}",
                path.display()
            );
            return Ok(());
        }
        other.write_all_at(&page_of(1, 6), (6 * PAGE_SIZE) as u64)?;
        let mut file = old.clone();
        file[2 * PAGE_SIZE..4 * PAGE_SIZE].fill(0);
        file = with_pages(&file, 1, &[6]);
        assert_same("the file", &pread_file(&path)?, &file);

        // The limit: cached pages are not re-read without a lease.
        assert_same("mapping before invalidate_range", m.as_slice(), &old);

        m.invalidate_range(2 * PAGE_SIZE, 2 * PAGE_SIZE)?;
        let mut want = file.clone();
        want[6 * PAGE_SIZE..7 * PAGE_SIZE].copy_from_slice(page(&old, 6));
        assert_same(
            "mapping after invalidate_range of the hole (page 6 outside it)",
            m.as_slice(),
            &want,
        );
        assert_same(
            "device read of page 3, in the hole",
            &dev.read(m.addr() + 3 * PAGE_SIZE, PAGE_SIZE)?,
            &[0u8; PAGE_SIZE],
        );
        m.invalidate_range(6 * PAGE_SIZE, PAGE_SIZE)?;
        assert_same(
            "mapping after invalidate_range of page 6",
            m.as_slice(),
            &file,
        );
        // Nothing was dirty: a flush writes nothing over the hole.
        m.flush()?;
        assert_same("the file after flush", &pread_file(&path)?, &file);
        Ok(())
    }

    /// ext4 (a loop image; as root): another descriptor collapses pages 2-3 out of the file
    /// under an unleased mapping that caches every page and has page 5 dirty. The mapping
    /// keeps the old layout; `invalidate_range` writes page 5 back at its old offset (where
    /// the file's old page 7 now is: the documented limit, §6), truncates the pages past the
    /// new end, and then shows the shifted file.
    pub fn collapse_range_under_an_unleased_mapping() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "SKIPPED: collapse_range_under_an_unleased_mapping needs root to mount ext4 \
                 (collapse range: ext4 and xfs only)"
            );
            return Ok(());
        }
        let dir = TempDir::new("collapse_range_under_an_unleased_mapping")?;
        let target = dir.path("ext4");
        std::fs::create_dir(&target)?;
        let Some(mount) = Mount::image(&dir.path("ext4.img"), &target, "ext4", 32)? else {
            return Ok(());
        };
        collapse(&target.join("data")).context("on ext4")?;
        drop(mount);
        Ok(())
    }

    fn collapse(path: &Path) -> Result<()> {
        let pages = 16;
        let len = pages * PAGE_SIZE;
        let old = content(0, 0, len);
        create_file(path, &old)?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let mut m = hm.map_file_with(path, 0, len, unleased(FileMode::Shared))?;
        assert_same("first read", m.as_slice(), &old);
        m.as_mut_slice().expect("shared")[5 * PAGE_SIZE..6 * PAGE_SIZE]
            .copy_from_slice(&page_of(1, 5));

        let other = std::fs::OpenOptions::new().write(true).open(path)?;
        if !fallocate(
            &other,
            libc::FALLOC_FL_COLLAPSE_RANGE,
            2 * PAGE_SIZE,
            2 * PAGE_SIZE,
        )? {
            bail!("ext4 refused FALLOC_FL_COLLAPSE_RANGE");
        }
        drop(other);
        // File page k >= 2 is now old page k + 2; the file is 14 pages long.
        let shifted = |k: usize| if k < 2 { k } else { k + 2 };
        let mut file: Vec<u8> = (0..pages - 2)
            .flat_map(|k| page_of(0, shifted(k)))
            .collect();
        assert_same("the file after the collapse", &pread_file(path)?, &file);
        // The mapping keeps the old layout: page 2 is still old page 2.
        assert_same("mapping page 2", page(m.as_slice(), 2), page(&old, 2));

        m.invalidate_range(0, len)?;
        // Page 5 went back to offset 5, over the data that moved there (old page 7).
        file[5 * PAGE_SIZE..6 * PAGE_SIZE].copy_from_slice(&page_of(1, 5));
        assert_same("the file after invalidate_range", &pread_file(path)?, &file);
        assert_same(
            "mapping after invalidate_range (within the new end)",
            &m.as_slice()[..(pages - 2) * PAGE_SIZE],
            &file,
        );
        let dev = hm.device(0).expect("one device");
        ensure!(
            matches!(
                dev.read(m.addr() + (pages - 1) * PAGE_SIZE, PAGE_SIZE),
                Err(Error::Fault(_))
            ),
            "a device read past the new end of file did not fail with Fault"
        );
        Ok(())
    }

    /// Two writers, each with its own unleased mapping of one file and its own descriptor,
    /// share page 0 under an OFD write lock on the whole page: lock, `invalidate_range`, read
    /// the shared counter, add one to it and to their own record, `flush_range`, unlock; 50
    /// rounds each, both having cached the page before the first round. No update is lost:
    /// the counter is 100 and each record 50. Without the invalidation each mapping counts
    /// from its own stale copy; without the flush nothing reaches the file.
    pub fn ofd_locked_round_trips_keep_both_writers_updates() -> Result<()> {
        let dir = TempDir::new("ofd_locked_round_trips_keep_both_writers_updates")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        create_file(&path, &vec![0u8; len])?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        const ROUNDS: u64 = 50;
        let cached = Barrier::new(2);
        let word = |v: &[u8], at: usize| u64::from_ne_bytes(v[at..at + 8].try_into().unwrap());
        std::thread::scope(|s| -> Result<()> {
            let writers: Vec<_> = [1024usize, 2048]
                .into_iter()
                .map(|record| {
                    let (hm, path, cached) = (&hm, &path, &cached);
                    s.spawn(move || -> Result<()> {
                        let mut m = hm.map_file_with(path, 0, len, unleased(FileMode::Shared))?;
                        let lock = std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(path)?;
                        ensure!(word(m.as_slice(), 0) == 0, "the file starts at zero");
                        cached.wait();
                        for _ in 0..ROUNDS {
                            ofd_lock(&lock, libc::F_WRLCK, 0, PAGE_SIZE)?;
                            m.invalidate_range(0, PAGE_SIZE)?;
                            let v = m.as_mut_slice().expect("shared");
                            let (count, mine) = (word(v, 0), word(v, record));
                            v[..8].copy_from_slice(&(count + 1).to_ne_bytes());
                            v[record..record + 8].copy_from_slice(&(mine + 1).to_ne_bytes());
                            m.flush_range(0, PAGE_SIZE)?;
                            ofd_lock(&lock, libc::F_UNLCK, 0, PAGE_SIZE)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in writers {
                w.join().expect("writer thread panicked")?;
            }
            Ok(())
        })?;
        let file = pread_file(&path)?;
        assert_eq!(
            (word(&file, 0), word(&file, 1024), word(&file, 2048)),
            (2 * ROUNDS, ROUNDS, ROUNDS),
            "the shared counter, then each writer's record"
        );
        Ok(())
    }
}
