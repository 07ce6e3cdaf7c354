// The resident kernel: one block per SM runs its list of tasks for every
// iteration of every command the host puts in the command ring.
//
// Per command: block 0 copies the host command (mapped memory) into a device
// ring that the other blocks poll. Per iteration g: each block waits until every
// block finished iteration g - 1, then for each task in its list: copy the
// descriptor to shared memory, substitute command parameters, wait on the
// task's events (counter >= need * epoch), run the body, signal its event.
#include "include/task.cuh"
#include "mk_dispatch.cuh"

// Warp 0: waits for command `seq` and copies it to `out`. Returns false (in
// every lane) to stop. In block 0, lanes 0..15 each poll one 16-byte chunk
// {word, tag} of the host slot; the command is complete once all sixteen tags
// equal `seq` (the host writes each word before its tag, and a 16-byte chunk
// lies in one cache line, so a chunk with the new tag has the new word). Block
// 0 then relays the command to device memory for the other blocks.
__device__ __noinline__ bool fetch_command(const Env* env, u64 seq, Command* out) {
    const u32 lane = threadIdx.x & 31;
    const u32 slot = u32((seq - 1) % COMMAND_RING_CAP);
    u64* dev = reinterpret_cast<u64*>(&env->dev_commands[slot]);
    if (env->sm == 0) {
        const char* host = reinterpret_cast<const char*>(env->host_commands) + u64(slot) * COMMAND_SLOT_BYTES;
        u64 word = 0, tag = 0;
        for (u32 polls = 0;; ++polls) {
            if (lane < 16) {
                asm volatile("ld.relaxed.sys.global.v2.u64 {%0, %1}, [%2];"
                             : "=l"(word), "=l"(tag)
                             : "l"(host + 16 * lane)
                             : "memory");
            }
            if (__all_sync(0xFFFFFFFFu, lane >= 16 || tag == seq)) break;
            if ((polls & 63) == 63) {
                bool stop = false;
                if (lane == 0) {
                    if (ld_relaxed_sys_u32(&env->status->abort) != 0u) atomicCAS(&env->state->abort, 0u, 2u);
                    stop = aborted(env);
                }
                if (__shfl_sync(0xFFFFFFFFu, stop, 0)) return false;
            }
            __nanosleep(32);
        }
        if (lane < 16) dev[lane] = word;
        __syncwarp();
        if (lane == 0) st_release_gpu(&env->state->cmd_head, seq);
        if (lane < 16) reinterpret_cast<u64*>(out)[lane] = word;
    } else {
        bool stop = false;
        if (lane == 0) {
            u32 sleep_ns = 32;
            while (ld_acquire_gpu(&env->state->cmd_head) < seq) {
                if (aborted(env)) {
                    stop = true;
                    break;
                }
                __nanosleep(sleep_ns);
                if (sleep_ns < 128) sleep_ns *= 2;
            }
        }
        __syncwarp();  // orders lane 0's acquire before the other lanes' reads
        if (__shfl_sync(0xFFFFFFFFu, stop, 0)) return false;
        if (lane < 16) reinterpret_cast<u64*>(out)[lane] = ld_relaxed_gpu64(dev + lane);
    }
    __syncwarp();
    return true;
}

// The block's dynamic shared memory size, read where it is used (a special
// register: cheaper than keeping it live across task bodies).
__device__ __forceinline__ u32 dyn_smem_bytes() {
    u32 n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// Block-wide state of the command being run, written by thread 0 between barriers.
struct Loop {
    u32 first;
    u32 last;
    u64 epoch;
    u64 iteration;
    ulonglong2* trace;  // per task slot {start, end} ns, or null
    bool stop;          // the command ends before this iteration
    u32 staged_bytes;   // the current task's staged bytes (0: none)
    u32 staged_off;     // where in dynamic shared memory they land
    u32 t;              // the task the block runs (index into the command's task array)
    u64* signal;        // its event's counter, or null
    u64 t_start;        // when its waits were met (trace only)
};

// Thread 0: a task whose declared range is constant (TASK_FLAG_STAGE) gets as
// much of it as fits above the shared memory it keeps for itself (high half
// of the byte-count slot) copied to the top of dynamic shared memory, before
// its waits: the copy runs while earlier stages finish.
__device__ __forceinline__ void stage_task(Stage* st, const TaskDesc* d, unsigned char* dyn, u32 dyn_bytes,
                                           Loop* loop) {
    loop->staged_bytes = 0;
    if (!STAGING || (d->flags & (TASK_FLAG_STAGE | TASK_FLAG_PREFETCH)) != (TASK_FLAG_STAGE | TASK_FLAG_PREFETCH)) {
        return;
    }
    const u64 addr = d->args[TASK_ARG_SLOTS - 1], word = d->args[TASK_ARG_SLOTS - 2];
    const u32 bytes = u32(word), keep = (u32(word >> 32) + 127u) & ~127u;
    if (keep >= dyn_bytes || (addr & 15) != 0) return;
    const u32 n = min(bytes, dyn_bytes - keep) & ~15u;
    if (n == 0) return;
    const u32 off = (dyn_bytes - n) & ~127u;
    stage_expect(&st->bar, n);
    stage_copy(&st->bar, dyn + off, addr, n);
    loop->staged_bytes = n;
    loop->staged_off = off;
}

// Thread 0: prepares the task in `d` before its waits: substitutes its
// parameters and checks its event indices. Returns false to stop the block.
// The header is read into registers once; most tasks take no parameter, so
// that loop is skipped entirely.
__device__ __forceinline__ bool prepare_task(const Env* env, TaskDesc* d, const Command* cmd) {
    const u64 seq = cmd->seq;
    const u32 id = d->id, opcode = d->opcode, mask = d->param_mask, signal = d->signal;
    const u32 num_events = cmd->num_events;
    if (mask != 0u) {
        const u64 sel_all = d->param_sel;
        for (u32 i = 0; i < TASK_ARG_SLOTS; ++i) {
            if (mask & (1u << i)) {
                const u32 sel = u32(sel_all >> (4 * i)) & 0xFu;
                if (sel >= COMMAND_PARAMS) {
                    report_fault(env, id, opcode, seq, FAULT_BAD_ARGS, NO_EVENT, sel, COMMAND_PARAMS);
                    return false;
                }
                d->args[i] = cmd->params[sel];
            }
        }
    }
    const u32 events[TASK_WAITS + 1] = {d->wait[0], d->wait[1], signal};
#pragma unroll
    for (u32 k = 0; k <= TASK_WAITS; ++k) {
        const u32 ev = events[k];
        if (ev != NO_EVENT && ev >= num_events) {
            report_fault(env, id, opcode, seq, FAULT_OUT_OF_RANGE, ev, ev, num_events);
            return false;
        }
    }
    return true;
}

// Thread 0: waits for the events of a prepared task. Returns false to stop
// the block.
__device__ __forceinline__ bool await_task(const Env* env, const TaskDesc* d, const Command* cmd, u64 epoch) {
    const u32 w0 = d->wait[0], w1 = d->wait[1];
    if (w0 == NO_EVENT && w1 == NO_EVENT) return true;
    u64* events = reinterpret_cast<u64*>(cmd->events);
    const u32 waits[TASK_WAITS] = {w0, w1};
#pragma unroll
    for (u32 k = 0; k < TASK_WAITS; ++k) {
        const u32 ev = waits[k];
        if (ev == NO_EVENT) continue;
        // A task about to idle lets the range it will stream travel to L2
        // meanwhile (only then, so a ready task does not fetch twice).
        if (!wait_at_least<false>(env, d->id, d->opcode, cmd->seq, &events[ev], u64(d->wait_need[k]) * epoch, ev,
                                  k == 0 ? d : nullptr)) {
            return false;
        }
    }
    return true;
}

// A command ending early (CMD_FLAG_UNTIL) accounts for the iterations it skips
// as if they ran: every task of this block signals its event `skipped` times
// and the block counts them as done, so the program's epochs and the global
// iteration count stay what the host expects. `done` is the last iteration run.
__device__ __noinline__ void finish_early(const Env* env, const TaskDesc* tasks, u32 first, u32 last,
                                          const Command* cmd, u32 skipped, u64 done) {
    u64* events = reinterpret_cast<u64*>(cmd->events);
    for (u32 t = first + threadIdx.x; t < last; t += blockDim.x) {
        const u32 signal = tasks[t].signal;
        if (signal != NO_EVENT && signal < cmd->num_events) red_release_gpu(events + signal, skipped);
    }
    __syncthreads();
    if (threadIdx.x == 0 && !aborted(env)) {
        const u64 end = done + skipped;
        const u64 old = atom_add_acq_rel_gpu(&env->state->worker_iters, skipped);
        if (old + skipped == u64(env->num_sms) * end) st_relaxed_sys(&env->status->iterations_done, end);
    }
}

// The task loop. TRACE: record each task's start and end time when the command
// asks for it (CMD_FLAG_TRACE); the kernel without it carries no trace code.
template <bool TRACE>
__device__ __forceinline__ void resident(const KernelParams& kp) {
    __shared__ Env s_env;
    __shared__ TaskDesc s_descs[4];  // ring: current task and the next two
    __shared__ Command s_cmd;
    __shared__ Loop s_loop;
    __shared__ Stage s_stage;
    // The running task's context: written by thread 0 before the barrier
    // that starts the task and read by every thread. (Built by each thread,
    // it went to local memory before every task, 68 bytes a thread, since the
    // out-of-line bodies take it by reference.)
    __shared__ Ctx s_ctx;
    extern __shared__ __align__(16) unsigned char s_dyn[];

    const u32 tid = threadIdx.x;
    if (tid == 0) {
        s_env.host_commands = reinterpret_cast<const Command*>(kp.host_commands);
        s_env.dev_commands = reinterpret_cast<Command*>(kp.dev_commands);
        s_env.output = reinterpret_cast<u64*>(kp.output);
        s_env.state = reinterpret_cast<DeviceState*>(kp.state);
        s_env.status = reinterpret_cast<StatusBlock*>(kp.status);
        s_env.timeout_ns = kp.wait_timeout_ns;
        s_env.sm = blockIdx.x;
        s_env.num_sms = gridDim.x;
        s_stage.stagings = 0;
        stage_init(&s_stage.bar);
        s_loop.staged_bytes = 0;
    }
    const Env* env = &s_env;

    // Thread 0 decides; __syncthreads_and hands the decision to the block, so
    // no shared flag is rewritten while another thread may still read it.
    for (u64 seq = 1;; ++seq) {
        __syncthreads();  // every thread is done with the previous command
        bool ok = true;
        if (tid < 32) ok = fetch_command(env, seq, &s_cmd);
        if (tid == 0) {
            ok = ok && (s_cmd.kind & 0xFFu) == CMD_RUN;
            if (ok) {
                if (s_cmd.num_workers != env->num_sms) {
                    report_fault(env, NO_EVENT, 0, seq, FAULT_BAD_ARGS, NO_EVENT, s_cmd.num_workers, env->num_sms);
                    ok = false;
                } else {
                    const u32* offsets = reinterpret_cast<const u32*>(s_cmd.worker_offsets);
                    s_loop.first = offsets[env->sm];
                    s_loop.last = offsets[env->sm + 1];
                    // The trace area follows the task array.
                    s_loop.trace = (TRACE && (s_cmd.kind & CMD_FLAG_TRACE))
                                       ? reinterpret_cast<ulonglong2*>(reinterpret_cast<TaskDesc*>(s_cmd.tasks) +
                                                                       offsets[env->num_sms])
                                       : nullptr;
                }
            }
        }
        if (!__syncthreads_and(ok)) break;
        const TaskDesc* tasks = reinterpret_cast<const TaskDesc*>(s_cmd.tasks);
        bool go = true;
        for (u32 j = 0; go && j < s_cmd.iterations; ++j) {
            bool ready = true;
            if (tid == 0) {
                s_loop.iteration = s_cmd.iter_base + j + 1;
                s_loop.epoch = s_cmd.epoch_base + j + 1;
                s_env.epoch = s_loop.epoch;
                ready = wait_at_least<false>(env, NO_EVENT, 0, seq, &env->state->worker_iters,
                                             u64(env->num_sms) * (s_loop.iteration - 1), WAIT_ITERATION);
                // CMD_FLAG_UNTIL: params[last] points at a stop word that a task
                // sets to its epoch to end the command after that iteration. Every
                // block finished iteration j - 1 (the wait above), so every block
                // reads the same verdict; a word stamped with this iteration's
                // epoch (a fast block's task ran already) does not stop it.
                s_loop.stop = false;
                if (ready && j > 0 && (s_cmd.kind & CMD_FLAG_UNTIL)) {
                    const u64 w = ld_relaxed_gpu64(reinterpret_cast<const u64*>(s_cmd.params[COMMAND_PARAMS - 1]));
                    s_loop.stop = w > s_cmd.epoch_base && w < s_loop.epoch;
                }
            }
            go = __syncthreads_and(ready);
            if (go && s_loop.stop) {
                finish_early(env, tasks, s_loop.first, s_loop.last, &s_cmd, s_cmd.iterations - j,
                             s_loop.iteration - 1);
                break;
            }
            // Descriptors live in a ring of four shared buffers. The first two are
            // copied here; then, while task t runs, threads 32..39 copy task t + 2
            // (cp.async, one group per task), so even short tasks never wait for
            // their descriptor.
            //
            // The loop's state (the task index, its signal, its start time) lives
            // in s_loop and is read back after each barrier, so that nothing of it
            // is live across a task body: the bodies need every register, and a
            // loop variable spilled to local memory costs an L1 miss per task
            // once a body has streamed through L1.
            if (tid < 16 && s_loop.first + tid / 8 < s_loop.last) {
                const u32 t = s_loop.first + tid / 8;
                reinterpret_cast<uint4*>(&s_descs[t & 3])[tid & 7] = reinterpret_cast<const uint4*>(&tasks[t])[tid & 7];
            }
            if (tid == 0) s_loop.t = s_loop.first;
            __syncthreads();
            for (;;) {
                const u32 t = s_loop.t;  // written by thread 0 between two barriers
                if (t >= s_loop.last) break;
                TaskDesc* d = &s_descs[t & 3];
                // The copying threads are in warp 1, so that thread 0's release
                // fence when it signals never waits for these loads.
                if (tid - 32 < 8) {
                    if (t + 2 < s_loop.last) {
                        const TaskDesc* src = reinterpret_cast<const TaskDesc*>(s_cmd.tasks) + t + 2;
                        const unsigned dst = unsigned(__cvta_generic_to_shared(&s_descs[(t + 2) & 3])) + 16 * (tid - 32);
                        asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst),
                                     "l"(reinterpret_cast<const uint4*>(src) + (tid - 32))
                                     : "memory");
                    }
                    asm volatile("cp.async.commit_group;" ::: "memory");
                }
                // Nothing the loop keeps in registers may live across the task
                // body (the bodies need every register, and a value spilled there
                // comes back from L2 once a wait's acquire has invalidated L1):
                // `d` is recomputed from `t`, a fault after the body reads the
                // descriptor through s_ctx, and thread 0's verdict is local to
                // this task.
                //
                // Thread 0 does all it can before the waits, so that once they
                // are met only the barrier stands between them and the body: the
                // staging copy, the parameters and checks, the context, and the
                // address its signal goes to (read now: the descriptor's buffer
                // is refilled two tasks later).
                bool prepared = true;
                if (tid == 0) {
                    stage_task(&s_stage, d, s_dyn, dyn_smem_bytes(), &s_loop);
                    prepared = prepare_task(env, d, &s_cmd);
                    const u32 signal = d->signal, staged = s_loop.staged_bytes;
                    s_loop.signal = signal == NO_EVENT ? nullptr : reinterpret_cast<u64*>(s_cmd.events) + signal;
                    s_ctx = {env, d, s_cmd.seq, s_dyn, staged ? s_loop.staged_off : dyn_smem_bytes(),
                             staged ? s_dyn + s_loop.staged_off : nullptr, staged};
                    prepared = prepared && await_task(env, d, &s_cmd, s_loop.epoch);
                    if (TRACE && s_loop.trace) s_loop.t_start = globaltimer();
                }
                go = __syncthreads_and(prepared);
                // Every thread read t before the barrier above.
                if (tid == 0) s_loop.t = t + 1;
                const u32 staged = s_loop.staged_bytes;
                // Waited on even when the block stops: no copy may outlive it.
                if (staged) stage_wait(&s_stage.bar, s_stage.stagings & 1u);
                if (!go) break;
                if (!dispatch_task(d->opcode, s_ctx) && tid == 0) {
                    const TaskDesc* bad = s_ctx.desc;  // `d` is not kept across the body
                    report_fault(env, bad->id, bad->opcode, s_cmd.seq, FAULT_BAD_OPCODE, NO_EVENT, bad->opcode, 0);
                }
                // Task t + 1's descriptor (the group before the newest) has landed.
                if (tid - 32 < 8) asm volatile("cp.async.wait_group 1;" ::: "memory");
                __syncthreads();  // the task's writes are done
                if (tid == 0) {
                    if (s_loop.staged_bytes) ++s_stage.stagings;
                    u64* const signal = s_loop.signal;
                    if (TRACE && s_loop.trace) {
                        s_loop.trace[s_loop.t - 1] = make_ulonglong2(s_loop.t_start, globaltimer());
                    }
                    if (signal) {
                        red_release_gpu(signal, 1);
                    }
                }
            }
            if (tid - 32 < 8) asm volatile("cp.async.wait_all;" ::: "memory");
            if (go && tid == 0 && !aborted(env)) {
                const u64 g = s_loop.iteration;
                const u64 old = atom_add_acq_rel_gpu(&env->state->worker_iters, 1);
                // The acq_rel atomic ordered every block's writes (gpu scope) before
                // this store; the host reads device memory through copies, which
                // see them, so a relaxed store (no system-wide fence) suffices.
                if (old + 1 == u64(env->num_sms) * g) st_relaxed_sys(&env->status->iterations_done, g);
            }
        }
        if (!go) break;
    }
    if (tid == 0) {
        const u32 n = atomicAdd(&env->state->exited_blocks, 1u);
        if (n + 1 == env->num_sms) st_release_sys_u32(&env->status->exited, 1u);
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1) mk_resident(const KernelParams kp) { resident<false>(kp); }

// The same loop able to record task times (RuntimeOptions::trace).
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1) mk_resident_trace(const KernelParams kp) {
    resident<true>(kp);
}

// Reference kernels for benchmarks, launched only while no resident kernel runs.

// An empty kernel: the cost of a plain launch.
extern "C" __global__ void mk_probe_empty() {}

// A 16-byte-per-thread grid-stride copy: the device's copy bandwidth.
extern "C" __global__ void mk_probe_copy(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
        dst[i] = src[i];
    }
}
