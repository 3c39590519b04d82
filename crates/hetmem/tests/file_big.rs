//! File mappings larger than what is touched (`docs/file-contract.md` §2.8): a flush visits only
//! the blocks that may hold dirty pages (the dirty-block index), and random writes followed by
//! `flush`, `flush_range` or `sync` always reach the file.
//!
//! The files are sparse: a 64 GiB mapping costs the file system nothing and hetmem its block
//! metadata only (about 5 KiB per 2 MiB block, `docs/runtime.md` §5). Shares `common/file.rs`'s
//! conventions (page stamps, no sleeping). `HETMEM_BIG_GIB` changes the size of the large
//! mapping; `HETMEM_DIFF_SEED` replays one seed of the differential test.

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
);

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

    /// Differential: random CPU and device writes over a sparse mapping (a device smaller
    /// than what is written, so dirty pages are evicted home), then `flush`, `flush_range`
    /// or `sync`: every page written reaches the file with its latest data (the whole mapping
    /// after `flush`/`sync`, the range after `flush_range`), and pages never written read
    /// zero. The oracle is a map from page to its last tag.
    pub fn random_writes_reach_the_file() -> Result<()> {
        let dir = TempDir::new("random_writes_sync")?;
        let len: usize = 1 << 30;
        let npages = len / PAGE_SIZE;
        let seeds: Vec<u64> =
            env_seed("HETMEM_DIFF_SEED").map_or_else(|| vec![1, 2, 3], |s| vec![s]);
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
            let mut m = hm.map_file_with(&path, 0, len, unleased(FileMode::Shared))?;
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
        let mut m = hm.map_file_with(&path, 0, len as usize, unleased(FileMode::Shared))?;
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
}
