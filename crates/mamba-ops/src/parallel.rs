//! Parallel sums whose result does not depend on the number of threads or on how rayon
//! splits the work, so that training is bit-for-bit repeatable (a resumed run lands exactly
//! where an uninterrupted one does).

use rayon::prelude::*;

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
