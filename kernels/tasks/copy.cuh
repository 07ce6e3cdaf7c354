// copy: dst[..n] = src[row * n ..][..n], row bounds-checked; src/task/copy.rs.
#pragma once
#include "../include/task.cuh"

struct CopyArgs {
    u64 dst;
    u64 src;
    u64 row;
    u32 n;
    u32 src_rows;
    u32 dst_dtype;
    u32 src_dtype;
};
MK_SIZE(CopyArgs, 40);
MK_OFFSET(CopyArgs, dst, 0);
MK_OFFSET(CopyArgs, src, 8);
MK_OFFSET(CopyArgs, row, 16);
MK_OFFSET(CopyArgs, n, 24);
MK_OFFSET(CopyArgs, src_rows, 28);
MK_OFFSET(CopyArgs, dst_dtype, 32);
MK_OFFSET(CopyArgs, src_dtype, 36);

MK_COLD_TASK void task_copy(const Ctx& c) {
    const CopyArgs& a = task_args<CopyArgs>(c);
    if (a.row >= a.src_rows) {
        if (threadIdx.x == 0) task_fault(c, FAULT_OUT_OF_RANGE, a.row, a.src_rows);
        return;
    }
    const u64 base = a.row * a.n;
    for (u32 i = threadIdx.x; i < a.n; i += blockDim.x) {
        if (a.dst_dtype == DTYPE_U32) {
            reinterpret_cast<u32*>(a.dst)[i] = reinterpret_cast<const u32*>(a.src)[base + i];
        } else {
            store_float(a.dst, a.dst_dtype, i, load_float(a.src, a.src_dtype, base + i));
        }
    }
}
