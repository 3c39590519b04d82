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
# The CUDA bench, small: every row must print with figures (row 5's random-touch sums checked
# against the CPU's), the JSON and the plot be written. Its figures are the fake's, not a GPU's:
# the bench says so itself.
cargo run -q -p hetmem-cli -- bench --device cuda --gpu-mib 16 --device-mib 4 --runs 1 --launches 100 \
  --json "$dir/bench-cuda.json" --plot "$dir/bench-cuda.svg" > "$dir/bench-cuda.out" 2> "$dir/bench-cuda.err" \
  || { cat "$dir/bench-cuda.out" "$dir/bench-cuda.err"; exit 1; }
for id in 1a 1b 2a 2b 3a 3b 3c 3d 4a 4b 4c '5 ' '6 ' 7-j1 8a 8b 8c; do
  grep -q "^$id" "$dir/bench-cuda.out" || { echo "bench row $id missing"; cat "$dir/bench-cuda.out"; exit 1; }
done
grep -q 'no figure here is a GPU measurement' "$dir/bench-cuda.out" || { cat "$dir/bench-cuda.out"; exit 1; }
grep -q '^5 random 4 KiB GPU touches.*k touches/s' "$dir/bench-cuda.out" || { echo "bench row 5 has no figures"; cat "$dir/bench-cuda.out"; exit 1; }
if grep -q 'not built\|not run' "$dir/bench-cuda.out"; then echo "a bench row was not built or not run"; cat "$dir/bench-cuda.out"; exit 1; fi
grep -q '"complete": true' "$dir/bench-cuda.json" || { cat "$dir/bench-cuda.json"; exit 1; }
grep -q '^<svg' "$dir/bench-cuda.svg" || { echo "no SVG"; exit 1; }
cargo test -q -p hetmem-cli --test bench_cuda
echo "fake-cuda-check: the GPU tests, the backend tests, the hmm ports and stress test, the probe, hetmem info, the CUDA demo and the CUDA bench ran against the fake driver"
