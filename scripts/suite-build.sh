#!/usr/bin/env bash
# Builds, here, the runtime's test binaries for a run on a bigger machine (the GPU machine has 16
# cores and no Rust toolchain): the test profile (debug assertions on, optimised), stripped, in
# gpu-bin/suite/ (git-ignored). scripts/suite-run.sh runs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bin/suite
log=$(cargo test -p hetmem --tests --no-run 2>&1) || { echo "$log"; exit 1; }
rm -rf "$out"
mkdir -p "$out"
while IFS='|' read -r what path; do
  case "$what" in
    tests/architecture.rs) continue ;; # reads the source tree, which stays here
    tests/*.rs) strip -o "$out/$(basename "$what" .rs)" "$path" ;;
  esac
done < <(printf '%s\n' "$log" | sed -n 's/^ *Executable \(.*\) (\(.*\))$/\1|\2/p')
git rev-parse --short HEAD > "$out/BUILD.txt"
du -sh "$out"
