// Mamba-2 state space duality (SSD), the chunked algorithm of the Mamba-2 paper, forward.
//
// With dt' the processed step (bias, softplus, clamp) and g(h) = h / (H / G), the scan is
//   S_t[h] = exp(dt'_t[h] A[h]) S_{t-1}[h] + dt'_t[h] outer(x_t[h], B_t[g(h)])      (P x N)
//   y_t[h] = S_t[h] C_t[g(h)] + D[h] x_t[h],   then y *= silu(z) when z is given.
// Time is cut into chunks of SSD_Q steps (the last one padded with dt' = 0, x = B = C = 0, which
// is exact). Inside a chunk, a_t = dt'_t A[h] and cum_t = a_1 + ... + a_t. Three kernels:
//   ssd_chunk_products  CB[i][j] = C_i . B_j for every pair of steps of a chunk, once per group,
//                    and Z(c) = sum_j exp(cum_last - cum_j) dt'_j outer(x_j, B_j), the state the
//                    chunk alone produces, with dt'_t and cum_t for every (batch, head, chunk);
//   ssd_state_passing  S_in(0) = initial_states, S_in(c+1) = exp(cum_last(c)) S_in(c) + Z(c),
//                    walking the chunks in order; leaves S_in(c) in place of Z(c) and writes
//                    the final state;
//   ssd_chunk_scan   y_i = exp(cum_i) S_in(c) C_i                                (off-diagonal)
//                        + sum_{j<=i} CB[i][j] exp(cum_i - cum_j) dt'_j x_j          (diagonal)
//                    then the D skip and the z gate.
// With bf16 inputs of suitable sizes the three run as ssd_chunk_products_tc,
// ssd_state_passing_split and ssd_chunk_scan_tc instead (operands copied asynchronously, S_in
// left as bf16 planes: below).
// The matrix-shaped parts run as block products over shared-memory slabs: f32 FMAs for f32
// inputs, tensor cores (bf16 operands split in two where not exact, f32 sums) for bf16 inputs.
// Layouts: x, z, y: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H); D: (H) or
// (H, P); B, C: (batch, L, G, N); initial_states, final state: (batch, H, P, N).
// Scratch: dt', cum: (batch, H, chunks * SSD_Q); CB: (batch, chunks, G, SSD_Q, SSD_Q), only
// its tiles on or below the diagonal written; chunk states: (batch, chunks, H, P, N).

// SSD_Q (chunk length), TILE (a block product's output tile is TILE x TILE) and PRODUCT_THREADS
// are defined by the launcher (launch.rs); each thread of a block product owns 4 x 4 outputs.
// A chunk is ROW_TILES tiles long: CB and the chunk scan's outputs are cut into tiles of TILE
// steps.
static_assert(TILE == 64 && PRODUCT_THREADS == 256 && SSD_Q % TILE == 0, "a chunk is whole tiles");
static_assert(SSD_Q <= PRODUCT_THREADS, "a product block takes a chunk's steps one per thread");
#define ROW_TILES (SSD_Q / TILE)
#define SLAB 16  // depth of one shared-memory slab
// Slabs stored and multiplied per barrier of a block product (SLAB_SETS * SLAB deep), each
// thread holding the next set's raw values in registers meanwhile. A bf16 slab's tensor-core
// passes are short next to the barrier and the stores around them, so bf16 inputs take two
// slabs per barrier (H200, H 24 / H 80: 89.8 -> 86.4 us, 269 -> 247 us); f32 slabs are long
// FMA blocks, and two per barrier were no faster (CUDA_NOTES).
#ifdef IN_BF16
#define SLAB_SETS 2
#else
#define SLAB_SETS 1
#endif
#define SLAB_BUFS (2 * SLAB_SETS)  // one set being multiplied while the next is stored
#define PAD 4    // keeps rows 16-byte aligned while spreading them over the banks

struct SsdArgs {
    // Element offsets of the inputs in the packed buffer; -1 for an absent optional input.
    long long x, dt, a, b, c, d, z, dt_bias, initial_states;
    int batch, len, heads, head_dim, groups, state, chunks, d_per_p, softplus;
    float dt_lo, dt_hi;
};

// Indices of a (batch, chunk, head) block.
struct ChunkHead {
    long long b, bc, bch;  // batch; batch * chunks + chunk; bc * heads + head
    int c, h, g, t0;       // chunk; head; its group; first step of the chunk
};

__device__ __forceinline__ ChunkHead chunk_head(const SsdArgs& s, long long bch) {
    ChunkHead k;
    k.bch = bch;
    k.h = (int)(bch % s.heads);
    k.bc = bch / s.heads;
    k.c = (int)(k.bc % s.chunks);
    k.b = k.bc / s.chunks;
    k.g = k.h / (s.heads / s.groups);
    k.t0 = k.c * SSD_Q;
    return k;
}

// Where the chunk's steps start in the (batch, H, chunks * SSD_Q) dt' and cum.
__device__ __forceinline__ long long chunk_step0(const SsdArgs& s, const ChunkHead& k) {
    return (k.b * s.heads + k.h) * ((long long)s.chunks * SSD_Q) + k.t0;
}

// The chunk's first `count` dt' and cum into shared memory.
__device__ __forceinline__ void stage_steps(const SsdArgs& s, const ChunkHead& k, const float* __restrict__ dtp,
                                            const float* __restrict__ cum, float* dt_c, float* cum_c, int count) {
    const long long step0 = chunk_step0(s, k);
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
        cum_c[j] = cum[step0 + j];
        dt_c[j] = dtp[step0 + j];
    }
}

// Offset of row t of batch b in a (batch, L, K, width) tensor, at inner index k.
__device__ __forceinline__ long long token_row(const SsdArgs& s, long long b, int t, int k, int inner,
                                               int width) {
    return ((b * s.len + t) * inner + k) * (long long)width;
}

static_assert(SLAB * TILE == 4 * PRODUCT_THREADS, "each thread moves four values of an operand per slab");

// Four consecutive raw values of an operand, loaded ahead and widened only where they are
// used (so that nothing waits on the load before the slab in hand is multiplied): inputs as
// stored (bf16: two per 32-bit word, the first in the low half), or f32 scratch.
#ifdef IN_BF16
typedef uint2 Raw4;
__device__ __forceinline__ float value(const Raw4& r, int q) {
    const unsigned int w = q < 2 ? r.x : r.y;
    return __uint_as_float(q % 2 == 0 ? w << 16 : w & 0xffff0000u);
}
#else
typedef float4 Raw4;
#endif
__device__ __forceinline__ float value(const float4& r, int q) {
    return q == 0 ? r.x : q == 1 ? r.y : q == 2 ? r.z : r.w;
}

// Four consecutive f32 from element i on (f32 inputs, or scratch an earlier kernel wrote), the
// first `valid` of them (none when valid <= 0) and zeros after: one vector load when all four
// are there and aligned, else one at a time.
__device__ __forceinline__ float4 floats4(const float* __restrict__ p, long long i, int valid) {
    if (valid >= 4 && i % 4 == 0) return *reinterpret_cast<const float4*>(p + i);
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = q < valid ? p[i + q] : 0.0f;
    return make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ float4 no_floats() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

// The same for the inputs, as they are stored.
#ifdef IN_BF16
__device__ __forceinline__ Raw4 inputs4(const in_t* __restrict__ p, long long i, int valid) {
    if (valid >= 4 && i % 4 == 0) return __ldg(reinterpret_cast<const uint2*>(p + i));
    unsigned int h[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = q < valid ? p[i + q] : 0u;
    return make_uint2(h[0] | h[1] << 16, h[2] | h[3] << 16);
}

__device__ __forceinline__ Raw4 no_inputs() { return make_uint2(0u, 0u); }
#else
__device__ __forceinline__ Raw4 inputs4(const in_t* __restrict__ p, long long i, int valid) {
    return floats4(p, i, valid);
}

__device__ __forceinline__ Raw4 no_inputs() { return no_floats(); }
#endif

// How many of the four values from index `at` lie before `end`.
__device__ __forceinline__ int valid4(int at, int end) { return min(4, end - at); }

// The finish of an operand used as it is read.
struct AsRead {
    __device__ __forceinline__ float operator()(int, int, float v) const { return v; }
};

#ifdef IN_BF16
// With bf16 inputs the block products run on tensor cores (mma.sync m16n8k16, bf16 operands,
// f32 sums). An operand that is not exactly a bf16 input (scaled, decayed, or f32 scratch) is
// stored as two bf16 planes, hi = bf16(v) and lo = bf16(v - hi), and multiplied as hi and lo
// against the other operand (every product here has at most one such operand): about 16
// significant bits, so that the result stays within the f32 path's tolerance. Slabs hold each
// operand as [row][k] (row = m for A, n for B), the 16 k of a row as eight bf16 pairs whose
// places are permuted per row (slab_index) so that a warp's fragment loads (rows g, pairs t)
// hit 32 distinct banks and its stores of groups along rows (rows 4i + q, one pair) at most
// two to a bank: with rows simply padded those stores met eight to a bank.
struct Slabs {
    unsigned short hi[SLAB_BUFS][TILE][SLAB];
    unsigned short lo[SLAB_BUFS][TILE][SLAB];
};

// Where value k of a slab row goes: its pair k / 2 XORed with bits of the row (bit 2 of the
// row moves the pair by four, bits 3-4 by up to three).
__device__ __forceinline__ int slab_index(int row, int k) {
    const int swizzle = ((row >> 2) & 1) << 2 | ((row >> 3) & 3);
    return 2 * ((k >> 1) ^ swizzle) + (k & 1);
}

// Warp w owns rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32 of the output tile, as four
// m16n8 tiles: acc[j][e] is tile j's accumulator e, at row g (+8 for e >= 2) and column
// 8 j + 2 t (+1 for odd e), g = lane / 4, t = lane % 4.
__device__ __forceinline__ int acc_row(int, int e) {
    const int lane = threadIdx.x % 32;
    return (threadIdx.x / 32 % 4) * 16 + lane / 4 + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int j, int e) {
    const int lane = threadIdx.x % 32;
    return (threadIdx.x / 128) * 32 + j * 8 + 2 * (lane % 4) + (e & 1);
}

// v rounded to bf16 (nearest even), as bits.
__device__ __forceinline__ unsigned short bf16_bits(float v) {
    const unsigned int u = __float_as_uint(v);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The lo plane's part of v whose hi plane holds `hi`: bf16(v - hi).
__device__ __forceinline__ unsigned short bf16_rest(float v, unsigned short hi) {
    return bf16_bits(v - __uint_as_float((unsigned int)hi << 16));
}

// Stores v at (row, k) of slab buf: its hi plane, and its lo plane unless the operand is exact.
template <bool EXACT>
__device__ __forceinline__ void store_split(Slabs& sl, int buf, int row, int k, float v) {
    const unsigned short hi = bf16_bits(v);
    const int at = slab_index(row, k);
    sl.hi[buf][row][at] = hi;
    if (!EXACT) sl.lo[buf][row][at] = bf16_rest(v, hi);
}

// The two bf16 at (row, k), (row, k + 1) of a plane (k even), as one register.
__device__ __forceinline__ unsigned int bf16_pair(const unsigned short (&plane)[TILE][SLAB], int row, int k) {
    return *reinterpret_cast<const unsigned int*>(&plane[row][slab_index(row, k)]);
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                         unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 matrices of 16-bit values from shared memory (ldmatrix x4), lane l giving the
// address of row l % 8 of matrix l / 8: as they are, or transposed.
__device__ __forceinline__ void fragments(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void fragments_transposed(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// A's fragment (rows 16 (w % 4) .. +16, the slab's 16 k) from a plane.
__device__ __forceinline__ void load_a(const unsigned short (&plane)[TILE][SLAB], unsigned int (&a)[4]) {
    const int lane = threadIdx.x % 32, row = (threadIdx.x / 32 % 4) * 16 + lane / 4, k = 2 * (lane % 4);
    a[0] = bf16_pair(plane, row, k);
    a[1] = bf16_pair(plane, row + 8, k);
    a[2] = bf16_pair(plane, row, k + 8);
    a[3] = bf16_pair(plane, row + 8, k + 8);
}

// acc += the slab's product on tensor cores.
template <bool A_EXACT, bool B_EXACT>
__device__ __forceinline__ void multiply_slab(const Slabs& as, const Slabs& bs, int buf, float (&acc)[4][4]) {
    const int lane = threadIdx.x % 32, k = 2 * (lane % 4);
    unsigned int a_hi[4], a_lo[4];
    load_a(as.hi[buf], a_hi);
    if (!A_EXACT) load_a(as.lo[buf], a_lo);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = (threadIdx.x / 128) * 32 + j * 8 + lane / 4;
        const unsigned int b0 = bf16_pair(bs.hi[buf], n, k), b1 = bf16_pair(bs.hi[buf], n, k + 8);
        mma_bf16(acc[j], a_hi, b0, b1);
        if (!A_EXACT) mma_bf16(acc[j], a_lo, b0, b1);
        if (!B_EXACT)
            mma_bf16(acc[j], a_hi, bf16_pair(bs.lo[buf], n, k), bf16_pair(bs.lo[buf], n, k + 8));
    }
}
#else
// Two sets of shared-memory slabs per operand, [k][row]: one being multiplied while the next is
// filled.
typedef float Slabs[SLAB_BUFS][SLAB][TILE + PAD];

// Each thread owns 4 x 4 outputs of the tile: acc[r][q] at row 4 (tid / 16) + r, column
// 4 (tid % 16) + q.
__device__ __forceinline__ int acc_row(int r, int) { return threadIdx.x / 16 * 4 + r; }
__device__ __forceinline__ int acc_col(int, int q) { return threadIdx.x % 16 * 4 + q; }

// acc += the slab's product in f32 FMAs.
template <bool A_EXACT, bool B_EXACT>
__device__ __forceinline__ void multiply_slab(const Slabs& as, const Slabs& bs, int buf, float (&acc)[4][4]) {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll
    for (int k = 0; k < SLAB; ++k) {
        const float4 a4 = *reinterpret_cast<const float4*>(&as[buf][k][tm * 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&bs[buf][k][tn * 4]);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w}, bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[r][q] += av[r] * bv[q];
    }
}

// Stores v at (row, k) of slab buf (f32 slabs hold every value as it is).
template <bool EXACT>
__device__ __forceinline__ void store_split(Slabs& sl, int buf, int row, int k, float v) {
    sl[buf][k][row] = v;
}
#endif

#ifdef IN_BF16
// Stores the finished values v0, v1 at (row, k), (row, k + 1) of slab buf (k even): one 32-bit
// store per plane, the pair being adjacent in a slab row.
template <bool EXACT>
__device__ __forceinline__ void store_split_pair(Slabs& sl, int buf, int row, int k, float v0, float v1) {
    const unsigned short h0 = bf16_bits(v0), h1 = bf16_bits(v1);
    const int at = slab_index(row, k);
    *reinterpret_cast<unsigned int*>(&sl.hi[buf][row][at]) = (unsigned int)h0 | (unsigned int)h1 << 16;
    if (!EXACT)
        *reinterpret_cast<unsigned int*>(&sl.lo[buf][row][at]) =
            (unsigned int)bf16_rest(v0, h0) | (unsigned int)bf16_rest(v1, h1) << 16;
}
#endif

// Stores a group of four values of an operand (from (row, k) of the slab on, along k when
// K_FAST, else along rows) in slab buf, each finished (k0: the slab's first k). With bf16
// slabs a group along k goes in as two pairs (k is a multiple of four).
template <bool K_FAST, bool EXACT, class Raw, class Finish>
__device__ __forceinline__ void store_finished(Slabs& sl, int buf, int row, int k, int k0, const Raw& raw,
                                               Finish finish) {
#ifdef IN_BF16
    if constexpr (K_FAST) {
#pragma unroll
        for (int q = 0; q < 4; q += 2)
            store_split_pair<EXACT>(sl, buf, row, k + q, finish(k0 + k + q, row, value(raw, q)),
                                    finish(k0 + k + q + 1, row, value(raw, q + 1)));
    } else
#endif
    {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kq = k + (K_FAST ? q : 0), rq = row + (K_FAST ? 0 : q);
            store_split<EXACT>(sl, buf, rq, kq, finish(k0 + kq, rq, value(raw, q)));
        }
    }
}

// Stores a group as store_finished does; an exact operand's values are inputs used as they
// are, and with bf16 inputs they go in as loaded, without rounding or finish.
template <bool K_FAST, bool EXACT, class Raw, class Finish>
__device__ __forceinline__ void stash(Slabs& sl, int buf, int row, int k, int k0, const Raw& raw,
                                      Finish finish) {
#ifdef IN_BF16
    if constexpr (EXACT) {
        if (K_FAST) {
            unsigned short(&plane)[TILE][SLAB] = sl.hi[buf];
            *reinterpret_cast<unsigned int*>(&plane[row][slab_index(row, k)]) = raw.x;
            *reinterpret_cast<unsigned int*>(&plane[row][slab_index(row, k + 2)]) = raw.y;
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q)
                sl.hi[buf][row + q][slab_index(row + q, k)] =
                    (unsigned short)((q < 2 ? raw.x : raw.y) >> (q % 2 * 16));
        }
    } else {
        store_finished<K_FAST, EXACT>(sl, buf, row, k, k0, raw, finish);
    }
#else
    store_finished<K_FAST, EXACT>(sl, buf, row, k, k0, raw, finish);
#endif
}

// acc += sum_k A(k, m) Bm(k, n) over k < depth for this thread's outputs (acc_row, acc_col)
// of a TILE x TILE product, in slabs of SLAB. Each thread moves four consecutive values of each
// operand per slab: along k when A_K_FAST (B_K_FAST) says the operand's consecutive k are
// adjacent in memory, else along m (n). a_read(k, m) gives the raw group from (k, m) on (zeros
// outside the operand) and a_finish(k, m, v) the factor made from one value (a scale, a
// decay, a mask): the next set of SLAB_SETS slabs is read into registers before the current set
// is multiplied, and finished when it goes to shared memory, so that the multiplication runs
// while the loads are in flight (a set reaching past `depth` holds zeros there and its slabs
// past it are not multiplied). A_EXACT / B_EXACT say the operand's values are inputs used
// as they are (one bf16 plane holds bf16 inputs exactly; the finish is not called). Every
// thread of the block must call it.
template <bool A_K_FAST, bool B_K_FAST, bool A_EXACT, bool B_EXACT, class ARead, class AFinish, class BRead,
          class BFinish>
__device__ __forceinline__ void block_product(int depth, ARead a_read, AFinish a_finish, BRead b_read,
                                              BFinish b_finish, float (&acc)[4][4], Slabs& as, Slabs& bs) {
    const int tid = threadIdx.x;
    // This thread's first (k, m) of each operand's group within a slab.
    constexpr int K_GROUPS = SLAB / 4, ROW_GROUPS = TILE / 4;  // groups of four along k, along rows
    const int a_k = A_K_FAST ? tid % K_GROUPS * 4 : tid / ROW_GROUPS;
    const int a_m = A_K_FAST ? tid / K_GROUPS : tid % ROW_GROUPS * 4;
    const int b_k = B_K_FAST ? tid % K_GROUPS * 4 : tid / ROW_GROUPS;
    const int b_n = B_K_FAST ? tid / K_GROUPS : tid % ROW_GROUPS * 4;
    constexpr int SET = SLAB_SETS * SLAB;  // depth stored per barrier
    decltype(a_read(0, 0)) ra[SLAB_SETS];
    decltype(b_read(0, 0)) rb[SLAB_SETS];
#pragma unroll
    for (int q = 0; q < SLAB_SETS; ++q) {
        ra[q] = a_read(q * SLAB + a_k, a_m);
        rb[q] = b_read(q * SLAB + b_k, b_n);
    }
    int set = 0;
    for (int k0 = 0; k0 < depth; k0 += SET, set ^= 1) {
#pragma unroll
        for (int q = 0; q < SLAB_SETS; ++q) {
            const int buf = set * SLAB_SETS + q, kq = k0 + q * SLAB;
            stash<A_K_FAST, A_EXACT>(as, buf, a_m, a_k, kq, ra[q], a_finish);
            stash<B_K_FAST, B_EXACT>(bs, buf, b_n, b_k, kq, rb[q], b_finish);
        }
        __syncthreads();
        if (k0 + SET < depth) {
#pragma unroll
            for (int q = 0; q < SLAB_SETS; ++q) {
                ra[q] = a_read(k0 + SET + q * SLAB + a_k, a_m);
                rb[q] = b_read(k0 + SET + q * SLAB + b_k, b_n);
            }
        }
#pragma unroll
        for (int q = 0; q < SLAB_SETS; ++q)
            if (k0 + q * SLAB < depth) multiply_slab<A_EXACT, B_EXACT>(as, bs, set * SLAB_SETS + q, acc);
    }
    // The slabs are free again once every thread has multiplied the last one.
    __syncthreads();
}

// Over a warp's lanes (every lane calls them): the inclusive prefix sum and the inclusive
// suffix sum of v.
__device__ __forceinline__ float warp_prefix_sum(float v) {
    const int lane = threadIdx.x % 32;
    for (int offset = 1; offset < 32; offset *= 2) {
        const float before = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += before;
    }
    return v;
}
__device__ __forceinline__ float warp_suffix_sum(float v) {
    const int lane = threadIdx.x % 32;
    for (int offset = 1; offset < 32; offset *= 2) {
        const float after = __shfl_down_sync(0xffffffffu, v, offset);
        if (lane + offset < 32) v += after;
    }
    return v;
}

// dt'_t and cum_t = sum_{j<=t} dt'_j A[h] for the SSD_Q steps of chunk c of (batch, head) `bh`,
// one step per thread of the block's first SSD_Q, into dt_c and cum_c (shared), and into the
// scratch dtp and cum as well when `publish` is set. Every thread of the block must call it.
__device__ __forceinline__ void chunk_steps(const in_t* __restrict__ x, const SsdArgs& s, long long bh, int c,
                                            float* dt_c, float* cum_c, bool publish, float* __restrict__ dtp,
                                            float* __restrict__ cum) {
    __shared__ float warp_sums[SSD_Q / 32];
    const int h = (int)(bh % s.heads);
    const long long b = bh / s.heads;
    const int k = threadIdx.x, lane = k % 32, warp = k / 32;
    const int t = c * SSD_Q + k;
    float dt = 0.0f, sum = 0.0f;
    if (k < SSD_Q) {
        if (t < s.len)
            dt = process_dt(ld(x, s.dt + (b * s.len + t) * s.heads + h), ld_or(x, s.dt_bias, h, 0.0f),
                            s.softplus, s.dt_lo, s.dt_hi);
        // Inclusive prefix sum of dt' A over the chunk: within each warp, then across warps.
        sum = warp_prefix_sum(dt * ld(x, s.a + h));
        if (lane == 31) warp_sums[warp] = sum;
    }
    __syncthreads();
    if (k < SSD_Q) {
        for (int w = 0; w < warp; ++w) sum += warp_sums[w];
        dt_c[k] = dt;
        cum_c[k] = sum;
        if (publish) {
            const long long at = bh * ((long long)s.chunks * SSD_Q) + t;
            dtp[at] = dt;
            cum[at] = sum;
        }
    }
    __syncthreads();
}

// The tiles of CB on or below the diagonal, in rows: tile `tile` is (i0, j0) / TILE.
__device__ __forceinline__ void lower_tile(int tile, int& i0, int& j0) {
    int ti = 0;
    while ((ti + 1) * (ti + 2) / 2 <= tile) ++ti;
    i0 = ti * TILE;
    j0 = (tile - ti * (ti + 1) / 2) * TILE;
}

// CB[i][j] = C_{t0+i} . B_{t0+j} for one (batch, chunk, group) `bcg` and one tile of it on or
// below the diagonal (the chunk scan reads no other).
__device__ __forceinline__ void chunk_cb(const in_t* __restrict__ x, const SsdArgs& s, long long bcg, int tile,
                                         float* __restrict__ cb, Slabs& as, Slabs& bs) {
    const int g = (int)(bcg % s.groups);
    const long long bc = bcg / s.groups;
    const int t0 = (int)(bc % s.chunks) * SSD_Q;
    const long long b = bc / s.chunks;
    int i0, j0;
    lower_tile(tile, i0, j0);
    const auto row_of = [&](long long offset, int k, int i) {
        const int t = t0 + i;
        return t < s.len ? inputs4(x, offset + token_row(s, b, t, g, s.groups, s.state) + k, valid4(k, s.state))
                         : no_inputs();
    };
    float acc[4][4] = {};
    block_product<true, true, true, true>(
        s.state, [&](int k, int i) { return row_of(s.c, k, i0 + i); }, AsRead{},
        [&](int k, int j) { return row_of(s.b, k, j0 + j); }, AsRead{}, acc, as, bs);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q)
            cb[(bcg * SSD_Q + i0 + acc_row(r, q)) * SSD_Q + j0 + acc_col(r, q)] = acc[r][q];
}

// Z(c)[p][n] = sum_j exp(cum_last - cum_j) dt'_j x_j[p] B_j[n] for one (batch, chunk, head)
// `bch` and one TILE x TILE tile (n0, p0) of (P, N).
// The chunk's dt' and cum are computed here; the block of the first tile (n0 = p0 = 0) also
// leaves them in dtp and cum for the kernels after this one.
__device__ __forceinline__ void chunk_state(const in_t* __restrict__ x, const SsdArgs& s, long long bch,
                                            int n0, int p0, float* __restrict__ dtp, float* __restrict__ cum,
                                            float* __restrict__ states, Slabs& as, Slabs& bs, float* weight) {
    __shared__ float dt_c[SSD_Q], cum_c[SSD_Q];
    const ChunkHead k = chunk_head(s, bch);
    chunk_steps(x, s, k.b * s.heads + k.h, k.c, dt_c, cum_c, n0 == 0 && p0 == 0, dtp, cum);
    for (int j = threadIdx.x; j < SSD_Q; j += PRODUCT_THREADS)
        weight[j] = __expf(cum_c[SSD_Q - 1] - cum_c[j]) * dt_c[j];
    __syncthreads();
    float acc[4][4] = {};
    block_product<false, false, false, true>(
        SSD_Q,
        [&](int j, int m) {
            const int t = k.t0 + j, p = p0 + m;
            return t < s.len ? inputs4(x, s.x + token_row(s, k.b, t, k.h, s.heads, s.head_dim) + p,
                                     valid4(p, s.head_dim))
                             : no_inputs();
        },
        [&](int j, int, float v) { return v * weight[j]; },
        [&](int j, int n) {
            const int t = k.t0 + j, nn = n0 + n;
            return t < s.len ? inputs4(x, s.b + token_row(s, k.b, t, k.g, s.groups, s.state) + nn,
                                     valid4(nn, s.state))
                             : no_inputs();
        },
        AsRead{}, acc, as, bs);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int p = p0 + acc_row(r, q), n = n0 + acc_col(r, q);
            if (p < s.head_dim && n < s.state)
                states[(k.bch * s.head_dim + p) * (long long)s.state + n] = acc[r][q];
        }
    }
}

// The two products that only read the inputs, in one launch so that they overlap: the first
// batch * chunks * groups * LOWER_TILES blocks compute a tile of CB, the others one
// chunk-state tile each, taking (batch, chunk, head), then N tiles, then P tiles. Three blocks
// per multiprocessor (80 registers, no spills): the registers holding the next slab took it
// to 96, two blocks, and the SSD from 136 to 140 us (H 24, f32, H200).
extern "C" __global__ void __launch_bounds__(PRODUCT_THREADS, 3)
    ssd_chunk_products(const in_t* __restrict__ x, SsdArgs s, float* __restrict__ dtp, float* __restrict__ cum,
                       float* __restrict__ cb, float* __restrict__ states) {
    __shared__ __align__(16) Slabs as, bs;
    __shared__ float weight[SSD_Q];  // exp(cum_last - cum_j) dt'_j
    constexpr int LOWER_TILES = ROW_TILES * (ROW_TILES + 1) / 2;
    const long long cb_blocks = (long long)s.batch * s.chunks * s.groups * LOWER_TILES;
    if (blockIdx.x < cb_blocks) {
        chunk_cb(x, s, blockIdx.x / LOWER_TILES, (int)(blockIdx.x % LOWER_TILES), cb, as, bs);
        return;
    }
    const long long tile = blockIdx.x - cb_blocks;
    const int n_tiles = (s.state + TILE - 1) / TILE, p_tiles = (s.head_dim + TILE - 1) / TILE;
    const int p0 = (int)(tile % p_tiles) * TILE;
    const int n0 = (int)(tile / p_tiles % n_tiles) * TILE;
    chunk_state(x, s, tile / p_tiles / n_tiles, n0, p0, dtp, cum, states, as, bs, weight);
}

// Where pass_chunks leaves the running value entering a chunk: in place of the chunk's own value.
struct InPlace {
    float* values;
    __device__ __forceinline__ void operator()(long long at, long long, float running) const { values[at] = running; }
};

// One (p, n) entry of a (batch, head)'s states walked over the chunks, forwards (BACKWARD
// false: from the first chunk) or backwards (from the last): each chunk's own value v(c) is
// replaced by the running value r entering it (`store(at, e, r)`, at v(c)'s index), then
// r = exp(cum_last(c)) r + v(c); returns r after the last chunk walked. The chunks are taken
// PASS_AHEAD at a time, their values loaded together before the short recurrence over them, so
// that several loads are in flight rather than one per chunk.
#define PASS_AHEAD 8
template <bool BACKWARD, class Store>
__device__ __forceinline__ float pass_chunks(const SsdArgs& s, const float* __restrict__ cum,
                                             const float* __restrict__ values, Store store, long long bh,
                                             long long e, float running) {
    const int h = (int)(bh % s.heads);
    const long long b = bh / s.heads;
    const long long entries = (long long)s.head_dim * s.state;
    const long long cum_last = bh * ((long long)s.chunks * SSD_Q) + SSD_Q - 1;
    const auto at = [&](int c) { return ((b * s.chunks + c) * s.heads + h) * entries + e; };
    const auto chunk_of = [&](int i) { return BACKWARD ? s.chunks - 1 - i : i; };  // i-th chunk walked
    for (int i0 = 0; i0 < s.chunks; i0 += PASS_AHEAD) {
        float own[PASS_AHEAD], decay[PASS_AHEAD];
#pragma unroll
        for (int k = 0; k < PASS_AHEAD; ++k) {
            if (i0 + k >= s.chunks) break;
            const int c = chunk_of(i0 + k);
            own[k] = values[at(c)];
            decay[k] = __expf(cum[cum_last + (long long)c * SSD_Q]);
        }
#pragma unroll
        for (int k = 0; k < PASS_AHEAD; ++k) {
            if (i0 + k >= s.chunks) break;
            store(at(chunk_of(i0 + k)), e, running);
            running = decay[k] * running + own[k];
        }
    }
    return running;
}

// S_in(c+1) = exp(cum_last(c)) S_in(c) + Z(c) over the chunks in order, one (p, n) entry per
// thread, each S_in(c) going where `store` puts it and the state after the last chunk to
// final_state. Grid: (batch * heads, P * N / blockDim.x).
template <class Store>
__device__ __forceinline__ void pass_states(const in_t* __restrict__ x, const SsdArgs& s,
                                            const float* __restrict__ cum, const float* __restrict__ states,
                                            float* __restrict__ final_state, Store store) {
    const long long bh = blockIdx.x;
    const long long entries = (long long)s.head_dim * s.state;
    const long long e = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= entries) return;
    const float initial = ld_or(x, s.initial_states, bh * entries + e, 0.0f);
    final_state[bh * entries + e] = pass_chunks<false>(s, cum, states, store, bh, e, initial);
}

// pass_states with S_in(c) in place of Z(c).
extern "C" __global__ void ssd_state_passing(const in_t* __restrict__ x, SsdArgs s,
                                             const float* __restrict__ cum, float* __restrict__ states,
                                             float* __restrict__ final_state) {
    pass_states(x, s, cum, states, final_state, InPlace{states});
}

// y for one (batch, chunk, head), one tile of TILE steps i0 .. of the chunk and one of TILE
// values of P: the off-diagonal product (entering state), rows scaled by exp(cum_i), plus the
// masked diagonal product over steps j <= i, then the D skip and the z gate. Grid: (batch *
// chunks * heads, P tiles * ROW_TILES). Three blocks per multiprocessor (80 registers, no
// spills; the bf16 slabs' permuted fragment addresses took it to 94).
extern "C" __global__ void __launch_bounds__(PRODUCT_THREADS, 3)
    ssd_chunk_scan(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ dtp,
                   const float* __restrict__ cum, const float* __restrict__ cb,
                   const float* __restrict__ states, float* __restrict__ y) {
    __shared__ __align__(16) Slabs as, bs;
    __shared__ float cum_c[SSD_Q], dt_c[SSD_Q];
    const ChunkHead k = chunk_head(s, blockIdx.x);
    const int p_tiles = (s.head_dim + TILE - 1) / TILE;
    const int p0 = (int)(blockIdx.y % p_tiles) * TILE, i0 = (int)(blockIdx.y / p_tiles) * TILE;
    stage_steps(s, k, dtp, cum, dt_c, cum_c, i0 + TILE);
    __syncthreads();
    float acc[4][4] = {};
    // Off-diagonal: sum_n C_i[n] S_in[p][n].
    block_product<true, true, true, false>(
        s.state,
        [&](int n, int i) {
            const int t = k.t0 + i0 + i;
            return t < s.len ? inputs4(x, s.c + token_row(s, k.b, t, k.g, s.groups, s.state) + n, valid4(n, s.state))
                             : no_inputs();
        },
        AsRead{},
        [&](int n, int m) {
            const int p = p0 + m;
            return p < s.head_dim
                       ? floats4(states, (k.bch * s.head_dim + p) * (long long)s.state + n, valid4(n, s.state))
                       : no_floats();
        },
        AsRead{}, acc, as, bs);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] *= __expf(cum_c[i0 + acc_row(r, q)]);
    // Diagonal: sum_{j<=i} CB[i][j] exp(cum_i - cum_j) dt'_j x_j[p], i = i0 + the tile's row.
    const long long cb0 = ((k.bc * s.groups + k.g) * (long long)SSD_Q + i0) * SSD_Q;
    block_product<true, false, false, true>(
        i0 + TILE,
        [&](int j, int i) { return j <= i0 + i ? floats4(cb, cb0 + i * SSD_Q + j, 4) : no_floats(); },
        // Masked again: above the diagonal exp(cum_i - cum_j) can overflow, and 0 * inf is NaN.
        [&](int j, int i, float v) {
            return j <= i0 + i ? v * __expf(cum_c[i0 + i] - cum_c[j]) * dt_c[j] : 0.0f;
        },
        [&](int j, int m) {
            const int t = k.t0 + j, p = p0 + m;
            return t < s.len ? inputs4(x, s.x + token_row(s, k.b, t, k.h, s.heads, s.head_dim) + p,
                                     valid4(p, s.head_dim))
                             : no_inputs();
        },
        AsRead{}, acc, as, bs);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int t = k.t0 + i0 + acc_row(r, q), p = p0 + acc_col(r, q);
            if (t >= s.len || p >= s.head_dim) continue;
            const long long at = token_row(s, k.b, t, k.h, s.heads, s.head_dim) + p;
            const float skip = s.d < 0 ? 0.0f : ld(x, s.d + (s.d_per_p ? k.h * s.head_dim + p : k.h));
            float v = acc[r][q] + skip * ld(x, s.x + at);
            if (s.z >= 0) v *= silu(ld(x, s.z + at));
            y[at] = v;
        }
    }
}

#ifdef IN_BF16
// ---------------------------------------------------------------------------------------------
// The chunk scan with bf16 inputs, staged asynchronously (the launcher's choice when N is a
// multiple of TC_SLICE, P of 8, and x, B and C start 16-byte aligned; ssd_chunk_scan otherwise).
// Compiled for the backward too, which runs them at its chunk length and reads the entering
// states' hi plane as its bf16 cells.
// The same sums as ssd_chunk_scan, without register staging or a barrier per slab:
//   - the state passing leaves each entering state already split, as two bf16 planes hi and lo
//     (ssd_state_passing_split), so every operand of the off-diagonal product is copied to
//     shared memory as it is stored (cp.async) and read as tensor-core fragments (ldmatrix);
//   - the diagonal's x likewise (ldmatrix.trans), and its CB as f32, decayed, masked and split
//     in registers by the one warp that uses each row.
// Eight warps: the first four run the off-diagonal product, the other four the diagonal one, at
// the same time; in each group, warp w % 4 owns 16 rows of the 64 x 64 output tile (all 64
// columns, eight m16n8 tiles), so that no value is decayed or split twice. Both products walk
// their depth in slices of TC_SLICE (N / TC_SLICE for the off-diagonal, up to the tile's last
// step for the diagonal); slice q of each shares stage q % TC_STAGES of a ring in shared memory,
// copied TC_STAGES - 1 slices ahead, with one barrier per slice. The diagonal group's sums reach
// the other group through shared memory at the end.
// ---------------------------------------------------------------------------------------------
#define TC_WARPS 8
#define TC_THREADS (TC_WARPS * 32)
#define TC_SLICE 32
#define TC_STAGES 2
// Half a stage: the off-diagonal's C (64 steps x 32 n), S hi and S lo (64 p x 32 n), bf16 rows
// of 64 bytes; or the diagonal's CB (64 steps x 32 steps, f32) and x (32 steps x 64 p, bf16),
// rows of 128 bytes.
#define TC_ROW64 4096
#define TC_HALF (3 * TC_ROW64)
#define TC_STAGE_BYTES (2 * TC_HALF)
static_assert(TILE == 2 * TC_SLICE && 2 * TILE == 16 * TC_WARPS, "a stage is laid out for 64 x 64 tiles");
static_assert(TILE * (TILE + PAD) * 4 <= TC_STAGES * TC_STAGE_BYTES, "the diagonal's sums fit the stages");

// 16 bytes from global src to shared dst, or zeros when !valid (src is then not read).
__device__ __forceinline__ void copy16(unsigned int dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// Byte offset of 16-byte chunk c of a row in rows of 64 / 128 bytes, the chunks XORed with
// bits of the row so that eight consecutive rows' chunk c (one ldmatrix matrix) meet distinct
// banks.
__device__ __forceinline__ int at64(int row, int c) { return row * 64 + ((c ^ (row >> 1 & 3)) << 4); }
__device__ __forceinline__ int at128(int row, int c) { return row * 128 + ((c ^ (row & 7)) << 4); }

// v0, v1 rounded to bf16 and packed (v0 in the low half), and what rounding left, the same way.
__device__ __forceinline__ unsigned int bf16x2(float v0, float v1) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(v1), "f"(v0));
    return r;
}
__device__ __forceinline__ void split_pair(float v0, float v1, unsigned int& hi, unsigned int& lo) {
    hi = bf16x2(v0, v1);
    lo = bf16x2(v0 - __uint_as_float(hi << 16), v1 - __uint_as_float(hi & 0xffff0000u));
}

// S_in(c) as ssd_state_passing computes it, left as bf16 planes hi = bf16(v), lo = bf16(v - hi):
// planes (batch, chunks, H, 2, P, N), the chunk states themselves untouched. Without `lo` only
// the hi plane is written (the backward without z reads nothing else).
struct SplitPlanes {
    unsigned short* planes;
    long long entries;
    bool lo;
    __device__ __forceinline__ void operator()(long long at, long long e, float running) const {
        const long long hi_at = 2 * (at - e) + e;
        const unsigned short hi = bf16_bits(running);
        planes[hi_at] = hi;
        if (lo) planes[hi_at + entries] = bf16_rest(running, hi);
    }
};

// pass_states with S_in(c) as planes, both (with_lo) or the hi plane only.
extern "C" __global__ void ssd_state_passing_split(const in_t* __restrict__ x, SsdArgs s,
                                                   const float* __restrict__ cum, const float* __restrict__ states,
                                                   float* __restrict__ final_state,
                                                   unsigned short* __restrict__ planes, int with_lo) {
    pass_states(x, s, cum, states, final_state,
                SplitPlanes{planes, (long long)s.head_dim * s.state, with_lo != 0});
}

// The chunk products with bf16 inputs, staged asynchronously (with ssd_chunk_scan_tc; the same
// blocks and sums as ssd_chunk_products). CB tiles: C and B copied as stored, fragments by
// ldmatrix, one plane each. Chunk-state tiles: x and B copied as stored; x's fragments
// (ldmatrix.trans) scaled by the chunk-state weights and split in registers. Eight warps,
// warp w owning rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32 of the 64 x 64 tile; the
// depth in slices of TC_SLICE through PRODUCT_STAGES stages, one barrier per slice.
#define PRODUCT_STAGES 3
#define PRODUCT_STAGE_BYTES (2 * TC_ROW64)

// A CB tile's slice q: C of the tile's rows (64 x 32 n) then B of its columns (64 x 32 n), rows
// of 64 bytes; 512 chunks of 16 bytes, two per thread.
__device__ __forceinline__ void stage_cb_slice(const in_t* __restrict__ x, const SsdArgs& s, long long b, int g,
                                               int t0, int i0, int j0, int q, unsigned int stage) {
#pragma unroll
    for (int e = threadIdx.x; e < 512; e += PRODUCT_THREADS) {
        const int part = e / 256, row = e % 256 / 4, c = e % 4;
        const int t = t0 + (part == 0 ? i0 : j0) + row;
        const bool ok = t < s.len;
        copy16(stage + part * TC_ROW64 + at64(row, c),
               x + (part == 0 ? s.c : s.b) + token_row(s, b, ok ? t : 0, g, s.groups, s.state) + q * TC_SLICE + 8 * c,
               ok);
    }
}

// A chunk-state tile's slice q: x (32 steps x 64 p) then B (32 steps x 64 n), rows of 128 bytes.
__device__ __forceinline__ void stage_state_slice(const in_t* __restrict__ x, const SsdArgs& s, const ChunkHead& k,
                                                  int p0, int n0, int q, unsigned int stage) {
#pragma unroll
    for (int e = threadIdx.x; e < 512; e += PRODUCT_THREADS) {
        const int part = e / 256, row = e % 256 / 8, c = e % 8;
        const int t = k.t0 + q * TC_SLICE + row, at = (part == 0 ? p0 : n0) + 8 * c;
        const bool ok = t < s.len && at < (part == 0 ? s.head_dim : s.state);
        const long long src = part == 0 ? s.x + token_row(s, k.b, ok ? t : 0, k.h, s.heads, s.head_dim)
                                        : s.b + token_row(s, k.b, ok ? t : 0, k.g, s.groups, s.state);
        copy16(stage + part * TC_ROW64 + at128(row, c), x + src + (ok ? at : 0), ok);
    }
}

// acc += C (this warp's 16 rows x 32 n) times B^T (32 n x this warp's 32 columns).
__device__ __forceinline__ void cb_slice(unsigned int stage, float (&acc)[4][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, m = lane / 8, r8 = lane % 8;
#pragma unroll
    for (int kk = 0; kk < TC_SLICE / 16; ++kk) {
        unsigned int a[4];
        fragments(stage + at64(16 * (warp % 4) + (m % 2) * 8 + r8, 2 * kk + m / 2), a);
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
            unsigned int b[4];
            fragments(stage + TC_ROW64 + at64(32 * (warp / 4) + 8 * (2 * jp + m / 2) + r8, 2 * kk + m % 2), b);
            mma_bf16(acc[2 * jp], a, b[0], b[1]);
            mma_bf16(acc[2 * jp + 1], a, b[2], b[3]);
        }
    }
}

// acc += (x weighted)^T (this warp's 16 p x the slice's 32 steps) times B (those steps x this
// warp's 32 n); weight: the chunk-state weights of the slice's steps on.
__device__ __forceinline__ void state_slice(unsigned int stage, const float* weight, float (&acc)[4][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, m = lane / 8, r8 = lane % 8, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < TC_SLICE / 16; ++kk) {
        unsigned int a[4], ah[4], al[4];
        fragments_transposed(stage + at128(16 * kk + (m / 2) * 8 + r8, 2 * (warp % 4) + m % 2), a);
#pragma unroll
        for (int f = 0; f < 4; ++f) {  // steps 2t, 2t + 1 (+8 from f = 2) of this k16 step
            const int j = 16 * kk + 2 * t + (f / 2) * 8;
            split_pair(__uint_as_float(a[f] << 16) * weight[j], __uint_as_float(a[f] & 0xffff0000u) * weight[j + 1],
                       ah[f], al[f]);
        }
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
            unsigned int b[4];
            fragments_transposed(
                stage + TC_ROW64 + at128(16 * kk + (m % 2) * 8 + r8, 4 * (warp / 4) + 2 * jp + m / 2), b);
            mma_bf16(acc[2 * jp], ah, b[0], b[1]);
            mma_bf16(acc[2 * jp], al, b[0], b[1]);
            mma_bf16(acc[2 * jp + 1], ah, b[2], b[3]);
            mma_bf16(acc[2 * jp + 1], al, b[2], b[3]);
        }
    }
}

// This thread's outputs of a 64 x 64 tile (rows row0 + r, columns col0 + c) as pairs:
// out(row, col, v0, v1) for each.
template <class Out>
__device__ __forceinline__ void tile_pairs(const float (&acc)[4][4], Out out) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int r0 = 16 * (warp % 4) + lane / 4, c0 = 32 * (warp / 4) + 2 * (lane % 4);
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half) out(r0 + 8 * half, c0 + 8 * n, acc[n][2 * half], acc[n][2 * half + 1]);
}

// A ring of STAGES shared-memory stages of STAGE_BYTES from `base`, slice q of a product in
// stage q % STAGES: start_stages issues the copies of the first STAGES - 1 slices (of
// `slices`), run_stages then takes the slices in order, each after a barrier once its copies
// have landed, issuing slice q + STAGES - 1's copies before multiplying slice q. stage(q, at)
// issues slice q's copies into the stage at shared address `at`, multiply(q, at) multiplies
// it. Every thread calls them.
template <int STAGES, int STAGE_BYTES, class Stage>
__device__ __forceinline__ void start_stages(int slices, unsigned int base, Stage stage) {
#pragma unroll
    for (int q = 0; q < STAGES - 1; ++q) {
        if (q < slices) stage(q, base + q * STAGE_BYTES);
        copies_commit();
    }
}
template <int STAGES, int STAGE_BYTES, class Stage, class Multiply>
__device__ __forceinline__ void run_stages(int slices, unsigned int base, Stage stage, Multiply multiply) {
    for (int q = 0; q < slices; ++q) {
        copies_wait<STAGES - 2>();
        __syncthreads();
        const int ahead = q + STAGES - 1;
        if (ahead < slices) stage(ahead, base + ahead % STAGES * STAGE_BYTES);
        copies_commit();
        multiply(q, base + q % STAGES * STAGE_BYTES);
    }
}

// Slices 0 .. slices - 1 of a product through PRODUCT_STAGES stages (start_stages, run_stages).
template <class Stage, class Multiply>
__device__ __forceinline__ void staged_product(int slices, unsigned int base, Stage stage, Multiply multiply) {
    start_stages<PRODUCT_STAGES, PRODUCT_STAGE_BYTES>(slices, base, stage);
    run_stages<PRODUCT_STAGES, PRODUCT_STAGE_BYTES>(slices, base, stage, multiply);
}

// ssd_chunk_products' blocks and outputs (the CB tiles, then the chunk-state tiles with dt' and
// cum). Three blocks per multiprocessor: 80 registers, no spills.
extern "C" __global__ void __launch_bounds__(PRODUCT_THREADS, 3)
    ssd_chunk_products_tc(const in_t* __restrict__ x, SsdArgs s, float* __restrict__ dtp, float* __restrict__ cum,
                          float* __restrict__ cb, float* __restrict__ states) {
    __shared__ __align__(128) unsigned char stages[PRODUCT_STAGES * PRODUCT_STAGE_BYTES];
    __shared__ float dt_c[SSD_Q], cum_c[SSD_Q], weight[SSD_Q];
    const unsigned int base = shared_address(stages);
    constexpr int LOWER_TILES = ROW_TILES * (ROW_TILES + 1) / 2;
    const long long cb_blocks = (long long)s.batch * s.chunks * s.groups * LOWER_TILES;
    float acc[4][4] = {};
    if (blockIdx.x < cb_blocks) {
        const long long bcg = blockIdx.x / LOWER_TILES;
        const int g = (int)(bcg % s.groups);
        const long long bc = bcg / s.groups;
        const int t0 = (int)(bc % s.chunks) * SSD_Q;
        const long long b = bc / s.chunks;
        int i0, j0;
        lower_tile((int)(blockIdx.x % LOWER_TILES), i0, j0);
        staged_product(
            s.state / TC_SLICE, base,
            [&](int q, unsigned int at) { stage_cb_slice(x, s, b, g, t0, i0, j0, q, at); },
            [&](int, unsigned int at) { cb_slice(at, acc); });
        tile_pairs(acc, [&](int r, int c, float v0, float v1) {
            *reinterpret_cast<float2*>(cb + (bcg * SSD_Q + i0 + r) * SSD_Q + j0 + c) = make_float2(v0, v1);
        });
        return;
    }
    const long long tile = blockIdx.x - cb_blocks;
    const int n_tiles = (s.state + TILE - 1) / TILE, p_tiles = (s.head_dim + TILE - 1) / TILE;
    const int p0 = (int)(tile % p_tiles) * TILE;
    const int n0 = (int)(tile / p_tiles % n_tiles) * TILE;
    const ChunkHead k = chunk_head(s, tile / p_tiles / n_tiles);
    chunk_steps(x, s, k.b * s.heads + k.h, k.c, dt_c, cum_c, n0 == 0 && p0 == 0, dtp, cum);
    for (int j = threadIdx.x; j < SSD_Q; j += PRODUCT_THREADS)
        weight[j] = __expf(cum_c[SSD_Q - 1] - cum_c[j]) * dt_c[j];
    staged_product(
        SSD_Q / TC_SLICE, base, [&](int q, unsigned int at) { stage_state_slice(x, s, k, p0, n0, q, at); },
        [&](int q, unsigned int at) { state_slice(at, weight + q * TC_SLICE, acc); });
    tile_pairs(acc, [&](int r, int c, float v0, float v1) {
        const int p = p0 + r, n = n0 + c;
        if (p < s.head_dim && n < s.state)
            *reinterpret_cast<float2*>(states + (k.bch * s.head_dim + p) * (long long)s.state + n) = make_float2(v0, v1);
    });
}

// Where a block of ssd_chunk_scan_tc works: (batch, chunk, head), its tile's first step i0
// within the chunk and first p0 of P.
struct ScanTile {
    ChunkHead k;
    long long bcg;  // (batch, chunk, group) of CB
    int i0, p0;
};

// Slice q of both products into the stage at `stage` (the off-diagonal's half first), where the
// product has one: 768 chunks of 16 bytes each, three per thread.
__device__ __forceinline__ void stage_slice(const in_t* __restrict__ x, const SsdArgs& s, const ScanTile& w,
                                            const float* __restrict__ cb, const unsigned short* __restrict__ planes,
                                            int q, unsigned int stage) {
    if (q < s.state / TC_SLICE) {
        const int n0 = q * TC_SLICE;
        const long long entries = (long long)s.head_dim * s.state;
#pragma unroll
        for (int e = threadIdx.x; e < 3 * 256; e += TC_THREADS) {
            const int part = e / 256, row = e % 256 / 4, c = e % 4;
            const unsigned int dst = stage + part * TC_ROW64 + at64(row, c);
            if (part == 0) {  // C of step i0 + row
                const int t = w.k.t0 + w.i0 + row;
                const bool ok = t < s.len;
                copy16(dst, x + s.c + token_row(s, w.k.b, ok ? t : 0, w.k.g, s.groups, s.state) + n0 + 8 * c, ok);
            } else {  // S_in's plane part - 1 at p0 + row
                const int p = w.p0 + row;
                const bool ok = p < s.head_dim;
                copy16(dst, planes + (w.k.bch * 2 + part - 1) * entries + (long long)(ok ? p : 0) * s.state + n0 + 8 * c,
                       ok);
            }
        }
    }
    if (q < (w.i0 + TILE) / TC_SLICE) {
        const int j0 = q * TC_SLICE;
        stage += TC_HALF;
#pragma unroll
        for (int e = threadIdx.x; e < 3 * 256; e += TC_THREADS) {
            if (e < 512) {  // CB rows i0 + row, steps j0 .. j0 + 31
                const int row = e / 8, c = e % 8;
                copy16(stage + at128(row, c), cb + (w.bcg * SSD_Q + w.i0 + row) * SSD_Q + j0 + 4 * c, true);
            } else {  // x of step j0 + row
                const int row = (e - 512) / 8, c = (e - 512) % 8;
                const int t = w.k.t0 + j0 + row, p = w.p0 + 8 * c;
                const bool ok = t < s.len && p < s.head_dim;
                copy16(stage + 2 * TC_ROW64 + at128(row, c),
                       x + s.x + token_row(s, w.k.b, ok ? t : 0, w.k.h, s.heads, s.head_dim) + (ok ? p : 0), ok);
            }
        }
    }
}

// acc += C (this warp's 16 steps x 32 n) times S_in (32 n x 64 p), S_in as hi and lo.
__device__ __forceinline__ void off_diagonal_slice(unsigned int stage, float (&acc)[8][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4, m = lane / 8, r8 = lane % 8;
#pragma unroll
    for (int kk = 0; kk < TC_SLICE / 16; ++kk) {
        unsigned int a[4];
        {
            const int row = 16 * warp + (m % 2) * 8 + r8;
            fragments(stage + at64(row, 2 * kk + m / 2), a);
        }
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
            const int row = 8 * (2 * jp + m / 2) + r8, at = at64(row, 2 * kk + m % 2);
            unsigned int hi[4], lo[4];
            fragments(stage + TC_ROW64 + at, hi);
            fragments(stage + 2 * TC_ROW64 + at, lo);
            mma_bf16(acc[2 * jp], a, hi[0], hi[1]);
            mma_bf16(acc[2 * jp], a, lo[0], lo[1]);
            mma_bf16(acc[2 * jp + 1], a, hi[2], hi[3]);
            mma_bf16(acc[2 * jp + 1], a, lo[2], lo[3]);
        }
    }
}

// acc += M (this warp's 16 steps x steps j0 .. j0 + 31) times x (those steps x 64 p), with
// M[i][j] = CB[i][j] exp(cum_i - cum_j) dt'_j for j <= i, else 0 (masked by selection: above
// the diagonal the exponential can overflow). cum_rows: cum of the lane's two rows.
__device__ __forceinline__ void diagonal_slice(const unsigned char* stages, unsigned int stage_at, int i0, int j0,
                                               const float* cum_c, const float* dt_c, const float (&cum_rows)[2],
                                               float (&acc)[8][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4, m = lane / 8, r8 = lane % 8;
    const int g = lane / 4, t = lane % 4;
    const unsigned int stage = shared_address(stages) + stage_at;
#pragma unroll
    for (int kk = 0; kk < TC_SLICE / 16; ++kk) {
        if (j0 + 16 * kk > i0 + 16 * warp + 15) break;  // past this warp's last row
        unsigned int ah[4], al[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) {  // rows g (+8 for odd f), columns 2t, 2t + 1 (+8 from f = 2)
            const int row = 16 * warp + g + (f % 2) * 8, col = 16 * kk + 2 * t + (f / 2) * 8;
            const float2 v = *reinterpret_cast<const float2*>(stages + stage_at + at128(row, col / 4) + col % 4 * 4);
            const int i = i0 + row, j = j0 + col;
            const float d0 = __expf(cum_rows[f % 2] - cum_c[j]) * dt_c[j] * v.x;
            const float d1 = __expf(cum_rows[f % 2] - cum_c[j + 1]) * dt_c[j + 1] * v.y;
            split_pair(j <= i ? d0 : 0.0f, j + 1 <= i ? d1 : 0.0f, ah[f], al[f]);
        }
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
            const int row = 16 * kk + (m % 2) * 8 + r8;
            unsigned int b[4];
            fragments_transposed(stage + 2 * TC_ROW64 + at128(row, 2 * jp + m / 2), b);
            mma_bf16(acc[2 * jp], ah, b[0], b[1]);
            mma_bf16(acc[2 * jp], al, b[0], b[1]);
            mma_bf16(acc[2 * jp + 1], ah, b[2], b[3]);
            mma_bf16(acc[2 * jp + 1], al, b[2], b[3]);
        }
    }
}

// y as ssd_chunk_scan computes it. Grid: (batch * chunks * heads, P tiles * ROW_TILES); block
// TC_THREADS; dynamic shared memory TC_STAGES * TC_STAGE_BYTES. Three blocks per multiprocessor
// (80 registers, 20 bytes spilled): measured on the H200 against two blocks (125 registers) and
// against three or four stages, all slower (CUDA_NOTES).
extern "C" __global__ void __launch_bounds__(TC_THREADS, 3)
    ssd_chunk_scan_tc(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ dtp,
                      const float* __restrict__ cum, const float* __restrict__ cb,
                      const unsigned short* __restrict__ planes, float* __restrict__ y) {
    extern __shared__ __align__(128) unsigned char tc_stages[];
    __shared__ float cum_c[SSD_Q], dt_c[SSD_Q];
    ScanTile w;
    w.k = chunk_head(s, blockIdx.x);
    w.bcg = w.k.bc * s.groups + w.k.g;
    const int p_tiles = (s.head_dim + TILE - 1) / TILE;
    w.p0 = (int)(blockIdx.y % p_tiles) * TILE;
    w.i0 = (int)(blockIdx.y / p_tiles) * TILE;
    const unsigned int base = shared_address(tc_stages);
    const int off_slices = s.state / TC_SLICE, diagonal_slices = (w.i0 + TILE) / TC_SLICE;
    const int slices = max(off_slices, diagonal_slices);
    const auto stage = [&](int q, unsigned int at) { stage_slice(x, s, w, cb, planes, q, at); };
    start_stages<TC_STAGES, TC_STAGE_BYTES>(slices, base, stage);
    stage_steps(s, w.k, dtp, cum, dt_c, cum_c, w.i0 + TILE);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const bool diagonal = warp >= 4;
    const int r0 = 16 * (warp % 4) + g;  // the lane's rows of the tile: r0, r0 + 8
    float acc[8][4] = {};
    run_stages<TC_STAGES, TC_STAGE_BYTES>(slices, base, stage, [&](int q, unsigned int at) {
        if (!diagonal && q < off_slices) {
            off_diagonal_slice(at, acc);
            if (q == off_slices - 1) {
                const float scale[2] = {__expf(cum_c[w.i0 + r0]), __expf(cum_c[w.i0 + r0 + 8])};
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[n][e] *= scale[e / 2];
            }
        } else if (diagonal && q < diagonal_slices) {
            const float cum_rows[2] = {cum_c[w.i0 + r0], cum_c[w.i0 + r0 + 8]};
            diagonal_slice(tc_stages, at - base + TC_HALF, w.i0, q * TC_SLICE, cum_c, dt_c, cum_rows, acc);
        }
    });
    // The diagonal group's sums to the off-diagonal group, through the stages (free once every
    // warp is past its last slice).
    copies_wait<0>();
    __syncthreads();
    float(*sums)[TILE + PAD] = reinterpret_cast<float(*)[TILE + PAD]>(tc_stages);
    if (diagonal) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sums[r0 + (e / 2) * 8][8 * n + 2 * t + e % 2] = acc[n][e];
    }
    __syncthreads();
    if (diagonal) return;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] += sums[r0 + (e / 2) * 8][8 * n + 2 * t + e % 2];
    // The D skip and the z gate; each lane's outputs come in pairs of adjacent p.
    const ChunkHead& k = w.k;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int step = k.t0 + w.i0 + r0 + 8 * half, p = w.p0 + 8 * n + 2 * t;
            if (step >= s.len || p >= s.head_dim) continue;
            const long long at = token_row(s, k.b, step, k.h, s.heads, s.head_dim) + p;
            float v[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const float skip = s.d < 0 ? 0.0f : ld(x, s.d + (s.d_per_p ? k.h * s.head_dim + p + q : k.h));
                v[q] = acc[n][2 * half + q] + skip * ld(x, s.x + at + q);
                if (s.z >= 0) v[q] *= silu(ld(x, s.z + at + q));
            }
            *reinterpret_cast<float2*>(y + at) = make_float2(v[0], v[1]);
        }
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// Backward (compiled with SSD_BWD, in a variant of its own chunk length): the gradients of
// every input given g_y and g_final, in the CPU backward's chunked form (`ssd::ssd_backward`).
// With go = g_y silu(z) (g_y without z) and, per chunk, l_ij = exp(cum_i - cum_j) for j <= i
// (else 0), into_j = exp(cum_last - cum_j), w_j = into_j dt'_j, S_in the state entering the
// chunk and G the gradient of the state leaving it:
//
//   GX = go X^T              M = CB ∘ l ∘ dt'_j        W = GX ∘ l ∘ dt'_j
//   g_X = M^T go + w ∘ (B G^T) + D go       g_B = W^T C + w ∘ (X G)
//   g_C = W B + exp(cum) ∘ (go S_in)
//   g_dt'_j (direct) = sum_i (CB ∘ l ∘ GX)_ij + into_j x_j . (G B_j)
//   g_cum_i = rowsum_i(M ∘ GX) - colsum_i(M ∘ GX) + exp(cum_i) go_i . (S_in C_i) - w_i x_i . (G B_i)
//             [+ sum_j w_j x_j . (G B_j) + exp(cum_last) <G, S_in> at the last step]
//   g_dt'_j += A sum_{i >= j} g_cum_i,       g_A += sum_i g_cum_i sum_{j <= i} dt'_j
//
// and G runs backwards over the chunks as the states run forwards: G(last) = g_final,
// G(c-1) = exp(cum_last(c)) G(c) + sum_i exp(cum_i) outer(go_i, C_i); what leaves the first
// chunk is g_initial_states. Kernels, after the forward ones (ssd_chunk_products and
// ssd_state_passing, or their staged versions where the forward would stage them; with z, the
// chunk scan without the gate for the ungated output):
//   ssd_bwd_gate          with z: go, and g_z = g_y out silu'(z);
//   ssd_bwd_own_states    each chunk's sum_i exp(cum_i) outer(go_i, C_i);
//   ssd_bwd_state_passing G(c) over the chunks, from the end, and g_initial_states;
//   (ssd_bwd_states_tc    both in one walk over the chunks, with bf16 inputs where the launcher
//                         has enough (batch, head) tiles for it;)
//   ssd_bwd_chunk         one (batch, chunk, head): everything above, in shared memory;
//   ssd_bwd_group_sum     g_B and g_C: the heads' shares added over each group's heads;
//   sum_parts             g_A, g_D and g_dt_bias: the chunks' parts added in order.
// Every sum runs in a fixed order (no float atomics): every run gives the same bits.
#ifdef SSD_BWD
// BWD_THREADS (ssd_bwd_chunk's block) is defined by the launcher (launch.rs).
#define BWD_OWN_THREADS 256  // ssd_bwd_own_states' (SSD_BWD_OWN_THREADS in launch.rs)

// Where each gradient goes in the flat output (element offsets; -1 for an absent input).
struct SsdGradsAt {
    long long x, dt, a, b, c, d, z, dt_bias, initial_states;
};

// With z: go = g_y silu(z) and g_z = g_y out silu'(z) (without z, go is g_y itself). One element
// per thread.
extern "C" __global__ void ssd_bwd_gate(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ grad,
                                        const float* __restrict__ out, float* __restrict__ go,
                                        grad_t* __restrict__ grads, SsdGradsAt at) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)s.batch * s.len * s.heads * s.head_dim) return;
    const float g = grad[e];
    const float z = ld(x, s.z + e);
    go[e] = g * silu(z);
    grads[at.z + e] = to_grad(g * out[e] * silu_grad(z));
}

// A shared matrix's cells: bf16 (its bits, rounded to nearest) for bf16 inputs, f32 otherwise.
// With bf16 cells the products run as bf16 mma.sync m16n8k16 with f32 sums, their operands
// loaded by ldmatrix, and ssd_bwd_chunk's matrices take half the space: two blocks fit a
// multiprocessor. The bf16 inputs (x, B, C) are exact; the f32 intermediates (go, the states
// and their gradients, M and W) are rounded to bf16, as mamba_ssm's Triton backward rounds them
// for its products; so are the heads' shares of g_B and g_C before they are added over a group
// (in f32). The diagonal block's sums, which g_dt and g_A take as differences, use CB
// and GX as f32 (masked_products_and_diagonal_sums).
#ifdef IN_BF16
#define BWD_BLOCKS 2  // ssd_bwd_chunk's blocks to a multiprocessor (64 registers a thread)
typedef unsigned short cell_t;
__device__ __forceinline__ cell_t to_cell(float v) { return bf16_bits(v); }
__device__ __forceinline__ float from_cell(cell_t c) { return __uint_as_float((unsigned int)c << 16); }
#else
#define BWD_BLOCKS 1
typedef float cell_t;
__device__ __forceinline__ cell_t to_cell(float v) { return v; }
__device__ __forceinline__ float from_cell(cell_t c) { return c; }
#endif

// A matrix in shared memory, `width` cells a row (pad_width: zeros past the values): element
// (r, c) at p[r * width + (c ^ swizzle(r))].
//   f32 cells: widths a multiple of 32; the swizzle moves a row's columns by 8 (r % 4) + 4 (r / 4
//   % 2), so that the tf32 fragment loads below, eight rows by four columns or four rows by eight
//   columns, meet 32 distinct banks either way.
//   bf16 cells: widths a multiple of 64 (rows of 128 bytes); the swizzle XORs a row's 16-byte
//   chunks with r % 8, so that the eight rows of an ldmatrix matrix meet distinct banks.
struct Shared {
    cell_t* p;
    int width;
};
#ifdef IN_BF16
__device__ __forceinline__ int swizzle(int r) { return (r & 7) << 3; }
__device__ __forceinline__ int pad_width(int n) { return (n + 63) & ~63; }
#else
__device__ __forceinline__ int swizzle(int r) { return (r & 3) << 3 | (r & 4); }
__device__ __forceinline__ int pad_width(int n) { return (n + 31) & ~31; }
#endif
__device__ __forceinline__ cell_t& cell(Shared m, int r, int c) { return m.p[r * m.width + (c ^ swizzle(r))]; }
__device__ __forceinline__ float get(Shared m, int r, int c) { return from_cell(cell(m, r, c)); }
__device__ __forceinline__ void put(Shared m, int r, int c, float v) { cell(m, r, c) = to_cell(v); }

// An operand of a product: a shared matrix as it is (Rows) or transposed (Cols).
struct Rows {
    Shared m;
};
struct Cols {
    Shared m;
};

extern __shared__ float bwd_smem[];
// The cells of bwd_smem from its start, and the floats past n of them.
__device__ __forceinline__ cell_t* shared_cells() { return reinterpret_cast<cell_t*>(bwd_smem); }
__device__ __forceinline__ float* floats_after(cell_t* p, int n) { return reinterpret_cast<float*>(p + n); }

#ifdef IN_BF16
// One ldmatrix x4 gives a lane's fragment registers for 16 outer indices (A's rows r0 .. r0 + 16,
// or B's columns c0 .. c0 + 16, two n tiles) by 16 depths k .. k + 16: matrix i (the addresses
// of lanes 8 i .. 8 i + 7, one row each) holds outer half `outer_half` and depth half
// `depth_half`, both functions of i (A: a0 .. a3 = outer halves 0, 1, 0, 1 of depth halves 0, 0,
// 1, 1; B: b0, b1 of the first n tile, then of the second = depth halves 0, 1, 0, 1 of outer
// halves 0, 0, 1, 1). Depth runs in steps of 64 (kb), four of 16 (s) each.
//   Along: the depth runs along the shared matrix's rows (A as Rows, B as Cols): ldmatrix, lane
//   l addressing row outer0 + 8 outer_half + l % 8, chunk (kb + 16 s + 8 depth_half) / 8
//   swizzled; kb / 8 is a multiple of 8, so only 2 s + depth_half meets the swizzle.
//   Down: the depth runs down the rows (A as Cols, B as Rows): ldmatrix.trans, lane l addressing
//   row kb + 16 s + 8 depth_half + l % 8 at chunk outer0 / 8 + outer_half, whose swizzle is the
//   same for every kb and s.
struct Along {
    unsigned int row;
    int off[4];
    __device__ __forceinline__ Along(Shared m, int outer0, int outer_half, int depth_half) {
        const int l = threadIdx.x % 32;
        row = shared_address(m.p + (outer0 + 8 * outer_half + l % 8) * m.width);
#pragma unroll
        for (int s = 0; s < 4; ++s) off[s] = 16 * ((2 * s + depth_half) ^ (l & 7));
    }
    __device__ __forceinline__ void load(int kb, int s, unsigned int (&r)[4]) const {
        fragments(row + 2 * kb + off[s], r);
    }
};
struct Down {
    unsigned int at;
    int stride;
    __device__ __forceinline__ Down(Shared m, int outer0, int outer_half, int depth_half) : stride(2 * m.width) {
        const int l = threadIdx.x % 32;
        const int chunk = (outer0 / 8 + outer_half) ^ (l & 7);
        at = shared_address(m.p + (8 * depth_half + l % 8) * m.width + 8 * chunk);
    }
    __device__ __forceinline__ void load(int kb, int s, unsigned int (&r)[4]) const {
        fragments_transposed(at + (kb + 16 * s) * stride, r);
    }
};
__device__ __forceinline__ Along a_lanes(Rows a, int r0) {
    const int i = threadIdx.x % 32 / 8;
    return Along(a.m, r0, i % 2, i / 2);
}
__device__ __forceinline__ Down a_lanes(Cols a, int r0) {
    const int i = threadIdx.x % 32 / 8;
    return Down(a.m, r0, i % 2, i / 2);
}
__device__ __forceinline__ Along b_lanes(Cols b, int c0) {
    const int i = threadIdx.x % 32 / 8;
    return Along(b.m, c0, i / 2, i % 2);
}
__device__ __forceinline__ Down b_lanes(Rows b, int c0) {
    const int i = threadIdx.x % 32 / 8;
    return Down(b.m, c0, i / 2, i % 2);
}

// acc[j] += a(r0 .. r0 + 16, k) b(k, c0 + 8 j .. + 8), k < depth (a multiple of 64).
template <int NT, class A, class B>
__device__ __forceinline__ void multiply_into(float (&acc)[NT][4], int r0, int c0, int depth, A a, B b) {
    static_assert(NT == 2, "one ldmatrix x4 of B covers two n tiles");
    const auto av = a_lanes(a, r0);
    const auto bv = b_lanes(b, c0);
    for (int kb = 0; kb < depth; kb += 64) {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            unsigned int af[4], bf[4];
            av.load(kb, s, af);
            bv.load(kb, s, bf);
            mma_bf16(acc[0], af, bf[0], bf[1]);
            mma_bf16(acc[1], af, bf[2], bf[3]);
        }
    }
}
#else
// With f32 cells the products run on tensor cores as tf32 mma.sync m16n8k8 with f32 sums: each
// operand value is split into hi (its top 19 bits, exact in tf32) and lo = v - hi (whose bits
// past tf32 the tensor cores ignore), and a product is hi hi + hi lo + lo hi: about f32's
// precision.
struct Tf32 {
    unsigned int hi, lo;
};
__device__ __forceinline__ Tf32 split(float v) {
    const unsigned int hi = __float_as_uint(v) & 0xffffe000u;
    return {hi, __float_as_uint(v - __uint_as_float(hi))};
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                         unsigned int b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragments of m16n8k8, g = lane / 4, t = lane % 4: a at rows g, g + 8 and depths t, t + 4; b
// at depths t, t + 4 and column g; acc[j][e] at row g (+8 for e >= 2) and column 8 j + 2 t (+1
// for odd e). A lane's fragment values of an operand, for one tile, are at fixed indices
// base + 8 f + g (f < F: A's rows r0 + g, r0 + g + 8; B's columns c0 + 8 j + g) and depths
// k + t + 4 h, k = kb + 8 q (kb a multiple of 32, q < 4). Their addresses are worked out once per
// tile, so that a load in the depth loop costs one addition:
//   along a row of the shared matrix (A as Rows, B as Cols): row[f][kb + off[q][h]], off the
//   swizzled place of depth 8 q + 4 h + t in a row congruent to g modulo 8 (the same for every f);
//   down a column (A as Cols, B as Rows): column[f][h][(kb + 8 q) width].
//
// Addresses are byte offsets into the backward kernels' dynamic shared memory (bwd_smem).
__device__ __forceinline__ int byte_at(const float* p) {
    return (int)(reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(bwd_smem));
}
__device__ __forceinline__ float shared_at(int byte) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(bwd_smem) + byte);
}
template <int F>
struct Along {
    int row[F];
    int off[4][2];
    __device__ __forceinline__ Along(Shared m, int base) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
        for (int f = 0; f < F; ++f) row[f] = byte_at(m.p + (base + 8 * f + g) * m.width);
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int h = 0; h < 2; ++h) off[q][h] = 4 * (((8 * q + 4 * h) ^ swizzle(g)) + t);
    }
    __device__ __forceinline__ float value(int f, int kb, int q, int h) const {
        return shared_at(row[f] + 4 * kb + off[q][h]);
    }
};
template <int F>
struct Down {
    int column[F][2];
    int width;
    __device__ __forceinline__ Down(Shared m, int base) : width(m.width) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
        for (int f = 0; f < F; ++f)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                column[f][h] = byte_at(m.p + (t + 4 * h) * m.width + ((base + 8 * f + g) ^ swizzle(t + 4 * h)));
    }
    __device__ __forceinline__ float value(int f, int kb, int q, int h) const {
        return shared_at(column[f][h] + 4 * (kb + 8 * q) * width);
    }
};
__device__ __forceinline__ Along<2> a_view(Rows a, int r0) { return Along<2>(a.m, r0); }
__device__ __forceinline__ Down<2> a_view(Cols a, int r0) { return Down<2>(a.m, r0); }
template <int NT>
__device__ __forceinline__ Down<NT> b_view(Rows b, int c0) {
    return Down<NT>(b.m, c0);
}
template <int NT>
__device__ __forceinline__ Along<NT> b_view(Cols b, int c0) {
    return Along<NT>(b.m, c0);
}

// acc[j] += a(r0 .. r0 + 16, k) b(k, c0 + 8 j .. + 8), k < depth (a multiple of 32).
template <int NT, class A, class B>
__device__ __forceinline__ void multiply_into(float (&acc)[NT][4], int r0, int c0, int depth, A a, B b) {
    const auto av = a_view(a, r0);
    const auto bv = b_view<NT>(b, c0);
    float fix[NT][4] = {};  // the hi lo and lo hi terms, kept apart so that they chain less
    for (int kb = 0; kb < depth; kb += 32) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const Tf32 as[4] = {split(av.value(0, kb, q, 0)), split(av.value(1, kb, q, 0)),
                                split(av.value(0, kb, q, 1)), split(av.value(1, kb, q, 1))};
            const unsigned int a_hi[4] = {as[0].hi, as[1].hi, as[2].hi, as[3].hi};
            const unsigned int a_lo[4] = {as[0].lo, as[1].lo, as[2].lo, as[3].lo};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const Tf32 b0 = split(bv.value(j, kb, q, 0)), b1 = split(bv.value(j, kb, q, 1));
                mma_tf32(acc[j], a_hi, b0.hi, b1.hi);
                mma_tf32(fix[j], a_hi, b0.lo, b1.lo);
                mma_tf32(fix[j], a_lo, b0.hi, b1.hi);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] += fix[j][e];
}

#endif

// dst[at] = v0 and, with `second`, dst[at + 1] = v1: one 8-byte store where both go and `at` is
// even (the kernels' buffers start 8-byte aligned).
__device__ __forceinline__ void store_pair(float* dst, long long at, float v0, float v1, bool second) {
    if (second && (at & 1) == 0) {
        *reinterpret_cast<float2*>(dst + at) = make_float2(v0, v1);
        return;
    }
    dst[at] = v0;
    if (second) dst[at + 1] = v1;
}
#ifdef IN_BF16
// The same into bf16 cells (or gradients): one 4-byte store for an aligned pair, the same
// rounding (`cvt.rn`) either way.
__device__ __forceinline__ void store_pair(cell_t* dst, long long at, float v0, float v1, bool second) {
    if (second && (at & 1) == 0) {
        *reinterpret_cast<unsigned int*>(dst + at) = bf16x2(v0, v1);
        return;
    }
    dst[at] = to_grad(v0);
    if (second) dst[at + 1] = to_grad(v1);
}
#endif

// An m x n result from operands in shared memory, in the order
//   out = a1 b1 (depth k1);  with dot.p: part[r * pad_width(n) / 8 + q] = sum over the columns
//   8 q .. 8 q + 7 of out[r][c] dot(r, c);  out[r][.] *= scale(r);  out += a2 b2 (depth k2);
//   emit(r, c, out[r][c], out[r][c + 1], c + 1 < n) for r < m and even c < n.
// Sizes are rounded up by pad_width (the operands' zero padding). Each warp takes tiles of
// 16 rows by 8 PRODUCT_NT columns.
#define PRODUCT_NT 2
template <class A1, class B1, class A2, class B2, class Scale, class Emit>
__device__ void two_products(int m, int n, int k1, A1 a1, B1 b1, Shared dot, float* part, Scale scale, int k2,
                             A2 a2, B2 b2, Emit emit) {
    constexpr int NT = PRODUCT_NT;
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const int col_tiles = pad_width(n) / (8 * NT), parts = pad_width(n) / 8;
    for (int tile = threadIdx.x / 32; tile < pad_width(m) / 16 * col_tiles; tile += blockDim.x / 32) {
        const int r0 = tile / col_tiles * 16, c0 = tile % col_tiles * 8 * NT;
        float acc[NT][4] = {};
        multiply_into(acc, r0, c0, pad_width(k1), a1, b1);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int c = c0 + 8 * j + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + g + 8 * h;
                if (dot.p != nullptr) {
                    float d = acc[j][2 * h] * get(dot, r, c) + acc[j][2 * h + 1] * get(dot, r, c + 1);
                    d = lane_group_sum(d, 4);
                    if (t == 0) part[r * parts + c0 / 8 + j] = d;
                }
                const float sc = scale(r);
                acc[j][2 * h] *= sc;
                acc[j][2 * h + 1] *= sc;
            }
        }
        multiply_into(acc, r0, c0, pad_width(k2), a2, b2);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + g + 8 * h, c = c0 + 8 * j + 2 * t;
                if (r < m && c < n) emit(r, c, acc[j][2 * h], acc[j][2 * h + 1], c + 1 < n);
            }
    }
}

// dst's first `tall` rows: value(r, c) for r < rows and c < cols, zeros past them. Warp w takes
// rows w, w + warps, ... and lane l columns l, l + 32, ...: each thread issues the loads of
// STAGE_ROWS rows by STAGE_SEGMENTS columns before it stores them (one at a time, every load
// would wait out its latency in turn), and no value's place takes a division.
#define STAGE_ROWS 4
#define STAGE_SEGMENTS 4
template <int ROWS = STAGE_ROWS, class Value>
__device__ __forceinline__ void stage_matrix(int tall, int rows, int cols, Value value, Shared dst) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32, segments = dst.width / 32;
    for (int r0 = threadIdx.x / 32; r0 < tall; r0 += ROWS * warps)
        for (int s0 = 0; s0 < segments; s0 += STAGE_SEGMENTS) {
            float v[ROWS][STAGE_SEGMENTS];
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
#pragma unroll
                for (int q = 0; q < STAGE_SEGMENTS; ++q) {
                    const int r = r0 + i * warps, c = lane + 32 * (s0 + q);
                    v[i][q] = r < rows && c < cols ? value(r, c) : 0.0f;
                }
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
#pragma unroll
                for (int q = 0; q < STAGE_SEGMENTS; ++q) {
                    const int r = r0 + i * warps;
                    if (r < tall && s0 + q < segments) put(dst, r, lane + 32 * (s0 + q), v[i][q]);
                }
        }
}

// One f32 from device memory to shared memory, asynchronously (cp.async), or a zero where not
// `valid` (src is then not read). A thread's copies have landed after copies_done().
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
    const unsigned int to = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(to), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void copies_done() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// stage_matrix from f32 rows in device memory (row r at row(r)). Into f32 cells with
// asynchronous copies: no thread waits for a load before it issues the next; warp w takes rows
// w, w + warps, ... and lane l columns l, l + 32, ... Into bf16 cells through registers, rounded.
template <class Row>
__device__ __forceinline__ void copy_matrix(int tall, int rows, int cols, Row row, Shared dst) {
#ifdef IN_BF16
    stage_matrix(
        tall, rows, cols, [&](int r, int c) { return row(r)[c]; }, dst);
#else
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int r = threadIdx.x / 32; r < tall; r += warps) {
        const float* src = row(min(r, rows - 1));
        for (int c = lane; c < dst.width; c += 32) {
            const bool valid = r < rows && c < cols;
            copy_async(&cell(dst, r, c), valid ? src + c : src, valid);
        }
    }
#endif
}

// copy_matrix from rows of cells in device memory (row r at row(r)): f32 cells as copy_matrix;
// bf16 cells 16 bytes (eight cells, which the swizzle keeps together) at a time with
// asynchronous copies where the rows are whole 16-byte chunks (cols a multiple of 8), through
// registers otherwise.
template <class Row>
__device__ __forceinline__ void copy_cells(int tall, int rows, int cols, Row row, Shared dst) {
#ifdef IN_BF16
    if (cols % 8 == 0) {
        const int chunks = dst.width / 8;
        for (int e = threadIdx.x; e < tall * chunks; e += blockDim.x) {
            const int r = e / chunks, c = 8 * (e % chunks);
            const bool valid = r < rows && c < cols;
            copy16(shared_address(&cell(dst, r, c)), valid ? row(r) + c : row(0), valid);
        }
    } else {
        stage_matrix(
            tall, rows, cols, [&](int r, int c) { return from_cell(row(r)[c]); }, dst);
    }
#else
    copy_matrix(tall, rows, cols, row, dst);
#endif
}

// Rows t0 .. t0 + SSD_Q of a (batch, L, K, width) input at inner index k into dst (zeros past
// the sequence): copied asynchronously when f32, through registers into bf16 cells when bf16.
__device__ __forceinline__ void stage_input_rows(const in_t* __restrict__ x, const SsdArgs& s, long long offset,
                                                 long long b, int t0, int k, int inner, int width, Shared dst) {
#ifdef IN_BF16
    stage_matrix(
        SSD_Q, min(SSD_Q, s.len - t0), width,
        [&](int r, int c) { return ld(x, offset + token_row(s, b, t0 + r, k, inner, width) + c); }, dst);
#else
    copy_matrix(
        SSD_Q, min(SSD_Q, s.len - t0), width,
        [&](int r) { return x + offset + token_row(s, b, t0 + r, k, inner, width); }, dst);
#endif
}

// The same from f32 (batch, L, H, P) rows (go), copied asynchronously.
__device__ __forceinline__ void copy_float_rows(const float* __restrict__ src, const SsdArgs& s, const ChunkHead& k,
                                                Shared dst) {
    const int width = s.head_dim;
    copy_matrix(
        SSD_Q, min(SSD_Q, s.len - k.t0), width,
        [&](int r) { return src + token_row(s, k.b, k.t0 + r, k.h, s.heads, width); }, dst);
}

// The chunk's B and C rows (its head's group) into bs and the SSD_Q rows after it (cs, alike):
// copied asynchronously when f32; when bf16, through registers into bf16 cells as one matrix of
// 2 SSD_Q rows, twice the loads in flight.
__device__ __forceinline__ void stage_group_rows(const in_t* __restrict__ x, const SsdArgs& s, const ChunkHead& k,
                                                 Shared bs) {
#ifdef IN_BF16
    const int valid = min(SSD_Q, s.len - k.t0);
    stage_matrix<2 * STAGE_ROWS>(
        2 * SSD_Q, 2 * SSD_Q, s.state,
        [&](int r, int n) {
            const int i = r % SSD_Q;
            const long long at = (r < SSD_Q ? s.b : s.c) + token_row(s, k.b, k.t0 + i, k.g, s.groups, s.state);
            return i < valid ? ld(x, at + n) : 0.0f;
        },
        bs);
#else
    stage_input_rows(x, s, s.b, k.b, k.t0, k.g, s.groups, s.state, bs);
    stage_input_rows(x, s, s.c, k.b, k.t0, k.g, s.groups, s.state, Shared{bs.p + SSD_Q * bs.width, bs.width});
#endif
}

// Each chunk's own share of the gradient of the state entering it, sum_i exp(cum_i)
// outer(go_i, C_i), into own (batch, chunks, H, P, N). One (batch, chunk, head) per block;
// dynamic shared memory: go scaled (SSD_Q x pad_width(P)), C (SSD_Q x pad_width(N)), exp(cum).
extern "C" __global__ void __launch_bounds__(BWD_OWN_THREADS)
    ssd_bwd_own_states(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ go,
                       const float* __restrict__ cum, float* __restrict__ own) {
    const int np = s.head_dim, nn = s.state;
    const Shared gos{shared_cells(), pad_width(np)};
    const Shared cs{gos.p + SSD_Q * gos.width, pad_width(nn)};
    float* scale = floats_after(cs.p, SSD_Q * cs.width);  // exp(cum_i)
    const ChunkHead k = chunk_head(s, blockIdx.x);
    copy_float_rows(go, s, k, gos);
    stage_input_rows(x, s, s.c, k.b, k.t0, k.g, s.groups, nn, cs);
    for (int j = threadIdx.x; j < SSD_Q; j += blockDim.x) scale[j] = __expf(cum[chunk_step0(s, k) + j]);
    copies_done();
    __syncthreads();
    // go's rows scaled in place.
    for (int i = threadIdx.x / 32; i < SSD_Q; i += blockDim.x / 32)
        for (int p = threadIdx.x % 32; p < gos.width; p += 32) put(gos, i, p, get(gos, i, p) * scale[i]);
    __syncthreads();
    const Rows none{{nullptr, 0}};
    two_products(
        np, nn, SSD_Q, Cols{gos}, Rows{cs}, none.m, nullptr, [](int) { return 1.0f; }, 0, none, none,
        [&](int p, int n, float v0, float v1, bool second) {
            store_pair(own, (k.bch * np + p) * (long long)nn + n, v0, v1, second);
        });
}

#ifdef IN_BF16
// The running value as a bf16 cell at the chunk's index: what ssd_bwd_chunk's shared matrices
// take.
struct ToCells {
    cell_t* cells;
    __device__ __forceinline__ void operator()(long long at, long long, float running) const {
        cells[at] = to_cell(running);
    }
};
#endif

// G(c) over the chunks from the last, as ssd_bwd_chunk's cells: into g_cells (batch, chunks, H,
// P, N) with bf16 cells, in place of own(c) with f32 cells. G(c) is the gradient of the state
// leaving chunk c (g_final for the last), and G(c-1) = exp(cum_last(c)) G(c) + own(c); what
// reaches the front is g_initial_states. One (p, n) entry per thread, as ssd_state_passing.
// Grid: (batch * heads, P * N / blockDim.x).
extern "C" __global__ void ssd_bwd_state_passing(SsdArgs s, const float* __restrict__ cum,
                                                 const float* __restrict__ g_final, float* __restrict__ own,
#ifdef IN_BF16
                                                 cell_t* __restrict__ g_cells,
#endif
                                                 grad_t* __restrict__ grads, SsdGradsAt at_grad) {
#ifdef IN_BF16
    const ToCells store{g_cells};
#else
    const InPlace store{own};
#endif
    const long long bh = blockIdx.x;
    const long long entries = (long long)s.head_dim * s.state;
    const long long e = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= entries) return;
    const float front = pass_chunks<true>(s, cum, own, store, bh, e, g_final[bh * entries + e]);
    if (at_grad.initial_states >= 0) grads[at_grad.initial_states + bh * entries + e] = to_grad(front);
}

#ifdef IN_BF16
// ---------------------------------------------------------------------------------------------
// ssd_bwd_own_states and ssd_bwd_state_passing in one kernel, with bf16 inputs (the launcher's
// choice where the forward is staged and go starts 16-byte aligned): each block walks the chunks
// from the last, keeping G for its 64 x 32 tile of (p, n) in registers; per chunk it writes G(c)
// as cells, multiplies the chunk's own share sum_i exp(cum_i) outer(go_i, C_i) on tensor cores,
// and takes G(c-1) = exp(cum_last(c)) G(c) + own(c). The own shares never go to device memory.
// A chunk's go (f32, rows of 64 p padded by PAD), C (bf16, rows of 32 n, 64 bytes) and cum are
// copied asynchronously STATES_STAGES - 1 chunks ahead. Four warps, warp w owning p rows 16 w ..
// +16 and the tile's 32 n (four m16n8 tiles). Grid: (batch * heads, P tiles * N tiles).
// ---------------------------------------------------------------------------------------------
#define STATES_THREADS 128
#define STATES_STAGES 3
#define STATES_N_TILE 32
#define STATES_GO_ROW (TILE + PAD)  // floats
#define STATES_GO_BYTES (SSD_Q * STATES_GO_ROW * 4)
#define STATES_C_BYTES (SSD_Q * STATES_N_TILE * 2)
#define STATES_STAGE_BYTES (STATES_GO_BYTES + STATES_C_BYTES + SSD_Q * 4)
static_assert(TILE == 64 && SSD_Q % 16 == 0, "a stage holds 64-wide rows of go, 32-wide of C");
static_assert(STATES_STAGE_BYTES % 128 == 0, "stages stay 128-byte aligned");

// Where a block of ssd_bwd_states_tc works: (batch, head), its tile's first p0 and n0.
struct StatesTile {
    long long b, bh;
    int h, g, p0, n0;
};

// Chunk c's go rows (p0 .. p0 + 63), C rows (n0 .. n0 + 31) and cum into the stage at `stage`.
__device__ __forceinline__ void stage_own_chunk(const in_t* __restrict__ x, const SsdArgs& s,
                                                const float* __restrict__ go, const float* __restrict__ cum,
                                                const StatesTile& w, int c, unsigned int stage) {
    const int t0 = c * SSD_Q;
#pragma unroll
    for (int e = threadIdx.x; e < SSD_Q * 16; e += STATES_THREADS) {  // go: 16 x 4 floats a row
        const int row = e / 16, q = e % 16, t = t0 + row, p = w.p0 + 4 * q;
        const bool ok = t < s.len && p < s.head_dim;
        copy16(stage + (row * STATES_GO_ROW + 4 * q) * 4,
               go + (ok ? token_row(s, w.b, t, w.h, s.heads, s.head_dim) + p : 0), ok);
    }
    stage += STATES_GO_BYTES;
#pragma unroll
    for (int e = threadIdx.x; e < SSD_Q * 4; e += STATES_THREADS) {  // C: 4 x 8 bf16 a row
        const int row = e / 4, q = e % 4, t = t0 + row, n = w.n0 + 8 * q;
        const bool ok = t < s.len && n < s.state;
        copy16(stage + at64(row, q), x + s.c + (ok ? token_row(s, w.b, t, w.g, s.groups, s.state) + n : 0), ok);
    }
    stage += STATES_C_BYTES;
    for (int e = threadIdx.x; e < SSD_Q / 4; e += STATES_THREADS)
        copy16(stage + 16 * e, cum + w.bh * ((long long)s.chunks * SSD_Q) + t0 + 4 * e, true);
}

// own += (go scaled by exp(cum))^T (this warp's 16 p x the chunk's steps) times C (the steps x
// the tile's 32 n).
__device__ __forceinline__ void own_chunk(const unsigned char* stages, unsigned int stage_at, float (&own)[4][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, m = lane / 8, r8 = lane % 8;
    const int g = lane / 4, t = lane % 4;
    const float* go_s = reinterpret_cast<const float*>(stages + stage_at);
    const float* cum_s = reinterpret_cast<const float*>(stages + stage_at + STATES_GO_BYTES + STATES_C_BYTES);
    const unsigned int c_at = shared_address(stages) + stage_at + STATES_GO_BYTES;
#pragma unroll
    for (int kk = 0; kk < SSD_Q / 16; ++kk) {
        unsigned int a[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) {  // p rows g (+8 for odd f), steps 2t, 2t + 1 (+8 from f = 2)
            const int p = 16 * warp + g + (f % 2) * 8, i = 16 * kk + 2 * t + (f / 2) * 8;
            a[f] = bf16x2(go_s[i * STATES_GO_ROW + p] * __expf(cum_s[i]),
                          go_s[(i + 1) * STATES_GO_ROW + p] * __expf(cum_s[i + 1]));
        }
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
            unsigned int b[4];
            fragments_transposed(c_at + at64(16 * kk + (m % 2) * 8 + r8, 2 * jp + m / 2), b);
            mma_bf16(own[2 * jp], a, b[0], b[1]);
            mma_bf16(own[2 * jp + 1], a, b[2], b[3]);
        }
    }
}

// Visits a lane's entries of a (four m16n8 tiles) accumulator as pairs (p, n), (p, n + 1):
// f(j, half, p, n) for tile j, rows r0 + 8 half and columns c0 + 8 j (+ 1) inside P x N.
template <class F>
__device__ __forceinline__ void lane_pairs(const SsdArgs& s, int r0, int c0, const F& f) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int p = r0 + 8 * half, n = c0 + 8 * j;
            if (p < s.head_dim && n < s.state) f(j, half, p, n);
        }
}

// G(c) for every chunk as cells into g_cells (batch, chunks, H, P, N), and what reaches the front
// into g_initial_states (the equations of ssd_bwd_own_states and ssd_bwd_state_passing).
extern "C" __global__ void __launch_bounds__(STATES_THREADS)
    ssd_bwd_states_tc(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ go,
                      const float* __restrict__ cum, const float* __restrict__ g_final,
                      cell_t* __restrict__ g_cells, grad_t* __restrict__ grads, SsdGradsAt at_grad) {
    extern __shared__ __align__(128) unsigned char states_stages[];
    StatesTile w;
    w.bh = blockIdx.x;
    w.h = (int)(w.bh % s.heads);
    w.b = w.bh / s.heads;
    w.g = w.h / (s.heads / s.groups);
    const int p_tiles = (s.head_dim + TILE - 1) / TILE;
    w.p0 = (int)(blockIdx.y % p_tiles) * TILE;
    w.n0 = (int)(blockIdx.y / p_tiles) * STATES_N_TILE;
    const unsigned int base = shared_address(states_stages);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int r0 = w.p0 + 16 * warp + lane / 4, c0 = w.n0 + 2 * (lane % 4);  // the lane's p (+8), n (+8 j, +1)
    const long long entries = (long long)s.head_dim * s.state;
    float running[4][4] = {};
    lane_pairs(s, r0, c0, [&](int j, int half, int p, int n) {
        const long long at = w.bh * entries + (long long)p * s.state + n;
        running[j][2 * half] = g_final[at];
        running[j][2 * half + 1] = n + 1 < s.state ? g_final[at + 1] : 0.0f;
    });
    const auto chunk_of = [&](int q) { return s.chunks - 1 - q; };  // the q-th chunk walked
    const auto stage = [&](int q, unsigned int at) { stage_own_chunk(x, s, go, cum, w, chunk_of(q), at); };
    start_stages<STATES_STAGES, STATES_STAGE_BYTES>(s.chunks, base, stage);
    run_stages<STATES_STAGES, STATES_STAGE_BYTES>(s.chunks, base, stage, [&](int q, unsigned int at) {
        const int c = chunk_of(q);
        const long long chunk_at = ((w.b * s.chunks + c) * s.heads + w.h) * entries;
        lane_pairs(s, r0, c0, [&](int j, int half, int p, int n) {
            store_pair(g_cells, chunk_at + (long long)p * s.state + n, running[j][2 * half],
                       running[j][2 * half + 1], n + 1 < s.state);
        });
        float own[4][4] = {};
        own_chunk(states_stages, at - base, own);
        const float decay =
            __expf(reinterpret_cast<const float*>(states_stages + (at - base) + STATES_GO_BYTES + STATES_C_BYTES)[SSD_Q - 1]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) running[j][e] = decay * running[j][e] + own[j][e];
    });
    if (at_grad.initial_states < 0) return;
    lane_pairs(s, r0, c0, [&](int j, int half, int p, int n) {
        store_pair(grads, at_grad.initial_states + w.bh * entries + (long long)p * s.state + n, running[j][2 * half],
                   running[j][2 * half + 1], n + 1 < s.state);
    });
}
#endif

// GX = go X^T (Q x Q), and from it and CB (cb_chunk, device memory) the masked matrices
// M = CB ∘ l ∘ dt'_j into m's cells and W = GX ∘ l ∘ dt'_j into w's (l_ij = exp(cum_i - cum_j)
// for j <= i, zero above the diagonal), with the diagonal block's sums of E = CB ∘ l ∘ GX taken
// from the f32 values of CB and GX rather than from cells: col_e[j] = sum_i E_ij and row_f[i] =
// sum_j E_ij dt'_j. Each warp's 16 x 16 tile (tile row R, tile column T) leaves its column sums
// in part[R][j] and its row sums in part[Q / 16 + T][i], for the caller to add in order after a
// barrier. Tiles above the diagonal skip their products and write zeros.
__device__ __forceinline__ void masked_products_and_diagonal_sums(Shared gos, Shared xs, int np, Shared m, Shared w,
                                                                  const float* __restrict__ cb_chunk,
                                                                  const float* cum_c, const float* dt_c,
                                                                  float* part) {
    constexpr int NT = PRODUCT_NT, TILES = SSD_Q / 16;
    static_assert(8 * NT == 16, "square tiles of 16");
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int tile = threadIdx.x / 32; tile < TILES * TILES; tile += blockDim.x / 32) {
        const int r0 = tile / TILES * 16, c0 = tile % TILES * 16;
        float col[NT][2] = {}, row[2] = {};
        float acc[NT][4] = {};
        if (c0 <= r0) multiply_into(acc, r0, c0, pad_width(np), Rows{gos}, Cols{xs});
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = r0 + g + (e >= 2 ? 8 : 0), c = c0 + 8 * j + 2 * t + (e & 1);
                float m_rc = 0.0f, w_rc = 0.0f;
                if (c <= r) {
                    const float cb_rc = cb_chunk[r * SSD_Q + c], decay = __expf(cum_c[r] - cum_c[c]);
                    const float v = cb_rc * decay * acc[j][e], l = decay * dt_c[c];
                    col[j][e & 1] += v;
                    row[e >> 1] += v * dt_c[c];
                    m_rc = cb_rc * l;
                    w_rc = acc[j][e] * l;
                }
                put(m, r, c, m_rc);
                put(w, r, c, w_rc);
            }
        // Columns over the tile's rows (lanes of one t), rows over its columns (lanes of one g).
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 2; ++q) col[j][q] += __shfl_xor_sync(0xffffffffu, col[j][q], offset);
#pragma unroll
        for (int h = 0; h < 2; ++h) row[h] = lane_group_sum(row[h], 4);
        if (g == 0)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 2; ++q) part[r0 / 16 * SSD_Q + c0 + 8 * j + 2 * t + q] = col[j][q];
        if (t == 0)
#pragma unroll
            for (int h = 0; h < 2; ++h) part[(TILES + c0 / 16) * SSD_Q + r0 + g + 8 * h] = row[h];
    }
}

// The gradients of one (batch, chunk, head) (equations above). Reads S_in as f32 states or
// (states_as_planes) as the hi plane of the split entering states, and G as cells. Writes g_X
// and g_dt (with the processed step's derivative) into grads, the head's shares of g_B and g_C
// into b_share and c_share (batch, H, L, N) as cells, and the chunk's parts of g_A (a_part),
// g_dt_bias (bias_part) and g_D (d_part: P per chunk; with D per head, also their sum into
// d_head_part). Grid: batch * chunks * heads; dynamic shared memory as laid out below (the
// launcher's `ssd_bwd_chunk_shared`).
extern "C" __global__ void __launch_bounds__(BWD_THREADS, BWD_BLOCKS)
    ssd_bwd_chunk(const in_t* __restrict__ x, SsdArgs s, const float* __restrict__ go_g,
                  const float* __restrict__ dtp, const float* __restrict__ cum, const float* __restrict__ cb,
                  const float* __restrict__ states, int states_as_planes, const cell_t* __restrict__ g_cells,
                  grad_t* __restrict__ grads, SsdGradsAt at_grad, cell_t* __restrict__ b_share,
                  cell_t* __restrict__ c_share,
                  float* __restrict__ a_part, float* __restrict__ bias_part, float* __restrict__ d_part,
                  float* __restrict__ d_head_part) {
    const int np = s.head_dim, nn = s.state, pw = pad_width(np), nw = pad_width(nn);
    const Shared xs{shared_cells(), pw};               // X    (Q, P)
    const Shared gos{xs.p + SSD_Q * pw, pw};         // go   (Q, P)
    const Shared bs{gos.p + SSD_Q * pw, nw};         // B    (Q, N)
    const Shared cs{bs.p + SSD_Q * nw, nw};          // C    (Q, N)
    const Shared gst{cs.p + SSD_Q * nw, nw};         // G    (P, N)
    const Shared sin{gst.p + pw * nw, nw};           // S_in (P, N)
    const Shared m{sin.p + pw * nw, SSD_Q};          // M    (Q, Q)
    const Shared w{m.p + SSD_Q * SSD_Q, SSD_Q};      // W    (Q, Q)
    float* part_c = floats_after(w.p, SSD_Q * SSD_Q);  // (Q, N / 8): parts of go_i . (S_in C_i)
    float* part_x = part_c + SSD_Q * (nw / 8);       // (Q, P / 8): of x_i . (G B_i)
    float* cum_c = part_x + SSD_Q * (pw / 8);
    float* dt_c = cum_c + SSD_Q;
    float* raw_c = dt_c + SSD_Q;         // dt + dt_bias, for the processed step's derivative
    float* into = raw_c + SSD_Q;         // exp(cum_last - cum_j)
    float* wj = into + SSD_Q;            // into_j dt'_j
    float* row_f = wj + SSD_Q;           // rowsum(M ∘ GX)
    float* col_f = row_f + SSD_Q;        // colsum(M ∘ GX)
    float* col_e = col_f + SSD_Q;        // colsum(CB ∘ l ∘ GX)
    float* u_c = col_e + SSD_Q;          // go_i . (S_in C_i)
    float* u_x = u_c + SSD_Q;            // x_i . (G B_i)
    float* red = u_x + SSD_Q;            // each warp's sum of <G, S_in>
    float* d_c = red + BWD_THREADS / 32; // g_D's part per p
    float* diag_part = d_c + pw;         // (2 Q / 16, Q): masked_products_and_diagonal_sums' tile sums

    const ChunkHead k = chunk_head(s, blockIdx.x);
    const int tid = threadIdx.x;
    const float a = ld(x, s.a + k.h);
    // G (cells) and S_in (f32, or the bf16 plane hi of the split entering states: exactly its
    // cells).
    const long long state0 = k.bch * np * (long long)nn;
    const auto copy_states = [&] {
        copy_cells(
            pw, np, nn, [&](int p) { return g_cells + state0 + p * nn; }, gst);
#ifdef IN_BF16
        if (states_as_planes) {
            const cell_t* hi = reinterpret_cast<const cell_t*>(states) + 2 * state0;
            copy_cells(
                pw, np, nn, [&](int p) { return hi + p * nn; }, sin);
            return;
        }
#endif
        copy_matrix(
            pw, np, nn, [&](int p) { return states + state0 + p * nn; }, sin);
    };
    // The asynchronous copies first, in flight while the other operands and the steps are read:
    // with bf16 cells the states' (go goes through registers), with f32 cells go's and theirs.
#ifdef IN_BF16
    copy_states();
    copy_float_rows(go_g, s, k, gos);
#else
    copy_float_rows(go_g, s, k, gos);
    copy_states();
#endif
    const long long cb0 = (k.bc * s.groups + k.g) * (long long)SSD_Q * SSD_Q;
    stage_input_rows(x, s, s.x, k.b, k.t0, k.h, s.heads, np, xs);
    stage_group_rows(x, s, k, bs);
    stage_steps(s, k, dtp, cum, dt_c, cum_c, SSD_Q);
    const float bias = ld_or(x, s.dt_bias, k.h, 0.0f);
    for (int j = tid; j < SSD_Q; j += blockDim.x) {
        const int t = k.t0 + j;
        raw_c[j] = t < s.len ? ld(x, s.dt + (k.b * s.len + t) * s.heads + k.h) + bias : 0.0f;
    }
    copies_done();
    __syncthreads();
    for (int j = tid; j < SSD_Q; j += blockDim.x) {
        into[j] = __expf(cum_c[SSD_Q - 1] - cum_c[j]);
        wj[j] = into[j] * dt_c[j];
    }
    const Rows none{{nullptr, 0}};
    // M and W, with the diagonal block's sums (read by warp 0 after later barriers).
    masked_products_and_diagonal_sums(gos, xs, np, m, w, cb + cb0, cum_c, dt_c, diag_part);
    __syncthreads();
    for (int j = tid; j < SSD_Q; j += blockDim.x) {
        float e = 0.0f, f = 0.0f;
        for (int q = 0; q < SSD_Q / 16; ++q) {
            e += diag_part[q * SSD_Q + j];
            f += diag_part[(SSD_Q / 16 + q) * SSD_Q + j];
        }
        col_e[j] = e;
        col_f[j] = e * dt_c[j];
        row_f[j] = f;
    }
    const int t_end = s.len - k.t0;  // steps of this chunk inside the sequence, if fewer than SSD_Q
    const auto share_at = [&](int i, int n) { return ((k.b * s.heads + k.h) * s.len + k.t0 + i) * (long long)nn + n; };
    // g_C = exp(cum) ∘ (go S_in) + W B, with the parts of go_i . (S_in C_i).
    two_products(SSD_Q, nn, np, Rows{gos}, Rows{sin}, cs, part_c, [&](int i) { return __expf(cum_c[i]); }, SSD_Q,
                 Rows{w}, Rows{bs}, [&](int i, int n, float v0, float v1, bool second) {
                     if (i < t_end) store_pair(c_share, share_at(i, n), v0, v1, second);
                 });
    // g_B = w ∘ (X G) + W^T C.
    two_products(SSD_Q, nn, np, Rows{xs}, Rows{gst}, none.m, nullptr, [&](int j) { return wj[j]; }, SSD_Q,
                 Cols{w}, Rows{cs}, [&](int j, int n, float v0, float v1, bool second) {
                     if (j < t_end) store_pair(b_share, share_at(j, n), v0, v1, second);
                 });
    // g_X = w ∘ (B G^T) + M^T go + D go, with the parts of x_j . (G B_j).
    two_products(SSD_Q, np, nn, Rows{bs}, Cols{gst}, xs, part_x, [&](int j) { return wj[j]; }, SSD_Q, Cols{m},
                 Rows{gos}, [&](int j, int p, float v0, float v1, bool second) {
                     if (j >= t_end) return;
                     const auto skip = [&](int q) {
                         return s.d < 0 ? 0.0f : ld(x, s.d + (s.d_per_p ? k.h * np + q : k.h)) * get(gos, j, q);
                     };
                     store_pair(grads, at_grad.x + token_row(s, k.b, k.t0 + j, k.h, s.heads, np) + p, v0 + skip(p),
                                second ? v1 + skip(p + 1) : 0.0f, second);
                 });
    // <G, S_in> (both laid out alike, zeros in the padding): each thread's share in order, then
    // each warp's.
    float gs = 0.0f;
    for (int e = tid; e < pw * nw; e += blockDim.x) gs += from_cell(gst.p[e]) * from_cell(sin.p[e]);
    gs = lane_group_sum(gs, 32);
    if (tid % 32 == 0) red[tid / 32] = gs;
    // g_D's part: sum_i go_i x_i per p, go as f32 from device memory (its cells may be bf16).
    if (s.d >= 0)
        for (int p = tid; p < np; p += blockDim.x) {
            float v = 0.0f;
            for (int i = 0; i < min(SSD_Q, t_end); ++i)
                v += go_g[token_row(s, k.b, k.t0 + i, k.h, s.heads, np) + p] * get(xs, i, p);
            d_part[k.bch * np + p] = v;
            d_c[p] = v;
        }
    __syncthreads();
    if (tid < SSD_Q) {
        const int i = tid;
        float uc = 0.0f, ux = 0.0f;
        for (int q = 0; q < nw / 8; ++q) uc += part_c[i * (nw / 8) + q];
        for (int q = 0; q < pw / 8; ++q) ux += part_x[i * (pw / 8) + q];
        u_c[i] = uc;
        u_x[i] = ux;
    }
    __syncthreads();
    static_assert(SSD_Q == 64, "the chunk's steps are two per lane of a warp");
    if (tid >= 32) return;
    // The chunk's scalars in warp 0, lane l taking steps l and l + 32: g_cum, then g_dt' and g_A
    // through cum = A sum dt'.
    const int lane = tid;
    float gs_total = 0.0f;
    for (int q = 0; q < blockDim.x / 32; ++q) gs_total += red[q];
    float gc[2], gd[2], dt_sum[2], to_last = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = lane + 32 * h;
        gc[h] = row_f[i] - col_f[i] + __expf(cum_c[i]) * u_c[i] - wj[i] * u_x[i];
        gd[h] = col_e[i] + into[i] * u_x[i];
        to_last += wj[i] * u_x[i];
        dt_sum[h] = warp_prefix_sum(dt_c[i]);
    }
    dt_sum[1] += __shfl_sync(0xffffffffu, dt_sum[0], 31);
    to_last = lane_group_sum(to_last, 32);
    if (lane == 31) gc[1] += to_last + __expf(cum_c[SSD_Q - 1]) * gs_total;
    const float g_a = lane_group_sum(gc[0] * dt_sum[0] + gc[1] * dt_sum[1], 32);
    // suffix_j = sum_{i >= j} g_cum_i.
    float suffix[2] = {warp_suffix_sum(gc[0]), warp_suffix_sum(gc[1])};
    suffix[0] += __shfl_sync(0xffffffffu, suffix[1], 0);
    float g_bias = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        if (j >= t_end) continue;
        // d dt' / d dt: the softplus's sigmoid (1 above 20 or without it), 0 where clamped.
        const float v = raw_c[j];
        const bool smooth = s.softplus && v <= 20.0f;
        const float before_clamp = smooth ? softplus(v) : v;
        const float slope = before_clamp < s.dt_lo || before_clamp > s.dt_hi ? 0.0f
                            : smooth ? 1.0f / (1.0f + __expf(-v)) : 1.0f;
        const float g = (gd[h] + a * suffix[h]) * slope;
        grads[at_grad.dt + (k.b * s.len + k.t0 + j) * s.heads + k.h] = to_grad(g);
        g_bias += g;
    }
    g_bias = lane_group_sum(g_bias, 32);
    float g_d = 0.0f;
    if (s.d >= 0 && !s.d_per_p)
        for (int p = lane; p < np; p += 32) g_d += d_c[p];
    g_d = lane_group_sum(g_d, 32);
    if (lane != 0) return;
    a_part[k.bch] = g_a;
    bias_part[k.bch] = g_bias;
    if (s.d >= 0 && !s.d_per_p) d_head_part[k.bch] = g_d;
}

// g_B or g_C (batch, L, G, N): the heads' shares (batch, H, L, N, cells) added over each group's
// heads in order. One (batch, t, group, n) per thread.
extern "C" __global__ void ssd_bwd_group_sum(SsdArgs s, const cell_t* __restrict__ share, grad_t* __restrict__ out) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b, t, g, n)
    if (e >= (long long)s.batch * s.len * s.groups * s.state) return;
    const int n = (int)(e % s.state);
    const long long btg = e / s.state;
    const int g = (int)(btg % s.groups);
    const long long bt = btg / s.groups;
    const int t = (int)(bt % s.len);
    const long long b = bt / s.len;
    const int per_group = s.heads / s.groups;
    float total = 0.0f;
    for (int h = g * per_group; h < (g + 1) * per_group; ++h)
        total += from_cell(share[((b * s.heads + h) * s.len + t) * (long long)s.state + n]);
    out[e] = to_grad(total);
}

#endif
