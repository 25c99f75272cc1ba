//! Config parsing (Hugging Face and `mamba_ssm` native forms, presets) and checkpoint
//! directory loading, against the shared fixtures and hand-written edge cases.

use candle_core::{DType, Device, Tensor};
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::{
    preset, Family, HybridConfig, JambaConfig, Mamba2Config, MambaConfig, ModelConfig,
    MoeMambaConfig, SsmConfig, PRESETS,
};
use mamba_models::init::init_tensors;
use mamba_models::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    assert!(
        dir.join("README.md").is_file(),
        "golden fixtures not found at {}: the shared fixture set must sit next to the workspace",
        dir.display()
    );
    dir
}

fn fixture_checkpoint(model: &str) -> PathBuf {
    fixtures().join("models").join(model).join("checkpoint")
}

fn fixture_config(model: &str) -> ModelConfig {
    ModelConfig::from_file(&fixture_checkpoint(model).join("config.json"))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn mamba(config: &ModelConfig) -> &MambaConfig {
    match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c,
        other => panic!("expected a Mamba-1 config, got {other:?}"),
    }
}

fn mamba2(config: &ModelConfig) -> &Mamba2Config {
    match config {
        ModelConfig::Mamba2(c) => c,
        other => panic!("expected a Mamba-2 config, got {other:?}"),
    }
}

fn jamba(config: &ModelConfig) -> &JambaConfig {
    match config {
        ModelConfig::Jamba(c) => c,
        other => panic!("expected a Jamba config, got {other:?}"),
    }
}

fn hybrid(config: &ModelConfig) -> &HybridConfig {
    match config {
        ModelConfig::Hybrid(c) => c,
        other => panic!("expected a hybrid config, got {other:?}"),
    }
}

fn moe_mamba(config: &ModelConfig) -> &MoeMambaConfig {
    match config {
        ModelConfig::MoeMamba(c) => c,
        other => panic!("expected a MoE-Mamba config, got {other:?}"),
    }
}

/// The message of a `Config` error, panicking on any other outcome.
fn config_error(result: mamba_models::Result<ModelConfig>) -> String {
    match result {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "mamba-models-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TINY_MAMBA_CONFIG: &str = r#"{"architectures": ["MambaForCausalLM"], "hidden_size": 8,
    "num_hidden_layers": 1, "vocab_size": 4, "state_size": 2, "time_step_rank": 1}"#;

/// Writes a safetensors file holding a `(4, 8)` embedding under `name`.
fn write_embedding(dir: &TempDir, file: &str, name: &str) {
    let weight = Tensor::arange(0f32, 32f32, &Device::Cpu)
        .unwrap()
        .reshape((4, 8))
        .unwrap();
    let tensors = HashMap::from([(name.to_string(), weight)]);
    candle_core::safetensors::save(&tensors, dir.0.join(file)).unwrap();
}

// ---------------------------------------------------------------- fixture configs

#[test]
fn mamba_fixture_configs_parse() {
    let tied = fixture_config("mamba_tied");
    assert_eq!(tied.family(), Family::Mamba);
    let c = mamba(&tied);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.state_size,
            c.num_hidden_layers
        ),
        (320, 64, 16, 3)
    );
    assert_eq!(
        (
            c.expand,
            c.intermediate_size,
            c.conv_kernel,
            c.time_step_rank
        ),
        (2, 128, 4, 4)
    );
    assert!(c.tie_word_embeddings && !c.use_bias && c.use_conv_bias);
    assert_eq!(c.layer_norm_epsilon, 1e-5);
    assert_eq!(c.mixer_rms_eps, None);
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(0), Some(0), Some(1))
    );

    let untied = fixture_config("mamba_untied");
    let c = mamba(&untied);
    assert!(!c.tie_word_embeddings && c.use_bias);
    assert_eq!(
        (c.vocab_size, c.num_hidden_layers, c.time_step_rank),
        (256, 2, 8)
    );
    assert_eq!(
        (
            untied.vocab_size(),
            untied.hidden_size(),
            untied.num_layers()
        ),
        (256, 64, 2)
    );
    assert_eq!(untied.eos_token_id(), Some(0));
}

#[test]
fn falcon_mamba_fixture_config_parses() {
    let config = fixture_config("falcon_mamba");
    assert_eq!(config.family(), Family::FalconMamba);
    let c = mamba(&config);
    assert_eq!(c.mixer_rms_eps, Some(1e-6));
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.time_step_rank),
        (64, 128, 4)
    );
    assert!(!c.tie_word_embeddings);
}

#[test]
fn mamba2_fixture_config_parses_float_object_infinity() {
    let config = fixture_config("mamba2");
    assert_eq!(config.family(), Family::Mamba2);
    let c = mamba2(&config);
    assert_eq!(
        (c.num_heads, c.head_dim, c.n_groups, c.state_size),
        (8, 16, 2, 16)
    );
    assert_eq!((c.chunk_size, c.conv_kernel, c.expand), (8, 4, 2));
    assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
    assert_eq!((c.d_inner(), c.conv_dim()), (128, 192));
    assert!(!c.norm_before_gate && !c.tie_word_embeddings && !c.use_bias && c.use_conv_bias);
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(2), Some(0), Some(1))
    );
}

#[test]
fn jamba_fixture_config_parses() {
    let config = fixture_config("jamba");
    assert_eq!(config.family(), Family::Jamba);
    let c = jamba(&config);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (256, 64, 128, 4)
    );
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.num_experts,
            c.num_experts_per_tok
        ),
        (4, 2, 4, 2)
    );
    assert_eq!(
        (
            c.attn_layer_period,
            c.attn_layer_offset,
            c.expert_layer_period,
            c.expert_layer_offset
        ),
        (4, 2, 2, 1)
    );
    assert_eq!(
        (
            c.mamba_d_state,
            c.mamba_d_conv,
            c.mamba_expand,
            c.mamba_dt_rank
        ),
        (16, 4, 2, 4)
    );
    assert!(c.mamba_conv_bias && !c.mamba_proj_bias && !c.tie_word_embeddings);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!((c.head_dim(), c.mamba_d_inner()), (16, 128));
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(2), Some(1), Some(0))
    );
    let attention: Vec<bool> = (0..4).map(|i| c.is_attention_layer(i)).collect();
    let experts: Vec<bool> = (0..4).map(|i| c.is_expert_layer(i)).collect();
    assert_eq!(attention, [false, false, true, false]);
    assert_eq!(experts, [false, true, false, true]);
    assert_eq!(
        mamba_models::jamba::layer_layout(c),
        ["mamba", "mamba+moe", "attention", "mamba+moe"]
    );
    assert_eq!(
        (config.norm_epsilon(), config.tie_word_embeddings()),
        (1e-6, false)
    );
}

// ---------------------------------------------------------------- HF form rules

#[test]
fn hf_mamba_defaults_follow_transformers() {
    let config = ModelConfig::from_json_str(r#"{"model_type": "mamba"}"#).unwrap();
    let c = mamba(&config);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.state_size,
            c.num_hidden_layers
        ),
        (50280, 768, 16, 32)
    );
    assert_eq!(
        (
            c.expand,
            c.intermediate_size,
            c.conv_kernel,
            c.time_step_rank
        ),
        (2, 1536, 4, 48)
    );
    assert!(!c.use_bias && c.use_conv_bias && c.tie_word_embeddings);
    assert_eq!(c.layer_norm_epsilon, 1e-5);
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn hf_falcon_mamba_defaults_mixer_eps() {
    let config = ModelConfig::from_json_str(r#"{"model_type": "falcon_mamba"}"#).unwrap();
    assert_eq!(config.family(), Family::FalconMamba);
    assert_eq!(mamba(&config).mixer_rms_eps, Some(1e-6));
}

#[test]
fn hf_mamba2_defaults_follow_transformers() {
    let config = ModelConfig::from_json_str(r#"{"architectures": ["Mamba2ForCausalLM"]}"#).unwrap();
    let c = mamba2(&config);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.state_size,
            c.num_hidden_layers
        ),
        (32768, 4096, 128, 64)
    );
    assert_eq!(
        (c.num_heads, c.head_dim, c.n_groups, c.chunk_size),
        (128, 64, 8, 256)
    );
    assert_eq!((c.expand, c.conv_kernel), (2, 4));
    assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
    assert!(!c.norm_before_gate && !c.tie_word_embeddings);
    assert_eq!(c.layer_norm_epsilon, 1e-5);
}

#[test]
fn hf_jamba_defaults_follow_transformers() {
    let config = ModelConfig::from_json_str(r#"{"architectures": ["JambaForCausalLM"]}"#).unwrap();
    let c = jamba(&config);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (65536, 4096, 14336, 32)
    );
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.num_experts,
            c.num_experts_per_tok
        ),
        (32, 8, 16, 2)
    );
    assert_eq!(
        (
            c.attn_layer_period,
            c.attn_layer_offset,
            c.expert_layer_period,
            c.expert_layer_offset
        ),
        (8, 4, 2, 1)
    );
    assert_eq!(
        (
            c.mamba_d_state,
            c.mamba_d_conv,
            c.mamba_expand,
            c.mamba_dt_rank
        ),
        (16, 4, 2, 256)
    );
    assert!(c.mamba_conv_bias && !c.mamba_proj_bias && !c.tie_word_embeddings);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(2), Some(1), Some(0))
    );
}

#[test]
fn jamba_key_value_heads_null_means_one_per_query_head() {
    let config = ModelConfig::from_json_str(
        r#"{"model_type": "jamba", "num_attention_heads": 6, "hidden_size": 60,
            "num_key_value_heads": null, "mamba_dt_rank": "auto"}"#,
    )
    .unwrap();
    let c = jamba(&config);
    assert_eq!(
        (c.num_key_value_heads, c.head_dim(), c.mamba_dt_rank),
        (6, 10, 4)
    );
}

#[test]
fn jamba_with_one_expert_has_only_dense_layers() {
    let config = ModelConfig::from_json_str(
        r#"{"model_type": "jamba", "num_experts": 1,
            "num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1}"#,
    )
    .unwrap();
    assert_eq!(
        mamba_models::jamba::layer_layout(jamba(&config)),
        ["mamba", "attention", "mamba", "attention"]
    );
}

#[test]
fn time_step_rank_auto_is_ceil_hidden_over_16() {
    let config = ModelConfig::from_json_str(
        r#"{"architectures": ["MambaForCausalLM"], "hidden_size": 100, "time_step_rank": "auto"}"#,
    )
    .unwrap();
    let c = mamba(&config);
    assert_eq!((c.time_step_rank, c.intermediate_size), (7, 200));
}

#[test]
fn architectures_win_over_model_type_and_bare_classes_are_accepted() {
    let config = ModelConfig::from_json_str(
        r#"{"architectures": ["FalconMambaModel"], "model_type": "mamba"}"#,
    )
    .unwrap();
    assert_eq!(config.family(), Family::FalconMamba);
    let config =
        ModelConfig::from_json_str(r#"{"architectures": [], "model_type": "mamba2"}"#).unwrap();
    assert_eq!(config.family(), Family::Mamba2);
}

#[test]
fn unknown_or_missing_families_are_rejected() {
    for text in [
        r#"{"architectures": ["LlamaForCausalLM"]}"#,
        r#"{"model_type": "llama"}"#,
    ] {
        assert!(
            matches!(
                ModelConfig::from_json_str(text),
                Err(Error::UnknownArchitecture(_))
            ),
            "{text}"
        );
    }
    let msg = config_error(ModelConfig::from_json_str(r#"{"hidden_size": 8}"#));
    assert!(msg.contains("model_type"), "{msg}");
}

#[test]
fn family_display_names() {
    assert_eq!(Family::Mamba.to_string(), "mamba");
    assert_eq!(Family::FalconMamba.to_string(), "falcon_mamba");
    assert_eq!(Family::Mamba2.to_string(), "mamba2");
    assert_eq!(Family::Jamba.to_string(), "jamba");
}

#[test]
fn non_finite_time_step_limits_in_every_spelling() {
    let base = r#"{"architectures": ["Mamba2ForCausalLM"], "hidden_size": 64, "num_heads": 8,
        "head_dim": 16, "n_groups": 2, "time_step_limit": LIMIT, "note": "Infinity stays text"}"#;
    for (limit, expected) in [
        ("[0.0, Infinity]", (0.0, f64::INFINITY)),
        ("[-Infinity, Infinity]", (f64::NEG_INFINITY, f64::INFINITY)),
        (r#"[0.0, {"__float__": "Infinity"}]"#, (0.0, f64::INFINITY)),
        (r#"[0.001, "inf"]"#, (0.001, f64::INFINITY)),
        ("[0.0, 1e308]", (0.0, 1e308)),
        ("[0.01, 0.5]", (0.01, 0.5)),
    ] {
        let config = ModelConfig::from_json_str(&base.replace("LIMIT", limit))
            .unwrap_or_else(|e| panic!("{limit}: {e}"));
        assert_eq!(mamba2(&config).time_step_limit, expected, "{limit}");
    }
    let msg = config_error(ModelConfig::from_json_str(
        &base.replace("LIMIT", "[NaN, 1.0]"),
    ));
    assert!(msg.contains("time_step_limit"), "{msg}");
    let msg = config_error(ModelConfig::from_json_str(&base.replace("LIMIT", "[1.0]")));
    assert!(msg.contains("time_step_limit"), "{msg}");
}

#[test]
fn token_ids_may_be_null_or_lists() {
    let config = ModelConfig::from_json_str(
        r#"{"model_type": "mamba", "eos_token_id": [5, 7], "bos_token_id": null, "pad_token_id": []}"#,
    )
    .unwrap();
    let c = mamba(&config);
    assert_eq!(
        (c.eos_token_id, c.bos_token_id, c.pad_token_id),
        (Some(5), None, None)
    );
    let msg = config_error(ModelConfig::from_json_str(
        r#"{"model_type": "mamba", "eos_token_id": -1}"#,
    ));
    assert!(msg.contains("eos_token_id"), "{msg}");
}

#[test]
fn invalid_values_name_their_key() {
    for (text, key) in [
        (
            r#"{"model_type": "mamba", "hidden_size": 0}"#,
            "hidden_size",
        ),
        (
            r#"{"model_type": "mamba", "hidden_size": "big"}"#,
            "hidden_size",
        ),
        (
            r#"{"model_type": "mamba", "state_size": 1.5}"#,
            "state_size",
        ),
        (r#"{"model_type": "mamba", "use_bias": "yes"}"#, "use_bias"),
        (
            r#"{"model_type": "mamba", "time_step_rank": "full"}"#,
            "time_step_rank",
        ),
        (
            r#"{"model_type": "mamba", "layer_norm_epsilon": -1.0}"#,
            "layer_norm_epsilon",
        ),
        (
            r#"{"model_type": "falcon_mamba", "mixer_rms_eps": "x"}"#,
            "mixer_rms_eps",
        ),
        (
            r#"{"model_type": "mamba", "num_hidden_layers": 18446744073709551616}"#,
            "num_hidden_layers",
        ),
        (
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 8, "n_groups": 1}"#,
            "head_dim",
        ),
        (
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "n_groups": 3}"#,
            "n_groups",
        ),
        (
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "n_groups": 0}"#,
            "n_groups",
        ),
        (
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "chunk_size": 0}"#,
            "chunk_size",
        ),
        (
            r#"{"model_type": "mamba", "expand": 9223372036854775807, "hidden_size": 4}"#,
            "expand",
        ),
        (r#"{"architectures": "MambaForCausalLM"}"#, "architectures"),
        (
            r#"{"model_type": "jamba", "attn_layer_period": 4, "attn_layer_offset": 4}"#,
            "attn_layer_offset",
        ),
        (
            r#"{"model_type": "jamba", "expert_layer_period": 0}"#,
            "expert_layer_period",
        ),
        (
            r#"{"model_type": "jamba", "hidden_size": 64, "num_attention_heads": 5}"#,
            "num_attention_heads",
        ),
        (
            r#"{"model_type": "jamba", "num_attention_heads": 32, "num_key_value_heads": 5}"#,
            "num_key_value_heads",
        ),
        (
            r#"{"model_type": "jamba", "num_experts": 4, "num_experts_per_tok": 5}"#,
            "num_experts_per_tok",
        ),
        (
            r#"{"model_type": "jamba", "mamba_dt_rank": "full"}"#,
            "mamba_dt_rank",
        ),
        (
            r#"{"model_type": "jamba", "rms_norm_eps": -1}"#,
            "rms_norm_eps",
        ),
        (
            r#"{"model_type": "jamba", "hidden_act": "gelu"}"#,
            "hidden_act",
        ),
        (
            r#"{"model_type": "jamba", "sliding_window": 4096}"#,
            "sliding_window",
        ),
    ] {
        let result = ModelConfig::from_json_str(text);
        match result {
            Err(Error::Config(msg)) => assert!(msg.contains(key), "{text}: {msg}"),
            // serde_json rejects integers beyond u64 itself.
            Err(Error::Json { .. }) if key == "num_hidden_layers" => {}
            other => panic!("{text}: expected a config error naming {key}, got {other:?}"),
        }
    }
}

#[test]
fn top_level_must_be_an_object() {
    let msg = config_error(ModelConfig::from_json_str("[1, 2]"));
    assert!(msg.contains("object"), "{msg}");
}

#[test]
fn file_errors_carry_the_path() {
    let dir = TempDir::new("config-files");
    let missing = dir.0.join("nope.json");
    match ModelConfig::from_file(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io error, got {other:?}"),
    }
    let bad = dir.write("config.json", b"{\"model_type\": \"mamba\",");
    match ModelConfig::from_file(&bad) {
        Err(e @ Error::Json { .. }) => assert!(e.to_string().contains("config.json"), "{e}"),
        other => panic!("expected Json error, got {other:?}"),
    }
    let invalid = dir.write(
        "invalid.json",
        br#"{"model_type": "mamba", "hidden_size": 0}"#,
    );
    let msg = config_error(ModelConfig::from_file(&invalid));
    assert!(
        msg.contains("invalid.json") && msg.contains("hidden_size"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- native form

#[test]
fn native_mamba1_config_pads_the_vocabulary() {
    let text = r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
        "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
        "pad_vocab_size_multiple": 8}"#;
    let config = ModelConfig::from_json_str(text).unwrap();
    assert_eq!(config.family(), Family::Mamba);
    let c = mamba(&config);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_hidden_layers),
        (50280, 768, 24)
    );
    assert_eq!(
        (
            c.state_size,
            c.conv_kernel,
            c.intermediate_size,
            c.time_step_rank
        ),
        (16, 4, 1536, 48)
    );
    assert!(c.tie_word_embeddings && !c.use_bias && c.use_conv_bias);
    assert_eq!(c.eos_token_id, None);
}

#[test]
fn native_mamba2_config_derives_heads() {
    let text = r#"{"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
        "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16,
        "tie_embeddings": true}"#;
    let config = ModelConfig::from_json_str(text).unwrap();
    let c = mamba2(&config);
    assert_eq!(
        (c.vocab_size, c.num_heads, c.head_dim, c.n_groups),
        (50288, 24, 64, 1)
    );
    assert_eq!((c.state_size, c.chunk_size, c.conv_kernel), (128, 256, 4));
    assert!(c.tie_word_embeddings && !c.norm_before_gate);
    assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));

    let custom = r#"{"d_model": 64, "n_layer": 2, "vocab_size": 256, "pad_vocab_size_multiple": 1,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 32, "ngroups": 2, "chunk_size": 64,
        "dt_limit": [0.0, Infinity]}}"#;
    let config = ModelConfig::from_json_str(custom).unwrap();
    let c = mamba2(&config);
    assert_eq!(
        (
            c.vocab_size,
            c.num_heads,
            c.head_dim,
            c.n_groups,
            c.state_size
        ),
        (256, 4, 32, 2, 16)
    );
}

/// A `mamba_ssm` hybrid: `MHA` defaults (as many key/value heads as query heads,
/// `d_model / num_heads` wide, biases on), the MLP width rounded up to a multiple of 128,
/// and the attention layers sorted and deduplicated.
#[test]
fn native_hybrid_config_applies_mha_and_mlp_defaults() {
    let text = r#"{"d_model": 96, "n_layer": 6, "vocab_size": 250, "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 32, "chunk_size": 64},
        "attn_layer_idx": [4, 1, 4], "attn_cfg": {"num_heads": 6, "rotary_emb_dim": 8, "causal": true},
        "d_intermediate": 200, "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
        "tie_embeddings": false}"#;
    let config = ModelConfig::from_json_str(text).unwrap();
    assert_eq!(config.family(), Family::Hybrid);
    assert_eq!(
        (
            config.vocab_size(),
            config.hidden_size(),
            config.num_layers()
        ),
        (256, 96, 6)
    );
    assert_eq!((config.norm_epsilon(), config.eos_token_id()), (1e-5, None));
    assert!(!config.tie_word_embeddings());
    let c = hybrid(&config);
    let SsmConfig::Mamba2(m) = &c.ssm else {
        panic!("expected Mamba-2 layers: {:?}", c.ssm)
    };
    assert_eq!((m.num_heads, m.head_dim, m.state_size), (6, 32, 16));
    let a = c.attention.as_ref().unwrap();
    assert_eq!(a.layer_idx, [1, 4]);
    assert_eq!((a.num_heads, a.num_heads_kv, a.head_dim), (6, 6, 16));
    assert_eq!((a.rotary_emb_dim, a.rotary_emb_base), (8, 10000.0));
    assert!(a.qkv_proj_bias && a.out_proj_bias);
    assert_eq!((c.d_intermediate, c.mlp_width()), (200, 256));
    assert_eq!(
        c.layer_layout(),
        [
            "mamba2+mlp",
            "attention+mlp",
            "mamba2+mlp",
            "mamba2+mlp",
            "attention+mlp",
            "mamba2+mlp"
        ]
    );
    assert_eq!(config.layer_layout(), Some(c.layer_layout()));
}

/// Attention or MLPs alone also make a hybrid; neither gives the pure model.
#[test]
fn native_models_are_hybrids_when_they_have_attention_or_mlps() {
    let mlp_only = ModelConfig::from_json_str(
        r#"{"d_model": 64, "n_layer": 2, "d_intermediate": 128, "attn_layer_idx": []}"#,
    )
    .unwrap();
    let c = hybrid(&mlp_only);
    assert!(c.attention.is_none() && matches!(c.ssm, SsmConfig::Mamba1(_)));
    assert_eq!(c.layer_layout(), ["mamba+mlp", "mamba+mlp"]);
    let attention_only = ModelConfig::from_json_str(
        r#"{"d_model": 64, "n_layer": 2, "attn_layer_idx": [0, 1],
        "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 32, "qkv_proj_bias": false,
        "causal": true}}"#,
    )
    .unwrap();
    let c = hybrid(&attention_only);
    assert_eq!(c.layer_layout(), ["attention", "attention"]);
    let a = c.attention.as_ref().unwrap();
    assert_eq!((a.num_heads_kv, a.head_dim), (2, 32));
    assert!(!a.qkv_proj_bias && a.out_proj_bias);
    let pure = ModelConfig::from_json_str(
        r#"{"d_model": 64, "n_layer": 2, "d_intermediate": 0, "attn_layer_idx": [], "attn_cfg": {}}"#,
    )
    .unwrap();
    assert_eq!(pure.family(), Family::Mamba);
}

#[test]
fn moe_mamba_config_takes_mamba_keys_and_expert_defaults() {
    let config = ModelConfig::from_json_str(
        r#"{"architectures": ["MoEMambaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
        "vocab_size": 300, "state_size": 8}"#,
    )
    .unwrap();
    assert_eq!(config.family(), Family::MoeMamba);
    let c = moe_mamba(&config);
    assert_eq!(
        (
            c.mamba.hidden_size,
            c.mamba.intermediate_size,
            c.mamba.state_size
        ),
        (64, 128, 8)
    );
    assert_eq!(
        (
            c.moe_intermediate_size,
            c.num_experts,
            c.num_experts_per_tok
        ),
        (128, 8, 1)
    );
    assert_eq!(config.router_aux_loss_coef(), 0.01);
    assert_eq!(config.layer_layout().unwrap(), ["mamba+moe"; 3]);
    let by_type = ModelConfig::from_json_str(
        r#"{"model_type": "moe_mamba", "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 96, "router_aux_loss_coef": 0.5}"#,
    )
    .unwrap();
    let c = moe_mamba(&by_type);
    assert_eq!(
        (
            c.moe_intermediate_size,
            c.num_experts,
            c.num_experts_per_tok
        ),
        (96, 4, 2)
    );
    assert_eq!(by_type.router_aux_loss_coef(), 0.5);
    // Jamba has the coefficient too (transformers' default 0.001); pure models have none.
    assert_eq!(fixture_config("jamba").router_aux_loss_coef(), 0.001);
    assert_eq!(fixture_config("mamba2").router_aux_loss_coef(), 0.0);
}

#[test]
fn native_unsupported_features_are_clear_errors() {
    for (text, key) in [
        (
            r#"{"d_model": 64, "n_layer": 4, "rms_norm": false}"#,
            "rms_norm",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": {"layer": "Mamba3"}}"#,
            "ssm_cfg.layer",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}}"#,
            "headdim",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": {"layer": "Mamba2", "headdim": 0}}"#,
            "headdim",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": {"layer": "Mamba2", "d_ssm": 64}}"#,
            "d_ssm",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": {"d_state": "x"}}"#,
            "ssm_cfg.d_state",
        ),
        (r#"{"d_model": 64, "n_layer": 4, "ssm_cfg": 3}"#, "ssm_cfg"),
        (
            r#"{"d_model": 64, "n_layer": 4, "pad_vocab_size_multiple": 0}"#,
            "pad_vocab_size_multiple",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1]}"#,
            "attn_cfg.num_heads",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [4], "attn_cfg": {"num_heads": 4, "causal": true}}"#,
            "attn_layer_idx",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": "all"}"#,
            "attn_layer_idx",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4}}"#,
            "attn_cfg.causal",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 5, "causal": true}}"#,
            "attn_cfg.num_heads",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "num_heads_kv": 3, "causal": true}}"#,
            "attn_cfg.num_heads_kv",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "rotary_emb_dim": 18, "causal": true}}"#,
            "attn_cfg.rotary_emb_dim",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "rotary_emb_dim": 8, "rotary_emb_interleaved": true, "causal": true}}"#,
            "attn_cfg.rotary_emb_interleaved",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "d_conv": 4, "causal": true}}"#,
            "attn_cfg.d_conv",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "mlp_dim": 256, "causal": true}}"#,
            "attn_cfg.mlp_dim",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "softmax_scale": 0.5, "causal": true}}"#,
            "attn_cfg.softmax_scale",
        ),
        (
            r#"{"d_model": 64, "n_layer": 4, "d_intermediate": "wide"}"#,
            "d_intermediate",
        ),
        (
            r#"{"model_type": "moe_mamba", "num_experts": 4, "num_experts_per_tok": 5}"#,
            "num_experts_per_tok",
        ),
        (
            r#"{"model_type": "moe_mamba", "num_experts": 0}"#,
            "num_experts",
        ),
        (
            r#"{"model_type": "moe_mamba", "router_aux_loss_coef": -1}"#,
            "router_aux_loss_coef",
        ),
        (
            r#"{"model_type": "jamba", "router_aux_loss_coef": "high"}"#,
            "router_aux_loss_coef",
        ),
    ] {
        let msg = config_error(ModelConfig::from_json_str(text));
        assert!(msg.contains(key), "{text}: {msg}");
    }
}

// ---------------------------------------------------------------- presets

#[test]
fn presets_have_the_published_dimensions() {
    let expected: [(&str, usize, usize); 14] = [
        ("mamba-130m", 768, 24),
        ("mamba-370m", 1024, 48),
        ("mamba-790m", 1536, 48),
        ("mamba-1.4b", 2048, 48),
        ("mamba-2.8b", 2560, 64),
        ("mamba2-130m", 768, 24),
        ("mamba2-370m", 1024, 48),
        ("mamba2-780m", 1536, 48),
        ("mamba2-1.3b", 2048, 48),
        ("mamba2-2.7b", 2560, 64),
        ("hybrid-130m", 768, 12),
        ("moe-mamba-130m", 768, 12),
        ("transformer-130m", 768, 13),
        ("transformer-370m", 1024, 25),
    ];
    assert_eq!(PRESETS, expected.map(|e| e.0));
    for (name, d_model, n_layer) in expected {
        let config = preset(name).unwrap();
        assert_eq!(
            (config.hidden_size(), config.num_layers()),
            (d_model, n_layer),
            "{name}"
        );
        match &config {
            ModelConfig::Mamba(c) => {
                assert_eq!(c.vocab_size, 50280);
                assert_eq!((c.state_size, c.expand, c.conv_kernel), (16, 2, 4));
                assert_eq!(c.time_step_rank, d_model.div_ceil(16));
                assert!(c.tie_word_embeddings);
            }
            ModelConfig::Mamba2(c) => {
                assert_eq!(c.vocab_size, 50288);
                assert_eq!(
                    (c.head_dim, c.state_size, c.n_groups, c.chunk_size),
                    (64, 128, 1, 256)
                );
                assert_eq!(c.num_heads, 2 * d_model / 64);
                assert!(c.tie_word_embeddings);
            }
            ModelConfig::Hybrid(c) => {
                let a = c.attention.as_ref().expect("attention layers");
                assert_eq!(a.num_heads * a.head_dim, d_model, "{name}");
                assert!(a.rotary_emb_dim > 0 && c.d_intermediate > 0, "{name}");
                let attention = (0..n_layer).filter(|&i| c.is_attention_layer(i)).count();
                if name.starts_with("transformer") {
                    assert_eq!(attention, n_layer, "{name}");
                    assert_eq!(c.mlp_width(), c.d_intermediate, "{name}");
                    assert!(!a.qkv_proj_bias && !a.out_proj_bias, "{name}");
                } else {
                    assert!(attention > 0 && attention < n_layer, "{name}");
                }
            }
            ModelConfig::MoeMamba(c) => {
                assert_eq!(c.mamba.vocab_size, 50280);
                assert!(c.num_experts > c.num_experts_per_tok);
                assert!(config.router_aux_loss_coef() > 0.0);
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
    }
}

/// The Transformer and hybrid presets have about the parameters of the Mamba model they
/// compare with; MoE-Mamba has about as many active ones (those of `num_experts_per_tok`
/// experts per layer) as `mamba-130m` has in all.
#[test]
fn comparison_presets_match_their_mamba_parameter_counts() {
    let counts = |name: &str| {
        let weights = init_tensors(&preset(name).unwrap(), DType::BF16, 0).unwrap();
        let total: usize = weights.values().map(Tensor::elem_count).sum();
        let idle: usize = weights
            .iter()
            .filter(|(n, _)| n.contains(".experts.") && !n.contains(".experts.0."))
            .map(|(_, t)| t.elem_count())
            .sum();
        (total, total - idle)
    };
    for (name, reference, tolerance) in [
        ("transformer-130m", "mamba-130m", 0.02),
        ("transformer-370m", "mamba-370m", 0.02),
        ("hybrid-130m", "mamba2-130m", 0.02),
        ("moe-mamba-130m", "mamba-130m", 0.03),
    ] {
        let (total, active) = counts(name);
        let (reference_total, _) = counts(reference);
        let ratio = active as f64 / reference_total as f64;
        assert!(
            (ratio - 1.0).abs() < tolerance,
            "{name}: {active} active of {total} parameters against {reference_total} in {reference}"
        );
    }
    assert_eq!(
        moe_mamba(&preset("moe-mamba-130m").unwrap()).num_experts_per_tok,
        1,
        "the count of active experts above assumes one"
    );
}

#[test]
fn unknown_preset_lists_the_valid_names() {
    let msg = config_error(preset("mamba-7b"));
    assert!(msg.contains("mamba-7b"), "{msg}");
    for name in PRESETS {
        assert!(msg.contains(name), "{msg}");
    }
}

// ---------------------------------------------------------------- checkpoints

#[test]
fn fixture_checkpoints_open_and_load() {
    for model in ["mamba_tied", "mamba_untied", "falcon_mamba", "mamba2"] {
        let dir = fixture_checkpoint(model);
        let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(ckpt.weight_files, vec![dir.join("model.safetensors")]);
        assert_eq!(
            ckpt.tokenizer_file.is_some(),
            model == "mamba_tied",
            "{model}"
        );
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu).unwrap();
        let (vocab, hidden) = (ckpt.config.vocab_size(), ckpt.config.hidden_size());
        let emb = vb
            .get((vocab, hidden), "backbone.embeddings.weight")
            .unwrap();
        assert_eq!(emb.dims(), &[vocab, hidden]);
        assert_eq!(
            vb.contains_tensor("lm_head.weight"),
            model != "mamba_tied",
            "{model}"
        );
    }
}

#[test]
fn missing_directory_and_config_are_reported() {
    let dir = TempDir::new("ckpt-missing");
    let absent = dir.0.join("absent");
    match Checkpoint::open(&absent) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("absent"), "{msg}"),
        other => panic!("expected checkpoint error, got {other:?}"),
    }
    match Checkpoint::open(&dir.0) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("config.json"), "{msg}"),
        other => panic!("expected checkpoint error, got {other:?}"),
    }
}

#[test]
fn directory_without_weights_is_reported() {
    let dir = TempDir::new("ckpt-noweights");
    dir.write("config.json", TINY_MAMBA_CONFIG.as_bytes());
    dir.write("pytorch_model.bin", b"");
    match Checkpoint::open(&dir.0) {
        Err(Error::Checkpoint(msg)) => {
            assert!(
                msg.contains("no weights") && msg.contains("PyTorch"),
                "{msg}"
            )
        }
        other => panic!("expected checkpoint error, got {other:?}"),
    }
}

#[test]
fn sharded_index_is_deduplicated_sorted_and_checked() {
    let dir = TempDir::new("ckpt-shards");
    dir.write("config.json", TINY_MAMBA_CONFIG.as_bytes());
    write_embedding(
        &dir,
        "model-00002-of-00002.safetensors",
        "backbone.norm_f.weight",
    );
    write_embedding(
        &dir,
        "model-00001-of-00002.safetensors",
        "backbone.embeddings.weight",
    );
    let index = r#"{"metadata": {}, "weight_map": {
        "backbone.norm_f.weight": "model-00002-of-00002.safetensors",
        "backbone.embeddings.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}"#;
    dir.write("model.safetensors.index.json", index.as_bytes());
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    assert_eq!(
        ckpt.weight_files,
        vec![
            dir.0.join("model-00001-of-00002.safetensors"),
            dir.0.join("model-00002-of-00002.safetensors")
        ]
    );
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("backbone.embeddings.weight"));
    assert!(vb.contains_tensor("backbone.norm_f.weight"));

    let missing = index.replace("model-00002-of-00002", "model-00003-of-00003");
    dir.write("model.safetensors.index.json", missing.as_bytes());
    match Checkpoint::open(&dir.0) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("model-00003-of-00003"), "{msg}"),
        other => panic!("expected checkpoint error, got {other:?}"),
    }
    dir.write("model.safetensors.index.json", b"{\"weight_map\": [1]}");
    assert!(matches!(
        Checkpoint::open(&dir.0),
        Err(Error::Checkpoint(_))
    ));
    dir.write("model.safetensors.index.json", b"{\"weight_map\": ");
    assert!(matches!(Checkpoint::open(&dir.0), Err(Error::Json { .. })));
}

#[test]
fn native_single_file_is_found_and_its_embedding_renamed() {
    let dir = TempDir::new("ckpt-native");
    let native = r#"{"d_model": 8, "n_layer": 1, "vocab_size": 4, "pad_vocab_size_multiple": 1,
        "ssm_cfg": {"d_state": 2, "dt_rank": 1}}"#;
    dir.write("config.json", native.as_bytes());
    write_embedding(&dir, "mamba.safetensors", "backbone.embedding.weight");
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    assert_eq!(ckpt.weight_files, vec![dir.0.join("mamba.safetensors")]);
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu).unwrap();
    let emb = vb.get((4, 8), "backbone.embeddings.weight").unwrap();
    assert_eq!(
        emb.flatten_all().unwrap().to_vec1::<f32>().unwrap()[31],
        31.0
    );

    write_embedding(&dir, "other.safetensors", "backbone.embedding.weight");
    match Checkpoint::open(&dir.0) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("other.safetensors"), "{msg}"),
        other => panic!("expected checkpoint error, got {other:?}"),
    }
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let dir = TempDir::new("ckpt-corrupt");
    dir.write("config.json", TINY_MAMBA_CONFIG.as_bytes());
    write_embedding(&dir, "model.safetensors", "backbone.embeddings.weight");
    let good = std::fs::read(dir.0.join("model.safetensors")).unwrap();
    for (case, bytes) in [
        ("truncated", good[..good.len() - 7].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        dir.write("model.safetensors", &bytes);
        let ckpt = Checkpoint::open(&dir.0).unwrap();
        match ckpt.var_builder(DType::F32, &Device::Cpu) {
            Err(Error::Checkpoint(msg)) => {
                assert!(msg.contains("model.safetensors"), "{case}: {msg}")
            }
            Err(other) => panic!("{case}: expected checkpoint error, got {other:?}"),
            Ok(_) => panic!("{case}: a corrupt file was accepted"),
        }
    }
}

/// Writing a configuration as Hugging Face JSON and parsing it back is the identity,
/// for every fixture model and every preset.
#[test]
fn hf_json_round_trips() {
    let fixtures = mamba_testing::fixtures_dir().join("models");
    let mut configs: Vec<ModelConfig> = [
        "mamba_tied",
        "mamba_untied",
        "falcon_mamba",
        "mamba2",
        "jamba",
    ]
    .iter()
    .map(|m| ModelConfig::from_file(&fixtures.join(m).join("checkpoint/config.json")).unwrap())
    .collect();
    configs.extend(
        mamba_models::config::PRESETS
            .iter()
            .map(|p| mamba_models::config::preset(p).unwrap()),
    );
    for text in [
        // Mamba-1 layers with every mixer option set, attention without biases.
        r#"{"d_model": 32, "n_layer": 3, "vocab_size": 100, "ssm_cfg": {"d_state": 8, "d_conv": 3,
        "expand": 3, "dt_rank": 5, "bias": true, "conv_bias": false}, "attn_layer_idx": [2],
        "attn_cfg": {"num_heads": 4, "num_heads_kv": 1, "head_dim": 16, "rotary_emb_dim": 16,
        "rotary_emb_base": 500.0, "qkv_proj_bias": false, "out_proj_bias": false, "causal": true},
        "d_intermediate": 100, "tie_embeddings": false}"#,
        // Mamba-2 layers with a finite Δ limit, MLPs only.
        r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2", "headdim": 16,
        "ngroups": 2, "dt_limit": [0.001, 0.1], "norm_before_gate": true}, "d_intermediate": 128}"#,
        r#"{"model_type": "moe_mamba", "hidden_size": 32, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 40, "router_aux_loss_coef": 0.2, "eos_token_id": 7}"#,
    ] {
        configs.push(ModelConfig::from_json_str(text).unwrap());
    }
    for config in configs {
        let text = serde_json::to_string_pretty(&config.to_hf_json()).unwrap();
        assert_eq!(ModelConfig::from_json_str(&text).unwrap(), config, "{text}");
    }
}
