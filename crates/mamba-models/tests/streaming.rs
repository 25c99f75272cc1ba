//! Streaming: a long input run in chunks, with the state carried from chunk to chunk, gives
//! what one forward pass over the whole input gives (last-position logits and final state
//! of a prefill; NLL and every position's logits of scoring), for Mamba-1, Mamba-2 and a
//! hybrid with attention layers, on random weights.

use candle_core::DType;
use mamba_models::config::ModelConfig;
use mamba_models::generate::score;
use mamba_models::layers::f32_vec;
use mamba_models::{Error, Model, State};
use mamba_testing::max_abs_diff;

/// Mamba-1 in the Hugging Face form.
const MAMBA1: &str = r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 64,
    "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "expand": 2,
    "conv_kernel": 4, "time_step_rank": 4}"#;

/// Mamba-2 whose SSD chunk (8) the streaming chunks below do not line up with.
const MAMBA2: &str = r#"{"d_model": 32, "n_layer": 2, "vocab_size": 64,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}}"#;

/// Mamba-2 layers around a rotary attention layer, each followed by a gated MLP: its
/// key/value cache grows from chunk to chunk.
const HYBRID: &str = r#"{"d_model": 32, "n_layer": 3, "vocab_size": 64,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
    "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "num_heads_kv": 2,
    "rotary_emb_dim": 8, "causal": true}, "d_intermediate": 48}"#;

/// Tokens per sequence.
const LEN: usize = 45;

/// A token per pass, sizes that divide neither the length nor the SSD chunk, and the
/// whole input in one pass.
const CHUNK_SIZES: [usize; 4] = [1, 7, 16, LEN];

/// Largest difference allowed between chunked and one-pass results: f32 rounding of
/// sums taken in another order.
const TOLERANCE: f32 = 1e-4;

fn models() -> Vec<(&'static str, Model)> {
    [("mamba1", MAMBA1), ("mamba2", MAMBA2), ("hybrid", HYBRID)]
        .into_iter()
        .map(|(name, json)| {
            let config = ModelConfig::from_json_str(json).unwrap();
            (name, Model::random(&config, DType::F32, 11).unwrap())
        })
        .collect()
}

/// `len` ids below `vocab` that vary from position to position.
fn token_ids(len: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 37 + seed * 101 + i * i * 13) % vocab) as u32)
        .collect()
}

/// The largest difference between two states' recurrent values and key/value caches.
fn state_diff(a: &State, b: &State) -> f32 {
    a.layers
        .iter()
        .zip(&b.layers)
        .map(|(x, y)| {
            let caches = match (&x.kv, &y.kv) {
                (Some(p), Some(q)) => p
                    .sequences
                    .iter()
                    .zip(&q.sequences)
                    .map(|(s, t)| {
                        max_abs_diff(&s.keys, &t.keys).max(max_abs_diff(&s.values, &t.values))
                    })
                    .fold(0.0, f32::max),
                (None, None) => 0.0,
                _ => f32::INFINITY,
            };
            max_abs_diff(&x.conv, &y.conv)
                .max(max_abs_diff(&x.ssm, &y.ssm))
                .max(caches)
        })
        .fold(0.0, f32::max)
}

#[test]
fn chunked_prefill_gives_the_logits_and_state_of_one_pass() {
    for (name, model) in models() {
        for batch in [1, 2] {
            let ids: Vec<u32> = (0..batch)
                .flat_map(|row| token_ids(LEN, model.vocab_size(), row))
                .collect();
            let mut whole = model.new_state(batch);
            let want = f32_vec(&model.prefill(&ids, &mut whole).unwrap()).unwrap();
            for chunk in CHUNK_SIZES {
                let mut state = model.new_state(batch);
                let got =
                    f32_vec(&model.prefill_chunked(&ids, &mut state, chunk).unwrap()).unwrap();
                let what = format!("{name}, batch {batch}, chunks of {chunk}");
                let diff = max_abs_diff(&got, &want);
                assert!(diff < TOLERANCE, "{what}: logits differ by {diff}");
                let diff = state_diff(&state, &whole);
                assert!(diff < TOLERANCE, "{what}: states differ by {diff}");
                assert_eq!(state.tokens_seen, LEN, "{what}");
            }
        }
    }
}

#[test]
fn chunked_scoring_gives_the_nll_and_logits_of_one_pass() {
    for (name, model) in models() {
        let ids = token_ids(LEN, model.vocab_size(), 3);
        let (want, want_logits) = score(&model, &ids, LEN, true).unwrap();
        let want_logits = want_logits.unwrap();
        assert_eq!(want_logits.len(), LEN * model.vocab_size(), "{name}");
        for chunk in CHUNK_SIZES {
            let (got, logits) = score(&model, &ids, chunk, true).unwrap();
            let what = format!("{name}, chunks of {chunk}");
            assert_eq!(got.predicted_tokens, LEN - 1, "{what}");
            let nll_diff = (got.mean_nll - want.mean_nll).abs();
            assert!(
                nll_diff < TOLERANCE as f64,
                "{what}: NLL differs by {nll_diff}"
            );
            let diff = max_abs_diff(&logits.unwrap(), &want_logits);
            assert!(diff < TOLERANCE, "{what}: logits differ by {diff}");
        }
    }
}

/// Tokens per sequence of a forward pass longer than two of the pieces the CPU forward pass
/// cuts its input into (at most 2048 tokens; a small model's pieces are that long).
const LONG_LEN: usize = 4400;

/// Every position's hidden states of one long forward pass (several pieces on the CPU,
/// the last one short) equal those of consecutive shorter passes, for two sequences.
#[test]
fn a_long_forward_pass_gives_every_position_of_shorter_passes() {
    for (name, model) in models() {
        let ids: Vec<u32> = (0..2)
            .flat_map(|row| token_ids(LONG_LEN, model.vocab_size(), row + 7))
            .collect();
        let mut whole = model.new_state(2);
        let want = f32_vec(&model.forward(&ids, &mut whole).unwrap()).unwrap();
        let hidden = want.len() / ids.len();
        let mut state = model.new_state(2);
        let mut got = vec![0.0f32; want.len()]; // (2, LONG_LEN, hidden)
        for start in (0..LONG_LEN).step_by(1000) {
            let end = (start + 1000).min(LONG_LEN);
            let piece: Vec<u32> = ids
                .chunks(LONG_LEN)
                .flat_map(|row| row[start..end].iter().copied())
                .collect();
            let h = f32_vec(&model.forward(&piece, &mut state).unwrap()).unwrap();
            for (row, seq) in got
                .chunks_mut(LONG_LEN * hidden)
                .zip(h.chunks((end - start) * hidden))
            {
                row[start * hidden..end * hidden].copy_from_slice(seq);
            }
        }
        let diff = max_abs_diff(&got, &want);
        assert!(diff < TOLERANCE, "{name}: hidden states differ by {diff}");
        let diff = state_diff(&state, &whole);
        assert!(diff < TOLERANCE, "{name}: states differ by {diff}");
        assert_eq!(whole.tokens_seen, LONG_LEN, "{name}");
    }
}

#[test]
fn a_zero_chunk_size_is_an_input_error() {
    let (_, model) = models().remove(0);
    let ids = token_ids(LEN, model.vocab_size(), 0);
    let mut state = model.new_state(1);
    assert!(matches!(
        model.prefill_chunked(&ids, &mut state, 0),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        score(&model, &ids, 0, false),
        Err(Error::Input(_))
    ));
}

#[test]
fn ids_that_do_not_fill_the_batch_are_an_input_error() {
    let (_, model) = models().remove(0);
    let mut state = model.new_state(2);
    for ids in [vec![], vec![1, 2, 3]] {
        assert!(matches!(
            model.prefill_chunked(&ids, &mut state, 4),
            Err(Error::Input(_))
        ));
    }
}

/// Decoding from copies of one prompt's state gives every copy what the prompt alone gives.
#[test]
fn repeated_states_decode_like_the_original() {
    for (name, model) in models() {
        let ids = token_ids(LEN, model.vocab_size(), 5);
        let mut alone = model.new_state(1);
        model.prefill_chunked(&ids, &mut alone, 16).unwrap();
        let mut copies = alone.repeated(3).unwrap();
        assert_eq!(copies.batch, 3, "{name}");
        let want = f32_vec(&model.step(&[7], &mut alone).unwrap()).unwrap();
        let got = f32_vec(&model.step(&[7, 7, 7], &mut copies).unwrap()).unwrap();
        for (row, logits) in got.chunks(want.len()).enumerate() {
            let diff = max_abs_diff(logits, &want);
            assert!(diff < TOLERANCE, "{name}: copy {row} differs by {diff}");
        }
    }
}
