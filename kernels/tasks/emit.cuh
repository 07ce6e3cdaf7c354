// emit: appends n u32 values to the host output ring, in order; src/task/emit.rs.
#pragma once
#include "../include/task.cuh"

struct EmitArgs {
    u64 src;
    u32 n;
    u32 reserved;
};
MK_SIZE(EmitArgs, 16);
MK_OFFSET(EmitArgs, src, 0);
MK_OFFSET(EmitArgs, n, 8);
MK_OFFSET(EmitArgs, reserved, 12);

// Thread 0: appends src[0..n) to the output ring, published in reservation order.
__device__ __noinline__ void emit_values(const Ctx& c, const u32* src, u32 n) {
    DeviceState* st = c.env->state;
    StatusBlock* hs = c.env->status;
    const u64 base = atomicAdd(reinterpret_cast<unsigned long long*>(&st->out_reserved), u64(n));
    // Room in the ring: the host must have consumed up to base + n - CAP.
    const u64 room = base + n > OUTPUT_RING_CAP ? base + n - OUTPUT_RING_CAP : 0;
    const u32 id = c.desc->id, op = c.desc->opcode;
    if (!wait_at_least<true>(c.env, id, op, c.command, &hs->out_consumed, room, WAIT_OUTPUT_SPACE)) return;
    u64* ring = c.env->output;
    for (u32 i = 0; i < n; ++i) st_relaxed_sys(&ring[(base + i) % OUTPUT_RING_CAP], u64(src[i]));
    // Publish in reservation order.
    if (!wait_at_least<false>(c.env, id, op, c.command, &st->out_published, base, WAIT_OUTPUT_ORDER)) return;
    st_release_sys(&hs->out_published, base + n);
    st_release_gpu(&st->out_published, base + n);
}

MK_COLD_TASK void task_emit(const Ctx& c) {
    const EmitArgs& a = task_args<EmitArgs>(c);
    if (threadIdx.x == 0) emit_values(c, reinterpret_cast<const u32*>(a.src), a.n);
}
