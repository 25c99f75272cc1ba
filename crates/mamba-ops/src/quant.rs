//! Block-quantised weight matrices in llama.cpp's `q8_0` and `q4_0` formats.
//!
//! A row of `cols` values (a multiple of 32) is cut into blocks of 32, each with one f16
//! scale `d`:
//!
//! ```text
//! q8_0:  d = max|x| / 127,                      q = round(x / d)  in [-127, 127],  x ≈ q d
//! q4_0:  d = m / -8  (m: the value of largest magnitude, sign kept),
//!        q = min(15, trunc(x / d + 8.5))  in [0, 15],                               x ≈ (q - 8) d
//! ```
//!
//! The rounding is ggml's reference (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`), so a
//! matrix quantised here has the same bytes as one quantised by llama.cpp, and dequantising
//! then quantising again gives the same blocks back. In memory the scales and the quants are
//! kept apart (structure of arrays) for the vector kernels of [`crate::gemv`];
//! [`QuantMatrix::to_ggml_bytes`] and [`QuantMatrix::from_ggml_bytes`] give and take ggml's
//! interleaved blocks (`{f16 d; quants}`) as GGUF files store them.

use crate::error::{OpError, Result};
use crate::pages::back_with_huge_pages;
use half::{bf16, f16};
use rayon::prelude::*;

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// A block quantisation format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit quants, 34 bytes per 32 values.
    Q8_0,
    /// 4-bit quants, 18 bytes per 32 values.
    Q4_0,
}

impl QuantFormat {
    /// Bytes of quants per block (the scale's two bytes not counted).
    pub fn quant_bytes_per_block(self) -> usize {
        match self {
            QuantFormat::Q8_0 => BLOCK,
            QuantFormat::Q4_0 => BLOCK / 2,
        }
    }

    /// Bytes of one block as ggml stores it: the f16 scale, then the quants.
    pub fn ggml_block_bytes(self) -> usize {
        2 + self.quant_bytes_per_block()
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }
}

/// A `(rows, cols)` row-major matrix quantised row by row in blocks of [`BLOCK`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// `(rows, cols / 32)`.
    scales: Vec<f16>,
    /// `(rows, cols / 32, quant_bytes_per_block)`: i8 values for q8_0; for q4_0 byte `j` of a
    /// block holds value `j` in its low nibble and value `j + 16` in its high nibble.
    quants: Vec<u8>,
}

impl QuantMatrix {
    /// Asks for huge pages under the matrix's blocks where they are turned on
    /// ([`crate::pages`]), as decoding streams them from memory every token.
    pub fn back_with_huge_pages(&self) {
        back_with_huge_pages(&self.scales);
        back_with_huge_pages(&self.quants);
    }

    /// Quantises `w: (rows, cols)`; `cols` must be a multiple of 32.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: QuantFormat) -> Result<Self> {
        check_dims(rows, cols, w.len(), rows * cols)?;
        let blocks = rows * cols / BLOCK;
        let qb = format.quant_bytes_per_block();
        let mut scales = vec![f16::ZERO; blocks];
        let mut quants = vec![0u8; blocks * qb];
        scales
            .par_iter_mut()
            .zip(quants.par_chunks_mut(qb))
            .zip(w.par_chunks(BLOCK))
            .with_min_len(256)
            .for_each(|((d, q), x)| {
                *d = match format {
                    QuantFormat::Q8_0 => quantize_block_q8_0(x, q),
                    QuantFormat::Q4_0 => quantize_block_q4_0(x, q),
                }
            });
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            scales,
            quants,
        })
    }

    /// The matrix from ggml's interleaved blocks (as in a GGUF tensor of this format).
    pub fn from_ggml_bytes(
        bytes: &[u8],
        rows: usize,
        cols: usize,
        format: QuantFormat,
    ) -> Result<Self> {
        let bb = format.ggml_block_bytes();
        check_dims(rows, cols, bytes.len(), rows * cols / BLOCK * bb)?;
        let (scales, quants): (Vec<f16>, Vec<&[u8]>) = bytes
            .chunks_exact(bb)
            .map(|b| (f16::from_le_bytes([b[0], b[1]]), &b[2..]))
            .unzip();
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            scales,
            quants: quants.concat(),
        })
    }

    /// ggml's interleaved blocks, as a GGUF file stores a tensor of this format.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let qb = self.format.quant_bytes_per_block();
        self.scales
            .iter()
            .zip(self.quants.chunks_exact(qb))
            .flat_map(|(d, q)| d.to_le_bytes().into_iter().chain(q.iter().copied()))
            .collect()
    }

    /// The values the blocks stand for, `(rows, cols)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// [`QuantMatrix::dequantize`] into `out` (`rows * cols` values; a buffer the caller
    /// reuses stays in the cache and needs no zeroing).
    ///
    /// # Panics
    /// If `out` does not hold `rows * cols` values.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let format = self.format;
        self.for_block_runs(out, |scales, quants, dst| {
            for (dst, d, q) in blocks(format, scales, quants, dst) {
                dequantize_block(format, d, q, dst);
            }
        });
    }

    /// Rows `rows` of [`QuantMatrix::dequantize`], `(rows.len(), cols)` into `out`, on the
    /// calling thread (a task's block of a product's weights).
    ///
    /// # Panics
    /// If the rows are not all in the matrix or `out` does not hold their values.
    pub fn dequantize_rows_into(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            rows.len() * self.cols,
            "dequantising into a wrong size"
        );
        let (scales, quants) = self.row_range(rows.start, rows.len());
        let format = self.format;
        crate::math::with_simd(
            #[inline(always)]
            || {
                for (dst, d, q) in blocks(format, scales, quants, out) {
                    dequantize_block(format, d, q, dst);
                }
            },
        );
    }

    /// [`QuantMatrix::dequantize_into`] rounded to bf16 (to nearest, ties to even), for a
    /// product on bf16 dot instructions.
    ///
    /// # Panics
    /// If `out` does not hold `rows * cols` values.
    pub fn dequantize_into_bf16(&self, out: &mut [bf16]) {
        let format = self.format;
        self.for_block_runs(out, |scales, quants, dst| {
            dequantize_blocks_bf16(format, scales, quants, dst)
        });
    }

    /// Runs `f(scales, quants, values)` on runs of consecutive blocks and their values in
    /// `out` (`rows * cols` of them), spread over rayon's threads.
    ///
    /// # Panics
    /// If `out` does not hold `rows * cols` values.
    fn for_block_runs<T: Send>(&self, out: &mut [T], f: impl Fn(&[f16], &[u8], &mut [T]) + Sync) {
        assert_eq!(
            out.len(),
            self.rows * self.cols,
            "dequantising into a wrong size"
        );
        const BLOCKS_PER_TASK: usize = 256;
        let qb = self.format.quant_bytes_per_block();
        out.par_chunks_mut(BLOCK * BLOCKS_PER_TASK)
            .zip(self.scales.par_chunks(BLOCKS_PER_TASK))
            .zip(self.quants.par_chunks(qb * BLOCKS_PER_TASK))
            .for_each(|((dst, scales), quants)| f(scales, quants, dst));
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights a product with this matrix reads.
    pub fn size_in_bytes(&self) -> usize {
        self.scales.len() * 2 + self.quants.len()
    }

    /// The same values in q8_0 blocks: exact, since a q4_0 block's values `(q - 8) d` are
    /// 8-bit integers times the same scale (a q8_0 matrix is returned as it is).
    pub fn to_q8_0(&self) -> QuantMatrix {
        let quants = match self.format {
            QuantFormat::Q8_0 => self.quants.clone(),
            QuantFormat::Q4_0 => self
                .quants
                .chunks_exact(BLOCK / 2)
                .flat_map(|block| {
                    let low = block.iter().map(|q| q4_0_values(*q).0);
                    let high = block.iter().map(|q| q4_0_values(*q).1);
                    low.chain(high).map(|v| v as u8)
                })
                .collect(),
        };
        QuantMatrix {
            format: QuantFormat::Q8_0,
            rows: self.rows,
            cols: self.cols,
            scales: self.scales.clone(),
            quants,
        }
    }

    /// Rows `start..start + count` as a matrix of their own.
    ///
    /// # Panics
    /// If the rows are not all in the matrix.
    pub fn row_block(&self, start: usize, count: usize) -> QuantMatrix {
        assert!(start + count <= self.rows, "rows past the matrix");
        let (scales, quants) = self.row_range(start, count);
        QuantMatrix {
            format: self.format,
            rows: count,
            cols: self.cols,
            scales: scales.to_vec(),
            quants: quants.to_vec(),
        }
    }

    /// The scales and quants of rows `start..start + count`.
    pub(crate) fn row_range(&self, start: usize, count: usize) -> (&[f16], &[u8]) {
        let bpr = self.cols / BLOCK;
        let qpr = bpr * self.format.quant_bytes_per_block();
        (
            &self.scales[start * bpr..(start + count) * bpr],
            &self.quants[start * qpr..(start + count) * qpr],
        )
    }
}

/// The two values byte `j` of a q4_0 block holds, its nibbles minus 8: value `j` (low
/// nibble) and value `j + 16` (high nibble), before the block's scale.
#[inline(always)]
pub(crate) fn q4_0_values(byte: u8) -> (i8, i8) {
    ((byte & 0xf) as i8 - 8, (byte >> 4) as i8 - 8)
}

/// One block's values `dst[j] = q_j d` (q4_0: see [`q4_0_values`]).
#[inline(always)]
fn dequantize_block(format: QuantFormat, d: f32, q: &[u8], dst: &mut [f32]) {
    match format {
        QuantFormat::Q8_0 => {
            for (v, q) in dst.iter_mut().zip(q) {
                *v = *q as i8 as f32 * d;
            }
        }
        QuantFormat::Q4_0 => {
            let (low, high) = dst.split_at_mut(BLOCK / 2);
            for ((lo, hi), q) in low.iter_mut().zip(high.iter_mut()).zip(q) {
                let (l, h) = q4_0_values(*q);
                *lo = l as f32 * d;
                *hi = h as f32 * d;
            }
        }
    }
}

/// Each block of a run: its values in `dst`, its scale and its quantised bytes.
fn blocks<'a, T>(
    format: QuantFormat,
    scales: &'a [f16],
    quants: &'a [u8],
    dst: &'a mut [T],
) -> impl Iterator<Item = (&'a mut [T], f32, &'a [u8])> {
    let qb = format.quant_bytes_per_block();
    dst.chunks_exact_mut(BLOCK)
        .zip(scales)
        .zip(quants.chunks_exact(qb))
        .map(|((dst, d), q)| (dst, d.to_f32(), q))
}

/// Consecutive blocks' values rounded to bf16 (`dst[32 i + j] = bf16(q_ij d_i)`): with AVX-512
/// BF16's conversion where the CPU has it, else one value at a time.
fn dequantize_blocks_bf16(format: QuantFormat, scales: &[f16], quants: &[u8], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::bf16_dot_supported() {
        for (dst, d, q) in blocks(format, scales, quants, dst) {
            // SAFETY: bf16_dot_supported checked avx512f and avx512bf16 on this CPU.
            unsafe { x86::dequantize_block_bf16(format, d, q, dst) };
        }
        return;
    }
    for (dst, d, q) in blocks(format, scales, quants, dst) {
        let mut values = [0.0f32; BLOCK];
        dequantize_block(format, d, q, &mut values);
        dst.iter_mut()
            .zip(values)
            .for_each(|(o, v)| *o = bf16::from_f32(v));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantFormat, BLOCK};
    use half::bf16;
    use std::arch::x86_64::*;

    /// One block's values `q_j d` rounded to bf16 by `vcvtneps2bf16` (to nearest, ties to
    /// even; the instruction reads subnormal inputs as zero).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn dequantize_block_bf16(format: QuantFormat, d: f32, q: &[u8], dst: &mut [bf16]) {
        let dst = &mut dst[..BLOCK];
        // Values 0..16 and 16..32 of the block as i32.
        let (low, high) = match format {
            QuantFormat::Q8_0 => {
                let q = &q[..BLOCK];
                // SAFETY: q holds 32 bytes, read as two unaligned 16-byte loads.
                unsafe {
                    (
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().cast())),
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(q[16..].as_ptr().cast())),
                    )
                }
            }
            QuantFormat::Q4_0 => {
                let q = &q[..BLOCK / 2];
                // SAFETY: q holds 16 bytes, read as one unaligned load.
                let bytes = unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().cast())) };
                let eight = _mm512_set1_epi32(8);
                (
                    _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xf)), eight),
                    _mm512_sub_epi32(_mm512_srli_epi32::<4>(bytes), eight),
                )
            }
        };
        let scale = _mm512_set1_ps(d);
        for (ints, out) in [low, high].into_iter().zip(dst.chunks_exact_mut(16)) {
            let rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(ints), scale));
            // SAFETY: out holds 16 bf16 values, 32 bytes, written by one unaligned store.
            unsafe { out.as_mut_ptr().cast::<__m256bh>().write_unaligned(rounded) };
        }
    }
}

fn check_dims(rows: usize, cols: usize, len: usize, expected: usize) -> Result<()> {
    if !cols.is_multiple_of(BLOCK) || rows == 0 {
        return Err(OpError::Shape {
            op: "quantize",
            msg: format!("a ({rows}, {cols}) matrix does not make rows of {BLOCK}-value blocks"),
        });
    }
    if len != expected {
        return Err(OpError::Shape {
            op: "quantize",
            msg: format!(
                "{len} values or bytes for a ({rows}, {cols}) matrix, expected {expected}"
            ),
        });
    }
    Ok(())
}

/// ggml's `quantize_row_q8_0_ref` for one block: writes the quants, returns the scale.
pub fn quantize_block_q8_0(x: &[f32], q: &mut [u8]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = (v * id).round() as i8 as u8;
    }
    f16::from_f32(d)
}

/// ggml's `quantize_row_q4_0_ref` for one block: writes the packed quants, returns the scale.
pub fn quantize_block_q4_0(x: &[f32], q: &mut [u8]) -> f16 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let half = BLOCK / 2;
    let nibble = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for (j, qj) in q.iter_mut().enumerate() {
        *qj = nibble(x[j]) | (nibble(x[j + half]) << 4);
    }
    f16::from_f32(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn requantising_the_dequantised_matrix_gives_the_same_blocks() {
        let w = ramp(4 * 96);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, 4, 96, format).unwrap();
            let again = QuantMatrix::quantize(&q.dequantize(), 4, 96, format).unwrap();
            assert_eq!(q, again, "{format:?}");
        }
    }

    #[test]
    fn a_range_of_rows_dequantises_to_those_rows_of_the_whole() {
        let (rows, cols) = (7, 96);
        let w = ramp(rows * cols);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, rows, cols, format).unwrap();
            let whole = q.dequantize();
            for range in [0..7, 2..5, 6..7, 3..3] {
                let mut out = vec![f32::NAN; range.len() * cols];
                q.dequantize_rows_into(range.clone(), &mut out);
                assert_eq!(
                    out,
                    whole[range.start * cols..range.end * cols],
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn ggml_bytes_round_trip_and_have_ggml_block_sizes() {
        let w = ramp(2 * 64);
        for (format, block_bytes) in [(QuantFormat::Q8_0, 34), (QuantFormat::Q4_0, 18)] {
            let q = QuantMatrix::quantize(&w, 2, 64, format).unwrap();
            let bytes = q.to_ggml_bytes();
            assert_eq!(bytes.len(), 4 * block_bytes);
            assert_eq!(
                QuantMatrix::from_ggml_bytes(&bytes, 2, 64, format).unwrap(),
                q
            );
        }
    }

    #[test]
    fn q4_0_blocks_become_q8_0_blocks_of_the_same_values() {
        let w = ramp(3 * 64);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, 3, 64, format).unwrap();
            let q8 = q.to_q8_0();
            assert_eq!(q8.format(), QuantFormat::Q8_0);
            assert_eq!(q8.dequantize(), q.dequantize());
        }
    }

    #[test]
    fn a_row_block_holds_those_rows() {
        let w = ramp(5 * 64);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, 5, 64, format).unwrap();
            let block = q.row_block(1, 3);
            assert_eq!((block.rows(), block.cols()), (3, 64));
            assert_eq!(block.dequantize(), q.dequantize()[64..4 * 64]);
        }
    }

    #[test]
    fn dequantised_bf16_values_are_the_dequantised_values_rounded() {
        let w = ramp(3 * 64);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let q = QuantMatrix::quantize(&w, 3, 64, format).unwrap();
            let mut got = vec![bf16::ZERO; w.len()];
            q.dequantize_into_bf16(&mut got);
            let want: Vec<bf16> = q.dequantize().into_iter().map(bf16::from_f32).collect();
            assert_eq!(got, want, "{format:?}");
        }
    }

    #[test]
    fn dequantised_values_are_within_a_rounding_step() {
        let w = ramp(3 * 64);
        // q4_0 has 8 steps below zero and 7 above: the end opposite the largest magnitude
        // clamps, up to one whole step away.
        for (format, steps, bound) in [
            (QuantFormat::Q8_0, 127.0, 0.5),
            (QuantFormat::Q4_0, 8.0, 1.0),
        ] {
            let q = QuantMatrix::quantize(&w, 3, 64, format).unwrap();
            for (block, back) in w.chunks(BLOCK).zip(q.dequantize().chunks(BLOCK)) {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let step = amax / steps;
                for (a, b) in block.iter().zip(back) {
                    // f16 rounding of the scale adds a relative 2^-11 of the value.
                    assert!(
                        (a - b).abs() <= bound * step + amax * 1e-3,
                        "{format:?} {a} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_0_packs_value_j_low_and_value_j_plus_16_high() {
        let mut x = [0.0f32; BLOCK];
        x[0] = -8.0; // the largest magnitude: d = 1, q = 0
        x[16] = 7.0; // q = 15
        let mut q = [0u8; BLOCK / 2];
        let d = quantize_block_q4_0(&x, &mut q);
        assert_eq!(d.to_f32(), 1.0);
        assert_eq!(q[0], 0xf0);
        assert_eq!(q[1], 0x88);
    }

    #[test]
    fn columns_that_do_not_fill_blocks_are_an_error() {
        let err = QuantMatrix::quantize(&[0.0; 48], 1, 48, QuantFormat::Q8_0).unwrap_err();
        assert!(err.to_string().contains("blocks"), "{err}");
    }
}
