// reduce_sum: out[0] = sum(x[..n]) in f32; src/task/reduce_sum.rs.
#pragma once
#include "../include/task.cuh"

struct ReduceSumArgs {
    u64 out;
    u64 x;
    u32 n;
    u32 x_dtype;
    u32 out_dtype;
    u32 reserved;
};
MK_SIZE(ReduceSumArgs, 32);
MK_OFFSET(ReduceSumArgs, out, 0);
MK_OFFSET(ReduceSumArgs, x, 8);
MK_OFFSET(ReduceSumArgs, n, 16);
MK_OFFSET(ReduceSumArgs, x_dtype, 20);
MK_OFFSET(ReduceSumArgs, out_dtype, 24);
MK_OFFSET(ReduceSumArgs, reserved, 28);

MK_COLD_TASK void task_reduce_sum(const Ctx& c) {
    const ReduceSumArgs& a = task_args<ReduceSumArgs>(c);
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < a.n; i += blockDim.x) s += load_float(a.x, a.x_dtype, i);
    s = block_sum(s, reinterpret_cast<float*>(c.scratch()));
    if (threadIdx.x == 0) store_float(a.out, a.out_dtype, 0, s);
}
