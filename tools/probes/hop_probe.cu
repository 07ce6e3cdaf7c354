// Dependency-hop probe: a token passed around a ring of blocks (one per SM),
// each block waiting for its predecessor's counter and then signalling its
// own, with the resident loop's barriers around every hop. Variants differ
// in who polls and how:
//   acquire   thread 0 spins on ld.acquire.gpu (the resident kernel's wait)
//   pollers N lane 0 of warps 0..N-1 spin on ld.acquire.gpu, their first
//             polls staggered over one round trip; the first to see the
//             value tells the others through shared memory
//   relaxed K thread 0 keeps K ld.relaxed.gpu polls in flight, staggered,
//             and closes a hit with fence.acq_rel.gpu
// It also times a chain of dependent loads of one L2 line (the round trip)
// and how long a release reduction holds its thread.
//
// Usage: hop_probe [rounds]
#include "probe.cuh"

constexpr u32 STRIDE = 32;  // counters 256 bytes apart

__device__ __forceinline__ void spin_cycles(u64 n) {
    const u64 t0 = clock64();
    while (clock64() - t0 < n) {
    }
}

// Waits until *c >= need with `pollers` warps; every thread returns after a barrier.
template <int MODE, int N>
__device__ __forceinline__ void wait_for(const u64* c, u64 need, volatile u32* flag, u32 round, u32 stagger) {
    const u32 tid = threadIdx.x, warp = tid / 32;
    if (MODE == 0) {
        if (tid == 0) {
            while (ld_acquire_gpu(c) < need) {
            }
        }
    } else if (MODE == 1) {
        if ((tid & 31) == 0 && warp < N) {
            if (ld_acquire_gpu(c) < need) {
                spin_cycles(u64(warp) * stagger / N);
                for (;;) {
                    if (*flag == round) break;
                    if (ld_acquire_gpu(c) >= need) {
                        *flag = round;
                        break;
                    }
                }
            }
        }
    } else {
        if (tid == 0) {
            u64 v[N];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = ld_relaxed_gpu64(c);
                spin_cycles(stagger / N);
            }
            bool done = false;
            while (!done) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    if (!done) {
                        if (v[k] >= need) {
                            done = true;
                        } else {
                            v[k] = ld_relaxed_gpu64(c);
                        }
                    }
                }
            }
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
    }
    __syncthreads_and(1);
}

template <int MODE, int N>
__global__ void __launch_bounds__(512, 1) ring(u64* ctrs, u32 rounds, u32 stagger, u64* out) {
    __shared__ u32 flag;
    __shared__ float sink[512];
    if (threadIdx.x == 0) flag = 0;
    __syncthreads();
    const u32 b = blockIdx.x, n = gridDim.x;
    u64* mine = ctrs + u64(b) * STRIDE;
    const u64* prev = ctrs + u64((b + n - 1) % n) * STRIDE;
    u64 t0 = 0;
    for (u32 r = 1; r <= rounds; ++r) {
        const u64 need = b == 0 ? r - 1 : r;
        if (need > 0) wait_for<MODE, N>(prev, need, &flag, r, stagger);
        if (b == 0 && r == 1 && threadIdx.x == 0) t0 = globaltimer();
        sink[threadIdx.x] = float(r);  // a task body's writes
        __syncthreads();
        if (threadIdx.x == 0) red_release_gpu(mine, 1);
    }
    if (b == 0 && threadIdx.x == 0) {
        while (ld_acquire_gpu(prev) < rounds) {
        }
        out[0] = globaltimer() - t0;
    }
}

// One thread: a chain of dependent loads of one line (the address depends on
// the value loaded), and the time a release reduction holds the thread.
__global__ void basics(u64* line, u64* out, u32 n) {
    if (threadIdx.x != 0) return;
    u64 p = 0;
    u64 t0 = globaltimer();
    for (u32 i = 0; i < n; ++i) p = ld_acquire_gpu(line + (p & 1));
    u64 t1 = globaltimer();
    for (u32 i = 0; i < n; ++i) p = ld_relaxed_gpu64(line + (p & 1));
    u64 t2 = globaltimer();
    for (u32 i = 0; i < n; ++i) {
        line[64 + (i & 7)] = i;
        red_release_gpu(line + 32, 1);
    }
    u64 t3 = globaltimer();
    out[0] = t1 - t0;
    out[1] = t2 - t1;
    out[2] = t3 - t2;
    out[3] = p;
}

template <int MODE, int N>
static void run(const char* name, int sms, u32 rounds, u32 stagger, u64* ctrs, u64* out) {
    double mean = 0;
    const double best = probe_ring_hop(
        [&] {
            CHECK(cudaMemset(ctrs, 0, size_t(sms) * STRIDE * 8));
            ring<MODE, N><<<sms, 512>>>(ctrs, rounds, stagger, out);
        },
        rounds, sms, out, mean);
    printf("%-24s stagger %4u cycles: %.3f us per hop (best of 5), mean %.3f\n", name, stagger, best, mean);
}

int main(int argc, char** argv) {
    const u32 rounds = argc > 1 ? u32(atoi(argv[1])) : 200;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    u64 *ctrs, *out, *line;
    CHECK(cudaMalloc(&ctrs, size_t(sms) * STRIDE * 8));
    CHECK(cudaMalloc(&out, 64));
    CHECK(cudaMalloc(&line, 4096));
    CHECK(cudaMemset(line, 0, 4096));
    const u32 n = 2000;
    basics<<<1, 32>>>(line, out, n);
    CHECK(cudaDeviceSynchronize());
    u64 b[4];
    CHECK(cudaMemcpy(b, out, 32, cudaMemcpyDeviceToHost));
    printf("dependent ld.acquire.gpu %.3f us, ld.relaxed.gpu %.3f us, store + red.release.gpu %.3f us\n",
           b[0] / 1e3 / n, b[1] / 1e3 / n, b[2] / 1e3 / n);
    run<0, 1>("acquire (thread 0)", sms, rounds, 0, ctrs, out);
    for (u32 st : {0u, 600u, 1200u}) {
        run<1, 2>("pollers 2", sms, rounds, st, ctrs, out);
        run<1, 4>("pollers 4", sms, rounds, st, ctrs, out);
        run<1, 8>("pollers 8", sms, rounds, st, ctrs, out);
    }
    for (u32 st : {600u, 1200u}) {
        run<2, 2>("relaxed 2 + fence", sms, rounds, st, ctrs, out);
        run<2, 4>("relaxed 4 + fence", sms, rounds, st, ctrs, out);
    }
    run<0, 1>("acquire (thread 0)", sms, rounds, 0, ctrs, out);
    return 0;
}
