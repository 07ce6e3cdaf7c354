// attention: one KV head, one run-time slice of the cached keys, every query
// row and head of the group; writes (o, max, sum) partials with an online
// softmax; src/task/attention.rs. One warp per (row, head); each lane holds
// head_dim / 32 consecutive elements.
#pragma once
#include "../include/task.cuh"

struct AttentionArgs {
    u64 qkv;
    u64 cache;
    u64 pos;
    u64 partial;
    u32 m;
    u32 heads;
    u32 kv_heads;
    u32 head_dim;
    u32 max_seq;
    u32 kv_head;
    u32 chunk;
    u32 chunks;
    u32 scale;
    u32 qkv_dtype;
    u32 cache_dtype;
    u32 reserved;
};
MK_SIZE(AttentionArgs, 80);
MK_OFFSET(AttentionArgs, qkv, 0);
MK_OFFSET(AttentionArgs, cache, 8);
MK_OFFSET(AttentionArgs, pos, 16);
MK_OFFSET(AttentionArgs, partial, 24);
MK_OFFSET(AttentionArgs, m, 32);
MK_OFFSET(AttentionArgs, heads, 36);
MK_OFFSET(AttentionArgs, kv_heads, 40);
MK_OFFSET(AttentionArgs, head_dim, 44);
MK_OFFSET(AttentionArgs, max_seq, 48);
MK_OFFSET(AttentionArgs, kv_head, 52);
MK_OFFSET(AttentionArgs, chunk, 56);
MK_OFFSET(AttentionArgs, chunks, 60);
MK_OFFSET(AttentionArgs, scale, 64);
MK_OFFSET(AttentionArgs, qkv_dtype, 68);
MK_OFFSET(AttentionArgs, cache_dtype, 72);
MK_OFFSET(AttentionArgs, reserved, 76);

template <int E>
__device__ __forceinline__ void attention_rows(const AttentionArgs& a, u32 pos0, u32 lo, u32 hi) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, group = a.heads / a.kv_heads, width = (a.heads + 2 * a.kv_heads) * hd;
    const float scale = __uint_as_float(a.scale);
    const u64 kbase = (u64(a.kv_head) * a.max_seq) * hd;
    const u64 vbase = (u64(a.kv_heads + a.kv_head) * a.max_seq) * hd;
    for (u32 pair = warp; pair < a.m * group; pair += nwarps) {
        const u32 i = pair / group, h = a.kv_head * group + pair % group;
        const u32 end = min(hi, pos0 + i + 1);  // row i attends keys 0..=pos0 + i
        float q[E], o[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            q[e] = load_float(a.qkv, a.qkv_dtype, u64(i) * width + u64(h) * hd + lane * E + e) * scale;
            o[e] = 0.0f;
        }
        float mx = -__int_as_float(0x7f800000), sum = 0.0f;
        for (u32 j = lo; j < end; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) dot = fmaf(q[e], load_float(a.cache, a.cache_dtype, kbase + u64(j) * hd + lane * E + e), dot);
            dot = warp_sum(dot);
            const float nmx = fmaxf(mx, dot);
            const float corr = __expf(mx - nmx), p = __expf(dot - nmx);
            sum = fmaf(sum, corr, p);
#pragma unroll
            for (int e = 0; e < E; ++e) {
                o[e] = fmaf(o[e], corr, p * load_float(a.cache, a.cache_dtype, vbase + u64(j) * hd + lane * E + e));
            }
            mx = nmx;
        }
        float* out = reinterpret_cast<float*>(a.partial) + ((u64(i) * a.heads + h) * a.chunks + a.chunk) * (hd + 2);
#pragma unroll
        for (int e = 0; e < E; ++e) out[lane * E + e] = o[e];
        if (lane == 0) out[hd] = mx, out[hd + 1] = sum;
    }
}

__device__ __forceinline__ void task_attention(const Ctx& c) {
    const AttentionArgs& a = task_args<AttentionArgs>(c);
    const u32 pos0 = *reinterpret_cast<const u32*>(a.pos);
    if (u64(pos0) + a.m > a.max_seq) {
        if (threadIdx.x == 0) task_fault(c, FAULT_OUT_OF_RANGE, u64(pos0) + a.m, a.max_seq);
        return;
    }
    const u32 len = pos0 + a.m, per = (len + a.chunks - 1) / a.chunks;
    const u32 lo = min(a.chunk * per, len), hi = min(lo + per, len);
    switch (a.head_dim) {
        case 32: attention_rows<1>(a, pos0, lo, hi); break;
        case 64: attention_rows<2>(a, pos0, lo, hi); break;
        case 128: attention_rows<4>(a, pos0, lo, hi); break;
        default:
            if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.head_dim, 128);
    }
}
