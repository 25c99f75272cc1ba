// The kernels of the fused decoding step (one token per sequence through a whole Mamba-1 or
// Mamba-2 model), launched by `decode.rs` and replayed as one CUDA graph per token.
//
// Weights are f32, or bf16 when compiled with IN_BF16 (`in_t`); activations, states and every
// small parameter (conv weights, A, D, biases, norm weights) are f32. Compiled with
//   GEMV_BT   sequences of the batch handled together by one pass over a weight row (<= 8),
//   STATE_N   the SSM state length N, ROW_LANES lanes per state row (a power of two <= 32),
//   CONV_W    the convolution width W.
//
// Per layer, four launches (Mamba-1):          three (Mamba-2):
//   xz  = in_proj(rmsnorm(h) * w_norm)           zxbcdt = in_proj(rmsnorm(h) * w_norm)
//   xc  = silu(conv_step(x))                     xbc    = silu(conv_step(xBC))
//         (the conv by in_proj's own blocks, ConvEpilogue; its own launch behind cuBLAS)
//   dbc = x_proj(xc)                             y      = ssm_step(x, dt, B, C) * silu(z)
//   y   = ssm_step(xc, dt_proj(dbc), B, C)       h     += out_proj(rmsnorm(y) * w)  (one group)
//         * silu(z)
//   h  += out_proj(y)
// (Mamba-2 with several norm groups, or the gate after the norm, runs gated_norm_step between
// the SSM step and out_proj.) At batch 1 a small model's mixer runs everything after in_proj
// as one launch (mamba1_tail / mamba2_tail, at the end of this file). At the end
// logits = lm_head(rmsnorm(h) * w_f).

// ---------------------------------------------------------------------------------------
// Matrix-vector products: y[b, r] (+)= sum_c W[r, c] * x'[b, c] (+ bias[r]), where x' is x,
// or x with an RMSNorm folded in (norm_eps >= 0): x' = x * norm_w * rsqrt(mean(x^2) + eps).
//
// A persistent grid of 8-warp blocks streams the matrix. Work is cut into tasks: a task is
// GEMV_WARPS / split groups of R consecutive rows; each group is shared by `split` warps
// (a power of two <= 8). Block i takes the contiguous task range
// [i * tasks / grid, (i + 1) * tasks / grid), so any grid from 1 to `tasks` blocks is valid;
// with at most four blocks per multiprocessor, tall matrices make each warp loop over several
// row groups, so the device never drains between short-lived blocks. Each lane keeps U * R 16-byte weight loads
// in flight (ld.global.nc.L1::no_allocate: weights are read once and must not evict x); a
// task's partial sums meet in shared memory (one barrier per task when split > 1,
// double-buffered).
//
// Two orders of a row's chunks between the split warps (each measured faster somewhere):
//   gemv_rows_contiguous (gemv_r1): warp p takes chunks [p * per_part, (p + 1) * per_part)
//     and issues the next task's first loads before reducing the current task; best for
//     short matrices at split 8.
//   gemv_rows_interleaved (gemv_r2, gemv_r2_xs, gemv_r4_xs): blocks of 32 * U chunks dealt
//     round robin to the split warps, the next loads after the task's sums; 10-25 % faster
//     for tall matrices at splits 1 and 2.
// The _xs kernels stage x * norm_w once per block in shared memory (chunk c's h-th float4 in
// plane h, so lanes reading consecutive chunks hit consecutive words), summing x^2 on the
// way, and scale each row's sum by rsqrt(mean(x^2) + eps) at the end; gemv_r1 / gemv_r2 read
// x in the loop and gather sum(x^2) along with the row's partial sums.
//
// Programmatic dependent launch (the launcher sets the attribute): a product issues its
// first weight loads, which no kernel writes, then waits for the earlier kernels
// (griddepcontrol.wait) before reading x or y, and lets the next kernel start at once
// (launch_dependents) so that it can prefetch its own weights. Activations are read through
// L2 (ld.global.cg): an early-started block must not find a line of its input in its
// multiprocessor's L1 from before the previous kernel wrote it.
//
// The launcher's rule is in `decode.rs` (`GemvPlan`). Rows and inputs are 16-byte aligned
// (cols * sizeof(in_t) and the strides of x multiples of 16 bytes, checked by the launcher).
// ---------------------------------------------------------------------------------------

#define GEMV_WARPS 8
// Blocks per multiprocessor the register budget is set for: fewer for large batch tiles,
// whose accumulators need the registers.
#define GEMV_MIN_BLOCKS (GEMV_BT > 2 ? 2 : 4)

#ifdef IN_BF16
#define CHUNK 8
__device__ __forceinline__ void unpack(const uint4 v, float* w) {
    const unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[2 * i] = __uint_as_float(u[i] << 16);
        w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}
#else
#define CHUNK 4
__device__ __forceinline__ void unpack(const uint4 v, float* w) {
    w[0] = __uint_as_float(v.x);
    w[1] = __uint_as_float(v.y);
    w[2] = __uint_as_float(v.z);
    w[3] = __uint_as_float(v.w);
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// CHUNK floats from a 16-byte aligned address: parameters no kernel writes (through the
// read-only cache), or activations (through L2, see above).
template <bool ACTIVATIONS>
__device__ __forceinline__ void load_floats(const float* p, float* out) {
#pragma unroll
    for (int i = 0; i < CHUNK / 4; ++i) {
        const float4* q = reinterpret_cast<const float4*>(p) + i;
        const float4 v = ACTIVATIONS ? __ldcg(q) : __ldg(q);
        out[4 * i] = v.x;
        out[4 * i + 1] = v.y;
        out[4 * i + 2] = v.z;
        out[4 * i + 3] = v.w;
    }
}

// A weight chunk: read once per product, so kept out of L1 (x and norm_w stay there).
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void wait_for_earlier_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

struct GemvArgs {
    int rows, cols, batch, split;
    long long x_stride, y_stride;  // elements between consecutive sequences of x and of y
    int accumulate;                // y += W x' instead of y = W x'
    float norm_eps;                // < 0: x' = x
};

// The causal conv step (as conv_step computes it) over outputs [offset, offset + channels) of
// a product, done by the block that produced them once its tasks are done (a channel's state is
// touched by that block only), so that no conv launch waits between this product and the
// next kernel; channels == 0: none. Layer `layer`'s conv state (batch, channels, W-1) is in
// the state table; out is (batch, channels).
struct ConvEpilogue {
    const float* weight;
    const float* bias;
    float* const* states;
    float* out;
    int layer, channels, offset;
};

// One channel's conv step once its window (the W-1 stored inputs, then the new one) and taps
// are in registers: the window, shifted, becomes the channel's state; returns
// silu(acc0 + taps . window).
__device__ __forceinline__ float conv_advance(const float (&window)[CONV_W], const float (&taps)[CONV_W],
                                              float acc0, float* state) {
    float acc = acc0;
#pragma unroll
    for (int k = 0; k < CONV_W; ++k) acc += taps[k] * window[k];
#pragma unroll
    for (int k = 0; k < CONV_W - 1; ++k) state[k] = window[k + 1];
    return silu(acc);
}

// The conv over the outputs rows [row_begin, row_end) of this block wrote, for every sequence.
// Every thread of the block calls it.
__device__ __forceinline__ void conv_epilogue(const ConvEpilogue& cv, const GemvArgs& a, int row_begin,
                                              int row_end, const float* y) {
    const int lo = max(row_begin, cv.offset), hi = min(min(row_end, a.rows), cv.offset + cv.channels);
    if (lo >= hi) return;
    __syncthreads();  // the block's outputs are written
    const int n = hi - lo;
    for (int i = threadIdx.x; i < n * a.batch; i += blockDim.x) {
        const int row = lo + i % n, b = i / n, c = row - cv.offset;
        float* state = cv.states[2 * cv.layer] + ((long long)b * cv.channels + c) * (CONV_W - 1);
        float window[CONV_W], taps[CONV_W];
#pragma unroll
        for (int k = 0; k < CONV_W - 1; ++k) window[k] = __ldcg(state + k);
        window[CONV_W - 1] = __ldcg(y + b * a.y_stride + row);
#pragma unroll
        for (int k = 0; k < CONV_W; ++k) taps[k] = __ldg(cv.weight + c * CONV_W + k);
        const float acc0 = cv.bias ? __ldg(cv.bias + c) : 0.0f;
        cv.out[(long long)b * cv.channels + c] = conv_advance(window, taps, acc0, state);
    }
}

// The U chunks (lane, lane + 32, ...) from chunk c0 of the R rows from row0 that lie before
// chunk c_end: rows past the end re-read the last row (their sums are dropped).
template <int U, int R>
__device__ __forceinline__ void load_rows(const uint4* __restrict__ w, const GemvArgs& a,
                                          int row0, int c0, int c_end, uint4 (&dst)[U][R]) {
    const int chunks = a.cols / CHUNK;
    const int first = min(row0, a.rows - 1);
    const uint4* p = w + (long long)first * chunks + c0;
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (c0 + u * 32 < c_end)
#pragma unroll
            for (int r = 0; r < R; ++r)
                dst[u][r] = load_weights(p + (min(row0 + r, a.rows - 1) - first) * chunks + u * 32);
}

// This block's task range [t_begin, t_end): the tasks (groups_per_task groups of `rows`
// rows each) dealt to the grid's blocks in contiguous, balanced ranges.
__device__ __forceinline__ void block_tasks(const GemvArgs& a, int rows, int groups_per_task,
                                            int& t_begin, int& t_end) {
    const int groups = (a.rows + rows - 1) / rows;
    const int tasks = (groups + groups_per_task - 1) / groups_per_task;
    t_begin = (int)((long long)blockIdx.x * tasks / gridDim.x);
    t_end = (int)((long long)(blockIdx.x + 1) * tasks / gridDim.x);
}

template <int R>
__device__ __forceinline__ void reset_sums(float (&acc)[R][GEMV_BT], float (&sq)[GEMV_BT]) {
#pragma unroll
    for (int b = 0; b < GEMV_BT; ++b) {
        sq[b] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][b] = 0.0f;
    }
}

// x' of the sequences b0 .. b0 + GEMV_BT - 1 staged in x_s (chunk c's h-th float4 in plane h,
// so lanes reading consecutive chunks hit consecutive words) and each sequence's norm scale
// (1 without a norm). Every thread of the block calls it.
__device__ __forceinline__ void stage_input(const float* __restrict__ x,
                                            const float* __restrict__ norm_w, const GemvArgs& a,
                                            int b0, float4* x_s,
                                            float (&sq_s)[GEMV_WARPS][GEMV_BT],
                                            float (&scale)[GEMV_BT]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = a.cols / CHUNK, cols4 = a.cols / 4;
    const bool norm = a.norm_eps >= 0.0f;
    if (b0 > 0) __syncthreads();  // the previous tile is done with x_s and sq_s
    float sq[GEMV_BT];
#pragma unroll
    for (int b = 0; b < GEMV_BT; ++b) {
        sq[b] = 0.0f;
        if (b0 + b >= a.batch) continue;
        const float4* xb = reinterpret_cast<const float4*>(x + (b0 + b) * a.x_stride);
        const float4* nb = reinterpret_cast<const float4*>(norm_w);
        for (int i = threadIdx.x; i < cols4; i += GEMV_WARPS * 32) {
            float4 q = __ldcg(xb + i);
            if (norm) {
                sq[b] += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
                const float4 n = __ldg(nb + i);
                q.x *= n.x;
                q.y *= n.y;
                q.z *= n.z;
                q.w *= n.w;
            }
            x_s[b * cols4 + (i % (CHUNK / 4)) * chunks + i / (CHUNK / 4)] = q;
        }
    }
    if (norm)
#pragma unroll
        for (int b = 0; b < GEMV_BT; ++b) {
            sq[b] = warp_sum(sq[b]);
            if (lane == 0) sq_s[warp][b] = sq[b];
        }
    __syncthreads();
#pragma unroll
    for (int b = 0; b < GEMV_BT; ++b) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < GEMV_WARPS; ++i) total += sq_s[i][b];
        scale[b] = norm ? rsqrtf(total / a.cols + a.norm_eps) : 1.0f;
    }
}

// acc[r][b] += W[row r of the group, chunk c] . x'[b0 + b, chunk c] for the R weight chunks
// in v. x' comes from the staged tile, or (not STAGED) is read through L2 with the norm's
// weights applied and x^2 added to sq (the norm's scale is applied at the end of the task).
template <int R, bool STAGED>
__device__ __forceinline__ void multiply_chunk(const uint4 (&v)[R], const float* __restrict__ x,
                                               const float4* x_s,
                                               const float* __restrict__ norm_w,
                                               const GemvArgs& a, int b0, int c,
                                               float (&acc)[R][GEMV_BT], float (&sq)[GEMV_BT]) {
    const int chunks = a.cols / CHUNK, cols4 = a.cols / 4;
    const bool norm = a.norm_eps >= 0.0f;
    float nw[CHUNK];
    if (!STAGED && norm) load_floats<false>(norm_w + c * CHUNK, nw);
#pragma unroll
    for (int b = 0; b < GEMV_BT; ++b) {
        if (b0 + b >= a.batch) break;
        float xv[CHUNK];
        if (STAGED) {
            const float4* xp = x_s + b * cols4 + c;
#pragma unroll
            for (int i = 0; i < CHUNK / 4; ++i) {
                const float4 q = xp[i * chunks];
                xv[4 * i] = q.x;
                xv[4 * i + 1] = q.y;
                xv[4 * i + 2] = q.z;
                xv[4 * i + 3] = q.w;
            }
        } else {
            load_floats<true>(x + (b0 + b) * a.x_stride + c * CHUNK, xv);
            if (norm)
#pragma unroll
                for (int k = 0; k < CHUNK; ++k) {
                    sq[b] += xv[k] * xv[k];
                    xv[k] *= nw[k];
                }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float wf[CHUNK];
            unpack(v[r], wf);
#pragma unroll
            for (int k = 0; k < CHUNK; ++k) acc[r][b] += wf[k] * xv[k];
        }
    }
}

// The end of a task (rows row0 .. row0 + R - 1): each warp's sums across its lanes, the
// split warps' partial sums added in shared memory (double-buffered by the task's parity),
// the outputs written by the group's first warp (scaled by the norm, plus the bias, added to
// y when accumulating), and the sums reset for the next task.
template <int R, bool STAGED>
__device__ __forceinline__ void finish_task(float (&acc)[R][GEMV_BT], float (&sq)[GEMV_BT],
                                            float (&part_s)[2][GEMV_WARPS][R + 1][GEMV_BT],
                                            const float (&scale)[GEMV_BT], int parity, int row0,
                                            int b0, const float* __restrict__ bias,
                                            const GemvArgs& a, float* __restrict__ y) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % a.split;
    const bool norm = a.norm_eps >= 0.0f;
#pragma unroll
    for (int b = 0; b < GEMV_BT; ++b) {
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][b] = warp_sum(acc[r][b]);
        if (!STAGED && norm) sq[b] = warp_sum(sq[b]);
    }
    if (a.split > 1) {
        if (lane == 0)
#pragma unroll
            for (int b = 0; b < GEMV_BT; ++b) {
#pragma unroll
                for (int r = 0; r < R; ++r) part_s[parity][warp][r][b] = acc[r][b];
                part_s[parity][warp][R][b] = sq[b];
            }
        __syncthreads();
        if (part == 0)
            for (int p = 1; p < a.split; ++p)
#pragma unroll
                for (int b = 0; b < GEMV_BT; ++b) {
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][b] += part_s[parity][warp + p][r][b];
                    sq[b] += part_s[parity][warp + p][R][b];
                }
    }
    if (part == 0)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int b = 0; b < GEMV_BT; ++b)
                if (lane == r * GEMV_BT + b && row0 + r < a.rows && b0 + b < a.batch) {
                    const float sc =
                        STAGED ? scale[b] : (norm ? rsqrtf(sq[b] / a.cols + a.norm_eps) : 1.0f);
                    float val = acc[r][b] * sc;
                    if (bias) val += bias[row0 + r];
                    float* out = y + (b0 + b) * a.y_stride + row0 + r;
                    *out = a.accumulate ? __ldcg(out) + val : val;
                }
    reset_sums(acc, sq);
}

// The product with warp p of a group taking its chunks [p * per_part, (p + 1) * per_part),
// the next task's first loads issued before the current task is reduced. R rows per group,
// U loads per row and lane in flight, STAGED: x' staged in shared memory.
template <int R, int U, bool STAGED>
__device__ __forceinline__ void gemv_rows_contiguous(const in_t* __restrict__ w,
                                                     const float* __restrict__ x,
                                                     const float* __restrict__ bias,
                                                     const float* __restrict__ norm_w,
                                                     const GemvArgs& a, const ConvEpilogue& conv,
                                                     float* __restrict__ y) {
    extern __shared__ float4 x_s[];  // STAGED: GEMV_BT x (cols / 4) float4, chunk planes
    __shared__ float part_s[2][GEMV_WARPS][R + 1][GEMV_BT];  // [R]: sum of squares
    __shared__ float sq_s[GEMV_WARPS][GEMV_BT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int split = a.split, groups_per_task = GEMV_WARPS / split;
    const int part = warp % split, group_in_task = warp / split;
    const int chunks = a.cols / CHUNK;
    const int per_part = (chunks + split - 1) / split;
    const int c_begin = part * per_part, c_end = min(chunks, c_begin + per_part);
    const int iters = (per_part + 32 * U - 1) / (32 * U);  // steps per task
    int t_begin, t_end;
    block_tasks(a, R, groups_per_task, t_begin, t_end);
    const int steps = (t_end - t_begin) * iters;
    const uint4* wv = reinterpret_cast<const uint4*>(w);

    allow_next_kernel();

    for (int b0 = 0; b0 < a.batch; b0 += GEMV_BT) {
        // Step (t, it) of the block: task t_begin + t, chunks c_begin + it * 32 * U + ...
        auto load = [&](int t, int it, uint4(&dst)[U][R]) {
            const int row0 = ((t_begin + t) * groups_per_task + group_in_task) * R;
            load_rows(wv, a, row0, c_begin + it * 32 * U + lane, c_end, dst);
        };
        uint4 v[U][R];
        if (steps > 0) load(0, 0, v);
        wait_for_earlier_kernels();  // nothing above reads what earlier kernels write

        float scale[GEMV_BT];  // STAGED: the norm's scale per sequence
        if (STAGED) stage_input(x, norm_w, a, b0, x_s, sq_s, scale);

        float acc[R][GEMV_BT], sq[GEMV_BT];
        reset_sums(acc, sq);
        int t = 0, it = 0;
        for (int s = 0; s < steps; ++s) {
            const int c0 = c_begin + it * 32 * U + lane;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + u * 32;
                if (c >= c_end) break;
                multiply_chunk<R, STAGED>(v[u], x, x_s, norm_w, a, b0, c, acc, sq);
            }
            const bool task_done = it == iters - 1;
            const int t_next = task_done ? t + 1 : t, it_next = task_done ? 0 : it + 1;
            if (task_done) {
                // Issue the next task's first loads before reducing this one.
                if (s + 1 < steps) load(t_next, it_next, v);
                const int row0 = ((t_begin + t) * groups_per_task + group_in_task) * R;
                finish_task<R, STAGED>(acc, sq, part_s, scale, t & 1, row0, b0, bias, a, y);
            } else {
                load(t_next, it_next, v);
            }
            t = t_next;
            it = it_next;
        }
    }
    conv_epilogue(conv, a, t_begin * groups_per_task * R, t_end * groups_per_task * R, y);
}

// The same with the chunks of a row dealt to the split warps in turn, in blocks of 32 * U
// (block j of a row to warp j % split), the next step's loads issued after the task's sums.
// Faster than the contiguous order for tall matrices at splits 1 and 2 (measured); the
// contiguous one is faster for skinny matrices at split 8.
template <int R, int U, bool STAGED>
__device__ __forceinline__ void gemv_rows_interleaved(const in_t* __restrict__ w,
                                                      const float* __restrict__ x,
                                                      const float* __restrict__ bias,
                                                      const float* __restrict__ norm_w,
                                                      const GemvArgs& a, const ConvEpilogue& conv,
                                                      float* __restrict__ y) {
    extern __shared__ float4 x_s[];  // STAGED: GEMV_BT x (cols / 4) float4, chunk planes
    __shared__ float part_s[2][GEMV_WARPS][R + 1][GEMV_BT];  // [R]: sum of squares
    __shared__ float sq_s[GEMV_WARPS][GEMV_BT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int S = a.split, gpb = GEMV_WARPS / S, part = warp % S, gib = warp / S;
    const int chunks = a.cols / CHUNK;
    const int iters = (chunks + 32 * U * S - 1) / (32 * U * S);
    int t_begin, t_end;
    block_tasks(a, R, gpb, t_begin, t_end);
    const int steps = (t_end - t_begin) * iters;
    const uint4* W = reinterpret_cast<const uint4*>(w);

    allow_next_kernel();

    for (int b0 = 0; b0 < a.batch; b0 += GEMV_BT) {
        // Step (tl, it) of the block: task t_begin + tl, chunk block it * S + part.
        auto load = [&](int tl, int it, uint4(&dst)[U][R]) {
            const int row0 = ((t_begin + tl) * gpb + gib) * R;
            load_rows(W, a, row0, (it * S + part) * 32 * U + lane, chunks, dst);
        };
        uint4 v[U][R];
        if (steps > 0) load(0, 0, v);
        wait_for_earlier_kernels();  // nothing above reads what earlier kernels write

        float scale[GEMV_BT];  // STAGED: the norm's scale per sequence
        if (STAGED) stage_input(x, norm_w, a, b0, x_s, sq_s, scale);

        float acc[R][GEMV_BT], sq[GEMV_BT];
        reset_sums(acc, sq);
        int tl = 0, it = 0;
        for (int s = 0; s < steps; ++s) {
            const int tn = it + 1 == iters ? tl + 1 : tl, in = it + 1 == iters ? 0 : it + 1;
            const int c0 = (it * S + part) * 32 * U + lane;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + u * 32;
                if (c >= chunks) break;
                multiply_chunk<R, STAGED>(v[u], x, x_s, norm_w, a, b0, c, acc, sq);
            }
            if (it == iters - 1) {
                const int row0 = ((t_begin + tl) * gpb + gib) * R;
                finish_task<R, STAGED>(acc, sq, part_s, scale, tl & 1, row0, b0, bias, a, y);
            }
            if (s + 1 < steps) load(tn, in, v);
            tl = tn;
            it = in;
        }
    }
    conv_epilogue(conv, a, t_begin * gpb * R, t_end * gpb * R, y);
}

// gemv_r1: one row per group, contiguous split, x read in the loop (short matrices, rows <
// 2048). gemv_r2: two rows, interleaved split, x read in the loop (tall matrices whose input
// tile does not fit 48 KB of shared memory). gemv_r2_xs, gemv_r4_xs: two / four rows, x' in dynamic shared
// memory of GEMV_BT * cols * 4 bytes (tall matrices). The interleaved kernels were measured
// with registers for four blocks per multiprocessor at every batch tile.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS)
    gemv_r1(const in_t* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
            const float* __restrict__ norm_w, GemvArgs a, ConvEpilogue conv, float* __restrict__ y) {
    gemv_rows_contiguous<1, 4, false>(w, x, bias, norm_w, a, conv, y);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_r2(const in_t* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
            const float* __restrict__ norm_w, GemvArgs a, ConvEpilogue conv, float* __restrict__ y) {
    gemv_rows_interleaved<2, 2, false>(w, x, bias, norm_w, a, conv, y);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_r2_xs(const in_t* __restrict__ w, const float* __restrict__ x,
               const float* __restrict__ bias, const float* __restrict__ norm_w, GemvArgs a,
               ConvEpilogue conv, float* __restrict__ y) {
    gemv_rows_interleaved<2, 2, true>(w, x, bias, norm_w, a, conv, y);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_r4_xs(const in_t* __restrict__ w, const float* __restrict__ x,
               const float* __restrict__ bias, const float* __restrict__ norm_w, GemvArgs a,
               ConvEpilogue conv, float* __restrict__ y) {
    gemv_rows_interleaved<4, 2, true>(w, x, bias, norm_w, a, conv, y);
}

// ---------------------------------------------------------------------------------------
// Row kernels (the cuBLAS input, Mamba-2's gated norm): one block of ROW_BLOCK threads per row.
// ---------------------------------------------------------------------------------------

#define ROW_BLOCK 256

// Sum of v over a block of THREADS threads, the warps' sums added in a fixed order (the same
// bits every run); every thread calls it and gets the total. A block that sums again must pass
// a barrier between the two calls (the first call's sums are read until then).
template <int THREADS>
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[THREADS / 32];
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < THREADS / 32; ++i) total += warp_sums[i];
    return total;
}

// ---------------------------------------------------------------------------------------
// The input of a cuBLAS product (batches past GEMV_BT sequences), one block per sequence:
//   out[b, :] = x'[b, :]   with x' = x, or x * norm_w * rsqrt(mean(x^2) + eps) (norm_eps >= 0)
// written contiguously as f32, or as bf16 (rounded to nearest even) when out_bf16 is set
// (cuBLAS multiplies bf16 weights by bf16 inputs only).
// ---------------------------------------------------------------------------------------

struct PrepArgs {
    int cols, out_bf16;
    long long x_stride;
    float norm_eps;
};

__device__ __forceinline__ unsigned short to_bf16(float v) {
    const unsigned int u = __float_as_uint(v);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

extern "C" __global__ void __launch_bounds__(ROW_BLOCK)
    prepare_rows(const float* __restrict__ x, const float* __restrict__ norm_w, PrepArgs a,
                 void* __restrict__ out) {
    const float* xb = x + blockIdx.x * a.x_stride;
    float scale = 1.0f;
    if (a.norm_eps >= 0.0f) {
        float sq = 0.0f;
        for (int i = threadIdx.x; i < a.cols; i += ROW_BLOCK) sq += xb[i] * xb[i];
        scale = rsqrtf(block_sum<ROW_BLOCK>(sq) / a.cols + a.norm_eps);
    }
    const long long row = (long long)blockIdx.x * a.cols;
    for (int i = threadIdx.x; i < a.cols; i += ROW_BLOCK) {
        float v = xb[i];
        if (a.norm_eps >= 0.0f) v *= norm_w[i] * scale;
        if (a.out_bf16)
            static_cast<unsigned short*>(out)[row + i] = to_bf16(v);
        else
            static_cast<float*>(out)[row + i] = v;
    }
}

// ---------------------------------------------------------------------------------------
// Embedding rows: h[b, :] = table[ids[b], :] (ids checked on the host), the table f32 or
// (table_bf16) bf16 whatever the weights are. One block per sequence.
// ---------------------------------------------------------------------------------------

extern "C" __global__ void embed(const void* __restrict__ table, int table_bf16,
                                 const unsigned int* __restrict__ ids, int hidden,
                                 float* __restrict__ h) {
    const long long from = (long long)ids[blockIdx.x] * hidden;
    const unsigned short* bf16_rows = static_cast<const unsigned short*>(table);
    const float* f32_rows = static_cast<const float*>(table);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        h[(long long)blockIdx.x * hidden + i] =
            table_bf16 ? __uint_as_float(((unsigned int)bf16_rows[from + i]) << 16) : f32_rows[from + i];
}

// ---------------------------------------------------------------------------------------
// Causal conv1d, one new input per channel and sequence:
//   window = [state[b, c, 0 .. W-1), x[b, c]]
//   out[b, c] = silu(bias[c] + sum_k weight[c, k] * window[k]);  state <- window[1 ..]
// x is read at x[b * x_stride + x_offset + c] (a column range of in_proj's output); layer
// `layer`'s conv state (batch, channels, W-1), found in the state table, is updated in place.
// One thread per (b, c).
//
// The conv and SSM steps and the gated norm are launched like the products (programmatic
// dependent launch, when the products are these kernels rather than cuBLAS's): they start in
// the tail of the product before them and load what no kernel of this step writes (weights,
// parameters, and the layer's own state, which only the same kernel of the previous token
// wrote) before griddepcontrol.wait, and activations after it, through L2 (__ldcg): an L1
// line from before the wait may be stale (CUDA_NOTES). A sequence's dt_low / B / C, read by
// every channel, are staged once per block in shared memory: read through L2 by every
// thread they made the step slower (mamba-2.8b 2.56 -> 2.64 ms per token on the H200).
// Only Mamba-1's SSM step lets the next kernel (out_proj) start early, once its block has
// staged dt_low / B / C: out_proj's launch and first weight loads then overlap the step's
// arithmetic (mamba-2.8b 2.25 -> 2.18 ms per token; Mamba-2's step, doing the same, was no
// faster). Triggered at the start, right after the wait, the product found the
// multiprocessors still taken by the step's blocks, and its persistent grid, which counts on
// four resident blocks per multiprocessor, ran a second wave (mamba-2.8b 2.55 -> 2.76 ms).
//
// Behind cuBLAS's products (EARLY_START 0: large batches) they are launched plainly, after
// every earlier kernel has finished: activations then come through L1 and dt_low / B / C are
// read in place (staged and read through L2 they made mamba-2.8b at batch 64 8.1 -> 8.8 ms
// per step).
// ---------------------------------------------------------------------------------------

#ifndef EARLY_START
#error "EARLY_START (0 or 1): whether the small kernels start in the tail of the product before them"
#endif

// An activation (another kernel of this step wrote it): through L2 when this kernel may have
// started before that one finished, through L1 otherwise.
__device__ __forceinline__ float load_activation(const float* p) {
#if EARLY_START
    return __ldcg(p);
#else
    return *p;
#endif
}

struct ConvArgs {
    int batch, channels;
    long long x_stride, x_offset;
};

extern "C" __global__ void conv_step(const float* __restrict__ x, float* __restrict__ const* states,
                                     int layer, const float* __restrict__ weight,
                                     const float* __restrict__ bias, ConvArgs a,
                                     float* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // b * channels + c
    const bool active = i < a.batch * a.channels;
    const int c = active ? i % a.channels : 0, b = active ? i / a.channels : 0;
    float* state = states[2 * layer] + (long long)(active ? i : 0) * (CONV_W - 1);
    float window[CONV_W], taps[CONV_W];
#pragma unroll
    for (int k = 0; k < CONV_W - 1; ++k) window[k] = load_activation(state + k);
#pragma unroll
    for (int k = 0; k < CONV_W; ++k) taps[k] = __ldg(weight + c * CONV_W + k);
    const float acc0 = bias ? __ldg(bias + c) : 0.0f;
    wait_for_earlier_kernels();
    if (!active) return;
    window[CONV_W - 1] = load_activation(x + b * a.x_stride + a.x_offset + c);
    out[i] = conv_advance(window, taps, acc0, state);
}

// ---------------------------------------------------------------------------------------
// Mamba-1 SSM step with the Δ projection folded in. For channel c of sequence b, with
// dbc = [dt_low (R) | B (N) | C (N)] = x_proj's output (each RMS-normalised without a weight
// when bc_eps >= 0, FalconMamba):
//   dt      = softplus(dt_w[c, :] . dt_low + dt_bias[c])
//   S[c, :] = exp(dt * A[c, :]) * S[c, :] + dt * xc[c] * B
//   y[c]    = (S[c, :] . C + D[c] * xc[c]) * silu(z[c])        z = xz[b, d_inner + c]
// ROW_LANES lanes per (b, c); the SSM state (batch, d_inner, N) is updated in place.
// ---------------------------------------------------------------------------------------

struct Mamba1Args {
    int batch, d_inner, dt_rank;
    long long xz_stride, dbc_stride;
    float bc_eps;
};

// State entries per lane (lane, lane + ROW_LANES, ...), and the Δ weights per lane loaded
// before the wait (the rest of a wider dt_rank is read after it). Sixteen when the kernel
// starts early, one otherwise: held in registers they took mamba1_ssm_step from 30 to 47
// registers per thread, 62 % occupancy, and made the memory-bound step at batch 64 slower
// (mamba-2.8b 8.0 -> 8.7 ms per step on the H200).
#define STATE_PER_LANE ((STATE_N + ROW_LANES - 1) / ROW_LANES)
#define DT_PER_LANE (EARLY_START ? 16 : 1)

// Sum of v[j]^2 over j < len by a group of `width` lanes (lane < width takes every width-th
// j); every lane of the group gets it.
__device__ __forceinline__ float lane_group_sum_sq(const float* v, int len, int lane, int width) {
    float s = 0.0f;
#pragma unroll 4
    for (int j = lane; j < len; j += width) s += v[j] * v[j];
    return lane_group_sum(s, width);
}

// FalconMamba's RMS scales of dt_low (dt_rank floats at low), B and C (STATE_N each), summed
// by groups of `width` lanes; all 1 without them (bc_eps < 0).
struct DbcScales {
    float dt, b, c;
};

__device__ __forceinline__ DbcScales dbc_scales(const float* low, const float* bv, const float* cv,
                                                int dt_rank, float eps, int lane, int width) {
    if (eps < 0.0f) return {1.0f, 1.0f, 1.0f};
    return {rsqrtf(lane_group_sum_sq(low, dt_rank, lane, width) / dt_rank + eps),
            rsqrtf(lane_group_sum_sq(bv, STATE_N, lane, width) / STATE_N + eps),
            rsqrtf(lane_group_sum_sq(cv, STATE_N, lane, width) / STATE_N + eps)};
}

// The layer's state entries of this lane, through L2 (the previous token's step wrote them).
__device__ __forceinline__ void load_state(const float* state, int lane,
                                           float (&s)[STATE_PER_LANE]) {
#pragma unroll
    for (int q = 0; q < STATE_PER_LANE; ++q) {
        const int n = lane + q * ROW_LANES;
        s[q] = n < STATE_N ? load_activation(state + n) : 0.0f;
    }
}

// The sequence's len floats at src (an earlier kernel's output) that every row of the block
// reads: staged by the whole block in shared memory (dst) when the kernel starts early, read
// in place otherwise; every thread calls it.
__device__ __forceinline__ const float* sequence_inputs(const float* src, int len, float* dst) {
#if EARLY_START
    for (int i = threadIdx.x; i < len; i += blockDim.x) dst[i] = __ldcg(src + i);
    __syncthreads();
    return dst;
#else
    return src;
#endif
}

// What a lane of Mamba-1's SSM step reads for channel c that no kernel of this step writes
// (the state only the same step of the previous token wrote), loaded before the kernel waits
// for the kernels before it: the first DT_PER_LANE of its Δ weights, its state entries, A, the
// Δ bias and D.
struct Mamba1Params {
    float w_dt[DT_PER_LANE], s[STATE_PER_LANE], rate[STATE_PER_LANE], bias, d;
};

__device__ __forceinline__ void load_mamba1_params(const float* state, const in_t* __restrict__ dt_w,
                                                   const float* __restrict__ dt_bias, const float* __restrict__ a_neg,
                                                   const float* __restrict__ d, int c, int dt_rank, int lane,
                                                   Mamba1Params& p) {
#pragma unroll
    for (int i = 0; i < DT_PER_LANE; ++i) {
        const int j = lane + i * ROW_LANES;
        p.w_dt[i] = j < dt_rank ? ld(dt_w, (long long)c * dt_rank + j) : 0.0f;
    }
    load_state(state, lane, p.s);
#pragma unroll
    for (int q = 0; q < STATE_PER_LANE; ++q) {
        const int n = lane + q * ROW_LANES;
        p.rate[q] = n < STATE_N ? __ldg(a_neg + c * STATE_N + n) : 0.0f;
    }
    p.bias = __ldg(dt_bias + c);
    p.d = __ldg(d + c);
}

// Channel c's step once its parameters are in p: dt from the Δ projection of dt_low (the lanes'
// first weights in p, the rest of a wider dt_rank read here), the state row advanced in place
// (when `active`), and y = (S . C + D x) silu(z), which every lane of the group gets.
__device__ __forceinline__ float mamba1_channel_step(const Mamba1Params& p, const float* low, const float* bv,
                                                     const float* cv, const DbcScales& scale,
                                                     const in_t* __restrict__ dt_w, int c, int dt_rank, int lane,
                                                     float xi, float z, bool active, float* state) {
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < DT_PER_LANE; ++i) {
        const int j = lane + i * ROW_LANES;
        if (j < dt_rank) dot += p.w_dt[i] * low[j];
    }
    for (int j = lane + DT_PER_LANE * ROW_LANES; j < dt_rank; j += ROW_LANES)
        dot += ld(dt_w, (long long)c * dt_rank + j) * low[j];
    const float dt = softplus(lane_group_sum(dot, ROW_LANES) * scale.dt + p.bias);
    const float dtx = dt * xi * scale.b;
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < STATE_PER_LANE; ++q) {
        const int n = lane + q * ROW_LANES;
        if (!active || n >= STATE_N) continue;
        const float next = __expf(dt * p.rate[q]) * p.s[q] + dtx * bv[n];
        state[n] = next;
        sum += next * cv[n];
    }
    sum = lane_group_sum(sum, ROW_LANES) * scale.c;
    return (sum + p.d * xi) * silu(z);
}

// Grid: (blocks of channels, batch); dynamic shared memory (EARLY_START): dt_rank + 2 N floats.
extern "C" __global__ void mamba1_ssm_step(const float* __restrict__ xc, const float* __restrict__ dbc,
                                           const float* __restrict__ xz, const in_t* __restrict__ dt_w,
                                           const float* __restrict__ dt_bias,
                                           const float* __restrict__ a_neg, const float* __restrict__ d,
                                           float* __restrict__ const* states, int layer, Mamba1Args a,
                                           float* __restrict__ y) {
    extern __shared__ float dbc_s[];  // this sequence's [dt_low | B | C]
    const int ch = blockIdx.x * (blockDim.x / ROW_LANES) + threadIdx.x / ROW_LANES;
    const int lane = threadIdx.x % ROW_LANES;
    const int b = blockIdx.y;
    const bool active = ch < a.d_inner;
    const int c = active ? ch : 0;
    const long long row = (long long)b * a.d_inner + c;

    // Before the wait: this channel's Δ weights, A, D, Δ bias and state.
    float* state = states[2 * layer + 1] + row * STATE_N;
    Mamba1Params p;
    load_mamba1_params(state, dt_w, dt_bias, a_neg, d, c, a.dt_rank, lane, p);
    wait_for_earlier_kernels();

    // This channel's input and gate, loaded before the staging's barrier so that their round
    // trip overlaps it.
    const float xi = load_activation(xc + row);
    const float z = load_activation(xz + b * a.xz_stride + a.d_inner + c);
    // dt_low, B and C, read by every channel of the sequence, staged once per block.
    const float* low = sequence_inputs(dbc + b * a.dbc_stride, a.dt_rank + 2 * STATE_N, dbc_s);
#if EARLY_START
    allow_next_kernel();
#endif
    const float* bv = low + a.dt_rank;
    const float* cv = bv + STATE_N;
    const DbcScales scale = dbc_scales(low, bv, cv, a.dt_rank, a.bc_eps, lane, ROW_LANES);
    const float out = mamba1_channel_step(p, low, bv, cv, scale, dt_w, c, a.dt_rank, lane, xi, z, active, state);
    if (active && lane == 0) y[row] = out;
}

// The same step for large batches (from 17 sequences, behind cuBLAS's products), one thread
// per (channel, sequence) and ITEMS sequences per thread. The kernel above gives each state
// row ROW_LANES lanes, which all walk the Δ projection's reduction, softplus and gate, and
// reads the Δ weights again for every sequence: at batch 64 that is latency- and issue-bound
// (89.6 µs per mamba-2.8b layer on the H200 for 21 MB of state). Here a block of SSM_WARPS
// warps takes 32 channels of SSM_WARPS * ITEMS sequences: it stages the channels' Δ weights
// and the sequences' dt_low / B / C in shared memory as f32, zero-padded to whole float4s
// (dt4 = dt_rank rounded up to 4; weight rows dt4 or dt4 + 4 floats apart, an odd number of
// float4s, so that 32 channels' float4 reads hit every bank once per quarter warp); each
// thread keeps its sequences' state rows in registers, loaded before the staging, and reads
// each float4 of weights once for its ITEMS sequences. mamba-2.8b bf16 at batch 64: 8.15 ->
// 6.39 ms per step (CUDA_NOTES has the versions tried). Grid: (d_inner / 32, batch /
// (SSM_WARPS * ITEMS)), rounded up; dynamic shared memory: 32 * w_stride + seqs * in_stride
// floats (launcher: `DecodeKernels::mamba1_step_tiled`, whose layout sums match these).
#define SSM_WARPS 4
#define STAGE_LOADS 8

// A state row of STATE_N floats (rows start 16-byte aligned when STATE_N is a multiple of 4).
__device__ __forceinline__ void store_row(float* p, const float (&v)[STATE_N]) {
#if STATE_N % 4 == 0
#pragma unroll
    for (int n = 0; n < STATE_N; n += 4)
        *reinterpret_cast<float4*>(p + n) = make_float4(v[n], v[n + 1], v[n + 2], v[n + 3]);
#else
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) p[n] = v[n];
#endif
}

// Fills `count` floats of shared memory, dst[i] = value(i), STAGE_LOADS loads in flight per
// thread: `value` must load unconditionally (a clamped address, then a select), or the loads
// wait for each other behind branches.
template <typename Value>
__device__ __forceinline__ void stage(float* dst, int count, Value value) {
    for (int i0 = threadIdx.x; i0 < count; i0 += STAGE_LOADS * blockDim.x) {
        float v[STAGE_LOADS];
#pragma unroll
        for (int u = 0; u < STAGE_LOADS; ++u) v[u] = value(min(i0 + u * (int)blockDim.x, count - 1));
#pragma unroll
        for (int u = 0; u < STAGE_LOADS; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < count) dst[i] = v[u];
        }
    }
}

template <int ITEMS>
__device__ __forceinline__ void mamba1_ssm_step_tiled(
    const float* __restrict__ xc, const float* __restrict__ dbc, const float* __restrict__ xz,
    const in_t* __restrict__ dt_w, const float* __restrict__ dt_bias,
    const float* __restrict__ a_neg, const float* __restrict__ d, float* __restrict__ const* states,
    int layer, const Mamba1Args& a, float* __restrict__ y) {
    extern __shared__ float4 smem4[];
    const int dt4 = (a.dt_rank + 3) / 4 * 4;
    const int w_stride = (dt4 / 4) % 2 ? dt4 : dt4 + 4;
    const int in_stride = dt4 + (2 * STATE_N + 3) / 4 * 4;
    float* w_s = reinterpret_cast<float*>(smem4);  // 32 x w_stride: the channels' Δ weights
    float* in_s = w_s + 32 * w_stride;             // seqs x [dt_low | pad | B | C | pad]
    const int c0 = blockIdx.x * 32, seqs = SSM_WARPS * ITEMS, b0 = blockIdx.y * seqs;
    const int channels = min(32, a.d_inner - c0), block_seqs = min(seqs, a.batch - b0);

    // This thread's channel, and its sequences first + k (a warp's; past the batch's end it
    // repeats its last one, whose results are not written): state rows and inputs loaded
    // first, so that they are in flight while the block stages the rest.
    const int lane = threadIdx.x % 32, first = (threadIdx.x / 32) * ITEMS;
    const bool active = lane < channels;
    const int c = c0 + (active ? lane : 0);
    float* layer_state = states[2 * layer + 1];
    float h[ITEMS][STATE_N], xi[ITEMS], z[ITEMS];
    const float* in_k[ITEMS];  // each sequence's row of in_s
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
        const int s = min(first + k, block_seqs - 1);
        const long long row = (long long)(b0 + s) * a.d_inner + c;
        load_floats(layer_state + row * STATE_N, h[k]);  // rows 16-byte aligned when N % 4 == 0
        xi[k] = xc[row];
        z[k] = xz[(b0 + s) * a.xz_stride + a.d_inner + c];
        in_k[k] = in_s + s * in_stride;
    }
    float decay_rate[STATE_N];
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) decay_rate[n] = __ldg(a_neg + c * STATE_N + n);
    const float bias_c = __ldg(dt_bias + c), d_c = __ldg(d + c);

    stage(w_s, channels * w_stride, [&](int i) {
        const int r = i / w_stride, j = i % w_stride;
        const float w = ld(dt_w, (long long)(c0 + r) * a.dt_rank + min(j, a.dt_rank - 1));
        return j < a.dt_rank ? w : 0.0f;
    });
    // Input row: [dt_low (dt_rank) | zeros to dt4 | B, C (2 N) | zeros to in_stride].
    stage(in_s, block_seqs * in_stride, [&](int i) {
        const int s = i / in_stride, j = i % in_stride;
        const bool low = j < a.dt_rank, bc = j >= dt4 && j < dt4 + 2 * STATE_N;
        const int from = low ? j : (bc ? a.dt_rank + j - dt4 : 0);
        const float v = dbc[(long long)(b0 + s) * a.dbc_stride + from];
        return low || bc ? v : 0.0f;
    });
    __syncthreads();

    // The Δ projections: each float4 of weights read once for the thread's sequences.
    float dot[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) dot[k] = 0.0f;
    const float* w_c = w_s + lane * w_stride;
#pragma unroll 2
    for (int j = 0; j < dt4; j += 4) {
        const float4 w = *reinterpret_cast<const float4*>(w_c + j);
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const float4 x = *reinterpret_cast<const float4*>(in_k[k] + j);
            dot[k] += w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w;
        }
    }

#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
        if (first + k >= block_seqs) break;
        const float* bv = in_k[k] + dt4;
        const float* cv = bv + STATE_N;
        const DbcScales scale = dbc_scales(in_k[k], bv, cv, a.dt_rank, a.bc_eps, lane, 32);
        const float dt = softplus(dot[k] * scale.dt + bias_c);
        const float dtx = dt * xi[k] * scale.b;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            h[k][n] = __expf(dt * decay_rate[n]) * h[k][n] + dtx * bv[n];
            sum += h[k][n] * cv[n];
        }
        if (!active) continue;
        const long long row = (long long)(b0 + first + k) * a.d_inner + c;
        store_row(layer_state + row * STATE_N, h[k]);
        y[row] = (sum * scale.c + d_c * xi[k]) * silu(z[k]);
    }
}

// The tiled step with 1, 2 or 4 sequences per thread (their state rows held in registers:
// 2 only for N <= 32 and 4 only for N <= 16, as `DecodeSpec::tiled_items` chooses).
#define MAMBA1_TILED(NAME, ITEMS)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * SSM_WARPS)                                 \
        NAME(const float* __restrict__ xc, const float* __restrict__ dbc,                         \
             const float* __restrict__ xz, const in_t* __restrict__ dt_w,                         \
             const float* __restrict__ dt_bias, const float* __restrict__ a_neg,                  \
             const float* __restrict__ d, float* __restrict__ const* states, int layer,           \
             Mamba1Args a, float* __restrict__ y) {                                               \
        mamba1_ssm_step_tiled<(ITEMS) * STATE_N <= 64 ? (ITEMS) : 1>(xc, dbc, xz, dt_w, dt_bias,  \
                                                                     a_neg, d, states, layer, a,  \
                                                                     y);                          \
    }
MAMBA1_TILED(mamba1_ssm_step_tiled1, 1)
MAMBA1_TILED(mamba1_ssm_step_tiled2, 2)
MAMBA1_TILED(mamba1_ssm_step_tiled4, 4)

// ---------------------------------------------------------------------------------------
// Mamba-2 SSM step, one state row (b, h, p) per ROW_LANES lanes, with g = h / (H / G):
//   dt        = clamp(softplus(dt_raw[b, h] + dt_bias[h]), lo, hi)
//   S[h,p,:]  = exp(dt * A[h]) * S[h,p,:] + dt * x[b,h,p] * B[b,g,:]
//   y[b,h,p]  = S[h,p,:] . C[b,g,:] + D[h] * x[b,h,p]
// xbc = [x (d_inner) | B (G N) | C (G N)] per sequence (the conv output); dt_raw is read at
// zxbcdt[b * in_stride + dt_offset + h]. The SSM state (batch, H, P, N) is updated in place.
// With `gate` set, y is multiplied by silu(z), z the first d_inner columns of zxbcdt (the gate
// before a norm that out_proj's product folds in).
// ---------------------------------------------------------------------------------------

struct Mamba2Args {
    int batch, heads, head_dim, groups, gate;
    long long xbc_stride, in_stride, dt_offset;
    float dt_lo, dt_hi;
};

// A head's parameters in Mamba-2's step: A, the Δ bias and D.
struct HeadParams {
    float rate, bias, d;
};

// Row (h, p)'s step once its state entries are in s: dt processed, the row advanced in place
// (when `active`) with the group's B and C (bv, cv), and y = S . C + D x, times silu(z) with
// the gate, which every lane of the group gets.
__device__ __forceinline__ float mamba2_row_step(const float (&s)[STATE_PER_LANE], const float* bv, const float* cv,
                                                 float xi, float dt_raw, float z, const HeadParams& hd,
                                                 const Mamba2Args& a, int lane, bool active, float* state) {
    const float dt = process_dt(dt_raw, hd.bias, 1, a.dt_lo, a.dt_hi);
    const float decay = __expf(dt * hd.rate);
    const float dtx = dt * xi;
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < STATE_PER_LANE; ++q) {
        const int n = lane + q * ROW_LANES;
        if (!active || n >= STATE_N) continue;
        const float next = decay * s[q] + dtx * bv[n];
        state[n] = next;
        sum += next * cv[n];
    }
    sum = lane_group_sum(sum, ROW_LANES);
    const float out = sum + hd.d * xi;
    return a.gate ? out * silu(z) : out;
}

// Grid: (blocks of state rows, batch); dynamic shared memory (EARLY_START): 2 G N floats.
extern "C" __global__ void mamba2_ssm_step(const float* __restrict__ xbc, const float* __restrict__ zxbcdt,
                                           const float* __restrict__ dt_bias, const float* __restrict__ a_neg,
                                           const float* __restrict__ d, float* __restrict__ const* states,
                                           int layer, Mamba2Args a, float* __restrict__ y) {
    extern __shared__ float bc_s[];  // this sequence's [B (G N) | C (G N)]
    const int d_inner = a.heads * a.head_dim;
    const int hp_raw = blockIdx.x * (blockDim.x / ROW_LANES) + threadIdx.x / ROW_LANES;  // h * P + p
    const int lane = threadIdx.x % ROW_LANES;
    const int b = blockIdx.y;
    const bool active = hp_raw < d_inner;
    const int hp = active ? hp_raw : 0, h = hp / a.head_dim;
    const int g = h / (a.heads / a.groups);
    const long long row = (long long)b * d_inner + hp;

    // Before the wait: this row's state and its head's parameters.
    float* state = states[2 * layer + 1] + row * STATE_N;
    float s[STATE_PER_LANE];
    load_state(state, lane, s);
    const float rate = __ldg(a_neg + h), bias_h = __ldg(dt_bias + h), d_h = __ldg(d + h);
    wait_for_earlier_kernels();

    // This row's input, step and gate, loaded before the staging's barrier so that their
    // round trip overlaps it.
    const float* seq = xbc + b * a.xbc_stride;
    const float* in_row = zxbcdt + b * a.in_stride;
    const float xi = load_activation(seq + hp), dt_raw = load_activation(in_row + a.dt_offset + h);
    const float z = a.gate ? load_activation(in_row + hp) : 0.0f;
    // B and C, read by every row of the sequence, staged once per block.
    const float* bc = sequence_inputs(seq + d_inner, 2 * a.groups * STATE_N, bc_s);
    const float out = mamba2_row_step(s, bc + g * STATE_N, bc + (a.groups + g) * STATE_N, xi, dt_raw, z,
                                      {rate, bias_h, d_h}, a, lane, active, state);
    if (active && lane == 0) y[row] = out;
}

// ---------------------------------------------------------------------------------------
// Mamba-2's gated RMSNorm on one token, in place, one block per (sequence, group):
//   v = y * silu(z) (gate first) ;  v = v * rsqrt(mean_group(v^2) + eps) * w ;  v *= silu(z) (gate last)
// z is read at z[b * z_stride + i] (the first d_inner columns of in_proj's output).
// ---------------------------------------------------------------------------------------

struct GatedNormArgs {
    int d_inner, group_size, norm_before_gate;
    long long z_stride;
    float eps;
};

extern "C" __global__ void __launch_bounds__(ROW_BLOCK)
    gated_norm_step(float* __restrict__ y, const float* __restrict__ z, const float* __restrict__ w,
                    GatedNormArgs a) {
    wait_for_earlier_kernels();
    const int groups = a.d_inner / a.group_size;
    const long long b = blockIdx.x / groups;
    const int start = (blockIdx.x % groups) * a.group_size;
    float* yb = y + b * a.d_inner;
    const float* zb = z + b * a.z_stride;
    float sq = 0.0f;
    for (int i = start + threadIdx.x; i < start + a.group_size; i += ROW_BLOCK) {
        const float yi = load_activation(yb + i);
        const float v = a.norm_before_gate ? yi : yi * silu(load_activation(zb + i));
        sq += v * v;
    }
    const float inv = rsqrtf(block_sum<ROW_BLOCK>(sq) / a.group_size + a.eps);
    for (int i = start + threadIdx.x; i < start + a.group_size; i += ROW_BLOCK) {
        const float gate = silu(load_activation(zb + i)), yi = load_activation(yb + i);
        const float v = a.norm_before_gate ? yi : yi * gate;
        yb[i] = a.norm_before_gate ? v * inv * w[i] * gate : v * inv * w[i];
    }
}

// ---------------------------------------------------------------------------------------
// A mixer's tail in one launch at batch 1 (the tail kernels): everything after in_proj and
// its conv, with out_proj's weights copied into shared memory while the rest runs.
//   Mamba-1: dbc = x_proj(xc) | barrier | y = ssm_step(xc, dbc, z) | barrier | h += out_proj(y)
//   Mamba-2: y = ssm_step(xbc, dt) * silu(z) | barrier | h += out_proj(rmsnorm(y) * w)
// Block i owns out_proj's rows [i * rows_per_block, ...). At its start, before it waits for
// in_proj, it loads what no kernel of this step writes for its first rows (x_proj's weights,
// the SSM step's parameters and state), then one thread asks the copy engine for its out_proj
// rows (cp.async.bulk into shared memory, completion counted by an mbarrier), so that the copy
// runs under x_proj and the SSM step and out_proj reads no device memory at the end. The other
// phases spread their work over the whole grid; barriers between them (grid_barrier) count the
// blocks that arrived on one counter per layer, zeroed before every step. The grid is at most
// one block per multiprocessor and the next kernel may start only once every block has passed
// a barrier, so every block is resident and a barrier never waits for a block that has nowhere
// to run. Activations written by other blocks of this launch, or by the kernels before it, are
// read through L2 (__ldcg).
// Used for small models only (`TAIL_MAX_WEIGHT_BYTES` in decode.rs): on the H200 it made
// mamba2-130m bf16 0.40 -> 0.33 ms per step, but mamba-2.8b 2.16 -> 2.46 ms: there the kernel
// alone takes 22 us per layer under ncu (24 us for the three kernels it replaces) at 28 % of the
// DRAM's peak throughput, its phases waiting on each other, and the next in_proj starts only
// after its last barrier.
// ---------------------------------------------------------------------------------------

#define TAIL_THREADS 512
#define TAIL_WARPS (TAIL_THREADS / 32)
#define TAIL_ROWS 4   // out_proj rows one warp multiplies at once, sharing each load of y
#define TAIL_PARTS 4  // column parts of an out_proj row (a task is TAIL_ROWS rows by one part)
#define TAIL_COPY_PIECE 32768  // bytes per bulk copy instruction

struct TailArgs {
    int rows, cols, rows_per_block;  // out_proj: rows = hidden, cols = d_inner
    float norm_eps;                  // >= 0: out_proj's input is rmsnorm(y) * norm_w
};

// The block's part of dynamic shared memory: out_proj's rows (as stored), y' in chunk planes
// (chunk c's k-th float4 at plane k), the small inputs every row of the SSM step reads, and
// each (row, part)'s partial sum.
struct TailShared {
    const uint4* w;
    float4* y;
    float* inputs;
    float* parts;
};

__device__ __forceinline__ TailShared tail_shared(const TailArgs& t, int inputs) {
    extern __shared__ float4 tail_smem[];
    const int w_bytes = t.rows_per_block * t.cols * (int)sizeof(in_t);  // a multiple of 16
    float4* y = tail_smem + w_bytes / 16;
    float* in = reinterpret_cast<float*>(y + t.cols / 4);
    float* parts = in + (inputs + 3) / 4 * 4;
    return {reinterpret_cast<const uint4*>(tail_smem), y, in, parts};
}

// The block's out_proj rows into w_s by the copy engine; `copied` completes when they are in.
// Thread 0 only. Sizes and addresses are multiples of 16 bytes (the launcher's checks).
__device__ __forceinline__ void start_row_copy(const in_t* __restrict__ w, const TailArgs& t,
                                               const uint4* w_s, unsigned long long* copied) {
    const int r0 = blockIdx.x * t.rows_per_block, r1 = min(t.rows, r0 + t.rows_per_block);
    const unsigned int bytes = (unsigned int)(r1 - r0) * t.cols * sizeof(in_t);
    const unsigned int bar = shared_address(copied), dst = shared_address(w_s);
    const char* src = reinterpret_cast<const char*>(w + (long long)r0 * t.cols);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    for (unsigned int at = 0; at < bytes; at += TAIL_COPY_PIECE)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst + at),
            "l"(src + at), "r"(min(TAIL_COPY_PIECE, bytes - at)), "r"(bar)
            : "memory");
}

__device__ __forceinline__ void wait_for_rows(unsigned long long* copied) {
    const unsigned int bar = shared_address(copied);
    unsigned int done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar)
            : "memory");
}

// Every block of the grid reaches this call `target / gridDim.x`-th time before any leaves it.
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        unsigned int seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        } while (seen < target);
        __threadfence();
    }
    __syncthreads();
}

// x_proj: dbc[r] = W_x[r, :] . xc for rows r = blockIdx.x, + gridDim.x, ..., each row's chunks
// dealt over the block's threads. The first XP_ROWS rows' first XP_CHUNKS chunks of a thread
// are loaded before the kernel waits for in_proj (XProjWeights), the rest in the loop.
#define XP_ROWS 2
#define XP_CHUNKS 2

struct XProjWeights {
    uint4 v[XP_ROWS][XP_CHUNKS];
};

__device__ __forceinline__ void load_x_proj(const in_t* __restrict__ w_x, int rows, int cols, XProjWeights& w) {
    const int chunks = cols / CHUNK;
    const uint4* wv = reinterpret_cast<const uint4*>(w_x);
#pragma unroll
    for (int k = 0; k < XP_ROWS; ++k)
#pragma unroll
        for (int j = 0; j < XP_CHUNKS; ++j) {
            const int r = blockIdx.x + k * gridDim.x, c = threadIdx.x + j * TAIL_THREADS;
            if (r < rows && c < chunks) w.v[k][j] = load_weights(wv + (long long)r * chunks + c);
        }
}

__device__ __forceinline__ void x_proj_rows(const in_t* __restrict__ w_x, const XProjWeights& w,
                                            const float* __restrict__ xc, int rows, int cols,
                                            float* __restrict__ dbc) {
    const int chunks = cols / CHUNK;
    const uint4* wv = reinterpret_cast<const uint4*>(w_x);
    for (int r = blockIdx.x, k = 0; r < rows; r += gridDim.x, ++k) {
        float acc = 0.0f;
        for (int c = threadIdx.x, j = 0; c < chunks; c += TAIL_THREADS, ++j) {
            uint4 v;
            if (k < XP_ROWS && j < XP_CHUNKS) {
#pragma unroll
                for (int kk = 0; kk < XP_ROWS; ++kk)
#pragma unroll
                    for (int jj = 0; jj < XP_CHUNKS; ++jj)
                        if (kk == k && jj == j) v = w.v[kk][jj];
            } else {
                v = load_weights(wv + (long long)r * chunks + c);
            }
            float xv[CHUNK], wf[CHUNK];
            load_floats<true>(xc + c * CHUNK, xv);
            unpack(v, wf);
#pragma unroll
            for (int q = 0; q < CHUNK; ++q) acc += wf[q] * xv[q];
        }
        const float total = block_sum<TAIL_THREADS>(acc);
        if (threadIdx.x == 0) dbc[r] = total;
        __syncthreads();  // block_sum's array is free for the next row
    }
}

// h[r] += out_proj[r, :] . y' (+ bias[r]) for the block's rows, from the rows in shared memory:
// y' = y, or rmsnorm(y) * norm_w (t.norm_eps >= 0), staged first. A task is TAIL_ROWS rows by
// one of TAIL_PARTS column parts; the parts' sums are added in order.
__device__ __forceinline__ void out_proj_rows(const TailShared& sh, const TailArgs& t, const float* __restrict__ y,
                                              const float* __restrict__ norm_w, const float* __restrict__ bias,
                                              unsigned long long* copied, float* __restrict__ h) {
    const int chunks = t.cols / CHUNK, cols4 = t.cols / 4;
    const bool norm = t.norm_eps >= 0.0f;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < cols4; i += TAIL_THREADS) {
        float4 q = __ldcg(reinterpret_cast<const float4*>(y) + i);
        if (norm) {
            sq += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
            const float4 n = __ldg(reinterpret_cast<const float4*>(norm_w) + i);
            q.x *= n.x, q.y *= n.y, q.z *= n.z, q.w *= n.w;
        }
        sh.y[(i % (CHUNK / 4)) * chunks + i / (CHUNK / 4)] = q;
    }
    const float scale = norm ? rsqrtf(block_sum<TAIL_THREADS>(sq) / t.cols + t.norm_eps) : 1.0f;
    wait_for_rows(copied);
    __syncthreads();  // y' is staged

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = blockIdx.x * t.rows_per_block, rows = min(t.rows - r0, t.rows_per_block);
    const int per_part = (chunks + TAIL_PARTS - 1) / TAIL_PARTS;
    const int tasks = (rows + TAIL_ROWS - 1) / TAIL_ROWS * TAIL_PARTS;
    for (int task = warp; task < tasks; task += TAIL_WARPS) {
        const int g = task / TAIL_PARTS, part = task % TAIL_PARTS;
        const int c_end = min(chunks, (part + 1) * per_part);
        float acc[TAIL_ROWS] = {};
        for (int c = part * per_part + lane; c < c_end; c += 32) {
            float xv[CHUNK];
#pragma unroll
            for (int k = 0; k < CHUNK / 4; ++k) {
                const float4 q = sh.y[k * chunks + c];
                xv[4 * k] = q.x, xv[4 * k + 1] = q.y, xv[4 * k + 2] = q.z, xv[4 * k + 3] = q.w;
            }
#pragma unroll
            for (int r = 0; r < TAIL_ROWS; ++r) {
                float wf[CHUNK];
                unpack(sh.w[min(g * TAIL_ROWS + r, rows - 1) * chunks + c], wf);
#pragma unroll
                for (int k = 0; k < CHUNK; ++k) acc[r] += wf[k] * xv[k];
            }
        }
#pragma unroll
        for (int r = 0; r < TAIL_ROWS; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && g * TAIL_ROWS + r < rows) sh.parts[(g * TAIL_ROWS + r) * TAIL_PARTS + part] = s;
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += TAIL_THREADS) {
        float total = 0.0f;
#pragma unroll
        for (int p = 0; p < TAIL_PARTS; ++p) total += sh.parts[r * TAIL_PARTS + p];
        float val = total * scale;
        if (bias) val += bias[r0 + r];
        h[r0 + r] = __ldcg(h + r0 + r) + val;
    }
}

// Mamba-1's tail (batch 1): x_proj, the SSM step (as mamba1_ssm_step computes it, ROW_LANES
// lanes per channel) and out_proj with the residual add. `barrier` is this layer's counter.
extern "C" __global__ void __launch_bounds__(TAIL_THREADS, 1)
    mamba1_tail(const in_t* __restrict__ w_x, const in_t* __restrict__ w_out, const float* __restrict__ out_bias,
                const float* __restrict__ xc, const float* __restrict__ xz, const in_t* __restrict__ dt_w,
                const float* __restrict__ dt_bias, const float* __restrict__ a_neg, const float* __restrict__ d,
                float* __restrict__ dbc, float* __restrict__ const* states, int layer, Mamba1Args m, TailArgs t,
                unsigned int* __restrict__ barrier, float* __restrict__ y, float* __restrict__ h) {
    __shared__ unsigned long long copied;
    const int inputs = m.dt_rank + 2 * STATE_N;
    const TailShared sh = tail_shared(t, inputs);
    const int lane = threadIdx.x % ROW_LANES, per_block = TAIL_THREADS / ROW_LANES;
    const int first = min(blockIdx.x * per_block + threadIdx.x / ROW_LANES, m.d_inner - 1);
    float* layer_state = states[2 * layer + 1];
    // Before the wait: x_proj's first weights and the first channels' parameters and state,
    // then the copy of out_proj's rows.
    XProjWeights wx;
    load_x_proj(w_x, inputs, m.d_inner, wx);
    Mamba1Params p;
    load_mamba1_params(layer_state + (long long)first * STATE_N, dt_w, dt_bias, a_neg, d, first, m.dt_rank, lane, p);
    if (threadIdx.x == 0) start_row_copy(w_out, t, sh.w, &copied);
    wait_for_earlier_kernels();

    x_proj_rows(w_x, wx, xc, inputs, m.d_inner, dbc);
    grid_barrier(barrier, gridDim.x);

    for (int i = threadIdx.x; i < inputs; i += TAIL_THREADS) sh.inputs[i] = __ldcg(dbc + i);
    __syncthreads();
    const float* low = sh.inputs;
    const float* bv = low + m.dt_rank;
    const float* cv = bv + STATE_N;
    const DbcScales scale = dbc_scales(low, bv, cv, m.dt_rank, m.bc_eps, lane, ROW_LANES);
    for (int c0 = blockIdx.x * per_block; c0 < m.d_inner; c0 += gridDim.x * per_block) {
        const int ch = c0 + threadIdx.x / ROW_LANES;
        const bool active = ch < m.d_inner;
        const int c = active ? ch : m.d_inner - 1;
        float* state = layer_state + (long long)c * STATE_N;
        if (c0 != blockIdx.x * per_block)
            load_mamba1_params(state, dt_w, dt_bias, a_neg, d, c, m.dt_rank, lane, p);
        const float xi = __ldcg(xc + c), z = __ldcg(xz + m.d_inner + c);
        const float out = mamba1_channel_step(p, low, bv, cv, scale, dt_w, c, m.dt_rank, lane, xi, z, active, state);
        if (active && lane == 0) y[c] = out;
    }
    grid_barrier(barrier, 2 * gridDim.x);
    allow_next_kernel();  // every block has passed a barrier, so is resident: the next kernel may start

    out_proj_rows(sh, t, y, nullptr, out_bias, &copied, h);
}

// Mamba-2's tail (batch 1, the gate in the step and at most one norm group): the SSM step
// (as mamba2_ssm_step computes it) and out_proj of the normed y with the residual add.
extern "C" __global__ void __launch_bounds__(TAIL_THREADS, 1)
    mamba2_tail(const in_t* __restrict__ w_out, const float* __restrict__ out_bias, const float* __restrict__ norm_w,
                const float* __restrict__ xbc, const float* __restrict__ zxbcdt, const float* __restrict__ dt_bias,
                const float* __restrict__ a_neg, const float* __restrict__ d, float* __restrict__ const* states,
                int layer, Mamba2Args m, TailArgs t, unsigned int* __restrict__ barrier, float* __restrict__ y,
                float* __restrict__ h) {
    __shared__ unsigned long long copied;
    const int d_inner = m.heads * m.head_dim, inputs = 2 * m.groups * STATE_N;
    const TailShared sh = tail_shared(t, inputs);
    const int lane = threadIdx.x % ROW_LANES, per_block = TAIL_THREADS / ROW_LANES;
    float* layer_state = states[2 * layer + 1];
    // Before the wait: the first rows' state, then the copy of out_proj's rows.
    const int first = min(blockIdx.x * per_block + threadIdx.x / ROW_LANES, d_inner - 1);
    float s[STATE_PER_LANE];
    load_state(layer_state + (long long)first * STATE_N, lane, s);
    if (threadIdx.x == 0) start_row_copy(w_out, t, sh.w, &copied);
    wait_for_earlier_kernels();

    for (int i = threadIdx.x; i < inputs; i += TAIL_THREADS) sh.inputs[i] = __ldcg(xbc + d_inner + i);
    __syncthreads();
    for (int r0 = blockIdx.x * per_block; r0 < d_inner; r0 += gridDim.x * per_block) {
        const int hp_raw = r0 + threadIdx.x / ROW_LANES;
        const bool active = hp_raw < d_inner;
        const int hp = active ? hp_raw : d_inner - 1, head = hp / m.head_dim;
        const int g = head / (m.heads / m.groups);
        float* state = layer_state + (long long)hp * STATE_N;
        if (r0 != blockIdx.x * per_block) load_state(state, lane, s);
        const float xi = __ldcg(xbc + hp), dt_raw = __ldcg(zxbcdt + m.dt_offset + head);
        const float z = m.gate ? __ldcg(zxbcdt + hp) : 0.0f;
        const HeadParams hd = {__ldg(a_neg + head), __ldg(dt_bias + head), __ldg(d + head)};
        const float out = mamba2_row_step(s, sh.inputs + g * STATE_N, sh.inputs + (m.groups + g) * STATE_N, xi,
                                          dt_raw, z, hd, m, lane, active, state);
        if (active && lane == 0) y[hp] = out;
    }
    grid_barrier(barrier, gridDim.x);
    allow_next_kernel();  // every block has passed a barrier, so is resident: the next kernel may start

    out_proj_rows(sh, t, y, norm_w, out_bias, &copied, h);
}
