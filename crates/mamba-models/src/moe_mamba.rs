//! MoE-Mamba (`MoEMambaForCausalLM`, see [`crate::config::moe_mamba`]): every Mamba-1
//! layer followed by a sparse mixture of gated-MLP experts.
//!
//! ```text
//! h = h + mamba(RMSNorm(h; norm))
//! h = h + MoE(RMSNorm(h; norm2))          top-k of num_experts, see moe.rs
//! ```
//!
//! Tensors live under `backbone.layers.{i}`: `norm.weight` and `mixer.*` as in
//! `MambaForCausalLM`, then `norm2.weight`, `moe.router.weight` `(E, d_model)` and, for
//! each expert `e`, `moe.experts.{e}.{gate_proj, up_proj}.weight` `(w, d_model)` and
//! `moe.experts.{e}.down_proj.weight` `(d_model, w)`.

use crate::config::MoeMambaConfig;
use crate::error::Result;
use crate::layers::RmsNorm;
use crate::mamba1::{MambaMixer, MixerSpec};
use crate::model::Block;
use crate::moe::{FeedForward, SparseMoe};
use candle_nn::VarBuilder;

/// A layer from the tensors under `vb` (its `layers.{i}` folder).
pub(crate) fn load_block(vb: &VarBuilder, c: &MoeMambaConfig) -> Result<Block> {
    let (h, eps) = (c.mamba.hidden_size, c.mamba.layer_norm_epsilon);
    let experts = SparseMoe::load(
        &vb.pp("moe"),
        h,
        c.moe_intermediate_size,
        c.num_experts,
        c.num_experts_per_tok,
    )?;
    Ok(Block::new(
        RmsNorm::load(vb, "norm.weight", h, eps)?,
        Box::new(MambaMixer::load(
            &vb.pp("mixer"),
            &MixerSpec::from(&c.mamba),
        )?),
        Some((
            RmsNorm::load(vb, "norm2.weight", h, eps)?,
            FeedForward::Experts(experts),
        )),
    ))
}
