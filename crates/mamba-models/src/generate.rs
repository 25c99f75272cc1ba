//! Text generation (prefill once, then one recurrent step per token) and scoring
//! (negative log-likelihood and perplexity of given tokens). Both run long inputs in
//! chunks with the state carried across, so their activations do not grow with the input.

use crate::error::{Error, Result};
use crate::layers::f32_vec;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::state::{LayerState, State};
use candle_core::Tensor;
use std::time::Instant;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// A sequence stops after producing one of these (its EOS).
    pub stop_tokens: Vec<u32>,
    /// Prompt tokens per sequence in each forward pass of the prefill (see
    /// [`DEFAULT_CHUNK_SIZE`]).
    pub chunk_size: usize,
}

/// Tokens per sequence in one forward pass over a long input (prefill, scoring): longer
/// inputs run in chunks of this many tokens with the state carried across, so that the
/// activations held at once are those of one chunk whatever the input's length.
pub const DEFAULT_CHUNK_SIZE: usize = 2048;

/// What [`generate`] produced, with its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens only, one list per sequence (including a final stop token if produced).
    pub generated: Vec<Vec<u32>>,
    pub prefill_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_seconds)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_seconds)
    }
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Generates from each prompt. Prompts of equal length are prefilled as one batch; others
/// one by one, their states then stacked for batched decoding. `on_token(row, id)` is called
/// as each token is chosen, so callers can stream text.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    options.sampling.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Input(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    let start = Instant::now();
    let (mut state, logits) = prefill_all(model, prompts, options.chunk_size)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let prefill_tokens = prompts.iter().map(Vec::len).sum();

    let batch = prompts.len();
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|row| {
            let mut params = options.sampling.clone();
            params.seed = params.seed.wrapping_add(row as u64);
            Sampler::new(params)
        })
        .collect();
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut logits = logits;
    let decode_start = Instant::now();
    let mut decode_tokens = 0;
    for step in 0..options.max_tokens {
        let rows = f32_vec(&logits)?;
        let vocab = rows.len() / batch;
        let mut next = Vec::with_capacity(batch);
        for row in 0..batch {
            let id = samplers[row].sample(&rows[row * vocab..][..vocab], &history[row]);
            if !done[row] {
                generated[row].push(id);
                history[row].push(id);
                on_token(row, id)?;
                done[row] = options.stop_tokens.contains(&id);
            }
            next.push(id);
        }
        if done.iter().all(|&d| d) || step + 1 == options.max_tokens {
            break;
        }
        logits = model.step(&next, &mut state)?;
        decode_tokens += batch;
    }
    Ok(Generation {
        generated,
        prefill_tokens,
        prefill_seconds,
        decode_tokens,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
    })
}

/// Prefills every prompt in chunks of `chunk_size` tokens and returns the batched state and
/// last-position logits `(batch, vocab)`.
fn prefill_all(model: &Model, prompts: &[Vec<u32>], chunk_size: usize) -> Result<(State, Tensor)> {
    if prompts.iter().all(|p| p.len() == prompts[0].len()) {
        let ids: Vec<u32> = prompts.concat();
        let mut state = model.new_state(prompts.len());
        let logits = model.prefill_chunked(&ids, &mut state, chunk_size)?;
        return Ok((state, logits));
    }
    let mut states = Vec::with_capacity(prompts.len());
    let mut logits = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut state = model.new_state(1);
        logits.push(model.prefill_chunked(prompt, &mut state, chunk_size)?);
        states.push(state);
    }
    Ok((stack_states(&states)?, Tensor::cat(&logits, 0)?))
}

/// Stacks single-sequence states into one batched state (recurrent layouts are
/// batch-major; key/value caches stay per sequence, whatever their lengths).
pub fn stack_states(states: &[State]) -> Result<State> {
    let layers = (0..states.first().map_or(0, |s| s.layers.len()))
        .map(|l| LayerState::stack(&states.iter().map(|s| &s.layers[l]).collect::<Vec<_>>()))
        .collect::<Result<_>>()?;
    Ok(State {
        batch: states.iter().map(|s| s.batch).sum(),
        layers,
        tokens_seen: states.iter().map(|s| s.tokens_seen).max().unwrap_or(0),
    })
}

/// Scores of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Tokens predicted (length - 1).
    pub predicted_tokens: usize,
    /// Mean negative log-likelihood per predicted token, in nats.
    pub mean_nll: f64,
}

impl Score {
    pub fn perplexity(&self) -> f64 {
        self.mean_nll.exp()
    }
}

/// Scores `ids` (one sequence), running it in chunks of `chunk_size` tokens with the state
/// carried across, and, when `keep_logits`, returns its logits `(len, vocab)` (which, unlike
/// the rest, grow with the length).
pub fn score(
    model: &Model,
    ids: &[u32],
    chunk_size: usize,
    keep_logits: bool,
) -> Result<(Score, Option<Vec<f32>>)> {
    if ids.len() < 2 {
        return Err(Error::Input("scoring needs at least 2 tokens".into()));
    }
    if chunk_size == 0 {
        return Err(Error::Input("the chunk size must be at least 1".into()));
    }
    let mut state = model.new_state(1);
    let mut total_nll = 0.0f64;
    let mut kept = keep_logits.then(Vec::new);
    for (chunk_index, chunk) in ids.chunks(chunk_size).enumerate() {
        let hidden = model.forward(chunk, &mut state)?;
        let logits = f32_vec(&model.logits(&hidden)?)?;
        let vocab = logits.len() / chunk.len();
        let offset = chunk_index * chunk_size;
        for (t, row) in logits.chunks(vocab).enumerate() {
            if let Some(&target) = ids.get(offset + t + 1) {
                total_nll -= log_softmax_at(row, target as usize);
            }
        }
        if let Some(k) = kept.as_mut() {
            k.extend_from_slice(&logits);
        }
    }
    let predicted_tokens = ids.len() - 1;
    Ok((
        Score {
            predicted_tokens,
            mean_nll: total_nll / predicted_tokens as f64,
        },
        kept,
    ))
}

/// `log softmax(row)[target]`, computed stably in f64.
fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[target] as f64 - max - sum.ln()
}
