//! A safe, bounds-checked front for the `gemm` crate's strided f32 matrix product.

use crate::layout::transpose_into;
use crate::scratch::{give_back, reused};

/// A strided read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `row_stride` elements between rows.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        MatRef {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix stored with `row_stride` between rows.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst (m x n, row-major with dst_row_stride) (+)= lhs (m x k) * rhs (k x n)`, single-threaded
/// (callers parallelise over independent products). With `accumulate` the product is
/// added to `dst`, otherwise it overwrites it.
///
/// # Panics
/// If a view is too short for the given sizes (a bug in the caller, never bad user input).
pub fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
) {
    matmul_with(
        mnk,
        dst,
        dst_row_stride,
        lhs,
        rhs,
        accumulate,
        gemm::Parallelism::None,
    )
}

/// [`matmul`] spread over the threads of rayon's pool, for one large product.
pub fn matmul_threaded(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
) {
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    matmul_with(mnk, dst, dst_row_stride, lhs, rhs, accumulate, threads)
}

fn matmul_with(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let dst_view = MatRef::rows(dst, dst_row_stride);
    assert!(dst_view.covers(m, n), "matmul: destination too short");
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "matmul: operand too short"
    );
    if empty_product((m, n, k), dst, dst_row_stride, accumulate) {
        return;
    }
    // SAFETY: the asserts above guarantee every (row, col) index the product touches lies
    // inside the slices; `dst` is borrowed mutably, so it does not alias the operands.
    unsafe {
        product_into(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_row_stride,
            lhs,
            rhs,
            accumulate,
            parallelism,
        )
    }
}

/// Whether the `m x n` product over `k` has nothing to multiply (a size is 0); where `k` is 0
/// the product is zero, so `dst` is zeroed unless the product is added to it.
fn empty_product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 && !accumulate {
        for row in dst.chunks_mut(dst_row_stride).take(m) {
            row[..n].fill(0.0);
        }
    }
    k == 0
}

/// The gemm crate's product into `dst`, element `(i, j)` at `dst + i * dst_row_stride + j`.
///
/// # Safety
/// `m, n, k > 0`; the operands cover `m x k` and `k x n` values; `dst` is writable at every
/// `(i, j)` of the `m x n` product, no other thread touches those elements while it runs, and
/// they alias neither operand.
unsafe fn product_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst (m x n, row-major with dst_row_stride) = lhs (m x k) * rhs^T` for f32 `lhs: (m, k)` and
/// `rhs: (n, k)`, both row-major and contiguous (a projection: activations times weights),
/// spread over rayon's threads.
///
/// Writing a row-major output, the gemm crate packs `rhs` (its rows are the output's columns)
/// into its kernel's panels one value at a time: 9-12 % of a projection's time on this
/// project's AVX-512 host. A column-major copy it packs by whole vectors. So where the CPU has
/// AVX-512, the product is cut into tasks, blocks of `rhs`'s rows (and, for a narrow product,
/// of `lhs`'s rows too); each task transposes its block of `rhs` with vector shuffles
/// ([`transpose_into`]) and runs the gemm crate on it single-threaded: the same packed values,
/// so the same products up to the order of the f32 sums. Elsewhere this is one
/// [`matmul_threaded`].
///
/// # Panics
/// If a slice is too short for the given sizes (a bug in the caller, never bad user input).
pub fn matmul_nt_threaded(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[f32],
    rhs: &[f32],
) {
    let (lhs, rhs_rows) = (MatRef::rows(lhs, k), rhs);
    let rhs = MatRef::transposed(rhs_rows, k);
    if !transposed_blocks_pay() || m == 0 || n == 0 || k == 0 {
        return matmul_threaded((m, n, k), dst, dst_row_stride, lhs, rhs, false);
    }
    assert!(rhs.covers(k, n), "matmul_nt_threaded: operand too short");
    matmul_nt_blocks((m, n, k), dst, dst_row_stride, lhs, |cols, transposed| {
        transpose_into(
            &rhs_rows[cols.start * k..cols.end * k],
            cols.len(),
            k,
            transposed,
        )
    });
}

/// [`matmul_nt_threaded`] for weights `rhs: (n, k)` stored in another form (bf16, quantised blocks):
/// `rows_into(rows, out)` writes rows `rows` of them as f32, `out: (rows.len(), k)`, each task
/// widening only the block it multiplies (in the cache, then transposed as the dense blocks
/// are), so that the whole matrix is never widened at once. Without AVX-512 the rows are
/// widened whole, for [`matmul_threaded`].
///
/// # Panics
/// If `dst` or `lhs` is too short for the given sizes, or `rows_into` panics.
pub fn matmul_nt_rows_threaded(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[f32],
    rows_into: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    thread_local! {
        /// A task's block of rows before its transpose (or, without AVX-512, all the rows).
        static ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    if !transposed_blocks_pay() || m == 0 || n == 0 || k == 0 {
        const ROWS_PER_TASK: usize = 64;
        let mut rhs_buf = reused(&ROWS, n * k);
        let rhs = &mut rhs_buf[..n * k];
        rhs.par_chunks_mut(ROWS_PER_TASK * k.max(1))
            .enumerate()
            .for_each(|(task, out)| {
                let start = task * ROWS_PER_TASK;
                rows_into(start..start + out.len() / k.max(1), out)
            });
        matmul_nt_threaded((m, n, k), dst, dst_row_stride, lhs, rhs);
        return give_back(&ROWS, rhs_buf);
    }
    matmul_nt_blocks(
        (m, n, k),
        dst,
        dst_row_stride,
        MatRef::rows(lhs, k),
        |cols, transposed| {
            let mut rows_buf = reused(&ROWS, cols.len() * k);
            let rows = &mut rows_buf[..cols.len() * k];
            rows_into(cols.clone(), rows);
            transpose_into(rows, cols.len(), k, transposed);
            give_back(&ROWS, rows_buf);
        },
    );
}

/// The blocked product of [`matmul_nt_threaded`]: tasks over blocks of the output, each
/// with `fill(cols, out)` writing the transposed block of the weights, `out: (k, cols.len())`,
/// and the gemm crate run on it single-threaded.
fn matmul_nt_blocks(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    thread_local! {
        /// The transposed block, reused from product to product. Taken out while a product
        /// runs: a thread waiting inside one may run another (rayon's work stealing).
        static TRANSPOSED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    assert!(
        MatRef::rows(dst, dst_row_stride).covers(m, n),
        "matmul_nt_threaded: destination too short"
    );
    assert!(lhs.covers(m, k), "matmul_nt_threaded: operand too short");
    let threads = rayon::current_num_threads();
    let width = rhs_block_rows(n, threads);
    let col_blocks = n.div_ceil(width);
    let height = lhs_block_rows(m, col_blocks, threads);
    let dst = BlockOutputs(dst.as_mut_ptr());
    for_each_block((m, n), (height, width), |rows, cols| {
        let mut transposed_buf = reused(&TRANSPOSED, cols.len() * k);
        let transposed = &mut transposed_buf[..cols.len() * k];
        fill(cols.clone(), transposed); // (k, cols), row-major: the block of rhs^T
                                        // SAFETY: m, n, k > 0 and the asserts above cover dst and the operands; the
                                        // tasks' (rows, columns) ranges are disjoint, so no two threads write the same
                                        // element, and dst was borrowed mutably, so it aliases neither operand.
        unsafe {
            product_into(
                (rows.len(), cols.len(), k),
                dst.at(rows.start * dst_row_stride + cols.start),
                dst_row_stride,
                MatRef::rows(&lhs.data[rows.start * k..], k),
                MatRef::rows(transposed, cols.len()),
                false,
                gemm::Parallelism::None,
            )
        }
        give_back(&TRANSPOSED, transposed_buf);
    });
}

/// Runs `task(rows, cols)` over rayon's threads for every block of an `m x n` output cut into
/// blocks of `height x width` (the last row and column of blocks shorter).
fn for_each_block(
    (m, n): (usize, usize),
    (height, width): (usize, usize),
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    use rayon::prelude::*;
    let col_blocks = n.div_ceil(width);
    (0..col_blocks * m.div_ceil(height))
        .into_par_iter()
        .for_each(|block| {
            let (col_block, row_block) = (block % col_blocks, block / col_blocks);
            task(
                row_block * height..m.min((row_block + 1) * height),
                col_block * width..n.min((col_block + 1) * width),
            )
        });
}

/// The output of a product cut into blocks by [`for_each_block`] ([`matmul_nt_threaded`], the
/// narrow bf16 products), written by its tasks (disjoint blocks) from several threads.
struct BlockOutputs(*mut f32);

// SAFETY: the tasks write disjoint elements through the pointer (see matmul_nt_threaded and
// bf16_dot_product_in_blocks).
unsafe impl Sync for BlockOutputs {}

impl BlockOutputs {
    /// The output element `offset` values from its start.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Whether [`matmul_nt_threaded`] transposes its blocks (AVX-512: the vector transpose).
fn transposed_blocks_pay() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `rhs` per block of [`matmul_nt_threaded`]: all of them up to 256, else two blocks
/// or more per thread, whole panels of the gemm crate's AVX-512 kernel (64 rows), at most 256
/// (mamba-130m's in_proj over 512 tokens on one thread, one run each: 98, 104, 97 and 100
/// GFLOP/s with blocks of 128, 256, 512 and 1 024 rows).
fn rhs_block_rows(n: usize, threads: usize) -> usize {
    const PANEL: usize = 64;
    const MOST: usize = 4 * PANEL;
    if n <= MOST {
        return n;
    }
    n.div_ceil(2 * threads.max(1))
        .next_multiple_of(PANEL)
        .clamp(PANEL, MOST)
}

/// Rows of `lhs` per task of [`matmul_nt_threaded`]: all of them where the `col_blocks` blocks
/// of `rhs` give every thread two tasks, else as many row ranges as make up two tasks a thread,
/// each of 64 rows or more (each task transposes its block of `rhs` anew). Where the tasks
/// would not share out evenly over the threads (7 blocks of 256 rows, Mamba-2's xBC
/// projection, on 2 threads), the row ranges are raised until they do.
fn lhs_block_rows(m: usize, col_blocks: usize, threads: usize) -> usize {
    const FEWEST: usize = 64;
    let threads = threads.max(1);
    let most = m.div_ceil(FEWEST).max(1);
    let mut row_blocks = (2 * threads).div_ceil(col_blocks).clamp(1, most);
    while !(col_blocks * row_blocks).is_multiple_of(threads) && row_blocks < most {
        row_blocks += 1;
    }
    m.div_ceil(row_blocks)
}

/// The precision of an op's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// f32 operands, f32 sums.
    #[default]
    F32,
    /// Operands rounded to bf16, products of bf16 pairs summed in f32, as PyTorch and mamba_ssm
    /// multiply a bf16 model's activations: on AVX-512 BF16 ([`bf16_dot_supported`]), f32
    /// elsewhere.
    Bf16,
}

impl Products {
    /// Whether the products run on bf16 operands on this CPU (where they pay,
    /// [`bf16_products_pay`]).
    pub fn in_bf16(self) -> bool {
        self == Products::Bf16 && bf16_products_pay()
    }
}

/// Whether a prefill's products of bf16 operands ([`matmul_bf16_nt`]) beat the f32 GEMM on
/// this CPU, so that a bf16 model's prefill runs on them: AVX-512 BF16 on AMD cores, where a
/// `vdpbf16ps` does twice an f32 FMA's work at its rate (`gemm_rate` on Zen 4 / Zen 5 hosts:
/// bf16 178-418 against f32 87-216 GFLOP/s). The Intel Xeon host of the thirty-eighth session
/// has the instructions but ran them below its f32 GEMM (bf16 90-92 against f32 136-138
/// GFLOP/s, the 130m projections over 512 tokens and a square 2048 product, 1 thread): there a
/// bf16 model's products are widened to f32 instead.
pub fn bf16_products_pay() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static PAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PAY.get_or_init(|| bf16_dot_supported() && cpu_vendor_is_amd())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `cpuid` names AMD as this CPU's maker (false on other architectures).
pub fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf = std::arch::x86_64::__cpuid(0);
        let vendor = [leaf.ebx, leaf.edx, leaf.ecx]
            .map(u32::to_le_bytes)
            .concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs [`matmul_bf16_nt`]: AVX-512 with its BF16 dot products.
pub fn bf16_dot_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i] = v[i]` rounded to bf16 (to nearest, ties to even), spread over rayon's threads:
/// AVX-512 BF16's conversion where [`bf16_dot_supported`] (it reads subnormal inputs as zero),
/// else one value at a time.
///
/// # Panics
/// If the slices differ in length.
pub fn round_to_bf16(v: &[f32], out: &mut [half::bf16]) {
    use rayon::prelude::*;
    assert_eq!(v.len(), out.len(), "round_to_bf16: lengths differ");
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .for_each(|(out, v)| round_to_bf16_here(v, out));
}

/// [`round_to_bf16`] on the calling thread alone, for the short rows of a product's operands.
///
/// # Panics
/// If the slices differ in length.
pub fn round_to_bf16_here(v: &[f32], out: &mut [half::bf16]) {
    assert_eq!(v.len(), out.len(), "round_to_bf16_here: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_supported() {
        // SAFETY: bf16_dot_supported checked avx512f and avx512bf16 on this CPU.
        return unsafe { round_to_bf16_avx512(v, out) };
    }
    out.iter_mut()
        .zip(v)
        .for_each(|(o, v)| *o = half::bf16::from_f32(*v));
}

/// [`round_to_bf16`] 16 values per `vcvtneps2bf16`, the tail one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn round_to_bf16_avx512(v: &[f32], out: &mut [half::bf16]) {
    use std::arch::x86_64::*;
    let whole = v.len() / 16 * 16;
    for (v, out) in v[..whole].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        // SAFETY: v holds 16 f32 (one unaligned 64-byte load), out 16 bf16 (one unaligned
        // 32-byte store).
        unsafe {
            let rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(v.as_ptr()));
            out.as_mut_ptr().cast::<__m256bh>().write_unaligned(rounded);
        }
    }
    out[whole..]
        .iter_mut()
        .zip(&v[whole..])
        .for_each(|(o, v)| *o = half::bf16::from_f32(*v));
}

/// `dst (m x n, row-major with dst_row_stride) = lhs (m x k) * rhs^T` for bf16 `lhs: (m, k)` and
/// `rhs: (n, k)`, both row-major and contiguous: products of bf16 pairs summed in f32 (AVX-512
/// BF16 `vdpbf16ps`, the gemmkit crate's kernels), spread over rayon's threads. Returns `false`
/// and leaves `dst` alone where the CPU lacks the instructions ([`bf16_dot_supported`]).
///
/// # Panics
/// If a slice is too short for the given sizes (a bug in the caller, never bad user input).
pub fn matmul_bf16_nt(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[half::bf16],
    rhs: &[half::bf16],
) -> bool {
    assert!(
        MatRef::rows(dst, dst_row_stride).covers(m, n),
        "matmul_bf16_nt: destination too short"
    );
    assert!(
        lhs.len() >= m * k && rhs.len() >= n * k,
        "matmul_bf16_nt: operand too short"
    );
    if !bf16_dot_supported() {
        return false;
    }
    if empty_product((m, n, k), dst, dst_row_stride, false) {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    bf16_dot_product((m, n, k), dst, dst_row_stride, lhs, rhs);
    true
}

/// `dst (m x n, row-major with dst_row_stride) (+)= lhs (m x k) * rhs^T` for bf16 `lhs` (`m`
/// rows of `k`, `lhs.1` values apart) and `rhs` (`n` rows of `k`, `rhs.1` apart) on the calling
/// thread alone, the products of bf16 pairs summed in f32, for the many small products of an op
/// that threads over its own tasks. With `accumulate` the product is added to `dst`, otherwise
/// it overwrites it. Returns `false` and leaves `dst` alone where the CPU lacks the
/// instructions ([`bf16_dot_supported`]).
///
/// # Panics
/// If a slice is too short for the given sizes and strides (a bug in the caller, never bad
/// user input).
pub fn matmul_bf16_nt_here(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: (&[half::bf16], usize),
    rhs: (&[half::bf16], usize),
    accumulate: bool,
) -> bool {
    let covers = |(v, stride): (&[half::bf16], usize), rows: usize| {
        rows == 0 || k == 0 || (rows - 1) * stride + k <= v.len()
    };
    assert!(
        MatRef::rows(dst, dst_row_stride).covers(m, n),
        "matmul_bf16_nt_here: destination too short"
    );
    assert!(
        covers(lhs, m) && covers(rhs, n),
        "matmul_bf16_nt_here: operand too short"
    );
    if !bf16_dot_supported() {
        return false;
    }
    if empty_product((m, n, k), dst, dst_row_stride, accumulate) {
        return true;
    }
    // SAFETY: bf16_dot_supported checked the CPU; the asserts cover dst and both operands at
    // their strides; m, n, k > 0; dst is borrowed mutably, so it aliases neither operand, and
    // with `accumulate` its elements are initialised f32 values (a slice).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        gemmkit_strided_product(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_row_stride,
            (lhs.0.as_ptr(), lhs.1),
            (rhs.0.as_ptr(), rhs.1),
            accumulate,
            gemmkit::Parallelism::Serial,
        )
    }
    true
}

/// [`matmul_bf16_nt`] after its checks: narrow products in blocks
/// ([`bf16_dot_product_in_blocks`]), the others through gemmkit's own split.
#[cfg(target_arch = "x86_64")]
fn bf16_dot_product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[half::bf16],
    rhs: &[half::bf16],
) {
    let threads = rayon::current_num_threads();
    if threads > 1 && n <= NARROW_BF16_ROWS {
        return bf16_dot_product_in_blocks((m, n, k), dst, dst_row_stride, lhs, rhs, threads);
    }
    // SAFETY: matmul_bf16_nt checked the CPU (avx512f, avx512bf16), that rhs holds n rows of
    // k, lhs m rows of k and dst m rows at dst_row_stride, and that m, n, k > 0; dst is
    // borrowed mutably, so it aliases neither operand.
    unsafe {
        gemmkit_product(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_row_stride,
            lhs.as_ptr(),
            rhs.as_ptr(),
            gemmkit::Parallelism::Rayon(threads),
        )
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// gemmkit's packing buffers, reused from product to product. Taken out while a product
    /// runs: a thread waiting inside one may run another (rayon's work stealing).
    static PACKING: std::cell::Cell<gemmkit::Workspace> =
        const { std::cell::Cell::new(gemmkit::Workspace::new()) };
}

/// Weight rows up to which [`matmul_bf16_nt`] splits the product itself (one block per thread)
/// instead of letting gemmkit split it: gemmkit's own split of the 130m models' `out_proj`
/// (768 rows) ran at 242-267 GFLOP/s on two threads, against 286-322 for blocks of rows and
/// 307-316 for ranges of tokens (`gemm_rate`, this project's Zen 4 host); wider products (the
/// `in_proj`s, 3 072-3 352 rows) scale well as they are.
#[cfg(target_arch = "x86_64")]
const NARROW_BF16_ROWS: usize = 1024;

/// [`bf16_dot_product`] of a narrow product as one single-threaded gemmkit product per thread:
/// blocks of whole 32-row panels of `rhs` where each holds two panels or more, else ranges of
/// `lhs`'s rows (whole tiles of 12), so that every thread packs and multiplies its own share.
#[cfg(target_arch = "x86_64")]
fn bf16_dot_product_in_blocks(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[half::bf16],
    rhs: &[half::bf16],
    threads: usize,
) {
    const PANEL: usize = 32;
    const TILE: usize = 12;
    let (width, height) = if n >= 2 * PANEL * threads {
        (n.div_ceil(threads).next_multiple_of(PANEL), m)
    } else {
        (n, m.div_ceil(threads).next_multiple_of(TILE))
    };
    let out = BlockOutputs(dst.as_mut_ptr());
    for_each_block((m, n), (height, width), |rows, cols| {
        // SAFETY: as in bf16_dot_product, for the block: rhs rows `cols` and lhs rows `rows`
        // lie inside the slices, every size is positive, and the tasks write disjoint
        // (rows, cols) blocks of dst.
        unsafe {
            gemmkit_product(
                (rows.len(), cols.len(), k),
                out.at(rows.start * dst_row_stride + cols.start),
                dst_row_stride,
                lhs.as_ptr().add(rows.start * k),
                rhs.as_ptr().add(cols.start * k),
                gemmkit::Parallelism::Serial,
            )
        }
    });
}

/// `dst (m x n) = lhs (m x k) * rhs^T` on gemmkit's driver, in its column-major frame: `dst^T
/// (n x m) = rhs (n x k) * lhs^T (k x m)`, so that the f32 output is written in place
/// (gemmkit's public bf16 entry points round their output to bf16).
///
/// # Safety
/// The CPU has avx512f and avx512bf16; m, n, k > 0; `lhs` and `rhs` point at m and n rows of k
/// values; `dst` is writable at every (i, j) of the product (row stride `dst_row_stride`), no
/// other thread touches those elements meanwhile, and they alias neither operand.
#[cfg(target_arch = "x86_64")]
unsafe fn gemmkit_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: *const half::bf16,
    rhs: *const half::bf16,
    parallelism: gemmkit::Parallelism,
) {
    // SAFETY: the caller's contract, with contiguous rows and an overwritten output.
    unsafe {
        gemmkit_strided_product(
            (m, n, k),
            dst,
            dst_row_stride,
            (lhs, k),
            (rhs, k),
            false,
            parallelism,
        )
    }
}

/// [`gemmkit_product`] with `lhs` and `rhs` rows `lhs.1` and `rhs.1` values apart, adding the
/// product to `dst` with `accumulate`.
///
/// # Safety
/// As [`gemmkit_product`], the rows read at their strides; with `accumulate`, the output's
/// elements are initialised.
#[cfg(target_arch = "x86_64")]
unsafe fn gemmkit_strided_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    (lhs, lhs_row_stride): (*const half::bf16, usize),
    (rhs, rhs_row_stride): (*const half::bf16, usize),
    accumulate: bool,
    parallelism: gemmkit::Parallelism,
) {
    use gemmkit::kernel::Bf16DotGemmF32;
    use gemmkit::simd::Avx512Bf16;
    let mut ws = PACKING.take();
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller's contract, which is the driver's (the frame is column-major: the
    // output's row stride is 1).
    unsafe {
        gemmkit::driver::run::<Bf16DotGemmF32, Avx512Bf16, 2, 12>(
            Avx512Bf16,
            n,
            k,
            m,
            1.0,
            rhs,
            rhs_row_stride as isize,
            1,
            lhs,
            1,
            lhs_row_stride as isize,
            beta,
            dst,
            1,
            dst_row_stride as isize,
            parallelism,
            &mut ws,
        )
    }
    PACKING.set(ws);
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use mamba_testing::lcg_values;

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn cpu_vendor_agrees_with_the_kernel() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|rest| rest.split(':').nth(1))
            .map(str::trim)
            .expect("/proc/cpuinfo names no vendor_id");
        assert_eq!(
            cpu_vendor_is_amd(),
            vendor == "AuthenticAMD",
            "vendor {vendor}"
        );
    }

    /// The tasks of a threaded product share out evenly over the threads wherever the rows
    /// allow it (Mamba-2's projections over prefill pieces at 1, 2 and 4 threads), and each
    /// range of rows holds 64 or more.
    #[test]
    fn blocked_products_give_every_thread_as_many_tasks() {
        for threads in [1, 2, 4] {
            for n in [24usize, 768, 1536, 1792, 3352] {
                for m in [512usize, 1000, 2048] {
                    let col_blocks = n.div_ceil(rhs_block_rows(n, threads));
                    let height = lhs_block_rows(m, col_blocks, threads);
                    let tasks = col_blocks * m.div_ceil(height);
                    assert!(
                        tasks.is_multiple_of(threads),
                        "{m} x {n}, {threads} threads"
                    );
                    assert!(height >= 64, "{m} x {n}, {threads} threads: {height} rows");
                }
            }
        }
    }

    /// The product on rows written by a closure (here: each row of the weights plus one, as
    /// a dequantiser writes what it stands for) equals the dense product on those rows,
    /// exactly (the same blocks and sums), at one and two threads, over shapes of one
    /// block, several blocks with a short last one, and a strided output.
    #[test]
    fn the_product_on_rows_written_by_a_closure_is_the_dense_one() {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (m, n, k, stride) in [(20, 30, 17, 30), (100, 700, 64, 700), (70, 300, 40, 310)] {
                let (x, w) = (lcg_values(m * k, 1), lcg_values(n * k, 2));
                let dense: Vec<f32> = w.iter().map(|v| v + 1.0).collect();
                let (mut want, mut got) = (vec![0.0; m * stride], vec![0.0; m * stride]);
                pool.install(|| {
                    matmul_nt_threaded((m, n, k), &mut want, stride, &x, &dense);
                    matmul_nt_rows_threaded((m, n, k), &mut got, stride, &x, |rows, out| {
                        let src = &w[rows.start * k..rows.end * k];
                        out.iter_mut().zip(src).for_each(|(o, v)| *o = v + 1.0);
                    });
                });
                assert_eq!(got, want, "{threads} threads, {m} x {n} x {k}");
            }
        }
    }

    fn bf16_values(n: usize, seed: u64) -> Vec<bf16> {
        lcg_values(n, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// The bf16 dot product equals the f32 product of the same (widened) values, up to the
    /// order of the f32 sums, over shapes with edge tiles, odd depths and a strided output.
    /// The vector rounding equals half's, tail included.
    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        let v: Vec<f32> = lcg_values(1000, 3).into_iter().map(|x| x * 1e3).collect();
        let mut got = vec![bf16::ZERO; v.len()];
        round_to_bf16(&v, &mut got);
        let want: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bf16_dot_product_equals_the_f32_product_of_its_values() {
        if !bf16_dot_supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (37, 29, 131),
            (200, 70, 768),
            (9, 300, 64),
            (13, 1100, 40),
        ];
        // One thread: gemmkit alone; two and three: narrow products in blocks of rows of
        // either operand (partial panels and tiles among them), the widest through gemmkit's
        // own split.
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            for shape in shapes {
                pool.install(|| check_bf16_product(shape));
            }
        }
    }

    /// [`matmul_bf16_nt`] of one shape against the f32 product of the same values, into a
    /// strided output whose gaps stay untouched.
    fn check_bf16_product((m, n, k): (usize, usize, usize)) {
        let lhs = bf16_values(m * k, 1);
        let rhs = bf16_values(n * k, 2);
        let stride = n + 3;
        let mut got = vec![f32::NAN; m * stride];
        assert!(matmul_bf16_nt((m, n, k), &mut got, stride, &lhs, &rhs));
        let (l32, r32): (Vec<f32>, Vec<f32>) = (
            lhs.iter().map(|v| v.to_f32()).collect(),
            rhs.iter().map(|v| v.to_f32()).collect(),
        );
        let mut want = vec![0.0f32; m * n];
        let (l, r) = (MatRef::rows(&l32, k), MatRef::transposed(&r32, k));
        matmul((m, n, k), &mut want, n, l, r, false);
        for i in 0..m {
            for j in 0..n {
                let (g, w) = (got[i * stride + j], want[i * n + j]);
                assert!(
                    (g - w).abs() <= 1e-5 * (k as f32).sqrt(),
                    "({i}, {j}) of {m}x{n}x{k} on {} threads: {g} against {w}",
                    rayon::current_num_threads()
                );
            }
            assert!(
                got[i * stride + n..(i + 1) * stride]
                    .iter()
                    .all(|v| v.is_nan()),
                "row {i}'s padding was written"
            );
        }
    }

    /// The single-threaded bf16 product reads its operands' rows at their strides (only the
    /// first `k` values of each), overwrites or adds to a strided output, and equals the f32
    /// product of the same values, over edge tiles and odd depths.
    #[test]
    fn bf16_product_here_reads_strided_rows_and_accumulates() {
        if !bf16_dot_supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (m, n, k) in [(1, 1, 1), (32, 1536, 96), (128, 64, 37), (13, 29, 128)] {
            let (lhs_stride, rhs_stride, dst_stride) = (k + 5, k + 3, n + 2);
            let lhs = bf16_values(m * lhs_stride, 3);
            let rhs = bf16_values(n * rhs_stride, 4);
            let start = lcg_values(m * dst_stride, 5);
            let want_product: Vec<f32> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    (0..k)
                        .map(|t| {
                            f64::from(lhs[i * lhs_stride + t].to_f32())
                                * f64::from(rhs[j * rhs_stride + t].to_f32())
                        })
                        .sum::<f64>() as f32
                })
                .collect();
            for accumulate in [false, true] {
                let mut got = start.clone();
                let done = matmul_bf16_nt_here(
                    (m, n, k),
                    &mut got,
                    dst_stride,
                    (&lhs, lhs_stride),
                    (&rhs, rhs_stride),
                    accumulate,
                );
                assert!(done);
                for i in 0..m {
                    for j in 0..dst_stride {
                        let (g, s) = (got[i * dst_stride + j], start[i * dst_stride + j]);
                        if j >= n {
                            assert_eq!(g, s, "padding ({i}, {j}) of {m}x{n}x{k} written");
                            continue;
                        }
                        let w = want_product[i * n + j] + if accumulate { s } else { 0.0 };
                        assert!(
                            (g - w).abs() <= 1e-5 * (k as f32).sqrt(),
                            "({i}, {j}) of {m}x{n}x{k}, accumulate {accumulate}: {g} against {w}"
                        );
                    }
                }
            }
        }
    }

    /// The blocked product of activations by row-major weights equals the plain product
    /// (double-precision sums), over shapes that give one block, several, partial panels and
    /// partial transposed tiles, a single row, and a strided output whose gaps stay untouched.
    #[test]
    fn nt_product_equals_the_plain_product() {
        for (m, n, k) in [
            (1, 7, 5),
            (37, 29, 131),
            (200, 70, 768),
            (9, 600, 64),
            (130, 333, 40),
        ] {
            let lhs = lcg_values(m * k, 5);
            let rhs = lcg_values(n * k, 6);
            let stride = n + 3;
            let mut got = vec![f32::NAN; m * stride];
            matmul_nt_threaded((m, n, k), &mut got, stride, &lhs, &rhs);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| f64::from(lhs[i * k + t]) * f64::from(rhs[j * k + t]))
                        .sum();
                    let g = f64::from(got[i * stride + j]);
                    assert!(
                        (g - want).abs() <= 1e-5 * (k as f64).sqrt(),
                        "({i}, {j}) of {m}x{n}x{k}: {g} against {want}"
                    );
                }
                assert!(got[i * stride + n..(i + 1) * stride]
                    .iter()
                    .all(|v| v.is_nan()));
            }
        }
    }
}
