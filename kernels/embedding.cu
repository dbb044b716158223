// Embedding gather (frozen table, no backward), dtype casts, the elementwise adds of the step,
// and the counter-based random kernels (LoRA dropout, random weights). Ids are checked against
// the vocabulary on the host before launch (src/ops/embedding.rs).

#include "common.cuh"

// out[t] = table[ids[t]]: one block per token, [V, d] -> [T, d] bf16. With `scaled` non-zero,
// out[t] = bf16(float(table[ids[t]]) · scale) (Gemma's scaled embedding; the launcher has
// rounded the scale to bf16, as transformers does); otherwise the row is copied bit for bit.
extern "C" __global__ void embedding_fwd_bf16(const bf16* table, const int* ids, bf16* out, int d,
                                              float scale, int scaled) {
  const long long t = blockIdx.x;
  const bf16* src = table + (long long)ids[t] * d;
  bf16* dst = out + t * d;
  if (scaled) {
    for (int i = threadIdx.x; i < d; i += blockDim.x)
      dst[i] = __float2bfloat16_rn(__bfloat162float(src[i]) * scale);
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
  }
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat162float(x[i]);
}

// out = a + b (bf16, rounded once): the residual adds and gradient sums of the CUDA step. Each
// thread reads a[i] and b[i] before it writes out[i], so out may be a (an add in place).
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

// y[row, c] += bias[c] in place (bf16, rounded once): the frozen projection biases (Qwen2's
// q/k/v). Reference: ops::linear::add_bias.
extern "C" __global__ void bias_add_bf16(bf16* y, const bf16* bias, long long n, int cols) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(bias[i % cols]));
}

// Dropout with a counter-based mask: element i is kept when the top 24 bits of
// splitmix64(seed ^ i·φ) are ≥ p·2²⁴, and then scaled by 1/(1 − p). The mask is a pure function
// of (seed, i), so the backward (and the per-layer replay) redraws exactly the same one.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// LoRA dropout, y = x ⊙ m: the mask is the counter-based function of src/ops/dropout.rs (its CPU
// twin, `ops::dropout::mask`, draws the same one), the kept scale 1/(1 − p) is the same f32.
extern "C" __global__ void dropout_bf16(const bf16* x, bf16* y, long long n, unsigned long long seed, float p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const unsigned long long h = splitmix64(seed ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull));
  const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
  const float scale = 1.0f / (1.0f - p);
  y[i] = u >= p ? __float2bfloat16_rn(__bfloat162float(x[i]) * scale) : __float2bfloat16_rn(0.0f);
}

// y[i] = a·(2·u_i − 1), u_i = unit(seed, i) of src/ops/random.rs (its CPU twin `uniform`): random
// weights drawn on the device (benchmarks of large shapes need no host copy).
extern "C" __global__ void uniform_bf16(bf16* y, long long n, unsigned long long seed, float a) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const unsigned long long h = splitmix64(seed ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull));
  const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
  y[i] = __float2bfloat16_rn(a * (2.0f * u - 1.0f));
}
