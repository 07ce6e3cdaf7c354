// advance: ids[0] = token[0]; pos[0] += m; src/task/advance.rs.
#pragma once
#include "../include/task.cuh"

struct AdvanceArgs {
    u64 pos;
    u64 ids;
    u64 token;
    u32 m;
    u32 reserved;
};
MK_SIZE(AdvanceArgs, 32);
MK_OFFSET(AdvanceArgs, pos, 0);
MK_OFFSET(AdvanceArgs, ids, 8);
MK_OFFSET(AdvanceArgs, token, 16);
MK_OFFSET(AdvanceArgs, m, 24);
MK_OFFSET(AdvanceArgs, reserved, 28);

MK_COLD_TASK void task_advance(const Ctx& c) {
    const AdvanceArgs& a = task_args<AdvanceArgs>(c);
    if (threadIdx.x == 0) {
        reinterpret_cast<u32*>(a.ids)[0] = reinterpret_cast<const u32*>(a.token)[0];
        reinterpret_cast<u32*>(a.pos)[0] += a.m;
    }
}
