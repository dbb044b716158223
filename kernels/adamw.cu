// The optimizer over the one flat fp32 buffer of every LoRA parameter (math and CPU reference:
// src/train/optimizer.rs): the global gradient norm in one launch (deterministic: each block
// writes a partial sum, the last block to finish adds them in block order), and AdamW with the
// clipping factor folded in, reading the norm from device memory (no host round trip).

#include "common.cuh"

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = QLORA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// norm[0] = sqrt(Σ g²) in f64. partials: [gridDim.x] doubles; counter: one uint, zero on entry
// (the last block resets it). A norm that is not finite (a NaN or Inf gradient) records `step`
// in first_bad[0] unless an earlier step is there already: the host reads it when it next
// synchronises and names the step. Launch with blockDim = 256.
extern "C" __global__ void grad_norm_f32(const float* g, long long n, double* partials,
                                         unsigned int* counter, double* norm,
                                         unsigned long long step, unsigned long long* first_bad) {
  __shared__ double warp_part[32];
  __shared__ bool last;
  double acc = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const double v = g[i];
    acc += v * v;
  }
  acc = warp_sum_d(acc);
  const int lane = threadIdx.x % QLORA_WARP, warp = threadIdx.x / QLORA_WARP;
  if (lane == 0) warp_part[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < blockDim.x / QLORA_WARP; ++w) s += warp_part[w];
    partials[blockIdx.x] = s;
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    double s = 0.0;
    for (unsigned int b = 0; b < gridDim.x; ++b) s += ((volatile double*)partials)[b];
    norm[0] = sqrt(s);
    if (!isfinite(s) && first_bad[0] == 0) first_bad[0] = step;
    *counter = 0;
  }
}

// θ ← θ·(1 − lr·λ); g ← g·c (c = max/(norm + 1e-6) when norm > max > 0, else 1);
// m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²; θ ← θ − step_size·m / (√v / bc2_sqrt + ε).
// A norm that is not finite skips the update: θ, m and v stay those of the last good step.
struct AdamParams {
  float lr, beta1, beta2, eps, decay, step_size, bc2_sqrt, max_norm;
};

extern "C" __global__ void adamw_step_f32(float* p, const float* g, float* m, float* v,
                                          long long n, AdamParams a, const double* norm) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (norm != nullptr && !isfinite(norm[0])) return;
  float clip = 1.0f;
  if (norm != nullptr && a.max_norm > 0.0f && norm[0] > (double)a.max_norm)
    clip = (float)((double)a.max_norm / (norm[0] + 1e-6));
  const float gi = g[i] * clip;
  float pi = p[i] * a.decay;
  const float mi = a.beta1 * m[i] + (1.0f - a.beta1) * gi;
  const float vi = a.beta2 * v[i] + (1.0f - a.beta2) * gi * gi;
  pi -= a.step_size * mi / (sqrtf(vi) / a.bc2_sqrt + a.eps);
  p[i] = pi;
  m[i] = mi;
  v[i] = vi;
}
