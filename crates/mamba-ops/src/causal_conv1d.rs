//! Depthwise causal convolution over time, and its one-step (decoding) update.
//!
//! With `xx = concat(initial_states, x)` along time (`W-1 + L` columns):
//!
//! ```text
//! out[b,d,t] = act(bias[d] + sum_{k<W} weight[d,k] * xx[b,d,t+k])
//! ```
//!
//! so `weight[d, W-1]` multiplies the current input. `final_states` are the last `W-1`
//! columns of `xx`: the window that decoding continues from. Layouts follow
//! `causal_conv1d_fn`: `x: (batch, dim, L)`, `weight: (dim, W)`, `bias: (dim)`,
//! `initial_states, final_states: (batch, dim, W-1)`.

use crate::error::{OpError, Result};
use crate::math::{dot, silu, silu_fast, silu_grad_fast, with_simd};
use crate::selective_scan::{narrow, split_optional_rows, split_rows};
use rayon::prelude::*;

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
}

/// Inputs of the convolution (contiguous f32).
#[derive(Debug, Clone, Copy)]
pub struct ConvInputs<'a> {
    pub x: &'a [f32],
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub initial_states: Option<&'a [f32]>,
    pub silu: bool,
}

/// `out: (batch, dim, L)` and `final_states: (batch, dim, W-1)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvOutput {
    pub out: Vec<f32>,
    pub final_states: Vec<f32>,
}

fn shape_err(op: &'static str, msg: String) -> OpError {
    OpError::Shape { op, msg }
}

fn expect_len(op: &'static str, name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{name} has {got} elements, expected {want}"),
        ))
    }
}

impl ConvDims {
    /// Checks every input length against these sizes.
    pub fn check(&self, x: &ConvInputs) -> Result<()> {
        const OP: &str = "causal_conv1d";
        if self.width == 0 {
            return Err(shape_err(OP, "width must be at least 1".into()));
        }
        let rows = self.batch * self.dim;
        expect_len(OP, "x", x.x.len(), rows * self.len)?;
        expect_len(OP, "weight", x.weight.len(), self.dim * self.width)?;
        if let Some(bias) = x.bias {
            expect_len(OP, "bias", bias.len(), self.dim)?;
        }
        if let Some(init) = x.initial_states {
            expect_len(OP, "initial_states", init.len(), rows * (self.width - 1))?;
        }
        Ok(())
    }
}

/// The convolution written like its definition: build `xx`, slide the window.
pub fn causal_conv1d_reference(dims: &ConvDims, x: &ConvInputs) -> Result<ConvOutput> {
    dims.check(x)?;
    let (nd, nl, w) = (dims.dim, dims.len, dims.width);
    let rows = dims.batch * nd;
    let mut out = vec![0.0; rows * nl];
    let mut final_states = vec![0.0; rows * (w - 1)];
    for row in 0..rows {
        let d = row % nd;
        let mut xx: Vec<f32> = match x.initial_states {
            Some(init) => init[row * (w - 1)..][..w - 1].to_vec(),
            None => vec![0.0; w - 1],
        };
        xx.extend_from_slice(&x.x[row * nl..][..nl]);
        for t in 0..nl {
            let mut acc = x.bias.map_or(0.0, |b| b[d]);
            for k in 0..w {
                acc += x.weight[d * w + k] * xx[t + k];
            }
            out[row * nl + t] = if x.silu { silu(acc) } else { acc };
        }
        final_states[row * (w - 1)..][..w - 1].copy_from_slice(&xx[xx.len() - (w - 1)..]);
    }
    Ok(ConvOutput { out, final_states })
}

/// The fast convolution: threaded over batch x channels; each channel's window is
/// kept in registers while it slides along the row.
pub fn causal_conv1d(dims: &ConvDims, x: &ConvInputs) -> Result<ConvOutput> {
    dims.check(x)?;
    let (nd, nl, w) = (dims.dim, dims.len, dims.width);
    let rows = dims.batch * nd;
    let mut out = vec![0.0; rows * nl];
    let mut final_states = vec![0.0; rows * (w - 1)];
    out.par_chunks_mut(nl.max(1))
        .zip(final_states.par_chunks_mut((w - 1).max(1)))
        .enumerate()
        .for_each(|(row, (out_row, final_row))| {
            let d = row % nd;
            let history = x.initial_states.map(|s| &s[row * (w - 1)..][..w - 1]);
            let weight = &x.weight[d * w..][..w];
            let bias = x.bias.map_or(0.0, |b| b[d]);
            let input = &x.x[row * nl..][..nl];
            conv_row(input, history, weight, bias, x.silu, &mut out_row[..nl]);
            if w > 1 {
                last_window(history, input, final_row);
            }
        });
    Ok(ConvOutput { out, final_states })
}

/// Positions per task of [`causal_conv1d_token_major`].
const POSITIONS_PER_TASK: usize = 64;

/// The fast convolution for inputs laid out token-major, as a model's projections give
/// them: `x, out: (batch, L, dim)`, with `initial_states` and `final_states` in the usual
/// `(batch, dim, W-1)`. Same sums as [`causal_conv1d`], without transposing the input
/// and the output: each output row reads `W` input rows, so blocks of positions run in
/// parallel and the inner loop runs over contiguous channels (vectorised).
pub fn causal_conv1d_token_major(dims: &ConvDims, x: &ConvInputs) -> Result<ConvOutput> {
    let mut out = vec![0.0; dims.batch * dims.len * dims.dim];
    let final_states = causal_conv1d_token_major_into(dims, x, &mut [&mut out])?;
    Ok(ConvOutput { out, final_states })
}

/// [`causal_conv1d_token_major`] with the output's channels cut into consecutive parts, each
/// its own contiguous `(batch, L, width)` buffer (the widths add up to `dim`; every value
/// overwritten), as a mixer splits them (Mamba-2's x, B and C): no whole output is made and
/// copied from. Returns the final states `(batch, dim, W-1)`.
pub fn causal_conv1d_token_major_into(
    dims: &ConvDims,
    x: &ConvInputs,
    parts: &mut [&mut [f32]],
) -> Result<Vec<f32>> {
    dims.check(x)?;
    let (nb, nd, nl, w) = (dims.batch, dims.dim, dims.len, dims.width);
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / (nb * nl).max(1)).collect();
    if widths.iter().sum::<usize>() != nd
        || parts
            .iter()
            .zip(&widths)
            .any(|(p, w)| p.len() != w * nb * nl)
    {
        return Err(shape_err(
            "causal_conv1d",
            format!(
                "output parts do not split {nd} channels over {} rows",
                nb * nl
            ),
        ));
    }
    let s = w - 1;
    // Tap k of every channel side by side: (W, dim).
    let taps: Vec<f32> = (0..w)
        .flat_map(|k| (0..nd).map(move |d| x.weight[d * w + k]))
        .collect();
    // The inputs before position 0, token-major: (batch, W-1, dim).
    let history: Vec<f32> = (0..nb * s * nd)
        .map(|i| {
            let (b, j, d) = (i / (s * nd), i / nd % s, i % nd);
            x.initial_states.map_or(0.0, |h| h[(b * nd + d) * s + j])
        })
        .collect();
    // Row `t` (negative: from the history) of sequence `b`.
    let input_row = |b: usize, t: isize| -> &[f32] {
        if t >= 0 {
            &x.x[(b * nl + t as usize) * nd..][..nd]
        } else {
            &history[(b * s + (s as isize + t) as usize) * nd..][..nd]
        }
    };
    // Each task's rows of every part: tasks[task][part].
    let mut tasks: Vec<Vec<&mut [f32]>> = Vec::new();
    for (part, width) in parts.iter_mut().zip(&widths) {
        for (task, rows) in part.chunks_mut(POSITIONS_PER_TASK * width).enumerate() {
            if tasks.len() == task {
                tasks.push(Vec::with_capacity(widths.len()));
            }
            tasks[task].push(rows);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut rows)| {
            // A row of every channel, cut into the parts after (none needed for one part).
            let single = rows.len() == 1;
            let mut row_buf = vec![0.0; if single { 0 } else { nd }];
            let mut window: Vec<&[f32]> = Vec::with_capacity(w);
            with_simd(
                #[inline(always)]
                || {
                    for r in 0..POSITIONS_PER_TASK.min(nb * nl - task * POSITIONS_PER_TASK) {
                        let row = task * POSITIONS_PER_TASK + r;
                        let (b, t) = (row / nl, (row % nl) as isize);
                        let out_row = match rows.as_mut_slice() {
                            [whole] => &mut whole[r * nd..][..nd],
                            _ => &mut row_buf[..],
                        };
                        window.clear();
                        window.extend((0..w).map(|k| input_row(b, t + k as isize - s as isize)));
                        convolve_row(&taps, x.bias, &window, x.silu, out_row);
                        if single {
                            continue;
                        }
                        let mut channels = row_buf.as_slice();
                        for (part_rows, width) in rows.iter_mut().zip(&widths) {
                            let (these, rest) = channels.split_at(*width);
                            part_rows[r * width..][..*width].copy_from_slice(these);
                            channels = rest;
                        }
                    }
                },
            )
        });
    let mut final_states = vec![0.0; nb * nd * s];
    for (i, v) in final_states.iter_mut().enumerate() {
        let (b, d, j) = (i / (nd * s), i / s % nd, i % s);
        *v = input_row(b, nl as isize - s as isize + j as isize)[d];
    }
    Ok(final_states)
}

/// One output row of the token-major conv, `out = act(bias + sum_k taps[k] * window[k])`
/// channel by channel (`taps: (W, dim)`, `window`: the W input rows it reaches, oldest
/// first), sixteen channels at a time summed in registers and stored once: adding each tap
/// into the row in memory took a load and a store per tap and channel, and the conv ran at
/// 0.9 ns per value on one thread (1536 channels x 2048 positions).
#[inline(always)]
fn convolve_row(taps: &[f32], bias: Option<&[f32]>, window: &[&[f32]], act: bool, out: &mut [f32]) {
    const LANES: usize = 16;
    let nd = out.len();
    let value = |c: usize, acc: f32| {
        let v = window
            .iter()
            .enumerate()
            .fold(acc, |acc, (k, row)| taps[k * nd + c].mul_add(row[c], acc));
        if act {
            silu_fast(v)
        } else {
            v
        }
    };
    let whole = nd / LANES * LANES;
    for (j, out_lanes) in out[..whole].chunks_exact_mut(LANES).enumerate() {
        let c0 = j * LANES;
        let mut acc: [f32; LANES] = match bias {
            Some(bias) => bias[c0..c0 + LANES].try_into().expect("LANES"),
            None => [0.0; LANES],
        };
        for (k, row) in window.iter().enumerate() {
            let tap: &[f32; LANES] = taps[k * nd + c0..][..LANES].try_into().expect("LANES");
            let v: &[f32; LANES] = row[c0..c0 + LANES].try_into().expect("LANES");
            for l in 0..LANES {
                acc[l] = tap[l].mul_add(v[l], acc[l]);
            }
        }
        if act {
            acc.iter_mut().for_each(|v| *v = silu_fast(*v));
        }
        out_lanes.copy_from_slice(&acc);
    }
    for (c, o) in out.iter_mut().enumerate().skip(whole) {
        *o = value(c, bias.map_or(0.0, |b| b[c]));
    }
}

/// Convolves one channel: `out[t] = bias + sum_k weight[k] * xx[t+k]`.
fn conv_row(
    input: &[f32],
    history: Option<&[f32]>,
    weight: &[f32],
    bias: f32,
    act: bool,
    out: &mut [f32],
) {
    let w = weight.len();
    // Input at position `t + k - (W-1)`, reaching into the history for negative ones.
    let at = |i: isize| -> f32 {
        if i >= 0 {
            input[i as usize]
        } else {
            history.map_or(0.0, |h| h[(h.len() as isize + i) as usize])
        }
    };
    let warm = (w - 1).min(input.len());
    for (t, o) in out.iter_mut().enumerate().take(warm) {
        let mut acc = bias;
        for (k, wk) in weight.iter().enumerate() {
            acc += wk * at(t as isize + k as isize - (w as isize - 1));
        }
        *o = if act { silu(acc) } else { acc };
    }
    for (t, o) in out.iter_mut().enumerate().skip(warm) {
        let window = &input[t + 1 - w..=t];
        let acc = bias + window.iter().zip(weight).map(|(a, b)| a * b).sum::<f32>();
        *o = if act { silu(acc) } else { acc };
    }
}

/// The last `W-1` values of `concat(history, input)` (zeros where both run out).
fn last_window(history: Option<&[f32]>, input: &[f32], dst: &mut [f32]) {
    let keep = dst.len();
    let from_input = keep.min(input.len());
    let from_history = keep - from_input;
    dst[from_history..].copy_from_slice(&input[input.len() - from_input..]);
    match history {
        Some(h) => dst[..from_history].copy_from_slice(&h[h.len() - from_history..]),
        None => dst[..from_history].fill(0.0),
    }
}

/// Sizes of a decoding update: `state_len >= W-1` past inputs per channel, `steps` new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvUpdateDims {
    pub batch: usize,
    pub dim: usize,
    pub width: usize,
    pub state_len: usize,
    pub steps: usize,
}

/// Inputs of a decoding update: `x: (batch, dim, steps)`.
#[derive(Debug, Clone, Copy)]
pub struct ConvUpdateInputs<'a> {
    pub x: &'a [f32],
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub silu: bool,
}

impl ConvUpdateDims {
    /// Checks the state and every input length against these sizes.
    pub fn check(&self, state: &[f32], x: &ConvUpdateInputs) -> Result<()> {
        const OP: &str = "causal_conv1d_update";
        if self.width == 0 || self.state_len + 1 < self.width {
            return Err(shape_err(
                OP,
                format!(
                    "state_len {} must be at least width-1 = {}",
                    self.state_len,
                    self.width.max(1) - 1
                ),
            ));
        }
        let rows = self.batch * self.dim;
        expect_len(OP, "conv_state", state.len(), rows * self.state_len)?;
        expect_len(OP, "x", x.x.len(), rows * self.steps)?;
        expect_len(OP, "weight", x.weight.len(), self.dim * self.width)?;
        if let Some(bias) = x.bias {
            expect_len(OP, "bias", bias.len(), self.dim)?;
        }
        Ok(())
    }
}

/// The update written like its definition: `win = concat(state, x)`; each new position
/// convolves the `W` values ending at it; the state becomes the last `state_len` of `win`.
/// Returns `out: (batch, dim, steps)` and updates `state: (batch, dim, state_len)` in place.
pub fn causal_conv1d_update_reference(
    dims: &ConvUpdateDims,
    state: &mut [f32],
    x: &ConvUpdateInputs,
) -> Result<Vec<f32>> {
    dims.check(state, x)?;
    let (nd, w, s, steps) = (dims.dim, dims.width, dims.state_len, dims.steps);
    let mut out = vec![0.0; dims.batch * nd * steps];
    for row in 0..dims.batch * nd {
        let d = row % nd;
        let mut win = state[row * s..][..s].to_vec();
        win.extend_from_slice(&x.x[row * steps..][..steps]);
        for t in 0..steps {
            let mut acc = x.bias.map_or(0.0, |b| b[d]);
            for k in 0..w {
                acc += x.weight[d * w + k] * win[s + t + 1 - w + k];
            }
            out[row * steps + t] = if x.silu { silu(acc) } else { acc };
        }
        state[row * s..][..s].copy_from_slice(&win[win.len() - s..]);
    }
    Ok(out)
}

/// The fast update: per channel, shift the window in place and take one dot product per
/// new input. No allocation per channel.
pub fn causal_conv1d_update(
    dims: &ConvUpdateDims,
    state: &mut [f32],
    x: &ConvUpdateInputs,
) -> Result<Vec<f32>> {
    dims.check(state, x)?;
    let mut out = vec![0.0; dims.batch * dims.dim * dims.steps];
    causal_conv1d_update_into(dims, state, x, &mut out);
    Ok(out)
}

/// [`causal_conv1d_update`] writing into a caller's buffer (shapes already checked).
pub fn causal_conv1d_update_into(
    dims: &ConvUpdateDims,
    state: &mut [f32],
    x: &ConvUpdateInputs,
    out: &mut [f32],
) {
    let (nd, w, s, steps) = (dims.dim, dims.width, dims.state_len, dims.steps);
    if steps == 1 && w == 4 && s == 3 {
        return with_simd(
            #[inline(always)]
            || one_step_width4(nd, state, x, out),
        );
    }
    with_simd(
        #[inline(always)]
        || {
            for (row, (st, o)) in state.chunks_mut(s).zip(out.chunks_mut(steps)).enumerate() {
                let d = row % nd;
                let weight = &x.weight[d * w..][..w];
                let bias = x.bias.map_or(0.0, |b| b[d]);
                for (t, o_t) in o.iter_mut().enumerate() {
                    let new = x.x[row * steps + t];
                    // The window is the last W-1 state entries followed by the new input.
                    let past = &st[s + 1 - w..];
                    *o_t = bias
                        + past.iter().zip(weight).map(|(a, b)| a * b).sum::<f32>()
                        + weight[w - 1] * new;
                    if s > 0 {
                        for i in 1..s {
                            st[i - 1] = st[i];
                        }
                        st[s - 1] = new;
                    }
                }
            }
            // The activation as a pass of its own over every output, so that it vectorises.
            if x.silu {
                for o in out.iter_mut() {
                    *o = silu_fast(*o);
                }
            }
        },
    )
}

/// [`causal_conv1d_update_into`] for one new input per channel, width 4 and a state of
/// the last 3 inputs (the models' usual shape): fixed-size rows, so that the channels
/// vectorise side by side (the generic loop took 9.2 ns per channel).
#[inline(always)]
fn one_step_width4(nd: usize, state: &mut [f32], x: &ConvUpdateInputs, out: &mut [f32]) {
    for ((st, o), xs) in state
        .chunks_mut(nd * 3)
        .zip(out.chunks_mut(nd))
        .zip(x.x.chunks(nd))
    {
        let rows = st.chunks_exact_mut(3).zip(x.weight.chunks_exact(4));
        for (c, ((st, w), (o, &new))) in rows.zip(o.iter_mut().zip(xs)).enumerate() {
            let bias = x.bias.map_or(0.0, |b| b[c]);
            // Summed in the generic loop's order, so the two give the same bits.
            let past = w[0] * st[0] + w[1] * st[1] + w[2] * st[2];
            *o = bias + past + w[3] * new;
            st[0] = st[1];
            st[1] = st[2];
            st[2] = new;
        }
    }
    if x.silu {
        for o in out.iter_mut() {
            *o = silu_fast(*o);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

/// Gradients of a scalar loss with respect to the convolution's inputs, in their layouts.
/// `bias` and `initial_states` are `Some` exactly when the input was given.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGrads {
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub initial_states: Option<Vec<f32>>,
}

impl ConvDims {
    /// Checks the incoming gradients: `grad_out: (batch, dim, L)`,
    /// `grad_final_states: (batch, dim, W-1)`.
    fn check_grads(&self, grad_out: &[f32], grad_final_states: Option<&[f32]>) -> Result<()> {
        const OP: &str = "causal_conv1d_backward";
        let rows = self.batch * self.dim;
        expect_len(OP, "grad_out", grad_out.len(), rows * self.len)?;
        if let Some(g) = grad_final_states {
            expect_len(OP, "grad_final_states", g.len(), rows * (self.width - 1))?;
        }
        Ok(())
    }
}

/// The backward pass written like the equations, in f64, one channel at a time.
///
/// With `pre[t] = bias + sum_k weight[k] * xx[t+k]` and `out = act(pre)`:
///
/// ```text
/// g_pre[t]    = g_out[t] * silu'(pre[t])            (g_out[t] without the activation)
/// g_xx[t+k]  += weight[k] * g_pre[t]                 g_weight[k] += g_pre[t] * xx[t+k]
/// g_xx[L+j]  += g_final_states[j]                    g_bias      += g_pre[t]
/// g_initial_states = g_xx[..W-1],   g_x = g_xx[W-1..]
/// ```
///
/// `weight` and `bias` gradients add up over the batch.
pub fn causal_conv1d_backward_reference(
    dims: &ConvDims,
    x: &ConvInputs,
    grad_out: &[f32],
    grad_final_states: Option<&[f32]>,
) -> Result<ConvGrads> {
    use crate::math::f64_ref::silu_grad;
    dims.check(x)?;
    dims.check_grads(grad_out, grad_final_states)?;
    let (nd, nl, w) = (dims.dim, dims.len, dims.width);
    let rows = dims.batch * nd;
    let mut gx = vec![0.0f64; rows * nl];
    let mut g_init = vec![0.0f64; rows * (w - 1)];
    let mut g_weight = vec![0.0f64; nd * w];
    let mut g_bias = vec![0.0f64; nd];
    for row in 0..rows {
        let d = row % nd;
        let mut xx: Vec<f64> = match x.initial_states {
            Some(init) => init[row * (w - 1)..][..w - 1]
                .iter()
                .map(|&v| v as f64)
                .collect(),
            None => vec![0.0; w - 1],
        };
        xx.extend(x.x[row * nl..][..nl].iter().map(|&v| v as f64));
        let mut g_xx = vec![0.0f64; nl + w - 1];
        if let Some(g) = grad_final_states {
            for j in 0..w - 1 {
                g_xx[nl + j] += g[row * (w - 1) + j] as f64;
            }
        }
        for t in 0..nl {
            let mut pre = x.bias.map_or(0.0, |b| b[d] as f64);
            for k in 0..w {
                pre += x.weight[d * w + k] as f64 * xx[t + k];
            }
            let g_out = grad_out[row * nl + t] as f64;
            let g_pre = if x.silu {
                g_out * silu_grad(pre)
            } else {
                g_out
            };
            g_bias[d] += g_pre;
            for k in 0..w {
                g_xx[t + k] += x.weight[d * w + k] as f64 * g_pre;
                g_weight[d * w + k] += g_pre * xx[t + k];
            }
        }
        g_init[row * (w - 1)..][..w - 1].copy_from_slice(&g_xx[..w - 1]);
        gx[row * nl..][..nl].copy_from_slice(&g_xx[w - 1..]);
    }
    Ok(ConvGrads {
        x: narrow(&gx),
        weight: narrow(&g_weight),
        bias: x.bias.map(|_| narrow(&g_bias)),
        initial_states: x.initial_states.map(|_| narrow(&g_init)),
    })
}

/// The fast backward pass: threaded over batch x channels, each channel's sums over time
/// written as shifted multiply-adds and dot products that vectorise. The `weight` and `bias`
/// gradients are kept per channel and batch row, then summed over the batch.
pub fn causal_conv1d_backward(
    dims: &ConvDims,
    x: &ConvInputs,
    grad_out: &[f32],
    grad_final_states: Option<&[f32]>,
) -> Result<ConvGrads> {
    dims.check(x)?;
    dims.check_grads(grad_out, grad_final_states)?;
    let (nd, nl, w) = (dims.dim, dims.len, dims.width);
    let rows = dims.batch * nd;
    let mut gx = vec![0.0; rows * nl];
    let mut g_init = x.initial_states.map(|_| vec![0.0; rows * (w - 1)]);
    // Per row: [g_weight (W) | g_bias].
    let mut per_row = vec![0.0; rows * (w + 1)];
    let mut outs: Vec<_> = split_rows(&mut gx, rows, nl)
        .into_iter()
        .zip(split_optional_rows(g_init.as_deref_mut(), rows, w - 1))
        .zip(split_rows(&mut per_row, rows, w + 1))
        .collect();
    outs.par_iter_mut().enumerate().for_each_init(
        || (vec![0.0; nl + w - 1], vec![0.0; nl], vec![0.0; nl + w - 1]),
        |(xx, g_pre, g_xx), (row, ((gx_row, g_init_row), shares))| {
            let d = row % nd;
            let channel = ConvChannel {
                x: &x.x[row * nl..][..nl],
                history: x.initial_states.map(|s| &s[row * (w - 1)..][..w - 1]),
                weight: &x.weight[d * w..][..w],
                bias: x.bias.map_or(0.0, |b| b[d]),
                silu: x.silu,
            };
            let incoming = (
                &grad_out[row * nl..][..nl],
                grad_final_states.map(|g| &g[row * (w - 1)..][..w - 1]),
            );
            with_simd(
                #[inline(always)]
                || backward_row(&channel, incoming, xx, g_pre, g_xx, shares),
            );
            gx_row.copy_from_slice(&g_xx[w - 1..]);
            if let Some(g) = g_init_row {
                g.copy_from_slice(&g_xx[..w - 1]);
            }
        },
    );
    drop(outs);
    let mut g_weight = vec![0.0; nd * w];
    let mut g_bias = vec![0.0; nd];
    for (row, shares) in per_row.chunks_exact(w + 1).enumerate() {
        let d = row % nd;
        g_weight[d * w..][..w]
            .iter_mut()
            .zip(&shares[..w])
            .for_each(|(g, s)| *g += s);
        g_bias[d] += shares[w];
    }
    Ok(ConvGrads {
        x: gx,
        weight: g_weight,
        bias: x.bias.map(|_| g_bias),
        initial_states: g_init,
    })
}

/// What one channel's backward reads.
struct ConvChannel<'a> {
    /// `(L)`.
    x: &'a [f32],
    /// `(W-1)`.
    history: Option<&'a [f32]>,
    /// `(W)`.
    weight: &'a [f32],
    bias: f32,
    silu: bool,
}

/// One channel: fills `g_xx` (`(L + W-1)`, the gradient of `concat(history, x)`) and
/// `shares = [g_weight (W) | g_bias]`, using `xx` and `g_pre` as work space.
#[inline(always)]
fn backward_row(
    ch: &ConvChannel,
    (g_out, g_final): (&[f32], Option<&[f32]>),
    xx: &mut [f32],
    g_pre: &mut [f32],
    g_xx: &mut [f32],
    shares: &mut [f32],
) {
    let (nl, w) = (ch.x.len(), ch.weight.len());
    let (history, input) = xx.split_at_mut(w - 1);
    match ch.history {
        Some(h) => history.copy_from_slice(h),
        None => history.fill(0.0),
    }
    input.copy_from_slice(ch.x);
    if ch.silu {
        g_pre.fill(ch.bias);
        for (k, wk) in ch.weight.iter().enumerate() {
            axpy(*wk, &xx[k..k + nl], g_pre);
        }
        for (g, o) in g_pre.iter_mut().zip(g_out) {
            *g = o * silu_grad_fast(*g);
        }
    } else {
        g_pre.copy_from_slice(g_out);
    }
    for (k, share) in shares[..w].iter_mut().enumerate() {
        *share = dot(g_pre, &xx[k..k + nl]);
    }
    shares[w] = g_pre.iter().sum();
    g_xx.fill(0.0);
    if let Some(g) = g_final {
        g_xx[nl..].copy_from_slice(g);
    }
    for (k, wk) in ch.weight.iter().enumerate() {
        axpy(*wk, g_pre, &mut g_xx[k..k + nl]);
    }
}

/// `dst += a * src`.
#[inline(always)]
fn axpy(a: f32, src: &[f32], dst: &mut [f32]) {
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, s)| *d = a.mul_add(*s, *d));
}
