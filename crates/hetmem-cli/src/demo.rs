//! `hetmem demo`: an iterative stencil over managed memory larger than device memory.
//!
//! The grid is `rows x 1024` u32, one row per page. Each iteration a device kernel does a
//! horizontal stencil inside every row (wrap-around), then the CPU reads every row back and
//! mixes it with the row above, so pages go to the device (evicting others: the grid does not
//! fit) and come back. A plain `Vec` computed by the same functions on the CPU alone must match
//! byte for byte.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hetmem::{DeviceKind, Hetmem, SimConfig, PAGE_SIZE};

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

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Grid size in MiB (managed memory).
    #[arg(long, default_value_t = 64)]
    pub size_mib: usize,
    /// Simulated device memory in MiB.
    #[arg(long, default_value_t = 16)]
    pub device_mib: usize,
    /// Stencil iterations (device kernel + CPU pass each).
    #[arg(long, default_value_t = 8)]
    pub iters: u32,
    /// Simulated device kind.
    #[arg(long, value_enum, default_value_t = Kind::Private)]
    pub kind: Kind,
    /// Device kernel worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
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
    let hm = Hetmem::builder()
        .sim_device_with(SimConfig {
            kind,
            capacity: a.device_mib << 20,
            workers: a.workers.max(1),
        })
        .build()
        .context("build the hetmem context (needs userfaultfd)")?;
    let dev = hm.device(0).context("device 0")?;

    println!(
        "hetmem demo: {} grid of u32 ({} rows x {} words, one row per page), {:?} device with {}, {} iterations",
        fmt_bytes(len as u64),
        rows,
        ROW_WORDS,
        a.kind,
        fmt_bytes((a.device_mib << 20) as u64),
        a.iters
    );
    if a.size_mib <= a.device_mib {
        println!("note: the grid fits in device memory, so nothing will be evicted");
    }

    // Managed grid, filled by the CPU (first touch).
    let mut grid = hm.alloc(len).context("allocate managed memory")?;
    init_grid(&mut grid);
    let base = grid.addr();

    let s0 = hm.stats();
    dev.reset_counters();
    let mut t_dev = Duration::ZERO;
    let mut t_cpu = Duration::ZERO;
    let mut sums = Vec::with_capacity(a.iters as usize);
    let t0 = Instant::now();
    for it in 0..a.iters {
        let t = Instant::now();
        dev.kernel_write(base, len, |run_addr, bytes| {
            let r0 = (run_addr - base) / PAGE_SIZE;
            for (k, row) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
                device_row(row, r0 + k, it);
            }
        })
        .with_context(|| format!("device kernel, iteration {it}"))?;
        t_dev += t.elapsed();
        let t = Instant::now();
        sums.push(cpu_pass(&mut grid, it));
        t_cpu += t.elapsed();
    }
    let elapsed = t0.elapsed();
    let st = hm.stats();
    let dc = dev.counters();

    // The same computation on the CPU alone.
    let t = Instant::now();
    let mut reference = vec![0u8; len];
    init_grid(&mut reference);
    let mut ref_sums = Vec::with_capacity(a.iters as usize);
    for it in 0..a.iters {
        device_pass_reference(&mut reference, it);
        ref_sums.push(cpu_pass(&mut reference, it));
    }
    let t_ref = t.elapsed();

    let touched = 2.0 * len as f64 * f64::from(a.iters);
    let copied = st.bytes_copied - s0.bytes_copied;
    let secs = elapsed.as_secs_f64();
    let line = |k: &str, v: String| println!("  {k:<22} {v}");
    line(
        "managed memory",
        format!("{} ({} pages)", fmt_bytes(len as u64), rows),
    );
    line(
        "device capacity",
        format!(
            "{} ({} pages, {:?}, {} kernel workers)",
            fmt_bytes((a.device_mib << 20) as u64),
            dev.capacity_pages(),
            a.kind,
            a.workers.max(1)
        ),
    );
    line("iterations", a.iters.to_string());
    line(
        "time",
        format!(
            "{:.3} s (device kernels {:.3} s, CPU passes {:.3} s); CPU-only reference {:.3} s",
            secs,
            t_dev.as_secs_f64(),
            t_cpu.as_secs_f64(),
            t_ref.as_secs_f64()
        ),
    );
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
    if st.errors != s0.errors {
        line("runtime errors", fmt_count(st.errors - s0.errors));
    }

    let mismatch = grid
        .chunks(PAGE_SIZE)
        .zip(reference.chunks(PAGE_SIZE))
        .position(|(a, b)| a != b);
    match mismatch {
        None if sums == ref_sums && st.errors == s0.errors => {
            println!("verified: OK ({} bytes identical to the CPU-only reference, final checksum {:#018x})", len, sums.last().copied().unwrap_or(0));
            Ok(())
        }
        None if st.errors != s0.errors => bail!(
            "verified: FAILED ({} runtime errors)",
            st.errors - s0.errors
        ),
        None => bail!("verified: FAILED (per-iteration checksums differ)"),
        Some(r) => {
            let off = grid[r * PAGE_SIZE..]
                .iter()
                .zip(&reference[r * PAGE_SIZE..])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!(
                "verified: MISMATCH at row {r}, byte {} of the grid",
                r * PAGE_SIZE + off
            )
        }
    }
}
