// all_reduce: one collective step of a tensor-parallel program; the protocol
// is described in src/task/all_reduce.rs.
#pragma once
#include "../include/task.cuh"

struct AllReduceArgs {
    u64 table;
    u64 out;
    u32 rank;
    u32 ranks;
    u32 op;
    u32 out_dtype;
    u32 seg;
    u32 chunk;
    u32 first;
    u32 count;
};
MK_SIZE(AllReduceArgs, 48);
MK_OFFSET(AllReduceArgs, table, 0);
MK_OFFSET(AllReduceArgs, out, 8);
MK_OFFSET(AllReduceArgs, rank, 16);
MK_OFFSET(AllReduceArgs, ranks, 20);
MK_OFFSET(AllReduceArgs, op, 24);
MK_OFFSET(AllReduceArgs, out_dtype, 28);
MK_OFFSET(AllReduceArgs, seg, 32);
MK_OFFSET(AllReduceArgs, chunk, 36);
MK_OFFSET(AllReduceArgs, first, 40);
MK_OFFSET(AllReduceArgs, count, 44);

constexpr u32 ALL_REDUCE_SUM = 0;
constexpr u32 ALL_REDUCE_GATHER = 1;

// Site table entries (u64): the abort word, then per rank its data and flags.
__device__ __forceinline__ u64 site_data(const u64* table, u32 q) { return table[2 + 2 * q]; }
__device__ __forceinline__ u64* site_flags(const u64* table, u32 q) {
    return reinterpret_cast<u64*>(table[3 + 2 * q]);
}

// Thread 0: announces this rank's arrival (its epoch in every rank's flag slot
// for it), then waits until every rank arrived. False: a fault was reported
// (a rank that never arrives, or the abort word naming a failed rank) or the
// kernel is stopping.
__device__ __noinline__ bool all_reduce_meet(const Ctx& c, const AllReduceArgs& a) {
    const u64* table = reinterpret_cast<const u64*>(a.table);
    const u64 epoch = c.env->epoch;
    // This block acquired the producers' writes (gpu scope); make them visible
    // system-wide before the flags that publish them.
    __threadfence_system();
    for (u32 q = 0; q < a.ranks; ++q) st_release_sys(site_flags(table, q) + a.rank, epoch);
    const u64* flags = site_flags(table, a.rank);
    const u32* abort_word = reinterpret_cast<const u32*>(table[0]);
    const u64 start = globaltimer();
    u32 polls = 0;
    for (u32 q = 0; q < a.ranks; ++q) {
        for (;; ++polls) {
            const u64 v = ld_acquire_sys(flags + q);
            if (v >= epoch) break;
            if ((polls & 63) == 63) {
                if (aborted(c.env)) return false;
                const u32 failed = ld_relaxed_sys_u32(abort_word);
                if (failed != 0u) {
                    report_fault(c.env, c.desc->id, c.desc->opcode, c.command, FAULT_PEER_FAILED, NO_EVENT, failed - 1,
                                 a.ranks);
                    return false;
                }
                // Half the wait timeout: this rank's other waits, which a missing
                // rank stalls too, must not fire first and hide who is missing.
                if (globaltimer() - start > c.env->timeout_ns / 2) {
                    report_fault(c.env, c.desc->id, c.desc->opcode, c.command, FAULT_HANG, WAIT_PEER + q, v, epoch);
                    return false;
                }
            }
            if (polls >= 4096) __nanosleep(64);
        }
    }
    return true;
}

__device__ __noinline__ void task_all_reduce(const Ctx& c) {
    const AllReduceArgs& a = task_args<AllReduceArgs>(c);
    int* ok = reinterpret_cast<int*>(c.scratch());
    if (threadIdx.x == 0) *ok = all_reduce_meet(c, a);
    __syncthreads();
    if (!*ok) return;
    const u64* table = reinterpret_cast<const u64*>(a.table);
    if (a.op == ALL_REDUCE_SUM) {
        // Ranks in order 0, 1, ...: every rank computes the same sum.
        for (u32 j = threadIdx.x; j < a.count; j += blockDim.x) {
            const u64 k = u64(a.first) + j;
            float v[8];
            float s = 0.0f;
            for (u32 q0 = 0; q0 < a.ranks; q0 += 8) {
                const u32 n = min(a.ranks - q0, 8u);
#pragma unroll
                for (u32 i = 0; i < 8; ++i) {
                    if (i < n) v[i] = __ldcg(reinterpret_cast<const float*>(site_data(table, q0 + i)) + k);
                }
#pragma unroll
                for (u32 i = 0; i < 8; ++i) {
                    if (i < n) s = (q0 + i == 0) ? v[i] : s + v[i];
                }
            }
            store_float(a.out, a.out_dtype, k, load_float(a.out, a.out_dtype, k) + s);
        }
    } else {
        // Rank q's element e lands in chunk e / chunk of rank q's column.
        for (u32 j = threadIdx.x; j < a.count * a.ranks; j += blockDim.x) {
            const u32 q = j / a.count, e = a.first + j % a.count;
            const u32 v = __ldcg(reinterpret_cast<const u32*>(site_data(table, q)) + e);
            reinterpret_cast<u32*>(a.out)[u64(e / a.chunk) * (a.ranks * a.chunk) + q * a.chunk + e % a.chunk] = v;
        }
    }
}
