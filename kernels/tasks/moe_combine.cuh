// moe_combine: S[i, h] = sum over listed experts of weight * y[slot, i, h],
// then x += S (accumulate) or x = S; src/task/moe_combine.rs.
#pragma once
#include "../include/task.cuh"

struct MoeCombineArgs {
    u64 x;
    u64 y;
    u64 weights;
    u64 list;
    u32 m;
    u32 hidden;
    u32 experts;
    u32 h0;
    u32 hn;
    u32 x_dtype;
    u32 accumulate;
    u32 slots;
};
MK_SIZE(MoeCombineArgs, 64);
MK_OFFSET(MoeCombineArgs, x, 0);
MK_OFFSET(MoeCombineArgs, y, 8);
MK_OFFSET(MoeCombineArgs, weights, 16);
MK_OFFSET(MoeCombineArgs, list, 24);
MK_OFFSET(MoeCombineArgs, m, 32);
MK_OFFSET(MoeCombineArgs, hidden, 36);
MK_OFFSET(MoeCombineArgs, experts, 40);
MK_OFFSET(MoeCombineArgs, h0, 44);
MK_OFFSET(MoeCombineArgs, hn, 48);
MK_OFFSET(MoeCombineArgs, x_dtype, 52);
MK_OFFSET(MoeCombineArgs, accumulate, 56);
MK_OFFSET(MoeCombineArgs, slots, 60);

// Slots a one-row combine loads before the list arrives.
constexpr u32 COMBINE_EARLY_SLOTS = 8;

// Two round trips for the task (one for a single row of at most
// COMBINE_EARLY_SLOTS slots). First the list (count and ids) and the rows'
// dense weights, all at once, into shared memory; then one warp per row
// lists the slots routed to it (weight not zero) in list order with their
// weights; then each element reads the residual and the outputs of its
// row's routed slots together and sums them in that order (the sum over
// every listed slot, slots of weight 0 left out, as it was defined).
__device__ __forceinline__ void task_moe_combine(const Ctx& c) {
    const MoeCombineArgs& a = task_args<MoeCombineArgs>(c);
    // The arguments in registers: stores through `x` would otherwise make the
    // compiler read them again from the descriptor.
    const u32 m = a.m, hidden = a.hidden, experts = a.experts, h0 = a.h0, hn = a.hn, slots = a.slots;
    const u32 x_dtype = a.x_dtype;
    const bool accumulate = a.accumulate != 0;
    const u64 x = a.x;
    const u32* list = reinterpret_cast<const u32*>(a.list);
    const float* y = reinterpret_cast<const float*>(a.y);
    const float* w = reinterpret_cast<const float*>(a.weights);
    // Shared memory: list copy [1 + slots], dense weights [m][experts], per
    // row its routed slots' count [m], slots [m][slots] and weights [m][slots].
    u32* ls = reinterpret_cast<u32*>(c.scratch());
    float* wd = reinterpret_cast<float*>(ls + 1 + slots);
    u32* rn = reinterpret_cast<u32*>(wd + u64(m) * experts);
    u32* rs = rn + m;
    float* rw = reinterpret_cast<float*>(rs + u64(m) * slots);
    if ((u64(1) + slots + u64(m) * (experts + 1 + 2 * u64(slots))) * 4 > c.smem_bytes) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, slots, c.smem_bytes);
        return;
    }
    // One row of few slots (a decode step): each element's residual and
    // every slot's output are loaded in the first trip too, beside the list
    // (slots past the count are loaded and never used).
    const bool one = m == 1 && slots <= COMBINE_EARLY_SLOTS && hn <= blockDim.x;
    const bool early = one && threadIdx.x < hn;
    float ey[COMBINE_EARLY_SLOTS], eprev = 0.0f;
    if (early) {
        const u64 at = h0 + threadIdx.x;
        if (accumulate) eprev = load_float(x, x_dtype, at);
#pragma unroll
        for (u32 s = 0; s < COMBINE_EARLY_SLOTS; ++s) ey[s] = s < slots ? __ldcg(y + u64(s) * hidden + at) : 0.0f;
    }
    for (u32 t = threadIdx.x; t < 1 + slots; t += blockDim.x) ls[t] = list[t];
    for (u32 t = threadIdx.x; t < m * experts; t += blockDim.x) wd[t] = w[t];
    __syncthreads();
    if (one) {
        // The same sum as below: the slots of weight not zero in list order.
        if (early) {
            const u32 count = min(ls[0], slots);
            float acc = 0.0f;
#pragma unroll
            for (u32 s = 0; s < COMBINE_EARLY_SLOTS; ++s) {
                const float wt = s < count ? wd[ls[1 + s]] : 0.0f;
                if (wt != 0.0f) acc = fmaf(wt, ey[s], acc);
            }
            const u64 at = h0 + threadIdx.x;
            store_float(x, x_dtype, at, accumulate ? eprev + acc : acc);
        }
        return;
    }
    const u32 count = min(ls[0], slots), lane = threadIdx.x & 31;
    for (u32 i = threadIdx.x >> 5; i < m; i += blockDim.x >> 5) {
        u32 n = 0;
        for (u32 s0 = 0; s0 < count; s0 += 32) {
            const u32 s = s0 + lane;
            const float wt = s < count ? wd[u64(i) * experts + ls[1 + s]] : 0.0f;
            const u32 on = __ballot_sync(0xFFFFFFFFu, wt != 0.0f);
            if (wt != 0.0f) {
                const u32 at = n + __popc(on & ((1u << lane) - 1u));
                rs[u64(i) * slots + at] = s, rw[u64(i) * slots + at] = wt;
            }
            n += __popc(on);
        }
        if (lane == 0) rn[i] = n;
    }
    __syncthreads();
    for (u32 k = threadIdx.x; k < m * hn; k += blockDim.x) {
        const u32 i = k / hn, h = h0 + k % hn;
        const u64 at = u64(i) * hidden + h;
        const float prev = accumulate ? load_float(x, x_dtype, at) : 0.0f;
        const float* yk = y + u64(i) * hidden + h;
        const u32 n = rn[i], *si = rs + u64(i) * slots;
        const float* wi = rw + u64(i) * slots;
        float acc = 0.0f;
#pragma unroll 8
        for (u32 r = 0; r < n; ++r) acc = fmaf(wi[r], __ldcg(yk + u64(si[r]) * m * hidden), acc);
        store_float(x, x_dtype, at, accumulate ? prev + acc : acc);
    }
}
