//! File mappings (`Hetmem::map_file`) on real files, the basics: CPU and device reads of the
//! file, writes that reach it at `flush` or at drop, and the `Private` and `ReadOnly` modes.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

mod common;

use anyhow::Result;
use common::assert_err;
use common::file::{
    assert_same, content, context, create_file, pread_file, stamp_page, unleased, with_pages,
    DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::TempDir;
use hetmem::{DeviceKind, Error, FileMode, Location, PAGE_SIZE};

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    file_read,
    file_write_device_resident,
    cpu_write_reaches_file_after_flush,
    private_mode_never_writes_back,
    read_only_mode_refuses_writes,
    drop_writes_back,
);

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
}
