#!/usr/bin/env bash
# Trains a short run on each tiny model family in tests/fixtures/llama/ with the release binary,
# then loads the adapter it wrote into transformers + PEFT (scripts/check_peft_adapter.py) and
# compares PEFT's mean loss on the data with `qlora-rs eval --base dense` (both on the dense
# base): they must agree within 1e-4 relative. Shows that what we write is what PEFT loads, for
# every family.
#
#   scripts/check-peft-adapter.sh [FAMILY...]     (default: every tiny-* model with a golden)
#
# Makes .peft-venv/ (torch CPU, transformers 5.24.0, peft 0.21.2) on first use, unless
# PEFT_PYTHON names a Python that has them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PEFT_PYTHON:-}
if [ -z "$python" ]; then
  venv="$root/.peft-venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
      || "$venv/bin/pip" install -q torch
    "$venv/bin/pip" install -q transformers==5.24.0 peft==0.21.2 safetensors
  fi
  python="$venv/bin/python"
fi
bin="${CARGO_TARGET_DIR:-$root/target}/release/qlora-rs"
[ -x "$bin" ] || cargo build --release --quiet
families=("$@")
if [ ${#families[@]} -eq 0 ]; then
  for g in tests/fixtures/llama/tiny-*-golden.safetensors; do
    f=$(basename "$g" -golden.safetensors)
    families+=("$f")
  done
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=tests/fixtures/data/text.jsonl
status=0
for f in "${families[@]}"; do
  model=tests/fixtures/llama/$f
  out=$work/$f
  "$bin" train --device cpu --model "$model" --data "$data" --output "$out" \
    --max-steps 4 --lr 1e-2 --rank 4 --alpha 8 --seq-len 64 --eval-split 0 >"$work/$f.log" 2>&1 \
    || { echo "$f: training failed:"; tail -5 "$work/$f.log"; status=1; continue; }
  ours=$("$bin" eval --device cpu --model "$model" --adapter "$out" --data "$data" \
    --format text --base dense --seq-len 64 --json)
  peft=$("$python" scripts/check_peft_adapter.py "$model" "$out" "$data")
  python3 - "$f" "$ours" "$peft" <<'EOF' || status=1
import json, sys
name, ours, peft = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
a, b = ours["loss"], peft["loss"]
rel = abs(a - b) / abs(b)
ok = rel <= 1e-4 and ours.get("tokens", peft["tokens"]) == peft["tokens"]
print(f"{name}: qlora-rs {a:.6f}, PEFT {b:.6f} ({peft['tokens']} tokens): relative {rel:.1e} {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
EOF
done
exit $status
