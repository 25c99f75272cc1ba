//! AdamW with decoupled weight decay, skipped (as `mamba_ssm` does) for `A_log`, `D`,
//! norms and biases; global-norm gradient clipping; its state saved and restored exactly.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// One trained tensor with its moment estimates.
struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// The optimiser.
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    steps: u64,
}

/// Parameters that get no weight decay: the SSM's `A_log` and `D`, Δ biases, every bias
/// and every norm weight.
pub fn skips_weight_decay(name: &str) -> bool {
    name.ends_with("A_log")
        || name.ends_with(".D")
        || name.ends_with("bias")
        || name.ends_with("norm.weight")
        || name.ends_with("norm2.weight")
        || name.ends_with("norm_f.weight")
}

impl AdamW {
    /// An optimiser over named variables (sorted by name for a stable order).
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Param {
                    decay: !skips_weight_decay(&name),
                    m: zeros.clone(),
                    v: zeros,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            config,
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The L2 norm of all gradients together.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0.0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`, gradients scaled by `grad_scale` first
    /// (for clipping and accumulation).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = (g * grad_scale)?;
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&p.m / bias1)? / ((&p.v / bias2)?.sqrt()? + c.eps)?)?;
            let w = p.var.as_tensor();
            let w = if p.decay {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments by name (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("m.{}", p.name), p.m.clone()),
                    (format!("v.{}", p.name), p.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] after `steps` updates.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            let get = |key: String| {
                tensors
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| Error::Train(format!("optimizer state has no tensor {key}")))
            };
            let device = p.var.device();
            let (m, v) = (
                get(format!("m.{}", p.name))?.to_device(device)?,
                get(format!("v.{}", p.name))?.to_device(device)?,
            );
            if m.shape() != p.var.shape() || v.shape() != p.var.shape() {
                return Err(Error::Train(format!(
                    "optimizer state for {} has the wrong shape",
                    p.name
                )));
            }
            (p.m, p.v) = (m, v);
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Minimising `sum((w - 3)^2)` converges, and weight decay is skipped where it should be.
    #[test]
    fn adamw_minimises_a_quadratic() {
        let w = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        for _ in 0..500 {
            let loss = (w.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap(), 0.05, 1.0).unwrap();
        }
        let v = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (x - 3.0).abs() < 1e-2), "{v:?}");
        assert!(skips_weight_decay("backbone.layers.0.mixer.A_log"));
        assert!(skips_weight_decay("backbone.layers.0.mixer.D"));
        assert!(skips_weight_decay("backbone.layers.0.mixer.dt_proj.bias"));
        assert!(skips_weight_decay("backbone.norm_f.weight"));
        assert!(skips_weight_decay("backbone.layers.3.norm2.weight"));
        assert!(skips_weight_decay("backbone.layers.3.mixer.out_proj.bias"));
        assert!(!skips_weight_decay(
            "backbone.layers.0.mixer.in_proj.weight"
        ));
    }
}
