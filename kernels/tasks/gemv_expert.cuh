// gemv_expert: gemv_bf16 for the expert in one slot of a routing list;
// src/task/gemv_expert.rs.
#pragma once
#include "gemv_bf16.cuh"

struct GemvExpertArgs {
    GemvBf16Args gemv;
    u64 list;
    u32 slot;
    u16 x_per_slot;
    u16 slots;
};
MK_SIZE(GemvExpertArgs, 88);
MK_OFFSET(GemvExpertArgs, gemv, 0);
MK_OFFSET(GemvExpertArgs, list, 72);
MK_OFFSET(GemvExpertArgs, slot, 80);
MK_OFFSET(GemvExpertArgs, x_per_slot, 84);
MK_OFFSET(GemvExpertArgs, slots, 86);

__device__ __forceinline__ void task_gemv_expert(const Ctx& c) {
    // The product's arguments are patched in place in the shared descriptor
    // (a private copy per task), so the matrix loop reads them from shared
    // memory exactly as gemv_bf16 does instead of holding a copy in registers.
    GemvExpertArgs& a = *reinterpret_cast<GemvExpertArgs*>(const_cast<u64*>(c.desc->args));
    const u32* list = reinterpret_cast<const u32*>(a.list);
    if (a.slot >= list[0]) return;
    const u64 expert = list[1 + a.slot];
    __syncthreads();  // every thread has read the unpatched fields
    if (threadIdx.x == 0) {
        GemvBf16Args& g = a.gemv;
        g.w += expert * u64(g.ldy) * g.cols * 2;
        g.y += u64(a.slot) * g.m * g.ldy * (g.y_dtype == DTYPE_BF16 ? 2 : 4);
        if (a.x_per_slot) {
            const u64 step = u64(a.slot) * g.m * g.ldx * (g.x_dtype == DTYPE_BF16 ? 2 : 4);
            g.x += step;
            if (g.prologue == PROLOGUE_SWIGLU) g.aux += step;
        }
    }
    __syncthreads();
    const GemvBf16Args& g = a.gemv;
    if ((g.cols & 7) || (g.ldw & 7) || g.m == 0 || g.m > 16) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, g.cols, g.m);
        return;
    }
    // Only the rows routed to this expert (the mask after the list's ids).
    u32 rmap[16];
    const u32 n = rows_of_mask(list[1 + a.slots + a.slot] & ((1u << g.m) - 1u), rmap);
    if (n > 0) gemv_dispatch(c, g, rmap, n);
}
