// The execution engine of the simulated GPU: kernel registry, launches, threads as fibers,
// barriers, warp collectives, the PTX instructions the kernels use, and atomics.
//
// A launch runs its blocks one after another on the calling OS thread, under one process-wide
// lock (so static __shared__ variables, which are ordinary host statics, belong to one block at a
// time). A block's threads are fibers, switched only at synchronisation points: __syncthreads is
// a block barrier; a warp-collective operation (shuffles, votes, __syncwarp, ldmatrix, mma.sync)
// is a warp barrier at which the lanes deposit their operands and each takes its result. The order
// in which runnable threads resume after each synchronisation point — and the order of the
// blocks — is the launch's schedule: forward, reverse or a seeded random permutation; forward and
// random interleave the warps at every collective, reverse runs one warp at a time (the last
// first) until all its lanes wait at a block barrier, so that one warp gets ahead of the others.
// A schedule that changes a result exposes a missing barrier even where the race checker cannot
// see it.
//
// Misuse is a finding, reported like a compute-sanitizer error (kernel, block, thread): a barrier
// some threads never reach (an early return before __syncthreads), a collective whose mask names
// lanes that exited or do not exist, lanes of one mask waiting at different collectives, and
// deadlock.
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "internal.h"

extern "C" {
uint3 qsim_threadIdx, qsim_blockIdx;
dim3 qsim_blockDim, qsim_gridDim;
}

// Fiber switch (x86-64 System V): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *from, and resumes the stack `to`.
extern "C" void qsim_switch(void** from, void* to);
extern "C" void qsim_fiber_start();
asm(R"(
.text
.globl qsim_switch
.hidden qsim_switch
.type qsim_switch,@function
qsim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size qsim_switch,.-qsim_switch
.globl qsim_fiber_start
.hidden qsim_fiber_start
.type qsim_fiber_start,@function
qsim_fiber_start:
  movq %rbx, %rdi
  callq *%r12
  ud2
.size qsim_fiber_start,.-qsim_fiber_start
)");

namespace qsim {

BlockView* g_block = nullptr;
Thread* g_current = nullptr;

namespace {

// ---- kernel registry ----
std::map<std::string, KernelInfo*>& registry() {
  static auto* r = new std::map<std::string, KernelInfo*>;
  return *r;
}

// ---- fiber stacks ----
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPage = 4096;

struct StackPool {
  std::vector<char*> stacks;  // each kStackBytes, above a PROT_NONE guard page
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        fprintf(stderr, "qlora-rs simulated GPU: cannot map a fiber stack\n");
        abort();
      }
      mprotect(p, kPage, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + kPage);
    }
    return stacks[i];
  }
};

// ---- warp collectives ----
constexpr size_t kSlotBytes = 48;
const char* const kSyncwarp = "__syncwarp";

}  // namespace

struct Collective {
  unsigned mask = 0, arrived = 0;
  const char* site = nullptr;
  int refs = 0;  // lanes that still have to read their result
  alignas(16) unsigned char slot[32][kSlotBytes];
  bool decoded = false;  // mma: A and B unpacked to f32 by the first lane that reads them
  float a[16][16], b[16][8];
};

namespace {

struct Warp {
  unsigned size = 32;  // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;  // lanes that have exited
  std::vector<Collective*> forming, spare;  // owned by `owned`
  std::vector<std::unique_ptr<Collective>> owned;
};

enum class Schedule { Forward, Reverse, Random };

struct LaunchState {
  const KernelInfo* kernel = nullptr;
  void** params = nullptr;
  Schedule schedule = Schedule::Forward;
  std::mt19937_64 rng;
  uint64_t seed = 0;
  // The running block.
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<uint32_t> warp_epoch;
  BlockView view;
  void* scheduler_sp = nullptr;
  unsigned exited = 0, at_barrier = 0;
  bool faulted = false;
  std::string error;
};

LaunchState* g_launch = nullptr;
StackPool g_stacks;
uint32_t g_epoch_counter = 0, g_wepoch_counter = 0;
uint64_t g_launch_counter = 0;

// "kernel NAME (kernels/FILE.cu)": how every finding begins.
std::string kernel_label(const KernelInfo* k) {
  return std::string("kernel ") + k->name + " (kernels/" + k->module + ".cu)";
}

std::string dims(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

void resume_scheduler() {
  Thread* t = g_current;
  qsim_switch(&t->sp, g_launch->scheduler_sp);
  // Resumed by the scheduler: it has set g_current and threadIdx.
}

void block_barrier_complete();

std::string lanes(unsigned mask) {
  std::string s;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    int e = l;
    while (e + 1 < 32 && (mask >> (e + 1) & 1)) ++e;
    s += (s.empty() ? "" : ",") + std::to_string(l) + (e > l ? "-" + std::to_string(e) : "");
    l = e;
  }
  return s.empty() ? "none" : s;
}

// Joins the warp collective `site` over `mask`, depositing `size` bytes; returns when every lane
// of the mask has arrived. The caller reads the deposits, then calls release(). The `.aligned`
// PTX instructions (mma, ldmatrix) pass the full mask: every lane of the warp must execute them.
Collective* join(const char* site, unsigned mask, const void* in, size_t size) {
  Thread& t = *g_current;
  LaunchState& L = *g_launch;
  Warp& w = L.warps[t.warp];
  const unsigned exist = w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1);
  if (!(mask >> t.lane & 1)) {
    fault(where() + ": " + site + " over lanes " + lanes(mask) +
          ", which does not include the calling lane " + std::to_string(t.lane));
  }
  if (mask & ~exist) {
    fault(where() + ": " + site + " over lanes " + lanes(mask) + " in a warp of only " +
          std::to_string(w.size) + " threads (lanes " + lanes(mask & ~exist) +
          " do not exist: a collective called by a partial warp)");
  }
  if (mask & w.exited) {
    fault(where() + ": " + site + " over lanes " + lanes(mask) + ", but lane(s) " +
          lanes(mask & w.exited) + " have already exited (a divergent early return?)");
  }
  Collective* c = nullptr;
  for (Collective* f : w.forming) {
    if (f->mask == mask) c = f;
  }
  if (c && c->site != site) {
    fault(where() + ": lanes " + lanes(mask) + " wait at different warp collectives: " +
          c->site + " and " + site + " (divergent control flow around a warp-synchronous op)");
  }
  if (!c) {
    if (w.spare.empty()) {
      w.owned.push_back(std::make_unique<Collective>());
      c = w.owned.back().get();
    } else {
      c = w.spare.back();
      w.spare.pop_back();
    }
    c->mask = mask, c->arrived = 0, c->site = site, c->refs = 0, c->decoded = false;
    w.forming.push_back(c);
  }
  memcpy(c->slot[t.lane], in, size);
  c->arrived |= 1u << t.lane;
  if (c->arrived == mask) {
    w.forming.erase(std::find(w.forming.begin(), w.forming.end(), c));
    c->refs = __builtin_popcount(mask);
    for (unsigned l = 0; l < 32; ++l) {
      Thread& o = L.threads[t.warp * 32 + l];
      if ((mask >> l & 1) && l != t.lane) o.state = Thread::State::Runnable;
    }
    if (site == kSyncwarp) L.warp_epoch[t.warp] = ++g_wepoch_counter;
    const unsigned live = exist & ~w.exited;
    if (g_profiling && (mask & live) == live) profile_converged(t.warp);
  } else {
    t.state = Thread::State::AtCollective;
    t.coll_site = site;
    resume_scheduler();
  }
  return c;
}

void release(Collective* c) {
  if (--c->refs == 0) g_launch->warps[g_current->warp].spare.push_back(c);
}

void on_thread_exit();

void fiber_main(Thread* t) {
  LaunchState& L = *g_launch;
  L.kernel->invoke(L.kernel->fn, L.params);
  (void)t;
  on_thread_exit();
  resume_scheduler();
  __builtin_unreachable();
}

void start_fiber(Thread& t) {
  // Stack layout qsim_switch pops: control words, r15, r14, r13, r12, rbx, rbp, return address.
  uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 64);
  const uint32_t mxcsr = 0x1F80;  // round to nearest, no flush-to-zero (nvcc's default for f32)
  const uint16_t fpcw = 0x037F;
  memcpy(sp, &mxcsr, 4);
  memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  sp[1] = 0, sp[2] = 0, sp[3] = 0;                                   // r15 r14 r13
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);                   // r12
  sp[5] = reinterpret_cast<uint64_t>(&t);                            // rbx
  sp[6] = 0;                                                         // rbp
  sp[7] = reinterpret_cast<uint64_t>(&qsim_fiber_start);             // return address
  t.sp = sp;
}

std::string state_summary() {
  LaunchState& L = *g_launch;
  std::map<std::string, std::vector<unsigned>> by;
  for (const Thread& t : L.threads) {
    std::string k;
    switch (t.state) {
      case Thread::State::Exited: k = "exited"; break;
      case Thread::State::AtBarrier: k = "at __syncthreads"; break;
      case Thread::State::AtCollective: k = std::string("at ") + t.coll_site; break;
      case Thread::State::Runnable: k = "runnable"; break;
    }
    by[k].push_back(t.linear);
  }
  std::string s;
  for (auto& [k, ids] : by) {
    s += (s.empty() ? "" : "; ") + std::to_string(ids.size()) + " thread(s) " + k + " (first: " +
         std::to_string(ids.front()) + ")";
  }
  return s;
}

void on_thread_exit() {
  LaunchState& L = *g_launch;
  Thread& t = *g_current;
  t.state = Thread::State::Exited;
  ++L.exited;
  L.warps[t.warp].exited |= 1u << t.lane;
  if (L.at_barrier > 0) {
    fault(where() + ": exits while " + std::to_string(L.at_barrier) +
          " thread(s) wait at __syncthreads: a barrier not every thread reaches (a divergent "
          "early return?)");
  }
  for (Collective* c : L.warps[t.warp].forming) {
    if (c->mask >> t.lane & 1) {
      fault(where() + ": exits while lanes " + lanes(c->arrived) + " wait for it at " + c->site +
            " (a collective called by a partial warp)");
    }
  }
}

void block_barrier_complete() {
  LaunchState& L = *g_launch;
  if (L.exited > 0) {
    fault(where() + ": __syncthreads reached by " + std::to_string(L.at_barrier) + " of " +
          std::to_string(L.threads.size()) + " threads; the others exited before it (a "
          "divergent early return?)");
  }
  for (Thread& o : L.threads) {
    if (o.state == Thread::State::AtBarrier) o.state = Thread::State::Runnable;
  }
  L.at_barrier = 0;
  L.view.epoch = ++g_epoch_counter;
  if (g_profiling) profile_block_converged();
}

void set_current(Thread& t) {
  g_current = &t;
  qsim_threadIdx = uint3{t.tx, t.ty, t.tz};
}

// The order in which runnable threads resume in this round.
const std::vector<unsigned>& order(size_t n) {
  static std::vector<unsigned> o;
  static Schedule built = Schedule::Random;
  const Schedule s = g_launch->schedule;
  if (o.size() != n || s != built || s == Schedule::Random) {
    o.resize(n);
    for (size_t i = 0; i < n; ++i) o[i] = unsigned(i);
    if (s == Schedule::Reverse) std::reverse(o.begin(), o.end());
    if (s == Schedule::Random) std::shuffle(o.begin(), o.end(), g_launch->rng);
    built = s;
  }
  return o;
}

// Runs one block to completion (or to its first finding).
void run_block() {
  LaunchState& L = *g_launch;
  const size_t n = L.threads.size();
  for (size_t i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.state = Thread::State::Runnable;
    t.groups_committed = 0;
    t.copies.clear();
    t.stack = g_stacks.get(i);
    start_fiber(t);
  }
  L.exited = 0, L.at_barrier = 0;
  L.view.epoch = ++g_epoch_counter;
  for (auto& e : L.warp_epoch) e = ++g_wepoch_counter;
  for (auto& w : L.warps) {
    for (Collective* c : w.forming) w.spare.push_back(c);
    w.forming.clear();
    w.exited = 0;
  }
  // Resumes `t` until it waits or exits; false once the block has faulted.
  auto resume = [&](Thread& t) {
    set_current(t);
    qsim_switch(&L.scheduler_sp, t.sp);
    g_current = nullptr;
    return !L.faulted;
  };
  while (L.exited < n) {
    bool ran = false;
    if (L.schedule == Schedule::Reverse) {
      // One warp at a time, the last first, each run on until every lane waits at a block
      // barrier (or has exited): a warp gets ahead of the others across its collectives, as on
      // a GPU where the warps are not in step. (Forward and random interleave the warps at every
      // collective.) A copy into shared memory that another warp still reads, with no barrier
      // between, is then issued before that read and reported.
      for (size_t w = L.warps.size(); w-- > 0;) {
        const size_t lo = w * 32, hi = std::min(n, lo + 32);
        for (bool any = true; any;) {
          any = false;
          for (size_t i = hi; i-- > lo;) {
            if (L.threads[i].state != Thread::State::Runnable) continue;
            ran = any = true;
            if (!resume(L.threads[i])) return;
          }
        }
      }
    } else {
      for (unsigned i : order(n)) {
        if (L.threads[i].state != Thread::State::Runnable) continue;
        ran = true;
        if (!resume(L.threads[i])) return;
      }
    }
    if (!ran) {
      L.faulted = true;
      L.error = where() + ": deadlock, no thread can proceed: " + state_summary();
      return;
    }
  }
}

// QLORA_SIM_SCHEDULE: forward, reverse or random for every launch; rotate (the default): launch
// n gets the (n mod 3)-th; all: every launch runs under all three, from the same memory, and its
// results must agree.
// The setting, read and checked once.
const std::string& schedule_setting() {
  static const std::string setting = [] {
    const char* env = getenv("QLORA_SIM_SCHEDULE");
    const std::string s = env ? env : "rotate";
    if (s != "forward" && s != "reverse" && s != "random" && s != "rotate" && s != "all") {
      fprintf(stderr, "qlora-rs simulated GPU: QLORA_SIM_SCHEDULE=%s is not one of forward, "
              "reverse, random, rotate, all\n", s.c_str());
      abort();
    }
    return s;
  }();
  return setting;
}

bool schedule_all() { return schedule_setting() == "all"; }

Schedule schedule_for(uint64_t launch) {
  const std::string& s = schedule_setting();
  if (s == "forward") return Schedule::Forward;
  if (s == "reverse") return Schedule::Reverse;
  if (s == "random") return Schedule::Random;
  return static_cast<Schedule>(launch % 3);
}

const char* schedule_label(Schedule s) {
  return s == Schedule::Forward ? "forward" : s == Schedule::Reverse ? "reverse" : "random";
}

}  // namespace

// ---- internal.h ----

std::string where() {
  LaunchState& L = *g_launch;
  std::string s = kernel_label(L.kernel) + ", block " + dims(L.view.bx, L.view.by, L.view.bz);
  if (g_current) s += ", thread " + dims(g_current->tx, g_current->ty, g_current->tz);
  return s;
}

void fault(const std::string& message) {
  LaunchState& L = *g_launch;
  if (!L.faulted) {
    L.faulted = true;
    L.error = message;
  }
  // Leave the faulting fiber for good: the scheduler abandons the block.
  qsim_switch(&g_current->sp, L.scheduler_sp);
  __builtin_unreachable();
}

// ---- runtime.h ----

void register_kernel(KernelInfo* k) {
  auto [it, fresh] = registry().emplace(k->name, k);
  if (!fresh) {
    fprintf(stderr, "qlora-rs simulated GPU: kernel %s is defined in both kernels/%s.cu and "
            "kernels/%s.cu\n", k->name, it->second->module, k->module);
    abort();
  }
}

KernelInfo* find_kernel(const char* name) {
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

std::mutex& device_mutex() {
  static std::mutex m;
  return m;
}

bool module_registered(const char* stem) {
  for (auto& [name, k] : registry()) {
    if (strcmp(k->module, stem) == 0) return true;
  }
  return false;
}

const char* schedule_name() { return schedule_setting().c_str(); }

namespace {
bool launch_once(KernelInfo* k, Dim grid, Dim block, size_t dynamic_shared, void** params,
                 uint64_t id, Schedule schedule, std::string* error);

// A kernel that dereferences a pointer into neither device nor shared memory (null, a host
// address, garbage) faults on a card; here it would crash the process. While a kernel thread
// runs, SIGSEGV and SIGBUS become a finding naming the kernel, block and thread (the handler runs
// on an alternate stack, so a fiber's stack overflow is caught too, and leaves the fiber for good
// like any finding). Any other segfault goes to the handler that was there before.
struct sigaction g_old_segv, g_old_bus;

void on_bad_access(int sig, siginfo_t* info, void*) {
  if (g_launch && g_current) {
    char msg[160];
    snprintf(msg, sizeof msg, ": %s at address %p: an access outside device and shared memory "
             "(a null, host or stale pointer, or a stack overflow)",
             sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, sig);
    pthread_sigmask(SIG_UNBLOCK, &s, nullptr);
    fault(where() + msg);
  }
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);  // re-raised on return
}

void install_fault_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_bad_access;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
  // The handler needs an alternate stack on the launching thread (Rust's threads have one).
  thread_local bool has_stack = false;
  if (!has_stack) {
    stack_t old{};
    sigaltstack(nullptr, &old);
    if (old.ss_flags & SS_DISABLE) {
      stack_t ss{};
      ss.ss_size = 64 * 1024;
      ss.ss_sp = malloc(ss.ss_size);  // lives as long as the thread may launch
      sigaltstack(&ss, nullptr);
    }
    has_stack = true;
  }
}
}  // namespace

bool launch(KernelInfo* k, Dim grid, Dim block, size_t dynamic_shared, void** params,
            std::string* error) {
  std::lock_guard<std::mutex> lock(device_mutex());
  install_fault_handlers();
  const uint64_t id = ++g_launch_counter;
  if (!schedule_all()) {
    return launch_once(k, grid, block, dynamic_shared, params, id, schedule_for(id), error);
  }
  // Forward, then again from the same memory in reverse and in a random order: any byte of
  // device memory that ends up different is an order the kernel depends on but does not enforce.
  undo_begin();
  std::vector<std::vector<uint8_t>> first;
  bool ok = true;
  const bool profiling = g_profiling;
  for (Schedule s : {Schedule::Forward, Schedule::Reverse, Schedule::Random}) {
    if (s != Schedule::Forward) undo_restore();
    g_profiling = profiling && s == Schedule::Forward;  // the profile counts a launch once
    ok = launch_once(k, grid, block, dynamic_shared, params, id, s, error);
    if (!ok) break;
    if (s == Schedule::Forward) {
      first = undo_snapshot();
    } else if (uintptr_t at = undo_first_difference(first)) {
      *error = kernel_label(k) + ": the " +
               schedule_label(s) + " schedule leaves " + describe(at) +
               " different from the forward one: the result depends on an order of threads or "
               "blocks the kernel does not enforce (a race the checks did not see)";
      ok = false;
      break;
    }
  }
  undo_end();
  g_profiling = profiling;
  return ok;
}

namespace {
bool launch_once(KernelInfo* k, Dim grid, Dim block, size_t dynamic_shared, void** params,
                 uint64_t id, Schedule schedule, std::string* error) {
  if (dynamic_shared > size_t(kMaxSharedPerBlockOptin)) {
    *error = kernel_label(k) + " launched with " +
             std::to_string(dynamic_shared) + " bytes of dynamic shared memory, more than an "
             "sm_80 block may have (" + std::to_string(kMaxSharedPerBlockOptin) + ")";
    return false;
  }
  LaunchState L;
  L.kernel = k;
  L.params = params;
  L.schedule = schedule;
  static const char* seed_env = getenv("QLORA_SIM_SEED");
  L.seed = (seed_env ? strtoull(seed_env, nullptr, 10) : 0x9E3779B97F4A7C15ull) ^ id;
  L.rng.seed(L.seed);
  const unsigned nthreads = block.x * block.y * block.z;
  L.threads.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Thread& t = L.threads[i];
    t.tx = i % block.x, t.ty = i / block.x % block.y, t.tz = i / (block.x * block.y);
    t.linear = i, t.warp = i / 32, t.lane = i % 32, t.id = uint16_t(i);
  }
  const unsigned nwarps = (nthreads + 31) / 32;
  L.warps.resize(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) L.warps[w].size = std::min(32u, nthreads - w * 32);
  L.warp_epoch.resize(nwarps);
  L.view.kernel = k;
  L.view.threads = L.threads.data();
  L.view.warp_epoch = L.warp_epoch.data();
  qsim_blockDim = dim3(block.x, block.y, block.z);
  qsim_gridDim = dim3(grid.x, grid.y, grid.z);
  g_launch = &L;
  g_block = &L.view;

  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (g_profiling) profile_launch_begin(k, nblocks, nthreads, dynamic_shared);
  std::vector<uint64_t> blocks;
  if (L.schedule == Schedule::Random && nblocks <= (uint64_t(1) << 24)) {
    blocks.resize(nblocks);
    for (uint64_t b = 0; b < nblocks; ++b) blocks[b] = b;
    std::shuffle(blocks.begin(), blocks.end(), L.rng);
  }
  for (uint64_t i = 0; i < nblocks && !L.faulted; ++i) {
    const uint64_t b = !blocks.empty() ? blocks[i]
                       : L.schedule == Schedule::Reverse ? nblocks - 1 - i : i;
    L.view.bx = unsigned(b % grid.x), L.view.by = unsigned(b / grid.x % grid.y);
    L.view.bz = unsigned(b / (uint64_t(grid.x) * grid.y));
    qsim_blockIdx = uint3{L.view.bx, L.view.by, L.view.bz};
    shared_begin_block(dynamic_shared);
    run_block();
    if (g_profiling) profile_block_converged();
    if (i == 0 && !L.faulted) {
      std::string names;
      const size_t st = static_shared_footprint(&names);
      k->static_shared_seen = std::max(k->static_shared_seen, st);
      if (st + dynamic_shared > size_t(kMaxSharedPerBlockOptin)) {
        L.faulted = true;
        L.error = kernel_label(k) + " uses " +
                  std::to_string(st) + " bytes of static shared memory (" + names + ") plus " +
                  std::to_string(dynamic_shared) + " dynamic, more than an sm_80 block may have (" +
                  std::to_string(kMaxSharedPerBlockOptin) + ")";
      }
    }
  }
  if (g_profiling) profile_launch_end();
  g_block = nullptr;
  g_launch = nullptr;
  g_current = nullptr;
  if (L.faulted) {
    *error = L.error + " [schedule " + schedule_label(L.schedule) +
             (L.schedule == Schedule::Random ? ", seed " + std::to_string(L.seed) : "") + "]";
    return false;
  }
  return true;
}
}  // namespace

// ---- what the kernels call (cuda_sim.h) ----

void syncthreads() {
  LaunchState& L = *g_launch;
  Thread& t = *g_current;
  t.state = Thread::State::AtBarrier;
  ++L.at_barrier;
  if (L.at_barrier + L.exited == L.threads.size()) {
    block_barrier_complete();  // the last thread to arrive releases the others and goes on
  } else {
    resume_scheduler();
  }
}

void syncwarp(unsigned mask) {
  Collective* c = join(kSyncwarp, mask, nullptr, 0);
  release(c);
}

void shfl(unsigned mask, const void* in, void* out, size_t size, int mode, int arg, int width) {
  const char* site = mode == kShflIdx ? "__shfl_sync" : mode == kShflUp ? "__shfl_up_sync"
                     : mode == kShflDown ? "__shfl_down_sync" : "__shfl_xor_sync";
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    fault(where() + ": " + site + " with width " + std::to_string(width) +
          " (must be a power of two up to 32)");
  }
  Collective* c = join(site, mask, in, size);
  const int lane = int(g_current->lane), seg = lane & ~(width - 1);
  int src = lane;
  switch (mode) {
    case kShflIdx: src = seg + (arg & (width - 1)); break;
    case kShflUp: src = (lane - seg) >= arg ? lane - arg : lane; break;
    case kShflDown: src = (lane - seg) + arg < width ? lane + arg : lane; break;
    case kShflXor: src = lane ^ arg; if (src >= seg + width) src = lane; break;
  }
  if (src < 0 || src > 31 || !(mask >> src & 1)) {
    fault(where() + ": " + site + " reads lane " + std::to_string(src) +
          ", which is not in the mask " + lanes(mask) + " (its value is undefined)");
  }
  memcpy(out, c->slot[src], size);
  release(c);
}

unsigned vote_ballot(unsigned mask, bool pred) {
  const unsigned char p = pred;
  Collective* c = join("__ballot_sync", mask, &p, 1);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1) && c->slot[l][0]) r |= 1u << l;
  }
  release(c);
  return r;
}

template <class T>
static T atomic_add(T* p, T v) {
  check_access(reinterpret_cast<uintptr_t>(p), sizeof(T), Access::Atomic);
  const T old = *p;
  *p = old + v;
  return old;
}
uint32_t atomic_add_u32(uint32_t* p, uint32_t v) { return atomic_add(p, v); }
int atomic_add_i32(int* p, int v) { return atomic_add(p, v); }
unsigned long long atomic_add_u64(unsigned long long* p, unsigned long long v) { return atomic_add(p, v); }
float atomic_add_f32(float* p, float v) { return atomic_add(p, v); }
double atomic_add_f64(double* p, double v) { return atomic_add(p, v); }

// ---- PTX instructions (PTX ISA 8.x; section names as in NVIDIA's "Parallel Thread Execution
// ISA" document) ----

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c with d = c (in place):
// §9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type". With
// groupID = lane / 4 and tig = lane % 4 ("threadID_in_group"):
//   A (16×16, row-major), 4 registers of 2 bf16 each (low half first):
//     a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16×8, "col": K along the register pairs), 2 registers:
//     b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D (16×8 f32): c0,c1 = D[g][2t..2t+1], c2,c3 = D[g+8][2t..2t+1]
// The products of two bf16 are exact in f32; the sum is accumulated in f32 in k order
// (the hardware's internal order is unspecified).
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  if (g_profiling) profile_mma();
  uint32_t in[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  Collective* c = join("mma.sync.aligned.m16n8k16", 0xffffffffu, in, sizeof in);
  if (!c->decoded) {
    auto bf = [](uint32_t bits16) {
      const uint32_t bits = bits16 << 16;
      float f;
      memcpy(&f, &bits, 4);
      return f;
    };
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t r[6];
      memcpy(r, c->slot[lane], sizeof r);
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {  // a_i: row g (+8 for odd i), columns 2t, 2t+1 (+8 for i >= 2)
        const int row = g + (i & 1) * 8, col = 2 * t + (i >> 1) * 8;
        c->a[row][col] = bf(r[i] & 0xFFFF), c->a[row][col + 1] = bf(r[i] >> 16);
      }
      for (int i = 0; i < 2; ++i) {  // b_i: rows (k) 2t, 2t+1 (+8 for i = 1), column g
        const int k = 2 * t + i * 8;
        c->b[k][g] = bf(r[4 + i] & 0xFFFF), c->b[k + 1][g] = bf(r[4 + i] >> 16);
      }
    }
    c->decoded = true;
  }
  const int g = int(g_current->lane) / 4, t = int(g_current->lane) % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    // A product of two bf16 is exact in f32, so this is the fused multiply-add too.
    for (int k = 0; k < 16; ++k) acc += c->a[rows[i]][k] * c->b[k][cols[i]];
    d[i] = acc;
  }
  release(c);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 r, [row]: §9.7.9.? "ldmatrix". Lanes 8j..8j+7
// give the addresses of rows 0..7 of matrix j (16 bytes each, 16-byte aligned, in shared
// memory). Without .trans lane l receives in r[j] the elements (row l/4, columns 2(l%4) and
// 2(l%4)+1) of matrix j; with .trans it receives (rows 2(l%4) and 2(l%4)+1, column l/4).
void ldmatrix_x4(uint32_t* r, const void* row, bool trans) {
  const auto a = reinterpret_cast<uintptr_t>(row);
  const char* site = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  if (!is_shared(a, 16)) {
    fault(where() + ": " + site + " row address " + describe(a) + " is not in shared memory");
  }
  if (a % 16) fault(where() + ": " + site + " row address " + describe(a) + " is not 16-byte aligned");
  check_access(a, 16, Access::Load);  // each lane reads the row it names
  if (g_profiling) {
    profile_access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), a, 16, ProfileKind::Ldmatrix);
    profile_ldmatrix();
  }
  unsigned char mine[16];
  memcpy(mine, row, 16);
  Collective* c = join(site, 0xffffffffu, mine, 16);
  const int l = int(g_current->lane);
  for (int j = 0; j < 4; ++j) {
    uint16_t e[2];
    for (int i = 0; i < 2; ++i) {
      const int rr = trans ? 2 * (l % 4) + i : l / 4;   // row of matrix j
      const int cc = trans ? l / 4 : 2 * (l % 4) + i;   // element within the row
      memcpy(&e[i], c->slot[8 * j + rr] + 2 * cc, 2);
    }
    r[j] = uint32_t(e[0]) | uint32_t(e[1]) << 16;
  }
  release(c);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: §9.7.9.25.3.1 "cp.async". Copies
// src_bytes (0..16) from global memory and zero-fills the rest of the 16 bytes; both addresses
// 16-byte aligned. The copy is asynchronous: it belongs to the thread's open group, which
// cp.async.commit_group closes; cp.async.wait_group N waits until at most the N newest committed
// groups are pending. Here the copy happens at the wait, and until then the destination is
// poisoned and marked pending, so an early read is a finding. Only src_bytes are read: with 0
// the source address is not touched.
void cp_async_16(void* dst, const void* src, int src_bytes) {
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (!is_shared(d, 16)) fault(where() + ": cp.async destination " + describe(d) + " is not in shared memory");
  if (d % 16) fault(where() + ": cp.async destination " + describe(d) + " is not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) {
    fault(where() + ": cp.async src-size " + std::to_string(src_bytes) + " is not in 0..16");
  }
  if (src_bytes > 0) {
    if (s % 16) fault(where() + ": cp.async source " + describe(s) + " is not 16-byte aligned");
    std::string why;
    if (!device_range_ok(s, size_t(src_bytes), "cp.async source", &why)) fault(where() + ": " + why);
  }
  shared_mark_pending(d, 16);
  if (g_profiling) {
    const auto pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
    profile_access(pc, d, 16, ProfileKind::CpAsyncShared);
    if (src_bytes > 0) profile_access(pc, s, unsigned(src_bytes), ProfileKind::GlobalLoad);
  }
  Thread& t = *g_current;
  t.copies.push_back({d, s, uint32_t(src_bytes), t.groups_committed});
}

void cp_async_commit() { ++g_current->groups_committed; }

void cp_async_wait(int n) {
  Thread& t = *g_current;
  const uint64_t keep_from = t.groups_committed > uint64_t(n) ? t.groups_committed - n : 0;
  std::vector<Thread::Copy> still;
  for (const Thread::Copy& c : t.copies) {
    if (c.group >= keep_from) {
      still.push_back(c);
      continue;
    }
    unsigned char data[16] = {};
    for (uint32_t i = 0; i < c.src_bytes; ++i) check_access(c.src + i, 1, Access::Load);
    memcpy(data, reinterpret_cast<const void*>(c.src), c.src_bytes);
    shared_land(c.dst, data, 16);
  }
  t.copies.swap(still);
}

// ex2.approx.ftz.f32: 2^x, subnormal inputs and results flushed to zero (the result is never
// negative, so to +0). The card's MUFU.EX2 is within about 2 ulp of 2^x; the host's exp2f is
// nearer, so the two may differ by that much, as they did for exp2f before.
float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}

}  // namespace qsim
