//! The gradients autograd computes through the whole model (embedding, norms, projections,
//! conv, scan or SSD, gated norm, attention, MLPs, experts, head) agree with finite
//! differences of the training objective, for every family.
//!
//! The ops compute in f32, so the differences are taken in f32 with a five-point stencil and a step large
//! enough to stay above rounding, and the loss is a sum over tokens so that gradients are not tiny.
//! (The op-level float64 finite-difference checks live in `mamba-ops/tests/backward.rs`.)

use candle_core::{DType, Tensor, Var};
use mamba_models::config::ModelConfig;
use mamba_models::init::init_tensors;
use mamba_testing::lcg_values;
use mamba_train::data::Batch;
use mamba_train::train::Trainable;

fn tiny_config(family: &str) -> ModelConfig {
    let json = match family {
        "mamba" => {
            r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "state_size": 4, "expand": 2, "conv_kernel": 3, "time_step_rank": 2}"#
        }
        "falcon_mamba" => {
            r#"{"architectures": ["FalconMambaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "state_size": 4, "expand": 2, "conv_kernel": 3, "time_step_rank": 2,
            "mixer_rms_eps": 1e-6}"#
        }
        "mamba2" => {
            r#"{"architectures": ["Mamba2ForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "state_size": 8, "expand": 2, "num_heads": 4, "head_dim": 8,
            "n_groups": 2, "chunk_size": 4, "conv_kernel": 3}"#
        }
        // Mamba-1 and rotary grouped-query attention (with biases), gated MLPs.
        "hybrid" => {
            r#"{"d_model": 16, "n_layer": 2, "vocab_size": 32, "ssm_cfg": {"d_state": 4,
            "d_conv": 3, "dt_rank": 2}, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4,
            "num_heads_kv": 2, "head_dim": 4, "rotary_emb_dim": 2, "causal": true},
            "d_intermediate": 8, "tie_embeddings": false}"#
        }
        // Mamba-2 and attention, no MLPs.
        "hybrid_mamba2" => {
            r#"{"d_model": 16, "n_layer": 2, "vocab_size": 32, "ssm_cfg": {"layer": "Mamba2",
            "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4, "d_conv": 3},
            "attn_layer_idx": [0], "attn_cfg": {"num_heads": 2, "rotary_emb_dim": 8, "causal": true}}"#
        }
        // Every token uses every expert, as in `jamba` below: the top-k choice is
        // piecewise constant, and finite differences across a change of choice would
        // measure the jump, not the gradient.
        "moe_mamba" => {
            r#"{"architectures": ["MoEMambaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "state_size": 4, "conv_kernel": 3, "time_step_rank": 2,
            "num_experts": 3, "num_experts_per_tok": 3, "moe_intermediate_size": 12,
            "router_aux_loss_coef": 0.1}"#
        }
        "jamba" => {
            r#"{"architectures": ["JambaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 2, "num_experts_per_tok": 2,
            "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
            "expert_layer_offset": 0, "mamba_d_state": 4, "mamba_d_conv": 3, "mamba_expand": 2,
            "mamba_dt_rank": 2, "router_aux_loss_coef": 0.1}"#
        }
        other => panic!("no tiny {other} config"),
    };
    ModelConfig::from_json_str(json).unwrap()
}

/// Two rows of 9 tokens: inputs and their next-token targets.
fn batch() -> Batch {
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 32).collect();
    let (mut inputs, mut targets) = (vec![], vec![]);
    for row in ids.chunks(10) {
        inputs.extend_from_slice(&row[..9]);
        targets.extend_from_slice(&row[1..]);
    }
    Batch { inputs, targets }
}

/// Summed (not averaged) cross-entropy over the batch.
fn loss(model: &Trainable, batch: &Batch) -> Tensor {
    (model.loss(batch, 2).unwrap() * batch.targets.len() as f64).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// `values + eps * direction` as the variable's new value.
fn set_shifted(var: &Var, values: &[f32], direction: &[f32], eps: f32) {
    let v: Vec<f32> = values
        .iter()
        .zip(direction)
        .map(|(x, d)| x + eps * d)
        .collect();
    var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
        .unwrap();
}

/// A seed from a weight's name (FNV-1a), so each tensor gets the same direction in every
/// run whatever order the variables come in.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A deterministic pseudo-random direction in [-scale, scale]^n.
fn direction(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    lcg_values(n, seed).into_iter().map(|v| v * scale).collect()
}

/// For every weight tensor, the directional derivative of the loss along a random
/// direction: autograd's `<grad, v>` against a five-point finite difference of
/// `loss(w + eps v)`. Moving a whole tensor at once keeps the loss change far above f32
/// rounding, which single-entry differences are not.
fn check_family(family: &str) {
    let config = tiny_config(family);
    let model = Trainable::new(&config, init_tensors(&config, DType::F32, 5).unwrap()).unwrap();
    let batch = batch();
    let grads = loss(&model, &batch).backward().unwrap();
    let eps = 1e-2f32;
    for (name, var) in model.vars() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{family}: no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let values = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Steps of about 1 % of the tensor's typical entry (embeddings ~0.02, A_log ~1).
        let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        let v = direction(values.len(), name_seed(name), rms.max(0.02));
        let analytic: f64 = grad.iter().zip(&v).map(|(g, d)| (g * d) as f64).sum();
        let at = |e: f32| {
            set_shifted(var, &values, &v, e);
            scalar(&loss(&model, &batch))
        };
        let numeric =
            (at(-2.0 * eps) - 8.0 * at(-eps) + 8.0 * at(eps) - at(2.0 * eps)) / (12.0 * eps as f64);
        set_shifted(var, &values, &v, 0.0);
        // 2e-3 absolute: the f32 rounding of a summed loss of ~20 terms, seen through the
        // stencil, reaches ~1e-3 on tensors whose directional derivative is tiny.
        let tol = 2e-3 + 1e-2 * numeric.abs().max(analytic.abs());
        assert!(
            (numeric - analytic).abs() <= tol,
            "{family}: derivative along a random direction of {name}: autograd {analytic:.6}, finite differences {numeric:.6}"
        );
    }
    assert!(
        model.vars().len() >= 10,
        "{family}: only {} tensors",
        model.vars().len()
    );
}

#[test]
fn mamba_gradients_match_finite_differences() {
    check_family("mamba");
}

#[test]
fn falcon_mamba_gradients_match_finite_differences() {
    check_family("falcon_mamba");
}

#[test]
fn mamba2_gradients_match_finite_differences() {
    check_family("mamba2");
}

#[test]
fn hybrid_gradients_match_finite_differences() {
    check_family("hybrid");
    check_family("hybrid_mamba2");
}

#[test]
fn moe_mamba_gradients_match_finite_differences() {
    check_family("moe_mamba");
}

#[test]
fn jamba_gradients_match_finite_differences() {
    check_family("jamba");
}
