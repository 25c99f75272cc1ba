//! Random weights initialised as `mamba_ssm` does, under Hugging Face tensor names:
//! S4D-real `A_log`, Δ bias from `dt_min..dt_max` through the inverse softplus, `D = 1`,
//! uniform fan-in linear layers (PyTorch's default) with zero biases, N(0, 0.02)
//! embeddings, every norm weight 1, and the projections that write into the residual
//! stream (`out_proj`, and `fc2` / `down_proj` / `o_proj` of MLPs, experts and attention)
//! rescaled by `1/sqrt(residual writes per layer * layers)`: one write per layer for pure
//! Mamba models, two (mixer and MLP) for hybrids with MLPs and for MoE-Mamba. Jamba keeps
//! one write per layer.

use crate::config::{
    HybridConfig, JambaConfig, Mamba2Config, ModelConfig, MoeMambaConfig, SsmConfig,
};
use crate::error::Result;
use crate::mamba1::{DtBcNorm, MixerSpec};
use crate::model::{Model, TensorNames};
use crate::{hybrid, jamba};
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

    fn embeddings_and_head(&mut self, config: &ModelConfig) -> Result<()> {
        let (vocab, hidden) = (config.vocab_size(), config.hidden_size());
        let names = TensorNames::of(config.family());
        let e = self.normal(vocab * hidden, 0.02);
        let embedding = format!("{}.{}", names.root, names.embedding);
        self.put_matrix(embedding, e, &[vocab, hidden])?;
        self.ones(format!("{}.{}", names.root, names.final_norm), hidden)?;
        if !config.tie_word_embeddings() {
            self.linear("lm_head", vocab, hidden, false, 1.0)?;
        }
        Ok(())
    }

    /// A Mamba-1 mixer under `{p}.`, its `out_proj` scaled by `out_scale`.
    fn mamba1_mixer(&mut self, p: &str, s: &MixerSpec, out_scale: f32) -> Result<()> {
        let (h, di, n, r) = (s.hidden_size, s.d_inner, s.state_size, s.dt_rank);
        self.linear(&format!("{p}.in_proj"), 2 * di, h, s.proj_bias, 1.0)?;
        self.conv(&format!("{p}.conv1d"), di, s.conv_kernel, s.conv_bias)?;
        self.linear(&format!("{p}.x_proj"), r + 2 * n, di, false, 1.0)?;
        let dt_std = (r as f32).powf(-0.5);
        let w = self.uniform(di * r, dt_std);
        self.put_matrix(format!("{p}.dt_proj.weight"), w, &[di, r])?;
        let b = self.dt_bias(di);
        self.put(format!("{p}.dt_proj.bias"), b, &[di])?;
        let a_log: Vec<f32> = (0..di)
            .flat_map(|_| (1..=n).map(|k| (k as f32).ln()))
            .collect();
        self.put(format!("{p}.A_log"), a_log, &[di, n])?;
        self.ones(format!("{p}.D"), di)?;
        self.linear(&format!("{p}.out_proj"), h, di, s.proj_bias, out_scale)?;
        if let DtBcNorm::Weighted { .. } = s.dt_bc_norm {
            self.ones(format!("{p}.dt_layernorm.weight"), r)?;
            self.ones(format!("{p}.b_layernorm.weight"), n)?;
            self.ones(format!("{p}.c_layernorm.weight"), n)?;
        }
        Ok(())
    }

    /// A gated MLP under `{p}.`, its `down_proj` scaled by `out_scale`.
    fn gated_mlp(&mut self, p: &str, hidden: usize, inter: usize, out_scale: f32) -> Result<()> {
        self.linear(&format!("{p}.gate_proj"), inter, hidden, false, 1.0)?;
        self.linear(&format!("{p}.up_proj"), inter, hidden, false, 1.0)?;
        self.linear(&format!("{p}.down_proj"), hidden, inter, false, out_scale)
    }

    fn jamba_layer(&mut self, i: usize, c: &JambaConfig) -> Result<()> {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let out_scale = residual_scale(1, c.num_hidden_layers);
        let p = format!("model.layers.{i}");
        self.ones(format!("{p}.input_layernorm.weight"), h)?;
        if c.is_attention_layer(i) {
            let a = jamba::attention_spec(c);
            let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
            self.linear(&format!("{p}.self_attn.q_proj"), q, h, false, 1.0)?;
            self.linear(&format!("{p}.self_attn.k_proj"), kv, h, false, 1.0)?;
            self.linear(&format!("{p}.self_attn.v_proj"), kv, h, false, 1.0)?;
            self.linear(&format!("{p}.self_attn.o_proj"), h, q, false, out_scale)?;
        } else {
            self.mamba1_mixer(&format!("{p}.mamba"), &jamba::mamba_spec(c), out_scale)?;
        }
        self.ones(format!("{p}.pre_ff_layernorm.weight"), h)?;
        let ffn = format!("{p}.feed_forward");
        if c.is_expert_layer(i) {
            self.linear(&format!("{ffn}.router"), c.num_experts, h, false, 1.0)?;
            for e in 0..c.num_experts {
                self.gated_mlp(&format!("{ffn}.experts.{e}"), h, inter, out_scale)?;
            }
            Ok(())
        } else {
            self.gated_mlp(&ffn, h, inter, out_scale)
        }
    }

    /// A Mamba-2 mixer under `{p}.`, its `out_proj` scaled by `out_scale`.
    fn mamba2_mixer(&mut self, p: &str, c: &Mamba2Config, out_scale: f32) -> Result<()> {
        let (h, di, nh) = (c.hidden_size, c.d_inner(), c.num_heads);
        let in_features = 2 * di + 2 * c.n_groups * c.state_size + nh;
        self.linear(&format!("{p}.in_proj"), in_features, h, c.use_bias, 1.0)?;
        self.conv(
            &format!("{p}.conv1d"),
            c.conv_dim(),
            c.conv_kernel,
            c.use_conv_bias,
        )?;
        let b = self.dt_bias(nh);
        self.put(format!("{p}.dt_bias"), b, &[nh])?;
        let a_log: Vec<f32> = (0..nh)
            .map(|_| self.rng.random_range(1.0f32..16.0).ln())
            .collect();
        self.put(format!("{p}.A_log"), a_log, &[nh])?;
        self.ones(format!("{p}.D"), nh)?;
        self.ones(format!("{p}.norm.weight"), di)?;
        self.linear(&format!("{p}.out_proj"), h, di, c.use_bias, out_scale)
    }

    /// A hybrid's layer `i`: SSM or attention mixer, then the gated MLP if any.
    fn hybrid_layer(&mut self, i: usize, c: &HybridConfig) -> Result<()> {
        let h = c.ssm.hidden_size();
        let writes = if c.d_intermediate > 0 { 2 } else { 1 };
        let out_scale = residual_scale(writes, c.ssm.num_layers());
        let p = format!("backbone.layers.{i}");
        self.ones(format!("{p}.norm.weight"), h)?;
        let mixer = format!("{p}.mixer");
        match (&c.attention, &c.ssm) {
            (Some(a), _) if c.is_attention_layer(i) => {
                let s = hybrid::attention_spec(a, h);
                let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
                self.linear(&format!("{mixer}.in_proj"), q + 2 * kv, h, s.qkv_bias, 1.0)?;
                self.linear(&format!("{mixer}.out_proj"), h, q, s.out_bias, out_scale)?;
            }
            (_, SsmConfig::Mamba1(m)) => {
                self.mamba1_mixer(&mixer, &MixerSpec::from(m), out_scale)?
            }
            (_, SsmConfig::Mamba2(m)) => self.mamba2_mixer(&mixer, m, out_scale)?,
        }
        if c.d_intermediate > 0 {
            let w = c.mlp_width();
            self.ones(format!("{p}.norm2.weight"), h)?;
            self.linear(&format!("{p}.mlp.fc1"), 2 * w, h, false, 1.0)?;
            self.linear(&format!("{p}.mlp.fc2"), h, w, false, out_scale)?;
        }
        Ok(())
    }

    /// A MoE-Mamba layer `i`: the Mamba mixer, then the router and its experts.
    fn moe_mamba_layer(&mut self, i: usize, c: &MoeMambaConfig) -> Result<()> {
        let h = c.mamba.hidden_size;
        let out_scale = residual_scale(2, c.mamba.num_hidden_layers);
        let p = format!("backbone.layers.{i}");
        self.ones(format!("{p}.norm.weight"), h)?;
        self.mamba1_mixer(&format!("{p}.mixer"), &MixerSpec::from(&c.mamba), out_scale)?;
        self.ones(format!("{p}.norm2.weight"), h)?;
        self.linear(&format!("{p}.moe.router"), c.num_experts, h, false, 1.0)?;
        for e in 0..c.num_experts {
            let expert = format!("{p}.moe.experts.{e}");
            self.gated_mlp(&expert, h, c.moe_intermediate_size, out_scale)?;
        }
        Ok(())
    }
}

/// `1/sqrt(writes * layers)`: the scale of the projections that write into the residual
/// stream, for `writes` of them per layer.
fn residual_scale(writes: usize, layers: usize) -> f32 {
    1.0 / ((writes * layers) as f32).sqrt()
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
    init.embeddings_and_head(config)?;
    for i in 0..config.num_layers() {
        match config {
            ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
                let p = format!("backbone.layers.{i}");
                init.ones(format!("{p}.norm.weight"), c.hidden_size)?;
                let out_scale = residual_scale(1, c.num_hidden_layers);
                init.mamba1_mixer(&format!("{p}.mixer"), &MixerSpec::from(c), out_scale)?;
            }
            ModelConfig::Mamba2(c) => {
                let p = format!("backbone.layers.{i}");
                init.ones(format!("{p}.norm.weight"), c.hidden_size)?;
                let out_scale = residual_scale(1, c.num_hidden_layers);
                init.mamba2_mixer(&format!("{p}.mixer"), c, out_scale)?;
            }
            ModelConfig::Jamba(c) => init.jamba_layer(i, c)?,
            ModelConfig::Hybrid(c) => init.hybrid_layer(i, c)?,
            ModelConfig::MoeMamba(c) => init.moe_mamba_layer(i, c)?,
        }
    }
    Ok(init.tensors)
}

impl Model {
    /// A model with freshly initialised weights in `dtype` (f32 or bf16).
    pub fn random(config: &ModelConfig, dtype: DType, seed: u64) -> Result<Self> {
        Self::from_tensors(init_tensors(config, dtype, seed)?, config, dtype)
    }

    /// A model from `tensors` named as in a Hugging Face checkpoint (such as
    /// [`init_tensors`] gives), with its weights in `dtype`.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        config: &ModelConfig,
        dtype: DType,
    ) -> Result<Self> {
        Self::from_tensors_on(tensors, config, dtype, &Device::Cpu)
    }

    /// Like [`Model::from_tensors`], with the weights on `device`.
    pub fn from_tensors_on(
        tensors: HashMap<String, Tensor>,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::from_var_builder(&vb, config)
    }
}
