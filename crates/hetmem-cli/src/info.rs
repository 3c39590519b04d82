//! `hetmem info`: what this machine gives hetmem. The kernel and its userfaultfd features (what a
//! context actually gets, probed by making one), whether the kernel has HMM, the fault service's
//! default size, the simulated devices, and every CUDA device the driver shows (name, memory,
//! versions, the features the backend needs), with NVRTC. Nothing here needs a GPU: a missing
//! driver is a line saying so.

use std::fmt::Write as _;

use serde::Serialize;

/// Options of `hetmem info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Info {
    hetmem: &'static str,
    kernel: String,
    cpus: usize,
    service_threads: usize,
    userfaultfd: Uffd,
    kernel_hmm: Hmm,
    simulated_devices: &'static str,
    cuda: Cuda,
}

#[derive(Debug, Serialize)]
struct Uffd {
    /// A context could be made.
    usable: bool,
    /// Why not, when not.
    error: Option<String>,
    features: Vec<&'static str>,
    /// Faults of the kernel's own accesses (read(2) into managed memory) are served.
    kernel_faults: bool,
    /// `vm.unprivileged_userfaultfd`, when readable.
    unprivileged_sysctl: Option<u8>,
}

#[derive(Debug, Serialize)]
struct Hmm {
    /// `CONFIG_DEVICE_PRIVATE` and `CONFIG_HMM_MIRROR` as the kernel's config says, when found.
    device_private: Option<bool>,
    hmm_mirror: Option<bool>,
    /// Where the config was read: /proc/config.gz or /boot/config-RELEASE.
    config_source: Option<String>,
    /// The HMM self-test driver is loaded (`/dev/hmm_dmirror0`).
    test_driver: bool,
}

#[derive(Debug, Serialize)]
struct Cuda {
    /// The driver library was found and initialised.
    driver: bool,
    /// Why not, when not.
    error: Option<String>,
    driver_version: Option<String>,
    nvrtc: Option<String>,
    devices: Vec<CudaDevice>,
}

#[derive(Debug, Serialize)]
struct CudaDevice {
    ordinal: u32,
    name: String,
    total_memory: usize,
    free_memory: usize,
    compute_capability: String,
    multiprocessors: u32,
    vmm: bool,
    host_register: bool,
    /// The GPU can access pageable host memory: CUDA's own HMM (or ATS) is on.
    pageable_memory_access: bool,
    managed_memory: bool,
    error: Option<String>,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The kernel's config: /boot/config-RELEASE, or /proc/config.gz through `gzip -dc`.
fn kernel_config(release: &str) -> Option<(String, String)> {
    let boot = format!("/boot/config-{release}");
    if let Ok(s) = std::fs::read_to_string(&boot) {
        return Some((boot, s));
    }
    let out = std::process::Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        (
            "/proc/config.gz".into(),
            String::from_utf8_lossy(&out.stdout).into(),
        )
    })
}

fn config_has(config: &str, name: &str) -> bool {
    config.lines().any(|l| l == format!("{name}=y"))
}

fn hmm(release: &str) -> Hmm {
    let config = kernel_config(release);
    Hmm {
        device_private: config
            .as_ref()
            .map(|(_, c)| config_has(c, "CONFIG_DEVICE_PRIVATE")),
        hmm_mirror: config
            .as_ref()
            .map(|(_, c)| config_has(c, "CONFIG_HMM_MIRROR")),
        config_source: config.map(|(s, _)| s),
        test_driver: std::path::Path::new("/dev/hmm_dmirror0").exists(),
    }
}

fn uffd() -> Uffd {
    let unprivileged_sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match hetmem::Hetmem::builder().service_threads(1).build() {
        Ok(h) => Uffd {
            usable: true,
            error: None,
            features: h.uffd_features(),
            kernel_faults: h.serves_kernel_faults(),
            unprivileged_sysctl,
        },
        Err(e) => Uffd {
            usable: false,
            error: Some(e.to_string()),
            features: Vec::new(),
            kernel_faults: false,
            unprivileged_sysctl,
        },
    }
}

fn cuda() -> Cuda {
    let nvrtc = hetmem_cuda::nvrtc::version()
        .map(|(a, b)| format!("{a}.{b}"))
        .map_err(|e| format!("none ({e})"));
    let nvrtc = Some(nvrtc.unwrap_or_else(|e| e));
    if let Err(e) = hetmem_cuda::driver() {
        return Cuda {
            driver: false,
            error: Some(e.to_string()),
            driver_version: None,
            nvrtc,
            devices: Vec::new(),
        };
    }
    let driver_version = hetmem_cuda::driver_version()
        .ok()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
    let count = match hetmem_cuda::device_count() {
        Ok(n) => n,
        Err(e) => {
            return Cuda {
                driver: true,
                error: Some(e.to_string()),
                driver_version,
                nvrtc,
                devices: Vec::new(),
            }
        }
    };
    let devices = (0..count)
        .map(|i| match hetmem_cuda::Cuda::open(i) {
            Ok(c) => {
                let d = c.info();
                CudaDevice {
                    ordinal: i,
                    name: d.name.clone(),
                    total_memory: d.total_memory,
                    free_memory: d.free_memory,
                    compute_capability: d.compute_capability_string(),
                    multiprocessors: d.multiprocessors,
                    vmm: d.vmm_supported,
                    host_register: d.host_register_supported,
                    pageable_memory_access: d.pageable_memory_access,
                    managed_memory: d.managed_memory,
                    error: None,
                }
            }
            Err(e) => CudaDevice {
                ordinal: i,
                name: String::new(),
                total_memory: 0,
                free_memory: 0,
                compute_capability: String::new(),
                multiprocessors: 0,
                vmm: false,
                host_register: false,
                pageable_memory_access: false,
                managed_memory: false,
                error: Some(e.to_string()),
            },
        })
        .collect();
    Cuda {
        driver: true,
        error: None,
        driver_version,
        nvrtc,
        devices,
    }
}

fn gib(bytes: usize) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn text(i: &Info) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "hetmem {}", i.hetmem);
    let _ = writeln!(s, "kernel: Linux {}", i.kernel);
    let _ = writeln!(
        s,
        "CPUs: {}; fault service threads by default: {} (HETMEM_SERVICE_THREADS, HetmemBuilder::service_threads)",
        i.cpus, i.service_threads
    );
    let u = &i.userfaultfd;
    match &u.error {
        None => {
            let _ = writeln!(s, "userfaultfd: {}", u.features.join(", "));
            let _ = writeln!(
                s,
                "  kernel accesses to managed memory (read(2) into it) served: {}",
                yes(u.kernel_faults)
            );
        }
        Some(e) => {
            let _ = writeln!(s, "userfaultfd: not usable: {e}");
        }
    }
    if let Some(v) = u.unprivileged_sysctl {
        let _ = writeln!(s, "  vm.unprivileged_userfaultfd = {v}");
    }
    let h = &i.kernel_hmm;
    let _ = match (&h.config_source, h.device_private, h.hmm_mirror) {
        (Some(src), Some(dp), Some(mirror)) => writeln!(
            s,
            "kernel HMM: CONFIG_DEVICE_PRIVATE {}, CONFIG_HMM_MIRROR {} (from {src}); self-test driver loaded: {}",
            yes(dp),
            yes(mirror),
            yes(h.test_driver)
        ),
        _ => writeln!(
            s,
            "kernel HMM: unknown (no /boot/config-{} nor /proc/config.gz); self-test driver loaded: {}",
            i.kernel,
            yes(h.test_driver)
        ),
    };
    let _ = writeln!(s, "simulated devices: {}", i.simulated_devices);
    let c = &i.cuda;
    match &c.error {
        Some(e) if !c.driver => {
            let _ = writeln!(s, "CUDA: no driver: {e}");
        }
        Some(e) => {
            let _ = writeln!(s, "CUDA: driver found, devices not listed: {e}");
        }
        None => {
            let _ = writeln!(
                s,
                "CUDA: driver {}, {} device(s)",
                c.driver_version.as_deref().unwrap_or("?"),
                c.devices.len()
            );
        }
    }
    for d in &c.devices {
        if let Some(e) = &d.error {
            let _ = writeln!(s, "  cuda:{}: cannot open: {e}", d.ordinal);
            continue;
        }
        let _ = writeln!(
            s,
            "  cuda:{}: {}, {} ({} free), compute {}, {} SMs; VMM {}, host registration {}, pageable memory access (CUDA's HMM) {}, managed memory {}",
            d.ordinal,
            d.name,
            gib(d.total_memory),
            gib(d.free_memory),
            d.compute_capability,
            d.multiprocessors,
            yes(d.vmm),
            yes(d.host_register),
            yes(d.pageable_memory_access),
            yes(d.managed_memory)
        );
    }
    if let Some(n) = &c.nvrtc {
        let _ = writeln!(s, "NVRTC: {n}");
    }
    s
}

/// Runs `hetmem info`.
pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let kernel = kernel_release();
    let info = Info {
        hetmem: env!("CARGO_PKG_VERSION"),
        kernel_hmm: hmm(&kernel),
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        service_threads: hetmem::default_service_threads(),
        userfaultfd: uffd(),
        simulated_devices:
            "private or coherent, any number up to 8, sized per run (demo/bench --device-mib)",
        cuda: cuda(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", text(&info));
    }
    Ok(())
}
