//! Model configurations: Hugging Face `config.json` files, the `mamba_ssm` native
//! `config.json` form (pure Mamba-1/Mamba-2 models, and hybrids with attention layers and
//! MLPs: [`hybrid`]), this project's `MoEMambaForCausalLM` ([`moe_mamba`]), and presets.
//!
//! Missing keys take the defaults of transformers' `MambaConfig`, `FalconMambaConfig`,
//! `Mamba2Config` and `JambaConfig` (or of `mamba_ssm`'s `MambaConfig`, mixers and `MHA`
//! for the native form).

pub mod hybrid;
pub mod moe_mamba;
mod presets;

pub use hybrid::{AttentionLayers, HybridConfig, SsmConfig};
pub use moe_mamba::MoeMambaConfig;
pub use presets::{preset, PRESETS};

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// The model families this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Mamba,
    FalconMamba,
    Mamba2,
    /// Mamba-1 and attention layers, each followed by a dense or mixture-of-experts MLP.
    Jamba,
    /// A `mamba_ssm` model with attention layers and/or gated MLPs (Transformers included).
    Hybrid,
    /// Mamba-1 layers, each followed by a mixture of experts.
    MoeMamba,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Mamba => "mamba",
            Family::FalconMamba => "falcon_mamba",
            Family::Mamba2 => "mamba2",
            Family::Jamba => "jamba",
            Family::Hybrid => "hybrid",
            Family::MoeMamba => "moe_mamba",
        })
    }
}

/// Hyper-parameters of a Mamba-1 or FalconMamba model.
#[derive(Debug, Clone, PartialEq)]
pub struct MambaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub state_size: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_epsilon: f64,
    pub expand: usize,
    /// `d_inner`, the width of the mixer (`expand * hidden_size` unless given).
    pub intermediate_size: usize,
    pub conv_kernel: usize,
    /// Bias on `in_proj` and `out_proj`.
    pub use_bias: bool,
    pub use_conv_bias: bool,
    /// Rank of the Δ projection (`dt_proj` input width).
    pub time_step_rank: usize,
    pub tie_word_embeddings: bool,
    /// Epsilon of the weightless RMS norms on Δ, B and C: `Some` only for FalconMamba.
    pub mixer_rms_eps: Option<f64>,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// Hyper-parameters of a Mamba-2 model.
#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub state_size: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_epsilon: f64,
    pub expand: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub n_groups: usize,
    pub chunk_size: usize,
    pub conv_kernel: usize,
    /// Bias on `in_proj` and `out_proj`.
    pub use_bias: bool,
    pub use_conv_bias: bool,
    /// Clamp applied to Δ after the softplus; `(0, inf)` is no clamp.
    pub time_step_limit: (f64, f64),
    pub tie_word_embeddings: bool,
    /// Whether the gated output norm normalises before multiplying by `silu(z)`.
    pub norm_before_gate: bool,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Mamba2Config {
    /// Width of the SSM input: `num_heads * head_dim`.
    pub fn d_inner(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Channels through the convolution: `x`, `B` and `C`, i.e. `d_inner + 2 * n_groups * state_size`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_groups * self.state_size
    }
}

/// Hyper-parameters of a Jamba model (`JambaForCausalLM`).
#[derive(Debug, Clone, PartialEq)]
pub struct JambaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the gated MLPs (the dense one and every expert).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Layer `i` has experts when `i % expert_layer_period == expert_layer_offset`
    /// (and `num_experts > 1`).
    pub expert_layer_period: usize,
    pub expert_layer_offset: usize,
    /// Layer `i` is attention when `i % attn_layer_period == attn_layer_offset`, else Mamba.
    pub attn_layer_period: usize,
    pub attn_layer_offset: usize,
    pub mamba_d_state: usize,
    pub mamba_d_conv: usize,
    pub mamba_expand: usize,
    /// Rank of the Δ projection (`"auto"` in the file resolves to `ceil(hidden_size / 16)`).
    pub mamba_dt_rank: usize,
    pub mamba_conv_bias: bool,
    /// Bias on the Mamba `in_proj` and `out_proj`.
    pub mamba_proj_bias: bool,
    /// Epsilon of every RMSNorm, the Δ, B and C norms of the Mamba mixers included.
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Weight of the routers' load-balancing loss in the training objective.
    pub router_aux_loss_coef: f64,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl JambaConfig {
    /// Whether layer `i` mixes with attention (else with a Mamba mixer).
    pub fn is_attention_layer(&self, i: usize) -> bool {
        i % self.attn_layer_period == self.attn_layer_offset
    }

    /// Whether layer `i`'s feed-forward part is a mixture of experts (else a dense MLP).
    pub fn is_expert_layer(&self, i: usize) -> bool {
        self.num_experts > 1 && i % self.expert_layer_period == self.expert_layer_offset
    }

    /// Width of one attention head: `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the Mamba mixers: `mamba_expand * hidden_size`.
    pub fn mamba_d_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["JambaForCausalLM"],
            "model_type": "jamba",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "expert_layer_period": self.expert_layer_period,
            "expert_layer_offset": self.expert_layer_offset,
            "attn_layer_period": self.attn_layer_period,
            "attn_layer_offset": self.attn_layer_offset,
            "mamba_d_state": self.mamba_d_state,
            "mamba_d_conv": self.mamba_d_conv,
            "mamba_expand": self.mamba_expand,
            "mamba_dt_rank": self.mamba_dt_rank,
            "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "hidden_act": "silu",
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        })
    }
}

/// A float as Hugging Face writes it in `config.json`: infinities as `{"__float__": "Infinity"}`.
fn hf_float(v: f64) -> serde_json::Value {
    match v {
        f64::INFINITY => serde_json::json!({ "__float__": "Infinity" }),
        f64::NEG_INFINITY => serde_json::json!({ "__float__": "-Infinity" }),
        v => serde_json::json!(v),
    }
}

impl MambaConfig {
    fn to_hf_json(&self, architecture: &str, model_type: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "state_size": self.state_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "expand": self.expand,
            "intermediate_size": self.intermediate_size,
            "conv_kernel": self.conv_kernel,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "time_step_rank": self.time_step_rank,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "residual_in_fp32": true,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        if let Some(eps) = self.mixer_rms_eps {
            v["mixer_rms_eps"] = serde_json::json!(eps);
        }
        v
    }
}

impl Mamba2Config {
    fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "state_size": self.state_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "expand": self.expand,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "n_groups": self.n_groups,
            "chunk_size": self.chunk_size,
            "conv_kernel": self.conv_kernel,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "time_step_limit": [hf_float(self.time_step_limit.0), hf_float(self.time_step_limit.1)],
            "tie_word_embeddings": self.tie_word_embeddings,
            "norm_before_gate": self.norm_before_gate,
            "hidden_act": "silu",
            "rms_norm": true,
            "residual_in_fp32": true,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        })
    }
}

/// A parsed and validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Mamba(MambaConfig),
    FalconMamba(MambaConfig),
    Mamba2(Mamba2Config),
    Jamba(JambaConfig),
    Hybrid(HybridConfig),
    MoeMamba(MoeMambaConfig),
}

impl ModelConfig {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        parse_config(&text, path).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(s: &str) -> Result<Self> {
        parse_config(s, Path::new("<config string>"))
    }

    /// The `config.json` for this configuration (what `save_pretrained` would write,
    /// limited to the keys this crate reads; for hybrids, which transformers has no class
    /// for, `mamba_ssm`'s native form); parsing it gives `self` back.
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self {
            ModelConfig::Mamba(c) => c.to_hf_json("MambaForCausalLM", "mamba"),
            ModelConfig::FalconMamba(c) => c.to_hf_json("FalconMambaForCausalLM", "falcon_mamba"),
            ModelConfig::Mamba2(c) => c.to_hf_json(),
            ModelConfig::Jamba(c) => c.to_hf_json(),
            ModelConfig::Hybrid(c) => c.to_native_json(),
            ModelConfig::MoeMamba(c) => c.to_hf_json(),
        }
    }

    /// The model family.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Mamba(_) => Family::Mamba,
            ModelConfig::FalconMamba(_) => Family::FalconMamba,
            ModelConfig::Mamba2(_) => Family::Mamba2,
            ModelConfig::Jamba(_) => Family::Jamba,
            ModelConfig::Hybrid(_) => Family::Hybrid,
            ModelConfig::MoeMamba(_) => Family::MoeMamba,
        }
    }

    /// Rows of the embedding matrix (and logits per token).
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.vocab_size,
            ModelConfig::Mamba2(c) => c.vocab_size,
            ModelConfig::Jamba(c) => c.vocab_size,
            ModelConfig::Hybrid(c) => c.ssm.vocab_size(),
            ModelConfig::MoeMamba(c) => c.mamba.vocab_size,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.hidden_size,
            ModelConfig::Mamba2(c) => c.hidden_size,
            ModelConfig::Jamba(c) => c.hidden_size,
            ModelConfig::Hybrid(c) => c.ssm.hidden_size(),
            ModelConfig::MoeMamba(c) => c.mamba.hidden_size,
        }
    }

    /// Number of mixer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.num_hidden_layers,
            ModelConfig::Mamba2(c) => c.num_hidden_layers,
            ModelConfig::Jamba(c) => c.num_hidden_layers,
            ModelConfig::Hybrid(c) => c.ssm.num_layers(),
            ModelConfig::MoeMamba(c) => c.mamba.num_hidden_layers,
        }
    }

    /// Epsilon of the block and final RMSNorms.
    pub fn norm_epsilon(&self) -> f64 {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.layer_norm_epsilon,
            ModelConfig::Mamba2(c) => c.layer_norm_epsilon,
            ModelConfig::Jamba(c) => c.rms_norm_eps,
            ModelConfig::Hybrid(c) => c.ssm.norm_epsilon(),
            ModelConfig::MoeMamba(c) => c.mamba.layer_norm_epsilon,
        }
    }

    /// Whether the output head reuses the embedding matrix.
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.tie_word_embeddings,
            ModelConfig::Mamba2(c) => c.tie_word_embeddings,
            ModelConfig::Jamba(c) => c.tie_word_embeddings,
            ModelConfig::Hybrid(c) => c.ssm.tie_word_embeddings(),
            ModelConfig::MoeMamba(c) => c.mamba.tie_word_embeddings,
        }
    }

    /// The end-of-sequence token, when the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.eos_token_id,
            ModelConfig::Mamba2(c) => c.eos_token_id,
            ModelConfig::Jamba(c) => c.eos_token_id,
            // The native form names no special tokens.
            ModelConfig::Hybrid(_) => None,
            ModelConfig::MoeMamba(c) => c.mamba.eos_token_id,
        }
    }

    /// Weight of the routers' load-balancing loss in the training objective (0 for models
    /// without experts).
    pub fn router_aux_loss_coef(&self) -> f64 {
        match self {
            ModelConfig::Jamba(c) => c.router_aux_loss_coef,
            ModelConfig::MoeMamba(c) => c.router_aux_loss_coef,
            _ => 0.0,
        }
    }

    /// What each layer is made of, for the families that mix layer kinds (`None` for the
    /// pure Mamba families).
    pub fn layer_layout(&self) -> Option<Vec<String>> {
        match self {
            ModelConfig::Jamba(c) => Some(crate::jamba::layer_layout(c)),
            ModelConfig::Hybrid(c) => Some(c.layer_layout()),
            ModelConfig::MoeMamba(c) => Some(c.layer_layout()),
            _ => None,
        }
    }
}

/// Parses a config text; `origin` names it in JSON errors.
fn parse_config(text: &str, origin: &Path) -> Result<ModelConfig> {
    let value: Value =
        serde_json::from_str(&quote_non_finite(text)).map_err(|cause| Error::Json {
            path: PathBuf::from(origin),
            cause,
        })?;
    parse_value(&value)
}

/// Parses a `config.json` already read as JSON.
fn parse_value(value: &Value) -> Result<ModelConfig> {
    let fields = Fields::root(as_object(value)?);
    let config = match config_form(&fields)? {
        ConfigForm::HuggingFace(Family::Mamba) => {
            ModelConfig::Mamba(hf_mamba_config(&fields, false)?)
        }
        ConfigForm::HuggingFace(Family::FalconMamba) => {
            ModelConfig::FalconMamba(hf_mamba_config(&fields, true)?)
        }
        ConfigForm::HuggingFace(Family::Mamba2) => ModelConfig::Mamba2(hf_mamba2_config(&fields)?),
        ConfigForm::HuggingFace(Family::Jamba) => ModelConfig::Jamba(hf_jamba_config(&fields)?),
        ConfigForm::HuggingFace(Family::MoeMamba) => {
            ModelConfig::MoeMamba(moe_mamba::moe_mamba_config(&fields)?)
        }
        // Hybrids have the native form only: no architecture or model type names them.
        ConfigForm::HuggingFace(Family::Hybrid) | ConfigForm::Native => native_config(&fields)?,
    };
    Ok(config)
}

fn as_object(value: &Value) -> Result<&Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| Error::Config("the top level must be a JSON object".into()))
}

/// Rewrites the bare `Infinity`, `-Infinity` and `NaN` tokens that Python's `json.dumps`
/// writes (invalid JSON) into the `{"__float__": ...}` objects transformers 5 writes.
/// Text inside strings is left alone.
fn quote_non_finite(text: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
                out.push_str(&format!("{{\"__float__\": \"{token}\"}}"));
                rest = &rest[token.len()..];
                continue;
            }
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Which schema a config follows.
enum ConfigForm {
    HuggingFace(Family),
    /// `mamba_ssm`'s `MambaConfig` (`d_model`, `n_layer`, `ssm_cfg`, ...).
    Native,
}

/// Identifies the schema from `architectures[0]`, else `model_type`, else the native `d_model` key.
fn config_form(fields: &Fields) -> Result<ConfigForm> {
    let first_arch = match fields.get("architectures") {
        Some(Value::Array(list)) => list.first(),
        None => None,
        Some(other) => return Err(fields.invalid("architectures", "a list of class names", other)),
    };
    if let Some(arch) = first_arch {
        let name = arch
            .as_str()
            .ok_or_else(|| fields.invalid("architectures", "a list of class names", arch))?;
        return family_of_architecture(name)
            .map(ConfigForm::HuggingFace)
            .ok_or_else(|| Error::UnknownArchitecture(name.to_string()));
    }
    if let Some(model_type) = fields.get("model_type") {
        let name = model_type
            .as_str()
            .ok_or_else(|| fields.invalid("model_type", "a string", model_type))?;
        return family_of_model_type(name)
            .map(ConfigForm::HuggingFace)
            .ok_or_else(|| Error::UnknownArchitecture(name.to_string()));
    }
    if fields.get("d_model").is_some() {
        return Ok(ConfigForm::Native);
    }
    Err(Error::Config(
        "cannot tell the model family: no `architectures`, `model_type` or (native) `d_model` key"
            .into(),
    ))
}

fn family_of_architecture(name: &str) -> Option<Family> {
    match name {
        "MambaForCausalLM" | "MambaModel" => Some(Family::Mamba),
        "FalconMambaForCausalLM" | "FalconMambaModel" => Some(Family::FalconMamba),
        "Mamba2ForCausalLM" | "Mamba2Model" => Some(Family::Mamba2),
        "JambaForCausalLM" | "JambaModel" => Some(Family::Jamba),
        "MoEMambaForCausalLM" => Some(Family::MoeMamba),
        _ => None,
    }
}

fn family_of_model_type(name: &str) -> Option<Family> {
    match name {
        "mamba" => Some(Family::Mamba),
        "falcon_mamba" => Some(Family::FalconMamba),
        "mamba2" => Some(Family::Mamba2),
        "jamba" => Some(Family::Jamba),
        "moe_mamba" => Some(Family::MoeMamba),
        _ => None,
    }
}

/// A Hugging Face `MambaConfig` (or `FalconMambaConfig` when `falcon`).
fn hf_mamba_config(f: &Fields, falcon: bool) -> Result<MambaConfig> {
    let hidden_size = f.usize_or("hidden_size", 768)?;
    let expand = f.usize_or("expand", 2)?;
    let config = MambaConfig {
        vocab_size: f.usize_or("vocab_size", 50280)?,
        hidden_size,
        state_size: f.usize_or("state_size", 16)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", 32)?,
        layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
        expand,
        intermediate_size: f.usize_or(
            "intermediate_size",
            product("expand * hidden_size", expand, hidden_size)?,
        )?,
        conv_kernel: f.usize_or("conv_kernel", 4)?,
        use_bias: f.bool_or("use_bias", false)?,
        use_conv_bias: f.bool_or("use_conv_bias", true)?,
        time_step_rank: f.rank_or_auto("time_step_rank", hidden_size)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        mixer_rms_eps: if falcon {
            Some(f.f64_or("mixer_rms_eps", 1e-6)?)
        } else {
            None
        },
        eos_token_id: f.token_id_or("eos_token_id", Some(0))?,
        bos_token_id: f.token_id_or("bos_token_id", Some(0))?,
        pad_token_id: f.token_id_or("pad_token_id", Some(0))?,
    };
    validate_mamba(&config)?;
    Ok(config)
}

/// A Hugging Face `Mamba2Config`.
fn hf_mamba2_config(f: &Fields) -> Result<Mamba2Config> {
    let config = Mamba2Config {
        vocab_size: f.usize_or("vocab_size", 32768)?,
        hidden_size: f.usize_or("hidden_size", 4096)?,
        state_size: f.usize_or("state_size", 128)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", 64)?,
        layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
        expand: f.usize_or("expand", 2)?,
        num_heads: f.usize_or("num_heads", 128)?,
        head_dim: f.usize_or("head_dim", 64)?,
        n_groups: f.usize_or("n_groups", 8)?,
        chunk_size: f.usize_or("chunk_size", 256)?,
        conv_kernel: f.usize_or("conv_kernel", 4)?,
        use_bias: f.bool_or("use_bias", false)?,
        use_conv_bias: f.bool_or("use_conv_bias", true)?,
        time_step_limit: f.limit_or("time_step_limit", (0.0, f64::INFINITY))?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        norm_before_gate: f.bool_or("norm_before_gate", false)?,
        eos_token_id: f.token_id_or("eos_token_id", Some(2))?,
        bos_token_id: f.token_id_or("bos_token_id", Some(0))?,
        pad_token_id: f.token_id_or("pad_token_id", Some(1))?,
    };
    validate_mamba2(&config)?;
    Ok(config)
}

/// A Hugging Face `JambaConfig`.
fn hf_jamba_config(f: &Fields) -> Result<JambaConfig> {
    reject_jamba_extras(f)?;
    let hidden_size = f.usize_or("hidden_size", 4096)?;
    let num_attention_heads = f.usize_or("num_attention_heads", 32)?;
    // transformers reads an explicit null as "one key/value head per query head".
    let num_key_value_heads = match f.raw("num_key_value_heads") {
        Some(Value::Null) => num_attention_heads,
        _ => f.usize_or("num_key_value_heads", 8)?,
    };
    let config = JambaConfig {
        vocab_size: f.usize_or("vocab_size", 65536)?,
        hidden_size,
        intermediate_size: f.usize_or("intermediate_size", 14336)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", 32)?,
        num_attention_heads,
        num_key_value_heads,
        num_experts: f.usize_or("num_experts", 16)?,
        num_experts_per_tok: f.usize_or("num_experts_per_tok", 2)?,
        expert_layer_period: f.usize_or("expert_layer_period", 2)?,
        expert_layer_offset: f.usize_or("expert_layer_offset", 1)?,
        attn_layer_period: f.usize_or("attn_layer_period", 8)?,
        attn_layer_offset: f.usize_or("attn_layer_offset", 4)?,
        mamba_d_state: f.usize_or("mamba_d_state", 16)?,
        mamba_d_conv: f.usize_or("mamba_d_conv", 4)?,
        mamba_expand: f.usize_or("mamba_expand", 2)?,
        mamba_dt_rank: f.rank_or_auto("mamba_dt_rank", hidden_size)?,
        mamba_conv_bias: f.bool_or("mamba_conv_bias", true)?,
        mamba_proj_bias: f.bool_or("mamba_proj_bias", false)?,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        router_aux_loss_coef: f.f64_or("router_aux_loss_coef", 0.001)?,
        eos_token_id: f.token_id_or("eos_token_id", Some(2))?,
        bos_token_id: f.token_id_or("bos_token_id", Some(1))?,
        pad_token_id: f.token_id_or("pad_token_id", Some(0))?,
    };
    validate_jamba(&config)?;
    Ok(config)
}

/// Jamba options that change the numerics and are not implemented.
fn reject_jamba_extras(f: &Fields) -> Result<()> {
    if let Some(v) = f.get("hidden_act") {
        if v.as_str() != Some("silu") {
            return Err(f.invalid(
                "hidden_act",
                "\"silu\" (the only MLP activation supported)",
                v,
            ));
        }
    }
    if let Some(v) = f.get("sliding_window") {
        return Err(Error::Config(format!(
            "sliding_window: sliding-window attention is not supported (got {v}); use null"
        )));
    }
    Ok(())
}

/// A `mamba_ssm` native config: `ssm_cfg.layer` picks Mamba-1 (default) or Mamba-2 for
/// the SSM layers; `attn_layer_idx` and `d_intermediate` make it a hybrid.
/// The file names no special tokens, so the token ids are `None`.
fn native_config(f: &Fields) -> Result<ModelConfig> {
    if !f.bool_or("rms_norm", true)? {
        return Err(Error::Config(
            "rms_norm: LayerNorm models (rms_norm = false) are not supported".into(),
        ));
    }
    let ssm = f.child("ssm_cfg")?;
    let layer = match ssm.get("layer") {
        None => "Mamba1",
        Some(v) => v
            .as_str()
            .ok_or_else(|| ssm.invalid("layer", "a string", v))?,
    };
    let ssm = match layer {
        "Mamba1" => SsmConfig::Mamba1(native_mamba1(f, &ssm)?),
        "Mamba2" => SsmConfig::Mamba2(native_mamba2(f, &ssm)?),
        other => {
            return Err(Error::Config(format!(
                "ssm_cfg.layer: unsupported layer {other:?} (expected \"Mamba1\" or \"Mamba2\")"
            )))
        }
    };
    hybrid::native_model(f, ssm)
}

/// Shared native fields: `(vocab_size padded, d_model, n_layer, tie_embeddings)`.
fn native_common(f: &Fields) -> Result<(usize, usize, usize, bool)> {
    let multiple = f.usize_or("pad_vocab_size_multiple", 8)?;
    require_positive("pad_vocab_size_multiple", multiple)?;
    let vocab = f
        .usize_or("vocab_size", 50277)?
        .checked_next_multiple_of(multiple)
        .ok_or_else(|| Error::Config("vocab_size is too large".into()))?;
    Ok((
        vocab,
        f.usize_or("d_model", 2560)?,
        f.usize_or("n_layer", 64)?,
        f.bool_or("tie_embeddings", true)?,
    ))
}

/// A native Mamba-1 model (`mamba_ssm.modules.mamba_simple.Mamba` defaults).
fn native_mamba1(f: &Fields, ssm: &Fields) -> Result<MambaConfig> {
    let (vocab_size, hidden_size, num_hidden_layers, tie_word_embeddings) = native_common(f)?;
    let expand = ssm.usize_or("expand", 2)?;
    let config = MambaConfig {
        vocab_size,
        hidden_size,
        state_size: ssm.usize_or("d_state", 16)?,
        num_hidden_layers,
        layer_norm_epsilon: 1e-5,
        expand,
        intermediate_size: product("ssm_cfg.expand * d_model", expand, hidden_size)?,
        conv_kernel: ssm.usize_or("d_conv", 4)?,
        use_bias: ssm.bool_or("bias", false)?,
        use_conv_bias: ssm.bool_or("conv_bias", true)?,
        time_step_rank: ssm.rank_or_auto("dt_rank", hidden_size)?,
        tie_word_embeddings,
        mixer_rms_eps: None,
        eos_token_id: None,
        bos_token_id: None,
        pad_token_id: None,
    };
    validate_mamba(&config)?;
    Ok(config)
}

/// A native Mamba-2 model (`mamba_ssm.modules.mamba2.Mamba2` defaults); the number of
/// heads is `expand * d_model / headdim`.
fn native_mamba2(f: &Fields, ssm: &Fields) -> Result<Mamba2Config> {
    let (vocab_size, hidden_size, num_hidden_layers, tie_word_embeddings) = native_common(f)?;
    let expand = ssm.usize_or("expand", 2)?;
    let d_inner = product("ssm_cfg.expand * d_model", expand, hidden_size)?;
    let head_dim = ssm.usize_or("headdim", 64)?;
    reject_native_mamba2_extras(ssm, d_inner)?;
    if head_dim == 0 || !d_inner.is_multiple_of(head_dim) {
        return Err(Error::Config(format!(
            "ssm_cfg.headdim: expand * d_model = {d_inner} is not a multiple of headdim {head_dim}"
        )));
    }
    let config = Mamba2Config {
        vocab_size,
        hidden_size,
        state_size: ssm.usize_or("d_state", 128)?,
        num_hidden_layers,
        layer_norm_epsilon: 1e-5,
        expand,
        num_heads: d_inner / head_dim,
        head_dim,
        n_groups: ssm.usize_or("ngroups", 1)?,
        chunk_size: ssm.usize_or("chunk_size", 256)?,
        conv_kernel: ssm.usize_or("d_conv", 4)?,
        use_bias: ssm.bool_or("bias", false)?,
        use_conv_bias: ssm.bool_or("conv_bias", true)?,
        time_step_limit: ssm.limit_or("dt_limit", (0.0, f64::INFINITY))?,
        tie_word_embeddings,
        norm_before_gate: ssm.bool_or("norm_before_gate", false)?,
        eos_token_id: None,
        bos_token_id: None,
        pad_token_id: None,
    };
    validate_mamba2(&config)?;
    Ok(config)
}

/// Native Mamba-2 mixer options that the models here do not implement.
fn reject_native_mamba2_extras(ssm: &Fields, d_inner: usize) -> Result<()> {
    if ssm.usize_or("d_ssm", d_inner)? != d_inner {
        return Err(Error::Config(
            "ssm_cfg.d_ssm: a partial SSM width (d_ssm != expand * d_model) is not supported"
                .into(),
        ));
    }
    if ssm.bool_or("D_has_hdim", false)? {
        return Err(Error::Config(
            "ssm_cfg.D_has_hdim: a D per channel is not supported".into(),
        ));
    }
    if !ssm.bool_or("rmsnorm", true)? {
        return Err(Error::Config(
            "ssm_cfg.rmsnorm: Mamba-2 without the gated output norm is not supported".into(),
        ));
    }
    Ok(())
}

/// `a * b`, or a config error naming `what` when it overflows.
fn product(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::Config(format!("{what} is too large")))
}

/// Errors unless `value` is at least 1.
fn require_positive(key: &str, value: usize) -> Result<()> {
    if value == 0 {
        Err(Error::Config(format!("{key} must be at least 1")))
    } else {
        Ok(())
    }
}

/// Errors unless `value` is finite and not negative.
fn require_epsilon(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{key} must be a finite non-negative number, got {value}"
        )))
    }
}

/// Checks the sizes of a Mamba-1 / FalconMamba config.
fn validate_mamba(c: &MambaConfig) -> Result<()> {
    require_positive("vocab_size", c.vocab_size)?;
    require_positive("hidden_size", c.hidden_size)?;
    require_positive("state_size", c.state_size)?;
    require_positive("num_hidden_layers", c.num_hidden_layers)?;
    require_positive("intermediate_size", c.intermediate_size)?;
    require_positive("conv_kernel", c.conv_kernel)?;
    require_positive("time_step_rank", c.time_step_rank)?;
    require_epsilon("layer_norm_epsilon", c.layer_norm_epsilon)?;
    if let Some(eps) = c.mixer_rms_eps {
        require_epsilon("mixer_rms_eps", eps)?;
    }
    // The widest projection, in_proj: (2 * intermediate_size, hidden_size).
    product("2 * intermediate_size", 2, c.intermediate_size)?;
    Ok(())
}

/// Checks the sizes of a Mamba-2 config, so that `d_inner()` and `conv_dim()` cannot overflow.
fn validate_mamba2(c: &Mamba2Config) -> Result<()> {
    require_positive("vocab_size", c.vocab_size)?;
    require_positive("hidden_size", c.hidden_size)?;
    require_positive("state_size", c.state_size)?;
    require_positive("num_hidden_layers", c.num_hidden_layers)?;
    require_positive("expand", c.expand)?;
    require_positive("num_heads", c.num_heads)?;
    require_positive("head_dim", c.head_dim)?;
    require_positive("n_groups", c.n_groups)?;
    require_positive("chunk_size", c.chunk_size)?;
    require_positive("conv_kernel", c.conv_kernel)?;
    require_epsilon("layer_norm_epsilon", c.layer_norm_epsilon)?;
    let d_inner = product("num_heads * head_dim", c.num_heads, c.head_dim)?;
    if product("expand * hidden_size", c.expand, c.hidden_size)? != d_inner {
        return Err(Error::Config(format!(
            "num_heads * head_dim = {} * {} must equal expand * hidden_size = {} * {}",
            c.num_heads, c.head_dim, c.expand, c.hidden_size
        )));
    }
    if !c.num_heads.is_multiple_of(c.n_groups) {
        return Err(Error::Config(format!(
            "num_heads {} is not a multiple of n_groups {}",
            c.num_heads, c.n_groups
        )));
    }
    let group_width = product("n_groups * state_size", c.n_groups, c.state_size)?;
    let bc = product("2 * n_groups * state_size", 2, group_width)?;
    d_inner
        .checked_add(bc)
        .ok_or_else(|| Error::Config("conv_dim is too large".into()))?;
    let (lo, hi) = c.time_step_limit;
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(Error::Config(format!(
            "time_step_limit must be an ordered pair of numbers, got ({lo}, {hi})"
        )));
    }
    Ok(())
}

/// Checks the sizes and the layer pattern of a Jamba config.
fn validate_jamba(c: &JambaConfig) -> Result<()> {
    for (key, value) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.num_key_value_heads),
        ("num_experts", c.num_experts),
        ("num_experts_per_tok", c.num_experts_per_tok),
        ("expert_layer_period", c.expert_layer_period),
        ("attn_layer_period", c.attn_layer_period),
        ("mamba_d_state", c.mamba_d_state),
        ("mamba_d_conv", c.mamba_d_conv),
        ("mamba_expand", c.mamba_expand),
        ("mamba_dt_rank", c.mamba_dt_rank),
    ] {
        require_positive(key, value)?;
    }
    require_epsilon("rms_norm_eps", c.rms_norm_eps)?;
    require_epsilon("router_aux_loss_coef", c.router_aux_loss_coef)?;
    for (what, period, offset) in [
        ("attn", c.attn_layer_period, c.attn_layer_offset),
        ("expert", c.expert_layer_period, c.expert_layer_offset),
    ] {
        if offset >= period {
            return Err(Error::Config(format!(
                "{what}_layer_offset {offset} must be smaller than {what}_layer_period {period}"
            )));
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(Error::Config(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        )));
    }
    if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return Err(Error::Config(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            c.num_attention_heads, c.num_key_value_heads
        )));
    }
    // With a single expert every layer is dense and the top-k is never used.
    if c.num_experts > 1 && c.num_experts_per_tok > c.num_experts {
        return Err(Error::Config(format!(
            "num_experts_per_tok {} exceeds num_experts {}",
            c.num_experts_per_tok, c.num_experts
        )));
    }
    let d_inner = product("mamba_expand * hidden_size", c.mamba_expand, c.hidden_size)?;
    // The widest projections: the Mamba in_proj (2 * d_inner) and x_proj (dt_rank + 2N).
    product("2 * mamba_expand * hidden_size", 2, d_inner)?;
    product("2 * mamba_d_state", 2, c.mamba_d_state)?
        .checked_add(c.mamba_dt_rank)
        .ok_or_else(|| Error::Config("mamba_dt_rank + 2 * mamba_d_state is too large".into()))?;
    Ok(())
}

/// Typed access to the keys of one JSON object, with errors that name the key.
struct Fields<'a> {
    /// `None` for an absent sub-object, which has every key at its default.
    map: Option<&'a Map<String, Value>>,
    /// `""` at the top level, `"ssm_cfg."` inside that object.
    prefix: String,
}

impl<'a> Fields<'a> {
    fn root(map: &'a Map<String, Value>) -> Self {
        Fields {
            map: Some(map),
            prefix: String::new(),
        }
    }

    /// The object under `key` (one without keys when absent or null).
    fn child(&self, key: &str) -> Result<Fields<'a>> {
        let prefix = format!("{}{key}.", self.prefix);
        match self.get(key) {
            None => Ok(Fields { map: None, prefix }),
            Some(Value::Object(map)) => Ok(Fields {
                map: Some(map),
                prefix,
            }),
            Some(other) => Err(self.invalid(key, "an object", other)),
        }
    }

    /// The value of `key` as written, `null` included.
    fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key))
    }

    /// The value of `key`; an explicit `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.raw(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, key: &str, expected: &str, got: &Value) -> Error {
        Error::Config(format!(
            "{}{key} must be {expected}, got {got}",
            self.prefix
        ))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_usize(v).ok_or_else(|| self.invalid(key, "a non-negative integer", v)),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => float_value(v).ok_or_else(|| self.invalid(key, "a number", v)),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(key, "true or false", v)),
        }
    }

    /// An integer rank, or `"auto"` (also the default) for `ceil(hidden_size / 16)`.
    fn rank_or_auto(&self, key: &str, hidden_size: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(hidden_size.div_ceil(16)),
            Some(Value::String(s)) if s == "auto" => Ok(hidden_size.div_ceil(16)),
            Some(v) => as_usize(v).ok_or_else(|| self.invalid(key, "an integer or \"auto\"", v)),
        }
    }

    /// A token id; a list of ids gives its first one; an absent key gives `default`,
    /// an explicit `null` (or empty list) gives `None`.
    fn token_id_or(&self, key: &str, default: Option<u32>) -> Result<Option<u32>> {
        let Some(raw) = self.raw(key) else {
            return Ok(default);
        };
        let single = match raw {
            Value::Array(list) => list.first(),
            other => Some(other),
        };
        match single {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(key, "a token id", raw)),
        }
    }

    /// A `[low, high]` pair of numbers, where either may be non-finite.
    fn limit_or(&self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let pair = v.as_array().filter(|l| l.len() == 2);
        pair.and_then(|l| Some((float_value(&l[0])?, float_value(&l[1])?)))
            .ok_or_else(|| self.invalid(key, "a list of two numbers", v))
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// A float from a JSON number, a string such as `"inf"`, or a `{"__float__": "Infinity"}` object.
fn float_value(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Object(map) if map.len() == 1 => map.get("__float__").and_then(float_value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_non_finite_tokens_become_float_objects() {
        let text = r#"{"a": [0.0, Infinity], "b": -Infinity, "c": NaN, "s": "Infinity NaN"}"#;
        let value: Value = serde_json::from_str(&quote_non_finite(text)).unwrap();
        assert_eq!(float_value(&value["a"][1]), Some(f64::INFINITY));
        assert_eq!(float_value(&value["b"]), Some(f64::NEG_INFINITY));
        assert!(float_value(&value["c"]).unwrap().is_nan());
        assert_eq!(value["s"], "Infinity NaN");
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        let text = r#"{"s": "say \"Infinity\"", "t": Infinity}"#;
        let value: Value = serde_json::from_str(&quote_non_finite(text)).unwrap();
        assert_eq!(value["s"], "say \"Infinity\"");
        assert_eq!(float_value(&value["t"]), Some(f64::INFINITY));
    }
}
