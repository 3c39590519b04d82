//! The process around managed memory: kernel-mode accesses, register(), madvise, mprotect,
//! concurrent faults under application locks, and teardown that leaks nothing.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::sync::{Arc, Barrier, Mutex};

use hetmem::{DeviceKind, Error, Hetmem, Location, Target, PAGE_SIZE};

mod common;

fn hm(kind: DeviceKind) -> Hetmem {
    Hetmem::builder()
        .sim_device(kind, 16 << 20)
        .build()
        .expect("hetmem context")
}

/// Whether a hetmem memfd is mapped at `addr` (other tests in this process have their own).
fn memfd_mapped_at(addr: usize) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:hetmem-"))
        .any(|l| {
            let mut r = l.split(['-', ' ']);
            let s = usize::from_str_radix(r.next().unwrap(), 16).unwrap();
            let e = usize::from_str_radix(r.next().unwrap(), 16).unwrap();
            (s..e).contains(&addr)
        })
}

/// read(2) from a pipe into managed memory whose pages live in private device memory, and
/// write(2) from it: the kernel's own accesses fault through userfaultfd like the CPU's.
#[test]
fn kernel_mode_read_and_write() {
    let hm = hm(DeviceKind::Private);
    if !hm.serves_kernel_faults() {
        eprintln!("SKIPPED: only user-mode userfaultfd is allowed to this process");
        return;
    }
    let dev = hm.device(0).unwrap();
    let len = 64 * PAGE_SIZE;
    let mut buf = hm.alloc(len).unwrap();
    buf.fill(0x5a);
    dev.migrate_to_device(buf.addr(), len).unwrap();
    assert!(dev
        .snapshot(buf.addr(), len)
        .unwrap()
        .iter()
        .all(|s| s.location == Location::PrivateLocal));

    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // write(2) from device-resident memory: the kernel reads it through a fault.
    // SAFETY: the buffer is mapped and len bytes long.
    let n = unsafe { libc::write(fds[1], buf.as_ptr().cast(), 8 * PAGE_SIZE) };
    assert_eq!(n, (8 * PAGE_SIZE) as isize, "write(2) from managed memory");
    let mut out = vec![0u8; 8 * PAGE_SIZE];
    // SAFETY: reading into our Vec.
    unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), out.len()) };
    assert!(out.iter().all(|&b| b == 0x5a));

    // read(2) into pages that are on the device again.
    dev.migrate_to_device(buf.addr(), len).unwrap();
    let msg = vec![0xc3u8; 3 * PAGE_SIZE];
    // SAFETY: writing our Vec into the pipe.
    unsafe { libc::write(fds[1], msg.as_ptr().cast(), msg.len()) };
    let dst = buf.addr() + 10 * PAGE_SIZE;
    // SAFETY: dst..dst+3 pages lies inside the buffer.
    let n = unsafe { libc::read(fds[0], dst as *mut libc::c_void, msg.len()) };
    assert_eq!(n, msg.len() as isize, "read(2) into managed memory");
    assert!(buf[10 * PAGE_SIZE..13 * PAGE_SIZE]
        .iter()
        .all(|&b| b == 0xc3));
    assert!(buf[13 * PAGE_SIZE..].iter().all(|&b| b == 0x5a));
    // And the device sees the kernel's write.
    let back = dev.read(dst, msg.len()).unwrap();
    assert_eq!(back, msg);
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn register_rejects_bad_ranges() {
    let hm = hm(DeviceKind::Private);
    let p = common::mem::anon(4 * PAGE_SIZE) as *mut u8;
    // SAFETY (all register calls): the ranges are ours and untouched by other threads.
    let e = unsafe { hm.register(p.wrapping_add(1), PAGE_SIZE) }.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "unaligned: {e}");
    assert_eq!(e.errno(), libc::EINVAL);
    let e = unsafe { hm.register(p, PAGE_SIZE + 7) }.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "unaligned length: {e}");
    // A hole in the middle.
    // SAFETY: unmapping a page of our own mapping.
    unsafe { libc::munmap(p.wrapping_add(PAGE_SIZE).cast(), PAGE_SIZE) };
    let e = unsafe { hm.register(p, 4 * PAGE_SIZE) }.unwrap_err();
    assert!(matches!(e, Error::NoEnt(_)), "hole: {e}");
    assert_eq!(e.errno(), libc::ENOENT);
    // Shared anonymous memory.
    // SAFETY: a fresh shared anonymous mapping.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let e = unsafe { hm.register(shared.cast(), PAGE_SIZE) }.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "shared: {e}");
    // A file mapping.
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    // SAFETY: a fresh private read-only file mapping.
    let file = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    let e = unsafe { hm.register(file.cast(), PAGE_SIZE) }.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "file: {e}");
    // Managed memory twice.
    let buf = hm.alloc(PAGE_SIZE).unwrap();
    let e = unsafe { hm.register(buf.as_ptr(), PAGE_SIZE) }.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "already managed: {e}");
}

/// register() keeps the data, devices use it, and dropping the registration leaves private
/// anonymous memory holding the latest data.
#[test]
fn register_roundtrip_keeps_data() {
    for kind in [DeviceKind::Private, DeviceKind::Coherent] {
        let hm = hm(kind);
        let dev = hm.device(0).unwrap();
        let len = 3 * (2 << 20) / 2; // 3 MiB: spans a block boundary
        let p = common::mem::anon(len) as *mut u8;
        // SAFETY: our own mapping.
        let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
        for (i, b) in s.iter_mut().enumerate().step_by(97) {
            *b = (i / 97) as u8 | 1;
        }
        // SAFETY: the range is ours and no other thread touches it.
        let reg = unsafe { hm.register(p, len) }.unwrap();
        let seen = dev.read(p as usize, len).unwrap();
        for i in (0..len).step_by(97) {
            assert_eq!(seen[i], (i / 97) as u8 | 1, "device read at {i}");
        }
        dev.write(p as usize + PAGE_SIZE, &[0xee; PAGE_SIZE])
            .unwrap();
        hm.migrate(p as usize, len, Target::Device(dev.id()))
            .unwrap();
        drop(reg);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                usize::from_str_radix(l.split('-').next().unwrap(), 16).unwrap() <= p as usize && {
                    let end = l.split(['-', ' ']).nth(1).unwrap();
                    usize::from_str_radix(end, 16).unwrap() > p as usize
                }
            })
            .unwrap();
        assert!(
            line.contains("rw-p") && !line.contains("memfd"),
            "after drop: {line}"
        );
        // SAFETY: still our mapping, now private anonymous again.
        let s = unsafe { std::slice::from_raw_parts(p, len) };
        assert!(s[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0xee));
        for i in (0..len).step_by(97) {
            if !(PAGE_SIZE..2 * PAGE_SIZE).contains(&i) {
                assert_eq!(s[i], (i / 97) as u8 | 1, "after drop at {i}");
            }
        }
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), len) };
    }
}

/// `discard` is hetmem's MADV_DONTNEED: zeros afterwards, on the CPU and on devices. A raw
/// MADV_DONTNEED on managed memory keeps the data, as on any shared mapping.
#[test]
fn discard_and_raw_madvise() {
    let hm = hm(DeviceKind::Private);
    let dev = hm.device(0).unwrap();
    let len = 32 * PAGE_SIZE;
    let mut buf = hm.alloc(len).unwrap();
    buf.fill(9);
    dev.migrate_to_device(buf.addr(), len / 2).unwrap();
    // SAFETY: zapping page-table entries of managed memory; hetmem restores them on the next
    // access from the memfd.
    assert_eq!(
        unsafe { libc::madvise(buf.as_ptr().cast(), len, libc::MADV_DONTNEED) },
        0
    );
    assert!(buf.iter().all(|&b| b == 9), "raw MADV_DONTNEED keeps data");
    assert!(dev.read(buf.addr(), len).unwrap().iter().all(|&b| b == 9));
    hm.discard(buf.addr(), len).unwrap();
    assert!(dev.read(buf.addr(), len).unwrap().iter().all(|&b| b == 0));
    assert!(buf.iter().all(|&b| b == 0), "discard reads zero");
    assert_eq!(
        hm.device_pages_used(dev.id()) as usize,
        0,
        "device reads of zero pages hold no frames after discard"
    );
}

/// `protect` revokes device mappings at once; raw mprotect is seen at the next device access.
#[test]
fn protect_revokes_device_mappings() {
    let hm = hm(DeviceKind::Private);
    let dev = hm.device(0).unwrap();
    let len = 8 * PAGE_SIZE;
    let mut buf = hm.alloc(len).unwrap();
    buf.fill(1);
    dev.write(buf.addr(), &vec![2; len]).unwrap();
    hm.protect(buf.addr(), len, true, false).unwrap();
    assert!(matches!(
        dev.write(buf.addr(), &[3; PAGE_SIZE]),
        Err(Error::Perm)
    ));
    assert!(dev.read(buf.addr(), len).unwrap().iter().all(|&b| b == 2));
    hm.protect(buf.addr(), len, false, false).unwrap();
    assert!(matches!(
        dev.read(buf.addr(), PAGE_SIZE),
        Err(Error::Fault(_))
    ));
    hm.protect(buf.addr(), len, true, true).unwrap();
    dev.write(buf.addr(), &[4; PAGE_SIZE]).unwrap();
    assert_eq!(buf[0], 4);
}

/// Many threads fault the same pages while holding an application lock that the service
/// threads never take: no deadlock, every thread sees the data (EEXIST + explicit wake).
#[test]
fn concurrent_faults_under_application_lock() {
    let hm = Hetmem::builder()
        .sim_device(DeviceKind::Private, 16 << 20)
        .service_threads(3)
        .fault_around_pages(1)
        .build()
        .unwrap();
    let dev = hm.device(0).unwrap();
    let len = 256 * PAGE_SIZE;
    let buf = Arc::new(hm.alloc(len).unwrap());
    for round in 0..20u64 {
        let words = buf.as_atomic_u64();
        for p in 0..256 {
            words[p * PAGE_SIZE / 8].store(
                round * 1000 + p as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        dev.migrate_to_device(buf.addr(), len).unwrap();
        let app_lock = Arc::new(Mutex::new(0u64));
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (buf, app_lock, barrier) = (buf.clone(), app_lock.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let words = buf.as_atomic_u64();
                    for i in 0..256 {
                        let p = (i * 7 + t * 13) % 256;
                        let mut g = app_lock.lock().unwrap();
                        let v = words[p * PAGE_SIZE / 8].load(std::sync::atomic::Ordering::Relaxed);
                        assert_eq!(v, round * 1000 + p as u64, "thread {t} page {p}");
                        *g += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*app_lock.lock().unwrap(), 4 * 256);
    }
    assert_eq!(hm.stats().errors, 0);
}

/// Dropping buffers, releasing devices and dropping the context leaks no device frame, no
/// mapping and no memfd.
#[test]
fn teardown_leaks_nothing() {
    let hm = hm(DeviceKind::Private);
    let dev = hm.device(0).unwrap();
    let mut a = hm.alloc(4 << 20).unwrap();
    let b = hm.alloc(1 << 20).unwrap();
    let (a_addr, b_addr) = (a.addr(), b.addr());
    assert!(memfd_mapped_at(a_addr) && memfd_mapped_at(b_addr));
    a.fill(3);
    dev.migrate_to_device(a.addr(), 4 << 20).unwrap();
    dev.read(b.addr(), 1 << 20).unwrap();
    assert!(dev.used_pages() > 0);
    dev.release().unwrap();
    assert_eq!(dev.used_pages(), 0, "release frees every frame");
    assert!(a.iter().all(|&x| x == 3), "release keeps the data");
    dev.migrate_to_device(a.addr(), 4 << 20).unwrap();
    drop(a);
    drop(b);
    assert_eq!(dev.used_pages(), 0, "dropping buffers frees their frames");
    assert!(
        !memfd_mapped_at(a_addr) && !memfd_mapped_at(b_addr),
        "views unmapped"
    );
    assert_eq!(hm.stats().errors, 0);
}

/// A sequential CPU read-back of device-resident data is read ahead: one fault per block (its
/// first page), the data intact, and a device write racing ahead of the reader still wins.
#[test]
fn sequential_read_back_reads_ahead() {
    let hm = Hetmem::builder()
        .sim_device(DeviceKind::Private, 32 << 20)
        .build()
        .unwrap();
    let dev = hm.device(0).unwrap();
    let blocks = 8;
    let len = blocks * (2 << 20);
    let mut buf = hm.alloc(len).unwrap();
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64).to_le_bytes());
    }
    dev.migrate_to_device(buf.addr(), len).unwrap();
    // The device rewrites a page of block 2, which is being read ahead, while the CPU is still
    // in block 0: the protocol takes the read-ahead copy back first.
    let last = buf.addr() + 2 * (2 << 20);
    let s0 = hm.stats();
    let mut sum = 0u64;
    for (i, w) in buf.chunks_exact(8).enumerate() {
        if i == 8 {
            dev.write(last, &vec![0xffu8; PAGE_SIZE]).unwrap();
        }
        sum = sum.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
    }
    let s1 = hm.stats();
    let n = (len / 8) as u64;
    let words_per_page = (PAGE_SIZE / 8) as u64;
    let first_of_last = (2 * (2 << 20) / 8) as u64;
    let replaced: u64 = (first_of_last..first_of_last + words_per_page).sum();
    let expected = (n * (n - 1) / 2)
        .wrapping_sub(replaced)
        .wrapping_add(words_per_page.wrapping_mul(u64::MAX));
    assert_eq!(sum, expected, "read-back data");
    assert!(
        s1.pages_prefetched - s0.pages_prefetched > 0,
        "read ahead happened"
    );
    assert!(
        s1.cpu_faults - s0.cpu_faults <= 2 * blocks as u64,
        "about one fault per block: {}",
        s1.cpu_faults - s0.cpu_faults
    );
    assert_eq!(hm.stats().errors, 0);
}

/// Data evicted from a device lands in system memory unmapped; the CPU maps it back a window
/// at a time (map-around), not one fault per 4 KiB page.
#[test]
fn evicted_data_is_mapped_around() {
    let hm = Hetmem::builder()
        .sim_device(DeviceKind::Private, 4 << 20)
        .build()
        .unwrap();
    let dev = hm.device(0).unwrap();
    let blocks = 8;
    let len = blocks * (2 << 20);
    let mut buf = hm.alloc(len).unwrap();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i / PAGE_SIZE) as u8;
    }
    dev.kernel_write(buf.addr(), len, |addr, bytes| {
        for (k, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let add = ((addr + k * PAGE_SIZE) % 7) as u8;
            page.iter_mut().for_each(|b| *b = b.wrapping_add(add));
        }
    })
    .unwrap();
    assert!(
        hm.stats().pages_evicted > 0,
        "the device is smaller than the buffer"
    );
    let s0 = hm.stats();
    for (i, chunk) in buf.chunks_exact(PAGE_SIZE).enumerate() {
        let want = (i as u8).wrapping_add(((buf.addr() + i * PAGE_SIZE) % 7) as u8);
        assert!(chunk.iter().all(|&b| b == want), "page {i}");
    }
    let faults = hm.stats().cpu_faults - s0.cpu_faults;
    assert!(
        faults <= 2 * blocks as u64,
        "{faults} CPU faults for {blocks} blocks"
    );
}

/// A device kernel's closure that reads its own pages through the CPU (not through the slice it
/// is given) gets the device's data and the launch succeeds. It used to deadlock: the worker
/// holds the block's page-table read lock, which the CPU fault needed for writing.
#[test]
fn kernel_reads_its_own_pages_through_the_cpu() -> anyhow::Result<()> {
    common::watchdog("kernel_reads_through_cpu", 60, || {
        for kind in [DeviceKind::Private, DeviceKind::Coherent] {
            let hm = hm(kind);
            let dev = hm.device(0).unwrap();
            let len = 4 << 20;
            let mut buf = hm.alloc(len)?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i / PAGE_SIZE) as u8;
            }
            dev.write(buf.addr() + PAGE_SIZE, &[0xee; PAGE_SIZE])?;
            let b = &buf;
            let seen = std::sync::atomic::AtomicUsize::new(0);
            dev.kernel_read(b.addr(), len, |va, data| {
                let off = va - b.addr();
                assert_eq!(
                    &b[off..off + data.len()],
                    data,
                    "{kind:?}: CPU view at {off:#x}"
                );
                seen.fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
            })?;
            assert_eq!(seen.into_inner(), len);
            assert!(buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&x| x == 0xee));
            assert_eq!(dev.read(buf.addr(), len)?, buf.to_vec());
            assert_eq!(hm.stats().errors, 0);
        }
        Ok(())
    })
}

/// A kernel that touches through the CPU the pages it is writing, or writes through a CPU
/// pointer, fails with `Invalid` instead of deadlocking (it did, as a read did); the CPU and the
/// device agree afterwards, and a write through the CPU pointer is in the device's copy.
#[test]
fn kernel_cpu_accesses_to_pages_it_maps_fail_cleanly() -> anyhow::Result<()> {
    common::watchdog("kernel_cpu_access_fails", 60, || {
        for kind in [DeviceKind::Private, DeviceKind::Coherent] {
            let hm = hm(kind);
            let dev = hm.device(0).unwrap();
            let len = 2 << 20;
            let mut buf = hm.alloc(len)?;
            buf.fill(1);
            let b = &buf;
            let r = dev.kernel_write(b.addr(), len, |va, data| {
                data.fill(2);
                let off = va - b.addr();
                std::hint::black_box(b[off]);
            });
            assert!(
                matches!(r, Err(Error::Invalid(_))),
                "{kind:?}: kernel_write reading its pages through the CPU: {r:?}"
            );
            assert_eq!(
                dev.read(buf.addr(), len)?,
                buf.to_vec(),
                "{kind:?}: after kernel_write"
            );

            let base = buf.addr();
            let r = dev.kernel_read(base, len, |va, _| {
                // SAFETY: the page is managed memory this test owns; the write goes through the
                // CPU view, as a buggy kernel would make it.
                unsafe { (va as *mut u8).write_volatile(0x5a) };
            });
            // A coherent device shares its memory with the CPU: when the CPU maps the page
            // already, its write takes no fault and is simply coherent.
            assert!(
                matches!(r, Err(Error::Invalid(_))) || (kind == DeviceKind::Coherent && r.is_ok()),
                "{kind:?}: kernel_read writing through a CPU pointer: {r:?}"
            );
            let on_device = dev.read(base, len)?;
            assert_eq!(
                on_device[0], 0x5a,
                "{kind:?}: the CPU write reached the device copy"
            );
            assert_eq!(on_device, buf.to_vec(), "{kind:?}: after kernel_read");
            assert_eq!(hm.stats().errors, 0);
        }
        Ok(())
    })
}

/// The protection of a whole command's range is checked before any of it moves, as
/// hmm_range_fault checks the VMAs first: a PROT_NONE page in a later block gives `Fault` even
/// when the copies of an earlier block would fail, and nothing is copied (the injected failure
/// is still pending afterwards).
#[test]
fn protection_is_checked_before_anything_moves() -> anyhow::Result<()> {
    common::watchdog("protection_first", 60, || {
        let hm = hm(DeviceKind::Private);
        let dev = hm.device(0).unwrap();
        let len = 4 << 20;
        let mut buf = hm.alloc(len)?;
        buf.fill(3);
        dev.migrate_to_device(buf.addr(), len)?;
        let second = buf.addr() + (2 << 20);
        assert_eq!(
            unsafe { libc::mprotect(second as *mut libc::c_void, 2 << 20, libc::PROT_NONE) },
            0
        );
        dev.inject_transfer_failures(1);
        let read = dev.write(buf.addr(), &vec![4; len]);
        assert!(
            matches!(read, Err(Error::Fault(_))),
            "device write: {read:?}"
        );
        let home = hm.migrate(buf.addr(), len, Target::System);
        assert!(
            matches!(home, Err(Error::Fault(_))),
            "migrate home: {home:?}"
        );
        // The failure is still pending: nothing was copied.
        let first = hm.migrate(buf.addr(), 2 << 20, Target::System);
        assert!(
            matches!(first, Err(Error::Io(_))),
            "migrate of the first block: {first:?}"
        );
        assert!(buf[..2 << 20].iter().all(|&b| b == 3));
        assert_eq!(hm.stats().errors, 0);
        Ok(())
    })
}

/// A fault that arrives while a service thread is held up is still served: here the held-up
/// fault is a CPU read of a block that a running device kernel maps for writing (it waits for
/// the kernel), and the kernel waits for the second fault, on another block, which the other
/// service thread serves. (A design with one thread on the userfaultfd and spares that join
/// when it is held up hung here about once in fifteen runs.)
#[test]
fn a_held_up_service_thread_does_not_hold_up_other_faults() -> anyhow::Result<()> {
    common::watchdog("held_up_service_thread", 60, || {
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 16 << 20)
            .service_threads(2)
            .fault_around_pages(1)
            .build()?;
        let dev = hm.device(0).expect("device 0");
        let block = hetmem::PAGES_PER_BLOCK * PAGE_SIZE;
        let buf = hm.alloc(2 * block)?;
        // A first fault, so the spares have started watching.
        std::hint::black_box(buf[2 * PAGE_SIZE]);
        let (in_kernel, release) = (Barrier::new(2), Barrier::new(2));
        let first = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|s| -> anyhow::Result<()> {
            let kernel = s.spawn(|| {
                dev.kernel_write(buf.addr(), block, |_, _| {
                    if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        in_kernel.wait();
                        release.wait();
                    }
                })
            });
            in_kernel.wait();
            let before = hm.stats().cpu_faults;
            // Held up: its page is the running kernel's.
            let reader = s.spawn(|| std::hint::black_box(buf[PAGE_SIZE]));
            while hm.stats().cpu_faults == before {
                std::thread::yield_now();
            }
            // Another block's fresh page: served while the first fault waits.
            assert_eq!(std::hint::black_box(buf[block + PAGE_SIZE]), 0);
            release.wait();
            kernel.join().expect("kernel thread")?;
            assert_eq!(reader.join().expect("reader thread"), 0);
            Ok(())
        })?;
        assert_eq!(hm.stats().errors, 0);
        Ok(())
    })
}
