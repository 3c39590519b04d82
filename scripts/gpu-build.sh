#!/usr/bin/env bash
# Builds, on a machine without a GPU, what scripts/gpu-check.sh runs on the GPU machine: the
# hetmem-cuda test binaries (the CudaBackend's included), the probe and the hetmem command, in release mode, stripped, in gpu-bin/ (git-ignored).
# Carry gpu-bin to the GPU machine; it needs no Rust toolchain there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bin
log=$(cargo test --release -p hetmem-cuda --no-run 2>&1) || { echo "$log"; exit 1; }
cargo build --release -q -p hetmem-cuda --examples
cargo build --release -q -p hetmem-cli
rm -f "$out"/{hetmem-cuda-unit,gpu-tests,backend-tests,hmm_gpu-tests,nvrtc-tests,probe,hetmem,BUILD.txt}
mkdir -p "$out"
# cargo names each test binary: "Executable tests/gpu.rs (target/release/deps/gpu-0123abcd)".
while IFS='|' read -r what path; do
  case "$what" in
    "unittests src/lib.rs") name=hetmem-cuda-unit ;;
    tests/*.rs) name="$(basename "$what" .rs)-tests" ;;
    *) continue ;;
  esac
  strip -o "$out/$name" "$path"
done < <(printf '%s\n' "$log" | sed -n 's/^ *Executable \(.*\) (\(.*\))$/\1|\2/p')
strip -o "$out/probe" target/release/examples/probe
strip -o "$out/hetmem" target/release/hetmem
for b in hetmem-cuda-unit gpu-tests backend-tests hmm_gpu-tests nvrtc-tests probe hetmem; do
  [ -x "$out/$b" ] || { echo "gpu-build: $out/$b is missing" >&2; exit 1; }
done
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  rustc --version
} > "$out/BUILD.txt"
total=$(du -cb "$out"/* | tail -1 | cut -f1)
ls -l "$out"
echo "gpu-bin: $((total / 1024)) KiB in all"
if (( total > 48 * 1024 * 1024 )); then
  echo "gpu-build: gpu-bin is over 48 MiB; the device run carries at most 64 MiB" >&2
  exit 1
fi
