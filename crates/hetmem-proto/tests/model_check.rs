//! Exhaustive model checking of small worlds (docs/protocol.md §7). Each test prints the number of
//! states it explored; run with `--nocapture` to see them.

use hetmem_proto::model::explore::{explore, private_and_coherent, Config, Moves, Report};
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
    let cfg = Config {
        topology: private_and_coherent(),
        layout: layout(&[1]),
        pages: 2,
        capacity: vec![1, 1],
        max_outstanding: 2,
        max_writes: 2,
        max_failures: 1,
        moves: Moves {
            migrate: true,
            evict: true,
            flush: true,
            ..Moves::default()
        },
        max_states: 20_000_000,
    };
    run("anon+file", cfg);
}
