#!/usr/bin/env python3
"""Loads an adapter qlora-rs wrote into transformers + PEFT and prints the mean token loss of a
text data file, as `qlora-rs eval --base dense --format text` computes it: each record encoded
by the model's tokenizer with its special tokens, EOS appended when missing, every next token
counted, the sum over all records divided by the tokens counted.

    python scripts/check_peft_adapter.py MODEL_DIR ADAPTER_DIR DATA.jsonl

Prints one JSON object: {"loss": mean, "tokens": count}. Runs on the CPU in float32; needs
torch, transformers and peft (scripts/check-peft-adapter.sh makes the venv).
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, adapter_dir, data = sys.argv[1:4]
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total, count = 0.0, 0
    with open(data) as f:
        for line in f:
            if not line.strip():
                continue
            ids = tok(json.loads(line)["text"])["input_ids"]
            if tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
                ids.append(tok.eos_token_id)
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
            total += float(loss)
            count += len(ids) - 1
    print(json.dumps({"loss": total / count, "tokens": count}))


if __name__ == "__main__":
    main()
