//! The Mamba-2 SSD as differentiable tensor operations: the chunked algorithm of the Mamba-2
//! paper (its "minimal SSD" listing) written with candle's batched matrix products, so that
//! candle's autograd gives its backward on any device. On a GPU the products run as cuBLAS
//! batched GEMMs; this is the SSD's backward there where the CUDA backward kernels' chunk does
//! not fit the device's shared memory ([`crate::tensor::ssd`] recomputes the forward this way
//! and differentiates it), in place of copying to the host for the CPU backward kernel.
//!
//! With dt' the processed step, per chunk of Q steps and head h (cum = running sum of dt' A
//! inside the chunk):
//!
//! ```text
//! y_diag[i]  = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt'_j x_j        (Q x Q products)
//! state(c)   = sum_j exp(cum_last - cum_j) dt'_j outer(x_j, B_j)           (the chunk's own)
//! S_in(c)    = sum_{k<=c} exp(sum of cum_last over chunks k..c-1) state'(k)  (state' = [S_0, state])
//! y_off[i]   = exp(cum_i) C_i . S_in(c)
//! y          = (y_diag + y_off + D x) * silu(z)
//! ```
//!
//! Layouts as in [`crate::ssd`]: x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H);
//! D: (H) or (H, P); B, C: (batch, L, G, N); initial state, final state: (batch, H, P, N).

use crate::math::NO_DT_LIMIT;
use crate::tensor::SsdOptions;
use candle_core::{DType, Result, Tensor, D};

/// What [`crate::tensor::ssd`] computes, `y: (batch, L, H, P)` and the final state
/// `(batch, H, P, N)` from f32 `x, dt, a, b, c` and the same options, in chunks of
/// `opts.chunk_size` steps, through differentiable tensor operations.
pub fn ssd_chunked(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: &SsdOptions,
) -> Result<(Tensor, Tensor)> {
    let (batch, len, heads, head_dim) = x.dims4()?;
    let state = b.dim(3)?;
    let chunk = opts.chunk_size;
    let chunks = len.div_ceil(chunk);
    let padded = chunks * chunk;
    let dtp = pad_steps(&processed_dt(dt, opts)?, padded)?; // (b, Lp, H)
    let xp = pad_steps(x, padded)?; // (b, Lp, H, P)
    let (b, c) = (
        pad_steps(&per_head(b, heads)?, padded)?, // (b, Lp, H, N)
        pad_steps(&per_head(c, heads)?, padded)?,
    );
    // Chunk-major, head before step: (b, chunks, H, Q, ...).
    let by_chunk = |t: &Tensor, width: usize| -> Result<Tensor> {
        t.reshape((batch, chunks, chunk, heads, width))?
            .permute((0, 1, 3, 2, 4))?
            .contiguous()
    };
    let (xc, bc, cc) = (
        by_chunk(&xp, head_dim)?,
        by_chunk(&b, state)?,
        by_chunk(&c, state)?,
    );
    let dtc = by_chunk(&dtp.unsqueeze(3)?, 1)?.squeeze(4)?; // (b, chunks, H, Q)
    let cum = running_sum(&dtc.broadcast_mul(&a.reshape((1, 1, heads, 1))?)?)?; // (b, chunks, H, Q)

    let y_diag = diagonal_blocks(&xc, &bc, &cc, &dtc, &cum)?; // (b, chunks, H, Q, P)
    let own = chunk_states(&xc, &bc, &dtc, &cum)?; // (b, chunks, H, P, N)
    let (entering, last) = pass_states(&own, &cum, opts.initial_states)?;
    // y_off[i] = exp(cum_i) C_i . S_in: (Q, N) x (N, P) per (b, chunk, head).
    let y_off = batched_product(&cc, &entering.transpose(3, 4)?)?
        .broadcast_mul(&cum.exp()?.unsqueeze(4)?)?;
    let y = (y_diag + y_off)?
        .permute((0, 1, 3, 2, 4))? // (b, chunks, Q, H, P)
        .reshape((batch, padded, heads, head_dim))?
        .narrow(1, 0, len)?;
    Ok((skip_and_gate(y, x, opts)?, last))
}

/// dt' = clamp(softplus(dt + bias)): `(batch, L, H)`.
fn processed_dt(dt: &Tensor, opts: &SsdOptions) -> Result<Tensor> {
    let heads = dt.dim(2)?;
    let mut dt = match opts.dt_bias {
        Some(bias) => dt.broadcast_add(&bias.reshape((1, 1, heads))?)?,
        None => dt.clone(),
    };
    if opts.dt_softplus {
        dt = softplus(&dt)?;
    }
    if opts.dt_limit != NO_DT_LIMIT {
        dt = dt.clamp(opts.dt_limit.0, opts.dt_limit.1)?;
    }
    Ok(dt)
}

/// ln(1 + exp(v)), and v itself above 20 (as PyTorch): the exponential never overflows, so
/// neither branch's gradient is NaN.
fn softplus(v: &Tensor) -> Result<Tensor> {
    let smooth = (v.minimum(20.0)?.exp()? + 1.0)?.log()?;
    v.gt(20.0)?.where_cond(v, &smooth)
}

/// `t: (batch, L, G, N)` repeated for the heads of each group: `(batch, L, H, N)`.
fn per_head(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, len, groups, width) = t.dims4()?;
    t.unsqueeze(3)?
        .broadcast_as((batch, len, groups, heads / groups, width))?
        .reshape((batch, len, heads, width))
}

/// `t` with zero steps appended along dimension 1 up to `padded` (exact for the SSD: a zero
/// dt' neither decays nor feeds the state, and zero x, B, C add nothing).
fn pad_steps(t: &Tensor, padded: usize) -> Result<Tensor> {
    let len = t.dim(1)?;
    if len == padded {
        return Ok(t.clone());
    }
    t.pad_with_zeros(1, 0, padded - len)
}

/// Running sums along the last dimension, `out[.., i] = sum_{j<=i} v[.., j]`, as one product
/// with a triangle of ones whose operands are contiguous (candle's own cumsum hands a strided
/// gradient to a product in its backward, which cuBLAS refuses).
fn running_sum(v: &Tensor) -> Result<Tensor> {
    let q = v.dim(D::Minus1)?;
    let ones: Vec<f32> = (0..q * q)
        .map(|e| if e / q <= e % q { 1.0 } else { 0.0 })
        .collect();
    let upper = Tensor::from_vec(ones, (q, q), v.device())?; // [j][i] = 1 where j <= i
    v.contiguous()?
        .reshape(((), q))?
        .matmul(&upper)?
        .reshape(v.shape())
}

/// exp(v_i - v_j) where j <= i, else 0, for `v: (..., Q)`: `(..., Q, Q)`. The masked entries
/// are pushed to -1e30 before the exponential, so nothing overflows.
fn segment_decay(v: &Tensor) -> Result<Tensor> {
    let q = v.dim(D::Minus1)?;
    let diff = v
        .unsqueeze(D::Minus1)?
        .broadcast_sub(&v.unsqueeze(D::Minus2)?)?; // [i][j] = v_i - v_j
    let keep: Vec<f32> = (0..q * q)
        .map(|e| if e % q <= e / q { 1.0 } else { 0.0 })
        .collect();
    let keep = Tensor::from_vec(keep, (q, q), v.device())?;
    let masked = diff
        .broadcast_mul(&keep)?
        .broadcast_add(&((keep - 1.0)? * 1e30)?)?;
    masked.exp()
}

/// `sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt'_j x_j`: `(b, chunks, H, Q, P)`.
fn diagonal_blocks(
    xc: &Tensor,
    bc: &Tensor,
    cc: &Tensor,
    dtc: &Tensor,
    cum: &Tensor,
) -> Result<Tensor> {
    let cb = batched_product(cc, &bc.transpose(3, 4)?)?; // (b, chunks, H, Q, Q)
    let weights = (cb * segment_decay(cum)?)?.broadcast_mul(&dtc.unsqueeze(3)?)?;
    batched_product(&weights, xc)
}

/// Each chunk's own final state, `sum_j exp(cum_last - cum_j) dt'_j outer(x_j, B_j)`:
/// `(b, chunks, H, P, N)`.
fn chunk_states(xc: &Tensor, bc: &Tensor, dtc: &Tensor, cum: &Tensor) -> Result<Tensor> {
    let q = cum.dim(3)?;
    let last = cum.narrow(3, q - 1, 1)?;
    let weight = (last.broadcast_sub(cum)?.exp()? * dtc)?; // (b, chunks, H, Q)
    batched_product(
        &xc.broadcast_mul(&weight.unsqueeze(4)?)?.transpose(3, 4)?,
        bc,
    )
}

/// The state entering each chunk `(b, chunks, H, P, N)` and the state after the last one
/// `(b, H, P, N)`, from the chunks' own states and the initial state (zeros when absent),
/// as one product with the chunk-to-chunk decays.
fn pass_states(own: &Tensor, cum: &Tensor, initial: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (batch, chunks, heads, head_dim, state) = own.dims5()?;
    let q = cum.dim(3)?;
    let decay_of_chunk = cum.narrow(3, q - 1, 1)?.squeeze(3)?.transpose(1, 2)?; // (b, H, chunks)
    let before = running_sum(&decay_of_chunk.pad_with_zeros(2, 1, 0)?)?; // (b, H, chunks + 1)
    let passing = segment_decay(&before)?; // (b, H, chunks + 1, chunks + 1)
    let first = match initial {
        Some(s) => s.unsqueeze(1)?,
        None => Tensor::zeros((batch, 1, heads, head_dim, state), DType::F32, own.device())?,
    };
    let states = Tensor::cat(&[&first, own], 1)? // (b, chunks + 1, H, P, N)
        .transpose(1, 2)?
        .reshape((batch, heads, chunks + 1, head_dim * state))?;
    let passed = batched_product(&passing, &states)? // (b, H, chunks + 1, P N)
        .reshape((batch, heads, chunks + 1, head_dim, state))?;
    let entering = passed.narrow(2, 0, chunks)?.transpose(1, 2)?.contiguous()?;
    let last = passed.narrow(2, chunks, 1)?.squeeze(2)?;
    Ok((entering, last))
}

/// `l @ r` over every leading dimension, `l: (..., m, k)`, `r: (..., k, n)`: `(..., m, n)`,
/// as one rank-3 batched product of contiguous operands (candle's backward of a product
/// needs them so).
fn batched_product(l: &Tensor, r: &Tensor) -> Result<Tensor> {
    let dims = l.dims();
    let rank = dims.len();
    let (m, k, n) = (dims[rank - 2], dims[rank - 1], r.dim(D::Minus1)?);
    let batch: usize = dims[..rank - 2].iter().product();
    let product = l
        .contiguous()?
        .reshape((batch, m, k))?
        .matmul(&r.contiguous()?.reshape((batch, k, n))?)?;
    let mut shape = dims[..rank - 2].to_vec();
    shape.extend([m, n]);
    product.reshape(shape)
}

/// `(y + D x) * silu(z)`, each part where given.
fn skip_and_gate(y: Tensor, x: &Tensor, opts: &SsdOptions) -> Result<Tensor> {
    let (_, _, heads, head_dim) = x.dims4()?;
    let y = match opts.d {
        Some(d) => {
            let d = if d.elem_count() == heads * head_dim {
                d.reshape((1, 1, heads, head_dim))?
            } else {
                d.reshape((1, 1, heads, 1))?
            };
            (y + x.broadcast_mul(&d)?)?
        }
        None => y,
    };
    match opts.z {
        Some(z) => y * z.silu()?,
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssd::{ssd, ssd_backward, SsdDims, SsdInputs};
    use candle_core::{Device, Var};
    use mamba_testing::lcg_values_in;

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// The tensor form against the CPU kernels, forward and every gradient, with every
    /// optional input, at a length that does not fill its last chunk and two heads per group.
    #[test]
    fn tensor_form_matches_the_cpu_kernels_forward_and_backward() {
        let dims = SsdDims {
            batch: 2,
            len: 37,
            heads: 4,
            head_dim: 8,
            groups: 2,
            state: 16,
            chunk_size: 16,
        };
        let (b, l, h, p, g, n) = (2, 37, 4, 8, 2, 16);
        for d_per_p in [false, true] {
            let x = lcg_values_in(b * l * h * p, 1, -1.0, 1.0);
            let dt = lcg_values_in(b * l * h, 2, -1.0, 1.0);
            let a = lcg_values_in(h, 3, -2.0, -0.5);
            let bm = lcg_values_in(b * l * g * n, 4, -1.0, 1.0);
            let cm = lcg_values_in(b * l * g * n, 5, -1.0, 1.0);
            let dv = lcg_values_in(if d_per_p { h * p } else { h }, 6, 0.5, 1.5);
            let z = lcg_values_in(b * l * h * p, 7, -2.0, 2.0);
            let bias = lcg_values_in(h, 8, -1.0, 0.5);
            let init = lcg_values_in(b * h * p * n, 9, -0.5, 0.5);
            let inputs = SsdInputs {
                x: &x,
                dt: &dt,
                a: &a,
                b: &bm,
                c: &cm,
                d: Some(&dv),
                z: Some(&z),
                dt_bias: Some(&bias),
                dt_softplus: true,
                dt_limit: (0.0, 1.5),
                initial_states: Some(&init),
            };
            let want = ssd(&dims, &inputs).unwrap();
            let gy = lcg_values_in(want.y.len(), 10, -1.0, 1.0);
            let gf = lcg_values_in(want.final_state.len(), 11, -1.0, 1.0);
            let grads = ssd_backward(&dims, &inputs, &gy, Some(&gf)).unwrap();

            let dev = Device::Cpu;
            let var = |v: &[f32], shape: &[usize]| {
                Var::from_tensor(&Tensor::from_slice(v, shape, &dev).unwrap()).unwrap()
            };
            let d_shape: &[usize] = if d_per_p { &[h, p] } else { &[h] };
            let vars = [
                var(&x, &[b, l, h, p]),
                var(&dt, &[b, l, h]),
                var(&a, &[h]),
                var(&bm, &[b, l, g, n]),
                var(&cm, &[b, l, g, n]),
                var(&dv, d_shape),
                var(&z, &[b, l, h, p]),
                var(&bias, &[h]),
                var(&init, &[b, h, p, n]),
            ];
            let t = |i: usize| vars[i].as_tensor();
            let opts = SsdOptions {
                d: Some(t(5)),
                z: Some(t(6)),
                dt_bias: Some(t(7)),
                dt_softplus: true,
                dt_limit: (0.0, 1.5),
                initial_states: Some(t(8)),
                chunk_size: dims.chunk_size,
            };
            let (y, last) = ssd_chunked(t(0), t(1), t(2), t(3), t(4), &opts).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(max_rel(&flat(&y), &want.y) < 1e-5, "y");
            assert!(
                max_rel(&flat(&last), &want.final_state) < 1e-5,
                "final state"
            );
            let gy_t = Tensor::from_slice(&gy, y.shape(), &dev).unwrap();
            let gf_t = Tensor::from_slice(&gf, last.shape(), &dev).unwrap();
            let objective = ((y * gy_t).unwrap().sum_all().unwrap()
                + (last * gf_t).unwrap().sum_all().unwrap())
            .unwrap();
            let store = objective.backward().unwrap();
            let got = |i: usize| flat(store.get(vars[i].as_tensor()).unwrap());
            let expected: [&[f32]; 9] = [
                &grads.x,
                &grads.dt,
                &grads.a,
                &grads.b,
                &grads.c,
                grads.d.as_deref().unwrap(),
                grads.z.as_deref().unwrap(),
                grads.dt_bias.as_deref().unwrap(),
                grads.initial_states.as_deref().unwrap(),
            ];
            let names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "init"];
            for (i, want) in expected.iter().enumerate() {
                let err = max_rel(&got(i), want);
                assert!(
                    err < 1e-4,
                    "d_per_p {d_per_p}: grad {} off by {err}",
                    names[i]
                );
            }
        }
    }
}
