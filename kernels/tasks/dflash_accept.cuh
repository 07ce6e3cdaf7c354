// dflash_accept: ends a DFlash iteration (longest matching prefix plus the
// target's own next token), emits the accepted tokens and moves the sequence
// on; src/task/dflash_accept.rs.
#pragma once
#include "emit.cuh"

struct DflashAcceptArgs {
    u64 ids;
    u64 targets;
    u64 pos;
    u64 state;
    u64 stop;
    u64 draft_ids;
    u64 step_ids;
    u32 block;
    u32 max_pos;
};
MK_SIZE(DflashAcceptArgs, 64);
MK_OFFSET(DflashAcceptArgs, ids, 0);
MK_OFFSET(DflashAcceptArgs, targets, 8);
MK_OFFSET(DflashAcceptArgs, pos, 16);
MK_OFFSET(DflashAcceptArgs, state, 24);
MK_OFFSET(DflashAcceptArgs, stop, 32);
MK_OFFSET(DflashAcceptArgs, draft_ids, 40);
MK_OFFSET(DflashAcceptArgs, step_ids, 48);
MK_OFFSET(DflashAcceptArgs, block, 56);
MK_OFFSET(DflashAcceptArgs, max_pos, 60);

// Accept state words (src/task/dflash_accept.rs, `state`).
constexpr u32 DFLASH_LIMIT = 0, DFLASH_PRODUCED = 1, DFLASH_STOP_TOKEN = 2, DFLASH_ITERS = 3, DFLASH_REASON = 4,
              DFLASH_HIST = 5;

MK_COLD_TASK void task_dflash_accept(const Ctx& c) {
    const DflashAcceptArgs& a = task_args<DflashAcceptArgs>(c);
    if (threadIdx.x != 0) return;
    u32* ids = reinterpret_cast<u32*>(a.ids);
    const u32* targets = reinterpret_cast<const u32*>(a.targets);
    u32* st = reinterpret_cast<u32*>(a.state);
    u32* pos = reinterpret_cast<u32*>(a.pos);
    u32 acc = 1;  // the target's own token is always accepted
    while (acc < a.block && ids[acc] == targets[acc - 1]) ++acc;
    const u32 p = *pos, produced = st[DFLASH_PRODUCED], limit = st[DFLASH_LIMIT];
    u32 n = min(acc, min(limit > produced ? limit - produced : 0u, a.max_pos > p ? a.max_pos - p : 0u));
    u32 reason = 0;
    for (u32 i = 0; i < n; ++i) {
        if (targets[i] == st[DFLASH_STOP_TOKEN]) {
            n = i + 1, reason = 2;
            break;
        }
    }
    st[DFLASH_ITERS] += 1;
    st[DFLASH_HIST + min(acc, 16u)] += 1;
    if (n > 0) {
        emit_values(c, targets, n);
        const u32 last = targets[n - 1];
        ids[0] = last;
        reinterpret_cast<u32*>(a.draft_ids)[0] = last;
        reinterpret_cast<u32*>(a.step_ids)[0] = last;
        *pos = p + n;
        st[DFLASH_PRODUCED] = produced + n;
    }
    if (reason == 0 && produced + n >= limit) reason = 1;
    if (reason == 0 && p + n >= a.max_pos) reason = 3;
    if (reason != 0) {
        st[DFLASH_REASON] = reason;
        *reinterpret_cast<u64*>(a.stop) = c.env->epoch;
    }
}
