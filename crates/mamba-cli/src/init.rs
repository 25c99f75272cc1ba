//! `mamba init`: a freshly initialised checkpoint that every other command loads.

use crate::args::{ArchitectureArgs, InitArgs};
use anyhow::Result;
use candle_core::DType;
use mamba_models::config::{preset, ModelConfig};
use mamba_models::init::init_tensors;
use mamba_train::checkpoint::save_model;
use serde_json::json;

/// The configuration a preset or a config file describes.
pub fn architecture(args: &ArchitectureArgs) -> Result<ModelConfig> {
    Ok(match (&args.preset, &args.config) {
        (Some(name), _) => preset(name)?,
        (None, Some(path)) => ModelConfig::from_file(path)?,
        (None, None) => unreachable!("clap requires one of --preset and --config"),
    })
}

pub fn run(args: &InitArgs, json: bool) -> Result<()> {
    let config = architecture(&args.architecture)?;
    let weights = init_tensors(&config, DType::F32, args.seed)?;
    let parameters: usize = weights.values().map(|t| t.elem_count()).sum();
    save_model(&args.out, &config, &weights)?;
    if json {
        println!(
            "{}",
            json!({ "out": args.out, "family": config.family().to_string(), "parameters": parameters })
        );
    } else {
        println!(
            "wrote a {} model with {parameters} parameters to {}",
            config.family(),
            args.out.display()
        );
    }
    Ok(())
}
