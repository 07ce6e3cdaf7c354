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
                                         u32 row0, u32 rows) {
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
            const uint4 q = ld_stream16(wrow + u64(ch) * 16);
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
                                         u32 rows) {
    for (u32 m0 = 0; m0 < n; m0 += 2) {
        const u32 mc = min(n - m0, 2u);
        if (mc == 1) fp4_pass<1, XBF16, NV>(a, codes, sc, tscale, x, ldx, y, rmap, m0, 1, row0, rows);
        else fp4_pass<2, XBF16, NV>(a, codes, sc, tscale, x, ldx, y, rmap, m0, 2, row0, rows);
    }
}

// Matrix rows row0 .. row0 + rows of the expert in `slot`, for the input rows
// routed to it. The input rows are prepared (shared memory) when `slot` needs
// other rows than the last call's (`prepared`: that slot, or ~0 for none).
__device__ __forceinline__ void fp4_expert_rows(const Ctx& c, const GemvExpertFp4Args& a, const u32* list, u32 slot,
                                                u32 row0, u32 rows, u32& prepared, u64& x, u32& ldx, bool& bf16,
                                                u32 pass = ~0u) {
    const u32 mask = list[1 + a.slots + slot] & ((1u << a.m) - 1u);
    if (mask == 0u) return;
    const u64 expert = list[1 + slot];
    const bool nv = a.format == FP4_NVFP4;
    const unsigned char* codes = reinterpret_cast<const unsigned char*>(a.w) + expert * a.ldy * (a.cols / 2);
    const u64 stride = fp4_scale_stride(a.format, a.ldy, a.cols);
    const unsigned char* sc = reinterpret_cast<const unsigned char*>(a.scales) + expert * stride;
    const float tscale = nv ? *reinterpret_cast<const float*>(sc + u64(a.ldy) * (a.cols / 16)) : 1.0f;
    const u32 xsize = a.x_dtype == DTYPE_BF16 ? 2 : 4, ysize = a.y_dtype == DTYPE_BF16 ? 2 : 4;
    const u64 y = a.y + u64(slot) * a.m * a.ldy * ysize;
    const bool per_slot = a.flags & FP4_X_PER_SLOT;
    if (prepared == ~0u || (per_slot && prepared != slot)) {
        if (prepared != ~0u) __syncthreads();  // the last unit's reads of the prepared rows are done
        const u64 step = per_slot ? u64(slot) * a.m * a.cols * xsize : 0;
        const GemvInput in = {a.x + step, a.prologue == PROLOGUE_SWIGLU ? a.aux + step : a.aux, a.cols, a.m, a.cols,
                              a.x_dtype, a.prologue, __uint_as_float(a.eps)};
        if (!gemv_input(c, in, x, ldx, bf16)) return;
        prepared = slot;
    }
    // Only the rows routed to this expert (the mask after the list's ids).
    // With `pass`, only input rows 2 pass .. 2 pass + 2 of them.
    u32 rmap[16];
    u32 n = rows_of_mask(mask, rmap);
    const u32* rm = rmap;
    if (pass != ~0u) {
        rm += 2 * pass;
        n = min(n - min(n, 2 * pass), 2u);
        if (n == 0) return;
    }
    if (bf16) {
        if (nv) fp4_rows<true, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
        else fp4_rows<true, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
    } else {
        if (nv) fp4_rows<false, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
        else fp4_rows<false, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
    }
}

// Spread: the chosen experts' matrices cut into units of `rows` rows, one
// unit per pass over two of the input rows routed to the expert (an expert
// chosen by many rows is that much more work), dealt evenly over the tasks at
// run time: however many experts a block chose, and however unevenly, every
// SM streams an equal share. Out of line: blocks of rows only, and its
// registers stay out of the resident loop's.
__device__ __noinline__ void fp4_spread(const Ctx& c, const GemvExpertFp4Args& a, const u32* list) {
    u32 prepared = ~0u, ldx = 0;
    u64 x = 0;
    bool bf16 = false;
    const u32 per = (a.ldy + a.rows - 1) / a.rows, count = min(list[0], a.slots);
    const u32 mbits = (1u << a.m) - 1u;
    u32 units = 0;
    for (u32 s = 0; s < count; ++s) units += (__popc(list[1 + a.slots + s] & mbits) + 1) / 2 * per;
    const u32 t = a.slot, tasks = a.reserved;
    const u32 u0 = u32(u64(units) * t / tasks), u1 = u32(u64(units) * (t + 1) / tasks);
    u32 slot = 0, base = 0, size = (__popc(list[1 + a.slots] & mbits) + 1) / 2 * per;
    for (u32 u = u0; u < u1; ++u) {
        while (u >= base + size) {
            base += size;
            ++slot;
            size = (__popc(list[1 + a.slots + slot] & mbits) + 1) / 2 * per;
        }
        const u32 k = u - base, pass = k / per, r0 = (k % per) * a.rows;
        fp4_expert_rows(c, a, list, slot, r0, min(a.rows, a.ldy - r0), prepared, x, ldx, bf16, pass);
    }
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
        fp4_expert_rows(c, a, list, a.slot, a.row0, a.rows, prepared, x, ldx, bf16);
    }
}
