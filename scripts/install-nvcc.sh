#!/usr/bin/env bash
# Installs CUDA 13.0's nvcc from PyPI into a local folder (default: .cuda-nvcc/ in the project root)
# where no nvcc exists, and prints the NVCC=... line to use.
#
#   scripts/install-nvcc.sh [DIR]      then:  export NVCC=<the printed path>
#
# Why these five wheels: nvcc alone cannot compile anything; it needs crt (host headers), nvvm
# (cicc), runtime (cuda_runtime.h) and cccl (cuda/std headers). The -cu12 wheels ship no nvcc.
# Pinned to 13.0: nvcc 13.2+ writes PTX ISA 9.2, which the 580 driver cannot load.
# nvcc must be called by its real path (it finds its headers relative to itself), so the printed
# path is resolved with realpath.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.cuda-nvcc}

find_nvcc() {
  local d
  d=$(find "$dest" -path '*/nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n 1)
  [ -n "$d" ] && realpath "$d"
}

nvcc=$(find_nvcc || true)
if [ -z "$nvcc" ]; then
  python3 -m venv "$dest" >&2
  "$dest/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
  nvcc=$(find_nvcc || true)
  if [ -z "$nvcc" ]; then
    echo "install-nvcc: pip finished but no nvidia/cu13/bin/nvcc under $dest" >&2
    exit 1
  fi
fi
"$nvcc" --version >&2
echo "NVCC=$nvcc"
