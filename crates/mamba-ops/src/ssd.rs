//! Mamba-2 state space duality (SSD): the scan with a scalar decay per head.
//!
//! With `g(h) = h / (H / G)` and `dt'` the processed step (bias, softplus, clamp):
//!
//! ```text
//! S_t[h] = exp(dt'_t[h] * A[h]) * S_{t-1}[h] + dt'_t[h] * outer(x_t[h], B_t[g(h)])   (P x N)
//! y_t[h] = S_t[h] @ C_t[g(h)] + D[h] * x_t[h]
//! y_t[h] = y_t[h] * silu(z_t[h])                                                 (optional)
//! ```
//!
//! Layouts follow `mamba_chunk_scan_combined`: `x, z, y: (batch, L, H, P)`, `dt: (batch, L, H)`,
//! `A: (H)`, `B, C: (batch, L, G, N)`, `D: (H)` or `(H, P)`, `dt_bias: (H)`,
//! `initial_states, final_state: (batch, H, P, N)`.
//!
//! The fast path is the chunked algorithm of the Mamba-2 paper: inside each chunk of `Q`
//! steps the output is a masked `(C B^T ∘ decay) X` matmul (the "diagonal" part) plus the
//! contribution of the state entering the chunk; the states between chunks are passed by a
//! short sequential recurrence over chunks. Matmuls go through [`crate::gemm`].

use crate::error::{OpError, Result};
use crate::gemm::{matmul, MatRef};
use crate::math::{exp_fast, process_dt, silu, silu_fast, with_simd};
use rayon::prelude::*;

/// Sizes of one SSD scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsdDims {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    /// Chunk length of the fast path (any value gives the same result up to rounding).
    pub chunk_size: usize,
}

/// Inputs of one scan (contiguous f32).
#[derive(Debug, Clone, Copy)]
pub struct SsdInputs<'a> {
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: Option<&'a [f32]>,
    pub z: Option<&'a [f32]>,
    pub dt_bias: Option<&'a [f32]>,
    pub dt_softplus: bool,
    /// Clamp of Δ after the softplus (`time_step_limit`).
    pub dt_limit: (f32, f32),
    pub initial_states: Option<&'a [f32]>,
}

/// `y: (batch, L, H, P)` and `final_state: (batch, H, P, N)`.
#[derive(Debug, Clone, PartialEq)]
pub struct SsdOutput {
    pub y: Vec<f32>,
    pub final_state: Vec<f32>,
}

fn shape_err(msg: String) -> OpError {
    OpError::Shape { op: "ssd", msg }
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

impl SsdDims {
    /// Checks every input length against these sizes.
    pub fn check(&self, x: &SsdInputs) -> Result<()> {
        let (b, l, h, p, g, n) = (
            self.batch,
            self.len,
            self.heads,
            self.head_dim,
            self.groups,
            self.state,
        );
        if g == 0 || h % g != 0 {
            return Err(shape_err(format!(
                "heads {h} is not a multiple of groups {g}"
            )));
        }
        if self.chunk_size == 0 {
            return Err(shape_err("chunk_size must be at least 1".into()));
        }
        expect_len("x", x.x.len(), b * l * h * p)?;
        expect_len("dt", x.dt.len(), b * l * h)?;
        expect_len("A", x.a.len(), h)?;
        expect_len("B", x.b.len(), b * l * g * n)?;
        expect_len("C", x.c.len(), b * l * g * n)?;
        if let Some(d) = x.d {
            if d.len() != h && d.len() != h * p {
                return Err(shape_err(format!(
                    "D has {} elements, expected {h} or {}",
                    d.len(),
                    h * p
                )));
            }
        }
        if let Some(z) = x.z {
            expect_len("z", z.len(), b * l * h * p)?;
        }
        if let Some(bias) = x.dt_bias {
            expect_len("dt_bias", bias.len(), h)?;
        }
        if let Some(init) = x.initial_states {
            expect_len("initial_states", init.len(), b * h * p * n)?;
        }
        Ok(())
    }

    fn heads_per_group(&self) -> usize {
        self.heads / self.groups
    }

    fn chunks(&self) -> usize {
        self.len.div_ceil(self.chunk_size)
    }
}

impl SsdInputs<'_> {
    /// `D` for head `h`, position `p` (per head or per `(head, p)`).
    #[inline(always)]
    fn skip(&self, dims: &SsdDims, h: usize, p: usize) -> f32 {
        match self.d {
            None => 0.0,
            Some(d) if d.len() == dims.heads => d[h],
            Some(d) => d[h * dims.head_dim + p],
        }
    }

    /// `y` with the `D` skip added and the `z` gate applied, at flat index `i` of `x`.
    #[inline(always)]
    fn finish(&self, dims: &SsdDims, i: usize, y: f32) -> f32 {
        let hp = i % (dims.heads * dims.head_dim);
        let out = y + self.skip(dims, hp / dims.head_dim, hp % dims.head_dim) * self.x[i];
        self.z.map_or(out, |z| out * silu(z[i]))
    }

    /// [`SsdInputs::finish`] for one `(t, h)` row of `P` outputs, vectorised.
    #[inline(always)]
    fn finish_row(&self, dims: &SsdDims, h: usize, x: &[f32], z: Option<&[f32]>, y: &mut [f32]) {
        for (p, (y_p, x_p)) in y.iter_mut().zip(x).enumerate() {
            *y_p += self.skip(dims, h, p) * x_p;
        }
        if let Some(z) = z {
            for (y_p, z_p) in y.iter_mut().zip(z) {
                *y_p *= silu_fast(*z_p);
            }
        }
    }

    /// `dt'` for every `(batch, t, head)`.
    fn processed_dt(&self, dims: &SsdDims) -> Vec<f32> {
        self.dt
            .iter()
            .enumerate()
            .map(|(i, &raw)| {
                let bias = self.dt_bias.map_or(0.0, |v| v[i % dims.heads]);
                process_dt(raw, bias, self.dt_softplus, self.dt_limit)
            })
            .collect()
    }
}

/// The recurrence written like the equations, one step at a time.
pub fn ssd_reference(dims: &SsdDims, x: &SsdInputs) -> Result<SsdOutput> {
    dims.check(x)?;
    let (nb, nl, nh, np, ng, nn) = (
        dims.batch,
        dims.len,
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
    );
    let dtp = x.processed_dt(dims);
    let mut y = vec![0.0; x.x.len()];
    let mut final_state = x
        .initial_states
        .map_or_else(|| vec![0.0; nb * nh * np * nn], <[f32]>::to_vec);
    for b in 0..nb {
        for h in 0..nh {
            let g = h / dims.heads_per_group();
            let s = &mut final_state[(b * nh + h) * np * nn..][..np * nn];
            for t in 0..nl {
                let dt = dtp[(b * nl + t) * nh + h];
                let decay = (dt * x.a[h]).exp();
                let bc = ((b * nl + t) * ng + g) * nn;
                for p in 0..np {
                    let i = ((b * nl + t) * nh + h) * np + p;
                    let mut acc = 0.0;
                    for n in 0..nn {
                        let s_pn = &mut s[p * nn + n];
                        *s_pn = decay * *s_pn + dt * x.x[i] * x.b[bc + n];
                        acc += *s_pn * x.c[bc + n];
                    }
                    y[i] = x.finish(dims, i, acc);
                }
            }
        }
    }
    Ok(SsdOutput { y, final_state })
}

/// One chunk's share of the work: its rows of `y`, the state it produces (later replaced
/// by the state entering it), and the running log-decay of each head.
struct ChunkTask<'a> {
    batch: usize,
    start: usize,
    /// `(q, H, P)` rows of `y`.
    y: &'a mut [f32],
    /// `(H, P, N)`.
    state: &'a mut [f32],
    /// `(H, Q)`: `cum[h][i] = sum_{j <= i} dt'_j * A[h]` inside the chunk.
    cum: &'a mut [f32],
}

/// The chunked SSD algorithm (see the module docs).
pub fn ssd(dims: &SsdDims, x: &SsdInputs) -> Result<SsdOutput> {
    dims.check(x)?;
    let (nb, nh, np, nn) = (dims.batch, dims.heads, dims.head_dim, dims.state);
    let (q, nc) = (dims.chunk_size, dims.chunks());
    let dtp = x.processed_dt(dims);
    let mut y = vec![0.0; x.x.len()];
    let mut states = vec![0.0; nb * nc * nh * np * nn];
    let mut cums = vec![0.0; nb * nc * nh * q];
    let mut tasks = chunk_tasks(dims, &mut y, &mut states, &mut cums);
    tasks
        .par_iter_mut()
        .for_each(|task| chunk_diagonal_and_state(dims, x, &dtp, task));
    let final_state = pass_states_between_chunks(dims, x.initial_states, &mut states, &cums);
    // The tasks' `state` now hold the state entering each chunk.
    let mut tasks = chunk_tasks(dims, &mut y, &mut states, &mut cums);
    tasks
        .par_iter_mut()
        .for_each(|task| chunk_off_diagonal_and_finish(dims, x, task));
    Ok(SsdOutput { y, final_state })
}

fn chunk_tasks<'a>(
    dims: &SsdDims,
    y: &'a mut [f32],
    states: &'a mut [f32],
    cums: &'a mut [f32],
) -> Vec<ChunkTask<'a>> {
    let (nl, nh, np, nn, q) = (
        dims.len,
        dims.heads,
        dims.head_dim,
        dims.state,
        dims.chunk_size,
    );
    let y_chunks = y.chunks_mut(nl * nh * np).enumerate().flat_map(|(b, yb)| {
        yb.chunks_mut(q * nh * np)
            .enumerate()
            .map(move |(c, yc)| (b, c, yc))
    });
    y_chunks
        .zip(states.chunks_mut(nh * np * nn))
        .zip(cums.chunks_mut(nh * q))
        .map(|(((batch, c, y), state), cum)| ChunkTask {
            batch,
            start: c * q,
            y,
            state,
            cum,
        })
        .collect()
}

/// Offset of row `t` of batch `b` in a `(batch, L, K, width)` tensor, at inner index `k`.
#[inline(always)]
fn row_offset(dims: &SsdDims, b: usize, t: usize, k: usize, inner: usize, width: usize) -> usize {
    ((b * dims.len + t) * inner + k) * width
}

/// Within one chunk: the diagonal-block outputs and the state the chunk alone produces.
fn chunk_diagonal_and_state(dims: &SsdDims, x: &SsdInputs, dtp: &[f32], task: &mut ChunkTask) {
    let (nh, np, ng, nn, q) = (
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
        dims.chunk_size,
    );
    let (b, t0) = (task.batch, task.start);
    let ql = task.y.len() / (nh * np);
    let dt_at = |i: usize, h: usize| dtp[(b * dims.len + t0 + i) * nh + h];
    for h in 0..nh {
        let mut acc = 0.0;
        for i in 0..ql {
            acc += dt_at(i, h) * x.a[h];
            task.cum[h * q + i] = acc;
        }
    }
    // C_t . B_s for every pair in the chunk, once per group: (G, ql, ql).
    let mut cb = vec![0.0; ng * ql * ql];
    for (g, cb_g) in cb.chunks_mut(ql * ql).enumerate() {
        let at = row_offset(dims, b, t0, g, ng, nn);
        matmul(
            (ql, ql, nn),
            cb_g,
            ql,
            MatRef::rows(&x.c[at..], ng * nn),
            MatRef::transposed(&x.b[at..], ng * nn),
            false,
        );
    }
    let mut m = vec![0.0; ql * ql];
    let mut b_weighted = vec![0.0; ql * nn];
    for h in 0..nh {
        let g = h / dims.heads_per_group();
        let cum = &task.cum[h * q..][..ql];
        // M[i][j] = (C_i . B_j) exp(cum_i - cum_j) dt'_j for j <= i.
        let dt_h: Vec<f32> = (0..ql).map(|j| dt_at(j, h)).collect();
        with_simd(
            #[inline(always)]
            || {
                for (i, m_row) in m.chunks_mut(ql).enumerate() {
                    let cb_row = &cb[(g * ql + i) * ql..][..=i];
                    let (lower, upper) = m_row.split_at_mut(i + 1);
                    for (j, m_ij) in lower.iter_mut().enumerate() {
                        *m_ij = cb_row[j] * exp_fast(cum[i] - cum[j]) * dt_h[j];
                    }
                    upper.fill(0.0);
                }
            },
        );
        let x_at = row_offset(dims, b, t0, h, nh, np);
        matmul(
            (ql, np, ql),
            &mut task.y[h * np..],
            nh * np,
            MatRef::rows(&m, ql),
            MatRef::rows(&x.x[x_at..], nh * np),
            false,
        );
        // The chunk's own state: sum_j exp(cum_last - cum_j) dt'_j outer(x_j, B_j).
        let bc_at = row_offset(dims, b, t0, g, ng, nn);
        for j in 0..ql {
            let w = (cum[ql - 1] - cum[j]).exp() * dt_at(j, h);
            let src = &x.b[bc_at + j * ng * nn..][..nn];
            b_weighted[j * nn..][..nn]
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = w * s);
        }
        matmul(
            (np, nn, ql),
            &mut task.state[h * np * nn..],
            nn,
            MatRef::transposed(&x.x[x_at..], nh * np),
            MatRef::rows(&b_weighted[..ql * nn], nn),
            false,
        );
    }
}

/// Runs the recurrence over chunks: replaces each chunk's own state with the state entering
/// it and returns the state after the last chunk, `(batch, H, P, N)`.
fn pass_states_between_chunks(
    dims: &SsdDims,
    initial: Option<&[f32]>,
    states: &mut [f32],
    cums: &[f32],
) -> Vec<f32> {
    let (nh, np, nn, q, nc) = (
        dims.heads,
        dims.head_dim,
        dims.state,
        dims.chunk_size,
        dims.chunks(),
    );
    let per_batch = nh * np * nn;
    let mut final_state =
        initial.map_or_else(|| vec![0.0; dims.batch * per_batch], <[f32]>::to_vec);
    final_state
        .par_chunks_mut(per_batch)
        .zip(states.par_chunks_mut(nc * per_batch))
        .zip(cums.par_chunks(nc * nh * q))
        .enumerate()
        .for_each(|(_, ((running, batch_states), batch_cums))| {
            for c in 0..nc {
                let ql = (dims.len - c * q).min(q);
                let chunk_states = &mut batch_states[c * per_batch..][..per_batch];
                for h in 0..nh {
                    let decay = batch_cums[(c * nh + h) * q + ql - 1].exp();
                    let own = &mut chunk_states[h * np * nn..][..np * nn];
                    let run = &mut running[h * np * nn..][..np * nn];
                    for (o, r) in own.iter_mut().zip(run.iter_mut()) {
                        let produced = *o;
                        *o = *r;
                        *r = decay * *r + produced;
                    }
                }
            }
        });
    final_state
}

/// Adds the contribution of the state entering the chunk, then the `D` skip and `z` gate.
fn chunk_off_diagonal_and_finish(dims: &SsdDims, x: &SsdInputs, task: &mut ChunkTask) {
    let (nh, np, ng, nn, q) = (
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
        dims.chunk_size,
    );
    let (b, t0) = (task.batch, task.start);
    let ql = task.y.len() / (nh * np);
    let mut from_state = vec![0.0; ql * np];
    for h in 0..nh {
        let g = h / dims.heads_per_group();
        let c_at = row_offset(dims, b, t0, g, ng, nn);
        matmul(
            (ql, np, nn),
            &mut from_state,
            np,
            MatRef::rows(&x.c[c_at..], ng * nn),
            MatRef::transposed(&task.state[h * np * nn..][..np * nn], nn),
            false,
        );
        for i in 0..ql {
            let decay = task.cum[h * q + i].exp();
            let row = &mut task.y[(i * nh + h) * np..][..np];
            row.iter_mut()
                .zip(&from_state[i * np..][..np])
                .for_each(|(y, s)| *y += decay * s);
        }
    }
    let first = row_offset(dims, b, t0, 0, nh, np);
    with_simd(
        #[inline(always)]
        || {
            for (r, row) in task.y.chunks_mut(np).enumerate() {
                let at = first + r * np;
                x.finish_row(
                    dims,
                    r % nh,
                    &x.x[at..at + np],
                    x.z.map(|z| &z[at..at + np]),
                    row,
                );
            }
        },
    );
}
