//! Shared by the file-mapping tests (`tests/file_*.rs`): a context and options, page contents,
//! files written and read around hetmem, other processes, and the page cache and file leases as
//! the kernel shows them.
//!
//! The tests run on real files in a fresh temporary directory (`fs::TempDir`). Other processes
//! (forked children, `truncate(1)`) stand for "another process": a forked child never uses the
//! parent's `Hetmem` (the child of `crash_during_flush_leaves_old_or_new_pages` builds a fresh
//! one of its own). Nothing sleeps to synchronize: children report through pipes and exit codes.
//!
//! File contents are stamped per page: word 0 is a tag (0 for the file's original contents, a
//! generation for later writes), word 1 the page index, and the rest a mix of both with the word
//! index. A page is therefore recognisable as a whole: right tag, right place, not torn.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use hetmem::{DeviceKind, FileMode, FileOptions, Hetmem, PAGE_SIZE};
use libc::c_int;

use super::process::last_os_error;

pub const MIB: usize = 1 << 20;
/// How long one test may run before the watchdog calls it hung (`HETMEM_TEST_TIMEOUT_S`).
pub const DEFAULT_TIMEOUT_S: u64 = 30;
/// How long an access that should end at once (a read, or SIGBUS) may take.
pub const QUICK: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// Options without a lease, for tests that look at the file through another descriptor before
/// a flush: with the default lease, that open would flush first (the lease break).
pub fn unleased(mode: FileMode) -> FileOptions {
    FileOptions::new(mode).lease(false)
}

pub fn context(kind: DeviceKind, capacity: usize) -> Result<Hetmem> {
    Ok(Hetmem::builder().sim_device(kind, capacity).build()?)
}

// ---------------------------------------------------------------------------------------------
// Page contents
// ---------------------------------------------------------------------------------------------

/// Word `j` of page `page` with tag `tag`.
pub fn word_of(tag: u32, page: usize, j: usize) -> u32 {
    match j {
        0 => tag,
        1 => page as u32,
        _ => (tag.wrapping_mul(0x9e37_79b1) ^ (page as u32).wrapping_mul(0x85eb_ca77))
            .wrapping_add((j as u32).wrapping_mul(0xc2b2_ae3d))
            .rotate_left(j as u32 % 31),
    }
}

/// Writes page `page`'s contents with `tag` into `out` (one page). Allocates nothing.
pub fn stamp_page(out: &mut [u8], tag: u32, page: usize) {
    for (j, w) in out.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&word_of(tag, page, j).to_ne_bytes());
    }
}

/// Whether `page_bytes` is exactly page `page` with `tag`. Allocates nothing.
pub fn page_is(page_bytes: &[u8], tag: u32, page: usize) -> bool {
    page_bytes
        .chunks_exact(4)
        .enumerate()
        .all(|(j, w)| w == word_of(tag, page, j).to_ne_bytes())
}

/// `len` bytes of pages stamped with `tag`, the first being page `first_page` of the file.
pub fn content(tag: u32, first_page: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, p) in v.chunks_mut(PAGE_SIZE).enumerate() {
        let mut page = [0u8; PAGE_SIZE];
        stamp_page(&mut page, tag, first_page + i);
        p.copy_from_slice(&page[..p.len()]);
    }
    v
}

/// Creates `path` with `data`.
pub fn create_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// The whole file, read with `pread` on a descriptor of its own (not hetmem's).
pub fn pread_file(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len() as usize;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, 0)?;
    Ok(v)
}

/// Asserts `got == want`, naming the first differing page and its tag.
#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let page = i / PAGE_SIZE;
        let p = page * PAGE_SIZE;
        // A last page shorter than a word has no tag.
        let tag = |b: &[u8]| match b.get(p..p + 4) {
            Some(w) => u32::from_ne_bytes([w[0], w[1], w[2], w[3]]).to_string(),
            None => "(none: a short page)".to_string(),
        };
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
pub fn with_pages(want: &[u8], tag: u32, pages: &[usize]) -> Vec<u8> {
    let mut v = want.to_vec();
    for &p in pages {
        stamp_page(&mut v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], tag, p);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Processes (and `common::process`'s)
// ---------------------------------------------------------------------------------------------

/// `waitpid` with the test's deadline: a child that hangs is killed and the test fails.
#[track_caller]
pub fn wait_child(pid: libc::pid_t) -> c_int {
    let limit = super::test_timeout(DEFAULT_TIMEOUT_S) / 2;
    match super::wait_within(pid, limit) {
        Some(status) => status,
        None => panic!("child {pid} still running after {limit:?}: hung"),
    }
}

/// What a reader found, as a sentence.
pub fn read_outcome(reading: super::Reading) -> String {
    match reading {
        super::Reading::Blocked => {
            format!("was still blocked in the read after {QUICK:?} (killed)")
        }
        r => r.to_string(),
    }
}

/// A CPU read in a `clone(CLONE_VM)` reader, within `QUICK`.
pub fn clone_vm_read(addr: usize, want: &[u8]) -> super::Reading {
    super::read_in_clone(addr, want, QUICK)
}

pub fn is_sigbus(reading: super::Reading) -> bool {
    reading == super::Reading::Signal(libc::SIGBUS)
}

pub fn read_wanted(reading: super::Reading) -> bool {
    reading == super::Reading::Wanted
}

// ---------------------------------------------------------------------------------------------
// The page cache and file leases, as the kernel shows them
// ---------------------------------------------------------------------------------------------

/// Pages of the file at `path` resident in the page cache (mincore on a fresh mapping).
pub fn cached_pages(path: &Path, len: usize) -> Result<usize> {
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
pub fn drop_cache(path: &Path) -> Result<()> {
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
pub fn with_lease_thread_held<T>(
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
pub fn fd_of(path: &Path) -> Result<i32> {
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
pub fn write_lease_active(path: &Path) -> Result<bool> {
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
pub fn wait_lease_breaking(path: &Path) -> Result<()> {
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

/// The memfds hetmem made (`/memfd:hetmem-N`) that this process maps now: one per region.
pub fn hetmem_memfds() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut seen: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|n| n.starts_with("/memfd:hetmem-"))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// `/proc/sys/fs/lease-break-time` set for a test, put back on drop (panics included). The old
/// value is also saved in a file until then, so a run killed before it could put it back is
/// undone by the next one.
pub struct BreakTime(String);

impl BreakTime {
    const KNOB: &'static str = "/proc/sys/fs/lease-break-time";
    const SAVED: &'static str = "/tmp/hetmem-lease-break-time.saved";

    /// Sets it to `secs`; `None` (the test is skipped, saying why) where it cannot be set.
    pub fn set(secs: u32) -> Result<Option<BreakTime>> {
        if let Ok(saved) = std::fs::read_to_string(Self::SAVED) {
            if std::fs::write(Self::KNOB, saved.trim()).is_ok() {
                let _ = std::fs::remove_file(Self::SAVED);
            }
        }
        let old = std::fs::read_to_string(Self::KNOB)?.trim().to_string();
        std::fs::write(Self::SAVED, &old)?;
        if let Err(e) = std::fs::write(Self::KNOB, secs.to_string()) {
            let _ = std::fs::remove_file(Self::SAVED);
            eprintln!("SKIPPED: cannot set {}: {e}", Self::KNOB);
            return Ok(None);
        }
        Ok(Some(BreakTime(old)))
    }
}

impl Drop for BreakTime {
    fn drop(&mut self) {
        if std::fs::write(Self::KNOB, &self.0).is_ok() {
            let _ = std::fs::remove_file(Self::SAVED);
        }
    }
}
