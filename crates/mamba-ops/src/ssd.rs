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
use crate::gemm::{matmul, matmul_bf16_nt_here, round_to_bf16_here, MatRef, Products};
use crate::layout::transpose_into;
use crate::math::{
    dot, exp_fast, lane_sum, process_dt, process_dt_with_grad, silu, silu_fast, silu_grad_fast,
    with_simd, with_subnormals_flushed,
};
use crate::parallel::{fold_in_blocks, sum_in_order};
use crate::scratch::{give_back, reused};
use crate::selective_scan::narrow;
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;

/// Rows `(batch, t)` per block of the deterministic `D` gradient sum.
const ROWS_PER_BLOCK: usize = 64;

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
        match self.d {
            None => {}
            Some(d) if d.len() == dims.heads => {
                let d = d[h];
                y.iter_mut().zip(x).for_each(|(y_p, x_p)| *y_p += d * x_p);
            }
            Some(d) => {
                let d = &d[h * dims.head_dim..][..y.len()];
                for ((y_p, x_p), d_p) in y.iter_mut().zip(x).zip(d) {
                    *y_p += d_p * x_p;
                }
            }
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

/// The chunked SSD algorithm (see the module docs), its products in f32.
pub fn ssd(dims: &SsdDims, x: &SsdInputs) -> Result<SsdOutput> {
    ssd_with(dims, x, Products::F32)
}

/// [`ssd`] with the chunks' products in the given precision. With [`Products::Bf16`] the
/// products that sum over a chunk's positions (the diagonal blocks, each chunk's own state)
/// and the state entering each chunk times `C` round their operands to bf16, as mamba_ssm's
/// chunked kernels do for a bf16 model; `C B^T`, the decays, the recurrence between chunks and
/// every sum stay f32. (The positions are made the operands' inner axis first, by one
/// transpose of the chunk's `x` and `B`: the bf16 dot products pair neighbours along it.)
pub fn ssd_with(dims: &SsdDims, x: &SsdInputs, products: Products) -> Result<SsdOutput> {
    let mut y = vec![0.0; x.x.len()];
    let final_state = ssd_into(dims, x, products, &mut y)?;
    Ok(SsdOutput { y, final_state })
}

/// [`ssd_with`] writing `y: (batch, L, H, P)` into the caller's buffer (every value
/// overwritten, none read); returns the final state `(batch, H, P, N)`.
pub fn ssd_into(
    dims: &SsdDims,
    x: &SsdInputs,
    products: Products,
    y: &mut [f32],
) -> Result<Vec<f32>> {
    dims.check(x)?;
    expect_len("y", y.len(), x.x.len())?;
    let dtp = &x.processed_dt(dims);
    let (nb, nh, np, nn) = (dims.batch, dims.heads, dims.head_dim, dims.state);
    let (q, nc) = (dims.chunk_size, dims.chunks());
    let mut states_buf = reused(&CHUNK_STATES, nb * nc * nh * np * nn);
    let states = &mut states_buf[..nb * nc * nh * np * nn];
    let mut cums = vec![0.0; nb * nc * nh * q];
    for_each_chunk(chunk_tasks(dims, y, states, &mut cums), |task| {
        chunk_diagonal_and_state(dims, x, dtp, task, products)
    });
    let final_state =
        pass_between_chunks(dims, x.initial_states, states, &cums, Direction::Forward);
    // The tasks' `state` now hold the state entering each chunk.
    for_each_chunk(chunk_tasks(dims, y, states, &mut cums), |task| {
        chunk_off_diagonal_and_finish(dims, x, task, products)
    });
    give_back(&CHUNK_STATES, states_buf);
    Ok(final_state)
}

thread_local! {
    /// The states the chunks of a forward call produce (then the states entering them),
    /// kept by the calling thread from call to call.
    static CHUNK_STATES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A chunk task's largest working buffer (its weighted inputs, then the contribution of
    /// the state entering it), kept by each thread from task to task (both as in
    /// [`crate::scratch`]).
    static TASK_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on every chunk task over rayon's threads, each with subnormal values flushed to
/// zero ([`with_subnormals_flushed`]): the chunks' decays make them by the thousand.
fn for_each_chunk(mut tasks: Vec<ChunkTask>, f: impl Fn(&mut ChunkTask) + Sync) {
    tasks
        .par_iter_mut()
        .for_each(|task| with_subnormals_flushed(|| f(task)));
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
fn chunk_diagonal_and_state(
    dims: &SsdDims,
    x: &SsdInputs,
    dtp: &[f32],
    task: &mut ChunkTask,
    products: Products,
) {
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
    let hpg = dims.heads_per_group();
    let position_major = products
        .in_bf16()
        .then(|| PositionMajor::of_chunk(dims, x, task));
    let mut factored = vec![false; nh];
    for g in 0..ng {
        let cb_g = &cb[g * ql * ql..][..ql * ql];
        let inputs = (dtp, position_major.as_ref());
        diagonal_factored(dims, x, inputs, task, cb_g, g, &mut factored);
    }
    let mut m = vec![0.0; ql * ql];
    for h in (0..nh).filter(|&h| !factored[h]) {
        let g = h / hpg;
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
        // y = M X, M lower triangular: the first half of the rows needs only the first half
        // of the columns (three quarters of the full product's work).
        let x_at = row_offset(dims, b, t0, h, nh, np);
        let top = ql / 2;
        // In bf16: M rounded, and x_h^T (P, ql) as the rows the products sum along.
        let bf16_factors = position_major
            .as_ref()
            .map(|pm| (rounded(&m), rounded(&pm.x_t[h * np * ql..][..np * ql])));
        for (rows, cols) in [(0..top, top), (top..ql, ql)] {
            if rows.is_empty() {
                continue;
            }
            let out = &mut task.y[rows.start * nh * np + h * np..];
            match &bf16_factors {
                Some((m16, x16)) => {
                    let m16 = &m16[rows.start * ql..];
                    matmul_bf16_nt_here(
                        (rows.len(), np, cols),
                        out,
                        nh * np,
                        (m16, ql),
                        (x16, ql),
                        false,
                    );
                }
                None => matmul(
                    (rows.len(), np, cols),
                    out,
                    nh * np,
                    MatRef::rows(&m[rows.start * ql..], ql),
                    MatRef::rows(&x.x[x_at..], nh * np),
                    false,
                ),
            };
        }
    }
    // The chunk's own state, S[h, p, n] = sum_j xw[j, h, p] B[j, n] with the inputs weighted
    // xw[j, h, p] = exp(cum_last[h] - cum[h][j]) dt'_{j,h} x[j, h, p]: one product per group
    // for all of its heads, (heads P, N) = xw^T (heads P, ql) B (ql, N).
    let cum_last: Vec<Option<f32>> = (0..nh).map(|h| Some(task.cum[h * q + ql - 1])).collect();
    if let Some(pm) = &position_major {
        return pm.chunk_own_state(dims, dtp, task, &cum_last);
    }
    let mut xw_buf = reused(&TASK_SCRATCH, ql * nh * np);
    let xw = &mut xw_buf[..ql * nh * np]; // (ql, H, P)
    decay_weighted_inputs(dims, x, dtp, task, (0..nh, &cum_last), xw);
    for g in 0..ng {
        let h0 = g * hpg;
        matmul(
            (hpg * np, nn, ql),
            &mut task.state[h0 * np * nn..],
            nn,
            MatRef::transposed(&xw[h0 * np..], nh * np),
            MatRef::rows(&x.b[row_offset(dims, b, t0, g, ng, nn)..], ng * nn),
            false,
        );
    }
    give_back(&TASK_SCRATCH, xw_buf);
}

/// Rows of a diagonal block taken by one product of the factored form (below).
const FACTORED_ROWS: usize = 32;

/// Largest distance of a decay exponent from its reference point in the factored form:
/// every factor stays within `exp(±60)` ≈ 1e±26, so that inputs up to 1e12 stay finite.
const FACTORED_REACH: f32 = 60.0;

/// The diagonal blocks of group `g`'s heads in factored form, one product per
/// [`FACTORED_ROWS`] rows for all the heads whose decays allow it (marked in `factored`;
/// the others keep a product of their own). For the rows `I` of a block and a reference
/// point `mid_h` (the middle of `cum_h` over `I`), `exp(cum_i - cum_j) = exp(cum_i - mid_h)
/// exp(mid_h - cum_j)`, so
///
/// ```text
/// y[i, h, :] = exp(cum_h[i] - mid_h) sum_{j <= i} (C_i . B_j) dt'_h[j] exp(mid_h - cum_h[j]) x[j, h, :]
/// ```
///
/// is `tril(C B^T)[I, ..end(I)]` times the weighted inputs `(end(I), heads P)`, then each row
/// scaled. A head qualifies when every factor of every block is within [`FACTORED_REACH`]
/// of zero in the exponent (with `cum` falling, the columns before `I` give factors below
/// one, so this is half the spread of `cum` over each block).
fn diagonal_factored(
    dims: &SsdDims,
    x: &SsdInputs,
    (dtp, position_major): (&[f32], Option<&PositionMajor>),
    task: &mut ChunkTask,
    cb: &[f32],
    g: usize,
    factored: &mut [bool],
) {
    let (nh, np, q) = (dims.heads, dims.head_dim, dims.chunk_size);
    let ql = task.y.len() / (nh * np);
    let heads = g * dims.heads_per_group()..(g + 1) * dims.heads_per_group();
    let blocks: Vec<Range<usize>> = (0..ql)
        .step_by(FACTORED_ROWS)
        .map(|s| s..(s + FACTORED_ROWS).min(ql))
        .collect();
    // Each head's reference point per block, None for a head that does not qualify:
    // references[k][block].
    let references: Vec<Option<Vec<f32>>> = heads
        .clone()
        .map(|h| block_references(&task.cum[h * q..][..ql], &blocks))
        .collect();
    if references.iter().all(Option::is_none) {
        return;
    }
    let width = heads.len() * np;
    let mut lower = cb.to_vec(); // tril(C B^T): (ql, ql)
    for (i, row) in lower.chunks_mut(ql).enumerate() {
        row[i + 1..].fill(0.0);
    }
    let mut factors = DiagonalFactors::new(position_major, lower, ql * width);
    for (block, rows) in blocks.iter().enumerate() {
        let mids: Vec<Option<f32>> = references
            .iter()
            .map(|r| r.as_ref().map(|r| r[block]))
            .collect();
        let out_at = rows.start * nh * np + heads.start * np;
        match &mut factors {
            DiagonalFactors::F32 { lower, weighted } => {
                decay_weighted_inputs(
                    dims,
                    x,
                    dtp,
                    task,
                    (heads.clone(), &mids),
                    &mut weighted[..rows.end * width],
                );
                matmul(
                    (rows.len(), width, rows.end),
                    &mut task.y[out_at..],
                    nh * np,
                    MatRef::rows(&lower[rows.start * ql..], ql),
                    MatRef::rows(weighted, width),
                    false,
                );
            }
            DiagonalFactors::Bf16 {
                inputs,
                lower,
                weighted,
            } => {
                let weighted = &mut weighted[..rows.end * width]; // (heads P, rows.end)
                inputs.decay_weighted(dims, dtp, task, (heads.clone(), &mids), weighted);
                matmul_bf16_nt_here(
                    (rows.len(), width, rows.end),
                    &mut task.y[out_at..],
                    nh * np,
                    (&lower[rows.start * ql..], ql),
                    (weighted, rows.end),
                    false,
                );
            }
        }
        for i in rows.clone() {
            let y_i = &mut task.y[i * nh * np..][..nh * np];
            for (h, mid) in heads.clone().zip(&mids) {
                if let Some(mid) = mid {
                    let e = (task.cum[h * q + i] - mid).exp();
                    y_i[h * np..][..np].iter_mut().for_each(|v| *v *= e);
                }
            }
        }
    }
    for (h, r) in heads.zip(&references) {
        factored[h] = r.is_some();
    }
    if let DiagonalFactors::F32 { weighted, .. } = factors {
        give_back(&TASK_SCRATCH, weighted);
    }
}

/// The reference point of each block of rows for one head's running sum `cum`: the middle
/// of `cum` over the block, provided every factor of the block stays within
/// [`FACTORED_REACH`] in the exponent (the block's own rows, and every earlier column down to
/// the lowest `cum` so far); None when some block's factors would reach further.
fn block_references(cum: &[f32], blocks: &[Range<usize>]) -> Option<Vec<f32>> {
    let mut lowest = f32::INFINITY;
    blocks
        .iter()
        .map(|rows| {
            let (lo, hi) = cum[rows.clone()]
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), c| {
                    (lo.min(*c), hi.max(*c))
                });
            lowest = lowest.min(lo);
            let mid = 0.5 * (lo + hi);
            (hi - mid <= FACTORED_REACH && mid - lowest <= FACTORED_REACH).then_some(mid)
        })
        .collect()
}

/// The chunk's inputs weighted by their decay towards a reference point, for the first
/// `out.len() / (heads P)` positions of the chunk and the heads `heads`:
/// `out[j, h, :] = dt'_h[j] exp(reference_h - cum_h[j]) x[j, h, :]` (zero for a head without
/// a reference), `out: (positions, heads P)`.
fn decay_weighted_inputs(
    dims: &SsdDims,
    x: &SsdInputs,
    dtp: &[f32],
    task: &ChunkTask,
    (heads, references): (Range<usize>, &[Option<f32>]),
    out: &mut [f32],
) {
    let (nh, np, q) = (dims.heads, dims.head_dim, dims.chunk_size);
    let (b, t0) = (task.batch, task.start);
    let width = heads.len() * np;
    with_simd(
        #[inline(always)]
        || {
            for (j, out_j) in out.chunks_mut(width).enumerate() {
                let x_j = &x.x[row_offset(dims, b, t0 + j, heads.start, nh, np)..][..width];
                for ((h, reference), (out_jh, x_jh)) in heads
                    .clone()
                    .zip(references)
                    .zip(out_j.chunks_mut(np).zip(x_j.chunks(np)))
                {
                    let scale = reference.map_or(0.0, |r| {
                        (r - task.cum[h * q + j]).exp() * dtp[(b * dims.len + t0 + j) * nh + h]
                    });
                    out_jh
                        .iter_mut()
                        .zip(x_jh)
                        .for_each(|(o, v)| *o = scale * v);
                }
            }
        },
    );
}

/// `v` rounded to bf16.
fn rounded(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    round_to_bf16_here(v, &mut out);
    out
}

/// The operands of [`diagonal_factored`]'s products: `tril(C B^T)` and the decay-weighted
/// inputs, in f32 `(positions, heads P)`, or in bf16 with the positions innermost `(heads P,
/// positions)`, the layout the bf16 products sum over.
enum DiagonalFactors<'a> {
    F32 {
        lower: Vec<f32>,
        weighted: Vec<f32>,
    },
    Bf16 {
        inputs: &'a PositionMajor,
        lower: Vec<bf16>,
        weighted: Vec<bf16>,
    },
}

impl<'a> DiagonalFactors<'a> {
    /// Room for `len` weighted inputs beside `lower`, in the precision `position_major` asks.
    fn new(position_major: Option<&'a PositionMajor>, lower: Vec<f32>, len: usize) -> Self {
        match position_major {
            None => DiagonalFactors::F32 {
                lower,
                weighted: reused(&TASK_SCRATCH, len),
            },
            Some(inputs) => DiagonalFactors::Bf16 {
                inputs,
                lower: rounded(&lower),
                weighted: vec![bf16::ZERO; len],
            },
        }
    }
}

/// One chunk's inputs with the positions innermost, for the bf16 products that sum over
/// them: `x^T: (H P, ql)` in f32 (weighted by decays before rounding) and `B^T: (G N, ql)`.
struct PositionMajor {
    /// Positions in the chunk.
    len: usize,
    x_t: Vec<f32>,
    b_t: Vec<bf16>,
}

impl PositionMajor {
    fn of_chunk(dims: &SsdDims, x: &SsdInputs, task: &ChunkTask) -> Self {
        let (nh, np, ng, nn) = (dims.heads, dims.head_dim, dims.groups, dims.state);
        let (b, t0) = (task.batch, task.start);
        let len = task.y.len() / (nh * np);
        let mut x_t = vec![0.0; nh * np * len];
        let x_rows = &x.x[row_offset(dims, b, t0, 0, nh, np)..][..len * nh * np];
        transpose_into(x_rows, len, nh * np, &mut x_t);
        let mut b_t = vec![0.0; ng * nn * len];
        let b_rows = &x.b[row_offset(dims, b, t0, 0, ng, nn)..][..len * ng * nn];
        transpose_into(b_rows, len, ng * nn, &mut b_t);
        PositionMajor {
            len,
            x_t,
            b_t: rounded(&b_t),
        }
    }

    /// [`decay_weighted_inputs`] with the positions innermost and rounded to bf16:
    /// `out[(k P + p) len' + j] = dt'_h[j] exp(reference_h - cum_h[j]) x[j, h, p]` for the
    /// `k`-th head `h` of `heads` and the first `len' = out.len() / (heads P)` positions.
    fn decay_weighted(
        &self,
        dims: &SsdDims,
        dtp: &[f32],
        task: &ChunkTask,
        (heads, references): (Range<usize>, &[Option<f32>]),
        out: &mut [bf16],
    ) {
        let (nh, np, q) = (dims.heads, dims.head_dim, dims.chunk_size);
        let len = out.len() / (heads.len() * np);
        let at = task.batch * dims.len + task.start;
        let (mut scale, mut row) = (vec![0.0; len], vec![0.0; len]);
        let pairs = heads.zip(references).zip(out.chunks_exact_mut(np * len));
        with_simd(
            #[inline(always)]
            || {
                for ((h, reference), out_h) in pairs {
                    let Some(reference) = reference else {
                        out_h.fill(bf16::ZERO);
                        continue;
                    };
                    let cum = &task.cum[h * q..][..len];
                    for (j, (s, c)) in scale.iter_mut().zip(cum).enumerate() {
                        *s = exp_fast(reference - c) * dtp[(at + j) * nh + h];
                    }
                    for (p, out_hp) in out_h.chunks_exact_mut(len).enumerate() {
                        let x_hp = &self.x_t[(h * np + p) * self.len..][..len];
                        row.iter_mut()
                            .zip(x_hp.iter().zip(&scale))
                            .for_each(|(r, (v, s))| *r = v * s);
                        round_to_bf16_here(&row, out_hp);
                    }
                }
            },
        );
    }

    /// The chunk's own state in bf16 products: per group, `S (heads P, N) = xw^T (heads P,
    /// ql) B (ql, N)` with `xw` weighted towards the chunk's last position (`cum_last`).
    fn chunk_own_state(
        &self,
        dims: &SsdDims,
        dtp: &[f32],
        task: &mut ChunkTask,
        cum_last: &[Option<f32>],
    ) {
        let (nh, np, nn, len) = (dims.heads, dims.head_dim, dims.state, self.len);
        let hpg = dims.heads_per_group();
        let mut xw_t = vec![bf16::ZERO; nh * np * len]; // (H P, ql)
        self.decay_weighted(dims, dtp, task, (0..nh, cum_last), &mut xw_t);
        for g in 0..dims.groups {
            let h0 = g * hpg;
            matmul_bf16_nt_here(
                (hpg * np, nn, len),
                &mut task.state[h0 * np * nn..],
                nn,
                (&xw_t[h0 * np * len..], len),
                (&self.b_t[g * nn * len..], len),
                false,
            );
        }
    }
}

/// Which way [`pass_between_chunks`] walks the chunks.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// States, from the first chunk to the last.
    Forward,
    /// State gradients, from the last chunk to the first.
    Backward,
}

/// Runs `running = exp(cum_last(c)) * running + own(c)` over the chunks `c` in `direction`,
/// starting from `start` (zeros when absent), and replaces each chunk's `own` value with the
/// running value that reaches it; returns the value after the last chunk visited,
/// `(batch, H, P, N)`.
///
/// Forward, over the states the chunks produce alone: leaves the state entering each chunk
/// and returns the final state. Backward, over each chunk's own gradient of its entering
/// state: leaves the gradient of the state leaving each chunk and returns the gradient of
/// the initial state.
fn pass_between_chunks(
    dims: &SsdDims,
    start: Option<&[f32]>,
    per_chunk: &mut [f32],
    cums: &[f32],
    direction: Direction,
) -> Vec<f32> {
    let (nh, np, nn, q, nc) = (
        dims.heads,
        dims.head_dim,
        dims.state,
        dims.chunk_size,
        dims.chunks(),
    );
    let per_head = np * nn;
    let order: Vec<usize> = match direction {
        Direction::Forward => (0..nc).collect(),
        Direction::Backward => (0..nc).rev().collect(),
    };
    let mut last = start.map_or_else(|| vec![0.0; dims.batch * nh * per_head], <[f32]>::to_vec);
    // Every chunk's value of each (batch, head), in chunk order: by_head[b H + h][c].
    let mut by_head: Vec<Vec<&mut [f32]>> = (0..dims.batch * nh)
        .map(|_| Vec::with_capacity(nc))
        .collect();
    for (k, value) in per_chunk.chunks_mut(per_head).enumerate() {
        let (b, h) = (k / (nc * nh), k % nh);
        by_head[b * nh + h].push(value);
    }
    last.par_chunks_mut(per_head)
        .zip(by_head.par_iter_mut())
        .enumerate()
        .for_each(|(bh, (running, chunks))| {
            let (b, h) = (bh / nh, bh % nh);
            with_subnormals_flushed(|| {
                with_simd(
                    #[inline(always)]
                    || {
                        for &c in &order {
                            let ql = (dims.len - c * q).min(q);
                            let decay = cums[((b * nc + c) * nh + h) * q + ql - 1].exp();
                            for (o, r) in chunks[c].iter_mut().zip(running.iter_mut()) {
                                let produced = *o;
                                *o = *r;
                                *r = decay * *r + produced;
                            }
                        }
                    },
                )
            })
        });
    last
}

/// Adds the contribution of the state entering the chunk, then the `D` skip and `z` gate.
fn chunk_off_diagonal_and_finish(
    dims: &SsdDims,
    x: &SsdInputs,
    task: &mut ChunkTask,
    products: Products,
) {
    let (nh, np, ng, nn, q) = (
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
        dims.chunk_size,
    );
    let (b, t0) = (task.batch, task.start);
    let ql = task.y.len() / (nh * np);
    // C_i . S[h, p, :] for every head of a group at once: (ql, heads P) = C (ql, N) S^T.
    let mut from_state_buf = reused(&TASK_SCRATCH, ql * nh * np);
    let from_state = &mut from_state_buf[..ql * nh * np]; // (ql, H, P)
    let hpg = dims.heads_per_group();
    let c_rows = &x.c[row_offset(dims, b, t0, 0, ng, nn)..][..ql * ng * nn]; // (ql, G N)
    if products.in_bf16() {
        let (c16, s16) = (rounded(c_rows), rounded(task.state));
        for g in 0..ng {
            let h0 = g * hpg;
            matmul_bf16_nt_here(
                (ql, hpg * np, nn),
                &mut from_state[h0 * np..],
                nh * np,
                (&c16[g * nn..], ng * nn),
                (&s16[h0 * np * nn..], nn),
                false,
            );
        }
    } else {
        for g in 0..ng {
            let h0 = g * hpg;
            matmul(
                (ql, hpg * np, nn),
                &mut from_state[h0 * np..],
                nh * np,
                MatRef::rows(&c_rows[g * nn..], ng * nn),
                MatRef::transposed(&task.state[h0 * np * nn..][..hpg * np * nn], nn),
                false,
            );
        }
    }
    let first = row_offset(dims, b, t0, 0, nh, np);
    let cum = &task.cum;
    with_simd(
        #[inline(always)]
        || {
            let rows = task.y.chunks_mut(np).zip(from_state.chunks(np));
            for (r, (y_ih, s_ih)) in rows.enumerate() {
                let (i, h) = (r / nh, r % nh);
                let decay = cum[h * q + i].exp();
                y_ih.iter_mut().zip(s_ih).for_each(|(y, s)| *y += decay * s);
                let at = first + r * np;
                x.finish_row(
                    dims,
                    h,
                    &x.x[at..at + np],
                    x.z.map(|z| &z[at..at + np]),
                    y_ih,
                );
            }
        },
    );
    give_back(&TASK_SCRATCH, from_state_buf);
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

/// Gradients of a scalar loss with respect to every SSD input, each in its input's layout
/// (`D`'s gradient has `D`'s shape). The optional fields are `Some` exactly when the input
/// was given.
#[derive(Debug, Clone, PartialEq)]
pub struct SsdGrads {
    pub x: Vec<f32>,
    /// With respect to the raw `dt` (before `dt_bias`, the softplus and the clamp).
    pub dt: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    pub dt_bias: Option<Vec<f32>>,
    pub initial_states: Option<Vec<f32>>,
}

impl SsdDims {
    /// Checks the incoming gradients: `grad_y: (batch, L, H, P)`,
    /// `grad_final_state: (batch, H, P, N)`.
    fn check_grads(&self, grad_y: &[f32], grad_final_state: Option<&[f32]>) -> Result<()> {
        expect_len(
            "grad_y",
            grad_y.len(),
            self.batch * self.len * self.heads * self.head_dim,
        )?;
        if let Some(g) = grad_final_state {
            expect_len(
                "grad_final_state",
                g.len(),
                self.batch * self.heads * self.head_dim * self.state,
            )?;
        }
        Ok(())
    }
}

impl SsdInputs<'_> {
    /// Index into `D` for head `h`, position `p`.
    #[inline(always)]
    fn skip_index(&self, dims: &SsdDims, h: usize, p: usize) -> usize {
        match self.d {
            Some(d) if d.len() == dims.heads * dims.head_dim => h * dims.head_dim + p,
            _ => h,
        }
    }
}

/// The backward pass written like the equations, in f64, one step at a time.
///
/// The forward recurrence is rerun keeping every state (`S_0` = initial state, `S_t` after
/// step `t`, each `P x N`); then, walking back from `G = grad_final_state` (or 0), with
/// `a_t = exp(dt_t A)`, for `t = L .. 1`:
///
/// ```text
/// go_t   = g_y_t * silu(z_t)        g_z_t = g_y_t * (S_t C_t + D x_t) * silu'(z_t)
/// g_D   += go_t * x_t               g_x_t = go_t * D + dt_t * G B_t
/// G     += outer(go_t, C_t)         g_C_t = S_t^T go_t
/// g_B_t  = dt_t * G^T x_t           g_A  += <G, S_{t-1}> * a_t * dt_t
/// g_dt_t = <G, S_{t-1}> * a_t * A + x_t^T G B_t
/// G      = a_t * G                  (the gradient of S_{t-1})
/// g_rawdt_t = g_dt_t * d dt_t / d raw_t     (sigmoid through the softplus, 0 where clamped)
/// ```
///
/// and finally `g_dt_bias = sum g_rawdt`, `g_initial_states = G`. `B`/`C` gradients add
/// up over the heads of a group.
// Index loops on purpose: the reference reads like the equations' subscripts.
#[allow(clippy::needless_range_loop)]
pub fn ssd_backward_reference(
    dims: &SsdDims,
    x: &SsdInputs,
    grad_y: &[f32],
    grad_final_state: Option<&[f32]>,
) -> Result<SsdGrads> {
    use crate::math::f64_ref::{process_dt, silu, silu_grad};
    dims.check(x)?;
    dims.check_grads(grad_y, grad_final_state)?;
    let (nb, nl, nh, np, ng, nn) = (
        dims.batch,
        dims.len,
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
    );
    let f = |v: &[f32], i: usize| v[i] as f64;
    let mut g = SsdGrads64::zeros(dims, x);
    for b in 0..nb {
        for h in 0..nh {
            let gr = h / dims.heads_per_group();
            let bias = x.dt_bias.map_or(0.0, |v| v[h]);
            let (dt, dt_grad): (Vec<f64>, Vec<f64>) = (0..nl)
                .map(|t| process_dt(x.dt[(b * nl + t) * nh + h], bias, x.dt_softplus, x.dt_limit))
                .unzip();
            let a = x.a[h] as f64;
            let xi = |t: usize, p: usize| ((b * nl + t) * nh + h) * np + p;
            let bci = |t: usize, n: usize| ((b * nl + t) * ng + gr) * nn + n;
            // s[t][p * N + n]: the state after step t; s[0] is the initial state.
            let mut s = vec![vec![0.0f64; np * nn]; nl + 1];
            if let Some(init) = x.initial_states {
                let at = (b * nh + h) * np * nn;
                s[0] = init[at..at + np * nn].iter().map(|&v| v as f64).collect();
            }
            let mut y = vec![vec![0.0f64; np]; nl];
            for t in 0..nl {
                let decay = (dt[t] * a).exp();
                for p in 0..np {
                    for n in 0..nn {
                        let k = p * nn + n;
                        s[t + 1][k] =
                            decay * s[t][k] + dt[t] * f(x.x, xi(t, p)) * f(x.b, bci(t, n));
                        y[t][p] += s[t + 1][k] * f(x.c, bci(t, n));
                    }
                }
            }
            let mut gs = match grad_final_state {
                Some(gf) => {
                    let at = (b * nh + h) * np * nn;
                    gf[at..at + np * nn].iter().map(|&v| v as f64).collect()
                }
                None => vec![0.0f64; np * nn],
            };
            for t in (0..nl).rev() {
                let decay = (dt[t] * a).exp();
                let mut go = vec![0.0f64; np];
                for (p, go) in go.iter_mut().enumerate() {
                    let i = xi(t, p);
                    let skip_at = x.skip_index(dims, h, p);
                    let skip = x.d.map_or(0.0, |d| f(d, skip_at));
                    let g_y = f(grad_y, i);
                    *go = match x.z {
                        Some(z) => {
                            g.z[i] = g_y * (y[t][p] + skip * f(x.x, i)) * silu_grad(f(z, i));
                            g_y * silu(f(z, i))
                        }
                        None => g_y,
                    };
                    if x.d.is_some() {
                        g.d[skip_at] += *go * f(x.x, i);
                    }
                    g.x[i] = *go * skip;
                }
                for p in 0..np {
                    for n in 0..nn {
                        let k = p * nn + n;
                        gs[k] += go[p] * f(x.c, bci(t, n));
                        g.c[bci(t, n)] += go[p] * s[t + 1][k];
                    }
                }
                let mut g_dt = 0.0;
                for p in 0..np {
                    for n in 0..nn {
                        let k = p * nn + n;
                        let (xv, bv) = (f(x.x, xi(t, p)), f(x.b, bci(t, n)));
                        g_dt += gs[k] * (s[t][k] * decay * a + xv * bv);
                        g.a[h] += gs[k] * s[t][k] * decay * dt[t];
                        g.x[xi(t, p)] += gs[k] * dt[t] * bv;
                        g.b[bci(t, n)] += gs[k] * dt[t] * xv;
                        gs[k] *= decay;
                    }
                }
                let i = (b * nl + t) * nh + h;
                g.dt[i] = g_dt * dt_grad[t];
                g.dt_bias[h] += g.dt[i];
            }
            let at = (b * nh + h) * np * nn;
            g.initial_states[at..at + np * nn].copy_from_slice(&gs);
        }
    }
    Ok(g.narrow(x))
}

/// f64 accumulators of the reference backward, every field allocated.
struct SsdGrads64 {
    x: Vec<f64>,
    dt: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    d: Vec<f64>,
    z: Vec<f64>,
    dt_bias: Vec<f64>,
    initial_states: Vec<f64>,
}

impl SsdGrads64 {
    fn zeros(dims: &SsdDims, x: &SsdInputs) -> Self {
        let zeros = |n: usize| vec![0.0; n];
        SsdGrads64 {
            x: zeros(x.x.len()),
            dt: zeros(x.dt.len()),
            a: zeros(dims.heads),
            b: zeros(x.b.len()),
            c: zeros(x.c.len()),
            d: zeros(x.d.map_or(0, <[f32]>::len)),
            z: zeros(x.x.len()),
            dt_bias: zeros(dims.heads),
            initial_states: zeros(dims.batch * dims.heads * dims.head_dim * dims.state),
        }
    }

    /// Rounds to f32, keeping the optional gradients whose input `x` has.
    fn narrow(self, x: &SsdInputs) -> SsdGrads {
        let keep = |given: bool, v: Vec<f64>| given.then(|| narrow(&v));
        SsdGrads {
            x: narrow(&self.x),
            dt: narrow(&self.dt),
            a: narrow(&self.a),
            b: narrow(&self.b),
            c: narrow(&self.c),
            d: keep(x.d.is_some(), self.d),
            z: keep(x.z.is_some(), self.z),
            dt_bias: keep(x.dt_bias.is_some(), self.dt_bias),
            initial_states: keep(x.initial_states.is_some(), self.initial_states),
        }
    }
}

/// The fast backward pass through the chunked algorithm (see the module docs), threaded
/// over chunks and heads, with the matmul-shaped parts through [`crate::gemm`].
///
/// Inside a chunk, with `l_ij = exp(cum_i - cum_j)` (`j <= i`), `go` the gradient of the
/// ungated output, `S_in` the state entering the chunk and `G` the gradient of the state
/// leaving it, `w_j = dt_j exp(cum_last - cum_j)`:
///
/// ```text
/// GX = go X^T                 M = (C B^T) ∘ l ∘ dt_j      W = GX ∘ l ∘ dt_j      (masked, ql x ql)
/// g_X = M^T go + w ∘ (B G^T)                     g_B = W^T C + w ∘ (X G)
/// g_C = W B + exp(cum) ∘ (go S_in)
/// g_dt_j (direct)  = sum_i (C B^T ∘ l ∘ GX)_ij + exp(cum_last - cum_j) x_j^T G B_j
/// g_cum_i          = rowsum_i(M ∘ GX) - colsum_i(M ∘ GX) + exp(cum_i) go_i . (S_in C_i)
///                    - w_i x_i^T G B_i  [+ sum_j w_j x_j^T G B_j + exp(cum_last) <G, S_in> at i = last]
/// g_dt_j += A * sum_{i >= j} g_cum_i,            g_A = sum_i g_cum_i * sum_{j <= i} dt_j
/// ```
///
/// The state gradients between chunks run backwards like the states run forwards:
/// `g_S_in(c) = exp(cum_last(c)) G(c) + sum_i exp(cum_i) outer(go_i, C_i)`, `G(c-1) = g_S_in(c)`,
/// starting from `grad_final_state`; `g_S_in(0)` is the initial states' gradient. The forward
/// is rerun first for the states entering each chunk (and the output, when `z` needs it).
pub fn ssd_backward(
    dims: &SsdDims,
    x: &SsdInputs,
    grad_y: &[f32],
    grad_final_state: Option<&[f32]>,
) -> Result<SsdGrads> {
    dims.check(x)?;
    dims.check_grads(grad_y, grad_final_state)?;
    let (dtp, dt_grad) = x.processed_dt_with_grad(dims);
    let forward = ChunkForward::run(dims, x, &dtp);
    let gate = gate_and_skip_backward(dims, x, grad_y, forward.out.as_deref());
    let mut grad_states = chunk_own_state_grads(dims, x, &gate.go, &forward.cums);
    let g_init = pass_between_chunks(
        dims,
        grad_final_state,
        &mut grad_states,
        &forward.cums,
        Direction::Backward,
    );
    let context = GradContext {
        dims,
        x,
        dtp: &dtp,
        forward: &forward,
        go: &gate.go,
        grad_states: &grad_states,
        cb: &chunk_cb(dims, x),
    };
    let head_major = context.chunk_grads();
    Ok(head_major.assemble(dims, x, gate, &dt_grad, g_init))
}

impl SsdInputs<'_> {
    /// `dt'` and `d dt' / d dt` for every `(batch, t, head)`.
    fn processed_dt_with_grad(&self, dims: &SsdDims) -> (Vec<f32>, Vec<f32>) {
        self.dt
            .iter()
            .enumerate()
            .map(|(i, &raw)| {
                let bias = self.dt_bias.map_or(0.0, |v| v[i % dims.heads]);
                process_dt_with_grad(raw, bias, self.dt_softplus, self.dt_limit)
            })
            .unzip()
    }
}

/// What the backward pass needs from the forward.
struct ChunkForward {
    /// `(batch, chunks, H, P, N)`: the state entering each chunk.
    states: Vec<f32>,
    /// `(batch, chunks, H, Q)`: cumulative `dt' * A` inside each chunk.
    cums: Vec<f32>,
    /// `(batch, L, H, P)`: the output before the `z` gate (`D` skip included); only with `z`.
    out: Option<Vec<f32>>,
}

impl ChunkForward {
    fn run(dims: &SsdDims, x: &SsdInputs, dtp: &[f32]) -> Self {
        let (nb, nh, np, nn) = (dims.batch, dims.heads, dims.head_dim, dims.state);
        let (q, nc) = (dims.chunk_size, dims.chunks());
        let mut y = vec![0.0; x.x.len()];
        let mut states = vec![0.0; nb * nc * nh * np * nn];
        let mut cums = vec![0.0; nb * nc * nh * q];
        for_each_chunk(chunk_tasks(dims, &mut y, &mut states, &mut cums), |task| {
            chunk_diagonal_and_state(dims, x, dtp, task, Products::F32)
        });
        pass_between_chunks(
            dims,
            x.initial_states,
            &mut states,
            &cums,
            Direction::Forward,
        );
        if x.z.is_some() {
            let ungated = SsdInputs { z: None, ..*x };
            for_each_chunk(chunk_tasks(dims, &mut y, &mut states, &mut cums), |task| {
                chunk_off_diagonal_and_finish(dims, &ungated, task, Products::F32)
            });
        }
        ChunkForward {
            states,
            cums,
            out: x.z.map(|_| y),
        }
    }
}

/// The gate's and skip's gradients: `go = g_y * silu(z)` (the gradient of the ungated
/// output, `(batch, L, H, P)`), `g_z = g_y * out * silu'(z)`, `g_D = sum go * x`.
struct GateGrads {
    go: Vec<f32>,
    z: Option<Vec<f32>>,
    d: Option<Vec<f32>>,
}

fn gate_and_skip_backward(
    dims: &SsdDims,
    x: &SsdInputs,
    grad_y: &[f32],
    out: Option<&[f32]>,
) -> GateGrads {
    let (np, width) = (dims.head_dim, (dims.heads * dims.head_dim).max(1));
    let mut go = grad_y.to_vec();
    let mut gz = x.z.map(|_| vec![0.0; go.len()]);
    if let (Some(z), Some(out), Some(gz)) = (x.z, out, gz.as_deref_mut()) {
        go.par_chunks_mut(width)
            .zip(gz.par_chunks_mut(width))
            .enumerate()
            .for_each(|(r, (go, gz))| {
                let at = r * width;
                let (z, out) = (&z[at..at + go.len()], &out[at..at + go.len()]);
                with_simd(
                    #[inline(always)]
                    || {
                        for (((g, gz), z), o) in go.iter_mut().zip(gz).zip(z).zip(out) {
                            *gz = *g * o * silu_grad_fast(*z);
                            *g *= silu_fast(*z);
                        }
                    },
                );
            });
    }
    let d = x.d.map(|d| {
        let mut rows: Vec<_> = go.chunks(width).zip(x.x.chunks(width)).collect();
        let partials = fold_in_blocks(
            &mut rows,
            ROWS_PER_BLOCK,
            || vec![0.0; d.len()],
            |mut g_d, (go, xs)| {
                for (i, (g, xv)) in go.iter().zip(xs.iter()).enumerate() {
                    g_d[x.skip_index(dims, i / np, i % np)] += g * xv;
                }
                g_d
            },
        );
        sum_in_order(partials, d.len())
    });
    GateGrads { go, z: gz, d }
}

/// Each chunk's own gradient of the state entering it, `sum_i exp(cum_i) outer(go_i, C_i)`,
/// `(batch, chunks, H, P, N)`.
fn chunk_own_state_grads(dims: &SsdDims, x: &SsdInputs, go: &[f32], cums: &[f32]) -> Vec<f32> {
    let (nl, nh, np, ng, nn) = (dims.len, dims.heads, dims.head_dim, dims.groups, dims.state);
    let (q, nc) = (dims.chunk_size, dims.chunks());
    let mut grads = vec![0.0; dims.batch * nc * nh * np * nn];
    grads
        .par_chunks_mut((np * nn).max(1))
        .enumerate()
        .for_each_init(
            || vec![0.0; q.min(nl) * np],
            |scaled, (task, grad)| {
                let (b, c, h) = (task / (nc * nh), (task / nh) % nc, task % nh);
                let (t0, ql) = (c * q, (nl - c * q).min(q));
                let cum = &cums[task * q..][..ql];
                with_subnormals_flushed(|| {
                    scale_rows_by_exp(dims, go, (b, t0, h), cum, &mut scaled[..ql * np]);
                    let c_at = row_offset(dims, b, t0, h / dims.heads_per_group(), ng, nn);
                    matmul(
                        (np, nn, ql),
                        grad,
                        nn,
                        MatRef::transposed(scaled, np),
                        MatRef::rows(&x.c[c_at..], ng * nn),
                        false,
                    )
                });
            },
        );
    grads
}

/// `dst[i] = exp(cum[i]) * go[b, t0 + i, h, :]`, `(ql, P)`.
fn scale_rows_by_exp(
    dims: &SsdDims,
    go: &[f32],
    (b, t0, h): (usize, usize, usize),
    cum: &[f32],
    dst: &mut [f32],
) {
    let np = dims.head_dim;
    for (i, row) in dst.chunks_exact_mut(np).enumerate() {
        let src = &go[row_offset(dims, b, t0 + i, h, dims.heads, np)..][..np];
        let scale = cum[i].exp();
        row.iter_mut().zip(src).for_each(|(d, s)| *d = scale * s);
    }
}

/// `C B^T` inside every chunk, once per group: `(batch, chunks, G, q, q)` blocks of
/// `q = min(Q, L)` squared, the chunk's `ql x ql` values first.
fn chunk_cb(dims: &SsdDims, x: &SsdInputs) -> Vec<f32> {
    let (nl, ng, nn) = (dims.len, dims.groups, dims.state);
    let (q, nc) = (dims.chunk_size, dims.chunks());
    let block = q.min(nl).pow(2).max(1);
    let mut cb = vec![0.0; dims.batch * nc * ng * block];
    cb.par_chunks_mut(block).enumerate().for_each(|(task, cb)| {
        let (b, c, g) = (task / (nc * ng), (task / ng) % nc, task % ng);
        let (t0, ql) = (c * q, (nl - c * q).min(q));
        let at = row_offset(dims, b, t0, g, ng, nn);
        matmul(
            (ql, ql, nn),
            cb,
            ql,
            MatRef::rows(&x.c[at..], ng * nn),
            MatRef::transposed(&x.b[at..], ng * nn),
            false,
        );
    });
    cb
}

/// Everything the per-chunk gradient tasks read.
struct GradContext<'a> {
    dims: &'a SsdDims,
    x: &'a SsdInputs<'a>,
    /// `(batch, L, H)`.
    dtp: &'a [f32],
    forward: &'a ChunkForward,
    /// `(batch, L, H, P)`.
    go: &'a [f32],
    /// `(batch, chunks, H, P, N)`: the gradient of the state leaving each chunk.
    grad_states: &'a [f32],
    /// See [`chunk_cb`].
    cb: &'a [f32],
}

/// The chunk tasks' gradients, laid out head-major so that each `(batch, head, chunk)` task
/// writes contiguous rows.
struct HeadMajorGrads {
    /// `(batch, H, L, P)`.
    x: Vec<f32>,
    /// `(batch, H, L)`: with respect to the processed `dt'`.
    dt: Vec<f32>,
    /// `(batch, H, L, N)`: each head's share, summed over the group's heads at the end.
    b: Vec<f32>,
    c: Vec<f32>,
    /// `(batch, H, chunks)`.
    a: Vec<f32>,
}

/// One `(batch, head, chunk)` task's rows of the [`HeadMajorGrads`].
struct GradTask<'a> {
    batch: usize,
    head: usize,
    chunk: usize,
    /// `(ql, P)`.
    x: &'a mut [f32],
    /// `(ql)`.
    dt: &'a mut [f32],
    /// `(ql, N)`.
    b: &'a mut [f32],
    c: &'a mut [f32],
    a: &'a mut f32,
}

impl GradContext<'_> {
    fn chunk_grads(&self) -> HeadMajorGrads {
        let d = self.dims;
        let (nb, nl, nh, np, nn) = (d.batch, d.len, d.heads, d.head_dim, d.state);
        let (q, nc) = (d.chunk_size, d.chunks());
        let mut g = HeadMajorGrads {
            x: vec![0.0; nb * nh * nl * np],
            dt: vec![0.0; nb * nh * nl],
            b: vec![0.0; nb * nh * nl * nn],
            c: vec![0.0; nb * nh * nl * nn],
            a: vec![0.0; nb * nh * nc],
        };
        let mut tasks: Vec<GradTask> = chunk_rows(&mut g.x, nl, q, np)
            .into_iter()
            .zip(chunk_rows(&mut g.dt, nl, q, 1))
            .zip(
                chunk_rows(&mut g.b, nl, q, nn)
                    .into_iter()
                    .zip(chunk_rows(&mut g.c, nl, q, nn)),
            )
            .zip(g.a.iter_mut())
            .enumerate()
            .map(|(i, (((x, dt), (b, c)), a))| GradTask {
                batch: i / (nh * nc),
                head: (i / nc) % nh,
                chunk: i % nc,
                x,
                dt,
                b,
                c,
                a,
            })
            .collect();
        tasks
            .par_iter_mut()
            .for_each(|task| with_subnormals_flushed(|| self.chunk_backward(task)));
        drop(tasks);
        g
    }

    /// One chunk of one head (equations at [`ssd_backward`]).
    fn chunk_backward(&self, task: &mut GradTask) {
        let d = self.dims;
        let (nl, nh, np, ng, nn) = (d.len, d.heads, d.head_dim, d.groups, d.state);
        let (q, nc) = (d.chunk_size, d.chunks());
        let (b, h, c) = (task.batch, task.head, task.chunk);
        let (g, t0, ql) = (h / d.heads_per_group(), c * q, task.dt.len());
        let at = ((b * nc + c) * nh + h) * np * nn;
        let s_in = &self.forward.states[at..][..np * nn];
        let g_out = &self.grad_states[at..][..np * nn];
        let cum = &self.forward.cums[((b * nc + c) * nh + h) * q..][..ql];
        let dt: Vec<f32> = (0..ql)
            .map(|i| self.dtp[(b * nl + t0 + i) * nh + h])
            .collect();
        let cb_block = q.min(nl).pow(2);
        let cb = &self.cb[((b * nc + c) * ng + g) * cb_block..][..ql * ql];
        let x_at = row_offset(d, b, t0, h, nh, np);
        let bc_at = row_offset(d, b, t0, g, ng, nn);
        let xs = MatRef::rows(&self.x.x[x_at..], nh * np);
        let gos = MatRef::rows(&self.go[x_at..], nh * np);
        let bs = MatRef::rows(&self.x.b[bc_at..], ng * nn);
        let cs = MatRef::rows(&self.x.c[bc_at..], ng * nn);

        // The diagonal block: GX_ij = go_i . x_j, then M, W and the dt/cum shares.
        let mut gx_gram = vec![0.0; ql * ql];
        matmul(
            (ql, ql, np),
            &mut gx_gram,
            ql,
            gos,
            MatRef::transposed(&self.x.x[x_at..], nh * np),
            false,
        );
        let mut m = vec![0.0; ql * ql];
        let mut w = vec![0.0; ql * ql];
        let mut g_cum = vec![0.0; ql];
        with_simd(
            #[inline(always)]
            || {
                diagonal_masks(
                    cb,
                    cum,
                    &dt,
                    &mut gx_gram,
                    &mut m,
                    &mut w,
                    task.dt,
                    &mut g_cum,
                )
            },
        );
        // g_C = exp(cum) ∘ (go S_in) + W B.
        let mut scaled = vec![0.0; ql * np];
        scale_rows_by_exp(d, self.go, (b, t0, h), cum, &mut scaled);
        matmul(
            (ql, nn, np),
            task.c,
            nn,
            MatRef::rows(&scaled, np),
            MatRef::rows(s_in, nn),
            false,
        );
        for (i, (g_c, gc)) in task.c.chunks_exact(nn).zip(&mut g_cum).enumerate() {
            *gc += dot(g_c, &self.x.c[bc_at + i * ng * nn..][..nn]);
        }
        matmul((ql, nn, ql), task.c, nn, MatRef::rows(&w, ql), bs, true);
        // g_B = w ∘ (X G) + W^T C.
        let last = cum[ql - 1];
        let into_state: Vec<f32> = (0..ql).map(|j| (last - cum[j]).exp()).collect();
        matmul((ql, nn, np), task.b, nn, xs, MatRef::rows(g_out, nn), false);
        for ((row, e), dt) in task.b.chunks_exact_mut(nn).zip(&into_state).zip(&dt) {
            row.iter_mut().for_each(|v| *v *= e * dt);
        }
        matmul(
            (ql, nn, ql),
            task.b,
            nn,
            MatRef::transposed(&w, ql),
            cs,
            true,
        );
        // g_X = w ∘ (B G^T) + M^T go, with the state's dt/cum shares from x_j . (G B_j).
        matmul(
            (ql, np, nn),
            task.x,
            np,
            bs,
            MatRef::transposed(g_out, nn),
            false,
        );
        let mut to_last = 0.0;
        for (j, row) in task.x.chunks_exact_mut(np).enumerate() {
            let u = dot(row, &self.x.x[x_at + j * nh * np..][..np]);
            let wj = into_state[j] * dt[j];
            task.dt[j] += into_state[j] * u;
            g_cum[j] -= wj * u;
            to_last += wj * u;
            row.iter_mut().for_each(|v| *v *= wj);
        }
        matmul(
            (ql, np, ql),
            task.x,
            np,
            MatRef::transposed(&m, ql),
            gos,
            true,
        );
        g_cum[ql - 1] += to_last + last.exp() * dot(g_out, s_in);
        // cum_i = A * sum_{j <= i} dt_j.
        let a = self.x.a[h];
        let (mut dt_sum, mut g_a) = (0.0, 0.0);
        for (dt, gc) in dt.iter().zip(&g_cum) {
            dt_sum += dt;
            g_a += gc * dt_sum;
        }
        let mut suffix = 0.0;
        for (g_dt, gc) in task.dt.iter_mut().zip(&g_cum).rev() {
            suffix += gc;
            *g_dt += a * suffix;
        }
        *task.a = g_a;
    }
}

/// The masked `ql x ql` products of a chunk's diagonal block. Reads `cb = C B^T`, `cum`,
/// `dt` and `gx = go X^T` (overwritten); writes `M = cb ∘ l ∘ dt_j`, `W = gx ∘ l ∘ dt_j`,
/// adds `colsum(cb ∘ l ∘ gx)` to `g_dt` and `rowsum(F) - colsum(F)`, `F = M ∘ gx`, to `g_cum`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn diagonal_masks(
    cb: &[f32],
    cum: &[f32],
    dt: &[f32],
    gx: &mut [f32],
    m: &mut [f32],
    w: &mut [f32],
    g_dt: &mut [f32],
    g_cum: &mut [f32],
) {
    let ql = dt.len();
    for i in 0..ql {
        let row = i * ql..i * ql + i + 1;
        let (cb, gx) = (&cb[row.clone()], &mut gx[row.clone()]);
        let (m, w) = (&mut m[row.clone()], &mut w[row]);
        for j in 0..=i {
            let l = exp_fast(cum[i] - cum[j]);
            let e = cb[j] * l * gx[j];
            m[j] = cb[j] * l * dt[j];
            w[j] = gx[j] * l * dt[j];
            g_dt[j] += e;
            gx[j] = e * dt[j];
            g_cum[j] -= gx[j];
        }
        g_cum[i] += lane_sum(gx);
    }
}

/// `v`, a `(slabs, len, width)` tensor, cut into `(slabs, chunks)` blocks of `(ql, width)`.
fn chunk_rows(v: &mut [f32], len: usize, chunk: usize, width: usize) -> Vec<&mut [f32]> {
    v.chunks_mut((len * width).max(1))
        .flat_map(|slab| slab.chunks_mut((chunk * width).max(1)))
        .collect()
}

impl HeadMajorGrads {
    /// The gradients in the inputs' layouts: adds the skip's share of `g_x`, sums `B`/`C`
    /// over each group's heads, chains `dt` through the softplus and the clamp.
    fn assemble(
        self,
        dims: &SsdDims,
        x: &SsdInputs,
        gate: GateGrads,
        dt_grad: &[f32],
        g_init: Vec<f32>,
    ) -> SsdGrads {
        let (nl, nh, np, ng, nn) = (dims.len, dims.heads, dims.head_dim, dims.groups, dims.state);
        let hpg = dims.heads_per_group();
        let mut gx = vec![0.0; x.x.len()];
        gx.par_chunks_mut((nh * np).max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let (b, t) = (r / nl, r % nl);
                for (i, v) in row.iter_mut().enumerate() {
                    let (h, p) = (i / np, i % np);
                    let skip = x.d.map_or(0.0, |d| d[x.skip_index(dims, h, p)]);
                    *v = self.x[((b * nh + h) * nl + t) * np + p] + skip * gate.go[r * nh * np + i];
                }
            });
        let group_sum = |src: &[f32]| -> Vec<f32> {
            let mut dst = vec![0.0; x.b.len()];
            dst.par_chunks_mut((ng * nn).max(1))
                .enumerate()
                .for_each(|(r, row)| {
                    let (b, t) = (r / nl, r % nl);
                    for (g, row) in row.chunks_exact_mut(nn).enumerate() {
                        for h in g * hpg..(g + 1) * hpg {
                            let share = &src[((b * nh + h) * nl + t) * nn..][..nn];
                            row.iter_mut().zip(share).for_each(|(d, s)| *d += s);
                        }
                    }
                });
            dst
        };
        let g_dt: Vec<f32> = (0..x.dt.len())
            .map(|i| {
                let (b, t, h) = (i / (nl * nh), (i / nh) % nl, i % nh);
                self.dt[(b * nh + h) * nl + t] * dt_grad[i]
            })
            .collect();
        let mut g_a = vec![0.0; nh];
        for (i, share) in self.a.iter().enumerate() {
            g_a[(i / dims.chunks().max(1)) % nh] += share;
        }
        let mut g_bias = vec![0.0; nh];
        for (i, g) in g_dt.iter().enumerate() {
            g_bias[i % nh] += g;
        }
        SsdGrads {
            x: gx,
            a: g_a,
            b: group_sum(&self.b),
            c: group_sum(&self.c),
            dt: g_dt,
            d: gate.d,
            z: gate.z,
            dt_bias: x.dt_bias.map(|_| g_bias),
            initial_states: x.initial_states.map(|_| g_init),
        }
    }
}
