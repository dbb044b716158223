// Every PTX instruction the kernels use, each in one named helper. On a GPU each helper is one
// inline-PTX instruction. In the simulated GPU (QLORA_SIM, sim/cuda_sim.h) the same helper calls
// its host twin in sim/exec.cpp, written from the PTX ISA's description of the instruction, so
// every kernel has one body on both.
#pragma once

#include <stdint.h>

#ifndef QLORA_SIM
__device__ __forceinline__ uint32_t ptx_smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
#endif

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: an asynchronous 16-byte copy from
// global to shared memory; `src_bytes` (0..16) are read, the rest zero-filled. Both addresses are
// 16-byte aligned. It joins the thread's open group (see cp_async_commit / cp_async_wait).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef QLORA_SIM
  ::qsim::cp_async_16(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ptx_smem_addr(dst)), "l"(src),
               "r"(src_bytes));
#endif
}

// cp.async.commit_group: closes the thread's open group of copies.
__device__ __forceinline__ void cp_async_commit() {
#ifdef QLORA_SIM
  ::qsim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most the N most recent committed groups are in flight.
// The copies are then visible to this thread; other threads need a barrier after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef QLORA_SIM
  ::qsim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8×8 b16 matrices; lanes 8j..8j+7 give the
// (16-byte aligned) addresses of the rows of matrix j; r[j] receives this lane's fragment of it
// (row lane/4, columns 2·(lane%4) and 2·(lane%4)+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
#ifdef QLORA_SIM
  ::qsim::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(ptx_smem_addr(p)));
#endif
}

// As ldmatrix_x4, transposed: r[j] holds rows 2·(lane%4) and 2·(lane%4)+1 of column lane/4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
#ifdef QLORA_SIM
  ::qsim::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(ptx_smem_addr(p)));
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: c (16×8 f32) += a (16×16 bf16, 4
// registers) · b (16×8 bf16, registers b0 b1), in place, across the warp.
__device__ __forceinline__ void mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef QLORA_SIM
  const uint32_t b[2] = {b0, b1};
  ::qsim::mma_m16n8k16_bf16(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ex2.approx.ftz.f32: 2^x (about 2 ulp), one MUFU.EX2. A result below the smallest normal float
// (x < −126) is flushed to +0, as are subnormal inputs. exp2f without --use_fast_math spends three
// more instructions per call (a test, and a halving before and a squaring after for results in the
// subnormal range); for softmax weights those results are zero in all but name.
__device__ __forceinline__ float ex2_ftz(float x) {
#ifdef QLORA_SIM
  return ::qsim::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// c·tanh(x), given y = 2·log2(e)·x (callers fold that factor into the scale they apply anyway):
// tanh(x) = 1 − 2/(e^(2x) + 1), so c·tanh(x) = c − 2c/(2^y + 1). One ex2.approx and one
// approximate reciprocal (MUFU.EX2 and MUFU.RCP, as tanhf uses too) and 3 more instructions, where
// tanhf without fast math takes about 17 with its polynomial branch for small |x|. The error is
// absolute: below 5e-7·|c| for every x (with ex2 and the reciprocal each 2 ulp off at either sign,
// as checked in float32 emulation on 800k values up to |x| = 10⁴); the relative error grows as
// x → 0, which a soft-capped score c·tanh(s/c) does not see: its error is the absolute one. Large
// |y|: 2^y is +inf or 0 (ftz), the reciprocal 0 or 1, and the result ±c.
__device__ __forceinline__ float ctanh_ex2(float y, float c) {
  return fmaf(-2.0f * c, __fdividef(1.0f, ex2_ftz(y) + 1.0f), c);
}
