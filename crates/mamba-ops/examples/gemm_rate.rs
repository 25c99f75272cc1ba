//! The f32 GEMM rate that prefill is compared with: `matmul_threaded` (the gemm crate, as
//! candle uses it) on a square 2048 product and on the 130m models' projections over 512
//! tokens (the rows of one piece of a host forward pass), best of several rounds.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mamba-ops --example gemm_rate`

use mamba_ops::gemm::{matmul_threaded, MatRef};
use std::time::Instant;

const ROUNDS: usize = 5;

/// `(name, m, n, k)`: `y (m x n) = x (m x k) W^T` with `W: (n, k)`, as a projection runs.
const SHAPES: [(&str, usize, usize, usize); 4] = [
    ("square 2048", 2048, 2048, 2048),
    ("mamba2-130m in_proj, 512 tokens", 512, 3352, 768),
    ("mamba-130m in_proj, 512 tokens", 512, 3072, 768),
    ("130m out_proj, 512 tokens", 512, 768, 1536),
];

fn main() {
    for (name, m, n, k) in SHAPES {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0.0f32; m * n];
        let best = (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                let (lhs, rhs) = (MatRef::rows(&x, k), MatRef::transposed(&w, k));
                matmul_threaded((m, n, k), &mut y, n, lhs, rhs, false);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let expected: f32 = (0..k).map(|j| x[j] * w[j]).sum();
        assert!((y[0] - expected).abs() <= 1e-3 * expected.abs().max(1.0));
        println!(
            "{name}: {:.1} GFLOP/s ({} threads, best of {ROUNDS})",
            2.0 * (m * n * k) as f64 / best / 1e9,
            rayon::current_num_threads()
        );
    }
}
