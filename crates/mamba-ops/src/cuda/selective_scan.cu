// Mamba-1 selective scan on token-major inputs (compiled with STATE_N = N):
//
//   dt_t  = softplus(delta[b,t,d] + delta_bias[d])                      (softplus optional)
//   h_t   = exp(dt_t * A[d,:]) * h_{t-1} + dt_t * u[b,t,d] * B[b,t,g(d),:]
//   y_t   = C[b,t,g(d),:] . h_t + D[d] * u[b,t,d]
//   out   = y_t * silu(z[b,t,d])                                         (gate optional)
//
// with g(d) = d / (dim / groups). Layouts: u, delta, z, out: (batch, L, dim); A: (dim, N);
// B, C: (batch, L, groups, N); D, delta_bias: (dim); initial_state, last_state: (batch, dim, N).
//
// Forward (selective_scan_chunked): one kernel; the sequence is walked in chunks of
// SCAN_CHUNK = 32 * SCAN_ITEMS steps and the (batch, dim, L, N) states never leave registers.
// A block is SCAN_CHANNELS warps of one sequence, warp w taking channel blockIdx.x *
// SCAN_CHANNELS + w (all of one group), and lane l steps l * SCAN_ITEMS ... + SCAN_ITEMS - 1
// of the chunk. The recurrence is a scan of the pairs (a_t, b_t) = (exp(dt_t A_n), dt_t u_t
// B_t,n) under (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2): for each n the lane composes its
// own steps in order, the warp composes the lanes' totals with shuffles (Hillis-Steele), and
// the state carried from the previous chunk enters through the composed prefix, so that every
// exp(dt A) is computed once. Each chunk's delta, u, z (SCAN_CHANNELS columns) and B, C (N
// columns of the block's group) are first copied from their token-major rows into shared
// memory as one column per channel or n (coalesced reads, each B / C row read once for all the
// block's channels), the next chunk's loads issued right after; the outputs go back the same
// way. Short sequences of a large batch go instead to selective_scan_sequential (a thread per
// channel), which the launcher picks where it measured faster.

// Backward (below) cuts each channel's sequence into `segments` consecutive pieces walked side
// by side. The state entering each segment comes from two of its kernels (the list before the
// backward's kernels gives all of them and their order):
//   - selective_scan_segments: each segment k of each channel from a zero state, giving its own
//     end state H_k and total step S_k = sum of dt (the segment multiplies an entering state by
//     exp(A * S_k));
//   - selective_scan_combine: the state entering each segment, h_in(0) = initial_state,
//     h_in(k+1) = exp(A * S_k) * h_in(k) + H_k, the segments cut into runs walked side by side
//     (combine_segments); the backward's adjoint the same way, from the end, in the same launch.
// Only the segments' end states (batch, segments, dim, N) pass through device memory.
//
// In the segment kernels a warp is 32 adjacent channels at the same step of one segment, so
// that u, delta and z move as whole 128-byte rows and every lane reads the same B and C row
// (one broadcast per load); a block holds SCAN_WARPS segments. Grid: (dim / 32, segments /
// SCAN_WARPS, batch). STATE_N and SCAN_WARPS are defined by the launcher (launch.rs), and for
// the forward's variant the chunk's shape (ScanChunk::defines).

#define LOG2E 1.4426950408889634f

struct ScanArgs {
    // Element offsets of the inputs in the packed buffer; -1 for an absent optional input.
    long long u, delta, a, b, c, d, z, delta_bias, initial_state;
    int batch, len, dim, groups, softplus, segments, segment_len;
};

// 2^x for the decays (x <= 0): the hardware approximation, relative error about 2^-22.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// softplus(x) = max(x, 0) + log1p(t) with t = exp(-|x|) in (0, 1], without a branch:
// log1p(t) = 2 atanh(s) = 2 (s + s^3 / 3 + s^5 / 5 + ...) with s = t / (2 + t) <= 1/3, seven
// terms (the next is below 2e-8 of the sum). Above 20 the log1p term is below x's last place,
// so x comes out as PyTorch's softplus gives it. Fewer instructions than log1pf(expf(x)) and its
// branches; for the chunked kernel and the backward's gradient kernel (the sequential forward
// measured slower with a similar form, the backward's segment walks slower with this one).
__device__ __forceinline__ float softplus_branchless(float x) {
    const float t = exp2_approx(-fabsf(x) * LOG2E);
    const float s = __fdividef(t, 2.0f + t), s2 = s * s;
    float p = 2.0f / 13.0f;
    p = fmaf(p, s2, 2.0f / 11.0f);
    p = fmaf(p, s2, 2.0f / 9.0f);
    p = fmaf(p, s2, 2.0f / 7.0f);
    p = fmaf(p, s2, 2.0f / 5.0f);
    p = fmaf(p, s2, 2.0f / 3.0f);
    p = fmaf(p, s2, 2.0f);
    return fmaf(p, s, fmaxf(x, 0.0f));
}

// The STATE_N values of a B or C row from element i of the packed inputs. (Loading them four at
// a time, where aligned, measured slower on the H200: 385 -> 394 us f32, 407 -> 486 us bf16 for
// the backward at d 1536; more registers per thread.)
__device__ __forceinline__ void load_state_row(const in_t* __restrict__ x, long long i, float (&v)[STATE_N]) {
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) v[n] = ld(x, i + n);
}

// The per-channel inputs of one step: raw delta, u and (optionally) z, loaded one step ahead
// of their use so that the loads overlap the previous step's arithmetic.
struct ScanStep {
    float delta, u, z;
};

__device__ __forceinline__ ScanStep load_step(const in_t* x, const ScanArgs& s, long long row, int d,
                                              bool with_z) {
    const long long at = row * s.dim + d;
    ScanStep step;
    step.delta = ld(x, s.delta + at);
    step.u = ld(x, s.u + at);
    step.z = (with_z && s.z >= 0) ? ld(x, s.z + at) : 0.0f;
    return step;
}

// Steps t0 <= t < t1 of channel d from state h, in order: h_t = exp(dt A) h + dt u B_t. With
// WRITE, also y_t = C_t . h_t + D u, gated, into out. Returns the sum of the steps' dt.
template <bool WRITE>
__device__ __forceinline__ float scan_steps(const in_t* __restrict__ x, const ScanArgs& s, int b, int d,
                                            int g, int t0, int t1, const float (&a2)[STATE_N],
                                            float (&h)[STATE_N], float bias, float skip,
                                            float* __restrict__ out) {
    float dt_sum = 0.0f;
    ScanStep next = t0 < t1 ? load_step(x, s, (long long)b * s.len + t0, d, WRITE) : ScanStep{};
    for (int t = t0; t < t1; ++t) {
        const long long row = (long long)b * s.len + t;
        const ScanStep step = next;
        if (t + 1 < t1) next = load_step(x, s, row + 1, d, WRITE);
        float dt = step.delta + bias;
        if (s.softplus) dt = softplus(dt);
        dt_sum += dt;
        const float du = dt * step.u;
        const long long bc = (row * s.groups + g) * STATE_N;
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // C . h in four independent sums
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            h[n] = exp2_approx(dt * a2[n]) * h[n] + du * ld(x, s.b + bc + n);
            if (WRITE) part[n % 4] += ld(x, s.c + bc + n) * h[n];
        }
        if (WRITE) {
            float y = (part[0] + part[1]) + (part[2] + part[3]) + skip * step.u;
            if (s.z >= 0) y *= silu(step.z);
            out[row * s.dim + d] = y;
        }
    }
    return dt_sum;
}

// Channel, segment and steps of a thread of the segment kernels.
struct SegmentThread {
    int b, d, g, k, t0, t1;
    bool active;
};

__device__ __forceinline__ SegmentThread segment_thread(const ScanArgs& s) {
    SegmentThread th;
    th.b = blockIdx.z;
    th.d = blockIdx.x * 32 + threadIdx.x % 32;
    th.k = blockIdx.y * SCAN_WARPS + threadIdx.x / 32;
    th.active = th.d < s.dim;
    th.g = th.active ? th.d / (s.dim / s.groups) : 0;
    th.t0 = min(s.len, th.k * s.segment_len);
    th.t1 = min(s.len, th.t0 + s.segment_len);
    return th;
}

// Where segment k's state of channel d sits in the (batch, segments, dim, N) scratch.
__device__ __forceinline__ long long segment_state_at(const ScanArgs& s, int b, int k, int d) {
    return (((long long)b * s.segments + k) * s.dim + d) * STATE_N;
}

// A[d,:] * log2(e), so that exp(dt * A) = exp2(dt * a2).
__device__ __forceinline__ void load_a2(const in_t* x, const ScanArgs& s, int d, float (&a2)[STATE_N]) {
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) a2[n] = ld(x, s.a + (long long)d * STATE_N + n) * LOG2E;
}

// 1. Each segment alone: its end state H_k into seg_state, its step sum S_k into seg_dt.
extern "C" __global__ void __launch_bounds__(32 * SCAN_WARPS)
    selective_scan_segments(const in_t* __restrict__ x, ScanArgs s, float* __restrict__ seg_state,
                            float* __restrict__ seg_dt) {
    const SegmentThread th = segment_thread(s);
    if (!th.active || th.k >= s.segments) return;
    float a2[STATE_N], h[STATE_N];
    load_a2(x, s, th.d, a2);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) h[n] = 0.0f;
    const float bias = ld_or(x, s.delta_bias, th.d, 0.0f);
    const float dt_sum =
        scan_steps<false>(x, s, th.b, th.d, th.g, th.t0, th.t1, a2, h, bias, 0.0f, nullptr);
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) seg_state[at + n] = h[n];
    seg_dt[((long long)th.b * s.segments + th.k) * s.dim + th.d] = dt_sum;
}

// The running value entering each segment, in place of the segment's own value v(k), walking
// the segments forwards (BACKWARD false) or backwards, from `start`: v(k) is replaced by r, then
// r = exp(A_n S_k) r + v(k); returns r after the last segment. The walk is cut into
// COMBINE_PARTS runs of consecutive segments, one warp each, with a lane per (batch, channel,
// n) entry, so that a warp's loads of one segment are one row: each warp first composes its
// run into one map r -> alpha r + beta, then, from the maps of the runs before it (shared
// memory, added in order), walks the run again from the value entering it. COMBINE_AHEAD
// segments' loads are issued together. Every thread of the block must call it.
#define COMBINE_PARTS 8
#define COMBINE_AHEAD 16
template <bool BACKWARD>
__device__ __forceinline__ float combine_segments(const in_t* __restrict__ x, const ScanArgs& s,
                                                  const float* __restrict__ seg_dt, float* __restrict__ values,
                                                  long long e, bool active, float start) {
    __shared__ float alphas[COMBINE_PARTS][32], betas[COMBINE_PARTS][32];
    const int lane = threadIdx.x % 32, part = threadIdx.x / 32;
    const int n = (int)(e % STATE_N);
    const long long bd = e / STATE_N;
    const int d = (int)(bd % s.dim), b = (int)(bd / s.dim);
    const float a2n = active ? ld(x, s.a + (long long)d * STATE_N + n) * LOG2E : 0.0f;
    const int per = (s.segments + COMBINE_PARTS - 1) / COMBINE_PARTS;
    const int i0 = min(s.segments, part * per), i1 = min(s.segments, i0 + per);  // the run, in walking order
    const auto value_at = [&](int i) {
        const int k = BACKWARD ? s.segments - 1 - i : i;
        return segment_state_at(s, b, k, d) + n;
    };
    // The values and decays of walked positions i .. i + COMBINE_AHEAD - 1 (none past the run).
    const auto load_turn = [&](int i, float(&own)[COMBINE_AHEAD], float(&decay)[COMBINE_AHEAD]) {
#pragma unroll
        for (int j = 0; j < COMBINE_AHEAD; ++j) {
            const bool here = active && i + j < i1;
            const int k = BACKWARD ? s.segments - 1 - (i + j) : i + j;
            own[j] = here ? values[value_at(i + j)] : 0.0f;
            decay[j] = here ? exp2_approx(a2n * seg_dt[((long long)b * s.segments + k) * s.dim + d]) : 1.0f;
        }
    };
    float alpha = 1.0f, beta = 0.0f;
    for (int i = i0; i < i1; i += COMBINE_AHEAD) {
        float own[COMBINE_AHEAD], decay[COMBINE_AHEAD];
        load_turn(i, own, decay);
#pragma unroll
        for (int j = 0; j < COMBINE_AHEAD; ++j) {
            beta = fmaf(decay[j], beta, own[j]);
            alpha *= decay[j];
        }
    }
    alphas[part][lane] = alpha;
    betas[part][lane] = beta;
    __syncthreads();
    float running = start;
    for (int j = 0; j < part; ++j) running = fmaf(alphas[j][lane], running, betas[j][lane]);
    for (int i = i0; i < i1; i += COMBINE_AHEAD) {
        float own[COMBINE_AHEAD], decay[COMBINE_AHEAD];
        load_turn(i, own, decay);
#pragma unroll
        for (int j = 0; j < COMBINE_AHEAD; ++j) {
            if (active && i + j < i1) values[value_at(i + j)] = running;
            running = fmaf(decay[j], running, own[j]);
        }
    }
    return running;
}

// The (batch, channel, n) entry of a combine thread, and whether there is one.
__device__ __forceinline__ long long combine_entry(const ScanArgs& s, bool& active) {
    const long long e = (long long)blockIdx.x * 32 + threadIdx.x % 32;
    active = e < (long long)s.batch * s.dim * STATE_N;
    return active ? e : 0;
}

// Forward of short sequences (selective_scan_sequential): one thread per (sequence, channel),
// walking the steps in order with its N states in registers, the warp's 32 adjacent channels
// reading u, delta and z as whole rows and B, C as one broadcast row; the block's initial and
// last states pass through shared memory, so that they move as whole rows too. Grid
// (ceil(dim / SEQ_THREADS), batch); out as the chunked kernel's.
#if STATE_N <= SEQ_MOST_N
#define SEQ_THREADS 128
#define SEQ_ROW (STATE_N + 1)  // a thread's states in shared memory, padded against bank conflicts
extern "C" __global__ void __launch_bounds__(SEQ_THREADS)
    selective_scan_sequential(const in_t* __restrict__ x, ScanArgs s, float* __restrict__ out) {
    __shared__ float states[SEQ_THREADS * SEQ_ROW];
    const int b = blockIdx.y, d0 = blockIdx.x * SEQ_THREADS, d = d0 + threadIdx.x;
    const int channels = min(SEQ_THREADS, s.dim - d0);
    const long long block_states = ((long long)b * s.dim + d0) * STATE_N;
    for (int e = threadIdx.x; e < channels * STATE_N; e += SEQ_THREADS)
        states[e / STATE_N * SEQ_ROW + e % STATE_N] = ld_or(x, s.initial_state, block_states + e, 0.0f);
    __syncthreads();
    float h[STATE_N];
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) h[n] = d < s.dim ? states[threadIdx.x * SEQ_ROW + n] : 0.0f;
    if (d < s.dim) {
        float a2[STATE_N];
        load_a2(x, s, d, a2);
        scan_steps<true>(x, s, b, d, d / (s.dim / s.groups), 0, s.len, a2, h, ld_or(x, s.delta_bias, d, 0.0f),
                         ld_or(x, s.d, d, 0.0f), out);
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) states[threadIdx.x * SEQ_ROW + n] = h[n];
    __syncthreads();
    float* last_state = out + (long long)s.batch * s.len * s.dim + block_states;
    for (int e = threadIdx.x; e < channels * STATE_N; e += SEQ_THREADS)
        last_state[e] = states[e / STATE_N * SEQ_ROW + e % STATE_N];
}
#endif

// ---------------------------------------------------------------------------------------------
// Forward: selective_scan_chunked (see the top of the file). Compiled only in the forward's
// variant, which defines the chunk's shape.
#ifdef SCAN_ITEMS
#define SCAN_CHUNK (32 * SCAN_ITEMS)
#define SCAN_THREADS (32 * SCAN_CHANNELS)
// Values of a COLS-column slab of a chunk each thread stages.
#define STAGED(COLS) ((SCAN_CHUNK * (COLS) + SCAN_THREADS - 1) / SCAN_THREADS)

// Where step t of a chunk sits in its shared-memory column: 4 floats of skew after every 32
// steps, so that the first 8 lanes' reads of their SCAN_ITEMS steps (float4s at 16-byte
// multiples) fall in distinct banks. A lane's steps never straddle a skew. The column stride
// SCAN_COLUMN is 4 more than a multiple of 32, so that the staging's stores of 4 consecutive
// steps of 8 columns fall in distinct banks too.
__device__ __forceinline__ int chunk_pos(int t) { return t + 4 * (t / 32); }

// chunk_pos(t + r) - chunk_pos(t) for a thread's row t < rows_per_turn and r a multiple of
// rows_per_turn, both powers of two (so t % 32 + r % 32 < 32): a constant for each turn.
__device__ __forceinline__ constexpr int turn_pos(int r) { return r + 4 * (r / 32); }

// A chunk's inputs on their way to shared memory, held as loaded (bf16 widened only when
// stored, so that no instruction waits for the loads before the current chunk is computed) by
// the thread that loaded them: element k of each array is element e = threadIdx.x + k *
// SCAN_THREADS of the slab (step e / COLS, column e % COLS), so that consecutive threads read
// consecutive columns of a row.
struct ChunkSlabs {
    in_t delta[STAGED(SCAN_CHANNELS)], u[STAGED(SCAN_CHANNELS)], z[STAGED(SCAN_CHANNELS)];
    in_t b[STAGED(STATE_N)], c[STAGED(STATE_N)];
};

// Whether each thread of a COLS-column slab keeps one column, turn after turn: the block's
// threads cover whole rows, a power of two of them (so that `turn_pos` holds).
template <int COLS>
__device__ __forceinline__ constexpr bool column_per_thread() {
    return SCAN_THREADS % COLS == 0 && ((SCAN_THREADS / COLS) & (SCAN_THREADS / COLS - 1)) == 0;
}

// Whether row `row` of a COLS-column slab, as the threads' turns reach it, is inside the chunk:
// always when the turns cover the chunk exactly, else only the rows before SCAN_CHUNK (a short
// chunk of few columns takes fewer threads than the block has).
template <int COLS>
__device__ __forceinline__ bool in_chunk(int row) {
    return SCAN_CHUNK * COLS % SCAN_THREADS == 0 || row < SCAN_CHUNK;
}

// Steps [row0, row0 + SCAN_CHUNK) of columns col0 .. col0 + COLS of a token-major input (row
// stride `stride`, starting at element `offset`), zero past the `rows` rows there are. All the
// loads are issued before any is used.
template <int COLS>
__device__ __forceinline__ void load_slab(const in_t* __restrict__ x, long long offset, long long row0,
                                          int rows, int stride, int col0, in_t (&v)[STAGED(COLS)]) {
    const in_t* chunk = x + offset + row0 * stride + col0;
    if constexpr (column_per_thread<COLS>()) {  // one pointer steps down the thread's column
        constexpr int rows_per_turn = SCAN_THREADS / COLS;
        const int t = threadIdx.x / COLS;
        const in_t* p = chunk + (long long)t * stride + threadIdx.x % COLS;
        const long long step = (long long)rows_per_turn * stride;
#pragma unroll
        for (int k = 0; k < STAGED(COLS); ++k, p += step) {
            const int row = t + k * rows_per_turn;
            v[k] = in_chunk<COLS>(row) && row < rows ? *p : in_t(0);
        }
    } else {
#pragma unroll
        for (int k = 0; k < STAGED(COLS); ++k) {
            const int e = threadIdx.x + k * SCAN_THREADS, t = e / COLS;
            v[k] = e < SCAN_CHUNK * COLS && t < rows ? chunk[t * stride + e % COLS] : in_t(0);
        }
    }
}

// The slab into shared columns: column c, step t at dst[c * SCAN_COLUMN + chunk_pos(t)].
template <int COLS>
__device__ __forceinline__ void store_slab(const in_t (&v)[STAGED(COLS)], float* __restrict__ dst) {
    if constexpr (column_per_thread<COLS>()) {
        constexpr int rows_per_turn = SCAN_THREADS / COLS;
        const int t = threadIdx.x / COLS;
        float* col = dst + (threadIdx.x % COLS) * SCAN_COLUMN + chunk_pos(t);
#pragma unroll
        for (int k = 0; k < STAGED(COLS); ++k) {
            const int row = t + k * rows_per_turn;
            if (in_chunk<COLS>(row)) col[turn_pos(k * rows_per_turn)] = widen(v[k]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < STAGED(COLS); ++k) {
            const int e = threadIdx.x + k * SCAN_THREADS;
            if (e < SCAN_CHUNK * COLS) dst[(e % COLS) * SCAN_COLUMN + chunk_pos(e / COLS)] = widen(v[k]);
        }
    }
}

// The chunk from step t0 of sequence b, for the block's channels c0 ... and group g.
__device__ __forceinline__ void load_chunk(const in_t* __restrict__ x, const ScanArgs& s, int b, int t0,
                                           int c0, int g, ChunkSlabs& slabs) {
    const long long row0 = (long long)b * s.len + t0;
    const int rows = s.len - t0, bc_stride = s.groups * STATE_N;
    load_slab<SCAN_CHANNELS>(x, s.delta, row0, rows, s.dim, c0, slabs.delta);
    load_slab<SCAN_CHANNELS>(x, s.u, row0, rows, s.dim, c0, slabs.u);
    if (s.z >= 0) load_slab<SCAN_CHANNELS>(x, s.z, row0, rows, s.dim, c0, slabs.z);
    load_slab<STATE_N>(x, s.b + g * STATE_N, row0, rows, bc_stride, 0, slabs.b);
    load_slab<STATE_N>(x, s.c + g * STATE_N, row0, rows, bc_stride, 0, slabs.c);
}

// A lane's SCAN_ITEMS consecutive steps of a shared column, from step `first`.
__device__ __forceinline__ void read_items(const float* col, int first, float (&v)[SCAN_ITEMS]) {
    load_floats(col + chunk_pos(first), v);
}

__device__ __forceinline__ void write_items(float* col, int first, const float (&v)[SCAN_ITEMS]) {
    float* p = col + chunk_pos(first);
#pragma unroll
    for (int i = 0; i < SCAN_ITEMS; ++i) p[i] = v[i];
}

// The chunk's outputs from their shared columns (column c, step t at cols[c * SCAN_COLUMN +
// chunk_pos(t)]) to rows row0 ... of out, the first `rows` of them: each thread keeps one
// column, a pointer stepping down its rows.
__device__ __forceinline__ void store_outputs(const float* cols, float* __restrict__ out, long long row0,
                                              int rows, int dim, int c0) {
    constexpr int rows_per_turn = SCAN_THREADS / SCAN_CHANNELS;
    const int t = threadIdx.x / SCAN_CHANNELS, c = threadIdx.x % SCAN_CHANNELS;
    const float* col = cols + c * SCAN_COLUMN + chunk_pos(t);
    float* p = out + (row0 + t) * dim + c0 + c;
    const long long step = (long long)rows_per_turn * dim;
#pragma unroll
    for (int k = 0; k < SCAN_ITEMS; ++k, p += step)
        if (t + k * rows_per_turn < rows) *p = col[turn_pos(k * rows_per_turn)];
}

// State n over the warp's chunk: adds C_t,n h_t,n to y for the lane's steps and returns the
// state after the chunk, from `carry`, the state before it (both the same on every lane).
// a2n = A_n log2(e); dt, du = dt u, b, c: the lane's steps.
__device__ __forceinline__ float scan_state(float a2n, const float (&dt)[SCAN_ITEMS],
                                            const float (&du)[SCAN_ITEMS], const float (&b)[SCAN_ITEMS],
                                            const float (&c)[SCAN_ITEMS], float carry,
                                            float (&y)[SCAN_ITEMS]) {
    const int lane = threadIdx.x % 32;
    // The lane's own steps composed in order: after step i, h_i = a_i h_before + hh_i.
    float a[SCAN_ITEMS], hh[SCAN_ITEMS];
#pragma unroll
    for (int i = 0; i < SCAN_ITEMS; ++i) {
        a[i] = exp2_approx(dt[i] * a2n);
        hh[i] = du[i] * b[i];
    }
#pragma unroll
    for (int i = 1; i < SCAN_ITEMS; ++i) {
        hh[i] = fmaf(a[i], hh[i - 1], hh[i]);
        a[i] *= a[i - 1];
    }
    // The lanes' totals composed up the warp: lane l holds lanes 0 .. l.
    float wa = a[SCAN_ITEMS - 1], wh = hh[SCAN_ITEMS - 1];
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
        const float pa = __shfl_up_sync(0xffffffffu, wa, offset);
        const float ph = __shfl_up_sync(0xffffffffu, wh, offset);
        if (lane >= offset) {
            wh = fmaf(wa, ph, wh);
            wa *= pa;
        }
    }
    // The state entering the lane's first step: lanes 0 .. l - 1 applied to the carry.
    const float ea = __shfl_up_sync(0xffffffffu, wa, 1);
    const float eh = __shfl_up_sync(0xffffffffu, wh, 1);
    const float entering = lane == 0 ? carry : fmaf(ea, carry, eh);
#pragma unroll
    for (int i = 0; i < SCAN_ITEMS; ++i) y[i] = fmaf(c[i], fmaf(a[i], entering, hh[i]), y[i]);
    return __shfl_sync(0xffffffffu, fmaf(wa, carry, wh), 31);
}

// Grid (dim / SCAN_CHANNELS, batch); block SCAN_THREADS; dynamic shared memory (3 *
// SCAN_CHANNELS + 2 * STATE_N) * SCAN_COLUMN floats. out: [out (batch, L, dim) | last_state].
// Per-n values the same on every lane of a warp (A_n log2(e), the carried state) are held by
// lane n % 32 in slot n / 32 and broadcast when used. The next chunk's loads are issued before
// the current chunk is computed; at most 128 registers (blocks of 8 channels, two per
// multiprocessor, SCAN_BLOCKS_PER_SM = 2) spill a little but measured faster than one block.
// Blocks of 4 channels run three to a multiprocessor (168 registers) when that fills one wave.
#define SCAN_SLOTS ((STATE_N + 31) / 32)
#if SCAN_SLOTS == 1
#define SLOT(n) 0
#else
#define SLOT(n) ((n) / 32)
#endif
extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_BLOCKS_PER_SM)
    selective_scan_chunked(const in_t* __restrict__ x, ScanArgs s, float* __restrict__ out) {
    extern __shared__ float4 scan_shared[];
    float* delta_cols = reinterpret_cast<float*>(scan_shared);  // [channel][step]
    float* u_cols = delta_cols + SCAN_CHANNELS * SCAN_COLUMN;     // then the outputs
    float* z_cols = u_cols + SCAN_CHANNELS * SCAN_COLUMN;
    float* b_cols = z_cols + SCAN_CHANNELS * SCAN_COLUMN;         // [n][step]
    float* c_cols = b_cols + STATE_N * SCAN_COLUMN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y, c0 = blockIdx.x * SCAN_CHANNELS, d = c0 + warp;
    const int g = c0 / (s.dim / s.groups);
    const int first = lane * SCAN_ITEMS;
    float a2_lane[SCAN_SLOTS], carry_lane[SCAN_SLOTS];
#pragma unroll
    for (int k = 0; k < SCAN_SLOTS; ++k) {
        const int n = min(k * 32 + lane, STATE_N - 1);
        a2_lane[k] = ld(x, s.a + (long long)d * STATE_N + n) * LOG2E;
        carry_lane[k] = ld_or(x, s.initial_state, ((long long)b * s.dim + d) * STATE_N + n, 0.0f);
    }
    const float bias = ld_or(x, s.delta_bias, d, 0.0f), skip = ld_or(x, s.d, d, 0.0f);
    ChunkSlabs slabs;
    load_chunk(x, s, b, 0, c0, g, slabs);
    for (int t0 = 0; t0 < s.len; t0 += SCAN_CHUNK) {
        const int rows = s.len - t0;
        __syncthreads();  // the previous chunk's outputs are out of u_cols
        store_slab<SCAN_CHANNELS>(slabs.delta, delta_cols);
        store_slab<SCAN_CHANNELS>(slabs.u, u_cols);
        if (s.z >= 0) store_slab<SCAN_CHANNELS>(slabs.z, z_cols);
        store_slab<STATE_N>(slabs.b, b_cols);
        store_slab<STATE_N>(slabs.c, c_cols);
        __syncthreads();
        if (t0 + SCAN_CHUNK < s.len) load_chunk(x, s, b, t0 + SCAN_CHUNK, c0, g, slabs);
        float dt[SCAN_ITEMS], du[SCAN_ITEMS], y[SCAN_ITEMS];
        read_items(delta_cols + warp * SCAN_COLUMN, first, dt);
        read_items(u_cols + warp * SCAN_COLUMN, first, du);
#pragma unroll
        for (int i = 0; i < SCAN_ITEMS; ++i) {
            const float u = du[i];
            float v = dt[i] + bias;
            if (s.softplus) v = softplus_branchless(v);
            dt[i] = first + i < rows ? v : 0.0f;  // past the end: a = 1, b = 0
            du[i] = dt[i] * u;
            y[i] = skip * u;
        }
#pragma unroll 1
        for (int n = 0; n < STATE_N; ++n) {
            float bn[SCAN_ITEMS], cn[SCAN_ITEMS];
            read_items(b_cols + n * SCAN_COLUMN, first, bn);
            read_items(c_cols + n * SCAN_COLUMN, first, cn);
            const float a2n = __shfl_sync(0xffffffffu, a2_lane[SLOT(n)], n % 32);
            const float carry = __shfl_sync(0xffffffffu, carry_lane[SLOT(n)], n % 32);
            const float after = scan_state(a2n, dt, du, bn, cn, carry, y);
            if (lane == n % 32) carry_lane[SLOT(n)] = after;
        }
        if (s.z >= 0) {
            float z[SCAN_ITEMS];
            read_items(z_cols + warp * SCAN_COLUMN, first, z);
#pragma unroll
            for (int i = 0; i < SCAN_ITEMS; ++i) y[i] *= silu(z[i]);
        }
        write_items(u_cols + warp * SCAN_COLUMN, first, y);  // only this warp reads its column
        __syncthreads();
        store_outputs(u_cols, out, (long long)b * s.len + t0, rows, s.dim, c0);
    }
    float* last_state = out + (long long)s.batch * s.len * s.dim + ((long long)b * s.dim + d) * STATE_N;
#pragma unroll
    for (int k = 0; k < SCAN_SLOTS; ++k)
        if (k * 32 + lane < STATE_N) last_state[k * 32 + lane] = carry_lane[k];
}
#endif

// ---------------------------------------------------------------------------------------------
// Backward. With a_t = exp(dt_t A), go_t = g_out_t * silu(z_t) (g_out_t without z) and lambda_t
// the gradient of h_t (its own output term included), walking t down from L-1 with
// lambda = g_last_state:
//
//   lambda_t   = lambda + go_t C_t                 g_z_t   = g_out_t (C_t . h_t + D u_t) silu'(z_t)
//   g_C_t     += go_t h_t                          g_B_t  += lambda_t dt_t u_t
//   g_u_t      = go_t D + dt_t (lambda_t . B_t)    g_D    += go_t u_t
//   g_A       += lambda_t h_{t-1} a_t dt_t
//   g_dt_t     = sum_n lambda_t[n] (h_{t-1}[n] a_t[n] A[n] + B_t[n] u_t)
//   g_delta_t  = g_dt_t sigmoid(delta_t + delta_bias)   (g_dt_t without the softplus)
//   g_delta_bias += g_delta_t,   lambda = lambda_t a_t   (the gradient of h_{t-1} from steps >= t)
//
// and g_initial_state = lambda after step 0. B and C gradients add over the channels of a group.
// The adjoint lambda obeys the forward's recurrence backwards, lambda_{t-1} = a_t (lambda_t +
// go_t C_t), so it is split over the same segments (of at most SCAN_BWD_SEG steps):
//   1. the forward's selective_scan_segments gives each segment's end state from a zero state
//      (nothing of the (batch, dim, L, N) states is stored);
//   2. selective_scan_bwd_segments: each segment from a zero adjoint, walking down, gives its
//      own adjoint at its start, Lambda_k;
//   3. selective_scan_combine: the state entering each segment, and the adjoint entering each
//      segment from the right, from g_last_state: lambda_end(k-1) = exp(A S_k) lambda_end(k) +
//      Lambda_k; what reaches the front is g_initial_state (one launch for both walks: as two
//      launches they took 43.5-45 us under ncu at d 1536, as one 36.7-38);
//   4. selective_scan_bwd: each segment again, its states recomputed forward from the entering
//      state into a per-thread array (at most SCAN_BWD_SEG states), then walked down with
//      the entering adjoint, writing g_u, g_delta, g_z per step; h_{t-1} a_t is taken as
//      h_t - dt_t u_t B_t, so that only h_t is kept. The A, D and delta_bias sums
//      go per (batch, segment) to parts [A (dim, N) | D (dim) | delta_bias (dim)], added in
//      order by sum_parts; the B and C sums over the warp's 32 channels (transposed_sums) go
//      per (batch, step, warp of channels) to b_parts / c_parts, added over a group's warps in
//      order by selective_scan_bwd_sum_bc. No float atomics: every run gives the same bits.
// Needs dim and dim / groups to be multiples of 32 (the launcher checks).

// go_t and the raw/processed step of one step of channel d.
struct BwdStep {
    float delta, dt, u, z, g;
};

// One step's inputs; with BRANCHLESS, dt from softplus_branchless (the gradient kernel: 1-2 %
// faster whole backwards on the H200), else from softplus (the adjoint segments: the branchless
// form made them slower, 57.6 -> 72.1 us under ncu at d 1536 f32).
template <bool BRANCHLESS>
__device__ __forceinline__ BwdStep load_bwd_step(const in_t* x, const ScanArgs& s,
                                                 const float* grad, long long row, int d,
                                                 float bias) {
    const long long at = row * s.dim + d;
    BwdStep st;
    st.delta = ld(x, s.delta + at) + bias;
    st.dt = !s.softplus ? st.delta : BRANCHLESS ? softplus_branchless(st.delta) : softplus(st.delta);
    st.u = ld(x, s.u + at);
    st.z = s.z >= 0 ? ld(x, s.z + at) : 0.0f;
    st.g = grad[at];
    return st;
}

// 2. Each segment's own adjoint at its start, from a zero adjoint at its end, into adj.
extern "C" __global__ void __launch_bounds__(32 * SCAN_WARPS)
    selective_scan_bwd_segments(const in_t* __restrict__ x, ScanArgs s,
                                const float* __restrict__ grad, float* __restrict__ adj) {
    const SegmentThread th = segment_thread(s);
    if (!th.active || th.k >= s.segments) return;
    float a2[STATE_N], lam[STATE_N];
    load_a2(x, s, th.d, a2);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) lam[n] = 0.0f;
    const float bias = ld_or(x, s.delta_bias, th.d, 0.0f);
    for (int t = th.t1 - 1; t >= th.t0; --t) {
        const long long row = (long long)th.b * s.len + t;
        const BwdStep st = load_bwd_step<false>(x, s, grad, row, th.d, bias);
        const float go = s.z >= 0 ? st.g * silu(st.z) : st.g;
        float cv[STATE_N];
        load_state_row(x, s.c + (row * s.groups + th.g) * STATE_N, cv);
#pragma unroll
        for (int n = 0; n < STATE_N; ++n)
            lam[n] = exp2_approx(st.dt * a2[n]) * (lam[n] + go * cv[n]);
    }
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) adj[at + n] = lam[n];
}

// 3. In place of each segment's own values, the state entering it (from initial_state; the
// state after the last segment is not needed) and the adjoint entering it from the right
// (from g_last_state; what reaches the front into grads at init_at as g_initial_state, when
// given). Grid: (batch * dim * N / 32); block 32 * COMBINE_PARTS.
extern "C" __global__ void __launch_bounds__(32 * COMBINE_PARTS)
    selective_scan_combine(const in_t* __restrict__ x, ScanArgs s, const float* __restrict__ grad,
                           const float* __restrict__ seg_dt, float* __restrict__ seg_state,
                           float* __restrict__ adj, grad_t* __restrict__ grads, long long init_at) {
    bool active;
    const long long e = combine_entry(s, active);
    const float initial = active ? ld_or(x, s.initial_state, e, 0.0f) : 0.0f;
    combine_segments<false>(x, s, seg_dt, seg_state, e, active, initial);
    const float g_last = active ? grad[(long long)s.batch * s.len * s.dim + e] : 0.0f;
    const float front = combine_segments<true>(x, s, seg_dt, adj, e, active, g_last);
    if (active && init_at >= 0 && threadIdx.x / 32 == COMBINE_PARTS - 1) grads[init_at + e] = to_grad(front);
}

// One round of transposed_sums: lanes with bit HALF set keep the upper half of v[0 .. 2 HALF)
// and send the lower half to their partner, the others the reverse; v[i] becomes the kept value
// i plus the partner's.
template <int HALF>
__device__ __forceinline__ void fold_halves(float (&v)[32]) {
    const bool upper = threadIdx.x & HALF;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        const float lower = v[i], higher = v[i + HALF];
        v[i] = (upper ? higher : lower) + __shfl_xor_sync(0xffffffffu, upper ? lower : higher, HALF);
    }
}

// Over a warp's lanes, the sums of 32 values at once: lane l ends with the total of v[l] (31
// shuffles; one value at a time takes 5 each).
__device__ __forceinline__ float transposed_sums(float (&v)[32]) {
    fold_halves<16>(v);
    fold_halves<8>(v);
    fold_halves<4>(v);
    fold_halves<2>(v);
    fold_halves<1>(v);
    return v[0];
}

// One step's g_B and g_C shares (gb, gc per n) summed over the warp's 32 channels into b_parts /
// c_parts at `at`: with N = 16 the 32 sums at once, lane l writing g_B's n = l (l < 16) or g_C's
// n = l - 16; else each sum alone, written by lane n % 32.
__device__ __forceinline__ void store_bc_parts(const float (&gb)[STATE_N], const float (&gc)[STATE_N],
                                               float* __restrict__ b_parts, float* __restrict__ c_parts,
                                               long long at) {
    const int lane = threadIdx.x % 32;
    if constexpr (2 * STATE_N == 32) {
        float v[32];
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            v[n] = gb[n];
            v[STATE_N + n] = gc[n];
        }
        const float total = transposed_sums(v);
        (lane < STATE_N ? b_parts : c_parts)[at + lane % STATE_N] = total;
    } else {
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            const float b = lane_group_sum(gb[n], 32), c = lane_group_sum(gc[n], 32);
            if (lane == n % 32) {
                b_parts[at + n] = b;
                c_parts[at + n] = c;
            }
        }
    }
}

// 4. The gradients of each segment's steps (see above). grads starts with g_u (batch, L, dim)
// and g_delta (batch, L, dim); g_z sits at gz_at (-1 without z).
extern "C" __global__ void __launch_bounds__(32 * SCAN_WARPS)
    selective_scan_bwd(const in_t* __restrict__ x, ScanArgs s, const float* __restrict__ grad,
                       const float* __restrict__ seg_state, const float* __restrict__ adj,
                       grad_t* __restrict__ grads, long long gz_at, float* __restrict__ parts,
                       float* __restrict__ b_parts, float* __restrict__ c_parts) {
    const SegmentThread th = segment_thread(s);
    if (th.k >= s.segments) return;
    const int warps = s.dim / 32;
    float a2[STATE_N], lam[STATE_N], g_a[STATE_N], h[STATE_N];
    float hs[SCAN_BWD_SEG][STATE_N];  // hs[i] = h_{t0 + i}
    load_a2(x, s, th.d, a2);
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) {
        h[n] = seg_state[at + n];
        lam[n] = adj[at + n];
        g_a[n] = 0.0f;
    }
    const float bias = ld_or(x, s.delta_bias, th.d, 0.0f);
    const float skip = ld_or(x, s.d, th.d, 0.0f);
    // Four steps at a time, so that the next steps' loads are issued before this one's
    // arithmetic (H200, d 1536 / 5120: 2-3 % faster than the loop as written; by 2, and the
    // adjoint segments' loop by 2 or 4, no faster).
#pragma unroll 4
    for (int t = th.t0; t < th.t1; ++t) {
        const long long row = (long long)th.b * s.len + t;
        const BwdStep st = load_bwd_step<true>(x, s, grad, row, th.d, bias);
        float bv[STATE_N];
        load_state_row(x, s.b + (row * s.groups + th.g) * STATE_N, bv);
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            h[n] = exp2_approx(st.dt * a2[n]) * h[n] + st.dt * st.u * bv[n];
            hs[t - th.t0][n] = h[n];
        }
    }
    float g_skip = 0.0f, g_bias = 0.0f;
    for (int t = th.t1 - 1; t >= th.t0; --t) {
        const long long row = (long long)th.b * s.len + t;
        const BwdStep st = load_bwd_step<true>(x, s, grad, row, th.d, bias);
        const long long bc = (row * s.groups + th.g) * STATE_N;
        const int i = t - th.t0;
        const float du = st.dt * st.u;
        float bv[STATE_N], cv[STATE_N];
        load_state_row(x, s.b + bc, bv);
        load_state_row(x, s.c + bc, cv);
        float y = skip * st.u;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) y += cv[n] * hs[i][n];
        const float go = s.z >= 0 ? st.g * silu(st.z) : st.g;
        if (s.z >= 0) grads[gz_at + row * s.dim + th.d] = to_grad(st.g * y * silu_grad(st.z));
        // lam_b = lambda_t . B_t and lam_ha = sum_n lambda_t[n] h_{t-1}[n] a_t[n] A[n] log2(e), so
        // that g_dt = lam_ha / log2(e) + u lam_b (three operations fewer per n than the sum as
        // written above: 6-7 % fewer instructions, the kernel 209-210 -> 202-203 us under ncu).
        float lam_b = 0.0f, lam_ha = 0.0f, gb[STATE_N], gc[STATE_N];
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            const float bn = bv[n], cn = cv[n];
            const float decay = exp2_approx(st.dt * a2[n]);
            lam[n] += go * cn;
            const float carried = hs[i][n] - du * bn;  // h_{t-1} a_t = h_t - dt u B_t
            const float lam_carried = lam[n] * carried;
            g_a[n] += lam_carried * st.dt;
            lam_ha += lam_carried * a2[n];
            lam_b += lam[n] * bn;
            gb[n] = lam[n] * du;
            gc[n] = go * hs[i][n];
            lam[n] *= decay;
        }
        store_bc_parts(gb, gc, b_parts, c_parts, ((row * warps) + th.d / 32) * STATE_N);
        grads[row * s.dim + th.d] = to_grad(go * skip + st.dt * lam_b);
        const float g_dt = lam_ha * (1.0f / LOG2E) + st.u * lam_b;
        const float g_delta = s.softplus ? __fdividef(g_dt, 1.0f + exp2_approx(-st.delta * LOG2E)) : g_dt;
        grads[(long long)s.batch * s.len * s.dim + row * s.dim + th.d] = to_grad(g_delta);
        g_skip += go * st.u;
        g_bias += g_delta;
    }
    const long long width = (long long)s.dim * STATE_N + 2LL * s.dim;
    const long long p = ((long long)th.b * s.segments + th.k) * width;
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) parts[p + (long long)th.d * STATE_N + n] = g_a[n];
    parts[p + (long long)s.dim * STATE_N + th.d] = g_skip;
    parts[p + (long long)s.dim * STATE_N + s.dim + th.d] = g_bias;
}

// 5. g_B or g_C (batch, L, groups, N): the warps' partial sums (batch, L, dim / 32, N) added
// over the warps of each group in order. One (batch, step, group, n) per thread.
extern "C" __global__ void selective_scan_bwd_sum_bc(ScanArgs s, const float* __restrict__ part,
                                                     grad_t* __restrict__ out) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b, t, g, n)
    if (e >= (long long)s.batch * s.len * s.groups * STATE_N) return;
    const int per_group = s.dim / s.groups / 32;
    const long long r = e / STATE_N;  // (b, t, g)
    const int n = (int)(e % STATE_N);
    float total = 0.0f;
    for (int j = 0; j < per_group; ++j) total += part[(r * per_group + j) * STATE_N + n];
    out[e] = to_grad(total);
}
