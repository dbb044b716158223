// The simulated GPU's CUDA driver API: a stand-in for libcuda.so.
//
// cudarc (0.19, feature dynamic-loading) dlopens "libcuda.so" and looks each driver function up
// by name the first time it is called, panicking "Missing symbol NAME" when it is absent. This file
// exports, under the exact names cudarc loads for CUDA 13.0 (cuMemAlloc_v2, cuEventElapsedTime_v2,
// ...), every driver function qlora-rs reaches through cudarc, implemented on the host on top of
// runtime.h: one device (an sm_80, A100-like card), one primary context, device memory from the
// memory checker, and kernels compiled for the host and run by the execution engine. Nothing else
// is exported, so a call we do not simulate fails loudly in cudarc with its name; there are no
// stubs that pretend to succeed.
//
// Modules: cuModuleLoadData takes the fatbin nvcc built from kernels/<stem>.cu and finds the
// stem in the identifier its entry headers carry, which nvcc writes only when given
// -Xfatbin=--ident=<stem>.cu. The payloads (zstd-compressed PTX and SASS) are never looked at;
// cuModuleGetFunction finds the host-compiled kernel by name and checks it comes from that stem.
//
// Everything runs synchronously at call time, so streams and events are bookkeeping only: a
// stream is a validated handle, an event a timestamp. A kernel fault (qsim::launch returning
// false) or the download of never-written device memory behaves like a fault on a real GPU:
// sticky. It is printed at once, and every later call that touches the context returns
// CUDA_ERROR_ILLEGAL_ADDRESS, whose cuGetErrorString carries the full finding (kernel, block,
// thread, offset). All findings use that one code because qsim::launch does not classify them;
// the message says what was found. QLORA_SIM_FAULT_ABORT=1 aborts at the fault instead (for a
// debugger). Errors of the call itself (a bad range, an unknown attribute, ...) return the code
// a real driver would, with one explaining line on stderr.
//
// Thread safety: cargo test calls the driver from many threads. The handle tables live under
// g_mu; qsim::launch runs outside it (it takes the launch lock and can run for a long time), and
// so do the copies, which only need the memory checker's own locking.

#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "runtime.h"


#define QSIM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kPrefix = "qlora-rs simulated GPU: ";

// ---- diagnostics ----

std::string vformat(const char* fmt, va_list ap) {
  char buf[1024];
  int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  return std::string(buf, n < 0 ? 0 : std::min<size_t>(size_t(n), sizeof buf - 1));
}

// Prints one prefixed line to stderr (in one write, so lines of parallel threads do not mix) and
// returns `code`.
__attribute__((format(printf, 2, 3))) CUresult fail(CUresult code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string line = kPrefix + vformat(fmt, ap) + "\n";
  va_end(ap);
  std::fputs(line.c_str(), stderr);
  return code;
}

#define TRY(expr)                                 \
  do {                                            \
    CUresult try_result_ = (expr);                \
    if (try_result_ != CUDA_SUCCESS) return try_result_; \
  } while (0)

// ---- driver state ----

struct Stream { unsigned flags; };
struct Event {
  unsigned flags;
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};
struct Function;
struct Module {
  std::string stem;                            // "gemm" for a fatbin of kernels/gemm.cu
  std::map<std::string, Function*> functions;  // one handle per name, as the real driver
};
struct Function {
  qsim::KernelInfo* kernel;
  Module* module;
};
struct Pool {  // the device's default (and only) stream-ordered memory pool
  uint64_t release_threshold = 0;
  int reuse_follow_event_dependencies = 1, reuse_allow_opportunistic = 1,
      reuse_allow_internal_dependencies = 1;
};
struct Context { char unused; };  // the primary context: the state below is all global

std::mutex g_mu;  // guards the handle tables and the pool
std::unordered_set<const void*> g_streams, g_events, g_modules, g_functions;
Pool g_pool;
Context g_primary;
std::atomic<bool> g_initialized{false};
std::atomic<int> g_primary_refs{0};

// The sticky fault: its code (CUDA_SUCCESS while none) and text (kept for the process lifetime,
// since cuGetErrorString hands out the pointer).
std::atomic<int> g_fault{CUDA_SUCCESS};
std::atomic<const char*> g_fault_text{nullptr};

// This thread's context stack (cuCtxSetCurrent replaces its top, Push/Pop push and pop).
thread_local std::vector<CUcontext> t_contexts;

CUcontext primary() { return reinterpret_cast<CUcontext>(&g_primary); }
CUmemoryPool default_pool() { return reinterpret_cast<CUmemoryPool>(&g_pool); }

// Account mode (QLORA_SIM_MODE=account): launches checked but not run, and at exit one line
// saying so, with the peak of device memory allocated.
std::atomic<unsigned long long> g_account_launches{0};

__attribute__((destructor)) void account_summary() {
  // Only a process that used the device says so (not, say, a probe that only counted devices).
  if (!qsim::account_mode() || (g_account_launches.load() == 0 && qsim::device_peak() == 0)) return;
  std::fprintf(stderr,
               "qlora-rs simulated GPU (QLORA_SIM_MODE=account): %llu kernel launches checked, "
               "none run (results are zeros); peak device memory allocated %.3f GiB\n",
               g_account_launches.load(), double(qsim::device_peak()) / double(1ull << 30));
}

bool abort_on_fault() {
  static const bool abort = [] {
    const char* v = std::getenv("QLORA_SIM_FAULT_ABORT");
    return v && std::strcmp(v, "1") == 0;
  }();
  return abort;
}

// Dynamic shared memory a kernel may use without opting in (cuFuncSetAttribute): 48 KiB on every
// card, or QLORA_SIM_DYNAMIC_SMEM_DEFAULT bytes (smaller), which makes every launch that asks for
// more prove it opted in: a launcher that relies on the default breaks as soon as a stage count
// or tile grows, and this finds it before that.
int default_dynamic_shared() {
  static const int bytes = [] {
    const char* v = std::getenv("QLORA_SIM_DYNAMIC_SMEM_DEFAULT");
    if (!v || !*v) return qsim::kMaxSharedPerBlock;
    char* end = nullptr;
    long n = std::strtol(v, &end, 10);
    if (*end != '\0' || n < 0 || n > qsim::kMaxSharedPerBlock) {
      std::fprintf(stderr, "qlora-rs simulated GPU: QLORA_SIM_DYNAMIC_SMEM_DEFAULT=%s is not a byte "
                   "count from 0 to %d\n", v, qsim::kMaxSharedPerBlock);
      std::abort();
    }
    return int(n);
  }();
  return bytes;
}

int dynamic_shared_limit(const qsim::KernelInfo* k) {
  return k->opted_in ? k->max_dynamic_shared : default_dynamic_shared();
}

// Records a simulator finding as the context's sticky fault (the first one wins) and returns the
// code every later call will return.
CUresult kernel_fault(const std::string& finding) {
  std::string line = finding.rfind(kPrefix, 0) == 0 ? finding : kPrefix + finding;
  std::fputs((line + "\n").c_str(), stderr);
  if (abort_on_fault()) {
    std::fputs("qlora-rs simulated GPU: QLORA_SIM_FAULT_ABORT=1: aborting at the fault\n", stderr);
    std::fflush(stderr);
    std::abort();
  }
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_fault.load() == CUDA_SUCCESS) {
    auto* text = new std::string(line + " (sticky, like a kernel fault on a real GPU: every "
                                        "later call on this context fails)");  // never freed
    g_fault_text.store(text->c_str());
    g_fault.store(CUDA_ERROR_ILLEGAL_ADDRESS);
  }
  return CUresult(g_fault.load());
}

// The checks at the top of every call that touches the context: initialised, no sticky fault.
CUresult live() {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  return CUresult(g_fault.load());
}

CUresult check_device(CUdevice dev) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

// Calls that create something in "the current context" need one bound to the thread.
CUresult need_context(const char* fn) {
  if (t_contexts.empty() || t_contexts.back() == nullptr)
    return fail(CUDA_ERROR_INVALID_CONTEXT, "%s: no current context on this thread", fn);
  if (g_primary_refs.load() == 0)
    return fail(CUDA_ERROR_CONTEXT_IS_DESTROYED,
                "%s: the primary context was released (cuDevicePrimaryCtxRelease)", fn);
  return CUDA_SUCCESS;
}

// Streams: the special handles (null, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD) or a live one.
CUresult check_stream(const char* fn, CUstream s) {
  if (s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) return CUDA_SUCCESS;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_streams.count(s)) return CUDA_SUCCESS;
  return fail(CUDA_ERROR_INVALID_HANDLE, "%s: %p is not a live stream", fn, (void*)s);
}

Event* find_event(CUevent e) {  // with g_mu held
  return g_events.count(e) ? reinterpret_cast<Event*>(e) : nullptr;
}

// ---- fatbin images ----
//
// An nvcc fatbin: a 16-byte header, then `fat_size` bytes of entries, each a header (at least 64
// bytes: the fixed part below, then the identifier and option strings it points at) followed by
// its payload (with -Xfatbin=-compress-all, a zstd frame of the PTX text or cubin). The source
// file's name is in the entry headers only when fatbinary was given --ident (nvcc passes
// -Xfatbin=--ident=...); plain `nvcc --fatbin` leaves it out.

constexpr uint32_t kFatbinMagic = 0xBA55ED50;
constexpr uint32_t kFatbinWrapperMagic = 0x466243B1;  // __fatBinC_Wrapper_t (fatbinary_section.h)

struct FatbinHeader {
  uint32_t magic;         // kFatbinMagic
  uint16_t version;       // 1
  uint16_t header_size;   // 16: the entries start here
  uint64_t fat_size;      // bytes of entries after the header
};
struct FatbinEntry {
  uint16_t kind;               // 1: PTX, 2: ELF (cubin)
  uint16_t version;            // 0x0101
  uint32_t header_size;        // this header with its strings; the payload follows
  uint64_t payload_size;       // padded payload bytes
  uint32_t compressed_size;    // payload bytes in use
  uint32_t options_offset;     // from the entry: {u32 offset, u32 size} of the ptxas options, or 0
  uint16_t minor, major;       // PTX ISA version (PTX entries)
  uint32_t arch;               // 80 for sm_80 / compute_80
  uint32_t ident_offset;       // from the entry: the identifier (source file name), 0 when none
  uint32_t ident_size;         // bytes, NUL-padded
  uint64_t flags;              // 0x8011: 64-bit, compressed, ...
  uint64_t reserved;
  uint64_t uncompressed_size;  // payload bytes once inflated
};
static_assert(sizeof(FatbinHeader) == 16 && sizeof(FatbinEntry) == 64, "fatbin layout");

template <class T> T read_at(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", (unsigned long long)v);
  return buf;
}

// Finds which kernels/<stem>.cu a module image was built from. On failure returns the code and
// says why.
CUresult identify_image(const void* image, std::string* stem, std::string* why, int depth = 0) {
  auto p = static_cast<const unsigned char*>(image);
  // Look at the first bytes without reading past the NUL of a (short) text image.
  unsigned char head[4] = {0, 0, 0, 0};
  for (int i = 0; i < 4 && (i == 0 || head[i - 1] != 0); ++i) head[i] = p[i];
  uint32_t magic = read_at<uint32_t>(head);
  if (magic == kFatbinWrapperMagic && depth == 0) {  // the wrapper nvcc embeds in host objects
    return identify_image(read_at<const void*>(p + 8), stem, why, depth + 1);
  }
  if (std::memcmp(head, "\x7f" "ELF", 4) == 0) {
    *why = "the image is a cubin (ELF), not a fatbin: the simulator finds a module's kernels by "
           "the source file named in the fatbin";
    return CUDA_ERROR_INVALID_IMAGE;
  }
  if (head[0] == 0) {
    *why = "the image is empty";
    return CUDA_ERROR_INVALID_IMAGE;
  }
  if (magic != kFatbinMagic) {
    bool text = true;
    for (unsigned char c : head) text &= c == 0 || c == '\n' || c == '\t' || (c >= 32 && c < 127);
    *why = text ? "the image is text (PTX?), not a fatbin: the simulator runs kernels compiled "
                  "for the host and needs the fatbin to know which kernels/*.cu they came from"
                : "the image is not a fatbin (magic " + hex(magic) + ", expected " +
                      hex(kFatbinMagic) + ")";
    return CUDA_ERROR_INVALID_IMAGE;
  }
  auto fh = read_at<FatbinHeader>(p);
  if (fh.version != 1 || fh.header_size < sizeof(FatbinHeader) || fh.fat_size == 0 ||
      fh.fat_size > (uint64_t(1) << 32)) {
    *why = "fatbin header not understood (version " + std::to_string(fh.version) +
           ", header size " + std::to_string(fh.header_size) + ", fat size " +
           std::to_string(fh.fat_size) + ")";
    return CUDA_ERROR_INVALID_IMAGE;
  }
  std::string ident, entries;
  bool runnable = false;
  int count = 0;
  const uint64_t end = fh.header_size + fh.fat_size;
  for (uint64_t off = fh.header_size; off < end; ++count) {
    if (off + sizeof(FatbinEntry) > end) {
      *why = "fatbin entry " + std::to_string(count) + " runs past the end of the fatbin";
      return CUDA_ERROR_INVALID_IMAGE;
    }
    auto e = read_at<FatbinEntry>(p + off);
    if (e.header_size < sizeof(FatbinEntry) || off + e.header_size + e.payload_size > end ||
        (e.ident_size != 0 && uint64_t(e.ident_offset) + e.ident_size > e.header_size)) {
      *why = "fatbin entry " + std::to_string(count) + " has an inconsistent header";
      return CUDA_ERROR_INVALID_IMAGE;
    }
    const char* kind = e.kind == 1 ? "PTX compute_" : e.kind == 2 ? "SASS sm_" : "kind-? sm_";
    entries += (entries.empty() ? "" : ", ") + std::string(kind) + std::to_string(e.arch);
    // What an sm_80 card runs: SASS for exactly sm_80, or PTX it can JIT (compute_80 or older).
    runnable |= (e.kind == 2 && e.arch == 80) || (e.kind == 1 && e.arch <= 80);
    if (e.ident_size != 0) {
      auto s = reinterpret_cast<const char*>(p + off + e.ident_offset);
      std::string name(s, strnlen(s, e.ident_size));
      if (!ident.empty() && name != ident) {
        *why = "fatbin entries name different source files (" + ident + ", " + name + ")";
        return CUDA_ERROR_INVALID_IMAGE;
      }
      ident = name;
    }
    off += e.header_size + e.payload_size;
  }
  if (ident.empty()) {
    *why = "the fatbin names no source file (" + std::to_string(count) +
           " entries, none with an identifier), so the simulator cannot tell which kernels/*.cu "
           "it holds: build it with nvcc -Xfatbin=--ident=<stem>.cu";
    return CUDA_ERROR_INVALID_IMAGE;
  }
  size_t slash = ident.find_last_of("/\\");
  *stem = slash == std::string::npos ? ident : ident.substr(slash + 1);
  if (stem->size() > 3 && stem->compare(stem->size() - 3, 3, ".cu") == 0)
    stem->resize(stem->size() - 3);
  if (!runnable) {
    *why = "the fatbin of " + ident + " has no code an sm_80 GPU can run (" + entries + ")";
    return CUDA_ERROR_NO_BINARY_FOR_GPU;
  }
  return CUDA_SUCCESS;
}

// ---- copies and memsets (device pointers are host addresses) ----

CUresult range_ok(CUdeviceptr p, size_t bytes, const char* fn, const char* role) {
  std::string why, what = std::string(fn) + " " + role;
  if (qsim::device_range_ok(p, bytes, what.c_str(), &why)) return CUDA_SUCCESS;
  return fail(CUDA_ERROR_INVALID_VALUE, "%s", why.c_str());
}

CUresult copy_htod(const char* fn, CUdeviceptr dst, const void* src, size_t n, CUstream s) {
  TRY(live());
  TRY(check_stream(fn, s));
  if (n == 0) return CUDA_SUCCESS;
  if (!src) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null host source", fn);
  std::lock_guard<std::mutex> device(qsim::device_mutex());
  TRY(range_ok(dst, n, fn, "destination"));
  if (qsim::account_mode()) return CUDA_SUCCESS;
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  qsim::device_mark_written(dst, n);
  return CUDA_SUCCESS;
}

CUresult copy_dtoh(const char* fn, void* dst, CUdeviceptr src, size_t n, CUstream s) {
  TRY(live());
  TRY(check_stream(fn, s));
  if (n == 0) return CUDA_SUCCESS;
  if (!dst) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null host destination", fn);
  std::string why, what = std::string(fn) + " source";
  {
    std::lock_guard<std::mutex> device(qsim::device_mutex());
    TRY(range_ok(src, n, fn, "source"));
    if (qsim::account_mode()) {  // nothing ran: the values are zeros, not results
      std::memset(dst, 0, n);
      return CUDA_SUCCESS;
    }
    if (qsim::device_check_written(src, n, what.c_str(), &why)) {
      std::memcpy(dst, reinterpret_cast<const void*>(src), n);
      return CUDA_SUCCESS;
    }
  }
  // A download of never-written memory is garbage on a real card: a finding, sticky like a fault.
  return kernel_fault(why);
}

CUresult copy_dtod(const char* fn, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  TRY(live());
  TRY(check_stream(fn, s));
  if (n == 0) return CUDA_SUCCESS;
  std::lock_guard<std::mutex> device(qsim::device_mutex());
  TRY(range_ok(src, n, fn, "source"));
  TRY(range_ok(dst, n, fn, "destination"));
  if (qsim::account_mode()) return CUDA_SUCCESS;
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  qsim::device_copy_written(dst, src, n);
  return CUDA_SUCCESS;
}

template <class T>
CUresult memset_n(const char* fn, CUdeviceptr dst, T value, size_t n, CUstream s) {
  TRY(live());
  TRY(check_stream(fn, s));
  if (n == 0) return CUDA_SUCCESS;
  if (dst % sizeof(T) != 0)
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: destination 0x%llx is not %zu-byte aligned", fn,
                (unsigned long long)dst, sizeof(T));
  if (n > SIZE_MAX / sizeof(T)) return fail(CUDA_ERROR_INVALID_VALUE, "%s: count overflows", fn);
  std::lock_guard<std::mutex> device(qsim::device_mutex());
  TRY(range_ok(dst, n * sizeof(T), fn, "destination"));
  if (qsim::account_mode()) return CUDA_SUCCESS;
  T* d = reinterpret_cast<T*>(dst);
  for (size_t i = 0; i < n; ++i) d[i] = value;
  qsim::device_mark_written(dst, n * sizeof(T));
  return CUDA_SUCCESS;
}

// ---- allocation ----

CUresult alloc(const char* fn, CUdeviceptr* dptr, size_t bytes, bool zero_ok) {
  if (!dptr) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null result pointer", fn);
  // cuMemAlloc refuses 0 bytes; stream-ordered allocations of 0 bytes (cudarc's
  // CudaStream::null, empty tensors) get a buffer of their own, so that a kernel touching it is
  // reported by the checker instead of dereferencing null.
  if (bytes == 0 && !zero_ok) return fail(CUDA_ERROR_INVALID_VALUE, "%s: 0 bytes requested", fn);
  uint64_t p;
  {
    std::lock_guard<std::mutex> device(qsim::device_mutex());
    p = qsim::device_alloc(bytes);
  }
  if (p == 0) return CUDA_ERROR_OUT_OF_MEMORY;  // quiet, like the real driver
  *dptr = p;
  return CUDA_SUCCESS;
}

CUresult release(const char* fn, CUdeviceptr p) {
  if (p == 0) return CUDA_SUCCESS;  // freeing null is a no-op
  bool freed;
  {
    std::lock_guard<std::mutex> device(qsim::device_mutex());
    freed = qsim::device_free(p);
  }
  if (!freed)
    return fail(CUDA_ERROR_INVALID_VALUE,
                "%s: 0x%llx is not the start of a live allocation (a double free, or a pointer "
                "into an allocation)", fn, (unsigned long long)p);
  return CUDA_SUCCESS;
}

// ---- device attributes: an sm_80, A100-like card; capability flags say what is simulated ----

bool device_attribute(CUdevice_attribute a, int* v) {
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = qsim::kMaxThreadsPerBlock; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *v = 65535; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = qsim::kMaxSharedPerBlock; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN:
      *v = qsim::kMaxSharedPerBlockOptin; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 167936; return true;
    case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: *v = 32; return true;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = qsim::kMultiprocessors; return true;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1410000; return true;         // kHz
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 1215000; return true;  // kHz
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 5120; return true;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *v = 40 << 20; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = qsim::kComputeMajor; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = qsim::kComputeMinor; return true;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: *v = 512; return true;
    case CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_INTEGRATED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: *v = CU_COMPUTEMODE_DEFAULT; return true;
    case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: *v = 1; return true;
    // Features the simulator does not provide (their driver functions are not exported).
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY:
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY:
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS:
    case CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS:
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH:
    case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH:
      *v = 0; return true;
    default: return false;
  }
}

// ---- error names and strings ----

struct ErrorText { const char* name; const char* text; };

bool error_text(CUresult code, ErrorText* out) {
  switch (code) {
#define E(c, s) case c: *out = {#c, s}; return true;
    E(CUDA_SUCCESS, "no error")
    E(CUDA_ERROR_INVALID_VALUE, "invalid argument")
    E(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")
    E(CUDA_ERROR_NOT_INITIALIZED, "initialization error")
    E(CUDA_ERROR_DEINITIALIZED, "driver shutting down")
    E(CUDA_ERROR_PROFILER_DISABLED, "profiler disabled while using external profiling tool")
    E(CUDA_ERROR_PROFILER_NOT_INITIALIZED, "profiler not initialized: call cudaProfilerInitialize()")
    E(CUDA_ERROR_PROFILER_ALREADY_STARTED, "profiler already started")
    E(CUDA_ERROR_PROFILER_ALREADY_STOPPED, "profiler already stopped")
    E(CUDA_ERROR_STUB_LIBRARY, "CUDA driver is a stub library")
    E(CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER, "API call is not supported in the installed CUDA driver")
    E(CUDA_ERROR_DEVICE_UNAVAILABLE, "CUDA-capable device(s) is/are busy or unavailable")
    E(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected")
    E(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal")
    E(CUDA_ERROR_DEVICE_NOT_LICENSED, "device doesn't have valid Grid license")
    E(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid")
    E(CUDA_ERROR_INVALID_CONTEXT, "invalid device context")
    E(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current")
    E(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed")
    E(CUDA_ERROR_UNMAP_FAILED, "unmapping of buffer object failed")
    E(CUDA_ERROR_ARRAY_IS_MAPPED, "array is mapped")
    E(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped")
    E(CUDA_ERROR_NO_BINARY_FOR_GPU, "no kernel image is available for execution on the device")
    E(CUDA_ERROR_ALREADY_ACQUIRED, "resource already acquired")
    E(CUDA_ERROR_NOT_MAPPED, "resource not mapped")
    E(CUDA_ERROR_NOT_MAPPED_AS_ARRAY, "resource not mapped as array")
    E(CUDA_ERROR_NOT_MAPPED_AS_POINTER, "resource not mapped as pointer")
    E(CUDA_ERROR_ECC_UNCORRECTABLE, "uncorrectable ECC error encountered")
    E(CUDA_ERROR_UNSUPPORTED_LIMIT, "limit is not supported on this architecture")
    E(CUDA_ERROR_CONTEXT_ALREADY_IN_USE, "exclusive-thread device already in use by a different thread")
    E(CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, "peer access is not supported between these two devices")
    E(CUDA_ERROR_INVALID_PTX, "a PTX JIT compilation failed")
    E(CUDA_ERROR_INVALID_GRAPHICS_CONTEXT, "invalid OpenGL or DirectX context")
    E(CUDA_ERROR_NVLINK_UNCORRECTABLE, "uncorrectable NVLink error detected during the execution")
    E(CUDA_ERROR_JIT_COMPILER_NOT_FOUND, "PTX JIT compiler library not found")
    E(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "the provided PTX was compiled with an unsupported toolchain.")
    E(CUDA_ERROR_JIT_COMPILATION_DISABLED, "PTX JIT compilation was disabled")
    E(CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY, "the provided execution affinity is not supported")
    E(CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC, "the provided PTX contains unsupported call to cudaDeviceSynchronize")
    E(CUDA_ERROR_CONTAINED, "an exception occurred on the device that is now contained by the GPU's error containment capability")
    E(CUDA_ERROR_INVALID_SOURCE, "device kernel image is invalid")
    E(CUDA_ERROR_FILE_NOT_FOUND, "file not found")
    E(CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND, "shared object symbol not found")
    E(CUDA_ERROR_SHARED_OBJECT_INIT_FAILED, "shared object initialization failed")
    E(CUDA_ERROR_OPERATING_SYSTEM, "OS call failed or operation not supported on this OS")
    E(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle")
    E(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state")
    E(CUDA_ERROR_LOSSY_QUERY, "attempted introspection would be semantically lossy")
    E(CUDA_ERROR_NOT_FOUND, "named symbol not found")
    E(CUDA_ERROR_NOT_READY, "device not ready")
    E(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")
    E(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "too many resources requested for launch")
    E(CUDA_ERROR_LAUNCH_TIMEOUT, "the launch timed out and was terminated")
    E(CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING, "launch uses incompatible texturing mode")
    E(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, "peer access is already enabled")
    E(CUDA_ERROR_PEER_ACCESS_NOT_ENABLED, "peer access has not been enabled")
    E(CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE, "cannot set while device is active in this process")
    E(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed")
    E(CUDA_ERROR_ASSERT, "device-side assert triggered")
    E(CUDA_ERROR_TOO_MANY_PEERS, "peer mapping resources exhausted")
    E(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "part or all of the requested memory range is already mapped")
    E(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "pointer does not correspond to a registered memory region")
    E(CUDA_ERROR_HARDWARE_STACK_ERROR, "hardware stack error")
    E(CUDA_ERROR_ILLEGAL_INSTRUCTION, "an illegal instruction was encountered")
    E(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned address")
    E(CUDA_ERROR_INVALID_ADDRESS_SPACE, "operation not supported on global/shared address space")
    E(CUDA_ERROR_INVALID_PC, "invalid program counter")
    E(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure")
    E(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, "too many blocks in cooperative launch")
    E(CUDA_ERROR_TENSOR_MEMORY_LEAK, "tensor memory not completely freed")
    E(CUDA_ERROR_NOT_PERMITTED, "operation not permitted")
    E(CUDA_ERROR_NOT_SUPPORTED, "operation not supported")
    E(CUDA_ERROR_SYSTEM_NOT_READY, "system not yet initialized")
    E(CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "system has unsupported display driver / cuda driver combination")
    E(CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, "forward compatibility was attempted on non supported HW")
    E(CUDA_ERROR_MPS_CONNECTION_FAILED, "MPS client failed to connect to the MPS control daemon or the MPS server")
    E(CUDA_ERROR_MPS_RPC_FAILURE, "the remote procedural call between the MPS server and the MPS client failed")
    E(CUDA_ERROR_MPS_SERVER_NOT_READY, "MPS server is not ready to accept new MPS client requests")
    E(CUDA_ERROR_MPS_MAX_CLIENTS_REACHED, "the hardware resources required to create MPS client have been exhausted")
    E(CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED, "the hardware resources required to support device connections have been exhausted")
    E(CUDA_ERROR_MPS_CLIENT_TERMINATED, "the MPS client has been terminated by the server")
    E(CUDA_ERROR_CDP_NOT_SUPPORTED, "module is using CUDA Dynamic Parallelism, but the current configuration does not support it")
    E(CUDA_ERROR_CDP_VERSION_MISMATCH, "application is using a CUDA Dynamic Parallelism version that does not match the device")
    E(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing")
    E(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "operation failed due to a previous error during capture")
    E(CUDA_ERROR_STREAM_CAPTURE_MERGE, "operation would result in a merge of separate capture sequences")
    E(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, "capture was not ended in the same stream as it began")
    E(CUDA_ERROR_STREAM_CAPTURE_UNJOINED, "capturing stream has unjoined work")
    E(CUDA_ERROR_STREAM_CAPTURE_ISOLATION, "dependency created on uncaptured work in another stream")
    E(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, "operation would make the legacy stream depend on a capturing blocking stream")
    E(CUDA_ERROR_CAPTURED_EVENT, "operation not permitted on an event last recorded in a capturing stream")
    E(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "attempt to terminate a thread-local capture sequence from another thread")
    E(CUDA_ERROR_TIMEOUT, "wait operation timed out")
    E(CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE, "the graph update was not performed because it included changes which violated constraints specific to instantiated graph update")
    E(CUDA_ERROR_EXTERNAL_DEVICE, "an async error has occurred in a external entity outside of CUDA")
    E(CUDA_ERROR_INVALID_CLUSTER_SIZE, "a kernel launch error has occurred due to cluster misconfiguration")
    E(CUDA_ERROR_FUNCTION_NOT_LOADED, "the function handle is not loaded when calling an API that requires a loaded function")
    E(CUDA_ERROR_INVALID_RESOURCE_TYPE, "one or more resources passed in are not valid resource types for the operation")
    E(CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION, "one or more resources are insufficient or non-applicable for the operation")
    E(CUDA_ERROR_KEY_ROTATION, "an error happened during the key rotation sequence")
    E(CUDA_ERROR_UNKNOWN, "unknown error")
#undef E
    default: return false;
  }
}

}  // namespace

// ==== Initialisation, version, device ========================================================

QSIM_EXPORT CUresult CUDAAPI cuInit(unsigned int Flags) {
  if (Flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0, got %u", Flags);
  g_initialized.store(true);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDriverGetVersion(int* driverVersion) {
  if (!driverVersion) return CUDA_ERROR_INVALID_VALUE;
  *driverVersion = CUDA_VERSION;  // 13000
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGetCount(int* count) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!count) return CUDA_ERROR_INVALID_VALUE;
  *count = 1;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGet(CUdevice* device, int ordinal) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!device) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal != 0)
    return fail(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGet: no device %d (the simulator has one, 0)",
                ordinal);
  *device = 0;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGetName(char* name, int len, CUdevice dev) {
  TRY(check_device(dev));
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  std::snprintf(name, size_t(len), "%s", qsim::kDeviceName);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
  TRY(check_device(dev));
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  *bytes = qsim::kTotalMemory;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) {
  TRY(check_device(dev));
  if (!pi) return CUDA_ERROR_INVALID_VALUE;
  if (!device_attribute(attrib, pi))
    return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute: attribute %d is not simulated",
                int(attrib));
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGetDefaultMemPool(CUmemoryPool* pool_out, CUdevice dev) {
  TRY(check_device(dev));
  if (!pool_out) return CUDA_ERROR_INVALID_VALUE;
  *pool_out = default_pool();
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice dev) {
  return cuDeviceGetDefaultMemPool(pool, dev);  // the current pool is always the default one
}

// ==== Contexts: one primary context, bound per thread ========================================

QSIM_EXPORT CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
  TRY(check_device(dev));
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  g_primary_refs.fetch_add(1);
  *pctx = primary();
  return CUDA_SUCCESS;
}

// Releasing the last reference destroys the primary context on a real driver; here that clears a
// sticky fault (the next retain gets a fresh context). Memory, modules and streams are kept.
QSIM_EXPORT CUresult CUDAAPI cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
  TRY(check_device(dev));
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_primary_refs.load() == 0)
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease: not retained");
  if (g_primary_refs.fetch_sub(1) == 1) g_fault.store(CUDA_SUCCESS);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (ctx != nullptr && ctx != primary())
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: %p is not a context", (void*)ctx);
  if (ctx == nullptr) {
    if (!t_contexts.empty()) t_contexts.pop_back();
  } else if (t_contexts.empty()) {
    t_contexts.push_back(ctx);
  } else {
    t_contexts.back() = ctx;
  }
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxGetCurrent(CUcontext* pctx) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  *pctx = t_contexts.empty() ? nullptr : t_contexts.back();
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxPushCurrent_v2(CUcontext ctx) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (ctx != primary())
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxPushCurrent: %p is not a context", (void*)ctx);
  t_contexts.push_back(ctx);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxPopCurrent_v2(CUcontext* pctx) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (t_contexts.empty()) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxPopCurrent: stack empty");
  if (pctx) *pctx = t_contexts.back();
  t_contexts.pop_back();
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxGetDevice(CUdevice* device) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!device) return CUDA_ERROR_INVALID_VALUE;
  TRY(need_context("cuCtxGetDevice"));
  *device = 0;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuCtxSynchronize(void) {
  TRY(live());
  TRY(need_context("cuCtxSynchronize"));
  return CUDA_SUCCESS;  // all work already ran
}

QSIM_EXPORT CUresult CUDAAPI cuMemGetInfo_v2(size_t* free, size_t* total) {
  TRY(live());
  TRY(need_context("cuMemGetInfo"));
  if (!free || !total) return CUDA_ERROR_INVALID_VALUE;
  size_t used = qsim::device_used();
  *total = qsim::kTotalMemory;
  *free = used < qsim::kTotalMemory ? qsim::kTotalMemory - used : 0;
  return CUDA_SUCCESS;
}

// ==== Streams and events: work runs at call time, so these only validate and timestamp =======

QSIM_EXPORT CUresult CUDAAPI cuStreamCreate(CUstream* phStream, unsigned int Flags) {
  TRY(live());
  TRY(need_context("cuStreamCreate"));
  if (!phStream || (Flags & ~unsigned(CU_STREAM_NON_BLOCKING)))
    return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate: bad arguments (flags %u)", Flags);
  auto* s = new Stream{Flags};
  std::lock_guard<std::mutex> lock(g_mu);
  g_streams.insert(s);
  *phStream = reinterpret_cast<CUstream>(s);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuStreamDestroy_v2(CUstream hStream) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_streams.erase(hStream))
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: %p is not a live stream",
                (void*)hStream);
  delete reinterpret_cast<Stream*>(hStream);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuStreamSynchronize(CUstream hStream) {
  TRY(live());
  return check_stream("cuStreamSynchronize", hStream);
}

QSIM_EXPORT CUresult CUDAAPI cuStreamQuery(CUstream hStream) {
  TRY(live());
  return check_stream("cuStreamQuery", hStream);  // always complete
}

QSIM_EXPORT CUresult CUDAAPI cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags) {
  TRY(live());
  TRY(check_stream("cuStreamWaitEvent", hStream));
  std::lock_guard<std::mutex> lock(g_mu);
  if (!find_event(hEvent))
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: %p is not a live event",
                (void*)hEvent);
  if (Flags & ~unsigned(CU_EVENT_WAIT_EXTERNAL)) return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuEventCreate(CUevent* phEvent, unsigned int Flags) {
  TRY(live());
  TRY(need_context("cuEventCreate"));
  const unsigned known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
  if (!phEvent || (Flags & ~known))
    return fail(CUDA_ERROR_INVALID_VALUE, "cuEventCreate: bad arguments (flags %u)", Flags);
  auto* e = new Event{Flags, false, {}};
  std::lock_guard<std::mutex> lock(g_mu);
  g_events.insert(e);
  *phEvent = reinterpret_cast<CUevent>(e);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuEventDestroy_v2(CUevent hEvent) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_events.erase(hEvent))
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy: %p is not a live event", (void*)hEvent);
  delete reinterpret_cast<Event*>(hEvent);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuEventRecord(CUevent hEvent, CUstream hStream) {
  TRY(live());
  TRY(check_stream("cuEventRecord", hStream));
  std::lock_guard<std::mutex> lock(g_mu);
  Event* e = find_event(hEvent);
  if (!e)
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: %p is not a live event", (void*)hEvent);
  e->recorded = true;
  e->at = std::chrono::steady_clock::now();
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuEventQuery(CUevent hEvent) {
  TRY(live());
  std::lock_guard<std::mutex> lock(g_mu);
  return find_event(hEvent) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;  // always complete
}

QSIM_EXPORT CUresult CUDAAPI cuEventSynchronize(CUevent hEvent) {
  return cuEventQuery(hEvent);
}

QSIM_EXPORT CUresult CUDAAPI cuEventElapsedTime_v2(float* pMilliseconds, CUevent hStart,
                                                  CUevent hEnd) {
  TRY(live());
  if (!pMilliseconds) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  Event *a = find_event(hStart), *b = find_event(hEnd);
  if (!a || !b) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: not a live event");
  if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING)
    return fail(CUDA_ERROR_INVALID_HANDLE,
                "cuEventElapsedTime: event created with CU_EVENT_DISABLE_TIMING");
  if (!a->recorded || !b->recorded)
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: event never recorded");
  *pMilliseconds = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return CUDA_SUCCESS;
}

// ==== Memory: the memory checker's heap; copies are memcpy on host addresses =================

QSIM_EXPORT CUresult CUDAAPI cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
  TRY(live());
  TRY(need_context("cuMemAlloc"));
  return alloc("cuMemAlloc", dptr, bytesize, false);
}

QSIM_EXPORT CUresult CUDAAPI cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream hStream) {
  TRY(live());
  TRY(check_stream("cuMemAllocAsync", hStream));
  return alloc("cuMemAllocAsync", dptr, bytesize, true);
}

QSIM_EXPORT CUresult CUDAAPI cuMemAllocFromPoolAsync(CUdeviceptr* dptr, size_t bytesize,
                                                    CUmemoryPool pool, CUstream hStream) {
  TRY(live());
  TRY(check_stream("cuMemAllocFromPoolAsync", hStream));
  if (pool != default_pool())
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAllocFromPoolAsync: %p is not the device's pool",
                (void*)pool);
  return alloc("cuMemAllocFromPoolAsync", dptr, bytesize, true);
}

QSIM_EXPORT CUresult CUDAAPI cuMemFree_v2(CUdeviceptr dptr) {
  TRY(live());
  return release("cuMemFree", dptr);
}

QSIM_EXPORT CUresult CUDAAPI cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
  TRY(live());
  TRY(check_stream("cuMemFreeAsync", hStream));
  return release("cuMemFreeAsync", dptr);
}

QSIM_EXPORT CUresult CUDAAPI cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void* srcHost,
                                            size_t ByteCount) {
  return copy_htod("cuMemcpyHtoD", dstDevice, srcHost, ByteCount, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void* srcHost,
                                                 size_t ByteCount, CUstream hStream) {
  return copy_htod("cuMemcpyHtoDAsync", dstDevice, srcHost, ByteCount, hStream);
}
QSIM_EXPORT CUresult CUDAAPI cuMemcpyDtoH_v2(void* dstHost, CUdeviceptr srcDevice,
                                            size_t ByteCount) {
  return copy_dtoh("cuMemcpyDtoH", dstHost, srcDevice, ByteCount, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemcpyDtoHAsync_v2(void* dstHost, CUdeviceptr srcDevice,
                                                 size_t ByteCount, CUstream hStream) {
  return copy_dtoh("cuMemcpyDtoHAsync", dstHost, srcDevice, ByteCount, hStream);
}
QSIM_EXPORT CUresult CUDAAPI cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                            size_t ByteCount) {
  return copy_dtod("cuMemcpyDtoD", dstDevice, srcDevice, ByteCount, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemcpyDtoDAsync_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                                 size_t ByteCount, CUstream hStream) {
  return copy_dtod("cuMemcpyDtoDAsync", dstDevice, srcDevice, ByteCount, hStream);
}

QSIM_EXPORT CUresult CUDAAPI cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N) {
  return memset_n("cuMemsetD8", dstDevice, uc, N, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemsetD16_v2(CUdeviceptr dstDevice, unsigned short us, size_t N) {
  return memset_n("cuMemsetD16", dstDevice, us, N, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemsetD32_v2(CUdeviceptr dstDevice, unsigned int ui, size_t N) {
  return memset_n("cuMemsetD32", dstDevice, ui, N, nullptr);
}
QSIM_EXPORT CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N,
                                            CUstream hStream) {
  return memset_n("cuMemsetD8Async", dstDevice, uc, N, hStream);
}
QSIM_EXPORT CUresult CUDAAPI cuMemsetD16Async(CUdeviceptr dstDevice, unsigned short us, size_t N,
                                             CUstream hStream) {
  return memset_n("cuMemsetD16Async", dstDevice, us, N, hStream);
}
QSIM_EXPORT CUresult CUDAAPI cuMemsetD32Async(CUdeviceptr dstDevice, unsigned int ui, size_t N,
                                             CUstream hStream) {
  return memset_n("cuMemsetD32Async", dstDevice, ui, N, hStream);
}

// ==== The default memory pool: a release threshold to store, usage from the memory checker ===
// Freed memory is never kept by the simulator, so "reserved" equals "used".

QSIM_EXPORT CUresult CUDAAPI cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attr,
                                                  void* value) {
  TRY(live());
  if (pool != default_pool() || !value)
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute: bad pool or value");
  std::lock_guard<std::mutex> lock(g_mu);
  switch (attr) {
    case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
      g_pool.reuse_follow_event_dependencies = *static_cast<int*>(value); return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
      g_pool.reuse_allow_opportunistic = *static_cast<int*>(value); return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
      g_pool.reuse_allow_internal_dependencies = *static_cast<int*>(value); return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD:
      g_pool.release_threshold = *static_cast<uint64_t*>(value); return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH:
      if (*static_cast<uint64_t*>(value) != 0)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "cuMemPoolSetAttribute: a high-water mark can only be reset (set to 0)");
      qsim::device_reset_peak();
      return CUDA_SUCCESS;
    default:
      return fail(CUDA_ERROR_INVALID_VALUE,
                  "cuMemPoolSetAttribute: attribute %d cannot be set or is not simulated",
                  int(attr));
  }
}

QSIM_EXPORT CUresult CUDAAPI cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attr,
                                                  void* value) {
  TRY(live());
  if (pool != default_pool() || !value)
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute: bad pool or value");
  std::lock_guard<std::mutex> lock(g_mu);
  auto u64 = static_cast<uint64_t*>(value);
  switch (attr) {
    case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
      *static_cast<int*>(value) = g_pool.reuse_follow_event_dependencies; return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
      *static_cast<int*>(value) = g_pool.reuse_allow_opportunistic; return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
      *static_cast<int*>(value) = g_pool.reuse_allow_internal_dependencies; return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *u64 = g_pool.release_threshold; return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_USED_MEM_CURRENT:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *u64 = qsim::device_used(); return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *u64 = qsim::device_peak(); return CUDA_SUCCESS;
    default:
      return fail(CUDA_ERROR_INVALID_VALUE,
                  "cuMemPoolGetAttribute: attribute %d is not simulated", int(attr));
  }
}

QSIM_EXPORT CUresult CUDAAPI cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep) {
  (void)minBytesToKeep;  // the pool keeps nothing, so there is nothing to trim
  TRY(live());
  if (pool != default_pool())
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolTrimTo: %p is not the device's pool",
                (void*)pool);
  return CUDA_SUCCESS;
}

// ==== Modules and functions ===================================================================

QSIM_EXPORT CUresult CUDAAPI cuModuleLoadData(CUmodule* module, const void* image) {
  TRY(live());
  TRY(need_context("cuModuleLoadData"));
  if (!module || !image) return fail(CUDA_ERROR_INVALID_VALUE, "cuModuleLoadData: null argument");
  std::string stem, why;
  CUresult r = identify_image(image, &stem, &why);
  if (r != CUDA_SUCCESS) return fail(r, "cuModuleLoadData: %s", why.c_str());
  if (!qsim::module_registered(stem.c_str()))
    return fail(CUDA_ERROR_NO_BINARY_FOR_GPU,
                "cuModuleLoadData: a fatbin of kernels/%s.cu, but the simulator has no kernels "
                "compiled for the host from that file", stem.c_str());
  auto* m = new Module{stem, {}};
  std::lock_guard<std::mutex> lock(g_mu);
  g_modules.insert(m);
  *module = reinterpret_cast<CUmodule>(m);
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuModuleUnload(CUmodule hmod) {
  if (!g_initialized.load()) return CUDA_ERROR_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_modules.erase(hmod))
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload: %p is not a loaded module", (void*)hmod);
  auto* m = reinterpret_cast<Module*>(hmod);
  for (auto& [name, f] : m->functions) {
    g_functions.erase(f);
    delete f;
  }
  delete m;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
  TRY(live());
  if (!hfunc || !name) return fail(CUDA_ERROR_INVALID_VALUE, "cuModuleGetFunction: null argument");
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_modules.count(hmod))
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction: %p is not a loaded module",
                (void*)hmod);
  auto* m = reinterpret_cast<Module*>(hmod);
  auto found = m->functions.find(name);
  if (found != m->functions.end()) {
    *hfunc = reinterpret_cast<CUfunction>(found->second);
    return CUDA_SUCCESS;
  }
  qsim::KernelInfo* k = qsim::find_kernel(name);
  if (!k)
    return fail(CUDA_ERROR_NOT_FOUND,
                "cuModuleGetFunction: no kernel `%s` in kernels/%s.cu (no kernel file compiled "
                "for the host defines it)", name, m->stem.c_str());
  if (m->stem != k->module)
    return fail(CUDA_ERROR_NOT_FOUND,
                "cuModuleGetFunction: kernel `%s` is defined in kernels/%s.cu, not in "
                "kernels/%s.cu (the module it was looked up in)", name, k->module, m->stem.c_str());
  auto* f = new Function{k, m};
  m->functions.emplace(name, f);
  g_functions.insert(f);
  *hfunc = reinterpret_cast<CUfunction>(f);
  return CUDA_SUCCESS;
}

namespace {
Function* find_function(CUfunction f) {  // with g_mu held
  return g_functions.count(f) ? reinterpret_cast<Function*>(f) : nullptr;
}
}  // namespace

QSIM_EXPORT CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib,
                                               int value) {
  TRY(live());
  std::lock_guard<std::mutex> lock(g_mu);
  Function* f = find_function(hfunc);
  if (!f) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncSetAttribute: %p is not a function",
                      (void*)hfunc);
  qsim::KernelInfo* k = f->kernel;
  if (attrib != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
    return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: attribute %d is not simulated",
                int(attrib));
  size_t static_shared = __atomic_load_n(&k->static_shared_seen, __ATOMIC_RELAXED);
  long long limit = qsim::kMaxSharedPerBlockOptin - (long long)static_shared;
  if (value < 0 || value > limit)
    return fail(CUDA_ERROR_INVALID_VALUE,
                "cuFuncSetAttribute: kernel %s: %d bytes of dynamic shared memory is more than an "
                "sm_80 block can have (%d bytes, less %zu static)",
                k->name, value, qsim::kMaxSharedPerBlockOptin, static_shared);
  k->max_dynamic_shared = value;
  k->opted_in = true;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuFuncGetAttribute(int* pi, CUfunction_attribute attrib,
                                               CUfunction hfunc) {
  TRY(live());
  if (!pi) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  Function* f = find_function(hfunc);
  if (!f) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncGetAttribute: %p is not a function",
                      (void*)hfunc);
  qsim::KernelInfo* k = f->kernel;
  switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = k->max_threads; return CUDA_SUCCESS;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
      *pi = dynamic_shared_limit(k); return CUDA_SUCCESS;
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES:  // as seen in launches so far (0 before the first)
      *pi = int(__atomic_load_n(&k->static_shared_seen, __ATOMIC_RELAXED)); return CUDA_SUCCESS;
    default:
      return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncGetAttribute: attribute %d is not simulated",
                  int(attrib));
  }
}

// ==== Launches ================================================================================

QSIM_EXPORT CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gridDimX,
                                           unsigned int gridDimY, unsigned int gridDimZ,
                                           unsigned int blockDimX, unsigned int blockDimY,
                                           unsigned int blockDimZ, unsigned int sharedMemBytes,
                                           CUstream hStream, void** kernelParams, void** extra) {
  TRY(live());
  TRY(check_stream("cuLaunchKernel", hStream));
  qsim::KernelInfo* k;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    Function* fn = find_function(f);
    if (!fn) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: %p is not a function",
                         (void*)f);
    k = fn->kernel;
    if (extra != nullptr)
      return fail(CUDA_ERROR_INVALID_VALUE,
                  "cuLaunchKernel: kernel %s: parameters passed in `extra` are not simulated "
                  "(pass them in kernelParams)", k->name);
    if (k->num_params > 0 && kernelParams == nullptr)
      return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel: kernel %s takes %d parameters but "
                  "kernelParams is null", k->name, k->num_params);
    for (int i = 0; i < k->num_params; ++i)
      if (kernelParams[i] == nullptr)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel: kernel %s: parameter %d is null",
                    k->name, i);
    unsigned long long threads = 1ull * blockDimX * blockDimY * blockDimZ;
    unsigned long long max_threads =
        std::min<unsigned long long>(unsigned(k->max_threads), qsim::kMaxThreadsPerBlock);
    if (blockDimX == 0 || blockDimY == 0 || blockDimZ == 0 || blockDimX > 1024 ||
        blockDimY > 1024 || blockDimZ > 64 || threads > max_threads)
      return fail(CUDA_ERROR_INVALID_VALUE,
                  "cuLaunchKernel: kernel %s launched with block (%u, %u, %u): at most %llu "
                  "threads (its __launch_bounds__ and the sm_80 limits x, y <= 1024, z <= 64)",
                  k->name, blockDimX, blockDimY, blockDimZ, max_threads);
    if (gridDimX == 0 || gridDimY == 0 || gridDimZ == 0 || gridDimX > 2147483647u ||
        gridDimY > 65535 || gridDimZ > 65535)
      return fail(CUDA_ERROR_INVALID_VALUE,
                  "cuLaunchKernel: kernel %s launched with grid (%u, %u, %u): each dimension "
                  "must be >= 1, x < 2^31, y and z <= 65535", k->name, gridDimX, gridDimY,
                  gridDimZ);
    if (sharedMemBytes > unsigned(dynamic_shared_limit(k)))
      return fail(CUDA_ERROR_INVALID_VALUE,
                  k->opted_in
                      ? "kernel %s launched with %u bytes of dynamic shared memory but opted into "
                        "%d (cuFuncSetAttribute)"
                      : "kernel %s launched with %u bytes of dynamic shared memory without opting "
                        "in (cuFuncSetAttribute); a block may use %d without",
                  k->name, sharedMemBytes, dynamic_shared_limit(k));
  }
  if (qsim::account_mode()) {  // checked above; nothing runs
    g_account_launches.fetch_add(1, std::memory_order_relaxed);
    return CUDA_SUCCESS;
  }
  // Outside g_mu: launch takes the launch lock and runs the whole grid.
  std::string error;
  if (!qsim::launch(k, {gridDimX, gridDimY, gridDimZ}, {blockDimX, blockDimY, blockDimZ},
                    sharedMemBytes, kernelParams, &error)) {
    // Asynchronous on a real GPU: the launch itself succeeds, the fault surfaces afterwards.
    kernel_fault(error);
  }
  return CUDA_SUCCESS;
}

// ==== Errors ==================================================================================

QSIM_EXPORT CUresult CUDAAPI cuGetErrorName(CUresult error, const char** pStr) {
  ErrorText t;
  if (!pStr) return CUDA_ERROR_INVALID_VALUE;
  if (!error_text(error, &t)) {
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *pStr = t.name;
  return CUDA_SUCCESS;
}

QSIM_EXPORT CUresult CUDAAPI cuGetErrorString(CUresult error, const char** pStr) {
  ErrorText t;
  if (!pStr) return CUDA_ERROR_INVALID_VALUE;
  if (!error_text(error, &t)) {
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
  }
  // The sticky fault's code reads as the finding itself, so the user's error names the kernel.
  const char* fault = g_fault_text.load();
  *pStr = (fault && error == CUDA_ERROR_ILLEGAL_ADDRESS) ? fault : t.text;
  return CUDA_SUCCESS;
}
