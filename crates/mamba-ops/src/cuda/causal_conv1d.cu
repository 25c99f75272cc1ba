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
