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

// One warp per (row, head): lanes first turn the slices' (max, sum) into
// weights (kept in shared memory, up to COMBINE_MAX_CHUNKS per warp),
// then each lane accumulates its own head_dim / 32 consecutive columns over
// the slices with independent, vectorised loads.
constexpr u32 COMBINE_MAX_CHUNKS = 256;

// One warp: the weight of each slice, exp(max_k − max) where its sum is
// positive, into w[k]; returns the weighted total of the sums (every lane).
__device__ __forceinline__ float combine_weights(const AttentionCombineArgs& a, const float* p, float* w) {
    const u32 lane = threadIdx.x & 31, hd = a.head_dim, stride = hd + 2;
    const float ninf = -__int_as_float(0x7f800000);
    float mx = ninf;
    if (a.chunks <= 64) {
        // At most two slices a lane: both loaded at once and kept (the loop
        // below waits a round trip per slice and loads each twice).
        const u32 k1 = lane + 32;
        const bool h0 = lane < a.chunks, h1 = k1 < a.chunks;
        const float m0 = h0 ? p[lane * stride + hd] : ninf, s0 = h0 ? p[lane * stride + hd + 1] : 0.0f;
        const float m1 = h1 ? p[k1 * stride + hd] : ninf, s1 = h1 ? p[k1 * stride + hd + 1] : 0.0f;
        mx = fmaxf(fmaxf(mx, m0), m1);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
        // The same arithmetic, in the same order, as the loop.
        float total = 0.0f;
        if (h0) {
            const float wk = s0 > 0.0f ? __expf(m0 - mx) : 0.0f;
            w[lane] = wk;
            total = fmaf(wk, s0, total);
        }
        if (h1) {
            const float wk = s1 > 0.0f ? __expf(m1 - mx) : 0.0f;
            w[k1] = wk;
            total = fmaf(wk, s1, total);
        }
        return warp_sum(total);
    }
    for (u32 k = lane; k < a.chunks; k += 32) mx = fmaxf(mx, p[k * stride + hd]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    float total = 0.0f;
    for (u32 k = lane; k < a.chunks; k += 32) {
        const float s = p[k * stride + hd + 1];
        const float wk = s > 0.0f ? __expf(p[k * stride + hd] - mx) : 0.0f;
        w[k] = wk;
        total = fmaf(wk, s, total);
    }
    return warp_sum(total);
}

template <u32 E>
__device__ __forceinline__ void combine_pair(const AttentionCombineArgs& a, const float* p, float* w, u32 i, u32 h) {
    const u32 lane = threadIdx.x & 31, hd = a.head_dim, stride = hd + 2;
    const float total = combine_weights(a, p, w);
    __syncwarp();
    float acc[E];
#pragma unroll
    for (u32 e = 0; e < E; ++e) acc[e] = 0.0f;
#pragma unroll 8
    for (u32 k = 0; k < a.chunks; ++k) {
        const float wk = w[k];
        const float* src = p + k * stride + lane * E;
        if (E == 1) {
            acc[0] = fmaf(wk, src[0], acc[0]);
        } else {
#pragma unroll
            for (u32 e = 0; e + 1 < E; e += 2) {
                const float2 v = *reinterpret_cast<const float2*>(src + e);
                acc[e] = fmaf(wk, v.x, acc[e]);
                acc[e + 1] = fmaf(wk, v.y, acc[e + 1]);
            }
        }
    }
    const float inv = 1.0f / total;
#pragma unroll
    for (u32 e = 0; e < E; ++e) store_float(a.out, a.out_dtype, (u64(i) * a.heads + h) * hd + lane * E + e, acc[e] * inv);
    __syncwarp();
}

// Few pairs (decode): the whole block merges one pair at a time, each warp
// taking a share of the slices, so every load of a pair is in flight at once.
template <u32 E>
__device__ __forceinline__ void combine_pair_block(const AttentionCombineArgs& a, const float* p, float* w, float* red,
                                                   u32 i, u32 h) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, stride = hd + 2;
    // Each warp's first COMBINE_AHEAD slices of values are loaded before the
    // weights are waited for (they do not depend on them), so their round
    // trips overlap warp 0's and one another's; slices past them (more than
    // COMBINE_AHEAD * nwarps) load in the loop. The sums run in slice order
    // either way.
    constexpr u32 COMBINE_AHEAD = 4;
    float v[COMBINE_AHEAD][E];
#pragma unroll
    for (u32 j = 0; j < COMBINE_AHEAD; ++j) {
        const u32 k = min(warp + j * nwarps, a.chunks - 1);
#pragma unroll
        for (u32 e = 0; e < E; ++e) v[j][e] = p[k * stride + lane * E + e];
    }
    if (warp == 0) {
        const float total = combine_weights(a, p, w);
        if (lane == 0) w[COMBINE_MAX_CHUNKS] = total;
    }
    __syncthreads();
    float acc[E];
#pragma unroll
    for (u32 e = 0; e < E; ++e) acc[e] = 0.0f;
#pragma unroll
    for (u32 j = 0; j < COMBINE_AHEAD; ++j) {
        const u32 k = warp + j * nwarps;
        if (k < a.chunks) {
            const float wk = w[k];
#pragma unroll
            for (u32 e = 0; e < E; ++e) acc[e] = fmaf(wk, v[j][e], acc[e]);
        }
    }
    for (u32 k = warp + COMBINE_AHEAD * nwarps; k < a.chunks; k += nwarps) {
        const float wk = w[k];
        const float* src = p + k * stride + lane * E;
#pragma unroll
        for (u32 e = 0; e < E; ++e) acc[e] = fmaf(wk, src[e], acc[e]);
    }
#pragma unroll
    for (u32 e = 0; e < E; ++e) red[warp * hd + lane * E + e] = acc[e];
    __syncthreads();
    const float inv = 1.0f / w[COMBINE_MAX_CHUNKS];
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
        for (u32 k = 0; k < nwarps; ++k) sum += red[k * hd + d];
        store_float(a.out, a.out_dtype, (u64(i) * a.heads + h) * hd + d, sum * inv);
    }
    __syncthreads();
}

__device__ __forceinline__ void task_attention_combine(const Ctx& c) {
    const AttentionCombineArgs& a = task_args<AttentionCombineArgs>(c);
    const u32 warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, stride = hd + 2;
    const u32 need = (nwarps * COMBINE_MAX_CHUNKS + COMBINE_MAX_CHUNKS + 1 + nwarps * hd) * 4;
    if (a.chunks == 0 || a.chunks > COMBINE_MAX_CHUNKS || need > c.smem_bytes || (hd != 64 && hd != 128 && hd != 32)) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.chunks, COMBINE_MAX_CHUNKS);
        return;
    }
    const u32 pairs = a.m * a.nheads;
    float* scratch = reinterpret_cast<float*>(c.scratch());
    // Chosen by the heads of one row, whatever the rows: a row merges alike
    // alone (decode) or in a block (verify).
    if (a.nheads * 4 <= nwarps) {
        float* red = scratch + COMBINE_MAX_CHUNKS + 1;
        for (u32 pair = 0; pair < pairs; ++pair) {
            const u32 i = pair / a.nheads, h = a.head0 + pair % a.nheads;
            const float* p = reinterpret_cast<const float*>(a.partial) + (u64(i) * a.heads + h) * a.chunks * stride;
            if (hd == 128) combine_pair_block<4>(a, p, scratch, red, i, h);
            else if (hd == 64) combine_pair_block<2>(a, p, scratch, red, i, h);
            else combine_pair_block<1>(a, p, scratch, red, i, h);
        }
        return;
    }
    float* w = scratch + warp * COMBINE_MAX_CHUNKS;
    for (u32 pair = warp; pair < pairs; pair += nwarps) {
        const u32 i = pair / a.nheads, h = a.head0 + pair % a.nheads;
        const float* p = reinterpret_cast<const float*>(a.partial) + (u64(i) * a.heads + h) * a.chunks * stride;
        if (hd == 128) combine_pair<4>(a, p, w, i, h);
        else if (hd == 64) combine_pair<2>(a, p, w, i, h);
        else combine_pair<1>(a, p, w, i, h);
    }
}
