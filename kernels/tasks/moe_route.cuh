// moe_route: softmax, top-k (lowest index on ties), optional renormalisation,
// dense weight table and the ascending list of chosen experts (and, with a
// tally, the count added to it); src/task/moe_route.rs.
// One warp per row; thread 0 builds the list.
#pragma once
#include "../include/task.cuh"
#include "argmax.cuh"

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

// One warp per token row. The row's probabilities are computed once into
// shared memory; each of the top_k rounds is then a warp argmax over shared
// memory, and the pick is struck out (set to -inf) for the next round.
__device__ __forceinline__ void task_moe_route(const Ctx& c) {
    const MoeRouteArgs& a = task_args<MoeRouteArgs>(c);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float NEG_INF = -__int_as_float(0x7f800000);
    if (u64(nwarps) * a.experts * 4 + a.experts * 5 > c.smem_bytes || a.top_k > 32 || a.m > 32) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.experts, a.top_k);
        return;
    }
    float* probs = reinterpret_cast<float*>(c.smem) + warp * a.experts;
    // Per expert: the rows whose weight for it is not zero (the list's row
    // masks, kept here so that nothing is read back from global memory),
    // and whether any row chose it.
    u32* rowmask = reinterpret_cast<u32*>(c.smem + u64(nwarps) * a.experts * 4);
    unsigned char* chosen = reinterpret_cast<unsigned char*>(rowmask + a.experts);
    for (u32 j = threadIdx.x; j < a.experts; j += blockDim.x) chosen[j] = 0, rowmask[j] = 0;
    __syncthreads();
    const float* logits = reinterpret_cast<const float*>(a.logits);
    float* weights = reinterpret_cast<float*>(a.weights);
    for (u32 i = warp; i < a.m; i += nwarps) {
        const float* row = logits + u64(i) * a.experts;
        float* out = weights + u64(i) * a.experts;
        float mx = NEG_INF;
        // All of a lane's logits are loaded before any is stored, so the loads
        // overlap instead of paying one L2 round trip each.
        for (u32 base = 0; base < a.experts; base += 32 * 8) {
            float v[8];
#pragma unroll
            for (u32 u = 0; u < 8; ++u) {
                const u32 j = base + u * 32 + lane;
                v[u] = j < a.experts ? __ldcg(row + j) : NEG_INF;
            }
#pragma unroll
            for (u32 u = 0; u < 8; ++u) {
                const u32 j = base + u * 32 + lane;
                if (j < a.experts) probs[j] = v[u];
                mx = fmaxf(mx, v[u]);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
        float total = 0.0f;
        for (u32 j = lane; j < a.experts; j += 32) {
            total += __expf(probs[j] - mx);
            out[j] = 0.0f;
        }
        total = warp_sum(total);
        for (u32 j = lane; j < a.experts; j += 32) probs[j] = __expf(probs[j] - mx) / total;
        __syncwarp();
        u32 my_pick = 0xFFFFFFFFu;
        float my_p = 0.0f, picked_sum = 0.0f;
        for (u32 r = 0; r < a.top_k; ++r) {
            float bv = NEG_INF;
            u32 bi = 0xFFFFFFFFu;
            for (u32 j = lane; j < a.experts; j += 32) {
                const float p = probs[j];
                if (argmax_better(p, j, bv, bi)) bv = p, bi = j;
            }
            argmax_warp(bv, bi);
            if (lane == r) my_pick = bi, my_p = bv;
            if (bi < a.experts) picked_sum += bv;
            __syncwarp();
            if (lane == 0 && bi < a.experts) probs[bi] = NEG_INF;
            __syncwarp();
        }
        if (lane < a.top_k && my_pick < a.experts) {  // NaN logits pick nothing
            const float wv = a.norm_topk ? my_p / picked_sum : my_p;
            out[my_pick] = wv;
            chosen[my_pick] = 1;
            if (wv != 0.0f) atomicOr(&rowmask[my_pick], 1u << i);
        }
        __syncwarp();
    }
    __syncthreads();
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
}
