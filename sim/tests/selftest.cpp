// The simulator's own tests: run with `make -C sim selftest` (sim/build.sh --selftest). Each case
// launches a kernel of selftest_kernels.cu through the runtime and checks either its result
// against plain host arithmetic or that the checker reports the planted bug (a substring of the
// finding). Exit status: the number of failed cases.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "../internal.h"
#include "../runtime.h"

using namespace qsim;

namespace {

int failures = 0, passes = 0;

template <class T>
T* upload(const std::vector<T>& v) {
  auto p = reinterpret_cast<T*>(device_alloc(v.size() * sizeof(T)));
  memcpy(p, v.data(), v.size() * sizeof(T));
  device_mark_written(reinterpret_cast<uint64_t>(p), v.size() * sizeof(T));
  return p;
}

template <class T>
T* fresh(size_t n) { return reinterpret_cast<T*>(device_alloc(n * sizeof(T))); }

// Launches `name`; `expect` empty: must succeed; else the finding must contain it.
bool run(const char* name, Dim grid, Dim block, size_t shmem, std::vector<void*> args,
         const std::string& expect, const char* what) {
  KernelInfo* k = find_kernel(name);
  if (!k) {
    printf("FAIL %s: kernel %s not registered\n", what, name);
    ++failures;
    return false;
  }
  std::string err;
  const bool ok = launch(k, grid, block, shmem, args.data(), &err);
  // `expect` may list alternatives separated by '|' (the same bug reads differently under
  // different schedules: a missing barrier is a race, or a read of memory not yet written).
  bool found = false;
  for (size_t at = 0; at <= expect.size();) {
    size_t bar = expect.find('|', at);
    if (bar == std::string::npos) bar = expect.size();
    found |= err.find(expect.substr(at, bar - at)) != std::string::npos;
    at = bar + 1;
  }
  bool pass = expect.empty() ? ok : (!ok && found);
  printf("%s %s%s%s\n", pass ? "ok  " : "FAIL", what, ok ? "" : "\n       finding: ", ok ? "" : err.c_str());
  passes += pass;
  if (!pass) {
    if (!expect.empty()) printf("       expected a finding containing: %s\n", expect.c_str());
    ++failures;
  }
  return ok;
}

void check(bool cond, const char* what) {
  printf("%s %s\n", cond ? "ok  " : "FAIL", what);
  passes += cond;
  if (!cond) ++failures;
}

float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

}  // namespace

int main() {
  printf("simulated GPU self-test (schedule %s)\n", schedule_name());
  // Out of bounds, one past the end of a 100-float buffer.
  {
    std::vector<float> h(100);
    for (int i = 0; i < 100; ++i) h[i] = float(i);
    float* x = upload(h);
    float* y = fresh<float>(100);
    int n = 100, shift = 0;
    run("st_copy_shifted", {4, 1, 1}, {32, 1, 1}, 0, {&x, &y, &n, &shift}, "", "in-bounds copy runs");
    shift = 1;
    run("st_copy_shifted", {4, 1, 1}, {32, 1, 1}, 0, {&x, &y, &n, &shift},
        "0 bytes past the end of device buffer", "read one past the end is reported");
    device_free(reinterpret_cast<uint64_t>(x));
    shift = 0;
    run("st_copy_shifted", {4, 1, 1}, {32, 1, 1}, 0, {&x, &y, &n, &shift}, "freed device buffer",
        "use after free is reported");
  }
  // Unwritten device memory, misaligned load.
  {
    float* x = fresh<float>(64);
    float* y = fresh<float>(64);
    int n = 64, shift = 0;
    run("st_copy_shifted", {2, 1, 1}, {32, 1, 1}, 0, {&x, &y, &n, &shift}, "never written",
        "read of never-written device memory is reported");
    unsigned char* b = upload(std::vector<unsigned char>(16, 1));
    int off = 2;
    run("st_load_at", {1, 1, 1}, {1, 1, 1}, 0, {&b, &off, &y}, "misaligned 4-byte read",
        "misaligned global load is reported");
  }
  // Shared memory: a correct reduction, a missing barrier, an unwritten read.
  {
    std::vector<float> h(512);
    for (int i = 0; i < 512; ++i) h[i] = float(i % 7);
    float* x = upload(h);
    float* out = fresh<float>(2);
    int barrier = 1;
    if (run("st_block_sum", {2, 1, 1}, {256, 1, 1}, 0, {&x, &out, &barrier}, "", "block sum with barrier")) {
      float want0 = 0, want1 = 0;
      for (int i = 0; i < 256; ++i) want0 += h[i], want1 += h[256 + i];
      check(out[0] == want0 && out[1] == want1, "block sum matches the host");
    }
    run("st_block_sum", {2, 1, 1}, {256, 1, 1}, 166000, {&x, &out, &barrier},
        "bytes of static shared memory (st_block_sum::part (1024 B)) plus 166000 dynamic",
        "static plus dynamic shared memory above the sm_80 limit is reported");
    barrier = 0;
    run("st_block_sum", {2, 1, 1}, {256, 1, 1}, 0, {&x, &out, &barrier},
        "shared-memory race|never written in this block",
        "missing __syncthreads is reported as a race");
    float* out32 = fresh<float>(32);
    run("st_unwritten_shared", {1, 1, 1}, {32, 1, 1}, 0, {&out32}, "never written in this block",
        "read of unwritten shared memory is reported");
  }
  // Barriers and collectives that not every thread reaches.
  {
    std::vector<float> h(256, 1.0f);
    float* x = upload(h);
    float* out = fresh<float>(8);
    int live = 256;
    if (run("st_common_block_sum", {1, 1, 1}, {256, 1, 1}, 0, {&x, &out, &live}, "", "common.cuh block_sum")) {
      check(out[0] == 256.0f, "block_sum of 256 ones is 256");
    }
    live = 200;
    run("st_common_block_sum", {1, 1, 1}, {256, 1, 1}, 0, {&x, &out, &live},
        "early return|a collective called by a partial warp",
        "divergent early return before __syncthreads is reported");
    run("st_warp_sum", {1, 1, 1}, {48, 1, 1}, 0, {&x, &out}, "partial warp",
        "full-mask shuffle in a partial warp is reported");
  }
  // Shuffle semantics.
  {
    std::vector<int> h(32);
    for (int i = 0; i < 32; ++i) h[i] = 100 + i;
    int* x = upload(h);
    int* out = fresh<int>(128);
    if (run("st_shuffles", {1, 1, 1}, {32, 1, 1}, 0, {&x, &out}, "", "shuffles run")) {
      bool good = true;
      for (int l = 0; l < 32; ++l) {
        const int idx = h[(l * 7) % 32], up = l >= 3 ? h[l - 3] : h[l];
        const int down = (l % 16) + 5 < 16 ? h[l + 5] : h[l], x9 = h[l ^ 9];
        good &= out[4 * l] == idx && out[4 * l + 1] == up && out[4 * l + 2] == down && out[4 * l + 3] == x9;
      }
      check(good, "__shfl_sync/_up/_down(width 16)/_xor give CUDA's lanes");
    }
  }
  // ldmatrix (plain and .trans), cp.async and mma.sync against host arithmetic.
  {
    std::vector<__nv_bfloat16> a(256), bt(128);
    std::vector<float> af(256), bf(128);
    for (int i = 0; i < 256; ++i) af[i] = bf16_round(std::sin(0.37f * i) * 3), a[i] = __float2bfloat16_rn(af[i]);
    for (int i = 0; i < 128; ++i) bf[i] = bf16_round(std::cos(0.11f * i) * 2), bt[i] = __float2bfloat16_rn(bf[i]);
    auto* da = upload(a);
    auto* db = upload(bt);
    float* c = fresh<float>(128);
    int wait = 1;
    if (run("st_mma", {1, 1, 1}, {32, 1, 1}, 0, {&da, &db, &c, &wait}, "", "ldmatrix + mma.sync tile")) {
      double worst = 0;
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          double want = 0;
          for (int k = 0; k < 16; ++k) want += double(af[m * 16 + k]) * bf[n * 16 + k];
          worst = std::max(worst, std::fabs(want - c[m * 8 + n]));
        }
      }
      printf("       max |mma - f64| = %.3g\n", worst);
      check(worst < 1e-4, "mma.sync m16n8k16 fragments match A·B");
    }
    wait = 0;
    run("st_mma", {1, 1, 1}, {32, 1, 1}, 0, {&da, &db, &c, &wait}, "cp.async is still filling",
        "reading a cp.async destination before cp.async.wait_group is reported");
  }
  // Dynamic shared memory bounds.
  {
    unsigned char* out = fresh<unsigned char>(1000);
    int n = 1000;
    run("st_dynamic_shared", {1, 1, 1}, {64, 1, 1}, 1000, {&out, &n}, "", "1000 bytes of dynamic shared memory");
    run("st_dynamic_shared", {1, 1, 1}, {64, 1, 1}, 999, {&out, &n}, "dynamic shared memory (the launch has 999",
        "writing past the launch's dynamic shared memory is reported");
    run("st_dynamic_shared", {1, 1, 1}, {64, 1, 1}, size_t(kMaxSharedPerBlockOptin) + 16, {&out, &n},
        "more than an sm_80 block may have",
        "more shared memory than an sm_80 block may have is reported");
  }
  // Atomics: the last-block pattern.
  {
    unsigned* counter = upload(std::vector<unsigned>{0});
    unsigned* out = fresh<unsigned>(1);
    if (run("st_last_block", {37, 1, 1}, {64, 1, 1}, 0, {&counter, &out}, "", "atomicAdd last-block pattern")) {
      check(*counter == 37 && *out == 37, "the last block sees every other block's increment");
    }
  }
  // A wild pointer: a finding, not a crashed process; later launches still run.
  {
    float* null = nullptr;
    run("st_write_through", {1, 1, 1}, {32, 1, 1}, 0, {&null}, "segmentation fault at address",
        "a write through a null pointer is reported, naming the kernel and thread");
    float* y = fresh<float>(32);
    run("st_write_through", {1, 1, 1}, {32, 1, 1}, 0, {&y}, "", "launches after it still run");
  }
  // A race between blocks on global memory: invisible to one schedule, found by comparing three.
  {
    int* out = fresh<int>(1);
    const bool all = std::string(schedule_name()) == "all";
    run("st_last_writer", {8, 1, 1}, {32, 1, 1}, 0, {&out},
        all ? "different from the forward one" : "",
        all ? "QLORA_SIM_SCHEDULE=all: a result that depends on the block order is reported"
            : "a race between blocks passes under a single schedule (QLORA_SIM_SCHEDULE=all finds it)");
  }
  // __launch_bounds__(64, 2): the thread limit is 64, not the comma expression's 2.
  {
    KernelInfo* k = find_kernel("st_bounded");
    check(k && k->max_threads == 64, "__launch_bounds__(64, 2) registers a 64-thread limit");
  }
  // Vector accesses are one access: a float4 load needs 16-byte alignment.
  {
    float* x = upload(std::vector<float>(16, 1.0f));
    float* out = fresh<float>(1);
    int off = 4;
    run("st_vector_at", {1, 1, 1}, {1, 1, 1}, 0, {&x, &off, &out}, "", "an aligned 16-byte vector load");
    off = 2;
    run("st_vector_at", {1, 1, 1}, {1, 1, 1}, 0, {&x, &off, &out}, "misaligned 16-byte read",
        "a 16-byte vector load at an 8-byte boundary is reported as misaligned");
  }
  // The profile's model: bank conflicts, ldmatrix phases, global sectors, compulsory bytes.
  {
    profile_enable();
    KernelInfo* k = find_kernel("st_banks");
    float* out = fresh<float>(32 * 8);
    struct Case { int stride, vstride, pitch, ostride; uint64_t st, ld, ldsm, sectors; const char* what; };
    // Stores: one request of 32 lanes (stride 2: two words per bank, 32: all in bank 0, 33: one
    // each). Loads: that request plus the float4 one (4 phases of 8 lanes; vstride 8: all 8 lanes
    // of a phase on the same 4 banks). ldmatrix: pitch 128 puts a phase's 8 rows on 4 banks,
    // 144 (padded) spreads them. Sectors: out[lane] fills 4, out[lane·8] touches 32.
    const Case cases[] = {
        {1, 1, 144, 1, 1, 1 + 4, 4, 4, "conflict-free: stride 1, float4 stride 1, pitch 144"},
        {2, 1, 144, 1, 2, 2 + 4, 4, 4, "stride 2: 2 wavefronts"},
        {32, 8, 128, 8, 32, 32 + 32, 32, 32, "stride 32, float4 stride 8, pitch 128, out stride 8"},
        {33, 2, 160, 1, 1, 1 + 8, 8, 4, "stride 33 (padded) is conflict-free; float4 stride 2 and pitch 160 are 2-way"},
        {0, 0, 0, 1, 1, 1 + 4, 4, 4, "a broadcast (every lane the same word) is one wavefront"},
    };
    for (const Case& c : cases) {
      const ProfileCounts before = profile_of(k) ? *profile_of(k) : ProfileCounts{};
      int a = c.stride, b = c.vstride, p = c.pitch, o = c.ostride;
      if (!run("st_banks", {1, 1, 1}, {32, 1, 1}, 0, {&out, &a, &b, &p, &o}, "", c.what)) continue;
      const ProfileCounts& x = *profile_of(k);
      auto added = [&](ProfileKind kind) {  // this launch's requests, cost and ideal
        const auto &now = x.of(kind), &was = before.of(kind);
        return ProfileCounts::Traffic{now.requests - was.requests, now.cost - was.cost,
                                      now.ideal - was.ideal};
      };
      // The two fill loops are 34 + 160 conflict-free store requests and the two loads one each.
      const uint64_t st = added(ProfileKind::SharedStore).cost - (34 + 160);
      const uint64_t ld = added(ProfileKind::SharedLoad).cost;
      const auto ldsm = added(ProfileKind::Ldmatrix), stg = added(ProfileKind::GlobalStore);
      const uint64_t sectors = stg.cost;
      const bool ok = st == c.st && ld == c.ld && ldsm.cost == c.ldsm && sectors == c.sectors &&
                      ldsm.ideal == 4 && stg.ideal == 4 && x.ldmatrix - before.ldmatrix == 1 &&
                      ldsm.requests == 1;
      if (!ok) {
        printf("       counted: stores %llu, loads %llu, ldmatrix %llu, sectors %llu\n",
               (unsigned long long)st, (unsigned long long)ld, (unsigned long long)ldsm.cost,
               (unsigned long long)sectors);
      }
      check(ok, "  … and the profile counts its wavefronts and sectors");
    }
    // mma and ldmatrix per warp, and compulsory bytes, from st_mma (A 512 B + B^T 256 B read,
    // C 512 B written: 40 sectors).
    std::vector<__nv_bfloat16> ha(256, __float2bfloat16(1.0f)), hb(128, __float2bfloat16(1.0f));
    __nv_bfloat16* da = upload(ha);
    __nv_bfloat16* db = upload(hb);
    float* c = fresh<float>(128);
    int wait = 1;
    if (run("st_mma", {1, 1, 1}, {32, 1, 1}, 0, {&da, &db, &c, &wait}, "", "profiled st_mma")) {
      const ProfileCounts& x = *profile_of(find_kernel("st_mma"));
      const auto& cpa = x.of(ProfileKind::CpAsyncShared);
      check(x.mma == 1 && x.ldmatrix == 2 && x.unique_bytes == 1280 && cpa.requests == 1 &&
                cpa.cost == 4,
            "  … one mma, two ldmatrix, one cp.async request, 1280 compulsory bytes");
    }
  }
  printf("%d passed, %d failed\n", passes, failures);
  return failures;
}
