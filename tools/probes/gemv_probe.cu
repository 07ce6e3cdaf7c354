// A plain kernel around the bf16 product task body (kernels/tasks/
// gemv_bf16.cuh) with its phases marked: each block runs one task of a
// qwen3-30b-a3b decode step's qkv, o_proj or router product, as the resident
// kernel would, without its waits or signals, and thread 0 reads the SM clock
// (MK_PHASE) where the body enters, after its input rows are prepared (1),
// after warp 0's tensor-core jobs (2), after every warp's (3), at its end (4)
// and, in warp 0's last job, at its entry (7), once its pointers are set up
// (8), once its loads are issued (9), its products issued (10) and its
// partials stored (11).
//
//   tools/probes/run.sh     (or by hand:)
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels tools/probes/gemv_probe.cu -o gemv_probe
//   ./gemv_probe qkv|oproj|router cold|hot|staged|staged-hot[-cold-code] [launches] [bodies]
//   ./gemv_probe sq|lm cold [launches] [bodies] [blocks]
//
// `sq` is an 8192 x 8192 product and `lm` an LM head (151936 x 2048), one
// input row, no prologue; `blocks` overrides the number of tasks. Each run
// also times a plain grid-stride read of the same matrices (16 bytes a
// thread) and prints the body's bandwidth as a share of it.
//
// `cold`: launch i reads copy i % 8 of the matrix (8 copies exceed L2), so
// its rows come from memory; `hot`: every launch the same copy (from L2).
// `staged`: before the marks start, each block copies as much of its rows
// as fits above the task's own shared memory to the top of its dynamic
// shared memory with bulk copies (as the resident kernel stages a task
// whose inputs are not ready yet), and the body reads them from there.
// Prints the mean and slowest block's cycles per phase, the staging's, and
// the mean time of a launch. With several bodies per launch (the same task
// again on the same rows), the last is marked: its code and rows are warm.
// With `-cold-code`, each body comes after other code that leaves none of
// its own in the SM's instruction cache (probe_evict_code), as in a step,
// where every stage runs another task's code.
#include <vector>

#include "phases.cuh"
#include "tasks/gemv_bf16.cuh"

__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    gemv_probe(GemvBf16Args base, u32 total, u32 tasks, u32 staged, u32 keep, u32 reps, u32 cold_code, DeviceState* st,
               StatusBlock* sb) {
    __shared__ Env env;
    __shared__ TaskDesc desc;
    __shared__ u64 bar;
    __shared__ u32 s_off, s_n;
    extern __shared__ __align__(16) unsigned char dyn[];
    u32 dyn_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_bytes));
    const u32 b = blockIdx.x;
    if (threadIdx.x == 0) {
        GemvBf16Args a = base;
        a.row0 = u32(u64(total) * b / tasks);
        a.rows = u32(u64(total) * (b + 1) / tasks) - a.row0;
        probe_task(env, desc, a, st, sb);
        s_n = 0;
        s_off = dyn_bytes;
        g_marks[b * 16 + 5] = clock64();
        if (staged && keep < dyn_bytes) {
            const u32 n = min(a.rows * a.cols * 2, dyn_bytes - keep) & ~15u, off = (dyn_bytes - n) & ~127u;
            stage_init(&bar);
            stage_expect(&bar, n);
            stage_copy(&bar, dyn + off, a.w + u64(a.row0) * a.ldw * 2, n);
            s_n = n, s_off = off;
        }
    }
    __syncthreads();
    if (s_n) stage_wait(&bar, 0);
    const Ctx c = {&env, &desc, 1, dyn, s_off, s_n ? dyn + s_off : nullptr, s_n};
    for (u32 r = 0; r < reps; ++r) {
        // The body's code out of the instruction cache (as after other tasks).
        if (cold_code) probe_evict_code(threadIdx.x + r);
        __syncthreads();
        MK_PHASE(0);
        task_gemv_bf16(c);
        __syncthreads();
        MK_PHASE(6);
    }
    // Phase 5 is the staging: from before its copies to mark 0.
    if (threadIdx.x == 0) probe_phases_add(11, 5);
}

__global__ void probe_read(const uint4* __restrict__ src, u64 n, u32* sink) {
    u32 acc = 0;
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
        const uint4 v = ld_stream16(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) *sink = acc;  // keeps the loads
}

int main(int argc, char** argv) {
    const char* shape = argc > 1 ? argv[1] : "qkv";
    const char* mode = argc > 2 ? argv[2] : "cold";
    const int launches = argc > 3 ? atoi(argv[3]) : 200;
    const u32 reps = argc > 4 ? u32(atoi(argv[4])) : 1;  // bodies per launch; the last is marked
    const bool staged = !strncmp(mode, "staged", 6), hot = strstr(mode, "hot") != nullptr;
    const bool cold_code = strstr(mode, "cold-code") != nullptr;
    u32 rows = 5120, cols = 2048, tasks = 132;
    u16 prologue = PROLOGUE_RMSNORM, ydt = DTYPE_BF16, acc = 0;
    if (!strcmp(shape, "oproj")) rows = 2048, cols = 4096, prologue = PROLOGUE_NONE, acc = 1;
    if (!strcmp(shape, "router")) rows = 128, tasks = 8, ydt = DTYPE_F32;
    if (!strcmp(shape, "sq")) rows = 8192, cols = 8192, prologue = PROLOGUE_NONE, ydt = DTYPE_F32;
    if (!strcmp(shape, "lm")) rows = 151936, prologue = PROLOGUE_NONE, ydt = DTYPE_F32;
    if (argc > 5) tasks = u32(atoi(argv[5]));
    if (tasks == 0 || tasks > 1024) {  // g_marks holds 1024 blocks' marks
        fprintf(stderr, "blocks must be 1 .. 1024\n");
        return 2;
    }
    const u32 copies = 8;
    const u64 mat_bytes = u64(rows) * cols * 2;
    u64 seed = 11;
    std::vector<unsigned short> w(u64(rows) * cols), x(cols), g(cols, 0x3F80);
    for (auto& v : w) v = (unsigned short)(0x3C00 + lcg(seed) % 0x200);  // bf16 of about 0.008 .. 0.03
    for (auto& v : x) v = (unsigned short)(0x3F00 + lcg(seed) % 0x100);
    std::vector<void*> mats(copies);
    for (auto& m : mats) {
        CHECK(cudaMalloc(&m, mat_bytes));
        CHECK(cudaMemcpy(m, w.data(), mat_bytes, cudaMemcpyHostToDevice));
    }
    void *dx, *dg, *dy;
    CHECK(cudaMalloc(&dx, cols * 2));
    CHECK(cudaMalloc(&dg, cols * 2));
    CHECK(cudaMalloc(&dy, rows * 4));
    CHECK(cudaMemcpy(dx, x.data(), cols * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dg, g.data(), cols * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(dy, 0, rows * 4));
    DeviceState* dst;
    StatusBlock* dsb;
    probe_state(&dst, &dsb);

    GemvBf16Args a;
    memset(&a, 0, sizeof a);
    a.x = u64(dx);
    a.y = u64(dy);
    a.cols = cols;
    a.ldw = cols;
    a.m = 1;
    a.ldx = cols;
    a.ldy = rows;
    a.x_dtype = DTYPE_BF16;
    a.y_dtype = ydt;
    a.accumulate = acc;
    a.prologue = prologue;
    const float eps = 1e-6f;
    memcpy(&a.eps, &eps, 4);
    a.aux = u64(dg);
    // What the task keeps below a staged slice (src/task/gemv_bf16.rs).
    const u32 per_task = (rows + tasks - 1) / tasks;
    u32 keep = prologue ? ((cols + 16) * 2 + 128 + 128) : 0;
    keep = (keep + 127) & ~127u;
    keep += (cols + 255) / 256 * 16 * 16 * 4 * std::min(8u, std::max(1u, (per_task + 15) / 16)) + 256;
    keep = (keep + 127) & ~127u;

    CHECK(cudaFuncSetAttribute(gemv_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, PROBE_SMEM));
    auto launch = [&](int i) {
        GemvBf16Args li = a;
        li.w = u64(mats[hot ? 0 : i % copies]);
        gemv_probe<<<tasks, BLOCK_THREADS, PROBE_SMEM>>>(li, rows, tasks, staged, keep, reps, cold_code, dst, dsb);
    };
    for (int i = 0; i < 16; ++i) launch(i);
    CHECK(cudaDeviceSynchronize());
    probe_phases_reset();
    const double us = probe_time(launches, launch);
    const double n = double(launches) * tasks;
    printf("%s %s x%u: %u blocks of %u rows x %u, keep %u, staged %s, %.2f us per launch, fault kind %u\n", shape, mode, reps,
           tasks, per_task, cols, keep, staged ? "yes" : "no", us, probe_fault(dsb));
    const char* names[12] = {"",           "prepared",         "warp 0 jobs",      "all jobs",
                             "end",        "staging",          "after barrier",    "last job: entry",
                             "... set up", "... loads issued", "... mmas issued",  "... partials stored"};
    probe_phases_print(names, 11, n);
    // The same matrices read by a plain grid-stride kernel (16 bytes a thread).
    const double read_us = probe_time(launches, [&](int i) {
        probe_read<<<132 * 4, BLOCK_THREADS>>>(reinterpret_cast<const uint4*>(mats[hot ? 0 : i % copies]),
                                               mat_bytes / 16, reinterpret_cast<u32*>(dy));
    });
    printf("  body %.1f GB/s, plain read %.1f GB/s: %.1f %%\n", mat_bytes / us / 1e3, mat_bytes / read_us / 1e3,
           100.0 * read_us / us);
    return probe_fault(dsb) != 0;
}
