//! Differential test of the whole runtime against plain memory: a random (fixed-seed) sequence
//! of CPU accesses, device accesses, kernels, migrations, exclusive mappings, discards and
//! releases runs over a few managed buffers and over `Vec<u8>` oracles side by side. After every
//! operation the touched range is compared through a randomly chosen observer (the CPU, either
//! device, a kernel), and everything is compared periodically. A mismatch reports the seed, the
//! step and the recent operations.
//!
//! `HETMEM_DIFF_STEPS` scales the runs; `HETMEM_DIFF_SEED` replaces the seeds (to replay one).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;

use common::{env_or, Rng};

use hetmem::{
    Device, DeviceKind, Error, Hetmem, Location, ManagedBuf, SimConfig, Target, PAGE_SIZE,
};

const BLOCK_PAGES: usize = 512;
/// 3 MiB + 3 pages, 37 pages, 4 MiB + 5 pages: partial blocks, block boundaries inside.
const BUF_PAGES: [usize; 3] = [3 * 256 + 3, 37, 2 * BLOCK_PAGES + 5];
/// 3 MiB per device: less than the buffers together, so devices evict.
const DEV_PAGES: usize = 768;
/// Kernel workers per device: two, so a kernel's workers evict each other's blocks.
const KERNEL_WORKERS: usize = 2;
const DEFAULT_STEPS: usize = 1000;
const FULL_CHECK_EVERY: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(120);

/// The kernel_write transform, the same for the device and the oracle.
fn transform(b: u8, off: usize, k: u8) -> u8 {
    b.wrapping_mul(5).wrapping_add(k) ^ (off as u8).rotate_left(3) ^ ((off >> 12) as u8)
}

/// Aborts the process if a test hangs.
/// Held for the test's length; dropping it disarms the timer.
struct Watchdog(#[allow(dead_code)] common::AbortWatchdog);

impl Watchdog {
    fn start(name: String) -> Self {
        Watchdog(common::AbortWatchdog::start(
            format!("differential::{name}"),
            TIMEOUT,
        ))
    }
}

/// Who reads the data back for a comparison.
#[derive(Clone, Copy, Debug)]
enum Observer {
    Cpu,
    Dev(usize),
    Kernel(usize),
}

struct World {
    name: String,
    seed: u64,
    step: usize,
    hm: Hetmem,
    devs: Vec<Device>,
    bufs: Vec<ManagedBuf>,
    oracle: Vec<Vec<u8>>,
    rng: Rng,
    log: VecDeque<String>,
    ops: [u64; 12],
}

const OP_NAMES: [&str; 12] = [
    "cpu write",
    "cpu read",
    "dev write",
    "dev read",
    "hm.migrate",
    "dev migrate",
    "exclusive+touch",
    "discard",
    "release",
    "kernel_write",
    "kernel_read",
    "full check",
];

impl World {
    fn new(name: &str, kinds: [DeviceKind; 2], seed: u64) -> anyhow::Result<Self> {
        let dev = |kind| SimConfig {
            kind,
            capacity: DEV_PAGES * PAGE_SIZE,
            workers: KERNEL_WORKERS,
        };
        let hm = Hetmem::builder()
            .sim_device_with(dev(kinds[0]))
            .sim_device_with(dev(kinds[1]))
            .build()?;
        let devs = hm.devices();
        let bufs = BUF_PAGES
            .iter()
            .map(|&p| hm.alloc(p * PAGE_SIZE))
            .collect::<Result<Vec<_>, _>>()?;
        let oracle = BUF_PAGES
            .iter()
            .map(|&p| vec![0u8; p * PAGE_SIZE])
            .collect();
        Ok(World {
            name: name.to_string(),
            seed,
            step: 0,
            hm,
            devs,
            bufs,
            oracle,
            rng: Rng::new(seed),
            log: VecDeque::new(),
            ops: [0; 12],
        })
    }

    fn say(&mut self, what: String) {
        if self.log.len() == 12 {
            self.log.pop_front();
        }
        self.log.push_back(format!("step {}: {what}", self.step));
    }

    fn fail(&self, msg: &str) -> ! {
        let log: Vec<&String> = self.log.iter().collect();
        panic!(
            "differential::{}: seed {:#x} step {}: {msg}\nrecent operations:\n{log:#?}\n(replay: HETMEM_DIFF_SEED={} HETMEM_DIFF_STEPS={})",
            self.name,
            self.seed,
            self.step,
            self.seed,
            self.step + 1
        )
    }

    fn ok<T>(&self, what: &str, r: Result<T, Error>) -> T {
        r.unwrap_or_else(|e| self.fail(&format!("{what} failed: {e}")))
    }

    /// A random byte range `(buf, off, len)`, at most `max_pages` pages' worth.
    fn byte_range(&mut self, max_pages: usize) -> (usize, usize, usize) {
        let b = self.rng.below(self.bufs.len());
        let size = self.oracle[b].len();
        let len = self.rng.len((max_pages * PAGE_SIZE).min(size));
        let off = self.rng.below(size - len + 1);
        (b, off, len)
    }

    /// A random page range `(buf, first page, pages)`, biased to cross block boundaries.
    fn page_range(&mut self, max_pages: usize) -> (usize, usize, usize) {
        let b = self.rng.below(self.bufs.len());
        let pages = self.oracle[b].len() / PAGE_SIZE;
        let n = self.rng.len(max_pages.min(pages));
        let start = if pages > BLOCK_PAGES && self.rng.below(4) == 0 {
            // Straddle the first block boundary.
            let lo = BLOCK_PAGES.saturating_sub(n - 1).max(1);
            (lo + self.rng.below(BLOCK_PAGES - lo + 1)).min(pages - n)
        } else {
            self.rng.below(pages - n + 1)
        };
        (b, start, n)
    }

    fn addr(&self, b: usize, page: usize) -> usize {
        self.bufs[b].addr() + page * PAGE_SIZE
    }

    fn observer(&mut self) -> Observer {
        match self.rng.below(5) {
            0 | 1 => Observer::Cpu,
            2 => Observer::Dev(0),
            3 => Observer::Dev(1),
            _ => Observer::Kernel(self.rng.below(2)),
        }
    }

    fn compare(&self, what: &str, b: usize, off: usize, got: &[u8]) {
        let want = &self.oracle[b][off..off + got.len()];
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let at = off + i;
            let end = (i + 16).min(got.len());
            let bad = (i..got.len()).filter(|&j| got[j] != want[j]).count();
            self.fail(&format!(
                "{what}: buffer {b} offset {at:#x} (page {}, byte {}): got {:02x?}, expected {:02x?}; {bad} bytes differ in [{off:#x}, {:#x})",
                at / PAGE_SIZE,
                at % PAGE_SIZE,
                &got[i..end],
                &want[i..end],
                off + got.len()
            ));
        }
    }

    /// Compares `[off, off + len)` of buffer `b` with the oracle through `obs` (devices see the
    /// enclosing pages).
    fn check(&mut self, b: usize, off: usize, len: usize, obs: Observer) {
        match obs {
            Observer::Cpu => {
                let got = self.bufs[b][off..off + len].to_vec();
                self.compare("cpu read-back", b, off, &got);
            }
            Observer::Dev(d) => {
                let first = off / PAGE_SIZE;
                let end = (off + len).div_ceil(PAGE_SIZE);
                let r = self.devs[d].read(self.addr(b, first), (end - first) * PAGE_SIZE);
                let got = self.ok(&format!("dev{d}.read for a check"), r);
                self.compare(&format!("dev{d} read-back"), b, first * PAGE_SIZE, &got);
            }
            Observer::Kernel(d) => {
                let first = off / PAGE_SIZE;
                let end = (off + len).div_ceil(PAGE_SIZE);
                self.kernel_check(d, b, first, end - first);
            }
        }
    }

    /// kernel_read over pages `[first, first + n)`, compared with the oracle on the workers.
    fn kernel_check(&mut self, d: usize, b: usize, first: usize, n: usize) {
        let base = self.bufs[b].addr();
        let oracle = &self.oracle[b];
        let bad: Mutex<Option<(usize, u8, u8)>> = Mutex::new(None);
        let seen = AtomicU64::new(0);
        let r = self.devs[d].kernel_read(self.addr(b, first), n * PAGE_SIZE, |va, bytes| {
            let off = va - base;
            seen.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if let Some(i) = (0..bytes.len()).find(|&i| bytes[i] != oracle[off + i]) {
                let mut g = bad.lock().unwrap_or_else(|e| e.into_inner());
                if g.is_none_or(|(o, _, _)| off + i < o) {
                    *g = Some((off + i, bytes[i], oracle[off + i]));
                }
            }
        });
        self.ok(&format!("dev{d}.kernel_read"), r);
        if let Some((at, got, want)) = bad.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.fail(&format!(
                "dev{d}.kernel_read: buffer {b} offset {at:#x} (page {}): got {got:#04x}, expected {want:#04x}",
                at / PAGE_SIZE
            ));
        }
        let seen = seen.into_inner();
        if seen != (n * PAGE_SIZE) as u64 {
            self.fail(&format!(
                "dev{d}.kernel_read over {n} pages visited {seen} bytes"
            ));
        }
    }

    fn check_all(&mut self) {
        let obs = self.observer();
        self.say(format!("full check via {obs:?}"));
        for b in 0..self.bufs.len() {
            let len = self.oracle[b].len();
            self.check(b, 0, len, obs);
        }
    }

    fn step_once(&mut self) {
        let op = match self.rng.below(100) {
            0..=13 => 0,
            14..=20 => 1,
            21..=32 => 2,
            33..=39 => 3,
            40..=51 => 4,
            52..=59 => 5,
            60..=64 => 6,
            65..=69 => 7,
            70..=71 => 8,
            72..=83 => 9,
            84..=89 => 10,
            _ => 11,
        };
        self.ops[op] += 1;
        match op {
            0 => {
                let (b, off, len) = self.byte_range(3);
                let data = self.rng.bytes(len);
                self.say(format!("cpu write buf {b} [{off:#x}, +{len:#x})"));
                self.bufs[b][off..off + len].copy_from_slice(&data);
                self.oracle[b][off..off + len].copy_from_slice(&data);
                let obs = self.observer();
                self.check(b, off, len, obs);
            }
            1 => {
                let (b, off, len) = self.byte_range(64);
                self.say(format!("cpu read buf {b} [{off:#x}, +{len:#x})"));
                self.check(b, off, len, Observer::Cpu);
            }
            2 => {
                let d = self.rng.below(2);
                let (b, first, n) = self.page_range(600);
                let data = self.rng.bytes(n * PAGE_SIZE);
                self.say(format!("dev{d}.write buf {b} pages [{first}, +{n})"));
                let r = self.devs[d].write(self.addr(b, first), &data);
                self.ok("dev.write", r);
                self.oracle[b][first * PAGE_SIZE..(first + n) * PAGE_SIZE].copy_from_slice(&data);
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            3 => {
                let d = self.rng.below(2);
                let (b, first, n) = self.page_range(600);
                self.say(format!("dev{d}.read buf {b} pages [{first}, +{n})"));
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, Observer::Dev(d));
            }
            4 => {
                let (b, first, n) = self.page_range(1100);
                let target = match self.rng.below(3) {
                    0 => Target::System,
                    d => Target::Device(self.devs[d - 1].id()),
                };
                self.say(format!(
                    "hm.migrate buf {b} pages [{first}, +{n}) to {target:?}"
                ));
                let r = self.hm.migrate(self.addr(b, first), n * PAGE_SIZE, target);
                self.ok("hm.migrate", r);
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            5 => {
                let d = self.rng.below(2);
                let (b, first, n) = self.page_range(1100);
                let to_dev = self.rng.below(3) != 0;
                self.say(format!(
                    "dev{d}.migrate_to_{} buf {b} pages [{first}, +{n})",
                    if to_dev { "device" } else { "system" }
                ));
                let (addr, len) = (self.addr(b, first), n * PAGE_SIZE);
                let r = if to_dev {
                    self.devs[d].migrate_to_device(addr, len)
                } else {
                    self.devs[d].migrate_to_system(addr, len)
                };
                self.ok("dev migrate", r);
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            6 => self.exclusive_then_touch(),
            7 => {
                let (b, first, n) = self.page_range(700);
                self.say(format!("hm.discard buf {b} pages [{first}, +{n})"));
                let r = self.hm.discard(self.addr(b, first), n * PAGE_SIZE);
                self.ok("hm.discard", r);
                self.oracle[b][first * PAGE_SIZE..(first + n) * PAGE_SIZE].fill(0);
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            8 => {
                let d = self.rng.below(2);
                self.say(format!("dev{d}.release()"));
                let r = self.devs[d].release();
                self.ok("dev.release", r);
                let used = self.devs[d].used_pages();
                if used != 0 {
                    self.fail(&format!("dev{d} still uses {used} frames after release()"));
                }
                let (b, first, n) = self.page_range(1100);
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            9 => {
                let d = self.rng.below(2);
                let (b, first, n) = self.page_range(1100);
                let k = self.rng.next() as u8;
                self.say(format!(
                    "dev{d}.kernel_write(transform {k}) buf {b} pages [{first}, +{n})"
                ));
                let base = self.bufs[b].addr();
                let seen = AtomicU64::new(0);
                let r =
                    self.devs[d].kernel_write(self.addr(b, first), n * PAGE_SIZE, |va, bytes| {
                        let off = va - base;
                        for (i, x) in bytes.iter_mut().enumerate() {
                            *x = transform(*x, off + i, k);
                        }
                        seen.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    });
                self.ok("kernel_write", r);
                let seen = seen.into_inner();
                if seen != (n * PAGE_SIZE) as u64 {
                    self.fail(&format!("kernel_write over {n} pages visited {seen} bytes"));
                }
                for off in first * PAGE_SIZE..(first + n) * PAGE_SIZE {
                    let x = &mut self.oracle[b][off];
                    *x = transform(*x, off, k);
                }
                let obs = self.observer();
                self.check(b, first * PAGE_SIZE, n * PAGE_SIZE, obs);
            }
            10 => {
                let d = self.rng.below(2);
                let (b, first, n) = self.page_range(1100);
                self.say(format!("dev{d}.kernel_read buf {b} pages [{first}, +{n})"));
                self.kernel_check(d, b, first, n);
            }
            _ => self.check_all(),
        }
    }

    /// `dev.exclusive` on a few pages, then a CPU read or write of one of them, which must
    /// revoke the device's exclusive mapping of that page.
    fn exclusive_then_touch(&mut self) {
        let d = self.rng.below(2);
        let (b, first, n) = self.page_range(8);
        let (addr, len) = (self.addr(b, first), n * PAGE_SIZE);
        let page = first + self.rng.below(n);
        let off = page * PAGE_SIZE + self.rng.below(PAGE_SIZE);
        let write = self.rng.below(2) == 0;
        self.say(format!(
            "dev{d}.exclusive buf {b} pages [{first}, +{n}), then cpu {} at {off:#x}",
            if write { "write" } else { "read" }
        ));
        let r = self.devs[d].exclusive(addr, len);
        self.ok("dev.exclusive", r);
        let r = self.devs[d].check_exclusive(addr, len);
        if !self.ok("check_exclusive", r) {
            self.fail("pages not exclusive right after dev.exclusive()");
        }
        if write {
            let v = self.rng.next() as u8;
            self.bufs[b][off] = v;
            self.oracle[b][off] = v;
        } else {
            let got = self.bufs[b][off];
            self.compare("cpu read of an exclusive page", b, off, &[got]);
        }
        let r = self.devs[d].check_exclusive(self.addr(b, page), PAGE_SIZE);
        if self.ok("check_exclusive", r) {
            self.fail(&format!(
                "page {page} still exclusive to dev{d} after a CPU access"
            ));
        }
        let obs = self.observer();
        self.check(b, first * PAGE_SIZE, len, obs);
    }

    fn run(&mut self, steps: usize) {
        let t0 = Instant::now();
        for step in 0..steps {
            self.step = step;
            self.step_once();
            if step % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1 {
                self.check_all();
            }
        }
        self.step = steps;
        self.check_all();
        let st = self.hm.stats();
        if st.errors != 0 {
            self.fail(&format!(
                "{} runtime errors (HETMEM_DEBUG=1 shows them)",
                st.errors
            ));
        }
        let ops: Vec<String> = OP_NAMES
            .iter()
            .zip(self.ops)
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        eprintln!(
            "differential::{}: seed {:#x}: {steps} steps in {:.1?} ({}); {} pages to device, {} to system, {} evicted, {} cpu faults, {} device faults",
            self.name,
            self.seed,
            t0.elapsed(),
            ops.join(", "),
            st.pages_to_device,
            st.pages_to_system,
            st.pages_evicted,
            st.cpu_faults,
            st.device_faults
        );
    }
}

fn differential(name: &str, kinds: [DeviceKind; 2], seeds: &[u64]) -> anyhow::Result<()> {
    let _watchdog = Watchdog::start(name.to_string());
    let steps: usize = env_or("HETMEM_DIFF_STEPS", DEFAULT_STEPS);
    let fixed = common::env_seed("HETMEM_DIFF_SEED");
    let seeds: Vec<u64> = fixed.map_or_else(|| seeds.to_vec(), |s| vec![s]);
    for seed in seeds {
        World::new(name, kinds, seed)?.run(steps);
    }
    Ok(())
}

#[test]
fn private_and_coherent() -> anyhow::Result<()> {
    differential(
        "private_and_coherent",
        [DeviceKind::Private, DeviceKind::Coherent],
        &[0xd1ff_0001, 0xd1ff_0002],
    )
}

#[test]
fn private_and_private() -> anyhow::Result<()> {
    differential(
        "private_and_private",
        [DeviceKind::Private, DeviceKind::Private],
        &[0xd1ff_0003, 0xd1ff_0004],
    )
}

#[test]
fn coherent_and_coherent() -> anyhow::Result<()> {
    differential(
        "coherent_and_coherent",
        [DeviceKind::Coherent, DeviceKind::Coherent],
        &[0xd1ff_0005],
    )
}

// ------------------------------------------------------------------------------------------
// Injected transfer failures
// ------------------------------------------------------------------------------------------

/// Managed buffer and oracle for the failure-injection test.
struct Injected {
    hm: Hetmem,
    devs: Vec<Device>,
    buf: ManagedBuf,
    oracle: Vec<u8>,
}

impl Injected {
    fn addr(&self, page: usize) -> usize {
        self.buf.addr() + page * PAGE_SIZE
    }

    /// Compares pages `[first, first + n)` through `obs`.
    fn check(&self, what: &str, first: usize, n: usize, obs: Observer) {
        let (off, len) = (first * PAGE_SIZE, n * PAGE_SIZE);
        let got = match obs {
            Observer::Cpu => self.buf[off..off + len].to_vec(),
            Observer::Dev(d) | Observer::Kernel(d) => self.devs[d]
                .read(self.addr(first), len)
                .unwrap_or_else(|e| panic!("{what}: dev{d}.read for a check failed: {e}")),
        };
        if let Some(i) = (0..len).find(|&i| got[i] != self.oracle[off + i]) {
            panic!(
                "{what}: data changed: offset {:#x} (page {}) reads {:#04x} through {obs:?}, expected {:#04x}",
                off + i,
                (off + i) / PAGE_SIZE,
                got[i],
                self.oracle[off + i]
            );
        }
    }

    fn check_everywhere(&self, what: &str) {
        let pages = self.oracle.len() / PAGE_SIZE;
        for obs in [Observer::Dev(0), Observer::Dev(1), Observer::Cpu] {
            self.check(what, 0, pages, obs);
        }
    }

    /// Where `dev` sees the data of pages `[first, first + n)`.
    fn locations(&self, dev: usize, first: usize, n: usize) -> Vec<Location> {
        self.devs[dev]
            .snapshot(self.addr(first), n * PAGE_SIZE)
            .expect("snapshot")
            .iter()
            .map(|s| s.location)
            .collect()
    }

    fn assert_location(&self, what: &str, dev: usize, first: usize, n: usize, want: Location) {
        let l = self.locations(dev, first, n);
        if let Some(i) = l.iter().position(|&x| x != want) {
            panic!(
                "{what}: page {} is at {:?} (seen from dev{dev}), expected {want:?}",
                first + i,
                l[i]
            );
        }
    }

    fn expect_err(what: &str, r: Result<(), Error>) -> Error {
        match r {
            Ok(()) => panic!("{what}: succeeded although a transfer failure was injected"),
            Err(e) => {
                eprintln!("{what}: failed as expected: {e}");
                e
            }
        }
    }
}

fn local(kind: DeviceKind) -> Location {
    match kind {
        DeviceKind::Private => Location::PrivateLocal,
        DeviceKind::Coherent => Location::CoherentLocal,
    }
}

fn injected_failures(kinds: [DeviceKind; 2]) -> anyhow::Result<()> {
    let _watchdog = Watchdog::start(format!("injected_failures({kinds:?})"));
    let dev = |kind| SimConfig {
        kind,
        capacity: DEV_PAGES * PAGE_SIZE,
        workers: KERNEL_WORKERS,
    };
    // Migrate always: this test moves the same blocks back and forth between the CPU and the
    // devices, which thrashing mitigation would pin to system memory, and a pinned block's
    // device writes go to system memory remotely, without the transfer whose failure it
    // injects. The failure handling under test is the mechanism's, whatever the policy.
    let hm = Hetmem::builder()
        .sim_device_with(dev(kinds[0]))
        .sim_device_with(dev(kinds[1]))
        .thrashing(None)
        .build()?;
    let devs = hm.devices();
    // 3 MiB + 5 pages: block 0 has 512 pages, block 1 has 261.
    let pages = 3 * 256 + 5;
    let mut buf = hm.alloc(pages * PAGE_SIZE)?;
    let oracle = Rng::new(0x1de).bytes(pages * PAGE_SIZE);
    buf.copy_from_slice(&oracle);
    let t = Injected {
        hm,
        devs,
        buf,
        oracle,
    };
    t.check_everywhere("initial data");
    t.hm.migrate(t.addr(0), pages * PAGE_SIZE, Target::System)?;
    // A range across the block boundary.
    let (first, n) = (500, 40);
    let (addr, len) = (t.addr(first), n * PAGE_SIZE);

    for (d, &kind) in kinds.iter().enumerate() {
        let id = t.devs[d].id();
        let what = format!("dev{d} ({kind:?})");

        // System memory -> device d: the migration fails and the data stays in system memory.
        t.devs[d].inject_transfer_failures(1);
        Injected::expect_err(
            &format!("{what}: hm.migrate to device"),
            t.hm.migrate(addr, len, Target::Device(id)),
        );
        t.devs[d].inject_transfer_failures(0);
        t.assert_location(
            &format!("{what}: after a failed migration to the device"),
            d,
            first,
            n,
            Location::System,
        );
        t.check(
            &format!("{what}: after a failed migration to the device"),
            first,
            n,
            Observer::Cpu,
        );
        t.hm.migrate(addr, len, Target::Device(id))?;
        t.assert_location(
            &format!("{what}: after the retried migration"),
            d,
            first,
            n,
            local(kind),
        );
        t.check(
            &format!("{what}: after the retried migration"),
            first,
            n,
            Observer::Dev(d),
        );

        // Device d -> system memory: fails, the data stays on the device.
        t.devs[d].inject_transfer_failures(1);
        Injected::expect_err(
            &format!("{what}: hm.migrate to system"),
            t.hm.migrate(addr, len, Target::System),
        );
        // The device's own pages are read without a transfer.
        t.check(
            &format!("{what}: after a failed migration to system memory"),
            first,
            n,
            Observer::Dev(d),
        );
        t.devs[d].inject_transfer_failures(0);
        t.assert_location(
            &format!("{what}: after a failed migration to system memory"),
            d,
            first,
            n,
            local(kind),
        );
        t.check_everywhere(&format!(
            "{what}: after a failed migration to system memory"
        ));

        // Device d -> the other device: fails, the data stays on device d.
        let o = 1 - d;
        t.hm.migrate(addr, len, Target::Device(id))?;
        t.devs[o].inject_transfer_failures(1);
        Injected::expect_err(
            &format!("{what}: dev{o}.migrate_to_device of dev{d}'s pages"),
            t.devs[o].migrate_to_device(addr, len),
        );
        t.devs[o].inject_transfer_failures(0);
        t.assert_location(
            &format!("{what}: after a failed device-to-device migration"),
            d,
            first,
            n,
            local(kind),
        );
        t.check_everywhere(&format!(
            "{what}: after a failed device-to-device migration"
        ));

        // A device write that needs a transfer first: fails without writing.
        t.hm.migrate(t.addr(0), pages * PAGE_SIZE, Target::System)?;
        let (wf, wn) = (8, 16);
        let data = vec![0xa5u8; wn * PAGE_SIZE];
        t.devs[d].inject_transfer_failures(1);
        Injected::expect_err(
            &format!("{what}: dev.write"),
            t.devs[d].write(t.addr(wf), &data),
        );
        t.devs[d].inject_transfer_failures(0);
        t.check_everywhere(&format!("{what}: after a failed dev.write"));

        // The same for a kernel (one block, so one translated piece).
        t.devs[d].inject_transfer_failures(1);
        let r = t.devs[d].kernel_write(t.addr(wf), wn * PAGE_SIZE, |_, bytes| bytes.fill(0x5a));
        Injected::expect_err(&format!("{what}: kernel_write"), r);
        t.devs[d].inject_transfer_failures(0);
        t.check_everywhere(&format!("{what}: after a failed kernel_write"));

        // Eviction that cannot copy back: fill device d (block 0 and 256 pages of block 1),
        // then ask for the rest of block 1.
        t.hm.migrate(t.addr(0), DEV_PAGES * PAGE_SIZE, Target::Device(id))?;
        assert_eq!(
            t.devs[d].used_pages() as usize,
            DEV_PAGES,
            "{what}: device should be full"
        );
        t.devs[d].inject_transfer_failures(1);
        let r = t.hm.migrate(
            t.addr(DEV_PAGES),
            (pages - DEV_PAGES) * PAGE_SIZE,
            Target::Device(id),
        );
        t.devs[d].inject_transfer_failures(0);
        match r {
            Ok(()) => eprintln!(
                "{what}: migration that needed a failing eviction succeeded (eviction retried)"
            ),
            Err(e) => eprintln!("{what}: migration that needed a failing eviction failed: {e}"),
        }
        t.check_everywhere(&format!("{what}: after a failed eviction"));

        // A CPU fault on data only in device d's memory whose first copy back fails: the
        // runtime may retry, but the CPU must see the data.
        t.hm.migrate(addr, len, Target::Device(id))?;
        t.devs[d].inject_transfer_failures(1);
        let got = t.buf[first * PAGE_SIZE..(first + n) * PAGE_SIZE].to_vec();
        t.devs[d].inject_transfer_failures(0);
        assert!(
            got == t.oracle[first * PAGE_SIZE..(first + n) * PAGE_SIZE],
            "{what}: a CPU read after one failed copy back returned wrong data"
        );
        t.check_everywhere(&format!(
            "{what}: after a CPU fault with a failed copy back"
        ));
        t.hm.migrate(t.addr(0), pages * PAGE_SIZE, Target::System)?;
    }
    assert_eq!(
        t.hm.stats().errors,
        0,
        "runtime errors (HETMEM_DEBUG=1 shows them)"
    );
    Ok(())
}

#[test]
fn injected_failures_private_and_coherent() -> anyhow::Result<()> {
    injected_failures([DeviceKind::Private, DeviceKind::Coherent])
}

#[test]
fn injected_failures_private_and_private() -> anyhow::Result<()> {
    injected_failures([DeviceKind::Private, DeviceKind::Private])
}

/// A CPU fault on a page that only a private device holds, while the copy back keeps failing
/// (two failures: the read-back window's migration and the fault's own transfer). The CPU must
/// not see anything but the page's data, and the page must stay managed.
///
/// A failed copy back must not let the CPU see stale data: `Inner::cpu_fault` retries while the
/// faulting thread waits (it once unregistered the page and let the kernel serve the stale
/// system copy).
#[test]
fn cpu_fault_with_failed_copy_back_keeps_data() -> anyhow::Result<()> {
    let _watchdog = Watchdog::start("cpu_fault_with_failed_copy_back_keeps_data".into());
    let hm = Hetmem::builder()
        .sim_device(DeviceKind::Private, 8 << 20)
        .build()?;
    let dev = hm.device(0).expect("one device");
    let mut buf = hm.alloc(4 * PAGE_SIZE)?;
    buf.fill(0x11);
    hm.migrate(buf.addr(), buf.len(), Target::Device(dev.id()))?;
    dev.write(buf.addr(), &[0x22u8; PAGE_SIZE])?;
    dev.inject_transfer_failures(2);
    let (p0, p1) = (buf[0], buf[PAGE_SIZE]);
    dev.inject_transfer_failures(0);
    assert_eq!(
        (p0, p1),
        (0x22, 0x11),
        "CPU read of device-resident pages after failed copies back (expected the data)"
    );
    buf[0] = 0x33;
    let seen = dev.read(buf.addr(), PAGE_SIZE)?[0];
    assert_eq!(
        seen, 0x33,
        "the device does not see the CPU's write: the page left coherence"
    );
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

/// Minimized from the differential runs: one thread, one private device with room for 1.5
/// blocks, one kernel over a 2-block buffer. The kernel's two workers fault one block each, so
/// each evicts the other's block, and now and then the launch fails with ENOMEM although a
/// block always fits (with one worker it never failed). `Inner::evict` used to decide whether it
/// freed anything from the device's global frame count, which the other worker's concurrent
/// reservation cancels out.
#[test]
fn kernel_over_more_than_device_memory_never_reports_enomem() -> anyhow::Result<()> {
    let _watchdog =
        Watchdog::start("kernel_over_more_than_device_memory_never_reports_enomem".into());
    let hm = Hetmem::builder()
        .sim_device_with(SimConfig {
            kind: DeviceKind::Private,
            capacity: DEV_PAGES * PAGE_SIZE,
            workers: 2,
        })
        .build()?;
    let dev = hm.device(0).expect("one device");
    let buf = hm.alloc(2 * BLOCK_PAGES * PAGE_SIZE)?;
    for i in 0..400 {
        if let Err(e) = dev.kernel_read(buf.addr(), buf.len(), |_, _| {}) {
            panic!(
                "launch {i}: kernel_read over 1024 pages on a {DEV_PAGES}-page device failed: {e}"
            );
        }
    }
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}
