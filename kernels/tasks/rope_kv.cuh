// rope_kv: per-head q/k RMSNorm, RoPE (rotate_half convention, angle in f32)
// and KV-cache append for m rows at positions pos[0] + i; src/task/rope_kv.rs.
// One warp per (row, head).
#pragma once
#include "../include/task.cuh"

struct RopeKvArgs {
    u64 qkv;
    u64 norms;
    u64 cache;
    u64 pos;
    u32 m;
    u32 heads;
    u32 kv_heads;
    u32 head_dim;
    u32 max_seq;
    u32 eps;
    u32 theta;
    u32 qkv_dtype;
    u32 norm_dtype;
    u32 cache_dtype;
    u32 job0;
    u32 jobs;
};
MK_SIZE(RopeKvArgs, 80);
MK_OFFSET(RopeKvArgs, qkv, 0);
MK_OFFSET(RopeKvArgs, norms, 8);
MK_OFFSET(RopeKvArgs, cache, 16);
MK_OFFSET(RopeKvArgs, pos, 24);
MK_OFFSET(RopeKvArgs, m, 32);
MK_OFFSET(RopeKvArgs, heads, 36);
MK_OFFSET(RopeKvArgs, kv_heads, 40);
MK_OFFSET(RopeKvArgs, head_dim, 44);
MK_OFFSET(RopeKvArgs, max_seq, 48);
MK_OFFSET(RopeKvArgs, eps, 52);
MK_OFFSET(RopeKvArgs, theta, 56);
MK_OFFSET(RopeKvArgs, qkv_dtype, 60);
MK_OFFSET(RopeKvArgs, norm_dtype, 64);
MK_OFFSET(RopeKvArgs, cache_dtype, 68);
MK_OFFSET(RopeKvArgs, job0, 72);
MK_OFFSET(RopeKvArgs, jobs, 76);

MK_COLD_TASK void task_rope_kv(const Ctx& c) {
    const RopeKvArgs& a = task_args<RopeKvArgs>(c);
    const u32 pos0 = *reinterpret_cast<const u32*>(a.pos);
    if (u64(pos0) + a.m > a.max_seq) {
        if (threadIdx.x == 0) task_fault(c, FAULT_OUT_OF_RANGE, u64(pos0) + a.m - 1, a.max_seq);
        return;
    }
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, half = hd / 2, per_row = a.heads + 2 * a.kv_heads;
    const float eps = __uint_as_float(a.eps), theta = __uint_as_float(a.theta);
    // Inverse frequencies theta^(-2j/d), once per task (the f64 power is slow).
    float* inv_freq = reinterpret_cast<float*>(c.scratch());
    for (u32 j = threadIdx.x; j < half; j += blockDim.x) {
        inv_freq[j] = float(1.0 / pow(double(theta), 2.0 * double(j) / double(hd)));
    }
    __syncthreads();
    const u32 job_end = min(a.job0 + a.jobs, a.m * per_row);
    for (u32 job = a.job0 + warp; job < job_end; job += nwarps) {
        const u32 i = job / per_row, h = job % per_row, p = pos0 + i;
        const u64 src = (u64(i) * per_row + h) * hd;
        if (h >= a.heads + a.kv_heads) {  // v: copy into the cache
            const u64 dst = ((u64(a.kv_heads) + (h - a.heads - a.kv_heads)) * a.max_seq + p) * hd;
            for (u32 j = lane; j < hd; j += 32) store_float(a.cache, a.cache_dtype, dst + j, load_float(a.qkv, a.qkv_dtype, src + j));
            continue;
        }
        const bool is_q = h < a.heads;
        const u64 w0 = is_q ? 0 : hd;
        float ss = 0.0f;
        for (u32 j = lane; j < hd; j += 32) {
            const float v = load_float(a.qkv, a.qkv_dtype, src + j);
            ss = fmaf(v, v, ss);
        }
        const float inv = rsqrtf(warp_sum(ss) / float(hd) + eps);
        const u64 dst = is_q ? src : (u64(h - a.heads) * a.max_seq + p) * hd;
        const u64 out = is_q ? a.qkv : a.cache;
        const u32 out_dtype = is_q ? a.qkv_dtype : a.cache_dtype;
        for (u32 j = lane; j < half; j += 32) {
            const float x1 = load_float(a.qkv, a.qkv_dtype, src + j) * inv * load_float(a.norms, a.norm_dtype, w0 + j);
            const float x2 =
                load_float(a.qkv, a.qkv_dtype, src + j + half) * inv * load_float(a.norms, a.norm_dtype, w0 + j + half);
            const float freq = inv_freq[j];
            float s, co;
            sincosf(float(p) * freq, &s, &co);
            store_float(out, out_dtype, dst + j, x1 * co - x2 * s);
            store_float(out, out_dtype, dst + j + half, x2 * co + x1 * s);
        }
    }
}
