//! `hetmem`: the demo (a stencil over managed memory larger than device memory, verified against
//! a CPU-only run), the benchmarks (ratios against native baselines), trace pages, and `info`
//! (what this machine gives hetmem).

mod baseline;
mod bench;
mod bench_cuda;
mod demo;
mod info;
mod plot;
mod report;
mod trace_html;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hetmem",
    version,
    about = "User-space HMM on userfaultfd: demo and benchmarks on a simulated device"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Iterative stencil over managed memory larger than device memory, verified byte for byte
    /// against the same computation on the CPU alone.
    Demo(demo::DemoArgs),
    /// Benchmarks: every figure as a ratio against a native baseline measured in the same run.
    Bench(bench::BenchArgs),
    /// Renders a trace file (`HetmemBuilder::trace`, `HETMEM_TRACE`, `demo --trace`) as one
    /// self-contained HTML page: residency over time, migration traffic, faults per processor,
    /// policy decisions.
    Trace(trace_html::TraceArgs),
    /// What this machine gives hetmem: kernel, userfaultfd features, kernel HMM, the fault
    /// service's size, simulated and CUDA devices (name, memory, driver and NVRTC versions).
    Info(info::InfoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Trace(a) => trace_html::run(a),
        Cmd::Info(a) => info::run(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hetmem: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
