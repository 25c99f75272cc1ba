//! A causal language model made of pre-norm residual blocks, shared by every family:
//!
//! ```text
//! h = embed(ids)
//! for each block:  h = h + mixer(RMSNorm(h))
//!                  h = h + ffn(RMSNorm(h))        (when the block has one: a gated MLP or experts)
//! logits = lm_head(RMSNorm(h))
//! ```
//!
//! The mixer is a Mamba-1 or Mamba-2 SSM, or attention (Jamba, hybrids, Transformers).
//! Blocks with experts also give their load-balancing loss, which training adds to the
//! objective.

use crate::checkpoint::Checkpoint;
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::layers::{
    f32_vec, with_bounded_split_scratch, with_scratch, with_split_scratch, Embedding, Linear,
    RmsNorm, WeightFormat, SCRATCH_MAX,
};
use crate::mamba1::{MambaMixer, MixerSpec};
use crate::mamba2::Mamba2Mixer;
use crate::moe::FeedForward;
use crate::state::{LayerState, State, StateSize};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What a sequence mixer (the SSM or attention part of a block) provides.
pub trait Mixer: Send + Sync + std::fmt::Debug {
    /// What the mixer keeps for each sequence between calls.
    fn state_size(&self) -> StateSize;
    /// Whole-sequence forward of `x: (b, L, hidden)` from `state`, which it advances.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor>;
    /// One token per sequence, `x: (b, hidden)`, through the recurrent updates (or the
    /// key/value cache).
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor>;
    /// The mixer's linear layers (the projections whose weights [`Model::convert_weights`]
    /// stores in another format).
    fn linears_mut(&mut self) -> Vec<&mut Linear>;

    /// The mixer's weights as the fused CUDA decoding step takes them, or `None` for a
    /// mixer it does not cover (attention, Jamba's weighted Δ/B/C norms).
    #[cfg(feature = "cuda")]
    fn fused_decode_weights(&self) -> Option<crate::cuda_decode::MixerWeights<'_>> {
        None
    }

    /// Values per token that [`Mixer::forward_host`] takes from the per-thread piece scratch
    /// (its projections and the like), which bounds the tokens in one piece of a prefill
    /// ([`Model::host_piece_len`]). `None` in this default, which goes through the tensors
    /// (attention: its scores grow with the piece times the context), for which the pieces
    /// stay at [`HOST_PIECE_THROUGH_TENSORS`] tokens.
    fn host_scratch_per_token(&self) -> Option<usize> {
        None
    }

    /// [`Mixer::forward`] on host slices, `x, out: (batch, len, hidden)`, for inference on
    /// the CPU (no gradient). This default goes through the tensors; the Mamba mixers
    /// override it with the ops' token-major forms, which need no transposes.
    fn forward_host(
        &self,
        x: &[f32],
        batch_len: (usize, usize),
        state: &mut LayerState,
        out: &mut [f32],
    ) -> Result<()> {
        forward_host_via_tensors(self, x, batch_len, state, out)
    }

    /// [`Mixer::step`] on host slices, `x, out: (batch, hidden)`, for a model on the CPU.
    /// This default goes through [`Mixer::step`]'s tensors; the Mamba mixers override it
    /// with a fused step on slices that allocates nothing once warm.
    fn step_host(
        &self,
        x: &[f32],
        batch: usize,
        state: &mut LayerState,
        out: &mut [f32],
    ) -> Result<()> {
        let hidden = x.len() / batch.max(1);
        let x = Tensor::from_slice(x, (batch, hidden), &Device::Cpu)?;
        let y = self.step(&x, state)?;
        out.copy_from_slice(&f32_vec(&y)?);
        Ok(())
    }
}

/// [`Mixer::step`] of a host tensor `x: (batch, hidden)` through the mixer's
/// [`Mixer::step_host`]: the CPU branch of the Mamba mixers' `step`.
pub(crate) fn step_through_host(
    mixer: &(impl Mixer + ?Sized),
    x: &Tensor,
    state: &mut LayerState,
) -> Result<Tensor> {
    let (batch, hidden) = x.dims2()?;
    let mut out = vec![0.0f32; batch * hidden];
    mixer.step_host(&f32_vec(x)?, batch, state, &mut out)?;
    Ok(Tensor::from_vec(out, (batch, hidden), x.device())?)
}

/// [`Mixer::forward`] through tensors, on host slices: the default of
/// [`Mixer::forward_host`] for mixers without their own.
fn forward_host_via_tensors(
    mixer: &(impl Mixer + ?Sized),
    x: &[f32],
    (batch, len): (usize, usize),
    state: &mut LayerState,
    out: &mut [f32],
) -> Result<()> {
    let hidden = x.len() / (batch * len).max(1);
    let x = Tensor::from_slice(x, (batch, len, hidden), &Device::Cpu)?;
    out.copy_from_slice(&f32_vec(&mixer.forward(&x, state)?)?);
    Ok(())
}

thread_local! {
    /// The normed input and the mixer output of a block's host step or prefill piece.
    static BLOCK_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The residual stream of a host step.
    static STREAM_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `h + mixer(RMSNorm(h))`, then `h + ffn(RMSNorm(h))` when the block has a feed-forward part.
#[derive(Debug)]
pub(crate) struct Block {
    norm: RmsNorm,
    mixer: Box<dyn Mixer>,
    feed_forward: Option<(RmsNorm, FeedForward)>,
}

impl Block {
    pub(crate) fn new(
        norm: RmsNorm,
        mixer: Box<dyn Mixer>,
        feed_forward: Option<(RmsNorm, FeedForward)>,
    ) -> Self {
        Block {
            norm,
            mixer,
            feed_forward,
        }
    }

    /// `h: (b, L, hidden)` through the whole-sequence mixer, with the load-balancing loss
    /// of the block's experts (`None` for blocks without).
    fn forward(&self, h: &Tensor, state: &mut LayerState) -> Result<(Tensor, Option<Tensor>)> {
        let h = (self.mixer.forward(&self.norm.forward(h)?, state)? + h)?;
        match &self.feed_forward {
            None => Ok((h, None)),
            Some((norm, ffn)) => {
                let (y, aux) = ffn.forward_with_balance_loss(&norm.forward(&h)?)?;
                Ok(((y + h)?, aux))
            }
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears = self.mixer.linears_mut();
        if let Some((_, ffn)) = &mut self.feed_forward {
            linears.extend(ffn.linears_mut());
        }
        linears
    }

    /// [`Block::forward`] on the host for inference: `h: (batch, len, hidden)` advanced in
    /// place.
    fn forward_host(
        &self,
        h: &mut [f32],
        batch_len: (usize, usize),
        state: &mut LayerState,
    ) -> Result<()> {
        with_bounded_split_scratch(&BLOCK_SCRATCH, [h.len(), h.len()], |[normed, mixed]| {
            self.norm.forward_host(h, normed)?;
            self.mixer.forward_host(normed, batch_len, state, mixed)?;
            add_threaded(h, mixed);
            self.add_feed_forward_host(h, normed, batch_len.0 * batch_len.1)
        })
    }

    /// `h += ffn(RMSNorm(h))` for the `rows` tokens of `h` when the block has a feed-forward
    /// part (through its tensors), using `normed` as room for the norm.
    fn add_feed_forward_host(&self, h: &mut [f32], normed: &mut [f32], rows: usize) -> Result<()> {
        let Some((norm, ffn)) = &self.feed_forward else {
            return Ok(());
        };
        norm.forward_host(h, normed)?;
        let x = Tensor::from_slice(normed, (rows, h.len() / rows), &Device::Cpu)?;
        let y = f32_vec(&ffn.forward(&x)?)?;
        h.iter_mut().zip(&y).for_each(|(v, m)| *v += m);
        Ok(())
    }

    /// [`Block::step`] on the host: `h: (batch, hidden)` advanced in place.
    fn step_host(&self, h: &mut [f32], batch: usize, state: &mut LayerState) -> Result<()> {
        with_split_scratch(&BLOCK_SCRATCH, [h.len(), h.len()], |[normed, mixed]| {
            self.norm.forward_host(h, normed)?;
            self.mixer.step_host(normed, batch, state, mixed)?;
            h.iter_mut().zip(mixed.iter()).for_each(|(v, m)| *v += m);
            self.add_feed_forward_host(h, normed, batch)
        })
    }

    /// `h: (b, hidden)` through the mixer's one-token update.
    fn step(&self, h: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let h = (self.mixer.step(&self.norm.forward(h)?, state)? + h)?;
        match &self.feed_forward {
            None => Ok(h),
            Some((norm, ffn)) => Ok((ffn.forward(&norm.forward(&h)?)? + h)?),
        }
    }
}

/// `h += v` over rayon's threads (a prefill piece's residual: 6 MB of mamba-130m's 2048
/// tokens, 0.9 ms a layer on one thread).
fn add_threaded(h: &mut [f32], v: &[f32]) {
    use rayon::prelude::*;
    const VALUES_PER_TASK: usize = 1 << 14;
    h.par_chunks_mut(VALUES_PER_TASK)
        .zip(v.par_chunks(VALUES_PER_TASK))
        .for_each(|(h, v)| mamba_ops::parallel::add_into(h, v));
}

/// Where a family keeps its tensors: the folder of the embedding, blocks (`layers.{i}`) and
/// final norm, and their names inside it.
pub(crate) struct TensorNames {
    pub root: &'static str,
    pub embedding: &'static str,
    pub final_norm: &'static str,
}

impl TensorNames {
    pub(crate) fn of(family: Family) -> Self {
        match family {
            Family::Mamba
            | Family::FalconMamba
            | Family::Mamba2
            | Family::Hybrid
            | Family::MoeMamba => TensorNames {
                root: "backbone",
                embedding: "embeddings.weight",
                final_norm: "norm_f.weight",
            },
            Family::Jamba => TensorNames {
                root: "model",
                embedding: "embed_tokens.weight",
                final_norm: "final_layernorm.weight",
            },
        }
    }
}

/// A loaded model of any supported family.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Block>,
    norm_f: RmsNorm,
    lm_head: Linear,
    weight_format: WeightFormat,
    weight_bytes_per_token: usize,
    /// The fused one-token step on a CUDA device, built on first use.
    #[cfg(feature = "cuda")]
    fused: std::sync::Mutex<crate::cuda_decode::FusedSlot>,
}

/// Per-layer outputs recorded by [`Model::forward_hidden`].
#[derive(Debug, Clone)]
pub struct HiddenStates {
    pub embeddings: Tensor,
    /// Residual stream after each layer.
    pub layers: Vec<Tensor>,
    /// Output of the final norm.
    pub final_norm: Tensor,
    /// The mean of the mixture-of-experts layers' load-balancing losses (a scalar), or
    /// `None` for models without experts.
    pub router_aux_loss: Option<Tensor>,
}

impl Model {
    /// Loads a checkpoint folder with its weights in `dtype` (f32 or bf16).
    pub fn load(checkpoint: &Checkpoint, dtype: DType) -> Result<Self> {
        Self::load_on(checkpoint, dtype, &Device::Cpu)
    }

    /// Like [`Model::load`], with the weights on `device`. The recurrent states stay in
    /// host memory and are copied to and from the device on every call.
    pub fn load_on(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        check_weight_dtype(dtype)?;
        let vb = checkpoint.var_builder(dtype, device)?;
        Self::from_var_builder(&vb, &checkpoint.config)
    }

    /// Builds the model from weights under their Hugging Face names.
    pub fn from_var_builder(vb: &VarBuilder, config: &ModelConfig) -> Result<Self> {
        let (h, v, eps) = (
            config.hidden_size(),
            config.vocab_size(),
            config.norm_epsilon(),
        );
        let names = TensorNames::of(config.family());
        let root = vb.pp(names.root);
        let embedding = root.get((v, h), names.embedding).map_err(checkpoint_err)?;
        let layers = (0..config.num_layers())
            .map(|i| load_block(&root.pp(format!("layers.{i}")), config, i))
            .collect::<Result<Vec<_>>>()
            .map_err(checkpoint_err)?;
        let lm_head = if config.tie_word_embeddings() || !vb.contains_tensor("lm_head.weight") {
            Linear::new(embedding.clone(), None)
        } else {
            Linear::load(vb, "lm_head", (v, h), false).map_err(checkpoint_err)?
        };
        let weight_format = match embedding.dtype() {
            DType::BF16 => WeightFormat::Bf16,
            _ => WeightFormat::F32,
        };
        let mut model = Model {
            config: config.clone(),
            weight_format,
            weight_bytes_per_token: 0,
            embedding: Embedding::new(embedding),
            layers,
            norm_f: RmsNorm::load(&root, names.final_norm, h, eps).map_err(checkpoint_err)?,
            lm_head,
            #[cfg(feature = "cuda")]
            fused: Default::default(),
        };
        model.weight_bytes_per_token = model.linear_weight_bytes();
        Ok(model)
    }

    /// Stores the weights of every linear layer (the mixers' and MLPs' projections and the
    /// output head) in `format`; embeddings, convolutions, `A`, `D`, biases and norms stay
    /// as they are (f32). Quantised weights run on the CPU.
    pub fn convert_weights(&mut self, format: WeightFormat) -> Result<()> {
        self.check_format_runs_here(format)?;
        for linear in self.layers.iter_mut().flat_map(Block::linears_mut) {
            linear.convert(format)?;
        }
        self.lm_head.convert(format)?;
        #[cfg(feature = "cuda")]
        self.reset_fused_decode();
        self.weight_format = format;
        self.weight_bytes_per_token = self.linear_weight_bytes();
        Ok(())
    }

    /// Stores the output head alone in `format`, after [`Model::convert_weights`]: a GGUF
    /// file may keep its output in more bits than its layers (llama.cpp's q4_0 files: Q6_K).
    pub fn convert_head(&mut self, format: WeightFormat) -> Result<()> {
        self.check_format_runs_here(format)?;
        self.lm_head.convert(format)?;
        #[cfg(feature = "cuda")]
        self.reset_fused_decode();
        self.weight_bytes_per_token = self.linear_weight_bytes();
        Ok(())
    }

    /// Quantised weights run on the CPU only.
    fn check_format_runs_here(&self, format: WeightFormat) -> Result<()> {
        if format.quant().is_some() && !self.device().is_cpu() {
            return Err(Error::Input(format!(
                "{} weights run on the CPU only",
                format.name()
            )));
        }
        Ok(())
    }

    /// How the linear layers' weights are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.weight_format
    }

    /// Bytes of weights one decoding step reads: every linear layer once (the embedding
    /// reads one row per token, not counted).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_token
    }

    fn linear_weight_bytes(&mut self) -> usize {
        let blocks: usize = self
            .layers
            .iter_mut()
            .flat_map(Block::linears_mut)
            .map(|l| l.weight_bytes())
            .sum();
        blocks + self.lm_head.weight_bytes()
    }

    pub fn family(&self) -> Family {
        self.config.family()
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embedding.weight().device()
    }

    /// The state of `batch` sequences before any token: zero recurrent states, empty
    /// key/value caches.
    pub fn new_state(&self, batch: usize) -> State {
        let sizes: Vec<StateSize> = self.layers.iter().map(|l| l.mixer.state_size()).collect();
        // Where the GPU cannot hold the zeros now, the host does, and the first forward
        // that moves them there reports it.
        State::zeros_on(batch, &sizes, self.device())
            .unwrap_or_else(|_| State::zeros(batch, &sizes))
    }

    /// Runs `ids: (batch, L)` (row-major) from `state`, advancing it, and returns the
    /// final-norm hidden states `(batch, L, hidden)`. For inference: on the CPU it runs on
    /// host slices without recording anything for gradients (train through
    /// [`Model::forward_hidden`]).
    pub fn forward(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        if self.device().is_cpu() {
            return in_worker_thread(|| self.forward_host(ids, state));
        }
        Ok(self.forward_hidden(ids, state, false)?.final_norm)
    }

    /// [`Model::forward`] on host slices: the input goes through the whole model in pieces
    /// of [`Model::host_piece_len`] tokens per sequence, the state carried from piece to
    /// piece, so that each layer's intermediates fit the kept scratch.
    fn forward_host(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        check_state(state, self.layers.len())?;
        let batch = state.batch;
        let len = sequence_length(ids.len(), batch)?;
        let hidden = self.config.hidden_size();
        let piece_len = self.host_piece_len(batch);
        if len <= piece_len {
            let h = self.forward_piece_host(ids, (batch, len), state)?;
            return Ok(Tensor::from_vec(h, (batch, len, hidden), &Device::Cpu)?);
        }
        let mut out = vec![0.0f32; ids.len() * hidden]; // (batch, len, hidden)
        for start in (0..len).step_by(piece_len) {
            let end = (start + piece_len).min(len);
            let piece = token_columns(ids, len, start, end); // (batch, end - start)
            let h = self.forward_piece_host(&piece, (batch, end - start), state)?;
            let piece_rows = h.chunks_exact((end - start) * hidden);
            for (row, seq) in out.chunks_exact_mut(len * hidden).zip(piece_rows) {
                row[start * hidden..end * hidden].copy_from_slice(seq);
            }
        }
        Ok(Tensor::from_vec(out, (batch, len, hidden), &Device::Cpu)?)
    }

    /// Tokens per sequence in one piece of a host forward pass of `batch` sequences: the
    /// most, up to [`HOST_PIECE_MOST`] and in whole [`HOST_PIECE_STEP`]s, whose
    /// intermediates in the largest layer fit the kept scratch ([`SCRATCH_MAX`]), so that
    /// no layer makes fresh pages for them (at least one step);
    /// [`HOST_PIECE_THROUGH_TENSORS`] where a layer's mixer keeps no account of them.
    fn host_piece_len(&self, batch: usize) -> usize {
        let per_token = self
            .layers
            .iter()
            .map(|block| block.mixer.host_scratch_per_token())
            .try_fold(0, |most, layer| Some(layer?.max(most)));
        let Some(per_token) = per_token else {
            return HOST_PIECE_THROUGH_TENSORS;
        };
        let fitting = SCRATCH_MAX / (per_token * batch).max(1);
        (fitting / HOST_PIECE_STEP * HOST_PIECE_STEP).clamp(HOST_PIECE_STEP, HOST_PIECE_MOST)
    }

    /// The final-norm hidden states `(batch, len, hidden)` of `ids: (batch, len)` on the
    /// host, advancing `state`.
    fn forward_piece_host(
        &self,
        ids: &[u32],
        (batch, len): (usize, usize),
        state: &mut State,
    ) -> Result<Vec<f32>> {
        let mut h = vec![0.0f32; ids.len() * self.config.hidden_size()]; // (batch, len, hidden)
        self.embedding.rows_host(ids, &mut h)?;
        for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            block.forward_host(&mut h, (batch, len), layer_state)?;
        }
        self.norm_f.normalize_host(&mut h)?;
        state.tokens_seen += len;
        Ok(h)
    }

    /// Like [`Model::forward`], also recording every layer's output when `record` is set.
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        state: &mut State,
        record: bool,
    ) -> Result<HiddenStates> {
        check_state(state, self.layers.len())?;
        let embeddings = self.embedding.forward(ids, state.batch)?;
        let mut h = embeddings.clone();
        let mut layers = Vec::new();
        let mut balance_losses = Vec::new();
        for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            let (next, aux) = block.forward(&h, layer_state)?;
            h = next;
            balance_losses.extend(aux);
            if record {
                layers.push(h.clone());
            }
        }
        state.tokens_seen += ids.len() / state.batch;
        Ok(HiddenStates {
            embeddings,
            layers,
            final_norm: self.norm_f.forward(&h)?,
            router_aux_loss: mean_of_scalars(&balance_losses)?,
        })
    }

    /// Logits `(..., vocab)` of final-norm hidden states `(..., hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Processes a prompt `ids: (batch, L)` in one forward pass and returns the logits of
    /// its last position, `(batch, vocab)`.
    pub fn prefill(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        let hidden = self.forward(ids, state)?;
        self.last_position_logits(&hidden)
    }

    /// Like [`Model::prefill`], but runs `ids: (batch, L)` in chunks of at most `chunk_size`
    /// tokens per sequence, carrying the state from each chunk to the next. The activations
    /// alive at any time are those of one chunk, so memory does not grow with `L`, except
    /// for the key/value caches of attention layers, which hold every token by design.
    pub fn prefill_chunked(
        &self,
        ids: &[u32],
        state: &mut State,
        chunk_size: usize,
    ) -> Result<Tensor> {
        let len = sequence_length(ids.len(), state.batch)?;
        if chunk_size == 0 {
            return Err(Error::Input("the chunk size must be at least 1".into()));
        }
        let mut hidden = None;
        for start in (0..len).step_by(chunk_size) {
            let end = (start + chunk_size).min(len);
            hidden = Some(self.forward(&token_columns(ids, len, start, end), state)?);
        }
        let hidden = hidden.ok_or_else(|| Error::Input("the prompt is empty".into()))?;
        self.last_position_logits(&hidden)
    }

    /// Logits `(batch, vocab)` of the last position of hidden states `(batch, L, hidden)`.
    fn last_position_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let last = hidden.dim(1)? - 1;
        self.logits(&hidden.i((.., last, ..))?.contiguous()?)
    }

    /// Feeds one token per sequence (`ids: (batch)`) through the recurrent updates and
    /// returns the next-token logits `(batch, vocab)`.
    pub fn step(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        check_state(state, self.layers.len())?;
        if ids.len() != state.batch {
            return Err(Error::Input(format!(
                "{} tokens for a batch of {}",
                ids.len(),
                state.batch
            )));
        }
        if self.device().is_cpu() {
            return with_workers_awake(|| self.step_host(ids, state));
        }
        #[cfg(feature = "cuda")]
        if let Some(logits) = self.step_fused(ids, state)? {
            return Ok(logits);
        }
        let mut h = self.embedding.forward(ids, state.batch)?.squeeze(1)?;
        for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            h = block.step(&h, layer_state)?;
        }
        state.tokens_seen += 1;
        self.logits(&self.norm_f.forward(&h)?)
    }

    /// [`Model::step`] on host slices: the residual stream, the norms and the Mamba
    /// mixers' fused steps work in buffers kept from token to token, and every matrix goes
    /// through the matrix-vector kernels.
    fn step_host(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        let (batch, hidden) = (state.batch, self.config.hidden_size());
        let logits = with_scratch(&STREAM_SCRATCH, batch * hidden, |h| -> Result<Vec<f32>> {
            self.embedding.rows_host(ids, h)?;
            for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
                block.step_host(h, batch, layer_state)?;
            }
            self.norm_f.normalize_host(h)?;
            let mut logits = vec![0.0f32; batch * self.vocab_size()];
            self.lm_head.forward_host(h, &mut logits)?;
            Ok(logits)
        })?;
        state.tokens_seen += 1;
        Ok(Tensor::from_vec(
            logits,
            (batch, self.vocab_size()),
            &Device::Cpu,
        )?)
    }
}

#[cfg(feature = "cuda")]
impl Model {
    /// The weights the fused CUDA step reads, or `None` when a block has a feed-forward
    /// part or a mixer the fused step does not cover.
    fn fused_weights(&self) -> Option<crate::cuda_decode::ModelWeights<'_>> {
        use crate::cuda_decode::{BlockWeights, ModelWeights};
        let blocks = self
            .layers
            .iter()
            .map(|b| match b.feed_forward {
                Some(_) => None,
                None => Some(BlockWeights {
                    norm: &b.norm,
                    mixer: b.mixer.fused_decode_weights()?,
                }),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(ModelWeights {
            embedding: self.embedding.weight(),
            blocks,
            norm_f: &self.norm_f,
            lm_head: &self.lm_head,
            hidden: self.config.hidden_size(),
            vocab: self.vocab_size(),
        })
    }

    /// [`Model::step`] through the fused CUDA step, or `None` when the model does not fit
    /// it (or it is switched off): the caller then steps through candle's ops.
    fn step_fused(&self, ids: &[u32], state: &mut State) -> Result<Option<Tensor>> {
        let mut slot = self
            .fused
            .lock()
            .map_err(|_| Error::Input("the fused decoder's lock was poisoned".into()))?;
        slot.step(
            |batch| match self.fused_weights() {
                Some(w) => crate::cuda_decode::FusedDecoder::new(&w, self.device(), batch),
                None => Err(Error::Input(
                    "a layer is attention, has a feed-forward part or weighted Δ/B/C norms".into(),
                )),
            },
            ids,
            state,
        )
    }

    fn reset_fused_decode(&mut self) {
        if let Ok(slot) = self.fused.get_mut() {
            *slot = Default::default();
        }
    }
}

impl Model {
    /// Whether [`Model::step`] on a CUDA device may use the fused step (one CUDA graph per
    /// token; on by default). Off, every step goes through candle's ops, as for the
    /// families the fused step does not cover. Without the `cuda` feature there is nothing
    /// to switch.
    pub fn set_fused_decode(&self, on: bool) {
        #[cfg(feature = "cuda")]
        if let Ok(mut slot) = self.fused.lock() {
            slot.set_enabled(on);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = on;
    }

    /// How [`Model::step`] runs on this model's device, for reports: the host engine, the
    /// fused CUDA step, or candle's ops (with the reason the fused step was not used).
    pub fn decode_engine(&self) -> String {
        if self.device().is_cpu() {
            return "host step".into();
        }
        #[cfg(feature = "cuda")]
        if let Ok(slot) = self.fused.lock() {
            return slot.describe();
        }
        "candle ops".into()
    }
}

/// Runs `f` on a thread of rayon's pool, so that the parallel loops inside it start there
/// instead of each handing its work over from another thread. (Not [`with_workers_awake`]:
/// a prefill's q8_0 products run on candle's own thread pool, which a spinning rayon worker
/// would compete with; mamba-130m q8_0, 2048 tokens at 2 threads: 782-1 045 -> 620-643
/// tokens/s.)
fn in_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Runs `f` on one thread of rayon's pool while every other thread of it keeps taking work
/// until `f` returns, without going to sleep: for a decoding step, a chain of short parallel
/// products with serial bits between them (copies, the conv, norms), all on rayon's pool.
/// rayon's idle workers sleep after about 30 idle rounds, and each product then waited for
/// a futex wake (about 16 sleeps per mamba2-130m token at 2 threads). Kept awake, as
/// llama.cpp's spinning pool is, a 2-thread step took 3-6 % less (medians of 40
/// alternations, every format).
fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    let f = Mutex::new(Some(f));
    let result = Mutex::new(None);
    rayon::broadcast(|worker| {
        if worker.index() == 0 {
            let _done = SetOnDrop(&done);
            let f = f.lock().expect("taken once").take().expect("run once");
            let value = f();
            *result.lock().expect("set once") = Some(value);
        } else {
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
        }
    });
    result
        .into_inner()
        .expect("set once")
        .expect("worker 0 ran f")
}

/// Sets its flag when dropped, so that [`with_workers_awake`]'s helpers stop even if `f`
/// panics.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Block `i` of a model, from the tensors under `vb` (its `layers.{i}` folder).
fn load_block(vb: &VarBuilder, config: &ModelConfig, i: usize) -> Result<Block> {
    let norm = |name| RmsNorm::load(vb, name, config.hidden_size(), config.norm_epsilon());
    Ok(match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => Block::new(
            norm("norm.weight")?,
            Box::new(MambaMixer::load(&vb.pp("mixer"), &MixerSpec::from(c))?),
            None,
        ),
        ModelConfig::Mamba2(c) => Block::new(
            norm("norm.weight")?,
            Box::new(Mamba2Mixer::load(&vb.pp("mixer"), c)?),
            None,
        ),
        ModelConfig::Jamba(c) => crate::jamba::load_block(vb, c, i)?,
        ModelConfig::Hybrid(c) => crate::hybrid::load_block(vb, c, i)?,
        ModelConfig::MoeMamba(c) => crate::moe_mamba::load_block(vb, c)?,
    })
}

/// Tokens per sequence of `total` row-major ids for `batch` sequences.
fn sequence_length(total: usize, batch: usize) -> Result<usize> {
    if batch == 0 || total == 0 || !total.is_multiple_of(batch) {
        return Err(Error::Input(format!(
            "{total} tokens do not make {batch} non-empty sequences of equal length"
        )));
    }
    Ok(total / batch)
}

/// Most tokens per sequence in one piece of a host forward pass ([`Model::host_piece_len`]):
/// each piece widens and transposes every weight block of a product anew, so longer pieces
/// cost less, as long as their intermediates fit the kept scratch (mamba2-130m, 2048-token
/// prefill: in one piece instead of four, 4-12 % faster at 1 and 2 threads; in one piece whose
/// intermediates did not fit, 15-20 % slower, page faults in every layer).
const HOST_PIECE_MOST: usize = 2048;

/// The tokens per sequence of a host forward pass's pieces come in multiples of this (the
/// SSD's chunk length in the Mamba-2 checkpoints).
const HOST_PIECE_STEP: usize = 256;

/// Tokens per sequence in one piece of a host forward pass through a model with a mixer that
/// goes through the tensors (attention in Jamba, the hybrids and the Transformer baseline):
/// the pieces all models had before their length followed the scratch.
const HOST_PIECE_THROUGH_TENSORS: usize = 512;

/// Positions `start..end` of every sequence of `ids: (batch, len)`, row-major.
fn token_columns(ids: &[u32], len: usize, start: usize, end: usize) -> Vec<u32> {
    ids.chunks(len)
        .flat_map(|row| row[start..end].iter().copied())
        .collect()
}

/// The mean of scalar tensors, or `None` when there are none.
fn mean_of_scalars(values: &[Tensor]) -> Result<Option<Tensor>> {
    if values.is_empty() {
        return Ok(None);
    }
    let sum = Tensor::stack(values, 0)?.sum_all()?;
    Ok(Some((sum / values.len() as f64)?))
}

fn check_weight_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(Error::Input(format!(
            "weights in {other:?} are not supported: use f32 or bf16"
        ))),
    }
}

fn check_state(state: &State, layers: usize) -> Result<()> {
    if state.layers.len() == layers && state.batch > 0 {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "state has {} layers for a model of {layers}",
            state.layers.len()
        )))
    }
}

/// Candle's shape-mismatch and missing-tensor errors, reported as checkpoint errors.
fn checkpoint_err(e: impl Into<Error>) -> Error {
    match e.into() {
        Error::Candle(c) => Error::Checkpoint(c.to_string()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::{
        with_workers_awake, Model, HOST_PIECE_MOST, HOST_PIECE_STEP, HOST_PIECE_THROUGH_TENSORS,
    };
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool")
    }

    #[test]
    fn awake_workers_share_the_parallel_work_and_return_its_result() {
        for threads in [1, 2, 3] {
            let (sum, workers) = pool(threads).install(|| {
                with_workers_awake(|| {
                    let sum: u64 = (0..100_000u64).into_par_iter().sum();
                    let mut seen: Vec<usize> = (0..64)
                        .into_par_iter()
                        .map(|_| {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                            rayon::current_thread_index().expect("a worker")
                        })
                        .collect();
                    seen.sort_unstable();
                    seen.dedup();
                    (sum, seen.len())
                })
            });
            assert_eq!(sum, 100_000 * 99_999 / 2, "{threads} threads");
            assert_eq!(workers, threads, "every worker took a share");
        }
    }

    /// Models of Mamba mixers alone take pieces as long as their scratch holds (the whole
    /// 2048 for the 130m sizes at batch 1, shorter for larger batches and the 2.7b width);
    /// a model with attention layers keeps pieces of 512.
    #[test]
    fn prefill_pieces_follow_the_scratch_and_stay_short_with_attention() {
        use crate::config::preset;
        use candle_core::DType;
        let piece_len = |name: &str, batch: usize| {
            let model = Model::random(&preset(name).unwrap(), DType::F32, 0).unwrap();
            model.host_piece_len(batch)
        };
        assert_eq!(piece_len("mamba2-130m", 1), HOST_PIECE_MOST);
        assert_eq!(piece_len("mamba-130m", 1), HOST_PIECE_MOST);
        let batched = piece_len("mamba2-130m", 4);
        assert!(
            batched < HOST_PIECE_MOST && batched % HOST_PIECE_STEP == 0,
            "{batched}"
        );
        assert_eq!(piece_len("hybrid-130m", 1), HOST_PIECE_THROUGH_TENSORS);
    }

    #[test]
    fn a_panic_inside_stops_the_awake_workers_and_propagates() {
        let outcome = pool(2).install(|| {
            std::panic::catch_unwind(|| with_workers_awake(|| -> u32 { panic!("inside") }))
        });
        assert!(outcome.is_err());
    }
}
