//! Prints the PTX NVRTC makes of the shipped kernels (`kernels::SOURCE`, for
//! `kernels::PTX_ARCH`); `scripts/gen-ptx.sh` writes it to `src/kernels/kernels.ptx`.

use hetmem_cuda::{kernels, nvrtc};

fn main() {
    match nvrtc::compile_ptx(kernels::SOURCE, kernels::PTX_ARCH) {
        Ok(ptx) => print!("{ptx}"),
        Err(e) => {
            eprintln!("gen_ptx: {e}");
            std::process::exit(1);
        }
    }
}
