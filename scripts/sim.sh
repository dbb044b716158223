#!/usr/bin/env bash
# Runs a command against the simulated GPU: the real kernels/*.cu compiled for the host, threads
# as fibers, checked like compute-sanitizer, behind a stand-in for the NVIDIA driver library
# that the unchanged Rust code loads. Builds the simulator first when needed (sim/build.sh).
#
#   scripts/sim.sh cargo test --release
#   scripts/sim.sh target/release/qlora-rs train --device cuda ...
#
# It proves results, never speed. Settings:
#   QLORA_SIM_SCHEDULE  the order threads resume after each barrier and blocks run in: forward,
#                       reverse, random, rotate (default: each launch the next of the three), or
#                       all (every launch under all three from the same memory; results must agree)
#   QLORA_SIM_SEED      seed of the random schedule (printed with every finding)
#   QLORA_SIM_FAULT_ABORT=1  abort at the first finding (to stop a debugger there)
#   QLORA_SIM_MODE      check (default: everything runs and is checked) or account (launches
#                       checked but not run, allocations counted but never touched: the device
#                       memory of shapes the host could not execute, e.g. bench --shape llama3-8b)
#   QLORA_SIM_PEAK_DUMP=1  at exit, the live buffers at the peak (sizes and counts)
#   QLORA_SIM_DYNAMIC_SMEM_DEFAULT  dynamic shared memory a kernel may use without opting in
#                       (bytes; default 48 KiB as on every card; 0 proves every launcher opts in)
#   QLORA_SIM_PROFILE=FILE  count per kernel MMAs, ldmatrix, shared-memory bank conflicts, global
#                       sectors and compulsory bytes; appended to FILE at exit (docs/simulator.md;
#                       scripts/kernel-report.sh makes docs/kernel-report.md from it)
set -euo pipefail
if [ $# -eq 0 ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$("$root/sim/build.sh")
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
