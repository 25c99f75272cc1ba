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
// A channel's state h (N values) lives in registers and the sequence is walked in order; it is
// cut into `segments` consecutive pieces walked side by side, in three kernels:
//   1. selective_scan_segments: each segment k of each channel from a zero state, giving its own
//      end state H_k and total step S_k = sum of dt (the segment multiplies an entering state by
//      exp(A * S_k));
//   2. selective_scan_combine: the state entering each segment, one (batch, channel, n) per
//      thread: h_in(0) = initial_state, h_in(k+1) = exp(A * S_k) * h_in(k) + H_k; the state
//      after the last segment is last_state;
//   3. selective_scan_outputs: each segment again from h_in(k), now writing the outputs.
// Only the segments' end states (batch, segments, dim, N) pass through device memory, never the
// (batch, dim, L, N) states; the inputs are read twice.
//
// In kernels 1 and 3 a warp is 32 adjacent channels at the same step of one segment, so that
// u, delta, z and out move as whole 128-byte rows and every lane reads the same B and C row
// (one broadcast per load); a block holds SCAN_WARPS segments. Grid: (dim / 32, segments /
// SCAN_WARPS, batch). STATE_N and SCAN_WARPS are defined by the launcher (launch.rs).

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
// WRITE, also y_t = C_t . h_t + D u, gated, into out.
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

// Channel, segment and steps of a thread of kernels 1 and 3.
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

// 2. The state entering each segment, in place of the segment's own end state, and last_state
// (in out, after the outputs). One (batch, channel, n) per thread; the segments are taken
// COMBINE_AHEAD at a time, their loads issued together.
#define COMBINE_AHEAD 16
extern "C" __global__ void selective_scan_combine(const in_t* __restrict__ x, ScanArgs s,
                                                  float* __restrict__ seg_state,
                                                  const float* __restrict__ seg_dt,
                                                  float* __restrict__ out) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b, d, n)
    if (e >= (long long)s.batch * s.dim * STATE_N) return;
    const int n = (int)(e % STATE_N);
    const long long bd = e / STATE_N;
    const int d = (int)(bd % s.dim), b = (int)(bd / s.dim);
    const float a2n = ld(x, s.a + (long long)d * STATE_N + n) * LOG2E;
    float running = ld_or(x, s.initial_state, e, 0.0f);
    for (int k0 = 0; k0 < s.segments; k0 += COMBINE_AHEAD) {
        float own[COMBINE_AHEAD], decay[COMBINE_AHEAD];
#pragma unroll
        for (int j = 0; j < COMBINE_AHEAD; ++j) {
            if (k0 + j >= s.segments) break;
            own[j] = seg_state[segment_state_at(s, b, k0 + j, d) + n];
            decay[j] = exp2_approx(a2n * seg_dt[((long long)b * s.segments + k0 + j) * s.dim + d]);
        }
#pragma unroll
        for (int j = 0; j < COMBINE_AHEAD; ++j) {
            if (k0 + j >= s.segments) break;
            seg_state[segment_state_at(s, b, k0 + j, d) + n] = running;
            running = decay[j] * running + own[j];
        }
    }
    out[(long long)s.batch * s.len * s.dim + e] = running;
}

// 3. Each segment again from its entering state, writing the outputs.
extern "C" __global__ void __launch_bounds__(32 * SCAN_WARPS)
    selective_scan_outputs(const in_t* __restrict__ x, ScanArgs s,
                           const float* __restrict__ seg_state, float* __restrict__ out) {
    const SegmentThread th = segment_thread(s);
    if (!th.active || th.k >= s.segments) return;
    float a2[STATE_N], h[STATE_N];
    load_a2(x, s, th.d, a2);
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) h[n] = seg_state[at + n];
    scan_steps<true>(x, s, th.b, th.d, th.g, th.t0, th.t1, a2, h, ld_or(x, s.delta_bias, th.d, 0.0f),
                     ld_or(x, s.d, th.d, 0.0f), out);
}
