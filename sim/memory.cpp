// Device memory and the memory checker of the simulated GPU.
//
// Device memory is one reserved range of the host's address space. Allocations are 256-byte
// aligned (as cuMemAlloc's are), separated by unaddressable red zones, and never reused, so an
// out-of-bounds or use-after-free access lands on bytes no live buffer owns. A shadow byte per
// device byte says whether it is unaddressable, allocated but never written, or written; fresh
// memory is also filled with 0xFF (a NaN in f32, bf16 and f16) so a missed check still shows.
//
// Kernels are compiled with clang's -fsanitize-coverage=trace-loads,trace-stores, which calls
// __sanitizer_cov_load<N>/store<N> before every load and store of N bytes. Those callbacks
// (bottom of this file) send accesses inside device or shared memory to the checks:
//   global: inside a live allocation, naturally aligned, and (loads) written before;
//   shared: inside the static __shared__ variables or the launch's dynamic bytes, aligned,
//           written before read (shared memory is poisoned per block), not still being filled
//           by a cp.async, and free of races: two threads touching the same byte, one of them
//           writing, with no __syncthreads between them (nor a __syncwarp, within a warp).
#include <sys/mman.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <vector>

#include "internal.h"

// Every static __shared__ variable of every kernel lives in this section (cuda_sim.h).
extern "C" char __start_qsim_shared[] __attribute__((weak));
extern "C" char __stop_qsim_shared[] __attribute__((weak));

namespace qsim {
namespace {

constexpr size_t kHeapReserve = size_t(2) << 40;  // address space, not memory (never reused)
constexpr size_t kAlign = 256;
constexpr size_t kRedZone = 256;
enum : uint8_t { kNoAccess = 0, kUnwritten = 1, kWritten = 2, kPending = 3 };

struct Alloc {
  size_t bytes;
  uint64_t id;
  bool live;
};

struct Heap {
  uintptr_t base = 0;
  uint8_t* shadow = nullptr;
  uintptr_t next = 0;  // bump pointer (offset from base)
  std::mutex mu;
  std::map<uintptr_t, Alloc> allocs;  // by start address, freed ones kept for messages
  uint64_t next_id = 1;
  size_t used = 0, peak = 0;
  std::vector<size_t> at_peak;  // sizes of the live buffers at the peak (QLORA_SIM_PEAK_DUMP=1)
};

// QLORA_SIM_PEAK_DUMP=1: keep the sizes of the live buffers at each new peak, and print them
// (largest first, with counts) when the process exits: what the peak is made of.
bool peak_dump() {
  static const bool on = [] {
    const char* v = std::getenv("QLORA_SIM_PEAK_DUMP");
    return v && std::strcmp(v, "1") == 0;
  }();
  return on;
}

void* reserve(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "qlora-rs simulated GPU: cannot reserve %zu bytes of address space\n", bytes);
    abort();
  }
  return p;
}

Heap* g_heap = nullptr;
Heap& heap() { return *g_heap; }

// ---- shared memory: static variables (a linker section) + the dynamic arena ----
struct SharedByte {
  uint32_t epoch_w, epoch_r;    // block-barrier interval of the last write / read
  uint32_t wepoch_w, wepoch_r;  // the accessing warp's __syncwarp interval then
  uint16_t writer, reader;      // linear thread ids
  uint8_t state, multi_read;
};

struct SharedVar {
  uintptr_t start;
  size_t bytes;
  std::string name;
};

struct Shared {
  uintptr_t static_lo = 0, static_hi = 0;
  unsigned char* dyn = nullptr;  // dynamic arena, capacity kMaxSharedPerBlockOptin
  size_t dyn_bytes = 0;          // what this launch asked for
  std::vector<SharedByte> shadow;  // static bytes, then dynamic capacity
  uintptr_t dirty_lo = UINTPTR_MAX, dirty_hi = 0;  // shadow indices touched by this block
};

std::vector<SharedVar> read_static_shared_symbols(uintptr_t lo, uintptr_t hi);

Shared* g_shared = nullptr;
Shared& shared() { return *g_shared; }

// The ranges the instrumentation callbacks test, copied out of Heap and Shared.
uintptr_t g_heap_base = 0, g_static_lo = 0, g_static_bytes = 0, g_dyn_lo = 0, g_dyn_cap = 0;

Shared* make_shared_memory() {
  {
    auto* s = new Shared;
    if (__start_qsim_shared && __stop_qsim_shared) {
      s->static_lo = reinterpret_cast<uintptr_t>(__start_qsim_shared);
      s->static_hi = reinterpret_cast<uintptr_t>(__stop_qsim_shared);
    }
    // The arena sits between two unmapped pages, so even an unchecked overrun faults.
    const size_t page = 4096, cap = (size_t(kMaxSharedPerBlockOptin) + page - 1) / page * page;
    auto* raw = static_cast<unsigned char*>(reserve(cap + 2 * page));
    mprotect(raw, page, PROT_NONE);
    mprotect(raw + page + cap, page, PROT_NONE);
    s->dyn = raw + page;
    s->shadow.resize((s->static_hi - s->static_lo) + cap);
    for (auto& b : s->shadow) b = SharedByte{0, 0, 0, 0, 0, 0, kUnwritten, 0};
    memset(reinterpret_cast<void*>(s->static_lo), 0xFF, s->static_hi - s->static_lo);
    memset(s->dyn, 0xFF, cap);
    return s;
  }
}

// The static __shared__ variables' names and sizes, read on first need (messages, footprints).
const std::vector<SharedVar>& shared_vars() {
  static const std::vector<SharedVar> vars =
      read_static_shared_symbols(shared().static_lo, shared().static_hi);
  return vars;
}

__attribute__((destructor)) void print_peak() {
  if (!peak_dump() || g_heap == nullptr || g_heap->peak == 0) return;
  std::map<size_t, size_t, std::greater<size_t>> counts;
  for (size_t b : g_heap->at_peak) ++counts[b];
  fprintf(stderr, "qlora-rs simulated GPU: %zu live buffers at the peak of %zu bytes:\n",
          g_heap->at_peak.size(), g_heap->peak);
  for (const auto& [bytes, n] : counts)
    fprintf(stderr, "  %6zu x %14zu bytes = %14zu\n", n, bytes, n * bytes);
}

__attribute__((constructor)) void init_memory() {
  g_heap = new Heap;
  g_heap->base = reinterpret_cast<uintptr_t>(reserve(kHeapReserve));
  g_heap->shadow = static_cast<uint8_t*>(reserve(kHeapReserve));
  g_heap->next = kRedZone;
  g_shared = make_shared_memory();
  g_heap_base = g_heap->base;
  g_static_lo = g_shared->static_lo;
  g_static_bytes = g_shared->static_hi - g_shared->static_lo;
  g_dyn_lo = reinterpret_cast<uintptr_t>(g_shared->dyn);
  g_dyn_cap = g_shared->shadow.size() - g_static_bytes;
}

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : name;
  free(d);
  return out;
}

// The static __shared__ variables, from this library's own ELF symbol table (names for
// messages, sizes for each kernel's static footprint).
std::vector<SharedVar> read_static_shared_symbols(uintptr_t lo, uintptr_t hi) {
  std::vector<SharedVar> vars;
  Dl_info info{};
  if (lo == hi || !dladdr(reinterpret_cast<void*>(lo), &info) || !info.dli_fname) return vars;
  std::ifstream f(info.dli_fname, std::ios::binary);
  std::vector<char> elf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (elf.size() < sizeof(Elf64_Ehdr)) return vars;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
  const uintptr_t load = reinterpret_cast<uintptr_t>(info.dli_fbase);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(elf.data() + sh[i].sh_offset);
    const char* strtab = elf.data() + sh[sh[i].sh_link].sh_offset;
    for (size_t j = 0; j < sh[i].sh_size / sizeof(Elf64_Sym); ++j) {
      if (ELF64_ST_TYPE(syms[j].st_info) != STT_OBJECT || syms[j].st_size == 0) continue;
      const uintptr_t a = load + syms[j].st_value;
      if (a >= lo && a < hi) vars.push_back({a, syms[j].st_size, demangle(strtab + syms[j].st_name)});
    }
  }
  std::sort(vars.begin(), vars.end(), [](auto& x, auto& y) { return x.start < y.start; });
  return vars;
}

const SharedVar* shared_var_at(uintptr_t a) {
  const auto& vars = shared_vars();
  auto it = std::upper_bound(vars.begin(), vars.end(), a,
                             [](uintptr_t x, const SharedVar& v) { return x < v.start; });
  if (it == vars.begin()) return nullptr;
  --it;
  return a < it->start + it->bytes ? &*it : nullptr;
}

std::string hex(uintptr_t a) {
  char b[32];
  snprintf(b, sizeof b, "0x%" PRIxPTR, a);
  return b;
}

const char* verb(Access k) {
  return k == Access::Load ? "read" : k == Access::Store ? "write" : "atomic";
}

std::string thread_name(unsigned linear) {
  const Thread& t = g_block->threads[linear];
  char b[64];
  snprintf(b, sizeof b, "thread (%u,%u,%u)", t.tx, t.ty, t.tz);
  return b;
}

// ---- the undo log of QLORA_SIM_SCHEDULE=all: the device pages a launch writes, as they were ----
constexpr size_t kPageShift = 12, kPageBytes = size_t(1) << kPageShift;

struct UndoLog {
  bool active = false;
  uint64_t* saved_bits = nullptr;  // one bit per device page: saved in `pages`
  struct Page {
    uintptr_t page;
    std::vector<uint8_t> data, shadow;  // as before the launch
  };
  std::vector<Page> pages;
};
UndoLog g_undo;

void undo_save(uintptr_t a) {
  Heap& h = heap();
  const uintptr_t page = (a - h.base) >> kPageShift;
  uint64_t& word = g_undo.saved_bits[page / 64];
  if (word >> (page % 64) & 1) return;
  word |= uint64_t(1) << (page % 64);
  const uint8_t* d = reinterpret_cast<const uint8_t*>(h.base + (page << kPageShift));
  const uint8_t* s = h.shadow + (page << kPageShift);
  g_undo.pages.push_back({page, std::vector<uint8_t>(d, d + kPageBytes),
                          std::vector<uint8_t>(s, s + kPageBytes)});
}

void global_access(uintptr_t a, size_t n, Access kind) {
  Heap& h = heap();
  const uint8_t* sh = h.shadow + (a - h.base);
  for (size_t i = 0; i < n; ++i) {
    if (sh[i] == kNoAccess) {
      fault(where() + ": " + std::to_string(n) + "-byte " + verb(kind) + " at " + hex(a) +
            " is outside every live device buffer: " + describe(a + i));
    }
  }
  if (a % n) {
    fault(where() + ": misaligned " + std::to_string(n) + "-byte " + verb(kind) + " at " +
          describe(a) + " (needs " + std::to_string(n) + "-byte alignment)");
  }
  if (kind != Access::Store) {
    for (size_t i = 0; i < n; ++i) {
      if (sh[i] != kWritten) {
        fault(where() + ": " + std::to_string(n) + "-byte " + verb(kind) +
              " of device memory never written (allocated but not initialised): " +
              describe(a + i));
      }
    }
  }
  if (kind != Access::Load) {
    if (g_undo.active) undo_save(a);
    memset(h.shadow + (a - h.base), kWritten, n);
  }
}

size_t shared_index(uintptr_t a) {
  auto& s = shared();
  if (a >= s.static_lo && a < s.static_hi) return a - s.static_lo;
  return (s.static_hi - s.static_lo) + (a - reinterpret_cast<uintptr_t>(s.dyn));
}

void shared_access(uintptr_t a, size_t n, Access kind) {
  Shared& s = shared();
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(s.dyn);
  const bool in_static = a >= s.static_lo && a + n <= s.static_hi;
  const bool in_dynamic = a >= dyn && a + n <= dyn + s.dyn_bytes;
  if (!in_static && !in_dynamic) {
    fault(where() + ": " + std::to_string(n) + "-byte shared-memory " + verb(kind) +
          " out of bounds: " + describe(a));
  }
  if (a % n) {
    fault(where() + ": misaligned " + std::to_string(n) + "-byte shared-memory " + verb(kind) +
          " at " + describe(a));
  }
  const Thread& t = *g_current;
  const uint32_t e = g_block->epoch, we = g_block->warp_epoch[t.warp];
  const size_t base = shared_index(a);
  s.dirty_lo = std::min<uintptr_t>(s.dirty_lo, base);
  s.dirty_hi = std::max<uintptr_t>(s.dirty_hi, base + n);
  // Another thread's access in this barrier interval is ordered with ours only when both are in
  // one warp and a __syncwarp lies between.
  auto unordered = [&](uint16_t other, uint32_t other_wepoch) {
    return other != t.id && !(other / 32 == t.id / 32 && other_wepoch != we);
  };
  for (size_t i = 0; i < n; ++i) {
    SharedByte& b = s.shadow[base + i];
    if (b.state == kPending) {
      fault(where() + ": shared-memory " + verb(kind) + " of " + describe(a + i) +
            ", which a cp.async is still filling (no cp.async.wait_group between the copy and "
            "this access)");
    }
    const bool raced_write = b.epoch_w == e && unordered(b.writer, b.wepoch_w);
    if (kind == Access::Load) {
      if (b.state == kUnwritten) {
        fault(where() + ": read of shared memory never written in this block: " + describe(a + i));
      }
      if (raced_write) {
        fault(where() + ": shared-memory race: reads " + describe(a + i) + " written by " +
              thread_name(b.writer) + " with no __syncthreads between");
      }
      if (b.epoch_r != e) {
        b.epoch_r = e, b.reader = t.id, b.multi_read = 0, b.wepoch_r = we;
      } else if (b.reader != t.id) {
        b.multi_read = 1;
      }
    } else {
      if (kind == Access::Store && raced_write) {
        fault(where() + ": shared-memory race: writes " + describe(a + i) + " also written by " +
              thread_name(b.writer) + " with no __syncthreads between");
      }
      if (kind == Access::Store && b.epoch_r == e &&
          (b.multi_read || unordered(b.reader, b.wepoch_r))) {
        fault(where() + ": shared-memory race: writes " + describe(a + i) + " read by " +
              (b.multi_read ? std::string("other threads") : thread_name(b.reader)) +
              " with no __syncthreads between");
      }
      if (kind == Access::Atomic && b.state == kUnwritten) {
        fault(where() + ": atomic on shared memory never written in this block: " +
              describe(a + i));
      }
      b.state = kWritten, b.epoch_w = e, b.writer = t.id, b.wepoch_w = we;
    }
  }
}

}  // namespace

// ---- device memory API (runtime.h) ----

bool account_mode() {
  static const bool account = [] {
    const char* v = std::getenv("QLORA_SIM_MODE");
    if (!v || !*v || std::strcmp(v, "check") == 0) return false;
    if (std::strcmp(v, "account") == 0) return true;
    fprintf(stderr, "qlora-rs simulated GPU: QLORA_SIM_MODE=%s is not `check` or `account`\n", v);
    abort();
  }();
  return account;
}

uint64_t device_alloc(size_t bytes) {
  Heap& h = heap();
  std::lock_guard<std::mutex> lock(h.mu);
  if (h.used + bytes > kTotalMemory) return 0;
  const size_t start = (h.next + kAlign - 1) / kAlign * kAlign;
  const size_t span = std::max<size_t>(bytes, 1);
  if (start + span + kRedZone > kHeapReserve) return 0;
  h.next = start + span + kRedZone;
  const uintptr_t a = h.base + start;
  if (!account_mode()) {  // accounting never touches the pages (an 8B model's worth of them)
    memset(reinterpret_cast<void*>(a), 0xFF, bytes);
    memset(h.shadow + start, kUnwritten, bytes);
  }
  h.allocs[a] = Alloc{bytes, h.next_id++, true};
  h.used += bytes;
  if (h.used > h.peak && peak_dump()) {  // the live buffers at the new high-water mark
    h.at_peak.clear();
    for (const auto& [start, al] : h.allocs)
      if (al.live) h.at_peak.push_back(al.bytes);
  }
  h.peak = std::max(h.peak, h.used);
  return a;
}

bool device_free(uint64_t ptr) {
  Heap& h = heap();
  std::lock_guard<std::mutex> lock(h.mu);
  auto it = h.allocs.find(ptr);
  if (it == h.allocs.end() || !it->second.live) return false;
  it->second.live = false;
  h.used -= it->second.bytes;
  const uintptr_t off = ptr - h.base;
  if (!account_mode()) memset(h.shadow + off, kNoAccess, it->second.bytes);
  // Give whole pages back to the host (the shadow's zero pages read as "no access").
  const uintptr_t page = 4096, lo = (ptr + page - 1) / page * page;
  const uintptr_t hi = (ptr + it->second.bytes) / page * page;
  if (hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
    madvise(h.shadow + (lo - h.base), hi - lo, MADV_DONTNEED);
  }
  return true;
}

size_t device_used() {
  std::lock_guard<std::mutex> lock(heap().mu);
  return heap().used;
}
size_t device_peak() {
  std::lock_guard<std::mutex> lock(heap().mu);
  return heap().peak;
}
void device_reset_peak() {
  std::lock_guard<std::mutex> lock(heap().mu);
  heap().peak = heap().used;
}

bool device_range_ok(uint64_t ptr, size_t bytes, const char* what, std::string* why) {
  Heap& h = heap();
  if (bytes == 0) return true;
  if (ptr < h.base || ptr - h.base + bytes > kHeapReserve) {
    *why = std::string(what) + ": " + hex(ptr) + " is not a device address";
    return false;
  }
  if (account_mode()) {  // no shadow: the range must lie inside one live allocation
    std::lock_guard<std::mutex> lock(h.mu);
    auto it = h.allocs.upper_bound(ptr);
    if (it != h.allocs.begin()) {
      --it;
      if (it->second.live && ptr + bytes <= it->first + it->second.bytes) return true;
    }
    *why = std::string(what) + ": " + std::to_string(bytes) + " bytes at " + hex(ptr) +
           " are not inside one live device buffer";
    return false;
  }
  const uint8_t* sh = h.shadow + (ptr - h.base);
  for (size_t i = 0; i < bytes; ++i) {
    if (sh[i] == kNoAccess) {
      *why = std::string(what) + ": " + std::to_string(bytes) + " bytes at " + hex(ptr) +
             " leave the live device buffers: " + describe(ptr + i);
      return false;
    }
  }
  return true;
}

void device_mark_written(uint64_t ptr, size_t bytes) {
  Heap& h = heap();
  memset(h.shadow + (ptr - h.base), kWritten, bytes);
}

void device_copy_written(uint64_t dst, uint64_t src, size_t bytes) {
  Heap& h = heap();
  memmove(h.shadow + (dst - h.base), h.shadow + (src - h.base), bytes);
}

bool device_check_written(uint64_t ptr, size_t bytes, const char* what, std::string* why) {
  if (!device_range_ok(ptr, bytes, what, why)) return false;
  Heap& h = heap();
  if (account_mode()) return true;  // no shadow; device_range_ok checked the allocation
  const uint8_t* sh = h.shadow + (ptr - h.base);
  for (size_t i = 0; i < bytes; ++i) {
    if (sh[i] != kWritten) {
      *why = std::string(what) + ": copies device memory never written: " + describe(ptr + i);
      return false;
    }
  }
  return true;
}

// ---- undo log (internal.h) ----

void undo_begin() {
  if (!g_undo.saved_bits) {
    g_undo.saved_bits = static_cast<uint64_t*>(reserve((kHeapReserve >> kPageShift) / 8));
  }
  g_undo.active = true;
}

std::vector<std::vector<uint8_t>> undo_snapshot() {
  std::vector<std::vector<uint8_t>> snap;
  for (const auto& p : g_undo.pages) {
    const uint8_t* d = reinterpret_cast<const uint8_t*>(heap().base + (p.page << kPageShift));
    snap.emplace_back(d, d + kPageBytes);
  }
  return snap;
}

void undo_restore() {
  Heap& h = heap();
  for (const auto& p : g_undo.pages) {
    memcpy(reinterpret_cast<void*>(h.base + (p.page << kPageShift)), p.data.data(), kPageBytes);
    memcpy(h.shadow + (p.page << kPageShift), p.shadow.data(), kPageBytes);
  }
}

uintptr_t undo_first_difference(const std::vector<std::vector<uint8_t>>& snap) {
  Heap& h = heap();
  for (size_t i = 0; i < g_undo.pages.size(); ++i) {
    const auto& p = g_undo.pages[i];
    const uint8_t* now = reinterpret_cast<const uint8_t*>(h.base + (p.page << kPageShift));
    // A page the first run did not write still holds what it held before the launch.
    const uint8_t* then = i < snap.size() ? snap[i].data() : p.data.data();
    if (memcmp(now, then, kPageBytes) != 0) {
      size_t j = 0;
      while (now[j] == then[j]) ++j;
      return h.base + (p.page << kPageShift) + j;
    }
  }
  return 0;
}

void undo_end() {
  for (const auto& p : g_undo.pages) g_undo.saved_bits[p.page / 64] = 0;
  g_undo.pages.clear();
  g_undo.active = false;
}

// ---- checks (internal.h) ----

void check_access(uintptr_t a, size_t n, Access kind) {
  if (is_device(a)) return global_access(a, n, kind);
  if (is_shared(a, n)) return shared_access(a, n, kind);
}

bool is_device(uintptr_t a) { return a - g_heap_base < kHeapReserve; }

uintptr_t shared_offset(uintptr_t a) {
  return a >= g_static_lo && a < g_static_lo + g_static_bytes ? a - g_static_lo : a - g_dyn_lo;
}

void profile_memory(const void* pc, const void* p, unsigned bytes, bool store) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto site = reinterpret_cast<uintptr_t>(pc);
  if (is_device(a)) {
    profile_access(site, a, bytes, store ? ProfileKind::GlobalStore : ProfileKind::GlobalLoad);
  } else if (is_shared(a, bytes)) {
    profile_access(site, a, bytes, store ? ProfileKind::SharedStore : ProfileKind::SharedLoad);
  }
}

// Called from kernel code (through ld_vec/st_vec and __ldg): the return address is the site.
void vector_load(void* out, const void* p, size_t bytes) {
  if (g_block) {
    check_access(reinterpret_cast<uintptr_t>(p), bytes, Access::Load);
    if (g_profiling) profile_memory(__builtin_return_address(0), p, unsigned(bytes), false);
  }
  memcpy(out, p, bytes);
}

void vector_store(void* p, const void* in, size_t bytes) {
  if (g_block) {
    check_access(reinterpret_cast<uintptr_t>(p), bytes, Access::Store);
    if (g_profiling) profile_memory(__builtin_return_address(0), p, unsigned(bytes), true);
  }
  memcpy(p, in, bytes);
}

bool is_shared(uintptr_t a, size_t n) {
  return (a + n > g_static_lo && a < g_static_lo + g_static_bytes) ||
         (a + n > g_dyn_lo && a < g_dyn_lo + g_dyn_cap);
}

void shared_begin_block(size_t dynamic_bytes) {
  Shared& s = shared();
  if (s.dirty_hi > s.dirty_lo) {
    const size_t nstatic = s.static_hi - s.static_lo;
    for (size_t i = s.dirty_lo; i < s.dirty_hi; ++i) {
      s.shadow[i].state = kUnwritten;
      unsigned char* p = i < nstatic ? reinterpret_cast<unsigned char*>(s.static_lo + i)
                                     : s.dyn + (i - nstatic);
      *p = 0xFF;
    }
  }
  s.dirty_lo = UINTPTR_MAX, s.dirty_hi = 0;
  s.dyn_bytes = dynamic_bytes;
}

unsigned char* dynamic_shared_base() { return shared().dyn; }

size_t static_shared_footprint(std::string* names) {
  Shared& s = shared();
  size_t total = 0;
  for (const SharedVar& v : shared_vars()) {
    const size_t i = v.start - s.static_lo;
    bool used = false;
    for (size_t j = 0; j < v.bytes && !used; ++j) used = s.shadow[i + j].state != kUnwritten;
    if (!used) continue;
    total += v.bytes;
    if (names) *names += (names->empty() ? "" : ", ") + v.name + " (" + std::to_string(v.bytes) + " B)";
  }
  return total;
}

void shared_mark_pending(uintptr_t dst, size_t bytes) {
  Shared& s = shared();
  const size_t base = shared_index(dst);
  s.dirty_lo = std::min<uintptr_t>(s.dirty_lo, base);
  s.dirty_hi = std::max<uintptr_t>(s.dirty_hi, base + bytes);
  for (size_t i = 0; i < bytes; ++i) {
    if (s.shadow[base + i].state == kPending) {
      fault(where() + ": cp.async into " + describe(dst + i) +
            ", which an earlier cp.async is still filling");
    }
    s.shadow[base + i].state = kPending;
  }
  memset(reinterpret_cast<void*>(dst), 0xFF, bytes);
}

void shared_land(uintptr_t dst, const void* data, size_t bytes) {
  Shared& s = shared();
  const size_t base = shared_index(dst);
  for (size_t i = 0; i < bytes; ++i) s.shadow[base + i].state = kUnwritten;
  // The landing write is the issuing thread's: race-check it like a store.
  shared_access(dst, bytes, Access::Store);
  memcpy(reinterpret_cast<void*>(dst), data, bytes);
}

std::string describe(uintptr_t a) {
  Heap& h = heap();
  if (a - h.base < kHeapReserve) {
    std::lock_guard<std::mutex> lock(h.mu);
    auto it = h.allocs.upper_bound(a);
    std::string s;
    if (it != h.allocs.begin()) {
      auto prev = std::prev(it);
      const auto& al = prev->second;
      const uintptr_t off = a - prev->first;
      const std::string buf = std::string(al.live ? "" : "freed ") + "device buffer #" +
                              std::to_string(al.id) + " (" + std::to_string(al.bytes) + " bytes)";
      if (off < al.bytes) return "byte " + std::to_string(off) + " of " + buf;
      s = std::to_string(off - al.bytes) + " bytes past the end of " + buf;
    }
    if (it != h.allocs.end()) {
      s += (s.empty() ? "" : "; ") + std::to_string(it->first - a) +
           " bytes before the start of device buffer #" + std::to_string(it->second.id);
    }
    return s.empty() ? "device address " + hex(a) + ", no buffer near it" : s;
  }
  Shared& s = shared();
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(s.dyn);
  if (a >= s.static_lo && a < s.static_hi) {
    if (const SharedVar* v = shared_var_at(a)) {
      return "byte " + std::to_string(a - v->start) + " of __shared__ " + v->name + " (" +
             std::to_string(v->bytes) + " bytes)";
    }
    return "static shared memory at " + hex(a);
  }
  if (a >= dyn && a < dyn + s.shadow.size()) {
    return "byte " + std::to_string(a - dyn) + " of dynamic shared memory (the launch has " +
           std::to_string(s.dyn_bytes) + " bytes)";
  }
  return "host address " + hex(a) + " (not device or shared memory)";
}

}  // namespace qsim

// ---- the instrumentation callbacks (clang -fsanitize-coverage=trace-loads,trace-stores) ----

// The instruction's own address (the callback's return address) names it in the profile.
#define QSIM_CALLBACKS(N, T)                                                                    \
  extern "C" void __sanitizer_cov_load##N(T* p) {                                               \
    if (!qsim::g_block) return;                                                                 \
    qsim::check_access(reinterpret_cast<uintptr_t>(p), N, qsim::Access::Load);                 \
    if (qsim::g_profiling) qsim::profile_memory(__builtin_return_address(0), p, N, false);     \
  }                                                                                             \
  extern "C" void __sanitizer_cov_store##N(T* p) {                                              \
    if (!qsim::g_block) return;                                                                 \
    qsim::check_access(reinterpret_cast<uintptr_t>(p), N, qsim::Access::Store);                \
    if (qsim::g_profiling) qsim::profile_memory(__builtin_return_address(0), p, N, true);      \
  }
QSIM_CALLBACKS(1, uint8_t)
QSIM_CALLBACKS(2, uint16_t)
QSIM_CALLBACKS(4, uint32_t)
QSIM_CALLBACKS(8, uint64_t)
QSIM_CALLBACKS(16, __int128)

// The coverage counters that trace-loads needs alongside; unused.
extern "C" void __sanitizer_cov_8bit_counters_init(char*, char*) {}
extern "C" void __sanitizer_cov_pcs_init(const uintptr_t*, const uintptr_t*) {}
