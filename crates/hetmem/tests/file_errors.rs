//! File mappings (`Hetmem::map_file`) on real files: I/O errors. Injected writeback and read
//! errors, a full tmpfs and a failing disk; what `flush` and `sync` report, to which mappings,
//! and that the data stays.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;

mod common;

use anyhow::{Context, Result};
use common::assert_err;
use common::file::{
    assert_same, clone_vm_read, content, context, create_file, is_sigbus, pread_file, read_outcome,
    unleased, DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::{Mount, TempDir};
use hetmem::{DeviceKind, Error, FileMode, PAGE_SIZE};
use hetmem_proto::OpError;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    eio_keeps_data_dirty_and_retry_succeeds,
    writeback_errors_reach_every_mapping_of_the_file,
    read_errors_on_first_touch,
    enospc_on_small_tmpfs,
    sync_reports_a_failing_disk,
    an_unseen_error_reaches_a_later_mapping,
    a_failed_fdatasync_makes_the_pages_dirty_again,
    sync_calls_fdatasync_after_a_flush_error,
    flush_reports_the_kernels_writeback_errors,
);

mod scenarios {
    use super::*;

    /// An injected writeback failure is reported by `flush` (EIO, then ENOSPC, then EDQUOT, each
    /// with its own errno: a quota error is not a full file system); the data stays in the
    /// mapping, dirty, and the next `flush` writes it.
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
            (3, libc::EDQUOT, OpError::Quota),
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
            let name = match errno {
                libc::EIO => "EIO",
                libc::ENOSPC => "ENOSPC",
                _ => "EDQUOT",
            };
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

    /// The errseq's "seen" rule: an error nobody has been told of yet is reported to a mapping
    /// made after it, and the file's sequence outlives its last mapping until someone is told.
    /// Errors come from `discard`'s writeback, which the file's flushes report later (contract
    /// §13), one an EIO, one an EDQUOT, whose errno reaches the later mapping.
    pub fn an_unseen_error_reaches_a_later_mapping() -> Result<()> {
        let dir = TempDir::new("an_unseen_error_reaches_a_later_mapping")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");

        // (1) A mapping made after an error nobody saw reports it.
        let a = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let new = content(1, 0, len);
        dev.write(a.addr(), &new)?;
        a.inject_writeback_failures(1, libc::EIO);
        assert_err!(hm.discard(a.addr(), len), Error::Io(OpError::Io), libc::EIO);
        let b = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        assert_err!(b.flush(), Error::Io(OpError::Io), libc::EIO);
        b.flush().context("b: the error was reported twice")?;
        // a's own cursor reports it once too, and its flush writes the page.
        assert_err!(a.flush(), Error::Io(OpError::Io), libc::EIO);
        a.flush().context("a: the error was reported twice")?;
        // Seen now: a mapping made after that is not told.
        let c = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        c.flush()
            .context("c, made after the error was seen, was told of it")?;
        drop((a, b, c));
        assert_same("file", &pread_file(&path)?, &new);

        // (2) An unseen error survives the file's last mapping.
        let d = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let newer = content(2, 0, len);
        dev.write(d.addr(), &newer)?;
        d.inject_writeback_failures(1, libc::EDQUOT);
        assert_err!(
            hm.discard(d.addr(), len),
            Error::Io(OpError::Quota),
            libc::EDQUOT
        );
        // The drop's writeback succeeds (one failure was armed); nobody has reported the error.
        drop(d);
        assert_eq!(hm.stats().errors, 0, "the drop lost data");
        assert_same("file after d's drop", &pread_file(&path)?, &newer);
        let e = hm.map_file_with(&path, 0, len, unleased(FileMode::ReadOnly))?;
        assert_err!(e.flush(), Error::Io(OpError::Quota), libc::EDQUOT);
        e.flush().context("e: the error was reported twice")?;
        drop(e);
        let f = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        f.flush()
            .context("f, made after the error was seen, was told of it")?;
        Ok(())
    }

    /// `sync`'s fdatasync fails (injected after the real one, EIO then EDQUOT, each errno
    /// kept): the pages the mapping wrote since its last good sync are dirty again, so the next
    /// `flush` writes them all once more, and a `sync` that succeeds leaves nothing to write.
    pub fn a_failed_fdatasync_makes_the_pages_dirty_again() -> Result<()> {
        let dir = TempDir::new("a_failed_fdatasync_makes_the_pages_dirty_again")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let npages = (len / PAGE_SIZE) as u64;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        for (tag, errno, op) in [
            (1, libc::EIO, OpError::Io),
            (2, libc::EDQUOT, OpError::Quota),
        ] {
            let what = format!("errno {errno}");
            let new = content(tag, 0, len);
            dev.write(m.addr(), &new)?;
            m.flush().with_context(|| format!("{what}: flush"))?;
            m.inject_sync_failures(1, errno);
            match m.sync() {
                Err(e @ Error::Io(got)) if got == op => assert_eq!(e.errno(), errno, "{what}"),
                other => panic!("{what}: sync with a failing fdatasync: {other:?}"),
            }
            let before = hm.stats().pages_written_back;
            m.flush()
                .with_context(|| format!("{what}: flush after the failed sync"))?;
            let again = hm.stats().pages_written_back - before;
            assert_eq!(
                again, npages,
                "{what}: pages written again after fdatasync failed"
            );
            m.sync()
                .with_context(|| format!("{what}: sync after the retry"))?;
            let before = hm.stats().pages_written_back;
            m.flush()?;
            assert_eq!(
                hm.stats().pages_written_back,
                before,
                "{what}: a good sync left pages dirty"
            );
            assert_same(&format!("{what}: file"), &pread_file(&path)?, &new);
            assert_same(&format!("{what}: CPU read"), m.as_slice(), &new);
        }
        Ok(())
    }

    /// `sync` runs fdatasync even when its flush fails, and returns the first error: with a
    /// failing writeback (ENOSPC) and a failing fdatasync (EIO) armed, `sync` reports ENOSPC,
    /// and the fdatasync failure was used up by it, so the next `sync` succeeds.
    pub fn sync_calls_fdatasync_after_a_flush_error() -> Result<()> {
        let dir = TempDir::new("sync_calls_fdatasync_after_a_flush_error")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let new = content(1, 0, len);
        dev.write(m.addr(), &new)?;
        m.inject_writeback_failures(1, libc::ENOSPC);
        m.inject_sync_failures(1, libc::EIO);
        assert_err!(m.sync(), Error::Io(OpError::NoSpace), libc::ENOSPC);
        m.sync()
            .context("the second sync: the first one skipped its fdatasync")?;
        assert_same("file", &pread_file(&path)?, &new);
        Ok(())
    }

    /// `flush` reports an error of the kernel's own writeback: a disk that fails under the page
    /// cache (as in `sync_reports_a_failing_disk`). `flush` hands the data to the page cache and
    /// succeeds; a `syncfs` of the file system (not an open of the file, which would break the
    /// lease) makes the kernel write it, which fails; the next `flush` reports that, once, and
    /// makes the pages dirty again: the flush after it writes them once more.
    pub fn flush_reports_the_kernels_writeback_errors() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: flush_reports_the_kernels_writeback_errors needs root to mount");
            return Ok(());
        }
        let dir = TempDir::new("flush_reports_the_kernels_writeback_errors")?;
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
        let npages = (len / PAGE_SIZE) as u64;
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
        let fs = File::open(&disk)?;
        // Its own result is the file system's error sequence, not the file's: not looked at.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&fs)) };
        match m.flush() {
            Err(e @ Error::Io(OpError::NoSpace | OpError::Io)) => {
                eprintln!("flush after the kernel's writeback failed: {e}");
            }
            other => panic!(
                "flush after the kernel's writeback of its pages failed: expected Error::Io, \
                 got {other:?}"
            ),
        }
        let before = hm.stats().pages_written_back;
        let again = m.flush();
        let written = hm.stats().pages_written_back - before;
        eprintln!("the flush after: {again:?}, {written} pages written");
        assert_eq!(
            written, npages,
            "pages written again after the kernel's writeback failed"
        );
        assert_same("CPU read", m.as_slice(), &new);
        Ok(())
    }
}
