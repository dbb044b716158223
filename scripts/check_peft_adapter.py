#!/usr/bin/env python3
"""Loads an adapter qlora-rs wrote into transformers + PEFT and prints the mean token loss of a
text data file, as `qlora-rs eval --base dense --format text` computes it: each record encoded
by the folder's tokenizer.json (the tokenizers library, special tokens added by its
post-processor; not AutoTokenizer, whose model-specific classes may rebuild the pre-tokenizer),
EOS appended when missing, every next token counted, the sum over all records divided by the
tokens counted.

    python scripts/check_peft_adapter.py MODEL_DIR ADAPTER_DIR DATA.jsonl

Prints one JSON object: {"loss": mean, "tokens": count}. Runs on the CPU in float32; needs
torch, transformers and peft (scripts/check-peft-adapter.sh makes the venv).
"""

import json
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def main():
    model_dir, adapter_dir, data = sys.argv[1:4]
    torch.set_num_threads(2)
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    with open(f"{model_dir}/tokenizer_config.json") as f:
        eos = json.load(f).get("eos_token")
    eos_id = tok.token_to_id(eos if isinstance(eos, str) else eos["content"]) if eos else None
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total, count = 0.0, 0
    with open(data) as f:
        for line in f:
            if not line.strip():
                continue
            ids = tok.encode(json.loads(line)["text"]).ids
            if eos_id is not None and ids[-1] != eos_id:
                ids.append(eos_id)
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
            total += float(loss)
            count += len(ids) - 1
    print(json.dumps({"loss": total / count, "tokens": count}))


if __name__ == "__main__":
    main()
