//! Whole-range operations shared by the public handles (`Hetmem`, `Device`): migrate, discard,
//! protect, advise. Each checks the range, then drives the protocol block by block.

use hetmem_proto::{Access, Advice, Event, Invalidation, Mem, RequestKind};

use crate::error::{Error, Result};
use crate::mm::runtime::Runtime;
use crate::mm::work::{Background, ServiceWork};
use crate::sys::mem;

impl Runtime {
    /// Migrates `[addr, addr + len)` to `dst`, after checking every page is readable.
    pub(crate) fn migrate(&self, addr: usize, len: usize, dst: Mem) -> Result<()> {
        if let Mem::Device(d) = dst {
            if self.topology.kind(d).is_none() {
                return Err(Error::Invalid("no such device"));
            }
        }
        let pieces = self.pieces(addr, len)?;
        self.check_access(&pieces, Access::Read)?;
        if dst != Mem::System {
            self.refuse_pinned(&pieces, "it may not move to a device")?;
        }
        for p in pieces {
            self.request(&p.region, p.bi, p.run, RequestKind::Migrate { dst })?;
        }
        Ok(())
    }

    /// `migrate` in the background (`Hetmem::prefetch`): the range is checked now, each block's
    /// part is queued for the service threads (after faults, as read-ahead is), and the
    /// returned state says when all are done.
    pub(crate) fn prefetch_range(
        &self,
        addr: usize,
        len: usize,
        dst: Mem,
    ) -> Result<std::sync::Arc<Background>> {
        if let Mem::Device(d) = dst {
            if self.topology.kind(d).is_none() {
                return Err(Error::Invalid("no such device"));
            }
        }
        let pieces = self.pieces(addr, len)?;
        self.check_access(&pieces, Access::Read)?;
        if dst != Mem::System {
            self.refuse_pinned(&pieces, "it may not move to a device")?;
        }
        let done = std::sync::Arc::new(Background::new(pieces.len()));
        self.work
            .push(pieces.into_iter().map(|p| ServiceWork::Migrate {
                region: p.region,
                bi: p.bi,
                run: p.run,
                dst,
                done: done.clone(),
            }));
        Ok(done)
    }

    /// Drops the data of a range (`Hetmem::discard`).
    pub(crate) fn discard(&self, addr: usize, len: usize) -> Result<()> {
        let pieces = self.pieces(addr, len)?;
        self.refuse_pinned(&pieces, "its data may not be dropped")?;
        for p in pieces {
            self.invalidate(&p.region, p.bi, p.run, Invalidation::Discard)?;
        }
        Ok(())
    }

    /// mprotect, then the invalidation an MMU notifier would send (`Hetmem::protect`).
    #[allow(unsafe_code)]
    pub(crate) fn protect(&self, addr: usize, len: usize, read: bool, write: bool) -> Result<()> {
        let pieces = self.pieces(addr, len)?;
        let prot = match (read, write) {
            (false, _) => mem::Prot::None,
            (true, false) => mem::Prot::Read,
            (true, true) => mem::Prot::ReadWrite,
        };
        // SAFETY: every page of the range is managed memory (`pieces` checked); changing its
        // protection is what the caller asks for, and hetmem's own accesses go through the
        // backing view, which keeps its protection.
        unsafe { mem::protect(addr, len, prot) }.map_err(Error::os("mprotect"))?;
        for p in pieces {
            self.invalidate(
                &p.region,
                p.bi,
                p.run,
                Invalidation::Protect { read, write },
            )?;
        }
        Ok(())
    }

    /// Advice for a range (`Hetmem::advise`).
    pub(crate) fn advise(&self, addr: usize, len: usize, advice: Advice) -> Result<()> {
        let named = match advice {
            Advice::PreferredLocation(Some(Mem::Device(d))) | Advice::AccessedBy(d, _) => Some(d),
            _ => None,
        };
        if named.is_some_and(|d| self.topology.kind(d).is_none()) {
            return Err(Error::Invalid("no such device"));
        }
        let pieces = self.pieces(addr, len)?;
        if let Advice::PreferredLocation(_) = advice {
            // A pin keeps its pages' preference at system memory; the advice would undo that.
            self.refuse_pinned(&pieces, "its preferred location is system memory")?;
        }
        for p in &pieces {
            let event = Event::Advise {
                pages: p.run,
                advice,
            };
            self.drive(&p.region, p.bi, event, |_, _| {})
                .map_err(|_| Error::Invalid("page run outside its block"))?;
        }
        if let Advice::AccessedBy(d, true) = advice {
            for p in &pieces {
                self.premap(p, d);
            }
        }
        Ok(())
    }

    /// `AccessedBy(d)` pre-maps: the pages of `p` in system memory are mapped for device `d`
    /// now (remotely, as the advice makes the protocol do), so its first read does not fault.
    /// Pages elsewhere, or that may not be read, are left to fault as usual.
    fn premap(&self, p: &crate::mm::space::BlockSpan, d: hetmem_proto::DeviceId) {
        let runs: Vec<hetmem_proto::PageRun> = {
            let block = self.lock_block(&p.region.blocks[p.bi]);
            let st = block.state();
            (hetmem_proto::PageMask::from_run(p.run)
                & st.valid_in(Mem::System)
                & st.accessible(Access::Read))
            .runs()
            .collect()
        };
        let read = RequestKind::Fault {
            proc: hetmem_proto::Proc::Device(d),
            access: Access::Read,
        };
        for run in runs {
            let _ = self.request_once(&p.region, p.bi, run, read, |_, _| {});
        }
    }
}
