//! Loading a llama.cpp `mamba` / `mamba2` GGUF file into a [`Model`].
//!
//! The tensors are read (dequantised to f32 when quantised), renamed and reshaped to the
//! Hugging Face layout, and the model is built from them as from a checkpoint; a file whose
//! `ssm_in` weights are q8_0 or q4_0 then has its linear layers quantised again in that
//! format, which gives back exactly the file's blocks (ggml's rounding is reproduced).
//! Files of llama.cpp's other block formats (`llama-quantize` also stores the embedding of a
//! q4_0 model in Q6_K, and writes the k-quants of `Q4_K_M` and the like) load too: their
//! linear layers, and the output head on its own, go to the in-memory format nearest above
//! in bits ([`format_of`]).

use super::vocab::{int_value, GgufVocab};
use super::{
    arch_key, candle_message, gguf_error, tensor_specs, Hyper, TensorSpec, Values, ARCH_MAMBA,
    ARCH_MAMBA2,
};
use crate::error::{Error, Result};
use crate::layers::WeightFormat;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// The tensor types this reader takes: the ones llama.cpp stores whole models in that candle
/// dequantises.
const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// [`SUPPORTED_TYPES`] as error messages list them.
const SUPPORTED_NAMES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K";

/// A model loaded from a GGUF file, with what else the file says.
#[derive(Debug)]
pub struct GgufModel {
    pub model: Model,
    /// The tokenizer of a `gpt2` (byte-level BPE) vocabulary, `None` for other vocabularies.
    pub tokenizer: Option<Tokenizer>,
    pub vocab: Option<GgufVocab>,
    /// `general.name`.
    pub name: Option<String>,
    /// How the file stores the linear layers (and so how the model holds them):
    /// q8_0 or q4_0 for such files, bf16 for bf16 files, f32 for f32 and f16 files.
    pub weight_format: WeightFormat,
}

/// An open GGUF file: its header and a reader for the tensor data.
struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| header_error(path, e))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    fn error(&self, message: impl std::fmt::Display) -> Error {
        gguf_error(&self.path, message)
    }

    fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.metadata(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.error(format!("metadata {key} is not a string"))),
            None => Err(self.error(format!("metadata {key} is missing"))),
        }
    }

    /// A size: a positive integer of any width.
    fn size(&self, key: &str) -> Result<usize> {
        let value = self
            .metadata(key)
            .ok_or_else(|| self.error(format!("metadata {key} is missing")))?;
        int_value(value)
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.error(format!("metadata {key} must be a positive integer")))
    }

    /// A float, given with the decimal digits that name it (so that `1e-5` stored as f32
    /// reads back as the f64 `1e-5`).
    fn float(&self, key: &str) -> Result<f64> {
        let value = match self.metadata(key) {
            Some(Value::F32(x)) => format!("{x}").parse().unwrap_or(f64::from(*x)),
            Some(Value::F64(x)) => *x,
            Some(_) => return Err(self.error(format!("metadata {key} is not a float"))),
            None => return Err(self.error(format!("metadata {key} is missing"))),
        };
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.error(format!("metadata {key} must be a positive number")))
        }
    }

    fn bool_or_false(&self, key: &str) -> Result<bool> {
        match self.metadata(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.error(format!("metadata {key} is not a boolean"))),
        }
    }

    /// The dimensions of tensor `name` in row-major order, if the file has it.
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims())
    }

    fn ggml_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// Every tensor's type must be one this reader takes.
    fn check_types(&self) -> Result<()> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let ty = self.content.tensor_infos[name].ggml_dtype;
            if !SUPPORTED_TYPES.contains(&ty) {
                return Err(self.error(format!(
                    "tensor {name} has ggml type {}, which is not supported (supported: {SUPPORTED_NAMES}); re-quantise the model to one of these",
                    type_name(ty)
                )));
            }
        }
        Ok(())
    }

    /// Tensor `spec.gguf` as f32 in the checkpoint's layout (`spec.hf_shape`).
    fn checkpoint_tensor(&mut self, spec: &TensorSpec) -> Result<Tensor> {
        let found = self
            .shape(&spec.gguf)
            .ok_or_else(|| self.error(format!("tensor {} is missing", spec.gguf)))?;
        if without_leading_ones(found) != without_leading_ones(&spec.gguf_shape) {
            return Err(self.error(format!(
                "tensor {} has shape {found:?} (row-major), expected {:?} from the metadata",
                spec.gguf, spec.gguf_shape
            )));
        }
        let qtensor = self
            .content
            .tensor(&mut self.reader, &spec.gguf, &Device::Cpu)
            .map_err(|e| {
                gguf_error(&self.path, format!("cannot read tensor {}: {e}", spec.gguf))
            })?;
        let values = qtensor
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape(spec.hf_shape.as_slice())?;
        match spec.values {
            Values::Same => Ok(values),
            Values::NegExpOfLog => {
                a_log_of(&values).map_err(|e| self.error(format!("{}: {e}", spec.gguf)))
            }
        }
    }

    /// The model's hyper-parameters from the metadata and the embedding's shape.
    fn hyper(&self) -> Result<Hyper> {
        let arch = self.string("general.architecture")?;
        let mamba2 = match arch.as_str() {
            ARCH_MAMBA => false,
            ARCH_MAMBA2 => true,
            other => {
                return Err(self.error(format!(
                    "architecture {other:?} is not supported: only llama.cpp's \"mamba\" (Mamba-1, FalconMamba) and \"mamba2\" GGUF files load"
                )))
            }
        };
        let key = |k: &str| arch_key(&arch, k);
        let hidden = self.size(&key("embedding_length"))?;
        let vocab = match self.shape("token_embd.weight") {
            Some(&[rows, width]) if width == hidden => rows,
            Some(shape) => {
                return Err(self.error(format!(
                    "token_embd.weight has shape {shape:?}, expected (vocab, {hidden})"
                )))
            }
            None => return Err(self.error("tensor token_embd.weight is missing")),
        };
        let groups = if mamba2 {
            self.size(&key("ssm.group_count"))?
        } else {
            1
        };
        let hyper = Hyper {
            mamba2,
            vocab,
            hidden,
            layers: self.size(&key("block_count"))?,
            conv_kernel: self.size(&key("ssm.conv_kernel"))?,
            d_inner: self.size(&key("ssm.inner_size"))?,
            state: self.size(&key("ssm.state_size"))?,
            time_step_rank: self.size(&key("ssm.time_step_rank"))?,
            groups,
            eps: self.float(&key("attention.layer_norm_rms_epsilon"))?,
            dt_b_c_rms: !mamba2 && self.bool_or_false(&key("ssm.dt_b_c_rms"))?,
        };
        if mamba2
            && (!hyper.d_inner.is_multiple_of(hyper.time_step_rank)
                || !hyper.d_inner.is_multiple_of(groups)
                || !hyper.time_step_rank.is_multiple_of(groups))
        {
            return Err(self.error(format!(
                "{} heads and {groups} groups do not divide an inner size of {}",
                hyper.time_step_rank, hyper.d_inner
            )));
        }
        Ok(hyper)
    }
}

/// Loads a llama.cpp GGUF file of architecture `mamba` or `mamba2` with its weights on
/// `device` (quantised weights need the CPU).
pub fn load(path: &Path, device: &Device) -> Result<GgufModel> {
    let mut file = GgufFile::open(path)?;
    let hyper = file.hyper()?;
    file.check_types()?;
    let vocab = GgufVocab::from_metadata(&file.content.metadata, path)?;
    let tied = file.shape("output.weight").is_none();
    let (bos, eos) = vocab
        .as_ref()
        .map_or((None, None), |v| (v.bos_token_id(), v.eos_token_id()));
    let config = hyper
        .to_config(tied, bos, eos)
        .map_err(|e| file.error(format!("inconsistent hyper-parameters: {e}")))?;
    let weight_format = file_weight_format(&file)?;
    let mut tensors = HashMap::new();
    for spec in tensor_specs(&hyper, tied) {
        let tensor = file.checkpoint_tensor(&spec)?;
        tensors.insert(spec.hf, tensor);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let mut model = Model::from_var_builder(&vb, &config)?;
    if weight_format != WeightFormat::F32 {
        model.convert_weights(weight_format)?;
    }
    let head_format = file_head_format(&file)?;
    if head_format != weight_format {
        model.convert_head(head_format)?;
    }
    let tokenizer = vocab
        .as_ref()
        .map(GgufVocab::tokenizer)
        .transpose()?
        .flatten();
    let name = match file.metadata("general.name") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(GgufModel {
        model,
        tokenizer,
        vocab,
        name,
        weight_format,
    })
}

/// The in-memory format of the linear layers, from the type of the first `ssm_in` weights.
fn file_weight_format(file: &GgufFile) -> Result<WeightFormat> {
    let ty = file
        .ggml_type("blk.0.ssm_in.weight")
        .ok_or_else(|| file.error("tensor blk.0.ssm_in.weight is missing"))?;
    Ok(format_of(ty))
}

/// The in-memory format of the output head: `output.weight`'s type, or the embedding's
/// when the head is tied to it.
fn file_head_format(file: &GgufFile) -> Result<WeightFormat> {
    let ty = file
        .ggml_type("output.weight")
        .or_else(|| file.ggml_type("token_embd.weight"))
        .ok_or_else(|| file.error("tensor token_embd.weight is missing"))?;
    Ok(format_of(ty))
}

/// The in-memory format for a matrix of ggml type `ty`: its own where it is one of ours; for
/// llama.cpp's other blocks the nearest at or above their bits per weight (Q2_K-Q4_K and
/// Q4_1 as q4_0; Q5_0, Q5_1, Q5_K, Q6_K as q8_0), quantised from the file's values.
fn format_of(ty: GgmlDType) -> WeightFormat {
    match ty {
        GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K | GgmlDType::Q6K => {
            WeightFormat::Q8_0
        }
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => {
            WeightFormat::Q4_0
        }
        GgmlDType::BF16 => WeightFormat::Bf16,
        _ => WeightFormat::F32,
    }
}

/// `shape` without its leading ones: ggml drops a tensor's trailing unit dimensions (its
/// leading ones in row-major order) when `llama-quantize` writes it again, so a one-group
/// Mamba-2's `ssm_norm` of `[1, d_inner]` may come as `[d_inner]`.
fn without_leading_ones(shape: &[usize]) -> &[usize] {
    let ones = shape.iter().take_while(|d| **d == 1).count();
    &shape[ones..]
}

/// `A_log = ln(-A)` of the file's `A`, which must be negative throughout.
fn a_log_of(a: &Tensor) -> Result<Tensor> {
    let max = a.max_all()?.to_scalar::<f32>()?;
    if max.is_nan() || max >= 0.0 {
        return Err(Error::Checkpoint(format!(
            "A must be negative (it is -exp(A_log)); found {max}"
        )));
    }
    Ok(a.neg()?.log()?)
}

/// ggml's name of a tensor type, as llama.cpp prints it.
fn type_name(ty: GgmlDType) -> &'static str {
    match ty {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The error for a header that does not parse: an unknown tensor type is named as such.
fn header_error(path: &Path, err: candle_core::Error) -> Error {
    let text = candle_message(err);
    let unknown_type = text
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|id| id.trim().parse::<u32>().ok());
    match unknown_type {
        Some(id) => gguf_error(
            path,
            format!(
                "a tensor has ggml type {} (id {id}), which is not supported (supported: {SUPPORTED_NAMES}); re-quantise the model to one of these",
                ggml_type_id_name(id)
            ),
        ),
        None => gguf_error(
            path,
            format!("not a GGUF file, or a damaged or truncated one: {text}"),
        ),
    }
}

/// ggml's names of the tensor types candle does not know.
fn ggml_type_id_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}
