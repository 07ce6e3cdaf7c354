// swiglu: out = silu(gate) * up; src/task/swiglu.rs.
#pragma once
#include "../include/task.cuh"

struct SwigluArgs {
    u64 out;
    u64 gate;
    u64 up;
    u32 n;
    u32 gate_dtype;
    u32 up_dtype;
    u32 out_dtype;
};
MK_SIZE(SwigluArgs, 40);
MK_OFFSET(SwigluArgs, out, 0);
MK_OFFSET(SwigluArgs, gate, 8);
MK_OFFSET(SwigluArgs, up, 16);
MK_OFFSET(SwigluArgs, n, 24);
MK_OFFSET(SwigluArgs, gate_dtype, 28);
MK_OFFSET(SwigluArgs, up_dtype, 32);
MK_OFFSET(SwigluArgs, out_dtype, 36);

MK_COLD_TASK void task_swiglu(const Ctx& c) {
    const SwigluArgs& a = task_args<SwigluArgs>(c);
    for (u32 i = threadIdx.x; i < a.n; i += blockDim.x) {
        const float g = load_float(a.gate, a.gate_dtype, i);
        const float u = load_float(a.up, a.up_dtype, i);
        store_float(a.out, a.out_dtype, i, swiglu_value(g, u));
    }
}
