// Tensor-core GEMMs (mma.sync m16n8k16 bf16, fp32 accumulation, cp.async 3-stage pipeline) for
// the three products of a linear layer, with an fp32 or bf16 output, C = alpha·A·B + beta·C,
// split-K for skinny shapes (each split writes an fp32 partial; the last split of a tile to finish
// sums the partials in split order, so the result does not depend on which finished last). The NF4
// variants take B as packed NF4 + (double-quantized) scales and dequantize each tile into shared
// memory, so W never exists in bf16 in device memory, with an optional second phase of K that
// adds A2·B2 before the epilogue (the fused LoRA terms: s·(X·Aᵀ)·Bᵀ in the forward, (s·dY·B)·A
// in the dX).
// Math, shapes and the CPU references: src/ops/gemm.rs.
//
// Operand layouts (KC: contiguous along k; MC: contiguous along m or n):
//   gemm_nt: A = X [M, K] (KC), B = W [N, K] (KC)        Y = X·Wᵀ
//   gemm_nn: A = dY [M, K] (KC), B = W [K, N] (MC)       dX = dY·W
//   gemm_tn: A = dYᵀ, dY [K, M] (MC), B = X [K, N] (MC)   dW = dYᵀ·X
// Requirements (checked by the launchers): every contiguous dimension is a multiple of 8 and
// every row start 16-byte aligned; M, N, K otherwise arbitrary (edges are zero-filled).
//
// Block tile 128×128×32, 8 warps as 2 (m) × 4 (n), warp tile 64×32 = 4×4 mma tiles. Shared
// memory rows are XOR-swizzled by 16-byte chunk so ldmatrix reads are bank-conflict free.
// Blocks take their output tiles in groups of GROUP_M tile rows, down each column of a group
// before the next column (gemm_tile), so that the blocks resident at once share B panels as well
// as A panels in L2: an LM head's weight slice is read from DRAM about once per group instead of
// once per tile row.

#include "common.cuh"

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3
#define THREADS 256
#define TILE_ELEMS (BM * BK)  // = BN * BK
// Occupancy the tiles are designed for: two 256-thread blocks per SM, so one block's loads
// overlap the other's mma. That caps registers at 128 per thread (ptxas spills rather than
// exceed it; build.rs reports any spill), and shared memory at 2 × 48 KiB (plain) or
// 2 × 40 KiB (NF4), which every sm_80+ SM holds (sm_86/89/120: 100 KiB).
#define MIN_BLOCKS 2
#define GROUP_M 8

struct GemmParams {
  const bf16* a;
  const bf16* b;
  void* c;
  float* partial;  // split-K workspace [splits, m, n] (fp32) when K is split
  unsigned int* tile_done;  // split-K: per output tile, the splits finished (0 between launches)
  // The NF4 kernels' second phase: A2 [m, k2] (KC) and B2: [n, k2] (KC) in the forward, [k2, n]
  // (MC) in the dX (the LoRA input gradient); null when absent (always, for the plain GEMMs).
  const bf16* a2;
  const bf16* b2;
  long long lda, ldb, ldc, lda2, ldb2;
  int m, n, k, k2;
  int k_tiles_per_split;
  float alpha, beta;
};

// NF4 weight W [rows, cols] (row-major flattened, blocks of a power-of-two size).
struct Nf4Params {
  const uint8_t* packed;
  const float* absmax;      // plain scales (null with double quantization)
  const uint8_t* absmax_q;  // double quantization: codes, second-level absmax, offset, map
  const float* absmax2;
  const float* offset;
  const float* code2;
  long long rows, cols;
  int blocksize_log2;  // blocks of 2^blocksize_log2 elements: the block of element i is i >> it
  Nf4Code code;        // the codebook, by value: read from the constant bank, never from memory
};

// ---- swizzled shared-memory addressing (element offsets) ----
// KC tile: [128 rows][32 k]: 4 chunks of 8 per row; chunk ^= (row >> 1) & 3.
__device__ __forceinline__ int off_kc(int row, int chunk) { return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3); }
// MC tile: [32 k-rows][128]: 16 chunks per row; chunk ^= row & 7.
__device__ __forceinline__ int off_mc(int krow, int chunk) { return krow * BM + ((chunk ^ (krow & 7)) << 3); }

// One thread's share of an operand tile's loads in the main loop, worked out once per output tile:
// a K tile then costs two pointer steps and the two copies, and a clamp on the one K tile that
// reaches past K (working each chunk's source and slot out from scratch for every K tile, with
// 64-bit multiplies and bounds checks, was most of an iteration's instructions: the kernel
// report's issue section). Chunk i (i = 0, 1) of the 512 16-byte chunks of a tile is q = tid +
// 256·i: KC rows (q >> 2) at k (q & 3)·8, i.e. rows (tid >> 2) + 64·i; MC k-rows (q >> 4) at
// column (q & 15)·8, i.e. k-rows (tid >> 4) + 16·i. Both chunks share the swizzle, so chunk 1's
// slot is chunk 0's + 2048 elements (64·BK = 16·BM). A chunk copies only what lies inside the
// matrix (16 bytes, fewer where a row of MC ends mid-chunk, 0 outside) and zero-fills the rest,
// so the row padding is never read; the source of a row or column out of range is the tile's
// first (in range): it copies 0 bytes, and its address stays a valid one.
#define CHUNK1 2048

template <bool KC>
struct TileLoader {
  const bf16* src[2];  // each chunk's source in the next K tile to load
  int bytes[2];        // what each chunk copies of a whole K tile (16; fewer or 0 at the M/N edge)
  int slot;            // chunk 0's element offset in a stage

  // For the operand tile at rows (KC) or columns (MC) [r0, r0 + 128) of g, starting at K tile k0.
  __device__ __forceinline__ void init(const bf16* g, long long ld, int r0, int rmax, int k0) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (KC) {
        const int row = (tid >> 2) + 64 * i, ch = tid & 3;
        const bool ok = r0 + row < rmax;
        src[i] = g + (long long)(ok ? r0 + row : r0) * ld + k0 + ch * 8;
        bytes[i] = ok ? 16 : 0;
      } else {
        const int krow = (tid >> 4) + 16 * i, gr = r0 + (tid & 15) * 8;
        const bool ok = gr < rmax;
        src[i] = g + (long long)(k0 + krow) * ld + (ok ? gr : r0);
        bytes[i] = ok ? 2 * min(8, rmax - gr) : 0;
      }
    }
    slot = KC ? off_kc(tid >> 2, tid & 3) : off_mc(tid >> 4, tid & 15);
  }

  // Copies the K tile at k0 (the one src points at) into stage s, then moves src to the next.
  // Only a tile reaching past kend copies less: KC chunks up to kend, MC k-rows before it.
  __device__ __forceinline__ void load(bf16* s, const bf16* g, long long ld, int k0, int kend) {
    if (k0 + BK <= kend) {
      cp_async_16(s + slot, src[0], bytes[0]);
      cp_async_16(s + slot + CHUNK1, src[1], bytes[1]);
    } else {
      const int tid = threadIdx.x;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        int n = bytes[i];
        if (KC) n = min(n, 2 * max(0, kend - (k0 + (tid & 3) * 8)));
        else n = k0 + (tid >> 4) + 16 * i < kend ? n : 0;
        cp_async_16(s + slot + CHUNK1 * i, n > 0 ? src[i] : g, n);
      }
    }
    const long long step = KC ? (long long)BK : BK * ld;
    src[0] += step;
    src[1] += step;
  }
};

// Each lane's ldmatrix addresses in a stage, worked out once per block rather than for every k16
// step (lane = 8j + r).
// KC tile: a lane's swizzle is (r >> 1) & 3 for all of its rows (they differ by multiples of 8),
// so the 16-row blocks mi (np) lie 16·BK elements apart, and the second k16 step (chunk + 2, the
// chunk being 0 or 1) flips bit 4 of the offset.
// MC tile: the swizzle is r, XORed into the 16-byte chunk. A's chunk is 8·wm + 2·mi + h (h = 0
// or 1): bitwise, its XOR with r is 8·wm + 2·(mi ^ q) + (h ^ (r & 1)), q = (r >> 1) & 3, so block
// mi lies 16·(mi ^ q) elements from a per-lane start. B's chunk is 4·wn + 2·np + h, whose bit 2
// (wn's low bit) meets r's: its XOR with r is 8·(wn >> 1) + (4·(wn & 1) ^ (r & 4)) + 2·(np ^ (q &
// 1)) + (h ^ (r & 1)). The second k16 step is 16 rows (16·BM elements) further.
template <bool A_KC, bool B_KC>
struct FragOffsets {
  int a, b;  // KC: block 0 at kk = 0; MC: the per-lane start (the block term left out)
  int q16;   // MC: 16·q

  __device__ __forceinline__ FragOffsets() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int j = lane >> 3, r = lane & 7;
    q16 = ((r >> 1) & 3) * 16;
    a = A_KC ? off_kc(wm * 64 + (j & 1) * 8 + r, j >> 1)
             : ((j >> 1) * 8 + r) * BM + (wm * 8 + ((j & 1) ^ (r & 1))) * 8;
    b = B_KC ? off_kc(wn * 32 + (j >> 1) * 8 + r, j & 1)
             : ((j & 1) * 8 + r) * BM + ((wn >> 1) * 8 + ((4 * (wn & 1)) ^ (r & 4)) + ((j >> 1) ^ (r & 1))) * 8;
  }
  __device__ __forceinline__ int at_a(int mi, int kk) const {
    return A_KC ? (a ^ (kk * 16)) + mi * 16 * BK : a + ((mi * 16) ^ q16) + kk * 16 * BM;
  }
  __device__ __forceinline__ int at_b(int np, int kk) const {
    return B_KC ? (b ^ (kk * 16)) + np * 16 * BK : b + ((np * 16) ^ (q16 & 16)) + kk * 16 * BM;
  }
};

// Fragments of one k16 step (kk = 0 or 1 within the BK = 32 tile) and the 16 mma.
template <bool A_KC, bool B_KC>
__device__ __forceinline__ void compute_tile(const bf16* sa, const bf16* sb, const FragOffsets<A_KC, B_KC>& fo,
                                             float (*acc)[4][4], int kk) {
  uint32_t a[4][4], b[4][2];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    if (A_KC) ldmatrix_x4(a[mi], sa + fo.at_a(mi, kk));
    else ldmatrix_x4_trans(a[mi], sa + fo.at_a(mi, kk));
  }
#pragma unroll
  for (int np = 0; np < 2; ++np) {
    uint32_t t[4];
    if (B_KC) ldmatrix_x4(t, sb + fo.at_b(np, kk));
    else ldmatrix_x4_trans(t, sb + fo.at_b(np, kk));
    b[2 * np][0] = t[0];
    b[2 * np][1] = t[1];
    b[2 * np + 1][0] = t[2];
    b[2 * np + 1][1] = t[3];
  }
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) mma_m16n8k16_bf16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
}

template <typename OutT>
__device__ __forceinline__ void store_out(OutT* c, long long i, float v);
template <>
__device__ __forceinline__ void store_out<float>(float* c, long long i, float v) { c[i] = v; }
template <>
__device__ __forceinline__ void store_out<bf16>(bf16* c, long long i, float v) { c[i] = __float2bfloat16_rn(v); }
// Elements i and i + 1 (when `both`; else i alone): one store where the pair is aligned to its
// size, two otherwise. The output's N (e.g. an odd vocabulary) and row stride need not be even.
__device__ __forceinline__ void store_pair(float* c, long long i, float v0, float v1, bool both) {
  if (both && (reinterpret_cast<uintptr_t>(c + i) & 7) == 0) {
    st_vec(reinterpret_cast<float2*>(c + i), make_float2(v0, v1));
    return;
  }
  c[i] = v0;
  if (both) c[i + 1] = v1;
}
__device__ __forceinline__ void store_pair(bf16* c, long long i, float v0, float v1, bool both) {
  if (both && (reinterpret_cast<uintptr_t>(c + i) & 3) == 0) {
    st_bf16x2(c + i, v0, v1);
    return;
  }
  c[i] = __float2bfloat16_rn(v0);
  if (both) c[i + 1] = __float2bfloat16_rn(v1);
}
__device__ __forceinline__ float load_out(const float* c, long long i) { return c[i]; }
__device__ __forceinline__ float load_out(const bf16* c, long long i) { return __bfloat162float(c[i]); }

// The epilogue: C = alpha·acc + beta·C, or (when K is split) split z's fp32 partial.
template <typename OutT>
__device__ __forceinline__ void epilogue(const GemmParams& p, float (*acc)[4][4], int m0, int n0, int z, bool split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * 64 + mi * 16 + (lane >> 2) + h * 8;
        const int col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
        if (row >= p.m || col >= p.n) continue;
        // The lane's two columns, stored together where they can be.
        const bool both = col + 1 < p.n;
        const float v0 = acc[mi][ni][h * 2], v1 = acc[mi][ni][h * 2 + 1];
        if (split) {
          store_pair(p.partial + ((long long)z * p.m + row) * p.n, col, v0, v1, both);
        } else {
          OutT* c = (OutT*)p.c;
          const long long at = (long long)row * p.ldc + col;
          float out0 = p.alpha * v0, out1 = p.alpha * v1;
          if (p.beta != 0.0f) {
            out0 += p.beta * load_out(c, at);
            if (both) out1 += p.beta * load_out(c, at + 1);
          }
          store_pair(c, at, out0, out1, both);
        }
      }
}

// Tile i of a tiles_n × tiles_m output, as (first row m0, first column n0). Blocks start in the
// order of their linear index; that index is mapped to tiles in groups of GROUP_M tile rows (the
// last group may be smaller), column by column inside a group: index i → group i / (GROUP_M·X),
// then within it row i % rows, column i / rows. A bijection on the X × Y tiles, so every tile is
// computed once.
__device__ __forceinline__ void tile_at(int i, int tiles_n, int tiles_m, int& m0, int& n0) {
  const int per_group = GROUP_M * tiles_n;
  const int first = i / per_group * GROUP_M;
  const int rows = min(GROUP_M, tiles_m - first);
  const int in = i - first * tiles_n;  // index inside the group
  m0 = (first + in % rows) * BM;
  n0 = in / rows * BN;
}
// This block's tile of a grid of (N tiles, M tiles), by its linear index x + y·X.
__device__ __forceinline__ void gemm_tile(int& m0, int& n0) {
  tile_at(blockIdx.y * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, m0, n0);
}

// After a split's partial of tile (m0, n0) is stored: the last of the tile's splits to get here
// computes C = alpha·Σ_z partial[z] + beta·C over the tile, z in order 0, 1, ... (the same sum
// whichever split finished last), and resets the tile's counter for the next launch. The
// threadfence before the count publishes this block's partial; the one after it orders the last
// block's reads after every other block's count (the grad_norm pattern in adamw.cu).
template <typename OutT>
__device__ void split_finish(const GemmParams& p, int m0, int n0, int splits) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  unsigned int* done = p.tile_done + (m0 / BM) * ((p.n + BN - 1) / BN) + n0 / BN;
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == (unsigned int)splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  OutT* c = (OutT*)p.c;
  const long long plane = (long long)p.m * p.n;
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int row = m0 + e / BN, col = n0 + e % BN;
    if (row >= p.m || col >= p.n) continue;
    const long long i = (long long)row * p.n + col;
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += __ldcg(p.partial + z * plane + i);  // L2: written by other SMs
    const long long at = (long long)row * p.ldc + col;
    float out = p.alpha * sum;
    if (p.beta != 0.0f) out += p.beta * load_out(c, at);
    store_out<OutT>(c, at, out);
  }
  if (threadIdx.x == 0) *done = 0;
}

// The output tile at (m0, n0), split z of `splits` along K.
template <bool A_KC, bool B_KC, typename OutT>
__device__ void gemm_body(const GemmParams& p, int m0, int n0, int z, int splits) {
  bf16* sa = (bf16*)qlora_dynamic_smem();
  bf16* sb = sa + STAGES * TILE_ELEMS;
  // The plain GEMMs have no second phase (a2 is the NF4 kernels' adapter term).
  const int tiles1 = (p.k + BK - 1) / BK;
  const int t_begin = z * p.k_tiles_per_split;
  const int ntiles = max(0, min(tiles1, t_begin + p.k_tiles_per_split) - t_begin);

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  TileLoader<A_KC> la;
  TileLoader<B_KC> lb;
  la.init(p.a, p.lda, m0, p.m, t_begin * BK);
  lb.init(p.b, p.ldb, n0, p.n, t_begin * BK);
  // Tiles are loaded in order, so the loaders' sources are always at tile t.
  auto load = [&](int t, int stage) {
    const int k0 = (t_begin + t) * BK;
    la.load(sa + stage * TILE_ELEMS, p.a, p.lda, k0, p.k);
    lb.load(sb + stage * TILE_ELEMS, p.b, p.ldb, k0, p.k);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load(s, s);
    cp_async_commit();
  }
  const FragOffsets<A_KC, B_KC> fo;
  // The stages tile t reads and tile t + STAGES - 1 fills, counted round rather than t % STAGES.
  int use = 0, fill = STAGES - 1;
  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = t + STAGES - 1;
    if (next < ntiles) load(next, fill);
    cp_async_commit();
    const bf16* ta = sa + use * TILE_ELEMS;
    const bf16* tb = sb + use * TILE_ELEMS;
    compute_tile<A_KC, B_KC>(ta, tb, fo, acc, 0);
    compute_tile<A_KC, B_KC>(ta, tb, fo, acc, 1);
    use = use == STAGES - 1 ? 0 : use + 1;
    fill = fill == STAGES - 1 ? 0 : fill + 1;
  }
  cp_async_wait<0>();
  epilogue<OutT>(p, acc, m0, n0, z, splits > 1);
  if (splits > 1) split_finish<OutT>(p, m0, n0, splits);
}

template <bool A_KC, bool B_KC, typename OutT>
__device__ void gemm_entry(const GemmParams& p) {
  int m0, n0;
  gemm_tile(m0, n0);
  gemm_body<A_KC, B_KC, OutT>(p, m0, n0, blockIdx.z, gridDim.z);
}

#define GEMM_ENTRY(NAME, AKC, BKC, OUT) \
  extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(GemmParams p) { gemm_entry<AKC, BKC, OUT>(p); }

GEMM_ENTRY(gemm_nt_bf16, true, true, bf16)
GEMM_ENTRY(gemm_nt_f32, true, true, float)
GEMM_ENTRY(gemm_nn_bf16, true, false, bf16)
GEMM_ENTRY(gemm_nn_f32, true, false, float)
GEMM_ENTRY(gemm_tn_bf16, false, false, bf16)
GEMM_ENTRY(gemm_tn_f32, false, false, float)

// ---- grouped: several independent products in one launch (the adapters of q/k/v, gate/up) ----
// Product j's output tiles are blocks [Σ_{i<j} tiles_i, Σ_{i≤j} tiles_i) of the grid's x, each
// split along K as product j would be alone (splits_j, its partial and tile counters in p[j]);
// gridDim.z is the largest split count and a block past its product's count does nothing. Every
// block runs gemm_body as the one-product kernel would for that tile and split: the same bits.
#define PRODUCTS_MAX 3

struct GemmGroup {
  GemmParams p[PRODUCTS_MAX];
  int tiles[PRODUCTS_MAX];   // tiles_m · tiles_n of each product
  int splits[PRODUCTS_MAX];  // each product's K splits (1: no split, no partial)
  int products;
};

template <bool A_KC, bool B_KC, typename OutT>
__device__ void gemm_group_entry(const GemmGroup& g) {
  int t = blockIdx.x, j = 0;
  while (j + 1 < g.products && t >= g.tiles[j]) t -= g.tiles[j++];
  const GemmParams& p = g.p[j];
  if ((int)blockIdx.z >= g.splits[j]) return;  // the whole block: no barrier is left waiting
  int m0, n0;
  tile_at(t, (p.n + BN - 1) / BN, (p.m + BM - 1) / BM, m0, n0);
  gemm_body<A_KC, B_KC, OutT>(p, m0, n0, blockIdx.z, g.splits[j]);
}

// Only the layouts the adapters use: x·Aᵀ (NT, bf16), s·dY·B (NN, bf16), dA and dB (TN, fp32).
#define GEMM_GROUP_ENTRY(NAME, AKC, BKC, OUT)                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(const __grid_constant__ GemmGroup g) { \
    gemm_group_entry<AKC, BKC, OUT>(g);                                                                 \
  }
GEMM_GROUP_ENTRY(gemm_group_nt_bf16, true, true, bf16)
GEMM_GROUP_ENTRY(gemm_group_nn_bf16, true, false, bf16)
GEMM_GROUP_ENTRY(gemm_group_tn_f32, false, false, float)

// ---- NF4 weights as the B operand ----

__device__ __forceinline__ float nf4_scale(const Nf4Params& w, long long block) {
  if (w.absmax_q == nullptr) return w.absmax[block];
  return __fadd_rn(__fmul_rn(__ldg(w.code2 + w.absmax_q[block]), w.absmax2[block / 256]), __ldg(w.offset));
}

// What one thread carries from global memory to its share of a B tile: 16 consecutive elements,
// either as NF4 (8 bytes + scale, decoded when stored) or bf16 (phase 2's B2 rows).
// Out of range it holds what stores as zeros (NF4: a zero scale, which every code times is zero;
// bf16: zero bits), so storing it needs no test of its own.
struct BStage {
  uint2 bits;
  float scale;
  uint4 raw[2];
};

// This thread's 16 elements of the B tile: (row-of-tile, first element) in the smem layout.
template <bool B_KC>
__device__ __forceinline__ void b_slot(int& srow, int& scol) {
  const int tid = threadIdx.x;
  if (B_KC) {
    srow = tid >> 1;          // n within the tile (128 rows of 32 k)
    scol = (tid & 1) * 16;    // k within the tile
  } else {
    srow = tid >> 3;          // k within the tile (32 rows of 128 n)
    scol = (tid & 7) * 16;    // n within the tile
  }
}

// Phase 1: B(k, n) from NF4 W. KC (forward): B(k, n) = W[n][k]; MC (dX): B(k, n) = W[k][n].
template <bool B_KC>
__device__ __forceinline__ void fetch_nf4(const Nf4Params& w, int n0, int nmax, int k0, int kmax, BStage& st) {
  int srow, scol;
  b_slot<B_KC>(srow, scol);
  long long wrow, wcol;
  bool ok;
  if (B_KC) {
    wrow = n0 + srow;
    wcol = k0 + scol;
    ok = wrow < nmax && wcol < kmax;
  } else {
    wrow = k0 + srow;
    wcol = n0 + scol;
    ok = wrow < kmax && wcol < nmax;
  }
  st.bits = make_uint2(0x77777777u, 0x77777777u);
  st.scale = 0.0f;
  if (ok) {
    const long long flat = wrow * w.cols + wcol;
    st.bits = __ldg(reinterpret_cast<const uint2*>(w.packed + flat / 2));
    st.scale = nf4_scale(w, flat >> w.blocksize_log2);
  }
}

// Phase 2: the adapter's bf16 B2 in the tile's layout. KC (forward): B(k, n) = B2[n][k], B2
// [n, k2]: the LoRA B. MC (dX): B(k, n) = B2[k][n], B2 [k2, n]: the LoRA A.
template <bool B_KC>
__device__ __forceinline__ void fetch_bf16(const bf16* b2, long long ldb2, int n0, int nmax, int k0, int kmax,
                                           BStage& st) {
  int srow, scol;
  b_slot<B_KC>(srow, scol);
  const long long n = B_KC ? n0 + srow : n0 + scol, k = B_KC ? k0 + scol : k0 + srow;
  // The contiguous dimension (k2 for KC, n for MC) is a multiple of 8: a 16-element run may be
  // half inside.
  st.raw[0] = st.raw[1] = make_uint4(0, 0, 0, 0);
  if (n < nmax && k < kmax) {
    const uint4* src = reinterpret_cast<const uint4*>(B_KC ? b2 + n * ldb2 + k : b2 + k * ldb2 + n);
    const bool second = B_KC ? k + 8 < kmax : n + 8 < nmax;
    st.raw[0] = __ldg(src);
    st.raw[1] = second ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
  }
}

// ---- NF4 decode in registers ----
// A thread's 16 elements share one scale (blocks are ≥ 32 elements and the runs 16-aligned), so
// it computes the 16 possible values once, bf16(code[i]·scale) as the CPU reference rounds them,
// and picks each element's value with byte permutes (prmt): no shared-memory codebook lookups,
// which took a third as many wavefronts per tile as the tile's ldmatrix reads (16 per warp
// against 48).
// The table is two byte planes: lo[j] holds the low bytes of entries 4j..4j+3, hi[j] their high
// bytes, so one prmt over a pair of planes looks up four 3-bit indices at once.
struct Nf4Table {
  uint32_t lo[4], hi[4];
};

__device__ __forceinline__ uint32_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// code: the weight's codebook in the kernel's parameters (constant-bank operands of the FMULs).
__device__ __forceinline__ Nf4Table nf4_table(const Nf4Code& code, float scale) {
  Nf4Table t;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // Entries 4j, 4j+1 and 4j+2, 4j+3 as bf16 pairs (the lower entry in the low half).
    const uint32_t a = bf16_bits(__fmul_rn(code.v[4 * j], scale)) | bf16_bits(__fmul_rn(code.v[4 * j + 1], scale)) << 16;
    const uint32_t b = bf16_bits(__fmul_rn(code.v[4 * j + 2], scale)) | bf16_bits(__fmul_rn(code.v[4 * j + 3], scale)) << 16;
    t.lo[j] = __byte_perm(a, b, 0x6420);
    t.hi[j] = __byte_perm(a, b, 0x7531);
  }
  return t;
}

// The 8 elements of one packed word (byte j: element 2j in the high nibble, 2j + 1 in the low)
// as 4 words of bf16 pairs, element order. Nibble n of the word is the code of element n ^ 1. A
// code's low 3 bits index a half of the table (entries 0-7 or 8-15) and bit 3 says which half, so
// each looked-up byte is one of two prmt lookups, chosen by a third prmt; the last prmt pairs low
// and high bytes and puts the two elements of a byte back in order.
__device__ __forceinline__ void nf4_lookup(uint32_t w, const Nf4Table& t, uint32_t* out) {
  const uint32_t idx = w & 0x77777777u;
  const uint32_t pick = ((w >> 1) & 0x44444444u) | 0x32103210u;  // byte n of the first (n) or second (n + 4) lookup
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // nibbles 4h .. 4h + 3: elements 4h + 1, 4h, 4h + 3, 4h + 2
    const uint32_t s = idx >> (16 * h), c = pick >> (16 * h);
    const uint32_t lo = __byte_perm(__byte_perm(t.lo[0], t.lo[1], s), __byte_perm(t.lo[2], t.lo[3], s), c);
    const uint32_t hi = __byte_perm(__byte_perm(t.hi[0], t.hi[1], s), __byte_perm(t.hi[2], t.hi[3], s), c);
    out[2 * h] = __byte_perm(lo, hi, 0x4051);      // elements 4h, 4h + 1 (nibbles 1, 0): low, high byte each
    out[2 * h + 1] = __byte_perm(lo, hi, 0x6273);  // elements 4h + 2, 4h + 3 (nibbles 3, 2)
  }
}

template <bool B_KC>
__device__ __forceinline__ void store_b(bf16* sb, const BStage& st, bool nf4, const Nf4Code& code) {
  int srow, scol;
  b_slot<B_KC>(srow, scol);
  uint4 out[2];
  if (!nf4) {
    out[0] = st.raw[0];
    out[1] = st.raw[1];
  } else {
    const Nf4Table t = nf4_table(code, st.scale);
    uint32_t v[8];
    nf4_lookup(st.bits.x, t, v);
    nf4_lookup(st.bits.y, t, v + 4);
    out[0] = make_uint4(v[0], v[1], v[2], v[3]);
    out[1] = make_uint4(v[4], v[5], v[6], v[7]);
  }
  const int c0 = scol >> 3;
  // In the MC tile the 8 lanes of a store phase write one 256-byte row, chunks 2l and 2l + 1:
  // storing chunk 2l + h everywhere would put the phase on 4 of the 8 bank groups (a 2-way
  // conflict the simulator's profile counts). Lanes 4-7 store their two chunks in the other
  // order, so each store covers all 8 groups (the row's swizzle is one XOR for the whole row).
  const int flip = B_KC ? 0 : (threadIdx.x >> 2) & 1;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = i ^ flip;
    const int off = B_KC ? off_kc(srow, c0 + h) : off_mc(srow, c0 + h);
    // A select, not out[h]: a register array indexed at run time would live in local memory.
    st_vec(reinterpret_cast<uint4*>(sb + off), h ? out[1] : out[0]);
  }
}

// ---- where an NF4 GEMM's K tiles come from ----
// A block's K loop runs over phases: tiles of NF4 W against A (dY or X), then tiles of the
// adapter's bf16 B2 against A2. Nf4Single is one weight (gemm_nf4_nt/nn_bf16); Nf4Sum is the
// grouped dX, whose K is every group's W phase, then every group's adapter phase.
#define GROUPS_MAX 3

struct Nf4Group {
  GemmParams p[GROUPS_MAX];
  Nf4Params w[GROUPS_MAX];
  int tiles_n[GROUPS_MAX];  // forward: N tiles of each group (the grid has their sum as columns)
  int groups;
};

// K tile t's source: its group, whether it is an NF4 tile (else an adapter tile), and its k0.
struct KTile {
  int group;
  bool nf4;
  int k0;
};

__device__ __forceinline__ int k_tiles(int k) { return (k + BK - 1) / BK; }
__device__ __forceinline__ int adapter_tiles(const GemmParams& p) { return p.a2 != nullptr ? k_tiles(p.k2) : 0; }

struct Nf4Single {
  const GemmParams& p;
  const Nf4Params& w;
  __device__ int tiles() const { return k_tiles(p.k) + adapter_tiles(p); }
  __device__ KTile at(int t) const {
    const int n1 = k_tiles(p.k);
    return t < n1 ? KTile{0, true, t * BK} : KTile{0, false, (t - n1) * BK};
  }
  __device__ const GemmParams& params(int) const { return p; }
  __device__ const Nf4Params& weight(int) const { return w; }
};

// dX = Σ_g dY_g·W_g + A2_g·B2_g over g < groups: group 0's output (c, ldc, m, n, alpha, beta).
struct Nf4Sum {
  const Nf4Group& g;
  __device__ int tiles() const {
    int n = 0;
#pragma unroll
    for (int i = 0; i < GROUPS_MAX; ++i)
      if (i < g.groups) n += k_tiles(g.p[i].k) + adapter_tiles(g.p[i]);
    return n;
  }
  __device__ KTile at(int t) const {
#pragma unroll
    for (int i = 0; i < GROUPS_MAX; ++i) {
      const int n = i < g.groups ? k_tiles(g.p[i].k) : 0;
      if (t < n) return KTile{i, true, t * BK};
      t -= n;
    }
#pragma unroll
    for (int i = 0; i < GROUPS_MAX; ++i) {
      const int n = i < g.groups ? adapter_tiles(g.p[i]) : 0;
      if (t < n) return KTile{i, false, t * BK};
      t -= n;
    }
    return KTile{0, false, 0};  // t ≥ tiles(): never asked for
  }
  __device__ const GemmParams& params(int i) const { return g.p[i]; }
  __device__ const Nf4Params& weight(int i) const { return g.w[i]; }
};

// The output tile at (m0, n0) of C = Σ over the phases' K tiles, with B from NF4 W (or the
// adapter's bf16 B2), A/A2 bf16.
template <bool B_KC, class Phases>
__device__ void gemm_nf4_body(const Phases& ph, int m0, int n0) {
  bf16* sa = (bf16*)qlora_dynamic_smem();
  bf16* sb = sa + STAGES * TILE_ELEMS;  // two B buffers
  const int ntiles = ph.tiles();
  const GemmParams& out = ph.params(0);

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // A's tiles come in order, phase after phase: the loader starts again where a phase begins.
  TileLoader<true> la;
  int la_phase = -1;  // 2·group + (0: the NF4 phase, 1: the adapter's)
  auto load_a = [&](int t, int stage) {
    const KTile s = ph.at(t);
    const GemmParams& p = ph.params(s.group);
    const bf16* a = s.nf4 ? p.a : p.a2;
    const long long lda = s.nf4 ? p.lda : p.lda2;
    const int phase = 2 * s.group + (s.nf4 ? 0 : 1);
    if (phase != la_phase) {
      la.init(a, lda, m0, p.m, s.k0);
      la_phase = phase;
    }
    la.load(sa + stage * TILE_ELEMS, a, lda, s.k0, s.nf4 ? p.k : p.k2);
  };
  auto fetch_b = [&](const KTile& s, BStage& st) {
    const GemmParams& p = ph.params(s.group);
    if (s.nf4) fetch_nf4<B_KC>(ph.weight(s.group), n0, p.n, s.k0, p.k, st);
    else fetch_bf16<B_KC>(p.b2, p.ldb2, n0, p.n, s.k0, p.k2, st);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_a(s, s);
    cp_async_commit();
  }
  BStage st;
  const FragOffsets<true, B_KC> fo;
  KTile src{0, false, 0};
  if (ntiles > 0) {
    src = ph.at(0);
    fetch_b(src, st);
    store_b<B_KC>(sb, st, src.nf4, ph.weight(src.group).code);
  }
  int use = 0, fill = STAGES - 1;  // A's stages tile t reads and tile t + STAGES - 1 fills
  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = t + STAGES - 1;
    if (next < ntiles) load_a(next, fill);
    cp_async_commit();
    const bool more = t + 1 < ntiles;
    if (more) {
      src = ph.at(t + 1);
      fetch_b(src, st);
    }
    const bf16* ta = sa + use * TILE_ELEMS;
    const bf16* tb = sb + (t & 1) * TILE_ELEMS;
    compute_tile<true, B_KC>(ta, tb, fo, acc, 0);
    compute_tile<true, B_KC>(ta, tb, fo, acc, 1);
    if (more) store_b<B_KC>(sb + ((t + 1) & 1) * TILE_ELEMS, st, src.nf4, ph.weight(src.group).code);
    use = use == STAGES - 1 ? 0 : use + 1;
    fill = fill == STAGES - 1 ? 0 : fill + 1;
  }
  cp_async_wait<0>();
  epilogue<bf16>(out, acc, m0, n0, 0, false);
}

// Y = X·Wᵀ (+ A2·B2ᵀ): X [M, K] bf16, W NF4 [N, K]; Y [M, N] bf16.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) gemm_nf4_nt_bf16(GemmParams p, Nf4Params w) {
  int m0, n0;
  gemm_tile(m0, n0);
  gemm_nf4_body<true>(Nf4Single{p, w}, m0, n0);
}
// dX = dY·W (+ A2·B2): dY [M, K=N_out] bf16, W NF4 [N_out, N_in]; dX [M, N_in] bf16; the
// adapter's input gradient as a second phase of K: A2 = s·dY·B_lora [M, r], B2 = A_lora [r, N_in].
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) gemm_nf4_nn_bf16(GemmParams p, Nf4Params w) {
  int m0, n0;
  gemm_tile(m0, n0);
  gemm_nf4_body<false>(Nf4Single{p, w}, m0, n0);
}

// ---- grouped: the weights of one input (q/k/v of an attention block, gate/up of an MLP) ----
// Forward, Y_g = X·W_gᵀ (+ A2_g·B2_gᵀ) for g < groups: one launch over the groups' output tiles
// side by side: the grid's columns are group 0's N tiles, then group 1's, ...; every block
// computes one tile of one group exactly as gemm_nf4_nt_bf16 would (same tiles, same order of
// sums, so the same bits). What it buys: one launch instead of several, and one wave schedule
// over all their tiles, where a GQA layer's k and v alone fill a fraction of the SMs; the tile
// order (gemm_tile) walks the groups' columns with the same X panel in L2.
// __grid_constant__: the blocks index p[] and w[] with a run-time group, read in place from
// the parameter space (without it the compiler copies the whole struct to local memory).
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    gemm_nf4_nt_group_bf16(const __grid_constant__ Nf4Group g) {
  int m0, n0;
  gemm_tile(m0, n0);
  int tile = n0 / BN, i = 0;
  while (i + 1 < g.groups && tile >= g.tiles_n[i]) tile -= g.tiles_n[i++];
  // One body per group index known at compile time: its parameters are then read as constant
  // operands, as in gemm_nf4_nt_bf16, not through a run-time index in the main loop.
  static_assert(GROUPS_MAX == 3, "one case per group");
  switch (i) {
    case 0: gemm_nf4_body<true>(Nf4Single{g.p[0], g.w[0]}, m0, tile * BN); break;
    case 1: gemm_nf4_body<true>(Nf4Single{g.p[1], g.w[1]}, m0, tile * BN); break;
    default: gemm_nf4_body<true>(Nf4Single{g.p[2], g.w[2]}, m0, tile * BN); break;
  }
}
// Input gradient, dX = Σ_g dY_g·W_g + A2_g·B2_g (A2_g = s·dY_g·B_g, B2_g = A_g, or none): one
// GEMM whose K runs over every group's phases (Nf4Sum), so dX is summed in fp32 and rounded and
// stored once, where one launch per weight added into it (β = 1) rounded it after each.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    gemm_nf4_nn_group_bf16(const __grid_constant__ Nf4Group g) {
  int m0, n0;
  gemm_tile(m0, n0);
  gemm_nf4_body<false>(Nf4Sum{g}, m0, n0);
}

// ---- small M (generation, tiny batches): Y[M ≤ 16, N] = X·Wᵀ (+ A2·B2ᵀ), W in NF4 ----
// Memory-bound on W's 4-bit codes: each warp streams 4 rows of W once, in chunks of 1024
// columns; the chunk of X (M × 1024 bf16) is staged in shared memory. Lane l of a chunk takes
// the 8-element groups g·256 + 8l (g = 0..3), so X reads are conflict-free and W reads
// coalesced. Block: 8 warps × 4 rows = 32 output columns; at least two blocks per SM (≤ 128
// registers, 2 × 32 KiB of shared memory).
#define SM_CHUNK 1024
#define SM_ROWS 4

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_nf4_small_m_bf16(GemmParams p, const __grid_constant__ Nf4Params w) {
  __shared__ __align__(16) bf16 sx[16 * SM_CHUNK];
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = w.code.v[threadIdx.x];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_base = blockIdx.x * 32 + warp * SM_ROWS;
  const int m_rows = p.m;
  float acc[SM_ROWS][16];
#pragma unroll
  for (int r = 0; r < SM_ROWS; ++r)
#pragma unroll
    for (int m = 0; m < 16; ++m) acc[r][m] = 0.0f;

  for (int k0 = 0; k0 < p.k; k0 += SM_CHUNK) {
    __syncthreads();
    // Stage X[:, k0 .. k0 + 1024) (zero beyond K).
    for (int q = threadIdx.x; q < m_rows * (SM_CHUNK / 8); q += blockDim.x) {
      const int m = q / (SM_CHUNK / 8), c = q % (SM_CHUNK / 8);
      const int k = k0 + c * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k < p.k) v = ld_vec(reinterpret_cast<const uint4*>(p.a + (long long)m * p.lda + k));
      st_vec(reinterpret_cast<uint4*>(sx + m * SM_CHUNK + c * 8), v);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < SM_ROWS; ++r) {
      const long long n = n_base + r;
      if (n >= p.n) break;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int kk = g * 256 + lane * 8;  // within the chunk
        const int k = k0 + kk;
        if (k >= p.k) continue;
        const long long flat = n * w.cols + k;
        const uint32_t bits = __ldg(reinterpret_cast<const uint32_t*>(w.packed + flat / 2));
        const float scale = nf4_scale(w, flat >> w.blocksize_log2);
        float wv[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (bits >> (8 * b)) & 0xFF;
          // bf16-rounded, exactly the values the tensor-core path multiplies.
          wv[2 * b] = __bfloat162float(__float2bfloat16_rn(__fmul_rn(code[byte >> 4], scale)));
          wv[2 * b + 1] = __bfloat162float(__float2bfloat16_rn(__fmul_rn(code[byte & 0xF], scale)));
        }
        // Unrolled over all 16 rows (guarded) so acc stays in registers.
#pragma unroll
        for (int m = 0; m < 16; ++m) {
          if (m >= m_rows) break;
          union { uint4 u; bf16 h[8]; } xv;
          xv.u = ld_vec(reinterpret_cast<const uint4*>(sx + m * SM_CHUNK + kk));
          float s = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) s += __bfloat162float(xv.h[e]) * wv[e];
          acc[r][m] += s;
        }
      }
    }
  }
  bf16* y = (bf16*)p.c;
#pragma unroll
  for (int r = 0; r < SM_ROWS; ++r) {
    const long long n = n_base + r;
#pragma unroll
    for (int m = 0; m < 16; ++m) {
      if (m >= m_rows) break;
      const float s = warp_sum(acc[r][m]);
      // The LoRA term A2[m]·B2[n] (r ≤ a few dozen) over the lanes, then one more warp sum
      // (n and p.a2 are the same for the whole warp, so every lane reaches both shuffles).
      float lora = 0.0f;
      if (p.a2 != nullptr && n < p.n)
        for (int j = lane; j < p.k2; j += 32)
          lora += __bfloat162float(p.a2[(long long)m * p.lda2 + j]) * __bfloat162float(p.b2[n * p.ldb2 + j]);
      lora = warp_sum(lora);
      if (lane == 0 && n < p.n) y[(long long)m * p.ldc + n] = __float2bfloat16_rn(s + lora);
    }
  }
}
