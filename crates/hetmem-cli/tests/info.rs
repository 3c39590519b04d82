//! `hetmem info --json` says what this machine gives: checked against what the test finds
//! itself (the kernel's release, whether a context can be made and with which features, whether
//! the CUDA driver loads).

use std::process::Command;

#[test]
fn info_reports_what_the_machine_has() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["info", "--json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    assert_eq!(v["kernel"], release.trim());
    assert_eq!(
        v["cpus"],
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    assert_eq!(v["service_threads"], hetmem::default_service_threads());
    match hetmem::Hetmem::builder().service_threads(1).build() {
        Ok(h) => {
            assert_eq!(v["userfaultfd"]["usable"], true);
            let want: Vec<&str> = h.uffd_features();
            let got: Vec<&str> = v["userfaultfd"]["features"]
                .as_array()
                .expect("features")
                .iter()
                .filter_map(|f| f.as_str())
                .collect();
            assert_eq!(got, want);
            assert_eq!(v["userfaultfd"]["kernel_faults"], h.serves_kernel_faults());
        }
        Err(e) => {
            assert_eq!(v["userfaultfd"]["usable"], false);
            assert_eq!(v["userfaultfd"]["error"], e.to_string());
        }
    }
    let driver = hetmem_cuda::driver().is_ok();
    assert_eq!(v["cuda"]["driver"], driver);
    if !driver {
        assert!(v["cuda"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("libcuda")));
        assert_eq!(v["cuda"]["devices"].as_array().map(Vec::len), Some(0));
    }
    Ok(())
}
