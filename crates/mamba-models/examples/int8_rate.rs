//! The rate of candle's quantised matrix product (`QMatMul`, q8_0 and q4_0 weights) against
//! the f32 one, at prefill sizes: 512 rows of activations times a 130m model's projections
//! (3352 x 768 does not take candle's AVX-512 VNNI path: its rows do not come in sixteens;
//! 768 x 1536 does). What `mamba_models::int8_product` rests on.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mamba-models --example int8_rate`

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

/// Timed calls per measurement.
const REPS: usize = 5;

/// GFLOP/s of `run` for a product of `flops`, the better of two measurements.
fn rate(flops: f64, run: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..2 {
        let start = Instant::now();
        for _ in 0..REPS {
            run()?;
        }
        let seconds = start.elapsed().as_secs_f64() / REPS as f64;
        best = best.max(flops / seconds / 1e9);
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    let rows = 512;
    for (out, cols) in [(3352usize, 768usize), (768, 1536)] {
        let w = Tensor::randn(0f32, 0.02, (out, cols), &device)?;
        let x = Tensor::randn(0f32, 1.0, (rows, cols), &device)?;
        let flops = 2.0 * (out * cols * rows) as f64;
        let wt = w.t()?;
        let f32_rate = rate(flops, || x.matmul(&wt))?;
        print!("{out} x {cols}, {rows} rows: f32 {f32_rate:.1} GFLOP/s");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            print!(", {dtype:?} {:.1}", rate(flops, || q.forward(&x))?);
        }
        println!();
    }
    Ok(())
}
