//! Parallel sums whose result does not depend on the number of threads or on how rayon
//! splits the work, so that training is bit-for-bit repeatable (a resumed run lands exactly
//! where an uninterrupted one does); and [`for_each_claimed_chunk`], a parallel loop whose
//! threads share the work as it goes.

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Folds `items` in fixed blocks of `block`, each block in order from `init()`, and
/// returns the block results in order. Summing those in order gives the same floats on
/// any number of threads, unlike rayon's `fold`, whose groups follow work stealing.
pub fn fold_in_blocks<T, A>(
    items: &mut [T],
    block: usize,
    init: impl Fn() -> A + Sync + Send,
    fold: impl Fn(A, &mut T) -> A + Sync + Send,
) -> Vec<A>
where
    T: Send,
    A: Send,
{
    items
        .par_chunks_mut(block.max(1))
        .map(|chunk| chunk.iter_mut().fold(init(), &fold))
        .collect()
}

/// `a += b`, element by element.
pub fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

/// The element-wise sum of equally long vectors, added in order.
pub fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    parts.into_iter().fold(vec![0.0; len], |mut total, part| {
        add_into(&mut total, &part);
        total
    })
}

/// Runs `run(start, chunk)` over `values` cut into chunks of `chunk` values (the last may be
/// shorter), `start` being the chunk's first index: every thread of the current rayon pool
/// takes the next unclaimed chunk, in order, until none is left. A thread that starts late or
/// runs slower simply takes fewer chunks, so the threads finish within one chunk of each
/// other; rayon's split into a fixed number of tasks can leave one thread a whole task to run
/// alone at the end.
pub fn for_each_claimed_chunk<T: Send>(
    values: &mut [T],
    chunk: usize,
    run: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = values.len();
    let count = len.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    let base = SharedSlice(values.as_mut_ptr());
    let base = &base;
    let claim_until_done = |_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            break;
        }
        let start = i * chunk;
        let end = len.min(start + chunk);
        // SAFETY: each index `i` is handed out once, so no two chunks overlap; every chunk
        // lies inside `values`, which this call borrows mutably until all of them are done.
        let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        run(start, part);
    };
    let threads = rayon::current_num_threads().min(count);
    (0..threads).into_par_iter().for_each(claim_until_done);
}

/// The start of a slice whose disjoint chunks [`for_each_claimed_chunk`] hands to several
/// threads.
struct SharedSlice<T>(*mut T);

// SAFETY: the pointer is only used to make disjoint chunks, each by one thread at a time
// (see `for_each_claimed_chunk`), of values that may move between threads (`T: Send`).
unsafe impl<T: Send> Sync for SharedSlice<T> {}

#[cfg(test)]
mod tests {
    use super::for_each_claimed_chunk;

    #[test]
    fn claimed_chunks_cover_every_value_once_with_its_index() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 16), (1000, 7)] {
                let mut values = vec![0usize; len];
                pool.install(|| {
                    for_each_claimed_chunk(&mut values, chunk, |start, part| {
                        assert!(part.len() <= chunk);
                        for (i, v) in part.iter_mut().enumerate() {
                            *v += start + i + 1;
                        }
                    })
                });
                let want: Vec<usize> = (1..=len).collect();
                assert_eq!(
                    values, want,
                    "{threads} threads, {len} values in chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn every_thread_can_claim_chunks() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool");
        let mut owners = vec![usize::MAX; 64];
        pool.install(|| {
            for_each_claimed_chunk(&mut owners, 1, |_, part| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                part[0] = rayon::current_thread_index().expect("a worker");
            })
        });
        let mut seen = owners.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1], "chunks taken by {owners:?}");
    }
}
