//! Mamba-1 selective scan (S6).
//!
//! For every batch row `b` and channel `d`, with state `h` of length `N`:
//!
//! ```text
//! dt_t  = softplus(delta[b,d,t] + delta_bias[d])          (softplus optional)
//! h_t   = exp(dt_t * A[d,:]) * h_{t-1} + dt_t * B_t * u[b,d,t]
//! y_t   = C_t . h_t + D[d] * u[b,d,t]
//! out_t = y_t * silu(z[b,d,t])                            (gate optional)
//! ```
//!
//! Layouts follow `mamba_ssm.selective_scan_fn`: `u, delta, z: (batch, dim, L)`,
//! `A: (dim, N)`, and `B`, `C` either `(batch, G, N, L)` (one group is the common
//! `(batch, N, L)` form; channel `d` uses group `d / (dim / G)`) or `(dim, N)` constant in time.

use crate::error::{OpError, Result};
use crate::math::{
    dot, exp_fast, process_dt, silu, silu_fast, softplus_fast, with_simd, NO_DT_LIMIT,
};
use rayon::prelude::*;

/// How `B` and `C` are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BcForm {
    /// `(batch, groups, N, L)`; `groups = 1` is the shared `(batch, N, L)` form.
    Varying { groups: usize },
    /// `(dim, N)`, the same at every step.
    TimeInvariant,
}

/// Sizes of one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanDims {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub state: usize,
    pub bc: BcForm,
}

/// Inputs of a scan, all contiguous f32 in the layouts of the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ScanInputs<'a> {
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: Option<&'a [f32]>,
    pub z: Option<&'a [f32]>,
    pub delta_bias: Option<&'a [f32]>,
    pub delta_softplus: bool,
    /// State before the first step, `(batch, dim, N)`; zero when absent.
    pub initial_state: Option<&'a [f32]>,
}

/// Output `(batch, dim, L)` and the state after the last step `(batch, dim, N)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanOutput {
    pub out: Vec<f32>,
    pub last_state: Vec<f32>,
}

impl ScanDims {
    fn bc_len(&self) -> usize {
        match self.bc {
            BcForm::Varying { groups } => self.batch * groups * self.state * self.len,
            BcForm::TimeInvariant => self.dim * self.state,
        }
    }

    /// Checks every input length against these sizes.
    pub fn check(&self, x: &ScanInputs) -> Result<()> {
        let (b, d, l, n) = (self.batch, self.dim, self.len, self.state);
        if let BcForm::Varying { groups } = self.bc {
            if groups == 0 || d % groups != 0 {
                return Err(shape_err(format!(
                    "dim {d} is not a multiple of groups {groups}"
                )));
            }
        }
        expect_len("u", x.u.len(), b * d * l)?;
        expect_len("delta", x.delta.len(), b * d * l)?;
        expect_len("A", x.a.len(), d * n)?;
        expect_len("B", x.b.len(), self.bc_len())?;
        expect_len("C", x.c.len(), self.bc_len())?;
        check_optional("D", x.d, d)?;
        check_optional("z", x.z, b * d * l)?;
        check_optional("delta_bias", x.delta_bias, d)?;
        check_optional("initial_state", x.initial_state, b * d * n)
    }

    /// Index of `B[.., n, t]` (or `B[d, n]`) for batch row `b`, channel `d`.
    #[inline(always)]
    fn bc_index(&self, b: usize, d: usize, n: usize, t: usize) -> usize {
        match self.bc {
            BcForm::Varying { groups } => {
                let g = d / (self.dim / groups);
                ((b * groups + g) * self.state + n) * self.len + t
            }
            BcForm::TimeInvariant => d * self.state + n,
        }
    }
}

fn shape_err(msg: String) -> OpError {
    OpError::Shape {
        op: "selective_scan",
        msg,
    }
}

fn expect_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(format!(
            "{name} has {got} elements, expected {want}"
        )))
    }
}

fn check_optional(name: &str, x: Option<&[f32]>, want: usize) -> Result<()> {
    x.map_or(Ok(()), |x| expect_len(name, x.len(), want))
}

/// The scan written like the equations: one step at a time, one channel at a time.
pub fn selective_scan_reference(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    dims.check(x)?;
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let mut out = vec![0.0; nb * nd * nl];
    let mut last_state = vec![0.0; nb * nd * nn];
    for b in 0..nb {
        for d in 0..nd {
            let row = (b * nd + d) * nl;
            let h = &mut last_state[(b * nd + d) * nn..][..nn];
            if let Some(h0) = x.initial_state {
                h.copy_from_slice(&h0[(b * nd + d) * nn..][..nn]);
            }
            let bias = x.delta_bias.map_or(0.0, |v| v[d]);
            for t in 0..nl {
                let dt = process_dt(x.delta[row + t], bias, x.delta_softplus, NO_DT_LIMIT);
                let u = x.u[row + t];
                let mut y = 0.0;
                for (n, h_n) in h.iter_mut().enumerate() {
                    let i = dims.bc_index(b, d, n, t);
                    *h_n = (dt * x.a[d * nn + n]).exp() * *h_n + dt * x.b[i] * u;
                    y += x.c[i] * *h_n;
                }
                out[row + t] = gate(y + x.d.map_or(0.0, |v| v[d]) * u, x.z.map(|z| z[row + t]));
            }
        }
    }
    Ok(ScanOutput { out, last_state })
}

#[inline(always)]
fn gate(y: f32, z: Option<f32>) -> f32 {
    z.map_or(y, |z| y * silu(z))
}

/// The fast CPU scan: threaded over batch x channels, `B`/`C` transposed once to
/// `(L, N)` so that each step reads the state-sized vectors contiguously, and the
/// inner update over the state vectorised (AVX2+FMA when present) with a
/// polynomial exp.
pub fn selective_scan(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    dims.check(x)?;
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let bt = time_major_bc(dims, x.b);
    let ct = time_major_bc(dims, x.c);
    let mut out = vec![0.0; nb * nd * nl];
    let mut last_state = vec![0.0; nb * nd * nn];
    out.par_chunks_mut(nl)
        .zip(last_state.par_chunks_mut(nn))
        .enumerate()
        .for_each_init(
            || vec![0.0; nl],
            |dt, (row, (out_row, h))| {
                let (b, d) = (row / nd, row % nd);
                if let Some(h0) = x.initial_state {
                    h.copy_from_slice(&h0[row * nn..][..nn]);
                }
                let channel = Channel {
                    u: &x.u[row * nl..][..nl],
                    delta: &x.delta[row * nl..][..nl],
                    z: x.z.map(|z| &z[row * nl..][..nl]),
                    a: &x.a[d * nn..][..nn],
                    d: x.d.map_or(0.0, |v| v[d]),
                    bias: x.delta_bias.map_or(0.0, |v| v[d]),
                    softplus: x.delta_softplus,
                    b: bt.for_channel(dims, b, d),
                    c: ct.for_channel(dims, b, d),
                };
                with_simd(
                    #[inline(always)]
                    || scan_channel(&channel, h, out_row, dt),
                );
            },
        );
    Ok(ScanOutput { out, last_state })
}

/// `B` or `C` rearranged so that step `t` reads `N` contiguous values.
struct TimeMajor {
    /// `(batch, groups, L, N)` for the varying form, `(dim, N)` for the constant one.
    data: Vec<f32>,
}

fn time_major_bc(dims: &ScanDims, src: &[f32]) -> TimeMajor {
    let (nl, nn) = (dims.len, dims.state);
    let data = match dims.bc {
        BcForm::TimeInvariant => src.to_vec(),
        BcForm::Varying { .. } => {
            let mut data = vec![0.0; src.len()];
            for (dst, src) in data.chunks_mut(nl * nn).zip(src.chunks(nl * nn)) {
                for n in 0..nn {
                    for t in 0..nl {
                        dst[t * nn + n] = src[n * nl + t];
                    }
                }
            }
            data
        }
    };
    TimeMajor { data }
}

/// `B` or `C` as one channel sees it: `(L, N)` rows, or one row reused at every step.
struct ChannelBc<'a> {
    rows: &'a [f32],
    step_stride: usize,
}

impl TimeMajor {
    fn for_channel(&self, dims: &ScanDims, b: usize, d: usize) -> ChannelBc<'_> {
        let (nl, nn) = (dims.len, dims.state);
        match dims.bc {
            BcForm::Varying { groups } => {
                let g = d / (dims.dim / groups);
                ChannelBc {
                    rows: &self.data[(b * groups + g) * nl * nn..][..nl * nn],
                    step_stride: nn,
                }
            }
            BcForm::TimeInvariant => ChannelBc {
                rows: &self.data[d * nn..][..nn],
                step_stride: 0,
            },
        }
    }
}

/// Everything one channel's scan reads.
struct Channel<'a> {
    u: &'a [f32],
    delta: &'a [f32],
    z: Option<&'a [f32]>,
    a: &'a [f32],
    d: f32,
    bias: f32,
    softplus: bool,
    b: ChannelBc<'a>,
    c: ChannelBc<'a>,
}

/// Runs one channel through all steps, leaving its last state in `h`: Δ for every step
/// first (vectorised over time), then the recurrence, then the gate (vectorised again).
#[inline(always)]
fn scan_channel(ch: &Channel, h: &mut [f32], out: &mut [f32], dt: &mut [f32]) {
    for (dt_t, raw) in dt.iter_mut().zip(ch.delta) {
        let v = raw + ch.bias;
        *dt_t = if ch.softplus { softplus_fast(v) } else { v };
    }
    match h.len() {
        16 => recurrence::<16>(ch, h.try_into().expect("16 states"), out, dt),
        8 => recurrence::<8>(ch, h.try_into().expect("8 states"), out, dt),
        32 => recurrence::<32>(ch, h.try_into().expect("32 states"), out, dt),
        _ => {
            for (t, out_t) in out.iter_mut().enumerate() {
                let b_t = &ch.b.rows[t * ch.b.step_stride..][..h.len()];
                let c_t = &ch.c.rows[t * ch.c.step_stride..][..h.len()];
                *out_t = state_step(h, ch.a, b_t, c_t, dt[t], dt[t] * ch.u[t]);
            }
        }
    }
    for ((o, u), t) in out.iter_mut().zip(ch.u).zip(0..) {
        let y = *o + ch.d * u;
        *o = match ch.z {
            Some(z) => y * silu_fast(z[t]),
            None => y,
        };
    }
}

/// The recurrence for a state of `N` values, kept in registers across steps.
#[inline(always)]
fn recurrence<const N: usize>(ch: &Channel, h: &mut [f32; N], out: &mut [f32], dt: &[f32]) {
    let a: &[f32; N] = ch.a.try_into().expect("A row of N");
    let mut state = *h;
    for (t, out_t) in out.iter_mut().enumerate() {
        let b_t: &[f32; N] = ch.b.rows[t * ch.b.step_stride..][..N]
            .try_into()
            .expect("N");
        let c_t: &[f32; N] = ch.c.rows[t * ch.c.step_stride..][..N]
            .try_into()
            .expect("N");
        let (dt_t, du) = (dt[t], dt[t] * ch.u[t]);
        let mut y = [0.0f32; N];
        for n in 0..N {
            state[n] = exp_fast(dt_t * a[n]) * state[n] + du * b_t[n];
            y[n] = c_t[n] * state[n];
        }
        *out_t = tree_sum(y);
    }
    *h = state;
}

/// Sum of `N` values by halving, which compiles to a few vector adds.
#[inline(always)]
fn tree_sum<const N: usize>(mut v: [f32; N]) -> f32 {
    let mut width = N;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            v[i] += v[i + width];
        }
    }
    v[0]
}

/// One step over the state: `h = exp(dt*A)*h + du*B`, returns `C . h`.
#[inline(always)]
pub(crate) fn state_step(h: &mut [f32], a: &[f32], b: &[f32], c: &[f32], dt: f32, du: f32) -> f32 {
    let nn = h.len();
    let (a, b, c) = (&a[..nn], &b[..nn], &c[..nn]);
    for n in 0..nn {
        h[n] = exp_fast(dt * a[n]) * h[n] + du * b[n];
    }
    dot(c, h)
}

/// Channels processed together by [`selective_scan_token_major`]: one SIMD register's worth.
const LANES: usize = 16;

/// The fast scan for inputs laid out token-major, as a model produces them:
/// `u, delta, z: (batch, L, dim)`, `B, C: (batch, L, groups, N)`; returns `out: (batch, L, dim)`
/// and `last_state: (batch, dim, N)`. `dims.bc` must be `Varying`.
///
/// Sixteen channels run side by side in the lanes of a vector, so the state update,
/// the `C . h` contraction and the gate are all lane-wise (no horizontal sums); threads
/// take blocks of channels. Falls back to the per-channel kernel when `dim / groups` is
/// not a multiple of 16.
pub fn selective_scan_token_major(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    dims.check(x)?;
    let BcForm::Varying { groups } = dims.bc else {
        return Err(shape_err(
            "the token-major scan takes B and C varying in time".into(),
        ));
    };
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    if (nd / groups) % LANES != 0 {
        return scan_via_channel_major(dims, x);
    }
    // A transposed to (N, dim) so that a block of channels reads one vector per state index.
    let a_t: Vec<f32> = (0..nn)
        .flat_map(|n| (0..nd).map(move |d| (n, d)))
        .map(|(n, d)| x.a[d * nn + n])
        .collect();
    let blocks = nd / LANES;
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..nb * blocks)
        .into_par_iter()
        .map(|task| {
            let (b, block) = (task / blocks, task % blocks);
            let mut out = vec![0.0; nl * LANES];
            let mut state = vec![[0.0f32; LANES]; nn];
            if let Some(h0) = x.initial_state {
                for (l, d) in (block * LANES..(block + 1) * LANES).enumerate() {
                    for n in 0..nn {
                        state[n][l] = h0[(b * nd + d) * nn + n];
                    }
                }
            }
            let job = BlockScan {
                dims,
                x,
                a_t: &a_t,
                batch: b,
                first: block * LANES,
                groups,
            };
            with_simd(
                #[inline(always)]
                || job.run(&mut state, &mut out),
            );
            let last: Vec<f32> = (0..LANES)
                .flat_map(|l| state.iter().map(move |s| s[l]))
                .collect();
            (out, last)
        })
        .collect();
    let mut out = vec![0.0; nb * nl * nd];
    let mut last_state = vec![0.0; nb * nd * nn];
    for (task, (block_out, block_last)) in results.into_iter().enumerate() {
        let (b, first) = (task / blocks, (task % blocks) * LANES);
        for (t, row) in block_out.chunks(LANES).enumerate() {
            out[(b * nl + t) * nd + first..][..LANES].copy_from_slice(row);
        }
        last_state[(b * nd + first) * nn..][..LANES * nn].copy_from_slice(&block_last);
    }
    Ok(ScanOutput { out, last_state })
}

/// The token-major scan through the channel-major one, for shapes the block kernel skips.
fn scan_via_channel_major(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    let (nb, nd, nl) = (dims.batch, dims.dim, dims.len);
    let BcForm::Varying { groups } = dims.bc else {
        unreachable!("checked by the caller")
    };
    let to_channels = |v: &[f32], width: usize| -> Vec<f32> {
        let mut t = vec![0.0; v.len()];
        for b in 0..nb {
            for l in 0..nl {
                for c in 0..width {
                    t[(b * width + c) * nl + l] = v[(b * nl + l) * width + c];
                }
            }
        }
        t
    };
    let gn = groups * dims.state;
    let (u, delta, b, c) = (
        to_channels(x.u, nd),
        to_channels(x.delta, nd),
        to_channels(x.b, gn),
        to_channels(x.c, gn),
    );
    let z = x.z.map(|z| to_channels(z, nd));
    let inputs = ScanInputs {
        u: &u,
        delta: &delta,
        b: &b,
        c: &c,
        z: z.as_deref(),
        ..*x
    };
    let result = selective_scan(dims, &inputs)?;
    let mut out = vec![0.0; result.out.len()];
    for b in 0..nb {
        for d in 0..nd {
            for l in 0..nl {
                out[(b * nl + l) * nd + d] = result.out[(b * nd + d) * nl + l];
            }
        }
    }
    Ok(ScanOutput {
        out,
        last_state: result.last_state,
    })
}

/// One block of [`LANES`] channels of one batch row.
struct BlockScan<'a> {
    dims: &'a ScanDims,
    x: &'a ScanInputs<'a>,
    a_t: &'a [f32],
    batch: usize,
    first: usize,
    groups: usize,
}

impl BlockScan<'_> {
    /// `LANES` values of a `(batch, L, dim)` input at step `t`.
    #[inline(always)]
    fn lanes(&self, v: &[f32], t: usize) -> [f32; LANES] {
        let at = (self.batch * self.dims.len + t) * self.dims.dim + self.first;
        v[at..at + LANES].try_into().expect("LANES values")
    }

    #[inline(always)]
    fn per_channel(&self, v: Option<&[f32]>) -> [f32; LANES] {
        v.map_or([0.0; LANES], |v| {
            v[self.first..self.first + LANES]
                .try_into()
                .expect("LANES values")
        })
    }

    #[inline(always)]
    fn run(&self, state: &mut [[f32; LANES]], out: &mut [f32]) {
        let (nd, nn) = (self.dims.dim, self.dims.state);
        let g = self.first / (nd / self.groups);
        let bias = self.per_channel(self.x.delta_bias);
        let skip = self.per_channel(self.x.d);
        for (t, out_t) in out.chunks_exact_mut(LANES).enumerate() {
            let raw = self.lanes(self.x.delta, t);
            let u = self.lanes(self.x.u, t);
            let mut dt = [0.0; LANES];
            let mut du = [0.0; LANES];
            for l in 0..LANES {
                let v = raw[l] + bias[l];
                dt[l] = if self.x.delta_softplus {
                    softplus_fast(v)
                } else {
                    v
                };
                du[l] = dt[l] * u[l];
            }
            let bc_at = ((self.batch * self.dims.len + t) * self.groups + g) * nn;
            let (b_t, c_t) = (&self.x.b[bc_at..bc_at + nn], &self.x.c[bc_at..bc_at + nn]);
            let mut y = [0.0f32; LANES];
            for (n, s) in state.iter_mut().enumerate() {
                let a: &[f32; LANES] = self.a_t[n * nd + self.first..][..LANES]
                    .try_into()
                    .expect("LANES");
                let (bn, cn) = (b_t[n], c_t[n]);
                for l in 0..LANES {
                    s[l] = exp_fast(dt[l] * a[l]).mul_add(s[l], du[l] * bn);
                    y[l] = cn.mul_add(s[l], y[l]);
                }
            }
            let mut gate = [1.0f32; LANES];
            if let Some(z) = self.x.z {
                let z = self.lanes(z, t);
                for l in 0..LANES {
                    gate[l] = silu_fast(z[l]);
                }
            }
            for l in 0..LANES {
                out_t[l] = skip[l].mul_add(u[l], y[l]) * gate[l];
            }
        }
    }
}
