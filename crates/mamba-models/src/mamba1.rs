//! Mamba-1 (`MambaForCausalLM`) and FalconMamba (`FalconMambaForCausalLM`), and the
//! Mamba layers of Jamba.
//!
//! Each layer is a pre-norm residual block around the selective SSM mixer:
//!
//! ```text
//! x        = RMSNorm(h)
//! [xs | z] = x W_in^T                              (b, L, 2 d_inner)
//! xc       = silu(causal_conv1d(xs))               depthwise over time
//! [dt | B | C] = xc W_x^T                          sizes [dt_rank, N, N]
//!              (FalconMamba: each RMS-normalised without a weight;
//!               Jamba: each through an RMSNorm with its own weight)
//! Δ        = dt W_dt^T                              (+ dt_proj.bias inside the scan)
//! y        = selective_scan(xc, Δ, A = -exp(A_log), B, C, D, z)
//! h        = h + y W_out^T
//! ```
//!
//! Prefill runs the parallel (whole-sequence) ops; decoding runs the one-token updates on
//! the per-sequence state (conv window + SSM state).

use crate::config::MambaConfig;
use crate::error::Result;
use crate::layers::{
    columns, conv_step_silu_host, copy_columns, f32_vec, load_f32, rms_normalize,
    swap_time_channels, with_bounded_split_scratch, with_split_scratch, Linear, RmsNorm,
    PIECE_SCRATCH,
};
use crate::model::{step_through_host, Mixer};
use crate::state::{LayerState, StateSize};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mamba_ops::causal_conv1d::{causal_conv1d_token_major_into, ConvDims, ConvInputs};
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::selective_scan::{selective_scan_token_major_into, BcForm, ScanDims, ScanInputs};
use mamba_ops::selective_state_update::{selective_state_update_into, StepDims, StepInputs};
use mamba_ops::tensor::{causal_conv1d, selective_scan, ScanOptions, StepOptions};
use std::cell::Cell;

/// The sizes and options of one Mamba-1 mixer, whichever family it belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixerSpec {
    pub hidden_size: usize,
    pub d_inner: usize,
    /// `N`.
    pub state_size: usize,
    pub dt_rank: usize,
    pub conv_kernel: usize,
    /// Bias on `in_proj` and `out_proj`.
    pub proj_bias: bool,
    pub conv_bias: bool,
    pub dt_bc_norm: DtBcNorm,
}

/// The RMS norms applied to the low-rank Δ, to B and to C as `x_proj` gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DtBcNorm {
    /// Mamba-1: none.
    Off,
    /// FalconMamba: `v / sqrt(mean(v^2) + eps)`, no weight.
    Unweighted { eps: f64 },
    /// Jamba: RMSNorms with the weights `dt_layernorm`, `b_layernorm` and `c_layernorm`.
    Weighted { eps: f64 },
}

impl From<&MambaConfig> for MixerSpec {
    fn from(c: &MambaConfig) -> Self {
        MixerSpec {
            hidden_size: c.hidden_size,
            d_inner: c.intermediate_size,
            state_size: c.state_size,
            dt_rank: c.time_step_rank,
            conv_kernel: c.conv_kernel,
            proj_bias: c.use_bias,
            conv_bias: c.use_conv_bias,
            dt_bc_norm: match c.mixer_rms_eps {
                Some(eps) => DtBcNorm::Unweighted { eps },
                None => DtBcNorm::Off,
            },
        }
    }
}

/// The loaded form of [`DtBcNorm`].
#[derive(Debug, Clone)]
enum DtBcNorms {
    Off,
    Unweighted(f64),
    Weighted([RmsNorm; 3]),
}

impl DtBcNorms {
    fn load(vb: &VarBuilder, spec: &MixerSpec) -> Result<Self> {
        Ok(match spec.dt_bc_norm {
            DtBcNorm::Off => DtBcNorms::Off,
            DtBcNorm::Unweighted { eps } => DtBcNorms::Unweighted(eps),
            DtBcNorm::Weighted { eps } => DtBcNorms::Weighted([
                RmsNorm::load(vb, "dt_layernorm.weight", spec.dt_rank, eps)?,
                RmsNorm::load(vb, "b_layernorm.weight", spec.state_size, eps)?,
                RmsNorm::load(vb, "c_layernorm.weight", spec.state_size, eps)?,
            ]),
        })
    }

    /// `[dt, B, C]` (host slices of rows) normalised in place, each row on its own.
    fn apply_host(&self, parts: [&mut [f32]; 3], batch: usize) -> Result<()> {
        match self {
            DtBcNorms::Off => {}
            DtBcNorms::Unweighted(eps) => {
                for part in parts {
                    let width = part.len() / batch;
                    part.chunks_exact_mut(width)
                        .for_each(|row| rms_normalize_row(row, *eps));
                }
            }
            DtBcNorms::Weighted(norms) => {
                for (norm, part) in norms.iter().zip(parts) {
                    norm.normalize_host(part)?;
                }
            }
        }
        Ok(())
    }

    /// `[dt, B, C]` normalised, each over its last dimension.
    fn apply(&self, parts: [Tensor; 3]) -> Result<[Tensor; 3]> {
        let [dt, b, c] = parts;
        Ok(match self {
            DtBcNorms::Off => [dt, b, c],
            DtBcNorms::Unweighted(eps) => [
                rms_normalize(&dt, *eps)?,
                rms_normalize(&b, *eps)?,
                rms_normalize(&c, *eps)?,
            ],
            DtBcNorms::Weighted([n_dt, n_b, n_c]) => {
                [n_dt.forward(&dt)?, n_b.forward(&b)?, n_c.forward(&c)?]
            }
        })
    }
}

/// `v / sqrt(mean(v^2) + eps)` in place (FalconMamba's unweighted norm of Δ, B and C).
fn rms_normalize_row(row: &mut [f32], eps: f64) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq as f64 + eps).sqrt() as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The selective SSM mixer of one layer.
#[derive(Debug, Clone)]
pub struct MambaMixer {
    in_proj: Linear,
    /// `(d_inner, W)`.
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    x_proj: Linear,
    dt_proj: Linear,
    dt_bias: Tensor,
    /// `(d_inner, N)`; `A = -exp(A_log)`.
    a_log: Tensor,
    d: Tensor,
    out_proj: Linear,
    /// The small parameters as vectors for the one-token path, taken at load time.
    decode: DecodeParams,
    d_inner: usize,
    state_size: usize,
    dt_rank: usize,
    conv_kernel: usize,
    dt_bc_norms: DtBcNorms,
}

/// Conv weights, A, D and the Δ bias as plain vectors, so that decoding does not convert
/// them on every token. Training updates the tensors only, so decode from a model built
/// after training (as `mamba generate` does from a checkpoint).
#[derive(Debug, Clone)]
struct DecodeParams {
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    a: Vec<f32>,
    d: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `A = -exp(A_log)` as a tensor on the model's device, for the device step.
    a_tensor: Tensor,
}

impl MambaMixer {
    /// Loads the mixer's tensors from `vb` (the `mixer` or `mamba` folder of a layer).
    pub fn load(vb: &VarBuilder, spec: &MixerSpec) -> Result<Self> {
        let (h, di, n, r, w) = (
            spec.hidden_size,
            spec.d_inner,
            spec.state_size,
            spec.dt_rank,
            spec.conv_kernel,
        );
        let conv_weight = load_f32(vb, "conv1d.weight", &[di, 1, w])?.reshape((di, w))?;
        let conv_bias = spec
            .conv_bias
            .then(|| load_f32(vb, "conv1d.bias", &[di]))
            .transpose()?;
        let a_log = load_f32(vb, "A_log", &[di, n])?;
        let d = load_f32(vb, "D", &[di])?;
        let dt_bias = load_f32(vb, "dt_proj.bias", &[di])?;
        let decode = DecodeParams {
            conv_weight: f32_vec(&conv_weight)?,
            conv_bias: conv_bias.as_ref().map(f32_vec).transpose()?,
            a: f32_vec(&a_log)?.iter().map(|v| -v.exp()).collect(),
            d: f32_vec(&d)?,
            dt_bias: f32_vec(&dt_bias)?,
            a_tensor: a_log.exp()?.neg()?.detach(),
        };
        Ok(MambaMixer {
            in_proj: Linear::load(vb, "in_proj", (2 * di, h), spec.proj_bias)?,
            conv_weight,
            conv_bias,
            x_proj: Linear::load(vb, "x_proj", (r + 2 * n, di), false)?,
            dt_proj: Linear::load(vb, "dt_proj", (di, r), false)?,
            dt_bias,
            a_log,
            d,
            out_proj: Linear::load(vb, "out_proj", (h, di), spec.proj_bias)?,
            decode,
            d_inner: di,
            state_size: n,
            dt_rank: r,
            conv_kernel: w,
            dt_bc_norms: DtBcNorms::load(vb, spec)?,
        })
    }

    /// `[Δ | B | C]` from the conv output `xc: (..., d_inner)`, normalised for FalconMamba
    /// and Jamba: `Δ: (..., d_inner)` before its bias, `B, C: (..., N)`.
    fn project_dt_b_c(&self, xc: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dbc = self.x_proj.forward(xc)?;
        let (r, n) = (self.dt_rank, self.state_size);
        let [dt, b, c] = self.dt_bc_norms.apply([
            columns(&dbc, 0, r)?,
            columns(&dbc, r, n)?,
            columns(&dbc, r + n, n)?,
        ])?;
        Ok((self.dt_proj.forward(&dt)?, b, c))
    }

    /// Per token, the widths of [`Mixer::forward_host`]'s intermediates in the piece
    /// scratch: xs, z (d_inner), dt (dt_rank), B, C (N), then Δ and the conv's output xc
    /// (d_inner); every value written before it is read (the scan's output reuses xs's).
    fn piece_widths(&self) -> [usize; 7] {
        let (di, n) = (self.d_inner, self.state_size);
        [di, di, self.dt_rank, n, n, di, di]
    }
}

impl Mixer for MambaMixer {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![
            &mut self.in_proj,
            &mut self.x_proj,
            &mut self.dt_proj,
            &mut self.out_proj,
        ]
    }

    #[cfg(feature = "cuda")]
    fn fused_decode_weights(&self) -> Option<crate::cuda_decode::MixerWeights<'_>> {
        let bc_eps = match self.dt_bc_norms {
            DtBcNorms::Off => None,
            DtBcNorms::Unweighted(eps) => Some(eps as f32),
            DtBcNorms::Weighted(_) => return None,
        };
        Some(crate::cuda_decode::MixerWeights::Mamba1 {
            in_proj: &self.in_proj,
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            x_proj: &self.x_proj,
            dt_proj: &self.dt_proj,
            dt_bias: &self.dt_bias,
            a: &self.decode.a_tensor,
            d: &self.d,
            out_proj: &self.out_proj,
            d_inner: self.d_inner,
            state_size: self.state_size,
            dt_rank: self.dt_rank,
            conv_kernel: self.conv_kernel,
            bc_eps,
        })
    }

    /// The recurrent state one sequence needs: `(d_inner, W-1)` conv window and `(d_inner, N)` SSM state.
    fn state_size(&self) -> StateSize {
        StateSize::Recurrent {
            conv: self.d_inner * (self.conv_kernel - 1),
            ssm: self.d_inner * self.state_size,
        }
    }

    /// Whole-sequence forward of `x: (b, L, hidden)` starting from `state`, which it
    /// advances. Differentiable with respect to every weight.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let (di, n, w) = (self.d_inner, self.state_size, self.conv_kernel);
        let dev = x.device();
        let xz = self.in_proj.forward(x)?; // (b, L, 2 d_inner)
        let xs = swap_time_channels(&columns(&xz, 0, di)?)?; // (b, d_inner, L)
        let (conv_state, ssm_state) =
            state.recurrent_tensors(&[batch, di, w - 1], &[batch, di, n], dev)?;
        let (xc, conv_final) = causal_conv1d(
            &xs,
            &self.conv_weight,
            self.conv_bias.as_ref(),
            Some(&conv_state),
            true,
        )?;
        let xc = swap_time_channels(&xc)?; // (b, L, d_inner)
        let (delta, b, c) = self.project_dt_b_c(&xc)?;
        let a = self.a_log.exp()?.neg()?;
        let z = columns(&xz, di, di)?;
        let (y, last_state) = selective_scan(
            &xc,
            &delta,
            &a,
            &b.reshape((batch, len, 1, n))?,
            &c.reshape((batch, len, 1, n))?,
            ScanOptions {
                d: Some(&self.d),
                z: Some(&z),
                delta_bias: Some(&self.dt_bias),
                delta_softplus: true,
                initial_state: Some(&ssm_state),
            },
        )?;
        state.set_recurrent(&conv_final, &last_state)?;
        self.out_proj.forward(&y)
    }

    /// One token per sequence, `x: (b, hidden)`, through the recurrent updates.
    fn step(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        if x.device().is_cuda() {
            return self.step_on_device(x, state);
        }
        step_through_host(self, x, state)
    }

    fn host_scratch_per_token(&self) -> Option<usize> {
        Some(self.piece_widths().iter().sum())
    }

    /// [`Mixer::forward`] for inference on host slices, `x, out: (b, L, hidden)`, through
    /// the token-major conv and scan (no transposes, no gradient bookkeeping).
    fn forward_host(
        &self,
        x: &[f32],
        (batch, len): (usize, usize),
        state: &mut LayerState,
        out: &mut [f32],
    ) -> Result<()> {
        let (di, n, w) = (self.d_inner, self.state_size, self.conv_kernel);
        let p = &self.decode;
        let rows = batch * len;
        let lens = self.piece_widths().map(|l| l * rows);
        with_bounded_split_scratch(&PIECE_SCRATCH, lens, |[xs, z, dt, b, c, delta, xc]| {
            self.in_proj
                .forward_rows_host_parts(x, &mut [&mut *xs, &mut *z])?;
            state.conv = causal_conv1d_token_major_into(
                &ConvDims {
                    batch,
                    dim: di,
                    len,
                    width: w,
                },
                &ConvInputs {
                    x: xs,
                    weight: &p.conv_weight,
                    bias: p.conv_bias.as_deref(),
                    initial_states: Some(&state.conv),
                    silu: true,
                },
                &mut [&mut *xc],
            )?; // xc: (b, L, d_inner)
            self.x_proj
                .forward_rows_host_parts(xc, &mut [&mut *dt, &mut *b, &mut *c])?;
            self.dt_bc_norms
                .apply_host([&mut *dt, &mut *b, &mut *c], rows)?;
            self.dt_proj.forward_rows_host(dt, delta)?;
            let y = xs; // the conv has read xs: the scan writes its (b, L, d_inner) there
            state.ssm = selective_scan_token_major_into(
                &ScanDims {
                    batch,
                    dim: di,
                    len,
                    state: n,
                    bc: BcForm::Varying { groups: 1 },
                },
                &ScanInputs {
                    u: xc,
                    delta,
                    a: &p.a,
                    b,
                    c,
                    d: Some(&p.d),
                    z: Some(z),
                    delta_bias: Some(&p.dt_bias),
                    delta_softplus: true,
                    initial_state: Some(&state.ssm),
                },
                y,
            )?;
            self.out_proj.forward_rows_host(y, out)
        })
    }

    /// The fused one-token step on host slices, `x, out: (b, hidden)`:
    ///
    /// ```text
    /// [xs | z] = x W_in^T;  xc = silu(conv window . [state | xs]);  [dt | B | C] = xc W_x^T
    /// Δ = dt W_dt^T;  h = exp(Δ A) h + Δ B xc;  y = (C . h + D xc) silu(z);  out = y W_out^T
    /// ```
    ///
    /// with every intermediate in one per-thread scratch buffer.
    fn step_host(
        &self,
        x: &[f32],
        batch: usize,
        state: &mut LayerState,
        out: &mut [f32],
    ) -> Result<()> {
        let (di, n, r) = (self.d_inner, self.state_size, self.dt_rank);
        let p = &self.decode;
        let lens = [2 * di, di, di, di, r + 2 * n, r, n, n, di, di].map(|l| l * batch);
        with_split_scratch(
            &STEP_SCRATCH,
            lens,
            |[xz, xs, z, xc, dbc, dt, b, c, delta, y]| {
                self.in_proj.forward_step_host(x, xz)?; // (b, 2 d_inner)
                copy_columns(xz, 2 * di, 0, di, xs);
                copy_columns(xz, 2 * di, di, di, z);
                conv_step_silu_host(
                    &mut state.conv,
                    xs,
                    (&p.conv_weight, p.conv_bias.as_deref()),
                    (batch, self.conv_kernel),
                    xc,
                )?;
                self.x_proj.forward_step_host(xc, dbc)?; // (b, dt_rank + 2N)
                copy_columns(dbc, r + 2 * n, 0, r, dt);
                copy_columns(dbc, r + 2 * n, r, n, b);
                copy_columns(dbc, r + 2 * n, r + n, n, c);
                self.dt_bc_norms.apply_host([dt, b, c], batch)?;
                self.dt_proj.forward_step_host(dt, delta)?; // (b, d_inner), bias added below
                let step_dims = StepDims::mamba1(batch, di, n);
                let inputs = StepInputs {
                    x: xc,
                    dt: delta,
                    a: &p.a,
                    b,
                    c,
                    d: Some(&p.d),
                    z: Some(z),
                    dt_bias: Some(&p.dt_bias),
                    dt_softplus: true,
                    dt_limit: NO_DT_LIMIT,
                };
                step_dims.check(&state.ssm, &inputs)?;
                selective_state_update_into(&step_dims, &mut state.ssm, &inputs, y);
                self.out_proj.forward_step_host(y, out)
            },
        )
    }
}

thread_local! {
    /// The intermediates of [`MambaMixer::step_host`].
    static STEP_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

impl MambaMixer {
    /// [`Mixer::step`] with the state kept on the model's (CUDA) device: the conv and SSM
    /// updates run there, and nothing is copied to the host.
    fn step_on_device(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let (di, n, w) = (self.d_inner, self.state_size, self.conv_kernel);
        let (conv_state, ssm_state) =
            state.recurrent_tensors(&[batch, di, w - 1], &[batch, di, n], x.device())?;
        let xz = self.in_proj.forward(x)?; // (b, 2 d_inner)
        let (xc, conv_state) = mamba_ops::tensor::causal_conv1d_update(
            &conv_state,
            &columns(&xz, 0, di)?,
            &self.conv_weight,
            self.conv_bias.as_ref(),
            true,
        )?; // (b, d_inner)
        let (delta, b, c) = self.project_dt_b_c(&xc)?;
        let z = columns(&xz, di, di)?;
        let (y, ssm_state) = mamba_ops::tensor::selective_state_update(
            &ssm_state,
            &xc,
            &delta,
            &self.decode.a_tensor,
            &b,
            &c,
            StepOptions {
                d: Some(&self.d),
                z: Some(&z),
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: NO_DT_LIMIT,
            },
        )?;
        state.set_recurrent(&conv_state, &ssm_state)?;
        self.out_proj.forward(&y)
    }
}
