//! A file-level model of hetmem's file mappings (`docs/file-contract.md` §5, §6, §8), checked by
//! breadth-first search over every reachable state of a small world.
//!
//! The block-level explorer ([`super::explore`]) checks one block's coherence protocol against
//! a simulated machine. This model sits one level up and abstracts the block away: it models
//! the *procedures* the runtime runs around the protocol (`mm/leases.rs`, `mm/revalidate.rs`,
//! `mm/writeback.rs`, `mm/file_io.rs`) and the kernel below them, as atomic steps that
//! interleave in every order:
//!
//! - the file in two levels: a page-cache value and a disk value per page, the kernel's
//!   writeback (page cache → disk, at any time, which may fail: the page is then clean in the
//!   page cache and the disk keeps its old value, as Linux does), `fdatasync`, a crash (the
//!   page cache is lost, the disk kept), and the kernel's per-descriptor error sequence;
//! - hetmem's cache per mapping (a value and a dirty bit per page), for mapping 0 (Shared,
//!   leased) and an optional mapping 1 of the same inode (Shared, ReadOnly, Private, or a fork
//!   child's snapshot of mapping 0);
//! - `flush`/`sync` as a sequence of steps (a `pwrite` per dirty page, then the report of
//!   errors, then for `sync` the `fdatasync`), hetmem's error sequence with the seen rule, the
//!   re-dirtying of unsynced pages after a kernel writeback error;
//! - the lease: the kernel's lease state (none, held, breaking), the lease thread's break
//!   procedure (flush every page, then discard every page, then release), its gate (mapping 0's
//!   faults wait from the signal to the release: no fault on a page it does not cache, no write
//!   to a page it cached clean or the break write-protected), its deadline (a move of its own,
//!   before the kernel's timeout of a break being served; past it no writeback of mapping 0
//!   lands and its pages are conflicted until resolved), the kernel's timeout, hetmem's belief
//!   (`leased`) and its `unleased_cache` flag, the retake with its drop of what was cached
//!   without the lease, and the size check;
//! - another process that opens the file (breaking a held lease first), writes a page,
//!   truncates down and up, punches a page or collapses the first page away, and closes it.
//!
//! Values are versions: every write (ours or theirs, zeros included) makes a fresh, larger one,
//! so "at least that version" is a comparison.
//!
//! Properties, checked in every state or at the step they are about:
//!
//! - **P1 (sync)**: when `sync` returns `Ok`, every page dirty in the mapping at its start is on
//!   the disk with at least the version it had then, or with the page cache's value (another
//!   mapping's later hand-over: the last writer wins), unless a truncation discarded it.
//! - **P2 (crash)**: the page cache and the disk hold only values handed over (written back by a
//!   Shared mapping, or written by another process) or the initial one, never a Private or fork
//!   child's write; after a crash, each page holds at least what the last `sync` that returned
//!   `Ok` promised for it or a value handed over since (§5.4; approximated by "not older than
//!   the oldest of them"), except a page whose kernel writeback failed while hetmem no longer
//!   cached it (§8: it cannot be re-dirtied) and a page truncated away.
//! - **P3 (errors)**: every writeback error, hetmem's (`pwrite`) or the kernel's, is reported by
//!   the next `flush`/`sync` of every mapping that was open when it happened, or was opened
//!   before any mapping had seen it (the seen rule).
//! - **P4 (coherence)**: while the kernel holds the lease (held or breaking), every clean page
//!   mapping 0 caches equals the page cache.
//! - **P5 (break)**: when a break lets the opener proceed, every page that was dirty when the
//!   break was signalled is in the page cache with at least that version, unless its writeback
//!   failed or was refused as conflicted during the break (§6).
//! - **P6 (deadline)**: from the kernel's timeout of a break being served (the opener is in) to
//!   the break's release, no writeback of mapping 0 reaches the page cache; and a conflicted
//!   page is never handed over before the application resolves it.
//! - **P7 (gate)**: when a break releases, mapping 0 caches only pages whose writeback failed or
//!   was refused in it (the break could not drop them): nothing was faulted in again behind the
//!   break's discard.
//!
//! Not modelled: the protocol inside a block (devices, copies, in-flight ops: that is
//! [`super::explore`]'s job), the runtime's locks and threads themselves (each step here is
//! atomic), sizes other than whole pages, sectors and torn pages, the on-disk size, the
//! signal delivery path, O_DIRECT, and eviction with `evict_to_file`.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// Pages in the file (each stands for a different 2 MiB block).
pub const PAGES: usize = 2;

/// The second mapping of the inode, if any.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Second {
    /// Only mapping 0.
    None,
    /// Another Shared mapping in this process: its open breaks mapping 0's lease, and while it
    /// is open neither can hold a write lease (§2.11).
    Shared,
    /// A ReadOnly mapping: its open breaks the write lease; it writes nothing and reports
    /// errors (§8).
    ReadOnly,
    /// A Private mapping: copy-on-write, never written back, reports no errors.
    Private,
    /// A fork child's snapshot of mapping 0: shares the parent's open file description (so it
    /// breaks no lease), never writes the file, and its flush is refused (§2.11).
    ForkChild,
}

/// A deliberately broken rule, to show that each property can fail. Only with the `mutants`
/// feature (tests).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FileMutant {
    /// `sync` returns after the flush without calling `fdatasync` (P1).
    SyncSkipsFdatasync,
    /// A kernel writeback error reported to a mapping does not re-dirty the pages it wrote
    /// since its last good `sync` (P2).
    NoRedirty,
    /// A new mapping starts its error cursor at the current value, even when the last error
    /// was never reported (P3: the seen rule broken).
    ErrseqSamplesAtOpen,
    /// The retake keeps what was cached without the lease (P4).
    RetakeKeepsStale,
    /// The break releases the lease first, then writes back and drops (P5).
    ReleaseBeforeWriteback,
    /// A Private mapping's (or fork child's) flush writes its pages back (P2).
    PrivateWritesBack,
    /// The break writes back past its deadline (P6).
    NoDeadline,
    /// No break gate: mapping 0 faults during a break (P7).
    NoGate,
}

/// A small world to explore.
#[derive(Clone, Debug)]
pub struct Config {
    /// The second mapping.
    pub second: Second,
    /// Writes by the mappings (each a fresh version).
    pub writes: u8,
    /// Another process's data operations: writes, truncations, punches, collapses.
    pub external_ops: u8,
    /// Injected failures: a `pwrite` of ours, or a kernel writeback (background or inside
    /// `fdatasync`).
    pub failures: u8,
    /// How many times mapping 1 may be opened (or forked).
    pub second_opens: u8,
    /// Whether a crash may happen.
    pub crash: bool,
    /// Whether mapping 0 may take its lease back while the lease thread is still serving a
    /// break that timed out, as `Runtime::check_eof` does today (`retake_lease` does not wait
    /// for `broken`). False: the retake waits for the break to finish.
    pub retake_during_break: bool,
    /// Give up (and report it) past this many states.
    pub max_states: u64,
    #[cfg(feature = "mutants")]
    #[doc(hidden)]
    pub mutant: Option<FileMutant>,
}

impl Config {
    /// A world with `second` as mapping 1, 2 writes, 1 external operation, 1 failure, one
    /// open of mapping 1, crashes, and the retake waiting for the break.
    pub fn new(second: Second) -> Self {
        Self {
            second,
            writes: 2,
            external_ops: 1,
            failures: 1,
            second_opens: 1,
            crash: true,
            retake_during_break: false,
            max_states: 50_000_000,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    fn mutated(&self, m: FileMutant) -> bool {
        #[cfg(feature = "mutants")]
        return self.mutant == Some(m);
        #[cfg(not(feature = "mutants"))]
        {
            let _ = m;
            false
        }
    }

    fn mode(&self, m: usize) -> Second {
        if m == 0 {
            Second::Shared
        } else {
            self.second
        }
    }
}

/// One step of a trace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Move {
    /// Mapping `m` faults page `p` in: reads the page cache.
    Read(u8, u8),
    /// Mapping `m` stores a new version into its cached page `p`.
    Write(u8, u8),
    /// Mapping `m`'s size check (every fault, device access and flush): for mapping 0, first
    /// the lease check or retake (whose drop may fail, `true`).
    Check(u8, bool),
    /// Mapping `m`'s `flush` (`false`) or `sync` (`true`) begins.
    Begin(u8, bool),
    /// Mapping `m`'s flush writes its next page back if dirty; `true`: the `pwrite` fails.
    FlushPage(u8, bool),
    /// Mapping `m`'s flush reports errors; a `sync` then calls `fdatasync` (`true`: a page's
    /// kernel writeback fails in it) and returns.
    Finish(u8, bool),
    /// Mapping 1 is opened (or forked).
    Open,
    /// Mapping 1 is closed (its data flushed first).
    Close,
    /// Another process opens the file.
    ExtOpen,
    /// Another process closes the file.
    ExtClose,
    /// Another process writes page `p`.
    ExtWrite(u8),
    /// Another process truncates the file to one page.
    ExtTruncateDown,
    /// Another process grows the file back to two pages.
    ExtTruncateUp,
    /// Another process punches a hole over page `p`.
    ExtPunch(u8),
    /// Another process collapses page 0 away (page 1 moves to 0, the file shrinks).
    ExtCollapse,
    /// The kernel writes page `p` of the page cache out; `true`: it fails.
    KernelWriteback(u8, bool),
    /// The kernel gives up waiting on a break (`lease-break-time`): after the break's
    /// deadline, if one is being served.
    Timeout,
    /// The deadline of the break being served passes (`lease-break-time` less a margin).
    Deadline,
    /// The application resolves the conflict of mapping 0's page `p`: `true` for its own copy
    /// (dirty, written by the next flush), `false` for the file's (dropped unwritten).
    Resolve(u8, bool),
    /// The lease thread's next break step; `true`: its `pwrite` fails.
    BreakStep(bool),
    /// Power loss.
    Crash,
}

/// What the search exercised (per transition), to show that the interesting paths ran.
#[derive(Clone, Copy, Debug, Default)]
pub struct Coverage {
    /// Breaks whose release let the opener proceed.
    pub breaks_served: u64,
    /// Breaks the kernel timed out.
    pub timeouts: u64,
    /// Pages a break past its deadline left conflicted.
    pub conflicts: u64,
    /// Retakes that dropped what was cached without the lease.
    pub retakes_with_drop: u64,
    /// `sync` calls that returned `Ok`.
    pub good_syncs: u64,
    /// Errors reported by `flush`/`sync`.
    pub errors_reported: u64,
    /// Kernel writeback errors that re-dirtied a page.
    pub redirtied: u64,
    /// Crashes checked.
    pub crashes: u64,
}

/// What the search found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Distinct states reached.
    pub states: u64,
    /// Transitions taken.
    pub transitions: u64,
    /// Longest shortest path (BFS depth).
    pub max_depth: usize,
    /// Whether `max_states` stopped the search.
    pub truncated: bool,
    /// What ran.
    pub coverage: Coverage,
    /// The first violation (by BFS: a shortest one) and the moves that lead to it.
    pub counterexample: Option<(String, Vec<Move>)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
struct Slot {
    cached: bool,
    dirty: bool,
    val: u8,
}

/// An error sequence as `errseq_t` (and `mm/file_io.rs::ErrSeq`): a counter, and whether any
/// descriptor has reported its last error.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
struct Seq {
    seq: u8,
    seen: bool,
}

impl Seq {
    fn record(&mut self) {
        self.seq += 1;
        self.seen = false;
    }

    /// `errseq_sample`: a new descriptor starts before an error nobody has reported.
    fn sample(&self) -> u8 {
        if self.seen {
            self.seq
        } else {
            0
        }
    }

    /// `errseq_check_and_advance`.
    fn check(&mut self, cursor: &mut u8) -> bool {
        if *cursor == self.seq {
            return false;
        }
        *cursor = self.seq;
        self.seen = true;
        true
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
struct Op {
    sync: bool,
    next: u8,
    /// Ghost (P1): the version of each page dirty at the call.
    dirty_at_start: [Option<u8>; PAGES],
    /// A `pwrite` of this call failed.
    failed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
struct Map {
    open: bool,
    pages: [Slot; PAGES],
    /// The smallest size seen (pages), as `FileIo`'s end of file.
    eof: u8,
    /// Cursors in hetmem's and the kernel's error sequences.
    hcur: u8,
    kcur: u8,
    /// Ghost (P3): an error this mapping must report.
    owed_h: bool,
    owed_k: bool,
    /// `FileBacking::unsynced`, with the version handed over (the version is ghost, for P2).
    unsynced: [Option<u8>; PAGES],
    op: Option<Op>,
    /// Ghost: an extent shift since the last good `fdatasync` voids the promise (the data of
    /// an offset moved).
    void: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum KLease {
    None,
    Held,
    Breaking,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Opener {
    External,
    Second,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct State {
    disk: [u8; PAGES],
    pc: [u8; PAGES],
    pc_dirty: [bool; PAGES],
    /// Pages in the file.
    size: u8,
    maps: [Map; 2],
    klease: KLease,
    /// `FileBacking::leased`: hetmem's belief.
    leased: bool,
    /// `FileBacking::unleased_cache`.
    unleased: bool,
    /// The lease thread's next step of `broken`, if it is serving one.
    brk: Option<u8>,
    /// A break signalled while the thread was still serving one: served after it.
    brk_again: bool,
    /// Ghost (P5): versions dirty in mapping 0 at the signal; pages whose writeback failed in
    /// the break.
    brk_start: [Option<u8>; PAGES],
    brk_failed: [bool; PAGES],
    /// The break being served has write-protected page `p` for its writeback (the gate holds
    /// a write to it from then on).
    brk_wp: [bool; PAGES],
    /// Ghost (P7): pages the break being served kept (its writeback failed or was refused).
    brk_kept: [bool; PAGES],
    /// The deadline of the break being served has passed (`FileBacking::gate.timed_out`).
    deadline: bool,
    /// Ghost (P6): the kernel let the opener in while the break was being served.
    timed_out_in_break: bool,
    /// Mapping 0's pages a break past its deadline refused to write (`FileBacking::conflicts`).
    conflicted: [bool; PAGES],
    /// Ghost (P6): a violation seen inside a step, reported by `check`.
    p6: Option<u8>,
    opener: Option<Opener>,
    ext_open: bool,
    hseq: Seq,
    kseq: Seq,
    /// Ghost (P2): versions written through a Private mapping or a fork child: never handed
    /// over. Every other version reaches the file only by a hand-over (a Shared mapping's
    /// `pwrite`) or is another process's, so "not one of these" is "handed over or initial".
    unhanded: u16,
    /// Ghost (P2): per page, the version a `sync` that returned `Ok` promised at least.
    floor: [u8; PAGES],
    next_version: u8,
    writes_left: u8,
    ext_left: u8,
    failures_left: u8,
    opens_left: u8,
    crashed: bool,
}

fn bit(v: u8) -> u16 {
    1u16 << (v & 15)
}

type Check = Result<(), String>;

impl State {
    fn new(cfg: &Config) -> Self {
        let m0 = Map {
            open: true,
            eof: PAGES as u8,
            ..Map::default()
        };
        Self {
            disk: [0; PAGES],
            pc: [0; PAGES],
            pc_dirty: [false; PAGES],
            size: PAGES as u8,
            maps: [m0, Map::default()],
            klease: KLease::Held,
            leased: true,
            unleased: false,
            brk: None,
            brk_again: false,
            brk_start: [None; PAGES],
            brk_failed: [false; PAGES],
            brk_wp: [false; PAGES],
            brk_kept: [false; PAGES],
            deadline: false,
            timed_out_in_break: false,
            conflicted: [false; PAGES],
            p6: None,
            opener: None,
            ext_open: false,
            hseq: Seq::default(),
            kseq: Seq::default(),
            unhanded: 0,
            floor: [0; PAGES],
            next_version: 1,
            writes_left: cfg.writes,
            ext_left: cfg.external_ops,
            failures_left: cfg.failures,
            opens_left: if cfg.second == Second::None {
                0
            } else {
                cfg.second_opens
            },
            crashed: false,
        }
    }

    fn fresh(&mut self) -> u8 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    /// Mappings that report errors: a descriptor of their own, Shared or ReadOnly (§8).
    fn reports(cfg: &Config, m: usize) -> bool {
        matches!(cfg.mode(m), Second::Shared | Second::ReadOnly)
    }

    /// Whether nobody else has the file open: a write lease can be taken. A fork child shares
    /// mapping 0's open file description.
    fn file_free(&self, cfg: &Config) -> bool {
        !self.ext_open
            && self.opener.is_none()
            && !(self.maps[1].open && cfg.second != Second::ForkChild)
    }

    fn record_pwrite_error(&mut self, cfg: &Config) {
        self.failures_left -= 1;
        self.hseq.record();
        for m in 0..2 {
            if self.maps[m].open && Self::reports(cfg, m) {
                self.maps[m].owed_h = true;
            }
        }
    }

    fn record_kernel_error(&mut self, cfg: &Config) {
        self.failures_left -= 1;
        self.kseq.record();
        for m in 0..2 {
            if self.maps[m].open && Self::reports(cfg, m) {
                self.maps[m].owed_k = true;
            }
        }
    }

    /// `pwrite` of mapping `m`'s dirty page `p` (every writeback path ends here,
    /// `mm/exec.rs::write_back`). A failure keeps the page dirty and records the error.
    fn pwrite(&mut self, cfg: &Config, m: usize, p: usize, fail: bool) -> bool {
        if m == 0 {
            // Refused, not failed: no error recorded, the page stays dirty and cached.
            if self.conflicted[p] {
                return false;
            }
            if self.brk.is_some() && self.deadline && !cfg.mutated(FileMutant::NoDeadline) {
                self.conflicted[p] = true;
                // Kept by this break (P5, P7), whoever's writeback it refused.
                self.brk_failed[p] = true;
                self.brk_kept[p] = true;
                return false;
            }
        }
        if fail {
            self.record_pwrite_error(cfg);
            return false;
        }
        let v = self.maps[m].pages[p].val;
        if m == 0 && self.timed_out_in_break && self.p6.is_none() {
            self.p6 = Some(p as u8);
        }
        self.handed(p, v);
        self.pc_dirty[p] = true;
        // A pwrite past the end of file extends it (§11.2's race without a lease).
        self.size = self.size.max(p as u8 + 1);
        let map = &mut self.maps[m];
        map.pages[p].dirty = false;
        map.unsynced[p] = Some(v);
        true
    }

    /// Page `p` of the page cache takes `v`, handed over by a mapping or written by another
    /// process. What a crash may leave is the last synced value *or any value handed over
    /// since* (§5.4): two writers' versions need not grow in hand-over order (the last writer
    /// wins between independent caches, §2.11), so the promise drops to `v` if `v` is older.
    fn handed(&mut self, p: usize, v: u8) {
        self.pc[p] = v;
        self.pc_dirty[p] = true;
        self.floor[p] = self.floor[p].min(v);
    }

    /// `Invalidate { Discard }` of page `p` of mapping 0: written back first if dirty; a page
    /// whose writeback fails stays, dirty.
    fn discard(&mut self, cfg: &Config, p: usize, fail: bool) -> bool {
        let slot = self.maps[0].pages[p];
        if slot.cached && slot.dirty && !self.pwrite(cfg, 0, p, fail) {
            return false;
        }
        self.maps[0].pages[p] = Slot::default();
        true
    }

    /// A kernel writeback error reported to mapping `m`: the pages it wrote since its last
    /// good `fdatasync` are dirty again where it still caches them (`Runtime::redirty`); the
    /// others cannot be (§8), and leave the promise.
    fn redirty(&mut self, cfg: &Config, m: usize) -> bool {
        let mut any = false;
        for p in 0..PAGES {
            if self.maps[m].unsynced[p].is_some() {
                if self.maps[m].pages[p].cached {
                    if !cfg.mutated(FileMutant::NoRedirty) {
                        self.maps[m].pages[p].dirty = true;
                        any = true;
                    }
                } else {
                    self.maps[m].unsynced[p] = None;
                }
            }
        }
        any
    }

    /// The opener waiting on the break proceeds: its open returns.
    fn proceed(&mut self, cfg: &Config) {
        match self.opener.take() {
            Some(Opener::External) => self.ext_open = true,
            Some(Opener::Second) => self.open_second(cfg),
            None => {}
        }
    }

    fn open_second(&mut self, cfg: &Config) {
        let hcur = if cfg.mutated(FileMutant::ErrseqSamplesAtOpen) {
            self.hseq.seq
        } else {
            self.hseq.sample()
        };
        let reports = Self::reports(cfg, 1);
        self.maps[1] = Map {
            open: true,
            eof: self.size,
            hcur,
            kcur: self.kseq.sample(),
            owed_h: reports && self.hseq.seq > 0 && !self.hseq.seen,
            owed_k: reports && self.kseq.seq > 0 && !self.kseq.seen,
            ..Map::default()
        };
    }

    /// Another open (or truncate) of the file: breaks a held lease and waits, or proceeds.
    fn open_by(&mut self, cfg: &Config, who: Opener) {
        self.opener = Some(who);
        match self.klease {
            KLease::Held => {
                self.klease = KLease::Breaking;
                self.signal_break();
            }
            KLease::Breaking => {}
            KLease::None => self.proceed(cfg),
        }
    }

    /// The lease signal reaches the lease thread, which runs `broken` (or will, after the
    /// break it is serving).
    fn signal_break(&mut self) {
        for p in 0..PAGES {
            let s = self.maps[0].pages[p];
            self.brk_start[p] = (s.cached && s.dirty).then_some(s.val);
        }
        self.brk_failed = [false; PAGES];
        if self.brk.is_some() {
            self.brk_again = true;
        } else {
            self.start_break();
        }
    }

    fn start_break(&mut self) {
        // `broken`: from here on pages may be cached without the lease.
        self.unleased = true;
        self.brk = Some(0);
        self.brk_wp = [false; PAGES];
        self.brk_kept = [false; PAGES];
        self.deadline = false;
        self.timed_out_in_break = false;
    }

    /// The break's release: `leased` false, `F_UNLCK` of whatever lease mapping 0 holds now.
    fn release(&mut self, cfg: &Config) -> Check {
        self.leased = false;
        for p in 0..PAGES {
            let slot = self.maps[0].pages[p];
            // Kept by the break: still dirty, or written back since by the application's own
            // flush (after it resolved the page's conflict for its copy).
            if slot.cached && !(self.brk_kept[p] || self.conflicted[p]) {
                return Err(format!(
                    "P7: the break releases but mapping 0 caches page {p} ({}), neither failed \
                     nor conflicted: cached again behind the break's discard",
                    if slot.dirty { "dirty" } else { "clean" }
                ));
            }
        }
        self.deadline = false;
        self.timed_out_in_break = false;
        self.brk_wp = [false; PAGES];
        self.brk_kept = [false; PAGES];
        match self.klease {
            KLease::Breaking => {
                for p in 0..PAGES {
                    if let Some(v) = self.brk_start[p] {
                        if self.pc[p] < v && !self.brk_failed[p] && (p as u8) < self.size {
                            return Err(format!(
                                "P5: the opener proceeds but page {p} holds {} in the page cache, \
                                 older than the version {v} dirty at the break",
                                self.pc[p]
                            ));
                        }
                    }
                }
                self.klease = KLease::None;
                self.proceed(cfg);
                // Ghosts of a break served: forgotten, so they do not split states.
                self.brk_start = [None; PAGES];
                self.brk_failed = [false; PAGES];
            }
            KLease::Held => self.klease = KLease::None,
            KLease::None => {}
        }
        Ok(())
    }

    /// The invariants checked in every state.
    fn check(&self) -> Check {
        if let Some(p) = self.p6 {
            return Err(format!(
                "P6: mapping 0 hands page {p} over after the kernel let the opener in, before \
                 the break's release"
            ));
        }
        for p in 0..PAGES {
            if self.unhanded & (bit(self.pc[p]) | bit(self.disk[p])) != 0 {
                return Err(format!(
                    "P2: page {p} holds {} (page cache) / {} (disk), a value never handed over",
                    self.pc[p], self.disk[p]
                ));
            }
        }
        if matches!(self.klease, KLease::Held | KLease::Breaking) {
            for p in 0..PAGES {
                let s = self.maps[0].pages[p];
                if s.cached && !s.dirty && s.val != self.pc[p] {
                    return Err(format!(
                        "P4: the lease is held but mapping 0's clean page {p} holds {}, the page \
                         cache {}",
                        s.val, self.pc[p]
                    ));
                }
            }
        }
        Ok(())
    }
}

fn moves(cfg: &Config, s: &State) -> Vec<Move> {
    let mut v = Vec::new();
    if s.crashed {
        return v;
    }
    let fail_opts: &[bool] = if s.failures_left > 0 {
        &[false, true]
    } else {
        &[false]
    };
    for m in 0..2 {
        let map = &s.maps[m];
        if !map.open {
            continue;
        }
        let mode = cfg.mode(m);
        let mu = m as u8;
        // The break gate: while a break of mapping 0 runs, its faults wait. A store goes
        // through only to a page mapped writable (dirty) that the break has not yet
        // write-protected for its writeback.
        let gated = m == 0 && s.brk.is_some() && !cfg.mutated(FileMutant::NoGate);
        for p in 0..PAGES {
            let slot = map.pages[p];
            // A fork child's snapshot faults nothing from the file in this model.
            if !slot.cached
                && mode != Second::ForkChild
                && p < map.eof as usize
                && p < s.size as usize
                && !gated
            {
                v.push(Move::Read(mu, p as u8));
            }
            let held = gated && (!slot.dirty || s.brk_wp[p]);
            if slot.cached && s.writes_left > 0 && mode != Second::ReadOnly && !held {
                v.push(Move::Write(mu, p as u8));
            }
        }
        if mode != Second::ForkChild {
            v.push(Move::Check(mu, false));
            // Only a retake's drop writes anything back.
            let drops = m == 0 && !s.leased && map.pages.iter().any(|p| p.cached && p.dirty);
            if drops && s.failures_left > 0 {
                v.push(Move::Check(mu, true));
            }
        }
        match map.op {
            None => {
                let writes_back = mode == Second::Shared
                    || (matches!(mode, Second::Private | Second::ForkChild)
                        && cfg.mutated(FileMutant::PrivateWritesBack));
                if writes_back || mode == Second::ReadOnly {
                    v.push(Move::Begin(mu, false));
                }
                if mode == Second::Shared {
                    v.push(Move::Begin(mu, true));
                }
            }
            Some(op) if (op.next as usize) < PAGES => {
                let slot = map.pages[op.next as usize];
                if slot.cached && slot.dirty {
                    for &f in fail_opts {
                        v.push(Move::FlushPage(mu, f));
                    }
                } else {
                    v.push(Move::FlushPage(mu, false));
                }
            }
            Some(op) => {
                v.push(Move::Finish(mu, false));
                if op.sync && s.failures_left > 0 && s.pc_dirty.iter().any(|&d| d) {
                    v.push(Move::Finish(mu, true));
                }
            }
        }
    }
    let m1 = &s.maps[1];
    if !m1.open && s.opens_left > 0 && s.opener.is_none() {
        v.push(Move::Open);
    }
    if m1.open
        && m1.op.is_none()
        && !m1
            .pages
            .iter()
            .any(|p| p.cached && p.dirty && cfg.second == Second::Shared)
    {
        v.push(Move::Close);
    }
    if !s.ext_open && s.opener.is_none() && s.ext_left > 0 {
        v.push(Move::ExtOpen);
    }
    if s.ext_open {
        v.push(Move::ExtClose);
        if s.ext_left > 0 {
            for p in 0..s.size {
                v.push(Move::ExtWrite(p));
                v.push(Move::ExtPunch(p));
            }
            if s.size == 2 {
                v.push(Move::ExtTruncateDown);
                v.push(Move::ExtCollapse);
            }
        }
        if s.size < 2 && s.ext_left > 0 {
            v.push(Move::ExtTruncateUp);
        }
    }
    for p in 0..PAGES {
        if s.pc_dirty[p] {
            for &f in fail_opts {
                v.push(Move::KernelWriteback(p as u8, f));
            }
        }
    }
    // The deadline of a break being served comes before the kernel's timeout (the margin).
    if s.klease == KLease::Breaking && (s.brk.is_none() || s.deadline) {
        v.push(Move::Timeout);
    }
    if s.brk.is_some() && !s.deadline {
        v.push(Move::Deadline);
    }
    for p in 0..PAGES {
        if s.conflicted[p] {
            v.push(Move::Resolve(p as u8, true));
            v.push(Move::Resolve(p as u8, false));
        }
    }
    if let Some(step) = s.brk {
        let writes = break_page(cfg, step).is_some_and(|(_, p)| {
            let slot = s.maps[0].pages[p];
            slot.cached && slot.dirty
        });
        v.push(Move::BreakStep(false));
        if writes && s.failures_left > 0 {
            v.push(Move::BreakStep(true));
        }
    }
    if cfg.crash {
        v.push(Move::Crash);
    }
    v
}

/// What step `step` of `broken` does: `Some((discard, page))`, or `None` for the release.
/// The runtime's order: `flush_region` (every page), then `Invalidate { Discard }` of every
/// block, then `lease::release`.
fn break_page(cfg: &Config, step: u8) -> Option<(bool, usize)> {
    let step = if cfg.mutated(FileMutant::ReleaseBeforeWriteback) {
        // Release first, then the rest.
        if step == 0 {
            return None;
        }
        step - 1
    } else {
        step
    };
    let p = step as usize;
    match p {
        p if p < PAGES => Some((false, p)),
        p if p < 2 * PAGES => Some((true, p - PAGES)),
        _ => None,
    }
}

fn apply(cfg: &Config, s: &mut State, mv: Move, cov: &mut Coverage) -> Check {
    match mv {
        Move::Read(m, p) => {
            let (m, p) = (m as usize, p as usize);
            s.maps[m].pages[p] = Slot {
                cached: true,
                dirty: false,
                val: s.pc[p],
            };
        }
        Move::Write(m, p) => {
            let v = s.fresh();
            s.writes_left -= 1;
            if matches!(cfg.mode(m as usize), Second::Private | Second::ForkChild) {
                s.unhanded |= bit(v);
            }
            let slot = &mut s.maps[m as usize].pages[p as usize];
            slot.val = v;
            slot.dirty = true;
        }
        Move::Check(m, fail) => {
            let m = m as usize;
            if m == 0 {
                // `check_eof`'s lease part: a lease breaking or taken back counts as lost at
                // once; one not held is taken back if the file is free.
                if s.leased && s.klease != KLease::Held {
                    s.unleased = true;
                    s.leased = false;
                } else if !s.leased {
                    let may = s.klease == KLease::None
                        && s.file_free(cfg)
                        && (cfg.retake_during_break || s.brk.is_none());
                    if may {
                        s.klease = KLease::Held;
                        if s.unleased {
                            s.unleased = false;
                            if !cfg.mutated(FileMutant::RetakeKeepsStale) {
                                cov.retakes_with_drop += 1;
                                let mut fail = fail;
                                for p in 0..PAGES {
                                    let dirty = s.maps[0].pages[p].dirty;
                                    s.discard(cfg, p, fail && dirty);
                                    fail &= !dirty;
                                }
                            }
                        }
                        s.leased = true;
                    } else {
                        s.unleased = true;
                    }
                }
            }
            // The size check: pages past a new end are dropped, dirty or not (Truncate).
            let map = &mut s.maps[m];
            if s.size < map.eof {
                for p in s.size as usize..PAGES {
                    map.pages[p] = Slot::default();
                    // Its data is discarded (§7: writes past a new end succeed and are lost):
                    // a sync in progress promises nothing for it, even if the file grows back.
                    if let Some(op) = &mut map.op {
                        op.dirty_at_start[p] = None;
                    }
                    map.unsynced[p] = None;
                }
            }
            map.eof = s.size;
        }
        Move::Begin(m, sync) => {
            let map = &mut s.maps[m as usize];
            let dirty_at_start = map
                .pages
                .map(|slot| (slot.cached && slot.dirty).then_some(slot.val));
            map.op = Some(Op {
                sync,
                next: 0,
                dirty_at_start,
                failed: false,
            });
        }
        Move::FlushPage(m, fail) => {
            let m = m as usize;
            let Some(mut op) = s.maps[m].op else {
                return Err("model: no flush in progress".into());
            };
            let p = op.next as usize;
            let slot = s.maps[m].pages[p];
            if slot.cached && slot.dirty && !s.pwrite(cfg, m, p, fail) {
                op.failed = true;
            }
            op.next += 1;
            s.maps[m].op = Some(op);
        }
        Move::Finish(m, fdatasync_fails) => finish(cfg, s, m as usize, fdatasync_fails, cov)?,
        Move::Open => {
            s.opens_left -= 1;
            if cfg.second == Second::ForkChild {
                // fork: a private snapshot of mapping 0's cache; the child's descriptor is the
                // parent's open file description, which breaks nothing.
                s.maps[1] = Map {
                    open: true,
                    pages: s.maps[0].pages,
                    eof: s.maps[0].eof,
                    ..Map::default()
                };
            } else {
                s.open_by(cfg, Opener::Second);
            }
        }
        Move::Close => s.maps[1] = Map::default(),
        Move::ExtOpen => s.open_by(cfg, Opener::External),
        Move::ExtClose => s.ext_open = false,
        Move::ExtWrite(p) | Move::ExtPunch(p) => {
            let p = p as usize;
            s.ext_left -= 1;
            let v = s.fresh();
            s.handed(p, v);
        }
        Move::ExtTruncateDown => {
            s.ext_left -= 1;
            let v = s.fresh();
            s.size = 1;
            // The page past the end reads as zeros if the file grows back.
            s.pc[1] = v;
            s.pc_dirty[1] = true;
            // The page is gone: nothing promised for it holds (the on-disk size is abstracted
            // away, so the disk's old value there does not count).
            s.floor[1] = 0;
        }
        Move::ExtTruncateUp => {
            s.ext_left -= 1;
            s.size = 2;
        }
        Move::ExtCollapse => {
            s.ext_left -= 1;
            let v = s.fresh();
            let moved = s.pc[1];
            s.handed(0, moved);
            s.handed(1, v);
            s.pc_dirty = [true; PAGES];
            s.size = 1;
            // The data of every offset moved: what was promised for an offset is void.
            s.floor = [0; PAGES];
            for map in &mut s.maps {
                map.void = true;
                if let Some(op) = &mut map.op {
                    op.dirty_at_start = [None; PAGES];
                }
            }
        }
        Move::KernelWriteback(p, fail) => {
            let p = p as usize;
            s.pc_dirty[p] = false;
            if fail {
                // Linux marks the page clean and keeps its data; the disk keeps the old value.
                s.record_kernel_error(cfg);
            } else {
                s.disk[p] = s.pc[p];
            }
        }
        Move::Deadline => s.deadline = true,
        Move::Resolve(p, mine) => {
            let p = p as usize;
            s.conflicted[p] = false;
            if !mine {
                // The file's copy wins: ours is dropped unwritten, and a sync in progress
                // promises nothing for it (the application chose so, as a truncation does).
                s.maps[0].pages[p] = Slot::default();
                s.maps[0].unsynced[p] = None;
                if let Some(op) = &mut s.maps[0].op {
                    op.dirty_at_start[p] = None;
                }
                // Nor does a break in progress owe it to the opener (P5).
                s.brk_start[p] = None;
            }
        }
        Move::Timeout => {
            cov.timeouts += 1;
            if s.brk.is_some() {
                s.timed_out_in_break = true;
            }
            s.klease = KLease::None;
            s.proceed(cfg);
            // No opener waits any more: P5 has nothing left to check for this break.
            s.brk_start = [None; PAGES];
            s.brk_failed = [false; PAGES];
        }
        Move::BreakStep(fail) => {
            let Some(step) = s.brk else {
                return Err("model: no break in progress".into());
            };
            match break_page(cfg, step) {
                Some((false, p)) => {
                    let slot = s.maps[0].pages[p];
                    s.brk_wp[p] = true;
                    let was = s.conflicted[p];
                    if slot.cached && slot.dirty && !s.pwrite(cfg, 0, p, fail) {
                        s.brk_failed[p] = true;
                        s.brk_kept[p] = true;
                    }
                    if s.conflicted[p] && !was {
                        cov.conflicts += 1;
                    }
                    s.brk = Some(step + 1);
                }
                Some((true, p)) => {
                    if !s.discard(cfg, p, fail) {
                        s.brk_failed[p] = true;
                        s.brk_kept[p] = true;
                    }
                    s.brk = Some(step + 1);
                }
                None => {
                    if s.klease == KLease::Breaking {
                        cov.breaks_served += 1;
                    }
                    s.release(cfg)?;
                    if cfg.mutated(FileMutant::ReleaseBeforeWriteback) && step == 0 {
                        s.brk = Some(1);
                    } else if s.brk_again {
                        s.brk_again = false;
                        s.start_break();
                    } else {
                        s.brk = None;
                    }
                }
            }
            if cfg.mutated(FileMutant::ReleaseBeforeWriteback) && s.brk == Some(2 * PAGES as u8 + 1)
            {
                s.brk = if s.brk_again {
                    s.brk_again = false;
                    s.unleased = true;
                    Some(0)
                } else {
                    None
                };
            }
        }
        Move::Crash => {
            cov.crashes += 1;
            s.crashed = true;
            // The page cache is lost; the disk is what remains.
            for p in 0..PAGES {
                if (p as u8) < s.size && s.disk[p] < s.floor[p] {
                    return Err(format!(
                        "P2: after the crash page {p} holds {} on the disk, older than {} which a \
                         sync that returned Ok promised",
                        s.disk[p], s.floor[p]
                    ));
                }
            }
            s.pc = s.disk;
            s.pc_dirty = [false; PAGES];
            s.maps = [Map::default(); 2];
            s.conflicted = [false; PAGES];
        }
    }
    s.check()
}

/// The end of a `flush` or `sync` of mapping `m` (`FileMapping::flush`, `sync`).
fn finish(
    cfg: &Config,
    s: &mut State,
    m: usize,
    fdatasync_fails: bool,
    cov: &mut Coverage,
) -> Check {
    let Some(op) = s.maps[m].op.take() else {
        return Err("model: no flush in progress".into());
    };
    if !State::reports(cfg, m) {
        // A Private mapping reports nothing (the mutant's writeback already happened).
        return Ok(());
    }
    // flush(): hetmem's error sequence, then (with no other error) the kernel's, through
    // sync_file_range.
    let mut err = op.failed;
    let mut hcur = s.maps[m].hcur;
    let h = s.hseq.check(&mut hcur);
    s.maps[m].hcur = hcur;
    if h {
        s.maps[m].owed_h = false;
        err = true;
    } else if s.maps[m].owed_h {
        return Err(format!(
            "P3: mapping {m}'s {} returns without a pwrite error it was owed (seen rule)",
            if op.sync { "sync" } else { "flush" }
        ));
    }
    let kernel_check = |s: &mut State, cov: &mut Coverage| -> Result<bool, String> {
        let mut kcur = s.maps[m].kcur;
        let k = s.kseq.check(&mut kcur);
        s.maps[m].kcur = kcur;
        if k {
            s.maps[m].owed_k = false;
            if s.redirty(cfg, m) {
                cov.redirtied += 1;
            }
            Ok(true)
        } else if s.maps[m].owed_k {
            Err(format!(
                "P3: mapping {m}'s {} returns without a kernel writeback error it was owed",
                if op.sync { "sync" } else { "flush" }
            ))
        } else {
            Ok(false)
        }
    };
    if !err && kernel_check(s, cov)? {
        err = true;
    }
    if !op.sync {
        if err {
            cov.errors_reported += 1;
        }
        return Ok(());
    }
    // sync(): fdatasync even if the flush failed.
    if !cfg.mutated(FileMutant::SyncSkipsFdatasync) {
        let mut fail = fdatasync_fails;
        for p in 0..PAGES {
            if s.pc_dirty[p] {
                s.pc_dirty[p] = false;
                if fail {
                    fail = false;
                    s.record_kernel_error(cfg);
                } else {
                    s.disk[p] = s.pc[p];
                }
            }
        }
        if kernel_check(s, cov)? {
            err = true;
        } else {
            // fdatasync succeeded: `unsynced` is cleared; if sync returns Ok, what it had
            // handed over is promised (P2).
            let map = &mut s.maps[m];
            if !err && !map.void {
                for p in 0..PAGES {
                    if let (Some(v), true) = (map.unsynced[p], (p as u8) < s.size) {
                        s.floor[p] = s.floor[p].max(v);
                    }
                }
            }
            map.unsynced = [None; PAGES];
            map.void = false;
        }
    }
    if err {
        cov.errors_reported += 1;
        return Ok(());
    }
    cov.good_syncs += 1;
    for p in 0..PAGES {
        if let Some(v) = op.dirty_at_start[p] {
            // At least that version, or what the file holds now: another mapping's later
            // hand-over of an older version supersedes ours (last writer wins, §2.11).
            if (p as u8) < s.size && s.disk[p] < v && s.disk[p] != s.pc[p] {
                return Err(format!(
                    "P1: sync returned Ok but page {p}, dirty at version {v} at the call, holds {} \
                     on the disk",
                    s.disk[p]
                ));
            }
        }
    }
    Ok(())
}

fn fingerprint(s: &State) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0x5eed_u32.hash(&mut b);
    s.hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// Explores every reachable state of `cfg`, breadth first, so a counterexample is a shortest
/// one.
pub fn explore(cfg: &Config) -> Report {
    let init = State::new(cfg);
    let mut report = Report {
        states: 1,
        transitions: 0,
        max_depth: 0,
        truncated: false,
        coverage: Coverage::default(),
        counterexample: None,
    };
    let mut seen = HashSet::new();
    seen.insert(fingerprint(&init));
    // Parent links for the trace: (parent index, move).
    let mut links: Vec<(u32, Move)> = vec![(u32::MAX, Move::Crash)];
    let mut queue: VecDeque<(State, u32, usize)> = VecDeque::from([(init, 0, 0)]);
    let trace = |links: &Vec<(u32, Move)>, mut at: u32, last: Move| {
        let mut t = vec![last];
        while at != 0 {
            let (parent, mv) = links[at as usize];
            t.push(mv);
            at = parent;
        }
        t.reverse();
        t
    };
    while let Some((state, idx, depth)) = queue.pop_front() {
        report.max_depth = report.max_depth.max(depth);
        for mv in moves(cfg, &state) {
            let mut s = state.clone();
            report.transitions += 1;
            if let Err(what) = apply(cfg, &mut s, mv, &mut report.coverage) {
                report.counterexample = Some((what, trace(&links, idx, mv)));
                return report;
            }
            // A crashed world ends there: it was checked, and is not kept.
            if s.crashed || !seen.insert(fingerprint(&s)) {
                continue;
            }
            report.states += 1;
            if report.states >= cfg.max_states {
                report.truncated = true;
                return report;
            }
            let Ok(at) = u32::try_from(links.len()) else {
                report.truncated = true;
                return report;
            };
            links.push((idx, mv));
            queue.push_back((s, at, depth + 1));
        }
    }
    report
}
