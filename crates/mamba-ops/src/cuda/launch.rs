//! One launcher per op: the argument struct its kernels take (mirroring the `.cu` file's struct
//! field for field), the launch geometry, and the output buffer in the CPU op's flat layout.

use super::{
    config, cuda_err, kernel, kernel_with_shared, launch, max_shared_opt_in, multiprocessors,
    GradType, Packed, Source, Variant,
};
use crate::causal_conv1d::{ConvDims, ConvUpdateDims};
use crate::rmsnorm_gated::NormDims;
use crate::selective_scan::ScanDims;
use crate::selective_state_update::StepDims;
use crate::ssd::SsdDims;
use crate::tensor::Present;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, PushKernelArg,
};

type Result<T> = candle_core::Result<T>;

pub(super) const SELECTIVE_SCAN: Source = Source {
    name: "selective_scan",
    code: include_str!("selective_scan.cu"),
};
pub(super) const CAUSAL_CONV1D: Source = Source {
    name: "causal_conv1d",
    code: include_str!("causal_conv1d.cu"),
};
pub(super) const SELECTIVE_STATE_UPDATE: Source = Source {
    name: "selective_state_update",
    code: include_str!("selective_state_update.cu"),
};
pub(super) const SSD: Source = Source {
    name: "ssd",
    code: include_str!("ssd.cu"),
};
pub(super) const RMSNORM_GATED: Source = Source {
    name: "rmsnorm_gated",
    code: include_str!("rmsnorm_gated.cu"),
};

/// `v` as a kernel's `int`.
fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| cuda_err(format!("size {v} does not fit a kernel's int")))
}

/// Threads per block of the element-wise kernels.
const THREADS: usize = 128;
/// The largest grid dimension y (and z) of a launch: the state update's and the decoding SSM
/// steps' sequences.
pub(super) const MAX_GRID_Y: usize = 65_535;

/// Where each input's gradient starts in a backward's flat output that holds the gradients of
/// the `present` inputs one after another, in packing order (`sizes` values each; -1 for an
/// absent input), and the output's length.
fn gradient_starts<const K: usize>(present: [bool; K], sizes: [usize; K]) -> ([i64; K], usize) {
    let mut starts = [-1i64; K];
    let mut total = 0;
    for ((start, here), len) in starts.iter_mut().zip(present).zip(sizes) {
        if here {
            *start = total as i64;
            total += len;
        }
    }
    (starts, total)
}

/// Threads per block of `sum_parts` (`32 * SUM_WARPS` in `common.cuh`).
const SUM_PARTS_THREADS: usize = 256;

/// `sum_parts` (`f`, from any module): `out[j] = sum_p parts[p * stride + j]` over `count`
/// parts, in a fixed order, for every `j < out.len()`.
fn sum_parts<G: GradType>(
    p: &Packed,
    f: &CudaFunction,
    parts: &CudaView<f32>,
    count: usize,
    stride: usize,
    out: &mut CudaViewMut<G>,
) -> Result<()> {
    let width = out.len();
    let (count, stride, width_arg) = (int(count)?, int(stride)?, int(width)?);
    let mut builder = p.stream.launch_builder(f);
    builder
        .arg(parts)
        .arg(&count)
        .arg(&stride)
        .arg(&width_arg)
        .arg(out);
    let cfg = config((width.div_ceil(32), 1, 1), SUM_PARTS_THREADS, 0)?;
    // SAFETY: the arguments match the kernel's parameters; `parts` holds `count` rows of
    // `stride` values, of which the first `out.len()` are read.
    unsafe { launch(&mut builder, cfg) }
}

// ---------------------------------------------------------------------------------------
// Selective scan

/// Segments (warps of 32 channels) per block of the scan backward's segment kernels. The
/// gradient kernel takes 150-166 registers a thread: one 8-warp block fits a multiprocessor,
/// three 4-warp blocks do. On the H200 the backward went 379.8 -> 333.5 us at d 1536 and
/// 1169 -> 1003 us at d 5120 with 4 (f32; 2 measured the same as 4).
const SCAN_WARPS: usize = 4;
/// Most channels (warps) per block of the chunked forward scan.
const SCAN_MOST_CHANNELS: usize = 8;
/// Most steps per lane of the forward scan's chunk (a chunk is 32 lanes' steps).
const SCAN_MOST_ITEMS: usize = 8;
/// Most shared memory the forward scan's staged columns may take (two blocks fit on an H100 /
/// H200 multiprocessor even at the most).
const SCAN_SHARED_MAX: usize = 96 << 10;
/// Most values of B (and of C) a thread of the forward scan holds for the next chunk.
const SCAN_STAGED_BC: usize = 16;

/// `ScanArgs` of `selective_scan.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScanArgs {
    /// Element offsets of u, delta, A, B, C, D, z, delta_bias and initial_state in the packed
    /// buffer (-1 for an absent one): the kernel's nine leading `long long` fields.
    inputs: [i64; 9],
    batch: i32,
    len: i32,
    dim: i32,
    groups: i32,
    softplus: i32,
    segments: i32,
    segment_len: i32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for ScanArgs {}

/// Shape of the chunked forward scan: channels (warps) per block, steps per lane, the stride
/// of a shared-memory column in floats (`selective_scan.cu`'s `chunk_pos` skews 4 floats per
/// 32 steps; the stride is 4 more than a multiple of 32) and the blocks a multiprocessor holds
/// (the kernel's launch bounds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct ScanChunk {
    channels: usize,
    items: usize,
    column: usize,
    blocks_per_sm: usize,
}

impl ScanChunk {
    /// The most channels per block that `dim / groups` holds a whole number of, and the most
    /// steps per lane (a power of two) whose staged columns fit `SCAN_SHARED_MAX` and whose
    /// staged B and C rows take each thread at most `SCAN_STAGED_BC` registers apiece
    /// (`items * N / channels`), but no more than a chunk as long as the sequence (`len`) needs.
    pub(super) fn new(dim: usize, groups: usize, state: usize, len: usize) -> Result<Self> {
        let per_group = dim / groups.max(1);
        let channels = (0..=SCAN_MOST_CHANNELS.ilog2())
            .rev()
            .map(|k| 1usize << k)
            .find(|&c| per_group.is_multiple_of(c))
            .unwrap_or(1);
        let staged_fit = (SCAN_STAGED_BC * channels / state.max(1)).max(1);
        let needed = len.div_ceil(32).next_power_of_two();
        let mut items = SCAN_MOST_ITEMS.min(1 << staged_fit.ilog2()).min(needed);
        loop {
            let chunk = ScanChunk {
                channels,
                items,
                column: 36 * items + (4 - 4 * items as isize).rem_euclid(32) as usize,
                blocks_per_sm: CHUNKED_BLOCKS_PER_SM,
            };
            if chunk.shared_bytes(state) <= SCAN_SHARED_MAX {
                return Ok(chunk);
            }
            if items == 1 {
                return Err(cuda_err(format!(
                    "a selective scan with N = {state} needs {} bytes of shared memory per block (at most {SCAN_SHARED_MAX})",
                    chunk.shared_bytes(state)
                )));
            }
            items /= 2;
        }
    }

    /// This chunk, or the same steps in blocks of 4 channels, three to a multiprocessor, where
    /// its blocks of 8 (`batch * dim / 8` of them) leave multiprocessors idle in their one
    /// wave and the halved blocks still fit one: d 1536 at batch 1 is 192 blocks of 8 warps on
    /// 132 multiprocessors (60 hold two, 72 one), or 384 of 4 (three on most). On the H200:
    /// bf16 76.7 -> 71.6 us, f32 78.6 -> 77.0. Past one wave the halved blocks were slower
    /// (d 5120: 201 -> 257 us): each stages the block's B and C for half the channels. With
    /// N = 16 the 4-channel kernel takes 168 registers at three blocks, without spills.
    pub(super) fn spread_over(self, batch: usize, dim: usize, state: usize, sms: usize) -> Self {
        let blocks = batch * dim / self.channels;
        if self.channels == 8
            && state <= 16
            && blocks < self.blocks_per_sm * sms
            && 2 * blocks <= SPREAD_BLOCKS_PER_SM * sms
        {
            ScanChunk {
                channels: 4,
                blocks_per_sm: SPREAD_BLOCKS_PER_SM,
                ..self
            }
        } else {
            self
        }
    }

    /// The forward's variant of `selective_scan.cu`.
    pub(super) fn defines(&self, state: usize) -> [(&'static str, usize); 8] {
        let [n, warps, bwd_seg, seq_n] = scan_defines(state);
        [
            n,
            warps,
            bwd_seg,
            seq_n,
            ("SCAN_ITEMS", self.items),
            ("SCAN_CHANNELS", self.channels),
            ("SCAN_COLUMN", self.column),
            ("SCAN_BLOCKS_PER_SM", self.blocks_per_sm),
        ]
    }

    /// Shared memory of a block: delta, u and z columns per channel, B and C columns per n.
    fn shared_bytes(&self, state: usize) -> usize {
        (3 * self.channels + 2 * state) * self.column * 4
    }
}

/// Token-major selective scan (inputs `u, delta, A, B, C, [D], [z], [delta_bias],
/// [initial_state]`); output `[out (batch, L, dim) | last_state (batch, dim, N)]`. One kernel:
/// `selective_scan_chunked`, or `selective_scan_sequential` for short sequences of a large
/// enough batch (see `selective_scan.cu` and [`one_thread_per_channel`]).
pub(crate) fn selective_scan(
    p: &Packed,
    dims: &ScanDims,
    groups: usize,
    present: Present,
    softplus: bool,
) -> Result<CudaSlice<f32>> {
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    if nb > MAX_GRID_Y {
        return Err(cuda_err(format!(
            "a selective scan of {nb} sequences (at most {MAX_GRID_Y} on the GPU)"
        )));
    }
    let args = scan_args(p, dims, groups, present, softplus, 1)?; // the forward cuts nothing
    let chunk = ScanChunk::new(nd, groups, nn, nl)?;
    let sms = multiprocessors(p.device())?;
    if one_thread_per_channel(dims, chunk.channels, sms) {
        return selective_scan_sequential(p, dims, args);
    }
    let chunk = chunk.spread_over(nb, nd, nn, sms);
    let defines = chunk.defines(nn);
    let variant = p.variant(&defines);
    let shared = chunk.shared_bytes(nn);
    let f = kernel_with_shared(
        p.device(),
        &SELECTIVE_SCAN,
        &variant,
        "selective_scan_chunked",
        shared,
    )?;
    let mut out = p.buffer(nb * nl * nd + nb * nd * nn)?;
    let mut builder = p.builder(&f);
    builder.arg(&args).arg(&mut out);
    let cfg = config((nd / chunk.channels, nb, 1), 32 * chunk.channels, shared)?;
    // SAFETY: the arguments match the kernel's parameters, the packed inputs were checked
    // against `dims`, `out` holds the outputs and last states, and `shared` is the columns'
    // size that `chunk` gives the kernel.
    unsafe { launch(&mut builder, cfg) }?;
    Ok(out)
}

/// Whether `selective_scan_sequential` (a thread per channel, the steps one after another)
/// beats the chunked kernel (blocks of `channels` channels) for `dims` on `sms`
/// multiprocessors. On the H200 (d1536, N 16, L 1 to 64) a sequential step took about 2 us at
/// any batch up to one wave of its blocks, and a wave of chunked blocks about 4 us: so the
/// sequential kernel runs while `len` times its waves is at most twice the chunked kernel's
/// waves. Measured crossings: batch 1 between L 1 and 4, batch 8 between L 8 and 16, batch 64
/// past L 64 (132 against 249 us there).
pub(super) fn one_thread_per_channel(dims: &ScanDims, channels: usize, sms: usize) -> bool {
    let waves = |blocks: usize, per_sm: usize| blocks.div_ceil(per_sm * sms);
    let chunked = waves(dims.batch * dims.dim / channels, CHUNKED_BLOCKS_PER_SM);
    let sequential = waves(
        dims.batch * dims.dim.div_ceil(SEQ_THREADS),
        SEQ_BLOCKS_PER_SM,
    );
    dims.state <= SEQ_MOST_N && dims.len * sequential <= 2 * chunked
}

/// Blocks of `selective_scan_chunked` a multiprocessor holds (its launch bounds: 256 threads
/// at 128 registers).
const CHUNKED_BLOCKS_PER_SM: usize = 2;

/// Blocks of 4 channels of `selective_scan_chunked` a multiprocessor holds when
/// [`ScanChunk::spread_over`] takes them (168 registers at N = 16).
const SPREAD_BLOCKS_PER_SM: usize = 3;

/// Blocks of `selective_scan_sequential` a multiprocessor holds (128 threads at 72 registers).
const SEQ_BLOCKS_PER_SM: usize = 7;

/// The forward of short sequences: a thread per (sequence, channel), steps in order.
fn selective_scan_sequential(
    p: &Packed,
    dims: &ScanDims,
    args: ScanArgs,
) -> Result<CudaSlice<f32>> {
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let defines = scan_defines(nn);
    let variant = p.variant(&defines);
    let f = kernel(
        p.device(),
        &SELECTIVE_SCAN,
        &variant,
        "selective_scan_sequential",
    )?;
    let mut out = p.buffer(nb * nl * nd + nb * nd * nn)?;
    let mut builder = p.builder(&f);
    builder.arg(&args).arg(&mut out);
    let cfg = config((nd.div_ceil(SEQ_THREADS), nb, 1), SEQ_THREADS, 0)?;
    // SAFETY: the arguments match the kernel's parameters, the packed inputs were checked
    // against `dims` and `out` holds the outputs and last states.
    unsafe { launch(&mut builder, cfg) }?;
    Ok(out)
}

/// Threads per block of `selective_scan_sequential` (`SEQ_THREADS` in the kernel).
const SEQ_THREADS: usize = 128;

/// Largest N `selective_scan_sequential` takes: its block's states fit static shared memory.
const SEQ_MOST_N: usize = 64;

/// Most steps per segment of the scan's backward: each thread keeps a segment's states. On the
/// H200 (d 1536, N 16, L 2048) 32 measured 7-8 % faster than 16, 1-2 % faster than 24 and
/// 15-19 % faster than 48 or 64 (CUDA_NOTES, backward item 5).
const SCAN_BWD_SEG: usize = 32;
/// Runs of segments walked side by side by the scan backward's combine kernels, a warp each
/// (`COMBINE_PARTS` in `selective_scan.cu`).
const SCAN_COMBINE_PARTS: usize = 8;

/// The compile-time sizes of the scan's module (forward and backward kernels).
pub(super) fn scan_defines(state: usize) -> [(&'static str, usize); 4] {
    [
        ("STATE_N", state),
        ("SCAN_WARPS", SCAN_WARPS),
        ("SCAN_BWD_SEG", SCAN_BWD_SEG),
        ("SEQ_MOST_N", SEQ_MOST_N),
    ]
}

/// The `ScanArgs` of a call cut into `segments` segments.
fn scan_args(
    p: &Packed,
    dims: &ScanDims,
    groups: usize,
    present: Present,
    softplus: bool,
    segments: usize,
) -> Result<ScanArgs> {
    Ok(ScanArgs {
        inputs: p.offsets(present.after_five_required())?,
        batch: int(dims.batch)?,
        len: int(dims.len)?,
        dim: int(dims.dim)?,
        groups: int(groups)?,
        softplus: softplus.into(),
        segments: int(segments)?,
        segment_len: int(dims.len.div_ceil(segments).max(1))?,
    })
}

/// Gradients of the token-major selective scan, given `grad = [g_out (batch, L, dim) |
/// g_last_state (batch, dim, N)]`: `[g_u | g_delta | g_A | g_B | g_C | g_D | g_z | g_delta_bias
/// | g_initial_state]` (the optional ones where given), or `None` unless `dim` and
/// `dim / groups` are multiples of 32 (a warp is 32 channels of one group), left to the CPU.
/// Six kernels in order (see `selective_scan.cu`).
pub(crate) fn selective_scan_backward<G: GradType>(
    p: &Packed,
    dims: &ScanDims,
    groups: usize,
    present: Present,
    softplus: bool,
    grad: &CudaView<f32>,
) -> Result<Option<CudaSlice<G>>> {
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    if !nd.is_multiple_of(32) || groups == 0 || !(nd / groups).is_multiple_of(32) {
        return Ok(None);
    }
    let segments = nl.div_ceil(SCAN_BWD_SEG).div_ceil(SCAN_WARPS).max(1) * SCAN_WARPS;
    let args = scan_args(p, dims, groups, present, softplus, segments)?;
    let defines = scan_defines(nn);
    let variant = p.variant(&defines);
    let func = |name: &str| kernel(p.device(), &SELECTIVE_SCAN, &variant, name);
    // Layout of the gradients: offsets of each input's gradient, in input order.
    let tokens = nb * nl * nd;
    let bc = nb * nl * groups * nn;
    let sizes = [
        tokens,
        tokens,
        nd * nn,
        bc,
        bc,
        nd,
        tokens,
        nd,
        nb * nd * nn,
    ];
    let (at, total) = gradient_starts(present.after_five_required(), sizes);
    let (gz_at, init_at) = (at[6], at[8]);
    let mut grads = p.buffer_of::<G>(total)?;
    let mut seg_state = p.buffer(nb * segments * nd * nn)?;
    let mut seg_dt = p.buffer(nb * segments * nd)?;
    let mut adj = p.buffer(nb * segments * nd * nn)?;
    let width = nd * nn + 2 * nd;
    let mut parts = p.buffer(nb * segments * width)?;
    let mut b_parts = p.buffer(nb * nl * (nd / 32) * nn)?;
    let mut c_parts = p.buffer(nb * nl * (nd / 32) * nn)?;
    let segment_grid = (nd / 32, segments / SCAN_WARPS, nb);
    let combine = config(
        ((nb * nd * nn).div_ceil(32), 1, 1),
        32 * SCAN_COMBINE_PARTS,
        0,
    )?;
    // SAFETY (every launch below): the arguments match the kernel's parameters, the packed
    // inputs were checked against `dims`, `grad` holds g_out and g_last_state (checked by the
    // caller), and the scratch and gradient buffers have the sizes `selective_scan.cu` gives
    // them.
    {
        let f = func("selective_scan_segments")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(&mut seg_state).arg(&mut seg_dt);
        unsafe { launch(&mut builder, config(segment_grid, 32 * SCAN_WARPS, 0)?) }?;
    }
    {
        let f = func("selective_scan_bwd_segments")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(grad).arg(&mut adj);
        unsafe { launch(&mut builder, config(segment_grid, 32 * SCAN_WARPS, 0)?) }?;
    }
    {
        let f = func("selective_scan_combine")?;
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(grad)
            .arg(&seg_dt)
            .arg(&mut seg_state)
            .arg(&mut adj)
            .arg(&mut grads)
            .arg(&init_at);
        unsafe { launch(&mut builder, combine) }?;
    }
    {
        let f = func("selective_scan_bwd")?;
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(grad)
            .arg(&seg_state)
            .arg(&adj)
            .arg(&mut grads)
            .arg(&gz_at)
            .arg(&mut parts)
            .arg(&mut b_parts)
            .arg(&mut c_parts);
        unsafe { launch(&mut builder, config(segment_grid, 32 * SCAN_WARPS, 0)?) }?;
    }
    // The A, D and delta_bias sums: columns of the (batch, segment) parts.
    let sum = func("sum_parts")?;
    for (here, column, len, input) in [
        (true, 0, nd * nn, 2),
        (present.d, nd * nn, nd, 5),
        (present.bias, nd * nn + nd, nd, 7),
    ] {
        if here {
            let start = at[input] as usize;
            let mut out = grads.slice_mut(start..start + len);
            sum_parts(
                p,
                &sum,
                &parts.slice(column..),
                nb * segments,
                width,
                &mut out,
            )?;
        }
    }
    for (part, input) in [(&b_parts, 3), (&c_parts, 4)] {
        let f = func("selective_scan_bwd_sum_bc")?;
        let start = at[input] as usize;
        let mut out = grads.slice_mut(start..start + bc);
        let mut builder = p.stream.launch_builder(&f);
        builder.arg(&args).arg(part).arg(&mut out);
        let cfg = config((bc.div_ceil(THREADS), 1, 1), THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(Some(grads))
}

// ---------------------------------------------------------------------------------------
// Causal conv1d

/// Consecutive outputs per thread of the convolution.
const CONV_ITEMS: usize = 4;

/// `ConvArgs` of `causal_conv1d.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvArgs {
    x: i64,
    weight: i64,
    bias: i64,
    initial_states: i64,
    rows: i32,
    dim: i32,
    len: i32,
    silu: i32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for ConvArgs {}

/// Causal conv1d (inputs `x, weight, [bias], [initial_states]`); output
/// `[out (batch, dim, L) | final_states (batch, dim, W-1)]`.
pub(crate) fn causal_conv1d(
    p: &Packed,
    dims: &ConvDims,
    has_bias: bool,
    has_init: bool,
    silu: bool,
) -> Result<CudaSlice<f32>> {
    let rows = dims.batch * dims.dim;
    let [x, weight, bias, initial_states] = p.offsets([true, true, has_bias, has_init])?;
    let args = ConvArgs {
        x,
        weight,
        bias,
        initial_states,
        rows: int(rows)?,
        dim: int(dims.dim)?,
        len: int(dims.len)?,
        silu: silu.into(),
    };
    let defines = [("CONV_W", dims.width), ("CONV_ITEMS", CONV_ITEMS)];
    let func = kernel(
        p.device(),
        &CAUSAL_CONV1D,
        &p.variant(&defines),
        "causal_conv1d_fwd",
    )?;
    let mut out = p.buffer(rows * dims.len + rows * (dims.width - 1))?;
    // At least one tile per row, whose first threads write the final states.
    let tiles = dims.len.div_ceil(THREADS * CONV_ITEMS).max(1);
    let cfg = config((rows, tiles, 1), THREADS.max(dims.width), 0)?;
    {
        let mut builder = p.builder(&func);
        builder.arg(&args).arg(&mut out);
        // SAFETY: the arguments match `causal_conv1d_fwd`; the packed inputs were checked
        // against `dims` and `out` holds both outputs.
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
}

/// Gradients of causal conv1d, given `grad = [g_out (batch, dim, L) | g_final (batch, dim,
/// W-1)]`: `[g_x | g_weight | g_bias if bias | g_initial_states if given]`, or `None` for a
/// width the block cannot hold (more than `THREADS - 1`), left to the CPU.
pub(crate) fn causal_conv1d_backward<G: GradType>(
    p: &Packed,
    dims: &ConvDims,
    has_bias: bool,
    has_init: bool,
    silu: bool,
    grad: &CudaView<f32>,
) -> Result<Option<CudaSlice<G>>> {
    if dims.width + 1 > THREADS {
        return Ok(None);
    }
    let rows = dims.batch * dims.dim;
    let [x, weight, bias, initial_states] = p.offsets([true, true, has_bias, has_init])?;
    let args = ConvArgs {
        x,
        weight,
        bias,
        initial_states,
        rows: int(rows)?,
        dim: int(dims.dim)?,
        len: int(dims.len)?,
        silu: silu.into(),
    };
    let defines = [("CONV_W", dims.width), ("CONV_ITEMS", CONV_ITEMS)];
    let variant = p.variant(&defines);
    let tiles = dims.len.div_ceil(THREADS * CONV_ITEMS).max(1);
    let stride = dims.dim * (dims.width + 1);
    let sums = dims.dim * dims.width + if has_bias { dims.dim } else { 0 };
    let x_len = rows * dims.len;
    let init_len = if has_init { rows * (dims.width - 1) } else { 0 };
    let mut grads = p.buffer_of::<G>(x_len + sums + init_len)?;
    let mut parts = p.buffer(dims.batch * tiles * stride)?;
    // SAFETY (both launches): the arguments match the kernels' parameters, the packed inputs
    // were checked against `dims`, `grad` holds g_out and g_final (checked by the caller) and
    // `grads` and `parts` have the sizes `causal_conv1d.cu` gives them.
    {
        let f = kernel(p.device(), &CAUSAL_CONV1D, &variant, "causal_conv1d_bwd")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(grad).arg(&mut grads).arg(&mut parts);
        unsafe { launch(&mut builder, config((rows, tiles, 1), THREADS, 0)?) }?;
    }
    let f = kernel(p.device(), &CAUSAL_CONV1D, &variant, "sum_parts")?;
    let mut out = grads.slice_mut(x_len..x_len + sums);
    sum_parts(
        p,
        &f,
        &parts.slice(..),
        dims.batch * tiles,
        stride,
        &mut out,
    )?;
    Ok(Some(grads))
}

/// `ConvUpdateArgs` of `causal_conv1d.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvUpdateArgs {
    state: i64,
    x: i64,
    weight: i64,
    bias: i64,
    rows: i32,
    dim: i32,
    state_len: i32,
    steps: i32,
    silu: i32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for ConvUpdateArgs {}

/// Decoding update of the convolution (inputs `conv_state, x, weight, [bias]`); output
/// `[out (batch, dim, steps) | conv_state_out (batch, dim, state_len)]`.
pub(crate) fn causal_conv1d_update(
    p: &Packed,
    dims: &ConvUpdateDims,
    has_bias: bool,
    silu: bool,
) -> Result<CudaSlice<f32>> {
    let rows = dims.batch * dims.dim;
    let [state, x, weight, bias] = p.offsets([true, true, true, has_bias])?;
    let args = ConvUpdateArgs {
        state,
        x,
        weight,
        bias,
        rows: int(rows)?,
        dim: int(dims.dim)?,
        state_len: int(dims.state_len)?,
        steps: int(dims.steps)?,
        silu: silu.into(),
    };
    let defines = [("CONV_W", dims.width), ("CONV_ITEMS", CONV_ITEMS)];
    let func = kernel(
        p.device(),
        &CAUSAL_CONV1D,
        &p.variant(&defines),
        "causal_conv1d_update_fwd",
    )?;
    let mut out = p.buffer(rows * dims.steps + rows * dims.state_len)?;
    let cfg = config((rows.div_ceil(THREADS), 1, 1), THREADS, 0)?;
    {
        let mut builder = p.builder(&func);
        builder.arg(&args).arg(&mut out);
        // SAFETY: the arguments match `causal_conv1d_update_fwd`; the packed inputs were
        // checked against `dims` and `out` holds both outputs.
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Selective state update

/// `StepArgs` of `selective_state_update.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct StepArgs {
    state: i64,
    x: i64,
    dt: i64,
    a: i64,
    b: i64,
    c: i64,
    d: i64,
    z: i64,
    dt_bias: i64,
    rows: i32,
    heads: i32,
    head_dim: i32,
    groups: i32,
    per_head: i32,
    softplus: i32,
    dt_lo: f32,
    dt_hi: f32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for StepArgs {}

/// Threads that fill an H200 (132 multiprocessors of 2048): with fewer rows than this, each
/// lane group takes one row, for the shortest chain of dependent loads.
const STATE_UPDATE_FULL: usize = 132 * 2048;
/// Rows each lane group of the state update takes in turn when there are many.
const STATE_UPDATE_ROW_STEPS: usize = 4;

/// The state update's compile-time sizes for state length `n` and `rows` state rows in all:
/// `STATE_N`; `ROW_LANES` lanes sharing one state row (a power of two, at most a warp, about
/// four entries each); `ROW_STEPS` rows per lane group, several when the rows are enough
/// to fill the GPU without it (their per-row work, Δ and B, C, is then done once per head).
pub(super) fn state_update_defines(n: usize, rows: usize) -> [(&'static str, usize); 3] {
    let row_lanes = n.div_ceil(4).next_power_of_two().min(32);
    let steps = if rows * row_lanes / STATE_UPDATE_ROW_STEPS >= STATE_UPDATE_FULL {
        STATE_UPDATE_ROW_STEPS
    } else {
        1
    };
    [
        ("STATE_N", n),
        ("ROW_LANES", row_lanes),
        ("ROW_STEPS", steps),
    ]
}

/// One SSM decoding step (inputs `state, x, dt, A, B, C, [D], [z], [dt_bias]`); output
/// `[y (batch, H, P) | new state (batch, H, P, N)]`.
pub(crate) fn selective_state_update(
    p: &Packed,
    dims: &StepDims,
    present: Present,
    softplus: bool,
    dt_limit: (f32, f32),
) -> Result<CudaSlice<f32>> {
    let rows = dims.heads * dims.head_dim; // per sequence
    let [state, x, dt, a, b, c, d, z, dt_bias] = p.offsets([
        true,
        true,
        true,
        true,
        true,
        true,
        present.d,
        present.z,
        present.bias,
    ])?;
    let args = StepArgs {
        state,
        x,
        dt,
        a,
        b,
        c,
        d,
        z,
        dt_bias,
        rows: int(rows)?,
        heads: int(dims.heads)?,
        head_dim: int(dims.head_dim)?,
        groups: int(dims.groups)?,
        per_head: dims.per_head.into(),
        softplus: softplus.into(),
        dt_lo: dt_limit.0,
        dt_hi: dt_limit.1,
    };
    let defines = state_update_defines(dims.state, dims.batch * rows);
    let (row_lanes, steps) = (defines[1].1, defines[2].1);
    let func = kernel(
        p.device(),
        &SELECTIVE_STATE_UPDATE,
        &p.variant(&defines),
        "selective_state_update_fwd",
    )?;
    let all_rows = dims.batch * rows;
    let mut out = p.buffer(all_rows + all_rows * dims.state)?;
    if dims.batch > MAX_GRID_Y {
        return Err(cuda_err(format!(
            "a state update of {} sequences (at most {MAX_GRID_Y} per launch)",
            dims.batch
        )));
    }
    // Grid: (blocks of row groups of one sequence, sequences).
    let cfg = config(
        (
            (rows.div_ceil(steps) * row_lanes).div_ceil(THREADS),
            dims.batch,
            1,
        ),
        THREADS,
        0,
    )?;
    {
        let mut builder = p.builder(&func);
        builder.arg(&args).arg(&mut out);
        // SAFETY: the arguments match `selective_state_update_fwd`; the packed inputs were
        // checked against `dims` and `out` holds both outputs.
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// SSD

/// Chunk length of the GPU's chunked SSD, whatever `SsdDims::chunk_size` asks of the CPU path
/// (any chunk length gives the same result up to rounding), a whole number of product tiles.
/// On the H200 (mamba2-130m and mamba2-2.7b widths, 2048 steps) 128 beat 64 by 7-12 % with
/// bf16 inputs and up to 5 % with f32, and 256 was slower than 128 (CUDA_NOTES), again with the
/// staged bf16 kernels (twenty-eighth session: equal at H 80, 6 % slower at H 24).
const SSD_CHUNK: usize = 128;
const SSD_TILE: usize = 64;
const SSD_PRODUCT_THREADS: usize = 256;

/// The sizes `ssd.cu` is compiled with.
pub(super) fn ssd_defines() -> [(&'static str, usize); 3] {
    [
        ("SSD_Q", SSD_CHUNK),
        ("TILE", SSD_TILE),
        ("PRODUCT_THREADS", SSD_PRODUCT_THREADS),
    ]
}

/// Element offsets of the SSD's inputs, in their packing order (-1 for an absent one): the
/// leading fields of `SsdArgs` in `ssd.cu`, and `SsdGradsAt` (where each input's gradient
/// starts in the backward's output).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct SsdOffsets {
    pub(super) x: i64,
    pub(super) dt: i64,
    pub(super) a: i64,
    pub(super) b: i64,
    pub(super) c: i64,
    pub(super) d: i64,
    pub(super) z: i64,
    pub(super) dt_bias: i64,
    pub(super) initial_states: i64,
}

// SAFETY: plain old data laid out as the kernel's `SsdGradsAt`.
unsafe impl DeviceRepr for SsdOffsets {}

impl From<[i64; 9]> for SsdOffsets {
    /// The offsets in packing order.
    fn from([x, dt, a, b, c, d, z, dt_bias, initial_states]: [i64; 9]) -> Self {
        SsdOffsets {
            x,
            dt,
            a,
            b,
            c,
            d,
            z,
            dt_bias,
            initial_states,
        }
    }
}

/// `SsdArgs` of `ssd.cu` (its nine offsets first, laid out as `SsdOffsets`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SsdArgs {
    inputs: SsdOffsets,
    batch: i32,
    len: i32,
    heads: i32,
    head_dim: i32,
    groups: i32,
    state: i32,
    chunks: i32,
    d_per_p: i32,
    softplus: i32,
    dt_lo: f32,
    dt_hi: f32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for SsdArgs {}

/// How the SSD is called beyond its sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SsdFlags {
    pub present: Present,
    /// `D` is `(H, P)` rather than `(H)`.
    pub d_per_p: bool,
    pub softplus: bool,
    pub dt_limit: (f32, f32),
}

/// `SsdArgs` for `dims` cut into chunks of `chunk` steps.
fn ssd_args(p: &Packed, dims: &SsdDims, flags: SsdFlags, chunk: usize) -> Result<SsdArgs> {
    Ok(SsdArgs {
        inputs: p.offsets(flags.present.after_five_required())?.into(),
        batch: int(dims.batch)?,
        len: int(dims.len)?,
        heads: int(dims.heads)?,
        head_dim: int(dims.head_dim)?,
        groups: int(dims.groups)?,
        state: int(dims.state)?,
        chunks: int(dims.len.div_ceil(chunk))?,
        d_per_p: flags.d_per_p.into(),
        softplus: flags.softplus.into(),
        dt_lo: flags.dt_limit.0,
        dt_hi: flags.dt_limit.1,
    })
}

/// Threads and dynamic shared memory of `ssd_chunk_scan_tc` (`TC_THREADS`, `TC_STAGES *
/// TC_STAGE_BYTES` in `ssd.cu`), and the depth of its slices (`TC_SLICE`).
const SSD_TC_THREADS: usize = 256;
const SSD_TC_SHARED: usize = 2 * 6 * 4096;
const SSD_TC_SLICE: usize = 32;

/// Whether the forward (and the backward's rerun of it) can run its staged kernels
/// (`ssd_chunk_products_tc`, `ssd_state_passing_split`, `ssd_chunk_scan_tc`): bf16 inputs, N a
/// whole (non-zero) number of their slices, P of 16-byte rows, and x, B and C starting 16-byte
/// aligned (their copies move 16 bytes at a time).
fn ssd_staged(p: &Packed, args: &SsdArgs) -> Result<bool> {
    Ok(p.is_bf16()
        && args.state > 0
        && (args.state as usize).is_multiple_of(SSD_TC_SLICE)
        && args.head_dim % 8 == 0
        && p.aligned16(args.inputs.x)?
        && p.aligned16(args.inputs.b)?
        && p.aligned16(args.inputs.c)?)
}

/// How the SSD's first kernels leave the states entering each chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Staging {
    /// `ssd_chunk_products` and `ssd_state_passing`: f32, in place of each chunk's own state,
    /// for `ssd_chunk_scan`.
    InPlace,
    /// Their staged versions, the entering states as bf16 planes hi and lo, for
    /// `ssd_chunk_scan_tc` (and the backward with z, which reruns the scan).
    Planes,
    /// The staged versions with the hi plane only: what the backward without z reads (its
    /// bf16 cells of S_in), never the chunk scan.
    HiPlane,
}

impl Staging {
    /// The staging of a forward (`scan`: the chunk scan follows) with the staged kernels or not.
    fn of(staged: bool, scan: bool) -> Self {
        match (staged, scan) {
            (false, _) => Staging::InPlace,
            (true, true) => Staging::Planes,
            (true, false) => Staging::HiPlane,
        }
    }
}

/// What the SSD's first three kernels leave for the chunk scan (and the backward), at a chunk
/// length of `chunk` steps: dt' and cum `(batch, H, chunks * chunk)`, CB `(batch, chunks, G,
/// chunk, chunk)` and each chunk's own state `(batch, chunks, H, P, N)`, replaced by the state
/// entering the chunk, or (`planes`, staged) left as it is, the entering states going to bf16
/// planes hi and lo `(batch, chunks, H, 2, P, N)` in a buffer of the same bytes (`staging`
/// says which, and whether the lo planes were written).
struct SsdChunks {
    chunk: usize,
    staging: Staging,
    dtp: CudaSlice<f32>,
    cum: CudaSlice<f32>,
    cb: CudaSlice<f32>,
    states: CudaSlice<f32>,
    planes: Option<CudaSlice<f32>>,
}

impl SsdChunks {
    /// `ssd_chunk_products` (with dt' and the running sums) and `ssd_state_passing` of
    /// `variant` (compiled with `SSD_Q = chunk`), the state after the last chunk into
    /// `final_state`; staged, their versions `ssd_chunk_products_tc` and
    /// `ssd_state_passing_split` instead (for `ssd_chunk_scan_tc` and the backward).
    fn run(
        p: &Packed,
        variant: &Variant,
        args: &SsdArgs,
        chunk: usize,
        final_state: &mut CudaViewMut<f32>,
        staging: Staging,
    ) -> Result<Self> {
        let split = staging != Staging::InPlace;
        let func = |name: &str| kernel(p.device(), &SSD, variant, name);
        let (nb, nh, np, ng, nn) = (
            args.batch as usize,
            args.heads as usize,
            args.head_dim as usize,
            args.groups as usize,
            args.state as usize,
        );
        let chunks = args.chunks as usize;
        let steps = nb * nh * chunks * chunk;
        let mut out = SsdChunks {
            chunk,
            staging,
            dtp: p.buffer(steps)?,
            cum: p.buffer(steps)?,
            cb: p.buffer(nb * chunks * ng * chunk * chunk)?,
            states: p.buffer(nb * chunks * nh * np * nn)?,
            planes: if split {
                Some(p.buffer(nb * chunks * nh * np * nn)?)
            } else {
                None
            },
        };
        let row_tiles = chunk / SSD_TILE;
        let lower_tiles = row_tiles * (row_tiles + 1) / 2;
        let state_tiles = nn.div_ceil(SSD_TILE) * np.div_ceil(SSD_TILE);
        // SAFETY (every launch below): the arguments match the kernel's parameters, the packed
        // inputs were checked against the sizes in `args`, and the scratch buffers have the
        // sizes `ssd.cu` gives them.
        {
            let f = func(if split {
                "ssd_chunk_products_tc"
            } else {
                "ssd_chunk_products"
            })?;
            let mut builder = p.builder(&f);
            builder
                .arg(args)
                .arg(&mut out.dtp)
                .arg(&mut out.cum)
                .arg(&mut out.cb)
                .arg(&mut out.states);
            let blocks = nb * chunks * ng * lower_tiles + nb * chunks * nh * state_tiles;
            let cfg = config((blocks, 1, 1), SSD_PRODUCT_THREADS, 0)?;
            unsafe { launch(&mut builder, cfg) }?;
        }
        {
            let f = func(if split {
                "ssd_state_passing_split"
            } else {
                "ssd_state_passing"
            })?;
            let mut builder = p.builder(&f);
            builder
                .arg(args)
                .arg(&out.cum)
                .arg(&mut out.states)
                .arg(final_state);
            let with_lo = i32::from(staging == Staging::Planes);
            if let Some(planes) = &mut out.planes {
                builder.arg(planes).arg(&with_lo);
            }
            let cfg = config((nb * nh, (np * nn).div_ceil(THREADS), 1), THREADS, 0)?;
            unsafe { launch(&mut builder, cfg) }?;
        }
        Ok(out)
    }

    /// `ssd_chunk_scan` (or `ssd_chunk_scan_tc` when the states were split): the output
    /// `(batch, L, H, P)` into `y`, gated by z unless `args.z` is -1.
    fn scan(
        &self,
        p: &Packed,
        variant: &Variant,
        args: &SsdArgs,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        if self.staging == Staging::HiPlane {
            return Err(cuda_err(
                "the SSD's chunk scan needs both planes of the entering states".into(),
            ));
        }
        let (f, threads, shared) = match self.planes {
            Some(_) => (
                kernel_with_shared(
                    p.device(),
                    &SSD,
                    variant,
                    "ssd_chunk_scan_tc",
                    SSD_TC_SHARED,
                )?,
                SSD_TC_THREADS,
                SSD_TC_SHARED,
            ),
            None => (
                kernel(p.device(), &SSD, variant, "ssd_chunk_scan")?,
                SSD_PRODUCT_THREADS,
                0,
            ),
        };
        let mut builder = p.builder(&f);
        builder
            .arg(args)
            .arg(&self.dtp)
            .arg(&self.cum)
            .arg(&self.cb)
            .arg(self.planes.as_ref().unwrap_or(&self.states))
            .arg(y);
        let block_heads = (args.batch * args.chunks * args.heads) as usize;
        let p_tiles = (args.head_dim as usize).div_ceil(SSD_TILE);
        let grid = (block_heads, p_tiles * (self.chunk / SSD_TILE), 1);
        // SAFETY: as in `run`; `y` holds (batch, L, H, P) values.
        unsafe { launch(&mut builder, config(grid, threads, shared)?) }
    }
}

/// Chunked SSD (inputs `x, dt, A, B, C, [D], [z], [dt_bias], [initial_states]`); output
/// `[y (batch, L, H, P) | final_state (batch, H, P, N)]`. Three kernels in order (see `ssd.cu`).
pub(crate) fn ssd(p: &Packed, dims: &SsdDims, flags: SsdFlags) -> Result<CudaSlice<f32>> {
    let args = ssd_args(p, dims, flags, SSD_CHUNK)?;
    let defines = ssd_defines();
    let variant = p.variant(&defines);
    let y_len = dims.batch * dims.len * dims.heads * dims.head_dim;
    let mut out = p.buffer(y_len + dims.batch * dims.heads * dims.head_dim * dims.state)?;
    let staging = Staging::of(ssd_staged(p, &args)?, true);
    let chunks = SsdChunks::run(
        p,
        &variant,
        &args,
        SSD_CHUNK,
        &mut out.slice_mut(y_len..),
        staging,
    )?;
    chunks.scan(p, &variant, &args, &mut out.slice_mut(..y_len))?;
    Ok(out)
}

/// Chunk length of the SSD's backward: its chunk kernel holds a chunk's operands and two
/// `SSD_BWD_CHUNK`-square matrices in shared memory at once.
const SSD_BWD_CHUNK: usize = 64;
/// Threads of `ssd_bwd_chunk` (`BWD_THREADS` of `ssd.cu`). With bf16 cells two blocks share a
/// multiprocessor at 64 registers a thread; H200, bf16, H 80: 256 threads 896-901 us a
/// backward, 384 872-875, 512 831-833.
const SSD_BWD_THREADS: usize = 512;
/// Bytes of a cell of the backward kernels' shared matrices (`cell_t` of `ssd.cu`): bf16 for
/// bf16 inputs, f32 otherwise.
fn ssd_bwd_cell_bytes(bf16: bool) -> usize {
    if bf16 {
        2
    } else {
        4
    }
}
/// Threads of `ssd_bwd_own_states`: with 256 rather than 512 its blocks fit more to a
/// multiprocessor (H200: 58.8 -> 53.8 us at mamba2-130m's shape under ncu).
const SSD_BWD_OWN_THREADS: usize = 256;

/// The sizes `ssd.cu` is compiled with for the backward (its forward kernels included, at the
/// backward's chunk length).
pub(super) fn ssd_backward_defines() -> [(&'static str, usize); 5] {
    let [_, tile, threads] = ssd_defines();
    [
        ("SSD_Q", SSD_BWD_CHUNK),
        tile,
        threads,
        ("SSD_BWD", 1),
        ("BWD_THREADS", SSD_BWD_THREADS),
    ]
}

/// The row width of a shared matrix in the backward kernels (`pad_width` of `ssd.cu`): `n`
/// rounded up to a multiple of 32 (f32 cells) or 64 (bf16 cells, rows of 128 bytes), as their
/// swizzle and tensor-core tiles need.
pub(super) fn ssd_bwd_width(n: usize, bf16: bool) -> usize {
    n.next_multiple_of(if bf16 { 64 } else { 32 })
}

/// Bytes of `ssd_bwd_chunk`'s shared memory for head dimension `np` and state size `nn`, bf16
/// or f32 inputs: the cells of X and go (Q x P), B and C (Q x N), G and S_in (P x N), M and W
/// (Q x Q), widths and P rows at [`ssd_bwd_width`]; then floats: the parts of two row dots
/// (one per 8 columns), ten per-step vectors, one value per warp, g_D's part per p and the
/// diagonal block's column and row sums per 16 x 16 tile (2 Q / 16 x Q).
pub(super) fn ssd_bwd_chunk_shared(np: usize, nn: usize, bf16: bool) -> usize {
    let q = SSD_BWD_CHUNK;
    let (pw, nw) = (ssd_bwd_width(np, bf16), ssd_bwd_width(nn, bf16));
    let cells = 2 * q * pw + 2 * q * nw + 2 * pw * nw + 2 * q * q;
    let floats = q * nw / 8 + q * pw / 8 + 10 * q + SSD_BWD_THREADS / 32 + pw + 2 * q / 16 * q;
    ssd_bwd_cell_bytes(bf16) * cells + 4 * floats
}

/// Bytes of `ssd_bwd_own_states`' shared memory: the cells of go (Q x P) and C (Q x N), then
/// exp(cum) as floats.
fn ssd_bwd_own_states_shared(np: usize, nn: usize, bf16: bool) -> usize {
    let q = SSD_BWD_CHUNK;
    ssd_bwd_cell_bytes(bf16) * q * (ssd_bwd_width(np, bf16) + ssd_bwd_width(nn, bf16)) + 4 * q
}

/// Where each input's gradient starts in the SSD backward's flat output (in the packing order,
/// -1 for an absent input), and the output's length.
pub(super) fn ssd_grads_at(dims: &SsdDims, flags: SsdFlags) -> (SsdOffsets, usize) {
    let SsdDims {
        batch: nb,
        len: nl,
        heads: nh,
        head_dim: np,
        groups: ng,
        state: nn,
        ..
    } = *dims;
    let (tokens, bc_len) = (nb * nl * nh * np, nb * nl * ng * nn);
    let sizes = [
        tokens,
        nb * nl * nh,
        nh,
        bc_len,
        bc_len,
        if flags.d_per_p { nh * np } else { nh },
        tokens,
        nh,
        nb * nh * np * nn,
    ];
    let (starts, total) = gradient_starts(flags.present.after_five_required(), sizes);
    (starts.into(), total)
}

/// Threads, stages and tile width in n of `ssd_bwd_states_tc` (`STATES_THREADS`,
/// `STATES_STAGES`, `STATES_N_TILE` of `ssd.cu`), and the bytes of one stage: a chunk's go rows
/// of 64 + 4 f32, its C rows of 32 bf16 and its running sums.
const SSD_STATES_THREADS: usize = 128;
const SSD_STATES_STAGES: usize = 3;
const SSD_STATES_N_TILE: usize = 32;
const SSD_STATES_STAGE_BYTES: usize =
    SSD_BWD_CHUNK * (SSD_TILE + 4) * 4 + SSD_BWD_CHUNK * SSD_STATES_N_TILE * 2 + SSD_BWD_CHUNK * 4;

/// Tiles of `ssd_bwd_states_tc`'s blocks over one (batch, head)'s P x N states.
fn states_tiles(np: usize, nn: usize) -> usize {
    np.div_ceil(SSD_TILE) * nn.div_ceil(SSD_STATES_N_TILE)
}
/// Each block of `ssd_bwd_states_tc` walks every chunk in turn, so it takes the place of
/// `ssd_bwd_own_states` and `ssd_bwd_state_passing` only where the blocks are at least this many
/// per multiprocessor. H200, bf16, L 2048 (chunks of 64), backward: H 80 (320 blocks, 2.4 per
/// multiprocessor) 693 -> 662 us, H 24 (96 blocks) 241 -> 263 us.
const STATES_BLOCKS_PER_SM: usize = 2;

/// Whether `v` starts 16-byte aligned on the device.
fn aligned16(p: &Packed, v: &CudaView<f32>) -> bool {
    v.device_ptr(&p.stream).0 % 16 == 0
}

/// G, the gradient of the state leaving each chunk, as `ssd_bwd_chunk` reads it `(batch, chunks,
/// H, P, N)`: bf16 cells two to a float, or f32 with f32 inputs; and g_initial_states into
/// `grads` where asked (`at`). From go, the forward's running sums and g_final (`from`): where
/// the forward ran staged (`staged`, bf16 inputs), go starts 16-byte aligned and the blocks
/// fill [`STATES_BLOCKS_PER_SM`], `ssd_bwd_states_tc` alone; else each chunk's own share by
/// `ssd_bwd_own_states`, then `ssd_bwd_state_passing`.
fn gradients_of_states<G: GradType>(
    p: &Packed,
    variant: &Variant,
    args: &SsdArgs,
    from: (&CudaView<f32>, &CudaSlice<f32>, &CudaView<f32>),
    grads: &mut CudaSlice<G>,
    at: &SsdOffsets,
    staged: bool,
) -> Result<CudaSlice<f32>> {
    let (go, cum, g_final) = from;
    let (nb, nh, np, nn) = (
        args.batch as usize,
        args.heads as usize,
        args.head_dim as usize,
        args.state as usize,
    );
    let entries = nb * args.chunks as usize * nh * np * nn;
    // SAFETY (every launch below): the arguments match the kernel's parameters, go and g_final
    // hold (batch, L, H, P) and (batch, H, P, N) values, cum the forward's (batch, H, chunks *
    // SSD_BWD_CHUNK), and the G buffers (batch, chunks, H, P, N) cells.
    let fused = staged
        && aligned16(p, go)
        && nb * nh * states_tiles(np, nn) >= STATES_BLOCKS_PER_SM * multiprocessors(p.device())?;
    if fused {
        let mut cells = p.buffer(entries.div_ceil(2))?;
        let shared = SSD_STATES_STAGES * SSD_STATES_STAGE_BYTES;
        let f = kernel_with_shared(p.device(), &SSD, variant, "ssd_bwd_states_tc", shared)?;
        let mut builder = p.builder(&f);
        builder
            .arg(args)
            .arg(go)
            .arg(cum)
            .arg(g_final)
            .arg(&mut cells)
            .arg(grads)
            .arg(at);
        let cfg = config(
            (nb * nh, states_tiles(np, nn), 1),
            SSD_STATES_THREADS,
            shared,
        )?;
        unsafe { launch(&mut builder, cfg) }?;
        return Ok(cells);
    }
    // G as bf16 cells, two to a float (f32 cells: G replaces own in place).
    let mut g_cells = if p.is_bf16() {
        Some(p.buffer(entries.div_ceil(2))?)
    } else {
        None
    };
    let mut own = p.buffer(entries)?;
    {
        let most_shared = max_shared_opt_in(p.device())?;
        let shared = ssd_bwd_own_states_shared(np, nn, p.is_bf16());
        let f = kernel_with_shared(p.device(), &SSD, variant, "ssd_bwd_own_states", most_shared)?;
        let mut builder = p.builder(&f);
        builder.arg(args).arg(go).arg(cum).arg(&mut own);
        let cfg = config(
            (nb * args.chunks as usize * nh, 1, 1),
            SSD_BWD_OWN_THREADS,
            shared,
        )?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = kernel(p.device(), &SSD, variant, "ssd_bwd_state_passing")?;
        let mut builder = p.stream.launch_builder(&f);
        builder.arg(args).arg(cum).arg(g_final).arg(&mut own);
        if let Some(g_cells) = &mut g_cells {
            builder.arg(g_cells);
        }
        builder.arg(grads).arg(at);
        let cfg = config((nb * nh, (np * nn).div_ceil(THREADS), 1), THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(g_cells.unwrap_or(own))
}

/// Gradients of the chunked SSD given `grad = [g_y (batch, L, H, P) | g_final (batch, H, P,
/// N)]`: `[g_x | g_dt | g_A | g_B | g_C | g_D | g_z | g_dt_bias | g_initial_states]` (the
/// optional ones where given), or `None` when a chunk's operands do not fit the device's
/// shared memory (the caller then differentiates the tensor-operation form). The forward's
/// kernels at the backward's chunk length, then the backward's (see `ssd.cu`).
pub(crate) fn ssd_backward<G: GradType>(
    p: &Packed,
    dims: &SsdDims,
    flags: SsdFlags,
    grad: &CudaView<f32>,
) -> Result<Option<CudaSlice<G>>> {
    let SsdDims {
        batch: nb,
        len: nl,
        heads: nh,
        head_dim: np,
        groups: ng,
        state: nn,
        ..
    } = *dims;
    // Both shared-memory kernels are allowed the device's most (their launches ask for what
    // the sizes need, which differs from call to call).
    let (chunk_shared, most_shared) = (
        ssd_bwd_chunk_shared(np, nn, p.is_bf16()),
        max_shared_opt_in(p.device())?,
    );
    if chunk_shared > most_shared {
        return Ok(None);
    }
    let q = SSD_BWD_CHUNK;
    let chunks = nl.div_ceil(q);
    let present = flags.present;
    let args = ssd_args(p, dims, flags, q)?;
    let (at, total) = ssd_grads_at(dims, flags);
    let (tokens, bc_len) = (nb * nl * nh * np, nb * nl * ng * nn);
    let d_len = if flags.d_per_p { nh * np } else { nh };
    let defines = ssd_backward_defines();
    let variant = p.variant(&defines);
    let func = |name: &str| kernel(p.device(), &SSD, &variant, name);
    let block_heads = nb * chunks * nh;
    let state_len = nb * nh * np * nn;
    let mut grads = p.buffer_of::<G>(total)?;
    // The heads' shares of g_B and g_C as cells, in floats.
    let share_floats = (nb * nh * nl * nn * ssd_bwd_cell_bytes(p.is_bf16())).div_ceil(4);
    let mut b_share = p.buffer(share_floats)?;
    let mut c_share = p.buffer(share_floats)?;
    let mut a_part = p.buffer(block_heads)?;
    let mut bias_part = p.buffer(block_heads)?;
    let mut d_part = p.buffer(block_heads * np)?;
    let mut d_head_part = p.buffer(block_heads)?;
    let (g_y, g_final) = (grad.slice(..tokens), grad.slice(tokens..tokens + state_len));
    // The forward again, at the backward's chunk length (staged where it can be: the entering
    // states then left as bf16 planes, whose hi plane is `ssd_bwd_chunk`'s S_in as it is), and
    // with z the output before the gate, which g_z needs.
    let mut final_state = p.buffer(state_len)?;
    let staging = Staging::of(ssd_staged(p, &args)?, present.z);
    let fwd = SsdChunks::run(
        p,
        &variant,
        &args,
        q,
        &mut final_state.slice_mut(..),
        staging,
    )?;
    let ungated = if present.z {
        let mut out = p.buffer(tokens)?;
        let inputs = SsdOffsets {
            z: -1,
            ..args.inputs
        };
        let plain = SsdArgs { inputs, ..args };
        fwd.scan(p, &variant, &plain, &mut out.slice_mut(..))?;
        Some(out)
    } else {
        None
    };
    // SAFETY (every launch below): the arguments match the kernel's parameters, the packed
    // inputs were checked against `dims`, `grad` holds g_y and g_final (checked by the caller),
    // and the scratch and gradient buffers have the sizes `ssd.cu` gives them.
    // go, the gradient of the output before the gate: g_y itself without z.
    let gated = match &ungated {
        Some(out) => {
            let mut go = p.buffer(tokens)?;
            let f = func("ssd_bwd_gate")?;
            let mut builder = p.builder(&f);
            builder
                .arg(&args)
                .arg(&g_y)
                .arg(out)
                .arg(&mut go)
                .arg(&mut grads)
                .arg(&at);
            let cfg = config((tokens.div_ceil(THREADS), 1, 1), THREADS, 0)?;
            unsafe { launch(&mut builder, cfg) }?;
            Some(go)
        }
        None => None,
    };
    let go = match &gated {
        Some(go) => go.slice(..),
        None => grad.slice(..tokens),
    };
    let g_states = gradients_of_states(
        p,
        &variant,
        &args,
        (&go, &fwd.cum, &g_final),
        &mut grads,
        &at,
        staging != Staging::InPlace,
    )?;
    {
        let f = kernel_with_shared(p.device(), &SSD, &variant, "ssd_bwd_chunk", most_shared)?;
        let states_as_planes = i32::from(fwd.planes.is_some());
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(&go)
            .arg(&fwd.dtp)
            .arg(&fwd.cum)
            .arg(&fwd.cb)
            .arg(fwd.planes.as_ref().unwrap_or(&fwd.states))
            .arg(&states_as_planes)
            .arg(&g_states)
            .arg(&mut grads)
            .arg(&at)
            .arg(&mut b_share)
            .arg(&mut c_share)
            .arg(&mut a_part)
            .arg(&mut bias_part)
            .arg(&mut d_part)
            .arg(&mut d_head_part);
        let cfg = config((block_heads, 1, 1), SSD_BWD_THREADS, chunk_shared)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    for (share, start) in [(&b_share, at.b), (&c_share, at.c)] {
        let f = func("ssd_bwd_group_sum")?;
        let start = start as usize;
        let mut out = grads.slice_mut(start..start + bc_len);
        let mut builder = p.stream.launch_builder(&f);
        builder.arg(&args).arg(share).arg(&mut out);
        unsafe {
            launch(
                &mut builder,
                config((bc_len.div_ceil(THREADS), 1, 1), THREADS, 0)?,
            )
        }?;
    }
    // g_A, g_dt_bias and g_D: the (batch, chunk) parts added in order.
    let d_parts = if flags.d_per_p { &d_part } else { &d_head_part };
    let sum = func("sum_parts")?;
    for (here, part, start, width) in [
        (true, &a_part, at.a, nh),
        (present.bias, &bias_part, at.dt_bias, nh),
        (present.d, d_parts, at.d, d_len),
    ] {
        if !here {
            continue;
        }
        let start = start as usize;
        let mut out = grads.slice_mut(start..start + width);
        sum_parts(p, &sum, &part.slice(..), nb * chunks, width, &mut out)?;
    }
    Ok(Some(grads))
}

// ---------------------------------------------------------------------------------------
// Gated RMSNorm

/// Threads per (row, group) of the norm.
const NORM_THREADS: usize = 256;

/// `NormArgs` of `rmsnorm_gated.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormArgs {
    x: i64,
    weight: i64,
    z: i64,
    rows: i32,
    hidden: i32,
    group_size: i32,
    norm_before_gate: i32,
    eps: f32,
}

// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for NormArgs {}

/// Gated RMSNorm (inputs `x, weight, [z]`); output `(rows, hidden)`.
pub(crate) fn rmsnorm_gated(p: &Packed, dims: &NormDims, has_z: bool) -> Result<CudaSlice<f32>> {
    let [x, weight, z] = p.offsets([true, true, has_z])?;
    let args = NormArgs {
        x,
        weight,
        z,
        rows: int(dims.rows)?,
        hidden: int(dims.hidden)?,
        group_size: int(dims.group_size)?,
        norm_before_gate: dims.norm_before_gate.into(),
        eps: dims.eps,
    };
    let func = kernel(
        p.device(),
        &RMSNORM_GATED,
        &p.variant(&[("NORM_THREADS", NORM_THREADS)]),
        "rmsnorm_gated_fwd",
    )?;
    let mut out = p.buffer(dims.rows * dims.hidden)?;
    let blocks = dims.rows * (dims.hidden / dims.group_size);
    let cfg = config((blocks, 1, 1), NORM_THREADS, 0)?;
    {
        let mut builder = p.builder(&func);
        builder.arg(&args).arg(&mut out);
        // SAFETY: the arguments match `rmsnorm_gated_fwd`; the packed inputs were checked
        // against `dims` and `out` holds the output.
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
}

/// Largest group the norm's backward keeps in shared memory (48 KiB of f32 weight sums).
const NORM_BWD_MAX_GROUP: usize = 48 * 1024 / 4;
/// Blocks per multiprocessor the norm's backward aims for.
const NORM_BWD_BLOCKS_PER_SM: usize = 4;

/// Gradients of gated RMSNorm, given `grad = g_out (rows, hidden)`: `[g_x | g_weight | g_z if
/// z]`, or `None` for a group larger than [`NORM_BWD_MAX_GROUP`], left to the CPU.
pub(crate) fn rmsnorm_gated_backward<G: GradType>(
    p: &Packed,
    dims: &NormDims,
    has_z: bool,
    grad: &CudaView<f32>,
) -> Result<Option<CudaSlice<G>>> {
    if dims.group_size > NORM_BWD_MAX_GROUP {
        return Ok(None);
    }
    let [x, weight, z] = p.offsets([true, true, has_z])?;
    let args = NormArgs {
        x,
        weight,
        z,
        rows: int(dims.rows)?,
        hidden: int(dims.hidden)?,
        group_size: int(dims.group_size)?,
        norm_before_gate: dims.norm_before_gate.into(),
        eps: dims.eps,
    };
    let groups = dims.hidden / dims.group_size;
    let target = (NORM_BWD_BLOCKS_PER_SM * multiprocessors(p.device())?).div_ceil(groups);
    let rows_per_block = dims.rows.div_ceil(target.max(1)).max(1);
    let row_blocks = dims.rows.div_ceil(rows_per_block);
    let variant = p.variant(&[("NORM_THREADS", NORM_THREADS)]);
    let size = dims.rows * dims.hidden;
    let mut grads = p.buffer_of::<G>(size + dims.hidden + if has_z { size } else { 0 })?;
    let mut parts = p.buffer(row_blocks * dims.hidden)?;
    // SAFETY (both launches): the arguments match the kernels' parameters, the packed inputs
    // were checked against `dims`, `grad` holds g_out (checked by the caller), `grads` and
    // `parts` have the sizes `rmsnorm_gated.cu` gives them, and the dynamic shared memory holds
    // one group of f32.
    {
        let f = kernel(p.device(), &RMSNORM_GATED, &variant, "rmsnorm_gated_bwd")?;
        let mut builder = p.builder(&f);
        let rows_per_block = int(rows_per_block)?;
        builder
            .arg(&args)
            .arg(&rows_per_block)
            .arg(grad)
            .arg(&mut grads)
            .arg(&mut parts);
        let cfg = config((row_blocks, groups, 1), NORM_THREADS, dims.group_size * 4)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    let f = kernel(p.device(), &RMSNORM_GATED, &variant, "sum_parts")?;
    let mut out = grads.slice_mut(size..size + dims.hidden);
    sum_parts(p, &f, &parts.slice(..), row_blocks, dims.hidden, &mut out)?;
    Ok(Some(grads))
}
