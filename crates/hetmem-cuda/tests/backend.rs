//! `CudaBackend` under hetmem's runtime, on device 0: migration both ways with checksums, CPU
//! fault-back, zero fills, eviction under a small cap, failed copies, copies from several
//! threads, and the backend's own calls. Without CUDA each test prints one line,
//! `skipped: <test>: <why>`, and passes, unless `HETMEM_REQUIRE_CUDA=1`, which makes that a
//! failure.
//!
//! `scripts/gpu-check.sh` runs this binary on the GPU machine; `scripts/fake-cuda-check.sh` runs
//! it against the fake driver (`tests/fake-cuda/fakecuda.c`), which checks the backend's logic
//! but not CUDA's behaviour.

// The backend's `copy` is unsafe by contract, and the fake driver's test hook is reached
// through dlsym; each use says why it holds.
#![allow(unsafe_code)]

mod common;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use common::{assert_bytes_eq, checksum, note, open, pattern, skip, watchdog};
use hetmem::{
    Chunk, CopyOp, DeviceBackend, DeviceId, DeviceKind, Endpoint, Hetmem, Target, PAGE_SIZE,
};
use hetmem_cuda::{CudaBackend, CudaBuilderExt, Error, CHUNK_SIZE};

const MIB: usize = 1 << 20;

/// The fake driver's failure hook acts on the next event any thread records, so the test that
/// arms it runs alone (`alone`); every other test holds this shared (`shared`).
static DRIVER: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    DRIVER.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    DRIVER.write().unwrap_or_else(|e| e.into_inner())
}

fn dev0() -> Target {
    Target::Device(DeviceId::new(0).unwrap())
}

/// A context with device 0 as a CUDA device capped at `cap` bytes, and its backend; `None`
/// after the skip line.
fn context(test: &str, cap: usize) -> Option<(Hetmem, Arc<CudaBackend>)> {
    context_with(test, cap, |b| b)
}

/// As [`context`], with the backend set up by `setup` first (`register_host_memory`,
/// `same_address`).
fn context_with(
    test: &str,
    cap: usize,
    setup: impl FnOnce(CudaBackend) -> CudaBackend,
) -> Option<(Hetmem, Arc<CudaBackend>)> {
    let cuda = open(test)?;
    let backend = Arc::new(setup(CudaBackend::new(&cuda, cap).expect("a CUDA backend")));
    let h = Hetmem::builder()
        .cuda_backend(backend.clone())
        .build()
        .expect("a hetmem context");
    Some((h, backend))
}

/// Writes `data` into the buffer through the CPU.
fn fill(buf: &mut [u8], data: &[u8]) {
    buf.copy_from_slice(data);
}

/// Checks the buffer against `want` through the CPU: the checksum first, then byte for byte.
fn verify(what: &str, buf: &[u8], want: &[u8]) {
    if checksum(buf) != checksum(want) {
        assert_bytes_eq(what, buf, want);
        panic!("{what}: checksums differ");
    }
}

#[test]
fn migrates_to_the_device_and_back() {
    watchdog("migrates_to_the_device_and_back", 120, || {
        let _driver = shared();
        let Some((h, backend)) = context("migrates_to_the_device_and_back", 64 * MIB) else {
            return;
        };
        // Four whole blocks and part of a fifth.
        let len = 8 * MIB + 64 * 1024;
        let want = pattern(len, 1);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        h.migrate(buf.addr(), len, dev0()).unwrap();
        assert_eq!(
            h.device_pages_used(DeviceId::new(0).unwrap()) as usize,
            len / PAGE_SIZE
        );
        assert_eq!(backend.chunks_mapped(), 5, "one chunk per block");
        assert!(h.stats().pages_to_device >= (len / PAGE_SIZE) as u64);
        h.migrate(buf.addr(), len, Target::System).unwrap();
        assert!(h.stats().pages_to_system >= (len / PAGE_SIZE) as u64);
        verify("after the round trip", &buf, &want);
        assert_eq!(backend.pending_batches(), 0, "every batch was waited for");
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

#[test]
fn cpu_reads_fault_the_data_back() {
    watchdog("cpu_reads_fault_the_data_back", 120, || {
        let _driver = shared();
        let Some((h, backend)) = context("cpu_reads_fault_the_data_back", 64 * MIB) else {
            return;
        };
        let len = 6 * MIB;
        let mut want = pattern(len, 2);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        h.migrate(buf.addr(), len, dev0()).unwrap();
        let faults = h.stats().cpu_faults;
        // Read through the buffer: CPU faults bring the data home.
        verify("read through the buffer", &buf, &want);
        assert!(h.stats().cpu_faults > faults, "the reads faulted");
        assert!(h.stats().pages_to_system >= (len / PAGE_SIZE) as u64);
        // A CPU write after another trip: the device's copy goes, the write stays.
        h.migrate(buf.addr(), len, dev0()).unwrap();
        buf[12345] ^= 0xff;
        want[12345] ^= 0xff;
        h.migrate(buf.addr(), len, dev0()).unwrap();
        verify("after a write and another trip", &buf, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

#[test]
fn untouched_memory_reads_zero_from_the_device() {
    watchdog("untouched_memory_reads_zero_from_the_device", 120, || {
        let _driver = shared();
        // One chunk: the second buffer's zero fill lands on the first one's old frames.
        let Some((h, backend)) = context("untouched_memory_reads_zero_from_the_device", CHUNK_SIZE)
        else {
            return;
        };
        let want = pattern(CHUNK_SIZE, 3);
        let mut a = h.alloc(CHUNK_SIZE).unwrap();
        fill(&mut a, &want);
        h.migrate(a.addr(), CHUNK_SIZE, dev0()).unwrap();
        let b = h.alloc(CHUNK_SIZE).unwrap();
        // Never touched: filled with zeros on the device (cuMemsetD8Async), evicting `a`.
        h.migrate(b.addr(), CHUNK_SIZE, dev0()).unwrap();
        assert!(h.stats().zero_fills >= (CHUNK_SIZE / PAGE_SIZE) as u64);
        assert!(h.stats().pages_evicted >= (CHUNK_SIZE / PAGE_SIZE) as u64);
        assert_eq!(backend.chunks_mapped(), 1);
        assert!(b.iter().all(|&x| x == 0), "a zero fill leaked old data");
        verify("the evicted buffer", &a, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

#[test]
fn evicts_under_a_small_cap() {
    watchdog("evicts_under_a_small_cap", 120, || {
        let _driver = shared();
        let Some((h, backend)) = context("evicts_under_a_small_cap", 4 * MIB) else {
            return;
        };
        let len = 16 * MIB;
        let want = pattern(len, 4);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        for b in 0..len / CHUNK_SIZE {
            h.migrate(buf.addr() + b * CHUNK_SIZE, CHUNK_SIZE, dev0())
                .unwrap();
            assert!(backend.chunks_mapped() <= 2, "over the cap");
        }
        // Six of the eight blocks made room for later ones.
        assert!(h.stats().pages_evicted >= (6 * CHUNK_SIZE / PAGE_SIZE) as u64);
        verify("after eviction", &buf, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// The fake driver's hook (`fakecuda_fail_next_event`): the next event recorded reports
/// CUDA_ERROR_ILLEGAL_ADDRESS, as a copy that faulted would. `None` on a real driver.
fn fake_driver_failure_hook() -> Option<unsafe extern "C" fn()> {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded (cudarc loaded
    // it as libcuda.so, its first candidate); the handle is never closed, so the symbol stays
    // valid.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            return None;
        }
        let f = libc::dlsym(lib, c"fakecuda_fail_next_event".as_ptr());
        (!f.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn()>(f))
    }
}

#[test]
fn a_failed_copy_keeps_the_data() {
    watchdog("a_failed_copy_keeps_the_data", 120, || {
        let _driver = alone();
        let Some((h, backend)) = context("a_failed_copy_keeps_the_data", 64 * MIB) else {
            return;
        };
        let len = 4 * MIB;
        let want = pattern(len, 5);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        // Refused at submission (the backend's test hook): nothing moves.
        backend.inject_copy_failures(1);
        assert!(matches!(
            h.migrate(buf.addr(), len, dev0()),
            Err(hetmem::Error::Io(_))
        ));
        verify("after a refused copy", &buf, &want);
        // Then it works both ways.
        h.migrate(buf.addr(), len, dev0()).unwrap();
        h.migrate(buf.addr(), len, Target::System).unwrap();
        verify("after the retry", &buf, &want);
        assert!(!backend.is_lost());

        // A copy that fails on the device loses the context, as on a real GPU: the data in
        // system memory stays, and the device refuses everything after.
        let Some(fail_next_event) = fake_driver_failure_hook() else {
            note("a_failed_copy_keeps_the_data: a real driver: no copy failure provoked on the device");
            return;
        };
        // SAFETY: the fake's hook takes nothing and only sets a flag under its lock.
        unsafe { fail_next_event() };
        assert!(h.migrate(buf.addr(), len, dev0()).is_err());
        assert!(backend.is_lost());
        let why = backend.last_error().unwrap_or_default();
        assert!(why.contains("ILLEGAL_ADDRESS"), "{why}");
        verify("after a failed device copy", &buf, &want);
        assert!(h.migrate(buf.addr(), len, dev0()).is_err());
        verify("on a lost device", &buf, &want);
    });
}

#[test]
fn copies_from_several_threads() {
    watchdog("copies_from_several_threads", 120, || {
        let _driver = shared();
        let Some((h, backend)) = context("copies_from_several_threads", 64 * MIB) else {
            return;
        };
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    let len = 4 * MIB;
                    let mut want = pattern(len, 10 + t);
                    let mut buf = h.alloc(len).unwrap();
                    fill(&mut buf, &want);
                    for round in 0..5 {
                        h.migrate(buf.addr(), len, dev0()).unwrap();
                        if round % 2 == 0 {
                            h.migrate(buf.addr(), len, Target::System).unwrap();
                        }
                        verify("a thread's buffer", &buf, &want);
                        let at = (round * 4099) % len;
                        buf[at] = buf[at].wrapping_add(1);
                        want[at] = want[at].wrapping_add(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(backend.pending_batches(), 0);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

#[test]
fn the_builder_adds_a_cuda_device() {
    watchdog("the_builder_adds_a_cuda_device", 120, || {
        let _driver = shared();
        let h = match Hetmem::builder().cuda_device(0, 16 * MIB) {
            Ok(b) => b.build().expect("a hetmem context"),
            Err(e @ (Error::NoDriver(_) | Error::NoDevice { .. })) => {
                return skip("the_builder_adds_a_cuda_device", &e.to_string());
            }
            Err(e) => panic!("cuda_device: {e}"),
        };
        let dev = h.device(0).unwrap();
        assert_eq!(dev.kind(), DeviceKind::Private);
        let len = 4 * MIB;
        let want = pattern(len, 6);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        h.migrate(buf.addr(), len, dev0()).unwrap();
        verify("through the builder's device", &buf, &want);
        assert_eq!(h.stats().errors, 0);
        // A cap below one chunk is refused, before anything is reserved.
        assert!(matches!(
            Hetmem::builder().cuda_device(0, MIB),
            Err(Error::Invalid(_))
        ));
    });
}

/// Copies `ops` and waits for them.
fn copy_and_wait(backend: &CudaBackend, ops: &[CopyOp<'_>]) -> Result<(), hetmem::OpError> {
    // SAFETY: every caller's host ranges are vectors it owns and does not touch until this
    // returns, after the wait; the device ranges are chunks it holds.
    let fence = unsafe { backend.copy(ops) }?;
    backend.wait(fence)
}

#[test]
fn the_backend_alone() {
    watchdog("the_backend_alone", 120, || {
        let _driver = shared();
        let Some(cuda) = open("the_backend_alone") else {
            return;
        };
        let backend = CudaBackend::new(&cuda, 2 * CHUNK_SIZE).unwrap();
        assert_eq!(backend.capacity(), 2 * CHUNK_SIZE);
        assert_eq!(backend.kind(), DeviceKind::Private);
        assert!(!backend.demand_faults());
        let a = backend.alloc_chunk().unwrap();
        let b = backend.alloc_chunk().unwrap();
        assert_ne!(a.handle, b.handle);
        assert!(a.host_ptr().is_none(), "device memory has no host address");
        // Beyond the cap: ENOMEM.
        let e = backend.alloc_chunk().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));

        // Host to a, a to b, b to host, in one batch each.
        let mut src = pattern(CHUNK_SIZE, 7);
        let mut out = vec![0u8; CHUNK_SIZE];
        let half = CHUNK_SIZE / 2;
        copy_and_wait(
            &backend,
            &[
                CopyOp {
                    src: Endpoint::Host(src.as_mut_ptr()),
                    dst: Endpoint::Chunk(&a, 0),
                    len: half,
                },
                CopyOp {
                    src: Endpoint::Host(src.as_mut_ptr().wrapping_add(half)),
                    dst: Endpoint::Chunk(&a, half),
                    len: half,
                },
            ],
        )
        .unwrap();
        // SAFETY: both chunks are ours, nothing else runs on them.
        let fence = unsafe {
            backend.copy(&[CopyOp {
                src: Endpoint::Chunk(&a, 0),
                dst: Endpoint::Chunk(&b, 0),
                len: CHUNK_SIZE,
            }])
        }
        .unwrap();
        // is_done settles without a wait (the fake answers "not ready" now and then).
        let mut polls = 0;
        while !backend.is_done(fence) {
            polls += 1;
            assert!(polls < 1_000_000, "the copy never finished");
            std::thread::yield_now();
        }
        backend.wait(fence).unwrap();
        copy_and_wait(
            &backend,
            &[CopyOp {
                src: Endpoint::Chunk(&b, 0),
                dst: Endpoint::Host(out.as_mut_ptr()),
                len: CHUNK_SIZE,
            }],
        )
        .unwrap();
        assert_bytes_eq("host -> a -> b -> host", &out, &src);

        // discard zeroes a range, ordered before the next copy on the stream.
        backend.discard(&b, PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
        copy_and_wait(
            &backend,
            &[CopyOp {
                src: Endpoint::Chunk(&b, 0),
                dst: Endpoint::Host(out.as_mut_ptr()),
                len: CHUNK_SIZE,
            }],
        )
        .unwrap();
        let mut want = src.clone();
        want[PAGE_SIZE..4 * PAGE_SIZE].fill(0);
        assert_bytes_eq("after discard", &out, &want);

        // Ranges outside a chunk, and chunks that are not this backend's, are refused before
        // anything reaches the driver.
        assert!(backend
            .discard(&a, CHUNK_SIZE - PAGE_SIZE, 2 * PAGE_SIZE)
            .is_err());
        let foreign = Chunk::new(a.handle + 4096);
        assert!(copy_and_wait(
            &backend,
            &[CopyOp {
                src: Endpoint::Host(src.as_mut_ptr()),
                dst: Endpoint::Chunk(&foreign, 0),
                len: PAGE_SIZE,
            }],
        )
        .is_err());
        assert!(copy_and_wait(
            &backend,
            &[CopyOp {
                src: Endpoint::Host(src.as_mut_ptr()),
                dst: Endpoint::Chunk(&a, CHUNK_SIZE - PAGE_SIZE),
                len: 2 * PAGE_SIZE,
            }],
        )
        .is_err());
        // A fence never handed out, or waited for already, is an error.
        assert!(backend.wait(hetmem::Fence(u64::MAX)).is_err());

        // A batch that fails part-way is drained before the error comes back.
        backend.inject_copy_failures(1);
        let r = copy_and_wait(
            &backend,
            &[
                CopyOp {
                    src: Endpoint::Host(src.as_mut_ptr()),
                    dst: Endpoint::Chunk(&a, 0),
                    len: PAGE_SIZE,
                },
                CopyOp {
                    src: Endpoint::Host(src.as_mut_ptr()),
                    dst: Endpoint::Chunk(&a, PAGE_SIZE),
                    len: PAGE_SIZE,
                },
            ],
        );
        assert!(r.is_err());
        assert_eq!(backend.pending_batches(), 0);
        assert!(
            !backend.is_lost(),
            "a refused batch does not lose the device"
        );

        // Freeing makes room again.
        backend.free_chunk(a);
        assert_eq!(backend.chunks_mapped(), 1);
        let c = backend.alloc_chunk().unwrap();
        assert_eq!(backend.chunks_mapped(), 2);
        backend.free_chunk(c);
        backend.free_chunk(b);
        assert_eq!(backend.chunks_mapped(), 0);
        drop(src);
    });
}

/// The shipped `add_u8` kernel and a launcher for `backend`'s device (`CudaLauncher::for_backend`:
/// it reaches pages in device memory, at the CPU's addresses, or remote through registered views).
fn add_kernel(backend: &Arc<CudaBackend>) -> (hetmem_cuda::Function, hetmem_cuda::CudaLauncher) {
    let module = hetmem_cuda::Module::from_ptx(backend.cuda(), hetmem_cuda::kernels::PTX)
        .expect("the shipped PTX loads");
    let add = module
        .function(hetmem_cuda::kernels::names::ADD_U8)
        .expect("add_u8");
    let launcher = hetmem_cuda::CudaLauncher::for_backend(backend).expect("a launcher");
    (add, launcher)
}

/// Launches `add_u8` (+`v` on every byte) over the declared range, given to the kernel as one
/// address (`CudaLauncher::range_address`; `Invalid` when the range has none).
fn launch_add(
    launcher: &hetmem_cuda::CudaLauncher,
    dev: &hetmem::Device,
    add: &hetmem_cuda::Function,
    declared: hetmem::DeclaredAccess,
    v: u8,
) -> hetmem::Result<hetmem::Launch> {
    let len = declared.len;
    let config = hetmem_cuda::LaunchConfig::for_elements(len as u64, 256, 4096);
    // SAFETY: add_u8 takes (u8*, u64, u8) and touches exactly the `len` bytes at the address
    // it is given, which is the declared range.
    unsafe {
        launcher.launch(dev, add, &config, &[declared], |resident, args| {
            let p = launcher
                .range_address(resident, 0)
                .ok_or(hetmem::Error::Invalid(
                    "the range has no single device address",
                ))?;
            args.ptr(p).arg(len as u64).arg(v);
            Ok(())
        })
    }
}

/// A kernel launched over a declared range (`CudaLauncher`, `hetmem::Device::launch`): the range
/// is made resident on the device first, the kernel gets its device address, and the CPU then
/// faults back what the kernel wrote. A range the kernel cannot get as one address is refused
/// before anything is launched.
#[test]
fn a_declared_launch_runs_over_resident_pages_and_the_cpu_sees_its_writes() {
    let name = "a_declared_launch_runs_over_resident_pages_and_the_cpu_sees_its_writes";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some((h, backend)) = context(name, 16 * MIB) else {
            return;
        };
        let (add, launcher) = add_kernel(&backend);
        let dev = h.device(0).expect("device 0");
        let len = 2 * CHUNK_SIZE;
        let mut want = pattern(len, 5);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        let block = CHUNK_SIZE;
        let declared = hetmem::DeclaredAccess::write(buf.addr(), block);
        let launch = launch_add(&launcher, &dev, &add, declared, 3).expect("the launch");
        launch.wait().expect("the kernel");
        for b in &mut want[..block] {
            *b = b.wrapping_add(3);
        }
        assert_eq!(
            h.device_pages_used(DeviceId::new(0).unwrap()) as usize,
            block / PAGE_SIZE,
            "the declared block, and only it, went to the device"
        );
        verify("after the kernel", &buf, &want);
        // Two blocks are two runs in device memory: not one address for the kernel.
        let declared = hetmem::DeclaredAccess::write(buf.addr(), len);
        let refused = launch_add(&launcher, &dev, &add, declared, 1);
        assert!(matches!(refused, Err(hetmem::Error::Invalid(_))));
        verify("after the refused launch", &buf, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// With `register_host_memory`, each region's backing view is registered while the region
/// lives (copies then run from pinned memory) and unregistered when it goes; the data makes
/// the round trip as without.
#[test]
fn registered_backing_views_round_trip_and_unregister() {
    let name = "registered_backing_views_round_trip_and_unregister";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some((h, backend)) = context_with(name, 16 * MIB, |b| b.register_host_memory(true))
        else {
            return;
        };
        let len = 6 * MIB;
        let want = pattern(len, 7);
        let mut buf = h.alloc(len).unwrap();
        assert_eq!(
            backend.host_registrations(),
            1,
            "the region's view is registered"
        );
        fill(&mut buf, &want);
        h.migrate(buf.addr(), len, dev0()).unwrap();
        h.discard(buf.addr(), 2 * MIB).unwrap();
        h.migrate(buf.addr(), len, dev0()).unwrap();
        let mut want = want;
        want[..2 * MIB].fill(0);
        verify("after the round trip and a discard", &buf, &want);
        drop(buf);
        assert_eq!(
            backend.host_registrations(),
            0,
            "unregistered with its region"
        );
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// A kernel that fails (the fake driver's hook makes its completion event report
/// CUDA_ERROR_ILLEGAL_ADDRESS, as a kernel that faulted would): `Launch::wait` reports `Io`,
/// nothing hangs, and data in system memory is kept. On a real GPU the context is lost with
/// it, and pages whose only copy was on the device are lost (`docs/runtime.md` §4); the fake
/// keeps its context, so only the report is checked here. Skips where the hook is missing.
#[test]
fn a_failing_launch_is_reported_and_system_memory_kept() {
    let name = "a_failing_launch_is_reported_and_system_memory_kept";
    watchdog(name, 120, move || {
        let _driver = alone();
        let Some((h, backend)) = context(name, 16 * MIB) else {
            return;
        };
        let Some(fail_next_event) = fake_driver_failure_hook() else {
            note("no failure hook in this driver: only the fake driver can fail a kernel here");
            return;
        };
        let (add, launcher) = add_kernel(&backend);
        let dev = h.device(0).expect("device 0");
        let len = 2 * CHUNK_SIZE;
        let want = pattern(len, 9);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        // The launch's block is resident already, so its completion event is the next one
        // recorded: the one the hook fails.
        h.migrate(buf.addr(), CHUNK_SIZE, dev0()).unwrap();
        // SAFETY: the fake driver's test hook; it takes no arguments.
        unsafe { fail_next_event() };
        let declared = hetmem::DeclaredAccess::write(buf.addr(), CHUNK_SIZE);
        let launch = launch_add(&launcher, &dev, &add, declared, 1).expect("submitted");
        assert!(matches!(launch.wait(), Err(hetmem::Error::Io(_))));
        // The second block never left system memory.
        verify(
            "system memory after a failed kernel",
            &buf[CHUNK_SIZE..],
            &want[CHUNK_SIZE..],
        );
    });
}

/// Remote placement (`hetmem::LaunchPlacement::Remote`): a kernel reads and writes system
/// memory in place, through the registered backing view's device address
/// (`CudaLauncher::for_backend`), over a range twice the cap: nothing migrates, and the CPU
/// sees the kernel's writes.
#[test]
fn a_remote_launch_works_in_system_memory_in_place() {
    let name = "a_remote_launch_works_in_system_memory_in_place";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some((h, backend)) = context_with(name, 4 * MIB, |b| b.register_host_memory(true))
        else {
            return;
        };
        let (add, launcher) = add_kernel(&backend);
        let dev = h.device(0).expect("device 0");
        let len = 8 * MIB;
        let mut want = pattern(len, 13);
        let mut buf = h.alloc(len).unwrap();
        fill(&mut buf, &want);
        let declared =
            hetmem::DeclaredAccess::write(buf.addr(), len).placed(hetmem::LaunchPlacement::Remote);
        let launch = launch_add(&launcher, &dev, &add, declared, 2).expect("the launch");
        launch.wait().expect("the kernel");
        assert_eq!(
            h.device_pages_used(DeviceId::new(0).unwrap()),
            0,
            "nothing migrated"
        );
        for b in &mut want {
            *b = b.wrapping_add(2);
        }
        verify("after the remote kernel", &buf, &want);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
    });
}

/// Same-address memory (`CudaBackend::same_address`): the region's CPU view is at its device
/// reservation, each bound chunk is mapped at its block's address too, and a kernel given the
/// CPU's own pointer reaches the data over several blocks, and follows pointers stored in it
/// (a linked list built by the CPU). Teardown unmaps every chunk and frees the reservation.
#[test]
fn same_address_memory_takes_the_cpus_pointers() {
    let name = "same_address_memory_takes_the_cpus_pointers";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some((h, backend)) = context_with(name, 16 * MIB, |b| b.same_address(true)) else {
            return;
        };
        let (add, launcher) = add_kernel(&backend);
        let walk = add
            .module()
            .function(hetmem_cuda::kernels::names::WALK_LIST)
            .expect("walk_list");
        let dev = h.device(0).expect("device 0");
        let len = 3 * CHUNK_SIZE;
        let mut want = pattern(len, 17);
        let mut buf = h.alloc(len).unwrap();
        assert_eq!(
            backend.same_address_counts().0,
            1,
            "the region's addresses are reserved"
        );
        fill(&mut buf, &want);
        // One pointer, the CPU's, over three blocks.
        let config = hetmem_cuda::LaunchConfig::for_elements(len as u64, 256, 4096);
        let declared = [hetmem::DeclaredAccess::write(buf.addr(), len)];
        // SAFETY: add_u8 takes (u8*, u64, u8) and touches exactly the declared range.
        let launch = unsafe {
            launcher.launch(&dev, &add, &config, &declared, |resident, args| {
                assert!(
                    resident.at_cpu_address(0),
                    "device memory at the CPU's addresses"
                );
                let p = launcher
                    .range_address(resident, 0)
                    .ok_or(hetmem::Error::Invalid("no address"))?;
                assert_eq!(p.0 as usize, buf.addr(), "the CPU's pointer");
                args.ptr(p).arg(len as u64).arg(5u8);
                Ok(())
            })
        }
        .expect("the launch");
        launch.wait().expect("the kernel");
        assert_eq!(
            backend.same_address_counts().1,
            3,
            "each block's chunk at its address"
        );
        for b in &mut want {
            *b = b.wrapping_add(5);
        }
        verify("after the kernel over three blocks", &buf, &want);
        // A linked list built by the CPU, with CPU pointers, walked by the GPU: node i at
        // block i (24-byte nodes: next, value, out), outputs in block 0's second page.
        let base = buf.addr();
        let node = |i: usize| base + i * CHUNK_SIZE;
        let out = |i: usize| base + PAGE_SIZE + 8 * i;
        let count_at = base + 2 * PAGE_SIZE;
        for i in 0..3 {
            let next = if i < 2 { node(i + 1) as u64 } else { 0 };
            let words = [next, 10 * i as u64 + 1, out(i) as u64];
            for (k, w) in words.iter().enumerate() {
                let at = node(i) - base + 8 * k;
                buf[at..at + 8].copy_from_slice(&w.to_ne_bytes());
            }
        }
        let declared = [hetmem::DeclaredAccess::write(base, len)];
        // SAFETY: walk_list takes (Node*, u64*) and touches the nodes, their outputs and the
        // count, all inside the declared range.
        let launch = unsafe {
            launcher.launch(
                &dev,
                &walk,
                &hetmem_cuda::LaunchConfig::single(),
                &declared,
                |resident, args| {
                    assert!(resident.at_cpu_address(0));
                    args.ptr(hetmem_cuda::DevicePtr(node(0) as u64))
                        .ptr(hetmem_cuda::DevicePtr(count_at as u64));
                    Ok(())
                },
            )
        }
        .expect("the list walk");
        launch.wait().expect("the walk");
        let word = |at: usize| {
            let o = at - base;
            u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap())
        };
        assert_eq!(word(count_at), 3, "the GPU followed the CPU's pointers");
        for i in 0..3 {
            assert_eq!(word(out(i)), (10 * i as u64 + 1) * 2 + 1);
        }
        drop(buf);
        assert_eq!(h.stats().errors, 0, "{:?}", backend.last_error());
        // The region goes with its last reference, which a service thread may still hold for
        // a moment after it woke the thread whose fault it served: the context's drop (with
        // the device handle's) joins them.
        drop((dev, h));
        assert_eq!(backend.same_address_counts(), (0, 0), "all torn down");
    });
}

/// A scratch directory for a file test, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("hetmem-cuda-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("a scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a file test on the GPU starts from: a context (its backend set up by `setup`), the
/// `add_u8` kernel and its launcher, device 0, and a Shared mapping of a file of `len` pattern
/// bytes (`want`, which the test then updates as the file should end up).
struct FileTest {
    h: Hetmem,
    backend: Arc<CudaBackend>,
    add: hetmem_cuda::Function,
    launcher: hetmem_cuda::CudaLauncher,
    dev: hetmem::Device,
    m: hetmem::FileMapping,
    path: std::path::PathBuf,
    want: Vec<u8>,
    _dir: Scratch,
}

impl FileTest {
    fn new(
        name: &str,
        cap: usize,
        setup: impl FnOnce(CudaBackend) -> CudaBackend,
        len: usize,
        seed: u64,
    ) -> Option<FileTest> {
        let (h, backend) = context_with(name, cap, setup)?;
        let (add, launcher) = add_kernel(&backend);
        let dev = h.device(0).expect("device 0");
        let dir = Scratch::new(name);
        let path = dir.0.join("data");
        let want = pattern(len, seed);
        std::fs::write(&path, &want).unwrap();
        let m = h.map_file(&path, 0, len, hetmem::FileMode::Shared).unwrap();
        Some(FileTest {
            h,
            backend,
            add,
            launcher,
            dev,
            m,
            path,
            want,
            _dir: dir,
        })
    }

    /// Launches +`v` on every byte of `declared`.
    fn launch_add(&self, declared: hetmem::DeclaredAccess, v: u8) -> hetmem::Launch {
        launch_add(&self.launcher, &self.dev, &self.add, declared, v).expect("the launch")
    }

    /// `want` after +`v` on every byte of `range`.
    fn added(&mut self, range: std::ops::Range<usize>, v: u8) {
        for b in &mut self.want[range] {
            *b = b.wrapping_add(v);
        }
    }
}

/// File pages on the GPU: a launch declared over a Shared file mapping brings its pages from
/// the file into device memory, the kernel writes them there, and `flush` writes them from
/// device memory back to the file (staged through host memory: device memory is not
/// host-addressable).
#[test]
fn a_launch_writes_file_pages_and_flush_puts_them_in_the_file() {
    let name = "a_launch_writes_file_pages_and_flush_puts_them_in_the_file";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some(mut t) = FileTest::new(name, 16 * MIB, |b| b, 2 * CHUNK_SIZE, 21) else {
            return;
        };
        let declared = hetmem::DeclaredAccess::write(t.m.addr(), CHUNK_SIZE);
        t.launch_add(declared, 4).wait().expect("the kernel");
        assert_eq!(
            t.h.stats().pages_from_file as usize,
            CHUNK_SIZE / PAGE_SIZE,
            "the declared block came from the file, and only it"
        );
        t.added(0..CHUNK_SIZE, 4);
        t.m.flush().expect("flush");
        assert_bytes_eq(
            "the file after flush",
            &std::fs::read(&t.path).unwrap(),
            &t.want,
        );
        verify("the CPU's view of the mapping", t.m.as_slice(), &t.want);
        assert_eq!(t.h.stats().errors, 0, "{:?}", t.backend.last_error());
    });
}

/// Remote placement of file pages: a kernel over a Shared file mapping twice the cap, placed
/// `Remote`, works on the pages in system memory (the memfd copy of the file, through the
/// registered backing view); nothing migrates, and `flush` writes the kernel's writes to the file.
#[test]
fn a_remote_launch_over_file_pages_works_in_system_memory() {
    let name = "a_remote_launch_over_file_pages_works_in_system_memory";
    watchdog(name, 120, move || {
        let _driver = shared();
        let len = 8 * MIB;
        let setup = |b: CudaBackend| b.register_host_memory(true);
        let Some(mut t) = FileTest::new(name, 4 * MIB, setup, len, 22) else {
            return;
        };
        let declared =
            hetmem::DeclaredAccess::write(t.m.addr(), len).placed(hetmem::LaunchPlacement::Remote);
        t.launch_add(declared, 6).wait().expect("the kernel");
        assert_eq!(
            t.h.device_pages_used(DeviceId::new(0).unwrap()),
            0,
            "nothing migrated"
        );
        t.added(0..len, 6);
        t.m.flush().expect("flush");
        assert_bytes_eq(
            "the file after flush",
            &std::fs::read(&t.path).unwrap(),
            &t.want,
        );
        assert_eq!(t.h.stats().errors, 0, "{:?}", t.backend.last_error());
    });
}

/// A lease break while a launch holds file pages on the GPU: another open of the file breaks
/// hetmem's lease, and returns only once the break has written back what the device holds, so
/// the opener reads the kernel's writes.
#[test]
fn a_lease_break_hands_over_what_a_launch_wrote() {
    let name = "a_lease_break_hands_over_what_a_launch_wrote";
    watchdog(name, 120, move || {
        let _driver = shared();
        let Some(mut t) = FileTest::new(name, 16 * MIB, |b| b, 2 * CHUNK_SIZE, 23) else {
            return;
        };
        if !t.m.is_leased() {
            note(format!(
                "{name}: no lease on this file system, nothing to break"
            ));
            return;
        }
        let declared = hetmem::DeclaredAccess::write(t.m.addr(), CHUNK_SIZE);
        let launch = t.launch_add(declared, 9);
        t.added(0..CHUNK_SIZE, 9);
        // Not waited for: the open breaks the lease with the launch as it is.
        let seen = std::fs::read(&t.path).unwrap();
        launch.wait().expect("the kernel");
        assert_bytes_eq("what the other opener read", &seen, &t.want);
        assert!(t.h.stats().lease_breaks >= 1, "the open broke the lease");
        verify("the CPU's view of the mapping", t.m.as_slice(), &t.want);
        assert_eq!(t.h.stats().errors, 0, "{:?}", t.backend.last_error());
    });
}
