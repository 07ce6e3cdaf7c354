// Memory-model primitives, bounded waits and fault reporting.
#pragma once
#include "abi.cuh"

__device__ __forceinline__ u64 ld_acquire_gpu(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u64 ld_relaxed_sys(const u64* p) {
    u64 v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u32 ld_relaxed_sys_u32(const u32* p) {
    u32 v;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u32 ld_relaxed_gpu_u32(const u32* p) {
    u32 v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u64 ld_relaxed_gpu64(const u64* p) {
    u64 v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_relaxed_sys(u64* p, u64 v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys_u32(u32* p, u32 v) {
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys_u32(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_gpu(u64* p, u64 v) {
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void red_release_gpu(u64* p, u64 v) {
    asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 atom_add_acq_rel_gpu(u64* p, u64 v) {
    u64 old;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
    return old;
}
__device__ __forceinline__ u64 globaltimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The resident kernel's pointers; one copy per block, in shared memory, so
// that passing it around never materialises per-thread copies in local memory.
struct Env {
    const Command* host_commands;
    Command* dev_commands;
    u64* output;
    DeviceState* state;
    StatusBlock* status;
    u64 timeout_ns;
    u64 epoch;  // the running program's epoch (times it ran, this iteration included)
    u32 sm;
    u32 num_sms;
};

// The block's staging barrier (stage.cuh) and how many stagings it completed:
// the next staging completes phase `stagings & 1`. Thread 0 counts a staging
// only after a barrier that every waiting thread passed.
struct Stage {
    u64 bar;
    u32 stagings;
};

// Claims the error record (first reporter wins), fills it, and stops every block.
__device__ __noinline__ void report_fault(const Env* env, u32 task, u32 opcode, u64 command, u32 kind, u32 event,
                                          u64 seen, u64 needed) {
    if (atomicCAS(&env->state->abort, 0u, 1u) == 0u) {
        ErrorRecord* e = &env->status->error;
        st_relaxed_sys_u32(&e->sm, env->sm);
        st_relaxed_sys_u32(&e->task, task);
        st_relaxed_sys_u32(&e->opcode, opcode);
        st_relaxed_sys_u32(&e->event, event);
        st_relaxed_sys(&e->seen, seen);
        st_relaxed_sys(&e->needed, needed);
        st_relaxed_sys(&e->command, command);
        st_release_sys_u32(&e->kind, kind);
    }
}

// True once any block reported a fault or the host asked to abort.
__device__ __forceinline__ bool aborted(const Env* env) {
    return ld_relaxed_gpu_u32(&env->state->abort) != 0u;
}

// Most bytes of a task's declared range an idle block asks L2 to fetch: all
// blocks' shares together stay well inside an H100's 50 MB of L2. (Whole
// ranges of several MiB, an LM head's, queued behind each other in the bulk
// copy unit and held a block's wait up to 70 us past its inputs' arrival.)
constexpr u64 PREFETCH_MAX_BYTES = 256 * 1024;

// Thread 0: asks L2 to fetch the range a task declared (TASK_FLAG_PREFETCH),
// at most PREFETCH_MAX_BYTES of it, in 32 KiB bulk requests. Hopper and
// later; a no-op elsewhere.
__device__ __forceinline__ void prefetch_task(const TaskDesc* d) {
#if __CUDA_ARCH__ >= 900
    if (d->flags & TASK_FLAG_PREFETCH) {
        const u64 addr = d->args[TASK_ARG_SLOTS - 1];
        const u64 bytes = min(d->args[TASK_ARG_SLOTS - 2] & 0xFFFFFFFFu, PREFETCH_MAX_BYTES);
        for (u64 off = 0; off < bytes; off += 32768) {
            const u32 n = u32(min(bytes - off, u64(32768)));
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr + off), "r"(n) : "memory");
        }
    }
#endif
}

// Waits (one thread) until *ctr >= need with acquire loads, spinning first and
// backing off with short sleeps later. (Relaxed polling closed by an acquire
// fence measured slower: 1.58 vs 1.28 us per hop on an H100.) Returns false on
// abort or timeout (a timeout is reported as a hang of `task` naming `event`).
// With `idle_prefetch`, a wait not met at once first asks L2 for that task's
// range (prefetch_task).
template <bool SYS>
__device__ __noinline__ bool wait_at_least(const Env* env, u32 task, u32 opcode, u64 command, const u64* ctr,
                                           u64 need, u32 event, const TaskDesc* idle_prefetch = nullptr) {
    u64 v = SYS ? ld_acquire_sys(ctr) : ld_acquire_gpu(ctr);
    if (v >= need) return true;
    if (idle_prefetch) prefetch_task(idle_prefetch);
    const u64 start = globaltimer();
    // Polls in rounds of four, so that the count and its checks come between
    // rounds, not between two polls.
    for (u32 polls = 0;; polls += 4) {
        if (polls >= 4096) __nanosleep(polls >= 16384 ? 512 : 64);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v = SYS ? ld_acquire_sys(ctr) : ld_acquire_gpu(ctr);
            if (v >= need) return true;
        }
        if ((polls & 63) == 60) {
            if (aborted(env)) return false;
            if (globaltimer() - start > env->timeout_ns) {
                report_fault(env, task, opcode, command, FAULT_HANG, event, v, need);
                return false;
            }
        }
    }
}
