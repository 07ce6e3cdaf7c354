// attention_combine: merges attention slices for a range of heads;
// src/task/attention_combine.rs. One warp per (row, head).
#pragma once
#include "../include/task.cuh"

struct AttentionCombineArgs {
    u64 partial;
    u64 out;
    u32 m;
    u32 heads;
    u32 head_dim;
    u32 chunks;
    u32 head0;
    u32 nheads;
    u32 out_dtype;
    u32 reserved;
};
MK_SIZE(AttentionCombineArgs, 48);
MK_OFFSET(AttentionCombineArgs, partial, 0);
MK_OFFSET(AttentionCombineArgs, out, 8);
MK_OFFSET(AttentionCombineArgs, m, 16);
MK_OFFSET(AttentionCombineArgs, heads, 20);
MK_OFFSET(AttentionCombineArgs, head_dim, 24);
MK_OFFSET(AttentionCombineArgs, chunks, 28);
MK_OFFSET(AttentionCombineArgs, head0, 32);
MK_OFFSET(AttentionCombineArgs, nheads, 36);
MK_OFFSET(AttentionCombineArgs, out_dtype, 40);
MK_OFFSET(AttentionCombineArgs, reserved, 44);

__device__ __forceinline__ void task_attention_combine(const Ctx& c) {
    const AttentionCombineArgs& a = task_args<AttentionCombineArgs>(c);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, stride = hd + 2;
    for (u32 pair = warp; pair < a.m * a.nheads; pair += nwarps) {
        const u32 i = pair / a.nheads, h = a.head0 + pair % a.nheads;
        const float* p = reinterpret_cast<const float*>(a.partial) + (u64(i) * a.heads + h) * a.chunks * stride;
        float mx = -__int_as_float(0x7f800000);
        for (u32 k = 0; k < a.chunks; ++k) mx = fmaxf(mx, p[k * stride + hd]);
        float total = 0.0f;
        for (u32 k = 0; k < a.chunks; ++k) {
            const float s = p[k * stride + hd + 1];
            if (s > 0.0f) total = fmaf(__expf(p[k * stride + hd] - mx), s, total);
        }
        const float inv = 1.0f / total;
        for (u32 j = lane; j < hd; j += 32) {
            float acc = 0.0f;
            for (u32 k = 0; k < a.chunks; ++k) {
                if (p[k * stride + hd + 1] > 0.0f) acc = fmaf(__expf(p[k * stride + hd] - mx), p[k * stride + j], acc);
            }
            store_float(a.out, a.out_dtype, (u64(i) * a.heads + h) * hd + j, acc * inv);
        }
    }
}
