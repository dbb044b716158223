// The profile (QLORA_SIM_PROFILE=FILE): per kernel, what a warp asks of the memory system and of
// the tensor cores, counted while the simulated GPU runs the kernel. These are the design figures
// a profiler would show on a card (bank conflicts, coalescing, MMAs per ldmatrix, compulsory
// traffic), counted exactly, but no timing: the simulator does not model speed.
//
// How a warp's request is found. Lanes run one after another (fibers), not in lockstep, so each
// access is recorded under (the instruction's address, how many times this lane has executed it)
// and the 32 lanes' n-th executions of one instruction are one warp request. The records are
// costed when the warp is known to be converged: at a warp collective every live lane joins, at a
// block barrier, and at the end of the block; the counts then start again from zero.
//
// Costs (the model of a 32-bank shared memory and of 32-byte global sectors):
//   shared memory: 32 banks of 4 bytes. A request of 1/2/4-byte accesses is one phase of 32 lanes,
//     8-byte accesses two phases (lanes 0-15, 16-31), 16-byte accesses four (lanes 8j..8j+7), and
//     ldmatrix.x4's phase j is the 8 row addresses given by lanes 8j..8j+7. A phase costs as many
//     wavefronts as the most distinct 4-byte words that fall in one bank (lanes reading the same
//     word share it); its ideal is one.
//   global memory: a request costs the distinct 32-byte sectors its lanes touch; its ideal is
//     ceil(distinct bytes / 32). Per launch, the distinct sectors touched by all of it are the
//     compulsory traffic (what an infinite cache would still move).
// At exit each kernel's totals are appended to FILE as one tab-separated line (format in
// docs/simulator.md); several processes may append to one file.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "internal.h"

namespace qsim {

namespace {

bool is_global(ProfileKind k) { return k == ProfileKind::GlobalLoad || k == ProfileKind::GlobalStore; }

struct Site {
  uintptr_t pc;
  uint32_t nth;
  ProfileKind kind;
  bool operator==(const Site& o) const { return pc == o.pc && nth == o.nth && kind == o.kind; }
};
struct SiteHash {
  size_t operator()(const Site& s) const {
    return std::hash<uintptr_t>()(s.pc * 1000003u ^ (uint64_t(s.nth) << 8) ^ uint64_t(s.kind));
  }
};

// One warp request being gathered: each lane's address and the access size.
struct Request {
  uint32_t mask = 0;
  uint32_t bytes = 0;
  uintptr_t addr[32];
};

struct WarpRecords {
  std::unordered_map<Site, Request, SiteHash> requests;
};

struct State {
  const char* path = nullptr;
  std::map<const KernelInfo*, ProfileCounts> counts;  // ordered by address: stable output
  ProfileCounts* current = nullptr;
  std::vector<WarpRecords> warps;
  std::vector<std::unordered_map<uintptr_t, uint32_t>> executed;  // per thread: pc -> times
  std::unordered_set<uintptr_t> sectors;                           // this launch's global sectors
};

State& state() {
  static State s;
  return s;
}

// Shared memory: wavefronts of one request, and its ideal.
void cost_shared(const Request& r, bool ldmatrix, uint64_t* wave, uint64_t* ideal) {
  const unsigned group = (ldmatrix || r.bytes == 16) ? 8 : r.bytes == 8 ? 16 : 32;
  const unsigned words = r.bytes <= 4 ? 1 : r.bytes / 4;
  for (unsigned g0 = 0; g0 < 32; g0 += group) {
    // (bank, word) pairs of this phase; the phase costs the largest count of distinct words in
    // one bank.
    uint64_t pairs[32 * 4];
    unsigned n = 0;
    for (unsigned l = g0; l < g0 + group; ++l) {
      if (!(r.mask >> l & 1)) continue;
      for (unsigned w = 0; w < words; ++w) {
        const uint64_t word = r.addr[l] / 4 + w;
        pairs[n++] = (word % 32) << 58 | word;
      }
    }
    if (n == 0) continue;
    std::sort(pairs, pairs + n);
    n = unsigned(std::unique(pairs, pairs + n) - pairs);
    unsigned worst = 0, run = 0;
    for (unsigned i = 0; i < n; ++i) {
      run = (i > 0 && pairs[i] >> 58 == pairs[i - 1] >> 58) ? run + 1 : 1;
      worst = std::max(worst, run);
    }
    *wave += worst;
    *ideal += 1;
  }
}

// Global memory: 32-byte sectors one request touches, and the fewest its bytes could fill.
void cost_global(const Request& r, uint64_t* sectors, uint64_t* ideal) {
  std::pair<uintptr_t, uintptr_t> spans[32];  // [begin, end) of each lane's access
  uintptr_t secs[64];                         // an access of at most 16 bytes spans two sectors
  unsigned n = 0, ns = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(r.mask >> l & 1)) continue;
    spans[n++] = {r.addr[l], r.addr[l] + r.bytes};
    for (uintptr_t s = r.addr[l] / 32; s <= (r.addr[l] + r.bytes - 1) / 32; ++s) secs[ns++] = s;
  }
  std::sort(secs, secs + ns);
  *sectors += uint64_t(std::unique(secs, secs + ns) - secs);
  std::sort(spans, spans + n);
  uint64_t bytes = 0;
  uintptr_t covered = 0;
  for (unsigned i = 0; i < n; ++i) {
    const uintptr_t b = std::max(spans[i].first, covered);
    if (spans[i].second > b) bytes += spans[i].second - b;
    covered = std::max(covered, spans[i].second);
  }
  *ideal += (bytes + 31) / 32;
}

void cost(const Site& site, const Request& r) {
  ProfileCounts::Traffic& t = state().current->traffic[int(site.kind)];
  ++t.requests;
  if (is_global(site.kind)) {
    cost_global(r, &t.cost, &t.ideal);
  } else {
    cost_shared(r, site.kind == ProfileKind::Ldmatrix, &t.cost, &t.ideal);
  }
}

void write_file() {
  State& s = state();
  if (!s.path) return;
  std::string out;
  for (const auto& [k, c] : s.counts) {
    if (c.launches == 0) continue;
    std::string line = std::string("qsim-profile-v1\t") + k->name + "\t" + k->module;
    auto field = [&](uint64_t v) { line += "\t" + std::to_string(v); };
    for (uint64_t v : {c.launches, c.blocks, c.threads, c.dynamic_smem,
                       uint64_t(k->static_shared_seen), c.mma, c.ldmatrix}) {
      field(v);
    }
    for (const ProfileCounts::Traffic& t : c.traffic) {  // lds, sts, ldsm, cpa, ldg, stg
      field(t.requests), field(t.cost), field(t.ideal);
    }
    for (uint64_t v : {c.ldg_bytes, c.stg_bytes, c.unique_bytes}) field(v);
    out += line + "\n";
  }
  if (out.empty()) return;
  // One write with O_APPEND: lines from processes sharing the file do not interleave.
  const int fd = open(s.path, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0 || write(fd, out.data(), out.size()) != ssize_t(out.size())) {
    fprintf(stderr, "qlora-rs simulated GPU: cannot append the profile to %s: %s\n", s.path,
            strerror(errno));
  }
  if (fd >= 0) close(fd);
}

}  // namespace

bool g_profiling = [] {
  const char* p = getenv("QLORA_SIM_PROFILE");
  if (!p || !*p) return false;
  state().path = p;
  atexit(write_file);
  return true;
}();

void profile_enable() { g_profiling = true; }

const ProfileCounts* profile_of(const KernelInfo* k) {
  auto it = state().counts.find(k);
  return it == state().counts.end() ? nullptr : &it->second;
}

void profile_launch_begin(const KernelInfo* k, uint64_t blocks, unsigned threads,
                          size_t dynamic_shared) {
  State& s = state();
  ProfileCounts& c = s.counts[k];
  s.current = &c;
  ++c.launches;
  c.blocks += blocks;
  c.threads = std::max<uint64_t>(c.threads, threads);
  c.dynamic_smem = std::max<uint64_t>(c.dynamic_smem, dynamic_shared);
  s.warps.assign((threads + 31) / 32, WarpRecords{});
  s.executed.assign(threads, {});
  s.sectors.clear();
}

void profile_launch_end() {
  State& s = state();
  s.current->unique_bytes += 32 * uint64_t(s.sectors.size());
  s.sectors.clear();
  s.current = nullptr;
}

void profile_access(uintptr_t pc, uintptr_t addr, unsigned bytes, ProfileKind kind) {
  State& s = state();
  const Thread& t = *g_current;
  const bool global = is_global(kind);
  if (global) {
    (kind == ProfileKind::GlobalLoad ? s.current->ldg_bytes : s.current->stg_bytes) += bytes;
    for (uintptr_t sec = addr / 32; sec <= (addr + bytes - 1) / 32; ++sec) s.sectors.insert(sec);
  }
  const uint32_t nth = s.executed[t.linear][pc]++;
  Request& r = s.warps[t.warp].requests[Site{pc, nth, kind}];
  r.mask |= 1u << t.lane;
  r.bytes = bytes;
  // Banks follow the offset within shared memory (its base is bank 0 on a card).
  r.addr[t.lane] = global ? addr : shared_offset(addr);
}

// Once per warp (lane 0): ldmatrix and mma.sync are `.aligned`, every lane executes them.
void profile_ldmatrix() {
  if (g_current->lane == 0) ++state().current->ldmatrix;
}

void profile_mma() {
  if (g_current->lane == 0) ++state().current->mma;
}

void profile_converged(unsigned warp) {
  State& s = state();
  WarpRecords& w = s.warps[warp];
  for (const auto& [site, r] : w.requests) cost(site, r);
  w.requests.clear();
  const size_t lo = size_t(warp) * 32, hi = std::min(s.executed.size(), lo + 32);
  for (size_t i = lo; i < hi; ++i) s.executed[i].clear();
}

void profile_block_converged() {
  for (unsigned w = 0; w < state().warps.size(); ++w) profile_converged(w);
}

}  // namespace qsim
