//! A device backend written outside the crate, against the public API only: the proof that
//! `DeviceBackend` is a seam another crate (the CUDA backend) can implement. Its memory is not
//! host-addressable (`Chunk::new`), and its copies complete at `wait`, as copies on a CUDA stream
//! complete at their event. Its page tables are its own (`BlockPageTable`), as a driver's are.

#![allow(unsafe_code)]

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hetmem::{
    BlockPageTable, Chunk, CopyOp, DeviceBackend, DeviceKind, Error, Fence, Hetmem, MapMode,
    OpError, Pte, SimConfig, Target, PAGES_PER_BLOCK, PAGE_SIZE,
};

use common::arena::{Arenas, CHUNK};

/// What a backend's page tables were told, shared with the test.
#[derive(Debug, Default)]
struct Tables {
    /// Every table made, in order: its entries, as the backend keeps them.
    made: Mutex<Vec<Arc<Mutex<Vec<Pte>>>>>,
    maps: AtomicU64,
    unmaps: AtomicU64,
    protects: AtomicU64,
}

impl Tables {
    fn table(self: &Arc<Self>) -> Box<dyn BlockPageTable> {
        let entries = Arc::new(Mutex::new(vec![Pte::default(); PAGES_PER_BLOCK]));
        self.made.lock().unwrap().push(entries.clone());
        Box::new(VecTable {
            entries,
            tables: self.clone(),
        })
    }

    /// The entries of the `i`th table made.
    fn entries(&self, i: usize) -> Vec<Pte> {
        self.made.lock().unwrap()[i].lock().unwrap().clone()
    }
}

/// A page table as a vector of typed entries.
#[derive(Debug)]
struct VecTable {
    entries: Arc<Mutex<Vec<Pte>>>,
    tables: Arc<Tables>,
}

impl BlockPageTable for VecTable {
    fn map(&mut self, pages: Range<usize>, mode: MapMode, remote: bool) {
        self.tables.maps.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().unwrap()[pages].fill(Pte {
            mode: Some(mode),
            remote,
        });
    }

    fn protect(&mut self, pages: Range<usize>) {
        self.tables.protects.fetch_add(1, Ordering::Relaxed);
        for e in &mut self.entries.lock().unwrap()[pages] {
            if e.mode.is_some() {
                e.mode = Some(MapMode::Read);
            }
        }
    }

    fn unmap(&mut self, pages: Range<usize>) {
        self.tables.unmaps.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().unwrap()[pages].fill(Pte::default());
    }

    fn entry(&self, page: usize) -> Pte {
        self.entries.lock().unwrap()[page]
    }
}

/// Device memory as boxed arenas, one per chunk, known by handle; the host never gets a
/// pointer into them.
#[derive(Debug, Default)]
struct ArenaBackend {
    mem: Arenas,
    /// Fail this many upcoming batches (a DMA error).
    fail: AtomicU32,
    tables: Arc<Tables>,
    /// At most this many chunks at once (0: no limit), as a CUDA backend's cap counts them.
    max_chunks: std::sync::atomic::AtomicUsize,
    /// Register backing views (`DeviceBackend::register_host`), as CUDA's pinned memory.
    register: std::sync::atomic::AtomicBool,
    /// The views registered, and the host side of every copy, to check staging.
    registered: std::sync::Mutex<Vec<(usize, usize)>>,
    host_sides: std::sync::Mutex<Vec<usize>>,
    /// Copies done when `copy` returns (`is_done`), as the simulated backend's are, so the
    /// runtime runs them under the block's lock.
    synchronous: std::sync::atomic::AtomicBool,
    /// Held: the next copy says it started on the first channel, then waits for the second.
    hold: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl DeviceBackend for ArenaBackend {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Private
    }

    fn demand_faults(&self) -> bool {
        false
    }

    fn alloc_chunk(&self) -> std::io::Result<Chunk> {
        self.mem.alloc(self.max_chunks.load(Ordering::Relaxed))
    }

    fn free_chunk(&self, chunk: Chunk) {
        self.mem.free(chunk);
    }

    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> std::io::Result<()> {
        self.mem.discard(chunk, offset, len);
        Ok(())
    }

    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        if self
            .fail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(OpError::Device);
        }
        let mut sides = self.host_sides.lock().unwrap();
        for op in ops {
            for e in [op.src, op.dst] {
                if let hetmem::Endpoint::Host(p) = e {
                    sides.push(p as usize);
                }
            }
        }
        drop(sides);
        // SAFETY: our caller's contract, passed on.
        let fence = unsafe { self.mem.submit(ops) };
        if !self.synchronous.load(Ordering::Acquire) {
            return Ok(fence);
        }
        if let Some((started, release)) = self.hold.lock().unwrap().take() {
            started.send(()).unwrap();
            release.recv().unwrap();
        }
        self.mem.complete(fence)?;
        Ok(fence)
    }

    fn is_done(&self, _fence: Fence) -> bool {
        self.synchronous.load(Ordering::Acquire)
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> std::io::Result<bool> {
        let on = self.register.load(Ordering::Relaxed);
        if on {
            self.registered.lock().unwrap().push((ptr as usize, len));
        }
        Ok(on)
    }

    fn wait(&self, fence: Fence) -> Result<(), OpError> {
        if self.synchronous.load(Ordering::Acquire) {
            // Completed in `copy`.
            return Ok(());
        }
        self.mem.complete(fence)
    }

    fn page_table(&self) -> Box<dyn BlockPageTable> {
        self.tables.table()
    }
}

fn context(backend: Arc<ArenaBackend>, capacity: usize) -> Hetmem {
    let config = SimConfig {
        kind: DeviceKind::Private,
        capacity,
        workers: 1,
    };
    Hetmem::builder()
        .device_with_backend(config, backend)
        .build()
        .expect("context")
}

fn fill(buf: &mut [u8], seed: u8) {
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        page.fill(seed.wrapping_add(i as u8));
    }
}

fn check(buf: &[u8], seed: u8) {
    for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
        let want = seed.wrapping_add(i as u8);
        assert!(
            page.iter().all(|&b| b == want),
            "page {i}: want {want:#x}, found {:#x}",
            page[0]
        );
    }
}

#[test]
fn migrates_both_ways_through_an_outside_backend() -> anyhow::Result<()> {
    common::watchdog("migrates_both_ways_through_an_outside_backend", 60, || {
        let backend = Arc::new(ArenaBackend::default());
        let h = context(backend.clone(), 64 << 20);
        let mut buf = h.alloc(8 << 20).unwrap();
        fill(&mut buf, 0x10);
        h.migrate(
            buf.addr(),
            buf.len(),
            Target::Device(hetmem::DeviceId::new(0).unwrap()),
        )
        .unwrap();
        let dev = h.device(0).unwrap();
        assert_eq!(dev.used_pages() as usize, buf.len() / PAGE_SIZE);
        assert!(backend.mem.copies.load(Ordering::Relaxed) > 0);
        let in_arenas: usize = backend.mem.chunk_count();
        assert_eq!(in_arenas, buf.len() / CHUNK, "one chunk per 2 MiB block");
        // The CPU's reads fault the data home through the backend's copies.
        check(&buf, 0x10);
        assert!(h.stats().pages_to_system >= (buf.len() / PAGE_SIZE) as u64);
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

#[test]
fn evicts_through_an_outside_backend() -> anyhow::Result<()> {
    common::watchdog("evicts_through_an_outside_backend", 60, || {
        let backend = Arc::new(ArenaBackend::default());
        // Room for one block: every migration of another block evicts.
        let h = context(backend.clone(), CHUNK);
        let mut buf = h.alloc(8 << 20).unwrap();
        fill(&mut buf, 0x40);
        let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
        for b in 0..buf.len() / CHUNK {
            h.migrate(buf.addr() + b * CHUNK, CHUNK, d0).unwrap();
        }
        assert!(h.stats().pages_evicted >= (3 * CHUNK / PAGE_SIZE) as u64);
        check(&buf, 0x40);
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

/// A backend whose copies are done when `copy` returns is driven with the block's lock held
/// through them. A request that needs the frames such a drive holds must wait for it and evict
/// its block, not find nothing to evict and call the device full: that was the ENOMEM that
/// `stress.rs::concurrent_eviction_never_reports_enomem` met about one run in four under load.
#[test]
fn eviction_waits_for_a_drive_that_holds_the_frames() -> anyhow::Result<()> {
    common::watchdog(
        "eviction_waits_for_a_drive_that_holds_the_frames",
        60,
        || {
            let backend = Arc::new(ArenaBackend::default());
            backend.synchronous.store(true, Ordering::Release);
            let (started_tx, started) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel();
            *backend.hold.lock().unwrap() = Some((started_tx, release_rx));
            // Room for one block.
            let h = context(backend.clone(), CHUNK);
            let mut buf = h.alloc(2 * CHUNK).unwrap();
            fill(&mut buf, 0x30);
            let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
            let (first, second) = (buf.addr(), buf.addr() + CHUNK);
            let h = &h;
            std::thread::scope(|s| {
                let a = s.spawn(move || h.migrate(first, CHUNK, d0));
                // The first block's copy runs, holding the device's only chunk, under its lock.
                started.recv().unwrap();
                let (done_tx, done) = std::sync::mpsc::channel();
                let b = s.spawn(move || {
                    let r = h.migrate(second, CHUNK, d0);
                    done_tx.send(()).unwrap();
                    r
                });
                // The second request must wait for that copy. Before the fix it found nothing to
                // evict and gave up after 200 ms with ENOMEM; a second is far past that.
                let gave_up = done.recv_timeout(std::time::Duration::from_secs(1)).is_ok();
                release.send(()).unwrap();
                let ra = a.join().unwrap();
                assert!(ra.is_ok(), "first: {ra:?}");
                let r = b.join().unwrap();
                assert!(
                    !gave_up && r.is_ok(),
                    "the second migration returned while the first held the frames: {r:?}"
                );
            });
            assert!(h.stats().pages_evicted >= (CHUNK / PAGE_SIZE) as u64);
            check(&buf, 0x30);
            assert_eq!(h.stats().errors, 0);
            Ok(())
        },
    )
}

#[test]
fn a_failed_copy_keeps_the_data_where_it_was() -> anyhow::Result<()> {
    common::watchdog("a_failed_copy_keeps_the_data_where_it_was", 60, || {
        let backend = Arc::new(ArenaBackend::default());
        let h = context(backend.clone(), 64 << 20);
        let mut buf = h.alloc(CHUNK).unwrap();
        fill(&mut buf, 0x70);
        backend.fail.store(1, Ordering::Release);
        let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
        assert!(h.migrate(buf.addr(), buf.len(), d0).is_err());
        check(&buf, 0x70);
        // Then it works, and the data survives the round trip.
        h.migrate(buf.addr(), buf.len(), d0).unwrap();
        check(&buf, 0x70);
        Ok(())
    })
}

#[test]
fn commands_on_memory_the_host_cannot_address_go_through_its_copies() -> anyhow::Result<()> {
    common::watchdog(
        "commands_on_memory_the_host_cannot_address_go_through_its_copies",
        60,
        || {
            let h = context(Arc::new(ArenaBackend::default()), 64 << 20);
            let mut buf = h.alloc(CHUNK).unwrap();
            fill(&mut buf, 0x22);
            let dev = h.device(0).unwrap();
            // `read` and `write` stage through the backend's copies (as CUDA's device memory
            // needs): the data comes from the device's memory, and a write lands there.
            let mut want = vec![0u8; CHUNK];
            fill(&mut want, 0x22);
            dev.migrate_to_device(buf.addr(), CHUNK)?;
            let snap = dev.snapshot(buf.addr(), PAGE_SIZE)?;
            assert_eq!(snap[0].location, hetmem::Location::PrivateLocal);
            let got = dev.read(buf.addr(), 2 * PAGE_SIZE)?;
            assert_eq!(&got[..], &want[..2 * PAGE_SIZE]);
            dev.write(buf.addr() + PAGE_SIZE, &vec![0x99; PAGE_SIZE])?;
            assert_eq!(
                dev.read(buf.addr() + PAGE_SIZE, PAGE_SIZE)?,
                vec![0x99; PAGE_SIZE]
            );
            dev.exclusive(buf.addr(), PAGE_SIZE)?;
            assert!(dev.check_exclusive(buf.addr(), PAGE_SIZE)?);
            // The CPU faults the device's copy back, the write included.
            assert!(buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0x99));
            assert_eq!(&buf[..PAGE_SIZE], &want[..PAGE_SIZE]);
            assert_eq!(&buf[2 * PAGE_SIZE..], &want[2 * PAGE_SIZE..]);
            // A host closure cannot run over such memory (launches with declared ranges do):
            // a typed error, and the data is intact.
            assert!(matches!(
                dev.kernel_read(buf.addr(), PAGE_SIZE, |_, _| {}),
                Err(Error::Invalid(_))
            ));
            assert!(buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0x99));
            assert_eq!(h.stats().errors, 0);
            Ok(())
        },
    )
}

#[test]
fn a_config_whose_kind_differs_from_the_backend_is_refused() {
    let config = SimConfig {
        kind: DeviceKind::Coherent,
        capacity: CHUNK,
        workers: 1,
    };
    let r = Hetmem::builder()
        .device_with_backend(config, Arc::new(ArenaBackend::default()))
        .build();
    assert!(matches!(r, Err(Error::Invalid(_))));
}

fn file_context(backend: Arc<ArenaBackend>, capacity: usize) -> Hetmem {
    context(backend, capacity)
}

#[test]
fn file_pages_reach_memory_the_host_cannot_address_through_the_backend() -> anyhow::Result<()> {
    common::watchdog("file_fill_through_backend", 60, || {
        let dir = common::fs::TempDir::new("outside_backend_file_fill")?;
        let path = dir.path("data");
        let mut content = vec![0u8; CHUNK];
        fill(&mut content, 0x5a);
        std::fs::write(&path, &content)?;
        let backend = Arc::new(ArenaBackend::default());
        let h = file_context(backend.clone(), 64 << 20);
        let m = h.map_file(&path, 0, CHUNK, hetmem::FileMode::ReadOnly)?;
        let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
        // Untouched file pages go to the device straight from the file (no CPU mapping).
        h.migrate(m.addr(), CHUNK, d0)?;
        assert_eq!(h.stats().pages_from_file, (CHUNK / PAGE_SIZE) as u64);
        assert_eq!(
            h.device(0).unwrap().used_pages() as usize,
            CHUNK / PAGE_SIZE
        );
        let arena_has_it = backend.mem.any_chunk(|c| c == &content[..]);
        assert!(arena_has_it, "the device's arena holds the file's data");
        check(m.as_slice(), 0x5a);
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

#[test]
fn dirty_pages_on_such_memory_are_written_back_through_the_backend() -> anyhow::Result<()> {
    common::watchdog("writeback_through_backend", 60, || {
        let dir = common::fs::TempDir::new("outside_backend_writeback")?;
        let path = dir.path("data");
        std::fs::write(&path, vec![0u8; CHUNK])?;
        let backend = Arc::new(ArenaBackend::default());
        let h = file_context(backend.clone(), 64 << 20);
        let mut m = h.map_file(&path, 0, CHUNK, hetmem::FileMode::Shared)?;
        fill(m.as_mut_slice().expect("shared mapping"), 0x21);
        let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
        h.migrate(m.addr(), CHUNK, d0)?;
        // The dirty pages live only in the arena now; flush writes them from there.
        let copies = backend.mem.copies.load(Ordering::Relaxed);
        m.flush()?;
        assert!(
            backend.mem.copies.load(Ordering::Relaxed) > copies,
            "read out by the backend"
        );
        let on_disk = std::fs::read(&path)?;
        check(&on_disk, 0x21);
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

#[test]
fn a_fork_child_gets_data_that_lived_only_in_such_memory() -> anyhow::Result<()> {
    common::watchdog("fork_with_unaddressable_memory", 60, || {
        let backend = Arc::new(ArenaBackend::default());
        let h = context(backend, 64 << 20);
        let mut buf = h.alloc(2 * CHUNK)?;
        fill(&mut buf, 0x66);
        let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
        h.migrate(buf.addr(), buf.len(), d0)?;
        // The data lives only in the arena now; the child's private copy must still hold it.
        let (addr, len) = (buf.addr(), buf.len());
        let pid = common::process::fork_child(|| {
            // SAFETY: the child's private copy of the buffer, mapped at the same address.
            let mine = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
            let ok = mine.chunks(PAGE_SIZE).enumerate().all(|(i, p)| {
                let want = 0x66u8.wrapping_add(i as u8);
                p.iter().all(|&b| b == want)
            });
            if ok {
                0
            } else {
                1
            }
        });
        let status = common::wait_within(pid, std::time::Duration::from_secs(30))
            .ok_or_else(|| anyhow::anyhow!("the child hung"))?;
        assert_eq!(
            common::process::exit_code(status),
            0,
            "the child read other data"
        );
        check(&buf, 0x66);
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

/// The simulated device's memory with page tables of its own, declaring whether the device
/// takes page faults. Without them (a GPU without kernel HMM), launches must find their range
/// resident before they start.
#[derive(Debug)]
struct OnSim {
    sim: hetmem::SimBackend,
    demand_faults: bool,
    tables: Arc<Tables>,
}

impl OnSim {
    fn new(demand_faults: bool) -> Self {
        Self {
            sim: hetmem::SimBackend::new(DeviceKind::Private),
            demand_faults,
            tables: Arc::default(),
        }
    }
}

impl DeviceBackend for OnSim {
    fn kind(&self) -> DeviceKind {
        self.sim.kind()
    }
    fn demand_faults(&self) -> bool {
        self.demand_faults
    }
    fn alloc_chunk(&self) -> std::io::Result<Chunk> {
        self.sim.alloc_chunk()
    }
    fn free_chunk(&self, chunk: Chunk) {
        self.sim.free_chunk(chunk)
    }
    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> std::io::Result<()> {
        self.sim.discard(chunk, offset, len)
    }
    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.sim.copy(ops) }
    }
    fn wait(&self, fence: Fence) -> Result<(), OpError> {
        self.sim.wait(fence)
    }
    fn page_table(&self) -> Box<dyn BlockPageTable> {
        self.tables.table()
    }
}

/// Pages the device held when the kernel's first run started, for a kernel over 4 blocks.
fn resident_at_launch(backend: Arc<dyn DeviceBackend>, capacity: usize) -> hetmem::Result<u32> {
    let config = SimConfig {
        kind: DeviceKind::Private,
        capacity,
        workers: 1,
    };
    let h = Hetmem::builder()
        .device_with_backend(config, backend)
        .build()?;
    let buf = h.alloc(4 * CHUNK)?;
    let dev = h.device(0).expect("device");
    let first = Mutex::new(None);
    dev.kernel_read(buf.addr(), buf.len(), |_, _| {
        first.lock().unwrap().get_or_insert(dev.used_pages());
    })?;
    Ok(first.into_inner().unwrap().expect("the kernel ran"))
}

#[test]
fn a_device_without_page_faults_launches_over_resident_memory_only() -> anyhow::Result<()> {
    common::watchdog("no_demand_faults", 60, || {
        let all = (4 * CHUNK / PAGE_SIZE) as u32;
        let sim = Arc::new(hetmem::SimBackend::new(DeviceKind::Private));
        // A device that faults on demand starts with what its first run needs.
        assert!(resident_at_launch(sim, 64 << 20)? < all);
        let no_faults = || Arc::new(OnSim::new(false));
        // One that cannot fault has the whole range before any run starts...
        assert_eq!(resident_at_launch(no_faults(), 64 << 20)?, all);
        // ...and refuses a range larger than itself, before anything runs.
        assert!(matches!(
            resident_at_launch(no_faults(), 2 * CHUNK),
            Err(Error::NoMem)
        ));
        Ok(())
    })
}

#[test]
fn the_device_page_table_is_the_backends() -> anyhow::Result<()> {
    common::watchdog("the_device_page_table_is_the_backends", 60, || {
        let backend = Arc::new(OnSim::new(true));
        let tables = backend.tables.clone();
        let config = SimConfig {
            kind: DeviceKind::Private,
            capacity: 64 << 20,
            workers: 1,
        };
        let h = Hetmem::builder()
            .device_with_backend(config, backend)
            .build()?;
        let mut buf = h.alloc(2 * CHUNK)?;
        fill(&mut buf, 0x31);
        assert!(
            tables.made.lock().unwrap().is_empty(),
            "no table before the device maps a page"
        );
        // A device read maps its pages: the runtime tells the backend's table, and finds the
        // mapping there (the read would not converge otherwise).
        let dev = h.device(0).unwrap();
        let pages = 16;
        check(&dev.read(buf.addr(), pages * PAGE_SIZE)?, 0x31);
        assert_eq!(
            tables.made.lock().unwrap().len(),
            1,
            "one table: one block mapped"
        );
        assert!(tables.maps.load(Ordering::Relaxed) > 0);
        let entries = tables.entries(0);
        assert!(
            entries[..pages].iter().all(|e| e.mode.is_some()),
            "{entries:?}"
        );
        let snap = dev.snapshot(buf.addr(), pages * PAGE_SIZE)?;
        assert!(snap.iter().zip(&entries).all(|(s, e)| s.device == e.mode));
        // A CPU write takes the device's mappings of those pages away, through the table.
        buf[..pages * PAGE_SIZE].fill(0x77);
        assert!(
            tables.unmaps.load(Ordering::Relaxed) + tables.protects.load(Ordering::Relaxed) > 0
        );
        let entries = tables.entries(0);
        assert!(
            entries[..pages].iter().all(|e| e.mode.is_none()),
            "{entries:?}"
        );
        // And the device maps them again, and reads what the CPU wrote.
        assert!(dev
            .read(buf.addr(), pages * PAGE_SIZE)?
            .iter()
            .all(|&b| b == 0x77));
        assert!(tables.entries(0)[..pages].iter().all(|e| e.mode.is_some()));
        assert_eq!(h.stats().errors, 0);
        Ok(())
    })
}

/// A backend whose chunks run out before the page budget does (blocks partly on the device
/// each hold a whole chunk, as with CUDA's 2 MiB chunks under a cap): the request that finds no
/// chunk is told the device is full and evicts, instead of failing with a device error.
#[test]
fn a_backend_out_of_chunks_is_a_full_device_and_evicts() -> anyhow::Result<()> {
    common::watchdog(
        "a_backend_out_of_chunks_is_a_full_device_and_evicts",
        60,
        || {
            let backend = Arc::new(ArenaBackend::default());
            backend.max_chunks.store(2, Ordering::Relaxed);
            // 4 MiB of pages, 2 chunks: half-blocks fit the budget, not the chunks.
            let h = context(backend.clone(), 2 * CHUNK);
            let mut buf = h.alloc(4 * CHUNK)?;
            fill(&mut buf, 0x30);
            let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
            for b in 0..4 {
                h.migrate(buf.addr() + b * CHUNK, CHUNK / 2, d0)?;
            }
            assert!(backend.mem.chunk_count() <= 2);
            assert!(h.stats().pages_evicted > 0, "nothing was evicted");
            check(&buf, 0x30);
            assert_eq!(h.stats().errors, 0);
            Ok(())
        },
    )
}

/// File pages go to and from memory the host cannot address: through a host staging buffer,
/// or, when the backend registered the region's backing view (pinned for DMA, as CUDA's
/// `register_host_memory`), through the run's own backing pages, which run at the link's speed.
/// Both ways the data is right; with registration every host side of those copies lies in the
/// registered view, and without it none does.
#[test]
fn file_transfers_stage_in_registered_backing_pages() -> anyhow::Result<()> {
    common::watchdog(
        "file_transfers_stage_in_registered_backing_pages",
        60,
        || {
            for register in [false, true] {
                let dir = common::fs::TempDir::new("outside_backend_registered_staging")?;
                let path = dir.path("data");
                let mut content = vec![0u8; CHUNK];
                fill(&mut content, 0x3c);
                std::fs::write(&path, &content)?;
                let backend = Arc::new(ArenaBackend::default());
                backend.register.store(register, Ordering::Relaxed);
                let h = file_context(backend.clone(), 64 << 20);
                let mut m = h.map_file(&path, 0, CHUNK, hetmem::FileMode::Shared)?;
                let d0 = Target::Device(hetmem::DeviceId::new(0).unwrap());
                // A CPU write to the first page; the rest goes from the file to the device;
                // the dirty page goes there too and is written back from there.
                m.as_mut_slice().expect("shared")[..PAGE_SIZE].fill(0x77);
                h.migrate(m.addr(), CHUNK, d0)?;
                m.flush()?;
                let on_disk = std::fs::read(&path)?;
                assert!(on_disk[..PAGE_SIZE].iter().all(|&b| b == 0x77));
                assert_eq!(&on_disk[PAGE_SIZE..], &content[PAGE_SIZE..]);
                let views = backend.registered.lock().unwrap().clone();
                let sides = backend.host_sides.lock().unwrap().clone();
                assert!(!sides.is_empty());
                let inside = |p: usize| views.iter().any(|&(b, l)| p >= b && p < b + l);
                if register {
                    assert_eq!(views.len(), 1);
                    assert!(
                        sides.iter().all(|&p| inside(p)),
                        "a copy staged outside the view"
                    );
                } else {
                    assert!(views.is_empty());
                }
                assert_eq!(h.stats().errors, 0);
            }
            Ok(())
        },
    )
}
