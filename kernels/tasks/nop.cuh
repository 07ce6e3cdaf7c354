// nop: nothing; src/task/nop.rs.
#pragma once
#include "../include/task.cuh"

struct NopArgs {
    u64 reserved;
};
MK_SIZE(NopArgs, 8);
MK_OFFSET(NopArgs, reserved, 0);

__device__ __forceinline__ void task_nop(const Ctx&) {}
