//! Launches with declared access (`Device::launch`, `Device::launch_host`): the declared ranges
//! are resident before the launch runs and stay so until it completes. Whatever would move or
//! unmap them (a CPU fault, a `munmap`, eviction) waits for the launch, and eviction picks
//! other blocks first. The kernels here run on a thread of their own and wait for the test's
//! word before they touch memory, so the test can act while a launch is in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::{
    Advice, DeclaredAccess, DeviceKind, Error, Hetmem, LaunchPlacement, Location, ManagedBuf,
    PAGE_SIZE,
};

const BLOCK: usize = 2 << 20;

/// Fork waits for every launch of the process: the fork test runs alone (`alone`), every other
/// test holds this shared (`shared`), so no test's held kernel stalls another's fork.
static FORK: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    FORK.write().unwrap_or_else(|e| e.into_inner())
}

fn context(capacity: usize) -> anyhow::Result<Hetmem> {
    Ok(Hetmem::builder()
        .sim_device(DeviceKind::Private, capacity)
        .thrashing(None)
        .build()?)
}

/// Polls until `cond` holds, failing after 20 s. Synchronises on a state the runtime
/// publishes, not on time.
fn until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::yield_now();
    }
    Ok(())
}

fn alloc(hm: &Hetmem, len: usize, seed: u8) -> anyhow::Result<ManagedBuf> {
    let mut buf = hm.alloc(len)?;
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        page.fill(seed.wrapping_add(i as u8));
    }
    Ok(buf)
}

#[test]
fn a_launch_finds_its_ranges_on_the_device_and_leaves_its_writes_there() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = context(16 << 20)?;
    let dev = hm.device(0).expect("device 0");
    let src = alloc(&hm, BLOCK + 8 * PAGE_SIZE, 1)?;
    let mut dst = alloc(&hm, BLOCK + 8 * PAGE_SIZE, 0)?;
    let launch = dev.launch_host(
        &[
            DeclaredAccess::read(src.addr(), src.len()),
            DeclaredAccess::write(dst.addr(), dst.len()),
        ],
        |runs| {
            let input: Vec<u8> = runs
                .read(0)
                .expect("range 0")
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            let mut at = 0;
            for (_, out) in runs.write(1).expect("range 1 is writable") {
                for (o, i) in out.iter_mut().zip(&input[at..]) {
                    *o = i.wrapping_add(1);
                }
                at += out.len();
            }
        },
    )?;
    launch.wait()?;
    // The written pages are the device's alone; the read ones were copied there.
    let snap = dev.snapshot(dst.addr(), dst.len())?;
    assert!(snap.iter().all(|p| p.location == Location::PrivateLocal));
    assert_eq!(
        dev.counters().migrated_in as usize,
        2 * dst.len() / PAGE_SIZE
    );
    // The CPU faults them back with the kernel's data.
    for (i, page) in dst.chunks(PAGE_SIZE).enumerate() {
        let want = 2u8.wrapping_add(i as u8);
        assert!(page.iter().all(|&b| b == want), "page {i}");
    }
    dst[0] = 7;
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

#[test]
fn a_cpu_write_waits_for_the_launch_writing_the_page() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = Arc::new(context(16 << 20)?);
    let dev = hm.device(0).expect("device 0");
    let buf = alloc(&hm, 4 * PAGE_SIZE, 0)?;
    let (go, wait_go) = mpsc::channel::<()>();
    let launch = dev.launch_host(
        &[DeclaredAccess::write(buf.addr(), buf.len())],
        move |runs| {
            wait_go.recv().expect("the test's word");
            // Written after the CPU asked for the page: without the wait, the CPU would take the
            // page home before this and the byte would be lost with the device's frame.
            runs.write(0).expect("writable")[0].1[0] = 0xAA;
        },
    )?;
    std::thread::scope(|s| -> anyhow::Result<()> {
        // Owned here, `go` first dropped, so a failure ends the kernel before the scope
        // joins the writer, which waits for it.
        let launch = launch;
        let go = go;
        let writer = s.spawn(|| buf.as_atomic_u64()[12].store(u64::MAX, Ordering::Relaxed));
        until("the CPU fault waits for the launch", || {
            hm.stats().launch_waits >= 1
        })?;
        assert!(
            !writer.is_finished(),
            "the CPU write went ahead of the launch"
        );
        go.send(())?;
        launch.wait()?;
        writer.join().expect("writer");
        Ok(())
    })?;
    assert_eq!(buf[0], 0xAA, "the launch's write was lost");
    assert!(buf[96..104].iter().all(|&b| b == 0xFF));
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

#[test]
fn a_cpu_read_of_read_mostly_pages_goes_ahead_of_a_reading_launch() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = context(16 << 20)?;
    let dev = hm.device(0).expect("device 0");
    let buf = alloc(&hm, 4 * PAGE_SIZE, 3)?;
    hm.advise(buf.addr(), buf.len(), Advice::ReadMostly(true))?;
    let (go, wait_go) = mpsc::channel::<()>();
    let (seen, see) = mpsc::channel::<u8>();
    let launch = dev.launch_host(
        &[DeclaredAccess::read(buf.addr(), buf.len())],
        move |runs| {
            wait_go.recv().expect("the test's word");
            seen.send(runs.read(0).expect("range")[0].1[PAGE_SIZE])
                .expect("test");
        },
    )?;
    let go = go;
    // The launch holds the pages; a read of a read-mostly page duplicates it, so the CPU
    // needs nothing of the device and does not wait.
    assert_eq!(buf[PAGE_SIZE], 4);
    assert_eq!(hm.stats().launch_waits, 0);
    go.send(())?;
    assert_eq!(see.recv()?, 4);
    launch.wait()?;
    Ok(())
}

#[test]
fn freeing_a_buffer_waits_for_the_launch_using_it() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = Arc::new(context(16 << 20)?);
    let dev = hm.device(0).expect("device 0");
    let buf = alloc(&hm, BLOCK, 5)?;
    let (go, wait_go) = mpsc::channel::<()>();
    let wrote = Arc::new(AtomicBool::new(false));
    let launch = {
        let wrote = wrote.clone();
        dev.launch_host(
            &[DeclaredAccess::write(buf.addr(), buf.len())],
            move |runs| {
                wait_go.recv().expect("the test's word");
                for (_, b) in runs.write(0).expect("writable") {
                    b.fill(0xEE);
                }
                wrote.store(true, Ordering::Release);
            },
        )?
    };
    // Dropped before `launch` when the test fails early: the kernel then ends instead of
    // waiting for a word that never comes, and the failure is not a hang.
    let go = go;
    let freed = std::thread::spawn(move || drop(buf));
    until("the free waits for the launch", || {
        hm.stats().launch_waits >= 1
    })?;
    assert!(
        !freed.is_finished(),
        "the buffer was freed under a running launch"
    );
    go.send(())?;
    freed.join().expect("free");
    assert!(wrote.load(Ordering::Acquire));
    launch.wait()?;
    // The device frames the launch wrote went back zeroed: a new buffer reads zero there.
    let fresh = hm.alloc(BLOCK)?;
    dev.migrate_to_device(fresh.addr(), fresh.len())?;
    let back = dev.read(fresh.addr(), fresh.len())?;
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

#[test]
fn eviction_passes_over_the_blocks_a_running_launch_pins() -> anyhow::Result<()> {
    let _fork = shared();
    // Room for two blocks: one pinned by a launch, one that must make room for a third.
    let hm = context(2 * BLOCK)?;
    let dev = hm.device(0).expect("device 0");
    let pinned = alloc(&hm, BLOCK, 1)?;
    let others = alloc(&hm, 2 * BLOCK, 2)?;
    let (go, wait_go) = mpsc::channel::<()>();
    // The launch's block is the least recently used: LRU alone would evict it first.
    let launch = dev.launch_host(&[DeclaredAccess::read(pinned.addr(), BLOCK)], move |_| {
        wait_go.recv().expect("the test's word");
    })?;
    let go = go;
    let (done, finished) = mpsc::channel();
    {
        let dev = dev.clone();
        let addr = others.addr();
        std::thread::spawn(move || {
            let r = dev
                .migrate_to_device(addr, BLOCK)
                .and_then(|()| dev.migrate_to_device(addr + BLOCK, BLOCK));
            let _ = done.send(r);
        });
    }
    let r = finished.recv_timeout(Duration::from_secs(20));
    go.send(())?;
    launch.wait()?;
    r.map_err(|_| anyhow::anyhow!("eviction waited for the running launch"))??;
    assert_eq!(hm.stats().launch_waits, 0);
    let snap = dev.snapshot(pinned.addr(), BLOCK)?;
    assert!(snap.iter().all(|p| p.location == Location::PrivateLocal));
    Ok(())
}

#[test]
fn a_launch_that_cannot_fit_or_is_malformed_is_refused_before_anything_moves() -> anyhow::Result<()>
{
    let _fork = shared();
    let hm = context(2 * BLOCK)?;
    let dev = hm.device(0).expect("device 0");
    let big = alloc(&hm, 3 * BLOCK, 1)?;
    let small = alloc(&hm, 4 * PAGE_SIZE, 1)?;
    let never = |_: &mut hetmem::HostRuns| panic!("a refused launch ran");
    let cases: [(&[DeclaredAccess], i32); 6] = [
        (&[DeclaredAccess::read(big.addr(), big.len())], libc::ENOMEM),
        (&[], libc::EINVAL),
        (&[DeclaredAccess::read(small.addr(), 0)], libc::EINVAL),
        (
            &[DeclaredAccess::read(small.addr() + 1, PAGE_SIZE)],
            libc::EINVAL,
        ),
        (
            &[
                DeclaredAccess::read(small.addr(), 2 * PAGE_SIZE),
                DeclaredAccess::write(small.addr() + PAGE_SIZE, PAGE_SIZE),
            ],
            libc::EINVAL,
        ),
        (
            &[DeclaredAccess::read(small.addr(), small.len() + PAGE_SIZE)],
            libc::EFAULT,
        ),
    ];
    for (declared, errno) in cases {
        let e = dev.launch_host(declared, never).expect_err("refused");
        assert_eq!(e.errno(), errno, "{declared:?}: {e}");
    }
    assert_eq!(
        dev.counters().migrated_in,
        0,
        "a refused launch moved pages"
    );
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

#[test]
fn a_failing_launch_reports_its_error_and_keeps_the_data_it_did_not_write() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = context(16 << 20)?;
    let dev = hm.device(0).expect("device 0");
    let buf = alloc(&hm, 4 * PAGE_SIZE, 9)?;
    let launch = dev.launch_host(&[DeclaredAccess::read(buf.addr(), buf.len())], |_| {
        panic!("the kernel traps (expected by the test)")
    })?;
    match launch.wait() {
        Err(Error::Io(_)) => {}
        other => anyhow::bail!("want an I/O error, got {other:?}"),
    }
    assert_eq!(buf[3 * PAGE_SIZE], 12);
    // One dropped without `wait` counts as an error: nobody else will see it.
    let dropped = dev.launch_host(&[DeclaredAccess::read(buf.addr(), buf.len())], |_| {
        panic!("the kernel traps (expected by the test)")
    })?;
    drop(dropped);
    assert_eq!(hm.stats().errors, 1);
    Ok(())
}

#[test]
fn fork_waits_for_the_launches_running() -> anyhow::Result<()> {
    let _fork = alone();
    let hm = Arc::new(context(16 << 20)?);
    let dev = hm.device(0).expect("device 0");
    let buf = alloc(&hm, 4 * PAGE_SIZE, 0)?;
    let (go, wait_go) = mpsc::channel::<()>();
    let launch = dev.launch_host(
        &[DeclaredAccess::write(buf.addr(), buf.len())],
        move |runs| {
            wait_go.recv().expect("the test's word");
            runs.write(0).expect("writable")[0].1[0] = 0xAA;
        },
    )?;
    let addr = buf.addr();
    let go = go;
    // The child reads the first byte: the launch's write must be in its copy, so fork waited
    // for the launch instead of copying pages a kernel was still writing.
    let forker = std::thread::spawn(move || {
        // SAFETY: the child only reads its own copy of the buffer and leaves with _exit.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child's private copy of the managed view, made by the fork handler.
            #[allow(unsafe_code)]
            let b = unsafe { (addr as *const u8).read_volatile() };
            // SAFETY: leaves the child without running the parent's destructors.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(if b == 0xAA { 0 } else { 1 })
            };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::waitpid(pid, &mut status, 0)
        };
        status
    });
    until("fork waits for the launch", || hm.stats().launch_waits >= 1)?;
    assert!(
        !forker.is_finished(),
        "fork went ahead of the running launch"
    );
    go.send(())?;
    let status = forker.join().expect("forker");
    launch.wait()?;
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child saw a copy without the launch's write (status {status:#x})"
    );
    assert_eq!(buf[0], 0xAA);
    Ok(())
}

#[test]
fn remote_and_auto_placement_leave_the_data_where_it_is() -> anyhow::Result<()> {
    let _fork = shared();
    let hm = context(2 * BLOCK)?;
    let dev = hm.device(0).expect("device 0");
    // Twice the device: only remote placement can run over it.
    let big = alloc(&hm, 4 * BLOCK, 1)?;
    let out = alloc(&hm, 4 * PAGE_SIZE, 0)?;
    let migrate = [DeclaredAccess::read(big.addr(), big.len())];
    assert_eq!(
        dev.launch_host(&migrate, |_| {}).unwrap_err().errno(),
        libc::ENOMEM
    );
    let (sum, got) = mpsc::channel();
    let launch = dev.launch_host(
        &[
            DeclaredAccess::read(big.addr(), big.len()).placed(LaunchPlacement::Auto),
            DeclaredAccess::write(out.addr(), out.len()).placed(LaunchPlacement::Remote),
        ],
        move |runs| {
            let total: u64 = runs
                .read(0)
                .expect("range 0")
                .iter()
                .flat_map(|(_, b)| b.iter())
                .map(|&b| u64::from(b))
                .sum();
            runs.write(1).expect("range 1")[0].1[..8].copy_from_slice(&total.to_ne_bytes());
            sum.send(total).expect("test");
        },
    )?;
    launch.wait()?;
    let want: u64 = big.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(got.recv()?, want);
    // The kernel read and wrote system memory in place: nothing moved to the device.
    assert_eq!(dev.counters().migrated_in, 0);
    let snap = dev.snapshot(big.addr(), big.len())?;
    assert!(snap.iter().all(|p| p.location == Location::System));
    assert_eq!(u64::from_ne_bytes(out[..8].try_into()?), want);
    // Auto migrates what fits.
    let fits = dev.launch_host(
        &[DeclaredAccess::read(big.addr(), BLOCK).placed(LaunchPlacement::Auto)],
        |_| {},
    )?;
    fits.wait()?;
    assert_eq!(dev.counters().migrated_in as usize, BLOCK / PAGE_SIZE);
    // Atomics over the link are not offered.
    let atomic = [DeclaredAccess::atomic(out.addr(), PAGE_SIZE).placed(LaunchPlacement::Remote)];
    assert_eq!(
        dev.launch_host(&atomic, |_| {}).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}
