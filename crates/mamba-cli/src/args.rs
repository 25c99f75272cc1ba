//! The command line: subcommands, their flags, and parsers for flag values.

use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mamba_models::generate::DEFAULT_CHUNK_SIZE;
use mamba_models::sampling::SamplingParams;
use mamba_models::WeightFormat;
use std::path::PathBuf;

/// Run, score, inspect and benchmark Mamba models on the CPU.
#[derive(Debug, Parser)]
#[command(name = "mamba", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Worker threads for matrix products and kernels (default: all cores).
    #[arg(long, global = true, value_name = "T", value_parser = parse_positive)]
    pub threads: Option<usize>,

    /// Print one JSON object on stdout instead of human-readable output.
    #[arg(long, global = true)]
    pub json: bool,

    /// Move each weight matrix into 2 MiB pages at its first decoding product on the CPU
    /// (Linux): fewer address translations while every token streams the weights from
    /// memory; decoding 4-16 % faster in 12 of 16 model, format and thread cells on this
    /// project's Zen 4 host, for a one-time copy that took 1-2 s per 250 MB there (a VM) and
    /// is much quicker on most machines.
    #[arg(long, global = true)]
    pub huge_pages: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Negative log-likelihood and perplexity of token sequences.
    Score(ScoreArgs),
    /// Describe a checkpoint: dimensions, parameters, weight and state sizes.
    Info(InfoArgs),
    /// Time prefill and decoding of a preset or config.json model with random weights.
    Bench(BenchArgs),
    /// Write a freshly initialised checkpoint (Hugging Face layout).
    Init(InitArgs),
    /// Train a model from scratch or fine-tune a checkpoint on text.
    Train(TrainArgs),
    /// Sweep sequence length and batch size for several models: prefill time, decode
    /// speed and peak memory, written as CSV, JSON and SVG plots.
    Scaling(ScalingArgs),
    /// Write a Mamba, FalconMamba or Mamba-2 checkpoint as a llama.cpp GGUF file.
    Convert(ConvertArgs),
}

/// Weight precision: f32 or bf16, or llama.cpp's 8-bit (q8_0) or 4-bit (q4_0) blocks for
/// the linear layers (on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl WeightDtype {
    pub fn format(self) -> WeightFormat {
        match self {
            WeightDtype::F32 => WeightFormat::F32,
            WeightDtype::Bf16 => WeightFormat::Bf16,
            WeightDtype::Q8_0 => WeightFormat::Q8_0,
            WeightDtype::Q4_0 => WeightFormat::Q4_0,
        }
    }

    /// The dtype the tensors are read in before any quantisation.
    pub fn dtype(self) -> DType {
        self.format().load_dtype()
    }

    pub fn name(self) -> &'static str {
        self.format().name()
    }
}

/// A checkpoint directory and the precision to load it in.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json, *.safetensors, optionally tokenizer.json), or a
    /// llama.cpp GGUF file (*.gguf) of a mamba or mamba2 model
    /// [default: the bundled byte-level model trained on the King James Bible]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Precision of the weights in memory.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,

    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device_spec)]
    pub device: DeviceSpec,
}

/// A device named on the command line, opened only when it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The spec as `--device` takes it.
    pub fn as_arg(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(ordinal) => format!("cuda:{ordinal}"),
        }
    }

    /// The candle device; a CUDA device in a build without CUDA is an error.
    pub fn open(self) -> anyhow::Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> anyhow::Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> anyhow::Result<candle_core::Device> {
    anyhow::bail!("built without CUDA support: rebuild with --features cuda")
}

fn parse_device_spec(s: &str) -> Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| "expected cpu, cuda or cuda:N".to_string()),
    }
}

/// The model this repository ships, found from the source tree the binary was built in.
pub const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/kjv-byte");

impl ModelArgs {
    /// `--model`, or the bundled model when it is not given.
    pub fn dir(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| PathBuf::from(BUNDLED_MODEL))
    }
}

/// How long inputs are split for the model.
#[derive(Debug, Args)]
pub struct ChunkArgs {
    /// Tokens per sequence in each forward pass over a long input; the recurrent state
    /// (and the key/value cache of attention layers) carries over from chunk to chunk, so
    /// memory does not grow with the input's length.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_positive)]
    pub chunk_size: usize,
}

/// Comma-separated token ids, e.g. `1,2,3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds(pub Vec<u32>);

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    #[command(flatten)]
    pub chunk: ChunkArgs,

    /// Most new tokens to generate (fewer when an end-of-sequence token comes first).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub temperature: f64,

    /// Sample among the K most likely tokens only.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Sample among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,

    /// Penalty on tokens already seen (1.0 is none).
    #[arg(
        long,
        value_name = "R",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub repetition_penalty: f32,

    /// Seed of the sampler's random generator.
    #[arg(long, value_name = "S", default_value_t = 42)]
    pub seed: u64,
}

impl GenerateArgs {
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// The prompt, as text, as a text file or as token ids.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text (needs a tokenizer).
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,

    /// File whose text is the prompt (needs a tokenizer), prefilled in chunks of
    /// --chunk-size tokens: its length is limited by time, not by memory.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,

    /// Prompt token ids, comma-separated.
    #[arg(long, value_name = "IDS", value_parser = parse_token_ids)]
    pub prompt_ids: Option<TokenIds>,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub input: ScoreInput,

    #[command(flatten)]
    pub chunk: ChunkArgs,

    /// Write the logits as a safetensors file with one f32 tensor `logits`, shape
    /// (batch, len, vocab); every sequence must have the same length. These are held in
    /// memory whole, unlike the activations.
    #[arg(long, value_name = "PATH")]
    pub logits_out: Option<PathBuf>,
}

/// The sequences to score: one text, one file, or token-id rows.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ScoreInput {
    /// Text to score (needs a tokenizer).
    #[arg(long, value_name = "TEXT")]
    pub text: Option<String>,

    /// File whose text to score (needs a tokenizer).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Token ids of one sequence, comma-separated; repeat for more sequences.
    #[arg(long, value_name = "IDS", value_parser = parse_token_ids)]
    pub ids: Vec<TokenIds>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Checkpoint directory, or a llama.cpp GGUF file (*.gguf).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint directory (Mamba, FalconMamba or Mamba-2).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,

    /// Output format.
    #[arg(long, value_enum, default_value_t = ConvertFormat::Gguf)]
    pub to: ConvertFormat,

    /// Output file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Store the linear layers in llama.cpp's 8-bit (q8_0) or 4-bit (q4_0) blocks
    /// (default: everything in f32).
    #[arg(long, value_enum)]
    pub quant: Option<ConvertQuant>,

    /// Copy the vocabulary (tokenizer.ggml.*) from this GGUF file, for checkpoints without a
    /// byte-level BPE tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub vocab_from: Option<PathBuf>,

    /// The model's name in the file (general.name) [default: the checkpoint folder's name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// What `mamba convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConvertFormat {
    /// llama.cpp's GGUF (architecture mamba or mamba2).
    Gguf,
}

/// A block format for `mamba convert --quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConvertQuant {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub architecture: ArchitectureArgs,

    /// Prompt tokens per sequence.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = parse_positive)]
    pub prompt_len: usize,

    /// Decoding steps to time.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_positive)]
    pub gen_len: usize,

    /// Sequences processed together.
    #[arg(long, value_name = "B", default_value_t = 1, value_parser = parse_positive)]
    pub batch: usize,

    /// Prefill one prompt and decode every sequence of the batch from a copy of its
    /// state: times batched decoding after long prompts without prefilling each of them.
    #[arg(long)]
    pub shared_prompt: bool,

    #[command(flatten)]
    pub chunk: ChunkArgs,

    /// Precision of the weights.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,

    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device_spec)]
    pub device: DeviceSpec,

    /// On a GPU, decode through candle's ops instead of the fused step (one CUDA graph
    /// per token), to compare the two.
    #[arg(long)]
    pub no_fused_decode: bool,

    /// Time the first prefill of the process, without the untimed prefill of the same
    /// prompt that otherwise comes before it (llama-bench's --no-warmup).
    #[arg(long)]
    pub no_warmup: bool,
}

#[derive(Debug, Args)]
pub struct ScalingArgs {
    /// A preset to sweep, with random weights; repeat for more. `NAME@N` sweeps its
    /// prompts up to N tokens instead of --max-len. Without --preset and --config:
    /// mamba-130m, mamba2-130m and transformer-130m.
    #[arg(long = "preset", value_name = "NAME[@N]", value_parser = parse_sweep_target)]
    pub presets: Vec<SweepTarget>,

    /// A config.json to sweep, with random weights (e.g. a small model for the longest
    /// prompts); repeat for more. `FILE@N` sweeps its prompts up to N tokens.
    #[arg(long = "config", value_name = "FILE[@N]", value_parser = parse_sweep_target)]
    pub configs: Vec<SweepTarget>,

    /// Output directory for scaling.csv, scaling.json and the SVG plots.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Shortest prompt of the length sweep; lengths double from it.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_positive)]
    pub min_len: usize,

    /// Longest prompt of the length sweep (a model stops earlier when a point runs over
    /// --point-timeout or --memory-budget).
    #[arg(long, value_name = "N", default_value_t = 1 << 20, value_parser = parse_positive)]
    pub max_len: usize,

    /// Decoding steps timed after each prefill.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = parse_positive)]
    pub gen_len: usize,

    /// Largest batch of the batch sweep; batches double from 1.
    #[arg(long, value_name = "B", default_value_t = 64, value_parser = parse_positive)]
    pub max_batch: usize,

    /// Prompt tokens per sequence in the batch sweep (prefilled once, its state copied to
    /// every sequence).
    #[arg(long, value_name = "N", default_value_t = 2048, value_parser = parse_positive)]
    pub batch_prompt_len: usize,

    /// Most resident memory a point may use, in GiB; a point using more is stopped and
    /// recorded as over budget.
    #[arg(long, value_name = "GIB", default_value_t = 8.0, value_parser = parse_positive_f64)]
    pub memory_budget: f64,

    /// Most seconds one point may take; a point taking longer is stopped, and so is a
    /// model's length sweep once its next point is predicted to take longer.
    #[arg(long, value_name = "S", default_value_t = 600.0, value_parser = parse_positive_f64)]
    pub point_timeout: f64,

    #[command(flatten)]
    pub chunk: ChunkArgs,

    /// Where every point runs: cpu, cuda or cuda:N (CUDA needs a build with `--features
    /// cuda`). On a GPU the device's memory is recorded too (the peak of its pool).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device_spec)]
    pub device: DeviceSpec,
}

/// The architecture of a new model: a preset's dimensions or a config.json.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ArchitectureArgs {
    /// A preset architecture, e.g. mamba-130m, mamba2-130m, hybrid-130m, moe-mamba-130m
    /// or transformer-130m.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// A config.json (Hugging Face or mamba_ssm form, hybrids included, or MoEMambaForCausalLM).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub architecture: ArchitectureArgs,

    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Seed of the initialisation.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
}

/// Where training starts from: a checkpoint, a preset or a config.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct StartArgs {
    /// Fine-tune this checkpoint.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Train a new model with a preset's dimensions.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// Train a new model described by a config.json.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub start: StartArgs,

    /// A text file or a folder of text files.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,

    /// Output directory for checkpoints, the loss curve and the trainer state.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Optimiser steps.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_positive)]
    pub steps: usize,

    /// Sequences per micro-batch.
    #[arg(long, value_name = "B", default_value_t = 8, value_parser = parse_positive)]
    pub batch: usize,

    /// Tokens per sequence.
    #[arg(long, value_name = "L", default_value_t = 256, value_parser = parse_positive)]
    pub seq_len: usize,

    /// Peak learning rate.
    #[arg(long, value_name = "X", default_value_t = 1e-3)]
    pub lr: f64,

    /// Warmup steps (default: 10 % of the steps, at most 200).
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,

    /// Micro-batches per optimiser step.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_positive)]
    pub grad_accum: usize,

    /// Weight decay (not applied to A_log, D, norms and biases).
    #[arg(long, value_name = "X", default_value_t = 0.1)]
    pub weight_decay: f64,

    /// Validate every N steps (default: ten times per run).
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub eval_every: Option<usize>,

    /// Write a checkpoint every N steps (default: ten times per run).
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub save_every: Option<usize>,

    /// Fraction of the data held out for validation.
    #[arg(long, value_name = "F", default_value_t = 0.05)]
    pub val_fraction: f64,

    /// tokenizer.json for the data (default: the checkpoint's, else bytes).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,

    /// Seed of initialisation and data order.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,

    /// Where the model trains: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device_spec)]
    pub device: DeviceSpec,
}

/// An integer of at least 1.
fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected an integer of at least 1, got {s:?}")),
    }
}

/// A model for `mamba scaling` (a preset's name or a config file), with the longest
/// prompt to sweep it to when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepTarget {
    pub model: String,
    pub max_len: Option<usize>,
}

/// `NAME` or `NAME@N`.
fn parse_sweep_target(s: &str) -> Result<SweepTarget, String> {
    match s.rsplit_once('@') {
        Some((model, n)) if !model.is_empty() => Ok(SweepTarget {
            model: model.to_string(),
            max_len: Some(parse_positive(n)?),
        }),
        _ => Ok(SweepTarget {
            model: s.to_string(),
            max_len: None,
        }),
    }
}

/// A finite number above 0.
fn parse_positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("expected a number above 0, got {s:?}")),
    }
}

/// `1,2,3` (spaces around ids allowed) into token ids; empty lists and items are errors.
fn parse_token_ids(s: &str) -> Result<TokenIds, String> {
    if s.trim().is_empty() {
        return Err("no token ids given: expected comma-separated ids such as 1,2,3".into());
    }
    s.split(',')
        .map(|item| {
            let item = item.trim();
            item.parse::<u32>()
                .map_err(|_| format!("{item:?} is not a token id (a non-negative integer)"))
        })
        .collect::<Result<Vec<u32>, String>>()
        .map(TokenIds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_parse_with_spaces() {
        assert_eq!(parse_token_ids("1, 2,3"), Ok(TokenIds(vec![1, 2, 3])));
    }

    #[test]
    fn bad_token_ids_are_errors() {
        for bad in ["", " ", "1,x", "1,,2", "-1", "1,", "4294967296"] {
            assert!(parse_token_ids(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sweep_targets_may_name_their_longest_prompt() {
        let target = |model: &str, max_len| SweepTarget {
            model: model.to_string(),
            max_len,
        };
        assert_eq!(
            parse_sweep_target("mamba-130m"),
            Ok(target("mamba-130m", None))
        );
        assert_eq!(
            parse_sweep_target("a/b.json@4096"),
            Ok(target("a/b.json", Some(4096)))
        );
        assert!(parse_sweep_target("mamba-130m@0").is_err());
        assert!(parse_sweep_target("mamba-130m@many").is_err());
    }

    #[test]
    fn zero_is_not_positive() {
        assert!(parse_positive("0").is_err());
        assert_eq!(parse_positive("3"), Ok(3));
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
