//! Tests on a real GPU. Each one opens device 0 first; without CUDA it prints one line,
//! `skipped: <test>: <why>`, to stderr (past the test harness's capture) and passes, unless
//! `HETMEM_REQUIRE_CUDA=1`, which turns the skip into a failure.
//!
//! `scripts/gpu-check.sh` runs this binary on the GPU machine with `HETMEM_REQUIRE_CUDA=1`.

// Kernel launches and raw device spans are unsafe by contract; each use says why it holds.
#![allow(unsafe_code)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_bytes_eq, note, open, pattern, skip};
use hetmem_cuda::kernels::{self, names};
use hetmem_cuda::util::{maps_overlapping, maps_show_shared_file, read_self_maps};
use hetmem_cuda::{
    chunk_size, device_count, nvrtc, Cuda, DeviceBuffer, DevicePtr, DeviceSpan, Error, HostMem,
    HostRegistration, KernelArgs, LaunchConfig, ManagedBuffer, Mapping, MemfdView, Module,
    PhysicalChunk, PinnedBuffer, Reservation, SameAddressView, Stream, CHUNK_SIZE,
};

fn test_kernels(cuda: &Cuda) -> Module {
    Module::from_ptx(cuda, kernels::PTX).expect("the shipped PTX loads")
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(bytes[off..off + 8].try_into().unwrap())
}

/// Launches `name` from the shipped kernels with `args`.
fn launch(stream: &Stream, module: &Module, name: &str, config: LaunchConfig, args: &KernelArgs) {
    let f = module.function(name).expect("kernel is in the module");
    // SAFETY: every call site passes the arguments `kernels::names` documents for `name`,
    // pointing at memory the test owns and keeps alive until it synchronises.
    unsafe { stream.launch(&f, &config, args) }.expect("launch");
}

#[test]
fn open_and_info() {
    let Some(cuda) = open("open_and_info") else {
        return;
    };
    let i = cuda.info();
    note(format!("{i:?}"));
    assert!(!i.name.is_empty());
    assert!(i.total_memory > 0 && i.free_memory <= i.total_memory);
    assert!(
        i.driver_version >= 13000,
        "driver {} is older than CUDA 13.0, which this build targets",
        i.driver_version
    );
    assert!(
        i.compute_capability.0 >= 7,
        "compute capability {:?}",
        i.compute_capability
    );
    assert!(i.multiprocessors > 0);
    assert!(i.unified_addressing, "no unified addressing");
    assert!(i.host_register_supported, "cuMemHostRegister unsupported");
    assert!(i.vmm_supported, "VMM unsupported");
    assert!(
        i.vmm_granularity > 0 && CHUNK_SIZE % i.vmm_granularity == 0,
        "granularity {:#x}",
        i.vmm_granularity
    );
    let (free, total) = cuda.mem_info().unwrap();
    assert!(free <= total && total > 0);

    // Another thread binds the context and works with it.
    let c2 = cuda.clone();
    std::thread::spawn(move || {
        c2.mem_info().unwrap();
        let s = Stream::new(&c2).unwrap();
        let b = DeviceBuffer::new(&c2, 1).unwrap();
        s.memset_d8(b.whole(), 1).unwrap();
        s.synchronize().unwrap();
    })
    .join()
    .unwrap();

    // Opening again shares the primary context; an ordinal past the count is NoDevice.
    let again = Cuda::open(0).unwrap();
    assert_eq!(again.raw_context(), cuda.raw_context());
    let n = device_count().unwrap();
    assert!(n >= 1);
    assert!(matches!(Cuda::open(n), Err(Error::NoDevice { .. })));
}

#[test]
fn vmm_chunks_map_and_unmap() {
    let Some(cuda) = open("vmm_chunks_map_and_unmap") else {
        return;
    };
    let chunk = chunk_size(&cuda).unwrap();
    assert_eq!(chunk, CHUNK_SIZE, "the device's chunk is not 2 MiB");
    let s = Stream::new(&cuda).unwrap();
    let res = Reservation::new(&cuda, 4 * chunk).unwrap();
    assert_eq!(res.size(), 4 * chunk);

    let mut maps: Vec<Option<Mapping>> = (0..4)
        .map(|i| {
            Some(Mapping::new(&res, i * chunk, PhysicalChunk::new(&cuda, chunk).unwrap()).unwrap())
        })
        .collect();
    for (i, m) in maps.iter().enumerate() {
        let m = m.as_ref().unwrap();
        assert_eq!(m.ptr(), res.ptr().offset(i * chunk));
        assert_eq!(m.offset(), i * chunk);
        s.memset_d8(m.whole(), i as u8 + 1).unwrap();
    }

    // Before the driver: unaligned or out-of-range offsets.
    assert!(matches!(
        Mapping::new(&res, 4096, PhysicalChunk::new(&cuda, chunk).unwrap()),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        Mapping::new(&res, 4 * chunk, PhysicalChunk::new(&cuda, chunk).unwrap()),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        PhysicalChunk::new(&cuda, chunk + 4096),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        Reservation::new(&cuda, chunk / 2),
        Err(Error::Invalid(_))
    ));
    // The driver refuses a second mapping over a mapped slot.
    let dup = Mapping::new(&res, 0, PhysicalChunk::new(&cuda, chunk).unwrap());
    note(format!("mapping over a mapped chunk: {dup:?}"));
    assert!(matches!(dup, Err(Error::Driver { .. })), "{dup:?}");

    // Swap the chunks of slots 1 and 3: the data follows the physical memory.
    s.synchronize().unwrap();
    let c1 = maps[1].take().unwrap().unmap().unwrap();
    let c3 = maps[3].take().unwrap().unmap().unwrap();
    maps[1] = Some(Mapping::new(&res, chunk, c3).unwrap());
    maps[3] = Some(Mapping::new(&res, 3 * chunk, c1).unwrap());
    let mut first = [0u8; 1];
    let want = [1u8, 4, 3, 2];
    for (i, m) in maps.iter().enumerate() {
        let m = m.as_ref().unwrap();
        s.copy_d2h_blocking(&mut first, m.span(chunk - 1, 1).unwrap())
            .unwrap();
        assert_eq!(first[0], want[i], "slot {i} after the swap");
    }
    // The reservation may be dropped first: each Mapping keeps it.
    drop(res);
    for m in maps.iter().flatten() {
        s.copy_d2h_blocking(&mut first, m.span(0, 1).unwrap())
            .unwrap();
    }
    drop(maps);

    // A reservation at a freed reservation's address (the driver may offer another one), and
    // one over a host mapping (refused: the hint is ignored there).
    let freed = Reservation::new(&cuda, chunk).unwrap().ptr();
    match Reservation::at(&cuda, freed, chunk) {
        Ok(r) => assert_eq!(r.ptr(), freed),
        Err(e @ Error::AddressUnavailable { .. }) => {
            note(format!("reserve at a freed address: {e}"))
        }
        Err(e) => panic!("reserve at a freed address: {e}"),
    }
    let host = MemfdView::create("hetmem-cuda-hint", 2 * chunk).unwrap();
    host.fill(0, host.len(), 9).unwrap();
    let inside = DevicePtr((host.as_ptr() as u64).next_multiple_of(chunk as u64));
    match Reservation::at(&cuda, inside, chunk) {
        Err(Error::AddressUnavailable { wanted, offered }) => {
            note(format!(
                "reserve over a host mapping at {wanted:#x}: offered {offered:#x}"
            ));
        }
        Err(e @ Error::Driver { .. }) => note(format!("reserve over a host mapping: {e}")),
        other => panic!("a reservation over a host mapping gave {other:?}"),
    }
    // Look before touching: a driver that had mapped over it would make a read fault.
    let host_inode = inode_of(&host);
    assert!(
        maps_show_shared_file(
            &read_self_maps().unwrap(),
            host.as_ptr() as u64,
            host.len() as u64,
            host_inode,
            0
        ),
        "the reservation attempt replaced the host mapping"
    );
    assert_eq!(
        host.to_vec(0, 4).unwrap(),
        [9; 4],
        "the host mapping changed"
    );
    assert!(matches!(
        Reservation::at(&cuda, DevicePtr(freed.0 + 4096), chunk),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn memset_and_copies_byte_for_byte() {
    let Some(cuda) = open("memset_and_copies_byte_for_byte") else {
        return;
    };
    let chunk = chunk_size(&cuda).unwrap();
    let buf = DeviceBuffer::new(&cuda, 3 * chunk).unwrap();
    let len = buf.len();
    assert_eq!(len, 3 * chunk);
    assert_eq!(buf.mappings().len(), 3);
    let pinned = PinnedBuffer::new(&cuda, len).unwrap();
    let s = Stream::new(&cuda).unwrap();

    let mut model = vec![0xA5u8; len];
    s.memset_d8(buf.whole(), 0xA5).unwrap();
    // Fills across chunk boundaries, odd offsets and lengths.
    for (off, n, v) in [
        (chunk - 5, 10, 1u8),
        (1, 4095, 2),
        (2 * chunk - 4096, 8195, 3),
        (len - 1, 1, 4),
        (0, 1, 5),
    ] {
        s.memset_d8(buf.span(off, n).unwrap(), v).unwrap();
        model[off..off + n].fill(v);
    }
    // Device to device across chunks.
    let n = chunk / 2 + 7;
    s.copy_d2d(
        buf.span(2 * chunk + 50, n).unwrap(),
        buf.span(100, n).unwrap(),
    )
    .unwrap();
    model.copy_within(100..100 + n, 2 * chunk + 50);
    s.copy_d2h(pinned.whole(), buf.whole()).unwrap();
    let done = s.fence().unwrap();
    assert!(
        done.wait_timeout(Duration::from_secs(30)).unwrap(),
        "copies did not finish in 30 s"
    );
    assert_bytes_eq(
        "memset + d2d, read back",
        &pinned.to_vec(0, len).unwrap(),
        &model,
    );

    // Pinned H2D, pageable D2H.
    let pat = pattern(len, 1);
    pinned.write(0, &pat).unwrap();
    s.copy_h2d(buf.whole(), pinned.whole()).unwrap();
    let mut back = vec![0u8; len];
    s.copy_d2h_blocking(&mut back, buf.whole()).unwrap();
    assert_bytes_eq("pinned h2d, pageable d2h", &back, &pat);
    // Pageable H2D of a sub-range.
    let pat2 = pattern(chunk + 3, 2);
    s.copy_h2d_blocking(buf.span(chunk - 1, chunk + 3).unwrap(), &pat2)
        .unwrap();
    let mut back2 = vec![0u8; chunk + 5];
    s.copy_d2h_blocking(&mut back2, buf.span(chunk - 2, chunk + 5).unwrap())
        .unwrap();
    assert_eq!(back2[0], pat[chunk - 2]);
    assert_eq!(&back2[1..chunk + 4], &pat2[..]);
    assert_eq!(back2[chunk + 4], pat[2 * chunk + 2]);

    // Lengths that differ, spans past the end.
    assert!(matches!(
        s.copy_d2d(buf.span(0, 8).unwrap(), buf.span(8, 9).unwrap()),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(buf.span(len - 1, 2), Err(Error::Invalid(_))));
    assert!(matches!(pinned.span(1, len), Err(Error::Invalid(_))));
}

#[test]
fn host_registered_memfd_round_trip() {
    let Some(cuda) = open("host_registered_memfd_round_trip") else {
        return;
    };
    let len = 8 << 20;
    // The runtime's two views of one memfd: the DMA view, registered, and the CPU's.
    let dma = Arc::new(MemfdView::create("hetmem-cuda-gpu-test", len).unwrap());
    let t = Instant::now();
    let reg = HostRegistration::of_view(&cuda, dma.clone()).unwrap();
    note(format!(
        "cuMemHostRegister of {} MiB: {:?}",
        len >> 20,
        t.elapsed()
    ));
    if cuda.info().host_pointer_for_registered_mem {
        assert_eq!(reg.device_ptr().0, reg.as_ptr() as u64);
    }
    let cpu = dma.another_view(0, len).unwrap();
    let pat = pattern(len, 7);
    cpu.write(0, &pat).unwrap();

    let dev = DeviceBuffer::new(&cuda, len).unwrap();
    let k = test_kernels(&cuda);
    let s = Stream::new(&cuda).unwrap();
    s.copy_h2d(dev.whole(), reg.whole()).unwrap();
    let mut a = KernelArgs::new();
    a.ptr(dev.ptr()).arg(len as u64).arg(1u8);
    launch(
        &s,
        &k,
        names::ADD_U8,
        LaunchConfig::for_elements(len as u64, 256, 1024),
        &a,
    );
    s.copy_d2h(reg.span(0, len).unwrap(), dev.whole()).unwrap();
    // Completion by polling, as the runtime will.
    let fence = s.fence().unwrap();
    let (mut polls, t) = (0u64, Instant::now());
    while !fence.is_complete().unwrap() {
        polls += 1;
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no completion in 30 s"
        );
        std::thread::yield_now();
    }
    note(format!(
        "h2d + kernel + d2h of {} MiB completed after {polls} polls, {:?}",
        len >> 20,
        t.elapsed()
    ));
    let plus1: Vec<u8> = pat.iter().map(|b| b.wrapping_add(1)).collect();
    assert_bytes_eq(
        "memfd -> device -> +1 -> memfd, read by the CPU view",
        &cpu.to_vec(0, len).unwrap(),
        &plus1,
    );

    // Zero copy: the kernel adds 2 in place through the registration's device view.
    let mut a = KernelArgs::new();
    a.ptr(reg.device_span(0, len).unwrap().ptr())
        .arg(len as u64)
        .arg(2u8);
    launch(
        &s,
        &k,
        names::ADD_U8,
        LaunchConfig::for_elements(len as u64, 256, 1024),
        &a,
    );
    s.synchronize().unwrap();
    let plus3: Vec<u8> = pat.iter().map(|b| b.wrapping_add(3)).collect();
    assert_bytes_eq(
        "kernel writing registered memory in place",
        &cpu.to_vec(0, len).unwrap(),
        &plus3,
    );

    // Registering the same range twice is a typed driver error.
    // SAFETY: `dma` stays mapped until the end of the test, after `again` is dropped.
    let again = unsafe { HostRegistration::new(&cuda, dma.as_ptr(), len) };
    note(format!(
        "second registration: {:?}",
        again.as_ref().map(|_| ()).map_err(|e| e.to_string())
    ));
    assert!(
        matches!(again, Err(Error::Driver { .. })),
        "a second registration succeeded"
    );
    drop(reg);
    // Unregistered, the view is plain memory again and still holds the data.
    assert_eq!(dma.to_vec(12345, 1).unwrap()[0], plus3[12345]);
}

#[test]
fn nvrtc_compile_and_launch() {
    let Some(cuda) = open("nvrtc_compile_and_launch") else {
        return;
    };
    if let Err(e) = nvrtc::available() {
        skip("nvrtc_compile_and_launch", &e.to_string());
        return;
    }
    note(format!("NVRTC {:?}", nvrtc::version().unwrap()));
    let cc = cuda.info().compute_capability;
    let src = r#"
extern "C" __global__ void axpb(float* x, unsigned long long n, float a, float b) {
  unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (i < n) x[i] = x[i] * a + b;
}"#;
    let ptx = nvrtc::compile_ptx(src, cc).unwrap();
    let cubin = nvrtc::compile_cubin(src, cc).unwrap();
    let n = 1usize << 20;
    let input: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let bytes: Vec<u8> = input.iter().flat_map(|f| f.to_ne_bytes()).collect();
    let dev = DeviceBuffer::new(&cuda, bytes.len()).unwrap();
    let s = Stream::new(&cuda).unwrap();
    for (kind, module) in [
        ("ptx", Module::from_ptx(&cuda, &ptx).unwrap()),
        ("cubin", Module::from_cubin(&cuda, &cubin).unwrap()),
    ] {
        s.copy_h2d_blocking(dev.span(0, bytes.len()).unwrap(), &bytes)
            .unwrap();
        let f = module.function("axpb").unwrap();
        let mut a = KernelArgs::new();
        a.ptr(dev.ptr()).arg(n as u64).arg(3.0f32).arg(1.0f32);
        // SAFETY: axpb(float*, unsigned long long, float, float) over the n floats of `dev`.
        unsafe { s.launch(&f, &LaunchConfig::for_elements(n as u64, 256, u32::MAX), &a) }.unwrap();
        let mut out = vec![0u8; bytes.len()];
        s.copy_d2h_blocking(&mut out, dev.span(0, bytes.len()).unwrap())
            .unwrap();
        for (i, c) in out.chunks_exact(4).enumerate() {
            let got = f32::from_ne_bytes(c.try_into().unwrap());
            assert_eq!(got, input[i] * 3.0 + 1.0, "{kind}: element {i}");
        }
        assert!(matches!(
            module.function("no_such_kernel"),
            Err(Error::Driver { .. })
        ));
    }
    // The shipped kernels compile with this NVRTC, to a CUBIN that loads.
    let k = nvrtc::compile_cubin(kernels::SOURCE, cc).unwrap();
    let m = Module::from_cubin(&cuda, &k).unwrap();
    for name in names::ALL {
        m.function(name).unwrap();
    }
    // A source error is a Compile error with the log.
    match nvrtc::compile_ptx("this is not CUDA", cc) {
        Err(Error::Compile { log }) => assert!(log.contains("error"), "{log}"),
        other => panic!("compiling garbage gave {other:?}"),
    }
}

/// A node of the list the CPU builds and `hetmem_walk_list` walks: `{next, value, out}`.
const NODE: usize = 24;

#[test]
fn same_address_on_cpu_and_gpu() {
    let Some(cuda) = open("same_address_on_cpu_and_gpu") else {
        return;
    };
    let chunk = chunk_size(&cuda).unwrap();
    let len = 2 * chunk;
    // One memfd: the DMA view (registered, for copies) and, at X, the CPU's view.
    let dma = Arc::new(MemfdView::create("hetmem-cuda-same-va", len).unwrap());
    let reg = HostRegistration::of_view(&cuda, dma.clone()).unwrap();
    let mut view = SameAddressView::new(&cuda, dma.fd(), 0, len).unwrap();
    let x = view.addr();
    note(format!("same address X = {x:#x}"));
    assert!(
        view.cpu_view_intact().unwrap(),
        "the CPU view is not at X after MAP_FIXED"
    );
    view.write(0, b"cpu").unwrap();
    assert_eq!(
        dma.to_vec(0, 3).unwrap(),
        b"cpu",
        "a CPU write at X did not reach the memfd"
    );

    view.map_chunk(0, PhysicalChunk::new(&cuda, chunk).unwrap())
        .unwrap();
    view.map_chunk(1, PhysicalChunk::new(&cuda, chunk).unwrap())
        .unwrap();
    let intact = view.cpu_view_intact().unwrap();
    note(format!(
        "CPU view intact after cuMemMap + cuMemSetAccess at X: {intact}"
    ));
    assert!(intact, "cuMemMap replaced the CPU view at X");
    assert!(matches!(
        view.map_chunk(0, PhysicalChunk::new(&cuda, chunk).unwrap()),
        Err(Error::Invalid(_))
    ));

    // The CPU builds a linked list at X with CPU pointers: nodes scattered over both chunks,
    // each pointing at the next node and at an output slot in the other chunk.
    let count = 300usize;
    let node_off = |i: usize| {
        if i % 2 == 0 {
            4096 + i * 40
        } else {
            chunk + 8192 + (count - i) * 56
        }
    };
    let out_off = |i: usize| {
        if i % 2 == 0 {
            chunk + 65536 + i * 8
        } else {
            65536 + i * 8
        }
    };
    let count_off = chunk + 4096;
    for i in 0..count {
        let next = if i + 1 < count {
            x + node_off(i + 1) as u64
        } else {
            0
        };
        let mut node = [0u8; NODE];
        node[0..8].copy_from_slice(&next.to_ne_bytes());
        node[8..16].copy_from_slice(&(1000 + i as u64).to_ne_bytes());
        node[16..24].copy_from_slice(&(x + out_off(i) as u64).to_ne_bytes());
        view.write(node_off(i), &node).unwrap();
    }
    // To the device at the same addresses: from the registered view of the same memfd into X.
    let s = Stream::new(&cuda).unwrap();
    s.copy_h2d(view.device_span(0, len).unwrap(), reg.whole())
        .unwrap();
    // The kernel gets the CPU's pointers as they are.
    let k = test_kernels(&cuda);
    let mut a = KernelArgs::new();
    a.ptr(DevicePtr(x + node_off(0) as u64))
        .ptr(DevicePtr(x + count_off as u64));
    launch(&s, &k, names::WALK_LIST, LaunchConfig::single(), &a);
    // Back into the memfd; the CPU reads the results at X.
    s.copy_d2h(reg.whole(), view.device_span(0, len).unwrap())
        .unwrap();
    s.synchronize().unwrap();
    let at_x = view.to_vec(0, len).unwrap();
    assert_eq!(
        u64_at(&at_x, count_off),
        count as u64,
        "nodes the GPU walked"
    );
    for i in 0..count {
        assert_eq!(
            u64_at(&at_x, out_off(i)),
            (1000 + i as u64) * 2 + 1,
            "node {i}'s output"
        );
        assert_eq!(
            u64_at(&at_x, node_off(i) + 8),
            1001 + i as u64,
            "node {i}'s value"
        );
        let next = if i + 1 < count {
            x + node_off(i + 1) as u64
        } else {
            0
        };
        assert_eq!(u64_at(&at_x, node_off(i)), next, "node {i}'s pointer");
    }

    // Unmapping and remapping a chunk keeps the CPU view and the device data.
    let c1 = view.unmap_chunk(1).unwrap();
    let intact = view.cpu_view_intact().unwrap();
    note(format!("CPU view intact after cuMemUnmap at X: {intact}"));
    assert!(intact, "cuMemUnmap replaced the CPU view at X");
    assert!(matches!(view.device_span(chunk, 8), Err(Error::Invalid(_))));
    view.map_chunk(1, c1).unwrap();
    let mut c = [0u8; 8];
    s.copy_d2h_blocking(&mut c, view.device_span(count_off, 8).unwrap())
        .unwrap();
    assert_eq!(
        u64::from_ne_bytes(c),
        count as u64,
        "device data after a remap"
    );

    // Teardown: chunks, a placeholder over the CPU view, then cuMemAddressFree.
    let inode = inode_of(&dma);
    drop(view);
    let left: Vec<_> = maps_overlapping(&read_self_maps().unwrap(), x, len as u64)
        .into_iter()
        .filter(|e| e.inode == inode)
        .collect();
    assert!(left.is_empty(), "the CPU view outlived the view: {left:?}");
    note(format!(
        "after teardown, at X: {:?}",
        maps_overlapping(&read_self_maps().unwrap(), x, len as u64)
    ));
    // The DMA view and its registration are untouched.
    assert_eq!(
        u64_at(&dma.to_vec(0, len).unwrap(), count_off),
        count as u64
    );
    drop(reg);
}

fn inode_of(view: &MemfdView) -> u64 {
    let maps = read_self_maps().unwrap();
    maps_overlapping(&maps, view.as_ptr() as u64, 1)[0].inode
}

#[test]
fn typed_errors_for_bad_requests() {
    let Some(cuda) = open("typed_errors_for_bad_requests") else {
        return;
    };
    let s = Stream::new(&cuda).unwrap();
    let buf = DeviceBuffer::new(&cuda, 1).unwrap();
    // Refused before the driver.
    assert!(matches!(buf.span(buf.len(), 1), Err(Error::Invalid(_))));
    let k = test_kernels(&cuda);
    let f = k.function(names::EMPTY).unwrap();
    // SAFETY: the kernel takes no arguments; the launch is refused before it reaches the driver.
    let bad = unsafe { s.launch(&f, &LaunchConfig::linear(1, 2048), &KernelArgs::new()) };
    assert!(matches!(bad, Err(Error::Invalid(_))));
    assert!(matches!(
        Module::from_cubin(&cuda, b"not an image"),
        Err(Error::Invalid(_))
    ));
    let (free, total) = cuda.mem_info().unwrap();
    assert!(matches!(
        ManagedBuffer::new(&cuda, total),
        Err(Error::Invalid(_))
    ));
    assert!(free <= total);
    assert!(matches!(
        DeviceBuffer::new(&cuda, total + 1),
        Err(Error::Invalid(_))
    ));
    // Refused by the driver, typed.
    let garbage = Module::from_ptx(
        &cuda,
        ".version 9.0\n.target sm_75\n.address_size 64\nthis is not ptx",
    );
    note(format!("garbage PTX: {:?}", garbage.as_ref().map(|_| ())));
    assert!(matches!(garbage, Err(Error::Driver { .. })));
    let newer = Module::from_ptx(
        &cuda,
        &kernels::PTX.replace(".version 9.0", ".version 99.9"),
    );
    note(format!("PTX ISA 99.9: {:?}", newer.as_ref().map(|_| ())));
    assert!(matches!(newer, Err(Error::Driver { .. })));
    assert!(matches!(k.function("missing"), Err(Error::Driver { .. })));
    // The context is still fine.
    s.memset_d8(buf.whole(), 3).unwrap();
    let mut b = [0u8; 1];
    s.copy_d2h_blocking(&mut b, buf.span(7, 1).unwrap())
        .unwrap();
    assert_eq!(b[0], 3);
}

/// Runs `unmapped_copy_child` in a child process for `case`; a copy to an unmapped device
/// address may poison the context (a sticky error), which must not take the other tests with
/// it.
fn run_child(case: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "unmapped_copy_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HETMEM_CUDA_CHILD", case)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("child {case} hung for 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "child {case} failed ({}):\n{text}",
        out.status
    );
    let line = text
        .lines()
        .find(|l| l.contains("typed error:"))
        .unwrap_or_else(|| panic!("child {case}:\n{text}"));
    // The harness prints "test unmapped_copy_child ... " before the child's own line.
    line[line.find(&format!("{case}: ")).unwrap_or(0)..].to_string()
}

#[test]
fn copy_to_unmapped_device_address_is_a_typed_error() {
    let Some(_cuda) = open("copy_to_unmapped_device_address_is_a_typed_error") else {
        return;
    };
    for case in ["freed", "reserved"] {
        note(run_child(case));
    }
}

/// The child's half of `copy_to_unmapped_device_address_is_a_typed_error`; does nothing unless
/// that test started it.
#[test]
#[ignore = "run in a child process by copy_to_unmapped_device_address_is_a_typed_error"]
fn unmapped_copy_child() {
    let Ok(case) = std::env::var("HETMEM_CUDA_CHILD") else {
        return;
    };
    let cuda = Cuda::open(0).unwrap();
    let chunk = chunk_size(&cuda).unwrap();
    let s = Stream::new(&cuda).unwrap();
    let pinned = PinnedBuffer::new(&cuda, 1 << 20).unwrap();
    let live;
    let target = match case.as_str() {
        // Addresses whose reservation has been freed: nothing is there.
        "freed" => Reservation::new(&cuda, chunk).unwrap().ptr(),
        // Addresses inside a live reservation, with no chunk mapped.
        "reserved" => {
            live = Reservation::new(&cuda, chunk).unwrap();
            live.ptr()
        }
        other => panic!("unknown case {other}"),
    };
    // SAFETY: no memory is mapped at `target` (see above), so the copy can reach nothing: the
    // driver refuses it, or the device faults.
    let span = unsafe { DeviceSpan::from_raw(target, 1 << 20) };
    let r = s
        .copy_h2d(span, pinned.whole())
        .and_then(|()| s.synchronize());
    match r {
        Err(e @ Error::Driver { .. }) => {
            println!(
                "{case}: typed error: {e} (context fatal: {})",
                e.is_context_fatal()
            );
        }
        Ok(()) => panic!("{case}: a copy to an unmapped device address succeeded"),
        Err(e) => panic!("{case}: unexpected error kind: {e}"),
    }
}
