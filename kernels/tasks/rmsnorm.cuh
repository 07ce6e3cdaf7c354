// rmsnorm: y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w; src/task/rmsnorm.rs.
// Each row uses the whole block, one row after another (short rows too: the per-head norms).
#pragma once
#include "../include/task.cuh"

struct RmsNormArgs {
    u64 x;
    u64 w;
    u64 y;
    u32 rows;
    u32 cols;
    u32 eps;
    u32 x_dtype;
    u32 w_dtype;
    u32 y_dtype;
};
MK_SIZE(RmsNormArgs, 48);
MK_OFFSET(RmsNormArgs, x, 0);
MK_OFFSET(RmsNormArgs, w, 8);
MK_OFFSET(RmsNormArgs, y, 16);
MK_OFFSET(RmsNormArgs, rows, 24);
MK_OFFSET(RmsNormArgs, cols, 28);
MK_OFFSET(RmsNormArgs, eps, 32);
MK_OFFSET(RmsNormArgs, x_dtype, 36);
MK_OFFSET(RmsNormArgs, w_dtype, 40);
MK_OFFSET(RmsNormArgs, y_dtype, 44);

__device__ __forceinline__ void task_rmsnorm(const Ctx& c) {
    const RmsNormArgs& a = task_args<RmsNormArgs>(c);
    // The arguments in registers: stores through `y` would otherwise make
    // the compiler read them again from the descriptor.
    const float eps = __uint_as_float(a.eps);
    const u64 x = a.x, y = a.y, w = a.w;
    const u32 rows = a.rows, cols = a.cols, x_dtype = a.x_dtype, y_dtype = a.y_dtype, w_dtype = a.w_dtype;
    // One row at a time with the whole block, summing in the order of the
    // product prologue (gemv_prologue): a row normalises to the same bits
    // whether its norm is fused into the product or runs here, so blocks of
    // rows (verify, prefill) match single steps.
    float* scratch = reinterpret_cast<float*>(c.scratch());
    for (u32 r = 0; r < rows; ++r) {
        const u64 base = u64(r) * cols;
        // The weights travel while the first row's sum is formed (one line
        // per 32 of them): the second pass finds them in L1.
        if (r == 0) {
            for (u32 i = threadIdx.x * 32; i < cols; i += blockDim.x * 32) {
                prefetch_l1(reinterpret_cast<const unsigned char*>(w) + u64(i) * (w_dtype == DTYPE_BF16 ? 2 : 4));
            }
        }
        const float ss = row_sum_squares(x, x_dtype, base, cols);
        const float inv = rsqrtf(block_sum(ss, scratch) / float(cols) + eps);
        // ROW_BATCH elements of a thread loaded before any is used.
        for (u32 i0 = threadIdx.x; i0 < cols; i0 += ROW_BATCH * blockDim.x) {
            float v[ROW_BATCH], g[ROW_BATCH];
            load_row_batch(x, x_dtype, base, i0, blockDim.x, cols, v);
            load_row_batch(w, w_dtype, 0, i0, blockDim.x, cols, g);
#pragma unroll
            for (u32 j = 0; j < ROW_BATCH; ++j) {
                const u32 i = i0 + j * blockDim.x;
                if (i < cols) store_float(y, y_dtype, base + i, v[j] * inv * g[j]);
            }
        }
        __syncthreads();  // y may alias x: the next row's reads follow this row's writes
    }
}
