#!/usr/bin/env bash
# One training step of qlora-rs on the CPU beside the same step in PyTorch + PEFT + bitsandbytes
# (scripts/cpu_peer_bench.py), on the same model folder, one after the other on this machine.
#
#   scripts/cpu-peer-bench.sh [MODEL_DIR]     (default: the demo's SmolLM2-135M-Instruct)
#
# SEQ_LEN (512) and STEPS (3) set the step; QLORA_PEER_VENV (.peer-venv/) is where PyTorch,
# transformers, PEFT and bitsandbytes are installed from PyPI on first use (a few GB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seq=${SEQ_LEN:-512}
steps=${STEPS:-3}
model=${1:-$root/.demo/smollm2-135m-instruct}
if [ ! -f "$model/config.json" ]; then
  assets_line=$(scripts/fetch-demo-assets.sh | tail -n 1)
  assets=${assets_line#QLORA_DEMO_ASSETS=}
  cargo build --release --quiet
  "${CARGO_TARGET_DIR:-$root/target}/release/qlora-rs" import-gguf "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --output "$model"
fi
bin=${CARGO_TARGET_DIR:-$root/target}/release/qlora-rs
venv=${QLORA_PEER_VENV:-$root/.peer-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.15.0 transformers==5.24.0 peft==0.21.2 \
    bitsandbytes==0.50.2 accelerate safetensors
fi
cargo build --release --quiet
echo "== qlora-rs (NF4 base, LoRA r 16 on all seven projections, per-layer recomputation, AdamW, f32)"
/usr/bin/time -f "  process     %P CPU time over wall time (the whole process, loading included)" \
  "$bin" bench --device cpu --model "$model" --seq-len "$seq" --steps "$steps" 2>&1 |
  grep -E "bench:|step time|cpu/wall|peak memory|process"
echo "== PyTorch + PEFT + bitsandbytes (the same step)"
/usr/bin/time -f "  process     %P CPU time over wall time (the whole process, loading included)" \
  "$venv/bin/python" scripts/cpu_peer_bench.py "$model" "$seq" "$steps" 2>&1 |
  grep -E "peer:|step time|cpu/wall|process"
