// Cross-entropy over one chunk of logits, fused with its gradient (math and CPU reference:
// src/ops/cross_entropy.rs). logits [rows, V] fp32 (row length `ld` ≥ V, so the lm_head can pad
// its rows to a multiple of 8 for the GEMMs) are overwritten by dlogits =
// g·(softmax − onehot(target)) (zeros for target −100); loss[row] = lse − z[target] (0 if
// ignored). `ce_loss_f32` computes the loss alone, for evaluation. One block per row. The
// lm_head GEMMs around it (z = h·Wᵀ, dh = dz·W) are the GEMM kernels'.
// `softcap` c > 0 (Gemma 2's final_logit_softcapping): the loss and softmax are those of
// z' = c·tanh(z/c), and dlogits is multiplied by 1 − tanh²(z/c) = 1 − (z'/c)²; 0: no cap.

#include "common.cuh"

// c·tanh(v/c) for c > 0, v itself otherwise: one expression, so both kernels cap alike.
__device__ __forceinline__ float capped(float v, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(v / softcap) : v;
}

// log Σ_i exp(capped(z_i)) over one row, with the row maximum subtracted first; every thread of
// the block gets it.
__device__ __forceinline__ float row_lse(const float* z, int vocab, float softcap) {
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, capped(z[i], softcap));
  m = block_max_any(m);
  float s = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(capped(z[i], softcap) - m);
  s = block_sum(s);
  return m + logf(s);
}

// With `dz_bf16` non-null the gradient is also written there in bf16 (the operand of dh = dz·W),
// with the same row length `ld`; columns V..ld are neither read nor written.
extern "C" __global__ void ce_fwd_bwd_f32(float* logits, const int* targets, float* loss,
                                          int vocab, long long ld, float grad_scale,
                                          bf16* dz_bf16, float softcap) {
  const long long row = blockIdx.x;
  float* z = logits + row * ld;
  const int y = targets[row];
  bf16* zb = dz_bf16 ? dz_bf16 + row * ld : nullptr;
  if (y < 0) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      z[i] = 0.0f;
      if (zb) zb[i] = __float2bfloat16_rn(0.0f);
    }
    if (threadIdx.x == 0) loss[row] = 0.0f;
    return;
  }
  if (softcap > 0.0f) {  // the same for the whole block: a kernel argument
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z[i] = capped(z[i], softcap);
    __syncthreads();
  }
  const float lse = row_lse(z, vocab, 0.0f);
  const float zy = z[y];
  __syncthreads();  // everyone has read z[y] before it is overwritten
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float p = expf(z[i] - lse);
    float g = grad_scale * (p - (i == y ? 1.0f : 0.0f));
    if (softcap > 0.0f) {
      const float t = z[i] / softcap;
      g *= 1.0f - t * t;
    }
    z[i] = g;
    if (zb) zb[i] = __float2bfloat16_rn(g);
  }
  if (threadIdx.x == 0) loss[row] = lse - zy;
}

// The loss alone (evaluation): loss[row] = lse − z[target], 0 for ignored rows; the logits are
// only read.
extern "C" __global__ void ce_loss_f32(const float* logits, const int* targets, float* loss,
                                       int vocab, long long ld, float softcap) {
  const long long row = blockIdx.x;
  const int y = targets[row];
  if (y < 0) {  // the whole block leaves together: y is the row's
    if (threadIdx.x == 0) loss[row] = 0.0f;
    return;
  }
  const float* z = logits + row * ld;
  const float lse = row_lse(z, vocab, softcap);
  if (threadIdx.x == 0) loss[row] = lse - capped(z[y], softcap);
}
