//! Measures what the CUDA backend will be built on, on the machine it runs on, and prints one
//! JSON object (one line) and then the same as a table.
//!
//! ```text
//! probe [--json FILE]
//! ```
//!
//! Sections: device info; pinned (`cuMemHostAlloc`), registered-memfd and pageable copy
//! bandwidth for 256 MiB, host to device and back; VMM costs per 2 MiB chunk; kernel launch
//! overhead (empty kernel, medians of 1000); the same-address view's facts; CUDA managed
//! memory (1 GiB, or less where free memory is short): GPU first touch by faults, then after
//! `cuMemPrefetchAsync_v2`. A section that fails records its error and the rest go on. It
//! takes a few seconds on an H200.

// Kernel launches are unsafe by contract; each says why it holds.
#![allow(unsafe_code)]

use std::time::Instant;

use hetmem_cuda::kernels::{self, names};
use hetmem_cuda::util::{maps_overlapping, read_self_maps};
use hetmem_cuda::{
    chunk_size, Cuda, DeviceBuffer, DeviceInfo, Error, HostMem, HostRegistration, HostSpan,
    KernelArgs, LaunchConfig, Location, ManagedBuffer, Mapping, MemfdView, Module, PhysicalChunk,
    PinnedBuffer, Reservation, SameAddressView, Stream,
};
use serde_json::{json, Map, Value};

const MIB: usize = 1 << 20;
/// Bytes per copy measurement.
const COPY_BYTES: usize = 256 * MIB;
/// Timed runs per copy measurement (after one warm-up).
const COPY_RUNS: usize = 5;
/// Managed memory: at most this much, and at most 1/16 of free device memory.
const MANAGED_BYTES: usize = 1 << 30;

type R<T> = Result<T, Error>;

fn gbs(bytes: usize, secs: f64) -> f64 {
    round2(bytes as f64 / secs / 1e9)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn info_json(i: &DeviceInfo) -> Value {
    json!({
        "name": i.name,
        "ordinal": i.ordinal,
        "total_memory_GiB": round2(i.total_memory as f64 / (1u64 << 30) as f64),
        "free_memory_GiB": round2(i.free_memory as f64 / (1u64 << 30) as f64),
        "driver_version": i.driver_version,
        "compute_capability": i.compute_capability_string(),
        "multiprocessors": i.multiprocessors,
        "pci_bus_id": i.pci_bus_id,
        "host_register_supported": i.host_register_supported,
        "vmm_supported": i.vmm_supported,
        "vmm_granularity": i.vmm_granularity,
        "vmm_granularity_recommended": i.vmm_granularity_recommended,
        "unified_addressing": i.unified_addressing,
        "managed_memory": i.managed_memory,
        "concurrent_managed_access": i.concurrent_managed_access,
        "pageable_memory_access": i.pageable_memory_access,
        "host_pointer_for_registered_mem": i.host_pointer_for_registered_mem,
        "nvrtc_version": hetmem_cuda::nvrtc::version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|e| e.to_string()),
    })
}

/// Host-to-device and device-to-host rates between `host` and `dev` (same length): one
/// 256 MiB copy, and 128 copies of 2 MiB on one stream; medians of COPY_RUNS.
fn copy_rates(s: &Stream, dev: &DeviceBuffer, host: HostSpan<'_>) -> R<Value> {
    let n = host.len();
    let piece = 2 * MIB;
    let mut results = Map::new();
    for (name, pieces) in [("", false), ("_2MiB_pieces", true)] {
        let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
        for run in 0..=COPY_RUNS {
            let t = Instant::now();
            if pieces {
                for off in (0..n).step_by(piece) {
                    s.copy_h2d(dev.span(off, piece)?, host.sub(off, piece)?)?;
                }
            } else {
                s.copy_h2d(dev.span(0, n)?, host)?;
            }
            s.synchronize()?;
            let th = t.elapsed().as_secs_f64();
            let t = Instant::now();
            if pieces {
                for off in (0..n).step_by(piece) {
                    s.copy_d2h(host.sub(off, piece)?, dev.span(off, piece)?)?;
                }
            } else {
                s.copy_d2h(host, dev.span(0, n)?)?;
            }
            s.synchronize()?;
            let td = t.elapsed().as_secs_f64();
            if run > 0 {
                h2d.push(gbs(n, th));
                d2h.push(gbs(n, td));
            }
        }
        results.insert(format!("h2d{name}_GBs"), json!(median(&mut h2d)));
        results.insert(format!("d2h{name}_GBs"), json!(median(&mut d2h)));
    }
    results.insert("bytes".into(), json!(n));
    results.insert("runs".into(), json!(COPY_RUNS));
    Ok(Value::Object(results))
}

fn pinned(cuda: &Cuda) -> R<Value> {
    let t = Instant::now();
    let host = PinnedBuffer::new(cuda, COPY_BYTES)?;
    let alloc_s = t.elapsed().as_secs_f64();
    host.fill(0, COPY_BYTES, 1)?;
    let dev = DeviceBuffer::new(cuda, COPY_BYTES)?;
    let s = Stream::new(cuda)?;
    let mut v = copy_rates(&s, &dev, host.whole())?;
    v["cuMemHostAlloc_ms"] = json!(round2(alloc_s * 1e3));
    Ok(v)
}

fn registered(cuda: &Cuda) -> R<Value> {
    let t = Instant::now();
    let view = std::sync::Arc::new(MemfdView::create("hetmem-probe", COPY_BYTES)?);
    let create_s = t.elapsed().as_secs_f64();
    view.fill(0, COPY_BYTES, 2)?;
    let t = Instant::now();
    let reg = HostRegistration::of_view(cuda, view.clone())?;
    let register_s = t.elapsed().as_secs_f64();
    let dev = DeviceBuffer::new(cuda, COPY_BYTES)?;
    let s = Stream::new(cuda)?;
    let mut v = copy_rates(&s, &dev, reg.whole())?;
    // The data went there and back: spot-check it.
    let ok = view.to_vec(COPY_BYTES / 2, 4096)?.iter().all(|&b| b == 2);
    let t = Instant::now();
    drop(reg);
    v["memfd_create_and_populate_ms"] = json!(round2(create_s * 1e3));
    v["cuMemHostRegister_ms"] = json!(round2(register_s * 1e3));
    v["cuMemHostUnregister_ms"] = json!(round2(t.elapsed().as_secs_f64() * 1e3));
    v["data_ok"] = json!(ok);
    Ok(v)
}

fn pageable(cuda: &Cuda) -> R<Value> {
    let mut host = vec![3u8; COPY_BYTES];
    let dev = DeviceBuffer::new(cuda, COPY_BYTES)?;
    let s = Stream::new(cuda)?;
    let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
    for run in 0..=3 {
        let t = Instant::now();
        s.copy_h2d_blocking(dev.whole(), &host)?;
        let th = t.elapsed().as_secs_f64();
        let t = Instant::now();
        s.copy_d2h_blocking(&mut host, dev.whole())?;
        let td = t.elapsed().as_secs_f64();
        if run > 0 {
            h2d.push(gbs(COPY_BYTES, th));
            d2h.push(gbs(COPY_BYTES, td));
        }
    }
    Ok(json!({
        "h2d_GBs": median(&mut h2d),
        "d2h_GBs": median(&mut d2h),
        "bytes": COPY_BYTES,
        "runs": 3,
        "data_ok": host[COPY_BYTES - 1] == 3,
    }))
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

fn vmm(cuda: &Cuda) -> R<Value> {
    let chunk = chunk_size(cuda)?;
    let n = 64;
    let res = Reservation::new(cuda, n * chunk)?;
    let (mut create, mut map, mut unmap, mut release, mut cycle) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut chunks = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        chunks.push(PhysicalChunk::new(cuda, chunk)?);
        create.push(us(t));
    }
    let mut maps = Vec::new();
    for (i, c) in chunks.into_iter().enumerate() {
        let t = Instant::now();
        maps.push(Some(Mapping::new(&res, i * chunk, c)?));
        map.push(us(t));
    }
    // Unmap + map + set access of one chunk at a time, 200 times.
    for k in 0..200 {
        let i = k % n;
        let t = Instant::now();
        let c = maps[i].take().expect("mapped").unmap()?;
        maps[i] = Some(Mapping::new(&res, i * chunk, c)?);
        cycle.push(us(t));
    }
    let mut freed = Vec::new();
    for m in maps.iter_mut() {
        let t = Instant::now();
        freed.push(m.take().expect("mapped").unmap()?);
        unmap.push(us(t));
    }
    for c in freed {
        let t = Instant::now();
        drop(c);
        release.push(us(t));
    }
    let t = Instant::now();
    drop(res);
    let free_us = us(t);
    let med = |v: &mut Vec<f64>| round2(median(v));
    Ok(json!({
        "chunk_bytes": chunk,
        "chunks": n,
        "cuMemCreate_us_median": med(&mut create),
        "cuMemMap_and_SetAccess_us_median": med(&mut map),
        "remap_cycle_us_median": med(&mut cycle),
        "remap_cycle_us_p99": round2(percentile(&mut cycle, 0.99)),
        "cuMemUnmap_us_median": med(&mut unmap),
        "cuMemRelease_us_median": med(&mut release),
        "cuMemAddressFree_us": round2(free_us),
    }))
}

fn launch(cuda: &Cuda) -> R<Value> {
    let t = Instant::now();
    let module = Module::from_ptx(cuda, kernels::PTX)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let f = module.function(names::EMPTY)?;
    let s = Stream::new(cuda)?;
    let args = KernelArgs::new();
    let cfg = LaunchConfig::single();
    // SAFETY: hetmem_empty takes no arguments and touches no memory.
    let go = || unsafe { s.launch(&f, &cfg, &args) };
    for _ in 0..20 {
        go()?;
    }
    s.synchronize()?;
    let (mut round_trip, mut enqueue) = (Vec::with_capacity(1000), Vec::with_capacity(1000));
    for _ in 0..1000 {
        let t = Instant::now();
        go()?;
        s.synchronize()?;
        round_trip.push(us(t));
    }
    let all = Instant::now();
    for _ in 0..1000 {
        let t = Instant::now();
        go()?;
        enqueue.push(us(t));
    }
    s.synchronize()?;
    let back_to_back = us(all) / 1000.0;
    Ok(json!({
        "ptx_jit_load_ms": round2(load_ms),
        "launch_and_sync_us_median": round2(median(&mut round_trip)),
        "launch_and_sync_us_p99": round2(percentile(&mut round_trip, 0.99)),
        "launch_enqueue_us_median": round2(median(&mut enqueue)),
        "back_to_back_us_per_launch": round2(back_to_back),
        "launches": 1000,
    }))
}

fn same_address(cuda: &Cuda) -> R<Value> {
    let chunk = chunk_size(cuda)?;
    let len = 2 * chunk;
    let dma = MemfdView::create("hetmem-probe-same-va", len)?;
    let t = Instant::now();
    let mut view = SameAddressView::new(cuda, dma.fd(), 0, len)?;
    let setup_us = us(t);
    let x = view.addr();
    let after_mmap = view.cpu_view_intact()?;
    // The CPU touches X only while /proc/self/maps shows the memfd there (a driver that had
    // replaced it would make the access fault).
    let mut cpu_write_reaches_memfd = None;
    if after_mmap {
        view.write(0, &[7u8; 64])?;
        cpu_write_reaches_memfd = Some(dma.to_vec(0, 64)?.iter().all(|&b| b == 7));
    }
    view.map_chunk(0, PhysicalChunk::new(cuda, chunk)?)?;
    view.map_chunk(1, PhysicalChunk::new(cuda, chunk)?)?;
    let after_map = view.cpu_view_intact()?;
    // The GPU writes device memory at X; the CPU's bytes at X stay its own.
    let s = Stream::new(cuda)?;
    s.memset_d8(view.device_span(0, len)?, 9)?;
    s.synchronize()?;
    let mut b = [0u8; 1];
    s.copy_d2h_blocking(&mut b, view.device_span(0, 1)?)?;
    let cpu_byte = if after_map {
        Some(view.to_vec(0, 1)?[0])
    } else {
        None
    };
    let c = view.unmap_chunk(1)?;
    let after_unmap = view.cpu_view_intact()?;
    view.map_chunk(1, c)?;
    let t = Instant::now();
    drop(view);
    let teardown_us = us(t);
    let left: Vec<String> = maps_overlapping(&read_self_maps()?, x, len as u64)
        .iter()
        .map(|e| format!("{:#x}-{:#x} {} {}", e.start, e.end, e.perms, e.name))
        .collect();
    Ok(json!({
        "address": format!("{x:#x}"),
        "setup_us": round2(setup_us),
        "cpu_view_after_map_fixed": after_mmap,
        "cpu_write_reaches_memfd": cpu_write_reaches_memfd,
        "cpu_view_after_cuMemMap": after_map,
        "cpu_view_after_cuMemUnmap": after_unmap,
        "gpu_sees_device_byte": b[0],
        "cpu_sees_memfd_byte": cpu_byte,
        "teardown_us": round2(teardown_us),
        "mapped_at_address_after_teardown": left,
    }))
}

fn managed(cuda: &Cuda) -> R<Value> {
    let (free, _) = cuda.mem_info()?;
    let len = MANAGED_BYTES.min(free / 16) / (2 * MIB) * (2 * MIB);
    let m = ManagedBuffer::new(cuda, len)?;
    let k = Module::from_ptx(cuda, kernels::PTX)?;
    let sum = k.function(names::SUM_U64)?;
    let out = DeviceBuffer::new(cuda, 8)?;
    let s = Stream::new(cuda)?;
    let words = (len / 8) as u64;
    let cfg = LaunchConfig::linear(1024, 512);
    let read_all = || -> R<(f64, bool)> {
        s.memset_d8(out.whole(), 0)?;
        s.synchronize()?;
        let mut a = KernelArgs::new();
        a.ptr(m.whole().ptr()).arg(words).ptr(out.ptr());
        let t = Instant::now();
        // SAFETY: hetmem_sum_u64(const u64*, u64, u64*) over the managed buffer's `words`
        // words, into `out`; both live until the synchronisation below.
        unsafe { s.launch(&sum, &cfg, &a) }?;
        s.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let mut got = [0u8; 8];
        s.copy_d2h_blocking(&mut got, out.span(0, 8)?)?;
        let want = 0x0101_0101_0101_0101u64.wrapping_mul(words);
        Ok((gbs(len, secs), u64::from_ne_bytes(got) == want))
    };
    let t = Instant::now();
    m.fill(0, len, 1)?;
    let cpu_init = gbs(len, t.elapsed().as_secs_f64());
    let (first_touch, ok1) = read_all()?;
    let (resident, ok2) = read_all()?;
    let t = Instant::now();
    m.prefetch(&s, Location::Host)?;
    s.synchronize()?;
    let to_host = gbs(len, t.elapsed().as_secs_f64());
    let t = Instant::now();
    m.prefetch(&s, Location::Device)?;
    s.synchronize()?;
    let to_device = gbs(len, t.elapsed().as_secs_f64());
    let (after_prefetch, ok3) = read_all()?;
    Ok(json!({
        "bytes": len,
        "cpu_first_touch_GBs": cpu_init,
        "gpu_first_touch_faults_GBs": first_touch,
        "gpu_read_resident_GBs": resident,
        "prefetch_to_host_GBs": to_host,
        "prefetch_to_device_GBs": to_device,
        "gpu_read_after_prefetch_GBs": after_prefetch,
        "sums_ok": ok1 && ok2 && ok3,
    }))
}

fn section(out: &mut Map<String, Value>, name: &str, f: impl FnOnce() -> R<Value>) {
    let t = Instant::now();
    let mut v = match f() {
        Ok(v) => v,
        Err(e) => json!({ "error": e.to_string() }),
    };
    v["seconds"] = json!(round2(t.elapsed().as_secs_f64()));
    eprintln!("probe: {name} done in {:.2} s", t.elapsed().as_secs_f64());
    out.insert(name.to_string(), v);
}

fn print_table(out: &Map<String, Value>) {
    println!();
    println!("{:<24} {:<36} value", "section", "measurement");
    println!("{}", "-".repeat(90));
    for (section, v) in out {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let shown = match x {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    println!("{section:<24} {k:<36} {shown}");
                }
            }
            other => println!("{section:<24} {:<36} {other}", ""),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: probe [--json FILE]");
        return;
    }
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let start = Instant::now();
    let mut out = Map::new();
    let cuda = match Cuda::open(0) {
        Ok(c) => c,
        Err(e) => {
            let v = json!({ "error": e.to_string() });
            println!("{v}");
            if let Some(p) = json_path {
                let _ = std::fs::write(p, v.to_string());
            }
            std::process::exit(2);
        }
    };
    out.insert("device".into(), info_json(cuda.info()));
    out.insert(
        "open_seconds".into(),
        json!(round2(start.elapsed().as_secs_f64())),
    );
    section(&mut out, "pinned_copy", || pinned(&cuda));
    section(&mut out, "registered_memfd_copy", || registered(&cuda));
    section(&mut out, "pageable_copy", || pageable(&cuda));
    section(&mut out, "vmm", || vmm(&cuda));
    section(&mut out, "launch", || launch(&cuda));
    section(&mut out, "same_address", || same_address(&cuda));
    // Last: managed memory is the one that could upset the device.
    section(&mut out, "managed", || managed(&cuda));
    out.insert(
        "total_seconds".into(),
        json!(round2(start.elapsed().as_secs_f64())),
    );
    let v = Value::Object(out);
    println!("{v}");
    if let Some(p) = json_path {
        if let Err(e) = std::fs::write(&p, format!("{v}\n")) {
            eprintln!("probe: cannot write {p}: {e}");
        }
    }
    if let Value::Object(m) = &v {
        print_table(m);
    }
}
