//! `mamba_ssm`-style hybrids: a `MixerModel` whose layers mix with Mamba-1, Mamba-2 or
//! attention, each optionally followed by a gated MLP. With attention at every layer this
//! is a decoder-only Transformer (rotary attention, SwiGLU MLP, RMSNorm).
//!
//! ```text
//! layer i mixes with   attention (mamba_ssm's MHA)   if i in attn_layer_idx,  else the SSM of ssm_cfg
//! h = h + mixer(RMSNorm(h; norm))
//! h = h + mlp(RMSNorm(h; norm2))                     when d_intermediate > 0
//! mlp(x) = fc2(up * silu(gate)),  [up | gate] = fc1(x)
//! ```
//!
//! Tensor names: the ones this crate writes are `mamba_ssm`'s own, except that the
//! embedding goes by transformers' `backbone.embeddings.weight` (as for every Mamba family
//! here) where `mamba_ssm` writes `backbone.embedding.weight`; checkpoints with either name
//! load.
//!
//! | tensor | shape |
//! |---|---|
//! | `backbone.embeddings.weight` (`mamba_ssm`: `backbone.embedding.weight`) | `(vocab, d_model)` |
//! | `backbone.layers.{i}.norm.weight` | `(d_model)` |
//! | `backbone.layers.{i}.mixer.*` (SSM layers) | those of `MambaForCausalLM` / `Mamba2ForCausalLM` |
//! | `backbone.layers.{i}.mixer.in_proj.{weight,bias}` (attention) | `((H + 2G) d, d_model)`, rows `[q \| k \| v]` |
//! | `backbone.layers.{i}.mixer.out_proj.{weight,bias}` (attention) | `(d_model, H d)` |
//! | `backbone.layers.{i}.norm2.weight` | `(d_model)` |
//! | `backbone.layers.{i}.mlp.fc1.weight` | `(2 w, d_model)`, rows `[up \| gate]` |
//! | `backbone.layers.{i}.mlp.fc2.weight` | `(d_model, w)` |
//! | `backbone.norm_f.weight`, `lm_head.weight` (untied only) | |
//!
//! where `H`, `G`, `d` are `attn_cfg`'s `num_heads`, `num_heads_kv`, `head_dim`, the
//! biases exist when `qkv_proj_bias` / `out_proj_bias` say so, and the MLP width `w` is
//! `d_intermediate` rounded up to a multiple of 128 (as `mamba_ssm`'s `GatedMLP` does).

use crate::attention::{Attention, AttentionSpec, ProjectionLayout, RotarySpec};
use crate::config::{AttentionLayers, HybridConfig, SsmConfig};
use crate::error::Result;
use crate::layers::RmsNorm;
use crate::mamba1::{MambaMixer, MixerSpec};
use crate::mamba2::Mamba2Mixer;
use crate::model::{Block, Mixer};
use crate::moe::{FeedForward, GatedMlp};
use candle_nn::VarBuilder;

/// The attention mixer of a hybrid with `hidden_size` wide residuals.
pub fn attention_spec(a: &AttentionLayers, hidden_size: usize) -> AttentionSpec {
    AttentionSpec {
        hidden_size,
        heads: a.num_heads,
        kv_heads: a.num_heads_kv,
        head_dim: a.head_dim,
        rotary: (a.rotary_emb_dim > 0).then_some(RotarySpec {
            dim: a.rotary_emb_dim,
            base: a.rotary_emb_base,
        }),
        layout: ProjectionLayout::Fused,
        qkv_bias: a.qkv_proj_bias,
        out_bias: a.out_proj_bias,
    }
}

/// The mixer of layer `i`, from its `mixer` folder.
fn load_mixer(vb: &VarBuilder, c: &HybridConfig, i: usize) -> Result<Box<dyn Mixer>> {
    let hidden = c.ssm.hidden_size();
    Ok(match (&c.attention, &c.ssm) {
        (Some(a), _) if c.is_attention_layer(i) => {
            Box::new(Attention::load(vb, &attention_spec(a, hidden))?)
        }
        (_, SsmConfig::Mamba1(m)) => Box::new(MambaMixer::load(vb, &MixerSpec::from(m))?),
        (_, SsmConfig::Mamba2(m)) => Box::new(Mamba2Mixer::load(vb, m)?),
    })
}

/// Layer `i` from the tensors under `vb` (its `layers.{i}` folder).
pub(crate) fn load_block(vb: &VarBuilder, c: &HybridConfig, i: usize) -> Result<Block> {
    let (h, eps) = (c.ssm.hidden_size(), c.ssm.norm_epsilon());
    let mlp = if c.d_intermediate > 0 {
        Some((
            RmsNorm::load(vb, "norm2.weight", h, eps)?,
            FeedForward::Dense(GatedMlp::load_fused(&vb.pp("mlp"), h, c.mlp_width())?),
        ))
    } else {
        None
    };
    Ok(Block::new(
        RmsNorm::load(vb, "norm.weight", h, eps)?,
        load_mixer(&vb.pp("mixer"), c, i)?,
        mlp,
    ))
}
