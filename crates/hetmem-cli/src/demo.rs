//! `hetmem demo`: an iterative stencil over managed memory larger than device memory.
//!
//! The grid is `rows x 1024` u32, one row per page. Each iteration a device kernel does a
//! horizontal stencil inside every row (wrap-around), then the CPU reads every row back and
//! mixes it with the row above, so pages go to the device (evicting others: the grid does not
//! fit) and come back. A plain `Vec` computed by the same functions on the CPU alone must match
//! byte for byte.
//!
//! With `--file PATH` the grid is a file mapped `Shared` instead of anonymous memory: pages come
//! from the file on first touch, the result is `sync`ed back, and the file itself (read back
//! with `std::fs::read`) is what gets verified.
//!
//! With `--device cuda` the device pass runs on a CUDA GPU: one kernel launch per 2 MiB block
//! (512 rows), each declaring its block (`Device::launch` through `hetmem_cuda::CudaLauncher`),
//! a few in flight at once, so blocks stream through a device smaller than the grid. `--launch`
//! runs the simulated device the same way (`Device::launch_host`) instead of with a closure
//! kernel over the whole grid.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use hetmem::{
    DeclaredAccess, Device, DeviceKind, FileMode, Hetmem, Launch, SimConfig, StatsSnapshot,
    PAGE_SIZE,
};
use hetmem_cuda::{
    kernels, CudaBackend, CudaBuilderExt, CudaLauncher, Function, LaunchConfig, Module,
};

use crate::report::{fmt_bytes, fmt_count};

/// u32 words per row (one page).
const ROW_WORDS: usize = PAGE_SIZE / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The CPU cannot map device memory: CPU access migrates pages back.
    Private,
    /// The CPU maps device memory directly.
    Coherent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// A simulated device (`--kind`, `--workers`).
    Sim,
    /// CUDA device 0, capped at --device-mib: kernels launched per block over declared ranges.
    Cuda,
}

/// Bytes per launch of the device pass: one block, which is one run of device memory.
const BLOCK: usize = 2 << 20;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Grid size in MiB (managed memory).
    #[arg(long, default_value_t = 64)]
    pub size_mib: usize,
    /// Device memory hetmem may use, in MiB.
    #[arg(long, default_value_t = 16)]
    pub device_mib: usize,
    /// The device: simulated, or a CUDA GPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Sim)]
    pub device: DeviceArg,
    /// On a simulated device, run the device pass as launches with declared ranges, one per
    /// block, as on a GPU (always so with --device cuda).
    #[arg(long)]
    pub launch: bool,
    /// Launches of the device pass in flight at once (at most the device's capacity in blocks).
    #[arg(long, default_value_t = 3)]
    pub in_flight: usize,
    /// Stencil iterations (device kernel + CPU pass each).
    #[arg(long, default_value_t = 8)]
    pub iters: u32,
    /// Simulated device kind.
    #[arg(long, value_enum, default_value_t = Kind::Private)]
    pub kind: Kind,
    /// Device kernel worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Run on this file, mapped Shared, instead of anonymous memory. A missing file is created
    /// with the initial grid (--size-mib); an existing one must be --size-mib long, and its
    /// content is the starting grid. The result is synced to the file and verified there.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Write a trace of the run here (Chrome trace JSON; `hetmem trace FILE --html OUT.html`
    /// renders it).
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

#[inline]
fn load_row(bytes: &[u8], out: &mut [u32; ROW_WORDS]) {
    for (w, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[inline]
fn store_row(words: &[u32; ROW_WORDS], bytes: &mut [u8]) {
    for (w, c) in words.iter().zip(bytes.chunks_exact_mut(4)) {
        c.copy_from_slice(&w.to_ne_bytes());
    }
}

/// Initial value of word `j` of row `r`.
fn init_word(r: usize, j: usize) -> u32 {
    let x = ((r as u64) << 10 | j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 32) as u32 ^ x as u32
}

fn init_grid(grid: &mut [u8]) {
    let mut w = [0u32; ROW_WORDS];
    for (r, row) in grid.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for (j, x) in w.iter_mut().enumerate() {
            *x = init_word(r, j);
        }
        store_row(&w, row);
    }
}

/// The device kernel on one row: a 3-point horizontal stencil with wrap-around.
fn device_row(row: &mut [u8], r: usize, iter: u32) {
    let mut old = [0u32; ROW_WORDS];
    load_row(row, &mut old);
    let salt = (r as u32).wrapping_mul(0x0100_0193) ^ iter.wrapping_mul(0x9E37_79B9);
    let mut new = [0u32; ROW_WORDS];
    for (j, n) in new.iter_mut().enumerate() {
        let l = old[(j + ROW_WORDS - 1) % ROW_WORDS];
        let c = old[j];
        let rr = old[(j + 1) % ROW_WORDS];
        *n = c
            .wrapping_mul(3)
            .wrapping_add(l ^ rr.rotate_left(7))
            .wrapping_add(salt);
    }
    store_row(&new, row);
}

/// The CPU pass over the whole grid: every row mixes in the (already updated) row above; row 0
/// mixes in the last row as it was before this pass. Returns a checksum of the result.
fn cpu_pass(grid: &mut [u8], iter: u32) -> u64 {
    let rows = grid.len() / PAGE_SIZE;
    let mut prev = [0u32; ROW_WORDS];
    load_row(&grid[(rows - 1) * PAGE_SIZE..], &mut prev);
    let mut cur = [0u32; ROW_WORDS];
    let mut sum = 0u64;
    for row in grid.chunks_exact_mut(PAGE_SIZE) {
        load_row(row, &mut cur);
        for (j, (c, p)) in cur.iter_mut().zip(prev.iter()).enumerate() {
            *c = c.wrapping_add(p >> 3) ^ (j as u32).wrapping_add(iter);
            sum = sum.wrapping_add(u64::from(*c));
        }
        store_row(&cur, row);
        prev = cur;
    }
    sum
}

fn device_pass_reference(grid: &mut [u8], iter: u32) {
    for (r, row) in grid.chunks_exact_mut(PAGE_SIZE).enumerate() {
        device_row(row, r, iter);
    }
}

/// How the device pass runs.
enum DevicePass {
    /// A closure kernel over the whole grid on the simulated device's workers.
    Closure,
    /// Launches with declared access per block on the simulated device (`launch_host`).
    HostLaunch,
    /// Launches of the row stencil per block on a CUDA device.
    Cuda {
        launcher: CudaLauncher,
        function: Function,
    },
}

/// Launches in flight: what was asked, within the device's capacity in blocks (a launch's
/// block stays on the device until it completes).
fn in_flight(asked: usize, dev: &Device) -> usize {
    let blocks = dev.capacity_pages() as usize * PAGE_SIZE / BLOCK;
    asked.min(blocks).max(1)
}

impl DevicePass {
    /// One device pass over the grid at `base`: every row through `device_row` (or the CUDA
    /// kernel doing the same).
    fn run(
        &self,
        dev: &Device,
        base: usize,
        len: usize,
        it: u32,
        in_flight_asked: usize,
    ) -> Result<()> {
        if let DevicePass::Closure = self {
            dev.kernel_write(base, len, |run_addr, bytes| {
                let r0 = (run_addr - base) / PAGE_SIZE;
                for (k, row) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    device_row(row, r0 + k, it);
                }
            })?;
            return Ok(());
        }
        let window = in_flight(in_flight_asked, dev);
        let mut running: VecDeque<Launch> = VecDeque::with_capacity(window);
        for start in (0..len).step_by(BLOCK) {
            let n = BLOCK.min(len - start);
            if running.len() == window {
                running.pop_front().map(Launch::wait).transpose()?;
            }
            running.push_back(self.launch_block(dev, base, start, n, it)?);
        }
        for l in running {
            l.wait()?;
        }
        Ok(())
    }

    /// Launches the pass over the `n` bytes at `start` of the grid (one block).
    fn launch_block(
        &self,
        dev: &Device,
        base: usize,
        start: usize,
        n: usize,
        it: u32,
    ) -> Result<Launch> {
        let declared = [DeclaredAccess::write(base + start, n)];
        let first_row = start / PAGE_SIZE;
        let rows = n / PAGE_SIZE;
        Ok(match self {
            DevicePass::Closure => unreachable!("closure passes launch nothing"),
            DevicePass::HostLaunch => dev.launch_host(&declared, move |runs| {
                for (va, bytes) in runs.write(0).unwrap_or_default() {
                    let r0 = (va - base) / PAGE_SIZE;
                    for (k, row) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        device_row(row, r0 + k, it);
                    }
                }
            })?,
            DevicePass::Cuda { launcher, function } => {
                let config = LaunchConfig::linear(rows.min(4096) as u32, 256);
                // SAFETY: the row stencil takes (u32*, u64, u64, u32) and touches the `rows`
                // rows at the pointer given, which is the declared block.
                #[allow(unsafe_code)]
                unsafe {
                    launcher.launch(dev, function, &config, &declared, |resident, args| {
                        let p = hetmem_cuda::contiguous(resident, 0).ok_or(
                            hetmem::Error::Invalid("a block is not one run on the device"),
                        )?;
                        args.ptr(p).arg(rows as u64).arg(first_row as u64).arg(it);
                        Ok(())
                    })?
                }
            }
        })
    }
}

/// The file's starting grid: read back if it exists (it must be `len` bytes), else created
/// with the initial grid and made durable, so the timed part does not race the first
/// writeback. Returns the content and whether the file was created.
fn prepare_file(path: &Path, len: usize) -> Result<(Vec<u8>, bool)> {
    match std::fs::read(path) {
        Ok(v) if v.len() == len => Ok((v, false)),
        Ok(v) => bail!(
            "{} is {} bytes, --size-mib asks for {len}: remove it or pass its size",
            path.display(),
            v.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut v = vec![0u8; len];
            init_grid(&mut v);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("create {}", path.display()))?;
            std::io::Write::write_all(&mut f, &v)
                .with_context(|| format!("write {}", path.display()))?;
            f.sync_data()
                .with_context(|| format!("fdatasync {}", path.display()))?;
            Ok((v, true))
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// First differing row and byte of two grids.
fn first_mismatch(got: &[u8], want: &[u8]) -> Option<(usize, usize)> {
    let r = got
        .chunks(PAGE_SIZE)
        .zip(want.chunks(PAGE_SIZE))
        .position(|(a, b)| a != b)?;
    let off = got[r * PAGE_SIZE..]
        .iter()
        .zip(&want[r * PAGE_SIZE..])
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    Some((r, r * PAGE_SIZE + off))
}

pub fn run(a: &DemoArgs) -> Result<()> {
    if a.size_mib == 0 || a.device_mib == 0 || a.iters == 0 {
        bail!("--size-mib, --device-mib and --iters must be positive");
    }
    let len = a.size_mib << 20;
    let rows = len / PAGE_SIZE;
    let kind = match a.kind {
        Kind::Private => DeviceKind::Private,
        Kind::Coherent => DeviceKind::Coherent,
    };
    let mut builder = Hetmem::builder();
    let mut cuda = None;
    match a.device {
        DeviceArg::Sim => {
            builder = builder.sim_device_with(SimConfig {
                kind,
                capacity: a.device_mib << 20,
                workers: a.workers.max(1),
            });
        }
        DeviceArg::Cuda => {
            // Registered backing views: migrations copy at the link's speed, no staging.
            let backend = Arc::new(
                CudaBackend::open(0, a.device_mib << 20)
                    .context("open CUDA device 0")?
                    .register_host_memory(true),
            );
            builder = builder.cuda_backend(backend.clone());
            cuda = Some(backend);
        }
    }
    if let Some(t) = &a.trace {
        builder = builder.trace(t);
    }
    let hm = builder
        .build()
        .context("build the hetmem context (needs userfaultfd)")?;
    let dev = hm.device(0).context("device 0")?;
    let pass = match &cuda {
        Some(backend) => {
            let module =
                Module::from_ptx(backend.cuda(), kernels::PTX).context("load the demo's kernel")?;
            let function = module
                .function(kernels::names::ROW_STENCIL)
                .context("the row stencil kernel")?;
            DevicePass::Cuda {
                launcher: CudaLauncher::new(backend.cuda()).context("a launch stream")?,
                function,
            }
        }
        None if a.launch => DevicePass::HostLaunch,
        None => DevicePass::Closure,
    };
    let device_desc = match &cuda {
        Some(b) => format!("CUDA device 0 ({})", b.cuda().info().name),
        None => format!("simulated {:?} device", a.kind),
    };

    println!(
        "hetmem demo: {} grid of u32 ({} rows x {} words, one row per page), {} with {}, {} iterations",
        fmt_bytes(len as u64),
        rows,
        ROW_WORDS,
        device_desc,
        fmt_bytes((a.device_mib << 20) as u64),
        a.iters
    );
    if a.size_mib <= a.device_mib {
        println!("note: the grid fits in device memory, so nothing will be evicted");
    }

    // The grid: managed anonymous memory filled by the CPU (first touch), or a file mapped
    // Shared whose pages come from the file on first touch (by the device, mostly).
    let mut anon = None;
    let mut mapped = None;
    let mut initial = None;
    match &a.file {
        None => {
            let mut g = hm.alloc(len).context("allocate managed memory")?;
            init_grid(&mut g);
            anon = Some(g);
        }
        Some(path) => {
            let (init, created) = prepare_file(path, len)?;
            println!(
                "file: {} ({}), mapped Shared",
                path.display(),
                if created {
                    "created with the initial grid"
                } else {
                    "existing: its content is the starting grid"
                }
            );
            initial = Some(init);
            mapped = Some(
                hm.map_file(path, 0, len, FileMode::Shared)
                    .with_context(|| format!("map {}", path.display()))?,
            );
        }
    }
    let s0 = hm.stats();
    let grid: &mut [u8] = match (&mut anon, &mut mapped) {
        (Some(g), _) => g,
        (None, Some(m)) => m.as_mut_slice().context("a Shared mapping is writable")?,
        (None, None) => unreachable!("one of the two was set"),
    };
    let base = grid.as_ptr() as usize;

    dev.reset_counters();
    let mut t_dev = Duration::ZERO;
    let mut t_cpu = Duration::ZERO;
    let mut sums = Vec::with_capacity(a.iters as usize);
    let t0 = Instant::now();
    for it in 0..a.iters {
        let t = Instant::now();
        pass.run(&dev, base, len, it, a.in_flight)
            .with_context(|| format!("device pass, iteration {it}"))?;
        t_dev += t.elapsed();
        let t = Instant::now();
        sums.push(cpu_pass(grid, it));
        t_cpu += t.elapsed();
    }
    let elapsed = t0.elapsed();
    let st = hm.stats();
    let dc = dev.counters();
    // A file's result goes back to it, durably (flush + fdatasync).
    let t_sync = match &mapped {
        Some(m) => {
            let t = Instant::now();
            m.sync().context("sync the file mapping")?;
            Some(t.elapsed())
        }
        None => None,
    };
    let st_end = hm.stats();

    // The same computation on the CPU alone.
    let t = Instant::now();
    let mut reference = match initial {
        Some(v) => v,
        None => {
            let mut v = vec![0u8; len];
            init_grid(&mut v);
            v
        }
    };
    let mut ref_sums = Vec::with_capacity(a.iters as usize);
    for it in 0..a.iters {
        device_pass_reference(&mut reference, it);
        ref_sums.push(cpu_pass(&mut reference, it));
    }
    let t_ref = t.elapsed();

    report(
        a,
        &ReportIn {
            len,
            rows,
            dev: &dev,
            device_desc: &device_desc,
            launches: !matches!(pass, DevicePass::Closure),
            dc,
            s0,
            st,
            st_end,
            elapsed,
            t_dev,
            t_cpu,
            t_sync,
            t_ref,
        },
    );

    let errors = st_end.errors - s0.errors;
    let (what, mismatch) = match (&anon, &mapped, &a.file) {
        (Some(g), _, _) => ("the grid", first_mismatch(g, &reference)),
        (None, Some(m), Some(path)) => {
            // What the file holds, read through the kernel's page cache, not the mapping.
            let on_disk =
                std::fs::read(path).with_context(|| format!("read back {}", path.display()))?;
            if on_disk.len() != len {
                bail!(
                    "verified: FAILED (the file is {} bytes, not {len})",
                    on_disk.len()
                );
            }
            match first_mismatch(&on_disk, &reference) {
                Some(m) => ("the file", Some(m)),
                // The CPU view must agree with the file too.
                None => ("the mapping", first_mismatch(m.as_slice(), &reference)),
            }
        }
        _ => unreachable!("one of the two was set"),
    };
    let checksum = sums.last().copied().unwrap_or(0);
    match mismatch {
        None if sums == ref_sums && errors == 0 => {
            match &a.file {
                None => println!(
                    "verified: OK ({} bytes identical to the CPU-only reference, final checksum {:#018x})",
                    len, checksum
                ),
                Some(path) => println!(
                    "verified: OK (file {} read back: {} bytes identical to the CPU-only reference, final checksum {:#018x})",
                    path.display(),
                    len,
                    checksum
                ),
            }
            Ok(())
        }
        None if errors != 0 => bail!("verified: FAILED ({errors} runtime errors)"),
        None => bail!("verified: FAILED (per-iteration checksums differ)"),
        Some((r, byte)) => bail!("verified: MISMATCH at row {r}, byte {byte} of {what}"),
    }
}

/// What the summary shows.
struct ReportIn<'a> {
    len: usize,
    rows: usize,
    dev: &'a hetmem::Device,
    device_desc: &'a str,
    /// The device pass ran as launches over declared blocks.
    launches: bool,
    dc: hetmem::DeviceCounters,
    s0: StatsSnapshot,
    /// After the iterations.
    st: StatsSnapshot,
    /// After the sync (file mode), else the same as `st`.
    st_end: StatsSnapshot,
    elapsed: Duration,
    t_dev: Duration,
    t_cpu: Duration,
    t_sync: Option<Duration>,
    t_ref: Duration,
}

fn report(a: &DemoArgs, r: &ReportIn<'_>) {
    let (len, rows, dev, dc, s0, st) = (r.len, r.rows, r.dev, r.dc, r.s0, r.st);
    let touched = 2.0 * len as f64 * f64::from(a.iters);
    let copied = st.bytes_copied - s0.bytes_copied;
    let secs = r.elapsed.as_secs_f64();
    let line = |k: &str, v: String| println!("  {k:<22} {v}");
    line(
        if a.file.is_some() {
            "managed memory (file)"
        } else {
            "managed memory"
        },
        format!("{} ({} pages)", fmt_bytes(len as u64), rows),
    );
    line(
        "device capacity",
        if r.launches {
            format!(
                "{} ({} pages, {}; one launch per 2 MiB block, {} in flight)",
                fmt_bytes((a.device_mib << 20) as u64),
                dev.capacity_pages(),
                r.device_desc,
                in_flight(a.in_flight, dev)
            )
        } else {
            format!(
                "{} ({} pages, {}, {} kernel workers)",
                fmt_bytes((a.device_mib << 20) as u64),
                dev.capacity_pages(),
                r.device_desc,
                a.workers.max(1)
            )
        },
    );
    line("iterations", a.iters.to_string());
    line(
        "time",
        format!(
            "{:.3} s (device kernels {:.3} s, CPU passes {:.3} s); CPU-only reference {:.3} s",
            secs,
            r.t_dev.as_secs_f64(),
            r.t_cpu.as_secs_f64(),
            r.t_ref.as_secs_f64()
        ),
    );
    if let Some(t) = r.t_sync {
        line(
            "sync",
            format!(
                "{:.3} s (flush + fdatasync, after the iterations)",
                t.as_secs_f64()
            ),
        );
    }
    line(
        "pages to device",
        fmt_count(st.pages_to_device - s0.pages_to_device),
    );
    line(
        "pages to system",
        fmt_count(st.pages_to_system - s0.pages_to_system),
    );
    line(
        "pages evicted",
        fmt_count(st.pages_evicted - s0.pages_evicted),
    );
    line("CPU faults", fmt_count(st.cpu_faults - s0.cpu_faults));
    line(
        "device fault rounds",
        format!(
            "{} (context: {} piece faults)",
            fmt_count(dc.faults),
            fmt_count(st.device_faults - s0.device_faults)
        ),
    );
    line(
        "device counters",
        format!(
            "{} pages accessed, {} migrated in, {} migrated out, {} evicted",
            fmt_count(dc.pages),
            fmt_count(dc.migrated_in),
            fmt_count(dc.migrated_out),
            fmt_count(dc.evicted)
        ),
    );
    if a.file.is_some() {
        let end = r.st_end;
        line(
            "pages from file",
            fmt_count(end.pages_from_file - s0.pages_from_file),
        );
        line(
            "pages written back",
            format!(
                "{} ({} during the iterations, {} by the sync)",
                fmt_count(end.pages_written_back - s0.pages_written_back),
                fmt_count(st.pages_written_back - s0.pages_written_back),
                fmt_count(end.pages_written_back - st.pages_written_back)
            ),
        );
    }
    line(
        "bytes copied",
        format!("{} ({})", fmt_count(copied), fmt_bytes(copied)),
    );
    line(
        "effective bandwidth",
        format!(
            "{:.2} GB/s of grid traffic (2 passes x {} x {} iterations), {:.2} GB/s copied between memories",
            touched / secs / 1e9,
            fmt_bytes(len as u64),
            a.iters,
            copied as f64 / secs / 1e9
        ),
    );
    if r.st_end.errors != s0.errors {
        line("runtime errors", fmt_count(r.st_end.errors - s0.errors));
    }
}
