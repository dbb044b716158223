// Kernels that exist for the tests of the CUDA path itself, not for training.

#include "common.cuh"

// Faults on purpose: each thread writes through `p`, which the test of fault reporting
// (tests/device.rs) passes as null, in a process of its own (a fault loses the context).
extern "C" __global__ void fault_on_purpose(float* p) { p[threadIdx.x] = 1.0f; }
