//! The CPU inference paths on host slices (token-major prefill, fused decoding step,
//! matrix-vector kernels) against the differentiable tensor path, and the quantised weight
//! formats against f32, on the fixture checkpoints.

use mamba_models::checkpoint::Checkpoint;
use mamba_models::layers::f32_vec;
use mamba_models::{Model, WeightFormat};
use mamba_testing::fixtures_dir;

/// Every fixture family: Mamba-1 (tied and untied), FalconMamba, Mamba-2 and Jamba.
const MODELS: [&str; 5] = [
    "mamba_tied",
    "mamba_untied",
    "falcon_mamba",
    "mamba2",
    "jamba",
];

fn load(model: &str, format: WeightFormat) -> Model {
    let dir = fixtures_dir().join("models").join(model).join("checkpoint");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let mut model = Model::load(&checkpoint, format.load_dtype()).unwrap();
    model.convert_weights(format).unwrap();
    model
}

/// Two sequences of 37 ids below `vocab`, fixed.
fn prompt(vocab: usize) -> Vec<u32> {
    (0..74u32).map(|i| (i * 7919 + 13) % vocab as u32).collect()
}

/// `|a - b| / |b|` (Euclidean norms).
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Logits of every position of the prompt, through `Model::forward` (the host path on the
/// CPU).
fn prefill_logits(model: &Model) -> Vec<f32> {
    let ids = prompt(model.vocab_size());
    let mut state = model.new_state(2);
    let hidden = model.forward(&ids, &mut state).unwrap();
    f32_vec(&model.logits(&hidden).unwrap()).unwrap()
}

#[test]
fn host_prefill_matches_the_tensor_path() {
    for name in MODELS {
        let model = load(name, WeightFormat::F32);
        let ids = prompt(model.vocab_size());
        let (mut host_state, mut tensor_state) = (model.new_state(2), model.new_state(2));
        let host = f32_vec(&model.forward(&ids, &mut host_state).unwrap()).unwrap();
        let hidden = model
            .forward_hidden(&ids, &mut tensor_state, false)
            .unwrap();
        let tensor = f32_vec(&hidden.final_norm).unwrap();
        assert!(relative_error(&host, &tensor) < 1e-5, "{name}");
        // The states they leave agree too: the next token gives the same logits.
        let next = [1u32, 2];
        let a = f32_vec(&model.step(&next, &mut host_state).unwrap()).unwrap();
        let b = f32_vec(&model.step(&next, &mut tensor_state).unwrap()).unwrap();
        assert!(relative_error(&a, &b) < 1e-5, "{name} after prefill");
    }
}

#[test]
fn quantised_weights_stay_close_to_f32_and_finer_formats_closer() {
    for name in MODELS {
        let exact = prefill_logits(&load(name, WeightFormat::F32));
        let errors = [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_0]
            .map(|format| relative_error(&prefill_logits(&load(name, format)), &exact));
        let [bf16, q8_0, q4_0] = errors;
        // 8 bits of mantissa, 8-bit blocks, 4-bit blocks: each coarser than the one before.
        // (The fixtures are tiny random models, whose 4-bit error is large.)
        assert!(
            bf16 < 2e-2 && q8_0 < 5e-2 && q4_0 < 0.6,
            "{name}: {errors:?}"
        );
        assert!(bf16 < q8_0 && q8_0 < q4_0, "{name}: {errors:?}");
    }
}

#[test]
fn quantised_decoding_follows_its_own_prefill() {
    // Not Jamba: its router picks experts by rank, and the 8-bit rounding of the
    // activations that only decoding does can swap two nearly tied experts.
    for name in ["mamba_tied", "mamba_untied", "falcon_mamba", "mamba2"] {
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let model = load(name, format);
            let ids = prompt(model.vocab_size());
            let whole = prefill_logits(&model); // (2, 37, vocab)
            let vocab = model.vocab_size();
            let mut state = model.new_state(2);
            for t in 0..37 {
                let step_ids = [ids[t], ids[37 + t]];
                let got = f32_vec(&model.step(&step_ids, &mut state).unwrap()).unwrap();
                let want: Vec<f32> = (0..2)
                    .flat_map(|b| whole[(b * 37 + t) * vocab..][..vocab].to_vec())
                    .collect();
                // Decoding also rounds the activations to 8-bit blocks; prefill does not.
                let err = relative_error(&got, &want);
                assert!(err < 5e-2, "{name} {format:?} step {t}: {err}");
            }
        }
    }
}

#[test]
fn each_format_reads_fewer_weight_bytes_than_the_one_before() {
    for name in ["mamba_tied", "mamba2"] {
        let bytes: Vec<usize> = [
            WeightFormat::F32,
            WeightFormat::Bf16,
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
        ]
        .into_iter()
        .map(|f| load(name, f).weight_bytes_per_token())
        .collect();
        assert_eq!(bytes[0], 2 * bytes[1], "{name}: bf16 halves f32");
        assert!(
            bytes[1] > bytes[2] && bytes[2] > bytes[3],
            "{name}: {bytes:?}"
        );
        let model = load(name, WeightFormat::Q8_0);
        assert_eq!(model.weight_format(), WeightFormat::Q8_0);
    }
}
