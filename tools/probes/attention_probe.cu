// A plain kernel around the attention slice task's device code
// (kernels/tasks/attention.cuh), so that a profiler that serialises launches
// can look inside it: 132 blocks, each one task of a qwen3-30b-a3b step's
// attention stage (4 KV heads x 33 slices, 32 query heads of 128, bf16 q and
// cache, 1024 cached keys), for a block of m query rows (1: decode, 8 or 16:
// verify blocks), without the resident kernel's waits or signals.
//
//   tools/probes/run.sh [--ncu]     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/attention_probe.cu -o attention_probe
//   ./attention_probe [m] [launches] [rope|plain] [hbm]   (PROBE_CHUNKS=N: N slices per KV head, not 33;
//   PROBE_POS=P: P cached keys, not 1024; PROBE_COLD=1: each body after
//   other code, its own out of the instruction cache, as in the resident kernel)
//
// With `rope`, the tasks also normalise and rotate q and the block's keys
// themselves (a rope table, AttentionArgs::rope), as a model layer's do.
// With `hbm`, launch i reads cache i % 32 (128 MB in all), so that its keys
// and values come from memory, as a decode layer's do, not from L2.
// Prints a hash of the partials (builds that must give the same bits print
// the same hash), the mean time of a launch (CUDA events, back to back), then the
// mean and slowest block's SM clock at the task's marks (MK_PHASE: slices
// computed and q's copies issued, the block's keys appended, q rotated, the
// first tile landed, its scores, softmax and P·V done, the last tile done,
// the end; with two sub-blocks of rows, the second's); exits non-zero if a
// task reported a fault.
#include <cmath>
#include <cstring>
#include <vector>

#include "phases.cuh"
#include "tasks/attention.cuh"

__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    attention_probe(AttentionArgs base, u32 cold_code, DeviceState* st, StatusBlock* sb) {
    __shared__ Env env;
    __shared__ TaskDesc desc;
    if (threadIdx.x == 0) {
        AttentionArgs a = base;
        a.kv_head = blockIdx.x / a.chunks;
        a.chunk = blockIdx.x % a.chunks;
        probe_task(env, desc, a, st, sb);
    }
    // The body's code out of the instruction cache (as after other tasks).
    if (cold_code) probe_evict_code(threadIdx.x);
    __syncthreads();
    MK_PHASE(0);
    task_attention(probe_ctx(env, desc, PROBE_SMEM));
    __syncthreads();
    if (threadIdx.x == 0) {
        MK_PHASE(9);
        probe_phases_add(9);
    }
}

static unsigned short bf16_of(float v) {
    u32 b;
    memcpy(&b, &v, 4);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

int main(int argc, char** argv) {
    const u32 m = argc > 1 ? u32(atoi(argv[1])) : 8;
    const int launches = argc > 2 ? atoi(argv[2]) : 400;
    const bool rope = argc > 3 && strcmp(argv[3], "rope") == 0;
    const u32 caches = argc > 4 && strcmp(argv[4], "hbm") == 0 ? 32 : 1;
    const u32 pos0 = getenv("PROBE_POS") ? u32(atoi(getenv("PROBE_POS"))) : 1024;
    const u32 heads = 32, kv_heads = 4, hd = 128, max_seq = pos0 + 1024;
    const u32 chunks = getenv("PROBE_CHUNKS") ? u32(atoi(getenv("PROBE_CHUNKS"))) : 33;
    const u32 cold_code = getenv("PROBE_COLD") ? 1u : 0u;
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
    CHECK(cudaMalloc(&dkv, kv.size() * 2 * caches));
    CHECK(cudaMalloc(&dpos, 4));
    CHECK(cudaMalloc(&dpart, size_t(m) * heads * chunks * (hd + 2) * 4));
    CHECK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    for (u32 k = 0; k < caches; ++k) {
        CHECK(cudaMemcpy(static_cast<char*>(dkv) + kv.size() * 2 * k, kv.data(), kv.size() * 2, cudaMemcpyHostToDevice));
    }
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
    if (rope) {  // norms near 1, Qwen3's theta, eps
        std::vector<float> t(2 * hd + hd / 2 + 1);
        for (u32 j = 0; j < 2 * hd; ++j) t[j] = 1.0f + float(lcg(seed) % 601) / 1000.0f - 0.3f;
        for (u32 j = 0; j < hd / 2; ++j) t[2 * hd + j] = float(1.0 / pow(1e6, 2.0 * j / hd));
        t[2 * hd + hd / 2] = 1e-6f;
        void* dt;
        CHECK(cudaMalloc(&dt, t.size() * 4));
        CHECK(cudaMemcpy(dt, t.data(), t.size() * 4, cudaMemcpyHostToDevice));
        a.rope = u64(dt);
    }
    const u32 blocks = kv_heads * chunks;
    CHECK(cudaFuncSetAttribute(attention_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, PROBE_SMEM));
    auto launch = [&](int i) {
        AttentionArgs li = a;
        li.cache = a.cache + u64(i % int(caches)) * kv.size() * 2;
        attention_probe<<<blocks, BLOCK_THREADS, PROBE_SMEM>>>(li, cold_code, dst, dsb);
    };
    for (int i = 0; i < 3; ++i) launch(i);
    CHECK(cudaDeviceSynchronize());
    probe_phases_reset();
    const float us = probe_time(launches, launch);
    const u32 fault = probe_fault(dsb);
    // A hash of the partials (FNV-1a over their bytes): builds that must
    // compute the same bits print the same hash.
    std::vector<unsigned char> part(size_t(m) * heads * chunks * (hd + 2) * 4);
    CHECK(cudaMemcpy(part.data(), dpart, part.size(), cudaMemcpyDeviceToHost));
    u64 hash = 1469598103934665603ull;
    for (unsigned char b : part) hash = (hash ^ b) * 1099511628211ull;
    printf("partials hash %016llx\n", (unsigned long long)hash);
    printf("attention, %u rows%s%s%s: %u blocks, %.2f us per launch, fault kind %u\n", m, rope ? ", rope" : "",
           caches > 1 ? ", cache from memory" : "", cold_code ? ", code cold" : "", blocks, us, fault);
    const char* names[10] = {"",           "slices, q issued", "keys appended", "q rotated", "1st tile landed",
                             "... scores", "... softmax",      "... P.V",       "last tile",  "end"};
    probe_phases_print(names, 9, double(blocks) * launches);
    return fault != 0;
}
