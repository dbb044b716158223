#!/usr/bin/env python3
"""Markdown report of every CUDA kernel's static figures and the roofline bounds they imply.

    python3 scripts/kernel_report.py --ptxas DIR [--profile FILE] [--nvcc-version TEXT] \
        [--command TEXT]... > docs/kernel-report.md

--ptxas DIR      DIR/sm_80.txt, DIR/sm_89.txt, DIR/sm_90.txt (those that exist): the `ptxas -v`
                 output of compiling every kernels/*.cu for that arch. A line
                 `# kernel-report: file kernels/X.cu` (written by scripts/kernel-report.sh) names
                 the file of the kernels that follow.
--profile FILE   the simulated GPU's profile (QLORA_SIM_PROFILE, format in the simulator's notes):
                 tab-separated lines tagged `qsim-profile-v1`, summed per kernel.
--sass DIR       DIR/sm_89.txt, DIR/sm_90.txt (those that exist): `cuobjdump -sass` of every
                 kernels/*.cu cubin for that arch; each tensor-core kernel's main loop is read
                 from it (scripts/sass_loops.py) for the instruction-issue bound.
--command TEXT   a command that produced the inputs, shown in the header (repeatable).

scripts/kernel-report.sh runs all of it. Standard library only. Every figure is a design figure
(compiler output, simulator counts and spec-sheet peaks), never a measurement.
"""
import argparse
import datetime
import math
import os
import re
import sys

import sass_loops

# Cards and the peaks assumed. Tensor figures are dense bf16 mma with fp32 accumulate,
# FLOP/clk/SM × SMs × boost clock; bandwidths are the vendors' spec-sheet figures.
CARDS = {
    # H100 SXM5: 132 SMs at 1830 MHz boost; 4096 dense bf16 FLOP/clk/SM
    # (132 × 4096 × 1.83e9 = 989.4 TFLOP/s); HBM3 3.35 TB/s.
    "H100": dict(name="H100 SXM", arch="sm_90", sms=132, clock=1.83e9, flop_clk_sm=4096,
                 mem="HBM3", bw=3.35e12),
    # H200 SXM: the same GH100 SMs and clock as H100 SXM; HBM3e 4.8 TB/s.
    "H200": dict(name="H200 SXM", arch="sm_90", sms=132, clock=1.83e9, flop_clk_sm=4096,
                 mem="HBM3e", bw=4.8e12),
    # RTX 4090: 128 SMs at 2520 MHz boost; 512 dense bf16 FLOP/clk/SM with fp32 accumulate
    # (GeForce runs fp32 accumulate at half the fp16-accumulate rate):
    # 128 × 512 × 2.52e9 = 165.2 TFLOP/s; GDDR6X 21 Gb/s × 384 bit = 1008 GB/s.
    "4090": dict(name="RTX 4090", arch="sm_89", sms=128, clock=2.52e9, flop_clk_sm=512,
                 mem="GDDR6X", bw=1.008e12),
    # A100 SXM 80GB, for reference: 108 SMs at 1410 MHz; 2048 FLOP/clk/SM
    # (108 × 2048 × 1.41e9 = 312 TFLOP/s); HBM2e 2039 GB/s.
    "A100": dict(name="A100 SXM 80GB", arch="sm_80", sms=108, clock=1.41e9, flop_clk_sm=2048,
                 mem="HBM2e", bw=2.039e12),
}
ROOFLINE_CARDS = ["H100", "H200", "4090"]
KIB = 1024
# Per-SM limits by arch (the CUDA programming guide's compute-capability table). sm_90 is both
# H100 and H200, sm_89 the RTX 4090, sm_80 the A100.
ARCHS = {
    "sm_80": dict(smem_sm=164 * KIB, smem_block=163 * KIB, regs=65536,
                  threads=2048, warps=64, blocks=32),
    "sm_89": dict(smem_sm=100 * KIB, smem_block=99 * KIB, regs=65536,
                  threads=1536, warps=48, blocks=24),
    "sm_90": dict(smem_sm=228 * KIB, smem_block=227 * KIB, regs=65536,
                  threads=2048, warps=64, blocks=32),
}
WAVES_PER_CLK = 1  # shared memory, every card: 32 banks × 4 B = 128 B = one wavefront/clock/SM
MMA_FLOP = 4096  # mma.sync.m16n8k16: 16 × 8 × 16 × 2
# The special-function unit (MUFU: ex2, rcp) on sm_80–sm_90: 16 results per clock per SM (the
# CUDA programming guide's throughput table), 4 per partition, so a warp's MUFU holds it 8 clocks.
MUFU_CLOCKS = 32 / 4
MMA_SYNC_ON_HOPPER = 2 / 3  # share of the sm_90 dense peak mma.sync is commonly reported to reach
CONFLICT_FLAG = 1.05

PROFILE_TAG = "qsim-profile-v1"
PROFILE_FIELDS = (["kernel", "module", "launches", "blocks", "threads", "dynamic_smem",
                   "static_smem", "mma", "ldmatrix"]
                  + [f"{s}_{c}" for s in ("lds", "sts", "ldsm", "cpa")
                     for c in ("req", "wave", "ideal")]
                  + [f"{s}_{c}" for s in ("ldg", "stg") for c in ("req", "sectors", "ideal")]
                  + ["ldg_bytes", "stg_bytes", "unique_bytes"])
PROFILE_MAX = {"threads", "dynamic_smem", "static_smem"}


# ---------------------------------------------------------------- inputs
def parse_ptxas(text):
    """{kernel: {file, regs, stack, spill_st, spill_ld, smem, barriers}} for one arch."""
    kernels, entry, props_for, file = {}, None, None, None
    for line in text.splitlines():
        if line.startswith("# kernel-report: file "):
            file = line.split("file ", 1)[1].strip()
        elif m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line):
            entry = kernels.setdefault(m[1], dict(file=file, regs=0, stack=0, spill_st=0,
                                                  spill_ld=0, smem=0, barriers=0))
            props_for = None
        elif m := re.search(r"Function properties for (\S+)", line):
            props_for = m[1]
        elif entry is None:
            continue
        elif "bytes stack frame" in line and props_for in kernels and kernels[props_for] is entry:
            for key, marker in (("stack", "stack frame"), ("spill_st", "spill stores"),
                                ("spill_ld", "spill loads")):
                entry[key] = max(entry[key], _number_before(line, "bytes " + marker))
        elif m := re.search(r"Used (\d+) registers", line):
            entry["regs"] = max(entry["regs"], int(m[1]))
            entry["barriers"] = max(entry["barriers"], _number_before(line, "barriers"))
            entry["smem"] = max(entry["smem"], _number_before(line, "bytes smem"))
            entry["stack"] = max(entry["stack"], _number_before(line, "bytes lmem"))
    return kernels


def _number_before(line, marker):
    m = re.search(r"(\d+)\s+" + re.escape(marker), line)
    return int(m[1]) if m else 0


def load_ptxas(directory):
    """{arch: {kernel: figures}} for each sm_XX.txt present in the directory."""
    found = {}
    for arch in ARCHS:
        path = os.path.join(directory, arch + ".txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                found[arch] = parse_ptxas(f.read())
    if not found:
        sys.exit(f"kernel_report: no sm_80.txt / sm_89.txt / sm_90.txt in {directory}")
    return found


def load_sass(directory):
    """{arch: {kernel: main-loop figures}} for each sm_XX.txt present (none without a directory)."""
    found = {}
    if not directory:
        return found
    for arch in ARCHS:
        path = os.path.join(directory, arch + ".txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                found[arch] = sass_loops.analyse(f.read())
            if not found[arch]:
                sys.exit(f"kernel_report: {path}: no kernel with an HMMA loop found; is it "
                         "`cuobjdump -sass` output?")
    return found


def load_profile(path):
    """{kernel: {field: value}}: lines of the same kernel summed (threads and smem maxed)."""
    kernels = {}
    if not path:
        return kernels
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if parts[0] != PROFILE_TAG:
                continue
            if len(parts) != 1 + len(PROFILE_FIELDS):
                print(f"kernel_report: {path}:{number}: {len(parts)} fields, expected "
                      f"{1 + len(PROFILE_FIELDS)}; line skipped", file=sys.stderr)
                continue
            row = dict(zip(PROFILE_FIELDS, parts[1:]))
            if row["module"] == "testing":
                continue  # kernels/testing.cu: the tests' own planted-fault kernels
            try:
                counts = {k: int(v) for k, v in row.items() if k not in ("kernel", "module")}
            except ValueError:
                print(f"kernel_report: {path}:{number}: a count is not an integer; line skipped",
                      file=sys.stderr)
                continue
            into = kernels.setdefault(row["kernel"], dict(module=row["module"]))
            for key, value in counts.items():
                old = into.get(key, 0)
                into[key] = max(old, value) if key in PROFILE_MAX else old + value
    return kernels


# ---------------------------------------------------------------- arithmetic
def occupancy(arch, regs, threads, block_smem):
    """(resident blocks per SM, resident warps, limiter) by the CUDA occupancy rules."""
    lim = ARCHS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(regs * 32 / 256) * 256  # per warp, in units of 256
    if block_smem > lim["smem_block"]:
        return 0, 0, "shared memory over the per-block maximum"
    if regs > 255 or regs_per_warp * math.ceil(warps / 4) * 4 > lim["regs"]:
        return 0, 0, "registers over the per-block maximum"
    # Each of the SM's 4 scheduler partitions holds a quarter of the register file in whole warps.
    warps_by_regs = 4 * ((lim["regs"] // 4) // regs_per_warp) if regs_per_warp else lim["warps"]
    smem_alloc = math.ceil((block_smem + 1024) / 128) * 128  # 1 KiB reserved per block, 128 B units
    limits = {"registers": warps_by_regs // warps,
              "shared memory": lim["smem_sm"] // smem_alloc if block_smem else 10 ** 9,
              "threads": min(lim["threads"] // threads, lim["warps"] // warps),
              "block limit": lim["blocks"]}
    blocks = min(limits.values())
    return blocks, blocks * warps, ", ".join(k for k, v in limits.items() if v == blocks)


def ratio(num, den):
    return num / den if den else None


def times(r, flag=True):
    if r is None:
        return "—"
    text = f"{r:.2f}×"
    return f"**{text}** !" if flag and r > CONFLICT_FLAG else text


def si(x, unit="", digits=3):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()


def size(n):
    for scale, unit in ((KIB ** 3, "GiB"), (KIB ** 2, "MiB"), (KIB, "KiB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def peak(card):
    return card["sms"] * card["flop_clk_sm"] * card["clock"]


def waves_per_mma(p):
    """Shared-memory wavefronts (loads, stores, ldmatrix, cp.async) per MMA of a profiled kernel."""
    return sum(p[f"{s}_wave"] for s in ("lds", "sts", "ldsm", "cpa")) / p["mma"]


def hmma_clocks(card):
    """Clocks one HMMA.16816 keeps a scheduler partition's tensor core busy at the dense peak."""
    return MMA_FLOP / (card["flop_clk_sm"] / 4)


def issue_bound(loop, card):
    """Share of the tensor peak the main loop's steady iteration allows when each partition
    issues one instruction per clock and its special-function unit takes MUFU_CLOCKS per warp
    MUFU: its HMMAs' tensor clocks over its issue slots, or over its MUFU clocks if fewer."""
    return min(loop["hmma"] * hmma_clocks(card) / loop["steady"], sfu_bound(loop, card))


def sfu_bound(loop, card):
    """The MUFU part of issue_bound alone (1 where the iteration has no MUFU)."""
    if not loop["mufu"]:
        return 1.0
    return min(1.0, loop["hmma"] * hmma_clocks(card) / (loop["mufu"] * MUFU_CLOCKS))


def card_issue(sass, name, card):
    """The issue bound of kernel `name` on `card` (from its arch's SASS), or None."""
    loop = sass.get(card["arch"], {}).get(name)
    return issue_bound(loop, card) if loop else None


def bound_cell(smem, dram, issue):
    """`smem / DRAM / issue → bound` (issue left out where there is no SASS figure)."""
    parts = [smem, dram] + ([issue] if issue is not None else [])
    return " / ".join(f"{x:.0%}" for x in parts) + f" → **{min(parts):.0%}**", min(parts)


def smem_bound(waves, card):
    """Share of the card's tensor peak that shared memory can feed at `waves` per MMA."""
    feed = WAVES_PER_CLK * MMA_FLOP / waves if waves else math.inf  # FLOP/clk/SM
    return min(1.0, feed / card["flop_clk_sm"])


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# ---------------------------------------------------------------- sections
def section_header(args):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Kernel report: static resources, simulated counts, roofline bounds", "",
           "What every kernel in `kernels/*.cu` asks of the card (registers, shared memory, "
           "occupancy, from ptxas), what the simulated GPU counted while the tests ran them "
           "(tensor-core instructions, shared-memory wavefronts, global sectors), and the ceilings "
           "those figures imply on each card. These are design figures, not timings.", "",
           f"Generated {date}."
           + (f" nvcc: `{args.nvcc_version.strip()}`." if args.nvcc_version else "")]
    if args.command:
        out += ["", "Produced by:", "", "```sh", *args.command, "```"]
    return out


def section_cards():
    rows = []
    for card in CARDS.values():
        lim = ARCHS[card["arch"]]
        rows.append([card["name"], card["arch"], card["sms"], f"{card['clock'] / 1e6:.0f} MHz",
                     f"{card['sms']} × {card['flop_clk_sm']} × {card['clock'] / 1e9:.3g} GHz = "
                     f"{peak(card) / 1e12:.1f} TFLOP/s", f"{card['mem']} {si(card['bw'], 'B/s', 4)}",
                     f"{lim['smem_sm'] // KIB} / {lim['smem_block'] // KIB} KiB", lim["regs"],
                     f"{lim['threads']} / {lim['warps']} / {lim['blocks']}"])
    return ["## Cards and peaks assumed", ""] + table(
        ["card", "arch", "SMs", "boost clock", "dense bf16 tensor peak (SMs × FLOP/clk/SM × clock)",
         "DRAM", "smem per SM / per block", "registers per SM", "threads / warps / blocks per SM"],
        rows) + ["", "Shared memory on every card: 32 banks × 4 bytes = 128 bytes (one "
                 "wavefront) per clock per SM. The A100 is listed for reference only; the "
                 "bounds below are for the other three.", "",
                 f"Assumption: our kernels use `mma.sync` (not Hopper's `wgmma`), which on sm_90 "
                 f"reaches only a share of the dense peak — about {MMA_SYNC_ON_HOPPER:.0%} is the "
                 "figure commonly reported. The bounds below are still computed against the dense "
                 "peak, so on H100/H200 read anything above that share as capped there."]


def section_resources(ptxas, profile):
    names = sorted(set(profile) | {k for per in ptxas.values() for k in per},
                   key=lambda k: (kernel_file(k, ptxas, profile), natural(k)))
    archs = list(ptxas)
    rows, mismatched = [], []
    for name in names:
        prof = profile.get(name)
        row = [f"`{name}`", kernel_file(name, ptxas, profile)]
        if prof:
            row += [prof["threads"], f"{prof['dynamic_smem']} + {prof['static_smem']}"]
        else:
            row += ["—", "—"]
        for arch in archs:
            k = ptxas[arch].get(name)
            if not k:
                row += ["—", "—", "no ptxas figures"]
                continue
            spills = (k["stack"], k["spill_st"], k["spill_ld"])
            row += [k["regs"], "none" if not any(spills) else "**{}/{}/{}**".format(*spills)]
            if not prof:
                row.append("not launched in the profile")
                continue
            if k["smem"] != prof["static_smem"]:
                mismatched.append(f"`{name}` {arch}: ptxas {k['smem']} B, "
                                  f"simulator {prof['static_smem']} B")
            blocks, warps, limiter = occupancy(arch, k["regs"], prof["threads"],
                                               prof["dynamic_smem"] + k["smem"])
            row.append(f"{blocks} ({warps}/{ARCHS[arch]['warps']} warps) — {limiter}")
        rows.append(row)
    header = ["kernel", "file", "threads/block", "smem/block (dyn + static)"]
    for arch in archs:
        header += [f"{arch} regs", f"{arch} spills", f"{arch} blocks/SM — limiter"]
    out = ["## 1. Resources and occupancy", ""] + table(header, rows)
    if mismatched:
        out += ["", "Static shared memory differs between ptxas and the simulator (occupancy uses "
                "ptxas's): " + "; ".join(mismatched) + "."]
    return out


def natural(name):
    """Sort key that puts d64 before d128."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def kernel_file(name, ptxas, profile):
    for per in ptxas.values():
        if name in per and per[name]["file"]:
            return per[name]["file"].removeprefix("kernels/")
    return profile[name]["module"] + ".cu" if name in profile else "?"


def section_counts(profile):
    rows = []
    for name, p in sorted(profile.items(), key=lambda kv: natural(kv[0])):
        smem = [times(ratio(p[f"{s}_wave"], p[f"{s}_ideal"])) for s in ("lds", "sts", "ldsm", "cpa")]
        rows.append([f"`{name}`", p["launches"], p["mma"],
                     f"{p['mma'] / p['ldmatrix']:.2f}" if p["mma"] and p["ldmatrix"] else "—", *smem,
                     times(ratio(p["ldg_sectors"], p["ldg_ideal"])),
                     times(ratio(p["stg_sectors"], p["stg_ideal"])),
                     times(ratio(p["ldg_bytes"] + p["stg_bytes"], p["unique_bytes"]), flag=False)])
    return ["## 2. What the simulator counted", ""] + table(
        ["kernel", "launches", "mma", "mma/ldmatrix", "lds wave/ideal", "sts wave/ideal",
         "ldmatrix wave/ideal", "cp.async wave/ideal", "ldg sectors/ideal", "stg sectors/ideal",
         "global reuse"], rows)


def section_bounds(profile, sass):
    mma_rows, mem_rows = [], []
    for name, p in sorted(profile.items(), key=lambda kv: natural(kv[0])):
        if p["mma"]:
            flop = MMA_FLOP * p["mma"]
            waves = waves_per_mma(p)
            intensity = ratio(flop, p["unique_bytes"])
            row = [f"`{name}`", si(flop), f"{waves:.2f}", f"{intensity:.1f}" if intensity else "—"]
            for key in ROOFLINE_CARDS:
                card = CARDS[key]
                smem = smem_bound(waves, card)
                dram = min(1.0, intensity * card["bw"] / peak(card)) if intensity else 1.0
                row.append(bound_cell(smem, dram, card_issue(sass, name, card))[0])
            mma_rows.append(row)
        else:
            n = p["launches"] or 1
            eff = ratio(p["ldg_ideal"] + p["stg_ideal"], p["ldg_sectors"] + p["stg_sectors"])
            mem_rows.append([f"`{name}`", p["launches"],
                             size((p["ldg_bytes"] + p["stg_bytes"]) / n), size(p["unique_bytes"] / n),
                             f"{eff:.0%}" if eff else "—", "bandwidth-bound"])
    out = ["## 3. Roofline bounds", "",
           "Tensor-core kernels: the share of the dense bf16 peak that shared memory, DRAM and "
           "instruction issue each allow, `smem / DRAM / issue → bound` (issue from section 5, "
           "the main loop's steady iteration; absent where no SASS was read). **The DRAM "
           "figure uses the profile's shapes, which are the tests' small shapes**: it holds for "
           "those shapes only (larger matrices and sequences bring more FLOP per byte). The "
           "shared-memory and issue figures depend on the tiling, not the shape.", ""]
    none = ["(none in the profile)"]
    out += table(["kernel", "FLOP (all launches)", "smem wavefronts per MMA",
                  "FLOP per unique byte"] + [CARDS[k]["name"] for k in ROOFLINE_CARDS],
                 mma_rows) if mma_rows else none
    out += ["", "Kernels without MMAs move bytes and do little arithmetic: bandwidth-bound, no "
            "FLOP ceiling.", ""]
    return out + (table(["kernel", "launches", "bytes moved per launch", "unique bytes per launch",
                         "sector efficiency", "bound"], mem_rows) if mem_rows else none)


# The benches' shapes (benches/kernels.rs), for the bounds at real sizes: (label, kernel whose
# profiled shared-memory traffic applies, FLOP, compulsory DRAM bytes). GEMMs: Llama-3-8B's
# projections at M = 2048 tokens, bf16 operands (2 bytes) or NF4 weights (half a byte per element
# plus one double-quantized scale byte per 64). Attention: causal, 32 query and 8 KV heads of 128,
# batch 1; FLOP counts only the unmasked half; bytes are Q, K, V and O, each moved once.
def _gemm(m, n, k, nf4):
    weight = n * k * (0.5 + 1 / 64) if nf4 else 2 * n * k
    return 2 * m * n * k, 2 * m * k + weight + 2 * m * n


def _attn(t, heads=32, kv=8, d=128):
    q_o = 2 * t * heads * d * 2
    k_v = 2 * t * kv * d * 2
    return 2 * 2 * t * t * heads * d / 2, q_o + k_v


BENCH_SHAPES = [
    ("bf16 GEMM 2048×14336×4096 (gate/up)", "gemm_nt_bf16", *_gemm(2048, 14336, 4096, False)),
    ("bf16 GEMM 2048×4096×4096 (q/o)", "gemm_nt_bf16", *_gemm(2048, 4096, 4096, False)),
    ("NF4 GEMM 2048×14336×4096 (gate/up)", "gemm_nf4_nt_bf16", *_gemm(2048, 14336, 4096, True)),
    ("NF4 GEMM 2048×1024×4096 (k/v)", "gemm_nf4_nt_bf16", *_gemm(2048, 1024, 4096, True)),
    # q/k/v as one launch: 4096 + 1024 + 1024 output columns of the same x.
    ("NF4 GEMM 2048×(4096+1024+1024)×4096 (q/k/v grouped)", "gemm_nf4_nt_group_bf16",
     *_gemm(2048, 6144, 4096, True)),
    ("NF4 dX 2048×4096×(4096+1024+1024) (q/k/v grouped)", "gemm_nf4_nn_group_bf16",
     *_gemm(2048, 4096, 6144, True)),
    ("NF4 dX 2048×4096×14336 (down)", "gemm_nf4_nn_bf16", *_gemm(2048, 4096, 14336, True)),
    # At head dim 128 the launcher takes the 64-row-tile kernel on 100 KiB-per-SM cards.
    ("flash forward, 2k, d 128", {"H100": "flash_fwd_d128", "H200": "flash_fwd_d128",
                                  "4090": "flash_fwd_r16_d128"}, *_attn(2048)),
    ("flash forward, 8k, d 128", {"H100": "flash_fwd_d128", "H200": "flash_fwd_d128",
                                  "4090": "flash_fwd_r16_d128"}, *_attn(8192)),
    ("flash forward, 2k, d 64", "flash_fwd_d64", *_attn(2048, d=64)),
]


def section_bench_shapes(profile, sass):
    rows = []
    for label, kernels, flop, nbytes in BENCH_SHAPES:
        # One kernel for every card, or the one each card's launch takes.
        per_card = kernels if isinstance(kernels, dict) else {k: kernels for k in ROOFLINE_CARDS}
        names = list(dict.fromkeys(per_card[k] for k in ROOFLINE_CARDS))
        profiles = {n: profile.get(n) for n in names}
        if any(not p or not p["mma"] for p in profiles.values()):
            continue
        waves = {n: waves_per_mma(p) for n, p in profiles.items()}
        row = [label, ", ".join(f"`{n}`" for n in names), si(flop, "FLOP"), size(nbytes),
               f"{flop / nbytes:.0f}", ", ".join(f"{waves[n]:.2f}" for n in names)]
        for key in ROOFLINE_CARDS:
            card = CARDS[key]
            smem = smem_bound(waves[per_card[key]], card)
            dram = min(1.0, flop / nbytes * card["bw"] / peak(card))
            cell, bound = bound_cell(smem, dram, card_issue(sass, per_card[key], card))
            row.append(f"{cell} ({bound * peak(card) / 1e12:.0f} TFLOP/s)")
        rows.append(row)
    if not rows:
        return ["## 4. Bounds at the benches' shapes", "", "(no tensor-core kernel in the profile)"]
    return ["## 4. Bounds at the benches' shapes", "",
            "The same ceilings at the shapes `benches/kernels.rs` times: shared memory from the "
            "profiled wavefronts per MMA (a property of the tiling, so it carries over), DRAM from "
            "the shape's FLOP and compulsory bytes (written out in `scripts/kernel_report.py`), "
            "instruction issue from the kernel's main loop (section 5: also the tiling's). "
            "On H100/H200 `mma.sync` itself is a further cap (see the assumption above); the "
            "issue's targets put the bf16 GEMM at ≥ 45% of cuBLAS there.", ""] + table(
        ["shape", "kernel", "FLOP", "compulsory bytes", "FLOP per byte", "smem wavefronts per MMA"]
        + [CARDS[k]["name"] + " smem / DRAM / issue → bound" for k in ROOFLINE_CARDS], rows)


def section_issue(sass):
    archs = [a for a in ("sm_89", "sm_90") if a in sass]
    names = sorted({n for a in archs for n in sass[a]}, key=natural)
    if not names:
        return ["## 5. Instruction issue in the main loops", "", "(no SASS read: no issue bound)"]
    rows = []
    for name in names:
        row = [f"`{name}`"]
        for arch in archs:
            loop = sass[arch].get(name)
            row += ([loop["hmma"], f"{loop['steady']} ({loop['min']}–{loop['max']})",
                     f"{loop['steady'] / loop['hmma']:.1f}", loop["mufu"]]
                    if loop else ["—", "—", "—", "—"])
        for key in ROOFLINE_CARDS:
            card = CARDS[key]
            loop = sass.get(card["arch"], {}).get(name)
            if not loop:
                row.append("—")
                continue
            cell = f"**{issue_bound(loop, card):.0%}**"
            if sfu_bound(loop, card) < 1.0:
                cell += f" (MUFU {sfu_bound(loop, card):.0%})"
            row.append(cell)
        rows.append(row)
    header = ["kernel"]
    for arch in archs:
        header += [f"{arch} HMMA per iteration", f"{arch} instructions, steady (shortest–longest)",
                   f"{arch} instructions per HMMA (steady)", f"{arch} MUFU (steady)"]
    header += [f"{CARDS[k]['name']} issue bound" for k in ROOFLINE_CARDS]
    clocks = ", ".join(f"{CARDS[k]['name']} {hmma_clocks(CARDS[k]):g}" for k in CARDS)
    return ["## 5. Instruction issue in the main loops", "",
            "Each SM partition issues one warp instruction per clock, and each HMMA.16816 (one "
            f"`mma.sync.m16n8k16`) keeps the partition's tensor core busy for {MMA_FLOP} FLOP over "
            f"its quarter of the SM's FLOP per clock at the dense peak ({clocks} clocks). So an "
            "iteration of I instructions holding H HMMAs reaches at most H × clocks / I of the "
            "peak, however many warps are resident: every other instruction (address arithmetic, "
            "loads, the NF4 decode, the softmax) takes a slot an HMMA could have had. The main "
            "loop and its iterations are read from `cuobjdump -sass` (`scripts/sass_loops.py`: "
            "the loop with the most HMMAs; the paths from its head to its backward branch that "
            "hold all of its HMMAs, inner loops once, predicated instructions counted). The steady "
            "iteration is, of those, the shortest that does the most work (global loads, then "
            "shared-memory accesses, then PRMT/MUFU): it fetches the next tile, for NF4 decodes "
            "it, and skips edge work (a partial K tile, a boundary mask, the adapter's phase); "
            "the shortest path is the pipeline's last tiles, the longest stacks the edge cases. "
            "The special-function unit bounds the same iteration: a warp's MUFU (ex2, the "
            f"reciprocal) holds its partition's unit {MUFU_CLOCKS:g} clocks (16 results per clock "
            "per SM), so U of them allow at most H × clocks / (8·U) of the peak; the issue bound "
            "is the lower of the two, and the MUFU part is shown beside it where it is below "
            "100%. "
            "The bounds here and in sections 3 and 4 use the steady iteration. Not modelled: dual "
            "issue (none on these cards), stalls on latency, and the HMMA rate `mma.sync` "
            "actually sustains on sm_90 (see the assumption above).", ""] + table(header, rows)


def section_reading():
    return ["## How to read this", "",
            "- **regs, spills** — ptxas's registers per thread and `stack frame / spill stores / "
            "spill loads` bytes; any spill is local memory traffic the kernel was not designed for.",
            "- **blocks/SM — limiter** — resident blocks per SM (and warps out of the maximum). "
            "Registers go to warps in units of 256 (registers per thread rounded up to a multiple "
            "of 8, × 32); each of the SM's 4 scheduler partitions holds a quarter of the 65536 "
            "registers in whole warps. Each block's shared memory is rounded up to 128 bytes after "
            "adding the 1 KiB every block reserves. The limiter is whichever of registers, shared "
            "memory, threads/warps and the per-SM block limit allows fewest blocks.",
            "- **mma/ldmatrix** — tensor-core instructions per `ldmatrix.x4`: how many MMAs each "
            "fragment load feeds (register reuse of the warp tile).",
            "- **wave/ideal** — shared-memory wavefronts counted over the ideal; 1.00× is "
            "conflict-free, 2.00× means the requests took twice the cycles. Above "
            f"{CONFLICT_FLAG:.2f}× is flagged with `!`. Bank model: 32 banks of 4 bytes; a warp "
            "request is served in phases (one of 32 lanes for 1–4-byte accesses, two of 16 for "
            "8-byte, four of 8 for 16-byte, and each of ldmatrix.x4's four 8-row groups); a phase "
            "costs as many "
            "wavefronts as the most distinct 4-byte words that land in one bank (the same word "
            "twice is a broadcast, free); its ideal is 1.",
            "- **sectors/ideal** — 32-byte global sectors touched over the fewest that cover the "
            "same bytes: 1.00× is fully coalesced.",
            "- **global reuse** — bytes the threads requested over the distinct bytes touched per "
            "launch: how often each byte is read again (from cache or by another block).",
            "- **Shapes.** Every count is summed over the launches the tests make, so the "
            "coalescing, reuse and DRAM figures mix the tests' shapes (for example, most "
            "`gemm_nt_bf16` launches there compute the LoRA x·Aᵀ, whose output rows are only "
            "r = 8–16 elements long and so store in whole sectors). Bank conflicts, MMAs per "
            "ldmatrix and wavefronts per MMA come from the tiling and hold at any shape.",
            "- **smem bound** — each MMA needs W shared-memory wavefronts, the SM serves one per "
            "clock, so shared memory feeds at most 4096 / W FLOP per clock per SM; divided by the "
            "card's tensor FLOP per clock per SM (capped at 100%).",
            "- **DRAM bound** — FLOP per unique byte × DRAM bandwidth over the tensor peak "
            "(capped at 100%): the unique bytes are compulsory traffic with an infinite cache.",
            "- **issue bound** — the main loop's HMMA tensor clocks over the instructions its "
            "steady iteration issues, or over its MUFUs' clocks on the special-function unit if "
            "that is lower (section 5; compiler output, not simulator counts).",
            "",
            "What the simulator cannot see: time. It has no clock, no caches (L1/L2 hit rates, "
            "the cost of reuse), no latency or how well warps hide it, no pipeline limits beyond "
            "the issue count read from SASS, no power or clock throttling. The bounds are ceilings "
            "implied by counts and spec-sheet peaks; only a run on a card measures speed."]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptxas", required=True, help="directory of sm_XX.txt ptxas -v outputs")
    ap.add_argument("--profile", help="simulator profile (QLORA_SIM_PROFILE file)")
    ap.add_argument("--sass", help="directory of sm_XX.txt `cuobjdump -sass` outputs")
    ap.add_argument("--nvcc-version", default="", help="nvcc version line for the header")
    ap.add_argument("--command", action="append", default=[], help="producing command (repeatable)")
    args = ap.parse_args()
    ptxas, profile = load_ptxas(args.ptxas), load_profile(args.profile)
    sass = load_sass(args.sass)
    sections = [section_header(args), section_cards(), section_resources(ptxas, profile)]
    if profile:
        sections += [section_counts(profile), section_bounds(profile, sass),
                     section_bench_shapes(profile, sass)]
    else:
        sections.append(["No simulator profile (or one without kernel lines): no counts, "
                         "no bounds."])
    sections.append(section_issue(sass))
    sections.append(section_reading())
    print("\n\n".join("\n".join(s) for s in sections))


if __name__ == "__main__":
    main()
