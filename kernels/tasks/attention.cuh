// attention: one KV head, one run-time slice of the cached keys, every query
// row and head of the group (the "pairs"); writes (o, max, sum) partials with
// an online softmax; src/task/attention.rs.
//
// Fast path (bf16 q and cache, head_dim 64 or 128): the slice is processed in
// tiles of 64 keys. The block copies the pairs' q and a tile's K and V into
// shared memory (cp.async, 16 bytes per thread); each warp takes 16 pairs and
// a quarter of every tile's keys, computes their scores on tensor cores, keeps
// its own running max and sum in registers and accumulates P·V on tensor
// cores from the score fragments; the quarters merge at the end.
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
// loads meet no bank conflicts: a q, K or V row is hd / 2 words plus 4, 16
// bytes more than a multiple of 128, so the eight 16-byte rows of an
// ldmatrix fall in distinct banks. Unpadded, every fragment load was an
// 8-way conflict: all eight rows began in the same bank.
__host__ __device__ constexpr u32 attention_row_words(u32 hd) { return hd / 2 + 4; }

// Keys of a tile each warp takes (a quarter of ATTN_TILE): warp w works on
// pair tile w / ATTN_QUARTERS (16 pairs) and keys ATTN_QKEYS * (w %
// ATTN_QUARTERS) .. + ATTN_QKEYS of every tile.
constexpr u32 ATTN_QUARTERS = 4;
constexpr u32 ATTN_QKEYS = ATTN_TILE / ATTN_QUARTERS;

// Pairs (query row x head of the group) a block computes at once: one
// 16-pair tile per ATTN_QUARTERS warps.
__host__ __device__ constexpr u32 attention_max_pairs() { return 16 * (BLOCK_THREADS / 32) / ATTN_QUARTERS; }

// Shared memory the fast path needs for `pairs` pairs of `rows` query rows:
// q, two K/V tile buffers (the next tile in flight while one is computed;
// at the end, the quarters' states), per row its slice and tile grid
// (src/task/attention.rs mirrors it).
__host__ __device__ constexpr u32 attention_smem_bytes(u32 pairs, u32 rows, u32 hd) {
    return pairs * attention_row_words(hd) * 4 + 2 * 2 * ATTN_TILE * attention_row_words(hd) * 4 + 3 * rows * 4;
}

// Issues the cp.async copies of keys t0 .. t0 + n into one tile buffer and
// zeros the value rows n .. up to the next multiple of ATTN_QKEYS (P·V
// multiplies a quarter's keys at once; their weights are zero, and zero
// times a stale word could be NaN). Row `skip` (if below n) is left alone:
// its key is being appended and written into the tile directly
// (attention_append_keys).
template <u32 HD>
__device__ __forceinline__ void attention_load_tile(u32* k_s, u32* v_s, const char* kbase, const char* vbase, u32 t0, u32 n,
                                                    u32 skip = ~0u) {
    constexpr u32 W = HD / 2, WS = attention_row_words(HD);
    const u32 per = n * (HD / 8);  // 16-byte pieces of K (then as many of V)
    for (u32 ch = threadIdx.x; ch < 2 * per; ch += BLOCK_THREADS) {
        const bool which = ch >= per;
        const u32 r = which ? ch - per : ch, j = r / (HD / 8), part = r % (HD / 8);
        if (j == skip) continue;
        const char* src = (which ? vbase : kbase) + u64(t0 + j) * HD * 2 + part * 16;
        cp_async16((which ? v_s : k_s) + j * WS + part * 4, src);
    }
    const u32 pad = ((n + ATTN_QKEYS - 1) / ATTN_QKEYS * ATTN_QKEYS) - n;
    for (u32 w = threadIdx.x; w < pad * W; w += BLOCK_THREADS) v_s[(n + w / W) * WS + w % W] = 0u;
}

// Four 8x8 bf16 matrices from shared memory (ldmatrix): lane l gives the
// address of row l % 8 of matrix l / 8 and gets, of each matrix, row l / 4,
// elements 2 (l % 4) and + 1 (TRANS: column l / 4, rows 2 (l % 4) and + 1):
// tensor-core fragments.
template <bool TRANS = false>
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(addr));
    }
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

// The A fragment of a 16-row tile (rows r0 .. r0 + 16, `rows` valid, each
// `stride` bytes from `base`, a shared address), 16 columns from byte offset
// `col`: rows past the valid ones read the last valid one (a row of A
// reaches only its own row of the product, which is never stored).
__device__ __forceinline__ void attention_a_frag(u32 base, u32 stride, u32 r0, u32 rows, u32 col, u32 (&af)[4]) {
    const u32 lane = threadIdx.x & 31;
    const u32 r = min(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, rows - 1);
    ldsm_x4(base + r * stride + col + (lane >> 4) * 16, af[0], af[1], af[2], af[3]);
}

// The factor that rescales a running sum taken under the maximum old_m to
// the maximum new_m.
__device__ __forceinline__ float attention_corr(float old_m, float new_m) {
    // Exactly 1 when the maximum holds, so that keys outside a row's slice
    // (weights 0) change nothing, bit for bit.
    return (new_m == -__int_as_float(0x7f800000) || old_m == new_m) ? 1.0f : __expf(old_m - new_m);
}

// The sum of a value over the four lanes of a quad (every lane gets the
// same bits: each step adds two equal-ordered halves).
__device__ __forceinline__ float attention_quad_sum(float v) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}

// The maximum of a value over the four lanes of a quad.
__device__ __forceinline__ float attention_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
}

// Tensor cores for both products, one barrier a tile. Warp w takes the
// 16-pair tile w / ATTN_QUARTERS and quarter q = w % ATTN_QUARTERS of every
// tile's keys (ATTN_QKEYS keys from the tile's start + ATTN_QKEYS q): it
// computes their scores (mma.m16n8k16, A = q, B = k) into registers, keeps
// its own running max and sum per pair (rows g and g + 8 of its lanes,
// reduced over a quad), and multiplies the weights, split into two bf16
// parts, by the values (A = the score fragments as they come, B = v through
// ldmatrix.trans), its accumulators in registers across the tiles. At the
// end the quarters' states merge in a fixed order ((0 with 2) and (1 with
// 3), then those two) into the slice's partial. Every output of a pair
// depends on its own q and the keys and values of its slice alone, never on
// the other pairs of its tile or which warp computed it, so a row computes
// bit for bit alike alone (decode) or in a block (verify). Tiles of
// ATTN_TILE keys start at the slice start. Rows of a block share their slice
// length but where a block straddles a change of it (at most once: 16 rows
// span fewer than 16 * chunks keys): each of the two grids walks its own
// tiles, and a row attends only in its own grid's tiles. Tiles are double
// buffered, tile t + 1 in flight while tile t is computed. The block's rows
// i0 .. i0 + rows are computed (at most attention_max_pairs pairs). Out of
// line, with registers of its own. BLOCK (2 rows or more): the rows' slices
// found by a warp's lanes at once and a warp's q rotations over consecutive
// pairs (one row's heads share their angles); otherwise (a decode step's
// single row) one thread's loop and one pair a warp. The same arithmetic,
// the same bits.
template <u32 HD, bool BLOCK>
__device__ __noinline__ void attention_tiled(const Ctx& c, const AttentionArgs& a, u32 pos0, u32 i0, u32 rows) {
    constexpr u32 W = attention_row_words(HD);  // 32-bit words (bf16 pairs) per row, padded
    constexpr u32 NT = HD / 8;                  // 8-column tiles of a head
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = BLOCK_THREADS / 32;
    const u32 g = lane >> 2, cc = lane & 3;
    const u32 group = a.heads / a.kv_heads, pairs = rows * group, width = (a.heads + 2 * a.kv_heads) * HD;
    const float scale = __uint_as_float(a.scale);
    const float neg_inf = -__int_as_float(0x7f800000);
    u32* q_s = reinterpret_cast<u32*>(c.scratch());  // [pairs][W]
    u32* kv_s = q_s + pairs * W;                     // [2][K, V][ATTN_TILE][W]
    u32* lo_s = kv_s + 2 * 2 * ATTN_TILE * W;        // each row's slice
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
            attention_partial(a, i, h, HD)[e] = e == HD ? neg_inf : 0.0f;
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
    tile(0, gr0, t00, n0);
    // A single appended key inside the first tile (a decode step's, in its
    // last slice) goes into the tile straight from the append, so the tile's
    // other keys load meanwhile; otherwise the tiles load after the appended
    // keys reach the cache.
    const bool direct = cover == 1u && pos0 >= t00 && pos0 < t00 + n0;
    if (rope) {
        cp_async_commit();  // q on its own: it is rotated before the first tile lands
        if (direct) {
            attention_load_tile<HD>(kv_s, kv_s + ATTN_TILE * W, kbase, vbase, t00, n0, pos0 - t00);
            attention_append_keys<HD>(a, pos0, cover, reinterpret_cast<u16*>(kv_s + (pos0 - t00) * W),
                                      reinterpret_cast<u16*>(kv_s + (ATTN_TILE + pos0 - t00) * W));
        } else if (cover) {
            attention_append_keys<HD>(a, pos0, cover);
            __syncthreads();
        }
    }
    MK_PHASE(2);
    if (!direct) attention_load_tile<HD>(kv_s, kv_s + ATTN_TILE * W, kbase, vbase, t00, n0);
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
    // This warp's pair tile and quarter; its lanes' rows g and g + 8.
    const u32 pt = (warp / ATTN_QUARTERS) * 16, quarter = warp % ATTN_QUARTERS;
    const bool active = pt < pairs;
    const u32 pa = pt + g, pb = pa + 8;
    const u32 ia = prow(min(pa, pairs - 1)), ib = prow(min(pb, pairs - 1));
    const u32 q_sa = smem_addr(q_s);
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
    float acc[NT][4];
#pragma unroll
    for (u32 j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (u32 k = 0; k < ntiles; ++k) {
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();  // tile k landed; every warp is done with tile k - 1's buffer
        if (k == 0) { MK_PHASE(4); }
        if (k + 1 < ntiles) {
            u32 g1, t1, n1;
            tile(k + 1, g1, t1, n1);
            u32* nk = kv_s + ((k + 1) & 1) * 2 * ATTN_TILE * W;
            attention_load_tile<HD>(nk, nk + ATTN_TILE * W, kbase, vbase, t1, n1);
            cp_async_commit();
        }
        u32 grid, t0, n;
        tile(k, grid, t0, n);
        const u32 k0 = quarter * ATTN_QKEYS;  // the quarter's first key in the tile
        if (!active || k0 >= n) continue;     // no keys of this quarter: its state stays
        const u32 kv_sa = smem_addr(kv_s + (k & 1) * 2 * ATTN_TILE * W);
        // Scores: two 8-key n-tiles (keys k0 + 8 t + l % 8 of the K rows).
        float d[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        const u32 kaddr = kv_sa + (k0 + (lane & 7)) * W * 4 + (lane >> 3) * 16;
#pragma unroll
        for (u32 k32 = 0; k32 < HD / 32; ++k32) {
            u32 kf[2][4];
#pragma unroll
            for (u32 t = 0; t < 2; ++t) ldsm_x4(kaddr + t * 8 * W * 4 + k32 * 64, kf[t][0], kf[t][1], kf[t][2], kf[t][3]);
#pragma unroll
            for (u32 h = 0; h < 2; ++h) {
                u32 af[4];
                attention_a_frag(q_sa, W * 4, pt, pairs, (2 * k32 + h) * 32, af);
#pragma unroll
                for (u32 t = 0; t < 2; ++t) mma_bf16_16816(d[t], af, kf[t][2 * h], kf[t][2 * h + 1]);
            }
        }
        if (k == 0) { MK_PHASE(5); }
        // Masked and scaled: d[t][0..1] pair pa, keys k0 + 8t + 2cc, + 1;
        // d[t][2..3] pair pb.
        const u32 rlo[2] = {lo_s[ia], lo_s[ib]}, rhi[2] = {hi_s[ia], hi_s[ib]};
        const bool rin[2] = {grid_s[ia] == grid, grid_s[ib] == grid};
        float mx[2] = {neg_inf, neg_inf};
#pragma unroll
        for (u32 t = 0; t < 2; ++t) {
#pragma unroll
            for (u32 e = 0; e < 4; ++e) {
                const u32 r = e / 2, j = k0 + 8 * t + 2 * cc + (e & 1), key = t0 + j;
                const bool live = j < n && rin[r] && key >= rlo[r] && key < rhi[r];
                d[t][e] = live ? d[t][e] * scale : neg_inf;
                mx[r] = fmaxf(mx[r], d[t][e]);
            }
        }
        // The running max and sum of rows g and g + 8; the weights.
        float corr[2];
#pragma unroll
        for (u32 r = 0; r < 2; ++r) {
            const float nm = fmaxf(m[r], attention_quad_max(mx[r]));
            corr[r] = attention_corr(m[r], nm);
            const bool none = nm == neg_inf;
            float s = 0.0f;
#pragma unroll
            for (u32 t = 0; t < 2; ++t) {
                const float e0 = none ? 0.0f : __expf(d[t][2 * r] - nm), e1 = none ? 0.0f : __expf(d[t][2 * r + 1] - nm);
                d[t][2 * r] = e0, d[t][2 * r + 1] = e1;
                s += e0 + e1;
            }
            l[r] = fmaf(l[r], corr[r], attention_quad_sum(s));
            m[r] = nm;
        }
        if (k == 0) { MK_PHASE(6); }
        // The weights as the A fragments of P·V (keys k0 .. k0 + 16), hi and lo.
        u32 ah[4], al[4];
        attention_split_pair(d[0][0], d[0][1], ah[0], al[0]);
        attention_split_pair(d[0][2], d[0][3], ah[1], al[1]);
        attention_split_pair(d[1][0], d[1][1], ah[2], al[2]);
        attention_split_pair(d[1][2], d[1][3], ah[3], al[3]);
        // V rows (keys) k0 + l % 16, columns 16 jj + 8 (l / 16): with the
        // transpose, the B fragments of two 8-column tiles.
        const u32 vaddr = kv_sa + ((ATTN_TILE + k0 + (lane & 15)) * W + (lane >> 4) * 4) * 4;
#pragma unroll
        for (u32 jj = 0; jj < NT / 2; ++jj) {
            u32 vb[4];
            ldsm_x4<true>(vaddr + jj * 32, vb[0], vb[1], vb[2], vb[3]);
#pragma unroll
            for (u32 t = 0; t < 2; ++t) {
                float(&ac)[4] = acc[2 * jj + t];
                ac[0] *= corr[0], ac[1] *= corr[0], ac[2] *= corr[1], ac[3] *= corr[1];
                mma_bf16_16816(ac, ah, vb[2 * t], vb[2 * t + 1]);
                mma_bf16_16816(ac, al, vb[2 * t], vb[2 * t + 1]);
            }
        }
        if (k == 0) { MK_PHASE(7); }
    }
    MK_PHASE(8);
    // The quarters' states merged through shared memory (the tile buffers):
    // slot (pair tile, quarter % 2), a lane's accumulators of 8-column tile
    // j at float4 j * 32 + lane, then its rows' max and sum.
    __syncthreads();
    float4* slots = reinterpret_cast<float4*>(kv_s);
    constexpr u32 SLOT = (NT + 1) * 32;
    auto put = [&](u32 slot) {
        float4* sp = slots + slot * SLOT + lane;
#pragma unroll
        for (u32 j = 0; j < NT; ++j) sp[j * 32] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
        sp[NT * 32] = make_float4(m[0], m[1], l[0], l[1]);
    };
    auto take = [&](u32 slot) {
        const float4* sp = slots + slot * SLOT + lane;
        const float4 ml = sp[NT * 32];
        const float mb[2] = {ml.x, ml.y}, lb[2] = {ml.z, ml.w};
        float ca[2], cb[2];
#pragma unroll
        for (u32 r = 0; r < 2; ++r) {
            const float nm = fmaxf(m[r], mb[r]);
            ca[r] = attention_corr(m[r], nm), cb[r] = attention_corr(mb[r], nm);
            l[r] = fmaf(l[r], ca[r], lb[r] * cb[r]);
            m[r] = nm;
        }
#pragma unroll
        for (u32 j = 0; j < NT; ++j) {
            const float4 o = sp[j * 32];
            acc[j][0] = fmaf(acc[j][0], ca[0], o.x * cb[0]), acc[j][1] = fmaf(acc[j][1], ca[0], o.y * cb[0]);
            acc[j][2] = fmaf(acc[j][2], ca[1], o.z * cb[1]), acc[j][3] = fmaf(acc[j][3], ca[1], o.w * cb[1]);
        }
    };
    const u32 pslot = (pt / 16) * 2;
    if (active && quarter >= 2) put(pslot + quarter - 2);
    __syncthreads();
    if (active && quarter < 2) take(pslot + quarter);
    __syncthreads();
    if (active && quarter < 2) put(pslot + quarter);
    __syncthreads();
    if (active) {
        // (0 with 2) with (1 with 3): each quarter merges and stores a
        // quarter of the columns (8-column tiles quarter * NT / 4 ..), the
        // rows' max and sum alike in each.
        const float4* sa = slots + pslot * SLOT + lane;
        const float4* sb = sa + SLOT;
        const float4 mla = sa[NT * 32], mlb = sb[NT * 32];
        const float ma[2] = {mla.x, mla.y}, la[2] = {mla.z, mla.w}, mb[2] = {mlb.x, mlb.y}, lb[2] = {mlb.z, mlb.w};
        float ca[2], cb[2], mo[2], lo[2];
#pragma unroll
        for (u32 r = 0; r < 2; ++r) {
            mo[r] = fmaxf(ma[r], mb[r]);
            ca[r] = attention_corr(ma[r], mo[r]), cb[r] = attention_corr(mb[r], mo[r]);
            lo[r] = fmaf(la[r], ca[r], lb[r] * cb[r]);
        }
        // Partials: tile j's [0..1] pair pa, columns 8 j + 2 cc, + 1; [2..3] pair pb.
#pragma unroll
        for (u32 half = 0; half < 2; ++half) {
            const u32 p = pa + 8 * half;
            if (p >= pairs) continue;
            const u32 i = i0 + prow(p), h = a.kv_head * group + phead(p);
            float* out = attention_partial(a, i, h, HD);
#pragma unroll
            for (u32 jq = 0; jq < NT / ATTN_QUARTERS; ++jq) {
                const u32 j = quarter * (NT / ATTN_QUARTERS) + jq;
                const float2 oa = reinterpret_cast<const float2*>(sa + j * 32)[half];
                const float2 ob = reinterpret_cast<const float2*>(sb + j * 32)[half];
                *reinterpret_cast<float2*>(out + 8 * j + 2 * cc) =
                    make_float2(fmaf(oa.x, ca[half], ob.x * cb[half]), fmaf(oa.y, ca[half], ob.y * cb[half]));
            }
            if (quarter == 0 && cc == 0) out[HD] = mo[half], out[HD + 1] = lo[half];
        }
    }
}

// The fast path over sub-blocks of the rows as large as its pair limit and
// shared memory allow (every sub-block walks the tiles of its rows).
template <u32 HD>
__device__ __forceinline__ bool attention_fast(const Ctx& c, const AttentionArgs& a, u32 pos0) {
    const u32 group = a.heads / a.kv_heads;
    u32 sub = min(a.m, attention_max_pairs() / group);
    while (sub > 0 && attention_smem_bytes(sub * group, sub, HD) > c.smem_bytes) --sub;
    if (sub == 0) return false;
    for (u32 i0 = 0; i0 < a.m; i0 += sub) {
        if (i0 > 0) __syncthreads();  // the last sub-block's shared memory is read
        const u32 rows = min(sub, a.m - i0);
        if (rows > 1) attention_tiled<HD, true>(c, a, pos0, i0, rows);
        else attention_tiled<HD, false>(c, a, pos0, i0, rows);
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
