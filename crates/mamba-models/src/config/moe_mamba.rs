//! MoE-Mamba (Pióro et al., 2024): Mamba-1 layers, each followed by a sparse mixture of
//! gated-MLP experts. `MoEMambaForCausalLM` (`model_type` `"moe_mamba"`) is this project's
//! own architecture name: its `config.json` has transformers' `MambaConfig` keys (and
//! defaults) for the Mamba part plus
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `num_experts` | experts per layer | 8 |
//! | `num_experts_per_tok` | experts each token goes to (1: a switch layer) | 1 |
//! | `moe_intermediate_size` | hidden width of each expert | `intermediate_size` (the mixer width) |
//! | `router_aux_loss_coef` | weight of the load-balancing loss in training | 0.01 |
//!
//! With the default expert width one expert holds about as many parameters as one Mamba
//! layer, so a token's active parameters are those of a pure Mamba of twice the depth.

use super::{hf_mamba_config, product, require_epsilon, require_positive, Fields, MambaConfig};
use crate::error::{Error, Result};
use serde_json::{json, Value};

/// The configuration of a MoE-Mamba model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeMambaConfig {
    /// The Mamba-1 mixers and the model's sizes.
    pub mamba: MambaConfig,
    /// Hidden width of each expert's gated MLP.
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Weight of the router's load-balancing loss in the training objective.
    pub router_aux_loss_coef: f64,
}

impl MoeMambaConfig {
    /// What each layer is made of: `"mamba+moe"` throughout.
    pub fn layer_layout(&self) -> Vec<String> {
        vec!["mamba+moe".to_string(); self.mamba.num_hidden_layers]
    }

    pub(super) fn to_hf_json(&self) -> Value {
        let mut v = self.mamba.to_hf_json("MoEMambaForCausalLM", "moe_mamba");
        for (key, value) in [
            ("moe_intermediate_size", json!(self.moe_intermediate_size)),
            ("num_experts", json!(self.num_experts)),
            ("num_experts_per_tok", json!(self.num_experts_per_tok)),
            ("router_aux_loss_coef", json!(self.router_aux_loss_coef)),
        ] {
            v[key] = value;
        }
        v
    }
}

/// Parses a `MoEMambaForCausalLM` config.
pub(super) fn moe_mamba_config(f: &Fields) -> Result<MoeMambaConfig> {
    let mamba = hf_mamba_config(f, false)?;
    let config = MoeMambaConfig {
        moe_intermediate_size: f.usize_or("moe_intermediate_size", mamba.intermediate_size)?,
        num_experts: f.usize_or("num_experts", 8)?,
        num_experts_per_tok: f.usize_or("num_experts_per_tok", 1)?,
        router_aux_loss_coef: f.f64_or("router_aux_loss_coef", 0.01)?,
        mamba,
    };
    validate(&config)?;
    Ok(config)
}

fn validate(c: &MoeMambaConfig) -> Result<()> {
    require_positive("moe_intermediate_size", c.moe_intermediate_size)?;
    require_positive("num_experts", c.num_experts)?;
    require_positive("num_experts_per_tok", c.num_experts_per_tok)?;
    if c.num_experts_per_tok > c.num_experts {
        return Err(Error::Config(format!(
            "num_experts_per_tok {} exceeds num_experts {}",
            c.num_experts_per_tok, c.num_experts
        )));
    }
    require_epsilon("router_aux_loss_coef", c.router_aux_loss_coef)?;
    product(
        "moe_intermediate_size * hidden_size",
        c.moe_intermediate_size,
        c.mamba.hidden_size,
    )?;
    Ok(())
}
