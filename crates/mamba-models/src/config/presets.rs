//! Named configurations: the published `state-spaces` checkpoints, and hybrid, MoE-Mamba
//! and Transformer models sized to compare with them. All use the GPT-NeoX vocabulary of
//! 50277 tokens (padded) and tied embeddings.

use super::{parse_value, ModelConfig};
use crate::error::{Error, Result};
use serde_json::{json, Value};

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &[
    "mamba-130m",
    "mamba-370m",
    "mamba-790m",
    "mamba-1.4b",
    "mamba-2.8b",
    "mamba2-130m",
    "mamba2-370m",
    "mamba2-780m",
    "mamba2-1.3b",
    "mamba2-2.7b",
    "hybrid-130m",
    "moe-mamba-130m",
    "transformer-130m",
    "transformer-370m",
];

/// The configuration named `name` (one of [`PRESETS`]):
///
/// - `mamba-*`, `mamba2-*`: the published checkpoints, from the native `config.json` they
///   ship with (vocabulary padded to a multiple of 8 for Mamba, 16 for Mamba-2).
/// - `hybrid-130m`: a `mamba_ssm` hybrid at `d_model` 768: 12 layers of Mamba-2 (attention
///   at layers 3 and 9: 12 heads of 64, rotary over half of each head), each followed by a
///   gated MLP of width 1792; about as many parameters as `mamba2-130m`.
/// - `moe-mamba-130m`: 12 Mamba-1 layers of `mamba-130m`'s width, each followed by 8
///   experts of width 1536, one per token: 424 M parameters, of which a token uses about as
///   many as `mamba-130m` has (the MoE-Mamba paper's comparison).
/// - `transformer-130m`, `-370m`: decoder-only Transformers (rotary attention with 64-wide
///   heads, SwiGLU MLPs of width 8/3 `d_model`, RMSNorm, no biases) at `mamba-130m`'s and
///   `mamba-370m`'s `d_model`, with the layer count (13, 25) that matches their parameter
///   counts within 2 %.
pub fn preset(name: &str) -> Result<ModelConfig> {
    let json = preset_json(name).ok_or_else(|| {
        Error::Config(format!(
            "unknown preset {name:?}; valid presets are {}",
            PRESETS.join(", ")
        ))
    })?;
    parse_value(&json)
}

fn preset_json(name: &str) -> Option<Value> {
    Some(match name {
        "mamba-130m" => published("Mamba1", 768, 24),
        "mamba-370m" => published("Mamba1", 1024, 48),
        "mamba-790m" => published("Mamba1", 1536, 48),
        "mamba-1.4b" => published("Mamba1", 2048, 48),
        "mamba-2.8b" => published("Mamba1", 2560, 64),
        "mamba2-130m" => published("Mamba2", 768, 24),
        "mamba2-370m" => published("Mamba2", 1024, 48),
        "mamba2-780m" => published("Mamba2", 1536, 48),
        "mamba2-1.3b" => published("Mamba2", 2048, 48),
        "mamba2-2.7b" => published("Mamba2", 2560, 64),
        "hybrid-130m" => hybrid_130m(),
        "moe-mamba-130m" => moe_mamba_130m(),
        "transformer-130m" => transformer(768, 13, 2048),
        "transformer-370m" => transformer(1024, 25, 2816),
        _ => return None,
    })
}

/// A published `state-spaces` model of SSM `layer` (`"Mamba1"` or `"Mamba2"`).
fn published(layer: &str, d_model: usize, n_layer: usize) -> Value {
    json!({
        "d_model": d_model,
        "n_layer": n_layer,
        "vocab_size": 50277,
        "ssm_cfg": { "layer": layer },
        "rms_norm": true,
        "residual_in_fp32": true,
        "fused_add_norm": true,
        "pad_vocab_size_multiple": if layer == "Mamba1" { 8 } else { 16 },
        "tie_embeddings": true,
    })
}

fn hybrid_130m() -> Value {
    json!({
        "d_model": 768,
        "n_layer": 12,
        "vocab_size": 50277,
        "ssm_cfg": { "layer": "Mamba2" },
        "attn_layer_idx": [3, 9],
        "attn_cfg": {
            "num_heads": 12,
            "head_dim": 64,
            "rotary_emb_dim": 32,
            "causal": true,
        },
        "d_intermediate": 1792,
        "rms_norm": true,
        "residual_in_fp32": true,
        "fused_add_norm": true,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": true,
    })
}

fn moe_mamba_130m() -> Value {
    json!({
        "architectures": ["MoEMambaForCausalLM"],
        "vocab_size": 50280,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "state_size": 16,
        "expand": 2,
        "conv_kernel": 4,
        "num_experts": 8,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": 1536,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": true,
    })
}

/// Every layer attention followed by a gated MLP of width `d_intermediate`.
fn transformer(d_model: usize, n_layer: usize, d_intermediate: usize) -> Value {
    let head_dim = 64;
    json!({
        "d_model": d_model,
        "n_layer": n_layer,
        "vocab_size": 50277,
        "attn_layer_idx": (0..n_layer).collect::<Vec<_>>(),
        "attn_cfg": {
            "num_heads": d_model / head_dim,
            "head_dim": head_dim,
            "rotary_emb_dim": head_dim,
            "qkv_proj_bias": false,
            "out_proj_bias": false,
            "causal": true,
        },
        "d_intermediate": d_intermediate,
        "rms_norm": true,
        "residual_in_fp32": true,
        "fused_add_norm": true,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": true,
    })
}
