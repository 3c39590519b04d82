//! File mappings (`Hetmem::map_file`) and the ways to the file: O_DIRECT I/O that bypasses the
//! page cache, and one round trip on each file system hetmem promises (ext4 and xfs on loop
//! images, and tmpfs), buffered and O_DIRECT.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::path::Path;

mod common;

use anyhow::{ensure, Context, Result};
use common::assert_err;
use common::file::{
    assert_same, cached_pages, content, context, create_file, drop_cache, pread_file, stamp_page,
    wait_child, DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::{cstr, Mount, TempDir};
use common::process::{exit_code, fork_child};
use hetmem::{DeviceKind, Error, FileMode, FileOptions, PAGE_SIZE};

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    direct_io_skips_the_page_cache,
    regular_files_on_ext4_xfs_and_tmpfs,
);

mod scenarios {
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

    /// The same round trip (`round_trip`) on each file system hetmem promises: ext4 and xfs
    /// (loop images), and tmpfs.
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
