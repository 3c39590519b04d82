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
    assert_same, cached_pages, content, context, create_file, drop_cache, hetmem_memfds,
    pread_file, stamp_page, unleased, wait_child, write_lease_active, DEFAULT_TIMEOUT_S, MIB,
};
use common::fs::{cstr, Mount, TempDir};
use common::process::{exit_code, fork_child};
use hetmem::{DeviceKind, Error, FileMode, FileOptions, Filesystem, LeaseProbe, PAGE_SIZE};

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    direct_io_skips_the_page_cache,
    regular_files_on_ext4_xfs_and_tmpfs,
    the_probe_names_the_file_system,
    require_lease_refuses_to_map_without_the_lease,
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
            let caps = m.capabilities();
            ensure!(
                caps.filesystem.name() == fs
                    && caps.lease == LeaseProbe::Taken
                    && caps.coherent_with_other_writers,
                "{what}: capabilities on {fs}: {caps:?}"
            );
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

    /// `FileMapping::capabilities` names the file system from `statfs`: tmpfs for `/dev/shm`,
    /// and for the temporary directory what `findmnt` says it is (ext4, xfs and a tmpfs by
    /// name: `regular_files_on_ext4_xfs_and_tmpfs`). The lease probe says taken, or not asked
    /// for an unleased or a private mapping.
    pub fn the_probe_names_the_file_system() -> Result<()> {
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let shm = std::path::PathBuf::from(format!("/dev/shm/hetmem-probe-{}", std::process::id()));
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        create_file(&shm, &content(0, 0, 4 * PAGE_SIZE))?;
        let _gone = Gone(shm.clone());
        let m = hm.map_file(&shm, 0, 4 * PAGE_SIZE, FileMode::Shared)?;
        let caps = m.capabilities();
        ensure!(
            caps.filesystem == Filesystem::Tmpfs
                && caps.filesystem.name() == "tmpfs"
                && caps.magic == 0x0102_1994,
            "/dev/shm: {caps:?}"
        );
        ensure!(
            caps.lease == LeaseProbe::Taken && caps.coherent_with_other_writers && m.is_leased(),
            "/dev/shm, nobody else has it open: {caps:?}, leased {}",
            m.is_leased()
        );
        drop(m);
        for opts in [
            unleased(FileMode::Shared),
            FileOptions::new(FileMode::Private),
        ] {
            let m = hm.map_file_with(&shm, 0, 4 * PAGE_SIZE, opts)?;
            let caps = m.capabilities();
            ensure!(
                caps.lease == LeaseProbe::NotAsked
                    && !caps.coherent_with_other_writers
                    && !m.is_leased(),
                "{opts:?}: {caps:?}"
            );
        }

        let dir = TempDir::new("the_probe_names_the_file_system")?;
        let path = dir.path("data");
        create_file(&path, &content(0, 0, 4 * PAGE_SIZE))?;
        let out = std::process::Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE", "--target"])
            .arg(&dir.0)
            .output();
        let Ok(out) = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else {
            eprintln!(
                "SKIPPED (in part): no findmnt to name the temporary directory's file system"
            );
            return Ok(());
        };
        let m = hm.map_file(&path, 0, 4 * PAGE_SIZE, FileMode::ReadOnly)?;
        let caps = m.capabilities();
        eprintln!("{}: findmnt says {out:?}; {caps:?}", dir.0.display());
        // ext2 and ext3 share ext4's magic.
        let same = caps.filesystem.name() == out
            || (caps.filesystem == Filesystem::Ext4 && out.starts_with("ext"));
        ensure!(same, "findmnt says {out:?}, the probe {caps:?}");
        Ok(())
    }

    /// `FileOptions::require_lease`: where the lease can be had (nobody else has the file
    /// open), `map_file` maps, leased. Where it cannot (the test holds a second read-write
    /// descriptor: no write lease then; a writer: no read lease), it fails with
    /// `Error::NoLease(LeaseProbe::InUse)` (EAGAIN) and leaves nothing behind: no region, no
    /// lease, the file not open by hetmem. Without the option the same map succeeds, unleased,
    /// and says why. A private mapping cannot require a lease (`Invalid`). As root, a process
    /// that does not own the file and lacks CAP_LEASE is refused for good
    /// (`Refused(EACCES)`).
    pub fn require_lease_refuses_to_map_without_the_lease() -> Result<()> {
        let dir = TempDir::new("require_lease_refuses_to_map_without_the_lease")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        create_file(&path, &content(0, 0, len))?;
        let hm = context(DeviceKind::Private, 16 * MIB)?;
        let required = |mode| FileOptions::new(mode).require_lease(true);

        let m = hm.map_file_with(&path, 0, len, required(FileMode::Shared))?;
        ensure!(
            m.is_leased() && m.capabilities().lease == LeaseProbe::Taken,
            "require_lease on a file nobody else has open: {:?}",
            m.capabilities()
        );
        ensure!(
            write_lease_active(&path)?,
            "the kernel shows no write lease"
        );
        drop(m);

        let regions = hetmem_memfds();
        let other = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)?;
        for mode in [FileMode::Shared, FileMode::ReadOnly] {
            match hm.map_file_with(&path, 0, len, required(mode)) {
                Err(e @ Error::NoLease(LeaseProbe::InUse)) => {
                    assert_eq!(e.errno(), libc::EAGAIN, "{mode:?}: errno of {e:?}");
                    eprintln!("{mode:?}, the file open elsewhere: {e}");
                }
                Err(e) => panic!("{mode:?}: expected NoLease(InUse), got {e:?}"),
                Ok(m) => panic!(
                    "{mode:?}: mapped without the lease (leased now: {}, {:?})",
                    m.is_leased(),
                    m.capabilities()
                ),
            }
        }
        ensure!(
            hetmem_memfds() == regions,
            "a refused map_file left a region behind"
        );
        ensure!(
            common::file::fd_of(&path)? == std::os::fd::AsRawFd::as_raw_fd(&other)
                && !write_lease_active(&path)?,
            "a refused map_file left the file open or leased"
        );
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(
            !m.is_leased() && m.capabilities().lease == LeaseProbe::InUse,
            "without require_lease: {:?}, leased {}",
            m.capabilities(),
            m.is_leased()
        );
        drop(m);
        drop(other);
        let m = hm.map_file_with(&path, 0, len, required(FileMode::Shared))?;
        ensure!(
            m.is_leased(),
            "require_lease once the other descriptor is closed"
        );
        drop(m);

        assert_err!(
            hm.map_file_with(&path, 0, len, required(FileMode::Private)),
            Error::Invalid(_),
            libc::EINVAL
        );

        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED (in part): Refused(EACCES) needs root to drop to another user");
            return Ok(());
        }
        // A child that builds its context as root, then becomes nobody (no CAP_LEASE), and
        // maps the root-owned file read-only with require_lease: EACCES, for good.
        let p = path.clone();
        let pid = fork_child(move || {
            let Ok(hm) = context(DeviceKind::Private, 16 * MIB) else {
                return 10;
            };
            unsafe {
                if libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    return 11;
                }
                // setuid made /proc/self root's; the open through /proc/self/fd needs it.
                libc::prctl(libc::PR_SET_DUMPABLE, 1);
            }
            match hm.map_file_with(&p, 0, len, required(FileMode::ReadOnly)) {
                Err(e @ Error::NoLease(LeaseProbe::Refused(libc::EACCES)))
                    if e.errno() == libc::EACCES =>
                {
                    0
                }
                Err(Error::NoLease(_)) => 1,
                Err(_) => 2,
                Ok(_) => 3,
            }
        });
        let code = exit_code(wait_child(pid));
        ensure!(
            code == 0,
            "a non-owner without CAP_LEASE: exit {code} (1: another NoLease, 2: another error, \
             3: mapped, 10: no context, 11: setresuid)"
        );
        Ok(())
    }
}
