//! Rearrangements between the layouts the ops and the models use.

/// Swaps the two inner axes of a `(batch, rows, cols)` array, giving `(batch, cols, rows)`:
/// token-major `(b, L, d)` to channel-major `(b, d, L)` and back.
pub fn swap_inner(v: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    if rows * cols == 0 {
        return out;
    }
    for (src, dst) in v
        .chunks(rows * cols)
        .zip(out.chunks_mut(rows * cols))
        .take(batch)
    {
        transpose_into(src, rows, cols, dst);
    }
    out
}

/// `dst (cols, rows) = src (rows, cols)^T`, both row-major and contiguous: 16 x 16 blocks
/// through AVX-512 shuffles where the CPU has it, the rest (and other CPUs) one value at a
/// time.
///
/// # Panics
/// If `src` or `dst` holds fewer than `rows * cols` values (a bug in the caller).
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose_into: a slice is shorter than {rows} x {cols}"
    );
    let (mut whole_rows, mut whole_cols) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        (whole_rows, whole_cols) = (rows / 16 * 16, cols / 16 * 16);
        for r in (0..whole_rows).step_by(16) {
            for c in (0..whole_cols).step_by(16) {
                // SAFETY: avx512f was detected; the block's 16 rows of 16 values lie inside
                // src (r + 15 < rows, c + 15 < cols) and its 16 columns inside dst.
                unsafe {
                    transpose_16x16_avx512(
                        src.as_ptr().add(r * cols + c),
                        cols,
                        dst.as_mut_ptr().add(c * rows + r),
                        rows,
                    )
                };
            }
        }
    }
    for r in 0..rows {
        let first_col = if r < whole_rows { whole_cols } else { 0 };
        for c in first_col..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// One 16 x 16 block of [`transpose_into`]: row i read at `src + i * src_stride`, row j
/// written at `dst + j * dst_stride`, `dst[j][i] = src[i][j]`. Pairs of rows interleave as
/// 32-bit values, then as 64-bit pairs (each 128-bit lane then holds four rows of one column),
/// then 128-bit lanes gather across groups of four rows twice.
///
/// # Safety
/// avx512f; `src` readable and `dst` writable for 16 rows of 16 values at their strides.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16_avx512(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut row = [_mm512_setzero_ps(); 16];
    for (i, r) in row.iter_mut().enumerate() {
        // SAFETY: the caller's contract (row i of the block).
        *r = unsafe { _mm512_loadu_ps(src.add(i * src_stride)) };
    }
    // pairs[2p] / pairs[2p + 1]: rows 2p and 2p + 1 interleaved, the low / high halves of
    // each lane.
    let mut pairs = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        pairs[2 * p] = _mm512_unpacklo_ps(row[2 * p], row[2 * p + 1]);
        pairs[2 * p + 1] = _mm512_unpackhi_ps(row[2 * p], row[2 * p + 1]);
    }
    // quads[4g + j]: in lane l, rows 4g..4g + 4 of column 4l + j.
    let mut quads = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        for half in 0..2 {
            let a = _mm512_castps_pd(pairs[4 * g + half]);
            let b = _mm512_castps_pd(pairs[4 * g + half + 2]);
            quads[4 * g + 2 * half] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            quads[4 * g + 2 * half + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    // halves[8h + c] (c < 4: lanes 0 and 2, else 1 and 3): rows 8h..8h + 4 of columns c and
    // c + 8, then rows 8h + 4..8h + 8 of the same.
    let mut halves = [_mm512_setzero_ps(); 16];
    for h in 0..2 {
        for j in 0..4 {
            let (a, b) = (quads[8 * h + j], quads[8 * h + 4 + j]);
            halves[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            halves[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for c in 0..8 {
        let (a, b) = (halves[c], halves[8 + c]);
        // SAFETY: the caller's contract (columns c and c + 8 of the block).
        unsafe {
            _mm512_storeu_ps(dst.add(c * dst_stride), _mm512_shuffle_f32x4::<0x88>(a, b));
            _mm512_storeu_ps(
                dst.add((c + 8) * dst_stride),
                _mm512_shuffle_f32x4::<0xdd>(a, b),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_testing::lcg_values;

    /// The blocked transpose moves every value where the plain one does, for shapes with and
    /// without edges past whole 16 x 16 blocks (and none at all).
    #[test]
    fn transpose_into_equals_the_plain_transpose() {
        for (rows, cols) in [
            (16, 16),
            (32, 48),
            (37, 50),
            (5, 70),
            (70, 5),
            (64, 768),
            (1, 1),
        ] {
            let v = lcg_values(rows * cols, (rows * 1000 + cols) as u64);
            let mut got = vec![f32::NAN; rows * cols];
            transpose_into(&v, rows, cols, &mut got);
            let mut want = vec![0.0; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    want[c * rows + r] = v[r * cols + c];
                }
            }
            assert_eq!(got, want, "{rows} x {cols}");
        }
    }
}
