// argmax: index of the largest value, lowest index on ties, NaN never wins;
// src/task/argmax.rs.
#pragma once
#include "../include/task.cuh"

struct ArgmaxArgs {
    u64 x;
    u64 out;
    u32 n;
    u32 x_dtype;
    u32 base;
    u32 in_pairs;
    u32 out_index;
    u32 reserved;
};
MK_SIZE(ArgmaxArgs, 40);
MK_OFFSET(ArgmaxArgs, x, 0);
MK_OFFSET(ArgmaxArgs, out, 8);
MK_OFFSET(ArgmaxArgs, n, 16);
MK_OFFSET(ArgmaxArgs, x_dtype, 20);
MK_OFFSET(ArgmaxArgs, base, 24);
MK_OFFSET(ArgmaxArgs, in_pairs, 28);
MK_OFFSET(ArgmaxArgs, out_index, 32);
MK_OFFSET(ArgmaxArgs, reserved, 36);

__device__ __forceinline__ bool argmax_better(float v, u32 i, float bv, u32 bi) {
    return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void argmax_warp(float& bv, u32& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xFFFFFFFFu, bv, o);
        const u32 i = __shfl_xor_sync(0xFFFFFFFFu, bi, o);
        if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
}

MK_COLD_TASK void task_argmax(const Ctx& c) {
    const ArgmaxArgs& a = task_args<ArgmaxArgs>(c);
    float bv = -__int_as_float(0x7f800000);  // -inf
    u32 bi = 0xFFFFFFFFu;
    for (u32 k = threadIdx.x; k < a.n; k += blockDim.x) {
        float v;
        u32 i;
        if (a.in_pairs) {
            const uint2 p = reinterpret_cast<const uint2*>(a.x)[k];
            v = __uint_as_float(p.x), i = p.y;
        } else {
            v = load_float(a.x, a.x_dtype, k), i = a.base + k;
        }
        if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
    argmax_warp(bv, bi);
    float* sv = reinterpret_cast<float*>(c.scratch());
    u32* si = reinterpret_cast<u32*>(c.scratch()) + 32;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = lane < (blockDim.x >> 5) ? sv[lane] : -__int_as_float(0x7f800000);
        bi = lane < (blockDim.x >> 5) ? si[lane] : 0xFFFFFFFFu;
        argmax_warp(bv, bi);
        if (lane == 0) {
            u32* out = reinterpret_cast<u32*>(a.out);
            if (a.out_index) out[0] = bi;
            else out[0] = __float_as_uint(bv), out[1] = bi;
        }
    }
}
