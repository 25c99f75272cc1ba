//! Jamba beyond the golden outputs (those are in `models.rs`): prompts of unequal length
//! decoded together, gradients through every weight, and clean errors on bad input.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::ModelConfig;
use mamba_models::generate::{generate, GenerateOptions, DEFAULT_CHUNK_SIZE};
use mamba_models::init::init_tensors;
use mamba_models::sampling::SamplingParams;
use mamba_models::{Error, Model};
use mamba_testing::fixtures_dir;

fn fixture_model() -> Model {
    let dir = fixtures_dir().join("models/jamba/checkpoint");
    Model::load(&Checkpoint::open(&dir).unwrap(), DType::F32).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
        chunk_size: DEFAULT_CHUNK_SIZE,
    }
}

/// Greedy continuations of `prompts` decoded as one batch, and each decoded alone.
fn batched_and_alone(model: &Model, prompts: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let options = greedy(10);
    let batched = generate(model, prompts, &options, |_, _| Ok(()))
        .unwrap()
        .generated;
    let alone = prompts
        .iter()
        .map(|p| {
            generate(model, std::slice::from_ref(p), &options, |_, _| Ok(()))
                .unwrap()
                .generated
                .remove(0)
        })
        .collect();
    (batched, alone)
}

/// Unequal prompts are prefilled one by one and their states stacked: each attention
/// layer then holds caches of different lengths, and every sequence must still decode as
/// it does alone. Equal prompts share one batched prefill.
#[test]
fn prompts_decode_together_as_they_do_alone() {
    let model = fixture_model();
    let ragged = vec![
        vec![5, 17, 200, 3, 9],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
        vec![42],
    ];
    let (batched, alone) = batched_and_alone(&model, &ragged);
    assert_eq!(batched, alone, "prompts of unequal length");
    let equal = vec![vec![5, 17, 200, 3, 9], vec![250, 0, 13, 77, 128]];
    let (batched, alone) = batched_and_alone(&model, &equal);
    assert_eq!(batched, alone, "prompts of equal length");
}

#[test]
fn bad_inputs_are_errors() {
    let model = fixture_model();
    let vocab = model.vocab_size() as u32;
    let mut state = model.new_state(1);
    assert!(matches!(
        model.forward(&[1, vocab], &mut state),
        Err(Error::Input(_))
    ));
    let mut state = model.new_state(1);
    model.prefill(&[1, 2, 3], &mut state).unwrap();
    assert!(matches!(
        model.step(&[vocab + 5], &mut state),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        model.step(&[1, 2], &mut state),
        Err(Error::Input(_))
    ));
    let mut two = model.new_state(2);
    assert!(matches!(
        model.forward(&[1, 2, 3], &mut two),
        Err(Error::Input(_))
    ));
    // A state whose layers are in the wrong places (attention state for a Mamba layer and
    // the reverse) is refused, not indexed out of bounds.
    let mut swapped = model.new_state(1);
    swapped.layers.swap(1, 2);
    assert!(model.forward(&[1, 2], &mut swapped).is_err());
    let mut swapped = model.new_state(1);
    swapped.layers.swap(1, 2);
    assert!(model.step(&[1], &mut swapped).is_err());
}

/// Two attention layers (one with a dense MLP, one with experts) and two Mamba layers.
/// Every token uses every expert: the choice of the top k is piecewise constant, and
/// finite differences across a change of choice would measure the jump, not the gradient
/// (`moe.rs` checks the gradients of a sparse choice against a dense formula).
fn tiny_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"architectures": ["JambaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_experts": 3, "num_experts_per_tok": 3,
        "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 3,
        "expert_layer_offset": 0, "mamba_d_state": 4, "mamba_d_conv": 3, "mamba_expand": 2,
        "mamba_dt_rank": 2}"#,
    )
    .unwrap()
}

/// A model built on trainable variables, with the variables by name.
fn trainable(config: &ModelConfig) -> (Model, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let mut vars = Vec::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in init_tensors(config, DType::F32, 11).unwrap() {
            let var = Var::from_tensor(&t).unwrap();
            data.insert(name.clone(), var.clone());
            vars.push((name, var));
        }
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (Model::from_var_builder(&vb, config).unwrap(), vars)
}

/// Summed next-token cross-entropy of two rows of 11 tokens.
fn loss(model: &Model) -> Tensor {
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 32).collect();
    let (mut inputs, mut targets) = (vec![], vec![]);
    for row in ids.chunks(12) {
        inputs.extend_from_slice(&row[..11]);
        targets.extend_from_slice(&row[1..]);
    }
    let mut state = model.new_state(2);
    // The differentiable path (`forward` on the CPU is inference-only).
    let hidden = model.forward_hidden(&inputs, &mut state, false).unwrap();
    let logits = model
        .logits(&hidden.final_norm)
        .unwrap()
        .reshape((22, 32))
        .unwrap();
    let targets = Tensor::from_vec(targets, 22, &Device::Cpu).unwrap();
    (candle_nn::loss::cross_entropy(&logits, &targets).unwrap() * 22.0).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A deterministic direction in [-scale, scale]^n.
fn direction(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 2000) as f32 / 1000.0 - 1.0) * scale)
        .collect()
}

/// Autograd's derivative of the loss along a direction, for every weight tensor, against
/// a five-point finite difference. The loss is a sum of 22 f32 cross-entropies (about
/// 75), whose rounding puts the noise of the differences near 1e-3.
#[test]
fn gradients_match_finite_differences_for_every_weight() {
    let config = tiny_config();
    let (model, vars) = trainable(&config);
    let grads = loss(&model).backward().unwrap();
    let eps = 1e-2f32;
    for (k, (name, var)) in vars.iter().enumerate() {
        let grad = values(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}")),
        );
        let base = values(var.as_tensor());
        let rms = (base.iter().map(|v| v * v).sum::<f32>() / base.len() as f32).sqrt();
        let dir = direction(base.len(), k, rms.max(0.02));
        let analytic: f64 = grad.iter().zip(&dir).map(|(g, d)| (g * d) as f64).sum();
        let at = |e: f32| {
            let moved: Vec<f32> = base.iter().zip(&dir).map(|(v, d)| v + e * d).collect();
            var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&model).to_scalar::<f32>().unwrap() as f64
        };
        let numeric =
            (at(-2.0 * eps) - 8.0 * at(-eps) + 8.0 * at(eps) - at(2.0 * eps)) / (12.0 * eps as f64);
        at(0.0);
        let tol = 2e-3 + 1e-2 * numeric.abs().max(analytic.abs());
        assert!(
            (numeric - analytic).abs() <= tol,
            "{name}: autograd {analytic:.6}, finite differences {numeric:.6}"
        );
        assert!(analytic != 0.0, "{name}: zero gradient");
    }
    let has = |part: &str| vars.iter().any(|(n, _)| n.contains(part));
    for part in [
        "self_attn.q_proj",
        "feed_forward.router",
        "feed_forward.experts.2.down_proj",
        "feed_forward.up_proj",
        "mamba.dt_layernorm",
        "mamba.c_layernorm",
    ] {
        assert!(has(part), "the tiny model has no {part}");
    }
}

/// Freshly initialised weights load back into the same architecture, and the model's
/// one-token steps continue a prefill as a longer prefill would.
#[test]
fn random_model_steps_agree_with_prefill() {
    let config = tiny_config();
    let model = Model::random(&config, DType::F32, 3).unwrap();
    let ids = [4u32, 9, 30, 1, 17, 22];
    let mut whole = model.new_state(1);
    let want = values(&model.prefill(&ids, &mut whole).unwrap());
    let mut state = model.new_state(1);
    model.prefill(&ids[..2], &mut state).unwrap();
    let mut got = vec![];
    for &id in &ids[2..] {
        got = values(&model.step(&[id], &mut state).unwrap());
    }
    let diff = mamba_testing::max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "steps differ from the prefill by {diff}");
    assert_eq!(state.kv_bytes_per_token(), whole.kv_bytes_per_token());
    assert!(state.kv_bytes_per_token() > 0 && state.bytes_per_sequence() > 0);
}
