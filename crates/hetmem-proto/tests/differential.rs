//! Randomized differential test against a last-value oracle (docs/protocol.md §7).
//! `HETMEM_SEED` and `HETMEM_STEPS` override the fixed CI seed and length for long runs.

use hetmem_proto::model::random::{run, RandomConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_events_match_the_oracle() {
    let cfg = RandomConfig {
        seed: env_u64("HETMEM_SEED").unwrap_or(0x5eed_2026),
        steps: env_u64("HETMEM_STEPS").unwrap_or(2_000_000),
        trace: std::env::var_os("HETMEM_TRACE").is_some(),
        ..RandomConfig::default()
    };
    let started = std::time::Instant::now();
    let report = run(&cfg).unwrap_or_else(|f| {
        panic!(
            "seed {} failed at step {}: {}\n{}",
            cfg.seed,
            f.step,
            f.violation.what,
            f.log.join("\n")
        )
    });
    println!(
        "differential seed {:#x}: {} events over {} blocks x {} pages, 3 devices, in {:.1?}: {report:?}",
        cfg.seed,
        report.events,
        cfg.blocks,
        cfg.pages,
        started.elapsed()
    );
    assert_eq!(report.mismatches, 0);
    // The run must have exercised the paths it claims to.
    assert!(report.reads > cfg.steps / 20, "too few reads: {report:?}");
    assert!(report.writes > cfg.steps / 20, "too few writes: {report:?}");
    assert!(
        report.failures > 0 && report.request_errors > 0,
        "{report:?}"
    );
}

#[test]
fn a_second_seed_with_tight_capacity() {
    let cfg = RandomConfig {
        seed: env_u64("HETMEM_SEED2").unwrap_or(7),
        steps: 300_000,
        capacity: 3,
        pages: 40,
        blocks: 3,
        ..RandomConfig::default()
    };
    let report =
        run(&cfg).unwrap_or_else(|f| panic!("failed at step {}: {}", f.step, f.violation.what));
    println!("differential tight capacity: {report:?}");
    assert_eq!(report.mismatches, 0);
}
