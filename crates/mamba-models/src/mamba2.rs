//! Mamba-2 (`Mamba2ForCausalLM`): the SSD mixer, a scalar decay per head.
//!
//! ```text
//! x               = RMSNorm(h)
//! [z | xBC | dt]  = x W_in^T                      sizes [d_inner, d_inner + 2GN, H]
//! xBC             = silu(causal_conv1d(xBC))
//! [xs | B | C]    = xBC                           xs: (H, P), B, C: (G, N)
//! y               = SSD(xs, dt, A = -exp(A_log), B, C, D, dt_bias)   (chunked on prefill)
//! y               = RMSNormGated(y, z)            groups of d_inner / G, gate before the norm
//! h               = h + y W_out^T
//! ```

use crate::config::Mamba2Config;
use crate::error::Result;
use crate::layers::{columns, f32_vec, load_f32, tensor3, transposed_vec, Linear};
use crate::model::Mixer;
use crate::state::LayerState;
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use mamba_ops::causal_conv1d::{
    causal_conv1d, causal_conv1d_update, ConvDims, ConvInputs, ConvUpdateDims, ConvUpdateInputs,
};
use mamba_ops::rmsnorm_gated::{rmsnorm_gated, NormDims};
use mamba_ops::selective_state_update::{selective_state_update, StepDims, StepInputs};
use mamba_ops::ssd::{ssd, SsdDims, SsdInputs};

/// The SSD mixer of one layer.
#[derive(Debug, Clone)]
pub struct Mamba2Mixer {
    in_proj: Linear,
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    dt_bias: Vec<f32>,
    /// `A = -exp(A_log)`, one per head.
    a: Vec<f32>,
    d: Vec<f32>,
    norm_weight: Vec<f32>,
    out_proj: Linear,
    cfg: Mamba2Config,
}

impl Mamba2Mixer {
    pub fn load(vb: &VarBuilder, cfg: &Mamba2Config) -> Result<Self> {
        let (hid, di, nh, w) = (
            cfg.hidden_size,
            cfg.d_inner(),
            cfg.num_heads,
            cfg.conv_kernel,
        );
        let conv_dim = cfg.conv_dim();
        let in_features = 2 * di + 2 * cfg.n_groups * cfg.state_size + nh;
        let a_log = load_f32(vb, "A_log", &[nh])?;
        Ok(Mamba2Mixer {
            in_proj: Linear::load(vb, "in_proj", (in_features, hid), cfg.use_bias)?,
            conv_weight: load_f32(vb, "conv1d.weight", &[conv_dim, 1, w])?,
            conv_bias: cfg
                .use_conv_bias
                .then(|| load_f32(vb, "conv1d.bias", &[conv_dim]))
                .transpose()?,
            dt_bias: load_f32(vb, "dt_bias", &[nh])?,
            a: a_log.iter().map(|v| -v.exp()).collect(),
            d: load_f32(vb, "D", &[nh])?,
            norm_weight: load_f32(vb, "norm.weight", &[di])?,
            out_proj: Linear::load(vb, "out_proj", (hid, di), cfg.use_bias)?,
            cfg: cfg.clone(),
        })
    }

    fn dt_limit(&self) -> (f32, f32) {
        (
            self.cfg.time_step_limit.0 as f32,
            self.cfg.time_step_limit.1 as f32,
        )
    }

    /// `y * silu(z)` normalised in groups, over rows of `d_inner`.
    fn gated_norm(&self, y: &[f32], z: &[f32], rows: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let dims = NormDims {
            rows,
            hidden: c.d_inner(),
            group_size: c.d_inner() / c.n_groups,
            eps: c.layer_norm_epsilon as f32,
            norm_before_gate: c.norm_before_gate,
        };
        Ok(rmsnorm_gated(&dims, y, &self.norm_weight, Some(z))?)
    }
}

impl Mixer for Mamba2Mixer {
    /// Per-sequence state sizes: `(conv_dim, W-1)` conv window and `(H, P, N)` SSM state.
    fn state_sizes(&self) -> (usize, usize) {
        let c = &self.cfg;
        (
            c.conv_dim() * (c.conv_kernel - 1),
            c.num_heads * c.head_dim * c.state_size,
        )
    }

    /// Whole-sequence forward of `x: (b, L, hidden)` from `state`, which it advances.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let c = &self.cfg;
        let (batch, len, _) = x.dims3()?;
        let (di, conv_dim, nh, gn) = (
            c.d_inner(),
            c.conv_dim(),
            c.num_heads,
            c.n_groups * c.state_size,
        );
        let zxbcdt = self.in_proj.forward(x)?; // (b, L, 2 d_inner + 2GN + H)
        let z = f32_vec(&columns(&zxbcdt, 0, di)?)?;
        let xbc = transposed_vec(&columns(&zxbcdt, di, conv_dim)?)?; // (b, conv_dim, L)
        let dt = f32_vec(&columns(&zxbcdt, di + conv_dim, nh)?)?; // (b, L, H)
        let conv = causal_conv1d(
            &ConvDims {
                batch,
                dim: conv_dim,
                len,
                width: c.conv_kernel,
            },
            &ConvInputs {
                x: &xbc,
                weight: &self.conv_weight,
                bias: self.conv_bias.as_deref(),
                initial_states: Some(&state.conv),
                silu: true,
            },
        )?;
        state.conv = conv.final_states;
        let xbc = tensor3(conv.out, (batch, conv_dim, len))?.transpose(1, 2)?; // (b, L, conv_dim)
        let scan = ssd(
            &SsdDims {
                batch,
                len,
                heads: nh,
                head_dim: c.head_dim,
                groups: c.n_groups,
                state: c.state_size,
                chunk_size: c.chunk_size,
            },
            &SsdInputs {
                x: &f32_vec(&columns(&xbc, 0, di)?)?,
                dt: &dt,
                a: &self.a,
                b: &f32_vec(&columns(&xbc, di, gn)?)?,
                c: &f32_vec(&columns(&xbc, di + gn, gn)?)?,
                d: Some(&self.d),
                z: None,
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: self.dt_limit(),
                initial_states: Some(&state.ssm),
            },
        )?;
        state.ssm = scan.final_state;
        let y = self.gated_norm(&scan.y, &z, batch * len)?;
        self.out_proj.forward(&tensor3(y, (batch, len, di))?)
    }

    /// One token per sequence, `x: (b, hidden)`, through the recurrent updates.
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let c = &self.cfg;
        let batch = x.dim(0)?;
        let (di, conv_dim, nh, gn) = (
            c.d_inner(),
            c.conv_dim(),
            c.num_heads,
            c.n_groups * c.state_size,
        );
        let zxbcdt = self.in_proj.forward(x)?; // (b, 2 d_inner + 2GN + H)
        let z = f32_vec(&columns(&zxbcdt, 0, di)?)?;
        let xbc = f32_vec(&columns(&zxbcdt, di, conv_dim)?)?;
        let dt = f32_vec(&columns(&zxbcdt, di + conv_dim, nh)?)?;
        let xbc = causal_conv1d_update(
            &ConvUpdateDims {
                batch,
                dim: conv_dim,
                width: c.conv_kernel,
                state_len: c.conv_kernel - 1,
                steps: 1,
            },
            &mut state.conv,
            &ConvUpdateInputs {
                x: &xbc,
                weight: &self.conv_weight,
                bias: self.conv_bias.as_deref(),
                silu: true,
            },
        )?;
        let split = |from: usize, width: usize| -> Vec<f32> {
            xbc.chunks(conv_dim)
                .flat_map(|row| row[from..from + width].to_vec())
                .collect()
        };
        let y = selective_state_update(
            &StepDims {
                batch,
                heads: nh,
                head_dim: c.head_dim,
                state: c.state_size,
                groups: c.n_groups,
                per_head: true,
            },
            &mut state.ssm,
            &StepInputs {
                x: &split(0, di),
                dt: &dt,
                a: &self.a,
                b: &split(di, gn),
                c: &split(di + gn, gn),
                d: Some(&self.d),
                z: None,
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: self.dt_limit(),
            },
        )?;
        let y = self.gated_norm(&y, &z, batch)?;
        self.out_proj
            .forward(&Tensor::from_vec(y, (batch, di), &Device::Cpu)?)
    }
}
