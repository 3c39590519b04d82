#!/usr/bin/env bash
# Runs hetmem-cuda's GPU tests, the CudaBackend tests and the probe against a fake libcuda (tests/fake-cuda/fakecuda.c)
# on a machine without a GPU. It checks the Rust side's logic, not CUDA: see the C file's header.
# Needs a C compiler. NVRTC is used where the loader finds it (else the NVRTC test skips).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# Named libcuda.so, not libcuda.so.1: cudarc tries the former first, while NVRTC looks for the
# latter itself and would crash calling driver entry points the fake lacks.
cc -O2 -shared -fPIC -Wall -Werror -o "$dir/libcuda.so" crates/hetmem-cuda/tests/fake-cuda/fakecuda.c
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test -p hetmem-cuda --test gpu -- --nocapture
cargo test -p hetmem-cuda --test backend -- --nocapture
cargo test -p hetmem-cuda --test hmm_gpu -- --nocapture
cargo run -q -p hetmem-cuda --example probe > "$dir/probe.out"
grep -q '"sums_ok":true' "$dir/probe.out" || { cat "$dir/probe.out"; exit 1; }
cargo run -q -p hetmem-cli -- info > "$dir/info.out"
grep -q '^  cuda:0: Fake GPU' "$dir/info.out" || { cat "$dir/info.out"; exit 1; }
# The demo on the "GPU": launches per block over a grid 4 times the cap, anonymous and file-backed.
cargo run -q -p hetmem-cli -- demo --device cuda --size-mib 16 --device-mib 4 --iters 2 > "$dir/demo.out"
grep -q '^verified: OK' "$dir/demo.out" || { cat "$dir/demo.out"; exit 1; }
cargo run -q -p hetmem-cli -- demo --device cuda --size-mib 16 --device-mib 4 --iters 2 --file "$dir/grid" > "$dir/demo-file.out"
grep -q '^verified: OK' "$dir/demo-file.out" || { cat "$dir/demo-file.out"; exit 1; }
echo "fake-cuda-check: the GPU tests, the backend tests, the hmm ports and stress test, the probe, hetmem info and the CUDA demo ran against the fake driver"
