//! Bounded lease breaks and file I/O that blocks (`docs/file-contract.md` §6, "Bounded
//! breaks", and §12): file I/O runs without the block's engine lock, a break holds new
//! faults until its release, a break that runs out of `lease-break-time` leaves the pages
//! it did not write back conflicted instead of writing them later, and dirty data is kept
//! small enough for a break to write it back in time.
//!
//! Shared with the other `tests/file_*.rs`: `common/file.rs` (page stamps, no sleeping) and
//! `common/fs.rs`. Each scenario runs under a watchdog (`HETMEM_TEST_TIMEOUT_S`, default
//! 30 s), one at a time (`common::serial_tests!`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::file::{content, create_file, page_is, pread_file, stamp_page, unleased, MIB};
use common::fs::{Mount, TempDir};
use hetmem::{FileMode, Hetmem, PAGE_SIZE};

common::serial_tests!(
    common::file::DEFAULT_TIMEOUT_S;
    a_blocked_writeback_leaves_the_block_free,
);

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A frozen file system (`fsfreeze -f`): every write to it, through `pwrite` or a store to a
/// shared mapping, waits until the thaw, which the drop does.
struct Frozen<'a>(&'a Path);

impl<'a> Frozen<'a> {
    fn new(dir: &'a Path) -> Result<Option<Self>> {
        let out = std::process::Command::new("fsfreeze")
            .arg("-f")
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Frozen(dir))),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: fsfreeze -f: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                Ok(None)
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run fsfreeze ({e})");
                Ok(None)
            }
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(self.0)
            .status();
    }
}

/// The scheduler state of thread `tid` of this process (`R`, `S`, `D`, ...).
fn thread_state(tid: i32) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    // "tid (comm) S ...": the state follows the last ')'.
    let after = stat.rsplit_once(')').context("stat")?.1;
    after.trim_start().chars().next().context("state")
}

/// Waits (polling the thread's state, with a deadline) until thread `tid` sleeps
/// uninterruptibly: blocked in the kernel, in a frozen file system's write path here.
fn wait_blocked(tid: i32, limit: Duration) -> Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if thread_state(tid)? == 'D' {
            return Ok(());
        }
        std::thread::yield_now();
    }
    bail!("thread {tid} never blocked in the kernel")
}

mod scenarios {
    use super::*;

    /// A writeback that cannot finish (the file system is frozen) holds neither the block's
    /// other pages nor the fault service: a CPU fault on another page of the same block is
    /// served while the `flush` is blocked, and the flush completes after the thaw. With the
    /// I/O under the engine lock, the fault waited for the thaw.
    pub fn a_blocked_writeback_leaves_the_block_free() -> Result<()> {
        if !is_root() {
            eprintln!("SKIPPED: mounting a file system to freeze needs root");
            return Ok(());
        }
        let dir = TempDir::new("blocked_writeback")?;
        let target = dir.path("ext4");
        std::fs::create_dir(&target)?;
        let Some(_mount) = Mount::image(&dir.path("ext4.img"), &target, "ext4", 64)? else {
            return Ok(());
        };
        let path = target.join("data");
        let len = 4 * MIB;
        let old = content(0, 0, len);
        create_file(&path, &old)?;
        let hm = Hetmem::builder()
            .service_threads(1)
            .fault_around_pages(1)
            .build()?;
        let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
        stamp_page(&mut m.as_mut_slice().expect("writable")[..PAGE_SIZE], 1, 0);
        let Some(frozen) = Frozen::new(&target)? else {
            return Ok(());
        };
        let m = &m;
        let (tid_tx, tid_rx) = mpsc::channel();
        let (read_tx, read_rx) = mpsc::channel();
        std::thread::scope(|s| -> Result<()> {
            let flusher = s.spawn(move || {
                let _ = tid_tx.send(unsafe { libc::gettid() });
                m.flush()
            });
            let tid = tid_rx.recv()?;
            wait_blocked(tid, Duration::from_secs(10)).context("the flush")?;
            ensure!(!flusher.is_finished(), "the flush returned on a frozen fs");
            // Page 7 of the same block, never touched: a CPU fault the one service thread
            // serves by reading the file (reads work on a frozen file system).
            s.spawn(move || {
                let got = page_is(&m.as_slice()[7 * PAGE_SIZE..8 * PAGE_SIZE], 0, 7);
                let _ = read_tx.send(got);
            });
            // A failure detector, not synchronization: the fault needs nothing the frozen
            // file system holds, so it is served at once; 10 s means it waits for the thaw.
            let read = read_rx.recv_timeout(Duration::from_secs(10));
            let still_blocked = thread_state(tid)? == 'D';
            drop(frozen);
            ensure!(
                read.is_ok(),
                "a fault on another page of the block waited for the blocked writeback"
            );
            ensure!(read == Ok(true), "page 7 read wrong data");
            ensure!(
                still_blocked,
                "the flush was no longer blocked when the fault returned"
            );
            flusher
                .join()
                .expect("flusher")
                .context("flush after the thaw")?;
            Ok(())
        })?;
        let file = pread_file(&path)?;
        ensure!(page_is(&file[..PAGE_SIZE], 1, 0), "page 0 not written back");
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }
}
