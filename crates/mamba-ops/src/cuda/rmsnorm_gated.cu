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
