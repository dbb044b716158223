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
set -euo pipefail
if [ $# -eq 0 ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$("$root/sim/build.sh")
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
