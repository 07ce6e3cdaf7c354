// axpy: y = alpha * x + y; src/task/axpy.rs.
#pragma once
#include "../include/task.cuh"

struct AxpyArgs {
    u64 y;
    u64 x;
    u64 alpha;
    u32 n;
    u32 x_dtype;
    u32 y_dtype;
    u32 reserved;
};
MK_SIZE(AxpyArgs, 40);
MK_OFFSET(AxpyArgs, y, 0);
MK_OFFSET(AxpyArgs, x, 8);
MK_OFFSET(AxpyArgs, alpha, 16);
MK_OFFSET(AxpyArgs, n, 24);
MK_OFFSET(AxpyArgs, x_dtype, 28);
MK_OFFSET(AxpyArgs, y_dtype, 32);
MK_OFFSET(AxpyArgs, reserved, 36);

MK_COLD_TASK void task_axpy(const Ctx& c) {
    const AxpyArgs& a = task_args<AxpyArgs>(c);
    const float alpha = __uint_as_float(u32(a.alpha));
    for (u32 i = threadIdx.x; i < a.n; i += blockDim.x) {
        const float v = fmaf(alpha, load_float(a.x, a.x_dtype, i), load_float(a.y, a.y_dtype, i));
        store_float(a.y, a.y_dtype, i, v);
    }
}
