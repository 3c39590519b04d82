//! File mappings larger than what is touched, or than memory (`docs/file-contract.md` §2.8): a
//! flush visits only the blocks that may hold dirty pages (the dirty-block index); random
//! writes followed by `flush`, `flush_range` or `sync` always reach the file; and a CPU scan of
//! a mapping with a cache limit (`FileOptions::cache_limit`) keeps the memfd's resident size
//! under it.
//!
//! The files are sparse: a 64 GiB mapping costs the file system nothing and hetmem its block
//! metadata only (about 5 KiB per 2 MiB block, `docs/runtime.md` §5). Shares `common/file.rs`'s
//! conventions (page stamps, no sleeping). `HETMEM_BIG_GIB` changes the size of the large
//! mapping; `HETMEM_DIFF_SEED` replays one seed of the differential test.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use common::file::{page_is, stamp_page, unleased, DEFAULT_TIMEOUT_S};
use common::fs::TempDir;
use common::{env_or, env_seed, Rng};
use hetmem::{DeviceKind, FileMode, Hetmem, SimConfig, PAGE_SIZE};

const GIB: u64 = 1 << 30;
const BLOCK: usize = 2 << 20;
const PAGES_PER_BLOCK: usize = BLOCK / PAGE_SIZE;

common::serial_tests!(
    DEFAULT_TIMEOUT_S * 4;
    flush_visits_only_dirty_blocks,
    random_writes_reach_the_file,
    flush_time_of_a_mostly_clean_mapping,
    cpu_scan_stays_under_cache_limit,
    cache_limit_keeps_dirty_blocks,
    cache_limit_refused_where_it_cannot_work,
    scan_in_a_memory_cgroup,
    metadata_that_cannot_fit_is_refused,
);

/// The child of `scan_in_a_memory_cgroup`: does nothing unless `HETMEM_CGROUP_CHILD` names a
/// cgroup directory. Then it moves itself into that cgroup and scans `HETMEM_CGROUP_FILE`
/// through the CPU, with a cache limit of `HETMEM_CGROUP_LIMIT` bytes (0: none), checking
/// every page.
#[test]
fn cgroup_scan_child() -> Result<()> {
    let Ok(cgroup) = std::env::var("HETMEM_CGROUP_CHILD") else {
        return Ok(());
    };
    let path = std::env::var("HETMEM_CGROUP_FILE")?;
    let limit: usize = std::env::var("HETMEM_CGROUP_LIMIT")?.parse()?;
    std::fs::write(Path::new(&cgroup).join("cgroup.procs"), "0").context("join the cgroup")?;
    let len = std::fs::metadata(&path)?.len() as usize;
    let hm = cpu_context()?;
    let m = hm.map_file_with(
        &path,
        0,
        len,
        unleased(FileMode::ReadOnly).cache_limit((limit > 0).then_some(limit)),
    )?;
    for p in 0..len / PAGE_SIZE {
        let page = &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        ensure!(page_is(page, 0, p), "page {p} is wrong");
    }
    eprintln!("scanned {len} bytes in the cgroup: {:?}", hm.stats());
    Ok(())
}

/// A memory cgroup of our own, below the one this process is in (v1 `memory` hierarchy, or
/// v2 where the memory controller is enabled for children), with `limit` bytes of memory and
/// no swap; removed on drop. `None`, said on stderr, where none can be made.
struct Cgroup(std::path::PathBuf);

impl Cgroup {
    fn new(limit: usize) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let name = format!("hetmem-file-big-{}", std::process::id());
        let v1 = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            ctl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        });
        let (dir, files): (std::path::PathBuf, [&str; 2]) = match v1 {
            Some(path) => (
                Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join(&name),
                ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
            ),
            None => {
                let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
                let parent = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
                let ctl = std::fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
                if !ctl.split_whitespace().any(|c| c == "memory") {
                    eprintln!("SKIPPED: the memory controller is not enabled for child cgroups");
                    return None;
                }
                (parent.join(&name), ["memory.max", "memory.swap.max"])
            }
        };
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("SKIPPED: cannot make cgroup {}: {e}", dir.display());
            return None;
        }
        let cg = Cgroup(dir);
        if let Err(e) = std::fs::write(cg.0.join(files[0]), limit.to_string()) {
            eprintln!("SKIPPED: cannot limit cgroup {}: {e}", cg.0.display());
            return None;
        }
        // No swap: memsw (v1) is memory plus swap, swap.max (v2) swap alone. Without swap
        // accounting the file is absent; the machine may have no swap anyway.
        let swap = if files[1] == "memory.swap.max" {
            0
        } else {
            limit
        };
        let _ = std::fs::write(cg.0.join(files[1]), swap.to_string());
        Some(cg)
    }

    /// Runs `cgroup_scan_child` in this cgroup over `file` with `cache_limit` (0: none).
    fn scan(&self, file: &Path, cache_limit: usize) -> Result<std::process::Output> {
        Ok(std::process::Command::new(std::env::current_exe()?)
            .args([
                "cgroup_scan_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HETMEM_CGROUP_CHILD", &self.0)
            .env("HETMEM_CGROUP_FILE", file)
            .env("HETMEM_CGROUP_LIMIT", cache_limit.to_string())
            .output()?)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited (`scan` waits for them).
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A sparse file of `len` bytes at `path`, or `None` (said on stderr) where the file system
/// cannot hold one that large.
fn sparse_file(path: &Path, len: u64) -> Result<Option<()>> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    match f.set_len(len) {
        Ok(()) => Ok(Some(())),
        Err(e) => {
            eprintln!("SKIPPED: a sparse file of {len} bytes: {e}");
            Ok(None)
        }
    }
}

/// Page `page` of the file, read with `pread` on a descriptor of its own.
fn file_page(path: &Path, page: usize) -> Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut v = vec![0u8; PAGE_SIZE];
    f.read_exact_at(&mut v, (page * PAGE_SIZE) as u64)?;
    Ok(v)
}

/// Bytes resident in the memfds hetmem made (`/memfd:hetmem-N`) that this process has open:
/// the data parts `lseek(SEEK_DATA/SEEK_HOLE)` finds (shmem reports each page in its page
/// cache or swap as data).
fn memfd_resident() -> Result<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !link.to_string_lossy().starts_with("/memfd:hetmem-") {
            continue;
        }
        let Ok(f) = File::open(e.path()) else {
            continue;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut at: libc::off_t = 0;
        loop {
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data past `at`.
            }
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            ensure!(hole >= data, "SEEK_HOLE after {data}");
            total += (hole - data) as u64;
            at = hole;
        }
    }
    Ok(total)
}

/// A file of `len` bytes of page stamps (tag 0) at `path`, written a block at a time.
fn stamped_file(path: &Path, len: usize) -> Result<()> {
    let f = File::create(path)?;
    let mut buf = vec![0u8; BLOCK];
    for bi in 0..len / BLOCK {
        for (i, p) in buf.chunks_mut(PAGE_SIZE).enumerate() {
            stamp_page(p, 0, bi * PAGES_PER_BLOCK + i);
        }
        f.write_all_at(&buf, (bi * BLOCK) as u64)?;
    }
    Ok(())
}

/// This process's resident memory, KiB (`VmRSS`), 0 where unknown.
fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_context() -> Result<Hetmem> {
    Ok(Hetmem::builder().build()?)
}

mod scenarios {
    use super::*;

    /// A 64 GiB sparse mapping with two dirty blocks: a flush sends a writeback request to
    /// those two only, the data reaches the file, and a flush of the then clean mapping sends
    /// none, also after clean pages were read from the file. `flush_range` visits only the
    /// dirty blocks of its range and leaves the others dirty; `sync` visits only dirty blocks.
    pub fn flush_visits_only_dirty_blocks() -> Result<()> {
        let dir = TempDir::new("flush_dirty_blocks")?;
        let path = dir.path("big");
        let len = env_or("HETMEM_BIG_GIB", 64u64) * GIB;
        if sparse_file(&path, len)?.is_none() {
            return Ok(());
        }
        let hm = cpu_context()?;
        let mut m = hm.map_file_with(&path, 0, len as usize, unleased(FileMode::Shared))?;
        let nblocks = len as usize / BLOCK;
        let (a, b) = (3 * PAGES_PER_BLOCK + 7, (nblocks - 5) * PAGES_PER_BLOCK + 1);
        let mem = m.as_mut_slice().context("a Shared mapping is writable")?;
        stamp_page(&mut mem[a * PAGE_SIZE..(a + 1) * PAGE_SIZE], 1, a);
        stamp_page(&mut mem[b * PAGE_SIZE..(b + 1) * PAGE_SIZE], 1, b);

        let s0 = hm.stats();
        m.flush()?;
        let d = hm.stats().since(&s0);
        assert_eq!(
            (d.blocks_flushed, d.pages_written_back),
            (2, 2),
            "a flush of {nblocks} blocks, 2 of them dirty: {d:?}"
        );
        for p in [a, b] {
            ensure!(
                page_is(&file_page(&path, p)?, 1, p),
                "page {p} not in the file"
            );
        }

        // Clean now; a read fills clean pages from the file (a hole: zeros) and dirties nothing.
        let c = 1000 * PAGES_PER_BLOCK;
        ensure!(m.as_slice()[c * PAGE_SIZE..(c + 1) * PAGE_SIZE]
            .iter()
            .all(|&x| x == 0));
        let s1 = hm.stats();
        m.flush()?;
        let d = hm.stats().since(&s1);
        assert_eq!(d.blocks_flushed, 0, "a flush of a clean mapping: {d:?}");

        // flush_range: only the range's dirty block; the other stays dirty until a flush.
        let mem = m.as_mut_slice().context("writable")?;
        stamp_page(&mut mem[a * PAGE_SIZE..(a + 1) * PAGE_SIZE], 2, a);
        stamp_page(&mut mem[b * PAGE_SIZE..(b + 1) * PAGE_SIZE], 2, b);
        let s2 = hm.stats();
        m.flush_range((b / PAGES_PER_BLOCK) * BLOCK, BLOCK)?;
        let d = hm.stats().since(&s2);
        assert_eq!(
            (d.blocks_flushed, d.pages_written_back),
            (1, 1),
            "flush_range over one of two dirty blocks: {d:?}"
        );
        ensure!(page_is(&file_page(&path, b)?, 2, b), "page {b} not written");
        ensure!(
            page_is(&file_page(&path, a)?, 1, a),
            "page {a}, outside the range, was written"
        );
        let s3 = hm.stats();
        m.sync()?;
        let d = hm.stats().since(&s3);
        assert_eq!(
            (d.blocks_flushed, d.pages_written_back),
            (1, 1),
            "sync with one dirty block left: {d:?}"
        );
        ensure!(page_is(&file_page(&path, a)?, 2, a), "page {a} not synced");
        Ok(())
    }

    /// Differential: random CPU and device writes and reads over a sparse mapping (a device
    /// smaller than what is written, so dirty pages are evicted home; odd seeds with a cache
    /// limit of 4 blocks, so reads drop clean blocks), then `flush`, `flush_range` or `sync`:
    /// every read shows the latest data, every page written reaches the file with it (the
    /// whole mapping after `flush`/`sync`, the range after `flush_range`), and pages never
    /// written read zero. The oracle is a map from page to its last tag.
    pub fn random_writes_reach_the_file() -> Result<()> {
        let dir = TempDir::new("random_writes_sync")?;
        let len: usize = 1 << 30;
        let npages = len / PAGE_SIZE;
        let seeds: Vec<u64> =
            env_seed("HETMEM_DIFF_SEED").map_or_else(|| vec![1, 2, 3, 5], |s| vec![s]);
        for seed in seeds {
            // A fresh file per seed: the oracle starts from a hole everywhere.
            let path = dir.path(&format!("big-{seed}"));
            if sparse_file(&path, len as u64)?.is_none() {
                return Ok(());
            }
            let hm = Hetmem::builder()
                .sim_device_with(SimConfig {
                    kind: DeviceKind::Private,
                    capacity: 4 << 20,
                    workers: 1,
                })
                .build()?;
            let dev = hm.device(0).context("one device")?;
            // Odd seeds with a cache limit of 4 blocks: the reads below drop clean blocks.
            let limit = (seed % 2 == 1).then_some(4 * BLOCK);
            let opts = unleased(FileMode::Shared).cache_limit(limit);
            let mut m = hm.map_file_with(&path, 0, len, opts)?;
            let mut rng = Rng::new(seed);
            // Last tag written per page, and what the file must hold.
            let mut mem = std::collections::BTreeMap::<usize, u32>::new();
            let mut page = vec![0u8; PAGE_SIZE];
            let mut tag = 1u32;
            for round in 0..40 {
                // Writes clustered in a few blocks, as a real workload's are.
                let hot: Vec<usize> = (0..3)
                    .map(|_| rng.below(npages / PAGES_PER_BLOCK))
                    .collect();
                for _ in 0..rng.below(20) + 1 {
                    let bi = hot[rng.below(hot.len())];
                    let p = bi * PAGES_PER_BLOCK + rng.below(PAGES_PER_BLOCK);
                    tag += 1;
                    stamp_page(&mut page, tag, p);
                    if rng.one_in(3) {
                        dev.write(m.addr() + p * PAGE_SIZE, &page)?;
                    } else {
                        let s = m.as_mut_slice().context("writable")?;
                        s[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page);
                    }
                    mem.insert(p, tag);
                }
                // Reads, by the CPU or the device, of written pages and of holes.
                for _ in 0..rng.below(12) {
                    let p = match (rng.one_in(2), mem.keys().nth(rng.below(mem.len().max(1)))) {
                        (true, Some(&p)) => p,
                        _ => rng.below(npages),
                    };
                    let got = if rng.one_in(4) {
                        dev.read(m.addr() + p * PAGE_SIZE, PAGE_SIZE)?
                    } else {
                        m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].to_vec()
                    };
                    let ok = match mem.get(&p) {
                        Some(&t) => page_is(&got, t, p),
                        None => got.iter().all(|&x| x == 0),
                    };
                    ensure!(
                        ok,
                        "seed {seed} round {round}: page {p} reads wrong (want tag {:?})",
                        mem.get(&p)
                    );
                }
                let (check, what): (std::ops::Range<usize>, &str) = match rng.below(3) {
                    0 => {
                        m.flush()?;
                        (0..npages, "flush")
                    }
                    1 => {
                        m.sync()?;
                        (0..npages, "sync")
                    }
                    _ => {
                        let first = rng.below(npages / PAGES_PER_BLOCK) * PAGES_PER_BLOCK;
                        let n = (rng.below(8) + 1) * PAGES_PER_BLOCK;
                        let n = n.min(npages - first);
                        m.flush_range(first * PAGE_SIZE, n * PAGE_SIZE)?;
                        (first..first + n, "flush_range")
                    }
                };
                for (&p, &t) in mem.range(check.clone()) {
                    ensure!(
                        page_is(&file_page(&path, p)?, t, p),
                        "seed {seed} round {round}: page {p} (tag {t}) not in the file after {what}"
                    );
                }
                // A page never written is a hole, in the file as in the mapping.
                let z = check.start + rng.below(check.len());
                if !mem.contains_key(&z) {
                    ensure!(
                        file_page(&path, z)?.iter().all(|&x| x == 0),
                        "seed {seed} round {round}: page {z}, never written, is not zero"
                    );
                }
            }
            let reclaimed = hm.stats().blocks_reclaimed;
            eprintln!("seed {seed}: limit {limit:?}, {reclaimed} blocks dropped for it");
            ensure!(
                limit.is_none() || reclaimed > 0,
                "seed {seed}: the cache limit dropped nothing"
            );
            m.sync()?;
            for (&p, &t) in &mem {
                ensure!(
                    page_is(&file_page(&path, p)?, t, p),
                    "seed {seed}: page {p} at the end"
                );
            }
        }
        Ok(())
    }

    /// Prints (does not assert) how long a flush of a 16 GiB mapping takes with two dirty
    /// blocks, and with none.
    pub fn flush_time_of_a_mostly_clean_mapping() -> Result<()> {
        let dir = TempDir::new("flush_time")?;
        let path = dir.path("big");
        let len = 16 * GIB;
        if sparse_file(&path, len)?.is_none() {
            return Ok(());
        }
        let hm = cpu_context()?;
        let (rss0, t) = (vm_rss_kib(), Instant::now());
        let mut m = hm.map_file_with(&path, 0, len as usize, unleased(FileMode::Shared))?;
        eprintln!(
            "map_file of 16 GiB: {:?}, VmRSS +{} MiB; metadata_bytes_per_page {} ({} bytes per \
             2 MiB block, no device)",
            t.elapsed(),
            (vm_rss_kib().saturating_sub(rss0)) >> 10,
            hm.metadata_bytes_per_page(),
            (hm.metadata_bytes_per_page() * PAGES_PER_BLOCK as f64) as u64
        );
        let mem = m.as_mut_slice().context("writable")?;
        mem[0] = 1;
        mem[len as usize / 2] = 1;
        let t = Instant::now();
        m.flush()?;
        let two = t.elapsed();
        let t = Instant::now();
        m.flush()?;
        let none = t.elapsed();
        eprintln!(
            "flush of a 16 GiB mapping ({} blocks): 2 dirty blocks {two:?}, clean {none:?}",
            len as usize / BLOCK
        );
        ensure!(File::open(&path)?.metadata()?.len() == len);
        Ok(())
    }

    /// A CPU scan of a 256 MiB file through a mapping limited to 16 MiB: every page reads
    /// the file's data, the memfd never holds more than the limit (a fault past it drops the
    /// oldest block before it fills), and a second scan reads the file again.
    pub fn cpu_scan_stays_under_cache_limit() -> Result<()> {
        let dir = TempDir::new("cache_limit_scan")?;
        let path = dir.path("data");
        let len = 256 << 20;
        let limit = 16 << 20;
        stamped_file(&path, len)?;
        for mode in [FileMode::ReadOnly, FileMode::Shared] {
            let hm = cpu_context()?;
            let m = hm.map_file_with(&path, 0, len, unleased(mode).cache_limit(Some(limit)))?;
            let s0 = hm.stats();
            let mut most = 0u64;
            for pass in 0..2 {
                for p in 0..len / PAGE_SIZE {
                    let page = &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
                    ensure!(
                        page_is(page, 0, p),
                        "{mode:?} pass {pass}: page {p} is wrong"
                    );
                    if p % PAGES_PER_BLOCK == 0 {
                        most = most.max(memfd_resident()?);
                    }
                }
            }
            let d = hm.stats().since(&s0);
            eprintln!(
                "{mode:?}: most resident {} MiB (limit {} MiB), {d:?}",
                most >> 20,
                limit >> 20
            );
            ensure!(
                most <= limit as u64,
                "{mode:?}: {most} bytes resident in the memfd, limit {limit}"
            );
            ensure!(
                d.pages_from_file >= 2 * (len / PAGE_SIZE) as u64,
                "{mode:?}: the second scan did not read the file again: {d:?}"
            );
            ensure!(memfd_resident()? <= limit as u64);
        }
        Ok(())
    }

    /// Dirty blocks are not dropped, whatever the limit: their data is nowhere else. After a
    /// flush they are clean, and the next fault past the limit drops them.
    pub fn cache_limit_keeps_dirty_blocks() -> Result<()> {
        let dir = TempDir::new("cache_limit_dirty")?;
        let path = dir.path("data");
        let len = 32 << 20;
        stamped_file(&path, len)?;
        let hm = cpu_context()?;
        let mut m = hm.map_file_with(
            &path,
            0,
            len,
            unleased(FileMode::Shared).cache_limit(Some(2 * BLOCK)),
        )?;
        let nblocks = len / BLOCK;
        // Write one page in each of the first 8 blocks, then read the rest.
        let mem = m.as_mut_slice().context("writable")?;
        for bi in 0..8 {
            let p = bi * PAGES_PER_BLOCK + 3;
            stamp_page(&mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], 7, p);
        }
        for bi in 8..nblocks {
            let p = bi * PAGES_PER_BLOCK;
            ensure!(page_is(
                &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                0,
                p
            ));
        }
        // The writes are still there (not dropped, not in the file yet).
        for bi in 0..8 {
            let p = bi * PAGES_PER_BLOCK + 3;
            ensure!(
                page_is(&m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], 7, p),
                "block {bi}'s write was lost"
            );
            ensure!(
                page_is(&file_page(&path, p)?, 0, p),
                "written back before a flush"
            );
        }
        ensure!(
            memfd_resident()? >= (8 * BLOCK) as u64,
            "the dirty blocks' memory went"
        );
        m.flush()?;
        for bi in 8..nblocks {
            let p = bi * PAGES_PER_BLOCK + 1;
            ensure!(page_is(
                &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                0,
                p
            ));
        }
        let left = memfd_resident()?;
        ensure!(
            left <= (2 * BLOCK) as u64,
            "{left} bytes resident after the flush and a scan, limit {}",
            2 * BLOCK
        );
        for bi in 0..8 {
            let p = bi * PAGES_PER_BLOCK + 3;
            ensure!(
                page_is(&file_page(&path, p)?, 7, p),
                "block {bi} not flushed"
            );
            ensure!(page_is(
                &m.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                7,
                p
            ));
        }
        Ok(())
    }

    /// A limit under one block, or on a Private mapping, is refused before anything is opened.
    pub fn cache_limit_refused_where_it_cannot_work() -> Result<()> {
        let dir = TempDir::new("cache_limit_refused")?;
        let path = dir.path("data");
        stamped_file(&path, 4 << 20)?;
        let hm = cpu_context()?;
        for (mode, limit) in [
            (FileMode::Shared, BLOCK - PAGE_SIZE),
            (FileMode::ReadOnly, 0),
            (FileMode::Private, 64 << 20),
        ] {
            let r = hm.map_file_with(&path, 0, 4 << 20, unleased(mode).cache_limit(Some(limit)));
            ensure!(
                matches!(r, Err(hetmem::Error::Invalid(_))),
                "{mode:?} with a limit of {limit}: {:?}",
                r.err()
            );
        }
        ensure!(hetmem_files_open() == 0, "a refused mapping left its memfd");
        Ok(())
    }

    /// Block metadata is still built at `map_file` for the whole range (lazy metadata is not
    /// done: `docs/file-contract.md` §11.1). A file whose metadata cannot fit in the machine's
    /// memory is refused with `NoMem` before the file is opened (so before any lease) and
    /// before anything is allocated: no open seen by inotify, no memfd, no descriptor of the
    /// file left open, the context still working.
    pub fn metadata_that_cannot_fit_is_refused() -> Result<()> {
        let dir = TempDir::new("metadata_refused")?;
        // On a tmpfs where one can be mounted: its files may be sparse past ext4's 16 TiB.
        let mnt = dir.path("tmpfs");
        std::fs::create_dir(&mnt)?;
        let _tmpfs = common::fs::Mount::tmpfs(&mnt, "size=16m")?;
        let path = mnt.join("data");
        let hm = cpu_context()?;
        let mem_bytes = std::fs::read_to_string("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("MemTotal")?
            * 1024;
        // A mapping whose metadata would take twice the machine's memory.
        let per_page = hm.metadata_bytes_per_page().max(1.0);
        let mut len: u64 = 1 << 40;
        while (len / PAGE_SIZE as u64) as f64 * per_page <= 2.0 * mem_bytes as f64 {
            len *= 2;
        }
        let len = len - PAGE_SIZE as u64;
        if sparse_file(&path, len)?.is_none() {
            return Ok(());
        }
        // inotify tells whether the file was opened: refused before the open, which would break
        // a lease another process held.
        let ino = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        ensure!(ino >= 0, "inotify_init1");
        let cpath = common::fs::cstr(&path)?;
        ensure!(unsafe { libc::inotify_add_watch(ino, cpath.as_ptr(), libc::IN_OPEN) } >= 0);
        let r = hm.map_file(&path, 0, len as usize, FileMode::Shared);
        let mut buf = [0u8; 256];
        let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
        unsafe { libc::close(ino) };
        ensure!(n < 0, "the file was opened ({n} bytes of inotify events)");
        ensure!(
            matches!(r, Err(hetmem::Error::NoMem)),
            "map_file of {} TiB: {:?}",
            len >> 40,
            r.err()
        );
        ensure!(hetmem_files_open() == 0, "a refused mapping left its memfd");
        let want = path.canonicalize()?;
        let still_open = std::fs::read_dir("/proc/self/fd")?
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|l| l == want);
        ensure!(!still_open, "the file is still open after the refusal");
        // The context still maps what fits.
        std::fs::write(&path, vec![7u8; PAGE_SIZE])?;
        let m = hm.map_file(&path, 0, PAGE_SIZE, FileMode::Shared)?;
        ensure!(m.as_slice()[0] == 7);
        Ok(())
    }

    /// The ask: a file four times what a memory cgroup allows (no swap), scanned by
    /// the CPU through a mapping with a cache limit, in a child process in that cgroup: it
    /// finishes, every page right. The same scan without the limit is killed (OOM): the
    /// memfd's pages are shmem, which nothing but swap could reclaim; that it is shows the
    /// cgroup's limit bites. Skipped, loudly, where no memory cgroup can be made.
    pub fn scan_in_a_memory_cgroup() -> Result<()> {
        let dir = TempDir::new("cgroup_scan")?;
        let path = dir.path("data");
        let len = 256 << 20;
        let memory = 64 << 20;
        stamped_file(&path, len)?;
        let Some(cg) = Cgroup::new(memory) else {
            return Ok(());
        };
        let out = cg.scan(&path, 16 << 20)?;
        ensure!(
            out.status.success(),
            "the scan with a 16 MiB cache limit in a {} MiB cgroup failed: {:?}\n{}",
            memory >> 20,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("scanned"),
            "the child did not scan: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cg.scan(&path, 0)?;
        eprintln!("without a cache limit: {:?}", out.status);
        ensure!(
            !out.status.success(),
            "a scan of {} MiB with no cache limit finished in a {} MiB cgroup: the cgroup does \
             not limit memory, and the test shows nothing",
            len >> 20,
            memory >> 20
        );
        Ok(())
    }
}

/// Memfds of hetmem's this process has open.
fn hetmem_files_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("/memfd:hetmem-"))
                .count()
        })
        .unwrap_or(0)
}
