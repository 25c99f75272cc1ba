//! One recurrent step of the selective SSM, as used when decoding one token.
//!
//! Heads form (Mamba-2; Mamba-1 is the case `head_dim = 1, groups = 1, heads = dim`):
//!
//! ```text
//! dt'        = softplus(dt[b,h,p] + dt_bias[h,p])      (softplus optional, then clamped)
//! S[b,h,p,:] = exp(dt' * A[h,p,:]) * S[b,h,p,:] + dt' * x[b,h,p] * B[b,g(h),:]
//! y[b,h,p]   = S[b,h,p,:] . C[b,g(h),:] + D[h,p] * x[b,h,p]
//! y          = y * silu(z[b,h,p])                      (gate optional)
//! ```
//!
//! with `g(h) = h / (heads / groups)`. When `per_head` is set, `A`, `dt`, `D` and `dt_bias`
//! hold one value per head (`A: (H)`, `dt: (batch, H)`, `D, dt_bias: (H)`), as Mamba-2
//! models keep them; otherwise they are full `(H, P, N)` / `(batch, H, P)` / `(H, P)`.

use crate::error::{OpError, Result};
use crate::math::{
    dot, exp_fast, process_dt, process_dt_fast, silu, silu_fast, softplus_fast, with_simd,
};
use crate::selective_scan::state_step;
use crate::ssd::SsdInputs;
use rayon::prelude::*;

/// Sizes of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDims {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
    /// `A`, `dt`, `D`, `dt_bias` are per head rather than per `(head, p)`.
    pub per_head: bool,
}

/// Inputs of one step (contiguous f32).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: Option<&'a [f32]>,
    pub z: Option<&'a [f32]>,
    pub dt_bias: Option<&'a [f32]>,
    pub dt_softplus: bool,
    /// Clamp of Δ after the softplus (Mamba-2's `time_step_limit`).
    pub dt_limit: (f32, f32),
}

impl<'a> From<&SsdInputs<'a>> for StepInputs<'a> {
    /// The chunked scan's inputs for one step of each sequence (the state updated in place
    /// stands for its `initial_states`).
    fn from(s: &SsdInputs<'a>) -> Self {
        StepInputs {
            x: s.x,
            dt: s.dt,
            a: s.a,
            b: s.b,
            c: s.c,
            d: s.d,
            z: s.z,
            dt_bias: s.dt_bias,
            dt_softplus: s.dt_softplus,
            dt_limit: s.dt_limit,
        }
    }
}

fn expect_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(OpError::Shape {
            op: "selective_state_update",
            msg: format!("{name} has {got} elements, expected {want}"),
        })
    }
}

impl StepDims {
    /// Mamba-1 form: `state: (batch, dim, N)`, `x, dt, z: (batch, dim)`, `A: (dim, N)`,
    /// `B, C: (batch, N)`, `D, dt_bias: (dim)`.
    pub fn mamba1(batch: usize, dim: usize, state: usize) -> Self {
        StepDims {
            batch,
            heads: dim,
            head_dim: 1,
            state,
            groups: 1,
            per_head: false,
        }
    }

    /// Elements per batch row of a per-`(head, p)` parameter (`dt`) .
    fn dt_row(&self) -> usize {
        if self.per_head {
            self.heads
        } else {
            self.heads * self.head_dim
        }
    }

    /// Checks the state and every input length.
    pub fn check(&self, state: &[f32], x: &StepInputs) -> Result<()> {
        let (b, h, p, n, g) = (
            self.batch,
            self.heads,
            self.head_dim,
            self.state,
            self.groups,
        );
        if g == 0 || h % g != 0 {
            return Err(OpError::Shape {
                op: "selective_state_update",
                msg: format!("heads {h} is not a multiple of groups {g}"),
            });
        }
        let a_len = if self.per_head { h } else { h * p * n };
        expect_len("state", state.len(), b * h * p * n)?;
        expect_len("x", x.x.len(), b * h * p)?;
        expect_len("dt", x.dt.len(), b * self.dt_row())?;
        expect_len("A", x.a.len(), a_len)?;
        expect_len("B", x.b.len(), b * g * n)?;
        expect_len("C", x.c.len(), b * g * n)?;
        let hp = self.dt_row();
        if let Some(d) = x.d {
            expect_len("D", d.len(), hp)?;
        }
        if let Some(bias) = x.dt_bias {
            expect_len("dt_bias", bias.len(), hp)?;
        }
        if let Some(z) = x.z {
            expect_len("z", z.len(), b * h * p)?;
        }
        Ok(())
    }

    /// Index into a per-`(head, p)` parameter for head `h`, position `p`.
    #[inline(always)]
    fn param(&self, h: usize, p: usize) -> usize {
        if self.per_head {
            h
        } else {
            h * self.head_dim + p
        }
    }
}

/// The step written like the equations, element by element.
/// Updates `state: (batch, H, P, N)` in place and returns `y: (batch, H, P)`.
pub fn selective_state_update_reference(
    dims: &StepDims,
    state: &mut [f32],
    x: &StepInputs,
) -> Result<Vec<f32>> {
    dims.check(state, x)?;
    let (nb, nh, np, nn) = (dims.batch, dims.heads, dims.head_dim, dims.state);
    let heads_per_group = nh / dims.groups;
    let mut y = vec![0.0; nb * nh * np];
    for b in 0..nb {
        for h in 0..nh {
            let g = h / heads_per_group;
            for p in 0..np {
                let i = (b * nh + h) * np + p;
                let k = dims.param(h, p);
                let raw = x.dt[b * dims.dt_row() + k];
                let dt = process_dt(
                    raw,
                    x.dt_bias.map_or(0.0, |v| v[k]),
                    x.dt_softplus,
                    x.dt_limit,
                );
                let mut acc = 0.0;
                for n in 0..nn {
                    let a = if dims.per_head {
                        x.a[h]
                    } else {
                        x.a[(h * np + p) * nn + n]
                    };
                    let s = &mut state[i * nn + n];
                    *s = (dt * a).exp() * *s + dt * x.x[i] * x.b[(b * dims.groups + g) * nn + n];
                    acc += *s * x.c[(b * dims.groups + g) * nn + n];
                }
                let out = acc + x.d.map_or(0.0, |v| v[k]) * x.x[i];
                y[i] = x.z.map_or(out, |z| out * silu(z[i]));
            }
        }
    }
    Ok(y)
}

/// State values a task of the fast step updates at least: Mamba-1's rows of 16 are too
/// small to be tasks of their own.
const STATE_VALUES_PER_TASK: usize = 4096;

/// The fast step: threaded over batch x heads, vectorised over the state.
pub fn selective_state_update(
    dims: &StepDims,
    state: &mut [f32],
    x: &StepInputs,
) -> Result<Vec<f32>> {
    dims.check(state, x)?;
    let mut y = vec![0.0; dims.batch * dims.heads * dims.head_dim];
    selective_state_update_into(dims, state, x, &mut y);
    Ok(y)
}

/// [`selective_state_update`] writing `y` into a caller's buffer (shapes already checked).
pub fn selective_state_update_into(
    dims: &StepDims,
    state: &mut [f32],
    x: &StepInputs,
    y: &mut [f32],
) {
    if dims.per_head {
        per_head_step(dims, state, x, y)
    } else {
        per_row_step(dims, state, x, y)
    }
}

/// Per-head `A` and Δ (Mamba-2): threaded over batch x heads, one decay per head,
/// vectorised over each state row.
fn per_head_step(dims: &StepDims, state: &mut [f32], x: &StepInputs, y: &mut [f32]) {
    let (nh, np, nn) = (dims.heads, dims.head_dim, dims.state);
    let heads_per_group = nh / dims.groups;
    let work = |bh: usize, head_state: &mut [f32], head_y: &mut [f32]| {
        let (b, h) = (bh / nh, bh % nh);
        let g = b * dims.groups + h / heads_per_group;
        let bvec = &x.b[g * nn..][..nn];
        let cvec = &x.c[g * nn..][..nn];
        let dt = process_dt_fast(
            x.dt[b * nh + h],
            x.dt_bias.map_or(0.0, |v| v[h]),
            x.dt_softplus,
            x.dt_limit,
        );
        let decay = exp_fast(dt * x.a[h]);
        let d = x.d.map_or(0.0, |v| v[h]);
        #[cfg(target_arch = "x86_64")]
        let whole = head_state.as_ptr_range();
        with_simd(
            #[inline(always)]
            || {
                for (p, (s, y_p)) in head_state.chunks_mut(nn).zip(head_y.iter_mut()).enumerate() {
                    #[cfg(target_arch = "x86_64")]
                    {
                        prefetch(&whole, (p + PREFETCH_ROWS) * nn, nn);
                        let ahead = (s.as_ptr() as *const u8).wrapping_add(L2_PREFETCH_BYTES);
                        crate::prefetch::lines_to_l2(ahead, nn * std::mem::size_of::<f32>());
                    }
                    let i = bh * np + p;
                    let xi = x.x[i];
                    let out = scalar_decay_step(s, decay, bvec, cvec, dt * xi) + d * xi;
                    *y_p = x.z.map_or(out, |z| out * silu_fast(z[i]));
                }
            },
        );
    };
    state
        .par_chunks_mut(np * nn)
        .zip(y.par_chunks_mut(np))
        .enumerate()
        .with_min_len(STATE_VALUES_PER_TASK.div_ceil(np * nn))
        .for_each(|(bh, (s, y))| work(bh, s, y));
}

/// State rows ahead of the one being updated whose memory [`per_head_step`] asks the caches
/// for (2 KiB with N = 128): each row's `C . h` chain keeps the processor from running far
/// enough ahead for the hardware prefetcher alone, and a decoding step's weights have pushed
/// the state out of the caches. mamba2-130m's 24 layers' states alone at 1 thread: 1.76 ->
/// 1.59 and 1.97 -> 1.74 ms per token (the latter evicted first); whole decoding steps,
/// alternating in one process: q4_0 6.91 -> 6.19 ms at 1 thread, 6.28 -> 5.84 at 2, bf16
/// 15.38 -> 14.69 and 12.37 -> 11.85. 8 rows ahead and 2 were less steady.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 4;

/// Bytes past the state row being updated whose lines [`per_head_step`] also asks the L2
/// cache for, past the head's end too (the next head's rows, read next by this thread or
/// another). On the Intel Xeon host of the thirty-eighth session (one core streams 8-10 GB/s
/// from memory), whole decoding steps with and without it, switched per eight steps in one
/// process, median ms per step of mamba2-130m: q4_0 10.99 -> 10.28 at 1 thread (16 of 16
/// rounds faster), 5.53 -> 5.31 at 2 (24 of 30); bf16 27.1 -> 26.7 at 1 (9 of 12). 8 KiB
/// ahead in place of both prefetches did as well at 1 thread, less at 2 (20 of 30).
#[cfg(target_arch = "x86_64")]
const L2_PREFETCH_BYTES: usize = 4096;

/// Asks the caches for the `len` values at `at` of `range`, none past its end.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(range: &std::ops::Range<*const f32>, at: usize, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut line = range.start.wrapping_add(at);
    let end = line.wrapping_add(len).min(range.end);
    while line < end {
        // SAFETY: a prefetch reads nothing into the program and cannot fault; `line` lies
        // inside `range`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) };
        line = line.wrapping_add(64 / std::mem::size_of::<f32>());
    }
}

/// Rows whose Δ and gate are computed together, lane by lane, before their state rows.
const ROW_BLOCK: usize = 16;

/// `out = clamp(softplus(raw + bias))` (softplus and bias as `x` says), one simple loop per
/// stage so that each vectorises.
#[inline(always)]
fn steps_of_rows(raw: &[f32], bias: Option<&[f32]>, x: &StepInputs, out: &mut [f32]) {
    out.copy_from_slice(raw);
    if let Some(bias) = bias {
        for (o, b) in out.iter_mut().zip(bias) {
            *o += b;
        }
    }
    if x.dt_softplus {
        for o in out.iter_mut() {
            *o = softplus_fast(*o);
        }
    }
    let (lo, hi) = x.dt_limit;
    for o in out.iter_mut() {
        *o = o.clamp(lo, hi);
    }
}

/// Per-`(head, p)` `A` and Δ (Mamba-1): threaded over ranges of state rows within a
/// sequence. Each block of rows first takes its Δ (softplus) and gate (silu) as one
/// vectorised pass, then updates its state rows one by one, vectorised over `N`.
fn per_row_step(dims: &StepDims, state: &mut [f32], x: &StepInputs, y: &mut [f32]) {
    let (np, nn) = (dims.head_dim, dims.state);
    let rows = dims.heads * np; // per sequence
    let rows_per_group = rows / dims.groups;
    let task_rows = STATE_VALUES_PER_TASK.div_ceil(nn);
    let task = |b: usize, first: usize, s: &mut [f32], y: &mut [f32]| {
        // This task's rows `first ..` of sequence `b`: `s: (count, N)`, `y: (count)`.
        let at = b * rows + first;
        let count = y.len();
        let dt_raw = &x.dt[at..][..count];
        let xs = &x.x[at..][..count];
        let a = &x.a[first * nn..][..count * nn];
        with_simd(
            #[inline(always)]
            || {
                let mut dt = [0.0f32; ROW_BLOCK];
                let mut gate = [1.0f32; ROW_BLOCK];
                for j0 in (0..count).step_by(ROW_BLOCK) {
                    let m = ROW_BLOCK.min(count - j0);
                    steps_of_rows(
                        &dt_raw[j0..][..m],
                        x.dt_bias.map(|v| &v[first + j0..][..m]),
                        x,
                        &mut dt[..m],
                    );
                    if let Some(z) = x.z {
                        for (g, z) in gate.iter_mut().zip(&z[at + j0..][..m]) {
                            *g = silu_fast(*z);
                        }
                    }
                    for j in 0..m {
                        let (r, row) = (j0 + j, first + j0 + j);
                        // (No division for the usual single group.)
                        let g = if dims.groups == 1 {
                            b
                        } else {
                            b * dims.groups + row / rows_per_group
                        };
                        let (bvec, cvec) = (&x.b[g * nn..][..nn], &x.c[g * nn..][..nn]);
                        let xi = xs[r];
                        let ssm = if nn == 16 {
                            state_step16(
                                (&mut s[r * 16..][..16]).try_into().expect("16 values"),
                                a[r * 16..][..16].try_into().expect("16 values"),
                                (
                                    bvec.try_into().expect("N = 16"),
                                    cvec.try_into().expect("N = 16"),
                                ),
                                dt[j],
                                dt[j] * xi,
                            )
                        } else {
                            state_step(
                                &mut s[r * nn..][..nn],
                                &a[r * nn..][..nn],
                                bvec,
                                cvec,
                                dt[j],
                                dt[j] * xi,
                            )
                        };
                        y[r] = (ssm + x.d.map_or(0.0, |v| v[row]) * xi) * gate[j];
                    }
                }
            },
        );
    };
    state
        .par_chunks_mut(rows * nn)
        .zip(y.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(b, (s, y))| {
            s.par_chunks_mut(task_rows * nn)
                .zip(y.par_chunks_mut(task_rows))
                .enumerate()
                .for_each(|(t, (s, y))| task(b, t * task_rows, s, y));
        });
}

/// [`state_step`] for a state of sixteen (Mamba-1's usual N): arrays of known length, so
/// that the update is one vector per operand and `C . h` a tree of halving adds.
#[inline(always)]
fn state_step16(
    h: &mut [f32; 16],
    a: &[f32; 16],
    (b, c): (&[f32; 16], &[f32; 16]),
    dt: f32,
    du: f32,
) -> f32 {
    let mut prod = [0.0f32; 16];
    for n in 0..16 {
        h[n] = exp_fast(dt * a[n]) * h[n] + du * b[n];
        prod[n] = c[n] * h[n];
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for n in 0..width {
            prod[n] += prod[n + width];
        }
    }
    prod[0]
}

/// One step with the same decay for the whole state row (per-head `A`):
/// `s = decay*s + dtx*B`, returns `C . s`.
#[inline(always)]
pub(crate) fn scalar_decay_step(s: &mut [f32], decay: f32, b: &[f32], c: &[f32], dtx: f32) -> f32 {
    let nn = s.len();
    for (s_n, b_n) in s.iter_mut().zip(&b[..nn]) {
        *s_n = decay * *s_n + dtx * b_n;
    }
    dot(c, s)
}
