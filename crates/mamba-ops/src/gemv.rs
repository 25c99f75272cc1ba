//! `y = x W^T` for the few rows of `x` that decoding multiplies by each weight matrix:
//! `x: (batch, cols)` f32, `W: (rows, cols)` in f32, bf16 or a block-quantised format,
//! `y: (batch, rows)` f32. Decoding reads every weight once per token, so this product is
//! bound by memory bandwidth: the kernels read each weight once for the whole batch and
//! keep the arithmetic in registers.
//!
//! - f32 and bf16: f32 fused multiply-adds over eight lanes (AVX2). Sixteen-lane AVX-512
//!   versions were measured slower on this project's Zen 4 for rows read from memory (the
//!   output head: 23-24 -> 17-19 GB/s f32, 30-33 -> 15-16 GB/s bf16), faster only in cache.
//! - bf16 where the CPU has AVX-512 BF16: `x` is first rounded to bf16 (as llama.cpp does
//!   for bf16 weights, and as this project's bf16 prefill does), then each 32-byte load of
//!   weights meets its sixteen activations in one `vdpbf16ps` on eight f32 lanes, where
//!   widening the weights took a shuffle, a shift and two multiply-adds. Twice the rate in
//!   cache (a 256 x 768 matrix at 1 thread: 34-40 -> 64-69 GB/s), so a decoding step of
//!   several sequences, which reads each row from L1 once per sequence, is 1.4-1.6x faster;
//!   taking four sequences per load of weights adds 13-55 % at eight sequences.
//! - q8_0 and q4_0: as in llama.cpp, `x` is first quantised to q8_0 blocks, then each block
//!   product is an integer dot product of 32 int8 pairs (AVX2 `maddubs`, or AVX-512 VNNI
//!   `dpbusd` where the CPU has it) scaled by the two block scales. The VNNI q4_0 kernel takes
//!   four blocks per 64-byte load, their low and high nibbles against a copy of the
//!   activations regrouped into first and second block halves (made once per product): one
//!   mask, one shift and two `dpbusd` per four blocks where block pairs took twice the
//!   unpacking (mamba-130m `in_proj` at 1 thread 60.7 -> 41-42 µs).
//!
//! The CPU features are detected at run time; without AVX2 the same products run as plain
//! loops. [`gemv_reference`] is the definition the tests compare against: the dequantised
//! matrix times `x` in f64.

use crate::error::{OpError, Result};
use crate::gemm::round_to_bf16_here;
use crate::math::with_simd;
use crate::parallel::for_each_claimed_chunk;
use crate::quant::{q4_0_values, QuantFormat, QuantMatrix, BLOCK};
use half::{bf16, f16};
use std::cell::Cell;

/// A weight matrix `(rows, cols)` as [`gemv`] reads it.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    Quant(&'a QuantMatrix),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
            Weights::Quant(q) => q.rows() * q.cols(),
        }
    }

    /// Bytes of weights the product reads.
    fn bytes(&self) -> usize {
        match self {
            Weights::F32(w) => std::mem::size_of_val(*w),
            Weights::Bf16(w) => std::mem::size_of_val(*w),
            Weights::Quant(q) => q.size_in_bytes(),
        }
    }
}

/// Output rows per kernel call on one thread: a quarter of the matrix (at least 16), as
/// before the threads claimed chunks (which at one thread only cut the kernel's streams short:
/// mamba-130m bf16, 13.84 against 14.03 ms per step).
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4).max(16)
}

/// Bytes of weights per chunk of rows that the threads claim one at a time when there are
/// several (see [`for_each_claimed_chunk`]). mamba2-130m decoding at 2 threads, against rayon
/// splitting each product into four tasks per thread, switched per eight steps in one
/// process (60 rounds, median ms per step): q8_0 5.98 -> 5.69 (faster in 35 of 60 rounds),
/// q4_0 4.54 -> 4.36 (44), f32 19.18 -> 18.53 (44), bf16 9.62 -> 9.60 (27: no change).
/// 64 KiB chunks were slower for bf16, 512 KiB for q4_0.
const CLAIMED_CHUNK_BYTES: usize = 256 << 10;

/// Output rows per claimed chunk: [`CLAIMED_CHUNK_BYTES`] of `w`'s rows, at least 16.
fn rows_per_claim(w: &Weights, rows: usize) -> usize {
    let row_bytes = (w.bytes() / rows.max(1)).max(1);
    CLAIMED_CHUNK_BYTES.div_ceil(row_bytes).max(16)
}

/// `y (batch, rows) = x (batch, cols) W^T`, threaded over the rows of `W`.
pub fn gemv(w: Weights, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    let batch = check_shapes(&w, rows, cols, x, y)?;
    let mut x16 = ROUNDED.take();
    x16.clear();
    let xq = match w {
        Weights::Quant(q) => {
            let mut activations = ACTIVATIONS.take();
            activations.fill(x, batch, cols, q.format());
            Some(activations)
        }
        Weights::Bf16(_) if bf16_dots() => {
            x16.resize(x.len(), bf16::ZERO);
            round_to_bf16_here(x, &mut x16);
            None
        }
        _ => None,
    };
    product_rows(w, (rows, cols, batch), (x, &x16), xq.as_ref(), y);
    if let Some(activations) = xq {
        ACTIVATIONS.set(activations);
    }
    ROUNDED.set(x16);
    Ok(())
}

thread_local! {
    /// The quantised activations of the calling thread's last product, kept so that
    /// decoding allocates nothing per product once warm.
    static ACTIVATIONS: Cell<QuantizedActivations> = const {
        Cell::new(QuantizedActivations {
            cols: 0,
            scales: Vec::new(),
            quants: Vec::new(),
            scaled_sums: Vec::new(),
            halves: Vec::new(),
        })
    };
    /// The calling thread's last bf16 product's `x` rounded to bf16.
    static ROUNDED: Cell<Vec<bf16>> = const { Cell::new(Vec::new()) };
}

/// [`gemv`] after the checks: the rows of `W` in chunks, claimed by the pool's threads.
fn product_rows(
    w: Weights,
    (rows, cols, batch): (usize, usize, usize),
    (x, x16): (&[f32], &[bf16]),
    xq: Option<&QuantizedActivations>,
    y: &mut [f32],
) {
    let run = |start: usize, out: &mut [f32]| {
        // `out: (count, batch)`: one output row of W for each sequence.
        let count = out.len() / batch;
        match (w, xq) {
            (Weights::F32(w), _) => {
                rows_f32(&w[start * cols..(start + count) * cols], cols, x, out)
            }
            (Weights::Bf16(w), _) => {
                rows_bf16(&w[start * cols..(start + count) * cols], cols, x, x16, out)
            }
            (Weights::Quant(q), Some(xq)) => rows_quant(q, start, count, xq, out),
            (Weights::Quant(_), None) => unreachable!("activations are quantised above"),
        }
    };
    // `out: (rows, batch)`, split into chunks of whole rows.
    let split = |out: &mut [f32]| {
        if rayon::current_num_threads() > 1 {
            let chunk = rows_per_claim(&w, rows);
            for_each_claimed_chunk(out, chunk * batch, |start, part| run(start / batch, part));
        } else {
            let chunk = rows_per_task(rows);
            out.chunks_mut(chunk * batch)
                .enumerate()
                .for_each(|(i, part)| run(i * chunk, part));
        }
    };
    if batch == 1 {
        split(y);
        return;
    }
    let mut by_row = vec![0.0f32; rows * batch]; // (rows, batch)
    split(&mut by_row);
    for (r, per_seq) in by_row.chunks(batch).enumerate() {
        for (b, v) in per_seq.iter().enumerate() {
            y[b * rows + r] = *v;
        }
    }
}

/// The definition: `y = x W^T` with `W` dequantised, summed in f64.
pub fn gemv_reference(
    w: Weights,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let batch = check_shapes(&w, rows, cols, x, y)?;
    let dense: Vec<f32> = match w {
        Weights::F32(w) => w.to_vec(),
        Weights::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
        Weights::Quant(q) => q.dequantize(),
    };
    for b in 0..batch {
        for r in 0..rows {
            let row = &dense[r * cols..][..cols];
            let xb = &x[b * cols..][..cols];
            y[b * rows + r] = row
                .iter()
                .zip(xb)
                .map(|(a, v)| *a as f64 * *v as f64)
                .sum::<f64>() as f32;
        }
    }
    Ok(())
}

fn check_shapes(w: &Weights, rows: usize, cols: usize, x: &[f32], y: &[f32]) -> Result<usize> {
    let err = |msg: String| Err(OpError::Shape { op: "gemv", msg });
    if let Weights::Quant(q) = w {
        if (q.rows(), q.cols()) != (rows, cols) {
            return err(format!(
                "a ({}, {}) quantised matrix used as ({rows}, {cols})",
                q.rows(),
                q.cols()
            ));
        }
    }
    if w.len() != rows * cols || cols == 0 || rows == 0 {
        return err(format!("{} weights for ({rows}, {cols})", w.len()));
    }
    if x.is_empty() || !x.len().is_multiple_of(cols) || y.len() != x.len() / cols * rows {
        return err(format!(
            "x has {} values and y {} for ({rows}, {cols}) weights",
            x.len(),
            y.len()
        ));
    }
    Ok(x.len() / cols)
}

/// `out[(r, b)] = W[r] . x[b]` for the f32 rows `w: (count, cols)`.
fn rows_f32(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_fma() {
        return x86::rows_dense(w, cols, x, out, x86::Widen::F32);
    }
    rows_dense_scalar(w, cols, x, out, |w| *w)
}

/// Whether bf16 weights are multiplied on AVX-512 BF16 dot products (256-bit, so with VL).
fn bf16_dots() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_avx512_bf16_vl()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[(r, b)] = W[r] . x[b]` for the bf16 rows `w: (count, cols)`; `x16` is `x` rounded
/// to bf16 where [`bf16_dots`] (else empty).
fn rows_bf16(w: &[bf16], cols: usize, x: &[f32], x16: &[bf16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if !x16.is_empty() {
        return x86::rows_bf16_dot(w, cols, x16, out);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2_fma() {
        return x86::rows_dense(w, cols, x, out, x86::Widen::Bf16);
    }
    rows_dense_scalar(w, cols, x, out, |w| w.to_f32())
}

/// The dense kernels without SIMD intrinsics: `w: (count, cols)`, `x: (batch, cols)`,
/// `out: (count, batch)`.
fn rows_dense_scalar<T>(
    w: &[T],
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    widen: impl Fn(&T) -> f32,
) {
    let batch = x.len() / cols;
    for (w_row, out_row) in w.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        for (o, xb) in out_row.iter_mut().zip(x.chunks_exact(cols)) {
            *o = w_row.iter().zip(xb).map(|(w, x)| widen(w) * x).sum();
        }
    }
}

/// `x: (batch, cols)` quantised to q8_0 blocks for the integer dot products.
#[derive(Default)]
struct QuantizedActivations {
    cols: usize,
    /// `(batch, cols / 32)`.
    scales: Vec<f32>,
    /// `(batch, cols)`.
    quants: Vec<i8>,
    /// `(batch, cols / 32)`: each block's scale times the sum of its quants.
    scaled_sums: Vec<f32>,
    /// `(batch, cols)`, for q4_0 weights only (else empty): `quants` with each run of four
    /// blocks stored as their first halves, then their second halves, the order of a q4_0
    /// quad's masked low and high nibbles (`x86::rows_q4_0_vnni_r`).
    halves: Vec<i8>,
}

/// One sequence's quantised activations, as the kernels read them.
#[derive(Clone, Copy)]
struct ActivationRow<'a> {
    scales: &'a [f32],
    quants: &'a [i8],
    scaled_sums: &'a [f32],
    halves: &'a [i8],
}

/// Blocks whose halves [`QuantizedActivations::halves`] regroups together.
const QUAD: usize = 4;

impl QuantizedActivations {
    /// `x: (batch, cols)` quantised for weights of `format`.
    #[cfg(test)]
    fn new(x: &[f32], batch: usize, cols: usize, format: QuantFormat) -> Self {
        let mut activations = QuantizedActivations::default();
        activations.fill(x, batch, cols, format);
        activations
    }

    /// Quantises `x: (batch, cols)` into these buffers for weights of `format`, growing them
    /// if need be.
    fn fill(&mut self, x: &[f32], batch: usize, cols: usize, format: QuantFormat) {
        let blocks = batch * cols / BLOCK;
        self.cols = cols;
        self.scales.resize(blocks, 0.0);
        self.scaled_sums.resize(blocks, 0.0);
        self.quants.resize(batch * cols, 0);
        with_simd(
            #[inline(always)]
            || {
                for (((d, sum), q), xb) in self
                    .scales
                    .iter_mut()
                    .zip(self.scaled_sums.iter_mut())
                    .zip(self.quants.chunks_mut(BLOCK))
                    .zip(x.chunks(BLOCK))
                {
                    *d = quantize_activation_block(xb, q);
                    *sum = *d * q.iter().map(|v| *v as i32).sum::<i32>() as f32;
                }
            },
        );
        self.halves.clear();
        if format == QuantFormat::Q4_0 {
            self.halves.extend_from_slice(&self.quants);
            for (row, halves) in self.quants.chunks(cols).zip(self.halves.chunks_mut(cols)) {
                regroup_halves(row, halves);
            }
        }
    }

    /// The blocks of sequence `b`.
    fn row(&self, b: usize) -> ActivationRow<'_> {
        let bpr = self.cols / BLOCK;
        let cols = b * self.cols..(b + 1) * self.cols;
        ActivationRow {
            scales: &self.scales[b * bpr..(b + 1) * bpr],
            quants: &self.quants[cols.clone()],
            scaled_sums: &self.scaled_sums[b * bpr..(b + 1) * bpr],
            halves: self.halves.get(cols).unwrap_or_default(),
        }
    }
}

/// One row's quants with every whole run of [`QUAD`] blocks stored as the four first halves
/// (16 values each), then the four second halves; the blocks after the last whole run are
/// left as they are.
fn regroup_halves(quants: &[i8], halves: &mut [i8]) {
    const HALF: usize = BLOCK / 2;
    for (quad, out) in quants
        .chunks_exact(QUAD * BLOCK)
        .zip(halves.chunks_exact_mut(QUAD * BLOCK))
    {
        let (firsts, seconds) = out.split_at_mut(QUAD * HALF);
        for ((block, first), second) in quad
            .chunks_exact(BLOCK)
            .zip(firsts.chunks_exact_mut(HALF))
            .zip(seconds.chunks_exact_mut(HALF))
        {
            first.copy_from_slice(&block[..HALF]);
            second.copy_from_slice(&block[HALF..]);
        }
    }
}

/// One block of activations quantised to 8 bits like q8_0 (`d = max|x| / 127`), but rounding
/// half to even so that the loop vectorises (activations need not match ggml's bytes);
/// returns the scale `d` (kept in f32).
#[inline(always)]
fn quantize_activation_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = (v * id).round_ties_even() as i8;
    }
    d
}

/// `out[(r, b)]` for rows `start..start + count` of a quantised matrix.
fn rows_quant(
    q: &QuantMatrix,
    start: usize,
    count: usize,
    xq: &QuantizedActivations,
    out: &mut [f32],
) {
    let batch = out.len() / count;
    let (scales, quants) = q.row_range(start, count);
    let bpr = q.cols() / BLOCK;
    #[cfg(target_arch = "x86_64")]
    if let Some(rows) = x86::vnni_rows(q.format()) {
        for b in 0..batch {
            rows(scales, quants, bpr, xq.row(b), &mut out[b..], batch);
        }
        return;
    }
    let qpr = bpr * q.format().quant_bytes_per_block();
    let kernel = quant_kernel(q.format());
    for r in 0..count {
        let (ws, wq) = (&scales[r * bpr..][..bpr], &quants[r * qpr..][..qpr]);
        for b in 0..batch {
            out[r * batch + b] = kernel(ws, wq, xq.row(b));
        }
    }
}

/// A block-row dot product: weight scales and quants, the activations.
type QuantDot = fn(&[f16], &[u8], ActivationRow) -> f32;

/// The fastest one-row dot product for `format` on this CPU without AVX-512 VNNI (which
/// has its own whole-task kernels, [`x86::vnni_rows`]): AVX2, else plain loops.
fn quant_kernel(format: QuantFormat) -> QuantDot {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            return match format {
                QuantFormat::Q8_0 => x86::dot_q8_0_avx2,
                QuantFormat::Q4_0 => x86::dot_q4_0_avx2,
            };
        }
    }
    match format {
        QuantFormat::Q8_0 => dot_q8_0_scalar,
        QuantFormat::Q4_0 => dot_q4_0_scalar,
    }
}

fn dot_q8_0_scalar(ws: &[f16], wq: &[u8], x: ActivationRow) -> f32 {
    let xq = x.quants;
    dot_blocks_scalar(ws, x.scales, |k, j| {
        wq[k * BLOCK + j] as i8 as i32 * xq[k * BLOCK + j] as i32
    })
}

fn dot_q4_0_scalar(ws: &[f16], wq: &[u8], x: ActivationRow) -> f32 {
    let xq = x.quants;
    dot_blocks_scalar(ws, x.scales, |k, j| {
        let (low, high) = q4_0_values(wq[k * BLOCK / 2 + j % (BLOCK / 2)]);
        let w = if j < BLOCK / 2 { low } else { high };
        w as i32 * xq[k * BLOCK + j] as i32
    })
}

/// `Σ_k d_w[k] d_x[k] Σ_j product(k, j)` over the blocks `k` of a row.
#[inline(always)]
fn dot_blocks_scalar(ws: &[f16], xs: &[f32], product: impl Fn(usize, usize) -> i32) -> f32 {
    ws.iter()
        .zip(xs)
        .enumerate()
        .map(|(k, (dw, dx))| {
            let sum: i32 = (0..BLOCK).map(|j| product(k, j)).sum();
            dw.to_f32() * dx * sum as f32
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The kernels in AVX2 (+ AVX-512 VNNI) intrinsics.
    use super::{ActivationRow, QuantFormat, BLOCK, QUAD};
    use crate::prefetch::lines_to_l2;
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    pub(super) fn has_avx2_fma() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub(super) fn has_avx512_bf16_vl() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512vl")
    }

    /// How a dense weight type becomes eight f32 lanes.
    #[derive(Clone, Copy)]
    pub(super) enum Widen {
        F32,
        Bf16,
    }

    /// Eight weights from `p` as f32 lanes.
    #[inline(always)]
    unsafe fn load8<T>(p: *const T, widen: Widen) -> __m256 {
        match widen {
            Widen::F32 => _mm256_loadu_ps(p as *const f32),
            Widen::Bf16 => {
                let halves = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
            }
        }
    }

    /// Rows of `W` taken at once: two, far apart (rows `i` and `i + count / 2` of a task),
    /// so that the weights stream from memory in two long sequences, which the hardware
    /// prefetcher follows (adjacent rows at once measured slower on the output head, which
    /// does not fit in cache), sharing each load of `x`.
    const ROWS: usize = 2;
    /// Vectors of eight columns per row and step: four independent multiply-add chains.
    /// (Software prefetching ahead of the loads measured slower than the hardware
    /// prefetcher alone on the output head.)
    const VECS: usize = 4;

    /// `out[(r, b)] = W[r] . x[b]` for dense rows `w: (count, cols)` of f32 or bf16
    /// (`T` must be the type `widen` names), `x: (batch, cols)`, `out: (count, batch)`.
    pub(super) fn rows_dense<T>(w: &[T], cols: usize, x: &[f32], out: &mut [f32], widen: Widen) {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn inner<T>(w: &[T], cols: usize, x: &[f32], out: &mut [f32], widen: Widen) {
            let batch = x.len() / cols;
            let count = out.len() / batch;
            // Row r goes with row r + apart.
            let apart = count / ROWS;
            for r in 0..apart {
                for b in 0..batch {
                    let sums = dot_rows::<T, ROWS, VECS>(
                        w.as_ptr().add(r * cols),
                        apart * cols,
                        cols,
                        &x[b * cols..][..cols],
                        widen,
                    );
                    for (i, s) in sums.into_iter().enumerate() {
                        out[(r + i * apart) * batch + b] = s;
                    }
                }
            }
            for r in ROWS * apart..count {
                for b in 0..batch {
                    out[r * batch + b] = dot_rows::<T, 1, VECS>(
                        w.as_ptr().add(r * cols),
                        cols,
                        cols,
                        &x[b * cols..][..cols],
                        widen,
                    )[0];
                }
            }
        }
        let batch = x.len() / cols;
        assert!(batch > 0 && x.len() == batch * cols && w.len() >= out.len() / batch * cols);
        // SAFETY: the caller detected AVX2 and FMA; `dot_rows` reads `cols` weights of rows
        // below `count` (r + i * apart < ROWS * apart <= count), inside `w` by the check above.
        unsafe { inner(w, cols, x, out, widen) }
    }

    /// `out[(r, b)] = W[r] . x16[b]` for bf16 rows `w: (count, cols)` and bf16 activations
    /// `x16: (batch, cols)`, `out: (count, batch)`, on AVX-512 BF16 dot products, two rows at
    /// a time, far apart: groups of [`DOT_SEQS`] sequences, then the sequences after the last
    /// whole group (a decoding step's one) each alone with [`ROW_VECS`] vectors per row and
    /// the weights asked for [`BF16_L2_PREFETCH_BYTES`] ahead.
    pub(super) fn rows_bf16_dot(w: &[bf16], cols: usize, x16: &[bf16], out: &mut [f32]) {
        #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
        unsafe fn inner(w: &[bf16], cols: usize, x16: &[bf16], out: &mut [f32]) {
            let batch = x16.len() / cols;
            let count = out.len() / batch;
            let grouped = batch - batch % DOT_SEQS;
            let apart = count / ROWS;
            let seq = |b: usize| &x16[b * cols..][..cols];
            for r in 0..apart {
                let rows = w.as_ptr().add(r * cols);
                for b in (0..grouped).step_by(DOT_SEQS) {
                    let sums = dot_rows_bf16::<ROWS, DOT_SEQS, 1, 0>(
                        rows,
                        apart * cols,
                        cols,
                        &x16[b * cols..][..DOT_SEQS * cols],
                    );
                    for (i, row_sums) in sums.into_iter().enumerate() {
                        let at = (r + i * apart) * batch + b;
                        out[at..at + DOT_SEQS].copy_from_slice(&row_sums);
                    }
                }
                for b in grouped..batch {
                    let sums = dot_rows_bf16::<ROWS, 1, ROW_VECS, BF16_L2_PREFETCH_BYTES>(
                        rows,
                        apart * cols,
                        cols,
                        seq(b),
                    );
                    for (i, [s]) in sums.into_iter().enumerate() {
                        out[(r + i * apart) * batch + b] = s;
                    }
                }
            }
            for r in ROWS * apart..count {
                let row = w.as_ptr().add(r * cols);
                for b in 0..batch {
                    let [[s]] = dot_rows_bf16::<1, 1, ROW_VECS, BF16_L2_PREFETCH_BYTES>(
                        row,
                        cols,
                        cols,
                        seq(b),
                    );
                    out[r * batch + b] = s;
                }
            }
        }
        let batch = x16.len() / cols;
        assert!(batch > 0 && x16.len() == batch * cols && w.len() >= out.len() / batch * cols);
        // SAFETY: the caller checked has_avx512_bf16_vl; the dot products read `cols` weights
        // of rows below `count`, inside `w` by the check above.
        unsafe { inner(w, cols, x16, out) }
    }

    /// Vectors of sixteen columns per row and step for a sequence taken alone: with two rows,
    /// eight independent dot-product chains. On the Zen 4 host of the thirty-seventh session
    /// one row with eight vectors measured faster (mamba2-130m bf16 at 1 thread 15.10 -> 14.14
    /// ms per step, 40 of 60 rounds; no change at 2 threads); on the Intel Xeon host of the
    /// thirty-eighth, with both ways asking for their weights ahead as now, two rows were
    /// faster (1 thread 31.3 -> 29.4 ms, 16 of 16 rounds; 2 threads 18.3 -> 17.2, 15 of 16).
    const ROW_VECS: usize = 4;
    /// Sequences taken at once in [`rows_bf16_dot`] when a step has several: each load of
    /// weights meets four sequences' activations (two rows: eight chains), where one
    /// sequence at a time loaded every row once per sequence.
    const DOT_SEQS: usize = 4;

    /// Sixteen bf16 values from `p` (unaligned) as `vdpbf16ps` takes them.
    #[inline(always)]
    unsafe fn load16_bf16(p: *const bf16) -> __m256bh {
        // SAFETY (transmute): __m256i and __m256bh are both 32 bytes of vector register.
        std::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(p as *const __m256i))
    }

    /// `R` x `B` dot products: the bf16 rows at `w`, `w + stride`, ... (each `cols` long)
    /// with each of the `B` rows of bf16 activations `x16: (B, cols)`, `V` vectors of
    /// sixteen columns per row and step; the columns after the last whole vector one at a
    /// time. Where `AHEAD` is not zero, each step asks for the cache lines of every row that
    /// lie `AHEAD` bytes past its loads.
    #[inline(always)]
    unsafe fn dot_rows_bf16<const R: usize, const B: usize, const V: usize, const AHEAD: usize>(
        w: *const bf16,
        stride: usize,
        cols: usize,
        x16: &[bf16],
    ) -> [[f32; B]; R] {
        let mut acc = [[[_mm256_setzero_ps(); V]; B]; R];
        let step = 16 * V;
        let body = cols - cols % step;
        let mut c = 0;
        while c < body {
            if AHEAD > 0 {
                for r in 0..R {
                    let at = w.add(r * stride + c) as *const u8;
                    lines_to_l2(at.wrapping_add(AHEAD), step * std::mem::size_of::<bf16>());
                }
            }
            for v in 0..V {
                add_vector(&mut acc, (w, stride), (x16, cols), c + 16 * v, v);
            }
            c += step;
        }
        let blocks_end = cols - cols % 16;
        while c < blocks_end {
            add_vector(&mut acc, (w, stride), (x16, cols), c, 0);
            c += 16;
        }
        let mut sums = [[0.0f32; B]; R];
        for (r, (sums_r, acc_r)) in sums.iter_mut().zip(&acc).enumerate() {
            for (b, (s, acc_rb)) in sums_r.iter_mut().zip(acc_r).enumerate() {
                let total = acc_rb
                    .iter()
                    .fold(_mm256_setzero_ps(), |t, a| _mm256_add_ps(t, *a));
                *s = hsum(total);
                for (c, xc) in x16[b * cols..][..cols].iter().enumerate().skip(blocks_end) {
                    *s += (*w.add(r * stride + c)).to_f32() * xc.to_f32();
                }
            }
        }
        sums
    }

    /// Adds the products of columns `c..c + 16` to the accumulators `acc[r][b][v]`: of row `r`
    /// at `w + r * stride` with row `b` of `x16: (B, cols)`.
    #[inline(always)]
    unsafe fn add_vector<const R: usize, const B: usize, const V: usize>(
        acc: &mut [[[__m256; V]; B]; R],
        (w, stride): (*const bf16, usize),
        (x16, cols): (&[bf16], usize),
        c: usize,
        v: usize,
    ) {
        // SAFETY (zeroed): vector registers of zeros, each overwritten below.
        let mut xv: [__m256bh; B] = std::mem::zeroed();
        for (b, x) in xv.iter_mut().enumerate() {
            *x = load16_bf16(x16.as_ptr().add(b * cols + c));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wv = load16_bf16(w.add(r * stride + c));
            for (acc_rb, x) in acc_r.iter_mut().zip(&xv) {
                acc_rb[v] = _mm256_dpbf16_ps(acc_rb[v], wv, *x);
            }
        }
    }

    /// `R` dot products of the rows at `w`, `w + stride`, ... (each `cols` long) with `x`,
    /// `V` vectors of eight columns per row and step: `R * V` independent multiply-add chains.
    #[inline(always)]
    unsafe fn dot_rows<T, const R: usize, const V: usize>(
        w: *const T,
        stride: usize,
        cols: usize,
        x: &[f32],
        widen: Widen,
    ) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let step = 8 * V;
        let body = cols - cols % step;
        let mut c = 0;
        while c < body {
            for v in 0..V {
                let xv = _mm256_loadu_ps(x.as_ptr().add(c + 8 * v));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let wv = load8(w.add(r * stride + c + 8 * v), widen);
                    acc_r[v] = _mm256_fmadd_ps(wv, xv, acc_r[v]);
                }
            }
            c += step;
        }
        // Whole vectors of eight after the last step (narrow rows: dt_proj's 48 columns).
        let vectors_end = cols - cols % 8;
        while c < vectors_end {
            let xv = _mm256_loadu_ps(x.as_ptr().add(c));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wv = load8(w.add(r * stride + c), widen);
                acc_r[0] = _mm256_fmadd_ps(wv, xv, acc_r[0]);
            }
            c += 8;
        }
        let mut sums = [0.0f32; R];
        for (r, s) in sums.iter_mut().enumerate() {
            let total = acc[r]
                .iter()
                .fold(_mm256_setzero_ps(), |t, a| _mm256_add_ps(t, *a));
            *s = hsum(total);
            for (c, xc) in x.iter().enumerate().skip(vectors_end) {
                let v = match widen {
                    Widen::F32 => *(w.add(r * stride + c) as *const f32),
                    Widen::Bf16 => (*(w.add(r * stride + c) as *const bf16)).to_f32(),
                };
                *s += v * xc;
            }
        }
        sums
    }

    /// The 32 int8 products of a block summed in eight i32 lanes: `|w| * sign(x, w)` makes
    /// the unsigned-by-signed multiply of `maddubs` a signed one.
    #[inline(always)]
    unsafe fn block_sum(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
    }

    /// One f16 to f32 through F16C.
    #[inline(always)]
    unsafe fn f16_to_f32(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Blocks whose combined scales are computed together, eight at a time.
    const SCALE_TILE: usize = 64;

    /// `Σ_k d_w[k] d_x[k] (w_k . x_k)` with `load(k)` giving block `k`'s 32 weights as int8.
    /// The combined scales `d_w d_x` of a tile of blocks are computed eight at a time first;
    /// the blocks then go two per iteration into two accumulators, so that the
    /// multiply-adds of neighbouring blocks do not wait on each other.
    #[inline(always)]
    unsafe fn dot_blocks(
        ws: &[f16],
        xs: &[f32],
        xq: &[i8],
        load: impl Fn(usize) -> __m256i,
    ) -> f32 {
        let mut scales = [0.0f32; SCALE_TILE];
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for tile in (0..ws.len()).step_by(SCALE_TILE) {
            let n = (ws.len() - tile).min(SCALE_TILE);
            combined_scales(&ws[tile..tile + n], &xs[tile..tile + n], &mut scales[..n]);
            let block = |j: usize| {
                let k = tile + j;
                let x = _mm256_loadu_si256(xq.as_ptr().add(k * BLOCK) as *const __m256i);
                let sum = _mm256_cvtepi32_ps(block_sum(load(k), x));
                (_mm256_broadcast_ss(scales.get_unchecked(j)), sum)
            };
            for p in 0..n / 2 {
                let (d0, s0) = block(2 * p);
                let (d1, s1) = block(2 * p + 1);
                acc0 = _mm256_fmadd_ps(d0, s0, acc0);
                acc1 = _mm256_fmadd_ps(d1, s1, acc1);
            }
            if n % 2 == 1 {
                let (d, s) = block(n - 1);
                acc0 = _mm256_fmadd_ps(d, s, acc0);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// `out[k] = d_w[k] * d_x[k]`, converting the f16 weight scales eight at a time.
    #[inline(always)]
    unsafe fn combined_scales(ws: &[f16], xs: &[f32], out: &mut [f32]) {
        let body = ws.len() - ws.len() % 8;
        for k in (0..body).step_by(8) {
            let w8 = _mm256_cvtph_ps(_mm_loadu_si128(ws.as_ptr().add(k) as *const __m128i));
            let x8 = _mm256_loadu_ps(xs.as_ptr().add(k));
            _mm256_storeu_ps(out.as_mut_ptr().add(k), _mm256_mul_ps(w8, x8));
        }
        for k in body..ws.len() {
            out[k] = f16_to_f32(ws[k]) * xs[k];
        }
    }

    #[inline(always)]
    unsafe fn load_q8_0(wq: &[u8], k: usize) -> __m256i {
        _mm256_loadu_si256(wq.as_ptr().add(k * BLOCK) as *const __m256i)
    }

    /// 16 bytes of nibbles as 32 int8 `q - 8`: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn load_q4_0(wq: &[u8], k: usize) -> __m256i {
        let packed = _mm_loadu_si128(wq.as_ptr().add(k * BLOCK / 2) as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let nibbles = _mm256_and_si256(both, _mm256_set1_epi8(0xf));
        _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8))
    }

    /// Rows of quantised weights against one row of activations: `out[r * stride]` for
    /// each row `r` of `ws: (rows, bpr)` scales and `wq` quants.
    pub(super) type QuantRows = fn(&[f16], &[u8], usize, ActivationRow, &mut [f32], usize);

    /// The AVX-512 VNNI kernels, where the CPU has them.
    pub(super) fn vnni_rows(format: QuantFormat) -> Option<QuantRows> {
        let has = |f: &str| match f {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512vl" => is_x86_feature_detected!("avx512vl"),
            "avx512dq" => is_x86_feature_detected!("avx512dq"),
            _ => is_x86_feature_detected!("avx512vnni"),
        };
        let all = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"]
            .iter()
            .all(|f| has(f))
            && has_avx2_fma()
            && is_x86_feature_detected!("f16c");
        all.then_some(match format {
            QuantFormat::Q8_0 => rows_q8_0_vnni as QuantRows,
            QuantFormat::Q4_0 => rows_q4_0_vnni as QuantRows,
        })
    }

    /// Blocks per group: eight scales converted and multiplied at once, four block pairs.
    const GROUP: usize = 8;

    /// The VNNI kernels for `R` rows at once, each activation load serving all `R`. The
    /// weights are made unsigned by an offset (`w + 128` for q8_0, the raw nibble `q = w + 8`
    /// for q4_0) so that `dpbusd` multiplies them with the signed activations as they are;
    /// the offset comes back out as `offset * Σ_k d_w[k] d_x[k] Σ_j x_kj`, from the
    /// activations' scaled block sums. Each group of [`GROUP`] blocks converts and multiplies
    /// its eight scales at once (`group_scales`); the blocks after the last whole group go one
    /// at a time (`tail_blocks`).
    ///
    /// q8_0: block pairs in 512-bit registers (the quants as they are in memory).
    #[inline(always)]
    unsafe fn rows_q8_0_vnni_r<const R: usize>(
        ws: [&[f16]; R],
        wq: [&[u8]; R],
        x: ActivationRow,
    ) -> [f32; R] {
        // Lanes 0-7 take scale `2p` of a group, lanes 8-15 scale `2p + 1`.
        let pair_index: [__m512i; GROUP / 2] = std::array::from_fn(|p| {
            let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
        });
        let mut acc = [[_mm512_setzero_ps(); GROUP / 2]; R];
        let mut corr = [_mm256_setzero_ps(); R];
        let groups = ws[0].len() / GROUP;
        for g in 0..groups {
            let k = g * GROUP;
            let s16: [__m512; R] = std::array::from_fn(|r| group_scales(ws[r], x, k, &mut corr[r]));
            for p in 0..GROUP / 2 {
                let at = k + 2 * p;
                let xv = _mm512_loadu_si512(x.quants.as_ptr().add(at * BLOCK) as *const _);
                for r in 0..R {
                    prefetch_ahead(wq[r], at * BLOCK);
                    let dot =
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), load_pair_q8_0(wq[r], at), xv);
                    let scale = _mm512_permutexvar_ps(pair_index[p], s16[r]);
                    acc[r][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[r][p]);
                }
            }
        }
        std::array::from_fn(|r| {
            let [a0, a1, a2, a3] = acc[r];
            let sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            _mm512_reduce_add_ps(sum) - 128.0 * hsum(corr[r])
                + tail_blocks(ws[r], x, groups * GROUP, 128.0, |k| load_one_q8_0(wq[r], k))
        })
    }

    /// q4_0: four blocks per 512-bit register. One 64-byte load holds the packed nibbles of
    /// four blocks; masked, its low nibbles are the four blocks' first halves (values 0-15),
    /// shifted and masked its high nibbles their second halves, against activations stored
    /// in that order (`ActivationRow::halves`): two `dpbusd` into one register whose lanes
    /// 4i..4i+3 hold block i's products.
    #[inline(always)]
    unsafe fn rows_q4_0_vnni_r<const R: usize>(
        ws: [&[f16]; R],
        wq: [&[u8]; R],
        x: ActivationRow,
    ) -> [f32; R] {
        // Lanes 4i..4i+3 take scale `4q + i` of a group.
        let quad_index: [__m512i; GROUP / QUAD] = std::array::from_fn(|q| {
            let at = |i: i32| 4 * q as i32 + i;
            let (a, b, c, d) = (at(0), at(1), at(2), at(3));
            _mm512_set_epi32(d, d, d, d, c, c, c, c, b, b, b, b, a, a, a, a)
        });
        let mask = _mm512_set1_epi8(0xf);
        let mut acc = [[_mm512_setzero_ps(); GROUP / QUAD]; R];
        let mut corr = [_mm256_setzero_ps(); R];
        let groups = ws[0].len() / GROUP;
        for g in 0..groups {
            let k = g * GROUP;
            let s16: [__m512; R] = std::array::from_fn(|r| group_scales(ws[r], x, k, &mut corr[r]));
            for q in 0..GROUP / QUAD {
                let at = k + QUAD * q;
                let xs = x.halves.as_ptr().add(at * BLOCK);
                let x_firsts = _mm512_loadu_si512(xs as *const _);
                let x_seconds = _mm512_loadu_si512(xs.add(QUAD * BLOCK / 2) as *const _);
                for r in 0..R {
                    prefetch_ahead(wq[r], at * BLOCK / 2);
                    let packed = _mm512_loadu_si512(wq[r].as_ptr().add(at * BLOCK / 2) as *const _);
                    let firsts = _mm512_and_si512(packed, mask);
                    let seconds = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), firsts, x_firsts);
                    let dot = _mm512_dpbusd_epi32(dot, seconds, x_seconds);
                    let scale = _mm512_permutexvar_ps(quad_index[q], s16[r]);
                    acc[r][q] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[r][q]);
                }
            }
        }
        std::array::from_fn(|r| {
            let [a0, a1] = acc[r];
            _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) - 8.0 * hsum(corr[r])
                + tail_blocks(ws[r], x, groups * GROUP, 8.0, |k| load_one_q4_0(wq[r], k))
        })
    }

    /// How far ahead of its loads a VNNI kernel asks for each row's quants (five cache lines).
    /// Its `perf` samples sat on the weights' loads, the hardware prefetcher short of them:
    /// mamba2-130m decoding at 1 thread, the kernels with and without this switched per eight
    /// steps in one process (60 rounds, median ms per step): q8_0 10.89 -> 10.27 and 10.52 ->
    /// 9.48 (faster in 42 and 52 of 60 rounds; mamba-130m 9.97 -> 9.82, 37), q4_0 7.39 ->
    /// 7.22 (34; mamba-130m 42); at 2 threads q8_0 6.26 -> 6.25 (33), q4_0 5.04 -> 4.86 (35).
    /// 192 bytes ahead measured a little less (38 of 60), 512 and 1 024 slower.
    const QUANT_PREFETCH_BYTES: usize = 320;

    /// Asks for the cache line [`QUANT_PREFETCH_BYTES`] after byte `at` of `quants`, and for
    /// the one [`QUANT_L2_PREFETCH_BYTES`] after it into the L2 cache (past the row's end: the next
    /// rows of the matrix, or nothing; a prefetch never faults).
    #[inline(always)]
    unsafe fn prefetch_ahead(quants: &[u8], at: usize) {
        let at = quants.as_ptr().wrapping_add(at);
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(QUANT_PREFETCH_BYTES) as *const i8);
        lines_to_l2(at.wrapping_add(QUANT_L2_PREFETCH_BYTES), 1);
    }

    /// How far ahead of their loads the q8_0 / q4_0 decoding kernels ask for each row's quants
    /// into the L2 cache. On the Intel Xeon host of the thirty-eighth session (8-9 GB/s from
    /// memory to one core) each kernel with and without it, switched per eight steps in one
    /// process, median ms per step of mamba2-130m: q8_0 23.4 -> 19.4 at 1 thread (16 of 16
    /// rounds faster), 14.2 -> 11.6 at 2 (16 of 16); q4_0 14.8 -> 12.7 (16 of 16) and 9.1 ->
    /// 7.5 (16 of 16). 2 and 8 KiB ahead did as well or a little worse.
    const QUANT_L2_PREFETCH_BYTES: usize = 4096;

    /// How far ahead of its loads the bf16 kernel asks for each of its two rows' weights into
    /// the L2 cache when a sequence is taken alone (decoding). Same host and method as
    /// [`QUANT_L2_PREFETCH_BYTES`]: one row at a time with and without 4 KiB ahead, 36.3 ->
    /// 30.9 ms at 1 thread (20 of 20 rounds) and 21.5 -> 17.6 at 2 (20 of 20); asking for the
    /// L1 cache (`prefetcht0`) instead did as well 1 KiB ahead, worse 2 KiB ahead and worse
    /// than not at all 4 KiB ahead (30.2, 32.9, 37.5 against 35.6 without); two rows
    /// without and with 2 KiB ahead 32.6 -> 29.4 and 18.7 -> 17.2; 2 or 3 KiB against 4 KiB
    /// ahead, 28.3 / 28.4 against 29.2 (13 and 15 of 16) and 16.1 / 16.0 against 16.4 (15 and
    /// 16 of 16). The f32 kernel gained nothing from it (1 and 2 threads, 12 rounds each) and
    /// goes without.
    const BF16_L2_PREFETCH_BYTES: usize = 2048;

    /// The combined scales `d_w d_x` of blocks `k..k + 8` in the low half of a 512-bit
    /// register; adds their `d_w d_x Σ x` to `corr`.
    #[inline(always)]
    unsafe fn group_scales(ws: &[f16], x: ActivationRow, k: usize, corr: &mut __m256) -> __m512 {
        let w8 = _mm256_cvtph_ps(_mm_loadu_si128(ws.as_ptr().add(k) as *const __m128i));
        let s8 = _mm256_mul_ps(w8, _mm256_loadu_ps(x.scales.as_ptr().add(k)));
        *corr = _mm256_fmadd_ps(w8, _mm256_loadu_ps(x.scaled_sums.as_ptr().add(k)), *corr);
        _mm512_castps256_ps512(s8)
    }

    /// The blocks from `from` on, one at a time (the quants in memory order).
    #[inline(always)]
    unsafe fn tail_blocks(
        ws: &[f16],
        x: ActivationRow,
        from: usize,
        offset: f32,
        load_one: impl Fn(usize) -> __m256i,
    ) -> f32 {
        let mut total = 0.0;
        for (k, wk) in ws.iter().enumerate().skip(from) {
            let xv = _mm256_loadu_si256(x.quants.as_ptr().add(k * BLOCK) as *const __m256i);
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), load_one(k), xv);
            let w = f16_to_f32(*wk);
            total +=
                w * x.scales[k] * hsum(_mm256_cvtepi32_ps(dot)) - offset * w * x.scaled_sums[k];
        }
        total
    }

    /// Blocks `k` and `k + 1` of q8_0 weights as unsigned `w + 128`.
    #[inline(always)]
    unsafe fn load_pair_q8_0(wq: &[u8], k: usize) -> __m512i {
        let w = _mm512_loadu_si512(wq.as_ptr().add(k * BLOCK) as *const _);
        _mm512_xor_si512(w, _mm512_set1_epi8(-128))
    }

    /// Block `k` of q8_0 weights as unsigned `w + 128`.
    #[inline(always)]
    unsafe fn load_one_q8_0(wq: &[u8], k: usize) -> __m256i {
        _mm256_xor_si256(load_q8_0(wq, k), _mm256_set1_epi8(-128))
    }

    /// Block `k` of q4_0 weights as its unsigned nibbles, in value order.
    #[inline(always)]
    unsafe fn load_one_q4_0(wq: &[u8], k: usize) -> __m256i {
        let packed = _mm_loadu_si128(wq.as_ptr().add(k * BLOCK / 2) as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0xf))
    }

    /// Checks that `wq` and `x` cover the blocks `ws` names, as the kernels' loads assume,
    /// and, where the kernel reads `x.halves`, that they cover its whole groups.
    fn check_blocks(ws: &[f16], wq: &[u8], x: &ActivationRow, block_bytes: usize, halves: bool) {
        let blocks = ws.len();
        assert!(
            wq.len() >= blocks * block_bytes
                && x.quants.len() >= blocks * BLOCK
                && x.scales.len() >= blocks
                && x.scaled_sums.len() >= blocks
                && (!halves || x.halves.len() >= blocks / GROUP * GROUP * BLOCK)
        );
    }

    macro_rules! avx2_kernel {
        ($name:ident, $load:ident, $block_bytes:expr) => {
            pub(super) fn $name(ws: &[f16], wq: &[u8], x: ActivationRow) -> f32 {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn inner(ws: &[f16], wq: &[u8], x: ActivationRow) -> f32 {
                    dot_blocks(ws, x.scales, x.quants, |k| $load(wq, k))
                }
                check_blocks(ws, wq, &x, $block_bytes, false);
                // SAFETY: `quant_kernel` hands this function out only after detecting the
                // features; every load stays inside the slices checked above.
                unsafe { inner(ws, wq, x) }
            }
        };
    }

    macro_rules! vnni_kernel {
        ($name:ident, $rows:ident, $block_bytes:expr, $halves:expr) => {
            fn $name(
                ws: &[f16],
                wq: &[u8],
                bpr: usize,
                x: ActivationRow,
                out: &mut [f32],
                stride: usize,
            ) {
                #[target_feature(
                    enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
                )]
                unsafe fn inner(
                    ws: &[f16],
                    wq: &[u8],
                    bpr: usize,
                    x: ActivationRow,
                    out: &mut [f32],
                    stride: usize,
                ) {
                    // Rows a and a + rows / 2 together, sharing the activation loads, the
                    // last odd row alone. Two far-apart sequential streams: adjacent rows
                    // read together made the hardware prefetcher fall behind (mamba2-130m
                    // q8_0 decoding at half the speed).
                    let row_bytes = bpr * $block_bytes;
                    let rows = ws.len() / bpr;
                    let half = rows / 2;
                    let row = |r: usize| (&ws[r * bpr..][..bpr], &wq[r * row_bytes..][..row_bytes]);
                    for a in 0..half {
                        let ((ws_a, wq_a), (ws_b, wq_b)) = (row(a), row(a + half));
                        let [ya, yb] = $rows([ws_a, ws_b], [wq_a, wq_b], x);
                        out[a * stride] = ya;
                        out[(a + half) * stride] = yb;
                    }
                    if rows % 2 == 1 {
                        let (ws_r, wq_r) = row(rows - 1);
                        let [y] = $rows([ws_r], [wq_r], x);
                        out[(rows - 1) * stride] = y;
                    }
                }
                let rows = ws.len() / bpr.max(1);
                check_blocks(
                    &ws[..bpr.min(ws.len())],
                    &wq[..(bpr * $block_bytes).min(wq.len())],
                    &x,
                    $block_bytes,
                    $halves,
                );
                assert!(
                    bpr > 0
                        && ws.len() == rows * bpr
                        && wq.len() == rows * bpr * $block_bytes
                        && out.len() > (rows.max(1) - 1) * stride
                );
                // SAFETY: `vnni_rows` hands this function out only after detecting the
                // features; every row's loads stay inside the slices checked above.
                unsafe { inner(ws, wq, bpr, x, out, stride) }
            }
        };
    }

    avx2_kernel!(dot_q8_0_avx2, load_q8_0, BLOCK);
    avx2_kernel!(dot_q4_0_avx2, load_q4_0, BLOCK / 2);
    vnni_kernel!(rows_q8_0_vnni, rows_q8_0_vnni_r, BLOCK, false);
    vnni_kernel!(rows_q4_0_vnni, rows_q4_0_vnni_r, BLOCK / 2, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_testing::lcg_values as values;

    fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// The product of `w` with `batch` rows, fast and reference.
    fn both(w: Weights, rows: usize, cols: usize, batch: usize) -> (Vec<f32>, Vec<f32>) {
        let x = values(batch * cols, 7);
        let (mut fast, mut slow) = (vec![0.0; batch * rows], vec![0.0; batch * rows]);
        gemv(w, rows, cols, &x, &mut fast).unwrap();
        gemv_reference(w, rows, cols, &x, &mut slow).unwrap();
        (fast, slow)
    }

    #[test]
    fn dense_products_match_the_reference() {
        // 200 columns: whole steps of 32 and one vector of eight after them (bf16 dots: three
        // steps of 64, eight columns one at a time); 53: one step, two vectors and five
        // columns one at a time (narrow rows like dt_proj's; bf16 dots: three vectors of 16
        // and five); 80 (bf16 dots: a step and one vector). Five sequences: four at once in
        // the bf16 dots, then one.
        for (rows, cols) in [(77, 200), (33, 53), (20, 80)] {
            let w = values(rows * cols, 1);
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            for batch in [1, 3, 5] {
                let (fast, slow) = both(Weights::F32(&w), rows, cols, batch);
                assert!(max_rel_err(&fast, &slow) < 1e-5, "f32 {cols} batch {batch}");
                let (fast, slow) = bf16_both(&wb, rows, cols, batch);
                assert!(
                    max_rel_err(&fast, &slow) < 1e-5,
                    "bf16 {cols} batch {batch}"
                );
            }
        }
    }

    /// [`both`] for bf16 weights, the reference given `x` rounded to bf16 where the CPU has
    /// bf16 dot products (the kernel then multiplies the rounded activations).
    fn bf16_both(w: &[bf16], rows: usize, cols: usize, batch: usize) -> (Vec<f32>, Vec<f32>) {
        let x = values(batch * cols, 7);
        let x_read: Vec<f32> = if bf16_dots() {
            x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect()
        } else {
            x.clone()
        };
        let (mut fast, mut slow) = (vec![0.0; batch * rows], vec![0.0; batch * rows]);
        gemv(Weights::Bf16(w), rows, cols, &x, &mut fast).unwrap();
        gemv_reference(Weights::Bf16(w), rows, cols, &x_read, &mut slow).unwrap();
        (fast, slow)
    }

    #[test]
    fn products_in_several_claimed_chunks_match_the_reference() {
        // 1024 columns: 64 f32 rows, 128 bf16 rows or 241 q8_0 rows per claimed chunk, so
        // 600 rows make several chunks and a shorter last one, for one sequence and for three.
        let (rows, cols) = (600, 1024);
        let w = values(rows * cols, 3);
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let q = QuantMatrix::quantize(&w, rows, cols, QuantFormat::Q8_0).unwrap();
        assert!(rows_per_claim(&Weights::Quant(&q), rows) < rows);
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for batch in [1, 3] {
                let (fast, slow) = pool.install(|| both(Weights::F32(&w), rows, cols, batch));
                assert!(max_rel_err(&fast, &slow) < 1e-5, "f32 batch {batch}");
                let (fast, slow) = pool.install(|| bf16_both(&wb, rows, cols, batch));
                assert!(max_rel_err(&fast, &slow) < 1e-5, "bf16 batch {batch}");
                let (fast, slow) = pool.install(|| both(Weights::Quant(&q), rows, cols, batch));
                assert!(max_rel_err(&fast, &slow) < 1e-2, "q8_0 batch {batch}");
            }
        }
    }

    #[test]
    fn quantised_products_match_the_dequantised_reference() {
        let (rows, cols) = (45, 320);
        let w = values(rows * cols, 2);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, rows, cols, format).unwrap();
            for batch in [1, 2, 5] {
                let (fast, slow) = both(Weights::Quant(&q), rows, cols, batch);
                // The activations are quantised to 8 bits: about 1/127 of each block's
                // largest value, averaging out over the row.
                let err = max_rel_err(&fast, &slow);
                assert!(err < 1e-2, "{format:?} batch {batch}: {err}");
            }
        }
    }

    #[test]
    fn every_quantised_kernel_agrees_with_the_scalar_one() {
        // 1 and 9 blocks: a tail after the groups of eight; 133: several groups and a tail.
        // Seven rows: the VNNI kernels take rows r and r + 3 together, then the last alone.
        for blocks in [1, 9, 133] {
            let (rows, cols) = (7, blocks * BLOCK);
            let w = values(rows * cols, 3);
            let x = values(cols, 4);
            for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
                let xq = QuantizedActivations::new(&x, 1, cols, format);
                let q = QuantMatrix::quantize(&w, rows, cols, format).unwrap();
                let (ws, wq) = q.row_range(0, rows);
                let qpr = wq.len() / rows;
                let scalar: Vec<f32> = (0..rows)
                    .map(|r| {
                        let (ws, wq) = (&ws[r * blocks..][..blocks], &wq[r * qpr..][..qpr]);
                        match format {
                            QuantFormat::Q8_0 => dot_q8_0_scalar(ws, wq, xq.row(0)),
                            QuantFormat::Q4_0 => dot_q4_0_scalar(ws, wq, xq.row(0)),
                        }
                    })
                    .collect();
                for (name, fast) in fast_kernels(format, ws, wq, blocks, &xq) {
                    for (f, s) in fast.iter().zip(&scalar) {
                        // All sum the same integer block products; only the f32 order differs.
                        assert!(
                            (f - s).abs() <= 1e-5 * s.abs().max(1.0),
                            "{format:?} {name} {blocks} blocks: {f} vs {s}"
                        );
                    }
                }
            }
        }
    }

    /// Every row through each SIMD kernel this CPU can run, by name.
    fn fast_kernels(
        format: QuantFormat,
        ws: &[f16],
        wq: &[u8],
        blocks: usize,
        xq: &QuantizedActivations,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let rows = ws.len() / blocks;
        let qpr = wq.len() / rows;
        let per_row = |kernel: QuantDot| -> Vec<f32> {
            (0..rows)
                .map(|r| {
                    kernel(
                        &ws[r * blocks..][..blocks],
                        &wq[r * qpr..][..qpr],
                        xq.row(0),
                    )
                })
                .collect()
        };
        let mut out = vec![("chosen", per_row(quant_kernel(format)))];
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(kernel) = x86::vnni_rows(format) {
                let mut y = vec![0.0; rows];
                kernel(ws, wq, blocks, xq.row(0), &mut y, 1);
                out.push(("vnni", y));
            }
        }
        out
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let w = [0.0f32; 12];
        let mut y = [0.0f32; 3];
        assert!(gemv(Weights::F32(&w), 3, 4, &[0.0; 5], &mut y).is_err());
        assert!(gemv(Weights::F32(&w), 4, 4, &[0.0; 4], &mut y).is_err());
        let q = QuantMatrix::quantize(&[0.0; 64], 2, 32, QuantFormat::Q8_0).unwrap();
        assert!(gemv(Weights::Quant(&q), 1, 64, &[0.0; 64], &mut y[..1]).is_err());
    }
}
