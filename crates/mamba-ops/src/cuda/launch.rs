//! One launcher per op: the argument struct its kernels take (mirroring the `.cu` file's struct
//! field for field), the launch geometry, and the output buffer in the CPU op's flat layout.

use super::{config, cuda_err, kernel, launch, multiprocessors, Packed, Source};
use crate::causal_conv1d::{ConvDims, ConvUpdateDims};
use crate::rmsnorm_gated::NormDims;
use crate::selective_scan::ScanDims;
use crate::selective_state_update::StepDims;
use crate::ssd::SsdDims;
use crate::tensor::Present;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

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

// ---------------------------------------------------------------------------------------
// Selective scan

/// Segments (warps of 32 channels) per block of the scan's segment kernels.
const SCAN_WARPS: usize = 8;
/// Fewest steps per segment: shorter ones cost more in the combine than they save.
const SCAN_MIN_SEGMENT: usize = 16;
/// Blocks per multiprocessor the scan aims for, enough waves to even out the tail.
const SCAN_BLOCKS_PER_SM: usize = 8;

/// `ScanArgs` of `selective_scan.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScanArgs {
    u: i64,
    delta: i64,
    a: i64,
    b: i64,
    c: i64,
    d: i64,
    z: i64,
    delta_bias: i64,
    initial_state: i64,
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

/// Segments each channel's sequence is cut into: enough blocks to fill the GPU several times
/// over, but segments of at least `SCAN_MIN_SEGMENT` steps; a multiple of `SCAN_WARPS`.
fn scan_segments(dims: &ScanDims, multiprocessors: usize) -> usize {
    let channel_blocks = (dims.batch * dims.dim.div_ceil(32)).max(1);
    let wanted = (SCAN_BLOCKS_PER_SM * multiprocessors).div_ceil(channel_blocks);
    let most = dims.len.div_ceil(SCAN_MIN_SEGMENT).div_ceil(SCAN_WARPS);
    wanted.clamp(1, most.max(1)) * SCAN_WARPS
}

/// Token-major selective scan (inputs `u, delta, A, B, C, [D], [z], [delta_bias],
/// [initial_state]`); output `[out (batch, L, dim) | last_state (batch, dim, N)]`. Three kernels
/// in order (see `selective_scan.cu`).
pub(crate) fn selective_scan(
    p: &Packed,
    dims: &ScanDims,
    groups: usize,
    present: Present,
    softplus: bool,
) -> Result<CudaSlice<f32>> {
    let (nb, nd, nl, nn) = (dims.batch, dims.dim, dims.len, dims.state);
    let [u, delta, a, b, c, d, z, delta_bias, initial_state] = p.offsets([
        true,
        true,
        true,
        true,
        true,
        present.d,
        present.z,
        present.bias,
        present.init,
    ])?;
    let segments = scan_segments(dims, multiprocessors(p.device())?);
    let args = ScanArgs {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        initial_state,
        batch: int(nb)?,
        len: int(nl)?,
        dim: int(nd)?,
        groups: int(groups)?,
        softplus: softplus.into(),
        segments: int(segments)?,
        segment_len: int(nl.div_ceil(segments).max(1))?,
    };
    let defines = [("STATE_N", nn), ("SCAN_WARPS", SCAN_WARPS)];
    let variant = p.variant(&defines);
    let func = |name: &str| kernel(p.device(), &SELECTIVE_SCAN, &variant, name);
    let mut seg_state = p.buffer(nb * segments * nd * nn)?;
    let mut seg_dt = p.buffer(nb * segments * nd)?;
    let mut out = p.buffer(nb * nl * nd + nb * nd * nn)?;
    let segment_grid = (nd.div_ceil(32), segments / SCAN_WARPS, nb);
    // SAFETY (every launch below): the arguments match the kernel's parameters, the packed
    // inputs were checked against `dims`, and the scratch and output buffers have the sizes
    // `selective_scan.cu` gives them.
    {
        let f = func("selective_scan_segments")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(&mut seg_state).arg(&mut seg_dt);
        let cfg = config(segment_grid, 32 * SCAN_WARPS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = func("selective_scan_combine")?;
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(&mut seg_state)
            .arg(&seg_dt)
            .arg(&mut out);
        let cfg = config(((nb * nd * nn).div_ceil(THREADS), 1, 1), THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = func("selective_scan_outputs")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(&seg_state).arg(&mut out);
        let cfg = config(segment_grid, 32 * SCAN_WARPS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
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

/// One SSM decoding step (inputs `state, x, dt, A, B, C, [D], [z], [dt_bias]`); output
/// `[y (batch, H, P) | new state (batch, H, P, N)]`.
pub(crate) fn selective_state_update(
    p: &Packed,
    dims: &StepDims,
    present: Present,
    softplus: bool,
    dt_limit: (f32, f32),
) -> Result<CudaSlice<f32>> {
    let rows = dims.batch * dims.heads * dims.head_dim;
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
    // Lanes sharing one state row: a power of two, at most a warp.
    let row_lanes = dims.state.next_power_of_two().min(32);
    let defines = [("STATE_N", dims.state), ("ROW_LANES", row_lanes)];
    let func = kernel(
        p.device(),
        &SELECTIVE_STATE_UPDATE,
        &p.variant(&defines),
        "selective_state_update_fwd",
    )?;
    let mut out = p.buffer(rows + rows * dims.state)?;
    let cfg = config(((rows * row_lanes).div_ceil(THREADS), 1, 1), THREADS, 0)?;
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
/// (any chunk length gives the same result up to rounding); one chunk is one product tile.
const SSD_CHUNK: usize = 64;
const SSD_TILE: usize = 64;
const SSD_PRODUCT_THREADS: usize = 256;

/// `SsdArgs` of `ssd.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SsdArgs {
    x: i64,
    dt: i64,
    a: i64,
    b: i64,
    c: i64,
    d: i64,
    z: i64,
    dt_bias: i64,
    initial_states: i64,
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

/// Chunked SSD (inputs `x, dt, A, B, C, [D], [z], [dt_bias], [initial_states]`); output
/// `[y (batch, L, H, P) | final_state (batch, H, P, N)]`. Four kernels in order (see `ssd.cu`).
pub(crate) fn ssd(p: &Packed, dims: &SsdDims, flags: SsdFlags) -> Result<CudaSlice<f32>> {
    let (nb, nl, nh, np, ng, nn) = (
        dims.batch,
        dims.len,
        dims.heads,
        dims.head_dim,
        dims.groups,
        dims.state,
    );
    let chunks = nl.div_ceil(SSD_CHUNK);
    let present = flags.present;
    let [x, dt, a, b, c, d, z, dt_bias, initial_states] = p.offsets([
        true,
        true,
        true,
        true,
        true,
        present.d,
        present.z,
        present.bias,
        present.init,
    ])?;
    let args = SsdArgs {
        x,
        dt,
        a,
        b,
        c,
        d,
        z,
        dt_bias,
        initial_states,
        batch: int(nb)?,
        len: int(nl)?,
        heads: int(nh)?,
        head_dim: int(np)?,
        groups: int(ng)?,
        state: int(nn)?,
        chunks: int(chunks)?,
        d_per_p: flags.d_per_p.into(),
        softplus: flags.softplus.into(),
        dt_lo: flags.dt_limit.0,
        dt_hi: flags.dt_limit.1,
    };
    let defines = [
        ("SSD_Q", SSD_CHUNK),
        ("TILE", SSD_TILE),
        ("PRODUCT_THREADS", SSD_PRODUCT_THREADS),
    ];
    let variant = p.variant(&defines);
    let func = |name: &str| kernel(p.device(), &SSD, &variant, name);
    let steps = nb * nh * chunks * SSD_CHUNK;
    let mut dtp = p.buffer(steps)?;
    let mut cum = p.buffer(steps)?;
    let mut cb = p.buffer(nb * chunks * ng * SSD_CHUNK * SSD_CHUNK)?;
    let mut states = p.buffer(nb * chunks * nh * np * nn)?;
    let y_len = nb * nl * nh * np;
    let mut out = p.buffer(y_len + nb * nh * np * nn)?;
    let (n_tiles, p_tiles) = (nn.div_ceil(SSD_TILE), np.div_ceil(SSD_TILE));
    let block_heads = nb * chunks * nh;
    // SAFETY (every launch below): the arguments match the kernel's parameters, the packed
    // inputs were checked against `dims`, and the scratch and output buffers have the sizes
    // `ssd.cu` gives them.
    {
        let f = func("ssd_dt")?;
        let mut builder = p.builder(&f);
        builder.arg(&args).arg(&mut dtp).arg(&mut cum);
        let cfg = config((nb * nh * chunks, 1, 1), SSD_CHUNK, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = func("ssd_chunk_products")?;
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(&dtp)
            .arg(&cum)
            .arg(&mut cb)
            .arg(&mut states);
        let blocks = nb * chunks * ng + block_heads * n_tiles * p_tiles;
        let cfg = config((blocks, 1, 1), SSD_PRODUCT_THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = func("ssd_state_passing")?;
        let mut final_state = out.slice_mut(y_len..);
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(&cum)
            .arg(&mut states)
            .arg(&mut final_state);
        let cfg = config((nb * nh, (np * nn).div_ceil(THREADS), 1), THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    {
        let f = func("ssd_chunk_scan")?;
        let mut y = out.slice_mut(..y_len);
        let mut builder = p.builder(&f);
        builder
            .arg(&args)
            .arg(&dtp)
            .arg(&cum)
            .arg(&cb)
            .arg(&states)
            .arg(&mut y);
        let cfg = config((block_heads, p_tiles, 1), SSD_PRODUCT_THREADS, 0)?;
        unsafe { launch(&mut builder, cfg) }?;
    }
    Ok(out)
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
