#!/usr/bin/env bash
# On a GPU host, from the project root with the bundle of scripts/gpu-bundle.sh in .gpu/: every
# bundled test with QLORA_REQUIRE_GPU=1 (a GPU test may not skip), then the criterion benches.
# Logs (the card, tests.log, benches.log) go to $OUT, or .gpu/out/, with docs/kernel-report.md
# (each kernel's ceilings on H100/H200/RTX 4090 from ptxas and the simulator's counts, made
# without a GPU by scripts/kernel-report.sh) to read the timings against. Exit status: non-zero
# when a test failed.
#
#   bash .gpu/run.sh [tests|benches|all] [filter]
set -uo pipefail
what=${1:-all}
filter=${2:-}
out=${OUT:-.gpu/out}
mkdir -p "$out"
export QLORA_REQUIRE_GPU=1 RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
failed=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  for exe in .gpu/bin/test-*; do
    [ -x "$exe" ] || continue
    echo "== $exe"
    "$exe" $filter --test-threads=4 2>&1 | tee -a "$out/tests.log" |
      grep -E "^test result|FAILED|panicked|SKIPPED" || true
    [ "${PIPESTATUS[0]}" = 0 ] || failed=1
  done
fi
if [ "$what" = benches ] || [ "$what" = all ]; then
  for exe in .gpu/bin/bench-*; do
    [ -x "$exe" ] || continue
    echo "== $exe"
    "$exe" --bench $filter --warm-up-time 0.5 --measurement-time 2 --noplot 2>&1 |
      tee -a "$out/benches.log" |
      grep -vE "^\s*$|Warming|Collecting|Analyzing|Benchmarking|Gnuplot|outliers|^\s+[0-9]+ \(" || true
  done
fi
if [ -f docs/kernel-report.md ]; then cp docs/kernel-report.md "$out/"; fi
if [ "$failed" = 0 ]; then echo "GPU run: the tests passed"; else echo "GPU run: SOME TESTS FAILED"; fi
exit $failed
