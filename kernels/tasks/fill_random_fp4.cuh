// fill_random_fp4: random weights drawn and quantized to MXFP4 on the device,
// bit-identical to quantizing fill_random's values on the host
// (src/quant.rs, quantize_mxfp4); src/task/fill_random_fp4.rs.
#pragma once
#include "fill_random.cuh"

struct FillRandomFp4Args {
    u64 codes;
    u64 scales;
    u64 key;
    u32 first_block;
    u32 blocks;
    u32 part_cols;
    u32 full_cols;
    u32 row0;
    u32 col0;
    u32 std;
    u32 mean;
};
MK_SIZE(FillRandomFp4Args, 56);
MK_OFFSET(FillRandomFp4Args, codes, 0);
MK_OFFSET(FillRandomFp4Args, scales, 8);
MK_OFFSET(FillRandomFp4Args, key, 16);
MK_OFFSET(FillRandomFp4Args, first_block, 24);
MK_OFFSET(FillRandomFp4Args, blocks, 28);
MK_OFFSET(FillRandomFp4Args, part_cols, 32);
MK_OFFSET(FillRandomFp4Args, full_cols, 36);
MK_OFFSET(FillRandomFp4Args, row0, 40);
MK_OFFSET(FillRandomFp4Args, col0, 44);
MK_OFFSET(FillRandomFp4Args, std, 48);
MK_OFFSET(FillRandomFp4Args, mean, 52);

// E8M0 scale of a block whose largest magnitude is `amax`: floor(log2) - 2.
__device__ __forceinline__ u32 mxfp4_scale_code(float amax) {
    if (amax == 0.0f) return 0u;
    const u32 bits = __float_as_uint(amax);
    const int e = (bits >> 23) == 0u ? -127 - (int(__clz(bits)) - 9) : int((bits >> 23) & 0xFFu) - 127;
    return u32(min(max(e - 2 + 127, 0), 254));
}

// The E2M1 code nearest to x (ties to the even code), clipped at 6.
__device__ __forceinline__ u32 e2m1_code(float x) {
    const u32 sign = (__float_as_uint(x) >> 31) ? 8u : 0u;
    const float a = fabsf(x);
    const float mid[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    u32 code = 7u;
#pragma unroll
    for (u32 i = 0; i < 7; ++i) {
        if (a < mid[i] || (a == mid[i] && (i & 1u) == 0u)) {
            code = i;
            break;
        }
    }
    return sign | code;
}

MK_COLD_TASK void task_fill_random_fp4(const Ctx& c) {
    const FillRandomFp4Args& a = task_args<FillRandomFp4Args>(c);
    const float std = __uint_as_float(a.std), mean = __uint_as_float(a.mean);
    u32* codes = reinterpret_cast<u32*>(a.codes);
    u32* scales = reinterpret_cast<u32*>(a.scales);
    // One thread per group of four blocks: 16 code words and one scale word.
    for (u32 g = threadIdx.x; g < a.blocks / 4; g += blockDim.x) {
        u32 scale_word = 0;
        for (u32 k = 0; k < 4; ++k) {
            const u64 b = u64(a.first_block) + 4 * g + k;
            float v[32];
            float amax = 0.0f;
#pragma unroll
            for (u32 j = 0; j < 32; ++j) {
                const u64 p = b * 32 + j;
                const u64 r = p / a.part_cols, col = p % a.part_cols;
                const u64 idx = (a.row0 + r) * a.full_cols + a.col0 + col;
                v[j] = random_value(a.key, idx, std, mean);
                amax = fmaxf(amax, fabsf(v[j]));
            }
            const u32 s = mxfp4_scale_code(amax);
            const float inv = __uint_as_float((254u - s) << 23);  // 2^(127 - s)
#pragma unroll
            for (u32 w = 0; w < 4; ++w) {
                u32 word = 0;
#pragma unroll
                for (u32 j = 0; j < 8; ++j) word |= e2m1_code(__fmul_rn(v[8 * w + j], inv)) << (4 * j);
                codes[(4 * g + k) * 4 + w] = word;
            }
            scale_word |= s << (8 * k);
        }
        scales[g] = scale_word;
    }
}
