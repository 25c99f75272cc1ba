//! Random weights initialised as `mamba_ssm` does, under Hugging Face tensor names:
//! S4D-real `A_log`, Δ bias from `dt_min..dt_max` through the inverse softplus, `D = 1`,
//! uniform fan-in linear layers, `out_proj` rescaled by `1/sqrt(layers)`, N(0, 0.02) embeddings.

use crate::config::{Mamba2Config, MambaConfig, ModelConfig};
use crate::error::Result;
use crate::model::Model;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const DT_MIN: f32 = 1e-3;
const DT_MAX: f32 = 1e-1;
const DT_FLOOR: f32 = 1e-4;

/// Draws the tensors of a model and stores them in `dtype` as they are made.
struct Init {
    rng: StdRng,
    dtype: DType,
    tensors: HashMap<String, Tensor>,
}

impl Init {
    /// Stores a small parameter in f32.
    fn put(&mut self, name: String, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        self.tensors
            .insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }

    /// Stores a projection or embedding matrix in the model's weight dtype.
    fn put_matrix(&mut self, name: String, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(self.dtype)?;
        self.tensors.insert(name, t);
        Ok(())
    }

    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect()
    }

    /// Standard normal values by the Box-Muller transform, times `std`.
    fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f32 = self.rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = self.rng.random();
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// A `(out, in)` linear weight, uniform in `±scale/sqrt(in)`, and its bias if asked.
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool, scale: f32) -> Result<()> {
        let bound = scale / (inp as f32).sqrt();
        let w = self.uniform(out * inp, bound);
        self.put_matrix(format!("{name}.weight"), w, &[out, inp])?;
        if bias {
            self.put(format!("{name}.bias"), vec![0.0; out], &[out])?;
        }
        Ok(())
    }

    /// Depthwise conv weight `(channels, 1, W)` and bias, PyTorch's default bounds.
    fn conv(&mut self, name: &str, channels: usize, width: usize, bias: bool) -> Result<()> {
        let bound = 1.0 / (width as f32).sqrt();
        let w = self.uniform(channels * width, bound);
        self.put(format!("{name}.weight"), w, &[channels, 1, width])?;
        if bias {
            let b = self.uniform(channels, bound);
            self.put(format!("{name}.bias"), b, &[channels])?;
        }
        Ok(())
    }

    /// Δ biases: `dt ~ exp(U(ln dt_min, ln dt_max))`, then `softplus^-1(dt)`.
    fn dt_bias(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let dt = self
                    .rng
                    .random_range(DT_MIN.ln()..DT_MAX.ln())
                    .exp()
                    .max(DT_FLOOR);
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect()
    }

    fn ones(&mut self, name: String, n: usize) -> Result<()> {
        self.put(name, vec![1.0; n], &[n])
    }

    fn embeddings_and_head(&mut self, vocab: usize, hidden: usize, tied: bool) -> Result<()> {
        let e = self.normal(vocab * hidden, 0.02);
        self.put_matrix("backbone.embeddings.weight".into(), e, &[vocab, hidden])?;
        self.ones("backbone.norm_f.weight".into(), hidden)?;
        if !tied {
            self.linear("lm_head", vocab, hidden, false, 1.0)?;
        }
        Ok(())
    }

    fn mamba1_layer(&mut self, i: usize, c: &MambaConfig) -> Result<()> {
        let (h, di, n, r) = (
            c.hidden_size,
            c.intermediate_size,
            c.state_size,
            c.time_step_rank,
        );
        let p = format!("backbone.layers.{i}");
        self.ones(format!("{p}.norm.weight"), h)?;
        self.linear(&format!("{p}.mixer.in_proj"), 2 * di, h, c.use_bias, 1.0)?;
        self.conv(
            &format!("{p}.mixer.conv1d"),
            di,
            c.conv_kernel,
            c.use_conv_bias,
        )?;
        self.linear(&format!("{p}.mixer.x_proj"), r + 2 * n, di, false, 1.0)?;
        let dt_std = (r as f32).powf(-0.5);
        let w = self.uniform(di * r, dt_std);
        self.put_matrix(format!("{p}.mixer.dt_proj.weight"), w, &[di, r])?;
        let b = self.dt_bias(di);
        self.put(format!("{p}.mixer.dt_proj.bias"), b, &[di])?;
        let a_log: Vec<f32> = (0..di)
            .flat_map(|_| (1..=n).map(|k| (k as f32).ln()))
            .collect();
        self.put(format!("{p}.mixer.A_log"), a_log, &[di, n])?;
        self.ones(format!("{p}.mixer.D"), di)?;
        let scale = 1.0 / (c.num_hidden_layers as f32).sqrt();
        self.linear(&format!("{p}.mixer.out_proj"), h, di, c.use_bias, scale)
    }

    fn mamba2_layer(&mut self, i: usize, c: &Mamba2Config) -> Result<()> {
        let (h, di, nh) = (c.hidden_size, c.d_inner(), c.num_heads);
        let p = format!("backbone.layers.{i}");
        self.ones(format!("{p}.norm.weight"), h)?;
        let in_features = 2 * di + 2 * c.n_groups * c.state_size + nh;
        self.linear(
            &format!("{p}.mixer.in_proj"),
            in_features,
            h,
            c.use_bias,
            1.0,
        )?;
        self.conv(
            &format!("{p}.mixer.conv1d"),
            c.conv_dim(),
            c.conv_kernel,
            c.use_conv_bias,
        )?;
        let b = self.dt_bias(nh);
        self.put(format!("{p}.mixer.dt_bias"), b, &[nh])?;
        let a_log: Vec<f32> = (0..nh)
            .map(|_| self.rng.random_range(1.0f32..16.0).ln())
            .collect();
        self.put(format!("{p}.mixer.A_log"), a_log, &[nh])?;
        self.ones(format!("{p}.mixer.D"), nh)?;
        self.ones(format!("{p}.mixer.norm.weight"), di)?;
        let scale = 1.0 / (c.num_hidden_layers as f32).sqrt();
        self.linear(&format!("{p}.mixer.out_proj"), h, di, c.use_bias, scale)
    }
}

/// Every tensor of a freshly initialised model, by Hugging Face name, in `dtype`
/// (A_log, D, norms, biases and conv weights are always f32).
pub fn init_tensors(
    config: &ModelConfig,
    dtype: DType,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut init = Init {
        rng: StdRng::seed_from_u64(seed),
        dtype,
        tensors: HashMap::new(),
    };
    match config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
            init.embeddings_and_head(c.vocab_size, c.hidden_size, c.tie_word_embeddings)?;
            for i in 0..c.num_hidden_layers {
                init.mamba1_layer(i, c)?;
            }
        }
        ModelConfig::Mamba2(c) => {
            init.embeddings_and_head(c.vocab_size, c.hidden_size, c.tie_word_embeddings)?;
            for i in 0..c.num_hidden_layers {
                init.mamba2_layer(i, c)?;
            }
        }
    }
    Ok(init.tensors)
}

impl Model {
    /// A model with freshly initialised weights in `dtype` (f32 or bf16).
    pub fn random(config: &ModelConfig, dtype: DType, seed: u64) -> Result<Self> {
        let tensors = init_tensors(config, dtype, seed)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        Self::from_var_builder(&vb, config)
    }
}
