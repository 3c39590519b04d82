#!/usr/bin/env bash
# Runs the test binaries scripts/suite-build.sh made, on this machine's cores: every binary at
# once (each with --test-threads=2), then random_api as $FUZZ_PROCS parallel long runs of
# $FUZZ_SECS seconds, each from its own seed, with the operation classes $FUZZ_OPS (default
# `-huge`: parallel processes each asking for tens of GiB at once, which `huge` does on a big
# machine, race for the same free memory). Logs go to $OUT (or /tmp/hetmem-suite); prints one
# line per binary, the tail of each failing log, and exits non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
bin=${SUITE_BIN:-gpu-bin/suite}
out=${OUT:-/tmp/hetmem-suite}/suite
mkdir -p "$out"
fuzz_procs=${FUZZ_PROCS:-$(($(nproc) / 2))}
fuzz_secs=${FUZZ_SECS:-120}
fuzz_ops=${FUZZ_OPS:--huge}
test_secs=${TEST_SECS:-150}
echo "== suite $(cat "$bin/BUILD.txt" 2>/dev/null) on $(nproc) CPUs, kernel $(uname -r)"
pids=()
names=()
for t in "$bin"/*; do
  n=$(basename "$t")
  case "$n" in BUILD.txt | random_api) continue ;; esac
  (cd /tmp && timeout -k 5 "$test_secs" "$OLDPWD/$t" --test-threads=2 >"$out/$n.log" 2>&1) &
  pids+=($!)
  names+=("$n")
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  line=$(grep -E '^test result' "$out/${names[$i]}.log" | tail -1)
  echo "${names[$i]}: rc $rc ${line}"
  if ((rc != 0)); then
    failed=$((failed + 1))
    grep -E '^test .*\.\.\. *$|FAILED|panicked|Hung|hung' "$out/${names[$i]}.log" | tail -8
    tail -15 "$out/${names[$i]}.log"
  fi
done
fpids=()
for i in $(seq 1 "$fuzz_procs"); do
  (cd /tmp && HETMEM_FUZZ_SECS=$fuzz_secs HETMEM_FUZZ_KEEP_GOING=1 HETMEM_FUZZ_OPS=$fuzz_ops HETMEM_FUZZ_SEED=$((i << 40)) \
    timeout -k 5 $((fuzz_secs + 120)) "$OLDPWD/$bin/random_api" --nocapture >"$out/fuzz-$i.log" 2>&1) &
  fpids+=($!)
done
seeds=0
for i in "${!fpids[@]}"; do
  wait "${fpids[$i]}"
  rc=$?
  n=$(grep -c 'steps in' "$out/fuzz-$((i + 1)).log")
  seeds=$((seeds + n))
  echo "random_api #$((i + 1)): rc $rc, $n seeds"
  if ((rc != 0)); then
    failed=$((failed + 1))
    grep -E 'step [0-9]+:|panicked|failing seeds' "$out/fuzz-$((i + 1)).log" | tail -6 | cut -c1-300
  fi
done
echo "suite: $seeds fuzz seeds; $failed failed"
exit $((failed > 0))
