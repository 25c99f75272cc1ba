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
use crate::math::{dot, silu};
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
    check(dims, x, weight, z)?;
    let mut out = x.to_vec();
    out.par_chunks_mut(dims.hidden)
        .enumerate()
        .with_min_len(16)
        .for_each(|(r, row)| {
            let z_row = z.map(|z| &z[r * dims.hidden..][..dims.hidden]);
            normalize_row(dims, row, weight, z_row);
        });
    Ok(out)
}

fn normalize_row(dims: &NormDims, row: &mut [f32], weight: &[f32], z: Option<&[f32]>) {
    if let (Some(z), false) = (z, dims.norm_before_gate) {
        row.iter_mut().zip(z).for_each(|(v, z)| *v *= silu(*z));
    }
    for (group, w) in row
        .chunks_mut(dims.group_size)
        .zip(weight.chunks(dims.group_size))
    {
        let inv = 1.0 / (dot(group, group) / group.len() as f32 + dims.eps).sqrt();
        group.iter_mut().zip(w).for_each(|(v, w)| *v *= inv * w);
    }
    if let (Some(z), true) = (z, dims.norm_before_gate) {
        row.iter_mut().zip(z).for_each(|(v, z)| *v *= silu(*z));
    }
}
