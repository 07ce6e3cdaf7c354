// Data hop probe: a vector of V floats passed around a ring of blocks (one
// per SM); each block reads its predecessor's vector, adds one to every
// value and writes its own. Two ways to know the vector is there:
//   event    the producer's block stores its values, meets a barrier, and
//            thread 0 signals a counter with red.release.gpu; the consumer's
//            thread 0 polls the counter with ld.acquire.gpu, the block meets
//            a barrier and then loads the values (the resident kernel's hop)
//   tagged   every value travels with the round number in the same 64-bit
//            store (st.relaxed.gpu); each consumer thread loads the words it
//            reads at once and polls again those whose tag is old, then the
//            block meets a barrier (as a reduction over the vector would);
//            no counter or fence on the way
//   tagged+  tagged, and the producer also signals its counter as in
//            `event`; the consumer checks that counter (ld.acquire.gpu)
//            after it has stored its own vector and before it signals: the
//            counter still orders whatever the data does not carry, off the
//            data's path
// Prints the best and mean time per hop over `rounds` trips around the ring,
// for 128, 2048 and 4096 values, or for `values` alone (at most 4096).
//
// Usage: tagged_probe [rounds] [values]
#include "probe.cuh"

constexpr u32 STRIDE = 32;  // counters 256 bytes apart

__device__ __forceinline__ void st_tagged(u64* p, float v, u32 tag) {
    const u64 w = (u64(tag) << 32) | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}

// Polls `p` until its tag is `tag`; returns its value.
__device__ __forceinline__ float ld_tagged(const u64* p, u32 tag) {
    for (;;) {
        const u64 w = ld_relaxed_gpu64(p);
        if (u32(w >> 32) == tag) return __uint_as_float(u32(w));
    }
}

// MODE 0: event, 1: tagged, 2: tagged+. At most PER * 512 values.
constexpr u32 PER = 8;

template <int MODE>
__global__ void __launch_bounds__(512, 1) ring(u64* ctrs, float* plain, u64* tagged, u32 rounds, u32 values, u64* out) {
    const u32 b = blockIdx.x, n = gridDim.x, tid = threadIdx.x;
    u64* mine = ctrs + u64(b) * STRIDE;
    const u64* prev = ctrs + u64((b + n - 1) % n) * STRIDE;
    const u32 pb = (b + n - 1) % n;
    u64 t0 = 0;
    float acc = 0.0f;
    for (u32 r = 1; r <= rounds; ++r) {
        const u64 need = b == 0 ? r - 1 : r;
        // The predecessor's vector of this round (block 0: of the last round).
        const u32 tag = b == 0 ? r - 1 : r;
        if (MODE == 0) {
            if (need > 0) {
                if (tid == 0) {
                    while (ld_acquire_gpu(prev) < need) {
                    }
                }
                __syncthreads();
            }
            if (b == 0 && r == 1 && tid == 0) t0 = globaltimer();
            for (u32 i = tid; i < values; i += blockDim.x) {
                const float v = need > 0 ? plain[u64(pb) * values + i] : 0.0f;
                plain[u64(b) * values + i] = v + 1.0f;
                acc += v;
            }
            __syncthreads();
            if (tid == 0) red_release_gpu(mine, 1);
        } else {
            if (b == 0 && r == 1 && tid == 0) t0 = globaltimer();
            // Every word loaded at once, then the late ones polled again; a
            // barrier, as a block reduction over the vector would need.
            u64 w[PER];
#pragma unroll
            for (u32 k = 0; k < PER; ++k) {
                const u32 i = tid + k * blockDim.x;
                w[k] = need > 0 && i < values ? ld_relaxed_gpu64(tagged + u64(pb) * values + i) : u64(tag) << 32;
            }
#pragma unroll
            for (u32 k = 0; k < PER; ++k) {
                const u32 i = tid + k * blockDim.x;
                while (u32(w[k] >> 32) != tag) w[k] = ld_relaxed_gpu64(tagged + u64(pb) * values + i);
            }
            __syncthreads();
#pragma unroll
            for (u32 k = 0; k < PER; ++k) {
                const u32 i = tid + k * blockDim.x;
                const float v = __uint_as_float(u32(w[k]));
                if (i < values) st_tagged(tagged + u64(b) * values + i, v + 1.0f, r);
                acc += v;
            }
            if (MODE == 2) {
                __syncthreads();
                if (tid == 0) {
                    if (need > 0) {
                        while (ld_acquire_gpu(prev) < need) {
                        }
                    }
                    red_release_gpu(mine, 1);
                }
            }
        }
    }
    if (b == 0 && tid == 0) {
        if (MODE == 1) {
            ld_tagged(tagged + u64(n - 1) * values + values - 1, rounds);
        } else {
            while (ld_acquire_gpu(prev) < rounds) {
            }
        }
        out[0] = globaltimer() - t0;
    }
    if (acc == -1.0f) out[1] = 1;  // keeps the loads
}

template <int MODE>
static void run(const char* name, int sms, u32 rounds, u32 values, u64* ctrs, float* plain, u64* tagged, u64* out) {
    double mean = 0;
    const double best = probe_ring_hop(
        [&] {
            CHECK(cudaMemset(ctrs, 0, size_t(sms) * STRIDE * 8));
            CHECK(cudaMemset(tagged, 0, size_t(sms) * values * 8));
            ring<MODE><<<sms, 512>>>(ctrs, plain, tagged, rounds, values, out);
        },
        rounds, sms, out, mean);
    printf("%-8s %5u values: %.3f us per hop (best of 5), mean %.3f\n", name, values, best, mean);
}

int main(int argc, char** argv) {
    const u32 rounds = argc > 1 ? u32(atoi(argv[1])) : 100;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const u32 max_values = PER * 512;
    const u32 one = argc > 2 ? u32(atoi(argv[2])) : 0;
    if (one > max_values) {
        fprintf(stderr, "at most %u values\n", max_values);
        return 1;
    }
    u64 *ctrs, *out, *tagged;
    float* plain;
    CHECK(cudaMalloc(&ctrs, size_t(sms) * STRIDE * 8));
    CHECK(cudaMalloc(&out, 64));
    CHECK(cudaMalloc(&plain, size_t(sms) * max_values * 4));
    CHECK(cudaMalloc(&tagged, size_t(sms) * max_values * 8));
    const u32 sizes[3] = {128u, 2048u, 4096u};
    for (u32 k = 0; k < (one ? 1u : 3u); ++k) {
        const u32 v = one ? one : sizes[k];
        run<0>("event", sms, rounds, v, ctrs, plain, tagged, out);
        run<1>("tagged", sms, rounds, v, ctrs, plain, tagged, out);
        run<2>("tagged+", sms, rounds, v, ctrs, plain, tagged, out);
    }
    return 0;
}
