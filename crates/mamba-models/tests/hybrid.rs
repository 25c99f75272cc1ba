//! `mamba_ssm`-style hybrids (attention layers, gated MLPs, Transformers) and MoE-Mamba on
//! random weights: decoding continues a prefill exactly, prompts of unequal length decode
//! together as they do alone, `mamba_ssm`'s own tensor names load, rotary attention sees
//! the order of tokens, and configs that disagree with the weights are clean errors.

use candle_core::{DType, Device, Tensor};
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::ModelConfig;
use mamba_models::generate::{generate, GenerateOptions, DEFAULT_CHUNK_SIZE};
use mamba_models::init::init_tensors;
use mamba_models::layers::f32_vec;
use mamba_models::sampling::SamplingParams;
use mamba_models::{Error, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Mamba-1 layers with grouped-query rotary attention (biases on) at layer 1, and a gated
/// MLP (`d_intermediate` 40, 128 wide) after every mixer.
const HYBRID_MAMBA1: &str = r#"{"d_model": 16, "n_layer": 3, "vocab_size": 32,
    "ssm_cfg": {"d_state": 4, "d_conv": 3, "dt_rank": 2}, "attn_layer_idx": [1],
    "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4,
    "causal": true}, "d_intermediate": 40, "tie_embeddings": false}"#;

/// Mamba-2 layers with plain multi-head attention at layer 0, no MLPs.
const HYBRID_MAMBA2: &str = r#"{"d_model": 32, "n_layer": 2, "vocab_size": 32,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 4, "d_conv": 3},
    "attn_layer_idx": [0], "attn_cfg": {"num_heads": 2, "causal": true}}"#;

/// Attention at every layer, rotary over whole heads, SwiGLU MLPs, no biases.
const TRANSFORMER: &str = r#"{"d_model": 16, "n_layer": 2, "vocab_size": 32,
    "attn_layer_idx": [0, 1], "attn_cfg": {"num_heads": 2, "rotary_emb_dim": 8,
    "qkv_proj_bias": false, "out_proj_bias": false, "causal": true}, "d_intermediate": 64}"#;

const MOE_MAMBA: &str = r#"{"architectures": ["MoEMambaForCausalLM"], "vocab_size": 32,
    "hidden_size": 16, "num_hidden_layers": 2, "state_size": 4, "conv_kernel": 3,
    "time_step_rank": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}"#;

fn config(text: &str) -> ModelConfig {
    ModelConfig::from_json_str(text).unwrap()
}

fn all_configs() -> [(&'static str, ModelConfig); 4] {
    [
        ("hybrid mamba1", config(HYBRID_MAMBA1)),
        ("hybrid mamba2", config(HYBRID_MAMBA2)),
        ("transformer", config(TRANSFORMER)),
        ("moe-mamba", config(MOE_MAMBA)),
    ]
}

/// Logits `(vocab)` of the last position of `ids`, run from a fresh state.
fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut state = model.new_state(1);
    f32_vec(&model.prefill(ids, &mut state).unwrap()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    mamba_testing::max_abs_diff(a, b)
}

/// A short prefill followed by one-token steps (through the KV caches and recurrent
/// states) gives the logits of prefilling everything at once.
#[test]
fn steps_continue_a_prefill_as_a_longer_prefill_would() {
    let ids = [4u32, 9, 30, 1, 17, 22, 5];
    for (name, config) in all_configs() {
        let model = Model::random(&config, DType::F32, 3).unwrap();
        let want = last_logits(&model, &ids);
        let mut state = model.new_state(1);
        model.prefill(&ids[..3], &mut state).unwrap();
        let mut got = vec![];
        for &id in &ids[3..] {
            got = f32_vec(&model.step(&[id], &mut state).unwrap()).unwrap();
        }
        let diff = max_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{name}: steps differ from the prefill by {diff}"
        );
    }
}

/// Unequal prompts are prefilled one by one and their states (caches of different
/// lengths, recurrent states) stacked for batched decoding.
#[test]
fn unequal_prompts_decode_together_as_they_do_alone() {
    let prompts = vec![
        vec![5, 17, 20, 3, 9],
        vec![1, 2, 3, 4, 5, 6, 7, 8],
        vec![12],
    ];
    let options = GenerateOptions {
        max_tokens: 8,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
        chunk_size: DEFAULT_CHUNK_SIZE,
    };
    for (name, config) in all_configs() {
        let model = Model::random(&config, DType::F32, 5).unwrap();
        let batched = generate(&model, &prompts, &options, |_, _| Ok(()))
            .unwrap()
            .generated;
        for (prompt, together) in prompts.iter().zip(&batched) {
            let alone = generate(
                &model,
                std::slice::from_ref(prompt),
                &options,
                |_, _| Ok(()),
            )
            .unwrap()
            .generated;
            assert_eq!(&alone[0], together, "{name}: prompt {prompt:?}");
        }
    }
}

/// A single causal attention layer without positional encoding sees the earlier tokens
/// as a set: swapping two of them leaves the last position's output unchanged. Rotary
/// embedding makes the one-layer Transformer tell them apart.
#[test]
fn rotary_attention_sees_the_order_of_tokens() {
    let one_layer = TRANSFORMER
        .replace("\"n_layer\": 2", "\"n_layer\": 1")
        .replace("[0, 1]", "[0]");
    let (ordered, swapped) = ([3u32, 11, 20, 7], [11u32, 3, 20, 7]);
    for (rotary_dim, order_matters) in [(8, true), (0, false)] {
        let text = one_layer.replace(
            "\"rotary_emb_dim\": 8",
            &format!("\"rotary_emb_dim\": {rotary_dim}"),
        );
        let model = Model::random(&config(&text), DType::F32, 2).unwrap();
        let diff = max_diff(
            &last_logits(&model, &ordered),
            &last_logits(&model, &swapped),
        );
        assert_eq!(
            diff > 1e-4,
            order_matters,
            "rotary dim {rotary_dim}: swapping two tokens changed the logits by {diff}"
        );
    }
}

/// Only models with experts report a load-balancing loss.
#[test]
fn forward_reports_the_router_loss_of_expert_layers_only() {
    for (name, config) in all_configs() {
        let model = Model::random(&config, DType::F32, 1).unwrap();
        let mut state = model.new_state(2);
        let hidden = model
            .forward_hidden(&[1, 2, 3, 4, 5, 6], &mut state, false)
            .unwrap();
        let has_experts = config.router_aux_loss_coef() > 0.0;
        assert_eq!(hidden.router_aux_loss.is_some(), has_experts, "{name}");
        if let Some(aux) = hidden.router_aux_loss {
            assert!(aux.to_scalar::<f32>().unwrap().is_finite(), "{name}");
        }
    }
}

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mamba-hybrid-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `config.json` (the native form) and the weights under `file`.
fn write_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    file: &str,
    weights: &HashMap<String, Tensor>,
) {
    let json = serde_json::to_string_pretty(&config.to_hf_json()).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
    candle_core::safetensors::save(weights, dir.join(file)).unwrap();
}

/// A checkpoint as `mamba_ssm` saves it (its embedding name, any file name) loads and
/// computes what the model built from this crate's names does. The attention, MLP and
/// second-norm tensors carry `mamba_ssm`'s names in both.
#[test]
fn mamba_ssm_checkpoints_load_under_their_own_names() {
    let config = config(HYBRID_MAMBA1);
    let ours = init_tensors(&config, DType::F32, 9).unwrap();
    for name in [
        "backbone.layers.1.mixer.in_proj.weight",
        "backbone.layers.1.mixer.in_proj.bias",
        "backbone.layers.1.mixer.out_proj.bias",
        "backbone.layers.0.mlp.fc1.weight",
        "backbone.layers.2.mlp.fc2.weight",
        "backbone.layers.2.norm2.weight",
        "lm_head.weight",
    ] {
        assert!(ours.contains_key(name), "no {name}");
    }
    let native: HashMap<String, Tensor> = ours
        .iter()
        .map(|(name, t)| {
            let name = name.replace("backbone.embeddings.", "backbone.embedding.");
            (name, t.clone())
        })
        .collect();
    let dir = temp_dir("native-names");
    write_checkpoint(&dir, &config, "pytorch_model.safetensors", &native);
    let loaded = Model::load(&Checkpoint::open(&dir).unwrap(), DType::F32).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(ours, DType::F32, &Device::Cpu);
    let built = Model::from_var_builder(&vb, &config).unwrap();
    let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
    assert_eq!(last_logits(&loaded, &ids), last_logits(&built, &ids));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config whose heads, MLP width or attention layers differ from the stored weights is
/// refused with a checkpoint error, not a panic.
#[test]
fn configs_disagreeing_with_the_weights_are_checkpoint_errors() {
    let weights = init_tensors(&config(HYBRID_MAMBA1), DType::F32, 4).unwrap();
    let dir = temp_dir("disagree");
    for (what, from, to) in [
        (
            "key/value heads",
            "\"num_heads_kv\": 2",
            "\"num_heads_kv\": 4",
        ),
        (
            "MLP width",
            "\"d_intermediate\": 40",
            "\"d_intermediate\": 200",
        ),
        (
            "attention layer",
            "\"attn_layer_idx\": [1]",
            "\"attn_layer_idx\": [2]",
        ),
    ] {
        let edited = HYBRID_MAMBA1.replace(from, to);
        assert_ne!(edited, HYBRID_MAMBA1, "{what}: nothing replaced");
        write_checkpoint(&dir, &config(&edited), "model.safetensors", &weights);
        let result = Model::load(&Checkpoint::open(&dir).unwrap(), DType::F32);
        assert!(
            matches!(result, Err(Error::Checkpoint(_))),
            "{what}: expected a checkpoint error, got {result:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
