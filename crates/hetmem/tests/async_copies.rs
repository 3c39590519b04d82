//! Copies complete asynchronously: a drive submits a device copy, releases the block's engine
//! lock while it runs, and reports it later (`Runtime::drive`). The backend here holds every
//! copy at `wait` until the test lets it go, as a slow DMA would, so a test can act on the same
//! block while a copy is in flight.

#![allow(unsafe_code)]

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::arena::{Arenas, CHUNK};
use hetmem::{
    BlockPageTable, Chunk, CopyOp, DeviceBackend, DeviceId, DeviceKind, Fence, Hetmem, MapMode,
    OpError, Pte, SimConfig, Target, PAGE_SIZE,
};

/// What the test and the backend share: whether copies are held, and how many were submitted.
#[derive(Debug, Default)]
struct Latch {
    state: Mutex<(bool, u64)>,
    cv: Condvar,
}

impl Latch {
    fn hold(&self, on: bool) {
        self.state.lock().unwrap().0 = on;
        self.cv.notify_all();
    }

    /// Waits until `n` batches were submitted in all.
    fn submitted(&self, n: u64) {
        let s = self.state.lock().unwrap();
        let (s, timeout) = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(30), |s| s.1 < n)
            .unwrap();
        assert!(!timeout.timed_out(), "only {} batches submitted", s.1);
    }
}

/// A block's page table: one entry per page.
#[derive(Debug)]
struct Table(Vec<Pte>);

impl BlockPageTable for Table {
    fn map(&mut self, pages: std::ops::Range<usize>, mode: MapMode, remote: bool) {
        self.0[pages].fill(Pte {
            mode: Some(mode),
            remote,
        });
    }

    fn protect(&mut self, pages: std::ops::Range<usize>) {
        for e in &mut self.0[pages] {
            if e.mode.is_some() {
                e.mode = Some(MapMode::Read);
            }
        }
    }

    fn unmap(&mut self, pages: std::ops::Range<usize>) {
        self.0[pages].fill(Pte::default());
    }

    fn entry(&self, page: usize) -> Pte {
        self.0[page]
    }
}

/// Device memory the host cannot address; a batch's copies are carried out at `wait`, which
/// blocks while the latch holds copies.
#[derive(Debug, Default)]
struct HeldBackend {
    mem: Arenas,
    latch: Latch,
}

impl DeviceBackend for HeldBackend {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Private
    }

    fn demand_faults(&self) -> bool {
        true
    }

    fn page_table(&self) -> Box<dyn BlockPageTable> {
        Box::new(Table(vec![Pte::default(); CHUNK / PAGE_SIZE]))
    }

    fn alloc_chunk(&self) -> std::io::Result<Chunk> {
        self.mem.alloc(0)
    }

    fn free_chunk(&self, chunk: Chunk) {
        self.mem.free(chunk);
    }

    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> std::io::Result<()> {
        self.mem.discard(chunk, offset, len);
        Ok(())
    }

    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        // SAFETY: our caller's contract, passed on.
        let fence = unsafe { self.mem.submit(ops) };
        self.latch.state.lock().unwrap().1 += 1;
        self.latch.cv.notify_all();
        Ok(fence)
    }

    fn wait(&self, fence: Fence) -> Result<(), OpError> {
        {
            let s = self.latch.state.lock().unwrap();
            drop(self.latch.cv.wait_while(s, |s| s.0).unwrap());
        }
        self.mem.complete(fence)
    }
}

fn context(backend: Arc<HeldBackend>) -> Hetmem {
    let config = SimConfig {
        kind: DeviceKind::Private,
        capacity: 64 << 20,
        workers: 1,
    };
    Hetmem::builder()
        .device_with_backend(config, backend)
        .build()
        .expect("context")
}

fn d0() -> Target {
    Target::Device(DeviceId::new(0).unwrap())
}

/// Reads one byte of managed memory on another thread and hands it back.
fn read_on_thread(addr: usize) -> mpsc::Receiver<u8> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the address is inside a live managed buffer the test keeps until the
        // thread has answered (or the test failed and the process ends).
        let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(v);
    });
    rx
}

#[test]
fn a_cpu_fault_on_the_same_block_is_served_while_a_copy_runs() -> anyhow::Result<()> {
    common::watchdog(
        "a_cpu_fault_on_the_same_block_is_served_while_a_copy_runs",
        60,
        || {
            let backend = Arc::new(HeldBackend::default());
            let h = context(backend.clone());
            let buf = h.alloc(CHUNK).unwrap();
            let half = CHUNK / 2;
            // SAFETY: the first half of our buffer, written through its address.
            unsafe { std::ptr::write_bytes(buf.addr() as *mut u8, 0x5a, half) };
            backend.latch.hold(true);
            let (addr, hh) = (buf.addr(), h.clone());
            let migrating = std::thread::spawn(move || hh.migrate(addr, half, d0()));
            backend.latch.submitted(1);
            // The copy of the first half is running. A request on the second half needs the
            // same block's engine: it must not wait for the copy.
            let (tx, rx) = mpsc::channel();
            let (addr, hh) = (buf.addr(), h.clone());
            std::thread::spawn(move || {
                let _ = tx.send(hh.migrate(addr + half, half, Target::System).is_ok());
            });
            let served = rx.recv_timeout(Duration::from_secs(10));
            let still_running = !migrating.is_finished();
            backend.latch.hold(false);
            assert_eq!(
                served,
                Ok(true),
                "a request on the block waited for a copy there: the engine lock was held"
            );
            assert!(still_running, "the migration did not wait for its copy");
            migrating.join().unwrap()?;
            assert_eq!(h.device(0).unwrap().used_pages() as usize, half / PAGE_SIZE);
            // The data went to the device and comes back intact.
            let back = read_on_thread(buf.addr() + half - 1).recv()?;
            assert_eq!(back, 0x5a);
            assert_eq!(h.stats().errors, 0);
            Ok(())
        },
    )
}

#[test]
fn a_request_queued_behind_a_running_copy_gets_its_own_result() -> anyhow::Result<()> {
    common::watchdog(
        "a_request_queued_behind_a_running_copy_gets_its_own_result",
        60,
        || {
            let backend = Arc::new(HeldBackend::default());
            let h = context(backend.clone());
            let buf = h.alloc(CHUNK).unwrap();
            for p in 0..CHUNK / PAGE_SIZE {
                // SAFETY: page `p` of our buffer.
                unsafe { *((buf.addr() + p * PAGE_SIZE) as *mut u8) = p as u8 };
            }
            backend.latch.hold(true);
            let (addr, hh) = (buf.addr(), h.clone());
            let migrating = std::thread::spawn(move || hh.migrate(addr, CHUNK, d0()));
            backend.latch.submitted(1);
            // The CPU writes a page whose copy to the device is running: its fault queues
            // behind the copy, in the engine, and the migrating thread's drive finishes it.
            let at = buf.addr() + 7 * PAGE_SIZE;
            let faults = h.stats().cpu_faults;
            let writer = std::thread::spawn(move || {
                // SAFETY: page 7 of the test's live buffer.
                unsafe { std::ptr::write_volatile(at as *mut u8, 0xee) };
            });
            // A migration of another busy page, from a third thread: also queued.
            let (hh, addr) = (h.clone(), buf.addr());
            let again =
                std::thread::spawn(move || hh.migrate(addr + 9 * PAGE_SIZE, PAGE_SIZE, d0()));
            // Both are on their way: the fault was taken (it then queues in the engine, which
            // the test cannot see; the result is checked either way).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while h.stats().cpu_faults == faults && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            backend.latch.hold(false);
            writer.join().unwrap();
            again.join().unwrap()?;
            migrating.join().unwrap()?;
            for p in 0..CHUNK / PAGE_SIZE {
                let v = read_on_thread(buf.addr() + p * PAGE_SIZE).recv()?;
                let want = if p == 7 { 0xee } else { p as u8 };
                assert_eq!(v, want, "page {p}");
            }
            assert_eq!(h.stats().errors, 0);
            Ok(())
        },
    )
}
