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

// 2. The state entering each segment, in place of the segment's own end state, and last_state. One (batch, channel, n) per thread; the segments are taken
// COMBINE_AHEAD at a time, their loads issued together.
#define COMBINE_AHEAD 16
extern "C" __global__ void selective_scan_combine(const in_t* __restrict__ x, ScanArgs s,
                                                  float* __restrict__ seg_state,
                                                  const float* __restrict__ seg_dt,
                                                  float* __restrict__ last_state) {
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
    last_state[e] = running;
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
//   1.-2. the forward's selective_scan_segments and _combine give the state entering each
//      segment (nothing of the (batch, dim, L, N) states is stored);
//   3. selective_scan_bwd_segments: each segment from a zero adjoint, walking down, gives its
//      own adjoint at its start, Lambda_k;
//   4. selective_scan_bwd_combine: the adjoint entering each segment from the right, from
//      g_last_state: lambda_end(k-1) = exp(A S_k) lambda_end(k) + Lambda_k; what reaches the
//      front is g_initial_state;
//   5. selective_scan_bwd: each segment again, its states recomputed forward from the entering
//      state into a per-thread array (at most SCAN_BWD_SEG + 1 states), then walked down with
//      the entering adjoint, writing g_u, g_delta, g_z per step. The A, D and delta_bias sums
//      go per (batch, segment) to parts [A (dim, N) | D (dim) | delta_bias (dim)], added in
//      order by sum_parts; the B and C sums over the warp's 32 channels (shuffles) go per
//      (batch, step, warp of channels) to b_parts / c_parts, added over a group's warps in
//      order by selective_scan_bwd_sum_bc. No float atomics: every run gives the same bits.
// Needs dim and dim / groups to be multiples of 32 (the launcher checks).

// go_t and the raw/processed step of one step of channel d.
struct BwdStep {
    float delta, dt, u, z, g;
};

__device__ __forceinline__ BwdStep load_bwd_step(const in_t* x, const ScanArgs& s,
                                                 const float* grad, long long row, int d,
                                                 float bias) {
    const long long at = row * s.dim + d;
    BwdStep st;
    st.delta = ld(x, s.delta + at) + bias;
    st.dt = s.softplus ? softplus(st.delta) : st.delta;
    st.u = ld(x, s.u + at);
    st.z = s.z >= 0 ? ld(x, s.z + at) : 0.0f;
    st.g = grad[at];
    return st;
}

// 3. Each segment's own adjoint at its start, from a zero adjoint at its end, into adj.
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
        const BwdStep st = load_bwd_step(x, s, grad, row, th.d, bias);
        const float go = s.z >= 0 ? st.g * silu(st.z) : st.g;
        const long long bc = (row * s.groups + th.g) * STATE_N;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n)
            lam[n] = exp2_approx(st.dt * a2[n]) * (lam[n] + go * ld(x, s.c + bc + n));
    }
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) adj[at + n] = lam[n];
}

// 4. The adjoint entering each segment from the right, in place of the segment's own, and
// g_initial_state (into grads at init_at, when given). One (batch, channel, n) per thread.
extern "C" __global__ void selective_scan_bwd_combine(const in_t* __restrict__ x, ScanArgs s,
                                                      const float* __restrict__ grad,
                                                      const float* __restrict__ seg_dt,
                                                      float* __restrict__ adj,
                                                      float* __restrict__ grads,
                                                      long long init_at) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b, d, n)
    if (e >= (long long)s.batch * s.dim * STATE_N) return;
    const int n = (int)(e % STATE_N);
    const long long bd = e / STATE_N;
    const int d = (int)(bd % s.dim), b = (int)(bd / s.dim);
    const float a2n = ld(x, s.a + (long long)d * STATE_N + n) * LOG2E;
    float running = grad[(long long)s.batch * s.len * s.dim + e];
    for (int k = s.segments - 1; k >= 0; --k) {
        const long long at = segment_state_at(s, b, k, d) + n;
        const float own = adj[at];
        adj[at] = running;
        running = exp2_approx(a2n * seg_dt[((long long)b * s.segments + k) * s.dim + d]) * running + own;
    }
    if (init_at >= 0) grads[init_at + e] = running;
}

// 5. The gradients of each segment's steps (see above). grads starts with g_u (batch, L, dim)
// and g_delta (batch, L, dim); g_z sits at gz_at (-1 without z).
extern "C" __global__ void __launch_bounds__(32 * SCAN_WARPS)
    selective_scan_bwd(const in_t* __restrict__ x, ScanArgs s, const float* __restrict__ grad,
                       const float* __restrict__ seg_state, const float* __restrict__ adj,
                       float* __restrict__ grads, long long gz_at, float* __restrict__ parts,
                       float* __restrict__ b_parts, float* __restrict__ c_parts) {
    const SegmentThread th = segment_thread(s);
    if (th.k >= s.segments) return;
    const int lane = threadIdx.x % 32, warps = s.dim / 32;
    float a2[STATE_N], lam[STATE_N], g_a[STATE_N];
    float hs[SCAN_BWD_SEG + 1][STATE_N];  // hs[i] = h_{t0 + i - 1}
    load_a2(x, s, th.d, a2);
    const long long at = segment_state_at(s, th.b, th.k, th.d);
#pragma unroll
    for (int n = 0; n < STATE_N; ++n) {
        hs[0][n] = seg_state[at + n];
        lam[n] = adj[at + n];
        g_a[n] = 0.0f;
    }
    const float bias = ld_or(x, s.delta_bias, th.d, 0.0f);
    const float skip = ld_or(x, s.d, th.d, 0.0f);
    for (int t = th.t0; t < th.t1; ++t) {
        const long long row = (long long)th.b * s.len + t;
        const BwdStep st = load_bwd_step(x, s, grad, row, th.d, bias);
        const long long bc = (row * s.groups + th.g) * STATE_N;
        const int i = t - th.t0;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n)
            hs[i + 1][n] = exp2_approx(st.dt * a2[n]) * hs[i][n] + st.dt * st.u * ld(x, s.b + bc + n);
    }
    float g_skip = 0.0f, g_bias = 0.0f;
    for (int t = th.t1 - 1; t >= th.t0; --t) {
        const long long row = (long long)th.b * s.len + t;
        const BwdStep st = load_bwd_step(x, s, grad, row, th.d, bias);
        const long long bc = (row * s.groups + th.g) * STATE_N;
        const int i = t - th.t0;
        float y = skip * st.u;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) y += ld(x, s.c + bc + n) * hs[i + 1][n];
        const float go = s.z >= 0 ? st.g * silu(st.z) : st.g;
        if (s.z >= 0) grads[gz_at + row * s.dim + th.d] = st.g * y * silu_grad(st.z);
        float lam_b = 0.0f, g_dt = 0.0f;
        const long long part_at = ((row * warps) + th.d / 32) * STATE_N;
#pragma unroll
        for (int n = 0; n < STATE_N; ++n) {
            const float bn = ld(x, s.b + bc + n), cn = ld(x, s.c + bc + n);
            const float decay = exp2_approx(st.dt * a2[n]);
            lam[n] += go * cn;
            const float carried = hs[i][n] * decay;  // h_{t-1} a_t
            g_a[n] += lam[n] * carried * st.dt;
            g_dt += lam[n] * (carried * a2[n] * (1.0f / LOG2E) + bn * st.u);
            lam_b += lam[n] * bn;
            const float gb = lane_group_sum(lam[n] * st.dt * st.u, 32);
            const float gc = lane_group_sum(go * hs[i + 1][n], 32);
            if (lane == n % 32) {
                b_parts[part_at + n] = gb;
                c_parts[part_at + n] = gc;
            }
            lam[n] *= decay;
        }
        grads[row * s.dim + th.d] = go * skip + st.dt * lam_b;
        const float g_delta = s.softplus ? g_dt / (1.0f + expf(-st.delta)) : g_dt;
        grads[(long long)s.batch * s.len * s.dim + row * s.dim + th.d] = g_delta;
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

// 6. g_B or g_C (batch, L, groups, N): the warps' partial sums (batch, L, dim / 32, N) added
// over the warps of each group in order. One (batch, step, group, n) per thread.
extern "C" __global__ void selective_scan_bwd_sum_bc(ScanArgs s, const float* __restrict__ part,
                                                     float* __restrict__ out) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b, t, g, n)
    if (e >= (long long)s.batch * s.len * s.groups * STATE_N) return;
    const int per_group = s.dim / s.groups / 32;
    const long long r = e / STATE_N;  // (b, t, g)
    const int n = (int)(e % STATE_N);
    float total = 0.0f;
    for (int j = 0; j < per_group; ++j) total += part[(r * per_group + j) * STATE_N + n];
    out[e] = total;
}
