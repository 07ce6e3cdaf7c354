// gemv_expert_fp4: the expert product of gemv_expert with the expert's matrix
// in MXFP4 or NVFP4 (src/quant.rs has the formats, src/task/gemv_expert_fp4.rs
// the layout). The 4-bit codes are decoded in registers, never written back in
// 16-bit form: each lane streams 16 bytes (32 elements) at a time from global
// memory; with tensor cores (columns a multiple of 128) shifts and logic
// operations turn them into scaled bf16 pairs for mma, otherwise byte permutes
// decode them and each scale block's sum of code * x takes its scale once.
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
    const u64 bytes = u64(ldy) * (cols >> (format == FP4_MXFP4 ? 5 : 4)) + (format == FP4_NVFP4 ? 4 : 0);
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

// Tensor-core products (columns a multiple of 128, every input-row count):
// a warp multiplies 16 matrix rows by up to 16 input rows with
// mma.m16n8k16 (bf16 in, f32 accumulation). Lane (g, c) of the fragment
// layout streams 32 codes (one MXFP4 block, two NVFP4 blocks) of rows g and
// g + 8 per 128 columns, decodes them to bf16 pairs in registers and scales
// them exactly (an E2M1 value times an E8M0 or E4M3 scale fits bf16's
// significand); k is permuted consistently in both operands (pairs of
// elements k and k + 4 of each eight, fp4_to_bf16x8_scaled_down and fp4_x8),
// so the decoded pairs are the A fragment as they come. Each row's columns
// are cut into the same slices whatever the input rows, each slice
// accumulated in order by one warp and the slices summed in order: a row's
// result does not depend on how many rows are computed with it or where.
__device__ __forceinline__ bool fp4_mma_ok(u32 cols) { return (cols & 127u) == 0; }

// Column slices per row (two up to 16 128-column steps, else four; `per`
// steps each) and the rows a block computes at once: slices x 16-row tiles
// fill its warps. Two longer slices leave a warp fewer job starts, each of
// which waits for its first loads. Without divisions (a task computes this
// before its first loads): ceil(steps / per) is 2 for 2..16 steps (1 for
// one) and 4 above 16, where per = ceil(steps / 4) > 4 and steps > 3 per.
// `shift`: log2(slices).
__device__ __forceinline__ void fp4_mma_shape(u32 cols, u32& slices, u32& per, u32& group, u32& shift) {
    static_assert(BLOCK_THREADS / 32 == 16, "group sizes assume 16 warps");
    const u32 steps = cols >> 7;
    per = steps <= 16 ? (steps + 1) >> 1 : (steps + 3) >> 2;
    shift = steps <= 1 ? 0u : steps <= 16 ? 1u : 2u;
    slices = 1u << shift;
    group = 256u >> shift;
}

__device__ __forceinline__ void fp4_mma_shape(u32 cols, u32& slices, u32& per, u32& group) {
    u32 shift;
    fp4_mma_shape(cols, slices, per, group, shift);
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

// Eight E2M1 codes (a 32-bit word, element 0 in the low nibble) as four bf16
// pairs out[k] = (element k, element k + 4), each the code's value times
// 2^-126 exactly: the sign moves to bit 15, the exponent and mantissa bits to
// bits 8..6 (E2M1's exponent bias is 1, bf16's 127, and E2M1's subnormal 0.5
// lands on bf16's subnormal 2^-127). One multiply makes both copies of a
// masked nibble (times 2^6 + 2^12 for nibbles 0 and 4, 2^2 + 2^8 for 1 and 5,
// the same after a shift by 8 for the others), which do not overlap: a mask,
// a multiply and a mask per pair.
__device__ __forceinline__ void fp4_to_bf16x8_scaled_down(u32 w, u32 out[4]) {
    constexpr u32 KEEP = 0x81C081C0u;  // bits 15 and 8..6 of each half
    const u32 v = w >> 8;
    out[0] = ((w & 0x000F000Fu) * 4160u) & KEEP;
    out[1] = ((w & 0x00F000F0u) * 260u) & KEEP;
    out[2] = ((v & 0x000F000Fu) * 4160u) & KEEP;
    out[3] = ((v & 0x00F000F0u) * 260u) & KEEP;
}

// The bf16 pair that scales decoded codes (values times 2^-126) to code times
// block scale. MXFP4: 2^(e - 1) for the E8M0 code e, exact for e <= 128
// (larger codes take fp4_mx_pair after a first factor 2^126). NVFP4: the E4M3
// value times 2^62 (four significant bits, at most 448 * 2^62: exact), so the
// products come out 2^64 too small and the sums are scaled back in f32.
constexpr u32 FP4_MX_BIG = 128;
constexpr u32 FP4_TWO_POW_126 = 0x7E807E80u;
constexpr float FP4_NV_SCALE = 4611686018427387904.0f;  // 2^62
constexpr float FP4_NV_UNDO = 18446744073709551616.0f;   // 2^64

template <bool NV>
__device__ __forceinline__ u32 fp4_scale_pair(u32 code) {
    u32 h;
    if (NV) h = __float_as_uint(e4m3_value(code) * FP4_NV_SCALE) >> 16;
    else h = (code + 126u) << 7;
    return h | (h << 16);
}

// A block scale as a bf16 pair (exact: E8M0 is a power of two), for codes
// decoded to their values.
__device__ __forceinline__ u32 fp4_mx_pair(u32 code) {
    const u32 h = code == 255u ? 0x7FC0u : code == 0u ? 0x0040u : code << 7;
    return h | (h << 16);
}

// Eight consecutive x values at `p` as the bf16 pairs (x[k], x[k + 4]) that
// match fp4_to_bf16x8_scaled_down. XS: bf16 rows prepared in shared memory,
// already in that pair order (GemvInput::pairs), read with ld.shared
// (through a generic load, the data came back only after the codes loaded
// before it from global memory: a round trip per column step).
template <bool XBF16, bool XS>
__device__ __forceinline__ void fp4_x8(const unsigned char* p, u32 b[4]) {
    if (XBF16 && XS) {
        const uint4 v = ld_shared16(p);
        b[0] = v.x, b[1] = v.y, b[2] = v.z, b[3] = v.w;
    } else if (XBF16) {
        const uint4 v = gemv_pair_order(*reinterpret_cast<const uint4*>(p));
        b[0] = v.x, b[1] = v.y, b[2] = v.z, b[3] = v.w;
    } else {
        const float4 lo = *reinterpret_cast<const float4*>(p);
        const float4 hi = *reinterpret_cast<const float4*>(p + 16);
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b[0]) : "f"(hi.x), "f"(lo.x));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b[1]) : "f"(hi.y), "f"(lo.y));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b[2]) : "f"(hi.z), "f"(lo.z));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b[3]) : "f"(hi.w), "f"(lo.w));
    }
}

// A lane's scale codes of one 128-column step (NVFP4: the first 16 codes' in
// the low byte, the second 16's above), through the read-only path.
template <bool NV>
__device__ __forceinline__ u32 fp4_scale_codes(const unsigned char* sp) {
    return NV ? u32(__ldg(reinterpret_cast<const unsigned short*>(sp))) : u32(__ldg(sp));
}

// One 128-column step of a warp's tile: the chunks q0 (row g) and q1 (row
// g + 8) with their scale codes s0, s1, times the NT n-tiles of x at xp (this
// step's columns of each input row). BIG: an E8M0 scale above FP4_MX_BIG in
// the warp, scaled in two factors.
template <int NT, bool XBF16, bool NV, bool BIG, bool XS>
__device__ __forceinline__ void fp4_mma_step(float (&acc)[NT][4], const uint4& q0, const uint4& q1, u32 s0, u32 s1,
                                             const unsigned char* const (&xp)[NT]) {
    // Scale pairs of the row's first and second 16 codes.
    u32 p0[2], p1[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 c0 = NV ? (h ? s0 >> 8 : s0 & 0xFFu) : s0, c1 = NV ? (h ? s1 >> 8 : s1 & 0xFFu) : s1;
        p0[h] = BIG ? fp4_mx_pair(c0) : fp4_scale_pair<NV>(c0);
        p1[h] = BIG ? fp4_mx_pair(c1) : fp4_scale_pair<NV>(c1);
    }
    const u32 w0[4] = {q0.x, q0.y, q0.z, q0.w}, w1[4] = {q1.x, q1.y, q1.z, q1.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        u32 d0[4], d1[4];
        fp4_to_bf16x8_scaled_down(w0[w], d0);
        fp4_to_bf16x8_scaled_down(w1[w], d1);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            if (BIG) d0[t] = bf16x2_scale(d0[t], FP4_TWO_POW_126), d1[t] = bf16x2_scale(d1[t], FP4_TWO_POW_126);
            d0[t] = bf16x2_scale(d0[t], p0[w >> 1]), d1[t] = bf16x2_scale(d1[t], p1[w >> 1]);
        }
        u32 b[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) fp4_x8<XBF16, XS>(xp[j] + w * 8 * (XBF16 ? 2 : 4), b[j]);
        // Pairs (k, k + 4): k = 0, 1 make one k-step of 16, k = 2, 3 the next.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 af[4] = {d0[2 * h], d1[2 * h], d0[2 * h + 1], d1[2 * h + 1]};
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_bf16_16816(acc[j], af, b[j][2 * h], b[j][2 * h + 1]);
        }
    }
}

// A tile's accumulators (NT n-tiles of a 16-row tile), as a value: the
// out-of-line step below takes and returns them (by reference they would
// live in local memory).
template <int NT>
struct Fp4Acc {
    float v[NT][4];
};

// The two-factor step (an E8M0 scale above 2), out of line: such scales are
// rare, and the hot loop's code stays small.
template <int NT, bool XBF16, bool XS>
__device__ __noinline__ Fp4Acc<NT> fp4_mma_step_big(Fp4Acc<NT> acc, const uint4 q0, const uint4 q1, u32 s0, u32 s1,
                                                    const unsigned char* x0, const unsigned char* x1) {
    const unsigned char* xp[NT];
    xp[0] = x0;
    if (NT > 1) xp[NT - 1] = x1;
    fp4_mma_step<NT, XBF16, false, true, XS>(acc.v, q0, q1, s0, s1, xp);
    return acc;
}

// A step with the warp's scales: an E8M0 scale above 2 anywhere in the warp
// takes the two-factor scaling (warp-uniform).
template <int NT, bool XBF16, bool NV, bool XS>
__device__ __forceinline__ void fp4_mma_step_any(Fp4Acc<NT>& acc, const uint4& q0, const uint4& q1, u32 s0, u32 s1,
                                                 const unsigned char* const (&xp)[NT]) {
    if (!NV && __any_sync(0xFFFFFFFFu, s0 > FP4_MX_BIG || s1 > FP4_MX_BIG)) {
        acc = fp4_mma_step_big<NT, XBF16, XS>(acc, q0, q1, s0, s1, xp[0], xp[NT - 1]);
    } else {
        fp4_mma_step<NT, XBF16, NV, false, XS>(acc.v, q0, q1, s0, s1, xp);
    }
}

// One warp: rows tile0 .. tile0 + 16 (relative to row0) over column steps
// step0 .. step1, for input rows 0 .. n of rmap, NT n-tiles of 8; the tile's
// partials go to part[row][input row]. The next step's codes are loaded
// before this step's products (the last step's again on the last step: no
// branch). A matrix row past `rows` reads the tile's first row (tile0 <
// rows) and an input row past n the first input row (mma_input_rows): a row
// of either operand reaches only its own row or column of the product,
// whose partial is never summed, so no load needs a predicate or zeros.
// XS: see fp4_x8.
template <int NT, bool XBF16, bool NV, bool XS>
__device__ __noinline__ void fp4_mma_job(const GemvExpertFp4Args& a, const unsigned char* codes,
                                            const unsigned char* sc, u64 x, u32 ldx, const u32* rmap, u32 n,
                                            u32 row0, u32 rows, u32 tile0, u32 step0, u32 step1,
                                            float* part_in) {
    MK_PHASE(5);
    // Shared memory (passed in generic): see as_shared.
    float* const part = reinterpret_cast<float*>(as_shared(part_in));
    const u32 lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const u32 row_codes = a.cols / 2, row_scales = NV ? a.cols / 16 : a.cols / 32;
    const u32 ta = tile0 + g < rows ? tile0 + g : tile0, tb = tile0 + g + 8 < rows ? tile0 + g + 8 : tile0;
    // The lane's chunk (st * 4 + c) of rows g and g + 8, and its scale codes.
    constexpr u32 SCALES = NV ? 2 : 1;
    const u32 chunk = step0 * 4 + c;
    const unsigned char* ca = codes + (u64(row0) + ta) * row_codes + chunk * 16;
    const unsigned char* cb = codes + (u64(row0) + tb) * row_codes + chunk * 16;
    const unsigned char* sa = sc + (u64(row0) + ta) * row_scales + chunk * SCALES;
    const unsigned char* sb = sc + (u64(row0) + tb) * row_scales + chunk * SCALES;
    constexpr u32 XSIZE = XBF16 ? 2 : 4;
    const unsigned char* xp[NT];
    mma_input_rows<NT>(x, u64(ldx) * XSIZE, rmap, n, g, (u64(step0) * 128 + c * 32) * XSIZE, xp);
    Fp4Acc<NT> acc;
#pragma unroll
    for (int j = 0; j < NT; ++j) acc.v[j][0] = acc.v[j][1] = acc.v[j][2] = acc.v[j][3] = 0.0f;
    if (step0 < step1) {
        const u32 last = step1 - step0 - 1;
        // Two register sets, used in turn (no moves between steps).
        uint4 qa0 = ld_stream16(ca), qa1 = ld_stream16(cb), qb0, qb1;
        u32 sa0 = fp4_scale_codes<NV>(sa), sa1 = fp4_scale_codes<NV>(sb), sb0, sb1;
        for (u32 k = 0;; k += 2) {
            // Probe marks (tools/probes/fp4_probe.cu; none in the kernel): the
            // first, second and last column steps begin.
            if (k == 0) { MK_PHASE(6); }
            if (k == last) { MK_PHASE(8); }
            u32 nx = min(k + 1, last);
            qb0 = ld_stream16(ca + nx * 64), qb1 = ld_stream16(cb + nx * 64);
            sb0 = fp4_scale_codes<NV>(sa + nx * 4 * SCALES), sb1 = fp4_scale_codes<NV>(sb + nx * 4 * SCALES);
            fp4_mma_step_any<NT, XBF16, NV, XS>(acc, qa0, qa1, sa0, sa1, xp);
            if (k == last) break;
#pragma unroll
            for (int j = 0; j < NT; ++j) xp[j] += 128 * XSIZE;
            nx = min(k + 2, last);
            qa0 = ld_stream16(ca + nx * 64), qa1 = ld_stream16(cb + nx * 64);
            sa0 = fp4_scale_codes<NV>(sa + nx * 4 * SCALES), sa1 = fp4_scale_codes<NV>(sb + nx * 4 * SCALES);
            if (k == 0) { MK_PHASE(7); }
            if (k + 1 == last) { MK_PHASE(8); }
            fp4_mma_step_any<NT, XBF16, NV, XS>(acc, qb0, qb1, sb0, sb1, xp);
            if (k + 1 == last) break;
#pragma unroll
            for (int j = 0; j < NT; ++j) xp[j] += 128 * XSIZE;
        }
    }
    // c0, c1: row g, inputs 2c, 2c + 1 of the n-tile; c2, c3: row g + 8.
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        float* p0 = part + (tile0 + g) * 16 + j * 8 + 2 * c;
        float* p1 = part + (tile0 + g + 8) * 16 + j * 8 + 2 * c;
        p0[0] = acc.v[j][0], p0[1] = acc.v[j][1], p1[0] = acc.v[j][2], p1[1] = acc.v[j][3];
    }
    MK_PHASE(9);
}

// Matrix rows row0 .. row0 + rows for the n input rows of rmap (n <= 16),
// in sets of `batch` groups of rows: every warp takes (tile, slice) jobs of
// a set, then the block sums each row's slices in order and stores (or adds)
// the results. `part` is `batch` times fp4_mma_partial_bytes of shared
// memory. A row's jobs and sums are the same whatever the batch: only the
// barriers between groups go.
template <bool XBF16, bool NV>
__device__ __noinline__ void fp4_mma_rows(const GemvExpertFp4Args& a, const unsigned char* codes,
                                          const unsigned char* sc, float tscale, u64 x, u32 ldx, u64 y,
                                          const u32* rmap, u32 n, u32 row0, u32 rows, float* part_in, u32 batch) {
    // Shared memory (passed in generic): see as_shared.
    float* const part = reinterpret_cast<float*>(as_shared(part_in));
    u32 slices, per, group, shift;
    fp4_mma_shape(a.cols, slices, per, group, shift);
    group *= batch;  // rows whose partials are summed at once
    const u32 warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, steps = a.cols >> 7;
    // bf16 input rows in shared memory are read as such (fp4_x8); a single
    // row is copied there too (GemvInput::copy_one in fp4_input).
    const bool xs = XBF16 && __isShared(reinterpret_cast<const void*>(x));
    for (u32 g0 = 0; g0 < rows; g0 += group) {
        const u32 grows = min(group, rows - g0), tiles = (grows + 15) >> 4;
        for (u32 job = warp; job < tiles << shift; job += nwarps) {
            const u32 tile = job >> shift, slice = job & (slices - 1);
            const u32 s0 = slice * per, s1 = min(s0 + per, steps);
            float* p = part + slice * group * 16;
            const u32 r0 = row0 + g0, t0 = tile * 16;
            if (n <= 8) {
                if (xs) fp4_mma_job<1, XBF16, NV, XBF16>(a, codes, sc, x, ldx, rmap, n, r0, grows, t0, s0, s1, p);
                else fp4_mma_job<1, XBF16, NV, false>(a, codes, sc, x, ldx, rmap, n, r0, grows, t0, s0, s1, p);
            } else {
                if (xs) fp4_mma_job<2, XBF16, NV, XBF16>(a, codes, sc, x, ldx, rmap, n, r0, grows, t0, s0, s1, p);
                else fp4_mma_job<2, XBF16, NV, false>(a, codes, sc, x, ldx, rmap, n, r0, grows, t0, s0, s1, p);
            }
        }
        MK_PHASE(2);
        __syncthreads();
        MK_PHASE(3);
        for (u32 k = threadIdx.x; k < grows * n; k += blockDim.x) {
            const u32 r = k / n, i = k % n;
            float sum = 0.0f;
            for (u32 s = 0; s < slices; ++s) sum += part[(s * group + r) * 16 + i];
            if (NV) sum = sum * FP4_NV_UNDO * tscale;  // the 2^-64 of fp4_scale_pair, then the tensor scale
            const u64 idx = u64(rmap[i]) * a.ldy + row0 + g0 + r;
            const float prev = (a.flags & FP4_ACCUMULATE) ? load_float(y, a.y_dtype, idx) : 0.0f;
            store_float(y, a.y_dtype, idx, prev + sum);
        }
        __syncthreads();
    }
    MK_PHASE(4);
}

// Passes over a unit for the input rows in `mask`: one with tensor cores,
// else one per two input rows.
__device__ __forceinline__ u32 fp4_passes(const GemvExpertFp4Args& a, u32 mask) {
    const u32 k = __popc(mask & ((1u << a.m) - 1u));
    return fp4_mma_ok(a.cols) ? min(k, 1u) : (k + 1) / 2;
}

// The input rows of `slot`'s expert (the rows of every slot when they are
// shared); prepared in pair order for the tensor-core path (fp4_x8).
__device__ __forceinline__ GemvInput fp4_input(const GemvExpertFp4Args& a, u32 slot) {
    const u32 xsize = a.x_dtype == DTYPE_BF16 ? 2 : 4;
    const u64 step = (a.flags & FP4_X_PER_SLOT) ? u64(slot) * a.m * a.cols * xsize : 0;
    return {a.x + step, a.prologue == PROLOGUE_SWIGLU ? a.aux + step : a.aux, a.cols, a.m, a.cols,
            a.x_dtype, a.prologue, __uint_as_float(a.eps), false, true, fp4_mma_ok(a.cols)};
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

// Shared memory of a task: the input rows, then the partials.
__device__ __forceinline__ u32 fp4_scratch(const Ctx& c, const GemvExpertFp4Args& a) {
    return fp4_keep(c, a) + fp4_partials(a);
}

// Matrix rows row0 .. row0 + rows of the expert in `slot`, for the input rows
// routed to it. The input rows are prepared (shared memory) when `slot` needs
// other rows than the last call's (`prepared`: that slot, or ~0 for none).
// `mask_word`: the slot's row mask (list[1 + a.slots + slot]) and `expert`
// its id (list[1 + slot]), read by the caller in one trip.
__device__ __forceinline__ void fp4_expert_rows(const Ctx& c, const GemvExpertFp4Args& a, u32 mask_word, u64 expert,
                                                u32 slot, u32 row0, u32 rows, u32& prepared, u64& x, u32& ldx,
                                                bool& bf16, u32 pass = ~0u) {
    const u32 mask = mask_word & ((1u << a.m) - 1u);
    if (mask == 0u) return;
    const bool nv = a.format == FP4_NVFP4;
    const unsigned char* codes = reinterpret_cast<const unsigned char*>(a.w) + expert * a.ldy * (a.cols / 2);
    const u64 stride = fp4_scale_stride(a.format, a.ldy, a.cols);
    const unsigned char* sc = reinterpret_cast<const unsigned char*>(a.scales) + expert * stride;
    const float tscale = nv ? *reinterpret_cast<const float*>(sc + u64(a.ldy) * (a.cols / 16)) : 1.0f;
    const u32 ysize = a.y_dtype == DTYPE_BF16 ? 2 : 4;
    const u64 y = a.y + u64(slot) * a.m * a.ldy * ysize;
    const bool per_slot = a.flags & FP4_X_PER_SLOT;
    MK_PHASE(12);
    if (prepared == ~0u || (per_slot && prepared != slot)) {
        if (prepared != ~0u) __syncthreads();  // the last unit's reads of the prepared rows are done
        if (!gemv_input(c, fp4_input(a, slot), x, ldx, bf16, fp4_input_room(c, a))) return;
        prepared = slot;
    }
    MK_PHASE(1);
    // Only the rows routed to this expert (the mask after the list's ids).
    // With `pass`, only input rows 2 pass .. 2 pass + 2 of them.
    u32 rmap[16];
    u32 n = rows_of_mask(mask, rmap);
    if (fp4_mma_ok(a.cols)) {
        // Every input row at once (its one pass, fp4_passes).
        const u32 keep = fp4_keep(c, a);
        float* part = reinterpret_cast<float*>(c.scratch() + keep);
        if (fp4_scratch(c, a) > c.smem_bytes) {
            if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.cols, c.smem_bytes);
            return;
        }
        // Rows past one group: as many groups as their partials fit at once
        // (one at least: checked above).
        u32 slices, per, group;
        fp4_mma_shape(a.cols, slices, per, group);
        const u32 batch = rows > group ? (c.smem_bytes - keep) / fp4_partials(a) : 1u;
        if (bf16) {
            if (nv) fp4_mma_rows<true, true>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, part, batch);
            else fp4_mma_rows<true, false>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, part, batch);
        } else {
            if (nv) fp4_mma_rows<false, true>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, part, batch);
            else fp4_mma_rows<false, false>(a, codes, sc, tscale, x, ldx, y, rmap, n, row0, rows, part, batch);
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
        if (nv) fp4_rows<true, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
        else fp4_rows<true, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
    } else {
        if (nv) fp4_rows<false, true>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
        else fp4_rows<false, false>(a, codes, sc, tscale, x, ldx, y, rm, n, row0, rows);
    }
}

// Task t's units u0 .. u1 of `units` over `tasks`: the first units % tasks
// tasks take one unit more, in blocks that start at multiples of their
// size, so that where every slot has an even number of units, a block of
// two never straddles two slots (and runs as one call, fp4_spread).
__device__ __forceinline__ void fp4_share(u32 units, u32 t, u32 tasks, u32& u0, u32& u1) {
    const u32 q = units / tasks, r = units - q * tasks;
    u0 = t < r ? t * (q + 1) : r * (q + 1) + (t - r) * q;
    u1 = u0 + q + (t < r ? 1 : 0);
}

// Spread: the chosen experts' matrices cut into units of `rows` rows, one
// unit per pass over two of the input rows routed to the expert (an expert
// chosen by many rows is that much more work), dealt evenly over the tasks at
// run time: however many experts a block chose, and however unevenly, every
// SM streams an equal share. With tensor cores (one pass a unit) a run of
// units of one slot is one range of its matrix's rows, computed in one call
// (its groups share barriers; each row's arithmetic is the same). Out of
// line: blocks of rows only, and its registers stay out of the resident
// loop's.
__device__ __noinline__ void fp4_spread(const Ctx& c, const GemvExpertFp4Args& a, const u32* list) {
    u32 prepared = ~0u, ldx = 0;
    u64 x = 0;
    bool bf16 = false;
    const u32 per = (a.ldy + a.rows - 1) / a.rows, count = min(list[0], a.slots);
    u32 units = 0;
    MK_PHASE(10);
    for (u32 s = 0; s < count; ++s) units += fp4_passes(a, list[1 + a.slots + s]) * per;
    u32 u0, u1;
    fp4_share(units, a.slot, max(a.reserved, 1u), u0, u1);
    MK_PHASE(11);
    const bool merge = fp4_mma_ok(a.cols);
    // Units u0 .. u1 in order (slot, pass, first row), then one step past
    // them to compute the last run; one call site.
    u32 slot = 0, base = 0, size = fp4_passes(a, list[1 + a.slots]) * per;
    u32 run_slot = ~0u, run_pass = 0, run_r0 = 0, run_rows = 0;
    for (u32 u = u0; u <= u1; ++u) {
        u32 pass = 0, r0 = 0, rows = 0;
        if (u < u1) {
            while (u >= base + size) {
                base += size;
                ++slot;
                size = fp4_passes(a, list[1 + a.slots + slot]) * per;
            }
            const u32 k = u - base;
            pass = k / per, r0 = (k % per) * a.rows, rows = min(a.rows, a.ldy - r0);
        }
        if (u == u1 || !merge || slot != run_slot || r0 != run_r0 + run_rows) {
            if (run_rows) {
                fp4_expert_rows(c, a, list[1 + a.slots + run_slot], list[1 + run_slot], run_slot, run_r0, run_rows,
                                prepared, x, ldx, bf16, run_pass);
            }
            run_slot = slot, run_pass = pass, run_r0 = r0, run_rows = 0;
        }
        run_rows += rows;
    }
}

// The codes are read straight from global memory (no staging into shared
// memory: with the next column step loaded ahead, a warp keeps enough bytes
// in flight, and bulk copies of a task's share made its products wait behind
// them; BENCHMARKS.md has the figures).
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
    if (a.slot >= a.slots) {  // GemvExpertFp4::rows rejects it
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.slot, a.slots);
        return;
    }
    // The count, the slot's row mask and its expert in one trip, and the
    // slot's input rows (which do not depend on them) prepared meanwhile.
    const u32 count = list[0], mask = list[1 + a.slots + a.slot], expert = list[1 + a.slot];
    u32 ldx = 0;
    u64 x = 0;
    bool bf16 = false;
    if (!gemv_input(c, fp4_input(a, a.slot), x, ldx, bf16, fp4_input_room(c, a))) return;
    u32 prepared = a.slot;
    if (a.slot < count) fp4_expert_rows(c, a, mask, expert, a.slot, a.row0, a.rows, prepared, x, ldx, bf16);
}
