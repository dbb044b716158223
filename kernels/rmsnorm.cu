// RMSNorm forward (optionally fused with the residual add before it) and backward, bf16 in and
// out, fp32 statistics. The math and the CPU reference are in src/ops/rmsnorm.rs.
//   x, y, dy, dx: [T, d] bf16; w: [d] bf16 (frozen); rstd: [T] fp32 (saved for the backward)
// One block per row; the launcher picks blockDim (multiple of 32) from d.
// `unit_offset` non-zero (Gemma): the effective weight is 1 + w, added in fp32 from the bf16 w
// (never a bf16 1 + w); zero (Llama, Qwen): w itself.

#include "common.cuh"

__device__ __forceinline__ float norm_weight(const bf16* w, int i, int unit_offset) {
  const float v = __bfloat162float(w[i]);
  return unit_offset ? 1.0f + v : v;
}

__device__ __forceinline__ void norm_row(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         bf16* __restrict__ y, float* __restrict__ rstd, int d,
                                         float eps, int unit_offset) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = __bfloat162float(x[i]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = 1.0f / sqrtf(ss / (float)d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    y[i] = __float2bfloat16_rn((__bfloat162float(x[i]) * r) * norm_weight(w, i, unit_offset));
  if (threadIdx.x == 0) *rstd = r;
}

extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, float* rstd,
                                            int d, float eps, int unit_offset) {
  const long long row = blockIdx.x;
  norm_row(x + row * d, w, y + row * d, rstd + row, d, eps, unit_offset);
}

// h = a + b (the residual stream, rounded to bf16), then y = rmsnorm(h).
extern "C" __global__ void rmsnorm_residual_fwd_bf16(const bf16* a, const bf16* b, bf16* h,
                                                     const bf16* w, bf16* y, float* rstd, int d,
                                                     float eps, int unit_offset) {
  const long long row = blockIdx.x;
  const long long off = row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    h[off + i] = __float2bfloat16_rn(__bfloat162float(a[off + i]) + __bfloat162float(b[off + i]));
  __syncthreads();
  norm_row(h + off, w, y + off, rstd + row, d, eps, unit_offset);
}

// dx = r·(dy⊙w̃ − x̂·mean(dy⊙w̃⊙x̂)), x̂ = x·r, w̃ the effective weight; with `dres` non-null,
// dx += dres (the residual stream's gradient arriving from above).
extern "C" __global__ void rmsnorm_bwd_bf16(const bf16* x, const bf16* w, const float* rstd,
                                            const bf16* dy, const bf16* dres, bf16* dx, int d,
                                            int unit_offset) {
  const long long row = blockIdx.x;
  const long long off = row * d;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    dot += __bfloat162float(dy[off + i]) * norm_weight(w, i, unit_offset) *
           __bfloat162float(x[off + i]) * r;
  dot = block_sum(dot) / (float)d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float xhat = __bfloat162float(x[off + i]) * r;
    float g = r * (__bfloat162float(dy[off + i]) * norm_weight(w, i, unit_offset) - xhat * dot);
    if (dres) g += __bfloat162float(dres[off + i]);
    dx[off + i] = __float2bfloat16_rn(g);
  }
}
