// What an SM's instruction cache holds and what a miss costs: one block per
// SM runs a piece of straight-line code (4, 16 or 64 KiB of SASS) twice, then
// 32 to 256 KiB of other code, then the first piece again, and thread 0 reads
// the SM clock around each run. The first piece's third run against its
// second (warm) is the cost of fetching it again once the other code evicted
// it; the other code's size where that starts is the cache's capacity. With
// 1 warp and with 16 warps per block (the resident kernel's 512 threads).
//
//   tools/probes/run.sh     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/icache_probe.cu -o icache_probe
//   ./icache_probe
//
// Prints, per piece, per amount of other code and per warp count, the mean
// cycles (over blocks) of the piece's warm run and of its run after the other
// code.
#include <cstdio>
#include <vector>

#include "probe.cuh"

__device__ __forceinline__ long long clock_after(u32 dep) {
    long long t;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(t) : "r"(dep) : "memory");
    return t;
}

// Steps per KiB of SASS: a step is 96 bytes on sm_90a (readelf -s of the
// cubin: 160 steps, 15392 bytes), so a "KiB" below is 960 bytes.
constexpr u32 STEPS_PER_KIB = 10;

// Cycles of one run of a piece, from after the block's last barrier to after
// the block's next (the clock reads depend on `s`, so no run moves past them).
template <u32 SEED, u32 STEPS>
__device__ __forceinline__ long long timed_run(u32& s) {
    const long long t0 = clock_after(s);
    s += code_piece<SEED, STEPS>(s, u32(t0));
    __syncthreads();
    return clock_after(s) - t0;
}

template <u32 PIECE_KIB, u32 OTHER_KIB>
__global__ void __launch_bounds__(BLOCK_THREADS, 1) icache_probe(long long* out) {
    constexpr u32 P = (PIECE_KIB * STEPS_PER_KIB + 15) / 16 * 16, O = (OTHER_KIB * STEPS_PER_KIB + 15) / 16 * 16;
    u32 s = threadIdx.x;
    __syncthreads();
    timed_run<1, P>(s);
    const long long warm = timed_run<1, P>(s);
    timed_run<2, O>(s);
    const long long again = timed_run<1, P>(s);
    if (threadIdx.x == 0) out[blockIdx.x * 2] = warm, out[blockIdx.x * 2 + 1] = again;
    if (s == 0x9E3779B1u) g_probe_sink = s;  // keeps the code
}

template <u32 PIECE_KIB, u32 OTHER_KIB>
static void measure(int sms, long long* d) {
    for (int threads : {32, int(BLOCK_THREADS)}) {
        double warm = 0, cold = 0;
        for (int rep = 0; rep < 3; ++rep) {  // the last of three launches counts
            icache_probe<PIECE_KIB, OTHER_KIB><<<sms, threads>>>(d);
            CHECK(cudaGetLastError());
            CHECK(cudaDeviceSynchronize());
        }
        std::vector<long long> h(size_t(sms) * 2);
        CHECK(cudaMemcpy(h.data(), d, h.size() * sizeof(long long), cudaMemcpyDeviceToHost));
        for (int b = 0; b < sms; ++b) warm += double(h[b * 2]) / sms, cold += double(h[b * 2 + 1]) / sms;
        printf("piece %2u KiB, then %3u KiB of other code, %2d warps: warm %7.0f cycles, again %7.0f (+%.0f)\n",
               PIECE_KIB, OTHER_KIB, threads / 32, warm, cold, cold - warm);
    }
}

template <u32 PIECE_KIB>
static void sweep(int sms, long long* d) {
    measure<PIECE_KIB, 32>(sms, d);
    measure<PIECE_KIB, 64>(sms, d);
    measure<PIECE_KIB, 128>(sms, d);
    measure<PIECE_KIB, 256>(sms, d);
}

int main() {
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    long long* d = nullptr;
    CHECK(cudaMalloc(&d, size_t(sms) * 2 * sizeof(long long)));
    sweep<4>(sms, d);
    sweep<16>(sms, d);
    sweep<64>(sms, d);
    return 0;
}
