//! Memory bandwidth as STREAM's triad measures it (`a[i] = b[i] + s * c[i]` over three
//! 256 MiB f32 arrays, threaded with rayon), the roofline the decoding kernels are compared
//! with: decoding reads every weight once per token. Then the read-only bandwidth of the same
//! machine (a sum over one 256 MiB array in eight lanes), the stream a decoding step comes
//! closest to.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p mamba-ops --example triad`

use mamba_ops::math::{lane_sum, with_simd};
use rayon::prelude::*;
use std::time::Instant;

const LEN: usize = 64 << 20;
const ROUNDS: usize = 5;

/// The best of [`ROUNDS`] timings of `pass`, in seconds.
fn best_seconds(mut pass: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            pass();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let (mut a, b, c) = (vec![0.0f32; LEN], vec![1.0f32; LEN], vec![2.0f32; LEN]);
    let threads = rayon::current_num_threads();
    let chunk = LEN / (4 * threads);
    let triad = best_seconds(|| {
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk))
            .zip(c.par_chunks(chunk))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 1.5 * c;
                }
            });
    });
    assert!(a.iter().all(|v| *v == 4.0), "triad computed a wrong value");
    // Two arrays read and one written per element, as STREAM counts it.
    let array_bytes = (LEN * std::mem::size_of::<f32>()) as f64;
    println!(
        "triad: {:.1} GB/s ({threads} threads, best of {ROUNDS})",
        3.0 * array_bytes / triad / 1e9
    );
    let mut total = 0.0;
    let read = best_seconds(|| {
        total = c
            .par_chunks(chunk)
            .map(|v| {
                with_simd(
                    #[inline(always)]
                    || lane_sum(v),
                )
            })
            .sum::<f32>()
    });
    // Every partial sum is an exact integer in f32: a lane adds at most 2^21 twos.
    assert_eq!(
        total,
        2.0 * LEN as f32,
        "the read pass summed a wrong value"
    );
    println!(
        "read: {:.1} GB/s ({threads} threads, best of {ROUNDS})",
        array_bytes / read / 1e9
    );
}
