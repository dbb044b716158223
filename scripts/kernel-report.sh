#!/usr/bin/env bash
# Writes the kernel report (default docs/kernel-report.md): every kernel's registers, spills,
# shared memory and occupancy from ptxas for sm_80, sm_89 and sm_90; the simulated GPU's counts
# (MMAs, shared-memory wavefronts and bank conflicts, global sectors) over the whole test suite
# run on the simulated GPU; each tensor-core kernel's main loop in SASS (instructions per
# iteration: the issue bound); and the roofline bounds those imply on H100, H200 and RTX 4090
# (scripts/kernel_report.py).
#
#   scripts/kernel-report.sh [OUT.md]
#
# Needs no GPU: ptxas runs through nvcc (scripts/install-nvcc.sh installs one; cuobjdump and
# nvdisasm, for the SASS, are added to its folder from PyPI on first use), the counts come from
# the simulator (scripts/sim.sh). On a 2-core host the ptxas part takes about 1 minute (3 archs ×
# 10 files, one nvcc at a time; attention.cu ~10 s and gemm.cu ~7 s per arch), the simulator part
# (the whole `cargo test --release` with the profile on) about 20 minutes. The figures are design
# figures (compiler output and simulated counts against spec-sheet peaks), not timings.
#
# Settings:
#   NVCC                 nvcc to use (default: the one scripts/install-nvcc.sh installs or finds)
#   QLORA_REPORT_TESTS   test-name filters for the simulator run (default: every test)
#   QLORA_REPORT_PROFILE use this simulator profile file instead of running the tests, and
#   QLORA_REPORT_PROFILE_COMMAND  the command that made it (shown in the report's header)
#   QLORA_REPORT_PTXAS   use this directory of sm_XX.txt ptxas outputs instead of compiling (then
#                        no SASS is read and the report has no issue bound)
set -euo pipefail
if [ $# -gt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/docs/kernel-report.md}
case $out in /*) ;; *) out=$PWD/$out ;; esac
for var in QLORA_REPORT_PROFILE QLORA_REPORT_PTXAS; do
  case ${!var:-} in /* | "") ;; *) printf -v "$var" '%s' "$PWD/${!var}" ;; esac
done
cd "$root"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -z "${NVCC:-}" ]; then
  line=$(scripts/install-nvcc.sh 2>/dev/null | tail -n 1)
  NVCC=${line#NVCC=}
fi
[ -x "$NVCC" ] || { echo "kernel-report: no nvcc at '$NVCC'" >&2; exit 1; }
nvcc_version=$("$NVCC" --version | grep release)
# cuobjdump and nvdisasm beside nvcc (the pip wheels put them in the same bin folder). PyPI has
# no 13.0 builds of them; 13.2 reads 13.0's cubins.
nvbin=$(dirname "$NVCC")
if [ ! -x "$nvbin/cuobjdump" ] || [ ! -x "$nvbin/nvdisasm" ]; then
  venv=$nvbin
  while [ "$venv" != / ] && [ ! -e "$venv/pyvenv.cfg" ]; do venv=$(dirname "$venv"); done
  [ -x "$venv/bin/pip" ] || { echo "kernel-report: no pip in a venv above $NVCC to add cuobjdump" >&2; exit 1; }
  echo "kernel-report: installing cuobjdump and nvdisasm into $venv ..." >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*" >&2
fi
archs=(80 89 90)
filters=${QLORA_REPORT_TESTS:-}

# 1. ptxas -v for every kernel file and arch (same flags as build.rs, which builds --fatbin), and
#    the cubin's SASS. A marker line before each file's ptxas output names the file for the report.
ptxas_dir=${QLORA_REPORT_PTXAS:-}
sass_dir=
if [ -z "$ptxas_dir" ]; then
  ptxas_dir=$tmp/ptxas
  sass_dir=$tmp/sass
  mkdir -p "$ptxas_dir" "$sass_dir"
  for a in "${archs[@]}"; do
    for f in kernels/*.cu; do
      [ "$f" = kernels/testing.cu ] && continue
      echo "ptxas sm_$a: $(basename "$f") ..." >&2
      echo "# kernel-report: file $f" >> "$ptxas_dir/sm_$a.txt"
      if ! "$NVCC" --cubin -O3 -std=c++17 -Xptxas -v -I kernels -arch="sm_$a" "$f" -o "$tmp/k.cubin" \
        >> "$ptxas_dir/sm_$a.txt" 2>&1; then
        tail -n 30 "$ptxas_dir/sm_$a.txt" >&2
        echo "kernel-report: nvcc failed on $f for sm_$a" >&2
        exit 1
      fi
      PATH="$nvbin:$PATH" "$nvbin/cuobjdump" -sass "$tmp/k.cubin" >> "$sass_dir/sm_$a.txt"
    done
  done
else
  echo "kernel-report: ptxas outputs from $ptxas_dir" >&2
fi

# 2. The GPU tests on the simulated GPU, which appends one profile line per kernel per process.
sim_command="QLORA_SIM_PROFILE=profile.tsv QLORA_REQUIRE_GPU=1 scripts/sim.sh"
sim_command+=" cargo test --release${filters:+ -- $filters}"
profile=${QLORA_REPORT_PROFILE:-}
if [ -z "$profile" ]; then
  profile=$tmp/profile.tsv
  read -ra filter_args <<< "$filters"
  echo "kernel-report: the tests on the simulator (about 20 minutes for all of them) ..." >&2
  if ! QLORA_SIM_PROFILE="$profile" QLORA_REQUIRE_GPU=1 scripts/sim.sh \
    cargo test --release ${filters:+--} "${filter_args[@]}" > "$tmp/sim.log" 2>&1; then
    tail -n 40 "$tmp/sim.log" >&2
    echo "kernel-report: the simulator run failed (log tail above)" >&2
    exit 1
  fi
  if [ ! -s "$profile" ]; then
    echo "kernel-report: the tests passed but the simulator wrote no profile" >&2
    exit 1
  fi
else
  [ -r "$profile" ] || { echo "kernel-report: cannot read profile $profile" >&2; exit 1; }
  sim_command=${QLORA_REPORT_PROFILE_COMMAND:-"# simulator profile given by QLORA_REPORT_PROFILE=$profile (not produced by this run)"}
  echo "kernel-report: simulator profile from $profile" >&2
fi

# 3. The report (the SASS reader checks itself first).
python3 scripts/sass_loops.py >&2
ptxas_command="for a in ${archs[*]}; do for f in kernels/*.cu; do [ \"\$f\" = kernels/testing.cu ]"
ptxas_command+=" || { nvcc --cubin -O3 -std=c++17 -Xptxas -v -I kernels -arch=sm_\$a \"\$f\""
ptxas_command+=" -o k.cubin && cuobjdump -sass k.cubin; }; done; done"
if [ -n "${QLORA_REPORT_PTXAS:-}" ]; then
  ptxas_command="# ptxas outputs given by QLORA_REPORT_PTXAS=$QLORA_REPORT_PTXAS ($ptxas_command)"
fi
mkdir -p "$(dirname "$out")"
python3 scripts/kernel_report.py --ptxas "$ptxas_dir" --profile "$profile" \
  ${sass_dir:+--sass "$sass_dir"} \
  --nvcc-version "$nvcc_version" \
  --command "scripts/kernel-report.sh${1:+ $1}" \
  --command "$ptxas_command" \
  --command "$sim_command" > "$tmp/report.md"
mv "$tmp/report.md" "$out"
echo "kernel-report: wrote $out" >&2
