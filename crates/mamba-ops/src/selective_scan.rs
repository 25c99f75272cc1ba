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
use crate::layout::swap_inner;
#[cfg(target_arch = "x86_64")]
use crate::math::exp2_avx512;
use crate::math::{
    dot, exp2_fast, exp_fast, process_dt, sigmoid_fast, silu, silu_fast, silu_grad_fast,
    softplus_fast, with_simd, NO_DT_LIMIT,
};
use crate::parallel::{add_into, column_bands, fold_in_blocks, ColumnBand};
use crate::scratch::{give_back, reused};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;

/// Channels per block of the deterministic `B`/`C` gradient sums.
const CHANNELS_PER_BLOCK: usize = 32;

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
/// the `C . h` contraction and the gate are all lane-wise (no horizontal sums); each thread
/// takes a band of such blocks of one batch row ([`BandScan::run`]). Falls back to the
/// per-channel kernel when `dim / groups` is not a multiple of 16.
pub fn selective_scan_token_major(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    let mut out = vec![0.0; dims.batch * dims.len * dims.dim];
    let last_state = selective_scan_token_major_into(dims, x, &mut out)?;
    Ok(ScanOutput { out, last_state })
}

/// [`selective_scan_token_major`] into a caller's `out: (batch, L, dim)` (every value
/// overwritten, so it may hold anything: a model's kept scratch, no zeroed buffer per call);
/// returns `last_state: (batch, dim, N)`.
pub fn selective_scan_token_major_into(
    dims: &ScanDims,
    x: &ScanInputs,
    out: &mut [f32],
) -> Result<Vec<f32>> {
    dims.check(x)?;
    let BcForm::Varying { groups } = dims.bc else {
        return Err(shape_err(
            "the token-major scan takes B and C varying in time".into(),
        ));
    };
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    expect_len("out", out.len(), nb * nl * nd)?;
    if (nd / groups) % LANES != 0 {
        let whole = scan_via_channel_major(dims, x)?;
        out.copy_from_slice(&whole.out);
        return Ok(whole.last_state);
    }
    // A transposed to (N, dim), so that a block of channels reads one vector per state
    // index, and in log2 units: exp(dt A) = 2^(dt A log2(e)).
    let a2_t: Vec<f32> = (0..nn)
        .flat_map(|n| (0..nd).map(move |d| (n, d)))
        .map(|(n, d)| x.a[d * nn + n] * std::f32::consts::LOG2_E)
        .collect();
    let bands = band_blocks(nb, nd / LANES, rayon::current_num_threads());
    let mut last_state = vec![0.0; nb * nd * nn];
    let tasks: Vec<Band> = out
        .chunks_mut(nl * nd)
        .zip(last_state.chunks_mut(nd * nn))
        .enumerate()
        .flat_map(|(batch, (out_b, last_b))| {
            let widths = bands.iter().map(|blocks| blocks.len() * LANES);
            let outs = column_bands(out_b, nd, widths.clone());
            let lasts = split_widths(last_b, widths.map(|w| w * nn));
            outs.into_iter()
                .zip(lasts)
                .zip(bands.clone())
                .map(move |((out, last), blocks)| Band {
                    batch,
                    blocks,
                    out,
                    last,
                })
        })
        .collect();
    let job = BandScan {
        dims,
        x,
        a2_t: &a2_t,
        groups,
    };
    tasks.into_par_iter().for_each(|band| {
        with_simd(
            #[inline(always)]
            || job.run(band),
        )
    });
    Ok(last_state)
}

/// The blocks of [`LANES`] channels cut into consecutive bands, as few per batch row as give
/// every one of `threads` threads a band (one per row when the rows alone do), sizes within a
/// block of each other.
fn band_blocks(batch: usize, blocks: usize, threads: usize) -> Vec<Range<usize>> {
    let count = threads.div_ceil(batch.max(1)).clamp(1, blocks.max(1));
    (0..count)
        .map(|i| i * blocks / count..(i + 1) * blocks / count)
        .collect()
}

/// `v` cut into consecutive pieces of `widths` values.
fn split_widths(mut v: &mut [f32], widths: impl IntoIterator<Item = usize>) -> Vec<&mut [f32]> {
    widths
        .into_iter()
        .map(|width| {
            let (piece, rest) = std::mem::take(&mut v).split_at_mut(width);
            v = rest;
            piece
        })
        .collect()
}

/// The token-major scan through the channel-major one, for shapes the block kernel skips.
fn scan_via_channel_major(dims: &ScanDims, x: &ScanInputs) -> Result<ScanOutput> {
    let (nb, nd, nl) = (dims.batch, dims.dim, dims.len);
    let BcForm::Varying { groups } = dims.bc else {
        unreachable!("checked by the caller")
    };
    let to_channels = |v: &[f32], width: usize| swap_inner(v, nb, nl, width);
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
    Ok(ScanOutput {
        out: swap_inner(&result.out, nb, nd, nl),
        last_state: result.last_state,
    })
}

/// Steps that [`BandScan::run`] readies at a time: their `dt`, `dt u` and `C . h`, packed block
/// by block (`3 * CHUNK_STEPS * 4` bytes per channel: 600 KB for a 1536-channel band), stay in
/// the L2 cache while every block of the band runs over them.
const CHUNK_STEPS: usize = 32;

thread_local! {
    /// [`BandScan::run`]'s packed chunk.
    static PACKED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// One thread's share of [`selective_scan_token_major`]: consecutive blocks of one batch row.
struct Band<'o> {
    batch: usize,
    blocks: Range<usize>,
    /// The band's columns of the batch row's `out: (L, dim)`.
    out: ColumnBand<'o>,
    /// The band's channels of the batch row's `last_state: (dim, N)`.
    last: &'o mut [f32],
}

/// What every band of one [`selective_scan_token_major`] call reads.
struct BandScan<'a> {
    dims: &'a ScanDims,
    x: &'a ScanInputs<'a>,
    /// `A log2(e)`, transposed to `(N, dim)`.
    a2_t: &'a [f32],
    groups: usize,
}

impl BandScan<'_> {
    /// Runs the band over the steps a chunk at a time: [`BandScan::pack`] lays out the
    /// chunk's `dt` and `dt u` block by block, reading `delta` and `u` row by row (a block
    /// reading its own 16 lanes step after step jumps a row, a page or more, each step, which
    /// the hardware prefetcher does not follow and which left the recurrence waiting on the
    /// loads); each block then runs the recurrence over the chunk in L2-resident values
    /// ([`BlockScan`]); [`BandScan::unpack`] writes the rows, `(C . h + D u) silu(z)`.
    #[inline(always)]
    fn run(&self, mut band: Band) {
        let (nl, nn) = (self.dims.len, self.dims.state);
        let first = band.blocks.start * LANES;
        let width = band.blocks.len() * LANES;
        let mut state = self.first_state(band.batch, first, band.blocks.len());
        let mut packed = reused(&PACKED, 3 * CHUNK_STEPS * width);
        let (dt, rest) = packed.split_at_mut(CHUNK_STEPS * width);
        let (du, y) = rest.split_at_mut(CHUNK_STEPS * width);
        let per_group = self.dims.dim / self.groups;
        for t0 in (0..nl).step_by(CHUNK_STEPS) {
            let steps = CHUNK_STEPS.min(nl - t0);
            let row0 = band.batch * nl + t0;
            let block_len = steps * LANES;
            self.pack(row0, steps, first..first + width, dt, du);
            for (i, block) in band.blocks.clone().enumerate() {
                let g = block * LANES / per_group;
                let bc_at = (row0 * self.groups + g) * nn;
                let job = BlockScan {
                    a2_t: self.a2_t,
                    dim: self.dims.dim,
                    first: block * LANES,
                    b: &self.x.b[bc_at..],
                    c: &self.x.c[bc_at..],
                    bc_stride: self.groups * nn,
                };
                let block_values = i * block_len..(i + 1) * block_len;
                job.run(
                    &mut state[i * nn..(i + 1) * nn],
                    &dt[block_values.clone()],
                    &du[block_values.clone()],
                    &mut y[block_values],
                );
            }
            self.unpack(row0, steps, first..first + width, y, &mut band.out, t0);
        }
        give_back(&PACKED, packed);
        for (channel, last) in band.last.chunks_exact_mut(nn).enumerate() {
            let block_state = &state[channel / LANES * nn..][..nn];
            for (h, s) in last.iter_mut().zip(block_state) {
                *h = s[channel % LANES];
            }
        }
    }

    /// The band's starting state, `(blocks, N, LANES)`: `initial_state` or zeros.
    fn first_state(&self, batch: usize, first: usize, blocks: usize) -> Vec<[f32; LANES]> {
        let (nd, nn) = (self.dims.dim, self.dims.state);
        let mut state = vec![[0.0f32; LANES]; blocks * nn];
        if let Some(h0) = self.x.initial_state {
            for (c, d) in (first..first + blocks * LANES).enumerate() {
                for n in 0..nn {
                    state[c / LANES * nn + n][c % LANES] = h0[(batch * nd + d) * nn + n];
                }
            }
        }
        state
    }

    /// `dt = softplus(delta + delta_bias)` (softplus when asked) and `dt u` of `channels` at
    /// `steps` rows from `row0`, into `(blocks, steps, LANES)`.
    #[inline(always)]
    fn pack(
        &self,
        row0: usize,
        steps: usize,
        channels: Range<usize>,
        dt: &mut [f32],
        du: &mut [f32],
    ) {
        let nd = self.dims.dim;
        let width = channels.len();
        let bias = self.x.delta_bias.map(|b| &b[channels.clone()]);
        for i in 0..steps {
            let at = (row0 + i) * nd + channels.start;
            let (delta, u) = (&self.x.delta[at..at + width], &self.x.u[at..at + width]);
            for (j, (delta, u)) in delta
                .chunks_exact(LANES)
                .zip(u.chunks_exact(LANES))
                .enumerate()
            {
                let mut v: [f32; LANES] = delta.try_into().expect("LANES values");
                if let Some(bias) = bias {
                    v.iter_mut()
                        .zip(&bias[j * LANES..][..LANES])
                        .for_each(|(v, b)| *v += b);
                }
                if self.x.delta_softplus {
                    v.iter_mut().for_each(|v| *v = softplus_fast(*v));
                }
                let u: &[f32; LANES] = u.try_into().expect("LANES values");
                let to = (j * steps + i) * LANES;
                dt[to..to + LANES].copy_from_slice(&v);
                let du: &mut [f32; LANES] = (&mut du[to..to + LANES]).try_into().expect("LANES");
                for l in 0..LANES {
                    du[l] = v[l] * u[l];
                }
            }
        }
    }

    /// Writes the band's `steps` output rows from `row0` (`t0` within the batch row):
    /// `(C . h + D u) silu(z)`, `C . h` from `y: (blocks, steps, LANES)`.
    #[inline(always)]
    fn unpack(
        &self,
        row0: usize,
        steps: usize,
        channels: Range<usize>,
        y: &[f32],
        out: &mut ColumnBand,
        t0: usize,
    ) {
        let nd = self.dims.dim;
        let width = channels.len();
        let skip = self.x.d.map(|d| &d[channels.clone()]);
        for i in 0..steps {
            let at = (row0 + i) * nd + channels.start;
            let u = &self.x.u[at..at + width];
            let out_row = out.row(t0 + i);
            for (j, out_lanes) in out_row.chunks_exact_mut(LANES).enumerate() {
                out_lanes.copy_from_slice(&y[(j * steps + i) * LANES..][..LANES]);
            }
            if let Some(d) = skip {
                out_row
                    .iter_mut()
                    .zip(d.iter().zip(u))
                    .for_each(|(o, (d, u))| *o = d.mul_add(*u, *o));
            }
            if let Some(z) = self.x.z {
                out_row
                    .iter_mut()
                    .zip(&z[at..at + width])
                    .for_each(|(o, z)| *o *= silu_fast(*z));
            }
        }
    }
}

/// The recurrence of one block of [`LANES`] channels over one chunk of steps.
struct BlockScan<'a> {
    /// `A log2(e)`, transposed to `(N, dim)`.
    a2_t: &'a [f32],
    dim: usize,
    /// The block's first channel.
    first: usize,
    /// `B` and `C` of the block's group from the chunk's first step: step `i`'s `N` values
    /// at `i * bc_stride`.
    b: &'a [f32],
    c: &'a [f32],
    bc_stride: usize,
}

impl BlockScan<'_> {
    /// `A log2(e)` of the block's channels at state index `n`.
    #[inline(always)]
    fn a2(&self, n: usize) -> [f32; LANES] {
        self.a2_t[n * self.dim + self.first..][..LANES]
            .try_into()
            .expect("LANES")
    }

    /// Step `i`'s `B` and `C`.
    #[inline(always)]
    fn bc(&self, i: usize, nn: usize) -> (&[f32], &[f32]) {
        let at = i * self.bc_stride;
        (&self.b[at..at + nn], &self.c[at..at + nn])
    }

    /// Runs the block over the chunk, `state: (N, LANES)`, `dt, du, y: (steps, LANES)`;
    /// writes `y = C . h`. Mamba-1's usual 16 state values go through
    /// [`BlockScan::run_steps_16`] (on AVX-512, [`BlockScan::run_steps_16_avx512`]).
    #[inline(always)]
    fn run(&self, state: &mut [[f32; LANES]], dt: &[f32], du: &[f32], y: &mut [f32]) {
        match <&mut [[f32; LANES]; 16]>::try_from(&mut *state) {
            Ok(fixed) => {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (detected just above).
                    return unsafe { self.run_steps_16_avx512(fixed, dt, du, y) };
                }
                self.run_steps_16(fixed, dt, du, y)
            }
            Err(_) => self.run_steps(state, dt, du, y),
        }
    }

    /// Any state length: the state through the slice.
    #[inline(always)]
    fn run_steps(&self, state: &mut [[f32; LANES]], dt: &[f32], du: &[f32], y: &mut [f32]) {
        let nn = state.len();
        let steps = dt.chunks_exact(LANES).zip(du.chunks_exact(LANES));
        for (i, ((dt, du), y)) in steps.zip(y.chunks_exact_mut(LANES)).enumerate() {
            let (b, c) = self.bc(i, nn);
            let mut sum = [0.0f32; LANES];
            for (n, s) in state.iter_mut().enumerate() {
                let a2 = self.a2(n);
                for l in 0..LANES {
                    s[l] = exp2_fast(dt[l] * a2[l]).mul_add(s[l], du[l] * b[n]);
                    sum[l] = c[n].mul_add(s[l], sum[l]);
                }
            }
            y.copy_from_slice(&sum);
        }
    }

    /// Sixteen state values, the update written out once per index so that the state stays
    /// in sixteen vector registers across the steps (a loop over the indices, even over a
    /// local array, left it in memory: a load and a store per index and step).
    #[inline(always)]
    fn run_steps_16(&self, state: &mut [[f32; LANES]; 16], dt: &[f32], du: &[f32], y: &mut [f32]) {
        let a2: [[f32; LANES]; 16] = std::array::from_fn(|n| self.a2(n));
        let mut s = *state;
        let steps = dt.chunks_exact(LANES).zip(du.chunks_exact(LANES));
        for (i, ((dt, du), y)) in steps.zip(y.chunks_exact_mut(LANES)).enumerate() {
            let (b, c) = self.bc(i, 16);
            let mut sum = [0.0f32; LANES];
            macro_rules! update {
                ($($n:literal)*) => {$(
                    for l in 0..LANES {
                        s[$n][l] = exp2_fast(dt[l] * a2[$n][l]).mul_add(s[$n][l], du[l] * b[$n]);
                        sum[l] = c[$n].mul_add(s[$n][l], sum[l]);
                    }
                )*};
            }
            update!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            y.copy_from_slice(&sum);
        }
        *state = s;
    }

    /// [`BlockScan::run_steps_16`] in AVX-512 registers, the decays from [`exp2_avx512`]
    /// (`roundscale` and `scalef`: three vector operations fewer per state value and step than
    /// [`exp2_fast`] compiled for the same registers), `C . h` in two sums (even and odd
    /// indices) so that its chain of dependent additions is half as long.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn run_steps_16_avx512(
        &self,
        state: &mut [[f32; LANES]; 16],
        dt: &[f32],
        du: &[f32],
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let a2: [__m512; 16] = std::array::from_fn(|n| _mm512_loadu_ps(self.a2(n).as_ptr()));
        let mut s: [__m512; 16] = std::array::from_fn(|n| _mm512_loadu_ps(state[n].as_ptr()));
        let steps = dt.chunks_exact(LANES).zip(du.chunks_exact(LANES));
        for (i, ((dt, du), y)) in steps.zip(y.chunks_exact_mut(LANES)).enumerate() {
            let (b, c) = self.bc(i, 16);
            let (dt, du) = (_mm512_loadu_ps(dt.as_ptr()), _mm512_loadu_ps(du.as_ptr()));
            let mut sums = [_mm512_setzero_ps(); 2];
            macro_rules! update {
                ($($n:literal)*) => {$(
                    let decay = exp2_avx512(_mm512_mul_ps(dt, a2[$n]));
                    let input = _mm512_mul_ps(du, _mm512_set1_ps(b[$n]));
                    s[$n] = _mm512_fmadd_ps(decay, s[$n], input);
                    sums[$n % 2] = _mm512_fmadd_ps(_mm512_set1_ps(c[$n]), s[$n], sums[$n % 2]);
                )*};
            }
            update!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(sums[0], sums[1]));
        }
        for (n, row) in state.iter_mut().enumerate() {
            _mm512_storeu_ps(row.as_mut_ptr(), s[n]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

/// Gradients of a scalar loss with respect to every input of a scan, each in its input's
/// layout. The optional fields are `Some` exactly when the input was given.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanGrads {
    pub u: Vec<f32>,
    /// With respect to the raw `delta` (before `delta_bias` and the softplus).
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    pub delta_bias: Option<Vec<f32>>,
    pub initial_state: Option<Vec<f32>>,
}

impl ScanDims {
    /// Checks the incoming gradients: `grad_out: (batch, dim, L)`, `grad_last_state: (batch, dim, N)`.
    fn check_grads(&self, grad_out: &[f32], grad_last_state: Option<&[f32]>) -> Result<()> {
        let (b, d, l, n) = (self.batch, self.dim, self.len, self.state);
        expect_len("grad_out", grad_out.len(), b * d * l)?;
        check_optional("grad_last_state", grad_last_state, b * d * n)
    }
}

/// The backward pass written like the equations, in f64, one channel and one step at a time.
///
/// The forward is rerun keeping every state (`h_0` = initial state, `h_t` after step `t`);
/// then, walking back from `g_h = grad_last_state` (or 0), for `t = L .. 1`:
///
/// ```text
/// go_t   = g_out_t * silu(z_t)            g_z_t  = g_out_t * (C_t . h_t + D u_t) * silu'(z_t)
/// g_D   += go_t * u_t                     g_u_t  = go_t * D + dt_t * (g_h . B_t)
/// g_h   += go_t * C_t                     g_C_t += go_t * h_t
/// g_B_t += g_h * dt_t * u_t               g_A   += g_h * h_{t-1} * exp(dt_t A) * dt_t
/// g_dt_t = sum_n g_h[n] * (h_{t-1}[n] * exp(dt_t A[n]) * A[n] + B_t[n] * u_t)
/// g_h    = g_h * exp(dt_t A)              (the gradient of h_{t-1})
/// g_delta_t = g_dt_t * sigmoid(delta_t + delta_bias)   (1 without the softplus)
/// ```
///
/// and finally `g_delta_bias = sum g_delta`, `g_initial_state = g_h`. `B`/`C` gradients
/// add up over the channels (and batch rows) that share a value.
// Index loops on purpose: the reference reads like the equations' subscripts.
#[allow(clippy::needless_range_loop)]
pub fn selective_scan_backward_reference(
    dims: &ScanDims,
    x: &ScanInputs,
    grad_out: &[f32],
    grad_last_state: Option<&[f32]>,
) -> Result<ScanGrads> {
    use crate::math::f64_ref::{process_dt, silu, silu_grad};
    dims.check(x)?;
    dims.check_grads(grad_out, grad_last_state)?;
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let mut g = ScanGrads64::zeros(dims);
    for b in 0..nb {
        for d in 0..nd {
            let row = b * nd + d;
            let bias = x.delta_bias.map_or(0.0, |v| v[d]);
            let skip = x.d.map_or(0.0, |v| v[d] as f64);
            let (dt, dt_grad): (Vec<f64>, Vec<f64>) = x.delta[row * nl..][..nl]
                .iter()
                .map(|&raw| process_dt(raw, bias, x.delta_softplus, NO_DT_LIMIT))
                .unzip();
            let a = |n: usize| x.a[d * nn + n] as f64;
            let (bv, cv) = (
                |n, t| x.b[dims.bc_index(b, d, n, t)] as f64,
                |n, t| x.c[dims.bc_index(b, d, n, t)] as f64,
            );
            // h[t]: the state after step t; h[0] is the initial state.
            let mut h = vec![vec![0.0f64; nn]; nl + 1];
            if let Some(h0) = x.initial_state {
                h[0] = widen(&h0[row * nn..][..nn]);
            }
            let mut y = vec![0.0f64; nl];
            for t in 0..nl {
                let u = x.u[row * nl + t] as f64;
                for n in 0..nn {
                    h[t + 1][n] = (dt[t] * a(n)).exp() * h[t][n] + dt[t] * bv(n, t) * u;
                    y[t] += cv(n, t) * h[t + 1][n];
                }
            }
            let mut gh =
                grad_last_state.map_or_else(|| vec![0.0; nn], |v| widen(&v[row * nn..][..nn]));
            for t in (0..nl).rev() {
                let i = row * nl + t;
                let (u, g_out) = (x.u[i] as f64, grad_out[i] as f64);
                let go = match x.z {
                    Some(z) => {
                        let z = z[i] as f64;
                        g.z[i] = g_out * (y[t] + skip * u) * silu_grad(z);
                        g_out * silu(z)
                    }
                    None => g_out,
                };
                g.d[d] += go * u;
                g.u[i] = go * skip;
                let mut g_dt = 0.0;
                for n in 0..nn {
                    let (j, decay) = (dims.bc_index(b, d, n, t), (dt[t] * a(n)).exp());
                    gh[n] += go * cv(n, t);
                    g.c[j] += go * h[t + 1][n];
                    g.b[j] += gh[n] * dt[t] * u;
                    g.u[i] += gh[n] * dt[t] * bv(n, t);
                    g.a[d * nn + n] += gh[n] * h[t][n] * decay * dt[t];
                    g_dt += gh[n] * (h[t][n] * decay * a(n) + bv(n, t) * u);
                    gh[n] *= decay;
                }
                g.delta[i] = g_dt * dt_grad[t];
                g.delta_bias[d] += g.delta[i];
            }
            g.initial_state[row * nn..][..nn].copy_from_slice(&gh);
        }
    }
    Ok(g.narrow(x))
}

/// f64 accumulators of the reference backward, every field allocated.
struct ScanGrads64 {
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    d: Vec<f64>,
    z: Vec<f64>,
    delta_bias: Vec<f64>,
    initial_state: Vec<f64>,
}

impl ScanGrads64 {
    fn zeros(dims: &ScanDims) -> Self {
        let rows = dims.batch * dims.dim;
        ScanGrads64 {
            u: vec![0.0; rows * dims.len],
            delta: vec![0.0; rows * dims.len],
            a: vec![0.0; dims.dim * dims.state],
            b: vec![0.0; dims.bc_len()],
            c: vec![0.0; dims.bc_len()],
            d: vec![0.0; dims.dim],
            z: vec![0.0; rows * dims.len],
            delta_bias: vec![0.0; dims.dim],
            initial_state: vec![0.0; rows * dims.state],
        }
    }

    /// Rounds to f32, keeping the optional gradients whose input `x` has.
    fn narrow(self, x: &ScanInputs) -> ScanGrads {
        let keep = |given: bool, v: Vec<f64>| given.then(|| narrow(&v));
        ScanGrads {
            u: narrow(&self.u),
            delta: narrow(&self.delta),
            a: narrow(&self.a),
            b: narrow(&self.b),
            c: narrow(&self.c),
            d: keep(x.d.is_some(), self.d),
            z: keep(x.z.is_some(), self.z),
            delta_bias: keep(x.delta_bias.is_some(), self.delta_bias),
            initial_state: keep(x.initial_state.is_some(), self.initial_state),
        }
    }
}

pub(crate) fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

pub(crate) fn narrow(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

/// `v` cut into `count` consecutive rows of `width` values (`width` may be 0).
pub(crate) fn split_rows(mut v: &mut [f32], count: usize, width: usize) -> Vec<&mut [f32]> {
    (0..count)
        .map(|_| {
            let (row, rest) = std::mem::take(&mut v).split_at_mut(width);
            v = rest;
            row
        })
        .collect()
}

/// Like [`split_rows`] for an optional buffer: `count` rows of `None` when it is absent.
pub(crate) fn split_optional_rows(
    v: Option<&mut [f32]>,
    count: usize,
    width: usize,
) -> Vec<Option<&mut [f32]>> {
    match v {
        Some(v) => split_rows(v, count, width).into_iter().map(Some).collect(),
        None => (0..count).map(|_| None).collect(),
    }
}

/// The fast backward pass: the equations of [`selective_scan_backward_reference`] in f32,
/// threaded over channels and vectorised over the state.
///
/// Each channel reruns its forward keeping its own `(L+1, N)` states in a per-thread
/// buffer (never the whole batch's), then walks back. Channels that share `B`/`C` (one
/// batch row's group, or, for the time-invariant form, a whole batch row whose channels
/// each own a row of `B`) form a "slab"; their `B`/`C` gradients are summed with a rayon
/// fold into per-thread `(L, N)` (or `(dim, N)`) buffers. Per-channel parameter gradients
/// (`A`, `D`, `delta_bias`) are kept per batch row and summed over the batch at the end.
pub fn selective_scan_backward(
    dims: &ScanDims,
    x: &ScanInputs,
    grad_out: &[f32],
    grad_last_state: Option<&[f32]>,
) -> Result<ScanGrads> {
    dims.check(x)?;
    dims.check_grads(grad_out, grad_last_state)?;
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let rows = nb * nd;
    let (bt, ct) = (time_major_bc(dims, x.b), time_major_bc(dims, x.c));
    let slab = Slab::of(dims);
    let slabs = rows / slab.rows;
    let mut gu = vec![0.0; rows * nl];
    let mut gdelta = vec![0.0; rows * nl];
    let mut gz = x.z.map(|_| vec![0.0; rows * nl]);
    let mut gh0 = x.initial_state.map(|_| vec![0.0; rows * nn]);
    let mut per_row = vec![0.0; rows * PerRow::width(nn)];
    let mut gb_slabs = vec![0.0; slabs * slab.sink_len];
    let mut gc_slabs = vec![0.0; slabs * slab.sink_len];
    let mut outs = row_grads(
        dims,
        &mut gu,
        &mut gdelta,
        gz.as_deref_mut(),
        gh0.as_deref_mut(),
        &mut per_row,
    );
    outs.par_chunks_mut(slab.rows.max(1))
        .zip(gb_slabs.par_chunks_mut(slab.sink_len.max(1)))
        .zip(gc_slabs.par_chunks_mut(slab.sink_len.max(1)))
        .for_each(|((slab_rows, gb), gc)| {
            let (sum_b, sum_c) = fold_in_blocks(
                slab_rows,
                CHANNELS_PER_BLOCK,
                || SlabScratch::new(dims, &slab),
                |mut acc, out| {
                    let (b, d) = (out.row / nd, out.row % nd);
                    let channel = Channel {
                        u: &x.u[out.row * nl..][..nl],
                        delta: &x.delta[out.row * nl..][..nl],
                        z: x.z.map(|z| &z[out.row * nl..][..nl]),
                        a: &x.a[d * nn..][..nn],
                        d: x.d.map_or(0.0, |v| v[d]),
                        bias: x.delta_bias.map_or(0.0, |v| v[d]),
                        softplus: x.delta_softplus,
                        b: bt.for_channel(dims, b, d),
                        c: ct.for_channel(dims, b, d),
                    };
                    let incoming = Incoming {
                        out: &grad_out[out.row * nl..][..nl],
                        last_state: grad_last_state.map(|g| &g[out.row * nn..][..nn]),
                        initial_state: x.initial_state.map(|h| &h[out.row * nn..][..nn]),
                    };
                    let sink = Slab::sink_of(dims, d);
                    with_simd(
                        #[inline(always)]
                        || match nn {
                            16 => backward_channel(
                                Fixed::<16>,
                                &channel,
                                &incoming,
                                out,
                                &mut acc,
                                sink,
                            ),
                            8 => backward_channel(
                                Fixed::<8>, &channel, &incoming, out, &mut acc, sink,
                            ),
                            32 => backward_channel(
                                Fixed::<32>,
                                &channel,
                                &incoming,
                                out,
                                &mut acc,
                                sink,
                            ),
                            _ => backward_channel(nn, &channel, &incoming, out, &mut acc, sink),
                        },
                    );
                    acc
                },
            )
            .into_iter()
            .fold(
                (vec![0.0; slab.sink_len], vec![0.0; slab.sink_len]),
                |(mut b1, mut c1), acc| {
                    add_into(&mut b1, &acc.gb);
                    add_into(&mut c1, &acc.gc);
                    (b1, c1)
                },
            );
            gb.copy_from_slice(&sum_b[..gb.len()]);
            gc.copy_from_slice(&sum_c[..gc.len()]);
        });
    drop(outs);
    let channel_grads = sum_per_row_over_batch(dims, &per_row);
    Ok(ScanGrads {
        u: gu,
        delta: gdelta,
        a: channel_grads.a,
        b: slab.bc_grad(dims, &gb_slabs),
        c: slab.bc_grad(dims, &gc_slabs),
        d: x.d.map(|_| channel_grads.d),
        z: gz,
        delta_bias: x.delta_bias.map(|_| channel_grads.delta_bias),
        initial_state: gh0,
    })
}

/// The gradients one channel (one row `(b, d)`) writes.
struct RowGrads<'a> {
    row: usize,
    /// `(L)` rows of the `u`, `delta` and `z` gradients.
    u: &'a mut [f32],
    delta: &'a mut [f32],
    z: Option<&'a mut [f32]>,
    /// `(N)`.
    initial_state: Option<&'a mut [f32]>,
    /// This row's share of the per-channel gradients, laid out as [`PerRow`] says.
    per_row: &'a mut [f32],
}

/// Layout of a row's share of the per-channel gradients: `[g_A (N) | g_D | g_delta_bias]`.
struct PerRow;

impl PerRow {
    fn width(n: usize) -> usize {
        n + 2
    }
}

/// The channels' per-row shares summed over the batch: `A: (dim, N)`, `D, delta_bias: (dim)`.
struct ChannelGrads {
    a: Vec<f32>,
    d: Vec<f32>,
    delta_bias: Vec<f32>,
}

fn sum_per_row_over_batch(dims: &ScanDims, per_row: &[f32]) -> ChannelGrads {
    let (nd, nn) = (dims.dim, dims.state);
    let width = PerRow::width(nn);
    let mut g = ChannelGrads {
        a: vec![0.0; nd * nn],
        d: vec![0.0; nd],
        delta_bias: vec![0.0; nd],
    };
    for (row, share) in per_row.chunks_exact(width).enumerate() {
        let d = row % nd;
        add_into(&mut g.a[d * nn..][..nn], &share[..nn]);
        g.d[d] += share[nn];
        g.delta_bias[d] += share[nn + 1];
    }
    g
}

fn row_grads<'a>(
    dims: &ScanDims,
    u: &'a mut [f32],
    delta: &'a mut [f32],
    z: Option<&'a mut [f32]>,
    initial_state: Option<&'a mut [f32]>,
    per_row: &'a mut [f32],
) -> Vec<RowGrads<'a>> {
    let (rows, nl, nn) = (dims.batch * dims.dim, dims.len, dims.state);
    split_rows(u, rows, nl)
        .into_iter()
        .zip(split_rows(delta, rows, nl))
        .zip(split_optional_rows(z, rows, nl))
        .zip(split_optional_rows(initial_state, rows, nn))
        .zip(split_rows(per_row, rows, PerRow::width(nn)))
        .enumerate()
        .map(
            |(row, ((((u, delta), z), initial_state), per_row))| RowGrads {
                row,
                u,
                delta,
                z,
                initial_state,
                per_row,
            },
        )
        .collect()
}

/// Channels that share one `B`/`C` gradient buffer (the "sink") of `sink_len` values.
///
/// Varying form: the `dim / G` channels of one group of one batch row share an `(L, N)`
/// time-major sink. Time-invariant form: a batch row's channels share a `(dim, N)` sink,
/// channel `d` adding its sum over time into row `d`.
struct Slab {
    rows: usize,
    sink_len: usize,
}

/// Where a channel adds its `B`/`C` gradient: step `t` goes to `offset + t * step_stride`.
#[derive(Clone, Copy)]
struct Sink {
    offset: usize,
    step_stride: usize,
}

impl Slab {
    fn of(dims: &ScanDims) -> Self {
        match dims.bc {
            BcForm::Varying { groups } => Slab {
                rows: dims.dim / groups,
                sink_len: dims.len * dims.state,
            },
            BcForm::TimeInvariant => Slab {
                rows: dims.dim,
                sink_len: dims.dim * dims.state,
            },
        }
    }

    /// Where channel `d` adds its `B`/`C` gradient inside its slab's sink.
    fn sink_of(dims: &ScanDims, d: usize) -> Sink {
        match dims.bc {
            BcForm::Varying { .. } => Sink {
                offset: 0,
                step_stride: dims.state,
            },
            BcForm::TimeInvariant => Sink {
                offset: d * dims.state,
                step_stride: 0,
            },
        }
    }

    /// The slabs' sinks turned into the `B`/`C` gradient in its input layout.
    fn bc_grad(&self, dims: &ScanDims, sinks: &[f32]) -> Vec<f32> {
        let (nl, nn) = (dims.len, dims.state);
        match dims.bc {
            BcForm::Varying { .. } => {
                let mut g = vec![0.0; sinks.len()];
                for (dst, src) in g
                    .chunks_mut(self.sink_len.max(1))
                    .zip(sinks.chunks(self.sink_len.max(1)))
                {
                    for n in 0..nn {
                        for t in 0..nl {
                            dst[n * nl + t] = src[t * nn + n];
                        }
                    }
                }
                g
            }
            BcForm::TimeInvariant => {
                let mut g = vec![0.0; self.sink_len];
                for batch_row in sinks.chunks(self.sink_len.max(1)) {
                    add_into(&mut g, batch_row);
                }
                g
            }
        }
    }
}

/// The incoming gradients and the initial state of one channel.
struct Incoming<'a> {
    /// `(L)`.
    out: &'a [f32],
    /// `(N)`.
    last_state: Option<&'a [f32]>,
    initial_state: Option<&'a [f32]>,
}

/// A fold accumulator of [`selective_scan_backward`]: the slab's `B`/`C` gradient sums and
/// the per-channel work buffers, reused from channel to channel.
struct SlabScratch {
    gb: Vec<f32>,
    gc: Vec<f32>,
    /// `(L)`: processed Δ and its derivative with respect to the raw `delta`.
    dt: Vec<f32>,
    dt_grad: Vec<f32>,
    /// `(L)`: `C_t . h_t`, then the gradient of the ungated output.
    go: Vec<f32>,
    /// `(L+1, N)`: `h_0` (initial state) and the state after every step.
    states: Vec<f32>,
}

impl SlabScratch {
    fn new(dims: &ScanDims, slab: &Slab) -> Self {
        let (nl, nn) = (dims.len, dims.state);
        SlabScratch {
            gb: vec![0.0; slab.sink_len],
            gc: vec![0.0; slab.sink_len],
            dt: vec![0.0; nl],
            dt_grad: vec![0.0; nl],
            go: vec![0.0; nl],
            states: vec![0.0; (nl + 1) * nn],
        }
    }
}

/// One channel's backward (see [`selective_scan_backward_reference`] for the equations):
/// Δ and its derivative, the forward keeping every state, the gate and skip, then the walk
/// back through time, vectorised over the state. The running vectors live in locals of
/// `state_len`'s vector type (registers when `N` is fixed).
#[inline(always)]
fn backward_channel<S: StateLen>(
    state_len: S,
    ch: &Channel,
    incoming: &Incoming,
    out: &mut RowGrads,
    s: &mut SlabScratch,
    sink: Sink,
) {
    let nn = state_len.get();
    for ((dt, dt_grad), raw) in s.dt.iter_mut().zip(&mut s.dt_grad).zip(ch.delta) {
        let v = raw + ch.bias;
        (*dt, *dt_grad) = if ch.softplus {
            (softplus_fast(v), sigmoid_fast(v))
        } else {
            (v, 1.0)
        };
    }
    forward_keeping_states(state_len, ch, incoming.initial_state, s);
    gate_and_skip_backward(ch, incoming.out, out, &mut s.go);
    let a = state_len.vector(Some(ch.a));
    let (a, mut gh) = (a.as_ref(), state_len.vector(incoming.last_state));
    let (mut g_decay, mut g_a) = (state_len.vector(None), state_len.vector(None));
    let mut g_bias = 0.0;
    for t in (0..ch.u.len()).rev() {
        let (dt, u, go) = (s.dt[t], ch.u[t], s.go[t]);
        let du = dt * u;
        let b_t = &ch.b.rows[t * ch.b.step_stride..][..nn];
        let c_t = &ch.c.rows[t * ch.c.step_stride..][..nn];
        let at = sink.offset + t * sink.step_stride;
        let (gb, gc) = (&mut s.gb[at..][..nn], &mut s.gc[at..][..nn]);
        let h_prev = &s.states[t * nn..][..nn];
        let h_t = &s.states[(t + 1) * nn..][..nn];
        let (gh, g_decay, g_a) = (gh.as_mut(), g_decay.as_mut(), g_a.as_mut());
        for n in 0..nn {
            gh[n] = c_t[n].mul_add(go, gh[n]);
            gc[n] = go.mul_add(h_t[n], gc[n]);
        }
        let gh_dot_b = state_len.dot(gh, b_t);
        for n in 0..nn {
            let decay = exp_fast(dt * a[n]);
            g_decay[n] = gh[n] * h_prev[n] * decay;
            g_a[n] = g_decay[n].mul_add(dt, g_a[n]);
            gb[n] = gh[n].mul_add(du, gb[n]);
            gh[n] *= decay;
        }
        out.u[t] = dt.mul_add(gh_dot_b, out.u[t]);
        out.delta[t] = u.mul_add(gh_dot_b, state_len.dot(g_decay, a)) * s.dt_grad[t];
        g_bias += out.delta[t];
    }
    out.per_row[..nn].copy_from_slice(g_a.as_ref());
    out.per_row[nn + 1] = g_bias;
    if let Some(g0) = out.initial_state.as_deref_mut() {
        g0.copy_from_slice(gh.as_ref());
    }
}

/// The state size `N`, a compile-time constant for the common sizes so that the loops over
/// it unroll into whole vectors and the sums over it into trees of vector adds.
trait StateLen: Copy {
    /// `N` values: an array when `N` is fixed.
    type Vector: AsRef<[f32]> + AsMut<[f32]>;

    fn get(self) -> usize;

    /// A copy of the first `N` values of `from`, or zeros.
    fn vector(self, from: Option<&[f32]>) -> Self::Vector;

    /// `a . b` over the first `N` values.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
}

/// `N` known at compile time.
#[derive(Clone, Copy)]
struct Fixed<const N: usize>;

impl<const N: usize> StateLen for Fixed<N> {
    type Vector = [f32; N];

    #[inline(always)]
    fn get(self) -> usize {
        N
    }

    #[inline(always)]
    fn vector(self, from: Option<&[f32]>) -> [f32; N] {
        from.map_or([0.0; N], |v| v[..N].try_into().expect("N values"))
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let (a, b) = (&a[..N], &b[..N]);
        let mut products = [0.0f32; N];
        for n in 0..N {
            products[n] = a[n] * b[n];
        }
        tree_sum(products)
    }
}

impl StateLen for usize {
    type Vector = Vec<f32>;

    #[inline(always)]
    fn get(self) -> usize {
        self
    }

    #[inline(always)]
    fn vector(self, from: Option<&[f32]>) -> Vec<f32> {
        from.map_or_else(|| vec![0.0; self], |v| v[..self].to_vec())
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        dot(&a[..self], &b[..self])
    }
}

/// Reruns one channel's recurrence from its initial state, storing every state in
/// `s.states` and `C_t . h_t` in `s.go`.
#[inline(always)]
fn forward_keeping_states<S: StateLen>(
    state_len: S,
    ch: &Channel,
    initial_state: Option<&[f32]>,
    s: &mut SlabScratch,
) {
    let nn = state_len.get();
    let a = state_len.vector(Some(ch.a));
    let (a, mut h) = (a.as_ref(), state_len.vector(initial_state));
    let (first, rest) = s.states.split_at_mut(nn);
    first.copy_from_slice(h.as_ref());
    for ((t, stored), y) in rest.chunks_exact_mut(nn).enumerate().zip(&mut s.go) {
        let (dt, du) = (s.dt[t], s.dt[t] * ch.u[t]);
        let b_t = &ch.b.rows[t * ch.b.step_stride..][..nn];
        let c_t = &ch.c.rows[t * ch.c.step_stride..][..nn];
        let h = h.as_mut();
        for n in 0..nn {
            h[n] = exp_fast(dt * a[n]).mul_add(h[n], du * b_t[n]);
        }
        *y = state_len.dot(c_t, h);
        stored.copy_from_slice(h);
    }
}

/// From `go = C_t . h_t` and the incoming `g_out`: the `z` gradient, the gradient of the
/// ungated output (left in `go`), and the skip's share of the `u` and `D` gradients.
#[inline(always)]
fn gate_and_skip_backward(ch: &Channel, g_out: &[f32], out: &mut RowGrads, go: &mut [f32]) {
    let nn = ch.a.len();
    match (ch.z, out.z.as_deref_mut()) {
        (Some(z), Some(gz)) => {
            for (((go, gz), &z), (&g, &u)) in
                go.iter_mut().zip(gz).zip(z).zip(g_out.iter().zip(ch.u))
            {
                let o = ch.d.mul_add(u, *go);
                *gz = g * o * silu_grad_fast(z);
                *go = g * silu_fast(z);
            }
        }
        _ => go.copy_from_slice(g_out),
    }
    let mut g_d = 0.0;
    for ((gu, &go), &u) in out.u.iter_mut().zip(go.iter()).zip(ch.u) {
        *gu = go * ch.d;
        g_d = go.mul_add(u, g_d);
    }
    out.per_row[nn] = g_d;
}

#[cfg(test)]
mod tests {
    use super::{BlockScan, LANES};

    /// Deterministic values in `[lo, hi)` (a small linear congruential sequence).
    fn values(seed: u32, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                lo + (hi - lo) * (s >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect()
    }

    /// The block recurrence's three forms (any state length; sixteen values portable, as
    /// CPUs without AVX-512 run it; sixteen in AVX-512 registers where the CPU has them)
    /// give the same outputs and states over a chunk.
    #[test]
    fn block_recurrence_forms_agree() {
        let (steps, nn) = (40, 16);
        let a2_t = values(1, nn * LANES, -6.0, -0.1);
        let (b, c) = (
            values(2, steps * nn, -1.0, 1.0),
            values(3, steps * nn, -1.0, 1.0),
        );
        let dt = values(4, steps * LANES, 0.001, 1.5);
        let du = values(5, steps * LANES, -1.0, 1.0);
        let h0: Vec<[f32; LANES]> = values(6, nn * LANES, -1.0, 1.0)
            .chunks(LANES)
            .map(|r| r.try_into().expect("LANES"))
            .collect();
        let job = BlockScan {
            a2_t: &a2_t,
            dim: LANES,
            first: 0,
            b: &b,
            c: &c,
            bc_stride: nn,
        };
        let general = {
            let (mut state, mut y) = (h0.clone(), vec![0.0; steps * LANES]);
            job.run_steps(&mut state, &dt, &du, &mut y);
            (state, y)
        };
        let mut forms = vec![("portable", {
            let (mut state, mut y) = (h0.clone(), vec![0.0; steps * LANES]);
            let fixed: &mut [[f32; LANES]; 16] = (&mut state[..]).try_into().expect("16");
            job.run_steps_16(fixed, &dt, &du, &mut y);
            (state, y)
        })];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let (mut state, mut y) = (h0.clone(), vec![0.0; steps * LANES]);
            let fixed: &mut [[f32; LANES]; 16] = (&mut state[..]).try_into().expect("16");
            // SAFETY: the CPU has AVX-512F (detected just above).
            unsafe { job.run_steps_16_avx512(fixed, &dt, &du, &mut y) };
            forms.push(("avx512", (state, y)));
        }
        for (form, (state, y)) in forms {
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-4);
            assert!(close(&y, &general.1), "{form}: outputs");
            assert!(
                close(state.as_flattened(), general.0.as_flattened()),
                "{form}: states"
            );
        }
    }
}
