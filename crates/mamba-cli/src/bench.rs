//! `mamba bench`: prefill and decoding speed of a preset's (or a config's) dimensions
//! with random weights, and the peak memory it took.

use crate::args::BenchArgs;
use crate::init::architecture;
use crate::memory::{peak_device_bytes, peak_rss_bytes};
use anyhow::Result;
use candle_core::{Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_models::init::init_tensors;
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
    /// On a GPU: the most device memory held at once (see [`peak_device_bytes`]).
    peak_device_bytes: Option<u64>,
}

/// A model with random weights and what it is made of.
struct RandomModel {
    model: Model,
    parameters: usize,
}

impl Measurement {
    /// Prompt tokens prefilled per second.
    fn prefill_tokens_per_s(&self, args: &BenchArgs) -> f64 {
        prefill_tokens(args) as f64 / self.prefill_seconds
    }

    /// Generated tokens of the whole batch per second.
    fn decode_tokens_per_s(&self, args: &BenchArgs) -> f64 {
        (args.batch * args.gen_len) as f64 / self.decode_seconds
    }

    fn ms_per_decode_step(&self, args: &BenchArgs) -> f64 {
        self.decode_seconds * 1e3 / args.gen_len as f64
    }

    /// Weight bytes read per second while decoding (each step reads every weight once),
    /// to compare with the memory bandwidth.
    fn decode_weight_gb_per_s(&self, args: &BenchArgs, model: &Model) -> f64 {
        model.weight_bytes_per_token() as f64 * args.gen_len as f64 / self.decode_seconds / 1e9
    }
}

pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    let spinner = spinner(format!(
        "initialising {} with random {} weights",
        model_name(args),
        args.dtype.name()
    ));
    let random = random_model(args)?;
    spinner.finish_and_clear();
    let measurement = measure(&random.model, args)?;
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", report(args, &random, &measurement))?;
    } else {
        writeln!(out, "{}", summary(args, &random.model, &measurement))?;
    }
    Ok(())
}

/// The preset's name, or the config file's path.
fn model_name(args: &BenchArgs) -> String {
    let a = &args.architecture;
    match (&a.preset, &a.config) {
        (Some(name), _) => name.clone(),
        (None, Some(path)) => path.display().to_string(),
        (None, None) => String::new(),
    }
}

/// The benchmarked architecture with random weights, counting its parameters.
fn random_model(args: &BenchArgs) -> Result<RandomModel> {
    let device = args.device.open()?;
    let config = architecture(&args.architecture)?;
    let dtype = args.dtype.dtype();
    let tensors = init_tensors(&config, dtype, SEED)?;
    let parameters = tensors.values().map(Tensor::elem_count).sum();
    let mut model = Model::from_tensors_on(tensors, &config, dtype, &device)?;
    model.convert_weights(args.dtype.format())?;
    model.set_fused_decode(!args.no_fused_decode);
    Ok(RandomModel { model, parameters })
}

/// Prompt tokens the prefill runs: one prompt per sequence, or one in all when the
/// sequences share it.
fn prefill_tokens(args: &BenchArgs) -> usize {
    if args.shared_prompt {
        args.prompt_len
    } else {
        args.batch * args.prompt_len
    }
}

/// Times the prefill of a random prompt (in chunks of `--chunk-size`, after an untimed
/// prefill of the same prompt unless `--no-warmup`), then `gen_len` greedy decoding steps
/// after one untimed warm-up step (which also moves the weights into huge pages under
/// `--huge-pages`).
fn measure(model: &Model, args: &BenchArgs) -> Result<Measurement> {
    let prompts = prefill_tokens(args) / args.prompt_len;
    let prompt = random_ids(prefill_tokens(args), model.vocab_size());
    let mut state = model.new_state(prompts);
    let spinner = spinner(format!("prefill of {prompts} x {} tokens", args.prompt_len));
    if !args.no_warmup {
        warm_up_prefill(model, &prompt, prompts, args.chunk.chunk_size)?;
    }
    let start = Instant::now();
    let logits = model.prefill_chunked(&prompt, &mut state, args.chunk.chunk_size)?;
    model.device().synchronize()?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    spinner.finish_and_clear();
    drop(prompt);
    let (mut state, logits) = if args.shared_prompt {
        shared_by_batch(state, &logits, args.batch)?
    } else {
        (state, logits)
    };

    let mut sampler = Sampler::new(SamplingParams::default());
    let first = greedy_next(&mut sampler, &logits, args.batch)?;
    let warm_up = model.step(&first, &mut state)?;
    let next = greedy_next(&mut sampler, &warm_up, args.batch)?;
    let decode_seconds = timed_decode(model, &mut state, &mut sampler, next, args.gen_len)?;
    Ok(Measurement {
        prefill_seconds,
        decode_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        peak_device_bytes: peak_device_bytes(model.device()),
    })
}

/// One untimed prefill of the same prompt, as llama-bench's warm-up run: the first call
/// grows the per-thread buffers and faults in their pages (CPU; 3-4 % of a 512-token
/// mamba2-130m q4_0 prefill), or compiles the kernels (NVRTC), creates the cuBLAS handle and
/// grows the memory pool (GPU), which a user pays once per process and not per prompt.
fn warm_up_prefill(model: &Model, prompt: &[u32], prompts: usize, chunk: usize) -> Result<()> {
    let mut state = model.new_state(prompts);
    model.prefill_chunked(prompt, &mut state, chunk)?;
    Ok(model.device().synchronize()?)
}

/// `batch` copies of a one-sequence state and of its logits `(1, vocab)`; the state
/// itself is dropped, so that only the copies take memory.
fn shared_by_batch(state: State, logits: &Tensor, batch: usize) -> Result<(State, Tensor)> {
    Ok((state.repeated(batch)?, logits.repeat((batch, 1))?))
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

/// The most likely next token of each row of `logits: (batch, vocab)`: chosen on the
/// device when the logits are on a GPU (copying them to the host would cost more than a
/// step), else by the sampler.
fn greedy_next(sampler: &mut Sampler, logits: &Tensor, batch: usize) -> Result<Vec<u32>> {
    if !logits.device().is_cpu() {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
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

fn report(args: &BenchArgs, random: &RandomModel, m: &Measurement) -> serde_json::Value {
    let state = random.model.new_state(1);
    json!({
        "preset": args.architecture.preset,
        "config": args.architecture.config,
        "family": random.model.family().to_string(),
        "parameters": random.parameters,
        "state_bytes_per_sequence": state.bytes_per_sequence(),
        "kv_cache_bytes_per_token": state.kv_bytes_per_token(),
        "dtype": args.dtype.name(),
        "device": format!("{:?}", args.device).to_lowercase(),
        "threads": rayon::current_num_threads(),
        "batch": args.batch,
        "shared_prompt": args.shared_prompt,
        "prompt_len": args.prompt_len,
        "chunk_size": args.chunk.chunk_size,
        "gen_len": args.gen_len,
        "warmup": !args.no_warmup,
        "prefill_tokens": prefill_tokens(args),
        "prefill_seconds": m.prefill_seconds,
        "prefill_tokens_per_s": m.prefill_tokens_per_s(args),
        "decode_seconds": m.decode_seconds,
        "decode_tokens_per_s": m.decode_tokens_per_s(args),
        "ms_per_decode_step": m.ms_per_decode_step(args),
        "weight_bytes_per_token": random.model.weight_bytes_per_token(),
        "decode_weight_gb_per_s": m.decode_weight_gb_per_s(args, &random.model),
        "peak_rss_bytes": m.peak_rss_bytes,
        "peak_device_bytes": m.peak_device_bytes,
        "decode_engine": random.model.decode_engine(),
    })
}

fn summary(args: &BenchArgs, model: &Model, m: &Measurement) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let peak_rss = m.peak_rss_bytes.map_or_else(|| "unknown".to_string(), mib);
    let peak_device = m
        .peak_device_bytes
        .map(|b| format!(", peak device memory: {}", mib(b)))
        .unwrap_or_default();
    format!(
        "{} ({}, {} threads, batch {})\n\
         prefill: {} tokens in {:.3} s, {:.1} tokens/s\n\
         decode: {} steps in {:.3} s, {:.1} tokens/s, {:.2} ms per step, \
         weights read at {:.1} GB/s ({})\n\
         peak RSS: {peak_rss}{peak_device}",
        model_name(args),
        args.dtype.name(),
        rayon::current_num_threads(),
        args.batch,
        prefill_tokens(args),
        m.prefill_seconds,
        m.prefill_tokens_per_s(args),
        args.gen_len,
        m.decode_seconds,
        m.decode_tokens_per_s(args),
        m.ms_per_decode_step(args),
        m.decode_weight_gb_per_s(args, model),
        model.decode_engine(),
    )
}
