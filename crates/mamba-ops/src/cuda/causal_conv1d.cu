// Depthwise causal convolution over time (compiled with CONV_W = W), and its decoding update.
//
// Forward: with xx = concat(initial_states, x) along time (W-1 + L columns per row (b, d)),
//   out[b,d,t] = act(bias[d] + sum_{k<W} weight[d,k] * xx[b,d,t+k])
//   final_states[b,d,j] = xx[b,d,L+j],  j < W-1
// act is silu or the identity. Layouts: x, out: (batch, dim, L); weight: (dim, W);
// initial_states, final_states: (batch, dim, W-1). Output buffer: [out | final_states].
//
// Each thread computes CONV_ITEMS consecutive outputs of one row from a window of
// CONV_ITEMS + W - 1 inputs held in registers. Grid: (rows, tiles of the row). CONV_W and
// CONV_ITEMS are defined by the launcher (launch.rs).

struct ConvArgs {
    long long x, weight, bias, initial_states;  // element offsets; -1 for an absent input
    int rows, dim, len, silu;
};

// xx[row, W-1 + p]: the input at time p of the row, reaching into initial_states (or zeros)
// for p < 0.
__device__ __forceinline__ float conv_input(const in_t* x, const ConvArgs& s, long long row, int p) {
    if (p >= 0) return ld(x, s.x + row * s.len + p);
    return ld_or(x, s.initial_states, row * (CONV_W - 1) + (CONV_W - 1) + p, 0.0f);
}

extern "C" __global__ void causal_conv1d_fwd(const in_t* __restrict__ x, ConvArgs s,
                                             float* __restrict__ out) {
    const long long row = blockIdx.x;
    const int d = (int)(row % s.dim);
    const int t0 = (blockIdx.y * blockDim.x + threadIdx.x) * CONV_ITEMS;
    if (blockIdx.y == 0 && threadIdx.x < CONV_W - 1) {
        const int j = threadIdx.x;
        out[(long long)s.rows * s.len + row * (CONV_W - 1) + j] =
            conv_input(x, s, row, s.len - (CONV_W - 1) + j);
    }
    if (t0 >= s.len) return;
    float w[CONV_W], window[CONV_ITEMS + CONV_W - 1];
#pragma unroll
    for (int k = 0; k < CONV_W; ++k) w[k] = ld(x, s.weight + (long long)d * CONV_W + k);
#pragma unroll
    for (int i = 0; i < CONV_ITEMS + CONV_W - 1; ++i) {
        const int p = t0 - (CONV_W - 1) + i;
        window[i] = p < s.len ? conv_input(x, s, row, p) : 0.0f;
    }
    const float bias = ld_or(x, s.bias, d, 0.0f);
#pragma unroll
    for (int i = 0; i < CONV_ITEMS; ++i) {
        if (t0 + i >= s.len) break;
        float acc = bias;
#pragma unroll
        for (int k = 0; k < CONV_W; ++k) acc += w[k] * window[i + k];
        out[row * s.len + t0 + i] = s.silu ? silu(acc) : acc;
    }
}

// Decoding update: per row, win = concat(conv_state, x) (S + T columns);
//   out[b,d,t] = act(bias[d] + sum_{k<W} weight[d,k] * win[S + t + 1 - W + k]),  t < T
//   conv_state_out[b,d,j] = win[T + j],  j < S
// Layouts: conv_state: (batch, dim, S) oldest first; x, out: (batch, dim, T).
// Output buffer: [out | conv_state_out]. One thread per row.

struct ConvUpdateArgs {
    long long state, x, weight, bias;  // element offsets; -1 for an absent bias
    int rows, dim, state_len, steps, silu;
};

__device__ __forceinline__ float update_window(const in_t* x, const ConvUpdateArgs& s,
                                               long long row, int i) {
    return i < s.state_len ? ld(x, s.state + row * s.state_len + i)
                           : ld(x, s.x + row * s.steps + (i - s.state_len));
}

extern "C" __global__ void causal_conv1d_update_fwd(const in_t* __restrict__ x, ConvUpdateArgs s,
                                                    float* __restrict__ out) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= s.rows) return;
    const int d = (int)(row % s.dim);
    float w[CONV_W];
#pragma unroll
    for (int k = 0; k < CONV_W; ++k) w[k] = ld(x, s.weight + (long long)d * CONV_W + k);
    const float bias = ld_or(x, s.bias, d, 0.0f);
    for (int t = 0; t < s.steps; ++t) {
        float acc = bias;
#pragma unroll
        for (int k = 0; k < CONV_W; ++k)
            acc += w[k] * update_window(x, s, row, s.state_len + t + 1 - CONV_W + k);
        out[row * s.steps + t] = s.silu ? silu(acc) : acc;
    }
    for (int j = 0; j < s.state_len; ++j)
        out[(long long)s.rows * s.steps + row * s.state_len + j] = update_window(x, s, row, s.steps + j);
}

// Backward. With pre[t] = bias + sum_k weight[k] * xx[t+k] and out = act(pre):
//
//   g_pre[t]   = g_out[t] * silu'(pre[t])         (g_out[t] without the activation)
//   g_xx[q]    = sum_{k<W, 0<=q-k<L} weight[k] * g_pre[q-k]  +  g_final[q-L] (q >= L)
//   g_x[t]     = g_xx[t + W-1],   g_initial_states[j] = g_xx[j]   (j < W-1)
//   g_weight[k] = sum_{b,t} g_pre[t] * xx[t+k],   g_bias = sum_{b,t} g_pre[t]
//
// grad_out: [g_out (batch, dim, L) | g_final (batch, dim, W-1)]. grads: [g_x (batch, dim, L) |
// g_weight (dim, W) | g_bias (dim) if bias | g_initial_states (batch, dim, W-1) if given]; the
// weight and bias gradients are written by sum_parts.
// Grid (rows, tiles) as the forward: a thread owns CONV_ITEMS consecutive times t0.. of one row;
// it recomputes g_pre over t0 .. t0+CONV_ITEMS+W-2 (its g_x needs W-1 later steps) from a window
// of x in registers, and adds g_pre * xx for its own times only. The block sums those over its
// threads (shuffles, then warps in order) into parts[(b * tiles + tile), :] laid out as
// [g_weight (dim, W) | g_bias (dim)]; sum_parts adds the (b, tile) parts in order.

// g_pre at time t of the row (0 <= t < L), from global memory: for the few initial-state terms.
__device__ __forceinline__ float conv_g_pre(const in_t* x, const ConvArgs& s, const float* grad_out,
                                            long long row, int d, int t) {
    float pre = ld_or(x, s.bias, d, 0.0f);
#pragma unroll
    for (int k = 0; k < CONV_W; ++k)
        pre += ld(x, s.weight + (long long)d * CONV_W + k) * conv_input(x, s, row, t - (CONV_W - 1) + k);
    const float g = grad_out[row * s.len + t];
    return s.silu ? g * silu_grad(pre) : g;
}

extern "C" __global__ void causal_conv1d_bwd(const in_t* __restrict__ x, ConvArgs s,
                                             const float* __restrict__ grad_out,
                                             grad_t* __restrict__ grads, float* __restrict__ parts) {
    __shared__ float warp_sums[32][CONV_W + 1];
    const long long row = blockIdx.x;
    const int d = (int)(row % s.dim);
    const int t0 = (blockIdx.y * blockDim.x + threadIdx.x) * CONV_ITEMS;
    const float* g_final = grad_out + (long long)s.rows * s.len;
    float w[CONV_W];
#pragma unroll
    for (int k = 0; k < CONV_W; ++k) w[k] = ld(x, s.weight + (long long)d * CONV_W + k);
    const float bias = ld_or(x, s.bias, d, 0.0f);
    if (blockIdx.y == 0 && threadIdx.x < CONV_W - 1 && s.initial_states >= 0) {
        const int j = threadIdx.x;
        float g = j >= s.len ? g_final[row * (CONV_W - 1) + j - s.len] : 0.0f;
        for (int k = 0; k < CONV_W; ++k)
            if (j - k >= 0 && j - k < s.len) g += w[k] * conv_g_pre(x, s, grad_out, row, d, j - k);
        const long long init_at = (long long)s.rows * s.len + (long long)s.dim * CONV_W +
                                  (s.bias >= 0 ? s.dim : 0);
        grads[init_at + row * (CONV_W - 1) + j] = to_grad(g);
    }
    // window[i] = xx at time t0 - (W-1) + i; g_pre[i] = g_pre at time t0 + i (0 past the end).
    float window[CONV_ITEMS + 2 * CONV_W - 2], g_pre[CONV_ITEMS + CONV_W - 1];
#pragma unroll
    for (int i = 0; i < CONV_ITEMS + 2 * CONV_W - 2; ++i) {
        const int p = t0 - (CONV_W - 1) + i;
        window[i] = p < s.len ? conv_input(x, s, row, p) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < CONV_ITEMS + CONV_W - 1; ++i) {
        g_pre[i] = 0.0f;
        if (t0 + i < s.len) {
            float pre = bias;
#pragma unroll
            for (int k = 0; k < CONV_W; ++k) pre += w[k] * window[i + k];
            const float g = grad_out[row * s.len + t0 + i];
            g_pre[i] = s.silu ? g * silu_grad(pre) : g;
        }
    }
    float acc[CONV_W + 1];
#pragma unroll
    for (int k = 0; k <= CONV_W; ++k) acc[k] = 0.0f;
#pragma unroll
    for (int i = 0; i < CONV_ITEMS; ++i) {
        const int t = t0 + i;
        if (t >= s.len) break;
#pragma unroll
        for (int k = 0; k < CONV_W; ++k) acc[k] += g_pre[i] * window[i + k];
        acc[CONV_W] += g_pre[i];
        // g_x[t] = g_xx[q], q = t + W-1: the g_pre at times q-k = t + (W-1-k).
        const int q = t + CONV_W - 1;
        float g = q >= s.len ? g_final[row * (CONV_W - 1) + q - s.len] : 0.0f;
#pragma unroll
        for (int k = 0; k < CONV_W; ++k) g += w[k] * g_pre[i + CONV_W - 1 - k];
        grads[row * s.len + t] = to_grad(g);
    }
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int k = 0; k <= CONV_W; ++k) {
        const float v = lane_group_sum(acc[k], 32);
        if (threadIdx.x % 32 == 0) warp_sums[warp][k] = v;
    }
    __syncthreads();
    if (threadIdx.x <= CONV_W) {
        const int k = threadIdx.x;
        float total = 0.0f;
        for (int i = 0; i < warps; ++i) total += warp_sums[i][k];
        const long long b = row / s.dim;
        const long long part = (b * gridDim.y + blockIdx.y) * (long long)s.dim * (CONV_W + 1);
        parts[part + (k < CONV_W ? (long long)d * CONV_W + k : (long long)s.dim * CONV_W + d)] = total;
    }
}
