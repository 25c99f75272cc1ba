//! Memory bandwidth as STREAM's triad measures it (`a[i] = b[i] + s * c[i]` over three
//! 256 MiB f32 arrays, threaded with rayon), the roofline the decoding kernels are compared
//! with: decoding reads every weight once per token.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mamba-ops --example triad`

use rayon::prelude::*;
use std::time::Instant;

const LEN: usize = 64 << 20;
const ROUNDS: usize = 5;

fn main() {
    let (mut a, b, c) = (vec![0.0f32; LEN], vec![1.0f32; LEN], vec![2.0f32; LEN]);
    let chunk = LEN / (4 * rayon::current_num_threads());
    let best = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            a.par_chunks_mut(chunk)
                .zip(b.par_chunks(chunk))
                .zip(c.par_chunks(chunk))
                .for_each(|((a, b), c)| {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 1.5 * c;
                    }
                });
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    assert!(a.iter().all(|v| *v == 4.0), "triad computed a wrong value");
    // Two arrays read and one written per element, as STREAM counts it.
    let bytes = 3.0 * (LEN * std::mem::size_of::<f32>()) as f64;
    println!(
        "triad: {:.1} GB/s ({} threads, best of {ROUNDS})",
        bytes / best / 1e9,
        rayon::current_num_threads()
    );
}
