// What the task probes share: error checks, a seeded generator, and the
// block's task context (environment and descriptor in shared memory, as
// the resident kernel keeps them, without its waits or signals).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "include/task.cuh"

#define CHECK(x)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static inline u64 lcg(u64& s) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return s >> 33;
}

// Thread 0: this block's environment and a descriptor holding `args`.
template <typename A>
__device__ void probe_task(Env& env, TaskDesc& desc, const A& args, DeviceState* st, StatusBlock* sb) {
    memset(&env, 0, sizeof env);
    env.state = st;
    env.status = sb;
    env.sm = blockIdx.x;
    env.num_sms = gridDim.x;
    memset(&desc, 0, sizeof desc);
    desc.id = blockIdx.x;
    static_assert(sizeof(A) <= sizeof desc.args, "arguments fit the descriptor");
    memcpy(desc.args, &args, sizeof args);
}

// Dynamic shared memory per block: the runtime's default
// (DEFAULT_SHARED_LIMIT in src/cuda/mod.rs), so that the SM's L1 is as large
// as the resident kernel leaves it.
constexpr u32 PROBE_SMEM = 98 * 1024;

// Every thread: the context of the task in `desc`, with at most `limit`
// bytes of the block's dynamic shared memory (after a barrier that follows
// probe_task).
__device__ __forceinline__ Ctx probe_ctx(const Env& env, const TaskDesc& desc, u32 limit) {
    extern __shared__ __align__(16) unsigned char probe_dyn[];
    u32 dyn_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_bytes));
    return {&env, &desc, 1, probe_dyn, min(dyn_bytes, limit), nullptr, 0};
}

// Zeroed device state and status block for the probe's tasks to report into.
static inline void probe_state(DeviceState** st, StatusBlock** sb) {
    CHECK(cudaMalloc(st, sizeof(DeviceState)));
    CHECK(cudaMalloc(sb, sizeof(StatusBlock)));
    CHECK(cudaMemset(*st, 0, sizeof(DeviceState)));
    CHECK(cudaMemset(*sb, 0, sizeof(StatusBlock)));
}

// The fault kind a task reported (0: none).
static inline u32 probe_fault(const StatusBlock* sb) {
    StatusBlock s;
    CHECK(cudaMemcpy(&s, sb, sizeof s, cudaMemcpyDeviceToHost));
    return s.error.kind;
}

// Mean microseconds of `launches` calls of `launch` (CUDA events, back to back).
template <typename F>
static float probe_time(int launches, F launch) {
    cudaEvent_t t0, t1;
    CHECK(cudaEventCreate(&t0));
    CHECK(cudaEventCreate(&t1));
    CHECK(cudaEventRecord(t0));
    for (int i = 0; i < launches; ++i) launch(i);
    CHECK(cudaEventRecord(t1));
    CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    return ms * 1e3f / float(launches);
}

// A token ring around `sms` blocks: `launch` runs it once (after resetting
// what it needs), leaving the ring's total nanoseconds in out[0]. Returns
// the best of `reps` runs in microseconds per hop; `mean_us` their mean.
template <typename F>
static double probe_ring_hop(F launch, u32 rounds, int sms, const u64* out, double& mean_us, int reps = 5) {
    double best = 1e30, sum = 0;
    for (int rep = 0; rep < reps; ++rep) {
        launch();
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        u64 ns = 0;
        CHECK(cudaMemcpy(&ns, out, 8, cudaMemcpyDeviceToHost));
        const double hop = double(ns) / (double(rounds) * sms);
        best = hop < best ? hop : best;
        sum += hop;
    }
    mean_us = sum / reps / 1e3;
    return best / 1e3;
}

// One step of straight-line code: two multiply-xor chains that no compiler
// folds (each product depends on the other chain), distinct constants per
// step so that no two steps share code: 96 bytes of SASS on sm_90a.
#define MK_IC_STEP(i)                                            \
    a = (a * (0x9E3779B1u + 2u * (i))) ^ (b >> (((i) & 15) + 1)); \
    b = (b * (0x85EBCA77u + 2u * (i))) ^ (a << (((i) & 7) + 1));
#define MK_IC_4(i) MK_IC_STEP(i) MK_IC_STEP(i + 1) MK_IC_STEP(i + 2) MK_IC_STEP(i + 3)
#define MK_IC_16(i) MK_IC_4(i) MK_IC_4(i + 4) MK_IC_4(i + 8) MK_IC_4(i + 12)

// `STEPS` / 16 blocks of 16 steps each (a multiple of 16), seeded apart.
// (Larger pieces than 256 KiB come out as loops: the unroll stops there.)
template <u32 SEED, u32 STEPS>
__device__ __noinline__ u32 code_piece(u32 a, u32 b) {
#pragma unroll
    for (u32 k = 0; k < STEPS / 16; ++k) {
        MK_IC_16(SEED * 65536u + k * 16u)
    }
    return a ^ b;
}

// Where a probe's computed values go, so that the compiler keeps the code
// computing them (stored only when a value is one no real run gives).
__device__ u32 g_probe_sink;

// Every thread: runs about 240 KiB of straight-line code that nothing else
// runs, which leaves the SM's instruction cache holding none of a task's code
// (icache_probe.cu measures the cache).
__device__ __noinline__ void probe_evict_code(u32 seed) {
    const u32 v = code_piece<7, 2560>(seed, seed + 1);
    if (v == 0x9E3779B1u) g_probe_sink = v;
}
