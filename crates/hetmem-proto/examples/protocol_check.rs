//! The main job until the runtime lands: model-check the protocol on the standard small world and
//! run a random differential test, printing what was explored.
//!
//! `cargo run --release -p hetmem-proto --example protocol_check [SEED] [STEPS]`

use hetmem_proto::model::explore::{anon_and_file, explore};
use hetmem_proto::model::random::{run, RandomConfig};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let seed = args.next().and_then(Result::ok).unwrap_or(0x5eed_2026);
    let steps = args.next().and_then(Result::ok).unwrap_or(2_000_000);

    let cfg = anon_and_file();
    let t = std::time::Instant::now();
    let r = explore(&cfg);
    println!(
        "model check (CPU + private + coherent device, 1 anonymous + 1 file page, capacity 1, \
         1 injected failure): {} states, {} transitions in {:.1?}",
        r.states,
        r.transitions,
        t.elapsed()
    );
    match r.counterexample {
        Some((v, trace)) => {
            println!("VIOLATION: {}\n{trace:#?}", v.what);
            std::process::exit(1);
        }
        None => println!("0 violations"),
    }

    let t = std::time::Instant::now();
    match run(&RandomConfig {
        seed,
        steps,
        ..RandomConfig::default()
    }) {
        Ok(rep) => println!("differential seed {seed}: {rep:?} in {:.1?}", t.elapsed()),
        Err(f) => {
            println!(
                "differential seed {seed} FAILED at step {}: {}",
                f.step, f.violation.what
            );
            std::process::exit(1);
        }
    }
}
