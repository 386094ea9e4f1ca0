// A CUDA execution-model emulator on the CPU, for checking the logic of cuda/kernels/*.cu
// without a GPU (cuda/tests/emulated.rs builds and runs it). It is NOT a GPU simulator:
// a kernel that passes here can still fail on a GPU.
//
// What is emulated:
//   * Launches: a grid of blocks of threads, with threadIdx / blockIdx / blockDim / gridDim
//     as CUDA defines them (launch limits checked: at most 1024 threads a block, grid y and
//     z at most 65535). Kernel arguments are type-checked against the kernel's parameters
//     (same scalar types, convertible pointers), as a driver launch would need them.
//   * Threads: every CUDA thread of a block is a fiber (its own stack) on one OS thread.
//     A thread runs until it reaches a synchronization point (__syncthreads, __syncwarp, a
//     warp shuffle) or returns; then the next one runs. Warp w is threads 32w..32w+31 in
//     x-fastest order, as on the GPU.
//   * Barriers: __syncthreads waits for every thread of the block, __syncwarp and the
//     shuffles for the 32 lanes of the warp. Being strict where CUDA leaves behaviour
//     undefined, it stops with an error when a full-mask warp operation runs in a warp with
//     fewer than 32 threads or after a lane of the warp returned, when a thread returns
//     while others of its warp or block wait at a barrier, when __syncthreads runs after a
//     thread of the block returned, when the lanes of a warp meet at different kinds of
//     warp operation, and on a deadlock.
//   * Shared memory (__shared__, a static in the kernel's function): one copy, shared by
//     the block's threads. Between blocks it is filled with 0xff bytes (NaN floats, -1
//     integers) unless the build uses AddressSanitizer, so that a block reading shared
//     memory it did not write reads garbage, as on a GPU.
//   * Device functions the kernels use: integer SIMD (__dp4a, __vsub4), round-to-nearest
//     float operations (__fmul_rn ...), __float2int_rn (saturating, NaN to 0 as PTX's
//     cvt.rni), bit casts, f16 conversions (round to nearest even), 16-byte int4 loads
//     (their alignment is checked).
//
// What is NOT emulated (so passing here says nothing about it):
//   * Concurrency: blocks run one after another, and the threads of a block one at a time
//     between synchronization points (alternately in forward and reverse thread order, so
//     that some missing barriers show). Races, the memory model, atomics, warp-synchronous
//     code without __syncwarp, and timing are not modelled; nor is there any lockstep
//     between the lanes of a warp except at the synchronization points above.
//   * Floating point as the GPU computes it: here every operation is rounded on its own
//     (the build uses -ffp-contract=off), where NVRTC fuses a·b + c into FMAs unless the
//     kernel uses __fmul_rn / __fadd_rn; expf, sincosf, tanhf, powf, rsqrtf are the C
//     library's (correctly rounded or nearly), not CUDA's (up to a few ulp apart). The
//     checks' thresholds leave room for that; bit-exact checks are kept to kernels whose
//     results do not depend on it.
//   * Memory: device memory is host memory. Out-of-bounds accesses are caught only in the
//     AddressSanitizer build; misaligned loads other than int4 are not caught; there are
//     no address spaces, caches, or limits on shared memory or registers.
//   * Warp operations other than full-mask (0xffffffff) shuffles and __syncwarp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifndef EMU_ASAN
#define EMU_ASAN 0
#endif
#if EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// Fibers switch by a few lines of assembly on x86-64, through ucontext elsewhere (or with
// -DEMU_UCONTEXT).
#if !defined(EMU_UCONTEXT) && !(defined(__x86_64__) && defined(__linux__))
#define EMU_UCONTEXT 1
#endif
#ifdef EMU_UCONTEXT
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

#ifndef EMU_UCONTEXT
// Saves the callee-saved registers on the current stack, stores its stack pointer in
// *save, switches to the stack `to` and restores the registers saved there.
extern "C" void turbine_emu_switch(void** save, void* to);
asm(R"(
    .text
    .globl turbine_emu_switch
    .type turbine_emu_switch, @function
turbine_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size turbine_emu_switch, .-turbine_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

// What the lanes of a warp (or the threads of a block) are waiting at.
enum Op { OP_NONE, OP_SHFL, OP_SYNCWARP, OP_SYNCTHREADS };
inline const char* op_name(int op) {
    switch (op) {
        case OP_SHFL: return "a warp shuffle";
        case OP_SYNCWARP: return "__syncwarp";
        case OP_SYNCTHREADS: return "__syncthreads";
        default: return "nothing";
    }
}

struct Barrier {
    int expected = 0, arrived = 0, op = OP_NONE;
    unsigned long generation = 0;
};

struct Thread {
    Context ctx;
    char* stack = nullptr;  // lowest usable byte (a guard page lies below)
    dim3 idx;
    int warp = 0, lane = 0;
    bool exited = false;
    Barrier* waiting = nullptr;  // blocked until waiting->generation != wait_generation
    unsigned long wait_generation = 0;
    void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping across switches
};

struct Warp {
    Barrier bar;
    int size = 0, exited = 0;
    uint64_t slot[32];  // the lanes' shuffle operands
};

constexpr size_t STACK_BYTES = 256 * 1024;

// Blocks run their threads in forward or reverse order, alternately; a build with
// -DEMU_ORDER_SEED=1 starts with the other order.
#ifndef EMU_ORDER_SEED
#define EMU_ORDER_SEED 0
#endif

struct State {
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    Barrier block_bar;
    int block_exited = 0;
    Thread* cur = nullptr;
    Context scheduler;
    const void* scheduler_stack = nullptr;  // for AddressSanitizer
    size_t scheduler_stack_size = 0;
    void* scheduler_fake_stack = nullptr;
    std::function<void()> body;
    const char* kernel = "";
    dim3 grid, block, block_idx;
    unsigned long launches = EMU_ORDER_SEED;  // its parity picks each block's thread order
    std::set<std::string> launched;
};
inline State st;

inline size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// Stops the program: an emulation error (a kernel breaking a CUDA rule, or a deadlock).
[[noreturn]] inline void fatal(const char* fmt, ...) {
    fflush(stdout);
    printf("EMU ERROR in %s, block (%u,%u,%u)", st.kernel, st.block_idx.x, st.block_idx.y, st.block_idx.z);
    if (st.cur) printf(", thread (%u,%u,%u)", st.cur->idx.x, st.cur->idx.y, st.cur->idx.z);
    printf(": ");
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    _exit(3);
}

// ---- switching between the scheduler and a thread ----

inline void start_switch_to_thread(Thread& t) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&st.scheduler_fake_stack, t.stack, STACK_BYTES);
#else
    (void)t;
#endif
}
inline void finish_switch_in_scheduler() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(st.scheduler_fake_stack, nullptr, nullptr);
#endif
}
inline void start_switch_to_scheduler(bool exiting) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &st.cur->fake_stack, st.scheduler_stack,
                                   st.scheduler_stack_size);
#else
    (void)exiting;
#endif
}
inline void finish_switch_in_thread() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(st.cur->fake_stack, &st.scheduler_stack, &st.scheduler_stack_size);
#endif
}

inline void switch_context(Context& from, Context& to) {
#ifndef EMU_UCONTEXT
    turbine_emu_switch(&from.sp, to.sp);
#else
    if (swapcontext(&from.uc, &to.uc) != 0) fatal("swapcontext failed");
#endif
}

// The current thread gives the CPU back to the scheduler.
inline void yield() {
    start_switch_to_scheduler(false);
    switch_context(st.cur->ctx, st.scheduler);
    finish_switch_in_thread();
}

inline void arrive(Barrier& b, int op) {
    if (b.arrived == 0) {
        b.op = op;
    } else if (b.op != op) {
        fatal("reached %s while other threads of its warp or block wait at %s", op_name(op), op_name(b.op));
    }
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        b.op = OP_NONE;
        b.generation++;
        return;
    }
    st.cur->waiting = &b;
    st.cur->wait_generation = b.generation;
    yield();
}

inline Warp& my_warp() { return st.warps[st.cur->warp]; }

// A full-mask warp operation needs all 32 lanes there.
inline void require_full_warp(unsigned mask, const char* what) {
    Warp& w = my_warp();
    if (mask != 0xffffffffu) fatal("%s with mask %#x: only full-mask warp operations are emulated", what, mask);
    if (w.size != 32) fatal("%s with a full mask in a warp of only %d threads", what, w.size);
    if (w.exited) fatal("%s with a full mask after %d lanes of the warp returned", what, w.exited);
}

template <class T>
T shuffle(unsigned mask, T v, int src_lane, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    require_full_warp(mask, what);
    Warp& w = my_warp();
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    w.slot[st.cur->lane] = bits;
    arrive(w.bar, OP_SHFL);  // every lane has written its operand
    T r;
    uint64_t got = w.slot[src_lane & 31];
    memcpy(&r, &got, sizeof(T));
    arrive(w.bar, OP_SHFL);  // every lane has read before the slots are reused
    return r;
}

// A thread's kernel call returned.
inline void thread_exited() {
    Thread& t = *st.cur;
    Warp& w = my_warp();
    if (w.bar.arrived > 0) fatal("returned while other lanes of its warp wait at %s", op_name(w.bar.op));
    if (st.block_bar.arrived > 0) fatal("returned while other threads of its block wait at __syncthreads");
    t.exited = true;
    w.exited++;
    st.block_exited++;
}

[[noreturn]] inline void thread_main() {
    finish_switch_in_thread();
    st.body();
    thread_exited();
    start_switch_to_scheduler(true);
    switch_context(st.cur->ctx, st.scheduler);
    abort();  // never resumed
}

#ifdef EMU_UCONTEXT
inline void thread_entry() { thread_main(); }
#endif

inline void prepare_thread(Thread& t) {
    if (!t.stack) {
        size_t guard = page_size();
        void* m = mmap(nullptr, STACK_BYTES + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) fatal("no memory for a thread's stack");
        mprotect(m, guard, PROT_NONE);  // a stack overflow faults
        t.stack = (char*)m + guard;
    }
#ifndef EMU_UCONTEXT
    // The frame turbine_emu_switch pops: six registers, then thread_main as the return
    // address, entered with the stack aligned as after a call.
    uintptr_t top = ((uintptr_t)t.stack + STACK_BYTES) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;
    *--sp = (void*)&thread_main;
    for (int r = 0; r < 6; ++r) *--sp = nullptr;
    t.ctx.sp = sp;
#else
    if (getcontext(&t.ctx.uc) != 0) fatal("getcontext failed");
    t.ctx.uc.uc_stack.ss_sp = t.stack;
    t.ctx.uc.uc_stack.ss_size = STACK_BYTES;
    t.ctx.uc.uc_link = nullptr;
    makecontext(&t.ctx.uc, thread_entry, 0);
#endif
}

// ---- shared memory ----

#if !EMU_ASAN
// Every __shared__ variable lives in the section emu_shared (see the macro below); the
// linker marks its bounds.
extern "C" char __start_emu_shared[], __stop_emu_shared[];
inline void poison_shared() {
    volatile char* p = __start_emu_shared;
    for (; p < (volatile char*)__stop_emu_shared; ++p) *p = (char)0xff;
}
// Keeps the section (and so its bounds) in the program even without shared variables.
static char emu_shared_anchor __attribute__((section("emu_shared"), used));
#else
// AddressSanitizer does not guard globals in named sections: there, shared variables are
// plain statics (out-of-bounds accesses caught, contents not poisoned).
inline void poison_shared() {}
#endif

// ---- launching ----

inline void run_block(bool reverse) {
    const dim3 b = st.block;
    const int n = (int)(b.x * b.y * b.z);
    if ((int)st.threads.size() < n) st.threads.resize(n);
    const int n_warps = (n + 31) / 32;
    st.warps.assign(n_warps, Warp{});
    for (int w = 0; w < n_warps; ++w) {
        st.warps[w].size = std::min(32, n - 32 * w);
        st.warps[w].bar.expected = st.warps[w].size;
    }
    st.block_bar = Barrier{};
    st.block_bar.expected = n;
    st.block_exited = 0;
    poison_shared();
    for (int i = 0; i < n; ++i) {
        Thread& t = st.threads[i];
        t.idx = dim3(i % b.x, (i / b.x) % b.y, i / (b.x * b.y));
        t.warp = i / 32;
        t.lane = i % 32;
        t.exited = false;
        t.waiting = nullptr;
        t.fake_stack = nullptr;
        prepare_thread(t);
    }
    int live = n;
    while (live > 0) {
        bool progressed = false;
        for (int k = 0; k < n; ++k) {
            Thread& t = st.threads[reverse ? n - 1 - k : k];
            if (t.exited) continue;
            if (t.waiting && t.waiting->generation == t.wait_generation) continue;
            t.waiting = nullptr;
            st.cur = &t;
            start_switch_to_thread(t);
            switch_context(st.scheduler, t.ctx);
            finish_switch_in_scheduler();
            progressed = true;
            if (t.exited) live--;
        }
        if (!progressed) {
            st.cur = nullptr;
            fatal("deadlock: every live thread waits (warp 0 at %s, the block at %s)", op_name(st.warps[0].bar.op),
                  op_name(st.block_bar.op));
        }
    }
    st.cur = nullptr;
}

// A launch argument must have the parameter's scalar type exactly (as the driver reads
// its bytes), or for a pointer, convert to it.
template <class P, class A>
constexpr bool argument_fits() {
    using Arg = std::decay_t<A>;
    if constexpr (std::is_pointer_v<P>)
        return std::is_same_v<Arg, std::nullptr_t> || std::is_convertible_v<Arg, P>;
    else
        return std::is_same_v<Arg, P>;
}

template <class... P, class... A>
void launch(const char* name, dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
    static_assert((argument_fits<P, A>() && ...), "launch: an argument's type differs from the kernel parameter's");
    if (const char* colon = strrchr(name, ':')) name = colon + 1;
    st.kernel = name;
    st.launched.insert(name);
    unsigned long threads = (unsigned long)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        fatal("launch with block (%u,%u,%u)", block.x, block.y, block.z);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        fatal("launch with grid (%u,%u,%u)", grid.x, grid.y, grid.z);
    std::tuple<P...> params(static_cast<P>(args)...);
    st.body = [&] { std::apply(kernel, params); };
    st.grid = grid;
    st.block = block;
    unsigned long n = 0;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                st.block_idx = dim3(x, y, z);
                run_block(((st.launches + n++) & 1) != 0);
            }
    st.launches++;
    st.body = nullptr;
    st.kernel = "";
}

// ---- f16 conversions (round to nearest even, as PTX cvt.rn.f16.f32 and half::f16) ----

inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 31, man = h & 0x3ffu;
    if (exp == 0) return bits_float(sign | float_bits((float)man * 0x1p-24f));  // zero, subnormal
    if (exp == 31) return bits_float(sign | (man ? 0x7fc00000u : 0x7f800000u) | (man << 13));  // inf, NaN (quiet)
    return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t f32_to_f16_bits(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((x >> 13) & 0x3ffu);  // NaN, quiet
    if (x >= 0x477ff000u) return sign | 0x7c00u;                                  // rounds to inf
    if (x < 0x38800000u) {
        // Below the smallest normal f16 (2^-14): a multiple of 2^-24, rounded to nearest
        // even (the scaling is exact; 1024 is the smallest normal's encoding).
        return sign | (uint16_t)nearbyintf(bits_float(x) * 0x1p24f);
    }
    // Rebias the exponent and round the 13 dropped bits to nearest even; a carry moves
    // into the exponent as it should.
    x += ((uint32_t)(15 - 127) << 23) + 0xfffu + ((x >> 13) & 1u);
    return sign | (uint16_t)(x >> 13);
}

}  // namespace emu

// ---- what CUDA C++ gives a kernel ----

#define threadIdx (emu::st.cur->idx)
#define blockIdx (emu::st.block_idx)
#define blockDim (emu::st.block)
#define gridDim (emu::st.grid)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __constant__ static
#if !EMU_ASAN
#define __shared__ static __attribute__((section("emu_shared"), used))
#else
#define __shared__ static
#endif
#define __launch_bounds__(...)

// A 16-byte vector; loading one from an address that is not 16-byte aligned is an error,
// as on the GPU.
struct alignas(16) int4 {
    int x, y, z, w;
    int4() = default;
    int4(const int4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {
        if ((uintptr_t)&o % 16 != 0) emu::fatal("int4 load from %p, not 16-byte aligned", (const void*)&o);
    }
    int4& operator=(const int4&) = default;
};

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return emu::shuffle(mask, v, (int)emu::st.cur->lane ^ lane_mask, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    return emu::shuffle(mask, v, src_lane, "__shfl_sync");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::require_full_warp(mask, "__syncwarp");
    emu::arrive(emu::my_warp().bar, emu::OP_SYNCWARP);
}
inline void __syncthreads() {
    if (emu::st.block_exited)
        emu::fatal("__syncthreads after %d threads of the block returned", emu::st.block_exited);
    emu::arrive(emu::st.block_bar, emu::OP_SYNCTHREADS);
}

inline int __float_as_int(float f) { return (int)emu::float_bits(f); }
inline float __int_as_float(int i) { return emu::bits_float((uint32_t)i); }
inline float __uint_as_float(unsigned u) { return emu::bits_float(u); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// PTX cvt.rni.s32.f32: nearest even, saturating, NaN to 0.
inline int __float2int_rn(float f) {
    if (f != f) return 0;
    if (f >= 2147483648.0f) return 0x7fffffff;
    if (f < -2147483648.0f) return (int)0x80000000u;
    return (int)nearbyintf(f);
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
// Four signed bytes of a times those of b, plus c.
inline int __dp4a(int a, int b, int c) {
    for (int k = 0; k < 4; ++k) c += (int)(int8_t)(a >> (8 * k)) * (int)(int8_t)(b >> (8 * k));
    return c;
}
// Byte-wise a - b, modulo 256.
inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int k = 0; k < 4; ++k) r |= (((a >> (8 * k)) - (b >> (8 * k))) & 0xffu) << (8 * k);
    return r;
}

// math.h's INFINITY would clash with the kernels' own definition (common.cuh).
#undef INFINITY
