// Phase marks of the probes that time a task body's phases (gemv_probe,
// route_probe, fp4_probe): included before the task's header, whose
// MK_PHASE(k) marks then record the SM clock (thread 0, per block); the probe
// adds each block's phase durations to the totals and prints them.
#pragma once
// Defined before probe.cuh brings in the kernel's task.cuh, whose empty
// default it replaces.
#define MK_PHASE(k)                                                      \
    do {                                                                 \
        if (threadIdx.x == 0) g_marks[blockIdx.x * 16 + (k)] = clock64(); \
    } while (0)
#include "probe.cuh"

__device__ unsigned long long g_marks[1024 * 16];

// Per phase k: sum over blocks and launches of its duration, and its maximum.
__device__ unsigned long long g_sum[16], g_max[16];

// Thread 0: adds this block's phases 1 .. last to the totals: mark k - mark
// 0, except phase `before` (if any), mark 0 - mark k: something timed ahead
// of the body.
__device__ __forceinline__ void probe_phases_add(int last, int before = -1) {
    const unsigned long long* m = g_marks + blockIdx.x * 16;
    for (int k = 1; k <= last; ++k) {
        const unsigned long long d = k == before ? m[0] - m[k] : m[k] - m[0];
        atomicAdd(&g_sum[k], d);
        atomicMax(&g_max[k], d);
    }
}

// Zeroes the totals (after warm-up launches).
static inline void probe_phases_reset() {
    unsigned long long zero[16] = {};
    CHECK(cudaMemcpyToSymbol(g_sum, zero, sizeof zero));
    CHECK(cudaMemcpyToSymbol(g_max, zero, sizeof zero));
}

// Prints phases 1 .. last (names[k]): the mean over `samples` blocks and the
// slowest, in cycles and in microseconds at the device's clock.
static inline void probe_phases_print(const char* const* names, int last, double samples) {
    unsigned long long sum[16], mx[16];
    CHECK(cudaMemcpyFromSymbol(sum, g_sum, sizeof sum));
    CHECK(cudaMemcpyFromSymbol(mx, g_max, sizeof mx));
    int khz = 0;
    CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    const double cyc_us = khz / 1e3;
    for (int k = 1; k <= last; ++k) {
        printf("  %-14s mean %7.0f cycles (%6.2f us), slowest %7llu (%6.2f us)\n", names[k], sum[k] / samples,
               sum[k] / samples / cyc_us, mx[k], mx[k] / cyc_us);
    }
}
