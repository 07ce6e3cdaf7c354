// Staging: bulk asynchronous copies (Hopper's cp.async.bulk, completion counted
// in bytes on one mbarrier per block) of a range of global memory into the top
// of the block's dynamic shared memory. A task whose weights are staged before
// its waits streams them while earlier stages finish; a task that learns its
// ranges only from its inputs reads them from global memory itself. Before
// sm_90 nothing is staged and tasks read global memory as before.
#pragma once
#include "sync.cuh"

#if __CUDA_ARCH__ >= 900
constexpr bool STAGING = true;
#else
constexpr bool STAGING = false;
#endif

// Largest single bulk copy issued (any multiple of 16 works; smaller pieces
// spread the range over more memory channels sooner).
constexpr u32 STAGE_PIECE = 16384;

__device__ __forceinline__ u32 smem_addr(const void* p) { return u32(__cvta_generic_to_shared(p)); }

// Thread 0, once per block: the barrier counts one arrival per staging.
__device__ __forceinline__ void stage_init(u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Thread 0: announces `bytes` bytes on the barrier (the arrival of this phase).
__device__ __forceinline__ void stage_expect(u64* bar, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
#endif
}

// Thread 0: copies `bytes` (a multiple of 16; both addresses 16-byte aligned)
// from global `src` to shared `dst`, completing on `bar`.
__device__ __forceinline__ void stage_copy(u64* bar, void* dst, u64 src, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    for (u32 off = 0; off < bytes; off += STAGE_PIECE) {
        const u32 n = min(bytes - off, STAGE_PIECE);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_addr(dst) + off),
            "l"(src + off), "r"(n), "r"(smem_addr(bar))
            : "memory");
    }
#endif
}

// Any thread: waits until the staging of phase `parity` landed; its bytes are
// then visible to the waiting thread.
__device__ __forceinline__ void stage_wait(u64* bar, u32 parity) {
#if __CUDA_ARCH__ >= 900
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    }
#endif
}

// `p`, a pointer into the block's dynamic shared memory, rebuilt from the
// dynamic shared memory symbol, so that the compiler knows its address space:
// accesses through it (and pointers derived from it) become shared-memory
// loads and stores instead of the generic ones a task's context pointer
// gives, which wait in the global-memory queue and on its scoreboard.
__device__ __forceinline__ unsigned char* as_shared(const void* p) {
    extern __shared__ __align__(16) unsigned char mk_dynamic_smem[];
    return mk_dynamic_smem + (smem_addr(p) - smem_addr(mk_dynamic_smem));
}

// 16 bytes of shared memory.
__device__ __forceinline__ uint4 ld_shared16(const void* p) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(smem_addr(p)));
    return v;
}
