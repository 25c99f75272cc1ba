//! Writing and reading training checkpoints in the Hugging Face layout, each file written
//! to a temporary name and renamed into place so that a crash never leaves a torn file.

use crate::{io_err, Error, Result};
use candle_core::{Device, Tensor};
use mamba_models::config::ModelConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Model weights (`model.safetensors`, loadable by every other command).
pub const WEIGHTS: &str = "model.safetensors";
/// Hugging Face configuration.
pub const CONFIG: &str = "config.json";
/// AdamW moments.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Step, loss history and settings; written last, so its presence marks a whole checkpoint.
pub const TRAINER_STATE: &str = "trainer_state.json";

/// What the loop needs to continue where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: usize,
    pub train_losses: Vec<(usize, f64)>,
    /// `(step, validation loss in nats per token)`.
    pub val_losses: Vec<(usize, f64)>,
    pub tokens_seen: u64,
    /// Seconds spent training so far.
    pub seconds: f64,
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))
}

/// Saves tensors as safetensors at `dir/name`, atomically.
pub fn save_tensors(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)?;
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))
}

/// Reads every tensor of `dir/name`.
pub fn load_tensors(dir: &Path, name: &str) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(Error::Train(format!("{}: missing", path.display())));
    }
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

/// Writes a model folder: `config.json` and `model.safetensors`.
pub fn save_model(
    dir: &Path,
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let json = serde_json::to_string_pretty(&config.to_hf_json()).expect("a JSON value serialises");
    write_atomic(dir, CONFIG, json.as_bytes())?;
    save_tensors(dir, WEIGHTS, weights)
}

pub fn save_trainer_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let json = serde_json::to_string_pretty(state).expect("a JSON value serialises");
    write_atomic(dir, TRAINER_STATE, json.as_bytes())
}

pub fn load_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path: PathBuf = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| Error::Train(format!("{}: {e}", path.display())))
}
