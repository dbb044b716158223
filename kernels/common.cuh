// Shared helpers for every kernel file: dtype conversions, warp/block reductions, dynamic shared
// memory, and (ptx.cuh) the PTX instructions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ptx.cuh"

#define QLORA_WARP 32

// The block's dynamic shared memory (the launch's shared_mem_bytes), 16-byte aligned.
__device__ __forceinline__ unsigned char* qlora_dynamic_smem() {
#ifdef QLORA_SIM
  return ::qsim::dynamic_shared_base();
#else
  extern __shared__ __align__(16) unsigned char qlora_dynamic_smem_bytes[];
  return qlora_dynamic_smem_bytes;
#endif
}

// ---- vector loads and stores ----
// One 8- or 16-byte access (LDG/STG/LDS/STS.64 or .128 on a card; the address must be aligned to
// its size). Plain `*p` on a card; in the simulated GPU they reach the checker and the profile as
// the one access they are, where the host compiler would split the copy into 4-byte pieces.
template <class V>
__device__ __forceinline__ V ld_vec(const V* p) {
  static_assert(sizeof(V) == 8 || sizeof(V) == 16, "ld_vec: an 8- or 16-byte vector type");
#ifdef QLORA_SIM
  V v;
  ::qsim::vector_load(&v, p, sizeof(V));
  return v;
#else
  return *p;
#endif
}

template <class V>
__device__ __forceinline__ void st_vec(V* p, const V& v) {
  static_assert(sizeof(V) == 8 || sizeof(V) == 16, "st_vec: an 8- or 16-byte vector type");
#ifdef QLORA_SIM
  ::qsim::vector_store(p, &v, sizeof(V));
#else
  *p = v;
#endif
}

// ---- dtype conversions (round to nearest even, as the CPU reference does) ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// ---- reductions ----
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = QLORA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max over a block of `blockDim.x` threads (a multiple of 32, at most 1024). Every thread gets it.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % QLORA_WARP, warp = threadIdx.x / QLORA_WARP;
  v = warp_max(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / QLORA_WARP;
  v = lane < nwarps ? partial[lane] : 0.0f;
  return warp_max(v);
}

// Index of the first of `n` ascending values that is >= s: the number of values below s.
__device__ __forceinline__ int lower_bound(const float* sorted, int n, float s) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sorted[mid] < s) lo = mid + 1; else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = QLORA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets
// it. The order of additions is fixed by the block size, so results are deterministic.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % QLORA_WARP, warp = threadIdx.x / QLORA_WARP;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / QLORA_WARP;
  v = lane < nwarps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

typedef __nv_bfloat16 bf16;

// An NF4 codebook passed by value with a launch (64 bytes of parameters): kernels read it from the
// constant bank instead of looking it up in device memory.
struct Nf4Code {
  float v[16];
};

// Two bf16 (each rounded to nearest even) at p, 4-byte aligned, in one 32-bit store: a warp's
// C-fragment row (4 lanes × 2 columns) becomes one 16-byte run per row instead of two strided
// 2-byte stores.
__device__ __forceinline__ void st_bf16x2(bf16* p, float a, float b) {
  const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(a));
  const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(b));
  *reinterpret_cast<uint32_t*>(p) = lo | hi << 16;
}

// Max over a block, for any sign of the values (block_max above assumes non-negative ones).
__device__ __forceinline__ float block_max_any(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % QLORA_WARP, warp = threadIdx.x / QLORA_WARP;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / QLORA_WARP;
  v = lane < nwarps ? partial[lane] : -INFINITY;
  return warp_max(v);
}
