// The emulator's own checks: tiny kernels that break a CUDA rule, each of which must stop
// the emulator with an error (or, for shared memory, see the poison). cuda/tests/emulated.rs
// runs each as `emulated --selftest <name>` and checks the outcome, so that the emulator
// keeps catching what emu.h says it catches.
#pragma once

#include <cstring>
#include <vector>

#include "emu.h"
#include "harness.h"

namespace selftest {

// Lanes 16..31 return, the others shuffle with a full mask.
__global__ void shuffle_after_return(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// The second warp returns, the first waits at __syncthreads.
__global__ void syncthreads_after_return(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// A full-mask shuffle in a block of 48 threads: its second warp has 16 lanes.
__global__ void partial_warp(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); }

// Even lanes at __syncwarp, odd lanes at a shuffle.
__global__ void mixed_warp_ops(float* out) {
    if (threadIdx.x % 2)
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    else
        __syncwarp();
}

// Lane 0 waits at __syncthreads while the rest of its warp waits at a shuffle.
__global__ void deadlock(float* out) {
    if (threadIdx.x == 0)
        __syncthreads();
    else
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// An int4 load 4 bytes past a 16-byte boundary.
__global__ void misaligned_int4(const int* x, int* out) {
    int4 v = ((const int4*)(x + 1))[0];
    out[threadIdx.x] = v.x;
}

// Block 0 writes shared memory; block 1 reads it without writing it.
__global__ void shared_between_blocks(float* out) {
    __shared__ float s;
    if (blockIdx.x == 0 && threadIdx.x == 0) s = 1.0f;
    __syncthreads();
    if (blockIdx.x == 1 && threadIdx.x == 0) out[0] = s;
}

// Reads one float past the end of x.
__global__ void out_of_bounds(const float* x, float* out, int n) { out[0] = x[n]; }

// Runs the case `name`; returns the process's exit status (those that must stop the
// emulator never return).
inline int run(const std::string& name) {
    std::vector<float> out(64, 0.0f);
    alignas(16) int ints[8] = {0};
    if (name == "shuffle-after-return") EMU_LAUNCH(shuffle_after_return, dim3(1), dim3(32), out.data());
    if (name == "syncthreads-after-return") EMU_LAUNCH(syncthreads_after_return, dim3(1), dim3(64), out.data());
    if (name == "partial-warp") EMU_LAUNCH(partial_warp, dim3(1), dim3(48), out.data());
    if (name == "mixed-warp-ops") EMU_LAUNCH(mixed_warp_ops, dim3(1), dim3(32), out.data());
    if (name == "deadlock") EMU_LAUNCH(deadlock, dim3(1), dim3(32), out.data());
    if (name == "misaligned-int4") EMU_LAUNCH(misaligned_int4, dim3(1), dim3(32), (const int*)ints, ints);
    if (name == "shared-poison") {
        out[0] = 0.0f;
        EMU_LAUNCH(shared_between_blocks, dim3(2), dim3(32), out.data());
        bool poisoned = emu::float_bits(out[0]) == 0xffffffffu;
        printf("%s: block 1 read %08x from shared memory block 0 wrote\n", poisoned ? "poisoned" : "NOT POISONED",
               emu::float_bits(out[0]));
        return poisoned ? 0 : 1;
    }
    if (name == "out-of-bounds") {
        std::vector<float> x(10, 1.0f);
        EMU_LAUNCH(out_of_bounds, dim3(1), dim3(1), x.data(), out.data(), 10);
    }
    printf("selftest %s: no emulation error\n", name.c_str());
    return 1;
}

}  // namespace selftest
