// The CUDA language on the host: force-included before every kernels/*.cu when the simulated GPU
// is built (sim/build.sh). It maps what the kernels use to the simulator's runtime:
//   - __global__/__device__ functions become plain C++ functions (each kernel file is compiled
//     inside a namespace of its own, so files do not clash);
//   - threadIdx/blockIdx/blockDim/gridDim are globals the scheduler sets before it resumes a
//     thread (a fiber), so they always read the running thread's values;
//   - static __shared__ variables go to one linker section (qsim_shared), which the runtime
//     poisons per block and checks for bounds, unwritten reads and races; dynamic shared memory
//     is reached through qlora_dynamic_smem() (kernels/common.cuh);
//   - __syncthreads, __syncwarp and the warp intrinsics are barriers and exchanges between fibers;
//   - bf16 and f16 are the CUDA headers' own host implementations.
// The PTX instructions (mma.sync, ldmatrix, cp.async) are named helpers in kernels/ptx.cuh whose
// host twins call the runtime (exec.cpp), which implements them from the PTX ISA.
#pragma once

#define QLORA_SIM 1

#include <stdint.h>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>

// CUDA's math API puts the classification functions in the global namespace (device code calls
// `isfinite(x)`); the host's <cmath> has them in std:: only.
using std::isfinite;
using std::isinf;
using std::isnan;

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__

#ifdef QSIM_SCAN
// sim/build.sh preprocesses each kernel file with these markers to list its kernels.
#define __global__ __qsim_global__
#define __launch_bounds__(...) __qsim_lb__(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __shared__ static __attribute__((section("qsim_shared")))
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#undef __grid_constant__
#define __grid_constant__

#include "runtime.h"  // the runtime the kernels call

#define threadIdx qsim_threadIdx
#define blockIdx qsim_blockIdx
#define blockDim qsim_blockDim
#define gridDim qsim_gridDim
#define warpSize 32


inline void __syncthreads() { ::qsim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::qsim::syncwarp(mask); }
inline void __threadfence() {}        // one thread runs at a time: every store is visible
inline void __threadfence_block() {}

template <class T>
inline T qsim_shfl(unsigned mask, T v, int mode, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled type");
  T out;
  ::qsim::shfl(mask, &v, &out, sizeof(T), mode, arg, width);
  return out;
}
template <class T>
inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return qsim_shfl(m, v, ::qsim::kShflIdx, src, w); }
template <class T>
inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return qsim_shfl(m, v, ::qsim::kShflUp, (int)d, w); }
template <class T>
inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return qsim_shfl(m, v, ::qsim::kShflDown, (int)d, w); }
template <class T>
inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return qsim_shfl(m, v, ::qsim::kShflXor, lm, w); }
inline unsigned __ballot_sync(unsigned m, int p) { return ::qsim::vote_ballot(m, p != 0); }
inline int __any_sync(unsigned m, int p) { return ::qsim::vote_ballot(m, p != 0) != 0; }
inline int __all_sync(unsigned m, int p) { return ::qsim::vote_ballot(m, p != 0) == m; }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::qsim::atomic_add_u32(p, v); }
inline int atomicAdd(int* p, int v) { return ::qsim::atomic_add_i32(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return ::qsim::atomic_add_u64(p, v); }
inline float atomicAdd(float* p, float v) { return ::qsim::atomic_add_f32(p, v); }
inline double atomicAdd(double* p, double v) { return ::qsim::atomic_add_f64(p, v); }

// A vector type (uint2, uint4, float4: 8 or 16 bytes) is one load, as on a card.
template <class T>
__attribute__((always_inline)) inline T __ldg(const T* p) {
  if constexpr (std::is_class_v<T> && (sizeof(T) == 8 || sizeof(T) == 16)) {
    T v;
    ::qsim::vector_load(&v, p, sizeof(T));
    return v;
  } else {
    return *p;
  }
}

// A load that skips L1 (sees other blocks' stores made visible by a threadfence): one memory
// here, so the same load as __ldg.
template <class T>
__attribute__((always_inline)) inline T __ldcg(const T* p) {
  return __ldg(p);
}

// ---- math intrinsics: IEEE round-to-nearest host arithmetic (built with -ffp-contract=off) ----
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __exp2f(float a) { return exp2f(a); }
inline float __logf(float a) { return logf(a); }
inline float __sinf(float a) { return sinf(a); }
inline float __cosf(float a) { return cosf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline void __sincosf(float a, float* s, float* c) { *s = sinf(a), *c = cosf(a); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// prmt as CUDA documents __byte_perm: byte n of the result is byte s<4n+2:4n> of the eight bytes
// y:x (x bytes 0-3, y bytes 4-7); bit 4n+3 and the upper 16 bits of s are not used.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long in = (unsigned long long)y << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= (unsigned)(in >> (8 * (s >> (4 * n) & 7)) & 0xFF) << (8 * n);
  return r;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
