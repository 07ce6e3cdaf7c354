// moe_route: softmax, top-k (lowest index on ties), optional renormalisation,
// dense weight table and the ascending list of chosen experts; src/task/moe_route.rs.
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
};
MK_SIZE(MoeRouteArgs, 40);
MK_OFFSET(MoeRouteArgs, logits, 0);
MK_OFFSET(MoeRouteArgs, weights, 8);
MK_OFFSET(MoeRouteArgs, list, 16);
MK_OFFSET(MoeRouteArgs, m, 24);
MK_OFFSET(MoeRouteArgs, experts, 28);
MK_OFFSET(MoeRouteArgs, top_k, 32);
MK_OFFSET(MoeRouteArgs, norm_topk, 36);

__device__ __forceinline__ void task_moe_route(const Ctx& c) {
    const MoeRouteArgs& a = task_args<MoeRouteArgs>(c);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    unsigned char* chosen = c.smem;  // experts bytes: chosen by any row
    for (u32 j = threadIdx.x; j < a.experts; j += blockDim.x) chosen[j] = 0;
    __syncthreads();
    const float* logits = reinterpret_cast<const float*>(a.logits);
    float* weights = reinterpret_cast<float*>(a.weights);
    for (u32 i = warp; i < a.m; i += nwarps) {
        const float* row = logits + u64(i) * a.experts;
        float* out = weights + u64(i) * a.experts;
        float mx = -__int_as_float(0x7f800000);
        for (u32 j = lane; j < a.experts; j += 32) mx = fmaxf(mx, row[j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
        float total = 0.0f;
        for (u32 j = lane; j < a.experts; j += 32) {
            total += __expf(row[j] - mx);
            out[j] = 0.0f;
        }
        total = warp_sum(total);
        // k rounds of a warp argmax over the probabilities not taken yet; the
        // picks are held by lane r (round r), so no per-row scratch is needed.
        u32 my_pick = 0xFFFFFFFFu;
        float my_p = 0.0f, picked_sum = 0.0f;
        for (u32 r = 0; r < a.top_k; ++r) {
            float bv = -__int_as_float(0x7f800000);
            u32 bi = 0xFFFFFFFFu;
            for (u32 base = 0; base < a.experts; base += 32) {  // uniform trip count: shuffles inside
                const u32 j = base + lane;
                bool taken = j >= a.experts;
                for (u32 q = 0; q < r; ++q) taken |= __shfl_sync(0xFFFFFFFFu, my_pick, q) == j;
                if (!taken) {
                    const float p = __expf(row[j] - mx) / total;
                    if (argmax_better(p, j, bv, bi)) bv = p, bi = j;
                }
            }
            argmax_warp(bv, bi);
            if (lane == r) my_pick = bi, my_p = bv;
            picked_sum += bv;
        }
        if (lane < a.top_k && my_pick < a.experts) {  // NaN logits pick nothing
            out[my_pick] = a.norm_topk ? my_p / picked_sum : my_p;
            chosen[my_pick] = 1;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* list = reinterpret_cast<u32*>(a.list);
        u32 n = 0;
        for (u32 j = 0; j < a.experts; ++j) {
            if (chosen[j]) list[1 + n++] = j;
        }
        list[0] = n;
    }
}
