// fill_random: dst[j] = random_value(key, index(j), std, mean) with index(j) =
// first + j, or first + (j / width) * stride + j % width for a strided part of
// a matrix (width > 0); src/task/fill_random.rs
// defines the stream. Integer hashing and two correctly rounded f32 operations
// (no contraction into an FMA), so values are bit-identical to the CPU's.
#pragma once
#include "../include/task.cuh"

struct FillRandomArgs {
    u64 dst;
    u64 key;
    u64 first;
    u32 n;
    u32 dtype;
    u32 std;
    u32 mean;
    u32 width;
    u32 stride;
};
MK_SIZE(FillRandomArgs, 48);
MK_OFFSET(FillRandomArgs, dst, 0);
MK_OFFSET(FillRandomArgs, key, 8);
MK_OFFSET(FillRandomArgs, first, 16);
MK_OFFSET(FillRandomArgs, n, 24);
MK_OFFSET(FillRandomArgs, dtype, 28);
MK_OFFSET(FillRandomArgs, std, 32);
MK_OFFSET(FillRandomArgs, mean, 36);
MK_OFFSET(FillRandomArgs, width, 40);
MK_OFFSET(FillRandomArgs, stride, 44);

__device__ __forceinline__ float random_value(u64 key, u64 i, float std, float mean) {
    u64 z = key + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const u32 s = u32(z & 0xFFFF) + u32((z >> 16) & 0xFFFF) + u32((z >> 32) & 0xFFFF) + u32(z >> 48);
    const float g = __fmul_rn(float(int(s) - 131070), 1.7320508f / 65536.0f);
    return __fadd_rn(mean, __fmul_rn(std, g));
}

MK_COLD_TASK void task_fill_random(const Ctx& c) {
    const FillRandomArgs& a = task_args<FillRandomArgs>(c);
    const float std = __uint_as_float(a.std), mean = __uint_as_float(a.mean);
    for (u32 j = threadIdx.x; j < a.n; j += blockDim.x) {
        const u64 i = a.width ? a.first + u64(j / a.width) * a.stride + j % a.width : a.first + j;
        store_float(a.dst, a.dtype, j, random_value(a.key, i, std, mean));
    }
}
