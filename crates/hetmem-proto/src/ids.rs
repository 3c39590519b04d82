//! Identifiers and sizes. Each type carries its invariant, so the engine never re-checks it.

use std::fmt;

/// Base page size, in bytes.
pub const PAGE_SIZE: usize = 4096;
/// Pages in a production block (2 MiB), the unit of locking, batching and device mapping.
pub const PAGES_PER_BLOCK: usize = 512;
/// Bytes in a production block (2 MiB).
pub const BLOCK_BYTES: usize = PAGES_PER_BLOCK * PAGE_SIZE;
/// 64-page words in a production block.
pub const BLOCK_WORDS: usize = PAGES_PER_BLOCK / 64;
/// Devices a topology may hold. Device ids are `0..MAX_DEVICES`.
pub const MAX_DEVICES: usize = 8;
/// Memories: system memory plus one per device.
pub const MAX_MEMS: usize = MAX_DEVICES + 1;
/// Processors: the CPU plus one per device.
pub const MAX_PROCS: usize = MAX_DEVICES + 1;

/// A device index below [`MAX_DEVICES`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u8);

impl DeviceId {
    /// Returns `None` unless `index < MAX_DEVICES`.
    pub const fn new(index: usize) -> Option<Self> {
        if index < MAX_DEVICES {
            Some(Self(index as u8))
        } else {
            None
        }
    }

    /// The index, always below [`MAX_DEVICES`].
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Devices `0..count` (clamped to [`MAX_DEVICES`]).
    pub fn range(count: usize) -> impl Iterator<Item = DeviceId> + Clone {
        (0..count.min(MAX_DEVICES)).map(|i| DeviceId(i as u8))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// A memory that can hold a copy of a page.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Mem {
    /// System RAM, always mappable by the CPU.
    System,
    /// A device's own memory.
    Device(DeviceId),
}

impl Mem {
    /// Dense index: 0 for system memory, `1 + d` for device `d`.
    pub const fn index(self) -> usize {
        match self {
            Mem::System => 0,
            Mem::Device(d) => 1 + d.index(),
        }
    }

    /// The inverse of [`Mem::index`].
    pub fn from_index(i: usize) -> Option<Self> {
        match i {
            0 => Some(Mem::System),
            _ => DeviceId::new(i - 1).map(Mem::Device),
        }
    }

    /// The device, if this is device memory.
    pub const fn device(self) -> Option<DeviceId> {
        match self {
            Mem::System => None,
            Mem::Device(d) => Some(d),
        }
    }
}

/// A processor that maps pages and faults on them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Proc {
    /// Any CPU thread of the process (one page table).
    Cpu,
    /// A device with its own page table.
    Device(DeviceId),
}

impl Proc {
    /// Dense index: 0 for the CPU, `1 + d` for device `d`.
    pub const fn index(self) -> usize {
        match self {
            Proc::Cpu => 0,
            Proc::Device(d) => 1 + d.index(),
        }
    }

    /// The memory this processor reaches without crossing a link.
    pub const fn local_mem(self) -> Mem {
        match self {
            Proc::Cpu => Mem::System,
            Proc::Device(d) => Mem::Device(d),
        }
    }
}

/// A contiguous run of pages inside one block: `start..start + len`, never empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRun {
    start: u16,
    len: u16,
}

impl PageRun {
    /// Returns `None` if the run is empty or does not fit in a block of `pages` pages.
    pub fn new(start: usize, len: usize, pages: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (len > 0 && end <= pages && pages <= u16::MAX as usize).then_some(Self {
            start: start as u16,
            len: len as u16,
        })
    }

    /// A single page.
    pub fn page(index: usize, pages: usize) -> Option<Self> {
        Self::new(index, 1, pages)
    }

    pub(crate) const fn from_raw(start: usize, len: usize) -> Self {
        Self {
            start: start as u16,
            len: len as u16,
        }
    }

    /// First page.
    pub const fn start(self) -> usize {
        self.start as usize
    }

    /// Number of pages, at least 1.
    pub const fn len(self) -> usize {
        self.len as usize
    }

    /// Always false: runs are never empty. Present for clippy's `len_without_is_empty`.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// One past the last page.
    pub const fn end(self) -> usize {
        self.start() + self.len()
    }

    /// The pages, in order.
    pub fn pages(self) -> std::ops::Range<usize> {
        self.start()..self.end()
    }
}

impl fmt::Debug for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start(), self.end())
    }
}

/// A request, chosen by the caller (for example one per faulting thread). It comes back in
/// [`crate::Action::Complete`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ReqId(pub u64);

/// An asynchronous operation the engine started (a transfer or a writeback). The runtime reports
/// its outcome with [`crate::Event::Complete`]. Ids are slots, reused after completion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct OpId(pub(crate) u16);

impl OpId {
    /// The slot number, dense from 0.
    pub const fn slot(self) -> usize {
        self.0 as usize
    }
}
