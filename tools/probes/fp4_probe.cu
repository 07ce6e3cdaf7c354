// A plain kernel around the FP4 expert task body (kernels/tasks/
// gemv_expert_fp4.cuh), so that a profiler that serialises launches can look
// inside it: each block runs one task of a qwen3-30b-a3b decode step's expert
// stage, as the resident kernel would, without its waits or signals.
//
//   tools/probes/run.sh [--ncu]     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/fp4_probe.cu -o fp4_probe
//   ./fp4_probe gate|gate0|gate0b|down|spread|spread-down [shared bytes per block, at most PROBE_SMEM; 0: PROBE_SMEM] [launches] [input rows] [cold-code]
//
// `gate`: gate and up, 8 experts x 2 matrices x 8 tasks of 96 rows x 2048
// columns, one RMSNorm input row (`gate0`: the same without the RMSNorm;
// `gate0b`: without it and with bf16 input rows, as a decode step's shared
// norm writes them);
// `down`: 8 experts x 16 tasks of 128 rows x 768 columns, SwiGLU inputs.
// With more input rows (up to 16, as in a verify block), every row is routed
// to all eight experts.
// `spread` and `spread-down`: the same matrices as a verify block's stages
// compute them, every chosen expert's rows dealt in 128-row units over 66
// tasks per matrix (gate, up) or 132 (down): 15 experts chosen, each by a
// random nonempty set of the input rows (8 by default), bf16 input rows
// (gate and up: one set shared; down: one set per slot, SwiGLU); units of a
// tensor-core group of rows (fp4_mma_shape), as GemvExpertFp4::unit_rows
// deals them.
// MXFP4 codes and scales are random (scales 2^-9 .. 2^-2). Prints the mean
// time of a launch (CUDA events, back to back), the bytes each launch
// streams and a body's mean time (SM clock); exits non-zero if a task
// reported a fault. With `cold-code`, each body comes after other code that
// leaves none of its own in the SM's instruction cache (probe_evict_code).
// Then, for the tensor-core path, the mean and slowest block's SM clock at
// the task's marks (MK_PHASE): its input rows prepared (1), warp 0's jobs
// done (2), every warp's (3), the end (4), and in warp 0's last job its
// entry (5), its first, second and last column steps beginning (6, 7, 8)
// and its partials stored (9); in a spread task, the list's count read (10),
// the units dealt (11) and its first run of units begun (12).
// Last, a hash of the outputs' bits (the last launch's), so that two builds
// of the task can be compared bit for bit.
#include <vector>

#include "phases.cuh"
#include "tasks/gemv_expert_fp4.cuh"

// Sum over blocks and launches of a body's cycles (SM clock).
__device__ unsigned long long g_body;

struct Mat {
    u64 codes, scales, y;
};

__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    fp4_probe(GemvExpertFp4Args base, Mat m0, Mat m1, u32 per_slot, u32 spread, u32 limit, u32 cold_code,
              DeviceState* st, StatusBlock* sb) {
    __shared__ Env env;
    __shared__ TaskDesc desc;
    if (threadIdx.x == 0) {
        const u32 b = blockIdx.x, mat = b / (base.slots * per_slot), slot = (b / per_slot) % base.slots,
                  part = b % per_slot;
        GemvExpertFp4Args a = base;
        const Mat& mm = mat ? m1 : m0;
        a.w = mm.codes, a.scales = mm.scales, a.y = mm.y;
        a.slot = u16(slot);
        a.row0 = a.ldy * part / per_slot;
        a.rows = a.ldy * (part + 1) / per_slot - a.row0;
        if (spread) {  // task b % spread of its matrix's spread tasks
            const Mat& ms = b / spread ? m1 : m0;
            a.w = ms.codes, a.scales = ms.scales, a.y = ms.y;
            u32 slices, per, group;
            fp4_mma_shape(a.cols, slices, per, group);
            a.slot = u16(b % spread), a.reserved = spread, a.flags |= FP4_SPREAD, a.row0 = 0, a.rows = group;
        }
        probe_task(env, desc, a, st, sb);
    }
    // The body's code out of the instruction cache (as after other tasks).
    if (cold_code) probe_evict_code(threadIdx.x);
    __syncthreads();
    const long long t0 = clock64();
    MK_PHASE(0);
    task_gemv_expert_fp4(probe_ctx(env, desc, limit));
    __syncthreads();
    if (threadIdx.x == 0) {
        atomicAdd(&g_body, (unsigned long long)(clock64() - t0));
        probe_phases_add(spread ? 12 : 9);
    }
}

int main(int argc, char** argv) {
    const bool spread = argc > 1 && !strncmp(argv[1], "spread", 6);
    const bool down = argc > 1 && (!strcmp(argv[1], "down") || !strcmp(argv[1], "spread-down"));
    const bool xbf = argc > 1 && (!strcmp(argv[1], "gate0b") || spread);
    const bool plain = xbf || (argc > 1 && !strcmp(argv[1], "gate0"));
    const u32 smem = argc > 2 && atoi(argv[2]) > 0 ? u32(atoi(argv[2])) : PROBE_SMEM;
    const int launches = argc > 3 ? atoi(argv[3]) : 200;
    // Input rows: each routed to all eight experts (spread: to random ones).
    const u32 nin = argc > 4 ? u32(atoi(argv[4])) : spread ? 8 : 1;
    const u32 cold_code = argc > 5 && !strcmp(argv[5], "cold-code");
    if (nin == 0 || nin > 16) {
        fprintf(stderr, "input rows: 1 to 16, not %u\n", nin);
        return 2;
    }
    if (smem > PROBE_SMEM) {
        fprintf(stderr, "a shared limit of %u bytes is more than the block's %u\n", smem, PROBE_SMEM);
        return 2;
    }
    const u32 experts = 128, slots = spread ? 64 : 8, count = spread ? 15 : 8, hidden = 2048, inter = 768;
    const u32 rows = down ? hidden : inter, cols = down ? inter : hidden;
    const u32 mats = down ? 1 : 2, per_slot = down ? 16 : 8;
    const u64 code_bytes = u64(experts) * rows * cols / 2;
    const u64 stride = (u64(rows) * (cols / 32) + 15) & ~u64(15);
    u64 seed = 7;
    std::vector<unsigned char> codes(code_bytes), scales(experts * stride);
    for (auto& b : codes) b = (unsigned char)lcg(seed);
    for (auto& b : scales) b = (unsigned char)(118 + lcg(seed) % 8);  // 2^-9 .. 2^-2
    Mat m[2];
    for (u32 k = 0; k < mats; ++k) {
        void *c, *s, *y;
        CHECK(cudaMalloc(&c, code_bytes));
        CHECK(cudaMalloc(&s, scales.size()));
        CHECK(cudaMalloc(&y, u64(slots) * nin * rows * 4));
        CHECK(cudaMemset(y, 0, u64(slots) * nin * rows * 4));
        CHECK(cudaMemcpy(c, codes.data(), code_bytes, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(s, scales.data(), scales.size(), cudaMemcpyHostToDevice));
        m[k] = {u64(c), u64(s), u64(y)};
    }
    if (mats == 1) m[1] = m[0];
    // Inputs: one f32 row (gate/up: RMSNorm with bf16 weights) or one f32 row
    // per slot (down: SwiGLU of gate and up outputs).
    const u32 xlen = (down ? slots : 1) * nin * cols;
    std::vector<float> x(xlen), u(xlen);
    for (auto& v : x) v = float(lcg(seed) % 2001) / 1000.0f - 1.0f;
    for (auto& v : u) v = float(lcg(seed) % 2001) / 1000.0f - 1.0f;
    std::vector<unsigned short> g(cols, 0x3F80);  // bf16 1.0
    void *dx, *du, *dg, *dl;
    DeviceState* dst;
    StatusBlock* dsb;
    CHECK(cudaMalloc(&dx, xlen * 4));
    CHECK(cudaMalloc(&du, xlen * 4));
    CHECK(cudaMalloc(&dg, cols * 2));
    auto upload = [&](void* d, const std::vector<float>& v) {
        if (xbf) {
            std::vector<unsigned short> vb(v.size());
            for (size_t i = 0; i < v.size(); ++i) {
                u32 bits;
                memcpy(&bits, &v[i], 4);
                vb[i] = (unsigned short)(bits >> 16);
            }
            CHECK(cudaMemcpy(d, vb.data(), v.size() * 2, cudaMemcpyHostToDevice));
        } else {
            CHECK(cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
        }
    };
    upload(dx, x);
    if (spread && down) upload(du, u);  // SwiGLU of bf16 rows takes both as bf16
    else CHECK(cudaMemcpy(du, u.data(), xlen * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dg, g.data(), cols * 2, cudaMemcpyHostToDevice));
    // Routing lists: count, distinct experts, row masks (spread: random
    // nonempty sets of the input rows; otherwise every row). Launch i takes
    // list i % LISTS, the lists walking the experts in turn (eight a list name
    // each expert once; fifteen come back to one after eight or nine lists),
    // so that the weights of one launch were last read 100 MB or more earlier
    // and come from memory, as in a decode step, not from L2.
    constexpr u32 LISTS = 16;
    const u32 len = 1 + 2 * slots;
    std::vector<u32> list(LISTS * len);
    for (u32 l = 0; l < LISTS; ++l) {
        list[l * len] = count;
        for (u32 s = 0; s < count; ++s) {
            list[l * len + 1 + s] = (l * count + s) * 37 % experts;
            u32 mask = (1u << nin) - 1;
            if (spread) mask &= u32(lcg(seed)) | (1u << (s % nin));
            list[l * len + 1 + slots + s] = mask;
        }
    }
    CHECK(cudaMalloc(&dl, list.size() * 4));
    CHECK(cudaMemcpy(dl, list.data(), list.size() * 4, cudaMemcpyHostToDevice));
    probe_state(&dst, &dsb);

    GemvExpertFp4Args a;
    memset(&a, 0, sizeof a);
    a.x = u64(dx);
    a.aux = down ? u64(du) : u64(dg);
    a.cols = cols;
    a.m = nin;
    a.ldy = rows;
    a.x_dtype = xbf ? DTYPE_BF16 : DTYPE_F32;
    a.y_dtype = DTYPE_F32;
    a.prologue = down ? PROLOGUE_SWIGLU : plain ? PROLOGUE_NONE : PROLOGUE_RMSNORM;
    a.format = FP4_MXFP4;
    const float eps = 1e-6f;
    memcpy(&a.eps, &eps, 4);
    a.flags = down ? FP4_X_PER_SLOT : 0;
    a.slots = slots;

    const u32 spread_tasks = spread ? (down ? 132 : 66) : 0;
    const u32 blocks = spread ? mats * spread_tasks : mats * slots * per_slot;
    CHECK(cudaFuncSetAttribute(fp4_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, PROBE_SMEM));
    auto launch = [&](int i) {
        GemvExpertFp4Args li = a;
        li.list = u64(dl) + u64(i % LISTS) * len * 4;
        fp4_probe<<<blocks, BLOCK_THREADS, PROBE_SMEM>>>(li, m[0], m[1], per_slot, spread_tasks, smem, cold_code, dst,
                                                         dsb);
    };
    for (int i = 0; i < int(LISTS); ++i) launch(i);
    CHECK(cudaDeviceSynchronize());
    const unsigned long long zero = 0;
    CHECK(cudaMemcpyToSymbol(g_body, &zero, sizeof zero));
    probe_phases_reset();
    const double us = probe_time(launches, launch);
    const u32 fault = probe_fault(dsb);
    unsigned long long body = 0;
    CHECK(cudaMemcpyFromSymbol(&body, g_body, sizeof body));
    int khz = 0;
    CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    const double cycles = double(body) / (double(blocks) * launches);
    const double bytes = double(mats) * count * (double(rows) * cols / 2 + double(rows) * cols / 32);
    printf("%s, %u input rows%s: %u blocks, shared limit %u, %.2f us per launch, %.1f MB, %.3f TB/s, body %.0f cycles "
           "(%.2f us), fault kind %u\n",
           spread ? (down ? "spread down" : "spread gate+up") : down ? "down"
           : xbf                                              ? "gate+up, bf16 rows, no RMSNorm"
           : plain                                            ? "gate+up, no RMSNorm"
                                                              : "gate+up",
           nin,
           cold_code ? ", code cold" : "", blocks, smem, us, bytes / 1e6, bytes / us / 1e6, cycles, cycles / (khz / 1e3),
           fault);
    const char* names[13] = {"",
                             "prepared",
                             "warp 0 jobs",
                             "all jobs",
                             "end",
                             "last job: entry",
                             "... 1st step",
                             "... 2nd step",
                             "... last step",
                             "... partials",
                             "spread: count",
                             "... dealt",
                             "... 1st run"};
    probe_phases_print(names, spread ? 12 : 9, double(blocks) * launches);
    // The outputs' bits (the last launch's list), to compare two builds.
    unsigned long long hash = 1469598103934665603ull;
    for (u32 k = 0; k < mats; ++k) {
        std::vector<unsigned char> y(u64(slots) * nin * rows * 4);
        CHECK(cudaMemcpy(y.data(), reinterpret_cast<void*>(m[k].y), y.size(), cudaMemcpyDeviceToHost));
        for (unsigned char v : y) hash = (hash ^ v) * 1099511628211ull;
    }
    printf("outputs' hash %016llx\n", hash);
    return fault != 0;
}
