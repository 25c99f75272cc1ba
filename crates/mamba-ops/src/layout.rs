//! Rearrangements between the layouts the ops and the models use.

/// Swaps the two inner axes of a `(batch, rows, cols)` array, giving `(batch, cols, rows)`:
/// token-major `(b, L, d)` to channel-major `(b, d, L)` and back.
pub fn swap_inner(v: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for (src, dst) in v
        .chunks(rows * cols)
        .zip(out.chunks_mut(rows * cols))
        .take(batch)
    {
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    out
}
