// sample: draws the next token from logits with temperature, top-k and top-p
// (nucleus) filtering, seeded; src/task/sample.rs defines the semantics.
//
// One block: a 4 x 8-bit radix select over order-preserving keys of the
// logits finds the k-th largest; the candidates (key above it, then ties by
// lowest index) are gathered into shared memory and bitonic-sorted by (key
// descending, index ascending); thread 0 then forms the probabilities,
// cuts the nucleus and inverts the cumulative sum at a uniform draw.
#pragma once
#include "../include/task.cuh"

struct SampleArgs {
    u64 logits;
    u64 params;
    u64 pos;
    u64 out;
    u32 vocab;
    u32 reserved;
};
MK_SIZE(SampleArgs, 40);
MK_OFFSET(SampleArgs, logits, 0);
MK_OFFSET(SampleArgs, params, 8);
MK_OFFSET(SampleArgs, pos, 16);
MK_OFFSET(SampleArgs, out, 24);
MK_OFFSET(SampleArgs, vocab, 32);
MK_OFFSET(SampleArgs, reserved, 36);

constexpr u32 SAMPLE_MAX_K = 1024;

// Order-preserving map of a float to an unsigned key (NaN sorts lowest).
__device__ __forceinline__ u32 sample_key(float f) {
    if (f != f) return 0u;
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A uniform draw in [0, 1) for (seed, position): SplitMix64, 24 bits.
__device__ __forceinline__ float sample_uniform(u64 seed, u32 pos) {
    u64 z = seed + (u64(pos) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(u32(z >> 40)) * (1.0f / 16777216.0f);
}

MK_COLD_TASK void task_sample(const Ctx& c) {
    const SampleArgs& a = task_args<SampleArgs>(c);
    const u32* prm = reinterpret_cast<const u32*>(a.params);
    const float temperature = __uint_as_float(prm[0]), top_p = __uint_as_float(prm[2]);
    const u32 k = min(min(prm[1] == 0 ? SAMPLE_MAX_K : prm[1], SAMPLE_MAX_K), a.vocab);
    const u64 seed = u64(prm[3]) | (u64(prm[4]) << 32);
    const float* logits = reinterpret_cast<const float*>(a.logits);
    u32* hist = reinterpret_cast<u32*>(c.scratch());                      // 256 bins
    u32* shared = hist + 256;                                        // [0] digit, [1] take, [2] count
    unsigned long long* cand = reinterpret_cast<unsigned long long*>(shared + 8);  // 2 * SAMPLE_MAX_K
    if (c.smem_bytes < (256 + 8) * 4 + 2 * SAMPLE_MAX_K * 8 + SAMPLE_MAX_K * 4) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, c.smem_bytes, 0);
        return;
    }
    // Radix select of the k-th largest key.
    u32 prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
        __syncthreads();
        for (u32 i = threadIdx.x; i < a.vocab; i += blockDim.x) {
            const u32 key = sample_key(logits[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 cum = 0, d = 255;
            for (;; --d) {
                if (cum + hist[d] >= remaining || d == 0) break;
                cum += hist[d];
            }
            shared[0] = d;
            shared[1] = remaining - cum;
        }
        __syncthreads();
        prefix |= shared[0] << shift;
        mask |= 255u << shift;
        remaining = shared[1];
        __syncthreads();
    }
    // Gather keys above the threshold and every tie (ties beyond the buffer are
    // dropped; the sort keeps the lowest indices among those gathered).
    if (threadIdx.x == 0) shared[2] = 0;
    __syncthreads();
    for (u32 i = threadIdx.x; i < a.vocab; i += blockDim.x) {
        const u32 key = sample_key(logits[i]);
        if (key >= prefix) {
            const u32 slot = atomicAdd(&shared[2], 1u);
            if (slot < 2 * SAMPLE_MAX_K) cand[slot] = (u64(~key) << 32) | i;
        }
    }
    __syncthreads();
    const u32 n = min(shared[2], 2 * SAMPLE_MAX_K);
    u32 len = 1;
    while (len < n) len *= 2;
    for (u32 i = n + threadIdx.x; i < len; i += blockDim.x) cand[i] = ~0ull;
    __syncthreads();
    // Bitonic sort, ascending: (key descending, index ascending).
    for (u32 size = 2; size <= len; size *= 2) {
        for (u32 stride = size / 2; stride > 0; stride /= 2) {
            for (u32 i = threadIdx.x; i < len; i += blockDim.x) {
                const u32 j = i ^ stride;
                if (j > i) {
                    const bool up = (i & size) == 0;
                    const unsigned long long x = cand[i], y = cand[j];
                    if ((x > y) == up) cand[i] = y, cand[j] = x;
                }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        const u32 take = min(k, n);
        const float top = logits[u32(cand[0])];
        // Probabilities relative to the top, then the nucleus and the draw.
        float total = 0.0f;
        u32 kept = take;
        float* p = reinterpret_cast<float*>(cand + len);  // reuse: after the sorted list
        for (u32 r = 0; r < take; ++r) {
            p[r] = expf((logits[u32(cand[r])] - top) / temperature);
            total += p[r];
        }
        float cum = 0.0f;
        for (u32 r = 0; r < take; ++r) {
            cum += p[r];
            if (cum >= top_p * total) {
                kept = r + 1;
                break;
            }
        }
        const float target = sample_uniform(seed, *reinterpret_cast<const u32*>(a.pos)) * cum;
        u32 pick = u32(cand[kept - 1]);
        float run = 0.0f;
        for (u32 r = 0; r < kept; ++r) {
            run += p[r];
            if (run > target) {
                pick = u32(cand[r]);
                break;
            }
        }
        reinterpret_cast<u32*>(a.out)[0] = pick;
    }
}
