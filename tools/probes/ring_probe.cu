// Ring probe: the FP4 tensor-core product fed by bulk copies into a ring of
// shared-memory slots, against the task's own loop (fp4_mma_rows, each warp
// loading its next column step into registers), on the same MXFP4 bytes.
//
//   ring  the codes stored tile-major for this purpose: per group of 256 rows,
//         per 128-column step, per 16-row tile, the 1 KiB of codes in the
//         order the lanes of the mma fragment read them (lane l: row l/4,
//         chunk l%4 at byte 16 l; row l/4 + 8 at 512 + 16 l), then the 64
//         scale bytes in lane order. One slot is a step of the group's 16
//         tiles (17 KiB); thread 0 keeps NS slots in flight with
//         cp.async.bulk (one mbarrier a slot for the bytes, one for the 16
//         warps' release); warp w computes tile w over every step, its
//         codes and scales read from shared memory.
//   task  fp4_mma_rows over the same rows in row-major codes and scales.
//
// Every block streams G groups (G x 256 rows x 2048 columns, 272 KiB a
// group) for n input rows (bf16, in shared memory), from a 1.1 GB region
// that L2 cannot hold, rotated between launches. Prints each path's mean
// time a launch and read bandwidth next to the device's copy bandwidth, and
// the largest difference between the two paths' outputs (they sum a row's
// steps in different orders).
//
// Usage: ring_probe [G] [n] [ring slots 2..5]
#include <vector>

#include "probe.cuh"
#include "tasks/gemv_expert_fp4.cuh"

constexpr u32 COLS = 2048, STEPS = COLS / 128, GROUP_ROWS = 256, TILE_BYTES = 1088;
constexpr u32 SLOT = 16 * TILE_BYTES;
constexpr u32 TOTAL_GROUPS = 4096;  // 1M rows
constexpr u32 TOTAL_ROWS = TOTAL_GROUPS * GROUP_ROWS;

__device__ __forceinline__ void bar_init(u64* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(b)) : "memory");
}

// The first group of this block's G groups in launch `rot`.
__device__ __forceinline__ u32 first_group(u32 G, u32 rot) {
    const u32 ring = TOTAL_GROUPS / G;
    return ((blockIdx.x + rot) % ring) * G;
}

__device__ __forceinline__ void copy_x(const u16* xg, unsigned char* xs, u32 n) {
    for (u32 i = threadIdx.x; i < n * COLS / 8; i += blockDim.x) {
        reinterpret_cast<uint4*>(xs)[i] = reinterpret_cast<const uint4*>(xg)[i];
    }
}

template <int NS>
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    ring_kernel(const unsigned char* tiled, const u16* xg, float* y, u32 n, u32 G, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ u64 full[NS], empty[NS];
    unsigned char* ring = smem;
    unsigned char* xs = smem + NS * SLOT;
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const u32 g0 = first_group(G, rot), K = G * STEPS;
    auto src = [&](u32 k) { return tiled + (u64(g0 + k / STEPS) * STEPS + k % STEPS) * SLOT; };
    if (tid == 0) {
        for (int i = 0; i < NS; ++i) bar_init(&full[i], 1), bar_init(&empty[i], 16);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 k = 0; k < min(K, u32(NS)); ++k) {
            stage_expect(&full[k], SLOT);
            stage_copy(&full[k], ring + k * SLOT, reinterpret_cast<u64>(src(k)), SLOT);
        }
    }
    copy_x(xg, xs, n);
    __syncthreads();
    const unsigned char* xrow = xs + u64(g < n ? g : 0) * COLS * 2 + c * 32 * 2;
    Fp4Acc<1> acc;
    acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
    for (u32 k = 0; k < K; ++k) {
        const u32 slot = k % NS, use = k / NS;
        // Thread 0 refills the slot of step k - 1 (every warp is likely past it).
        if (tid == 0 && k > 0 && k - 1 + NS < K) {
            const u32 ps = (k - 1) % NS, pu = (k - 1) / NS;
            stage_wait(&empty[ps], pu & 1);
            stage_expect(&full[ps], SLOT);
            stage_copy(&full[ps], ring + ps * SLOT, reinterpret_cast<u64>(src(k - 1 + NS)), SLOT);
        }
        stage_wait(&full[slot], use & 1);
        const unsigned char* t = ring + slot * SLOT + warp * TILE_BYTES;
        const uint4 q0 = ld_shared16(t + lane * 16), q1 = ld_shared16(t + 512 + lane * 16);
        u32 s;
        asm volatile("ld.shared.u16 %0, [%1];" : "=r"(s) : "r"(smem_addr(t + 1024 + lane * 2)));
        const unsigned char* xp[1] = {xrow + (k % STEPS) * 128 * 2};
        fp4_mma_step<1, true, false, false, true>(acc.v, q0, q1, s & 0xFFu, s >> 8, xp);
        __syncwarp();
        if (lane == 0) bar_arrive(&empty[slot]);
        if (k % STEPS == STEPS - 1) {
            const u64 row = u64(g0 + k / STEPS) * GROUP_ROWS + warp * 16 + g;
            if (2 * c < n) y[u64(2 * c) * TOTAL_ROWS + row] = acc.v[0][0], y[u64(2 * c) * TOTAL_ROWS + row + 8] = acc.v[0][2];
            if (2 * c + 1 < n) {
                y[u64(2 * c + 1) * TOTAL_ROWS + row] = acc.v[0][1];
                y[u64(2 * c + 1) * TOTAL_ROWS + row + 8] = acc.v[0][3];
            }
            acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
        }
    }
}

// The task's own loop over the same rows, row-major.
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    task_kernel(GemvExpertFp4Args a, const u16* xg, u32 n, u32 G, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* xs = smem;
    float* part = reinterpret_cast<float*>(smem + ((n * COLS * 2 + 127) & ~127u));
    copy_x(xg, xs, n);
    __syncthreads();
    u32 rmap[16];
    for (u32 i = 0; i < 16; ++i) rmap[i] = i;
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    const u32 keep = (n * COLS * 2 + 127) & ~127u, rows = G * GROUP_ROWS;
    u32 slices, per, group;
    fp4_mma_shape(COLS, slices, per, group);
    const u32 batch = rows > group ? (dyn - keep) / fp4_mma_partial_bytes(COLS) : 1u;
    fp4_mma_rows<true, false>(a, reinterpret_cast<const unsigned char*>(a.w), reinterpret_cast<const unsigned char*>(a.scales),
                              1.0f, reinterpret_cast<u64>(xs), COLS, a.y, rmap, n, first_group(G, rot) * GROUP_ROWS, rows,
                              part, batch);
}

// Row-major codes and scales to the ring's tile-major order.
__global__ void retile(const unsigned char* codes, const unsigned char* scales, unsigned char* tiled) {
    const u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x;  // (group, step, tile, lane)
    if (i >= u64(TOTAL_GROUPS) * STEPS * 16 * 32) return;
    const u32 lane = i % 32, tile = (i / 32) % 16, step = (i / 512) % STEPS;
    const u64 grp = i / (512 * STEPS);
    const u64 row = grp * GROUP_ROWS + tile * 16 + lane / 4;
    const u32 chunk = step * 4 + lane % 4;
    unsigned char* t = tiled + ((grp * STEPS + step) * 16 + tile) * TILE_BYTES;
    *reinterpret_cast<uint4*>(t + lane * 16) = *reinterpret_cast<const uint4*>(codes + row * (COLS / 2) + chunk * 16);
    *reinterpret_cast<uint4*>(t + 512 + lane * 16) =
        *reinterpret_cast<const uint4*>(codes + (row + 8) * (COLS / 2) + chunk * 16);
    t[1024 + lane * 2] = scales[row * (COLS / 32) + chunk];
    t[1024 + lane * 2 + 1] = scales[(row + 8) * (COLS / 32) + chunk];
}

__global__ void fill_bytes(unsigned char* p, u64 n, u32 seed, u32 lo, u32 span) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
        u32 h = u32(i) * 2654435761u ^ u32(i >> 32) * 40503u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        p[i] = (unsigned char)(span ? lo + h % span : h);
    }
}

__global__ void copy_probe(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) dst[i] = src[i];
}

int main(int argc, char** argv) {
    const u32 G = argc > 1 ? u32(atoi(argv[1])) : 8, n = argc > 2 ? u32(atoi(argv[2])) : 1;
    if (G == 0 || G > 64 || n == 0 || n > 8) {
        fprintf(stderr, "usage: ring_probe [groups per block 1..64] [input rows 1..8] [ring slots 2..5]\n");
        return 2;
    }
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    unsigned char *codes, *scales, *tiled;
    u16* x;
    float *ya, *yb;
    const u64 code_bytes = u64(TOTAL_ROWS) * COLS / 2, scale_bytes = u64(TOTAL_ROWS) * COLS / 32;
    const u64 tiled_bytes = u64(TOTAL_GROUPS) * STEPS * SLOT;
    CHECK(cudaMalloc(&codes, code_bytes));
    CHECK(cudaMalloc(&scales, scale_bytes));
    CHECK(cudaMalloc(&tiled, tiled_bytes));
    CHECK(cudaMalloc(&x, 8 * COLS * 2));
    CHECK(cudaMalloc(&ya, u64(8) * TOTAL_ROWS * 4));
    CHECK(cudaMalloc(&yb, u64(8) * TOTAL_ROWS * 4));
    fill_bytes<<<1024, 256>>>(codes, code_bytes, 1, 0, 0);
    fill_bytes<<<1024, 256>>>(scales, scale_bytes, 2, 112, 16);  // 2^-15 .. 2^0
    std::vector<u16> hx(8 * COLS);
    u64 s = 7;
    for (auto& v : hx) v = u16(0x3C00u + lcg(s) % 0x0400u) | u16((lcg(s) & 1) << 15);  // +-[2^-7, 2^-6)
    CHECK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    retile<<<u32((u64(TOTAL_GROUPS) * STEPS * 512 + 255) / 256), 256>>>(codes, scales, tiled);
    CHECK(cudaMemset(ya, 0, u64(8) * TOTAL_ROWS * 4));
    CHECK(cudaMemset(yb, 0, u64(8) * TOTAL_ROWS * 4));
    CHECK(cudaDeviceSynchronize());

    const u32 ns = argc > 3 ? u32(atoi(argv[3])) : 4;
    if (ns < 2 || ns > 5) {
        fprintf(stderr, "ring slots: 2..5\n");
        return 2;
    }
    const u32 smem_ring = ns * SLOT + 8 * COLS * 2, smem_task = PROBE_SMEM;
    CHECK(cudaFuncSetAttribute(ring_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
    CHECK(cudaFuncSetAttribute(ring_kernel<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
    CHECK(cudaFuncSetAttribute(ring_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
    CHECK(cudaFuncSetAttribute(ring_kernel<5>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
    CHECK(cudaFuncSetAttribute(task_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_task));
    GemvExpertFp4Args a = {};
    a.w = reinterpret_cast<u64>(codes), a.scales = reinterpret_cast<u64>(scales), a.y = reinterpret_cast<u64>(ya);
    a.cols = COLS, a.m = n, a.ldy = TOTAL_ROWS, a.x_dtype = DTYPE_BF16, a.y_dtype = DTYPE_F32;
    a.format = FP4_MXFP4, a.rows = G * GROUP_ROWS, a.slots = 1;

    const u32 rings = TOTAL_GROUPS / G;
    auto ring = [&](int i) {
        const u32 rot = u32(i) * sms % rings;
        if (ns == 2) ring_kernel<2><<<sms, BLOCK_THREADS, smem_ring>>>(tiled, x, yb, n, G, rot);
        if (ns == 3) ring_kernel<3><<<sms, BLOCK_THREADS, smem_ring>>>(tiled, x, yb, n, G, rot);
        if (ns == 4) ring_kernel<4><<<sms, BLOCK_THREADS, smem_ring>>>(tiled, x, yb, n, G, rot);
        if (ns == 5) ring_kernel<5><<<sms, BLOCK_THREADS, smem_ring>>>(tiled, x, yb, n, G, rot);
    };
    auto task = [&](int i) { task_kernel<<<sms, BLOCK_THREADS, smem_task>>>(a, x, n, G, u32(i) * sms % rings); };
    // Outputs of launch 0 compared.
    ring(0);
    task(0);
    CHECK(cudaDeviceSynchronize());
    std::vector<float> ha(u64(n) * TOTAL_ROWS), hb(u64(n) * TOTAL_ROWS);
    CHECK(cudaMemcpy(ha.data(), ya, ha.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(hb.data(), yb, hb.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0;
    u64 written = 0;
    for (u64 i = 0; i < ha.size(); ++i) {
        worst = fmax(worst, fabs(double(ha[i]) - double(hb[i])));
        scale = fmax(scale, fabs(double(ha[i])));
        written += ha[i] != 0.0f;
    }
    printf("outputs: %llu nonzero of %llu in launch 0's rows, largest |task - ring| %.3g (largest |task| %.3g)\n",
           (unsigned long long)written, (unsigned long long)(u64(sms) * G * GROUP_ROWS * n), worst, scale);

    const u64 copy_bytes = 512ull << 20;
    uint4 *src, *dst;
    CHECK(cudaMalloc(&src, copy_bytes));
    CHECK(cudaMalloc(&dst, copy_bytes));
    auto copy = [&](int) { copy_probe<<<sms * 4, BLOCK_THREADS>>>(src, dst, copy_bytes / 16); };
    copy(0);
    const double copy_tbs = 2.0 * copy_bytes / probe_time(10, copy) / 1e6;
    for (int w = 0; w < 3; ++w) ring(w), task(w);
    const double bytes = double(sms) * G * GROUP_ROWS * (COLS / 2 + COLS / 32);
    for (int rep = 0; rep < 2; ++rep) {
        const double tr = probe_time(40, ring), tt = probe_time(40, task);
        printf("G %u n %u slots %u: ring %.2f us (%.3f TB/s, %.1f %% of copy), task %.2f us (%.3f TB/s, %.1f %%); copy %.3f TB/s\n",
               G, n, ns, tr, bytes / tr / 1e6, 100.0 * bytes / tr / 1e6 / copy_tbs, tt, bytes / tt / 1e6,
               100.0 * bytes / tt / 1e6 / copy_tbs, copy_tbs);
    }
    CHECK(cudaGetLastError());
    return 0;
}
