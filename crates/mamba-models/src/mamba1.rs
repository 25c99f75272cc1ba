//! Mamba-1 (`MambaForCausalLM`) and FalconMamba (`FalconMambaForCausalLM`).
//!
//! Each layer is a pre-norm residual block around the selective SSM mixer:
//!
//! ```text
//! x        = RMSNorm(h)
//! [xs | z] = x W_in^T                              (b, L, 2 d_inner)
//! xc       = silu(causal_conv1d(xs))               depthwise over time
//! [dt | B | C] = xc W_x^T                          sizes [dt_rank, N, N]
//!              (FalconMamba: each RMS-normalised without a weight)
//! Δ        = dt W_dt^T                              (+ dt_proj.bias inside the scan)
//! y        = selective_scan(xc, Δ, A = -exp(A_log), B, C, D, z)
//! h        = h + y W_out^T
//! ```
//!
//! Prefill runs the parallel (whole-sequence) ops; decoding runs the one-token updates on
//! the per-sequence state (conv window + SSM state).

use crate::config::MambaConfig;
use crate::error::Result;
use crate::layers::{columns, f32_vec, load_f32, rms_normalize, tensor3, transposed_vec, Linear};
use crate::model::Mixer;
use crate::state::LayerState;
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use mamba_ops::causal_conv1d::{
    causal_conv1d, causal_conv1d_update, ConvDims, ConvInputs, ConvUpdateDims, ConvUpdateInputs,
};
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::selective_scan::{selective_scan_token_major, BcForm, ScanDims, ScanInputs};
use mamba_ops::selective_state_update::{selective_state_update, StepDims, StepInputs};

/// The selective SSM mixer of one layer.
#[derive(Debug, Clone)]
pub struct MambaMixer {
    in_proj: Linear,
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    x_proj: Linear,
    dt_proj: Linear,
    dt_bias: Vec<f32>,
    /// `A = -exp(A_log)`, `(d_inner, N)`.
    a: Vec<f32>,
    d: Vec<f32>,
    out_proj: Linear,
    d_inner: usize,
    state_size: usize,
    dt_rank: usize,
    conv_kernel: usize,
    /// FalconMamba's weightless RMS norm on dt, B and C.
    bcdt_norm_eps: Option<f64>,
}

impl MambaMixer {
    pub fn load(vb: &VarBuilder, cfg: &MambaConfig) -> Result<Self> {
        let (h, di, n, r, w) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.time_step_rank,
            cfg.conv_kernel,
        );
        let a_log = load_f32(vb, "A_log", &[di, n])?;
        Ok(MambaMixer {
            in_proj: Linear::load(vb, "in_proj", (2 * di, h), cfg.use_bias)?,
            conv_weight: load_f32(vb, "conv1d.weight", &[di, 1, w])?,
            conv_bias: cfg
                .use_conv_bias
                .then(|| load_f32(vb, "conv1d.bias", &[di]))
                .transpose()?,
            x_proj: Linear::load(vb, "x_proj", (r + 2 * n, di), false)?,
            dt_proj: Linear::load(vb, "dt_proj", (di, r), false)?,
            dt_bias: load_f32(vb, "dt_proj.bias", &[di])?,
            a: a_log.iter().map(|v| -v.exp()).collect(),
            d: load_f32(vb, "D", &[di])?,
            out_proj: Linear::load(vb, "out_proj", (h, di), cfg.use_bias)?,
            d_inner: di,
            state_size: n,
            dt_rank: r,
            conv_kernel: w,
            bcdt_norm_eps: cfg.mixer_rms_eps,
        })
    }

    /// `[dt | B | C]` from the conv output `xc: (b, L, d_inner)`, normalised for FalconMamba.
    fn project_dt_b_c(&self, xc: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dbc = self.x_proj.forward(xc)?;
        let (r, n) = (self.dt_rank, self.state_size);
        let mut parts = [
            columns(&dbc, 0, r)?,
            columns(&dbc, r, n)?,
            columns(&dbc, r + n, n)?,
        ];
        if let Some(eps) = self.bcdt_norm_eps {
            for p in parts.iter_mut() {
                *p = rms_normalize(p, eps)?;
            }
        }
        let [dt, b, c] = parts;
        Ok((self.dt_proj.forward(&dt)?, b, c))
    }
}

impl Mixer for MambaMixer {
    /// The recurrent state one sequence needs: `(d_inner, W-1)` conv window and `(d_inner, N)` SSM state.
    fn state_sizes(&self) -> (usize, usize) {
        (
            self.d_inner * (self.conv_kernel - 1),
            self.d_inner * self.state_size,
        )
    }

    /// Whole-sequence forward of `x: (b, L, hidden)` starting from `state`, which it advances.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let di = self.d_inner;
        let xz = self.in_proj.forward(x)?; // (b, L, 2 d_inner)
        let xs = transposed_vec(&columns(&xz, 0, di)?)?; // (b, d_inner, L) for the conv
        let conv = causal_conv1d(
            &ConvDims {
                batch,
                dim: di,
                len,
                width: self.conv_kernel,
            },
            &ConvInputs {
                x: &xs,
                weight: &self.conv_weight,
                bias: self.conv_bias.as_deref(),
                initial_states: Some(&state.conv),
                silu: true,
            },
        )?;
        state.conv = conv.final_states;
        let xc = tensor3(conv.out, (batch, di, len))?
            .transpose(1, 2)?
            .contiguous()?; // (b, L, d_inner)
        let (delta, b, c) = self.project_dt_b_c(&xc)?;
        // The scan reads everything token-major, as the projections produce it.
        let scan = selective_scan_token_major(
            &ScanDims {
                batch,
                dim: di,
                len,
                state: self.state_size,
                bc: BcForm::Varying { groups: 1 },
            },
            &ScanInputs {
                u: &f32_vec(&xc)?,
                delta: &f32_vec(&delta)?,
                a: &self.a,
                b: &f32_vec(&b)?, // (b, L, N)
                c: &f32_vec(&c)?,
                d: Some(&self.d),
                z: Some(&f32_vec(&columns(&xz, di, di)?)?),
                delta_bias: Some(&self.dt_bias),
                delta_softplus: true,
                initial_state: Some(&state.ssm),
            },
        )?;
        state.ssm = scan.last_state;
        self.out_proj.forward(&tensor3(scan.out, (batch, len, di))?)
    }

    /// One token per sequence, `x: (b, hidden)`, through the recurrent updates.
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let di = self.d_inner;
        let xz = self.in_proj.forward(x)?; // (b, 2 d_inner)
        let xs = f32_vec(&columns(&xz, 0, di)?)?;
        let z = f32_vec(&columns(&xz, di, di)?)?;
        let xc = causal_conv1d_update(
            &ConvUpdateDims {
                batch,
                dim: di,
                width: self.conv_kernel,
                state_len: self.conv_kernel - 1,
                steps: 1,
            },
            &mut state.conv,
            &ConvUpdateInputs {
                x: &xs,
                weight: &self.conv_weight,
                bias: self.conv_bias.as_deref(),
                silu: true,
            },
        )?;
        let xc_t = Tensor::from_slice(&xc, (batch, di), &Device::Cpu)?;
        let (delta, b, c) = self.project_dt_b_c(&xc_t)?;
        let y = selective_state_update(
            &StepDims::mamba1(batch, di, self.state_size),
            &mut state.ssm,
            &StepInputs {
                x: &xc,
                dt: &f32_vec(&delta)?,
                a: &self.a,
                b: &f32_vec(&b)?,
                c: &f32_vec(&c)?,
                d: Some(&self.d),
                z: Some(&z),
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: NO_DT_LIMIT,
            },
        )?;
        self.out_proj
            .forward(&Tensor::from_vec(y, (batch, di), &Device::Cpu)?)
    }
}
