// One recurrent step of the selective SSM (decoding one token), heads form (compiled with
// STATE_N = N and ROW_LANES lanes per state row, a power of two up to 32):
//
//   dt'        = clamp(softplus(dt[b,h,p] + dt_bias[h,p]), lo, hi)       (softplus optional)
//   S[b,h,p,:] = exp(dt' * A[h,p,:]) * S[b,h,p,:] + dt' * x[b,h,p] * B[b,g(h),:]
//   y[b,h,p]   = S[b,h,p,:] . C[b,g(h),:] + D[h,p] * x[b,h,p]
//   y          = y * silu(z[b,h,p])                                      (gate optional)
//
// with g(h) = h / (heads / groups). Mamba-1 is the case head_dim = 1. With per_head set, A, dt,
// D and dt_bias hold one value per head (A: (H), dt: (batch, H), D, dt_bias: (H)); otherwise
// A: (H, P, N), dt: (batch, H, P), D, dt_bias: (H, P). state: (batch, H, P, N); x, z: (batch, H, P);
// B, C: (batch, G, N). Output buffer: [y (batch, H, P) | new state (batch, H, P, N)].
//
// ROW_LANES adjacent lanes share one state row (b, h, p): each updates every ROW_LANES-th state
// entry, and the lanes add up C . S with shuffles.

struct StepArgs {
    long long state, x, dt, a, b, c, d, z, dt_bias;  // element offsets; -1 for an absent input
    int rows, heads, head_dim, groups, per_head, softplus;
    float dt_lo, dt_hi;
};

extern "C" __global__ void selective_state_update_fwd(const in_t* __restrict__ x, StepArgs s,
                                                      float* __restrict__ out) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long row = thread / ROW_LANES;  // (b, h, p)
    const int lane = (int)(thread % ROW_LANES);
    const bool active = row < s.rows;
    float sum = 0.0f, dt = 0.0f, xi = 0.0f;
    int param = 0;
    if (active) {
        const int p = (int)(row % s.head_dim);
        const long long bh = row / s.head_dim;
        const int h = (int)(bh % s.heads);
        const long long b = bh / s.heads;
        const long long bg = b * s.groups + h / (s.heads / s.groups);
        param = s.per_head ? h : h * s.head_dim + p;
        const long long dt_at = b * (s.per_head ? s.heads : (long long)s.heads * s.head_dim) + param;
        dt = process_dt(ld(x, s.dt + dt_at), ld_or(x, s.dt_bias, param, 0.0f), s.softplus, s.dt_lo,
                        s.dt_hi);
        xi = ld(x, s.x + row);
        const float dtx = dt * xi;
        for (int n = lane; n < STATE_N; n += ROW_LANES) {
            const float a = s.per_head ? ld(x, s.a + h) : ld(x, s.a + (long long)param * STATE_N + n);
            const float next = __expf(dt * a) * ld(x, s.state + row * STATE_N + n) +
                               dtx * ld(x, s.b + bg * STATE_N + n);
            out[s.rows + row * STATE_N + n] = next;
            sum += next * ld(x, s.c + bg * STATE_N + n);
        }
    }
    sum = lane_group_sum(sum, ROW_LANES);
    if (active && lane == 0) {
        float y = sum + ld_or(x, s.d, param, 0.0f) * xi;
        if (s.z >= 0) y *= silu(ld(x, s.z + row));
        out[row] = y;
    }
}
