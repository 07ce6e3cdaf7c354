// attention: one KV head, one run-time slice of the cached keys, every query
// row and head of the group (the "pairs"); writes (o, max, sum) partials with
// an online softmax; src/task/attention.rs.
//
// Fast path (bf16 q and cache, head_dim 64 or 128): the slice is processed in
// tiles of 64 keys. The block copies the pairs' q and a tile's K and V into
// shared memory (cp.async, 16 bytes per thread), computes the (pair, key)
// scores on tensor cores (16 pairs x 8 keys per warp job), updates each
// pair's running max and sum (one warp per pair), then accumulates P·V on
// tensor cores too (16 pairs x 16 columns per warp job).
// Other geometries use the generic path: one warp per pair, one key at a time.
//
// With a rope table (AttentionArgs::rope, fast path only) the task also does
// the rope_kv task's work for what it reads: each pair's q is normalised and
// rotated into shared memory, and each key of the block that its tiles cover
// is normalised, rotated and appended to the cache with its value before any
// tile loads it (a key covered by several tasks is written alike by each).
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
    u32 bidirectional;
    u64 rope;
};
MK_SIZE(AttentionArgs, 88);
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
MK_OFFSET(AttentionArgs, bidirectional, 76);
MK_OFFSET(AttentionArgs, rope, 80);

constexpr u32 ATTN_TILE = 64;

// Keys a row attends: 0 .. len (causal: its own position and before;
// bidirectional: the whole block).
__device__ __forceinline__ u32 attention_row_len(const AttentionArgs& a, u32 pos0, u32 i) {
    return pos0 + (a.bidirectional ? a.m : i + 1);
}

// Keys per slice step: a row's slices are multiples of it.
constexpr u32 ATTN_SLICE_KEYS = 16;

// Keys [lo, hi) of this task's slice for a row attending `len` keys, and the
// slice length `per`: ceil(len / 16 / chunks) steps of 16 keys per slice. A
// row's slices depend on its own length alone; the fast path also anchors its
// tiles at the slice start, so a row computes bit for bit alike alone (decode)
// or inside a block (verify).
__device__ __forceinline__ u32 attention_slice(const AttentionArgs& a, u32 len, u32& lo, u32& hi) {
    const u32 steps = (len + ATTN_SLICE_KEYS - 1) / ATTN_SLICE_KEYS;
    const u32 per = (steps + a.chunks - 1) / a.chunks * ATTN_SLICE_KEYS;
    lo = min(a.chunk * per, len);
    hi = min(lo + per, len);
    return per;
}

// Where the partial (hd values, then max and sum) of query row i and head h
// of this task's slice goes.
__device__ __forceinline__ float* attention_partial(const AttentionArgs& a, u32 i, u32 h, u32 hd) {
    return reinterpret_cast<float*>(a.partial) + ((u64(i) * a.heads + h) * a.chunks + a.chunk) * (hd + 2);
}

template <int E>
__device__ __forceinline__ void attention_rows(const AttentionArgs& a, u32 pos0) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 hd = a.head_dim, group = a.heads / a.kv_heads, width = (a.heads + 2 * a.kv_heads) * hd;
    const float scale = __uint_as_float(a.scale);
    const u64 kbase = (u64(a.kv_head) * a.max_seq) * hd;
    const u64 vbase = (u64(a.kv_heads + a.kv_head) * a.max_seq) * hd;
    for (u32 pair = warp; pair < a.m * group; pair += nwarps) {
        const u32 i = pair / group, h = a.kv_head * group + pair % group;
        u32 lo, end;
        attention_slice(a, attention_row_len(a, pos0, i), lo, end);
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
        float* out = attention_partial(a, i, h, hd);
#pragma unroll
        for (int e = 0; e < E; ++e) out[lane * E + e] = o[e];
        if (lane == 0) out[hd] = mx, out[hd + 1] = sum;
    }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned dst = unsigned(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_prev() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Row strides in shared memory, padded so that the tensor-core fragment
// loads meet no bank conflicts: a q, K or V row is hd / 2 words plus 4 (the
// eight rows g of a fragment then start in banks 4g apart, and the four
// lanes of a row take the four words between), a score row ATTN_TILE floats
// plus 8 (a half-warp's float2 loads of eight rows fall in distinct banks).
// Unpadded, every fragment load was an 8-way conflict: all eight rows began in
// the same bank.
__host__ __device__ constexpr u32 attention_row_words(u32 hd) { return hd / 2 + 4; }
constexpr u32 ATTN_SCORE_STRIDE = ATTN_TILE + 8;

// Tile buffer modes (attention_tile_buffers): `bufs` 1 or 2 hold that many
// K/V tiles; ATTN_SPLIT_BUFS holds two K tiles and one V tile (the next
// tile's keys in flight while this tile's values are read, its values loaded
// once they are not).
constexpr u32 ATTN_SPLIT_BUFS = 3;

// How attention_tile_buffers asks for split buffers: one buffer of this
// many rows (K and V each), the room of two K tiles and one V tile.
constexpr u32 ATTN_SPLIT_TK = 3 * ATTN_TILE / 2;

// Shared memory the fast path needs for `pairs` pairs: q, the K/V tile
// buffers of mode `bufs` with `tk` rows each, scores, per pair the running
// max, sum and correction, and per row (`rows`) its slice and tile grid
// (src/task/attention.rs mirrors the layout of two full buffers, the most a
// block needs).
__host__ __device__ constexpr u32 attention_smem_bytes(u32 pairs, u32 rows, u32 hd, u32 tk, u32 bufs) {
    return pairs * attention_row_words(hd) * 4 + bufs * 2 * tk * attention_row_words(hd) * 4 +
           pairs * ATTN_SCORE_STRIDE * 4 + 3 * pairs * 4 + 3 * rows * 4;
}

// Issues the cp.async copies of keys t0 .. t0 + n into one tile buffer and
// zeros the value rows n .. up to the next multiple of 16 (P·V multiplies
// whole 16-key steps; their weights are zero, and zero times a stale word
// could be NaN).
// Row `skip` (if below n) is left alone: its key is being appended and
// written into the tile directly (attention_append_keys).
// KV: 3 copies both, 1 the keys alone, 2 the values alone (and their zeros).
template <u32 HD, u32 KV = 3>
__device__ __forceinline__ void attention_load_tile(u32* k_s, u32* v_s, const char* kbase, const char* vbase, u32 t0, u32 n,
                                                    u32 skip = ~0u) {
    constexpr u32 W = HD / 2, WS = attention_row_words(HD);
    const u32 per = n * (HD / 8);  // 16-byte pieces of K (then as many of V)
    const u32 first = KV & 1u ? 0u : per, end = KV & 2u ? 2 * per : per;
    for (u32 ch = first + threadIdx.x; ch < end; ch += BLOCK_THREADS) {
        const bool which = ch >= per;
        const u32 r = which ? ch - per : ch, j = r / (HD / 8), part = r % (HD / 8);
        if (j == skip) continue;
        const char* src = (which ? vbase : kbase) + u64(t0 + j) * HD * 2 + part * 16;
        cp_async16((which ? v_s : k_s) + j * WS + part * 4, src);
    }
    if (KV & 2u) {
        const u32 pad = ((n + 15) & ~15u) - n;
        for (u32 w = threadIdx.x; w < pad * W; w += BLOCK_THREADS) v_s[(n + w / W) * WS + w % W] = 0u;
    }
}

// The K/V tile buffers of the block's rows i0 .. i0 + rows, if the pairs
// fit `smem` bytes with them: two of ATTN_TILE rows (the next tile in flight
// while one is computed) where they fit; else, for rows that share one
// slice length of at most ATTN_TILE keys (one tile), one buffer of max(32,
// that length) rows (the scores read K rows up to ATTN_TILE, masked past the
// tile: they stay inside its K and V rows); else, for a whole block of 2
// to 32 rows, two K tiles and one V tile (ATTN_SPLIT_BUFS, asked for as one
// buffer of ATTN_SPLIT_TK rows). A decode step's slices are 32
// keys at 1024 positions, so an 8-row block fits one sub-block that way
// (two buffers left it six rows: BENCHMARKS.md, 32nd round), and the split
// buffers keep an 8-row block in one sub-block over longer slices. False if
// none fits.
__device__ __forceinline__ bool attention_tile_buffers(const AttentionArgs& a, u32 pos0, u32 i0, u32 rows, u32 pairs,
                                                       u32 hd, u32 smem, u32& tk, u32& bufs) {
    tk = ATTN_TILE, bufs = 2;
    if (attention_smem_bytes(pairs, rows, hd, ATTN_TILE, 2) <= smem) return true;
    u32 l, h;
    // Slice lengths do not fall as rows attend more keys.
    const u32 p0 = attention_slice(a, attention_row_len(a, pos0, i0), l, h);
    const u32 p1 = attention_slice(a, attention_row_len(a, pos0, i0 + rows - 1), l, h);
    // Past one tile, blocks take split buffers: one "buffer" of 1.5 tiles'
    // K and V rows (ATTN_SPLIT_TK), as much as two K tiles and one V tile.
    const bool one = p0 == p1 && p1 <= ATTN_TILE;
    if (!one && (i0 != 0 || rows != a.m || rows < 2 || rows > 32)) return false;
    tk = one ? max(p1, 32u) : ATTN_SPLIT_TK, bufs = 1;
    return attention_smem_bytes(pairs, rows, hd, tk, bufs) <= smem;
}

// P·V jobs a warp keeps across the tiles (accumulators in registers): a job
// is 16 pairs x 16 columns, so a sub-block holds at most
// 16 * ATTN_JOBS_PER_WARP * warps / (HD / 16) pairs.
constexpr u32 ATTN_JOBS_PER_WARP = 4;

// Pairs whose softmax updates a warp interleaves.
constexpr u32 ATTN_SOFTMAX_BATCH = 4;

__host__ __device__ constexpr u32 attention_max_pairs(u32 hd) {
    return 16 * ATTN_JOBS_PER_WARP * (BLOCK_THREADS / 32) / (hd / 16);
}

// f32 weights (x0 of key k, x1 of key k + 1) as the bf16 pair nearest them
// and the bf16 pair nearest what that leaves: hi + lo carries 16 significant
// bits, so P·V on tensor cores keeps f32-like accuracy (bf16 weights alone
// would move results by about 1e-3).
__device__ __forceinline__ void attention_split_pair(float x0, float x1, u32& hi, u32& lo) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(x1), "f"(x0));
    const float r0 = x0 - __uint_as_float(hi << 16), r1 = x1 - __uint_as_float(hi & 0xFFFF0000u);
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(r1), "f"(r0));
}

// The rope table (AttentionArgs::rope), f32: q_norm [hd], k_norm [hd],
// theta^(-2j / hd) [hd / 2], eps. A lane works on elements lane + 32 t of a
// head; these are its weights (q or k) and frequencies.
template <u32 HD>
struct RopeLane {
    float w[HD / 32];
    float freq[HD / 64];
    float eps;
    __device__ __forceinline__ RopeLane(const float* table, bool is_k) {
        const u32 lane = threadIdx.x & 31;
#pragma unroll
        for (u32 t = 0; t < HD / 32; ++t) w[t] = table[(is_k ? HD : 0) + lane + 32 * t];
#pragma unroll
        for (u32 t = 0; t < HD / 64; ++t) freq[t] = table[2 * HD + lane + 32 * t];
        eps = table[2 * HD + HD / 2];
    }

    // The lane's rotation angles' sines and cosines at position p (heads of
    // one row share them).
    struct Angles {
        float s[HD / 64], c[HD / 64];
    };
    __device__ __forceinline__ Angles angles(u32 p) const {
        Angles r;
#pragma unroll
        for (u32 t = 0; t < HD / 64; ++t) sincosf(float(p) * freq[t], &r.s[t], &r.c[t]);
        return r;
    }

    // The lane's share of the sum of squares of a head's values `x`.
    __device__ __forceinline__ static float sum_squares(const float (&x)[HD / 32]) {
        float ss = 0.0f;
#pragma unroll
        for (u32 t = 0; t < HD / 32; ++t) ss = fmaf(x[t], x[t], ss);
        return ss;
    }

    // The lane's values `x` of a head whose sum of squares over the warp is
    // `ss`, normalised and rotated by `an` (Hugging Face's rotate_half, the
    // rope_kv task's arithmetic), into `dst` (bf16). `dst2`, if not null,
    // gets the same values (a row of a tile in shared memory).
    __device__ __forceinline__ void rotate(const float (&x)[HD / 32], float ss, const Angles& an, u16* dst,
                                           u16* dst2 = nullptr) const {
        constexpr u32 T = HD / 32, HALF = HD / 2;
        const u32 lane = threadIdx.x & 31;
        const float inv = rsqrtf(ss / float(HD) + eps);
#pragma unroll
        for (u32 t = 0; t < T / 2; ++t) {
            const u32 j = lane + 32 * t;
            const float x1 = x[t] * inv * w[t], x2 = x[t + T / 2] * inv * w[t + T / 2];
            const float s = an.s[t], co = an.c[t];
            const u16 r1 = f32_to_bf16(x1 * co - x2 * s), r2 = f32_to_bf16(x2 * co + x1 * s);
            dst[j] = r1, dst[j + HALF] = r2;
            if (dst2) dst2[j] = r1, dst2[j + HALF] = r2;
        }
    }

    // One warp: a head at position p, as rotate.
    __device__ __forceinline__ void apply(const float (&x)[HD / 32], u32 p, u16* dst, u16* dst2 = nullptr) const {
        rotate(x, warp_sum(sum_squares(x)), angles(p), dst, dst2);
    }
};

// Division by a run-time divisor d >= 1 (a group of heads, a count of
// jobs) of numbers x with x * d < 2^32 (pairs and jobs of a block are a few
// hundred): one multiply-high by ceil(2^32 / d), exact there.
struct DivBy {
    u32 d, m;
    __device__ __forceinline__ explicit DivBy(u32 d_) : d(d_), m(d_ > 1 ? 0xFFFFFFFFu / d_ + 1u : 0u) {}
    __device__ __forceinline__ u32 div(u32 x) const { return d > 1 ? __umulhi(x, m) : x; }
    __device__ __forceinline__ u32 mod(u32 x) const { return x - div(x) * d; }
};

// The lane's elements of a bf16 head.
template <u32 HD>
__device__ __forceinline__ void rope_load(const u16* src, float (&x)[HD / 32]) {
#pragma unroll
    for (u32 t = 0; t < HD / 32; ++t) x[t] = bf16_to_f32(src[(threadIdx.x & 31) + 32 * t]);
}

// The keys of the block (positions pos0 .. pos0 + m) inside the grids' key
// ranges (bit k of the mask: key pos0 + k).
__device__ __forceinline__ u32 attention_cover(const AttentionArgs& a, u32 pos0, const u32 (&glo)[2], const u32 (&ghi)[2]) {
    u32 cover = 0;
    for (u32 k = 0; k < a.m; ++k) {
        const u32 p = pos0 + k;
        if ((p >= glo[0] && p < ghi[0]) || (p >= glo[1] && p < ghi[1])) cover |= 1u << k;
    }
    return cover;
}

// The keys in `cover`: normalised and rotated into the cache, their values
// copied beside them. With `k_row` and `v_row` (a single key), its rotated
// key and its value also go to those rows of a tile in shared memory.
template <u32 HD>
__device__ __forceinline__ void attention_append_keys(const AttentionArgs& a, u32 pos0, u32 cover, u16* k_row = nullptr,
                                                      u16* v_row = nullptr) {
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = BLOCK_THREADS / 32;
    const u32 width = (a.heads + 2 * a.kv_heads) * HD;
    const u16* qkv = reinterpret_cast<const u16*>(a.qkv);
    u16* cache = reinterpret_cast<u16*>(a.cache);
    // Two jobs per covered key: its k (rotated), then its v (copied).
    for (u32 job = warp; job < 2 * __popc(cover); job += nwarps) {
        u32 k = 0;
        for (u32 left = job / 2, m = cover;; m &= m - 1) {
            k = __ffs(m) - 1;
            if (left-- == 0) break;
        }
        const u32 p = pos0 + k;
        if (job % 2 == 0) {
            float x[HD / 32];
            rope_load<HD>(qkv + u64(k) * width + u64(a.heads + a.kv_head) * HD, x);
            RopeLane<HD>(reinterpret_cast<const float*>(a.rope), true)
                .apply(x, p, cache + (u64(a.kv_head) * a.max_seq + p) * HD, k_row);
        } else {
            const u16* v = qkv + u64(k) * width + u64(a.heads + a.kv_heads + a.kv_head) * HD;
            u16* dst = cache + (u64(a.kv_heads + a.kv_head) * a.max_seq + p) * HD;
            for (u32 j = lane; j < HD; j += 32) {
                const u16 e = v[j];
                dst[j] = e;
                if (v_row) v_row[j] = e;
            }
        }
    }
}

// The online softmax update of one tile (attention_tiled): scores p_s of
// `pairs` pairs, keys n16 and past them masked; the running max m_s and sum
// l_s, the tile's correction f_s. One warp per pair, B pairs of a warp (p,
// p + warps, ...) at a time with their reductions interleaved; a pair's
// arithmetic is the same for every B.
template <u32 B>
__device__ __forceinline__ void attention_softmax(float* p_s, float* m_s, float* l_s, float* f_s, u32 pairs,
                                                  u32 n16) {
    constexpr u32 PS = ATTN_SCORE_STRIDE;
    const float neg_inf = -__int_as_float(0x7f800000);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = BLOCK_THREADS / 32;
    const bool in0 = lane < n16, in1 = lane + 32 < n16;
    for (u32 pb = warp; pb < pairs; pb += B * nwarps) {
        float s0[B], s1[B], mx[B];
#pragma unroll
        for (u32 b = 0; b < B; ++b) {
            const float* row = p_s + min(pb + b * nwarps, pairs - 1) * PS;
            s0[b] = in0 ? row[lane] : neg_inf, s1[b] = in1 ? row[lane + 32] : neg_inf;
            mx[b] = fmaxf(s0[b], s1[b]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (u32 b = 0; b < B; ++b) mx[b] = fmaxf(mx[b], __shfl_xor_sync(0xFFFFFFFFu, mx[b], off));
        }
        float sum[B], nm[B], old[B];
#pragma unroll
        for (u32 b = 0; b < B; ++b) {
            const u32 p = pb + b * nwarps;
            old[b] = m_s[min(p, pairs - 1)], nm[b] = fmaxf(old[b], mx[b]);
            const bool none = nm[b] == neg_inf;
            const float e0 = none ? 0.0f : __expf(s0[b] - nm[b]), e1 = none ? 0.0f : __expf(s1[b] - nm[b]);
            if (p < pairs) {
                if (in0) p_s[p * PS + lane] = e0;
                if (in1) p_s[p * PS + lane + 32] = e1;
            }
            sum[b] = e0 + e1;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (u32 b = 0; b < B; ++b) sum[b] += __shfl_xor_sync(0xFFFFFFFFu, sum[b], off);
        }
#pragma unroll
        for (u32 b = 0; b < B; ++b) {
            const u32 p = pb + b * nwarps;
            if (lane == 0 && p < pairs) {
                // Exactly 1 when the maximum holds (a tile wholly outside a
                // row's slice then changes nothing, bit for bit).
                const float corr = (nm[b] == neg_inf || old[b] == nm[b]) ? 1.0f : __expf(old[b] - nm[b]);
                f_s[p] = corr;
                l_s[p] = fmaf(l_s[p], corr, sum[b]);
                m_s[p] = nm[b];
            }
        }
    }
}

// Tensor cores for both products. Scores: a warp job is 16 pairs x 8 keys
// over the head's dimensions (mma.m16n8k16, A = q, B = k). P·V: a warp job is
// 16 pairs x 16 columns over a tile's keys (A = the weights split into two
// bf16 parts, B = v), its accumulators kept in registers across the tiles and
// scaled by each pair's correction per tile. Every output of a pair depends
// on its own q, weights and the tile's keys and values alone, never on the
// other pairs of its 16-pair tile, so a row computes bit for bit alike alone
// (decode) or in a block (verify). Tiles of ATTN_TILE keys start at the slice
// start. Rows of a block share their slice length but where a block straddles
// a change of it (at most once: 16 rows span fewer than 16 * chunks keys):
// each of the two grids walks its own tiles, and a row attends only in its
// own grid's tiles. Tiles are double buffered, tile t + 1 in flight while
// tile t is computed, unless the block has one tile (`bufs` buffers of `tk`
// rows: attention_tile_buffers). The block's rows i0 .. i0 + rows are
// computed (a row's result is the same in any such sub-block). Out of line,
// with registers of its own. BLOCK (2 to 32 rows): the rows' slices found
// by a warp's lanes at once, a warp's q rotations over consecutive pairs
// (one row's heads share their angles), score jobs only over the keys P·V
// reads and the softmax of ATTN_SOFTMAX_BATCH pairs of a warp at a time;
// otherwise (a decode step's single row) the shorter code of one thread's
// loop and one pair at a time. The same arithmetic, the same bits.
template <u32 HD, bool BLOCK, bool SPLIT = false>
__device__ __noinline__ void attention_tiled(const Ctx& c, const AttentionArgs& a, u32 pos0, u32 i0, u32 rows, u32 tk,
                                             u32 bufs) {
    constexpr u32 W = attention_row_words(HD);  // 32-bit words (bf16 pairs) per row, padded
    constexpr u32 PS = ATTN_SCORE_STRIDE;       // floats per score row
    constexpr u32 JPT = HD / 16;                // P·V jobs per 16-pair tile
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = BLOCK_THREADS / 32;
    const u32 g = lane >> 2, cc = lane & 3;
    const u32 group = a.heads / a.kv_heads, pairs = rows * group, width = (a.heads + 2 * a.kv_heads) * HD;
    const float scale = __uint_as_float(a.scale);
    u32* q_s = reinterpret_cast<u32*>(c.scratch());  // [pairs][W]
    u32* kv_s = q_s + pairs * W;  // [bufs][K, V][tk][W]; SPLIT: [K, K, V][tk][W]
    float* p_s = reinterpret_cast<float*>(kv_s + (SPLIT ? 3 * ATTN_TILE : bufs * 2 * tk) * W);  // [pairs][PS]
    // Split buffers (ATTN_SPLIT_BUFS): blocks only, a lone row always fits two full ones.
    constexpr bool split = BLOCK && SPLIT;
    if (split) tk = ATTN_TILE;  // a constant for the split instance
    u32* const v_split = kv_s + 2 * tk * W;
    float* m_s = p_s + pairs * PS;                                    // running max
    float* l_s = m_s + pairs;                                         // running sum
    float* f_s = l_s + pairs;                                         // this tile's correction
    u32* lo_s = reinterpret_cast<u32*>(f_s + pairs);                  // each row's slice
    u32* hi_s = lo_s + rows;
    u32* grid_s = hi_s + rows;  // each row's tile grid: 0, or 1 past a change of slice length
    const DivBy gdiv(group);
    // The pair's row and head within the group.
    auto prow = [&](u32 p) { return BLOCK ? gdiv.div(p) : p / group; };
    auto phead = [&](u32 p) { return BLOCK ? gdiv.mod(p) : p % group; };
    // The grids' key ranges (every thread alike): the first key of the first
    // row and the end of the last row of each grid whose slices are not
    // empty. BLOCK: every warp, lane i computing row i's slice.
    u32 glo[2] = {0, 0}, ghi[2] = {0, 0};
    if (BLOCK) {
        u32 l = 0, h = 0, per = 0;
        if (lane < rows) per = attention_slice(a, attention_row_len(a, pos0, i0 + lane), l, h);
        const u32 gr = per != __shfl_sync(0xFFFFFFFFu, per, 0);
        if (warp == 0 && lane < rows) lo_s[lane] = l, hi_s[lane] = h, grid_s[lane] = gr;
#pragma unroll
        for (u32 k = 0; k < 2; ++k) {
            const u32 live = __ballot_sync(0xFFFFFFFFu, lane < rows && l < h && gr == k);
            const u32 first = __shfl_sync(0xFFFFFFFFu, l, live ? __ffs(live) - 1 : 0);
            const u32 last = __shfl_sync(0xFFFFFFFFu, h, live ? 31 - __clz(live) : 0);
            glo[k] = live ? first : 0u, ghi[k] = live ? last : 0u;
        }
    } else {
        u32 per0 = 0;
        for (u32 i = 0; i < rows; ++i) {
            u32 l, h;
            const u32 per = attention_slice(a, attention_row_len(a, pos0, i0 + i), l, h);
            if (i == 0) per0 = per;
            const u32 gr = per != per0;
            if (tid == 0) lo_s[i] = l, hi_s[i] = h, grid_s[i] = gr;
            if (l < h) {
                if (glo[gr] == ghi[gr]) glo[gr] = l;
                ghi[gr] = h;
            }
        }
    }
    const u32 gt0 = (ghi[0] - glo[0] + ATTN_TILE - 1) / ATTN_TILE, ntiles = gt0 + (ghi[1] - glo[1] + ATTN_TILE - 1) / ATTN_TILE;
    if (ntiles == 0) {
        // A slice no row reaches (a context shorter than 16 keys a slice
        // leaves the last ones empty), and so no key of the block to append:
        // the partials of no keys (what the tile loop leaves), without q.
        for (u32 k = tid; k < pairs * (HD + 2); k += BLOCK_THREADS) {
            const u32 p = k / (HD + 2), e = k % (HD + 2);
            const u32 i = i0 + prow(p), h = a.kv_head * group + phead(p);
            attention_partial(a, i, h, HD)[e] = e == HD ? -__int_as_float(0x7f800000) : 0.0f;
        }
        return;
    }
    // Tile k: its grid, first key and key count.
    auto tile = [&](u32 k, u32& gr, u32& t0, u32& n) {
        gr = k >= gt0;
        t0 = (gr ? glo[1] : glo[0]) + (k - (gr ? gt0 : 0)) * ATTN_TILE;
        n = min(ATTN_TILE, (gr ? ghi[1] : ghi[0]) - t0);
    };
    const char* kbase = reinterpret_cast<const char*>(a.cache) + (u64(a.kv_head) * a.max_seq) * HD * 2;
    const char* vbase = reinterpret_cast<const char*>(a.cache) + (u64(a.kv_heads + a.kv_head) * a.max_seq) * HD * 2;
    // q of every pair: row i0 + p / group, head kv_head * group + p % group.
    for (u32 ch = tid; ch < pairs * (HD / 8); ch += BLOCK_THREADS) {
        const u32 p = ch / (HD / 8), part = ch % (HD / 8);
        const u32 i = i0 + prow(p), h = a.kv_head * group + phead(p);
        cp_async16(q_s + p * W + part * 4, reinterpret_cast<const char*>(a.qkv) + (u64(i) * width + u64(h) * HD) * 2 + part * 16);
    }
    MK_PHASE(1);
    const float* rope = reinterpret_cast<const float*>(a.rope);
    const u32 cover = rope ? attention_cover(a, pos0, glo, ghi) : 0u;
    u32 gr0 = 0, t00 = 0, n0 = 0;
    if (ntiles > 0) tile(0, gr0, t00, n0);
    // A single appended key inside the first tile (a decode step's, in its
    // last slice) goes into the tile straight from the append, so the tile's
    // other keys load meanwhile; otherwise the tiles load after the appended
    // keys reach the cache.
    const bool direct = cover == 1u && ntiles > 0 && pos0 >= t00 && pos0 < t00 + n0;
    if (rope) {
        cp_async_commit();  // q on its own: it is rotated before the first tile lands
        if (direct) {
            u32* v0 = split ? v_split : kv_s + tk * W;
            attention_load_tile<HD>(kv_s, v0, kbase, vbase, t00, n0, pos0 - t00);
            attention_append_keys<HD>(a, pos0, cover, reinterpret_cast<u16*>(kv_s + (pos0 - t00) * W),
                                      reinterpret_cast<u16*>(v0 + (pos0 - t00) * W));
        } else if (cover) {
            attention_append_keys<HD>(a, pos0, cover);
            __syncthreads();
        }
    }
    MK_PHASE(2);
    if (ntiles > 0 && !direct) attention_load_tile<HD>(kv_s, split ? v_split : kv_s + tk * W, kbase, vbase, t00, n0);
    cp_async_commit();
    if (rope) {
        // Each pair's q normalised and rotated in place while the first tile
        // is in flight (the tile loop's first barrier publishes them).
        const RopeLane<HD> rl(rope, false);
        cp_async_wait_prev();
        __syncthreads();
        u16* qh = reinterpret_cast<u16*>(q_s);
        if (BLOCK) {
            // A warp takes consecutive pairs, so that the heads of a row
            // share its angles.
            const u32 per_warp = (pairs + nwarps - 1) / nwarps, p1 = min(pairs, (warp + 1) * per_warp);
            u32 row = ~0u;
            typename RopeLane<HD>::Angles an;
            for (u32 p = warp * per_warp; p < p1; ++p) {
                float x[HD / 32];
                rope_load<HD>(qh + p * 2 * W, x);
                const u32 r = prow(p);
                if (r != row) an = rl.angles(pos0 + i0 + r), row = r;
                rl.rotate(x, warp_sum(RopeLane<HD>::sum_squares(x)), an, qh + p * 2 * W);
            }
        } else {
            for (u32 p = warp; p < pairs; p += nwarps) {
                float x[HD / 32];
                rope_load<HD>(qh + p * 2 * W, x);
                rl.apply(x, pos0 + i0 + prow(p), qh + p * 2 * W);
            }
        }
    }
    MK_PHASE(3);
    for (u32 p = tid; p < pairs; p += BLOCK_THREADS) m_s[p] = -__int_as_float(0x7f800000), l_s[p] = 0.0f;
    const u32 pv_jobs = (pairs + 15) / 16 * JPT;
    float acc[ATTN_JOBS_PER_WARP][2][4];
#pragma unroll
    for (u32 j = 0; j < ATTN_JOBS_PER_WARP; ++j) {
#pragma unroll
        for (u32 t = 0; t < 2; ++t) acc[j][t][0] = acc[j][t][1] = acc[j][t][2] = acc[j][t][3] = 0.0f;
    }
    u32 buf = 0;
    for (u32 k = 0; k < ntiles; ++k, buf ^= 1) {
        u32 grid, t0, n;
        tile(k, grid, t0, n);
        if (k + 1 < ntiles) {
            u32 g1, t1, n1;
            tile(k + 1, g1, t1, n1);
            if (split) {
                // The next tile's keys; its values follow this tile's P·V.
                attention_load_tile<HD, 1>(kv_s + (buf ^ 1) * tk * W, nullptr, kbase, vbase, t1, n1);
            } else {
                u32* nk = kv_s + (buf ^ 1) * 2 * tk * W;  // two buffers: tk is ATTN_TILE
                attention_load_tile<HD>(nk, nk + tk * W, kbase, vbase, t1, n1);
            }
        }
        cp_async_commit();
        // Split buffers past the first tile: groups in flight are this
        // tile's keys, its values and the next tile's keys; the keys are
        // needed now, the values before P·V.
        if (split && k > 0) asm volatile("cp.async.wait_group 2;" ::: "memory");
        else cp_async_wait_prev();
        __syncthreads();
        if (k == 0) { MK_PHASE(4); }
        const u32* k_s = kv_s + buf * (split ? 1 : 2) * tk * W;
        const u32* v_s = split ? v_split : k_s + tk * W;
        // Scores of the tile's keys up to n16 (n rounded up to 16, what P·V
        // reads; the softmax takes the keys past n16 as masked): keys past n
        // read stale words and are masked, like the pairs past `pairs`,
        // which are zeros.
        const u32 n16 = BLOCK ? (n + 15) & ~15u : ATTN_TILE, kjobs = n16 / 8;
        const DivBy kdiv(kjobs);
        for (u32 job = warp; job < ((pairs + 15) / 16) * kjobs; job += nwarps) {
            const u32 jt = BLOCK ? kdiv.div(job) : job / (ATTN_TILE / 8), jk = job - jt * kjobs;
            const u32 pa = jt * 16 + g, pb = pa + 8, key = jk * 8 + g;
            const u32* qa = q_s + min(pa, pairs - 1) * W + cc;
            const u32* qb = q_s + min(pb, pairs - 1) * W + cc;
            const u32* kr = k_s + key * W + cc;
            // The two rows' slices and grids, loaded before the products so
            // that the masking below does not wait on them.
            const u32 ia = prow(min(pa, pairs - 1)), ib = prow(min(pb, pairs - 1));
            const u32 row_lo[2] = {lo_s[ia], lo_s[ib]}, row_hi[2] = {hi_s[ia], hi_s[ib]};
            const bool row_in[2] = {grid_s[ia] == grid, grid_s[ib] == grid};
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (u32 k16 = 0; k16 < HD / 16; ++k16) {
                const u32 af[4] = {pa < pairs ? qa[k16 * 8] : 0u, pb < pairs ? qb[k16 * 8] : 0u,
                                   pa < pairs ? qa[k16 * 8 + 4] : 0u, pb < pairs ? qb[k16 * 8 + 4] : 0u};
                mma_bf16_16816(d, af, kr[k16 * 8], kr[k16 * 8 + 4]);
            }
            // d[0], d[1]: pair pa, keys 2cc, 2cc + 1 of the block; d[2], d[3]: pair pb.
#pragma unroll
            for (u32 e = 0; e < 4; ++e) {
                const u32 p = e < 2 ? pa : pb, j = jk * 8 + 2 * cc + (e & 1);
                if (p < pairs) {
                    const u32 r = e / 2;
                    const bool live = j < n && row_in[r] && t0 + j >= row_lo[r] && t0 + j < row_hi[r];
                    p_s[p * PS + j] = live ? d[e] * scale : -__int_as_float(0x7f800000);
                }
            }
        }
        __syncthreads();
        if (k == 0) { MK_PHASE(5); }
        // Online softmax update, one warp per pair (keys from n16 on
        // masked, as their scores would be); BLOCK: a warp's pairs (p, p +
        // nwarps, ...) ATTN_SOFTMAX_BATCH at a time, their reductions
        // interleaved (each pair's arithmetic as alone).
        attention_softmax<BLOCK ? ATTN_SOFTMAX_BATCH : 1>(p_s, m_s, l_s, f_s, pairs, n16);
        if (split && k > 0) cp_async_wait_prev();  // this tile's values
        __syncthreads();
        if (k == 0) { MK_PHASE(6); }
        // P·V: job = (16-pair tile, 16 columns), warp w takes jobs w, w + 16, ...
        const u32 steps = (n + 15) / 16;
#pragma unroll
        for (u32 jw = 0; jw < ATTN_JOBS_PER_WARP; ++jw) {
            const u32 job = warp + jw * nwarps;
            if (job >= pv_jobs) break;
            const u32 pa = (job / JPT) * 16 + g, pb = pa + 8, col = (job % JPT) * 16 + g;
            const bool la = pa < pairs, lb = pb < pairs;
            const float fa = la ? f_s[pa] : 1.0f, fb = lb ? f_s[pb] : 1.0f;
#pragma unroll
            for (u32 t = 0; t < 2; ++t) {
                acc[jw][t][0] *= fa, acc[jw][t][1] *= fa, acc[jw][t][2] *= fb, acc[jw][t][3] *= fb;
            }
            const float* ra = p_s + min(pa, pairs - 1) * PS + 2 * cc;
            const float* rb = p_s + min(pb, pairs - 1) * PS + 2 * cc;
            for (u32 st = 0; st < steps; ++st) {
                const u32 kb = st * 16;
                const float2 xa0 = la ? *reinterpret_cast<const float2*>(ra + kb) : make_float2(0.0f, 0.0f);
                const float2 xb0 = lb ? *reinterpret_cast<const float2*>(rb + kb) : make_float2(0.0f, 0.0f);
                const float2 xa1 = la ? *reinterpret_cast<const float2*>(ra + kb + 8) : make_float2(0.0f, 0.0f);
                const float2 xb1 = lb ? *reinterpret_cast<const float2*>(rb + kb + 8) : make_float2(0.0f, 0.0f);
                u32 ah[4], al[4];
                attention_split_pair(xa0.x, xa0.y, ah[0], al[0]);
                attention_split_pair(xb0.x, xb0.y, ah[1], al[1]);
                attention_split_pair(xa1.x, xa1.y, ah[2], al[2]);
                attention_split_pair(xb1.x, xb1.y, ah[3], al[3]);
                const u32* v0 = v_s + (kb + 2 * cc) * W;
#pragma unroll
                for (u32 t = 0; t < 2; ++t) {
                    // Column col + 8t of keys kb + 2cc, + 1 and kb + 2cc + 8, + 9.
                    const u32 wd = (col + 8 * t) / 2, sel = (g & 1) ? 0x7632u : 0x5410u;
                    const u32 b0 = __byte_perm(v0[wd], v0[W + wd], sel);
                    const u32 b1 = __byte_perm(v0[8 * W + wd], v0[9 * W + wd], sel);
                    mma_bf16_16816(acc[jw][t], ah, b0, b1);
                    mma_bf16_16816(acc[jw][t], al, b0, b1);
                }
            }
        }
        __syncthreads();  // this buffer and p_s are refilled
        if (split && k + 1 < ntiles) {
            u32 g1, t1, n1;
            tile(k + 1, g1, t1, n1);
            attention_load_tile<HD, 2>(nullptr, v_split, kbase, vbase, t1, n1);
            cp_async_commit();
        }
        if (k == 0) { MK_PHASE(7); }
    }
    MK_PHASE(8);
    asm volatile("cp.async.wait_all;" ::: "memory");
    // Partials: acc[.][t][0..1] pair pa, columns base + 8t + 2cc, + 1; [2..3] pair pb.
#pragma unroll
    for (u32 jw = 0; jw < ATTN_JOBS_PER_WARP; ++jw) {
        const u32 job = warp + jw * nwarps;
        if (job >= pv_jobs) break;
        const u32 pa = (job / JPT) * 16 + g, base = (job % JPT) * 16 + 2 * cc;
#pragma unroll
        for (u32 half = 0; half < 2; ++half) {
            const u32 p = pa + 8 * half;
            if (p >= pairs) continue;
            const u32 i = i0 + prow(p), h = a.kv_head * group + phead(p);
            float* out = attention_partial(a, i, h, HD);
#pragma unroll
            for (u32 t = 0; t < 2; ++t) {
                *reinterpret_cast<float2*>(out + base + 8 * t) = make_float2(acc[jw][t][2 * half], acc[jw][t][2 * half + 1]);
            }
        }
    }
    for (u32 p = tid; p < pairs; p += BLOCK_THREADS) {
        const u32 i = i0 + prow(p), h = a.kv_head * group + phead(p);
        float* out = attention_partial(a, i, h, HD);
        out[HD] = m_s[p], out[HD + 1] = l_s[p];
    }
}

// The fast path over sub-blocks of the rows as large as its pair limit and
// shared memory allow.
template <u32 HD>
__device__ __forceinline__ bool attention_fast(const Ctx& c, const AttentionArgs& a, u32 pos0) {
    const u32 group = a.heads / a.kv_heads;
    // The largest sub-block size whose every sub-block fits.
    auto fits = [&](u32 sub) {
        if (sub * group > attention_max_pairs(HD)) return false;
        for (u32 i0 = 0; i0 < a.m; i0 += sub) {
            const u32 rows = min(sub, a.m - i0);
            u32 tk, bufs;
            if (!attention_tile_buffers(a, pos0, i0, rows, rows * group, HD, c.smem_bytes, tk, bufs)) return false;
        }
        return true;
    };
    u32 sub = a.m;
    while (sub > 0 && !fits(sub)) --sub;
    if (sub == 0) return false;
    for (u32 i0 = 0; i0 < a.m; i0 += sub) {
        if (i0 > 0) __syncthreads();  // the last sub-block's shared memory is read
        const u32 rows = min(sub, a.m - i0);
        u32 tk, bufs;
        attention_tile_buffers(a, pos0, i0, rows, rows * group, HD, c.smem_bytes, tk, bufs);
        if (rows > 1 && rows <= 32 && tk > ATTN_TILE) {
            attention_tiled<HD, true, true>(c, a, pos0, i0, rows, ATTN_TILE, ATTN_SPLIT_BUFS);
        } else if (rows > 1 && rows <= 32) {
            attention_tiled<HD, true>(c, a, pos0, i0, rows, tk, bufs);
        }
        else attention_tiled<HD, false>(c, a, pos0, i0, rows, tk, bufs);
    }
    return true;
}

__device__ __forceinline__ void task_attention(const Ctx& c) {
    const AttentionArgs& a = task_args<AttentionArgs>(c);
    const u32 pos0 = *reinterpret_cast<const u32*>(a.pos);
    if (u64(pos0) + a.m > a.max_seq) {
        if (threadIdx.x == 0) task_fault(c, FAULT_OUT_OF_RANGE, u64(pos0) + a.m, a.max_seq);
        return;
    }
    if (a.qkv_dtype == DTYPE_BF16 && a.cache_dtype == DTYPE_BF16) {
        if (a.head_dim == 128 && attention_fast<128>(c, a, pos0)) return;
        if (a.head_dim == 64 && attention_fast<64>(c, a, pos0)) return;
    }
    if (a.rope) {  // the host fuses the rope only where the fast path runs
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.head_dim, a.m);
        return;
    }
    switch (a.head_dim) {
        case 32: attention_rows<1>(a, pos0); break;
        case 64: attention_rows<2>(a, pos0); break;
        case 128: attention_rows<4>(a, pos0); break;
        default:
            if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.head_dim, 128);
    }
}
