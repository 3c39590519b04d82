//! The kernel's HMM selftest scenarios that apply to a GPU (`crates/hetmem/tests/hmm_tests.rs`
//! runs them all on simulated devices), here against CUDA device 0 through hetmem's runtime:
//! device reads and writes (staged through the copy engine), migration both ways, CPU fault-back,
//! release, eviction under a small cap, exclusive access; and a stress test where CPU threads,
//! kernel launches over declared blocks and migrations work on checksummed blocks at once.
//!
//! Without CUDA each test prints one line, `skipped: <test>: <why>`, and passes, unless
//! `HETMEM_REQUIRE_CUDA=1`. `scripts/gpu-check.sh` runs this binary on the GPU machine;
//! `scripts/fake-cuda-check.sh` against the fake driver, which checks the logic, not CUDA.

mod common;

use std::sync::{Arc, Mutex};

use common::{assert_bytes_eq, open, pattern, watchdog};
use hetmem::{DeclaredAccess, DeviceId, Hetmem, Location, PAGE_SIZE};
use hetmem_cuda::{kernels, CudaBackend, CudaBuilderExt, CudaLauncher, LaunchConfig, Module};

const MIB: usize = 1 << 20;
const BLOCK: usize = 2 * MIB;

/// The fake driver keeps one table for every thread; tests take turns, as on a GPU they would
/// share the device anyway.
static DEVICE: Mutex<()> = Mutex::new(());

/// A context with CUDA device 0 capped at `cap` bytes; `None` after the skip line.
fn context(test: &str, cap: usize) -> Option<(Hetmem, Arc<CudaBackend>)> {
    let cuda = open(test)?;
    let backend = Arc::new(CudaBackend::new(&cuda, cap).expect("a CUDA backend"));
    let h = Hetmem::builder()
        .cuda_backend(backend.clone())
        .thrashing(None)
        .build()
        .expect("a hetmem context");
    Some((h, backend))
}

fn d0() -> DeviceId {
    DeviceId::new(0).expect("device 0")
}

/// `anon_read`, `anon_write`: device reads see what the CPU wrote; device writes are what the
/// CPU then reads.
#[test]
fn read_and_write() {
    watchdog("read_and_write", 120, || {
        let _one = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((h, backend)) = context("read_and_write", 16 * MIB) else {
            return;
        };
        let dev = h.device(0).expect("device 0");
        let len = 3 * BLOCK + 5 * PAGE_SIZE;
        let want = pattern(len, 11);
        let mut buf = h.alloc(len).unwrap();
        buf.copy_from_slice(&want);
        let got = dev.read(buf.addr(), len).expect("device read");
        assert_bytes_eq("device read", &got, &want);
        assert!(dev.counters().faults >= 1);
        let new = pattern(len, 12);
        dev.write(buf.addr(), &new).expect("device write");
        assert_bytes_eq("CPU after the device write", &buf, &new);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// `migrate`, `migrate_fault`, `migrate_release`: to the device and back by CPU faults, and by
/// releasing the device.
#[test]
fn migrate_fault_back_and_release() {
    watchdog("migrate_fault_back_and_release", 120, || {
        let _one = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((h, backend)) = context("migrate_fault_back_and_release", 16 * MIB) else {
            return;
        };
        let dev = h.device(0).expect("device 0");
        let len = 4 * BLOCK;
        let want = pattern(len, 21);
        let mut buf = h.alloc(len).unwrap();
        buf.copy_from_slice(&want);
        dev.migrate_to_device(buf.addr(), len).unwrap();
        let snap = dev.snapshot(buf.addr(), len).unwrap();
        assert!(snap.iter().all(|p| p.location == Location::PrivateLocal));
        assert_bytes_eq("fault-back", &buf, &want);
        dev.migrate_to_device(buf.addr(), len).unwrap();
        dev.release().unwrap();
        let snap = dev.snapshot(buf.addr(), len).unwrap();
        assert!(snap.iter().all(|p| p.location == Location::System));
        assert_bytes_eq("after release", &buf, &want);
        assert_eq!(h.device_pages_used(d0()), 0);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// Eviction under a cap a quarter of the data: every block passes through the device, and
/// the data survives.
#[test]
fn eviction_under_a_small_cap() {
    watchdog("eviction_under_a_small_cap", 120, || {
        let _one = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((h, backend)) = context("eviction_under_a_small_cap", 4 * MIB) else {
            return;
        };
        let dev = h.device(0).expect("device 0");
        let len = 16 * MIB;
        let want = pattern(len, 31);
        let mut buf = h.alloc(len).unwrap();
        buf.copy_from_slice(&want);
        for b in 0..len / BLOCK {
            dev.migrate_to_device(buf.addr() + b * BLOCK, BLOCK)
                .unwrap();
            assert!(h.device_pages_used(d0()) as usize * PAGE_SIZE <= 4 * MIB);
        }
        assert!(h.stats().pages_evicted > 0);
        let got = dev.read(buf.addr(), len).unwrap();
        assert_bytes_eq("device read over 4x the cap", &got, &want);
        assert_bytes_eq("CPU read", &buf, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// `exclusive`: the device maps pages exclusively; a CPU access revokes it.
#[test]
fn exclusive_until_the_cpu_touches() {
    watchdog("exclusive_until_the_cpu_touches", 120, || {
        let _one = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((h, _backend)) = context("exclusive_until_the_cpu_touches", 16 * MIB) else {
            return;
        };
        let dev = h.device(0).expect("device 0");
        let mut buf = h.alloc(BLOCK).unwrap();
        buf.fill(7);
        dev.exclusive(buf.addr(), BLOCK).unwrap();
        assert!(dev.check_exclusive(buf.addr(), BLOCK).unwrap());
        assert_eq!(buf[PAGE_SIZE], 7);
        assert!(!dev.check_exclusive(buf.addr(), BLOCK).unwrap());
    });
}

/// CPU threads, kernel launches and migrations on checksummed blocks at once, over twice the
/// cap: each thread owns its blocks and keeps count of what it added to each; at the end every
/// byte is its start value plus its block's count. 0 mismatches.
#[test]
fn stress_cpu_threads_launches_and_migrations() {
    watchdog("stress_cpu_threads_launches_and_migrations", 240, || {
        let _one = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((h, backend)) = context("stress_cpu_threads_launches_and_migrations", 8 * MIB)
        else {
            return;
        };
        let module = Module::from_ptx(backend.cuda(), kernels::PTX).expect("the shipped PTX");
        let add = module.function(kernels::names::ADD_U8).expect("add_u8");
        let launcher = CudaLauncher::new(backend.cuda()).expect("a launcher");
        let dev = h.device(0).expect("device 0");
        let (threads, per_thread, rounds) = (4usize, 2usize, 24usize);
        let len = threads * per_thread * BLOCK;
        let start = pattern(len, 41);
        let mut buf = h.alloc(len).unwrap();
        buf.copy_from_slice(&start);
        let base = buf.addr();
        let counts: Vec<u8> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (dev, add, launcher) = (&dev, &add, &launcher);
                    s.spawn(move || {
                        let mut counts = vec![0u8; per_thread];
                        let mut x = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        for round in 0..rounds {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let k = (x as usize) % per_thread;
                            let addr = base + (t * per_thread + k) * BLOCK;
                            match round % 3 {
                                0 => {
                                    // The CPU adds 1 to every byte (faulting the block home).
                                    let p = addr as *mut u8;
                                    for i in 0..BLOCK {
                                        // SAFETY: managed memory of this test, the block
                                        // owned by this thread alone.
                                        #[allow(unsafe_code)]
                                        unsafe {
                                            *p.add(i) = (*p.add(i)).wrapping_add(1)
                                        };
                                    }
                                    counts[k] = counts[k].wrapping_add(1);
                                }
                                1 => {
                                    let config =
                                        LaunchConfig::for_elements(BLOCK as u64, 256, 1024);
                                    // SAFETY: add_u8 takes (u8*, u64, u8) and touches exactly
                                    // the declared block.
                                    #[allow(unsafe_code)]
                                    let launch = unsafe {
                                        launcher.launch(
                                            dev,
                                            add,
                                            &config,
                                            &[DeclaredAccess::write(addr, BLOCK)],
                                            |resident, args| {
                                                let p = hetmem_cuda::contiguous(resident, 0)
                                                    .ok_or(hetmem::Error::Invalid("not one run"))?;
                                                args.ptr(p).arg(BLOCK as u64).arg(1u8);
                                                Ok(())
                                            },
                                        )
                                    }
                                    .expect("a launch");
                                    launch.wait().expect("the kernel");
                                    counts[k] = counts[k].wrapping_add(1);
                                }
                                _ => {
                                    dev.migrate_to_device(addr, BLOCK).expect("to the device");
                                }
                            }
                        }
                        counts
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a stress thread"))
                .collect()
        });
        let mut mismatches = 0usize;
        for (b, &c) in counts.iter().enumerate() {
            let range = b * BLOCK..(b + 1) * BLOCK;
            mismatches += buf[range.clone()]
                .iter()
                .zip(&start[range])
                .filter(|(&got, &s)| got != s.wrapping_add(c))
                .count();
        }
        assert_eq!(mismatches, 0, "bytes that lost an update");
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}
