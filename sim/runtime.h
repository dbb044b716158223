// The simulated GPU's runtime: the interface between the driver stand-in (driver.cpp), the
// execution engine (exec.cpp: fibers, barriers, warp collectives, PTX instructions) and the
// memory checker (memory.cpp: device heap, shadow state, sanitizer-style checks).
//
// Everything here runs on the host. One kernel launch executes at a time in the whole process
// (the launch lock), synchronously, inside cuLaunchKernel; blocks run one after another, and the
// threads of a block run as fibers on the launching OS thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

#include <vector_types.h>

namespace qsim {

// ---- kernels (registered by each host-compiled kernels/<file>.cu) ----

// Calls the kernel with its parameters unpacked from cuLaunchKernel's `kernelParams`.
using Invoker = void (*)(void* fn, void** params);

struct KernelInfo {
  const char* module;      // "gemm" for kernels/gemm.cu
  const char* name;        // the extern "C" name
  void* fn;                // the host-compiled function
  Invoker invoke;          // unpacks kernelParams by the kernel's C++ signature
  int num_params;
  int max_threads;         // __launch_bounds__ (1024 when none)
  // Settable with cuFuncSetAttribute (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); until
  // then the launch limit is the card's default (48 KiB, or QLORA_SIM_DYNAMIC_SMEM_DEFAULT).
  int max_dynamic_shared;
  bool opted_in = false;
  // Largest static __shared__ footprint seen in any launch so far (bytes).
  size_t static_shared_seen;
};

void register_kernel(KernelInfo* k);
KernelInfo* find_kernel(const char* name);  // null when no kernel file defines it
bool module_registered(const char* stem);   // some kernel of kernels/<stem>.cu is registered

// ---- the device (limits of the card the simulator stands in for: sm_80, A100-like) ----
constexpr int kComputeMajor = 8, kComputeMinor = 0;
constexpr int kMultiprocessors = 108;
constexpr size_t kTotalMemory = size_t(40) << 30;
constexpr int kMaxSharedPerBlockOptin = 166912;  // 163 KiB, sm_80
constexpr int kMaxSharedPerBlock = 48 * 1024;    // without opting in
constexpr int kMaxThreadsPerBlock = 1024;
constexpr const char* kDeviceName = "qlora-rs simulated GPU (CPU, sm_80 semantics; not a real GPU)";

// ---- device memory (memory.cpp) ----
// Addresses are host addresses inside one reserved range; never reused after a free, so a
// use-after-free is an access outside every live allocation. Fresh memory is poisoned: bytes
// 0xFF (a NaN in every float format) and marked unwritten.
uint64_t device_alloc(size_t bytes);           // 0 when out of (simulated) memory
bool device_free(uint64_t ptr);                // false: not the start of a live allocation
size_t device_used();                          // bytes in live allocations
size_t device_peak();                          // high-water mark of device_used
void device_reset_peak();
// Checks that [ptr, ptr + bytes) lies inside one live allocation; on failure returns a message
// naming the allocation and offsets (`what` is e.g. "cuMemcpyHtoD destination").
bool device_range_ok(uint64_t ptr, size_t bytes, const char* what, std::string* why);
// Marks [ptr, ptr + bytes) written (copies and memsets write memory; kernels mark as they store).
void device_mark_written(uint64_t ptr, size_t bytes);
// A device-to-device copy carries the written state of its source bytes to its destination.
void device_copy_written(uint64_t dst, uint64_t src, size_t bytes);
// Copies device→host: also checks the bytes were written (a download of never-written memory
// is reported, since its contents are garbage on a real card). Returns false with `why`.
bool device_check_written(uint64_t ptr, size_t bytes, const char* what, std::string* why);

// ---- launches (exec.cpp) ----
// The device lock: a launch holds it while it runs, and every host-side access to device memory
// (copies, memsets, allocations, frees: driver.cpp) takes it too, so nothing another thread does
// lands in the middle of a launch (QLORA_SIM_SCHEDULE=all restores memory between its runs).
std::mutex& device_mutex();

struct Dim { unsigned x, y, z; };

// Runs a whole grid to completion. Returns false with a message naming the kernel, block, thread
// and what went wrong (out-of-bounds, unwritten read, race, deadlock at a barrier, ...).
bool launch(KernelInfo* k, Dim grid, Dim block, size_t dynamic_shared, void** params,
            std::string* error);

// The simulator's settings, from the environment (QLORA_SIM_SCHEDULE etc.), read once.
const char* schedule_name();
// QLORA_SIM_MODE=account: launches are checked (configuration, limits, opt-ins) but not run, and
// allocations are counted (sizes, peak, frees) but their memory is never touched (no poison, no
// shadow, no copies; downloads read zeros). Measures the device memory of shapes far larger than
// the host could execute (an 8B model's step) with the real allocation sequence. Default: check
// (everything runs and is checked).
bool account_mode();

// ---- what the kernels call (through sim/cuda_sim.h and kernels/ptx.cuh; exec.cpp) ----
enum ShflMode : int { kShflIdx, kShflUp, kShflDown, kShflXor };
void syncthreads();
void syncwarp(unsigned mask);
void shfl(unsigned mask, const void* in, void* out, size_t size, int mode, int arg, int width);
unsigned vote_ballot(unsigned mask, bool pred);
uint32_t atomic_add_u32(uint32_t* p, uint32_t v);
int atomic_add_i32(int* p, int v);
unsigned long long atomic_add_u64(unsigned long long* p, unsigned long long v);
float atomic_add_f32(float* p, float v);
double atomic_add_f64(double* p, double v);
unsigned char* dynamic_shared_base();
// A vector load or store of `bytes` (8 or 16) as the one access it is on a card (LDG.128,
// STS.64, ...): checked (bounds, written, natural alignment) and profiled as one access, then
// copied. The host compiler would split a plain vector copy into 4-byte pieces.
void vector_load(void* out, const void* p, size_t bytes);
void vector_store(void* p, const void* in, size_t bytes);
// PTX instructions (kernels/ptx.cuh)
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b);
void ldmatrix_x4(uint32_t* r, const void* row, bool trans);
void cp_async_16(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
float ex2_approx_ftz(float x);

}  // namespace qsim

// The built-in variables, set by the scheduler before it resumes a thread.
extern "C" {
extern uint3 qsim_threadIdx, qsim_blockIdx;
extern dim3 qsim_blockDim, qsim_gridDim;
}
