// Kernels for the simulator's own tests (sim/tests/selftest.cpp): each either computes something
// checkable (the PTX twins against plain arithmetic) or carries one planted bug the checker must
// report. Written in the same CUDA dialect as kernels/*.cu, with the same helpers.
#include "../../kernels/common.cuh"

// y[i] = x[i + shift] for i < n: with shift = 1 the last thread reads one past the end.
extern "C" __global__ void st_copy_shifted(const float* x, float* y, int n, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + shift];
}

// A 4-byte load from x + byte_offset: misaligned unless byte_offset % 4 == 0.
extern "C" __global__ void st_load_at(const unsigned char* x, int byte_offset, float* y) {
  y[0] = *reinterpret_cast<const float*>(x + byte_offset);
}

// Block sum through shared memory; `barrier` = 0 leaves out the __syncthreads between the
// writes and the reads (a race).
extern "C" __global__ void st_block_sum(const float* x, float* out, int barrier) {
  __shared__ float part[256];
  part[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += part[i];
    out[blockIdx.x] = s;
  }
}

// block_sum from common.cuh, with threads >= `live` returning first when `live` < blockDim.x
// (a divergent early return before a barrier).
extern "C" __global__ void st_common_block_sum(const float* x, float* out, int live) {
  if ((int)threadIdx.x >= live) return;
  const float s = block_sum(x[threadIdx.x]);
  if (threadIdx.x == 0) out[0] = s;
}

// warp_sum from common.cuh over the block (launched with a partial warp to plant the bug).
extern "C" __global__ void st_warp_sum(const float* x, float* out) {
  const float s = warp_sum(x[threadIdx.x]);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = s;
}

// Shuffles: out[4*lane + k] for k = idx, up, down, xor.
extern "C" __global__ void st_shuffles(const int* x, int* out) {
  const int v = x[threadIdx.x];
  out[4 * threadIdx.x + 0] = __shfl_sync(0xffffffffu, v, (threadIdx.x * 7) % 32);
  out[4 * threadIdx.x + 1] = __shfl_up_sync(0xffffffffu, v, 3);
  out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  out[4 * threadIdx.x + 3] = __shfl_xor_sync(0xffffffffu, v, 9);
}

// One warp: C (16×8, f32) = A (16×16 bf16, row-major) · B (16×8 bf16, B[k][n] at b[n*16 + k]),
// through ldmatrix (A plain, B through .trans of a k-major copy) and mma.sync.
// `wait` = 0 reads the cp.async tile before waiting for it.
extern "C" __global__ void st_mma(const bf16* a, const bf16* bt, float* c, int wait) {
  __shared__ __align__(16) bf16 sa[16 * 16];
  __shared__ __align__(16) bf16 sb[16 * 8];  // [k][n]
  const int lane = threadIdx.x;
  // A: 32 rows-halves of 16 bytes, one cp.async per lane.
  cp_async_16(sa + lane * 8, a + lane * 8, 16);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  // B transposed into [k][n] with plain loads (bt is [n][k]).
  for (int i = lane; i < 128; i += 32) sb[(i % 16) * 8 + i / 16] = bt[i];
  __syncthreads();
  uint32_t ra[4], rb[4];
  // A fragments: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  const int j = lane / 8, r = lane % 8;
  ldmatrix_x4(ra, sa + ((j & 1) * 8 + r) * 16 + (j >> 1) * 8);
  // B fragments from the [k][n] tile with .trans: matrices k 0-7 and k 8-15 (x4 loads them twice).
  ldmatrix_x4_trans(rb, sb + ((j & 1) * 8 + r) * 8);
  float acc[4] = {0, 0, 0, 0};
  mma_m16n8k16_bf16(acc, ra, rb[0], rb[1]);
  const int g = lane / 4, t = lane % 4;
  c[g * 8 + 2 * t] = acc[0];
  c[g * 8 + 2 * t + 1] = acc[1];
  c[(g + 8) * 8 + 2 * t] = acc[2];
  c[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// Writes `n` bytes of dynamic shared memory, then reads them back to out.
extern "C" __global__ void st_dynamic_shared(unsigned char* out, int n) {
  unsigned char* s = qlora_dynamic_smem();
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = (unsigned char)i;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[i];
}

// Writes the first half of a shared array, then reads the second half, which nobody wrote.
extern "C" __global__ void st_unwritten_shared(float* out) {
  __shared__ float half_written[64];
  half_written[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = half_written[threadIdx.x + 32];
}

// Counts blocks with an atomic and lets the last one write the total (the grad-norm pattern).
extern "C" __global__ void st_last_block(unsigned* counter, unsigned* out) {
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last && threadIdx.x == 0) out[0] = gridDim.x;
}

// Every block writes its index to out[0]: which block writes last is an order the kernel does
// not enforce (a race between blocks on global memory).
extern "C" __global__ void st_last_writer(int* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}

// Writes through whatever pointer it is given (a null one, in the self-test).
extern "C" __global__ void st_write_through(float* p) { p[threadIdx.x] = 1.0f; }

// __launch_bounds__ with a minimum block count: the first argument alone is the thread limit.
extern "C" __global__ void __launch_bounds__(64, 2) st_bounded(float* p) { p[threadIdx.x] = 1.0f; }

// The profile's bank and sector model (one warp): each lane stores and loads shared word
// lane·stride (4-byte floats; `stride` 0: every lane loads the same word, a broadcast, and
// stores with stride 1), loads the
// 16-byte vector at lane·vstride, names the row lane·pitch bytes into a bf16 tile for an
// ldmatrix.x4, and writes out[lane·ostride].
extern "C" __global__ void st_banks(float* out, int stride, int vstride, int pitch, int ostride) {
  __shared__ __align__(16) float words[32 * 33 + 4];
  __shared__ __align__(16) unsigned char tile[32 * 160];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 33 + 4; i += 32) words[i] = float(i);
  for (int i = lane; i < 32 * 160; i += 32) tile[i] = (unsigned char)i;
  __syncwarp();
  words[lane * (stride ? stride : 1)] = float(lane);
  __syncwarp();
  float v = words[lane * stride];
  const float4 q = ld_vec(reinterpret_cast<const float4*>(words) + lane * vstride);
  uint32_t r[4];
  ldmatrix_x4(r, tile + lane * pitch);
  out[lane * ostride] = v + q.x + q.y + q.z + q.w + float(r[0] & 1);
}

// A 16-byte vector load (ld_vec) from x + off floats: misaligned unless off % 4 == 0 (a card
// faults on it; the host compiler alone would split it into aligned 4-byte loads).
extern "C" __global__ void st_vector_at(const float* x, int off, float* out) {
  const float4 v = ld_vec(reinterpret_cast<const float4*>(x + off));
  out[0] = v.x + v.y + v.z + v.w;
}
