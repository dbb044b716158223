#!/usr/bin/env bash
# A Python virtual environment with llama.cpp's own runtime and quantizer (llama-cpp-python,
# built here from its PyPI source package) and gguf-py, for the GGUF export checks
# (scripts/check-gguf-export.sh, tests/fixtures/make_gguf_fixtures.py).
#
#   scripts/llama-cpp-venv.sh            prints LLAMA_CPP_VENV=<dir> as its last line
#
# QLORA_LLAMA_VENV (default .llama-venv/) is where it lives; it is built once (about 10 minutes
# on two cores) and reused while the pinned versions and flags below match. ggml's reference
# quantizers (ggml-quants.c, in libggml-base) are compiled without any CPU-specific flags, so the
# bytes they write do not depend on the CPU that built them. The CPU backend that runs the model
# is built for AVX2 + FMA (x86-64-v3), not for the build machine: on a Xeon that reports AMX
# inside a VM, the native build's AMX path crashes on quantized models.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${QLORA_LLAMA_VENV:-$root/.llama-venv}
pins="llama-cpp-python==0.3.36 gguf==0.19.0 numpy"
cmake_args="-DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
stamp="$venv/.qlora-pins"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins $cmake_args" ]; then
  echo "LLAMA_CPP_VENV=$venv"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
echo "building llama-cpp-python from source; this takes a while" >&2
CMAKE_ARGS="$cmake_args" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$venv/bin/pip" install --quiet --no-cache-dir --no-binary llama-cpp-python $pins
echo "$pins $cmake_args" > "$stamp"
echo "LLAMA_CPP_VENV=$venv"
