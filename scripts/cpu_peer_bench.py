#!/usr/bin/env python3
"""The CPU peer of `qlora-rs bench --device cpu`: PyTorch + PEFT + bitsandbytes doing the same
training step on the same model: NF4 base (double quantization), LoRA r = 16 (alpha 32) on all
seven projections, gradient checkpointing, AdamW, f32 compute, random token ids, one sequence of
SEQ_LEN tokens. Prints the mean step time of STEPS steps after one warm-up step.

    python3 scripts/cpu_peer_bench.py MODEL_DIR SEQ_LEN STEPS
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


def main():
    model_dir, seq_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads = int(os.environ.get("QLORA_CPU_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                 dtype=torch.float32, device_map="cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
    times, cpu = [], 0.0
    for step in range(steps + 1):
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
    mean = sum(times) / len(times)
    print(f"peer: torch {torch.__version__}, {threads} threads, {seq_len} tokens, {steps} timed steps")
    print(f"  step time   {mean:.3f} s ({seq_len / mean:.0f} tokens/s)")
    print(f"  cpu/wall    {cpu / sum(times):.2f} over the timed steps ({cpu:.1f} s of CPU time in "
          f"{sum(times):.1f} s, {threads} threads)")


if __name__ == "__main__":
    main()
