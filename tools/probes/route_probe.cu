// A plain kernel around the routing task body (kernels/tasks/moe_route.cuh)
// with its phases marked: each block routes m rows of its own router logits
// (128 experts, top 8, renormalised: a qwen3-30b-a3b layer), as the resident
// kernel would, without its waits or signals, and thread 0 reads the SM clock
// (MK_PHASE) where the body enters, after the shared flags are cleared (1),
// once row 0's logit loads are issued (2; the clock read does not wait for
// them, so their round trip falls into the next phase), its softmax done (3),
// its top-k rounds done (4), its picks stored (5), after the block's barrier
// (6) and once the list is written (7).
//
//   tools/probes/run.sh     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/route_probe.cu -o route_probe
//   ./route_probe [rows] [launches] [warm|cold-code]
//
// `cold-code`: each body comes after other code that leaves none of its own
// in the SM's instruction cache (probe_evict_code), as in a step.
#include <algorithm>
#include <vector>

#include "phases.cuh"
#include "tasks/moe_route.cuh"

__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    route_probe(MoeRouteArgs base, u32 list_len, u32 cold_code, DeviceState* st, StatusBlock* sb) {
    __shared__ Env env;
    __shared__ TaskDesc desc;
    const u32 b = blockIdx.x;
    if (threadIdx.x == 0) {
        MoeRouteArgs a = base;
        a.logits += u64(b) * a.m * a.experts * 4;
        a.weights += u64(b) * a.m * a.experts * 4;
        a.list += u64(b) * list_len * 4;
        probe_task(env, desc, a, st, sb);
    }
    __syncthreads();
    const Ctx c = probe_ctx(env, desc, PROBE_SMEM);
    if (cold_code) probe_evict_code(threadIdx.x);
    __syncthreads();
    MK_PHASE(0);
    task_moe_route(c);
    __syncthreads();
    MK_PHASE(8);
    if (threadIdx.x == 0) probe_phases_add(8);
}

int main(int argc, char** argv) {
    const u32 rows = argc > 1 ? u32(atoi(argv[1])) : 1;
    const int launches = argc > 2 ? atoi(argv[2]) : 400;
    const bool cold_code = argc > 3 && strstr(argv[3], "cold-code") != nullptr;
    const u32 blocks = 132, experts = 128, top_k = 8;
    const u32 slots = std::min(experts, rows * top_k), list_len = 1 + 2 * slots;
    u64 seed = 7;
    std::vector<float> logits(u64(blocks) * rows * experts);
    for (auto& v : logits) v = float(lcg(seed) % 20000) / 5000.0f - 2.0f;
    void *dl, *dw, *dlist;
    CHECK(cudaMalloc(&dl, logits.size() * 4));
    CHECK(cudaMalloc(&dw, logits.size() * 4));
    CHECK(cudaMalloc(&dlist, u64(blocks) * list_len * 4));
    CHECK(cudaMemcpy(dl, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    DeviceState* dst;
    StatusBlock* dsb;
    probe_state(&dst, &dsb);
    MoeRouteArgs a;
    memset(&a, 0, sizeof a);
    a.logits = u64(dl);
    a.weights = u64(dw);
    a.list = u64(dlist);
    a.m = rows;
    a.experts = experts;
    a.top_k = top_k;
    a.norm_topk = 1;
    a.slots = slots;
    CHECK(cudaFuncSetAttribute(route_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, PROBE_SMEM));
    auto launch = [&](int) { route_probe<<<blocks, BLOCK_THREADS, PROBE_SMEM>>>(a, list_len, cold_code, dst, dsb); };
    for (int i = 0; i < 16; ++i) launch(i);
    CHECK(cudaDeviceSynchronize());
    probe_phases_reset();
    const double us = probe_time(launches, launch);
    // The first block's list, checked against the union of a plain top-k of
    // each of its rows, in ascending order.
    std::vector<u32> list(list_len);
    CHECK(cudaMemcpy(list.data(), dlist, list_len * 4, cudaMemcpyDeviceToHost));
    std::vector<bool> chosen(experts, false);
    for (u32 i = 0; i < rows; ++i) {
        const float* row = logits.data() + u64(i) * experts;
        std::vector<u32> order(experts);
        for (u32 j = 0; j < experts; ++j) order[j] = j;
        std::stable_sort(order.begin(), order.end(), [&](u32 x, u32 y) { return row[x] > row[y]; });
        for (u32 k = 0; k < top_k; ++k) chosen[order[k]] = true;
    }
    std::vector<u32> want;
    for (u32 j = 0; j < experts; ++j) {
        if (chosen[j]) want.push_back(j);
    }
    const bool ok = list[0] == want.size() && std::equal(want.begin(), want.end(), list.begin() + 1);
    const double n = double(launches) * blocks;
    printf("route %u rows x %u experts, top %u, %s: %.2f us per launch, list %s, fault kind %u\n", rows, experts, top_k,
           cold_code ? "cold code" : "warm code", us, ok ? "right" : "WRONG", probe_fault(dsb));
    const char* names[9] = {"",           "flags cleared", "loads issued", "softmax",     "top-k rounds",
                            "picks stored", "barrier",      "list written", "end barrier"};
    probe_phases_print(names, 8, n);
    return (probe_fault(dsb) != 0 || !ok) ? 1 : 0;
}
