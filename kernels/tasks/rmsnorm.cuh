// rmsnorm: y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w; src/task/rmsnorm.rs.
// Long rows use the whole block per row; short rows (per-head norms) one warp per row.
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
    const float eps = __uint_as_float(a.eps);
    // One row at a time with the whole block, summing in the order of the
    // product prologue (gemv_prologue): a row normalises to the same bits
    // whether its norm is fused into the product or runs here, so blocks of
    // rows (verify, prefill) match single steps.
    float* scratch = reinterpret_cast<float*>(c.scratch());
    for (u32 r = 0; r < a.rows; ++r) {
        const u64 base = u64(r) * a.cols;
        float ss = 0.0f;
        for (u32 i = threadIdx.x; i < a.cols; i += blockDim.x) {
            const float v = load_float(a.x, a.x_dtype, base + i);
            ss = fmaf(v, v, ss);
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / float(a.cols) + eps);
        for (u32 i = threadIdx.x; i < a.cols; i += blockDim.x) {
            const float v = load_float(a.x, a.x_dtype, base + i);
            store_float(a.y, a.y_dtype, base + i, v * inv * load_float(a.w, a.w_dtype, i));
        }
        __syncthreads();  // y may alias x: the next row's reads follow this row's writes
    }
}
