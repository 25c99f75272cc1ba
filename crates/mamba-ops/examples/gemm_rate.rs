//! The GEMM rates that prefill is compared with: `matmul_threaded` (the gemm crate, as candle
//! uses it; f32), `matmul_nt_threaded` (the gemm crate on transposed blocks of the weights, as
//! the projections run it; f32) and `matmul_bf16_nt` (bf16 operands, f32 sums; on CPUs with
//! AVX-512 BF16) on a square 2048 product and on the 130m models' projections over 512 tokens
//! (the narrow ones too, which thread differently) and over 2048 tokens (the longest piece of
//! a host forward pass), best of several rounds.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mamba-ops --example gemm_rate`

use half::bf16;
use mamba_ops::gemm::{
    bf16_dot_supported, matmul_bf16_nt, matmul_nt_threaded, matmul_threaded, MatRef,
};
use std::time::Instant;

const ROUNDS: usize = 5;

/// `(name, m, n, k)`: `y (m x n) = x (m x k) W^T` with `W: (n, k)`, as a projection runs.
const SHAPES: [(&str, usize, usize, usize); 8] = [
    ("square 2048", 2048, 2048, 2048),
    ("mamba2-130m in_proj, 512 tokens", 512, 3352, 768),
    ("mamba-130m in_proj, 512 tokens", 512, 3072, 768),
    // A prefill piece of 2048 tokens, as the host forward cuts them now: Mamba-1's in_proj
    // runs as two products of 1536 columns (x and z, each into its own buffer).
    ("mamba-130m in_proj's x half, 2048 tokens", 2048, 1536, 768),
    ("130m out_proj, 2048 tokens", 2048, 768, 1536),
    ("130m out_proj, 512 tokens", 512, 768, 1536),
    ("mamba-130m x_proj, 512 tokens", 512, 80, 1536),
    ("mamba2-130m in_proj's dt rows, 512 tokens", 512, 24, 768),
];

/// The best of [`ROUNDS`] timings of `product`, in GFLOP/s for an `m x n x k` product.
fn best_rate((m, n, k): (usize, usize, usize), mut product: impl FnMut()) -> f64 {
    let best = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            product();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// Fails loudly if `y[0]` is not the first row of `x` dotted with the first row of `w`.
fn check_first(y: &[f32], x: &[f32], w: &[f32], k: usize) {
    let expected: f32 = (0..k).map(|j| x[j] * w[j]).sum();
    assert!((y[0] - expected).abs() <= 1e-3 * expected.abs().max(1.0));
}

fn main() {
    let threads = rayon::current_num_threads();
    for (name, m, n, k) in SHAPES {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.125).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.125).collect();
        let mut y = vec![0.0f32; m * n];
        let f32_rate = best_rate((m, n, k), || {
            let (lhs, rhs) = (MatRef::rows(&x, k), MatRef::transposed(&w, k));
            matmul_threaded((m, n, k), &mut y, n, lhs, rhs, false);
        });
        check_first(&y, &x, &w, k);
        let blocks_rate = best_rate((m, n, k), || {
            matmul_nt_threaded((m, n, k), &mut y, n, &x, &w);
        });
        check_first(&y, &x, &w, k);
        print!("{name}: f32 {f32_rate:.1} GFLOP/s, f32 blocks {blocks_rate:.1} GFLOP/s");
        if bf16_dot_supported() {
            let (xb, wb): (Vec<bf16>, Vec<bf16>) = (
                x.iter().map(|&v| bf16::from_f32(v)).collect(),
                w.iter().map(|&v| bf16::from_f32(v)).collect(),
            );
            let bf16_rate = best_rate((m, n, k), || {
                matmul_bf16_nt((m, n, k), &mut y, n, &xb, &wb);
            });
            check_first(&y, &x, &w, k);
            print!(", bf16 {bf16_rate:.1} GFLOP/s");
        }
        println!(" ({threads} threads, best of {ROUNDS})");
    }
}
