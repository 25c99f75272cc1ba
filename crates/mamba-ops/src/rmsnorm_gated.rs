//! Gated, grouped RMSNorm (Mamba-2's output norm, `mixer.norm`).
//!
//! ```text
//! x = x * silu(z)                       if z and not norm_before_gate
//! x_g = x_g / sqrt(mean(x_g^2) + eps)   for each group g of group_size features
//! x = x * weight
//! x = x * silu(z)                       if z and norm_before_gate
//! ```
//!
//! `x, z: (rows, hidden)` (any leading shape flattened), `weight: (hidden)`.

use crate::error::{OpError, Result};
use crate::math::{dot, silu, silu_fast, silu_grad_fast, with_simd};
use crate::parallel::{fold_in_blocks, sum_in_order};

/// Rows per block of the deterministic weight-gradient sum.
const ROWS_PER_BLOCK: usize = 16;
use crate::selective_scan::{narrow, split_optional_rows, split_rows};
use rayon::prelude::*;

/// Sizes and settings of one norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormDims {
    pub rows: usize,
    pub hidden: usize,
    /// Features per group; `hidden` means one group.
    pub group_size: usize,
    pub eps: f32,
    pub norm_before_gate: bool,
}

fn check(dims: &NormDims, x: &[f32], weight: &[f32], z: Option<&[f32]>) -> Result<()> {
    let err = |msg: String| {
        Err(OpError::Shape {
            op: "rmsnorm_gated",
            msg,
        })
    };
    if dims.group_size == 0 || !dims.hidden.is_multiple_of(dims.group_size) {
        return err(format!(
            "hidden {} is not a multiple of group_size {}",
            dims.hidden, dims.group_size
        ));
    }
    if x.len() != dims.rows * dims.hidden {
        return err(format!(
            "x has {} elements, expected {}",
            x.len(),
            dims.rows * dims.hidden
        ));
    }
    if weight.len() != dims.hidden {
        return err(format!(
            "weight has {} elements, expected {}",
            weight.len(),
            dims.hidden
        ));
    }
    if z.is_some_and(|z| z.len() != x.len()) {
        return err("z must have the shape of x".into());
    }
    Ok(())
}

/// The norm written like its definition, one value at a time.
pub fn rmsnorm_gated_reference(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check(dims, x, weight, z)?;
    let mut v: Vec<f32> = x.to_vec();
    if let (Some(z), false) = (z, dims.norm_before_gate) {
        v.iter_mut().zip(z).for_each(|(v, z)| *v *= silu(*z));
    }
    for group in v.chunks_mut(dims.group_size) {
        let mean_sq = group.iter().map(|a| a * a).sum::<f32>() / group.len() as f32;
        let inv = 1.0 / (mean_sq + dims.eps).sqrt();
        group.iter_mut().for_each(|a| *a *= inv);
    }
    for (i, a) in v.iter_mut().enumerate() {
        *a *= weight[i % dims.hidden];
        if let (Some(z), true) = (z, dims.norm_before_gate) {
            *a *= silu(z[i]);
        }
    }
    Ok(v)
}

/// The fast norm: rows in parallel, each row in one pass for the gate and sum of squares.
pub fn rmsnorm_gated(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let mut out = x.to_vec();
    rmsnorm_gated_in_place(dims, &mut out, weight, z)?;
    Ok(out)
}

/// [`rmsnorm_gated`] overwriting `x` with the result.
pub fn rmsnorm_gated_in_place(
    dims: &NormDims,
    x: &mut [f32],
    weight: &[f32],
    z: Option<&[f32]>,
) -> Result<()> {
    check(dims, x, weight, z)?;
    x.par_chunks_mut(dims.hidden)
        .enumerate()
        .with_min_len(16)
        .for_each(|(r, row)| {
            let z_row = z.map(|z| &z[r * dims.hidden..][..dims.hidden]);
            normalize_row(dims, row, weight, z_row);
        });
    Ok(())
}

/// [`rmsnorm_gated`] reading `x` and writing `out` (every value overwritten): each row is
/// copied and normalised by one thread while it sits in that core's cache, so the memory is
/// passed over once, by all the threads (a copy of the whole input first took one thread a
/// separate pass).
pub fn rmsnorm_gated_into(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check(dims, x, weight, z)?;
    if out.len() != x.len() {
        return Err(OpError::Shape {
            op: "rmsnorm_gated",
            msg: format!("out has {} elements, expected {}", out.len(), x.len()),
        });
    }
    out.par_chunks_mut(dims.hidden)
        .zip(x.par_chunks(dims.hidden))
        .enumerate()
        .with_min_len(16)
        .for_each(|(r, (row, x_row))| {
            row.copy_from_slice(x_row);
            let z_row = z.map(|z| &z[r * dims.hidden..][..dims.hidden]);
            normalize_row(dims, row, weight, z_row);
        });
    Ok(())
}

/// One row normalised in place, vectorised (the gate's silu in its polynomial form).
fn normalize_row(dims: &NormDims, row: &mut [f32], weight: &[f32], z: Option<&[f32]>) {
    with_simd(
        #[inline(always)]
        || {
            if let (Some(z), false) = (z, dims.norm_before_gate) {
                row.iter_mut().zip(z).for_each(|(v, z)| *v *= silu_fast(*z));
            }
            for (group, w) in row
                .chunks_mut(dims.group_size)
                .zip(weight.chunks(dims.group_size))
            {
                let inv = 1.0 / (dot(group, group) / group.len() as f32 + dims.eps).sqrt();
                group.iter_mut().zip(w).for_each(|(v, w)| *v *= inv * w);
            }
            if let (Some(z), true) = (z, dims.norm_before_gate) {
                row.iter_mut().zip(z).for_each(|(v, z)| *v *= silu_fast(*z));
            }
        },
    )
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

/// Gradients of a scalar loss with respect to the norm's inputs; `z` is `Some` exactly
/// when the gate was given.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGrads {
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub z: Option<Vec<f32>>,
}

fn check_backward(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
    grad_out: &[f32],
) -> Result<()> {
    check(dims, x, weight, z)?;
    if grad_out.len() != x.len() {
        return Err(OpError::Shape {
            op: "rmsnorm_gated_backward",
            msg: format!(
                "grad_out has {} elements, expected {}",
                grad_out.len(),
                x.len()
            ),
        });
    }
    Ok(())
}

/// The backward pass written like the equations, in f64, one group at a time.
///
/// With `v` the normalised group's input (`x * silu(z)` when gating first, else `x`),
/// `r = 1 / sqrt(mean(v^2) + eps)`, `n = v * r` and `m = n * weight`:
///
/// ```text
/// gating last:   g_m = g_out * silu(z),   g_z = g_out * m * silu'(z)      (else g_m = g_out)
/// g_weight += g_m * n,                    g_n = g_m * weight
/// g_v = r * (g_n - n * mean(g_n * n))     (over the group)
/// gating first:  g_x = g_v * silu(z),     g_z = g_v * x * silu'(z)        (else g_x = g_v)
/// ```
pub fn rmsnorm_gated_backward_reference(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
    grad_out: &[f32],
) -> Result<NormGrads> {
    use crate::math::f64_ref::{silu, silu_grad};
    check_backward(dims, x, weight, z, grad_out)?;
    let (hidden, size) = (dims.hidden, dims.group_size);
    let gate_first = !dims.norm_before_gate;
    let mut gx = vec![0.0f64; x.len()];
    let mut gz = vec![0.0f64; x.len()];
    let mut g_weight = vec![0.0f64; hidden];
    for start in (0..x.len()).step_by(size) {
        let idx = start..start + size;
        let f = |v: &[f32], i: usize| v[i] as f64;
        let v: Vec<f64> = idx
            .clone()
            .map(|i| match (z, gate_first) {
                (Some(z), true) => f(x, i) * silu(f(z, i)),
                _ => f(x, i),
            })
            .collect();
        let mean_sq = v.iter().map(|a| a * a).sum::<f64>() / size as f64;
        let r = 1.0 / (mean_sq + dims.eps as f64).sqrt();
        let n: Vec<f64> = v.iter().map(|a| a * r).collect();
        let mut g_n = vec![0.0f64; size];
        for (k, i) in idx.clone().enumerate() {
            let w = f(weight, i % hidden);
            let g_m = match (z, gate_first) {
                (Some(z), false) => {
                    gz[i] = f(grad_out, i) * n[k] * w * silu_grad(f(z, i));
                    f(grad_out, i) * silu(f(z, i))
                }
                _ => f(grad_out, i),
            };
            g_weight[i % hidden] += g_m * n[k];
            g_n[k] = g_m * w;
        }
        let mean_gn = g_n.iter().zip(&n).map(|(g, n)| g * n).sum::<f64>() / size as f64;
        for (k, i) in idx.enumerate() {
            let g_v = r * (g_n[k] - n[k] * mean_gn);
            gx[i] = match (z, gate_first) {
                (Some(z), true) => {
                    gz[i] = g_v * f(x, i) * silu_grad(f(z, i));
                    g_v * silu(f(z, i))
                }
                _ => g_v,
            };
        }
    }
    Ok(NormGrads {
        x: narrow(&gx),
        weight: narrow(&g_weight),
        z: z.map(|_| narrow(&gz)),
    })
}

/// The fast backward pass: rows in parallel, each group in a few vectorised passes; the
/// `weight` gradient is summed over fixed blocks of rows, then over blocks in order.
pub fn rmsnorm_gated_backward(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
    grad_out: &[f32],
) -> Result<NormGrads> {
    check_backward(dims, x, weight, z, grad_out)?;
    let hidden = dims.hidden;
    let mut gx = vec![0.0; x.len()];
    let mut gz = z.map(|_| vec![0.0; x.len()]);
    let mut rows: Vec<_> = split_rows(&mut gx, dims.rows, hidden)
        .into_iter()
        .zip(split_optional_rows(gz.as_deref_mut(), dims.rows, hidden))
        .enumerate()
        .collect();
    let partial_weight_grads = fold_in_blocks(
        &mut rows,
        ROWS_PER_BLOCK,
        || (vec![0.0; hidden], vec![0.0; hidden]),
        |(mut g_weight, mut v), (r, (gx_row, gz_row))| {
            let at = *r * hidden;
            let row = NormRow {
                x: &x[at..at + hidden],
                z: z.map(|z| &z[at..at + hidden]),
                grad_out: &grad_out[at..at + hidden],
            };
            with_simd(
                #[inline(always)]
                || {
                    row_backward(
                        dims,
                        &row,
                        weight,
                        gx_row,
                        gz_row.as_deref_mut(),
                        &mut g_weight,
                        &mut v,
                    )
                },
            );
            (g_weight, v)
        },
    );
    let g_weight = sum_in_order(
        partial_weight_grads.into_iter().map(|(g, _)| g).collect(),
        hidden,
    );
    drop(rows);
    Ok(NormGrads {
        x: gx,
        weight: g_weight,
        z: gz,
    })
}

/// One row's inputs, `(hidden)` each.
struct NormRow<'a> {
    x: &'a [f32],
    z: Option<&'a [f32]>,
    grad_out: &'a [f32],
}

/// One row's backward (equations at [`rmsnorm_gated_backward_reference`]): writes `gx`
/// (and `gz`), adds to `g_weight`; `v` is work space for the normalised values.
#[inline(always)]
fn row_backward(
    dims: &NormDims,
    row: &NormRow,
    weight: &[f32],
    gx: &mut [f32],
    gz: Option<&mut [f32]>,
    g_weight: &mut [f32],
    v: &mut [f32],
) {
    let gate_first = !dims.norm_before_gate;
    match (row.z, gate_first) {
        (Some(z), true) => v
            .iter_mut()
            .zip(row.x.iter().zip(z))
            .for_each(|(v, (x, z))| *v = x * silu_fast(*z)),
        _ => v.copy_from_slice(row.x),
    }
    // gx = g_m.
    match (row.z, gate_first) {
        (Some(z), false) => gx
            .iter_mut()
            .zip(row.grad_out.iter().zip(z))
            .for_each(|(g, (g_out, z))| *g = g_out * silu_fast(*z)),
        _ => gx.copy_from_slice(row.grad_out),
    }
    let size = dims.group_size;
    for (((v, gx), w), g_weight) in v
        .chunks_mut(size)
        .zip(gx.chunks_mut(size))
        .zip(weight.chunks(size))
        .zip(g_weight.chunks_mut(size))
    {
        let r = 1.0 / (dot(v, v) / size as f32 + dims.eps).sqrt();
        v.iter_mut().for_each(|v| *v *= r);
        for (((g, gw), w), n) in gx.iter_mut().zip(g_weight.iter_mut()).zip(w).zip(v.iter()) {
            *gw = g.mul_add(*n, *gw);
            *g *= w;
        }
        let mean_gn = dot(gx, v) / size as f32;
        gx.iter_mut()
            .zip(v.iter())
            .for_each(|(g, n)| *g = r * n.mul_add(-mean_gn, *g));
    }
    // Now v = n and gx = g_v.
    match (row.z, gz, gate_first) {
        (Some(z), Some(gz), true) => {
            for ((g, gz), (x, z)) in gx.iter_mut().zip(gz).zip(row.x.iter().zip(z)) {
                *gz = *g * x * silu_grad_fast(*z);
                *g *= silu_fast(*z);
            }
        }
        (Some(z), Some(gz), false) => {
            for ((gz, n), ((g_out, w), z)) in gz
                .iter_mut()
                .zip(v.iter())
                .zip(row.grad_out.iter().zip(weight).zip(z))
            {
                *gz = g_out * n * w * silu_grad_fast(*z);
            }
        }
        _ => {}
    }
}
