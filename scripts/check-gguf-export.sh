#!/usr/bin/env bash
# llama.cpp itself checks `qlora-rs export-gguf`: every export type of a model with a trained
# adapter is loaded by llama.cpp's runtime (llama-cpp-python, built by scripts/llama-cpp-venv.sh),
# its loss on a few texts is compared with ours on the merged model, its greedy answer to a chat
# prompt with ours, and llama.cpp's own quantizer, run on our f32 export, must write the same
# bytes as each of our quantized exports.
#
#   scripts/check-gguf-export.sh [MODEL_DIR ADAPTER_DIR]
#   scripts/check-gguf-export.sh --gemma
#   scripts/check-gguf-export.sh --phi3
#   scripts/check-gguf-export.sh --spm
#
# --gemma: llama.cpp's gemma2 and gemma3 on our exports of the tiny Gemma 2 / Gemma 3 fixtures
# (tests/fixtures/llama/tiny-gemma{2,3}, base and with their adapters, every type whose blocks
# tile the fixtures' rows), its loss on a token sequence against transformers' on the same
# weights (the file imported back by import-gguf) and on the original f32 model. transformers
# (torch, transformers >= 5, peft) comes from QLORA_TRANSFORMERS_PYTHON (default python3). The
# fixtures set query_pre_attn_scalar 20 against head_dim 24, which llama.cpp cannot represent
# (export-gguf refuses it): the check uses a copy with 24. Work goes to .gguf-check/gemma/.
#
# --phi3: the same check for llama.cpp's phi3 on tiny-phi3 (tests/fixtures/llama/tiny-phi3, fused
# qkv/gate_up, 18 of 24 dims rotated, longrope; base and with its adapter), in .gguf-check/phi3/.
# The copy checked has no sliding window (llama.cpp's phi3 attends to the whole context; the
# fixture's window of 11 is shorter than the text). The text is longer than the original context
# (32) and llama.cpp runs with a context of 128, so both sides use the long factors.
#
# --spm: llama.cpp's runtime on our exports (f32, bf16) of tiny Gemma 2 / Phi-3 models carrying
# the SentencePiece fixtures (tests/fixtures/spm): the tokenizer keys and the golden strings'
# tokens must equal those of llama.cpp's converter's files (tests/fixtures/gguf/spm-converter.json)
# and the model must run. Work goes to .gguf-check/spm/.
#
# Default: the demo's SmolLM2-135M-Instruct (imported from its GGUF) with the demo's adapter
# (.demo/adapter; trained here for a few steps on the CPU when absent). Work goes to .gguf-check/.
# Takes about 5 minutes on two cores once the llama.cpp venv exists (its first build: ~10 min).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release/qlora-rs"
if [ "${1:-}" = "--spm" ]; then
  venv_line=$(scripts/llama-cpp-venv.sh | tail -n 1)
  venv=${venv_line#LLAMA_CPP_VENV=}
  work="$root/.gguf-check/spm"
  rm -rf "$work"
  mkdir -p "$work"
  "$venv/bin/python" scripts/check_gguf_export.py spm-models "$work" "$root"
  for folder in tiny-gemma-2 tiny-phi-3-mini; do
    for t in f32 bf16; do
      "$bin" export-gguf --model "$work/$folder" --output "$work/$folder-$t.gguf" --type "$t" > /dev/null
    done
  done
  "$venv/bin/python" scripts/check_gguf_export.py spm "$work" "$root"
  exit 0
fi
if [ "${1:-}" = "--gemma" ] || [ "${1:-}" = "--phi3" ]; then
  venv_line=$(scripts/llama-cpp-venv.sh | tail -n 1)
  venv=${venv_line#LLAMA_CPP_VENV=}
  if [ "$1" = "--phi3" ]; then
    work="$root/.gguf-check/phi3"
    families="phi3"
  else
    work="$root/.gguf-check/gemma"
    families="gemma2 gemma3"
  fi
  rm -rf "$work"
  for family in $families; do
    d="$work/$family"
    mkdir -p "$d/model"
    cp "$root/tests/fixtures/llama/tiny-$family"/* "$d/model/"
    cp -r "$root/tests/fixtures/llama/tiny-$family-lora" "$d/adapter"
    python3 - "$d/model/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
if c["model_type"] == "phi3":
    c["sliding_window"] = None
else:
    c["query_pre_attn_scalar"] = c["head_dim"]
json.dump(c, open(sys.argv[1], "w"), indent=2)
PY
    for t in f32 f16 bf16 q6_k q5_k_m q4_k_m; do
      "$bin" export-gguf --model "$d/model" --output "$d/base-$t.gguf" --type "$t" > /dev/null
      "$bin" export-gguf --model "$d/model" --adapter "$d/adapter" --allow-other-base \
        --output "$d/lora-$t.gguf" --type "$t" > /dev/null
      for case in base lora; do
        "$bin" import-gguf "$d/$case-$t.gguf" --output "$d/$case-$t-back" > /dev/null
      done
    done
    # The adapter onto the original f32 weights (not the NF4 base it was trained on): what
    # transformers + PEFT compute on the fixture.
    "$bin" export-gguf --model "$d/model" --adapter "$d/adapter" --allow-other-base --onto-original \
      --output "$d/orig-f32.gguf" --type f32 > /dev/null
    "$bin" import-gguf "$d/orig-f32.gguf" --output "$d/orig-f32-back" > /dev/null
  done
  # shellcheck disable=SC2086
  "${QLORA_TRANSFORMERS_PYTHON:-python3}" scripts/check_gguf_export.py gemma-reference "$work" $families
  # shellcheck disable=SC2086
  "$venv/bin/python" scripts/check_gguf_export.py gemma "$work" $families
  exit 0
fi
model=${1:-$root/.demo/smollm2-135m-instruct}
adapter=${2:-$root/.demo/adapter}
if [ ! -f "$model/config.json" ]; then
  assets_line=$(scripts/fetch-demo-assets.sh | tail -n 1)
  assets=${assets_line#QLORA_DEMO_ASSETS=}
  "$bin" import-gguf "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --output "$model"
fi
work="$root/.gguf-check"
mkdir -p "$work"
if [ ! -f "$adapter/adapter_config.json" ]; then
  assets_line=$(scripts/fetch-demo-assets.sh | tail -n 1)
  assets=${assets_line#QLORA_DEMO_ASSETS=}
  adapter="$work/adapter"
  echo "== training a short adapter ($adapter)"
  "$bin" train --device cpu --model "$model" --data "$assets/alpaca_en_demo.json" --output "$adapter" \
    --overwrite --max-steps 8 --seq-len 256 --batch-tokens 512 --lr 1e-3 --rank 16 --alpha 32 --warmup-steps 1
fi
venv_line=$(scripts/llama-cpp-venv.sh | tail -n 1)
venv=${venv_line#LLAMA_CPP_VENV=}

echo "== merge (the reference: our CPU evaluation of the merged model)"
rm -rf "$work/merged"
"$bin" merge --model "$model" --adapter "$adapter" --output "$work/merged"
types="f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k"
for t in $types; do
  "$bin" export-gguf --model "$model" --adapter "$adapter" --output "$work/model-$t.gguf" --type "$t" --overwrite
done
cat > "$work/texts.jsonl" <<'TXT'
{"text": "The capital of France is Paris. It is known for the Eiffel Tower, its museums and its cafés."}
{"text": "To make a cup of tea, boil water, pour it over the tea leaves and wait three to five minutes."}
{"text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"}
{"text": "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen."}
TXT
question="Give three tips for staying healthy."
# Our side: token ids and labels, the loss of each text, the greedy answer.
"$bin" data --model "$work/merged" --data "$work/texts.jsonl" --format text --json 2>/dev/null > "$work/ours-ids.jsonl"
i=0
while IFS= read -r line; do
  printf '%s\n' "$line" > "$work/text-$i.jsonl"
  i=$((i + 1))
done < "$work/texts.jsonl"
losses() { # model-folder output-file: our CPU loss of each text, one JSON line each
  : > "$2"
  for ((j = 0; j < i; j++)); do
    "$bin" eval --device cpu --base dense --model "$1" --data "$work/text-$j.jsonl" --format text --json \
      2>/dev/null | tail -n 1 >> "$2"
  done
}
losses "$work/merged" "$work/ours-loss.jsonl"
# For each quantized file, our loss on its own weights too (import-gguf dequantizes them), so
# that llama.cpp's arithmetic is compared with ours on the same weights.
for t in $types; do
  case $t in f32 | f16 | bf16) continue ;; esac
  rm -rf "$work/dequantized-$t"
  "$bin" import-gguf "$work/model-$t.gguf" --output "$work/dequantized-$t" > /dev/null
  losses "$work/dequantized-$t" "$work/ours-loss-$t.jsonl"
done
"$bin" generate --device cpu --base dense --model "$work/merged" --chat "$question" --max-new-tokens 48 \
  2>/dev/null > "$work/ours-answer.txt"
"$venv/bin/python" scripts/check_gguf_export.py "$work" "$question" $types
