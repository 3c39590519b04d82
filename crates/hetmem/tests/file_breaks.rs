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
use common::file::{
    content, context, create_file, page_is, pread_file, stamp_page, unleased, wait_lease_breaking,
    BreakTime, MIB,
};
use common::fs::{Mount, TempDir};
use hetmem::{
    DeviceKind, Error, FileMapping, FileMode, FileOptions, Hetmem, Resolution, PAGE_SIZE,
};

common::serial_tests!(
    common::file::DEFAULT_TIMEOUT_S;
    a_blocked_writeback_leaves_the_block_free,
    faults_wait_at_the_break_gate,
    a_fault_parked_past_the_deadline_is_served,
    a_break_past_its_deadline_leaves_conflicts,
    a_drop_with_conflicts_keeps_the_mapping,
    dirty_data_stays_within_the_break_budget,
    the_budget_holds_beside_another_context,
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

/// The thread id of this process's `hetmem-lease` thread.
fn lease_thread() -> Result<i32> {
    for e in std::fs::read_dir("/proc/self/task")? {
        let e = e?;
        if std::fs::read_to_string(e.path().join("comm"))?.trim() == "hetmem-lease" {
            return Ok(e.file_name().to_string_lossy().parse()?);
        }
    }
    bail!("no hetmem-lease thread")
}

/// Waits (polling, with a deadline) until thread `tid` waits on a lock (a futex). The lease
/// thread waits for signals in `read(2)` otherwise: in a futex it is inside a break, past
/// the point where it closed the break gate, held by a device kernel's page-table lock.
fn wait_in_futex(tid: i32, limit: Duration) -> Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))?;
        if wchan.contains("futex") {
            return Ok(());
        }
        std::thread::yield_now();
    }
    bail!("thread {tid} never waited on a lock")
}

/// Waits until the break of `m` is over: the lease thread emits `lease_breaks` just before it
/// releases the lease and opens the gate, so a conflict resolved right after could meet the
/// break still past its deadline. Once the opener has closed the file, the first access after
/// the break takes the lease back (an `invalidate_range` of a clean page is one).
fn wait_break_over(m: &hetmem::FileMapping) -> Result<()> {
    wait_until("the lease taken back", Duration::from_secs(10), || {
        let _ = m.invalidate_range(700 * PAGE_SIZE, PAGE_SIZE);
        m.is_leased()
    })
}

/// A 4 MiB file of page stamps (tag 0) in a fresh directory, and a leased Shared mapping of it
/// in a context with a simulated private device; `None` (SKIPPED printed) where no lease can
/// be had. The directory comes first so that it outlives the mapping.
fn leased_file(name: &str) -> Result<Option<(TempDir, std::path::PathBuf, Hetmem, FileMapping)>> {
    let dir = TempDir::new(name)?;
    let path = dir.path("data");
    create_file(&path, &content(0, 0, 4 * MIB))?;
    let hm = context(DeviceKind::Private, 16 * MIB)?;
    let m = hm.map_file_with(&path, 0, 4 * MIB, FileOptions::new(FileMode::Shared))?;
    if !m.is_leased() {
        eprintln!("SKIPPED: no lease on {}", path.display());
        return Ok(None);
    }
    Ok(Some((dir, path, hm, m)))
}

/// Polls `f` until it holds, for at most `limit`.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + limit;
    while !f() {
        ensure!(Instant::now() < end, "{what}: not after {limit:?}");
        std::thread::yield_now();
    }
    Ok(())
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

    /// From a break's signal to its release, a new fault on the mapping waits: a CPU fault
    /// on a clean page of a block the break has not reached yet is parked
    /// (`stats().break_waits`) while a device kernel holds the break's flush, and is served
    /// once the break is over. Without the gate it was served at once, and cached the page
    /// again while the other process waited.
    pub fn faults_wait_at_the_break_gate() -> Result<()> {
        let Some((_dir, path, hm, m)) = leased_file("break_gate")? else {
            return Ok(());
        };
        let dev = hm.device(0).context("device 0")?;
        let lease = lease_thread()?;
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let (read_tx, read_rx) = mpsc::channel();
        let m = &m;
        std::thread::scope(|s| -> Result<()> {
            // A device kernel over page 0 (block 0), running until told: the break's flush
            // waits for it before it can write the page back.
            let kernel = s.spawn(|| {
                dev.kernel_write(m.addr(), PAGE_SIZE, |_, page| {
                    let _ = started_tx.send(());
                    let _ = go_rx.lock().map(|rx| rx.recv());
                    page[0] ^= 1;
                })
            });
            let r = (|| -> Result<()> {
                started_rx.recv_timeout(Duration::from_secs(10))?;
                let opener = s.spawn(|| std::fs::File::open(&path));
                wait_lease_breaking(&path)?;
                wait_in_futex(lease, Duration::from_secs(10)).context("the lease thread")?;
                // Page 7 of block 1: clean, never touched.
                let page = 512 + 7;
                s.spawn(move || {
                    let got = page_is(&m.as_slice()[page * PAGE_SIZE..][..PAGE_SIZE], 0, page);
                    let _ = read_tx.send(got);
                });
                wait_until("the fault parked", Duration::from_secs(10), || {
                    hm.stats().break_waits == 1
                })?;
                ensure!(
                    read_rx.try_recv() == Err(mpsc::TryRecvError::Empty),
                    "the fault was served during the break"
                );
                let _ = go_tx.send(());
                opener.join().expect("opener")?;
                let read = read_rx.recv_timeout(Duration::from_secs(10));
                ensure!(
                    read == Ok(true),
                    "the parked fault, after the break: {read:?}"
                );
                Ok(())
            })();
            let _ = go_tx.send(());
            kernel.join().expect("kernel")?;
            r
        })?;
        let file = pread_file(&path)?;
        ensure!(
            file[0] == content(0, 0, PAGE_SIZE)[0] ^ 1,
            "the device's write"
        );
        ensure!(hm.stats().break_waits == 1 && hm.stats().errors == 0);
        Ok(())
    }

    /// A break that runs past `lease-break-time` (1 s here) writes nothing after its
    /// deadline: the kernel has let the opener in, and the opener's writes stay. The pages
    /// the break did not write back are conflicted: kept dirty, reported by `flush` (ESTALE)
    /// and never written until resolved, for the file's copy (read again) or the mapping's
    /// (written by the next flush). Without the deadline, the break wrote them over the
    /// opener's data.
    pub fn a_break_past_its_deadline_leaves_conflicts() -> Result<()> {
        deadline_scenario(false)
    }

    /// As above, then the mapping is dropped with its conflicts unresolved: the drop cannot
    /// write them (that is what conflicted means), so it keeps the mapping, data and all, for
    /// `Hetmem::take_kept_file_mappings`, and counts an error (`stats().errors`), as for any
    /// writeback that fails at a drop. The file keeps the opener's data and its old data; the
    /// kept mapping still has its conflicts, and can resolve them.
    pub fn a_drop_with_conflicts_keeps_the_mapping() -> Result<()> {
        deadline_scenario(true)
    }

    fn deadline_scenario(drop_unresolved: bool) -> Result<()> {
        if !is_root() {
            eprintln!("SKIPPED: setting lease-break-time needs root");
            return Ok(());
        }
        let Some(_break_time) = BreakTime::set(1)? else {
            return Ok(());
        };
        let Some((_dir, path, hm, mut m)) = leased_file("break_deadline")? else {
            return Ok(());
        };
        let len = 4 * MIB;
        // Ours: pages 1..4 by the CPU, page 0 by a device kernel, page 600 by the CPU.
        {
            let w = m.as_mut_slice().expect("writable");
            for p in [1, 2, 3, 600] {
                stamp_page(&mut w[p * PAGE_SIZE..][..PAGE_SIZE], 1, p);
            }
        }
        let dev = hm.device(0).context("device 0")?;
        let lease = lease_thread()?;
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let mr = &m;
        std::thread::scope(|s| -> Result<()> {
            let kernel = s.spawn(|| {
                dev.kernel_write(mr.addr(), PAGE_SIZE, |_, page| {
                    let _ = started_tx.send(());
                    let _ = go_rx.lock().map(|rx| rx.recv());
                    stamp_page(page, 1, 0);
                })
            });
            let r = (|| -> Result<()> {
                started_rx.recv_timeout(Duration::from_secs(10))?;
                let opener = s.spawn(|| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                });
                wait_lease_breaking(&path)?;
                wait_in_futex(lease, Duration::from_secs(10)).context("the lease thread")?;
                // The break began before this: its deadline (0.9 s after it began) has
                // passed 1 s from now, whatever the kernel's timer did.
                let past_deadline = Instant::now() + Duration::from_secs(1);
                let theirs = opener.join().expect("opener")?;
                while Instant::now() < past_deadline {
                    std::thread::yield_now();
                }
                // The kernel let the opener in: it writes pages 2 and 600.
                use std::os::unix::fs::FileExt;
                for p in [2, 600] {
                    let mut page = vec![0; PAGE_SIZE];
                    stamp_page(&mut page, 2, p);
                    theirs.write_all_at(&page, (p * PAGE_SIZE) as u64)?;
                }
                let _ = go_tx.send(());
                wait_until("the break's end", Duration::from_secs(10), || {
                    hm.stats().lease_breaks == 1
                })?;
                Ok(())
            })();
            let _ = go_tx.send(());
            kernel.join().expect("kernel")?;
            r
        })?;
        wait_break_over(&m)?;
        let file = pread_file(&path)?;
        for (p, tag) in [(0, 0), (1, 0), (2, 2), (3, 0), (600, 2)] {
            ensure!(
                page_is(&file[p * PAGE_SIZE..][..PAGE_SIZE], tag, p),
                "file page {p}: not tag {tag} (a writeback after the deadline?)"
            );
        }
        let page = |p: usize| p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
        ensure!(
            m.conflicts() == vec![0..4 * PAGE_SIZE, page(600)],
            "conflicts: {:?}",
            m.conflicts()
        );
        match m.flush() {
            Err(e @ Error::Conflict { pages: 5 }) => ensure!(e.errno() == libc::ESTALE),
            r => bail!("flush with conflicts: {r:?}"),
        }
        ensure!(pread_file(&path)? == file, "a flush wrote conflicted pages");
        ensure!(
            page_is(&m.as_slice()[page(1)], 1, 1),
            "our page 1 was not kept"
        );
        if drop_unresolved {
            ensure!(hm.stats().errors == 0, "errors before the drop");
            drop(m);
            ensure!(
                pread_file(&path)? == file,
                "the drop wrote conflicted pages"
            );
            ensure!(hm.stats().errors == 1, "errors: {}", hm.stats().errors);
            let kept = hm.take_kept_file_mappings();
            ensure!(kept.len() == 1, "{} mappings kept", kept.len());
            ensure!(kept[0].conflicts().len() == 2, "{:?}", kept[0].conflicts());
            ensure!(
                page_is(&kept[0].as_slice()[page(1)], 1, 1),
                "kept: our page 1"
            );
            kept[0].resolve_conflicts(0, len, Resolution::Theirs)?;
            ensure!(
                page_is(&kept[0].as_slice()[page(600)], 2, 600),
                "kept: theirs"
            );
            drop(kept);
            ensure!(
                pread_file(&path)? == file,
                "the file after the kept mapping's drop"
            );
            ensure!(hm.stats().errors == 1, "errors: {}", hm.stats().errors);
            return Ok(());
        }
        // Theirs for pages 2 and 600, ours for the rest.
        m.resolve_conflicts(600 * PAGE_SIZE, PAGE_SIZE, Resolution::Theirs)?;
        m.resolve_conflicts(2 * PAGE_SIZE, PAGE_SIZE, Resolution::Theirs)?;
        ensure!(
            page_is(&m.as_slice()[page(600)], 2, 600),
            "theirs: page 600"
        );
        ensure!(page_is(&m.as_slice()[page(2)], 2, 2), "theirs: page 2");
        m.resolve_conflicts(0, 4 * PAGE_SIZE, Resolution::Mine)?;
        ensure!(m.conflicts().is_empty());
        m.flush().context("flush after resolving")?;
        let file = pread_file(&path)?;
        for (p, tag) in [(0, 1), (1, 1), (2, 2), (3, 1), (600, 2)] {
            ensure!(
                page_is(&file[page(p)], tag, p),
                "after resolving, file page {p}: not tag {tag}"
            );
        }
        let st = hm.stats();
        ensure!(
            st.pages_conflicted == 5,
            "pages_conflicted {}",
            st.pages_conflicted
        );
        ensure!(st.errors == 0, "errors: {}", st.errors);
        Ok(())
    }

    /// With a break budget, the dirty data of a leased Shared mapping is written back early,
    /// in the background, down to what its write rate writes back in the budget (here none:
    /// one block, the least): after 64 MiB of writes and no flush, at most 2 MiB is dirty,
    /// the rest is in the file already. With the default budget (half of lease-break-time),
    /// 4 MiB of writes stay dirty until the flush. Without the background writeback, all
    /// 64 MiB stayed dirty, for the break to write.
    pub fn dirty_data_stays_within_the_break_budget() -> Result<()> {
        let dir = TempDir::new("break_budget")?;
        let path = dir.path("data");
        let len = 64 * MIB;
        create_file(&path, &content(0, 0, len))?;
        let hm = Hetmem::builder().build()?;
        let options = FileOptions::new(FileMode::Shared).break_budget(Some(Duration::ZERO));
        let mut m = hm.map_file_with(&path, 0, len, options)?;
        if !m.is_leased() {
            eprintln!("SKIPPED: no lease on {}", path.display());
            return Ok(());
        }
        let pages = len / PAGE_SIZE;
        {
            let w = m.as_mut_slice().expect("writable");
            for p in 0..pages {
                stamp_page(&mut w[p * PAGE_SIZE..][..PAGE_SIZE], 1, p);
            }
        }
        wait_until(
            "dirty data under the budget",
            Duration::from_secs(20),
            || m.dirty_bytes() <= 2 * MIB,
        )?;
        let st = hm.stats();
        ensure!(st.background_writebacks > 0, "no background writeback");
        // In the file before any flush (the lease is ours: nobody else looks).
        let file = std::fs::read(&path)?;
        let written = (0..pages)
            .filter(|&p| page_is(&file[p * PAGE_SIZE..][..PAGE_SIZE], 1, p))
            .count();
        ensure!(
            written >= pages - 2 * MIB / PAGE_SIZE,
            "only {written} of {pages} pages in the file"
        );
        m.flush()?;
        ensure!(pread_file(&path)? == content(1, 0, len), "after the flush");
        drop(m);

        // The default budget: 4 MiB is far under what half of lease-break-time writes.
        let path2 = dir.path("data2");
        create_file(&path2, &content(0, 0, 4 * MIB))?;
        let mut m = hm.map_file_with(&path2, 0, 4 * MIB, FileOptions::new(FileMode::Shared))?;
        let before = hm.stats().background_writebacks;
        {
            let w = m.as_mut_slice().expect("writable");
            for p in 0..4 * MIB / PAGE_SIZE {
                stamp_page(&mut w[p * PAGE_SIZE..][..PAGE_SIZE], 1, p);
            }
        }
        ensure!(m.dirty_bytes() == 4 * MIB, "dirty: {}", m.dirty_bytes());
        ensure!(hm.stats().background_writebacks == before);
        m.flush()?;
        ensure!(m.dirty_bytes() == 0);
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }

    /// The budget of a mapping in one context holds while another context has a mapping of
    /// its own served by the same background thread. Region numbers are per context, so both
    /// mappings are region 0 of theirs: the flusher once keyed them by that number, found the
    /// other context's mapping for each request, and never wrote this one back.
    pub fn the_budget_holds_beside_another_context() -> Result<()> {
        let dir = TempDir::new("budget_two_contexts")?;
        let (path_a, path_b) = (dir.path("a"), dir.path("b"));
        let len = 16 * MIB;
        create_file(&path_a, &content(0, 0, 4 * MIB))?;
        create_file(&path_b, &content(0, 0, len))?;
        let budget = FileOptions::new(FileMode::Shared).break_budget(Some(Duration::ZERO));
        let hm_a = Hetmem::builder().build()?;
        let a = hm_a.map_file_with(&path_a, 0, 4 * MIB, budget)?;
        let hm_b = Hetmem::builder().build()?;
        let mut b = hm_b.map_file_with(&path_b, 0, len, budget)?;
        if !a.is_leased() || !b.is_leased() {
            eprintln!("SKIPPED: no leases");
            return Ok(());
        }
        {
            let w = b.as_mut_slice().expect("writable");
            for p in 0..len / PAGE_SIZE {
                stamp_page(&mut w[p * PAGE_SIZE..][..PAGE_SIZE], 1, p);
            }
        }
        wait_until("b under its budget", Duration::from_secs(20), || {
            b.dirty_bytes() <= 2 * MIB
        })?;
        ensure!(hm_b.stats().background_writebacks > 0);
        b.flush()?;
        ensure!(pread_file(&path_b)? == content(1, 0, len));
        drop(a);
        ensure!(hm_a.stats().errors == 0 && hm_b.stats().errors == 0);
        Ok(())
    }

    /// A break waits for a device kernel over block 0, whose closure reads a page of block 1
    /// of the same mapping through the CPU: the fault is parked at the break's gate, and the
    /// break cannot end before the kernel does. At the break's deadline (`lease-break-time`
    /// 1 s here) the fault service serves the parked fault, the kernel finishes, and the break
    /// ends (its writebacks past the deadline conflicted). Without that, all three waited for
    /// each other for ever.
    pub fn a_fault_parked_past_the_deadline_is_served() -> Result<()> {
        if !is_root() {
            eprintln!("SKIPPED: setting lease-break-time needs root");
            return Ok(());
        }
        let Some(_break_time) = BreakTime::set(1)? else {
            return Ok(());
        };
        let Some((_dir, path, hm, m)) = leased_file("parked_past_deadline")? else {
            return Ok(());
        };
        let len = 4 * MIB;
        let dev = hm.device(0).context("device 0")?;
        let lease = lease_thread()?;
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let (done_tx, done_rx) = mpsc::channel();
        let m = &m;
        let other = 600;
        std::thread::scope(|s| -> Result<()> {
            s.spawn(|| {
                let r = dev.kernel_write(m.addr(), PAGE_SIZE, |_, page| {
                    let _ = started_tx.send(());
                    let _ = go_rx.lock().map(|rx| rx.recv());
                    // Block 1 of the same mapping, through the CPU: parked at the gate.
                    let seen = page_is(&m.as_slice()[other * PAGE_SIZE..][..PAGE_SIZE], 0, other);
                    stamp_page(page, u32::from(seen) + 1, 0);
                });
                let _ = done_tx.send(r.map_err(|e| e.to_string()));
            });
            started_rx.recv_timeout(Duration::from_secs(10))?;
            let opener = s.spawn(|| std::fs::File::open(&path));
            wait_lease_breaking(&path)?;
            wait_in_futex(lease, Duration::from_secs(10)).context("the lease thread")?;
            let _ = go_tx.send(());
            // A failure detector: served at the deadline (0.9 s), or never.
            let done = done_rx.recv_timeout(Duration::from_secs(10));
            ensure!(
                done.is_ok(),
                "the kernel never finished: its parked fault was not served"
            );
            ensure!(done == Ok(Ok(())), "the kernel: {done:?}");
            drop(opener.join().expect("opener")?);
            Ok(())
        })?;
        wait_break_over(m)?;
        ensure!(hm.stats().break_waits >= 1, "the fault was not parked");
        // The kernel's page 0 (tag 2: it read page 600 right) came after the deadline.
        ensure!(
            page_is(&m.as_slice()[..PAGE_SIZE], 2, 0),
            "the kernel's write"
        );
        ensure!(!m.conflicts().is_empty(), "no conflict after the deadline");
        m.resolve_conflicts(0, len, Resolution::Mine)?;
        m.flush()?;
        ensure!(page_is(&pread_file(&path)?[..PAGE_SIZE], 2, 0));
        ensure!(hm.stats().errors == 0, "errors: {}", hm.stats().errors);
        Ok(())
    }
}
