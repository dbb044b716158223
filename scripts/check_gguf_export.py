"""llama.cpp's side of scripts/check-gguf-export.sh (run with the llama.cpp venv's python).

    check_gguf_export.py WORK QUESTION TYPE...
    check_gguf_export.py gemma-reference WORK [FAMILY...]   (a python with torch + transformers + peft)
    check_gguf_export.py gemma WORK [FAMILY...]             (the llama.cpp venv's python)
    check_gguf_export.py spm-models WORK ROOT; spm WORK ROOT (the llama.cpp venv's python)

The gemma modes check our gemma2/gemma3 exports of the tiny Gemma 2 / Gemma 3 fixtures (see
gemma_main below) against transformers rather than against our own evaluation; FAMILY (default
gemma2 gemma3) names the fixtures under WORK, `phi3` for scripts/check-gguf-export.sh --phi3.

WORK holds model-<TYPE>.gguf for each type, texts.jsonl, and our results: ours-ids.jsonl
(`qlora-rs data --json`), ours-loss.jsonl (`qlora-rs eval --json`, one line per text) and
ours-answer.txt (`qlora-rs generate`, greedy). For each type, llama.cpp's runtime loads the file;
its tokens for each text must equal ours, and its loss on our token ids (from its logits) must be
within the type's tolerance of ours on the same weights (the merged model; for a quantized file,
its weights dequantized by our import-gguf), and is reported against the merged model too; its greedy answer is compared with ours
(equal for the f32 file; reported for the others). llama.cpp's quantizer (llama_model_quantize, no
importance matrix) then quantizes model-f32.gguf to each quantized type and every tensor must
hold the same type and bytes as in our export. Exits 1 on any failure.
"""
import ctypes
import json
import math
import os
import sys

import numpy as np

# llama_cpp and gguf live in the llama.cpp venv only; the gemma-reference mode runs elsewhere.
try:
    import llama_cpp
    from gguf import GGUFReader
except ImportError:
    llama_cpp = GGUFReader = None

# Largest |loss difference| (nats per token, mean over a text) accepted between llama.cpp on a
# file and our CPU evaluation of the same weights (the merged model for f32/f16/bf16, whose
# values the files hold exactly or to f16 rounding; the file's own weights dequantized by
# import-gguf for the quantized types, which stores them in bf16: a rounding of up to 2^-9 of
# each weight, as large as Q8_0's own error). What remains is llama.cpp's arithmetic (f32
# kernels; activations rounded to f16/bf16 for those weights; activations quantized to 8 bits,
# Q8_0/Q8_K, for the quantized weights) and, for the quantized types, that bf16 rounding. The
# loss against the unquantized merged model is reported beside it: what the quantization itself
# costs on this small model (and bytes identical to llama-quantize's are checked below).
TOLERANCE = {
    "f32": 0.002, "f16": 0.01, "bf16": 0.03, "q8_0": 0.1, "q6_k": 0.1,
    # Q4_0 costs SmolLM2-135M over a nat per token: llama.cpp's 8-bit activations then move a
    # near-broken model's loss further.
    "q5_k_m": 0.1, "q4_k_m": 0.1, "q4_0": 0.2,
}
FTYPE = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# The bf16 and f16 files hold the f32 file's values (the merged weights rounded to bf16, which
# f16 holds too unless tiny), but llama.cpp's CPU backend rounds the activations to the weights'
# type (its vec_dot type for F16 and BF16 weights) for those dot products, which can change a
# near-tie in a greedy answer: their losses are checked, their answers only reported. f32 runs
# the same products on the same values as ours, so its greedy answer must be ours.
GREEDY_MUST_MATCH = {"f32"}


def nll(scores, ids, labels):
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] == -100:
            continue
        row = scores[t - 1].astype(np.float64)
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        total += lse - row[labels[t]]
        n += 1
    return total / n


def quantize_with_llama_cpp(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def tensor_bytes(path):
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in r.tensors}


def main():
    work, question, types = sys.argv[1], sys.argv[2], sys.argv[3:]
    texts = [json.loads(l)["text"] for l in open(os.path.join(work, "texts.jsonl"))]
    ours_ids = [json.loads(l) for l in open(os.path.join(work, "ours-ids.jsonl")) if l.strip()]
    ours_loss = [json.loads(l)["loss"] for l in open(os.path.join(work, "ours-loss.jsonl"))]
    ours_answer = open(os.path.join(work, "ours-answer.txt")).read().rstrip()
    failures = []
    print(f"{'type':8} {'MiB':>7} {'Δ same weights':>14} {'tolerance':>9} {'Δ merged':>9} {'tokens':>7} greedy answer")
    for ty in types:
        path = os.path.join(work, f"model-{ty}.gguf")
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True,
                              n_threads=2, verbose=False)
        same_path = os.path.join(work, f"ours-loss-{ty}.jsonl")
        same_loss = ([json.loads(l)["loss"] for l in open(same_path)]
                     if os.path.exists(same_path) else ours_loss)
        worst, worst_merged, tokens_ok = 0.0, 0.0, True
        for text, rec, loss, same in zip(texts, ours_ids, ours_loss, same_loss):
            ids, labels = rec["ids"], rec["labels"]
            theirs = llm.tokenize(text.encode(), add_bos=True, special=False)
            eos = llm.token_eos()
            if theirs != ids[: len(theirs)] or ids[len(theirs):] not in ([], [eos]):
                tokens_ok = False
                failures.append(f"{ty}: tokens differ for {text[:30]!r}: {theirs[:12]} vs {ids[:12]}")
            llm.reset()
            llm.eval(ids)
            scores = np.array(llm.scores[: len(ids)])
            theirs_loss = nll(scores, ids, labels)
            worst = max(worst, abs(theirs_loss - same))
            worst_merged = max(worst_merged, abs(theirs_loss - loss))
        if worst > TOLERANCE[ty]:
            failures.append(f"{ty}: loss differs by {worst:.4f} > {TOLERANCE[ty]}")
        llm.reset()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": question}], temperature=0.0, top_k=1,
            repeat_penalty=1.0, max_tokens=48)
        answer = out["choices"][0]["message"]["content"].rstrip()
        same = answer == ours_answer
        if ty in GREEDY_MUST_MATCH and not same:
            failures.append(f"{ty}: greedy answer differs:\n  llama.cpp: {answer!r}\n  ours:      {ours_answer!r}")
        mib = os.path.getsize(path) / 2**20
        print(f"{ty:8} {mib:7.1f} {worst:14.5f} {TOLERANCE[ty]:9} {worst_merged:9.4f} {'same' if tokens_ok else 'DIFF':>7} "
              f"{'same as ours' if same else 'differs: ' + repr(answer[:60])}")
        del llm

    print("\nllama.cpp's quantizer on our f32 export, against our quantized exports:")
    for ty in types:
        if ty not in FTYPE:
            continue
        ref = os.path.join(work, f"llama-quantize-{ty}.gguf")
        quantize_with_llama_cpp(os.path.join(work, "model-f32.gguf"), ref, FTYPE[ty])
        a, b = tensor_bytes(ref), tensor_bytes(os.path.join(work, f"model-{ty}.gguf"))
        bad = [n for n in a if n not in b or a[n] != b[n]]
        extra = [n for n in b if n not in a]
        kinds = {}
        for n, (t, _) in b.items():
            kinds[t] = kinds.get(t, 0) + 1
        status = "identical" if not bad and not extra else f"{len(bad)} tensors differ"
        print(f"  {ty:8} {len(b)} tensors {kinds}: {status}")
        for n in bad[:5]:
            ta, tb = a[n][0], b.get(n, ("missing", b""))[0]
            first = next((i for i, (x, y) in enumerate(zip(a[n][1], b.get(n, (0, b""))[1])) if x != y), None)
            print(f"    {n}: llama.cpp {ta}, ours {tb}, first differing byte {first}")
        if bad or extra:
            failures.append(f"{ty}: {len(bad)} tensors differ from llama-quantize's, {len(extra)} extra")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        sys.exit(1)
    print("\nall checks passed")


# The gemma check (scripts/check-gguf-export.sh --gemma). WORK/<family>/ holds `model` (the
# tiny fixture with query_pre_attn_scalar = head_dim, the scale llama.cpp hard-codes), and for
# each case (`base`; `lora`, the fixture's adapter folded into the NF4 base it was trained on;
# `orig`, folded into the original f32 weights, f32 only) and type: <case>-<type>.gguf
# (our export) and <case>-<type>-back/ (import-gguf of it: the file's weights, dequantized, as a
# Hugging Face folder). transformers gives the reference: its loss on the same token ids (a) on
# <case>-<type>-back, the file's own weights (which also checks that transformers reads the
# imported config as the model it was), within TOLERANCE of llama.cpp's, and (b) on the original
# f32 fixture (+ the adapter through PEFT), reported beside it: for `lora` that difference is
# the NF4 rounding of the base under the adapter, for `orig` only bf16's.
GEMMA_FAMILIES = ["gemma2", "gemma3"]
GEMMA_TYPES = ["f32", "f16", "bf16", "q6_k", "q5_k_m", "q4_k_m"]
GEMMA_TEXT = ("The quick brown fox jumps over the lazy dog. She said: it is 2024, and the "
              "weather is fine; we will walk to the park and back again before noon.")


def gemma_cases(work, family):
    fam = os.path.join(work, family)
    return [(case, os.path.join(fam, case)) for case in ("base", "lora", "orig")
            if os.path.exists(os.path.join(fam, f"{case}-f32.gguf"))]


def gemma_reference(work, families):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager").eval()

    def loss(model, ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1)
        return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())

    for family in families:
        fam = os.path.join(work, family)
        model_dir = os.path.join(fam, "model")
        ids = AutoTokenizer.from_pretrained(model_dir)(GEMMA_TEXT, add_special_tokens=False)["input_ids"]
        out = {"ids": ids, "cases": {}}
        for case, prefix in gemma_cases(work, family):
            original = load(model_dir)
            if case != "base":
                from peft import PeftModel
                adapter = os.path.join(fam, "adapter")
                original = PeftModel.from_pretrained(original, adapter).merge_and_unload()
            res = {"original": loss(original, ids), "types": {}}
            for ty in GEMMA_TYPES:
                back = f"{prefix}-{ty}-back"
                if os.path.exists(back):
                    res["types"][ty] = loss(load(back), ids)
            out["cases"][case] = res
        with open(os.path.join(fam, "transformers.json"), "w") as f:
            json.dump(out, f)
        print(f"{family}: transformers losses written ({len(ids)} tokens)")


def gemma_main(work, families):
    # llama.cpp's notes on the tiny context (n_ctx_seq > n_ctx_train, full-size SWA cache) aside.
    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    failures = []
    print(f"{'model':14} {'type':7} {'llama.cpp':>10} {'transformers':>12} {'Δ same weights':>14} "
          f"{'tolerance':>9} {'Δ original f32':>14} tokens")
    for family in families:
        fam = os.path.join(work, family)
        ref = json.load(open(os.path.join(fam, "transformers.json")))
        ids = ref["ids"]
        for case, prefix in gemma_cases(work, family):
            res = ref["cases"][case]
            for ty in GEMMA_TYPES:
                path = f"{prefix}-{ty}.gguf"
                if not os.path.exists(path):
                    continue
                if ty not in res["types"]:
                    failures.append(f"{family} {case} {ty}: no transformers reference")
                    continue
                llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True,
                                      n_threads=2, verbose=False)
                theirs_ids = llm.tokenize(GEMMA_TEXT.encode(), add_bos=False, special=False)
                tokens_ok = theirs_ids == ids
                if not tokens_ok:
                    failures.append(f"{family} {case} {ty}: tokens differ: {theirs_ids[:12]} vs {ids[:12]}")
                llm.reset()
                llm.eval(ids)
                scores = np.array(llm.scores[: len(ids)])
                got = nll(scores, ids, ids)
                same, original = res["types"][ty], res["original"]
                delta = abs(got - same)
                if delta > TOLERANCE[ty]:
                    failures.append(f"{family} {case} {ty}: loss {got:.5f} vs transformers "
                                    f"{same:.5f} (Δ {delta:.5f} > {TOLERANCE[ty]})")
                print(f"{family + ' ' + case:14} {ty:7} {got:10.5f} {same:12.5f} {delta:14.6f} "
                      f"{TOLERANCE[ty]:9} {abs(got - original):14.6f} {'same' if tokens_ok else 'DIFF'}")
                del llm
    print("\nllama.cpp's quantizer on our f32 exports, against our quantized exports:")
    for family in families:
        for case, prefix in gemma_cases(work, family):
            for ty in GEMMA_TYPES:
                if ty not in FTYPE or not os.path.exists(f"{prefix}-{ty}.gguf"):
                    continue
                ref = f"{prefix}-llama-quantize-{ty}.gguf"
                quantize_with_llama_cpp(f"{prefix}-f32.gguf", ref, FTYPE[ty])
                a, b = tensor_bytes(ref), tensor_bytes(f"{prefix}-{ty}.gguf")
                bad = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
                kinds = {}
                for n, (t, _) in b.items():
                    kinds[t] = kinds.get(t, 0) + 1
                status = "identical" if not bad else f"{len(bad)} tensors differ: {bad[:3]}"
                print(f"  {family + ' ' + case:14} {ty:7} {len(b)} tensors {kinds}: {status}")
                if bad:
                    failures.append(f"{family} {case} {ty}: {len(bad)} tensors differ from llama-quantize's")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        sys.exit(1)
    print(f"\nall {'/'.join(families)} checks passed")


# --spm: the SentencePiece fixtures (tests/fixtures/spm, made with llama.cpp's converter by
# tests/fixtures/make_spm_fixtures.py) in tiny models: folder name (our export's general.name;
# llama.cpp's Phi-3 token attributes go by it), fixture, tiny model, embedding rows.
SPM_MODELS = [
    ("tiny-gemma-2", "gemma", "gemma2", 400),
    ("tiny-phi-3-mini", "llama", "phi3", 416),
]


def read_f32_safetensors(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        assert h["dtype"] == "F32", f"{path}: {name} is {h['dtype']}"
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(h["shape"])
    return out


def write_f32_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())


def spm_models(work, root):
    """The model folders: the tiny fixture's config and weights (embedding and lm_head resized,
    random), the SentencePiece fixture's tokenizer files."""
    rng = np.random.default_rng(0)
    for folder, fixture, family, rows in SPM_MODELS:
        src = os.path.join(root, "tests/fixtures/llama", f"tiny-{family}")
        dst = os.path.join(work, folder)
        os.makedirs(dst)
        cfg = json.load(open(os.path.join(src, "config.json")))
        old, cfg["vocab_size"] = cfg["vocab_size"], rows
        if family == "phi3":
            cfg["sliding_window"] = None
        else:
            cfg["query_pre_attn_scalar"] = cfg["head_dim"]
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
        tensors = read_f32_safetensors(os.path.join(src, "model.safetensors"))
        for name, t in tensors.items():
            if t.shape[0] == old:
                tensors[name] = (rng.standard_normal((rows,) + t.shape[1:]) * 0.02).astype("<f4")
        write_f32_safetensors(os.path.join(dst, "model.safetensors"), tensors)
        spm = os.path.join(root, "tests/fixtures/spm", fixture)
        for f in os.listdir(spm):
            with open(os.path.join(spm, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())


def spm_main(work, root):
    """llama.cpp loads each of our SentencePiece exports (WORK/<folder>-<type>.gguf): its
    tokenizer keys equal the converter's, its tokens for the golden strings equal those of the
    converter's file (with and without BOS), and it runs the model (finite logits)."""
    ref = json.load(open(os.path.join(root, "tests/fixtures/gguf/spm-converter.json")))
    failures = []
    for folder, fixture, _, _ in SPM_MODELS:
        want = ref[fixture]
        for ty in ("f32", "bf16"):
            path = os.path.join(work, f"{folder}-{ty}.gguf")
            r = GGUFReader(path)
            keys = [[k, f.contents()] for k, f in r.fields.items() if k.startswith("tokenizer.")]
            same_keys = keys == want["keys"]
            llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False)
            bad = [g["text"] for g in want["golden"]
                   if llm.tokenize(g["text"].encode(), add_bos=False, special=True) != g["ids"]
                   or llm.tokenize(g["text"].encode(), add_bos=True, special=True) != g["ids_special"]]
            ids = llm.tokenize("The quick brown fox jumps over the lazy dog.".encode(), add_bos=True)
            llm.reset()
            llm.eval(ids)
            finite = bool(np.isfinite(np.array(llm.scores[:len(ids)])).all())
            print(f"  {folder:16} {ty:5} tokenizer keys = converter's: {same_keys}; "
                  f"{len(want['golden']) - len(bad)}/{len(want['golden'])} strings tokenized as the "
                  f"converter's file; {len(ids)} tokens run, logits finite: {finite}")
            if not same_keys or bad or not finite:
                failures.append(f"{folder} {ty}: keys {same_keys}, strings {bad}, finite {finite}")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        sys.exit(1)
    print("\nall SentencePiece checks passed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["spm-models"]:
        spm_models(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["spm"]:
        spm_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["gemma-reference"]:
        gemma_reference(sys.argv[2], sys.argv[3:] or GEMMA_FAMILIES)
    elif sys.argv[1:2] == ["gemma"]:
        gemma_main(sys.argv[2], sys.argv[3:] or GEMMA_FAMILIES)
    else:
        main()
