//! The placement-policy seam (`hetmem::policy`): policies see the memory manager's event stream
//! and decide windows, read-ahead and victims; the mechanism carries their plans out as
//! protocol requests, so even a hostile policy cannot lose data.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hetmem::policy::{Candidate, CpuFault, CpuFaultPlan, DefaultPolicy, MemEvent, PlacementPolicy};
use hetmem::{DeviceId, DeviceKind, Hetmem, Location, Target, PAGE_SIZE};

const BLOCK: usize = 2 << 20;

fn d0() -> DeviceId {
    DeviceId::new(0).expect("device 0")
}

fn context(policy: Arc<dyn PlacementPolicy>, capacity: usize) -> anyhow::Result<Hetmem> {
    Ok(Hetmem::builder()
        .sim_device(DeviceKind::Private, capacity)
        .policy(policy)
        .build()?)
}

fn fill(buf: &mut [u8], seed: u8) {
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        page.fill(seed.wrapping_add(i as u8));
    }
}

fn check(buf: &[u8], seed: u8) -> anyhow::Result<()> {
    for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
        let want = seed.wrapping_add(i as u8);
        anyhow::ensure!(
            page.iter().all(|&b| b == want),
            "page {i}: want {want:#x}, found {:#x}",
            page[0]
        );
    }
    Ok(())
}

/// The default policy, plus counts of what it observed.
#[derive(Debug)]
struct Recording {
    inner: DefaultPolicy,
    cpu_faults: AtomicU64,
    device_pages: AtomicU64,
    to_device: AtomicU64,
    to_system: AtomicU64,
}

impl PlacementPolicy for Recording {
    fn observe(&self, event: &MemEvent<'_>) {
        match *event {
            MemEvent::CpuFault { .. } => {
                self.cpu_faults.fetch_add(1, Ordering::Relaxed);
            }
            MemEvent::DeviceAccess { pages, .. } => {
                self.device_pages.fetch_add(pages, Ordering::Relaxed);
            }
            MemEvent::Migrated {
                to, pages, from, ..
            } => match (from, to) {
                (_, hetmem::Mem::Device(_)) => {
                    self.to_device.fetch_add(pages, Ordering::Relaxed);
                }
                (hetmem::Mem::Device(_), hetmem::Mem::System) => {
                    self.to_system.fetch_add(pages, Ordering::Relaxed);
                }
                _ => {}
            },
            _ => {}
        }
        self.inner.observe(event);
    }

    fn cpu_fault(&self, f: &CpuFault<'_>) -> CpuFaultPlan {
        self.inner.cpu_fault(f)
    }

    fn victims(&self, dev: DeviceId, c: &mut Vec<Candidate<'_>>) {
        self.inner.victims(dev, c)
    }
}

#[test]
fn one_event_stream_feeds_stats_device_counters_and_the_policy() -> anyhow::Result<()> {
    common::watchdog("event_stream", 60, || {
        let rec = Arc::new(Recording {
            inner: DefaultPolicy::new(512, 4),
            cpu_faults: AtomicU64::new(0),
            device_pages: AtomicU64::new(0),
            to_device: AtomicU64::new(0),
            to_system: AtomicU64::new(0),
        });
        let h = context(rec.clone(), 64 << 20)?;
        let dev = h.device(0).expect("device");
        let mut buf = h.alloc(4 * BLOCK)?;
        fill(&mut buf, 3);
        h.migrate(buf.addr(), buf.len(), Target::Device(d0()))?;
        dev.write(buf.addr(), &vec![9u8; 8 * PAGE_SIZE])?;
        let _ = dev.read(buf.addr() + BLOCK, 16 * PAGE_SIZE)?;
        check(&buf[BLOCK..], 3u8.wrapping_add((BLOCK / PAGE_SIZE) as u8))?;
        let s = h.stats();
        let c = dev.counters();
        anyhow::ensure!(s.cpu_faults > 0 && s.pages_to_device > 0 && s.pages_to_system > 0);
        assert_eq!(rec.cpu_faults.load(Ordering::Relaxed), s.cpu_faults);
        assert_eq!(rec.device_pages.load(Ordering::Relaxed), c.pages);
        assert_eq!(rec.to_device.load(Ordering::Relaxed), s.pages_to_device);
        assert_eq!(rec.to_system.load(Ordering::Relaxed), s.pages_to_system);
        assert_eq!(c.migrated_out, s.pages_to_system);
        Ok(())
    })
}

/// Never a window: every page is its own fault.
#[derive(Debug)]
struct PageByPage;

impl PlacementPolicy for PageByPage {
    fn cpu_fault(&self, _: &CpuFault<'_>) -> CpuFaultPlan {
        CpuFaultPlan::default()
    }

    fn victims(&self, _: DeviceId, _: &mut Vec<Candidate<'_>>) {}
}

/// CPU faults to read back one block from private device memory under `policy`.
fn readback_faults(policy: Arc<dyn PlacementPolicy>) -> anyhow::Result<u64> {
    let h = context(policy, 64 << 20)?;
    let mut buf = h.alloc(BLOCK)?;
    fill(&mut buf, 0x31);
    h.migrate(buf.addr(), buf.len(), Target::Device(d0()))?;
    let before = h.stats().cpu_faults;
    check(&buf, 0x31)?;
    Ok(h.stats().cpu_faults - before)
}

#[test]
fn the_policy_decides_the_read_back_window() -> anyhow::Result<()> {
    common::watchdog("read_back_window", 60, || {
        let default = readback_faults(Arc::new(DefaultPolicy::new(512, 4)))?;
        let paged = readback_faults(Arc::new(PageByPage))?;
        // The default brings the block home with the first fault; page by page, every page
        // faults (fault-around is the protocol's, for first touches only).
        assert!(default <= 4, "default policy: {default} faults");
        assert_eq!(paged, (BLOCK / PAGE_SIZE) as u64);
        Ok(())
    })
}

/// Evicts the most recently used block first (the opposite of the default's LRU).
#[derive(Debug)]
struct Mru(DefaultPolicy);

impl PlacementPolicy for Mru {
    fn observe(&self, e: &MemEvent<'_>) {
        self.0.observe(e)
    }

    fn cpu_fault(&self, f: &CpuFault<'_>) -> CpuFaultPlan {
        self.0.cpu_fault(f)
    }

    fn victims(&self, dev: DeviceId, c: &mut Vec<Candidate<'_>>) {
        c.sort_by_key(|c| std::cmp::Reverse(c.block.stamps[dev.index()].load(Ordering::Relaxed)));
    }
}

/// Which of blocks A and B stays on the device after A, then B were used and block C needed
/// room.
fn survivor(policy: Arc<dyn PlacementPolicy>) -> anyhow::Result<&'static str> {
    let h = context(policy, 2 * BLOCK)?;
    let dev = h.device(0).expect("device");
    let mut buf = h.alloc(3 * BLOCK)?;
    fill(&mut buf, 0x55);
    let (a, b, c) = (buf.addr(), buf.addr() + BLOCK, buf.addr() + 2 * BLOCK);
    h.migrate(a, BLOCK, Target::Device(d0()))?;
    h.migrate(b, BLOCK, Target::Device(d0()))?;
    dev.read(a, PAGE_SIZE)?;
    dev.read(b, PAGE_SIZE)?;
    h.migrate(c, BLOCK, Target::Device(d0()))?;
    let on_device = |at| -> anyhow::Result<bool> {
        Ok(dev.snapshot(at, PAGE_SIZE)?[0].location == Location::PrivateLocal)
    };
    let r = match (on_device(a)?, on_device(b)?) {
        (true, false) => "A",
        (false, true) => "B",
        other => anyhow::bail!("expected one survivor, found {other:?}"),
    };
    check(&buf, 0x55)?;
    Ok(r)
}

#[test]
fn the_policy_orders_the_victims() -> anyhow::Result<()> {
    common::watchdog("victims", 60, || {
        assert_eq!(survivor(Arc::new(DefaultPolicy::new(512, 4)))?, "B");
        assert_eq!(survivor(Arc::new(Mru(DefaultPolicy::new(512, 4))))?, "A");
        Ok(())
    })
}

/// Answers at random: windows of any size, read-ahead of any blocks, victims shuffled or none.
#[derive(Debug)]
struct Hostile(Mutex<u64>);

impl Hostile {
    fn next(&self) -> u64 {
        let mut s = self.0.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }
}

impl PlacementPolicy for Hostile {
    fn cpu_fault(&self, f: &CpuFault<'_>) -> CpuFaultPlan {
        let r = self.next();
        let start = (r % 512) as usize;
        let len = ((r >> 9) % 600) as usize;
        CpuFaultPlan {
            window: hetmem::PageRun::new(start.min(f.page), len, 512),
            bring_home: r & (1 << 40) != 0,
            read_ahead: Some(((r >> 20) % 8) as usize..=usize::MAX),
        }
    }

    fn victims(&self, _: DeviceId, c: &mut Vec<Candidate<'_>>) {
        let r = self.next();
        if r % 3 == 0 {
            c.clear();
        } else {
            c.reverse();
            c.truncate((r % 5) as usize + 1);
        }
    }
}

#[test]
fn a_hostile_policy_cannot_lose_data() -> anyhow::Result<()> {
    common::watchdog("hostile_policy", 120, || {
        let h = context(
            Arc::new(Hostile(Mutex::new(0x9e37_79b9_7f4a_7c15))),
            3 * BLOCK,
        )?;
        let dev = h.device(0).expect("device");
        let mut buf = h.alloc(8 * BLOCK)?;
        fill(&mut buf, 0x11);
        for round in 0..6u8 {
            for b in 0..8 {
                let at = buf.addr() + b * BLOCK;
                if (b + round as usize) % 2 == 0 {
                    h.migrate(at, BLOCK, Target::Device(d0()))?;
                }
                // The device writes a page of each block; the CPU reads it all back below.
                let page = (b * 7 + round as usize) % (BLOCK / PAGE_SIZE);
                dev.write(at + page * PAGE_SIZE, &vec![0xee; PAGE_SIZE])?;
                buf[b * BLOCK + page * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&vec![
                    0x11u8
                        .wrapping_add(
                            page as u8
                        );
                    PAGE_SIZE
                ]);
            }
            check(&buf, 0x11)?;
        }
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

/// One round of ping-pong: the CPU writes one byte of every page of `buf`, then the device
/// writes one byte of every page; each side checks what the other wrote. Returns the pages
/// that moved to the device during the round.
fn ping_pong_round(hm: &Hetmem, buf: &mut hetmem::ManagedBuf, round: u8) -> anyhow::Result<u64> {
    let dev = hm.device(0).expect("one device");
    let before = hm.stats();
    for p in (0..buf.len()).step_by(PAGE_SIZE) {
        anyhow::ensure!(
            round == 0 || buf[p + 1] == round.wrapping_sub(1),
            "round {round}: the CPU does not see the device's write at {p:#x}"
        );
        buf[p] = round;
    }
    let bad = AtomicU64::new(0);
    dev.kernel_write(buf.addr(), buf.len(), |_, bytes| {
        for p in (0..bytes.len()).step_by(PAGE_SIZE) {
            if bytes[p] != round {
                bad.fetch_add(1, Ordering::Relaxed);
            }
            bytes[p + 1] = round;
        }
    })?;
    anyhow::ensure!(
        bad.load(Ordering::Relaxed) == 0,
        "round {round}: the device does not see the CPU's writes"
    );
    Ok(hm.stats().since(&before).pages_to_device)
}

/// The CPU and a device write the same pages in turn. Without mitigation every round migrates
/// the whole range to the device and back; the default policy finds the blocks thrashing
/// within two round trips and pins them to system memory, and from then on the device maps
/// them remotely: no page moves, and both sides still see each other's writes.
#[test]
fn ping_pong_is_pinned_to_system_memory_within_two_round_trips() -> anyhow::Result<()> {
    common::watchdog(
        "ping_pong_is_pinned_to_system_memory_within_two_round_trips",
        60,
        || {
            let build = |thrashing| {
                Hetmem::builder()
                    .sim_device(DeviceKind::Private, 64 << 20)
                    .thrashing(thrashing)
                    .build()
            };
            let config = hetmem::policy::ThrashingConfig {
                // Long enough that this test's rounds never see the pin lifted.
                pin: std::time::Duration::from_secs(60),
                ..Default::default()
            };
            let hm = build(Some(config))?;
            let mut buf = hm.alloc(8 << 20)?;
            let mut moved = Vec::new();
            for round in 0..8u8 {
                moved.push(ping_pong_round(&hm, &mut buf, round)?);
            }
            let pins = hm.stats().thrashing_pins;
            anyhow::ensure!(pins >= 4, "{pins} blocks pinned of 4: {moved:?}");
            let engaged = moved.iter().position(|&m| m == 0);
            anyhow::ensure!(
                engaged.is_some_and(|r| r <= 3),
                "pages moved to the device per round: {moved:?}"
            );
            anyhow::ensure!(moved[4..].iter().all(|&m| m == 0), "{moved:?}");
            anyhow::ensure!(hm.stats().errors == 0);

            // Migrate-always: every round moves the whole range.
            let hm = build(None)?;
            let mut buf = hm.alloc(8 << 20)?;
            for round in 0..8u8 {
                let m = ping_pong_round(&hm, &mut buf, round)?;
                anyhow::ensure!(
                    m == 2048,
                    "round {round}: {m} pages moved without mitigation"
                );
            }
            anyhow::ensure!(hm.stats().thrashing_pins == 0);
            Ok(())
        },
    )
}

/// Device reads of single pages: `pattern` says which pages of 4 MiB are read, in order.
/// Returns (pages moved to the device, device faults).
fn device_touches(density: bool, pattern: impl Fn(usize) -> bool) -> anyhow::Result<(u64, u64)> {
    let hm = Hetmem::builder()
        .sim_device(DeviceKind::Private, 64 << 20)
        .density_prefetch(density.then(hetmem::policy::DensityConfig::default))
        .build()?;
    let dev = hm.device(0).expect("one device");
    let mut buf = hm.alloc(4 << 20)?;
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        page[0] = i as u8;
    }
    let before = hm.stats();
    for i in (0..buf.len() / PAGE_SIZE).filter(|&i| pattern(i)) {
        let got = dev.read(buf.addr() + i * PAGE_SIZE, PAGE_SIZE)?;
        anyhow::ensure!(got[0] == i as u8, "page {i}: {}", got[0]);
    }
    let d = hm.stats().since(&before);
    anyhow::ensure!(d.errors == 0);
    Ok((d.pages_to_device, d.device_faults))
}

/// Density prefetch: a device reading one page in eight moves only those pages; one reading
/// three pages in four stops faulting page by page once a region is dense, and brings it whole.
#[test]
fn density_prefetch_follows_dense_faults_and_leaves_sparse_ones() -> anyhow::Result<()> {
    common::watchdog(
        "density_prefetch_follows_dense_faults_and_leaves_sparse_ones",
        60,
        || {
            let sparse = |i: usize| i % 8 == 0;
            let (moved, faults) = device_touches(true, sparse)?;
            let touched = (0..1024).filter(|&i| sparse(i)).count() as u64;
            anyhow::ensure!(
                moved <= 2 * touched,
                "sparse: {moved} pages moved for {touched} touched"
            );
            anyhow::ensure!(faults >= touched, "sparse: {faults} faults");

            let dense = |i: usize| i % 4 != 3;
            let touched = (0..1024).filter(|&i| dense(i)).count() as u64;
            let (moved_on, faults_on) = device_touches(true, dense)?;
            let (moved_off, faults_off) = device_touches(false, dense)?;
            anyhow::ensure!(
                faults_off >= touched && moved_off == touched,
                "without prefetch: {moved_off} moved, {faults_off} faults, {touched} touched"
            );
            anyhow::ensure!(
                faults_on * 4 < faults_off,
                "dense: {faults_on} faults with prefetch, {faults_off} without"
            );
            anyhow::ensure!(moved_on >= touched, "dense: {moved_on} moved with prefetch");
            Ok(())
        },
    )
}

/// `AccessedBy(d)` pre-maps what is in system memory for the device: its first read does not
/// fault, and nothing moves (the device reads system memory remotely). Without the advice, the
/// same read faults and migrates.
#[test]
fn accessed_by_premaps_so_the_first_access_does_not_fault() -> anyhow::Result<()> {
    common::watchdog(
        "accessed_by_premaps_so_the_first_access_does_not_fault",
        60,
        || {
            for advise in [true, false] {
                let hm = Hetmem::builder()
                    .sim_device(DeviceKind::Private, 64 << 20)
                    .build()?;
                let dev = hm.device(0).expect("one device");
                let mut buf = hm.alloc(4 << 20)?;
                fill(&mut buf, 0x61);
                if advise {
                    hm.advise(
                        buf.addr(),
                        buf.len(),
                        hetmem::Advice::AccessedBy(d0(), true),
                    )?;
                }
                let before = hm.stats();
                let sum = std::sync::atomic::AtomicU64::new(0);
                dev.kernel_read(buf.addr(), buf.len(), |_, b| {
                    sum.fetch_add(b.iter().map(|&x| u64::from(x)).sum(), Ordering::Relaxed);
                })?;
                let d = hm.stats().since(&before);
                let want: u64 = buf.iter().map(|&x| u64::from(x)).sum();
                anyhow::ensure!(sum.load(Ordering::Relaxed) == want, "advise {advise}: data");
                if advise {
                    anyhow::ensure!(
                        d.device_faults == 0 && d.pages_to_device == 0,
                        "advised: {} device faults, {} pages moved",
                        d.device_faults,
                        d.pages_to_device
                    );
                } else {
                    anyhow::ensure!(d.device_faults > 0 && d.pages_to_device > 0, "{d:?}");
                }
            }
            Ok(())
        },
    )
}

/// `prefetch` returns a handle at once and migrates in the background; `wait` gives the
/// result. Bad ranges are refused before anything runs, and a context dropped with prefetches
/// queued tells their waiters instead of leaving them waiting.
#[test]
fn prefetch_migrates_in_the_background() -> anyhow::Result<()> {
    common::watchdog("prefetch_migrates_in_the_background", 60, || {
        let hm = Hetmem::builder()
            .sim_device(DeviceKind::Private, 64 << 20)
            .build()?;
        let dev = hm.device(0).expect("one device");
        let mut buf = hm.alloc(16 << 20)?;
        fill(&mut buf, 0x21);
        let p = hm.prefetch(buf.addr(), buf.len(), Target::Device(d0()))?;
        p.wait()?;
        anyhow::ensure!(dev.used_pages() as usize == buf.len() / PAGE_SIZE);
        let states = dev.snapshot(buf.addr(), buf.len())?;
        anyhow::ensure!(states.iter().all(|s| s.location == Location::PrivateLocal));
        let back = hm.prefetch(buf.addr(), buf.len(), Target::System)?;
        back.wait()?;
        anyhow::ensure!(dev.used_pages() == 0);
        check(&buf, 0x21)?;
        anyhow::ensure!(matches!(
            hm.prefetch(buf.addr() + 1, PAGE_SIZE, Target::System),
            Err(hetmem::Error::Invalid(_))
        ));
        anyhow::ensure!(hm.stats().errors == 0);

        // Queued when the context goes: the waiter hears of it.
        let hm2 = Hetmem::builder()
            .sim_device(DeviceKind::Private, 64 << 20)
            .build()?;
        let buf2 = hm2.alloc(64 << 20)?;
        let p2 = hm2.prefetch(buf2.addr(), buf2.len(), Target::Device(d0()))?;
        drop(buf2);
        drop(hm2);
        let _ = p2.wait(); // Ok or Invalid; it must return
        Ok(())
    })
}

/// Access counters: with `AccessedBy` advice a device reads system memory remotely; a block it
/// keeps reading migrates to it once past the threshold, a block it reads once stays. Without
/// counters, nothing moves.
#[test]
fn access_counters_bring_hot_remote_blocks_to_the_device() -> anyhow::Result<()> {
    common::watchdog(
        "access_counters_bring_hot_remote_blocks_to_the_device",
        60,
        || {
            for counters in [true, false] {
                let hm = Hetmem::builder()
                    .sim_device(DeviceKind::Private, 64 << 20)
                    .access_counters(
                        counters
                            .then_some(hetmem::policy::AccessCounterConfig { threshold: 4 * 512 }),
                    )
                    .build()?;
                let dev = hm.device(0).expect("one device");
                let mut buf = hm.alloc(4 << 20)?;
                fill(&mut buf, 0x44);
                hm.advise(
                    buf.addr(),
                    buf.len(),
                    hetmem::Advice::AccessedBy(d0(), true),
                )?;
                let hot = buf.addr();
                let cold = buf.addr() + (2 << 20);
                dev.kernel_read(cold, 2 << 20, |_, _| {})?;
                for _ in 0..6 {
                    dev.kernel_read(hot, 2 << 20, |_, _| {})?;
                }
                let at = |addr| -> anyhow::Result<Location> {
                    Ok(dev.snapshot(addr, PAGE_SIZE)?[0].location)
                };
                anyhow::ensure!(at(cold)? == Location::System, "the cold block moved");
                let want = if counters {
                    Location::PrivateLocal
                } else {
                    Location::System
                };
                anyhow::ensure!(
                    at(hot)? == want,
                    "counters {counters}: hot block at {:?}",
                    at(hot)?
                );
                check(&buf, 0x44)?;
                anyhow::ensure!(hm.stats().errors == 0);
            }
            Ok(())
        },
    )
}

/// Eviction prefers clean blocks among the coldest: a device full with an older block of its
/// own writes (sole copies) and a newer block of a file it only read (clean) makes room by
/// dropping the file's block, which costs no copy, not by copying the older one home.
#[test]
fn eviction_prefers_a_clean_block_among_the_coldest() -> anyhow::Result<()> {
    common::watchdog(
        "eviction_prefers_a_clean_block_among_the_coldest",
        60,
        || {
            let dir =
                std::env::temp_dir().join(format!("hetmem-evict-clean-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("clean");
            std::fs::write(&path, vec![0x5au8; 2 << 20])?;
            let hm = Hetmem::builder()
                .sim_device(DeviceKind::Private, 4 << 20) // two blocks
                .build()?;
            let dev = hm.device(0).expect("one device");
            let buf = hm.alloc(4 << 20)?;
            let file = hm.map_file(&path, 0, 2 << 20, hetmem::FileMode::ReadOnly)?;
            // Oldest: the device writes block 0 of `buf` (its only copy is then the device's).
            dev.kernel_write(buf.addr(), 2 << 20, |_, b| b.fill(0x11))?;
            // Newer: the device reads the file's block (clean: the file has it).
            dev.kernel_read(file.addr(), 2 << 20, |_, _| {})?;
            let before = hm.stats();
            // The device needs a third block.
            dev.kernel_write(buf.addr() + (2 << 20), 2 << 20, |_, b| b.fill(0x22))?;
            let d = hm.stats().since(&before);
            anyhow::ensure!(d.pages_evicted > 0, "nothing was evicted");
            anyhow::ensure!(
                d.pages_to_system == 0,
                "{} pages were copied home: the dirty block was evicted, not the clean one",
                d.pages_to_system
            );
            anyhow::ensure!(
                dev.snapshot(buf.addr(), PAGE_SIZE)?[0].location == Location::PrivateLocal,
                "the dirty block left the device"
            );
            anyhow::ensure!(buf[0] == 0x11 && buf[(2 << 20) + 5] == 0x22, "data");
            anyhow::ensure!(file.as_slice()[7] == 0x5a, "file data");
            drop(file);
            drop(buf);
            std::fs::remove_dir_all(&dir)?;
            Ok(())
        },
    )
}

/// The rest of the advice, at the runtime: `ReadMostly` duplicates pages on read (the device
/// gets a copy, system memory keeps its own, and the CPU reads without a fault back) and a
/// write collapses the copies; `PreferredLocation(System)` keeps the data home while the device
/// reads it remotely.
#[test]
fn read_mostly_duplicates_and_preferred_system_maps_remotely() -> anyhow::Result<()> {
    common::watchdog(
        "read_mostly_duplicates_and_preferred_system_maps_remotely",
        60,
        || {
            let hm = Hetmem::builder()
                .sim_device(DeviceKind::Private, 64 << 20)
                .build()?;
            let dev = hm.device(0).expect("one device");
            let mut buf = hm.alloc(4 << 20)?;
            fill(&mut buf, 0x71);
            let (rm, pref) = (buf.addr(), buf.addr() + (2 << 20));
            hm.advise(rm, 2 << 20, hetmem::Advice::ReadMostly(true))?;
            hm.advise(
                pref,
                2 << 20,
                hetmem::Advice::PreferredLocation(Some(hetmem::Mem::System)),
            )?;
            dev.kernel_read(buf.addr(), buf.len(), |_, _| {})?;
            // Read-mostly: a copy on the device, system memory's kept: the CPU reads it with
            // no copy back.
            anyhow::ensure!(dev.snapshot(rm, PAGE_SIZE)?[0].location == Location::PrivateLocal);
            let before = hm.stats();
            check(&buf[..2 << 20], 0x71)?;
            anyhow::ensure!(
                hm.stats().since(&before).pages_to_system == 0,
                "a copy came back"
            );
            // Preferred in system memory: still there, mapped by the device remotely.
            let s = dev.snapshot(pref, PAGE_SIZE)?[0];
            anyhow::ensure!(
                s.location == Location::System && s.device.is_some(),
                "{s:?}"
            );
            // A CPU write collapses the read-mostly copies: the device's goes.
            buf[5] = 0x99;
            let s = dev.snapshot(rm, PAGE_SIZE)?[0];
            anyhow::ensure!(
                s.location == Location::System && s.device.is_none(),
                "{s:?}"
            );
            anyhow::ensure!(dev.read(rm, PAGE_SIZE)?[5] == 0x99);
            anyhow::ensure!(hm.stats().errors == 0);
            Ok(())
        },
    )
}
