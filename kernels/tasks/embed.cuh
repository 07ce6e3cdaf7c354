// embed: dst[i, :] = table[ids[i], :], ids bounds-checked; src/task/embed.rs.
#pragma once
#include "../include/task.cuh"

struct EmbedArgs {
    u64 dst;
    u64 table;
    u64 ids;
    u32 m;
    u32 cols;
    u32 rows;
    u32 table_dtype;
    u32 dst_dtype;
    u32 reserved;
};
MK_SIZE(EmbedArgs, 48);
MK_OFFSET(EmbedArgs, dst, 0);
MK_OFFSET(EmbedArgs, table, 8);
MK_OFFSET(EmbedArgs, ids, 16);
MK_OFFSET(EmbedArgs, m, 24);
MK_OFFSET(EmbedArgs, cols, 28);
MK_OFFSET(EmbedArgs, rows, 32);
MK_OFFSET(EmbedArgs, table_dtype, 36);
MK_OFFSET(EmbedArgs, dst_dtype, 40);
MK_OFFSET(EmbedArgs, reserved, 44);

MK_COLD_TASK void task_embed(const Ctx& c) {
    const EmbedArgs& a = task_args<EmbedArgs>(c);
    const u32* ids = reinterpret_cast<const u32*>(a.ids);
    for (u32 i = 0; i < a.m; ++i) {
        const u32 id = ids[i];
        if (id >= a.rows) {
            if (threadIdx.x == 0) task_fault(c, FAULT_OUT_OF_RANGE, id, a.rows);
            return;
        }
        const u64 src = u64(id) * a.cols, dst = u64(i) * a.cols;
        for (u32 j = threadIdx.x; j < a.cols; j += blockDim.x) {
            store_float(a.dst, a.dst_dtype, dst + j, load_float(a.table, a.table_dtype, src + j));
        }
    }
}
