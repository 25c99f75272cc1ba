//! `mamba train`: trains from scratch or fine-tunes, with a progress bar, validation,
//! resumable checkpoints and a loss curve in the output folder.

use crate::args::{ArchitectureArgs, StartArgs, TrainArgs};
use crate::init::architecture;
use crate::loading::tokenizer_for;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::ModelConfig;
use mamba_models::init::init_tensors;
use mamba_models::tokenizer::Tokenizer;
use mamba_train::data::{Batches, Corpus, Encoding};
use mamba_train::train::{train, TrainConfig, Trainable};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The starting weights, their configuration and the tokenizer that comes with them.
fn starting_point(
    start: &StartArgs,
    seed: u64,
) -> Result<(ModelConfig, HashMap<String, Tensor>, Option<Tokenizer>)> {
    if let Some(dir) = &start.model {
        let checkpoint = Checkpoint::open(dir)?;
        let mut weights = HashMap::new();
        for file in &checkpoint.weight_files {
            let tensors = candle_core::safetensors::load(file, &Device::Cpu)
                .with_context(|| format!("{}: cannot read weights", file.display()))?;
            weights.extend(tensors);
        }
        return Ok((
            checkpoint.config.clone(),
            weights,
            tokenizer_for(&checkpoint)?,
        ));
    }
    let arch = ArchitectureArgs {
        preset: start.preset.clone(),
        config: start.config.clone(),
    };
    let config = architecture(&arch)?;
    let weights = init_tensors(&config, DType::F32, seed)?;
    Ok((config, weights, None))
}

fn train_config(args: &TrainArgs) -> TrainConfig {
    let mut cfg = TrainConfig::for_steps(args.steps);
    cfg.batch = args.batch;
    cfg.seq_len = args.seq_len;
    cfg.lr = args.lr;
    cfg.grad_accum = args.grad_accum;
    cfg.adamw.weight_decay = args.weight_decay;
    cfg.seed = args.seed;
    if let Some(w) = args.warmup {
        cfg.warmup = w;
    }
    if let Some(e) = args.eval_every {
        cfg.eval_every = e;
    }
    if let Some(s) = args.save_every {
        cfg.save_every = s;
    }
    cfg
}

fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]")
            .expect("a valid template"),
    );
    bar
}

pub fn run(args: &TrainArgs, json: bool) -> Result<()> {
    let device = args.device.open()?;
    let (config, weights, checkpoint_tokenizer) = starting_point(&args.start, args.seed)?;
    let tokenizer = match &args.tokenizer {
        Some(path) => Some(Tokenizer::from_file(path)?),
        None => checkpoint_tokenizer,
    };
    let byte_level =
        tokenizer.is_none() || tokenizer.as_ref().is_some_and(|t| t.vocab_size() == 256);
    if tokenizer.is_none() && config.vocab_size() < 256 {
        bail!(
            "byte-level data needs a vocabulary of at least 256, the model has {}",
            config.vocab_size()
        );
    }
    let encoding = match &tokenizer {
        Some(t) => Encoding::Tokenizer(t),
        None => Encoding::Bytes,
    };
    let corpus = Corpus::load(&args.data, &encoding, args.val_fraction)?;
    let cfg = train_config(args);
    let train_batches =
        Batches::new(corpus.train, cfg.seq_len, cfg.batch, cfg.seed).context("training split")?;
    let val_batches = Batches::new(corpus.val, cfg.seq_len, cfg.batch, cfg.seed)
        .context("validation split: give more data or a larger --val-fraction")?;
    let model = Trainable::new_on(&config, weights, &device)?;
    copy_tokenizer(args, &args.out)?;
    if !json {
        eprintln!(
            "training a {} model of {} parameters on {} tokens ({} validation)",
            config.family(),
            model.parameter_count(),
            train_batches.windows() * cfg.seq_len,
            val_batches.windows() * cfg.seq_len
        );
    }
    let bar = progress_bar(cfg.steps);
    let summary = train(
        model,
        &train_batches,
        &val_batches,
        &cfg,
        &args.out,
        args.resume,
        |p| {
            bar.set_position(p.step as u64);
            let val = p
                .val_loss
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.4}{val} lr {:.2e} {:.0} tok/s",
                p.loss, p.lr, p.tokens_per_s
            ));
            if let Some(v) = p.val_loss {
                let bpb = if byte_level {
                    format!(" ({:.3} bits per byte)", v / std::f64::consts::LN_2)
                } else {
                    String::new()
                };
                let line = format!(
                    "step {}: train loss {:.4}, validation loss {v:.4}{bpb}, {:.0} tokens/s",
                    p.step, p.loss, p.tokens_per_s
                );
                // Without a terminal the bar is hidden: log the line instead.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
            true
        },
    )?;
    bar.finish_and_clear();
    let bits = byte_level.then(|| summary.final_val_loss / std::f64::consts::LN_2);
    if json {
        println!(
            "{}",
            json!({
                "steps": summary.steps,
                "final_train_loss": summary.final_train_loss,
                "final_val_loss": summary.final_val_loss,
                "val_bits_per_byte": bits,
                "tokens_per_s": summary.tokens_per_s,
                "out": summary.out_dir,
            })
        );
    } else {
        let bpb = bits
            .map(|b| format!(", {b:.3} bits per byte"))
            .unwrap_or_default();
        println!(
            "{} steps: train loss {:.4}, validation loss {:.4}{bpb}; {:.0} tokens/s; checkpoint in {}",
            summary.steps,
            summary.final_train_loss,
            summary.final_val_loss,
            summary.tokens_per_s,
            summary.out_dir.display()
        );
    }
    Ok(())
}

/// Puts the tokenizer used for the data next to the weights, so the output loads as a whole.
fn copy_tokenizer(args: &TrainArgs, out: &Path) -> Result<()> {
    let source = match (&args.tokenizer, &args.start.model) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(dir)) => Some(dir.join("tokenizer.json")).filter(|p| p.is_file()),
        _ => None,
    };
    if let Some(src) = source {
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        std::fs::copy(&src, out.join("tokenizer.json"))
            .with_context(|| format!("{}: cannot copy", src.display()))?;
    }
    Ok(())
}
