//! `mamba bench`: prefill and decoding speed of a preset's dimensions with random weights.

use crate::args::BenchArgs;
use anyhow::Result;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use mamba_models::config::preset;
use mamba_models::layers::f32_vec;
use mamba_models::sampling::{Sampler, SamplingParams};
use mamba_models::{Model, State};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// Seed of the random weights and of the random prompt, so runs are comparable.
const SEED: u64 = 42;

/// What one benchmark run measured.
struct Measurement {
    prefill_seconds: f64,
    decode_seconds: f64,
    peak_rss_bytes: Option<u64>,
}

impl Measurement {
    /// Prompt tokens of the whole batch per second.
    fn prefill_tokens_per_s(&self, args: &BenchArgs) -> f64 {
        (args.batch * args.prompt_len) as f64 / self.prefill_seconds
    }

    /// Generated tokens of the whole batch per second.
    fn decode_tokens_per_s(&self, args: &BenchArgs) -> f64 {
        (args.batch * args.gen_len) as f64 / self.decode_seconds
    }

    fn ms_per_decode_step(&self, args: &BenchArgs) -> f64 {
        self.decode_seconds * 1e3 / args.gen_len as f64
    }
}

pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    let config = preset(&args.preset)?;
    let spinner = spinner(format!(
        "initialising {} with random {} weights",
        args.preset,
        args.dtype.name()
    ));
    let model = Model::random(&config, args.dtype.dtype(), SEED)?;
    spinner.finish_and_clear();
    let measurement = measure(&model, args)?;
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", report(args, &measurement))?;
    } else {
        writeln!(out, "{}", summary(args, &measurement))?;
    }
    Ok(())
}

/// Times the prefill of a random prompt, then `gen_len` greedy decoding steps after one
/// untimed warm-up step.
fn measure(model: &Model, args: &BenchArgs) -> Result<Measurement> {
    let prompt = random_ids(args.batch * args.prompt_len, model.vocab_size());
    let mut state = model.new_state(args.batch);
    let spinner = spinner(format!(
        "prefill of {} x {} tokens",
        args.batch, args.prompt_len
    ));
    let start = Instant::now();
    let logits = model.prefill(&prompt, &mut state)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    spinner.finish_and_clear();

    let mut sampler = Sampler::new(SamplingParams::default());
    let first = greedy_next(&mut sampler, &logits, args.batch)?;
    let warm_up = model.step(&first, &mut state)?;
    let next = greedy_next(&mut sampler, &warm_up, args.batch)?;
    let decode_seconds = timed_decode(model, &mut state, &mut sampler, next, args.gen_len)?;
    Ok(Measurement {
        prefill_seconds,
        decode_seconds,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Seconds taken by `steps` decoding steps from `next`, each feeding back its greedy choice.
fn timed_decode(
    model: &Model,
    state: &mut State,
    sampler: &mut Sampler,
    mut next: Vec<u32>,
    steps: usize,
) -> Result<f64> {
    let bar = ProgressBar::new(steps as u64).with_style(ProgressStyle::with_template(
        "decode {bar:30} {pos}/{len} steps [{elapsed}]",
    )?);
    let start = Instant::now();
    for _ in 0..steps {
        let logits = model.step(&next, state)?;
        next = greedy_next(sampler, &logits, state.batch)?;
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(seconds)
}

/// The most likely next token of each row of `logits: (batch, vocab)`.
fn greedy_next(sampler: &mut Sampler, logits: &Tensor, batch: usize) -> Result<Vec<u32>> {
    let values = f32_vec(logits)?;
    let vocab = values.len() / batch;
    Ok(values
        .chunks(vocab)
        .map(|row| sampler.sample(row, &[]))
        .collect())
}

/// `len` token ids drawn uniformly below `vocab`, always the same for a given length.
fn random_ids(len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let vocab = u32::try_from(vocab).unwrap_or(u32::MAX);
    (0..len).map(|_| rng.random_range(0..vocab)).collect()
}

/// A spinner on stderr (hidden when stderr is not a terminal) showing `message`.
fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

/// The process's peak resident set size (`VmHWM`), where `/proc` reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn report(args: &BenchArgs, m: &Measurement) -> serde_json::Value {
    json!({
        "preset": args.preset,
        "dtype": args.dtype.name(),
        "threads": rayon::current_num_threads(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "prefill_seconds": m.prefill_seconds,
        "prefill_tokens_per_s": m.prefill_tokens_per_s(args),
        "decode_seconds": m.decode_seconds,
        "decode_tokens_per_s": m.decode_tokens_per_s(args),
        "ms_per_decode_step": m.ms_per_decode_step(args),
        "peak_rss_bytes": m.peak_rss_bytes,
    })
}

fn summary(args: &BenchArgs, m: &Measurement) -> String {
    let peak_rss = m.peak_rss_bytes.map_or_else(
        || "unknown".to_string(),
        |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    );
    format!(
        "{} ({}, {} threads, batch {})\n\
         prefill: {} tokens per sequence in {:.3} s, {:.1} tokens/s\n\
         decode: {} steps in {:.3} s, {:.1} tokens/s, {:.2} ms per step\n\
         peak RSS: {peak_rss}",
        args.preset,
        args.dtype.name(),
        rayon::current_num_threads(),
        args.batch,
        args.prompt_len,
        m.prefill_seconds,
        m.prefill_tokens_per_s(args),
        args.gen_len,
        m.decode_seconds,
        m.decode_tokens_per_s(args),
        m.ms_per_decode_step(args),
    )
}
