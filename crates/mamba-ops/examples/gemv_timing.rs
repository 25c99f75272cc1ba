//! Times the decoding matrix-vector kernels of `mamba_ops::gemv` on the weight shapes of
//! mamba-130m (in_proj, out_proj, the tied output head), for every weight format, and
//! prints the weight bytes read per second.
//!
//! `cargo run --release -p mamba-ops --example gemv_timing` (set `RAYON_NUM_THREADS`).

use half::bf16;
use mamba_ops::gemv::{gemv, Weights};
use mamba_ops::quant::{QuantFormat, QuantMatrix};
use std::time::Instant;

/// Seconds per call, the best of five rounds of `reps` calls after a warm-up.
fn seconds_per_call(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let start = Instant::now();
            (0..reps).for_each(|_| f());
            start.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Deterministic values in [-1, 1).
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(2654435761) % 2001) as f32 - 1000.0) / 1000.0)
        .collect()
}

fn main() {
    // Inside the pool, as the model's decoding step runs.
    rayon::scope(|_| run());
}

fn run() {
    println!("threads {}", rayon::current_num_threads());
    println!(
        "{:>12} {:>6} {:>10} {:>10}",
        "shape", "format", "us/call", "GB/s"
    );
    for (rows, cols, name) in [
        (256, 768, "in-cache"),
        (3072, 768, "in_proj"),
        (768, 1536, "out_proj"),
        (50280, 768, "lm_head"),
    ] {
        let w = values(rows * cols);
        let x = values(cols);
        let mut y = vec![0.0f32; rows];
        let reps = (200_000_000 / (rows * cols)).max(3);
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let q8 = QuantMatrix::quantize(&w, rows, cols, QuantFormat::Q8_0).expect("q8_0");
        let q4 = QuantMatrix::quantize(&w, rows, cols, QuantFormat::Q4_0).expect("q4_0");
        let formats: [(&str, Weights, usize); 4] = [
            ("f32", Weights::F32(&w), rows * cols * 4),
            ("bf16", Weights::Bf16(&wb), rows * cols * 2),
            ("q8_0", Weights::Quant(&q8), q8.size_in_bytes()),
            ("q4_0", Weights::Quant(&q4), q4.size_in_bytes()),
        ];
        for (format, weights, bytes) in formats {
            let s = seconds_per_call(reps, || {
                gemv(weights, rows, cols, &x, &mut y).expect("shapes match")
            });
            println!(
                "{:>12} {:>6} {:>10.1} {:>10.1}",
                name,
                format,
                s * 1e6,
                bytes as f64 / s / 1e9
            );
        }
    }
}
