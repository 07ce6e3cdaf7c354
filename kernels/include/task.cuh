// What every task body receives, and helpers shared by task files.
#pragma once
#include "stage.cuh"

// A probe's mark of a task body's phases (tools/probes/phases.cuh defines it
// before this header); nothing in the kernel.
#ifndef MK_PHASE
#define MK_PHASE(k)
#endif

struct Ctx {
    const Env* env;         // shared memory
    const TaskDesc* desc;   // shared-memory copy, parameters substituted
    u64 command;            // sequence number of the running command
    unsigned char* smem;    // dynamic shared memory scratch
    u32 smem_bytes;         // scratch bytes (below the staged copy, if any)
    const unsigned char* staged;  // the task's declared range, copied (TASK_FLAG_STAGE), or null
    u32 staged_bytes;       // how much of the range was copied (its start)

    // The scratch as a shared-memory pointer (see as_shared): the resident
    // loop keeps the context in shared memory and the probes in local memory,
    // and from either `smem` comes back generic.
    __device__ __forceinline__ unsigned char* scratch() const { return as_shared(smem); }
};

// The entry of a task kind that a decode layer does not run on the GPU's
// usual path (setup, once per step or per command, and the stages that fused
// prologues replace): compiled out of line, so that the resident loop's body
// holds the loop and the kinds every layer runs.
// With these inline the loop spilled more (114 / 224 bytes against 110 /
// 208) and a decode step took 1-2 % longer (BENCHMARKS.md, 21st round).
// The per-layer kinds' entries stay __forceinline__.
#define MK_COLD_TASK __device__ __noinline__

template <typename A>
__device__ __forceinline__ const A& task_args(const Ctx& c) {
    static_assert(sizeof(A) <= TASK_ARG_SLOTS * 8, "argument record too large");
    return *reinterpret_cast<const A*>(c.desc->args);
}

// Reports a fault from inside a task (any thread; the first report wins).
__device__ __forceinline__ void task_fault(const Ctx& c, u32 kind, u64 seen, u64 needed) {
    report_fault(c.env, c.desc->id, c.desc->opcode, c.command, kind, 0, seen, needed);
}

// D += A B on tensor cores: A 16x16 (row-major fragment), B 16x8, bf16 in, f32 out.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asks for the 128-byte line holding `p` in L1, without waiting for it (no
// register holds the value): a later load finds it there.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(u32(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return u16((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return u16(u >> 16);
}

// Loads element i of a float array of type `dtype`.
__device__ __forceinline__ float load_float(u64 base, u32 dtype, u64 i) {
    return dtype == DTYPE_BF16 ? bf16_to_f32(reinterpret_cast<const u16*>(base)[i])
                               : reinterpret_cast<const float*>(base)[i];
}

// Stores element i of a float array of type `dtype`.
__device__ __forceinline__ void store_float(u64 base, u32 dtype, u64 i, float v) {
    if (dtype == DTYPE_BF16) reinterpret_cast<u16*>(base)[i] = f32_to_bf16(v);
    else reinterpret_cast<float*>(base)[i] = v;
}

// SwiGLU of one element, silu(g) * u: the one expression the swiglu task and
// the products' SwiGLU prologues share, so that a fused prologue and a
// separate stage give the same bits.
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// Elements of a row a thread loads before using any: a strided loop that
// uses each load at once waits one memory round trip per element.
constexpr u32 ROW_BATCH = 4;

// Elements k0, k0 + step, ... (ROW_BATCH of them; indices past `cols` read
// element cols - 1) of the row at element `at` of a float array of type
// `dtype`: every load issued before any value is converted.
__device__ __forceinline__ void load_row_batch(u64 base, u32 dtype, u64 at, u32 k0, u32 step, u32 cols,
                                               float (&v)[ROW_BATCH]) {
    if (dtype == DTYPE_BF16) {
        u16 r[ROW_BATCH];
#pragma unroll
        for (u32 j = 0; j < ROW_BATCH; ++j) r[j] = reinterpret_cast<const u16*>(base)[at + min(k0 + j * step, cols - 1)];
#pragma unroll
        for (u32 j = 0; j < ROW_BATCH; ++j) v[j] = bf16_to_f32(r[j]);
    } else {
#pragma unroll
        for (u32 j = 0; j < ROW_BATCH; ++j) v[j] = reinterpret_cast<const float*>(base)[at + min(k0 + j * step, cols - 1)];
    }
}

// This thread's sum of squares of elements threadIdx.x, + blockDim.x, ... of
// the row at element `base`, accumulated in that order (the order every norm
// of the kernel uses, so the bits do not depend on the batching), with
// ROW_BATCH loads in flight.
__device__ __forceinline__ float row_sum_squares(u64 x, u32 dtype, u64 base, u32 cols) {
    float ss = 0.0f;
    for (u32 k0 = threadIdx.x; k0 < cols; k0 += ROW_BATCH * blockDim.x) {
        float v[ROW_BATCH];
        load_row_batch(x, dtype, base, k0, blockDim.x, cols, v);
#pragma unroll
        for (u32 j = 0; j < ROW_BATCH; ++j) {
            if (k0 + j * blockDim.x < cols) ss = fmaf(v[j], v[j], ss);
        }
    }
    return ss;
}

// Sum over the block; the result is valid in every thread. Uses 32 floats of scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}
