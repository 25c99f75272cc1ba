//! Locating the files of a checkpoint directory and memory-mapping its weights.
//!
//! A directory holds `config.json`, the weights as `model.safetensors`, as shards listed
//! in `model.safetensors.index.json`, or (as `mamba_ssm` native checkpoints converted to
//! safetensors) a single `*.safetensors` file of any name, and optionally `tokenizer.json`.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The embedding matrix as transformers names it (the name the models ask for).
const HF_EMBEDDING: &str = "backbone.embeddings.weight";
/// The same tensor as `mamba_ssm` names it.
const NATIVE_EMBEDDING: &str = "backbone.embedding.weight";

/// The files of one checkpoint directory, with its parsed config.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// Safetensors files holding the weights, sorted by name.
    pub weight_files: Vec<PathBuf>,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer_file: Option<PathBuf>,
}

impl Checkpoint {
    /// Reads `dir/config.json` and finds the weight and tokenizer files.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Checkpoint(format!(
                "{}: no config.json",
                dir.display()
            )));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let weight_files = find_weight_files(dir)?;
        let tokenizer_file = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weight_files,
            tokenizer_file,
        })
    }

    /// A `VarBuilder` over the memory-mapped weight files, converting tensors to `dtype`
    /// on `device` as they are read. Checkpoints that use `mamba_ssm`'s name for the
    /// embedding (`backbone.embedding.weight`) are served under transformers' name
    /// (`backbone.embeddings.weight`), so models can ask for one naming only.
    ///
    /// The files are memory-mapped (`unsafe` in candle): the mapping assumes that they are
    /// not modified or truncated while the returned builder or tensors borrowed from it are
    /// in use. Tensors copied to a device or converted to another dtype do not keep the map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: see the doc comment: the checkpoint files must stay unchanged while mapped.
        let tensors = unsafe { MmapedSafetensors::multi(&self.weight_files) }
            .map_err(|e| self.load_error(e))?;
        let native_names =
            tensors.get(HF_EMBEDDING).is_err() && tensors.get(NATIVE_EMBEDDING).is_ok();
        let vb = VarBuilder::from_backend(Box::new(tensors), dtype, device.clone());
        Ok(if native_names {
            vb.rename_f(native_tensor_name)
        } else {
            vb
        })
    }

    /// Turns a failure to map the weights into an error naming the file at fault.
    fn load_error(&self, err: candle_core::Error) -> Error {
        for file in &self.weight_files {
            // SAFETY: mapped only to read its header and dropped at once.
            if let Err(e) = unsafe { MmapedSafetensors::new(file) } {
                return Error::Checkpoint(format!(
                    "{}: invalid safetensors file: {e}",
                    file.display()
                ));
            }
        }
        Error::Checkpoint(format!(
            "{}: cannot load the weights: {err}",
            self.dir.display()
        ))
    }
}

/// Maps transformers' tensor names onto `mamba_ssm`'s.
fn native_tensor_name(name: &str) -> String {
    if name == HF_EMBEDDING {
        NATIVE_EMBEDDING.to_string()
    } else {
        name.to_string()
    }
}

/// `model.safetensors`, else the shards of `model.safetensors.index.json`, else the one
/// `*.safetensors` file in `dir`.
fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_files(dir, &index);
    }
    let mut found = safetensors_in(dir)?;
    match found.len() {
        1 => Ok(found),
        0 => Err(no_weights_error(dir)),
        _ => {
            found.sort();
            let names: Vec<String> = found.iter().map(|p| file_name(p)).collect();
            Err(Error::Checkpoint(format!(
                "{}: several safetensors files ({}) but no model.safetensors.index.json",
                dir.display(),
                names.join(", ")
            )))
        }
    }
}

/// The distinct shard files named by an index's `weight_map`, sorted, each checked to exist.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|cause| Error::Io {
        path: index.to_path_buf(),
        cause,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|cause| Error::Json {
        path: index.to_path_buf(),
        cause,
    })?;
    let bad_index = || {
        Error::Checkpoint(format!(
            "{}: weight_map must be an object of tensor name -> shard file",
            index.display()
        ))
    };
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(bad_index)?;
    let names: BTreeSet<&str> = map
        .values()
        .map(|v| v.as_str().ok_or_else(bad_index))
        .collect::<Result<_>>()?;
    if names.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: weight_map lists no shards",
            index.display()
        )));
    }
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::Checkpoint(format!(
                    "{}: shard {name} listed in {} is missing",
                    dir.display(),
                    file_name(index)
                )))
            }
        })
        .collect()
}

/// Every `*.safetensors` file directly in `dir`.
fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let io_error = |cause| Error::Io {
        path: dir.to_path_buf(),
        cause,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
            found.push(path);
        }
    }
    Ok(found)
}

/// The error for a directory without safetensors weights, pointing at PyTorch files if any.
fn no_weights_error(dir: &Path) -> Error {
    let has_pytorch = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
        .iter()
        .any(|name| dir.join(name).is_file());
    let hint = if has_pytorch {
        "; PyTorch .bin weights are not supported, convert them to safetensors"
    } else {
        ""
    };
    Error::Checkpoint(format!(
        "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, *.safetensors){hint}",
        dir.display()
    ))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
