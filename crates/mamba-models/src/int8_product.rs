//! Prefill products with q8_0 and q4_0 weights on candle's integer kernels.
//!
//! A prefill multiplies hundreds of rows of activations by each matrix. For q8_0 weights,
//! candle's quantised product (`QMatMul`) has an AVX-512 VNNI path: the weights repacked in
//! tiles of 16 rows, the activations quantised to 8 bits per 256 values, `vpdpbusd` on both.
//! q4_0 weights take it too, as the q8_0 blocks of the same values (candle has no such path
//! for q4_0 on x86).
//! On this project's Zen 4 it runs at 1.5x the f32 GEMM's rate (768 x 1536 weights, 512
//! rows: 160 against 106 GFLOP/s at one thread, 314 against 200 at two). It takes matrices
//! whose width is a multiple of 256 and whose rows come in sixteens, on CPUs with AVX-512
//! VNNI; elsewhere candle's generic quantised product is slower than widening the weights to
//! f32 (17 GFLOP/s for 3352 x 768), so the layer widens instead. A matrix whose row count is
//! not a multiple of 16 takes its leading rows here and its last few through the f32 GEMM.
//!
//! Memory: candle keeps the rows in its own block layout and, once used, repacked: two q8_0
//! copies of the matrix besides ours for decoding (for q4_0 weights, 3.8 times their bytes).

use crate::error::{Error, Result};
use crate::layers::{with_host_values, HostValues};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use mamba_ops::gemm::matmul_nt_threaded;
use mamba_ops::quant::QuantMatrix;
use std::borrow::Cow;

/// Rows of a tile of candle's repacked weights.
const TILE_ROWS: usize = 16;
/// Values per block of candle's quantised activations (its `q8_K` blocks).
const ACTIVATION_BLOCK: usize = 256;

/// `y = x W^T` for a q8_0 or q4_0 `W: (out, cols)` on candle's integer kernels.
#[derive(Debug)]
pub(crate) struct Int8Product {
    /// The leading rows (a multiple of 16), as candle's q8_0 tensor.
    head: QMatMul,
    head_rows: usize,
    /// The last rows (fewer than 16), widened: `(out - head_rows, cols)`.
    tail: Vec<f32>,
    out: usize,
    cols: usize,
}

impl Int8Product {
    /// The product for `w` where candle's integer kernels take it: weights at least 16 rows
    /// tall and a multiple of 256 wide, on a CPU with AVX-512 VNNI.
    pub(crate) fn new(w: &QuantMatrix) -> Result<Option<Self>> {
        let (out, cols) = (w.rows(), w.cols());
        let head_rows = out / TILE_ROWS * TILE_ROWS;
        if head_rows == 0 || !cols.is_multiple_of(ACTIVATION_BLOCK) || !cpu_has_vnni() {
            return Ok(None);
        }
        let bytes = w.row_block(0, head_rows).to_q8_0().to_ggml_bytes();
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q8_0)?;
        let head = QMatMul::from_qtensor(QTensor::new(storage, (head_rows, cols))?)?;
        let tail = w.row_block(head_rows, out - head_rows).dequantize();
        Ok(Some(Int8Product {
            head,
            head_rows,
            tail,
            out,
            cols,
        }))
    }

    /// `y: (rows, out) = x (rows, cols) W^T`.
    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let rows = x.len() / self.cols;
        let head = self
            .head
            .forward(&Tensor::from_slice(x, (rows, self.cols), &Device::Cpu)?)?;
        // (rows, head_rows), read where candle left it.
        with_host_values(&head, |values| {
            let HostValues::F32(head) = values else {
                return Err(Error::Input(
                    "candle's q8_0 product gave non-f32 values".into(),
                ));
            };
            for (row, part) in y
                .chunks_exact_mut(self.out)
                .zip(head.chunks_exact(self.head_rows))
            {
                row[..self.head_rows].copy_from_slice(part);
            }
            Ok(())
        })?;
        let tail_rows = self.out - self.head_rows;
        if tail_rows > 0 {
            matmul_nt_threaded(
                (rows, tail_rows, self.cols),
                &mut y[self.head_rows..],
                self.out,
                x,
                &self.tail,
            );
        }
        Ok(())
    }
}

/// Whether a prefill's q8_0 / q4_0 products go to candle's integer kernels (where they take
/// the matrix) rather than to the f32 GEMM on blocks of the weights widened as each task needs
/// them ([`mamba_ops::gemm::matmul_nt_rows_threaded`]): on AMD cores with AVX-512 VNNI, where
/// they ran at 1.5x the f32 GEMM (above). On the thirty-ninth session's Intel Xeon they ran
/// below it (`int8_rate`, one thread: 3352 x 768 q8_0 18.7 against f32 135 GFLOP/s, 768 x
/// 1536 128 against 139), and with their activation quantising (`BlockQ8K::from_float`, 10 %
/// of a q8_0 prefill's samples) and output copies, mamba2-130m's prefill of 2048 tokens went
/// from 423-442 to 465-480 tokens/s (1 thread) and 659-684 to 688-701 (2) on widened blocks.
pub(crate) fn int8_products_pay() -> bool {
    cpu_has_vnni() && mamba_ops::gemm::cpu_vendor_is_amd()
}

/// Whether candle's quantised products take their AVX-512 VNNI path on this CPU.
fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_ops::quant::QuantFormat;
    use mamba_testing::lcg_values;

    /// `x (rows, cols) W^T` with `W` dequantised, summed in f64.
    fn widened_product(w: &QuantMatrix, x: &[f32]) -> Vec<f32> {
        let (w, cols) = (w.dequantize(), w.cols());
        x.chunks(cols)
            .flat_map(|xr| {
                w.chunks(cols).map(move |wr| {
                    wr.iter()
                        .zip(xr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>() as f32
                })
            })
            .collect()
    }

    /// 37 rows (32 on candle's kernels, 5 widened), 512 wide (two activation blocks): the
    /// product is the widened one but for the activations' 8-bit rounding, and exactly it
    /// (up to f32 sums) in the widened rows; for q8_0 and q4_0 weights.
    #[test]
    fn the_int8_product_is_the_widened_one_within_activation_rounding() {
        let (out, cols, rows) = (37, 512, 20);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let w = QuantMatrix::quantize(&lcg_values(out * cols, 1), out, cols, format).unwrap();
            let product = Int8Product::new(&w).unwrap();
            assert_eq!(product.is_some(), cpu_has_vnni());
            let Some(product) = product else { return };
            let x = lcg_values(rows * cols, 2);
            let mut y = vec![0.0f32; rows * out];
            product.forward(&x, &mut y).unwrap();
            let want = widened_product(&w, &x);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (got, want)) in y.iter().zip(&want).enumerate() {
                let tol = if i % out < 32 { 1e-2 } else { 1e-5 } * scale;
                assert!(
                    (got - want).abs() <= tol,
                    "{format:?} value {i}: {got} vs {want}"
                );
            }
        }
    }

    /// Widths that are not multiples of 256 and fewer than 16 rows stay with the widened
    /// product.
    #[test]
    fn other_matrices_are_left_to_the_widened_product() {
        for (format, out, cols) in [
            (QuantFormat::Q4_0, 32, 384),
            (QuantFormat::Q8_0, 32, 384),
            (QuantFormat::Q8_0, 15, 512),
        ] {
            let w = QuantMatrix::quantize(&lcg_values(out * cols, 3), out, cols, format).unwrap();
            assert!(
                Int8Product::new(&w).unwrap().is_none(),
                "{format:?} {out} x {cols}"
            );
        }
    }
}
