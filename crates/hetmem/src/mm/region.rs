//! A managed region: a memfd holding system memory, its views, and per 2 MiB block the
//! protocol engine and each device's page table (its backend's) and memory.
//!
//! System memory is the memfd. The runtime reaches it through `backing`, a shared view nobody
//! else uses; the CPU reaches it through one or more *views* registered with userfaultfd
//! (MISSING | MINOR | WP). Blocks are keyed by file offset, not address, so an `mremap` only
//! moves a view: data, device copies and device page tables stay put.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hetmem_proto::{
    Block2M, Layout, Mem, PageMask, PageRun, BLOCK_BYTES, BLOCK_WORDS, PAGES_PER_BLOCK, PAGE_SIZE,
};

use crate::device::{BlockPageTable, DeviceBackend, Pte};
use crate::error::{Error, Result};
use crate::mm::file_io::FileBacking;
use crate::mm::launch::LaunchPins;
use crate::policy::{PolicyBlock, PolicyRegion};
use crate::sys::mem::{self, Mapping};

/// One device's view of one block: its page table and, for private devices, its memory.
#[derive(Debug)]
pub(crate) struct DevBlock {
    /// The device's page table for this block, its backend's (`DeviceBackend::page_table`),
    /// made by the executor the first time the device maps a page of the block. Absent, every
    /// entry is unmapped.
    pub pt: Option<Box<dyn BlockPageTable>>,
    /// 2 MiB of device memory for this block, mapped lazily, as CUDA maps device memory at
    /// 2 MiB granularity. Only frames the protocol bound hold memory: free frames are
    /// MADV_DONTNEED'd, so they read zero when reused.
    pub chunk: Option<crate::device::Chunk>,
    /// Launches using the device's entries for this block: changing those entries waits for
    /// them (`mm/launch.rs`). Added to under the read lock, checked under the write lock.
    pub launches: LaunchPins,
}

impl DevBlock {
    fn new() -> Self {
        Self {
            pt: None,
            chunk: None,
            launches: LaunchPins::default(),
        }
    }

    /// The device's entry for `page`.
    pub fn entry(&self, page: usize) -> Pte {
        self.pt
            .as_ref()
            .map_or_else(Pte::default, |t| t.entry(page))
    }

    /// Whether every entry of `pages` passes `f`.
    pub fn all(&self, mut pages: Range<usize>, f: impl Fn(Pte) -> bool) -> bool {
        pages.all(|p| f(self.entry(p)))
    }
}

/// One 2 MiB block.
#[derive(Debug)]
pub(crate) struct BlockSlot {
    /// The protocol state. Lock order: `engine`, then a `dev` lock, then `Region::views`.
    pub engine: Mutex<Block2M>,
    /// Per device. Kernels hold the read lock while they touch the block's memory; every
    /// device page-table change takes the write lock, so it waits for them (TLB shootdown).
    pub dev: Box<[RwLock<DevBlock>]>,
    /// Per device: frames the block holds, mirrored after every drive so eviction can pick a
    /// victim without locking every block.
    pub held: Box<[AtomicU32]>,
    /// Per device: pages evicting the block would have to copy home (its sole copies, less
    /// clean file pages), mirrored with `held`, so eviction can prefer clean blocks.
    pub evict_copies: Box<[AtomicU32]>,
    /// Pages adopted by `register` whose first fill must keep the data they came with.
    pub adopted: Mutex<PageMask<BLOCK_WORDS>>,
    /// Pages that may be in the memfd's page cache. The others are holes: a CPU map fills
    /// them with one UFFDIO_ZEROPAGE, and a zero fill needs no hole punch. Changed only under
    /// the engine lock.
    pub populated: Mutex<PageMask<BLOCK_WORDS>>,
    /// The placement policy's state for the block; the memory manager never reads it.
    pub policy: PolicyBlock,
}

/// A CPU view: `[va, va + len)` maps the memfd at `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub va: usize,
    pub off: usize,
    pub len: usize,
}

/// A managed region.
#[derive(Debug)]
pub(crate) struct Region {
    /// Its number in this context, for the trace (`crate::trace`).
    pub id: u64,
    pub memfd: OwnedFd,
    /// The memfd's inode, to recognise its mappings in /proc/self/maps.
    pub inode: u64,
    /// The runtime's own view of the memfd (DMA view): never registered, never handed out.
    pub backing: Mapping,
    /// Managed bytes (a multiple of the page size).
    pub len: usize,
    /// The file, for a file mapping.
    pub file: Option<FileBacking>,
    pub blocks: Box<[BlockSlot]>,
    /// The placement policy's state for the region; the memory manager never reads it.
    pub policy: PolicyRegion,
    /// The CPU views. Normally one; `mremap` and partial `munmap` split or move them.
    pub views: RwLock<Vec<View>>,
    /// Pages pinned for DMA by others (`Hetmem::pin`, `mm/pin.rs`).
    pub pins: PinTable,
    /// Blocks a Flush may have work in (`Block2M::may_need_flush`), so a flush of a large,
    /// mostly clean file mapping visits only those (`mm/writeback.rs`).
    pub dirty: DirtyBlocks,
    /// Backends that registered the backing view with their device
    /// (`DeviceBackend::register_host`): its pages stay for the region's life, never punched,
    /// and are unregistered when the region goes, before the view is unmapped.
    pub registered: Vec<Arc<dyn DeviceBackend>>,
    /// The device address range a backend reserved for the region
    /// (`DeviceBackend::reserve_address`): the CPU view is mapped at the same address, and
    /// each block's chunk on that device at the block's address. Freed with the region.
    pub same_address: Option<(usize, Arc<dyn DeviceBackend>)>,
}

impl Drop for Region {
    fn drop(&mut self) {
        // The last reference: no copy can use the backing view any more, and it is unmapped
        // right after this (a field of ours).
        for b in &self.registered {
            b.unregister_host(self.backing.as_ptr());
        }
        // `free_region` left a placeholder over the CPU view (freeing the reservation unmaps
        // it) and unbound every chunk; a region never published has no view there yet.
        if let Some((addr, b)) = &self.same_address {
            b.release_address(*addr);
        }
    }
}

impl Region {
    /// The longest region: a memfd's size is an `off_t`.
    pub const MAX_LEN: usize = i64::MAX as usize;

    /// Metadata bytes one block takes with `devices` devices: its slot (the protocol engine
    /// inline), and per device its page-table slot, LRU time and frame count. Device memory
    /// and the backends' page tables are made lazily, when a device first uses the block, and
    /// are not counted.
    fn metadata_per_block(devices: usize) -> usize {
        let per_device = std::mem::size_of::<RwLock<DevBlock>>()
            + std::mem::size_of::<AtomicU64>()
            + std::mem::size_of::<AtomicU32>();
        std::mem::size_of::<BlockSlot>() + devices * per_device
    }

    /// Checks that a region of `len` bytes can exist and reserves room for its blocks, before
    /// anything else of it is allocated. Every block's metadata is built eagerly (by
    /// [`Region::new`]), so it must fit in the memory the machine can give now: a reservation
    /// alone could succeed under overcommit and be killed when the blocks are written.
    ///
    /// # Errors
    /// `Invalid` for a length of zero or beyond [`Region::MAX_LEN`]; `NoMem` when the metadata
    /// cannot fit in memory or the allocator refuses it.
    pub fn reserve_blocks(len: usize, devices: usize) -> Result<Vec<BlockSlot>> {
        if len == 0 {
            return Err(Error::Invalid("empty range"));
        }
        if len > Self::MAX_LEN {
            return Err(Error::Invalid("length beyond what a memfd can hold"));
        }
        Self::check_metadata_fits(len, devices)?;
        mem::try_vec(len.div_ceil(BLOCK_BYTES)).ok_or(Error::NoMem)
    }

    /// `NoMem` if the metadata of a `len`-byte region with `devices` devices cannot fit in the
    /// machine's memory (every block's is built at once).
    pub fn check_metadata_fits(len: usize, devices: usize) -> Result<()> {
        let fits = len
            .div_ceil(BLOCK_BYTES)
            .checked_mul(Self::metadata_per_block(devices))
            .is_some_and(mem::fits_in_memory);
        if fits {
            Ok(())
        } else {
            Err(Error::NoMem)
        }
    }

    /// A region over `memfd`, whose blocks go into `slots`, reserved for them by
    /// [`Region::reserve_blocks`].
    pub fn new(
        id: u64,
        memfd: OwnedFd,
        backing: Mapping,
        len: usize,
        mut slots: Vec<BlockSlot>,
        devices: usize,
        file: Option<FileBacking>,
    ) -> Self {
        let nblocks = len.div_ceil(BLOCK_BYTES);
        debug_assert!(slots.is_empty() && slots.capacity() >= nblocks);
        slots.extend((0..nblocks).map(|b| {
            let pages = ((len - b * BLOCK_BYTES).min(BLOCK_BYTES)) / PAGE_SIZE;
            let mut layout = match &file {
                Some(f) => Layout::file(f.first_page + (b * PAGES_PER_BLOCK) as u64),
                None => Layout::anonymous(),
            };
            if pages < PAGES_PER_BLOCK {
                let mut managed = PageMask::EMPTY;
                managed.insert_range(0, pages);
                layout.managed = managed;
                layout.file_backed &= managed;
            }
            BlockSlot {
                engine: Mutex::new(Block2M::new(layout)),
                dev: (0..devices).map(|_| RwLock::new(DevBlock::new())).collect(),
                held: (0..devices).map(|_| AtomicU32::new(0)).collect(),
                evict_copies: (0..devices).map(|_| AtomicU32::new(0)).collect(),
                adopted: Mutex::new(PageMask::EMPTY),
                populated: Mutex::new(PageMask::EMPTY),
                policy: PolicyBlock::new(devices),
            }
        }));
        let blocks = slots.into_boxed_slice();
        let inode = mem::inode(memfd.as_fd()).unwrap_or(0);
        Self {
            id,
            inode,
            memfd,
            backing,
            len,
            file,
            blocks,
            views: RwLock::new(Vec::new()),
            registered: Vec::new(),
            same_address: None,
            policy: PolicyRegion::default(),
            pins: Default::default(),
            dirty: DirtyBlocks::new(nblocks),
        }
    }

    /// Pages managed in block `bi`.
    pub fn block_pages(&self, bi: usize) -> usize {
        ((self.len - bi * BLOCK_BYTES).min(BLOCK_BYTES)) / PAGE_SIZE
    }

    /// Address of page `page` of block `bi` in the backing (DMA) view.
    pub fn backing_ptr(&self, bi: usize, page: usize) -> *mut u8 {
        self.backing
            .as_ptr()
            .wrapping_add(bi * BLOCK_BYTES + page * PAGE_SIZE)
    }

    /// The CPU address ranges showing file bytes `[off, off + len)`.
    pub fn cpu_ranges(&self, off: usize, len: usize, out: &mut Vec<(usize, usize)>) {
        self.each_view_range(off, len, |va, _, n| out.push((va, n)));
    }

    /// Like `cpu_ranges`, with each range's file offset: `(address, offset, length)`.
    pub fn cpu_ranges_at(&self, off: usize, len: usize, out: &mut Vec<(usize, usize, usize)>) {
        self.each_view_range(off, len, |va, at, n| out.push((va, at, n)));
    }

    /// Calls `f(address, offset, length)` for each view's part of file bytes `[off, off + len)`.
    fn each_view_range(&self, off: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        for v in views.iter() {
            let s = off.max(v.off);
            let e = (off + len).min(v.off + v.len);
            if s < e {
                f(v.va + (s - v.off), s, e - s);
            }
        }
    }
}

/// The pinned pages of a region, by page index in the region: how many pins hold each, and the
/// preferred location it had before the first of them (restored when the last one goes).
#[derive(Debug, Default)]
pub(crate) struct PinTable {
    pages: PinPages,
}

/// Pin count and the preferred location before the first pin, by page index in the region.
type PinMap = std::collections::BTreeMap<usize, (u32, Option<Mem>)>;
type PinPages = Mutex<PinMap>;

impl PinTable {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, PinMap> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pinned pages among block `bi`'s.
    pub(crate) fn in_block(&self, bi: usize) -> PageMask<BLOCK_WORDS> {
        let first = bi * PAGES_PER_BLOCK;
        let mut mask = PageMask::EMPTY;
        for (&page, _) in self.lock().range(first..first + PAGES_PER_BLOCK) {
            mask.insert(page - first);
        }
        mask
    }

    /// The blocks in `blocks` with a pinned page, in order.
    pub(crate) fn blocks(&self, blocks: Range<usize>) -> Vec<usize> {
        let pages = blocks.start.saturating_mul(PAGES_PER_BLOCK)
            ..blocks.end.saturating_mul(PAGES_PER_BLOCK);
        let mut out: Vec<usize> = Vec::new();
        for (&page, _) in self.lock().range(pages) {
            let bi = page / PAGES_PER_BLOCK;
            if out.last() != Some(&bi) {
                out.push(bi);
            }
        }
        out
    }

    /// Whether any page of block `bi`'s `run` is pinned.
    pub(crate) fn any(&self, bi: usize, run: PageRun) -> bool {
        let first = bi * PAGES_PER_BLOCK;
        self.lock()
            .range(first + run.start()..first + run.end())
            .next()
            .is_some()
    }
}

/// One bit per block of a region: set while the block may hold a dirty file page, a writeback
/// in flight or an unreported writeback error (`Block2M::may_need_flush`). Written only under
/// the block's engine lock, at the end of each drive and whenever a drive releases the lock
/// (`Runtime::drive`), which is the only way a block's state changes; so once the drive that
/// marked a page dirty has returned, and before the write it allowed can happen, the bit is set.
/// A superset of the blocks a flush must visit, never less: a set bit whose block turned clean
/// is cleared by the next drive of that block.
///
/// It also counts the pages a flush has work on (dirty, or under writeback), per block and in
/// all: what a lease break would have to write back, which the background writeback keeps
/// under the mapping's limit (`mm/flusher.rs`).
#[derive(Debug)]
pub(crate) struct DirtyBlocks {
    words: Box<[AtomicU64]>,
    pages: Box<[AtomicU16]>,
    total: AtomicUsize,
}

impl DirtyBlocks {
    fn new(nblocks: usize) -> Self {
        Self {
            words: (0..nblocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages: (0..nblocks).map(|_| AtomicU16::new(0)).collect(),
            total: AtomicUsize::new(0),
        }
    }

    /// Pages of the region dirty or under writeback, as of the last drive of each block.
    pub(crate) fn pages(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Records whether block `bi` may need a flush. Called under the block's engine lock.
    pub(crate) fn record(&self, bi: usize, block: &Block2M) {
        let Some(word) = self.words.get(bi / 64) else {
            return;
        };
        if let Some(count) = self.pages.get(bi) {
            // Under the block's engine lock: this block's count changes one drive at a time.
            let now = block.flush_work().count() as u16;
            let was = count.swap(now, Ordering::Relaxed);
            if now > was {
                self.total
                    .fetch_add(usize::from(now - was), Ordering::Relaxed);
            } else if was > now {
                self.total
                    .fetch_sub(usize::from(was - now), Ordering::Relaxed);
            }
        }
        let bit = 1u64 << (bi % 64);
        // Release: a flush that sees the bit (Acquire) sees the block it was set for; the
        // engine lock orders the block's own readers.
        if block.may_need_flush() {
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Release);
            }
        } else if word.load(Ordering::Relaxed) & bit != 0 {
            word.fetch_and(!bit, Ordering::Release);
        }
    }

    /// The blocks in `range` whose bit is set, in order.
    pub(crate) fn in_range(&self, range: Range<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        let (start, end) = (range.start, range.end.min(self.words.len() * 64));
        let mut w = start / 64;
        while w * 64 < end {
            let Some(word) = self.words.get(w) else {
                break;
            };
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let bi = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if (start..end).contains(&bi) {
                    out.push(bi);
                }
            }
            w += 1;
        }
        out
    }
}
