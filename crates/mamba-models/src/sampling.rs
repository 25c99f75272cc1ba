//! Choosing the next token from a row of logits: greedy, or seeded sampling with
//! temperature, top-k and top-p (nucleus), after an optional repetition penalty.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::HashSet;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; `0` means greedy (argmax).
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the smallest set of most likely tokens whose probability
    /// adds up to at least `p`.
    pub top_p: Option<f64>,
    /// CTRL-style penalty on every token already seen (`1.0` is none).
    pub repetition_penalty: f32,
    /// Seed of the random generator, so that a run can be repeated.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding without penalty.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Checks that every parameter is in range: `temperature >= 0` and finite,
    /// `top_k >= 1`, `0 < top_p <= 1`, `repetition_penalty > 0` and finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Input("top_k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Input(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(Error::Input(format!(
                "repetition_penalty must be a finite number > 0, got {r}"
            )));
        }
        Ok(())
    }

    /// Whether tokens are chosen by argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Picks tokens according to [`SamplingParams`], with its own seeded random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose random generator starts from `params.seed`. Out-of-range
    /// parameters (see [`SamplingParams::validate`]) are tolerated: an invalid temperature
    /// acts as greedy, and top-k / top-p always keep at least one token.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The parameters this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token given the `logits` of the last position (one per vocabulary entry)
    /// and the tokens seen so far (for the repetition penalty; ids outside `logits` are
    /// ignored). NaN logits count as `-inf`. When no token has a finite logit, and for
    /// an empty `logits`, the answer is token 0.
    pub fn sample(&mut self, logits: &[f32], previous_tokens: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, previous_tokens, self.params.repetition_penalty);
        let temperature = self.params.temperature;
        if !(temperature > 0.0 && temperature.is_finite()) {
            return argmax(&logits);
        }
        let ranked = ranked_tokens(&logits, self.params.top_k);
        let probs = softmax(&ranked, temperature);
        let kept = nucleus_len(&probs, self.params.top_p);
        let choice = self.draw(&probs[..kept]);
        ranked.get(choice).map_or(0, |&(id, _)| id)
    }

    /// Index drawn with probability proportional to `weights` (the first when all are 0).
    fn draw(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return 0;
        }
        let mut u = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                return i;
            }
            u -= w;
        }
        // Rounding left `u` past the end: the last token with any weight.
        weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
    }
}

/// CTRL / Hugging Face repetition penalty: each distinct token of `previous` has its
/// logit divided by `penalty` when positive, multiplied by it otherwise.
fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let seen: HashSet<u32> = previous.iter().copied().collect();
    for id in seen {
        if let Some(logit) = usize::try_from(id).ok().and_then(|i| logits.get_mut(i)) {
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        }
    }
}

/// A logit as a sort key: NaN becomes `-inf`.
fn sort_key(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit
    }
}

/// Index of the largest logit, the lowest index among ties; 0 for an empty slice.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if sort_key(l) > sort_key(logits[best]) {
            best = i;
        }
    }
    best as u32
}

/// Best first, lowest id first among ties.
fn by_rank(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `(id, logit)` of the `top_k` best tokens (all when `None`), best first.
fn ranked_tokens(logits: &[f32], top_k: Option<usize>) -> Vec<(u32, f64)> {
    let mut ranked: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, f64::from(sort_key(l))))
        .collect();
    let k = top_k.unwrap_or(ranked.len()).max(1);
    if k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, by_rank);
        ranked.truncate(k);
    }
    ranked.sort_unstable_by(by_rank);
    ranked
}

/// `softmax(logit / temperature)` of best-first `(id, logit)` pairs. Tokens at `+inf`
/// share all the mass; when every logit is `-inf` all probabilities are 0.
fn softmax(ranked: &[(u32, f64)], temperature: f64) -> Vec<f64> {
    let Some(&(_, max)) = ranked.first() else {
        return Vec::new();
    };
    let weights: Vec<f64> = if max == f64::INFINITY {
        ranked
            .iter()
            .map(|&(_, l)| if l == f64::INFINITY { 1.0 } else { 0.0 })
            .collect()
    } else if max == f64::NEG_INFINITY {
        vec![0.0; ranked.len()]
    } else {
        ranked
            .iter()
            .map(|&(_, l)| ((l - max) / temperature).exp())
            .collect()
    };
    let total: f64 = weights.iter().sum();
    if total > 0.0 {
        weights.iter().map(|w| w / total).collect()
    } else {
        weights
    }
}

/// How many of the best-first `probs` the nucleus keeps: the fewest whose sum reaches
/// `top_p`, at least one.
fn nucleus_len(probs: &[f64], top_p: Option<f64>) -> usize {
    let Some(p) = top_p else {
        return probs.len();
    };
    let mut cumulative = 0.0;
    for (i, prob) in probs.iter().enumerate() {
        cumulative += prob;
        if cumulative >= p {
            return i + 1;
        }
    }
    probs.len()
}
