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

/// Columns `[first, first + width)` of every row of a row-major matrix, for one thread to
/// write while other threads write the matrix's other bands (see [`column_bands`]).
pub struct ColumnBand<'a> {
    base: *mut f32,
    rows: usize,
    row_len: usize,
    first: usize,
    width: usize,
    _matrix: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a band only reaches its own columns, which no other band of the same matrix covers
// (see `column_bands`), so moving it to another thread shares no values.
unsafe impl Send for ColumnBand<'_> {}

impl ColumnBand<'_> {
    /// The band's `width` values of row `row`.
    ///
    /// # Panics
    /// If `row` is past the matrix's last row.
    pub fn row(&mut self, row: usize) -> &mut [f32] {
        assert!(row < self.rows, "row {row} of a {}-row band", self.rows);
        // SAFETY: the values lie inside the matrix (row < rows, first + width <= row_len),
        // which the band borrows mutably; no other band covers these columns, and `&mut self`
        // keeps this band from handing out the same values twice.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add(row * self.row_len + self.first),
                self.width,
            )
        }
    }
}

/// Cuts a row-major `matrix` with rows of `row_len` values into side-by-side bands of columns,
/// `widths` wide from the left, each of which a different thread may write.
///
/// # Panics
/// If the widths add up to more than `row_len`, or `matrix` is not whole rows.
pub fn column_bands(
    matrix: &mut [f32],
    row_len: usize,
    widths: impl IntoIterator<Item = usize>,
) -> Vec<ColumnBand<'_>> {
    assert!(
        row_len > 0 && matrix.len().is_multiple_of(row_len),
        "column_bands: {} values are not rows of {row_len}",
        matrix.len()
    );
    let rows = matrix.len() / row_len;
    let base = matrix.as_mut_ptr();
    let mut first = 0;
    widths
        .into_iter()
        .map(|width| {
            assert!(
                first + width <= row_len,
                "column_bands: bands wider than a row"
            );
            let band = ColumnBand {
                base,
                rows,
                row_len,
                first,
                width,
                _matrix: std::marker::PhantomData,
            };
            first += width;
            band
        })
        .collect()
}

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
    fn column_bands_cover_their_own_columns_of_every_row() {
        let (rows, row_len) = (5, 10);
        let mut matrix = vec![-1.0f32; rows * row_len];
        let bands = super::column_bands(&mut matrix, row_len, [3, 0, 4, 2]);
        rayon::scope(|s| {
            for (i, mut band) in bands.into_iter().enumerate() {
                s.spawn(move |_| {
                    for r in 0..rows {
                        band.row(r).iter_mut().for_each(|v| *v = i as f32);
                    }
                });
            }
        });
        let want: Vec<f32> = [0.0; 3]
            .into_iter()
            .chain([2.0; 4])
            .chain([3.0; 2])
            .chain([-1.0])
            .collect();
        for row in matrix.chunks(row_len) {
            assert_eq!(row, &want[..]);
        }
    }

    #[test]
    #[should_panic(expected = "bands wider than a row")]
    fn column_bands_wider_than_the_rows_are_refused() {
        let mut matrix = vec![0.0f32; 12];
        super::column_bands(&mut matrix, 4, [3, 2]);
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
