//! `mamba_ssm` models with attention layers and/or MLPs, in `mamba_ssm`'s native
//! `config.json` form: `attn_layer_idx` picks the layers whose mixer is attention (`MHA`,
//! configured by `attn_cfg`), the others keep the SSM mixer of `ssm_cfg`, and
//! `d_intermediate > 0` puts a gated MLP after every mixer. A decoder-only Transformer is
//! such a model with every layer in `attn_layer_idx`.

use super::{hf_float, product, require_positive, Fields, Mamba2Config, MambaConfig, ModelConfig};
use crate::error::{Error, Result};
use serde_json::{json, Value};

/// `mamba_ssm`'s `GatedMLP` rounds its hidden width up to a multiple of this.
const MLP_WIDTH_MULTIPLE: usize = 128;

/// The SSM mixers of a `mamba_ssm` model. The inner config also carries the sizes the
/// whole model shares (vocabulary, `d_model`, `n_layer`, tied embeddings, norm epsilon),
/// exactly as the pure model of that kind would.
#[derive(Debug, Clone, PartialEq)]
pub enum SsmConfig {
    Mamba1(MambaConfig),
    Mamba2(Mamba2Config),
}

impl SsmConfig {
    pub fn vocab_size(&self) -> usize {
        match self {
            SsmConfig::Mamba1(c) => c.vocab_size,
            SsmConfig::Mamba2(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            SsmConfig::Mamba1(c) => c.hidden_size,
            SsmConfig::Mamba2(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            SsmConfig::Mamba1(c) => c.num_hidden_layers,
            SsmConfig::Mamba2(c) => c.num_hidden_layers,
        }
    }

    pub fn norm_epsilon(&self) -> f64 {
        match self {
            SsmConfig::Mamba1(c) => c.layer_norm_epsilon,
            SsmConfig::Mamba2(c) => c.layer_norm_epsilon,
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            SsmConfig::Mamba1(c) => c.tie_word_embeddings,
            SsmConfig::Mamba2(c) => c.tie_word_embeddings,
        }
    }

    /// The model without attention or MLPs.
    fn into_pure(self) -> ModelConfig {
        match self {
            SsmConfig::Mamba1(c) => ModelConfig::Mamba(c),
            SsmConfig::Mamba2(c) => ModelConfig::Mamba2(c),
        }
    }

    /// `ssm_cfg` as `mamba_ssm` reads it.
    fn to_native_json(&self) -> Value {
        match self {
            SsmConfig::Mamba1(c) => json!({
                "layer": "Mamba1",
                "d_state": c.state_size,
                "d_conv": c.conv_kernel,
                "expand": c.expand,
                "dt_rank": c.time_step_rank,
                "bias": c.use_bias,
                "conv_bias": c.use_conv_bias,
            }),
            SsmConfig::Mamba2(c) => {
                let mut v = json!({
                    "layer": "Mamba2",
                    "d_state": c.state_size,
                    "d_conv": c.conv_kernel,
                    "expand": c.expand,
                    "headdim": c.head_dim,
                    "ngroups": c.n_groups,
                    "chunk_size": c.chunk_size,
                    "bias": c.use_bias,
                    "conv_bias": c.use_conv_bias,
                    "norm_before_gate": c.norm_before_gate,
                });
                // Left out when it is mamba_ssm's default, whose infinity Python's json
                // module would not read back from the object form.
                if c.time_step_limit != (0.0, f64::INFINITY) {
                    let (lo, hi) = c.time_step_limit;
                    v["dt_limit"] = json!([hf_float(lo), hf_float(hi)]);
                }
                v
            }
        }
    }
}

/// The attention layers of a hybrid: `attn_layer_idx` and the `attn_cfg` of `mamba_ssm`'s
/// `MHA` (grouped key/value heads, rotary embedding of the first `rotary_emb_dim` features
/// of each head, causal).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayers {
    /// Layers whose mixer is attention, ascending and distinct.
    pub layer_idx: Vec<usize>,
    pub num_heads: usize,
    pub num_heads_kv: usize,
    pub head_dim: usize,
    /// Leading features of each head that the rotary embedding turns; 0 for none.
    pub rotary_emb_dim: usize,
    pub rotary_emb_base: f64,
    pub qkv_proj_bias: bool,
    pub out_proj_bias: bool,
}

impl AttentionLayers {
    fn to_native_json(&self) -> Value {
        json!({
            "num_heads": self.num_heads,
            "num_heads_kv": self.num_heads_kv,
            "head_dim": self.head_dim,
            "rotary_emb_dim": self.rotary_emb_dim,
            "rotary_emb_base": self.rotary_emb_base,
            "qkv_proj_bias": self.qkv_proj_bias,
            "out_proj_bias": self.out_proj_bias,
            "causal": true,
        })
    }
}

/// A `mamba_ssm` `MixerModel` with attention layers, MLPs, or both (`"hybrid"` family).
#[derive(Debug, Clone, PartialEq)]
pub struct HybridConfig {
    /// The mixer of every layer not in `attention.layer_idx`, and the model's sizes.
    pub ssm: SsmConfig,
    /// `None` when no layer is attention.
    pub attention: Option<AttentionLayers>,
    /// Requested hidden width of the gated MLP after each mixer; 0 for no MLP.
    pub d_intermediate: usize,
}

impl HybridConfig {
    /// Whether layer `i` mixes with attention (else with the SSM).
    pub fn is_attention_layer(&self, i: usize) -> bool {
        self.attention
            .as_ref()
            .is_some_and(|a| a.layer_idx.binary_search(&i).is_ok())
    }

    /// Hidden width of each gated MLP: `d_intermediate` rounded up to a multiple of 128,
    /// as `mamba_ssm`'s `GatedMLP` does; 0 without MLPs.
    pub fn mlp_width(&self) -> usize {
        self.d_intermediate.next_multiple_of(MLP_WIDTH_MULTIPLE)
    }

    /// What each layer is made of: `"attention"`, `"mamba"` or `"mamba2"`, with `"+mlp"`
    /// when a gated MLP follows the mixer.
    pub fn layer_layout(&self) -> Vec<String> {
        let ssm = match self.ssm {
            SsmConfig::Mamba1(_) => "mamba",
            SsmConfig::Mamba2(_) => "mamba2",
        };
        let mlp = if self.d_intermediate > 0 { "+mlp" } else { "" };
        (0..self.ssm.num_layers())
            .map(|i| {
                let mixer = if self.is_attention_layer(i) {
                    "attention"
                } else {
                    ssm
                };
                format!("{mixer}{mlp}")
            })
            .collect()
    }

    /// The native `config.json`, with the vocabulary already padded.
    pub(super) fn to_native_json(&self) -> Value {
        let (layer_idx, attn_cfg) = match &self.attention {
            Some(a) => (json!(a.layer_idx), a.to_native_json()),
            None => (json!([]), json!({})),
        };
        json!({
            "d_model": self.ssm.hidden_size(),
            "n_layer": self.ssm.num_layers(),
            "vocab_size": self.ssm.vocab_size(),
            "pad_vocab_size_multiple": 1,
            "ssm_cfg": self.ssm.to_native_json(),
            "attn_layer_idx": layer_idx,
            "attn_cfg": attn_cfg,
            "d_intermediate": self.d_intermediate,
            "rms_norm": true,
            "residual_in_fp32": true,
            "fused_add_norm": true,
            "tie_embeddings": self.ssm.tie_word_embeddings(),
        })
    }
}

/// The model a native config describes, given its parsed SSM part: a hybrid when it has
/// attention layers or MLPs, else the pure Mamba-1 or Mamba-2 model.
pub(super) fn native_model(f: &Fields, ssm: SsmConfig) -> Result<ModelConfig> {
    let attention = attention_layers(f, ssm.hidden_size(), ssm.num_layers())?;
    let d_intermediate = f.usize_or("d_intermediate", 0)?;
    if attention.is_none() && d_intermediate == 0 {
        return Ok(ssm.into_pure());
    }
    d_intermediate
        .checked_next_multiple_of(MLP_WIDTH_MULTIPLE)
        .and_then(|w| w.checked_mul(2))
        .ok_or_else(|| Error::Config("d_intermediate is too large".into()))?;
    Ok(ModelConfig::Hybrid(HybridConfig {
        ssm,
        attention,
        d_intermediate,
    }))
}

/// `attn_layer_idx` (sorted, deduplicated, each below `n_layer`) with its `attn_cfg`, or
/// `None` when the list is absent or empty.
fn attention_layers(f: &Fields, d_model: usize, n_layer: usize) -> Result<Option<AttentionLayers>> {
    let Some(list) = f.get("attn_layer_idx") else {
        return Ok(None);
    };
    let expected = "a list of layer indices";
    let items = list
        .as_array()
        .ok_or_else(|| f.invalid("attn_layer_idx", expected, list))?;
    let mut layer_idx = items
        .iter()
        .map(|v| super::as_usize(v).ok_or_else(|| f.invalid("attn_layer_idx", expected, list)))
        .collect::<Result<Vec<_>>>()?;
    if layer_idx.is_empty() {
        return Ok(None);
    }
    layer_idx.sort_unstable();
    layer_idx.dedup();
    if let Some(&bad) = layer_idx.iter().find(|&&i| i >= n_layer) {
        return Err(Error::Config(format!(
            "attn_layer_idx: layer {bad} does not exist in a model of n_layer = {n_layer}"
        )));
    }
    let cfg = f.child("attn_cfg")?;
    if cfg.get("num_heads").is_none() {
        return Err(Error::Config(
            "attn_cfg.num_heads is required when attn_layer_idx names layers".into(),
        ));
    }
    reject_mha_extras(&cfg)?;
    let num_heads = cfg.usize_or("num_heads", 0)?;
    require_positive("attn_cfg.num_heads", num_heads)?;
    let head_dim = match cfg.get("head_dim") {
        Some(_) => cfg.usize_or("head_dim", 0)?,
        None if d_model.is_multiple_of(num_heads) => d_model / num_heads,
        None => {
            return Err(Error::Config(format!(
                "attn_cfg.num_heads: d_model {d_model} is not a multiple of {num_heads} \
                 heads (give attn_cfg.head_dim)"
            )))
        }
    };
    let layers = AttentionLayers {
        layer_idx,
        num_heads,
        num_heads_kv: cfg.usize_or("num_heads_kv", num_heads)?,
        head_dim,
        rotary_emb_dim: cfg.usize_or("rotary_emb_dim", 0)?,
        rotary_emb_base: cfg.f64_or("rotary_emb_base", 10000.0)?,
        qkv_proj_bias: cfg.bool_or("qkv_proj_bias", true)?,
        out_proj_bias: cfg.bool_or("out_proj_bias", true)?,
    };
    validate_attention(&layers)?;
    Ok(Some(layers))
}

/// `MHA` options that the attention here does not implement.
fn reject_mha_extras(cfg: &Fields) -> Result<()> {
    if !cfg.bool_or("causal", false)? {
        return Err(Error::Config(
            "attn_cfg.causal must be true: a language model's attention is causal \
             (mamba_ssm's MHA defaults to false)"
                .into(),
        ));
    }
    for (key, what) in [
        ("d_conv", "a convolution over q, k and v"),
        ("mlp_dim", "an MLP fused into in_proj"),
    ] {
        if cfg.usize_or(key, 0)? != 0 {
            return Err(Error::Config(format!(
                "attn_cfg.{key}: attention with {what} is not supported"
            )));
        }
    }
    if cfg.bool_or("rotary_emb_interleaved", false)? {
        return Err(Error::Config(
            "attn_cfg.rotary_emb_interleaved: only the GPT-NeoX (half-split) rotary layout is supported"
                .into(),
        ));
    }
    if let Some(v) = cfg.get("softmax_scale") {
        return Err(Error::Config(format!(
            "attn_cfg.softmax_scale: only the default 1/sqrt(head_dim) is supported (got {v})"
        )));
    }
    Ok(())
}

fn validate_attention(a: &AttentionLayers) -> Result<()> {
    require_positive("attn_cfg.num_heads_kv", a.num_heads_kv)?;
    require_positive("attn_cfg.head_dim", a.head_dim)?;
    if !a.num_heads.is_multiple_of(a.num_heads_kv) {
        return Err(Error::Config(format!(
            "attn_cfg.num_heads {} is not a multiple of attn_cfg.num_heads_kv {}",
            a.num_heads, a.num_heads_kv
        )));
    }
    if !a.rotary_emb_dim.is_multiple_of(2) || a.rotary_emb_dim > a.head_dim {
        return Err(Error::Config(format!(
            "attn_cfg.rotary_emb_dim {} must be even and at most head_dim {}",
            a.rotary_emb_dim, a.head_dim
        )));
    }
    if !(a.rotary_emb_base.is_finite() && a.rotary_emb_base > 0.0) {
        return Err(Error::Config(format!(
            "attn_cfg.rotary_emb_base must be a positive number, got {}",
            a.rotary_emb_base
        )));
    }
    // The fused projection: (num_heads + 2 * num_heads_kv) * head_dim outputs.
    let heads = product("2 * attn_cfg.num_heads_kv", 2, a.num_heads_kv)?
        .checked_add(a.num_heads)
        .ok_or_else(|| Error::Config("attn_cfg.num_heads is too large".into()))?;
    product("attention width", heads, a.head_dim)?;
    Ok(())
}
