// NF4 quantization with double-quantized scales, bit-exact with bitsandbytes and with the CPU
// reference in src/quant/nf4/cpu.rs (the math is documented in src/quant/nf4/mod.rs).
//
// Float rules that keep the bytes identical to the CPU: reciprocal and products with __f*_rn
// (never contracted into an FMA), true division for the partial last block, the nearest code as
// "number of midpoints below s" (ties go to the lower index), and torch's cascade summation order
// for the mean.

#include "common.cuh"

#define NF4_MIN_ABSMAX 1e-38f
#define NF4_NESTED 256

// Number of NF4 midpoints below s, i.e. the nearest of the 16 codes (ties to the lower).
__device__ __forceinline__ uint8_t nf4_nearest(float s, const float* mids) {
  uint8_t q = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) q += mids[k] < s ? 1 : 0;
  return q;
}

// One warp per quantization block; each lane takes pairs of elements (one output byte per pair).
//   x: [n] input; code: the codebook; packed: [ceil(n/2)]; absmax: [ceil(n/blocksize)]
template <typename T>
__device__ void quantize_4bit(const T* __restrict__ x, const Nf4Code& code,
                              uint8_t* __restrict__ packed, float* __restrict__ absmax,
                              long long n, int blocksize) {
  float mids[15];
#pragma unroll
  for (int k = 0; k < 15; ++k) mids[k] = __fmul_rn(__fadd_rn(code.v[k], code.v[k + 1]), 0.5f);

  const int warps_per_cta = blockDim.x / QLORA_WARP;
  const long long block = (long long)blockIdx.x * warps_per_cta + threadIdx.x / QLORA_WARP;
  const int lane = threadIdx.x % QLORA_WARP;
  const long long nblocks = (n + blocksize - 1) / blocksize;
  if (block >= nblocks) return;  // whole warps exit together

  const long long start = block * blocksize;
  const long long len = min((long long)blocksize, n - start);
  float amax = 0.0f;
  for (long long i = lane; i < len; i += QLORA_WARP) amax = fmaxf(amax, fabsf(to_f32(x[start + i])));
  amax = warp_max(amax);
  const float scale = fmaxf(amax, NF4_MIN_ABSMAX);
  const bool full = len == blocksize;
  const float inv = __fdiv_rn(1.0f, scale);

  const long long pairs = (len + 1) / 2;
  for (long long p = lane; p < pairs; p += QLORA_WARP) {
    const long long e = start + 2 * p;
    float s0 = to_f32(x[e]);
    s0 = full ? __fmul_rn(s0, inv) : __fdiv_rn(s0, scale);
    float s1 = 0.0f;  // an odd total count pads with a scaled 0.0
    if (e + 1 < n) {
      s1 = to_f32(x[e + 1]);
      s1 = full ? __fmul_rn(s1, inv) : __fdiv_rn(s1, scale);
    }
    s0 = fminf(fmaxf(s0, -1.0f), 1.0f);
    s1 = fminf(fmaxf(s1, -1.0f), 1.0f);
    packed[e / 2] = (uint8_t)((nf4_nearest(s0, mids) << 4) | nf4_nearest(s1, mids));
  }
  if (lane == 0) absmax[block] = full ? amax : scale;
}

extern "C" __global__ void nf4_quantize_f32(const float* x, Nf4Code code, uint8_t* packed,
                                            float* absmax, long long n, int blocksize) {
  quantize_4bit(x, code, packed, absmax, n, blocksize);
}
extern "C" __global__ void nf4_quantize_bf16(const __nv_bfloat16* x, Nf4Code code,
                                             uint8_t* packed, float* absmax, long long n,
                                             int blocksize) {
  quantize_4bit(x, code, packed, absmax, n, blocksize);
}
extern "C" __global__ void nf4_quantize_f16(const __half* x, Nf4Code code, uint8_t* packed,
                                            float* absmax, long long n, int blocksize) {
  quantize_4bit(x, code, packed, absmax, n, blocksize);
}

// torch's cascade sum of one column (see cascade_sum in src/quant/nf4/cpu.rs): `size` values
// x[stride*i + col] added into four levels, each flushed into the next every 2^level_power adds.
__device__ float cascade_sum(const float* __restrict__ x, long long size, long long stride,
                             long long col) {
  int clog2 = 1;
  if (size > 2) clog2 = 64 - __clzll((unsigned long long)(size - 1));
  const int level_power = max(4, clog2 / 4);
  const long long step = 1LL << level_power, mask = step - 1;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  long long i = 0;
  while (i + step <= size) {
    // step is a power of two >= 16: load 16 values at a time so their latencies overlap.
    for (long long k = 0; k < step; k += 16) {
      float buf[16];
#pragma unroll
      for (int u = 0; u < 16; ++u) buf[u] = x[stride * (i + u) + col];
#pragma unroll
      for (int u = 0; u < 16; ++u) acc[0] = __fadd_rn(acc[0], buf[u]);
      i += 16;
    }
    for (int j = 1; j < 4; ++j) {
      acc[j] = __fadd_rn(acc[j], acc[j - 1]);
      acc[j - 1] = 0.0f;
      if (i & (mask << (j * level_power))) break;
    }
  }
  for (; i < size; ++i) acc[0] = __fadd_rn(acc[0], x[stride * i + col]);
  return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[1]), acc[2]), acc[3]);
}

// offset[0] = mean(absmax[0..n]) exactly as torch's single-threaded CPU mean (absmax_mean in
// src/quant/nf4/cpu.rs): 32 independent columns (column t = elements 32i + t) on the 32 lanes,
// then lane 0 folds them in torch's order. Launch: 1 block of 32 threads.
extern "C" __global__ void nf4_absmax_mean(const float* __restrict__ a, long long n,
                                           float* __restrict__ offset) {
  __shared__ float col[32];
  const int t = threadIdx.x;
  if (n >= 8) {
    const long long nv = n / 8, rows = nv / 4;
    col[t] = cascade_sum(a, rows, 32, t);
    __syncwarp();
    if (t < 8)
      for (long long v = 4 * rows; v < nv; ++v) col[t] = __fadd_rn(col[t], a[8 * v + t]);
    __syncwarp();
    if (t == 0) {
      float total = 0.0f;
      for (long long k = 8 * nv; k < n; ++k) total = __fadd_rn(total, a[k]);
      for (int lane = 0; lane < 8; ++lane) {
        const float v = __fadd_rn(__fadd_rn(__fadd_rn(col[lane], col[8 + lane]), col[16 + lane]),
                                  col[24 + lane]);
        total = __fadd_rn(total, v);
      }
      offset[0] = __fdiv_rn(__fadd_rn(0.0f, total), (float)n);
    }
  } else if (t == 0) {
    const long long rows = n / 4;
    float c[4];
    for (int k = 0; k < 4; ++k) c[k] = cascade_sum(a, rows, 4, k);
    for (long long k = 4 * rows; k < n; ++k) c[0] = __fadd_rn(c[0], a[k]);
    const float total = __fadd_rn(__fadd_rn(__fadd_rn(c[0], c[1]), c[2]), c[3]);
    offset[0] = __fdiv_rn(__fadd_rn(0.0f, total), (float)n);
  }
}

// Double quantization: one block of 256 threads per 256 absmax values (dynamic_index and
// quantize_nested in src/quant/nf4/cpu.rs):
//   d = absmax[b] - offset; a2 = max |d| over the block (stored as absmax2[c]);
//   a2 == 0: code 0; else v = clamp(d * (1/a2)), k = trunc(fma((v+1)*0.5, 65535, 0.5)),
//   code = number of code2 midpoints below (k + k)/65535 - 1.
extern "C" __global__ void nf4_quantize_absmax(const float* __restrict__ absmax,
                                               const float* __restrict__ offset,
                                               const float* __restrict__ code2,
                                               uint8_t* __restrict__ q,
                                               float* __restrict__ absmax2, long long nblocks) {
  __shared__ float mids[NF4_NESTED - 1];
  const int t = threadIdx.x;
  if (t < NF4_NESTED - 1) mids[t] = __fmul_rn(__fadd_rn(code2[t], code2[t + 1]), 0.5f);
  const long long b = (long long)blockIdx.x * NF4_NESTED + t;
  const float d = b < nblocks ? __fsub_rn(absmax[b], offset[0]) : 0.0f;
  const float a2 = block_max(fabsf(d));  // also orders the mids[] writes before the reads
  if (b < nblocks) {
    uint8_t code = 0;
    if (a2 != 0.0f) {
      const float inv = __fdiv_rn(1.0f, a2);
      const float v = fminf(fmaxf(__fmul_rn(d, inv), -1.0f), 1.0f);
      const float tt = __fmul_rn(__fadd_rn(v, 1.0f), 0.5f);
      const unsigned k = ((unsigned)__fmaf_rn(tt, 65535.0f, 0.5f)) & 0xFFFFu;
      const float kf = (float)k;
      const float grid = __fsub_rn(__fdiv_rn(__fadd_rn(kf, kf), 65535.0f), 1.0f);
      code = (uint8_t)lower_bound(mids, NF4_NESTED - 1, grid);
    }
    q[b] = code;
  }
  if (t == 0) absmax2[blockIdx.x] = a2;
}

// ---- dequantization ----

template <typename T> struct Vec8;
template <> struct Vec8<float> {
  static __device__ __forceinline__ void store(float* out, const float* v) {
    st_vec(reinterpret_cast<float4*>(out), make_float4(v[0], v[1], v[2], v[3]));
    st_vec(reinterpret_cast<float4*>(out) + 1, make_float4(v[4], v[5], v[6], v[7]));
  }
};
template <typename H> struct Vec8Half {
  static __device__ __forceinline__ void store(H* out, const float* v) {
    union { uint4 u; H h[8]; } pack;
#pragma unroll
    for (int k = 0; k < 8; ++k) pack.h[k] = from_f32<H>(v[k]);
    st_vec(reinterpret_cast<uint4*>(out), pack.u);
  }
};
template <> struct Vec8<__nv_bfloat16> : Vec8Half<__nv_bfloat16> {};
template <> struct Vec8<__half> : Vec8Half<__half> {};

struct PlainScale {
  const float* absmax;
  __device__ __forceinline__ float operator()(long long block) const { return absmax[block]; }
};
struct DoubleScale {
  const uint8_t* q;
  const float* absmax2;
  const float* code2;
  float offset;
  __device__ __forceinline__ float operator()(long long block) const {
    return __fadd_rn(__fmul_rn(__ldg(code2 + q[block]), absmax2[block / NF4_NESTED]), offset);
  }
};

// Groups of 8 elements (4 packed bytes) per thread and iteration; each thread takes
// NF4_DQ_UNROLL groups one grid-stride apart, issuing all their loads before any store, so every
// load and store instruction of a warp stays contiguous (128 B in, 512 B out for bf16) while
// each thread keeps several loads in flight.
#define NF4_DQ_UNROLL 4

//   packed: [ceil(n/2)]; code: the codebook; out: [n]. blocksize is a power of two >= 32, so a group of
//   8 elements never straddles two blocks. Grid: ceil(ceil(n/8) / NF4_DQ_UNROLL) threads or more.
template <typename T, typename Scale>
__device__ void dequantize_4bit(const uint8_t* __restrict__ packed, const Nf4Code& code,
                                Scale scale_of, T* __restrict__ out, long long n, int blocksize) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code.v[threadIdx.x];
  __syncthreads();
  const long long full_groups = n / 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long g0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t bytes[NF4_DQ_UNROLL];
  float scale[NF4_DQ_UNROLL];
#pragma unroll
  for (int k = 0; k < NF4_DQ_UNROLL; ++k) {
    const long long g = g0 + k * stride;
    if (g < full_groups) {
      bytes[k] = __ldg(reinterpret_cast<const uint32_t*>(packed) + g);
      scale[k] = scale_of(8 * g / blocksize);
    }
  }
#pragma unroll
  for (int k = 0; k < NF4_DQ_UNROLL; ++k) {
    const long long g = g0 + k * stride;
    if (g < full_groups) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (bytes[k] >> (8 * j)) & 0xFF;
        v[2 * j] = __fmul_rn(table[byte >> 4], scale[k]);
        v[2 * j + 1] = __fmul_rn(table[byte & 0xF], scale[k]);
      }
      Vec8<T>::store(out + 8 * g, v);
    } else if (g == full_groups) {  // the last n % 8 elements, if any
      const float sc = n > 8 * g ? scale_of(8 * g / blocksize) : 0.0f;
      for (long long i = 8 * g; i < n; ++i) {
        const uint8_t byte = packed[i / 2];
        const uint8_t nib = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
        out[i] = from_f32<T>(__fmul_rn(table[nib], sc));
      }
    }
  }
}

#define NF4_DEQUANT_ENTRIES(SUFFIX, T)                                                              \
  extern "C" __global__ void nf4_dequantize_##SUFFIX(const uint8_t* packed, const float* absmax,   \
                                                     const __grid_constant__ Nf4Code code, T* out, \
                                                     long long n, int blocksize) {                 \
    dequantize_4bit(packed, code, PlainScale{absmax}, out, n, blocksize);                          \
  }                                                                                                \
  extern "C" __global__ void nf4_dequantize_dq_##SUFFIX(                                           \
      const uint8_t* packed, const uint8_t* absmax_q, const float* absmax2, const float* offset,    \
      const float* code2, const __grid_constant__ Nf4Code code, T* out, long long n,               \
      int blocksize) {                                                                             \
    dequantize_4bit(packed, code, DoubleScale{absmax_q, absmax2, code2, __ldg(offset)}, out, n,    \
                    blocksize);                                                                    \
  }

NF4_DEQUANT_ENTRIES(f32, float)
NF4_DEQUANT_ENTRIES(bf16, __nv_bfloat16)
NF4_DEQUANT_ENTRIES(f16, __half)
