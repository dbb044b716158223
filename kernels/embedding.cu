// Embedding gather (frozen table, no backward) and dtype casts. Ids are checked against the
// vocabulary on the host before launch (src/ops/embedding.rs).

#include "common.cuh"

// out[t] = table[ids[t]]: one block per token, [V, d] -> [T, d] bf16.
extern "C" __global__ void embedding_fwd_bf16(const bf16* table, const int* ids, bf16* out, int d) {
  const long long t = blockIdx.x;
  const bf16* src = table + (long long)ids[t] * d;
  bf16* dst = out + t * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat162float(x[i]);
}

// out = a + b (bf16, rounded once): the residual adds and gradient sums of the CUDA step.
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}
