//! The ops as candle tensor operations with a backward pass, so that models can run them
//! inside candle's autograd (training) as well as plainly (inference).
//!
//! Each op is a [`candle_core::CustomOp1`] over its inputs packed into one flat f32 tensor
//! (candle's custom ops take at most three arguments; packing by `cat` is itself
//! differentiable, so every input receives its gradient). The forward runs the fast CPU
//! kernel of the op's module, the backward its fast backward kernel.

use crate::causal_conv1d::{
    causal_conv1d as conv_fwd, causal_conv1d_backward, ConvDims, ConvInputs,
};
use crate::layout::swap_inner;
use crate::math::NO_DT_LIMIT;
use crate::rmsnorm_gated::{rmsnorm_gated as norm_fwd, rmsnorm_gated_backward, NormDims};
use crate::selective_scan::{
    selective_scan_backward, selective_scan_token_major, BcForm, ScanDims, ScanInputs,
};
use crate::ssd::{ssd as ssd_fwd, ssd_backward, SsdDims, SsdInputs};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A kernel over packed inputs: the inputs' flat slices in, the outputs' flat values out.
trait PackedKernel: Send + Sync + 'static {
    const NAME: &'static str;
    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>>;
    /// Gradients of every input, concatenated in input order.
    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>>;
}

struct PackedOp<K> {
    kernel: K,
    sizes: Vec<usize>,
}

fn split<'a>(data: &'a [f32], sizes: &[usize]) -> Vec<&'a [f32]> {
    let mut rest = data;
    sizes
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
        .collect()
}

fn to_candle(e: crate::OpError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl<K: PackedKernel> CustomOp1 for PackedOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: packed input must be contiguous", K::NAME))
        })?;
        let data = &storage.as_slice::<f32>()?[start..end];
        let out = self
            .kernel
            .forward(&split(data, &self.sizes))
            .map_err(to_candle)?;
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inputs = arg.to_vec1::<f32>()?;
        let grad_out = grad_res.to_vec1::<f32>()?;
        let grads = self
            .kernel
            .backward(&split(&inputs, &self.sizes), &grad_out)
            .map_err(to_candle)?;
        Ok(Some(Tensor::from_vec(grads, arg.shape(), arg.device())?))
    }
}

/// Packs `inputs`, applies the kernel and splits its flat output into tensors of `out_shapes`.
fn apply<K: PackedKernel>(
    kernel: K,
    inputs: &[&Tensor],
    out_shapes: &[&[usize]],
) -> crate::Result<Vec<Tensor>> {
    let flat = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sizes = flat.iter().map(Tensor::elem_count).collect();
    let packed = Tensor::cat(&flat, 0)?;
    let out = packed.apply_op1(PackedOp { kernel, sizes })?;
    let mut offset = 0;
    let mut outputs = Vec::with_capacity(out_shapes.len());
    for shape in out_shapes {
        let n: usize = shape.iter().product();
        outputs.push(out.narrow(0, offset, n)?.reshape(*shape)?);
        offset += n;
    }
    Ok(outputs)
}

/// Gradients in input order, with absent optional inputs skipped.
fn concat_grads(parts: impl IntoIterator<Item = Option<Vec<f32>>>) -> Vec<f32> {
    parts.into_iter().flatten().flatten().collect()
}

/// Takes the next slice when `present`.
fn next_if<'a>(present: bool, it: &mut impl Iterator<Item = &'a [f32]>) -> Option<&'a [f32]> {
    if present {
        it.next()
    } else {
        None
    }
}

/// Which optional inputs a call passed.
#[derive(Debug, Clone, Copy)]
struct Present {
    d: bool,
    z: bool,
    bias: bool,
    init: bool,
}

fn present_inputs<'a>(
    required: Vec<&'a Tensor>,
    optional: [Option<&'a Tensor>; 4],
) -> (Vec<&'a Tensor>, Present) {
    let present = Present {
        d: optional[0].is_some(),
        z: optional[1].is_some(),
        bias: optional[2].is_some(),
        init: optional[3].is_some(),
    };
    (
        required
            .into_iter()
            .chain(optional.into_iter().flatten())
            .collect(),
        present,
    )
}

// ---------------------------------------------------------------------------------------
// Selective scan (token-major)

struct ScanKernel {
    dims: ScanDims,
    present: Present,
    softplus: bool,
}

impl ScanKernel {
    fn inputs<'a>(&self, v: &[&'a [f32]]) -> ScanInputs<'a> {
        let mut rest = v[5..].iter().copied();
        ScanInputs {
            u: v[0],
            delta: v[1],
            a: v[2],
            b: v[3],
            c: v[4],
            d: next_if(self.present.d, &mut rest),
            z: next_if(self.present.z, &mut rest),
            delta_bias: next_if(self.present.bias, &mut rest),
            delta_softplus: self.softplus,
            initial_state: next_if(self.present.init, &mut rest),
        }
    }
}

impl PackedKernel for ScanKernel {
    const NAME: &'static str = "selective_scan";

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = selective_scan_token_major(&self.dims, &self.inputs(inputs))?;
        Ok([out.out, out.last_state].concat())
    }

    /// The backward kernel works channel-major: transpose in, run it, transpose back.
    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        let x = self.inputs(inputs);
        let (b, d, l) = (self.dims.batch, self.dims.dim, self.dims.len);
        let BcForm::Varying { groups } = self.dims.bc else {
            unreachable!("the tensor scan always takes varying B and C")
        };
        let gn = groups * self.dims.state;
        let to_channels = |v: &[f32], width: usize| swap_inner(v, b, l, width);
        let to_tokens = |v: &[f32], width: usize| swap_inner(v, b, width, l);
        let (u, delta, bm, cm) = (
            to_channels(x.u, d),
            to_channels(x.delta, d),
            to_channels(x.b, gn),
            to_channels(x.c, gn),
        );
        let z = x.z.map(|z| to_channels(z, d));
        let channel_major = ScanInputs {
            u: &u,
            delta: &delta,
            b: &bm,
            c: &cm,
            z: z.as_deref(),
            ..x
        };
        let (grad_y, grad_last) = grad_out.split_at(b * l * d);
        let g = selective_scan_backward(
            &self.dims,
            &channel_major,
            &to_channels(grad_y, d),
            Some(grad_last),
        )?;
        Ok(concat_grads([
            Some(to_tokens(&g.u, d)),
            Some(to_tokens(&g.delta, d)),
            Some(g.a),
            Some(to_tokens(&g.b, gn)),
            Some(to_tokens(&g.c, gn)),
            g.d,
            g.z.map(|z| to_tokens(&z, d)),
            g.delta_bias,
            g.initial_state,
        ]))
    }
}

/// Options of [`selective_scan`] beyond its main inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanOptions<'a> {
    /// `(dim)`: skip connection `D * u`.
    pub d: Option<&'a Tensor>,
    /// `(batch, L, dim)`: output gate `silu(z)`.
    pub z: Option<&'a Tensor>,
    /// `(dim)`: added to Δ before the softplus.
    pub delta_bias: Option<&'a Tensor>,
    pub delta_softplus: bool,
    /// `(batch, dim, N)`.
    pub initial_state: Option<&'a Tensor>,
}

/// Mamba-1 selective scan on token-major tensors: `u, delta: (batch, L, dim)`,
/// `a: (dim, N)`, `b, c: (batch, L, G, N)`; returns `out: (batch, L, dim)` and the last
/// state `(batch, dim, N)`. Differentiable with respect to every tensor input.
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: ScanOptions,
) -> crate::Result<(Tensor, Tensor)> {
    let (batch, len, dim) = u.dims3()?;
    let (_, _, groups, state) = b.dims4()?;
    let dims = ScanDims {
        batch,
        dim,
        len,
        state,
        bc: BcForm::Varying { groups },
    };
    let (inputs, present) = present_inputs(
        vec![u, delta, a, b, c],
        [opts.d, opts.z, opts.delta_bias, opts.initial_state],
    );
    let kernel = ScanKernel {
        dims,
        present,
        softplus: opts.delta_softplus,
    };
    let mut out = apply(kernel, &inputs, &[&[batch, len, dim], &[batch, dim, state]])?;
    let last = out.pop().expect("two outputs");
    Ok((out.pop().expect("two outputs"), last))
}

// ---------------------------------------------------------------------------------------
// Causal conv1d (channel-major)

struct ConvKernel {
    dims: ConvDims,
    has_bias: bool,
    has_init: bool,
    silu: bool,
}

impl ConvKernel {
    fn inputs<'a>(&self, v: &[&'a [f32]]) -> ConvInputs<'a> {
        let mut rest = v[2..].iter().copied();
        ConvInputs {
            x: v[0],
            weight: v[1],
            bias: next_if(self.has_bias, &mut rest),
            initial_states: next_if(self.has_init, &mut rest),
            silu: self.silu,
        }
    }
}

impl PackedKernel for ConvKernel {
    const NAME: &'static str = "causal_conv1d";

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = conv_fwd(&self.dims, &self.inputs(inputs))?;
        Ok([out.out, out.final_states].concat())
    }

    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        let n = self.dims.batch * self.dims.dim * self.dims.len;
        let (grad_y, grad_final) = grad_out.split_at(n);
        let g = causal_conv1d_backward(&self.dims, &self.inputs(inputs), grad_y, Some(grad_final))?;
        Ok(concat_grads([
            Some(g.x),
            Some(g.weight),
            g.bias,
            g.initial_states,
        ]))
    }
}

/// Depthwise causal conv1d: `x: (batch, dim, L)`, `weight: (dim, W)`, optional
/// `bias: (dim)` and `initial_states: (batch, dim, W-1)`; returns `out: (batch, dim, L)`
/// and `final_states: (batch, dim, W-1)`. Differentiable.
pub fn causal_conv1d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    initial_states: Option<&Tensor>,
    silu: bool,
) -> crate::Result<(Tensor, Tensor)> {
    let (batch, dim, len) = x.dims3()?;
    let width = weight.elem_count() / dim.max(1);
    let dims = ConvDims {
        batch,
        dim,
        len,
        width,
    };
    let inputs: Vec<&Tensor> = [Some(x), Some(weight), bias, initial_states]
        .into_iter()
        .flatten()
        .collect();
    let kernel = ConvKernel {
        dims,
        has_bias: bias.is_some(),
        has_init: initial_states.is_some(),
        silu,
    };
    let keep = width.saturating_sub(1);
    let mut out = apply(kernel, &inputs, &[&[batch, dim, len], &[batch, dim, keep]])?;
    let final_states = out.pop().expect("two outputs");
    Ok((out.pop().expect("two outputs"), final_states))
}

// ---------------------------------------------------------------------------------------
// SSD

struct SsdKernel {
    dims: SsdDims,
    present: Present,
    softplus: bool,
    dt_limit: (f32, f32),
}

impl SsdKernel {
    fn inputs<'a>(&self, v: &[&'a [f32]]) -> SsdInputs<'a> {
        let mut rest = v[5..].iter().copied();
        SsdInputs {
            x: v[0],
            dt: v[1],
            a: v[2],
            b: v[3],
            c: v[4],
            d: next_if(self.present.d, &mut rest),
            z: next_if(self.present.z, &mut rest),
            dt_bias: next_if(self.present.bias, &mut rest),
            dt_softplus: self.softplus,
            dt_limit: self.dt_limit,
            initial_states: next_if(self.present.init, &mut rest),
        }
    }
}

impl PackedKernel for SsdKernel {
    const NAME: &'static str = "ssd";

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = ssd_fwd(&self.dims, &self.inputs(inputs))?;
        Ok([out.y, out.final_state].concat())
    }

    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        let d = &self.dims;
        let (grad_y, grad_final) = grad_out.split_at(d.batch * d.len * d.heads * d.head_dim);
        let g = ssd_backward(d, &self.inputs(inputs), grad_y, Some(grad_final))?;
        Ok(concat_grads([
            Some(g.x),
            Some(g.dt),
            Some(g.a),
            Some(g.b),
            Some(g.c),
            g.d,
            g.z,
            g.dt_bias,
            g.initial_states,
        ]))
    }
}

/// Options of [`ssd`] beyond its main inputs.
#[derive(Debug, Clone, Copy)]
pub struct SsdOptions<'a> {
    /// `(H)` or `(H, P)`.
    pub d: Option<&'a Tensor>,
    /// `(batch, L, H, P)`.
    pub z: Option<&'a Tensor>,
    /// `(H)`.
    pub dt_bias: Option<&'a Tensor>,
    pub dt_softplus: bool,
    pub dt_limit: (f32, f32),
    /// `(batch, H, P, N)`.
    pub initial_states: Option<&'a Tensor>,
    pub chunk_size: usize,
}

impl Default for SsdOptions<'_> {
    fn default() -> Self {
        SsdOptions {
            d: None,
            z: None,
            dt_bias: None,
            dt_softplus: false,
            dt_limit: NO_DT_LIMIT,
            initial_states: None,
            chunk_size: 256,
        }
    }
}

/// Mamba-2 SSD scan: `x: (batch, L, H, P)`, `dt: (batch, L, H)`, `a: (H)`,
/// `b, c: (batch, L, G, N)`; returns `y: (batch, L, H, P)` and the final state
/// `(batch, H, P, N)`. Differentiable.
pub fn ssd(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: SsdOptions,
) -> crate::Result<(Tensor, Tensor)> {
    let (batch, len, heads, head_dim) = x.dims4()?;
    let (_, _, groups, state) = b.dims4()?;
    let dims = SsdDims {
        batch,
        len,
        heads,
        head_dim,
        groups,
        state,
        chunk_size: opts.chunk_size,
    };
    let (inputs, present) = present_inputs(
        vec![x, dt, a, b, c],
        [opts.d, opts.z, opts.dt_bias, opts.initial_states],
    );
    let kernel = SsdKernel {
        dims,
        present,
        softplus: opts.dt_softplus,
        dt_limit: opts.dt_limit,
    };
    let mut out = apply(
        kernel,
        &inputs,
        &[
            &[batch, len, heads, head_dim],
            &[batch, heads, head_dim, state],
        ],
    )?;
    let last = out.pop().expect("two outputs");
    Ok((out.pop().expect("two outputs"), last))
}

// ---------------------------------------------------------------------------------------
// Gated RMSNorm

struct NormKernel {
    dims: NormDims,
    has_z: bool,
}

impl PackedKernel for NormKernel {
    const NAME: &'static str = "rmsnorm_gated";

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        norm_fwd(
            &self.dims,
            inputs[0],
            inputs[1],
            self.has_z.then(|| inputs[2]),
        )
    }

    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        let g = rmsnorm_gated_backward(
            &self.dims,
            inputs[0],
            inputs[1],
            self.has_z.then(|| inputs[2]),
            grad_out,
        )?;
        Ok(concat_grads([Some(g.x), Some(g.weight), g.z]))
    }
}

/// Gated, grouped RMSNorm over the last dimension of `x` (see [`crate::rmsnorm_gated`]).
/// Differentiable.
pub fn rmsnorm_gated(
    x: &Tensor,
    weight: &Tensor,
    z: Option<&Tensor>,
    group_size: usize,
    eps: f32,
    norm_before_gate: bool,
) -> crate::Result<Tensor> {
    let hidden = weight.elem_count();
    let dims = NormDims {
        rows: x.elem_count() / hidden.max(1),
        hidden,
        group_size,
        eps,
        norm_before_gate,
    };
    let inputs: Vec<&Tensor> = [Some(x), Some(weight), z].into_iter().flatten().collect();
    let shape = x.dims().to_vec();
    let mut out = apply(
        NormKernel {
            dims,
            has_z: z.is_some(),
        },
        &inputs,
        &[&shape],
    )?;
    Ok(out.pop().expect("one output"))
}
