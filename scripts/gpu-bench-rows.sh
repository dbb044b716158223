#!/usr/bin/env bash
# The comparison rows on a GPU host: `qlora-rs bench --device cuda` at the shapes the Python
# stack (PyTorch + PEFT + bitsandbytes, Unsloth, torchtune) is measured at — SmolLM2-135M, Llama-3
# 1B and 8B, sequence lengths 2048 to 32768, LoRA rank 16 on all seven projections — one line of
# output per figure, into $OUT/bench-rows.log (or .gpu/out/). Run from the project root after
# scripts/gpu-bundle.sh, which puts the binary in .gpu/bin/. Rows run smallest first, each under its own time limit,
# so a short device lease still gets the small rows; llama3-8b spends about a minute quantizing
# its random weights on the host before the first step.
#
# Usage: bash scripts/gpu-bench-rows.sh [quick|all]   (quick: smollm2-135m and llama3-8b 1×2048)
set -uo pipefail
bin=${QLORA_BIN:-.gpu/bin/qlora-rs}
out=${OUT:-.gpu/out}
mkdir -p "$out"
log="$out/bench-rows.log"
rows_quick=("smollm2-135m 1 2048" "llama3-8b 1 2048")
rows_all=("smollm2-135m 1 2048" "llama3-1b 4 2048" "llama3-8b 1 2048" "llama3-8b 2 2048"
  "llama3-8b 1 8192" "llama3-8b 1 32768")
if [ "${1:-quick}" = all ]; then rows=("${rows_all[@]}"); else rows=("${rows_quick[@]}"); fi
status=0
for row in "${rows[@]}"; do
  read -r shape batch seq <<<"$row"
  echo "== $shape $batch x $seq" | tee -a "$log"
  timeout 300 "$bin" bench --device cuda --shape "$shape" --batch "$batch" --seq-len "$seq" \
    --steps 3 --rank 16 --targets all 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "   (exit $rc)" | tee -a "$log"; status=1; }
done
exit $status
