//! `mamba info`: what a checkpoint holds: family and dimensions (for Jamba, hybrids and
//! MoE-Mamba, what each layer is made of), parameters and bytes of weights as stored, bytes
//! of recurrent state per sequence and bytes of key/value cache per token.

use crate::args::InfoArgs;
use crate::loading::tokenizer_for;
use anyhow::{ensure, Context, Result};
use candle_core::DType;
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::{
    AttentionLayers, HybridConfig, Mamba2Config, MambaConfig, ModelConfig, SsmConfig,
};
use mamba_models::gguf;
use mamba_models::tokenizer::Tokenizer;
use mamba_models::Model;
use safetensors::tensor::Metadata;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub fn run(args: &InfoArgs, json: bool) -> Result<()> {
    if gguf::is_gguf_path(&args.model) {
        return print_facts(gguf_facts(&args.model)?, json);
    }
    let checkpoint = Checkpoint::open(&args.model)?;
    let model = Model::load(&checkpoint, DType::F32)?;
    let tokenizer = tokenizer_for(&checkpoint)?;
    let weights = stored_weights(&checkpoint.weight_files)?;
    let mut facts = config_facts(&checkpoint.config);
    let state = model.new_state(1);
    facts.extend([
        ("parameters", json!(weights.parameters)),
        ("weight_bytes", json!(weights.bytes)),
        ("weight_dtypes", json!(weights.dtypes)),
        (
            "state_bytes_per_sequence",
            json!(state.bytes_per_sequence()),
        ),
        (
            "kv_cache_bytes_per_token",
            json!(state.kv_bytes_per_token()),
        ),
    ]);
    facts.extend(tokenizer_facts(&checkpoint, tokenizer.as_ref()));
    print_facts(facts, json)
}

/// What a GGUF file holds: the model's dimensions, how its linear layers are stored, its
/// state size and its vocabulary.
fn gguf_facts(path: &Path) -> Result<Vec<(&'static str, Value)>> {
    let loaded = gguf::load(path, &candle_core::Device::Cpu)?;
    let mut facts = vec![("name", json!(loaded.name))];
    facts.extend(config_facts(&loaded.model.config));
    facts.extend([
        ("weight_format", json!(loaded.weight_format.name())),
        (
            "state_bytes_per_sequence",
            json!(loaded.model.new_state(1).bytes_per_sequence()),
        ),
        (
            "tokenizer",
            json!(loaded.vocab.as_ref().map(|v| format!("gguf {}", v.model))),
        ),
        (
            "tokenizer_vocab_size",
            json!(loaded.tokenizer.as_ref().map(Tokenizer::vocab_size)),
        ),
    ]);
    Ok(facts)
}

/// Prints the facts as one JSON object or as `key: value` lines.
fn print_facts(facts: Vec<(&'static str, Value)>, json: bool) -> Result<()> {
    let mut out = io::stdout().lock();
    if json {
        let object: Map<String, Value> = facts
            .into_iter()
            .map(|(key, value)| (key.to_string(), value))
            .collect();
        writeln!(out, "{}", Value::Object(object))?;
    } else {
        for (key, value) in &facts {
            writeln!(out, "{}: {}", key.replace('_', " "), plain(value))?;
        }
    }
    Ok(())
}

/// Totals over every tensor of the weight files, as stored.
#[derive(Debug, Default)]
struct StoredWeights {
    parameters: usize,
    bytes: usize,
    dtypes: BTreeSet<String>,
}

fn stored_weights(files: &[PathBuf]) -> Result<StoredWeights> {
    let mut totals = StoredWeights::default();
    for file in files {
        for info in safetensors_header(file)?.tensors().values() {
            let count: usize = info.shape.iter().product();
            totals.parameters += count;
            totals.bytes += count * info.dtype.bitsize() / 8;
            totals.dtypes.insert(info.dtype.to_string());
        }
    }
    Ok(totals)
}

/// The header of a safetensors file (tensor names, dtypes, shapes), read without the data.
fn safetensors_header(path: &Path) -> Result<Metadata> {
    let context = || format!("{}: cannot read the safetensors header", path.display());
    let mut file = File::open(path).with_context(context)?;
    let file_len = file.metadata().with_context(context)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).with_context(context)?;
    let header_len = u64::from_le_bytes(len_bytes);
    ensure!(
        header_len <= file_len.saturating_sub(8),
        "{}: header length {header_len} exceeds the file size {file_len}",
        path.display()
    );
    let mut header = vec![0u8; usize::try_from(header_len).with_context(context)?];
    file.read_exact(&mut header).with_context(context)?;
    serde_json::from_slice(&header).with_context(context)
}

/// Family and dimensions, by key.
fn config_facts(config: &ModelConfig) -> Vec<(&'static str, Value)> {
    let mut facts = vec![
        ("family", json!(config.family().to_string())),
        ("layers", json!(config.num_layers())),
        ("hidden_size", json!(config.hidden_size())),
        ("vocab_size", json!(config.vocab_size())),
    ];
    if let Some(layout) = config.layer_layout() {
        facts.push(("layer_layout", json!(layout)));
    }
    match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => facts.extend(mamba_facts(c)),
        ModelConfig::Mamba2(c) => facts.extend(mamba2_facts(c, ["heads", "head_dim"])),
        ModelConfig::Jamba(c) => facts.extend([
            ("d_inner", json!(c.mamba_d_inner())),
            ("state_size", json!(c.mamba_d_state)),
            ("conv_kernel", json!(c.mamba_d_conv)),
            ("time_step_rank", json!(c.mamba_dt_rank)),
            ("heads", json!(c.num_attention_heads)),
            ("kv_heads", json!(c.num_key_value_heads)),
            ("head_dim", json!(c.head_dim())),
            ("intermediate_size", json!(c.intermediate_size)),
            ("experts", json!(c.num_experts)),
            ("experts_per_token", json!(c.num_experts_per_tok)),
        ]),
        ModelConfig::Hybrid(c) => facts.extend(hybrid_facts(c)),
        ModelConfig::MoeMamba(c) => facts.extend(mamba_facts(&c.mamba).into_iter().chain([
            ("intermediate_size", json!(c.moe_intermediate_size)),
            ("experts", json!(c.num_experts)),
            ("experts_per_token", json!(c.num_experts_per_tok)),
            ("router_aux_loss_coef", json!(c.router_aux_loss_coef)),
        ])),
    }
    facts.extend([
        ("tied_embeddings", json!(config.tie_word_embeddings())),
        ("eos_token_id", json!(config.eos_token_id())),
    ]);
    facts
}

/// The sizes of Mamba-1 mixers.
fn mamba_facts(c: &MambaConfig) -> [(&'static str, Value); 4] {
    [
        ("d_inner", json!(c.intermediate_size)),
        ("state_size", json!(c.state_size)),
        ("conv_kernel", json!(c.conv_kernel)),
        ("time_step_rank", json!(c.time_step_rank)),
    ]
}

/// The sizes of Mamba-2 mixers, their heads and head width under `head_keys`.
fn mamba2_facts(c: &Mamba2Config, head_keys: [&'static str; 2]) -> [(&'static str, Value); 8] {
    [
        ("d_inner", json!(c.d_inner())),
        (head_keys[0], json!(c.num_heads)),
        (head_keys[1], json!(c.head_dim)),
        ("groups", json!(c.n_groups)),
        ("state_size", json!(c.state_size)),
        ("conv_dim", json!(c.conv_dim())),
        ("conv_kernel", json!(c.conv_kernel)),
        ("chunk_size", json!(c.chunk_size)),
    ]
}

/// The sizes of a hybrid's SSM layers (when it has any; Mamba-2 heads as `ssm_heads`,
/// `ssm_head_dim`), attention layers (when it has any) and MLPs (when it has them).
fn hybrid_facts(c: &HybridConfig) -> Vec<(&'static str, Value)> {
    let mut facts = Vec::new();
    let attention_layers = c.attention.as_ref().map_or(0, |a| a.layer_idx.len());
    if attention_layers < c.ssm.num_layers() {
        match &c.ssm {
            SsmConfig::Mamba1(m) => facts.extend(mamba_facts(m)),
            SsmConfig::Mamba2(m) => facts.extend(mamba2_facts(m, ["ssm_heads", "ssm_head_dim"])),
        }
    }
    if let Some(a) = &c.attention {
        facts.extend(attention_facts(a));
    }
    if c.d_intermediate > 0 {
        facts.push(("intermediate_size", json!(c.mlp_width())));
    }
    facts
}

fn attention_facts(a: &AttentionLayers) -> [(&'static str, Value); 4] {
    [
        ("heads", json!(a.num_heads)),
        ("kv_heads", json!(a.num_heads_kv)),
        ("head_dim", json!(a.head_dim)),
        ("rotary_dim", json!(a.rotary_emb_dim)),
    ]
}

/// Which tokenizer text goes through, and its vocabulary size.
fn tokenizer_facts(
    checkpoint: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
) -> [(&'static str, Value); 2] {
    let kind = match (&checkpoint.tokenizer_file, tokenizer) {
        (Some(path), _) => json!(path.display().to_string()),
        (None, Some(_)) => json!("bytes"),
        (None, None) => Value::Null,
    };
    [
        ("tokenizer", kind),
        (
            "tokenizer_vocab_size",
            json!(tokenizer.map(Tokenizer::vocab_size)),
        ),
    ]
}

/// A value as a human reads it: strings unquoted, lists comma-separated, null as "none".
fn plain(value: &Value) -> String {
    match value {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}
