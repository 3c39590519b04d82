//! The fault-service threads: read userfaultfd messages, apply unmap/remap to the address space at
//! once, and serve faults, read-ahead and invalidations of unmapped file ranges.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem_proto::{Invalidation, PageRun, RequestKind, BLOCK_BYTES, PAGES_PER_BLOCK, PAGE_SIZE};

use crate::mm::region::Region;
use crate::mm::runtime::Runtime;
use crate::mm::work::{ServiceWork, Spares};
use crate::sys::uffd::{self, Msg};

impl Runtime {
    /// Reads pending userfaultfd messages into `work` and applies unmap/remap to the address map
    /// at once. `msgs` is scratch space, kept by the caller so a fault costs no allocation.
    ///
    /// With `wait` false, a thread that finds another reading returns at once without reading
    /// (the other reads what is pending), so two service threads woken for one message do not
    /// queue on the lock that lookups also wait for. Returns whether it read.
    pub(crate) fn read_events(
        &self,
        msgs: &mut Vec<Msg>,
        work: &mut Vec<ServiceWork>,
        wait: bool,
    ) -> bool {
        let _gate = self.gate.enter();
        let _g = if wait {
            self.space.lock_events()
        } else {
            match self.space.try_lock_events() {
                Some(g) => g,
                None => return false,
            }
        };
        msgs.clear();
        loop {
            match self.uffd.read(msgs) {
                Ok(n) if n < 32 => break,
                Ok(_) => {}
                Err(e) => {
                    self.note_error("read userfaultfd", &e);
                    break;
                }
            }
        }
        for m in msgs.drain(..) {
            match m {
                Msg::PageFault {
                    addr,
                    write,
                    wp,
                    tid,
                } => work.push(ServiceWork::Fault {
                    addr,
                    write: write || wp,
                    tid,
                }),
                Msg::Unmap { start, end } | Msg::Remove { start, end } => {
                    for (region, off, len) in self.space.unmap_views(start, end) {
                        work.push(ServiceWork::Unmapped { region, off, len });
                    }
                }
                Msg::Remap { from, to, len } => {
                    self.space.remap_views(from, to, len);
                }
                Msg::Other => {}
            }
        }
        true
    }

    /// Reads pending events into the backlog: userfaultfd answers EAGAIN until they are read.
    pub(crate) fn drain_events(&self) {
        let mut work = Vec::new();
        self.read_events(&mut Vec::new(), &mut work, true);
        if !work.is_empty() {
            self.work.push(work);
        }
        std::thread::yield_now();
    }

    /// A fault-service thread; thread 0 is the primary, the others are spares (`Spares`).
    ///
    /// Each round sleeps until the userfaultfd has messages (for a thread that waits on it) or
    /// the backlog was kicked (the wait returns at once while messages are pending), reads the
    /// messages, adds the backlog's round, and serves them. Sleeping first, not reading again
    /// after a round, is what a raw handler does: an isolated fault costs one `read` and the
    /// thread is asleep as soon as the fault is served, leaving the CPU to the thread it just
    /// woke.
    pub(crate) fn serve(self: Arc<Self>, index: usize) {
        let spare = index > 0;
        let sp = &self.spares;
        let waiter =
            match uffd::Waiter::new(&self.uffd, self.work.wakeup_fd(), spare.then(|| sp.fd())) {
                Ok(w) => w,
                Err(e) => return self.note_error("epoll", &e),
            };
        let mut armed = !spare;
        let mut watching = false;
        // A watching spare: the rounds it last saw, and since when it has seen no new one.
        let (mut seen, mut quiet_since) = (0u64, 0u64);
        if spare {
            sp.disarmed.fetch_add(1, Ordering::SeqCst);
        }
        let mut msgs = Vec::with_capacity(32);
        let mut work = Vec::with_capacity(32);
        // The thread of the last fault this thread read, and when: faults of two threads close
        // together are load for the spares, though each read brings one.
        let (mut last_tid, mut last_at) = (0u32, 0u64);
        loop {
            let due = self.poisoned.next_due();
            let timeout = if watching && !armed {
                Some(due.map_or(Spares::WATCH, |d| d.min(Spares::WATCH)))
            } else {
                due
            };
            if armed {
                sp.idle_armed.fetch_add(1, Ordering::SeqCst);
            }
            let ready = waiter.wait(timeout);
            if armed {
                sp.idle_armed.fetch_sub(1, Ordering::SeqCst);
            }
            let ready = match ready {
                Ok(r) => r,
                Err(e) => {
                    self.note_error("poll userfaultfd", &e);
                    return;
                }
            };
            if self.work.is_shut_down() {
                return;
            }
            if ready.kicked {
                self.work.drain_wakeups();
            }
            let now = sp.now();
            if spare {
                if ready.spare {
                    sp.drain();
                }
                if (ready.spare || !armed) && !watching {
                    watching = true;
                    sp.watching.fetch_add(1, Ordering::SeqCst);
                    (seen, quiet_since) = (sp.rounds.load(Ordering::SeqCst), now);
                }
                if !armed {
                    // Faults pending, no armed thread waiting, and no round begun for a whole
                    // watch period: the armed threads are held up. (A primary that the thread
                    // it woke has preempted is not held up: it begins its next round as soon
                    // as that thread faults again.)
                    let rounds = sp.rounds.load(Ordering::SeqCst);
                    let stuck = || {
                        rounds == seen
                            && now.saturating_sub(quiet_since) >= Spares::WATCH_NS
                            && sp.idle_armed.load(Ordering::SeqCst) == 0
                            && self.uffd.has_messages()
                    };
                    if sp.wanted(now) || stuck() {
                        // The next wait returns at once with what is pending. This round goes
                        // on: a kick it drained may have been the only one for queued work.
                        match waiter.watch_uffd(&self.uffd, true) {
                            Ok(()) => {
                                armed = true;
                                sp.disarmed.fetch_sub(1, Ordering::SeqCst);
                                sp.hold(now);
                            }
                            Err(e) => self.note_error("epoll", &e),
                        }
                    } else if rounds != seen {
                        (seen, quiet_since) = (rounds, now);
                    } else if now.saturating_sub(quiet_since) > Spares::QUIET
                        && sp.idle_armed.load(Ordering::SeqCst) > 0
                    {
                        watching = false;
                        sp.watching.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            } else if ready.messages && sp.watching.load(Ordering::SeqCst) == 0 {
                // The first round after a quiet spell: a spare watches again, before this
                // round can hold the primary up.
                sp.call();
            }
            // Faults first: what is pending on the descriptor and in the backlog. Then at most
            // one read-ahead, so the other threads can share them and a fault never waits
            // behind a queue of them.
            if ready.messages {
                sp.rounds.fetch_add(1, Ordering::SeqCst);
                if self.read_events(&mut msgs, &mut work, false) {
                    // Two faults in one read, or faults of two threads close together.
                    let mut faults = 0;
                    let mut load = false;
                    for w in &work {
                        if let ServiceWork::Fault { tid, .. } = *w {
                            faults += 1;
                            load |= faults > 1
                                || (tid != last_tid
                                    && now.saturating_sub(last_at) < Spares::TOGETHER);
                            (last_tid, last_at) = (tid, now);
                        }
                    }
                    if load {
                        sp.hold(now);
                    }
                } else {
                    // Another thread is reading: what is pending is its. Let it run.
                    std::thread::yield_now();
                }
            }
            self.work.take_round(&mut work);
            if self.poisoned.pending() {
                self.unpoison(|p| p.due <= std::time::Instant::now());
            }
            for w in work.drain(..) {
                match w {
                    ServiceWork::Fault { addr, write, tid } => {
                        self.cpu_fault(addr & !(PAGE_SIZE - 1), write, tid)
                    }
                    ServiceWork::Prefetch { region, bi } => self.prefetch(&region, bi),
                    ServiceWork::Migrate {
                        region,
                        bi,
                        run,
                        dst,
                        done,
                    } => done.finish(self.request(&region, bi, run, RequestKind::Migrate { dst })),
                    ServiceWork::Unmapped { region, off, len } => {
                        self.invalidate_file_range(&region, off, len, Invalidation::Unmap)
                    }
                }
            }
            if spare && armed && !sp.wanted(now) && sp.idle_armed.load(Ordering::SeqCst) > 0 {
                match waiter.watch_uffd(&self.uffd, false) {
                    Ok(()) => {
                        armed = false;
                        sp.disarmed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => self.note_error("epoll", &e),
                }
            }
        }
    }

    pub(crate) fn invalidate_file_range(
        &self,
        region: &Region,
        off: usize,
        len: usize,
        kind: Invalidation,
    ) {
        let mut at = off;
        let end = (off + len).min(region.len);
        while at < end {
            let bi = at / BLOCK_BYTES;
            let page = (at % BLOCK_BYTES) / PAGE_SIZE;
            let n = ((end - at) / PAGE_SIZE).min(PAGES_PER_BLOCK - page);
            if let Some(run) = PageRun::new(page, n, PAGES_PER_BLOCK) {
                let _ = self.invalidate(region, bi, run, kind);
            }
            at += n.max(1) * PAGE_SIZE;
        }
    }
}
