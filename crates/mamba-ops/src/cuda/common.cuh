// Helpers shared by every kernel source; prepended to each one before NVRTC compiles it.
//
// The packed inputs are f32, or bf16 when the module is compiled with IN_BF16. Every value is
// widened to f32 as it is read; states, sums and outputs are f32.

#ifdef IN_BF16
typedef unsigned short in_t;
// bf16 is the upper half of an f32: shift its bits back into place.
__device__ __forceinline__ float widen(in_t v) { return __uint_as_float(((unsigned int)v) << 16); }
#else
typedef float in_t;
__device__ __forceinline__ float widen(in_t v) { return v; }
#endif
__device__ __forceinline__ float ld(const in_t* p, long long i) { return widen(p[i]); }

// The backward kernels write the inputs' gradients in the inputs' type: f32, or bf16 rounded to
// nearest even (NaN kept), as candle's cast of the f32 gradients would round them.
typedef in_t grad_t;
#ifdef IN_BF16
__device__ __forceinline__ grad_t to_grad(float v) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
    return r;
}
#else
__device__ __forceinline__ grad_t to_grad(float v) { return v; }
#endif

// K consecutive floats from p, as float4s when K is a multiple of 4 (p then 16-byte aligned).
template <int K>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[K]) {
    if constexpr (K % 4 == 0) {
#pragma unroll
        for (int i = 0; i < K; i += 4) {
            const float4 q = *reinterpret_cast<const float4*>(p + i);
            v[i] = q.x, v[i + 1] = q.y, v[i + 2] = q.z, v[i + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < K; ++i) v[i] = p[i];
    }
}

// An optional input: its value at i, or `absent` when its offset is -1.
__device__ __forceinline__ float ld_or(const in_t* p, long long offset, long long i, float absent) {
    return offset < 0 ? absent : ld(p, offset + i);
}

// The 32-bit shared-memory address of p (a pointer into shared memory), as `cp.async`, `ldmatrix`
// and `mbarrier` take it.
__device__ __forceinline__ unsigned int shared_address(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

// silu(x) = x * sigmoid(x) = x / (1 + exp(-x)), with the fast exponential and division: a few
// units in the last place, and about a third of the instructions of expf and the IEEE division
// (whose slow-path check was most of silu's code in the scan forward's SASS).
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// softplus(x) = ln(1 + exp(x)), and x itself above 20 as PyTorch does.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// The step the SSM uses: dt = raw + bias, softplus if asked, then clamped to [lo, hi].
__device__ __forceinline__ float process_dt(float raw, float bias, int apply_softplus, float lo,
                                            float hi) {
    float dt = raw + bias;
    if (apply_softplus) dt = softplus(dt);
    return fminf(fmaxf(dt, lo), hi);
}

// Sum of v over groups of `width` consecutive lanes (a power of two, at most 32); every lane of
// the warp must call it.
__device__ __forceinline__ float lane_group_sum(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, offset, width);
    return v;
}

// silu'(x) = s * (1 + x * (1 - s)) with s = sigmoid(x).
__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

// Deterministic sum of per-block partial sums: out[j] = sum_{p < count} parts[p * stride + j]
// for j < width (a gradient, stored as grad_t), the parts added in a fixed order (no atomics), so
// that a gradient summed over blocks is the same on every run. A block is 32 j (one per lane) by
// SUM_WARPS warps: warp w adds the w-th of SUM_WARPS runs of consecutive parts in order, then
// the runs' sums are added in order. Grid: ceil(width / 32); block: 32 * SUM_WARPS threads.
#define SUM_WARPS 8
extern "C" __global__ void __launch_bounds__(32 * SUM_WARPS)
    sum_parts(const float* __restrict__ parts, int count, int stride, int width, grad_t* __restrict__ out) {
    __shared__ float runs[SUM_WARPS][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int j = blockIdx.x * 32 + lane;
    const int per = (count + SUM_WARPS - 1) / SUM_WARPS;
    const int p0 = min(count, warp * per), p1 = min(count, p0 + per);
    float run = 0.0f;
    if (j < width) {
#pragma unroll 8
        for (int p = p0; p < p1; ++p) run += parts[(long long)p * stride + j];
    }
    runs[warp][lane] = run;
    __syncthreads();
    if (warp != 0 || j >= width) return;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < SUM_WARPS; ++w) total += runs[w][lane];
    out[j] = to_grad(total);
}
