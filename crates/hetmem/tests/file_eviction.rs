//! File mappings (`Hetmem::map_file`) of files larger than device memory: eviction by copy
//! or by writeback (`evict_to_file`), and clean file pages dropped instead of copied.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

use std::sync::atomic::Ordering;

mod common;

use anyhow::{Context, Result};
use common::file::{
    assert_same, content, context, create_file, pread_file, DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::TempDir;
use hetmem::{DeviceKind, Error, FileMode, FileOptions, PAGE_SIZE};
use hetmem_proto::OpError;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    file_larger_than_device,
    clean_file_pages_are_dropped_on_eviction,
);

mod scenarios {
    use super::*;

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
}
