//! `hetmem bench --device cuda`: without a CUDA driver a clean, typed error and exit status 1
//! (no panic); with one (here: the fake driver `scripts/fake-cuda-check.sh` puts on the loader
//! path) every row prints with figures, the JSON report and the plot are written, and the report says the
//! figures are the fake's. Also `--plot --from`, which needs no driver.

use std::path::PathBuf;
use std::process::Command;

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("hetmem-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create a scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every row id the bench prints, in order (7: fault throughput with 1, 2, 4 threads at least).
const IDS: [&str; 19] = [
    "1a", "1b", "2a", "2b", "3a", "3b", "3c", "3d", "4a", "4b", "4c", "5 ", "6 ", "7-j1", "7-j2",
    "7-j4", "8a", "8b", "8c",
];

#[test]
fn bench_cuda_errors_cleanly_without_a_driver_and_prints_every_row_with_one() -> anyhow::Result<()>
{
    let dir = Scratch::new("bench-cuda");
    let json = dir.0.join("r.json");
    let svg = dir.0.join("r.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args([
            "bench",
            "--device",
            "cuda",
            "--gpu-mib",
            "16",
            "--device-mib",
            "4",
            "--runs",
            "1",
            "--launches",
            "50",
            "--fault-pages",
            "512",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if hetmem_cuda::driver().is_err() {
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stderr.contains("hetmem: open CUDA device 0") && stderr.contains("libcuda"),
            "{stderr}"
        );
        assert!(!json.exists() && !svg.exists());
        eprintln!("no CUDA driver: checked the clean error only");
        return Ok(());
    }
    assert!(out.status.success(), "{stdout}{stderr}");
    for id in IDS {
        assert!(
            stdout.lines().any(|l| l.starts_with(id)),
            "row {id:?} missing:\n{stdout}"
        );
    }
    // Row 5's reference figure is printed as such, never as a measurement.
    assert!(
        stdout.contains("row 5 reference, not measured here") && stdout.contains("0.08 M"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report["complete"], true);
    let rows = report["rows"].as_array().expect("rows");
    assert!(rows.len() >= IDS.len());
    let fake = report["device"].as_str().unwrap_or("").contains("Fake");
    assert_eq!(report["fake_driver"], fake);
    if fake {
        // The fake's figures must never pass for a GPU's.
        assert!(report["warning"]
            .as_str()
            .unwrap_or("")
            .contains("no figure here is a GPU measurement"));
        assert!(stdout.contains("no figure here is a GPU measurement"));
    }
    // Every row has figures from its one run (the kernels' sums were checked in the bench).
    for r in rows {
        assert!(r["not_built"].is_null(), "{r}");
        assert_eq!(r["hetmem_samples"].as_array().map(Vec::len), Some(1), "{r}");
        assert!(r["ratio"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    // Row 5: remote touches against migrate-on-demand, in touches per second.
    let r5 = rows
        .iter()
        .find(|r| r["id"] == "5")
        .expect("row 5 in the report");
    assert_eq!(r5["unit"], "k touches/s", "{r5}");
    assert_eq!(r5["against"], "migrate", "{r5}");
    assert!(
        r5["name"].as_str().unwrap_or("").contains("Remote")
            && r5["baseline_name"]
                .as_str()
                .unwrap_or("")
                .contains("reference, not measured here"),
        "{r5}"
    );
    let chart = std::fs::read_to_string(&svg)?;
    assert!(chart.starts_with("<svg") && !chart.contains("not built"));
    assert_eq!(chart.contains("no figure here is a GPU measurement"), fake);
    Ok(())
}

#[test]
fn a_saved_report_plots_without_a_driver() -> anyhow::Result<()> {
    let dir = Scratch::new("bench-plot");
    let json = dir.0.join("saved.json");
    let html = dir.0.join("saved.html");
    std::fs::write(
        &json,
        r#"{"tool": "hetmem bench --device cuda", "subtitle": "NVIDIA H200, saved",
            "rows": [
              {"id": "1a", "name": "first access", "unit": "GB/s", "hetmem": 40.0,
               "baseline": 50.0, "ratio": 0.8, "target": {"kind": "at_least", "value": 0.8},
               "pass": true, "baseline_name": "pinned copy", "against": "pinned",
               "hetmem_samples": [40.0], "baseline_samples": [50.0]},
              {"id": "6", "name": "launch overhead", "unit": "us", "hetmem": 15.0,
               "baseline": 10.0, "ratio": 1.5, "target": {"kind": "at_most_above", "value": 10.0},
               "pass": true, "baseline_name": "plain launch",
               "hetmem_samples": [15.0], "baseline_samples": [10.0]},
              {"id": "5", "name": "random touches", "unit": "", "hetmem": 0.0, "baseline": null,
               "ratio": null, "target": {"kind": "at_least", "value": 100.0}, "pass": null,
               "baseline_name": "", "hetmem_samples": [], "baseline_samples": [],
               "not_built": "remote placement is not built"}
            ]}"#,
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["bench", "--plot"])
        .arg(&html)
        .arg("--from")
        .arg(&json)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html)?;
    assert!(page.starts_with("<!doctype html>") && page.contains("<svg"));
    assert!(page.contains("NVIDIA H200, saved"));
    assert!(page.contains("0.80×") && page.contains("0.67×"));
    assert!(page.contains("not built: remote placement"));
    Ok(())
}
