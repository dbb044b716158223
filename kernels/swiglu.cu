// SwiGLU h = silu(g)·u and its backward, elementwise over [T, F] bf16 (math and CPU reference:
// src/ops/swiglu.rs). One thread per element. The backward may write dgate and dup over gate and
// up (the launcher does): each thread reads its element of all three inputs before it writes.

#include "common.cuh"

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* h, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = __bfloat162float(gate[i]);
  h[i] = __float2bfloat16_rn(g * sigmoidf(g) * __bfloat162float(up[i]));
}

// dg = dh·u·σ(g)·(1 + g·(1 − σ(g))), du = dh·g·σ(g)
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dh,
                                           bf16* dgate, bf16* dup, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dh[i]);
  const float s = sigmoidf(g);
  dgate[i] = __float2bfloat16_rn(d * u * s * (1.0f + g * (1.0f - s)));
  dup[i] = __float2bfloat16_rn(d * g * s);
}
