//! Differential test of file mappings against plain memory: a random (fixed-seed) sequence of
//! CPU and device writes and reads, device kernels, migrations, flushes, opens of the file by
//! another process (lease breaks), drops and re-mappings runs over one `Shared` file mapping
//! and over two oracles, `Vec<u8>`s for the mapping and for the file, side by side. The file
//! ends inside its last page, and the devices are smaller than the file, so they evict, clean
//! pages by dropping them and dirty ones by copying (or, with `evict_to_file`, by writeback).
//! Each mapping draws its options (`direct`, `evict_to_file`) from the seed.
//!
//! The file is compared whenever its content is defined: after `flush`, after another
//! process's open while the mapping holds a lease (the break flushes first), and after a drop.
//! A mismatch reports the seed, the step and the recent operations.
//!
//! `HETMEM_DIFF_STEPS` scales the runs; `HETMEM_DIFF_SEED` replaces the seeds (to replay one).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

mod common;

use common::{env_or, Rng};

use hetmem::{
    Device, DeviceKind, FileMapping, FileMode, FileOptions, Hetmem, SimConfig, PAGE_SIZE,
};

/// 4 MiB + 300 pages, and 1000 bytes into one more page.
const FILE_SIZE: usize = (2 * 512 + 300) * PAGE_SIZE + 1000;
const MAP_LEN: usize = FILE_SIZE.div_ceil(PAGE_SIZE) * PAGE_SIZE;
/// 2 MiB per device, one block (a device needs room for a block per kernel worker, and has
/// one): each holds under half the file.
const DEV_PAGES: usize = 512;
const DEFAULT_STEPS: usize = 400;
const TIMEOUT_S: u64 = 120;

/// The shared xorshift64* generator, seeded as this test always was (`seed * φ`), so the
/// seeds replay the runs they always did.
fn rng(seed: u64) -> Rng {
    Rng::from_state(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

struct World {
    seed: u64,
    step: usize,
    path: PathBuf,
    hm: Hetmem,
    devs: Vec<Device>,
    map: Option<FileMapping>,
    /// What the mapping holds (the bytes past the end of the file stay zero: nobody writes
    /// them, and every fill reads zeros there).
    mem: Vec<u8>,
    rng: Rng,
    log: VecDeque<String>,
}

impl World {
    fn new(seed: u64, path: PathBuf) -> anyhow::Result<Self> {
        let dev = |kind| SimConfig {
            kind,
            capacity: DEV_PAGES * PAGE_SIZE,
            workers: 1,
        };
        let hm = Hetmem::builder()
            .sim_device_with(dev(DeviceKind::Private))
            .sim_device_with(dev(DeviceKind::Coherent))
            .build()?;
        let devs = hm.devices();
        let mut rng = rng(seed);
        let mut mem = vec![0u8; MAP_LEN];
        for b in &mut mem[..FILE_SIZE] {
            *b = rng.next() as u8;
        }
        std::fs::write(&path, &mem[..FILE_SIZE])?;
        let mut w = World {
            seed,
            step: 0,
            path,
            hm,
            devs,
            map: None,
            mem,
            rng,
            log: VecDeque::new(),
        };
        w.remap();
        Ok(w)
    }

    fn say(&mut self, what: String) {
        if self.log.len() == 24 {
            self.log.pop_front();
        }
        self.log.push_back(format!("#{} {what}", self.step));
    }

    fn fail(&self, msg: &str) -> ! {
        let log: Vec<&str> = self.log.iter().map(String::as_str).collect();
        panic!(
            "file differential, seed {} (HETMEM_DIFF_SEED={} replays it), step {}: {msg}\n\
             last operations:\n  {}",
            self.seed,
            self.seed,
            self.step,
            log.join("\n  ")
        );
    }

    fn map(&self) -> &FileMapping {
        self.map.as_ref().expect("mapped")
    }

    fn remap(&mut self) {
        let direct = self.rng.below(2) == 0;
        let evict_to_file = self.rng.below(2) == 0;
        self.say(format!(
            "map_file(direct {direct}, evict_to_file {evict_to_file})"
        ));
        let opts = FileOptions::new(FileMode::Shared)
            .direct(direct)
            .evict_to_file(evict_to_file);
        match self.hm.map_file_with(&self.path, 0, MAP_LEN, opts) {
            Ok(m) => self.map = Some(m),
            Err(e) => self.fail(&format!("map_file: {e:?}")),
        }
    }

    /// A run of bytes within the file: [off, off + len).
    fn byte_range(&mut self) -> (usize, usize) {
        let off = self.rng.below(FILE_SIZE);
        let len = 1 + self.rng.below((FILE_SIZE - off).min(3 * PAGE_SIZE * 64));
        (off, len)
    }

    /// A run of up to `max` whole pages of the mapping: (first, n).
    fn page_range(&mut self, max: usize) -> (usize, usize) {
        let pages = MAP_LEN / PAGE_SIZE;
        let first = self.rng.below(pages);
        (first, 1 + self.rng.below((pages - first).min(max)))
    }

    fn compare(&self, what: &str, off: usize, got: &[u8]) {
        let want = &self.mem[off..off + got.len()];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            self.fail(&format!(
                "{what}: byte {} (page {}) is {:#04x}, expected {:#04x}",
                off + i,
                (off + i) / PAGE_SIZE,
                got[i],
                want[i]
            ));
        }
    }

    fn file_is_mem(&self, what: &str) {
        let got = match std::fs::read(&self.path) {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{what}: read the file: {e}")),
        };
        if got.len() != FILE_SIZE {
            self.fail(&format!("{what}: the file's size is {}", got.len()));
        }
        self.compare(&format!("{what}: the file"), 0, &got);
    }

    fn step_once(&mut self) {
        let addr = self.map().addr();
        match self.rng.below(95) {
            0..=19 => {
                let (off, len) = self.byte_range();
                let v = self.rng.next() as u8;
                self.say(format!("CPU write {off}+{len} = {v:#04x}"));
                let m = self.map.as_mut().expect("mapped");
                m.as_mut_slice().expect("Shared")[off..off + len].fill(v);
                self.mem[off..off + len].fill(v);
            }
            20..=29 => {
                let (off, len) = self.byte_range();
                self.say(format!("CPU read {off}+{len}"));
                let got = self.map().as_slice()[off..off + len].to_vec();
                self.compare("CPU read", off, &got);
            }
            30..=44 => {
                // Whole pages (as devices take them); past the end of the file, zeros.
                let d = self.rng.below(2);
                let (first, n) = self.page_range(300);
                let v = self.rng.next() as u8;
                self.say(format!("dev{d} write pages {first}+{n} = {v:#04x}"));
                let (off, len) = (first * PAGE_SIZE, n * PAGE_SIZE);
                self.mem[off..(off + len).min(FILE_SIZE)].fill(v);
                let data = self.mem[off..off + len].to_vec();
                if let Err(e) = self.devs[d].write(addr + off, &data) {
                    self.fail(&format!("dev{d} write: {e:?}"));
                }
            }
            45..=54 => {
                let d = self.rng.below(2);
                let (first, n) = self.page_range(600);
                self.say(format!("dev{d} read pages {first}+{n}"));
                let off = first * PAGE_SIZE;
                match self.devs[d].read(addr + off, n * PAGE_SIZE) {
                    Ok(got) => self.compare(&format!("dev{d} read"), off, &got),
                    Err(e) => self.fail(&format!("dev{d} read: {e:?}")),
                }
            }
            55..=64 => {
                // A kernel over whole pages within the file: +k on every byte before EOF.
                let d = self.rng.below(2);
                let (first, n) = self.page_range(600);
                let k = 1 + self.rng.below(250) as u8;
                self.say(format!("dev{d} kernel_write pages {first}+{n} += {k}"));
                let base = addr + first * PAGE_SIZE;
                let r = self.devs[d].kernel_write(base, n * PAGE_SIZE, |run, bytes| {
                    let at = run - addr;
                    for (i, b) in bytes.iter_mut().enumerate() {
                        if at + i < FILE_SIZE {
                            *b = b.wrapping_add(k);
                        }
                    }
                });
                if let Err(e) = r {
                    self.fail(&format!("dev{d} kernel_write: {e:?}"));
                }
                let end = ((first + n) * PAGE_SIZE).min(FILE_SIZE);
                for b in &mut self.mem[first * PAGE_SIZE..end] {
                    *b = b.wrapping_add(k);
                }
            }
            65..=72 => {
                let d = self.rng.below(2);
                let (first, n) = self.page_range(300);
                let to_dev = self.rng.below(2) == 0;
                self.say(format!(
                    "dev{d} migrate pages {first}+{n}, to device {to_dev}"
                ));
                let (a, l) = (addr + first * PAGE_SIZE, n * PAGE_SIZE);
                let r = if to_dev {
                    self.devs[d].migrate_to_device(a, l)
                } else {
                    self.devs[d].migrate_to_system(a, l)
                };
                if let Err(e) = r {
                    self.fail(&format!("migrate: {e:?}"));
                }
            }
            73..=84 => {
                // Reading the file opens it, which breaks the lease and drops every cached
                // copy; so only after some flushes, to leave the caches full most of the time.
                let check = self.rng.below(3) == 0;
                self.say(format!("flush (then read the file: {check})"));
                if let Err(e) = self.map().flush() {
                    self.fail(&format!("flush: {e:?}"));
                }
                if check {
                    self.file_is_mem("after flush");
                }
            }
            85..=89 => {
                // Another process opens and reads the file. With the lease held, its open
                // waits for the break, which writes our dirty pages back first.
                let leased = self.map().is_leased();
                self.say(format!("another process reads the file (leased {leased})"));
                let path = self.path.clone();
                let want = self.mem[..FILE_SIZE].to_vec();
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let code = match std::fs::File::open(&path) {
                        Ok(f) => {
                            let mut got = vec![0u8; FILE_SIZE];
                            match f.read_exact_at(&mut got, 0) {
                                Ok(()) if got == want => 0,
                                Ok(()) => 1,
                                Err(_) => 2,
                            }
                        }
                        Err(_) => 3,
                    };
                    unsafe { libc::_exit(code) };
                }
                assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
                let mut status = 0;
                unsafe { libc::waitpid(pid, &mut status, 0) };
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
                if code == 2 || code == 3 || code == -1 || (leased && code != 0) {
                    self.fail(&format!(
                        "the other process's read: code {code} (1: not our data, 2/3: error)"
                    ));
                }
            }
            _ => {
                self.say("drop and map again".into());
                self.map = None;
                self.file_is_mem("after drop");
                self.remap();
            }
        }
    }

    fn run(&mut self, steps: usize) {
        for step in 0..steps {
            self.step = step;
            self.step_once();
        }
        self.step = steps;
        self.say("final flush".into());
        if let Err(e) = self.map().flush() {
            self.fail(&format!("final flush: {e:?}"));
        }
        self.file_is_mem("at the end");
        let got = self.map().as_slice().to_vec();
        self.compare("final CPU read", 0, &got);
        let s = self.hm.stats();
        if s.pages_evicted == 0 {
            self.fail(&format!("no eviction in the whole run: {s:?}"));
        }
        eprintln!(
            "file differential seed {}: {} steps, {} evicted, {} written back, {} from file, \
             {} lease breaks",
            self.seed,
            steps,
            s.pages_evicted,
            s.pages_written_back,
            s.pages_from_file,
            s.lease_breaks
        );
    }
}

#[test]
fn file_mapping_matches_plain_memory() -> anyhow::Result<()> {
    common::watchdog("file_mapping_matches_plain_memory", TIMEOUT_S, || {
        let steps = env_or("HETMEM_DIFF_STEPS", DEFAULT_STEPS);
        let seeds: Vec<u64> = match std::env::var("HETMEM_DIFF_SEED") {
            Ok(s) => vec![s.parse()?],
            Err(_) => vec![1, 2, 3],
        };
        for seed in seeds {
            let dir = std::env::temp_dir().join(format!(
                "hetmem-file-differential-{}-{seed}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir)?;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut w = World::new(seed, dir.join("data"))?;
                w.run(steps);
                anyhow::Ok(())
            }));
            let _ = std::fs::remove_dir_all(&dir);
            match result {
                Ok(r) => r?,
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Ok(())
    })
}
