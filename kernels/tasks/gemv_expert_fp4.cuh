// gemv_expert_fp4: the expert product of gemv_expert with the expert's matrix
// in MXFP4 or NVFP4 (src/quant.rs has the formats, src/task/gemv_expert_fp4.rs
// the layout). The 4-bit codes are decoded in registers: each lane streams 16
// bytes (32 elements) at a time, decodes them to bf16 with byte permutes, sums
// code * x per scale block and applies the block scale once per block; nothing
// is written back in 16-bit form.
#pragma once
#include "../include/task.cuh"
#include "gemv_bf16.cuh"

struct GemvExpertFp4Args {
    u64 w;
    u64 scales;
    u64 x;
    u64 y;
    u64 list;
    u64 aux;
    u32 row0;
    u32 rows;
    u32 cols;
    u32 m;
    u32 ldy;
    unsigned char x_dtype;
    unsigned char y_dtype;
    unsigned char prologue;
    unsigned char format;
    u32 eps;
    u16 slot;
    u16 flags;
    u32 slots;
    u32 reserved;
};
MK_SIZE(GemvExpertFp4Args, 88);
MK_OFFSET(GemvExpertFp4Args, w, 0);
MK_OFFSET(GemvExpertFp4Args, scales, 8);
MK_OFFSET(GemvExpertFp4Args, x, 16);
MK_OFFSET(GemvExpertFp4Args, y, 24);
MK_OFFSET(GemvExpertFp4Args, list, 32);
MK_OFFSET(GemvExpertFp4Args, aux, 40);
MK_OFFSET(GemvExpertFp4Args, row0, 48);
MK_OFFSET(GemvExpertFp4Args, rows, 52);
MK_OFFSET(GemvExpertFp4Args, cols, 56);
MK_OFFSET(GemvExpertFp4Args, m, 60);
MK_OFFSET(GemvExpertFp4Args, ldy, 64);
MK_OFFSET(GemvExpertFp4Args, x_dtype, 68);
MK_OFFSET(GemvExpertFp4Args, y_dtype, 69);
MK_OFFSET(GemvExpertFp4Args, prologue, 70);
MK_OFFSET(GemvExpertFp4Args, format, 71);
MK_OFFSET(GemvExpertFp4Args, eps, 72);
MK_OFFSET(GemvExpertFp4Args, slot, 76);
MK_OFFSET(GemvExpertFp4Args, flags, 78);
MK_OFFSET(GemvExpertFp4Args, slots, 80);
MK_OFFSET(GemvExpertFp4Args, reserved, 84);

constexpr u32 FP4_MXFP4 = 0;
constexpr u32 FP4_NVFP4 = 1;
constexpr u16 FP4_ACCUMULATE = 1;
constexpr u16 FP4_X_PER_SLOT = 2;
constexpr u16 FP4_SPREAD = 4;  // slot: task index, reserved: tasks, rows: rows per work unit

// Eight E2M1 codes (a 32-bit word, element 0 in the low nibble) to four bf16
// pairs (element 2t in the low half of out[t]), exactly: every E2M1 value is a
// bf16. Byte permutes look the high and low bytes of the magnitudes up in two
// 8-byte tables, two more interleave them, and the sign bits are moved in.
__device__ __forceinline__ void fp4_to_bf16x8(u32 w8, u32 out[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 w = h ? (w8 >> 16) : w8;
        const u32 sel = w & 0x7777u;
        const u32 hi = __byte_perm(0x3F3F3F00u, 0x40404040u, sel);  // 0, .5, 1, 1.5 | 2, 3, 4, 6
        const u32 lo = __byte_perm(0xC0800000u, 0xC0804000u, sel);
        out[2 * h] = __byte_perm(lo, hi, 0x5140) | ((w << 12) & 0x8000u) | ((w << 24) & 0x80000000u);
        out[2 * h + 1] = __byte_perm(lo, hi, 0x7362) | ((w << 4) & 0x8000u) | ((w << 16) & 0x80000000u);
    }
}

__device__ __forceinline__ float e8m0_value(u32 e) {
    return e == 255u ? __uint_as_float(0x7FC00000u) : __uint_as_float(e ? e << 23 : 0x00400000u);
}

__device__ __forceinline__ float e4m3_value(u32 c) {
    const u32 e = (c >> 3) & 15u, m = c & 7u;
    float v;
    if (e == 0) v = float(m) * (1.0f / 512.0f);
    else if (e == 15u && m == 7u) v = __uint_as_float(0x7FC00000u);
    else v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? -v : v;
}

// Bytes of one expert's scale region: its block scales, for NVFP4 followed by
// its f32 tensor scale, padded to 16 bytes.
__device__ __forceinline__ u64 fp4_scale_stride(u32 format, u32 ldy, u32 cols) {
    const u64 block = format == FP4_MXFP4 ? 32 : 16;
    const u64 bytes = u64(ldy) * (cols / block) + (format == FP4_NVFP4 ? 4 : 0);
    return (bytes + 15) & ~u64(15);
}

// Lanes per matrix row: the power of two among 32, 16 and 8 that leaves the
// fewest lanes idle for `chunks` 16-byte chunks per row (a warp then works on
// 32 / lanes rows at once; 768 columns are 24 chunks: 8 lanes, 3 each).
__device__ __forceinline__ u32 fp4_row_lanes(u32 chunks) {
    u32 best = 32, best_idle = 32 * ((chunks + 31) / 32) - chunks;
    for (u32 l = 16; l >= 8; l /= 2) {
        const u32 idle = (l * ((chunks + l - 1) / l) - chunks) * (32 / l);
        if (idle < best_idle) best = l, best_idle = idle;
    }
    return best;
}

template <int M, bool XBF16, bool NV>
__device__ __forceinline__ void fp4_pass(const GemvExpertFp4Args& a, const unsigned char* codes, const unsigned char* sc,
                                         float tscale, u64 x, u32 ldx, u64 y, const u32* rmap, u32 m0, u32 mcount,
                                         u32 row0, u32 rows, bool smem) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 chunks = a.cols / 32, per_row_scales = NV ? a.cols / 16 : a.cols / 32;
    const u32 lanes = fp4_row_lanes(chunks), per_warp = 32 / lanes, sub = lane % lanes, group = lane / lanes;
    // Uniform trip count over the warp (the reduction shuffles need every lane).
    for (u32 r0 = warp * per_warp; r0 < rows; r0 += nwarps * per_warp) {
        const u32 r = r0 + group;
        const bool live = r < rows;
        const u64 row = u64(row0) + (live ? r : 0);
        const unsigned char* wrow = codes + row * (a.cols / 2);
        const unsigned char* srow = sc + row * per_row_scales;
        float acc[M];
#pragma unroll
        for (int i = 0; i < M; ++i) acc[i] = 0.0f;
        for (u32 ch = sub; live && ch < chunks; ch += lanes) {
            const uint4 q = smem ? ld_shared16(wrow + u64(ch) * 16) : ld_stream16(wrow + u64(ch) * 16);
            float s0, s1;
            if (NV) {
                s0 = e4m3_value(srow[2 * ch]) * tscale;
                s1 = e4m3_value(srow[2 * ch + 1]) * tscale;
            } else {
                s0 = s1 = e8m0_value(srow[ch]);
            }
            const u32 words[4] = {q.x, q.y, q.z, q.w};
            float p0[M], p1[M];
#pragma unroll
            for (int i = 0; i < M; ++i) p0[i] = p1[i] = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                u32 bf[4];
                fp4_to_bf16x8(words[k], bf);
#pragma unroll
                for (int i = 0; i < M; ++i) {
                    if (i < int(mcount)) {
                        float xf[8];
                        load_x8<XBF16>(x, u64(rmap[m0 + i]) * ldx + u64(ch) * 32 + k * 8, xf);
#pragma unroll
                        for (int t = 0; t < 4; ++t) {
                            const float lo = __uint_as_float(bf[t] << 16), hi = __uint_as_float(bf[t] & 0xFFFF0000u);
                            if (k < 2) p0[i] = fmaf(hi, xf[2 * t + 1], fmaf(lo, xf[2 * t], p0[i]));
                            else p1[i] = fmaf(hi, xf[2 * t + 1], fmaf(lo, xf[2 * t], p1[i]));
                        }
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < M; ++i) acc[i] = fmaf(p0[i], s0, fmaf(p1[i], s1, acc[i]));
        }
#pragma unroll
        for (int i = 0; i < M; ++i) {
            float s = acc[i];
            for (u32 off = lanes / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
            if (live && sub == 0 && i < int(mcount)) {
                const u64 idx = u64(rmap[m0 + i]) * a.ldy + row;
                const float prev = (a.flags & FP4_ACCUMULATE) ? load_float(y, a.y_dtype, idx) : 0.0f;
                store_float(y, a.y_dtype, idx, prev + s);
            }
        }
    }
}

// The `n` input rows listed in `rmap`, two per pass, over matrix rows
// row0 .. row0 + rows.
template <bool XBF16, bool NV>
__device__ __forceinline__ void fp4_rows(const GemvExpertFp4Args& a, const unsigned char* codes, const unsigned char* sc,
                                         float tscale, u64 x, u32 ldx, u64 y, const u32* rmap, u32 n, u32 row0,
                                         u32 rows, bool smem) {
    for (u32 m0 = 0; m0 < n; m0 += 2) {
        const u32 mc = min(n - m0, 2u);
        if (mc == 1) fp4_pass<1, XBF16, NV>(a, codes, sc, tscale, x, ldx, y, rmap, m0, 1, row0, rows, smem);
        else fp4_pass<2, XBF16, NV>(a, codes, sc, tscale, x, ldx, y, rmap, m0, 2, row0, rows, smem);
    }
}

// Tensor-core products (columns a multiple of 128, every input-row count):
// a warp multiplies 16 matrix rows by up to 16 input rows with
// mma.m16n8k16 (bf16 in, f32 accumulation). Lane (g, c) of the fragment
// layout streams 32 codes (one MXFP4 block, two NVFP4 blocks) of rows g and
// g + 8 per 128 columns, decodes them to bf16 pairs in registers and scales
// them exactly (an E2M1 value times an E8M0 or E4M3 scale fits bf16's
// significand); k is permuted consistently in both operands, so the decoded
// pairs are the A fragment as they come. Each row's columns are cut into the
// same slices whatever the input rows, each slice accumulated in order by one
// warp and the slices summed in order: a row's result does not depend on how
// many rows are computed with it or where.
__device__ __forceinline__ bool fp4_mma_ok(u32 cols) { return (cols & 127u) == 0; }

// Column slices per row (at most four, of `per` 128-column steps each) and
// the rows a block computes at once: slices x 16-row tiles fill its warps.
__device__ __forceinline__ void fp4_mma_shape(u32 cols, u32& slices, u32& per, u32& group) {
    const u32 steps = cols / 128;
    per = (steps + 3) / 4;
    slices = (steps + per - 1) / per;
    group = 16 * max(1u, (BLOCK_THREADS / 32) / slices);
}

// Shared memory (bytes) of the slice partials of one group.
__device__ __forceinline__ u32 fp4_mma_partial_bytes(u32 cols) {
    u32 slices, per, group;
    fp4_mma_shape(cols, slices, per, group);
    return slices * group * 16 * 4;
}

__device__ __forceinline__ u32 bf16x2_scale(u32 a, u32 s2) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(s2), "r"(0x80008000u));
    return d;
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A block scale as a bf16 pair (exact: E8M0 is a power of two, E4M3 has four
// significant bits).
template <bool NV>
__device__ __forceinline__ u32 fp4_scale_pair(u32 code) {
    u32 h;
    if (NV) {
        h = __float_as_uint(e4m3_value(code)) >> 16;
    } else {
        h = code == 255u ? 0x7FC0u : code == 0u ? 0x0040u : code << 7;
    }
    return h | (h << 16);
}

// Four consecutive x values of input row `i` at column `col` as two bf16 pairs.
template <bool XBF16>
__device__ __forceinline__ void fp4_x4(u64 x, u64 idx, u32& b0, u32& b1) {
    if (XBF16) {
        const uint2 v = *reinterpret_cast<const uint2*>(x + idx * 2);
        b0 = v.x, b1 = v.y;
    } else {
        const float4 v = *reinterpret_cast<const float4*>(x + idx * 4);
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b0) : "f"(v.y), "f"(v.x));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b1) : "f"(v.w), "f"(v.z));
    }
}

// Chunk `chunk` (32 codes) of matrix row `r` and its scales as bf16 pairs
// (the first and second 16 codes'); zeros for a row that is not `live`.
template <bool NV>
__device__ __forceinline__ void fp4_mma_load(const unsigned char* codes, const unsigned char* sc, u64 r,
                                             u32 row_codes, u32 row_scales, u32 chunk, bool live, bool smem,
                                             uint4& q, u32& sa, u32& sb) {
    q = make_uint4(0, 0, 0, 0), sa = sb = 0;
    if (!live) return;
    const unsigned char* p = codes + r * row_codes + u64(chunk) * 16;
    q = smem ? ld_shared16(p) : ld_stream16(p);
    const unsigned char* sp = sc + r * row_scales;
    if (NV) sa = fp4_scale_pair<true>(sp[2 * chunk]), sb = fp4_scale_pair<true>(sp[2 * chunk + 1]);
    else sa = sb = fp4_scale_pair<false>(sp[chunk]);
}

// One warp: rows tile0 .. tile0 + 16 (relative to row0; rows past `rows`
// read as zero) over column steps step0 .. step1, for input rows 0 .. n of
// rmap, NT n-tiles of 8; the tile's partials go to part[row][input row].
template <int NT, bool XBF16, bool NV>
__device__ __noinline__ void fp4_mma_job(const GemvExpertFp4Args& a, const unsigned char* codes,
                                            const unsigned char* sc, u64 x, u32 ldx, const u32* rmap, u32 n,
                                            u32 row0, u32 rows, u32 tile0, u32 step0, u32 step1, bool smem,
                                            float* part) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const u32 row_codes = a.cols / 2, row_scales = NV ? a.cols / 16 : a.cols / 32;
    const bool live0 = tile0 + g < rows, live1 = tile0 + g + 8 < rows;
    const u64 r_0 = u64(row0) + tile0 + g, r_1 = r_0 + 8;
    u64 xrow[NT];
    bool xlive[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const u32 i = j * 8 + g;
        xlive[j] = i < n;
        xrow[j] = xlive[j] ? u64(rmap[i]) * ldx : 0;
    }
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (u32 st = step0; st < step1; ++st) {
        const u32 chunk = st * 4 + c;  // 32-code chunk of the row
        uint4 q0, q1;
        u32 s0a, s0b, s1a, s1b;
        fp4_mma_load<NV>(codes, sc, r_0, row_codes, row_scales, chunk, live0, smem, q0, s0a, s0b);
        fp4_mma_load<NV>(codes, sc, r_1, row_codes, row_scales, chunk, live1, smem, q1, s1a, s1b);
        const u32 w0[4] = {q0.x, q0.y, q0.z, q0.w}, w1[4] = {q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            u32 d0[4], d1[4];
            fp4_to_bf16x8(w0[w], d0);
            fp4_to_bf16x8(w1[w], d1);
            const u32 sa = w < 2 ? s0a : s0b, sb = w < 2 ? s1a : s1b;
#pragma unroll
            for (int t = 0; t < 4; ++t) d0[t] = bf16x2_scale(d0[t], sa), d1[t] = bf16x2_scale(d1[t], sb);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 af[4] = {d0[2 * h], d1[2 * h], d0[2 * h + 1], d1[2 * h + 1]};
                const u64 col = u64(chunk) * 32 + w * 8 + h * 4;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    u32 b0 = 0, b1 = 0;
                    if (xlive[j]) fp4_x4<XBF16>(x, xrow[j] + col, b0, b1);
                    mma_bf16_16816(acc[j], af, b0, b1);
                }
            }
        }
    }
    // c0, c1: row g, inputs 2c, 2c + 1 of the n-tile; c2, c3: row g + 8.
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        float* p0 = part + (tile0 + g) * 16 + j * 8 + 2 * c;
        float* p1 = part + (tile0 + g + 8) * 16 + j * 8 + 2 * c;
        p0[0] = acc[j][0], p0[1] = acc[j][1], p1[0] = acc[j][2], p1[1] = acc[j][3];
    }
}

// Matrix rows row0 .. row0 + rows for the n input rows of rmap (n <= 16),
// in groups of rows: every warp takes (tile, slice) jobs, then the block sums
// each row's slices in order and stores (or adds) the results. `part` is
// fp4_mma_partial_bytes of shared memory.
template <bool XBF16, bool NV>
__device__ __noinline__ void fp4_mma_rows(const GemvExpertFp4Args& a, const unsigned char* codes,
                                          const unsigned char* sc, float tscale, u64 x, u32 ldx, u64 y,
                                          const u32* rmap, u32 n, u32 row0, u32 rows, bool smem, float* part) {
    u32 slices, per, group;
    fp4_mma_shape(a.cols, slices, per, group);
    const u32 warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, steps = a.cols / 128;
    for (u32 g0 = 0; g0 < rows; g0 += group) {
        const u32 grows = min(group, rows - g0), tiles = (grows + 15) / 16;
        for (u32 job = warp; job < tiles * slices; job += nwarps) {
            const u32 tile = job / slices, slice = job % slices;
            const u32 s0 = slice * per, s1 = min(s0 + per, steps);
            float* p = part + slice * group * 16;
            if (n <= 8) {
                fp4_mma_job<1, XBF16, NV>(a, codes, sc, x, ldx, rmap, n, row0 + g0, grows, tile * 16, s0, s1, smem, p);
            } else {
                fp4_mma_job<2, XBF16, NV>(a, codes, sc, x, ldx, rmap, n, row0 + g0, grows, tile * 16, s0, s1, smem, p);
            }
        }
        __syncthreads();
        for (u32 k = threadIdx.x; k < grows * n; k += blockDim.x) {
            const u32 r = k / n, i = k % n;
            float sum = 0.0f;
            for (u32 s = 0; s < slices; ++s) sum += part[(s * group + r) * 16 + i];
            sum *= tscale;
            const u64 idx = u64(rmap[i]) * a.ldy + row0 + g0 + r;
            const float prev = (a.flags & FP4_ACCUMULATE) ? load_float(y, a.y_dtype, idx) : 0.0f;
            store_float(y, a.y_dtype, idx, prev + sum);
        }
        __syncthreads();
    }
}

// Bytes per matrix row of the codes and of the block scales.
__device__ __forceinline__ u32 fp4_row_codes(const GemvExpertFp4Args& a) { return a.cols / 2; }
__device__ __forceinline__ u32 fp4_row_scales(const GemvExpertFp4Args& a) {
    return a.format == FP4_NVFP4 ? a.cols / 16 : a.cols / 32;
}

// A unit of rows r0 .. r0 + rows of one expert, staged into shared memory:
// its codes, then the 16-byte-aligned cover of its scales. `staged` is null
// for a unit read from global memory.
struct Fp4Unit {
    const unsigned char* codes;   // row r of the expert at codes + r * row_codes
    const unsigned char* scales;  // row r's scales at scales + r * row_scales
    bool staged;
};

// Where a unit's rows live in global memory: `cb` bytes of codes at `codes`,
// and the 16-byte-aligned cover [s0, s1) of its scales, which start `lead`
// bytes into it. Staged, a unit is its codes, then that cover.
struct Fp4Span {
    u64 codes, s0, s1;
    u32 cb, lead;
    __device__ u32 bytes() const { return cb + u32(s1 - s0); }
};

__device__ __forceinline__ Fp4Span fp4_unit_global(const GemvExpertFp4Args& a, const u32* list, u32 slot, u32 r0,
                                                   u32 rows) {
    const u64 expert = list[1 + slot];
    const u64 start = a.scales + expert * fp4_scale_stride(a.format, a.ldy, a.cols) + u64(r0) * fp4_row_scales(a);
    const u64 codes = a.w + expert * a.ldy * fp4_row_codes(a) + u64(r0) * fp4_row_codes(a);
    const u64 s0 = start & ~u64(15), s1 = (start + u64(rows) * fp4_row_scales(a) + 15) & ~u64(15);
    return {codes, s0, s1, rows * fp4_row_codes(a), u32(start - s0)};
}

// Thread 0: the copies of a unit to `dst` (its bytes announced by the caller).
__device__ __forceinline__ void fp4_copy_unit(const Ctx& c, const Fp4Span& g, unsigned char* dst) {
    stage_copy(&c.stage->bar, dst, g.codes, g.cb);
    stage_copy(&c.stage->bar, dst + g.cb, g.s0, u32(g.s1 - g.s0));
}

// The unit of rows from r0 on staged at `dst`, indexed like the expert's rows.
__device__ __forceinline__ Fp4Unit fp4_unit_at(const GemvExpertFp4Args& a, const Fp4Span& g, u32 r0,
                                               const unsigned char* dst) {
    return {dst - u64(r0) * fp4_row_codes(a), dst + g.cb + g.lead - u64(r0) * fp4_row_scales(a), true};
}

// After a task's staged units: every thread has waited for the staging (also
// when a fault skipped the rows), and the next staging is the next phase.
__device__ __forceinline__ void fp4_staging_done(const Ctx& c, bool wait) {
    if (wait) stage_wait(&c.stage->bar, c.stage->stagings & 1u);
    __syncthreads();
    if (threadIdx.x == 0) ++c.stage->stagings;
}

// Matrix rows row0 .. row0 + rows of the expert in `slot`, for the input rows
// routed to it. The input rows are prepared (shared memory) when `slot` needs
// other rows than the last call's (`prepared`: that slot, or ~0 for none).
// Passes over a unit for the input rows in `mask`: one with tensor cores,
// else one per two input rows.
__device__ __forceinline__ u32 fp4_passes(const GemvExpertFp4Args& a, u32 mask) {
    const u32 k = __popc(mask & ((1u << a.m) - 1u));
    return fp4_mma_ok(a.cols) ? min(k, 1u) : (k + 1) / 2;
}

// The input rows of `slot`'s expert (the rows of every slot when they are
// shared).
__device__ __forceinline__ GemvInput fp4_input(const GemvExpertFp4Args& a, u32 slot) {
    const u32 xsize = a.x_dtype == DTYPE_BF16 ? 2 : 4;
    const u64 step = (a.flags & FP4_X_PER_SLOT) ? u64(slot) * a.m * a.cols * xsize : 0;
    return {a.x + step, a.prologue == PROLOGUE_SWIGLU ? a.aux + step : a.aux, a.cols, a.m, a.cols,
            a.x_dtype, a.prologue, __uint_as_float(a.eps)};
}

// Shared memory of the tensor-core products' partials.
__device__ __forceinline__ u32 fp4_partials(const GemvExpertFp4Args& a) {
    return fp4_mma_ok(a.cols) ? fp4_mma_partial_bytes(a.cols) : 0u;
}

// Room for the prepared input rows: what the partials (and some slack) leave.
__device__ __forceinline__ u32 fp4_input_room(const Ctx& c, const GemvExpertFp4Args& a) {
    const u32 other = fp4_partials(a) + 256;
    return c.smem_bytes > other ? c.smem_bytes - other : 0u;
}

// Where the partials start: past the prepared input rows (none when the rows
// are read in place because they do not fit beside the partials).
__device__ __forceinline__ u32 fp4_keep(const Ctx& c, const GemvExpertFp4Args& a) {
    return (gemv_input_bytes(fp4_input(a, 0), fp4_input_room(c, a)) + 128 + 127) & ~127u;
}

// Scratch of a task below its staged units: the input rows, then the partials.
__device__ __forceinline__ u32 fp4_scratch(const Ctx& c, const GemvExpertFp4Args& a) {
    return fp4_keep(c, a) + fp4_partials(a);
}

// With `unit` staged, its rows are read from shared memory, once `*wait`
// (cleared here) had every thread wait for the staging, after the input rows
// were prepared.
__device__ __forceinline__ void fp4_expert_rows(const Ctx& c, const GemvExpertFp4Args& a, const u32* list, u32 slot,
                                                u32 row0, u32 rows, u32& prepared, u64& x, u32& ldx, bool& bf16,
                                                u32 pass = ~0u, const Fp4Unit* unit = nullptr, bool* wait = nullptr) {
    const u32 mask = list[1 + a.slots + slot] & ((1u << a.m) - 1u);
    if (mask == 0u) return;
    const u64 expert = list[1 + slot];
    const bool nv = a.format == FP4_NVFP4;
    const unsigned char* codes = reinterpret_cast<const unsigned char*>(a.w) + expert * a.ldy * (a.cols / 2);
    const u64 stride = fp4_scale_stride(a.format, a.ldy, a.cols);
    const unsigned char* sc = reinterpret_cast<const unsigned char*>(a.scales) + expert * stride;
    const float tscale = nv ? *reinterpret_cast<const float*>(sc + u64(a.ldy) * (a.cols / 16)) : 1.0f;
    const bool smem = unit && unit->staged;
    if (smem) codes = unit->codes, sc = unit->scales;
    const u32 ysize = a.y_dtype == DTYPE_BF16 ? 2 : 4;
    const u64 y = a.y + u64(slot) * a.m * a.ldy * ysize;
    const bool per_slot = a.flags & FP4_X_PER_SLOT;
    if (prepared == ~0u || (per_slot && prepared != slot)) {
        if (prepared != ~0u) __syncthreads();  // the last unit's reads of the prepared rows are done
        if (!gemv_input(c, fp4_input(a, slot), x, ldx, bf16, fp4_input_room(c, a))) return;
        prepared = slot;
    }
    if (wait && *wait) {
        stage_wait(&c.stage->bar, c.stage->stagings & 1u);
        *wait = false;
    }
    // Only the rows routed to this expert (the mask after the list's ids).
    // With `pass`, only input rows 2 pass .. 2 pass + 2 of them.
    u32 rmap[16];
    u32 n = rows_of_mask(mask, rmap);
    if (fp4_mma_ok(a.cols)) {
        // Every input row at once (its one pass, fp4_passes).
        float* part = reinterpret_cast<float*>(c.smem + fp4_keep(c, a));
        if (fp4_scratch(c, a) > c.smem_bytes) {
            if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.cols, c.smem_bytes);
            return;
        }
        if (bf16) {
            if (nv) fp4_mma_rows<true, true>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, smem, part);
            else fp4_mma_rows<true, false>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, smem, part);
        } else {
            if (nv) fp4_mma_rows<false, true>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, smem, part);
            else fp4_mma_rows<false, false>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, smem, part);
        }
        return;
    }
    const u32* rm = rmap;
    if (pass != ~0u) {
        rm += 2 * pass;
        n = min(n - min(n, 2 * pass), 2u);
        if (n == 0) return;
    }
    if (bf16) {
        if (nv) fp4_rows<true, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows, smem);
        else fp4_rows<true, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows, smem);
    } else {
        if (nv) fp4_rows<false, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows, smem);
        else fp4_rows<false, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows, smem);
    }
}

// Walks units u0 .. u1 of a spread task (see fp4_spread) in order, calling
// f(slot, pass, r0, rows) for each.
template <typename F>
__device__ __forceinline__ void fp4_units(const GemvExpertFp4Args& a, const u32* list, u32 u0, u32 u1, F f) {
    const u32 per = (a.ldy + a.rows - 1) / a.rows;
    u32 slot = 0, base = 0, size = fp4_passes(a, list[1 + a.slots]) * per;
    for (u32 u = u0; u < u1; ++u) {
        while (u >= base + size) {
            base += size;
            ++slot;
            size = fp4_passes(a, list[1 + a.slots + slot]) * per;
        }
        const u32 k = u - base, r0 = (k % per) * a.rows;
        f(slot, k / per, r0, min(a.rows, a.ldy - r0));
    }
}

// Spread: the chosen experts' matrices cut into units of `rows` rows, one
// unit per pass over two of the input rows routed to the expert (an expert
// chosen by many rows is that much more work), dealt evenly over the tasks at
// run time: however many experts a block chose, and however unevenly, every
// SM streams an equal share. On Hopper every unit that fits is staged into
// shared memory first (above the scratch of the input rows), so the task's
// whole share is in flight at once while the input rows are prepared. Out of
// line: blocks of rows only, and its registers stay out of the resident loop's.
__device__ __noinline__ void fp4_spread(const Ctx& c, const GemvExpertFp4Args& a, const u32* list) {
    u32 prepared = ~0u, ldx = 0;
    u64 x = 0;
    bool bf16 = false;
    const u32 per = (a.ldy + a.rows - 1) / a.rows, count = min(list[0], a.slots);
    u32 units = 0;
    for (u32 s = 0; s < count; ++s) units += fp4_passes(a, list[1 + a.slots + s]) * per;
    const u32 t = a.slot, tasks = a.reserved;
    const u32 u0 = u32(u64(units) * t / tasks), u1 = u32(u64(units) * (t + 1) / tasks);
    // Staging: units in order while they fit; every thread makes the same
    // choices, thread 0 issues the copies.
    const u32 keep = fp4_scratch(c, a);
    const u32 cap = STAGING && c.smem_bytes > keep ? c.smem_bytes - keep : 0u;
    u32 total = 0;
    if (cap) {
        fp4_units(a, list, u0, u1, [&](u32 slot, u32, u32 r0, u32 rows) {
            const Fp4Span g = fp4_unit_global(a, list, slot, r0, rows);
            if (total + g.bytes() > cap) return;
            if (threadIdx.x == 0) {
                stage_expect_more(&c.stage->bar, g.bytes());
                fp4_copy_unit(c, g, c.smem + keep + total);
            }
            total += g.bytes();
        });
        if (total && threadIdx.x == 0) stage_expect(&c.stage->bar, 0);  // the arrival
    }
    bool wait = total != 0;
    u32 off = 0;
    fp4_units(a, list, u0, u1, [&](u32 slot, u32 pass, u32 r0, u32 rows) {
        const Fp4Span g = fp4_unit_global(a, list, slot, r0, rows);
        Fp4Unit unit = {nullptr, nullptr, false};
        if (total && off + g.bytes() <= cap) {
            unit = fp4_unit_at(a, g, r0, c.smem + keep + off);
            off += g.bytes();
        }
        fp4_expert_rows(c, a, list, slot, r0, rows, prepared, x, ldx, bf16, pass, &unit, &wait);
    });
    if (total) fp4_staging_done(c, wait);
}

__device__ __forceinline__ void task_gemv_expert_fp4(const Ctx& c) {
    const GemvExpertFp4Args& a = task_args<GemvExpertFp4Args>(c);
    if ((a.cols & 31) || a.m == 0 || a.m > 16 || a.format > FP4_NVFP4 || a.rows == 0) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.cols, a.m);
        return;
    }
    const u32* list = reinterpret_cast<const u32*>(a.list);
    if (a.flags & FP4_SPREAD) {
        fp4_spread(c, a, list);
        return;
    }
    if (a.slot < list[0]) {
        u32 prepared = ~0u, ldx = 0;
        u64 x = 0;
        bool bf16 = false;
        // The slice is staged (as one unit) when it fits, while the input
        // rows are prepared.
        Fp4Unit unit = {nullptr, nullptr, false};
        const u32 keep = fp4_scratch(c, a);
        const Fp4Span g = fp4_unit_global(a, list, a.slot, a.row0, a.rows);
        const bool routed = (list[1 + a.slots + a.slot] & ((1u << a.m) - 1u)) != 0u;
        bool wait = STAGING && routed && c.smem_bytes > keep && g.bytes() <= c.smem_bytes - keep;
        if (wait) {
            if (threadIdx.x == 0) {
                stage_expect(&c.stage->bar, g.bytes());
                fp4_copy_unit(c, g, c.smem + keep);
            }
            unit = fp4_unit_at(a, g, a.row0, c.smem + keep);
        }
        fp4_expert_rows(c, a, list, a.slot, a.row0, a.rows, prepared, x, ldx, bf16, ~0u, &unit, &wait);
        if (unit.staged) fp4_staging_done(c, wait);
    }
}
