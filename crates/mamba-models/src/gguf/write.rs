//! Writing a Mamba, FalconMamba or Mamba-2 checkpoint as a GGUF file that llama.cpp loads:
//! the metadata, tensor names, shapes and conventions of its `convert_hf_to_gguf.py`.
//!
//! Norms, convolutions, `A`, `D` and biases are always f32 (as llama.cpp keeps them). With
//! a block format, the linear layers' weights (`ssm_in`, `ssm_x`, `ssm_dt`, `ssm_out`,
//! `token_embd`, `output`) whose rows are a whole number of 32-value blocks are stored in
//! it; the others stay f32 (llama.cpp's converter falls back to f16 there, which would lose
//! precision for nothing at these sizes).

use super::vocab::{GgufVocab, SpecialIds};
use super::{arch_key, candle_message, gguf_error, tensor_specs, Hyper, TensorSpec, Values};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mamba_ops::quant::{QuantFormat, QuantMatrix, BLOCK};
use std::borrow::Cow;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// The largest vocabulary written as the 256 bytes (token id = byte value) when the
/// checkpoint has no tokenizer: the bytes plus a few padding or special ids.
pub const BYTE_LEVEL_MAX_VOCAB: usize = 256 + 16;

/// What `ggml`'s `general.file_type` calls an all-f32 file, and the two block formats.
const FILE_TYPE_ALL_F32: u32 = 0;
const FILE_TYPE_MOSTLY_Q4_0: u32 = 2;
const FILE_TYPE_MOSTLY_Q8_0: u32 = 7;
/// `general.quantization_version` as llama.cpp writes it.
const QUANTIZATION_VERSION: u32 = 2;
/// The context length llama.cpp's converter records for Mamba models (they have none).
const CONTEXT_LENGTH: u32 = 1 << 20;

/// How to write the file.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Store the linear layers in this block format (else everything is f32).
    pub quant: Option<QuantFormat>,
    /// `general.name` (default: the checkpoint folder's name).
    pub name: Option<String>,
    /// The vocabulary to write (e.g. another GGUF file's); by default it comes from the
    /// checkpoint's `tokenizer.json`, or is the 256 bytes for byte-level models.
    pub vocab: Option<GgufVocab>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteSummary {
    pub architecture: &'static str,
    pub tensors: usize,
    pub quantized_tensors: usize,
    pub bytes: u64,
    pub vocab_tokens: usize,
}

/// Writes `checkpoint` as the GGUF file `out` (through a temporary file next to it, so a
/// failure leaves no partial file).
pub fn write_checkpoint(
    checkpoint: &Checkpoint,
    out: &Path,
    options: &WriteOptions,
) -> Result<WriteSummary> {
    let config = &checkpoint.config;
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu)?;
    let hyper = hyper_of(config)?;
    let tied = config.tie_word_embeddings() || !vb.contains_tensor("lm_head.weight");
    let vocab = vocab_for(checkpoint, hyper.vocab, options.vocab.clone())?;
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| folder_name(&checkpoint.dir));
    let metadata = metadata(&hyper, &name, options.quant, &vocab);
    let mut tensors = Vec::new();
    let mut quantized_tensors = 0;
    for spec in tensor_specs(&hyper, tied) {
        let (tensor, quantized) = file_tensor(&vb, &spec, options.quant)?;
        quantized_tensors += usize::from(quantized);
        tensors.push((spec.gguf, tensor));
    }
    let bytes = write_file(out, &metadata, &tensors)?;
    Ok(WriteSummary {
        architecture: hyper.arch(),
        tensors: tensors.len(),
        quantized_tensors,
        bytes,
        vocab_tokens: vocab.tokens.len(),
    })
}

/// The GGUF hyper-parameters of a config, or why llama.cpp has no way to run it.
fn hyper_of(config: &ModelConfig) -> Result<Hyper> {
    let unsupported = |why: &str| Error::Input(format!("cannot write this model as GGUF: {why}"));
    match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
            if c.use_bias {
                return Err(unsupported(
                    "it has in_proj/out_proj biases (use_bias), which llama.cpp's mamba does not have",
                ));
            }
            if c.intermediate_size != 2 * c.hidden_size {
                return Err(unsupported(
                    "llama.cpp's mamba supports an expansion factor of 2 only (intermediate_size = 2 * hidden_size)",
                ));
            }
            Ok(Hyper {
                mamba2: false,
                vocab: c.vocab_size,
                hidden: c.hidden_size,
                layers: c.num_hidden_layers,
                conv_kernel: c.conv_kernel,
                d_inner: c.intermediate_size,
                state: c.state_size,
                time_step_rank: c.time_step_rank,
                groups: 1,
                eps: c.layer_norm_epsilon,
                dt_b_c_rms: matches!(config, ModelConfig::FalconMamba(_)),
            })
        }
        ModelConfig::Mamba2(c) => {
            if c.use_bias {
                return Err(unsupported(
                    "it has in_proj/out_proj biases (use_bias), which llama.cpp's mamba2 does not have",
                ));
            }
            if c.norm_before_gate {
                return Err(unsupported(
                    "llama.cpp's mamba2 gates before its norm (norm_before_gate = false) only",
                ));
            }
            Ok(Hyper {
                mamba2: true,
                vocab: c.vocab_size,
                hidden: c.hidden_size,
                layers: c.num_hidden_layers,
                conv_kernel: c.conv_kernel,
                d_inner: c.d_inner(),
                state: c.state_size,
                time_step_rank: c.num_heads,
                groups: c.n_groups,
                eps: c.layer_norm_epsilon,
                dt_b_c_rms: false,
            })
        }
        other => Err(unsupported(&format!(
            "only Mamba, FalconMamba and Mamba-2 models have a llama.cpp architecture, not {}",
            other.family()
        ))),
    }
}

/// The vocabulary to write: the one given, else the checkpoint's `tokenizer.json`, else
/// the bytes for a byte-sized vocabulary. Its length becomes the embedding's row count.
fn vocab_for(checkpoint: &Checkpoint, rows: usize, given: Option<GgufVocab>) -> Result<GgufVocab> {
    let special = special_ids(&checkpoint.config);
    let mut vocab = match (given, &checkpoint.tokenizer_file) {
        (Some(vocab), _) => vocab,
        (None, Some(path)) => GgufVocab::from_tokenizer_json(path, rows, special)?,
        (None, None) if rows <= BYTE_LEVEL_MAX_VOCAB => GgufVocab::bytes(rows, special)?,
        (None, None) => {
            return Err(Error::Tokenizer(format!(
                "{}: no tokenizer.json, and a vocabulary of {rows} is not byte-level: give the vocabulary with --vocab-from FILE.gguf (e.g. a GGUF that llama.cpp's converter wrote for the same tokenizer)",
                checkpoint.dir.display()
            )))
        }
    };
    vocab.fit_to(rows)?;
    Ok(vocab)
}

/// The config's special tokens.
fn special_ids(config: &ModelConfig) -> SpecialIds {
    match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => SpecialIds {
            bos: c.bos_token_id,
            eos: c.eos_token_id,
            pad: c.pad_token_id,
        },
        ModelConfig::Mamba2(c) => SpecialIds {
            bos: c.bos_token_id,
            eos: c.eos_token_id,
            pad: c.pad_token_id,
        },
        other => SpecialIds {
            eos: other.eos_token_id(),
            ..SpecialIds::default()
        },
    }
}

/// Every metadata entry, in the order llama.cpp's converter writes them.
fn metadata(
    p: &Hyper,
    name: &str,
    quant: Option<QuantFormat>,
    vocab: &GgufVocab,
) -> Vec<(String, Value)> {
    let arch = p.arch();
    let size = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let mut entries = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(name.into())),
        (arch_key(arch, "context_length"), Value::U32(CONTEXT_LENGTH)),
        (arch_key(arch, "embedding_length"), size(p.hidden)),
        (arch_key(arch, "feed_forward_length"), Value::U32(0)),
        (arch_key(arch, "attention.head_count"), Value::U32(0)),
        (arch_key(arch, "block_count"), size(p.layers)),
        (arch_key(arch, "ssm.conv_kernel"), size(p.conv_kernel)),
        (arch_key(arch, "ssm.inner_size"), size(p.d_inner)),
        (arch_key(arch, "ssm.state_size"), size(p.state)),
        (arch_key(arch, "ssm.time_step_rank"), size(p.time_step_rank)),
    ];
    if p.mamba2 {
        entries.push((arch_key(arch, "ssm.group_count"), size(p.groups)));
    }
    entries.push((
        arch_key(arch, "attention.layer_norm_rms_epsilon"),
        Value::F32(p.eps as f32),
    ));
    if !p.mamba2 {
        entries.push((arch_key(arch, "ssm.dt_b_c_rms"), Value::Bool(p.dt_b_c_rms)));
    }
    let file_type = match quant {
        None => FILE_TYPE_ALL_F32,
        Some(QuantFormat::Q8_0) => FILE_TYPE_MOSTLY_Q8_0,
        Some(QuantFormat::Q4_0) => FILE_TYPE_MOSTLY_Q4_0,
    };
    entries.push(("general.file_type".to_string(), Value::U32(file_type)));
    entries.push((
        "general.quantization_version".to_string(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    entries.extend(vocab.metadata());
    entries
}

/// The file's tensor for `spec`, and whether it is block-quantised.
fn file_tensor(
    vb: &VarBuilder,
    spec: &TensorSpec,
    quant: Option<QuantFormat>,
) -> Result<(QTensor, bool)> {
    let values = checkpoint_values(vb, spec)?;
    let values = match spec.values {
        Values::Same => values,
        Values::NegExpOfLog => values.exp()?.neg()?,
    };
    let flat = values.flatten_all()?.to_vec1::<f32>()?;
    let shape = spec.gguf_shape.as_slice();
    let width = shape.last().copied().unwrap_or(0);
    match quant {
        Some(format) if spec.linear && shape.len() == 2 && width.is_multiple_of(BLOCK) => {
            let matrix = QuantMatrix::quantize(&flat, shape[0], width, format)?;
            let dtype = match format {
                QuantFormat::Q8_0 => GgmlDType::Q8_0,
                QuantFormat::Q4_0 => GgmlDType::Q4_0,
            };
            Ok((qtensor(matrix.to_ggml_bytes(), dtype, shape)?, true))
        }
        _ => {
            let bytes = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((qtensor(bytes, GgmlDType::F32, shape)?, false))
        }
    }
}

/// The checkpoint's tensor for `spec` in f32; a convolution bias the checkpoint does not
/// have (`use_conv_bias = false`) is zeros, which llama.cpp's required bias then adds.
fn checkpoint_values(vb: &VarBuilder, spec: &TensorSpec) -> Result<Tensor> {
    if spec.hf.ends_with("conv1d.bias") && !vb.contains_tensor(&spec.hf) {
        return Ok(Tensor::zeros(
            spec.hf_shape.as_slice(),
            DType::F32,
            &Device::Cpu,
        )?);
    }
    let tensor = vb
        .get(spec.hf_shape.as_slice(), &spec.hf)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", spec.hf)))?;
    Ok(tensor.reshape(spec.gguf_shape.as_slice())?)
}

/// A tensor of `shape` (row-major) from ggml's bytes for it.
fn qtensor(bytes: Vec<u8>, dtype: GgmlDType, shape: &[usize]) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, shape)?)
}

/// Writes the file through a temporary one renamed into place; returns its size.
fn write_file(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<u64> {
    let partial = partial_path(out);
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| Error::Io { path, cause }
    };
    let result = (|| {
        let file = std::fs::File::create(&partial).map_err(io_error(&partial))?;
        let mut writer = BufWriter::new(file);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut writer, &metadata, &tensors)
            .map_err(|e| gguf_error(&partial, format!("cannot write: {}", candle_message(e))))?;
        if let Some(offset) = empty_array_type_offset(&metadata, EMPTY_STRING_ARRAYS)? {
            retype_as_strings(&mut writer, offset)
                .map_err(|e| gguf_error(&partial, format!("cannot write: {e}")))?;
        }
        let file = writer
            .into_inner()
            .map_err(|e| gguf_error(&partial, format!("cannot write: {e}")))?;
        file.sync_all().map_err(io_error(&partial))?;
        std::fs::rename(&partial, out).map_err(io_error(out))?;
        let size = std::fs::metadata(out).map_err(io_error(out))?.len();
        Ok(size)
    })();
    if result.is_err() {
        // Best effort: the partial file may not exist.
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Metadata keys whose value is a list of strings even when empty (llama.cpp refuses
/// `tokenizer.ggml.merges` of another element type, e.g. for a byte vocabulary).
const EMPTY_STRING_ARRAYS: &[&str] = &["tokenizer.ggml.merges"];

/// candle writes an empty array with the element type u32; this finds, in the header that
/// `metadata` makes, the offset of that element type for the first empty array under one
/// of `keys`. The header's layout does not depend on the tensors that follow, only their
/// count, whose width is fixed.
fn empty_array_type_offset(metadata: &[(&str, &Value)], keys: &[&str]) -> Result<Option<u64>> {
    let mut header = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut header, metadata, &[])?;
    let header = header.into_inner();
    for key in keys {
        let is_empty_array = metadata
            .iter()
            .any(|(k, v)| k == key && matches!(v, Value::Array(items) if items.is_empty()));
        if !is_empty_array {
            continue;
        }
        // u64 key length, key, u32 value type (array = 9), u32 element type, u64 length 0.
        let mut pattern = (key.len() as u64).to_le_bytes().to_vec();
        pattern.extend_from_slice(key.as_bytes());
        pattern.extend_from_slice(&9u32.to_le_bytes());
        let start = header
            .windows(pattern.len())
            .position(|w| w == pattern.as_slice());
        if let Some(start) = start {
            return Ok(Some((start + pattern.len()) as u64));
        }
    }
    Ok(None)
}

/// Sets the element type at `offset` to string (8), then returns to the end.
fn retype_as_strings<W: std::io::Write + std::io::Seek>(
    w: &mut W,
    offset: u64,
) -> std::io::Result<()> {
    use std::io::SeekFrom;
    let end = w.stream_position()?;
    w.seek(SeekFrom::Start(offset))?;
    w.write_all(&8u32.to_le_bytes())?;
    w.seek(SeekFrom::Start(end))?;
    Ok(())
}

/// `out` with `.partial` appended to its name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// The name of a checkpoint folder (`general.name`'s default).
fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(|| "mamba".to_string(), |n| n.to_string_lossy().into_owned())
}
