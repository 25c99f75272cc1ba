//! The fused decoding step on an NVIDIA GPU: a whole Mamba-1, FalconMamba or Mamba-2 model's
//! one-token step as three or four kernels per layer (`mamba_ops::cuda::decode`), or two for a
//! small model at batch 1 (`in_proj` with its conv, then one tail kernel for the rest),
//! recorded once as a CUDA graph and replayed every token.
//!
//! Why: through candle's ops a step launches about twenty kernels per layer, allocates each
//! intermediate and widens bf16 weights on every call; measured on an H200, that work, not
//! the weights' bytes, set the pace (BENCHMARKS.md, "fused decode step"). Here the buffers
//! are allocated once; the block's RMSNorm folds into `in_proj`'s matrix-vector product, the
//! residual add into `out_proj`'s, the Δ projection into Mamba-1's SSM step, and Mamba-2's
//! gate into its SSM step with its (one-group) norm into `out_proj`; the graph replays every
//! launch with one call.
//!
//! The recurrent state stays in the caller's [`State`] tensors, updated in place: the
//! kernels find each layer's `(conv, ssm)` buffers through a small device table of addresses,
//! refreshed whenever the state passed in is held in other tensors (a new prompt, another
//! sequence), so one recorded graph serves every state of its batch size.

use crate::error::{Error, Result};
use crate::layers::{Linear, RmsNorm};
use crate::state::{LayerState, State};
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor, TensorId};
use mamba_ops::cuda::decode::{
    BlasProduct, BlasProducts, ConvStep, DecodeKernels, DecodeSpec, DevicePtr as Addr,
    GatedNormStep, Gemv, GemvConv, Mamba1Step, Mamba1Tail, Mamba2Step, Mamba2Tail, TailProduct,
};
use std::sync::Arc;

/// What a Mamba mixer hands the fused step: its weights and sizes.
pub enum MixerWeights<'a> {
    Mamba1 {
        in_proj: &'a Linear,
        /// `(d_inner, W)` f32, and `(d_inner)`.
        conv_weight: &'a Tensor,
        conv_bias: Option<&'a Tensor>,
        x_proj: &'a Linear,
        dt_proj: &'a Linear,
        dt_bias: &'a Tensor,
        /// `A = -exp(A_log)`, `(d_inner, N)`.
        a: &'a Tensor,
        d: &'a Tensor,
        out_proj: &'a Linear,
        d_inner: usize,
        state_size: usize,
        dt_rank: usize,
        conv_kernel: usize,
        /// FalconMamba's weightless norm of Δ, B and C.
        bc_eps: Option<f32>,
    },
    Mamba2 {
        in_proj: &'a Linear,
        /// `(conv_dim, W)` f32, and `(conv_dim)`.
        conv_weight: &'a Tensor,
        conv_bias: Option<&'a Tensor>,
        /// `(H)` each; `A = -exp(A_log)`.
        dt_bias: &'a Tensor,
        a: &'a Tensor,
        d: &'a Tensor,
        norm_weight: &'a Tensor,
        out_proj: &'a Linear,
        heads: usize,
        head_dim: usize,
        groups: usize,
        state_size: usize,
        conv_kernel: usize,
        dt_limit: (f32, f32),
        norm_eps: f32,
        norm_before_gate: bool,
    },
}

/// One block as the fused step sees it: its pre-norm and its mixer.
pub struct BlockWeights<'a> {
    pub norm: &'a RmsNorm,
    pub mixer: MixerWeights<'a>,
}

/// What the whole model hands the fused step.
pub struct ModelWeights<'a> {
    pub embedding: &'a Tensor,
    pub blocks: Vec<BlockWeights<'a>>,
    pub norm_f: &'a RmsNorm,
    pub lm_head: &'a Linear,
    pub hidden: usize,
    pub vocab: usize,
}

/// The recorded graph. CUDA graphs may be launched from any thread as long as calls on one
/// graph are serialised, which the model's lock around the decoder does.
struct Graph(CudaGraph);

// SAFETY: see above; the graph is only touched through `&mut FusedDecoder`.
unsafe impl Send for Graph {}

/// One launch of the recorded step, with every address resolved.
enum Launch {
    Gemv(Gemv),
    /// A product at a batch past the matrix-vector kernel's tile: its input prepared
    /// (normed, converted to the weights' type), then a cuBLAS GEMM.
    Blas {
        input: Prepare,
        product: BlasProduct,
    },
    Conv {
        layer: usize,
        call: ConvStep,
    },
    Mamba1 {
        layer: usize,
        call: Mamba1Step,
    },
    Mamba2 {
        layer: usize,
        call: Mamba2Step,
    },
    GatedNorm(GatedNormStep),
    /// A mixer after its conv in one launch (batch 1).
    Mamba1Tail {
        layer: usize,
        call: Mamba1Tail,
    },
    Mamba2Tail {
        layer: usize,
        call: Mamba2Tail,
    },
}

/// The input of a cuBLAS product: `x` (rows `stride` apart) or its RMSNorm
/// (`(weight, eps)`), written to `out`.
struct Prepare {
    x: (Addr, usize),
    cols: usize,
    norm: Option<(Addr, f32)>,
    out: Addr,
}

/// The fused step of one model for one batch size: kernels, buffers, the launch list and
/// its recorded graph.
pub(crate) struct FusedDecoder {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    kernels: DecodeKernels,
    /// cuBLAS for the products at large batch.
    blas: Option<BlasProducts>,
    batch: usize,
    vocab: usize,
    /// Embedding rows and whether they are bf16.
    embedding: (Addr, bool),
    hidden: usize,
    hidden_buf: Addr,
    launches: Vec<Launch>,
    /// Buffers the launches read and write, and the f32 copies of small parameters they
    /// use: kept alive as long as the decoder.
    _buffers: Vec<CudaSlice<f32>>,
    _params: Vec<Tensor>,
    /// This step's token ids and the device table of `(conv, ssm)` state addresses per
    /// layer, with their addresses (taken once: nothing is asked of the buffers while a
    /// graph is being recorded), and the state tensors whose addresses the table holds now
    /// (asking a tensor for its address costs driver calls, so only new tensors are asked).
    ids: CudaSlice<u32>,
    ids_addr: Addr,
    state_table: CudaSlice<u64>,
    table_addr: Addr,
    state_tensors: Vec<TensorId>,
    /// One grid-barrier counter (u32) per layer for the tail kernels, zeroed at the start of
    /// every step.
    _barriers: CudaSlice<u32>,
    barriers_addr: Addr,
    logits: CudaSlice<f32>,
    graph: Option<Graph>,
    /// `(conv, ssm)` shapes of each layer's state for one sequence.
    state_shapes: Vec<(Vec<usize>, Vec<usize>)>,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedDecoder")
            .field("batch", &self.batch)
            .field("launches", &self.launches.len())
            .field("recorded", &self.graph.is_some())
            .finish()
    }
}

fn unsupported(why: impl Into<String>) -> Error {
    Error::Input(format!("no fused CUDA decoding step: {}", why.into()))
}

/// The device address of a contiguous f32 / bf16 / u32 CUDA tensor's first element, with
/// whether it is bf16.
fn address(t: &Tensor, stream: &Arc<CudaStream>) -> Result<(Addr, bool)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(unsupported("a tensor is not on the GPU"));
    };
    let (start, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| unsupported("a tensor is not contiguous"))?;
    let (base, size, bf16) = match &cuda.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(stream).0, 4, false),
        CudaStorageSlice::BF16(s) => (s.device_ptr(stream).0, 2, true),
        CudaStorageSlice::U32(s) => (s.device_ptr(stream).0, 4, false),
        _ => return Err(unsupported(format!("a tensor is {:?}", t.dtype()))),
    };
    Ok((base + (start * size) as u64, bf16))
}

/// A f32 tensor's address.
fn f32_address(t: &Tensor, stream: &Arc<CudaStream>) -> Result<Addr> {
    if t.dtype() != DType::F32 {
        return Err(unsupported(format!("a parameter is {:?}", t.dtype())));
    }
    Ok(address(t, stream)?.0)
}

/// Builds the launch list, collecting the f32 parameter copies it needs.
struct Builder<'k> {
    kernels: &'k DecodeKernels,
    stream: Arc<CudaStream>,
    params: Vec<Tensor>,
    batch: usize,
    /// Room for a cuBLAS product's prepared input.
    prepared: Addr,
    /// The device table of `(conv, ssm)` state addresses per layer.
    states: Addr,
    /// The tail kernels' barrier counters, one u32 per layer.
    barriers: Addr,
}

impl Builder<'_> {
    /// The address of `t` as a contiguous f32 tensor (a converted copy kept if needed).
    fn param(&mut self, t: &Tensor) -> Result<Addr> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let addr = f32_address(&t, &self.stream)?;
        self.params.push(t);
        Ok(addr)
    }

    fn optional_param(&mut self, t: Option<&Tensor>) -> Result<Option<Addr>> {
        t.map(|t| self.param(t)).transpose()
    }

    /// The weight of a dense linear layer in the kernels' weight type, 16-byte aligned.
    fn weight(&mut self, linear: &Linear) -> Result<Addr> {
        let w = linear
            .dense_weight()
            .ok_or_else(|| unsupported("quantised weights"))?;
        let (addr, bf16) = address(w, &self.stream)?;
        if bf16 != self.kernels.spec().bf16_weights || !addr.is_multiple_of(16) {
            return Err(unsupported("linear weights of mixed types or unaligned"));
        }
        Ok(addr)
    }

    /// `y (+)= linear(x')` over `(rows, cols)` for the whole batch, `y` given with its
    /// stride between sequences.
    fn gemv(
        &mut self,
        linear: &Linear,
        (rows, cols): (usize, usize),
        input: GemvInput,
        y: (Addr, usize),
        accumulate: bool,
    ) -> Result<Launch> {
        if !self.kernels.gemv_fits(cols) {
            return Err(unsupported(format!("{cols} columns")));
        }
        let norm = match input.norm {
            Some((weight, eps)) => Some((self.param(weight)?, eps)),
            None => None,
        };
        if self.kernels.batch_wants_blas() && linear.bias().is_none() {
            return Ok(Launch::Blas {
                input: Prepare {
                    x: (input.x, cols),
                    cols,
                    norm,
                    out: self.prepared,
                },
                product: BlasProduct {
                    weight: self.weight(linear)?,
                    rows,
                    cols,
                    batch: self.batch,
                    x: self.prepared,
                    y: y.0,
                    y_stride: y.1,
                    accumulate,
                },
            });
        }
        Ok(Launch::Gemv(Gemv {
            weight: self.weight(linear)?,
            rows,
            cols,
            x: input.x,
            x_stride: cols,
            y: y.0,
            y_stride: y.1,
            bias: self.optional_param(linear.bias())?,
            norm,
            accumulate,
            conv: None,
        }))
    }

    /// `out_proj` (`rows x cols`) at the end of a tail kernel, adding into the residual
    /// stream, with the layer's barrier counter.
    fn tail_product(
        &mut self,
        linear: &Linear,
        (rows, cols): (usize, usize),
        ctx: &LayerCtx,
    ) -> Result<TailProduct> {
        Ok(TailProduct {
            weight: self.weight(linear)?,
            rows,
            cols,
            bias: self.optional_param(linear.bias())?,
            h: ctx.hidden.0,
            barrier: self.barriers + 4 * ctx.layer as u64,
        })
    }
}

/// The input of a matrix-vector product: `x`, or an RMSNorm of it (`(weight, eps)`).
struct GemvInput<'a> {
    x: Addr,
    norm: Option<(&'a Tensor, f32)>,
}

impl<'a> GemvInput<'a> {
    fn plain(x: Addr) -> Self {
        GemvInput { x, norm: None }
    }

    fn normed(x: Addr, norm: &'a RmsNorm) -> Self {
        GemvInput {
            x,
            norm: Some((norm.weight(), norm.eps())),
        }
    }
}

/// A device buffer of `len` f32 (zeroed) and its address.
fn buffer(stream: &Arc<CudaStream>, len: usize) -> Result<(CudaSlice<f32>, Addr)> {
    let buf = stream.alloc_zeros::<f32>(len.max(1)).map_err(cuda_err)?;
    let addr = buf.device_ptr(stream).0;
    Ok((buf, addr))
}

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Candle(candle_core::Error::Cuda(format!("{e:?}").into()))
}

impl FusedDecoder {
    /// The fused step of `weights` for `batch` sequences, or an error saying why the model
    /// does not fit it (the caller then steps through candle's ops).
    pub(crate) fn new(weights: &ModelWeights, device: &Device, batch: usize) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(unsupported("the model is not on a CUDA device"));
        };
        let first = weights
            .blocks
            .first()
            .ok_or_else(|| unsupported("no layers"))?;
        let (state_size, conv_kernel) = state_and_conv(&first.mixer);
        let bf16_weights = weights
            .lm_head
            .dense_weight()
            .is_some_and(|w| w.dtype() == DType::BF16);
        let stream = dev.cuda_stream().context().new_stream().map_err(cuda_err)?;
        let kernels = DecodeKernels::load(
            dev,
            DecodeSpec {
                bf16_weights,
                batch,
                state_size,
                conv_kernel,
            },
        )?;
        let (h, vocab) = (weights.hidden, weights.vocab);
        let widest = weights
            .blocks
            .iter()
            .map(|b| mixer_widths(&b.mixer))
            .fold([0; 4], |m, w| std::array::from_fn(|i| m[i].max(w[i])));
        let mut buffers = Vec::new();
        let mut alloc = |len: usize| -> Result<Addr> {
            let (buf, addr) = buffer(&stream, batch * len)?;
            buffers.push(buf);
            Ok(addr)
        };
        let hidden_buf = alloc(h)?;
        let scratch = Scratch {
            proj: alloc(widest[0])?,
            conv: alloc(widest[1])?,
            dbc: alloc(widest[2])?,
            y: alloc(widest[3])?,
        };
        let prepared = alloc(widest[3].max(h))?;
        let blas = if kernels.batch_wants_blas() {
            Some(BlasProducts::new(&stream, bf16_weights)?)
        } else {
            None
        };
        let logits = stream.alloc_zeros::<f32>(batch * vocab).map_err(cuda_err)?;
        let logits_addr = logits.device_ptr(&stream).0;
        let state_table = stream
            .alloc_zeros::<u64>(2 * weights.blocks.len())
            .map_err(cuda_err)?;
        let table_addr = state_table.device_ptr(&stream).0;
        let barriers = stream
            .alloc_zeros::<u32>(weights.blocks.len().max(1))
            .map_err(cuda_err)?;
        let barriers_addr = barriers.device_ptr(&stream).0;
        let mut builder = Builder {
            kernels: &kernels,
            stream: stream.clone(),
            params: Vec::new(),
            batch,
            prepared,
            states: table_addr,
            barriers: barriers_addr,
        };
        let mut launches = Vec::new();
        let mut state_shapes = Vec::new();
        for (layer, block) in weights.blocks.iter().enumerate() {
            if (state_size, conv_kernel) != state_and_conv(&block.mixer) {
                return Err(unsupported("layers of different state sizes"));
            }
            state_shapes.push(state_shape(&block.mixer));
            let ctx = LayerCtx {
                layer,
                hidden: (hidden_buf, h),
                scratch: &scratch,
            };
            launches.extend(layer_launches(&mut builder, block, &ctx)?);
        }
        launches.push(builder.gemv(
            weights.lm_head,
            (vocab, h),
            GemvInput::normed(hidden_buf, weights.norm_f),
            (logits_addr, vocab),
            false,
        )?);
        let params = builder.params;
        let embedding = address(weights.embedding, &stream)?;
        let ids = stream.alloc_zeros::<u32>(batch).map_err(cuda_err)?;
        let ids_addr = ids.device_ptr(&stream).0;
        Ok(FusedDecoder {
            device: dev.clone(),
            stream,
            kernels,
            blas,
            batch,
            vocab,
            embedding,
            hidden: h,
            hidden_buf,
            launches,
            _buffers: buffers,
            _params: params,
            ids,
            ids_addr,
            state_table,
            table_addr,
            state_tensors: Vec::new(),
            _barriers: barriers,
            barriers_addr,
            logits,
            graph: None,
            state_shapes,
        })
    }

    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// One token per sequence through the whole model, advancing `state` in place; the
    /// next-token logits `(batch, vocab)` as a new tensor.
    pub(crate) fn step(&mut self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::Input(format!(
                "token id {id} is out of range for a vocabulary of {}",
                self.vocab
            )));
        }
        let tensors = self.device_state_tensors(state)?;
        let candle_stream = self.device.cuda_stream();
        self.stream.join(&candle_stream).map_err(cuda_err)?;
        if tensors != self.state_tensors {
            let addrs = self.state_addresses(state)?;
            self.stream
                .memcpy_htod(&addrs, &mut self.state_table)
                .map_err(cuda_err)?;
            self.state_tensors = tensors;
        }
        self.stream
            .memcpy_htod(ids, &mut self.ids)
            .map_err(cuda_err)?;
        if self.graph.is_none() {
            self.graph = Some(self.record()?);
        }
        if let Some(Graph(graph)) = &self.graph {
            graph.launch().map_err(cuda_err)?;
        }
        candle_stream.join(&self.stream).map_err(cuda_err)?;
        state.tokens_seen += 1;
        self.logits_tensor()
    }

    /// The ids of every layer's `(conv, ssm)` state tensors, moving host-held states to the
    /// device first and checking their shapes against the model's.
    fn device_state_tensors(&self, state: &mut State) -> Result<Vec<TensorId>> {
        let device = Device::Cuda(self.device.clone());
        let mut ids = Vec::with_capacity(2 * state.layers.len());
        for (layer, (conv_shape, ssm_shape)) in state.layers.iter_mut().zip(&self.state_shapes) {
            let conv_shape = batched(state.batch, conv_shape);
            let ssm_shape = batched(state.batch, ssm_shape);
            let shaped = |d: &crate::state::DeviceState| {
                d.conv.dims() == conv_shape && d.ssm.dims() == ssm_shape
            };
            if !layer.device.as_ref().is_some_and(shaped) {
                let (conv, ssm) = layer.recurrent_tensors(&conv_shape, &ssm_shape, &device)?;
                layer.set_recurrent(&conv, &ssm)?;
            }
            let d = device_state(layer)?;
            if d.conv.dims() != conv_shape || d.ssm.dims() != ssm_shape {
                return Err(Error::Input("the state does not fit the model".into()));
            }
            ids.extend([d.conv.id(), d.ssm.id()]);
        }
        Ok(ids)
    }

    /// Every layer's `(conv, ssm)` state addresses (the states already on the device).
    fn state_addresses(&self, state: &State) -> Result<Vec<u64>> {
        let mut addrs = Vec::with_capacity(2 * state.layers.len());
        for layer in &state.layers {
            let d = device_state(layer)?;
            addrs.push(f32_address(&d.conv, &self.stream)?);
            addrs.push(f32_address(&d.ssm, &self.stream)?);
        }
        Ok(addrs)
    }

    /// Records the whole step on the decoder's stream as a graph.
    fn record(&self) -> Result<Graph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err)?;
        let launched = self.launch_all();
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(cuda_err)?;
        launched?;
        let graph = graph.ok_or_else(|| unsupported("the recorded graph is empty"))?;
        Ok(Graph(graph))
    }

    /// Queues every kernel of one step on the decoder's stream.
    fn launch_all(&self) -> Result<()> {
        let (k, s, table) = (&self.kernels, &self.stream, self.table_addr);
        // SAFETY: every address was taken from a buffer or tensor the decoder keeps alive,
        // sized for `batch` sequences of the dimensions the launches carry; the state table
        // holds the addresses of the current state's tensors, checked against the model's
        // shapes in `state_addresses`.
        unsafe {
            k.clear_barriers(s, self.barriers_addr, self.state_shapes.len())?;
            let (table_addr, bf16) = self.embedding;
            k.embed(
                s,
                table_addr,
                bf16,
                self.ids_addr,
                self.hidden,
                self.hidden_buf,
            )?;
            for launch in &self.launches {
                match launch {
                    Launch::Gemv(g) => k.gemv(s, g)?,
                    Launch::Blas { input, product } => {
                        let blas = self
                            .blas
                            .as_ref()
                            .ok_or_else(|| unsupported("cuBLAS products without a handle"))?;
                        k.prepare_rows(s, input.x, input.cols, input.norm, input.out)?;
                        blas.product(product)?;
                    }
                    Launch::Conv { layer, call } => k.conv_step(s, table, *layer, call)?,
                    Launch::Mamba1 { layer, call } => k.mamba1_step(s, table, *layer, call)?,
                    Launch::Mamba2 { layer, call } => k.mamba2_step(s, table, *layer, call)?,
                    Launch::GatedNorm(n) => k.gated_norm(s, n)?,
                    Launch::Mamba1Tail { layer, call } => k.mamba1_tail(s, table, *layer, call)?,
                    Launch::Mamba2Tail { layer, call } => k.mamba2_tail(s, table, *layer, call)?,
                }
            }
        }
        Ok(())
    }

    /// A copy of the logits buffer as a `(batch, vocab)` tensor on the model's device.
    fn logits_tensor(&self) -> Result<Tensor> {
        let candle_stream = self.device.cuda_stream();
        let mut out = candle_stream
            .alloc_zeros::<f32>(self.batch * self.vocab)
            .map_err(cuda_err)?;
        candle_stream
            .memcpy_dtod(&self.logits, &mut out)
            .map_err(cuda_err)?;
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            (self.batch, self.vocab),
            BackpropOp::none(),
            false,
        ))
    }
}

fn batched(batch: usize, shape: &[usize]) -> Vec<usize> {
    std::iter::once(batch)
        .chain(shape.iter().copied())
        .collect()
}

fn device_state(layer: &LayerState) -> Result<&crate::state::DeviceState> {
    layer
        .device
        .as_ref()
        .ok_or_else(|| Error::Input("a Mamba layer's state is not on the GPU".into()))
}

/// The scratch buffers one layer's launches share.
struct Scratch {
    /// `in_proj`'s output.
    proj: Addr,
    /// The conv output.
    conv: Addr,
    /// Mamba-1's `x_proj` output.
    dbc: Addr,
    /// The SSM output.
    y: Addr,
}

/// Widths per sequence of `[in_proj output, conv output, x_proj output, SSM output]`.
fn mixer_widths(m: &MixerWeights) -> [usize; 4] {
    match *m {
        MixerWeights::Mamba1 {
            d_inner,
            state_size,
            dt_rank,
            ..
        } => [2 * d_inner, d_inner, dt_rank + 2 * state_size, d_inner],
        MixerWeights::Mamba2 {
            heads,
            head_dim,
            groups,
            state_size,
            ..
        } => {
            let d_inner = heads * head_dim;
            let conv_dim = d_inner + 2 * groups * state_size;
            [d_inner + conv_dim + heads, conv_dim, 0, d_inner]
        }
    }
}

/// `(N, W)` of a mixer.
fn state_and_conv(m: &MixerWeights) -> (usize, usize) {
    match *m {
        MixerWeights::Mamba1 {
            state_size,
            conv_kernel,
            ..
        }
        | MixerWeights::Mamba2 {
            state_size,
            conv_kernel,
            ..
        } => (state_size, conv_kernel),
    }
}

/// `(conv, ssm)` state shapes of one sequence.
fn state_shape(m: &MixerWeights) -> (Vec<usize>, Vec<usize>) {
    let conv_dim = mixer_widths(m)[1];
    match *m {
        MixerWeights::Mamba1 {
            d_inner,
            state_size,
            conv_kernel,
            ..
        } => (vec![conv_dim, conv_kernel - 1], vec![d_inner, state_size]),
        MixerWeights::Mamba2 {
            heads,
            head_dim,
            state_size,
            conv_kernel,
            ..
        } => (
            vec![conv_dim, conv_kernel - 1],
            vec![heads, head_dim, state_size],
        ),
    }
}

/// Where one layer's launches read and write.
struct LayerCtx<'s> {
    layer: usize,
    /// The residual stream and its width.
    hidden: (Addr, usize),
    scratch: &'s Scratch,
}

/// The block's normed `in_proj` (`width` outputs per sequence, into the `proj` scratch),
/// then the causal conv over its output columns `[offset, offset + channels)` (into `conv`):
/// done by the product's own blocks when it is a matrix-vector product, else a launch of its
/// own after the cuBLAS product.
fn in_proj_and_conv(
    b: &mut Builder,
    block: &BlockWeights,
    ctx: &LayerCtx,
    (in_proj, width): (&Linear, usize),
    (offset, channels): (usize, usize),
    (weight, bias): (&Tensor, Option<&Tensor>),
) -> Result<Vec<Launch>> {
    let (h_buf, h) = ctx.hidden;
    let s = ctx.scratch;
    let (weight, bias) = (b.param(weight)?, b.optional_param(bias)?);
    let product = b.gemv(
        in_proj,
        (width, h),
        GemvInput::normed(h_buf, block.norm),
        (s.proj, width),
        false,
    )?;
    Ok(match product {
        Launch::Gemv(g) => vec![Launch::Gemv(Gemv {
            conv: Some(GemvConv {
                offset,
                channels,
                weight,
                bias,
                states: b.states,
                layer: ctx.layer,
                out: s.conv,
            }),
            ..g
        })],
        product => vec![
            product,
            Launch::Conv {
                layer: ctx.layer,
                call: ConvStep {
                    x: s.proj,
                    x_stride: width,
                    x_offset: offset,
                    channels,
                    weight,
                    bias,
                    out: s.conv,
                },
            },
        ],
    })
}

/// The launches of one block, in order.
fn layer_launches(b: &mut Builder, block: &BlockWeights, ctx: &LayerCtx) -> Result<Vec<Launch>> {
    let (h_buf, h) = ctx.hidden;
    let s = ctx.scratch;
    let layer = ctx.layer;
    match block.mixer {
        MixerWeights::Mamba1 {
            in_proj,
            conv_weight,
            conv_bias,
            x_proj,
            dt_proj,
            dt_bias,
            a,
            d,
            out_proj,
            d_inner,
            state_size,
            dt_rank,
            bc_eps,
            ..
        } => {
            let dbc_width = dt_rank + 2 * state_size;
            let dt_weight = b.weight(dt_proj)?;
            let mut launches = in_proj_and_conv(
                b,
                block,
                ctx,
                (in_proj, 2 * d_inner),
                (0, d_inner),
                (conv_weight, conv_bias),
            )?;
            let step = Mamba1Step {
                xc: s.conv,
                dbc: s.dbc,
                dbc_stride: dbc_width,
                xz: s.proj,
                dt_weight,
                dt_bias: b.param(dt_bias)?,
                a: b.param(a)?,
                d: b.param(d)?,
                d_inner,
                dt_rank,
                bc_eps,
                y: s.y,
            };
            if x_proj.bias().is_none() && b.kernels.mamba1_tail_fits((h, d_inner), dt_rank) {
                launches.push(Launch::Mamba1Tail {
                    layer,
                    call: Mamba1Tail {
                        x_proj: b.weight(x_proj)?,
                        step,
                        out_proj: b.tail_product(out_proj, (h, d_inner), ctx)?,
                    },
                });
                return Ok(launches);
            }
            launches.extend([
                b.gemv(
                    x_proj,
                    (dbc_width, d_inner),
                    GemvInput::plain(s.conv),
                    (s.dbc, dbc_width),
                    false,
                )?,
                Launch::Mamba1 { layer, call: step },
                b.gemv(
                    out_proj,
                    (h, d_inner),
                    GemvInput::plain(s.y),
                    (h_buf, h),
                    true,
                )?,
            ]);
            Ok(launches)
        }
        MixerWeights::Mamba2 {
            in_proj,
            conv_weight,
            conv_bias,
            dt_bias,
            a,
            d,
            norm_weight,
            out_proj,
            heads,
            head_dim,
            groups,
            dt_limit,
            norm_eps,
            norm_before_gate,
            ..
        } => {
            let [width, conv_dim, _, d_inner] = mixer_widths(&block.mixer);
            // With one group and the gate first, the step applies the gate and the norm
            // folds into out_proj; otherwise the norm runs on its own after the step.
            let gate_in_step = groups == 1 && !norm_before_gate;
            let mut launches = in_proj_and_conv(
                b,
                block,
                ctx,
                (in_proj, width),
                (d_inner, conv_dim),
                (conv_weight, conv_bias),
            )?;
            let step = Mamba2Step {
                xbc: s.conv,
                zxbcdt: s.proj,
                in_stride: width,
                dt_offset: d_inner + conv_dim,
                dt_bias: b.param(dt_bias)?,
                a: b.param(a)?,
                d: b.param(d)?,
                heads,
                head_dim,
                groups,
                dt_limit,
                gate: gate_in_step,
                y: s.y,
            };
            if gate_in_step && b.kernels.mamba2_tail_fits((h, d_inner), groups) {
                launches.push(Launch::Mamba2Tail {
                    layer,
                    call: Mamba2Tail {
                        step,
                        norm: Some((b.param(norm_weight)?, norm_eps)),
                        out_proj: b.tail_product(out_proj, (h, d_inner), ctx)?,
                    },
                });
                return Ok(launches);
            }
            launches.push(Launch::Mamba2 { layer, call: step });
            let out_input = if gate_in_step {
                GemvInput {
                    x: s.y,
                    norm: Some((norm_weight, norm_eps)),
                }
            } else {
                launches.push(Launch::GatedNorm(GatedNormStep {
                    y: s.y,
                    z: s.proj,
                    z_stride: width,
                    weight: b.param(norm_weight)?,
                    d_inner,
                    group_size: d_inner / groups,
                    eps: norm_eps,
                    norm_before_gate,
                }));
                GemvInput::plain(s.y)
            };
            launches.push(b.gemv(out_proj, (h, d_inner), out_input, (h_buf, h), true)?);
            Ok(launches)
        }
    }
}

/// A model's fused decoder: built on the first step for a batch size (rebuilt when the
/// batch size changes), or the reason it could not be.
#[derive(Debug, Default)]
pub(crate) struct FusedSlot {
    off: bool,
    decoder: Option<FusedDecoder>,
    unsupported: Option<String>,
}

impl FusedSlot {
    /// One step through the fused decoder (building it with `build` for this batch size if
    /// needed), or `None` when it is off or the model does not fit it.
    pub(crate) fn step(
        &mut self,
        build: impl FnOnce(usize) -> Result<FusedDecoder>,
        ids: &[u32],
        state: &mut State,
    ) -> Result<Option<Tensor>> {
        if self.off || self.unsupported.is_some() {
            return Ok(None);
        }
        let decoder = match self.decoder.take() {
            Some(d) if d.batch() == state.batch => d,
            _ => match build(state.batch) {
                Ok(d) => d,
                Err(e) => {
                    self.unsupported = Some(e.to_string());
                    return Ok(None);
                }
            },
        };
        let decoder = self.decoder.insert(decoder);
        decoder.step(ids, state).map(Some)
    }

    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.off = !on;
    }

    /// Which path the last steps took, for reports.
    pub(crate) fn describe(&self) -> String {
        match (&self.decoder, &self.unsupported) {
            _ if self.off => "candle ops (fused step switched off)".into(),
            (_, Some(why)) => format!("candle ops ({why})"),
            (Some(d), None) => format!("fused CUDA graph, batch {}", d.batch()),
            (None, None) => "fused CUDA graph (not built yet)".into(),
        }
    }
}
