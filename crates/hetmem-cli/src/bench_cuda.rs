//! `hetmem bench --device cuda`: hetmem on CUDA device 0 against the CUDA programmer's own
//! ways of doing the same work, all measured in the same run on the same GPU (issue 13):
//! pinned `cuMemcpyAsync` (the PCIe limit), CUDA managed memory (`cuMemAllocManaged`,
//! fault-driven and with `cuMemPrefetchAsync`), a hand-written double-buffered pinned
//! pipeline, and plain `cuLaunchKernel`. Each row is the median of `--runs` runs after one
//! warm-up, the variants' order rotating run by run.
//!
//! 1. GPU first access to CPU-written data: one `hetmem_sum_u64` launch per 2 MiB block over
//!    declared read ranges, `--in-flight` at once, against a pinned copy of the same bytes and
//!    against one sum kernel over managed memory the CPU just wrote (fault-driven).
//! 2. The CPU reads data a GPU launch just wrote: hetmem's CPU faults bring it back, against
//!    managed memory's CPU faults, and against a pinned copy back plus the same CPU read.
//! 3. Explicit migration both ways: `Hetmem::migrate` against pinned copies and managed
//!    prefetches.
//! 4. The GPU streams data 4 times hetmem's device cap (read, then read-write): eviction and
//!    migration under launches per block, against a double-buffered pinned pipeline (two device
//!    buffers, two streams: copy in, kernel, copy out, overlapped). 4c repeats the read with
//!    `Advice::ReadMostly`, under which an evicted block is dropped instead of copied back.
//! 5. Random 4 KiB GPU touches over data 4 times the cap (`hetmem_touch_random`, one 8-byte
//!    read per random page): one launch over the whole range placed `Remote` (read in system
//!    memory over the link, nothing migrates), against migrate-on-demand: a launch per touch
//!    over its random 2 MiB block placed `Migrate` (the block migrates in, evicting). Both sums
//!    are checked against the CPU's replay of the same random sequence.
//! 6. Launch overhead with a resident 2 MiB declared range against a plain launch.
//! 7. CPU fault service throughput with 1..16 threads (no GPU: the simulated bench's j rows).
//! 8. File data on the GPU, a file 4 times the cap: a launch per block scans it (8a: warm page
//!    cache; 8b: cold, O_DIRECT: hetmem reads straight into its registered backing pages, the
//!    pinned staging of the copy) or adds 1 to every byte and `sync`s (8c), against a
//!    double-buffered pipeline that `pread`s into pinned staging (with O_DIRECT for 8b), copies,
//!    runs the same kernel (copies back and `pwrite`s for 8c).
//!
//! Against a fake driver (`scripts/fake-cuda-check.sh`) the rows run and verify but measure
//! nothing about a GPU; the report then says so (`warning`), and so does the plot.
//!
//! Managed allocations stay under a quarter of the device's free memory (`ManagedBuffer`
//! refuses more): oversubscribed managed memory can hang the GPU. hetmem's own device use is
//! capped by its backends: `--gpu-mib` + 4 MiB for rows 1-3 and 6, `--device-mib` for rows 4 and 5.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use hetmem::{
    DeclaredAccess, Device, FileMode, FileOptions, Hetmem, Launch, ManagedBuf, Target as Dest,
    PAGE_SIZE,
};
use hetmem_cuda::{
    kernels, Cuda, CudaBackend, CudaBuilderExt, CudaLauncher, DeviceBuffer, DevicePtr, DeviceSpan,
    Function, HostMem, KernelArgs, LaunchConfig, Location, ManagedBuffer, Module, PinnedBuffer,
    Stream, MAX_FREE_FRACTION,
};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::bench::{
    create_pattern_file, fault_throughput_rows, fill_pattern_at, gbps, pattern_word, row, sum_u64,
    to_system, with, BenchArgs, TempDir,
};
use crate::report::{self, Counters, Row, Target};

/// One launch's range, and one piece of the pipeline: a block of hetmem's.
const BLOCK: usize = 2 << 20;

/// Slots of the sums buffer (one u64 per block of a pass): one 2 MiB chunk of them.
const SUM_SLOTS: usize = BLOCK / 8;

/// The rows, with their share of the time budget (relative weights, from the expected cost).
const ROWS: [(u32, f64); 8] = [
    (1, 3.0),
    (2, 2.0),
    (3, 2.0),
    (4, 4.0),
    (5, 2.0),
    (6, 0.5),
    (7, 2.0),
    (8, 4.0),
];

/// The kernels the bench launches, from the shipped PTX.
struct Kernels {
    _module: Module,
    empty: Function,
    sum: Function,
    write: Function,
    add: Function,
    touch: Function,
}

/// A kernel over one block of hetmem's, launched over a declared range.
#[derive(Clone, Copy)]
enum BlockKernel {
    /// `hetmem_sum_u64`, adding into the u64 at this address of the sums buffer (read).
    Sum(DevicePtr),
    /// `hetmem_write_u64` of this value (write).
    Write(u64),
    /// `hetmem_add_u8` of this value (read-write).
    Add(u8),
    /// `hetmem_empty` (declared read, touches nothing).
    Empty,
}

/// The GPU side shared by the rows.
struct Gpu {
    cuda: Cuda,
    k: Kernels,
    launcher: CudaLauncher,
    streams: [Stream; 2],
    /// One u64 per block of a pass: what the sum kernels add into.
    sums: DeviceBuffer,
    /// Per-block kernels: 256 blocks of 256 threads, grid-stride over 2 MiB.
    block_cfg: LaunchConfig,
}

/// Grid-stride launch shape over `n` elements (a whole managed buffer).
fn whole_cfg(n: u64) -> LaunchConfig {
    LaunchConfig::for_elements(n, 256, 4096)
}

impl Gpu {
    fn new(cuda: &Cuda) -> Result<Gpu> {
        let module = Module::from_ptx(cuda, kernels::PTX).context("load the shipped kernels")?;
        let f = |n: &str| module.function(n).with_context(|| format!("kernel {n}"));
        let k = Kernels {
            empty: f(kernels::names::EMPTY)?,
            sum: f(kernels::names::SUM_U64)?,
            write: f(kernels::names::WRITE_U64)?,
            add: f(kernels::names::ADD_U8)?,
            touch: f(kernels::names::TOUCH_RANDOM)?,
            _module: module,
        };
        Ok(Gpu {
            cuda: cuda.clone(),
            k,
            launcher: CudaLauncher::new(cuda).context("a launch stream")?,
            streams: [Stream::new(cuda)?, Stream::new(cuda)?],
            sums: DeviceBuffer::new(cuda, BLOCK).context("the sums buffer")?,
            block_cfg: LaunchConfig::linear(256, 256),
        })
    }

    /// Zeroes the sums.
    fn zero_sums(&self) -> Result<()> {
        self.streams[0].memset_d8(self.sums.whole(), 0)?;
        self.streams[0].synchronize()?;
        Ok(())
    }

    /// The first `n` sums, added up.
    fn read_sums(&self, n: usize) -> Result<u64> {
        let mut v = vec![0u8; n * 8];
        self.streams[0].copy_d2h_blocking(&mut v, self.sums.span(0, n * 8)?)?;
        Ok(sum_u64(&v))
    }

    /// The address of the first of `n` sum slots (checked: the rest follow it).
    fn slots(&self, n: usize) -> Result<DevicePtr> {
        ensure!(
            n <= SUM_SLOTS,
            "{n} blocks in one pass: at most {SUM_SLOTS}"
        );
        Ok(self.sums.span(0, n.max(1) * 8)?.ptr())
    }

    /// Waits for both streams.
    fn sync(&self) -> Result<()> {
        for s in &self.streams {
            s.synchronize()?;
        }
        Ok(())
    }
}

/// Enqueues `hetmem_sum_u64` over `data` (u64s), adding into the first u64 of `out`.
#[allow(unsafe_code)]
fn enqueue_sum(
    g: &Gpu,
    stream: &Stream,
    cfg: &LaunchConfig,
    data: DeviceSpan<'_>,
    out: DeviceSpan<'_>,
) -> Result<()> {
    ensure!(data.len() % 8 == 0 && out.len() >= 8, "sum: bad spans");
    let mut args = KernelArgs::new();
    args.ptr(data.ptr())
        .arg((data.len() / 8) as u64)
        .ptr(out.ptr());
    // SAFETY: hetmem_sum_u64 takes (const u64*, u64, u64*): it reads data.len() / 8 words at
    // data's address and atomically adds into the one u64 at out's. Both spans are
    // bounds-checked views of owners that outlive the bench's passes (device buffers, managed
    // or pinned memory, whose owners synchronise the context before they free them).
    unsafe { stream.launch(&g.k.sum, cfg, &args) }?;
    Ok(())
}

/// Enqueues `hetmem_write_u64(data, len / 8, v)`.
#[allow(unsafe_code)]
fn enqueue_write(
    g: &Gpu,
    stream: &Stream,
    cfg: &LaunchConfig,
    data: DeviceSpan<'_>,
    v: u64,
) -> Result<()> {
    ensure!(data.len() % 8 == 0, "write: bad span");
    let mut args = KernelArgs::new();
    args.ptr(data.ptr()).arg((data.len() / 8) as u64).arg(v);
    // SAFETY: hetmem_write_u64 takes (u64*, u64, u64) and writes exactly data.len() / 8 words
    // at data's address: a bounds-checked span of an owner that outlives the pass (see
    // enqueue_sum); the CPU does not touch that memory until the stream is synchronised.
    unsafe { stream.launch(&g.k.write, cfg, &args) }?;
    Ok(())
}

/// Enqueues `hetmem_add_u8(data, len, v)`.
#[allow(unsafe_code)]
fn enqueue_add(
    g: &Gpu,
    stream: &Stream,
    cfg: &LaunchConfig,
    data: DeviceSpan<'_>,
    v: u8,
) -> Result<()> {
    let mut args = KernelArgs::new();
    args.ptr(data.ptr()).arg(data.len() as u64).arg(v);
    // SAFETY: hetmem_add_u8 takes (u8*, u64, u8) and updates exactly data.len() bytes at
    // data's address, a bounds-checked span of a device buffer that outlives the pass.
    unsafe { stream.launch(&g.k.add, cfg, &args) }?;
    Ok(())
}

/// Enqueues `hetmem_empty`.
#[allow(unsafe_code)]
fn enqueue_empty(g: &Gpu, stream: &Stream) -> Result<()> {
    // SAFETY: hetmem_empty takes no parameters and touches no memory.
    unsafe { stream.launch(&g.k.empty, &LaunchConfig::single(), &KernelArgs::new()) }?;
    Ok(())
}

/// Launches `kernel` over the block at `addr` (`len` bytes) of hetmem's memory on `dev`,
/// declared as the kernel uses it.
#[allow(unsafe_code)]
fn hetmem_launch(
    g: &Gpu,
    dev: &Device,
    addr: usize,
    len: usize,
    kernel: BlockKernel,
) -> Result<Launch> {
    let declared = [match kernel {
        BlockKernel::Sum(_) | BlockKernel::Empty => DeclaredAccess::read(addr, len),
        BlockKernel::Write(_) | BlockKernel::Add(_) => DeclaredAccess::write(addr, len),
    }];
    let (f, cfg) = match kernel {
        BlockKernel::Sum(_) => (&g.k.sum, g.block_cfg),
        BlockKernel::Write(_) => (&g.k.write, g.block_cfg),
        BlockKernel::Add(_) => (&g.k.add, g.block_cfg),
        BlockKernel::Empty => (&g.k.empty, LaunchConfig::single()),
    };
    // SAFETY: each kernel's arguments are packed as kernels.cu declares its parameters
    // (pointer, u64 count, then u64* / u64 / u8; none for hetmem_empty). A kernel touches the
    // `len` bytes of its one declared range at the device address the runtime gives
    // (`contiguous`: one run, within one block), as declared (sum reads; write and add write),
    // and the sum's one u64 in the bench's sums buffer, a device buffer that outlives every
    // launch.
    let launch = unsafe {
        g.launcher
            .launch(dev, f, &cfg, &declared, |resident, args| {
                let p = hetmem_cuda::contiguous(resident, 0).ok_or(hetmem::Error::Invalid(
                    "a block is not one run on the device",
                ))?;
                match kernel {
                    BlockKernel::Sum(out) => {
                        args.ptr(p).arg((len / 8) as u64).ptr(out);
                    }
                    BlockKernel::Write(v) => {
                        args.ptr(p).arg((len / 8) as u64).arg(v);
                    }
                    BlockKernel::Add(v) => {
                        args.ptr(p).arg(len as u64).arg(v);
                    }
                    BlockKernel::Empty => {}
                }
                Ok(())
            })
            .context("a declared-access launch")?
    };
    Ok(launch)
}

/// One pass over `[base, base + len)`: a launch per block, `window` in flight, `kernel(i)`
/// for block `i`; returns when all have completed.
fn hetmem_pass(
    g: &Gpu,
    dev: &Device,
    base: usize,
    len: usize,
    window: usize,
    kernel: impl Fn(usize) -> BlockKernel,
) -> Result<()> {
    let mut running: VecDeque<Launch> = VecDeque::with_capacity(window);
    for (i, start) in (0..len).step_by(BLOCK).enumerate() {
        if running.len() >= window {
            running.pop_front().map(Launch::wait).transpose()?;
        }
        running.push_back(hetmem_launch(
            g,
            dev,
            base + start,
            BLOCK.min(len - start),
            kernel(i),
        )?);
    }
    for l in running {
        l.wait()?;
    }
    Ok(())
}

/// Row 5's remote launch shape: enough threads to keep many reads over the link in flight.
const TOUCH_GRID: (u32, u32) = (1024, 256);

/// Row 5 sizes each run's touch count from the run before, so that a run takes about this
/// long whatever the link does (the rate is unknown: a few million to hundreds of millions of
/// touches per second).
const TOUCH_RUN_S: f64 = 0.5;

/// splitmix64: the kernels' seed mixer, and the bench's own random numbers.
fn splitmix64(v: u64) -> u64 {
    let mut z = v.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sum `hetmem_touch_random(p, words, touches, seed, out)` adds into `*out` with `threads`
/// threads, replayed on the CPU (the same sequence as kernels.cu; `word(i)` is word `i` of `p`),
/// split over the CPUs.
fn touch_sum(
    words: u64,
    touches: u64,
    threads: u64,
    seed: u64,
    word: &(impl Fn(u64) -> u64 + Sync),
) -> Result<u64> {
    let pages = words >> 9;
    if pages == 0 {
        return Ok(0);
    }
    let threads = threads.min(touches);
    let one = |t: u64| {
        let mut x = splitmix64(seed.wrapping_add(t)) | 1;
        let mut s = 0u64;
        let mut i = t;
        while i < touches {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s = s.wrapping_add(word((x % pages) * 512 + (x >> 55)));
            i += threads;
        }
        s
    };
    // Small replays (row 5's one-touch launches) on this thread; large ones over the CPUs.
    let workers = if touches < 1 << 16 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
    };
    if workers == 1 {
        return Ok((0..threads).fold(0u64, |s, t| s.wrapping_add(one(t))));
    }
    let per = threads.div_ceil(workers).max(1);
    std::thread::scope(|sc| {
        let parts: Vec<_> = (0..threads)
            .step_by(per as usize)
            .map(|t0| {
                sc.spawn(move || {
                    (t0..(t0 + per).min(threads)).fold(0u64, |s, t| s.wrapping_add(one(t)))
                })
            })
            .collect();
        parts.into_iter().try_fold(0u64, |s, h| {
            h.join()
                .map(|x| s.wrapping_add(x))
                .map_err(|_| anyhow::anyhow!("a touch replay thread panicked"))
        })
    })
}

/// The next run's count: `n` scaled so that a run takes about [`TOUCH_RUN_S`] at the rate just
/// measured, within `[lo, hi]`.
fn rescale(n: u64, secs: f64, lo: u64, hi: u64) -> u64 {
    ((n as f64 * TOUCH_RUN_S / secs.max(1e-6)) as u64).clamp(lo, hi)
}

/// Launches `hetmem_touch_random` with `touches` touches over the `len` bytes at `addr`,
/// declared read and placed as `placement`, adding into the u64 at `out`.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn touch_launch(
    g: &Gpu,
    launcher: &CudaLauncher,
    dev: &Device,
    (addr, len): (usize, usize),
    placement: hetmem::LaunchPlacement,
    cfg: &LaunchConfig,
    (touches, seed): (u64, u64),
    out: DevicePtr,
) -> Result<Launch> {
    let declared = [DeclaredAccess::read(addr, len).placed(placement)];
    // SAFETY: hetmem_touch_random takes (const u64*, u64, u64, u64, u64*), packed so. It reads
    // only words below (len / 8) / 512 * 512 from the one pointer it is given: the declared
    // range's address on the device (its registered backing view for a remote run, one
    // contiguous run; its device memory for a migrated block), read as declared. It writes
    // only the u64 at `out`, in the bench's sums buffer, a device buffer that outlives every
    // launch.
    let launch = unsafe {
        launcher
            .launch(dev, &g.k.touch, cfg, &declared, |resident, args| {
                let p = launcher
                    .range_address(resident, 0)
                    .or_else(|| hetmem_cuda::contiguous(resident, 0))
                    .ok_or(hetmem::Error::Invalid(
                        "the touched range is not one run the device can reach",
                    ))?;
                args.ptr(p)
                    .arg((len / 8) as u64)
                    .arg(touches)
                    .arg(seed)
                    .ptr(out);
                Ok(())
            })
            .context("a random-touch launch")?
    };
    Ok(launch)
}

/// The bytes of CPU-addressable CUDA memory (managed or pinned), after waiting for all work
/// in the context, so that no kernel or copy touches them while the slice is read.
#[allow(unsafe_code)]
fn host_bytes<'a>(g: &Gpu, m: &'a impl HostMem) -> Result<&'a [u8]> {
    g.cuda.synchronize()?;
    // SAFETY: `m` owns `m.len()` bytes of CPU-addressable memory (managed memory, or pinned
    // memory from cuMemHostAlloc) that stay mapped while it lives, which the borrow ensures.
    // No GPU work touches them now (the context was just synchronised), and the bench enqueues
    // none, and writes none through `m`, while the slice is alive: it only reads it.
    Ok(unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) })
}

/// Opens `path` for the pipeline, with O_DIRECT if `direct`, writable if `write`.
fn open_file(path: &std::path::Path, direct: bool, write: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// Drops `path`'s pages from the page cache (written back first), so the next read is cold.
#[allow(unsafe_code)]
fn drop_page_cache(path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    f.sync_data()?;
    // SAFETY: posix_fadvise takes a descriptor we own and plain integers.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(r == 0, "posix_fadvise(DONTNEED): errno {r}");
    Ok(())
}

/// Pinned memory `[off, off + len)` as a pointer, checked to lie inside `m`.
fn pinned_range(m: &PinnedBuffer, off: usize, len: usize) -> Result<*mut u8> {
    ensure!(
        off.checked_add(len).is_some_and(|end| end <= m.len()),
        "pinned range out of bounds"
    );
    Ok(m.as_ptr().wrapping_add(off))
}

/// `pread`s `len` bytes of `f` at `at` into pinned memory `[off, off + len)`. The caller has
/// synchronised the stream that last used those bytes, so no GPU work touches them meanwhile.
#[allow(unsafe_code)]
fn read_into_pinned(
    f: &std::fs::File,
    m: &PinnedBuffer,
    off: usize,
    len: usize,
    at: u64,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let p = pinned_range(m, off, len)?;
    // SAFETY: `[p, p + len)` lies inside the pinned allocation (`pinned_range`), which stays
    // mapped while `m` is borrowed; no GPU work uses it (the caller's synchronisation) and no
    // other slice of it is alive while this one is.
    f.read_exact_at(unsafe { std::slice::from_raw_parts_mut(p, len) }, at)?;
    Ok(())
}

/// `pwrite`s pinned memory `[off, off + len)` to `f` at `at`; the caller has synchronised the
/// stream whose copy filled it.
#[allow(unsafe_code)]
fn write_from_pinned(
    f: &std::fs::File,
    m: &PinnedBuffer,
    off: usize,
    len: usize,
    at: u64,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let p = pinned_range(m, off, len)?;
    // SAFETY: as in `read_into_pinned`; the bytes are only read.
    f.write_all_at(unsafe { std::slice::from_raw_parts(p, len) }, at)?;
    Ok(())
}

/// Adds `k` to every byte of `w` (modulo 256 each), as `hetmem_add_u8` does.
fn add_bytes(w: u64, k: u8) -> u64 {
    const H: u64 = 0x8080_8080_8080_8080;
    let y = u64::from(k) * 0x0101_0101_0101_0101;
    ((w & !H) + (y & !H)) ^ ((w ^ y) & H)
}

/// Checks that `bytes`, the pattern from word `first` on, had `k` added to every byte.
fn check_added(bytes: &[u8], first: usize, k: u8, what: &str) -> Result<()> {
    for (i, c) in bytes.chunks_exact(8).enumerate() {
        let got = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        let want = add_bytes(pattern_word(first + i), k);
        ensure!(
            got == want,
            "{what}: word {} is {got:#x}, expected {want:#x}",
            first + i
        );
    }
    Ok(())
}

/// Runs every variant once as a warm-up, then `runs` times, rotating which goes first; each
/// variant returns one or more figures per run. Past `deadline` (after the warm-up and at least
/// one measured run) it stops early. Returns, per variant, per figure, the measured samples.
#[allow(clippy::type_complexity)]
fn sample(
    runs: usize,
    deadline: Option<Instant>,
    variants: &mut [&mut dyn FnMut() -> Result<Vec<f64>>],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let n = variants.len();
    let mut out: Vec<Vec<Vec<f64>>> = vec![Vec::new(); n];
    for r in 0..=runs {
        if r > 1 && deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("  (time share spent: {} of {runs} runs measured)", r - 1);
            break;
        }
        for j in 0..n {
            let i = (j + r) % n;
            let v = variants[i]()?;
            if r > 0 {
                if out[i].len() < v.len() {
                    out[i].resize(v.len(), Vec::new());
                }
                for (k, x) in v.into_iter().enumerate() {
                    out[i][k].push(x);
                }
            }
        }
    }
    Ok(out)
}

/// Samples of figure `k` of variant `i`.
fn col(s: &[Vec<Vec<f64>>], i: usize, k: usize) -> Vec<f64> {
    s.get(i).and_then(|v| v.get(k)).cloned().unwrap_or_default()
}

/// `row` with the baseline's kind set (for the plot).
#[allow(clippy::too_many_arguments)]
fn row_vs(
    id: &str,
    name: &str,
    unit: &str,
    baseline_name: &str,
    against: &str,
    target: Target,
    hs: Vec<f64>,
    bs: Vec<f64>,
) -> Row {
    let mut r = row(id, name, unit, baseline_name, target, hs, bs);
    r.against = Some(against.into());
    r
}

/// Shares of the time budget: the deadline of each row, from the weights of the rows chosen.
struct Budget {
    start: Instant,
    total: Option<Duration>,
    weight_total: f64,
    weight_done: f64,
}

impl Budget {
    fn new(budget_s: f64, chosen: &[u32]) -> Budget {
        let weight_total = ROWS
            .iter()
            .filter(|(r, _)| chosen.contains(r))
            .map(|(_, w)| w)
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        Budget {
            start: Instant::now(),
            total: (budget_s > 0.0).then(|| Duration::from_secs_f64(budget_s)),
            weight_total,
            weight_done: 0.0,
        }
    }

    /// Whether the whole budget is spent.
    fn spent(&self) -> bool {
        self.total.is_some_and(|t| self.start.elapsed() >= t)
    }

    /// The deadline of row `r`, which starts now: the end of its share, counted from the
    /// bench's start (time a row leaves unused goes to the rows after it).
    fn row(&mut self, r: u32) -> Option<Instant> {
        let w = ROWS.iter().find(|(x, _)| *x == r).map_or(0.0, |(_, w)| *w);
        self.weight_done += w;
        self.total
            .map(|t| self.start + t.mul_f64(self.weight_done / self.weight_total))
    }
}

/// The report, as `--json` writes it.
#[derive(Debug, Serialize)]
struct CudaReport<'a> {
    tool: &'static str,
    /// The plot's title.
    title: &'static str,
    /// One line: device, sizes, runs, date (the plot's subtitle).
    subtitle: String,
    /// Set when the figures are not a GPU's (the fake driver).
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'static str>,
    device: String,
    fake_driver: bool,
    driver_version: i32,
    compute_capability: String,
    device_memory_mib: usize,
    date_utc: String,
    kernel: String,
    cpus: usize,
    gpu_mib: usize,
    device_mib: usize,
    in_flight: usize,
    runs: usize,
    budget_s: f64,
    elapsed_s: f64,
    /// False in the copies written while the bench still runs.
    complete: bool,
    rows: &'a [Row],
    all_pass: bool,
}

/// Row 5's reference line: a figure from another machine, not measured by this bench.
const MANAGED_RANDOM_REFERENCE: &str = "CUDA managed memory oversubscribed (8 GiB of random 4 KiB touches on 6 GiB free) on an H100 did 0.08 M (80 k) touches/s (issue 13; shared/reference/peers-uvm-svm-umap.md)";

const TITLE: &str = "hetmem bench --device cuda: hetmem against the CUDA ways, same run";

const FAKE_WARNING: &str =
    "fake driver (tests/fake-cuda): the rows ran and verified, but no figure here is a GPU measurement";

/// `YYYY-MM-DD HH:MM UTC` now.
fn date_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The rows chosen with `--only` (row numbers 1-8), or all.
fn chosen(a: &BenchArgs) -> Result<Vec<u32>> {
    if a.only.is_empty() {
        return Ok(ROWS.iter().map(|(r, _)| *r).collect());
    }
    let mut v = Vec::new();
    for s in &a.only {
        match s.trim().parse::<u32>() {
            Ok(r) if (1..=8).contains(&r) => v.push(r),
            _ => bail!("--only with --device cuda takes row numbers 1-8, got {s:?}"),
        }
    }
    Ok(v)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let sel = chosen(a)?;
    let has = |r: u32| sel.contains(&r);
    ensure!(a.runs >= 1, "--runs must be at least 1");
    if a.runs < 5 {
        eprintln!("warning: --runs {} < 5: medians are noisy", a.runs);
    }
    ensure!(
        a.gpu_mib >= 2 && a.gpu_mib % 2 == 0,
        "--gpu-mib must be a positive multiple of 2"
    );
    ensure!(
        a.device_mib >= 4 && a.device_mib % 2 == 0,
        "--device-mib must be a multiple of 2, at least 4"
    );
    ensure!(a.in_flight >= 1, "--in-flight must be at least 1");
    let len = a.gpu_mib << 20;
    let cap = a.device_mib << 20;
    let stream_len = 4 * cap;
    ensure!(
        len / BLOCK <= SUM_SLOTS && stream_len / BLOCK <= SUM_SLOTS,
        "at most {SUM_SLOTS} blocks per pass"
    );

    // The driver first: without it, a typed error and nothing else done.
    let cuda = Cuda::open(0).context("open CUDA device 0 (--device cuda)")?;
    let info = cuda.info().clone();
    let fake = info.name.contains("Fake");
    let (free, _) = cuda.mem_info()?;
    if has(1) || has(2) || has(3) {
        ensure!(
            len <= free / MAX_FREE_FRACTION,
            "--gpu-mib {}: CUDA managed memory must stay under a quarter of the device's free \
             memory ({} MiB free); oversubscribed managed memory can hang the GPU",
            a.gpu_mib,
            free >> 20
        );
    }
    let g = Gpu::new(&cuda)?;
    let runs = a.runs;
    let mut budget = Budget::new(a.budget_s, &sel);
    let mut rows: Vec<Row> = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let date = date_utc();
    let subtitle = format!(
        "{} (driver {}, sm {}), {date}; rows 1-3 over {} MiB, rows 4-5 over {} MiB through a {} MiB cap; median of up to {runs} runs after a warm-up; {cpus} CPUs",
        info.name,
        info.driver_version,
        info.compute_capability_string(),
        a.gpu_mib,
        4 * a.device_mib,
        a.device_mib
    );
    println!("hetmem bench --device cuda: {subtitle}");
    if fake {
        println!("warning: {FAKE_WARNING}");
    }

    // Writes the report (also while running, so a run cut short leaves what it measured).
    let write_report = |rows: &[Row], complete: bool, elapsed: f64| -> Result<()> {
        let Some(path) = a.json.as_deref() else {
            return Ok(());
        };
        if path == "-" && !complete {
            return Ok(());
        }
        let report = CudaReport {
            tool: "hetmem bench --device cuda",
            title: TITLE,
            subtitle: subtitle.clone(),
            warning: fake.then_some(FAKE_WARNING),
            device: info.name.clone(),
            fake_driver: fake,
            driver_version: info.driver_version,
            compute_capability: info.compute_capability_string(),
            device_memory_mib: info.total_memory >> 20,
            date_utc: date.clone(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus,
            gpu_mib: a.gpu_mib,
            device_mib: a.device_mib,
            in_flight: a.in_flight,
            runs,
            budget_s: a.budget_s,
            elapsed_s: elapsed,
            complete,
            rows,
            all_pass: rows.iter().all(|r| r.pass != Some(false)),
        };
        let text = serde_json::to_string_pretty(&report)? + "\n";
        if path == "-" {
            print!("{text}");
        } else {
            std::fs::write(path, text).with_context(|| format!("write {path}"))?;
        }
        Ok(())
    };
    // Prints the rows added since `from`, one line each, and saves the report so far.
    let done = |rows: &[Row], from: usize, budget: &Budget| -> Result<()> {
        for r in &rows[from..] {
            match &r.not_built {
                Some(why) => eprintln!("  {} {}: {why}", r.id, r.name),
                None => eprintln!(
                    "  {}: hetmem {:.3} {u}, baseline {} {u}, ratio {} ({} runs)",
                    r.id,
                    r.hetmem,
                    r.baseline.map_or("-".into(), |b| format!("{b:.3}")),
                    r.ratio.map_or("-".into(), |x| format!("{x:.3}")),
                    r.hetmem_samples.len(),
                    u = r.unit
                ),
            }
        }
        write_report(rows, false, budget.start.elapsed().as_secs_f64())
    };
    // A row started after the budget is spent is reported as not run.
    let over = |rows: &mut Vec<Row>, id: &str, name: &str| {
        rows.push(Row::not_built(
            id,
            name,
            Target::None,
            "not run: the time budget (--budget-s) was spent",
        ));
    };

    // Rows 1-3 and 6: one context whose device holds the whole buffer (plus the 2 MiB of row 6
    // and a block of slack); its backing views registered, so migrations copy at the link's
    // speed (as the CUDA demo runs).
    let ctx_a = if has(1) || has(2) || has(3) || has(6) {
        let backend = Arc::new(
            CudaBackend::new(&cuda, len + 2 * BLOCK)
                .context("hetmem's CUDA backend for rows 1-3")?
                .register_host_memory(true),
        );
        let hm = Hetmem::builder()
            .cuda_backend(backend)
            .build()
            .context("build the hetmem context (needs userfaultfd)")?;
        let dev = hm.device(0).context("device 0")?;
        Some((hm, dev))
    } else {
        None
    };
    let window_a = a.in_flight.min(len / BLOCK).max(1);

    if has(1) || has(2) || has(3) {
        let (hm, dev) = ctx_a.as_ref().expect("made above");
        let blocks = len / BLOCK;
        let words = (len / 8) as u64;
        // What the CPU writes: the pattern, once, copied into each side's memory per run.
        let mut src = vec![0u8; len];
        fill_pattern_at(&mut src, 0);
        let expected = sum_u64(&src);
        let mut buf: ManagedBuf = hm.alloc(len).context("hetmem buffer")?;
        buf.copy_from_slice(&src);
        let base = buf.addr();
        let managed = ManagedBuffer::new(&cuda, len).context("CUDA managed memory")?;
        managed.write(0, &src)?;
        let pinned = PinnedBuffer::new(&cuda, len).context("pinned host memory")?;
        pinned.write(0, &src)?;
        let dbuf = DeviceBuffer::new(&cuda, len).context("a device buffer")?;
        let slot0 = g.slots(blocks)?;
        let s0 = &g.streams[0];
        let last: Cell<Option<Counters>> = Cell::new(None);

        if has(1) {
            eprintln!("row 1: GPU first access to CPU-written data");
            let deadline = budget.row(1);
            let from = rows.len();
            if budget.spent() {
                over(&mut rows, "1", "GPU first access to CPU-written data");
            } else {
                let mut h = || -> Result<Vec<f64>> {
                    to_system(hm, &mut buf, dev)?;
                    buf.copy_from_slice(&src); // the CPU writes the data
                    g.zero_sums()?;
                    let st = hm.stats();
                    let t = Instant::now();
                    hetmem_pass(&g, dev, base, len, window_a, |i| {
                        BlockKernel::Sum(slot0.offset(8 * i))
                    })?;
                    let secs = t.elapsed().as_secs_f64();
                    last.set(Some(hm.stats().since(&st)));
                    ensure!(
                        g.read_sums(blocks)? == expected,
                        "row 1: hetmem sums differ"
                    );
                    Ok(vec![gbps(len, secs)])
                };
                let mut p = || -> Result<Vec<f64>> {
                    let t = Instant::now();
                    s0.copy_h2d(dbuf.whole(), pinned.whole())?;
                    s0.synchronize()?;
                    Ok(vec![gbps(len, t.elapsed().as_secs_f64())])
                };
                let mut m = || -> Result<Vec<f64>> {
                    managed.prefetch(s0, Location::Host)?;
                    s0.synchronize()?;
                    managed.write(0, &src)?; // the CPU writes the data
                    g.zero_sums()?;
                    let t = Instant::now();
                    enqueue_sum(
                        &g,
                        s0,
                        &whole_cfg(words),
                        managed.whole(),
                        g.sums.span(0, 8)?,
                    )?;
                    s0.synchronize()?;
                    let secs = t.elapsed().as_secs_f64();
                    ensure!(g.read_sums(1)? == expected, "row 1: managed sum differs");
                    Ok(vec![gbps(len, secs)])
                };
                let s = sample(runs, deadline, &mut [&mut h, &mut p, &mut m])?;
                let what = format!(
                    "GPU first access to CPU-written data, {} MiB: hetmem sum launch per 2 MiB block over declared reads, {window_a} in flight",
                    a.gpu_mib
                );
                rows.push(with(
                    last.take(),
                    row_vs(
                        "1a",
                        &format!("{what}, vs pinned copy"),
                        "GB/s",
                        "pinned cuMemcpyHtoDAsync of the same bytes (the PCIe limit)",
                        "pinned",
                        Target::AtLeast(0.8),
                        col(&s, 0, 0),
                        col(&s, 1, 0),
                    ),
                ));
                rows.push(row_vs(
                    "1b",
                    &format!("{what}, vs managed memory"),
                    "GB/s",
                    "one sum kernel over CUDA managed memory the CPU just wrote (fault-driven, no prefetch)",
                    "managed",
                    Target::AtLeast(3.0),
                    col(&s, 0, 0),
                    col(&s, 2, 0),
                ));
            }
            done(&rows, from, &budget)?;
        }

        if has(2) {
            eprintln!("row 2: CPU reads data a GPU launch just wrote");
            let deadline = budget.row(2);
            let from = rows.len();
            if budget.spent() {
                over(&mut rows, "2", "CPU reads data a GPU launch just wrote");
            } else {
                // Each variant writes its own value, new every run, so a stale read shows.
                let v_h = Cell::new(0u64);
                let v_m = Cell::new(1u64 << 32);
                let v_p = Cell::new(2u64 << 32);
                let mut h = || -> Result<Vec<f64>> {
                    v_h.set(v_h.get() + 1);
                    let v = v_h.get();
                    hetmem_pass(&g, dev, base, len, window_a, |_| BlockKernel::Write(v))?;
                    let st = hm.stats();
                    let t = Instant::now();
                    let s = sum_u64(&buf);
                    let secs = t.elapsed().as_secs_f64();
                    last.set(Some(hm.stats().since(&st)));
                    ensure!(
                        s == words.wrapping_mul(v),
                        "row 2: hetmem read-back differs"
                    );
                    Ok(vec![gbps(len, secs)])
                };
                let mut m = || -> Result<Vec<f64>> {
                    v_m.set(v_m.get() + 1);
                    let v = v_m.get();
                    enqueue_write(&g, s0, &whole_cfg(words), managed.whole(), v)?;
                    s0.synchronize()?;
                    let t = Instant::now();
                    let s = sum_u64(host_bytes(&g, &managed)?);
                    let secs = t.elapsed().as_secs_f64();
                    ensure!(
                        s == words.wrapping_mul(v),
                        "row 2: managed read-back differs"
                    );
                    Ok(vec![gbps(len, secs)])
                };
                let mut p = || -> Result<Vec<f64>> {
                    v_p.set(v_p.get() + 1);
                    let v = v_p.get();
                    enqueue_write(&g, s0, &whole_cfg(words), dbuf.whole(), v)?;
                    s0.synchronize()?;
                    let t = Instant::now();
                    s0.copy_d2h(pinned.whole(), dbuf.whole())?;
                    s0.synchronize()?;
                    let s = sum_u64(host_bytes(&g, &pinned)?);
                    let secs = t.elapsed().as_secs_f64();
                    ensure!(
                        s == words.wrapping_mul(v),
                        "row 2: pinned read-back differs"
                    );
                    Ok(vec![gbps(len, secs)])
                };
                let s = sample(runs, deadline, &mut [&mut h, &mut m, &mut p])?;
                let what = format!(
                    "CPU reads (sums) {} MiB a GPU launch just wrote: hetmem CPU faults",
                    a.gpu_mib
                );
                rows.push(with(
                    last.take(),
                    row_vs(
                        "2a",
                        &format!("{what}, vs managed memory"),
                        "GB/s",
                        "the same CPU read of CUDA managed memory a kernel just wrote (CPU fault-back)",
                        "managed",
                        Target::AtLeast(2.0),
                        col(&s, 0, 0),
                        col(&s, 1, 0),
                    ),
                ));
                rows.push(row_vs(
                    "2b",
                    &format!("{what}, vs pinned copy back"),
                    "GB/s",
                    "pinned cuMemcpyDtoHAsync of the whole buffer, then the same CPU read",
                    "pinned",
                    Target::None,
                    col(&s, 0, 0),
                    col(&s, 2, 0),
                ));
            }
            done(&rows, from, &budget)?;
        }

        if has(3) {
            eprintln!("row 3: explicit migration both ways");
            let deadline = budget.row(3);
            let from = rows.len();
            if budget.spent() {
                over(&mut rows, "3", "explicit migration both ways");
            } else {
                buf.copy_from_slice(&src);
                let last2: Cell<Option<Counters>> = Cell::new(None);
                let mut h = || -> Result<Vec<f64>> {
                    to_system(hm, &mut buf, dev)?;
                    let st = hm.stats();
                    let t = Instant::now();
                    hm.migrate(base, len, Dest::Device(dev.id()))?;
                    let to_dev = t.elapsed().as_secs_f64();
                    let st1 = hm.stats();
                    ensure!(
                        dev.used_pages() as usize >= len / PAGE_SIZE,
                        "row 3: migration to the device left pages behind"
                    );
                    let t = Instant::now();
                    hm.migrate(base, len, Dest::System)?;
                    let to_sys = t.elapsed().as_secs_f64();
                    last.set(Some(st1.since(&st)));
                    last2.set(Some(hm.stats().since(&st1)));
                    Ok(vec![gbps(len, to_dev), gbps(len, to_sys)])
                };
                let mut p = || -> Result<Vec<f64>> {
                    let t = Instant::now();
                    s0.copy_h2d(dbuf.whole(), pinned.whole())?;
                    s0.synchronize()?;
                    let to_dev = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    s0.copy_d2h(pinned.whole(), dbuf.whole())?;
                    s0.synchronize()?;
                    let to_sys = t.elapsed().as_secs_f64();
                    Ok(vec![gbps(len, to_dev), gbps(len, to_sys)])
                };
                let mut m = || -> Result<Vec<f64>> {
                    managed.prefetch(s0, Location::Host)?;
                    s0.synchronize()?;
                    let t = Instant::now();
                    managed.prefetch(s0, Location::Device)?;
                    s0.synchronize()?;
                    let to_dev = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    managed.prefetch(s0, Location::Host)?;
                    s0.synchronize()?;
                    let to_sys = t.elapsed().as_secs_f64();
                    Ok(vec![gbps(len, to_dev), gbps(len, to_sys)])
                };
                let s = sample(runs, deadline, &mut [&mut h, &mut p, &mut m])?;
                ensure!(
                    sum_u64(&buf) == expected,
                    "row 3: the data changed across migrations"
                );
                let mib = a.gpu_mib;
                rows.push(with(
                    last.take(),
                    row_vs(
                        "3a",
                        &format!("hm.migrate of {mib} MiB to the GPU, vs pinned copy"),
                        "GB/s",
                        "pinned cuMemcpyHtoDAsync (the PCIe limit)",
                        "pinned",
                        Target::AtLeast(0.8),
                        col(&s, 0, 0),
                        col(&s, 1, 0),
                    ),
                ));
                rows.push(row_vs(
                    "3b",
                    &format!("hm.migrate of {mib} MiB to the GPU, vs managed prefetch"),
                    "GB/s",
                    "cuMemPrefetchAsync of CUDA managed memory to the GPU",
                    "managed",
                    Target::None,
                    col(&s, 0, 0),
                    col(&s, 2, 0),
                ));
                rows.push(with(
                    last2.take(),
                    row_vs(
                        "3c",
                        &format!("hm.migrate of {mib} MiB back to system memory, vs pinned copy"),
                        "GB/s",
                        "pinned cuMemcpyDtoHAsync (the PCIe limit)",
                        "pinned",
                        Target::AtLeast(0.8),
                        col(&s, 0, 1),
                        col(&s, 1, 1),
                    ),
                ));
                rows.push(row_vs(
                    "3d",
                    &format!("hm.migrate of {mib} MiB back to system memory, vs managed prefetch"),
                    "GB/s",
                    "cuMemPrefetchAsync of CUDA managed memory to the CPU",
                    "managed",
                    Target::None,
                    col(&s, 0, 1),
                    col(&s, 2, 1),
                ));
            }
            done(&rows, from, &budget)?;
        }
        drop((buf, managed, pinned, dbuf, src));
    }

    // Row 6 before row 4, so the first context goes before the second is made; row 7 (no GPU,
    // cheap) before row 4, the longest, so a run cut short still has it. The table is in row
    // order.
    if has(6) {
        eprintln!("row 6: launch overhead");
        let deadline = budget.row(6);
        let from = rows.len();
        if budget.spent() {
            over(&mut rows, "6", "launch overhead");
        } else {
            let (_, dev) = ctx_a.as_ref().expect("made above");
            let hm = &ctx_a.as_ref().expect("made above").0;
            let mut small = hm.alloc(BLOCK).context("the 2 MiB range")?;
            small.fill(1);
            let addr = small.addr();
            let n = a.launches.max(1);
            let s0 = &g.streams[0];
            // The warm-up run makes the range resident; later launches find it there.
            let mut h = || -> Result<Vec<f64>> {
                let t = Instant::now();
                for _ in 0..n {
                    hetmem_launch(&g, dev, addr, BLOCK, BlockKernel::Empty)?.wait()?;
                }
                Ok(vec![t.elapsed().as_secs_f64() * 1e6 / n as f64])
            };
            let mut p = || -> Result<Vec<f64>> {
                let t = Instant::now();
                for _ in 0..n {
                    enqueue_empty(&g, s0)?;
                    s0.fence()?.wait()?;
                }
                Ok(vec![t.elapsed().as_secs_f64() * 1e6 / n as f64])
            };
            let st = hm.stats();
            let s = sample(runs, deadline, &mut [&mut h, &mut p])?;
            let d = hm.stats().since(&st);
            ensure!(
                d.pages_to_device <= (BLOCK / PAGE_SIZE) as u64,
                "row 6: the range moved more than once ({} pages to the device)",
                d.pages_to_device
            );
            rows.push(row_vs(
                "6",
                &format!("launch + wait of an empty kernel with a resident 2 MiB declared range ({n} per run)"),
                "us",
                "cuLaunchKernel of the same kernel + an event, no declared range",
                "launch",
                Target::AtMostAbove(10.0),
                col(&s, 0, 0),
                col(&s, 1, 0),
            ));
            drop(small);
        }
        done(&rows, from, &budget)?;
    }
    drop(ctx_a);

    if has(7) {
        eprintln!("row 7: CPU fault service throughput (no GPU involved)");
        let deadline = budget.row(7);
        let from = rows.len();
        if budget.spent() {
            over(&mut rows, "7", "CPU fault service throughput");
        } else {
            for mut r in fault_throughput_rows(a, runs, &ProgressBar::hidden(), deadline)? {
                r.id = format!("7-{}", r.id);
                r.against = Some("uffd".into());
                rows.push(r);
            }
        }
        done(&rows, from, &budget)?;
    }

    if has(4) {
        eprintln!(
            "row 4: GPU streams {} MiB through a {} MiB cap",
            4 * a.device_mib,
            a.device_mib
        );
        let deadline = budget.row(4);
        let from = rows.len();
        if budget.spent() {
            over(&mut rows, "4", "GPU streams data 4x the device cap");
        } else {
            let backend = Arc::new(
                CudaBackend::new(&cuda, cap)
                    .context("hetmem's CUDA backend for row 4")?
                    .register_host_memory(true),
            );
            let hm = Hetmem::builder()
                .cuda_backend(backend)
                .build()
                .context("build the streaming context")?;
            let dev = hm.device(0).context("device 0")?;
            let blocks = stream_len / BLOCK;
            // A launch's block stays on the device until it completes: leave one free for
            // the next launch's migration.
            let window = a.in_flight.min(cap / BLOCK - 1).max(1);
            let mut buf = hm.alloc(stream_len).context("hetmem buffer")?;
            let pinned = PinnedBuffer::new(&cuda, stream_len).context("pinned host memory")?;
            let mut chunk = vec![0u8; BLOCK];
            let mut expected = 0u64;
            for off in (0..stream_len).step_by(BLOCK) {
                fill_pattern_at(&mut chunk, off / 8);
                expected = expected.wrapping_add(sum_u64(&chunk));
                buf[off..off + BLOCK].copy_from_slice(&chunk);
                pinned.write(off, &chunk)?;
            }
            let base = buf.addr();
            // Two variants reset the buffer (to_system needs it mutably): shared by a RefCell.
            let buf = std::cell::RefCell::new(buf);
            let dbufs = [
                DeviceBuffer::new(&cuda, BLOCK)?,
                DeviceBuffer::new(&cuda, BLOCK)?,
            ];
            let slot0 = g.slots(blocks)?;
            let last: Cell<Option<Counters>> = Cell::new(None);
            let last2: Cell<Option<Counters>> = Cell::new(None);
            let (k_h, k_p) = (Cell::new(0u8), Cell::new(0u8));
            let rm_counters;
            let (read_s, rw_s) = {
                // Read: a sum per block.
                let mut h = || -> Result<Vec<f64>> {
                    to_system(&hm, &mut buf.borrow_mut(), &dev)?;
                    g.zero_sums()?;
                    let st = hm.stats();
                    let t = Instant::now();
                    hetmem_pass(&g, &dev, base, stream_len, window, |i| {
                        BlockKernel::Sum(slot0.offset(8 * i))
                    })?;
                    let secs = t.elapsed().as_secs_f64();
                    last.set(Some(hm.stats().since(&st)));
                    ensure!(
                        g.read_sums(blocks)? == expected,
                        "row 4: hetmem sums differ"
                    );
                    Ok(vec![gbps(stream_len, secs)])
                };
                let mut p = || -> Result<Vec<f64>> {
                    g.zero_sums()?;
                    let t = Instant::now();
                    for i in 0..blocks {
                        let (st, d) = (&g.streams[i % 2], &dbufs[i % 2]);
                        st.copy_h2d(d.whole(), pinned.span(i * BLOCK, BLOCK)?)?;
                        enqueue_sum(&g, st, &g.block_cfg, d.whole(), g.sums.span(i * 8, 8)?)?;
                    }
                    g.sync()?;
                    let secs = t.elapsed().as_secs_f64();
                    ensure!(
                        g.read_sums(blocks)? == expected,
                        "row 4: pipeline sums differ"
                    );
                    Ok(vec![gbps(stream_len, secs)])
                };
                // The same read with ReadMostly advice (cudaMemAdviseSetReadMostly): the device
                // gets read copies, so evicting a block drops it instead of copying it back.
                let last3: Cell<Option<Counters>> = Cell::new(None);
                let mut h_rm = || -> Result<Vec<f64>> {
                    to_system(&hm, &mut buf.borrow_mut(), &dev)?;
                    hm.advise(base, stream_len, hetmem::Advice::ReadMostly(true))?;
                    g.zero_sums()?;
                    let st = hm.stats();
                    let t = Instant::now();
                    let r = hetmem_pass(&g, &dev, base, stream_len, window, |i| {
                        BlockKernel::Sum(slot0.offset(8 * i))
                    });
                    let secs = t.elapsed().as_secs_f64();
                    last3.set(Some(hm.stats().since(&st)));
                    hm.advise(base, stream_len, hetmem::Advice::ReadMostly(false))?;
                    r?;
                    ensure!(
                        g.read_sums(blocks)? == expected,
                        "row 4: hetmem sums differ (ReadMostly)"
                    );
                    Ok(vec![gbps(stream_len, secs)])
                };
                let read_s = sample(runs, deadline, &mut [&mut h, &mut p, &mut h_rm])?;
                rm_counters = last3.take();
                // Read-write: +1 on every byte, and everything back in system memory.
                let mut h = || -> Result<Vec<f64>> {
                    to_system(&hm, &mut buf.borrow_mut(), &dev)?;
                    let st = hm.stats();
                    let t = Instant::now();
                    hetmem_pass(&g, &dev, base, stream_len, window, |_| BlockKernel::Add(1))?;
                    hm.migrate(base, stream_len, Dest::System)?;
                    let secs = t.elapsed().as_secs_f64();
                    last2.set(Some(hm.stats().since(&st)));
                    k_h.set(k_h.get().wrapping_add(1));
                    Ok(vec![gbps(stream_len, secs)])
                };
                let mut p = || -> Result<Vec<f64>> {
                    let t = Instant::now();
                    for i in 0..blocks {
                        let (st, d) = (&g.streams[i % 2], &dbufs[i % 2]);
                        let piece = pinned.span(i * BLOCK, BLOCK)?;
                        st.copy_h2d(d.whole(), piece)?;
                        enqueue_add(&g, st, &g.block_cfg, d.whole(), 1)?;
                        st.copy_d2h(piece, d.whole())?;
                    }
                    g.sync()?;
                    let secs = t.elapsed().as_secs_f64();
                    k_p.set(k_p.get().wrapping_add(1));
                    Ok(vec![gbps(stream_len, secs)])
                };
                let rw_s = sample(runs, deadline, &mut [&mut h, &mut p])?;
                (read_s, rw_s)
            };
            // Every byte went up by one per read-write pass, on either side.
            let host = host_bytes(&g, &pinned)?;
            let buf = buf.into_inner();
            for off in (0..stream_len).step_by(BLOCK) {
                check_added(&buf[off..off + BLOCK], off / 8, k_h.get(), "row 4 (hetmem)")?;
                check_added(
                    &host[off..off + BLOCK],
                    off / 8,
                    k_p.get(),
                    "row 4 (pipeline)",
                )?;
            }
            let what = format!(
                "GPU streams {} MiB, 4x a {} MiB cap: launch per 2 MiB block, {window} in flight",
                4 * a.device_mib,
                a.device_mib
            );
            let base_name = "double-buffered pinned pipeline: 2 MiB pieces, two device buffers, two streams (copy in, kernel, copy out)";
            rows.push(with(
                last.take(),
                row_vs(
                    "4a",
                    &format!("{what}, read (sum)"),
                    "GB/s",
                    base_name,
                    "pipeline",
                    Target::AtLeast(0.7),
                    col(&read_s, 0, 0),
                    col(&read_s, 1, 0),
                ),
            ));
            rows.push(with(
                last2.take(),
                row_vs(
                    "4b",
                    &format!("{what}, read-write (+1 per byte, then all back in system memory)"),
                    "GB/s",
                    base_name,
                    "pipeline",
                    Target::AtLeast(0.7),
                    col(&rw_s, 0, 0),
                    col(&rw_s, 1, 0),
                ),
            ));
            rows.push(with(
                rm_counters,
                row_vs(
                    "4c",
                    &format!("{what}, read (sum) with ReadMostly advice"),
                    "GB/s",
                    base_name,
                    "pipeline",
                    Target::None,
                    col(&read_s, 2, 0),
                    col(&read_s, 1, 0),
                ),
            ));
        }
        done(&rows, from, &budget)?;
    }

    if has(5) {
        eprintln!(
            "row 5: random 4 KiB GPU touches over {} MiB, 4x a {} MiB cap",
            4 * a.device_mib,
            a.device_mib
        );
        let deadline = budget.row(5);
        let from = rows.len();
        if budget.spent() {
            over(
                &mut rows,
                "5",
                "random 4 KiB GPU touches over data 4x the device cap",
            );
        } else {
            // A context of its own, capped as row 4's; its backing views registered, which is
            // how a CUDA kernel reaches a remote range (CudaLauncher::for_backend).
            let backend = Arc::new(
                CudaBackend::new(&cuda, cap)
                    .context("hetmem's CUDA backend for row 5")?
                    .register_host_memory(true),
            );
            let hm = Hetmem::builder()
                .cuda_backend(backend.clone())
                .build()
                .context("build the random-touch context")?;
            let dev = hm.device(0).context("device 0")?;
            let launcher =
                CudaLauncher::for_backend(&backend).context("a launcher for remote ranges")?;
            let blocks = stream_len / BLOCK;
            let window = a.in_flight.min(cap / BLOCK - 1).max(1);
            let mut buf = hm.alloc(stream_len).context("hetmem buffer")?;
            let mut chunk = vec![0u8; BLOCK];
            for off in (0..stream_len).step_by(BLOCK) {
                fill_pattern_at(&mut chunk, off / 8);
                buf[off..off + BLOCK].copy_from_slice(&chunk);
            }
            let base = buf.addr();
            let buf = std::cell::RefCell::new(buf);
            let out = g.slots(1)?;
            let remote_cfg = LaunchConfig::linear(TOUCH_GRID.0, TOUCH_GRID.1);
            let threads = u64::from(TOUCH_GRID.0) * u64::from(TOUCH_GRID.1);
            let words = (stream_len / 8) as u64;
            // Each run's count is sized from the run before (see TOUCH_RUN_S); the warm-up
            // starts small.
            let n_remote = Cell::new(1u64 << 20);
            let n_migrate = Cell::new(2 * blocks as u64);
            let runs_done = Cell::new(0u64);
            let next_seed = || {
                runs_done.set(runs_done.get() + 1);
                splitmix64(0x5eed_0005 ^ runs_done.get())
            };
            let (last_r, last_m): (Cell<Option<Counters>>, Cell<Option<Counters>>) =
                (Cell::new(None), Cell::new(None));
            let mut h = || -> Result<Vec<f64>> {
                // Remote means system memory: start with nothing on the device (a page there
                // would be mapped there, splitting the range into runs).
                to_system(&hm, &mut buf.borrow_mut(), &dev)?;
                g.zero_sums()?;
                let (n, seed) = (n_remote.get(), next_seed());
                let st = hm.stats();
                let t = Instant::now();
                touch_launch(
                    &g,
                    &launcher,
                    &dev,
                    (base, stream_len),
                    hetmem::LaunchPlacement::Remote,
                    &remote_cfg,
                    (n, seed),
                    out,
                )?
                .wait()?;
                let secs = t.elapsed().as_secs_f64();
                let d = hm.stats().since(&st);
                ensure!(
                    d.pages_to_device == 0 && dev.used_pages() == 0,
                    "row 5: the remote launch moved {} pages to the device",
                    d.pages_to_device
                );
                last_r.set(Some(d));
                let want = touch_sum(words, n, threads, seed, &|i| pattern_word(i as usize))?;
                let got = g.read_sums(1)?;
                ensure!(
                    got == want,
                    "row 5: the remote kernel's sum {got:#x} is not the CPU's {want:#x}"
                );
                n_remote.set(rescale(n, secs, 1 << 16, 1 << 31));
                Ok(vec![n as f64 / secs / 1e3])
            };
            let mut m = || -> Result<Vec<f64>> {
                to_system(&hm, &mut buf.borrow_mut(), &dev)?;
                g.zero_sums()?;
                let (n, seed) = (n_migrate.get(), next_seed());
                // The blocks in the order the touches demand them: each touch a random page of
                // a random block, so about 3 in 4 find their block gone (4x the cap, LRU).
                let order: Vec<usize> = (0..n)
                    .map(|j| (splitmix64(seed ^ (j << 32)) % blocks as u64) as usize)
                    .collect();
                let st = hm.stats();
                let t = Instant::now();
                let mut running: VecDeque<Launch> = VecDeque::with_capacity(window);
                for (j, &b) in order.iter().enumerate() {
                    if running.len() >= window {
                        running.pop_front().map(Launch::wait).transpose()?;
                    }
                    running.push_back(touch_launch(
                        &g,
                        &launcher,
                        &dev,
                        (base + b * BLOCK, BLOCK),
                        hetmem::LaunchPlacement::Migrate,
                        &LaunchConfig::single(),
                        (1, seed.wrapping_add(j as u64)),
                        out,
                    )?);
                }
                for l in running {
                    l.wait()?;
                }
                let secs = t.elapsed().as_secs_f64();
                let d = hm.stats().since(&st);
                // Every block touched came in at least once (it started in system memory).
                let mut seen = vec![false; blocks];
                order.iter().for_each(|&b| seen[b] = true);
                let distinct = seen.iter().filter(|&&x| x).count() as u64;
                ensure!(
                    d.pages_to_device >= distinct * (BLOCK / PAGE_SIZE) as u64,
                    "row 5: {distinct} blocks touched but {} pages migrated",
                    d.pages_to_device
                );
                last_m.set(Some(d));
                let mut want = 0u64;
                for (j, &b) in order.iter().enumerate() {
                    let first = (b * BLOCK / 8) as u64;
                    want = want.wrapping_add(touch_sum(
                        (BLOCK / 8) as u64,
                        1,
                        1,
                        seed.wrapping_add(j as u64),
                        &|i| pattern_word((first + i) as usize),
                    )?);
                }
                let got = g.read_sums(1)?;
                ensure!(
                    got == want,
                    "row 5: the migrate-on-demand sums {got:#x} are not the CPU's {want:#x}"
                );
                n_migrate.set(rescale(n, secs, 16, 1 << 20));
                Ok(vec![n as f64 / secs / 1e3])
            };
            let s = sample(runs, deadline, &mut [&mut h, &mut m])?;
            eprintln!(
                "  row 5: next counts {} remote touches, {} migrate-on-demand launches; the last migrate run moved {} pages to the device",
                n_remote.get(),
                n_migrate.get(),
                last_m.take().map_or(0, |c| c.pages_to_device)
            );
            rows.push(with(
                last_r.take(),
                row_vs(
                    "5",
                    &format!(
                        "random 4 KiB GPU touches (an 8-byte read per random page) over {} MiB, 4x a {} MiB cap: one launch over the whole range placed Remote (read in system memory over the link)",
                        4 * a.device_mib,
                        a.device_mib
                    ),
                    "k touches/s",
                    &format!(
                        "migrate-on-demand: a launch per touch over its random 2 MiB block placed Migrate (it migrates in, evicting the LRU block), {window} in flight; \
                         reference, not measured here: {MANAGED_RANDOM_REFERENCE}"
                    ),
                    "migrate",
                    Target::AtLeast(100.0),
                    col(&s, 0, 0),
                    col(&s, 1, 0),
                ),
            ));
        }
        done(&rows, from, &budget)?;
    }

    if has(8) {
        eprintln!(
            "row 8: GPU scans and updates a {} MiB file through a {} MiB cap",
            4 * a.device_mib,
            a.device_mib
        );
        let deadline = budget.row(8);
        let from = rows.len();
        if budget.spent() {
            over(&mut rows, "8", "file data on the GPU");
        } else {
            let dir = TempDir::new()?;
            let path = dir.0.join("row8.bin");
            let expected = create_pattern_file(&path, stream_len)?;
            let backend = Arc::new(
                CudaBackend::new(&cuda, cap)
                    .context("hetmem's CUDA backend for row 8")?
                    .register_host_memory(true),
            );
            let hm = Hetmem::builder()
                .cuda_backend(backend)
                .build()
                .context("build the file context")?;
            let dev = hm.device(0).context("device 0")?;
            let blocks = stream_len / BLOCK;
            // A launch's block stays on the device until it completes: leave one free for
            // the next launch's fill.
            let window = a.in_flight.min(cap / BLOCK - 1).max(1);
            // The pipeline's staging: two pinned pieces (page-aligned, so O_DIRECT reads and
            // writes straight into and out of them), two device buffers, two streams.
            let staging = PinnedBuffer::new(&cuda, 2 * BLOCK).context("pinned staging")?;
            let dbufs = [
                DeviceBuffer::new(&cuda, BLOCK)?,
                DeviceBuffer::new(&cuda, BLOCK)?,
            ];
            let slot0 = g.slots(blocks)?;
            let (last_w, last_c, last_u) = (Cell::new(None), Cell::new(None), Cell::new(None));
            // hetmem: a fresh mapping per run, so every block comes from the file; a launch
            // per block sums it on the device.
            let hetmem_scan = |direct: bool, last: &Cell<Option<Counters>>| -> Result<Vec<f64>> {
                if direct {
                    drop_page_cache(&path)?;
                }
                g.zero_sums()?;
                let st = hm.stats();
                let t = Instant::now();
                let opts = FileOptions::new(FileMode::ReadOnly).direct(direct);
                let m = hm.map_file_with(&path, 0, stream_len, opts)?;
                hetmem_pass(&g, &dev, m.addr(), stream_len, window, |i| {
                    BlockKernel::Sum(slot0.offset(8 * i))
                })?;
                let secs = t.elapsed().as_secs_f64();
                last.set(Some(hm.stats().since(&st)));
                // hetmem turns O_DIRECT off for a mapping whose file refuses it: the row would
                // then not be what it says.
                ensure!(
                    m.is_direct() == direct,
                    "row 8b: the mapping's O_DIRECT was turned off (does {} support it?)",
                    path.display()
                );
                drop(m);
                ensure!(
                    g.read_sums(blocks)? == expected,
                    "row 8: hetmem's file sums differ"
                );
                Ok(vec![gbps(stream_len, secs)])
            };
            // The pipeline: pread a block into a pinned piece while the other piece's copy
            // and sum run on its stream.
            let pipeline_scan = |direct: bool| -> Result<Vec<f64>> {
                if direct {
                    drop_page_cache(&path)?;
                }
                g.zero_sums()?;
                let t = Instant::now();
                let f = open_file(&path, direct, false)?;
                for i in 0..blocks {
                    let k = i % 2;
                    let st = &g.streams[k];
                    st.synchronize()?;
                    read_into_pinned(&f, &staging, k * BLOCK, BLOCK, (i * BLOCK) as u64)?;
                    st.copy_h2d(dbufs[k].whole(), staging.span(k * BLOCK, BLOCK)?)?;
                    enqueue_sum(
                        &g,
                        st,
                        &g.block_cfg,
                        dbufs[k].whole(),
                        g.sums.span(i * 8, 8)?,
                    )?;
                }
                g.sync()?;
                let secs = t.elapsed().as_secs_f64();
                ensure!(
                    g.read_sums(blocks)? == expected,
                    "row 8: the pipeline's file sums differ"
                );
                Ok(vec![gbps(stream_len, secs)])
            };
            let warm = sample(
                runs,
                deadline,
                &mut [&mut || hetmem_scan(false, &last_w), &mut || {
                    pipeline_scan(false)
                }],
            )?;
            // O_DIRECT needs a file system that does it (not tmpfs, say): where the temporary
            // directory has none, 8b is reported as not run rather than measured buffered.
            let direct_ok = hm
                .map_file_with(
                    &path,
                    0,
                    stream_len,
                    FileOptions::new(FileMode::ReadOnly).direct(true),
                )?
                .is_direct();
            let cold = if direct_ok {
                Some(sample(
                    runs,
                    deadline,
                    &mut [&mut || hetmem_scan(true, &last_c), &mut || {
                        pipeline_scan(true)
                    }],
                )?)
            } else {
                None
            };
            // The update: +1 on every byte of the file, made durable. Both sides update the
            // same file; `passes` counts them, warm-up included.
            let passes = Cell::new(0u8);
            let mut h = || -> Result<Vec<f64>> {
                let st = hm.stats();
                let t = Instant::now();
                let m =
                    hm.map_file_with(&path, 0, stream_len, FileOptions::new(FileMode::Shared))?;
                hetmem_pass(&g, &dev, m.addr(), stream_len, window, |_| {
                    BlockKernel::Add(1)
                })?;
                m.sync()?;
                let secs = t.elapsed().as_secs_f64();
                last_u.set(Some(hm.stats().since(&st)));
                drop(m);
                passes.set(passes.get().wrapping_add(1));
                Ok(vec![gbps(stream_len, secs)])
            };
            let mut p = || -> Result<Vec<f64>> {
                let t = Instant::now();
                let f = open_file(&path, false, true)?;
                // Block i is written back when its piece is needed again (block i + 2), or at
                // the end.
                let write_back = |i: usize| -> Result<()> {
                    let k = i % 2;
                    g.streams[k].synchronize()?;
                    write_from_pinned(&f, &staging, k * BLOCK, BLOCK, (i * BLOCK) as u64)
                };
                for i in 0..blocks {
                    let k = i % 2;
                    let st = &g.streams[k];
                    if i >= 2 {
                        write_back(i - 2)?;
                    } else {
                        st.synchronize()?;
                    }
                    read_into_pinned(&f, &staging, k * BLOCK, BLOCK, (i * BLOCK) as u64)?;
                    let piece = staging.span(k * BLOCK, BLOCK)?;
                    st.copy_h2d(dbufs[k].whole(), piece)?;
                    enqueue_add(&g, st, &g.block_cfg, dbufs[k].whole(), 1)?;
                    st.copy_d2h(staging.span(k * BLOCK, BLOCK)?, dbufs[k].whole())?;
                }
                for i in blocks.saturating_sub(2)..blocks {
                    write_back(i)?;
                }
                f.sync_data()?;
                let secs = t.elapsed().as_secs_f64();
                passes.set(passes.get().wrapping_add(1));
                Ok(vec![gbps(stream_len, secs)])
            };
            let update = sample(runs, deadline, &mut [&mut h, &mut p])?;
            // Every byte of the file went up by one per pass, on either side.
            use std::os::unix::fs::FileExt;
            let f = open_file(&path, false, false)?;
            let mut piece = vec![0u8; BLOCK];
            for off in (0..stream_len).step_by(BLOCK) {
                f.read_exact_at(&mut piece, off as u64)?;
                check_added(
                    &piece,
                    off / 8,
                    passes.get(),
                    "row 8 (the file after the updates)",
                )?;
            }
            let what = format!(
                "GPU and a {} MiB file, 4x a {} MiB cap: launch per 2 MiB block, {window} in flight",
                4 * a.device_mib,
                a.device_mib
            );
            let pipe = "pread into pinned staging + copy + kernel, double-buffered (two pinned pieces, two device buffers, two streams)";
            rows.push(with(
                last_w.take(),
                row_vs(
                    "8a",
                    &format!("{what}, scan (sum), warm page cache (map_file ReadOnly)"),
                    "GB/s",
                    pipe,
                    "pipeline",
                    Target::AtLeast(0.8),
                    col(&warm, 0, 0),
                    col(&warm, 1, 0),
                ),
            ));
            let cold_name =
                format!("{what}, scan (sum), cold cache, O_DIRECT (FileOptions::direct)");
            rows.push(match &cold {
                Some(cold) => with(
                    last_c.take(),
                    row_vs(
                        "8b",
                        &cold_name,
                        "GB/s",
                        &format!("{pipe}, O_DIRECT"),
                        "pipeline",
                        Target::AtLeast(0.8),
                        col(cold, 0, 0),
                        col(cold, 1, 0),
                    ),
                ),
                None => Row::not_built(
                    "8b",
                    &cold_name,
                    Target::AtLeast(0.8),
                    &format!(
                        "not run: {} does not do O_DIRECT (set TMPDIR to a disk's file system)",
                        dir.0.display()
                    ),
                ),
            });
            rows.push(with(
                last_u.take(),
                row_vs(
                    "8c",
                    &format!("{what}, update (+1 per byte, map_file Shared), then sync"),
                    "GB/s",
                    "pread + copy + kernel + copy back + pwrite, double-buffered, then fdatasync",
                    "pipeline",
                    Target::AtLeast(0.7),
                    col(&update, 0, 0),
                    col(&update, 1, 0),
                ),
            ));
        }
        done(&rows, from, &budget)?;
    }

    rows.sort_by_key(|r| r.id.chars().next());
    let elapsed = budget.start.elapsed().as_secs_f64();
    let all_pass = rows.iter().all(|r| r.pass != Some(false));
    let mut text = format!(
        "\nhetmem bench --device cuda: {subtitle}; {elapsed:.0} s in all\n{}",
        report::table(&rows)
    );
    if rows.iter().any(|r| r.id == "5" && r.not_built.is_none()) {
        text.push_str(&format!(
            "row 5 reference, not measured here: {MANAGED_RANDOM_REFERENCE}\n"
        ));
    }
    if fake {
        text.push_str(&format!("\nwarning: {FAKE_WARNING}\n"));
    }
    if a.json.as_deref() == Some("-") {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    write_report(&rows, true, elapsed)?;
    if let Some(path) = a.json.as_deref().filter(|p| *p != "-") {
        println!("JSON written to {path}");
    }
    if let Some(path) = &a.plot {
        crate::plot::write(path, TITLE, &subtitle, &rows, fake.then_some(FAKE_WARNING))?;
        println!("plot written to {}", path.display());
    }
    if a.strict && !all_pass {
        bail!("some targets were missed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_add_without_carries() {
        let w = 0xff80_7f01_00fe_1234u64;
        let got = add_bytes(w, 3);
        let want = u64::from_ne_bytes(w.to_ne_bytes().map(|b| b.wrapping_add(3)));
        assert_eq!(got, want);
        assert_eq!(add_bytes(w, 0), w);
        for k in [1u8, 127, 128, 255] {
            let x = pattern_word(12345);
            let want = u64::from_ne_bytes(x.to_ne_bytes().map(|b| b.wrapping_add(k)));
            assert_eq!(add_bytes(x, k), want);
        }
    }

    #[test]
    fn the_budget_shares_time_by_weight() {
        let mut b = Budget::new(100.0, &[1, 4]);
        let d1 = b.row(1).unwrap();
        let d4 = b.row(4).unwrap();
        // 3/7 and 7/7 of the budget.
        let s = |d: Instant| (d - b.start).as_secs_f64();
        assert!((s(d1) - 300.0 / 7.0).abs() < 0.01, "{}", s(d1));
        assert!((s(d4) - 100.0).abs() < 0.01);
        assert!(!b.spent());
        assert!(Budget::new(0.0, &[1]).row(1).is_none());
    }

    /// The kernel's loop as kernels.cu writes it, one thread after the other, calling `read`
    /// with each word index.
    fn kernel_loop(words: u64, touches: u64, threads: u64, seed: u64, read: &mut dyn FnMut(u64)) {
        let pages = words >> 9;
        for t in 0..threads {
            let mut z = seed.wrapping_add(t).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let mut x = (z ^ (z >> 31)) | 1;
            let mut i = t;
            while i < touches {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                read((x % pages) * 512 + (x >> 55));
                i += threads;
            }
        }
    }

    #[test]
    fn the_touch_replay_is_the_kernels_sequence_over_whole_pages() {
        // 1000 whole pages and a remainder the kernel must never read.
        let words = 1000 * 512 + 100;
        for (touches, threads) in [(1u64, 1u64), (37, 8), (1 << 17, 1000), (1 << 17, 262_144)] {
            let mut want = 0u64;
            let mut pages = std::collections::HashSet::new();
            kernel_loop(words, touches, threads, 42, &mut |i| {
                assert!(i < 1000 * 512, "word {i} is past the whole pages");
                pages.insert(i / 512);
                want = want.wrapping_add(pattern_word(i as usize));
            });
            let got = touch_sum(words, touches, threads, 42, &|i| pattern_word(i as usize))
                .expect("the replay");
            assert_eq!(got, want, "{touches} touches over {threads} threads");
            // Random pages: a large run reaches nearly all 1000 of them.
            if touches > 10_000 {
                assert!(pages.len() > 990, "only {} pages touched", pages.len());
            }
        }
        // Another seed, another sum; no whole page, nothing read.
        let sum = |seed| touch_sum(words, 1 << 17, 1000, seed, &|i| pattern_word(i as usize));
        assert_ne!(sum(42).expect("seed 42"), sum(43).expect("seed 43"));
        assert_eq!(touch_sum(511, 100, 4, 1, &|_| 1).expect("no page"), 0);
    }

    #[test]
    fn touch_counts_scale_to_the_run_time() {
        // Twice the time wanted: half the count; bounded both ways.
        let n = (1000.0 * TOUCH_RUN_S / (2.0 * TOUCH_RUN_S)) as u64;
        assert_eq!(rescale(1000, 2.0 * TOUCH_RUN_S, 1, 1 << 20), n);
        assert_eq!(rescale(1000, 0.0, 1, 5000), 5000);
        assert_eq!(rescale(1000, 1e6, 16, 5000), 16);
    }

    #[test]
    fn dates_are_civil() {
        let d = date_utc();
        assert_eq!(d.len(), "2026-12-04 21:50 UTC".len(), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
