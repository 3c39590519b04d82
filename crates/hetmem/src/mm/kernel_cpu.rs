//! A device kernel's closure that touches managed memory through the CPU (issue 10 B9).
//!
//! A simulated kernel runs its closure on a worker thread while it holds the block's page-table
//! read lock: that is how an invalidation waits for the device to stop using the memory (the
//! TLB shootdown of an MMU notifier). If the closure then touches a page of that same block
//! through a CPU pointer, the CPU fault needs the page-table write lock to take the page from
//! the device, which the faulting thread itself holds: a deadlock.
//!
//! The fault service recognises such a fault by its thread id (`UFFD_FEATURE_THREAD_ID`) among
//! the workers registered here, for a page inside the piece the worker is running over. It
//! serves the access *as the device's own*: it copies the device's copy of the page into
//! system memory and maps it for the CPU, read-only for a read, without asking the protocol.
//! The device keeps its mapping; the page is a *stray* CPU mapping the protocol does not know
//! of. The worker cannot race the copy: it is blocked in the very fault being served. When the
//! closure has finished the piece, the worker settles its strays under the block's lock: a page
//! written through the CPU goes back into the device's copy, and every stray mapping is zapped
//! unless the protocol has mapped the page for the CPU meanwhile.
//!
//! - `kernel_read`: the device's data cannot change while the kernel holds the read lock (a
//!   device write needs it too), so a read-only stray shows the same data as the device's copy:
//!   reading its own pages through the CPU works. A write through the CPU pointer fails the
//!   launch (`Error::Invalid`): the write reaches the device's copy, but nothing orders it
//!   against other writers.
//! - `kernel_write`: the closure may change the device's copy after the stray was taken, so
//!   any access through the CPU to the pages it is writing fails the launch.
//! - Other CPU threads see the stray too: for `kernel_read`, the current data; their writes
//!   fault and wait for the kernel as before.

use hetmem_proto::{Mem, Proc, BLOCK_BYTES, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::mm::kernel_runs::Registered;
use crate::mm::runtime::Runtime;
use crate::mm::space::BlockSpan;
use crate::sys::mem;

impl Runtime {
    /// Serves a CPU fault of a device kernel's worker on a page of the piece it runs over, as
    /// the device's own access (see the module). Returns false when the fault is not one: the
    /// ordinary fault path serves it.
    #[allow(unsafe_code)]
    pub(crate) fn kernel_cpu_access(&self, p: &BlockSpan, write: bool, tid: u32) -> bool {
        let Some(run) = self.kernel_runs.find(tid, &p.region, p.bi) else {
            return false;
        };
        let va = p.va;
        let Some(src) = run
            .runs
            .iter()
            .find(|&&(v, _, len)| (v..v + len).contains(&va))
            .map(|&(v, mem, _)| mem + (va - v))
        else {
            // A page of the block outside the piece: the device has not mapped it for this
            // closure, and the ordinary path may serve it.
            return false;
        };
        let page = p.run.start();
        let dst = p.region.backing_ptr(p.bi, page) as usize;
        if src != dst {
            // SAFETY: `src` is the device's copy of the page, which stays mapped and unwritten:
            // the worker holds the page-table read lock (so no chunk changes) and is blocked in
            // this fault (so its closure writes nothing). `dst` is the page in the backing view,
            // whose content the protocol holds as stale (the device has the data) or equal.
            unsafe { mem::copy(dst as *mut u8, src as *const u8, PAGE_SIZE) };
            *p.region.blocks[p.bi]
                .populated
                .lock()
                .unwrap_or_else(|e| e.into_inner()) |= hetmem_proto::PageMask::from_run(p.run);
        }
        self.map_cpu(va, PAGE_SIZE, !write, dst);
        run.strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((page, write));
        let _ = self.uffd.wake(va, PAGE_SIZE);
        true
    }

    /// After a worker's closure over `p` returned and it dropped the page-table lock: puts back
    /// what the CPU wrote through the strays, zaps them, and says whether the launch fails
    /// (see the module). `writing`: the kernel writes its pages (`kernel_write`).
    #[allow(unsafe_code)]
    pub(crate) fn settle_kernel_run(
        &self,
        p: &BlockSpan,
        r: Registered,
        writing: bool,
    ) -> Result<()> {
        self.kernel_runs.leave(&r);
        let strays = std::mem::take(&mut *r.0.strays.lock().unwrap_or_else(|e| e.into_inner()));
        if strays.is_empty() {
            return Ok(());
        }
        let dev = r.0.dev;
        // One entry per page, written if any access through it was a write.
        let mut pages: Vec<(usize, bool)> = Vec::new();
        for (page, w) in strays {
            match pages.iter_mut().find(|s| s.0 == page) {
                Some(s) => s.1 |= w,
                None => pages.push((page, w)),
            }
        }
        let block = self.lock_block(&p.region.blocks[p.bi]);
        let st = block.state();
        let mut wrote = false;
        for (page, written) in pages {
            wrote |= written;
            if st.mapped_by(Proc::Cpu).contains(page) {
                // A drive mapped the page for the CPU meanwhile: the mapping is the protocol's.
                continue;
            }
            let on_device = st.valid_in(Mem::Device(dev)).contains(page);
            if written && on_device && !self.topology.is_coherent(dev) {
                let db = p.region.blocks[p.bi].dev[dev.index()]
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(chunk) = db.chunk.as_ref().and_then(|c| c.host_ptr()) {
                    // SAFETY: the device's copy of the page (its frame, bound while the block
                    // lock is held) takes what the CPU wrote into the system page; nobody else
                    // writes either while the engine lock and the page-table read lock are held.
                    unsafe {
                        mem::copy(
                            chunk.wrapping_add(page * PAGE_SIZE),
                            p.region.backing_ptr(p.bi, page),
                            PAGE_SIZE,
                        )
                    };
                }
            }
            // A page the protocol does not map for the CPU: zapping its entries keeps the data
            // (the memfd has it) and makes the next access fault to us.
            let off = p.bi * BLOCK_BYTES + page * PAGE_SIZE;
            self.zap_cpu(
                &p.region,
                off,
                PAGE_SIZE,
                "zap a device kernel's CPU mapping",
            );
        }
        if wrote {
            Err(Error::Invalid(
                "a device kernel wrote managed memory through a CPU pointer (use the slices it is given)",
            ))
        } else if writing {
            Err(Error::Invalid(
                "a device kernel read through a CPU pointer memory it was writing (use the slices it is given)",
            ))
        } else {
            Ok(())
        }
    }
}
