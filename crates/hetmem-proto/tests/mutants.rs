//! The checker must be able to fail: each deliberate protocol bug must produce a counterexample.

use hetmem_proto::model::explore::{explore, private_and_coherent, Config, Moves};
use hetmem_proto::{Layout, Mutation, PageMask};

fn small(mutation: Mutation, file: bool) -> Config {
    let mut topology = private_and_coherent();
    topology.mutation = Some(mutation);
    let mut file_backed = PageMask::EMPTY;
    if file {
        file_backed.insert(0);
    }
    Config {
        topology,
        layout: Layout {
            managed: PageMask::FULL,
            file_backed,
            file_page: 0,
        },
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 1,
        max_writes: 2,
        max_failures: 0,
        moves: Moves {
            migrate: true,
            evict: true,
            flush: true,
            ..Moves::default()
        },
        max_states: 5_000_000,
    }
}

fn caught(mutation: Mutation, file: bool, expect: &str) {
    let report = explore(&small(mutation, file));
    let (violation, trace) = report
        .counterexample
        .unwrap_or_else(|| panic!("{mutation:?} was not caught in {} states", report.states));
    println!(
        "{mutation:?} caught after {} states: {}",
        report.states, violation.what
    );
    println!("counterexample ({} moves): {trace:?}", trace.len());
    assert!(
        violation.what.contains(expect),
        "{mutation:?}: unexpected violation {}",
        violation.what
    );
}

#[test]
fn cpu_mapping_private_device_memory_is_caught() {
    caught(Mutation::MapPrivateOnCpu, false, "CPU maps private");
}

#[test]
fn skipped_invalidation_is_caught() {
    caught(Mutation::SkipInvalidation, false, "while");
}

#[test]
fn dirty_page_dropped_on_eviction_is_caught() {
    caught(Mutation::DropDirtyOnEvict, true, "");
}

/// A growth that does not wait for the truncation's drop lets a stale (dirty) copy of the page
/// count as the file's again.
#[test]
fn extend_before_the_truncation_is_over_is_caught() {
    let mut cfg = small(Mutation::ExtendAtOnce, true);
    cfg.layout.file_backed = PageMask::FULL;
    cfg.max_outstanding = 2;
    cfg.moves = Moves {
        flush: true,
        truncate: true,
        extend: true,
        ..Moves::default()
    };
    let report = explore(&cfg);
    let (violation, trace) = report
        .counterexample
        .unwrap_or_else(|| panic!("ExtendAtOnce was not caught in {} states", report.states));
    println!(
        "ExtendAtOnce caught after {} states: {}",
        report.states, violation.what
    );
    println!("counterexample ({} moves): {trace:?}", trace.len());
}
