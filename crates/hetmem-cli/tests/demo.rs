//! The demo verifies itself against a CPU-only run; these run it small, with the device pass as
//! closure kernels and as launches with declared ranges (`--launch`, as on a GPU), and check it
//! says so. (`scripts/fake-cuda-check.sh` runs `--device cuda` against the fake driver.)

use std::process::Command;

fn demo(extra: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args([
            "demo",
            "--size-mib",
            "8",
            "--device-mib",
            "4",
            "--iters",
            "2",
        ])
        .args(extra)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

#[test]
fn the_demo_verifies_with_closure_kernels_and_with_declared_launches() -> anyhow::Result<()> {
    let closure = demo(&[])?;
    assert!(closure.contains("verified: OK"), "{closure}");
    let launched = demo(&["--launch", "--in-flight", "2"])?;
    assert!(launched.contains("verified: OK"), "{launched}");
    assert!(
        launched.contains("one launch per 2 MiB block, 2 in flight"),
        "{launched}"
    );
    // The same result either way: the final checksum is printed by both.
    let sum = |t: &str| t.rsplit("final checksum ").next().map(str::to_owned);
    assert_eq!(sum(&closure), sum(&launched));
    Ok(())
}
