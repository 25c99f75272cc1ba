//! Causal multi-head attention with grouped key/value heads (GQA) and a key/value cache
//! kept for each sequence.
//!
//! ```text
//! q = x W_q^T: H heads,  k = x W_k^T, v = x W_v^T: G heads, all of width d   (+ optional biases)
//! (optional) q, k rotated by their absolute positions (rotary embedding)
//! K, V = cached keys, values ++ k, v                           (S = past + L tokens)
//! o_j  = softmax(q_j K_g^T / sqrt(d) + causal mask) V_g        query head j uses g = j / (H/G)
//! out  = [o_0 | ... | o_{H-1}] W_o^T
//! ```
//!
//! Jamba uses no positional encoding at all (its Mamba layers carry the order) and separate
//! `q_proj`, `k_proj`, `v_proj`, `o_proj` without biases; `mamba_ssm`'s `MHA` (hybrids and
//! Transformers) has one `in_proj` giving `[q | k | v]` and an `out_proj`, both with
//! optional biases, and rotates the first `rotary_emb_dim` features of each head. The
//! whole-sequence path is differentiable; cached keys and values enter as constants, as
//! the recurrent states do.

use crate::error::{Error, Result};
use crate::layers::{columns, f32_vec, Linear};
use crate::model::Mixer;
use crate::state::{KvCache, LayerState, SequenceKv, StateSize};
use candle_core::{IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use mamba_ops::math::dot;
use rayon::prelude::*;

/// The sizes of an attention mixer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    pub hidden_size: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `G`; `H` must be a multiple of it.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary position embedding of queries and keys, or `None` for no positional encoding.
    pub rotary: Option<RotarySpec>,
    pub layout: ProjectionLayout,
    /// Bias on the query, key and value projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub out_bias: bool,
}

/// How a checkpoint stores the projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionLayout {
    /// `q_proj`, `k_proj`, `v_proj` and `o_proj` (Jamba).
    Separate,
    /// `in_proj`, whose outputs are `[q | k | v]`, and `out_proj` (`mamba_ssm`'s `MHA`).
    Fused,
}

/// Rotary embedding in the GPT-NeoX layout: the first `dim` features of each head form the
/// pairs `(i, i + dim/2)`, rotated by `position * base^(-2i/dim)`; the rest pass unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotarySpec {
    pub dim: usize,
    pub base: f64,
}

impl RotarySpec {
    /// `x: (..., L, heads, head_dim)` at positions `start .. start + L`, rotated.
    fn rotate(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (len, head_dim) = (x.dim(D::Minus(3))?, x.dim(D::Minus1)?);
        let half = self.dim / 2;
        let (cos, sin) = self.cos_sin(start, len, x.device())?; // (L, 1, dim/2) each
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        let mut parts = vec![r1, r2];
        if self.dim < head_dim {
            parts.push(x.narrow(D::Minus1, self.dim, head_dim - self.dim)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// `cos` and `sin` of the angles of positions `start .. start + len`, `(len, 1, dim/2)`.
    fn cos_sin(
        &self,
        start: usize,
        len: usize,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.dim / 2;
        let angles: Vec<f64> = (start..start + len)
            .flat_map(|pos| {
                (0..half)
                    .map(move |i| pos as f64 * self.base.powf(-2.0 * i as f64 / self.dim as f64))
            })
            .collect();
        let table = |f: fn(f64) -> f64| {
            let values: Vec<f32> = angles.iter().map(|&a| f(a) as f32).collect();
            Tensor::from_vec(values, (len, 1, half), device)
        };
        Ok((table(f64::cos)?, table(f64::sin)?))
    }
}

/// One attention layer.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: QkvProjection,
    out_proj: Linear,
    spec: AttentionSpec,
}

/// The query, key and value projections in the checkpoint's layout.
#[derive(Debug, Clone)]
enum QkvProjection {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused(Linear),
}

impl Attention {
    /// Loads the projections from `vb`, named as `spec.layout` says.
    pub fn load(vb: &VarBuilder, spec: &AttentionSpec) -> Result<Self> {
        check_spec(spec)?;
        let (h, q_width, kv_width) = (
            spec.hidden_size,
            spec.heads * spec.head_dim,
            spec.kv_heads * spec.head_dim,
        );
        let (qkv, out_name) = match spec.layout {
            ProjectionLayout::Separate => (
                QkvProjection::Separate {
                    q_proj: Linear::load(vb, "q_proj", (q_width, h), spec.qkv_bias)?,
                    k_proj: Linear::load(vb, "k_proj", (kv_width, h), spec.qkv_bias)?,
                    v_proj: Linear::load(vb, "v_proj", (kv_width, h), spec.qkv_bias)?,
                },
                "o_proj",
            ),
            ProjectionLayout::Fused => (
                QkvProjection::Fused(Linear::load(
                    vb,
                    "in_proj",
                    (q_width + 2 * kv_width, h),
                    spec.qkv_bias,
                )?),
                "out_proj",
            ),
        };
        Ok(Attention {
            qkv,
            out_proj: Linear::load(vb, out_name, (h, q_width), spec.out_bias)?,
            spec: *spec,
        })
    }

    /// `q: (..., H d)`, `k, v: (..., G d)` of `x: (..., hidden)`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProjection::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?)),
            QkvProjection::Fused(in_proj) => {
                let (q_width, kv_width) = (self.spec.heads * self.spec.head_dim, self.kv_width());
                let qkv = in_proj.forward(x)?; // (..., (H + 2G) d)
                Ok((
                    columns(&qkv, 0, q_width)?,
                    columns(&qkv, q_width, kv_width)?,
                    columns(&qkv, q_width + kv_width, kv_width)?,
                ))
            }
        }
    }

    /// f32 values per token in the keys: `kv_heads * head_dim`.
    fn kv_width(&self) -> usize {
        self.spec.kv_heads * self.spec.head_dim
    }

    /// The layer's cache in `state`, checked against the batch and the head sizes.
    fn cache<'a>(&self, state: &'a mut LayerState, batch: usize) -> Result<&'a mut KvCache> {
        let width = self.kv_width();
        match state.kv.as_mut() {
            Some(kv) if kv.width == width && kv.sequences.len() == batch => Ok(kv),
            _ => Err(Error::Input(format!(
                "the state of an attention layer must hold a key/value cache of width {width} \
                 for {batch} sequences"
            ))),
        }
    }

    /// `q: (b, L, H d)`, `k, v: (b, L, G d)` of new tokens attending to each sequence's cached
    /// tokens and to each other causally; appends `k, v` to the caches. With `together`, and
    /// when every cache holds as many tokens, the sequences attend in one batched product
    /// (a GPU's choice: one launch per op instead of one per sequence); else one at a time
    /// (the CPU's: no copy of every cache into one tensor). Returns `(b, L, H d)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        together: bool,
    ) -> Result<Tensor> {
        let width = self.kv_width();
        let cached = cache
            .sequences
            .iter()
            .map(|seq| seq.tokens(width))
            .collect::<Result<Vec<_>>>()?;
        if together && cached.windows(2).all(|pair| pair[0] == pair[1]) {
            return self.attend_together(q, k, v, &mut cache.sequences, cached[0]);
        }
        let per_sequence = cache
            .sequences
            .iter_mut()
            .enumerate()
            .map(|(row, seq)| {
                let rows = |t: &Tensor| t.narrow(0, row, 1);
                self.attend_together(
                    &rows(q)?,
                    &rows(k)?,
                    &rows(v)?,
                    std::slice::from_mut(seq),
                    cached[row],
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&per_sequence, 0)?)
    }

    /// [`Attention::attend`] for sequences that have all cached `past` tokens.
    fn attend_together(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sequences: &mut [SequenceKv],
        past: usize,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (batch, len, _) = q.dims3()?;
        let q = q.reshape((batch, len, s.heads, s.head_dim))?;
        let k = k.reshape((batch, len, s.kv_heads, s.head_dim))?;
        let v = v.reshape((batch, len, s.kv_heads, s.head_dim))?;
        let (q, k) = match &s.rotary {
            Some(r) => (r.rotate(&q, past)?, r.rotate(&k, past)?),
            None => (q, k),
        };
        if len == 1 && q.device().is_cpu() && !(q.track_op() || k.track_op() || v.track_op()) {
            return self.attend_new_token_on_host(&q, &k, &v, sequences);
        }
        let (keys, values): (Vec<Tensor>, Vec<Tensor>) = sequences
            .iter_mut()
            .enumerate()
            .map(|(row, seq)| seq.append(&k.i(row)?, &v.i(row)?)) // (S, G, d) each
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        grouped_attention(&q, &stacked(&keys)?, &stacked(&values)?, past)
    }

    /// Decoding on the CPU, one new token per sequence (`q: (b, 1, H, d)`, `k, v: (b, 1, G, d)`,
    /// no gradient): each cache's vectors grow in place by the new key and value, and the
    /// token attends over them directly, every cached key and value read once, instead of
    /// the whole cache being copied into tensors every step. Returns `(b, 1, H d)`.
    fn attend_new_token_on_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sequences: &mut [SequenceKv],
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (q, k, v) = (f32_vec(q)?, f32_vec(k)?, f32_vec(v)?);
        let (q_width, width) = (s.heads * s.head_dim, self.kv_width());
        let mut out = Vec::with_capacity(sequences.len() * q_width);
        for (row, seq) in sequences.iter_mut().enumerate() {
            seq.extend_host(&k[row * width..][..width], &v[row * width..][..width]);
            out.extend(attend_cached(
                &q[row * q_width..][..q_width],
                &seq.keys,
                &seq.values,
                s,
            ));
        }
        Ok(Tensor::from_vec(
            out,
            (sequences.len(), 1, q_width),
            &candle_core::Device::Cpu,
        )?)
    }
}

/// Tokens of the cache one worker takes at a time in [`attend_cached`].
const TOKENS_PER_TASK: usize = 256;

/// `softmax(q K^T / sqrt(d)) V` of one query `q: (H, d)` over host keys and values
/// `(S, G, d)`, query head `j` reading key/value head `j / (H/G)`. The cache is read token
/// by token (each token's keys, then values, contiguous), blocks of tokens in parallel: the
/// scores of every head first, then each block's share of the weighted values, summed.
/// Returns `(H d)`.
fn attend_cached(q: &[f32], keys: &[f32], values: &[f32], s: &AttentionSpec) -> Vec<f32> {
    let (heads, d, kv_heads) = (s.heads, s.head_dim, s.kv_heads);
    let (group, width) = (heads / kv_heads, kv_heads * d);
    let scale = 1.0 / (d as f32).sqrt();
    // scores: (S, H).
    let mut scores = vec![0.0f32; keys.len() / width * heads];
    scores
        .par_chunks_mut(TOKENS_PER_TASK * heads)
        .zip(keys.par_chunks(TOKENS_PER_TASK * width))
        .for_each(|(scores, keys)| {
            for (row, key) in scores.chunks_mut(heads).zip(keys.chunks(width)) {
                for (j, score) in row.iter_mut().enumerate() {
                    let g = j / group;
                    *score = dot(&q[j * d..][..d], &key[g * d..][..d]) * scale;
                }
            }
        });
    let mut max = vec![f32::NEG_INFINITY; heads];
    for row in scores.chunks(heads) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let mut sum = vec![0.0f32; heads];
    for row in scores.chunks_mut(heads) {
        for ((v, m), total) in row.iter_mut().zip(&max).zip(&mut sum) {
            *v = (*v - m).exp();
            *total += *v;
        }
    }
    let partial = |(weights, values): (&[f32], &[f32])| -> Vec<f32> {
        let mut out = vec![0.0f32; heads * d];
        for (row, value) in weights.chunks(heads).zip(values.chunks(width)) {
            for (j, o) in out.chunks_mut(d).enumerate() {
                let (w, v) = (row[j], &value[(j / group) * d..][..d]);
                for (o, v) in o.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
        }
        out
    };
    let mut out = scores
        .par_chunks(TOKENS_PER_TASK * heads)
        .zip(values.par_chunks(TOKENS_PER_TASK * width))
        .map(partial)
        .reduce(
            || vec![0.0f32; heads * d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    for (o, total) in out.chunks_mut(d).zip(&sum) {
        o.iter_mut().for_each(|v| *v /= total);
    }
    out
}

/// `(S, G, d)` tensors as one `(b, S, G, d)` (a view of the only one when there is one).
fn stacked(rows: &[Tensor]) -> Result<Tensor> {
    Ok(match rows {
        [one] => one.unsqueeze(0)?,
        _ => Tensor::stack(rows, 0)?,
    })
}

fn check_spec(s: &AttentionSpec) -> Result<()> {
    if s.heads == 0 || s.kv_heads == 0 || s.head_dim == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::Config(format!(
            "attention needs heads ({}) a positive multiple of kv_heads ({}) and head_dim ({}) >= 1",
            s.heads, s.kv_heads, s.head_dim
        )));
    }
    if let Some(r) = &s.rotary {
        if r.dim == 0 || !r.dim.is_multiple_of(2) || r.dim > s.head_dim {
            return Err(Error::Config(format!(
                "rotary dimension {} must be even, positive and at most head_dim {}",
                r.dim, s.head_dim
            )));
        }
    }
    Ok(())
}

/// `softmax(q K^T / sqrt(d) + mask) V` for `q: (b, L, H, d)` at positions `past ..`, and
/// `k, v: (b, S, G, d)` at positions `0 .. S`; query head `j` reads key/value head
/// `j / (H/G)`. Returns `(b, L, H d)`.
fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
    let (batch, len, heads, d) = q.dims4()?;
    let (_, keys, kv_heads, _) = k.dims4()?;
    let group = heads / kv_heads;
    let pairs = batch * kv_heads;
    // Query heads of one key/value head side by side: (b G, group * L, d).
    let q = q
        .reshape((batch, len, kv_heads, group, d))?
        .permute((0, 2, 3, 1, 4))?
        .reshape((pairs, group * len, d))?;
    let by_head = |t: &Tensor| -> Result<Tensor> {
        Ok(t.transpose(1, 2)?.contiguous()?.reshape((pairs, keys, d))?) // (b G, S, d)
    };
    let (k, v) = (by_head(k)?, by_head(v)?);
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (b G, group * L, S)
    let scores = scores.reshape((pairs, group, len, keys))?;
    let scores = if len > 1 {
        scores.broadcast_add(&causal_mask(len, past, q.device())?)?
    } else {
        scores // a single new token sees every key
    };
    let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let out = weights.reshape((pairs, group * len, keys))?.matmul(&v)?; // (b G, group * L, d)
    Ok(out
        .reshape((batch, kv_heads, group, len, d))?
        .permute((0, 3, 1, 2, 4))?
        .reshape((batch, len, heads * d))?)
}

/// `(L, past + L)`: 0 where query `t` (at position `past + t`) may see key `s`, else -inf.
fn causal_mask(len: usize, past: usize, device: &candle_core::Device) -> Result<Tensor> {
    let keys = past + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|t| (0..keys).map(move |s| if s > past + t { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (len, keys), device)?)
}

impl Mixer for Attention {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears = match &mut self.qkv {
            QkvProjection::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![q_proj, k_proj, v_proj],
            QkvProjection::Fused(qkv) => vec![qkv],
        };
        linears.push(&mut self.out_proj);
        linears
    }

    /// Keys and values of `kv_heads * head_dim` each per token.
    fn state_size(&self) -> StateSize {
        StateSize::KeyValue {
            width: self.kv_width(),
        }
    }

    /// Whole-sequence forward of `x: (b, L, hidden)` after the cached tokens of each
    /// sequence, whose keys and values it appends.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let cache = self.cache(state, batch)?;
        let (q, k, v) = self.project(x)?; // (b, L, H d), (b, L, G d), (b, L, G d)
        let together = x.device().is_cuda();
        self.out_proj
            .forward(&self.attend(&q, &k, &v, cache, together)?) // (b, L, hidden)
    }

    /// One token per sequence, `x: (b, hidden)`.
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        Ok(self.forward(&x.unsqueeze(1)?, state)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// Values in [-0.5, 0.5) that differ from entry to entry.
    fn filler(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    fn layer(spec: &AttentionSpec) -> Attention {
        let (h, qw, kw) = (
            spec.hidden_size,
            spec.heads * spec.head_dim,
            spec.kv_heads * spec.head_dim,
        );
        let weights = HashMap::from([
            (
                "q_proj.weight".to_string(),
                tensor(filler(qw * h, 1), &[qw, h]),
            ),
            (
                "k_proj.weight".to_string(),
                tensor(filler(kw * h, 2), &[kw, h]),
            ),
            (
                "v_proj.weight".to_string(),
                tensor(filler(kw * h, 3), &[kw, h]),
            ),
            (
                "o_proj.weight".to_string(),
                tensor(filler(h * qw, 4), &[h, qw]),
            ),
        ]);
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Attention::load(&vb, spec).unwrap()
    }

    const SPEC: AttentionSpec = AttentionSpec {
        hidden_size: 12,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        rotary: Some(RotarySpec {
            dim: 4,
            base: 10000.0,
        }),
        layout: ProjectionLayout::Separate,
        qkv_bias: false,
        out_bias: false,
    };

    /// Prefilling part of the sequences and feeding the rest one token at a time gives
    /// the outputs of one whole pass: the cache and the rotary positions line up.
    #[test]
    fn cached_steps_equal_the_whole_pass() {
        for rotary in [None, SPEC.rotary] {
            let spec = AttentionSpec { rotary, ..SPEC };
            let attn = layer(&spec);
            let (batch, len, h, split) = (2, 7, spec.hidden_size, 3);
            let x = tensor(filler(batch * len * h, 5), &[batch, len, h]);
            let mut whole = LayerState::zeros(batch, attn.state_size());
            let want = attn.forward(&x, &mut whole).unwrap(); // (b, L, h)

            let mut state = LayerState::zeros(batch, attn.state_size());
            let mut got = vec![attn
                .forward(&x.narrow(1, 0, split).unwrap(), &mut state)
                .unwrap()];
            for t in split..len {
                let token = x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
                got.push(attn.step(&token, &mut state).unwrap().unsqueeze(1).unwrap());
            }
            let got = Tensor::cat(&got, 1).unwrap();
            let diff = max_diff(&f32_vec(&got).unwrap(), &f32_vec(&want).unwrap());
            assert!(diff < 1e-5, "rotary {rotary:?}: differs by {diff}");
            let (a, b) = (state.kv.unwrap(), whole.kv.unwrap());
            for (x, y) in a.sequences.iter().zip(&b.sequences) {
                assert!(max_diff(&x.keys, &y.keys) < 1e-5, "rotary {rotary:?}: keys");
                assert!(
                    max_diff(&x.values, &y.values) < 1e-5,
                    "rotary {rotary:?}: values"
                );
            }
        }
    }

    /// A batch gives each sequence what it gets alone, attending together (allowed, and every
    /// cache as long) or one at a time, and leaves each cache as the sequence alone does.
    #[test]
    fn sequences_attend_together_as_alone() {
        let attn = layer(&SPEC);
        let h = SPEC.hidden_size;
        let prefilled = |lens: &[usize]| -> Vec<LayerState> {
            lens.iter()
                .enumerate()
                .map(|(i, &len)| {
                    let mut state = LayerState::zeros(1, attn.state_size());
                    let x = tensor(filler(len * h, 10 + i), &[1, len, h]);
                    attn.forward(&x, &mut state).unwrap();
                    state
                })
                .collect()
        };
        let token = tensor(filler(3 * h, 20), &[3, h]);
        for lens in [[4, 4, 4], [2, 5, 3]] {
            let mut alone = prefilled(&lens);
            let mut want = Vec::new();
            for (i, state) in alone.iter_mut().enumerate() {
                let next = token.narrow(0, i, 1).unwrap();
                want.extend(f32_vec(&attn.step(&next, state).unwrap()).unwrap());
            }
            for together in [false, true] {
                let states = prefilled(&lens);
                let mut batch = LayerState::stack(&states.iter().collect::<Vec<_>>()).unwrap();
                let (q, k, v) = attn.project(&token.unsqueeze(1).unwrap()).unwrap();
                let mixed = attn
                    .attend(&q, &k, &v, batch.kv.as_mut().unwrap(), together)
                    .unwrap();
                let got = f32_vec(&attn.out_proj.forward(&mixed).unwrap()).unwrap();
                let label = format!("cached lengths {lens:?}, together {together}");
                assert!(max_diff(&got, &want) < 1e-5, "{label}");
                let kv = batch.kv.unwrap();
                for (seq, single) in kv.sequences.iter().zip(&alone) {
                    let single = &single.kv.as_ref().unwrap().sequences[0];
                    assert_eq!(seq.keys.len(), single.keys.len(), "{label}");
                    assert!(max_diff(&seq.keys, &single.keys) < 1e-6, "{label}");
                    assert!(max_diff(&seq.values, &single.values) < 1e-6, "{label}");
                }
            }
        }
    }

    /// A token's output does not depend on the tokens after it.
    #[test]
    fn later_tokens_do_not_change_earlier_outputs() {
        let attn = layer(&SPEC);
        let (len, h) = (6, SPEC.hidden_size);
        let x = tensor(filler(len * h, 6), &[1, len, h]);
        let mut changed = filler(len * h, 6);
        for v in &mut changed[4 * h..] {
            *v += 1.0;
        }
        let run = |x: &Tensor| {
            let mut state = LayerState::zeros(1, attn.state_size());
            f32_vec(&attn.forward(x, &mut state).unwrap()).unwrap()
        };
        let (a, b) = (run(&x), run(&tensor(changed, &[1, len, h])));
        assert_eq!(a[..4 * h], b[..4 * h]);
        assert!(max_diff(&a[4 * h..], &b[4 * h..]) > 1e-3);
    }

    /// Rotated queries and keys score by their distance only: shifting both positions by
    /// the same amount leaves `q . k` unchanged.
    #[test]
    fn rotary_scores_depend_on_relative_position() {
        let rotary = SPEC.rotary.unwrap();
        let q = tensor(filler(6, 7), &[1, 1, 6]);
        let k = tensor(filler(6, 8), &[1, 1, 6]);
        let score = |qpos: usize, kpos: usize| {
            let q = f32_vec(&rotary.rotate(&q, qpos).unwrap()).unwrap();
            let k = f32_vec(&rotary.rotate(&k, kpos).unwrap()).unwrap();
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        let base = score(5, 2);
        for shift in [1, 10, 100] {
            assert!(
                (score(5 + shift, 2 + shift) - base).abs() < 1e-4,
                "shift {shift}"
            );
        }
        assert!(
            (score(5, 3) - base).abs() > 1e-3,
            "the distance should matter"
        );
        let untouched = f32_vec(&rotary.rotate(&q, 9).unwrap()).unwrap();
        assert_eq!(untouched[4..], f32_vec(&q).unwrap()[4..]);
    }

    /// `mamba_ssm`'s fused `in_proj` stacks `[q | k | v]`: a fused layer made of the separate
    /// layer's weights and biases computes what the separate layer does.
    #[test]
    fn fused_projections_equal_separate_ones() {
        let separate_spec = AttentionSpec {
            qkv_bias: true,
            out_bias: true,
            ..SPEC
        };
        let fused_spec = AttentionSpec {
            layout: ProjectionLayout::Fused,
            ..separate_spec
        };
        let (h, qw, kw) = (
            SPEC.hidden_size,
            SPEC.heads * SPEC.head_dim,
            SPEC.kv_heads * SPEC.head_dim,
        );
        let part = |rows: usize, seed: usize| {
            (
                tensor(filler(rows * h, seed), &[rows, h]),
                tensor(filler(rows, seed + 10), &[rows]),
            )
        };
        let ((q, qb), (k, kb), (v, vb)) = (part(qw, 1), part(kw, 2), part(kw, 3));
        let (o, ob) = (
            tensor(filler(h * qw, 4), &[h, qw]),
            tensor(filler(h, 5), &[h]),
        );
        let mut separate = HashMap::new();
        for (name, w, b) in [
            ("q_proj", &q, &qb),
            ("k_proj", &k, &kb),
            ("v_proj", &v, &vb),
            ("o_proj", &o, &ob),
        ] {
            separate.insert(format!("{name}.weight"), w.clone());
            separate.insert(format!("{name}.bias"), b.clone());
        }
        let fused = HashMap::from([
            (
                "in_proj.weight".to_string(),
                Tensor::cat(&[&q, &k, &v], 0).unwrap(),
            ),
            (
                "in_proj.bias".to_string(),
                Tensor::cat(&[&qb, &kb, &vb], 0).unwrap(),
            ),
            ("out_proj.weight".to_string(), o),
            ("out_proj.bias".to_string(), ob),
        ]);
        let load = |weights: HashMap<String, Tensor>, spec: &AttentionSpec| {
            let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
            Attention::load(&vb, spec).unwrap()
        };
        let x = tensor(filler(2 * 5 * h, 6), &[2, 5, h]);
        let run = |attn: &Attention| {
            let mut state = LayerState::zeros(2, attn.state_size());
            f32_vec(&attn.forward(&x, &mut state).unwrap()).unwrap()
        };
        let want = run(&load(separate, &separate_spec));
        let got = run(&load(fused, &fused_spec));
        assert!(max_diff(&got, &want) < 1e-6);
        // The biases matter: without them the outputs differ.
        let plain = run(&layer(&SPEC));
        assert!(max_diff(&plain, &want) > 1e-3);
    }

    /// The GPT-NeoX layout that `mamba_ssm`'s (flash-attn's) non-interleaved rotary uses:
    /// feature `i` pairs with `i + dim/2` and turns by `position * base^(-2i/dim)`.
    #[test]
    fn rotary_turns_feature_pairs_half_a_rotary_dim_apart() {
        let rotary = RotarySpec {
            dim: 4,
            base: 100.0,
        };
        let x = filler(6, 3);
        let position = 7;
        let got = f32_vec(
            &rotary
                .rotate(&tensor(x.clone(), &[1, 1, 6]), position)
                .unwrap(),
        )
        .unwrap();
        let mut want = x.clone();
        for i in 0..2 {
            let angle = position as f64 * 100f64.powf(-2.0 * i as f64 / 4.0);
            let (cos, sin) = (angle.cos() as f32, angle.sin() as f32);
            want[i] = x[i] * cos - x[i + 2] * sin;
            want[i + 2] = x[i + 2] * cos + x[i] * sin;
        }
        assert!(max_diff(&got, &want) < 1e-6, "{got:?} vs {want:?}");
    }

    #[test]
    fn a_state_without_a_cache_is_an_input_error() {
        let attn = layer(&SPEC);
        let x = tensor(filler(2 * SPEC.hidden_size, 9), &[1, 2, SPEC.hidden_size]);
        let mut recurrent = LayerState::zeros(1, StateSize::Recurrent { conv: 4, ssm: 4 });
        assert!(matches!(
            attn.forward(&x, &mut recurrent),
            Err(Error::Input(_))
        ));
        let mut two = LayerState::zeros(2, attn.state_size());
        assert!(matches!(attn.forward(&x, &mut two), Err(Error::Input(_))));
    }

    #[test]
    fn inconsistent_head_counts_are_config_errors() {
        let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
        for spec in [
            AttentionSpec {
                kv_heads: 3,
                ..SPEC
            },
            AttentionSpec {
                rotary: Some(RotarySpec { dim: 5, base: 1e4 }),
                ..SPEC
            },
            AttentionSpec {
                rotary: Some(RotarySpec { dim: 8, base: 1e4 }),
                ..SPEC
            },
        ] {
            assert!(matches!(Attention::load(&vb, &spec), Err(Error::Config(_))));
        }
    }
}
