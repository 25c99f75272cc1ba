//! The training loop: next-token cross-entropy (plus the routers' load-balancing loss for
//! models with experts), gradient accumulation, global-norm clipping, AdamW on a warmup +
//! cosine schedule, periodic validation and checkpoints.

use crate::checkpoint::{self, TrainerState};
use crate::data::{Batch, Batches};
use crate::optim::{AdamW, AdamWConfig};
use crate::plot;
use crate::schedule::Schedule;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mamba_models::config::ModelConfig;
use mamba_models::Model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub adamw: AdamWConfig,
    pub grad_clip: f64,
    /// Micro-batches whose gradients are summed into one step.
    pub grad_accum: usize,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub save_every: usize,
    pub seed: u64,
}

impl TrainConfig {
    /// Defaults for `steps` steps: 10 % warmup (at most 200), validation and checkpoints
    /// about ten times per run.
    pub fn for_steps(steps: usize) -> Self {
        TrainConfig {
            steps,
            batch: 8,
            seq_len: 256,
            lr: 1e-3,
            warmup: (steps / 10).clamp(1, 200),
            min_lr_ratio: 0.1,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            grad_accum: 1,
            eval_every: (steps / 10).max(1),
            eval_batches: 8,
            save_every: (steps / 10).max(1),
            seed: 0,
        }
    }

    fn check(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return Err(Error::Train(
                "steps, batch, seq-len and grad-accum must be at least 1".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Train(format!(
                "learning rate {} must be positive",
                self.lr
            )));
        }
        Ok(())
    }
}

/// The terms of the training objective on one batch.
#[derive(Debug, Clone)]
pub struct Loss {
    /// Mean next-token cross-entropy (nats per token): what is reported and validated.
    pub cross_entropy: Tensor,
    /// What training minimises: the cross-entropy plus `router_aux_loss_coef` times the
    /// mean load-balancing loss of the mixture-of-experts layers (the cross-entropy alone
    /// for models without experts).
    pub objective: Tensor,
}

/// A model whose weights are trainable variables.
pub struct Trainable {
    pub config: ModelConfig,
    pub model: Model,
    vars: Vec<(String, Var)>,
}

impl Trainable {
    /// Wraps weights (by Hugging Face name) as variables, in f32, and builds the model on them.
    pub fn new(config: &ModelConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        Self::new_on(config, weights, &Device::Cpu)
    }

    /// [`Trainable::new`] with the variables on `device` (a GPU with the `cuda` feature).
    pub fn new_on(
        config: &ModelConfig,
        weights: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut vars = Vec::with_capacity(weights.len());
        {
            let mut data = varmap.data().lock().expect("fresh map");
            for (name, t) in weights {
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
                data.insert(name.clone(), var.clone());
                vars.push((name, var));
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Model::from_var_builder(&vb, config)?;
        Ok(Trainable {
            config: config.clone(),
            model,
            vars,
        })
    }

    /// The current weights by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The trainable variables with their Hugging Face names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The loss terms of a batch of `rows` sequences, from a zero state.
    pub fn loss_terms(&self, batch: &Batch, rows: usize) -> Result<Loss> {
        let mut state = self.model.new_state(rows);
        let hidden = self
            .model
            .forward_hidden(&batch.inputs, &mut state, false)?;
        let logits = self.model.logits(&hidden.final_norm)?;
        let vocab = logits.dim(2)?;
        let logits = logits.reshape((batch.inputs.len(), vocab))?;
        let targets = Tensor::from_slice(&batch.targets, batch.targets.len(), self.model.device())?;
        let cross_entropy = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let objective = match hidden.router_aux_loss {
            Some(aux) => (&cross_entropy + (aux * self.config.router_aux_loss_coef())?)?,
            None => cross_entropy.clone(),
        };
        Ok(Loss {
            cross_entropy,
            objective,
        })
    }

    /// The training objective of a batch (see [`Loss::objective`]).
    pub fn loss(&self, batch: &Batch, rows: usize) -> Result<Tensor> {
        Ok(self.loss_terms(batch, rows)?.objective)
    }
}

/// One line of progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    /// Training tokens per second of the steps so far (forward, backward and update, the
    /// device synchronised; evaluation and checkpoint writes not counted).
    pub tokens_per_s: f64,
    /// Validation loss when measured at this step.
    pub val_loss: Option<f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub steps: usize,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    /// Training tokens per second, as in [`Progress::tokens_per_s`].
    pub tokens_per_s: f64,
    pub out_dir: PathBuf,
}

/// Sums `add` into `total` for every variable.
fn accumulate(total: &mut Option<GradStore>, add: GradStore, vars: &[(String, Var)]) -> Result<()> {
    let Some(total) = total else {
        *total = Some(add);
        return Ok(());
    };
    for (_, var) in vars {
        if let Some(g) = add.get(var.as_tensor()) {
            let sum = match total.get(var.as_tensor()) {
                Some(t) => (t + g)?,
                None => g.clone(),
            };
            total.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Validation loss: the mean cross-entropy over the given batches.
fn evaluate(model: &Trainable, batches: &[Batch], rows: usize) -> Result<f64> {
    let mut total = 0.0;
    for b in batches {
        total += model
            .loss_terms(b, rows)?
            .cross_entropy
            .to_scalar::<f32>()? as f64;
    }
    Ok(total / batches.len().max(1) as f64)
}

/// Trains `model` on `train` (validating on `val`) and writes checkpoints into `out`.
/// With `resume`, continues from the checkpoint in `out`, landing where an uninterrupted
/// run would. `on_progress` is called after every step; returning `false` stops the run
/// early, after writing a checkpoint.
pub fn train(
    mut model: Trainable,
    train: &Batches,
    val: &Batches,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    mut on_progress: impl FnMut(&Progress) -> bool,
) -> Result<Summary> {
    cfg.check()?;
    std::fs::create_dir_all(out).map_err(crate::io_err(out))?;
    let mut state = TrainerState {
        step: 0,
        train_losses: vec![],
        val_losses: vec![],
        tokens_seen: 0,
        seconds: 0.0,
    };
    let mut opt = AdamW::new(model.vars.clone(), cfg.adamw)?;
    if resume {
        state = checkpoint::load_trainer_state(out)?;
        model = Trainable::new_on(
            &model.config,
            checkpoint::load_tensors(out, checkpoint::WEIGHTS)?,
            &model.model.device().clone(),
        )?;
        opt = AdamW::new(model.vars.clone(), cfg.adamw)?;
        opt.load_state(
            &checkpoint::load_tensors(out, checkpoint::OPTIMIZER)?,
            state.step as u64,
        )?;
    }
    let schedule = Schedule {
        peak: cfg.lr,
        warmup: cfg.warmup,
        total: cfg.steps,
        floor_ratio: cfg.min_lr_ratio,
    };
    let val_batches = val.in_order(cfg.eval_batches);
    let started = Instant::now();
    let tokens_per_step = (cfg.batch * cfg.seq_len * cfg.grad_accum) as u64;
    let mut tokens_this_run = 0u64;
    let mut training_seconds = 0.0;
    while state.step < cfg.steps {
        let step = state.step;
        let step_started = Instant::now();
        let mut grads = None;
        let mut loss_sum = 0.0;
        for micro in 0..cfg.grad_accum {
            let batch = train.shuffled((step * cfg.grad_accum + micro) as u64);
            let loss = model.loss_terms(&batch, cfg.batch)?;
            loss_sum += loss.cross_entropy.to_scalar::<f32>()? as f64;
            accumulate(&mut grads, loss.objective.backward()?, &model.vars)?;
        }
        let grads = grads.expect("at least one micro-batch");
        let loss = loss_sum / cfg.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Train(format!(
                "loss became {loss} at step {step}: lower the learning rate"
            )));
        }
        let mean_scale = 1.0 / cfg.grad_accum as f64;
        let norm = opt.grad_norm(&grads)? * mean_scale;
        let clip = if norm > cfg.grad_clip {
            cfg.grad_clip / norm
        } else {
            1.0
        };
        let lr = schedule.lr(step);
        opt.step(&grads, lr, mean_scale * clip)?;
        model.model.device().synchronize()?;
        training_seconds += step_started.elapsed().as_secs_f64();

        state.step += 1;
        state.tokens_seen += tokens_per_step;
        tokens_this_run += tokens_per_step;
        state.train_losses.push((state.step, loss));
        let last = state.step == cfg.steps;
        let val_loss = if last || state.step.is_multiple_of(cfg.eval_every) {
            let v = evaluate(&model, &val_batches, cfg.batch)?;
            state.val_losses.push((state.step, v));
            Some(v)
        } else {
            None
        };
        let elapsed = started.elapsed().as_secs_f64();
        let keep_going = on_progress(&Progress {
            step: state.step,
            steps: cfg.steps,
            loss,
            lr,
            tokens_per_s: tokens_this_run as f64 / training_seconds.max(1e-9),
            val_loss,
        });
        if last || !keep_going || state.step.is_multiple_of(cfg.save_every) {
            let mut saved = state.clone();
            saved.seconds += elapsed;
            save_checkpoint(out, &model, &opt, &saved)?;
        }
        if !keep_going {
            break;
        }
    }
    Ok(Summary {
        steps: state.step,
        final_train_loss: state.train_losses.last().map_or(f64::NAN, |l| l.1),
        final_val_loss: state.val_losses.last().map_or(f64::NAN, |l| l.1),
        tokens_per_s: tokens_this_run as f64 / training_seconds.max(1e-9),
        out_dir: out.to_path_buf(),
    })
}

/// Weights, config, optimiser state, the loss plot, and last the trainer state.
fn save_checkpoint(out: &Path, model: &Trainable, opt: &AdamW, state: &TrainerState) -> Result<()> {
    checkpoint::save_model(out, &model.config, &model.weights())?;
    checkpoint::save_tensors(out, checkpoint::OPTIMIZER, &opt.state())?;
    plot::loss_curve(
        &out.join("loss.svg"),
        &state.train_losses,
        &state.val_losses,
    )?;
    checkpoint::save_trainer_state(out, state)
}
