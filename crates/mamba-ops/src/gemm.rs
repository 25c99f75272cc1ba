//! A safe, bounds-checked front for the `gemm` crate's strided f32 matrix product.

/// A strided read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `row_stride` elements between rows.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        MatRef {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix stored with `row_stride` between rows.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst (m x n, row-major with dst_row_stride) (+)= lhs (m x k) * rhs (k x n)`, single-threaded
/// (callers parallelise over independent products). With `accumulate` the product is
/// added to `dst`, otherwise it overwrites it.
///
/// # Panics
/// If a view is too short for the given sizes (a bug in the caller, never bad user input).
pub fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
) {
    matmul_with(
        mnk,
        dst,
        dst_row_stride,
        lhs,
        rhs,
        accumulate,
        gemm::Parallelism::None,
    )
}

/// [`matmul`] spread over the threads of rayon's pool, for one large product.
pub fn matmul_threaded(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
) {
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    matmul_with(mnk, dst, dst_row_stride, lhs, rhs, accumulate, threads)
}

fn matmul_with(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let dst_view = MatRef::rows(dst, dst_row_stride);
    assert!(dst_view.covers(m, n), "matmul: destination too short");
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "matmul: operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above guarantee every (row, col) index the product touches lies
    // inside the slices; `dst` is borrowed mutably, so it does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
