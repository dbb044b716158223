// Flash attention (FlashAttention-2 scheme) on tensor cores: causal, grouped-query, packed
// variable-length sequences (cu_seqlens), head dim 64, 96, 128 or 256, bf16 in and out, fp32 online
// softmax; the forward saves the row log-sum-exp. The T×T scores never exist in memory.
// Options (Gemma 2/3): the score scale, a tanh soft cap c (S = c·tanh(σ q·k / c), 0 = none) and
// a sliding window w (query i sees keys i − w < j ≤ i, 0 = none). The cap's tanh is ctanh_ex2
// (ptx.cuh: one ex2 and one approximate reciprocal, within 5e-7·c of c·tanh; tanhf took about 17
// instructions per score with its branch for small arguments). With a window each kernel
// visits only the tiles that some pair of its tile can see; the forward and dQ mask element by
// element only the tiles on the diagonal, the window's edge or the sequence's end.
// Math and the CPU reference: src/ops/attention.rs.
//
// Forward: one block per (query tile, head, sequence), 4 warps; a warp owns 32 query rows (a
// query tile of 128) at D ≤ 128, 16 (a tile of 64) at D = 256 and in the _r16 kernels (D = 128
// on cards with 100 KiB per SM), so that each K and V fragment it loads from shared memory feeds
// four MMAs (two with 16 rows); key/value tiles of 64 stream through shared memory, each fetched
// while the previous one is used (the next K during P·V, the next V during the next S and
// softmax); S = Q·Kᵀ and O += P·V with mma.sync m16n8k16; the softmax runs in base 2 (log2 e
// folded into the scale, each exponential one ex2.approx.ftz: weights below 2^-126 are 0, where
// exp2f spent three more instructions on each to return them subnormal); query tiles are handed
// out last first (the heaviest under the causal mask; dQ too).
// Backward (deterministic, no atomics):
//   flash_bwd_dsum:  D_i = dO_i · O_i
//   flash_bwd_dkdv:  one block per (key tile, kv head, sequence); loops over the query heads of
//                    its group and the query tiles at or after the keys (and within the window):
//                    dV += Pᵀ·dO, dK += scale·dRᵀ·Q with dS = P ⊙ (dO·Vᵀ − D) and
//                    dR = dS ⊙ (1 − tanh²) through a soft cap (dR = dS without one);
//                    at D = 64 and 128 the next pair's Q, dO, lse and D are fetched while
//                    this pair is used (two buffers)
//   flash_bwd_dq:    one block per (query tile, head, sequence): dQ = scale·Σ_j dR_j·K_j;
//                    at D ≤ 128 each key tile's V and K are fetched while the previous tile
//                    is used (the next V during S, dS and dQ; the next K during the next dP)
//   Both recompute P in base 2 as the forward does: exp2(score·log2 e − lse·log2 e), log2 e
//   folded into the scale or the cap's factor, lse·log2 e once per query row.
// Layouts: q, o, dout, dq [T, H, D]; k, v, dk, dv [T, Hkv, D]; lse, dsum [T, H] fp32.
//
// Tiling per head dim D (a tile: 64 rows × D bf16 = 128·D bytes; "A regs": the 16 × D A operand
// of a warp — Q, dO; K, V in dK/dV — held as D/16 × 4 registers for the whole block, else read
// from shared memory at each of the D/16 k16 steps; accumulators per thread: D/2 fp32 for a
// 16 × D block over a warp, D/(2·SPLIT) where SPLIT warps share its columns):
//   D    fwd (128 thr)              dK/dV                                dQ
//   64   Q 128 rows + K, V: 32 KiB  64 keys, 128 thr, 6 tiles (Q, dO     128 thr, 2 tiles 16 KiB
//        static, A regs, O 2 × 32   twice) 48 KiB dyn, A regs, dK+dV 64  static, A regs, 32 fp32
//        fp32 (32 rows a warp)      fp32
//   96   Q 128 rows + K, V: 48 KiB  64 keys, 128 thr, 4 tiles 48 KiB dyn, 128 thr, 2 tiles 24 KiB
//        static, A from smem, O     A regs, dK+dV 96 fp32                static, A regs, 48 fp32
//        2 × 48 fp32
//   128  Q 128 rows + K, V: 64 KiB  64 keys, 256 thr (SPLIT 2), 6 tiles   128 thr, 2 tiles 32 KiB
//        dyn, A from smem, O 2 × 64 (Q, dO twice) 96 KiB dyn, A regs,    static, A regs, 64 fp32
//        fp32; _r16: 3 tiles 48 KiB dK+dV 64 fp32
//        static, A regs, O 64 fp32
//   256  3 tiles, 96 KiB dynamic,   32 keys, 256 thr (2 warps on keys ×  256 thr (SPLIT 2), 3 tiles
//        A from smem, O 128 fp32    SPLIT 4 on columns): K, V 16 KiB     (Q, dO, one for V then K)
//        (16 rows a warp)           each + Q, dO 32 KiB each = 96 KiB    96 KiB dyn, A from smem,
//                                   dyn, A from smem, dK+dV 64 fp32      dQ 64 fp32
// D = 96 is 6 k16 steps and 12 n8 pairs per row, none of which needs a power of two; only the
// swizzle does (att_off). At 256 every kernel fits the 99 KiB (101376 bytes) a block may opt
// into on sm_86/sm_89 (and sm_80's 163, sm_90's 227 KiB): 96 KiB at most; 64 keys per dK/dV block
// would need four 32 KiB tiles (128 KiB), and Q's fragments in registers 64 more per thread
// beside 128 of accumulators. The price at 256: each dK/dV warp recomputes its 16 × 64 scores and
// dP over the full D for its quarter of the columns (FlashAttention-2 runs 256 with 64 × 64
// blocks where 144 KiB or more is allowed, and smaller ones on sm_86/89, as here).
// ptxas (nvcc 13.0) registers, sm_90 / sm_89 / sm_80, no spills on any (nor on sm_86, sm_120):
//              D = 64         96             128            256
//   fwd        216/222/222    241/237/237    255/253/253    235/230/230
//   fwd_opt    254/254/254    250/255/255    255/255/255    250/254/254
//   fwd_r16                                  166/186/166
//   fwd_opt_r16                              168/229/167
//   dkdv       173/171/171    238/231/231    204/217/217    210/217/217
//   dkdv_opt   172/172/172    254/246/254    239/233/242    233/233/252
//   dq         166/165/165    218/220/220    247/245/245    230/226/226
//   dq_opt     167/168/168    242/244/251    250/255/252    222/224/222
// The forward's 32 rows a warp take all 255 registers ptxas may give a 128-thread block: two
// blocks (8 warps) per SM, as FlashAttention-2's forward at 128 × 64 tiles; each warp has twice
// the independent MMAs to hide latency with. On sm_86/89/120 (100 KiB per SM) the launcher takes
// the _r16 kernels at D = 128: two blocks of 48 KiB where one of 64 KiB would leave 4 warps.
// By registers alone a block of 128 threads fits 4 times per SM at 128 or fewer, 3 times at 168
// or fewer (dq at 64), twice at 255 (shared memory may allow fewer).

#include "common.cuh"

#define ATT_BM 64  // query rows per block of the backward (the forward's: AttFwdRows)
#define ATT_BN 64
#define ATT_THREADS 128
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f
// Occupancy is left to the registers ptxas chooses (no minimum-blocks bound): nvcc 13.0 gives
// the head dim 64 forward 216–254 registers (two blocks of 128 threads per SM) where its Q
// fragments and accumulators need about 160; whether a bound of three blocks (168 registers)
// is faster is a measurement for a GPU.

struct AttnParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* o;
  float* lse;
  const bf16* dout;
  bf16* dq;
  bf16* dk;
  bf16* dv;
  float* dsum;
  const int* cu_seqlens;
  int heads, kv_heads;
  float scale;
  float softcap;  // 0: none
  int window;     // 0: none
};

// The first key tile a query tile starting at q0 sees (0 without a window).
__device__ __forceinline__ int att_first_key_tile(int q0, int window) {
  return window > 0 ? max(0, q0 - window + 1) / ATT_BN * ATT_BN : 0;
}

// One past the last query a key tile of `rows` keys starting at k0 is seen by (len without a
// window).
__device__ __forceinline__ int att_query_end(int k0, int rows, int len, int window) {
  return window > 0 ? min(len, k0 + rows - 1 + window) : len;
}

// Whether every pair of the query tile at q0 and the key tile at k0 is visible: all keys before
// every query, every query inside the sequence (so every key is too) and within the window.
// Such a tile needs no element mask. `bm` is the query tile's rows (the forward's may be 128).
__device__ __forceinline__ bool att_interior(int q0, int k0, int len, int window, int bm = ATT_BM) {
  return k0 + ATT_BN <= q0 && q0 + bm <= len && (window == 0 || q0 + bm - 1 - k0 < window);
}

// The query tile of this block, heaviest first: under a causal mask the last query tiles see
// the most keys, so blocks are handed the tiles from the end (x counts down), and the long
// blocks start first instead of last, when the GPU would otherwise idle on a tail.
__device__ __forceinline__ int att_heavy_first_tile(int bm = ATT_BM) {
  return (gridDim.x - 1 - blockIdx.x) * bm;
}

// Whether query `query` sees key `key` of a sequence of `len`.
__device__ __forceinline__ bool att_visible(int query, int key, int len, int window) {
  return query < len && key < len && key <= query && (window == 0 || query - key < window);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Tile [rows][D] bf16 in shared memory, 16-byte chunks swizzled by row: conflict-free
// ldmatrix (8 consecutive rows, the first a multiple of 8, at one logical chunk), with or without
// .trans. Shared memory has 8 banks of 16 bytes per 128-byte line; a row is D/8 chunks.
//   D = 64, 128, 256 (D/8 a multiple of 8): a row starts on bank 0, so chunk c of row r goes to
//     c ^ (r & 7): eight rows, eight banks, and the XOR stays inside the row's aligned group of 8.
//   D = 96 (12 chunks; 12 ≡ 4 mod 8): row r starts on bank 4·(r & 1), so chunk c goes to
//     c ^ ((r >> 1) & 3): the XOR picks bits 0-1 of the bank (4 row pairs) and the row's parity bit
//     2, eight rows again on eight banks; XOR with at most 3 keeps c inside its aligned group of 4,
//     so inside the 12 chunks of the row (c ^ (r & 7) would reach chunk 15).
template <int D>
__device__ __forceinline__ int att_off(int row, int chunk) {
  static_assert(D % 64 == 0 || D == 96, "head dim 64, 96, 128 or 256");
  if constexpr ((D / 8) % 8 == 0) return row * D + ((chunk ^ (row & 7)) << 3);
  else return row * D + ((chunk ^ ((row >> 1) & 3)) << 3);
}

// Loads rows [r0, r0 + ROWS) of a [T, heads, D] tensor (head h) into a tile; rows ≥ rend are 0.
template <int D, int ROWS = 64>
__device__ __forceinline__ void att_load(bf16* s, const bf16* g, int r0, int rend, int nheads, int h) {
  constexpr int CH = D / 8;
  for (int q = threadIdx.x; q < ROWS * CH; q += blockDim.x) {
    const int row = q / CH, ch = q % CH;
    const int t = r0 + row;
    const bool ok = t < rend;
    const bf16* src = ok ? g + ((long long)t * nheads + h) * D + ch * 8 : g;
    cp_async_16(s + att_off<D>(row, ch), src, ok ? 16 : 0);
  }
}

// A fragments (16 rows × D) of a tile's rows [row0, row0+16): a[kk] for k16 step kk.
template <int D>
__device__ __forceinline__ void att_frag_a(uint32_t (*a)[4], const bf16* s, int row0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(a[kk], s + att_off<D>(row0 + (j & 1) * 8 + r, kk * 2 + (j >> 1)));
}

// Whether a kernel keeps its 16 × D A operands (Q, dO; K, V in dK/dV) as fragments in registers
// for the whole block (D ≤ 128: 4·D/16 registers each) or reloads them from shared memory at each
// k16 step (D = 256, where Q's fragments alone would be 64 registers beside 128 of accumulators).
template <int D>
struct AttAInRegs {
  static constexpr bool value = D <= 128;
};

// A tiles of N × 64 × D bf16: static shared memory where they fit the 48 KiB static limit, else
// the launch's dynamic shared memory (the launcher opts in; see the kernels' tiling notes).
template <int D, int N>
__device__ __forceinline__ bf16* att_tiles() {
  if constexpr (N * 64 * D * 2 <= 48 * 1024) {
    __shared__ __align__(16) bf16 tiles[N * 64 * D];
    return tiles;
  } else {
    return (bf16*)qlora_dynamic_smem();
  }
}

// acc[mi] (16 × 64 each) += A rows [row0 + 16·mi, +16) (16 × D) · B where B(k=d, n=key) =
// tile[key][d] (keys are the rows of tile s): S = Q·Kᵀ style, for the MI m16 row tiles of a warp
// (acc[mi][nt][4] for 8 n8 tiles). Each B fragment (one ldmatrix.x4: 2 n8 tiles × k16) feeds 2·MI
// MMAs. A from registers (a[mi][kk], built by att_frag_a) when AREG, else from tile sa one k16
// step at a time (D = 256, or Q at 32 rows a warp: no A fragments held across the loop).
template <int D, int MI, bool AREG>
__device__ __forceinline__ void att_mma_rows(float (*acc)[8][4], const uint32_t (*a)[AREG ? D / 16 : 1][4],
                                             const bf16* sa, int row0, const bf16* s) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t ak[MI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      if constexpr (AREG) {
#pragma unroll
        for (int e = 0; e < 4; ++e) ak[mi][e] = a[mi][kk][e];
      } else {
        ldmatrix_x4(ak[mi], sa + att_off<D>(row0 + mi * 16 + (j & 1) * 8 + r, kk * 2 + (j >> 1)));
      }
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t t[4];
      ldmatrix_x4(t, s + att_off<D>(np * 16 + (j >> 1) * 8 + r, kk * 2 + (j & 1)));
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        mma_m16n8k16_bf16(acc[mi][2 * np], ak[mi], t[0], t[1]);
        mma_m16n8k16_bf16(acc[mi][2 * np + 1], ak[mi], t[2], t[3]);
      }
    }
  }
}

// acc[mi] (16 × DC each) += P[mi] (16 × 64, A fragments from probabilities) · tile(64 × D)[:,
// col0 .. col0+DC) (O += P·V style); DC = D unless a kernel splits the columns between warps.
// Each tile fragment feeds 2·MI MMAs.
template <int D, int DC, int MI>
__device__ __forceinline__ void att_mma_cols(float (*acc)[DC / 8][4], const uint32_t (*p)[4][4], const bf16* s,
                                             int col0 = 0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)  // 64 keys = 4 k16 steps
#pragma unroll
    for (int np = 0; np < DC / 16; ++np) {
      uint32_t t[4];
      ldmatrix_x4_trans(t, s + att_off<D>(kk * 16 + (j & 1) * 8 + r, (col0 >> 3) + np * 2 + (j >> 1)));
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        mma_m16n8k16_bf16(acc[mi][2 * np], p[mi][kk], t[0], t[1]);
        mma_m16n8k16_bf16(acc[mi][2 * np + 1], p[mi][kk], t[2], t[3]);
      }
    }
}

// C fragments of a 16×64 block (8 n8 tiles) → A fragments of 4 k16 steps (bf16).
__device__ __forceinline__ void att_c_to_a(uint32_t (*a)[4], const float (*c)[4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- forward ----

// Query rows per forward warp, in m16 tiles (MI): two (32 rows, a query tile of 128 over the 4
// warps) where the accumulators fit the registers, so that every K and V fragment loaded from
// shared memory feeds 2·MI MMAs (4) instead of 2; one at D = 256, where a warp's 16 × 256 output
// alone is 128 fp32 registers, and in the _r16 kernels at D = 128, for cards whose SMs hold
// 100 KiB of shared memory (sm_86/89/120: the 64 KiB of Q (128 rows), K and V fit once, the
// 48 KiB of 64 rows twice; FlashAttention-2 takes 64-row tiles there too).
template <int D, int MI = (D <= 128 ? 2 : 1)>
struct AttFwdRows {
  static constexpr int BM = 64 * MI;  // query rows per block
  // Q's fragments stay in registers for the whole block where they are few (4·MI·D/16 registers:
  // 32 at D = 64 or at D = 128 with MI = 1); else they are read from shared memory at each k16
  // step (two ldmatrix beside the four of K at MI = 2), which leaves the registers to the
  // MI × D/2 fp32 of O.
  static constexpr bool AREG = MI * D <= 128;
};

template <int D, bool OPT, int MI = (D <= 128 ? 2 : 1)>
__device__ void flash_fwd(const AttnParams& p) {
  constexpr int BM = AttFwdRows<D, MI>::BM;
  constexpr bool AREG = AttFwdRows<D, MI>::AREG;
  bf16* sq = att_tiles<D, MI + 2>();  // Q (BM rows), K, V (64 rows each)
  bf16* sk = sq + BM * D;
  bf16* sv = sk + 64 * D;
  const int seq = blockIdx.z, h = blockIdx.y;
  const int start = p.cu_seqlens[seq], len = p.cu_seqlens[seq + 1] - start;
  const int q0 = att_heavy_first_tile(BM);
  if (q0 >= len) return;
  const int g = h / (p.heads / p.kv_heads);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = warp * 16 * MI;  // the warp's first row in the query tile
  const int end = start + len;
  const int window = OPT ? p.window : 0;
  const int first_key = att_first_key_tile(q0, window);
  const int last_key = min(len, q0 + BM);  // causal: keys < last query + 1

  // Copies in flight, in order: Q with the first K (one group), then the first V. Each later K
  // tile is fetched once every warp has its scores and this V has landed (while P·V runs; issued
  // before the softmax, its address registers would spill the 32-row accumulators at D = 128),
  // each later V as soon as P·V of the current one is done (while the next S and softmax run).
  att_load<D, BM>(sq, p.q, start + q0, end, p.heads, h);
  att_load<D>(sk, p.k, start + first_key, end, p.kv_heads, g);
  cp_async_commit();
  att_load<D>(sv, p.v, start + first_key, end, p.kv_heads, g);
  cp_async_commit();
  cp_async_wait<1>();  // Q and K
  __syncthreads();
  uint32_t qa[MI][AREG ? D / 16 : 1][4];
  if constexpr (AREG)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) att_frag_a<D>(qa[mi], sq, row0 + mi * 16);

  float o[MI][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.0f;
  // Per thread 2·MI rows: row 2·mi + hr is query q0 + row0 + 16·mi + 8·hr + lane/4. The running
  // max m is in log2 units (scores × log2 e), so the exponentials are exp2.
  float m[2 * MI], l[2 * MI];
#pragma unroll
  for (int i = 0; i < 2 * MI; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  // (computed where used, not held: at D = 128 every register counts)
  const auto qrow = [&](int row) { return q0 + row0 + (row >> 1) * 16 + (row & 1) * 8 + (lane >> 2); };

  const bool cap = OPT && p.softcap > 0.0f;
  // tanh(σ·s / c) is taken as ctanh_ex2(s · 2·log2 e·σ / c).
  const float tanh_k = cap ? 2.0f * ATT_LOG2E * p.scale / p.softcap : 0.0f;
  // log2 e folded into the scale (no cap) or into the cap's factor: x₂ = x · log2 e.
  const float scale2 = p.scale * ATT_LOG2E, cap2 = p.softcap * ATT_LOG2E;
  for (int k0 = first_key; k0 < last_key; k0 += ATT_BN) {
    const bool more = k0 + ATT_BN < last_key;
    if (k0 != first_key) {
      cp_async_wait<1>();  // this K (this V may still be in flight)
      __syncthreads();
    }
    float s[MI][8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int i = 0; i < 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.0f;
    att_mma_rows<D, MI, AREG>(s, qa, sq, row0, sk);
    float tmax[2 * MI];
#pragma unroll
    for (int i = 0; i < 2 * MI; ++i) tmax[i] = -INFINITY;
    // Element masks only on the tiles that need them: the diagonal, the sequence's end, the
    // window's edge.
    if (att_interior(q0, k0, len, window, BM)) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = cap ? ctanh_ex2(s[mi][nt][e] * tanh_k, cap2) : s[mi][nt][e] * scale2;
            s[mi][nt][e] = x;
            tmax[2 * mi + (e >> 1)] = fmaxf(tmax[2 * mi + (e >> 1)], x);
          }
    } else {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
            const int row = 2 * mi + (e >> 1);
            const float x = cap ? ctanh_ex2(s[mi][nt][e] * tanh_k, cap2) : s[mi][nt][e] * scale2;
            s[mi][nt][e] = att_visible(qrow(row), key, len, window) ? x : -INFINITY;
            tmax[row] = fmaxf(tmax[row], s[mi][nt][e]);
          }
    }
    uint32_t pa[MI][4][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      float corr[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = 2 * mi + hr;
        const float mn = fmaxf(m[row], quad_max(tmax[row]));
        const float use = mn == -INFINITY ? 0.0f : mn;
        corr[hr] = ex2_ftz(m[row] - use);
        m[row] = mn;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = ex2_ftz(s[mi][nt][hr * 2 + e] - use);
            s[mi][nt][hr * 2 + e] = pv;
            sum += pv;
          }
        l[row] = l[row] * corr[hr] + quad_sum(sum);
      }
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[mi][i][0] *= corr[0];
        o[mi][i][1] *= corr[0];
        o[mi][i][2] *= corr[1];
        o[mi][i][3] *= corr[1];
      }
      att_c_to_a(pa[mi], s[mi]);
    }
    cp_async_wait<0>();  // this V
    __syncthreads();     // V visible to every warp, and every warp is done with this K
    if (more) att_load<D>(sk, p.k, start + k0 + ATT_BN, end, p.kv_heads, g);
    cp_async_commit();  // (an empty group on the last tile keeps the wait counts uniform)
    att_mma_cols<D, D, MI>(o, pa, sv);
    __syncthreads();  // every warp is done with this V
    if (more) att_load<D>(sv, p.v, start + k0 + ATT_BN, end, p.kv_heads, g);
    cp_async_commit();
  }
  // O /= l; write O and lse.
#pragma unroll
  for (int row = 0; row < 2 * MI; ++row) {
    const int q = qrow(row);
    if (q >= len) continue;
    const int mi = row >> 1, hr = row & 1;
    const float inv = l[row] > 0.0f ? 1.0f / l[row] : 0.0f;
    bf16* orow = p.o + ((long long)(start + q) * p.heads + h) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + (lane & 3) * 2;
      st_bf16x2(orow + col, o[mi][i][hr * 2] * inv, o[mi][i][hr * 2 + 1] * inv);
    }
    // lse in natural units for the backward: m·ln 2 + ln l.
    if ((lane & 3) == 0) p.lse[(long long)(start + q) * p.heads + h] = m[row] * ATT_LN2 + logf(l[row]);
  }
}

// The plain kernels (OPT false: the scale only, what Llama and Qwen need) are compiled without
// the options' code, which costs registers; the _opt kernels read the soft cap and the window.
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_d64(AttnParams p) { flash_fwd<64, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_d96(AttnParams p) { flash_fwd<96, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_d128(AttnParams p) { flash_fwd<128, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_d256(AttnParams p) { flash_fwd<256, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_opt_d64(AttnParams p) { flash_fwd<64, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_opt_d96(AttnParams p) { flash_fwd<96, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_opt_d128(AttnParams p) { flash_fwd<128, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_opt_d256(AttnParams p) { flash_fwd<256, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_r16_d128(AttnParams p) { flash_fwd<128, false, 1>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_fwd_opt_r16_d128(AttnParams p) { flash_fwd<128, true, 1>(p); }

// ---- backward ----

// dsum[t, h] = Σ_d dO·O; one warp per (token, head).
template <int D>
__device__ void flash_dsum(const AttnParams& p, int tokens) {
  const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= (long long)tokens * p.heads) return;
  const bf16* a = p.dout + w * D;
  const bf16* b = p.o + w * D;
  float s = 0.0f;
  for (int i = lane; i < D; i += 32) s += __bfloat162float(a[i]) * __bfloat162float(b[i]);
  s = warp_sum(s);
  if (lane == 0) p.dsum[w] = s;
}
extern "C" __global__ void flash_bwd_dsum_d64(AttnParams p, int tokens) { flash_dsum<64>(p, tokens); }
extern "C" __global__ void flash_bwd_dsum_d96(AttnParams p, int tokens) { flash_dsum<96>(p, tokens); }
extern "C" __global__ void flash_bwd_dsum_d128(AttnParams p, int tokens) { flash_dsum<128>(p, tokens); }
extern "C" __global__ void flash_bwd_dsum_d256(AttnParams p, int tokens) { flash_dsum<256>(p, tokens); }

// The backward's view of one score: with a soft cap, t = tanh(σ·acc / c) (the score is c·t, so
// c·log2 e·t in log2 units, and dR = dS·(1 − t²)); without one, the score in log2 units,
// acc·σ·log2 e (scale2). P = exp2(score₂ − lse·log2 e) as in the forward's base-2 softmax.
__device__ __forceinline__ float att_bwd_score(float acc, float scale2, bool cap, float tanh_k) {
  return cap ? ctanh_ex2(acc * tanh_k, 1.0f) : acc * scale2;
}

// dK, dV for 64 keys of kv head g: warps own 16 keys each.
// Dynamic shared memory: K and V of KROWS keys, then Q and dO tiles of 64 queries, twice at
// D = 64 and 128 (48 and 96 KiB; the launcher opts in above the 48 KiB default), so that the next
// (query head, query tile)'s Q, dO, lse and D are fetched while this one's are used; once at
// D = 96 (48 KiB: twice, 72 KiB, would leave sm_86/sm_89 one block per SM where they hold two)
// and D = 256 (96 KiB: twice would pass the 99 KiB of sm_86/sm_89). 4·SPLIT warps: warp w owns keys
// 16·(w % 4).. and the output columns [(w / 4)·D/SPLIT, ...) of dK and dV (SPLIT = 2 at D = 128
// keeps the fp32 accumulators in registers); each warp recomputes the scores it needs over the
// full head dimension.
template <int D>
struct AttDkdvBuffers {
  static constexpr int N = D == 64 || D == 128 ? 2 : 1;
};

template <int D, int SPLIT, bool OPT, int KROWS = 64>
__device__ void flash_dkdv(const AttnParams& p) {
  constexpr int DC = D / SPLIT;
  constexpr int WR = KROWS / 16;  // warps along the keys
  constexpr bool AREG = AttAInRegs<D>::value;
  constexpr int NBUF = AttDkdvBuffers<D>::N;
  bf16* sk = (bf16*)qlora_dynamic_smem();
  bf16* sv = sk + KROWS * D;
  bf16* sqdo = sv + KROWS * D;  // buffer b: Q at sqdo + 2·b·64·D, dO 64·D after it
  __shared__ float slse[NBUF][64], sdsum[NBUF][64];
  const int seq = blockIdx.z, g = blockIdx.y;
  const int start = p.cu_seqlens[seq], len = p.cu_seqlens[seq + 1] - start;
  const int k0 = blockIdx.x * KROWS;
  if (k0 >= len) return;
  const int warp = (threadIdx.x >> 5) % WR, lane = threadIdx.x & 31;
  const int col0 = ((threadIdx.x >> 5) / WR) * DC;
  const int end = start + len;
  const int group = p.heads / p.kv_heads;
  const bool cap = OPT && p.softcap > 0.0f;
  const int window = OPT ? p.window : 0;
  // tanh(σ·s / c) is taken as ctanh_ex2(s · 2·log2 e·σ / c).
  const float tanh_k = cap ? 2.0f * ATT_LOG2E * p.scale / p.softcap : 0.0f;
  // log2 e folded into the scale and the cap's factor; slse holds lse·log2 e.
  const float scale2 = p.scale * ATT_LOG2E, cap2 = p.softcap * ATT_LOG2E;
  const int query_end = att_query_end(k0, KROWS, len, window);
  const int q_first = (k0 / ATT_BM) * ATT_BM;
  // Q and dO of (query head hq, query tile q0) into buffer b (copies in the open group).
  const auto fetch_tiles = [&](int hq, int q0, int b) {
    att_load<D>(sqdo + 2 * b * 64 * D, p.q, start + q0, end, p.heads, hq);
    att_load<D>(sqdo + (2 * b + 1) * 64 * D, p.dout, start + q0, end, p.heads, hq);
  };
  // lse·log2 e and D of query q0 + threadIdx.x (0 past the sequence), for threads < 64.
  const auto row_stats = [&](int hq, int q0, float& lse2, float& dsum) {
    const int t = q0 + threadIdx.x;
    const long long at = (long long)(start + t) * p.heads + hq;
    lse2 = t < len ? p.lse[at] * ATT_LOG2E : 0.0f;
    dsum = t < len ? p.dsum[at] : 0.0f;
  };
  att_load<D, KROWS>(sk, p.k, start + k0, end, p.kv_heads, g);
  att_load<D, KROWS>(sv, p.v, start + k0, end, p.kv_heads, g);
  if constexpr (NBUF == 2) {
    fetch_tiles(g * group, q_first, 0);
    if (threadIdx.x < 64) row_stats(g * group, q_first, slse[0][threadIdx.x], sdsum[0][threadIdx.x]);
  }
  cp_async_commit();
  float dk[DC / 8][4], dv[DC / 8][4];
#pragma unroll
  for (int i = 0; i < DC / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.0f;
  const int key[2] = {k0 + warp * 16 + (lane >> 2), k0 + warp * 16 + (lane >> 2) + 8};

  // The (query head, query tile) pairs in order, hq outer; pair i uses buffer i % NBUF.
  int b = 0;
  for (int hq = g * group; hq < (g + 1) * group; ++hq) {
    for (int q0 = q_first; q0 < query_end; q0 += ATT_BM) {
      float next_lse = 0.0f, next_dsum = 0.0f;
      bool more = false;
      if constexpr (NBUF == 2) {
        cp_async_wait<0>();  // this pair's Q and dO (and K, V on the first)
        __syncthreads();     // visible to every warp, and every warp is done with the other buffer
        const bool same_head = q0 + ATT_BM < query_end;
        more = same_head || hq + 1 < (g + 1) * group;
        const int nhq = same_head ? hq : hq + 1, nq0 = same_head ? q0 + ATT_BM : q_first;
        if (more) {
          fetch_tiles(nhq, nq0, b ^ 1);
          // Read now, stored after this pair's work: the loads' latency hides behind it.
          if (threadIdx.x < 64) row_stats(nhq, nq0, next_lse, next_dsum);
        }
        cp_async_commit();
      } else {
        __syncthreads();  // every warp is done with the previous pair's Q and dO
        fetch_tiles(hq, q0, 0);
        if (threadIdx.x < 64) row_stats(hq, q0, slse[0][threadIdx.x], sdsum[0][threadIdx.x]);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
      const bf16* sq = sqdo + 2 * b * 64 * D;
      const bf16* sdo = sq + 64 * D;
      const float* lse_b = slse[b];
      const float* dsum_b = sdsum[b];
      // Sᵀ = K·Qᵀ (16 keys × 64 queries) → Pᵀ, dV += Pᵀ·dO; then dPᵀ = V·dOᵀ → dSᵀ; in this
      // order so that fewer fragments are live at once.
      uint32_t frag[AREG ? D / 16 : 1][4];
      float st[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
      if constexpr (AREG) att_frag_a<D>(frag, sk, warp * 16);
      att_mma_rows<D, 1, AREG>(&st, &frag, sk, warp * 16, sq);
      // Without a soft cap st becomes Pᵀ = exp2(score₂ − lse₂); with one, t = tanh (−∞ where
      // masked), from which P = exp2(c·log2 e·t − lse₂) (twice) and 1 − t² are recomputed, so
      // that no second 16 × 64 block stays live. Masked: −∞ in either case (exp2 gives 0); of the
      // forms tried, this one (mask, then exp2) is the one with which neither kernel at head
      // dim 64 spills on sm_80 and sm_89. Every tile is masked here: skipping the mask on interior
      // tiles (as the forward and dQ do) made ptxas spill at head dim 64.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + (lane & 3) * 2 + (e & 1);
          const bool ok = att_visible(q0 + qi, key[e >> 1], len, window);
          const float x = att_bwd_score(st[nt][e], scale2, cap, tanh_k);
          const float y = ok ? x : -INFINITY;
          st[nt][e] = cap ? y : ex2_ftz(y - lse_b[qi]);
        }
      {
        uint32_t pa[4][4];
        if (cap) {
          float pr[8][4];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int qi = nt * 8 + (lane & 3) * 2 + (e & 1);
              pr[nt][e] = ex2_ftz(cap2 * st[nt][e] - lse_b[qi]);
            }
          att_c_to_a(pa, pr);
        } else {
          att_c_to_a(pa, st);
        }
        att_mma_cols<D, DC, 1>(&dv, &pa, sdo, col0);  // dV += Pᵀ·dO
      }
      float dpt[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
      if constexpr (AREG) att_frag_a<D>(frag, sv, warp * 16);
      att_mma_rows<D, 1, AREG>(&dpt, &frag, sv, warp * 16, sdo);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + (lane & 3) * 2 + (e & 1);
          if (cap) {
            // Masked: t = −∞ gives P = 0 and a factor max(0, 1 − ∞) = 0.
            const float t = st[nt][e];
            const float pv = ex2_ftz(cap2 * t - lse_b[qi]);
            dpt[nt][e] = pv * (dpt[nt][e] - dsum_b[qi]) * fmaxf(0.0f, 1.0f - t * t);
          } else {
            dpt[nt][e] = st[nt][e] * (dpt[nt][e] - dsum_b[qi]);
          }
        }
      uint32_t dsa[4][4];
      att_c_to_a(dsa, dpt);
      att_mma_cols<D, DC, 1>(&dk, &dsa, sq, col0);  // dK += dSᵀ·Q (scaled below)
      if constexpr (NBUF == 2) {
        if (more && threadIdx.x < 64) {
          slse[b ^ 1][threadIdx.x] = next_lse;
          sdsum[b ^ 1][threadIdx.x] = next_dsum;
        }
        b ^= 1;
      }
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int kk = key[hr];
    if (kk >= len) continue;
    const long long at = ((long long)(start + kk) * p.kv_heads + g) * D;
#pragma unroll
    for (int i = 0; i < DC / 8; ++i) {
      const int col = col0 + i * 8 + (lane & 3) * 2;
      st_bf16x2(p.dk + at + col, dk[i][hr * 2] * p.scale, dk[i][hr * 2 + 1] * p.scale);
      st_bf16x2(p.dv + at + col, dv[i][hr * 2], dv[i][hr * 2 + 1]);
    }
  }
}
#define DKDV96_SPLIT 1
#define DKDV256_SPLIT 4
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dkdv_d64(AttnParams p) { flash_dkdv<64, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(DKDV96_SPLIT * ATT_THREADS) flash_bwd_dkdv_d96(AttnParams p) { flash_dkdv<96, DKDV96_SPLIT, false>(p); }
extern "C" __global__ void __launch_bounds__(2 * ATT_THREADS) flash_bwd_dkdv_d128(AttnParams p) { flash_dkdv<128, 2, false>(p); }
extern "C" __global__ void __launch_bounds__(DKDV256_SPLIT * ATT_THREADS / 2) flash_bwd_dkdv_d256(AttnParams p) { flash_dkdv<256, DKDV256_SPLIT, false, 32>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dkdv_opt_d64(AttnParams p) { flash_dkdv<64, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(DKDV96_SPLIT * ATT_THREADS) flash_bwd_dkdv_opt_d96(AttnParams p) { flash_dkdv<96, DKDV96_SPLIT, true>(p); }
extern "C" __global__ void __launch_bounds__(2 * ATT_THREADS) flash_bwd_dkdv_opt_d128(AttnParams p) { flash_dkdv<128, 2, true>(p); }
extern "C" __global__ void __launch_bounds__(DKDV256_SPLIT * ATT_THREADS / 2) flash_bwd_dkdv_opt_d256(AttnParams p) { flash_dkdv<256, DKDV256_SPLIT, true, 32>(p); }

// dQ for 64 queries of head h: warps own 16 queries each.
// Two 64 × D tiles (D ≤ 128): Q and dO while their fragments are built, then K and V, each key
// tile's K and V fetched while the previous one is used (below). D = 256: Q, dO and one tile for
// V, then K.
template <int D, int SPLIT, bool OPT>
__device__ void flash_dq(const AttnParams& p) {
  constexpr bool AREG = AttAInRegs<D>::value;
  constexpr int DC = D / SPLIT;
  bf16* sa = att_tiles<D, AREG ? 2 : 3>();
  bf16* sb = sa + 64 * D;
  bf16* sq = sa;
  bf16* sdo = sb;
  bf16* sk = AREG ? sa : sb + 64 * D;
  bf16* sv = AREG ? sb : sb + 64 * D;
  const int seq = blockIdx.z, h = blockIdx.y;
  const int start = p.cu_seqlens[seq], len = p.cu_seqlens[seq + 1] - start;
  const int q0 = att_heavy_first_tile();
  if (q0 >= len) return;
  const int g = h / (p.heads / p.kv_heads);
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int col0 = (threadIdx.x >> 7) * DC;
  const int end = start + len;
  const bool cap = OPT && p.softcap > 0.0f;
  const int window = OPT ? p.window : 0;
  const int first_key = att_first_key_tile(q0, window);
  const int last_key = min(len, q0 + ATT_BM);
  att_load<D>(sq, p.q, start + q0, end, p.heads, h);
  att_load<D>(sdo, p.dout, start + q0, end, p.heads, h);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qa[AREG ? D / 16 : 1][4], doa[AREG ? D / 16 : 1][4];
  if constexpr (AREG) {
    att_frag_a<D>(qa, sq, warp * 16);
    att_frag_a<D>(doa, sdo, warp * 16);
    // Copies in flight, in the order of their use: the first V, then the first K (the tiles of
    // dO and Q, once every warp holds its fragments). Each iteration uses V (dP = dO·Vᵀ) before
    // K (S = Q·Kᵀ, then dQ += dS·K); the next V is fetched as soon as every warp has its dP
    // (while S, dS and dQ run), the next K as soon as dQ is done (while the next dP runs). So at
    // the top of an iteration the groups in flight are at most [V, K] (this tile's, in that
    // order; empty after the last tile): wait<1> is exactly this V. After dP only this K is in
    // flight (the next V is issued after the wait): wait<0> is exactly this K, and the barrier
    // after it both publishes K and ends every warp's reads of V, so one barrier serves both.
    __syncthreads();  // every warp holds its Q and dO fragments
    att_load<D>(sv, p.v, start + first_key, end, p.kv_heads, g);
    cp_async_commit();
    att_load<D>(sk, p.k, start + first_key, end, p.kv_heads, g);
    cp_async_commit();
  }
  const int qrow[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
  // lse in log2 units (lse·log2 e), once per row: P = exp2(score₂ − lse₂).
  float lse2[2], ds_[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const bool ok = qrow[hr] < len;
    const long long at = (long long)(start + qrow[hr]) * p.heads + h;
    lse2[hr] = ok ? p.lse[at] * ATT_LOG2E : 0.0f;
    ds_[hr] = ok ? p.dsum[at] : 0.0f;
  }
  float dq[DC / 8][4];
#pragma unroll
  for (int i = 0; i < DC / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
  // tanh(σ·s / c) is taken as ctanh_ex2(s · 2·log2 e·σ / c).
  const float tanh_k = cap ? 2.0f * ATT_LOG2E * p.scale / p.softcap : 0.0f;
  // log2 e folded into the scale (no cap) or into the cap's factor.
  const float scale2 = p.scale * ATT_LOG2E, cap2 = p.softcap * ATT_LOG2E;
  for (int k0 = first_key; k0 < last_key; k0 += ATT_BN) {
    const bool more = k0 + ATT_BN < last_key;
    float s[8][4], dp[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.0f;
    if constexpr (AREG) {
      cp_async_wait<1>();  // this V (this K may still be in flight)
      __syncthreads();
      att_mma_rows<D, 1, AREG>(&dp, &doa, sdo, warp * 16, sv);
      cp_async_wait<0>();  // this K (nothing else is in flight)
      __syncthreads();     // this K has landed, and every warp is done with this V
      if (more) att_load<D>(sv, p.v, start + k0 + ATT_BN, end, p.kv_heads, g);
      cp_async_commit();  // (an empty group on the last tile keeps the wait counts uniform)
      att_mma_rows<D, 1, AREG>(&s, &qa, sq, warp * 16, sk);
    } else {
      // One tile for V, then K (kept for dQ += dS·K below); no room to fetch ahead.
      __syncthreads();  // every warp is done with the last K
      att_load<D>(sv, p.v, start + k0, end, p.kv_heads, g);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      att_mma_rows<D, 1, AREG>(&dp, &doa, sdo, warp * 16, sv);
      __syncthreads();  // V is no longer read
      att_load<D>(sk, p.k, start + k0, end, p.kv_heads, g);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      att_mma_rows<D, 1, AREG>(&s, &qa, sq, warp * 16, sk);
    }
    // dS = P ⊙ (dP − D) with P = exp2(score₂ − lse₂) (0 where masked); dR = dS ⊙ (1 − t²)
    // through a soft cap, dS without one. The cap is uniform over the block: one loop per case,
    // each with only its own values live (with both in one loop, ptxas spilled at head dim 64).
    const bool interior = OPT && att_interior(q0, k0, len, window);
    if (cap) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1;
          const int key = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const bool ok = interior || att_visible(qrow[hr], key, len, window);
          const float t = att_bwd_score(s[nt][e], scale2, true, tanh_k);
          const float pv = ex2_ftz(ok ? cap2 * t - lse2[hr] : -INFINITY);
          s[nt][e] = pv * (dp[nt][e] - ds_[hr]) * (1.0f - t * t);
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1;
          const int key = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const bool ok = interior || att_visible(qrow[hr], key, len, window);
          const float x = att_bwd_score(s[nt][e], scale2, false, tanh_k);
          const float pv = ex2_ftz(ok ? x - lse2[hr] : -INFINITY);
          s[nt][e] = pv * (dp[nt][e] - ds_[hr]);
        }
    }
    uint32_t dsa[4][4];
    att_c_to_a(dsa, s);
    att_mma_cols<D, DC, 1>(&dq, &dsa, sk, col0);  // dQ += dS·K
    if constexpr (AREG) {
      __syncthreads();  // every warp has done its dQ += dS·K with this K
      if (more) att_load<D>(sk, p.k, start + k0 + ATT_BN, end, p.kv_heads, g);
      cp_async_commit();
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (qrow[hr] >= len) continue;
    bf16* row = p.dq + ((long long)(start + qrow[hr]) * p.heads + h) * D;
#pragma unroll
    for (int i = 0; i < DC / 8; ++i) {
      const int col = col0 + i * 8 + (lane & 3) * 2;
      st_bf16x2(row + col, dq[i][hr * 2] * p.scale, dq[i][hr * 2 + 1] * p.scale);
    }
  }
}
#define DQ256_SPLIT 2
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_d64(AttnParams p) { flash_dq<64, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_d96(AttnParams p) { flash_dq<96, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_d128(AttnParams p) { flash_dq<128, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(DQ256_SPLIT * ATT_THREADS) flash_bwd_dq_d256(AttnParams p) { flash_dq<256, DQ256_SPLIT, false>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_opt_d64(AttnParams p) { flash_dq<64, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_opt_d96(AttnParams p) { flash_dq<96, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_opt_d128(AttnParams p) { flash_dq<128, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(DQ256_SPLIT * ATT_THREADS) flash_bwd_dq_opt_d256(AttnParams p) { flash_dq<256, DQ256_SPLIT, true>(p); }
