//! CUDA kernels of the ops, used by [`crate::tensor`] when its tensors live on a CUDA
//! device (cargo feature `cuda`).
//!
//! The kernels are CUDA C++ (the `.cu` files beside this one, each with the equations it
//! implements) compiled **at run time with NVRTC**, through the cudarc that candle re-exports,
//! rather than at build time, because:
//! - the sizes a kernel keeps in registers (the state length `N`, the convolution width `W`) and
//!   the input type (f32 or bf16) become compile-time constants of a module built for the shapes
//!   actually met, so per-channel state arrays stay in registers for any `N` without a fixed list
//!   of instantiations;
//! - the code is built for the architecture of the GPU found at run time (`sm_90` on an H100 or
//!   H200), whatever machine built the binary;
//! - building the crate needs nothing beyond what candle's own `cuda` feature needs: no build
//!   script and no `nvcc` run of ours.
//!
//! Each module is compiled once per process (well under a second) and loaded once per device.
//!
//! Inputs arrive as candle's custom ops in [`crate::tensor`] hand them over: one flat tensor, f32
//! or bf16, holding every input one after another. A kernel takes that buffer, one argument
//! struct with the element offset of each input (-1 for an absent optional one) and the sizes,
//! and writes f32 outputs into one flat buffer laid out like the CPU op's output. States, sums
//! and accumulators are f32 whatever the input type.
//!
//! Every forward runs here. Backward kernels exist for gated RMSNorm, causal conv1d, the
//! selective scan (where `dim` and `dim / groups` are multiples of 32) and the SSD (where its
//! chunk fits in shared memory): they take the packed inputs and the output's gradient (f32) and
//! write the flat gradients in the CPU backward's layout and in the inputs' type ([`GradType`]);
//! gradients summed over rows or batch (weights, biases) are per-block partial sums added in a
//! fixed order by `sum_parts` (`common.cuh`), never float atomics, so they are the same on every
//! run. An SSD of other sizes runs its backward as candle tensor operations on the device
//! (`ssd_graph`), and a scan of other sizes copies the inputs to the host, runs the CPU backward
//! kernel and copies the gradients back (correct, slow).

pub mod decode;
mod launch;

pub(crate) use launch::*;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::{self, nvrtc};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout};
use half::bf16;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Fills every output and scratch buffer with NaNs before the kernels run, so that a check can
/// tell an element no kernel wrote from a computed one. Off by default (it costs a memset).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

static POISON: AtomicBool = AtomicBool::new(false);

/// A kernel source file and the helpers it is compiled with.
pub(crate) struct Source {
    name: &'static str,
    code: &'static str,
}

const COMMON: &str = include_str!("common.cuh");

/// How one module of a source is specialised: `-D` definitions, and bf16 or f32 inputs.
struct Variant<'a> {
    defines: &'a [(&'static str, usize)],
    bf16: bool,
}

impl Variant<'_> {
    /// The module's name: the source's name and every definition, unique per compiled variant.
    fn module_name(&self, source: &Source) -> String {
        let mut name = format!("mamba_ops_{}_{}", source.name, self.type_name());
        for (key, value) in self.defines {
            name.push_str(&format!("_{key}{value}"));
        }
        name
    }

    fn type_name(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    fn options(&self, arch: String) -> nvrtc::CompileOptions {
        let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
        options.extend(self.defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        if self.bf16 {
            options.push("-DIN_BF16".into());
        }
        nvrtc::CompileOptions {
            options,
            ..Default::default()
        }
    }
}

/// `f`, allowed `bytes` of dynamic shared memory (past the 48 KB a kernel gets without
/// asking).
fn with_shared_opt_in(f: CudaFunction, bytes: usize) -> candle_core::Result<CudaFunction> {
    use cudarc::driver::sys::CUfunction_attribute as Attr;
    let bytes_int = i32::try_from(bytes)
        .map_err(|_| cuda_err(format!("{bytes} bytes of shared memory do not fit an int")))?;
    f.set_attribute(
        Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes_int,
    )
    .map_err(|e| {
        cuda_err(format!(
            "allowing a kernel {bytes} bytes of shared memory: {e:?}"
        ))
    })?;
    Ok(f)
}

/// What this process has compiled and loaded.
#[derive(Default)]
struct Cache {
    /// PTX of every module compiled, by module name.
    ptx: HashMap<String, String>,
    /// Every kernel loaded, by device and `module/function`.
    functions: HashMap<(DeviceId, String), CudaFunction>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn cuda_err(msg: String) -> candle_core::Error {
    candle_core::Error::Cuda(msg.into())
}

/// The architecture NVRTC compiles for: the device's own, e.g. `sm_90`.
fn device_arch(dev: &CudaDevice) -> candle_core::Result<String> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    Ok(format!("sm_{major}{minor}"))
}

/// PTX of `source` compiled as `variant` for `arch`.
fn compile(source: &Source, variant: &Variant, arch: String) -> candle_core::Result<String> {
    let code = format!("{COMMON}\n{}", source.code);
    nvrtc::compile_ptx_with_opts(code, variant.options(arch))
        .map(|ptx| ptx.to_src())
        .map_err(|e| cuda_err(format!("compiling {}: {e:?}", variant.module_name(source))))
}

/// The device's number of multiprocessors.
fn multiprocessors(dev: &CudaDevice) -> candle_core::Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as COUNT;
    let count = dev.cuda_stream().context().attribute(COUNT).w()?;
    Ok(count.max(1) as usize)
}

/// The most shared memory a block may opt in to on the device, in bytes.
fn max_shared_opt_in(dev: &CudaDevice) -> candle_core::Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPT_IN;
    let bytes = dev.cuda_stream().context().attribute(OPT_IN).w()?;
    Ok(bytes.max(0) as usize)
}

/// Kernel `function` of `source` compiled as `variant`, compiling the module on first use and
/// loading it on first use on `dev`.
fn kernel(
    dev: &CudaDevice,
    source: &Source,
    variant: &Variant,
    function: &str,
) -> candle_core::Result<CudaFunction> {
    kernel_with_shared(dev, source, variant, function, 0)
}

/// [`kernel`], allowed `shared` bytes of dynamic shared memory (none asked for when 0) once,
/// as it is loaded: every launch of one variant of a function asks for the same.
fn kernel_with_shared(
    dev: &CudaDevice,
    source: &Source,
    variant: &Variant,
    function: &str,
    shared: usize,
) -> candle_core::Result<CudaFunction> {
    let module = variant.module_name(source);
    let key = (dev.id(), format!("{module}/{function}"));
    let mut cache = cache()
        .lock()
        .map_err(|_| cuda_err("the kernel cache lock was poisoned".into()))?;
    if let Some(f) = cache.functions.get(&key) {
        return Ok(f.clone());
    }
    if !cache.ptx.contains_key(&module) {
        let ptx = compile(source, variant, device_arch(dev)?)?;
        cache.ptx.insert(module.clone(), ptx);
    }
    let mut f = dev
        .get_or_load_custom_func(function, &module, &cache.ptx[&module])?
        .into_cuda_function();
    if shared > 0 {
        f = with_shared_opt_in(f, shared)?;
    }
    cache.functions.insert(key, f.clone());
    Ok(f)
}

/// The packed inputs of one op call on the GPU: a view of the flat input tensor and the element
/// offset at which each present input starts.
pub(crate) struct Packed<'a> {
    device: &'a CudaDevice,
    stream: Arc<CudaStream>,
    input: Input<'a>,
    starts: Vec<i64>,
}

enum Input<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
}

impl<'a> Packed<'a> {
    /// The packed tensor's storage and layout, split into inputs of `sizes` elements.
    pub(crate) fn new(
        storage: &'a CudaStorage,
        layout: &Layout,
        sizes: &[usize],
    ) -> candle_core::Result<Self> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| cuda_err("packed input must be contiguous".into()))?;
        let input = match &storage.slice {
            CudaStorageSlice::F32(s) => Input::F32(s.slice(start..end)),
            CudaStorageSlice::BF16(s) => Input::Bf16(s.slice(start..end)),
            _ => {
                return Err(cuda_err(format!(
                    "packed input must be f32 or bf16, not {:?}",
                    storage.dtype()
                )))
            }
        };
        let starts = sizes
            .iter()
            .scan(0i64, |at, &n| {
                let start = *at;
                *at += n as i64;
                Some(start)
            })
            .collect();
        Ok(Packed {
            device: &storage.device,
            stream: storage.device.cuda_stream(),
            input,
            starts,
        })
    }

    /// The start of each input in `present` order, taking the packed inputs in turn for the
    /// present ones and giving -1 for the absent ones.
    fn offsets<const K: usize>(&self, present: [bool; K]) -> candle_core::Result<[i64; K]> {
        let mut next = self.starts.iter().copied();
        let mut offsets = [-1i64; K];
        for (offset, here) in offsets.iter_mut().zip(present) {
            if here {
                *offset = next
                    .next()
                    .ok_or_else(|| cuda_err("fewer packed inputs than the op takes".into()))?;
            }
        }
        Ok(offsets)
    }

    fn variant<'d>(&self, defines: &'d [(&'static str, usize)]) -> Variant<'d> {
        Variant {
            defines,
            bf16: self.is_bf16(),
        }
    }

    /// A launch of `func` with the packed inputs as its first argument.
    fn builder<'b>(&'b self, func: &'b CudaFunction) -> LaunchArgs<'b> {
        let mut builder = self.stream.launch_builder(func);
        match &self.input {
            Input::F32(v) => builder.arg(v),
            Input::Bf16(v) => builder.arg(v),
        };
        builder
    }

    /// Whether the inputs are bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        matches!(self.input, Input::Bf16(_))
    }

    /// Whether the input starting at element `offset` of the packed buffer starts 16-byte
    /// aligned.
    fn aligned16(&self, offset: i64) -> candle_core::Result<bool> {
        let (address, size) = match &self.input {
            Input::F32(v) => (v.device_ptr(&self.stream).0, 4),
            Input::Bf16(v) => (v.device_ptr(&self.stream).0, 2),
        };
        let offset = u64::try_from(offset)
            .map_err(|_| cuda_err(format!("input offset {offset} is negative")))?;
        Ok((address + offset * size) % 16 == 0)
    }

    /// An f32 buffer of `len` elements for the kernels to fill (NaNs when poisoning).
    fn buffer(&self, len: usize) -> candle_core::Result<CudaSlice<f32>> {
        self.buffer_of::<f32>(len)
    }

    /// A buffer of `len` elements of `T` for the kernels to fill (all bits set when
    /// poisoning: NaNs in f32 and bf16).
    fn buffer_of<T: DeviceRepr>(&self, len: usize) -> candle_core::Result<CudaSlice<T>> {
        // SAFETY: every element is written by the kernels before it is read.
        let mut buf = unsafe { self.device.alloc::<T>(len.max(1))? };
        if POISON.load(Ordering::Relaxed) {
            let bytes = buf.num_bytes();
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` points to `bytes` bytes allocated just above on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, self.stream.cu_stream())
            }
            .w()?;
        }
        Ok(buf)
    }

    pub(crate) fn device(&self) -> &CudaDevice {
        self.device
    }
}

/// An element type the backward kernels write gradients in (`grad_t` of `common.cuh`): the
/// packed inputs' own, f32, or bf16 rounded once to nearest even as each gradient is written
/// (the bits a cast of the f32 gradients would give).
pub(crate) trait GradType: DeviceRepr {}

impl GradType for f32 {}
impl GradType for bf16 {}

/// A launch configuration, or `None` when the grid is empty (nothing to compute).
fn config(
    grid: (usize, usize, usize),
    block: usize,
    shared: usize,
) -> candle_core::Result<Option<LaunchConfig>> {
    let dim = |v: usize| {
        u32::try_from(v).map_err(|_| cuda_err(format!("launch dimension {v} is too large")))
    };
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(None);
    }
    Ok(Some(LaunchConfig {
        grid_dim: (dim(grid.0)?, dim(grid.1)?, dim(grid.2)?),
        block_dim: (dim(block)?, 1, 1),
        shared_mem_bytes: dim(shared)?,
    }))
}

/// Launches a prepared kernel, or does nothing for an empty grid.
///
/// # Safety
/// The arguments pushed on `builder` must match the kernel's parameters, and every buffer must
/// hold the elements the kernel reads and writes for the sizes in its argument struct.
unsafe fn launch(builder: &mut LaunchArgs, cfg: Option<LaunchConfig>) -> candle_core::Result<()> {
    match cfg {
        Some(cfg) => unsafe { builder.launch(cfg) }.map(|_| ()).w(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward scan's chunk: whole channel groups per block, no longer than twice the
    /// sequence, a column long enough for the skewed chunk and 4 more than a multiple of 32
    /// floats (so that float4 reads stay aligned and conflict-free), and shared memory within
    /// the limit.
    #[test]
    fn scan_chunks_fit_their_columns() {
        let shapes = [
            (1536, 1, 16, 2048),
            (5120, 1, 16, 40),
            (8, 2, 4, 33),
            (6, 1, 64, 12),
            (64, 1, 256, 2048),
        ];
        for (dim, groups, state, len) in shapes {
            let chunk = launch::ScanChunk::new(dim, groups, state, len).unwrap();
            let defines: HashMap<_, _> = chunk.defines(state).into_iter().collect();
            let (items, channels, column) = (
                defines["SCAN_ITEMS"],
                defines["SCAN_CHANNELS"],
                defines["SCAN_COLUMN"],
            );
            assert!(
                (dim / groups).is_multiple_of(channels),
                "{dim}/{groups}: {channels}"
            );
            assert!(
                32 * items < 2 * len.max(32),
                "{items} items for {len} steps"
            );
            let last_step = 32 * items - 1;
            assert!(
                column > last_step + 4 * (last_step / 32),
                "{items} items, column {column}"
            );
            assert_eq!(column % 32, 4, "{items} items");
            assert!((3 * channels + 2 * state) * column * 4 <= 96 << 10);
        }
    }

    /// Blocks of 4 channels, three to a multiprocessor, only where blocks of 8 leave the one
    /// wave half idle and the halved blocks still fit one (132 multiprocessors): d 1536 at batch
    /// 1, not d 5120 or five sequences of d 1536, nor N past what the 4-channel kernel holds.
    #[test]
    fn scans_under_one_wave_spread_over_smaller_blocks() {
        let spread = |batch, dim, state| {
            let chunk = launch::ScanChunk::new(dim, 1, state, 2048).unwrap();
            let defines: HashMap<_, _> = chunk
                .spread_over(batch, dim, state, 132)
                .defines(state)
                .into_iter()
                .collect();
            (defines["SCAN_CHANNELS"], defines["SCAN_BLOCKS_PER_SM"])
        };
        assert_eq!(spread(1, 1536, 16), (4, 3));
        assert_eq!(spread(1, 768, 16), (4, 3));
        assert_eq!(spread(1, 5120, 16), (8, 2));
        assert_eq!(spread(5, 1536, 16), (8, 2));
        assert_eq!(spread(1, 1536, 64), (8, 2));
    }

    /// The forward scan takes a thread per channel where the H200 measured it faster (132
    /// multiprocessors, d1536, 8 channels per chunked block), and the chunked kernel where that
    /// was faster or N is past what the sequential kernel stages.
    #[test]
    fn short_sequences_of_a_large_batch_take_a_thread_per_channel() {
        let sequential = |batch, len, state| {
            let dims = crate::selective_scan::ScanDims {
                batch,
                dim: 1536,
                len,
                state,
                bc: crate::selective_scan::BcForm::Varying { groups: 1 },
            };
            launch::one_thread_per_channel(&dims, 8, 132)
        };
        for (batch, faster_sequential, faster_chunked) in [(1, 1, 4), (8, 8, 16), (64, 64, 2048)] {
            assert!(
                sequential(batch, faster_sequential, 16),
                "b{batch} L{faster_sequential}"
            );
            assert!(
                !sequential(batch, faster_chunked, 16),
                "b{batch} L{faster_chunked}"
            );
        }
        assert!(!sequential(64, 1, 128), "N 128 is not staged");
    }

    /// The SSD backward's chunk kernel: matrix widths the least multiple of 32 (f32) or 64
    /// (bf16) that holds the row, and shared memory for Mamba-2's head shapes within an
    /// H200's 227 KB (P 64 with N 128, P 128 with N 64) but not past it with f32 inputs (P 128
    /// with N 128 keeps the tensor-operation backward); with bf16 inputs P 128 with N 128
    /// fits, and at P 64 with N 128 two blocks share a multiprocessor's 228 KB (each block
    /// also reserves 1 KB).
    #[test]
    fn ssd_backward_chunks_fit_the_shared_memory() {
        for (bf16, multiple) in [(false, 32), (true, 64)] {
            for width in [4, 16, 32, 64, 128, 200] {
                let padded = launch::ssd_bwd_width(width, bf16);
                assert!(
                    padded >= width && padded.is_multiple_of(multiple) && padded < width + multiple,
                    "{width}: {padded}"
                );
            }
        }
        const H200: usize = 227 << 10;
        assert!(launch::ssd_bwd_chunk_shared(64, 128, false) <= H200);
        assert!(launch::ssd_bwd_chunk_shared(128, 64, false) <= H200);
        assert!(launch::ssd_bwd_chunk_shared(128, 128, false) > H200);
        assert!(launch::ssd_bwd_chunk_shared(128, 128, true) <= H200);
        assert!(2 * (launch::ssd_bwd_chunk_shared(64, 128, true) + 1024) <= 228 << 10);
    }

    /// The SSD backward's gradients follow the packing order, absent inputs at -1, and fill
    /// the output exactly.
    #[test]
    fn ssd_gradients_follow_the_packing_order() {
        let dims = crate::ssd::SsdDims {
            batch: 2,
            len: 10,
            heads: 4,
            head_dim: 8,
            groups: 2,
            state: 16,
            chunk_size: 64,
        };
        let flags = |d, z| launch::SsdFlags {
            present: crate::tensor::Present {
                d,
                z,
                bias: true,
                init: false,
            },
            d_per_p: true,
            softplus: true,
            dt_limit: (0.0, f32::INFINITY),
        };
        let (tokens, steps, bc) = (2 * 10 * 4 * 8, 2 * 10 * 4, 2 * 10 * 2 * 16);
        let (at, total) = launch::ssd_grads_at(&dims, flags(true, true));
        let starts = [at.x, at.dt, at.a, at.b, at.c, at.d, at.z, at.dt_bias];
        let expected = [0, tokens, tokens + steps, tokens + steps + 4];
        assert_eq!(starts[..4], expected.map(|v| v as i64));
        assert_eq!(at.c, at.b + bc as i64);
        assert_eq!(at.z, at.d + 4 * 8, "D per channel");
        assert_eq!(at.dt_bias, at.z + tokens as i64);
        assert_eq!((at.initial_states, total), (-1, at.dt_bias as usize + 4));
        let (plain, plain_total) = launch::ssd_grads_at(&dims, flags(false, false));
        assert_eq!((plain.d, plain.z), (-1, -1));
        assert_eq!(plain.dt_bias, at.d);
        assert_eq!(plain_total, total - 4 * 8 - tokens);
    }

    /// Every source compiles with NVRTC for sm_90, f32 and bf16, with the definitions its
    /// launcher passes (for a few state sizes). Needs libnvrtc, not a GPU.
    #[test]
    fn sources_compile_with_nvrtc() {
        type Defines = Vec<(&'static str, usize)>;
        let sources: [(&Source, Vec<Defines>); 6] = [
            (
                &launch::SELECTIVE_SCAN,
                [1, 16, 64]
                    .map(|n| launch::scan_defines(n).to_vec())
                    .into_iter()
                    .chain(
                        [
                            (8, 2, 4, 16),
                            (1536, 1, 16, 2048),
                            (1536, 1, 16, 40),
                            (6, 1, 64, 1),
                        ]
                        .map(|(dim, groups, n, len)| {
                            let chunk = launch::ScanChunk::new(dim, groups, n, len).unwrap();
                            chunk.defines(n).to_vec()
                        })
                        .into_iter()
                        .chain([launch::ScanChunk::new(1536, 1, 16, 2048)
                            .unwrap()
                            .spread_over(1, 1536, 16, 132)
                            .defines(16)
                            .to_vec()]),
                    )
                    .collect(),
            ),
            (
                &launch::CAUSAL_CONV1D,
                vec![
                    vec![("CONV_W", 1), ("CONV_ITEMS", 4)],
                    vec![("CONV_W", 4), ("CONV_ITEMS", 4)],
                ],
            ),
            (
                &launch::SELECTIVE_STATE_UPDATE,
                [(4, 1), (16, 64 * 1536), (128, 64 * 1536)]
                    .map(|(n, rows)| launch::state_update_defines(n, rows).to_vec())
                    .into(),
            ),
            (
                &launch::SSD,
                vec![
                    launch::ssd_defines().to_vec(),
                    launch::ssd_backward_defines().to_vec(),
                ],
            ),
            (&launch::RMSNORM_GATED, vec![vec![("NORM_THREADS", 256)]]),
            (
                &decode::DECODE_STEP,
                [(1, 16, 4), (8, 128, 4), (3, 4, 2), (64, 16, 4)]
                    .map(|(batch, state_size, conv_kernel)| {
                        let spec = decode::DecodeSpec {
                            bf16_weights: false,
                            batch,
                            state_size,
                            conv_kernel,
                        };
                        spec.defines().to_vec()
                    })
                    .into(),
            ),
        ];
        for (source, variants) in sources {
            for defines in &variants {
                for bf16 in [false, true] {
                    let variant = Variant { defines, bf16 };
                    let ptx =
                        compile(source, &variant, "sm_90".into()).unwrap_or_else(|e| panic!("{e}"));
                    assert!(ptx.contains(".entry"), "{}", variant.module_name(source));
                }
            }
        }
    }
}
