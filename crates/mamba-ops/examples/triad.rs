//! Memory bandwidth as STREAM's triad measures it (`a[i] = b[i] + s * c[i]` over three
//! 256 MiB f32 arrays, threaded with rayon), the roofline the decoding kernels are compared
//! with: decoding reads every weight once per token. Then the read-only bandwidth of the same
//! machine (a sum over one 256 MiB array in eight lanes), the stream a decoding step comes
//! closest to; on x86 also the same sum asking for its lines 2 KiB ahead into the L2 cache, as
//! the decoding kernels do (on the Intel Xeon host of the thirty-eighth session one core's
//! plain read pass waits on memory latency, and decoding streamed faster than it).
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
    #[cfg(target_arch = "x86_64")]
    {
        let read_ahead = best_seconds(|| {
            total = c.par_chunks(chunk).map(sum_reading_ahead).sum::<f32>();
        });
        assert_eq!(
            total,
            2.0 * LEN as f32,
            "the read-ahead pass summed a wrong value"
        );
        println!(
            "read ahead: {:.1} GB/s ({threads} threads, best of {ROUNDS})",
            array_bytes / read_ahead / 1e9
        );
    }
}

/// Bytes ahead of its loads that [`sum_reading_ahead`] asks for into the L2 cache.
#[cfg(target_arch = "x86_64")]
const AHEAD_BYTES: usize = 2048;

/// The sum of `v` in eight lanes, a kibibyte at a time, asking for the lines
/// [`AHEAD_BYTES`] ahead of each kibibyte into the L2 cache (`prefetcht1`).
#[cfg(target_arch = "x86_64")]
fn sum_reading_ahead(v: &[f32]) -> f32 {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    const BLOCK: usize = 256; // f32 values: 1 KiB, sixteen cache lines
    with_simd(
        #[inline(always)]
        || {
            v.chunks(BLOCK)
                .map(|block| {
                    let at = block.as_ptr() as *const i8;
                    for line in (0..BLOCK * 4).step_by(64) {
                        // SAFETY: a prefetch only hints the cache; it never faults, even past
                        // the end of `v`.
                        unsafe { _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(AHEAD_BYTES + line)) };
                    }
                    lane_sum(block)
                })
                .sum::<f32>()
        },
    )
}
