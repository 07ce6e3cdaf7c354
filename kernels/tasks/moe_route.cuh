// moe_route: softmax, top-k (lowest index on ties), optional renormalisation,
// dense weight table and the ascending list of chosen experts (and, with a
// tally, the count added to it); src/task/moe_route.rs.
// One warp per row; thread 0 builds the list.
#pragma once
#include "../include/task.cuh"

struct MoeRouteArgs {
    u64 logits;
    u64 weights;
    u64 list;
    u32 m;
    u32 experts;
    u32 top_k;
    u32 norm_topk;
    u32 slots;
    u32 reserved;
    u64 tally;
};
MK_SIZE(MoeRouteArgs, 56);
MK_OFFSET(MoeRouteArgs, logits, 0);
MK_OFFSET(MoeRouteArgs, weights, 8);
MK_OFFSET(MoeRouteArgs, list, 16);
MK_OFFSET(MoeRouteArgs, m, 24);
MK_OFFSET(MoeRouteArgs, experts, 28);
MK_OFFSET(MoeRouteArgs, top_k, 32);
MK_OFFSET(MoeRouteArgs, norm_topk, 36);
MK_OFFSET(MoeRouteArgs, slots, 40);
MK_OFFSET(MoeRouteArgs, reserved, 44);
MK_OFFSET(MoeRouteArgs, tally, 48);

// One row, one warp, the row's probabilities in registers: lane l holds
// experts l, l + 32, ... as keys, the probability's bits plus one (0 for NaN
// and for experts already picked), so that the non-negative probabilities
// order as integers. Each of the top_k rounds is two warp reductions: the
// largest key, then the lowest expert holding it (lowest index on ties).
template <int NPL>
__device__ __forceinline__ void route_row(const MoeRouteArgs& a, u32 i, u32* rowmask, unsigned char* chosen) {
    const u32 lane = threadIdx.x & 31;
    const float NEG_INF = -__int_as_float(0x7f800000);
    const float* row = reinterpret_cast<const float*>(a.logits) + u64(i) * a.experts;
    float* out = reinterpret_cast<float*>(a.weights) + u64(i) * a.experts;
    float v[NPL];
    float mx = NEG_INF;
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const u32 j = u * 32 + lane;
        v[u] = j < a.experts ? __ldcg(row + j) : NEG_INF;
        mx = fmaxf(mx, v[u]);
    }
    MK_PHASE(2);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    float total = 0.0f;
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        if (u * 32 + lane < a.experts) {
            total += __expf(v[u] - mx);
            out[u * 32 + lane] = 0.0f;
        }
    }
    total = warp_sum(total);
    u32 key[NPL];
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const float p = __expf(v[u] - mx) / total;
        key[u] = u * 32 + lane < a.experts && p == p ? __float_as_uint(p) + 1u : 0u;
    }
    MK_PHASE(3);
    u32 my_pick = 0xFFFFFFFFu;
    float my_p = 0.0f, picked_sum = 0.0f;
    for (u32 r = 0; r < a.top_k; ++r) {
        u32 bk = 0, bj = 0xFFFFFFFFu;
#pragma unroll
        for (int u = 0; u < NPL; ++u) {
            if (key[u] > bk) bk = key[u], bj = u * 32 + lane;
        }
        const u32 top = __reduce_max_sync(0xFFFFFFFFu, bk);
        if (top == 0u) break;  // NaN rows: nothing left to pick
        const u32 pick = __reduce_min_sync(0xFFFFFFFFu, bk == top ? bj : 0xFFFFFFFFu);
        const float p = __uint_as_float(top - 1u);
        if (lane == r) my_pick = pick, my_p = p;
        picked_sum += p;
#pragma unroll
        for (int u = 0; u < NPL; ++u) {
            if (u * 32 + lane == pick) key[u] = 0u;
        }
    }
    MK_PHASE(4);
    __syncwarp();  // the zeros above are stored before the picks
    if (lane < a.top_k && my_pick < a.experts) {
        const float wv = a.norm_topk ? my_p / picked_sum : my_p;
        out[my_pick] = wv;
        chosen[my_pick] = 1;
        if (wv != 0.0f) atomicOr(&rowmask[my_pick], 1u << i);
    }
    MK_PHASE(5);
}

// One warp per token row (route_row); thread 0's warp then lists the chosen
// experts in order.
__device__ __forceinline__ void task_moe_route(const Ctx& c) {
    const MoeRouteArgs& a = task_args<MoeRouteArgs>(c);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (a.experts > 1024 || u64(a.experts) * 5 > c.smem_bytes || a.top_k > 32 || a.m > 32) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.experts, a.top_k);
        return;
    }
    // Per expert: the rows whose weight for it is not zero (the list's row
    // masks, kept here so that nothing is read back from global memory),
    // and whether any row chose it.
    u32* rowmask = reinterpret_cast<u32*>(c.scratch());
    unsigned char* chosen = reinterpret_cast<unsigned char*>(rowmask + a.experts);
    for (u32 j = threadIdx.x; j < a.experts; j += blockDim.x) chosen[j] = 0, rowmask[j] = 0;
    __syncthreads();
    MK_PHASE(1);
    for (u32 i = warp; i < a.m; i += nwarps) {
        if (a.experts <= 128) route_row<4>(a, i, rowmask, chosen);
        else if (a.experts <= 256) route_row<8>(a, i, rowmask, chosen);
        else if (a.experts <= 512) route_row<16>(a, i, rowmask, chosen);
        else route_row<32>(a, i, rowmask, chosen);
    }
    __syncthreads();
    MK_PHASE(6);
    if (warp == 0) {
        // Ordered compaction of the chosen experts: one ballot per 32 experts.
        u32* list = reinterpret_cast<u32*>(a.list);
        u32 n = 0;
        for (u32 base = 0; base < a.experts; base += 32) {
            const u32 j = base + lane;
            const bool on = j < a.experts && chosen[j];
            const u32 mask = __ballot_sync(0xFFFFFFFFu, on);
            if (on) {
                const u32 at = n + __popc(mask & ((1u << lane) - 1u));
                list[1 + at] = j, list[1 + a.slots + at] = rowmask[j];
            }
            n += __popc(mask);
        }
        if (lane == 0) {
            list[0] = n;
            if (a.tally) {
                // Reductions: nothing waits for a value to come back.
                u32* t = reinterpret_cast<u32*>(a.tally);
                atomicAdd(t, n), atomicAdd(t + 1, 1u);
            }
        }
    }
    MK_PHASE(7);
}
