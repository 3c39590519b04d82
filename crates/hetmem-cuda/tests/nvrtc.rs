//! NVRTC without a GPU: the shipped kernels compile, and the committed PTX is what NVRTC 13.0
//! makes of them. Without NVRTC each test prints `skipped: <test>: <why>` and passes, unless
//! `HETMEM_REQUIRE_CUDA=1`.
//!
//! To run it on a machine without CUDA: `pip install --target DIR nvidia-cuda-nvrtc==13.0.88`
//! and `LD_LIBRARY_PATH=DIR/nvidia/cu13/lib cargo test -p hetmem-cuda --test nvrtc`.

use std::io::Write;

use hetmem_cuda::kernels::{self, names};
use hetmem_cuda::{nvrtc, Error};

fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) => {
            let required = std::env::var("HETMEM_REQUIRE_CUDA").is_ok_and(|v| v == "1");
            assert!(!required, "{test}: HETMEM_REQUIRE_CUDA=1, but {e}");
            let _ = writeln!(std::io::stderr(), "skipped: {test}: {e}");
            false
        }
    }
}

/// The PTX without its comment header (which names the compiler build).
fn body(ptx: &str) -> String {
    ptx.lines()
        .filter(|l| !l.starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_kernels_compile_and_match_the_committed_ptx() {
    if !nvrtc_or_skip("shipped_kernels_compile_and_match_the_committed_ptx") {
        return;
    }
    let version = nvrtc::version().unwrap();
    let ptx = nvrtc::compile_ptx(kernels::SOURCE, kernels::PTX_ARCH).unwrap();
    for n in names::ALL {
        assert!(ptx.contains(&format!(".entry {n}(")), "{n} missing");
    }
    if version == (13, 0) {
        assert_eq!(
            body(&ptx),
            body(kernels::PTX),
            "kernels.ptx is stale: run scripts/gen-ptx.sh"
        );
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "  note: NVRTC {version:?}, not 13.0: PTX compared by entries only"
        );
    }
    let cubin = nvrtc::compile_cubin(kernels::SOURCE, (9, 0)).unwrap();
    assert!(cubin.starts_with(b"\x7fELF"), "a CUBIN is an ELF image");
}

#[test]
fn compile_errors_carry_the_log() {
    if !nvrtc_or_skip("compile_errors_carry_the_log") {
        return;
    }
    match nvrtc::compile_ptx(
        "extern \"C\" __global__ void k() { undeclared = 1; }",
        (9, 0),
    ) {
        Err(Error::Compile { log }) => assert!(log.contains("undeclared"), "{log}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
    let bad = nvrtc::compile(
        "",
        "x.cu",
        nvrtc::Target::Ptx { compute: (9, 0) },
        &["--no-such-option"],
    );
    assert!(
        matches!(bad, Err(Error::Nvrtc { .. }) | Err(Error::Compile { .. })),
        "{bad:?}"
    );
}
