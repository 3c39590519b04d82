//! Crash consistency of file mappings as sets of states (`docs/file-contract.md` §5): after a
//! process death, each page of the file holds exactly what was last handed to the kernel; after
//! a power loss, each page holds its value at the last `sync()` that returned `Ok`, or one
//! handed over after it. (A kill during a flush, buffered and O_DIRECT:
//! `tests/file_processes.rs::crash_during_flush_leaves_old_or_new_pages`.)
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (the conventions: page stamps,
//! other processes, no sleeping) and `common/fs.rs`. Each scenario runs under a watchdog
//! (`HETMEM_TEST_TIMEOUT_S`, default 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::file::{content, create_file, page_is, pread_file, stamp_page, wait_child, MIB};
use common::fs::{Mount, TempDir};
use common::process::{describe_status, fork_child, pipe};
use hetmem::{DeviceKind, FileMapping, FileMode, FileOptions, Hetmem, PAGE_SIZE};

common::serial_tests!(
    common::file::DEFAULT_TIMEOUT_S;
    process_death_keeps_what_was_handed_over,
    power_loss_keeps_what_sync_made_durable,
);

/// Pages of the test file (one 2 MiB block would do; two make the flushed range cross blocks).
const PAGES: usize = 1024;
/// The file's original contents.
const ORIGINAL: u32 = 0;
/// Written to every page, then `sync()`.
const SYNCED: u32 = 1;
/// Written after the sync to `WRITTEN`, half by the CPU, half by the device.
const AFTER: u32 = 2;
/// Written after the `flush_range`, to pages it had handed over: never handed over itself.
const LATER: u32 = 3;
/// Pages written with `AFTER`: CPU `[0, 256)`, device `[256, 768)`.
const WRITTEN: std::ops::Range<usize> = 0..768;
const CPU_WRITTEN: std::ops::Range<usize> = 0..256;
/// Pages handed to the kernel by `flush_range` after the `AFTER` writes (crosses from CPU- to
/// device-written pages, and from block 0 to block 1).
const FLUSHED: std::ops::Range<usize> = 128..640;
/// Pages written with `LATER` after the `flush_range` (CPU and device).
const REWRITTEN: std::ops::Range<usize> = 200..300;
/// The configuration in which another process opens the file after the script: the lease
/// break hands every dirty page over.
const BROKEN: &str = "Shared, default lease, broken by another process's open";
/// Written after that break (CPU `[0, 64)`, device `[300, 364)`): never handed over.
const BROKEN_LATER: u32 = 4;

/// The script every scenario runs on a Shared mapping, up to the point of the crash: the
/// sync point, writes after it, a `flush_range` of part of them, and writes after that.
fn writes_and_hand_overs(hm: &Hetmem, m: &mut FileMapping) -> Result<(), i32> {
    stamp_range(m, 0..PAGES, SYNCED)?;
    m.sync().map_err(|_| 23)?;
    stamp_range(m, CPU_WRITTEN, AFTER)?;
    device_range(hm, m, CPU_WRITTEN.end..WRITTEN.end, AFTER)?;
    m.flush_range(FLUSHED.start * PAGE_SIZE, FLUSHED.len() * PAGE_SIZE)
        .map_err(|_| 24)?;
    stamp_range(m, REWRITTEN.start..CPU_WRITTEN.end, LATER)?;
    device_range(hm, m, CPU_WRITTEN.end..REWRITTEN.end, LATER)?;
    Ok(())
}

/// CPU writes of `tag`'s contents to `pages` of the mapping.
fn stamp_range(m: &mut FileMapping, pages: std::ops::Range<usize>, tag: u32) -> Result<(), i32> {
    let view = m.as_mut_slice().ok_or(21)?;
    for p in pages {
        stamp_page(&mut view[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], tag, p);
    }
    Ok(())
}

/// Device writes of `tag`'s contents to `pages` of the mapping.
fn device_range(
    hm: &Hetmem,
    m: &FileMapping,
    pages: std::ops::Range<usize>,
    tag: u32,
) -> Result<(), i32> {
    let dev = hm.device(0).ok_or(20)?;
    let bytes = content(tag, pages.start, pages.len() * PAGE_SIZE);
    dev.write(m.addr() + pages.start * PAGE_SIZE, &bytes)
        .map_err(|_| 22)
}

/// The values page `p` may hold after a crash of kind `power_loss` (else a process death), by
/// §5's sets, for the script above on a Shared mapping.
fn allowed(p: usize, power_loss: bool) -> Vec<u32> {
    if FLUSHED.contains(&p) {
        // Handed over after the sync: the kernel keeps it through the process's death; a
        // power loss may lose it (no sync since), back to the synced value.
        if power_loss {
            vec![SYNCED, AFTER]
        } else {
            vec![AFTER]
        }
    } else {
        // Written after the sync but never handed over (or not written at all): the synced
        // value, whatever the crash.
        vec![SYNCED]
    }
}

/// Checks every page of `file` against `allowed(p)`: whole (right tag, right place, not torn)
/// and in its set. Returns how many pages hold each tag.
fn check_pages(
    what: &str,
    file: &[u8],
    allowed: impl Fn(usize) -> Vec<u32>,
) -> Result<std::collections::BTreeMap<u32, usize>> {
    ensure!(
        file.len() == PAGES * PAGE_SIZE,
        "{what}: the file is {} bytes, not {}",
        file.len(),
        PAGES * PAGE_SIZE
    );
    let mut per_tag = std::collections::BTreeMap::<u32, usize>::new();
    let mut bad = Vec::new();
    for (p, page) in file.chunks_exact(PAGE_SIZE).enumerate() {
        let tag = u32::from_ne_bytes([page[0], page[1], page[2], page[3]]);
        let set = allowed(p);
        if !page_is(page, tag, p) {
            bad.push(format!(
                "page {p}: torn or misplaced (starts with tag {tag})"
            ));
        } else if !set.contains(&tag) {
            bad.push(format!("page {p}: tag {tag}, allowed {set:?}"));
        }
        *per_tag.entry(tag).or_default() += 1;
    }
    if !bad.is_empty() {
        bail!(
            "{what}: {} pages outside their sets (pages per tag {per_tag:?}); first: {}",
            bad.len(),
            bad[..bad.len().min(8)].join("; ")
        );
    }
    Ok(per_tag)
}

mod scenarios {
    use super::*;

    /// A child maps the file, runs the script (sync, writes, `flush_range` of part of them,
    /// writes again) and kills itself with SIGKILL. Each page of the file must then hold
    /// exactly the value last handed to the kernel: the flushed pages their post-sync value
    /// (not the later writes to some of them), every other page the synced value. For Shared
    /// mappings with the lease, without it, and with O_DIRECT; a Private mapping (written,
    /// flushed and synced) leaves the file as it was.
    pub fn process_death_keeps_what_was_handed_over() -> Result<()> {
        const CODES: &str = "10: build, 11: map_file, 12: not direct, 13: not leased, \
                             2x: the script (20 device, 21 view, 22 device write, 23 sync, \
                             24 flush_range), 30: private flush, 31: private sync, 32: raise, \
                             33: pipes, 34: writes after the break";
        let dir = TempDir::new("process_death_keeps_what_was_handed_over")?;
        let path = dir.path("data");
        let configs = [
            ("Shared, default lease", FileOptions::new(FileMode::Shared)),
            (
                "Shared, no lease",
                FileOptions::new(FileMode::Shared).lease(false),
            ),
            (
                "Shared, O_DIRECT",
                FileOptions::new(FileMode::Shared).direct(true),
            ),
            (BROKEN, FileOptions::new(FileMode::Shared)),
            ("Private", FileOptions::new(FileMode::Private)),
        ];
        for (what, opts) in configs {
            // For BROKEN: the child says when the script is done, the parent opens the file
            // (its open waits for the lease break) and says so, the child writes again.
            let (mut done_rd, done_wr) = pipe();
            let (opened_rd, mut opened_wr) = pipe();
            let (done_fd, opened_fd) = (done_wr.as_raw_fd(), opened_rd.as_raw_fd());
            create_file(&path, &content(ORIGINAL, 0, PAGES * PAGE_SIZE))?;
            let direct_wanted = what.contains("O_DIRECT");
            let shared = what.starts_with("Shared");
            let child_path = path.clone();
            let pid = fork_child(move || {
                // A fresh context of the child's own; the device holds every page.
                let Ok(hm) = Hetmem::builder()
                    .sim_device(DeviceKind::Private, 8 * MIB)
                    .build()
                else {
                    return 10;
                };
                let Ok(mut m) = hm.map_file_with(&child_path, 0, PAGES * PAGE_SIZE, opts) else {
                    return 11;
                };
                if direct_wanted && !m.is_direct() {
                    return 12;
                }
                if what.contains("default lease") && !m.is_leased() {
                    return 13;
                }
                let r = if shared {
                    writes_and_hand_overs(&hm, &mut m)
                } else {
                    // Private: written, flushed and synced, and still nothing reaches the file.
                    let view = m.as_mut_slice().expect("a Private mapping is writable");
                    for p in 0..PAGES {
                        stamp_page(&mut view[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], SYNCED, p);
                    }
                    m.flush()
                        .map_err(|_| 30)
                        .and_then(|()| m.sync().map_err(|_| 31))
                };
                if let Err(code) = r {
                    return code;
                }
                if what == BROKEN {
                    let mut b = [0u8; 1];
                    if unsafe { libc::write(done_fd, [1u8].as_ptr().cast(), 1) } != 1
                        || unsafe { libc::read(opened_fd, b.as_mut_ptr().cast(), 1) } != 1
                    {
                        return 33;
                    }
                    // After the break, with the parent holding the file open (no lease to
                    // take back): these are never handed over.
                    if stamp_range(&mut m, 0..64, BROKEN_LATER).is_err()
                        || device_range(&hm, &m, 300..364, BROKEN_LATER).is_err()
                    {
                        return 34;
                    }
                }
                // The crash: nothing of hetmem runs after this (no drop, no flush).
                unsafe { libc::raise(libc::SIGKILL) };
                32
            });
            drop((done_wr, opened_rd));
            let mut opener = None;
            if what == BROKEN {
                let mut b = [0u8; 1];
                if done_rd.read_exact(&mut b).is_ok() {
                    // Returns once the child's lease break has handed every dirty page over.
                    opener = Some(File::open(&path)?);
                    opened_wr.write_all(&[1])?;
                }
            }
            let status = wait_child(pid);
            drop(opener);
            if direct_wanted && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 12 {
                eprintln!("SKIPPED: {what}: no O_DIRECT under {}", dir.0.display());
                continue;
            }
            ensure!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
                "{what}: the child did not reach its SIGKILL: {} ({CODES})",
                describe_status(status)
            );
            let file = pread_file(&path)?;
            let per_tag = if what == BROKEN {
                // The break handed over every page as it was then: the later writes too.
                check_pages(what, &file, |p| {
                    if REWRITTEN.contains(&p) {
                        vec![LATER]
                    } else if WRITTEN.contains(&p) {
                        vec![AFTER]
                    } else {
                        vec![SYNCED]
                    }
                })?
            } else if shared {
                check_pages(what, &file, |p| allowed(p, false))?
            } else {
                check_pages(what, &file, |_| vec![ORIGINAL])?
            };
            eprintln!("{what}: pages per tag after the kill: {per_tag:?}");
        }
        Ok(())
    }

    /// Power loss, emulated: the file system is an image on a loop device, and the "disk" at
    /// the instant of the power loss is a copy of that image taken while it is mounted, the
    /// mapping alive, after the script (sync, writes, `flush_range`, writes). The copy is
    /// mounted (journal or log replayed, as after a reboot) and every page must be in its
    /// set: the synced value everywhere, or for the pages handed over after the sync, that
    /// value too. On ext4 and xfs. No device-mapper target (dm-flakey, dm-log-writes) is
    /// used where the kernel has none; see §5 for the procedure with one.
    pub fn power_loss_keeps_what_sync_made_durable() -> Result<()> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: power_loss_keeps_what_sync_made_durable needs root to mount");
            return Ok(());
        }
        // The kernel's device-mapper registers a misc device; /dev/mapper/control alone can
        // be a node dmsetup made without a driver behind it.
        let dm = std::fs::read_to_string("/proc/misc")
            .is_ok_and(|misc| misc.lines().any(|l| l.ends_with(" device-mapper")));
        eprintln!(
            "{}: power loss emulated by a copy of the loop image (docs/file-contract.md §5 \
             gives the dm-log-writes procedure, not automated)",
            if dm {
                "device-mapper present"
            } else {
                "SKIPPED dm-flakey/dm-log-writes: no device-mapper in this kernel (/proc/misc)"
            }
        );
        let dir = TempDir::new("power_loss_keeps_what_sync_made_durable")?;
        let mut tested = Vec::new();
        for fs in ["ext4", "xfs"] {
            let target = dir.path(fs);
            let after = dir.path(&format!("{fs}-after"));
            std::fs::create_dir(&target)?;
            std::fs::create_dir(&after)?;
            let image = dir.path(&format!("{fs}.img"));
            // ext4's journal commits every 5 s by default: 300 s keeps it from writing while
            // the image is copied (the copy is checked for that below anyway).
            let opts = if fs == "ext4" { "commit=300" } else { "" };
            let Some(mount) = Mount::image_with(&image, &target, fs, 300, opts)? else {
                continue;
            };
            let copy = dir.path(&format!("{fs}-crashed.img"));
            let per_tag = power_loss_on(&target.join("data"), &image, &copy, fs)
                .with_context(|| format!("on {fs}"))?;
            drop(mount);
            let mounted = if fs == "xfs" { "nouuid" } else { "" };
            let Some(m2) = Mount::existing_image(&copy, &after, fs, mounted)? else {
                bail!("{fs}: the image copied at the power loss does not mount");
            };
            let file = pread_file(&after.join("data"))
                .with_context(|| format!("{fs}: the file after the power loss"))?;
            let found = check_pages(&format!("{fs}, after the power loss"), &file, |p| {
                allowed(p, true)
            })?;
            drop(m2);
            eprintln!(
                "{fs}: pages per tag in the live file {per_tag:?}, after the power loss \
                 {found:?}"
            );
            tested.push(fs);
        }
        eprintln!("file systems tested: {tested:?}");
        Ok(())
    }

    /// Runs the script on a mapping of `path` (on the file system of `image`), then copies
    /// `image` to `copy`: the disk at the power loss. Returns the live file's pages per tag.
    fn power_loss_on(
        path: &Path,
        image: &Path,
        copy: &Path,
        fs: &str,
    ) -> Result<std::collections::BTreeMap<u32, usize>> {
        // The file and its directory entry are durable before the mapping is made.
        create_file(path, &content(ORIGINAL, 0, PAGES * PAGE_SIZE))?;
        File::open(path)?.sync_all()?;
        File::open(path.parent().context("a file in a directory")?)?.sync_all()?;

        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 8 * MIB)
            .build()?;
        let mut m = hm.map_file(path, 0, PAGES * PAGE_SIZE, FileMode::Shared)?;
        if let Err(code) = writes_and_hand_overs(&hm, &mut m) {
            bail!("{fs}: the script failed with code {code}");
        }
        // The power loss: the disk as it is now. The copy is read again against the image: a
        // difference means something wrote a part of the disk already copied, and the copy
        // could be a state no power loss gives (a later write copied, an earlier one not).
        // Nothing should write it now: the data after the sync is dirty in the page cache,
        // which the kernel writes after 30 s (dirty_expire_centisecs), and ext4 commits its
        // journal every 300 s (mounted so) unless asked.
        let mut same = false;
        for _ in 0..5 {
            std::fs::copy(image, copy)?;
            if files_equal(image, copy)? {
                same = true;
                break;
            }
        }
        ensure!(same, "{fs}: the disk kept changing while it was copied");
        // The live file (this process's own open breaks the lease: the script's later writes
        // are then handed over too, which the copy predates).
        let live = pread_file(path)?;
        let per_tag = check_pages(&format!("{fs}, live"), &live, |p| {
            if REWRITTEN.contains(&p) {
                vec![LATER]
            } else if WRITTEN.contains(&p) {
                vec![AFTER]
            } else {
                vec![SYNCED]
            }
        })?;
        drop(m);
        Ok(per_tag)
    }

    /// Whether two files have the same bytes.
    fn files_equal(a: &Path, b: &Path) -> Result<bool> {
        let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
        if fa.metadata()?.len() != fb.metadata()?.len() {
            return Ok(false);
        }
        let (mut ba, mut bb) = (vec![0u8; MIB], vec![0u8; MIB]);
        loop {
            let n = fa.read(&mut ba)?;
            if n == 0 {
                return Ok(true);
            }
            fb.read_exact(&mut bb[..n])?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
        }
    }
}
