//! A causal language model made of pre-norm residual blocks around a sequence mixer,
//! shared by every family: `embed → [h + mixer(RMSNorm(h))]* → RMSNorm → lm_head`.

use crate::checkpoint::Checkpoint;
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::layers::{Embedding, Linear, RmsNorm};
use crate::mamba1::MambaMixer;
use crate::mamba2::Mamba2Mixer;
use crate::state::{LayerState, State};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

/// What a sequence mixer (the SSM part of a block) provides.
pub trait Mixer: Send + Sync + std::fmt::Debug {
    /// Per-sequence `(conv, ssm)` state sizes, in f32 values.
    fn state_sizes(&self) -> (usize, usize);
    /// Whole-sequence forward of `x: (b, L, hidden)` from `state`, which it advances.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor>;
    /// One token per sequence, `x: (b, hidden)`, through the recurrent updates.
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor>;
}

/// `h + mixer(RMSNorm(h))`.
#[derive(Debug)]
struct Block {
    norm: RmsNorm,
    mixer: Box<dyn Mixer>,
}

/// A loaded model of any supported family.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Block>,
    norm_f: RmsNorm,
    lm_head: Linear,
    weight_dtype: DType,
}

/// Per-layer outputs recorded by [`Model::forward_hidden`].
#[derive(Debug, Clone)]
pub struct HiddenStates {
    pub embeddings: Tensor,
    /// Residual stream after each layer.
    pub layers: Vec<Tensor>,
    /// Output of the final norm.
    pub final_norm: Tensor,
}

impl Model {
    /// Loads a checkpoint folder with its weights in `dtype` (f32 or bf16).
    pub fn load(checkpoint: &Checkpoint, dtype: DType) -> Result<Self> {
        check_weight_dtype(dtype)?;
        let vb = checkpoint.var_builder(dtype, &Device::Cpu)?;
        Self::from_var_builder(&vb, &checkpoint.config)
    }

    /// Builds the model from weights under their Hugging Face names.
    pub fn from_var_builder(vb: &VarBuilder, config: &ModelConfig) -> Result<Self> {
        let (h, v, eps) = match config {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
                (c.hidden_size, c.vocab_size, c.layer_norm_epsilon)
            }
            ModelConfig::Mamba2(c) => (c.hidden_size, c.vocab_size, c.layer_norm_epsilon),
        };
        let backbone = vb.pp("backbone");
        let embedding = backbone
            .get((v, h), "embeddings.weight")
            .map_err(checkpoint_err)?;
        let layers = (0..config.num_layers())
            .map(|i| {
                let lvb = backbone.pp(format!("layers.{i}"));
                let mixer: Box<dyn Mixer> = match config {
                    ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
                        Box::new(MambaMixer::load(&lvb.pp("mixer"), c)?)
                    }
                    ModelConfig::Mamba2(c) => Box::new(Mamba2Mixer::load(&lvb.pp("mixer"), c)?),
                };
                Ok(Block {
                    norm: RmsNorm::load(&lvb, "norm.weight", h, eps)?,
                    mixer,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(checkpoint_err)?;
        let tied = match config {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.tie_word_embeddings,
            ModelConfig::Mamba2(c) => c.tie_word_embeddings,
        };
        let lm_head = if tied || !vb.contains_tensor("lm_head.weight") {
            Linear::new(embedding.clone(), None)
        } else {
            Linear::load(vb, "lm_head", (v, h), false).map_err(checkpoint_err)?
        };
        Ok(Model {
            config: config.clone(),
            weight_dtype: embedding.dtype(),
            embedding: Embedding::new(embedding),
            layers,
            norm_f: RmsNorm::load(&backbone, "norm_f.weight", h, eps).map_err(checkpoint_err)?,
            lm_head,
        })
    }

    pub fn family(&self) -> Family {
        self.config.family()
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// A zero recurrent state for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> State {
        let sizes: Vec<(usize, usize)> =
            self.layers.iter().map(|l| l.mixer.state_sizes()).collect();
        State::zeros(batch, &sizes)
    }

    /// Runs `ids: (batch, L)` (row-major) from `state`, advancing it, and returns the
    /// final-norm hidden states `(batch, L, hidden)`.
    pub fn forward(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        Ok(self.forward_hidden(ids, state, false)?.final_norm)
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
        for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            h = (block.mixer.forward(&block.norm.forward(&h)?, layer_state)? + &h)?;
            if record {
                layers.push(h.clone());
            }
        }
        state.tokens_seen += ids.len() / state.batch;
        Ok(HiddenStates {
            embeddings,
            layers,
            final_norm: self.norm_f.forward(&h)?,
        })
    }

    /// Logits `(..., vocab)` of final-norm hidden states `(..., hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Processes a prompt `ids: (batch, L)` and returns the logits of its last position,
    /// `(batch, vocab)`.
    pub fn prefill(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        let hidden = self.forward(ids, state)?;
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
        let mut h = self.embedding.forward(ids, state.batch)?.squeeze(1)?;
        for (block, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            h = (block.mixer.step(&block.norm.forward(&h)?, layer_state)? + &h)?;
        }
        state.tokens_seen += 1;
        self.logits(&self.norm_f.forward(&h)?)
    }
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
