//! Opening a checkpoint for inference: the model, its tokenizer and its stop tokens.

use crate::args::{ModelArgs, WeightDtype};
use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::ModelConfig;
use mamba_models::gguf::{self, GgufModel};
use mamba_models::tokenizer::Tokenizer;
use mamba_models::Model;
use std::path::Path;

/// The largest vocabulary read as byte-level (token id = byte value) when the checkpoint
/// ships no tokenizer: the 256 byte values plus a few padding or special ids.
const BYTE_LEVEL_MAX_VOCAB: usize = 256 + 16;

/// A model ready to run, with the tokenizer its checkpoint implies (if any).
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let device = args.device.open()?;
    if gguf::is_gguf_path(&args.dir()) {
        return load_gguf(args, &device);
    }
    let checkpoint = Checkpoint::open(&args.dir())?;
    let tokenizer = tokenizer_for(&checkpoint)?;
    let mut model = Model::load_on(&checkpoint, args.dtype.dtype(), &device)?;
    model.convert_weights(args.dtype.format())?;
    Ok(Loaded { model, tokenizer })
}

/// A llama.cpp GGUF file: the linear layers stay in the file's format (q8_0, q4_0, bf16 or
/// f32) unless `--dtype` asks for another than f32.
fn load_gguf(args: &ModelArgs, device: &Device) -> Result<Loaded> {
    let GgufModel {
        mut model,
        tokenizer,
        ..
    } = gguf::load(&args.dir(), device)?;
    if args.dtype != WeightDtype::F32 {
        model.convert_weights(args.dtype.format())?;
    }
    Ok(Loaded { model, tokenizer })
}

/// `tokenizer.json` when the checkpoint has one, else bytes for a byte-sized vocabulary.
pub fn tokenizer_for(checkpoint: &Checkpoint) -> Result<Option<Tokenizer>> {
    if let Some(path) = &checkpoint.tokenizer_file {
        return Ok(Some(Tokenizer::from_file(path)?));
    }
    Ok((checkpoint.config.vocab_size() <= BYTE_LEVEL_MAX_VOCAB).then(Tokenizer::bytes))
}

/// The tokenizer, or an error pointing at `ids_flag` to give token ids directly.
pub fn require_tokenizer<'a>(
    tokenizer: Option<&'a Tokenizer>,
    ids_flag: &str,
) -> Result<&'a Tokenizer> {
    tokenizer.ok_or_else(|| {
        anyhow!(
            "the model has no tokenizer to encode text (no tokenizer.json, or a GGUF vocabulary that is not gpt2 BPE): pass token ids with {ids_flag}"
        )
    })
}

/// The config's end-of-sequence token, else the tokenizer's `<|endoftext|>`.
pub fn stop_tokens(config: &ModelConfig, tokenizer: Option<&Tokenizer>) -> Vec<u32> {
    config
        .eos_token_id()
        .or_else(|| tokenizer.and_then(|t| t.token_id("<|endoftext|>")))
        .into_iter()
        .collect()
}

/// Whether `tokenizer` can decode `id`: a model's vocabulary may be padded beyond it.
pub fn is_decodable(tokenizer: &Tokenizer, id: u32) -> bool {
    (id as usize) < tokenizer.vocab_size()
}

/// The token ids of the text in the file at `path`. The file is read and tokenized whole
/// (a few bytes per token); the model then runs over the ids in chunks.
pub fn file_token_ids(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(tokenizer.encode(&text)?)
}
