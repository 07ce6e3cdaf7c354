// attention: one KV head, one run-time slice of the cached keys, every query
// row and head of the group (the "pairs"); writes (o, max, sum) partials with
// an online softmax; src/task/attention.rs.
//
// Fast path (bf16 q and cache, head_dim 64 or 128): the slice is processed in
// tiles of 64 keys. The block copies the pairs' q and a tile's K and V into
// shared memory (cp.async, 16 bytes per thread), computes the (pair, key)
// scores on tensor cores (16 pairs x 8 keys per warp job), updates each
// pair's running max and sum
// (one warp per pair), then accumulates P·V with threads laid out as
// (column pair, pair group) so V is read once per key per pair group.
// Other geometries use the generic path: one warp per pair, one key at a time.
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
MK_OFFSET(AttentionArgs, bidirectional, 76);

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
        float* out = reinterpret_cast<float*>(a.partial) + ((u64(i) * a.heads + h) * a.chunks + a.chunk) * (hd + 2);
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

// Words of the tile area: two K/V tile buffers, or the final reduction of
// the KS key phases (KS * pairs * W float2s), whichever is larger.
__host__ __device__ constexpr u32 attention_tile_words(u32 pairs, u32 hd, u32 ks) {
    return 4 * ATTN_TILE * (hd / 2) > ks * pairs * hd ? 4 * ATTN_TILE * (hd / 2) : ks * pairs * hd;
}

// Shared memory the fast path needs for `pairs` pairs: q, the tile area,
// scores, per-pair running max, sum and correction, and each row's slice and
// tile grid.
__host__ __device__ constexpr u32 attention_smem_bytes(u32 pairs, u32 hd, u32 ks) {
    return pairs * hd * 2 + attention_tile_words(pairs, hd, ks) * 4 + pairs * ATTN_TILE * 4 + 3 * pairs * 4 +
           3 * pairs * 4;
}

// Key phases of the P·V step for `group` query heads per KV head: as many as
// leave two threads per pair of one row (a decode step) and at most eight
// pairs per thread for a block of 16 rows; the same for any block.
__host__ __device__ constexpr u32 attention_key_phases(u32 group, u32 npg) {
    u32 ks = 1;
    while (ks * 2 <= npg && group * ks * 4 <= npg) ks *= 2;
    return ks;
}

// Issues the cp.async copies of keys t0 .. t0 + n into one tile buffer.
template <u32 HD>
__device__ __forceinline__ void attention_load_tile(u32* k_s, u32* v_s, const char* kbase, const char* vbase, u32 t0, u32 n) {
    constexpr u32 W = HD / 2;
    const u32 per = n * (HD / 8);  // 16-byte pieces of K (then as many of V)
    for (u32 ch = threadIdx.x; ch < 2 * per; ch += BLOCK_THREADS) {
        const bool which = ch >= per;
        const u32 r = which ? ch - per : ch, j = r / (HD / 8), part = r % (HD / 8);
        const char* src = (which ? vbase : kbase) + u64(t0 + j) * HD * 2 + part * 16;
        cp_async16((which ? v_s : k_s) + j * W + part * 4, src);
    }
}

// PP: pairs per thread in the P·V phase. Scores run on tensor cores, and in
// P·V each (pair, column pair) is owned by KS threads taking every KS-th key,
// reduced once at the end. KS is sized
// for one row's pairs (a decode step's) and kept for any number of rows, so a
// row's arithmetic never depends on the block around it; larger blocks loop.
// Tiles of ATTN_TILE keys start at the slice start. Rows of a block share
// their slice length but where a block straddles a change of it (at most
// once: 16 rows span fewer than 16 * chunks keys): each of the two grids
// walks its own tiles, and a row attends only in its own grid's tiles. Tiles
// are double buffered: tile t + 1 is in flight while tile t is computed.
// The block's rows i0 .. i0 + rows are computed (a row's result is the same
// in any such sub-block).
template <u32 HD, u32 PP>
__device__ __forceinline__ void attention_tiled(const Ctx& c, const AttentionArgs& a, u32 pos0, u32 i0, u32 rows) {
    constexpr u32 W = HD / 2;               // 32-bit words (bf16 pairs) per row
    constexpr u32 NPG = BLOCK_THREADS / W;  // row groups in the P·V phase
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = BLOCK_THREADS / 32;
    const u32 group = a.heads / a.kv_heads, pairs = rows * group, width = (a.heads + 2 * a.kv_heads) * HD;
    const float scale = __uint_as_float(a.scale);
    // P·V: KS key phases, PG pair groups (KS * PG = NPG).
    const u32 KS = attention_key_phases(group, NPG), PG = NPG / KS;
    u32* q_s = reinterpret_cast<u32*>(c.smem);  // [pairs][W]
    u32* kv_s = q_s + pairs * W;                // [2][K, V][TILE][W]
    float* p_s = reinterpret_cast<float*>(kv_s + attention_tile_words(pairs, HD, KS));  // [pairs][TILE]
    float* m_s = p_s + pairs * ATTN_TILE;                             // running max
    float* l_s = m_s + pairs;                                         // running sum
    float* f_s = l_s + pairs;                                         // this tile's correction
    u32* lo_s = reinterpret_cast<u32*>(f_s + pairs);                  // each row's slice
    u32* hi_s = lo_s + pairs;
    u32* grid_s = hi_s + pairs;  // each row's tile grid: 0, or 1 past a change of slice length
    // The grids' key ranges (every thread alike): union of their rows' slices.
    u32 glo[2] = {0, 0}, ghi[2] = {0, 0}, per0 = 0;
    for (u32 i = 0; i < rows; ++i) {
        u32 l, h;
        const u32 per = attention_slice(a, attention_row_len(a, pos0, i0 + i), l, h);
        if (i == 0) per0 = per;
        const u32 g = per != per0;
        if (tid == 0) lo_s[i] = l, hi_s[i] = h, grid_s[i] = g;
        if (l < h) {
            if (glo[g] == ghi[g]) glo[g] = l;
            ghi[g] = h;
        }
    }
    const u32 gt0 = (ghi[0] - glo[0] + ATTN_TILE - 1) / ATTN_TILE, ntiles = gt0 + (ghi[1] - glo[1] + ATTN_TILE - 1) / ATTN_TILE;
    // Tile k: its grid, first key and key count.
    auto tile = [&](u32 k, u32& g, u32& t0, u32& n) {
        g = k >= gt0;
        t0 = glo[g] + (k - (g ? gt0 : 0)) * ATTN_TILE;
        n = min(ATTN_TILE, ghi[g] - t0);
    };
    const char* kbase = reinterpret_cast<const char*>(a.cache) + (u64(a.kv_head) * a.max_seq) * HD * 2;
    const char* vbase = reinterpret_cast<const char*>(a.cache) + (u64(a.kv_heads + a.kv_head) * a.max_seq) * HD * 2;
    // q of every pair: row i0 + p / group, head kv_head * group + p % group.
    for (u32 ch = tid; ch < pairs * (HD / 8); ch += BLOCK_THREADS) {
        const u32 p = ch / (HD / 8), part = ch % (HD / 8);
        const u32 i = i0 + p / group, h = a.kv_head * group + p % group;
        cp_async16(q_s + p * W + part * 4, reinterpret_cast<const char*>(a.qkv) + (u64(i) * width + u64(h) * HD) * 2 + part * 16);
    }
    if (ntiles > 0) {
        u32 g, t0, n;
        tile(0, g, t0, n);
        attention_load_tile<HD>(kv_s, kv_s + ATTN_TILE * W, kbase, vbase, t0, n);
    }
    cp_async_commit();
    for (u32 p = tid; p < pairs; p += BLOCK_THREADS) m_s[p] = -__int_as_float(0x7f800000), l_s[p] = 0.0f;
    float o[PP][2];
#pragma unroll
    for (u32 k = 0; k < PP; ++k) o[k][0] = o[k][1] = 0.0f;
    const u32 d2 = tid % W, r = tid / W, pg = r % PG, ks = r / PG;
    u32 buf = 0;
    for (u32 k = 0; k < ntiles; ++k, buf ^= 1) {
        u32 grid, t0, n;
        tile(k, grid, t0, n);
        if (k + 1 < ntiles) {
            u32 g1, t1, n1;
            tile(k + 1, g1, t1, n1);
            u32* nk = kv_s + (buf ^ 1) * 2 * ATTN_TILE * W;
            attention_load_tile<HD>(nk, nk + ATTN_TILE * W, kbase, vbase, t1, n1);
        }
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const u32* k_s = kv_s + buf * 2 * ATTN_TILE * W;
        const u32* v_s = k_s + ATTN_TILE * W;
        // Scores on tensor cores: a warp job is 16 pairs x 8 keys over the
        // head's dimensions (mma.m16n8k16, A = q, B = k, f32 sums in the
        // order of the dimensions); a pair's scores never depend on the
        // other pairs of its tile. Keys past n read stale words and are
        // masked, like the pairs past `pairs`, which are zeros.
        for (u32 job = warp; job < ((pairs + 15) / 16) * (ATTN_TILE / 8); job += nwarps) {
            const u32 g = lane >> 2, cc = lane & 3;
            const u32 pa = (job / (ATTN_TILE / 8)) * 16 + g, pb = pa + 8, key = (job % (ATTN_TILE / 8)) * 8 + g;
            const u32* qa = q_s + min(pa, pairs - 1) * W + cc;
            const u32* qb = q_s + min(pb, pairs - 1) * W + cc;
            const u32* kr = k_s + key * W + cc;
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
                const u32 p = e < 2 ? pa : pb, j = (job % (ATTN_TILE / 8)) * 8 + 2 * cc + (e & 1);
                if (p < pairs) {
                    const u32 i = p / group;
                    const bool live = j < n && grid_s[i] == grid && t0 + j >= lo_s[i] && t0 + j < hi_s[i];
                    p_s[p * ATTN_TILE + j] = live ? d[e] * scale : -__int_as_float(0x7f800000);
                }
            }
        }
        __syncthreads();
        // Online softmax update, one warp per pair.
        for (u32 p = warp; p < pairs; p += nwarps) {
            float* row = p_s + p * ATTN_TILE;
            const float s0 = row[lane], s1 = row[lane + 32];
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
            const float old = m_s[p], nm = fmaxf(old, mx);
            const bool none = nm == -__int_as_float(0x7f800000);
            const float e0 = none ? 0.0f : __expf(s0 - nm), e1 = none ? 0.0f : __expf(s1 - nm);
            row[lane] = e0, row[lane + 32] = e1;
            const float sum = warp_sum(e0 + e1);
            if (lane == 0) {
                // Exactly 1 when the maximum holds (a tile wholly outside a
                // row's slice then changes nothing, bit for bit).
                const float corr = (none || old == nm) ? 1.0f : __expf(old - nm);
                f_s[p] = corr;
                l_s[p] = fmaf(l_s[p], corr, sum);
                m_s[p] = nm;
            }
        }
        __syncthreads();
        // P·V: thread (column pair d2, pair group pg, key phase ks).
#pragma unroll
        for (u32 k = 0; k < PP; ++k) {
            const u32 p = pg + k * PG;
            if (p < pairs) o[k][0] *= f_s[p], o[k][1] *= f_s[p];
        }
        // Four keys' loads at a time, ahead of their products, in the same
        // order of keys as one at a time (keys past n are skipped: their
        // value rows were never written).
        for (u32 j0 = ks; j0 < n; j0 += 4 * KS) {
            u32 vw[4];
            float w[4][PP];
#pragma unroll
            for (u32 u = 0; u < 4; ++u) {
                const u32 j = j0 + u * KS;
                vw[u] = j < n ? v_s[j * W + d2] : 0u;
#pragma unroll
                for (u32 k = 0; k < PP; ++k) w[u][k] = p_s[min(pg + k * PG, pairs - 1) * ATTN_TILE + (j & (ATTN_TILE - 1))];
            }
#pragma unroll
            for (u32 u = 0; u < 4; ++u) {
                const float v0 = __uint_as_float(vw[u] << 16), v1 = __uint_as_float(vw[u] & 0xFFFF0000u);
#pragma unroll
                for (u32 k = 0; k < PP; ++k) {
                    if (j0 + u * KS < n && pg + k * PG < pairs) {
                        o[k][0] = fmaf(w[u][k], v0, o[k][0]);
                        o[k][1] = fmaf(w[u][k], v1, o[k][1]);
                    }
                }
            }
        }
        __syncthreads();  // this buffer and p_s are refilled
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    // Reduce the KS key phases (through the tile area, free now) and write.
    float2* red = reinterpret_cast<float2*>(kv_s);  // [KS][pairs][W]
#pragma unroll
    for (u32 k = 0; k < PP; ++k) {
        const u32 p = pg + k * PG;
        if (p < pairs) red[(ks * pairs + p) * W + d2] = make_float2(o[k][0], o[k][1]);
    }
    __syncthreads();
    for (u32 idx = tid; idx < pairs * W; idx += BLOCK_THREADS) {
        const u32 p = idx / W, col = idx % W;
        float2 sum = make_float2(0.0f, 0.0f);
        for (u32 k = 0; k < KS; ++k) {
            const float2 v = red[(k * pairs + p) * W + col];
            sum.x += v.x, sum.y += v.y;
        }
        const u32 i = i0 + p / group, h = a.kv_head * group + p % group;
        float* out = reinterpret_cast<float*>(a.partial) + ((u64(i) * a.heads + h) * a.chunks + a.chunk) * (HD + 2);
        reinterpret_cast<float2*>(out)[col] = sum;
        if (col == 0) out[HD] = m_s[p], out[HD + 1] = l_s[p];
    }
}

// Most pairs per thread in the P·V phase: larger blocks run in sub-blocks
// (their accumulators would spill under the resident kernel's registers).
constexpr u32 ATTN_MAX_PP = 4;

// The fast path over sub-blocks of the rows as large as its pair limit and
// shared memory allow.
template <u32 HD>
__device__ __forceinline__ bool attention_fast(const Ctx& c, const AttentionArgs& a, u32 pos0) {
    constexpr u32 NPG = BLOCK_THREADS / (HD / 2);
    const u32 group = a.heads / a.kv_heads;
    const u32 KS = attention_key_phases(group, NPG), PG = NPG / KS;
    u32 sub = a.m;
    while (sub > 0 && (sub * group > ATTN_MAX_PP * PG || attention_smem_bytes(sub * group, HD, KS) > c.smem_bytes)) --sub;
    if (sub == 0) return false;
    for (u32 i0 = 0; i0 < a.m; i0 += sub) {
        const u32 rows = min(sub, a.m - i0), pairs = rows * group;
        if (i0 > 0) __syncthreads();  // the last sub-block's shared memory is read
        if (pairs <= PG) attention_tiled<HD, 1>(c, a, pos0, i0, rows);
        else if (pairs <= 2 * PG) attention_tiled<HD, 2>(c, a, pos0, i0, rows);
        else attention_tiled<HD, ATTN_MAX_PP>(c, a, pos0, i0, rows);
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
    switch (a.head_dim) {
        case 32: attention_rows<1>(a, pos0); break;
        case 64: attention_rows<2>(a, pos0); break;
        case 128: attention_rows<4>(a, pos0); break;
        default:
            if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.head_dim, 128);
    }
}
