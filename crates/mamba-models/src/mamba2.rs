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
use crate::layers::{
    columns, conv_step_silu_host, copy_columns, f32_vec, load_f32, swap_time_channels,
    with_bounded_split_scratch, with_split_scratch, Linear, PIECE_SCRATCH,
};
use crate::model::{step_through_host, Mixer};
use crate::state::{LayerState, StateSize};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use mamba_ops::causal_conv1d::{causal_conv1d_token_major_into, ConvDims, ConvInputs};
use mamba_ops::gemm::Products;
use mamba_ops::rmsnorm_gated::{rmsnorm_gated_in_place, NormDims};
use mamba_ops::selective_state_update::{selective_state_update_into, StepDims, StepInputs};
use mamba_ops::ssd::{SsdDims, SsdInputs};
use mamba_ops::tensor::{causal_conv1d, rmsnorm_gated, ssd, SsdOptions, StepOptions};
use std::cell::Cell;

/// The SSD mixer of one layer.
#[derive(Debug, Clone)]
pub struct Mamba2Mixer {
    in_proj: Linear,
    /// `(conv_dim, W)`.
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    dt_bias: Tensor,
    /// `(H)`; `A = -exp(A_log)`, one per head.
    a_log: Tensor,
    d: Tensor,
    norm_weight: Tensor,
    out_proj: Linear,
    /// The small parameters as vectors for the one-token path, taken at load time.
    decode: DecodeParams,
    cfg: Mamba2Config,
}

/// Conv weights, A, D, the dt bias and the norm weight as plain vectors for decoding.
/// Training updates the tensors only, so decode from a model built after training.
#[derive(Debug, Clone)]
struct DecodeParams {
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    a: Vec<f32>,
    d: Vec<f32>,
    dt_bias: Vec<f32>,
    norm_weight: Vec<f32>,
    /// `A = -exp(A_log)` as a tensor on the model's device, for the device step.
    a_tensor: Tensor,
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
        let conv_weight =
            load_f32(vb, "conv1d.weight", &[conv_dim, 1, w])?.reshape((conv_dim, w))?;
        let conv_bias = cfg
            .use_conv_bias
            .then(|| load_f32(vb, "conv1d.bias", &[conv_dim]))
            .transpose()?;
        let dt_bias = load_f32(vb, "dt_bias", &[nh])?;
        let a_log = load_f32(vb, "A_log", &[nh])?;
        let d = load_f32(vb, "D", &[nh])?;
        let norm_weight = load_f32(vb, "norm.weight", &[di])?;
        let decode = DecodeParams {
            conv_weight: f32_vec(&conv_weight)?,
            conv_bias: conv_bias.as_ref().map(f32_vec).transpose()?,
            a: f32_vec(&a_log)?.iter().map(|v| -v.exp()).collect(),
            d: f32_vec(&d)?,
            dt_bias: f32_vec(&dt_bias)?,
            norm_weight: f32_vec(&norm_weight)?,
            a_tensor: a_log.exp()?.neg()?.detach(),
        };
        Ok(Mamba2Mixer {
            in_proj: Linear::load(vb, "in_proj", (in_features, hid), cfg.use_bias)?,
            conv_weight,
            conv_bias,
            dt_bias,
            a_log,
            d,
            norm_weight,
            out_proj: Linear::load(vb, "out_proj", (hid, di), cfg.use_bias)?,
            decode,
            cfg: cfg.clone(),
        })
    }

    fn dt_limit(&self) -> (f32, f32) {
        (
            self.cfg.time_step_limit.0 as f32,
            self.cfg.time_step_limit.1 as f32,
        )
    }

    fn norm_group_size(&self) -> usize {
        self.cfg.d_inner() / self.cfg.n_groups
    }
}

impl Mixer for Mamba2Mixer {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.in_proj, &mut self.out_proj]
    }

    #[cfg(feature = "cuda")]
    fn fused_decode_weights(&self) -> Option<crate::cuda_decode::MixerWeights<'_>> {
        let c = &self.cfg;
        Some(crate::cuda_decode::MixerWeights::Mamba2 {
            in_proj: &self.in_proj,
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            dt_bias: &self.dt_bias,
            a: &self.decode.a_tensor,
            d: &self.d,
            norm_weight: &self.norm_weight,
            out_proj: &self.out_proj,
            heads: c.num_heads,
            head_dim: c.head_dim,
            groups: c.n_groups,
            state_size: c.state_size,
            conv_kernel: c.conv_kernel,
            dt_limit: self.dt_limit(),
            norm_eps: c.layer_norm_epsilon as f32,
            norm_before_gate: c.norm_before_gate,
        })
    }

    /// Per-sequence state sizes: `(conv_dim, W-1)` conv window and `(H, P, N)` SSM state.
    fn state_size(&self) -> StateSize {
        let c = &self.cfg;
        StateSize::Recurrent {
            conv: c.conv_dim() * (c.conv_kernel - 1),
            ssm: c.num_heads * c.head_dim * c.state_size,
        }
    }

    /// Whole-sequence forward of `x: (b, L, hidden)` from `state`, which it advances.
    /// Differentiable with respect to every weight.
    fn forward(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let c = &self.cfg;
        let (batch, len, _) = x.dims3()?;
        let (di, conv_dim, nh, p) = (c.d_inner(), c.conv_dim(), c.num_heads, c.head_dim);
        let (g, n) = (c.n_groups, c.state_size);
        let zxbcdt = self.in_proj.forward(x)?; // (b, L, 2 d_inner + 2GN + H)
        let z = columns(&zxbcdt, 0, di)?; // (b, L, d_inner)
        let xbc = swap_time_channels(&columns(&zxbcdt, di, conv_dim)?)?; // (b, conv_dim, L)
        let dt = columns(&zxbcdt, di + conv_dim, nh)?; // (b, L, H)
        let (conv_state, ssm_state) = state.recurrent_tensors(
            &[batch, conv_dim, c.conv_kernel - 1],
            &[batch, nh, p, n],
            x.device(),
        )?;
        let (xbc, conv_final) = causal_conv1d(
            &xbc,
            &self.conv_weight,
            self.conv_bias.as_ref(),
            Some(&conv_state),
            true,
        )?;
        let xbc = swap_time_channels(&xbc)?; // (b, L, conv_dim)
        let xs = columns(&xbc, 0, di)?.reshape((batch, len, nh, p))?;
        let b = columns(&xbc, di, g * n)?.reshape((batch, len, g, n))?;
        let cm = columns(&xbc, di + g * n, g * n)?.reshape((batch, len, g, n))?;
        let a = self.a_log.exp()?.neg()?;
        let (y, final_state) = ssd(
            &xs,
            &dt,
            &a,
            &b,
            &cm,
            SsdOptions {
                d: Some(&self.d),
                z: None,
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: self.dt_limit(),
                initial_states: Some(&ssm_state),
                chunk_size: c.chunk_size,
            },
        )?;
        state.set_recurrent(&conv_final, &final_state)?;
        let y = rmsnorm_gated(
            &y.reshape((batch, len, di))?,
            &self.norm_weight,
            Some(&z),
            self.norm_group_size(),
            c.layer_norm_epsilon as f32,
            c.norm_before_gate,
        )?;
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
    /// the token-major conv and the SSD op on slices (no transposes, no gradient
    /// bookkeeping).
    fn forward_host(
        &self,
        x: &[f32],
        (batch, len): (usize, usize),
        state: &mut LayerState,
        out: &mut [f32],
    ) -> Result<()> {
        let (c, pr) = (&self.cfg, &self.decode);
        let InProjWidths {
            d_inner: di,
            conv_dim,
            heads: nh,
            ..
        } = self.in_proj_widths();
        let rows = batch * len;
        let lens = self.piece_widths().map(|l| l * rows);
        with_bounded_split_scratch(&PIECE_SCRATCH, lens, |[z, xbc, dt, xs, b, cm, y]| {
            self.in_proj
                .forward_rows_host_parts(x, &mut [&mut *z, &mut *xbc, &mut *dt])?;
            // xs, B and C: the conv's output channels.
            let conv_final = causal_conv1d_token_major_into(
                &ConvDims {
                    batch,
                    dim: conv_dim,
                    len,
                    width: c.conv_kernel,
                },
                &ConvInputs {
                    x: xbc,
                    weight: &pr.conv_weight,
                    bias: pr.conv_bias.as_deref(),
                    initial_states: Some(&state.conv),
                    silu: true,
                },
                &mut [&mut *xs, &mut *b, &mut *cm],
            )?;
            let final_state = mamba_ops::ssd::ssd_into(
                &SsdDims {
                    batch,
                    len,
                    heads: nh,
                    head_dim: c.head_dim,
                    groups: c.n_groups,
                    state: c.state_size,
                    chunk_size: c.chunk_size.min(HOST_CHUNK_SIZE),
                },
                &self.ssd_inputs([xs, dt, b, cm], Some(&state.ssm)),
                self.ssd_products(),
                y,
            )?; // y: (b, L, d_inner)
            let norm_dims = NormDims {
                rows,
                hidden: di,
                group_size: self.norm_group_size(),
                eps: c.layer_norm_epsilon as f32,
                norm_before_gate: c.norm_before_gate,
            };
            rmsnorm_gated_in_place(&norm_dims, y, &pr.norm_weight, Some(z))?;
            state.conv = conv_final;
            state.ssm = final_state;
            self.out_proj.forward_rows_host(y, out)
        })
    }

    /// The fused one-token step on host slices, `x, out: (b, hidden)`:
    ///
    /// ```text
    /// [z | xBC | dt] = x W_in^T;  [xs | B | C] = silu(conv window . [state | xBC])
    /// h = exp(Δ A) h + Δ B xs (per head);  y = C . h + D xs
    /// out = RMSNorm(y, gate z) W_out^T
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
        let (c, pr) = (&self.cfg, &self.decode);
        let InProjWidths {
            d_inner: di,
            conv_dim,
            heads: nh,
            group_states: gn,
            total: width,
        } = self.in_proj_widths();
        let lens = [width, di, conv_dim, nh, conv_dim, di, gn, gn, di].map(|l| l * batch);
        with_split_scratch(
            &STEP_SCRATCH,
            lens,
            |[zxbcdt, z, xbc, dt, xbc_conv, xs, b, cm, y]| {
                self.in_proj.forward_step_host(x, zxbcdt)?; // (b, 2 d_inner + 2GN + H)
                copy_columns(zxbcdt, width, 0, di, z);
                copy_columns(zxbcdt, width, di, conv_dim, xbc);
                copy_columns(zxbcdt, width, di + conv_dim, nh, dt);
                conv_step_silu_host(
                    &mut state.conv,
                    xbc,
                    (&pr.conv_weight, pr.conv_bias.as_deref()),
                    (batch, c.conv_kernel),
                    xbc_conv,
                )?;
                copy_columns(xbc_conv, conv_dim, 0, di, xs);
                copy_columns(xbc_conv, conv_dim, di, gn, b);
                copy_columns(xbc_conv, conv_dim, di + gn, gn, cm);
                let step_dims = StepDims {
                    batch,
                    heads: nh,
                    head_dim: c.head_dim,
                    state: c.state_size,
                    groups: c.n_groups,
                    per_head: true,
                };
                let inputs = StepInputs::from(&self.ssd_inputs([xs, dt, b, cm], None));
                step_dims.check(&state.ssm, &inputs)?;
                selective_state_update_into(&step_dims, &mut state.ssm, &inputs, y);
                let norm_dims = NormDims {
                    rows: batch,
                    hidden: di,
                    group_size: self.norm_group_size(),
                    eps: c.layer_norm_epsilon as f32,
                    norm_before_gate: c.norm_before_gate,
                };
                rmsnorm_gated_in_place(&norm_dims, y, &pr.norm_weight, Some(z))?;
                self.out_proj.forward_step_host(y, out)
            },
        )
    }
}

thread_local! {
    /// The intermediates of [`Mamba2Mixer::step_host`].
    static STEP_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The longest SSD chunk of the CPU inference path: the chunk length only changes the
/// rounding, and on this project's CPU 128 prefilled mamba2-130m about 8 % faster than the
/// 256 of the Hugging Face configs (1 thread, 2048 tokens).
const HOST_CHUNK_SIZE: usize = 128;

/// The parts of `in_proj`'s output `[z | xBC | dt]`: `z` is `d_inner` wide, `xBC`
/// `conv_dim = d_inner + 2 group_states`, `dt` one per head.
struct InProjWidths {
    d_inner: usize,
    conv_dim: usize,
    heads: usize,
    group_states: usize,
    total: usize,
}

impl Mamba2Mixer {
    /// The SSD's inputs: this layer's parameters with `[x, dt, B, C]` (token-major) and the
    /// states to start from.
    fn ssd_inputs<'a>(
        &'a self,
        [x, dt, b, c]: [&'a [f32]; 4],
        initial_states: Option<&'a [f32]>,
    ) -> SsdInputs<'a> {
        let pr = &self.decode;
        SsdInputs {
            x,
            dt,
            a: &pr.a,
            b,
            c,
            d: Some(&pr.d),
            z: None,
            dt_bias: Some(&pr.dt_bias),
            dt_softplus: true,
            dt_limit: self.dt_limit(),
            initial_states,
        }
    }

    /// The precision of the SSD's chunk products in a prefill: f32 in a model of f32 weights,
    /// else bf16, as mamba_ssm runs a bf16 model (its chunked kernels multiply the bf16
    /// activations); the projections of bf16 and quantised weights already round their
    /// activations to bf16 or 8 bits.
    fn ssd_products(&self) -> Products {
        match self.in_proj.dense_weight() {
            Some(w) if w.dtype() == DType::F32 => Products::F32,
            _ => Products::Bf16,
        }
    }

    /// Per token, the widths of [`Mixer::forward_host`]'s intermediates in the piece
    /// scratch: z (d_inner), xBC (d_inner + 2GN), dt (H), then the conv's output cut into xs
    /// (d_inner), B and C (GN), then the SSD's y (d_inner); every value written before it is
    /// read.
    fn piece_widths(&self) -> [usize; 7] {
        let w = self.in_proj_widths();
        let (di, gn) = (w.d_inner, w.group_states);
        [di, w.conv_dim, w.heads, di, gn, gn, di]
    }

    fn in_proj_widths(&self) -> InProjWidths {
        let c = &self.cfg;
        let (d_inner, heads) = (c.d_inner(), c.num_heads);
        let group_states = c.n_groups * c.state_size;
        InProjWidths {
            d_inner,
            conv_dim: c.conv_dim(),
            heads,
            group_states,
            total: 2 * d_inner + 2 * group_states + heads,
        }
    }

    /// [`Mixer::step`] with the state kept on the model's (CUDA) device: the conv, SSM and
    /// gated-norm updates run there, and nothing is copied to the host.
    fn step_on_device(&self, x: &Tensor, state: &mut LayerState) -> Result<Tensor> {
        let c = &self.cfg;
        let batch = x.dim(0)?;
        let (di, conv_dim, nh, p) = (c.d_inner(), c.conv_dim(), c.num_heads, c.head_dim);
        let (g, n) = (c.n_groups, c.state_size);
        let (conv_state, ssm_state) = state.recurrent_tensors(
            &[batch, conv_dim, c.conv_kernel - 1],
            &[batch, nh, p, n],
            x.device(),
        )?;
        let zxbcdt = self.in_proj.forward(x)?; // (b, 2 d_inner + 2GN + H)
        let z = columns(&zxbcdt, 0, di)?;
        let dt = columns(&zxbcdt, di + conv_dim, nh)?; // (b, H)
        let (xbc, conv_state) = mamba_ops::tensor::causal_conv1d_update(
            &conv_state,
            &columns(&zxbcdt, di, conv_dim)?,
            &self.conv_weight,
            self.conv_bias.as_ref(),
            true,
        )?; // (b, conv_dim)
        let xs = columns(&xbc, 0, di)?.reshape((batch, nh, p))?;
        let b = columns(&xbc, di, g * n)?.reshape((batch, g, n))?;
        let cm = columns(&xbc, di + g * n, g * n)?.reshape((batch, g, n))?;
        let (y, ssm_state) = mamba_ops::tensor::selective_state_update(
            &ssm_state,
            &xs,
            &dt,
            &self.decode.a_tensor,
            &b,
            &cm,
            StepOptions {
                d: Some(&self.d),
                z: None,
                dt_bias: Some(&self.dt_bias),
                dt_softplus: true,
                dt_limit: self.dt_limit(),
            },
        )?;
        state.set_recurrent(&conv_state, &ssm_state)?;
        let y = rmsnorm_gated(
            &y.reshape((batch, di))?,
            &self.norm_weight,
            Some(&z),
            self.norm_group_size(),
            c.layer_norm_epsilon as f32,
            c.norm_before_gate,
        )?;
        self.out_proj.forward(&y)
    }
}
