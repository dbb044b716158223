// Registration of host-compiled kernels: sim/build.sh appends one QSIM_KERNEL line per
// extern "C" kernel to each kernel file's translation unit. The Registrar deduces the kernel's
// C++ signature and builds the invoker that unpacks cuLaunchKernel's kernelParams (an array of
// pointers, one per argument) into a call.
#pragma once

#include <type_traits>
#include <utility>

#include "runtime.h"

namespace qsim {

template <class... A, size_t... I>
void call_unpacked(void* fn, void** params, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(A...)>(fn)(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <class... A>
void invoke_unpacked(void* fn, void** params) {
  call_unpacked<A...>(fn, params, std::index_sequence_for<A...>{});
}

struct Registrar {
  template <class... A>
  Registrar(const char* module, const char* name, void (*fn)(A...), int max_threads) {
    register_kernel(new KernelInfo{module, name, reinterpret_cast<void*>(fn), &invoke_unpacked<A...>,
                                   int(sizeof...(A)), max_threads, kMaxSharedPerBlock, 0, false});
  }
};

}  // namespace qsim

#define QSIM_KERNEL(stem, name, max_threads) \
  static ::qsim::Registrar qsim_registrar_##name(#stem, #name, &qsim_kernels_##stem::name, max_threads);
