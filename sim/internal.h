// Internals shared by the execution engine (exec.cpp) and the memory checker (memory.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime.h"

namespace qsim {

// One CUDA thread of the running block: a fiber.
struct Thread {
  void* sp = nullptr;     // saved stack pointer while switched out
  char* stack = nullptr;  // base of its stack (from the pool)
  unsigned tx, ty, tz;    // threadIdx
  unsigned linear, warp, lane;
  uint16_t id;            // linear id within the block (race shadow)
  enum class State : uint8_t { Runnable, AtBarrier, AtCollective, Exited } state;
  const char* coll_site = nullptr;  // the warp collective this lane waits at (AtCollective)
  // cp.async bookkeeping: committed group count and copies not yet landed.
  struct Copy {
    uintptr_t dst, src;
    uint32_t src_bytes;
    uint64_t group;  // groups_committed when issued: it lands with that commit's group
  };
  uint64_t groups_committed = 0;
  std::vector<Copy> copies;
};

// What the engine tells the checker about the block running now.
struct BlockView {
  const KernelInfo* kernel = nullptr;
  unsigned bx = 0, by = 0, bz = 0;
  uint32_t epoch = 0;             // block-barrier interval (unique across blocks and launches)
  const uint32_t* warp_epoch = nullptr;  // per warp: __syncwarp interval (unique, see exec.cpp)
  Thread* threads = nullptr;
};

// Set by the engine while a kernel runs (under the device lock); null otherwise.
extern BlockView* g_block;
extern Thread* g_current;  // the fiber running now

// A finding: records the message for the launch and leaves the faulting fiber for good.
[[noreturn]] void fault(const std::string& message);
// "kernel K (kernels/f.cu), block (x,y,z), thread (x,y,z)": the prefix of every finding.
std::string where();

// ---- memory checker (memory.cpp) ----
enum class Access : uint8_t { Load, Store, Atomic };
// Checks one access of `bytes` at `addr` made by the current thread; faults on a finding.
// Addresses outside device memory and shared memory (the fiber's stack, the runtime) are ignored.
void check_access(uintptr_t addr, size_t bytes, Access kind);
bool is_shared(uintptr_t addr, size_t bytes);
// Shared memory for a new block: poisons what the previous block touched, sizes the dynamic arena.
void shared_begin_block(size_t dynamic_bytes);
// The base of the dynamic shared-memory arena (`extern __shared__` in the kernels).
unsigned char* dynamic_shared_base();
// Static __shared__ bytes the block that just ran wrote (its footprint), with names for messages.
size_t static_shared_footprint(std::string* names);
// cp.async destinations: poisoned and marked pending until the wait lands them.
void shared_mark_pending(uintptr_t dst, size_t bytes);
void shared_land(uintptr_t dst, const void* data, size_t bytes);  // the copy's write, by g_current
// The undo log of QLORA_SIM_SCHEDULE=all: while active, the first store to each device page saves
// the page (contents and shadow) as it was before the launch, so the launch can be run again from
// the same memory under another schedule and its results compared.
void undo_begin();
std::vector<std::vector<uint8_t>> undo_snapshot();  // the saved pages' current contents
void undo_restore();                                 // every saved page back to its saved state
uintptr_t undo_first_difference(const std::vector<std::vector<uint8_t>>& snapshot);  // 0: none
void undo_end();
// Describes an address for a message: "device buffer #3 (4096 bytes), offset 4100" etc.
std::string describe(uintptr_t addr);

// ---- the profile (profile.cpp; QLORA_SIM_PROFILE=FILE) ----
// In the order of the profile line's fields (lds, sts, ldsm, cpa, ldg, stg).
enum class ProfileKind : uint8_t { SharedLoad, SharedStore, Ldmatrix, CpAsyncShared, GlobalLoad, GlobalStore };
// One kernel's totals over its launches (the line profile.cpp writes; docs/simulator.md).
struct ProfileCounts {
  uint64_t launches = 0, blocks = 0, threads = 0, dynamic_smem = 0;
  uint64_t mma = 0, ldmatrix = 0;  // warp-level instructions
  // Per kind of access: warp requests, their cost (shared: wavefronts; global: 32-byte sectors)
  // and the ideal cost.
  struct Traffic {
    uint64_t requests = 0, cost = 0, ideal = 0;
  };
  Traffic traffic[6];  // indexed by ProfileKind
  uint64_t ldg_bytes = 0, stg_bytes = 0, unique_bytes = 0;
  const Traffic& of(ProfileKind k) const { return traffic[int(k)]; }
};
// On when QLORA_SIM_PROFILE names a file (or after profile_enable()); every hook below is called
// only while it is on and a launch runs.
extern bool g_profiling;
void profile_enable();
const ProfileCounts* profile_of(const KernelInfo* k);  // null: never launched while profiling
void profile_launch_begin(const KernelInfo* k, uint64_t blocks, unsigned threads, size_t dynamic_shared);
void profile_launch_end();
// One lane's access (`pc`: the instruction's address; for shared kinds, `addr` is the address).
void profile_access(uintptr_t pc, uintptr_t addr, unsigned bytes, ProfileKind kind);
void profile_ldmatrix();  // one ldmatrix.x4 (called by every lane; counted once per warp)
void profile_mma();       // one mma.sync (the same)
void profile_converged(unsigned warp);  // every live lane of the warp is at the same point
void profile_block_converged();         // every thread of the block is (a barrier, the end)
// The offset of a shared-memory address within its region (static variables or the dynamic
// arena), which decides its bank.
uintptr_t shared_offset(uintptr_t addr);
bool is_device(uintptr_t addr);
// A kernel's plain load or store (the sanitizer callbacks): profiled as shared or global by where
// it lands; other addresses (the fiber's stack) are not memory of the device.
void profile_memory(const void* pc, const void* p, unsigned bytes, bool store);

}  // namespace qsim
