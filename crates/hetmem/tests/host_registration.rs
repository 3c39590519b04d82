//! Backing views registered with a device (`DeviceBackend::register_host`, as the CUDA backend
//! does with `cuMemHostRegister` so copies run at the link's speed): the runtime registers each
//! region's view when the region is made, never punches a hole in it afterwards (a punched page
//! would leave the memfd while the registration pins it), zeroes in place instead, and
//! unregisters when the region goes. A registration that fails fails the allocation, leaving
//! nothing behind.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use hetmem::{
    BlockPageTable, Chunk, CopyOp, DeviceBackend, DeviceKind, Fence, Hetmem, OpError, SimBackend,
    SimConfig, Target, PAGE_SIZE,
};

const BLOCK: usize = 2 << 20;

/// The tests look at the process's one hetmem memfd: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The simulated device, registering backing views when `register` says so, and recording
/// what it was told.
#[derive(Debug)]
struct Registering {
    sim: SimBackend,
    register: Result<bool, i32>,
    registered: Mutex<Vec<(usize, usize)>>,
    unregistered: Mutex<Vec<usize>>,
}

impl DeviceBackend for Registering {
    fn kind(&self) -> DeviceKind {
        self.sim.kind()
    }
    fn demand_faults(&self) -> bool {
        self.sim.demand_faults()
    }
    fn alloc_chunk(&self) -> io::Result<Chunk> {
        self.sim.alloc_chunk()
    }
    fn free_chunk(&self, chunk: Chunk) {
        self.sim.free_chunk(chunk);
    }
    fn discard(&self, chunk: &Chunk, offset: usize, len: usize) -> io::Result<()> {
        self.sim.discard(chunk, offset, len)
    }
    unsafe fn copy(&self, ops: &[CopyOp<'_>]) -> Result<Fence, OpError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.sim.copy(ops) }
    }
    fn wait(&self, fence: Fence) -> Result<(), OpError> {
        self.sim.wait(fence)
    }
    fn is_done(&self, fence: Fence) -> bool {
        self.sim.is_done(fence)
    }
    fn page_table(&self) -> Box<dyn BlockPageTable> {
        self.sim.page_table()
    }
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> io::Result<bool> {
        match self.register {
            Ok(yes) => {
                if yes {
                    self.registered.lock().unwrap().push((ptr as usize, len));
                }
                Ok(yes)
            }
            Err(errno) => Err(io::Error::from_raw_os_error(errno)),
        }
    }
    fn unregister_host(&self, ptr: *mut u8) {
        self.unregistered.lock().unwrap().push(ptr as usize);
    }
}

fn context(register: Result<bool, i32>) -> anyhow::Result<(Hetmem, Arc<Registering>)> {
    let backend = Arc::new(Registering {
        sim: SimBackend::new(DeviceKind::Private),
        register,
        registered: Mutex::default(),
        unregistered: Mutex::default(),
    });
    let config = SimConfig {
        kind: DeviceKind::Private,
        capacity: 16 << 20,
        workers: 1,
    };
    let h = Hetmem::builder()
        .device_with_backend(config, backend.clone())
        .build()?;
    Ok((h, backend))
}

/// The first hole of the one hetmem memfd this process has, by `SEEK_HOLE` (its size when it
/// has none).
fn first_hole() -> anyhow::Result<usize> {
    let mut found = None;
    for e in std::fs::read_dir("/proc/self/fd")? {
        let path = e?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:hetmem-") {
            anyhow::ensure!(found.is_none(), "more than one hetmem memfd");
            found = Some(std::fs::File::open(&path)?);
        }
    }
    let f = found.ok_or_else(|| anyhow::anyhow!("no hetmem memfd"))?;
    // SAFETY: lseek on a descriptor we own; it moves only that descriptor's offset.
    let at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    anyhow::ensure!(at >= 0, "SEEK_HOLE: {}", io::Error::last_os_error());
    Ok(at as usize)
}

/// Writes a pattern, moves it to the device and back, discards the first block; returns the
/// memfd's first hole afterwards and checks what the CPU reads.
fn exercise(h: &Hetmem, len: usize) -> anyhow::Result<usize> {
    let mut buf = h.alloc(len)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i / PAGE_SIZE) as u8 | 1;
    }
    let dev = Target::Device(hetmem::DeviceId::new(0).expect("device 0"));
    h.migrate(buf.addr(), len, dev)?;
    h.migrate(buf.addr(), len, Target::System)?;
    h.discard(buf.addr(), BLOCK)?;
    let hole = first_hole()?;
    // Discarded memory reads zero, the rest its data, either way.
    assert!(
        buf[..BLOCK].iter().all(|&b| b == 0),
        "a discarded page kept data"
    );
    for (i, &b) in buf[BLOCK..].iter().enumerate() {
        assert_eq!(b, ((BLOCK + i) / PAGE_SIZE) as u8 | 1, "byte {}", BLOCK + i);
    }
    Ok(hole)
}

#[test]
fn a_registered_region_keeps_its_pages_and_is_unregistered_when_it_goes() -> anyhow::Result<()> {
    let _one = serial();
    let len = 4 * BLOCK;
    let (h, backend) = context(Ok(true))?;
    let hole = exercise(&h, len)?;
    assert_eq!(hole, len, "a hole was punched in a registered region");
    let registered = backend.registered.lock().unwrap().clone();
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].1, len);
    // `exercise` dropped its buffer: the view was unregistered, once.
    assert_eq!(*backend.unregistered.lock().unwrap(), vec![registered[0].0]);
    assert_eq!(h.stats().errors, 0);
    Ok(())
}

#[test]
fn an_unregistered_region_punches_what_it_drops() -> anyhow::Result<()> {
    // The control: without registration the discard leaves a hole, so the check above can
    // fail.
    let _one = serial();
    let (h, backend) = context(Ok(false))?;
    assert!(exercise(&h, 4 * BLOCK)? < BLOCK);
    assert!(backend.unregistered.lock().unwrap().is_empty());
    Ok(())
}

#[test]
fn a_failed_registration_fails_the_allocation_and_leaves_nothing() -> anyhow::Result<()> {
    let _one = serial();
    let (h, _backend) = context(Err(libc::ENOMEM))?;
    match h.alloc(BLOCK) {
        Err(e) => assert_eq!(e.errno(), libc::ENOMEM, "{e}"),
        Ok(_) => anyhow::bail!("the allocation succeeded without its registration"),
    }
    assert!(first_hole().is_err(), "the region's memfd is still open");
    Ok(())
}
