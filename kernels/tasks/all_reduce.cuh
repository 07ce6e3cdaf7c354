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
    u32 runs;
    u32 stride;
};
MK_SIZE(AllReduceArgs, 56);
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
MK_OFFSET(AllReduceArgs, runs, 48);
MK_OFFSET(AllReduceArgs, stride, 52);

constexpr u32 ALL_REDUCE_SUM = 0;
constexpr u32 ALL_REDUCE_GATHER = 1;

// Site table entries (u64): the abort word, then per rank its data and its
// receive slots (one u64 per rank and element: the value's 32 bits, then the
// low 32 bits of the epoch that wrote it).
__device__ __forceinline__ u64 site_data(const u64* table, u32 q) { return table[2 + 2 * q]; }
__device__ __forceinline__ u64* site_recv(const u64* table, u32 q) {
    return reinterpret_cast<u64*>(table[3 + 2 * q]);
}

// Every thread: waits until `slot` holds a value of epoch `tag` and returns
// the value's bits (the slow path of all_reduce_take); 0 with *ok cleared
// when the kernel is stopping, a rank failed (the abort word) or rank q
// never wrote (a hang naming it after half the wait timeout, so that this
// rank's other waits, which a missing rank stalls too, do not fire first and
// hide who is missing).
__device__ __noinline__ u32 all_reduce_wait(const Ctx& c, const AllReduceArgs& a, const u64* slot, u32 tag, u32 q,
                                            int* ok) {
    const u32* abort_word = reinterpret_cast<const u32*>(reinterpret_cast<const u64*>(a.table)[0]);
    u64 start = 0;
    for (u32 polls = 0;; ++polls) {
        const u64 w = ld_relaxed_sys(slot);
        if (u32(w >> 32) == tag) return u32(w);
        if (polls >= 4096) __nanosleep(64);
        if ((polls & 63) == 63) {
            if (start == 0) start = globaltimer();
            if (aborted(c.env) || !*reinterpret_cast<volatile int*>(ok)) {
                *ok = 0;
                return 0;
            }
            // The abort word is host memory: one read a warp (its lowest
            // lane still waiting) every 1024 polls; the others learn of a
            // failure through `ok`. (With every waiting thread reading it
            // every 64 polls, the peers' stores took milliseconds to arrive
            // once ranks drifted apart: BENCHMARKS.md, thirty-eighth round.)
            if ((polls & 1023) == 1023 && (threadIdx.x & 31) == u32(__ffs(__activemask()) - 1)) {
                const u32 failed = ld_relaxed_sys_u32(abort_word);
                if (failed != 0u) {
                    report_fault(c.env, c.desc->id, c.desc->opcode, c.command, FAULT_PEER_FAILED, NO_EVENT,
                                 failed - 1, a.ranks);
                    *ok = 0;
                    return 0;
                }
            }
            if (globaltimer() - start > c.env->timeout_ns / 2) {
                report_fault(c.env, c.desc->id, c.desc->opcode, c.command, FAULT_HANG, WAIT_PEER + q, w >> 32, tag);
                *ok = 0;
                return 0;
            }
        }
    }
}

// Ranks' slots of one element a take reads at once.
constexpr u32 ALL_REDUCE_READS = 8;
// Rounds of reads a take makes before it waits for each missing slot in turn.
constexpr u32 ALL_REDUCE_ROUNDS = 64;

// A relaxed read of a receive slot. No memory clobber: the value and its
// tag share one word, so nothing else has to be ordered around the read,
// and the task's arguments stay in registers across the polls.
__device__ __forceinline__ u64 all_reduce_read(const u64* p) {
    u64 v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

// Every thread: the bits of the values of epoch `tag` in the slots of ranks
// q0 .. q0 + n (n <= ALL_REDUCE_READS) of element k (`stride`: slots between
// two ranks), into v. Each round reads every slot still missing at once, so
// values that arrive together cost one round trip, not one a rank; slots
// still missing after ALL_REDUCE_ROUNDS rounds are waited for one by one
// (all_reduce_wait, which also watches for failures). False when the task
// has to stop.
__device__ __forceinline__ bool all_reduce_take(const Ctx& c, const AllReduceArgs& a, const u64* slots, u64 stride,
                                                u32 q0, u32 n, u32 tag, int* ok, u32 (&v)[ALL_REDUCE_READS]) {
    u32 missing = (1u << n) - 1u;
    for (u32 round = 0; missing != 0u && round < ALL_REDUCE_ROUNDS; ++round) {
        u64 w[ALL_REDUCE_READS];
#pragma unroll
        for (u32 i = 0; i < ALL_REDUCE_READS; ++i) {
            w[i] = (missing & (1u << i)) ? all_reduce_read(slots + (q0 + i) * stride) : 0u;
        }
#pragma unroll
        for (u32 i = 0; i < ALL_REDUCE_READS; ++i) {
            if ((missing & (1u << i)) && u32(w[i] >> 32) == tag) {
                v[i] = u32(w[i]);
                missing &= ~(1u << i);
            }
        }
    }
    if (missing != 0u) {
#pragma unroll 1
        for (u32 i = 0; i < n; ++i) {
            if (missing & (1u << i)) {
                v[i] = all_reduce_wait(c, a, slots + (q0 + i) * stride, tag, q0 + i, ok);
                if (!*reinterpret_cast<volatile int*>(ok)) return false;
            }
        }
    }
    return true;
}

// Push, then take: every thread stores its elements of this rank's data into
// every rank's receive slots for this rank, each value with the epoch in the
// same 64-bit store (so no fence orders them), then waits for its elements
// from every rank in its own slots and combines them. The producers' writes
// were acquired by this task's event wait, or made by this block (a task that
// follows its producer on its SM: ProgramBuilder's `follow`).
__device__ __noinline__ void task_all_reduce(const Ctx& c) {
    const AllReduceArgs& a = task_args<AllReduceArgs>(c);
    // The arguments in registers: the slots' stores and reads (asm with
    // memory clobbers) would otherwise make the compiler read them again.
    const u32 rank = a.rank, ranks = a.ranks, op = a.op, out_dtype = a.out_dtype, chunk = a.chunk;
    const u32 first = a.first, count = a.count, runs = a.runs, stride = a.stride;
    const u64 seg = a.seg, out = a.out;
    if (runs == 0 || (op != ALL_REDUCE_SUM && runs != 1)) {  // AllReduce::spec rejects these
        if (threadIdx.x == 0) task_fault(c, FAULT_BAD_ARGS, op, runs);
        return;
    }
    int* ok = reinterpret_cast<int*>(c.scratch());
    if (threadIdx.x == 0) *ok = 1;
    __syncthreads();
    const u64* table = reinterpret_cast<const u64*>(a.table);
    const u32 tag = u32(c.env->epoch);
    const u32* mine = reinterpret_cast<const u32*>(site_data(table, rank));
    const u64* recv = site_recv(table, rank);
    // Elements j of the task: runs of `count` elements, `stride` apart.
    const u32 total = count * runs;
    auto element = [&](u32 j) {
        return u64(first) + (runs == 1 ? u64(j) : u64(j / count) * stride + j % count);
    };
    for (u32 j = threadIdx.x; j < total; j += blockDim.x) {
        const u64 e = element(j);
        // A plain load: the producers' writes were acquired by this task's
        // wait (which cleared L1) or made on this SM (a follower), so L1 holds
        // no stale copy, and a follower may find them there.
        const u64 w = (u64(tag) << 32) | mine[e];
        for (u32 q = 0; q < ranks; ++q) st_relaxed_sys(site_recv(table, q) + u64(rank) * seg + e, w);
    }
    if (op == ALL_REDUCE_SUM) {
        // Ranks in order 0, 1, ...: every rank computes the same sum. The
        // output's element is read first, so that its trip overlaps the takes.
        for (u32 j = threadIdx.x; j < total; j += blockDim.x) {
            const u64 k = element(j);
            // From L2 (`__ldcg`): a task that follows its producer meets no
            // acquire between the output's last writer, on another SM, and it.
            const float base = out_dtype == DTYPE_BF16
                                   ? bf16_to_f32(__ldcg(reinterpret_cast<const unsigned short*>(out) + k))
                                   : __ldcg(reinterpret_cast<const float*>(out) + k);
            float s = 0.0f;
            bool live = true;
            for (u32 q0 = 0; live && q0 < ranks; q0 += ALL_REDUCE_READS) {
                const u32 n = min(ranks - q0, ALL_REDUCE_READS);
                u32 v[ALL_REDUCE_READS];
                live = all_reduce_take(c, a, recv + k, seg, q0, n, tag, ok, v);
#pragma unroll
                for (u32 i = 0; i < ALL_REDUCE_READS; ++i) {
                    if (i < n) s = q0 + i == 0 ? __uint_as_float(v[i]) : s + __uint_as_float(v[i]);
                }
            }
            if (!live || !*reinterpret_cast<volatile int*>(ok)) break;
            store_float(out, out_dtype, k, base + s);
        }
    } else {
        // Rank q's element e lands in chunk e / chunk of rank q's column.
        for (u32 j = threadIdx.x; j < count * ranks; j += blockDim.x) {
            const u32 q = j / count, e = first + j % count;
            const u32 v = all_reduce_wait(c, a, recv + u64(q) * seg + e, tag, q, ok);
            if (!*reinterpret_cast<volatile int*>(ok)) break;
            reinterpret_cast<u32*>(out)[u64(e / chunk) * (ranks * chunk) + q * chunk + e % chunk] = v;
        }
    }
    __syncthreads();
}
