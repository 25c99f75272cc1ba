// Gated, grouped RMSNorm over the last dimension:
//
//   v   = x * silu(z)                    if z and not norm_before_gate, else x
//   out = v / sqrt(mean_group(v^2) + eps) * weight
//   out = out * silu(z)                  if z and norm_before_gate
//
// x, z, out: (rows, hidden); weight: (hidden); groups of group_size consecutive features.
// One block of NORM_THREADS threads per (row, group), each thread taking every NORM_THREADS-th
// feature (so that the block has many loads in flight): the squares are summed with shuffles
// inside each warp, then across the warps in shared memory. NORM_THREADS is defined by the
// launcher (launch.rs).

struct NormArgs {
    long long x, weight, z;  // element offsets; -1 for an absent z
    int rows, hidden, group_size, norm_before_gate;
    float eps;
};

// The value that is normalised: x, gated first when z is given and norm_before_gate is not set.
__device__ __forceinline__ float norm_input(const in_t* x, const NormArgs& s, long long i) {
    const float v = ld(x, s.x + i);
    return (s.z >= 0 && !s.norm_before_gate) ? v * silu(ld(x, s.z + i)) : v;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_gated_fwd(const in_t* __restrict__ x, NormArgs s, float* __restrict__ out) {
    __shared__ float warp_sums[NORM_THREADS / 32];
    const int groups = s.hidden / s.group_size;
    const long long row = blockIdx.x / groups;
    const int first = (int)(blockIdx.x % groups) * s.group_size;  // first feature of the group
    const long long base = row * s.hidden + first;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS) {
        const float v = norm_input(x, s, base + i);
        squares += v * v;
    }
    squares = lane_group_sum(squares, 32);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = squares;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / 32; ++w) total += warp_sums[w];
    const float inv = 1.0f / sqrtf(total / s.group_size + s.eps);
    for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS) {
        float o = norm_input(x, s, base + i) * inv * ld(x, s.weight + first + i);
        if (s.z >= 0 && s.norm_before_gate) o *= silu(ld(x, s.z + base + i));
        out[base + i] = o;
    }
}

// Backward. With v the normalised input (x * silu(z) when gating first, else x),
// r = 1 / sqrt(mean_group(v^2) + eps), n = v * r and m = n * weight:
//
//   gating last:   g_m = g_out * silu(z),   g_z = g_out * m * silu'(z)     (else g_m = g_out)
//   g_weight[i]   += g_m * n                (summed over rows)
//   g_n = g_m * weight,   g_v = r * (g_n - n * mean_group(g_n * n))
//   gating first:  g_x = g_v * silu(z),     g_z = g_v * x * silu'(z)       (else g_x = g_v)
//
// grads: [g_x (rows, hidden) | g_weight (hidden), written by sum_parts | g_z (rows, hidden)].
// Grid (row blocks, groups): a block takes rows_per_block consecutive rows of one group, three
// passes per row (sum of squares, sum of g_n * n, outputs). Each thread owns the features
// i = threadIdx.x + k * NORM_THREADS of the group and adds its g_m * n into its own slots of the
// dynamic shared array w_acc (group_size floats: no other thread touches them), which the block
// writes to weight_parts[row block, feature]; sum_parts then adds the row blocks in order.

// Sum of v over the block; `buf` alternates between two arrays on consecutive calls so that one
// barrier per call suffices.
__device__ __forceinline__ float norm_block_sum(float v, float* buf) {
    v = lane_group_sum(v, 32);
    if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / 32; ++w) total += buf[w];
    return total;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_gated_bwd(const in_t* __restrict__ x, NormArgs s, int rows_per_block,
                      const float* __restrict__ grad_out, grad_t* __restrict__ grads,
                      float* __restrict__ weight_parts) {
    extern __shared__ float w_acc[];
    __shared__ float sums[2][NORM_THREADS / 32];
    const int first = blockIdx.y * s.group_size;
    const long long size = (long long)s.rows * s.hidden;
    grad_t* gx = grads;
    grad_t* gz = grads + size + s.hidden;
    const bool gate_first = s.z >= 0 && !s.norm_before_gate;
    const bool gate_last = s.z >= 0 && s.norm_before_gate;
    for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS) w_acc[i] = 0.0f;
    const long long row0 = (long long)blockIdx.x * rows_per_block;
    for (long long row = row0; row < row0 + rows_per_block && row < s.rows; ++row) {
        const long long base = row * s.hidden + first;
        float squares = 0.0f;
        for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS) {
            const float v = norm_input(x, s, base + i);
            squares += v * v;
        }
        const float r = 1.0f / sqrtf(norm_block_sum(squares, sums[0]) / s.group_size + s.eps);
        // g_m for feature i of the row.
        auto g_m = [&](int i) {
            const float g = grad_out[base + i];
            return gate_last ? g * silu(ld(x, s.z + base + i)) : g;
        };
        float gn_n = 0.0f;
        for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS)
            gn_n += g_m(i) * ld(x, s.weight + first + i) * norm_input(x, s, base + i) * r;
        const float mean_gn_n = norm_block_sum(gn_n, sums[1]) / s.group_size;
        for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS) {
            const float n = norm_input(x, s, base + i) * r;
            const float w = ld(x, s.weight + first + i);
            const float gm = g_m(i);
            w_acc[i] += gm * n;
            if (gate_last) {
                const float zi = ld(x, s.z + base + i);
                gz[base + i] = to_grad(grad_out[base + i] * n * w * silu_grad(zi));
            }
            const float g_v = r * (gm * w - n * mean_gn_n);
            if (gate_first) {
                const float zi = ld(x, s.z + base + i);
                gx[base + i] = to_grad(g_v * silu(zi));
                gz[base + i] = to_grad(g_v * ld(x, s.x + base + i) * silu_grad(zi));
            } else {
                gx[base + i] = to_grad(g_v);
            }
        }
    }
    for (int i = threadIdx.x; i < s.group_size; i += NORM_THREADS)
        weight_parts[(long long)blockIdx.x * s.hidden + first + i] = w_acc[i];
}
