//! The ops as candle tensor operations with a backward pass, so that models can run them
//! inside candle's autograd (training) as well as plainly (inference).
//!
//! Each op is a [`candle_core::CustomOp1`] over its inputs packed into one flat tensor
//! (candle's custom ops take at most three arguments; packing by `cat` is itself
//! differentiable, so every input receives its gradient). On the CPU the forward runs the fast
//! CPU kernel of the op's module; on a CUDA device (cargo feature `cuda`) it runs the op's CUDA
//! kernel (see `crate::cuda`), reading bf16 directly when every input is bf16. Outputs are f32.
//! The backward of a tensor on a CUDA device runs the op's CUDA backward kernels where it has
//! them (gated RMSNorm, causal conv1d, the selective scan, the SSD); where the SSD's chunk
//! does not fit the device's shared memory it recomputes its forward as differentiable batched
//! products ([`crate::ssd_graph`]) and lets candle's autograd differentiate them there;
//! otherwise (sizes a kernel does not cover) the inputs go to the host for the fast CPU
//! backward kernel and the gradients come back. On the CPU every op
//! runs its fast CPU backward kernel.
//!
//! Every op comes in two forms: `op(...)` returns its outputs, and `op_call(...)` returns a
//! [`PackedCall`], the inputs already packed, whose [`PackedCall::run`] launches only the kernel
//! (so that benchmarks can time it apart from the packing).

use crate::causal_conv1d::{
    causal_conv1d as conv_fwd, causal_conv1d_backward, causal_conv1d_update as conv_update_fwd,
    ConvDims, ConvInputs, ConvUpdateDims, ConvUpdateInputs,
};
#[cfg(feature = "cuda")]
use crate::cuda;
use crate::error::OpError;
use crate::layout::swap_inner;
use crate::math::NO_DT_LIMIT;
use crate::rmsnorm_gated::{rmsnorm_gated as norm_fwd, rmsnorm_gated_backward, NormDims};
use crate::selective_scan::{
    selective_scan_backward, selective_scan_token_major, BcForm, ScanDims, ScanInputs,
};
use crate::selective_state_update::{selective_state_update as step_fwd, StepDims, StepInputs};
use crate::ssd::{ssd as ssd_fwd, ssd_backward, SsdDims, SsdInputs};
use crate::ssd_graph::ssd_chunked;
#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::cudarc::driver::{CudaSlice, CudaView},
    op::BackpropOp,
    CudaStorage, Storage,
};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, Var};
use std::sync::Arc;

/// A kernel over packed inputs: the inputs' flat slices in, the outputs' flat values out.
trait PackedKernel: Send + Sync + 'static {
    const NAME: &'static str;
    /// The element count each present input must have, by name, in packing order; or why the
    /// sizes cannot work.
    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>>;
    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>>;
    /// The forward on the GPU, writing the same flat output as [`PackedKernel::forward`].
    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>>;
    /// The backward on the GPU, given the output's gradient (f32, the flat output's layout):
    /// the same flat gradients as [`PackedKernel::backward`] in the packed inputs' type, or
    /// `None` where the op has no GPU backward for these sizes (the caller then runs the CPU
    /// backward).
    #[cfg(feature = "cuda")]
    fn cuda_backward<G: cuda::GradType>(
        &self,
        _packed: &cuda::Packed,
        _grad_out: &CudaView<f32>,
    ) -> candle_core::Result<Option<CudaSlice<G>>> {
        Ok(None)
    }
    /// Gradients of every input, concatenated in input order.
    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>>;
    /// The backward through differentiable tensor operations on the packed input's own
    /// device (the flat gradients of [`PackedKernel::backward`]), for an op whose GPU backward
    /// is written that way; `None` for the others.
    fn tensor_backward(
        &self,
        _packed: &Tensor,
        _grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

struct PackedOp<K> {
    kernel: K,
    sizes: Vec<usize>,
    /// Elements of the flat output.
    out_len: usize,
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

fn shape_err(op: &'static str, msg: String) -> OpError {
    OpError::Shape { op, msg }
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
        if out.len() != self.out_len {
            return Err(candle_core::Error::Msg(format!(
                "{}: {} output values, expected {}",
                K::NAME,
                out.len(),
                self.out_len
            )));
        }
        Ok((CpuStorage::F32(out), Shape::from(self.out_len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let packed = cuda::Packed::new(storage, layout, &self.sizes)?;
        let out = self.kernel.cuda_forward(&packed)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, packed.device().clone()),
            Shape::from(self.out_len),
        ))
    }

    /// Runs the GPU backward kernels for a tensor on a CUDA device where the op has them, or
    /// its backward through tensor operations there, else the CPU backward kernel (tensors on
    /// a GPU go to the host and their gradients back).
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(grads) = self.cuda_bwd(arg, grad_res)? {
            return Ok(Some(grads.to_dtype(arg.dtype())?));
        }
        if arg.device().is_cuda() {
            if let Some(grads) = self.kernel.tensor_backward(arg, grad_res)? {
                return Ok(Some(grads.to_dtype(arg.dtype())?));
            }
        }
        let inputs = arg.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad_out = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grads = self
            .kernel
            .backward(&split(&inputs, &self.sizes), &grad_out)
            .map_err(to_candle)?;
        let grads = Tensor::from_vec(grads, arg.shape(), arg.device())?;
        Ok(Some(grads.to_dtype(arg.dtype())?))
    }
}

#[cfg(feature = "cuda")]
impl<K: PackedKernel> PackedOp<K> {
    /// The gradients of the packed input `arg` (in its type) from the GPU backward kernels, or
    /// `None` when `arg` is not on a CUDA device or the op has no GPU backward for its sizes.
    fn cuda_bwd(&self, arg: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !arg.device().is_cuda() {
            return Ok(None);
        }
        let grad = grad_res.to_dtype(DType::F32)?.contiguous()?;
        if grad.elem_count() != self.out_len {
            return Err(candle_core::Error::Msg(format!(
                "{}: output gradient has {} values, expected {}",
                K::NAME,
                grad.elem_count(),
                self.out_len
            )));
        }
        let (arg_storage, arg_layout) = arg.storage_and_layout();
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let (Storage::Cuda(arg_storage), Storage::Cuda(grad_storage)) =
            (&*arg_storage, &*grad_storage)
        else {
            return Ok(None);
        };
        let packed = cuda::Packed::new(arg_storage, arg_layout, &self.sizes)?;
        let (start, end) = grad_layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: output gradient not contiguous", K::NAME))
        })?;
        let grad_view = grad_storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = packed.device().clone();
        let grads = if packed.is_bf16() {
            let grads = self
                .kernel
                .cuda_backward::<half::bf16>(&packed, &grad_view)?;
            grads.map(|g| CudaStorage::wrap_cuda_slice(g, device))
        } else {
            let grads = self.kernel.cuda_backward::<f32>(&packed, &grad_view)?;
            grads.map(|g| CudaStorage::wrap_cuda_slice(g, device))
        };
        let Some(storage) = grads else {
            return Ok(None);
        };
        Ok(Some(Tensor::from_storage(
            Storage::Cuda(storage),
            arg.shape(),
            BackpropOp::none(),
            false,
        )))
    }
}

/// An op call with its inputs packed into one flat tensor, ready to run.
pub struct PackedCall {
    packed: Tensor,
    op: Arc<Box<dyn CustomOp1 + Send + Sync>>,
    out_shapes: Vec<Vec<usize>>,
}

impl PackedCall {
    /// The packed inputs: bf16 when every input is bf16 and on a CUDA device, else f32.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The op's backward alone, as autograd runs it: the gradient of the packed inputs (flat,
    /// in the packed tensor's dtype) from the gradient of the flat output, all outputs one
    /// after another. Runs the GPU backward kernels for inputs on a CUDA device where the op
    /// has them.
    pub fn backward(&self, grad_out: &Tensor) -> crate::Result<Tensor> {
        let name = self.op.name();
        self.op
            .bwd(&self.packed, &self.packed, grad_out)?
            .ok_or_else(|| shape_err(name, "no gradient".into()))
    }

    /// Runs the op's kernel on the packed inputs and splits its flat output into the op's
    /// outputs (views, no copies). Differentiable where the op is.
    pub fn run(&self) -> crate::Result<Vec<Tensor>> {
        let out = self.packed.apply_op1_arc(self.op.clone())?;
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(self.out_shapes.len());
        for shape in &self.out_shapes {
            let n: usize = shape.iter().product();
            outputs.push(out.narrow(0, offset, n)?.reshape(shape.as_slice())?);
            offset += n;
        }
        Ok(outputs)
    }
}

/// Packs `inputs` into one flat tensor: bf16 when every input is bf16 and on a CUDA device (the
/// GPU kernels read bf16 themselves), else f32.
fn pack(inputs: &[&Tensor]) -> crate::Result<Tensor> {
    let all_bf16_on_gpu = inputs
        .iter()
        .all(|t| t.dtype() == DType::BF16 && t.device().is_cuda());
    let dtype = if all_bf16_on_gpu && !inputs.is_empty() {
        DType::BF16
    } else {
        DType::F32
    };
    let flat = inputs
        .iter()
        .map(|t| t.to_dtype(dtype)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// Checks every input's element count against what the kernel expects.
fn check_sizes(
    op: &'static str,
    expected: &[(&'static str, usize)],
    inputs: &[&Tensor],
) -> crate::Result<()> {
    if expected.len() != inputs.len() {
        return Err(shape_err(
            op,
            format!("{} inputs, expected {}", inputs.len(), expected.len()),
        ));
    }
    for ((name, want), t) in expected.iter().zip(inputs) {
        if t.elem_count() != *want {
            return Err(shape_err(
                op,
                format!(
                    "{name} {:?} has {} elements, expected {want}",
                    t.dims(),
                    t.elem_count()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks and packs `inputs` for `kernel`, whose flat output splits into `out_shapes`.
fn prepare<K: PackedKernel>(
    kernel: K,
    inputs: &[&Tensor],
    out_shapes: &[&[usize]],
) -> crate::Result<PackedCall> {
    check_sizes(K::NAME, &kernel.input_sizes()?, inputs)?;
    let sizes = inputs.iter().map(|t| t.elem_count()).collect();
    let out_len = out_shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    Ok(PackedCall {
        packed: pack(inputs)?,
        op: Arc::new(Box::new(PackedOp {
            kernel,
            sizes,
            out_len,
        })),
        out_shapes: out_shapes.iter().map(|s| s.to_vec()).collect(),
    })
}

/// The two outputs of a call.
fn two(op: &'static str, outputs: Vec<Tensor>) -> crate::Result<(Tensor, Tensor)> {
    let [first, second]: [Tensor; 2] = outputs
        .try_into()
        .map_err(|v: Vec<Tensor>| shape_err(op, format!("{} outputs, expected 2", v.len())))?;
    Ok((first, second))
}

/// The inputs that are present, by name and element count, in packing order.
fn present_sizes<const K: usize>(
    sizes: [(&'static str, Option<usize>); K],
) -> Vec<(&'static str, usize)> {
    sizes
        .into_iter()
        .filter_map(|(name, n)| n.map(|n| (name, n)))
        .collect()
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
pub(crate) struct Present {
    pub d: bool,
    pub z: bool,
    pub bias: bool,
    pub init: bool,
}

impl Present {
    /// Which inputs of an op with five required ones (the scan's and the SSD's) are packed, in
    /// packing order: the five, then D, z, the bias and the initial state.
    #[cfg(feature = "cuda")]
    pub(crate) fn after_five_required(self) -> [bool; 9] {
        [
            true, true, true, true, true, self.d, self.z, self.bias, self.init,
        ]
    }
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
    groups: usize,
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

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if self.groups == 0 || !d.dim.is_multiple_of(self.groups) {
            return Err(shape_err(
                Self::NAME,
                format!("dim {} is not a multiple of groups {}", d.dim, self.groups),
            ));
        }
        let tokens = d.batch * d.len * d.dim;
        let bc = d.batch * d.len * self.groups * d.state;
        let p = self.present;
        Ok(present_sizes([
            ("u", Some(tokens)),
            ("delta", Some(tokens)),
            ("A", Some(d.dim * d.state)),
            ("B", Some(bc)),
            ("C", Some(bc)),
            ("D", p.d.then_some(d.dim)),
            ("z", p.z.then_some(tokens)),
            ("delta_bias", p.bias.then_some(d.dim)),
            ("initial_state", p.init.then_some(d.batch * d.dim * d.state)),
        ]))
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = selective_scan_token_major(&self.dims, &self.inputs(inputs))?;
        Ok([out.out, out.last_state].concat())
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::selective_scan(packed, &self.dims, self.groups, self.present, self.softplus)
    }

    #[cfg(feature = "cuda")]
    fn cuda_backward<G: cuda::GradType>(
        &self,
        packed: &cuda::Packed,
        grad_out: &CudaView<f32>,
    ) -> candle_core::Result<Option<CudaSlice<G>>> {
        cuda::selective_scan_backward(
            packed,
            &self.dims,
            self.groups,
            self.present,
            self.softplus,
            grad_out,
        )
    }

    /// The backward kernel works channel-major: transpose in, run it, transpose back.
    fn backward(&self, inputs: &[&[f32]], grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        let x = self.inputs(inputs);
        let (b, d, l) = (self.dims.batch, self.dims.dim, self.dims.len);
        let gn = self.groups * self.dims.state;
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
    two(
        "selective_scan",
        selective_scan_call(u, delta, a, b, c, opts)?.run()?,
    )
}

/// [`selective_scan`] packed, ready to run.
pub fn selective_scan_call(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: ScanOptions,
) -> crate::Result<PackedCall> {
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
        groups,
        present,
        softplus: opts.delta_softplus,
    };
    prepare(kernel, &inputs, &[&[batch, len, dim], &[batch, dim, state]])
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

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if d.width == 0 {
            return Err(shape_err(Self::NAME, "width must be at least 1".into()));
        }
        let rows = d.batch * d.dim;
        Ok(present_sizes([
            ("x", Some(rows * d.len)),
            ("weight", Some(d.dim * d.width)),
            ("bias", self.has_bias.then_some(d.dim)),
            (
                "initial_states",
                self.has_init.then_some(rows * (d.width - 1)),
            ),
        ]))
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = conv_fwd(&self.dims, &self.inputs(inputs))?;
        Ok([out.out, out.final_states].concat())
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::causal_conv1d(packed, &self.dims, self.has_bias, self.has_init, self.silu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_backward<G: cuda::GradType>(
        &self,
        packed: &cuda::Packed,
        grad_out: &CudaView<f32>,
    ) -> candle_core::Result<Option<CudaSlice<G>>> {
        cuda::causal_conv1d_backward(
            packed,
            &self.dims,
            self.has_bias,
            self.has_init,
            self.silu,
            grad_out,
        )
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
    two(
        "causal_conv1d",
        causal_conv1d_call(x, weight, bias, initial_states, silu)?.run()?,
    )
}

/// [`causal_conv1d`] packed, ready to run.
pub fn causal_conv1d_call(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    initial_states: Option<&Tensor>,
    silu: bool,
) -> crate::Result<PackedCall> {
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
    prepare(kernel, &inputs, &[&[batch, dim, len], &[batch, dim, keep]])
}

// ---------------------------------------------------------------------------------------
// Causal conv1d decoding update

struct ConvUpdateKernel {
    dims: ConvUpdateDims,
    has_bias: bool,
    silu: bool,
}

impl PackedKernel for ConvUpdateKernel {
    const NAME: &'static str = "causal_conv1d_update";

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if d.width == 0 || d.state_len + 1 < d.width {
            return Err(shape_err(
                Self::NAME,
                format!(
                    "conv_state keeps {} steps, the width {} needs at least width-1",
                    d.state_len, d.width
                ),
            ));
        }
        let rows = d.batch * d.dim;
        Ok(present_sizes([
            ("conv_state", Some(rows * d.state_len)),
            ("x", Some(rows * d.steps)),
            ("weight", Some(d.dim * d.width)),
            ("bias", self.has_bias.then_some(d.dim)),
        ]))
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let mut state = inputs[0].to_vec();
        let x = ConvUpdateInputs {
            x: inputs[1],
            weight: inputs[2],
            bias: self.has_bias.then(|| inputs[3]),
            silu: self.silu,
        };
        let out = conv_update_fwd(&self.dims, &mut state, &x)?;
        Ok([out, state].concat())
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::causal_conv1d_update(packed, &self.dims, self.has_bias, self.silu)
    }

    fn backward(&self, _inputs: &[&[f32]], _grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        Err(OpError::NoBackward { op: Self::NAME })
    }
}

/// One decoding update of the causal convolution: `conv_state: (batch, dim, S)` (oldest first,
/// `S >= W-1`), `x: (batch, dim)` or `(batch, dim, T)` new inputs, `weight: (dim, W)`, optional
/// `bias: (dim)`; returns the outputs, shaped like `x`, and the new state `(batch, dim, S)`
/// (see [`crate::causal_conv1d::causal_conv1d_update`]). Not differentiable.
pub fn causal_conv1d_update(
    conv_state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> crate::Result<(Tensor, Tensor)> {
    two(
        "causal_conv1d_update",
        causal_conv1d_update_call(conv_state, x, weight, bias, silu)?.run()?,
    )
}

/// [`causal_conv1d_update`] packed, ready to run.
pub fn causal_conv1d_update_call(
    conv_state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> crate::Result<PackedCall> {
    let (batch, dim, state_len) = conv_state.dims3()?;
    let steps = match x.dims() {
        &[_, _] => 1,
        &[_, _, t] => t,
        other => {
            return Err(shape_err(
                "causal_conv1d_update",
                format!("x must be (batch, dim) or (batch, dim, T), not {other:?}"),
            ))
        }
    };
    let dims = ConvUpdateDims {
        batch,
        dim,
        width: weight.elem_count() / dim.max(1),
        state_len,
        steps,
    };
    let inputs: Vec<&Tensor> = [Some(conv_state), Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .collect();
    let kernel = ConvUpdateKernel {
        dims,
        has_bias: bias.is_some(),
        silu,
    };
    prepare(kernel, &inputs, &[x.dims(), conv_state.dims()])
}

// ---------------------------------------------------------------------------------------
// Selective state update (one decoding step)

struct StepKernel {
    dims: StepDims,
    present: Present,
    softplus: bool,
    dt_limit: (f32, f32),
}

impl PackedKernel for StepKernel {
    const NAME: &'static str = "selective_state_update";

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if d.groups == 0 || !d.heads.is_multiple_of(d.groups) {
            return Err(shape_err(
                Self::NAME,
                format!("heads {} is not a multiple of groups {}", d.heads, d.groups),
            ));
        }
        let rows = d.batch * d.heads * d.head_dim;
        let (a, param) = if d.per_head {
            (d.heads, d.heads)
        } else {
            (d.heads * d.head_dim * d.state, d.heads * d.head_dim)
        };
        let bc = d.batch * d.groups * d.state;
        let p = self.present;
        Ok(present_sizes([
            ("state", Some(rows * d.state)),
            ("x", Some(rows)),
            ("dt", Some(d.batch * param)),
            ("A", Some(a)),
            ("B", Some(bc)),
            ("C", Some(bc)),
            ("D", p.d.then_some(param)),
            ("z", p.z.then_some(rows)),
            ("dt_bias", p.bias.then_some(param)),
        ]))
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let mut state = inputs[0].to_vec();
        let mut rest = inputs[6..].iter().copied();
        let x = StepInputs {
            x: inputs[1],
            dt: inputs[2],
            a: inputs[3],
            b: inputs[4],
            c: inputs[5],
            d: next_if(self.present.d, &mut rest),
            z: next_if(self.present.z, &mut rest),
            dt_bias: next_if(self.present.bias, &mut rest),
            dt_softplus: self.softplus,
            dt_limit: self.dt_limit,
        };
        let y = step_fwd(&self.dims, &mut state, &x)?;
        Ok([y, state].concat())
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::selective_state_update(
            packed,
            &self.dims,
            self.present,
            self.softplus,
            self.dt_limit,
        )
    }

    fn backward(&self, _inputs: &[&[f32]], _grad_out: &[f32]) -> crate::Result<Vec<f32>> {
        Err(OpError::NoBackward { op: Self::NAME })
    }
}

/// Options of [`selective_state_update`] beyond its main inputs.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions<'a> {
    /// Skip connection `D * x`: shaped like `dt_bias`.
    pub d: Option<&'a Tensor>,
    /// Output gate `silu(z)`: shaped like `x`.
    pub z: Option<&'a Tensor>,
    /// Added to Δ before the softplus: `(H)` when `A` is per head, else `(H, P)` (`(dim)` for
    /// Mamba-1).
    pub dt_bias: Option<&'a Tensor>,
    pub dt_softplus: bool,
    /// Clamp of Δ after the softplus (Mamba-2's `time_step_limit`).
    pub dt_limit: (f32, f32),
}

impl Default for StepOptions<'_> {
    fn default() -> Self {
        StepOptions {
            d: None,
            z: None,
            dt_bias: None,
            dt_softplus: false,
            dt_limit: NO_DT_LIMIT,
        }
    }
}

/// One decoding step of the selective SSM (see [`crate::selective_state_update`]). Mamba-1
/// form: `state: (batch, dim, N)`, `x, dt: (batch, dim)`, `a: (dim, N)`, `b, c: (batch, N)`.
/// Heads form: `state: (batch, H, P, N)`, `x: (batch, H, P)`, `b, c: (batch, G, N)`, and either
/// `a: (H)` with `dt: (batch, H)` (one value per head, as Mamba-2 holds them) or
/// `a: (H, P, N)` with `dt: (batch, H, P)`. Returns `y`, shaped like `x`, and the new state.
/// Not differentiable.
pub fn selective_state_update(
    state: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: StepOptions,
) -> crate::Result<(Tensor, Tensor)> {
    two(
        "selective_state_update",
        selective_state_update_call(state, x, dt, a, b, c, opts)?.run()?,
    )
}

/// [`selective_state_update`] packed, ready to run.
pub fn selective_state_update_call(
    state: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: StepOptions,
) -> crate::Result<PackedCall> {
    let (batch, heads, head_dim, n) = match *state.dims() {
        [batch, dim, n] => (batch, dim, 1, n),
        [batch, h, p, n] => (batch, h, p, n),
        ref other => {
            return Err(shape_err(
                "selective_state_update",
                format!("state must be (batch, dim, N) or (batch, H, P, N), not {other:?}"),
            ))
        }
    };
    let groups = match *b.dims() {
        [_, g, _] => g,
        _ => 1,
    };
    let dims = StepDims {
        batch,
        heads,
        head_dim,
        state: n,
        groups,
        per_head: state.rank() == 4 && a.rank() == 1,
    };
    let (inputs, present) = present_inputs(
        vec![state, x, dt, a, b, c],
        [opts.d, opts.z, opts.dt_bias, None],
    );
    let kernel = StepKernel {
        dims,
        present,
        softplus: opts.dt_softplus,
        dt_limit: opts.dt_limit,
    };
    prepare(kernel, &inputs, &[x.dims(), state.dims()])
}

// ---------------------------------------------------------------------------------------
// SSD

struct SsdKernel {
    dims: SsdDims,
    present: Present,
    /// `D` is `(H, P)` rather than `(H)`.
    d_per_p: bool,
    softplus: bool,
    dt_limit: (f32, f32),
}

impl SsdKernel {
    #[cfg(feature = "cuda")]
    fn flags(&self) -> cuda::SsdFlags {
        cuda::SsdFlags {
            present: self.present,
            d_per_p: self.d_per_p,
            softplus: self.softplus,
            dt_limit: self.dt_limit,
        }
    }

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

impl SsdKernel {
    /// The shape of each present input, by name, in packing order.
    fn input_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let d = &self.dims;
        let tokens = vec![d.batch, d.len, d.heads, d.head_dim];
        let bc = vec![d.batch, d.len, d.groups, d.state];
        let skip = if self.d_per_p {
            vec![d.heads, d.head_dim]
        } else {
            vec![d.heads]
        };
        let p = self.present;
        [
            ("x", Some(tokens.clone())),
            ("dt", Some(vec![d.batch, d.len, d.heads])),
            ("A", Some(vec![d.heads])),
            ("B", Some(bc.clone())),
            ("C", Some(bc)),
            ("D", p.d.then_some(skip)),
            ("z", p.z.then_some(tokens)),
            ("dt_bias", p.bias.then(|| vec![d.heads])),
            (
                "initial_states",
                p.init.then(|| vec![d.batch, d.heads, d.head_dim, d.state]),
            ),
        ]
        .into_iter()
        .filter_map(|(name, shape)| shape.map(|s| (name, s)))
        .collect()
    }
}

/// Chunk length of the SSD's backward through tensor operations (as the GPU forward's).
const SSD_GRAPH_CHUNK: usize = 64;

impl PackedKernel for SsdKernel {
    const NAME: &'static str = "ssd";

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if d.groups == 0 || !d.heads.is_multiple_of(d.groups) {
            return Err(shape_err(
                Self::NAME,
                format!("heads {} is not a multiple of groups {}", d.heads, d.groups),
            ));
        }
        if d.chunk_size == 0 {
            return Err(shape_err(
                Self::NAME,
                "chunk_size must be at least 1".into(),
            ));
        }
        Ok(self
            .input_shapes()
            .into_iter()
            .map(|(name, shape)| (name, shape.iter().product()))
            .collect())
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        let out = ssd_fwd(&self.dims, &self.inputs(inputs))?;
        Ok([out.y, out.final_state].concat())
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::ssd(packed, &self.dims, self.flags())
    }

    #[cfg(feature = "cuda")]
    fn cuda_backward<G: cuda::GradType>(
        &self,
        packed: &cuda::Packed,
        grad_out: &CudaView<f32>,
    ) -> candle_core::Result<Option<CudaSlice<G>>> {
        cuda::ssd_backward(packed, &self.dims, self.flags(), grad_out)
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

    /// Recomputes the forward as [`ssd_chunked`] on the packed input's device, with each input
    /// a fresh variable, and differentiates `sum(y gy) + sum(final gf)`.
    fn tensor_backward(
        &self,
        packed: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let flat = packed.to_dtype(DType::F32)?.detach();
        let mut offset = 0;
        let mut vars = Vec::new();
        for (_, shape) in self.input_shapes() {
            let n: usize = shape.iter().product();
            vars.push(Var::from_tensor(
                &flat.narrow(0, offset, n)?.reshape(shape)?,
            )?);
            offset += n;
        }
        let mut rest = vars[5..].iter().map(Var::as_tensor);
        let p = self.present;
        let opts = SsdOptions {
            d: p.d.then(|| rest.next()).flatten(),
            z: p.z.then(|| rest.next()).flatten(),
            dt_bias: p.bias.then(|| rest.next()).flatten(),
            dt_softplus: self.softplus,
            dt_limit: self.dt_limit,
            initial_states: p.init.then(|| rest.next()).flatten(),
            chunk_size: SSD_GRAPH_CHUNK,
        };
        let t = |i: usize| vars[i].as_tensor();
        let (y, last) = ssd_chunked(t(0), t(1), t(2), t(3), t(4), &opts)?;
        let grad_out = grad_out.to_dtype(DType::F32)?;
        let grad_y = grad_out.narrow(0, 0, y.elem_count())?.reshape(y.shape())?;
        let grad_last = grad_out
            .narrow(0, y.elem_count(), last.elem_count())?
            .reshape(last.shape())?;
        let objective = ((y * grad_y)?.sum_all()? + (last * grad_last)?.sum_all()?)?;
        let store = objective.backward()?;
        let grads = vars
            .iter()
            .map(|v| match store.get(v.as_tensor()) {
                Some(g) => g.flatten_all(),
                None => v.as_tensor().zeros_like()?.flatten_all(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&grads, 0)?))
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
    /// Chunk length of the CPU path; the GPU path uses its own (64): any length gives the same
    /// result up to rounding.
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
    two("ssd", ssd_call(x, dt, a, b, c, opts)?.run()?)
}

/// [`ssd`] packed, ready to run.
pub fn ssd_call(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    opts: SsdOptions,
) -> crate::Result<PackedCall> {
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
    let d_per_p = opts
        .d
        .is_some_and(|d| d.elem_count() == heads * head_dim && head_dim != 1);
    let (inputs, present) = present_inputs(
        vec![x, dt, a, b, c],
        [opts.d, opts.z, opts.dt_bias, opts.initial_states],
    );
    let kernel = SsdKernel {
        dims,
        present,
        d_per_p,
        softplus: opts.dt_softplus,
        dt_limit: opts.dt_limit,
    };
    prepare(
        kernel,
        &inputs,
        &[
            &[batch, len, heads, head_dim],
            &[batch, heads, head_dim, state],
        ],
    )
}

// ---------------------------------------------------------------------------------------
// Gated RMSNorm

struct NormKernel {
    dims: NormDims,
    has_z: bool,
}

impl PackedKernel for NormKernel {
    const NAME: &'static str = "rmsnorm_gated";

    fn input_sizes(&self) -> crate::Result<Vec<(&'static str, usize)>> {
        let d = &self.dims;
        if d.group_size == 0 || !d.hidden.is_multiple_of(d.group_size) {
            return Err(shape_err(
                Self::NAME,
                format!(
                    "hidden {} is not a multiple of group_size {}",
                    d.hidden, d.group_size
                ),
            ));
        }
        Ok(present_sizes([
            ("x", Some(d.rows * d.hidden)),
            ("weight", Some(d.hidden)),
            ("z", self.has_z.then_some(d.rows * d.hidden)),
        ]))
    }

    fn forward(&self, inputs: &[&[f32]]) -> crate::Result<Vec<f32>> {
        norm_fwd(
            &self.dims,
            inputs[0],
            inputs[1],
            self.has_z.then(|| inputs[2]),
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(&self, packed: &cuda::Packed) -> candle_core::Result<CudaSlice<f32>> {
        cuda::rmsnorm_gated(packed, &self.dims, self.has_z)
    }

    #[cfg(feature = "cuda")]
    fn cuda_backward<G: cuda::GradType>(
        &self,
        packed: &cuda::Packed,
        grad_out: &CudaView<f32>,
    ) -> candle_core::Result<Option<CudaSlice<G>>> {
        cuda::rmsnorm_gated_backward(packed, &self.dims, self.has_z, grad_out)
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
    let mut out = rmsnorm_gated_call(x, weight, z, group_size, eps, norm_before_gate)?.run()?;
    out.pop()
        .ok_or_else(|| shape_err("rmsnorm_gated", "no output".into()))
}

/// [`rmsnorm_gated`] packed, ready to run.
pub fn rmsnorm_gated_call(
    x: &Tensor,
    weight: &Tensor,
    z: Option<&Tensor>,
    group_size: usize,
    eps: f32,
    norm_before_gate: bool,
) -> crate::Result<PackedCall> {
    let hidden = weight.elem_count();
    let dims = NormDims {
        rows: x.elem_count() / hidden.max(1),
        hidden,
        group_size,
        eps,
        norm_before_gate,
    };
    let inputs: Vec<&Tensor> = [Some(x), Some(weight), z].into_iter().flatten().collect();
    let kernel = NormKernel {
        dims,
        has_z: z.is_some(),
    };
    prepare(kernel, &inputs, &[x.dims()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use mamba_testing::lcg_values_in;

    /// The SSD's backward through tensor operations (the GPU's where the backward kernels'
    /// chunk does not fit shared memory) unpacks the packed inputs in the kernel's order and
    /// gives the CPU backward kernel's gradients, with and without the optional inputs.
    #[test]
    fn ssd_tensor_backward_matches_the_cpu_kernel_on_packed_inputs() {
        let dims = SsdDims {
            batch: 1,
            len: 70,
            heads: 2,
            head_dim: 4,
            groups: 1,
            state: 8,
            chunk_size: 32,
        };
        let all = Present {
            d: true,
            z: true,
            bias: true,
            init: true,
        };
        let none = Present {
            d: false,
            z: false,
            bias: false,
            init: false,
        };
        let tiny = SsdDims {
            batch: 4,
            len: 32,
            heads: 4,
            head_dim: 16,
            groups: 1,
            state: 16,
            chunk_size: 16,
        };
        for (dims, present, d_per_p, softplus) in [
            (dims, all, true, true),
            (dims, none, false, false),
            (tiny, Present { z: false, ..all }, false, true),
        ] {
            let kernel = SsdKernel {
                dims,
                present,
                d_per_p,
                softplus,
                dt_limit: (0.0, f32::INFINITY),
            };
            let sizes: Vec<usize> = kernel
                .input_sizes()
                .unwrap()
                .iter()
                .map(|(_, n)| *n)
                .collect();
            // Steps kept positive without the softplus, as a processed dt is.
            let inputs: Vec<Vec<f32>> = kernel
                .input_shapes()
                .iter()
                .zip(&sizes)
                .enumerate()
                .map(|(i, ((name, _), &n))| match *name {
                    "A" => lcg_values_in(n, i as u64, -1.5, -0.5),
                    "dt" if !softplus => lcg_values_in(n, i as u64, 0.05, 0.5),
                    _ => lcg_values_in(n, i as u64, -1.0, 1.0),
                })
                .collect();
            let packed: Vec<f32> = inputs.concat();
            let out_len = dims.batch * dims.heads * dims.head_dim * (dims.len + dims.state);
            let grad_out = lcg_values_in(out_len, 99, -1.0, 1.0);
            let slices: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let want = kernel.backward(&slices, &grad_out).unwrap();
            let got = kernel
                .tensor_backward(
                    &Tensor::from_vec(packed, sizes.iter().sum::<usize>(), &Device::Cpu).unwrap(),
                    &Tensor::from_vec(grad_out, out_len, &Device::Cpu).unwrap(),
                )
                .unwrap()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(err < 1e-4, "present {present:?}: gradients differ by {err}");
        }
    }
}
