#!/usr/bin/env python3
"""The simulator proves itself: planted bugs in copies of the real kernels must each make a
simulated test fail.

For each mutation below, the kernel sources are copied, the one change is applied (its text must
occur exactly once), the simulated GPU is rebuilt from the copy (only the stand-in library
changes: the Rust test binary is the same, so nothing else is recompiled), and the named tests run
against it with QLORA_REQUIRE_GPU=1. A mutation no test catches fails the check. Prints which test
caught which mutation, and how (the simulator's finding, or the test's own assertion).

Usage: sim/mutation_check.py [NAME ...]     (default: every mutation)
Needs: the release test binary built (cargo test --release --no-run) with GPU kernels.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, original text, mutated text, tests that must catch it)
MUTATIONS = [
    ("swapped mma fragment register", "gemm.cu",
     "    b[2 * np][0] = t[0];\n    b[2 * np][1] = t[1];\n",
     "    b[2 * np][0] = t[1];\n    b[2 * np][1] = t[0];\n",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("missing __syncthreads before a tile is overwritten", "attention.cu",
     "    __syncthreads();  // every warp is done with this V\n",
     "",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("P·V before its V tile has landed (prefetch wait missing)", "attention.cu",
     "    cp_async_wait<0>();  // this V\n",
     "",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("dK/dV reads its prefetched Q and dO before they land (wait missing)", "attention.cu",
     "        cp_async_wait<0>();  // this pair's Q and dO (and K, V on the first)\n",
     "",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("dK/dV's next lse stored into the buffer in use", "attention.cu",
     "slse[b ^ 1][threadIdx.x] = next_lse;",
     "slse[b][threadIdx.x] = next_lse;",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("dQ's dP before its prefetched V tile has landed (wait missing)", "attention.cu",
     "      cp_async_wait<1>();  // this V (this K may still be in flight)\n",
     "",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("dQ's next K fetched while a warp may still read this K (barrier missing)", "attention.cu",
     "      __syncthreads();  // every warp has done its dQ += dS·K with this K\n",
     "",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("missing cp.async wait", "gemm.cu",
     "    cp_async_wait<STAGES - 2>();\n    __syncthreads();\n    const int next = t + STAGES - 1;\n    if (next < ntiles) load(next",
     "    __syncthreads();\n    const int next = t + STAGES - 1;\n    if (next < ntiles) load(next",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("grouped NF4 forward: a block's column tile not moved into its group", "gemm.cu",
     "while (i + 1 < g.groups && tile >= g.tiles_n[i]) tile -= g.tiles_n[i++];",
     "while (i + 1 < g.groups && tile >= g.tiles_n[i]) i++;",
     ["gemm::grouped_nf4_forward_equals_each_projection_alone"]),
    ("grouped NF4 forward: group 1's tiles decoded from group 0's weight", "gemm.cu",
     "case 1: gemm_nf4_body<true>(Nf4Single{g.p[1], g.w[1]}",
     "case 1: gemm_nf4_body<true>(Nf4Single{g.p[1], g.w[0]}",
     ["gemm::grouped_nf4_forward_equals_each_projection_alone"]),
    ("grouped NF4 dX without the adapters' phases of K", "gemm.cu",
     "if (i < g.groups) n += k_tiles(g.p[i].k) + adapter_tiles(g.p[i]);",
     "if (i < g.groups) n += k_tiles(g.p[i].k);",
     ["gemm::grouped_nf4_backward_matches_the_sum_of_each_projection"]),
    ("grouped GEMM: a block past its product's split count not stopped", "gemm.cu",
     "  if ((int)blockIdx.z >= g.splits[j]) return;  // the whole block: no barrier is left waiting\n",
     "",
     ["gemm::grouped_nf4_backward_matches_the_sum_of_each_projection"]),
    ("split-K: the last split's sum leaves out a partial", "gemm.cu",
     "for (int z = 0; z < splits; ++z) sum += __ldcg(",
     "for (int z = 0; z + 1 < splits; ++z) sum += __ldcg(",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("split-K: a tile's counter not reset for the next launch", "gemm.cu",
     "  if (threadIdx.x == 0) *done = 0;\n",
     "",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("grouped tile order without its short last group", "gemm.cu",
     "const int rows = min(GROUP_M, tiles_m - first);",
     "const int rows = GROUP_M;",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("off-by-one tile bound", "gemm.cu",
     "const bool ok = r0 + row < rmax;",
     "const bool ok = r0 + row <= rmax;",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("main-loop loader: the K tile past K not clamped", "gemm.cu",
     "if (KC) n = min(n, 2 * max(0, kend - (k0 + (tid & 3) * 8)));",
     "if (KC) n = n;",
     ["gemm::gemm_all_layouts_match_f64", "gemm::gemm_ptrs_never_reads_row_padding"]),
    ("ldmatrix offsets: B's column-major swizzle without its warp-column bit", "gemm.cu",
     "((wn >> 1) * 8 + ((4 * (wn & 1)) ^ (r & 4)) + ((j >> 1) ^ (r & 1))) * 8",
     "(wn * 4 + ((j >> 1) ^ (r & 1))) * 8",
     ["gemm::gemm_all_layouts_match_f64"]),
    ("NF4 decode: a byte's two elements in the wrong order", "gemm.cu",
     "out[2 * h] = __byte_perm(lo, hi, 0x4051);",
     "out[2 * h] = __byte_perm(lo, hi, 0x5140);",
     ["gemm::nf4_gemm_equals_dequantize_then_gemm"]),
    ("NF4 decode: the table's upper half never picked", "gemm.cu",
     "const uint32_t pick = ((w >> 1) & 0x44444444u) | 0x32103210u;",
     "const uint32_t pick = 0x32103210u;",
     ["gemm::nf4_gemm_equals_dequantize_then_gemm"]),
    ("forward's query tile of 128 tested as one of 64 for its masks (window edge)", "attention.cu",
     "att_interior(q0, k0, len, window, BM)",
     "att_interior(q0, k0, len, window)",
     ["flash::flash_attention_with_scale_softcap_and_window_matches_f64"]),
    ("ldmatrix without .trans", "attention.cu",
     "      ldmatrix_x4_trans(t, s + att_off<D>(kk * 16",
     "      ldmatrix_x4(t, s + att_off<D>(kk * 16",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("power-of-two swizzle at head dim 96 (leaves the 12-chunk row)", "attention.cu",
     "if constexpr ((D / 8) % 8 == 0) return",
     "if constexpr (true) return",
     ["flash::flash_attention_head_dims_96_and_256_match_f64"]),
    ("sliding window starting one key tile late", "attention.cu",
     "max(0, q0 - window + 1) / ATT_BN",
     "max(0, q0 - window + 65) / ATT_BN",
     ["flash::flash_attention_with_scale_softcap_and_window_matches_f64"]),
    ("forward's running sum and output not rescaled when the row max grows", "attention.cu",
     "corr[hr] = ex2_ftz(m[row] - use);",
     "corr[hr] = 1.0f;",
     ["flash::flash_attention_matches_f64_over_lengths_and_gqa"]),
    ("soft cap's 1 - tanh^2 missing from dK", "attention.cu",
     "dpt[nt][e] = pv * (dpt[nt][e] - dsum_b[qi]) * fmaxf(0.0f, 1.0f - t * t);",
     "dpt[nt][e] = pv * (dpt[nt][e] - dsum_b[qi]);",
     ["flash::flash_attention_with_scale_softcap_and_window_matches_f64"]),
    ("soft cap's tanh as 1 - 1/(e^2x + 1) (half the reciprocal's weight)", "ptx.cuh",
     "return fmaf(-2.0f * c, __fdividef(1.0f, ex2_ftz(y) + 1.0f), c);",
     "return fmaf(-1.0f * c, __fdividef(1.0f, ex2_ftz(y) + 1.0f), c);",
     ["flash::flash_attention_with_scale_softcap_and_window_matches_f64"]),
    ("divergent early return before a barrier", "rmsnorm.cu",
     "                                         float eps, int unit_offset) {\n  float ss = 0.0f;\n",
     "                                         float eps, int unit_offset) {\n  if (threadIdx.x == blockDim.x - 1) return;\n  float ss = 0.0f;\n",
     ["kernels::kernels_rmsnorm_match_cpu"]),
    ("race on a shared reduction buffer", "common.cuh",
     "  v = warp_sum(v);\n  __syncthreads();\n  if (lane == 0) partial[warp] = v;\n  __syncthreads();\n",
     "  v = warp_sum(v);\n  __syncthreads();\n  if (lane == 0) partial[warp] = v;\n",
     ["kernels::kernels_rmsnorm_match_cpu"]),
    ("rope pairs (i, i + head_dim/2) under partial rotary", "rope.cu",
     "  bf16* v = x + th * head_dim;\n",
     "  half = head_dim / 2;\n  bf16* v = x + th * head_dim;\n",
     ["kernels::kernels_rope_partial_rotary_and_magnitude_match_cpu"]),
    ("rope's attention factor missing from sin", "rope.cu",
     "  s *= mag;\n",
     "",
     ["kernels::kernels_rope_partial_rotary_and_magnitude_match_cpu"]),
    ("column copy's bound off by one", "split.cu",
     "if (idx >= rows * cols) return;",
     "if (idx > rows * cols) return;",
     ["kernels::kernels_split_cols_and_concat_are_exact"]),
]


def test_binary():
    """The newest release build of the integration tests (under $CARGO_TARGET_DIR when set, as
    cargo puts it, else the repository's target/)."""
    target = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
    found = [p for p in glob.glob(os.path.join(target, "release/deps/integration-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit(f"mutation check: no {target}/release/deps/integration-* "
                 "(run cargo test --release --no-run)")
    return max(found, key=os.path.getmtime)


def how(output):
    """The simulator's finding, or else the first line of the test's panic."""
    lines = output.splitlines()
    for l in lines:
        if l.startswith("qlora-rs simulated GPU: "):
            return l[len("qlora-rs simulated GPU: "):]
    for i, l in enumerate(lines):
        if "panicked at" in l and i + 1 < len(lines):
            return lines[i + 1].strip()
    return "(failed; no message found)"


def main():
    wanted = sys.argv[1:]
    binary = test_binary()
    build = os.path.join(ROOT, "sim", "build.sh")
    results = []
    for name, file, old, new, tests in MUTATIONS:
        if wanted and name not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="qlora-mutant-") as tmp:
            kdir = os.path.join(tmp, "kernels")
            shutil.copytree(os.path.join(ROOT, "kernels"), kdir)
            path = os.path.join(kdir, file)
            text = open(path).read()
            if text.count(old) != 1:
                sys.exit(f"mutation check: `{name}`: its text occurs {text.count(old)} times in "
                         f"kernels/{file} (must be once); update the mutation")
            open(path, "w").write(text.replace(old, new))
            env = dict(os.environ, QLORA_SIM_KERNELS=kdir, QLORA_SIM_DIR=os.path.join(tmp, "sim"))
            b = subprocess.run([build], env=env, capture_output=True, text=True)
            if b.returncode != 0:
                sys.exit(f"mutation check: `{name}` does not compile:\n{b.stderr}")
            env["LD_LIBRARY_PATH"] = b.stdout.strip()
            env["QLORA_REQUIRE_GPU"] = "1"
            caught = None
            start = time.time()
            for t in tests:
                r = subprocess.run([binary, "--exact", t, "--test-threads", "1"], env=env,
                                   capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    caught = (t, how(r.stdout + r.stderr))
                    break
            results.append((name, file, caught, time.time() - start))
            status = f"caught by {caught[0]}: {caught[1]}" if caught else "NOT CAUGHT"
            print(f"{'ok  ' if caught else 'FAIL'} {name} (kernels/{file}): {status} "
                  f"[{time.time() - start:.0f} s]", flush=True)
    missed = [r for r in results if r[2] is None]
    print(f"mutation check: {len(results) - len(missed)} of {len(results)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
