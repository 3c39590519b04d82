//! `Hetmem::pin`: DMA by others into managed memory (`docs/file-contract.md` §2.10).
//!
//! Two kinds of DMA write the pinned memory here. An `O_DIRECT` `pread(2)` into it, from a
//! file in a temporary directory (skipped, saying so, where the file system refuses O_DIRECT).
//! And a write through a second mapping of the page's physical memory (the region's memfd,
//! reached through `/proc/self/map_files`; root only, skipped otherwise): it takes no fault
//! hetmem sees, as a NIC or an io_uring fixed buffer writing a pinned page does.
//!
//! Every scenario runs under a watchdog (`HETMEM_TEST_TIMEOUT_S`, default 60 s), one at a time.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::os::unix::fs::{FileExt, OpenOptionsExt};

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::file::{assert_same, content, create_file, pread_file, unleased, wait_child, MIB};
use common::fs::TempDir;
use common::process::{exit_code, fork_child};
use hetmem::{Advice, DeviceKind, Error, FileMode, Hetmem, Location, Mem, PAGE_SIZE};

const DEFAULT_TIMEOUT_S: u64 = 60;

common::serial_tests!(
    DEFAULT_TIMEOUT_S;
    pin_refuses_bad_input_before_doing_anything,
    o_direct_read_into_a_pinned_buffer,
    dma_into_a_pinned_file_mapping_reaches_the_file,
    a_lease_break_keeps_pinned_pages,
);

/// Where each page of `[addr, addr + len)` is, as the device sees it.
fn locations(dev: &hetmem::Device, addr: usize, len: usize) -> Result<Vec<Location>> {
    Ok(dev
        .snapshot(addr, len)?
        .into_iter()
        .map(|s| s.location)
        .collect())
}

/// Opens `path` for reading with O_DIRECT; `None` (after saying so) where the file system
/// refuses it.
fn open_direct(path: &std::path::Path) -> Result<Option<std::fs::File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!(
                "SKIPPED: {} refuses O_DIRECT (tmpfs before Linux 6.6?): no O_DIRECT read",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(e).context("open O_DIRECT"),
    }
}

/// `pread(2)` of `len` bytes at file offset `off` straight into memory at `addr` (with
/// O_DIRECT the kernel pins that memory and writes it itself: DMA into it).
fn pread_into(f: &std::fs::File, addr: usize, len: usize, off: u64) -> Result<()> {
    let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    f.read_exact_at(dst, off)
        .context("pread into managed memory")
}

/// A second mapping of the physical memory under `[addr, addr + len)` of the CPU view (the
/// region's memfd, through `/proc/self/map_files`): writing it is DMA as hetmem sees it, a
/// write to the page with no fault. `None` (after saying so) where that cannot be opened.
struct Alias {
    ptr: *mut u8,
    len: usize,
}

impl Alias {
    fn of(addr: usize, len: usize) -> Result<Option<Self>> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(_), Some(off)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (start, end) = (usize::from_str_radix(a, 16)?, usize::from_str_radix(b, 16)?);
            if !(start <= addr && addr + len <= end) {
                continue;
            }
            let off = u64::from_str_radix(off, 16)? + (addr - start) as u64;
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/self/map_files/{range}"))
            {
                Ok(file) => file,
                Err(e) => {
                    eprintln!("SKIPPED: /proc/self/map_files/{range}: {e} (needs root)");
                    return Ok(None);
                }
            };
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    off as libc::off_t,
                )
            };
            ensure!(
                p != libc::MAP_FAILED,
                "mmap the alias: {}",
                std::io::Error::last_os_error()
            );
            return Ok(Some(Self { ptr: p.cast(), len }));
        }
        bail!("{addr:#x} is in no mapping")
    }

    fn write(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) };
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

mod scenarios {
    use super::*;

    /// Zero length, an unaligned address or length, a range that is not all managed memory,
    /// a read-only file mapping and pages past the end of a file are refused with a typed
    /// error, and nothing is done: the data stays on the device, and nothing is pinned after.
    pub fn pin_refuses_bad_input_before_doing_anything() -> Result<()> {
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 8 * MIB)
            .build()?;
        let dev = hm.device(0).expect("one device");
        let len = 4 * PAGE_SIZE;
        let buf = hm.alloc(len)?;
        let data = content(7, 0, len);
        dev.write(buf.addr(), &data)?;
        let on_device = locations(&dev, buf.addr(), len)?;
        ensure!(
            on_device.iter().all(|&l| l == Location::PrivateLocal),
            "the data is not on the device to begin with: {on_device:?}"
        );
        let a = buf.addr();
        for (what, r, want) in [
            ("zero length", hm.pin(a, 0), libc::EINVAL),
            ("unaligned address", hm.pin(a + 1, PAGE_SIZE), libc::EINVAL),
            ("unaligned length", hm.pin(a, PAGE_SIZE + 1), libc::EINVAL),
            (
                "wrapping",
                hm.pin(usize::MAX & !(PAGE_SIZE - 1), 2 * PAGE_SIZE),
                libc::EINVAL,
            ),
            ("past the buffer", hm.pin(a, len + PAGE_SIZE), libc::EFAULT),
            (
                "not managed",
                hm.pin(a + len + 64 * MIB, PAGE_SIZE),
                libc::EFAULT,
            ),
        ] {
            match r {
                Err(e) if e.errno() == want => {}
                Err(e) => bail!("pin of {what}: {e:?}, expected errno {want}"),
                Ok(_) => bail!("pin of {what} succeeded"),
            }
        }
        // A read-only file mapping: EPERM. Pages past the end of the file: EFAULT.
        let dir = TempDir::new("pin_bad")?;
        let path = dir.path("data");
        create_file(&path, &content(0, 0, PAGE_SIZE + 100))?;
        let ro = hm.map_file(&path, 0, 2 * PAGE_SIZE, FileMode::ReadOnly)?;
        match hm.pin(ro.addr(), PAGE_SIZE) {
            Err(Error::Perm) => {}
            r => bail!("pin of a read-only file mapping: {r:?}"),
        }
        let rw = hm.map_file_with(&path, 0, 3 * PAGE_SIZE, unleased(FileMode::Shared))?;
        match hm.pin(rw.addr(), 3 * PAGE_SIZE) {
            Err(Error::Fault(_)) => {}
            r => bail!("pin of pages past the end of the file: {r:?}"),
        }
        ensure!(
            locations(&dev, buf.addr(), len)? == on_device,
            "a refused pin moved the data"
        );
        // Nothing stayed pinned: the buffer moves, and its data is intact.
        dev.migrate_to_system(a, len)?;
        dev.migrate_to_device(a, len)?;
        assert_same("the buffer", &dev.read(a, len)?, &data);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }

    /// An O_DIRECT `pread` into a pinned buffer whose data was on the device: the pin brings
    /// it to system memory, the read lands there, and the device reads it there (remotely: no
    /// device memory used). While pinned, `migrate_to_device`, `discard` and preferred-location
    /// advice fail with `Busy`, and filling the device twice over (eviction) leaves the range
    /// alone. After the pin is dropped, the buffer migrates again.
    pub fn o_direct_read_into_a_pinned_buffer() -> Result<()> {
        let dir = TempDir::new("pin_odirect")?;
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let file_data = content(3, 0, len);
        create_file(&path, &file_data)?;
        let Some(direct) = open_direct(&path)? else {
            return Ok(());
        };
        let cap = 2 * MIB;
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, cap)
            .build()?;
        let dev = hm.device(0).expect("one device");
        let buf = hm.alloc(len)?;
        let a = buf.addr();
        dev.write(a, &content(9, 0, len))?;

        let pin = hm.pin(a, len)?;
        let at = locations(&dev, a, len)?;
        ensure!(
            at.iter().all(|&l| l == Location::System),
            "pinned pages are not in system memory: {at:?}"
        );
        pread_into(&direct, a, len, 0)?;
        assert_same(
            "device read of the pinned buffer",
            &dev.read(a, len)?,
            &file_data,
        );
        let at = locations(&dev, a, len)?;
        ensure!(
            at.iter().all(|&l| l == Location::System) && dev.used_pages() == 0,
            "a device read took pinned pages: {at:?}, {} device pages used",
            dev.used_pages()
        );
        match dev.migrate_to_device(a, len) {
            Err(Error::Busy(_)) => {}
            r => bail!("migrate_to_device of a pinned range: {r:?}"),
        }
        match hm.discard(a, PAGE_SIZE) {
            Err(Error::Busy(_)) => {}
            r => bail!("discard of a pinned range: {r:?}"),
        }
        match hm.advise(
            a,
            len,
            Advice::PreferredLocation(Some(Mem::Device(dev.id()))),
        ) {
            Err(Error::Busy(_)) => {}
            r => bail!("preferred-location advice on a pinned range: {r:?}"),
        }
        // Device pressure: twice its memory written by the device, evicting as it goes.
        let other = hm.alloc(2 * cap)?;
        dev.write(other.addr(), &content(5, 0, 2 * cap))?;
        let at = locations(&dev, a, len)?;
        ensure!(
            at.iter().all(|&l| l == Location::System),
            "pinned pages moved under device pressure: {at:?}"
        );
        let cpu = unsafe { std::slice::from_raw_parts(a as *const u8, len) };
        assert_same("CPU read of the pinned buffer", cpu, &file_data);
        drop(pin);

        dev.migrate_to_device(a, len)?;
        let at = locations(&dev, a, len)?;
        ensure!(
            at.iter().all(|&l| l == Location::PrivateLocal),
            "after the pin, migrate_to_device left {at:?}"
        );
        assert_same("the buffer after the pin", &dev.read(a, len)?, &file_data);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }

    /// A pinned range of a Shared file mapping: an O_DIRECT read into it reaches the file at
    /// the next flush, and so does a DMA write made after a flush cleaned the pages (through
    /// the memfd alias: no fault), by the flush after it, and one made just before the pin is
    /// dropped, by the flush after the drop. A device write to an unpinned page of the mapping
    /// is written back alongside. Without a lease, so that the test's own reads of the file
    /// break nothing.
    pub fn dma_into_a_pinned_file_mapping_reaches_the_file() -> Result<()> {
        let dir = TempDir::new("pin_file")?;
        let src = dir.path("src");
        let path = dir.path("data");
        let len = 8 * PAGE_SIZE;
        let theirs = content(4, 0, len);
        create_file(&src, &theirs)?;
        let mut want = content(0, 0, len);
        create_file(&path, &want)?;
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 8 * MIB)
            .build()?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        let a = m.addr();
        let pinned = 4 * PAGE_SIZE;
        let pin = hm.pin(a, pinned)?;

        if let Some(direct) = open_direct(&src)? {
            pread_into(&direct, a, 2 * PAGE_SIZE, 0)?;
            want[..2 * PAGE_SIZE].copy_from_slice(&theirs[..2 * PAGE_SIZE]);
        }
        dev.write(a + 6 * PAGE_SIZE, &content(6, 6, PAGE_SIZE))?;
        want[6 * PAGE_SIZE..7 * PAGE_SIZE].copy_from_slice(&content(6, 6, PAGE_SIZE));
        m.flush()?;
        assert_same("the file after the first flush", &pread_file(&path)?, &want);

        let Some(alias) = Alias::of(a, pinned)? else {
            return Ok(());
        };
        // DMA after a flush cleaned the pages: the next flush writes it.
        let dma = content(8, 2, PAGE_SIZE);
        alias.write(2 * PAGE_SIZE, &dma);
        want[2 * PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&dma);
        m.flush()?;
        assert_same("the file after DMA and a flush", &pread_file(&path)?, &want);
        // DMA just before the pin goes: the flush after the drop writes it.
        let dma = content(8, 3, PAGE_SIZE);
        alias.write(3 * PAGE_SIZE, &dma);
        want[3 * PAGE_SIZE..4 * PAGE_SIZE].copy_from_slice(&dma);
        drop(alias);
        drop(pin);
        m.flush()?;
        assert_same(
            "the file after the unpin and a flush",
            &pread_file(&path)?,
            &want,
        );
        m.close().map_err(|(_, e)| e).context("close")?;
        assert_same("the file after close", &pread_file(&path)?, &want);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }

    /// With the default lease: another process's open breaks it, and the break writes the DMA
    /// data of the pinned pages back (the opener reads it) but does not drop those pages, as it
    /// drops the others: DMA after the break lands in the page hetmem keeps, and the next flush
    /// writes it (fails without the runtime's discards leaving pinned pages alone: the page is
    /// dropped, and the later DMA write lands in memory hetmem no longer counts as the page).
    pub fn a_lease_break_keeps_pinned_pages() -> Result<()> {
        let dir = TempDir::new("pin_lease")?;
        let path = dir.path("data");
        let len = 4 * PAGE_SIZE;
        let mut want = content(0, 0, len);
        create_file(&path, &want)?;
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 8 * MIB)
            .build()?;
        let dev = hm.device(0).expect("one device");
        let m = hm.map_file(&path, 0, len, FileMode::Shared)?;
        ensure!(m.is_leased(), "no lease to begin with");
        let a = m.addr();
        let pin = hm.pin(a, 2 * PAGE_SIZE)?;
        let Some(alias) = Alias::of(a, 2 * PAGE_SIZE)? else {
            return Ok(());
        };
        let dma = content(8, 0, PAGE_SIZE);
        alias.write(0, &dma);
        want[..PAGE_SIZE].copy_from_slice(&dma);
        let breaks = hm.stats().lease_breaks;

        // Another process opens the file (the lease breaks) and reads it.
        let opener_path = path.clone();
        let expect = want.clone();
        let pid = fork_child(move || match std::fs::read(&opener_path) {
            Ok(got) if got == expect => 0,
            Ok(_) => 1,
            Err(_) => 2,
        });
        ensure!(
            exit_code(wait_child(pid)) == 0,
            "the opener did not read the DMA data"
        );
        ensure!(hm.stats().lease_breaks > breaks, "the open broke no lease");
        let at = locations(&dev, a, 2 * PAGE_SIZE)?;
        ensure!(
            at.iter().all(|&l| l == Location::System),
            "pinned pages were dropped by the lease break: {at:?}"
        );
        // DMA after the break: the next flush writes it.
        let dma = content(8, 1, PAGE_SIZE);
        alias.write(PAGE_SIZE, &dma);
        want[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&dma);
        m.flush()?;
        drop(alias);
        drop(pin);
        drop(m);
        assert_same("the file", &pread_file(&path)?, &want);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }
}
