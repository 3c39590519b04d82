#!/usr/bin/env bash
# Runs the test binaries scripts/suite-build.sh made, on this machine's cores: every binary at
# once (each with --test-threads=2), then random_api as $FUZZ_PROCS parallel long runs of
# $FUZZ_SECS seconds, each from its own seed. Logs go to $OUT (or /tmp/hetmem-suite); prints one
# line per binary and exits non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
bin=${SUITE_BIN:-gpu-bin/suite}
out=${OUT:-/tmp/hetmem-suite}/suite
mkdir -p "$out"
fuzz_procs=${FUZZ_PROCS:-$(($(nproc) / 2))}
fuzz_secs=${FUZZ_SECS:-120}
echo "== suite $(cat "$bin/BUILD.txt" 2>/dev/null) on $(nproc) CPUs, kernel $(uname -r)"
pids=()
names=()
for t in "$bin"/*; do
  n=$(basename "$t")
  case "$n" in BUILD.txt | random_api) continue ;; esac
  (cd /tmp && timeout -k 5 300 "$OLDPWD/$t" --test-threads=2 >"$out/$n.log" 2>&1) &
  pids+=($!)
  names+=("$n")
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  line=$(grep -E '^test result' "$out/${names[$i]}.log" | tail -1)
  if ((rc != 0)); then failed=$((failed + 1)); fi
  echo "${names[$i]}: rc $rc ${line}"
done
fpids=()
for i in $(seq 1 "$fuzz_procs"); do
  (cd /tmp && HETMEM_FUZZ_SECS=$fuzz_secs HETMEM_FUZZ_KEEP_GOING=1 HETMEM_FUZZ_SEED=$((i << 40)) \
    timeout -k 5 $((fuzz_secs + 120)) "$OLDPWD/$bin/random_api" --nocapture >"$out/fuzz-$i.log" 2>&1) &
  fpids+=($!)
done
seeds=0
for i in "${!fpids[@]}"; do
  wait "${fpids[$i]}"
  rc=$?
  n=$(grep -c 'steps in' "$out/fuzz-$((i + 1)).log")
  seeds=$((seeds + n))
  if ((rc != 0)); then failed=$((failed + 1)); fi
  echo "random_api #$((i + 1)): rc $rc, $n seeds"
done
echo "suite: $seeds fuzz seeds; $failed failed"
exit $((failed > 0))
