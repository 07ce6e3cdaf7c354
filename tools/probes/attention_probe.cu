// A plain kernel around the attention slice task's device code
// (kernels/tasks/attention.cuh), so that a profiler that serialises launches
// can look inside it: 132 blocks, each one task of a qwen3-30b-a3b step's
// attention stage (4 KV heads x 33 slices, 32 query heads of 128, bf16 q and
// cache, 1024 cached keys), for a block of m query rows (1: decode, 8 or 16:
// verify blocks), without the resident kernel's waits or signals.
//
//   tools/probes/run.sh [--ncu]     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/attention_probe.cu -o attention_probe
//   ./attention_probe [m] [launches]
//
// Prints the mean time of a launch (CUDA events, back to back); exits
// non-zero if a task reported a fault.
#include <vector>

#include "probe.cuh"
#include "tasks/attention.cuh"

__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    attention_probe(AttentionArgs base, DeviceState* st, StatusBlock* sb) {
    __shared__ Env env;
    __shared__ TaskDesc desc;
    if (threadIdx.x == 0) {
        AttentionArgs a = base;
        a.kv_head = blockIdx.x / a.chunks;
        a.chunk = blockIdx.x % a.chunks;
        probe_task(env, desc, a, st, sb);
    }
    __syncthreads();
    task_attention(probe_ctx(env, desc, PROBE_SMEM));
}

static unsigned short bf16_of(float v) {
    u32 b;
    memcpy(&b, &v, 4);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

int main(int argc, char** argv) {
    const u32 m = argc > 1 ? u32(atoi(argv[1])) : 8;
    const int launches = argc > 2 ? atoi(argv[2]) : 400;
    const u32 heads = 32, kv_heads = 4, hd = 128, chunks = 33, max_seq = 2048, pos0 = 1024;
    const u32 width = (heads + 2 * kv_heads) * hd;
    u64 seed = 11;
    auto fill = [&](size_t n) {
        std::vector<unsigned short> v(n);
        for (auto& x : v) x = bf16_of(float(lcg(seed) % 2001) / 1000.0f - 1.0f);
        return v;
    };
    const std::vector<unsigned short> q = fill(size_t(m) * width), kv = fill(size_t(2) * kv_heads * max_seq * hd);
    void *dq, *dkv, *dpos, *dpart;
    DeviceState* dst;
    StatusBlock* dsb;
    CHECK(cudaMalloc(&dq, q.size() * 2));
    CHECK(cudaMalloc(&dkv, kv.size() * 2));
    CHECK(cudaMalloc(&dpos, 4));
    CHECK(cudaMalloc(&dpart, size_t(m) * heads * chunks * (hd + 2) * 4));
    CHECK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dkv, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dpos, &pos0, 4, cudaMemcpyHostToDevice));
    probe_state(&dst, &dsb);
    AttentionArgs a;
    memset(&a, 0, sizeof a);
    a.qkv = u64(dq), a.cache = u64(dkv), a.pos = u64(dpos), a.partial = u64(dpart);
    a.m = m, a.heads = heads, a.kv_heads = kv_heads, a.head_dim = hd, a.max_seq = max_seq;
    a.chunks = chunks;
    const float scale = 1.0f / sqrtf(float(hd));
    memcpy(&a.scale, &scale, 4);
    a.qkv_dtype = DTYPE_BF16, a.cache_dtype = DTYPE_BF16;
    const u32 blocks = kv_heads * chunks;
    CHECK(cudaFuncSetAttribute(attention_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, PROBE_SMEM));
    auto launch = [&](int) { attention_probe<<<blocks, BLOCK_THREADS, PROBE_SMEM>>>(a, dst, dsb); };
    for (int i = 0; i < 3; ++i) launch(i);
    CHECK(cudaDeviceSynchronize());
    const float us = probe_time(launches, launch);
    const u32 fault = probe_fault(dsb);
    printf("attention, %u rows: %u blocks, %.2f us per launch, fault kind %u\n", m, blocks, us, fault);
    return fault != 0;
}
