//! The model families against Hugging Face's outputs in ../shared/fixtures/models:
//! logits, every layer's hidden states, and greedy generation with per-step logits.

use candle_core::DType;
use mamba_models::checkpoint::Checkpoint;
use mamba_models::layers::f32_vec;
use mamba_models::Model;
use mamba_testing::{assert_close, fixtures_dir, read_json, read_safetensors, tolerance, Tensor};
use std::collections::HashMap;

struct ModelCase {
    name: &'static str,
    model: Model,
    expected: HashMap<String, Tensor>,
    manifest: serde_json::Value,
}

impl ModelCase {
    fn load(name: &'static str) -> ModelCase {
        let dir = fixtures_dir().join("models").join(name);
        let checkpoint = Checkpoint::open(&dir.join("checkpoint")).unwrap();
        ModelCase {
            name,
            model: Model::load(&checkpoint, DType::F32).unwrap(),
            expected: read_safetensors(&dir.join("expected.safetensors")),
            manifest: read_json(&dir.join("manifest.json")),
        }
    }

    fn ids(&self, name: &str) -> (Vec<u32>, usize) {
        let t = &self.expected[name];
        (t.i64().iter().map(|&v| v as u32).collect(), t.shape[0])
    }

    fn check(&self, name: &str, got: &[f32]) {
        let label = format!("{} {name}", self.name);
        assert_close(
            &label,
            got,
            &self.expected[name].data,
            tolerance(&self.manifest, name),
        );
    }
}

fn check_forward(case: &ModelCase) {
    let (ids, batch) = case.ids("input_ids");
    let mut state = case.model.new_state(batch);
    let hidden = case.model.forward_hidden(&ids, &mut state, true).unwrap();
    case.check("hidden_embeddings", &f32_vec(&hidden.embeddings).unwrap());
    for (i, layer) in hidden.layers.iter().enumerate() {
        case.check(&format!("hidden_layer_{i}"), &f32_vec(layer).unwrap());
    }
    assert_eq!(hidden.layers.len(), case.model.config.num_layers());
    case.check("hidden_final_norm", &f32_vec(&hidden.final_norm).unwrap());
    case.check(
        "logits",
        &f32_vec(&case.model.logits(&hidden.final_norm).unwrap()).unwrap(),
    );

    let (single, _) = case.ids("input_ids_single");
    let mut state = case.model.new_state(1);
    let logits = case
        .model
        .logits(&case.model.forward(&single, &mut state).unwrap())
        .unwrap();
    case.check("logits_single", &f32_vec(&logits).unwrap());
}

/// Greedy decoding: prefill the prompt, then one recurrent step per new token.
fn check_generation(case: &ModelCase) {
    let (prompt, _) = case.ids("prompt_ids");
    let (expected_ids, _) = case.ids("generated_ids");
    let steps = expected_ids.len() - prompt.len();
    let mut state = case.model.new_state(1);
    let mut logits = case.model.prefill(&prompt, &mut state).unwrap();
    let mut step_logits = Vec::new();
    let mut ids = prompt.clone();
    for _ in 0..steps {
        let row = f32_vec(&logits).unwrap();
        let next = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        step_logits.extend_from_slice(&row);
        ids.push(next);
        logits = case.model.step(&[next], &mut state).unwrap();
    }
    assert_eq!(ids, expected_ids, "{}: greedy ids", case.name);
    case.check("generate_step_logits", &step_logits);
}

/// Prefilling a prompt in two pieces (carrying the state) equals prefilling it whole.
fn check_split_prefill(case: &ModelCase) {
    let (ids, batch) = case.ids("input_ids");
    let len = ids.len() / batch;
    let mut whole = case.model.new_state(batch);
    let want = f32_vec(&case.model.forward(&ids, &mut whole).unwrap()).unwrap();
    let mut state = case.model.new_state(batch);
    let split = 13;
    let piece = |from: usize, to: usize| -> Vec<u32> {
        ids.chunks(len).flat_map(|r| r[from..to].to_vec()).collect()
    };
    let a = f32_vec(&case.model.forward(&piece(0, split), &mut state).unwrap()).unwrap();
    let b = f32_vec(&case.model.forward(&piece(split, len), &mut state).unwrap()).unwrap();
    let hidden = want.len() / (batch * len);
    let joined: Vec<f32> = a
        .chunks(split * hidden)
        .zip(b.chunks((len - split) * hidden))
        .flat_map(|(x, y)| [x, y].concat())
        .collect();
    let diff = mamba_testing::max_abs_diff(&joined, &want);
    assert!(
        diff < 1e-4,
        "{}: split prefill differs by {diff}",
        case.name
    );
    for (x, y) in state.layers.iter().zip(&whole.layers) {
        assert!(mamba_testing::max_abs_diff(&x.ssm, &y.ssm) < 1e-5);
        assert!(mamba_testing::max_abs_diff(&x.conv, &y.conv) < 1e-5);
        assert_eq!(x.kv.is_some(), y.kv.is_some());
        if let (Some(a), Some(b)) = (&x.kv, &y.kv) {
            assert_eq!(a.sequences.len(), b.sequences.len());
            for (p, q) in a.sequences.iter().zip(&b.sequences) {
                assert!(mamba_testing::max_abs_diff(&p.keys, &q.keys) < 1e-5);
                assert!(mamba_testing::max_abs_diff(&p.values, &q.values) < 1e-5);
            }
        }
    }
}

fn check_all(name: &'static str) {
    let case = ModelCase::load(name);
    check_forward(&case);
    check_generation(&case);
    check_split_prefill(&case);
}

#[test]
fn mamba_tied_matches_transformers() {
    check_all("mamba_tied");
}

#[test]
fn mamba_untied_matches_transformers() {
    check_all("mamba_untied");
}

#[test]
fn falcon_mamba_matches_transformers() {
    check_all("falcon_mamba");
}

#[test]
fn mamba2_matches_transformers() {
    check_all("mamba2");
}

#[test]
fn jamba_matches_transformers() {
    check_all("jamba");
}

/// bf16 weights (f32 state and accumulation) stay close to the f32 model, for a short prompt
/// (matrix-vector kernels) and a long one (matrix products: on CPUs with bf16 dot instructions,
/// activations rounded to bf16).
#[test]
fn bf16_weights_track_f32() {
    for name in ["mamba_untied", "mamba2", "jamba"] {
        let dir = fixtures_dir().join("models").join(name);
        let checkpoint = Checkpoint::open(&dir.join("checkpoint")).unwrap();
        let f32_model = Model::load(&checkpoint, DType::F32).unwrap();
        let bf16_model = Model::load(&checkpoint, DType::BF16).unwrap();
        let vocab = f32_model.vocab_size() as u32;
        let long: Vec<u32> = (0..40u32).map(|i| (i * 37 + 3) % vocab).collect();
        for prompt in [&[3u32, 17, 42, 9, 100][..], &long] {
            let run = |m: &Model| {
                let mut state = m.new_state(1);
                let mut out = f32_vec(&m.prefill(prompt, &mut state).unwrap()).unwrap();
                out.extend(f32_vec(&m.step(&[7], &mut state).unwrap()).unwrap());
                out
            };
            let (a, b) = (run(&f32_model), run(&bf16_model));
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = mamba_testing::max_abs_diff(&a, &b);
            assert!(
                diff < 0.05 * scale,
                "{name}, {} tokens: bf16 logits differ by {diff} (scale {scale})",
                prompt.len()
            );
        }
    }
}

/// A decoding step of many sequences (20: past the matrix-vector rows, so f32 products take a
/// GEMM) gives each sequence the logits it gets stepped alone.
#[test]
fn a_step_of_many_sequences_equals_each_alone() {
    for name in ["mamba_untied", "mamba2"] {
        let case = ModelCase::load(name);
        let model = &case.model;
        let batch = 20;
        let prompts: Vec<u32> = (0..batch * 4)
            .map(|i| ((i * 37 + 5) % model.vocab_size()) as u32)
            .collect();
        let next: Vec<u32> = (0..batch).map(|b| (b * 11 + 3) as u32).collect();
        let mut together = model.new_state(batch);
        model.prefill(&prompts, &mut together).unwrap();
        let got = f32_vec(&model.step(&next, &mut together).unwrap()).unwrap();
        let vocab = got.len() / batch;
        for b in 0..batch {
            let mut alone = model.new_state(1);
            model.prefill(&prompts[b * 4..][..4], &mut alone).unwrap();
            let want = f32_vec(&model.step(&next[b..b + 1], &mut alone).unwrap()).unwrap();
            let diff = mamba_testing::max_abs_diff(&got[b * vocab..][..vocab], &want);
            assert!(diff < 1e-4, "{name} sequence {b}: logits differ by {diff}");
        }
    }
}
