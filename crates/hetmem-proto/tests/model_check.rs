//! Exhaustive model checking of small worlds (docs/protocol.md §7). Each test prints the number of
//! states it explored; run with `--nocapture` to see them.

use hetmem_proto::model::explore::{
    anon_and_file, explore, private_and_coherent, Config, Moves, Report,
};
use hetmem_proto::{Layout, PageMask};

fn layout(file_pages: &[usize]) -> Layout<1> {
    let mut file = PageMask::EMPTY;
    for &p in file_pages {
        file.insert(p);
    }
    Layout {
        managed: PageMask::FULL,
        file_backed: file,
        file_page: 100,
    }
}

fn max_states() -> u64 {
    std::env::var("HETMEM_MC_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000_000)
}

fn run(name: &str, cfg: Config) -> Report {
    let r = explore(&cfg);
    println!(
        "model-check {name}: {} states, {} transitions, depth {}, truncated {}, violations {}",
        r.states,
        r.transitions,
        r.max_depth,
        r.truncated,
        usize::from(r.counterexample.is_some())
    );
    if let Some((v, trace)) = &r.counterexample {
        panic!("{name}: {}\ncounterexample:\n{trace:#?}", v.what);
    }
    assert!(!r.truncated, "{name}: state bound reached");
    r
}

#[test]
fn anonymous_and_file_faults_migrations_failures() {
    let mut cfg = anon_and_file();
    cfg.max_states = max_states();
    run("anon+file", cfg);
}

#[test]
fn file_pages_writeback_truncate_discard_unmap_protect() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[0, 1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 1,
        max_writes: 2,
        max_failures: 1,
        moves: Moves {
            flush: true,
            truncate: true,
            discard: true,
            unmap: true,
            protect: true,
            ..Moves::default()
        },
        max_states: std::env::var("HETMEM_MC_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000_000),
    };
    run("file lifecycle", cfg);
}

/// The file shrinks and grows back: truncation of the last page and `Invalidate { Extend }` at any
/// point after it (while its drop waits for a writeback or a fill, too), with flushes, writes and
/// failed writebacks around them. Two requests outstanding, so the growth can arrive while the
/// truncation's drop or a flush is still pending. After the growth the page holds what the file
/// grew with: a stale copy, or a stale dirty page written back over it, is a violation.
#[test]
fn file_shrinks_and_grows_back() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[0, 1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 2,
        max_writes: 2,
        max_failures: 1,
        moves: Moves {
            flush: true,
            truncate: true,
            extend: true,
            ..Moves::default()
        },
        max_states: max_states(),
    };
    let r = run("file growth", cfg);
    assert!(r.states > 1000, "the growth moves were explored");
}

/// The file's copy wins (`Invalidate { Revert }`, a conflict resolved for another process) at
/// any time: around writes, flushes (and failed writebacks), discards and device faults, with two
/// requests outstanding, so a revert can arrive while a flush's writeback or a fill is in flight.
/// After it completes the page must show the file's value: a stale copy left mapped or valid, or
/// a dirty page still written back over the file afterwards, is a violation.
#[test]
fn file_pages_revert_to_the_file() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[0, 1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 2,
        max_writes: 2,
        max_failures: 1,
        moves: Moves {
            flush: true,
            revert: true,
            discard: true,
            ..Moves::default()
        },
        max_states: max_states(),
    };
    let r = run("file revert", cfg);
    assert!(r.states > 1000, "the revert moves were explored");
}

#[test]
fn remote_maps_with_faults_migrations_evictions_discards() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 2,
        max_writes: 1,
        max_failures: 0,
        moves: Moves {
            remote_map: true,
            migrate: true,
            evict: true,
            discard: true,
            ..Moves::default()
        },
        max_states: std::env::var("HETMEM_MC_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000_000),
    };
    let r = run("remote maps", cfg);
    assert!(r.states > 1000, "the remote maps were explored");
}

#[test]
fn advice_and_atomics() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 1,
        max_writes: 1,
        max_failures: 0,
        moves: Moves {
            advise: true,
            atomics: true,
            ..Moves::default()
        },
        max_states: std::env::var("HETMEM_MC_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000_000),
    };
    run("advice+atomics", cfg);
}

#[test]
fn three_pages_one_request_at_a_time() {
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[2]),
        pages: 3,
        capacity: vec![1, 1],
        max_outstanding: 1,
        max_writes: 1,
        max_failures: 1,
        moves: Moves {
            evict: true,
            flush: true,
            release: true,
            ..Moves::default()
        },
        max_states: std::env::var("HETMEM_MC_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000_000),
    };
    run("3 pages", cfg);
}

/// Another process writes file pages, in the window a lease break opens: hetmem has written its
/// dirty copies back and dropped every cached one (Flush, then Discard). Later fills must see
/// the other process's version, and no later writeback may overwrite it.
fn external_writers(guarded: bool) -> Config {
    Config {
        topology: private_and_coherent(),
        layout: layout(&[0, 1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 1,
        max_writes: 3,
        max_failures: 1,
        moves: Moves {
            flush: true,
            discard: true,
            evict: true,
            external_writes: guarded,
            external_writes_unguarded: !guarded,
            ..Moves::default()
        },
        max_states: max_states(),
    }
}

#[test]
fn file_pages_with_external_writers_after_lease_breaks() {
    let r = run("external writers", external_writers(true));
    assert!(r.states > 1000, "too small a world: {} states", r.states);
}

/// The same world without the lease protocol: another process writes while hetmem still caches
/// the page. The checker must report the stale copy, or it could not catch a lease bug.
#[test]
fn external_writer_without_a_lease_is_caught() {
    let r = explore(&external_writers(false));
    let (violation, trace) = r
        .counterexample
        .expect("an external write under a cached copy must be caught");
    println!(
        "model-check external writer without lease: caught after {} states: {} ({} steps)",
        r.states,
        violation.what,
        trace.len()
    );
    assert!(
        violation.what.contains("valid") || violation.what.contains("clean"),
        "unexpected violation: {}",
        violation.what
    );
}
