// Rotary embedding in place on q or k ([T, heads, head_dim] bf16), rotate_half layout, positions
// per token (restarting per packed sequence), frequencies precomputed on the host (llama3, linear
// or longrope scaling applied there). Partial rotary: only the first 2·half dims of each head are
// rotated (pairs (i, i + half), i < half); the rest are neither read nor written. `mag` (longrope's
// attention factor, 1 otherwise) scales cos and sin. `sign` = -1 gives the backward (rotation by
// -θ, scaled by mag). Math and CPU reference: src/ops/rope.rs. One thread per (token, head, pair).

#include "common.cuh"

extern "C" __global__ void rope_fwd_bf16(bf16* x, const int* positions, const float* freqs,
                                         int tokens, int heads, int head_dim, int half, float sign,
                                         float mag) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = (long long)tokens * heads * half;
  if (idx >= total) return;
  const int i = idx % half;
  const long long th = idx / half;  // token * heads + head
  const int t = th / heads;
  // The angle as the CPU computes it (an f32 product), reduced to [-π, π] in f64 so that the
  // fast sine/cosine is accurate (|error| < 1e-6, far below bf16's resolution) and no local
  // memory is needed (sincosf's large-argument path uses some).
  const double angle = (double)__fmul_rn((float)positions[t], freqs[i]);
  const double two_pi = 6.283185307179586;
  const float r = (float)(angle - two_pi * rint(angle / two_pi));
  float s, c;
  __sincosf(r, &s, &c);
  s *= sign;
  // m·cos, m·sin as f32 products (exact for m = 1), as transformers scales its tables.
  c *= mag;
  s *= mag;
  bf16* v = x + th * head_dim;
  const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
  v[i] = __float2bfloat16_rn(a * c - b * s);
  v[i + half] = __float2bfloat16_rn(b * c + a * s);
}
