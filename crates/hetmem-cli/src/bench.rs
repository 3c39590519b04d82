//! `hetmem bench`: each hetmem figure as a ratio against a native baseline measured in the same
//! process, interleaved run by run, medians of `--runs` runs after one warm-up run.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use hetmem::{DeviceKind, FileMode, FileOptions, Hetmem, ManagedBuf, Target as Dest, PAGE_SIZE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::baseline::{self, AnonMap};

/// The device `hetmem bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// A simulated device: rows a-m against native baselines.
    Sim,
    /// CUDA device 0: rows 1-8 against pinned copies, CUDA managed memory, pinned pipelines
    /// and plain launches (`--gpu-mib`, `--device-mib`, `--budget-s`).
    Cuda,
}
use crate::report::{self, median, percentile, BenchReport, Counters, Row, Target};

const ALL: [char; 13] = [
    'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm',
];

/// Chunk of the file baselines and of file creation.
const CHUNK: usize = 2 << 20;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Buffer size in MiB for the throughput measurements (a-d) and the file scanned by g.
    #[arg(long, default_value_t = 256)]
    pub size_mib: usize,
    /// Measured runs per measurement (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Write the results as JSON to this path (`-` for stdout; the table then goes to stderr).
    #[arg(long)]
    pub json: Option<String>,
    /// Only these measurements, e.g. `--only a,e` (a: first touch, b: CPU read-back from the
    /// device, c: device-fault migration, d: explicit migration, e: fault latency, f: metadata,
    /// g: device scan of a file in the page cache, h: device update + flush of a file larger
    /// than device memory, i: h with `FileOptions::evict_to_file`, j: fault throughput with
    /// 1, 2, 4 (up to 16, as the CPUs allow) threads, k: CPU/device ping-pong with and without
    /// thrashing mitigation, l: sparse and dense device first touch with density prefetch, m:
    /// hot/cold over 4x device memory with access counters). With `--device cuda`, row
    /// numbers: `--only 1,4` (1: GPU first access, 2: CPU read-back, 3: migration, 4:
    /// streaming 4x the cap, 5: random touches over 4x the cap, remote against migrate, 6:
    /// launch overhead, 7: CPU fault throughput, 8: a file 4x the cap scanned warm and cold
    /// (O_DIRECT) and updated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Pages touched per run by the fault-latency measurement (e).
    #[arg(long, default_value_t = 4096)]
    pub fault_pages: usize,
    /// Fault-service threads of the fault-latency context (e); the baseline has one handler.
    /// Default: hetmem's own (`HETMEM_SERVICE_THREADS`, else one per CPU).
    #[arg(long)]
    pub fault_service_threads: Option<usize>,
    /// Device memory in MiB for the file update (h); the file is 4 times as large.
    #[arg(long, default_value_t = 32)]
    pub update_device_mib: usize,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub strict: bool,
    /// Rounds of the ping-pong measurement (k).
    #[arg(long, default_value_t = 1000)]
    pub pingpong_rounds: u32,
    /// Run with tracing on, each context writing `PREFIX.<rows>.json` (what tracing costs:
    /// compare with a run without it).
    #[arg(long)]
    pub trace: Option<String>,
    /// The device: simulated (rows a-m), or CUDA device 0 (rows 1-8, each against the CUDA way
    /// of doing the same work, measured in the same run).
    #[arg(long, value_enum, default_value_t = DeviceArg::Sim)]
    pub device: DeviceArg,
    /// CUDA: data size in MiB of rows 1-3 (first access, read-back, migration); hetmem's
    /// device use for them is capped at this plus 4 MiB, and each CUDA managed allocation must
    /// stay under a quarter of the device's free memory.
    #[arg(long, default_value_t = 2048)]
    pub gpu_mib: usize,
    /// CUDA: hetmem's device memory cap in MiB for the streaming row 4, which streams 4 times
    /// as much, and the random-touch row 5, over 4 times as much.
    #[arg(long, default_value_t = 512)]
    pub device_mib: usize,
    /// CUDA: hetmem launches in flight at once (at most the cap's 2 MiB blocks less one).
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// CUDA: launches per run of the launch-overhead row 6.
    #[arg(long, default_value_t = 2000)]
    pub launches: usize,
    /// CUDA: the whole bench's time budget in seconds. Each row gets a share; past it a row
    /// stops after one measured run, and a row started after the budget is spent is reported
    /// as not run. 0: no budget.
    #[arg(long, default_value_t = 170.0)]
    pub budget_s: f64,
    /// Draw the ratios per row (against managed memory, the PCIe limit and the other
    /// baselines) as a self-contained SVG, or an HTML page when the name ends in `.html`.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// With --plot: draw from this saved `--json` file instead of measuring.
    #[arg(long, requires = "plot")]
    pub from: Option<PathBuf>,
}

/// `builder`, tracing to `PREFIX.<name>.json` when `--trace PREFIX` was given.
fn traced(builder: hetmem::HetmemBuilder, a: &BenchArgs, name: &str) -> hetmem::HetmemBuilder {
    match &a.trace {
        Some(prefix) => builder.trace(format!("{prefix}.{name}.json")),
        None => builder,
    }
}

/// GB/s for `bytes` in `secs`.
pub(crate) fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Sum of the buffer as native-endian u64s (what "the CPU reads the whole buffer" means here).
pub(crate) fn sum_u64(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0u64, |s, c| {
        s.wrapping_add(u64::from_ne_bytes(c.try_into().expect("8 bytes")))
    })
}

/// Word `i` of the pattern.
pub(crate) fn pattern_word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fills `bytes` with a position-dependent pattern.
fn fill_pattern(bytes: &mut [u8]) {
    fill_pattern_at(bytes, 0);
}

/// The pattern from word `first` on.
pub(crate) fn fill_pattern_at(bytes: &mut [u8], first: usize) {
    for (i, c) in bytes.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&pattern_word(first + i).to_ne_bytes());
    }
}

/// Adds one to every native-endian u64.
fn inc_u64(bytes: &mut [u8]) {
    for c in bytes.chunks_exact_mut(8) {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes"));
        c.copy_from_slice(&v.wrapping_add(1).to_ne_bytes());
    }
}

/// `std::env::temp_dir()/hetmem-bench-<pid>/`, removed with everything in it on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!("hetmem-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates `path` with `len` bytes of the pattern, made durable (so no writeback of it runs
/// during the measurements), then reads it once so it sits in the page cache. Returns the
/// pattern's u64 sum.
pub(crate) fn create_pattern_file(path: &Path, len: usize) -> Result<u64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; CHUNK];
    let mut sum = 0u64;
    for off in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - off);
        fill_pattern_at(&mut chunk[..n], off / 8);
        sum = sum.wrapping_add(sum_u64(&chunk[..n]));
        f.write_all_at(&chunk[..n], off as u64)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_data()
        .with_context(|| format!("fdatasync {}", path.display()))?;
    let mut check = 0u64;
    for off in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - off);
        f.read_exact_at(&mut chunk[..n], off as u64)
            .with_context(|| format!("read {}", path.display()))?;
        check = check.wrapping_add(sum_u64(&chunk[..n]));
    }
    ensure!(check == sum, "{} reads back wrong", path.display());
    Ok(sum)
}

/// A pre-faulted buffer of `len` bytes.
fn prefaulted(len: usize, byte: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.fill(byte);
    v
}

/// Pre-faulted buffers for the memcpy baseline.
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    fn new(len: usize) -> Self {
        let mut src = vec![0u8; len];
        fill_pattern(&mut src);
        let mut dst = vec![0u8; len];
        dst.fill(1);
        Self { src, dst }
    }

    /// One memcpy of the whole buffer, in GB/s.
    fn sample(&mut self) -> f64 {
        let t = Instant::now();
        self.dst.copy_from_slice(&self.src);
        black_box(&mut self.dst);
        gbps(self.src.len(), t.elapsed().as_secs_f64())
    }
}

/// Runs one warm-up plus `runs` rounds of `(hetmem, baseline)`, alternating which goes first.
fn sampled(
    runs: usize,
    pb: &ProgressBar,
    mut hetmem: impl FnMut() -> Result<f64>,
    mut base: impl FnMut() -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut hs, mut bs) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for r in 0..=runs {
        let (h, b) = if r % 2 == 0 {
            let h = hetmem()?;
            (h, base()?)
        } else {
            let b = base()?;
            (hetmem()?, b)
        };
        if r > 0 {
            hs.push(h);
            bs.push(b);
        }
        pb.inc(1);
    }
    Ok((hs, bs))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn row(
    id: &str,
    name: &str,
    unit: &str,
    baseline_name: &str,
    target: Target,
    hs: Vec<f64>,
    bs: Vec<f64>,
) -> Row {
    let h = median(&hs);
    let b = (!bs.is_empty()).then(|| median(&bs));
    let ratio = b.map(|b| h / b);
    Row {
        id: id.into(),
        name: name.into(),
        unit: unit.into(),
        hetmem: h,
        baseline: b,
        ratio,
        target,
        pass: target.check_values(h, b),
        baseline_name: baseline_name.into(),
        hetmem_samples: hs,
        baseline_samples: bs,
        counters: None,
        against: None,
        not_built: None,
    }
}

pub(crate) fn with(counters: Option<Counters>, mut r: Row) -> Row {
    r.counters = counters;
    r
}

/// Median-able p50 and p99 series of hetmem and a baseline, one sample per run.
#[derive(Default)]
struct LatencySeries {
    h50: Vec<f64>,
    h99: Vec<f64>,
    b50: Vec<f64>,
    b99: Vec<f64>,
}

impl LatencySeries {
    /// Adds one run's (p50, p99) pairs, unless it is the warm-up.
    fn push(&mut self, keep: bool, h: (f64, f64), b: (f64, f64)) {
        if keep {
            self.h50.push(h.0);
            self.h99.push(h.1);
            self.b50.push(b.0);
            self.b99.push(b.1);
        }
    }
}

/// p50 and p99 of latencies in nanoseconds, in microseconds.
fn p50_p99(lat: &mut [u64]) -> (f64, f64) {
    (
        percentile(lat, 50.0) as f64 / 1e3,
        percentile(lat, 99.0) as f64 / 1e3,
    )
}

/// A CPU-bound thread that spins until dropped: the "busy process beside it" of the fault
/// measurements, which keeps idle virtual CPUs from hiding per-fault costs.
struct Hog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-hog".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes one byte per page: every page faults once.
fn touch_pages(bytes: &mut [u8]) {
    for i in (0..bytes.len()).step_by(PAGE_SIZE) {
        bytes[i] = 1;
    }
}

/// Makes `buf` resident in system memory only, with no device copy left.
pub(crate) fn to_system(hm: &Hetmem, buf: &mut ManagedBuf, dev: &hetmem::Device) -> Result<()> {
    hm.migrate(buf.addr(), buf.len(), Dest::System)?;
    if dev.used_pages() != 0 {
        // A read-only device copy survived: a CPU write invalidates it.
        for i in (0..buf.len()).step_by(PAGE_SIZE) {
            buf[i] = black_box(buf[i]);
        }
    }
    ensure!(
        dev.used_pages() == 0,
        "device still holds {} pages after migrating to system",
        dev.used_pages()
    );
    Ok(())
}

/// j: 4 KiB CPU fault throughput with 1, 2, 4, 8, 16 threads faulting distinct blocks (as many
/// as the CPUs allow, at least 4), each against a raw userfaultfd handler with as many threads.
/// No device is involved. Past `deadline`, each count stops after one measured run.
pub(crate) fn fault_throughput_rows(
    a: &BenchArgs,
    runs: usize,
    pb: &ProgressBar,
    deadline: Option<Instant>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let max = std::thread::available_parallelism().map_or(2, |n| n.get());
    let counts: Vec<usize> = [1, 2, 4, 8, 16]
        .into_iter()
        .filter(|&n| n <= max.max(4))
        .collect();
    let pages = a.fault_pages.max(hetmem::PAGES_PER_BLOCK);
    for n in counts {
        pb.set_message(format!("j: fault throughput, {n} threads"));
        let hm = traced(Hetmem::builder(), a, &format!("j{n}"))
            .fault_around_pages(1)
            .service_threads(n)
            .build()
            .context("build the fault-throughput context")?;
        let (mut hs, mut bs) = (Vec::new(), Vec::new());
        for r in 0..=runs {
            if r > 1 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let hetmem_sample = || -> Result<f64> {
                let buf = hm.alloc(n * pages * PAGE_SIZE)?;
                let start = std::sync::Barrier::new(n + 1);
                let secs = std::thread::scope(|s| {
                    for t in 0..n {
                        let part = &buf[t * pages * PAGE_SIZE..(t + 1) * pages * PAGE_SIZE];
                        let start = &start;
                        s.spawn(move || {
                            start.wait();
                            for i in 0..pages {
                                black_box(part[i * PAGE_SIZE]);
                            }
                        });
                    }
                    start.wait();
                    let t0 = Instant::now();
                    // The scope joins the threads before it returns.
                    t0
                })
                .elapsed()
                .as_secs_f64();
                drop(buf);
                Ok((n * pages) as f64 / secs)
            };
            let base_sample = || -> Result<f64> {
                baseline::uffd_fault_throughput(n, pages)
                    .context("raw userfaultfd throughput baseline")
            };
            let (h, b) = if r % 2 == 0 {
                let h = hetmem_sample()?;
                (h, base_sample()?)
            } else {
                let b = base_sample()?;
                (hetmem_sample()?, b)
            };
            if r > 0 {
                hs.push(h / 1e6);
                bs.push(b / 1e6);
            }
        }
        pb.inc(1);
        rows.push(row(
            &format!("j{n}"),
            &format!(
                "4 KiB CPU fault throughput, {n} threads faulting distinct blocks, {n} service threads"
            ),
            "M faults/s",
            &format!("raw userfaultfd with {n} handler threads (epoll, EPOLLEXCLUSIVE)"),
            Target::AtLeast(0.8),
            hs,
            bs,
        ));
    }
    Ok(rows)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if let (Some(from), Some(plot)) = (&a.from, &a.plot) {
        return crate::plot::from_json(from, plot);
    }
    if a.device == DeviceArg::Cuda {
        return crate::bench_cuda::run(a);
    }
    let sel: Vec<char> = if a.only.is_empty() {
        ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for s in &a.only {
            let s = s.trim().to_ascii_lowercase();
            match s.chars().next() {
                Some(c) if s.len() == 1 && ALL.contains(&c) => v.push(c),
                _ => bail!("--only takes letters a-m, got {s:?}"),
            }
        }
        v
    };
    ensure!(a.runs >= 1, "--runs must be at least 1");
    if a.runs < 5 {
        eprintln!("warning: --runs {} < 5: medians are noisy", a.runs);
    }
    ensure!(a.size_mib >= 4, "--size-mib must be at least 4");
    ensure!(
        a.update_device_mib >= 2,
        "--update-device-mib must be at least 2"
    );
    let len = a.size_mib << 20;
    let runs = a.runs;
    let has = |c: char| sel.contains(&c);

    let steps: u64 = sel.iter().filter(|&&c| c != 'f').count() as u64 * (runs as u64 + 1);
    let pb = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );

    // One context for a-d and f, with a private device that holds the whole buffer.
    let hm = traced(Hetmem::builder(), a, "abcdf")
        .sim_device(DeviceKind::Private, len + (2 << 20))
        .build()
        .context("build the hetmem context (needs userfaultfd)")?;
    let dev = hm.device(0).context("device 0")?;
    let mut rows = Vec::new();
    let last: Cell<Option<Counters>> = Cell::new(None);
    let last2: Cell<Option<Counters>> = Cell::new(None);
    let mut memcpy = if has('b') || has('c') || has('d') {
        Some(Memcpy::new(len))
    } else {
        None
    };

    if has('a') {
        pb.set_message("a: first touch");
        let (hs, bs) = sampled(
            runs,
            &pb,
            || {
                let s0 = hm.stats();
                let t = Instant::now();
                let mut b = hm.alloc(len)?;
                touch_pages(&mut b);
                let s = t.elapsed().as_secs_f64();
                last.set(Some(hm.stats().since(&s0)));
                drop(b);
                Ok(gbps(len, s))
            },
            || {
                let t = Instant::now();
                let mut m = AnonMap::new(len)?;
                touch_pages(m.as_mut_slice());
                let s = t.elapsed().as_secs_f64();
                drop(m);
                Ok(gbps(len, s))
            },
        )?;
        rows.push(with(
            last.take(),
            row(
                "a",
                &format!("first touch, {} MiB (alloc + 1 write/page)", a.size_mib),
                "GB/s",
                "mmap(MAP_PRIVATE|MAP_ANONYMOUS) + 1 write/page",
                Target::AtLeast(0.8),
                hs,
                bs,
            ),
        ));
    }

    // A filled buffer for b-d.
    let mut buf = if has('b') || has('c') || has('d') {
        let mut b = hm.alloc(len)?;
        fill_pattern(&mut b);
        Some(b)
    } else {
        None
    };
    let expected = buf.as_ref().map(|b| sum_u64(b)).unwrap_or(0);

    if has('b') {
        pb.set_message("b: CPU read-back of device-resident data");
        let bref = buf.as_ref().expect("allocated");
        let mc = memcpy.as_mut().expect("allocated");
        let (hs, bs) = sampled(
            runs,
            &pb,
            || {
                hm.migrate(bref.addr(), len, Dest::Device(dev.id()))?;
                ensure!(
                    dev.used_pages() as usize >= len / PAGE_SIZE,
                    "only {} pages on the device after migrating {} there",
                    dev.used_pages(),
                    len / PAGE_SIZE
                );
                let s0 = hm.stats();
                let t = Instant::now();
                let s = sum_u64(bref);
                let secs = t.elapsed().as_secs_f64();
                last.set(Some(hm.stats().since(&s0)));
                ensure!(s == expected, "read-back checksum mismatch");
                Ok(gbps(len, secs))
            },
            || Ok(mc.sample()),
        )?;
        rows.push(with(
            last.take(),
            row(
                "b",
                "CPU read-back from private device memory",
                "GB/s",
                "memcpy between pre-faulted buffers",
                Target::AtLeast(0.5),
                hs,
                bs,
            ),
        ));
    }

    if has('c') {
        pb.set_message("c: device-fault migration");
        let b = buf.as_mut().expect("allocated");
        let mc = memcpy.as_mut().expect("allocated");
        let mut hs = Vec::with_capacity(runs);
        let mut bs = Vec::with_capacity(runs);
        for r in 0..=runs {
            to_system(&hm, b, &dev)?;
            if r % 2 == 1 {
                bs.push(mc.sample());
            }
            let acc = AtomicU64::new(0);
            let s0 = hm.stats();
            let t = Instant::now();
            dev.kernel_read(b.addr(), len, |_, s| {
                acc.fetch_add(sum_u64(s), Ordering::Relaxed);
            })?;
            let secs = t.elapsed().as_secs_f64();
            last.set(Some(hm.stats().since(&s0)));
            ensure!(acc.into_inner() == expected, "device checksum mismatch");
            hs.push(gbps(len, secs));
            if r % 2 == 0 {
                bs.push(mc.sample());
            }
            pb.inc(1);
        }
        hs.remove(0);
        bs.remove(0);
        rows.push(with(
            last.take(),
            row(
                "c",
                "migration to device on device faults (kernel_read)",
                "GB/s",
                "memcpy between pre-faulted buffers",
                Target::AtLeast(0.5),
                hs,
                bs,
            ),
        ));
    }

    if has('d') {
        pb.set_message("d: explicit migration");
        let b = buf.as_mut().expect("allocated");
        let mc = memcpy.as_mut().expect("allocated");
        let (mut to_dev, mut to_sys, mut bs) = (Vec::new(), Vec::new(), Vec::new());
        to_system(&hm, b, &dev)?;
        for r in 0..=runs {
            if r % 2 == 1 {
                bs.push(mc.sample());
            }
            let s0 = hm.stats();
            let t = Instant::now();
            hm.migrate(b.addr(), len, Dest::Device(dev.id()))?;
            let t_dev = t.elapsed().as_secs_f64();
            let s1 = hm.stats();
            ensure!(
                dev.used_pages() as usize >= len / PAGE_SIZE,
                "migration to the device left pages behind"
            );
            let t = Instant::now();
            hm.migrate(b.addr(), len, Dest::System)?;
            let t_sys = t.elapsed().as_secs_f64();
            last.set(Some(s1.since(&s0)));
            last2.set(Some(hm.stats().since(&s1)));
            to_system(&hm, b, &dev)?;
            to_dev.push(gbps(len, t_dev));
            to_sys.push(gbps(len, t_sys));
            if r % 2 == 0 {
                bs.push(mc.sample());
            }
            pb.inc(1);
        }
        ensure!(sum_u64(b) == expected, "data changed across migrations");
        for v in [&mut to_dev, &mut to_sys, &mut bs] {
            v.remove(0);
        }
        rows.push(with(
            last.take(),
            row(
                "d1",
                "hm.migrate to device",
                "GB/s",
                "memcpy between pre-faulted buffers",
                Target::AtLeast(0.5),
                to_dev,
                bs.clone(),
            ),
        ));
        rows.push(with(
            last2.take(),
            row(
                "d2",
                "hm.migrate back to system",
                "GB/s",
                "memcpy between pre-faulted buffers",
                Target::AtLeast(0.5),
                to_sys,
                bs,
            ),
        ));
    }
    drop(buf);
    drop(memcpy);

    if has('e') {
        pb.set_message("e: 4 KiB CPU fault latency");
        let pages = a.fault_pages.max(16);
        let mut builder = traced(Hetmem::builder(), a, "e").fault_around_pages(1);
        if let Some(n) = a.fault_service_threads {
            builder = builder.service_threads(n);
        }
        let hm1 = builder.build().context("build the fault-latency context")?;
        // Per run: hetmem and the raw handler quiet, then both (and the raw handler on a memfd)
        // beside a CPU-bound thread the bench starts and stops itself, so every run measures
        // the same situation.
        let mut quiet = LatencySeries::default();
        let mut hogged = LatencySeries::default();
        let mut memfd = LatencySeries::default();
        let mut floor = LatencySeries::default();
        let floor_refused = Cell::new(false);
        for r in 0..=runs {
            let hetmem_sample = || -> Result<(f64, f64)> {
                let buf = hm1.alloc(pages * PAGE_SIZE)?;
                let mut lat = Vec::with_capacity(pages);
                let s0 = hm1.stats();
                for i in 0..pages {
                    let t = Instant::now();
                    black_box(buf[i * PAGE_SIZE]);
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                last.set(Some(hm1.stats().since(&s0)));
                drop(buf);
                Ok(p50_p99(&mut lat))
            };
            let base_sample = |backing| -> Result<(f64, f64)> {
                let mut lat = baseline::uffd_fault_latencies_ns(pages, backing)
                    .context("raw userfaultfd baseline")?;
                Ok(p50_p99(&mut lat))
            };
            let anon = baseline::Backing::Anonymous;
            // Row e6's baseline needs MINOR faults on shmem (Linux 5.13): without them the row
            // is left out, and the others go on.
            let floor_sample = || match base_sample(baseline::Backing::MemfdPopulated) {
                Ok(f) => Some(f),
                Err(e) => {
                    if !floor_refused.replace(true) {
                        eprintln!("note: row e6 left out: {e:#}");
                    }
                    None
                }
            };
            let keep = r > 0;
            // Alternate which goes first.
            if r % 2 == 0 {
                let h = hetmem_sample()?;
                quiet.push(keep, h, base_sample(anon)?);
                let _hog = Hog::start();
                let h = hetmem_sample()?;
                let b = base_sample(anon)?;
                hogged.push(keep, h, b);
                memfd.push(keep, h, base_sample(baseline::Backing::Memfd)?);
                if let Some(f) = floor_sample() {
                    floor.push(keep, h, f);
                }
            } else {
                let b = base_sample(anon)?;
                quiet.push(keep, hetmem_sample()?, b);
                let _hog = Hog::start();
                let f = floor_sample();
                let m = base_sample(baseline::Backing::Memfd)?;
                let b = base_sample(anon)?;
                let h = hetmem_sample()?;
                hogged.push(keep, h, b);
                memfd.push(keep, h, m);
                if let Some(f) = f {
                    floor.push(keep, h, f);
                }
            }
            pb.inc(1);
        }
        let base = "raw userfaultfd MISSING + UFFDIO_ZEROPAGE handler thread";
        let hog = "beside a CPU-bound thread";
        rows.push(with(
            last.take(),
            row(
                "e1",
                "4 KiB CPU fault latency p50 (read touch, fault-around 1)",
                "us",
                base,
                Target::AtMost(1.3),
                quiet.h50,
                quiet.b50,
            ),
        ));
        rows.push(row(
            "e2",
            "4 KiB CPU fault latency p99 (read touch, fault-around 1)",
            "us",
            base,
            Target::None,
            quiet.h99,
            quiet.b99,
        ));
        rows.push(row(
            "e3",
            &format!("4 KiB CPU fault latency p50, {hog}"),
            "us",
            base,
            Target::AtMost(1.3),
            hogged.h50,
            hogged.b50,
        ));
        rows.push(row(
            "e4",
            &format!("4 KiB CPU fault latency p99, {hog}"),
            "us",
            base,
            Target::AtMost(2.0),
            hogged.h99,
            hogged.b99,
        ));
        rows.push(row(
            "e5",
            &format!("4 KiB CPU fault latency p50, {hog}, against a raw handler on a memfd"),
            "us",
            "raw userfaultfd handler as e, on a shared memfd mapping (shmem, as hetmem's views)",
            Target::None,
            memfd.h50,
            memfd.b50,
        ));
        // The floor of any runtime whose views are shmem: no allocation or clearing on the
        // fault path at all. With e3's baseline, it shows how much of e3's ratio is shmem's.
        if !floor.b50.is_empty() {
            rows.push(row(
            "e6",
            &format!(
                "4 KiB CPU fault latency p50, {hog}, against a raw handler on a populated memfd"
            ),
            "us",
            "raw userfaultfd MINOR + UFFDIO_CONTINUE handler, every page of the memfd allocated before",
            Target::None,
            floor.h50,
            floor.b50,
        ));
        }
        if hm1.stats().errors != 0 {
            eprintln!(
                "warning: the fault-latency context reported {} errors",
                hm1.stats().errors
            );
        }
    }

    if has('j') {
        rows.extend(fault_throughput_rows(a, runs, &pb, None)?);
    }

    if has('k') {
        pb.set_message("k: ping-pong between the CPU and the device");
        let rounds = a.pingpong_rounds.max(4);
        let range = 8 << 20;
        // One run: `rounds` rounds of the CPU, then the device, writing one byte of every
        // page of 8 MiB. Returns rounds per second and the first round in which no page moved
        // (mitigation engaged), if any.
        let ping_pong = |thrashing: Option<hetmem::policy::ThrashingConfig>,
                         name: &str|
         -> Result<(f64, Option<u32>)> {
            let hm = traced(Hetmem::builder(), a, name)
                .sim_device(DeviceKind::Private, 64 << 20)
                .thrashing(thrashing)
                .build()
                .context("build the ping-pong context")?;
            let dev = hm.device(0).context("device 0")?;
            let mut buf = hm.alloc(range)?;
            let mut engaged = None;
            let t0 = Instant::now();
            for round in 0..rounds {
                let before = hm.stats().pages_to_device;
                for p in (0..range).step_by(PAGE_SIZE) {
                    buf[p] = round as u8;
                }
                dev.kernel_write(buf.addr(), range, |_, b| {
                    for p in (0..b.len()).step_by(PAGE_SIZE) {
                        b[p + 1] = b[p];
                    }
                })?;
                if engaged.is_none() && round > 0 && hm.stats().pages_to_device == before {
                    engaged = Some(round);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            ensure!(
                (0..range).step_by(PAGE_SIZE).all(|p| buf[p + 1] == buf[p]),
                "ping-pong: the device's writes are not all visible"
            );
            ensure!(hm.stats().errors == 0, "ping-pong: errors");
            Ok((rounds as f64 / secs, engaged))
        };
        let (mut hs, mut bs, mut eng) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..=runs {
            let on = Some(hetmem::policy::ThrashingConfig::default());
            let (h, b) = if r % 2 == 0 {
                let h = ping_pong(on, "k")?;
                (h, ping_pong(None, "k-always")?)
            } else {
                let b = ping_pong(None, "k-always")?;
                (ping_pong(on, "k")?, b)
            };
            if r > 0 {
                hs.push(h.0);
                bs.push(b.0);
                eng.push(f64::from(h.1.unwrap_or(u32::MAX)));
            }
            pb.inc(1);
        }
        rows.push(row(
            "k1",
            &format!("ping-pong: CPU and device write the same 8 MiB in turn, {rounds} rounds"),
            "rounds/s",
            "the same with thrashing mitigation off (migrate always)",
            Target::AtLeast(5.0),
            hs,
            bs,
        ));
        rows.push(row(
            "k2",
            "ping-pong: first round in which nothing migrated (mitigation engaged)",
            "round",
            "",
            Target::None,
            eng,
            Vec::new(),
        ));
    }

    if has('l') {
        pb.set_message("l: device first touch, sparse and dense");
        let range = 64 << 20;
        let pages = range / PAGE_SIZE;
        // One run: the device reads the pages `pick` selects, one page per read. Returns
        // (pages moved to the device, device faults, pages touched).
        let touch = |density: bool, pick: &dyn Fn(usize) -> bool| -> Result<(u64, u64, u64)> {
            let hm = traced(Hetmem::builder(), a, "l")
                .sim_device(DeviceKind::Private, range + (2 << 20))
                .density_prefetch(density.then(hetmem::policy::DensityConfig::default))
                .build()
                .context("build the first-touch context")?;
            let dev = hm.device(0).context("device 0")?;
            let buf = hm.alloc(range)?;
            hm.migrate(buf.addr(), range, Dest::System)?; // resident in system memory first
            let s0 = hm.stats();
            let mut touched = 0u64;
            for i in (0..pages).filter(|&i| pick(i)) {
                black_box(dev.read(buf.addr() + i * PAGE_SIZE, PAGE_SIZE)?);
                touched += 1;
            }
            let d = hm.stats().since(&s0);
            ensure!(d.errors == 0, "first touch: errors");
            Ok((d.pages_to_device, d.device_faults, touched))
        };
        let sparse = |i: usize| i % 8 == 0;
        let dense = |i: usize| i % 4 != 3;
        let (mut moved, mut touched, mut f_on, mut f_off) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..=runs {
            let (m, _, t) = touch(true, &sparse)?;
            let (_, on, _) = touch(true, &dense)?;
            let (_, off, _) = touch(false, &dense)?;
            if r > 0 {
                moved.push(m as f64);
                touched.push(t as f64);
                f_on.push(on as f64);
                f_off.push(off as f64);
            }
            pb.inc(1);
        }
        rows.push(row(
            "l1",
            "device touches 1 page in 8 of 64 MiB: pages moved (density prefetch on)",
            "pages",
            "pages touched",
            Target::AtMost(2.0),
            moved,
            touched,
        ));
        rows.push(row(
            "l2",
            "device touches 3 pages in 4 of 64 MiB: device faults with density prefetch",
            "faults",
            "the same without prefetch",
            Target::None,
            f_on,
            f_off,
        ));
    }

    if has('m') {
        pb.set_message("m: hot/cold over 4x device memory");
        let cap = 16 << 20;
        let range = 4 * cap;
        let blocks = range / (2 << 20);
        let hot = (blocks / 10).max(1);
        let accesses = 600u64;
        // One run: `accesses` device kernels over one 2 MiB block each, 90% of them on the
        // first `hot` blocks. Returns (pages moved to the device, seconds).
        let hot_cold = |smart: bool| -> Result<(f64, f64)> {
            let mut b = traced(Hetmem::builder(), a, if smart { "m" } else { "m-always" })
                .sim_device(DeviceKind::Private, cap);
            if !smart {
                b = b
                    .thrashing(None)
                    .density_prefetch(None)
                    .access_counters(None);
            }
            let hm = b.build().context("build the hot/cold context")?;
            let dev = hm.device(0).context("device 0")?;
            let mut buf = hm.alloc(range)?;
            fill_pattern(&mut buf);
            if smart {
                // The application's hint: the device reaches this range (cudaMemAdviseSetAccessedBy).
                hm.advise(
                    buf.addr(),
                    range,
                    hetmem::Advice::AccessedBy(dev.id(), true),
                )?;
            }
            let s0 = hm.stats();
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let t0 = Instant::now();
            for _ in 0..accesses {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bi = if x % 10 < 9 {
                    (x >> 8) as usize % hot
                } else {
                    hot + (x >> 8) as usize % (blocks - hot)
                };
                let sum = AtomicU64::new(0);
                dev.kernel_read(buf.addr() + bi * (2 << 20), 2 << 20, |_, bytes| {
                    sum.fetch_add(sum_u64(bytes), Ordering::Relaxed);
                })?;
                black_box(sum.load(Ordering::Relaxed));
            }
            let secs = t0.elapsed().as_secs_f64();
            let d = hm.stats().since(&s0);
            ensure!(d.errors == 0, "hot/cold: errors");
            Ok((d.pages_to_device as f64, secs))
        };
        let (mut hp, mut bp, mut ht, mut bt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..=runs {
            let (h, b) = if r % 2 == 0 {
                let h = hot_cold(true)?;
                (h, hot_cold(false)?)
            } else {
                let b = hot_cold(false)?;
                (hot_cold(true)?, b)
            };
            if r > 0 {
                hp.push(h.0);
                bp.push(b.0);
                ht.push(h.1 * 1e3);
                bt.push(b.1 * 1e3);
            }
            pb.inc(1);
        }
        rows.push(row(
            "m1",
            "hot/cold: 600 device kernels over data 4x device memory, 90% on 10% of the blocks: pages moved (AccessedBy + access counters)",
            "pages",
            "migrate always + LRU, no advice",
            Target::AtMost(0.5),
            hp,
            bp,
        ));
        rows.push(row(
            "m2",
            "hot/cold: the same, time",
            "ms",
            "migrate always + LRU, no advice",
            Target::None,
            ht,
            bt,
        ));
    }

    if has('f') {
        rows.push(row(
            "f",
            "metadata per managed page",
            "B/page",
            "none (reported)",
            Target::None,
            vec![hm.metadata_bytes_per_page()],
            Vec::new(),
        ));
    }
    let tmp = if has('g') || has('h') || has('i') {
        Some(TempDir::new()?)
    } else {
        None
    };

    if has('g') {
        pb.set_message("g: device scan of a file (warm page cache)");
        let path = tmp.as_ref().expect("created").0.join("g.bin");
        let expected = create_pattern_file(&path, len)?;
        let mut rd = prefaulted(len, 1);
        let mut cp = prefaulted(len, 2);
        let (hs, bs) = sampled(
            runs,
            &pb,
            || {
                // A fresh mapping each run: every page comes from the file (device faults
                // pread it straight into device memory).
                let acc = AtomicU64::new(0);
                let s0 = hm.stats();
                let t = Instant::now();
                let m = hm.map_file(&path, 0, len, FileMode::ReadOnly)?;
                dev.kernel_read(m.addr(), len, |_, s| {
                    acc.fetch_add(sum_u64(s), Ordering::Relaxed);
                })?;
                let secs = t.elapsed().as_secs_f64();
                last.set(Some(hm.stats().since(&s0)));
                drop(m);
                ensure!(acc.into_inner() == expected, "file scan checksum mismatch");
                Ok(gbps(len, secs))
            },
            || {
                let t = Instant::now();
                let f = File::open(&path)?;
                f.read_exact_at(&mut rd, 0)?;
                cp.copy_from_slice(&rd);
                black_box(&mut cp);
                let secs = t.elapsed().as_secs_f64();
                Ok(gbps(len, secs))
            },
        )?;
        ensure!(sum_u64(&cp) == expected, "baseline read the file wrong");
        drop((rd, cp));
        let _ = std::fs::remove_file(&path);
        rows.push(with(
            last.take(),
            row(
                "g",
                &format!(
                    "device scan of a {} MiB file, warm page cache (map_file ReadOnly + kernel_read sum)",
                    a.size_mib
                ),
                "GB/s",
                "pread into a pre-faulted buffer + memcpy to another",
                Target::AtLeast(0.7),
                hs,
                bs,
            ),
        ));
    }

    for (id, evict_to_file) in [('h', false), ('i', true)] {
        if !has(id) {
            continue;
        }
        pb.set_message(format!(
            "{id}: device update + flush of a file 4x device memory"
        ));
        let dlen = a.update_device_mib << 20;
        let flen = 4 * dlen;
        let hm2 = traced(Hetmem::builder(), a, &id.to_string())
            .sim_device(DeviceKind::Private, dlen)
            .build()
            .context("build the file-update context")?;
        let dev2 = hm2.device(0).context("device 0")?;
        let path = tmp.as_ref().expect("created").0.join("h.bin");
        create_pattern_file(&path, flen)?;
        let mut chunk = prefaulted(CHUNK, 1);
        // Increments applied to every word so far, by either side (warm-up included).
        let incs = Cell::new(0u64);
        let (hs, bs) = sampled(
            runs,
            &pb,
            || {
                let s0 = hm2.stats();
                let t = Instant::now();
                let opts = FileOptions::new(FileMode::Shared).evict_to_file(evict_to_file);
                let m = hm2.map_file_with(&path, 0, flen, opts)?;
                dev2.kernel_write(m.addr(), flen, |_, s| inc_u64(s))?;
                m.flush()?;
                let secs = t.elapsed().as_secs_f64();
                last.set(Some(hm2.stats().since(&s0)));
                drop(m);
                incs.set(incs.get() + 1);
                // Untimed: the next run starts with a clean page cache, as the baseline's does.
                File::open(&path)?.sync_data()?;
                Ok(gbps(flen, secs))
            },
            || {
                let t = Instant::now();
                let f = OpenOptions::new().read(true).write(true).open(&path)?;
                for off in (0..flen).step_by(CHUNK) {
                    let n = CHUNK.min(flen - off);
                    f.read_exact_at(&mut chunk[..n], off as u64)?;
                    inc_u64(&mut chunk[..n]);
                    f.write_all_at(&chunk[..n], off as u64)?;
                }
                let secs = t.elapsed().as_secs_f64();
                incs.set(incs.get() + 1);
                f.sync_data()?;
                Ok(gbps(flen, secs))
            },
        )?;
        // Every word of the file went up by one per run, whichever side ran it.
        let f = File::open(&path)?;
        let n = incs.get();
        for off in (0..flen).step_by(CHUNK) {
            let len = CHUNK.min(flen - off);
            f.read_exact_at(&mut chunk[..len], off as u64)?;
            for (i, c) in chunk[..len].chunks_exact(8).enumerate() {
                let got = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
                let want = pattern_word(off / 8 + i).wrapping_add(n);
                ensure!(
                    got == want,
                    "file update: word {} is {got:#x}, expected {want:#x}",
                    off / 8 + i
                );
            }
        }
        drop(f);
        let _ = std::fs::remove_file(&path);
        if hm2.stats().errors != 0 {
            eprintln!(
                "warning: the file-update context reported {} errors",
                hm2.stats().errors
            );
        }
        rows.push(with(
            last.take(),
            row(
                &id.to_string(),
                &format!(
                    "device update of a {} MiB file, 4x device memory (map Shared{} + kernel_write +1/u64 + flush)",
                    flen >> 20,
                    if evict_to_file { ", evict_to_file" } else { "" }
                ),
                "GB/s",
                "per 2 MiB: pread, +1/u64, pwrite (no fdatasync: flush is msync-like)",
                Target::None,
                hs,
                bs,
            ),
        ));
    }
    drop(tmp);

    pb.finish_and_clear();
    if hm.stats().errors != 0 {
        eprintln!(
            "warning: the hetmem context reported {} errors",
            hm.stats().errors
        );
    }

    let all_pass = rows.iter().all(|r| r.pass != Some(false));
    let report = BenchReport {
        tool: "hetmem bench",
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        size_mib: a.size_mib,
        runs,
        uffd_features: hm.uffd_features().into_iter().map(String::from).collect(),
        rows,
        all_pass,
    };
    let header = format!(
        "hetmem bench: {} MiB buffers, median of {} runs after 1 warm-up, kernel {}, {} CPUs\n",
        report.size_mib, report.runs, report.kernel, report.cpus
    );
    let text = format!("{header}{}", report::table(&report.rows));
    match a.json.as_deref() {
        Some("-") => {
            eprint!("{text}");
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Some(path) => {
            print!("{text}");
            std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("write {path}"))?;
            println!("JSON written to {path}");
        }
        None => print!("{text}"),
    }
    if let Some(path) = &a.plot {
        let title = "hetmem bench (simulated device): hetmem against native baselines";
        let sub = header.trim().to_string();
        crate::plot::write(path, title, &sub, &report.rows, None)?;
        println!("plot written to {}", path.display());
    }
    if a.strict && !all_pass {
        bail!("some targets were missed");
    }
    Ok(())
}
