//! Region lifecycle: create a region and its CPU view, register a caller's range, and tear a
//! region down without losing data (bring it home first, then detach its views).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hetmem_proto::{Invalidation, PageRun, RequestKind, BLOCK_BYTES, PAGES_PER_BLOCK};

use crate::error::{Error, Result};
use crate::mm::file_io::FileMode;
use crate::mm::region::{Region, View};
use crate::mm::runtime::{Runtime, RuntimeHandle};
use crate::policy::MemEvent;
use crate::sys::mem::{self, Mapping};
use crate::sys::uffd::Modes;

/// A file mapping whose drop could not write every dirty page back: its parts, kept (not torn
/// down, not lost) until `Hetmem::take_kept_file_mappings` hands it back.
#[derive(Debug)]
pub(crate) struct KeptMapping {
    pub handle: Arc<RuntimeHandle>,
    pub region: Arc<Region>,
    pub addr: usize,
    pub len: usize,
    pub mode: FileMode,
}

/// File mappings kept by a failed drop.
pub(crate) static KEPT: Mutex<Vec<KeptMapping>> = Mutex::new(Vec::new());

impl Runtime {
    #[allow(unsafe_code)]
    /// A new region of `len` bytes. `at_new_address`: its CPU view will be mapped where the
    /// runtime chooses (`alloc`, `map_file`), so a backend may reserve the same device addresses
    /// for it; `register` keeps the caller's address, which no device reservation can take.
    pub(crate) fn new_region(
        &self,
        len: usize,
        file: Option<crate::mm::file_io::FileBacking>,
        at_new_address: bool,
    ) -> Result<Arc<Region>> {
        self.check_owner()?;
        // The length and the metadata first: nothing of the region exists yet if they fail.
        let slots = Region::reserve_blocks(len, self.devices.len())?;
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let memfd = mem::memfd(&format!("hetmem-{id}"), len).map_err(Error::os("memfd_create"))?;
        let backing =
            Mapping::shared(memfd.as_fd(), 0, len).map_err(Error::os("mmap backing view"))?;
        let mut region = Region::new(id, memfd, backing, len, slots, self.devices.len(), file);
        // Backends that copy faster from registered memory register the backing view now.
        // Registration pins (and so populates) every page: the region's pages are then all
        // in the memfd for good, never holes (`Region::registered`).
        for d in &self.devices {
            // SAFETY: the backing view stays mapped, and is never punched once registered
            // (`Region::registered`), until the region's drop unregisters it.
            let registered = unsafe { d.backend.register_host(region.backing.as_ptr(), len) }
                .map_err(Error::os("register host memory with a device"))?;
            if registered {
                region.registered.push(d.backend.clone());
            }
        }
        // The first backend that wants the region at one address for CPU and device reserves
        // it now; `map_cpu_view` maps the CPU view there.
        for d in self.devices.iter().filter(|_| at_new_address) {
            if let Some(addr) = d
                .backend
                .reserve_address(len)
                .map_err(Error::os("reserve device addresses"))?
            {
                region.same_address = Some((addr, d.backend.clone()));
                break;
            }
        }
        if !region.registered.is_empty() {
            for (bi, slot) in region.blocks.iter().enumerate() {
                slot.populated
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert_range(0, region.block_pages(bi));
            }
        }
        Ok(Arc::new(region))
    }

    /// A CPU view of the whole region, 2 MiB-aligned, not registered yet.
    #[allow(unsafe_code)]
    pub(crate) fn map_cpu_view(&self, region: &Region) -> Result<Mapping> {
        match &region.same_address {
            // SAFETY: the backend reserved `[addr, addr + len)` for this region; what the host
            // has there is its placeholder, nothing of anyone else's.
            Some((addr, _)) => unsafe {
                Mapping::shared_fixed(*addr, region.memfd.as_fd(), 0, region.len)
            },
            None => Mapping::shared_aligned(region.memfd.as_fd(), region.len, BLOCK_BYTES),
        }
        .map_err(Error::os("mmap cpu view"))
    }

    #[allow(unsafe_code)]
    pub(crate) fn register_view(&self, va: usize, len: usize) -> Result<()> {
        // SAFETY: the view stays mapped until `remove_region` unregisters it, and service
        // threads serve its faults for as long as the context lives, which every buffer
        // outlives by holding the context.
        unsafe {
            self.uffd.register(
                va,
                len,
                Modes {
                    missing: true,
                    minor: true,
                    wp: true,
                },
            )
        }
        .map(|_| ())
        .map_err(Error::os("register with userfaultfd"))
    }

    /// Takes the region out of the address map and the region list, and empties its view list.
    /// The views stay mapped and registered: the caller detaches them (`detach_views`) when
    /// their contents allow it, so no access ever reaches the memfd unmanaged while it holds a
    /// stale copy.
    pub(crate) fn retire_region(&self, region: &Arc<Region>) -> Vec<View> {
        self.space.remove_region(region)
    }

    /// Makes retired views inaccessible, then unregisters them, in that order: an access racing
    /// the teardown then fails (SIGSEGV, or EFAULT for the kernel's own accesses, as after a
    /// munmap) instead of mapping whatever the memfd holds. Threads already waiting in a fault
    /// on them are woken by the unregistration and fail the same way.
    #[allow(unsafe_code)]
    pub(crate) fn detach_views(&self, region: &Region, views: &[View]) {
        for v in views {
            // SAFETY: the view is retired: its buffer is going, so nobody may use it any more.
            if let Err(e) = unsafe { mem::protect(v.va, v.len, mem::Prot::None) } {
                // Part of the view is gone already (a munmap whose event is still unread):
                // protect what is left of it, one mapping at a time.
                if e.raw_os_error() != Some(libc::ENOMEM) {
                    self.note_error("mprotect a retired view", &e);
                }
                let maps = mem::maps_in(v.va, v.va + v.len).unwrap_or_default();
                for m in maps.iter().filter(|m| m.inode == region.inode) {
                    let (s, t) = (m.start.max(v.va), m.end.min(v.va + v.len));
                    // SAFETY: as above, for the part of the view still mapped.
                    let _ = unsafe { mem::protect(s, t - s, mem::Prot::None) };
                }
            }
            let _ = self.uffd.unregister(v.va, v.len);
        }
    }

    /// Brings every page of the region to system memory: each device releases its copies (the
    /// protection of the range does not matter, unlike for a migration). A copy that fails is
    /// retried, backing off to 10 ms, before the error is returned; the data then stays on the
    /// device.
    pub(crate) fn bring_home(&self, region: &Region) -> Result<()> {
        for bi in 0..region.blocks.len() {
            let all = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK).expect("non-empty");
            for d in self.topology.devices() {
                if region.blocks[bi].held[d.index()].load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut failures = 0u32;
                loop {
                    match self.request(region, bi, all, RequestKind::Release { dev: d }) {
                        Err(Error::Io(_)) if failures < 32 => {
                            self.emit(MemEvent::TransferFailed);
                            failures += 1;
                            let pause = 1u64 << failures.min(13);
                            std::thread::sleep(std::time::Duration::from_micros(pause.min(10_000)));
                        }
                        r => {
                            r?;
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives a registered range back (`Registration`): brings every page home, then replaces
    /// each view with a private copy of its data. Until the first step has succeeded nothing
    /// changes, so a failure leaves the range managed with its data.
    #[allow(unsafe_code)]
    pub(crate) fn release_registration(&self, region: &Arc<Region>) -> Result<()> {
        self.bring_home(region)?;
        let views = self.retire_region(region);
        // Wait out drives that looked the region up before it was retired, copies they left
        // running included: from here on no drive maps a page of these views.
        for slot in region.blocks.iter() {
            self.quiesce(slot);
        }
        for v in &views {
            // Writers now fault and wait (their faults are stale: they are woken and fault
            // again) until the private copy is in place, so no write lands in the memfd after
            // the copy was taken.
            let _ = self.uffd.write_protect(v.va, v.len, true, false);
            let backing = region.backing.as_ptr().wrapping_add(v.off);
            let fill = |copy: &mut [u8]| {
                // SAFETY: the backing view holds the region's latest data, `v.len` bytes from
                // `v.off` on, and nobody writes it now (every page was brought home above, and
                // writers wait); `copy` is the fresh private memory, as long.
                unsafe { mem::copy(copy.as_mut_ptr(), backing, copy.len()) }
            };
            // SAFETY: moves the copy over the view, which the caller handed to us at
            // registration; the contents are identical, so references into it stay valid.
            // The view is still registered: the kernel sends an UNMAP event for it and waits
            // until a service thread reads it.
            let moved = unsafe { mem::replace_with_private(v.va, v.len, fill, &[]) };
            if let Err(e) = moved {
                // The memfd holds the latest data: leave it mapped there, unmanaged.
                self.note_error("move a registered range out", &e);
                let _ = self.uffd.unregister(v.va, v.len);
            }
            // Writers that waited retry on the private copy.
            let _ = self.uffd.wake(v.va, v.len);
        }
        self.drop_all_copies(region);
        Ok(())
    }

    pub(crate) fn drop_all_copies(&self, region: &Region) {
        for bi in 0..region.blocks.len() {
            let all = PageRun::new(0, region.block_pages(bi), PAGES_PER_BLOCK).expect("non-empty");
            if let Err(e) = self.invalidate(region, bi, all, Invalidation::Unmap) {
                // A writeback that failed at unmap: the data goes with the mapping.
                self.note_error("writeback at unmap", &std::io::Error::other(e.to_string()));
            }
        }
    }

    #[allow(unsafe_code)]
    pub(crate) fn free_region(&self, region: &Arc<Region>) {
        if !self.is_owner() {
            // A fork child: the views are its private copies; the rest is the parent's.
            for v in region
                .views
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                // SAFETY: the child's own private copy of the view, which its buffer owned.
                let _ = unsafe { mem::unmap(v.va, v.len) };
            }
            return;
        }
        let _gate = self.gate.enter();
        let views = self.retire_region(region);
        // Views first: nothing may reach the data while its copies go.
        self.detach_views(region, &views);
        self.drop_all_copies(region);
        for v in views {
            let _ = match &region.same_address {
                // The reservation is freed with the region, and freeing it unmaps whatever the
                // host has there: a placeholder keeps the range ours until then, so nobody
                // else's mapping can land in it and be lost.
                // SAFETY: the view belonged to this region, whose buffer is being dropped, so
                // no reference into it remains; it is no longer registered.
                Some(_) => unsafe { mem::placeholder(v.va, v.len) },
                // SAFETY: as above.
                None => unsafe { mem::unmap(v.va, v.len) },
            };
        }
    }
}
