// SwiGLU h = silu(g)·u and GeGLU h = gelu_tanh(g)·u with their backwards, elementwise over
// [T, F] bf16 (math and CPU reference: src/ops/swiglu.rs). One thread per element, f32 inside,
// one rounding to bf16 per output. The backward may write dgate and dup over gate and up (the
// launcher does): each thread reads its element of all three inputs before it writes.

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

// gelu_tanh(g) = 0.5·g·(1 + t), t = tanh(k·(g + a·g³)), k = √(2/π), a = 0.044715 (torch's
// gelu(approximate="tanh")), and its exact derivative
// 0.5·(1 + t) + 0.5·g·(1 − t²)·k·(1 + 3a·g²); the same order of operations as the CPU reference.
__device__ __forceinline__ void gelu_tanh(float g, float* value, float* slope) {
  const float k = 0.7978845608028654f, a = 0.044715f;
  const float g2 = g * g;
  const float t = tanhf(k * (g + a * (g2 * g)));
  *value = 0.5f * g * (1.0f + t);
  *slope = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * a * g2);
}

extern "C" __global__ void geglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* h, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float value, slope;
  gelu_tanh(__bfloat162float(gate[i]), &value, &slope);
  h[i] = __float2bfloat16_rn(value * __bfloat162float(up[i]));
}

// dg = dh·u·gelu_tanh'(g), du = dh·gelu_tanh(g)
extern "C" __global__ void geglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dh,
                                          bf16* dgate, bf16* dup, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dh[i]);
  float value, slope;
  gelu_tanh(g, &value, &slope);
  dgate[i] = __float2bfloat16_rn(d * u * slope);
  dup[i] = __float2bfloat16_rn(d * value);
}
