//! Jamba (`JambaForCausalLM`): a stack of Mamba and attention layers, each followed by a
//! dense MLP or a mixture of experts.
//!
//! ```text
//! layer i mixes with   attention  if i % attn_layer_period   == attn_layer_offset,   else Mamba
//! layer i feeds with   experts    if i % expert_layer_period == expert_layer_offset, else an MLP
//!
//! h = h + mixer(RMSNorm(h; input_layernorm))
//! h = h + ffn(RMSNorm(h; pre_ff_layernorm))
//! ```
//!
//! The Mamba mixer is Mamba-1's with one difference: after `x_proj`, the low-rank Δ, B and C
//! each go through an RMSNorm with its own weight (`dt_layernorm`, `b_layernorm`,
//! `c_layernorm`). Attention is grouped-query attention without any positional encoding.
//! Tensors live under `model.layers.{i}.{mamba, self_attn, feed_forward}`.

use crate::attention::{Attention, AttentionSpec, ProjectionLayout};
use crate::config::JambaConfig;
use crate::error::Result;
use crate::layers::RmsNorm;
use crate::mamba1::{DtBcNorm, MambaMixer, MixerSpec};
use crate::model::{Block, Mixer};
use crate::moe::{FeedForward, GatedMlp, SparseMoe};
use candle_nn::VarBuilder;

/// The Mamba mixer of a Jamba layer.
pub fn mamba_spec(c: &JambaConfig) -> MixerSpec {
    MixerSpec {
        hidden_size: c.hidden_size,
        d_inner: c.mamba_d_inner(),
        state_size: c.mamba_d_state,
        dt_rank: c.mamba_dt_rank,
        conv_kernel: c.mamba_d_conv,
        proj_bias: c.mamba_proj_bias,
        conv_bias: c.mamba_conv_bias,
        dt_bc_norm: DtBcNorm::Weighted {
            eps: c.rms_norm_eps,
        },
    }
}

/// The attention mixer of a Jamba layer: no positional encoding.
pub fn attention_spec(c: &JambaConfig) -> AttentionSpec {
    AttentionSpec {
        hidden_size: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim(),
        rotary: None,
        layout: ProjectionLayout::Separate,
        qkv_bias: false,
        out_bias: false,
    }
}

/// What each layer is made of: `"mamba"` or `"attention"`, with `"+moe"` when its
/// feed-forward part is a mixture of experts (a dense MLP otherwise).
pub fn layer_layout(c: &JambaConfig) -> Vec<String> {
    (0..c.num_hidden_layers)
        .map(|i| {
            let mixer = if c.is_attention_layer(i) {
                "attention"
            } else {
                "mamba"
            };
            let ffn = if c.is_expert_layer(i) { "+moe" } else { "" };
            format!("{mixer}{ffn}")
        })
        .collect()
}

/// Layer `i` from the tensors under `vb` (its `layers.{i}` folder).
pub(crate) fn load_block(vb: &VarBuilder, c: &JambaConfig, i: usize) -> Result<Block> {
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let mixer: Box<dyn Mixer> = if c.is_attention_layer(i) {
        Box::new(Attention::load(&vb.pp("self_attn"), &attention_spec(c))?)
    } else {
        Box::new(MambaMixer::load(&vb.pp("mamba"), &mamba_spec(c))?)
    };
    let ffn_vb = vb.pp("feed_forward");
    let ffn = if c.is_expert_layer(i) {
        FeedForward::Experts(SparseMoe::load(
            &ffn_vb,
            h,
            c.intermediate_size,
            c.num_experts,
            c.num_experts_per_tok,
        )?)
    } else {
        FeedForward::Dense(GatedMlp::load(&ffn_vb, h, c.intermediate_size)?)
    };
    Ok(Block::new(
        RmsNorm::load(vb, "input_layernorm.weight", h, eps)?,
        mixer,
        Some((RmsNorm::load(vb, "pre_ff_layernorm.weight", h, eps)?, ffn)),
    ))
}
