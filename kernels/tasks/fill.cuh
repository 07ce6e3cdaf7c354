// fill: dst[..n] = value; src/task/fill.rs.
#pragma once
#include "../include/task.cuh"

struct FillArgs {
    u64 dst;
    u32 n;
    u32 dtype;
    u64 value;
};
MK_SIZE(FillArgs, 24);
MK_OFFSET(FillArgs, dst, 0);
MK_OFFSET(FillArgs, n, 8);
MK_OFFSET(FillArgs, dtype, 12);
MK_OFFSET(FillArgs, value, 16);

MK_COLD_TASK void task_fill(const Ctx& c) {
    const FillArgs& a = task_args<FillArgs>(c);
    const u32 bits = u32(a.value);
    for (u32 i = threadIdx.x; i < a.n; i += blockDim.x) {
        if (a.dtype == DTYPE_U32) reinterpret_cast<u32*>(a.dst)[i] = bits;
        else store_float(a.dst, a.dtype, i, __uint_as_float(bits));
    }
}
