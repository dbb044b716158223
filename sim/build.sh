#!/usr/bin/env bash
# Builds the simulated GPU into target/sim/ (or $QLORA_SIM_DIR) and prints its directory.
#
#   sim/build.sh              the stand-in driver library, target/sim/libcuda.so.1
#   sim/build.sh selftest     also builds and runs the simulator's own tests (sim/tests)
#
# QLORA_SIM_KERNELS=DIR compiles the kernel sources in DIR instead of kernels/ (the mutation
# check, sim/mutation_check.py, builds mutated copies that way).
#
# Needs clang++ 19 (Debian's clang-19: installed here with apt-get when missing and running as
# root) and the CUDA headers for bf16/f16 (from scripts/install-nvcc.sh, or $NVCC/$CUDA_HOME).
# Incremental: only what changed is rebuilt (make).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${QLORA_SIM_DIR:-$root/target/sim}
cxx=${QLORA_SIM_CXX:-clang++-19}

if ! command -v "$cxx" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "sim: installing clang-19 (Debian package) for the simulated GPU" >&2
    (apt-get install -y -qq clang-19 || { apt-get update -qq && apt-get install -y -qq clang-19; }) >&2
  else
    echo "sim: $cxx not found; install Debian's clang-19 (apt-get install clang-19) or set QLORA_SIM_CXX" >&2
    exit 1
  fi
fi

cuda_inc=""
for cand in ${CUDA_HOME:+$CUDA_HOME/include} ${NVCC:+$(dirname "$(dirname "$NVCC")")/include} \
  "$root"/.cuda-nvcc/lib/python3*/site-packages/nvidia/cu13/include; do
  [ -f "$cand/cuda_bf16.h" ] && cuda_inc=$cand && break
done
if [ -z "$cuda_inc" ]; then
  nvcc_line=$("$root/scripts/install-nvcc.sh" | tail -n 1)
  cuda_inc=$(dirname "$(dirname "${nvcc_line#NVCC=}")")/include
fi
[ -f "$cuda_inc/cuda_bf16.h" ] || { echo "sim: no cuda_bf16.h under $cuda_inc" >&2; exit 1; }

mkdir -p "$out"
make --no-print-directory -s -C "$root/sim" -j"$(nproc)" OUT="$out" CXX_SIM="$cxx" CUDA_INC="$cuda_inc" \
  KDIR="${QLORA_SIM_KERNELS:-$root/kernels}" "$@" >&2
echo "$out"
