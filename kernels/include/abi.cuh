// Records shared with the host; mirrors src/abi.rs. Sizes and offsets are pinned
// with MK_SIZE / MK_OFFSET, which a Rust unit test reads and compares.
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

#define MK_SIZE(T, n) static_assert(sizeof(T) == (n), "size of " #T)
#define MK_OFFSET(T, f, n) static_assert(__builtin_offsetof(T, f) == (n), "offset of " #T "." #f)

constexpr u32 NO_EVENT = 0xFFFFFFFFu;
constexpr u32 TASK_ARG_SLOTS = 11;
constexpr u32 TASK_WAITS = 2;
constexpr u32 COMMAND_PARAMS = 8;
constexpr u32 BLOCK_THREADS = 512;
constexpr u32 CMD_RUN = 1;
constexpr u32 CMD_SHUTDOWN = 2;
constexpr u32 CMD_FLAG_TRACE = 0x100;
constexpr u32 CMD_FLAG_UNTIL = 0x200;
constexpr u16 TASK_FLAG_PREFETCH = 1;
constexpr u16 TASK_FLAG_STAGE = 2;
constexpr u32 COMMAND_RING_CAP = 64;
constexpr u32 COMMAND_SLOT_BYTES = 256;
constexpr u32 OUTPUT_RING_CAP = 65536;
constexpr u32 FAULT_HANG = 1;
constexpr u32 FAULT_BAD_OPCODE = 2;
constexpr u32 FAULT_OUT_OF_RANGE = 3;
constexpr u32 FAULT_BAD_ARGS = 4;
constexpr u32 FAULT_PEER_FAILED = 5;
constexpr u32 WAIT_ITERATION = 0xFFFFFF00u;
constexpr u32 WAIT_OUTPUT_SPACE = 0xFFFFFF01u;
constexpr u32 WAIT_OUTPUT_ORDER = 0xFFFFFF02u;
constexpr u32 WAIT_PEER = 0xFFFFFE00u;

struct __align__(16) TaskDesc {
    u16 opcode;
    u16 flags;
    u32 id;
    u32 signal;
    u32 param_mask;
    u32 wait[TASK_WAITS];
    u32 wait_need[TASK_WAITS];
    u64 param_sel;
    u64 args[TASK_ARG_SLOTS];
};
MK_SIZE(TaskDesc, 128);
MK_OFFSET(TaskDesc, opcode, 0);
MK_OFFSET(TaskDesc, flags, 2);
MK_OFFSET(TaskDesc, id, 4);
MK_OFFSET(TaskDesc, signal, 8);
MK_OFFSET(TaskDesc, param_mask, 12);
MK_OFFSET(TaskDesc, wait, 16);
MK_OFFSET(TaskDesc, wait_need, 24);
MK_OFFSET(TaskDesc, param_sel, 32);
MK_OFFSET(TaskDesc, args, 40);

struct __align__(16) Command {
    u32 kind;
    u32 iterations;
    u64 seq;
    u64 epoch_base;
    u64 iter_base;
    u64 tasks;
    u64 worker_offsets;
    u64 events;
    u32 num_events;
    u32 num_workers;
    u64 params[COMMAND_PARAMS];
};
MK_SIZE(Command, 128);
MK_OFFSET(Command, kind, 0);
MK_OFFSET(Command, iterations, 4);
MK_OFFSET(Command, seq, 8);
MK_OFFSET(Command, epoch_base, 16);
MK_OFFSET(Command, iter_base, 24);
MK_OFFSET(Command, tasks, 32);
MK_OFFSET(Command, worker_offsets, 40);
MK_OFFSET(Command, events, 48);
MK_OFFSET(Command, num_events, 56);
MK_OFFSET(Command, num_workers, 60);
MK_OFFSET(Command, params, 64);

struct ErrorRecord {
    u32 kind;
    u32 sm;
    u32 task;
    u32 opcode;
    u32 event;
    u32 reserved;
    u64 seen;
    u64 needed;
    u64 command;
};
MK_SIZE(ErrorRecord, 48);
MK_OFFSET(ErrorRecord, kind, 0);
MK_OFFSET(ErrorRecord, sm, 4);
MK_OFFSET(ErrorRecord, task, 8);
MK_OFFSET(ErrorRecord, opcode, 12);
MK_OFFSET(ErrorRecord, event, 16);
MK_OFFSET(ErrorRecord, seen, 24);
MK_OFFSET(ErrorRecord, needed, 32);
MK_OFFSET(ErrorRecord, command, 40);

struct StatusBlock {
    u64 reserved0;
    u64 iterations_done;
    u64 out_published;
    u64 out_consumed;
    u32 abort;
    u32 exited;
    u64 reserved[2];
    ErrorRecord error;
};
MK_SIZE(StatusBlock, 104);
MK_OFFSET(StatusBlock, reserved0, 0);
MK_OFFSET(StatusBlock, iterations_done, 8);
MK_OFFSET(StatusBlock, out_published, 16);
MK_OFFSET(StatusBlock, out_consumed, 24);
MK_OFFSET(StatusBlock, abort, 32);
MK_OFFSET(StatusBlock, exited, 36);
MK_OFFSET(StatusBlock, error, 56);

struct DeviceState {
    u64 cmd_head;
    u64 worker_iters;
    u64 out_reserved;
    u64 out_published;
    u32 abort;
    u32 exited_blocks;
    u64 reserved[2];
};
MK_SIZE(DeviceState, 56);
MK_OFFSET(DeviceState, cmd_head, 0);
MK_OFFSET(DeviceState, worker_iters, 8);
MK_OFFSET(DeviceState, out_reserved, 16);
MK_OFFSET(DeviceState, out_published, 24);
MK_OFFSET(DeviceState, abort, 32);
MK_OFFSET(DeviceState, exited_blocks, 36);

struct KernelParams {
    u64 host_commands;
    u64 dev_commands;
    u64 status;
    u64 state;
    u64 output;
    u64 wait_timeout_ns;
};
MK_SIZE(KernelParams, 48);
MK_OFFSET(KernelParams, host_commands, 0);
MK_OFFSET(KernelParams, dev_commands, 8);
MK_OFFSET(KernelParams, status, 16);
MK_OFFSET(KernelParams, state, 24);
MK_OFFSET(KernelParams, output, 32);
MK_OFFSET(KernelParams, wait_timeout_ns, 40);

// Element types (src/buffer.rs DType).
constexpr u32 DTYPE_F32 = 0;
constexpr u32 DTYPE_BF16 = 1;
constexpr u32 DTYPE_U32 = 2;
