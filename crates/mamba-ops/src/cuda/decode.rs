//! The kernels of the fused decoding step (`decode_step.cu`): a matrix-vector product with an
//! optional RMSNorm folded into its input, embedding rows, the one-token causal conv, the
//! Mamba-1 and Mamba-2 SSM steps, Mamba-2's gated norm, and the tail kernels that run a small
//! model's mixer after `in_proj` as one launch at batch 1. They take raw
//! device addresses and are launched on a stream of the caller's choosing, so that a decode
//! engine can record a whole model's step once as a CUDA graph and replay it every token.
//!
//! Every launcher is `unsafe`: the caller promises that each address points to a live device
//! buffer of the type and size the call's dimensions imply, on the device the kernels were
//! loaded for.

use super::launch::MAX_GRID_Y;
use super::{
    config, cuda_err, kernel, kernel_with_shared, launch, max_shared_opt_in, multiprocessors,
    Source, Variant,
};
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::CudaDevice;
use std::sync::Arc;

type Result<T> = candle_core::Result<T>;

/// A device address (`CUdeviceptr`).
pub type DevicePtr = u64;

pub(super) const DECODE_STEP: Source = Source {
    name: "decode_step",
    code: include_str!("decode_step.cu"),
};

/// Threads per block of `gemv` (8 warps) and of the element-wise kernels.
const GEMV_THREADS: usize = 256;
const GEMV_WARPS: usize = 8;
const THREADS: usize = 256;
/// Threads per block of the row kernels `gated_norm_step` and `prepare_rows` (`ROW_BLOCK`).
const ROW_THREADS: usize = 256;
/// Bytes of cuBLAS workspace: given up front, so that a product recorded into a CUDA graph
/// allocates nothing.
const BLAS_WORKSPACE: usize = 32 << 20;
/// Sequences one pass over a weight row serves (`GEMV_BT`, at most).
const MAX_BATCH_TILE: usize = 8;
/// Rows from which a matrix counts as tall (two rows per group, the interleaved kernels).
const GEMV_TALL_ROWS: usize = 2048;
/// Rows from which a tall matrix takes four rows per group (at a batch tile of 1).
const GEMV_TALLER_ROWS: usize = 4096;
/// Fewest 16-byte chunks of a row one warp takes, times two, when a row is split.
const GEMV_MIN_CHUNKS_PER_SPLIT: usize = 48;
/// Most bytes of the staged input (`GEMV_BT * cols` f32) in shared memory: 48 KB without
/// opting in, less the kernels' own partial sums.
const GEMV_STAGED_MAX_BYTES: usize = 46 << 10;
/// Largest batch whose Mamba-1 step is the row kernel (`mamba1_ssm_step`); past it the tiled
/// step (`mamba1_ssm_step_tiled*`) takes over. On the H200, mamba-2.8b bf16 per decoding
/// step, row kernel against tiled: batch 16 4.60 against 4.73 ms, batch 32 5.77 against 4.95,
/// batch 64 8.15 against 6.39.
const TILED_AFTER_BATCH: usize = 16;
// The tiled step reads its inputs as a kernel launched after the products that wrote them
// (no programmatic launch, which only batches of one tile use).
const _: () = assert!(TILED_AFTER_BATCH >= MAX_BATCH_TILE);
/// Warps per block of the tiled Mamba-1 step (`SSM_WARPS`).
const TILED_WARPS: usize = 4;
/// Fewest blocks per multiprocessor the tiled Mamba-1 step aims for when it chooses how many
/// sequences a thread takes.
const TILED_BLOCKS_PER_SM: usize = 4;
/// Most bytes of dynamic shared memory the tiled Mamba-1 step is allowed (opted into at
/// load): 32 rows of Δ weights and the block's sequences' dt_low, B and C.
const TILED_SHARED_MAX: usize = 96 << 10;
/// Most bytes of dynamic shared memory a kernel takes without opting in.
const MAX_SHARED_WITHOUT_OPT_IN: usize = 48 << 10;
/// Threads per block of the tail kernels (`TAIL_THREADS`) and the column parts of an
/// `out_proj` row (`TAIL_PARTS`).
const TAIL_THREADS: usize = 512;
const TAIL_PARTS: usize = 4;
/// Bytes of the device's opt-in shared memory left to the tail kernels' static arrays.
const TAIL_STATIC_SHARED: usize = 1 << 10;
/// Largest `out_proj` (bytes of weights) whose mixer takes the tail kernel. Measured on the
/// H200 at batch 1, ms per step without / with it: bf16 mamba-130m (2.4 MB) 0.35–0.36 / 0.34,
/// mamba2-130m 0.40 / 0.33–0.34; f32 (4.7 MB) mamba-130m 0.38 / 0.41, mamba2-130m 0.41–0.42 /
/// 0.39–0.40; bf16 mamba-1.4b (16.8 MB) 1.23 / 1.21, mamba-2.8b (26 MB) 2.16–2.19 /
/// 2.46–2.51, mamba2-2.7b 2.27 / 2.39. Past a few MB the copy of the rows and the kernel's
/// serial phases take longer than the launches they replace (BENCHMARKS.md).
const TAIL_MAX_WEIGHT_BYTES: usize = 4 << 20;

/// What the kernels are specialised for: weight type, batch and the model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSpec {
    /// Weights in bf16 (else f32).
    pub bf16_weights: bool,
    pub batch: usize,
    /// `N`.
    pub state_size: usize,
    /// `W`.
    pub conv_kernel: usize,
}

impl DecodeSpec {
    fn batch_tile(&self) -> usize {
        self.batch.clamp(1, MAX_BATCH_TILE)
    }

    fn row_lanes(&self) -> usize {
        self.state_size.next_power_of_two().min(32)
    }

    /// Sequences per thread of the tiled Mamba-1 step (`ITEMS`, their state rows held in
    /// registers: 4 and 2 only while that is at most 64 floats) for `d_inner` channels: the
    /// most that still gives every multiprocessor `TILED_BLOCKS_PER_SM` blocks, else 1.
    fn tiled_items(&self, d_inner: usize, multiprocessors: usize) -> usize {
        let blocks = |items: usize| d_inner.div_ceil(32) * self.batch.div_ceil(TILED_WARPS * items);
        [4, 2]
            .into_iter()
            .find(|&items| {
                items * self.state_size <= 64
                    && blocks(items) >= TILED_BLOCKS_PER_SM * multiprocessors
            })
            .unwrap_or(1)
    }

    /// The sizes `decode_step.cu` is compiled for.
    pub(crate) fn defines(&self) -> [(&'static str, usize); 5] {
        [
            ("GEMV_BT", self.batch_tile()),
            ("STATE_N", self.state_size),
            ("ROW_LANES", self.row_lanes()),
            ("CONV_W", self.conv_kernel),
            ("EARLY_START", self.small_kernels_early().into()),
        ]
    }

    /// Whether the conv and SSM steps and the gated norm start early, in the tail of the
    /// product before them: behind this crate's products, yes; behind cuBLAS's (batches past
    /// one tile) no, since their waiting blocks could take the places of the GEMM's later
    /// waves (mamba-2.8b at batch 64: 8.1 -> 18.5 ms per step on the H200 when they started
    /// early and also let the next kernel start early).
    fn small_kernels_early(&self) -> bool {
        self.batch <= MAX_BATCH_TILE
    }

    /// How a product of `rows x cols` weights is launched (`decode_step.cu`'s rule, measured
    /// on the H200 over the 130m to 2.8b models' matrices): which kernel (rows per group, and
    /// whether the input is staged in shared memory), the split, and a persistent grid of up
    /// to four blocks per multiprocessor, taking as few tasks each as that allows.
    fn gemv_plan(&self, multiprocessors: usize, rows: usize, cols: usize) -> GemvPlan {
        let tile = self.batch_tile();
        let staged = tile * cols * std::mem::size_of::<f32>();
        let fits = staged <= GEMV_STAGED_MAX_BYTES;
        let kernel = match rows {
            r if r < GEMV_TALL_ROWS => GemvKernel::R1,
            r if r >= GEMV_TALLER_ROWS && tile == 1 && fits => GemvKernel::R4Staged,
            _ if fits => GemvKernel::R2Staged,
            _ => GemvKernel::R2,
        };
        let groups = rows.div_ceil(kernel.rows_per_group());
        let chunks = cols / self.chunk();
        let tasks = |split: usize| (groups * split).div_ceil(GEMV_WARPS);
        let mut split = 1;
        while split < GEMV_WARPS
            && tasks(split) < 2 * multiprocessors
            && chunks / (2 * split) >= GEMV_MIN_CHUNKS_PER_SPLIT
        {
            split *= 2;
        }
        // The blocks the kernels' registers allow per multiprocessor (four, two for gemv_r1
        // at large tiles): three were measured slower than four (mamba-1.4b bf16 1.62 against
        // 1.53 ms per step), never faster.
        let blocks_per_sm = if kernel == GemvKernel::R1 && tile > 2 {
            2
        } else {
            4
        };
        // Every block the same number of tasks: a last few blocks with one task more than
        // the rest would double the product's tail.
        let tasks_per_block = tasks(split).div_ceil(blocks_per_sm * multiprocessors);
        GemvPlan {
            kernel,
            split,
            grid: tasks(split).div_ceil(tasks_per_block.max(1)),
            shared: if kernel.staged() { staged } else { 0 },
        }
    }

    /// How a tail kernel (`decode_step.cu`'s `mamba1_tail` / `mamba2_tail`) is launched for an
    /// `out_proj` of `rows x cols` and `inputs` floats staged for the SSM step: one block per
    /// multiprocessor at most, each owning as few rows as that allows, with its rows, y' and
    /// the partial sums in at most `max_shared` bytes of shared memory. `None` where the tail
    /// kernels do not apply: batches past one, an `out_proj` past `TAIL_MAX_WEIGHT_BYTES`, or
    /// rows that do not fit.
    fn tail_plan(
        &self,
        multiprocessors: usize,
        max_shared: usize,
        (rows, cols): (usize, usize),
        inputs: usize,
    ) -> Option<TailPlan> {
        let weight_bytes = if self.bf16_weights { 2 } else { 4 };
        if self.batch != 1
            || rows == 0
            || cols == 0
            || !cols.is_multiple_of(self.chunk())
            || rows * cols * weight_bytes > TAIL_MAX_WEIGHT_BYTES
        {
            return None;
        }
        let rows_per_block = rows.div_ceil(multiprocessors.max(1));
        let shared = rows_per_block * cols * weight_bytes
            + cols * 4
            + inputs.div_ceil(4) * 16
            + rows_per_block * TAIL_PARTS * 4;
        (shared <= max_shared).then(|| TailPlan {
            grid: rows.div_ceil(rows_per_block),
            rows_per_block,
            shared,
        })
    }

    /// Weight elements per 16-byte chunk of a row.
    fn chunk(&self) -> usize {
        if self.bf16_weights {
            8
        } else {
            4
        }
    }
}

/// The matrix-vector kernels of `decode_step.cu`, in the order [`DecodeKernels`] loads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GemvKernel {
    /// `gemv_r1`: one row per group, the input read in the loop (short matrices).
    R1,
    /// `gemv_r2`: two rows per group, the input read in the loop (tall matrices whose
    /// input tile does not fit in shared memory).
    R2,
    /// `gemv_r2_xs`: two rows per group, the input staged in shared memory.
    R2Staged,
    /// `gemv_r4_xs`: four rows per group, the input staged in shared memory.
    R4Staged,
}

impl GemvKernel {
    fn rows_per_group(self) -> usize {
        match self {
            GemvKernel::R1 => 1,
            GemvKernel::R2 | GemvKernel::R2Staged => 2,
            GemvKernel::R4Staged => 4,
        }
    }

    fn staged(self) -> bool {
        matches!(self, GemvKernel::R2Staged | GemvKernel::R4Staged)
    }
}

/// How a tail kernel is launched: blocks, `out_proj` rows per block, dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TailPlan {
    grid: usize,
    rows_per_block: usize,
    shared: usize,
}

/// How one product is launched: kernel, warps per row group, blocks, dynamic shared memory.
#[derive(Debug, Clone, Copy)]
struct GemvPlan {
    kernel: GemvKernel,
    split: usize,
    grid: usize,
    shared: usize,
}

/// Launches `function`, with programmatic dependent launch allowed when `programmatic`: it
/// may then start while the kernel before it on the stream still runs (it waits, with
/// `griddepcontrol.wait`, before reading that kernel's results). Recorded into a CUDA graph
/// as a programmatic edge.
///
/// # Safety
/// `params` points to the kernel's parameters, in order and of its types.
unsafe fn launch_dependent(
    stream: &Arc<CudaStream>,
    function: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
    programmatic: bool,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut attribute = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err(format!("binding the device's context: {e:?}")))?;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: programmatic.into(),
    };
    // SAFETY: the configuration and attribute live through the call; the caller vouches
    // for the parameters.
    let status = unsafe {
        sys::cuLaunchKernelEx(
            &config,
            function.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    status
        .result()
        .map_err(|e| cuda_err(format!("launching a decode kernel: {e:?}")))
}

/// A kernel parameter as `cuLaunchKernelEx` takes it: the address of its value.
fn param<T>(value: &T) -> *mut std::ffi::c_void {
    (value as *const T).cast_mut().cast()
}

/// `GemvArgs` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemvArgs {
    rows: i32,
    cols: i32,
    batch: i32,
    split: i32,
    x_stride: i64,
    y_stride: i64,
    accumulate: i32,
    norm_eps: f32,
}

/// `ConvEpilogue` of `decode_step.cu` (`channels == 0`: none, the default).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ConvEpilogue {
    weight: DevicePtr,
    bias: DevicePtr,
    states: DevicePtr,
    out: DevicePtr,
    layer: i32,
    channels: i32,
    offset: i32,
}

/// `ConvArgs` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvArgs {
    batch: i32,
    channels: i32,
    x_stride: i64,
    x_offset: i64,
}

/// `Mamba1Args` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Mamba1Args {
    batch: i32,
    d_inner: i32,
    dt_rank: i32,
    xz_stride: i64,
    dbc_stride: i64,
    bc_eps: f32,
}

/// `Mamba2Args` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Mamba2Args {
    batch: i32,
    heads: i32,
    head_dim: i32,
    groups: i32,
    gate: i32,
    xbc_stride: i64,
    in_stride: i64,
    dt_offset: i64,
    dt_lo: f32,
    dt_hi: f32,
}

/// `TailArgs` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct TailArgs {
    rows: i32,
    cols: i32,
    rows_per_block: i32,
    norm_eps: f32,
}

/// `PrepArgs` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrepArgs {
    cols: i32,
    out_bf16: i32,
    x_stride: i64,
    norm_eps: f32,
}

/// `GatedNormArgs` of `decode_step.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GatedNormArgs {
    d_inner: i32,
    group_size: i32,
    norm_before_gate: i32,
    z_stride: i64,
    eps: f32,
}

// SAFETY: plain old data laid out as the kernels' structs.
unsafe impl DeviceRepr for GemvArgs {}
unsafe impl DeviceRepr for ConvArgs {}
unsafe impl DeviceRepr for Mamba1Args {}
unsafe impl DeviceRepr for Mamba2Args {}
unsafe impl DeviceRepr for GatedNormArgs {}
unsafe impl DeviceRepr for PrepArgs {}
unsafe impl DeviceRepr for TailArgs {}

/// `y (+)= W x'` for every sequence: `W: (rows, cols)` in the weight type, `x: (batch, cols)`
/// with `x_stride` elements between sequences, `y: (batch, rows)` likewise.
#[derive(Debug, Clone, Copy)]
pub struct Gemv {
    pub weight: DevicePtr,
    pub rows: usize,
    pub cols: usize,
    pub x: DevicePtr,
    pub x_stride: usize,
    pub y: DevicePtr,
    pub y_stride: usize,
    /// f32 `(rows)`, added to each output.
    pub bias: Option<DevicePtr>,
    /// `(norm weight (cols) f32, eps)`: `x' = x * weight / sqrt(mean(x^2) + eps)`.
    pub norm: Option<(DevicePtr, f32)>,
    /// Add to `y` instead of overwriting it (a residual connection).
    pub accumulate: bool,
    /// The causal conv step over some of the outputs, done by the blocks that produced them.
    pub conv: Option<GemvConv>,
}

/// The causal conv step over outputs `[offset, offset + channels)` of a [`Gemv`] (every
/// sequence's `y` row), as [`ConvStep`] computes it, with layer `layer`'s conv state `(batch,
/// channels, W-1)` found in the device table `states`; writes `out: (batch, channels)`.
#[derive(Debug, Clone, Copy)]
pub struct GemvConv {
    pub offset: usize,
    pub channels: usize,
    /// f32 `(channels, W)` and `(channels)`.
    pub weight: DevicePtr,
    pub bias: Option<DevicePtr>,
    pub states: DevicePtr,
    pub layer: usize,
    pub out: DevicePtr,
}

/// The one-token causal conv over `channels` columns of `x` starting at `x_offset`, with the
/// state of its layer in the state table; writes `out: (batch, channels)`.
#[derive(Debug, Clone, Copy)]
pub struct ConvStep {
    pub x: DevicePtr,
    pub x_stride: usize,
    pub x_offset: usize,
    pub channels: usize,
    /// f32 `(channels, W)` and `(channels)`.
    pub weight: DevicePtr,
    pub bias: Option<DevicePtr>,
    pub out: DevicePtr,
}

/// Mamba-1's SSM step (the Δ projection folded in); see `decode_step.cu`.
#[derive(Debug, Clone, Copy)]
pub struct Mamba1Step {
    /// The conv output `(batch, d_inner)`.
    pub xc: DevicePtr,
    /// `x_proj`'s output `(batch, dbc_stride)`: `[dt_low | B | C]`.
    pub dbc: DevicePtr,
    pub dbc_stride: usize,
    /// `in_proj`'s output `(batch, 2 d_inner)`: the gate `z` is its second half.
    pub xz: DevicePtr,
    /// `dt_proj`'s weight `(d_inner, dt_rank)` in the weight type; f32 bias, `A = -exp(A_log)`
    /// `(d_inner, N)` and `D`.
    pub dt_weight: DevicePtr,
    pub dt_bias: DevicePtr,
    pub a: DevicePtr,
    pub d: DevicePtr,
    pub d_inner: usize,
    pub dt_rank: usize,
    /// FalconMamba's weightless RMS norm of Δ, B and C.
    pub bc_eps: Option<f32>,
    /// `(batch, d_inner)`.
    pub y: DevicePtr,
}

/// Mamba-2's SSM step; see `decode_step.cu`.
#[derive(Debug, Clone, Copy)]
pub struct Mamba2Step {
    /// The conv output `(batch, d_inner + 2 G N)`: `[x | B | C]`.
    pub xbc: DevicePtr,
    /// `in_proj`'s output `(batch, in_stride)`, holding the raw Δ at column `dt_offset + h`.
    pub zxbcdt: DevicePtr,
    pub in_stride: usize,
    pub dt_offset: usize,
    /// f32 `(H)` each: the Δ bias, `A = -exp(A_log)` and `D`.
    pub dt_bias: DevicePtr,
    pub a: DevicePtr,
    pub d: DevicePtr,
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub dt_limit: (f32, f32),
    /// Multiply `y` by `silu(z)`, `z` the first `d_inner` columns of `zxbcdt` (when the norm
    /// after the gate folds into `out_proj`).
    pub gate: bool,
    /// `(batch, d_inner)`.
    pub y: DevicePtr,
}

/// Mamba-2's gated RMSNorm of `y: (batch, d_inner)` in place, gate `z` read with `z_stride`.
#[derive(Debug, Clone, Copy)]
pub struct GatedNormStep {
    pub y: DevicePtr,
    pub z: DevicePtr,
    pub z_stride: usize,
    pub weight: DevicePtr,
    pub d_inner: usize,
    pub group_size: usize,
    pub eps: f32,
    pub norm_before_gate: bool,
}

/// `out_proj` at the end of a tail kernel: `h += W y' (+ bias)` for `W: (rows, cols)` in the
/// weight type, with `barrier` the layer's counter of the kernel's grid barriers (one u32,
/// zeroed before the step by [`DecodeKernels::clear_barriers`]).
#[derive(Debug, Clone, Copy)]
pub struct TailProduct {
    pub weight: DevicePtr,
    pub rows: usize,
    pub cols: usize,
    /// f32 `(rows)`.
    pub bias: Option<DevicePtr>,
    /// The residual stream `(rows)`.
    pub h: DevicePtr,
    pub barrier: DevicePtr,
}

/// Mamba-1's mixer after `in_proj` and its conv, at batch 1, in one launch: `x_proj` (its
/// weight `(dt_rank + 2 N, d_inner)` in the weight type, output in `step.dbc`), the SSM step
/// and `out_proj` with the residual add.
#[derive(Debug, Clone, Copy)]
pub struct Mamba1Tail {
    pub x_proj: DevicePtr,
    pub step: Mamba1Step,
    pub out_proj: TailProduct,
}

/// Mamba-2's mixer after `in_proj` and its conv, at batch 1, in one launch: the SSM step
/// (its gate set when `norm` is) and `out_proj` of `y`, or of `rmsnorm(y) * weight` with
/// `norm = (weight, eps)`, with the residual add.
#[derive(Debug, Clone, Copy)]
pub struct Mamba2Tail {
    pub step: Mamba2Step,
    pub norm: Option<(DevicePtr, f32)>,
    pub out_proj: TailProduct,
}

/// The decode kernels loaded for one [`DecodeSpec`] on one device.
pub struct DecodeKernels {
    spec: DecodeSpec,
    multiprocessors: usize,
    /// `gemv_r1`, `gemv_r2`, `gemv_r2_xs`, `gemv_r4_xs` (see [`GemvKernel`]).
    gemv: [CudaFunction; 4],
    embed: CudaFunction,
    conv_step: CudaFunction,
    mamba1_step: CudaFunction,
    /// `mamba1_ssm_step_tiled1`, `_tiled2`, `_tiled4` (sequences per thread).
    mamba1_step_tiled: [CudaFunction; 3],
    mamba2_step: CudaFunction,
    gated_norm: CudaFunction,
    prepare_rows: CudaFunction,
    /// `mamba1_tail`, `mamba2_tail`, and the dynamic shared memory they are allowed.
    tails: [CudaFunction; 2],
    tail_shared_max: usize,
}

/// `v` as a kernel's `int`.
fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| cuda_err(format!("size {v} does not fit a kernel's int")))
}

fn long(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| cuda_err(format!("size {v} does not fit a kernel's long")))
}

/// The device address, or 0 (a null pointer) for none.
fn or_null(p: Option<DevicePtr>) -> DevicePtr {
    p.unwrap_or(0)
}

impl DecodeKernels {
    /// Compiles (once per process) and loads the kernels for `spec` on `dev`.
    pub fn load(dev: &CudaDevice, spec: DecodeSpec) -> Result<Self> {
        if spec.batch == 0 || spec.state_size == 0 || spec.conv_kernel < 2 {
            return Err(cuda_err(format!("no decode kernels for {spec:?}")));
        }
        let defines = spec.defines();
        let variant = Variant {
            defines: &defines,
            bf16: spec.bf16_weights,
        };
        let load = |name| kernel(dev, &DECODE_STEP, &variant, name);
        let load_tiled =
            |name| kernel_with_shared(dev, &DECODE_STEP, &variant, name, TILED_SHARED_MAX);
        let tail_shared_max = max_shared_opt_in(dev)?.saturating_sub(TAIL_STATIC_SHARED);
        let load_tail =
            |name| kernel_with_shared(dev, &DECODE_STEP, &variant, name, tail_shared_max);
        Ok(DecodeKernels {
            spec,
            multiprocessors: multiprocessors(dev)?,
            gemv: [
                load("gemv_r1")?,
                load("gemv_r2")?,
                load("gemv_r2_xs")?,
                load("gemv_r4_xs")?,
            ],
            embed: load("embed")?,
            conv_step: load("conv_step")?,
            mamba1_step: load("mamba1_ssm_step")?,
            mamba1_step_tiled: [
                load_tiled("mamba1_ssm_step_tiled1")?,
                load_tiled("mamba1_ssm_step_tiled2")?,
                load_tiled("mamba1_ssm_step_tiled4")?,
            ],
            mamba2_step: load("mamba2_ssm_step")?,
            gated_norm: load("gated_norm_step")?,
            prepare_rows: load("prepare_rows")?,
            tails: [load_tail("mamba1_tail")?, load_tail("mamba2_tail")?],
            tail_shared_max,
        })
    }

    /// Launches one of the small kernels (conv step, SSM steps, gated norm): with
    /// programmatic dependent launch when they start early
    /// ([`DecodeSpec::small_kernels_early`]).
    ///
    /// # Safety
    /// As for [`launch_dependent`].
    unsafe fn launch_small(
        &self,
        stream: &Arc<CudaStream>,
        function: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        // SAFETY: the caller vouches for the parameters.
        unsafe {
            launch_dependent(
                stream,
                function,
                cfg,
                params,
                self.spec.small_kernels_early(),
            )
        }
    }

    pub fn spec(&self) -> DecodeSpec {
        self.spec
    }

    /// Whether the batch is past one tile of the matrix-vector kernel: the products then go
    /// through cuBLAS ([`BlasProducts`]), whose tensor-core GEMMs read each weight once for
    /// the whole batch, where `gemv` would be bound by its FMAs.
    pub fn batch_wants_blas(&self) -> bool {
        self.spec.batch > MAX_BATCH_TILE
    }

    /// Whether [`DecodeKernels::gemv`] takes a matrix of `cols` columns: its rows must be
    /// whole 16-byte chunks.
    pub fn gemv_fits(&self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.spec.chunk())
    }

    /// # Safety
    /// Every address points to a live buffer of the sizes `g` and the spec's batch imply;
    /// `weight`, `x` and `norm`'s weight are 16-byte aligned.
    pub unsafe fn gemv(&self, stream: &Arc<CudaStream>, g: &Gemv) -> Result<()> {
        let chunk = self.spec.chunk();
        if !self.gemv_fits(g.cols) || !g.x_stride.is_multiple_of(4) {
            return Err(cuda_err(format!(
                "gemv: {} columns (x stride {}) are not whole {chunk}-element chunks",
                g.cols, g.x_stride
            )));
        }
        let plan = self.spec.gemv_plan(self.multiprocessors, g.rows, g.cols);
        let args = GemvArgs {
            rows: int(g.rows)?,
            cols: int(g.cols)?,
            batch: int(self.spec.batch)?,
            split: int(plan.split)?,
            x_stride: long(g.x_stride)?,
            y_stride: long(g.y_stride)?,
            accumulate: g.accumulate.into(),
            norm_eps: g.norm.map_or(-1.0, |(_, eps)| eps),
        };
        let norm_w = or_null(g.norm.map(|(w, _)| w));
        let bias = or_null(g.bias);
        let conv = match g.conv {
            Some(c) => {
                if c.offset + c.channels > g.rows {
                    return Err(cuda_err(format!(
                        "a conv over outputs {}..{} of a product of {} rows",
                        c.offset,
                        c.offset + c.channels,
                        g.rows
                    )));
                }
                int(self.spec.batch * c.channels)?;
                ConvEpilogue {
                    weight: c.weight,
                    bias: or_null(c.bias),
                    states: c.states,
                    out: c.out,
                    layer: int(c.layer)?,
                    channels: int(c.channels)?,
                    offset: int(c.offset)?,
                }
            }
            None => ConvEpilogue::default(),
        };
        let Some(cfg) = config((plan.grid, 1, 1), GEMV_THREADS, plan.shared)? else {
            return Ok(());
        };
        let mut params = [
            param(&g.weight),
            param(&g.x),
            param(&bias),
            param(&norm_w),
            param(&args),
            param(&conv),
            param(&g.y),
        ];
        // SAFETY: the parameters are `gemv_r*`'s, in order, alive for the call; the caller
        // vouches for the buffers.
        unsafe {
            launch_dependent(
                stream,
                &self.gemv[plan.kernel as usize],
                cfg,
                &mut params,
                true,
            )
        }
    }

    /// `h (batch, hidden) = table[ids]` for a `(vocab, hidden)` table of f32 or (`bf16`)
    /// bf16 rows; `ids: (batch)` u32, checked against the table's rows by the caller.
    ///
    /// # Safety
    /// As for [`DecodeKernels::gemv`].
    pub unsafe fn embed(
        &self,
        stream: &Arc<CudaStream>,
        table: DevicePtr,
        bf16: bool,
        ids: DevicePtr,
        hidden: usize,
        h: DevicePtr,
    ) -> Result<()> {
        let (hidden_arg, bf16_arg) = (int(hidden)?, i32::from(bf16));
        let cfg = config((self.spec.batch, 1, 1), THREADS, 0)?;
        let mut b = stream.launch_builder(&self.embed);
        b.arg(&table)
            .arg(&bf16_arg)
            .arg(&ids)
            .arg(&hidden_arg)
            .arg(&h);
        // SAFETY: arguments as `embed` takes them.
        unsafe { launch(&mut b, cfg) }
    }

    /// # Safety
    /// As for [`DecodeKernels::gemv`]; `states` is a device table of `(conv, ssm)` f32 state
    /// addresses per layer, `layer`'s conv state being `(batch, channels, W-1)`.
    pub unsafe fn conv_step(
        &self,
        stream: &Arc<CudaStream>,
        states: DevicePtr,
        layer: usize,
        c: &ConvStep,
    ) -> Result<()> {
        let args = ConvArgs {
            batch: int(self.spec.batch)?,
            channels: int(c.channels)?,
            x_stride: long(c.x_stride)?,
            x_offset: long(c.x_offset)?,
        };
        let layer = int(layer)?;
        let bias = or_null(c.bias);
        // The kernel indexes its threads with `int`s.
        let threads = self.spec.batch * c.channels;
        int(threads)?;
        let Some(cfg) = config((threads.div_ceil(THREADS), 1, 1), THREADS, 0)? else {
            return Ok(());
        };
        let mut params = [
            param(&c.x),
            param(&states),
            param(&layer),
            param(&c.weight),
            param(&bias),
            param(&args),
            param(&c.out),
        ];
        // SAFETY: the parameters are `conv_step`'s, in order, alive for the call.
        unsafe { self.launch_small(stream, &self.conv_step, cfg, &mut params) }
    }

    /// The launch of an SSM step over `rows` state rows per sequence, `ROW_LANES` threads
    /// each: a grid of (blocks of rows, sequences), and `staged` floats of dynamic shared
    /// memory per block (the sequence's inputs) when the kernel starts early.
    fn state_rows_config(&self, rows: usize, staged: usize) -> Result<Option<LaunchConfig>> {
        // The kernels index their threads with `int`s; sequences are the grid's y.
        int(self.spec.batch * rows * self.spec.row_lanes())?;
        let shared = if self.spec.small_kernels_early() {
            staged
        } else {
            0
        };
        if self.spec.batch > MAX_GRID_Y || shared * 4 > MAX_SHARED_WITHOUT_OPT_IN {
            return Err(cuda_err(format!(
                "an SSM step of {} sequences staging {staged} floats (at most {MAX_GRID_Y} and {})",
                self.spec.batch,
                MAX_SHARED_WITHOUT_OPT_IN / 4
            )));
        }
        let blocks = (rows * self.spec.row_lanes()).div_ceil(THREADS);
        config((blocks, self.spec.batch, 1), THREADS, shared * 4)
    }

    /// # Safety
    /// As for [`DecodeKernels::gemv`]; `states` is a device table of `(conv, ssm)` f32 state
    /// addresses per layer, `layer`'s SSM state being `(batch, d_inner, N)`.
    pub unsafe fn mamba1_step(
        &self,
        stream: &Arc<CudaStream>,
        states: DevicePtr,
        layer: usize,
        m: &Mamba1Step,
    ) -> Result<()> {
        let args = self.mamba1_args(m)?;
        let layer = int(layer)?;
        let launch = if self.spec.batch > TILED_AFTER_BATCH {
            self.mamba1_tiled_launch(m)?
        } else {
            self.state_rows_config(m.d_inner, self.mamba1_inputs(m.dt_rank))?
                .map(|cfg| (&self.mamba1_step, cfg))
        };
        let Some((function, cfg)) = launch else {
            return Ok(());
        };
        let mut params = [
            param(&m.xc),
            param(&m.dbc),
            param(&m.xz),
            param(&m.dt_weight),
            param(&m.dt_bias),
            param(&m.a),
            param(&m.d),
            param(&states),
            param(&layer),
            param(&args),
            param(&m.y),
        ];
        // SAFETY: the parameters are those of `mamba1_ssm_step` and of the tiled kernels
        // (one list), in order, alive for the call.
        unsafe { self.launch_small(stream, function, cfg, &mut params) }
    }

    /// The kernel and launch of `mamba1_ssm_step_tiled*`, the Mamba-1 step of large batches:
    /// blocks of 32 channels by `TILED_WARPS` warps of sequences, staging the channels' Δ
    /// weights and each sequence's dt_low, B and C in shared memory.
    fn mamba1_tiled_launch(&self, m: &Mamba1Step) -> Result<Option<(&CudaFunction, LaunchConfig)>> {
        let items = self.spec.tiled_items(m.d_inner, self.multiprocessors);
        let seqs = TILED_WARPS * items;
        // `decode_step.cu`'s layout: weight rows of dt4 (dt_rank rounded up to 4) or dt4 + 4
        // floats, an odd number of float4s; input rows of dt4 + 2 N rounded up to 4.
        let dt4 = m.dt_rank.div_ceil(4) * 4;
        let w_stride = if (dt4 / 4) % 2 == 1 { dt4 } else { dt4 + 4 };
        let in_stride = dt4 + (2 * self.spec.state_size).div_ceil(4) * 4;
        let shared = 4 * (32 * w_stride + seqs * in_stride);
        if shared > TILED_SHARED_MAX {
            return Err(cuda_err(format!(
                "a Mamba-1 step with dt_rank {} stages {shared} bytes (at most {TILED_SHARED_MAX})",
                m.dt_rank
            )));
        }
        let grid = (m.d_inner.div_ceil(32), self.spec.batch.div_ceil(seqs), 1);
        if grid.1 > MAX_GRID_Y {
            return Err(cuda_err(format!(
                "a Mamba-1 step of {} sequences (at most {})",
                self.spec.batch,
                MAX_GRID_Y * seqs
            )));
        }
        let function = &self.mamba1_step_tiled[items.trailing_zeros() as usize];
        Ok(config(grid, 32 * TILED_WARPS, shared)?.map(|cfg| (function, cfg)))
    }

    /// # Safety
    /// As for [`DecodeKernels::mamba1_step`], `layer`'s SSM state being `(batch, H, P, N)`.
    pub unsafe fn mamba2_step(
        &self,
        stream: &Arc<CudaStream>,
        states: DevicePtr,
        layer: usize,
        m: &Mamba2Step,
    ) -> Result<()> {
        let d_inner = m.heads * m.head_dim;
        let args = self.mamba2_args(m)?;
        let layer = int(layer)?;
        let Some(cfg) = self.state_rows_config(d_inner, self.mamba2_inputs(m.groups))? else {
            return Ok(());
        };
        let mut params = [
            param(&m.xbc),
            param(&m.zxbcdt),
            param(&m.dt_bias),
            param(&m.a),
            param(&m.d),
            param(&states),
            param(&layer),
            param(&args),
            param(&m.y),
        ];
        // SAFETY: the parameters are `mamba2_ssm_step`'s, in order, alive for the call.
        unsafe { self.launch_small(stream, &self.mamba2_step, cfg, &mut params) }
    }

    fn mamba1_args(&self, m: &Mamba1Step) -> Result<Mamba1Args> {
        Ok(Mamba1Args {
            batch: int(self.spec.batch)?,
            d_inner: int(m.d_inner)?,
            dt_rank: int(m.dt_rank)?,
            xz_stride: long(2 * m.d_inner)?,
            dbc_stride: long(m.dbc_stride)?,
            bc_eps: m.bc_eps.unwrap_or(-1.0),
        })
    }

    fn mamba2_args(&self, m: &Mamba2Step) -> Result<Mamba2Args> {
        Ok(Mamba2Args {
            batch: int(self.spec.batch)?,
            heads: int(m.heads)?,
            head_dim: int(m.head_dim)?,
            groups: int(m.groups)?,
            gate: m.gate.into(),
            xbc_stride: long(m.heads * m.head_dim + 2 * m.groups * self.spec.state_size)?,
            in_stride: long(m.in_stride)?,
            dt_offset: long(m.dt_offset)?,
            dt_lo: m.dt_limit.0,
            dt_hi: m.dt_limit.1,
        })
    }

    /// The floats every row of Mamba-1's SSM step reads, staged once per block: a sequence's
    /// `[dt_low | B | C]`.
    fn mamba1_inputs(&self, dt_rank: usize) -> usize {
        dt_rank + 2 * self.spec.state_size
    }

    /// The floats every row of Mamba-2's SSM step reads: a sequence's `[B | C]` of `groups`
    /// groups.
    fn mamba2_inputs(&self, groups: usize) -> usize {
        2 * groups * self.spec.state_size
    }

    /// Whether a Mamba-1 mixer with this `out_proj` (`rows x cols`) and `dt_rank` runs as
    /// one tail kernel ([`DecodeKernels::mamba1_tail`]): batch 1, and an `out_proj` small
    /// enough (`TAIL_MAX_WEIGHT_BYTES`) for the kernel to pay.
    pub fn mamba1_tail_fits(&self, out_proj: (usize, usize), dt_rank: usize) -> bool {
        self.tail_fits(out_proj, self.mamba1_inputs(dt_rank))
    }

    /// [`DecodeKernels::mamba1_tail_fits`] for Mamba-2 with `groups` groups of B and C.
    pub fn mamba2_tail_fits(&self, out_proj: (usize, usize), groups: usize) -> bool {
        self.tail_fits(out_proj, self.mamba2_inputs(groups))
    }

    fn tail_fits(&self, out_proj: (usize, usize), inputs: usize) -> bool {
        self.spec
            .tail_plan(self.multiprocessors, self.tail_shared_max, out_proj, inputs)
            .is_some()
    }

    /// Launches tail kernel `function` (`mamba1_tail` or `mamba2_tail`) for `out`, with
    /// `inputs` floats staged for the SSM step: its family's own parameters `leading`, then
    /// the ones both kernels end with (the state table, the layer, the family's `args`,
    /// `TailArgs`, the barrier counter, y and h).
    ///
    /// # Safety
    /// `leading` points to the kernel's leading parameters, in order and of its types, alive
    /// for the call; the caller vouches for every buffer.
    unsafe fn launch_tail<A: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        (function, leading): (&CudaFunction, &[*mut std::ffi::c_void]),
        (states, layer): (DevicePtr, usize),
        args: &A,
        (out, inputs, norm_eps): (&TailProduct, usize, f32),
        y: DevicePtr,
    ) -> Result<()> {
        let plan = self
            .spec
            .tail_plan(
                self.multiprocessors,
                self.tail_shared_max,
                (out.rows, out.cols),
                inputs,
            )
            .ok_or_else(|| {
                cuda_err(format!(
                    "no tail kernel for an out_proj of {} x {} at batch {}",
                    out.rows, out.cols, self.spec.batch
                ))
            })?;
        let tail = TailArgs {
            rows: int(out.rows)?,
            cols: int(out.cols)?,
            rows_per_block: int(plan.rows_per_block)?,
            norm_eps,
        };
        let cfg = config((plan.grid, 1, 1), TAIL_THREADS, plan.shared)?
            .ok_or_else(|| cuda_err("an empty tail kernel".into()))?;
        let layer = int(layer)?;
        let mut params = leading.to_vec();
        params.extend([
            param(&states),
            param(&layer),
            param(args),
            param(&tail),
            param(&out.barrier),
            param(&y),
            param(&out.h),
        ]);
        // SAFETY: the parameters are the tail kernel's, in order, alive for the call (the
        // caller vouches for `leading`).
        unsafe { launch_dependent(stream, function, cfg, &mut params, true) }
    }

    /// Zeroes `count` barrier counters (u32) at `barriers`, on the stream.
    ///
    /// # Safety
    /// `barriers` points to a live device buffer of `count` u32.
    pub unsafe fn clear_barriers(
        &self,
        stream: &Arc<CudaStream>,
        barriers: DevicePtr,
        count: usize,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: the caller vouches for the buffer.
        unsafe { sys::cuMemsetD32Async(barriers, 0, count, stream.cu_stream()) }
            .result()
            .map_err(|e| cuda_err(format!("clearing the tail barriers: {e:?}")))
    }

    /// # Safety
    /// As for [`DecodeKernels::mamba1_step`], with `t.x_proj` and `t.out_proj`'s weight
    /// 16-byte aligned; the spec's batch is 1 and [`DecodeKernels::mamba1_tail_fits`] holds.
    pub unsafe fn mamba1_tail(
        &self,
        stream: &Arc<CudaStream>,
        states: DevicePtr,
        layer: usize,
        t: &Mamba1Tail,
    ) -> Result<()> {
        let m = &t.step;
        let bias = or_null(t.out_proj.bias);
        let leading = [
            param(&t.x_proj),
            param(&t.out_proj.weight),
            param(&bias),
            param(&m.xc),
            param(&m.xz),
            param(&m.dt_weight),
            param(&m.dt_bias),
            param(&m.a),
            param(&m.d),
            param(&m.dbc),
        ];
        let inputs = self.mamba1_inputs(m.dt_rank);
        // SAFETY: `leading` are `mamba1_tail`'s first parameters, in order, alive for the call.
        unsafe {
            self.launch_tail(
                stream,
                (&self.tails[0], &leading),
                (states, layer),
                &self.mamba1_args(m)?,
                (&t.out_proj, inputs, -1.0),
                m.y,
            )
        }
    }

    /// # Safety
    /// As for [`DecodeKernels::mamba2_step`], with `t.out_proj`'s weight 16-byte aligned; the
    /// spec's batch is 1 and [`DecodeKernels::mamba2_tail_fits`] holds.
    pub unsafe fn mamba2_tail(
        &self,
        stream: &Arc<CudaStream>,
        states: DevicePtr,
        layer: usize,
        t: &Mamba2Tail,
    ) -> Result<()> {
        let m = &t.step;
        let bias = or_null(t.out_proj.bias);
        let norm_w = or_null(t.norm.map(|(w, _)| w));
        let leading = [
            param(&t.out_proj.weight),
            param(&bias),
            param(&norm_w),
            param(&m.xbc),
            param(&m.zxbcdt),
            param(&m.dt_bias),
            param(&m.a),
            param(&m.d),
        ];
        let inputs = self.mamba2_inputs(m.groups);
        let norm_eps = t.norm.map_or(-1.0, |(_, eps)| eps);
        // SAFETY: `leading` are `mamba2_tail`'s first parameters, in order, alive for the call.
        unsafe {
            self.launch_tail(
                stream,
                (&self.tails[1], &leading),
                (states, layer),
                &self.mamba2_args(m)?,
                (&t.out_proj, inputs, norm_eps),
                m.y,
            )
        }
    }

    /// The input of a cuBLAS product: `out (batch, cols)`, contiguous, = `x` (rows
    /// `x_stride` apart) or its RMSNorm with `norm = (weight, eps)`, as f32 or, for bf16
    /// weights, bf16.
    ///
    /// # Safety
    /// As for [`DecodeKernels::gemv`]; `out` holds `batch * cols` elements of that type.
    pub unsafe fn prepare_rows(
        &self,
        stream: &Arc<CudaStream>,
        (x, x_stride): (DevicePtr, usize),
        cols: usize,
        norm: Option<(DevicePtr, f32)>,
        out: DevicePtr,
    ) -> Result<()> {
        let args = PrepArgs {
            cols: int(cols)?,
            out_bf16: self.spec.bf16_weights.into(),
            x_stride: long(x_stride)?,
            norm_eps: norm.map_or(-1.0, |(_, eps)| eps),
        };
        let norm_w = or_null(norm.map(|(w, _)| w));
        let cfg = config((self.spec.batch, 1, 1), ROW_THREADS, 0)?;
        let mut b = stream.launch_builder(&self.prepare_rows);
        b.arg(&x).arg(&norm_w).arg(&args).arg(&out);
        // SAFETY: arguments as `prepare_rows` takes them.
        unsafe { launch(&mut b, cfg) }
    }

    /// # Safety
    /// As for [`DecodeKernels::gemv`].
    pub unsafe fn gated_norm(&self, stream: &Arc<CudaStream>, n: &GatedNormStep) -> Result<()> {
        if n.group_size == 0 || !n.d_inner.is_multiple_of(n.group_size) {
            return Err(cuda_err(format!(
                "gated norm: {} features in groups of {}",
                n.d_inner, n.group_size
            )));
        }
        let args = GatedNormArgs {
            d_inner: int(n.d_inner)?,
            group_size: int(n.group_size)?,
            norm_before_gate: n.norm_before_gate.into(),
            z_stride: long(n.z_stride)?,
            eps: n.eps,
        };
        let blocks = self.spec.batch * (n.d_inner / n.group_size);
        let Some(cfg) = config((blocks, 1, 1), ROW_THREADS, 0)? else {
            return Ok(());
        };
        let mut params = [param(&n.y), param(&n.z), param(&n.weight), param(&args)];
        // SAFETY: the parameters are `gated_norm_step`'s, in order, alive for the call.
        unsafe { self.launch_small(stream, &self.gated_norm, cfg, &mut params) }
    }
}

/// The products of a decode step at large batch: cuBLAS GEMMs on the decode stream, with a
/// workspace of their own so that they can be recorded into a CUDA graph.
pub struct BlasProducts {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    bf16_weights: bool,
}

/// `y (+)= x W^T` for a batch: `W: (rows, cols)` in the weight type, `x: (batch, cols)`
/// contiguous in the weight type (as [`DecodeKernels::prepare_rows`] writes it), `y: (batch,
/// rows)` f32 with `y_stride` between sequences.
#[derive(Debug, Clone, Copy)]
pub struct BlasProduct {
    pub weight: DevicePtr,
    pub rows: usize,
    pub cols: usize,
    pub batch: usize,
    pub x: DevicePtr,
    pub y: DevicePtr,
    pub y_stride: usize,
    pub accumulate: bool,
}

impl BlasProducts {
    pub fn new(stream: &Arc<CudaStream>, bf16_weights: bool) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err(format!("{e:?}")))?;
        let mut workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| cuda_err(format!("{e:?}")))?;
        let ptr = workspace.device_ptr_mut(stream).0;
        // SAFETY: the workspace lives as long as the handle (both in `self`).
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE) }
            .result()
            .map_err(|e| cuda_err(format!("{e:?}")))?;
        Ok(BlasProducts {
            blas,
            _workspace: workspace,
            bf16_weights,
        })
    }

    /// # Safety
    /// Every address points to a live buffer of the sizes `p` implies, of the weight type
    /// for `weight` and `x` and f32 for `y`.
    pub unsafe fn product(&self, p: &BlasProduct) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let data_type = if self.bf16_weights {
            blas_sys::cudaDataType::CUDA_R_16BF
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        let (alpha, beta) = (1.0f32, if p.accumulate { 1.0f32 } else { 0.0 });
        // Column-major view: y^T (rows x batch, ld y_stride) = W (op T of the cols x rows
        // column-major weight) times x^T (cols x batch, ld cols).
        // SAFETY: the caller vouches for the buffers; alpha and beta live across the call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                int(p.rows)?,
                int(p.batch)?,
                int(p.cols)?,
                (&alpha as *const f32).cast(),
                p.weight as *const _,
                data_type,
                int(p.cols)?,
                p.x as *const _,
                data_type,
                int(p.cols)?,
                (&beta as *const f32).cast(),
                p.y as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                int(p.y_stride)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err(format!("cuBLAS product: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tail plans exist only at batch 1 and for small `out_proj`s, whose rows fit the
    /// blocks' shared memory; their grid is at most one block per multiprocessor (so every block is
    /// resident while the others wait at a barrier), and every block owns at least one row.
    #[test]
    fn tail_plans_keep_every_block_resident_and_busy() {
        let (sms, max_shared) = (132, (227 << 10) - TAIL_STATIC_SHARED);
        for bf16_weights in [true, false] {
            for batch in [1, 2] {
                let spec = DecodeSpec {
                    bf16_weights,
                    batch,
                    state_size: 16,
                    conv_kernel: 4,
                };
                for (rows, cols) in [(1, 8), (64, 128), (768, 1536), (2048, 4096), (2560, 5120)] {
                    let plan = spec.tail_plan(sms, max_shared, (rows, cols), 192);
                    let what = format!("{spec:?}, {rows} x {cols}: {plan:?}");
                    let weight = if bf16_weights { 2 } else { 4 };
                    let Some(plan) = plan else {
                        assert!(
                            batch > 1 || rows * cols * weight > TAIL_MAX_WEIGHT_BYTES,
                            "{what}"
                        );
                        continue;
                    };
                    assert!(rows * cols * weight <= TAIL_MAX_WEIGHT_BYTES, "{what}");
                    assert_eq!(batch, 1, "{what}");
                    assert!((1..=sms).contains(&plan.grid), "{what}");
                    assert!((plan.grid - 1) * plan.rows_per_block < rows, "{what}");
                    assert!(plan.grid * plan.rows_per_block >= rows, "{what}");
                    assert!(plan.shared <= max_shared, "{what}");
                }
            }
        }
        let spec = |bf16_weights| DecodeSpec {
            bf16_weights,
            batch: 1,
            state_size: 16,
            conv_kernel: 4,
        };
        // The 130m models take it in bf16, not in f32; the 1.4b to 2.8b ones do not.
        for bf16_weights in [true, false] {
            let plan = |rows, cols| spec(bf16_weights).tail_plan(sms, max_shared, (rows, cols), 80);
            assert_eq!(plan(768, 1536).is_some(), bf16_weights);
            assert!(plan(2048, 4096).is_none() && plan(2560, 5120).is_none());
        }
    }

    /// The launch plans of the products of the 130m to 2.8b models (and odd sizes) keep
    /// what the kernels need: a power-of-two split of at most eight warps, a grid of 1 to
    /// `tasks` blocks that all stay resident, as few tasks per block as that allows, and a
    /// staged input that fits the shared memory given without opting in.
    #[test]
    fn gemv_plans_keep_the_kernels_limits() {
        let sms = 132;
        for (bf16_weights, batch) in [(true, 1), (true, 2), (false, 1), (false, 3), (true, 8)] {
            let spec = DecodeSpec {
                bf16_weights,
                batch,
                state_size: 16,
                conv_kernel: 4,
            };
            for rows in [1, 160, 192, 2048, 2560, 3352, 8192, 10240, 10576, 50280] {
                for cols in [64, 768, 1536, 2560, 5120, 12288] {
                    let plan = spec.gemv_plan(sms, rows, cols);
                    let what = format!("{spec:?}, {rows} x {cols}: {plan:?}");
                    assert!(
                        plan.split.is_power_of_two() && plan.split <= GEMV_WARPS,
                        "{what}"
                    );
                    let groups = rows.div_ceil(plan.kernel.rows_per_group());
                    let tasks = (groups * plan.split).div_ceil(GEMV_WARPS);
                    assert!((1..=tasks).contains(&plan.grid), "{what}");
                    let resident = match plan.kernel {
                        GemvKernel::R1 if spec.batch_tile() > 2 => 2 * sms,
                        _ => 4 * sms,
                    };
                    assert!(plan.grid <= resident, "{what}");
                    assert!(
                        tasks.div_ceil(plan.grid) <= tasks.div_ceil(resident),
                        "{what}"
                    );
                    if plan.kernel.staged() {
                        assert_eq!(plan.shared, spec.batch_tile() * cols * 4, "{what}");
                        assert!(plan.shared <= GEMV_STAGED_MAX_BYTES, "{what}");
                    } else {
                        assert_eq!(plan.shared, 0, "{what}");
                    }
                }
            }
        }
    }
}
