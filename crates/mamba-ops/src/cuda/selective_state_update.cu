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
// entry (the launcher gives each lane about four), and the lanes add up C . S with shuffles.
// Each lane group takes ROW_STEPS consecutive rows of one sequence in turn, and computes Δ,
// exp(Δ A) (one value per head) and loads B, C only when the head changes, so that per-row
// overhead does not outweigh the state entries' own work. Grid: (blocks of row groups of one
// sequence, batch); the entries' loop is unrolled (STATE_N, ROW_LANES are constants).

struct StepArgs {
    long long state, x, dt, a, b, c, d, z, dt_bias;  // element offsets; -1 for an absent input
    int rows, heads, head_dim, groups, per_head, softplus;  // rows: H * P of one sequence
    float dt_lo, dt_hi;
};

#define PER_LANE ((STATE_N + ROW_LANES - 1) / ROW_LANES)

extern "C" __global__ void selective_state_update_fwd(const in_t* __restrict__ x, StepArgs s,
                                                      float* __restrict__ out) {
    const int group = blockIdx.x * (blockDim.x / ROW_LANES) + threadIdx.x / ROW_LANES;
    const int lane = threadIdx.x % ROW_LANES;
    const int b = blockIdx.y;
    const int heads_per_group = s.heads / s.groups;
    const long long state_out = (long long)s.rows * gridDim.y;  // after the outputs y
    int h = -1;
    float dt = 0.0f, head_decay = 0.0f, bv[PER_LANE], cv[PER_LANE];
#pragma unroll
    for (int step = 0; step < ROW_STEPS; ++step) {
        // Rows past the end compute on the last row and write nothing: every lane of the warp
        // must reach the shuffles.
        const bool active = group * ROW_STEPS + step < s.rows;
        const int hp = min(group * ROW_STEPS + step, s.rows - 1);  // h * P + p
        const int param = s.per_head ? hp / s.head_dim : hp;
        if (hp / s.head_dim != h) {
            h = hp / s.head_dim;
            const long long bg = (long long)b * s.groups + h / heads_per_group;
#pragma unroll
            for (int q = 0; q < PER_LANE; ++q) {
                const int n = lane + q * ROW_LANES;
                bv[q] = n < STATE_N ? ld(x, s.b + bg * STATE_N + n) : 0.0f;
                cv[q] = n < STATE_N ? ld(x, s.c + bg * STATE_N + n) : 0.0f;
            }
            if (s.per_head) {
                dt = process_dt(ld(x, s.dt + (long long)b * s.heads + h), ld_or(x, s.dt_bias, h, 0.0f),
                                s.softplus, s.dt_lo, s.dt_hi);
                head_decay = __expf(dt * ld(x, s.a + h));
            }
        }
        if (!s.per_head)
            dt = process_dt(ld(x, s.dt + (long long)b * s.rows + hp), ld_or(x, s.dt_bias, hp, 0.0f),
                            s.softplus, s.dt_lo, s.dt_hi);
        const long long row = (long long)b * s.rows + hp;  // (b, h, p)
        const float xi = ld(x, s.x + row);
        const float dtx = dt * xi;
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < PER_LANE; ++q) {
            const int n = lane + q * ROW_LANES;
            if (n >= STATE_N) break;
            const float decay =
                s.per_head ? head_decay : __expf(dt * ld(x, s.a + (long long)hp * STATE_N + n));
            const float next = decay * ld(x, s.state + row * STATE_N + n) + dtx * bv[q];
            if (active) out[state_out + row * STATE_N + n] = next;
            sum += next * cv[q];
        }
        sum = lane_group_sum(sum, ROW_LANES);
        if (active && lane == 0) {
            float y = sum + ld_or(x, s.d, param, 0.0f) * xi;
            if (s.z >= 0) y *= silu(ld(x, s.z + row));
            out[row] = y;
        }
    }
}
