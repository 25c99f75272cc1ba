//! Building blocks shared by the model families: linear layers (f32 or bf16 weights,
//! f32 activations), embeddings, RMSNorm and tensor/slice conversions.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

/// Rows at or below which a bf16 linear layer runs its own matrix-vector kernel
/// (reading the bf16 weights directly) instead of widening the weights to f32.
const BF16_GEMV_MAX_ROWS: usize = 16;

/// `y = x W^T (+ b)` with `W: (out, in)` stored as in the checkpoint (f32 or bf16).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// Loads `{name}.weight` of shape `(out, in)` and, if `with_bias`, `{name}.bias` (f32).
    pub fn load(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out, inp), &format!("{name}.weight"))?;
        let bias = with_bias
            .then(|| vb.to_dtype(DType::F32).get(out, &format!("{name}.bias")))
            .transpose()?;
        Ok(Linear { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Applies the layer to `x: (..., in)` (f32), returning `(..., out)` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims
            .last()
            .ok_or_else(|| Error::Input("linear layer on a scalar".into()))?;
        let rows = x.elem_count() / inp.max(1);
        let x2 = x.reshape((rows, inp))?;
        let y = match self.weight.dtype() {
            DType::BF16 if rows <= BF16_GEMV_MAX_ROWS && self.weight.device().is_cpu() => {
                bf16_gemv(&x2, &self.weight)?
            }
            DType::F32 => x2.matmul(&self.weight.t()?)?,
            _ => x2.matmul(&self.weight.to_dtype(DType::F32)?.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("checked above") = self.out_features();
        Ok(y.reshape(out_dims)?)
    }
}

/// `x (rows, in) f32 @ W^T` with `W (out, in)` bf16, reading each weight once and
/// accumulating in f32; threaded over output features. Memory-bound, as decoding is.
fn bf16_gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let xs = f32_vec(x)?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Input(
            "bf16 matrix-vector product runs on the CPU only".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Input("weight is not contiguous".into()))?;
    let w_data = &cpu.as_slice::<bf16>()?[start..end];
    let mut y = vec![0.0f32; rows * out];
    // (out, rows) blocks: each task owns one output feature for every row.
    let mut by_feature = vec![0.0f32; out * rows];
    by_feature
        .par_chunks_mut(rows)
        .zip(w_data.par_chunks(inp))
        .with_min_len(64)
        .for_each(|(dst, w_row)| {
            for (r, d) in dst.iter_mut().enumerate() {
                *d = mamba_ops::math::with_simd(
                    #[inline(always)]
                    || dot_bf16(w_row, &xs[r * inp..][..inp]),
                );
            }
        });
    for (o, col) in by_feature.chunks(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * out + o] = *v;
        }
    }
    Ok(Tensor::from_vec(y, (rows, out), &Device::Cpu)?)
}

#[inline(always)]
fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let body = w.len() - w.len() % LANES;
    for (wc, xc) in w[..body]
        .chunks_exact(LANES)
        .zip(x[..body].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += f32::from_bits((wc[i].to_bits() as u32) << 16) * xc[i];
        }
    }
    let tail: f32 = w[body..]
        .iter()
        .zip(&x[body..])
        .map(|(a, b)| a.to_f32() * b)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Token embeddings `(vocab, hidden)`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Embedding { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Looks up `ids: (batch, len)`, giving `(batch, len, hidden)` in f32. Ids outside the
    /// vocabulary are an input error.
    pub fn forward(&self, ids: &[u32], batch: usize) -> Result<Tensor> {
        let vocab = self.weight.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::Input("empty input or ragged batch".into()));
        }
        let index = Tensor::from_slice(ids, ids.len(), self.weight.device())?;
        let rows = self.weight.index_select(&index, 0)?.to_dtype(DType::F32)?;
        Ok(rows.reshape((batch, ids.len() / batch, self.weight.dim(1)?))?)
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension (f32), differentiable.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: load_f32(vb, name, &[size])?,
            eps: eps as f32,
        })
    }

    /// One group over the whole last dimension, no gate: the plain RMSNorm.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.weight.elem_count();
        Ok(mamba_ops::tensor::rmsnorm_gated(
            x,
            &self.weight,
            None,
            hidden,
            self.eps,
            true,
        )?)
    }
}

/// RMSNorm without a weight over the last dimension (FalconMamba's B, C, Δ norms).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?)
}

/// The values of a tensor as a contiguous f32 vector.
pub fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A small parameter (A_log, D, biases, conv weights, norm weights) as an f32 tensor of
/// `shape`; it stays a training variable when the builder holds variables.
pub fn load_f32(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    Ok(vb.to_dtype(DType::F32).get(shape, name)?)
}

/// A recurrent state held as an f32 vector, viewed as a tensor of `shape` (no gradient).
pub fn state_tensor(values: &[f32], shape: &[usize]) -> Result<Tensor> {
    state_tensor_on(values, shape, &Device::Cpu)
}

/// Like [`state_tensor`], on `device` (the host values are copied there).
pub fn state_tensor_on(values: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, shape, device)?)
}

/// Columns `[start, start + width)` of the last dimension.
pub fn columns(t: &Tensor, start: usize, width: usize) -> Result<Tensor> {
    Ok(t.narrow(D::Minus1, start, width)?)
}

/// `(b, L, C)` → `(b, C, L)` and back, contiguous.
pub fn swap_time_channels(t: &Tensor) -> Result<Tensor> {
    Ok(t.transpose(1, 2)?.contiguous()?)
}
