// gemv_bf16: y[m, row0 + r] (+)= sum_c W[row0 + r, c] * x[m, c], f32 accumulation;
// src/task/gemv_bf16.rs. Products with bf16 input rows and columns a multiple
// of 32 run on tensor cores for every input-row count (gemv_mma_rows below).
// Otherwise one warp per matrix row; each lane streams 16-byte chunks of the
// row with UNROLL loads in flight; the matrix bypasses L1 (read once), x
// stays in L1 (read by every warp).
#pragma once
#include "../include/task.cuh"

struct GemvBf16Args {
    u64 w;
    u64 x;
    u64 y;
    u32 row0;
    u32 rows;
    u32 cols;
    u32 ldw;
    u32 m;
    u32 ldx;
    u32 ldy;
    u16 x_dtype;
    u16 y_dtype;
    u16 accumulate;
    u16 prologue;
    u32 eps;
    u64 aux;
};
MK_SIZE(GemvBf16Args, 72);
MK_OFFSET(GemvBf16Args, w, 0);
MK_OFFSET(GemvBf16Args, x, 8);
MK_OFFSET(GemvBf16Args, y, 16);
MK_OFFSET(GemvBf16Args, row0, 24);
MK_OFFSET(GemvBf16Args, rows, 28);
MK_OFFSET(GemvBf16Args, cols, 32);
MK_OFFSET(GemvBf16Args, ldw, 36);
MK_OFFSET(GemvBf16Args, m, 40);
MK_OFFSET(GemvBf16Args, ldx, 44);
MK_OFFSET(GemvBf16Args, ldy, 48);
MK_OFFSET(GemvBf16Args, x_dtype, 52);
MK_OFFSET(GemvBf16Args, y_dtype, 54);
MK_OFFSET(GemvBf16Args, accumulate, 56);
MK_OFFSET(GemvBf16Args, prologue, 58);
MK_OFFSET(GemvBf16Args, eps, 60);
MK_OFFSET(GemvBf16Args, aux, 64);

constexpr u16 PROLOGUE_NONE = 0;
constexpr u16 PROLOGUE_RMSNORM = 1;
constexpr u16 PROLOGUE_SWIGLU = 2;

// 16 bytes of a streamed-once matrix: no L1 allocation.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float f[8]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}

// Eight consecutive elements of x (f32 or bf16), 16-byte aligned.
template <bool XBF16>
__device__ __forceinline__ void load_x8(u64 x, u64 idx, float f[8]) {
    if (XBF16) {
        unpack_bf16x8(*reinterpret_cast<const uint4*>(x + idx * 2), f);
    } else {
        const float4 a = *reinterpret_cast<const float4*>(x + idx * 4);
        const float4 b = *reinterpret_cast<const float4*>(x + idx * 4 + 16);
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    }
}

// Input row `i` of a pass: through the row map when there is one.
__device__ __forceinline__ u32 gemv_row(const u32* rmap, u32 i) { return rmap ? rmap[i] : i; }

// Tensor-core products, lane (g, c): pointers to input rows j * 8 + g of the
// NT n-tiles (through the row map when there is one) at byte `off` of each
// row, and whether each row exists (rows from n on read as zeros).
template <int NT>
__device__ __forceinline__ void mma_input_rows(u64 x, u64 row_bytes, const u32* rmap, u32 n, u32 g, u64 off,
                                               const unsigned char* (&xp)[NT], bool (&live)[NT]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const u32 i = j * 8 + g;
        live[j] = i < n;
        xp[j] = reinterpret_cast<const unsigned char*>(x) + (live[j] ? u64(gemv_row(rmap, i)) * row_bytes : 0) + off;
    }
}

// The same pointers without the liveness (a row past n points at the first
// input row; for callers whose products of such rows are never stored).
template <int NT>
__device__ __forceinline__ void mma_input_rows(u64 x, u64 row_bytes, const u32* rmap, u32 n, u32 g, u64 off,
                                               const unsigned char* (&xp)[NT]) {
    bool live[NT];
    mma_input_rows<NT>(x, row_bytes, rmap, n, g, off, xp, live);
}

// Matrix rows of a task that were staged (TASK_FLAG_STAGE): the first
// `rows` rows of its slice, at `base` in shared memory.
struct StagedRows {
    const unsigned char* base;
    u32 rows;
};

template <int M, bool XBF16>
__device__ __forceinline__ void gemv_pass(const GemvBf16Args& a, u64 x, u32 ldx, const u32* rmap, u32 m0, u32 mcount,
                                          StagedRows st) {
    constexpr int UNROLL = 8;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 chunks = a.cols >> 3;
    for (u32 r = warp; r < a.rows; r += nwarps) {
        const u64 row = u64(a.row0) + r;
        const bool in_smem = r < st.rows;
        const char* wrow = in_smem ? reinterpret_cast<const char*>(st.base) + u64(r) * a.ldw * 2
                                   : reinterpret_cast<const char*>(a.w) + row * a.ldw * 2;
        float acc[M];
#pragma unroll
        for (int i = 0; i < M; ++i) acc[i] = 0.0f;
        for (u32 base = lane; base < chunks; base += 32 * UNROLL) {
            uint4 wv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const u32 ch = base + u * 32;
                wv[u] = ch >= chunks ? make_uint4(0, 0, 0, 0)
                        : in_smem    ? ld_shared16(wrow + u64(ch) * 16)
                                     : ld_stream16(wrow + u64(ch) * 16);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const u32 ch = base + u * 32;
                if (ch >= chunks) break;
                float wf[8];
                unpack_bf16x8(wv[u], wf);
#pragma unroll
                for (int i = 0; i < M; ++i) {
                    if (i < int(mcount)) {
                        float xf[8];
                        load_x8<XBF16>(x, u64(gemv_row(rmap, m0 + i)) * ldx + u64(ch) * 8, xf);
#pragma unroll
                        for (int k = 0; k < 8; ++k) acc[i] = fmaf(wf[k], xf[k], acc[i]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < M; ++i) {
            const float s = warp_sum(acc[i]);
            if (lane == 0 && i < int(mcount)) {
                const u64 idx = u64(gemv_row(rmap, m0 + i)) * a.ldy + row;
                const float prev = a.accumulate ? load_float(a.y, a.y_dtype, idx) : 0.0f;
                store_float(a.y, a.y_dtype, idx, prev + s);
            }
        }
    }
}

// The `n` input rows listed in `rmap` (all `a.m` rows in order when null).
template <bool XBF16>
__device__ __forceinline__ void gemv_rows(const GemvBf16Args& a, u64 x, u32 ldx, const u32* rmap, u32 n,
                                          StagedRows st) {
    // Input rows in passes of at most 8 (each pass streams the matrix once;
    // more accumulators would spill under the 128-register cap).
    for (u32 m0 = 0; m0 < n; m0 += 8) {
        const u32 mc = min(n - m0, 8u);
        if (mc == 1) gemv_pass<1, XBF16>(a, x, ldx, rmap, m0, 1, st);
        else if (mc == 2) gemv_pass<2, XBF16>(a, x, ldx, rmap, m0, 2, st);
        else if (mc <= 4) gemv_pass<4, XBF16>(a, x, ldx, rmap, m0, mc, st);
        else gemv_pass<8, XBF16>(a, x, ldx, rmap, m0, mc, st);
    }
}

// Where the input rows of a product come from and how they are prepared.
struct GemvInput {
    u64 x;         // rows, ldx elements apart
    u64 aux;       // RMSNorm weights (bf16) or the up rows (like x)
    u32 ldx;
    u32 m;
    u32 cols;
    u32 x_dtype;
    u32 prologue;
    float eps;
    bool in_place;  // several rows read in place all the same (GEMV_READ_IN_PLACE_ROWS)
    bool copy_one;  // a single row is copied too (the FP4 products read it as shared memory)
    bool pairs;     // bf16 rows prepared in shared memory in pair order (gemv_pair_slot)
};

// Pair order, for the FP4 tensor-core products: each eight elements of a
// prepared bf16 row lie as 0, 4, 1, 5, 2, 6, 3, 7, so that one 16-byte load
// gives the pairs (k, k + 4) that the decoded codes come in. The slot of
// element k of a row:
__device__ __forceinline__ u32 gemv_pair_slot(u32 k) { return (k & ~7u) | ((k & 3u) << 1) | ((k >> 2) & 1u); }

// Eight consecutive bf16 elements (16 bytes) in pair order.
__device__ __forceinline__ uint4 gemv_pair_order(const uint4& v) {
    return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                      __byte_perm(v.y, v.w, 0x7632));
}

// Input rows prepared in shared memory lie this many bytes further apart than
// their length: the FP4 products' lanes read 16 bytes at offsets 0, 64, 128
// and 192 of two rows at once, and with rows a multiple of 128 bytes apart
// both rows' pieces fell in the same banks (4-way conflicts; 2-way with the
// padding). The bf16 products' reads are 2-way either way.
constexpr u32 GEMV_ROW_PAD = 32;

// Tensor-core tasks of at most this many matrix rows read several input rows
// in place instead of copying them (src/task/gemv_bf16.rs mirrors it).
constexpr u32 GEMV_READ_IN_PLACE_ROWS = 64;

// The stride (elements) of prepared input rows of `cols` elements of `size` bytes.
__device__ __forceinline__ u32 gemv_prepared_ld(u32 cols, u32 size) { return cols + GEMV_ROW_PAD / size; }

// Prepares the input rows into shared memory as bf16 (RMSNorm or SwiGLU, with
// the same arithmetic as the rmsnorm and swiglu tasks), gemv_prepared_ld
// apart, and returns their address; the rows are then read from shared
// memory by every warp.
__device__ __forceinline__ u64 gemv_prologue(const Ctx& c, const GemvInput& in) {
    u16* xs = reinterpret_cast<u16*>(c.scratch());
    const u32 ld = gemv_prepared_ld(in.cols, 2);
    float* scratch = reinterpret_cast<float*>(c.scratch() + in.m * ld * 2);
    if (in.prologue == PROLOGUE_SWIGLU && in.m > 1 && in.x_dtype == DTYPE_BF16 && (in.cols & 7) == 0 &&
        ((in.x | in.aux | (u64(in.ldx) * 2)) & 15) == 0) {
        // Blocks of rows: eight columns of a row per thread and step, both
        // loads issued before either is used; each element is swiglu_value,
        // as below, so a row's result is the same either way. (A single row
        // keeps the element loop: vectorised it measured slower there.)
        const u32 per = in.cols / 8;
        for (u32 k = threadIdx.x; k < in.m * per; k += blockDim.x) {
            const u32 i = k / per, j = k % per;
            const u64 off = (u64(i) * in.ldx + j * 8) * 2;
            const uint4 g = *reinterpret_cast<const uint4*>(in.x + off);
            const uint4 u = *reinterpret_cast<const uint4*>(in.aux + off);
            const u32 gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
            u32 e[8];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float g0 = __uint_as_float(gw[t] << 16), g1 = __uint_as_float(gw[t] & 0xFFFF0000u);
                const float u0 = __uint_as_float(uw[t] << 16), u1 = __uint_as_float(uw[t] & 0xFFFF0000u);
                e[2 * t] = f32_to_bf16(swiglu_value(g0, u0)), e[2 * t + 1] = f32_to_bf16(swiglu_value(g1, u1));
            }
            u32 out[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                out[t] = in.pairs ? e[t] | (e[t + 4] << 16) : e[2 * t] | (e[2 * t + 1] << 16);
            }
            *reinterpret_cast<uint4*>(xs + u64(i) * ld + j * 8) = make_uint4(out[0], out[1], out[2], out[3]);
        }
        __syncthreads();
        return reinterpret_cast<u64>(xs);
    }
    for (u32 i = 0; i < in.m; ++i) {
        const u64 row = u64(i) * in.ldx;
        // Both passes load ROW_BATCH elements of a thread before using them.
        if (in.prologue == PROLOGUE_RMSNORM) {
            // The norm weights travel while the sum is formed (one line per
            // 64 of them): the second pass finds them in L1.
            if (i == 0) {
                for (u32 k = threadIdx.x * 64; k < in.cols; k += blockDim.x * 64) {
                    prefetch_l1(reinterpret_cast<const u16*>(in.aux) + k);
                }
            }
            const float ss = row_sum_squares(in.x, in.x_dtype, row, in.cols);
            const float inv = rsqrtf(block_sum(ss, scratch) / float(in.cols) + in.eps);
            for (u32 k0 = threadIdx.x; k0 < in.cols; k0 += ROW_BATCH * blockDim.x) {
                float v[ROW_BATCH], g[ROW_BATCH];
                load_row_batch(in.x, in.x_dtype, row, k0, blockDim.x, in.cols, v);
                load_row_batch(in.aux, DTYPE_BF16, 0, k0, blockDim.x, in.cols, g);
#pragma unroll
                for (u32 j = 0; j < ROW_BATCH; ++j) {
                    const u32 k = k0 + j * blockDim.x;
                    if (k < in.cols) xs[i * ld + (in.pairs ? gemv_pair_slot(k) : k)] = f32_to_bf16(v[j] * inv * g[j]);
                }
            }
        } else {
            for (u32 k0 = threadIdx.x; k0 < in.cols; k0 += ROW_BATCH * blockDim.x) {
                float g[ROW_BATCH], u[ROW_BATCH];
                load_row_batch(in.x, in.x_dtype, row, k0, blockDim.x, in.cols, g);
                load_row_batch(in.aux, in.x_dtype, row, k0, blockDim.x, in.cols, u);
#pragma unroll
                for (u32 j = 0; j < ROW_BATCH; ++j) {
                    const u32 k = k0 + j * blockDim.x;
                    if (k < in.cols) xs[i * ld + (in.pairs ? gemv_pair_slot(k) : k)] = f32_to_bf16(swiglu_value(g[j], u[j]));
                }
            }
        }
    }
    __syncthreads();
    return reinterpret_cast<u64>(xs);
}

// Bytes of shared memory the prologue needs.
__device__ __forceinline__ u32 gemv_prologue_bytes(u32 m, u32 cols) {
    return m * gemv_prepared_ld(cols, 2) * 2 + 32 * 4;
}

// Bytes of shared memory gemv_input takes for `in` when it may use `room`
// bytes: the prologue's rows, the rows copied unchanged, or 0 when the
// product reads x in place.
__device__ __forceinline__ u32 gemv_input_bytes(const GemvInput& in, u32 room) {
    if (in.prologue != PROLOGUE_NONE) return gemv_prologue_bytes(in.m, in.cols);
    const u32 size = in.x_dtype == DTYPE_BF16 ? 2 : 4, row_bytes = in.cols * size;
    // Several rows are copied, since every warp rereads them for each matrix
    // row and the L1 left beside the kernel's shared memory does not hold
    // them; a single row when the caller asks (copy_one).
    const bool copy = !in.in_place && (in.m > 1 || in.copy_one) && in.m * (row_bytes + GEMV_ROW_PAD) <= room &&
                      (row_bytes & 15) == 0 && ((in.x | (u64(in.ldx) * size)) & 15) == 0;
    return copy ? in.m * (row_bytes + GEMV_ROW_PAD) : 0u;
}

// The rows the product reads: prepared in the first `room` bytes of shared
// memory (as bf16, ld = cols), copied there unchanged, or `x` itself. False
// (after reporting a fault) when the prologue is unknown or does not fit.
__device__ __forceinline__ bool gemv_input(const Ctx& c, const GemvInput& in, u64& x, u32& ldx, bool& bf16,
                                           u32 room) {
    if (in.prologue == PROLOGUE_NONE) {
        bf16 = in.x_dtype == DTYPE_BF16;
        const u32 bytes = gemv_input_bytes(in, room);
        if (bytes) {
            const u32 size = bf16 ? 2 : 4, per_row = in.cols * size / 16, ld = gemv_prepared_ld(in.cols, size);
            const bool pairs = in.pairs && bf16;
            if (in.m == 1) {  // a single row (copy_one) without a division per element
                for (u32 j = threadIdx.x; j < per_row; j += blockDim.x) {
                    const uint4 v = *reinterpret_cast<const uint4*>(in.x + u64(j) * 16);
                    *reinterpret_cast<uint4*>(c.scratch() + u64(j) * 16) = pairs ? gemv_pair_order(v) : v;
                }
            }
            for (u32 k = threadIdx.x; in.m > 1 && k < in.m * per_row; k += blockDim.x) {
                const u32 i = k / per_row, j = k % per_row;
                const uint4 v = *reinterpret_cast<const uint4*>(in.x + u64(i) * in.ldx * size + u64(j) * 16);
                unsigned char* dst = c.scratch() + u64(i) * ld * size + u64(j) * 16;
                *reinterpret_cast<uint4*>(dst) = pairs ? gemv_pair_order(v) : v;
            }
            __syncthreads();
            x = reinterpret_cast<u64>(c.scratch()), ldx = ld;
            return true;
        }
        x = in.x, ldx = in.ldx;
        return true;
    }
    if ((in.prologue != PROLOGUE_RMSNORM && in.prologue != PROLOGUE_SWIGLU) ||
        gemv_prologue_bytes(in.m, in.cols) > room) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, in.prologue, gemv_prologue_bytes(in.m, in.cols));
        return false;
    }
    x = gemv_prologue(c, in), ldx = gemv_prepared_ld(in.cols, 2), bf16 = true;
    return true;
}

// Tensor-core products: bf16 input rows (as given or prepared by a
// prologue), columns a multiple of 32, every input-row count. A warp
// multiplies a 16-row tile of the matrix by up to 16 input rows with
// mma.m16n8k16 over one column slice of gemv_mma_per 32-column chunks. Lane
// (g, c) loads 16 bytes (eight columns) of matrix rows g and g + 8 and of
// input row g per chunk; k is permuted alike in both operands (the chunk's
// first mma takes columns 4h .. 4h + 3 of each lane's eight, h = 0, then
// h = 1), so the loaded words are the fragments as they come. The slices of
// a row depend on its column count alone, each is accumulated in order by
// one warp and the slices are summed in order: a row's result does not
// depend on how many input rows are computed with it, or where.
// Chunks per slice: 8 up to 4096 columns, else 16 (fewer partials to keep).
__device__ __forceinline__ u32 gemv_mma_per(u32 cols) { return cols <= 4096 ? 8 : 16; }

__device__ __forceinline__ u32 gemv_mma_slices(u32 cols) {
    return (cols / 32 + gemv_mma_per(cols) - 1) / gemv_mma_per(cols);
}

// Shared memory the slice partials of one 16-row tile need for 16 input rows;
// reserved before the input rows are prepared (so the choice of path never
// depends on the input-row count).
__device__ __forceinline__ u32 gemv_mma_tile_bytes(u32 cols) { return gemv_mma_slices(cols) * 16 * 16 * 4; }

// Whether a product takes the tensor-core path: decided by its shape, input
// type and alignment, never by its input-row count.
__device__ __forceinline__ bool gemv_mma_ok(const GemvBf16Args& a) {
    return (a.cols & 31) == 0 && (a.w & 15) == 0 &&
           (a.prologue != PROLOGUE_NONE ||
            (a.x_dtype == DTYPE_BF16 && ((a.x | (u64(a.ldx) * 2)) & 15) == 0));
}

// One warp: task rows r0 .. r0 + 16 (those below a.rows) over chunks
// ch0 .. ch1, for input rows 0 .. n (through rmap), NT n-tiles of 8; the
// partials go to part[row - rbase][input row] (NT * 8 floats a row).
template <int NT>
__device__ __noinline__ void gemv_mma_job(const GemvBf16Args& a, u64 x, u32 ldx, const u32* rmap, u32 n,
                                          StagedRows st, u32 r0, u32 ch0, u32 ch1, float* part_in, u32 rbase) {
    MK_PHASE(7);
    // Shared memory (passed in generic): see as_shared.
    float* const part = reinterpret_cast<float*>(as_shared(part_in));
    // Chunks whose loads are in flight at once. Four rather than eight: on an
    // H200 eight per lane (96 registers of loads) cost spills and read
    // 8192 x 8192 at 75 % of a plain read's bandwidth, four at 82 %
    // (tools/probes/gemv_probe.cu `sq`), and every decode shape was faster.
    constexpr u32 U = 4;
    const u32 lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const u32 ra = r0 + g, rb = ra + 8;
    const bool la = ra < a.rows, lb = rb < a.rows, sa = ra < st.rows, sb = rb < st.rows;
    const u64 rowb = u64(a.ldw) * 2, off = u64(ch0) * 64 + c * 16;
    const unsigned char* w = reinterpret_cast<const unsigned char*>(a.w) + u64(a.row0) * rowb;
    const unsigned char* pa = (sa ? st.base : w) + u64(ra) * rowb + off;
    const unsigned char* pb = (sb ? st.base : w) + u64(rb) * rowb + off;
    const unsigned char* xp[NT];
    bool xl[NT];
    mma_input_rows<NT>(x, u64(ldx) * 2, rmap, n, g, off, xp, xl);
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    MK_PHASE(8);
    for (u32 ch = ch0; ch < ch1; ch += U) {
        uint4 qa[U], qb[U], x1[NT == 1 ? U : 1];
#pragma unroll
        for (u32 u = 0; u < U; ++u) {
            const bool in = ch + u < ch1;
            qa[u] = in && la ? (sa ? ld_shared16(pa + u * 64) : ld_stream16(pa + u * 64)) : zero;
            qb[u] = in && lb ? (sb ? ld_shared16(pb + u * 64) : ld_stream16(pb + u * 64)) : zero;
            // One n-tile (at most 8 input rows): its x chunks load with the matrix.
            if (NT == 1) x1[u] = in && xl[0] ? *reinterpret_cast<const uint4*>(xp[0] + u * 64) : zero;
        }
        MK_PHASE(9);
#pragma unroll
        for (u32 u = 0; u < U; ++u) {
            if (ch + u >= ch1) break;
            u32 xw[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint4 v = NT == 1 ? x1[u] : xl[j] ? *reinterpret_cast<const uint4*>(xp[j] + u * 64) : zero;
                xw[j][0] = v.x, xw[j][1] = v.y, xw[j][2] = v.z, xw[j][3] = v.w;
            }
            const u32 wa[4] = {qa[u].x, qa[u].y, qa[u].z, qa[u].w}, wb[4] = {qb[u].x, qb[u].y, qb[u].z, qb[u].w};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 af[4] = {wa[2 * h], wb[2 * h], wa[2 * h + 1], wb[2 * h + 1]};
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_bf16_16816(acc[j], af, xw[j][2 * h], xw[j][2 * h + 1]);
            }
        }
        pa += U * 64, pb += U * 64;
#pragma unroll
        for (int j = 0; j < NT; ++j) xp[j] += U * 64;
    }
    MK_PHASE(10);
    // acc[j][0..1]: row g, inputs j * 8 + 2c, + 1; acc[j][2..3]: row g + 8.
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        float* p0 = part + (ra - rbase) * (NT * 8) + j * 8 + 2 * c;
        float* p1 = p0 + 8 * (NT * 8);
        p0[0] = acc[j][0], p0[1] = acc[j][1], p1[0] = acc[j][2], p1[1] = acc[j][3];
    }
    MK_PHASE(11);
}

// The task's rows in groups of `group` (a multiple of 16): every warp takes
// (tile, slice) jobs, then the block sums each row's slices in order and
// stores (or adds) the results. `part` holds slices * group * NT * 8 floats.
template <int NT>
__device__ __noinline__ void gemv_mma_rows(const GemvBf16Args& a, u64 x, u32 ldx, const u32* rmap, u32 n,
                                           StagedRows st, float* part_in, u32 group) {
    // Shared memory (passed in generic): see as_shared.
    float* const part = reinterpret_cast<float*>(as_shared(part_in));
    const u32 warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u32 chunks = a.cols / 32, slices = gemv_mma_slices(a.cols);
    for (u32 g0 = 0; g0 < a.rows; g0 += group) {
        const u32 grows = min(group, a.rows - g0), tiles = (grows + 15) / 16;
        for (u32 job = warp; job < tiles * slices; job += nwarps) {
            const u32 tile = job / slices, s = job % slices;
            const u32 c0 = s * gemv_mma_per(a.cols), c1 = min(c0 + gemv_mma_per(a.cols), chunks);
            gemv_mma_job<NT>(a, x, ldx, rmap, n, st, g0 + tile * 16, c0, c1, part + s * group * (NT * 8), g0);
        }
        MK_PHASE(2);
        __syncthreads();
        MK_PHASE(3);
        for (u32 k = threadIdx.x; k < grows * n; k += blockDim.x) {
            const u32 r = k / n, i = k % n;
            float sum = 0.0f;
            for (u32 s = 0; s < slices; ++s) sum += part[(s * group + r) * (NT * 8) + i];
            const u64 idx = u64(gemv_row(rmap, i)) * a.ldy + a.row0 + g0 + r;
            const float prev = a.accumulate ? load_float(a.y, a.y_dtype, idx) : 0.0f;
            store_float(a.y, a.y_dtype, idx, prev + sum);
        }
        __syncthreads();
    }
    MK_PHASE(4);
}

// With `rmap`, only the `n` rows it lists are computed (the others keep
// whatever they held).
__device__ __forceinline__ void gemv_dispatch(const Ctx& c, const GemvBf16Args& a, const u32* rmap = nullptr,
                                              u32 n = 0) {
    const bool mma = gemv_mma_ok(a);
    // On tensor cores a task of at most GEMV_READ_IN_PLACE_ROWS rows reads
    // each element of its input rows once per 16-row tile (the repeats hit
    // L1): copying them would take shared memory from the staged matrix, and
    // time, for little reuse.
    const GemvInput in = {a.x, a.aux, a.ldx, a.m, a.cols, a.x_dtype, a.prologue, __uint_as_float(a.eps),
                          mma && a.rows <= GEMV_READ_IN_PLACE_ROWS, false, false};
    u64 x;
    u32 ldx;
    bool bf16;
    // The tensor-core path keeps room for one tile's partials beside the input rows.
    const u32 reserve = mma ? gemv_mma_tile_bytes(a.cols) + 128 : 0u;
    if (reserve > c.smem_bytes) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, reserve, c.smem_bytes);
        return;
    }
    const u32 room = c.smem_bytes - reserve;
    if (!gemv_input(c, in, x, ldx, bf16, room)) return;
    MK_PHASE(1);
    if (!rmap) n = a.m;
    // A staged slice holds whole rows from row0 on (the declared range).
    const StagedRows st = {c.staged, c.staged && a.ldw == a.cols ? c.staged_bytes / (a.ldw * 2) : 0u};
    if (mma) {
        const u32 at = (gemv_input_bytes(in, room) + 127) & ~127u;
        const u32 nt = n > 8 ? 2 : 1, tile = gemv_mma_slices(a.cols) * 16 * nt * 8 * 4;
        const u32 tiles = max(1u, min((c.smem_bytes - at) / tile, (a.rows + 15) / 16));
        float* part = reinterpret_cast<float*>(c.scratch() + at);
        if (nt == 1) gemv_mma_rows<1>(a, x, ldx, rmap, n, st, part, tiles * 16);
        else gemv_mma_rows<2>(a, x, ldx, rmap, n, st, part, tiles * 16);
        return;
    }
    if (bf16) gemv_rows<true>(a, x, ldx, rmap, n, st);
    else gemv_rows<false>(a, x, ldx, rmap, n, st);
}

// The rows set in `mask` (bit i: row i), ascending, into `rmap`; returns how
// many. Every thread computes the same list.
__device__ __forceinline__ u32 rows_of_mask(u32 mask, u32* rmap) {
    u32 n = 0;
    for (; mask; mask &= mask - 1) rmap[n++] = __ffs(mask) - 1;
    return n;
}

__device__ __forceinline__ void task_gemv_bf16(const Ctx& c) {
    const GemvBf16Args& a = task_args<GemvBf16Args>(c);
    if ((a.cols & 7) || (a.ldw & 7) || a.m == 0 || a.m > 16) {
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, a.cols, a.m);
        return;
    }
    gemv_dispatch(c, a);
}
