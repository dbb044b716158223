// Column copies between an activation [rows, W] and one of its column blocks [rows, w]: the split
// of Phi-3's fused qkv_proj / gate_up_proj outputs, and the concat that is its backward (math and
// CPU reference: src/ops/split.rs). One launch per block:
//   dst[r * dst_ld + dst_col + c] = src[r * src_ld + src_col + c],  r < rows, c < cols
// Bits are copied, never converted. All sizes are in units of V: one bf16 (2 bytes), or 8 of them
// (16 bytes: split_copy_x8_bf16, launched when every width and offset is a multiple of 8 and both
// buffers are 16-byte aligned). One thread per unit of the block.

#include "common.cuh"

template <typename V>
__device__ __forceinline__ void copy_cols(const V* src, long long src_ld, long long src_col, V* dst,
                                          long long dst_ld, long long dst_col, long long rows,
                                          long long cols) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const long long r = idx / cols, c = idx % cols;
  // A load and a store through __ldg: a whole-struct assignment between device pointers would be
  // a memcpy on the simulated GPU, whose checker does not see it.
  dst[r * dst_ld + dst_col + c] = __ldg(src + r * src_ld + src_col + c);
}

extern "C" __global__ void split_copy_bf16(const bf16* src, long long src_ld, long long src_col,
                                           bf16* dst, long long dst_ld, long long dst_col,
                                           long long rows, long long cols) {
  copy_cols(src, src_ld, src_col, dst, dst_ld, dst_col, rows, cols);
}

extern "C" __global__ void split_copy_x8_bf16(const uint4* src, long long src_ld,
                                              long long src_col, uint4* dst, long long dst_ld,
                                              long long dst_col, long long rows, long long cols) {
  copy_cols(src, src_ld, src_col, dst, dst_ld, dst_col, rows, cols);
}
