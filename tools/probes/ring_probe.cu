// Ring probe: the FP4 tensor-core product of a task (fp4_mma_rows: each
// warp loads its next column step into registers) against jobs fed by bulk
// copies (cp.async.bulk, one mbarrier a slot) into a ring of shared-memory
// slots, on the same MXFP4 bytes.
//
// The ring reads the codes and scales stored tile-major for this purpose:
// per group of 256 rows, per 128-column step, per 16-row tile, the 1 KiB of
// codes in the order the lanes of the mma fragment read them (lane l: row
// l/4, chunk l%4 at byte 16 l; row l/4 + 8 at 512 + 16 l), then the tile's
// 64 scale bytes in lane order. A slot is one column step of the tiles of a
// set of rows computed at once. Modes:
//
//   (none)  the task's jobs (tile, column slice) and sets (fp4_mma_shape),
//           the same step function, the slices summed in order after a
//           block barrier as the task does: outputs equal to the task's,
//           bit for bit (checked; the exit status says). The slots follow
//           the order the slices consume them; the last warp done with a
//           slot refills it `slots` ahead.
//   pair    the same, a tile's slices meeting on a named barrier of their
//           own warps (partials double-buffered by set) instead of the two
//           block barriers a set.
//   lazyf   the same jobs, every slot refilled by thread 0 alone (when its
//           own next step needs it, or once a set's slots are free).
//   sliced  the same jobs, a ring of `slots` slots for each column slice,
//           refilled by its tile-0 warp at its next step once the slice's
//           warps are done with it.
//   whole   one warp a 16-row tile over all its column steps (sets of 256
//           rows, no slices, stores straight from the accumulators): a row's
//           steps summed in one chain, so the outputs differ from the
//           task's in the last bits; refilled as in the first mode.
//   lazy    whole-row jobs, each slot refilled by thread 0 at its next step
//           once all 16 warps released it (an mbarrier of 16 arrivals), the
//           step function without the warp's vote on large scales; three
//           slots; rows a multiple of 256.
//
// Every block computes `rows` rows (a task's share, at a rotating place in a
// region that L2 cannot hold) for n bf16 input rows in shared memory. Prints
// how many outputs differ between the two paths, then each path's mean time
// a launch and read bandwidth next to the device's copy bandwidth.
// BENCHMARKS.md (fortieth round) has the figures.
//
// Usage: ring_probe cols rows n [slots 2|4|6|8] [pair|whole|lazy|lazyf|sliced]
#include <vector>

#include "probe.cuh"
#include "tasks/gemv_expert_fp4.cuh"

constexpr u32 GROUP_ROWS = 256;
constexpr u32 TILE = 1024 + 64;  // a tile's codes, then its scales
// Tiles of a slot: fp4_mma_shape's sets have at most 8 (128 rows); `whole`
// sets 16 (256 rows, one warp a tile over every step).
__host__ __device__ constexpr u32 slot_bytes(bool whole) { return (whole ? 16 : 8) * TILE; }

__device__ __forceinline__ void bar_init(u64* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}

struct Shape {
    u32 cols, steps, rows, n, total_rows;
};

// This block's first row in launch `rot` (a multiple of 16).
__device__ __forceinline__ u32 block_row0(const Shape& sh, u32 rot) {
    const u32 places = sh.total_rows / sh.rows;
    return ((blockIdx.x + rot) % places) * sh.rows;
}

// The n input rows into shared memory, as they are (both paths read them
// with the same fragment loads).
__device__ __forceinline__ void copy_x(const u16* xg, unsigned char* xs, u32 n, u32 cols) {
    for (u32 i = threadIdx.x; i < n * cols / 8; i += blockDim.x) {
        reinterpret_cast<uint4*>(xs)[i] = reinterpret_cast<const uint4*>(xg)[i];
    }
}

// Slot q of the ring: set q / steps, and within it the steps in the order
// (i, slice): slice sl's i-th step is sl * per + i.
struct SlotPlan {
    u32 row0, rows, steps, slices, per, group;
    __device__ __forceinline__ void at(u32 q, u32& set_row0, u32& tiles, u32& step) const {
        const u32 set = q / steps, r = q % steps;
        set_row0 = row0 + set * group;
        tiles = (min(group, rows - set * group) + 15) / 16;
        step = (r % slices) * per + r / slices;
    }
};

// Any thread: copies slot q (its tiles' codes and scales at its step, across
// at most two 256-row layout groups) into `dst`, completing on `bar`.
__device__ __forceinline__ void issue_slot(const SlotPlan& pl, u32 q, const unsigned char* tcodes, unsigned char* dst,
                                           u64* bar) {
    u32 r0, tiles, step;
    pl.at(q, r0, tiles, step);
    stage_expect(bar, tiles * TILE);
    u32 tg = r0 / 16, done = 0;
    while (done < tiles) {
        const u32 grp = tg / 16, t = tg % 16, k = min(tiles - done, 16 - t);
        const u64 at = u64(grp) * pl.steps + step;
        stage_copy(bar, dst + done * TILE, reinterpret_cast<u64>(tcodes + (at * 16 + t) * TILE), k * TILE);
        done += k, tg += k;
    }
}

// A warp's tile partials of slice `sl` (the task's job layout).
__device__ __forceinline__ void store_partials(float* part, u32 sl, u32 group, u32 tile, const Fp4Acc<1>& acc) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    float* p = part + sl * group * 16;
    float* p0 = p + (tile * 16 + g) * 16 + 2 * c;
    float* p1 = p + (tile * 16 + g + 8) * 16 + 2 * c;
    p0[0] = acc.v[0][0], p0[1] = acc.v[0][1], p1[0] = acc.v[0][2], p1[1] = acc.v[0][3];
}

// Every thread: the slices of `grows` rows summed in order and stored, as the
// task does, between two block barriers.
__device__ __forceinline__ void sum_slices(const float* part, u32 slices, u32 group, u32 grows, const Shape& sh,
                                           u32 r0, float* y) {
    __syncthreads();
    for (u32 k = threadIdx.x; k < grows * sh.n; k += blockDim.x) {
        const u32 r = k / sh.n, i = k % sh.n;
        float sum = 0.0f;
        for (u32 s = 0; s < slices; ++s) sum += part[(s * group + r) * 16 + i];
        y[u64(i) * sh.total_rows + r0 + r] = sum;
    }
    __syncthreads();
}

// A whole-row warp's tile (first row `row`) stored from its accumulators.
__device__ __forceinline__ void store_tile(float* y, const Shape& sh, u64 row, const Fp4Acc<1>& acc) {
    const u32 lane = threadIdx.x & 31, c = lane & 3;
    row += lane >> 2;
    if (2 * c < sh.n) {
        y[u64(2 * c) * sh.total_rows + row] = acc.v[0][0];
        y[u64(2 * c) * sh.total_rows + row + 8] = acc.v[0][2];
    }
    if (2 * c + 1 < sh.n) {
        y[u64(2 * c + 1) * sh.total_rows + row] = acc.v[0][1];
        y[u64(2 * c + 1) * sh.total_rows + row + 8] = acc.v[0][3];
    }
}

// The lane's part of a warp's tile in a slot (`t`): the codes of rows g and
// g + 8 and their two scale codes.
__device__ __forceinline__ void slot_tile(const unsigned char* t, uint4& q0, uint4& q1, u32& s0, u32& s1) {
    const u32 lane = threadIdx.x & 31;
    q0 = ld_shared16(t + lane * 16), q1 = ld_shared16(t + 512 + lane * 16);
    u32 sc;
    asm volatile("ld.shared.u16 %0, [%1];" : "=r"(sc) : "r"(smem_addr(t + 1024 + lane * 2)));
    s0 = sc & 0xFFu, s1 = sc >> 8;
}

// One column step of a warp's job from a tile in a slot (`t`), the task's
// step function; x advanced to the next step.
__device__ __forceinline__ void slot_step(Fp4Acc<1>& acc, const unsigned char* t, const unsigned char* (&xp)[1]) {
    uint4 q0, q1;
    u32 s0, s1;
    slot_tile(t, q0, q1, s0, s1);
    fp4_mma_step_any<1, true, false, true>(acc, q0, q1, s0, s1, xp);
    xp[0] += 128 * 2;
    __syncwarp();
}

// Modes (none), `pair`, `whole` and `lazyf`.
template <int NS, bool PAIR, bool WHOLE, bool LAZY>
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    ring_kernel(const unsigned char* tcodes, const u16* xg, float* y, Shape sh, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ u64 full[NS];
    __shared__ u32 done_count[NS];
    constexpr u32 SLOT = slot_bytes(WHOLE);
    u32 slices, per, group, shift;
    fp4_mma_shape(sh.cols, slices, per, group, shift);
    if (WHOLE) slices = 1, per = sh.steps, group = 256, shift = 0;
    unsigned char* xs = smem;
    float* part = reinterpret_cast<float*>(smem + ((sh.n * sh.cols * 2 + 127) & ~127u));
    const u32 part_bytes = fp4_mma_partial_bytes(sh.cols);
    unsigned char* ring = reinterpret_cast<unsigned char*>(part) + (PAIR ? 2 : 1) * part_bytes;
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const SlotPlan pl = {block_row0(sh, rot), sh.rows, sh.steps, slices, per, group};
    const u32 sets = (sh.rows + group - 1) / group, Q = sets * sh.steps;
    if (tid == 0) {
        for (int i = 0; i < NS; ++i) bar_init(&full[i], 1), done_count[i] = 0;
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 q = 0; q < min(Q, u32(NS)); ++q) issue_slot(pl, q, tcodes, ring + q * SLOT, &full[q]);
    }
    copy_x(xg, xs, sh.n, sh.cols);
    __syncthreads();
    // LAZY: thread 0 alone refills, in order, every slot all of whose
    // consumers are done: the ones its own next step needs (waiting), then
    // as many more as are free.
    u32 next = NS;
    auto consumers = [&](u32 q) { return (min(group, sh.rows - (q / sh.steps) * group) + 15) / 16; };
    auto refill = [&](u32 upto, bool wait) {
        while (next < Q) {
            const u32 slot = next % NS;
            volatile u32* dc = &done_count[slot];
            if (*dc != consumers(next - NS)) {
                if (!wait || next > upto) break;
                while (*dc != consumers(next - NS)) {
                }
            }
            *dc = 0;
            issue_slot(pl, next, tcodes, ring + slot * SLOT, &full[slot]);
            ++next;
        }
    };
    for (u32 set = 0; set < sets; ++set) {
        const u32 r0 = pl.row0 + set * group, grows = min(group, sh.rows - set * group), tiles = (grows + 15) / 16;
        float* const setp = PAIR ? part + (set & 1) * (part_bytes / 4) : part;
        const u32 tile = warp >> shift, sl = warp & (slices - 1);
        if (warp < tiles << shift) {
            const unsigned char* xp[1] = {xs + u64(g < sh.n ? g : 0) * sh.cols * 2 + (sl * per * 128 + c * 32) * 2};
            Fp4Acc<1> acc;
            acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
            const u32 len = min(per, sh.steps - sl * per);
            for (u32 i = 0; i < len; ++i) {
                const u32 q = set * sh.steps + i * slices + sl, slot = q % NS;
                if (LAZY && tid == 0) refill(q, true);
                stage_wait(&full[slot], (q / NS) & 1);
                slot_step(acc, ring + slot * SLOT + tile * TILE, xp);
                if (LAZY) {
                    if (lane == 0) atomicAdd(&done_count[slot], 1u);
                } else if (lane == 0 && atomicAdd(&done_count[slot], 1u) + 1 == tiles) {
                    done_count[slot] = 0;
                    if (q + NS < Q) issue_slot(pl, q + NS, tcodes, ring + slot * SLOT, &full[slot]);
                }
            }
            // The next set's first slots go out as soon as this set's are free.
            if (LAZY && tid == 0) refill((set + 1) * sh.steps + NS - 1, true);
            if (WHOLE) {
                // One warp a tile over every step: no slices to meet, the
                // accumulators stored as they are, no barrier.
                store_tile(y, sh, r0 + tile * 16, acc);
                continue;
            }
            store_partials(setp, sl, group, tile, acc);
            if (PAIR) {
                // The tile's slices meet (a named barrier of their warps); its
                // first slice's warp sums them in order and stores.
                asm volatile("bar.sync %0, %1;" ::"r"(1 + tile), "r"(32 * slices) : "memory");
                if (sl == 0) {
                    for (u32 k = lane; k < 16 * sh.n; k += 32) {
                        const u32 r = tile * 16 + k / sh.n, i = k % sh.n;
                        if (r >= grows) continue;
                        float sum = 0.0f;
                        for (u32 s2 = 0; s2 < slices; ++s2) sum += setp[(s2 * group + r) * 16 + i];
                        y[u64(i) * sh.total_rows + r0 + r] = sum;
                    }
                }
            }
        }
        if (!PAIR && !WHOLE) sum_slices(part, slices, group, grows, sh, r0, y);
    }
}

// Mode `sliced` (NS2 slots a slice).
template <int NS2>
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    sliced_kernel(const unsigned char* tcodes, const u16* xg, float* y, Shape sh, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ u64 full[2][NS2];
    __shared__ u32 done_count[2][NS2];
    constexpr u32 SLOT = slot_bytes(false);
    u32 slices, per, group, shift;
    fp4_mma_shape(sh.cols, slices, per, group, shift);
    unsigned char* xs = smem;
    float* part = reinterpret_cast<float*>(smem + ((sh.n * sh.cols * 2 + 127) & ~127u));
    unsigned char* ring = reinterpret_cast<unsigned char*>(part) + fp4_mma_partial_bytes(sh.cols);
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const u32 row0 = block_row0(sh, rot), sets = (sh.rows + group - 1) / group, QS = sets * per;
    auto tiles_of = [&](u32 set) { return (min(group, sh.rows - set * group) + 15) / 16; };
    // Slice sl's q-th slot: set q / per, column step sl * per + q % per.
    auto issue = [&](u32 sl, u32 q) {
        const u32 set = q / per, step = sl * per + q % per, tiles = tiles_of(set), slot = q % NS2;
        unsigned char* dst = ring + (sl * NS2 + slot) * SLOT;
        stage_expect(&full[sl][slot], tiles * TILE);
        u32 tg = (row0 + set * group) / 16, done = 0;
        while (done < tiles) {
            const u32 grp = tg / 16, t = tg % 16, k = min(tiles - done, 16 - t);
            const u64 at = u64(grp) * sh.steps + step;
            stage_copy(&full[sl][slot], dst + done * TILE, reinterpret_cast<u64>(tcodes + (at * 16 + t) * TILE),
                       k * TILE);
            done += k, tg += k;
        }
    };
    if (tid == 0) {
        for (u32 sl = 0; sl < slices; ++sl)
            for (int i = 0; i < NS2; ++i) bar_init(&full[sl][i], 1), done_count[sl][i] = 0;
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 sl = 0; sl < slices; ++sl)
            for (u32 q = 0; q < min(QS, u32(NS2)); ++q) issue(sl, q);
    }
    copy_x(xg, xs, sh.n, sh.cols);
    __syncthreads();
    for (u32 set = 0; set < sets; ++set) {
        const u32 r0 = row0 + set * group, grows = min(group, sh.rows - set * group), tiles = (grows + 15) / 16;
        if (warp < tiles << shift) {
            const u32 tile = warp >> shift, sl = warp & (slices - 1);
            const unsigned char* xp[1] = {xs + u64(g < sh.n ? g : 0) * sh.cols * 2 + (sl * per * 128 + c * 32) * 2};
            Fp4Acc<1> acc;
            acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
            for (u32 i = 0; i < per; ++i) {
                const u32 q = set * per + i, slot = q % NS2;
                if (tile == 0 && lane == 0 && q > 0 && q - 1 + NS2 < QS) {
                    const u32 ps = (q - 1) % NS2, need = tiles_of((q - 1) / per);
                    volatile u32* dc = &done_count[sl][ps];
                    while (*dc != need) {
                    }
                    *dc = 0;
                    issue(sl, q - 1 + NS2);
                }
                stage_wait(&full[sl][slot], (q / NS2) & 1);
                slot_step(acc, ring + (sl * NS2 + slot) * SLOT + tile * TILE, xp);
                if (lane == 0) atomicAdd(&done_count[sl][slot], 1u);
            }
            store_partials(part, sl, group, tile, acc);
        }
        sum_slices(part, slices, group, grows, sh, r0, y);
    }
}

// Mode `lazy`.
template <int NS>
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
    lazy_kernel(const unsigned char* tcodes, const u16* xg, float* y, Shape sh, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ u64 full[NS], empty[NS];
    constexpr u32 SLOT = slot_bytes(true);
    unsigned char* xs = smem;
    unsigned char* ring = smem + ((sh.n * sh.cols * 2 + 127) & ~127u);
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const u32 g0 = block_row0(sh, rot) / GROUP_ROWS, K = sh.rows / GROUP_ROWS * sh.steps;
    auto src = [&](u32 k) { return tcodes + (u64(g0 + k / sh.steps) * sh.steps + k % sh.steps) * SLOT; };
    if (tid == 0) {
        for (int i = 0; i < NS; ++i) bar_init(&full[i], 1), bar_init(&empty[i], 16);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 k = 0; k < min(K, u32(NS)); ++k) {
            stage_expect(&full[k], SLOT);
            stage_copy(&full[k], ring + k * SLOT, reinterpret_cast<u64>(src(k)), SLOT);
        }
    }
    copy_x(xg, xs, sh.n, sh.cols);
    __syncthreads();
    const unsigned char* xrow = xs + u64(g < sh.n ? g : 0) * sh.cols * 2 + c * 32 * 2;
    Fp4Acc<1> acc;
    acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
    for (u32 k = 0; k < K; ++k) {
        const u32 slot = k % NS, use = k / NS;
        if (tid == 0 && k > 0 && k - 1 + NS < K) {
            const u32 ps = (k - 1) % NS, pu = (k - 1) / NS;
            stage_wait(&empty[ps], pu & 1);
            stage_expect(&full[ps], SLOT);
            stage_copy(&full[ps], ring + ps * SLOT, reinterpret_cast<u64>(src(k - 1 + NS)), SLOT);
        }
        stage_wait(&full[slot], use & 1);
        const unsigned char* t = ring + slot * SLOT + warp * TILE;
        uint4 q0, q1;
        u32 s0, s1;
        slot_tile(t, q0, q1, s0, s1);
        const unsigned char* xp[1] = {xrow + (k % sh.steps) * 128 * 2};
        fp4_mma_step<1, true, false, false, true>(acc.v, q0, q1, s0, s1, xp);
        __syncwarp();
        if (lane == 0) {
            asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(&empty[slot])) : "memory");
        }
        if (k % sh.steps == sh.steps - 1) {
            store_tile(y, sh, u64(g0 + k / sh.steps) * GROUP_ROWS + warp * 16, acc);
            acc.v[0][0] = acc.v[0][1] = acc.v[0][2] = acc.v[0][3] = 0.0f;
        }
    }
}

// The task's own loop over the same rows, row-major.
__global__ void __launch_bounds__(BLOCK_THREADS, 1) task_kernel(GemvExpertFp4Args a, const u16* xg, Shape sh, u32 rot) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* xs = smem;
    const u32 keep = (sh.n * sh.cols * 2 + 127) & ~127u;
    float* part = reinterpret_cast<float*>(smem + keep);
    copy_x(xg, xs, sh.n, sh.cols);
    __syncthreads();
    u32 rmap[16];
    for (u32 i = 0; i < 16; ++i) rmap[i] = i;
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    u32 slices, per, group;
    fp4_mma_shape(sh.cols, slices, per, group);
    const u32 batch = sh.rows > group ? (dyn - keep) / fp4_mma_partial_bytes(sh.cols) : 1u;
    const unsigned char* codes = reinterpret_cast<const unsigned char*>(a.w);
    const unsigned char* scales = reinterpret_cast<const unsigned char*>(a.scales);
    fp4_mma_rows<true, false>(a, codes, scales, 1.0f, reinterpret_cast<u64>(xs), sh.cols, a.y, rmap, sh.n,
                              block_row0(sh, rot), sh.rows, part, batch);
}

// Row-major codes and scales to the ring's tile-major order.
__global__ void retile(const unsigned char* codes, const unsigned char* scales, unsigned char* tcodes, Shape sh) {
    const u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x;  // (group, step, tile, lane)
    if (i >= u64(sh.total_rows / GROUP_ROWS) * sh.steps * 16 * 32) return;
    const u32 lane = i % 32, tile = (i / 32) % 16, step = (i / 512) % sh.steps;
    const u64 grp = i / (512 * sh.steps);
    const u64 row = grp * GROUP_ROWS + tile * 16 + lane / 4;
    const u32 chunk = step * 4 + lane % 4;
    const u64 at = (grp * sh.steps + step) * 16 + tile;
    unsigned char* t = tcodes + at * TILE;
    *reinterpret_cast<uint4*>(t + lane * 16) =
        *reinterpret_cast<const uint4*>(codes + row * (sh.cols / 2) + chunk * 16);
    *reinterpret_cast<uint4*>(t + 512 + lane * 16) =
        *reinterpret_cast<const uint4*>(codes + (row + 8) * (sh.cols / 2) + chunk * 16);
    t[1024 + lane * 2] = scales[row * (sh.cols / 32) + chunk];
    t[1024 + lane * 2 + 1] = scales[(row + 8) * (sh.cols / 32) + chunk];
}

__global__ void fill_bytes(unsigned char* p, u64 n, u32 seed, u32 lo, u32 span) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
        u32 h = u32(i) * 2654435761u ^ u32(i >> 32) * 40503u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        p[i] = (unsigned char)(span ? lo + h % span : h);
    }
}

__global__ void copy_probe(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) dst[i] = src[i];
}

template <int NS, bool PAIR, bool WHOLE, bool LAZY>
static void launch_ring(int sms, u32 smem, const unsigned char* tc, const u16* x, float* y, const Shape& sh,
                        u32 rot) {
    static bool set = false;
    if (!set) {
        CHECK(cudaFuncSetAttribute(ring_kernel<NS, PAIR, WHOLE, LAZY>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   smem));
    }
    set = true;
    ring_kernel<NS, PAIR, WHOLE, LAZY><<<sms, BLOCK_THREADS, smem>>>(tc, x, y, sh, rot);
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: ring_probe cols rows n [slots 2|4|6|8] [pair|whole|lazy|lazyf|sliced]\n");
        return 2;
    }
    Shape sh;
    sh.cols = u32(atoi(argv[1])), sh.rows = u32(atoi(argv[2])), sh.n = u32(atoi(argv[3]));
    const u32 ns = argc > 4 ? u32(atoi(argv[4])) : 4;
    sh.steps = sh.cols / 128;
    if (sh.cols % 128 || sh.cols > 4096 || sh.steps > 16 || sh.rows % 16 || sh.rows == 0 || sh.n == 0 || sh.n > 8 ||
        (ns != 2 && ns != 4 && ns != 6 && ns != 8)) {
        fprintf(stderr, "cols a multiple of 128 up to 2048, rows a multiple of 16, n 1..8, slots 2|4|6|8\n");
        return 2;
    }
    sh.total_rows = u32((1ull << 30) / (sh.cols / 2)) / GROUP_ROWS * GROUP_ROWS;  // 1 GiB of codes
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    unsigned char *codes, *scales, *tcodes;
    u16* x;
    float *ya, *yb;
    const u64 code_bytes = u64(sh.total_rows) * sh.cols / 2, scale_bytes = u64(sh.total_rows) * sh.cols / 32;
    CHECK(cudaMalloc(&codes, code_bytes));
    CHECK(cudaMalloc(&scales, scale_bytes));
    CHECK(cudaMalloc(&tcodes, code_bytes + scale_bytes));
    CHECK(cudaMalloc(&x, 8 * sh.cols * 2));
    CHECK(cudaMalloc(&ya, u64(8) * sh.total_rows * 4));
    CHECK(cudaMalloc(&yb, u64(8) * sh.total_rows * 4));
    fill_bytes<<<1024, 256>>>(codes, code_bytes, 1, 0, 0);
    fill_bytes<<<1024, 256>>>(scales, scale_bytes, 2, 112, 16);  // 2^-15 .. 2^0
    std::vector<u16> hx(8 * sh.cols);
    u64 s = 7;
    for (auto& v : hx) v = u16(0x3C00u + lcg(s) % 0x0400u) | u16((lcg(s) & 1) << 15);  // +-[2^-7, 2^-6)
    CHECK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    retile<<<u32((u64(sh.total_rows / GROUP_ROWS) * sh.steps * 512 + 255) / 256), 256>>>(codes, scales, tcodes, sh);
    CHECK(cudaMemset(ya, 0, u64(8) * sh.total_rows * 4));
    CHECK(cudaMemset(yb, 0, u64(8) * sh.total_rows * 4));
    CHECK(cudaDeviceSynchronize());

    const bool pair = argc > 5 && strcmp(argv[5], "pair") == 0, lazy = argc > 5 && strcmp(argv[5], "lazy") == 0;
    const bool whole = lazy || (argc > 5 && strcmp(argv[5], "whole") == 0);
    const bool lazyf = argc > 5 && strcmp(argv[5], "lazyf") == 0, sliced = argc > 5 && strcmp(argv[5], "sliced") == 0;
    if (sliced && (sh.steps % 2 || sh.steps > 16 || (ns != 2 && ns != 4))) {
        fprintf(stderr, "sliced: two slices of equal steps (cols 256..2048), 2 or 4 slots a slice\n");
        return 2;
    }
    if (lazy && sh.rows % GROUP_ROWS) {
        fprintf(stderr, "lazy: rows a multiple of 256\n");
        return 2;
    }
    const u32 smem_ring = ((sh.n * sh.cols * 2 + 127) & ~127u) +
                          (lazy     ? 3 * slot_bytes(true)
                           : sliced ? 16384 + 2 * ns * slot_bytes(false)
                                    : (pair ? 2 : 1) * 16384 + ns * slot_bytes(whole));
    const u32 smem_task = PROBE_SMEM;
    if (smem_ring > PROBE_SMEM) {
        fprintf(stderr, "%u slots need %u bytes of shared memory, more than %u\n", ns, smem_ring, PROBE_SMEM);
        return 2;
    }
    CHECK(cudaFuncSetAttribute(task_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_task));
    GemvExpertFp4Args a = {};
    a.w = reinterpret_cast<u64>(codes), a.scales = reinterpret_cast<u64>(scales), a.y = reinterpret_cast<u64>(ya);
    a.cols = sh.cols, a.m = sh.n, a.ldy = sh.total_rows, a.x_dtype = DTYPE_BF16, a.y_dtype = DTYPE_F32;
    a.format = FP4_MXFP4, a.rows = sh.rows, a.slots = 1;

    const u32 places = sh.total_rows / sh.rows;
    auto ring = [&](int i) {
        const u32 rot = u32(i) * sms % places;
#define MK_RING(N)                                                                   \
    if (ns == N) {                                                                   \
        if (pair) launch_ring<N, true, false, false>(sms, smem_ring, tcodes, x, yb, sh, rot);  \
        else if (whole) launch_ring<N, false, true, false>(sms, smem_ring, tcodes, x, yb, sh, rot); \
        else if (lazyf) launch_ring<N, false, false, true>(sms, smem_ring, tcodes, x, yb, sh, rot); \
        else launch_ring<N, false, false, false>(sms, smem_ring, tcodes, x, yb, sh, rot); \
    }
        if (sliced) {
            static bool set2 = false;
            if (!set2) {
                CHECK(cudaFuncSetAttribute(sliced_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
                CHECK(cudaFuncSetAttribute(sliced_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
                set2 = true;
            }
            if (ns == 2) sliced_kernel<2><<<sms, BLOCK_THREADS, smem_ring>>>(tcodes, x, yb, sh, rot);
            else sliced_kernel<4><<<sms, BLOCK_THREADS, smem_ring>>>(tcodes, x, yb, sh, rot);
            return;
        }
        if (lazy) {
            static bool set = false;
            if (!set) {
                CHECK(cudaFuncSetAttribute(lazy_kernel<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_ring));
                set = true;
            }
            lazy_kernel<3><<<sms, BLOCK_THREADS, smem_ring>>>(tcodes, x, yb, sh, rot);
            return;
        }
        MK_RING(2) MK_RING(4) MK_RING(6) MK_RING(8)
#undef MK_RING
    };
    auto task = [&](int i) { task_kernel<<<sms, BLOCK_THREADS, smem_task>>>(a, x, sh, u32(i) * sms % places); };
    // The outputs of every launch below land in the same places; launch 0's are compared.
    ring(0);
    task(0);
    CHECK(cudaDeviceSynchronize());
    std::vector<float> ha(u64(sh.n) * sh.total_rows), hb(u64(sh.n) * sh.total_rows);
    CHECK(cudaMemcpy(ha.data(), ya, ha.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(hb.data(), yb, hb.size() * 4, cudaMemcpyDeviceToHost));
    const char* mode = pair     ? " pair"
                       : lazy   ? " lazy (3 slots)"
                       : whole  ? " whole"
                       : lazyf  ? " lazyf"
                       : sliced ? " sliced (slots a slice)"
                                : "";
    u64 differ = 0, written = 0;
    double worst = 0;
    for (u64 i = 0; i < ha.size(); ++i) {
        differ += memcmp(&ha[i], &hb[i], 4) != 0;
        written += ha[i] != 0.0f;
        worst = fmax(worst, fabs(double(ha[i]) - double(hb[i])));
    }
    printf("cols %u rows %u n %u slots %u%s: %llu outputs, %llu nonzero, %llu differ in bits between task and ring "
           "(largest difference %.3g)\n",
           sh.cols, sh.rows, sh.n, ns, mode, (unsigned long long)(u64(sms) * sh.rows * sh.n),
           (unsigned long long)written, (unsigned long long)differ, worst);

    const u64 copy_bytes = 512ull << 20;
    uint4 *src, *dst;
    CHECK(cudaMalloc(&src, copy_bytes));
    CHECK(cudaMalloc(&dst, copy_bytes));
    auto copy = [&](int) { copy_probe<<<sms * 4, BLOCK_THREADS>>>(src, dst, copy_bytes / 16); };
    copy(0);
    const double copy_tbs = 2.0 * copy_bytes / probe_time(10, copy) / 1e6;
    for (int w = 0; w < 3; ++w) ring(w), task(w);
    const double bytes = double(sms) * sh.rows * (sh.cols / 2 + sh.cols / 32);
    for (int rep = 0; rep < 2; ++rep) {
        const double tr = probe_time(40, ring), tt = probe_time(40, task);
        printf("  ring %.2f us (%.3f TB/s, %.1f %% of copy), task %.2f us (%.3f TB/s, %.1f %%), %.2fx; "
               "copy %.3f TB/s\n",
               tr, bytes / tr / 1e6, 100.0 * bytes / tr / 1e6 / copy_tbs, tt, bytes / tt / 1e6,
               100.0 * bytes / tt / 1e6 / copy_tbs, tt / tr, copy_tbs);
    }
    CHECK(cudaGetLastError());
    return differ && !whole ? 1 : 0;  // every other mode sums as the task does
}
