// dflash_inject: benchmark mode. Overwrites the draft's proposals with a known
// greedy continuation, mismatching where the chosen mean acceptance length
// says; src/task/dflash_inject.rs.
#pragma once
#include "../include/task.cuh"

struct DflashInjectArgs {
    u64 ids;
    u64 reference;
    u64 pos;
    u64 state;
    u32 block;
    u32 ref_len;
    u32 vocab;
    u32 reserved;
};
MK_SIZE(DflashInjectArgs, 48);
MK_OFFSET(DflashInjectArgs, ids, 0);
MK_OFFSET(DflashInjectArgs, reference, 8);
MK_OFFSET(DflashInjectArgs, pos, 16);
MK_OFFSET(DflashInjectArgs, state, 24);
MK_OFFSET(DflashInjectArgs, block, 32);
MK_OFFSET(DflashInjectArgs, ref_len, 36);
MK_OFFSET(DflashInjectArgs, vocab, 40);
MK_OFFSET(DflashInjectArgs, reserved, 44);

MK_COLD_TASK void task_dflash_inject(const Ctx& c) {
    const DflashInjectArgs& a = task_args<DflashInjectArgs>(c);
    if (threadIdx.x != 0) return;
    u32* ids = reinterpret_cast<u32*>(a.ids);
    const u32* ref = reinterpret_cast<const u32*>(a.reference);
    const u32* st = reinterpret_cast<const u32*>(a.state);
    const u64 k = st[3], t = st[22];  // iterations so far, tau x 1000 (src/task/dflash_accept.rs)
    const u32 want = u32(min(max((k + 1) * t / 1000 - k * t / 1000, u64(1)), u64(a.block)));
    const u32 p = *reinterpret_cast<const u32*>(a.pos);
    for (u32 i = 1; i < a.block && u64(p) + i < a.ref_len; ++i) {
        if (i < want) ids[i] = ref[p + i];
        else if (i == want) ids[i] = (ref[p + i] + 1) % a.vocab;
    }
}
